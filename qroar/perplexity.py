"""Token-level perplexity over fixed-length windows, with a chunked loss.

Windows. Each document (a 1-D tensor of token ids, no special tokens) is cut into windows of
exactly L positions. BOS rule: when the model wants a BOS token (`needs_bos`: the tokenizer adds
one by default, or the model is Gemma-family; a tokenizer without a bos_token never gets one),
each window is BOS + the next L-1 document tokens; otherwise it is L document tokens. Either way a
window scores L-1 predictions, every position after the first. With `stride=None` windows do not
overlap (with BOS every document token is scored; without, the first token of each window is only
context). With `stride=s < L` windows start every s document tokens and, after the first window,
only the last s predictions of each are scored, so every scored token is scored exactly once and
each has at least L-1-s tokens of context; a tail shorter than s stays unscored. Documents too
short for one window (fewer than L document tokens, L-1 with BOS) are listed in
`EvalResult.skipped`, never silently dropped.

Nested windows (`nested=True`, no stride). Each document is cut into windows of its longest
length in `lengths` that it can fill; the windows at every shorter length L are the L-prefixes of
those windows (same start, same BOS). Causal attention makes the first L-1 predictions of a long
window exactly those of its L-prefix, so one forward at the longest length scores every length:
a search over lengths 4K-32K costs one 32K forward per window instead of four. Shorter lengths then
score fewer tokens than with tiling (only the prefixes), which is the point: the same text at
every length.

Uncertainty. Each row also keeps its windows' own sums (`window_nll`, `window_tokens`, in window
order), so `log_ppl_interval` gives a 95% interval of log-perplexity across windows and documents,
and `paired_change` one of the change between two variants evaluated on the same windows (the
text both share cancels: what judging a change needs). With one window there is no spread to
measure, and both say so (nan) rather than invent one. Estimators: qroar.stats.

Loss. The decoder body gives the last hidden states; the output head (plus Gemma's
final_logit_softcapping) runs on `loss_chunk` positions at a time and cross-entropy sums
accumulate in fp32, so full [L, vocab] logits are never held.

Run by hand `python -m qroar.perplexity --bench` to compare `evaluate` with a bare forward.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from qroar.rope import text_config
from qroar.errors import Cancelled, ConfigError, DataError, OutOfMemory
from qroar.stats import half_width, paired_interval, ratio_interval

MAX_BATCH_POSITIONS = 32768  # more positions per forward no longer speeds a GPU up
AUTO_BATCH_FRACTION = 0.7  # share of free memory the automatic batch size may plan to use
GiB = 1024**3


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity settings. stride=None: non-overlapping windows; batch_size=None: automatic;
    add_bos=None: decided per model/tokenizer (`needs_bos`)."""

    lengths: tuple[int, ...] = (512,)
    stride: int | None = None
    max_windows_per_doc: int | None = None
    batch_size: int | None = None
    loss_chunk: int | None = None  # None: auto_loss_chunk (1024 on CPU; ~1 GiB of fp32 logits on a GPU)
    add_bos: bool | None = None
    nested: bool = False  # shorter lengths are prefixes of the longest windows: one forward per window

    def __post_init__(self):
        lengths = self.lengths
        if isinstance(lengths, int) or not isinstance(lengths, (tuple, list)) or len(lengths) == 0:
            raise ConfigError(f"lengths must be a non-empty list of context lengths in tokens, got {lengths!r}.")
        for n in lengths:
            if not _is_int(n) or n < 2:
                raise ConfigError(f"Every context length must be an integer >= 2 tokens, got {n!r}.")
        object.__setattr__(self, "lengths", tuple(sorted(set(int(n) for n in lengths))))
        if self.stride is not None and (not _is_int(self.stride) or not 1 <= self.stride < min(self.lengths)):
            raise ConfigError(
                f"stride must be an integer from 1 to {min(self.lengths) - 1} (below the shortest length, "
                f"{min(self.lengths)}), or empty for non-overlapping windows; got {self.stride!r}."
            )
        for name in ("max_windows_per_doc", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or empty (no limit / automatic), got {v!r}.")
        if self.loss_chunk is not None and (not _is_int(self.loss_chunk) or self.loss_chunk < 1):
            raise ConfigError(f"loss_chunk must be a positive integer number of positions, got {self.loss_chunk!r}.")
        if self.add_bos is not None and not isinstance(self.add_bos, bool):
            raise ConfigError(f"add_bos must be true, false or empty (automatic), got {self.add_bos!r}.")
        if not isinstance(self.nested, bool) or (self.nested and self.stride is not None):
            raise ConfigError("nested must be true or false, and nested windows take no stride (they never overlap).")

    def to_dict(self) -> dict:
        return {
            "lengths": list(self.lengths), "stride": self.stride, "max_windows_per_doc": self.max_windows_per_doc,
            "batch_size": self.batch_size, "loss_chunk": self.loss_chunk, "add_bos": self.add_bos,
            "nested": self.nested,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        known = ("stride", "max_windows_per_doc", "batch_size", "loss_chunk", "add_bos", "nested")
        lengths = d.get("lengths", cls.lengths)
        return cls(lengths=tuple(lengths) if isinstance(lengths, list) else lengths,
                   **{k: d[k] for k in known if k in d})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- BOS and windows


def needs_bos(tokenizer, model) -> bool:
    """True if the tokenizer adds a BOS by default or the model is Gemma-family; never without a bos_token."""
    if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is None:
        return False
    if text_config(model.config).model_type.startswith("gemma"):
        return bos_id(tokenizer, model) is not None
    if tokenizer is None:
        return False
    if hasattr(tokenizer, "encode"):  # ask the tokenizer itself: flags such as add_bos_token are not uniform
        return tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]
    return bool(getattr(tokenizer, "add_bos_token", False))


def bos_id(tokenizer, model) -> int | None:
    tid = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    return tid if tid is not None else getattr(text_config(model.config), "bos_token_id", None)


def make_windows(doc: torch.Tensor, length: int, bos: int | None = None, stride: int | None = None,
                 max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of one document: ids (W, length) and n_scored (W,), the number of trailing
    predictions each window scores (length-1 for the first window, stride for later overlapping ones)."""
    span = length - 1 if bos is not None else length  # document tokens per window
    step = stride if stride is not None else span
    n = doc.numel()
    count = 0 if n < span else (n - span) // step + 1
    if max_windows is not None:
        count = min(count, max_windows)
    starts = torch.arange(count) * step
    ids = doc[starts[:, None] + torch.arange(span)]  # (W, span)
    if bos is not None:
        ids = torch.cat([torch.full((count, 1), bos, dtype=doc.dtype), ids], dim=1)
    n_scored = torch.full((count,), length - 1, dtype=torch.long)
    if stride is not None and count > 1:
        n_scored[1:] = stride
    return ids, n_scored


# ----------------------------------------------------------------------------- chunked loss


def _decoder(model):
    try:
        return model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return model.model


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (multi-device models), else the first parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


FUSED_LOSS_ENV = "QROAR_FUSED_LOSS"  # "1": on CUDA, head + fp32 cross-entropy as one compiled function
_fused = {}


def _head_loss(h: torch.Tensor, weight: torch.Tensor, bias, y: torch.Tensor, cap) -> torch.Tensor:
    """Per-position cross-entropy of the output head, fp32: what gets compiled."""
    return _ce(F.linear(h, weight, bias), y, cap)


def _ce(logits: torch.Tensor, y: torch.Tensor, cap) -> torch.Tensor:
    logits = _soft(logits.float(), cap)
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, y[:, None]).squeeze(1)


def _loss_fn(head, dev: torch.device):
    """(h, y, cap) -> per-position fp32 loss. Compiled (fused: bf16 logits read once, log-sum-exp in
    fp32, no fp32 logits in memory) on CUDA when QROAR_FUSED_LOSS=1 and the head is a plain linear
    layer; else the head module itself (so accelerate's offload hooks still run) then cross-entropy."""
    import os

    plain = isinstance(head, torch.nn.Linear) and not hasattr(head, "_hf_hook")
    if dev.type != "cuda" or os.environ.get(FUSED_LOSS_ENV) != "1" or not plain:
        return lambda h, y, cap: F.cross_entropy(_soft(head(h).float(), cap), y, reduction="none")
    if "fn" not in _fused:
        _fused["fn"] = torch.compile(_head_loss, dynamic=True)
    return lambda h, y, cap: _fused["fn"](h, head.weight, head.bias, y, cap)


def _soft(logits: torch.Tensor, cap) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def chunked_nll(model, input_ids: torch.Tensor, loss_chunk: int = 1024,
                n_scored: torch.Tensor | None = None, cuts: list[int] | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy per window, (B,) fp32, scoring the last n_scored[b]
    predictions of window b (all L-1 by default). Logits exist only loss_chunk positions at a time.
    cuts: prefix lengths instead: (B, len(cuts)) float64, column j the sum over the first cuts[j]-1
    predictions (the loss of the window's cuts[j]-token prefix)."""
    B, L = input_ids.shape
    ids = input_ids.to(input_device(model))
    hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, H)
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    dev = head.weight.device
    hidden = hidden.reshape(B * L, -1)
    ids = ids.to(dev).reshape(-1)

    # flat index of every scored prediction position p (predicting the token at p+1), and its window
    n_scored = torch.full((B,), L - 1) if n_scored is None or cuts is not None else n_scored.cpu()
    pos = torch.arange(L - 1)
    mask = pos[None, :] >= (L - 1 - n_scored)[:, None]  # (B, L-1)
    win, p = mask.nonzero(as_tuple=True)
    flat = (win * L + p).to(dev)
    win = win.to(dev)

    sums = torch.zeros(B, dtype=torch.float32, device=dev)
    per_pos = torch.zeros(B * (L - 1), dtype=torch.float32, device=dev) if cuts is not None else None
    loss_fn = _loss_fn(head, dev)
    for a in range(0, flat.numel(), loss_chunk):
        idx = flat[a:a + loss_chunk]
        h = hidden.index_select(0, idx.to(hidden.device)).to(dev)
        loss = loss_fn(h, ids[idx + 1], cap)  # (chunk,) fp32
        if per_pos is None:
            sums.index_add_(0, win[a:a + loss_chunk], loss)
        else:  # all positions are scored here, so flat row b*L+p is prediction b*(L-1)+p
            per_pos[a:a + loss_chunk] = loss
    if per_pos is None:
        return sums
    csum = per_pos.view(B, L - 1).double().cumsum(1)
    return csum[:, torch.tensor([c - 2 for c in cuts], device=dev)]


# ----------------------------------------------------------------------------- memory


def auto_loss_chunk(vocab_size: int, device_type: str) -> int:
    """Positions per loss chunk: 1024 on CPU; on a GPU as many as keep one chunk's fp32 logits near
    1 GiB (at most 16384), so a 4K window with a 32K vocabulary is one head matmul, not four."""
    if device_type != "cuda":
        return 1024
    return max(1024, min(16384, (1 << 28) // vocab_size // 1024 * 1024))


def _dims(model) -> dict:
    c = text_config(model.config)
    H = c.hidden_size
    nh = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or H // nh
    return dict(H=H, nh=nh, nkv=getattr(c, "num_key_value_heads", None) or nh, hd=hd,
                I=getattr(c, "intermediate_size", None) or 4 * H, V=c.vocab_size,
                b=next(model.parameters()).element_size(),
                eager=getattr(c, "_attn_implementation", "sdpa") == "eager")


def estimate_eval_memory(model, length: int, batch: int, loss_chunk: int = 1024) -> int:
    """Bytes beyond the weights for one forward of (batch, length): the residual stream, the
    transient tensors of one layer (attention with SDPA, or eager scores), and one loss chunk."""
    d = _dims(model)
    T = batch * length
    b = d["b"]
    stream = 3 * T * d["H"] * b  # layer input, layer output, final hidden states
    qkv = d["nh"] * d["hd"] + 2 * d["nkv"] * d["hd"]
    # q, k, v; RoPE'd copies of q and k; k and v repeated to all heads (GQA); attention output
    attn = T * b * (d["H"] + 2 * qkv + 2 * d["nh"] * d["hd"] + d["nh"] * d["hd"])
    if d["eager"]:
        attn += batch * d["nh"] * length * length * (b + 4)  # scores, and the fp32 softmax
    mlp = T * b * (d["H"] + 3 * d["I"])  # gate, up, act(gate) * up
    rope = 2 * T * d["hd"] * 4  # cos and sin, fp32
    loss = min(loss_chunk, T) * (d["V"] * (b + 8) + d["H"] * b)  # logits, fp32 copy, log-softmax
    return int(stream + max(attn, mlp) + rope + loss)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for activations on the device: CUDA free + cached-but-unused; CPU MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def largest_fitting_length(model, batch: int, budget: int, loss_chunk: int = 1024, upper: int = 1 << 21) -> int:
    """Largest length whose estimate fits in budget bytes (0 if none does); the estimate grows with length."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_eval_memory(model, mid, batch, loss_chunk) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fits(model, length: int, batch: int, loss_chunk: int = 1024) -> None:
    """Raise OutOfMemory before a run that clearly will not fit, naming the largest length that would."""
    free = available_memory(input_device(model))
    if free is None:
        return
    need = estimate_eval_memory(model, length, batch, loss_chunk)
    if need <= free:
        return
    fit = largest_fitting_length(model, 1, free, loss_chunk)
    hint = (f"the longest context that fits at batch 1 is about {fit} tokens" if fit >= 2
            else "not even a short context fits; free memory or use a smaller model")
    raise OutOfMemory(
        f"Length {length} at batch {batch} needs about {need / GiB:.2f} GiB for activations but only "
        f"{free / GiB:.2f} GiB is free: {hint}. Choose shorter lengths or a smaller batch size."
    )


def auto_batch_size(model, length: int, n_windows: int, loss_chunk: int = 1024) -> int:
    """Windows per forward: 1 off CUDA; on CUDA as many as fit in a share of free memory."""
    dev = input_device(model)
    if dev.type != "cuda" or n_windows <= 1:
        return 1
    budget = AUTO_BATCH_FRACTION * available_memory(dev)
    one = estimate_eval_memory(model, length, 1, loss_chunk)
    per = estimate_eval_memory(model, length, 2, loss_chunk) - one
    fits = 1 + int(max(budget - one, 0) // max(per, 1))
    return max(1, min(n_windows, fits, MAX_BATCH_POSITIONS // length))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- evaluation


TABLE_COLUMNS = ["doc", "length", "windows", "tokens", "nll", "ppl", "window_nll", "window_tokens"]


class EvalResult:
    """table: one row per (doc, length): doc, length, windows, tokens, nll (sum, nats), ppl, and each
    window's own nll and scored tokens as lists (window_nll, window_tokens; see `log_ppl_interval`).
    summary: one row per length: length, docs, windows, tokens, nll, log_ppl (= nll/tokens), ppl.
    skipped: documents too short for a length: doc, length, tokens (the document's length).
    The DataFrames are built on first use: a search only needs `log_ppl()`, and three DataFrames
    cost ~1-2 ms a call, a visible share of a 4K-token window on a GPU."""

    def __init__(self, rows: list[dict], skipped: list[dict], config: EvalConfig, bos: bool):
        self.rows, self._skipped, self.config, self.bos = rows, skipped, config, bos

    @functools.cached_property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TABLE_COLUMNS)

    @functools.cached_property
    def summary(self) -> pd.DataFrame:
        return summarize(self.table)

    @functools.cached_property
    def skipped(self) -> pd.DataFrame:
        return pd.DataFrame(self._skipped, columns=["doc", "length", "tokens"])

    def log_ppl(self) -> dict[int, float]:
        """Tokens-weighted log-perplexity per length (the summary's log_ppl), without pandas."""
        acc: dict[int, list] = {}
        for r in self.rows:
            a = acc.setdefault(r["length"], [0.0, 0])
            a[0], a[1] = a[0] + r["nll"], a[1] + r["tokens"]
        return {L: n / t for L, (n, t) in sorted(acc.items())}


def _check_docs(token_docs, doc_ids, vocab_size: int) -> list:
    if not token_docs:
        raise DataError("No documents to evaluate: load a corpus with at least one document.")
    for i, d in enumerate(token_docs):
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.is_floating_point() or d.is_complex():
            raise DataError(f"Document {i} must be a 1-D tensor of integer token ids.")
        if d.numel() and (int(d.min()) < 0 or int(d.max()) >= vocab_size):
            raise DataError(f"Document {i} has token ids outside the model's vocabulary (0..{vocab_size - 1}): "
                            "tokenize it with this model's tokenizer.")
    if doc_ids is None:
        return list(range(len(token_docs)))
    if len(doc_ids) != len(token_docs):
        raise DataError(f"Got {len(doc_ids)} document ids for {len(token_docs)} documents.")
    return list(doc_ids)


def evaluate(model, token_docs: list[torch.Tensor], cfg: EvalConfig, doc_ids: list | None = None,
             progress: Callable[[float, str], None] | None = None, cancel: threading.Event | None = None,
             tokenizer=None) -> EvalResult:
    """Perplexity of every document at every length in cfg (see the module docstring for windows)."""
    text = text_config(model.config)
    ids_of = _check_docs(token_docs, doc_ids, text.vocab_size)
    use_bos = cfg.add_bos if cfg.add_bos is not None else needs_bos(tokenizer, model)
    bos = bos_id(tokenizer, model) if use_bos else None
    if use_bos and bos is None:
        raise ConfigError("add_bos is on but neither the tokenizer nor the model config defines a BOS token: turn it off.")

    # every window up front: fail before any compute if a length has none at all
    if cfg.loss_chunk is None:
        from dataclasses import replace

        cfg = replace(cfg, loss_chunk=auto_loss_chunk(text.vocab_size, input_device(model).type))
    plan, skipped = [], []  # plan: (forward length, windows, n_scored, owner doc, batch, auto batch, lengths scored)
    if cfg.nested:
        need = lambda L: L - 1 if bos is not None else L  # noqa: E731  document tokens one window of L needs
        top = [max((L for L in cfg.lengths if d.numel() >= need(L)), default=None) for d in token_docs]
        for L in cfg.lengths:
            for i, d in enumerate(token_docs):
                if top[i] is None or top[i] < L:
                    skipped.append({"doc": ids_of[i], "length": L, "tokens": d.numel()})
            if all(t is None or t < L for t in top):
                raise DataError(f"No document has the {need(L)} tokens one window of length {L} needs: "
                                "choose a shorter length or add longer documents.")
        for Lf in sorted({t for t in top if t is not None}):
            mine = [i for i, t in enumerate(top) if t == Lf]
            per_doc = [make_windows(token_docs[i].long().cpu(), Lf, bos, None, cfg.max_windows_per_doc) for i in mine]
            windows = torch.cat([w for w, _ in per_doc])
            owner = torch.cat([torch.full((len(w),), i) for i, (w, _) in zip(mine, per_doc)])
            batch = cfg.batch_size or auto_batch_size(model, Lf, len(windows), cfg.loss_chunk)
            check_fits(model, Lf, batch, cfg.loss_chunk)
            plan.append((Lf, windows, None, owner, batch, cfg.batch_size is None, [L for L in cfg.lengths if L <= Lf]))
    else:
        for L in cfg.lengths:
            per_doc = [make_windows(d.long().cpu(), L, bos, cfg.stride, cfg.max_windows_per_doc) for d in token_docs]
            for i, (w, _) in enumerate(per_doc):
                if len(w) == 0:
                    skipped.append({"doc": ids_of[i], "length": L, "tokens": token_docs[i].numel()})
            if sum(len(w) for w, _ in per_doc) == 0:
                need = L - 1 if bos is not None else L
                raise DataError(f"No document has the {need} tokens one window of length {L} needs: "
                                "choose a shorter length or add longer documents.")
            windows = torch.cat([w for w, _ in per_doc])
            scored = torch.cat([s for _, s in per_doc])
            owner = torch.cat([torch.full((len(w),), i) for i, (w, _) in enumerate(per_doc)])
            batch = cfg.batch_size or auto_batch_size(model, L, len(windows), cfg.loss_chunk)
            check_fits(model, L, batch, cfg.loss_chunk)
            plan.append((L, windows, scored, owner, batch, cfg.batch_size is None, [L]))

    total = sum(len(w) * L for L, w, *_ in plan)
    done = 0
    n_docs = len(token_docs)
    nll = {L: torch.zeros(n_docs, dtype=torch.float64) for L in cfg.lengths}
    wins = {L: torch.zeros(n_docs, dtype=torch.long) for L in cfg.lengths}
    toks = {L: torch.zeros(n_docs, dtype=torch.long) for L in cfg.lengths}
    per_win = {L: [([], []) for _ in range(n_docs)] for L in cfg.lengths}  # (nll, tokens) of each window
    was_training = model.training
    if was_training:  # eval()/train() walk every module: ~2 ms each on a 7B model, so only when needed
        model.eval()
    try:
        for L, windows, scored, owner, batch, auto, cut_at in plan:
            reset_dynamic_rope(model)
            a = 0
            while a < len(windows):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Perplexity evaluation cancelled; the model is unchanged.")
                sums = _run_batch(model, windows[a:a + batch], None if scored is None else scored[a:a + batch],
                                  cfg.loss_chunk, L, None if scored is not None else cut_at)
                if sums is None:  # out of memory: memory already freed
                    if auto and batch > 1:
                        batch //= 2
                        continue
                    raise OutOfMemory(_oom_message(model, L, batch, cfg.loss_chunk))
                if not bool(torch.isfinite(sums).all()):  # a NaN perplexity would be charted as if it meant something
                    raise ConfigError(
                        f"The loss at length {L} is not finite (NaN or inf logits): the weights overflow "
                        f"{next(model.parameters()).dtype} under the current settings. Use scales nearer 1, another "
                        "quantizer setting, or bf16/fp32 instead of fp16.")
                who = owner[a:a + batch]
                sums = sums.double().cpu().reshape(len(who), -1)
                for j, Lc in enumerate(cut_at):
                    nll[Lc].index_add_(0, who, sums[:, j])
                    wins[Lc].index_add_(0, who, torch.ones_like(who))
                    n = (scored[a:a + batch] if scored is not None else torch.full_like(who, Lc - 1))
                    toks[Lc].index_add_(0, who, n)
                    for d, x, t in zip(who.tolist(), sums[:, j].tolist(), n.tolist()):
                        per_win[Lc][d][0].append(x)
                        per_win[Lc][d][1].append(t)
                done += len(who) * L
                a += batch
                if progress is not None:
                    progress(done / total, f"length {L}: {min(a, len(windows))}/{len(windows)} windows")
    finally:
        if was_training:
            model.train()

    rows = [{"doc": ids_of[i], "length": L, "windows": int(wins[L][i]), "tokens": int(toks[L][i]),
             "nll": float(nll[L][i]), "ppl": math.exp(nll[L][i] / toks[L][i]),
             "window_nll": per_win[L][i][0], "window_tokens": per_win[L][i][1]}
            for L in cfg.lengths for i in range(n_docs) if wins[L][i] > 0]
    return EvalResult(rows, skipped, cfg, bos is not None)


def reset_dynamic_rope(model) -> None:
    """Dynamic NTK rotary modules keep the frequencies of the longest sequence they have seen; start
    each length from the trained ones, so a result at length L never depends on what ran before."""
    if "dynamic" not in str(getattr(text_config(model.config), "rope_parameters", None) or "dynamic"):
        return  # no dynamic rope in force: skip the walk over every module (~1 ms on a 7B model)
    for m in model.modules():
        types = getattr(m, "rope_type", None)
        if not hasattr(m, "original_max_seq_len") or types is None:
            continue
        for prefix, t in ({"": types} if isinstance(types, str) else {f"{k}_": v for k, v in types.items()}).items():
            orig = getattr(m, f"{prefix}original_inv_freq", None)
            if "dynamic" in str(t) and orig is not None:
                m.register_buffer(f"{prefix}inv_freq", orig.to(getattr(m, f"{prefix}inv_freq").device), persistent=False)
                setattr(m, f"{prefix}max_seq_len_cached", m.original_max_seq_len)


def _run_batch(model, ids, scored, loss_chunk, L, cuts=None):
    """Per-window nll sums (per prefix with cuts), or None after an out-of-memory error (memory freed)."""
    try:
        return chunked_nll(model, ids, loss_chunk, scored, cuts)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
    _free_memory()  # outside the except block, so the traceback's tensors are already released
    return None


def _oom_message(model, length, batch, loss_chunk) -> str:
    free = available_memory(input_device(model))
    if batch > 1:
        hint = f"try batch size {max(1, batch // 2)}"
    else:
        fit = largest_fitting_length(model, 1, free, loss_chunk) if free else 0
        fit = fit if 2 <= fit < length else length // 2
        hint = f"try a length of at most about {fit} tokens"
    return f"Out of memory at length {length} with batch {batch}; memory was freed: {hint}."


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per length, tokens-weighted: log_ppl = total nll / total tokens, ppl = exp(log_ppl)."""
    # plain Python over the rows: a pandas groupby costs ~15 ms a call, which is a search's hot path
    acc: dict[int, list] = {}
    for L, w, t, n in zip(table["length"].tolist(), table["windows"].tolist(), table["tokens"].tolist(), table["nll"].tolist()):
        a = acc.setdefault(int(L), [0, 0, 0, 0.0])
        a[0], a[1], a[2], a[3] = a[0] + 1, a[1] + w, a[2] + t, a[3] + n
    rows = [{"length": L, "docs": d, "windows": w, "tokens": t, "nll": n, "log_ppl": n / t, "ppl": math.exp(n / t)}
            for L, (d, w, t, n) in sorted(acc.items())]
    return pd.DataFrame(rows, columns=["length", "docs", "windows", "tokens", "nll", "log_ppl", "ppl"])


def _windows_by_length(table: pd.DataFrame) -> dict[int, tuple[list, list, list]]:
    """length -> (keys (doc, window index), window nll, window tokens), in table order."""
    out: dict[int, tuple[list, list, list]] = {}
    if "window_nll" not in table:
        return out
    for d, L, xs, ts in zip(table["doc"].tolist(), table["length"].tolist(), table["window_nll"].tolist(),
                            table["window_tokens"].tolist()):
        k, x, t = out.setdefault(int(L), ([], [], []))
        k += [(d, i) for i in range(len(xs))]
        x += list(xs)
        t += list(ts)
    return out


def log_ppl_interval(table: pd.DataFrame) -> pd.DataFrame:
    """Per length, across every window of every document: log_ppl (as summarize: total nll / total tokens),
    se_log_ppl (its standard error, windows as units), half_width (of the 95% t interval of log_ppl),
    ppl_lo, ppl_hi (that interval as perplexity). Fewer than two windows: nan (no spread to measure)."""
    rows = []
    for L, (_, x, t) in sorted(_windows_by_length(table).items()):
        r, se, n = ratio_interval(x, t)
        h = half_width(se, n)
        rows.append(dict(length=L, windows=n, log_ppl=r, se_log_ppl=se, half_width=h,
                         ppl_lo=math.exp(r - h), ppl_hi=math.exp(r + h)))
    return pd.DataFrame(rows, columns=["length", "windows", "log_ppl", "se_log_ppl", "half_width", "ppl_lo", "ppl_hi"])


def paired_change(base: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per length, `other` against `base` evaluated on the same windows (tables of two variants):
    delta_log_ppl (other - base, nats per token), se (windows as units, paired), half_width (95% t),
    change_pct = 100 (exp(delta) - 1) and its interval change_lo_pct, change_hi_pct (negative = other is
    better). A length whose windows differ between the two is left out; one window gives nan bounds."""
    a, b = _windows_by_length(base), _windows_by_length(other)
    rows = []
    for L in sorted(set(a) & set(b)):
        (ka, xa, ta), (kb, xb, tb) = a[L], b[L]
        if ka != kb or ta != tb:
            continue
        d, se, n = paired_interval(xa, xb, ta)
        h = half_width(se, n)
        pct = lambda v: 100 * (math.exp(v) - 1)  # noqa: E731
        rows.append(dict(length=L, windows=n, delta_log_ppl=d, se=se, half_width=h, change_pct=pct(d),
                         change_lo_pct=pct(d - h), change_hi_pct=pct(d + h)))
    return pd.DataFrame(rows, columns=["length", "windows", "delta_log_ppl", "se", "half_width", "change_pct",
                                       "change_lo_pct", "change_hi_pct"])


def summarize_variants(table: pd.DataFrame) -> pd.DataFrame:
    """summarize() per variant of a Workbench.perplexity table, stacked (variant first, in table order)."""
    parts = [summarize(g).assign(variant=v) for v, g in table.groupby("variant", sort=False)]
    cols = ["variant", "length", "docs", "windows", "tokens", "nll", "log_ppl", "ppl"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def weighted_objective(summary: pd.DataFrame | dict[int, float], weights: dict[int, float] | None = None) -> float:
    """Weighted mean of log-perplexity over lengths; weights proportional to length by default.
    summary: a summary table (length, log_ppl) or {length: log_ppl} (EvalResult.log_ppl())."""
    if isinstance(summary, dict):
        lengths, logp = [int(n) for n in summary], [float(x) for x in summary.values()]
    else:
        lengths, logp = [int(n) for n in summary["length"]], [float(x) for x in summary["log_ppl"]]
    if weights is None:
        w = [float(n) for n in lengths]
    else:
        missing = [n for n in lengths if n not in weights]
        if missing:
            raise ConfigError(f"Objective weights are missing for lengths {missing}: give a weight for every length.")
        w = [float(weights[n]) for n in lengths]
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) == 0:
            raise ConfigError(f"Objective weights must be finite, non-negative and not all zero, got {weights}.")
    if not lengths:
        raise DataError("No perplexity results to weigh: evaluate at least one length first.")
    return sum(wi * x for wi, x in zip(w, logp)) / sum(w)


# ----------------------------------------------------------------------------- benchmark (by hand)


def benchmark(model, length: int, n_windows: int = 8, batch_size: int = 1, repeats: int = 3) -> dict:
    """Throughput of evaluate() vs a bare model(input_ids) forward on the same windows (tokens/s)."""
    dev = input_device(model)
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, text_config(model.config).vocab_size, (length * n_windows,), generator=g)
    cfg = EvalConfig(lengths=(length,), batch_size=batch_size, add_bos=False)
    windows = make_windows(doc, length)[0]

    def bare():
        with torch.no_grad():
            for a in range(0, n_windows, batch_size):
                model(windows[a:a + batch_size].to(dev), use_cache=False)

    def ours():
        evaluate(model, [doc], cfg)

    out = {"length": length, "windows": n_windows, "batch": batch_size, "device": str(dev)}
    times = {"bare_forward": [], "evaluate": []}
    for _ in range(repeats + 1):  # interleaved, best of repeats: robust to a shared, noisy machine
        for name, fn in (("bare_forward", bare), ("evaluate", ours)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                out[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / GiB
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        out[f"{name}_s"] = min(ts[1:])  # the first round is warm-up
        out[f"{name}_tok_s"] = n_windows * length / out[f"{name}_s"]
    out["ratio"] = out["evaluate_s"] / out["bare_forward_s"]
    out["estimate_gib"] = estimate_eval_memory(model, length, batch_size) / GiB
    return out


def _bench_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {  # tiny: the test model; 7b: Llama-2-7B-shaped (random weights time like real ones)
        "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2),
        "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32),
    }
    config = LlamaConfig(**shapes[shape], max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in fp32 first would double memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compare evaluate() with a bare forward (prints a table, writes JSON).")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--shape", choices=("tiny", "7b"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="perplexity_bench.json")
    args = ap.parse_args()
    m = _bench_model(args.shape, args.device, getattr(torch, args.dtype))
    results = [benchmark(m, L, args.windows, args.batch, args.repeats) for L in args.lengths]
    cols = [k for k in results[0] if k != "device"]
    print(" ".join(f"{c:>18}" for c in cols))
    for r in results:
        print(" ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
