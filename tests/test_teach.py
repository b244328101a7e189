"""Known answers for the Learn page's computations (qroar.teach)."""

import cmath
import math

import numpy as np
import pytest
import torch

from qroar import teach
from qroar.capture import apply_rope
from qroar.errors import ConfigError
from qroar.quant import PER_TENSOR, QuantConfig
from qroar.rope import PIConfig, frequencies

LLAMA2 = teach.CONFIGS["Llama-2-7B-like (theta 1e4, head dim 128, context 4K)"]


# ----------------------------------------------------------------------------- 1. anisotropy


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 2, 2.5, -7.0, 1234.5])
def test_rotation_preserves_norm_and_composes(angle):
    x = torch.tensor([0.9, -0.35], dtype=torch.float64)
    y = teach.rotate_pair(x, angle)
    assert torch.allclose(y.norm(), x.norm(), atol=1e-12)
    assert torch.allclose(teach.rotate_pair(y, -angle), x, atol=1e-12)
    assert torch.allclose(teach.rotate_pair(x, angle / 2 + angle / 2), teach.rotate_pair(teach.rotate_pair(x, angle / 2), angle / 2))


def test_rotate_pair_is_ropes_rotation_of_pair_j():
    """The pair (x_j, x_{j+d/2}) that apply_rope (rotate_half layout) produces is rotate_pair of the pair."""
    d, p = 8, 5
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    x = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ang = (p * inv)[None]
    out = apply_rope(x, torch.cos(ang).repeat(1, 2), torch.sin(ang).repeat(1, 2))[0, 0].double()
    for j in range(d // 2):
        want = teach.rotate_pair(torch.stack([x[0, 0, j], x[0, 0, j + d // 2]]), p * float(inv[j]))
        assert torch.allclose(torch.stack([out[j], out[j + d // 2]]), want, atol=1e-6)


def test_grid_levels_and_quantized_points_known_values():
    # 3 bits, symmetric over [-1, 1]: step 1/3, zero code 4, codes 0..7 -> levels -4/3 .. 1
    levels = teach.grid_levels(1.0, 3)
    assert torch.allclose(levels, torch.tensor([-4 / 3, -1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1.0]), atol=1e-6)
    q = teach.quantize_points(torch.tensor([[0.3, -0.9], [0.5 + 1e-3, 0.0], [2.0, -5.0]]), 1.0, 3)
    assert torch.allclose(q, torch.tensor([[1 / 3, -1.0], [2 / 3, 0.0], [1.0, -4 / 3]]), atol=1e-6)  # last one clamps
    grid_pts = torch.cartesian_prod(levels, levels)
    assert torch.allclose(teach.quantize_points(grid_pts, 1.0, 3), grid_pts, atol=1e-6)


def test_error_is_zero_at_grid_aligned_angles_and_depends_on_the_angle():
    orbit = teach.error_vs_angle([0.8, 0.0], bits=3, n=9)  # every 45 degrees
    err = orbit["error"].to_numpy()
    assert np.all(err[::2] < 1e-6)  # 0, 90, 180, 270, 360 degrees: on the axes, exactly representable
    # 45 degrees: (0.8/sqrt2, 0.8/sqrt2) = 0.566 on a grid of step 0.8/3 -> nearest 0.533 on each axis
    want = math.sqrt(2) * abs(0.8 / math.sqrt(2) - 2 * 0.8 / 3)
    assert err[1] == pytest.approx(want, rel=1e-5)
    assert err.max() > 0.02  # anisotropy: the same vector is rounded differently at different angles


def test_pair_at_position_rotates_by_position_times_frequency():
    s = teach.pair_at_position([0.9, 0.35], inv_freq=0.25, position=10, bits=4)
    assert s.angle == pytest.approx(2.5)
    assert torch.allclose(torch.tensor(s.point), teach.rotate_pair(torch.tensor([0.9, 0.35]), 2.5).float(), atol=1e-6)
    assert s.error == pytest.approx(float((teach.quantize_points(torch.tensor([s.point]), s.radius, 4)[0]
                                            - torch.tensor(s.point)).norm()), abs=1e-6)
    with pytest.raises(ConfigError, match="bits"):
        teach.pair_at_position([1.0, 0.0], 0.1, 1, bits=12)


# ----------------------------------------------------------------------------- 2. phases


@pytest.mark.parametrize("rope_type", ["linear", "yarn", "llama3", "dynamic"])
def test_phase_table_scales_match_rope_frequencies(rope_type):
    cfg = teach.teaching_config(*LLAMA2)
    pi = PIConfig(rope_type, 4.0)
    table, freqs, bands = teach.phase_demo(cfg, pi, 16384)
    ref = frequencies(cfg, pi, seq_len=16384)
    assert np.allclose(table["s"], ref.s.double().numpy())
    assert np.allclose(table["turns_pi"], 16384 * ref.inv_freq.double().numpy() / (2 * math.pi))
    assert np.allclose(table["turns_none"], 16384 * ref.omega.double().numpy() / (2 * math.pi))
    assert table["step_pi"].between(0, math.pi).all() and table["step_none"].between(0, math.pi).all()
    assert len(table) == 64 and table["band"].tolist() == sorted(table["band"]) and bands.n_bands == 8


def test_linear_pi_at_its_target_length_stays_inside_the_trained_phases():
    cfg = teach.teaching_config(*LLAMA2)
    table, _, _ = teach.phase_demo(cfg, PIConfig("linear", 4.0), 4 * 4096)
    assert np.allclose(table["turns_pi"], table["turns_trained"])  # D inv_freq = 4L omega / 4 = L omega
    assert not table["unseen_pi"].any()
    # without PI the slow pairs (under one turn in training) reach angles never seen
    slow = table["turns_trained"] < 1
    assert slow.any() and table.loc[slow, "unseen_none"].all()
    # phase step between neighbours shrinks by the factor where no wrapping happens (omega < pi)
    assert np.allclose(table["step_pi"], table["step_none"] / 4)


def test_wrapped_phase():
    assert torch.allclose(teach.wrapped(torch.tensor([0.5, 2 * math.pi - 0.5, 3 * math.pi, 4 * math.pi + 0.1])),
                          torch.tensor([0.5, 0.5, math.pi, 0.1]), atol=1e-5)


def test_phase_errors_are_config_errors():
    with pytest.raises(ConfigError, match="distance"):
        teach.phase_freqs(teach.teaching_config(*LLAMA2), PIConfig("linear", 2.0), 0)
    with pytest.raises(ConfigError, match="even head dimension"):
        teach.teaching_config(10000.0, 7, 4096)


# ----------------------------------------------------------------------------- 3. tails


def test_tir_of_identical_short_and_long_data_is_one():
    y = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 3
    rep = teach.tail_report(teach.TailData(y, y.clone(), y[None, :100]), eps=1e-3, bits=4)
    assert rep["tir"] == 1.0 and rep["step_short"] == rep["step_long"] and rep["rms_short"] == rep["rms_long"]


def test_tail_quantile_and_step_known_values():
    short = torch.arange(1, 1001, dtype=torch.float32)  # Q_{0.99} (inverted cdf) of 1..1000 is 990
    long = 3 * short
    rep = teach.tail_report(teach.TailData(short, long, short[None]), eps=0.01, bits=3)
    assert rep["q_short"] == pytest.approx(float(np.quantile(short.numpy(), 0.99, method="inverted_cdf")))
    assert rep["q_short"] == 990 and rep["tir"] == pytest.approx(3.0)
    assert rep["step_short"] == pytest.approx(990 / 3) and rep["step_long"] == pytest.approx(990)


def test_growing_outliers_inflate_the_tail_and_coarsen_the_grid():
    flat = teach.tail_report(teach.synthetic_tails(0.0), eps=1e-3, bits=4)
    grown = teach.tail_report(teach.synthetic_tails(2.0), eps=1e-3, bits=4)
    assert 0.8 < flat["tir"] < 1.25  # no growth: short and long differ only by sampling
    assert grown["tir"] > 1.8
    assert grown["step_long"] / grown["step_short"] == pytest.approx(grown["tir"], rel=1e-5)
    assert grown["rms_long"] > 1.3 * grown["rms_short"]  # a grid sized for the long tail is worse for short tokens
    with pytest.raises(ConfigError, match="growth"):
        teach.synthetic_tails(-1.0)
    with pytest.raises(ConfigError, match="eps"):
        teach.tail_report(teach.synthetic_tails(1.0), eps=0.0)


# ----------------------------------------------------------------------------- 4. rescaling


@pytest.fixture(scope="module")
def head():
    return teach.random_head(head_dim=16, d_in=64, n_keys=48, n_bands=4)


def test_band_contributions_sum_to_the_rope_logit(head):
    """Independent check with complex numbers: q(m).k(n) = Re sum_j q_j conj(k_j) e^{i (m - n) theta_j}."""
    contrib = teach.band_contributions(head, head.w_q, head.w_k)
    q = (head.w_q.double() @ head.h_q.double())
    k = (head.h_k.double() @ head.w_k.double().T)
    h = head.head_dim // 2
    qc = torch.complex(q[:h], q[h:])
    for n in (0, 7, 47):
        kc = torch.complex(k[n, :h], k[n, h:])
        rel = head.pos_q - int(head.pos_k[n])
        want = sum((qc[j] * kc[j].conj() * cmath.exp(1j * rel * float(head.inv_freq[j]))).real for j in range(h))
        assert float(contrib[n].sum()) == pytest.approx(float(want), rel=1e-4, abs=1e-4)
    assert contrib.shape == (48, 4)


@pytest.mark.parametrize("g", [2.0, 0.5, 1.5])
def test_shared_mode_scales_the_band_contribution_by_g_squared(head, g):
    d = teach.logit_demo(head, 1, g, "shared", QuantConfig(bits=4, group_size=32))
    assert torch.allclose(d.fp_scaled[:, 1], g * g * d.fp[:, 1], rtol=1e-5, atol=1e-6)
    others = [0, 2, 3]
    assert torch.equal(d.fp_scaled[:, others], d.fp[:, others])
    if g in (2.0, 0.5):  # powers of two scale floats exactly
        assert torch.equal(d.fp_scaled[:, 1], g * g * d.fp[:, 1])


def test_symmetric_mode_leaves_full_precision_logits_unchanged(head):
    d = teach.logit_demo(head, 2, 1.5, "symmetric", QuantConfig(bits=4, group_size=32))
    assert torch.allclose(d.fp_scaled, d.fp, rtol=1e-5, atol=1e-5)
    fp_change, _ = d.max_logit_change()
    assert fp_change < 1e-4


@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("g", [2.0, 0.25, 4.0])
def test_symmetric_rescale_is_exact_noop_under_rowwise_rtn_for_power_of_two_g(head, group_size, g):
    d = teach.logit_demo(head, 1, g, "symmetric", QuantConfig(bits=4, group_size=group_size))
    assert torch.equal(d.quant_scaled, d.quant)
    assert d.max_logit_change() == (0.0, 0.0)
    t = d.table()
    a, b = t[t.setting == "original"].reset_index(), t[t.setting == "rescaled"].reset_index()
    assert (a["rms_error"] == b["rms_error"]).all()


def test_symmetric_rescale_under_rowwise_rtn_changes_only_rounding(head):
    d = teach.logit_demo(head, 1, 1.5, "symmetric", QuantConfig(bits=4, group_size=32))
    _, q_change = d.max_logit_change()
    scale = float(d.quant.sum(1).abs().max())
    assert q_change < 1e-5 * scale + 1e-5


def test_symmetric_rescale_before_a_per_tensor_grid_is_a_real_change(head):
    d = teach.logit_demo(head, 1, 4.0, "symmetric", QuantConfig(bits=4, group_size=PER_TENSOR))
    _, q_change = d.max_logit_change()
    assert q_change > 1e-2  # one grid for all rows: scaling band 1's rows moves every row's grid


def test_rescale_band_errors_are_config_errors(head):
    with pytest.raises(ConfigError, match="positive finite"):
        teach.rescale_band(head, 0, 0.0, "shared")
    with pytest.raises(ConfigError, match="band=9"):
        teach.rescale_band(head, 9, 2.0, "shared")
    with pytest.raises(ConfigError, match="symmetric or shared"):
        teach.rescale_band(head, 0, 2.0, "both")
