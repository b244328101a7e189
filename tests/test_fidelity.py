"""Fidelity to full precision: exact per-position KL, same top token and dp; llama.cpp's aggregates; the KL
search objective; bad inputs; the `qroar fidelity` command."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny, tiny_llama, tiny_workbench
from test_search import RTN, WINDOWS, cfg_for, make_corpus

from qroar import fidelity
from qroar.errors import ConfigError
from qroar.perplexity import EvalConfig
from qroar.quant import QUANTIZERS, QuantConfig, quant_targets
from qroar.rope import PIConfig
from qroar.search import OBJECTIVES, search
from qroar.workbench import Workbench

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def wb(tmp_path):
    return tiny_workbench(tmp_path / "m", RTN), make_corpus(tmp_path / "corpus", words=300)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- per-position primitives


def test_kl_equals_torch_kl_div_on_a_small_vocabulary():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 13, generator=g, dtype=torch.float64), torch.randn(9, 13, generator=g, dtype=torch.float64) * 3
    lr, lv = F.log_softmax(a, -1), F.log_softmax(b, -1)
    y = torch.randint(0, 13, (9,), generator=g)
    s = fidelity.token_stats(lr, lv, y)
    ref = F.kl_div(lv, lr, log_target=True, reduction="none").sum(-1)  # KL(P_ref || P_var)
    assert torch.allclose(s["kld"], ref, rtol=0, atol=1e-12)
    assert torch.allclose(s["kld"], (lr.exp() * (lr - lv)).sum(-1), atol=1e-12)
    assert torch.equal(s["same_top"], a.argmax(-1) == b.argmax(-1))
    assert torch.allclose(s["nll_var"], F.cross_entropy(b, y, reduction="none"), atol=1e-12)


def test_kl_through_the_model_head_equals_kl_div_on_full_logits(llama):
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
        h1, h2 = fidelity.hidden_states(llama, ids)[0], fidelity.hidden_states(other, ids)[0]
        full1, full2 = llama(ids).logits[0].double(), llama.lm_head(h2).double()
    s = fidelity.compare_hidden(llama, h1, {"v": h2}, ids[0], chunk=7, dtype=torch.float64)["v"]
    ref = F.kl_div(F.log_softmax(full2, -1), F.log_softmax(full1, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(s["kld"], ref, atol=1e-9) and bool((s["kld"] > 0).all())


def test_a_model_against_itself_has_zero_kl_and_the_same_top_token(llama):
    ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(2))
    h = fidelity.hidden_states(llama, ids)[0, :-1]
    s = fidelity.compare_hidden(llama, h, {"self": h.clone()}, ids[0, 1:], chunk=16)["self"]
    assert torch.equal(s["kld"], torch.zeros(49, dtype=torch.float64)) and bool(s["same_top"].all())
    agg = fidelity.summarize_positions(s["kld"], s["same_top"], s["nll_ref"], s["nll_var"])
    assert agg["mean_kld"] == 0 and agg["max_kld"] == 0 and agg["same_top"] == 1.0 and agg["rms_dp"] == 0


def test_chunked_equals_unchunked(llama):
    ids = torch.randint(3, 128, (1, 61), generator=torch.Generator().manual_seed(3))
    llama = llama.double()  # float64 head: chunking changes only BLAS blocking, so results agree to 1e-12
    other = tiny_llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}).double()
    h1, h2 = fidelity.hidden_states(llama, ids)[0, :-1], fidelity.hidden_states(other, ids)[0, :-1]
    whole = fidelity.compare_hidden(llama, h1, {"v": h2}, ids[0, 1:], chunk=60, dtype=torch.float64)["v"]
    assert whole["kld"][1:].min() > 0  # position 0 is not rotated, so the two models agree there
    for chunk in (1, 7, 59):
        part = fidelity.compare_hidden(llama, h1, {"v": h2}, ids[0, 1:], chunk=chunk, dtype=torch.float64)["v"]
        assert torch.equal(part["same_top"], whole["same_top"])
        for k in ("kld", "nll_ref", "nll_var"):
            assert torch.allclose(part[k], whole[k], rtol=1e-9, atol=1e-15), (chunk, k)


def test_the_identity_quantizer_gives_zero_everywhere(llama):
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(4))
    h_fp = fidelity.hidden_states(llama, ids)[0, :-1]
    ident = QuantConfig(method="none")
    with torch.no_grad():
        for _, lin in quant_targets(llama, "linear"):
            lin.weight.data = QUANTIZERS["none"].fn(lin.weight.data, ident)
    h_q = fidelity.hidden_states(llama, ids)[0, :-1]
    s = fidelity.compare_hidden(llama, h_fp, {"quant": h_q}, ids[0, 1:], chunk=5)["quant"]
    dp = torch.exp(-s["nll_var"]) - torch.exp(-s["nll_ref"])
    assert not s["kld"].any() and bool(s["same_top"].all()) and not dp.any()


def test_scales_of_one_give_zero_in_every_bucket(wb):
    w, corpus = wb
    w.set_scales([1.0] * 4)
    res = fidelity.run(w, corpus["held"], fidelity.FidelityConfig(lengths=(32, 96), chunk=13), variants=["fp_scaled"])
    b = res.buckets
    assert len(b) >= 6 and (b["mean_kld"] == 0).all() and (b["max_kld"] == 0).all() and (b["same_top"] == 1).all()
    assert (res.overall["mean_dp"] == 0).all()


# ----------------------------------------------------------------------------- aggregates


def test_aggregates_follow_llama_cpp():
    rng = np.random.default_rng(0)
    kld = rng.gamma(0.5, 0.02, 1000)
    same = rng.random(1000) < 0.9
    nr, nv = rng.gamma(2.0, 1.5, 1000), rng.gamma(2.0, 1.5, 1000)
    a = fidelity.summarize_positions(kld, same, nr, nv)
    n = 1000
    assert a["mean_kld"] == pytest.approx(kld.mean())
    assert a["mean_kld_unc"] == pytest.approx(math.sqrt(((kld ** 2).mean() - kld.mean() ** 2) / (n - 1)))
    s = np.sort(kld)
    p = 0.99 * (n - 1)  # llama.cpp: linear interpolation at fraction * (n - 1)
    assert a["p99_kld"] == pytest.approx((1 - (p % 1)) * s[int(p)] + (p % 1) * s[int(p) + 1])
    assert a["median_kld"] == pytest.approx(0.5 * (s[499] + s[500])) and a["max_kld"] == s[-1]
    dp = np.exp(-nv) - np.exp(-nr)
    assert a["mean_dp"] == pytest.approx(dp.mean()) and a["rms_dp"] == pytest.approx(math.sqrt((dp ** 2).mean()))
    mse_unc = math.sqrt(((dp ** 4).mean() - (dp ** 2).mean() ** 2) / (n - 1))
    assert a["rms_dp_unc"] == pytest.approx(0.5 / a["rms_dp"] * mse_unc)
    assert a["same_top"] == same.mean()
    assert a["same_top_unc"] == pytest.approx(math.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))
    assert a["delta_log_ppl"] == pytest.approx((nv - nr).mean())
    few = fidelity.summarize_positions(kld[:10], same[:10], nr[:10], nv[:10])
    assert math.isnan(few["mean_kld_unc"]) and few["positions"] == 10  # no spread claimed from so few


def test_buckets_are_log_spaced_and_split_at_the_trained_context():
    assert fidelity.bucket_edges(2047, 256) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2047]
    e = fidelity.bucket_edges(1000, 300, per_octave=2)
    assert 300 in e and e == sorted(set(e)) and e[0] == 0 and e[-1] == 1000


def test_run_reports_buckets_lengths_and_the_no_pi_reference(wb):
    w, corpus = wb
    w.set_scales([1.1, 0.9, 1.2, 0.8])
    before, recipe = weights(w.model), w.recipe
    res = fidelity.run(w, corpus["held"], fidelity.FidelityConfig(lengths=(32, 96), nopi=True, max_docs=1))
    assert set(res.overall.query("reference == 'fp'")["variant"]) == {"quant", "quant_scaled", "fp_scaled"}
    fp = res.overall.query("reference == 'fp'")
    assert sorted(set(fp["length"])) == [32, 96] and set(fp.query("length == 96")["positions"]) == {95}
    nopi = res.overall.query("reference == 'fp_nopi'")
    tc = w.info.trained_context
    assert set(nopi["variant"]) == {"fp", "quant", "quant_scaled", "fp_scaled"} and set(nopi["upto"]) == {tc}
    b = res.buckets.query("reference == 'fp_nopi'")
    assert (b["pos_hi"] <= tc).all() and b["in_trained"].all()
    assert (res.buckets.query("reference == 'fp' and variant == 'quant'")["mean_kld"] > 0).all()
    assert res.buckets.query("pos_lo >= @tc")["in_trained"].eq(False).all()
    assert same_weights(before, weights(w.model)) and w.recipe == recipe  # nothing left changed (PI included)
    json.dumps(res.to_dict(), default=str)
    assert "mean KLD by position" in fidelity.format_result(res)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_refused_and_change_nothing(wb, tmp_path):
    w, corpus = wb
    before, recipe = weights(w.model), w.recipe
    cfg = fidelity.FidelityConfig(lengths=(32,))
    with pytest.raises(ConfigError, match="quant_scaled .needs a quantizer and scales"):
        fidelity.run(w, corpus["held"], cfg, variants=["quant_scaled"])
    with pytest.raises(ConfigError, match="Unknown variant"):
        fidelity.run(w, corpus["held"], cfg, variants=["int4"])
    with pytest.raises(ConfigError, match="fp against itself"):
        fidelity.run(w, corpus["held"], cfg, variants=["fp"])
    with pytest.raises(ConfigError, match="every length|integer >= 2"):
        fidelity.FidelityConfig(lengths=(1,))
    with pytest.raises(ConfigError, match="per_octave"):
        fidelity.FidelityConfig(per_octave=0)
    plain = Workbench.open(save_tiny(tmp_path / "p"), device="cpu", dtype="fp32")
    with pytest.raises(ConfigError, match="quant .needs a quantizer"):
        fidelity.run(plain, corpus["held"], cfg, variants=["quant"])
    plain.set_quant(RTN)
    with pytest.raises(ConfigError, match="No FP reference without PI"):
        fidelity.run(plain, corpus["held"], fidelity.FidelityConfig(lengths=(32,), nopi=True), variants=["quant"])
    assert same_weights(before, weights(w.model)) and w.recipe == recipe


def test_no_fp_reference_for_other_settings_is_an_error(wb):
    w, corpus = wb
    ref = fidelity.FPReference(w)
    cfg = EvalConfig(lengths=(32,), max_windows_per_doc=1)
    r = fidelity.kld_evaluate(w, corpus["held"], cfg, "quant", ref)
    assert all(v > 0 for v in r.kld().values()) and fidelity.kld_evaluate(w, corpus["held"], cfg, "fp", ref).kld() == {32: 0.0}
    before = weights(w.model)
    w.set_pi(PIConfig("linear", 4.0))
    with pytest.raises(ConfigError, match="No FP reference for these settings"):
        fidelity.kld_evaluate(w, corpus["held"], cfg, "quant", ref)
    assert same_weights(before, weights(w.model))


# ----------------------------------------------------------------------------- the KL search objective


def test_kld_is_a_search_objective_and_reports_the_control(wb):
    w, corpus = wb
    assert "kld" in OBJECTIVES and OBJECTIVES["kld"].measure == "kld"
    for strategy in ("grid", "race"):
        res = search(w, cfg_for(corpus, objective="kld", strategy=strategy, lengths=(32, 64)), windows=WINDOWS)
        h = res.heldout
        assert {"kld", "log_ppl"} <= set(h.columns) and set(h["variant"]) == {"fp", "quant", "quant_scaled", "fp_scaled"}
        assert (h.query("variant == 'fp'")["kld"] == 0).all() and (h.query("variant == 'quant'")["kld"] > 0).all()
        o = res.objective["heldout"]
        assert o["fp"] == 0 and o["quant"] > 0
        assert res.heldout_gain() == pytest.approx(o["quant_scaled"] / o["quant"] - 1)
        assert res.objective["dev"]["quant_scaled"] <= res.objective["dev"]["quant"] + 1e-12  # the descent never worsens dev


# ----------------------------------------------------------------------------- the command


def _qroar(*args, env_extra=None):
    exe = Path(sys.executable).parent / "qroar"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qroar.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)


def test_qroar_fidelity_command_on_the_embedded_model(tmp_path):
    out = tmp_path / "fid"
    p = _qroar("fidelity", "--model", "qroar-tiny", "--device", "cpu", "--pi", "yarn", "--factor", "8", "--quant", "rtn",
               "--bits", "4", "--group-size", "64", "--lengths", "64,320", "--max-docs", "1", "--nopi", "--quiet",
               "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "mean KLD by position" in p.stdout and "same top" in p.stdout
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["command"] == "fidelity" and d["settings"]["trained_context"] == 256
    assert {r["reference"] for r in d["overall"]} == {"fp", "fp_nopi"}
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("reference,variant,pos_lo,pos_hi,in_trained") and len(csv) > 5
    bad = _qroar("fidelity", "--model", "qroar-tiny", "--quant", "none")
    assert bad.returncode == 2 and bad.stderr.startswith("error: Nothing to compare")


def test_fidelity_inputs_are_checked_before_the_model_loads(capsys):
    from qroar.cli import main

    assert main(["fidelity", "--model", "qroar-tiny", "--quant", "rtn", "--group-size", "100", "--quiet"]) == 2
    assert "does not divide the input width 384" in capsys.readouterr().err
    assert main(["fidelity", "--model", "qroar-tiny", "--variants", "fp_scaled", "--quiet"]) == 2
    assert "variant fp_scaled needs --scales" in capsys.readouterr().err
    assert main(["fidelity", "--model", "qroar-tiny", "--lengths", "1000000", "--quiet"]) == 2
    assert "longer than every document" in capsys.readouterr().err
