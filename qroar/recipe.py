"""The Recipe: every setting that changes the model, described once.

A Recipe is frozen and self-validating. It holds the position interpolation (PI), the weight
quantizer and its calibration corpus, the bands (rule and, from a scales file, explicit edges),
the rescaling mode and order, the per-band scales and any windows set by hand. It serialises
exactly to JSON (`to_dict`/`from_dict`) and to `qroar` command-line arguments (`to_args`, and
`add_args` + `from_args` on the parser side); `Workbench.apply(recipe)` is the one place that puts
it on a model. The CLI builds one from its arguments, the app's session holds one, the Report
prints the command from one, and a scales file is one plus results.

Pure functions below derive what the engine rules say from a Recipe and the model's `Geometry`
(config and shape, never weights): the band edges, the per-band windows and the invariance note.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace

from qroar import bands as bands_mod
from qroar import rope
from qroar.errors import ConfigError
from qroar.quant import QUANTIZERS, SCOPES, QuantConfig
from qroar.rescale import MODES, ORDERS, ScaleConfig

PI_PARAM_DEFAULTS = {"yarn": (("beta_fast", 32.0), ("beta_slow", 1.0)),
                     "llama3": (("high_freq_factor", 4.0), ("low_freq_factor", 1.0))}
ALL_PI_DEFAULTS = {k: v for pairs in PI_PARAM_DEFAULTS.values() for k, v in pairs}


def _default_quant() -> QuantConfig:
    # seq_len 0: calibrate at the model's trained context
    return QuantConfig(method="rtn", bits=4, group_size=128, n_samples=16, seq_len=0)


def _floats(v, what: str) -> tuple | None:
    if v is None:
        return None
    try:
        return tuple(float(x) for x in v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be a list of numbers, got {v!r:.80}.") from e


def _scales(v) -> tuple | None:
    """Shared scales as a tuple of floats, per-layer ones as a tuple of per-layer tuples (all of one length)."""
    if v is None:
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    try:
        rows = list(v)
    except TypeError as e:
        raise ConfigError(f"scales must be a list of numbers, got {v!r:.80}.") from e
    if rows and all(isinstance(r, (list, tuple)) for r in rows):
        out = tuple(_floats(r, f"the scales of layer {i}") for i, r in enumerate(rows))
        if len({len(r) for r in out}) != 1:
            raise ConfigError(f"Per-layer scales need the same number of bands in every layer, got {[len(r) for r in out]}.")
        return out
    return _floats(rows, "scales")


@dataclass(frozen=True)
class Recipe:
    """What is applied to the model: PI, quantizer, bands, rescaling, scales (see the module docstring).

    quant.method "none" is full precision; quant.seq_len 0 calibrates at the trained context.
    edges: explicit band edges (None: by the bands rule). scales: one per band (None: no scales), or one tuple
    of band scales per layer (per-layer scales; on the command line `--scales` with layers separated by ";").
    windows: (g_min, g_max) per band set by hand (None: the IP/TIR rule).
    """

    pi: rope.PIConfig = field(default_factory=rope.PIConfig)
    quant: QuantConfig = field(default_factory=_default_quant)
    calib: str = "embedded:dev"
    bands: bands_mod.BandConfig = field(default_factory=bands_mod.BandConfig)
    edges: tuple[int, ...] | None = None
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    scales: tuple[float, ...] | tuple[tuple[float, ...], ...] | None = None
    windows: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self):
        if self.quant is None:
            object.__setattr__(self, "quant", QuantConfig(method="none"))
        if self.edges is not None:
            e = tuple(int(x) for x in self.edges)
            if len(e) < 2 or e[0] != 0 or any(a >= b for a, b in zip(e, e[1:])):
                raise ConfigError(f"Band edges must increase from 0, got {list(self.edges)}.")
            object.__setattr__(self, "edges", e)
        s = _scales(self.scales)
        if s is not None:
            layered = self.per_layer_scales_of(s)
            for i, row in enumerate(s if layered else (s,)):
                for b, g in enumerate(row):
                    if not math.isfinite(g) or g <= 0:
                        where = f"layer {i}, band {b}" if layered else f"band {b}"
                        raise ConfigError(f"The scale of {where} is {g}: every scale must be a positive finite number (1 = unchanged).")
            if self.edges is not None and self.n_scale_bands_of(s) != len(self.edges) - 1:
                raise ConfigError(f"Got {self.n_scale_bands_of(s)} scales for {len(self.edges) - 1} bands: give exactly one scale per band.")
        object.__setattr__(self, "scales", s)
        if self.windows is not None:
            w = tuple(tuple(float(x) for x in p) for p in self.windows)
            for b, p in enumerate(w):
                if len(p) != 2 or not (all(math.isfinite(x) for x in p) and 0 < p[0] <= 1 <= p[1]):
                    raise ConfigError(f"The window of band {b} is {list(p)}: it must be positive and contain 1 (g_min <= 1 <= g_max).")
            object.__setattr__(self, "windows", w)
        if not isinstance(self.calib, str) or not self.calib.strip():
            raise ConfigError("The calibration corpus must be a corpus spec such as embedded:dev.")

    # ------------------------------------------------------------------ properties

    @staticmethod
    def per_layer_scales_of(s) -> bool:
        return bool(s) and isinstance(s[0], tuple)

    @staticmethod
    def n_scale_bands_of(s) -> int:
        return len(s[0]) if Recipe.per_layer_scales_of(s) else len(s)

    @property
    def per_layer(self) -> bool:
        """True when the scales are per layer (one tuple of band scales per layer)."""
        return self.scales is not None and self.per_layer_scales_of(self.scales)

    @property
    def quantized(self) -> bool:
        return not self.quant.is_identity

    @property
    def calibrated(self) -> bool:
        return self.quantized and QUANTIZERS[self.quant.method].needs_calibration

    def quant_key(self) -> tuple | None:
        """What the quantized weights depend on: calibrated methods also on the PI and the corpus."""
        if not self.quantized:
            return None
        return (self.quant, self.pi if self.calibrated else None, self.calib if self.calibrated else None)

    def band_config(self) -> bands_mod.BandConfig:
        """The bands rule; YaRN-aligned edges follow the PI's own ramp when the PI is YaRN."""
        extra = self.pi.extra
        if self.bands.align == "yarn" and self.pi.rope_type == "yarn":
            return replace(self.bands, beta_fast=float(extra.get("beta_fast", 32.0)), beta_slow=float(extra.get("beta_slow", 1.0)))
        return self.bands

    # ------------------------------------------------------------------ edits by path (the app's widgets)

    def get(self, path: str):
        """A setting by dotted path: "pi.factor", "pi.beta_fast", "quant.bits", "bands.n_bands", "scale.mode", "scales"."""
        head, _, rest = path.partition(".")
        if head == "pi" and rest == "original":
            return self.pi.original_max_position_embeddings or 0
        if head == "pi" and rest not in ("rope_type", "factor"):
            return self.pi.extra.get(rest, ALL_PI_DEFAULTS.get(rest))
        obj = getattr(self, head)
        return getattr(obj, rest) if rest else obj

    def set(self, path: str, value) -> "Recipe":
        """A new Recipe with one setting changed; pieces that no longer fit (explicit edges, scales and
        windows of another band count, hand-set windows after a PI or band change) are dropped."""
        head, _, rest = path.partition(".")
        if head == "pi":
            return self.with_pi(_pi_with(self.pi, rest, value))
        if head == "bands":
            new = replace(self.bands, **{rest: value})
            keep = new.n_bands == self.bands.n_bands
            return replace(self, bands=new, edges=None, windows=None, scales=self.scales if keep else None)
        if head == "quant" and rest == "method":  # a file format's quantizer brings the settings it fixes
            from qroar.quant import method_defaults

            return replace(self, quant=replace(self.quant, method=value, **method_defaults(value)))
        if head in ("quant", "scale"):
            return replace(self, **{head: replace(getattr(self, head), **{rest: value})})
        if head not in self.__dataclass_fields__ or rest:
            raise ConfigError(f"Unknown setting {path!r}.")
        return replace(self, **{head: value})

    def with_pi(self, pi: rope.PIConfig) -> "Recipe":
        return self if pi == self.pi else replace(self, pi=pi, windows=None)

    def with_scales(self, scales) -> "Recipe":
        """Shared (one per band) or per-layer (one list per layer) scales; None removes them."""
        return replace(self, scales=_scales(scales))

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"pi": self.pi.to_dict(), "quant": self.quant.to_dict(), "calib": self.calib,
                "bands": self.bands.to_dict(), "edges": None if self.edges is None else list(self.edges),
                "scale": self.scale.to_dict(), "scales": _scales_json(self.scales),
                "windows": None if self.windows is None else [list(p) for p in self.windows]}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown recipe settings: {', '.join(sorted(unknown))}.")
        q = d.get("quant")
        return cls(pi=rope.PIConfig.from_dict(d.get("pi") or {}),
                   quant=QuantConfig.from_dict(q) if q is not None else QuantConfig(method="none"),
                   calib=d.get("calib", "embedded:dev"), bands=bands_mod.BandConfig.from_dict(d.get("bands") or {}),
                   edges=d.get("edges"), scale=ScaleConfig.from_dict(d.get("scale") or {}),
                   scales=d.get("scales"), windows=d.get("windows"))

    # ------------------------------------------------------------------ command-line arguments

    def to_args(self) -> list[str]:
        """`qroar` arguments that `from_args` turns back into this very Recipe (defaults left out)."""
        base, out = Recipe(), []
        pi = self.pi
        if pi.rope_type != base.pi.rope_type:
            out += ["--pi", pi.rope_type]
        if pi.factor != base.pi.factor:
            out += ["--factor", f"{pi.factor:g}" if float(f"{pi.factor:g}") == pi.factor else repr(pi.factor)]
        if pi.original_max_position_embeddings is not None:
            out += ["--original", str(pi.original_max_position_embeddings)]
        for k, v in pi.params:
            out += ["--pi-param", f"{k}={','.join(map(repr, v)) if isinstance(v, tuple) else _num(v)}"]
        for spec in QUANT_ARGS:
            v = getattr(self.quant, spec.field)
            if v != getattr(base.quant, spec.field):
                out += [spec.flag] if spec.kind == "flag" else [spec.flag, str(v)]
        if self.calib != base.calib:
            out += ["--calib", self.calib]
        if self.bands.n_bands != base.bands.n_bands:
            out += ["--bands", str(self.bands.n_bands)]
        if self.bands.align != base.bands.align:
            out += ["--band-align", self.bands.align]
        if self.edges is not None:
            out += ["--edges", ",".join(map(str, self.edges))]
        if self.scale.mode != base.scale.mode:
            out += ["--mode", self.scale.mode]
        if self.scale.order != base.scale.order:
            out += ["--order", self.scale.order]
        if self.scales is not None:
            out += ["--scales", format_scales(self.scales)]
        if self.windows is not None:
            out += ["--windows", ",".join(f"{lo!r}:{hi!r}" for lo, hi in self.windows)]
        return out

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "Recipe":
        """The Recipe of arguments added by `add_args` (ConfigError for malformed values)."""
        params = []
        for kv in a.pi_param:
            if "=" not in kv:
                raise ConfigError(f"--pi-param expects KEY=VALUE, got {kv!r}.")
            k, v = kv.split("=", 1)
            params.append((k.strip(), _parse_value(v.strip())))
        pi = rope.PIConfig(a.pi, a.factor, a.original, tuple(sorted(params)))
        quant = _quant_from_args(a)
        edges = _int_list(a.edges, "--edges") if a.edges else None
        scales = parse_scales(a.scales) if a.scales else None
        windows = None
        if a.windows:
            try:
                windows = tuple(tuple(float(x) for x in w.split(":")) for w in a.windows.split(","))
            except ValueError as e:
                raise ConfigError(f"--windows expects LO:HI per band, comma-separated (e.g. 0.9:1.1,0.8:1.25), "
                                  f"got {a.windows!r}.") from e
        bands = bands_mod.BandConfig(n_bands=a.bands, align=a.band_align)
        if edges is not None and len(edges) - 1 != bands.n_bands:
            bands = replace(bands, n_bands=len(edges) - 1)
        return cls(pi=pi, quant=quant, calib=a.calib, bands=bands, edges=edges,
                   scale=ScaleConfig(a.mode, a.order), scales=scales, windows=windows)


def _quant_from_args(a: argparse.Namespace) -> QuantConfig:
    """QuantConfig of the arguments; a setting not given takes the method's fixed value (gguf-q4_0: 4 bits, blocks
    of 32, symmetric), else the Recipe's default. A given one that the method cannot hold is refused by QuantConfig."""
    from qroar.quant import method_defaults

    base, fixed = Recipe().quant, method_defaults(a.quant)
    values = {}
    for s in QUANT_ARGS:
        v = getattr(a, s.dest)
        values[s.field] = fixed.get(s.field, getattr(base, s.field)) if v is None else v
    return QuantConfig(**values)


def _scales_json(s):
    if s is None:
        return None
    return [list(r) for r in s] if Recipe.per_layer_scales_of(s) else list(s)


def format_scales(s) -> str:
    """The `--scales` text of shared (b0,b1,...) or per-layer (layers separated by ";") scales."""
    row = lambda r: ",".join(repr(float(g)) for g in r)  # noqa: E731
    return ";".join(row(r) for r in s) if Recipe.per_layer_scales_of(s) else row(s)


def parse_scales(text: str):
    """`--scales` text: comma-separated band scales, or per layer with layers separated by ";"."""
    if ";" in text:
        return tuple(_float_list(r, f"--scales (layer {i})") for i, r in enumerate(text.split(";")) if r.strip())
    return _float_list(text, "--scales")


def _num(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _pi_with(pi: rope.PIConfig, key: str, value) -> rope.PIConfig:
    """PIConfig with one field or type parameter changed; a new type starts from its own parameter defaults."""
    if key == "rope_type":
        if value == "default":
            return rope.PIConfig()
        factor = pi.factor if pi.rope_type != "default" else 8.0
        keep = {k: v for k, v in pi.params if k in rope.EXTRA_KEYS.get(value, ())}
        params = {**dict(PI_PARAM_DEFAULTS.get(value, ())), **keep}
        return rope.PIConfig(value, factor, pi.original_max_position_embeddings, tuple(sorted(params.items())))
    if pi.rope_type == "default":
        return pi  # no interpolation has no factor or options to set
    if key == "factor":
        return replace(pi, factor=float(value))
    if key == "original":
        return replace(pi, original_max_position_embeddings=int(value) or None)
    params = {**dict(pi.params), key: value}
    return replace(pi, params=tuple(sorted(params.items())))


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if "," in v:
        return tuple(_parse_value(x) for x in v.split(","))
    return v


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} expects comma-separated integers, got {text!r}.") from e


def _float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}.") from e


# ----------------------------------------------------------------------------- the parser side


@dataclass(frozen=True)
class _QuantArg:
    flag: str
    dest: str
    field: str
    kind: str  # "value" | "flag"
    help: str


QUANT_ARGS = (
    _QuantArg("--quant", "quant", "method", "value", "none | " + " | ".join(k for k in QUANTIZERS if k != "none")),
    _QuantArg("--bits", "bits", "bits", "value", "bits per weight (2-8)"),
    _QuantArg("--group-size", "group_size", "group_size", "value",
              "group size along the input dim; 0 = per output channel; -2 = one grid per tensor"),
    _QuantArg("--sym", "sym", "symmetric", "flag", "symmetric grid (default asymmetric)"),
    _QuantArg("--scope", "scope", "scope", "value", " | ".join(SCOPES) + " (linear: all but the head)"),
    _QuantArg("--calib-samples", "calib_samples", "n_samples", "value", "calibration windows for calibrated quantizers"),
    _QuantArg("--calib-len", "calib_len", "seq_len", "value", "calibration window length (0 = the trained context)"),
)


def add_args(p: argparse.ArgumentParser, scales: bool = True) -> None:
    """The Recipe's arguments, with the Recipe's own defaults (`from_args` reads them back)."""
    from qroar.rope import ROPE_TYPES

    base = Recipe()
    g = p.add_argument_group("position interpolation")
    g.add_argument("--pi", default=base.pi.rope_type, choices=ROPE_TYPES, help="rope_type (default = no interpolation)")
    g.add_argument("--factor", type=float, default=base.pi.factor, help="interpolation factor")
    g.add_argument("--original", type=int, default=None, help="original (trained) context; default: the model's")
    g.add_argument("--pi-param", action="append", default=[], metavar="KEY=VALUE", help="extra rope parameter, e.g. beta_fast=32")
    g = p.add_argument_group("weight quantization")
    for s in QUANT_ARGS:
        default = getattr(base.quant, s.field)
        if s.kind == "flag":  # None when not given: the method's fixed value (or the default) applies
            g.add_argument(s.flag, dest=s.dest, action="store_true", default=None, help=s.help)
        elif s.dest == "quant":
            g.add_argument(s.flag, dest=s.dest, default=default, choices=list(QUANTIZERS), help=s.help)
        elif s.dest == "scope":
            g.add_argument(s.flag, dest=s.dest, default=default, choices=SCOPES, help=s.help)
        else:
            g.add_argument(s.flag, dest=s.dest, type=int, default=None,
                           help=f"{s.help} (default {default}, or the value the quantizer fixes)")
    g.add_argument("--calib", default=base.calib, help="calibration corpus for calibrated quantizers (gptq, awq)")
    g = p.add_argument_group("bands and scales")
    g.add_argument("--bands", type=int, default=base.bands.n_bands, help="number of RoPE frequency bands (4-16)")
    g.add_argument("--band-align", default=base.bands.align, choices=bands_mod.ALIGNMENTS,
                   help="log-spaced, or aligned with YaRN's ramp")
    g.add_argument("--edges", default=None, help=argparse.SUPPRESS if not scales else
                   "explicit band edges in RoPE pairs, comma-separated (from a scales file)")
    g.add_argument("--mode", default=base.scale.mode, choices=MODES, help="shared: W_K * g; symmetric: W_K / g")
    g.add_argument("--order", default=base.scale.order, choices=ORDERS, help="scale before or after quantization")
    g.add_argument("--scales", default=None, help=argparse.SUPPRESS if not scales else
                   "one scale per band, comma-separated (default: none); per-layer scales: one such list per "
                   "layer, separated by ';'")
    g.add_argument("--windows", default=None, help="explicit window LO:HI per band, comma-separated (skips the IP/TIR rule)")


# ----------------------------------------------------------------------------- rules from a Recipe and a model's shape


@dataclass(frozen=True)
class Geometry:
    """What the rules need of a model, read from its config and module layout, never its weights."""

    config: object  # the model's config (transformers PretrainedConfig)
    base_rope: dict  # the model's own rope_parameters (before any PI)
    n_pairs: int
    has_qk_norm: bool

    def freqs(self, pi: rope.PIConfig, seq_len: int | None = None) -> rope.RopeFreqs:
        return rope.frequencies(self.config, pi, seq_len=seq_len, base_params=self.base_rope)


def band_edges(recipe: Recipe, geo: Geometry) -> bands_mod.Bands:
    """The recipe's bands on this model: its explicit edges, else the rule under its PI."""
    if recipe.edges is not None:
        if recipe.edges[-1] != geo.n_pairs:
            raise ConfigError(f"Band edges must increase from 0 to this model's {geo.n_pairs} RoPE pairs, got {list(recipe.edges)}.")
        return bands_mod.Bands(recipe.edges)
    return bands_mod.bands_for(geo.freqs(recipe.pi), recipe.band_config())


def windows(recipe: Recipe, geo: Geometry, tir=None, **rule):
    """Per-band windows: the IP (and TIR_W) rule of qroar.search.derive_windows at 8x the trained context,
    then any windows the recipe sets by hand. Columns: band, pairs, ip, tir, g_min, g_max, reason, moved."""
    from qroar.diagnostics import interpolation_pressure
    from qroar.search import derive_windows

    bands = band_edges(recipe, geo)
    ip = interpolation_pressure(lambda D=None: geo.freqs(recipe.pi, D), bands,
                                (geo.freqs(recipe.pi).trained_context * 8,))
    table = derive_windows(ip, tir, **rule)
    table.insert(1, "pairs", [f"{r.start}-{r.stop - 1}" for r in bands.ranges()])
    table["moved"] = False
    if recipe.windows is not None:
        if len(recipe.windows) != bands.n_bands:
            raise ConfigError(f"Got {len(recipe.windows)} windows for {bands.n_bands} bands: give one window per band.")
        for b, (lo, hi) in enumerate(recipe.windows):
            if (lo, hi) != (table.at[b, "g_min"], table.at[b, "g_max"]):
                table.loc[b, ["g_min", "g_max", "reason", "moved"]] = [lo, hi, "set by hand", True]
    return table


def invariance_note(recipe: Recipe, geo: Geometry) -> str | None:
    """Why the recipe's scales cannot change the model beyond rounding (qroar.rescale.invariance_note), or None."""
    from qroar.rescale import invariance_note as note

    return note(recipe.quant if recipe.quantized else None, recipe.scale, geo.has_qk_norm)
