"""Gradient refinement of the band scales: hooks == apply, gradient == finite differences, bound, guard,
cancel, the strategy end to end and the command."""

import json
import math
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_workbench
from test_search import RTN, WINDOWS, cfg_for, make_corpus

from qroar import gradient
from qroar.errors import Cancelled, ConfigError
from qroar.models import attention_layers, decoder_layers
from qroar.quant import QuantConfig
from qroar.rescale import Rescaler, ScaleConfig
from qroar.search import STRATEGIES, SearchConfig, add_search_args, search, search_args, search_budget, search_config_from_args

ROOT = Path(__file__).resolve().parent.parent
S = [1.25, 0.8, 1.1, 0.9]


def _open(tmp_path, double: bool):
    return tiny_workbench(tmp_path / "m", RTN, double=double), make_corpus(tmp_path / "c")


@pytest.fixture
def wb64(tmp_path):
    """The tiny Llama in float64 under linear PI x2, RTN W3 g32, 4 bands, shared mode."""
    return _open(tmp_path, True)


@pytest.fixture
def wb32(tmp_path):
    """The same in float32, as a search runs it."""
    return _open(tmp_path, False)


def _logits(wb, ids):
    with torch.no_grad():
        return wb.model(input_ids=ids, use_cache=False).logits


def test_hooks_own_the_rescalers_rows(wb64):
    wb, _ = wb64
    ts = gradient.targets(wb.model, wb.bands)
    rs = Rescaler(wb.model, wb.bands).targets
    assert len(ts) == len(rs) == 2 * len(attention_layers(wb.model))
    for t, r in zip(ts, rs):
        assert t.proj == r.proj and t.module is r.module
        assert torch.equal(t.index, r.index) and torch.equal(t.band, r.band)


@pytest.mark.parametrize("mode", ["shared", "symmetric"])
def test_hooked_quantized_model_equals_apply_before_quantization_under_rtn(wb64, mode):
    """Q(gW) = g Q(W) for RTN: scaling the dequantized rows' outputs is the "before" model to rounding."""
    wb, _ = wb64
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    wb.apply(replace(wb.recipe, scales=tuple(S), scale=ScaleConfig(mode, "before")))
    with wb.variant("quant_scaled"):
        want = _logits(wb, ids)
    with wb.variant("quant"):
        plain = _logits(wb, ids)
        theta = torch.log(torch.tensor([S], dtype=torch.float64))
        with gradient.ScaleHooks(wb.model, wb.bands, mode, theta):
            got = _logits(wb, ids)
        per_layer = theta.repeat(len(attention_layers(wb.model)), 1)  # every layer the same: the shared scales
        with gradient.ScaleHooks(wb.model, wb.bands, mode, per_layer):
            again = _logits(wb, ids)
        after = _logits(wb, ids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the rescaler scales rows in fp32: fp32 rounding
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # the hooks are gone on exit
    if mode == "shared":
        assert (got - plain).abs().max() > 1e-3  # the scales act


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_hooked_model_equals_apply_before_for_gptq_and_awq(wb64, method):
    """GPTQ's min-max groups, and AWQ's re-quantization with its searched statistics frozen, are row-scale
    equivariant too: the hooked "after" model is the "before" model to rounding."""
    wb, corpus = wb64
    wb.set_quant(QuantConfig(method=method, bits=3, group_size=32, n_samples=4, seq_len=32, awq_grid=8), calib_corpus=corpus["dev"])
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    wb.apply(replace(wb.recipe, scales=tuple(S), scale=ScaleConfig("shared", "before")))
    with wb.variant("quant_scaled"):
        want = _logits(wb, ids)
    with wb.variant("quant"):
        with gradient.ScaleHooks(wb.model, wb.bands, "shared", torch.log(torch.tensor([S], dtype=torch.float64))):
            got = _logits(wb, ids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_per_layer_hooks_act_on_their_own_layer(wb64):
    wb, _ = wb64
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    theta = torch.zeros(2, 4, dtype=torch.float64)
    theta[1, 2] = math.log(1.3)  # layer 1 only
    wb.apply(wb.recipe.with_scales([1.0] * 4))
    with wb.variant("quant"):
        with gradient.ScaleHooks(wb.model, wb.bands, "shared", theta) as h:
            got = _logits(wb, ids)
            f = {(t.layer, t.proj): h.factor(t) for t in h.targets}
    t0 = [t for t in h.targets if t.layer == 1 and t.proj == "q"][0]
    assert torch.all(f[(0, "q")] == 1) and torch.all(f[(0, "k")] == 1)
    assert torch.allclose(f[(1, "q")][t0.index[t0.band == 2]], torch.tensor(1.3, dtype=torch.float64))
    assert int((f[(1, "q")] != 1).sum()) == int((t0.band == 2).sum())
    with wb.variant("quant"):
        assert (got - _logits(wb, ids)).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="theta must be"):
        gradient.ScaleHooks(wb.model, wb.bands, "shared", torch.zeros(3, 4))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("measure", ["log_ppl", "kld"])
def test_gradient_of_the_scales_matches_finite_differences(wb64, tie, measure, monkeypatch):
    from transformers.models.llama import modeling_llama

    def norm64(self, x):  # transformers' RMSNorm rounds to fp32 inside: finite differences would measure that rounding
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", norm64)
    wb, corpus = wb64
    wb.apply(wb.recipe.with_scales([1.0] * 4))
    dev = wb.corpus(corpus["dev"])
    wins = gradient.make_windows(wb.model, wb.tokenizer, dev, (32, 64), 1)[:2]
    assert [w.cuts for w in wins] == [[32, 64], [32, 64]]  # nested: one forward scores both lengths
    ref = None
    if measure == "kld":
        from qroar.fidelity import FPReference

        ref = FPReference(wb)
    setup = gradient.Setup(wb, measure, None, 0.005, 16, ref)  # chunks of 16 positions: the chunked head is exercised
    with wb.variant("quant"):
        p = gradient.Problem(setup, wb.bands, "shared", wins)
        rows = 1 if tie else 2
        theta = (0.1 * torch.randn(rows, 4, generator=torch.Generator().manual_seed(3))).double()
        g = p.grad(theta)
        eps = 1e-5
        fd = torch.zeros_like(theta)
        for i in range(rows):
            for b in range(4):
                up, dn = theta.clone(), theta.clone()
                up[i, b] += eps
                dn[i, b] -= eps
                fd[i, b] = (p.value(up) - p.value(dn)) / (2 * eps)
    scale = float(g.abs().max())
    assert scale > 1e-7  # a real gradient, not zeros that would match anything
    torch.testing.assert_close(g, fd, rtol=1e-4, atol=1e-4 * scale)


def test_objective_equals_the_ordinary_evaluation(wb64):
    """At theta = log s the Problem's value is the search's objective of the applied scales (nested, one window)."""
    from qroar.perplexity import EvalConfig, weighted_objective

    wb, corpus = wb64
    dev = wb.corpus(corpus["dev"])
    wb.apply(wb.recipe.with_scales(S))
    res = wb.evaluate(dev, EvalConfig(lengths=(32, 96), max_windows_per_doc=1, nested=True), "quant_scaled")
    wins = gradient.make_windows(wb.model, wb.tokenizer, dev, (32, 96), 1)
    with wb.variant("quant"):
        p = gradient.Problem(gradient.Setup(wb, "log_ppl", None, 0.005, 1024), wb.bands, "shared", wins)
        v = p.value(torch.log(torch.tensor([S], dtype=torch.float64)))
    assert v == pytest.approx(weighted_objective(res.log_ppl()), rel=1e-7)  # the rescaler scales rows in fp32


def test_checkpointed_layers_give_the_same_gradient_and_put_forward_back(wb64):
    wb, corpus = wb64
    wb.apply(wb.recipe.with_scales([1.0] * 4))
    w = gradient.make_windows(wb.model, wb.tokenizer, wb.corpus(corpus["dev"]), (64,), 1)[0]
    grads = []
    with wb.variant("quant"):
        for ckpt in (False, True):
            theta = torch.full((1, 4), 0.05, dtype=torch.float64, requires_grad=True)
            with gradient.ScaleHooks(wb.model, wb.bands, "shared", theta):
                if ckpt:
                    with gradient.checkpointed_layers(wb.model):
                        gradient.window_sums(wb.model, w, 16)[0][64].backward()
                else:
                    gradient.window_sums(wb.model, w, 16)[0][64].backward()
            grads.append(theta.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(wb.model))


# ----------------------------------------------------------------------------- the strategy


def grad_cfg(corpus, **kw):
    return cfg_for(corpus, **{**dict(strategy="grad", lengths=(32, 96), grad_steps=4, grad_every=2, grad_batch=2), **kw})


def test_grad_search_keeps_the_bound_and_reports_with_the_ordinary_path(wb32):
    wb, corpus = wb32
    cfg = grad_cfg(corpus, grad_lr=1.0, grad_patience=5)  # huge steps: only the projection keeps the bound
    seen = []
    flags = [p.requires_grad for p in wb.model.parameters()]
    r = search(wb, cfg, WINDOWS, progress=lambda f, m: seen.append((f, m)))
    for g, (lo, hi) in zip(r.scales, WINDOWS):
        assert lo - 1e-9 <= g <= hi + 1e-9
    assert any(abs(g - 1) > 1e-3 for g in r.scales)  # it moved
    # the reported dev objective is the ordinary evaluation of the chosen scales
    from test_search import _objective

    assert _objective(wb, corpus["dev"], r.scales, cfg) == pytest.approx(r.objective["dev"]["quant_scaled"], abs=1e-9)
    assert r.objective["dev"]["quant_scaled"] <= r.objective["dev"]["quant"]
    assert set(r.heldout.variant) == {"fp", "quant", "quant_scaled", "fp_scaled"}
    # history: objective against steps (training minibatches and validation checks)
    h = r.history
    assert set(h.split) == {"train", "val"} and h.step.max() == 4 and list(h[h.split == "val"].step) == [0, 2, 4]
    # progress counts steps + evaluations against an honest budget
    assert r.unit == "steps + evaluations" and r.budget == search_budget(cfg, 4, 2, [4] * 4)
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and 0 < fr[-1] <= 1 and all(f" of {r.budget} steps + evaluations" in m for _, m in seen)
    assert [p.requires_grad for p in wb.model.parameters()] == flags  # frozen only while theta is optimised
    assert all(len(t.module._forward_hooks) == 0 for t in gradient.targets(wb.model, wb.bands))


def test_grad_search_is_deterministic_for_a_seed(wb32):
    wb, corpus = wb32
    a = search(wb, grad_cfg(corpus, grad_steps=2), WINDOWS)
    wb.set_scales(None)
    b = search(wb, grad_cfg(corpus, grad_steps=2), WINDOWS)
    assert a.scales == b.scales and a.history["objective"].tolist() == b.history["objective"].tolist()


def test_grad_search_respects_the_guard(wb32):
    wb, corpus = wb32
    r = search(wb, grad_cfg(corpus, guard_tol=0.0, grad_lr=0.5), WINDOWS)
    short = r.dev.query("length == 32").set_index("variant").log_ppl
    assert short["quant_scaled"] <= short["quant"] + 1e-12
    val = r.history[r.history.split == "val"]
    ok = val[val.guard_ok.astype(bool)]
    assert (ok.short_log_ppl <= val.unscaled_short_log_ppl.iloc[0] + 1e-12).all()


def test_grad_search_cancel_leaves_the_workbench_as_it_was(wb32):
    wb, corpus = wb32
    cancel = threading.Event()

    def progress(f, m):
        if "step 2" in m:
            cancel.set()

    wb.set_scales(None)
    flags = [p.requires_grad for p in wb.model.parameters()]
    with pytest.raises(Cancelled):
        search(wb, grad_cfg(corpus), WINDOWS, progress=progress, cancel=cancel)
    assert wb.scales is None
    assert [p.requires_grad for p in wb.model.parameters()] == flags
    assert all(len(t.module._forward_hooks) == 0 for t in gradient.targets(wb.model, wb.bands))
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(wb.model))


def test_layer_scales_give_one_row_per_layer(wb32):
    from qroar.search import Checkpoint, SearchRun

    wb, corpus = wb32
    cfg = grad_cfg(corpus, grad_lr=0.3)
    wb.apply(wb.recipe.with_scales([1.0] * 4))
    run = SearchRun(wb, cfg, Checkpoint(None, "h", {}), 100, None, None, "quant_scaled", "quant")
    cands = [[lo, 1.0, hi] for lo, hi in WINDOWS]
    s = gradient.layer_scales(run, "all", wb.corpus(corpus["dev"]), cands)
    assert s.shape == (2, 4) and s.dtype == torch.float64
    lo = torch.tensor([a for a, _ in WINDOWS], dtype=torch.float64)
    hi = torch.tensor([b for _, b in WINDOWS], dtype=torch.float64)
    assert bool(((s >= lo - 1e-6) & (s <= hi + 1e-6)).all())


def test_grad_layer_search_gives_per_layer_scales_within_their_bounds(wb32):
    wb, corpus = wb32
    r = search(wb, grad_cfg(corpus, strategy="grad-layer", grad_lr=0.3), WINDOWS)
    assert len(r.scales) == 2 and all(len(row) == 4 for row in r.scales)  # layers x bands
    for row in r.scales:
        for g, (lo, hi) in zip(row, WINDOWS):
            assert lo - 1e-9 <= g <= hi + 1e-9
    if r.scales != [[1.0] * 4] * 2:  # it moved: the layers are free to differ, and the result is the ordinary path's
        assert r.objective["dev"]["quant_scaled"] < r.objective["dev"]["quant"]
    assert set(r.heldout.variant) == {"fp", "quant", "quant_scaled", "fp_scaled"}
    assert wb.recipe.per_layer == (r.scales != [1.0] * 4 and isinstance(r.scales[0], list))


def test_grad_settings_are_checked_and_round_trip():
    import argparse

    for bad in (dict(grad_steps=0), dict(grad_lr=0.0), dict(grad_lr=float("nan")), dict(grad_batch=0),
                dict(grad_val=0.9), dict(grad_every=0), dict(grad_patience=0), dict(seed=-1), dict(grad_steps=2.5)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SearchConfig(**bad)
    cfg = SearchConfig(lengths=(64, 256), strategy="grad", grad_steps=7, grad_lr=0.05, grad_batch=3, grad_val=0.2,
                       grad_every=3, grad_patience=2, seed=11)
    p = argparse.ArgumentParser()
    add_search_args(p)
    assert search_config_from_args(p.parse_args(search_args(cfg)), 256) == cfg
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "grad" in STRATEGIES and STRATEGIES["grad"].unit == "steps + evaluations"


def test_qroar_search_strategy_grad_command(tmp_path):
    exe = Path(sys.executable).parent / "qroar"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qroar.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "scales.json"
    p = subprocess.run([*cmd, "search", "--model", "qroar-tiny", "--device", "cpu", "--pi", "yarn", "--factor", "8",
                        "--quant", "rtn", "--bits", "3", "--group-size", "64", "--bands", "4", "--lengths", "64,256",
                        "--max-windows", "1", "--strategy", "grad", "--steps", "2", "--grad-every", "1", "--grad-batch", "1",
                        "--quiet", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "held-out perplexity" in p.stdout and "steps + evaluations" in p.stdout
    d = json.loads(out.read_text())
    assert len(d["scales"]) == 4 and d["search"]["strategy"] == "grad" and d["search"]["grad_steps"] == 2
    bad = subprocess.run([*cmd, "search", "--model", "qroar-tiny", "--strategy", "grad", "--lr", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "grad_lr" in bad.stderr


@pytest.mark.parametrize("strategy", ["grad", "grad-layer"])
def test_grad_search_resumes_finished_optimisations_from_its_checkpoint(wb32, tmp_path, monkeypatch, strategy):
    """A finished optimisation (the main one and each fold's) is kept in the checkpoint: the same search
    run again with the file optimises nothing and gives the same scales, history and folds."""
    wb, corpus = wb32
    ck = tmp_path / "grad.ckpt.json"
    cfg = grad_cfg(corpus, strategy=strategy, grad_lr=0.3, k_folds=2, checkpoint=str(ck))
    a = search(wb, cfg, WINDOWS)
    saved = json.loads(ck.read_text())
    tag = "shared" if strategy == "grad" else "layer"
    assert set(saved["descents"]) == {f"all:{tag}", f"fold0:{tag}", f"fold1:{tag}"}
    wb.set_scales(None)

    def refuse(*a, **k):
        raise AssertionError("optimised again although the checkpoint holds the result")

    monkeypatch.setattr(gradient, "optimise", refuse)
    b = search(wb, cfg, WINDOWS)
    assert b.scales == a.scales and b.evaluations == 0
    assert b.history["objective"].tolist() == a.history["objective"].tolist()
    assert b.folds.equals(a.folds)


def test_grad_checkpoint_of_other_settings_is_refused(wb32, tmp_path):
    wb, corpus = wb32
    ck = tmp_path / "grad.ckpt.json"
    search(wb, grad_cfg(corpus, checkpoint=str(ck)), WINDOWS)
    wb.set_scales(None)
    with pytest.raises(ConfigError, match="other settings"):
        search(wb, grad_cfg(corpus, checkpoint=str(ck), grad_lr=0.2), WINDOWS)
