"""Gradient search vs the racing grid, in the same run on the same model: prints a table, writes JSON.

Setup (bench/run.py's search case): random-token documents of the longest length (timing does not depend on
the text), 10 dev + 4 held-out, lengths 4096,16384,32768, RTN W4 g128, 8 bands, windows by the IP rule, YaRN x8,
one window per document, nested windows. Racing: 7 candidates per band, one sweep. Gradient: --steps Adam steps
of --grad-batch 32K windows each (checkpointed layers: memory = the layer inputs + one layer), a validation
check on the held-back dev documents every --grad-every steps, then the chosen scales evaluated on every dev
document by the ordinary path.

Per strategy: the whole search (descent + dev and held-out tables), the descent alone (what the strategy
itself spends: its baseline, its candidates or steps, its final evaluation) and peak memory above the weights.

GPU (one H200 or H100):
  python bench/grad_search.py --model random:llama2-7b --out bench/results/grad_search_llama2_7b.json
CPU check with small settings (a tiny random model, short lengths):
  python bench/grad_search.py --quick --out bench/results/grad_search_quick_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import GiB, print_row, print_table, random_doc, sync, timed  # noqa: E402
from qroar import search as search_mod  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.search import SearchConfig, search, windows_for  # noqa: E402
from qroar.workbench import Corpus, Workbench  # noqa: E402


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    return 0


def peak(dev, base):
    return round((torch.cuda.max_memory_allocated(dev) - base) / GiB, 2) if dev.type == "cuda" else None


def run_one(wb, cfg, windows, dev):
    """The search with its descent timed apart; (result, whole seconds, descent seconds, step seconds, peak GiB)."""
    name = cfg.strategy
    orig = search_mod.STRATEGIES[name]
    spent = {}

    def descend(*a, **k):
        sync(dev)
        t = time.perf_counter()
        out = orig.descend(*a, **k)
        sync(dev)
        spent["descent"] = spent.get("descent", 0.0) + time.perf_counter() - t
        return out

    marks = []
    search_mod.STRATEGIES[name] = replace(orig, descend=descend)
    wb.set_scales(None)
    base = peak_reset(dev)
    try:
        sync(dev)
        t = time.perf_counter()
        r = search(wb, cfg, windows, progress=lambda f, m: marks.append((time.perf_counter(), m)))
        sync(dev)
        wall = time.perf_counter() - t
    finally:
        search_mod.STRATEGIES[name] = orig
    # one gradient step: between two consecutive "training objective" messages with no validation between
    gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:]) if "training objective" in a[1] and "training objective" in b[1]]
    step = statistics.median(gaps) if gaps else None
    return r, wall, spent.get("descent"), step, peak(dev, base)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--dev-docs", type=int, default=10)
    ap.add_argument("--heldout-docs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="gradient steps (each: --grad-batch windows, forward + backward)")
    ap.add_argument("--grad-batch", type=int, default=1)
    ap.add_argument("--grad-every", type=int, default=5)
    ap.add_argument("--grad-val", type=float, default=0.1, help="share of dev documents held back (0.1 of 10: one)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--strategies", default="race,grad", help="comma-separated: race, grad, grid")
    ap.add_argument("--quick", action="store_true",
                    help="a small random model, lengths 128,256,512, 4 dev + 2 held-out documents, 3 steps (CPU check)")
    ap.add_argument("--out", default="bench/results/grad_search.json")
    a = ap.parse_args()
    if a.quick:
        a.model, a.lengths, a.dev_docs, a.heldout_docs, a.steps, a.grad_every = "random:llama-tiny", "128,256,512", 4, 2, 3, 3
        a.grad_val = 0.25

    t = time.perf_counter()
    wb = Workbench.open(a.model, device=a.device, dtype=a.dtype)
    load_s = time.perf_counter() - t
    wb.set_pi(PIConfig("yarn", 8.0))
    dev = wb.device
    lengths = tuple(int(x) for x in a.lengths.split(","))
    docs = [random_doc(max(lengths), wb.info.vocab_size, seed=100 + i) for i in range(a.dev_docs + a.heldout_docs)]
    wb._corpora["bench:dev"] = Corpus("bench:dev", [f"dev{i}" for i in range(a.dev_docs)], docs[:a.dev_docs])
    wb._corpora["bench:held"] = Corpus("bench:held", [f"held{i}" for i in range(a.heldout_docs)], docs[a.dev_docs:])
    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=128 if wb.info.hidden_size % 128 == 0 else 64))
    wb.set_bands(BandConfig(n_bands=8))
    windows = windows_for(wb)
    import transformers

    meta = {"model": a.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "dtype": wb.info.dtype,
            "pi": wb.pi.label(), "quant": wb.recipe.quant.describe(), "load_s": round(load_s, 1),
            "weights_gib": round(sum(p.numel() * p.element_size() for p in wb.model.parameters()) / GiB, 2),
            "lengths": "/".join(map(str, lengths)), "dev_docs": a.dev_docs, "heldout_docs": a.heldout_docs,
            "quick": a.quick}
    ids = docs[0][None].to(dev)
    from qroar.perplexity import _decoder

    body = _decoder(wb.model)
    fwd, fwd_peak = timed(lambda: body(input_ids=ids, use_cache=False), dev)
    meta["bare_forward_longest_s"], meta["bare_forward_peak_gib"] = round(fwd, 3), round(fwd_peak / GiB, 2)
    print_row(meta)

    base = dict(n_candidates=7, sweeps=1, lengths=lengths, dev_corpus="bench:dev", heldout_corpus="bench:held",
                max_windows_per_doc=1, nested=True)
    configs = {"race": SearchConfig(**base, strategy="race"), "grid": SearchConfig(**base, strategy="grid"),
               "grad": SearchConfig(**base, strategy="grad", grad_steps=a.steps, grad_batch=a.grad_batch, grad_lr=a.lr,
                                    grad_every=a.grad_every, grad_val=a.grad_val, grad_patience=2)}
    rows = []
    for name in a.strategies.split(","):
        r, wall, descent, step, pk = run_one(wb, configs[name], windows, dev)
        val = r.history[r.history["split"] == "val"] if "split" in r.history else None
        row = {"strategy": name, "search_s": round(wall, 1), "descent_s": round(descent, 1),
               "tables_s": round(wall - descent, 1), "unit": r.unit, "spent": r.spent, "budget": r.budget,
               "evaluations": r.evaluations, "doc_forwards": r.doc_evaluations,
               "step_s": None if step is None else round(step, 2),
               "steps": int(r.history["step"].max()) if name == "grad" and len(r.history) else None,
               "val_checks": None if val is None or not len(val) else len(val),
               "peak_gib_over_weights": pk, "dev_change_pct": round(100 * r.objective_change(r.objective["dev"]["quant_scaled"],
                                                                                              r.objective["dev"]["quant"]), 3),
               "heldout_change_pct": round(100 * r.heldout_gain(), 3),
               "scales": [round(g, 4) for g in r.scales]}
        if name != "grad":
            row.pop("steps"), row.pop("val_checks"), row.pop("step_s")
        rows.append(row)
        print_row(row)
    print_table(rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "target": {"grad_descent_s": 60, "race_search_s_earlier": 219}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
