"""Weight-only fake quantization: RTN, GPTQ and AWQ.

Layered as in gpt-fast: primitives on one 2-D weight (or any row slice of it) first, then a
registry QUANTIZERS[method](weight, cfg, stats) -> dequantized weight, then model-level code
that only iterates over linears, keeps the originals (exact restore) and keeps, for q_proj and
k_proj, what requantize_rows() needs to re-quantize the rows of one RoPE band.

Grid: min-max, groups of `group_size` consecutive input channels per output row; codes are
unsigned in [0, 2^bits - 1] and w_hat = (code - zero) * scale. Asymmetric grids always contain
0 (min clamped <= 0 <= max, integer zero point, as in the GPTQ reference); symmetric grids use
scale = max|w| / (2^(bits-1) - 1) and zero = 2^(bits-1). All maths in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qroar.calib import capture_layer_inputs, run_layer
from qroar.models import decoder_layers
from qroar.errors import Cancelled, ConfigError, OutOfMemory

SCOPES = ("linear", "attention", "qk")
PER_CHANNEL = 0   # group_size 0 or -1: one group per output row
PER_TENSOR = -2   # one grid for the whole weight (not row-scale-equivariant)
SCOPE_SUFFIXES = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "qk": ("q_proj", "k_proj", "qkv_proj"),  # a fused qkv_proj comes whole (its v rows too)
}
QK_SUFFIXES = ("q_proj", "k_proj", "qkv_proj")  # layers whose stats are kept for requantize_rows
AWQ_TOKENS = 8192  # calibration tokens kept per input for AWQ's scale search
AWQ_CLIP_TOKENS = 1024  # of those, used by the clip search (its cost is tokens x rows x width)


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"          # none | rtn | gptq | awq
    bits: int = 4                # 2..8; 16 = identity
    group_size: int = 64         # > 0: input channels per group; 0/-1 per output channel; -2 per tensor
    symmetric: bool = False
    scope: str = "linear"        # linear (all decoder linears) | attention (q/k/v/o) | qk
    damp: float = 0.01           # GPTQ: damping, fraction of mean diag(H)
    block_size: int = 128        # GPTQ: columns per lazy batch update
    act_order: bool = False      # GPTQ: quantize columns by decreasing diag(H)
    awq_grid: int = 20           # AWQ: alpha in {0, 1/grid, ..., (grid-1)/grid}
    awq_clip: bool = True        # AWQ: search a per-group shrink of the weight range
    n_samples: int = 128         # calibration windows
    seq_len: int = 2048          # tokens per calibration window
    seed: int = 0

    def __post_init__(self):
        self.validate()  # a QuantConfig that exists is a valid one

    def validate(self) -> QuantConfig:
        if self.method not in QUANTIZERS:
            raise ConfigError(f"quant method {self.method!r} is unknown; choose one of {', '.join(QUANTIZERS)}.")
        for name in ("bits", "group_size", "block_size", "awq_grid", "n_samples", "seq_len", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):  # 4.5 bits would build a grid that is not one
                raise ConfigError(f"{name} must be a whole number, got {v!r}.")
        if not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp):
            raise ConfigError(f"damp must be a number in (0, 1), got {self.damp!r}.")
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise ConfigError(f"bits={self.bits} is out of range; use 2 to 8 (or 16 for no quantization).")
        if self.group_size < PER_TENSOR:
            raise ConfigError(f"group_size={self.group_size}: use a positive size, 0/-1 per channel or -2 per tensor.")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope {self.scope!r} is unknown; choose one of {', '.join(SCOPES)}.")
        q = QUANTIZERS[self.method]
        wrong = [(k, v) for k, v in q.fixed if getattr(self, k) != v]
        if wrong and not self.is_identity:
            want = " ".join(_FLAG[k](v) for k, v in q.fixed)
            got = ", ".join(f"{k} {getattr(self, k)}" for k, _ in wrong)
            raise ConfigError(f"{self.method} stores {q.label.split('(')[0].strip()}: it holds only {want} "
                              f"(got {got}); use {want}, or another quantizer.")
        why = q.allowed(self)
        if why:
            raise ConfigError(f"{self.method}: {why}.")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp={self.damp}: GPTQ damping must be in (0, 1); 0.01 is usual.")
        if self.block_size < 1 or self.awq_grid < 2:
            raise ConfigError("block_size must be >= 1 and awq_grid >= 2.")
        if self.n_samples < 1 or self.seq_len == 1 or self.seq_len < 0:
            raise ConfigError("calibration needs n_samples >= 1 and seq_len >= 2 (or 0: the model's trained context).")
        return self

    @property
    def is_identity(self) -> bool:
        return self.method == "none" or self.bits == 16

    def describe(self) -> str:
        """Short label for tables and plots, e.g. 'gptq w4 g128 asym'."""
        if self.is_identity:
            return "fp"
        g = {PER_TENSOR: "tensor", PER_CHANNEL: "ch", -1: "ch"}.get(self.group_size, f"g{self.group_size}")
        return f"{self.method} w{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown quantization settings: {', '.join(sorted(unknown))}.")
        return cls(**d).validate()


_FLAG = {"bits": lambda v: f"--bits {v}", "group_size": lambda v: f"--group-size {v}",
         "symmetric": lambda v: "--sym" if v else "no --sym (asymmetric)"}


def method_defaults(method: str) -> dict:
    """The settings a method fixes (e.g. gguf-q4_0: bits 4, group_size 32, symmetric): what choosing it sets."""
    return dict(QUANTIZERS[method].fixed) if method in QUANTIZERS else {}


# ----------------------------------------------------------------------------- RTN primitives

def group_width(cols: int, group_size: int) -> int:
    """Input channels per group: the whole row for per-channel and per-tensor grids."""
    return group_size if group_size > 0 else cols


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    gs = group_width(cols, group_size)
    if cols % gs:
        raise ConfigError(f"group size {gs} does not divide the input width {cols}; {_divisor_hint(cols)}")
    return w.reshape(rows, cols // gs, gs)  # (R, G, gs)


def group_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per (row, group): scale and zero, each fp32 of shape (rows, n_groups)."""
    x = _grouped(w.float(), group_size)
    if group_size == PER_TENSOR:
        lo, hi = x.amin().expand(x.shape[:2]), x.amax().expand(x.shape[:2])
    else:
        lo, hi = x.amin(-1), x.amax(-1)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale, code = zero
    zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-lo / scale)
    return scale.contiguous(), zero.contiguous()


def _qdq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the grid and back (broadcasting scale/zero against x)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
             symmetric: bool = False) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1] (uint8), shape of w. `symmetric` is carried by zero."""
    x = _grouped(w.float(), group_size)
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 weight from codes: (code - zero) * scale per group."""
    q = _grouped(codes.float(), group_size)
    return ((q - zero[..., None]) * scale[..., None]).reshape(codes.shape)


def fake_quant(w: torch.Tensor, cfg: QuantConfig, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize-dequantize w (any row slice works: grids are per row) in the dtype of w.

    `grid` fixes a per-tensor (scale, zero) from the whole weight when w is only some rows.
    """
    if cfg.is_identity:
        return w.clone()
    x = _grouped(w.float(), cfg.group_size)
    if grid is not None and cfg.group_size == PER_TENSOR:
        scale, zero = (g.to(x.device).reshape(1, 1).expand(x.shape[:2]) for g in grid)
    else:
        scale, zero = group_qparams(w, cfg.bits, cfg.group_size, cfg.symmetric)
    return _qdq(x, scale[..., None], zero[..., None], cfg.bits).reshape(w.shape).to(w.dtype)


def tensor_grid(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (scale, zero) of a per-tensor grid over the whole weight; None for row-wise grids."""
    if cfg.group_size != PER_TENSOR or cfg.is_identity:
        return None
    scale, zero = group_qparams(w, cfg.bits, PER_TENSOR, cfg.symmetric)
    return scale[0, 0], zero[0, 0]


# ----------------------------------------------------------------------------- GPTQ

@dataclass
class GPTQStats:
    """What GPTQ needs from a layer's inputs, prepared once: rows then quantize independently."""
    hinv: torch.Tensor                  # upper Cholesky factor of (H + damp I)^-1, permuted if act_order
    perm: torch.Tensor | None           # column order (act_order), None for natural order
    dead: torch.Tensor                  # input channels that were always zero
    grid: tuple[torch.Tensor, torch.Tensor] | None = None  # per-tensor grid of the whole weight

    def rows(self, index, device) -> GPTQStats:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GPTQStats(move(self.hinv), move(self.perm), move(self.dead),
                         None if self.grid is None else tuple(move(g) for g in self.grid))


def hessian_stats(H: torch.Tensor, cfg: QuantConfig) -> GPTQStats:
    """Damp H = 2 X^T X / n, optionally reorder, and take the inverse Cholesky (GPTQ paper, step 1)."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    H.diagonal().add_(cfg.damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ConfigError(f"the GPTQ Hessian is not positive definite (damp={cfg.damp}); raise damp, e.g. to 0.1.")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ConfigError(f"the inverse GPTQ Hessian is ill-conditioned (damp={cfg.damp}); raise damp, e.g. to 0.1.")
    return GPTQStats(U, perm, dead)


def gptq_quantize(w: torch.Tensor, stats: GPTQStats, cfg: QuantConfig) -> torch.Tensor:
    """GPTQ on one weight (or any row slice): column by column, pushing each column's rounding
    error onto the not-yet-quantized columns through the inverse Hessian, in lazy blocks."""
    W = w.float().clone()
    rows, cols = W.shape
    gs = group_width(cols, cfg.group_size)
    _grouped(W, cfg.group_size)  # checks that the group size divides the width
    W[:, stats.dead] = 0
    # Static grids (fixed before any update): per-channel, per-tensor, and act_order groups
    # (so groups stay contiguous along the input dimension); dynamic grids otherwise.
    dynamic = cfg.group_size > 0 and not cfg.act_order
    if cfg.group_size == PER_TENSOR and stats.grid is not None:
        scale = stats.grid[0].reshape(1, 1).expand(rows, 1)
        zero = stats.grid[1].reshape(1, 1).expand(rows, 1)
    else:
        scale, zero = group_qparams(W, cfg.bits, cfg.group_size, cfg.symmetric)  # (R, G)
    col_group = torch.arange(cols, device=W.device) // gs
    if stats.perm is not None:
        W, col_group = W[:, stats.perm], col_group[stats.perm]
    U, B = stats.hinv, cfg.block_size
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % gs == 0:  # grid of the group as it stands after earlier updates
                grp = torch.cat([W1[:, i:i + gs], W[:, i2:c + gs]], 1)
                s, z = group_qparams(grp, cfg.bits, PER_CHANNEL, cfg.symmetric)
                s, z = s[:, 0], z[:, 0]
            elif not dynamic:
                s, z = scale[:, col_group[c]], zero[:, col_group[c]]
            q = _qdq(W1[:, i], s, z, cfg.bits)
            Q[:, c] = q
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # rank-1 update, one kernel
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if stats.perm is not None:
        Q = Q[:, torch.argsort(stats.perm)]
    return Q.to(w.dtype)


# ----------------------------------------------------------------------------- AWQ

@dataclass
class AWQStats:
    """AWQ's result for one linear: input-channel scales and per-(row, group) clip ratios."""
    scales: torch.Tensor                # (cols,) s; the weight is quantized as Q(W diag(s)) diag(1/s)
    clip: torch.Tensor | None = None    # (rows, n_groups) ratio in (0, 1] of each group's range
    grid: tuple[torch.Tensor, torch.Tensor] | None = None  # per-tensor grid of W diag(s)

    def rows(self, index, device) -> AWQStats:
        clip = None if self.clip is None else self.clip[torch.as_tensor(index, device=self.clip.device)].to(device)
        grid = None if self.grid is None else tuple(g.to(device) for g in self.grid)
        return AWQStats(self.scales.to(device), clip, grid)


def _clip_groups(w: torch.Tensor, ratio: torch.Tensor, group_size: int) -> torch.Tensor:
    """Shrink each (row, group) range [min, max] by ratio (rows, n_groups)."""
    x = _grouped(w, group_size)
    r = ratio[..., None]
    return torch.clamp(x, x.amin(-1, keepdim=True) * r, x.amax(-1, keepdim=True) * r).reshape(w.shape)


def awq_apply(w: torch.Tensor, stats: AWQStats, cfg: QuantConfig) -> torch.Tensor:
    """Fake-quant of W diag(s) (clipped), folded back by diag(1/s): an ordinary weight."""
    s = stats.scales.to(w.device).float()
    ws = w.float() * s
    if stats.clip is not None:
        ws = _clip_groups(ws, stats.clip.to(w.device), cfg.group_size)
    return (fake_quant(ws, cfg, stats.grid) / s).to(w.dtype)


def awq_search_scales(weights: list[torch.Tensor], x: torch.Tensor, x_mean_abs: torch.Tensor,
                      cfg: QuantConfig) -> torch.Tensor:
    """s = mean|x|^alpha, alpha on a grid in [0, 1), minimising the output MSE of the
    quantized scaled linears that share input x (T, cols) (AWQ, auto_scale)."""
    x = x.float()
    best, best_err = torch.ones_like(x_mean_abs), math.inf
    for i in range(cfg.awq_grid):
        s = x_mean_abs.float().pow(i / cfg.awq_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales so neither end explodes
        err = 0.0
        for w in weights:
            delta = awq_apply(w.float(), AWQStats(s), cfg) - w.float()
            err += (x @ delta.T).pow(2).sum().item()
        if err < best_err:
            best, best_err = s, err
    return best


def awq_search_clip(ws: torch.Tensor, xs: torch.Tensor, cfg: QuantConfig, max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) shrink ratio of the scaled weight's range minimising the group's
    partial-output MSE over the scaled inputs xs (AWQ, auto_clip)."""
    ws, xs = ws.float(), xs.float()
    rows, cols = ws.shape
    xg = _grouped(xs, cfg.group_size)                                  # (T, G, gs)
    T, G = xg.shape[:2]
    best = torch.ones(rows, G, device=ws.device)
    chunk = max(1, (1 << 24) // max(1, T * G))                         # bound the (T, rows, G) buffer
    for r0 in range(0, rows, chunk):
        w = ws[r0:r0 + chunk]
        best_err = torch.full((w.shape[0], G), math.inf, device=ws.device)
        for i in range(int(max_shrink * cfg.awq_grid)):
            ratio = 1 - i / cfg.awq_grid
            r = torch.full((w.shape[0], G), ratio, device=ws.device)
            delta = _grouped(fake_quant(_clip_groups(w, r, cfg.group_size), cfg) - w, cfg.group_size)
            err = torch.einsum("tgk,rgk->trg", xg, delta).pow(2).mean(0)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r0 + chunk][better] = ratio
    return best


# ----------------------------------------------------------------------------- methods

def _rtn(w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
    grid = stats if isinstance(stats, tuple) else None
    return fake_quant(w, cfg, grid)


def ct_scale(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """compressed-tensors' symmetric int grid (its calculate_qparams): scale = max|w| / ((2^bits - 1) / 2) per
    (row, group), in the weight's dtype, an all-zero group getting the dtype's eps; codes in [-2^(bits-1), 2^(bits-1) - 1]."""
    x = _grouped(w, cfg.group_size)
    amax = torch.maximum(x.amin(-1).clamp(max=0).abs(), x.amax(-1).clamp(min=0))
    scale = amax / torch.tensor((2**cfg.bits - 1) / 2, dtype=amax.dtype)
    return torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)


def _ct(w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
    """compressed-tensors' W4A16 / W8A16 group quantizer: round(w / scale) clamped to the signed range, times scale."""
    scale = ct_scale(w, cfg)[..., None]
    q = torch.clamp(torch.round(_grouped(w, cfg.group_size) / scale), -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1)
    return (q.to(scale.dtype) * scale).reshape(w.shape).to(w.dtype)


def rtn_scale(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The scale of RTN's symmetric grid per (row, group): its codes minus the zero are signed integers times it."""
    return group_qparams(w, cfg.bits, cfg.group_size, True)[0]


GGUF_TYPES = {"gguf-q4_0": "Q4_0", "gguf-q4_1": "Q4_1", "gguf-q5_0": "Q5_0", "gguf-q8_0": "Q8_0"}


def _gguf(w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
    """llama.cpp's block quantizer (blocks of 32 along the input dim; fp16 block scales) as the `gguf` package's
    reference `gguf.quants` implements it: quantize to the file's bytes and back, so the model holds what a GGUF
    file of this type stores."""
    try:
        import numpy as np
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        raise ConfigError("The gguf-* quantizers need the gguf package: pip install gguf.") from None
    qtype = GGMLQuantizationType[GGUF_TYPES[cfg.method]]
    x = w.detach().float().cpu().numpy()
    out = quants.dequantize(quants.quantize(np.ascontiguousarray(x), qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(w.shape).to(w.device, w.dtype)


def _gptq(w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
    if cfg.bits == 16:
        return w.clone()
    if stats is None:
        raise ConfigError("GPTQ needs calibration statistics (a Hessian); run quantize_model with calibration data.")
    if isinstance(stats, torch.Tensor):  # a raw Hessian
        stats = hessian_stats(stats, cfg)
    return gptq_quantize(w, stats, cfg)


def _awq(w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
    if cfg.bits == 16:
        return w.clone()
    if stats is None:
        raise ConfigError("AWQ needs calibration statistics (input scales); run quantize_model with calibration data.")
    return awq_apply(w, stats, cfg)


# ----------------------------------------------------------------------------- model level

def quant_targets(model: nn.Module, scope: str) -> list[tuple[str, nn.Linear]]:
    """(name, linear) of the decoder layers' linears in scope, in model order; the output head
    and the embeddings lie outside the decoder layers and are never targets."""
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r} is unknown; choose one of {', '.join(SCOPES)}.")
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    suffixes = SCOPE_SUFFIXES.get(scope)
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) in inside
        and (suffixes is None or name.rsplit(".", 1)[-1] in suffixes)
    ]


def _divisor_hint(width: int) -> str:
    fits = [g for g in (16, 32, 64, 128, 256, 512, 1024) if width % g == 0]
    return (f"group sizes that divide it: {', '.join(map(str, fits))}" if fits
            else "no power-of-two group size divides it") + " (or 0 for per-channel)."


def check_group_size(model: nn.Module, cfg: QuantConfig) -> None:
    """Raise ConfigError naming the first layer in scope whose input width the group size does not divide."""
    if cfg.group_size <= 0 or cfg.is_identity:
        return
    for name, lin in quant_targets(model, cfg.scope):
        if lin.in_features % cfg.group_size:
            raise ConfigError(
                f"group size {cfg.group_size} does not divide the input width {lin.in_features} "
                f"of layer {name}; {_divisor_hint(lin.in_features)}"
            )


@dataclass
class QuantState:
    """What quantize_model changed: originals for an exact restore, and per q/k layer the
    statistics requantize_rows needs (GPTQStats, AWQStats, or a per-tensor RTN grid)."""
    cfg: QuantConfig
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.originals)


@torch.no_grad()
def restore(model: nn.Module, state: QuantState) -> None:
    """Put the original weights back, bit for bit."""
    for name, w in state.originals.items():
        p = model.get_submodule(name).weight
        p.copy_(w.to(p.device))


@torch.no_grad()
def requantize_rows(state: QuantState, layer_name: str, weight_rows_fp: torch.Tensor,
                    row_index: torch.Tensor | list[int]) -> torch.Tensor:
    """Quantize-dequantize some rows of a layer (e.g. one RoPE band of q_proj/k_proj after
    rescaling) exactly as quantize_model quantized that layer; returns rows in their dtype.

    AWQ reuses the scales and clip ratios searched on the unrescaled model (frozen); a full
    re-search needs quantize_model on the rescaled model.
    """
    cfg = state.cfg
    if cfg.is_identity:
        return weight_rows_fp.clone()
    stats = state.stats.get(layer_name)
    if stats is None and (QUANTIZERS[cfg.method].needs_calibration or cfg.group_size == PER_TENSOR):
        kept = ", ".join(state.stats) or "none"
        raise ConfigError(f"no quantizer statistics were kept for {layer_name} (kept: {kept}); "
                          "only q_proj/k_proj layers quantized by quantize_model keep them.")
    dev = weight_rows_fp.device
    if isinstance(stats, tuple):
        stats = tuple(g.to(dev) for g in stats)
    elif stats is not None:
        stats = stats.rows(row_index, dev)
    return QUANTIZERS[cfg.method](weight_rows_fp, cfg, stats)


def _offload(obj, offload: bool):
    if not offload:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, tuple):
        return tuple(_offload(o, True) for o in obj)
    return dataclasses.replace(obj, **{
        f.name: _offload(getattr(obj, f.name), True)
        for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None
    })


def _replace(state: QuantState, name: str, lin: nn.Linear, stats, offload: bool,
             w_hat: torch.Tensor | None = None, kept=None) -> None:
    """Swap in the fake-quantized weight, keeping the original and (q/k only) the stats
    (`kept`: stats already offloaded, so q and k share one copy)."""
    cfg = state.cfg
    w = lin.weight
    if cfg.group_size == PER_TENSOR and stats is None:
        stats = tensor_grid(w, cfg)
    if w_hat is None:
        w_hat = QUANTIZERS[cfg.method](w.data, cfg, stats)
    state.originals[name] = w.data.detach().to("cpu" if offload else w.device, copy=True)
    w.copy_(w_hat)
    if name.rsplit(".", 1)[-1] in QK_SUFFIXES and stats is not None:
        state.stats[name] = kept if kept is not None else _offload(stats, offload)


def quantize_model(
    model: nn.Module, cfg: QuantConfig, calib: Iterable[torch.Tensor] | None = None,
    progress: Callable[[float, str], None] | None = None, cancel: threading.Event | None = None,
    offload: bool = False,
) -> QuantState:
    """Fake-quantize the linears in scope in place and return what restore() needs.

    calib: token windows (LongTensor (1, T) each, e.g. calibration_batches(...)), needed by
    GPTQ and AWQ. offload=True keeps originals and statistics on the CPU.
    On cancel the model is restored and Cancelled raised; on CUDA OOM likewise OutOfMemory.
    """
    cfg.validate()
    state = QuantState(cfg)
    if cfg.is_identity:
        return state
    check_group_size(model, cfg)
    if QUANTIZERS[cfg.method].needs_calibration and calib is None:
        raise ConfigError(f"{cfg.method.upper()} needs calibration data; pass calib=calibration_batches(...).")
    report = progress or (lambda f, m: None)
    try:
        with torch.no_grad():
            if QUANTIZERS[cfg.method].needs_calibration:
                _quantize_layerwise(model, state, calib, report, cancel, offload)
            else:
                targets = quant_targets(model, cfg.scope)
                for k, (name, lin) in enumerate(targets):
                    _check_cancel(model, state, cancel)
                    _replace(state, name, lin, None, offload)
                    report((k + 1) / len(targets), f"{cfg.method.upper()} {name}")
    except torch.cuda.OutOfMemoryError:
        restore(model, state)
        state.originals.clear()
        torch.cuda.empty_cache()
        raise OutOfMemory(
            f"quantization ({cfg.describe()}) ran out of GPU memory; the model was restored. "
            "Use fewer calibration samples or a shorter seq_len, or offload=True."
        ) from None
    except BaseException:  # cancelled, bad settings found mid-way, interrupted: never leave a half-quantized model
        restore(model, state)
        raise
    report(1.0, "done")
    return state


def _check_cancel(model, state, cancel) -> None:
    if cancel is not None and cancel.is_set():
        restore(model, state)
        raise Cancelled("quantization cancelled; the model was restored to its original weights.")


def _quantize_layerwise(model, state, calib, report, cancel, offload) -> None:
    """GPTQ/AWQ one decoder layer at a time on the quantized model's own activations."""
    cfg = state.cfg
    targets = {id(m): name for name, m in quant_targets(model, cfg.scope)}
    hiddens, layer_kwargs = capture_layer_inputs(model, calib)
    layers = decoder_layers(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    for i, layer in enumerate(layers):
        _check_cancel(model, state, cancel)
        linears = [(targets[id(m)], m) for m in layer.modules() if id(m) in targets]
        if linears:
            groups = _collect_inputs(layer, linears, hiddens, layer_kwargs[i], cfg, gen)
            for members, acc in groups:
                _check_cancel(model, state, cancel)
                _quantize_group(state, members, acc, offload, gen)
        if i + 1 < len(layers):  # feed the quantized layer's outputs on
            for s, h in enumerate(hiddens):
                hiddens[s] = run_layer(layer, h, layer_kwargs[i][s])
        report((i + 1) / len(layers), f"{cfg.method.upper()} layer {i + 1}/{len(layers)}")


def _collect_inputs(layer, linears, hiddens, kwargs, cfg, gen):
    """Stream the layer over every sample, accumulating per shared input: GPTQ's X^T X, or
    AWQ's sum|x| and a token subsample. Linears fed the same tensor form one group."""
    leader: dict[str, str] = {}   # linear name -> name of the first linear that saw its input
    acc: dict[str, dict] = {}
    per_sample = max(1, AWQ_TOKENS // len(hiddens))

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            key = (x.data_ptr(), tuple(x.shape))
            if name not in leader:  # holding x keeps its address from being reused in this pass
                leader[name] = seen.setdefault(key, (name, x))[0]
            if leader[name] != name:
                return
            a = acc.setdefault(name, {"n": 0})
            xf = x.float()
            a["n"] += xf.shape[0]
            QUANTIZERS[cfg.method].accumulate(a, xf, gen, per_sample)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    try:
        for h, kw in zip(hiddens, kwargs):
            seen: dict = {}
            run_layer(layer, h, kw)
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for name, a in acc.items():
        members = [(n, m) for n, m in linears if leader[n] == name]
        groups.append((members, a))
    return groups


def _gptq_accumulate(a: dict, xf: torch.Tensor, gen, per_sample: int) -> None:
    a["H"] = a.get("H", 0) + xf.T @ xf


def _gptq_group(state, members, acc, offload, gen) -> None:
    cfg = state.cfg
    stats = hessian_stats(2 * acc["H"] / acc["n"], cfg)
    if cfg.group_size == PER_TENSOR:  # one grid per linear
        for name, lin in members:
            _replace(state, name, lin, dataclasses.replace(stats, grid=tensor_grid(lin.weight, cfg)), offload)
        return
    # Rows are independent under a shared Hessian: one pass over the stacked rows of
    # q/k/v (or gate/up) gives the same result with a third of the column steps.
    stacked = gptq_quantize(torch.cat([lin.weight for _, lin in members]), stats, cfg)
    kept = _offload(stats, offload)
    for (name, lin), w_hat in zip(members, stacked.split([lin.out_features for _, lin in members])):
        _replace(state, name, lin, stats, offload, w_hat, kept)


def _awq_accumulate(a: dict, xf: torch.Tensor, gen, per_sample: int) -> None:
    a["abs"] = a.get("abs", 0) + xf.abs().sum(0)
    pick = torch.randperm(xf.shape[0], generator=gen)[:per_sample].to(xf.device)
    a.setdefault("x", []).append(xf[pick])


def _awq_group(state, members, acc, offload, gen) -> None:
    cfg = state.cfg
    x = torch.cat(acc["x"])
    s = awq_search_scales([lin.weight for _, lin in members], x, acc["abs"] / acc["n"], cfg)
    xc = x[torch.randperm(x.shape[0], generator=gen)[:AWQ_CLIP_TOKENS].to(x.device)] / s
    for name, lin in members:
        ws = lin.weight.float() * s
        clip = awq_search_clip(ws, xc, cfg) if cfg.awq_clip and cfg.group_size != PER_TENSOR else None
        _replace(state, name, lin, AWQStats(s, clip, tensor_grid(ws, cfg)), offload)


def _quantize_group(state, members, acc, offload, gen) -> None:
    QUANTIZERS[state.cfg.method].quantize_group(state, members, acc, offload, gen)


# ----------------------------------------------------------------------------- registry

def _rowwise(cfg: QuantConfig) -> bool:
    # each row's grid is that row's own min/max (GPTQ: rows are quantized independently with a shared
    # Hessian and error feedback linear in the row), so it scales with the row; one grid per tensor does not
    return cfg.group_size != PER_TENSOR


@dataclass(frozen=True)
class Quantizer:
    """One entry of QUANTIZERS: a new method is one function and one line there.

    fn(weight, cfg, stats) -> dequantized weight (any row slice of a weight works for re-quantization).
    needs_calibration: quantize_model streams each decoder layer's inputs through `accumulate`, then
    hands each group of linears sharing an input to `quantize_group` (which stores the method's stats).
    row_scale_equivariant(cfg): Q(diag(g) W) == diag(g) Q(W), so symmetric rescaling before it is a no-op.
    frozen_rows(cfg): re-quantizing rows keeps the searched stats frozen, so a moved band's rows scale
    with their grid (equivariant for the rescaler even where the method itself is not).
    """

    fn: Callable[..., torch.Tensor]
    needs_calibration: bool = False
    accumulate: Callable | None = None  # calibrated: (acc, x, generator, tokens per sample) per layer input
    quantize_group: Callable | None = None  # calibrated: (state, linears sharing an input, acc, offload, generator)
    row_scale_equivariant: Callable[[QuantConfig], bool] = _rowwise
    frozen_rows: Callable[[QuantConfig], bool] = lambda cfg: False
    label: str = ""
    fixed: tuple[tuple[str, Any], ...] = ()  # settings a file format fixes (GGUF Q4_0: 4 bits, blocks of 32, symmetric)
    allowed: Callable[[QuantConfig], str | None] = lambda cfg: None  # why a setting cannot be held, or None

    def __call__(self, w: torch.Tensor, cfg: QuantConfig, stats=None) -> torch.Tensor:
        return self.fn(w, cfg, stats)


QUANTIZERS: dict[str, Quantizer] = {
    "none": Quantizer(lambda w, cfg, stats=None: w.clone(), label="full precision"),
    "rtn": Quantizer(_rtn, label="round to nearest, min-max grid"),
    "gptq": Quantizer(_gptq, True, _gptq_accumulate, _gptq_group, label="GPTQ (Hessian error feedback)"),
    # AWQ's scale search sums output error over all rows, so rescaled rows change s for every row
    "awq": Quantizer(_awq, True, _awq_accumulate, _awq_group, row_scale_equivariant=lambda cfg: False,
                     frozen_rows=lambda cfg: cfg.group_size != PER_TENSOR, label="AWQ (activation-aware scales)"),
}
def _gguf_entry(qtype: str, bits: int, symmetric: bool) -> Quantizer:
    return Quantizer(_gguf, fixed=(("bits", bits), ("group_size", 32), ("symmetric", symmetric)),
                     label=f"GGUF {qtype} (llama.cpp's blocks of 32, as the file stores them)")


def _ct_allowed(cfg: QuantConfig) -> str | None:
    if cfg.bits not in (4, 8, 16):
        return (f"the ct quantizer writes compressed-tensors W4A16 or W8A16, which have no {cfg.bits}-bit type: "
                "use --bits 4 or --bits 8")
    if cfg.group_size == PER_TENSOR:
        return "compressed-tensors' W4A16/W8A16 schemes have groups or one grid per channel, not per tensor"
    return None


QUANTIZERS["ct"] = Quantizer(_ct, allowed=_ct_allowed, fixed=(("symmetric", True),),
                             label="compressed-tensors' symmetric int4/int8 group quantizer (its scale rule)")
for _m, _t in GGUF_TYPES.items():
    QUANTIZERS[_m] = _gguf_entry(_t, int(_t[1]), _t.endswith("_0"))
METHODS = tuple(QUANTIZERS)
NEEDS_CALIBRATION = tuple(m for m, q in QUANTIZERS.items() if q.needs_calibration)


def is_row_scale_equivariant(cfg: QuantConfig) -> bool:
    """True when Q(diag(g) W) == diag(g) Q(W) up to rounding for positive row scales g, i.e.
    symmetric per-band rescaling before this quantizer changes nothing but rounding."""
    return cfg.is_identity or QUANTIZERS[cfg.method].row_scale_equivariant(cfg)
