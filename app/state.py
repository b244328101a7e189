"""Shared state for every page: the process-wide backend, this session's record, settings with defaults.

A session is named by a token in the URL (`?s=<token>`); its settings, loaded model and last job
of each kind live in a process-wide registry, so reloading the same URL re-attaches to them.
Pages read settings with `get(name)`, build engine settings with the `*_config()` helpers
(which raise qroar ConfigError with a message for the user), and submit work with `submit()`.
"""

from __future__ import annotations

import copy
import time

import streamlit as st

from app.engine import Backend, ModelKey, SessionRecord
from app.jobs import Job

OTHER_MODEL = "other: a local folder or hub id"
CORPORA = {
    "embedded:heldout": "Embedded held-out documents",
    "embedded:dev": "Embedded dev documents",
    "path": "Local text file or folder",
    "hf": "Hugging Face dataset (hf:name:config:split:field)",
}
LENGTH_MULTIPLES = (0.125, 0.25, 0.5, 1, 2, 4, 8, 16)
DEFAULT_MULTIPLES = (1, 2, 4, 8)


def _default_model() -> str:
    from qroar.models import DEFAULT_MODEL

    return DEFAULT_MODEL


DEFAULTS = {
    "model.choice": None,  # a preset name or OTHER_MODEL; None: qroar.models.DEFAULT_MODEL
    "model.custom": "",
    "model.device": "auto",
    "model.dtype": "auto",
    "model.device_map": "",  # "": one device; balanced / auto: split over this host's GPUs
    "model.max_memory": "",
    "model.allow_pickle": False,
    "model.trust_remote_code": False,
    "corpus.source": "embedded:heldout",
    "corpus.path": "",
    "corpus.hf": "",
    "eval.lengths": None,  # None: 1x, 2x, 4x, 8x the trained context
    "eval.max_windows": 1,  # 0: every window of every document; 1 keeps the default run near 20 s on 2 CPU cores
    "eval.stride": 0,  # 0: non-overlapping windows
    "view.log_y": False,
    # Q-ROAR page options (the bands, mode/order, scales and windows are the session's Recipe)
    "qroar.auto_run": True,  # re-run perplexity when a scale moves
    "qroar.control": False,  # also evaluate FP + scales (tells temperature gains from quantization repair)
    "qroar.max_windows": 1,  # windows per document and length on Tune (0: as on Setup)
    "qroar.max_docs": 1,  # documents per Tune re-run (0: every document of the corpus); 1 keeps a move ~1 s on a CPU
    "search.n_candidates": 7,
    "search.sweeps": 1,
    "search.lengths": None,  # None: the Setup lengths
    "search.custom_weights": False,  # False: weights proportional to length
    "search.weights": None,  # {length: weight}
    "search.guard_pct": 0.5,
    "search.dev": "embedded:dev",
    "search.heldout": "embedded:heldout",
    "search.max_windows": 1,  # 0: every window; 1 (and racing) keeps a default search near 3 min on 2 CPU cores
    "search.checkpoint": "",
    "search.k_folds": 0,
    "search.strategy": "race",  # a key of qroar.search.STRATEGIES; racing by default: several times cheaper on a CPU
    "search.objective": "ppl",  # a key of qroar.search.OBJECTIVES
    "search.nested": False,  # every length from one forward at the longest
    "search.layer_groups": 4,  # strategy "layer": contiguous layer groups with their own band scales
    "search.grad_steps": 20,  # strategies "grad" / "grad-layer": at most this many Adam steps (SearchConfig's default)
    "search.grad_lr": 0.02,  # their learning rate on the log-scales
    "qroar.layer_base": None,  # Tune over per-layer scales: the per-layer scales its band multipliers act on
    "export.folder": "",
    "export.format": "hf",  # a key of qroar.export.FORMATS
    "export.overwrite": False,  # replace an earlier export in export.folder
    "export.scales_from": None,  # "tune" | "search"; None: the latest of the two
}


def default_recipe():
    """What a new session starts with: YaRN x8 (the coupling worth seeing), RTN W4 g128, 8 log bands, shared mode."""
    from qroar.recipe import Recipe
    from qroar.rope import PIConfig

    return Recipe(pi=PIConfig("yarn", 8.0, None, (("beta_fast", 32.0), ("beta_slow", 1.0))))


# Setting names whose head is a Recipe field are read from and written to the session's Recipe
# (qroar.recipe.Recipe.get/set by dotted path): "pi.factor", "quant.bits", "bands.n_bands", "scale.mode", "scales".
RECIPE_HEADS = ("pi", "quant", "calib", "bands", "edges", "scale", "scales", "windows")


# ----------------------------------------------------------------------------- backend and session


@st.cache_resource(show_spinner=False)
def backend() -> Backend:
    """One per server process: the worker queue, the model cache and the session registry."""
    return Backend()


def session() -> SessionRecord:
    """This browser session's record; creates the token (and puts it in the URL) on first use."""
    token = st.session_state.get("qroar.token") or st.query_params.get("s") or backend().registry.new_token()
    st.session_state["qroar.token"] = token
    if st.query_params.get("s") != token:  # page switches may drop query params: put it back
        st.query_params["s"] = token
    return backend().registry.session(token)


def recipe():
    """This session's Recipe: everything applied to the model (qroar.recipe)."""
    rec = session()
    if rec.recipe is None:
        rec.recipe = default_recipe()
    return rec.recipe


def set_recipe(r) -> None:
    rec = session()
    if r.scales != (rec.recipe.scales if rec.recipe is not None else None):
        rec.scales_changed = time.time()  # Export and Report pick the latest scales: tuned or searched
    rec.recipe = r


def get(name: str):
    if name.split(".", 1)[0] in RECIPE_HEADS:
        return recipe().get(name)
    settings = session().settings
    if name in settings:
        return settings[name]
    if name == "model.choice":
        return _default_model()
    return copy.deepcopy(DEFAULTS[name])


def put(name: str, value) -> None:
    if name.split(".", 1)[0] in RECIPE_HEADS:
        set_recipe(recipe().set(name, value))
        return
    if name not in DEFAULTS:
        raise KeyError(f"unknown setting {name!r}: add it to app.state.DEFAULTS")
    session().settings[name] = value


def submit(kind: str, fn, label: str = "", meta: dict | None = None) -> Job:
    """Queue `fn(progress, cancel)` on the worker as this session's job of `kind`."""
    return backend().submit(session(), kind, fn, label=label, meta=meta)


def job(kind: str) -> Job | None:
    """This session's last job of `kind` (running or finished), surviving reloads."""
    return session().jobs.get(kind)


def result(kind: str) -> Job | None:
    """This session's last successful job of `kind`: shown while a newer one runs or after it failed."""
    return backend().result(session(), kind)


# ----------------------------------------------------------------------------- the loaded model


def model_name() -> str:
    choice = get("model.choice")
    return get("model.custom").strip() if choice == OTHER_MODEL else choice


def model_key() -> ModelKey:
    return ModelKey(model_name(), get("model.device"), get("model.dtype"),
                    bool(get("model.allow_pickle")), bool(get("model.trust_remote_code")),
                    get("model.device_map") or "", (get("model.max_memory") or "").strip() if get("model.device_map") else "")


def model_info() -> dict | None:
    """Info of this session's loaded model (ModelInfo fields + `widths`), or None before a load."""
    return session().model_info


def loaded_key() -> ModelKey | None:
    return session().model_key


def trained_context() -> int | None:
    info = model_info()
    return int(info["trained_context"]) if info else None


# ----------------------------------------------------------------------------- engine settings


def corpus_spec() -> str:
    from qroar.errors import DataError

    source = get("corpus.source")
    if source.startswith("embedded"):
        return source
    if source == "path":
        path = get("corpus.path").strip()
        if not path:
            raise DataError("Give the path of a text file or a folder of .txt files for the corpus on the Setup page.")
        return path
    spec = get("corpus.hf").strip()
    if not spec:
        raise DataError("Give a dataset as hf:name:config:split:field for the corpus on the Setup page.")
    return spec if spec.startswith("hf:") else f"hf:{spec}"


def length_options(trained: int | None) -> list[int]:
    base = trained or 2048
    return sorted({max(16, int(base * m)) for m in LENGTH_MULTIPLES})


def default_lengths(trained: int | None) -> list[int]:
    base = trained or 2048
    return [int(base * m) for m in DEFAULT_MULTIPLES]


def lengths() -> list[int]:
    """Chosen context lengths; the defaults follow the loaded model's trained context."""
    chosen = get("eval.lengths")
    if chosen is None:
        return default_lengths(trained_context())
    return sorted(int(n) for n in chosen if isinstance(n, int) or str(n).isdigit())


def eval_config():
    from qroar.perplexity import EvalConfig

    return EvalConfig(lengths=tuple(lengths()), stride=int(get("eval.stride")) or None,
                      max_windows_per_doc=int(get("eval.max_windows")) or None)


# ----------------------------------------------------------------------------- which scales Export and Report use


def scale_sources() -> list[dict]:
    """The scales this session produced, latest first: Tune's (the session's recipe, set by hand or taken over)
    and the last search's. Each: name ("tune" | "search"), label, recipe (qroar.recipe.Recipe), result
    (a SearchResult or None) and time. A search taken over on Tune is one source, with its results."""
    from qroar.recipe import Recipe

    rec, out = session(), []
    job = result("search")
    searched = None
    if job is not None and job.result.recipe and not job.result.note:
        searched = Recipe.from_dict(job.result.recipe)
        out.append({"name": "search", "label": f"Search result (held-out {100 * job.result.heldout_gain():+.2f}%)",
                    "recipe": searched, "result": job.result, "time": job.finished or 0.0})
    r = recipe()
    if r.scales is not None and rec.scales_changed:
        if searched is not None and r == searched:
            out[0]["time"] = max(out[0]["time"], rec.scales_changed)
        else:
            out.append({"name": "tune", "label": "Tune (set by hand)", "recipe": r, "result": None,
                        "time": rec.scales_changed})
    return sorted(out, key=lambda s: -s["time"])


def chosen_scales() -> dict | None:
    """The source Export and Report use: the one picked with "export.scales_from", else the latest."""
    sources = scale_sources()
    pick = get("export.scales_from")
    for s in sources:
        if s["name"] == pick:
            return s
    return sources[0] if sources else None
