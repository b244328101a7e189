"""Where the short-window gap between qroar's evaluate and a bare forward goes: one window, timed
call by call (each call synchronised), for a ladder of variants that add one piece at a time.
Prints a table and writes JSON.

  python bench/gap4k.py --model random:llama2-7b --length 4096 --out bench/results/gap4k.json

  bare           model(ids), calls back to back, one synchronisation at the end (the suite's baseline)
  bare_synced    model(ids), then synchronise, per call
  body           decoder only (last hidden states), synchronised
  body_head      decoder + output head over every position (bf16 logits), synchronised
  chunked_nll    decoder + chunked fp32 loss (qroar's kernel path), result copied to the host
  evaluate       qroar's evaluate() on one document of exactly one window
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar.perplexity import EvalConfig, _decoder, auto_loss_chunk, chunked_nll, evaluate  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--out", default="bench/results/gap4k.json")
    a = ap.parse_args()
    wb = Workbench.open(a.model)
    wb.set_pi(PIConfig("yarn", 8.0))
    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=128))
    m, dev, L = wb.model, wb.device, a.length
    doc = torch.randint(0, wb.info.vocab_size, (L,), generator=torch.Generator().manual_seed(0))
    ids = doc[None].to(dev)
    chunk = auto_loss_chunk(wb.info.vocab_size, dev.type)
    cfg = EvalConfig(lengths=(L,), batch_size=1, add_bos=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def body():
        return _decoder(m)(input_ids=ids, use_cache=False).last_hidden_state

    variants = {
        "bare_synced": lambda: (m(input_ids=ids, use_cache=False), sync()),
        "body": lambda: (body(), sync()),
        "body_head": lambda: (m.get_output_embeddings()(body()), sync()),
        "chunked_nll": lambda: chunked_nll(m, ids, chunk).cpu(),
        "evaluate": lambda: evaluate(m, [doc], cfg),
    }
    out = {}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for fn in variants.values():
                fn()
        sync()
        t = time.perf_counter()
        for _ in range(a.calls):
            m(input_ids=ids, use_cache=False)
        sync()
        out["bare"] = (time.perf_counter() - t) / a.calls
        times = {k: [] for k in variants}
        for _ in range(a.calls):  # interleaved, so drift hits every variant alike
            for k, fn in variants.items():
                sync()
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        out.update({k: statistics.median(v) for k, v in times.items()})
    rows = [{"variant": k, "ms": round(1e3 * v, 2), "vs_bare": round(out["bare"] / v, 3)} for k, v in out.items()]
    meta = {"model": a.model, "length": L, "calls": a.calls, "loss_chunk": chunk,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    print(meta)
    print("| variant | ms per window | throughput vs bare |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']} | {r['vs_bare']}x |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
