"""Frequency bands over RoPE pairs and the W_Q / W_K rows each band owns.

omega_j = theta^(-2j/d) is geometric in j, so bands log-spaced in frequency are contiguous,
(nearly) equal-size ranges of j. With `align="yarn"`, band edges also fall on YaRN's ramp
boundaries (the pairs YaRN extrapolates / ramps / interpolates), so no band straddles them.

Layout is rotate_half (Hugging Face Llama family): pair j of a head rotates head dims j and
j + rotary_dim/2 together, so a band owns both rows in every head of q_proj and k_proj.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qroar.errors import ConfigError

ALIGNMENTS = ("log", "yarn")


@dataclass(frozen=True)
class BandConfig:
    n_bands: int = 8
    align: str = "log"  # "log" | "yarn"
    beta_fast: float = 32.0  # YaRN ramp boundaries, used with align="yarn"
    beta_slow: float = 1.0

    def to_dict(self) -> dict:
        return {"n_bands": self.n_bands, "align": self.align, "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}

    @classmethod
    def from_dict(cls, d: dict) -> "BandConfig":
        return cls(**{k: d[k] for k in ("n_bands", "align", "beta_fast", "beta_slow") if k in d})


@dataclass(frozen=True)
class Bands:
    """B contiguous ranges of pair indices: band b = pairs edges[b] .. edges[b+1]-1 (band 0 = highest frequency)."""

    edges: tuple[int, ...]

    @property
    def n_bands(self) -> int:
        return len(self.edges) - 1

    @property
    def n_pairs(self) -> int:
        return self.edges[-1]

    def ranges(self) -> list[range]:
        return [range(a, b) for a, b in zip(self.edges[:-1], self.edges[1:])]

    def band_of(self) -> torch.Tensor:
        """(n_pairs,) band index of every pair."""
        out = torch.empty(self.n_pairs, dtype=torch.long)
        for b, r in enumerate(self.ranges()):
            out[r.start : r.stop] = b
        return out

    def to_dict(self) -> dict:
        return {"edges": list(self.edges)}


def yarn_ramp(rotary_dim: int, theta: float, original_context: int, beta_fast=32.0, beta_slow=1.0) -> tuple[int, int]:
    """YaRN's correction range (low, high) in pair indices, as transformers computes it (truncated)."""

    def dim_for(rotations):
        return rotary_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(dim_for(beta_fast)), math.ceil(dim_for(beta_slow))
    return max(low, 0), min(high, rotary_dim // 2)


def _split(start: int, stop: int, n: int) -> list[int]:
    """n near-equal contiguous pieces of [start, stop): the inner edges."""
    return [start + round(i * (stop - start) / n) for i in range(1, n)]


def make_bands(n_pairs: int, cfg: BandConfig = BandConfig(), theta: float | None = None, original_context: int | None = None) -> Bands:
    """Partition pairs 0..n_pairs-1 into cfg.n_bands log-spaced bands (YaRN-aligned if asked)."""
    B = cfg.n_bands
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ConfigError(f"The number of bands must be a positive integer, got {B!r}.")
    if B > n_pairs:
        raise ConfigError(f"{B} bands is more than this model's {n_pairs} RoPE pairs: choose at most {n_pairs}.")
    if cfg.align not in ALIGNMENTS:
        raise ConfigError(f"Unknown band alignment {cfg.align!r}: choose one of {', '.join(ALIGNMENTS)}.")
    if cfg.align == "log":
        return Bands(tuple([0, *_split(0, n_pairs, B), n_pairs]))
    if theta is None or original_context is None:
        raise ConfigError("YaRN-aligned bands need the model's rope_theta and trained context.")
    fast, slow = cfg.beta_fast, cfg.beta_slow
    if not all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in (fast, slow)) or fast <= slow:
        raise ConfigError(f"YaRN ramp boundaries need beta_fast > beta_slow > 0 (rotations), got {fast!r} and {slow!r}.")
    low, high = yarn_ramp(2 * n_pairs, theta, original_context, cfg.beta_fast, cfg.beta_slow)
    low, high = min(max(low, 0), n_pairs), min(max(high, 0), n_pairs)
    regions = [(a, b) for a, b in ((0, low), (low, high), (high, n_pairs)) if b > a]
    # bands per region proportional to its size, at least one each, summing to B
    sizes = [b - a for a, b in regions]
    if len(regions) > B:  # fewer bands than regions: fall back to log spacing
        return Bands(tuple([0, *_split(0, n_pairs, B), n_pairs]))
    counts = [1] * len(regions)
    for _ in range(B - len(regions)):
        i = max(range(len(regions)), key=lambda k: (sizes[k] / counts[k] if counts[k] < sizes[k] else -1))
        counts[i] += 1
    edges = [0]
    for (a, b), n in zip(regions, counts):
        edges += _split(a, b, n) + [b]
    return Bands(tuple(edges))


def bands_for(freqs, cfg: BandConfig = BandConfig()) -> Bands:
    """Bands for a model from its RopeFreqs (qroar.rope.frequencies)."""
    return make_bands(len(freqs.omega), cfg, theta=freqs.theta, original_context=freqs.trained_context)


def head_rows(pairs: range, rotary_dim: int) -> torch.Tensor:
    """Rows within one head that pairs `pairs` own: j and j + rotary_dim/2 (rotate_half)."""
    j = torch.arange(pairs.start, pairs.stop)
    return torch.cat([j, j + rotary_dim // 2])


def proj_rows(pairs: range, head_dim: int, rotary_dim: int, n_heads: int, offset: int = 0) -> torch.Tensor:
    """Rows of a projection weight (n_heads * head_dim rows, starting at `offset`) owned by `pairs`."""
    within = head_rows(pairs, rotary_dim)
    heads = torch.arange(n_heads) * head_dim
    return (offset + heads[:, None] + within[None, :]).reshape(-1)
