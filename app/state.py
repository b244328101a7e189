"""Shared state for every page: the process-wide backend, this session's record, settings with defaults.

A session is named by a token in the URL (`?s=<token>`); its settings, loaded model and last job
of each kind live in a process-wide registry, so reloading the same URL re-attaches to them.
Pages read settings with `get(name)`, build engine settings with the `*_config()` helpers
(which raise qroar ConfigError with a message for the user), and submit work with `submit()`.
"""

from __future__ import annotations

import copy

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
    "model.allow_pickle": False,
    "model.trust_remote_code": False,
    "pi.rope_type": "yarn",
    "pi.factor": 8.0,
    "pi.original": 0,  # 0: the model's trained context
    "pi.beta_fast": 32.0,
    "pi.beta_slow": 1.0,
    "pi.low_freq_factor": 1.0,
    "pi.high_freq_factor": 4.0,
    "quant.method": "rtn",
    "quant.bits": 4,
    "quant.group_size": 128,
    "quant.symmetric": False,
    "quant.scope": "linear",
    "quant.calib_samples": 16,
    "quant.calib_len": 0,  # 0: the model's trained context
    "corpus.source": "embedded:heldout",
    "corpus.path": "",
    "corpus.hf": "",
    "eval.lengths": None,  # None: 1x, 2x, 4x, 8x the trained context
    "eval.max_windows": 4,  # 0: every window of every document
    "eval.stride": 0,  # 0: non-overlapping windows
    "view.log_y": False,
    # Q-ROAR (Tune, Search, Export): bands, mode/order, scales and windows are shared by the three pages
    "qroar.n_bands": 8,
    "qroar.align": "log",  # "log" | "yarn"
    "qroar.mode": "shared",  # "symmetric" | "shared"
    "qroar.order": "before",  # "before" | "after" quantization
    "qroar.scales": None,  # one float per band; None: all 1
    "qroar.windows": None,  # {"edges": [...], "windows": [[g_min, g_max], ...]} moved by hand; None: the rule's
    "qroar.edges": None,  # {"n_bands", "align", "edges"} from a scales file; None: edges by the rule
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
    "search.max_windows": 2,  # 0: every window
    "search.checkpoint": "",
    "search.k_folds": 0,
    "search.race": False,  # successive halving over dev documents
    "search.nested": False,  # every length from one forward at the longest
    "export.folder": "",
    "export.quantized": False,
}


def register_defaults(defaults: dict) -> None:
    """A page's own settings (names like "diag.n_bands"): call at the top of the page, before its widgets."""
    for name, value in defaults.items():
        DEFAULTS.setdefault(name, value)


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


def get(name: str):
    settings = session().settings
    if name in settings:
        return settings[name]
    if name == "model.choice":
        return _default_model()
    return copy.deepcopy(DEFAULTS[name])


def put(name: str, value) -> None:
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
                    bool(get("model.allow_pickle")), bool(get("model.trust_remote_code")))


def model_info() -> dict | None:
    """Info of this session's loaded model (ModelInfo fields + `widths`), or None before a load."""
    return session().model_info


def loaded_key() -> ModelKey | None:
    return session().model_key


def trained_context() -> int | None:
    info = model_info()
    return int(info["trained_context"]) if info else None


# ----------------------------------------------------------------------------- engine settings


def pi_config():
    from qroar.rope import PIConfig

    rope_type = get("pi.rope_type")
    if rope_type == "default":
        return PIConfig()
    params = []
    if rope_type == "yarn":
        params = [("beta_fast", float(get("pi.beta_fast"))), ("beta_slow", float(get("pi.beta_slow")))]
    elif rope_type == "llama3":
        params = [("high_freq_factor", float(get("pi.high_freq_factor"))), ("low_freq_factor", float(get("pi.low_freq_factor")))]
    original = int(get("pi.original") or 0) or None
    return PIConfig(rope_type, float(get("pi.factor")), original, tuple(sorted(params)))


def quant_config():
    from qroar.quant import QuantConfig

    calib_len = int(get("quant.calib_len") or 0) or (trained_context() or 2048)
    return QuantConfig(method=get("quant.method"), bits=int(get("quant.bits")), group_size=int(get("quant.group_size")),
                       symmetric=bool(get("quant.symmetric")), scope=get("quant.scope"),
                       n_samples=int(get("quant.calib_samples")), seq_len=calib_len).validate()


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
