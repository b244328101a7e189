"""The app's one door into the qroar engine: a process-wide model cache, per-session records, and
the job functions pages submit. No Streamlit here: everything below is testable on its own.

Every job function runs on the single worker thread (app.jobs), so the shared Workbench is only
ever touched there; each job first applies its own session's PI and quantizer settings, which
makes two sessions with different settings on one model safe.
"""

from __future__ import annotations

import gc
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pandas as pd

from app.jobs import DONE, Job, JobQueue, Progress
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


# ----------------------------------------------------------------------------- model cache


@dataclass(frozen=True)
class ModelKey:
    """The load settings: two sessions with the same key share one loaded model."""

    name: str
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelKey":
        return cls(**{k: d[k] for k in ("name", "device", "dtype", "allow_pickle", "trust_remote_code") if k in d})


@dataclass
class Entry:
    wb: Any  # qroar.workbench.Workbench
    quant_key: tuple | None = None  # what the model is quantized with now (None: full precision)


def sub_progress(progress: Progress | None, lo: float, hi: float) -> Progress:
    """Map a step's own 0..1 progress into [lo, hi] of the whole job."""
    def report(f: float, msg: str = "") -> None:
        if progress is not None:
            progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), msg)
    return report


class ModelCache:
    """Loaded Workbenches by ModelKey, least recently used first out; by default one at a time,
    since two large models rarely fit on one GPU together."""

    def __init__(self, max_models: int = 1, opener: Callable | None = None):
        self.max_models = max_models
        self._opener = opener
        self._entries: OrderedDict[ModelKey, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def _open(self, key: ModelKey):
        if self._opener is not None:
            return self._opener(key)
        from qroar.workbench import Workbench

        return Workbench.open(key.name, device=key.device, dtype=key.dtype,
                              allow_pickle=key.allow_pickle, trust_remote_code=key.trust_remote_code)

    def peek(self, key: ModelKey) -> Entry | None:
        return self._entries.get(key)

    def get(self, key: ModelKey, progress: Progress | None = None) -> Entry:
        """The cached entry, loading (and evicting the oldest) when missing; call from the worker only."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            while len(self._entries) >= self.max_models:
                self._entries.popitem(last=False)
                _free_memory()  # before loading the next one, or both may not fit
        if progress:
            progress(0.05, f"loading {key.name}")
        entry = Entry(self._open(key))
        with self._lock:
            self._entries[key] = entry
        return entry

    def keys(self) -> list[ModelKey]:
        return list(self._entries)


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sessions


@dataclass
class SessionRecord:
    """What one browser session (one ?s= token) keeps across reloads: settings, the loaded model, last jobs."""

    token: str
    settings: dict = field(default_factory=dict)
    model_key: ModelKey | None = None
    model_info: dict | None = None  # ModelInfo.to_dict() plus "widths" (input widths per quant scope)
    jobs: dict[str, Job] = field(default_factory=dict)  # last job of each kind
    previous: dict[str, Job] = field(default_factory=dict)  # last successful job of each kind before that
    touched: float = field(default_factory=time.time)


class Registry:
    """Session records by token, process-wide, so a reload of the same URL re-attaches."""

    def __init__(self, max_sessions: int = 500):
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self._lock = threading.Lock()
        self.max_sessions = max_sessions

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(8)

    def session(self, token: str) -> SessionRecord:
        with self._lock:
            rec = self._sessions.get(token)
            if rec is None:
                rec = self._sessions[token] = SessionRecord(token)
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(token)
            rec.touched = time.time()
            return rec

    def __contains__(self, token: str) -> bool:
        return token in self._sessions


@dataclass
class Backend:
    """Everything process-wide: the worker queue, the model cache, the session registry."""

    queue: JobQueue = field(default_factory=JobQueue)
    models: ModelCache = field(default_factory=ModelCache)
    registry: Registry = field(default_factory=Registry)

    def submit(self, rec: SessionRecord, kind: str, fn, label: str = "", meta: dict | None = None) -> Job:
        prev = rec.jobs.get(kind)
        if prev is not None and prev.status == DONE:
            rec.previous[kind] = prev  # still shown while the new job runs, or if it fails
        job = self.queue.submit(kind, rec.token, fn, label=label, meta=meta)
        rec.jobs[kind] = job
        return job

    @staticmethod
    def result(rec: SessionRecord, kind: str) -> Job | None:
        """The last job of `kind` that finished successfully (the current one, else the previous one)."""
        job = rec.jobs.get(kind)
        return job if job is not None and job.status == DONE else rec.previous.get(kind)


# ----------------------------------------------------------------------------- job functions


def quant_widths(model) -> dict[str, list[int]]:
    """Input widths of the quantized linears per scope: a group size must divide all of them."""
    from qroar.quant import SCOPES, quant_targets

    return {s: sorted({lin.in_features for _, lin in quant_targets(model, s)}) for s in SCOPES}


def group_size_options(widths: list[int] | None) -> list[int]:
    """Group sizes dividing every width (all standard ones when widths are unknown), then per-channel (0)."""
    sizes = [g for g in GROUP_SIZES if not widths or all(w % g == 0 for w in widths)]
    return sizes + [0]


def default_group_size(sizes: list[int]) -> int:
    """128 where it fits, else the largest listed size below it, else per-channel."""
    fits = [g for g in sizes if 0 < g <= 128]
    return max(fits) if fits else 0


def load_job(backend: Backend, key: ModelKey, rec: SessionRecord | None = None):
    """Load (or re-use) a model; the result is its info dict with the quantizable widths.

    On success the session record points at it, so a reload of the page finds the model loaded.
    """
    def run(progress: Progress, cancel: threading.Event) -> dict:
        entry = backend.models.get(key, progress)
        progress(0.9, "reading the model's shape")
        info = entry.wb.info.to_dict()
        info["widths"] = quant_widths(entry.wb.model)
        if rec is not None:
            before = (rec.model_info or {}).get("trained_context")
            rec.model_key, rec.model_info = key, info
            if before != info["trained_context"]:
                rec.settings.pop("eval.lengths", None)  # lengths chosen for another context no longer fit
            sizes = group_size_options(info["widths"].get(rec.settings.get("quant.scope", "linear")))
            if rec.settings.get("quant.group_size", 128) not in sizes:
                rec.settings["quant.group_size"] = default_group_size(sizes)
        return info
    return run


def quant_key(quant, pi, calib: str) -> tuple | None:
    """What a quantized state depends on: calibrated methods also depend on PI and the calibration corpus."""
    if quant is None or quant.is_identity:
        return None
    from qroar.quant import NEEDS_CALIBRATION

    calibrated = quant.method in NEEDS_CALIBRATION
    return (quant, pi if calibrated else None, calib if calibrated else None)


def apply_settings(entry: Entry, pi, quant, calib: str, progress: Progress | None, cancel) -> None:
    """Put the model in this session's PI and quantizer settings, re-quantizing only when needed."""
    wb = entry.wb
    if wb.pi != pi:
        wb.set_pi(pi)
    qk = quant_key(quant, pi, calib)
    if entry.quant_key == qk and (qk is None) == (wb.qstate is None):
        return
    entry.quant_key = None
    wb.set_quant(quant if qk is not None else None, calib_corpus=calib, progress=progress, cancel=cancel)
    entry.quant_key = qk


@dataclass(frozen=True)
class PerplexityResult:
    table: pd.DataFrame  # tidy per (variant, doc, length): windows, tokens, nll, ppl
    summary: pd.DataFrame  # per (variant, length): docs, windows, tokens, nll, log_ppl, ppl
    settings: dict  # model, pi, quant, corpus, eval
    trained_context: int
    seconds: float


def summarize_variants(table: pd.DataFrame) -> pd.DataFrame:
    """Token-weighted perplexity per (variant, length), through the engine's own summarize()."""
    from qroar.perplexity import summarize

    parts = [summarize(g).assign(variant=v) for v, g in table.groupby("variant", sort=False)]
    cols = ["variant", "length", "docs", "windows", "tokens", "nll", "log_ppl", "ppl"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def perplexity_job(backend: Backend, key: ModelKey, pi, quant, corpus: str, eval_cfg, calib: str = "embedded:dev"):
    """Full precision vs quantized perplexity at eval_cfg.lengths on `corpus`."""
    def run(progress: Progress, cancel: threading.Event) -> PerplexityResult:
        t0 = time.time()
        entry = backend.models.get(key, sub_progress(progress, 0.0, 0.05))
        with entry.wb.lock:
            apply_settings(entry, pi, quant, calib, sub_progress(progress, 0.05, 0.3), cancel)
            progress(0.3, "tokenizing the corpus")
            table = entry.wb.perplexity(corpus, eval_cfg, progress=sub_progress(progress, 0.3, 1.0), cancel=cancel)
        settings = {"model": key.to_dict(), "pi": pi.to_dict(), "quant": quant.to_dict() if quant else None,
                    "corpus": corpus, "eval": eval_cfg.to_dict()}
        return PerplexityResult(table, summarize_variants(table), settings, int(entry.wb.info.trained_context),
                                time.time() - t0)
    return run
