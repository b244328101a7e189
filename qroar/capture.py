"""Forward hooks that reduce q/k activations on the fly: exact streaming tail quantiles per band.

Nothing layer-sized is kept. Each q_proj / k_proj forward hook reads that layer's projection
output, a chunk of tokens at a time in fp32, and merges each band's |values| into a top-k buffer
per (kind, layer, proj, band, side); an attention pre-hook supplies the layer's own (cos, sin)
(the rotary module's output, attention factor included) and, at a few sampled positions, the
projection input h for the logit-noise diagnostic.

Quantile. For N values x_(1) <= ... <= x_(N), Q_{1-eps} is the k-th largest value with
k = floor(eps * N) + 1, i.e. x_(N - floor(eps * N)): the smallest x with at least (1 - eps) N
values <= x, numpy's `quantile(..., method="inverted_cdf")` at q = 1 - eps. Since N (tokens x band
rows x documents) is known before the run, a top-k buffer of exactly k values per slot is exact:
a value outside the running top k can never re-enter it.

Sampling spread. Each document's window is reduced into its own top-k buffer first (then merged
into the pooled one, so the pooled quantile is unchanged), which also gives each document's own
Q_{1-eps} (k = floor(eps N_doc) + 1) and its own TIR. The spread of log TIR over documents estimates
how far the pooled TIR could move on other text: between-document differences and tokens whose band
rows move together are both in it, which a binomial count of values above the quantile misses.

Kinds. "W": |W_P h| per row (the projection output, bias included for Qwen2-style q/k biases).
"A": |component| of post-RoPE q / k per axis (after q_norm / k_norm where the model has them),
what an axis-aligned quantizer of the rotated vectors would see. Sides: "short" = positions
[skip_first, trained_context), "long" = positions [trained_context, L).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from qroar.bands import Bands, proj_rows

KINDS = ("W", "A")
SIDES = ("short", "long")


# ----------------------------------------------------------------------------- streaming quantile


def tail_k(n: int, eps: float) -> int:
    """How many of the largest values the (1 - eps) quantile of n values needs: floor(eps n) + 1."""
    return math.floor(eps * n) + 1


class TopK:
    """The k largest values seen so far (fp32, on the device of the data), merged chunk by chunk."""

    def __init__(self, k: int):
        self.k = k
        self.buf: torch.Tensor | None = None
        self.seen = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).float()
        self.seen += x.numel()
        if self.buf is not None and self.buf.numel() >= self.k:
            x = x[x > self.buf.min()]  # a full buffer only admits values above its k-th largest
        if x.numel() == 0:
            return
        cat = x if self.buf is None else torch.cat([self.buf, x])
        self.buf = cat if cat.numel() <= self.k else torch.topk(cat, self.k, sorted=False).values

    def merge(self, other: "TopK") -> None:
        """Take in another buffer's values (its `seen` counted, not its buffer's length)."""
        if other.buf is not None:
            seen = self.seen
            self.update(other.buf)
            self.seen = seen
        self.seen += other.seen

    def kth_largest(self) -> float:
        if self.buf is None or self.buf.numel() < self.k:
            raise ValueError(f"only {0 if self.buf is None else self.buf.numel()} values seen, need {self.k}")
        return float(self.buf.min())

    def kth(self, k: int) -> torch.Tensor:
        """The k-th largest value held (k <= the buffer's size), as a 0-d tensor (no host sync)."""
        return torch.kthvalue(self.buf, self.buf.numel() - k + 1).values


class BandTopK:
    """TopK for several same-size slots at once: one (slots, k) buffer, one batched topk per chunk.

    No data-dependent filtering, so a chunk costs a fixed number of kernel launches and no host sync.
    """

    def __init__(self, slots: int, k: int):
        self.k, self.buf, self.seen = k, None, 0

    def update(self, x: torch.Tensor) -> None:
        """x: (slots, n) values of one chunk for every slot."""
        x = x.float()
        self.seen += x.shape[1]
        cat = x if self.buf is None else torch.cat([self.buf, x], dim=1)
        self.buf = cat if cat.shape[1] <= self.k else torch.topk(cat, self.k, dim=1, sorted=False).values

    def merge(self, other: "BandTopK") -> None:
        """Take in another buffer of the same slots (its `seen` counted, not its buffer's length)."""
        if other.buf is not None:
            seen = self.seen
            self.update(other.buf)
            self.seen = seen
        self.seen += other.seen

    def kth(self, k: int) -> torch.Tensor:
        """(slots,) k-th largest value of each slot (k <= the buffer's width), no host sync."""
        return torch.kthvalue(self.buf, self.buf.shape[1] - k + 1, dim=1).values

    def slot(self, i: int) -> "TopK":
        t = TopK(self.k)
        t.buf, t.seen = (None if self.buf is None else self.buf[i]), self.seen
        return t


def tail_quantile(chunks, eps: float) -> float:
    """Q_{1-eps} (inverted_cdf) of all values in `chunks` (an iterable of tensors), streamed."""
    chunks = list(chunks)
    top = TopK(tail_k(sum(c.numel() for c in chunks), eps))
    for c in chunks:
        top.update(c)
    return top.kth_largest()


# ----------------------------------------------------------------------------- RoPE on captured q/k


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (..., T, H, D) with cos/sin (..., T, rot); rest kept."""
    rot = cos.shape[-1]
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # broadcast over heads
    xr = x[..., :rot] * c + rotate_half(x[..., :rot]) * s
    return torch.cat([xr, x[..., rot:]], dim=-1) if rot < x.shape[-1] else xr


def project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n_heads: int, head_dim: int,
            norm=None, cos=None, sin=None) -> torch.Tensor:
    """q or k (..., T, H, D) in fp32 from inputs h (..., T, hidden): W h + b, per-head norm, then RoPE."""
    x = h.float() @ w.float().T
    if b is not None:
        x = x + b.float()
    x = x.reshape(*x.shape[:-1], n_heads, head_dim)
    if norm is not None:
        x = norm(x).float()  # per-head RMSNorm (Qwen3, Gemma 3) computes in fp32 anyway
    return apply_rope(x, cos, sin) if cos is not None else x


# ----------------------------------------------------------------------------- the capture


@dataclass
class _Proj:
    name: str  # "q" | "k"
    layer: int
    off: int
    n_heads: int
    norm: torch.nn.Module | None
    rows: list[torch.Tensor]  # per band: row indices within the projection slice

    @property
    def equal(self) -> bool:  # every band owns as many rows: reduce all bands in one batched topk
        return len({r.numel() for r in self.rows}) == 1


@dataclass
class Samples:
    """Per document, at the sampled positions of one layer: the projection input h and the layer's cos/sin."""

    h: list[torch.Tensor] = field(default_factory=list)  # (P, hidden) each
    cos: list[torch.Tensor] = field(default_factory=list)  # (P, rot)
    sin: list[torch.Tensor] = field(default_factory=list)


class TailCapture:
    """Hooks on every attention layer's q/k projections; tail quantiles of |W h| (and post-RoPE |q|, |k|)
    per band, short vs long positions, pooled over documents.

    `n_docs` and `length` fix N before the run, so the top-k buffers are sized exactly. Use
    `with cap.attached(model): ...` around exactly n_docs forwards of one window of `length` tokens.
    """

    def __init__(self, layers, bands: Bands, trained_context: int, length: int, n_docs: int, eps: float = 1e-3,
                 axis: bool = True, skip_first: int = 0, chunk_tokens: int = 4096,
                 sample_layers: tuple[int, ...] = (), sample_positions: torch.Tensor | None = None):
        if not skip_first < trained_context < length:
            raise ValueError("need skip_first < trained_context < length")
        self.layers, self.bands = layers, bands
        self.trained, self.length, self.n_docs, self.eps = trained_context, length, n_docs, eps
        self.kinds = KINDS if axis else ("W",)
        self.skip_first, self.chunk = skip_first, chunk_tokens
        self.sample_layers = set(sample_layers)
        self.positions = sample_positions
        self.samples: dict[int, Samples] = {i: Samples() for i in self.sample_layers}
        self.tops: dict[tuple, TopK] = {}
        self.batched: dict[tuple, BandTopK] = {}  # (kind, layer, proj, side) when the proj's bands are equal-size
        self.doc_q: dict[tuple, list[torch.Tensor]] = {}  # same keys: each document's own Q_{1-eps}, in order
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens = tokens = {"short": trained_context - skip_first, "long": length - trained_context}
        self.projs: list[_Proj] = []
        for L in layers:
            for name, off, nh, norm in (("q", L.q_off, L.n_heads, L.q_norm), ("k", L.k_off, L.n_kv_heads, L.k_norm)):
                rows = [proj_rows(r, L.head_dim, L.rotary_dim, nh) for r in bands.ranges()]
                self.projs.append(_Proj(name, L.index, off, nh, norm, rows))
                if self.projs[-1].equal:
                    for side in SIDES:
                        for kind in self.kinds:
                            k = tail_k(n_docs * tokens[side] * len(rows[0]), eps)
                            self.batched[(kind, L.index, name, side)] = BandTopK(len(rows), k)
                    continue
                for b, r in enumerate(rows):
                    for side in SIDES:
                        for kind in self.kinds:
                            self.tops[(kind, L.index, name, b, side)] = TopK(tail_k(n_docs * tokens[side] * len(r), eps))

    # ------------------------------------------------------------------ hooks

    def _attn_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            self._rope[index] = (cos, sin)
            if index in self.sample_layers:
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                pos = self.positions.to(h.device)
                s = self.samples[index]
                s.h.append(h[0, pos].detach().clone())
                s.cos.append(cos[0, pos].detach().float().clone())
                s.sin.append(sin[0, pos].detach().float().clone())
        return hook

    def _proj_hook(self, layer, projs: list[_Proj]):
        def hook(module, args, out):
            cos, sin = self._rope[layer.index]
            for p in projs:
                self._reduce(p, out[..., p.off : p.off + p.n_heads * layer.head_dim], cos, sin, layer.head_dim)
        return hook

    def _sides(self):
        for side, lo, hi in (("short", self.skip_first, self.trained), ("long", self.trained, self.length)):
            yield side, [(a, min(a + self.chunk, hi)) for a in range(lo, hi, self.chunk)]

    @torch.no_grad()
    def _reduce(self, p: _Proj, out: torch.Tensor, cos, sin, head_dim: int) -> None:
        """Merge one layer's projection output (B, T, n_heads*head_dim) into the band buffers, a document
        (batch row) at a time: its own top-k first (its own quantile), then into the pooled buffer."""
        if out.shape[1] != self.length:
            raise ValueError(f"capture expects windows of {self.length} tokens, got {out.shape[1]}")
        rows = [r.to(out.device) for r in p.rows]
        cos, sin = cos.to(out.device), sin.to(out.device)  # a map may split a layer's modules over devices
        for i in range(out.shape[0]):
            c, s = (cos[i : i + 1], sin[i : i + 1]) if cos.shape[0] > 1 else (cos, sin)
            for side, chunks in self._sides():
                local: dict = {}
                for a, b in chunks:
                    x = out[i : i + 1, a:b]
                    vals = {"W": x.float().abs()}
                    if "A" in self.kinds:
                        y = x.reshape(*x.shape[:-1], p.n_heads, head_dim)
                        if p.norm is not None:
                            y = p.norm(y)
                        vals["A"] = apply_rope(y.float(), c[:, a:b], s[:, a:b]).abs().reshape(x.shape)
                    for kind, v in vals.items():
                        if p.equal:  # (1, t, rows) -> (bands, t * rows_per_band) in one gather
                            g = v.index_select(-1, torch.cat(rows)).reshape(-1, len(rows), rows[0].numel())
                            key = (kind, p.layer, p.name, side)
                            local.setdefault(key, BandTopK(len(rows), self.batched[key].k)).update(
                                g.transpose(0, 1).reshape(len(rows), -1))
                            continue
                        for band, r in enumerate(rows):
                            key = (kind, p.layer, p.name, band, side)
                            local.setdefault(key, TopK(self.tops[key].k)).update(v.index_select(-1, r))
                for key, top in local.items():
                    pooled = self.batched[key] if key in self.batched else self.tops[key]
                    rows_per = rows[0].numel() if key in self.batched else p.rows[key[3]].numel()
                    self.doc_q.setdefault(key, []).append(top.kth(tail_k(self.tokens[side] * rows_per, self.eps)))
                    pooled.merge(top)

    @contextmanager
    def attached(self, model):
        """Hooks on while inside; always removed on the way out (the model is left as it was)."""
        handles = []
        try:
            for L in self.layers:
                handles.append(L.attn.register_forward_pre_hook(self._attn_pre_hook(L.index), with_kwargs=True))
                mine = [p for p in self.projs if p.layer == L.index]
                by_lin: dict[int, tuple[torch.nn.Module, list[_Proj]]] = {}
                for p in mine:
                    lin = L.q_lin if p.name == "q" else L.k_lin
                    by_lin.setdefault(id(lin), (lin, []))[1].append(p)  # fused qkv: one hook, two slices
                for lin, ps in by_lin.values():
                    handles.append(lin.register_forward_hook(self._proj_hook(L, ps)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._rope.clear()

    # ------------------------------------------------------------------ results

    def _top(self, kind, layer, proj, band, side) -> TopK:
        key = (kind, layer, proj, side)
        return self.batched[key].slot(band) if key in self.batched else self.tops[(kind, layer, proj, band, side)]

    def _doc_tir(self, host: dict, kind, layer, proj, band) -> list[float]:
        """Each document's own TIR (its long over its short Q_{1-eps}), in the order the documents ran;
        host: doc_q copied to the host."""
        q = {}
        for side in SIDES:
            key = (kind, layer, proj, side)
            if key in self.batched:
                q[side] = [t[band] for t in host.get(key, [])]
            else:
                q[side] = host.get((kind, layer, proj, band, side), [])
        return [lg / s if s > 0 else float("nan") for s, lg in zip(q["short"], q["long"])]

    def table(self) -> pd.DataFrame:
        """Tidy: kind, layer, proj, band, q_short, q_long, tir (= q_long / q_short), n_short, n_long (values
        behind each quantile: tokens x band rows), tokens_short, tokens_long, docs, tir_docs (each document's
        own TIR, in the order they ran) and tir_se_log: the standard error of log TIR from the spread of the
        documents' own TIRs (sd / sqrt(docs); nan for one)."""
        rows = []
        host = {k: [t.tolist() for t in v] for k, v in self.doc_q.items()}  # one copy per buffer, not per value
        for L in self.layers:
            for proj in ("q", "k"):
                for b in range(self.bands.n_bands):
                    for kind in self.kinds:
                        s, lg = (self._top(kind, L.index, proj, b, side) for side in SIDES)
                        qs, ql = s.kth_largest(), lg.kth_largest()
                        tir_docs = self._doc_tir(host, kind, L.index, proj, b)
                        per_doc = [math.log(t) for t in tir_docs if t > 0 and math.isfinite(t)]
                        n = len(per_doc)
                        se = float("nan")
                        if n >= 2:
                            mean = sum(per_doc) / n
                            se = math.sqrt(sum((t - mean) ** 2 for t in per_doc) / (n - 1) / n)
                        rows.append(dict(kind=kind, layer=L.index, proj=proj, band=b, q_short=qs, q_long=ql,
                                         tir=ql / qs if qs > 0 else float("nan"), n_short=s.seen, n_long=lg.seen,
                                         tokens_short=self.n_docs * self.tokens["short"],
                                         tokens_long=self.n_docs * self.tokens["long"], docs=n, tir_docs=tir_docs,
                                         tir_se_log=se))
        return pd.DataFrame(rows)
