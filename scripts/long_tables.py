"""Long-context tables on a GPU server: many `qroar` commands as jobs over the GPUs, then tables.

Plans (each a list of jobs; a job is a few `python -m qroar ...` commands run in order, writing JSON):

  fidelity   issue-16 tables: SmolLM2 under YaRN x2 (to 16K) and x4 (to 32K), RTN W4/W3 g64 and AWQ W4:
             Q-ROAR searched with the perplexity objective and with the KL objective, then KL and
             same-top-token by position (`qroar fidelity`) and passkey heatmaps (`qroar retrieval`) of
             FP / PTQ / PTQ + scales / FP + scales, scales of both objectives.
  regime     issue-17 tables: the paper's regime, YaRN x4 (32K) and x8 (64K) and linear x4: the coupling
             table (FP, PTQ, penalty) for RTN W4 per channel, RTN W4 g64, AWQ W4 g64, RTN W3 g64, per
             document role; Q-ROAR (shared mode, racing, 3-fold stability) with the FP + scales control;
             diagnostics (TIR, logit noise by distance) at x4 and x8.
  probe      a short timing probe on a random SmolLM2-shaped model (no weights needed).

  python scripts/long_tables.py run --plan fidelity,regime --gpus 0,1 --per-gpu 4 --work WORK [--quick]
  python scripts/long_tables.py collect --work WORK --out docs/results

`run` starts every job as soon as a slot (GPU, k) is free, longest first, and keeps each job's log and
outputs under WORK/<job>/; a job whose outputs exist is skipped, so a stopped run resumes. `collect`
reads them and writes docs/results/<plan>-<model>.json and .md. --quick shrinks every setting so the
whole flow runs on a CPU with the embedded model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUANTS = {  # name -> qroar arguments
    "rtn4-ch": ["--quant", "rtn", "--bits", "4", "--group-size", "0"],
    "rtn4-g64": ["--quant", "rtn", "--bits", "4", "--group-size", "64"],
    "awq4-g64": ["--quant", "awq", "--bits", "4", "--group-size", "64"],
    "rtn3-g64": ["--quant", "rtn", "--bits", "3", "--group-size", "64"],
}
QUANT_LABEL = {"rtn4-ch": "RTN W4 per channel", "rtn4-g64": "RTN W4 g64", "awq4-g64": "AWQ W4 g64", "rtn3-g64": "RTN W3 g64"}


class Job:
    def __init__(self, name: str, plan: str, cost: float, steps: list, meta: dict):
        self.name, self.plan, self.cost, self.steps, self.meta = name, plan, cost, steps, meta


def _q(*args) -> list[str]:
    return [sys.executable, "-m", "qroar", *[str(a) for a in args]]


def _csv(xs) -> str:
    return ",".join(str(x) for x in xs)


def plans(a) -> list[Job]:
    m, dev = a.model, ["--model", a.model, "--device", a.device, "--dtype", a.dtype]
    quick = a.quick
    jobs: list[Job] = []
    if "fidelity" in a.plan:
        settings = ([("x2", 2.0, [256, 512]), ("x4", 4.0, [256, 1024])] if quick else
                    [("x2", 2.0, [2048, 8192, 16384]), ("x4", 4.0, [2048, 8192, 16384, 32768])])
        ret_lengths = [256, 512] if quick else [8192, 16384, 32768]
        for tag, factor, lengths in settings:
            for qn in ("rtn4-g64", "rtn3-g64", "awq4-g64"):
                base = [*dev, "--pi", "yarn", "--factor", factor, *QUANTS[qn], "--bands", "8", "--mode", "shared",
                        "--order", "before"]
                if quick:
                    base += ["--calib-samples", "2", "--calib-len", "256"]
                search = ["--lengths", _csv(lengths), "--strategy", "race", "--nested", "--max-windows", "1", "--quiet"]
                steps = []
                for obj in ("ppl", "kld"):
                    steps.append(("search-" + obj, _q("search", *base, *search, "--objective", obj,
                                                      "--report", "{dir}/search-" + obj, "--out", "{dir}/scales-" + obj + ".json")))
                fid = ["--corpus", "embedded:heldout", "--lengths", _csv(lengths), "--max-docs", "2" if quick else "0", "--quiet"]
                ret = ["--lengths", _csv(ret_lengths), "--depths", "0,0.25,0.5,0.75,1", "--trials", "1" if quick else "4",
                       "--quiet"]
                steps.append(("fid-ppl", _q("fidelity", *base, *fid, "--scales", "{scales-ppl}",
                                            "--variants", "quant,quant_scaled,fp_scaled", "--out", "{dir}/fid-ppl")))
                steps.append(("fid-kld", _q("fidelity", *base, *fid, "--scales", "{scales-kld}",
                                            "--variants", "quant_scaled,fp_scaled", "--out", "{dir}/fid-kld")))
                steps.append(("ret-ppl", _q("retrieval", *base, *ret, "--scales", "{scales-ppl}",
                                            "--variants", "fp,quant,quant_scaled", "--out", "{dir}/ret-ppl")))
                steps.append(("ret-kld", _q("retrieval", *base, *ret, "--scales", "{scales-kld}",
                                            "--variants", "quant_scaled", "--out", "{dir}/ret-kld")))
                jobs.append(Job(f"fidelity-{tag}-{qn}", "fidelity", factor * (3 if qn.startswith("awq") else 2), steps,
                                dict(pi="yarn", factor=factor, quant=qn, lengths=lengths, ret_lengths=ret_lengths)))
    if "regime" in a.plan:
        pis = [("yarn-x4", "yarn", 4.0), ("yarn-x8", "yarn", 8.0), ("linear-x4", "linear", 4.0)]
        for tag, pi, factor in pis:
            lengths = ([256, 1024] if quick else [2048, 8192, 32768] + ([65536] if factor >= 8 else []))
            base = [*dev, "--pi", pi, "--factor", factor]
            ev = ["--corpus", "embedded:heldout", "--lengths", _csv(lengths), "--max-windows", "1" if quick else "2", "--quiet"]
            steps = []
            for qn, qa in QUANTS.items():
                extra = ["--calib-samples", "2", "--calib-len", "256"] if quick else []
                steps.append(("eval-" + qn, _q("eval", *base, *qa, *extra, *ev, "--out", "{dir}/eval-" + qn)))
            if pi == "yarn":
                for qn in ("rtn4-g64", "rtn3-g64"):
                    cap = [] if quick else ["--capture-length", int(factor * 8192), "--corpus", "embedded"]
                    steps.append(("diag-" + qn, _q("diagnose", *base, *QUANTS[qn], *(cap or ["--corpus", "embedded:heldout"]),
                                                   "--quiet", "--out", "{dir}/diag-" + qn)))
            jobs.append(Job(f"regime-{tag}", "regime", 2 * factor, steps, dict(pi=pi, factor=factor, lengths=lengths)))
            if pi != "yarn":
                continue
            # searches tune up to 32K: at 64K only two documents (both math) are long enough, one of them dev
            s_lengths = [L for L in lengths if L <= 32768]
            for qn, qa in QUANTS.items():
                extra = ["--calib-samples", "2", "--calib-len", "256"] if quick else []
                b = [*base, *qa, *extra, "--bands", "8", "--mode", "shared", "--order", "before"]
                folds = "2" if quick else ("3" if qn in a.fold_quants.split(",") else "0")
                steps = [("search", _q("search", *b, "--lengths", _csv(s_lengths), "--strategy", "race", "--nested",
                                       "--max-windows", "1", "--folds", folds, "--quiet",
                                       "--report", "{dir}/search", "--out", "{dir}/scales.json")),
                         ("eval", _q("eval", *b, "--scales", "{scales}", *ev, "--out", "{dir}/eval-scaled"))]
                jobs.append(Job(f"qroar-{tag}-{qn}", "regime", 4 * factor, steps,
                                dict(pi=pi, factor=factor, quant=qn, lengths=lengths)))
    if "methods" in a.plan:  # search methods compared on the same settings: grid, racing, per-layer, gradient
        settings = []
        for tag in a.method_settings.split(","):  # yarn-x<factor>-<quantizer>
            m = re.fullmatch(r"yarn-x(\d+)-(.+)", tag)
            if not m or m.group(2) not in QUANTS:
                raise SystemExit(f"--method-settings: {tag!r} is not yarn-x<factor>-<quantizer> with a quantizer of "
                                 f"{', '.join(QUANTS)}")
            settings.append((tag, float(m.group(1)), m.group(2)))
        steps_ = ["--steps", "4" if quick else "30"]
        extra = {"grid": [], "race": [], "layer": ["--layer-groups", "2" if quick else "4"], "grad": steps_, "grad-layer": steps_}
        cost = {"grid": 6, "layer": 9, "grad": 5, "grad-layer": 6, "race": 3}
        for tag, factor, qn in settings:
            lengths = [256, 1024] if quick else [2048, 8192, 32768]
            b = [*dev, "--pi", "yarn", "--factor", factor, *QUANTS[qn], "--bands", "8", "--mode", "shared", "--order", "before"]
            if quick:
                b += ["--calib-samples", "2", "--calib-len", "256"]
            ev = ["--corpus", "embedded:heldout", "--lengths", _csv(lengths), "--max-windows", "1" if quick else "2", "--quiet"]
            for strat in a.strategies.split(","):
                if strat not in extra:
                    raise SystemExit(f"--strategies: {strat!r} is not one of {', '.join(extra)}")
                nested = [] if strat.startswith("grad") else ["--nested"]
                # a checkpoint per job: a job stopped by a call's time limit resumes where it was when run again
                steps = [("search", _q("search", *b, "--lengths", _csv(lengths), "--strategy", strat, *nested, *extra[strat],
                                       "--max-windows", "1", "--folds", a.method_folds, "--checkpoint", "{dir}/search.ckpt.json",
                                       "--quiet", "--report", "{dir}/search", "--out", "{dir}/scales.json")),
                         ("eval", _q("eval", *b, "--scales", "{scales}", *ev, "--out", "{dir}/eval-scaled"))]
                jobs.append(Job(f"methods-{tag}-{strat}", "methods", cost[strat] * factor * (1 + int(a.method_folds)),
                                steps, dict(pi="yarn", factor=factor, quant=qn, strategy=strat, lengths=lengths)))
    if "precision" in a.plan:  # the same numbers in fp32, TF32 and bf16: which precision agrees with fp32
        lengths = [256, 1024] if quick else [8192, 32768]
        for dt in ("fp32", "tf32", "bf16"):
            d = ["--model", a.model, "--device", a.device, "--dtype", dt]
            steps = [(f"eval-{qn}", _q("eval", *d, "--pi", "yarn", "--factor", "4", *QUANTS[qn], "--corpus", "embedded:heldout",
                                       "--lengths", _csv(lengths), "--max-windows", "1", "--quiet", "--out", "{dir}/eval-" + qn))
                     for qn in ("rtn4-g64", "rtn3-g64")]
            jobs.append(Job(f"precision-{dt}", "precision", {"fp32": 6, "tf32": 4, "bf16": 1}[dt], steps, dict(dtype=dt)))
    if "probe" in a.plan:
        steps = [("probe", [sys.executable, str(ROOT / "scripts" / "long_tables.py"), "probe", "--device", a.device,
                            "--json", "{dir}/probe.json"])]
        jobs.append(Job("probe", "probe", 1, steps, {}))
    if a.only:
        jobs = [j for j in jobs if any(o in j.name for o in a.only.split(","))]
    return sorted(jobs, key=lambda j: -j.cost)


def _fill(cmd: list[str], d: Path) -> list[str]:
    out = []
    for c in cmd:
        c = c.replace("{dir}", str(d))
        for key in ("scales-ppl", "scales-kld", "scales"):
            if c == "{" + key + "}":
                sc = json.loads((d / f"{key}.json").read_text())["scales"]
                c = ";".join(_csv(r) for r in sc) if sc and isinstance(sc[0], list) else _csv(sc)  # per layer: rows by ";"
        out.append(c)
    return out


def run_job(job: Job, work: Path, gpu: str | None) -> dict:
    d = work / job.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps(job.meta, indent=1))
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env["PYTHONUNBUFFERED"] = "1"
    times = {}
    for step, cmd in job.steps:
        done = d / f"{step}.done"
        if done.exists():
            continue
        t = time.time()
        with open(d / f"{step}.log", "w") as log:
            cmd = _fill(cmd, d)
            shown = " ".join(["qroar", *cmd[3:]]).replace(str(d), f"WORK/{job.name}")  # without this machine's folders
            log.write("$ " + " ".join(cmd[1:]) + "\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        times[step] = round(time.time() - t, 1)
        if rc != 0:
            print(f"  {job.name}: {step} failed (rc {rc}), see {d / (step + '.log')}", flush=True)
            return {"job": job.name, "ok": False, "step": step, "times": times}
        done.write_text(json.dumps({"seconds": times[step], "command": shown}))
    print(f"  {job.name}: done {times}", flush=True)
    return {"job": job.name, "ok": True, "times": times}


def run(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = plans(a)
    gpus = a.gpus.split(",") if a.gpus else [None]
    slots: Queue = Queue()
    for k in range(a.per_gpu):
        for g in gpus:
            slots.put(g)
    t0 = time.time()

    def one(job):
        g = slots.get()
        try:
            if a.deadline and time.time() - t0 > a.deadline:
                return {"job": job.name, "ok": False, "step": "deadline"}
            return run_job(job, work, g)
        finally:
            slots.put(g)

    print(f"{len(jobs)} jobs on {len(gpus)} GPU(s) x {a.per_gpu} slots", flush=True)
    with ThreadPoolExecutor(max_workers=len(gpus) * a.per_gpu) as ex:
        results = list(ex.map(one, jobs))
    (work / "run.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1), "argv": sys.argv[1:], "jobs": results},
                                              indent=1))
    bad = [r for r in results if not r["ok"]]
    print(f"finished in {time.time() - t0:.0f} s; {len(results) - len(bad)} of {len(results)} jobs complete", flush=True)


# ----------------------------------------------------------------------------- the probe


def probe(a) -> None:
    """Seconds per forward of a random SmolLM2-shaped model at 8K-64K, fp32 (TF32 off / on) and bf16."""
    import torch

    from qroar.workbench import Workbench

    rows = []
    for dtype in ("fp32", "bf16"):
        wb = Workbench.open("random:smollm2-135m", device=a.device, dtype=dtype)
        for tf32 in ((False, True) if dtype == "fp32" else (False,)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for L in (8192, 32768, 65536):
                ids = torch.randint(0, 49152, (1, L), device=wb.device)
                with torch.no_grad():
                    wb.model.model(ids)
                    torch.cuda.synchronize()
                    t = time.time()
                    wb.model.model(ids)
                    torch.cuda.synchronize()
                rows.append(dict(dtype=dtype, tf32=tf32, length=L, seconds=round(time.time() - t, 3),
                                 peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
                print(rows[-1], flush=True)
        del wb
        torch.cuda.empty_cache()
    Path(a.json).write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------- tables


def _load(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def _roles() -> dict[str, str]:
    m = json.loads((ROOT / "assets" / "corpus" / "manifest.json").read_text())
    return {d["id"]: d["role"] for d in m["documents"]}


def _by_role(ev: dict, variant: str) -> dict:
    """{role or 'all': {length: ppl}} from an eval JSON's per-document rows (token-weighted)."""
    roles, acc = _roles(), {}
    for r in ev["results"]:
        if r["variant"] != variant:
            continue
        for key in (roles.get(r["doc"], "user"), "all"):
            a = acc.setdefault(key, {}).setdefault(int(r["length"]), [0.0, 0])
            a[0] += r["nll"]
            a[1] += r["tokens"]
    return {k: {L: math.exp(n / t) for L, (n, t) in sorted(v.items()) if t} for k, v in acc.items()}


def _cmd(d: Path, step: str) -> str:
    x = _load(d / f"{step}.done")
    return x["command"] if x else ""


def collect_regime(work: Path, model: str) -> tuple[dict, str]:
    data, md = {"coupling": [], "qroar": [], "diagnostics": []}, []
    md += ["## Coupling: FP, PTQ and the PTQ penalty by document role (held-out documents, 2 windows each)", "",
           "| PI | quantizer | role | " + " | ".join(f"@{L}" for L in (2048, 8192, 32768, 65536)) + " |",
           "|---|---|---|---|---|---|---|"]
    for job in sorted(work.glob("regime-*")):
        meta = _load(job / "meta.json")
        fp = None
        for qn in QUANTS:
            ev = _load(job / f"eval-{qn}.json")
            if ev is None:
                continue
            fpr, qr = _by_role(ev, "fp"), _by_role(ev, "quant")
            fp = fp or fpr
            for role in ("all", "gov", "math", "prose"):
                if role not in qr:
                    continue
                row = dict(pi=f"{meta['pi']} x{meta['factor']:g}", quant=qn, role=role,
                           fp={L: fp[role].get(L) for L in qr[role]}, ptq=qr[role], command=_cmd(job, "eval-" + qn))
                data["coupling"].append(row)
        for role in ("all", "gov", "math", "prose"):
            if fp and role in fp:
                md.append(f"| {meta['pi']} x{meta['factor']:g} | FP | {role} | "
                          + " | ".join(f"{fp[role][L]:.2f}" if L in fp[role] else "-" for L in (2048, 8192, 32768, 65536)) + " |")
        for row in data["coupling"]:
            if row["pi"] != f"{meta['pi']} x{meta['factor']:g}":
                continue
            cells = []
            for L in (2048, 8192, 32768, 65536):
                p, f = row["ptq"].get(L), row["fp"].get(L)
                cells.append(f"{p:.2f} ({100 * (p / f - 1):+.1f}%)" if p and f else "-")
            md.append(f"| {row['pi']} | {QUANT_LABEL[row['quant']]} | {row['role']} | " + " | ".join(cells) + " |")
        for qn in ("rtn4-g64", "rtn3-g64"):
            dg = _diag_summary(job / f"diag-{qn}")
            if dg is not None:
                data["diagnostics"].append(dict(pi=f"{meta['pi']} x{meta['factor']:g}", quant=qn, **dg,
                                                command=_cmd(job, "diag-" + qn)))
    md += ["", "## Q-ROAR (shared mode, 8 bands, racing + nested, tuned on dev documents up to 32K): held-out", "",
           "PTQ + scales vs PTQ per role from `qroar eval` (2 windows per document); the control (the same scales on FP, "
           "FP + scales vs FP) and the held-out objective from the search's own held-out table (1 window per document).", "",
           "| PI | quantizer | role | length | FP | PTQ | PTQ + scales | vs PTQ | control: FP + scales vs FP |",
           "|---|---|---|---|---|---|---|---|---|"]
    summary = ["", "| PI | quantizer | held-out objective vs PTQ | control (FP + scales vs FP) | scales | k-fold spread (max std) | "
               "document evaluations | search s |", "|---|---|---|---|---|---|---|---|"]
    for job in sorted(work.glob("qroar-*")):
        meta, rep, ev = _load(job / "meta.json"), _load(job / "search.json"), _load(job / "eval-scaled.json")
        if rep is None or ev is None:
            continue
        by = {v: _by_role(ev, v) for v in ("fp", "quant", "quant_scaled")}
        held = {(h["variant"], int(h["length"])): h["ppl"] for h in rep["heldout"]}
        control = {L: held[("fp_scaled", L)] / held[("fp", L)] - 1 for (v, L) in held if v == "fp_scaled"}
        o = rep["objective"]["heldout"]
        ctrl_obj = math.exp(o["fp_scaled"] - o["fp"]) - 1 if "fp_scaled" in o else float("nan")
        folds = rep.get("folds")
        spread = max((f.get("std") or 0) for f in folds) if folds else None
        row = dict(pi=f"{meta['pi']} x{meta['factor']:g}", quant=meta["quant"], scales=rep.get("scales"),
                   heldout_gain_pct=100 * _gain(rep), control_pct=100 * ctrl_obj, control_by_length=control,
                   folds=folds, fold_max_std=spread, seconds=rep.get("seconds"),
                   doc_evaluations=rep.get("doc_evaluations"), by_role=by, heldout=rep["heldout"],
                   commands=[_cmd(job, "search"), _cmd(job, "eval")])
        data["qroar"].append(row)
        summary.append(f"| {row['pi']} | {QUANT_LABEL[meta['quant']]} | {row['heldout_gain_pct']:+.2f}% | {row['control_pct']:+.2f}% | "
                       + ", ".join(f"{g:.3g}" for g in row["scales"]) + " | "
                       + ("-" if spread is None else f"{spread:.3f}") + f" | {row['doc_evaluations']} | {row['seconds']:.0f} |")
        for role in ("all", "gov", "math", "prose"):
            if role not in by["quant"]:
                continue
            for L in sorted(by["quant"][role]):
                f, q, qs = (by[v][role].get(L) for v in ("fp", "quant", "quant_scaled"))
                if None in (f, q, qs):
                    continue
                c = control.get(L) if role == "all" else None
                md.append(f"| {row['pi']} | {QUANT_LABEL[meta['quant']]} | {role} | {L} | {f:.2f} | {q:.2f} | "
                          f"{qs:.2f} | {100 * (qs / q - 1):+.2f}% | " + ("" if c is None else f"{100 * c:+.2f}%") + " |")
    md += ["", "### Search summary (length-weighted held-out objective)", *summary]
    if data["diagnostics"]:
        md += ["", "## Diagnostics at 4x and 8x the trained context (per band; band 0 = highest frequency)", "",
               "TIR_W / TIR_A: tail inflation ratio of the quantized model's q/k weights / activations, long window vs "
               "the trained context, mean over layers and q/k (1 = no inflation). Logit noise: relative error of the "
               "band's attention-logit contribution (PTQ vs FP, accumulated), at distances within the trained context "
               "and beyond half the capture length (16K at x4, 32K at x8).", "",
               "| PI | quantizer | band | IP at the capture length | TIR_W | TIR_A | logit noise < 8K | logit noise >= capture/2 |",
               "|---|---|---|---|---|---|---|---|"]
        for dg in data["diagnostics"]:
            for b in dg["bands"]:
                md.append(f"| {dg['pi']} | {QUANT_LABEL[dg['quant']]} | {b['band']} | {b['ip']:.3g} | {b['tir_w']:.3f} | "
                          f"{b['tir_a']:.3f} | {b['noise_short']:.3f} | {b['noise_long']:.3f} |")
    return data, "\n".join(md)


def _diag_summary(d: Path) -> dict | None:
    """Per band: IP at the capture length, mean TIR_W / TIR_A of the quantized model, logit noise near and far."""
    import pandas as pd

    if not (d / "tir.csv").exists():
        return None
    settings = json.loads((d / "diagnostics.json").read_text())["settings"]
    cap = settings["diag"]["capture_length"]
    tir, ip = pd.read_csv(d / "tir.csv"), pd.read_csv(d / "ip.csv")
    noise = pd.read_csv(d / "logit_noise_pooled.csv")
    noise = noise[noise["mode"] == "accumulated"]
    q = tir[tir["variant"] == "quant"].groupby(["kind", "band"])["tir"].mean()
    ipL = ip[ip["length"] == cap].set_index("band")["ip_mean"] if cap in set(ip["length"]) else ip.groupby("band")["ip_mean"].max()
    bands = []
    for b in sorted(tir["band"].unique()):
        nb = noise[noise["band"] == b]
        w = lambda sel: float((sel["rel_err"] * sel["n_pairs"]).sum() / sel["n_pairs"].sum()) if len(sel) else float("nan")  # noqa: E731
        bands.append(dict(band=int(b), ip=float(ipL.get(b, float("nan"))), tir_w=float(q.get(("W", b), float("nan"))),
                          tir_a=float(q.get(("A", b), float("nan"))), noise_short=w(nb[nb["bucket_hi"] < 8192]),
                          noise_long=w(nb[nb["bucket_lo"] >= cap // 2])))
    return {"capture_length": cap, "bands": bands}


def _gain(rep: dict) -> float:
    o = rep.get("objective", {}).get("heldout", {})
    if "quant_scaled" in o and "quant" in o:
        if rep.get("search_cfg", {}).get("objective") == "kld":
            return o["quant_scaled"] / o["quant"] - 1 if o["quant"] else float("nan")
        return math.exp(o["quant_scaled"] - o["quant"]) - 1
    return float("nan")


def collect_fidelity(work: Path, model: str) -> tuple[dict, str]:
    data, md = {"runs": []}, []
    for job in sorted(work.glob("fidelity-*")):
        meta = _load(job / "meta.json")
        run = dict(meta=meta, commands={s: _cmd(job, s) for s in ("search-ppl", "search-kld", "fid-ppl", "fid-kld",
                                                                    "ret-ppl", "ret-kld")})
        for obj in ("ppl", "kld"):
            rep = _load(job / f"search-{obj}.json")
            if rep is not None:
                run[f"search_{obj}"] = dict(scales=rep.get("scales"), objective=rep.get("objective"),
                                            heldout=rep.get("heldout"), gain_pct=100 * _gain(rep),
                                            seconds=rep.get("seconds"))
            for kind in ("fid", "ret"):
                x = _load(job / f"{kind}-{obj}.json")
                if x is not None:
                    run[f"{kind}_{obj}"] = {k: x[k] for k in ("overall", "buckets", "summary") if k in x}
        data["runs"].append(run)
    md.append("## Objectives compared: held-out perplexity change and KL to FP (fidelity runs), per setting\n")
    md.append("Held-out changes from each search's own held-out table (length-weighted); KL and same-top-token from "
              "`qroar fidelity` on the held-out documents at the longest length.\n")
    md.append("| PI | quantizer | objective | scales | ppl vs PTQ | KL vs PTQ | PTQ KL | PTQ + scales KL | FP + scales KL (control) | same top PTQ / +scales |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        m = r["meta"]
        for obj in ("ppl", "kld"):
            s, f = r.get(f"search_{obj}"), r.get(f"fid_{obj}")
            if s is None:
                continue
            kl = _overall(f, r.get("fid_ppl"), max(m["lengths"]))
            ppl_c, kl_c = _changes(s["heldout"])
            s["ppl_change_pct"], s["kl_change_pct"] = ppl_c, kl_c
            md.append(f"| yarn x{m['factor']:g} | {QUANT_LABEL[m['quant']]} | {obj} | "
                      + ", ".join(f"{g:.3g}" for g in (s["scales"] or [])) + f" | {ppl_c:+.2f}% | "
                      + ("-" if kl_c is None else f"{kl_c:+.2f}%") + f" | {kl} |")
    md.append("\n## KL to FP by position (mean KLD per position bucket, at the longest length; ppl-objective scales)\n")
    for r in data["runs"]:
        f = r.get("fid_ppl")
        if not f:
            continue
        m = r["meta"]
        md.append(f"**YaRN x{m['factor']:g}, {QUANT_LABEL[m['quant']]}**\n")
        md.append("| positions | in trained context | PTQ KL | PTQ + scales KL | FP + scales KL | same top PTQ | same top PTQ + scales |")
        md.append("|---|---|---|---|---|---|---|")
        rows = [b for b in f["buckets"] if b.get("reference", "fp") == "fp"]
        for lo_hi in sorted({(b["pos_lo"], b["pos_hi"]) for b in rows}):
            cell = {b["variant"]: b for b in rows if (b["pos_lo"], b["pos_hi"]) == lo_hi}
            g = lambda v, k: (f"{cell[v][k]:.4f}" if k == "mean_kld" else f"{100 * cell[v][k]:.1f}%") if v in cell else "-"  # noqa: E731
            md.append(f"| {lo_hi[0] + 1}-{lo_hi[1]} | {'yes' if next(iter(cell.values())).get('in_trained') else 'no'} | "
                      f"{g('quant', 'mean_kld')} | {g('quant_scaled', 'mean_kld')} | {g('fp_scaled', 'mean_kld')} | "
                      f"{g('quant', 'same_top')} | {g('quant_scaled', 'same_top')} |")
        md.append("")
    md.append("## Passkey (5 digits, 4 trials per cell; key-token accuracy %, then mean log-probability of the key)\n")
    for r in data["runs"]:
        rp, rk = r.get("ret_ppl"), r.get("ret_kld")
        if not rp:
            continue
        m = r["meta"]
        md.append(f"**YaRN x{m['factor']:g}, {QUANT_LABEL[m['quant']]}**\n")
        rows = rp["summary"] + ([dict(s, variant="quant_scaled_kld") for s in rk["summary"]] if rk else [])
        variants = [v for v in ("fp", "quant", "quant_scaled", "quant_scaled_kld") if any(s["variant"] == v for s in rows)]
        md.append("| length | depth | " + " | ".join(variants) + " |")
        md.append("|---|---|" + "---|" * len(variants))
        for L, d in sorted({(s["length"], s["depth"]) for s in rows}):
            cell = {s["variant"]: s for s in rows if (s["length"], s["depth"]) == (L, d)}
            md.append(f"| {L} | {d:g} | " + " | ".join(
                f"{100 * cell[v]['token_acc']:.0f}% ({cell[v]['key_logprob']:.2f})" if v in cell else "-" for v in variants) + " |")
        md.append("")
    return data, "\n".join(md)


def _changes(heldout: list[dict]) -> tuple[float, float | None]:
    """(length-weighted perplexity change, length-weighted KL change) of quant_scaled vs quant, in %."""
    rows = {(h["variant"], int(h["length"])): h for h in heldout}
    Ls = sorted(L for v, L in rows if v == "quant")
    w = sum(Ls)
    ppl = sum(L * (rows[("quant_scaled", L)]["log_ppl"] - rows[("quant", L)]["log_ppl"]) for L in Ls) / w
    if all("kld" in rows[("quant", L)] and rows[("quant", L)].get("kld") is not None for L in Ls):
        kq = sum(L * rows[("quant", L)]["kld"] for L in Ls) / w
        ks = sum(L * rows[("quant_scaled", L)]["kld"] for L in Ls) / w
        return 100 * (math.exp(ppl) - 1), 100 * (ks / kq - 1)
    return 100 * (math.exp(ppl) - 1), None


def _overall(f, f_ppl, L) -> str:
    def kl(src, v):
        if not src:
            return None
        for o in src["overall"]:
            if o["variant"] == v and int(o["length"]) == L and o.get("reference", "fp") == "fp":
                return o
        return None

    q, qs, fs = kl(f_ppl, "quant"), kl(f, "quant_scaled"), kl(f, "fp_scaled")
    cell = lambda o: f"{o['mean_kld']:.4f}" if o else "-"  # noqa: E731
    top = lambda o: f"{100 * o['same_top']:.1f}%" if o else "-"  # noqa: E731
    return f"{cell(q)} | {cell(qs)} | {cell(fs)} | {top(q)} / {top(qs)}"


def collect_precision(work: Path, model: str) -> tuple[dict, str]:
    data, md = {"rows": []}, ["## Precision check (YaRN x4, held-out documents, one window each): FP and PTQ perplexity", "",
                              "| dtype | quantizer | length | FP | PTQ | penalty |", "|---|---|---|---|---|---|"]
    for dt in ("fp32", "tf32", "bf16"):
        for qn in ("rtn4-g64", "rtn3-g64"):
            ev = _load(work / f"precision-{dt}" / f"eval-{qn}.json")
            if ev is None:
                continue
            f, q = _by_role(ev, "fp")["all"], _by_role(ev, "quant")["all"]
            for L in sorted(q):
                data["rows"].append(dict(dtype=dt, quant=qn, length=L, fp=f[L], ptq=q[L], seconds=ev.get("eval_seconds")))
                md.append(f"| {dt} | {QUANT_LABEL[qn]} | {L} | {f[L]:.4f} | {q[L]:.4f} | {100 * (q[L] / f[L] - 1):+.2f}% |")
    return data, "\n".join(md)


def collect_methods(work: Path, model: str) -> tuple[dict, str]:
    data = {"runs": []}
    md = ["## Search methods compared (held-out documents; PTQ + scales vs PTQ per length from `qroar eval`, 2 windows per "
          "document; the held-out objective and the FP + scales control from the search's own held-out table)", "",
          "| setting | strategy | held-out objective vs PTQ | control FP + scales vs FP | PTQ + scales vs PTQ by length | "
          "k-fold spread (max std of a scale) | evaluations | search s | scales |", "|---|---|---|---|---|---|---|---|---|"]
    for job in sorted(work.glob("methods-*")):
        meta, rep, ev = _load(job / "meta.json"), _load(job / "search.json"), _load(job / "eval-scaled.json")
        if rep is None or ev is None:
            continue
        q, qs = _by_role(ev, "quant")["all"], _by_role(ev, "quant_scaled")["all"]
        o = rep["objective"]["heldout"]
        ctrl = math.exp(o["fp_scaled"] - o["fp"]) - 1 if "fp_scaled" in o else float("nan")
        sc = rep.get("scales")
        per_layer = bool(sc) and isinstance(sc[0], list)
        row = dict(meta=meta, gain_pct=100 * _gain(rep), control_pct=100 * ctrl, by_length={L: 100 * (qs[L] / q[L] - 1) for L in q},
                   evaluations=rep.get("evaluations"), doc_evaluations=rep.get("doc_evaluations"), seconds=rep.get("seconds"),
                   scales=sc, commands=[_cmd(job, "search"), _cmd(job, "eval")])
        folds = rep.get("folds")
        row["fold_max_std"] = max((f.get("std") or 0) for f in folds) if folds else None
        row["folds"] = len([k for k in folds[0] if k.startswith("fold")]) if folds else 0
        data["runs"].append(row)
        spread = f"{row['fold_max_std']:.3f} ({row['folds']} folds)" if folds else "-"
        # a search resumed from its checkpoint counts only the resumed run's evaluations and seconds
        row["reused"] = rep.get("reused") or 0
        resumed = f" (resumed: {row['reused']} reused)" if row["reused"] else ""
        shown = (f"{len(sc)} layers x {len(sc[0])} bands, range {min(min(r) for r in sc):.3g}-{max(max(r) for r in sc):.3g}"
                 if per_layer else ", ".join(f"{g:.3g}" for g in sc))
        md.append(f"| YaRN x{meta['factor']:g}, {QUANT_LABEL[meta['quant']]} | {meta['strategy']} | {row['gain_pct']:+.2f}% | "
                  f"{row['control_pct']:+.2f}% | " + " / ".join(f"{v:+.2f}%" for _, v in sorted(row["by_length"].items()))
                  + f" | {spread} | {row['evaluations']} | {row['seconds']:.0f}{resumed} | {shown} |")
    return data, "\n".join(md)


def collect(a) -> None:
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = a.model.replace(":", "-")
    for plan, fn in (("fidelity", collect_fidelity), ("regime", collect_regime), ("precision", collect_precision),
                     ("methods", collect_methods)):
        if not list(work.glob(f"{plan}-*")) and not (plan == "regime" and list(work.glob("qroar-*"))):
            continue
        data, md = fn(work, model)
        run = _load(work / "run.json") or {}
        argv = run.get("argv") or a.ran.split()
        argv = ["WORK" if i and argv[i - 1] == "--work" else x for i, x in enumerate(argv)]
        head = (f"<!-- python scripts/long_tables.py {' '.join(argv) or 'run ...'} (all jobs: {run.get('seconds', '?')} s"
                f"{', ' + a.where if a.where else ''}); python scripts/long_tables.py collect --work WORK -->\n"
                "Every job's exact `qroar` commands are in the JSON beside this file.\n\n")
        (out / f"{plan}-{model}.json").write_text(json.dumps({"run": run, **data}, indent=1, default=float))
        (out / f"{plan}-{model}.md").write_text(head + md + "\n")
        print(f"wrote {out / f'{plan}-{model}'}.json/.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--plan", default="fidelity,regime")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="fp32")
    r.add_argument("--gpus", default="", help="comma-separated GPU indices (empty: none, one slot set)")
    r.add_argument("--per-gpu", type=int, default=1, help="jobs at a time on each GPU")
    r.add_argument("--work", required=True)
    r.add_argument("--deadline", type=float, default=0, help="seconds after which no new job starts (0: none)")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--only", default="", help="comma-separated parts of job names to keep")
    r.add_argument("--strategies", default="grid,race,layer,grad", help="methods: the search strategies compared")
    r.add_argument("--method-settings", default="yarn-x8-rtn3-g64,yarn-x4-rtn4-ch",
                   help="methods: the settings compared, each yarn-x<factor>-<quantizer>")
    r.add_argument("--method-folds", default="0", help="methods: k-fold stability of each method's scales (0 = off)")
    r.add_argument("--fold-quants", default="rtn4-ch,rtn3-g64", help="regime: quantizers whose search also runs 3 folds")
    p = sub.add_parser("probe")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--work", required=True)
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--out", default="docs/results")
    c.add_argument("--ran", default="", help="the run's arguments, for work folders written before they were recorded")
    c.add_argument("--where", default="", help="the machine, for the header")
    a = ap.parse_args()
    {"run": run, "probe": probe, "collect": collect}[a.cmd](a)


if __name__ == "__main__":
    main()
