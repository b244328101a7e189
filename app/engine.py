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
from app.runs import RunStore
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
    device_map: str = ""  # "" (one device), or a strategy splitting the model over this host's GPUs: balanced, auto
    max_memory: str = ""  # with a device_map: per-device budget, e.g. "0=70GiB,1=70GiB"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelKey":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def placement(self) -> tuple:
        """(device_map, max_memory) for Workbench.open; a malformed budget raises ConfigError (before loading)."""
        from types import SimpleNamespace

        from qroar.cli import device_map_from_args

        if not self.device_map:
            return None, None
        return device_map_from_args(SimpleNamespace(device_map=self.device_map, max_memory=self.max_memory or None))


SPLITS = {"": "one device (above)", "balanced": "balanced: layers split evenly over every GPU",
          "auto": "auto: fill the first GPU, then the next"}


def gpu_table() -> "pd.DataFrame":
    """One row per visible GPU: index, name, memory total and free (GiB; free "—" where unknown)."""
    import pandas as pd
    import torch

    rows = []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        try:
            free = f"{torch.cuda.mem_get_info(i)[0] / 2**30:.1f} GiB"
        except Exception:  # a GPU another process holds, or no driver answer: the total still says enough
            free = "—"
        rows.append({"GPU": f"cuda:{i}", "Name": p.name, "Memory": f"{p.total_memory / 2**30:.1f} GiB", "Free now": free})
    return pd.DataFrame(rows, columns=["GPU", "Name", "Memory", "Free now"])


def queue_note(n_gpus: int, device_map: str) -> str:
    """What the dashboard's job queue does with this host's GPUs, in words."""
    if n_gpus < 2:
        return ""
    if device_map:
        return (f"The model is split over the {n_gpus} GPUs ({device_map}): every job (perplexity, diagnostics, search, "
                "fidelity, export) runs on that one model, so each uses all of them, layer after layer. The job queue "
                "runs one job at a time in this server process.")
    return (f"{n_gpus} GPUs are visible, but the model sits on one: the job queue runs one job at a time in this server "
            "process, holding one model. To use every GPU, split the model over them (below), or spread a search's "
            "documents over one process per GPU from the command line: `torchrun --nproc_per_node "
            f"{n_gpus} -m qroar.cli search ... --distributed` (docs/SHARDING.md).")


@dataclass
class LoadedModel:
    wb: Any  # qroar.workbench.Workbench: it knows what is applied (its Recipe) and re-does only what changed


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
        self._entries: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def _open(self, key: ModelKey):
        if self._opener is not None:
            return self._opener(key)
        from qroar.workbench import Workbench

        device_map, max_memory = key.placement()
        return Workbench.open(key.name, device=key.device, dtype=key.dtype, allow_pickle=key.allow_pickle,
                              trust_remote_code=key.trust_remote_code, device_map=device_map, max_memory=max_memory)

    def peek(self, key: ModelKey) -> LoadedModel | None:
        return self._entries.get(key)

    def get(self, key: ModelKey, progress: Progress | None = None) -> LoadedModel:
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
        entry = LoadedModel(self._open(key))
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
    recipe: Any = None  # qroar.recipe.Recipe of this session (app.state.recipe() makes the default)
    scales_changed: float = 0.0  # when the recipe's scales last changed (Tune, a search taken over, an import)
    runs: RunStore = field(default_factory=RunStore)  # every successful result, named, for comparison


class Sessions:
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
            return rec

    def __contains__(self, token: str) -> bool:
        return token in self._sessions


@dataclass
class Backend:
    """Everything process-wide: the worker queue, the model cache, the session registry."""

    queue: JobQueue = field(default_factory=JobQueue)
    models: ModelCache = field(default_factory=ModelCache)
    registry: Sessions = field(default_factory=Sessions)
    paces: dict = field(default_factory=dict)  # ModelKey -> tokens forward per second, measured by the last run

    def timed_perplexity(self, key, wb, corpus, eval_cfg, *args, **kw):
        """wb.perplexity(...), its pace (scored tokens per second) kept for the cost lines of the pages."""
        t = time.time()
        table = wb.perplexity(corpus, eval_cfg, *args, **kw)
        secs = time.time() - t
        if secs > 0.5 and len(table):
            self.paces[key] = float(table["tokens"].sum()) / secs
        return table

    def submit(self, rec: SessionRecord, kind: str, fn, label: str = "", meta: dict | None = None) -> Job:
        prev = rec.jobs.get(kind)
        if prev is not None and prev.status == DONE:
            rec.previous[kind] = prev  # still shown while the new job runs, or if it fails
        model = rec.model_key.to_dict() if rec.model_key else None  # the model the job was submitted on

        def keep(job: Job, result) -> None:  # a successful result becomes one of the session's runs
            rec.runs.record(kind, result, model=model, job_id=job.id)

        job = self.queue.submit(kind, rec.token, fn, label=label, meta=meta, on_done=keep)
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
            if rec.recipe is not None:
                sizes = group_size_options(info["widths"].get(rec.recipe.quant.scope))
                if rec.recipe.quant.group_size not in sizes:
                    rec.recipe = rec.recipe.set("quant.group_size", default_group_size(sizes))
        return info
    return run


def _on_model(backend: Backend, key: ModelKey, recipe, progress: Progress, cancel, upto: float):
    """The loaded model with `recipe` applied (only what differs is redone); progress 0 .. `upto` of a job."""
    entry = backend.models.get(key, sub_progress(progress, 0.0, 0.05))
    entry.wb.apply(recipe, progress=sub_progress(progress, 0.05, upto), cancel=cancel)
    return entry.wb


@dataclass(frozen=True)
class PerplexityResult:
    table: pd.DataFrame  # tidy per (variant, doc, length): windows, tokens, nll, ppl
    summary: pd.DataFrame  # per (variant, length): docs, windows, tokens, nll, log_ppl, ppl
    settings: dict  # model, pi, quant, corpus, eval, recipe
    trained_context: int
    seconds: float


def perplexity_job(backend: Backend, key: ModelKey, recipe, corpus: str, eval_cfg):
    """Full precision vs quantized perplexity at eval_cfg.lengths on `corpus` (the recipe without scales)."""
    from dataclasses import replace

    from qroar.perplexity import summarize_variants

    def run(progress: Progress, cancel: threading.Event) -> PerplexityResult:
        t0 = time.time()
        r = replace(recipe, scales=None)
        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            wb.apply(r, progress=sub_progress(progress, 0.05, 0.3), cancel=cancel)
            progress(0.3, "tokenizing the corpus")
            table = backend.timed_perplexity(key, wb, corpus, eval_cfg, progress=sub_progress(progress, 0.3, 1.0),
                                             cancel=cancel)
        settings = {"model": key.to_dict(), "pi": r.pi.to_dict(), "quant": r.quant.to_dict(),
                    "corpus": corpus, "eval": eval_cfg.to_dict(), "recipe": r.to_dict()}
        return PerplexityResult(table, summarize_variants(table), settings, int(wb.info.trained_context), time.time() - t0)
    run.work_from = 0.3  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


def diagnostics_job(backend: Backend, key: ModelKey, recipe, corpus: str, cfg):
    """Every diagnostic (qroar.diagnostics.run_diagnostics) under the recipe's PI and quantizer, without scales."""
    from dataclasses import replace

    def run(progress: Progress, cancel: threading.Event):
        from qroar.diagnostics import run_diagnostics

        r = replace(recipe, scales=None)
        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            wb.apply(r, progress=sub_progress(progress, 0.05, 0.3), cancel=cancel)
            res = run_diagnostics(wb, corpus, cfg, sub_progress(progress, 0.3, 1.0), cancel)
        res.settings["recipe"] = r.to_dict()  # what the diagnostics ran under, as the other results carry it
        return res
    run.work_from = 0.3  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


def recipe_variants(recipe, choices=("quant", "quant_scaled", "fp_scaled")) -> list[str]:
    """The variants of `choices` this recipe can run: quant with a quantizer, the scaled ones with scales."""
    has = {"fp": True, "quant": recipe.quantized, "quant_scaled": recipe.quantized and recipe.scales is not None,
           "fp_scaled": recipe.scales is not None}
    return [v for v in choices if has[v]]


def fidelity_job(backend: Backend, key: ModelKey, recipe, corpus: str, cfg):
    """qroar.fidelity.run under the recipe (its scales too): every variant it has against FP under the same PI."""
    from qroar.errors import ConfigError

    variants = recipe_variants(recipe)
    if not variants:
        raise ConfigError("Nothing to compare with full precision: choose a quantizer on Setup (or set scales on Tune).")

    def run(progress: Progress, cancel: threading.Event):
        from qroar import fidelity

        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            wb.apply(recipe, progress=sub_progress(progress, 0.05, 0.2), cancel=cancel)
            res = fidelity.run(wb, corpus, cfg, variants=variants, progress=sub_progress(progress, 0.2, 1.0),
                               cancel=cancel)
        res.settings["recipe"] = recipe.to_dict()  # what it ran under, as the other results carry it
        return res
    run.work_from = 0.2  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


def retrieval_job(backend: Backend, key: ModelKey, recipe, cfg):
    """qroar.retrieval.run under the recipe: FP and every variant the recipe has, on the same prompts."""
    def run(progress: Progress, cancel: threading.Event):
        from qroar import retrieval

        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            retrieval.plan_prompts(wb, cfg)  # a key or question that cannot fit is refused before quantizing
            wb.apply(recipe, progress=sub_progress(progress, 0.05, 0.2), cancel=cancel)
            res = retrieval.run(wb, cfg, variants=["fp", *recipe_variants(recipe)],
                                progress=sub_progress(progress, 0.2, 1.0), cancel=cancel)
        res.settings["recipe"] = recipe.to_dict()
        return res
    run.work_from = 0.2  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


def loaded_entry(backend: Backend, key: ModelKey) -> LoadedModel:
    """The cached model for reading its shape and config off the worker (never its weights)."""
    from qroar.errors import ModelError

    entry = backend.models.peek(key)
    if entry is None:
        raise ModelError(f"{key.name} is no longer loaded (another model replaced it): load it again on Setup.")
    return entry


def matching_tir(diag, edges, pi) -> pd.DataFrame | None:
    """The TIR table of a diagnostics result if it was measured on these bands under this PI, else None."""
    if diag is None:
        return None
    s = diag.settings
    if list(s.get("bands", {}).get("edges", [])) != list(edges) or s.get("pi") != pi.to_dict():
        return None
    return diag.tables.get("tir")


@dataclass(frozen=True)
class TuneResult:
    table: pd.DataFrame  # tidy per (variant, doc, length); variants fp, quant, quant_scaled (fp_scaled: the control)
    summary: pd.DataFrame  # per (variant, length)
    base_key: tuple  # what the fp and quant curves depend on (re-used while it matches)
    recipe: Any  # the qroar.recipe.Recipe evaluated
    note: str | None  # why these scales cannot change the model (None: they can)
    quantized: bool
    reused_base: bool
    trained_context: int
    seconds: float

    @property
    def settings(self) -> dict:
        return {"recipe": self.recipe.to_dict()}


def tune_job(backend: Backend, key: ModelKey, recipe, corpus: str, eval_cfg, base: TuneResult | None = None,
             control: bool = False, max_docs: int = 0):
    """Perplexity of full precision, quantized and quantized + scales at eval_cfg.lengths.

    The fp and quant curves do not depend on the scales: they are taken from `base` when it was
    measured with the same model, PI, quantizer, corpus and lengths, so moving a slider costs one
    variant (and re-quantizes only the moved band's rows).
    """
    from dataclasses import replace

    from qroar.perplexity import summarize_variants

    if recipe.scales is None:
        recipe = recipe.with_scales([1.0] * (len(recipe.edges) - 1 if recipe.edges else recipe.bands.n_bands))

    def run(progress: Progress, cancel: threading.Event) -> TuneResult:
        t0 = time.time()
        base_key = (key, recipe.pi, recipe.quant_key() or recipe.quant, corpus, eval_cfg, max_docs)
        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            wb.apply(recipe, progress=sub_progress(progress, 0.05, 0.2), cancel=cancel)
            quantized = wb.qstate is not None
            scaled = "quant_scaled" if quantized else "fp_scaled"
            reuse = base is not None and base.base_key == base_key
            # FP + scales is the control: a gain it shares is a temperature effect, not a quantization repair
            extra = ("fp_scaled",) if quantized and control else ()
            variants = (scaled, *extra) if reuse else ("fp", "quant", scaled, *extra)
            progress(0.2, "tokenizing the corpus")
            docs = corpus
            if max_docs:  # a quick subset for live tuning: the first documents of the corpus
                c = wb.corpus(corpus)
                docs = c.subset(c.doc_ids[:max_docs])
            table = backend.timed_perplexity(key, wb, docs, eval_cfg, variants, progress=sub_progress(progress, 0.2, 1.0),
                                             cancel=cancel)
            note = wb.invariance_note()
            applied = wb.recipe
        if not quantized:
            table = table.assign(variant=table["variant"].replace({"fp_scaled": "quant_scaled"}))
        if reuse:
            keep = ~base.table["variant"].isin(["quant_scaled", "fp_scaled"])
            table = pd.concat([base.table[keep], table], ignore_index=True)
        return TuneResult(table, summarize_variants(table), base_key, applied, note, quantized, reuse,
                          int(wb.info.trained_context), time.time() - t0)
    run.work_from = 0.2  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


def search_job(backend: Backend, key: ModelKey, recipe, windows: pd.DataFrame, cfg):
    """qroar.search.search on this session's model and recipe (scales start at 1), inside `windows`."""
    def run(progress: Progress, cancel: threading.Event):
        from qroar.search import search

        n = len(windows)
        with backend.models.get(key, sub_progress(progress, 0.0, 0.02)).wb.lock:
            wb = _on_model(backend, key, recipe.with_scales([1.0] * n), progress, cancel, 0.1)
            cols = windows[["band", "g_min", "g_max", "reason"]].reset_index(drop=True)
            return search(wb, cfg, windows=cols, progress=sub_progress(progress, 0.1, 1.0), cancel=cancel)
    run.work_from = 0.1  # model load, PI and quantizer: start-up, its pace is not the work's
    return run


# ----------------------------------------------------------------------------- Q-ROAR: scales files and export


MAX_SCALES_FILE_BYTES = 1 << 20  # a scales file is a few kB; anything near this is not one


@dataclass(frozen=True)
class ScalesExport:
    text: str  # the scales file exactly as save_scales wrote it
    payload: dict
    file_name: str


def scales_file_job(backend: Backend, key: ModelKey, recipe, result=None):
    """The scales file (qroar.export.save_scales, an atomic write into a temporary folder) for this recipe."""
    def run(progress: Progress, cancel: threading.Event) -> ScalesExport:
        import json
        import tempfile
        from pathlib import Path

        from qroar.export import save_scales

        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            _on_model(backend, key, recipe, progress, cancel, 0.9)
            with tempfile.TemporaryDirectory(prefix="qroar-scales-") as tmp:
                text = save_scales(Path(tmp) / "scales.json", wb, result).read_text(encoding="utf-8")
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in wb.info.name.rsplit("/", 1)[-1])
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


def check_export_folder(folder: str):
    """The target folder as a Path; refuses a folder that holds anything but an earlier qroar export
    (qroar.export.check_export then asks for overwrite before an earlier export is replaced)."""
    from pathlib import Path

    from qroar.errors import ConfigError

    if not folder or not folder.strip():
        raise ConfigError("Type the folder to write the checkpoint to (it is created if missing).")
    path = Path(folder.strip()).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{path} is a file: choose a folder.")
        if any(path.iterdir()) and not (path / "qroar_scales.json").exists():
            raise ConfigError(f"{path} already holds files that are not a qroar export; choose a new or empty folder.")
    return path


def load_snippet(folder, fmt: str = "hf") -> str:
    """Plain transformers code that loads an exported folder (no qroar needed)."""
    if fmt == "gguf":
        return (
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from qroar.stock_reload import read_gguf_rope, rope_from_gguf_keys  # or copy these two functions\n\n"
            f'folder = r"{folder}"\n'
            'config = AutoConfig.from_pretrained(folder, gguf_file="model.gguf")\n'
            "# transformers' GGUF loader ignores rope.scaling.*: put the file's scaling back\n"
            'config.rope_parameters = rope_from_gguf_keys(read_gguf_rope(f"{folder}/model.gguf"))\n'
            'model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", config=config)\n'
            "# llama.cpp: llama-cli -m model.gguf (it reads the rope scaling from the file)"
        )
    if fmt == "compressed-tensors":
        return (
            "from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # pip install compressed-tensors\n\n"
            f'model = AutoModelForCausalLM.from_pretrained(r"{folder}",\n'
            "    quantization_config=CompressedTensorsConfig(dequantize=True))  # CPU; vLLM/SGLang load the folder as is\n"
            "# config.json carries the position interpolation and the quantization_config"
        )
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
    fmt: str = "hf"
    fp_bytes: int = 0  # the model's weights in full precision (tied ones once): what the export is set against


def fp_weight_bytes(model) -> int:
    """Bytes of the model's parameters as loaded (a tied tensor counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@dataclass(frozen=True)
class VerifyResult:
    path: str
    qroar_ppl: float  # qroar's evaluator on the in-memory weights (what Tune and Search show)
    stock_ppl: float  # the written file reloaded by transformers (+ compressed-tensors / gguf) in another process
    tokens: int
    rope_parameters: dict
    loader: str
    note: str

    @property
    def rel_diff(self) -> float:
        return abs(self.stock_ppl - self.qroar_ppl) / self.qroar_ppl


VERIFY_TOKENS = 2048  # one window, capped by the corpus's first document


def verify_job(backend: Backend, key: ModelKey, recipe, path, corpus: str = "embedded:dev", tokens: int = VERIFY_TOKENS):
    """Reload a written compressed-tensors or GGUF export in a separate process with stock libraries only
    (qroar/stock_reload.py: transformers + compressed-tensors / gguf) and compare its perplexity on one window with
    qroar's on the same token ids."""
    def run(progress: Progress, cancel: threading.Event) -> VerifyResult:
        import json
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        import torch

        from qroar import stock_reload
        from qroar.errors import ConfigError
        from qroar.perplexity import EvalConfig, needs_bos

        target = Path(str(path))
        if not (target / "qroar_scales.json").is_file():
            raise ConfigError(f"{target} holds no qroar export: export a compressed-tensors or gguf folder first.")
        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            _on_model(backend, key, recipe, progress, cancel, 0.3)
            ids = wb.corpus(corpus).tokens[0].tolist()
            if needs_bos(wb.tokenizer, wb.model) and wb.tokenizer.bos_token_id is not None:
                ids = [wb.tokenizer.bos_token_id] + ids
            ids = ids[:tokens]
            progress(0.3, "qroar's perplexity on the window")
            variant = "quant_scaled" if wb.scales is not None else "quant"
            ours = float(wb.evaluate([torch.tensor(ids)], EvalConfig(lengths=(len(ids),), max_windows_per_doc=1,
                                                                      add_bos=False), variant).table["ppl"].iloc[0])
        progress(0.5, "reloading the file with stock libraries in a separate process")
        with tempfile.TemporaryDirectory(prefix="qroar-verify-") as tmp:
            ids_path = Path(tmp) / "ids.json"
            ids_path.write_text(json.dumps(ids))
            r = subprocess.run([sys.executable, stock_reload.__file__, str(target), "--tokens", str(ids_path)],
                               capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise ConfigError(f"The stock reload of {target} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        note = ("transformers' GGUF loader reads no rope.scaling.* key: the scaling was read with gguf.GGUFReader and "
                "set on the config before loading" if got.get("rope_from_gguf_reader") else "")
        return VerifyResult(str(target), ours, float(got["ppl"]), len(ids), got["rope_parameters"], got["loader"], note)
    return run


def checkpoint_job(backend: Backend, key: ModelKey, recipe, folder, fmt: str = "hf", result=None,
                   overwrite: bool = False):
    """qroar.export.export in folder format `fmt` (a key of qroar.export.FORMATS) of this recipe; an earlier export
    in `folder` is replaced only with overwrite."""
    def run(progress: Progress, cancel: threading.Event) -> CheckpointExport:
        from qroar.errors import ConfigError
        from qroar.export import check_export, export, export_format

        t0 = time.time()
        if not export_format(fmt).folder:
            raise ConfigError(f"The {fmt} format is a file, not a checkpoint folder: download it from the Export page.")
        target = check_export_folder(str(folder))
        check_export(fmt, target, overwrite)  # before the quantizer's calibration
        wb = backend.models.get(key, sub_progress(progress, 0.0, 0.05)).wb
        with wb.lock:
            _on_model(backend, key, recipe, progress, cancel, 0.5)
            if cancel.is_set():
                from qroar.errors import Cancelled

                raise Cancelled("Export cancelled before anything was written.")
            progress(0.5, f"writing {target}")
            path = export(wb, fmt, target, result=result, overwrite=overwrite)
            fp = fp_weight_bytes(wb.model)
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return CheckpointExport(str(path), files, export_format(fmt).needs_quantizer, size, load_snippet(path, fmt),
                                time.time() - t0, fmt, fp)
    return run
