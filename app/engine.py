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
    """Group sizes dividing every width (all standard ones when widths are unknown), then per-channel (0)
    and per-tensor (-2: one grid per weight, not row-scale-equivariant, where symmetric rescaling acts)."""
    sizes = [g for g in GROUP_SIZES if not widths or all(w % g == 0 for w in widths)]
    return sizes + [0, -2]


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


# ----------------------------------------------------------------------------- Q-ROAR: bands, windows, scales


@dataclass(frozen=True)
class Tuning:
    """What Q-ROAR puts on the model: bands (edges by the rule, or explicit ones from a scales file),
    mode and order (qroar.rescale.ScaleConfig) and one scale per band."""

    bands: Any  # qroar.bands.BandConfig
    scale: Any  # qroar.rescale.ScaleConfig
    scales: tuple[float, ...]
    edges: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {"bands": self.bands.to_dict(), "scale": self.scale.to_dict(), "scales": list(self.scales),
                "edges": None if self.edges is None else list(self.edges)}


def loaded_entry(backend: Backend, key: ModelKey) -> Entry:
    """The cached entry for reading the model's shape and config off the worker (never its weights)."""
    from qroar.errors import ModelError

    entry = backend.models.peek(key)
    if entry is None:
        raise ModelError(f"{key.name} is no longer loaded (another model replaced it): load it again on Setup.")
    return entry


def band_edges(entry: Entry, pi, band_cfg, edges=None) -> tuple[int, ...]:
    """The band edges the workbench will use under `pi` (explicit edges win), computed without touching the model."""
    from qroar import bands as bands_mod, rope

    if edges is not None:
        return tuple(int(e) for e in edges)
    freqs = rope.frequencies(entry.wb.model.config, pi, base_params=entry.wb.base_rope)
    return bands_mod.bands_for(freqs, band_cfg).edges


def band_windows(entry: Entry, pi, edges, tir: pd.DataFrame | None = None, moved=None) -> pd.DataFrame:
    """Windows G_b by the engine's rule (qroar.search.derive_windows: IP, and TIR_W when given) under `pi`,
    then any windows the user moved by hand. Columns: band, pairs, ip, tir, g_min, g_max, reason, moved."""
    from qroar import bands as bands_mod, rope
    from qroar.diagnostics import interpolation_pressure
    from qroar.search import check_windows, derive_windows

    wb = entry.wb
    freqs = lambda D=None: rope.frequencies(wb.model.config, pi, seq_len=D, base_params=wb.base_rope)  # noqa: E731
    bands = bands_mod.Bands(tuple(edges))
    ip = interpolation_pressure(freqs, bands, (freqs().trained_context * 8,))  # the length search.windows_for uses
    table = derive_windows(ip, tir)
    table.insert(1, "pairs", [f"{r.start}-{r.stop - 1}" for r in bands.ranges()])
    table["moved"] = False
    if moved is not None:
        for b, (lo, hi) in enumerate(check_windows(moved, bands.n_bands)):
            if (lo, hi) != (table.at[b, "g_min"], table.at[b, "g_max"]):
                table.loc[b, ["g_min", "g_max", "reason", "moved"]] = [lo, hi, "moved by hand", True]
    return table


def matching_tir(diag, edges, pi) -> pd.DataFrame | None:
    """The TIR table of a diagnostics result if it was measured on these bands under this PI, else None."""
    if diag is None:
        return None
    s = diag.settings
    if list(s.get("bands", {}).get("edges", [])) != list(edges) or s.get("pi") != pi.to_dict():
        return None
    return diag.tables.get("tir")


def invariance_note_for(entry: Entry, quant, scale_cfg) -> str | None:
    """The engine's invariance note (qroar.rescale) for these settings, from the model's shape only."""
    from qroar.models import attention_layers
    from qroar.rescale import invariance_note

    has_norm = any(layer.q_norm is not None for layer in attention_layers(entry.wb.model))
    return invariance_note(None if quant is None or quant.is_identity else quant, scale_cfg, has_norm)


def use_tuning(wb, t: Tuning) -> None:
    """Put bands and scales on the workbench; a changed scale re-computes only its own band's rows."""
    wb.set_bands(t.bands, edges=t.edges)
    if wb.scales is None or wb.scale_cfg != t.scale or wb.scales.numel() != len(t.scales):
        wb.set_scales(list(t.scales), t.scale)
        return
    for b, (now, g) in enumerate(zip(wb.scales.tolist(), t.scales)):
        if now != g:
            wb.set_band_scale(b, float(g))


def _prepare(entry: Entry, pi, quant, tuning: Tuning, calib: str, progress: Progress, cancel, upto: float) -> None:
    """Apply this session's PI and quantizer, then its bands and scales: progress 0.05 .. `upto` of a job."""
    apply_settings(entry, pi, quant, calib, sub_progress(progress, 0.05, upto), cancel)
    progress(upto, "setting the scales")
    use_tuning(entry.wb, tuning)


@dataclass(frozen=True)
class TuneResult:
    table: pd.DataFrame  # tidy per (variant, doc, length); variants fp, quant, scaled
    summary: pd.DataFrame  # per (variant, length)
    base_key: tuple  # what the fp and quant curves depend on (re-used while it matches)
    tuning: Tuning
    note: str | None  # why these scales cannot change the model (None: they can)
    quantized: bool
    reused_base: bool
    trained_context: int
    seconds: float


def tune_job(backend: Backend, key: ModelKey, pi, quant, corpus: str, eval_cfg, tuning: Tuning,
             base: TuneResult | None = None, calib: str = "embedded:dev", control: bool = False,
             max_docs: int = 0):
    """Perplexity of full precision, quantized and quantized + scales at eval_cfg.lengths.

    The fp and quant curves do not depend on the scales: they are taken from `base` when it was
    measured with the same model, PI, quantizer, corpus and lengths, so moving a slider costs one
    variant (and re-quantizes only the moved band's rows).
    """
    def run(progress: Progress, cancel: threading.Event) -> TuneResult:
        t0 = time.time()
        base_key = (key, pi, quant_key(quant, pi, calib) or quant, corpus, eval_cfg, max_docs)
        entry = backend.models.get(key, sub_progress(progress, 0.0, 0.05))
        with entry.wb.lock:
            _prepare(entry, pi, quant, tuning, calib, progress, cancel, 0.2)
            wb = entry.wb
            quantized = wb.qstate is not None
            scaled = "scaled" if quantized else "fp_scaled"
            reuse = base is not None and base.base_key == base_key
            # FP + scales is the control: a gain it shares is a temperature effect, not a quantization repair
            extra = ("fp_scaled",) if quantized and control else ()
            variants = (scaled, *extra) if reuse else ("fp", "quant", scaled, *extra)
            progress(0.2, "tokenizing the corpus")
            docs = corpus
            if max_docs:  # a quick subset for live tuning: the first documents of the corpus
                from qroar.workbench import Corpus

                c = wb.corpus(corpus)
                docs = Corpus(corpus, c.doc_ids[:max_docs], c.tokens[:max_docs])
            table = wb.perplexity(docs, eval_cfg, variants, progress=sub_progress(progress, 0.2, 1.0), cancel=cancel)
            note = wb.invariance_note()
        if not quantized:
            table = table.assign(variant=table["variant"].replace({"fp_scaled": "scaled"}))
        if reuse:
            keep = ~base.table["variant"].isin(["scaled", "fp_scaled"])
            table = pd.concat([base.table[keep], table], ignore_index=True)
        return TuneResult(table, summarize_variants(table), base_key, tuning, note, quantized, reuse,
                          int(entry.wb.info.trained_context), time.time() - t0)
    return run


def search_job(backend: Backend, key: ModelKey, pi, quant, tuning: Tuning, windows: pd.DataFrame, cfg,
               calib: str = "embedded:dev"):
    """qroar.search.search on this session's model, PI, quantizer and bands, inside `windows`."""
    def run(progress: Progress, cancel: threading.Event):
        from qroar.search import search

        start = Tuning(tuning.bands, cfg.scale_cfg, (1.0,) * len(tuning.scales), tuning.edges)
        entry = backend.models.get(key, sub_progress(progress, 0.0, 0.02))
        with entry.wb.lock:
            _prepare(entry, pi, quant, start, calib, progress, cancel, 0.1)
            cols = windows[["band", "g_min", "g_max", "reason"]].reset_index(drop=True)
            return search(entry.wb, cfg, windows=cols, progress=sub_progress(progress, 0.1, 1.0), cancel=cancel)
    return run


# ----------------------------------------------------------------------------- Q-ROAR: scales files and export


MAX_SCALES_FILE_BYTES = 1 << 20  # a scales file is a few kB; anything near this is not one


@dataclass(frozen=True)
class ScalesExport:
    text: str  # the scales file exactly as save_scales wrote it
    payload: dict
    file_name: str


def scales_file_job(backend: Backend, key: ModelKey, pi, quant, tuning: Tuning, result=None,
                    calib: str = "embedded:dev"):
    """The scales file (qroar.export.save_scales, an atomic write into a temporary folder) for these settings."""
    def run(progress: Progress, cancel: threading.Event) -> ScalesExport:
        import json
        import tempfile
        from pathlib import Path

        from qroar.export import save_scales

        entry = backend.models.get(key, sub_progress(progress, 0.0, 0.05))
        with entry.wb.lock:
            _prepare(entry, pi, quant, tuning, calib, progress, cancel, 0.9)
            with tempfile.TemporaryDirectory(prefix="qroar-scales-") as tmp:
                text = save_scales(Path(tmp) / "scales.json", entry.wb, result).read_text(encoding="utf-8")
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in entry.wb.info.name.rsplit("/", 1)[-1])
        return ScalesExport(text, json.loads(text), f"{name}.qroar-scales.json")
    return run


def import_scales(backend: Backend, key: ModelKey, data: bytes, name: str = "scales.json"):
    """Validate an uploaded scales file (qroar.export.load_scales: JSON only, nothing is executed) against the
    loaded model; raises ScalesFileError naming the upload, not a temporary path."""
    import tempfile
    from pathlib import Path

    from qroar.errors import ScalesFileError
    from qroar.export import check_model, load_scales

    if len(data) > MAX_SCALES_FILE_BYTES:
        raise ScalesFileError(f"{name} is {len(data):,} bytes; a scales file is a few kB. Choose the .json that "
                              "qroar's Export page or `qroar export` wrote.")
    entry = loaded_entry(backend, key)
    with tempfile.TemporaryDirectory(prefix="qroar-upload-") as tmp:
        path = Path(tmp) / "upload.json"
        path.write_bytes(data)
        try:
            sf = load_scales(path)
            check_model(sf, entry.wb, name)
        except ScalesFileError as e:
            raise ScalesFileError(str(e).replace(f"Scales file {path}", name).replace(str(path), name)) from None
    return sf


def settings_from_scales_file(sf) -> dict:
    """Session settings (app.state names) that reproduce a scales file: PI, quantizer, bands, mode, order, scales."""
    pi, q = sf.pi, sf.quant
    out = {"pi.rope_type": pi.rope_type, "pi.factor": float(pi.factor),
           "pi.original": int(pi.original_max_position_embeddings or 0),
           **{f"pi.{k}": float(v) for k, v in pi.params if k in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")},
           "qroar.n_bands": sf.band_cfg.n_bands, "qroar.align": sf.band_cfg.align,
           "qroar.mode": sf.scale_cfg.mode, "qroar.order": sf.scale_cfg.order, "qroar.scales": list(sf.scales),
           "qroar.edges": {"n_bands": sf.band_cfg.n_bands, "align": sf.band_cfg.align, "edges": list(sf.edges)},
           "qroar.windows": None}
    if q is None:
        out["quant.method"] = "none"
    else:
        out.update({"quant.method": q.method, "quant.bits": q.bits, "quant.group_size": q.group_size,
                    "quant.symmetric": q.symmetric, "quant.scope": q.scope, "quant.calib_samples": q.n_samples,
                    "quant.calib_len": q.seq_len})
    return out


def check_export_folder(folder: str):
    """The target folder as a Path; refuses a folder that holds anything but an earlier qroar export,
    since the export replaces the folder whole."""
    from pathlib import Path

    from qroar.errors import ConfigError

    if not folder or not folder.strip():
        raise ConfigError("Type the folder to write the checkpoint to (it is created; an earlier export there is replaced).")
    path = Path(folder.strip()).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is a file: choose a folder.")
        if any(path.iterdir()) and not (path / "qroar_scales.json").exists():
            raise ConfigError(f"{path} already holds files that are not a qroar export; the export replaces the "
                              "whole folder, so choose a new or empty folder.")
    return path


def load_snippet(folder) -> str:
    """Plain transformers code that loads an exported folder (no qroar needed)."""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained(r"{folder}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained(r"{folder}")\n'
        "# the config carries the position interpolation; qroar_scales.json records the scales"
    )


@dataclass(frozen=True)
class CheckpointExport:
    path: str
    files: list[str]
    quantized: bool
    bytes: int
    snippet: str
    seconds: float


def checkpoint_job(backend: Backend, key: ModelKey, pi, quant, tuning: Tuning, folder, quantized: bool,
                   result=None, calib: str = "embedded:dev", overwrite: bool = False):
    """qroar.export.export_checkpoint: the scales folded into full-precision (or fake-quantized) weights."""
    def run(progress: Progress, cancel: threading.Event) -> CheckpointExport:
        from qroar.export import check_target, export_checkpoint

        t0 = time.time()
        target = check_export_folder(str(folder))
        check_target(target, overwrite)  # before the quantizer's calibration
        entry = backend.models.get(key, sub_progress(progress, 0.0, 0.05))
        with entry.wb.lock:
            _prepare(entry, pi, quant, tuning, calib, progress, cancel, 0.5)
            if cancel.is_set():
                from qroar.errors import Cancelled

                raise Cancelled("Export cancelled before anything was written.")
            progress(0.5, f"writing {target}")
            path = export_checkpoint(entry.wb, target, quantized=quantized, result=result, overwrite=overwrite)
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return CheckpointExport(str(path), files, quantized, size, load_snippet(path), time.time() - t0)
    return run


def tuning_from_settings(get: Callable[[str], Any], n_pairs: int) -> Tuning:
    """The session's Tuning from its settings (`get` = app.state.get); stale pieces fall back to the rule:
    edges from a scales file only while the band count and alignment match, scales only if one per band."""
    from qroar.bands import BandConfig
    from qroar.rescale import ScaleConfig

    n = min(max(int(get("qroar.n_bands")), 1), n_pairs)
    align = get("qroar.align")
    beta = {}
    if get("pi.rope_type") == "yarn":  # YaRN-aligned edges follow the PI's own ramp
        beta = dict(beta_fast=float(get("pi.beta_fast")), beta_slow=float(get("pi.beta_slow")))
    fixed = get("qroar.edges") or {}
    edges = tuple(fixed["edges"]) if fixed.get("n_bands") == n and fixed.get("align") == align else None
    scales = get("qroar.scales")
    scales = tuple(float(g) for g in scales) if scales is not None and len(scales) == n else (1.0,) * n
    return Tuning(BandConfig(n, align, **beta), ScaleConfig(get("qroar.mode"), get("qroar.order")), scales, edges)


def moved_windows(get: Callable[[str], Any], edges) -> list | None:
    """Windows the user moved by hand, while they were moved on these very bands."""
    moved = get("qroar.windows")
    if not moved or list(moved.get("edges", [])) != list(edges):
        return None
    return moved["windows"]
