"""Interactive latency: a Tune slider move to a redrawn PTQ+scales perplexity, on the CPU.

Per move: `set_band_scale` (re-quantizes only that band's q/k rows) + perplexity of the "quant_scaled"
variant at the chosen length(s). Baseline in the same run: one bare forward of the same window.

  python bench/interactive.py --model qroar-tiny --lengths 2048 --out bench/results/cpu_interactive.json
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

from qroar.bands import BandConfig  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qroar-tiny")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--moves", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cpu_interactive.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lengths = tuple(int(x) for x in a.lengths.split(","))
    wb = Workbench.open(a.model, device="cpu")
    wb.set_pi(PIConfig("yarn", 8.0))
    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=64))
    wb.set_bands(BandConfig(n_bands=8))
    wb.set_scales([1.0] * 8, ScaleConfig("shared", "before"))
    cfg = EvalConfig(lengths=lengths, max_windows_per_doc=1)
    doc = wb.corpus("embedded:heldout").tokens[0]
    ids = doc[: max(lengths)][None]
    with torch.no_grad():
        wb.model(input_ids=ids, use_cache=False)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            wb.model(input_ids=ids, use_cache=False)
        bare = (time.perf_counter() - t) / 3
    rows = []
    for i in range(a.moves):
        b, g = i % 8, 1.0 + 0.02 * (1 + i // 8) * (-1) ** i
        t0 = time.perf_counter()
        wb.set_band_scale(b, g)
        t1 = time.perf_counter()
        wb.perplexity([doc], cfg, variants=("quant_scaled",))
        t2 = time.perf_counter()
        rows.append({"band": b, "scale": g, "rescale_s": t1 - t0, "perplexity_s": t2 - t1, "total_s": t2 - t0})
    med = sorted(r["total_s"] for r in rows)[len(rows) // 2]
    meta = {"model": a.model, "lengths": lengths, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "bare_forward_s": bare, "median_move_s": med, "ratio_to_bare": med / bare}
    print(f"{'band':>4} {'scale':>6} {'rescale s':>10} {'perplexity s':>13} {'total s':>8}")
    for r in rows:
        print(f"{r['band']:>4} {r['scale']:>6.3f} {r['rescale_s']:>10.3f} {r['perplexity_s']:>13.3f} {r['total_s']:>8.3f}")
    print(f"bare forward at {max(lengths)} tokens: {bare:.3f} s; median slider move: {med:.3f} s ({med / bare:.2f}x)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
