"""Writing results: scales files, folded checkpoints, and atomic writes.

Every file is written atomically (a killed write leaves the old file or the new one, never half).

Scales file (JSON, `schema_version` 3; see `scales_payload` for every key): model identity (name,
source, fingerprint from models.fingerprint at load time, model_type, n_layers, n_heads,
n_kv_heads, head_dim, rotary_dim), RoPE (the PI setting and the rope_parameters in force), the
quantizer settings, band settings and edges, mode, order, the scales (one per band, or from version 3 one
list per layer with "per_layer": true), and the search's objective,
dev and held-out results when it came from a search; created_at and the qroar version.

Exports (`export(wb, fmt, path)`, one format per entry of FORMATS: hf, fake-quant, scales): the
folded checkpoint is safetensors + config (with the PI rope_parameters in force) + tokenizer, with
the scales folded into the full-precision weights (hf, for the user's own quantizer) or the
fake-quantized scaled weights (fake-quant). Every format is built beside the target and moved into
place whole; an earlier export (or file) is replaced only when asked (overwrite=True), and files of
the user's in an earlier export folder are carried into the new one.

Files and folders are created with the modes the user's umask gives (a replaced one keeps its own).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qroar.errors import ConfigError, ScalesFileError

# 2: the Recipe under "recipe" (the flat keys of version 1 are kept, written from it); 3: "scales" may be per layer
# (a list of one list of band scales per layer, "per_layer": true); versions 1 and 2 still load
SCHEMA_VERSION = 3
KIND = "qroar-scales"


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, full: int) -> int:
    """The mode `path` has if it exists (a replacement keeps it), else `full` (0o666 file, 0o777 folder) less the
    umask, as open() and mkdir() would give; mkstemp and mkdtemp make 0600/0700, which surprises users who share."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return full & ~_umask()


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _mode_for(path, 0o666))
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
        "scales": wb.scales.tolist(), "per_layer": wb.per_layer,
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

    scales: tuple  # one float per band, or (per-layer scales) one tuple of them per layer
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
    number = lambda g: isinstance(g, (int, float)) and not isinstance(g, bool)  # noqa: E731
    raw = d["scales"]
    layered = bool(raw) and all(isinstance(r, list) for r in raw)
    if layered and v < 3:
        raise ScalesFileError(f"Scales file {path} has per-layer scales under schema version {v}, which had none; it is corrupted.")
    if not (all(number(g) for r in raw for g in r) if layered else all(number(g) for g in raw)):
        raise ScalesFileError(f"In scales file {path}, scales must be a list of numbers (or one list per layer), "
                              f"got {raw!r:.80}.")
    n_bands = len(edges) - 1
    lens = {len(r) for r in raw} if layered else {len(raw)}
    if lens != {n_bands}:
        have = len(raw) if not layered else "/".join(map(str, sorted(lens)))
        raise ScalesFileError(f"Scales file {path} has {have} scales{' per layer' if layered else ''} for {n_bands} bands "
                              f"(edges {edges}); it is corrupted.")
    if layered and len(raw) != d["model"]["n_layers"]:
        raise ScalesFileError(f"Scales file {path} has per-layer scales for {len(raw)} layers but its model has "
                              f"{d['model']['n_layers']}; it is corrupted.")
    try:
        scales = check_scales(raw, n_bands).tolist()
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
            scale=scale_cfg, scales=scales)
    except (_CE, TypeError, ValueError) as e:
        raise ScalesFileError(f"Scales file {path} holds an invalid recipe: {e}") from e
    recipe = replace(recipe, edges=tuple(edges)).with_scales(scales)
    sf = ScalesFile(recipe.scales, scale_cfg, band_cfg, tuple(edges), pi, quant, d["model"],
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


# ----------------------------------------------------------------------------- exports: one safe way for every format

RECORD = "qroar_scales.json"  # written last; its "export" key lists the files the export wrote


def _parked(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _try_lock(path: Path) -> int | None:
    """A descriptor holding an exclusive lock on folder `path` (the OS drops it when its process dies), or None when
    another process holds it; OSError where the system or filesystem has no such locks."""
    try:
        import fcntl
    except ImportError:
        raise OSError("no file locks on this system") from None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _leftovers(folder: Path) -> list[Path]:
    """Temporary folders that killed exports to `folder` left beside it (`.NAME.tmp-*` that no running export holds
    locked); ConfigError while another export to `folder` is running."""
    stale = []
    for p in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*")):
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = _try_lock(p)
        except OSError:  # without locks a running export looks like a killed one: leave it
            continue
        if fd is None:
            raise ConfigError(f"Another export to {folder} is running: wait for it to finish, or write elsewhere.")
        os.close(fd)
        stale.append(p)
    return stale


def _recorded_files(folder: Path) -> set[str] | None:
    """The names an earlier export recorded as its own (qroar_scales.json's export.files); None if it recorded none."""
    try:
        files = json.loads((folder / RECORD).read_text(encoding="utf-8"))["export"]["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {RECORD}


def check_target(folder, overwrite: bool = False) -> list[str]:
    """Check, changing nothing, that an export may write `folder`; returns the names of the user's own files in an
    earlier export there (the export carries them into the new folder).

    ConfigError when `folder` is a file, holds files but no qroar export, holds an earlier export and overwrite is
    False, holds an export from a qroar that did not record its files, or another export to it is running.
    """
    folder = Path(folder)
    _leftovers(folder)
    old = _parked(folder)
    here = old if not folder.exists() and old.is_dir() else folder  # a killed export parked the old one there
    if not here.exists():
        return []
    if not here.is_dir():
        raise ConfigError(f"{folder} is a file: choose a folder.")
    names = sorted(p.name for p in here.iterdir())
    if not names:
        return []
    if RECORD not in names:  # never someone's other files
        raise ConfigError(f"{folder} exists and is not an earlier qroar export; choose a new or empty folder.")
    if not overwrite:
        raise ConfigError(f"{folder} holds an earlier qroar export: ask to overwrite it (`qroar export --overwrite`, or "
                          "Overwrite on the Export page; files of your own in it are kept), or choose another folder.")
    ours = _recorded_files(here)
    if ours is None:
        raise ConfigError(f"{folder} holds an export from an older qroar that did not record which files are its own: "
                          "move any files of yours out of it and delete it, or choose another folder.")
    return [n for n in names if n not in ours]


def _clean_leftovers(folder: Path) -> None:
    """Remove what killed exports to `folder` left beside it; an old export parked between the two renames of a swap
    goes back in place when no newer one made it there."""
    for p in _leftovers(folder):
        shutil.rmtree(p, ignore_errors=True)
    old = _parked(folder)
    if old.is_dir() and not old.is_symlink():
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, folder)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # no second copy of the data; the old folder stays whole until the swap
    except OSError:
        shutil.copy2(src, dst)


def _carry(src: Path, dst: Path) -> None:
    """Put a user's file, link or folder from the old export into the new one."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def check_file_target(path, overwrite: bool = False) -> None:
    """Check, changing nothing, that a one-file export may write `path`: ConfigError when it is a folder, when a file
    is there and overwrite is False, or when another export to it is running."""
    path = Path(path)
    _leftovers(path)
    if path.is_dir() or (not path.exists() and _parked(path).is_dir()):
        raise ConfigError(f"{path} is a folder: give the name of the file to write.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"{path} exists: ask to overwrite it (`qroar export --overwrite`, or Overwrite on the Export "
                          "page), or choose another name.")
    if path.exists() and not _written_by_qroar(path):
        raise ConfigError(f"{path} is not a file qroar wrote (not a scales file): qroar never replaces it; choose "
                          "another name.")


def _written_by_qroar(path: Path) -> bool:
    """A scales file: JSON with qroar's schema version and scales (the one kind of file a one-file export writes)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(raw, dict) and "schema_version" in raw and "scales" in raw


def check_export(fmt: str, path, overwrite: bool = False) -> list[str]:
    """Check, changing nothing, that format `fmt` may be written at `path` (call it before loading or calibrating a
    model); returns the names of the user's own files that a folder export carries over."""
    f = export_format(fmt)
    if f.folder:
        return check_target(path, overwrite)
    check_file_target(path, overwrite)
    return []


def _follow_umask(folder: Path) -> None:
    mask = _umask()
    for p in folder.rglob("*"):  # some writers (safetensors' among them) make 0600 files
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _write_folder(f, wb, folder: Path, keep: list[str], fmt: str, tmp: Path, result, meta, options) -> Path:
    """Build the folder in `tmp`, record its files, carry the user's files over, and swap it into place."""
    os.chmod(tmp, _mode_for(folder, 0o777))
    record = f.write(wb, tmp, result=result, meta=meta, **options)
    _follow_umask(tmp)
    written = sorted({p.name for p in tmp.iterdir()} | {RECORD})
    clash = [n for n in keep if n in written]
    if clash:
        raise ConfigError(f"{folder} holds file(s) of yours that the new export would overwrite: {', '.join(clash)}; "
                          "move them out of the folder (nothing was changed) and export again.")
    record = dict(record or {})
    record["export"] = {"format": fmt, **record.get("export", {}), "files": written}
    atomic_write_text(tmp / RECORD, json.dumps(record, indent=1, allow_nan=False))
    for name in keep:
        _carry(folder / name, tmp / name)
    return atomic_replace_dir(tmp, folder)


def _write_file(f, wb, path: Path, tmp: Path, result, meta, options) -> Path:
    """Write the file in `tmp` and move it into place in one rename (a replaced file keeps its mode)."""
    built = tmp / path.name
    f.write(wb, built, result=result, meta=meta, **options)
    built.chmod(_mode_for(path, 0o666))
    os.replace(built, path)
    return path


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ExportFormat:
    """One entry of FORMATS: a new format is one function and one line there; `export` gives it the checks, the
    temporary beside the target, the umask's modes, overwrite only when asked, and the move into place.

    write(wb, path, result=None, meta=None, **options), from the workbench's applied recipe: a folder format writes its
    files into the new, empty folder `path` and returns the dict that qroar_scales.json records (export() adds the
    list of files under "export"); a file format writes the one file `path`. needs_quantizer: refuses a recipe
    without one. check(wb): refuses, before anything is written, a recipe the format cannot hold.
    """

    write: object
    label: str
    needs_quantizer: bool = False
    folder: bool = True
    check: object = None  # check(wb): ConfigError, before anything is written, for a recipe the format cannot hold


def _write_scales(wb, path, result=None, meta=None, **options) -> None:
    save_scales(path, wb, result)


def _write_checkpoint(wb, folder, quantized: bool, result=None, meta=None) -> dict:
    """safetensors + config (the PI rope_parameters in force) + tokenizer; the record holds `meta` (e.g. the scales
    file it came from) or the workbench's own scales."""
    scaled = wb.scales is not None
    variant = ("quant_scaled" if quantized else "fp_scaled") if scaled else ("quant" if quantized else "fp")
    with wb.lock, wb.variant(variant) as model:
        model.save_pretrained(folder, safe_serialization=True)
    if wb.tokenizer is not None:
        wb.tokenizer.save_pretrained(folder)
    record = dict(meta) if meta is not None else (scales_payload(wb, result) if scaled else {"scales": None})
    record["export"] = {"variant": variant, "quantized": quantized}
    return record


def _write_hf(wb, path, result=None, meta=None, **options) -> dict:
    return _write_checkpoint(wb, path, False, result, meta)


def _write_fake_quant(wb, path, result=None, meta=None, **options) -> dict:
    return _write_checkpoint(wb, path, True, result, meta)


def _write_packed(writer):
    def write(wb, path, result=None, meta=None, **options) -> dict:
        record = dict(meta) if meta is not None else (scales_payload(wb, result) if wb.scales is not None else {"scales": None})
        record["export"] = {"variant": "quant_scaled" if wb.scales is not None else "quant", "quantized": True,
                            **writer(wb, Path(path))}
        return record
    return write


def _packed(name):
    def write(wb, folder):
        from qroar import packed

        return getattr(packed, name)(wb, folder)
    return write


def _check_packed(name):
    def check(wb):
        from qroar import packed

        getattr(packed, name)(wb)
    return check


FORMATS: dict[str, ExportFormat] = {
    "hf": ExportFormat(_write_hf, "Hugging Face folder, full-precision weights with the scales folded in"),
    "fake-quant": ExportFormat(_write_fake_quant, "Hugging Face folder, fake-quantized scaled weights (full-precision storage)",
                               needs_quantizer=True),
    "scales": ExportFormat(_write_scales, "scales file (JSON): the recipe and the search's results", folder=False),
    "compressed-tensors": ExportFormat(_write_packed(_packed("write_compressed_tensors")),
                                       "compressed-tensors pack-quantized W4A16/W8A16 (transformers, vLLM, SGLang load it)",
                                       needs_quantizer=True, check=_check_packed("check_compressed_tensors")),
    "gguf": ExportFormat(_write_packed(_packed("write_gguf")),
                         "GGUF file, llama.cpp's Q4_0/Q8_0/... blocks + tokenizer + rope scaling (llama.cpp, transformers)",
                         needs_quantizer=True, check=_check_packed("check_gguf")),
}


def export_format(fmt: str) -> ExportFormat:
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return FORMATS[fmt]


def export(wb, fmt: str, path, result=None, meta=None, overwrite: bool = False, **options) -> Path:
    """Write the workbench's applied recipe in format `fmt` (a key of FORMATS) at `path`; returns it.

    Every format goes this one way. Nothing is written where `check_export` refuses: a folder holding anything but a
    qroar export, a file or an earlier export without overwrite=True, a target another export is writing. Temporaries
    that killed exports left beside `path` (`.NAME.tmp-*`, `.NAME.old`) are removed first. The export is built in a
    locked `.NAME.tmp-*` folder beside `path` and moved into place whole. A folder format's qroar_scales.json records
    the files it wrote ("export": {"files": [...]}): on overwrite only those go, anything else in the old folder
    (notes, a quantized copy) is carried into the new one, and a file of the user's with a name the export writes
    refuses the export, naming it, before the folder is touched.
    """
    f = export_format(fmt)
    if f.needs_quantizer and wb.qstate is None:
        raise ConfigError(f"The {fmt} format stores quantized weights, and no quantizer is set: choose a quantizer, "
                          "or the hf format for full precision.")
    if f.check is not None:
        f.check(wb)
    path = Path(path)
    keep = check_export(fmt, path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        lock = _try_lock(tmp)  # marks this export as running: a later export's clean-up leaves it alone
    except OSError:
        lock = None
    try:
        if f.folder:
            return _write_folder(f, wb, path, keep, fmt, tmp, result, meta, options)
        return _write_file(f, wb, path, tmp, result, meta, options)
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(wb, folder, quantized: bool = False, result=None, meta: dict | None = None,
                      overwrite: bool = False) -> Path:
    """`export` in the hf format (full-precision weights with the scales folded in, for your own quantizer) or, with
    quantized=True, fake-quant (the "quant_scaled" weights the workbench evaluates)."""
    return export(wb, "fake-quant" if quantized else "hf", folder, result=result, meta=meta, overwrite=overwrite)
