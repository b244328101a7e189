"""RTN primitives, settings, the registry, row-scale equivariance, and model-level RTN."""

import threading

import pytest
import torch
from conftest import tiny_llama

from qroar.errors import Cancelled, ConfigError
from qroar.quant import (
    PER_TENSOR, QUANTIZERS, QuantConfig, dequantize, fake_quant, group_qparams, is_row_scale_equivariant,
    quant_targets, quantize, quantize_model, requantize_rows, restore,
)


def rtn(bits, group_size, symmetric=False, **kw):
    return QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric, **kw)


# ----------------------------------------------------------------------------- known answers

def test_asymmetric_per_channel_known_answer():
    w = torch.tensor([[-1.0, 0.4, 2.0, 1.3], [0.2, 0.9, 3.0, 1.6]])
    # row 0: range [-1, 2] -> scale 1, zero 1; row 1: range [0, 3] (0 included) -> scale 1, zero 0
    scale, zero = group_qparams(w, 2, 0, False)
    assert torch.equal(scale, torch.tensor([[1.0], [1.0]]))
    assert torch.equal(zero, torch.tensor([[1.0], [0.0]]))
    codes = quantize(w, scale, zero, 2, 0)
    assert codes.tolist() == [[0, 1, 3, 2], [0, 1, 3, 2]]
    expected = torch.tensor([[-1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 3.0, 2.0]])
    assert torch.equal(dequantize(codes, scale, zero, 0), expected)
    assert torch.equal(fake_quant(w, rtn(2, 0)), expected)


def test_symmetric_per_channel_known_answer():
    w = torch.tensor([[-3.0, 1.2, 0.4, 2.6], [6.0, -1.1, 0.0, 4.4]])
    # 3 bits symmetric: scale = max|w| / 3, zero = 4
    scale, zero = group_qparams(w, 3, -1, True)
    assert torch.equal(scale, torch.tensor([[1.0], [2.0]]))
    assert torch.equal(zero, torch.tensor([[4.0], [4.0]]))
    assert quantize(w, scale, zero, 3, -1).tolist() == [[1, 5, 4, 7], [7, 3, 4, 6]]
    assert torch.equal(fake_quant(w, rtn(3, -1, True)), torch.tensor([[-3.0, 1.0, 0.0, 3.0], [6.0, -2.0, 0.0, 4.0]]))


def test_asymmetric_grouped_known_answer():
    w = torch.tensor([[-1.0, 0.4, 2.0, 1.3]])
    # group [-1, 0.4]: scale 1.4/3, zero round(1 / (1.4/3)) = 2; group [2, 1.3]: range [0, 2], scale 2/3, zero 0
    scale, zero = group_qparams(w, 2, 2, False)
    torch.testing.assert_close(scale, torch.tensor([[1.4 / 3, 2 / 3]]))
    assert torch.equal(zero, torch.tensor([[2.0, 0.0]]))
    assert quantize(w, scale, zero, 2, 2).tolist() == [[0, 3, 3, 2]]
    torch.testing.assert_close(fake_quant(w, rtn(2, 2)), torch.tensor([[-2.8 / 3, 1.4 / 3, 2.0, 4 / 3]]))


def test_symmetric_grouped_known_answer():
    w = torch.tensor([[-3.0, 1.2, 0.4, 2.6]])
    # group [-3, 1.2]: scale 1; group [0.4, 2.6]: scale 2.6/3, 0.4 rounds to 0
    torch.testing.assert_close(fake_quant(w, rtn(3, 2, True)), torch.tensor([[-3.0, 1.0, 0.0, 2.6]]))


def test_fake_quant_equals_quantize_then_dequantize():
    w = torch.randn(8, 32)
    for bits, gs, sym in [(4, 8, False), (3, 0, True), (8, 16, True), (2, PER_TENSOR, False)]:
        scale, zero = group_qparams(w, bits, gs, sym)
        codes = quantize(w, scale, zero, bits, gs)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        torch.testing.assert_close(fake_quant(w, rtn(bits, gs, sym)), dequantize(codes, scale, zero, gs))


def test_all_zero_group_gives_zero_not_nan():
    w = torch.zeros(3, 8)
    w[0, 4:] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for sym in (False, True):
        out = fake_quant(w, rtn(4, 4, sym))
        assert torch.isfinite(out).all()
        assert torch.equal(out[1:], torch.zeros(2, 8)) and torch.equal(out[0, :4], torch.zeros(4))


def test_sixteen_bits_is_identity():
    w = torch.randn(6, 16, dtype=torch.bfloat16)
    for method in ("none", "rtn"):
        assert torch.equal(QUANTIZERS[method](w, QuantConfig(method=method, bits=16)), w)


def test_returns_input_dtype_and_error_bounded_by_half_step():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    out = fake_quant(w, rtn(4, 16))
    assert out.dtype == torch.bfloat16
    scale, _ = group_qparams(w, 4, 16, False)
    err = (out.float() - w.float()).abs().reshape(16, 4, 16)
    assert (err <= scale[..., None] * 0.5 + 1e-2).all()  # bf16 output adds its own rounding


def test_row_slice_equals_rows_of_full_quantization():
    w = torch.randn(24, 64)
    rows = torch.tensor([1, 5, 6, 17, 23])
    for gs, sym in [(16, False), (16, True), (0, False), (-1, True)]:
        cfg = rtn(3, gs, sym)
        assert torch.equal(fake_quant(w[rows], cfg), fake_quant(w, cfg)[rows])


# ----------------------------------------------------------------------------- settings

def test_config_round_trip_and_validation():
    cfg = QuantConfig(method="gptq", bits=3, group_size=128, symmetric=True, scope="qk", act_order=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad in [dict(bits=1), dict(bits=9), dict(method="hqq"), dict(scope="mlp"), dict(group_size=-3),
                dict(damp=0.0)]:
        with pytest.raises(ConfigError):
            QuantConfig(**bad).validate()
    with pytest.raises(ConfigError, match="wbits"):
        QuantConfig.from_dict({"wbits": 4})
    assert QuantConfig(bits=16).validate().is_identity


# ----------------------------------------------------------------------------- equivariance (the trap)

def test_symmetric_rescale_is_noop_under_rowwise_rtn():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    g = torch.exp(torch.empty(32, 1).uniform_(-0.7, 0.7))  # random positive row scales
    for gs, sym in [(16, False), (16, True), (0, False), (0, True)]:
        cfg = rtn(4, gs, sym)
        assert is_row_scale_equivariant(cfg)
        a, b = fake_quant(g * w, cfg), g * fake_quant(w, cfg)
        scale, _ = group_qparams(g * w, 4, gs, sym)
        step = scale.repeat_interleave(64 // scale.shape[1], dim=1)
        assert ((a - b).abs() <= step * 1.001).all()      # at most one rounding step apart
        assert (a - b).abs().le(1e-5 * step).float().mean() > 0.98  # and almost always identical
        pow2 = 2.0 ** torch.randint(-3, 4, (32, 1)).float()
        assert torch.equal(fake_quant(pow2 * w, cfg), pow2 * fake_quant(w, cfg))


def test_per_tensor_grid_is_not_row_scale_equivariant():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    cfg = rtn(4, PER_TENSOR)
    assert not is_row_scale_equivariant(cfg)
    g = torch.ones(32, 1)
    g[:4] = 4.0  # a power of two: any equivariant grid would give exactly g Q(W)
    diff = (fake_quant(g * w, cfg) - g * fake_quant(w, cfg)).abs()
    assert diff[4:].max() > 0.1  # rows that were not scaled change, since the shared grid moved


def test_equivariance_flags():
    assert is_row_scale_equivariant(QuantConfig(method="gptq", group_size=128))
    assert not is_row_scale_equivariant(QuantConfig(method="awq"))
    assert not is_row_scale_equivariant(QuantConfig(method="gptq", group_size=PER_TENSOR))
    assert is_row_scale_equivariant(QuantConfig(method="awq", bits=16))


# ----------------------------------------------------------------------------- model level

def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_quant_targets_scopes(llama):
    names = [n for n, _ in quant_targets(llama, "linear")]
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert [n for n, _ in quant_targets(llama, "qk")][:2] == ["model.layers.0.self_attn.q_proj",
                                                             "model.layers.0.self_attn.k_proj"]
    assert {n.rsplit(".", 1)[1] for n, _ in quant_targets(llama, "attention")} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_rtn_quantize_model_and_exact_restore(llama):
    before = weights(llama)
    state = quantize_model(llama, rtn(4, 32))
    after = weights(llama)
    for name in state.originals:
        assert not torch.equal(after[name + ".weight"], before[name + ".weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    q = "model.layers.1.self_attn.q_proj"
    assert torch.equal(after[q + ".weight"], fake_quant(before[q + ".weight"], rtn(4, 32)))
    restore(llama, state)
    assert all(torch.equal(p, before[n]) for n, p in weights(llama).items())


def test_scope_qk_touches_only_q_and_k(llama):
    before = weights(llama)
    state = quantize_model(llama, rtn(3, 0, scope="qk"), offload=True)
    assert sorted({n.rsplit(".", 1)[1] for n in state.originals}) == ["k_proj", "q_proj"]
    assert all(w.device.type == "cpu" for w in state.originals.values())
    changed = {n for n, p in weights(llama).items() if not torch.equal(p, before[n])}
    assert changed == {n + ".weight" for n in state.originals}


def test_group_size_error_names_layer_and_widths():
    model = tiny_llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)  # 96 = 3 x 32
    with pytest.raises(ConfigError) as e:
        quantize_model(model, rtn(4, 64))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "96" in msg and "16, 32" in msg


def test_sixteen_bits_model_is_untouched(llama):
    before = weights(llama)
    state = quantize_model(llama, rtn(16, 32))
    assert not state.originals and all(torch.equal(p, before[n]) for n, p in weights(llama).items())


def test_requantize_rows_matches_full_quantization(llama):
    q = "model.layers.0.self_attn.q_proj"
    for cfg in (rtn(4, 16), rtn(4, PER_TENSOR)):
        state = quantize_model(llama, cfg)
        rows = torch.arange(8, 16)
        w = state.originals[q]
        assert torch.equal(requantize_rows(state, q, w[rows], rows), llama.get_submodule(q).weight[rows])
        restore(llama, state)


def test_cancel_restores_model(llama):
    before = weights(llama)
    cancel = threading.Event()
    calls = []

    def progress(frac, msg):
        calls.append(frac)
        if len(calls) == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        quantize_model(llama, rtn(4, 32), progress=progress, cancel=cancel)
    assert len(calls) == 3
    assert all(torch.equal(p, before[n]) for n, p in weights(llama).items())
