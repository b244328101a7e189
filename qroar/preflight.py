"""Checks that run before a model's weights load, so an input a user got wrong fails in seconds.

Loading and quantizing a model takes from seconds to minutes; a typo in a corpus path or a length
list should not wait for it. `check(args, command)` runs first in every CLI command and reads only
what is cheap: the model's name, its config.json and tokenizer (a preset or local folder, a random
shape, or a hub id's cached or downloaded config), the corpora's text and tokens (data.tokenize
caches them, so the run that follows does not tokenize them again). It checks:

  model name   a bare unknown name fails at once with the presets and the nearest one; a hub id goes
               to the hub only when it is on, else to the hub cache (models.resolve)
  --lengths    integers >= 2; a length longer than every document is skipped with a warning, and
               when every length is, the run stops here (diagnose: --capture-length)
  group size   divides every linear input width in scope, read from config.json: hidden_size,
               num_attention_heads * head_dim (o_proj), intermediate_size (down_proj)
  corpora      --corpus, --dev-corpus, --heldout-corpus (and the recipe's --calib for gptq/awq) exist and read as text
  windows      --max-windows 0 means all windows (None downstream); negative is refused

Then eval, apply and search print their plan: forward windows x tokens and, on a CPU, a time
estimated from the model's FLOPs and a matmul rate measured here in a fraction of a second.

It rewrites args.lengths (and --length-weights) to the lengths that will run and args.max_windows
to what the engine takes. Anything it cannot read cheaply (an exotic config, a tokenizer without
tokenizer.json that fails to load) is left to the full load, which checks everything again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qroar.errors import ConfigError, DataError, ModelError

HEAVY_SECONDS = 60  # a plan estimated longer than this says how to make it shorter


# ----------------------------------------------------------------------------- the model, without its weights


@dataclass(frozen=True)
class ModelSpec:
    """What config.json and the tokenizer say about a model, read without its weights."""

    name: str
    config: dict  # the decoder's config (text_config of a multimodal wrapper)
    tokenizer: object | None  # tokenizers.Tokenizer, a transformers tokenizer, or None (not readable cheaply)
    bos: bool  # windows start with BOS (perplexity.needs_bos's rule)

    def get(self, key, default=None):
        return self.config.get(key, default)

    @property
    def trained_context(self) -> int | None:
        rp = self.get("rope_parameters") or self.get("rope_scaling") or {}
        if rp and not ("rope_type" in rp or "rope_theta" in rp or "type" in rp):  # keyed by layer type (Gemma 3)
            rp = rp.get("full_attention") or next((v for v in rp.values() if isinstance(v, dict)), {})
        n = rp.get("original_max_position_embeddings") or self.get("max_position_embeddings")
        return int(n) if n else None

    @property
    def attn_width(self) -> int | None:
        h, nh = self.get("hidden_size"), self.get("num_attention_heads")
        hd = self.get("head_dim") or (h // nh if h and nh else None)
        return nh * hd if nh and hd else None

    def input_widths(self, scope: str) -> list[tuple[int, str]]:
        """(input width, the linears that take it) for the quantization scope, as far as config.json says."""
        out = []
        if self.get("hidden_size"):
            out.append((self.get("hidden_size"), "hidden_size: q/k/v" + ("" if scope in ("attention", "qk") else ", gate/up")))
        if scope in ("linear", "attention") and self.attn_width:
            out.append((self.attn_width, "num_attention_heads x head_dim: o_proj"))
        moe = any(self.get(k) for k in ("num_experts", "num_local_experts", "moe_intermediate_size", "n_routed_experts"))
        if scope == "linear" and self.get("intermediate_size") and not moe:  # experts have widths of their own
            out.append((self.get("intermediate_size"), "intermediate_size: down_proj"))
        return out

    def flops_per_token(self, length: int) -> float | None:
        """Forward FLOPs per token at a context length: 2 x the linear weights (decoder and head) plus
        the attention scores and values over the causal half of the window."""
        h, i, n, v = (self.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
        nh = self.get("num_attention_heads")
        if not (h and i and n and v and nh and self.attn_width):
            return None
        nkv = self.get("num_key_value_heads") or nh
        kv = self.attn_width // nh * nkv
        linear = n * (h * self.attn_width + 2 * h * kv + self.attn_width * h + 3 * h * i) + v * h
        return 2.0 * linear + 4.0 * n * self.attn_width * length / 2


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _hub_files(repo: str) -> Path:
    """The folder holding a hub model's config and tokenizer files: downloaded when the hub is on, else
    from the hub cache (models.resolve has refused an offline id that is not cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from qroar import models

    offline = models.hub_offline()
    if not offline:
        print(f"note: {models.not_found(repo)} Trying the Hugging Face hub for {repo} "
              "(HF_HUB_OFFLINE=1 stays off the network).", file=sys.stderr)
    try:
        folder = Path(hf_hub_download(repo, "config.json", local_files_only=offline)).parent
    except Exception as e:  # not found, unreachable, gated: all mean it cannot be used
        raise ModelError(f"Could not find {repo} on the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"{models.not_found(repo)}") from e
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        try:
            hf_hub_download(repo, name, local_files_only=offline)
        except EntryNotFoundError:
            pass
        except Exception:  # the full load will say what is wrong with the tokenizer
            break
    return folder


def read_model(name: str) -> ModelSpec | None:
    """The model's config and tokenizer, cheaply; None when its config cannot be read that way."""
    from qroar import models

    name = (name or "").strip()
    if name.startswith("random:"):
        shape = models.RANDOM_SHAPES.get(name.split(":", 1)[1])
        if shape is None:
            raise ModelError(f"Unknown random shape {name.split(':', 1)[1]!r}: choose one of {', '.join(models.RANDOM_SHAPES)}.")
        folder = models.EMBEDDED_MODEL
        config = {**shape, "rope_parameters": {"rope_type": "default", "rope_theta": shape["rope_theta"]}}
    else:
        src, name = models.resolve(name)
        folder = src if isinstance(src, Path) else _hub_files(src)
        config = _read_json(folder / "config.json")
        config = config.get("text_config") or config
    if not config.get("hidden_size"):
        return None
    tok, bos = _read_tokenizer(folder, config)
    return ModelSpec(name, config, tok, bos)


def _read_tokenizer(folder: Path, config: dict):
    """(tokenizer, bos): tokenizer.json through `tokenizers` (milliseconds), else transformers (seconds)."""
    tc = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    gemma = str(config.get("model_type", "")).startswith("gemma")
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:
            return None, False
        bos_tok = tc.get("bos_token")
        bos_tok = bos_tok.get("content") if isinstance(bos_tok, dict) else bos_tok
        bos_id = tok.token_to_id(bos_tok) if bos_tok else None
        if bos_id is None:
            return tok, False
        if gemma:
            return tok, True
        if "add_bos_token" in tc:
            return tok, bool(tc["add_bos_token"])
        return tok, tok.encode("a").ids[:1] == [bos_id]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:  # the full load reports it
        return None, False
    if getattr(tok, "bos_token_id", None) is None:
        return tok, False
    return tok, gemma or tok.encode("a")[:1] == [tok.bos_token_id]


# ----------------------------------------------------------------------------- settings


def parse_lengths(text, flag: str = "--lengths") -> tuple[int, ...] | None:
    """Comma-separated context lengths, each an integer >= 2; None for an empty setting."""
    if text is None or not str(text).strip():
        return None
    try:
        out = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"{flag} expects comma-separated integers (e.g. 256,1024,2048), got {text!r}.") from e
    bad = [n for n in out if n < 2]
    if not out or bad:
        raise ConfigError(f"{flag} needs context lengths of at least 2 tokens, e.g. 256,1024; got {text!r}.")
    return tuple(dict.fromkeys(out))


def parse_weights(text, n_lengths: int) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--length-weights expects comma-separated numbers, got {text!r}.") from e
    if len(w) != n_lengths:
        raise ConfigError(f"--length-weights gives {len(w)} weights for {n_lengths} lengths: give one per length.")
    return w


def max_windows(v) -> int | None:
    """--max-windows: a positive number per document and length, or 0 (or empty) for all of them."""
    if v is None or v == 0:
        return None
    if not isinstance(v, int) or v < 0:
        raise ConfigError(f"--max-windows must be a positive number of windows per document, or 0 for all; got {v!r}.")
    return v


def check_group_size(spec: ModelSpec, group_size: int, scope: str, what: str = "--group-size") -> None:
    """quant.check_group_size from config.json: the same message, before the weights exist."""
    from qroar.quant import _divisor_hint

    if group_size is None or group_size <= 0:
        return
    for width, where in spec.input_widths(scope):
        if width % group_size:
            raise ConfigError(f"{what} {group_size} does not divide the input width {width} of {spec.name} "
                              f"({where}); {_divisor_hint(width)}")


# ----------------------------------------------------------------------------- corpora and lengths


@dataclass(frozen=True)
class Tokens:
    """One corpus's documents as token counts."""

    spec: str
    doc_ids: list
    sizes: list

    def longest(self) -> tuple[str, int]:
        i = max(range(len(self.sizes)), key=self.sizes.__getitem__)
        return self.doc_ids[i], self.sizes[i]


def read_corpus(spec: str):
    from qroar import data

    return data.load_corpus(spec)


def tokens_of(spec: str, docs, model: ModelSpec | None) -> Tokens | None:
    from qroar import data

    if model is None or model.tokenizer is None:
        return None
    return Tokens(spec, [d.id for d in docs], [int(t.numel()) for t in data.tokenize(docs, model.tokenizer)])


def need(length: int, bos: bool) -> int:
    """Document tokens one window of `length` takes (perplexity.make_windows)."""
    return length - 1 if bos else length


def fit_lengths(lengths, corpora: list[Tokens], bos: bool, what: str = "--lengths") -> tuple[tuple[int, ...], list[str]]:
    """(lengths some document of every corpus can fill, one warning per length left out).
    DataError when no length is left."""
    kept, warnings = [], []
    for L in lengths:
        short = [c for c in corpora if max(c.sizes, default=0) < need(L, bos)]
        if not short:
            kept.append(L)
            continue
        doc, n = short[0].longest() if short[0].sizes else ("(none)", 0)
        warnings.append(f"skipping length {L}: the longest document of {short[0].spec}, {doc!r}, has {n} tokens "
                        f"(one window of {L} needs {need(L, bos)}).")
    if not kept:
        c = min(corpora, key=lambda c: max(c.sizes, default=0))
        doc, n = c.longest() if c.sizes else ("(none)", 0)
        top = n + 1 if bos else n
        raise DataError(f"Every length in {what} ({', '.join(map(str, lengths))}) is longer than every document of "
                        f"{c.spec}: the longest, {doc!r}, has {n} tokens. Use lengths up to {top}, or longer documents.")
    return tuple(kept), warnings


def windows_count(size: int, length: int, bos: bool, stride: int | None, cap: int | None) -> int:
    """Windows one document gives at one length (perplexity.make_windows)."""
    span = need(length, bos)
    n = 0 if size < span else (size - span) // (stride or span) + 1
    return n if cap is None else min(n, cap)


# ----------------------------------------------------------------------------- cost


_RATES: dict = {}  # (rows, cols, device) -> (time measured, FLOP/s): a page asking every rerun measures once a minute


def measure_flops_cached(rows: int, cols: int, device: str = "cpu", max_age: float = 60.0) -> float:
    hit = _RATES.get((rows, cols, device))
    if hit is None or time.time() - hit[0] > max_age:
        hit = _RATES[(rows, cols, device)] = (time.time(), measure_flops(rows, cols, device))
    return hit[1]


def measure_flops(rows: int, cols: int, device: str = "cpu", bursts: int = 8, seconds: float = 0.03) -> float:
    """FLOP/s of a (512, rows) x (rows, cols) matmul here and now, with torch's threads: the best of a
    few short bursts (one preemption does not count; a machine busy throughout still reads slower)."""
    import torch

    from qroar.models import pick_device

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(512, rows, device=dev, dtype=dtype)
    b = torch.randn(rows, cols, device=dev, dtype=dtype)
    (a @ b).sum().item()  # warm-up
    best = 0.0
    for _ in range(bursts):
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            (a @ b).sum().item()
            n += 1
        best = max(best, 2.0 * 512 * rows * cols * n / (time.perf_counter() - t0))
    return best


# A forward takes this many times the matmul-rate time of its FLOPs (norms, RoPE, softmax and the loss
# are not matmuls): 1.4-1.8 on qroar-tiny, CPU, lengths 256-2048 (bench/estimate.py --threads 1); with
# two threads on a busy 2-core machine it swings from 0.6 to 3.5, so the line says "about".
CPU_OVERHEAD = 1.7


def estimate_seconds(spec: ModelSpec, forwards: list[tuple[int, int]], device: str = "cpu") -> float | None:
    """Seconds for forwards [(windows, length)] on the CPU, from the model's FLOPs and a measured matmul
    rate; None on a GPU (small models there are bound by kernel launches, not FLOPs) or when unknown."""
    from qroar.models import pick_device

    if not forwards or spec.flops_per_token(1) is None or pick_device(device).type != "cpu":
        return None
    flops = sum(w * L * spec.flops_per_token(L) for w, L in forwards)
    rate = measure_flops_cached(spec.get("hidden_size"), spec.get("intermediate_size") or spec.get("hidden_size"), "cpu")
    return CPU_OVERHEAD * flops / rate


def eval_forwards(sizes: list[int], lengths, bos: bool, stride: int | None, cap: int | None) -> list[tuple[int, int]]:
    """[(windows, length)] one pass of perplexity runs over documents of `sizes` tokens."""
    return [(sum(windows_count(n, L, bos, stride, cap) for n in sizes), L) for L in lengths]


def spec_of_loaded(name: str, config: dict, tokenizer, model) -> ModelSpec:
    """A ModelSpec for a model already in memory (its config as a dict, the BOS rule from the model)."""
    from qroar.perplexity import needs_bos

    config = config.get("text_config") or config
    return ModelSpec(name, config, tokenizer, needs_bos(tokenizer, model))


def cost_text(spec: ModelSpec, forwards: list[tuple[int, int]], passes: float, device: str = "cpu",
              pace: float | None = None, at_most: bool = False) -> str:
    """'N tokens forward; about T ...': the measured pace (tokens/s of an earlier run of this model here) when
    known, else the FLOP estimate on a CPU; on a GPU without a pace, the token count alone."""
    tokens = int(passes * sum(w * L for w, L in forwards))
    about = "at most about" if at_most else "about"
    if pace:
        return f"{tokens:,} tokens forward; {about} {_duration(tokens / pace)} at the pace of the last run"
    secs = estimate_seconds(spec, [(w * passes, L) for w, L in forwards], device)
    if secs is None:
        return f"{tokens:,} tokens forward"
    return f"{tokens:,} tokens forward; {about} {_duration(secs)} on this CPU (estimated from its matmul speed)"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def plan_line(what: str, forwards: list[tuple[int, int]], passes: int, seconds: float | None) -> str:
    """'plan: ...' naming the forward windows x tokens per pass and in all, and the estimated time."""
    per = ", ".join(f"{w} x {L}" for w, L in forwards if w)
    tokens = passes * sum(w * L for w, L in forwards)
    eta = f"; about {_duration(seconds)} on this CPU" if seconds is not None else ""
    return f"plan: {what}: {passes} x ({per}) windows x tokens = {tokens:,} tokens forward{eta}"


# ----------------------------------------------------------------------------- per command


def _say(a, msg: str, stream=None) -> None:
    if getattr(a, "distributed", False) and os.environ.get("RANK", "0") not in ("", "0"):
        return  # under torchrun every process runs the checks; one says what they found
    print(msg, file=stream or sys.stdout, flush=True)


def _recipe_quant(recipe, spec: ModelSpec | None, calib: str | None = None, what: str = "--group-size") -> None:
    """The recipe's group size against the model's widths; its calibration corpus, when it has one, readable."""
    if spec is not None and recipe.quantized:
        check_group_size(spec, recipe.quant.group_size, recipe.quant.scope, what)
    if recipe.calibrated:
        read_corpus(calib or recipe.calib)


def _fit_corpus(a, docs, spec: ModelSpec | None, lengths):
    """(token counts of --corpus, the lengths some document fills): a warning per length left out, and
    a.lengths set to the kept ones; None when the lengths or the tokenizer are not known before loading."""
    toks = tokens_of(a.corpus, docs, spec)
    if lengths is None or toks is None:
        return None
    lengths, warnings = fit_lengths(lengths, [toks], spec.bos)
    for w in warnings:
        _say(a, f"warning: {w}", sys.stderr)
    a.lengths = ",".join(map(str, lengths))
    return toks, lengths


def _eval_like(a, spec: ModelSpec | None, docs, lengths, variants: int) -> None:
    """eval and apply: lengths that fit the corpus, windows, the plan."""
    from qroar.perplexity import EvalConfig

    fit = _fit_corpus(a, docs, spec, lengths)
    if fit is None:
        return
    toks, lengths = fit
    EvalConfig(lengths=lengths, stride=a.stride, max_windows_per_doc=a.max_windows, batch_size=a.batch_size)
    forwards = eval_forwards(toks.sizes, lengths, spec.bos, a.stride, a.max_windows)
    secs = estimate_seconds(spec, forwards * variants, a.device)
    _say(a, plan_line(f"{variants} variant{'s' * (variants != 1)} on {len(toks.sizes)} documents of {a.corpus}",
                      forwards, variants, secs))
    if secs is not None and secs > HEAVY_SECONDS:
        _say(a, f"  ({'all windows' if a.max_windows is None else f'up to {a.max_windows} windows per document and length'}; "
             "--max-windows N changes that, Ctrl-C stops)")


def check_eval(a) -> None:
    from qroar.recipe import Recipe

    recipe = Recipe.from_args(a)
    lengths = parse_lengths(a.lengths)
    a.max_windows = max_windows(a.max_windows)
    docs = read_corpus(a.corpus)  # before the model: a missing path fails before anything else is read
    spec = read_model(a.model)
    _recipe_quant(recipe, spec)
    if lengths is None and spec is not None and spec.trained_context:
        lengths = tuple(spec.trained_context * k for k in (1, 4, 8))
    # fp; quant with a quantizer; quant_scaled with a quantizer and scales (cli.cmd_eval)
    variants = 1 + recipe.quantized + (recipe.quantized and recipe.scales is not None)
    _eval_like(a, spec, docs, lengths, variants)


def _scales_model(a, sf) -> str:
    """The model apply/export open: --model, else the scales file's source folder if it exists, else its name."""
    src = sf.model.get("source")
    return a.model or (src if src and Path(src).exists() else sf.model["name"])


def check_apply(a) -> None:
    from qroar.export import load_scales

    lengths = parse_lengths(a.lengths)
    a.max_windows = max_windows(a.max_windows)
    sf = load_scales(a.scales)
    docs = read_corpus(a.corpus)
    spec = read_model(_scales_model(a, sf))
    _recipe_quant(sf.recipe, spec, a.calib, f"{a.scales}: group size")
    if lengths is None:
        lengths = tuple((sf.raw.get("search") or {}).get("lengths") or ()) or None
        if lengths is None and spec is not None and spec.trained_context:
            lengths = tuple(spec.trained_context * k for k in (1, 4, 8))
    # fp, quant, fp_scaled, quant_scaled with a quantizer; fp and fp_scaled without
    _eval_like(a, spec, docs, lengths, 4 if sf.recipe.quantized else 2)


def check_export(a) -> None:
    from qroar.export import FORMATS, load_scales

    sf = load_scales(a.scales)
    spec = read_model(_scales_model(a, sf))
    if FORMATS[a.format].needs_quantizer:
        _recipe_quant(sf.recipe, spec, a.calib, f"{a.scales}: group size")


def check_diagnose(a) -> None:
    from qroar.recipe import Recipe

    recipe = Recipe.from_args(a)
    spec = read_model(a.model)
    _recipe_quant(recipe, spec)
    docs = read_corpus(a.corpus)
    toks = tokens_of(a.corpus, docs, spec)
    L = a.capture_length or (2 * spec.trained_context if spec is not None and spec.trained_context else None)
    if toks is not None and L:
        fit_lengths((L,), [toks], spec.bos, "--capture-length")


def check_search(a) -> None:
    from qroar.recipe import Recipe
    from qroar.search import search_config_from_args

    recipe = Recipe.from_args(a)
    lengths = parse_lengths(a.lengths)
    weights = parse_weights(a.length_weights, len(lengths)) if lengths else None
    a.max_windows = max_windows(a.max_windows)
    spec = read_model(a.model)
    _recipe_quant(recipe, spec)
    n_layers = spec.get("num_hidden_layers") if spec is not None else None
    if getattr(a, "strategy", None) == "layer" and n_layers:
        from qroar.search import layer_groups

        layer_groups(int(n_layers), a.layer_groups)  # more groups than layers: refused before the weights load
    dev_docs, held_docs = read_corpus(a.dev_corpus), read_corpus(a.heldout_corpus)
    if lengths is None and spec is not None and spec.trained_context:
        lengths = (spec.trained_context, 4 * spec.trained_context)
        weights = parse_weights(a.length_weights, len(lengths))
    dev, held = tokens_of(a.dev_corpus, dev_docs, spec), tokens_of(a.heldout_corpus, held_docs, spec)
    if lengths is None or dev is None:
        return
    kept, warnings = fit_lengths(lengths, [dev, held], spec.bos)
    for w in warnings:
        _say(a, f"warning: {w}", sys.stderr)
    a.lengths = ",".join(map(str, kept))
    if weights is not None:
        a.length_weights = ",".join(str(w) for L, w in zip(lengths, weights) if L in kept)
    cfg = search_config_from_args(a, max(kept))
    plan = search_plan(cfg, dev.sizes, held.sizes, [a.candidates - 1] * recipe.bands.n_bands, spec.bos, recipe.quantized)
    secs = estimate_seconds(spec, plan.forwards(), a.device)
    _say(a, plan.line() + (f"; at most about {_duration(secs)} on this CPU" if secs is not None else ""))


@dataclass(frozen=True)
class SearchPlan:
    """The most a search can run: `budget` in its strategy's `unit` (what its progress counts against), as
    `evals` passes over the dev windows `dev` [(windows, length)], plus `n_held` passes over the held-out ones."""

    budget: int
    unit: str
    n_dev: int
    evals: int
    dev: list
    n_held: int
    held: list

    def forwards(self) -> list[tuple[float, int]]:
        return [(w * self.evals, L) for w, L in self.dev] + [(w * self.n_held, L) for w, L in self.held]

    def tokens(self) -> int:
        return int(sum(w * L for w, L in self.forwards()))

    def line(self) -> str:
        return (plan_line(f"search, at most {self.budget} {self.unit} on {self.n_dev} dev documents", self.dev,
                          self.evals, None)
                + f"; + {self.n_held} x ({', '.join(f'{w} x {L}' for w, L in self.held)}) held-out")


def search_plan(cfg, dev_sizes, held_sizes, per_band: list[int], bos: bool, quantized: bool) -> SearchPlan:
    """The plan of a search with `cfg` over documents of these token counts (see SearchPlan)."""
    from qroar.search import STRATEGIES, search_budget

    lengths = tuple(cfg.lengths)
    cap = cfg.max_windows_per_doc
    dev = eval_forwards(dev_sizes, (max(lengths),) if cfg.nested else lengths, bos, None, cap)
    held = eval_forwards(held_sizes, lengths, bos, None, cap)
    strategy = STRATEGIES[cfg.strategy]
    n_dev = len(dev_sizes)
    budget = search_budget(cfg, n_dev, len(held_sizes), per_band)
    if strategy.passes is not None:  # a unit that is not a pass over the dev documents (gradient steps)
        evals = math.ceil(strategy.passes(n_dev, per_band, cfg) + 3)  # + the dev tables
    else:
        evals = -(-budget // n_dev) if strategy.per_document else budget  # in passes over every dev document
    n_held = 4 if quantized else 2  # held-out: fp, quant, quant_scaled and the fp_scaled control
    return SearchPlan(budget, strategy.unit, n_dev, evals, dev, n_held, held)


def check_fidelity(a) -> None:
    from qroar.recipe import Recipe

    recipe = Recipe.from_args(a)
    lengths = parse_lengths(a.lengths)
    a.max_windows = max_windows(a.max_windows)
    if a.max_docs is not None and (not isinstance(a.max_docs, int) or a.max_docs < 0):
        raise ConfigError(f"--max-docs must be a positive number of documents, or 0 for all; got {a.max_docs!r}.")
    docs = read_corpus(a.corpus)
    spec = read_model(a.model)
    _recipe_quant(recipe, spec)
    if lengths is None and spec is not None and spec.trained_context:
        lengths = tuple(spec.trained_context * k for k in (1, 4, 8))
    fit = _fit_corpus(a, docs, spec, lengths)
    if fit is None:
        return
    toks, lengths = fit
    L = max(lengths)  # windows are cut at the longest length; the others are their prefixes
    counts = [c for c in (windows_count(n, L, spec.bos, None, a.max_windows) for n in toks.sizes) if c]
    forwards = [(sum(counts[:a.max_docs or None]), L)]
    # FP and each variant (quant with a quantizer; quant_scaled and fp_scaled with scales); --nopi: one more, shorter
    passes = 1 + recipe.quantized + (recipe.scales is not None) * (1 + recipe.quantized)
    secs = estimate_seconds(spec, forwards * passes, a.device)
    _say(a, plan_line(f"fidelity, {passes} forwards per window{' (+ FP without PI)' if a.nopi else ''}", forwards,
                      passes, secs))


def check_retrieval(a) -> None:
    from qroar.recipe import Recipe

    recipe = Recipe.from_args(a)
    lengths = parse_lengths(a.lengths)
    spec = read_model(a.model)
    _recipe_quant(recipe, spec)
    if lengths is None and spec is not None and spec.trained_context:
        lengths = tuple(spec.trained_context * k for k in (1, 2, 4))
    if a.haystack == "corpus":
        toks = tokens_of(a.corpus, read_corpus(a.corpus), spec)
        if toks is not None and lengths and max(toks.sizes, default=0) < max(lengths):
            doc, n = toks.longest() if toks.sizes else ("(none)", 0)
            raise DataError(f"A haystack of up to {max(lengths)} tokens needs a document that long; the longest of "
                            f"{a.corpus}, {doc!r}, has {n} tokens. Use shorter --lengths, another corpus or --haystack filler.")
    if lengths is None or spec is None:
        return
    n_depths = len([x for x in (a.depths or "0,0.25,0.5,0.75,1").split(",") if x.strip()])
    variants = 1 + recipe.quantized + (recipe.scales is not None) * (1 + recipe.quantized)
    forwards = [(n_depths * a.trials, L) for L in lengths]
    secs = estimate_seconds(spec, forwards * variants, a.device)
    _say(a, plan_line(f"passkey retrieval, {variants} variant{'s' * (variants != 1)}"
                      f"{' (+ greedy generation)' if a.generate else ''}", forwards, variants, secs))


CHECKS = {"eval": check_eval, "apply": check_apply, "export": check_export, "diagnose": check_diagnose, "search": check_search,
          "fidelity": check_fidelity, "retrieval": check_retrieval}


def check(a, command: str) -> None:
    """Run the checks of `qroar <command>` on its parsed arguments (see the module docstring)."""
    CHECKS[command](a)
