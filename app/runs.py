"""Runs: every finished result of a session, named and kept with the settings it ran with, so two of them
can be compared in one picture ("no PI vs YaRN under 3-bit", "RTN vs AWQ", "before vs after Q-ROAR").

A run's settings are its Recipe (qroar.recipe.Recipe.to_dict) plus the page options it ran with (corpus,
evaluation, diagnostics or search settings), so two runs differ by the Recipe's own dotted paths.
A job that finishes successfully becomes a Run (app.engine.Backend.submit hooks the store in); the store
lives on the session record, so runs survive a reload like results do. RUN_KINDS says, per job kind,
how to read a result's settings and which comparisons it takes part in: a new kind is one entry there.
No Streamlit here.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from qroar.errors import ConfigError

MAX_RUNS = 50  # per session; the oldest unpinned run goes first
MISSING = "—"  # a setting one run has and another does not


# ----------------------------------------------------------------------------- what each kind keeps


def _quant_label(q: dict | None) -> str:
    if not q or q.get("method") == "none" or q.get("bits") == 16:
        return "fp"
    g = q.get("group_size")
    group = {0: "ch", -1: "ch", -2: "tensor"}.get(g, f"g{g}")
    return f"{q['method']} w{q['bits']} {group}" + (" sym" if q.get("symmetric") else "")


def _pi_label(pi: dict | None) -> str:
    if not pi or pi.get("rope_type") == "default":
        return "no PI"
    return f"{pi['rope_type']} x{float(pi['factor']):g}"


def _settings(recipe, **options) -> dict:
    """A run's settings: its Recipe (qroar.recipe.Recipe.to_dict), so a difference reads by the Recipe's own
    dotted paths ("pi.factor", "quant.bits", "scales"), then the page options it ran with."""
    return {**(recipe if isinstance(recipe, dict) else recipe.to_dict()), **options}


def _perplexity_settings(res) -> dict:
    s = res.settings  # app.engine.perplexity_job: model, pi, quant, corpus, eval, recipe
    return {"model": s["model"], **_settings(s["recipe"], corpus=s["corpus"], eval=s["eval"])}


def _diagnostics_settings(res) -> dict:
    # the model comes from the session (as a ModelKey dict); seconds and document ids are not settings
    s = res.settings  # qroar.diagnostics.run_diagnostics, with the recipe app.engine.diagnostics_job ran under
    return _settings(s["recipe"], corpus=s["corpus"], diag=s["diag"], capture_length=s["capture_length"],
                     noise_layers=s["noise_layers"], ip_lengths=s["ip_lengths"])


def _tune_settings(res) -> dict:
    # base_key = (ModelKey, PIConfig, quant key, corpus, EvalConfig, max_docs) (app.engine.tune_job)
    key, _, _, corpus, eval_cfg, max_docs = res.base_key
    control = bool((res.summary["variant"] == "fp_scaled").any())  # FP + scales evaluated too
    return {"model": key.to_dict(), **_settings(res.recipe, corpus=corpus, eval=eval_cfg.to_dict(),
                                                max_docs=max_docs, control=control)}


def _search_settings(res) -> dict:
    # the recipe with the windows searched in, as the Report's search command reruns it; the search options
    w = res.windows.sort_values("band")
    windows = [[float(lo), float(hi)] for lo, hi in zip(w["g_min"], w["g_max"])]
    search = {k: v for k, v in res.search_cfg.items() if k != "checkpoint"}
    return _settings({**res.recipe, "windows": windows}, search=search)


def _fidelity_settings(res) -> dict:
    s = res.settings  # qroar.fidelity.run, with the recipe app.engine.fidelity_job ran under
    return _settings(s["recipe"], corpus=s["corpus"], fidelity=s["config"])


def _retrieval_settings(res) -> dict:
    s = res.settings  # qroar.retrieval.run, with the recipe app.engine.retrieval_job ran under
    return _settings(s["recipe"], retrieval=s["config"])


def recipe_of(settings: dict):
    """The qroar.recipe.Recipe part of a run's settings."""
    from qroar.recipe import Recipe

    return Recipe.from_dict({k: v for k, v in settings.items() if k in Recipe.__dataclass_fields__})


def _n_bands(s: dict) -> int | None:
    edges = s.get("edges")
    return len(edges) - 1 if edges else (s.get("bands") or {}).get("n_bands")


def _same_but_scales(old: dict, new: dict) -> bool:
    """Tune re-runs on every slider move: moves on one set-up are one run, not fifty."""
    return {k: v for k, v in old.items() if k != "scales"} == {k: v for k, v in new.items() if k != "scales"}


def _tune_name(s: dict) -> str:
    scales = s.get("scales") or []
    moved = sum(1 for g in scales if g != 1.0)
    return f"{len(scales)} bands, {moved} scaled" if scales else ""


@dataclass(frozen=True)
class RunKind:
    """How a job kind becomes a run, and which comparisons it takes part in."""

    settings: Callable[[Any], dict]  # the result's settings as JSON values
    curves: Callable[[Any], pd.DataFrame] | None = None  # (variant, length, ppl) rows: drawn on the perplexity overlay
    diagnostics: Callable[[Any], dict] | None = None  # qroar.diagnostics tables: drawn on the diagnostics overlays
    name_extra: Callable[[dict], str] | None = None  # a last part of the automatic name
    same_series: Callable[[dict, dict], bool] | None = None  # True: the new run replaces the last one of its kind


RUN_KINDS: dict[str, RunKind] = {
    "perplexity": RunKind(_perplexity_settings, curves=lambda r: r.summary),
    "diagnostics": RunKind(_diagnostics_settings, diagnostics=lambda r: r.tables,
                           name_extra=lambda s: f"{s.get('capture_length')} tokens"),
    "tune": RunKind(_tune_settings, curves=lambda r: r.summary, name_extra=_tune_name, same_series=_same_but_scales),
    "fidelity": RunKind(_fidelity_settings, name_extra=lambda s: f"KL to {max(s['fidelity']['lengths'])} tokens"),
    "retrieval": RunKind(_retrieval_settings, name_extra=lambda s: "passkey " + ",".join(map(str, s["retrieval"]["lengths"]))),
    "search": RunKind(_search_settings, curves=lambda r: r.heldout, name_extra=lambda s: f"{_n_bands(s)} bands"),
}


def auto_name(kind: str, settings: dict) -> str:
    """e.g. 'perplexity · yarn x8 · rtn w3 g64'."""
    spec = RUN_KINDS.get(kind)
    extra = spec.name_extra(settings) if spec is not None and spec.name_extra is not None else ""
    return " · ".join(p for p in (kind, _pi_label(settings.get("pi")), _quant_label(settings.get("quant")), extra) if p)


# ----------------------------------------------------------------------------- the store


@dataclass
class Run:
    id: str
    kind: str
    name: str
    created: float
    settings: dict
    result: Any = field(repr=False)
    pinned: bool = False
    renamed: bool = False  # named by the user: kept apart from the next run of a series
    job_id: str = ""

    @property
    def recipe(self):
        """The qroar.recipe.Recipe this run ran with."""
        return recipe_of(self.settings)

    @property
    def curves(self) -> pd.DataFrame | None:
        spec = RUN_KINDS[self.kind]
        return None if spec.curves is None else spec.curves(self.result)

    @property
    def tables(self) -> dict | None:
        spec = RUN_KINDS[self.kind]
        return None if spec.diagnostics is None else spec.diagnostics(self.result)


class RunStore:
    """A session's runs, oldest first, at most `max_runs` (pinned ones are dropped last), and the runs chosen
    for comparison. Written by the worker thread when a job finishes and read by page runs: one lock."""

    def __init__(self, max_runs: int = MAX_RUNS):
        self.max_runs = max_runs
        self._runs: list[Run] = []
        self._chosen: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def record(self, kind: str, result, model: dict | None = None, job_id: str = "",
               created: float | None = None) -> Run | None:
        """Keep `result` as a run (None for kinds that are not runs, e.g. loading a model)."""
        spec = RUN_KINDS.get(kind)
        if spec is None or result is None:
            return None
        settings = spec.settings(result)
        if model is not None and not isinstance(settings.get("model"), dict):
            settings = {"model": model, **settings}
        created = time.time() if created is None else created
        with self._lock:
            last = next((r for r in reversed(self._runs) if r.kind == kind), None)
            if (spec.same_series is not None and last is not None and not last.pinned and not last.renamed
                    and spec.same_series(last.settings, settings)):
                last.settings, last.result, last.created, last.job_id = settings, result, created, job_id
                last.name = self._unique(auto_name(kind, settings), but=last)
                return last
            run = Run(f"r{next(self._ids)}", kind, self._unique(auto_name(kind, settings)), created, settings,
                      result, job_id=job_id)
            self._runs.append(run)
            while len(self._runs) > self.max_runs:
                old = next((r for r in self._runs if not r.pinned), self._runs[0])
                self._drop(old.id)
            return run

    def _unique(self, name: str, but: Run | None = None) -> str:
        taken = {r.name for r in self._runs if r is not but}
        if name not in taken:
            return name
        return next(f"{name} ({i})" for i in itertools.count(2) if f"{name} ({i})" not in taken)

    def _drop(self, run_id: str) -> None:
        self._runs = [r for r in self._runs if r.id != run_id]
        self._chosen = [c for c in self._chosen if c != run_id]

    def runs(self, kinds: tuple[str, ...] | None = None) -> list[Run]:
        """Oldest first, optionally of some kinds only."""
        with self._lock:
            return [r for r in self._runs if kinds is None or r.kind in kinds]

    def get(self, run_id: str) -> Run:
        run = next((r for r in self._runs if r.id == run_id), None)
        if run is None:
            raise ConfigError(f"Run {run_id} is no longer kept (deleted, or dropped as one of the oldest); "
                              "choose another on the Runs page.")
        return run

    def rename(self, run_id: str, name: str) -> Run:
        name = " ".join((name or "").split())
        if not name:
            raise ConfigError("Type a name for the run.")
        with self._lock:
            run = self.get(run_id)
            if any(r.name == name for r in self._runs if r is not run):
                raise ConfigError(f"Another run is already named {name!r}: choose a name that tells them apart "
                                  "(it names the run's lines in the charts).")
            run.name, run.renamed = name, True
            return run

    def pin(self, run_id: str, pinned: bool = True) -> Run:
        with self._lock:
            run = self.get(run_id)
            run.pinned = bool(pinned)
            return run

    def delete(self, run_id: str) -> None:
        with self._lock:
            self.get(run_id)
            self._drop(run_id)

    @property
    def chosen(self) -> list[str]:
        """Ids of the runs chosen for comparison (shared by the Runs, Perplexity, Diagnostics and Report pages)."""
        return list(self._chosen)

    def choose(self, run_ids) -> None:
        with self._lock:
            known = {r.id for r in self._runs}
            self._chosen = [i for i in dict.fromkeys(run_ids) if i in known]

    def chosen_runs(self) -> list[Run]:
        with self._lock:
            by_id = {r.id: r for r in self._runs}
            return [by_id[i] for i in self._chosen if i in by_id]


# ----------------------------------------------------------------------------- tables


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys: {"quant": {"bits": 3}} -> {"quant.bits": 3}; an empty dict
    (e.g. no PI parameters) adds no key."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _text(v) -> str:
    if v is MISSING:
        return MISSING
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def _plain(v):
    return json.loads(json.dumps(v, default=str)) if isinstance(v, (list, tuple, dict)) else v  # tuples as lists


def _same(a, b) -> bool:
    """Equal as settings: 8 and 8.0 are one factor, a tuple and a list of the same lengths one list; True is not 1."""
    if a is MISSING or b is MISSING or isinstance(a, bool) != isinstance(b, bool):
        return a is b
    return _plain(a) == _plain(b)


def settings_diff(named: dict[str, dict]) -> pd.DataFrame:
    """One row per setting (dotted key of the flattened settings) whose value is not the same in every run,
    one column per run (MISSING where a run has no such setting); values as text."""
    flat = {name: flatten(s) for name, s in named.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    rows = []
    for k in keys:
        values = [f.get(k, MISSING) for f in flat.values()]
        if not all(_same(values[0], v) for v in values[1:]):
            rows.append([k, *map(_text, values)])
    return pd.DataFrame(rows, columns=["setting", *named])


def settings_rows(settings: dict) -> pd.DataFrame:
    """One run's settings as (setting, value) text rows."""
    flat = flatten(settings)
    return pd.DataFrame({"setting": list(flat), "value": [_text(v) for v in flat.values()]})


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """The Runs page's list: newest first, the settings a reader tells runs apart by."""
    rows = []
    for r in reversed(runs):
        s = r.settings
        lengths = (s.get("eval") or {}).get("lengths") or (s.get("search") or {}).get("lengths") or []
        rows.append({"id": r.id, "name": r.name, "kind": r.kind, "PI": _pi_label(s.get("pi")),
                     "quantizer": _quant_label(s.get("quant")),
                     "corpus": str(s.get("corpus") or (s.get("search") or {}).get("heldout_corpus") or ""),
                     "lengths": ", ".join(map(str, lengths)) or (f"{s['capture_length']}" if "capture_length" in s else ""),
                     "time": time.strftime("%H:%M:%S", time.localtime(r.created)), "pinned": r.pinned})
    return pd.DataFrame(rows, columns=["id", "name", "kind", "PI", "quantizer", "corpus", "lengths", "time", "pinned"])


def curves_frame(runs: list[Run]) -> pd.DataFrame:
    """Perplexity rows of every run that has them, tagged with the run's name: run, variant, length, ppl."""
    parts = [c[["variant", "length", "ppl"]].assign(run=r.name) for r in runs
             if (c := r.curves) is not None and len(c)]
    cols = ["run", "variant", "length", "ppl"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def diagnostics_frame(runs: list[Run], table: str) -> pd.DataFrame:
    """One diagnostics table (e.g. "tir", "ip", "logit_noise_pooled") of every run that has it, with a run column."""
    parts = [t[table].assign(run=r.name) for r in runs if (t := r.tables) is not None and table in t]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run"])


def runs_diff(runs: list[Run]) -> pd.DataFrame:
    """The settings that differ between runs, a column per run named by it; the kind too when it differs."""
    return settings_diff({r.name: {"kind": r.kind, **r.settings} for r in runs})


def trained_context(runs: list[Run]) -> int | None:
    """The trained context every run that knows one shares (None when they differ or none knows)."""
    known = {int(t) for r in runs if (t := getattr(r.result, "trained_context", None)
                                      or (getattr(r.result, "settings", None) or {}).get("trained_context"))}
    return known.pop() if len(known) == 1 else None


def comparison(runs: list[Run]) -> tuple[pd.DataFrame, dict]:
    """What comparing `runs` shows: the settings that differ (with a kind row when kinds differ) and every
    overlay figure their results allow (app.run_charts.overlay_figures)."""
    from app import run_charts

    diff = runs_diff(runs)
    figs = run_charts.overlay_figures(curves_frame(runs), diagnostics_frame(runs, "tir"),
                                      diagnostics_frame(runs, "logit_noise_pooled"), diagnostics_frame(runs, "ip"),
                                      trained_context(runs))
    return diff, figs


def kinds_with(part: str) -> tuple[str, ...]:
    """The run kinds that take part in a comparison: "curves" (perplexity overlay) or "diagnostics"."""
    return tuple(k for k, spec in RUN_KINDS.items() if getattr(spec, part) is not None)
