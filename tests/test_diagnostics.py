"""diagnostics.py: IP known answers (Llama-2-7B + YaRN x8, computed here from YaRN's own formula),
the full run on tiny random models (identity quantizer => zero noise, hooks removed, cancel),
per-band weight error against quant.fake_quant, band logits against a plain dot product."""

import math
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig

from conftest import TEXT, save_tiny, tiny_qwen2
from qroar import diagnostics as dg
from qroar import models, quant, rope
from qroar.bands import BandConfig, bands_for, make_bands, proj_rows
from qroar.errors import Cancelled, ConfigError, DataError
from qroar.workbench import Workbench

# ----------------------------------------------------------------------------- analytic: pairs and IP


def yarn_llama2_s(factor=8.0, d=128, theta=1e4, L0=4096, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023, reference code): pairs doing more than beta_fast turns over L0 keep omega,
    fewer than beta_slow are divided by the factor, a linear ramp in the pair index between."""
    j = np.arange(d // 2)
    omega = theta ** (-2 * j / d)
    pair_at = lambda turns: d * math.log(L0 / (turns * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = math.floor(pair_at(beta_fast)), math.ceil(pair_at(beta_slow))
    ramp = np.clip((j - low) / (high - low), 0, 1)  # 0 keep, 1 interpolate
    inv = omega * (1 - ramp) + omega / factor * ramp
    return omega, omega / inv


def test_ip_known_answers_llama2_7b_yarn_x8():
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=1, intermediate_size=64,
                      vocab_size=32, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    freqs = rope.frequencies(cfg, rope.PIConfig("yarn", 8.0))
    bands = bands_for(freqs, BandConfig(8))
    assert bands.edges == (0, 8, 16, 24, 32, 40, 48, 56, 64)
    lengths = [4096, 32768]
    got = dg.interpolation_pressure(freqs, bands, lengths).set_index(["band", "length"])
    omega, s = yarn_llama2_s()
    for D in lengths:
        ip = omega * D / s**2
        for b in range(8):
            seg = ip[8 * b : 8 * b + 8]
            assert got.loc[(b, D), "ip_mean"] == pytest.approx(seg.mean(), rel=1e-5)
            assert got.loc[(b, D), "ip_max"] == pytest.approx(seg.max(), rel=1e-5)
    # by hand: band 0 is untouched by YaRN (s = 1), so its max IP is omega_0 * D = D
    assert got.loc[(0, 32768), "ip_max"] == pytest.approx(32768.0)
    # the lowest band is fully interpolated (s = 8): mean of omega_j D / 64
    assert got.loc[(7, 32768), "ip_mean"] == pytest.approx(omega[56:].mean() * 32768 / 64, rel=1e-5)
    # IP is linear in D
    assert got.loc[(3, 32768), "ip_mean"] == pytest.approx(8 * got.loc[(3, 4096), "ip_mean"])


def test_pair_table_wavelengths_and_bands():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8, vocab_size=8,
                      max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    freqs = rope.frequencies(cfg, rope.PIConfig("linear", 4.0))
    t = dg.pair_table(freqs, make_bands(8, BandConfig(4)))
    assert list(t.columns) == ["j", "band", "omega", "inv_freq", "s", "wavelength", "wavelength_after"]
    assert t.band.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_allclose(t.s, 4.0, rtol=1e-6)
    np.testing.assert_allclose(t.wavelength_after, 4 * t.wavelength, rtol=1e-6)
    np.testing.assert_allclose(t.wavelength[3], 2 * math.pi * 1e4 ** (6 / 16), rtol=1e-6)


def test_distance_buckets_and_pair_sampling():
    assert dg.distance_buckets(100) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 99)]
    assert dg.distance_buckets(10, (1, 5, 50)) == [(1, 4), (5, 9)]
    p = dg.sample_pairs(100, dg.distance_buckets(100), 50, seed=3)
    d = p.i - p.j
    for b, (lo, hi) in enumerate(p.buckets):
        sel = p.bucket == b
        assert int(sel.sum()) == 50 and d[sel].min() >= lo and d[sel].max() <= hi
    assert p.j.min() >= 0 and p.i.max() <= 99
    assert torch.equal(dg.sample_pairs(100, p.buckets, 50, seed=3).i, p.i)  # seeded


def test_band_logits_sum_to_the_full_gqa_logit():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(30, 4, 16, generator=g), torch.randn(30, 2, 16, generator=g)
    qi, kj = torch.randint(0, 30, (50,), generator=g), torch.randint(0, 30, (50,), generator=g)
    bands = make_bands(8, BandConfig(4))
    bl = dg.band_logits(q, k, qi, kj, dg._band_of_dim(bands, 16, 16), 4, 0.25)
    full = (q[qi] * k[kj].repeat_interleave(2, dim=1)).sum(-1) * 0.25  # transformers' repeat_kv order
    torch.testing.assert_close(bl.sum(-1), full)
    band1 = (q[qi][..., [2, 3, 10, 11]] * k[kj].repeat_interleave(2, dim=1)[..., [2, 3, 10, 11]]).sum(-1) * 0.25
    torch.testing.assert_close(bl[..., 1], band1)


# ----------------------------------------------------------------------------- settings


def test_diag_config_round_trip_and_messages():
    c = dg.DiagConfig(bands=BandConfig(6, "yarn"), ip_lengths=(64, 128), capture_length=256, noise_layers=(0, 1),
                      bucket_edges=(1, 8, 64))
    assert dg.DiagConfig.from_dict(c.to_dict()) == c
    for kw, msg in [(dict(eps=0.7), "eps"), (dict(bands=BandConfig(3)), "4 to 16"), (dict(n_docs=0), "n_docs"),
                    (dict(bucket_edges=(4, 2)), "increasing"), (dict(capture_length=2), "capture length")]:
        with pytest.raises(ConfigError, match=msg):
            dg.DiagConfig(**kw)
    with pytest.raises(ConfigError, match="must exceed the trained context"):
        dg.DiagConfig(capture_length=64).resolve(64, 2)
    with pytest.raises(ConfigError, match="layers 0..1"):
        dg.DiagConfig(noise_layers=(5,)).resolve(64, 2)
    with pytest.raises(ConfigError, match="Unknown diagnostics settings"):
        dg.DiagConfig.from_dict({"bandz": 4})
    assert dg.DiagConfig().resolve(64, 30)["noise_layers"] == (0, 10, 19, 29)


# ----------------------------------------------------------------------------- the run on tiny models


def _workbench(tmp_path, model=None):
    path = save_tiny(tmp_path / "m", model)
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(TEXT[i * 7:] + TEXT * 3)
    return Workbench(models.load_model(path, device="cpu")), str(corpus)


CFG = dg.DiagConfig(bands=BandConfig(4), capture_length=160, n_docs=2, noise_pairs=16, eps=0.01)


def _outputs(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("qcfg", [quant.QuantConfig(method="rtn", bits=16), quant.QuantConfig(method="none")])
def test_identity_quantizer_gives_zero_noise_and_equal_tails(tmp_path, qcfg):
    wb, corpus = _workbench(tmp_path)
    wb.set_pi(rope.PIConfig("yarn", 4.0))
    wb.set_quant(qcfg)
    res = dg.run_diagnostics(wb, corpus, CFG)
    assert (res.tables["logit_noise"].rms_err == 0).all()
    assert (res.tables["logit_noise"].rms_fp > 0).all()
    assert (res.tables["quant_error"].rel_err == 0).all()
    tir = res.tables["tir"].set_index(["variant", "kind", "layer", "proj", "band"]).tir
    pd.testing.assert_series_equal(tir["fp"], tir["quant"])


def test_rtn_run_tables_hooks_removed_and_model_unchanged(tmp_path):
    wb, corpus = _workbench(tmp_path)
    wb.set_pi(rope.PIConfig("yarn", 4.0))
    qcfg = quant.QuantConfig(method="rtn", bits=3, group_size=16)
    wb.set_quant(qcfg)
    ids = torch.randint(3, 128, (1, 100))
    with wb.variant("fp"):
        before_fp = _outputs(wb.model, ids)
    before_q = _outputs(wb.model, ids)
    seen = []
    res = dg.run_diagnostics(wb, corpus, CFG, progress=lambda f, m: seen.append(f))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wb.model.modules())
    assert torch.equal(_outputs(wb.model, ids), before_q)
    with wb.variant("fp"):
        assert torch.equal(_outputs(wb.model, ids), before_fp)
    assert seen == sorted(seen) and seen[-1] == 1.0

    t = res.tables
    assert set(t) == {"pairs", "ip", "tir", "quant_error", "logit_noise", "logit_noise_pooled"}
    assert len(t["tir"]) == 2 * 2 * 2 * 2 * 4  # variant x kind x layer x proj x band
    assert (t["tir"].n_long == t["tir"].n_short * (160 - 64) / 64).all()
    noise = t["logit_noise"]
    assert (noise.rms_err > 0).all() and noise.n_pairs.eq(16 * 2).all()
    iso = noise[noise["mode"] == "isolated"].set_index(["layer", "band", "bucket_lo"]).rms_err
    acc = noise[noise["mode"] == "accumulated"].set_index(["layer", "band", "bucket_lo"]).rms_err
    pd.testing.assert_series_equal(iso.loc[0], acc.loc[0])  # layer 0's input is the (unquantized) embedding
    assert (iso.loc[1] != acc.loc[1]).any()

    # per-band weight error equals fake_quant on the band's rows (RTN grids are per row)
    with wb.variant("fp"):
        L = models.attention_layers(wb.model)[1]
        w = L.k_weight().detach().clone()
    rows = proj_rows(range(2, 4), L.head_dim, L.rotary_dim, L.n_kv_heads)
    want = float(torch.linalg.norm(quant.fake_quant(w, qcfg)[rows] - w[rows]) / torch.linalg.norm(w[rows]))
    got = t["quant_error"].set_index(["layer", "proj", "band"]).rel_err[(1, "k", 1)]
    assert got == pytest.approx(want, rel=1e-6)

    res.write(tmp_path / "out")
    back = dg.DiagResult.read(tmp_path / "out")
    assert back.settings["capture_length"] == 160 and back.settings["pi"]["rope_type"] == "yarn"
    for name, df in res.tables.items():
        assert (tmp_path / "out" / f"{name}.csv").exists()
        pd.testing.assert_frame_equal(back.tables[name], df, check_dtype=False)


def test_cancel_raises_and_leaves_the_model_as_it_was(tmp_path):
    wb, corpus = _workbench(tmp_path)
    wb.set_quant(quant.QuantConfig(method="rtn", bits=4, group_size=16))
    ids = torch.randint(3, 128, (1, 50))
    before = _outputs(wb.model, ids)
    cancel = threading.Event()

    def progress(f, msg):
        if "window 2" in msg:
            cancel.set()
    with pytest.raises(Cancelled):
        dg.run_diagnostics(wb, corpus, CFG, progress=progress, cancel=cancel)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wb.model.modules())
    assert torch.equal(_outputs(wb.model, ids), before)


def test_qwen2_with_biases_and_too_short_corpus(tmp_path):
    wb, corpus = _workbench(tmp_path, tiny_qwen2())
    wb.set_quant(quant.QuantConfig(method="rtn", bits=4, group_size=32))
    res = dg.run_diagnostics(wb, corpus, dg.DiagConfig(bands=BandConfig(4), capture_length=128, n_docs=1,
                                                       noise_pairs=8, axis=False))
    assert set(res.tables["tir"].kind) == {"W"} and res.tables["tir"].tir.notna().all()
    with pytest.raises(DataError, match="shorter capture length"):
        dg.run_diagnostics(wb, corpus, dg.DiagConfig(bands=BandConfig(4), capture_length=100000))
