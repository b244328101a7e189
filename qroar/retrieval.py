"""Long-range retrieval: a passkey hidden at a chosen depth of a long context, asked for at the end.

The prompt (`build_prompt`) is exactly L tokens, built from token ids, never by re-tokenizing joined text:

  [BOS] intro  haystack[:a]  needle  haystack[a:F]  question            (L tokens)
  needle = lead + KEY + tail, e.g. " The pass key is" + " 71432" + ". Remember it. 71432 is the pass key."
  question, e.g. " What is the pass key? The pass key is"; the answer is KEY's tokens (after the prompt)

F = L - (BOS + intro + needle + question) haystack tokens, a = round(depth * F) of them before the needle,
so depth 0 puts the needle right after the intro and depth 1 right before the question. The key's tokens
are those it gets when it follows the question's last word in running text (tokenize question + key, keep
what follows the question's own tokens), placed by id in the needle too, so the answer is an exact copy of
ids in the context whatever the tokenizer does with digits (one token per digit, merged digit groups, a
leading-space token). Decoding checks it: the answer must decode to the key, else the tokenizer is refused.

Haystacks (`HAYSTACKS`): "corpus", consecutive tokens of a document of the corpus (embedded documents by
default) from a seeded offset; "filler", the repeated sentences of the classic passkey test. Keys
(`KEYS`): "digits", k random digits (first one not 0); "words", a random pair of common words.

Trials. Trial t of a run with seed s draws, from numpy's generator seeded with (s, t), the key, the
document and the offset; every length and depth of that trial uses the same key and text (only the
needle's place and the amount of text change), and every variant sees the same prompts. The table keeps
seed, trial, doc, offset and key per row, so `build_prompt` (or `prompt_for`) rebuilds any cell's prompt.

Scores per prompt and variant. Teacher-forced: the key's tokens are appended and scored in one forward:
key_logprob = sum of log P(key token | prompt, earlier key tokens), key_prob = exp of it, token_acc = the
fraction of key tokens that are the argmax, exact = all of them are (then greedy decoding reproduces the
key's tokens). Optional greedy generation (`generate`): len(key tokens) + 2 new tokens, exact when the
decoded text starts with the key (followed by a non-alphanumeric character or nothing).
"""

from __future__ import annotations

import inspect
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
from qroar.perplexity import MAX_BATCH_POSITIONS, _decoder, bos_id, input_device, needs_bos, reset_dynamic_rope
from qroar.rope import text_config

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and remember it. I will ask you about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = ("apple", "river", "candle", "mountain", "garden", "silver", "window", "forest", "button", "harbor",
         "pencil", "rabbit", "thunder", "marble", "lantern", "violet", "castle", "meadow", "copper", "island",
         "orange", "pepper", "ladder", "saddle", "blanket", "falcon", "velvet", "anchor", "canyon", "timber",
         "basket", "cotton", "dragon", "feather", "glacier", "helmet", "jacket", "kettle", "lemon", "mirror")
CPU_BATCH_POSITIONS = 8192


@dataclass(frozen=True)
class KeyKind:
    """lead + KEY + tail is the needle; the question ends where the answer (KEY) starts."""

    lead: str
    tail: str  # may hold {key}: the key again, as plain text
    question: str
    label: str


KEYS: dict[str, KeyKind] = {
    "digits": KeyKind(" The pass key is", ". Remember it. {key} is the pass key.", " What is the pass key? The pass key is",
                      "a number of k random digits"),
    "words": KeyKind(" The secret words are", ". Remember them. {key} are the secret words.",
                     " What are the secret words? The secret words are", "a random pair of common words"),
}
HAYSTACKS = {"corpus": "consecutive text of a corpus document from a seeded offset",
             "filler": "the classic repeated filler sentences"}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RetrievalConfig:
    """lengths: prompt lengths in tokens; depths in [0, 1]; trials per (length, depth); key: a KEYS kind;
    digits: its length for "digits"; haystack: a HAYSTACKS kind; corpus: documents for "corpus";
    seed: of the trials; generate: also greedy generation; add_bos None: decided per model."""

    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2
    key: str = "digits"
    digits: int = 5
    haystack: str = "corpus"
    corpus: str = "embedded:heldout"
    seed: int = 0
    generate: bool = False
    add_bos: bool | None = None

    def __post_init__(self):
        for name in ("lengths", "depths"):
            v = getattr(self, name)
            if isinstance(v, (int, float)) or not isinstance(v, (tuple, list)) or not v:
                raise ConfigError(f"{name} must be a non-empty list, got {v!r}.")
        if any(not _is_int(n) or n < 2 for n in self.lengths):
            raise ConfigError(f"Every length must be an integer >= 2 tokens, got {list(self.lengths)}.")
        object.__setattr__(self, "lengths", tuple(sorted(set(int(n) for n in self.lengths))))
        for d in self.depths:
            check_depth(d)
        object.__setattr__(self, "depths", tuple(sorted(set(float(d) for d in self.depths))))
        if not _is_int(self.trials) or self.trials < 1:
            raise ConfigError(f"trials must be a positive integer, got {self.trials!r}.")
        if self.key not in KEYS:
            raise ConfigError(f"Unknown key kind {self.key!r}: choose one of {', '.join(KEYS)}.")
        if not _is_int(self.digits) or not 1 <= self.digits <= 64:
            raise ConfigError(f"digits must be an integer from 1 to 64, got {self.digits!r}.")
        if self.haystack not in HAYSTACKS:
            raise ConfigError(f"Unknown haystack {self.haystack!r}: choose one of {', '.join(HAYSTACKS)}.")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if not isinstance(self.generate, bool) or (self.add_bos is not None and not isinstance(self.add_bos, bool)):
            raise ConfigError("generate is true or false; add_bos is true, false or empty (automatic).")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown retrieval settings: {', '.join(sorted(unknown))}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_depth(d) -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0.0 <= d <= 1.0:
        raise ConfigError(f"A depth is a fraction of the context from 0 (start) to 1 (end), got {d!r}.")
    return float(d)


# ----------------------------------------------------------------------------- building a prompt


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def key_tokens(tokenizer, kind: KeyKind, key: str) -> list[int]:
    """The key's token ids as they follow the question in running text, checked by decoding (spaces aside)."""
    q = _encode(tokenizer, kind.question)
    both = _encode(tokenizer, kind.question + " " + key)
    ids = both[len(q):] if both[:len(q)] == q else _encode(tokenizer, " " + key)
    if not ids or "".join(tokenizer.decode(ids).split()) != "".join(key.split()):  # some decoders space out tokens
        raise DataError(f"This tokenizer does not give the key {key!r} back when decoding its tokens "
                        f"({ids} -> {tokenizer.decode(ids)!r}): use the other key kind or another model.")
    return ids


@dataclass
class Prompt:
    """ids: the prompt (exactly `length` tokens); answer: the key's tokens that follow it;
    key_start: index in ids of the key's first token in the needle; needle_start: of the needle's first
    token; insert: haystack tokens before the needle, of `haystack` in all (insert / haystack ~ depth)."""

    ids: torch.Tensor
    answer: torch.Tensor
    key: str
    key_start: int
    needle_start: int
    insert: int
    haystack: int
    depth: float


def overhead(tokenizer, kind: str, key: str, bos: int | None = None) -> dict[str, int]:
    """Tokens of each fixed part of a prompt: bos, intro, needle, question (the rest is haystack)."""
    k = KEYS[kind]
    ans = key_tokens(tokenizer, k, key)
    return {"bos": int(bos is not None), "intro": len(_encode(tokenizer, INTRO)),
            "needle": len(_encode(tokenizer, k.lead)) + len(ans) + len(_encode(tokenizer, k.tail.format(key=key))),
            "question": len(_encode(tokenizer, k.question))}


def build_prompt(tokenizer, length: int, depth: float, key: str, haystack_ids, kind: str = "digits",
                 bos: int | None = None) -> Prompt:
    """The prompt of exactly `length` tokens with `key` at `depth` (module docstring); haystack_ids: at
    least as many filler tokens as the prompt leaves (the first ones are used)."""
    depth = check_depth(depth)
    if kind not in KEYS:
        raise ConfigError(f"Unknown key kind {kind!r}: choose one of {', '.join(KEYS)}.")
    if not isinstance(key, str) or not key.strip() or key != key.strip():
        raise ConfigError(f"The key must be non-empty text without surrounding spaces, got {key!r}.")
    if not _is_int(length) or length < 2:
        raise ConfigError(f"The length must be an integer >= 2 tokens, got {length!r}.")
    k = KEYS[kind]
    answer = key_tokens(tokenizer, k, key)
    intro, question = _encode(tokenizer, INTRO), _encode(tokenizer, k.question)
    lead, tail = _encode(tokenizer, k.lead), _encode(tokenizer, k.tail.format(key=key))
    head = ([bos] if bos is not None else []) + intro
    fixed = len(head) + len(question)
    needle = lead + answer + tail
    if length < fixed:
        raise ConfigError(f"Length {length} is shorter than the question: the {'BOS, ' if bos is not None else ''}"
                          f"intro and question alone take {fixed} tokens, and with the key's sentence a prompt needs "
                          f"at least {fixed + len(needle)}. Choose a longer length.")
    F_ = length - fixed - len(needle)
    if F_ < 0:
        raise ConfigError(f"The key {key!r} is too long for length {length}: with its sentence ({len(needle)} tokens) "
                          f"the prompt needs at least {fixed + len(needle)} tokens. Use a shorter key or a longer length.")
    hay = torch.as_tensor(haystack_ids, dtype=torch.long).flatten()
    if hay.numel() < F_:
        raise DataError(f"The haystack has {hay.numel()} tokens; a prompt of {length} tokens needs {F_}. "
                        "Use a longer document or the filler haystack.")
    a = int(round(depth * F_))
    ids = torch.cat([torch.tensor(head, dtype=torch.long), hay[:a], torch.tensor(needle, dtype=torch.long),
                     hay[a:F_], torch.tensor(question, dtype=torch.long)])
    ns = len(head) + a
    return Prompt(ids=ids, answer=torch.tensor(answer, dtype=torch.long), key=key, key_start=ns + len(lead),
                  needle_start=ns, insert=a, haystack=F_, depth=depth)


def draw_key(rng: np.random.Generator, kind: str, digits: int) -> str:
    if kind == "digits":
        return str(int(rng.integers(1, 10))) + "".join(str(int(x)) for x in rng.integers(0, 10, digits - 1))
    a, b = rng.choice(len(WORDS), size=2, replace=False)
    return f"{WORDS[a]} {WORDS[b]}"


def filler_ids(tokenizer, n: int) -> torch.Tensor:
    one = _encode(tokenizer, FILLER)
    return torch.tensor(one * (n // len(one) + 1), dtype=torch.long)[:n]


def trial_plan(cfg: RetrievalConfig, docs: list[tuple[str, torch.Tensor]] | None) -> list[dict]:
    """Per trial: seed, trial, key, and for a corpus haystack the document and offset (module docstring)."""
    longest = max(cfg.lengths)
    out = []
    for t in range(cfg.trials):
        rng = np.random.default_rng([cfg.seed, t])
        spec = {"seed": cfg.seed, "trial": t, "key": draw_key(rng, cfg.key, cfg.digits), "doc": None, "offset": 0}
        if cfg.haystack == "corpus":
            ok = [i for i, (_, toks) in enumerate(docs or []) if toks.numel() >= longest]
            if not ok:
                raise DataError(f"No document of {cfg.corpus} has the {longest} tokens a haystack at length {longest} "
                                "may need: choose shorter lengths, another corpus, or the filler haystack.")
            i = ok[int(rng.integers(len(ok)))]
            spec["doc"], spec["offset"] = docs[i][0], int(rng.integers(0, docs[i][1].numel() - longest + 1))
        out.append(spec)
    return out


def prompt_for(tokenizer, cfg: RetrievalConfig, spec: dict, length: int, depth: float, docs=None,
               bos: int | None = None) -> Prompt:
    """The prompt of one cell from its trial spec (as stored in a result's rows)."""
    if cfg.haystack == "corpus":
        toks = dict(docs or [])
        if spec["doc"] not in toks:
            raise DataError(f"Document {spec['doc']!r} of this trial is not in the corpus given.")
        hay = toks[spec["doc"]][spec["offset"]:spec["offset"] + length]
    else:
        hay = filler_ids(tokenizer, length)
    return build_prompt(tokenizer, length, depth, spec["key"], hay, cfg.key, bos)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def teacher_forced(model, prompts: list[Prompt]) -> list[dict]:
    """key_logprob, key_prob, token_acc, exact and the per-token log-probs of each prompt's key, one forward
    per prompt (batched when lengths agree); the output head runs on the key's positions only."""
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    dev = input_device(model)
    budget = MAX_BATCH_POSITIONS if dev.type == "cuda" else CPU_BATCH_POSITIONS
    out: list[dict | None] = [None] * len(prompts)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.ids.numel(), p.answer.numel()), []).append(i)
    for (L, k), idx in groups.items():
        step = max(1, budget // (L + k))
        for a in range(0, len(idx), step):
            part = idx[a:a + step]
            x = torch.stack([torch.cat([prompts[i].ids, prompts[i].answer[:-1]]) for i in part])
            reset_dynamic_rope(model)
            h = _decoder(model)(input_ids=x.to(dev), use_cache=False).last_hidden_state[:, L - 1:L - 1 + k]
            logits = head(h.to(head.weight.device)).float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            logp = F.log_softmax(logits, dim=-1).cpu()  # (B, k, V)
            for b, i in enumerate(part):
                y = prompts[i].answer
                lp = logp[b].gather(1, y[:, None])[:, 0]
                hit = logp[b].argmax(-1) == y
                out[i] = {"key_logprob": float(lp.sum()), "key_prob": math.exp(float(lp.sum())),
                          "token_acc": float(hit.double().mean()), "exact": bool(hit.all()),
                          "token_logprobs": [float(v) for v in lp]}
    return out


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n_new: int) -> list[int]:
    """n_new greedily generated token ids after the prompt ids (L,), with the KV cache."""
    dev = input_device(model)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in transformers 5.2x
    reset_dynamic_rope(model)
    o = model(input_ids=ids[None].to(dev), use_cache=True, logits_to_keep=1)
    out = [int(o.logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        past = getattr(o, key, None)
        o = model(input_ids=torch.tensor([[out[-1]]], device=dev), use_cache=True, **{key: past})
        out.append(int(o.logits[0, -1].argmax()))
    return out


def generated_match(text: str, key: str) -> bool:
    """The generated text starts with the key (after spaces), followed by nothing or a non-alphanumeric character."""
    t = " ".join(text.split())
    return t.startswith(key) and (len(t) == len(key) or not t[len(key)].isalnum())


# ----------------------------------------------------------------------------- the run


@dataclass
class RetrievalResult:
    """trials: one row per (variant, length, depth, trial) with the prompt's spec and the scores;
    summary: one row per (variant, length, depth): means over trials."""

    trials: pd.DataFrame
    summary: pd.DataFrame
    settings: dict

    def to_dict(self) -> dict:
        rec = lambda df: df.to_dict(orient="records")  # noqa: E731
        return {"settings": self.settings, "summary": rec(self.summary), "trials": rec(self.trials)}


SUMMARY_COLUMNS = ["variant", "length", "depth", "trials", "token_acc", "exact", "key_logprob", "key_prob", "gen_exact"]


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    g = trials.groupby(["variant", "length", "depth"], sort=False)
    s = g.agg(trials=("trial", "size"), token_acc=("token_acc", "mean"), exact=("exact", "mean"),
              key_logprob=("key_logprob", "mean"), key_prob=("key_prob", "mean"),
              gen_exact=("gen_exact", "mean")).reset_index()
    return s[SUMMARY_COLUMNS]


def plan_prompts(wb, cfg: RetrievalConfig) -> tuple[list[tuple], list[Prompt], int | None]:
    """Every cell (length, depth, trial spec) and its prompt, and the BOS id used (None: no BOS). Builds
    them all, so a setting no prompt can satisfy is refused here, before any model work."""
    tok = wb.tokenizer
    if tok is None:
        raise ConfigError("Passkey retrieval needs the model's tokenizer, and this model has none.")
    use_bos = cfg.add_bos if cfg.add_bos is not None else needs_bos(tok, wb.model)
    bos = bos_id(tok, wb.model) if use_bos else None
    docs = None
    if cfg.haystack == "corpus":
        c = wb.corpus(cfg.corpus)
        docs = list(zip(c.doc_ids, c.tokens))
    plan = trial_plan(cfg, docs)
    cells = [(L, d, spec) for L in cfg.lengths for d in cfg.depths for spec in plan]
    return cells, [prompt_for(tok, cfg, spec, L, d, docs, bos) for L, d, spec in cells], bos


def run(wb, cfg: RetrievalConfig, variants=("fp", "quant", "quant_scaled", "fp_scaled"),
        progress: Callable[[float, str], None] | None = None, cancel: threading.Event | None = None) -> RetrievalResult:
    """Every (length, depth, trial) prompt for each available variant of `variants` (module docstring).
    Prompts are built (and every bad setting refused) before the model runs; the model is left as it was."""
    t0 = time.time()
    avail = wb.available_variants()
    todo = [v for v in dict.fromkeys(variants) if v in avail]
    if not todo:
        raise ConfigError(f"None of {', '.join(variants)} is available on this workbench ({', '.join(avail)}).")
    model, tok = wb.model, wb.tokenizer
    cells, prompts, bos = plan_prompts(wb, cfg)
    rows = []
    total = len(todo) * len(cfg.lengths)
    for vi, v in enumerate(todo):
        with wb.variant(v):
            for li, L in enumerate(cfg.lengths):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Retrieval run cancelled; the model is unchanged.")
                idx = [i for i, (Lc, _, _) in enumerate(cells) if Lc == L]
                scores = teacher_forced(model, [prompts[i] for i in idx])
                for i, s in zip(idx, scores):
                    _, d, spec = cells[i]
                    p = prompts[i]
                    row = {"variant": v, "length": L, "depth": d, **spec, "insert": p.insert, "haystack": p.haystack,
                           "key_start": p.key_start, "key_tokens": p.answer.numel(), **s,
                           "generated": None, "gen_exact": float("nan")}
                    if cfg.generate:
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("Retrieval run cancelled; the model is unchanged.")
                        text = tok.decode(greedy(model, p.ids, p.answer.numel() + 2))
                        row["generated"], row["gen_exact"] = text, float(generated_match(text, p.key))
                    rows.append(row)
                if progress is not None:
                    progress((vi * len(cfg.lengths) + li + 1) / total, f"{v}: length {L}")
    trials = pd.DataFrame(rows)
    settings = {"config": cfg.to_dict(), "variants": todo, "bos": bos is not None, "pi": wb.pi.to_dict(),
                "trained_context": wb.info.trained_context, "seconds": round(time.time() - t0, 3)}
    return RetrievalResult(trials=trials, summary=summarize(trials), settings=settings)


def paired_change(trials: pd.DataFrame, variant: str = "quant_scaled", base: str = "quant",
                  col: str = "key_logprob") -> pd.DataFrame:
    """Per (length, depth): the mean over trials of `variant`'s col minus `base`'s on the same prompts
    (e.g. PTQ + scales minus PTQ), with the number of paired trials."""
    keys = ["length", "depth", "trial"]
    a = trials[trials["variant"] == variant].set_index(keys)[col]
    b = trials[trials["variant"] == base].set_index(keys)[col]
    d = (a.astype(float) - b.astype(float)).dropna().rename("change").reset_index()
    if d.empty:
        raise ConfigError(f"No prompts scored for both {variant} and {base}: run both variants.")
    return d.groupby(["length", "depth"]).agg(change=("change", "mean"), trials=("change", "size")).reset_index()


def format_result(r: RetrievalResult) -> str:
    """Per variant, length x depth tables of teacher-forced key token accuracy and mean key log-probability
    (and greedy exact match when generated), for the CLI."""
    lines = []
    s = r.summary
    for v, g in s.groupby("variant", sort=False):
        for name, col in (("teacher-forced key token accuracy", "token_acc"), ("mean key log-prob", "key_logprob"),
                          *((("greedy exact match", "gen_exact"),) if r.settings["config"]["generate"] else ())):
            piv = g.pivot(index="length", columns="depth", values=col)
            lines.append(f"{v}: {name} (rows: length, columns: depth)")
            lines.append(piv.to_string(float_format=lambda x: f"{x:.3f}"))
    return "\n".join(lines)
