"""Writing results: scales files, folded checkpoints, and atomic writes.

Every file is written atomically (a killed write leaves the old file or the new one, never half).

Scales file (JSON, `schema_version` 1; see `scales_payload` for every key): model identity (name,
source, fingerprint from models.fingerprint at load time, model_type, n_layers, n_heads,
n_kv_heads, head_dim, rotary_dim), RoPE (the PI setting and the rope_parameters in force), the
quantizer settings, band settings and edges, mode, order, the scales, and the search's objective,
dev and held-out results when it came from a search; created_at and the qroar version.

Folded checkpoint (`export_checkpoint`): safetensors + config (with the PI rope_parameters in
force) + tokenizer, with the scales folded into the full-precision weights (for the user's own
quantizer) or, with quantized=True, the fake-quantized scaled weights; written to a temporary
folder beside the target and moved into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qroar.errors import ConfigError, ScalesFileError

SCHEMA_VERSION = 2  # 2: the Recipe under "recipe" (the flat keys of version 1 are kept, written from it)
KIND = "qroar-scales"


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_replace_dir(build, final) -> Path:
    """Move a fully written folder `build` into place at `final` (an old `final` is replaced whole).

    Where the OS can swap two folders atomically, a kill at any moment leaves the old or the new
    folder at `final`. Elsewhere the old folder is parked at `.NAME.old` for two renames; an error
    between them puts it back, and a kill between them is repaired by the next call.
    """
    build, final = Path(build), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():  # an earlier swap was killed between its two renames
        os.replace(old, final)
    if final.exists() and _exchange(build, final):
        shutil.rmtree(build, ignore_errors=True)  # now the old folder
        return final
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(build, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- scales file


def _model_identity(wb) -> dict:
    i = wb.info
    return {"name": i.name, "source": i.source, "fingerprint": i.fingerprint, "model_type": i.model_type,
            "n_layers": i.n_layers, "n_heads": i.n_heads, "n_kv_heads": i.n_kv_heads, "head_dim": i.head_dim,
            "rotary_dim": i.rotary_dim}


def scales_payload(wb, result=None) -> dict:
    """The scales file's content for the workbench's current scales (and a search result, if any)."""
    from qroar import __version__, rope

    if wb.scales is None:
        raise ConfigError("No scales are set: run a search or set scales before saving them.")
    rec = lambda df: None if df is None else json.loads(df.to_json(orient="records"))  # noqa: E731
    recipe = wb.recipe if wb.qstate is not None else replace(wb.recipe, quant=None)
    return {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "recipe": recipe.to_dict(),
        "model": _model_identity(wb),
        "rope": {"pi": wb.pi.to_dict(), "rope_parameters": rope.rope_parameters(wb.model.config)},
        "quant": wb.quant_cfg.to_dict() if wb.quant_cfg is not None else None,
        "bands": {**wb.band_cfg.to_dict(), "edges": list(wb.bands.edges)},
        "mode": wb.scale_cfg.mode, "order": wb.scale_cfg.order,
        "scales": [float(g) for g in wb.scales],
        "objective": result.objective if result is not None else None,
        "dev": rec(result.dev) if result is not None else None,
        "heldout": rec(result.heldout) if result is not None else None,
        "note": wb.invariance_note(),
        "search": result.search_cfg if result is not None else None,
        "source": "search" if result is not None else "scales set by hand",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "qroar_version": __version__,
    }


def save_scales(path, wb, result=None) -> Path:
    """Write the workbench's scales (and a SearchResult's figures) as a scales file, atomically."""
    return atomic_write_text(path, json.dumps(scales_payload(wb, result), indent=1, allow_nan=False))


@dataclass(frozen=True)
class ScalesFile:
    """A validated scales file."""

    scales: tuple[float, ...]
    scale_cfg: object  # rescale.ScaleConfig
    band_cfg: object  # bands.BandConfig
    edges: tuple[int, ...]
    pi: object  # rope.PIConfig
    quant: object | None  # quant.QuantConfig
    model: dict
    objective: dict | None
    raw: dict
    recipe: object = None  # qroar.recipe.Recipe: what `Workbench.apply` puts on the model


_REQUIRED = {"schema_version": int, "model": dict, "rope": dict, "quant": (dict, type(None)), "bands": dict,
             "mode": str, "order": str, "scales": list}
_MODEL_REQUIRED = {"name": str, "fingerprint": str, "n_layers": int, "head_dim": int, "rotary_dim": int}


def _parse(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScalesFileError(f"Scales file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScalesFileError(f"Scales file {path} cannot be read as UTF-8 text ({e}).") from e
    if not text.strip():
        raise ScalesFileError(f"Scales file {path} is empty; save the scales again.")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        ends_early = not text.rstrip().endswith(("}", "]")) or e.msg.startswith("Unterminated string")
        if e.pos >= len(text.rstrip()) - 1 or ends_early:  # a JSON document cut short, wherever the cut fell
            raise ScalesFileError(f"Scales file {path} is truncated (the JSON ends early at line {e.lineno}); "
                                  "save or copy it again.") from None
        raise ScalesFileError(f"Scales file {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if not isinstance(d, dict):
        raise ScalesFileError(f"Scales file {path} must hold a JSON object, not {type(d).__name__}.")
    return d


def _typename(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def _check_keys(d: dict, required: dict, where: str, path: Path) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ScalesFileError(f"Scales file {path} lacks {where}key(s) {', '.join(missing)}; it is incomplete or not a scales file.")
    for k, t in required.items():
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, t):
            raise ScalesFileError(f"In scales file {path}, {where}{k!r} should be {_typename(t)}, got {type(v).__name__} ({v!r:.60}).")


def load_scales(path, wb=None) -> ScalesFile:
    """Read and validate a scales file; with a workbench, also check it was made for that model.

    Raises ScalesFileError for malformed or truncated JSON, missing keys, wrong types, bad scales
    (zero, negative, NaN, inf), a band count that does not match the edges, another model, or a
    schema written by a newer qroar.
    """
    from qroar.bands import BandConfig
    from qroar.errors import ConfigError as _CE
    from qroar.quant import QuantConfig
    from qroar.rescale import ScaleConfig, check_scales
    from qroar.rope import PIConfig

    path = Path(path)
    d = _parse(path)
    v = d.get("schema_version")
    if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION:
        raise ScalesFileError(f"Scales file {path} has schema version {v}: it was written by a newer qroar "
                              f"(this one reads version {SCHEMA_VERSION}); upgrade qroar.")
    _check_keys(d, _REQUIRED, "", path)
    if v < 1:
        raise ScalesFileError(f"Scales file {path} has schema version {v}, which no qroar wrote.")
    _check_keys(d["model"], _MODEL_REQUIRED, "model.", path)
    edges = d["bands"].get("edges")
    if not (isinstance(edges, list) and len(edges) >= 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
            and edges[0] == 0 and all(a < b for a, b in zip(edges, edges[1:]))):
        raise ScalesFileError(f"In scales file {path}, bands.edges must be increasing integers from 0, got {edges!r:.80}.")
    if not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in d["scales"]):
        raise ScalesFileError(f"In scales file {path}, scales must be a list of numbers, got {d['scales']!r:.80}.")
    n_bands = len(edges) - 1
    if len(d["scales"]) != n_bands:
        raise ScalesFileError(f"Scales file {path} has {len(d['scales'])} scales for {n_bands} bands (edges {edges}); "
                              "it is corrupted.")
    try:
        scales = check_scales(d["scales"], n_bands)
        scale_cfg = ScaleConfig(d["mode"], d["order"])
        band_cfg = BandConfig.from_dict({k: v for k, v in d["bands"].items() if k != "edges"})
        pi = PIConfig.from_dict(d["rope"].get("pi") or {})
        quant = QuantConfig.from_dict(d["quant"]) if d["quant"] is not None else None
    except (_CE, TypeError, ValueError) as e:
        raise ScalesFileError(f"Scales file {path} holds an invalid setting: {e}") from e
    if band_cfg.n_bands != n_bands:
        raise ScalesFileError(f"Scales file {path} says {band_cfg.n_bands} bands but its edges give {n_bands}; it is corrupted.")
    from qroar.recipe import Recipe

    try:
        recipe = (Recipe.from_dict(d["recipe"]) if isinstance(d.get("recipe"), dict) else None) or Recipe(
            pi=pi, quant=quant, calib=(d.get("calib") or "embedded:dev"), bands=band_cfg, edges=tuple(edges),
            scale=scale_cfg, scales=tuple(float(g) for g in scales))
    except (_CE, TypeError, ValueError) as e:
        raise ScalesFileError(f"Scales file {path} holds an invalid recipe: {e}") from e
    recipe = replace(recipe, edges=tuple(edges), scales=tuple(float(g) for g in scales))
    sf = ScalesFile(tuple(float(g) for g in scales), scale_cfg, band_cfg, tuple(edges), pi, quant, d["model"],
                    d.get("objective"), d, recipe)
    if wb is not None:
        check_model(sf, wb, path)
    return sf


def check_model(sf: ScalesFile, wb, path="the scales file") -> None:
    """ScalesFileError naming both models if the file was made for another model or shape."""
    m, i = sf.model, wb.info
    want = (m["n_layers"], m["head_dim"], m["rotary_dim"])
    have = (i.n_layers, i.head_dim, i.rotary_dim)
    if want != have:
        raise ScalesFileError(
            f"{path} is for {m['name']} ({m['n_layers']} layers, head_dim {m['head_dim']}, rotary_dim {m['rotary_dim']}) "
            f"but the loaded model {i.name} has {i.n_layers} layers, head_dim {i.head_dim}, rotary_dim {i.rotary_dim}: "
            "load the model the scales were made for.")
    if m["fingerprint"] != i.fingerprint:
        raise ScalesFileError(
            f"{path} was made for {m['name']} (fingerprint {m['fingerprint']}) but the loaded model is {i.name} "
            f"(fingerprint {i.fingerprint}): same shape, different weights. Load the model the scales were made for.")
    if sf.edges[-1] != i.rotary_dim // 2:
        raise ScalesFileError(f"{path} has bands over {sf.edges[-1]} RoPE pairs but {i.name} has {i.rotary_dim // 2}.")


def apply_scales(wb, sf: ScalesFile, quantize: bool = True, calib_corpus: str | None = None, progress=None,
                 cancel=None) -> None:
    """Put a scales file's PI, quantizer (if asked; after the PI, which GPTQ/AWQ calibration sees),
    bands and scales on a workbench."""
    check_model(sf, wb)
    recipe = sf.recipe if quantize else replace(sf.recipe, quant=None)
    if calib_corpus:
        recipe = replace(recipe, calib=calib_corpus)
    wb.apply(recipe, progress=progress, cancel=cancel)


# ----------------------------------------------------------------------------- folded checkpoint


def export_checkpoint(wb, folder, quantized: bool = False, result=None, meta: dict | None = None) -> Path:
    """Write a Hugging Face folder with the scales folded in; returns its path.

    quantized=False: full-precision weights with the scales folded in (quantize it with your own
    tool). quantized=True: the fake-quantized scaled weights the workbench evaluates ("quant_scaled").
    The config carries the PI rope_parameters in force; `qroar_scales.json` records the scales
    (`meta`, e.g. the scales file it came from, or the workbench's own settings).
    """
    folder = Path(folder)
    if quantized and wb.qstate is None:
        raise ConfigError("A quantized export needs a quantizer: set one (or export full precision).")
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "qroar_scales.json").exists())):
        # the export replaces the folder whole: never someone's other files
        raise ConfigError(f"{folder} exists and is not an earlier qroar export; choose a new or empty folder.")
    scaled = wb.scales is not None
    variant = ("quant_scaled" if quantized else "fp_scaled") if scaled else ("quant" if quantized else "fp")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        with wb.lock, wb.variant(variant) as model:
            model.save_pretrained(tmp, safe_serialization=True)
        if wb.tokenizer is not None:
            wb.tokenizer.save_pretrained(tmp)
        meta = dict(meta) if meta is not None else (scales_payload(wb, result) if scaled else {"scales": None})
        meta["export"] = {"variant": variant, "quantized": quantized}
        atomic_write_text(tmp / "qroar_scales.json", json.dumps(meta, indent=1, allow_nan=False))
        return atomic_replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ExportFormat:
    """One entry of FORMATS: a new file format is one function and one line there.

    write(wb, path, result=None, meta=None, **options) -> Path of what it wrote, from the workbench's
    applied recipe. needs_quantizer: refuses a recipe without one. folder: writes a folder (else one file).
    """

    write: object
    label: str
    needs_quantizer: bool = False
    folder: bool = True


def _write_scales(wb, path, result=None, meta=None, **options) -> Path:
    return save_scales(path, wb, result)


def _write_hf(wb, path, result=None, meta=None, **options) -> Path:
    return export_checkpoint(wb, path, quantized=False, result=result, meta=meta, **options)


def _write_fake_quant(wb, path, result=None, meta=None, **options) -> Path:
    return export_checkpoint(wb, path, quantized=True, result=result, meta=meta, **options)


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(_write_hf, "Hugging Face folder, full-precision weights with the scales folded in"),
    "fake-quant": ExportFormat(_write_fake_quant, "Hugging Face folder, fake-quantized scaled weights (full-precision storage)",
                               needs_quantizer=True),
    "scales": ExportFormat(_write_scales, "scales file (JSON): the recipe and the search's results", folder=False),
}


def export(wb, fmt: str, path, result=None, meta=None, **options) -> Path:
    """Write the workbench's applied recipe in format `fmt` (a key of FORMATS)."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    f = FORMATS[fmt]
    if f.needs_quantizer and wb.qstate is None:
        raise ConfigError(f"The {fmt} format stores quantized weights, and no quantizer is set: choose a quantizer, "
                          "or the hf format for full precision.")
    return f.write(wb, path, result=result, meta=meta, **options)
