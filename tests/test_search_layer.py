"""The per-layer search strategy ("layer"): shared descent first, then layer groups x bands around it, the same guard,
progress within its announced bound, checkpoint/resume, k-fold per layer, and the `qroar search --strategy layer` command."""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_search import RTN, WINDOWS, _objective, cfg_for, make_corpus, setup  # noqa: F401

from qroar.errors import Cancelled, ConfigError
from qroar.search import (STRATEGIES, SearchConfig, candidates, format_result, layer_groups, search, search_budget)

ROOT = Path(__file__).resolve().parent.parent


def test_layer_groups_are_contiguous_and_cover_every_layer():
    assert layer_groups(6, 4) == [[0, 1], [2, 3], [4], [5]]
    assert layer_groups(30, 4) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23)), list(range(23, 30))]
    assert layer_groups(2, 2) == [[0], [1]] and layer_groups(3, 1) == [[0, 1, 2]]
    with pytest.raises(ConfigError, match="5 layer groups for a model of 2 layers"):
        layer_groups(2, 5)
    with pytest.raises(ConfigError, match="layer_groups"):
        SearchConfig(layer_groups=0)
    assert "layer" in STRATEGIES and STRATEGIES["layer"].bound_only


def test_layer_search_refines_the_shared_descent_per_layer(setup):
    wb, corpus, _ = setup
    cfg = cfg_for(corpus, strategy="layer", layer_groups=2)
    grid = search(wb, cfg_for(corpus), WINDOWS)
    wb.set_scales(None)
    seen = []
    r = search(wb, cfg, WINDOWS, progress=lambda f, m: seen.append(m))
    assert len(r.scales) == 2 and all(len(row) == 4 for row in r.scales) and wb.per_layer
    # it starts from the shared descent: its dev objective can only be as good or better
    obj = r.objective["dev"]
    assert obj["quant_scaled"] <= grid.objective["dev"]["quant_scaled"] + 1e-12
    # the reported objective of the per-layer scales, recomputed independently
    assert _objective(wb, corpus["dev"], r.scales, cfg) == pytest.approx(obj["quant_scaled"], abs=1e-9)
    refine = r.history[r.history.group.notna()]
    shared = r.history[r.history.group.isna()]
    assert len(shared) == len(grid.history) and set(refine.group) == {0, 1}
    # each group's band tries at most 4 neighbours of its scale after the shared descent, every one on all dev docs
    assert refine.groupby(["group", "band"]).size().max() <= 4 and (refine.docs == 4).all()
    for row in refine.itertuples():
        cands = candidates(*WINDOWS[row.band], cfg.n_candidates)
        i = cands.index(grid.scales[row.band])
        assert row.g in cands[max(0, i - 2):i + 3] or row.g in cands  # neighbours in the band's window
    # the guard: a kept scale never raises the shortest length beyond the tolerance
    limit = r.dev.query("variant == 'quant' and length == 32").log_ppl.iloc[0] + torch.log1p(torch.tensor(cfg.guard_tol)).item()
    assert r.dev.query("variant == 'quant_scaled' and length == 32").log_ppl.iloc[0] <= limit + 1e-12
    # progress: "N of at most M evaluations", never past the bound the plan announces
    n_dev, n_held = len(wb.corpus(cfg.dev_corpus).doc_ids), len(wb.corpus(cfg.heldout_corpus).doc_ids)
    assert search_budget(cfg, n_dev, n_held, [len(c) - 1 for c in r.candidates]) == r.budget
    counts = [re.search(r"(\d+) of at most (\d+) evaluations", m) for m in seen]
    assert seen and all(counts) and all(int(c[1]) <= r.budget for c in counts) and r.spent <= r.budget
    text = format_result(r)
    assert "scales: " in text and ("per layer (layers x bands)" in text or "every layer the same" in text)
    json.dumps(r.to_dict())  # the per-layer scales serialise


def test_layer_search_with_one_group_per_layer_and_kfold(setup):
    wb, corpus, _ = setup
    r = search(wb, cfg_for(corpus, strategy="layer", layer_groups=2, k_folds=2, lengths=(32, 64)), WINDOWS)
    f = r.folds
    assert {"layer", "band", "mean", "std", "fold0", "fold1"} <= set(f.columns) and len(f) == 2 * 4
    torch.testing.assert_close(torch.tensor(f["mean"].tolist()), torch.tensor(((f.fold0 + f.fold1) / 2).tolist()))


def test_too_many_layer_groups_are_refused_and_change_nothing(setup):
    wb, corpus, _ = setup
    wb.set_scales([1.1, 1.0, 1.0, 1.0])
    before = wb.recipe
    with pytest.raises(ConfigError, match="3 layer groups for a model of 2 layers"):
        search(wb, cfg_for(corpus, strategy="layer", layer_groups=3), WINDOWS)
    assert wb.recipe == before


def test_layer_search_resumes_from_its_checkpoint(setup):
    wb, corpus, tmp = setup
    ref = search(wb, cfg_for(corpus, strategy="layer", layer_groups=2), WINDOWS)
    wb.set_scales(None)
    ck = tmp / "ck.json"
    cfg = cfg_for(corpus, strategy="layer", layer_groups=2, checkpoint=str(ck))
    cancel = threading.Event()

    def progress(f, m):
        if f > 0.6:  # past the shared descent, inside the per-layer refinement
            cancel.set()

    with pytest.raises(Cancelled, match="resume"):
        search(wb, cfg, WINDOWS, progress=progress, cancel=cancel)
    assert wb.scales is None
    saved = json.loads(ck.read_text())
    assert any(";" in e["key"] for e in saved["evaluations"])  # per-layer vectors were checkpointed
    r = search(wb, cfg, WINDOWS)
    assert r.scales == ref.scales and r.objective == ref.objective
    assert r.reused == len(saved["evaluations"]) and r.evaluations == ref.evaluations - r.reused


def test_qroar_search_strategy_layer_command(tiny_dir, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    exe = Path(sys.executable).parent / "qroar"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qroar.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "scales.json"
    args = ["search", "--model", tiny_dir, "--pi", "linear", "--factor", "2", "--quant", "rtn", "--bits", "3",
            "--group-size", "32", "--bands", "4", "--dev-corpus", corpus["dev"], "--heldout-corpus", corpus["held"],
            "--lengths", "32,96", "--max-windows", "1", "--candidates", "5", "--windows", "0.7:1.3,0.8:1.25,0.85:1.2,0.9:1.1",
            "--quiet", "--strategy", "layer", "--layer-groups", "2", "--out", str(out), "--report", str(tmp_path / "rep")]
    p = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "held-out perplexity" in p.stdout and "scales: " in p.stdout
    d = json.loads(out.read_text())
    assert d["schema_version"] == 3 and d["per_layer"] is True and len(d["scales"]) == 2 and len(d["scales"][0]) == 4
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["command"] == "search" and rep["scales"] == d["scales"]
    p = subprocess.run([*cmd, "apply", str(out), "--corpus", corpus["held"], "--max-windows", "1", "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "scaled_vs_quant_%" in p.stdout
    bad = subprocess.run([*cmd, *args[:-4], "--layer-groups", "9"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "9 layer groups for a model of 2 layers" in bad.stderr
