"""Per-band rescaling: which rows move, what it does to attention logits, and the invariance trap."""

import math

import pytest
import torch
from conftest import save_tiny, tiny_llama, tiny_qwen2

from qroar import quant
from qroar.bands import BandConfig, make_bands
from qroar.errors import ConfigError
from qroar.quant import QuantConfig
from qroar.rescale import ScaleConfig, check_scales, invariance_note, rescale_model
from qroar.workbench import Workbench

RTN = QuantConfig(method="rtn", bits=3, group_size=32)


# ----------------------------------------------------------------------------- capturing post-RoPE q and k


def _capture_fn(store):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fn(module, q, k, v, mask, **kw):
        store.append((q.detach().clone(), k.detach().clone()))
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    return fn


def post_rope_qk(model, ids):
    """[(q (B,H,T,D), k (B,Hkv,T,D))] per layer, as the attention kernel receives them."""
    from transformers import AttentionInterface

    store = []
    AttentionInterface.register("qroar_test_capture", _capture_fn(store))
    before = model.config._attn_implementation
    model.set_attn_implementation("qroar_test_capture")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    return store


def band_logits(q, k, dims):
    """q_b . k_b for the head dims `dims`: (B, H, T, T), key heads repeated for GQA."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    return torch.einsum("bhtd,bhsd->bhts", q[..., dims].double(), k[..., dims].double())


def head_dims_of(pairs, rotary_dim):
    j = torch.arange(pairs.start, pairs.stop)
    return torch.cat([j, j + rotary_dim // 2])  # rotate_half: pair j is dims j and j + d/2


IDS = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- settings and validation


@pytest.mark.parametrize("bad,band", [([1.0, 0.0, 1.0, 1.0], 1), ([1.0, 1.0, -2.0, 1.0], 2),
                                      ([float("nan"), 1.0, 1.0, 1.0], 0), ([1.0, 1.0, 1.0, float("inf")], 3)])
def test_bad_scales_raise_config_error_naming_the_band(bad, band):
    with pytest.raises(ConfigError, match=f"band {band}"):
        check_scales(bad, 4)


def test_scale_count_and_config_are_validated():
    with pytest.raises(ConfigError, match="3 scales for 4 bands"):
        check_scales([1.0, 1.0, 1.0], 4)
    with pytest.raises(ConfigError, match="mode"):
        ScaleConfig(mode="both")
    with pytest.raises(ConfigError, match="order"):
        ScaleConfig(order="during")
    cfg = ScaleConfig("symmetric", "after")
    assert ScaleConfig.from_dict(cfg.to_dict()) == cfg


def test_rows_of_a_band_are_both_rotate_half_rows_in_every_head():
    model = tiny_llama()
    bands = make_bands(8, BandConfig(n_bands=4))  # head_dim 16: 8 pairs, 2 per band
    w_q, w_k = model.model.layers[1].self_attn.q_proj.weight.clone(), model.model.layers[1].self_attn.k_proj.weight.clone()
    rescale_model(model, bands, [1.0, 1.0, 2.0, 1.0], ScaleConfig("shared"))
    attn = model.model.layers[1].self_attn
    changed_q = (attn.q_proj.weight != w_q).any(1).nonzero().flatten().tolist()
    changed_k = (attn.k_proj.weight != w_k).any(1).nonzero().flatten().tolist()
    # band 2 = pairs 4, 5 -> head dims 4, 5, 12, 13; 4 query heads, 2 key heads of 16 dims
    assert changed_q == sorted(h * 16 + d for h in range(4) for d in (4, 5, 12, 13))
    assert changed_k == sorted(h * 16 + d for h in range(2) for d in (4, 5, 12, 13))
    torch.testing.assert_close(attn.q_proj.weight[changed_q], 2 * w_q[changed_q], rtol=0, atol=0)


# ----------------------------------------------------------------------------- full precision: exact effects


def assert_band_logits_times_g2(ref, got, bands, g, rtol=1e-5, atol=1e-6):
    """Layer 0's post-RoPE band logits after shared scaling are g_b^2 times the unscaled ones
    (later layers see a changed input)."""
    (q0, k0), (q1, k1) = ref[0], got[0]
    for b, pairs in enumerate(bands.ranges()):
        dims = head_dims_of(pairs, 16)
        torch.testing.assert_close(band_logits(q1, k1, dims), g[b] ** 2 * band_logits(q0, k0, dims), rtol=rtol, atol=atol)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_shared_mode_multiplies_each_band_logit_by_g_squared(factory):
    model = factory()
    bands = make_bands(8, BandConfig(n_bands=4))
    g = [0.5, 1.3, 0.8, 1.7]
    ref = post_rope_qk(model, IDS)
    rescale_model(model, bands, g, ScaleConfig("shared"))
    got = post_rope_qk(model, IDS)
    assert_band_logits_times_g2(ref, got, bands, g)


def test_shared_mode_scales_qwen2_biases_with_their_rows():
    model = tiny_qwen2()
    attn = model.model.layers[0].self_attn
    b_q = attn.q_proj.bias.clone()
    rescale_model(model, make_bands(8, BandConfig(n_bands=4)), [3.0, 1.0, 1.0, 1.0], ScaleConfig("shared"))
    rows = [h * 16 + d for h in range(4) for d in (0, 1, 8, 9)]
    torch.testing.assert_close(attn.q_proj.bias[rows], 3 * b_q[rows])
    others = [r for r in range(64) if r not in rows]
    assert torch.equal(attn.q_proj.bias[others], b_q[others])


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
def test_symmetric_mode_in_full_precision_leaves_logits_unchanged(factory):
    model = factory()
    with torch.no_grad():
        ref = model(IDS).logits
    r = rescale_model(model, make_bands(8, BandConfig(n_bands=4)), [0.6, 1.4, 0.9, 2.2], ScaleConfig("symmetric"))
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight[r.targets[0].index], r.targets[0].fp)
    r.write("fp")  # the original rows come back bit for bit
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


# ----------------------------------------------------------------------------- the invariance trap


@pytest.fixture
def wb(tmp_path):
    w = Workbench.open(save_tiny(tmp_path / "m"), device="cpu", dtype="fp32")
    w.set_bands(BandConfig(n_bands=4))
    return w


def _logits(wb, variant):
    with wb.variant(variant), torch.no_grad():
        return wb.model(IDS).logits


def test_symmetric_before_rtn_is_exactly_invariant_for_power_of_two_scales(wb):
    wb.set_quant(RTN)
    ref = _logits(wb, "quant")
    wb.set_scales([0.5, 2.0, 4.0, 0.25], ScaleConfig("symmetric", "before"))
    assert torch.equal(_logits(wb, "quant_scaled"), ref)
    assert "rounding" in wb.invariance_note()


def test_symmetric_before_rtn_changes_only_rounding_for_any_scales(wb):
    wb.set_quant(RTN)
    ref = _logits(wb, "quant")
    wb.set_scales([0.7, 1.3, 1.1, 0.85], ScaleConfig("symmetric", "before"))
    sym = (_logits(wb, "quant_scaled") - ref).abs().max()
    assert sym < 1e-5
    # shared mode really changes the model
    wb.set_scales([0.7, 1.3, 1.1, 0.85], ScaleConfig("shared", "before"))
    shared = (_logits(wb, "quant_scaled") - ref).abs().max()
    print(f"max |logit change|: symmetric {sym:.2e}, shared {shared:.2e}")
    assert shared > 100 * sym and shared > 1e-3
    assert wb.invariance_note() is None


def test_symmetric_before_a_per_tensor_grid_is_a_real_change(wb):
    wb.set_quant(QuantConfig(method="rtn", bits=3, group_size=quant.PER_TENSOR))
    ref = _logits(wb, "quant")
    wb.set_scales([0.5, 1.0, 1.0, 1.6], ScaleConfig("symmetric", "before"))
    assert (_logits(wb, "quant_scaled") - ref).abs().max() > 1e-3
    assert wb.invariance_note() is None


def test_invariance_note_cases():
    sym_b, sym_a, shared = ScaleConfig("symmetric", "before"), ScaleConfig("symmetric", "after"), ScaleConfig("shared")
    assert "Q(gW) = g Q(W)" in invariance_note(RTN, sym_b)
    assert invariance_note(QuantConfig(method="gptq", bits=4, group_size=32), sym_b) is not None
    assert invariance_note(RTN, sym_a) is not None
    assert invariance_note(None, sym_b) is not None
    assert invariance_note(RTN, sym_b, has_qk_norm=True) is not None
    assert invariance_note(QuantConfig(method="rtn", group_size=quant.PER_TENSOR), sym_b) is None
    assert invariance_note(RTN, shared) is None


# ----------------------------------------------------------------------------- cheap moves and clean variants


def test_set_band_scale_requantizes_only_that_band(wb, monkeypatch):
    wb.set_quant(RTN)
    wb.set_scales([1.2, 0.8, 1.0, 1.0], ScaleConfig("shared", "before"))
    calls = []
    real = quant.requantize_rows
    monkeypatch.setattr(quant, "requantize_rows", lambda s, n, rows, idx: calls.append((n, len(idx))) or real(s, n, rows, idx))
    wb.set_band_scale(2, 1.5)
    # q and k of 2 layers; band 2 owns 4 dims of each head: 4 q heads -> 16 rows, 2 k heads -> 8 rows
    assert sorted(calls) == sorted([(f"model.layers.{i}.self_attn.{p}_proj", n) for i in range(2) for p, n in (("q", 16), ("k", 8))])
    got = _logits(wb, "quant_scaled")
    monkeypatch.undo()
    wb.set_scales(None)
    wb.set_scales([1.2, 0.8, 1.5, 1.0], ScaleConfig("shared", "before"))  # built from scratch
    assert torch.equal(_logits(wb, "quant_scaled"), got)


def test_scaled_rows_before_and_after_quantization(wb):
    wb.set_quant(RTN)
    layer = "model.layers.0.self_attn.q_proj"
    lin = wb.model.get_submodule(layer)
    rows = torch.tensor([h * 16 + d for h in range(4) for d in (0, 1, 8, 9)])  # band 0
    with wb.variant("fp"):
        w_fp = lin.weight[rows].clone()
    with wb.variant("quant"):
        w_q = lin.weight[rows].clone()
    wb.set_scales([1.37, 1.0, 1.0, 1.0], ScaleConfig("shared", "before"))
    with wb.variant("quant_scaled"):
        torch.testing.assert_close(lin.weight[rows], quant.fake_quant(1.37 * w_fp, RTN))
    wb.set_scales([1.37, 1.0, 1.0, 1.0], ScaleConfig("shared", "after"))
    with wb.variant("quant_scaled"):
        torch.testing.assert_close(lin.weight[rows], 1.37 * w_q)
    with wb.variant("fp_scaled"):
        torch.testing.assert_close(lin.weight[rows], 1.37 * w_fp)


def test_variants_leave_unscaled_weights_bit_for_bit(wb):
    fp = {n: p.clone() for n, p in wb.model.named_parameters()}
    wb.set_quant(RTN)
    q = {n: p.clone() for n, p in wb.model.named_parameters()}
    wb.set_scales([0.6, 1.5, 1.1, 0.9], ScaleConfig("shared", "before"))
    for v in ("quant_scaled", "fp_scaled", "fp", "quant_scaled", "quant", "fp_scaled"):
        wb._put_variant(v)
    with wb.variant("fp"):
        assert all(torch.equal(p, fp[n]) for n, p in wb.model.named_parameters())
    with wb.variant("quant"):
        assert all(torch.equal(p, q[n]) for n, p in wb.model.named_parameters())
    wb._put_variant("fp_scaled")
    wb.set_quant(None)  # restore must bring back clean full-precision weights
    with wb.variant("fp"):
        assert all(torch.equal(p, fp[n]) for n, p in wb.model.named_parameters())
    assert wb.available_variants() == ("fp", "fp_scaled")


# ----------------------------------------------------------------------------- q_norm / k_norm models


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    m = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])).eval()
    with torch.no_grad():  # Gemma initialises its norms at w = 0 (x * (1 + w)): make them non-trivial
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.normal_(0, 0.3)
            layer.self_attn.k_norm.weight.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("factory,offset", [(tiny_qwen3, 0.0), (tiny_gemma3, 1.0)])
def test_qk_norm_models_scale_the_norm_dims(factory, offset):
    model = factory()
    bands = make_bands(8, BandConfig(n_bands=4))
    g = [1.5, 0.7, 1.2, 0.9]
    w_q = model.model.layers[0].self_attn.q_proj.weight.clone()
    ref = post_rope_qk(model, IDS)
    r = rescale_model(model, bands, g, ScaleConfig("shared"))
    assert r.has_qk_norm and r.targets[0].kind == "norm" and r.targets[0].offset == offset
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w_q)  # a row scale would be normalised away
    got = post_rope_qk(model, IDS)
    assert_band_logits_times_g2(ref, got, bands, g, rtol=1e-4, atol=1e-5)
    assert "norm" in invariance_note(RTN, ScaleConfig("symmetric", "before"), r.has_qk_norm)


def test_phi3_fused_qkv_rows_use_the_adapter_offsets():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    bands = make_bands(8, BandConfig(n_bands=4))
    g = [1.4, 0.6, 1.0, 1.9]
    ref = post_rope_qk(model, IDS)
    w = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    rescale_model(model, bands, g, ScaleConfig("shared"))
    got = post_rope_qk(model, IDS)
    assert_band_logits_times_g2(ref, got, bands, g)
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight[96:], w[96:])  # v rows untouched
    assert math.isclose(float((model.model.layers[0].self_attn.qkv_proj.weight[0].detach() / w[0]).mean()), 1.4, rel_tol=1e-6)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_symmetric_before_calibrated_quantizers_changes_only_rounding(wb, tmp_path, method):
    from test_search import make_corpus

    calib = make_corpus(tmp_path / "calib", n_dev=2, n_held=1)["dev"]
    wb.set_quant(QuantConfig(method=method, bits=3, group_size=32, n_samples=2, seq_len=32), calib_corpus=calib)
    ref = _logits(wb, "quant")
    wb.set_scales([0.5, 2.0, 1.3, 0.7], ScaleConfig("symmetric", "before"))
    assert (_logits(wb, "quant_scaled") - ref).abs().max() < 1e-5
    assert wb.invariance_note() is not None  # AWQ too: its searched scales stay frozen when rows are re-quantized
