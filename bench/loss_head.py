"""Cost of the output head + loss at one window, by itself (no decoder): where the 4K gap to the bare
forward comes from on large vocabularies. Prints a table and writes JSON.

  python bench/loss_head.py --out bench/results/loss_head.json

Variants, all on the same bf16 hidden states (T positions) and head weights:
  head        logits = h @ W.T in bf16, nothing else (what a bare forward spends on its head)
  labels      transformers' labels= path: full logits, .float(), cross_entropy
  chunk=N     qroar's chunked_nll loss: N positions at a time, fp32 logits, cross_entropy
  fused=N     the same chunks through torch.compile (bf16 logits read once, fp32 log-sum-exp)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"llama2-7b": (4096, 32000), "qwen2.5-7b": (3584, 152064)}


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def chunked(h, W, y, n):
    out = torch.zeros((), dtype=torch.float32, device=h.device)
    for a in range(0, h.shape[0], n):
        logits = (h[a:a + n] @ W.T).float()
        out += F.cross_entropy(logits, y[a:a + n], reduction="sum")
    return out


def _fused_chunk(h, W, y):
    logits = h @ W.T
    lse = torch.logsumexp(logits.float(), dim=-1)
    tgt = logits.gather(1, y[:, None]).squeeze(1).float()
    return (lse - tgt).sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--out", default="bench/results/loss_head.json")
    a = ap.parse_args()
    fused = torch.compile(_fused_chunk, dynamic=False)
    rows = []
    for name, (H, V) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(a.positions, H, device="cuda", dtype=torch.bfloat16, generator=g)
        W = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) * H ** -0.5
        y = torch.randint(0, V, (a.positions,), device="cuda", generator=g)
        ref = F.cross_entropy((h @ W.T).float(), y, reduction="sum").item()
        r = {"shape": name, "positions": a.positions, "vocab": V}
        r["head_ms"] = 1e3 * timed(lambda: h @ W.T)
        r["labels_ms"] = 1e3 * timed(lambda: F.cross_entropy((h @ W.T).float(), y))
        for n in (1024, 2048, 4096):
            r[f"chunk{n}_ms"] = 1e3 * timed(lambda n=n: chunked(h, W, y, n))

            def fz(n=n):
                out = torch.zeros((), dtype=torch.float32, device="cuda")
                for s in range(0, a.positions, n):
                    out += fused(h[s:s + n], W, y[s:s + n])
                return out

            got = fz().item()
            r[f"fused{n}_ms"] = 1e3 * timed(fz)
            r[f"fused{n}_rel_err"] = abs(got - ref) / abs(ref)
        torch.cuda.reset_peak_memory_stats()
        rows.append({k: round(v, 3) if isinstance(v, float) and not k.endswith("err") else v for k, v in r.items()})
        print(rows[-1], flush=True)
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
