"""The Workbench: one loaded model and the Recipe applied to it, shared by the CLI and the app.

`apply(recipe)` is the one place that changes the model. It diffs the recipe against what is applied:
a new PI re-derives the rotary embeddings (from the model's own RoPE parameters, so PI settings never
stack); a new quantizer key re-quantizes (the quantized weights are kept while the key holds); new band
edges rebuild the rescaler; a moved scale re-quantizes only that band's q/k rows (in the layers where it
moved, for per-layer scales: shared and per-layer scales are compared as layers x bands). The Workbench owns the
scales (the recipe's); the `rescale.Rescaler` it keeps holds only row copies and caches.

Variants (what the model computes while one is in force):
  fp            full precision
  quant         quantized (= fp when no quantizer is set)
  fp_scaled     full precision + per-band scales
  quant_scaled  quantized + per-band scales (order "before": scaled rows re-quantized; "after": dequantized rows scaled)
Invariant: the tensors parked in `qstate.originals` are always unscaled; scales live in the resident weights only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pandas as pd
import torch

from qroar import bands as bands_mod
from qroar import models, rope
from qroar import recipe as recipe_mod
from qroar.errors import ConfigError
from qroar.recipe import Recipe
from qroar.rescale import SCALED, VARIANTS, Rescaler, ScaleConfig, check_scales, per_layer


@dataclass
class Corpus:
    spec: str
    doc_ids: list[str]
    tokens: list[torch.Tensor]

    def subset(self, ids) -> "Corpus":
        keep = set(ids)
        pairs = [(d, t) for d, t in zip(self.doc_ids, self.tokens) if d in keep]
        return Corpus(self.spec, [d for d, _ in pairs], [t for _, t in pairs])


def _base(variant: str) -> str:
    return "fp" if variant in ("fp", "fp_scaled") else "quant"


class Workbench:
    def __init__(self, loaded: models.Loaded):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        cfg = rope.text_config(self.model.config)
        self.base_rope = rope.rope_parameters(cfg)
        self.base_max_pos = int(cfg.max_position_embeddings)
        self.geometry = recipe_mod.Geometry(self.model.config, self.base_rope, self.info.rotary_dim // 2,
                                            any(layer.q_norm is not None for layer in models.attention_layers(self.model)))
        # what is applied now: full precision, no PI, no scales (the recipe's default quantizer is not applied yet)
        self.recipe = Recipe(quant=None, bands=bands_mod.BandConfig(n_bands=min(8, self.info.rotary_dim // 2)))
        self.qstate = None
        self._quant_key = None
        self._variant = "quant"
        self._base = "quant"  # which weights are resident: "fp" or "quant" (same tensors without a quantizer)
        self._corpora: dict[str, Corpus] = {}
        self.bands = recipe_mod.band_edges(self.recipe, self.geometry)
        self._rescaler: Rescaler | None = None
        self._version = 0  # of the scales written by the rescaler
        self.n_layers = len(models.attention_layers(self.model))
        self.lock = threading.RLock()  # one computation on the model at a time

    @classmethod
    def open(cls, name: str, device="auto", dtype="auto", allow_pickle=False, trust_remote_code=False,
             device_map=None, max_memory=None) -> "Workbench":
        """device_map / max_memory: accelerate's, to spread a model over the GPUs (and CPU) of one host."""
        return cls(models.load_model(name, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                     device_map=device_map, max_memory=max_memory))

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ what is applied (read-only views of the recipe)

    @property
    def pi(self) -> rope.PIConfig:
        return self.recipe.pi

    @property
    def quant_cfg(self):
        return self.recipe.quant if self.qstate is not None else None

    @property
    def band_cfg(self) -> bands_mod.BandConfig:
        return self.recipe.bands

    @property
    def scale_cfg(self) -> ScaleConfig:
        return self.recipe.scale

    @property
    def scales(self) -> torch.Tensor | None:
        """(B,) float64 shared by all layers, (L, B) per layer; None = no scales set."""
        s = self.recipe.scales
        return None if s is None else torch.tensor(s, dtype=torch.float64)

    @property
    def per_layer(self) -> bool:
        return self.recipe.per_layer

    def freqs(self, seq_len: int | None = None) -> rope.RopeFreqs:
        return self.geometry.freqs(self.pi, seq_len)

    # ------------------------------------------------------------------ the one place that changes the model

    def apply(self, recipe: Recipe, progress=None, cancel=None) -> Recipe:
        """Put `recipe` on the model, doing only what differs from what is applied (module docstring).

        Settings are checked (group size, band edges, calibration data) before anything changes.
        """
        with self.lock:
            now = self.recipe
            key = recipe.quant_key()
            bands = recipe_mod.band_edges(recipe, self.geometry)
            scales = None if recipe.scales is None else check_scales(recipe.scales, bands.n_bands, self.n_layers)
            calib = None
            if key != self._quant_key and recipe.quantized:
                from qroar import quant

                quant.check_group_size(self.model, recipe.quant)
                if recipe.calibrated:
                    from qroar.calib import calibration_batches

                    q = recipe.quant
                    tokens = self.corpus(recipe.calib).tokens
                    calib = list(calibration_batches(tokens, q.n_samples, q.seq_len or self.info.trained_context, q.seed))
            if recipe.pi != now.pi:
                self._set_pi(recipe.pi)  # before calibrated quantizers, which see the PI
            self.recipe = recipe.with_scales(None if scales is None else scales.tolist())
            if key != self._quant_key:
                self._set_quant(recipe, calib, progress, cancel)
            elif bands != self.bands:
                self.bands = bands
                self._rebuild_rescaler()
            elif (scales is None or now.scales is None or now.scale != recipe.scale
                  or check_scales(now.scales).shape[-1] != scales.shape[-1]):
                self._rebuild_rescaler()
            else:  # only moved bands (per layer): their rows alone are re-quantized
                moved = self._moved(now.scales, self.recipe.scales)
                if moved:
                    self._rescaler.refresh(moved, self.recipe.scales, self.recipe.scale)
                    self._version += 1
                    self._put_variant(self._variant)
            return self.recipe

    def _moved(self, old, new) -> list:
        """What moved between two scale settings: band indices (every layer), or (layer, band) pairs when
        only some layers of a band moved."""
        a, b = per_layer(old, self.n_layers), per_layer(new, self.n_layers)
        out = []
        for band in range(a.shape[1]):
            diff = (a[:, band] != b[:, band]).nonzero().flatten().tolist()
            if len(diff) == self.n_layers:
                out.append(band)
            else:
                out += [(layer, band) for layer in diff]
        return out

    def _set_pi(self, pi: rope.PIConfig) -> dict:
        cfg = rope.text_config(self.model.config)
        before, cfg.max_position_embeddings = cfg.max_position_embeddings, self.base_max_pos
        try:
            return rope.apply_pi(self.model, pi, self.base_rope)
        except BaseException:  # a rejected setting leaves the config as it was (dynamic NTK had changed it)
            cfg.max_position_embeddings = before
            raise

    def _set_quant(self, recipe: Recipe, calib, progress, cancel) -> None:
        from qroar import quant

        self._put_variant("quant")  # unscaled, so what restore() puts back is clean
        self._rescaler = None
        try:
            if self.qstate is not None:
                quant.restore(self.model, self.qstate)
                self.qstate, self._quant_key = None, None
            if recipe.quantized:
                q = recipe.quant
                if not q.seq_len:
                    q = replace(q, seq_len=self.info.trained_context)
                self.qstate = quant.quantize_model(self.model, q, calib=calib, progress=progress, cancel=cancel)
                self._quant_key = recipe.quant_key()
        except BaseException:
            self.recipe = replace(self.recipe, quant=quant.QuantConfig(method="none"))
            raise
        finally:
            self.bands = recipe_mod.band_edges(self.recipe, self.geometry)
            self._rebuild_rescaler()

    # ------------------------------------------------------------------ one-setting shorthands (each is one apply)

    def set_pi(self, pi: rope.PIConfig) -> dict:
        self.apply(self.recipe.with_pi(pi))
        return rope.rope_parameters(self.model.config)

    def set_quant(self, cfg, calib_corpus: str | None = None, progress=None, cancel=None):
        """Quantize with `cfg` (a qroar.quant.QuantConfig); method 'none' or None restores full precision."""
        r = replace(self.recipe, quant=cfg, calib=calib_corpus or self.recipe.calib)
        self.apply(r, progress=progress, cancel=cancel)
        return self.qstate

    def set_bands(self, cfg: bands_mod.BandConfig, edges=None) -> bands_mod.Bands:
        """New bands (explicit `edges` override the rule, e.g. from a scales file); scales are kept
        if the band count is unchanged, else reset to no scales."""
        if edges is not None:
            n = self.geometry.n_pairs
            e = [int(x) for x in edges]
            if len(e) < 2 or e[0] != 0 or e[-1] != n or any(a >= b for a, b in zip(e, e[1:])):
                raise ConfigError(f"Band edges must increase from 0 to this model's {n} RoPE pairs, got {list(edges)}.")
        trial = replace(self.recipe, bands=cfg, edges=None if edges is None else tuple(edges), scales=None, windows=None)
        n_new = recipe_mod.band_edges(trial, self.geometry).n_bands
        keep = self.recipe.scales if self.recipe.scales is not None and len(self.recipe.scales) == n_new else None
        self.apply(replace(trial, scales=keep))
        return self.bands

    def set_scales(self, scales, cfg: ScaleConfig | None = None) -> None:
        """One positive finite scale per band (shared by all layers), or one list of them per layer; None
        removes the scales."""
        if scales is None:
            self.apply(replace(self.recipe, scales=None))
            return
        s = check_scales(scales, self.bands.n_bands, self.n_layers)
        self.apply(replace(self.recipe.with_scales(s.tolist()), scale=cfg or self.recipe.scale))

    def set_band_scale(self, b: int, g: float, layer: int | None = None) -> None:
        """Move one band's scale (of one layer: the scales become per-layer): only those q/k rows are
        recomputed (re-quantized for order "before")."""
        if not isinstance(b, int) or not 0 <= b < self.bands.n_bands:
            raise ConfigError(f"Band {b!r} does not exist: choose 0 to {self.bands.n_bands - 1}.")
        if layer is not None and not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise ConfigError(f"Layer {layer!r} does not exist: choose 0 to {self.n_layers - 1}.")
        now = self.recipe.scales or (1.0,) * self.bands.n_bands
        if layer is None and not self.per_layer:
            s = list(now)
            s[b] = g
        else:
            s = per_layer(now, self.n_layers)
            s[slice(None) if layer is None else layer, b] = g
            s = s.tolist()
        self.set_scales(s)

    def invariance_note(self) -> str | None:
        """Why the applied scale settings cannot change the model beyond rounding (or None)."""
        r = self.recipe if self.qstate is not None else replace(self.recipe, quant=None)
        return recipe_mod.invariance_note(r, self.geometry)

    def _rebuild_rescaler(self) -> None:
        """Drop the rescaler (leaving unscaled weights behind) and build a fresh one if scales are set."""
        before = self._variant if self.recipe.scales is not None else _base(self._variant)
        if self._rescaler is not None:
            self._put_variant(_base(self._variant))
            self._rescaler = None
        if self.recipe.scales is None:
            self._variant = _base(self._variant)
            return
        self._put_variant("fp")
        r = Rescaler(self.model, self.bands)
        self._put_variant("quant")
        r.attach_quant(self.qstate)
        r.refresh(range(self.bands.n_bands), self.recipe.scales, self.recipe.scale)
        self._rescaler = r
        self._version += 1
        self._put_variant(before)

    # ------------------------------------------------------------------ variants

    def _put_variant(self, variant: str) -> None:
        """Put a variant's weights in place: swap full-precision and quantized tensors, then write the q/k rows."""
        if variant not in VARIANTS:
            raise ConfigError(f"Unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
        if variant in SCALED and self._rescaler is None:
            raise ConfigError(f"Variant {variant!r} needs scales: set them first (a recipe with scales or a scales file).")
        base = _base(variant)
        r, s, c = self._rescaler, self.recipe.scales, self.recipe.scale
        if base != self._base and self.qstate is not None:
            if r is not None:
                r.write(self._base, key=self._version)  # park unscaled tensors only
            mods = dict(self.model.named_modules())
            for name, w in self.qstate.originals.items():
                lin = mods[name]
                lin.weight.data, self.qstate.originals[name] = w.to(lin.weight.device), lin.weight.data
            if r is not None:
                r.forget_written()
        self._base = base
        if r is not None:
            r.write(variant, s, c, key=self._version)
        self._variant = variant

    @contextmanager
    def variant(self, name: str):
        """Temporarily run the model as 'fp', 'quant', 'fp_scaled' or 'quant_scaled'."""
        with self.lock:
            before = self._variant
            self._put_variant(name)
            try:
                yield self.model
            finally:
                self._put_variant(before)

    @contextmanager
    def pi_off(self):
        """Temporarily run without position interpolation (the model's own RoPE); weights are untouched,
        so a calibrated quantizer is not re-run. The PI of the recipe is put back on exit."""
        with self.lock:
            if self.recipe.pi == rope.PIConfig():
                yield self.model
                return
            self._set_pi(rope.PIConfig())
            try:
                yield self.model
            finally:
                self._set_pi(self.recipe.pi)

    def available_variants(self) -> tuple[str, ...]:
        out = ["fp"]
        if self.qstate is not None:
            out.append("quant")
        if self._rescaler is not None:
            out.append("fp_scaled")
            if self.qstate is not None:
                out.append("quant_scaled")
        return tuple(out)

    # ------------------------------------------------------------------ corpus and perplexity

    def corpus(self, spec: str) -> Corpus:
        if spec not in self._corpora:
            from qroar import data

            docs = data.load_corpus(spec)
            self._corpora[spec] = Corpus(spec, [d.id for d in docs], data.tokenize(docs, self.tokenizer))
        return self._corpora[spec]

    def _as_corpus(self, corpus) -> Corpus:
        if isinstance(corpus, Corpus):
            return corpus
        if isinstance(corpus, str):
            return self.corpus(corpus)
        return Corpus("tokens", [f"doc{i}" for i in range(len(corpus))], list(corpus))

    def evaluate(self, corpus, eval_cfg, variant: str, progress=None, cancel=None):
        """perplexity.EvalResult of one variant (corpus: spec string, Corpus, or list of token tensors)."""
        from qroar import perplexity

        c = self._as_corpus(corpus)
        with self.variant(variant):
            return perplexity.evaluate(self.model, c.tokens, eval_cfg, doc_ids=c.doc_ids, progress=progress,
                                       cancel=cancel, tokenizer=self.tokenizer)

    def perplexity(self, corpus, eval_cfg, variants=("fp", "quant"), progress=None, cancel=None) -> pd.DataFrame:
        """Tidy table: variant, doc, length, windows, tokens, nll, ppl (one row per document and length).

        Variants not available (no quantizer, no scales) are left out.
        """
        c = self._as_corpus(corpus)
        variants = [v for v in variants if v in self.available_variants()]
        frames = []
        for i, v in enumerate(variants):
            def prog(f, msg, i=i, v=v):
                if progress:
                    progress((i + f) / len(variants), f"{v}: {msg}")

            res = self.evaluate(c, eval_cfg, v, progress=prog, cancel=cancel)
            frames.append(res.table.assign(variant=v))
        return pd.concat(frames, ignore_index=True)

    def settings(self) -> dict:
        return {
            "model": self.info.name,
            "device": self.info.device,
            "dtype": self.info.dtype,
            "pi": self.pi.to_dict(),
            "quant": self.quant_cfg.to_dict() if self.quant_cfg is not None else None,
            "bands": {**self.band_cfg.to_dict(), **self.bands.to_dict()},
            "scale": self.scale_cfg.to_dict(),
            "scales": None if self.scales is None else self.scales.tolist(),
        }
