"""Per-band diagnostics of PI + quantization: pairs, Interpolation Pressure, Tail Inflation Ratios,
per-band weight quantization error and position-dependent logit noise.

Definitions (j = RoPE pair, 0 <= j < rotary_dim/2; band b = a contiguous range of pairs, bands.py):

1. Bands: B log-spaced bands over j (optionally YaRN-aligned). `pair_table` lists per pair
   omega_j (before PI), inv_freq_j (after PI), s_j = omega_j / inv_freq_j and the wavelengths
   2 pi / omega_j and 2 pi / inv_freq_j (tokens per full turn).
2. Interpolation Pressure IP_j(D) = omega_j * D / s_j^2; band IP = mean over the band's pairs
   (max also given). Analytic. For length-dependent PI (dynamic NTK, LongRoPE) s_j is taken at D.
3. TIR_W for layer l, projection P in {q, k}, band b:
   Q_{1-eps}(|W_{P,b} h|)_long / Q_{1-eps}(|W_{P,b} h|)_short, h the projection's input, the quantile
   over tokens and the band's rows of every head, pooled over documents (one window of L tokens
   each, L > trained context, under the PI setting); long = positions >= trained context, short =
   positions < trained context. Q_{1-eps} is the k-th largest value, k = floor(eps N) + 1 (numpy's
   method="inverted_cdf"), computed exactly by streaming top-k (capture.py). Sampling noise: each
   document's own TIR is measured too; the spread of log TIR over documents gives a standard error
   and a 95% t interval of the pooled TIR (`tir_intervals`; none from one document). TIR_A: the same ratio
   on the post-RoPE per-axis components of q and k (the model's own cos/sin, attention factor
   included). Both are measured for the full-precision and the quantized model.
4. Per-band quantization error: ||Q(W_b) - W_b||_F / ||W_b||_F over the band's rows of W_Q, W_K.
5. Position-dependent logit noise: per band b and relative distance bucket, the error between
   quantized and full-precision band logits (q_b . k_b) * scaling (scaling = the attention's own,
   1/sqrt(head_dim) for Llama), post-RoPE under the PI setting, over sampled (query, key) pairs
   (seeded, a bounded number per bucket), every query head with its own key head (GQA), per layer.
   rms_err = RMS of the error, rel_err = rms_err / RMS of the full-precision band logit.
   Two modes: "isolated" feeds the quantized weights the full-precision model's inputs h to that
   layer (only this layer's W_Q/W_K error); "accumulated" uses the quantized model's own h (every
   earlier quantized linear included). Both come from the same forwards, so both are reported.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from qroar import capture
from qroar.bands import BandConfig, Bands, bands_for, head_rows, proj_rows
from qroar.errors import Cancelled, ConfigError, DataError, OutOfMemory
from qroar.perplexity import input_device, reset_dynamic_rope
from qroar.rope import RopeFreqs

MODES = ("isolated", "accumulated")
SCHEMA = 1


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DiagConfig:
    """Diagnostics settings. None means: derived from the model (see `resolve`)."""

    bands: BandConfig | None = BandConfig()  # None: the workbench's current bands (those its scales use)
    ip_lengths: tuple[int, ...] | None = None  # None: 1, 2, 4, 8, 16 x trained context
    capture_length: int | None = None  # tokens per window for TIR and logit noise; None: 2 x trained context
    n_docs: int = 4  # windows (one per document) pooled
    eps: float = 1e-3  # tail quantile Q_{1-eps}
    axis: bool = True  # also TIR_A (post-RoPE per-axis)
    skip_first: int = 0  # leading positions left out of "short" (e.g. 1 to drop an attention-sink BOS)
    noise_layers: tuple[int, ...] | None = None  # None: up to 4 layers spread over the depth
    noise_pairs: int = 256  # sampled (query, key) pairs per distance bucket and document
    bucket_edges: tuple[int, ...] | None = None  # bucket i = [edges[i], edges[i+1]); None: 1, 2, 4, 8, ...
    seed: int = 0
    chunk_tokens: int = 4096  # tokens per reduction step inside a hook (bounds peak memory)

    def __post_init__(self):
        for name in ("ip_lengths", "noise_layers", "bucket_edges"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        self.validate()

    def validate(self) -> "DiagConfig":
        if self.bands is not None and not isinstance(self.bands, BandConfig):
            raise ConfigError("bands must be a BandConfig (or empty for the workbench's bands).")
        if self.bands is not None and not (isinstance(self.bands.n_bands, int) and 4 <= self.bands.n_bands <= 16):
            raise ConfigError(f"Use 4 to 16 bands, got {self.bands.n_bands!r}.")
        if self.ip_lengths is not None and (not self.ip_lengths or any(not _pos_int(n) for n in self.ip_lengths)):
            raise ConfigError(f"IP lengths must be positive integers (tokens), got {self.ip_lengths!r}.")
        if self.capture_length is not None and (not _pos_int(self.capture_length) or self.capture_length < 4):
            raise ConfigError(f"The capture length must be an integer number of tokens >= 4, got {self.capture_length!r}.")
        if not _pos_int(self.n_docs):
            raise ConfigError(f"n_docs must be a positive integer, got {self.n_docs!r}.")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 0.5):
            raise ConfigError(f"eps must be in (0, 0.5) (1e-3 is usual), got {self.eps!r}.")
        if not (isinstance(self.skip_first, int) and self.skip_first >= 0):
            raise ConfigError(f"skip_first must be an integer >= 0, got {self.skip_first!r}.")
        if self.noise_layers is not None and any(not isinstance(i, int) or i < 0 for i in self.noise_layers):
            raise ConfigError(f"noise_layers must be layer indices >= 0, got {self.noise_layers!r}.")
        if not _pos_int(self.noise_pairs):
            raise ConfigError(f"noise_pairs must be a positive integer, got {self.noise_pairs!r}.")
        e = self.bucket_edges
        if e is not None and (len(e) < 2 or any(not _pos_int(x) for x in e) or list(e) != sorted(set(e))):
            raise ConfigError(f"bucket_edges must be increasing positive integers (at least two), got {e!r}.")
        if not _pos_int(self.chunk_tokens):
            raise ConfigError(f"chunk_tokens must be a positive integer, got {self.chunk_tokens!r}.")
        return self

    def resolve(self, trained_context: int, n_layers: int) -> dict:
        """Concrete lengths and layers for a model; raises ConfigError when they do not fit it."""
        L = self.capture_length or 2 * trained_context
        if L <= trained_context:
            raise ConfigError(f"The capture length ({L}) must exceed the trained context ({trained_context}) so that "
                              f"some tokens are 'long': use at least {trained_context + 1}, e.g. {2 * trained_context}.")
        if self.skip_first >= trained_context:
            raise ConfigError(f"skip_first ({self.skip_first}) leaves no short tokens: use less than {trained_context}.")
        layers = self.noise_layers
        if layers is None:
            layers = tuple(sorted({round(i * (n_layers - 1) / 3) for i in range(4)}))
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ConfigError(f"Layer(s) {bad} do not exist: this model has layers 0..{n_layers - 1}.")
        ip = self.ip_lengths or tuple(trained_context * m for m in (1, 2, 4, 8, 16))
        return {"capture_length": L, "noise_layers": tuple(layers), "ip_lengths": tuple(sorted(set(ip))),
                "buckets": distance_buckets(L, self.bucket_edges)}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["bands"] = None if self.bands is None else self.bands.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DiagConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown diagnostics settings: {', '.join(sorted(unknown))}.")
        kw = dict(d)
        if "bands" in kw:
            kw["bands"] = BandConfig.from_dict(kw["bands"]) if isinstance(kw["bands"], dict) else kw["bands"]
        return cls(**kw)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ----------------------------------------------------------------------------- 1-2: bands and IP (analytic)


def pair_table(freqs: RopeFreqs, bands: Bands) -> pd.DataFrame:
    """One row per pair j: band, omega, inv_freq, s, wavelength (2 pi / omega), wavelength_after (2 pi / inv_freq)."""
    band = bands.band_of()
    return pd.DataFrame({
        "j": range(len(freqs.omega)), "band": band.numpy(),
        "omega": freqs.omega.double().numpy(), "inv_freq": freqs.inv_freq.double().numpy(),
        "s": freqs.s.double().numpy(), "wavelength": (2 * math.pi / freqs.omega.double()).numpy(),
        "wavelength_after": (2 * math.pi / freqs.inv_freq.double()).numpy(),
    })


def interpolation_pressure(freqs: RopeFreqs | Callable[[int], RopeFreqs], bands: Bands, lengths) -> pd.DataFrame:
    """IP_j(D) = omega_j D / s_j^2, per band: mean and max over its pairs. `freqs` may be a function of D
    (length-dependent PI types)."""
    rows = []
    for D in lengths:
        f = freqs(int(D)) if callable(freqs) else freqs
        ip = f.omega.double() * D / f.s.double() ** 2
        for b, r in enumerate(bands.ranges()):
            seg = ip[r.start : r.stop]
            rows.append(dict(band=b, length=int(D), ip_mean=float(seg.mean()), ip_max=float(seg.max())))
    return pd.DataFrame(rows)


def tir_intervals(tir: pd.DataFrame) -> pd.DataFrame:
    """The TIR table with tir_lo, tir_hi (95% t interval from the documents' spread, docs - 1 degrees of
    freedom) and within_noise (the interval holds 1: the cell's TIR could be 1 on other text). Rows
    measured on one document, or read from a file written before the spread was kept, get nan bounds
    and within_noise False (unknown, not within)."""
    from qroar.stats import half_width

    out = tir.copy()
    if "tir_se_log" not in out:
        out["tir_se_log"], out["docs"] = float("nan"), 1
    h = [half_width(se, int(n)) for se, n in zip(out["tir_se_log"], out["docs"])]
    log_tir = [math.log(t) if t > 0 else float("nan") for t in out["tir"]]
    out["tir_lo"] = [math.exp(lt - hw) for lt, hw in zip(log_tir, h)]
    out["tir_hi"] = [math.exp(lt + hw) for lt, hw in zip(log_tir, h)]
    out["within_noise"] = [bool(abs(lt) <= hw) for lt, hw in zip(log_tir, h)]  # nan compares False
    return out


def tir_difference(tir: pd.DataFrame) -> pd.DataFrame:
    """Quantized - full precision TIR per kind, layer, proj, band: diff, its 95% t interval diff_lo, diff_hi
    from the spread of the per-document differences (the same documents ran through both), and
    within_noise (the interval holds 0). Without per-document TIRs the bounds are nan."""
    from qroar.stats import half_width

    keys = ["kind", "layer", "proj", "band"]
    fp = tir[tir.variant == "fp"].set_index(keys)
    qz = tir[tir.variant == "quant"].set_index(keys).reindex(fp.index)
    rows = []
    for key, f, q, fd, qd in zip(fp.index, fp.tir, qz.tir, fp.get("tir_docs", [None] * len(fp)),
                                 qz.get("tir_docs", [None] * len(fp))):
        d = [b - a for a, b in zip(fd, qd)] if isinstance(fd, list) and isinstance(qd, list) and len(fd) == len(qd) else []
        n, hw = len(d), float("nan")
        if n >= 2:
            mean = sum(d) / n
            hw = half_width(math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n), n)
        diff = q - f
        rows.append(dict(zip(keys, key), diff=diff, diff_lo=diff - hw, diff_hi=diff + hw, docs=n,
                         within_noise=bool(abs(diff) <= hw)))
    return pd.DataFrame(rows, columns=keys + ["diff", "diff_lo", "diff_hi", "docs", "within_noise"])


# ----------------------------------------------------------------------------- 4: per-band weight error


def band_weight_error(w_fp: torch.Tensor, w_q: torch.Tensor, bands: Bands, head_dim: int, rotary_dim: int,
                      n_heads: int) -> list[float]:
    """||Q(W_b) - W_b||_F / ||W_b||_F per band (fp32), W one projection's (n_heads * head_dim, in) weight."""
    out = []
    for r in bands.ranges():
        rows = proj_rows(r, head_dim, rotary_dim, n_heads).to(w_fp.device)
        a, b = w_fp.index_select(0, rows).float(), w_q.index_select(0, rows.to(w_q.device)).float()
        den = torch.linalg.norm(a)
        out.append(float(torch.linalg.norm(b.to(a.device) - a) / den) if den > 0 else 0.0)
    return out


@dataclass
class _LayerWeights:
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None


def _qk(layer) -> _LayerWeights:
    """A copy of one layer's q/k weights (and biases) as they are now."""
    def bias(lin, off, n):
        return None if lin.bias is None else lin.bias[off : off + n * layer.head_dim].detach().clone()
    return _LayerWeights(layer.q_weight().detach().clone(), bias(layer.q_lin, layer.q_off, layer.n_heads),
                         layer.k_weight().detach().clone(), bias(layer.k_lin, layer.k_off, layer.n_kv_heads))


def _quant_error_and_weights(wb, layers, bands, keep: set[int], check) -> tuple[pd.DataFrame, dict, dict]:
    """Per-band error table for every layer; full-precision and quantized q/k copies of the `keep` layers."""
    rows, fp_w, q_w = [], {}, {}
    for i, L in enumerate(layers):
        check(i / len(layers), f"quantization error, layer {L.index}")
        with wb.variant("fp"):
            fp = _qk(L)
        with wb.variant("quant"):
            qw = _qk(L)
        for proj, a, b, nh in (("q", fp.wq, qw.wq, L.n_heads), ("k", fp.wk, qw.wk, L.n_kv_heads)):
            for band, e in enumerate(band_weight_error(a, b, bands, L.head_dim, L.rotary_dim, nh)):
                rows.append(dict(layer=L.index, proj=proj, band=band, rel_err=e))
        if L.index in keep:
            fp_w[L.index], q_w[L.index] = fp, qw
    return pd.DataFrame(rows), fp_w, q_w


# ----------------------------------------------------------------------------- 5: logit noise


def distance_buckets(length: int, edges: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """Inclusive (lo, hi) relative-distance buckets below `length`: 1, 2-3, 4-7, ... by default."""
    if edges is None:
        edges = tuple(2**i for i in range(int(math.log2(max(length - 1, 1))) + 1)) + (length,)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo, hi = lo, min(hi - 1, length - 1)
        if lo <= hi:
            out.append((lo, hi))
    if not out:
        raise ConfigError(f"No distance bucket fits a window of {length} tokens: give edges below {length}.")
    return out


@dataclass(frozen=True)
class PairSample:
    """Sampled (query i, key j = i - d) position pairs; `positions` = every position any pair uses."""

    buckets: list[tuple[int, int]]
    i: torch.Tensor
    j: torch.Tensor
    bucket: torch.Tensor
    positions: torch.Tensor


def sample_pairs(length: int, buckets: list[tuple[int, int]], n_per_bucket: int, seed: int = 0) -> PairSample:
    """n_per_bucket pairs per bucket: distance uniform in the bucket, query uniform in [d, length)."""
    g = torch.Generator().manual_seed(seed)
    I, J, B = [], [], []
    for b, (lo, hi) in enumerate(buckets):
        d = torch.randint(lo, hi + 1, (n_per_bucket,), generator=g)
        i = d + (torch.rand(n_per_bucket, generator=g, dtype=torch.float64) * (length - d)).long().clamp(max=length - 1 - d)
        I.append(i), J.append(i - d), B.append(torch.full((n_per_bucket,), b))
    i, j = torch.cat(I), torch.cat(J)
    return PairSample(buckets, i, j, torch.cat(B), torch.unique(torch.cat([i, j])))


def band_logits(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, kj: torch.Tensor, band_of_dim: torch.Tensor,
                n_bands: int, scaling: float) -> torch.Tensor:
    """(n_pairs, n_heads, n_bands): per-band partial dot products q[qi] . k[kj] * scaling; q (P, H, D),
    k (P, H_kv, D), each query head with its key head; dims of no band (partial rotary) left out."""
    H, Hkv = q.shape[1], k.shape[1]
    kv = torch.arange(H, device=q.device) // (H // Hkv)
    prod = q[qi] * k[kj][:, kv]  # (n, H, D)
    dims = torch.nonzero(band_of_dim >= 0).squeeze(1)
    out = torch.zeros(prod.shape[0], H, n_bands, device=q.device, dtype=prod.dtype)
    return out.index_add_(2, band_of_dim[dims], prod[..., dims]) * scaling


def _band_of_dim(bands: Bands, head_dim: int, rotary_dim: int) -> torch.Tensor:
    out = torch.full((head_dim,), -1, dtype=torch.long)
    for b, r in enumerate(bands.ranges()):
        out[head_rows(r, rotary_dim)] = b
    return out


def logit_noise(layers, bands: Bands, pairs: PairSample, fp_samples: dict, q_samples: dict,
                fp_w: dict, q_w: dict) -> pd.DataFrame:
    """Tidy: mode, layer, band, bucket_lo, bucket_hi, rms_err, rms_fp, rel_err, n_pairs (pairs x documents).

    fp_samples / q_samples: layer -> capture.Samples from the full-precision / quantized forwards;
    fp_w / q_w: layer -> weights of that variant.
    """
    pos = pairs.positions
    qi, kj = torch.searchsorted(pos, pairs.i), torch.searchsorted(pos, pairs.j)
    nb, nB = len(pairs.buckets), bands.n_bands
    rows = []
    for L in layers:
        if L.index not in fp_samples:
            continue
        scaling = float(getattr(L.attn, "scaling", L.head_dim**-0.5))
        bod = _band_of_dim(bands, L.head_dim, L.rotary_dim)
        sq = {m: torch.zeros(nb, nB, dtype=torch.float64) for m in MODES}
        sq_fp = torch.zeros(nb, nB, dtype=torch.float64)
        S, Sq = fp_samples[L.index], q_samples[L.index]
        for d in range(len(S.h)):
            dev = S.h[d].device
            bkt = pairs.bucket.to(dev)

            def logits(h, w: _LayerWeights):
                q = capture.project(h, w.wq, w.bq, L.n_heads, L.head_dim, L.q_norm, S.cos[d], S.sin[d])
                k = capture.project(h, w.wk, w.bk, L.n_kv_heads, L.head_dim, L.k_norm, S.cos[d], S.sin[d])
                return band_logits(q, k, qi.to(dev), kj.to(dev), bod.to(dev), nB, scaling)  # (n, H, B)

            ref = logits(S.h[d], fp_w[L.index])
            sq_fp += _bucket_sum(ref.square(), bkt, nb)
            for mode, h in (("isolated", S.h[d]), ("accumulated", Sq.h[d])):
                sq[mode] += _bucket_sum((logits(h, q_w[L.index]) - ref).square(), bkt, nb)
        n = torch.bincount(pairs.bucket, minlength=nb) * len(S.h)  # pairs x documents per bucket
        count = (n * L.n_heads).double()[:, None]
        rms_fp = (sq_fp / count).sqrt()
        for mode in MODES:
            rms = (sq[mode] / count).sqrt()
            for b, (lo, hi) in enumerate(pairs.buckets):
                for band in range(nB):
                    rf = float(rms_fp[b, band])
                    rows.append(dict(mode=mode, layer=L.index, band=band, bucket_lo=lo, bucket_hi=hi,
                                     rms_err=float(rms[b, band]), rms_fp=rf,
                                     rel_err=float(rms[b, band]) / rf if rf > 0 else float("nan"), n_pairs=int(n[b])))
    return pd.DataFrame(rows)


def _bucket_sum(x: torch.Tensor, bucket: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(n, H, B) -> (n_buckets, B): sums over the pairs of each bucket and over heads, fp64 on the CPU."""
    out = torch.zeros(n_buckets, x.shape[-1], dtype=torch.float64, device=x.device)
    return out.index_add_(0, bucket, x.double().sum(1)).cpu()


def pool_layers(noise: pd.DataFrame) -> pd.DataFrame:
    """Logit noise over all chosen layers: RMS pooled (every layer has the same pairs and heads count)."""
    keys = ["mode", "band", "bucket_lo", "bucket_hi"]
    g = noise.assign(e2=noise.rms_err**2, f2=noise.rms_fp**2).groupby(keys, as_index=False)
    out = g.agg(e2=("e2", "mean"), f2=("f2", "mean"), n_pairs=("n_pairs", "sum"), layers=("layer", "nunique"))
    out["rms_err"], out["rms_fp"] = out.e2**0.5, out.f2**0.5
    out["rel_err"] = out.rms_err / out.rms_fp.where(out.rms_fp > 0)
    return out[keys + ["rms_err", "rms_fp", "rel_err", "n_pairs", "layers"]]


# ----------------------------------------------------------------------------- the run


@dataclass
class DiagResult:
    """tables: pairs, ip, tir (variant fp/quant, kind W/A), quant_error, logit_noise, logit_noise_pooled."""

    tables: dict[str, pd.DataFrame]
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        tables = {k: json.loads(v.to_json(orient="records")) for k, v in self.tables.items()}
        return json.dumps({"schema": SCHEMA, "settings": self.settings, "tables": tables}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DiagResult":
        d = json.loads(text)
        if d.get("schema") != SCHEMA:
            raise DataError(f"Diagnostics file has schema {d.get('schema')!r}; this version reads {SCHEMA}.")
        return cls({k: pd.DataFrame(v) for k, v in d["tables"].items()}, d.get("settings", {}))

    def write(self, folder) -> list[Path]:
        """diagnostics.json plus one CSV per table; returns the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "diagnostics.json"]
        paths[0].write_text(self.to_json())
        for name, df in self.tables.items():
            paths.append(folder / f"{name}.csv")
            df.to_csv(paths[-1], index=False)
        return paths

    save = write

    @classmethod
    def read(cls, folder) -> "DiagResult":
        return cls.from_json((Path(folder) / "diagnostics.json").read_text())


def _windows(wb, spec, length: int, n_docs: int) -> tuple[list[str], list[torch.Tensor]]:
    """One window of `length` tokens from each of the first n_docs long-enough documents (BOS as perplexity does).
    `spec` is a corpus spec or a list of 1-D token tensors."""
    from qroar.perplexity import bos_id, needs_bos
    from qroar.workbench import Corpus

    corpus = wb.corpus(spec) if isinstance(spec, str) else Corpus("tokens", [f"doc{i}" for i in range(len(spec))], list(spec))
    bos = bos_id(wb.tokenizer, wb.model) if needs_bos(wb.tokenizer, wb.model) else None
    span = length - 1 if bos is not None else length
    ids, wins = [], []
    for name, toks in zip(corpus.doc_ids, corpus.tokens):
        if toks.numel() >= span and len(wins) < n_docs:
            w = toks[:span]
            wins.append(torch.cat([torch.tensor([bos]), w]) if bos is not None else w)
            ids.append(name)
    if not wins:
        longest = max((t.numel() for t in corpus.tokens), default=0)
        raise DataError(f"No document of {corpus.spec!r} has {span} tokens for a {length}-token window (longest: {longest}); "
                        "use a shorter capture length or a corpus with longer documents.")
    return ids, wins


def _decoder(model):
    try:
        return model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return model.model


def run_diagnostics(wb, corpus_spec, cfg: DiagConfig = DiagConfig(), progress=None,
                    cancel: threading.Event | None = None) -> DiagResult:
    """Every diagnostic for the workbench's model under its PI and quantizer settings (see the module docstring).

    corpus_spec: a corpus spec (qroar.data) or a list of 1-D token tensors; one window per document.
    """
    from qroar.models import attention_layers

    t0 = time.time()
    report = progress or (lambda f, m: None)

    def check(frac: float, msg: str) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Diagnostics cancelled; the model is unchanged.")
        report(frac, msg)

    cfg.validate()
    with wb.lock:
        layers = attention_layers(wb.model)
        trained = int(wb.freqs().trained_context)
        r = cfg.resolve(trained, len(layers))
        L = r["capture_length"]
        freqs = wb.freqs(seq_len=L)
        bands = wb.bands if cfg.bands is None else bands_for(freqs, cfg.bands)
        tables = {"pairs": pair_table(freqs, bands),
                  "ip": interpolation_pressure(lambda D: wb.freqs(seq_len=D), bands, r["ip_lengths"])}
        doc_ids, wins = _windows(wb, corpus_spec, L, cfg.n_docs)
        quantized = "quant" in wb.available_variants()
        keep = set(r["noise_layers"])
        try:
            qe, fp_w, q_w = _quant_error_and_weights(wb, layers, bands, keep, lambda f, m: check(0.02 + 0.08 * f, m))
            tables["quant_error"] = qe
            pairs = sample_pairs(L, r["buckets"], cfg.noise_pairs, cfg.seed)
            tir, samples = {}, {}
            variants = ("fp", "quant") if quantized else ("fp",)
            for vi, variant in enumerate(variants):
                cap = capture.TailCapture(layers, bands, trained, L, len(wins), cfg.eps, cfg.axis, cfg.skip_first,
                                          cfg.chunk_tokens, tuple(sorted(keep)), pairs.positions)
                with torch.no_grad(), wb.variant(variant) as model, cap.attached(model):
                    reset_dynamic_rope(model)  # dynamic NTK: the frequencies of exactly L, whatever ran before
                    dev = input_device(model)  # the embedding's device when layers sit on several
                    for d, ids in enumerate(wins):
                        lo, hi = (0.1, 0.55) if vi == 0 else (0.55, 0.95)
                        check(lo + (hi - lo) * d / len(wins), f"{variant}: window {d + 1}/{len(wins)} ({L} tokens)")
                        _decoder(model)(input_ids=ids[None].to(dev), use_cache=False)
                tir[variant], samples[variant] = cap.table(), cap.samples
            if not quantized:  # no quantizer: the quantized model is the full-precision one
                tir["quant"], samples["quant"] = tir["fp"], samples["fp"]
            check(0.95, "logit noise")
            noise = logit_noise(layers, bands, pairs, samples["fp"], samples["quant"], fp_w, q_w)
        except torch.OutOfMemoryError:
            oom = True  # handled below, once this traceback (and the tensors its frames hold) is released
        else:
            oom = False
    if oom:
        qe = fp_w = q_w = cap = tir = samples = None  # this frame stays in the OutOfMemory traceback: hold no tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shorter = f"a capture length of about {L // 2} tokens, " if L // 2 > trained else ""
        raise OutOfMemory(f"Diagnostics at {L} tokens ran out of memory; memory was freed and the model is unchanged. "
                          f"Try {shorter}fewer documents (now {len(wins)}), a smaller chunk_tokens (now {cfg.chunk_tokens}) "
                          "or fewer noise layers.")
    tables["tir"] = pd.concat([t.assign(variant=v) for v, t in tir.items()], ignore_index=True)
    tables["logit_noise"] = noise
    tables["logit_noise_pooled"] = pool_layers(noise)
    settings = {
        **wb.settings(), "corpus": corpus_spec if isinstance(corpus_spec, str) else "tokens", "diag": cfg.to_dict(), "trained_context": trained,
        "capture_length": L, "noise_layers": list(r["noise_layers"]), "ip_lengths": list(r["ip_lengths"]),
        "bands": bands.to_dict(), "docs": doc_ids, "quantized": quantized, "seconds": round(time.time() - t0, 3),
    }
    report(1.0, "done")
    return DiagResult(tables, settings)


# ----------------------------------------------------------------------------- benchmark


def benchmark(shape: str = "llama2-7b", length: int = 32768, n_docs: int = 1, device: str = "cuda") -> dict:
    """Time and peak memory of run_diagnostics on an architecture-true random model (RTN w4 g128, YaRN x8)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from qroar import models, quant
    from qroar.rope import PIConfig
    from qroar.rope import head_dims as rope_head_dims
    from qroar.workbench import Workbench

    kw = dict(models.RANDOM_SHAPES[shape])
    theta = kw.pop("rope_theta")
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    head_dim, rot = rope_head_dims(config)
    info = SimpleNamespace(name=f"random:{shape}", device=device, dtype="bfloat16", head_dim=head_dim, rotary_dim=rot)
    wb = Workbench(models.Loaded(model, None, info))
    wb.set_pi(PIConfig("yarn", 8.0))
    wb.set_quant(quant.QuantConfig(method="rtn", bits=4, group_size=128))
    docs = [torch.randint(0, config.vocab_size, (length,)) for _ in range(n_docs)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    t0 = time.time()
    res = run_diagnostics(wb, docs, DiagConfig(capture_length=length, n_docs=n_docs))
    out = {"shape": shape, "length": length, "n_docs": n_docs, "seconds": round(time.time() - t0, 2),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
           "weights_gib": round(base / 2**30, 2),
           "peak_over_weights_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if device.startswith("cuda") else None,
           "rows": {k: len(v) for k, v in res.tables.items()}}
    return out


if __name__ == "__main__":
    import argparse
    import os

    p = argparse.ArgumentParser(description="Benchmark run_diagnostics on a random-weight model.")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    results = [benchmark(a.shape, int(n), a.docs, a.device) for n in a.lengths.split(",")]
    print(f"{'length':>8} {'docs':>5} {'seconds':>8} {'peak GiB over weights':>22}")
    for r in results:
        print(f"{r['length']:>8} {r['n_docs']:>5} {r['seconds']:>8} {r['peak_over_weights_gib']!s:>22}")
    Path(a.out, "diagnostics_bench.json").write_text(json.dumps(results, indent=1))
