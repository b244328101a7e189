"""Per-band rescaling of the W_Q / W_K rows: Q-ROAR's repair.

Definitions (project brief, section 2):

- **Rows of band b.** For every pair j of the band, both rotate_half rows j and j + rotary_dim/2,
  in every query head of q_proj and every key head of k_proj (fewer heads under GQA; Phi-3's
  fused qkv_proj through the adapter's row offsets).
- **Rescaling.** W_Q <- g_b W_Q. Symmetric mode: W_K <- W_K / g_b (logits unchanged in exact
  arithmetic). Shared mode: W_K <- g_b W_K (band b's logit contribution q_b . k_b times g_b^2, a
  per-band attention temperature). Biases (Qwen2) are scaled with their rows.
- **Order.** "before": the scaled full-precision rows are quantized (re-quantized one band at a
  time through `quant.requantize_rows`); "after": the dequantized rows are scaled.
- **q_norm / k_norm models** (Qwen3, Gemma 3) RMS-normalise every head before RoPE, which would undo
  a row scale of W_Q / W_K. There the band's dims of the norm weight are scaled instead (Gemma's norm
  computes x * (1 + w): then 1 + w' = g (1 + w)). Norm weights are not quantized, so for these
  models a "before quantization" scale cannot interact with the weight quantizer: "before" and
  "after" are the same model.
- **Honesty.** Symmetric rescaling before a row-scale-equivariant quantizer (min-max grids with
  groups along the input dimension: Q(gW) = g Q(W)) changes nothing but rounding, and so does
  symmetric rescaling after quantization or without one. `invariance_note` says so.

Scales are one positive finite float per band, shared by all layers ((B,)), or one per layer and band
((L, B), L = the model's attention layers in order; `per_layer` broadcasts shared ones). Per-layer scales
whose layers all agree act exactly like the shared ones (the same row factors, bit for bit). Moving one
band's scale touches only that band's rows (in one layer, for per-layer scales): `Rescaler` keeps
full-precision (and quantized) copies of the q/k rows only, and re-quantizes only the moved rows, never
the rest of the model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from qroar import bands as bands_mod
from qroar.errors import ConfigError, ModelError

MODES = ("symmetric", "shared")
ORDERS = ("before", "after")
# What the model computes while one is in force: full precision, quantized, and each with the per-band scales.
VARIANTS = ("fp", "quant", "fp_scaled", "quant_scaled")
SCALED = ("fp_scaled", "quant_scaled")


@dataclass(frozen=True)
class ScaleConfig:
    """mode: symmetric (W_K / g) | shared (W_K * g); order: before | after quantization.

    Shared is the default: symmetric rescaling under the default RTN quantizer is a no-op (see
    `invariance_note`), shared mode changes each band's attention temperature.
    """

    mode: str = "shared"
    order: str = "before"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"Unknown rescaling mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        if self.order not in ORDERS:
            raise ConfigError(f"Unknown rescaling order {self.order!r}: choose one of {', '.join(ORDERS)} (quantization).")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "order": self.order}

    @classmethod
    def from_dict(cls, d: dict) -> "ScaleConfig":
        return cls(**{k: d[k] for k in ("mode", "order") if k in d})


def check_scales(scales, n_bands: int | None = None, n_layers: int | None = None) -> torch.Tensor:
    """Scales as a float64 tensor: (B,) shared by all layers, or (L, B) per layer (a list of one list of band
    scales per layer). ConfigError naming the layer and band for zero, negative, NaN or inf, or a wrong shape."""
    nested = isinstance(scales, (list, tuple)) and len(scales) > 0 and all(isinstance(x, (list, tuple)) for x in scales)
    if isinstance(scales, torch.Tensor) and scales.dim() == 2:
        nested = True
    try:
        t = torch.as_tensor(scales, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"Scales must be a list of numbers, one per band, or one such list per layer ({e}).") from e
    t = t.reshape(t.shape[0], -1) if nested and t.dim() >= 1 and t.numel() else t.reshape(-1)
    if nested and t.dim() == 2 and t.shape[0] == 0:
        raise ConfigError("Per-layer scales need one list of band scales per layer, got none.")
    n = t.shape[-1]
    if n_bands is not None and n != n_bands:
        raise ConfigError(f"Got {n} scales for {n_bands} bands: give exactly one scale per band"
                          + (" in every layer." if t.dim() == 2 else "."))
    if t.dim() == 2 and n_layers is not None and t.shape[0] != n_layers:
        raise ConfigError(f"Got per-layer scales for {t.shape[0]} layers but the model has {n_layers}: "
                          "give one list of band scales per layer.")
    for i, g in enumerate(t.reshape(-1).tolist()):
        if not math.isfinite(g) or g <= 0:
            where = f"layer {i // n}, band {i % n}" if t.dim() == 2 else f"band {i}"
            raise ConfigError(f"The scale of {where} is {g}: every scale must be a positive finite number (1 = unchanged).")
    return t


def per_layer(scales, n_layers: int) -> torch.Tensor:
    """(L, B) float64 scales: shared (B,) scales broadcast to every layer, per-layer ones checked and copied."""
    t = check_scales(scales, n_layers=n_layers)
    return t.clone() if t.dim() == 2 else t[None, :].repeat(n_layers, 1)


def is_per_layer(scales) -> bool:
    """True for per-layer scales (a list of lists, or a 2-D tensor)."""
    if isinstance(scales, torch.Tensor):
        return scales.dim() == 2
    return isinstance(scales, (list, tuple)) and len(scales) > 0 and isinstance(scales[0], (list, tuple))


def band_factors(scales: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Per-band multipliers of the q rows and of the k rows ((B,) shared or (L, B) per layer)."""
    g = torch.as_tensor(scales, dtype=torch.float64)
    return {"q": g, "k": 1.0 / g if mode == "symmetric" else g.clone()}


def invariance_note(quant_cfg, scale_cfg: ScaleConfig, has_qk_norm: bool = False) -> str | None:
    """A sentence saying why these settings cannot change the model beyond rounding, or None.

    Symmetric mode multiplies q_b by g and k_b by 1/g, so logits are unchanged in exact arithmetic
    unless the scale reaches a quantizer that is not row-scale-equivariant. RTN and GPTQ with
    min-max grids per row (groups along the input dim) are equivariant: Q(gW) = g Q(W). So are the
    AWQ rows here, since re-quantization keeps AWQ's searched input scales and clip ratios frozen.
    """
    if scale_cfg.mode != "symmetric":
        return None
    from qroar import quant

    if quant_cfg is None or quant_cfg.is_identity:
        return ("Symmetric rescaling without quantization multiplies q_b by g and k_b by 1/g: the attention "
                "logits are unchanged in exact arithmetic, so any difference is floating-point rounding.")
    if scale_cfg.order == "after":
        return ("Symmetric rescaling after quantization scales the dequantized q rows by g and the k rows by 1/g: "
                "the logits are unchanged in exact arithmetic, so any difference is rounding noise. "
                "Use shared mode, or scale before quantization with a per-tensor grid.")
    if has_qk_norm:
        return ("This model normalises q and k per head before RoPE, so the scales act on the norm weights, which "
                "are not quantized: a symmetric scale cannot interact with the weight quantizer and changes only "
                "rounding. Use shared mode for a real effect.")
    frozen = quant.QUANTIZERS[quant_cfg.method].frozen_rows(quant_cfg)
    if quant.is_row_scale_equivariant(quant_cfg) or frozen:
        why = (f"{quant_cfg.method.upper()}'s searched statistics stay frozen when rows are re-quantized, so its "
               "min-max groups scale with the row" if frozen else
               "min-max grids with groups along the input dimension give Q(gW) = g Q(W)")
        return (f"Symmetric rescaling before {quant_cfg.describe()} cannot change the model beyond rounding: {why}. "
                "Any 'gain' is rounding noise. Use shared mode or a per-tensor grid (group size -2) for a real effect.")
    return None


# ----------------------------------------------------------------------------- rows of one projection


def _norm_offset(norm: nn.Module) -> float:
    """1.0 if the norm computes x * (1 + w) (Gemma), 0.0 if x * w: probe a copy with w = 0."""
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        x = torch.linspace(-1.0, 1.0, probe.weight.numel(), device=probe.weight.device) + 0.5
        return 0.0 if probe(x[None]).abs().max().item() == 0 else 1.0


@dataclass
class BandRows:
    """The rows (or norm dims) of one projection that the bands own, with cached copies.

    kind "rows": rows `index` of a Linear's weight (and bias); kind "norm": dims `index` of a q/k
    norm weight. `band[i]` is the band of index[i].
    """

    proj: str  # "q" | "k"
    layer: int  # position in models.attention_layers (the row of per-layer scales)
    name: str  # module name in the model (what quant.requantize_rows is keyed by)
    module: nn.Module
    kind: str  # "rows" | "norm"
    index: torch.Tensor  # (R,)
    band: torch.Tensor  # (R,)
    fp: torch.Tensor  # (R, in) rows, or (R,) norm dims, full precision, model dtype
    bias: torch.Tensor | None = None  # (R,) full-precision bias entries
    offset: float = 0.0  # norm: 1.0 for Gemma's x * (1 + w)
    quant: torch.Tensor | None = None  # unscaled quantized rows
    scaled_quant: torch.Tensor | None = None  # rows for "quant_scaled" with order "before"

    def mask(self, b: int) -> torch.Tensor:
        return self.band == b

    def row_factor(self, factors: torch.Tensor) -> torch.Tensor:
        """(R,) fp32 multiplier of every row from per-band factors ((B,), or (L, B): this layer's row)."""
        if factors.dim() == 2:
            factors = factors[self.layer]
        return factors.to(device=self.band.device, dtype=torch.float32)[self.band].to(self.fp.device)


def band_index(layer, proj: str, bands: bands_mod.Bands) -> tuple[nn.Module, str, torch.Tensor, torch.Tensor]:
    """(module, kind, index, band) of the rows a layer's q or k projection gives the bands: the norm's dims
    ("norm") when the model has a q/k norm with weights, else the Linear's output rows ("rows"); `band[i]` is
    the band of index[i]. The one rule for the Rescaler's copies and the gradient search's hooks."""
    lin = layer.q_lin if proj == "q" else layer.k_lin
    off = layer.q_off if proj == "q" else layer.k_off
    heads = layer.n_heads if proj == "q" else layer.n_kv_heads
    norm = layer.q_norm if proj == "q" else layer.k_norm
    idx, band = [], []
    if norm is not None and getattr(norm, "weight", None) is not None:
        n = norm.weight.numel()
        per_head = n == layer.head_dim
        if not per_head and n != heads * layer.head_dim:
            raise ModelError(f"Layer {layer.index}: the {proj}_norm weight has {n} entries, neither head_dim nor "
                             "the projection's width; rescaling does not know its layout.")
        for b, pairs in enumerate(bands.ranges()):
            r = (bands_mod.head_rows(pairs, layer.rotary_dim) if per_head
                 else bands_mod.proj_rows(pairs, layer.head_dim, layer.rotary_dim, heads))
            idx.append(r), band.append(torch.full_like(r, b))
        module, kind = norm, "norm"
    else:
        for b, pairs in enumerate(bands.ranges()):
            r = bands_mod.proj_rows(pairs, layer.head_dim, layer.rotary_dim, heads, offset=off)
            idx.append(r), band.append(torch.full_like(r, b))
        module, kind = lin, "rows"
    index = torch.cat(idx).to(module.weight.device)
    return module, kind, index, torch.cat(band).to(index.device)


def _proj_rows(layer, proj: str, bands: bands_mod.Bands, names: dict[int, str], pos: int) -> BandRows:
    module, kind, index, band = band_index(layer, proj, bands)
    if kind == "norm":
        return BandRows(proj, pos, names[id(module)], module, "norm", index, band,
                        module.weight.detach()[index].clone(), offset=_norm_offset(module))
    bias = module.bias.detach()[index].clone() if module.bias is not None else None
    return BandRows(proj, pos, names[id(module)], module, "rows", index, band, module.weight.detach()[index].clone(),
                    bias=bias)


# ----------------------------------------------------------------------------- the rescaler


class Rescaler:
    """The q/k rows (or norm dims) that the bands own, with the caches that make moving one band cheap.

    It holds no scales: the Workbench owns them and passes them in. Build it while the model holds its
    full-precision weights (they are copied, q/k rows only); `attach_quant` while it holds the
    quantized ones. `refresh(bands, scales, cfg)` re-quantizes the rows of the given bands for order
    "before"; `write(variant, scales, cfg)` puts the rows of a variant into the model in place: "fp",
    "quant" (unscaled) or "fp_scaled", "quant_scaled" (with the scales).
    """

    def __init__(self, model: nn.Module, bands: bands_mod.Bands):
        from qroar.models import attention_layers

        layers = attention_layers(model)
        if bands.n_pairs != layers[0].rotary_dim // 2:
            raise ConfigError(f"The bands cover {bands.n_pairs} RoPE pairs but the model has {layers[0].rotary_dim // 2}.")
        names = {id(m): n for n, m in model.named_modules()}
        self.bands = bands
        self.targets = [_proj_rows(layer, p, bands, names, i) for i, layer in enumerate(layers) for p in ("q", "k")]
        self.n_layers = len(layers)
        self.has_qk_norm = any(t.kind == "norm" for t in self.targets)
        self.qstate = None
        self._written: tuple | None = None  # the write key now in the model

    @property
    def n_bands(self) -> int:
        return self.bands.n_bands

    # ------------------------------------------------------------------ quantized rows

    @torch.no_grad()
    def attach_quant(self, qstate) -> None:
        """Copy the quantized q/k rows from the model's weights now in place (None: no quantization);
        the "before" rows of scaled bands need a `refresh` after this."""
        self.qstate = qstate if qstate is not None and not qstate.cfg.is_identity else None
        for t in self.targets:
            quantized = self.qstate is not None and t.kind == "rows" and t.name in self.qstate.originals
            t.quant = t.module.weight.detach()[t.index].clone() if quantized else None
            t.scaled_quant = None
        self._written = None

    @torch.no_grad()
    def refresh(self, bands, scales, cfg: ScaleConfig) -> None:
        """Recompute the "before" quantized rows of `bands` for these scales: a band index b means band b of
        every layer, a pair (layer, b) only that layer's band b (what per-layer scales move)."""
        if cfg.order != "before" or self.qstate is None:
            return
        from qroar.quant import requantize_rows

        factors = band_factors(check_scales(scales, self.n_bands, self.n_layers), cfg.mode)
        moved = [(None, b) if isinstance(b, int) else (int(b[0]), int(b[1])) for b in bands]
        for t in self.targets:
            if t.quant is None:
                continue
            if t.scaled_quant is None:
                t.scaled_quant = t.quant.clone()
            f_t = factors[t.proj][t.layer] if factors[t.proj].dim() == 2 else factors[t.proj]
            for layer, b in moved:
                if layer is not None and layer != t.layer:
                    continue
                m = t.mask(b)
                f = float(f_t[b])
                if f == 1.0:  # the quantizer's own rows, bit for bit
                    t.scaled_quant[m] = t.quant[m]
                    continue
                rows = t.fp[m].float() * f
                t.scaled_quant[m] = requantize_rows(self.qstate, t.name, rows, t.index[m]).to(t.fp.dtype)
        self._written = None

    # ------------------------------------------------------------------ writing into the model

    def rows_for(self, t: BandRows, variant: str, scales=None, cfg: ScaleConfig | None = None):
        """(weight rows or norm dims, bias entries) of target t under a variant (scales: for the scaled ones)."""
        if variant not in VARIANTS:
            raise ConfigError(f"Unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
        scaled = variant in SCALED
        f = t.row_factor(band_factors(torch.as_tensor(scales, dtype=torch.float64), cfg.mode)[t.proj]) if scaled else None
        if t.kind == "norm":
            w = t.fp if f is None else ((t.fp.float() + t.offset) * f - t.offset).to(t.fp.dtype)
            return w, None
        bias = t.bias if (t.bias is None or f is None) else (t.bias.float() * f).to(t.bias.dtype)
        quantized = variant in ("quant", "quant_scaled") and t.quant is not None
        if not scaled:
            return (t.quant if quantized else t.fp), bias
        if not quantized:
            return (t.fp.float() * f[:, None]).to(t.fp.dtype), bias
        if cfg.order == "before":
            return t.scaled_quant, bias
        return (t.quant.float() * f[:, None]).to(t.quant.dtype), bias

    @torch.no_grad()
    def write(self, variant: str, scales=None, cfg: ScaleConfig | None = None, key=None) -> None:
        """Put the q/k rows (or norm dims) of `variant` into the model, in place; `key` names what is
        written (the caller's version of the scales), so writing the same thing twice costs nothing."""
        if variant in SCALED and (scales is None or cfg is None):
            raise ConfigError(f"Variant {variant!r} needs scales: set them first (a recipe with scales or a scales file).")
        key = None if key is None else (variant, key if variant in SCALED else None)
        if key is not None and key == self._written:
            return
        for t in self.targets:
            w, bias = self.rows_for(t, variant, scales, cfg)
            t.module.weight.data.index_copy_(0, t.index, w.to(t.module.weight.dtype))
            if bias is not None:
                t.module.bias.data.index_copy_(0, t.index, bias.to(t.module.bias.dtype))
        self._written = key

    def forget_written(self) -> None:
        """The model's weights were replaced from outside: write again next time."""
        self._written = None


def rescale_model(model: nn.Module, bands: bands_mod.Bands, scales, cfg: ScaleConfig = ScaleConfig()) -> Rescaler:
    """Scale a full-precision model's q/k band rows in place (the "fp_scaled" variant); returns the Rescaler.

    `rescaler.write("fp")` puts the original rows back.
    """
    r = Rescaler(model, bands)
    r.write("fp_scaled", check_scales(scales, bands.n_bands), cfg)
    return r


def describe_scales(scales, digits: int = 4) -> str:
    """One line for people: "b0=1.02, b1=0.98, ..." (shared), or per layer "L0: 1.02, 0.98 | L1: ..."."""
    t = check_scales(scales)
    fmt = lambda g: f"{g:.{digits}g}"  # noqa: E731
    if t.dim() == 1:
        return ", ".join(f"b{b}={fmt(g)}" for b, g in enumerate(t.tolist()))
    if bool((t == t[:1]).all()):
        return "per layer, every layer the same: " + ", ".join(f"b{b}={fmt(g)}" for b, g in enumerate(t[0].tolist()))
    return " | ".join(f"L{i}: " + ", ".join(fmt(g) for g in row) for i, row in enumerate(t.tolist()))
