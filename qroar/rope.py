"""RoPE frequencies and position interpolation (PI), taken from transformers' own registry.

omega_j = theta^(-2j/d) is the frequency of pair j before PI; inv_freq_j is what the model uses
after PI (from `ROPE_INIT_FUNCTIONS[rope_type]`); s_j = omega_j / inv_freq_j is the per-pair
interpolation scale. Every rope_type transformers knows works, and new ones come free.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from qroar.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Keys each type reads beyond factor / original_max_position_embeddings (shown in the app).
EXTRA_KEYS = {
    "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"),
    "longrope": ("short_factor", "long_factor", "attention_factor"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
}
EXTRA_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass(frozen=True)
class PIConfig:
    """A position-interpolation setting; `original_max_position_embeddings=None` = the model's trained context."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    params: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"Unknown rope_type {self.rope_type!r}: choose one of {', '.join(ROPE_TYPES)}.")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor >= 1.0):
            raise ConfigError(f"PI factor must be a finite number >= 1, got {self.factor!r}.")
        o = self.original_max_position_embeddings
        if o is not None and (not isinstance(o, int) or o <= 0):
            raise ConfigError(f"original_max_position_embeddings must be a positive integer, got {o!r}.")
        known = set(EXTRA_KEYS.get(self.rope_type, ()))
        for k, _ in self.params:
            if k not in known:
                raise ConfigError(
                    f"Parameter {k!r} does not apply to rope_type {self.rope_type!r}"
                    + (f"; it takes {', '.join(sorted(known))}." if known else "; it takes none.")
                )

    @property
    def extra(self) -> dict:
        return dict(self.params)

    def to_dict(self) -> dict:
        return {
            "rope_type": self.rope_type,
            "factor": float(self.factor),
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "params": {k: v for k, v in self.params},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PIConfig":
        params = d.get("params") or {}
        return cls(
            rope_type=d.get("rope_type", "default"),
            factor=float(d.get("factor", 1.0)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())),
        )

    def label(self) -> str:
        return "none" if self.rope_type == "default" else f"{self.rope_type} x{self.factor:g}"


@dataclass(frozen=True)
class RopeFreqs:
    """Per-pair frequencies of one model under one PI setting (all 1-D tensors of length rotary_dim/2)."""

    omega: torch.Tensor  # before PI
    inv_freq: torch.Tensor  # after PI
    s: torch.Tensor  # omega / inv_freq
    attention_factor: float
    theta: float
    rotary_dim: int
    trained_context: int

    @property
    def wavelength(self) -> torch.Tensor:
        return 2 * math.pi / self.omega


# ----------------------------------------------------------------------------- config helpers


def text_config(config):
    """The decoder's config (multimodal wrappers keep it under text_config)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


def _nested_key(config) -> str | None:
    """Gemma 3 and friends key rope_parameters by layer type; PI applies to the full-attention ones."""
    rp = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in rp or "rope_theta" in rp:
        return None
    for key in ("full_attention", *rp.keys()):
        if isinstance(rp.get(key), dict):
            return key
    return None


def rope_parameters(config) -> dict:
    """The flat rope_parameters dict the model's (full-attention) layers use."""
    config = text_config(config)
    rp = getattr(config, "rope_parameters", None)
    if not rp:
        raise ConfigError("This config has no rope_parameters: it is not a RoPE model.")
    key = _nested_key(config)
    return dict(rp[key] if key else rp)


def trained_context(config) -> int:
    """The context the model was trained at: original_max_position_embeddings if a PI is baked in."""
    config = text_config(config)
    rp = rope_parameters(config)
    return int(rp.get("original_max_position_embeddings") or config.max_position_embeddings)


def head_dims(config) -> tuple[int, int]:
    """(head_dim, rotary_dim): rotary_dim < head_dim for partial-rotary models."""
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    prf = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim), int(head_dim * prf)


def pi_rope_parameters(config, pi: PIConfig, base_params: dict | None = None) -> dict:
    """The rope_parameters dict that realises `pi` on top of the model's own (trained) parameters."""
    base = dict(base_params if base_params is not None else rope_parameters(config))
    keep = {k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}
    orig = pi.original_max_position_embeddings or int(
        base.get("original_max_position_embeddings") or text_config(config).max_position_embeddings
    )
    if pi.rope_type == "default":
        return {"rope_type": "default", **keep}
    out = {"rope_type": pi.rope_type, **keep, "factor": float(pi.factor), "original_max_position_embeddings": orig}
    for k in EXTRA_KEYS.get(pi.rope_type, ()):
        if k in EXTRA_DEFAULTS:
            out[k] = EXTRA_DEFAULTS[k]
    if pi.rope_type == "longrope":
        # A simple default (LongRoPE's real factors come from its own search): short = 1, long ramps
        # from 1 at the highest frequency to `factor` at the lowest. Pass your own lists to override.
        _, rot = head_dims(config)
        n = rot // 2
        out["short_factor"] = [1.0] * n
        out["long_factor"] = [1.0 + (pi.factor - 1.0) * j / max(n - 1, 1) for j in range(n)]
    for k, v in pi.params:
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _config_with(config, params: dict):
    """A shallow copy of the text config whose (full-attention) rope_parameters are `params`."""
    c = copy.copy(text_config(config))
    key = _nested_key(c)
    if key:
        c.rope_parameters = {**c.rope_parameters, key: dict(params)}
    else:
        c.rope_parameters = dict(params)
    if params.get("rope_type") == "dynamic":  # dynamic NTK reads its original context from here
        c.max_position_embeddings = int(params["original_max_position_embeddings"])
    return c


def _inv_freq(config, params: dict, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = _config_with(config, params)
    rope_type = params.get("rope_type", "default")
    layer_type = _nested_key(c)
    kw = {"layer_type": layer_type} if layer_type else {}
    if rope_type == "default":
        theta = params.get("rope_theta", 10000.0)
        _, rot = head_dims(c)
        inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float64, device=device) / rot))
        return inv.float(), 1.0
    n_pairs = head_dims(c)[1] // 2
    for key in ("short_factor", "long_factor"):  # a wrong-length list would broadcast or crash inside transformers
        v = params.get(key)
        if isinstance(v, (list, tuple)) and len(v) != n_pairs:
            raise ConfigError(f"{key} needs one factor per RoPE pair ({n_pairs} for this model), got {len(v)}.")
    try:
        inv, att = ROPE_INIT_FUNCTIONS[rope_type](c, device, seq_len=seq_len, **kw)
    except (KeyError, TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise ConfigError(f"rope_type {rope_type!r} rejected these parameters ({e}); check factor and its options.") from e
    if not (torch.isfinite(inv).all() and (inv > 0).all() and math.isfinite(float(att))):
        raise ConfigError(f"rope_type {rope_type!r} with {params} gives non-finite or non-positive frequencies or "
                          "attention factor; check factor and its options.")
    return inv.float(), float(att)


def frequencies(config, pi: PIConfig | None = None, seq_len: int | None = None, base_params: dict | None = None) -> RopeFreqs:
    """omega (before PI), inv_freq (after PI), s = omega / inv_freq, from transformers' registry.

    `seq_len` matters only for length-dependent types (dynamic, longrope).
    """
    base = dict(base_params if base_params is not None else rope_parameters(config))
    params = pi_rope_parameters(config, pi, base) if pi is not None else base
    # omega: the un-interpolated frequencies of the same model (theta and rotary dim unchanged)
    omega, _ = _inv_freq(config, {"rope_type": "default", **{k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}})
    inv, att = _inv_freq(config, params, seq_len=seq_len)
    _, rot = head_dims(config)
    return RopeFreqs(
        omega=omega, inv_freq=inv, s=omega / inv, attention_factor=att,
        theta=float(base.get("rope_theta", 10000.0)), rotary_dim=rot,
        trained_context=int(params.get("original_max_position_embeddings") or trained_context(config)),
    )


# ----------------------------------------------------------------------------- applying PI to a model


def rotary_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def apply_pi(model, pi: PIConfig, base_params: dict | None = None) -> dict:
    """Set `pi` on the model in place (config.rope_parameters + rebuilt rotary embeddings).

    `base_params` are the model's own trained parameters (kept by the caller so PI never stacks);
    returns the rope_parameters now in force.
    """
    cfg = text_config(model.config)
    base = dict(base_params if base_params is not None else rope_parameters(cfg))
    params = pi_rope_parameters(cfg, pi, base)
    _inv_freq(cfg, params, seq_len=None)  # validates before anything changes
    new = _config_with(cfg, params)
    cfg.rope_parameters = new.rope_parameters
    cfg.max_position_embeddings = new.max_position_embeddings
    for owner in [m for m in model.modules() if any(type(c).__name__.endswith("RotaryEmbedding") for c in m.children())]:
        for name, child in list(owner.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                dev = child.inv_freq.device if hasattr(child, "inv_freq") else None
                fresh = type(child)(config=cfg)
                setattr(owner, name, fresh.to(dev) if dev is not None else fresh)
    return params
