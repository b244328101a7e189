"""Fidelity benchmark: KL / same top token / dp of one window (qroar.fidelity.run, FP vs one variant under
the same PI: two decoder forwards and two chunked output heads) against one bare forward of the same window
(`model(input_ids)`, full logits), in the same run on the same model. Prints a table, writes JSON.

Targets (issue 16): at most 2.2x the bare forward, peak at most weights + 4 GB (7B shape, 32K tokens, GPU).
Also timed separately: one decoder body (`hidden_states`) and the chunked heads + statistics (`compare_hidden`).

  python bench/fidelity.py --model random:llama2-7b --length 32768 --out bench/results/fidelity_llama2_7b.json
  python bench/fidelity.py --model qroar-tiny --device cpu --length 2048 --threads 2 --out bench/results/cpu_fidelity.json

Needs only torch, transformers, numpy, pandas, safetensors and accelerate. Random-weight models time exactly
like real ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar import fidelity  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

GiB = 1024**3


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats):
    """(best seconds per call over `repeats`, peak bytes above what was allocated before) after a warm-up."""
    fn()
    sync(dev)
    best, peak = float("inf"), 0
    for _ in range(repeats):
        base = 0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
        if dev.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(dev) - base)
    return best, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--pi", default="yarn")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--quant", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=None, help="positions per head chunk (default: fidelity.auto_chunk)")
    ap.add_argument("--precision", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default="bench/results/fidelity_latest.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    t = time.perf_counter()
    wb = Workbench.open(a.model, device=a.device, dtype=a.dtype)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    wb.apply(Recipe(pi=PIConfig(a.pi, a.factor), quant=QuantConfig(method=a.quant, bits=a.bits, group_size=a.group_size)))
    quant_s = time.perf_counter() - t
    dev = wb.device
    model = wb.model
    import transformers

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    meta = {"model": a.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": wb.info.dtype, "pi": wb.pi.label(), "quant": wb.quant_cfg.describe(), "load_s": round(load_s, 1),
            "quantize_s": round(quant_s, 2), "weights_gib": round(weights / GiB, 2)}
    print("  ".join(f"{k}={v}" for k, v in meta.items()), flush=True)

    L = a.length
    doc = torch.randint(0, wb.info.vocab_size, (L,), generator=torch.Generator().manual_seed(0))
    ids = doc[None].to(dev)
    cfg = fidelity.FidelityConfig(lengths=(L,), max_windows_per_doc=1, chunk=a.chunk, precision=a.precision,
                                  add_bos=False)
    chunk = a.chunk or fidelity.auto_chunk(wb.info.vocab_size, dev.type)
    dtype = getattr(torch, a.precision)
    result = {}

    def bare():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def run():
        result["r"] = fidelity.run(wb, [doc], cfg, variants=("quant",))

    h = {}

    def body():
        h["fp"] = fidelity.hidden_states(model, ids)[0, :-1]

    def heads():
        fidelity.compare_hidden(model, h["fp"], {"quant": h["fp"]}, ids[0, 1:], chunk, dtype)

    rows = []
    with wb.variant("fp"):
        s_bare, p_bare = timed(bare, dev, a.repeats)
        s_body, p_body = timed(body, dev, a.repeats)
        s_heads, p_heads = timed(heads, dev, a.repeats)
    h.clear()
    s_run, p_run = timed(run, dev, a.repeats)
    o = result["r"].overall.iloc[0]
    r = {"length": L, "chunk": chunk, "bare_s": round(s_bare, 4), "fidelity_s": round(s_run, 4),
         "ratio": round(s_run / s_bare, 3), "body_s": round(s_body, 4), "heads_and_stats_s": round(s_heads, 4),
         **{f"{k}_peak_gib": round(p / GiB, 2) if dev.type == "cuda" else None  # peaks: CUDA only
            for k, p in (("bare", p_bare), ("fidelity", p_run), ("body", p_body), ("heads", p_heads))},
         "tok_s": round((L - 1) / s_run), "mean_kld": round(float(o["mean_kld"]), 6),
         "same_top_pct": round(100 * float(o["same_top"]), 3)}
    rows.append(r)
    print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    keys = list(r)
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if dev.type == "cuda":
        print(f"targets: ratio <= 2.2 (got {r['ratio']}), peak over weights <= 4 GB (got {r['fidelity_peak_gib']} GiB)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
