"""Gradient refinement of the band scales: the search strategy "grad".

The scales as parameters. theta (n_layers, n_bands) holds log-scales; with `tie_layers` it is one row
shared by every layer (the paper's shared scales), else one row per layer. Forward hooks multiply the
outputs of q_proj / k_proj (or of q_norm / k_norm on models that normalise q and k per head) at the
band's rows by the band's factor: q by g, k by 1/g (symmetric mode) or by g (shared mode),
`rescale.band_factors`. Scaling an output feature scales that row of the weight and its bias entry,
so the hooked model is exactly the "after quantization" order of `rescale.Rescaler`; for quantizers
that are row-scale-equivariant (RTN, GPTQ: Q(gW) = g Q(W); AWQ as re-quantized here, with its searched
statistics frozen) it is also the "before" order to rounding, so the gradient is exact, with no
straight-through trick. For other grids (per-tensor) it is the gradient of the "after" model, a
surrogate: the chosen scales are always evaluated by the search's ordinary path (`run.evaluate`,
`Workbench.apply`) with the recipe's own order. Only theta needs gradients: every weight is frozen.

Objective. Each dev document gives windows at the longest length in `lengths` it can fill (the
nested rule of perplexity.evaluate); the prefixes of a window give every shorter length, so one
forward scores all of them. The objective of a set of windows is `perplexity.weighted_objective` of
the per-length token-weighted means: log-perplexity (objective "ppl") or mean KL(FP || model) under
the same PI (objective "kld"; FP final hidden states cached once per window in the search's
`fidelity.FPReference`, the head run on chunks of positions, so no [L, vocab] tensor of either model
is held). The loss head runs under activation checkpointing per chunk, and the decoder layers under
`torch.utils.checkpoint` per layer (use_cache off): memory is the layer inputs plus one layer.

Optimisation. Adam on theta, one minibatch of `grad_batch` training windows per step (a seeded
permutation of the training windows, epoch after epoch); after each step theta is projected onto
the windows: log g_min_b <= theta_b <= log g_max_b. Guard: a penalty `GUARD_WEIGHT * relu(lp_short -
lp_short_unscaled - log1p(guard_tol))` per training window (the unscaled short-prefix log-ppl of a
window is computed once, without gradients). Early stopping: a share `grad_val` of the dev documents
(every k-th, never the held-out corpus) is kept out of training; every `grad_every` steps the hooked
model is scored there, and the best point whose short-context log-ppl there passes the guard is
kept; `grad_patience` checks without improvement end the run. Last, the best point is evaluated on all
dev documents by the ordinary path with the guard; if it fails the guard or does not beat the unscaled
model there, half its log-scales is tried, then no scales at all (always guarded).

Work is counted in "steps + evaluations": one per optimisation step, one per validation check, one per
evaluation of a scale vector on the dev documents; `budget` bounds it. Deterministic for a seed on
CPU; on a GPU the attention backward may add floating-point nondeterminism.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qroar import bands as bands_mod
from qroar.errors import ConfigError, DataError

GUARD_WEIGHT = 10.0  # penalty slope per nat of short-context log-ppl above the guard's limit


# ----------------------------------------------------------------------------- which outputs a band owns


@dataclass
class Target:
    """Output features `index` of `module` (q/k projection, or q/k norm) belong to bands `band`."""

    layer: int  # position in attention_layers (the row of theta)
    proj: str  # "q" | "k"
    module: torch.nn.Module
    index: torch.Tensor  # (R,)
    band: torch.Tensor  # (R,)
    width: int  # size of the module output's last dimension


def targets(model, bands: bands_mod.Bands) -> list[Target]:
    """The rows each band owns in every layer's q and k (rescale.band_index: the Rescaler's rule, without copies)."""
    from qroar.models import attention_layers
    from qroar.rescale import band_index

    out = []
    for i, layer in enumerate(attention_layers(model)):
        for proj in ("q", "k"):
            module, kind, index, band = band_index(layer, proj, bands)
            width = module.weight.numel() if kind == "norm" else module.out_features
            out.append(Target(i, proj, module, index, band, width))
    return out


class ScaleHooks:
    """Forward hooks multiplying every band's q/k outputs by its factor from log-scales `theta`
    ((1, B): shared by all layers; (n_layers, B): per layer). Use as a context manager."""

    def __init__(self, model, bands: bands_mod.Bands, mode: str, theta: torch.Tensor):
        if mode not in ("symmetric", "shared"):
            raise ConfigError(f"Unknown rescaling mode {mode!r}: choose symmetric or shared.")
        self.targets = targets(model, bands)
        n_layers = 1 + max(t.layer for t in self.targets)
        if theta.dim() != 2 or theta.shape[1] != bands.n_bands or theta.shape[0] not in (1, n_layers):
            raise ConfigError(f"theta must be (1 or {n_layers} layers, {bands.n_bands} bands), got {tuple(theta.shape)}.")
        self.theta, self.mode, self.handles = theta, mode, []

    def factor(self, t: Target) -> torch.Tensor:
        """(width,) fp32 multiplier of the module's outputs: 1 outside the band rows."""
        row = self.theta[0 if self.theta.shape[0] == 1 else t.layer]
        sign = -1.0 if (t.proj == "k" and self.mode == "symmetric") else 1.0
        f = torch.exp(sign * row.to(t.index.device))[t.band]
        ones = torch.ones(t.width, dtype=f.dtype, device=f.device)
        return ones.index_copy(0, t.index, f)

    def _hook(self, t: Target):
        def hook(module, args, out):
            work = torch.promote_types(out.dtype, torch.float32)  # bf16 outputs scaled in fp32, fp64 ones in fp64
            return (out.to(work) * self.factor(t).to(work)).to(out.dtype)
        return hook

    def __enter__(self):
        self.handles = [t.module.register_forward_hook(self._hook(t)) for t in self.targets]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@contextmanager
def checkpointed_layers(model):
    """Run every decoder layer under torch.utils.checkpoint (its inputs kept, the rest recomputed in backward)."""
    from qroar.models import decoder_layers

    saved = []
    for layer in decoder_layers(model):
        own = layer.__dict__.get("forward")  # accelerate's hooks live here on dispatched models
        inner = layer.forward

        def fwd(*args, _inner=inner, **kw):
            if not torch.is_grad_enabled():
                return _inner(*args, **kw)
            return checkpoint(_inner, *args, use_reentrant=False, **kw)

        layer.forward = fwd
        saved.append((layer, own))
    try:
        yield model
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


# ----------------------------------------------------------------------------- windows and their losses


@dataclass
class Window:
    key: tuple  # the FP reference's key (corpus spec, doc, length, window, bos): shared with fidelity.kld_evaluate
    ids: torch.Tensor  # (1, Lf) token ids, CPU
    cuts: list[int]  # the lengths it scores (prefixes), ascending


def make_windows(model, tokenizer, corpus, lengths, max_windows: int | None, add_bos: bool | None = None) -> list[Window]:
    """Nested windows of every document (module docstring); documents too short for any length give none."""
    from qroar.perplexity import bos_id, make_windows as cut, needs_bos

    use_bos = add_bos if add_bos is not None else needs_bos(tokenizer, model)
    bos = bos_id(tokenizer, model) if use_bos else None
    need = lambda L: L - 1 if bos is not None else L  # noqa: E731
    lengths = sorted(int(n) for n in lengths)
    out = []
    for d, toks in zip(corpus.doc_ids, corpus.tokens):
        top = max((L for L in lengths if toks.numel() >= need(L)), default=None)
        if top is None:
            continue
        ids, _ = cut(toks.long().cpu(), top, bos, None, max_windows)
        out += [Window((corpus.spec, d, top, w, bos), ids[w:w + 1], [L for L in lengths if L <= top]) for w in range(len(ids))]
    return out


def _chunk_terms(head, cap, dtype, h, y, h_ref):
    """Per-position nll (and KL(ref || model) when h_ref is given) of hidden states h (n, H), in `dtype`."""
    logits = head(h).to(dtype)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    lv = F.log_softmax(logits, dim=-1)
    nll = -lv.gather(1, y[:, None])[:, 0]
    if h_ref is None:
        return nll, None
    with torch.no_grad():
        lr = head(h_ref.to(h.device)).to(dtype)
        if cap is not None:
            lr = torch.tanh(lr / cap) * cap
        lr = F.log_softmax(lr, dim=-1)
        pr = lr.exp()
    kld = (pr * (lr - lv)).sum(-1)
    return nll, kld


def window_sums(model, win: Window, chunk: int, h_ref: torch.Tensor | None = None, upto: int | None = None):
    """(nll sums, kld sums or None), each {length: 0-d tensor}: sums over the first L-1 predictions of
    the window's L-prefix, for every cut (only cuts <= `upto` when given). Differentiable when grad is on."""
    from qroar.perplexity import _decoder, input_device, reset_dynamic_rope
    from qroar.rope import text_config

    cuts = [c for c in win.cuts if upto is None or c <= upto]
    L = max(cuts)
    ids = win.ids[:, :L].to(input_device(model))
    reset_dynamic_rope(model)
    hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # (L-1, H)
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    y = ids[0, 1:].to(head.weight.device)
    ref = None if h_ref is None else h_ref.reshape(-1, h_ref.shape[-1])[: L - 1]
    nll, kld = [], []
    for a in range(0, L - 1, chunk):
        h = hidden[a:a + chunk].to(head.weight.device)
        r = None if ref is None else ref[a:a + chunk]
        if torch.is_grad_enabled():
            n, k = checkpoint(_chunk_terms, head, cap, dtype, h, y[a:a + chunk], r, use_reentrant=False)
        else:
            n, k = _chunk_terms(head, cap, dtype, h, y[a:a + chunk], r)
        nll.append(n)
        kld.append(k)
    nc = torch.cat(nll).cumsum(0)
    sums = {c: nc[c - 2] for c in cuts}
    if h_ref is None:
        return sums, None
    kc = torch.cat(kld).cumsum(0)
    return sums, {c: kc[c - 2] for c in cuts}


def length_weights(lengths, weights: dict | None) -> dict[int, float]:
    """Normalised weights per length (weighted_objective's rule: proportional to length by default)."""
    w = {int(L): float(L if weights is None else weights[int(L)]) for L in lengths}
    s = sum(w.values())
    return {L: x / s for L, x in w.items()}


# ----------------------------------------------------------------------------- the optimisation


@dataclass
class Setup:
    """What one optimisation needs besides theta (built once per search fold)."""

    wb: object
    objective: str  # "log_ppl" | "kld": the per-length measure weighed
    weights: dict[int, float] | None  # per length, None: proportional to length
    guard_tol: float
    chunk: int
    reference: object = None  # fidelity.FPReference for "kld"


class Problem:
    """The objective of a set of windows as a function of theta, on the workbench's model as it stands
    (the caller puts the unscaled variant in place). `value(theta)` and `grad(theta)` are what the
    finite-difference test checks; the search uses `step_loss` window by window."""

    def __init__(self, setup: Setup, bands, mode: str, windows: list[Window], ranks=None):
        if not windows:
            raise DataError("No dev document is long enough for one window at the shortest length: "
                            "choose shorter lengths or longer documents.")
        self.s, self.bands, self.mode, self.windows = setup, bands, mode, windows
        self.ranks = ranks  # qroar.distributed.Ranks: windows split over processes, results gathered (or None)
        self.short = min(c for w in windows for c in w.cuts)
        self._ref: dict[tuple, torch.Tensor] = {}
        if setup.objective == "kld":
            for w in windows:  # the FP model's hidden states, before any hook is attached
                self._ref[w.key] = setup.reference.get(w.key, w.ids)
        self._base_short: dict[tuple, float] = {}

    @property
    def model(self):
        return self.s.wb.model

    def _sums(self, w: Window, upto=None):
        nll, kld = window_sums(self.model, w, self.s.chunk, self._ref.get(w.key), upto)
        return nll, (kld if self.s.objective == "kld" else nll)

    def _spread(self, fn, windows: list[Window]) -> list:
        """[fn(w) for w in windows]: alone, in order; with several processes, the windows split over them by
        length (Ranks.spread) and every result gathered, in window order, on every process."""
        from qroar.distributed import Ranks

        return (self.ranks or Ranks()).spread(lambda ws: [fn(w) for w in ws], windows, cost=lambda w: max(w.cuts))

    def aggregate(self, windows, theta) -> tuple[torch.Tensor, dict[int, float], dict[int, float]]:
        """(objective, log-ppl per length, measure per length) of `windows` under theta, without gradients.
        Several processes: each computes its share of the windows; the sums are taken in window order on
        every process, so the result is the one process's, bit for bit."""

        def sums(w):
            nll, m = self._sums(w)
            return {L: (float(nll[L]), float(m[L])) for L in nll}

        with torch.no_grad(), ScaleHooks(self.model, self.bands, self.mode, theta):
            per_window = self._spread(sums, windows)
        acc: dict[int, list] = {}
        for per_length in per_window:
            for L, (n, x) in per_length.items():
                a = acc.setdefault(L, [0.0, 0.0, 0])
                a[0], a[1], a[2] = a[0] + n, a[1] + x, a[2] + L - 1
        logp = {L: a[0] / a[2] for L, a in sorted(acc.items())}
        meas = {L: a[1] / a[2] for L, a in sorted(acc.items())}
        lw = length_weights(meas, self.s.weights)
        return sum(lw[L] * meas[L] for L in meas), logp, meas

    def base_short(self, w: Window) -> float:
        """The unscaled model's log-ppl of the window's short prefix (computed once, no gradients)."""
        if w.key not in self._base_short:
            zero = torch.zeros(1, self.bands.n_bands, dtype=torch.float64)
            with torch.no_grad(), ScaleHooks(self.model, self.bands, self.mode, zero):
                nll, _ = self._sums(w, upto=self.short)
            self._base_short[w.key] = float(nll[self.short]) / (self.short - 1)
        return self._base_short[w.key]

    def step_loss(self, theta, batch: list[Window], guard: bool = True) -> float:
        """Backward of the minibatch objective (+ the guard penalty) into theta.grad, one window at a time
        (checkpointed layers); returns the minibatch objective (without the penalty)."""
        tokens: dict[int, int] = {}
        for w in batch:
            for L in w.cuts:
                tokens[L] = tokens.get(L, 0) + L - 1
        lw = length_weights(tokens, self.s.weights)
        limit = math.log1p(self.s.guard_tol)

        def value_and_grad(w):
            base = self.base_short(w) if guard else None
            with ScaleHooks(self.model, self.bands, self.mode, theta), checkpointed_layers(self.model):
                nll, m = self._sums(w)
                loss = sum(lw[L] * m[L] / tokens[L] for L in m)
                value = float(loss.detach())
                if guard:
                    over = nll[self.short] / (self.short - 1) - base - limit
                    loss = loss + GUARD_WEIGHT * torch.relu(over) / len(batch)
                (g,) = torch.autograd.grad(loss, theta)
            return value, g.detach()

        # every window's value and gradient, summed in window order on every process (the same on each)
        total, grad = 0.0, None
        for value, g in self._spread(value_and_grad, batch):
            total += value
            grad = g.clone() if grad is None else grad + g
        theta.grad = grad if theta.grad is None else theta.grad + grad
        return total

    def value(self, theta) -> float:
        return float(self.aggregate(self.windows, theta)[0])

    def grad(self, theta) -> torch.Tensor:
        """d objective / d theta on all windows (no guard penalty)."""
        t = theta.detach().clone().requires_grad_(True)
        self.step_loss(t, self.windows, guard=False)
        return t.grad.detach().clone()


@contextmanager
def frozen_weights(model):
    """requires_grad off on every parameter (only theta is optimised); put back after."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in before:
            p.requires_grad_(r)


@dataclass
class Outcome:
    theta: torch.Tensor  # (1 or n_layers, B) log-scales of the best checked point
    history: list[dict]
    steps: int
    checks: int


def optimise(problem: Problem, val: Problem, bounds: list[tuple[float, float]], cfg, tie_layers: bool,
             tick=None, check=None, dtype=torch.float64) -> Outcome:
    """Adam on theta with projection onto the bounds, minibatches of cfg.grad_batch windows, a validation
    check every cfg.grad_every steps (early stopping, guard on the validation windows); returns the best
    guarded point seen (theta = 0, no scales, when nothing beats it). tick(kind, msg): one unit of work done;
    check(): raises Cancelled."""
    from qroar.models import attention_layers

    tick = tick or (lambda kind, msg: None)
    check = check or (lambda: None)
    n_layers = 1 if tie_layers else len(attention_layers(problem.model))
    lo = torch.tensor([math.log(a) for a, _ in bounds], dtype=dtype)
    hi = torch.tensor([math.log(b) for _, b in bounds], dtype=dtype)
    theta = torch.zeros(n_layers, len(bounds), dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.grad_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[dict] = []
    tol = math.log1p(cfg.guard_tol)

    def validate(step: int):
        check()
        obj, logp, _ = val.aggregate(val.windows, theta.detach())
        tick("check", f"step {step}: validation objective {obj:.5g}")
        return obj, logp[val.short]

    base_obj, base_short = validate(0)
    best = (base_obj, theta.detach().clone(), 0)
    history.append(dict(step=0, split="val", objective=base_obj, short_log_ppl=base_short, guard_ok=True,
                        incumbent_objective=base_obj, unscaled_short_log_ppl=base_short, docs=len(val.windows)))
    stale, steps, checks = 0, 0, 1
    with frozen_weights(problem.model):
        for step in range(1, cfg.grad_steps + 1):
            check()
            batch = []
            while len(batch) < min(cfg.grad_batch, len(problem.windows)):
                if not order:
                    order = torch.randperm(len(problem.windows), generator=gen).tolist()
                batch.append(problem.windows[order.pop(0)])
            opt.zero_grad()
            train_obj = problem.step_loss(theta, batch)
            opt.step()
            with torch.no_grad():
                theta.copy_(torch.maximum(torch.minimum(theta, hi), lo))  # the bound on each scale
            steps = step
            tick("step", f"step {step}: training objective {train_obj:.5g}")
            history.append(dict(step=step, split="train", objective=train_obj, short_log_ppl=None, guard_ok=None,
                                incumbent_objective=best[0], unscaled_short_log_ppl=None, docs=len(batch)))
            if step % cfg.grad_every == 0 or step == cfg.grad_steps:
                obj, short = validate(step)
                checks += 1
                ok = short <= base_short + tol
                history.append(dict(step=step, split="val", objective=obj, short_log_ppl=short, guard_ok=ok,
                                    incumbent_objective=best[0], unscaled_short_log_ppl=base_short, docs=len(val.windows)))
                if ok and obj < best[0]:
                    best, stale = (obj, theta.detach().clone(), step), 0
                else:
                    stale += 1
                    if stale >= cfg.grad_patience:
                        break
    return Outcome(best[1], history, steps, checks)


# ----------------------------------------------------------------------------- the search strategy


def _split(docs, val_share: float):
    """(train, val) document subsets: every k-th document to validation (k = round(1 / share)); with one
    document, or share 0, both are the same documents (early stopping then watches the training set)."""
    ids = list(docs.doc_ids)
    if val_share <= 0 or len(ids) < 2:
        return docs, docs
    k = max(2, round(1 / val_share))
    val = [d for i, d in enumerate(ids) if i % k == k - 1] or [ids[-1]]
    return docs.subset([d for d in ids if d not in val]), docs.subset(val)


def _ranks(run):
    p = run.parallel
    return p if p is not None and p.world_size > 1 else None


def _evaluate(run, fold: str, docs, scales, limit, what: str) -> dict:
    """run.evaluate; with several processes, from per-document results spread over them (racing's path)
    and counted as one evaluation, the guard applied to the short length."""
    if _ranks(run) is None:
        return run.evaluate(fold, docs, scales, limit, what)
    done = run.done
    e = run.entry(docs, scales, what)
    run.done = done + 1
    if limit is not None and e["short_log_ppl"] > limit:
        e = {**e, "guard_ok": False, "objective": None}
    run.ck.put(fold, scales, e)  # as run.evaluate keeps it: the dev table reads it from there, as in one process
    return e


def problems(run, docs):
    """(train, val) Problems of a search run on docs."""
    from qroar.perplexity import auto_loss_chunk, input_device

    wb, cfg = run.wb, run.cfg
    if run.measure == "kld" and run.reference is None:
        from qroar.fidelity import FPReference

        run.reference = FPReference(wb)
    chunk = auto_loss_chunk(wb.info.vocab_size, input_device(wb.model).type)
    setup = Setup(wb, run.measure, cfg.weights(), cfg.guard_tol, chunk, run.reference)
    train, val = _split(docs, cfg.grad_val)
    mk = lambda c: make_windows(wb.model, wb.tokenizer, c, cfg.lengths, cfg.max_windows_per_doc)  # noqa: E731
    return (Problem(setup, wb.bands, wb.scale_cfg.mode, mk(train), _ranks(run)),
            Problem(setup, wb.bands, wb.scale_cfg.mode, mk(val), _ranks(run)))


def _run_optimise(run, fold, docs, bounds, tie_layers: bool) -> Outcome:
    """The optimisation of one fold; a finished one is kept in the search's checkpoint, so a resumed search
    (same settings, same file) reuses it instead of optimising again."""
    key = f"{fold}:{'shared' if tie_layers else 'layer'}"
    done = run.ck.descents.get(key)
    if done is not None:
        run.done += done["steps"] + done["checks"]
        run.reused_keys.add(f"descent:{key}")
        run._report(f"[{fold}] optimisation of {done['steps']} steps reused from the checkpoint")
        return Outcome(torch.tensor(done["theta"], dtype=torch.float64), list(done["history"]), done["steps"], done["checks"])

    def tick(kind, msg):
        run.done += 1
        run._report(f"[{fold}] {msg}")

    train, val = problems(run, docs)
    with run.wb.variant(run.base):  # the unscaled weights; the hooks carry the scales
        out = optimise(train, val, bounds, run.cfg, tie_layers, tick, run._check)
    run.ck.descents[key] = dict(theta=out.theta.double().tolist(), history=out.history, steps=out.steps, checks=out.checks)
    run.ck.save()
    return out


def _descend(run, fold: str, docs, cands: list[list[float]], history: list, tie_layers: bool):
    bounds = [(min(c), max(c)) for c in cands]
    ones = [1.0] * len(cands)
    base = _evaluate(run, fold, docs, ones, None, f"[{fold}] unscaled quantized baseline")
    out = _run_optimise(run, fold, docs, bounds, tie_layers=tie_layers)
    history += [dict(fold=fold, sweep=0, band=None, g=None, **h) for h in out.history]
    limit = base["short_log_ppl"] + math.log1p(run.cfg.guard_tol)
    theta = out.theta.double()
    for shrink, what in ((1.0, "best validated point"), (0.5, "half its log-scales")):
        if not bool(theta.abs().max() > 0):
            break
        g = torch.exp(shrink * theta)
        scales = [float(x) for x in g[0]] if tie_layers else [[float(x) for x in row] for row in g]
        e = _evaluate(run, fold, docs, scales, limit, f"[{fold}] {what} on every dev document")
        if e["guard_ok"] and e["objective"] is not None and e["objective"] < base["objective"]:
            return scales, e, base
    return ones, base, base


def descend_grad(run, fold: str, docs, cands: list[list[float]], history: list) -> tuple[list, dict, dict]:
    """The strategy "grad": one scale per band shared by all layers, by gradient (module docstring)."""
    return _descend(run, fold, docs, cands, history, tie_layers=True)


def descend_grad_layer(run, fold: str, docs, cands: list[list[float]], history: list) -> tuple[list, dict, dict]:
    """The strategy "grad-layer": one scale per layer and band (per-layer scales), by gradient."""
    return _descend(run, fold, docs, cands, history, tie_layers=False)


def layer_scales(run, fold: str, docs, cands: list[list[float]]) -> torch.Tensor:
    """Per-layer band scales (n_layers, B), float64, of the best validated point: the optimisation of
    descend_grad with one row of theta per layer (the optimisation of the "grad-layer" strategy)."""
    out = _run_optimise(run, fold, docs, [(min(c), max(c)) for c in cands], tie_layers=False)
    return torch.exp(out.theta.double())


def budget(n_docs: int, per_band: list[int], cfg) -> int:
    """Steps + evaluations the strategy can spend: the unscaled baseline, every step, every validation
    check (one at the start, one per grad_every steps and one at the last step), two final evaluations."""
    checks = 1 + cfg.grad_steps // cfg.grad_every + (cfg.grad_steps % cfg.grad_every != 0)
    return (1 + cfg.grad_steps + checks + 2) * (1 + cfg.k_folds)


def dev_passes(n_docs: int, per_band: list[int], cfg) -> float:
    """The budget in passes over every dev document, for the time estimate: a step of grad_batch windows
    with its backward costs about 4 forwards of them (checkpointing recomputes one)."""
    checks = 1 + cfg.grad_steps // cfg.grad_every + 1
    val = max(1, round(n_docs * cfg.grad_val)) if n_docs > 1 else n_docs
    per_fold = 3 + (cfg.grad_steps * 4 * min(cfg.grad_batch, n_docs) + checks * val) / max(n_docs, 1)
    return per_fold * (1 + cfg.k_folds)
