"""The Workbench: one loaded model and the settings applied to it, shared by the CLI and the app.

It keeps the model's own RoPE parameters (so PI settings never stack), the full-precision
weights of everything it quantizes (so "fp" and "quant" swap tensors, never reload), and, once
scales are set, a `rescale.Rescaler` with copies of the q/k band rows only.
Path of data: set_pi -> set_quant -> set_bands / set_scales -> perplexity / diagnostics -> export.

Variants (what the model computes while one is in force):
  fp         full precision
  quant      quantized (= fp when no quantizer is set)
  fp_scaled  full precision + per-band scales
  scaled     quantized + per-band scales (order "before": scaled rows re-quantized; "after": dequantized rows scaled)
Invariant: the tensors parked in `qstate.originals` are always unscaled; scales live in the resident weights only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch

from qroar import bands as bands_mod
from qroar import models, rope
from qroar.errors import ConfigError
from qroar.rescale import Rescaler, ScaleConfig, check_scales, invariance_note

VARIANTS = ("fp", "quant", "fp_scaled", "scaled")
SCALED = ("fp_scaled", "scaled")


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
        self.pi = rope.PIConfig()
        self.quant_cfg = None
        self.qstate = None
        self._variant = "quant"
        self._base = "quant"  # which weights are resident: "fp" or "quant" (same tensors without a quantizer)
        self._corpora: dict[str, Corpus] = {}
        self.band_cfg = bands_mod.BandConfig(n_bands=min(8, self.info.rotary_dim // 2))
        self.bands = bands_mod.bands_for(self.freqs(), self.band_cfg)
        self._fixed_edges = False  # edges given explicitly (a scales file) do not follow set_pi
        self.scale_cfg = ScaleConfig()
        self.scales: torch.Tensor | None = None  # (B,) float64, None = no scales set
        self._rescaler: Rescaler | None = None
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

    # ------------------------------------------------------------------ position interpolation

    def set_pi(self, pi: rope.PIConfig) -> dict:
        with self.lock:
            cfg = rope.text_config(self.model.config)
            before, cfg.max_position_embeddings = cfg.max_position_embeddings, self.base_max_pos
            try:
                params = rope.apply_pi(self.model, pi, self.base_rope)
            except BaseException:  # a rejected setting leaves the config as it was (dynamic NTK had changed it)
                cfg.max_position_embeddings = before
                raise
            self.pi = pi
            new = self.bands if self._fixed_edges else bands_mod.bands_for(self.freqs(), self.band_cfg)
            if new != self.bands:  # YaRN-aligned edges can follow the PI setting
                self.bands = new
                self._rebuild_rescaler()
            return params

    def freqs(self, seq_len: int | None = None) -> rope.RopeFreqs:
        return rope.frequencies(self.model.config, self.pi, seq_len=seq_len, base_params=self.base_rope)

    # ------------------------------------------------------------------ quantization

    def set_quant(self, cfg, calib_corpus: str | None = None, progress=None, cancel=None):
        """Quantize with `cfg` (a qroar.quant.QuantConfig); method 'none' or None restores full precision."""
        from qroar import quant

        with self.lock:
            calib = None  # settings and calibration data are checked before the current quantizer is undone
            if cfg is not None and cfg.method != "none":
                cfg.validate()
                quant.check_group_size(self.model, cfg)
                if cfg.method in quant.NEEDS_CALIBRATION:
                    from qroar.calib import calibration_batches

                    tokens = self.corpus(calib_corpus or "embedded:dev").tokens
                    calib = list(calibration_batches(tokens, cfg.n_samples, cfg.seq_len, cfg.seed))
            self._use("quant")  # unscaled, so what restore() puts back is clean
            self._rescaler = None
            try:
                if self.qstate is not None:
                    quant.restore(self.model, self.qstate)
                    self.qstate, self.quant_cfg = None, None
                if cfg is None or cfg.method == "none":
                    return None
                self.qstate = quant.quantize_model(self.model, cfg, calib=calib, progress=progress, cancel=cancel)
                self.quant_cfg = cfg
                return self.qstate
            finally:
                self._rebuild_rescaler()

    # ------------------------------------------------------------------ bands and scales

    def set_bands(self, cfg: bands_mod.BandConfig, edges=None) -> bands_mod.Bands:
        """New bands (explicit `edges` override the rule, e.g. from a scales file); scales are kept
        if the band count is unchanged, else reset to no scales."""
        with self.lock:
            new = bands_mod.bands_for(self.freqs(), cfg) if edges is None else self._check_edges(edges)
            self._fixed_edges = edges is not None
            self.band_cfg = cfg
            reset = self.scales is not None and self.scales.numel() != new.n_bands
            if reset:
                self.scales = None
            if new != self.bands or reset:
                self.bands = new
                self._rebuild_rescaler()
            return self.bands

    def _check_edges(self, edges) -> bands_mod.Bands:
        n = self.info.rotary_dim // 2
        e = [int(x) for x in edges]
        if len(e) < 2 or e[0] != 0 or e[-1] != n or any(a >= b for a, b in zip(e, e[1:])):
            raise ConfigError(f"Band edges must increase from 0 to this model's {n} RoPE pairs, got {list(edges)}.")
        return bands_mod.Bands(tuple(e))

    def set_scales(self, scales, cfg: ScaleConfig | None = None) -> None:
        """One positive finite scale per band (shared by all layers); None removes the scales."""
        with self.lock:
            if scales is None:
                self.scales = None
                self._rebuild_rescaler()
                return
            s = check_scales(scales, self.bands.n_bands)
            new_cfg = cfg or self.scale_cfg
            self.scales, self.scale_cfg = s, new_cfg
            if self._rescaler is None:
                self._rebuild_rescaler()
            else:
                self._rescaler.set_scales(s, new_cfg)
                self._use(self._variant)

    def set_band_scale(self, b: int, g: float) -> None:
        """Move one band's scale: only that band's q/k rows are recomputed (re-quantized for order "before")."""
        with self.lock:
            if self.scales is None:
                self.set_scales(torch.ones(self.bands.n_bands, dtype=torch.float64))
            self._rescaler.set_band_scale(b, g)
            self.scales = self._rescaler.scales.clone()
            self._use(self._variant)

    def invariance_note(self) -> str | None:
        """Why the current scale settings cannot change the model beyond rounding (or None)."""
        has_norm = self._rescaler.has_qk_norm if self._rescaler is not None else any(
            layer.q_norm is not None for layer in models.attention_layers(self.model))
        return invariance_note(self.quant_cfg, self.scale_cfg, has_norm)

    def _rebuild_rescaler(self) -> None:
        """Drop the rescaler (leaving unscaled weights behind) and build a fresh one if scales are set."""
        with self.lock:
            before = self._variant if self.scales is not None else _base(self._variant)
            if self._rescaler is not None:
                self._use(_base(self._variant))
                self._rescaler = None
            if self.scales is None:
                self._variant = _base(self._variant)
                return
            self._use("fp")
            r = Rescaler(self.model, self.bands)
            self._use("quant")
            r.attach_quant(self.qstate)
            r.set_scales(self.scales, self.scale_cfg)
            self._rescaler = r
            self._use(before)

    # ------------------------------------------------------------------ variants

    def _use(self, variant: str) -> None:
        """Put a variant's weights in place: swap full-precision and quantized tensors, then write the q/k rows."""
        if variant not in VARIANTS:
            raise ConfigError(f"Unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
        if variant in SCALED and self._rescaler is None:
            raise ConfigError(f"Variant {variant!r} needs scales: set them first (set_scales or a scales file).")
        base = _base(variant)
        if base != self._base and self.qstate is not None:
            if self._rescaler is not None:
                self._rescaler.write(self._base)  # park unscaled tensors only
            mods = dict(self.model.named_modules())
            for name, w in self.qstate.originals.items():
                lin = mods[name]
                lin.weight.data, self.qstate.originals[name] = w.to(lin.weight.device), lin.weight.data
            if self._rescaler is not None:
                self._rescaler.forget_written()
        self._base = base
        if self._rescaler is not None:
            self._rescaler.write(variant)
        self._variant = variant

    @contextmanager
    def variant(self, name: str):
        """Temporarily run the model as 'fp', 'quant', 'fp_scaled' or 'scaled'."""
        with self.lock:
            before = self._variant
            self._use(name)
            try:
                yield self.model
            finally:
                self._use(before)

    def available_variants(self) -> tuple[str, ...]:
        out = ["fp"]
        if self.qstate is not None:
            out.append("quant")
        if self._rescaler is not None:
            out.append("fp_scaled")
            if self.qstate is not None:
                out.append("scaled")
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
            "scales": None if self.scales is None else [float(g) for g in self.scales],
        }
