"""Benchmarks for models and work spread over devices: prints a table and writes JSON.

  spread     one GPU vs N GPUs (one process each, qroar.distributed): perplexity with the documents
             spread, and a one-band search with its candidates spread. Launches itself under
             torchrun once per GPU count; every count must give the same perplexities and scales.
               python bench/distributed.py spread --model random:llama2-7b --gpus 1,2,4,8 --out bench/results/spread.json
  table      the issue-19 table on a 2-GPU host, one command (about 8 minutes on 2 H200s): perplexity with
             documents spread, the full racing search (8 bands x 7 candidates, 10 dev documents of 32K random
             tokens scored at 4K/16K/32K, nested; bench/run.py --cases search) on 1 and on 2 GPUs (same
             scales?), and one model split over both GPUs by layers (eval + diagnostics, peak per GPU) vs
             one GPU. --budget-s cuts the bands searched (the same on 1 and 2 GPUs) if it would not fit.
               python bench/distributed.py table --out bench/results/two_gpus.json
               python bench/distributed.py table --quick      # CPU, gloo, random:llama-tiny: checks the script
  placement  one model on one GPU vs the same weights split over cuda:0 and the CPU (device_map,
             CPU layers resident and run there): perplexity, diagnostics and a one-band search, same
             settings, results compared (fp32, so the only difference is the devices' rounding).
               python bench/distributed.py placement --gpu-layers 8 --out placement.json

Random-weight models time exactly like real ones; their perplexities are meaningless but must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar import distributed  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.search import SearchConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402


def one_band_windows(n_bands: int, band: int) -> list[tuple[float, float]]:
    """Candidates only in `band` (the others' window is [1, 1]): a one-band search."""
    return [(0.8, 1.25) if b == band else (1.0, 1.0) for b in range(n_bands)]


def setup(wb: Workbench, a) -> Workbench:
    wb.set_pi(PIConfig("yarn", float(a.factor)))
    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=128))
    wb.set_bands(BandConfig(n_bands=8))
    wb.set_scales([1.0] * 8)
    return wb


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- spread: 1 vs N GPUs


def spread_worker(a) -> None:
    """One process of a torchrun job: time perplexity and a one-band search, rank 0 writes JSON."""
    ranks = distributed.init()
    wb = setup(Workbench.open(a.model, device=ranks.device, dtype=a.dtype), a)
    tc = wb.info.trained_context
    lengths = tuple(int(x) for x in a.lengths.split(",")) if a.lengths else (tc, 4 * tc)
    ev = EvalConfig(lengths=lengths, max_windows_per_doc=a.max_windows)
    distributed.perplexity(wb, a.corpus, EvalConfig(lengths=(lengths[0],), max_windows_per_doc=1), ranks)  # warm-up
    sync()
    t = time.perf_counter()
    table = distributed.perplexity(wb, a.corpus, ev, ranks, variants=("quant",))
    sync()
    ppl_s = time.perf_counter() - t
    cfg = SearchConfig(n_candidates=a.candidates, lengths=lengths, dev_corpus=a.dev, heldout_corpus=a.corpus,
                       max_windows_per_doc=a.max_windows)
    t = time.perf_counter()
    res = distributed.search(wb, cfg, ranks, one_band_windows(8, a.band))
    sync()
    search_s = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if ranks.is_main:
        Path(a.json).write_text(json.dumps({
            "gpus": ranks.world_size, "perplexity_s": ppl_s, "search_s": search_s, "search_evaluations": res.evaluations,
            "tokens": int(table["tokens"].sum()), "nll": table["nll"].tolist(), "scales": res.scales,
            "peak_gib_rank0": peak, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
    ranks.close()


def spread(a) -> list[dict]:
    rows = []
    for n in [int(x) for x in a.gpus.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "spread-worker", "--json", out, *sys.argv[2:]]
        subprocess.run(cmd, check=True)
        rows.append(json.loads(Path(out).read_text()))
    one = rows[0]
    for r in rows:
        r["perplexity_speedup"] = one["perplexity_s"] / r["perplexity_s"]
        r["search_speedup"] = one["search_s"] / r["search_s"]
        r["max_rel_nll_diff"] = max(abs(x - y) / abs(y) for x, y in zip(r["nll"], one["nll"]))
        r["same_scales"] = r["scales"] == one["scales"]
    print(f"{'gpus':>5} {'ppl s':>8} {'x':>6} {'search s':>9} {'x':>6} {'evals':>6} {'nll diff':>9} {'same scales':>12}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['perplexity_s']:>8.2f} {r['perplexity_speedup']:>6.2f} {r['search_s']:>9.2f} "
              f"{r['search_speedup']:>6.2f} {r['search_evaluations']:>6} {r['max_rel_nll_diff']:>9.1e} {r['same_scales']!s:>12}")
    return rows


# ----------------------------------------------------------------------------- table: the issue's 1 vs 2 GPUs


def random_doc(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def race_setup(wb: Workbench, a, n_bands_searched: int):
    """bench/run.py's search case: random dev / held-out documents of the longest length, RTN w4 g128,
    8 bands, windows from IP; bands from n_bands_searched on are held at 1 (window [1, 1])."""
    from qroar.search import windows_for
    from qroar.workbench import Corpus

    lengths = tuple(int(x) for x in a.search_lengths.split(","))
    docs = [random_doc(max(lengths), wb.info.vocab_size, seed=100 + i) for i in range(a.search_docs + a.search_heldout)]
    wb._corpora["bench:dev"] = Corpus("bench:dev", [f"dev{i}" for i in range(a.search_docs)], docs[:a.search_docs])
    wb._corpora["bench:held"] = Corpus("bench:held", [f"held{i}" for i in range(a.search_heldout)], docs[a.search_docs:])
    windows = windows_for(wb)
    windows.loc[windows["band"] >= n_bands_searched, ["g_min", "g_max"]] = 1.0
    cfg = SearchConfig(n_candidates=7, sweeps=1, lengths=lengths, dev_corpus="bench:dev", heldout_corpus="bench:held",
                       max_windows_per_doc=1, strategy="race", nested=True)
    return cfg, windows


def table_worker(a) -> None:
    """One process of a torchrun job (1 or 2 processes): perplexity spread, then the racing search; rank 0 writes JSON."""
    from qroar.search import _race_budget

    ranks = distributed.init()
    t = time.perf_counter()
    wb = setup(Workbench.open(a.model, device=ranks.device, dtype=a.dtype), a)
    load_s = time.perf_counter() - t
    tc = wb.info.trained_context
    lengths = tuple(int(x) for x in a.lengths.split(",")) if a.lengths else (tc, 4 * tc)
    ev = EvalConfig(lengths=lengths, max_windows_per_doc=a.max_windows)
    distributed.perplexity(wb, a.corpus, EvalConfig(lengths=(lengths[0],), max_windows_per_doc=1), ranks, variants=("quant",))
    sync()
    t = time.perf_counter()
    table = distributed.perplexity(wb, a.corpus, ev, ranks, variants=("quant",))
    sync()
    ppl_s = time.perf_counter() - t
    bands = a.search_bands
    cfg, windows = race_setup(wb, a, bands)
    est = None
    if a.budget_s and ranks.world_size == 1:  # the first (1-GPU) job picks how many bands fit; the 2-GPU job gets the same
        doc = wb.corpus("bench:dev").subset(["dev0"])
        wb.evaluate(doc, EvalConfig(lengths=cfg.lengths, max_windows_per_doc=1, nested=True), "quant")
        sync()
        t = time.perf_counter()
        wb.evaluate(doc, EvalConfig(lengths=cfg.lengths, max_windows_per_doc=1, nested=True), "quant")
        sync()
        t_doc = time.perf_counter() - t
        fixed = 2 * a.search_docs + 4 * a.search_heldout
        while bands > 1:  # racing's worst case x 0.75 (it rarely spends it), then the same again at half speed
            est = (0.75 * _race_budget(a.search_docs, [6] * bands, cfg) + fixed) * t_doc
            if est * 1.5 <= a.budget_s - a.reserve_s:
                break
            bands -= 1
        if bands != a.search_bands:
            cfg, windows = race_setup(wb, a, bands)
        est = {"doc_forward_s": t_doc, "search_estimate_s": est, "bands_searched": bands}
    sync()
    t = time.perf_counter()
    res = distributed.search(wb, cfg, ranks, windows)
    sync()
    search_s = time.perf_counter() - t
    grad = None
    if a.grad_steps:  # the gradient search on the same documents: each step's grad_batch windows split over the GPUs
        from dataclasses import replace as _replace

        wb.set_scales(None)
        gcfg = _replace(cfg, strategy="grad", nested=False, grad_steps=a.grad_steps, grad_batch=a.grad_batch,
                        grad_every=a.grad_steps, grad_val=0.1)
        sync()
        t = time.perf_counter()
        g = distributed.search(wb, gcfg, ranks, windows)
        sync()
        grad = {"search_s": time.perf_counter() - t, "scales": g.scales, "steps": a.grad_steps, "grad_batch": a.grad_batch,
                "heldout_quant_scaled": g.objective["heldout"].get("quant_scaled")}
    peaks = ranks.gather(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    if ranks.is_main:
        Path(a.json).write_text(json.dumps({
            "gpus": ranks.world_size, "load_s": load_s, "perplexity_s": ppl_s, "tokens": int(table["tokens"].sum()),
            "nll": table["nll"].tolist(), "lengths": list(lengths), "search_s": search_s, "bands_searched": bands,
            "grad": grad,
            "scales": res.scales, "doc_evaluations": res.doc_evaluations, "budget": res.budget, "estimate": est,
            "search_lengths": list(cfg.lengths), "dev_docs": a.search_docs, "peak_gib_per_gpu": peaks,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
    ranks.close()


def halves_map(n_layers: int) -> dict:
    """Layers split in two over cuda:0 and cuda:1 (embeddings first, norm and head last): the balanced split."""
    half = n_layers // 2
    return {"model.embed_tokens": 0, "model.rotary_emb": 0, **{f"model.layers.{i}": 0 if i < half else 1 for i in range(n_layers)},
            "model.norm": 1, "lm_head": 1}


def split_run(a) -> dict:
    """One process: the model on cuda:0, then the same weights split by layers over cuda:0 and cuda:1; eval
    (quant, the perplexity lengths) and diagnostics timed, peak memory per GPU, results compared."""
    from qroar.diagnostics import DiagConfig, run_diagnostics

    out, got = {}, {}
    for name, kw in (("one GPU", dict(device="cuda:0")), ("two GPUs, split by layers", dict(device_map="halves"))):
        torch.cuda.init()  # the peak counters of a device exist once CUDA is initialised in this process
        for i in range(2):
            torch.cuda.reset_peak_memory_stats(i)
        if kw.get("device_map") == "halves":
            from qroar.models import RANDOM_SHAPES

            kw = dict(device_map=halves_map(RANDOM_SHAPES[a.model.split(":", 1)[1]]["num_hidden_layers"])
                      if a.model.startswith("random:") else "balanced")
        wb = setup(Workbench.open(a.model, dtype=a.dtype, **kw), a)
        tc = wb.info.trained_context
        lengths = tuple(int(x) for x in a.lengths.split(",")) if a.lengths else (tc, 4 * tc)
        ev = EvalConfig(lengths=lengths, max_windows_per_doc=a.max_windows)
        wb.perplexity(a.corpus, EvalConfig(lengths=(lengths[0],), max_windows_per_doc=1), ("quant",))  # warm-up
        sync()
        t = time.perf_counter()
        ppl = wb.perplexity(a.corpus, ev, ("quant",))
        sync()
        ppl_s = time.perf_counter() - t
        t = time.perf_counter()
        diag = run_diagnostics(wb, a.dev, DiagConfig(bands=BandConfig(n_bands=8), n_docs=2))
        sync()
        diag_s = time.perf_counter() - t
        got[name] = (ppl, diag)
        out[name] = {"perplexity_s": ppl_s, "diagnostics_s": diag_s, "devices": {d: v["modules"] for d, v in wb.info.devices.items()},
                     "peak_gib_per_gpu": [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(2)]}
        del wb
        torch.cuda.empty_cache()
    (pa, da), (pb, db) = got.values()
    rel = lambda x, y: float(((x - y).abs() / y.abs().clip(lower=1e-12)).max())  # noqa: E731
    out["comparison"] = {"nll_max_rel_diff": rel(pb["nll"], pa["nll"]), "tir_max_rel_diff": rel(db.tables["tir"]["tir"], da.tables["tir"]["tir"]),
                         "tir_identical": bool((db.tables["tir"]["tir"].values == da.tables["tir"]["tir"].values).all())}
    return out


def two_gpu_table(a) -> dict:
    t0 = time.perf_counter()
    runs = {}
    for n in (1, 2):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        argv = [x for x in sys.argv[2:] if x != "--quick"] + list(a._quick_args)
        if n == 2:
            argv += ["--search-bands", str(runs[1]["bands_searched"]), "--budget-s", "0"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "table-worker", "--json", out, *argv]
        subprocess.run(cmd, check=True)
        runs[n] = json.loads(Path(out).read_text())
        print(f"{n} process(es): done after {time.perf_counter() - t0:.0f}s", flush=True)
    one, two = runs[1], runs[2]
    res = {"runs": runs,
           "perplexity": {"one_s": one["perplexity_s"], "two_s": two["perplexity_s"], "speedup": one["perplexity_s"] / two["perplexity_s"],
                          "nll_max_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(two["nll"], one["nll"]))},
           "search": {"one_s": one["search_s"], "two_s": two["search_s"], "speedup": one["search_s"] / two["search_s"],
                      "same_scales": one["scales"] == two["scales"], "bands_searched": one["bands_searched"],
                      "doc_evaluations": [one["doc_evaluations"], two["doc_evaluations"]]}}
    if one.get("grad"):
        g1, g2 = one["grad"], two["grad"]
        res["grad"] = {"one_s": g1["search_s"], "two_s": g2["search_s"], "speedup": g1["search_s"] / g2["search_s"],
                       "steps": g1["steps"], "grad_batch": g1["grad_batch"],
                       "scales_max_abs_diff": max(abs(x - y) for x, y in zip(g1["scales"], g2["scales"]))}
    if torch.cuda.device_count() >= 2:
        res["split"] = split_run(a)
    else:
        res["split"] = {"skipped": f"{torch.cuda.device_count()} GPU(s) visible: the split over two GPUs needs two"}
    res["total_s"] = time.perf_counter() - t0
    p, s = res["perplexity"], res["search"]
    print("\n| what | 1 GPU | 2 GPUs | speed-up | agreement |\n|---|---|---|---|---|")
    print(f"| perplexity, documents spread | {p['one_s']:.2f} s | {p['two_s']:.2f} s | {p['speedup']:.2f}x | NLL max rel. diff {p['nll_max_rel_diff']:.1e} |")
    print(f"| racing search, {s['bands_searched']} bands x 7 candidates, {one['dev_docs']} dev docs at "
          f"{'/'.join(map(str, one['search_lengths']))} | {s['one_s']:.1f} s | {s['two_s']:.1f} s | {s['speedup']:.2f}x | "
          f"same scales: {s['same_scales']} |")
    if "grad" in res:
        g = res["grad"]
        print(f"| gradient search, {g['steps']} steps of {g['grad_batch']} windows, same documents, tables included | "
              f"{g['one_s']:.1f} s | {g['two_s']:.1f} s | {g['speedup']:.2f}x | scales max abs. diff {g['scales_max_abs_diff']:.1e} |")
    sp = res["split"]
    if "skipped" not in sp:
        a1, a2 = sp["one GPU"], sp["two GPUs, split by layers"]
        c = sp["comparison"]
        print(f"| one model split over both GPUs: eval | {a1['perplexity_s']:.2f} s | {a2['perplexity_s']:.2f} s | | NLL max rel. diff {c['nll_max_rel_diff']:.1e} |")
        print(f"| one model split over both GPUs: diagnostics | {a1['diagnostics_s']:.2f} s | {a2['diagnostics_s']:.2f} s | | "
              f"TIR identical: {c['tir_identical']} (max rel. diff {c['tir_max_rel_diff']:.1e}) |")
        print(f"| peak GiB per GPU (split) | {a1['peak_gib_per_gpu'][0]:.1f} | {a2['peak_gib_per_gpu'][0]:.1f} + {a2['peak_gib_per_gpu'][1]:.1f} | | |")
    else:
        print(f"| one model split over both GPUs | {sp['skipped']} | | | |")
    print(f"search peak GiB per GPU: 1 GPU {one['peak_gib_per_gpu']}, 2 GPUs {two['peak_gib_per_gpu']}; total {res['total_s']:.0f}s")
    return res


# ----------------------------------------------------------------------------- placement: GPU vs GPU + CPU


def mid_llama(folder: Path, layers: int, trained: int, hidden: int = 2048) -> str:
    """A ~0.9B-parameter random Llama (GQA 16/4 heads, head_dim 128) saved with the embedded tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qroar.models import EMBEDDED_MODEL

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), max_position_embeddings=trained,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(folder)
    return str(folder)


def small_corpus(folder: Path, spec: str, n: int) -> str:
    """The first n documents of an embedded corpus as a folder of text files (a short dev set)."""
    from qroar.data import load_corpus

    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(load_corpus(spec)[:n]):
        (folder / f"doc{i}.txt").write_text(d.text)
    return str(folder)


def placement(a) -> list[dict]:
    from qroar.diagnostics import DiagConfig, run_diagnostics
    from qroar.search import search

    root = Path(tempfile.mkdtemp(prefix="qroar-placement-"))
    t = time.perf_counter()
    path = mid_llama(root / "model", a.layers, a.trained, a.hidden)
    dev, held = small_corpus(root / "dev", "embedded:dev", 2), small_corpus(root / "held", "embedded:heldout", 2)
    print(f"built and saved the model in {time.perf_counter() - t:.1f}s")
    n, k = a.layers, a.gpu_layers
    g = int(a.gpu) if a.gpu.isdigit() else a.gpu  # "cpu" only to try the script where no GPU is
    gpu = f"cuda:{g}" if isinstance(g, int) else g
    split = {"model.embed_tokens": g, "model.rotary_emb": g, "lm_head": g,
             **{f"model.layers.{i}": g if i < k else "cpu" for i in range(n)}, "model.norm": "cpu"}
    lengths = (a.trained, 2 * a.trained)
    ev = EvalConfig(lengths=lengths, max_windows_per_doc=1, batch_size=1)
    dcfg = DiagConfig(bands=BandConfig(n_bands=8), capture_length=2 * a.trained, n_docs=2, noise_layers=(0, n - 1))
    scfg = SearchConfig(n_candidates=5, lengths=lengths, dev_corpus=dev, heldout_corpus=held, max_windows_per_doc=1)
    rows, results = [], {}
    cuda = gpu.startswith("cuda")
    for name, kw in (("gpu", dict(device=gpu)), ("gpu+cpu", dict(device_map=split))):
        t = time.perf_counter()
        wb = setup(Workbench.open(path, dtype="fp32", **kw), a)
        load_s = time.perf_counter() - t
        row = {"placement": name, "load_s": load_s, "devices": wb.info.devices}
        t = time.perf_counter()
        ppl = wb.perplexity(held, ev, ("fp", "quant"))
        sync()
        row["perplexity_s"] = time.perf_counter() - t
        t = time.perf_counter()
        diag = run_diagnostics(wb, dev, dcfg)
        sync()
        row["diagnostics_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res = search(wb, scfg, one_band_windows(8, a.band))
        sync()
        row.update(search_s=time.perf_counter() - t, scales=res.scales, heldout=res.heldout.to_dict(orient="records"),
                   ppl=ppl.to_dict(orient="records"), gpu_peak_gib=torch.cuda.max_memory_allocated(gpu) / 2**30 if cuda else 0.0)
        results[name] = (ppl, diag, res)
        rows.append(row)
        del wb
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(gpu)
    (pa, da, ra), (pb, db, rb) = results["gpu"], results["gpu+cpu"]
    rel = lambda x, y: float(((x - y).abs() / y.abs().clip(lower=1e-12)).max())  # noqa: E731
    cmp = {"perplexity_max_rel_diff": rel(pb["nll"], pa["nll"]),
           "tir_max_rel_diff": rel(db.tables["tir"]["tir"], da.tables["tir"]["tir"]),
           "quant_error_max_rel_diff": rel(db.tables["quant_error"]["rel_err"], da.tables["quant_error"]["rel_err"]),
           "logit_noise_max_rel_diff": rel(db.tables["logit_noise"]["rms_err"], da.tables["logit_noise"]["rms_err"]),
           "search_same_scales": ra.scales == rb.scales,
           "search_heldout_max_rel_diff": rel(rb.heldout["log_ppl"], ra.heldout["log_ppl"])}
    print(f"{'placement':>10} {'load s':>7} {'ppl s':>7} {'diag s':>7} {'search s':>9} {'GPU peak GiB':>13}  scales")
    for r in rows:
        print(f"{r['placement']:>10} {r['load_s']:>7.1f} {r['perplexity_s']:>7.2f} {r['diagnostics_s']:>7.2f} "
              f"{r['search_s']:>9.2f} {r['gpu_peak_gib']:>13.2f}  {[round(g, 4) for g in r['scales']]}")
    print("devices (gpu+cpu):", {d: v["modules"] for d, v in rows[1]["devices"].items()})
    print(json.dumps(cmp, indent=1))
    return [*rows, {"comparison": cmp}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=("spread", "spread-worker", "table", "table-worker", "placement"))
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to compare (spread)")
    p.add_argument("--corpus", default="embedded:heldout")
    p.add_argument("--dev", default="embedded:dev")
    p.add_argument("--lengths", default=None, help="comma-separated (default: 1x, 4x the trained context)")
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--candidates", type=int, default=9, help="per band: 8 besides 1.0, spread over the GPUs")
    p.add_argument("--band", type=int, default=3, help="the band searched")
    p.add_argument("--factor", type=float, default=4.0, help="YaRN factor")
    p.add_argument("--hidden", type=int, default=2048, help="placement: hidden size (intermediate 2.75x)")
    p.add_argument("--layers", type=int, default=16, help="placement: decoder layers of the random model")
    p.add_argument("--gpu-layers", type=int, default=8, help="placement: layers kept on the GPU (the rest on the CPU)")
    p.add_argument("--trained", type=int, default=512, help="placement: trained context of the random model")
    p.add_argument("--gpu", default="0", help="placement: the GPU index")
    p.add_argument("--json", default=None, help="spread-worker / table-worker: where rank 0 writes its figures")
    p.add_argument("--search-lengths", default="4096,16384,32768", help="table: the racing search's lengths")
    p.add_argument("--search-docs", type=int, default=10, help="table: dev documents of the racing search")
    p.add_argument("--search-heldout", type=int, default=4, help="table: held-out documents of the racing search")
    p.add_argument("--search-bands", type=int, default=8, help="table: bands searched (the rest held at 1)")
    p.add_argument("--budget-s", type=float, default=540, help="table: seconds for the whole command; fewer bands are "
                   "searched if the 1-GPU estimate says it would not fit (0: no limit)")
    p.add_argument("--reserve-s", type=float, default=120, help="table: seconds kept for loads, perplexity and the split")
    p.add_argument("--grad-steps", type=int, default=0, help="table: also a gradient search of this many steps (0: none)")
    p.add_argument("--grad-batch", type=int, default=2, help="table: windows per gradient step (split over the GPUs)")
    p.add_argument("--quick", action="store_true", help="table: random:llama-tiny, short lengths, CPU-sized (checks the script)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "distributed_bench.json"))
    a = p.parse_args()
    quick = ["--model", "random:llama-tiny", "--lengths", "256,512", "--search-lengths", "128,256",
             "--search-docs", "4", "--search-heldout", "2", "--max-windows", "1", "--budget-s", "0"]
    if a.quick:  # small enough for two CPU processes (gloo) in about a minute
        a = p.parse_args([x for x in sys.argv[1:] if x != "--quick"] + quick)
    a._quick_args = quick if "--quick" in sys.argv else []
    if a.case == "spread-worker":
        return spread_worker(a)
    if a.case == "table-worker":
        return table_worker(a)
    rows = {"spread": spread, "table": two_gpu_table, "placement": placement}[a.case](a)
    Path(a.out).write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
