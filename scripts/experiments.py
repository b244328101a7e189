"""Measured tables for the docs: PI x PTQ coupling, quantizer comparison, Q-ROAR search results.

  python scripts/experiments.py coupling   --model qroar-tiny --lengths 256,1024,2048 --factor 8 --out docs/results
  python scripts/experiments.py quantizers --model qroar-tiny --lengths 256,1024,2048 --factor 8 --out docs/results
  python scripts/experiments.py qroar      --model qroar-tiny --lengths 256,1024,2048 --factor 8 --out docs/results
  python scripts/experiments.py race       --model qroar-tiny --lengths 256,1024,2048 --factor 8 --nested --max-windows 1
  python scripts/experiments.py search-methods --model qroar-tiny --bits 3 --nested --max-windows 1 --strategies grid,race,layer
  python scripts/experiments.py gradient   --model qroar-tiny --lengths 256,1024,2048 --factor 8 --bits 3 --nested --max-windows 1

Each writes OUT/<experiment>-<model>.json (every number) and .md (the table as it appears in the docs).
Perplexity is on the held-out documents of the embedded corpus; searches tune on the dev documents.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar.bands import BandConfig  # noqa: E402
from qroar.perplexity import EvalConfig, summarize  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.search import SearchConfig, search  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402



def pis(factor: float) -> dict[str, PIConfig]:
    return {"none": PIConfig(), "linear": PIConfig("linear", factor), "yarn": PIConfig("yarn", factor)}


def ppl_by_length(wb, corpus, lengths, max_windows, variants) -> dict:
    table = wb.perplexity(corpus, EvalConfig(lengths=tuple(lengths), max_windows_per_doc=max_windows), variants=variants)
    out = {}
    for v, t in table.groupby("variant"):
        s = summarize(t)
        out[v] = {int(L): float(p) for L, p in zip(s["length"], s["ppl"])}
    return out


def coupling(wb, a) -> tuple[dict, str]:
    rows = []
    for pi_name, pi in pis(a.factor).items():
        wb.set_pi(pi)
        res = {}
        for bits in (4, 3):
            wb.set_quant(QuantConfig(method="rtn", bits=bits, group_size=a.group_size))
            r = ppl_by_length(wb, a.corpus, a.lengths, a.max_windows, ("fp", "quant") if bits == 4 else ("quant",))
            res.setdefault("fp", r.get("fp", res.get("fp")))
            res[f"w{bits}"] = r["quant"]
        for L in a.lengths:
            fp, w4, w3 = res["fp"][L], res["w4"][L], res["w3"][L]
            rows.append(dict(pi=pi_name, length=L, fp=fp, w4=w4, w3=w3,
                             w4_penalty_pct=100 * (w4 / fp - 1), w3_penalty_pct=100 * (w3 / fp - 1)))
        print(f"  {pi_name}: done", flush=True)
    md = ["| PI | length | FP | RTN W4 | W4 penalty | RTN W3 | W3 penalty |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['pi']} | {r['length']} | {r['fp']:.2f} | {r['w4']:.2f} | {r['w4_penalty_pct']:+.1f}% | "
                  f"{r['w3']:.2f} | {r['w3_penalty_pct']:+.1f}% |")
    return {"rows": rows}, "\n".join(md)


def quantizers(wb, a) -> tuple[dict, str]:
    rows = []
    for pi_name in ("none", "yarn"):
        wb.set_pi(pis(a.factor)[pi_name])
        fp = None
        for method in ("rtn", "gptq", "awq"):
            for bits in (4, 3):
                q = QuantConfig(method=method, bits=bits, group_size=a.group_size, n_samples=a.calib_samples,
                                seq_len=a.calib_len or wb.info.trained_context)
                t = time.perf_counter()
                wb.set_quant(q, calib_corpus="embedded:dev")
                secs = time.perf_counter() - t
                r = ppl_by_length(wb, a.corpus, a.lengths, a.max_windows, ("quant",) if fp else ("fp", "quant"))
                fp = fp or r["fp"]
                for L in a.lengths:
                    rows.append(dict(pi=pi_name, method=method, bits=bits, length=L, fp=fp[L], ppl=r["quant"][L],
                                     penalty_pct=100 * (r["quant"][L] / fp[L] - 1), quantize_s=secs))
                print(f"  {pi_name} {method} w{bits}: {secs:.1f}s", flush=True)
    md = ["| PI | method | bits | " + " | ".join(f"ppl @{L}" for L in a.lengths) + " | quantize time |",
          "|---|---|---|" + "---|" * len(a.lengths) + "---|"]
    for pi_name in ("none", "yarn"):
        fp = [r for r in rows if r["pi"] == pi_name][: len(a.lengths)]
        md.append(f"| {pi_name} | FP | 32 | " + " | ".join(f"{r['fp']:.2f}" for r in fp) + " | - |")
        for method in ("rtn", "gptq", "awq"):
            for bits in (4, 3):
                sel = [r for r in rows if r["pi"] == pi_name and r["method"] == method and r["bits"] == bits]
                md.append(f"| {pi_name} | {method} | {bits} | " + " | ".join(f"{r['ppl']:.2f} ({r['penalty_pct']:+.1f}%)" for r in sel)
                          + f" | {sel[0]['quantize_s']:.1f} s |")
    return {"rows": rows}, "\n".join(md)


def _setups(wb, a):
    """PI and bands of a search experiment, then the quantizer at each of a.bits in turn (yields the bits)."""
    wb.set_pi(PIConfig(a.pi, a.factor))
    wb.set_bands(BandConfig(n_bands=a.bands))
    for bits in a.bits:
        wb.set_quant(QuantConfig(method=a.method, bits=bits, group_size=a.group_size, n_samples=a.calib_samples,
                                 seq_len=a.calib_len or wb.info.trained_context), calib_corpus="embedded:dev")
        yield bits


def qroar(wb, a, save=None) -> tuple[dict, str]:
    """Searches per bits x mode/order; each row also evaluates the chosen scales on the full-precision
    model (the control: does the gain repair quantization, or would FP gain as much?)."""
    from qroar.perplexity import EvalConfig

    runs = []
    for bits in _setups(wb, a):
        for mode, order in (c.split("/") for c in a.configs):
            cfg = SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=tuple(a.lengths),
                               max_windows_per_doc=a.max_windows, heldout_corpus=a.corpus,
                               strategy="race" if a.race else "grid", nested=a.nested, allow_invariant=True)
            wb.set_scales([1.0] * wb.bands.n_bands, ScaleConfig(mode, order))
            t = time.perf_counter()
            r = search(wb, cfg)
            secs = time.perf_counter() - t
            ev = EvalConfig(lengths=tuple(a.lengths), max_windows_per_doc=a.max_windows, nested=a.nested)
            control = wb.evaluate(a.corpus, ev, "fp_scaled").summary
            wb.set_scales(None)
            run = dict(bits=bits, mode=mode, order=order, scales=[round(x, 4) for x in r.scales], note=r.note,
                       seconds=secs, evaluations=r.evaluations, doc_evaluations=r.doc_evaluations,
                       gain_pct=100 * r.heldout_gain(), heldout=json.loads(r.heldout.to_json(orient="records")),
                       fp_scaled={int(L): float(p) for L, p in zip(control["length"], control["ppl"])},
                       dev_objective=r.objective["dev"], heldout_objective=r.objective["heldout"])
            runs.append(run)
            print(f"  w{bits} {mode}/{order}: held-out objective {run['gain_pct']:+.2f}% in {secs:.0f}s", flush=True)
            if save:
                save({"runs": runs}, _qroar_md(runs, a))
    return {"runs": runs}, _qroar_md(runs, a)


def _qroar_md(runs, a) -> str:
    md = ["| bits | mode | order | " + " | ".join(f"FP @{L}" for L in a.lengths) + " | "
          + " | ".join(f"FP+scales @{L}" for L in a.lengths) + " | "
          + " | ".join(f"PTQ @{L}" for L in a.lengths) + " | " + " | ".join(f"PTQ+Q-ROAR @{L}" for L in a.lengths)
          + " | held-out objective | scales |",
          "|---|---|---|" + "---|" * (4 * len(a.lengths) + 2)]
    for r in runs:
        h = {(x["variant"], x["length"]): x["ppl"] for x in r["heldout"]}
        fs = {int(k): v for k, v in r["fp_scaled"].items()}
        cells = [f"{h[('fp', L)]:.2f}" for L in a.lengths]
        cells += [f"{fs[L]:.2f} ({100 * (fs[L] / h[('fp', L)] - 1):+.1f}%)" for L in a.lengths]
        cells += [f"{h[('quant', L)]:.2f}" for L in a.lengths]
        cells += [f"{h[('quant_scaled', L)]:.2f} ({100 * (h[('quant_scaled', L)] / h[('quant', L)] - 1):+.1f}%)" for L in a.lengths]
        gain = f"{r['gain_pct']:+.2f}%" + (" (invariant: rounding only)" if r["note"] else "")
        md.append(f"| W{r['bits']} | {r['mode']} | {r['order']} | " + " | ".join(cells) + f" | {gain} | "
                  + ", ".join(f"{g:.3g}" for g in r["scales"]) + " |")
    return "\n".join(md)


def race(wb, a) -> tuple[dict, str]:
    """The same search exhaustive and raced (successive halving over dev documents): what each picks,
    its held-out result, the documents it evaluated and its time."""
    runs = []
    for bits in _setups(wb, a):
        for raced in (False, True):
            cfg = SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=tuple(a.lengths),
                               max_windows_per_doc=a.max_windows, heldout_corpus=a.corpus, strategy="race" if raced else "grid", nested=a.nested)
            t = time.perf_counter()
            r = search(wb, cfg)
            wb.set_scales(None)
            runs.append(dict(bits=bits, race=raced, scales=[round(x, 4) for x in r.scales], seconds=time.perf_counter() - t,
                             doc_evaluations=r.doc_evaluations, gain_pct=100 * r.heldout_gain(),
                             dev_objective=r.objective["dev"], heldout_objective=r.objective["heldout"]))
            print(f"  w{bits} race={raced}: {runs[-1]['gain_pct']:+.3f}% held-out, {r.doc_evaluations} documents, "
                  f"{runs[-1]['seconds']:.0f}s", flush=True)
    md = ["| bits | search | document evaluations | seconds | dev objective change | held-out objective change | scales |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        dev = 100 * (math.exp(r["dev_objective"]["quant_scaled"] - r["dev_objective"]["quant"]) - 1)
        md.append(f"| W{r['bits']} | {'racing' if r['race'] else 'exhaustive'} | {r['doc_evaluations']} | {r['seconds']:.0f} | "
                  f"{dev:+.3f}% | {r['gain_pct']:+.3f}% | " + ", ".join(f"{g:.3g}" for g in r["scales"]) + " |")
    return {"runs": runs}, "\n".join(md)


def search_methods(wb, a, save=None) -> tuple[dict, str]:
    """Every search strategy of a.strategies on the same setting (shared mode, scales before quantization): the
    held-out change, the FP + scales control on the same held-out documents, the work each spent and its time,
    and with --folds the k-fold spread of the chosen scales (mean over bands, or layers x bands, of the std)."""
    runs = []
    for bits in _setups(wb, a):
        for strategy in a.strategies:
            cfg = SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=tuple(a.lengths),
                               max_windows_per_doc=a.max_windows, heldout_corpus=a.corpus, strategy=strategy,
                               nested=a.nested, k_folds=a.folds, layer_groups=a.layer_groups, grad_steps=a.steps)
            wb.set_scales([1.0] * wb.bands.n_bands, ScaleConfig("shared", "before"))
            t = time.perf_counter()
            r = search(wb, cfg)
            secs = time.perf_counter() - t
            wb.set_scales(None)
            held = r.objective["heldout"]
            spread = None if r.folds is None else float(r.folds["std"].mean())
            runs.append(dict(bits=bits, strategy=strategy, layer_groups=a.layer_groups if strategy == "layer" else None,
                             scales=r.scales, seconds=secs, spent=r.spent, unit=r.unit, evaluations=r.evaluations,
                             doc_evaluations=r.doc_evaluations, gain_pct=100 * r.heldout_gain(),
                             dev_pct=100 * r.objective_change(r.objective["dev"]["quant_scaled"], r.objective["dev"]["quant"]),
                             control_pct=100 * r.objective_change(held["fp_scaled"], held["fp"]), fold_std=spread,
                             heldout=json.loads(r.heldout.to_json(orient="records")), objective=r.objective,
                             folds=None if r.folds is None else json.loads(r.folds.to_json(orient="records"))))
            print(f"  w{bits} {strategy}: held-out {runs[-1]['gain_pct']:+.3f}%, control {runs[-1]['control_pct']:+.3f}%, "
                  f"{r.spent} {r.unit}, {secs:.0f}s", flush=True)
            if save:
                save({"runs": runs}, _methods_md(runs))
    return {"runs": runs}, _methods_md(runs)


def _methods_md(runs) -> str:
    md = ["| bits | search | dev change | held-out change | control: FP + scales vs FP (held-out) | k-fold std of the scales "
          "| work | document evaluations | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        name = r["strategy"] + (f" ({r['layer_groups']} layer groups)" if r["layer_groups"] else "")
        std = "" if r["fold_std"] is None else f"{r['fold_std']:.4f}"
        md.append(f"| W{r['bits']} | {name} | {r['dev_pct']:+.3f}% | {r['gain_pct']:+.3f}% | {r['control_pct']:+.3f}% | {std} "
                  f"| {r['spent']} {r['unit']} | {r['doc_evaluations']} | {r['seconds']:.0f} |")
    return "\n".join(md)


def gradient(wb, a) -> tuple[dict, str]:
    """Grid, racing and gradient search on the same settings: held-out change, the FP + scales control (the
    chosen scales on the full-precision model, held-out, against FP), the work each spent and its time."""
    runs = []
    for bits in _setups(wb, a):
        for strategy in (a.strategies if isinstance(a.strategies, list) else a.strategies.split(",")):
            cfg = SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=tuple(a.lengths), max_windows_per_doc=a.max_windows,
                               heldout_corpus=a.corpus, strategy=strategy, nested=a.nested, grad_steps=a.steps)
            t = time.perf_counter()
            r = search(wb, cfg)
            secs = time.perf_counter() - t
            wb.set_scales(None)
            o = r.objective["heldout"]
            runs.append(dict(bits=bits, strategy=strategy, scales=[round(x, 4) for x in r.scales], seconds=secs,
                             unit=r.unit, spent=r.spent, evaluations=r.evaluations, doc_evaluations=r.doc_evaluations,
                             steps=int(r.history["step"].max()) if strategy == "grad" and len(r.history) else None,
                             gain_pct=100 * r.heldout_gain(),
                             dev_change_pct=100 * r.objective_change(r.objective["dev"]["quant_scaled"], r.objective["dev"]["quant"]),
                             control_pct=100 * r.objective_change(o["fp_scaled"], o["fp"]),
                             dev_objective=r.objective["dev"], heldout_objective=o,
                             history=json.loads(r.history.to_json(orient="records"))))
            print(f"  w{bits} {strategy}: {runs[-1]['gain_pct']:+.3f}% held-out, {r.spent} {r.unit}, {secs:.0f}s", flush=True)
    md = ["| bits | search | work | document forwards | seconds | dev objective change | held-out objective change "
          "| FP + scales vs FP (control) | scales |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        md.append(f"| W{r['bits']} | {r['strategy']} | {r['spent']} {r['unit']} | {r['doc_evaluations']} | {r['seconds']:.0f} | "
                  f"{r['dev_change_pct']:+.3f}% | {r['gain_pct']:+.3f}% | {r['control_pct']:+.3f}% | "
                  + ", ".join(f"{g:.3g}" for g in r["scales"]) + " |")
    return {"runs": runs}, "\n".join(md)


EXPERIMENTS = {"coupling": coupling, "quantizers": quantizers, "qroar": qroar, "race": race, "search-methods": search_methods,
               "gradient": gradient}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=list(EXPERIMENTS))
    ap.add_argument("--model", default="qroar-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", help="fp32 keeps the full-precision baseline exact")
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--pi", default="yarn", help="PI for the qroar experiment")
    ap.add_argument("--method", default="rtn", help="quantizer for the qroar experiment")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--corpus", default="embedded:heldout")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=7)
    ap.add_argument("--sweeps", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=None)
    ap.add_argument("--bits", default="4,3", help="qroar: weight bits to search, comma-separated")
    ap.add_argument("--configs", default="shared/before,shared/after,symmetric/before,symmetric/after",
                    help="qroar: mode/order pairs to search, comma-separated")
    ap.add_argument("--race", action="store_true", help="qroar: racing search (successive halving over dev documents)")
    ap.add_argument("--nested", action="store_true", help="qroar/race: every length from one forward at the longest")
    ap.add_argument("--strategies", default="grid,race,layer,grad", help="search-methods: search strategies, comma-separated")
    ap.add_argument("--layer-groups", type=int, default=4, help="search-methods: layer groups of the layer strategy")
    ap.add_argument("--folds", type=int, default=0, help="search-methods: k-fold stability (0 = off)")
    ap.add_argument("--steps", type=int, default=20, help="search-methods / gradient: most steps of the grad strategy")
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    ap.add_argument("--out", default="docs/results")
    a = ap.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.bits = [int(x) for x in a.bits.split(",")]
    a.configs = a.configs.split(",")
    a.strategies = a.strategies.split(",")
    t = time.perf_counter()
    wb = Workbench.open(a.model, device=a.device, dtype=a.dtype)
    print(f"{a.experiment} on {wb.info.name} ({wb.info.device}/{wb.info.dtype})", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"{a.experiment}-{wb.info.name.replace(':', '-')}" + (f"-{a.method}" if a.experiment in ("qroar", "race") and a.method != "rtn" else "")
            + (f"-{a.tag}" if a.tag else ""))

    def save(data, md):  # after every row of a long experiment, so a stopped run keeps what it measured
        meta = {"experiment": a.experiment, "model": wb.info.name, "device": wb.info.device, "dtype": wb.info.dtype,
                "args": {k: v for k, v in vars(a).items()}, "seconds": round(time.perf_counter() - t, 1),
                "command": "python scripts/experiments.py " + " ".join(sys.argv[1:])}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **data}, indent=1, default=float))
        (out / f"{stem}.md").write_text(f"<!-- {meta['command']} ({meta['device']}, {meta['dtype']}, {meta['seconds']} s) -->\n{md}\n")
        return meta

    fn = EXPERIMENTS[a.experiment]
    data, md = fn(wb, a, save) if a.experiment in ("qroar", "search-methods") else fn(wb, a)
    meta = save(data, md)
    print(md)
    print(f"wrote {out / stem}.json/.md in {meta['seconds']} s")


if __name__ == "__main__":
    main()
