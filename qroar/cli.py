"""Command line: every computation of the dashboard, headless (a GPU server needs no browser).

  qroar eval      perplexity, full precision vs quantized, at chosen context lengths
  qroar diagnose  bands, Interpolation Pressure, TIR_W / TIR_A, per-band quant error, logit noise
  qroar search    find per-band scales (coordinate descent, checkpoint/resume), report on held-out documents
  qroar apply     load a scales file onto its model and evaluate fp / quant / quant+scales on held-out documents
  qroar export    a scales file -> a Hugging Face checkpoint folder with the scales folded in

Every QroarError is printed as `error: ...` with exit code 2. A command is one `add_<name>(sub)`
function that builds its parser and one `cmd_<name>(args)` that runs it; COMMANDS lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qroar.errors import QroarError


# ----------------------------------------------------------------------------- shared options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from qroar.models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"preset, local folder or hub id (default {DEFAULT_MODEL})")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
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


def _add_pi_args(p: argparse.ArgumentParser) -> None:
    from qroar.rope import ROPE_TYPES

    g = p.add_argument_group("position interpolation")
    g.add_argument("--pi", default="default", choices=ROPE_TYPES, help="rope_type (default = no interpolation)")
    g.add_argument("--factor", type=float, default=1.0, help="interpolation factor")
    g.add_argument("--original", type=int, default=None, help="original (trained) context; default: the model's")
    g.add_argument("--pi-param", action="append", default=[], metavar="KEY=VALUE", help="extra rope parameter, e.g. beta_fast=32")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight quantization")
    g.add_argument("--quant", default="rtn", help="none | rtn | gptq | awq")
    g.add_argument("--bits", type=int, default=4)
    g.add_argument("--group-size", type=int, default=128, help="group size along the input dim; 0 = per output channel")
    g.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    g.add_argument("--scope", default="linear", help="linear (all but the head) | attention | qk")
    g.add_argument("--calib", default="embedded:dev", help="calibration corpus for gptq/awq")
    g.add_argument("--calib-samples", type=int, default=16)
    g.add_argument("--calib-len", type=int, default=None, help="calibration sequence length (default: trained context)")


def _add_corpus_args(p: argparse.ArgumentParser, default="embedded:heldout") -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=default, help="embedded | embedded:dev | embedded:heldout | PATH | hf:name[:config[:split[:field]]]")
    g.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1x,4x,8x the trained context)")
    g.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping windows)")
    g.add_argument("--max-windows", type=int, default=None, help="at most this many windows per document and length")
    g.add_argument("--batch-size", type=int, default=None)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if "," in v:
        return tuple(_parse_value(x) for x in v.split(","))
    return v


def pi_from_args(a):
    from qroar.errors import ConfigError
    from qroar.rope import PIConfig

    params = []
    for kv in a.pi_param:
        if "=" not in kv:
            raise ConfigError(f"--pi-param expects KEY=VALUE, got {kv!r}.")
        k, v = kv.split("=", 1)
        params.append((k.strip(), _parse_value(v.strip())))
    return PIConfig(a.pi, a.factor, a.original, tuple(sorted(params)))


def quant_from_args(a, trained_context: int):
    from qroar.quant import QuantConfig

    return QuantConfig(method=a.quant, bits=a.bits, group_size=a.group_size, symmetric=a.sym, scope=a.scope,
                       n_samples=a.calib_samples, seq_len=a.calib_len or trained_context)


def lengths_from_args(a, trained_context: int) -> tuple[int, ...]:
    from qroar.errors import ConfigError

    if not a.lengths:
        return tuple(trained_context * k for k in (1, 4, 8))
    try:
        return tuple(int(x) for x in a.lengths.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"--lengths expects comma-separated integers, got {a.lengths!r}.") from e


class ProgressBar:
    """A one-line progress bar on stderr with the time left."""

    def __init__(self, quiet=False):
        self.t0, self.quiet = time.time(), quiet

    def __call__(self, frac: float, msg: str = "") -> None:
        if self.quiet:
            return
        frac = min(max(frac, 0.0), 1.0)
        el = time.time() - self.t0
        eta = el / frac * (1 - frac) if frac > 0.01 else float("nan")
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}%  {el:6.1f}s  eta {eta:6.1f}s  {msg[:50]:<50}")
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


def open_workbench(a):
    from qroar.workbench import Workbench

    dm, mm = device_map_from_args(a)
    wb = Workbench.open(a.model, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code,
                        device_map=dm, max_memory=mm)
    wb.set_pi(pi_from_args(a))
    return wb


# ----------------------------------------------------------------------------- commands


def _placement_line(info) -> str:
    if len(info.devices) < 2:
        return ""
    return "; placed: " + "; ".join(f"{d}: {', '.join(v['modules'])}" for d, v in info.devices.items())


def cmd_eval(a) -> int:
    from qroar import distributed
    from qroar.perplexity import EvalConfig, summarize

    ranks = ranks_from_args(a)
    say = print if ranks.is_main else (lambda *x, **k: None)
    wb = open_workbench(a)
    tc = wb.info.trained_context
    cfg = EvalConfig(lengths=lengths_from_args(a, tc), stride=a.stride, max_windows_per_doc=a.max_windows, batch_size=a.batch_size)
    say(f"model {wb.info.name} ({wb.info.model_type}, {wb.info.n_params / 1e6:.1f}M params, trained context {tc}) "
        f"on {wb.info.device}/{wb.info.dtype}; PI {wb.pi.label()}{_placement_line(wb.info)}")
    q = quant_from_args(a, tc)
    t0 = time.time()
    wb.set_quant(q, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    tq = time.time() - t0
    if q.method != "none":
        say(f"quantized ({q.method} W{q.bits} g{q.group_size} {'sym' if q.symmetric else 'asym'}, scope {q.scope}) in {tq:.2f}s")
    t0 = time.time()
    table = distributed.perplexity(wb, a.corpus, cfg, ranks, progress=ProgressBar(a.quiet))
    te = time.time() - t0
    ranks.close()
    if not ranks.is_main:
        return 0
    if ranks.world_size > 1:
        print(f"documents spread over {ranks.world_size} processes")
    summary = pd_summary(table, summarize)
    print(format_summary(summary))
    print(f"evaluated in {te:.2f}s")
    write_outputs(a.out, {"command": "eval", "settings": wb.settings(), "corpus": a.corpus, "eval": cfg.to_dict(),
                          "quantize_seconds": tq, "eval_seconds": te,
                          "summary": summary.to_dict(orient="records"), "results": table.to_dict(orient="records")}, table)
    return 0


def format_summary(summary) -> str:
    """Lengths as rows, variants as columns, plus the relative quantization penalty."""
    piv = summary.pivot(index="length", columns="variant", values="ppl")
    piv = piv[[v for v in ("fp", "quant", "fp_scaled", "scaled") if v in piv]]
    if "fp" in piv and "quant" in piv:
        piv["penalty_%"] = 100 * (piv["quant"] / piv["fp"] - 1)
    if "scaled" in piv and "quant" in piv:
        piv["scaled_vs_quant_%"] = 100 * (piv["scaled"] / piv["quant"] - 1)
    return piv.to_string(float_format=lambda x: f"{x:.3f}")


# ----------------------------------------------------------------------------- search / apply / export


def _add_band_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bands and scales")
    g.add_argument("--bands", type=int, default=8, help="number of RoPE frequency bands (4-16)")
    g.add_argument("--band-align", default="log", choices=("log", "yarn"), help="log-spaced, or aligned with YaRN's ramp")
    g.add_argument("--mode", default="shared", choices=("shared", "symmetric"), help="shared: W_K * g; symmetric: W_K / g")
    g.add_argument("--order", default="before", choices=("before", "after"), help="scale before or after quantization")


def windows_from_args(a, wb):
    """Per-band windows: given explicitly, or derived from IP (and TIR_W when asked)."""
    import math

    from qroar.errors import ConfigError
    from qroar.search import W_MAX, W_MIN, windows_for

    if a.windows:
        try:
            return [tuple(float(x) for x in w.split(":")) for w in a.windows.split(",")]
        except ValueError as e:
            raise ConfigError(f"--windows expects LO:HI per band, comma-separated (e.g. 0.9:1.1,0.8:1.25), got {a.windows!r}.") from e
    tir = None
    if a.diag:
        from qroar.diagnostics import DiagResult

        tir = DiagResult.read(a.diag).tables.get("tir")
    elif a.tir:
        from qroar.diagnostics import DiagConfig, run_diagnostics

        from qroar.bands import BandConfig

        res = run_diagnostics(wb, a.dev_corpus, DiagConfig(bands=BandConfig(n_bands=a.bands, align=a.band_align), axis=False),
                              progress=ProgressBar(a.quiet))
        tir = res.tables["tir"]
    w_max = math.log(a.window_max) if a.window_max else W_MAX
    w_min = math.log(a.window_min) if a.window_min else W_MIN
    return windows_for(wb, tir, w_max=w_max, w_min=min(w_min, w_max))


def add_search(sub) -> None:
    s = sub.add_parser("search", help="find per-band scales on dev documents, report on held-out documents")
    _add_model_args(s), _add_pi_args(s), _add_quant_args(s), _add_band_args(s)
    g = s.add_argument_group("corpus")
    g.add_argument("--dev-corpus", default="embedded:dev", help="documents the search optimises on")
    g.add_argument("--heldout-corpus", default="embedded:heldout", help="documents the result is reported on")
    g.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1x,4x the trained context)")
    g.add_argument("--length-weights", default=None, help="comma-separated weights, one per length (default: proportional to length)")
    g.add_argument("--max-windows", type=int, default=2, help="at most this many windows per document and length")
    g.add_argument("--batch-size", type=int, default=None)
    w = s.add_argument_group("windows")
    w.add_argument("--windows", default=None, help="explicit LO:HI per band, comma-separated (skips the IP/TIR rule)")
    w.add_argument("--window-max", type=float, default=None, help="widest window, as a factor (default 1.25: [0.8, 1.25])")
    w.add_argument("--window-min", type=float, default=None, help="narrowest window, as a factor (default 1.02)")
    w.add_argument("--tir", action="store_true", help="also use TIR_W (runs the diagnostics on the dev corpus first)")
    w.add_argument("--diag", default=None, help="read TIR_W from a saved diagnostics folder")
    o = s.add_argument_group("search")
    o.add_argument("--candidates", type=int, default=7, help="candidates per band (5-9)")
    o.add_argument("--sweeps", type=int, default=1, help="coordinate-descent sweeps over the bands (1-2)")
    o.add_argument("--guard", type=float, default=0.005, help="short-context guard: max relative ppl rise at the shortest length")
    o.add_argument("--folds", type=int, default=0, help="k-fold stability of the chosen scales (0 = off)")
    o.add_argument("--checkpoint", default=None, help="JSON file saved after every evaluation; rerun with it to resume")
    o.add_argument("--race", action="store_true",
                   help="successive halving over dev documents: candidates that lose on the first documents stop early")
    o.add_argument("--race-eta", type=int, default=3, help="racing keeps the best 1/eta of the candidates per rung (2-4)")
    o.add_argument("--nested", action="store_true",
                   help="score every length from one forward at the longest (shorter lengths = prefixes of the long windows)")
    s.add_argument("--out", default=None, help="write the scales file here (e.g. scales.json)")
    s.add_argument("--report", default=None, help="write REPORT.json (everything) and REPORT.csv (held-out table)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arg(s)
    s.set_defaults(func=cmd_search)


def cmd_search(a) -> int:
    from qroar.bands import BandConfig
    from qroar.errors import ConfigError
    from qroar.export import save_scales
    from qroar import distributed
    from qroar.search import SearchConfig, format_result

    ranks = ranks_from_args(a)
    say = print if ranks.is_main else (lambda *x, **k: None)
    wb = open_workbench(a)
    tc = wb.info.trained_context
    lengths = lengths_from_args(a, tc) if a.lengths else (tc, 4 * tc)
    weights = None
    if a.length_weights:
        try:
            weights = tuple(float(x) for x in a.length_weights.split(","))
        except ValueError as e:
            raise ConfigError(f"--length-weights expects comma-separated numbers, got {a.length_weights!r}.") from e
    cfg = SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=tuple(lengths), length_weights=weights,
                       guard_tol=a.guard, dev_corpus=a.dev_corpus, heldout_corpus=a.heldout_corpus,
                       max_windows_per_doc=a.max_windows, batch_size=a.batch_size, mode=a.mode, order=a.order,
                       checkpoint=a.checkpoint, k_folds=a.folds, race=a.race, race_eta=a.race_eta, nested=a.nested)
    say(f"model {wb.info.name} ({wb.info.model_type}, trained context {tc}) on {wb.info.device}/{wb.info.dtype}; "
        f"PI {wb.pi.label()}{_placement_line(wb.info)}")
    q = quant_from_args(a, tc)
    wb.set_quant(q, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    wb.set_bands(BandConfig(n_bands=a.bands, align=a.band_align))
    wb.set_scales([1.0] * wb.bands.n_bands, cfg.scale_cfg)
    if wb.invariance_note():
        say(f"note: {wb.invariance_note()}")
    windows = windows_from_args(a, wb)
    result = distributed.search(wb, cfg, ranks, windows, progress=ProgressBar(a.quiet))
    ranks.close()
    if not ranks.is_main:
        return 0
    if ranks.world_size > 1:
        print(f"candidates spread over {ranks.world_size} processes")
    print(format_result(result))
    print(f"{result.evaluations} evaluations in {result.seconds:.1f}s ({result.reused} reused from the checkpoint)")
    if a.out:
        save_scales(a.out, wb, result)
        print(f"wrote {a.out}")
    if a.report:
        write_outputs(a.report, {"command": "search", **result.to_dict()}, result.heldout)
    return 0


def _open_for_scales(a):
    """Load the scales file, then its model (--model, else the file's source folder or name), checked."""
    from qroar.export import load_scales
    from qroar.workbench import Workbench

    sf = load_scales(a.scales)
    name = a.model or (sf.model.get("source") if sf.model.get("source") and Path(sf.model["source"]).exists() else sf.model["name"])
    dm, mm = device_map_from_args(a)
    wb = Workbench.open(name, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code,
                        device_map=dm, max_memory=mm)
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
    from qroar.perplexity import EvalConfig, summarize

    sf, wb = _open_for_scales(a)
    tc = wb.info.trained_context
    search_lengths = (sf.raw.get("search") or {}).get("lengths")
    lengths = lengths_from_args(a, tc) if a.lengths or not search_lengths else tuple(search_lengths)
    cfg = EvalConfig(lengths=lengths, stride=a.stride, max_windows_per_doc=a.max_windows, batch_size=a.batch_size)
    apply_scales(wb, sf, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    print(f"applied {a.scales}: {sf.scale_cfg.mode} mode, {sf.scale_cfg.order} quantization, "
          f"scales {', '.join(f'{g:.4g}' for g in sf.scales)}; PI {wb.pi.label()}")
    table = wb.perplexity(a.corpus, cfg, variants=("fp", "quant", "fp_scaled", "scaled"), progress=ProgressBar(a.quiet))
    if "scaled" in set(table["variant"]):
        table = table[table["variant"] != "fp_scaled"]
    summary = pd_summary(table, summarize)
    print(format_summary(summary))
    if wb.invariance_note():
        print(f"note: {wb.invariance_note()} Differences above are rounding noise.")
    write_outputs(a.out, {"command": "apply", "scales_file": str(a.scales), "settings": wb.settings(), "corpus": a.corpus,
                          "eval": cfg.to_dict(), "summary": summary.to_dict(orient="records"),
                          "results": table.to_dict(orient="records")}, table)
    return 0


def pd_summary(table, summarize):
    """summarize() per variant, stacked."""
    import pandas as pd

    return pd.concat([summarize(t).assign(variant=v) for v, t in table.groupby("variant", sort=False)], ignore_index=True)


def add_export(sub) -> None:
    s = sub.add_parser("export", help="scales file -> Hugging Face checkpoint folder with the scales folded in")
    _add_scales_model_args(s)
    s.add_argument("--out", required=True, help="output folder (created; written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (files of your own in it are kept)")
    s.add_argument("--quantized", action="store_true", help="write the fake-quantized scaled weights (default: full precision with scales folded)")
    s.add_argument("--calib", default="embedded:dev", help="calibration corpus when the file's quantizer is gptq/awq")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from qroar.errors import ConfigError
    from qroar.export import apply_scales, check_target, export_checkpoint

    check_target(a.out, a.overwrite)  # before loading the model and calibrating
    sf, wb = _open_for_scales(a)
    if a.quantized and sf.quant is None:
        raise ConfigError(f"{a.scales} was made without a quantizer: export full precision (drop --quantized).")
    apply_scales(wb, sf, quantize=a.quantized, calib_corpus=a.calib, progress=ProgressBar(a.quiet))
    path = export_checkpoint(wb, a.out, quantized=a.quantized, meta=sf.raw, overwrite=a.overwrite)
    kind = "fake-quantized scaled" if a.quantized else "full-precision scaled"
    print(f"wrote {path} ({kind} weights, PI {wb.pi.label()})")
    return 0


# ----------------------------------------------------------------------------- parser


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, full precision vs quantized, at chosen context lengths")
    _add_model_args(e), _add_pi_args(e), _add_quant_args(e), _add_corpus_args(e)
    e.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_distributed_arg(e)
    e.set_defaults(func=cmd_eval)


def add_diagnose(sub) -> None:
    d = sub.add_parser("diagnose", help="bands, Interpolation Pressure, TIR_W/TIR_A, quant error, logit noise (JSON + CSV)")
    _add_model_args(d), _add_pi_args(d), _add_quant_args(d)
    g = d.add_argument_group("diagnostics")
    g.add_argument("--corpus", default="embedded:dev", help="documents for the activation captures (one window each)")
    g.add_argument("--bands", type=int, default=8, help="number of RoPE frequency bands (4-16)")
    g.add_argument("--band-align", default="log", choices=("log", "yarn"))
    g.add_argument("--capture-length", type=int, default=None, help="tokens per window (default 2x the trained context)")
    g.add_argument("--n-docs", type=int, default=4, help="documents pooled (one window each)")
    g.add_argument("--eps", type=float, default=1e-3, help="tail quantile Q(1-eps)")
    g.add_argument("--no-axis", action="store_true", help="skip TIR_A (post-RoPE per-axis)")
    g.add_argument("--noise-layers", default=None, help="comma-separated layers for the logit noise (default: 4 spread over depth)")
    g.add_argument("--ip-lengths", default=None, help="comma-separated lengths for IP (default 1,2,4,8,16 x trained context)")
    d.add_argument("--out", default="diagnostics", help="folder for diagnostics.json and one CSV per table")
    d.add_argument("--figures", default=None, choices=("html", "png", "both"), help="also write the figures (needs plotly; png needs kaleido + Chromium)")
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
    from qroar.bands import BandConfig
    from qroar.diagnostics import DiagConfig, run_diagnostics

    cfg = DiagConfig(bands=BandConfig(n_bands=a.bands, align=a.band_align), capture_length=a.capture_length,
                     n_docs=a.n_docs, eps=a.eps, axis=not a.no_axis,
                     noise_layers=_ints(a.noise_layers, "--noise-layers"), ip_lengths=_ints(a.ip_lengths, "--ip-lengths"))
    wb = open_workbench(a)
    wb.set_quant(quant_from_args(a, wb.info.trained_context), calib_corpus=a.calib, progress=ProgressBar(a.quiet))
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
    if a.figures:
        paths += _write_figures(res, a.out, a.figures)
    print(f"wrote {len(paths)} files to {a.out}")
    return 0


def _write_figures(res, folder, kind) -> list:
    from qroar.errors import ConfigError

    try:
        from app.diag_charts import figures
    except ImportError as e:
        raise ConfigError(f"Figures need the dashboard's packages (plotly): pip install plotly ({e}).") from e
    out = []
    for name, fig in figures(res.tables, res.settings.get("trained_context")).items():
        if kind in ("html", "both"):
            out.append(Path(folder) / f"{name}.html")
            fig.write_html(out[-1], include_plotlyjs=True)  # self-contained: works offline
        if kind in ("png", "both"):
            out.append(Path(folder) / f"{name}.png")
            try:
                fig.write_image(out[-1], width=1100, height=fig.layout.height or 500)
            except Exception as e:  # kaleido needs a Chromium; say so instead of a traceback
                raise ConfigError(f"PNG export failed ({type(e).__name__}: {e}); use --figures html, or install Chromium.") from e
    return out


COMMANDS = [add_eval, add_diagnose, add_search, add_apply, add_export]  # a new command: write add_<name>/cmd_<name>, list it here


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
