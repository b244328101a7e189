"""rope.py and bands.py: s_j against independent formulas for every rope_type, the model's own
rotary buffers after apply_pi, band partitions, YaRN alignment, and rotate_half rows under GQA."""

import math

import pytest
import torch
from transformers import LlamaConfig

from conftest import tiny_llama
from qroar import rope
from qroar.bands import BandConfig, bands_for, head_rows, make_bands, proj_rows, yarn_ramp
from qroar.errors import ConfigError
from qroar.models import attention_layers

D, THETA, L0 = 128, 10000.0, 4096  # Llama-2-7B


def llama2_config():
    return LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=1,
                       intermediate_size=64, vocab_size=32, max_position_embeddings=L0,
                       rope_parameters={"rope_type": "default", "rope_theta": THETA})


def omega64():
    return THETA ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)


def yarn_s(factor, beta_fast=32.0, beta_slow=1.0):
    """YaRN's reference code: linear ramp over pair index between the pairs doing beta_fast and beta_slow
    turns over the original context (floored / ceiled), extrapolate above, interpolate below."""
    def pair_at(turns):
        return D * math.log(L0 / (turns * 2 * math.pi)) / (2 * math.log(THETA))
    low, high = math.floor(pair_at(beta_fast)), math.ceil(pair_at(beta_slow))
    j = torch.arange(D // 2, dtype=torch.float64)
    extrapolate = 1 - ((j - low) / (high - low)).clamp(0, 1)  # 1 = keep omega, 0 = omega / factor
    inv = omega64() / factor * (1 - extrapolate) + omega64() * extrapolate
    return omega64() / inv, (low, high)


def llama3_s(factor, low_ff=1.0, high_ff=4.0):
    """Llama 3.1's release code: wavelengths below L0/high_ff kept, above L0/low_ff divided by factor, smooth between."""
    w = omega64()
    lam = 2 * math.pi / w
    smooth = (L0 / lam - low_ff) / (high_ff - low_ff)
    inv = torch.where(lam < L0 / high_ff, w, torch.where(lam > L0 / low_ff, w / factor, (1 - smooth) * w / factor + smooth * w))
    return w / inv


@pytest.mark.parametrize("rope_type", rope.ROPE_TYPES)
def test_s_j_matches_independent_formula_for_every_rope_type(rope_type):
    cfg, f = llama2_config(), 8.0
    seq = 4 * L0
    pi = rope.PIConfig(rope_type, f if rope_type != "default" else 1.0)
    fr = rope.frequencies(cfg, pi, seq_len=seq)
    w = omega64()
    torch.testing.assert_close(fr.omega.double(), w, rtol=1e-6, atol=0)
    if rope_type == "default":
        want = torch.ones(D // 2, dtype=torch.float64)
    elif rope_type == "linear":
        want = torch.full((D // 2,), f, dtype=torch.float64)
    elif rope_type == "dynamic":  # NTK-aware base change at the current length
        base = THETA * ((f * seq / L0) - (f - 1)) ** (D / (D - 2))
        want = (base / THETA) ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    elif rope_type == "yarn":
        want, _ = yarn_s(f)
        assert fr.attention_factor == pytest.approx(0.1 * math.log(f) + 1)
    elif rope_type == "longrope":  # the engine's default long factors: 1 .. factor, linear in j
        want = 1 + (f - 1) * torch.arange(D // 2, dtype=torch.float64) / (D // 2 - 1)
    else:
        want = llama3_s(f)
    torch.testing.assert_close(fr.s.double(), want, rtol=2e-5, atol=0)
    assert fr.trained_context == L0


def test_yarn_reference_code_differs_from_the_paper_formula_only_inside_the_ramp():
    """The YaRN paper writes the ramp in r = L0 / wavelength; the code (and transformers) ramps linearly
    in the pair index with floored/ceiled ends. Outside [low, high] they agree exactly."""
    s_code, (low, high) = yarn_s(8.0)
    r = L0 * omega64() / (2 * math.pi)
    gamma = ((r - 1.0) / (32.0 - 1.0)).clamp(0, 1)
    s_paper = 1 / ((1 - gamma) / 8.0 + gamma)
    outside = (torch.arange(D // 2) < low) | (torch.arange(D // 2) >= high)
    torch.testing.assert_close(s_code[outside], s_paper[outside])
    assert (s_code[~outside] - s_paper[~outside]).abs().max() > 0.1
    assert (low, high) == (20, 46)


@pytest.mark.parametrize("pi", [rope.PIConfig("linear", 4.0), rope.PIConfig("yarn", 4.0), rope.PIConfig("llama3", 4.0, 32)])
def test_apply_pi_puts_the_engine_frequencies_into_the_model(pi):
    model = tiny_llama()
    base = rope.rope_parameters(model.config)
    rope.apply_pi(model, pi, base)
    fr = rope.frequencies(model.config, pi, base_params=base)
    rot = rope.rotary_modules(model)[0]
    torch.testing.assert_close(rot.inv_freq.float(), fr.inv_freq)
    assert rot.attention_scaling == pytest.approx(fr.attention_factor)
    rope.apply_pi(model, rope.PIConfig(), base)  # back to the trained setting: PI never stacks
    torch.testing.assert_close(rope.rotary_modules(model)[0].inv_freq.float(), fr.omega)


# ----------------------------------------------------------------------------- bands


@pytest.mark.parametrize("n_pairs,n_bands", [(64, 8), (64, 5), (32, 16), (8, 4), (50, 7)])
def test_log_bands_are_contiguous_near_equal_and_cover_every_pair(n_pairs, n_bands):
    b = make_bands(n_pairs, BandConfig(n_bands))
    sizes = [len(r) for r in b.ranges()]
    assert b.edges[0] == 0 and b.edges[-1] == n_pairs and len(sizes) == n_bands
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert b.band_of().tolist() == sorted(b.band_of().tolist())


def test_yarn_aligned_bands_have_edges_on_the_ramp_boundaries():
    fr = rope.frequencies(llama2_config(), rope.PIConfig("yarn", 8.0))
    b = bands_for(fr, BandConfig(8, align="yarn"))
    _, (low, high) = yarn_s(8.0)
    assert yarn_ramp(D, THETA, L0) == (low, high)
    assert low in b.edges and high in b.edges and b.n_bands == 8 and b.n_pairs == D // 2
    # no band mixes extrapolated (s = 1), ramped and interpolated (s = 8) pairs
    for r in b.ranges():
        s = fr.s[r.start : r.stop]
        assert bool((s < 1 + 1e-4).all()) or bool((s > 8 - 1e-3).all()) or (r.start >= low and r.stop <= high)


def test_band_config_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="at most 8"):
        make_bands(8, BandConfig(9))
    with pytest.raises(ConfigError, match="alignment"):
        make_bands(8, BandConfig(4, align="mel"))
    assert BandConfig.from_dict(BandConfig(6, "yarn").to_dict()) == BandConfig(6, "yarn")


def test_rotate_half_rows_pair_j_with_j_plus_half_rotary_dim_in_every_head():
    assert head_rows(range(1, 3), 16).tolist() == [1, 2, 9, 10]
    assert head_rows(range(0, 2), 8).tolist() == [0, 1, 4, 5]  # partial rotary: rotary_dim 8 of a 16-dim head
    rows = proj_rows(range(1, 3), head_dim=16, rotary_dim=16, n_heads=2, offset=100)
    assert rows.tolist() == [101, 102, 109, 110, 117, 118, 125, 126]


def _scale_rows(lin, rows, g):
    with torch.no_grad():
        lin.weight[rows] *= g


@pytest.mark.parametrize("band", [0, 2, 3])
def test_symmetric_band_rescale_leaves_gqa_model_unchanged(band):
    """q rows of band b times g, k rows times 1/g: every q.k logit is unchanged only if the rows are the
    rotate_half pairs in every query head and every key/value head."""
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    bands = make_bands(8, BandConfig(4))
    r = bands.ranges()[band]
    for L in attention_layers(model):
        _scale_rows(L.q_lin, proj_rows(r, L.head_dim, L.rotary_dim, L.n_heads), 3.0)
        _scale_rows(L.k_lin, proj_rows(r, L.head_dim, L.rotary_dim, L.n_kv_heads), 1 / 3.0)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_interleaved_rows_would_not_be_invariant():
    """Negative control: the same scaling on interleaved rows (2j, 2j+1) changes the output."""
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    for L in attention_layers(model):
        for lin, nh, g in ((L.q_lin, L.n_heads, 3.0), (L.k_lin, L.n_kv_heads, 1 / 3.0)):
            rows = torch.cat([h * L.head_dim + torch.tensor([2, 3]) for h in range(nh)])
            _scale_rows(lin, rows, g)
    assert (model(ids).logits - ref).abs().max() > 1e-3
