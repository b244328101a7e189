"""Small, exact computations behind the Learn page: the four ideas of Q-ROAR on synthetic tensors.

1. Anisotropy: a RoPE pair (q_j, q_{j+d/2}) rotates by p * inv_freq_j; an axis-aligned quantizer grid
   does not rotate with it, so the rounding error depends on the angle.
2. Phase aliasing: how many turns each pair makes over a distance, with and without PI, and how
   far apart neighbouring positions are in phase (PI divides that step by s_j).
3. Tail inflation: an outlier channel that grows with position makes the (1-eps) quantile of
   |W h| larger at long positions (TIR > 1); a grid sized for the long tail is coarser for every token.
4. Per-band rescaling: symmetric mode (W_K / g) leaves logits unchanged, shared mode (W_K * g)
   multiplies the band's logit contribution by g^2; before a row-wise quantizer symmetric mode
   changes only rounding (nothing at all for power-of-two g).

Everything uses qroar's own RoPE, band, quantizer and rescaling functions; no Streamlit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from qroar.bands import BandConfig, Bands, bands_for, head_rows, make_bands
from qroar.capture import apply_rope, tail_quantile
from qroar.diagnostics import pair_table
from qroar.errors import ConfigError
from qroar.quant import PER_TENSOR, QuantConfig, dequantize, fake_quant, group_qparams, quantize
from qroar.rescale import band_factors
from qroar.rope import PIConfig, RopeFreqs, frequencies

TWO_PI = 2 * math.pi
# Configs built in code for the phase tables: (rope_theta, head_dim, trained context).
CONFIGS = {
    "Llama-2-7B-like (theta 1e4, head dim 128, context 4K)": (10000.0, 128, 4096),
    "SmolLM2-135M-like (theta 1e5, head dim 64, context 8K)": (100000.0, 64, 8192),
}


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits={bits!r}: choose an integer from 2 to 8.")


# ----------------------------------------------------------------------------- 1. anisotropy


def rotate_pair(x: torch.Tensor, angle) -> torch.Tensor:
    """Rotate 2-D points (..., 2) by `angle` (scalar or broadcastable), as RoPE rotates (q_j, q_{j+d/2})."""
    x = torch.as_tensor(x, dtype=torch.float64)
    a = torch.as_tensor(angle, dtype=torch.float64)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], dim=-1)


def pair_grid(radius: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the symmetric b-bit min-max grid covering [-radius, radius] on each axis."""
    _check_bits(bits)
    if not radius > 0:
        raise ConfigError(f"The grid radius must be positive, got {radius!r}.")
    scale, zero = group_qparams(torch.tensor([[-radius, radius]], dtype=torch.float32), bits, 0, symmetric=True)
    return scale[0, 0], zero[0, 0]


def grid_levels(radius: float, bits: int) -> torch.Tensor:
    """The 2^bits values each axis can represent: codes 0 .. 2^bits - 1, so one level below -radius."""
    scale, zero = pair_grid(radius, bits)
    return (torch.arange(2**bits, dtype=torch.float32) - zero) * scale


def quantize_points(points: torch.Tensor, radius: float, bits: int) -> torch.Tensor:
    """Round 2-D points (N, 2) to the axis-aligned grid of `pair_grid` with qroar's quantizer primitives."""
    scale, zero = pair_grid(radius, bits)
    p = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    s, z = scale.expand(len(p), 1), zero.expand(len(p), 1)  # one grid for every point: per-row qparams, all equal
    return dequantize(quantize(p, s, z, bits, 0, symmetric=True), s, z, 0)


def error_vs_angle(x, bits: int, n: int = 361) -> pd.DataFrame:
    """Rotate x through a full turn on a grid sized to |x|: angle, rotated point, its rounding, error size."""
    x = torch.as_tensor(x, dtype=torch.float64)
    radius = float(x.norm())
    angle = torch.linspace(0, TWO_PI, n, dtype=torch.float64)
    pts = rotate_pair(x, angle).float()  # (n, 2)
    qp = quantize_points(pts, radius, bits)
    return pd.DataFrame({
        "angle": angle.numpy(), "x": pts[:, 0].numpy(), "y": pts[:, 1].numpy(),
        "qx": qp[:, 0].numpy(), "qy": qp[:, 1].numpy(), "error": (qp - pts).norm(dim=1).numpy(),
    })


@dataclass(frozen=True)
class PairState:
    """One pair at one position: rotation angle, the rotated point, its grid point and the error vector."""

    position: int
    angle: float  # p * inv_freq_j (unwrapped)
    point: tuple[float, float]
    quantized: tuple[float, float]
    radius: float

    @property
    def error(self) -> float:
        return math.dist(self.point, self.quantized)


def pair_at_position(x, inv_freq: float, position: int, bits: int) -> PairState:
    """Where pair x (its value at position 0) sits at `position`, and how the grid rounds it."""
    x = torch.as_tensor(x, dtype=torch.float64)
    angle = float(position) * float(inv_freq)
    p = rotate_pair(x, angle).float()
    q = quantize_points(p[None], float(x.norm()), bits)[0]
    return PairState(int(position), angle, tuple(p.tolist()), tuple(q.tolist()), float(x.norm()))


# ----------------------------------------------------------------------------- 2. phases per pair


def teaching_config(theta: float, head_dim: int, trained_context: int):
    """A one-head Llama config with this RoPE shape (the rest does not matter for frequencies)."""
    from transformers import LlamaConfig

    if head_dim < 4 or head_dim % 2:
        raise ConfigError(f"head_dim={head_dim}: RoPE needs an even head dimension of at least 4.")
    return LlamaConfig(hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim,
                       max_position_embeddings=int(trained_context),
                       rope_parameters={"rope_type": "default", "rope_theta": float(theta)})


def wrapped(phase: torch.Tensor) -> torch.Tensor:
    """Distance of a phase from 0 on the circle, in [0, pi]."""
    r = torch.remainder(phase, TWO_PI)
    return torch.minimum(r, TWO_PI - r)


def phase_freqs(config, pi: PIConfig, distance: int) -> RopeFreqs:
    """Frequencies under `pi` at this distance (length-dependent types such as dynamic need it)."""
    if not isinstance(distance, int) or distance < 1:
        raise ConfigError(f"The distance must be a positive number of tokens, got {distance!r}.")
    return frequencies(config, pi, seq_len=distance)


def phase_table(freqs: RopeFreqs, distance: int, bands: Bands) -> pd.DataFrame:
    """One row per pair j: pair_table's columns plus, at distance D and the trained context L:

    turns_trained = L omega / 2pi (turns seen in training), turns_none = D omega / 2pi (no PI),
    turns_pi = D inv_freq / 2pi (with PI), step_none / step_pi = phase between adjacent positions
    (wrapped to [0, pi]), unseen_* = the phase at D lies beyond what training covered (a pair that
    made less than one turn in training and goes further than it did).
    """
    t = pair_table(freqs, bands)
    omega, inv = freqs.omega.double(), freqs.inv_freq.double()
    L, D = freqs.trained_context, int(distance)
    trained_phase = L * omega
    t["turns_trained"] = (trained_phase / TWO_PI).numpy()
    t["turns_none"] = (D * omega / TWO_PI).numpy()
    t["turns_pi"] = (D * inv / TWO_PI).numpy()
    t["step_none"] = wrapped(omega).numpy()
    t["step_pi"] = wrapped(inv).numpy()
    partial = trained_phase < TWO_PI
    t["unseen_none"] = (partial & (D * omega > trained_phase)).numpy()
    t["unseen_pi"] = (partial & (D * inv > trained_phase * (1 + 1e-6))).numpy()  # inv_freq is fp32: ignore last-bit rounding
    return t


def phase_demo(config, pi: PIConfig, distance: int, n_bands: int = 8) -> tuple[pd.DataFrame, RopeFreqs, Bands]:
    """The phase table of `config` under `pi` at `distance`, with its log-spaced bands."""
    freqs = phase_freqs(config, pi, distance)
    bands = bands_for(freqs, BandConfig(n_bands=n_bands))
    return phase_table(freqs, distance, bands), freqs, bands


# ----------------------------------------------------------------------------- 3. tail inflation


@dataclass(frozen=True)
class TailData:
    y_short: torch.Tensor  # |W h| over tokens inside the trained context, flattened
    y_long: torch.Tensor  # |W h| over tokens beyond it
    signed_short: torch.Tensor  # W h of the short tokens (what a quantizer rounds)


def synthetic_tails(growth: float, trained_context: int = 4096, factor: float = 4.0, n_tokens: int = 4096,
                    d_in: int = 64, d_out: int = 32, outlier: float = 4.0, seed: int = 0) -> TailData:
    """Gaussian activations plus one heavy-tailed (Student-t, 3 dof) outlier channel whose size grows
    linearly with position: amplitude outlier * (1 + growth * p / L); outputs of a random W (d_out, d_in)."""
    if not (math.isfinite(growth) and growth >= 0):
        raise ConfigError(f"growth={growth!r}: choose a number >= 0 (0 = no growth with position).")
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, int(trained_context * factor), (n_tokens,), generator=g)
    h = torch.randn(n_tokens, d_in, generator=g)
    t3 = torch.randn(n_tokens, generator=g) / torch.randn(n_tokens, 3, generator=g).pow(2).mean(1).sqrt()  # Student-t, 3 dof
    h[:, 0] = outlier * (1 + growth * pos / trained_context) * t3
    w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    y = h @ w.T  # (T, d_out)
    short = pos < trained_context
    return TailData(y[short].abs().reshape(-1), y[~short].abs().reshape(-1), y[short])


def tail_report(data: TailData, eps: float = 1e-3, bits: int = 4) -> dict:
    """(1-eps) quantiles of |W h| short vs long, their ratio TIR, and what a b-bit symmetric grid whose
    range is that quantile does to the short tokens: its step and their RMS rounding error."""
    _check_bits(bits)
    if not 0 < eps < 0.5:
        raise ConfigError(f"eps={eps!r}: choose a tail fraction between 0 and 0.5 (1e-3 is usual).")
    q_short = tail_quantile([data.y_short], eps)
    q_long = tail_quantile([data.y_long], eps)
    out = {"q_short": q_short, "q_long": q_long, "tir": q_long / q_short}
    x = data.signed_short.reshape(1, -1).float()
    for side, q in (("short", q_short), ("long", q_long)):
        scale = torch.tensor([[q / (2 ** (bits - 1) - 1)]])
        zero = torch.tensor([[float(2 ** (bits - 1))]])
        xq = dequantize(quantize(x, scale, zero, bits, PER_TENSOR, symmetric=True), scale, zero, PER_TENSOR)
        out[f"step_{side}"] = float(scale)
        out[f"rms_{side}"] = float((xq - x).pow(2).mean().sqrt())
    return out


# ----------------------------------------------------------------------------- 4. per-band rescaling


@dataclass(frozen=True)
class HeadDemo:
    """One attention head on random data: weights (head_dim, d_in), a query token and n_keys key tokens."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    h_q: torch.Tensor  # (d_in,)
    h_k: torch.Tensor  # (n_keys, d_in)
    pos_q: int
    pos_k: torch.Tensor  # (n_keys,)
    inv_freq: torch.Tensor  # (head_dim / 2,)
    bands: Bands

    @property
    def head_dim(self) -> int:
        return self.w_q.shape[0]


def random_head(head_dim: int = 32, d_in: int = 64, n_keys: int = 256, n_bands: int = 4, theta: float = 10000.0,
                seed: int = 0) -> HeadDemo:
    """Random W_Q, W_K and token inputs; keys at every distance 0 .. n_keys-1 behind the query."""
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(head_dim, d_in, generator=g) / math.sqrt(d_in)
    w_k = torch.randn(head_dim, d_in, generator=g) / math.sqrt(d_in)
    h_q, h_k = torch.randn(d_in, generator=g), torch.randn(n_keys, d_in, generator=g)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    bands = make_bands(head_dim // 2, BandConfig(n_bands=n_bands))
    return HeadDemo(w_q, w_k, h_q, h_k, n_keys - 1, torch.arange(n_keys), inv_freq.float(), bands)


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    ang = pos.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = torch.cos(ang).repeat(1, 2), torch.sin(ang).repeat(1, 2)
    return apply_rope(x[:, None, :], cos, sin)[:, 0, :]  # rotate_half layout, one head


def band_contributions(head: HeadDemo, w_q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """(n_keys, n_bands): each band's part of the logit q . k (after RoPE) for every key; they sum to the logit."""
    q = _rope((head.h_q[None] @ w_q.T), torch.tensor([head.pos_q]), head.inv_freq)  # (1, D)
    k = _rope(head.h_k @ w_k.T, head.pos_k, head.inv_freq)  # (n_keys, D)
    prod = q * k
    return torch.stack([prod[:, head_rows(r, head.head_dim)].sum(1) for r in head.bands.ranges()], dim=1)


def rescale_band(head: HeadDemo, band: int, g: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_Q, W_K) with band `band`'s rows scaled: q by g, k by 1/g (symmetric) or g (shared)."""
    if not 0 <= band < head.bands.n_bands:
        raise ConfigError(f"band={band}: this head has bands 0 to {head.bands.n_bands - 1}.")
    if not (math.isfinite(g) and g > 0):
        raise ConfigError(f"g={g!r}: a band scale must be a positive finite number (1 = unchanged).")
    if mode not in ("symmetric", "shared"):
        raise ConfigError(f"mode={mode!r}: choose symmetric or shared.")
    f = band_factors(torch.tensor([g]), mode)
    rows = head_rows(head.bands.ranges()[band], head.head_dim)
    w_q, w_k = head.w_q.clone(), head.w_k.clone()
    w_q[rows] *= float(f["q"][0])
    w_k[rows] *= float(f["k"][0])
    return w_q, w_k


@dataclass(frozen=True)
class LogitDemo:
    """Per-band logit contributions (n_keys, n_bands) for the original and the rescaled head, fp and quantized."""

    fp: torch.Tensor
    fp_scaled: torch.Tensor
    quant: torch.Tensor
    quant_scaled: torch.Tensor

    def table(self) -> pd.DataFrame:
        """Tidy: band, setting (original | rescaled), rms_fp, rms_quant, rms_error (quant - fp of that setting)."""
        rms = lambda t: t.pow(2).mean(0).sqrt().tolist()  # noqa: E731  (over keys)
        rows = []
        for setting, fp, q in (("original", self.fp, self.quant), ("rescaled", self.fp_scaled, self.quant_scaled)):
            for b, (a, c, e) in enumerate(zip(rms(fp), rms(q), rms(q - fp))):
                rows.append(dict(band=b, setting=setting, rms_fp=a, rms_quant=c, rms_error=e))
        return pd.DataFrame(rows)

    def max_logit_change(self) -> tuple[float, float]:
        """max |logit change| from rescaling over keys: (full precision, quantized)."""
        return (float((self.fp_scaled.sum(1) - self.fp.sum(1)).abs().max()),
                float((self.quant_scaled.sum(1) - self.quant.sum(1)).abs().max()))


def logit_demo(head: HeadDemo, band: int, g: float, mode: str, quant: QuantConfig) -> LogitDemo:
    """Rescale one band, quantize the scaled weights with `quant` (scale before quantization), compare."""
    quant.validate()
    w_q, w_k = rescale_band(head, band, g, mode)
    fq = lambda w: fake_quant(w, quant)  # noqa: E731
    return LogitDemo(
        fp=band_contributions(head, head.w_q, head.w_k),
        fp_scaled=band_contributions(head, w_q, w_k),
        quant=band_contributions(head, fq(head.w_q), fq(head.w_k)),
        quant_scaled=band_contributions(head, fq(w_q), fq(w_k)),
    )
