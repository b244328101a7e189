"""How good is the CLI's time estimate? Measured evaluate() time against qroar.preflight's estimate.

For each length: the estimate (model FLOPs over a matmul rate measured just before) and the time of
evaluate() on random windows, interleaved so both see the same machine load; prints a table and
writes JSON. preflight.CPU_OVERHEAD is the ratio measured / (FLOPs / matmul rate) on qroar-tiny.

Usage:  python bench/estimate.py [--model qroar-tiny] [--lengths 256 1024 2048] [--windows 2] [--out bench/results/estimate.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar import preflight  # noqa: E402
from qroar.models import load_model  # noqa: E402
from qroar.perplexity import EvalConfig, evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qroar-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/estimate.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = preflight.read_model(args.model)
    loaded = load_model(args.model, device=args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for L in args.lengths:
        doc = torch.randint(0, loaded.info.vocab_size, (L * args.windows,), generator=g)
        cfg = EvalConfig(lengths=(L,), add_bos=False, batch_size=1)
        evaluate(loaded.model, [doc], cfg)  # warm-up
        best_ratio, best = None, None
        for _ in range(args.repeats):  # interleaved: the estimate and the run see the same load
            flops = args.windows * L * spec.flops_per_token(L)
            rate = preflight.measure_flops(spec.get("hidden_size"), spec.get("intermediate_size"), args.device)
            t = time.perf_counter()
            evaluate(loaded.model, [doc], cfg)
            secs = time.perf_counter() - t
            ratio = secs / (flops / rate)
            if best is None or secs < best["seconds"]:
                best = {"length": L, "windows": args.windows, "seconds": round(secs, 3),
                        "gflop": round(flops / 1e9, 2), "matmul_gflop_s": round(rate / 1e9, 1),
                        "estimate_s": round(preflight.CPU_OVERHEAD * flops / rate, 3), "ratio": round(ratio, 2)}
        rows.append(best)
    cols = list(rows[0])
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14}" for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
                                          "cpu_overhead": preflight.CPU_OVERHEAD, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
