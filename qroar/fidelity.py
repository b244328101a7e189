"""Fidelity to the full-precision model, position by position: KL divergence, same top token, change of
the true token's probability.

What is compared. For every scored position of a window (the model has seen tokens 1..c and predicts
token c+1; c is the *position*, 1-based), P_FP is the next-token distribution of the full-precision
model and P_v that of a variant (quant, quant_scaled, fp_scaled), both under the same position
interpolation (PI). Per position:

  kld      KL(P_FP || P_v) = sum_x P_FP(x) (log P_FP(x) - log P_v(x)), over the full vocabulary
  same_top argmax P_FP == argmax P_v (first index on ties, as llama.cpp)
  dp       P_v(true token) - P_FP(true token)
  nll      -log P(true token) of each model (their difference is ln(PPL_v / PPL_FP) per token)

Optional second reference ("fp_nopi"): the FP model *without* PI, only at positions inside its trained
context (c <= trained context), against every variant under PI, FP included: what the PI itself moves.

Exact and chunked. Each model's decoder body runs once per window and keeps only its final hidden states
([L, hidden]); the output head (never quantized: qroar quantizes the decoder's linear layers) then runs on
`chunk` positions at a time, log-softmax in float64 on CPU and float32 on GPU, so logits exist for one
chunk of two models at a time, never [L, vocab]. The FP reference's log-probabilities of a chunk are
computed once and compared with every variant.

Aggregates (`summarize_positions`), as llama.cpp's `perplexity --kl-divergence` reports them: mean KLD
with its uncertainty, median and the 90/95/99/99.9th percentiles and maximum (percentiles with linear
interpolation at fraction * (n - 1), numpy's default and llama.cpp's), mean dp with its uncertainty, RMS
dp with its uncertainty (0.5 / rms * the uncertainty of mean dp^2), same-top-token fraction with
sqrt(p (1 - p) / (n - 1)), and mean ln(PPL_v / PPL_FP). Uncertainties treat positions as independent
samples (llama.cpp's choice, optimistic for correlated neighbours): sqrt((mean x^2 - mean x ^2) / (n - 1)),
nan below 11 positions (llama.cpp prints 0 there). Two differences from llama.cpp: every position of a
window is scored (llama.cpp scores only the second half of each chunk: positions are the point here), and
KL sums the whole vocabulary (llama.cpp stores the base as 16-bit log-probs and skips terms below e^-16).

Positions are grouped in log-spaced buckets (lo, hi] (powers of two, `per_octave` per doubling), with the
trained context always an edge, so every bucket is inside it or beyond it (`in_trained`). Per length L,
"overall" aggregates the predictions a window of L tokens makes (positions 1..L-1): windows are cut at
the longest length and causal attention makes shorter lengths their prefixes (as perplexity's nested
windows).

The search's `--objective kld` uses `kld_evaluate`: the same per-position KL, summed per document and
length like perplexity's nll, against an `FPReference` that keeps the FP final hidden states of each
window ([L, hidden], far smaller than log-probs over the vocabulary), computed once per search.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qroar.errors import Cancelled, ConfigError, DataError
from qroar.perplexity import _decoder, bos_id, input_device, make_windows, needs_bos, reset_dynamic_rope
from qroar.rope import PIConfig, text_config

VARIANTS = ("quant", "quant_scaled", "fp_scaled")  # compared with "fp" (the reference)
REFERENCES = ("fp", "fp_nopi")
PRECISIONS = ("auto", "float32", "float64")
CHUNK_BYTES = 1 << 28  # one chunk's fp32 log-probs: ~256 MiB, so both models' stay near +1 GiB with temporaries
PERCENTILES = (90.0, 95.0, 99.0, 99.9)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FidelityConfig:
    """lengths: overall results per length (windows are cut at the longest); max_windows_per_doc and
    max_docs bound the work (None: no bound); chunk: positions per head chunk (None: automatic);
    precision of the log-softmax (float32, float64, or auto: float64 on CPU); nopi: also compare against FP without PI inside the trained context;
    per_octave: position buckets per doubling; add_bos None: decided per model (perplexity.needs_bos)."""

    lengths: tuple[int, ...] = (2048,)
    max_windows_per_doc: int | None = 1
    max_docs: int | None = None
    chunk: int | None = None
    precision: str = "float32"
    nopi: bool = False
    per_octave: int = 1
    add_bos: bool | None = None

    def __post_init__(self):
        lengths = self.lengths
        if isinstance(lengths, int) or not isinstance(lengths, (tuple, list)) or not lengths:
            raise ConfigError(f"lengths must be a non-empty list of context lengths in tokens, got {lengths!r}.")
        if any(not _is_int(n) or n < 2 for n in lengths):
            raise ConfigError(f"Every length must be an integer >= 2 tokens, got {list(lengths)}.")
        object.__setattr__(self, "lengths", tuple(sorted(set(int(n) for n in lengths))))
        for name in ("max_windows_per_doc", "max_docs", "chunk"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or empty (no limit / automatic), got {v!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if not _is_int(self.per_octave) or not 1 <= self.per_octave <= 8:
            raise ConfigError(f"per_octave (position buckets per doubling) must be 1 to 8, got {self.per_octave!r}.")
        if not isinstance(self.nopi, bool) or (self.add_bos is not None and not isinstance(self.add_bos, bool)):
            raise ConfigError("nopi is true or false; add_bos is true, false or empty (automatic).")

    @property
    def length(self) -> int:
        return max(self.lengths)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["lengths"] = list(self.lengths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FidelityConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown fidelity settings: {', '.join(sorted(unknown))}.")
        return cls(**{k: tuple(v) if k == "lengths" else v for k, v in d.items()})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- per-position primitives


def token_stats(logp_ref: torch.Tensor, logp_var: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of two log-probability rows (n, V) over the same vocabulary and the true
    next tokens (n,): kld = KL(ref || var), same_top, nll_ref, nll_var (all (n,), in the inputs' dtype)."""
    if logp_ref.shape != logp_var.shape or logp_ref.dim() != 2 or target.shape != logp_ref.shape[:1]:
        raise ConfigError(f"token_stats needs two (n, vocab) log-prob tensors and n targets; got "
                          f"{tuple(logp_ref.shape)}, {tuple(logp_var.shape)}, {tuple(target.shape)}.")
    y = target.to(logp_ref.device)[:, None]
    return {"kld": _kl_rows(logp_ref, logp_ref.exp(), logp_var.clone()),
            "same_top": logp_ref.argmax(-1) == logp_var.argmax(-1),
            "nll_ref": -logp_ref.gather(1, y)[:, 0], "nll_var": -logp_var.gather(1, y)[:, 0]}


def _kl_rows(lr: torch.Tensor, pr: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """sum_x pr (lr - lv) per row, overwriting lv (one temporary less); 0 log 0 terms count as 0."""
    d = torch.sub(lr, lv, out=lv).mul_(pr).sum(-1)
    if not bool(torch.isfinite(d).all()):  # -inf log-probs (masked vocabulary entries): drop their 0 * inf terms
        d = torch.where(pr > 0, pr * (lr - lv), torch.zeros((), dtype=lr.dtype, device=lr.device)).sum(-1)
    return d


def _log_softmax(head, cap, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    logits = head(h)
    if cap is not None:
        logits = torch.tanh(logits.to(dtype) / cap) * cap
    return F.log_softmax(logits, dim=-1, dtype=dtype)  # upcast inside the kernel: no full-precision copy of the logits


def auto_chunk(vocab_size: int, device_type: str) -> int:
    """Positions per head chunk: 1024 on CPU; on a GPU ~256 MiB of fp32 log-probs per model (256 to 8192)."""
    if device_type != "cuda":
        return 1024
    return max(256, min(8192, CHUNK_BYTES // (4 * vocab_size) // 256 * 256))


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float64 if torch.device(device).type == "cpu" else torch.float32
    return getattr(torch, precision)


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, L, H) of the decoder body (no output head)."""
    reset_dynamic_rope(model)
    return _decoder(model)(input_ids=ids.to(input_device(model)), use_cache=False).last_hidden_state


@torch.no_grad()
def compare_hidden(model, h_ref: torch.Tensor, h_vars: dict[str, torch.Tensor], target: torch.Tensor,
                   chunk: int, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """token_stats of each variant against the reference, from final hidden states (n, H) and targets (n,),
    through the model's output head `chunk` positions at a time. Returns {variant: {stat: (n,) on CPU}}
    (kld, nll_ref, nll_var as float64, same_top as bool)."""
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    dev = head.weight.device
    n = target.numel()
    out = {v: {"kld": torch.empty(n, dtype=torch.float64), "same_top": torch.empty(n, dtype=torch.bool),
               "nll_ref": torch.empty(n, dtype=torch.float64), "nll_var": torch.empty(n, dtype=torch.float64)}
           for v in h_vars}
    for a in range(0, n, chunk):
        y = target[a:a + chunk].to(dev)[:, None]
        lr = _log_softmax(head, cap, h_ref[a:a + chunk].to(dev), dtype)
        top_r, nll_r = lr.argmax(-1), -lr.gather(1, y)[:, 0]
        pr = lr.exp()
        for v, h in h_vars.items():
            lv = _log_softmax(head, cap, h[a:a + chunk].to(dev), dtype)
            o = out[v]
            o["same_top"][a:a + chunk] = (lv.argmax(-1) == top_r).cpu()
            o["nll_var"][a:a + chunk] = (-lv.gather(1, y)[:, 0]).cpu()
            o["nll_ref"][a:a + chunk] = nll_r.cpu()
            o["kld"][a:a + chunk] = _kl_rows(lr, pr, lv).cpu()
            del lv
        del lr, pr
    return out


# ----------------------------------------------------------------------------- aggregates (llama.cpp's)


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and sqrt((mean x^2 - mean^2) / (n - 1)); nan below 11 values."""
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    var = float((x * x).mean()) - m * m
    return m, math.sqrt(var / (n - 1)) if n > 10 and var > 0 else (0.0 if n > 10 else float("nan"))


def summarize_positions(kld, same_top, nll_ref, nll_var) -> dict:
    """The llama.cpp KL-divergence statistics of a set of positions (see the module docstring)."""
    kld, same = np.asarray(kld, dtype=np.float64), np.asarray(same_top, dtype=bool)
    nr, nv = np.asarray(nll_ref, dtype=np.float64), np.asarray(nll_var, dtype=np.float64)
    n = int(kld.size)
    out = {"positions": n}
    if n == 0:
        return out
    out["mean_kld"], out["mean_kld_unc"] = _mean_unc(kld)
    q = np.percentile(kld, [50.0, *PERCENTILES])
    out["median_kld"] = float(q[0])
    for p, v in zip(PERCENTILES, q[1:]):
        out[f"p{p:g}_kld".replace(".", "_")] = float(v)
    out["max_kld"] = float(kld.max())
    dp = np.exp(-nv) - np.exp(-nr)
    out["mean_dp"], out["mean_dp_unc"] = _mean_unc(dp)
    mse, mse_unc = _mean_unc(dp * dp)
    out["rms_dp"] = math.sqrt(mse)
    out["rms_dp_unc"] = 0.5 / out["rms_dp"] * mse_unc if out["rms_dp"] > 0 else (0.0 if n > 10 else float("nan"))
    p = float(same.mean())
    out["same_top"] = p
    out["same_top_unc"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    out["delta_log_ppl"], out["delta_log_ppl_unc"] = _mean_unc(nv - nr)
    out["ppl_ref"], out["ppl_var"] = math.exp(float(nr.mean())), math.exp(float(nv.mean()))
    return out


STAT_COLUMNS = ["positions", "mean_kld", "mean_kld_unc", "median_kld", "p90_kld", "p95_kld", "p99_kld", "p99_9_kld",
                "max_kld", "mean_dp", "mean_dp_unc", "rms_dp", "rms_dp_unc", "same_top", "same_top_unc",
                "delta_log_ppl", "delta_log_ppl_unc", "ppl_ref", "ppl_var"]


def bucket_edges(max_pos: int, trained_context: int | None, per_octave: int = 1) -> list[int]:
    """Edges e_0 = 0 < e_1 < ... = max_pos of buckets (e_i, e_i+1] of positions: 1, 2, 4, ... (per_octave
    per doubling), the trained context always one of them."""
    edges, k = {0, max_pos}, 0
    while True:
        e = int(round(2 ** (k / per_octave)))
        if e >= max_pos:
            break
        edges.add(e)
        k += 1
    if trained_context and 0 < trained_context < max_pos:
        edges.add(int(trained_context))
    return sorted(edges)


# ----------------------------------------------------------------------------- result


@dataclass
class FidelityResult:
    """buckets: one row per (reference, variant, position bucket): pos_lo < position <= pos_hi, in_trained,
    then STAT_COLUMNS. overall: one row per (reference, variant, length): positions 1..upto.
    windows: the windows scored (doc, start token, length); skipped: documents too short."""

    buckets: pd.DataFrame
    overall: pd.DataFrame
    windows: pd.DataFrame
    skipped: pd.DataFrame
    settings: dict

    def to_dict(self) -> dict:
        rec = lambda df: df.to_dict(orient="records")  # noqa: E731
        return {"settings": self.settings, "overall": rec(self.overall), "buckets": rec(self.buckets),
                "windows": rec(self.windows), "skipped": rec(self.skipped)}


def format_result(r: FidelityResult) -> str:
    """Overall (per length) and per-bucket KL and same-top tables, for the CLI."""
    o = r.overall
    lines = ["fidelity to full precision (mean KLD ± unc, median, p99, same top %):"]
    for _, row in o.iterrows():
        lines.append(f"  {row['variant']:>13} vs {row['reference']:<7} L={int(row['length']):>6}: "
                     f"KLD {row['mean_kld']:.5f} ± {row['mean_kld_unc']:.5f}  median {row['median_kld']:.5f}  "
                     f"p99 {row['p99_kld']:.4f}  max {row['max_kld']:.3f}  same top {100 * row['same_top']:.2f} ± "
                     f"{100 * row['same_top_unc']:.2f}%  RMS dp {100 * row['rms_dp']:.2f}%  "
                     f"ln(PPL/PPL_ref) {row['delta_log_ppl']:+.4f}")
    b = r.buckets[r.buckets["reference"] == "fp"]
    if len(b):
        b = b.assign(bucket=[f"{lo + 1}-{hi}{'' if t else '*'}" for lo, hi, t in zip(b.pos_lo, b.pos_hi, b.in_trained)])
        order = list(dict.fromkeys(b["bucket"]))
        for name, col, scale in (("mean KLD", "mean_kld", 1.0), ("same top %", "same_top", 100.0)):
            piv = (b.pivot(index="bucket", columns="variant", values=col) * scale).reindex(order)
            lines.append(f"{name} by position (* = beyond the trained context):")
            lines.append(piv.to_string(float_format=lambda x: f"{x:.4f}" if scale == 1.0 else f"{x:.2f}"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def _windows(token_docs, doc_ids, L: int, bos, max_windows, max_docs):
    """(doc id, start, ids (L,)) of every window of length L, and the documents too short for one."""
    out, skipped = [], []
    for d, toks in zip(doc_ids, token_docs):
        if max_docs is not None and len({w[0] for w in out}) >= max_docs:
            break
        ids, _ = make_windows(toks.long().cpu(), L, bos, None, max_windows)
        if len(ids) == 0:
            skipped.append({"doc": d, "length": L, "tokens": int(toks.numel())})
        span = L - 1 if bos is not None else L
        out += [(d, i * span, w) for i, w in enumerate(ids)]
    return out, skipped


def run(wb, corpus, cfg: FidelityConfig, variants=VARIANTS, progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None) -> FidelityResult:
    """KL, same top token and dp of each variant against FP under the workbench's PI (and, with cfg.nopi,
    against FP without PI inside the trained context), per position bucket and per length.

    variants: any of quant, quant_scaled, fp_scaled (fp too, with cfg.nopi); each must be available on the
    workbench (a quantizer for quant, scales for the scaled ones). The model is left as it was."""
    t0 = time.time()
    variants = list(dict.fromkeys(variants))
    avail = wb.available_variants()
    bad = [v for v in variants if v not in (*VARIANTS, "fp")]
    if bad:
        raise ConfigError(f"Unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)} (and fp with the "
                          "no-PI reference).")
    missing = [v for v in variants if v not in avail]
    if missing:
        need = {"quant": "a quantizer", "quant_scaled": "a quantizer and scales", "fp_scaled": "scales"}
        raise ConfigError("Nothing to compare for " + ", ".join(f"{v} (needs {need.get(v, v)})" for v in missing)
                          + f": this workbench has {', '.join(avail)}. Set them in the recipe or drop those variants.")
    if "fp" in variants and not cfg.nopi:
        raise ConfigError("fp against itself is 0 by definition: ask for the no-PI reference (nopi) to compare fp.")
    if cfg.nopi and wb.pi == PIConfig():
        raise ConfigError("No FP reference without PI to compare with: no position interpolation is applied, so FP "
                          "without PI is the FP reference itself. Set a PI or turn the no-PI reference off.")
    if not variants:
        raise ConfigError("No variant to compare with full precision: set a quantizer and/or scales first.")
    if cfg.nopi and "fp" not in variants:
        variants = ["fp", *variants]
    c = wb._as_corpus(corpus)
    model = wb.model
    tc = wb.info.trained_context
    use_bos = cfg.add_bos if cfg.add_bos is not None else needs_bos(wb.tokenizer, model)
    bos = bos_id(wb.tokenizer, model) if use_bos else None
    L = cfg.length
    wins, skipped = _windows(c.tokens, c.doc_ids, L, bos, cfg.max_windows_per_doc, cfg.max_docs)
    if not wins:
        raise DataError(f"No document has the {L - 1 if bos is not None else L} tokens one window of length {L} "
                        "needs: choose a shorter length or longer documents.")
    dev = input_device(model)
    chunk = cfg.chunk or auto_chunk(text_config(model.config).vocab_size, dev.type)
    dtype = precision_dtype(cfg.precision, dev)
    under_pi = [v for v in variants if v != "fp"]
    n_pre = min(tc, L - 1)  # no-PI reference: input positions 0..n_pre-1 predict tokens 1..n_pre
    acc = {("fp", v): [] for v in under_pi}
    if cfg.nopi:
        acc.update({("fp_nopi", v): [] for v in variants})
    passes = len(under_pi) + 1 + cfg.nopi  # decoder forwards per window
    for k, (doc, start, ids) in enumerate(wins):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Fidelity run cancelled; the model is unchanged.")
        ids = ids[None]
        target = ids[0, 1:]
        hs = {}
        for j, v in enumerate(["fp", *under_pi]):
            with wb.variant(v):
                hs[v] = hidden_states(model, ids)[0, :-1]
            if progress is not None:
                progress((k * passes + j + 1) / (len(wins) * passes), f"window {k + 1}/{len(wins)}: {v}")
        stats = compare_hidden(model, hs["fp"], {v: hs[v] for v in under_pi}, target, chunk, dtype)
        for v in under_pi:
            acc[("fp", v)].append(stats[v])
        if cfg.nopi:
            with wb.variant("fp"), wb.pi_off():
                h0 = hidden_states(model, ids[:, :n_pre])[0]
            if progress is not None:
                progress((k + 1) / len(wins), f"window {k + 1}/{len(wins)}: fp without PI")
            stats = compare_hidden(model, h0, {v: hs[v][:n_pre] for v in variants}, target[:n_pre], chunk, dtype)
            for v in variants:
                acc[("fp_nopi", v)].append(stats[v])
        del hs
    edges = bucket_edges(L - 1, tc, cfg.per_octave)
    b_rows, o_rows = [], []
    for (ref, v), parts in acc.items():
        cat = {s: torch.cat([p[s] for p in parts]).numpy() for s in parts[0]}
        n_pos = parts[0]["kld"].numel()
        pos = np.tile(np.arange(1, n_pos + 1), len(parts))  # 1-based position of each prediction
        for lo, hi in zip(edges, edges[1:]):
            m = (pos > lo) & (pos <= hi)
            if m.any():
                b_rows.append({"reference": ref, "variant": v, "pos_lo": lo, "pos_hi": hi, "in_trained": hi <= tc,
                               **summarize_positions(*(cat[s][m] for s in ("kld", "same_top", "nll_ref", "nll_var")))})
        for Lo in (cfg.lengths if ref == "fp" else (min(L, n_pre + 1),)):
            m = pos <= Lo - 1
            o_rows.append({"reference": ref, "variant": v, "length": Lo, "upto": Lo - 1,
                           **summarize_positions(*(cat[s][m] for s in ("kld", "same_top", "nll_ref", "nll_var")))})
    settings = {"config": cfg.to_dict(), "corpus": c.spec, "variants": under_pi, "trained_context": tc,
                "bos": bos is not None, "chunk": chunk, "precision": str(dtype).replace("torch.", ""),
                "pi": wb.pi.to_dict(), "seconds": round(time.time() - t0, 3)}
    cols_b = ["reference", "variant", "pos_lo", "pos_hi", "in_trained", *STAT_COLUMNS]
    cols_o = ["reference", "variant", "length", "upto", *STAT_COLUMNS]
    return FidelityResult(buckets=pd.DataFrame(b_rows).reindex(columns=cols_b),
                          overall=pd.DataFrame(o_rows).reindex(columns=cols_o),
                          windows=pd.DataFrame([{"doc": d, "start": s, "length": L} for d, s, _ in wins]),
                          skipped=pd.DataFrame(skipped, columns=["doc", "length", "tokens"]), settings=settings)


# ----------------------------------------------------------------------------- KL for the search objective


class FPReference:
    """FP final hidden states of windows under one PI, computed once and reused while a search moves scales
    (the FP model does not change then). Asking under another PI or model raises instead of comparing
    against a stale reference."""

    def __init__(self, wb, device: str = "cpu"):
        self.wb, self.device = wb, device
        self.state = self._state()
        self.hidden: dict[tuple, torch.Tensor] = {}

    def _state(self):
        return (self.wb.info.fingerprint, self.wb.pi)

    def check(self) -> None:
        if self._state() != self.state:
            raise ConfigError("No FP reference for these settings: it was computed under another PI or model, so KL "
                              "against it would be wrong. Start a new reference (a new search) for these settings.")

    def get(self, key: tuple, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, H) of the FP model for windows `ids` (B, L), cached under `key`."""
        self.check()
        if key not in self.hidden:
            with self.wb.variant("fp"):
                self.hidden[key] = hidden_states(self.wb.model, ids).to(self.device)
        h = self.hidden[key]
        if h.shape[:2] != ids.shape:
            raise ConfigError(f"The FP reference under {key} holds windows of shape {tuple(h.shape[:2])}, not "
                              f"{tuple(ids.shape)}: the windows changed; start a new reference.")
        return h

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden.values())


class KLResult:
    """Rows per (doc, length): windows, tokens, nll (sum), kld (sum). log_ppl() and kld() per length
    (token-weighted means), like perplexity.EvalResult.log_ppl()."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def _mean(self, col: str) -> dict[int, float]:
        acc: dict[int, list] = {}
        for r in self.rows:
            a = acc.setdefault(r["length"], [0.0, 0])
            a[0], a[1] = a[0] + r[col], a[1] + r["tokens"]
        return {L: s / t for L, (s, t) in sorted(acc.items())}

    def log_ppl(self) -> dict[int, float]:
        return self._mean("nll")

    def kld(self) -> dict[int, float]:
        return self._mean("kld")

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["doc", "length", "windows", "tokens", "nll", "kld"])


@torch.no_grad()
def kld_evaluate(wb, corpus, eval_cfg, variant: str, reference: FPReference, cancel=None, precision: str = "float32") -> KLResult:
    """Mean KL(FP || variant) and the variant's nll per document and length, on perplexity's windows
    (eval_cfg: lengths, max_windows_per_doc, nested; no stride), against the cached FP reference."""
    if eval_cfg.stride is not None:
        raise ConfigError("The KL objective scores non-overlapping windows: leave the stride empty.")
    c = wb._as_corpus(corpus)
    model = wb.model
    use_bos = eval_cfg.add_bos if eval_cfg.add_bos is not None else needs_bos(wb.tokenizer, model)
    bos = bos_id(wb.tokenizer, model) if use_bos else None
    need = lambda L: L - 1 if bos is not None else L  # noqa: E731
    lengths = eval_cfg.lengths
    dev = input_device(model)
    chunk = eval_cfg.loss_chunk or auto_chunk(text_config(model.config).vocab_size, dev.type)
    dtype = precision_dtype(precision, dev)
    acc: dict[tuple, list] = {}
    reference.check()
    for L in lengths:
        if not any(t.numel() >= need(L) for t in c.tokens):
            raise DataError(f"No document has the {need(L)} tokens one window of length {L} needs: "
                            "choose a shorter length or add longer documents.")
    with wb.variant(variant):
        for d, toks in zip(c.doc_ids, c.tokens):
            if eval_cfg.nested:
                top = max((L for L in lengths if toks.numel() >= need(L)), default=None)
                plan = [] if top is None else [(top, [L for L in lengths if L <= top])]
            else:
                plan = [(L, [L]) for L in lengths if toks.numel() >= need(L)]
            for Lf, cuts in plan:
                ids, _ = make_windows(toks.long().cpu(), Lf, bos, None, eval_cfg.max_windows_per_doc)
                for w in range(len(ids)):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("KL evaluation cancelled; the model is unchanged.")
                    x = ids[w:w + 1]
                    h_var = hidden_states(model, x)[0, :-1]
                    h_ref = reference.get((c.spec, d, Lf, w, bos), x)[0, :-1]
                    s = compare_hidden(model, h_ref, {"v": h_var}, x[0, 1:], chunk, dtype)["v"]
                    kc, nc = s["kld"].cumsum(0), s["nll_var"].cumsum(0)
                    for Lc in cuts:
                        a = acc.setdefault((d, Lc), [0, 0, 0.0, 0.0])
                        a[0], a[1], a[2], a[3] = a[0] + 1, a[1] + Lc - 1, a[2] + float(nc[Lc - 2]), a[3] + float(kc[Lc - 2])
    rows = [{"doc": d, "length": L, "windows": a[0], "tokens": a[1], "nll": a[2], "kld": a[3]}
            for L in lengths for d in c.doc_ids if (a := acc.get((d, L))) is not None]
    return KLResult(rows)
