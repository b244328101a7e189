"""Command line: every computation of the dashboard, headless (a GPU server needs no browser).

  qroar eval      perplexity, full precision vs quantized, at chosen context lengths
  qroar diagnose  bands, Interpolation Pressure, TIR_W / TIR_A, per-band quant error, logit noise
  qroar search    find per-band scales (coordinate descent, checkpoint/resume), report on held-out documents
  qroar apply     load a scales file onto its model and evaluate fp / quant / quant+scales on held-out documents
  qroar export    a scales file -> a Hugging Face checkpoint folder with the scales folded in
  qroar fidelity  KL divergence to full precision, same top token, true-token probability change, by position
  qroar retrieval passkey retrieval at chosen lengths and depths, per variant

Every QroarError is printed as `error: ...` with exit code 2. A command is one `add_<name>(sub)`
function that builds its parser and one `cmd_<name>(args)` that runs it; COMMANDS lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qroar import preflight
from qroar.errors import QroarError
from qroar.rescale import describe_scales
from qroar.progress import Estimator, format_seconds


# ----------------------------------------------------------------------------- shared options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from qroar.models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"preset, local folder or hub id (default {DEFAULT_MODEL})")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 | tf32 (fp32 with TF32 matrix products on a GPU)")
    g.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights (can run code: trusted sources only)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (trusted sources only)")
    g.add_argument("--device-map", default=None,
                   help="spread the model over this host's GPUs with accelerate: auto | balanced | sequential | "
                        "a JSON dict module -> GPU index or \"cpu\" | a .json file holding one (--device is then unused)")
    g.add_argument("--max-memory", default=None, help="per-device budget for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")


def device_map_from_args(a):
    """(device_map, max_memory) from --device-map / --max-memory."""
    from qroar.errors import ConfigError
    from qroar.models import DEVICE_MAP_STRATEGIES

    text, dm = (getattr(a, "device_map", None) or "").strip(), None
    if text in DEVICE_MAP_STRATEGIES:
        dm = text
    elif text:
        try:
            dm = json.loads(Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--device-map expects {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON dict or a .json file, "
                              f"got {text!r} ({e}).") from e
    mm = None
    if getattr(a, "max_memory", None):
        try:
            mm = {int(k) if k.strip().isdigit() else k.strip(): v.strip()
                  for k, v in (kv.split("=", 1) for kv in a.max_memory.split(","))}
        except ValueError as e:
            raise ConfigError(f"--max-memory expects DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB; got {a.max_memory!r}.") from e
    return dm, mm


def _add_distributed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun / accelerate launch: one process per GPU, work spread over them, "
                        "results gathered and written by rank 0 (see docs/SHARDING.md)")


def ranks_from_args(a):
    """This process's Ranks (one process unless --distributed); its GPU replaces --device."""
    from qroar import distributed
    from qroar.errors import ConfigError

    if not getattr(a, "distributed", False):
        return distributed.Ranks()
    if a.device_map:
        raise ConfigError("--distributed gives each process one whole model on its own GPU; drop --device-map "
                          "(for a model larger than one GPU, run one process with --device-map).")
    ranks = distributed.init()
    a.device = ranks.device
    a.quiet = a.quiet or not ranks.is_main
    return ranks


def _add_corpus_args(p: argparse.ArgumentParser, default="embedded:heldout") -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=default, help="embedded | embedded:dev | embedded:heldout | PATH | hf:name[:config[:split[:field]]]")
    g.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1x,4x,8x the trained context)")
    g.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping windows)")
    g.add_argument("--max-windows", type=int, default=2,
                   help="at most this many windows per document and length (default 2: seconds on a laptop; 0 = every window)")
    g.add_argument("--batch-size", type=int, default=None)


def lengths_from_args(a, trained_context: int) -> tuple[int, ...]:
    from qroar.errors import ConfigError

    if not a.lengths:
        return tuple(trained_context * k for k in (1, 4, 8))
    try:
        return tuple(int(x) for x in a.lengths.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--lengths expects comma-separated integers, got {a.lengths!r}.") from e


class ProgressBar:
    """A one-line progress bar on stderr with the time left (qroar.progress, as in the dashboard)."""

    def __init__(self, quiet=False):
        self.t0, self.quiet, self.estimate = time.time(), quiet, Estimator()
        self.estimate.update(0.0, self.t0)

    def __call__(self, frac: float, msg: str = "") -> None:
        if self.quiet:
            return
        frac = min(max(frac, 0.0), 1.0)
        self.estimate.update(frac)
        el = time.time() - self.t0
        left = self.estimate.seconds_left()
        left = "estimating..." if left is None else f"{format_seconds(left)} left"
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}%  {el:6.1f}s  {left:<16}  {msg[:72]:<72}")
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def write_outputs(out: str | None, payload: dict, table) -> None:
    """Write OUT.json (settings + results) and OUT.csv (the tidy table), atomically."""
    if not out:
        return
    from qroar.export import atomic_write_text

    base = Path(out)
    if base.suffix in (".json", ".csv"):
        base = base.with_suffix("")
    atomic_write_text(base.with_suffix(".json"), json.dumps(payload, indent=2, default=str))
    atomic_write_text(base.with_suffix(".csv"), table.to_csv(index=False))
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.csv')}")


def recipe_from_args(a):
    from qroar.recipe import Recipe

    return Recipe.from_args(a)


def open_workbench(a, name=None):
    """Load the model (after the arguments were read into a Recipe, so bad ones fail before the load)."""
    from qroar.workbench import Workbench

    dm, mm = device_map_from_args(a)
    return Workbench.open(name or a.model, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle,
                          trust_remote_code=a.trust_remote_code, device_map=dm, max_memory=mm)


def apply_recipe(wb, recipe, quiet=False):
    """Put the recipe on the model; say how long quantization took."""
    t0 = time.time()
    wb.apply(recipe, progress=ProgressBar(quiet))
    return time.time() - t0


# ----------------------------------------------------------------------------- commands


def _placement_line(info) -> str:
    if len(info.devices) < 2:
        return ""
    return "; placed: " + "; ".join(f"{d}: {', '.join(v['modules'])}" for d, v in info.devices.items())


def cmd_eval(a) -> int:
    from qroar import distributed
    from qroar.perplexity import EvalConfig, summarize_variants

    preflight.check(a, "eval")
    ranks = ranks_from_args(a)
    say = print if ranks.is_main else (lambda *x, **k: None)
    recipe = recipe_from_args(a)
    wb = open_workbench(a)
    tc = wb.info.trained_context
    cfg = EvalConfig(lengths=lengths_from_args(a, tc), stride=a.stride, max_windows_per_doc=a.max_windows or None, batch_size=a.batch_size)
    say(f"model {wb.info.name} ({wb.info.model_type}, {wb.info.n_params / 1e6:.1f}M params, trained context {tc}) "
        f"on {wb.info.device}/{wb.info.dtype}; PI {recipe.pi.label()}{_placement_line(wb.info)}")
    tq = apply_recipe(wb, recipe, a.quiet)
    q = recipe.quant
    if recipe.quantized:
        say(f"quantized ({q.method} W{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'}, scope {q.scope}) in {tq:.2f}s")
    if wb.invariance_note() and recipe.scales is not None:
        say(f"note: {wb.invariance_note()}")
    t0 = time.time()
    variants = ("fp", "quant", "quant_scaled") if recipe.scales is not None else ("fp", "quant")
    table = distributed.perplexity(wb, a.corpus, cfg, ranks, progress=ProgressBar(a.quiet), variants=variants)
    te = time.time() - t0
    ranks.close()
    if not ranks.is_main:
        return 0
    if ranks.world_size > 1:
        print(f"documents spread over {ranks.world_size} processes")
    summary = summarize_variants(table)
    print(format_summary(summary))
    print(f"evaluated in {te:.2f}s")
    write_outputs(a.out, {"command": "eval", "settings": wb.settings(), "recipe": wb.recipe.to_dict(), "corpus": a.corpus,
                          "eval": cfg.to_dict(),
                          "quantize_seconds": tq, "eval_seconds": te,
                          "summary": summary.to_dict(orient="records"), "results": table.to_dict(orient="records")}, table)
    return 0


def format_summary(summary) -> str:
    """Lengths as rows, variants as columns, plus the relative quantization penalty."""
    piv = summary.pivot(index="length", columns="variant", values="ppl")
    piv = piv[[v for v in ("fp", "quant", "fp_scaled", "quant_scaled") if v in piv]]
    if "fp" in piv and "quant" in piv:
        piv["penalty_%"] = 100 * (piv["quant"] / piv["fp"] - 1)
    if "quant_scaled" in piv and "quant" in piv:
        piv["scaled_vs_quant_%"] = 100 * (piv["quant_scaled"] / piv["quant"] - 1)
    return piv.to_string(float_format=lambda x: f"{x:.3f}")


# ----------------------------------------------------------------------------- search / apply / export


def windows_from_args(a, wb):
    """Per-band windows: given explicitly, or derived from IP (and TIR_W when asked)."""
    import math

    from qroar.errors import ConfigError
    from qroar.search import W_MAX, W_MIN, windows_for

    tir = None
    if a.diag:
        from qroar.diagnostics import DiagResult

        tir = DiagResult.read(a.diag).tables.get("tir")
    elif a.tir:
        from qroar.diagnostics import DiagConfig, run_diagnostics

        res = run_diagnostics(wb, a.dev_corpus, DiagConfig(bands=wb.recipe.band_config(), axis=False),
                              progress=ProgressBar(a.quiet))
        tir = res.tables["tir"]
    w_max = math.log(a.window_max) if a.window_max else W_MAX
    w_min = math.log(a.window_min) if a.window_min else W_MIN
    return windows_for(wb, tir, w_max=w_max, w_min=min(w_min, w_max))


def add_search(sub) -> None:
    from qroar.recipe import add_args
    from qroar.search import add_search_args

    s = sub.add_parser("search", help="find per-band scales on dev documents, report on held-out documents")
    _add_model_args(s), add_args(s, scales=False), add_search_args(s)
    w = s.add_argument_group("windows")
    w.add_argument("--window-max", type=float, default=None, help="widest window, as a factor (default 1.25: [0.8, 1.25])")
    w.add_argument("--window-min", type=float, default=None, help="narrowest window, as a factor (default 1.02)")
    w.add_argument("--tir", action="store_true", help="also use TIR_W (runs the diagnostics on the dev corpus first)")
    w.add_argument("--diag", default=None, help="read TIR_W from a saved diagnostics folder")
    s.add_argument("--out", default=None, help="write the scales file here (e.g. scales.json)")
    s.add_argument("--report", default=None, help="write REPORT.json (everything) and REPORT.csv (held-out table)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arg(s)
    s.set_defaults(func=cmd_search)


def cmd_search(a) -> int:
    from dataclasses import replace

    from qroar import distributed
    from qroar.export import save_scales
    from qroar.search import format_result, search_config_from_args

    preflight.check(a, "search")
    ranks = ranks_from_args(a)
    say = print if ranks.is_main else (lambda *x, **k: None)
    recipe = recipe_from_args(a)
    search_config_from_args(a, 256)  # malformed search settings fail before the model loads
    wb = open_workbench(a)
    tc = wb.info.trained_context
    cfg = search_config_from_args(a, tc)
    say(f"model {wb.info.name} ({wb.info.model_type}, trained context {tc}) on {wb.info.device}/{wb.info.dtype}; "
        f"PI {recipe.pi.label()}{_placement_line(wb.info)}")
    apply_recipe(wb, replace(recipe, scales=None), a.quiet)
    wb.apply(wb.recipe.with_scales([1.0] * wb.bands.n_bands))
    note = wb.invariance_note()
    if note:
        say(f"note: {note}")
        if not cfg.allow_invariant:
            raise QroarError("The search would only measure rounding noise, so it was not started: use shared mode, "
                             "a per-tensor grid (--group-size -2) or AWQ; --allow-invariant runs it anyway to show the noise.")
    windows = windows_from_args(a, wb)
    result = distributed.search(wb, cfg, ranks, windows, progress=ProgressBar(a.quiet))
    ranks.close()
    if not ranks.is_main:
        return 0
    if ranks.world_size > 1:
        print(f"search work spread over {ranks.world_size} processes")
        if cfg.strategy.startswith("grad") and cfg.grad_batch < ranks.world_size:
            print(f"note: a gradient step of {cfg.grad_batch} window(s) cannot be split over {ranks.world_size} processes, "
                  f"so only the checks and evaluations were spread; --grad-batch {ranks.world_size} or more splits the steps")
    print(format_result(result))
    print(f"{result.spent} {result.unit} (at most {result.budget}) in {result.seconds:.1f}s "
          f"({result.reused} reused from the checkpoint)")
    if a.out:
        if result.note:
            print(f"not writing {a.out}: these settings cannot change the model, so there are no scales to save")
        else:
            save_scales(a.out, wb, result)
            print(f"wrote {a.out}")
    if a.report:
        write_outputs(a.report, {"command": "search", **result.to_dict()}, result.heldout)
    return 0


def _open_for_scales(a):
    """Load the scales file, then its model (--model, else the file's source folder or name), checked."""
    from qroar.export import load_scales

    sf = load_scales(a.scales)
    name = a.model or (sf.model.get("source") if sf.model.get("source") and Path(sf.model["source"]).exists() else sf.model["name"])
    wb = open_workbench(a, name)
    return load_scales(a.scales, wb), wb


def _add_scales_model_args(p) -> None:
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("scales", help="a scales file written by `qroar search --out`")


def add_apply(sub) -> None:
    s = sub.add_parser("apply", help="load a scales file and evaluate fp / quant / quant+scales on held-out documents")
    _add_scales_model_args(s)
    _add_corpus_args(s)
    s.add_argument("--calib", default="embedded:dev", help="calibration corpus when the file's quantizer is gptq/awq")
    s.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_apply)


def cmd_apply(a) -> int:
    from qroar.export import apply_scales
    from qroar.perplexity import EvalConfig, summarize_variants

    preflight.check(a, "apply")
    sf, wb = _open_for_scales(a)
    tc = wb.info.trained_context
    search_lengths = (sf.raw.get("search") or {}).get("lengths")
    lengths = lengths_from_args(a, tc) if a.lengths or not search_lengths else tuple(search_lengths)
    cfg = EvalConfig(lengths=lengths, stride=a.stride, max_windows_per_doc=a.max_windows or None, batch_size=a.batch_size)
    apply_scales(wb, sf, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    print(f"applied {a.scales}: {sf.scale_cfg.mode} mode, {sf.scale_cfg.order} quantization, "
          f"scales {describe_scales(sf.scales)}; PI {wb.pi.label()}")
    table = wb.perplexity(a.corpus, cfg, variants=("fp", "quant", "fp_scaled", "quant_scaled"), progress=ProgressBar(a.quiet))
    summary = summarize_variants(table)
    print(format_summary(summary))
    if wb.invariance_note():
        print(f"note: {wb.invariance_note()} Differences above are rounding noise.")
    write_outputs(a.out, {"command": "apply", "scales_file": str(a.scales), "settings": wb.settings(), "corpus": a.corpus,
                          "eval": cfg.to_dict(), "summary": summary.to_dict(orient="records"),
                          "results": table.to_dict(orient="records")}, table)
    return 0


def add_export(sub) -> None:
    from qroar.export import FORMATS

    s = sub.add_parser("export", help="scales file -> a checkpoint with the scales folded in (or another format)")
    _add_scales_model_args(s)
    s.add_argument("--out", required=True, help="output folder (or file, for the scales format)")
    s.add_argument("--format", default="hf", choices=list(FORMATS),
                   help="; ".join(f"{k}: {v.label}" for k, v in FORMATS.items()))
    s.add_argument("--quantized", action="store_const", const="fake-quant", dest="format", help="same as --format fake-quant")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (files of your own in its folder are kept)")
    s.add_argument("--calib", default=None, help="calibration corpus when the file's quantizer is calibrated (default: the file's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from qroar.errors import ConfigError
    from qroar.export import FORMATS, apply_scales, check_export, export, load_scales

    preflight.check(a, "export")
    fmt = FORMATS[a.format]
    check_export(a.format, a.out, a.overwrite)  # before loading the model and calibrating
    if a.format in ("compressed-tensors", "gguf"):  # the file's quantizer must be one the format stores
        from qroar.packed import check_quant

        pre = load_scales(a.scales)
        check_quant(a.format, pre.quant, pre.scale_cfg.order)
    sf, wb = _open_for_scales(a)
    if fmt.needs_quantizer and sf.quant is None:
        raise ConfigError(f"{a.scales} was made without a quantizer: choose --format hf (full precision).")
    apply_scales(wb, sf, quantize=fmt.needs_quantizer, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    path = export(wb, a.format, a.out, meta=sf.raw, overwrite=a.overwrite)
    print(f"wrote {path} ({fmt.label}; PI {wb.pi.label()})")
    if a.format == "gguf":
        print("note: transformers' GGUF loader reads no rope.scaling.* key; read them with gguf.GGUFReader and set "
              "config.rope_parameters before loading (qroar/stock_reload.py does), llama.cpp reads them itself")
    return 0


# ----------------------------------------------------------------------------- parser


def add_eval(sub) -> None:
    from qroar.recipe import add_args

    e = sub.add_parser("eval", help="perplexity, full precision vs quantized (and with scales), at chosen context lengths")
    _add_model_args(e), add_args(e), _add_corpus_args(e)
    e.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arg(e)
    e.set_defaults(func=cmd_eval)


def add_diagnose(sub) -> None:
    from qroar.recipe import add_args

    d = sub.add_parser("diagnose", help="bands, Interpolation Pressure, TIR_W/TIR_A, quant error, logit noise (JSON + CSV)")
    _add_model_args(d), add_args(d, scales=False)
    g = d.add_argument_group("diagnostics")
    g.add_argument("--corpus", default="embedded:dev", help="documents for the activation captures (one window each)")
    g.add_argument("--capture-length", type=int, default=None, help="tokens per window (default 2x the trained context)")
    g.add_argument("--n-docs", type=int, default=4, help="documents pooled (one window each)")
    g.add_argument("--eps", type=float, default=1e-3, help="tail quantile Q(1-eps)")
    g.add_argument("--no-axis", action="store_true", help="skip TIR_A (post-RoPE per-axis)")
    g.add_argument("--noise-layers", default=None, help="comma-separated layers for the logit noise (default: 4 spread over depth)")
    g.add_argument("--ip-lengths", default=None, help="comma-separated lengths for IP (default 1,2,4,8,16 x trained context)")
    d.add_argument("--out", default="diagnostics", help="folder for diagnostics.json and one CSV per table "
                   "(the dashboard's `qroar-figures FOLDER` draws its charts as HTML/PNG)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_diagnose)


def _ints(text, what):
    from qroar.errors import ConfigError

    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} expects comma-separated integers, got {text!r}.") from e


def cmd_diagnose(a) -> int:
    from dataclasses import replace

    from qroar.diagnostics import DiagConfig, run_diagnostics

    recipe = recipe_from_args(a)
    cfg = DiagConfig(bands=recipe.band_config(), capture_length=a.capture_length,
                     n_docs=a.n_docs, eps=a.eps, axis=not a.no_axis,
                     noise_layers=_ints(a.noise_layers, "--noise-layers"), ip_lengths=_ints(a.ip_lengths, "--ip-lengths"))
    preflight.check(a, "diagnose")
    wb = open_workbench(a)
    apply_recipe(wb, replace(recipe, scales=None), a.quiet)
    res = run_diagnostics(wb, a.corpus, cfg, progress=ProgressBar(a.quiet))
    t = res.tables
    print(f"diagnostics of {wb.info.name} under PI {wb.pi.label()}, {wb.quant_cfg.describe() if wb.quant_cfg else 'no quantizer'}, "
          f"{res.settings['capture_length']} tokens x {len(res.settings['docs'])} docs in {res.settings['seconds']:.1f}s")
    ip = t["ip"].pivot(index="band", columns="length", values="ip_mean")
    print("Interpolation Pressure (band mean) by length:\n" + ip.to_string(float_format=lambda x: f"{x:.3g}"))
    tw = t["tir"][(t["tir"].kind == "W")].groupby(["variant", "proj", "band"]).tir.median().unstack("band")
    print("TIR_W, median over layers:\n" + tw.to_string(float_format=lambda x: f"{x:.3f}"))
    ln = t["logit_noise_pooled"]
    ln = ln[ln["mode"] == "isolated"].pivot(index="band", columns="bucket_lo", values="rel_err")
    print("Relative logit noise (isolated) by band and distance bucket start:\n" + ln.to_string(float_format=lambda x: f"{x:.3f}"))
    paths = res.write(a.out)
    print(f"wrote {len(paths)} files to {a.out}")
    return 0


# ----------------------------------------------------------------------------- fidelity / retrieval


def _variants_from_args(a, recipe, allowed, default):
    """The variants asked for (--variants) or the default ones this recipe can run, checked before the model loads."""
    from qroar.errors import ConfigError

    has = {"fp": True, "quant": recipe.quantized, "quant_scaled": recipe.quantized and recipe.scales is not None,
           "fp_scaled": recipe.scales is not None}
    need = {"quant": "a quantizer (--quant)", "quant_scaled": "a quantizer and --scales", "fp_scaled": "--scales"}
    if not a.variants:
        return [v for v in default if has[v]]
    asked = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in asked if v not in allowed]
    if bad:
        raise ConfigError(f"--variants takes {', '.join(allowed)}; got {', '.join(bad)}.")
    missing = [v for v in asked if not has[v]]
    if missing:
        raise ConfigError("; ".join(f"variant {v} needs {need[v]}" for v in missing) + ".")
    return asked


def _floats(text, what):
    from qroar.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}.") from e


def add_fidelity(sub) -> None:
    from qroar.fidelity import PRECISIONS, VARIANTS
    from qroar.recipe import add_args

    f = sub.add_parser("fidelity", help="KL divergence to full precision, same top token and true-token probability "
                                        "change, by position (JSON + CSV)")
    _add_model_args(f), add_args(f)
    g = f.add_argument_group("fidelity")
    g.add_argument("--corpus", default="embedded:heldout", help="documents to score (one window each by default)")
    g.add_argument("--lengths", default=None, help="comma-separated lengths; windows are cut at the longest and each "
                   "length reports its prefix (default 1x,4x,8x the trained context)")
    g.add_argument("--max-windows", type=int, default=1, help="windows per document (default 1; 0 = every window)")
    g.add_argument("--max-docs", type=int, default=4, help="documents scored (default 4; 0 = all)")
    g.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: those the "
                   "recipe has: quant with a quantizer, the scaled ones with --scales)")
    g.add_argument("--nopi", action="store_true", help="also compare every variant (fp included) with the FP model "
                   "without PI, inside its trained context")
    g.add_argument("--per-octave", type=int, default=1, help="position buckets per doubling (1-8)")
    g.add_argument("--chunk", type=int, default=None, help="positions per output-head chunk (default: automatic)")
    g.add_argument("--precision", default="float32", choices=[p for p in PRECISIONS if p != "auto"],
                   help="log-softmax precision (default float32)")
    f.add_argument("--out", default=None, help="write OUT.json (everything) and OUT.csv (the position-bucket table)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fidelity)


def cmd_fidelity(a) -> int:
    from qroar import fidelity
    from qroar.errors import ConfigError

    recipe = recipe_from_args(a)
    variants = _variants_from_args(a, recipe, fidelity.VARIANTS, fidelity.VARIANTS)
    if not variants:
        raise ConfigError("Nothing to compare with full precision: give a quantizer (--quant) and/or --scales.")
    if a.nopi and recipe.pi.rope_type == "default":
        raise ConfigError("--nopi compares with FP without PI, but no PI is set (--pi default): there is no such "
                          "reference beside FP itself. Set --pi or drop --nopi.")
    preflight.check(a, "fidelity")  # model name, group size, corpus, lengths the documents can fill, the plan
    lengths = _ints(a.lengths, "--lengths")
    kw = dict(max_windows_per_doc=a.max_windows, max_docs=a.max_docs or None, chunk=a.chunk,
              precision=a.precision, nopi=a.nopi, per_octave=a.per_octave)
    fidelity.FidelityConfig(lengths=lengths or (2,), **kw)  # malformed settings fail before the model loads
    wb = open_workbench(a)
    tc = wb.info.trained_context
    cfg = fidelity.FidelityConfig(lengths=lengths or (tc, 4 * tc, 8 * tc), **kw)
    print(f"model {wb.info.name} ({wb.info.model_type}, trained context {tc}) on {wb.info.device}/{wb.info.dtype}; "
          f"PI {recipe.pi.label()}{_placement_line(wb.info)}")
    tq = apply_recipe(wb, recipe, a.quiet)
    if recipe.quantized:
        print(f"quantized ({wb.quant_cfg.describe()}) in {tq:.2f}s")
    if wb.invariance_note() and recipe.scales is not None:
        print(f"note: {wb.invariance_note()}")
    res = fidelity.run(wb, a.corpus, cfg, variants=variants, progress=ProgressBar(a.quiet))
    print(fidelity.format_result(res))
    print(f"{len(res.windows)} windows of {cfg.length} tokens in {res.settings['seconds']:.2f}s")
    write_outputs(a.out, {"command": "fidelity", "settings": wb.settings(), "recipe": wb.recipe.to_dict(),
                          "corpus": a.corpus, "quantize_seconds": tq, **res.to_dict()}, res.buckets)
    return 0


def add_retrieval(sub) -> None:
    from qroar.recipe import add_args
    from qroar.retrieval import HAYSTACKS, KEYS, RetrievalConfig

    base = RetrievalConfig()
    r = sub.add_parser("retrieval", help="passkey retrieval: a key at chosen depths of long prompts, scored "
                                         "teacher-forced (and by greedy generation) per variant (JSON + CSV)")
    _add_model_args(r), add_args(r)
    g = r.add_argument_group("retrieval")
    g.add_argument("--lengths", default=None, help="comma-separated prompt lengths in tokens (default 1x,2x,4x the trained context)")
    g.add_argument("--depths", default=None, help="comma-separated depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--trials", type=int, default=base.trials, help=f"prompts per length and depth (default {base.trials})")
    g.add_argument("--key", default=base.key, choices=list(KEYS), help="; ".join(f"{k}: {v.label}" for k, v in KEYS.items()))
    g.add_argument("--digits", type=int, default=base.digits, help=f"digits of a digits key (default {base.digits})")
    g.add_argument("--haystack", default=base.haystack, choices=list(HAYSTACKS),
                   help="; ".join(f"{k}: {v}" for k, v in HAYSTACKS.items()))
    g.add_argument("--corpus", default=base.corpus, help="documents for the corpus haystack")
    g.add_argument("--seed", type=int, default=base.seed, help="seed of the trials (keys, documents, offsets)")
    g.add_argument("--generate", action="store_true", help="also greedy generation, scored by exact match")
    g.add_argument("--variants", default=None, help="comma-separated, of fp, quant, quant_scaled, fp_scaled "
                   "(default: all the recipe has)")
    r.add_argument("--out", default=None, help="write OUT.json (settings, summary, every trial) and OUT.csv (every trial)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_retrieval)


def cmd_retrieval(a) -> int:
    from dataclasses import replace

    from qroar import retrieval

    recipe = recipe_from_args(a)
    variants = _variants_from_args(a, recipe, ("fp", "quant", "quant_scaled", "fp_scaled"),
                                   ("fp", "quant", "quant_scaled", "fp_scaled"))
    lengths = _ints(a.lengths, "--lengths")
    kw = dict(trials=a.trials, key=a.key, digits=a.digits, haystack=a.haystack, corpus=a.corpus, seed=a.seed,
              generate=a.generate)
    if a.depths:
        kw["depths"] = _floats(a.depths, "--depths")
    cfg = retrieval.RetrievalConfig(**({"lengths": lengths} if lengths else {}), **kw)  # bad settings fail before the load
    preflight.check(a, "retrieval")  # model name, group size, a corpus long enough for the haystacks, the plan
    wb = open_workbench(a)
    tc = wb.info.trained_context
    if not lengths:
        cfg = replace(cfg, lengths=(tc, 2 * tc, 4 * tc))
    retrieval.plan_prompts(wb, cfg)  # a key or question that cannot fit is refused before quantizing
    print(f"model {wb.info.name} ({wb.info.model_type}, trained context {tc}) on {wb.info.device}/{wb.info.dtype}; "
          f"PI {recipe.pi.label()}{_placement_line(wb.info)}")
    tq = apply_recipe(wb, recipe, a.quiet)
    if recipe.quantized:
        print(f"quantized ({wb.quant_cfg.describe()}) in {tq:.2f}s")
    res = retrieval.run(wb, cfg, variants=variants, progress=ProgressBar(a.quiet))
    print(retrieval.format_result(res))
    print(f"{len(res.trials)} prompts in {res.settings['seconds']:.2f}s")
    write_outputs(a.out, {"command": "retrieval", "settings": wb.settings(), "recipe": wb.recipe.to_dict(),
                          "quantize_seconds": tq, **res.to_dict()}, res.trials)
    return 0


COMMANDS = [add_eval, add_diagnose, add_search, add_apply, add_export, add_fidelity, add_retrieval]  # a new command: write add_<name>/cmd_<name>, list it here


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qroar", description="Q-ROAR: RoPE interpolation x weight quantization, diagnosed and repaired.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QroarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
