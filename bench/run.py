"""GPU benchmark suite: prints a table per case and writes JSON.

Every figure is paired with a baseline measured in the same run on the same model:
  eval      perplexity evaluate() (fake-quantized, PI on, hooks off) vs a bare transformers
            forward model(input_ids) and vs model(input_ids, labels=...), tokens/s and peak memory
  quant     quantization time of every linear layer for RTN, GPTQ and AWQ vs one bare forward
  capture   diagnostics capture at one length vs one bare forward (time and peak memory)
  search    the full search (8 bands x 7 candidates, 10 documents up to 32K): racing + nested end to end,
            against the naive estimate (every candidate on every document, one forward per length)

Usage:  python bench/run.py --model random:llama2-7b --cases eval,quant,capture --out bench/results/h100.json
Random-weight models time exactly like real ones (timing does not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar.perplexity import FUSED_LOSS_ENV, EvalConfig, evaluate  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

GiB = 1024**3


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats=1):
    """(seconds per call, peak bytes above what was allocated before) after one warm-up call."""
    fn()
    sync(dev)
    base = 0
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(dev)
    secs = (time.perf_counter() - t) / repeats
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else 0
    return secs, peak


def random_doc(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def case_eval(wb: Workbench, lengths, args):
    dev, vocab = wb.device, wb.info.vocab_size
    rows = []
    for L in lengths:
        doc = random_doc(L, vocab)
        ids = doc[None].to(dev)
        cfg = EvalConfig(lengths=(L,), batch_size=1, add_bos=False)

        def bare():
            with torch.no_grad():
                wb.model(input_ids=ids, use_cache=False)

        def labels():
            with torch.no_grad():
                wb.model(input_ids=ids, labels=ids, use_cache=False)

        def ours():
            evaluate(wb.model, [doc], cfg)

        r = {"case": "eval", "length": L}
        if os.environ.get(FUSED_LOSS_ENV) == "1":  # the compiled loss must give the eager one's numbers
            fused = evaluate(wb.model, [doc], cfg).summary.nll.iloc[0]
            os.environ[FUSED_LOSS_ENV] = "0"
            eager = evaluate(wb.model, [doc], cfg).summary.nll.iloc[0]
            os.environ[FUSED_LOSS_ENV] = "1"
            r["fused_vs_eager_rel"] = float(abs(fused - eager) / abs(eager))
        for name, fn in (("bare", bare), ("labels", labels), ("qroar", ours)):
            try:
                s, p = timed(fn, dev, args.repeats)
                r[f"{name}_s"], r[f"{name}_peak_gib"] = round(s, 4), round(p / GiB, 2)
            except torch.OutOfMemoryError:
                r[f"{name}_s"], r[f"{name}_peak_gib"] = None, "OOM"
                torch.cuda.empty_cache()
        if r.get("bare_s") and r.get("qroar_s"):
            r["throughput_ratio"] = round(r["bare_s"] / r["qroar_s"], 3)  # >1: faster than the bare forward
            r["qroar_tok_s"] = round((L - 1) / r["qroar_s"])
        rows.append(r)
        print_row(r)
    return rows


def case_quant(wb: Workbench, args):
    dev = wb.device
    ids = random_doc(2048, wb.info.vocab_size)[None].to(dev)
    fwd, _ = timed(lambda: wb.model(input_ids=ids, use_cache=False), dev)
    rows = []
    for method in args.methods.split(","):
        q = QuantConfig(method=method, bits=4, group_size=128, n_samples=args.calib_samples, seq_len=args.calib_len)
        t = time.perf_counter()
        wb.set_quant(q, calib_corpus=args.calib)
        sync(dev)
        secs = time.perf_counter() - t
        r = {"case": "quant", "method": method, "seconds": round(secs, 2), "forward_2k_s": round(fwd, 4),
             "calib": f"{args.calib_samples}x{args.calib_len}" if method != "rtn" else "-"}
        rows.append(r)
        print_row(r)
    return rows


def case_capture(wb: Workbench, L, args):
    from qroar.diagnostics import DiagConfig, run_diagnostics

    dev = wb.device
    doc = random_doc(L, wb.info.vocab_size)
    ids = doc[None].to(dev)
    bare, bare_peak = timed(lambda: wb.model(input_ids=ids, use_cache=False), dev)
    res = {}

    def cap():  # TIR_W + TIR_A + logit noise on one window, fp and quantized variants (two forwards)
        res["r"] = run_diagnostics(wb, [doc], DiagConfig(capture_length=L, n_docs=1))

    s, p = timed(cap, dev)
    r = {"case": "capture", "length": L, "bare_s": round(bare, 3), "bare_peak_gib": round(bare_peak / GiB, 2),
         "capture_s": round(s, 3), "capture_peak_gib": round(p / GiB, 2), "forwards": 2,
         "ratio_per_forward": round(s / 2 / bare, 2)}
    print_row(r)
    return [r]


def case_search(wb: Workbench, args):
    """The full search on this model: 8 bands x 7 candidates, one sweep, args.search_docs dev documents
    at lengths up to args.search_lengths' longest. Measures one candidate's evaluation on the dev set
    tiled (one forward per length, the guard's short length first) and nested (one forward per
    document), then runs the racing + nested search end to end. Documents are random tokens: timing
    does not depend on them, but what racing prunes does, so its worst case is reported too."""
    from qroar.bands import BandConfig
    from qroar.search import SearchConfig, _race_budget, search, windows_for
    from qroar.workbench import Corpus

    dev = wb.device
    lengths = tuple(int(x) for x in args.search_lengths.split(","))
    n_dev, n_held = args.search_docs, args.search_heldout
    docs = [random_doc(max(lengths), wb.info.vocab_size, seed=100 + i) for i in range(n_dev + n_held)]
    wb._corpora["bench:dev"] = Corpus("bench:dev", [f"dev{i}" for i in range(n_dev)], docs[:n_dev])
    wb._corpora["bench:held"] = Corpus("bench:held", [f"held{i}" for i in range(n_held)], docs[n_dev:])
    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=128))
    wb.set_bands(BandConfig(n_bands=8))
    windows = windows_for(wb)
    base = dict(n_candidates=7, sweeps=1, lengths=lengths, dev_corpus="bench:dev", heldout_corpus="bench:held",
                max_windows_per_doc=1)
    wb.set_scales([1.0] * 8)

    def one(nested):
        cfg = EvalConfig(lengths=lengths, max_windows_per_doc=1, nested=nested)
        return lambda: wb.evaluate("bench:dev", cfg, "quant_scaled")

    tiled, _ = timed(one(False), dev)
    nested, _ = timed(one(True), dev)
    n_cand = 8 * 6
    per_doc = nested / n_dev
    worst = _race_budget(n_dev, [6] * 8, SearchConfig(**base, strategy="race", nested=True))
    wb.set_scales(None)
    sync(dev)
    t = time.perf_counter()
    r = search(wb, SearchConfig(**base, strategy="race", nested=True), windows)
    sync(dev)
    wall = time.perf_counter() - t
    row = {"case": "search", "bands": 8, "candidates": 7, "dev_docs": n_dev, "heldout_docs": n_held,
           "lengths": "/".join(str(n) for n in lengths),
           "candidate_eval_tiled_s": round(tiled, 2), "candidate_eval_nested_s": round(nested, 2),
           "naive_estimate_s": round((1 + n_cand) * tiled + 3 * tiled * n_held / n_dev + tiled, 1),
           "nested_exhaustive_estimate_s": round((1 + n_cand) * nested + 3 * nested * n_held / n_dev + nested, 1),
           "racing_worst_case_s": round((worst + 2 * n_dev + 3 * n_held) * per_doc, 1),
           "race_search_s": round(wall, 1), "race_evaluations": r.evaluations,
           "race_doc_forwards": r.doc_evaluations, "racing_worst_case_doc_forwards": worst + 2 * n_dev + 3 * n_held,
           "naive_doc_forwards": (n_cand + 2) * n_dev * len(lengths) + 3 * n_held * len(lengths),
           "target_s": 300}
    print_row(row)
    return [row]


def print_row(r):
    print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)


def print_table(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cases", default="eval,quant,capture")
    ap.add_argument("--lengths", default="4096,16384,32768,65536")
    ap.add_argument("--pi", default="yarn")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--calib", default="embedded:dev")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--capture-length", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--search-lengths", default="4096,16384,32768")
    ap.add_argument("--search-docs", type=int, default=10)
    ap.add_argument("--search-heldout", type=int, default=4)
    ap.add_argument("--fused-loss", action="store_true", help="set QROAR_FUSED_LOSS=1: compiled head + loss on CUDA")
    ap.add_argument("--out", default="bench/results/latest.json")
    args = ap.parse_args()
    if args.fused_loss:
        os.environ[FUSED_LOSS_ENV] = "1"

    t = time.perf_counter()
    wb = Workbench.open(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t
    wb.set_pi(PIConfig(args.pi, args.factor))
    dev = wb.device
    meta = {"model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": wb.info.dtype, "pi": wb.pi.label(), "load_s": round(load_s, 1),
            "fused_loss": os.environ.get(FUSED_LOSS_ENV) == "1",
            "weights_gib": round(sum(p.numel() * p.element_size() for p in wb.model.parameters()) / GiB, 2)}
    import transformers

    meta["transformers"] = transformers.__version__
    print_row(meta)
    rows = []
    cases = args.cases.split(",")
    if "quant" in cases:
        rows += case_quant(wb, args)
    if "eval" in cases:
        wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=128))
        rows += case_eval(wb, [int(x) for x in args.lengths.split(",")], args)
    if "capture" in cases:
        rows += case_capture(wb, args.capture_length, args)
    if "search" in cases:
        rows += case_search(wb, args)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
