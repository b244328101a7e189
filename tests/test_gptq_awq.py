"""GPTQ and AWQ: layer error against RTN, identities, calibration, and the model-level pipeline."""

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2

from qroar.calib import calibration_batches
from qroar.errors import ConfigError, DataError
from qroar.quant import (
    QUANTIZERS, AWQStats, QuantConfig, awq_search_clip, awq_search_scales, fake_quant, gptq_quantize,
    hessian_stats, quantize_model, requantize_rows, restore,
)


def correlated_inputs(n=512, d=64, seed=0):
    """Activations with strongly correlated channels, so the Hessian is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


def out_err(x, w, w_hat):
    return (x @ w.T - x @ w_hat.T).norm().item()


# ----------------------------------------------------------------------------- GPTQ on one weight

@pytest.mark.parametrize("sym,gs,act_order", [(False, 16, False), (True, 16, False), (False, 0, False), (True, 16, True)])
def test_gptq_layer_error_below_rtn(sym, gs, act_order):
    torch.manual_seed(1)
    x, w = correlated_inputs(), torch.randn(48, 64)
    cfg = QuantConfig(method="gptq", bits=3, group_size=gs, symmetric=sym, act_order=act_order, block_size=32)
    h = 2 * x.T @ x / x.shape[0]
    gptq, rtn = QUANTIZERS["gptq"](w, cfg, h), fake_quant(w, cfg)
    assert out_err(x, w, gptq) < 0.7 * out_err(x, w, rtn)


def test_gptq_output_lies_on_the_grid():
    torch.manual_seed(0)
    x, w = correlated_inputs(), torch.randn(8, 64)
    cfg = QuantConfig(method="gptq", bits=2, group_size=0, act_order=True)  # static per-channel grid
    q = QUANTIZERS["gptq"](w, cfg, 2 * x.T @ x / 512)
    assert all(len(torch.unique(row)) <= 4 for row in q)


def test_gptq_with_identity_hessian_is_rtn():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for gs, sym in [(16, False), (0, True)]:
        cfg = QuantConfig(method="gptq", bits=4, group_size=gs, symmetric=sym, block_size=24)
        assert torch.equal(QUANTIZERS["gptq"](w, cfg, torch.eye(64)), fake_quant(w, cfg))


def test_gptq_rows_are_independent_and_row_scale_equivariant():
    torch.manual_seed(0)
    x, w = correlated_inputs(), torch.randn(32, 64)
    cfg = QuantConfig(method="gptq", bits=4, group_size=16)
    stats = hessian_stats(2 * x.T @ x / 512, cfg)
    full = gptq_quantize(w, stats, cfg)
    rows = torch.tensor([0, 3, 9, 31])
    torch.testing.assert_close(gptq_quantize(w[rows], stats, cfg), full[rows], rtol=0, atol=1e-6)
    pow2 = 2.0 ** torch.randint(-2, 3, (32, 1)).float()
    torch.testing.assert_close(gptq_quantize(pow2 * w, stats, cfg), pow2 * full, rtol=0, atol=1e-5)


def test_gptq_needs_statistics():
    with pytest.raises(ConfigError, match="calibration"):
        QUANTIZERS["gptq"](torch.randn(4, 8), QuantConfig(method="gptq", group_size=0))


# ----------------------------------------------------------------------------- AWQ on one weight

def outlier_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [3, 17, 40, 41]] *= 25.0  # a few large-magnitude channels, as in real activations
    return x


@pytest.mark.parametrize("clip", [False, True])
def test_awq_output_error_below_rtn_with_outlier_channels(clip):
    torch.manual_seed(2)
    x, w = outlier_inputs(), torch.randn(48, 64)
    cfg = QuantConfig(method="awq", bits=3, group_size=16, awq_clip=clip)
    s = awq_search_scales([w], x, x.abs().mean(0), cfg)
    assert not torch.allclose(s, torch.ones_like(s))  # the search picked alpha > 0
    c = awq_search_clip(w * s, x / s, cfg) if clip else None
    awq = QUANTIZERS["awq"](w, cfg, AWQStats(s, c))
    assert out_err(x, w, awq) < 0.8 * out_err(x, w, fake_quant(w, cfg))


def test_awq_with_unit_scales_is_rtn():
    w = torch.randn(8, 32)
    cfg = QuantConfig(method="awq", bits=4, group_size=8)
    assert torch.equal(QUANTIZERS["awq"](w, cfg, AWQStats(torch.ones(32))), fake_quant(w, cfg))


def test_sixteen_bits_gptq_and_awq_are_identity():
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    assert torch.equal(QUANTIZERS["gptq"](w, QuantConfig(method="gptq", bits=16)), w)
    assert torch.equal(QUANTIZERS["awq"](w, QuantConfig(method="awq", bits=16)), w)


# ----------------------------------------------------------------------------- calibration

def docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (40, 300, 90)]


def test_calibration_windows_are_inside_documents_and_reproducible():
    d = docs()
    a = list(calibration_batches(d, 6, 64, seed=3))
    assert len(a) == 6 and all(b.shape == (1, 64) and b.dtype == torch.long for b in a)
    text = [" ".join(map(str, doc)) for doc in d]
    assert all(any(" ".join(map(str, b[0].tolist())) in t for t in text[1:]) for b in a)  # 40 is too short
    assert all(torch.equal(x, y) for x, y in zip(a, calibration_batches(d, 6, 64, seed=3)))


def test_calibration_too_short_raises():
    with pytest.raises(DataError, match="300"):
        next(calibration_batches(docs(), 2, 400, 0))


# ----------------------------------------------------------------------------- model level

def calib(n=4, seq_len=32):
    return calibration_batches(docs(), n, seq_len, seed=0)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_model_and_restore(factory, method):
    model = factory()
    before = params(model)
    ids = torch.randint(3, 128, (1, 24))
    ref = model(ids).logits
    cfg = QuantConfig(method=method, bits=4, group_size=16, n_samples=4, seq_len=32, awq_grid=8)
    fracs = []
    state = quantize_model(model, cfg, calib(), progress=lambda f, m: fracs.append(f))
    assert fracs[-1] == 1.0 and fracs == sorted(fracs)
    assert len(state.originals) == 14
    assert sorted(state.stats) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk")
    changed = {n for n, p in params(model).items() if not torch.equal(p, before[n])}
    assert changed == {n + ".weight" for n in state.originals}
    assert torch.isfinite(model(ids).logits).all()
    q = "model.layers.1.self_attn.q_proj"
    rows = torch.tensor([2, 3, 18, 19])
    got = requantize_rows(state, q, state.originals[q][rows], rows)
    torch.testing.assert_close(got, model.get_submodule(q).weight[rows], rtol=0, atol=1e-6)
    restore(model, state)
    assert all(torch.equal(p, before[n]) for n, p in params(model).items())
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_layerwise_hessian_matches_hand_computed_inputs(llama):
    """GPTQ's Hessian for layer 0 q_proj is 2 X^T X / n of the normed embeddings of the samples."""
    batches = list(calib(3, 16))
    xs = []
    h = llama.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64)))
    for b in batches:
        llama(b)
    h.remove()
    x = torch.cat(xs)
    cfg = QuantConfig(method="gptq", bits=4, group_size=16)
    state = quantize_model(llama, cfg, batches)
    h = 2 * x.T @ x / x.shape[0]
    u = state.stats["model.layers.0.self_attn.q_proj"].hinv  # upper Cholesky factor of (H + damp)^-1
    got = torch.linalg.inv(u.T.double() @ u.double()).float()
    expected = h + cfg.damp * h.diagonal().mean() * torch.eye(64)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


def test_awq_shares_scales_across_qkv(qwen2):
    state = quantize_model(qwen2, QuantConfig(method="awq", bits=3, group_size=16, awq_grid=6, awq_clip=False), calib())
    s = state.stats
    assert torch.equal(s["model.layers.0.self_attn.q_proj"].scales, s["model.layers.0.self_attn.k_proj"].scales)
    assert not torch.equal(s["model.layers.0.self_attn.q_proj"].scales, s["model.layers.1.self_attn.q_proj"].scales)


def test_gptq_at_eight_bits_keeps_logits_close(llama):
    ids = torch.randint(3, 128, (1, 24))
    ref = llama(ids).logits
    quantize_model(llama, QuantConfig(method="gptq", bits=8, group_size=16), calib())
    assert (llama(ids).logits - ref).abs().max() < 0.02 * ref.abs().max()


def test_calibrated_methods_need_data(llama):
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(llama, QuantConfig(method="awq"))
    state = quantize_model(llama, QuantConfig(method="gptq", bits=16))
    assert not state.originals


def test_cancel_mid_gptq_restores_model(llama):
    import threading

    from qroar.errors import Cancelled
    before = params(llama)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        quantize_model(llama, QuantConfig(method="gptq", bits=3, group_size=16), calib(),
                       progress=lambda f, m: cancel.set(), cancel=cancel)  # set after layer 1 of 2
    assert all(torch.equal(p, before[n]) for n, p in params(llama).items())
