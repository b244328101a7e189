"""Per-band scale windows and the coordinate-descent search for Q-ROAR's scales.

Windows (rule "ip-tir", `derive_windows`). Each band b gets G_b = [g_min_b, g_max_b], symmetric
in log-space around 1 with half-width

    w_b = clip(w_max * (IP_min / IP_b) ** (1/4), w_min, w_max),  g_min_b = exp(-w_b), g_max_b = exp(w_b)

IP_b is the band's mean Interpolation Pressure (diagnostics.interpolation_pressure; IP is linear in
the displacement D, so the ratio IP_min / IP_b is the same at every length, and the longest length
is used). High-IP bands (high frequencies: many radians per token, little interpolation) get tight
windows, since a small change of their logits' scale moves attention most; the lowest-pressure band
gets the full w_max. The fourth root keeps the IP spread (often 10^6) to a usable range of widths.
Where TIR_W_b > 1 (the band's activation tails inflate at long context; per band the median over
layers and projections, kind W, full-precision variant), g_min_b is lowered to 1 / TIR_W_b (not
below g_floor) so the search may shrink the band back to its short-context range. Without a TIR
table the rule uses IP alone. Defaults: w_max = ln 1.25, w_min = ln 1.02, g_floor = 0.5.

Search (`search`). Candidates per band: n log-spaced values in G_b, the one nearest 1 replaced by
exactly 1.0. Coordinate descent over bands (band 0 first), 1-2 sweeps: for each band try every
candidate with the other bands fixed, keep the best. Objective: `perplexity.weighted_objective`
(length-weighted mean log-perplexity, weights proportional to length by default) on the dev
documents. Guard: a candidate whose perplexity at the shortest length exceeds the unscaled
quantized model's by more than `guard_tol` (relative, default 0.5%) is rejected; the shortest
length is evaluated first so a rejected candidate costs only that. Results are reported on
held-out documents (fp, quant, scaled per length), never on the dev set alone. Optional k-fold
stability: fold i searches on the dev documents outside fold i; per-band mean and std of the
chosen scales are reported.

Racing (`strategy="race"`, successive halving over documents). A band's candidates are first scored on
the first dev document, then the survivors on more: rung r holds the first eta**r documents (then
all). At each rung a candidate survives only if its objective on the documents seen so far beats
the incumbent's (the band's current scale) on the same documents and its short-context guard holds
there (against the unscaled model on those documents); of those, the best ceil(n / eta) go on. The
last rung is the whole dev set, where the usual rule picks the band's scale. Every result is kept
per document (checkpointed), so a survivor pays only for the documents it has not seen, the
incumbent's documents are already known, and k-fold reuses them. With eta = 3 and 10 documents a
band of 6 new candidates costs at most 6 + 2*2 + 1*6 = 16 document evaluations instead of 60. It
can pass over a candidate that wins only on later documents; bench/run.py --cases search measures
what it picks against the exhaustive descent. Each rung's work is asked for at once
(`SearchRun.per_doc_many`), so several processes (`parallel`) split its (scale vector, document,
length) items by tokens and gather the per-document results: the same decisions as one process.

Per-layer scales (`strategy="layer"`, layer groups x bands). First the shared descent above (the paper's
search), then each of `layer_groups` contiguous groups of layers (G = the number of layers: every layer
its own) refines each band in index order around the shared result: the band's candidates within two
grid steps of the group's current scale (at most 4), the other groups and bands fixed, kept only when the
objective on all dev documents improves and the same short-context guard (against the unscaled model)
holds. The scales become per layer (L x B; layers of one group share a value). Cost: the shared descent
plus at most G x B x 4 evaluations; moving one group's band re-quantizes only that group's rows.

Nested windows (`nested=True`): every length is scored from one forward at the longest
(perplexity.EvalConfig.nested), so the guard's short length costs nothing extra.

Checkpoint/resume: after every evaluation the checkpoint JSON (settings hash, every evaluated
scale vector -> objective, best scales so far, sweep/band position) is written atomically. The
descent is deterministic and looks every evaluation up there first, so a killed search rerun with
the same checkpoint replays the finished part for free and reaches the same result.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from qroar import gradient
from qroar.errors import Cancelled, ConfigError, DataError
from qroar.rescale import ScaleConfig

CHECKPOINT_SCHEMA = 1
W_MAX, W_MIN, G_FLOOR = math.log(1.25), math.log(1.02), 0.5


# ----------------------------------------------------------------------------- windows


def _band_ip(ip_table: pd.DataFrame) -> pd.Series:
    col = "ip_mean" if "ip_mean" in ip_table else "ip"
    if "band" not in ip_table or col not in ip_table or ip_table.empty:
        raise DataError("The IP table needs columns band and ip_mean (diagnostics.interpolation_pressure).")
    t = ip_table
    if "length" in t:
        t = t[t["length"] == t["length"].max()]
    return t.groupby("band")[col].mean().sort_index()


def _band_tir(tir_table: pd.DataFrame | None) -> pd.Series | None:
    if tir_table is None or len(tir_table) == 0:
        return None
    t = tir_table
    if "kind" in t:
        t = t[t["kind"] == "W"]
    if "variant" in t and (t["variant"] == "fp").any():
        t = t[t["variant"] == "fp"]
    return t.groupby("band")["tir"].median().sort_index()


def derive_windows(ip_table: pd.DataFrame, tir_table: pd.DataFrame | None = None, w_max: float = W_MAX,
                   w_min: float = W_MIN, g_floor: float = G_FLOOR) -> pd.DataFrame:
    """Windows G_b from IP (and TIR_W when given) by the module docstring's rule.

    Returns one row per band: band, ip, tir (NaN without a TIR table), g_min, g_max, reason.
    """
    if not (0 <= w_min <= w_max) or not (0 < g_floor <= 1):
        raise ConfigError(f"Window half-widths need 0 <= w_min <= w_max and 0 < g_floor <= 1 (got {w_min}, {w_max}, {g_floor}).")
    ip = _band_ip(ip_table)
    tir = _band_tir(tir_table)
    ip_min = float(ip[ip > 0].min()) if (ip > 0).any() else 1.0
    rows = []
    for b, ip_b in ip.items():
        w = w_max if ip_b <= 0 else min(max(w_max * (ip_min / ip_b) ** 0.25, w_min), w_max)
        g_min, g_max = math.exp(-w), math.exp(w)
        reason = f"IP {ip_b:.3g} ({ip_b / ip_min:.3g}x the lowest): ±{100 * (g_max - 1):.1f}%"
        t = float(tir[b]) if tir is not None and b in tir.index else float("nan")
        if math.isfinite(t) and t > 1 and 1 / t < g_min:
            g_min = max(1 / t, g_floor)
            reason += f"; TIR_W {t:.3g} > 1: g_min lowered to {g_min:.3g}"
        rows.append(dict(band=int(b), ip=float(ip_b), tir=t, g_min=g_min, g_max=g_max, reason=reason))
    return pd.DataFrame(rows, columns=["band", "ip", "tir", "g_min", "g_max", "reason"])


def windows_for(wb, tir_table: pd.DataFrame | None = None, **kw) -> pd.DataFrame:
    """The windows of the workbench's recipe (qroar.recipe.windows: this rule, then any set by hand)."""
    from qroar.recipe import windows

    return windows(wb.recipe, wb.geometry, tir_table, **kw)


def check_windows(windows, n_bands: int) -> list[tuple[float, float]]:
    """(g_min, g_max) per band from a windows table or a list of pairs; each must hold 1 and be positive."""
    if isinstance(windows, pd.DataFrame):
        pairs = list(zip(windows.sort_values("band")["g_min"], windows.sort_values("band")["g_max"]))
    else:
        pairs = [tuple(p) for p in windows]
    if len(pairs) != n_bands:
        raise ConfigError(f"Got {len(pairs)} windows for {n_bands} bands: give one window per band.")
    out = []
    for b, (lo, hi) in enumerate(pairs):
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= 1 <= hi):
            raise ConfigError(f"The window of band {b} is [{lo}, {hi}]: it must be positive and contain 1 (g_min <= 1 <= g_max).")
        out.append((lo, hi))
    return out


def candidates(g_min: float, g_max: float, n: int) -> list[float]:
    """n log-spaced scales in [g_min, g_max], the one nearest 1 replaced by exactly 1.0 (sorted, distinct)."""
    if g_min == g_max:
        return [1.0]
    logs = torch.linspace(math.log(g_min), math.log(g_max), n, dtype=torch.float64)
    vals = [float(math.exp(x)) for x in logs]
    vals[min(range(n), key=lambda i: abs(logs[i]))] = 1.0
    return sorted(set(vals))


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SearchConfig:
    """Search settings. length_weights: one per length (None: proportional to length); k_folds 0: none."""

    n_candidates: int = 7
    sweeps: int = 1
    lengths: tuple[int, ...] = (512, 2048)
    length_weights: tuple[float, ...] | None = None
    guard_tol: float = 0.005
    dev_corpus: str = "embedded:dev"
    heldout_corpus: str = "embedded:heldout"
    max_windows_per_doc: int | None = 2
    batch_size: int | None = None
    checkpoint: str | None = None
    k_folds: int = 0
    nested: bool = False
    strategy: str = "grid"  # a key of STRATEGIES
    race_eta: int = 3
    objective: str = "ppl"  # a key of OBJECTIVES
    allow_invariant: bool = False  # search even when the invariance note says scales cannot act
    layer_groups: int = 4  # strategy "layer": contiguous layer groups refined per band (the number of layers: each layer)
    # strategy "grad" (qroar.gradient): Adam steps on the log-scales, minibatches of windows, early stopping
    grad_steps: int = 20
    grad_lr: float = 0.02
    grad_batch: int = 2  # training windows per step
    grad_val: float = 0.25  # share of the dev documents kept out of training for early stopping
    grad_every: int = 4  # a validation check every this many steps
    grad_patience: int = 3  # checks without improvement before stopping
    seed: int = 0

    def __post_init__(self):
        for name in ("lengths", "length_weights"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        if not (isinstance(self.n_candidates, int) and 5 <= self.n_candidates <= 9):
            raise ConfigError(f"Use 5 to 9 candidates per band, got {self.n_candidates!r}.")
        if self.sweeps not in (1, 2):
            raise ConfigError(f"Use 1 or 2 sweeps over the bands, got {self.sweeps!r}.")
        if not self.lengths or any(not isinstance(n, int) or n < 2 for n in self.lengths) or len(set(self.lengths)) != len(self.lengths):
            raise ConfigError(f"lengths must be distinct integers >= 2 (tokens), got {self.lengths!r}.")
        w = self.length_weights
        if w is not None and (len(w) != len(self.lengths) or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) == 0):
            raise ConfigError(f"Give one finite non-negative weight per length ({len(self.lengths)}), not all zero; got {w!r}.")
        if not (isinstance(self.guard_tol, (int, float)) and math.isfinite(self.guard_tol) and self.guard_tol >= 0):
            raise ConfigError(f"guard_tol must be a finite fraction >= 0 (0.005 = 0.5%), got {self.guard_tol!r}.")
        if not (isinstance(self.k_folds, int) and (self.k_folds == 0 or self.k_folds >= 2)):
            raise ConfigError(f"k_folds must be 0 (no folds) or at least 2, got {self.k_folds!r}.")
        if not isinstance(self.nested, bool) or not isinstance(self.allow_invariant, bool):
            raise ConfigError(f"nested and allow_invariant are true or false, got {self.nested!r} and {self.allow_invariant!r}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown search strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"Unknown search objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        if not (isinstance(self.layer_groups, int) and not isinstance(self.layer_groups, bool) and self.layer_groups >= 1):
            raise ConfigError(f"layer_groups must be an integer >= 1 (contiguous groups of layers), got {self.layer_groups!r}.")
        if not (isinstance(self.race_eta, int) and 2 <= self.race_eta <= 4):
            raise ConfigError(f"race_eta (the share of candidates kept per rung is 1/eta) must be 2, 3 or 4, got {self.race_eta!r}.")
        for name, lo, hi in (("grad_steps", 1, 10000), ("grad_batch", 1, 1024), ("grad_every", 1, 10000),
                             ("grad_patience", 1, 1000), ("seed", 0, 2**63 - 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise ConfigError(f"{name} must be an integer from {lo} to {hi}, got {v!r}.")
        if not (isinstance(self.grad_lr, (int, float)) and math.isfinite(self.grad_lr) and 0 < self.grad_lr <= 1):
            raise ConfigError(f"grad_lr (Adam's step on the log-scales) must be in (0, 1], got {self.grad_lr!r}.")
        if not (isinstance(self.grad_val, (int, float)) and 0 <= self.grad_val <= 0.5):
            raise ConfigError(f"grad_val (the share of dev documents kept for early stopping) must be in [0, 0.5], got {self.grad_val!r}.")

    @property
    def race(self) -> bool:
        return self.strategy == "race"

    def weights(self) -> dict[int, float] | None:
        return None if self.length_weights is None else dict(zip(self.lengths, self.length_weights))

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        d = dict(d)
        if "race" in d:  # files written before strategies were a registry
            d["strategy"] = "race" if d.pop("race") else d.get("strategy", "grid")
        d.pop("mode", None), d.pop("order", None)  # now the recipe's (scale.mode / scale.order)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Unknown search settings: {', '.join(sorted(unknown))}.")
        return cls(**d)


def add_search_args(p) -> None:
    """The SearchConfig's arguments, with its own defaults (`search_config_from_args` reads them back)."""
    base = SearchConfig()
    g = p.add_argument_group("corpus")
    g.add_argument("--dev-corpus", default=base.dev_corpus, help="documents the search optimises on")
    g.add_argument("--heldout-corpus", default=base.heldout_corpus, help="documents the result is reported on")
    g.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1x,4x the trained context)")
    g.add_argument("--length-weights", default=None, help="comma-separated weights, one per length (default: proportional to length)")
    g.add_argument("--max-windows", type=int, default=base.max_windows_per_doc,
                   help=f"at most this many windows per document and length (default {base.max_windows_per_doc}; 0 = every window)")
    g.add_argument("--batch-size", type=int, default=None)
    o = p.add_argument_group("search")
    o.add_argument("--strategy", default=base.strategy, choices=list(STRATEGIES),
                   help="; ".join(f"{k}: {v.label}" for k, v in STRATEGIES.items()))
    o.add_argument("--race", action="store_const", const="race", dest="strategy", help="same as --strategy race")
    o.add_argument("--race-eta", type=int, default=base.race_eta, help="racing keeps the best 1/eta of the candidates per rung (2-4)")
    o.add_argument("--layer-groups", type=int, default=base.layer_groups,
                   help=f"strategy layer: contiguous groups of layers with their own band scales (default {base.layer_groups}; "
                        "the number of layers = every layer its own)")
    o.add_argument("--objective", default=base.objective, choices=list(OBJECTIVES),
                   help="; ".join(f"{k}: {v.label}" for k, v in OBJECTIVES.items()))
    o.add_argument("--candidates", type=int, default=base.n_candidates, help="candidates per band (5-9)")
    o.add_argument("--sweeps", type=int, default=base.sweeps, help="coordinate-descent sweeps over the bands (1-2)")
    o.add_argument("--guard", type=float, default=base.guard_tol, help="short-context guard: max relative ppl rise at the shortest length")
    o.add_argument("--folds", type=int, default=base.k_folds, help="k-fold stability of the chosen scales (0 = off)")
    o.add_argument("--checkpoint", default=None, help="JSON file saved after every evaluation; rerun with it to resume")
    o.add_argument("--nested", action="store_true",
                   help="score every length from one forward at the longest (shorter lengths = prefixes of the long windows)")
    o.add_argument("--allow-invariant", action="store_true",
                   help="search even when the settings cannot change the model beyond rounding (to see the noise)")
    gr = p.add_argument_group("gradient search (--strategy grad)")
    gr.add_argument("--steps", type=int, default=base.grad_steps, help="most Adam steps on the log-scales")
    gr.add_argument("--lr", type=float, default=base.grad_lr, help="Adam's learning rate on the log-scales")
    gr.add_argument("--grad-batch", type=int, default=base.grad_batch, help="training windows per step")
    gr.add_argument("--grad-val", type=float, default=base.grad_val,
                    help="share of the dev documents kept out of training for early stopping (0-0.5)")
    gr.add_argument("--grad-every", type=int, default=base.grad_every, help="a validation check every this many steps")
    gr.add_argument("--patience", type=int, default=base.grad_patience, help="validation checks without improvement before stopping")
    gr.add_argument("--seed", type=int, default=base.seed, help="seed of the window order")


def search_config_from_args(a, trained_context: int) -> SearchConfig:
    def numbers(text, cast, what):
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}.") from e

    lengths = numbers(a.lengths, int, "--lengths") if a.lengths else (trained_context, 4 * trained_context)
    weights = numbers(a.length_weights, float, "--length-weights") if a.length_weights else None
    return SearchConfig(n_candidates=a.candidates, sweeps=a.sweeps, lengths=lengths, length_weights=weights,
                        guard_tol=a.guard, dev_corpus=a.dev_corpus, heldout_corpus=a.heldout_corpus,
                        max_windows_per_doc=a.max_windows or None, batch_size=a.batch_size, checkpoint=a.checkpoint,
                        k_folds=a.folds, nested=a.nested, strategy=a.strategy, race_eta=a.race_eta,
                        objective=a.objective, allow_invariant=a.allow_invariant, layer_groups=a.layer_groups,
                        grad_steps=a.steps, grad_lr=a.lr, grad_batch=a.grad_batch, grad_val=a.grad_val,
                        grad_every=a.grad_every, grad_patience=a.patience, seed=a.seed)


def search_args(cfg: SearchConfig) -> list[str]:
    """`qroar search` arguments that `search_config_from_args` turns back into `cfg` (lengths always given)."""
    base, out = SearchConfig(), ["--lengths", ",".join(map(str, cfg.lengths))]
    if cfg.length_weights is not None:
        out += ["--length-weights", ",".join(repr(float(w)) for w in cfg.length_weights)]
    if cfg.max_windows_per_doc != base.max_windows_per_doc:
        out += ["--max-windows", str(cfg.max_windows_per_doc or 0)]  # 0: every window (the CLI's default is a few)
    for flag, name in (("--dev-corpus", "dev_corpus"), ("--heldout-corpus", "heldout_corpus"), ("--batch-size", "batch_size"),
                       ("--strategy", "strategy"), ("--race-eta", "race_eta"), ("--objective", "objective"),
                       ("--candidates", "n_candidates"), ("--sweeps", "sweeps"), ("--guard", "guard_tol"),
                       ("--folds", "k_folds"), ("--checkpoint", "checkpoint"), ("--layer-groups", "layer_groups"),
                       ("--steps", "grad_steps"), ("--lr", "grad_lr"), ("--grad-batch", "grad_batch"), ("--grad-val", "grad_val"),
                       ("--grad-every", "grad_every"), ("--patience", "grad_patience"), ("--seed", "seed")):
        v = getattr(cfg, name)
        if v != getattr(base, name) and v is not None:
            out += [flag, repr(v) if isinstance(v, float) else str(v)]
    out += ["--nested"] * cfg.nested + ["--allow-invariant"] * cfg.allow_invariant
    return out


# ----------------------------------------------------------------------------- checkpoint


def _key(fold: str, scales) -> str:
    if scales is None:
        return fold + "|fp"
    row = lambda r: ",".join(f"{float(g):.12g}" for g in r)  # noqa: E731
    return fold + "|" + (";".join(row(r) for r in scales) if _layered(scales) else row(scales))


def _layered(scales) -> bool:
    return bool(scales) and isinstance(scales[0], (list, tuple))


def _plain(scales) -> list:
    """Scales as JSON-ready lists of floats: one per band, or one list per layer."""
    return [[float(g) for g in r] for r in scales] if _layered(scales) else [float(g) for g in scales]


class Checkpoint:
    """Every evaluation of one search, keyed by fold and scale vector; written atomically after each."""

    def __init__(self, path: str | None, settings_hash: str, settings: dict, write: bool = True):
        self.path = Path(path) if path else None
        self.write = write  # several processes of one search: only the main one writes the file
        self.hash, self.settings = settings_hash, settings
        self.entries: dict[str, dict] = {}
        self.position: dict = {}
        self.best: dict[str, list[float]] = {}
        self.descents: dict[str, dict] = {}  # finished gradient optimisations by fold (theta, history, steps, checks)
        self.from_file: set[str] = set()  # keys read from an earlier run's file
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"The search checkpoint {self.path} cannot be read ({e}); delete it to start over.") from e
        if not isinstance(d, dict) or d.get("kind") != "qroar-search-checkpoint":
            raise ConfigError(f"{self.path} is not a qroar search checkpoint; choose another --checkpoint file.")
        if d.get("schema_version") != CHECKPOINT_SCHEMA:
            raise ConfigError(f"The checkpoint {self.path} has schema {d.get('schema_version')!r}; this qroar reads "
                              f"{CHECKPOINT_SCHEMA}. Delete it to start over.")
        if d.get("settings_hash") != self.hash:
            raise ConfigError(f"The checkpoint {self.path} was written for other settings (model, PI, quantizer, bands, "
                              "windows, corpus or search options): use the same settings to resume, or delete it / "
                              "choose another checkpoint file to start over.")
        self.entries = {e["key"]: e for e in d.get("evaluations", [])}
        self.from_file = set(self.entries)
        self.best = d.get("best_scales", {})
        self.position = d.get("position", {})
        self.descents = d.get("descents", {})  # absent in files of earlier versions: nothing to reuse

    def get(self, fold: str, scales) -> dict | None:
        return self.entries.get(_key(fold, scales))

    def put(self, fold: str, scales, entry: dict, save: bool = True) -> None:
        self.entries[_key(fold, scales)] = {"key": _key(fold, scales), "fold": fold, **entry}
        if save:
            self.save()

    def save(self) -> None:
        if self.path is None or not self.write:
            return
        from qroar.export import atomic_write_text

        payload = {"kind": "qroar-search-checkpoint", "schema_version": CHECKPOINT_SCHEMA, "settings_hash": self.hash,
                   "settings": self.settings, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "position": self.position, "best_scales": self.best, "descents": self.descents,
                   "evaluations": list(self.entries.values())}
        atomic_write_text(self.path, json.dumps(payload, indent=1, default=str))


def _shared_checkpoint(path, settings_hash: str, settings: dict, parallel=None) -> Checkpoint:
    """The search's checkpoint. Several processes: rank 0 reads the file (and alone writes it) and hands
    what it read to the others, so resuming needs the file on rank 0's host only; an unreadable or
    foreign file stops every process with rank 0's message."""
    if parallel is None or parallel.world_size == 1:
        return Checkpoint(path, settings_hash, settings)
    err, state = None, None
    if parallel.is_main:
        try:
            ck = Checkpoint(path, settings_hash, settings)
            state = (ck.entries, ck.from_file, ck.best, ck.position, ck.descents)
        except ConfigError as e:
            err = str(e)
    err, state = parallel.broadcast((err, state))
    if err is not None:
        raise ConfigError(err)
    if not parallel.is_main:
        ck = Checkpoint(None, settings_hash, settings, write=False)
        ck.path = Path(path) if path else None  # named in messages; never written here
        ck.entries, ck.from_file, ck.best, ck.position, ck.descents = state
    return ck


# ----------------------------------------------------------------------------- result


@dataclass
class SearchResult:
    """scales: chosen per band. dev / heldout: one row per (variant, length): log_ppl, ppl, tokens.
    objective: weighted objective per (split, variant). history: every candidate tried, with the
    incumbent's objective and the unscaled model's short log-ppl on the same documents."""

    scales: list  # one per band, or (per-layer strategies) one list of band scales per layer
    scale_cfg: ScaleConfig
    windows: pd.DataFrame
    candidates: list[list[float]]
    history: pd.DataFrame
    dev: pd.DataFrame
    heldout: pd.DataFrame
    objective: dict
    note: str | None
    folds: pd.DataFrame | None = None
    noise_scales: list | None = None  # what rounding noise chose when the note holds (not a result)
    recipe: dict | None = None  # the Recipe the scales belong to (Recipe.to_dict)
    search_cfg: dict | None = None  # the SearchConfig that found them (SearchConfig.to_dict)
    settings: dict = field(default_factory=dict)
    evaluations: int = 0  # computed in this run
    reused: int = 0  # taken from the checkpoint
    doc_evaluations: int = 0  # documents evaluated in this run (one forward each per window and length; nested: per window)
    seconds: float = 0.0
    budget: int = 0  # the most the progress announced, in `unit`
    unit: str = "evaluations"  # what the progress counted (Strategy.unit): racing counts document evaluations
    work: int = 0  # what the progress counted, in `unit` (cached evaluations included)

    @property
    def spent(self) -> int:
        """What this run computed, in `unit` (never more than `budget`)."""
        if self.unit == "document evaluations":
            return self.doc_evaluations
        return self.evaluations if self.unit == "evaluations" else self.work

    @property
    def gain_is_noise(self) -> bool:
        return self.note is not None

    def heldout_gain(self) -> float:
        """Relative change of the held-out objective's perplexity, scaled vs unscaled quantized (negative = better)."""
        o = self.objective["heldout"]
        return self.objective_change(o["quant_scaled"], o["quant"])

    def objective_change(self, new: float, base: float) -> float:
        """Relative change of the objective (its registry entry's rule: perplexity ratio, or KL ratio)."""
        name = (self.search_cfg or {}).get("objective", "ppl")
        return OBJECTIVES[name].change(new, base) if name in OBJECTIVES else math.exp(new - base) - 1

    def to_dict(self) -> dict:
        rec = lambda df: None if df is None else json.loads(df.to_json(orient="records"))  # noqa: E731
        return {
            "scales": self.scales, "scale": self.scale_cfg.to_dict(), "windows": rec(self.windows),
            "candidates": self.candidates, "objective": self.objective, "note": self.note,
            "gain_is_noise": self.gain_is_noise, "dev": rec(self.dev), "heldout": rec(self.heldout),
            "history": rec(self.history), "folds": rec(self.folds), "settings": self.settings,
            "evaluations": self.evaluations, "reused": self.reused, "seconds": self.seconds,
            "doc_evaluations": self.doc_evaluations, "budget": self.budget, "unit": self.unit, "work": self.work,
            "noise_scales": self.noise_scales, "recipe": self.recipe, "search_cfg": self.search_cfg,
        }


# ----------------------------------------------------------------------------- the search


class SearchRun:
    """One search's shared state: workbench, eval settings, checkpoint, progress counts."""

    def __init__(self, wb, cfg: SearchConfig, ck: Checkpoint, total: int, progress, cancel, scaled: str, base: str,
                 parallel=None):
        from qroar.perplexity import EvalConfig

        self.wb, self.cfg, self.ck = wb, cfg, ck
        self.eval_all = EvalConfig(lengths=cfg.lengths, max_windows_per_doc=cfg.max_windows_per_doc, batch_size=cfg.batch_size,
                                   nested=cfg.nested)
        self.short = min(cfg.lengths)
        self.eval_short = replace(self.eval_all, lengths=(self.short,))
        rest = tuple(n for n in cfg.lengths if n != self.short)
        self.eval_rest = replace(self.eval_all, lengths=rest) if rest else None
        if cfg.nested:  # the short length comes free with the long forward: one evaluation, guard after
            self.eval_short, self.eval_rest = self.eval_all, None
        self.total, self.done, self.fresh, self.reused_keys = max(total, 1), 0, 0, set()
        self.doc_evals = 0
        strategy = STRATEGIES[cfg.strategy]
        self.unit, self.bound = strategy.unit, "at most " if strategy.bound_only else ""
        self.progress, self.cancel = progress or (lambda f, m: None), cancel
        self.measure = OBJECTIVES[cfg.objective].measure  # what each entry records per length besides log-ppl
        self.reference = None  # the KL objective's FP reference (fidelity.FPReference), made on first use
        self.scaled, self.base = scaled, base
        self.fresh_seconds = 0.0  # computing time of this run's fresh evaluations
        self.parallel = parallel  # qroar.distributed.Ranks (map over processes) or None
        self.gathered: set[str] = set()  # keys computed by the processes of `parallel` in this run
        self._bos: bool | None = None  # whether windows start with BOS (per_doc_many's token counts)

    def _report(self, msg: str) -> None:
        # the count and its announced total in one unit; the time left is the progress bar's to say
        self.progress(min(self.done / self.total, 1.0), f"{self.done} of {self.bound}{self.total} {self.unit} · {msg}")

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("search cancelled")

    def _result(self, docs, cfg, variant):
        """One variant on docs: a perplexity.EvalResult, or for the KL objective a fidelity.KLResult (KL to FP
        under the same PI and the variant's own nll, against FP hidden states cached for the whole search)."""
        if self.measure == "log_ppl":
            return self.wb.evaluate(docs, cfg, variant, cancel=self.cancel)
        from qroar.fidelity import FPReference, kld_evaluate

        if self.reference is None:
            self.reference = FPReference(self.wb)
        return kld_evaluate(self.wb, docs, cfg, variant, self.reference, cancel=self.cancel)

    def _eval(self, docs, cfg, variant) -> tuple[dict[int, float], dict[int, float]]:
        """(log-ppl per length, the objective's measure per length) of one variant on docs."""
        res = self._result(docs, cfg, variant)
        logp = res.log_ppl()
        return logp, (logp if self.measure == "log_ppl" else getattr(res, self.measure)())

    def objective(self, values: dict[int, float]) -> float:
        """The objective of the measure's values per length (log-ppl, or mean KL for the KL objective)."""
        return OBJECTIVES[self.cfg.objective].fn(values, self.cfg.weights())

    def _cached(self, fold: str, scales, guard_limit) -> dict | None:
        hit = self.ck.get(fold, scales)
        return hit if hit is not None and (hit["objective"] is not None or guard_limit is not None) else None

    def evaluate_many(self, fold: str, docs, trials: list, guard_limit: float | None, whats: list[str]) -> list[dict]:
        """evaluate() of several scale vectors; with `parallel`, those not in the checkpoint are first
        spread over its processes (each holds its own copy of the model) and gathered on all of them."""
        if self.parallel is not None and self.parallel.world_size > 1:
            self._check()
            todo = [t for t in trials if self._cached(fold, t, guard_limit) is None]
            before = self.doc_evals
            computed = self.parallel.map(lambda t: self._compute(docs, t, guard_limit), todo)
            self.doc_evals = before + len(todo) * len(docs.doc_ids)  # every process's work, counted as one process would
            for t, (entry, secs) in zip(todo, computed):
                self.ck.put(fold, t, entry)
                self.gathered.add(_key(fold, t))
                self.fresh += 1
                self.fresh_seconds += secs / self.parallel.world_size
        return [self.evaluate(fold, docs, t, guard_limit, w) for t, w in zip(trials, whats)]

    def evaluate(self, fold: str, docs, scales, guard_limit: float | None = None, what: str = "") -> dict:
        """Objective of `scales` (None: full precision) on docs, from the checkpoint when it is there."""
        self._check()
        hit = self._cached(fold, scales, guard_limit)
        if hit is not None:
            self.done += 1
            if hit["key"] in self.ck.from_file:
                self.reused_keys.add(hit["key"])
            self._report(what if hit["key"] in self.gathered else f"{what} (done before)")
            return hit
        entry, secs = self._compute(docs, scales, guard_limit)
        self.ck.put(fold, scales, entry)
        self.fresh += 1
        self.fresh_seconds += secs
        self.done += 1
        self._report(what)
        return entry

    def _compute(self, docs, scales, guard_limit: float | None) -> tuple[dict, float]:
        """(checkpoint entry, seconds) of one scale vector, computed on this process's model."""
        self._check()
        t = time.time()
        variant = self._set(scales)
        logp, values = self._eval(docs, self.eval_short, variant)
        self.doc_evals += len(docs.doc_ids)
        entry = {"scales": None if scales is None else list(scales), "objective": None, "log_ppl": logp,
                 "short_log_ppl": logp[self.short], "guard_ok": True}
        if self.measure != "log_ppl":
            entry[self.measure] = values
        if guard_limit is not None and logp[self.short] > guard_limit:
            entry["guard_ok"] = False  # the longer lengths are not worth computing
        else:
            if self.eval_rest is not None:
                more, more_values = self._eval(docs, self.eval_rest, variant)
                logp.update(more)
                if values is not logp:
                    values.update(more_values)
            entry["objective"] = self.objective(values)
        return entry, time.time() - t

    # ------------------------------------------------------------------ per-document results (racing)

    def _set(self, scales) -> str:
        """Put `scales` on the workbench (None: full precision); the variant to evaluate."""
        if scales is None:
            return "fp"
        self.wb.apply(self.wb.recipe.with_scales(scales))  # re-quantizes only the bands that moved
        return self.scaled

    def per_doc(self, docs, scales, what: str = "") -> dict[str, dict[int, tuple[float, int]]]:
        """{doc: {length: (nll, tokens)}} of `scales` on docs; only documents not yet in the
        checkpoint are computed (in one evaluate call, so short windows still batch)."""
        self.per_doc_many(docs, [scales], [what])
        return {d: {int(L): tuple(v) for L, v in self.ck.get("doc=" + d, scales)["per_length"].items()} for d in docs.doc_ids}

    def per_doc_many(self, docs, trials: list, whats: list[str]) -> None:
        """Put every (scale vector, document) result of `trials` x docs in the checkpoint, computing only
        the missing ones. One process: one evaluate call per scale vector (its missing documents).
        With `parallel`: the missing work is split into (scale vector, document, lengths) items (one
        per length; nested: one per document), spread over the processes balanced by the tokens each
        evaluates, and gathered on all of them; progress counts the (scale vector, document) pairs."""
        self._check()
        uniq = list({_key("", t): t for t in trials}.values())
        missing = [(t, d) for t in uniq for d in docs.doc_ids if self.ck.get("doc=" + d, t) is None]
        if self.parallel is None or self.parallel.world_size == 1 or not missing:
            for t, what in zip(trials, whats):
                self._per_doc_here(docs, t, what)
            return
        t0 = time.time()
        tokens = dict(zip(docs.doc_ids, docs.tokens))
        index = {_key("", t): i for i, t in enumerate(uniq)}
        items = [(index[_key("", t)], d, Ls, cost) for t, d in missing for Ls, cost in self._work(tokens[d])]

        def run_group(group):  # one scale vector on this process: one evaluate call per set of lengths
            variant = self._set(uniq[group[0][0]])
            out: dict[tuple, dict] = {}
            for Ls in dict.fromkeys(Ls for _, _, Ls, _ in group):
                ids = [d for _, d, L2, _ in group if L2 == Ls]
                res = self._result(type(docs)(docs.spec, ids, [tokens[d] for d in ids]), replace(self.eval_all, lengths=Ls), variant)
                for r in res.rows:
                    out.setdefault((r["doc"], Ls), {})[str(int(r["length"]))] = [float(r["nll"]), int(r["tokens"])] + (
                        [float(r[self.measure])] if self.measure != "log_ppl" else [])
            return [out.get((d, Ls), {}) for _, d, Ls, _ in group]

        results = self.parallel.spread(run_group, items, cost=lambda it: it[3], key=lambda it: it[0])
        got: dict[tuple, dict] = {}
        for (i, d, _, _), part in zip(items, results):
            got.setdefault((i, d), {}).update(part)
        for t, d in missing:
            per_length = dict(sorted(got.get((index[_key("", t)], d), {}).items(), key=lambda kv: int(kv[0])))
            self.ck.put("doc=" + d, t, {"scales": None if t is None else list(t), "per_length": per_length}, save=False)
        self.ck.save()
        self.fresh += len({_key("", t) for t, _ in missing})
        self.fresh_seconds += time.time() - t0
        self.done += len(missing)
        self.doc_evals += len(missing)
        what = whats[0] if len(whats) == 1 else f"{len(whats)} scale vectors ({whats[-1]})"
        self._report(f"{what} · {len(missing)} document evaluations spread over {self.parallel.world_size} processes")

    def _work(self, doc: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
        """(lengths, tokens evaluated) work items of one document: one per length it has a window for
        (nested: one item, every length from the longest forward)."""
        from qroar.perplexity import bos_id, needs_bos

        if self._bos is None:
            c = self.eval_all
            use = c.add_bos if c.add_bos is not None else needs_bos(self.wb.tokenizer, self.wb.model)
            self._bos = bool(use and bos_id(self.wb.tokenizer, self.wb.model) is not None)
        c, n = self.eval_all, int(doc.numel())
        out = []
        for L in c.lengths:
            span = L - 1 if self._bos else L
            step = span if c.stride is None or c.nested else c.stride
            count = 0 if n < span else (n - span) // step + 1
            if c.max_windows_per_doc is not None:
                count = min(count, c.max_windows_per_doc)
            if count:
                out.append(((L,), count * L))
        if c.nested and out:
            return [(tuple(L for (L,), _ in out), max(cost for _, cost in out))]
        return out

    def _per_doc_here(self, docs, scales, what: str) -> None:
        """per_doc's work on this process alone: the missing documents of `scales` in one evaluate call."""
        self._check()
        missing = [d for d in docs.doc_ids if self.ck.get("doc=" + d, scales) is None]
        if missing:
            t = time.time()
            res = self._result(docs.subset(missing), self.eval_all, self._set(scales))
            got = {d: {} for d in missing}
            for r in res.rows:  # [nll, tokens] (+ the measure's sum, e.g. kld)
                got[r["doc"]][str(int(r["length"]))] = [float(r["nll"]), int(r["tokens"])] + (
                    [float(r[self.measure])] if self.measure != "log_ppl" else [])
            for d in missing:
                self.ck.put("doc=" + d, scales, {"scales": None if scales is None else list(scales), "per_length": got[d]},
                            save=False)
            self.ck.save()
            self.fresh += 1
            self.fresh_seconds += time.time() - t
            self.done += len(missing)
            self.doc_evals += len(missing)
            self._report(what)
        else:
            keys = [_key("doc=" + d, scales) for d in docs.doc_ids]
            self.reused_keys.update(k for k in keys if k in self.ck.from_file)

    def score(self, per_doc: dict, doc_ids) -> dict:
        """The entry evaluate() would give (log_ppl per length, short_log_ppl, objective) on doc_ids."""
        acc: dict[int, list] = {}
        for d in doc_ids:
            for L, (nll, tok, *m) in per_doc[d].items():
                a = acc.setdefault(L, [0.0, 0, 0.0])
                a[0], a[1], a[2] = a[0] + nll, a[1] + tok, a[2] + (m[0] if m else 0.0)
        logp = {L: n / t for L, (n, t, _) in sorted(acc.items())}
        if self.measure == "log_ppl":
            return {"log_ppl": logp, "short_log_ppl": logp.get(self.short), "objective": self.objective(logp)}
        values = {L: x / t for L, (_, t, x) in sorted(acc.items())}
        return {"log_ppl": logp, self.measure: values, "short_log_ppl": logp.get(self.short),
                "objective": self.objective(values)}

    def entry(self, docs, scales, what: str = "") -> dict:
        """evaluate()'s entry from per-document results (racing mode's evaluate)."""
        e = self.score(self.per_doc(docs, scales, what), docs.doc_ids)
        return {"scales": None if scales is None else list(scales), "guard_ok": True, **e}


def rungs(n_docs: int, eta: int) -> list[int]:
    """Documents per racing rung: 1, eta, eta**2, ... below n_docs, then n_docs."""
    out, n = [], 1
    while n < n_docs:
        out.append(n)
        n *= eta
    return out + [n_docs]


def _race_band(run: SearchRun, fold: str, docs, current: list[float], b: int, gs: list[float], tol: float,
               history: list, sweep: int) -> float:
    """Successive halving over documents for band b (module docstring); returns the band's new scale."""
    ids = docs.doc_ids
    ones = [1.0] * len(current)
    alive = list(gs)
    rows = {}
    winner = current[b]
    for n in rungs(len(ids), run.cfg.race_eta):
        sub = docs.subset(ids[:n])
        trials = [current[:b] + [g] + current[b + 1:] for g in alive]
        # the rung's work at once (spread over processes when there are several), then read back below
        run.per_doc_many(sub, [current] + ([] if current == ones else [ones]) + trials,
                         [f"[{fold}] band {b}: incumbent on {n} documents"] + ([] if current == ones else
                                                                              [f"[{fold}] unscaled on {n} documents"])
                         + [f"[{fold}] sweep {sweep + 1} band {b}: g = {g:.4g} on {n} documents" for g in alive])
        inc = run.entry(sub, current, f"[{fold}] band {b}: incumbent on {n} documents")
        base = inc if current == ones else run.entry(sub, ones, f"[{fold}] unscaled on {n} documents")
        limit = base["short_log_ppl"] + math.log1p(tol)
        scored = []
        for g in alive:
            trial = current[:b] + [g] + current[b + 1:]
            e = run.entry(sub, trial, f"[{fold}] sweep {sweep + 1} band {b}: g = {g:.4g} on {n} documents")
            ok = e["short_log_ppl"] <= limit
            rows[g] = dict(fold=fold, sweep=sweep, band=b, g=g, objective=e["objective"] if ok else None,
                           short_log_ppl=e["short_log_ppl"], guard_ok=ok, docs=n,
                           incumbent_objective=inc["objective"], unscaled_short_log_ppl=base["short_log_ppl"])
            if ok and e["objective"] < inc["objective"]:
                scored.append((e["objective"], g))
        scored.sort()
        if n == len(ids):
            if scored:
                winner = scored[0][1]
            break
        alive = [g for _, g in scored[:math.ceil(len(alive) / run.cfg.race_eta)]]
        if not alive:
            break
    history += [rows[g] for g in gs if g in rows]
    return winner


def _mark(run: SearchRun, fold: str, sweep: int, b: int, current: list[float]) -> None:
    run.ck.position = {"fold": fold, "sweep": sweep, "band": b}
    run.ck.best[fold] = list(current)
    run.ck.save()


def descend_race(run: SearchRun, fold: str, docs, cands: list[list[float]], history: list) -> tuple[list[float], dict, dict]:
    """Coordinate descent from all-ones, each band raced over the documents (module docstring)."""
    current = [1.0] * len(cands)
    base = run.entry(docs, current, f"[{fold}] unscaled quantized baseline")
    for sweep in range(run.cfg.sweeps):
        for b in range(len(cands)):
            gs = [g for g in cands[b] if g != current[b]]
            current[b] = _race_band(run, fold, docs, current, b, gs, run.cfg.guard_tol, history, sweep)
            _mark(run, fold, sweep, b, current)
    return current, run.entry(docs, current), base


def descend_grid(run: SearchRun, fold: str, docs, cands: list[list[float]], history: list) -> tuple[list[float], dict, dict]:
    """Coordinate descent from all-ones, every candidate on every dev document (the paper's search)."""
    current = [1.0] * len(cands)
    base = run.evaluate(fold, docs, current, None, f"[{fold}] unscaled quantized baseline")
    limit = base["short_log_ppl"] + math.log1p(run.cfg.guard_tol)
    best = base
    for sweep in range(run.cfg.sweeps):
        for b in range(len(cands)):
            keep = current[b]
            gs = [g for g in cands[b] if g != current[b]]
            trials = [current[:b] + [g] + current[b + 1:] for g in gs]
            entries = run.evaluate_many(fold, docs, trials, limit, [f"[{fold}] sweep {sweep + 1} band {b}: g = {g:.4g}" for g in gs])
            for g, e in zip(gs, entries):
                better = e["guard_ok"] and e["objective"] is not None and e["objective"] < best["objective"]
                history.append(dict(fold=fold, sweep=sweep, band=b, g=g, objective=e["objective"],
                                    short_log_ppl=e["short_log_ppl"], guard_ok=e["guard_ok"], docs=len(docs.doc_ids),
                                    incumbent_objective=best["objective"], unscaled_short_log_ppl=base["short_log_ppl"]))
                if better:
                    best, keep = e, g
            current[b] = keep
            _mark(run, fold, sweep, b, current)
    return current, best, base


LAYER_RADIUS = 2  # grid steps on each side of a group's current scale that the per-layer refinement tries


def layer_groups(n_layers: int, n_groups: int) -> list[list[int]]:
    """Contiguous groups of layer indices, sizes differing by at most one (earlier groups the larger)."""
    if not 1 <= n_groups <= n_layers:
        raise ConfigError(f"{n_groups} layer groups for a model of {n_layers} layers: use 1 to {n_layers} "
                          f"({n_layers} = every layer its own scales).")
    size, extra = divmod(n_layers, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        stop = start + size + (g < extra)
        out.append(list(range(start, stop)))
        start = stop
    return out


def _near(cands: list[float], g: float, radius: int = LAYER_RADIUS) -> list[float]:
    """The candidates within `radius` grid steps of g (g itself left out)."""
    i = min(range(len(cands)), key=lambda j: abs(math.log(cands[j] / g)))
    return [c for c in cands[max(0, i - radius):i + radius + 1] if c != g]


def descend_layer(run: SearchRun, fold: str, docs, cands: list[list[float]], history: list) -> tuple[list, dict, dict]:
    """The shared descent, then per layer group and band a refinement around it (module docstring)."""
    groups = layer_groups(run.wb.n_layers, run.cfg.layer_groups)
    shared, best, base = descend_grid(run, fold, docs, cands, history)
    limit = base["short_log_ppl"] + math.log1p(run.cfg.guard_tol)
    current = [list(shared) for _ in range(run.wb.n_layers)]
    for gi, layers in enumerate(groups):
        for b in range(len(cands)):
            now = current[layers[0]][b]
            gs = _near(cands[b], now)
            trials = []
            for g in gs:
                t = [list(r) for r in current]
                for i in layers:
                    t[i][b] = g
                trials.append(t)
            whats = [f"[{fold}] layers {layers[0]}-{layers[-1]} band {b}: g = {g:.4g}" for g in gs]
            entries = run.evaluate_many(fold, docs, trials, limit, whats)
            keep = now
            for g, e in zip(gs, entries):
                better = e["guard_ok"] and e["objective"] is not None and e["objective"] < best["objective"]
                history.append(dict(fold=fold, sweep=run.cfg.sweeps, band=b, g=g, objective=e["objective"],
                                    short_log_ppl=e["short_log_ppl"], guard_ok=e["guard_ok"], docs=len(docs.doc_ids),
                                    incumbent_objective=best["objective"], unscaled_short_log_ppl=base["short_log_ppl"],
                                    group=gi, layers=f"{layers[0]}-{layers[-1]}"))
                if better:
                    best, keep = e, g
            for i in layers:
                current[i][b] = keep
            _mark(run, fold, run.cfg.sweeps + gi, b, current)
    return current, best, base


def _layer_budget(n_docs: int, per_band: list[int], cfg: "SearchConfig") -> int:
    """Evaluations of the shared descent plus, per layer group and band, at most 2 * LAYER_RADIUS neighbours."""
    refine = cfg.layer_groups * sum(min(2 * LAYER_RADIUS, k) for k in per_band)
    return _grid_budget(n_docs, per_band, cfg) + refine * (1 + cfg.k_folds)


def _grid_budget(n_docs: int, per_band: list[int], cfg: "SearchConfig") -> int:
    """Evaluations (one scale vector on all dev documents) the exhaustive descent makes."""
    return (1 + cfg.sweeps * sum(per_band)) * (1 + cfg.k_folds)


@dataclass(frozen=True)
class Strategy:
    """One entry of STRATEGIES: a new search method is one function and one line there.

    descend(run, fold, docs, candidates, history) -> (scales, best entry, unscaled entry); the run
    evaluates scale vectors (run.evaluate / run.entry) and keeps the checkpoint.
    budget(n_docs, candidates per band, cfg) -> the most work units it can spend; `per_document`:
    the units are single documents (else scale vectors on every document), and the budget is only a
    bound (stopping early is the point); progress counts in `unit` against it.
    """

    descend: Callable
    budget: Callable
    per_document: bool
    label: str
    spreads: bool = True  # its work can be spread over processes (qroar.distributed; Ranks.spread, per_doc_many)
    exact: bool = True  # the budget is what it spends (else only a bound, like a per-document one)

    @property
    def bound_only(self) -> bool:
        return self.per_document or not self.exact
    work: str | None = None  # the unit's name when it is neither (e.g. "steps + evaluations")
    passes: Callable | None = None  # (n_docs, per_band, cfg) -> the budget in passes over every dev document

    @property
    def unit(self) -> str:
        return self.work or ("document evaluations" if self.per_document else "evaluations")


@dataclass(frozen=True)
class Objective:
    """One entry of OBJECTIVES: fn({length: value}, weights or None) -> the number the search minimises.

    measure: the per-length value each evaluation records ("log_ppl": the variant's log-perplexity;
    "kld": its mean KL divergence to the FP model under the same PI, qroar.fidelity.kld_evaluate).
    change(new, base): the relative change of the objective shown to users (negative = better).
    The short-context guard always reads log-perplexity, whatever the objective."""

    fn: Callable
    label: str
    measure: str = "log_ppl"
    change: Callable = lambda new, base: math.exp(new - base) - 1


def _ppl_objective(logp: dict[int, float], weights) -> float:
    from qroar.perplexity import weighted_objective

    return weighted_objective(logp, weights)


def _race_budget(n_docs: int, per_band: list[int], cfg: "SearchConfig") -> int:
    """Document evaluations racing costs at most: the baseline, then per band each rung's survivors
    on the rung's new documents (the incumbent's documents are always known already)."""
    r = rungs(n_docs, cfg.race_eta)
    cost = n_docs
    for k in per_band * cfg.sweeps:
        alive, seen = k, 0
        for n in r:
            cost += alive * (n - seen)
            seen, alive = n, math.ceil(alive / cfg.race_eta)
    return cost * (1 + cfg.k_folds)


STRATEGIES: dict[str, Strategy] = {
    "grid": Strategy(descend_grid, _grid_budget, per_document=False, label="coordinate descent, every candidate on every dev document"),
    "race": Strategy(descend_race, lambda n, per_band, cfg: _race_budget(n, per_band, cfg), per_document=True,
                     label="coordinate descent, candidates raced over dev documents (successive halving)"),
    "layer": Strategy(descend_layer, _layer_budget, per_document=False, exact=False,
                      label="per-layer scales: the shared descent, then each layer group's bands refined around it"),
    "grad": Strategy(gradient.descend_grad, gradient.budget, per_document=False, work="steps + evaluations",
                     passes=gradient.dev_passes, label="gradient refinement of one log-scale per band (Adam, early stopping)"),
    "grad-layer": Strategy(gradient.descend_grad_layer, gradient.budget, per_document=False,
                           work="steps + evaluations", passes=gradient.dev_passes,
                           label="gradient refinement of one log-scale per layer and band (per-layer scales)"),
}
OBJECTIVES: dict[str, Objective] = {
    "ppl": Objective(_ppl_objective, "length-weighted mean log-perplexity"),
    "kld": Objective(_ppl_objective, "length-weighted mean KL divergence to full precision under the same PI",
                     measure="kld", change=lambda new, base: new / base - 1 if base > 0 else float("nan")),
}


def _settings_hash(wb, cfg: SearchConfig, windows, dev, held) -> tuple[str, dict]:
    s = {
        "fingerprint": wb.info.fingerprint, "pi": wb.pi.to_dict(),
        "quant": wb.quant_cfg.to_dict() if wb.quant_cfg is not None else None,
        "bands": list(wb.bands.edges), "scale": wb.scale_cfg.to_dict(),
        "search": {k: v for k, v in cfg.to_dict().items()
                   if k != "checkpoint" and (k != "layer_groups" or cfg.strategy == "layer")},
        "windows": [[round(a, 12), round(b, 12)] for a, b in windows],
        "dev": [[d, int(t.numel())] for d, t in zip(dev.doc_ids, dev.tokens)],
        "heldout": [[d, int(t.numel())] for d, t in zip(held.doc_ids, held.tokens)],
    }
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16], s


def _table(run: SearchRun, docs, fold: str, scales, variants) -> tuple[pd.DataFrame, dict]:
    """Per (variant, length) log-ppl of fp, unscaled and scaled models on docs; objective per variant.

    "fp_scaled" (the chosen scales on the full-precision model) is the control: a gain it shares is
    an attention-temperature effect, not a repair of quantization noise."""
    rows, obj = [], {}
    if STRATEGIES[run.cfg.strategy].per_document:  # the per-document variants' work at once (spread when it can be)
        kinds = [n for n in variants if n != "fp_scaled"]
        vecs = [None if n == "fp" else ([1.0] * len(scales) if n == "quant" else scales) for n in kinds]
        run.per_doc_many(docs, vecs, [f"[{fold}] {n}" for n in kinds])
    for name in variants:
        if name == "fp_scaled":
            run._set(scales)
            logp, values = run._eval(docs, run.eval_all, "fp_scaled")
            e = {"log_ppl": logp, run.measure: values, "objective": run.objective(values)}
        else:
            s = None if name == "fp" else ([1.0] * run.wb.bands.n_bands if name == "quant" else scales)
            e = run.entry(docs, s, f"[{fold}] {name}") if STRATEGIES[run.cfg.strategy].per_document \
                else run.evaluate(fold, docs, s, None, f"[{fold}] {name}")
        obj[name] = e["objective"]
        extra = {int(L): v for L, v in (e.get(run.measure) or {}).items()} if run.measure != "log_ppl" else {}
        rows += [dict(variant=name, length=int(L), log_ppl=v, ppl=math.exp(v),
                      **({run.measure: extra.get(int(L))} if extra else {}))
                 for L, v in sorted(e["log_ppl"].items(), key=lambda kv: int(kv[0]))]
    return pd.DataFrame(rows), obj


def search_budget(cfg: SearchConfig, n_dev: int, n_held: int, per_band: list[int]) -> int:
    """The most work a search can spend, in its strategy's unit (what its progress counts against): the
    descent on every dev document and on each fold's, then the dev tables (fp, quant; the scaled one is
    known) and the held-out ones (fp, quant, scaled)."""
    strategy = STRATEGIES[cfg.strategy]
    total = strategy.budget(n_dev, per_band, cfg)
    for k in range(cfg.k_folds):
        total += strategy.budget(sum(1 for i in range(n_dev) if i % cfg.k_folds != k), per_band, cfg)
    return total + (2 * n_dev + 3 * n_held if strategy.per_document else 6)


def search(wb, cfg: SearchConfig, windows=None, progress: Callable[[float, str], None] | None = None,
           cancel: threading.Event | None = None, parallel=None) -> SearchResult:
    """Find per-band scales for the workbench's model under its PI and quantizer (module docstring).

    windows: a derive_windows table or (g_min, g_max) per band; None derives them from IP alone.
    The bands, mode and order are the workbench's recipe's. Without a quantizer the search runs on
    full precision (fp_scaled vs fp). On success the chosen scales are set on the workbench; on
    cancel or error its previous recipe is put back. When the invariance note says these settings
    cannot change the model beyond rounding, the search refuses to start (ConfigError) unless
    cfg.allow_invariant; then it runs, and the result keeps all scales at 1 (what rounding noise
    chose is in `noise_scales`, never presented as a result).
    parallel: a qroar.distributed.Ranks, to spread each band's candidates over processes (same result).
    """
    t0 = time.time()
    with wb.lock:
        note = wb.invariance_note()
        if note and not cfg.allow_invariant:
            raise ConfigError(f"{note} The search would only measure rounding noise, so it was not started; "
                              "change the mode, order or quantizer (or allow it explicitly to see the noise).")
        win_table = windows if isinstance(windows, pd.DataFrame) else None
        if windows is None:
            win_table = windows_for(wb)
            windows = win_table
        pairs = check_windows(windows, wb.bands.n_bands)
        if win_table is None:
            win_table = pd.DataFrame([dict(band=b, g_min=lo, g_max=hi, reason="given") for b, (lo, hi) in enumerate(pairs)])
        cands = [candidates(lo, hi, cfg.n_candidates) for lo, hi in pairs]
        dev, held = wb.corpus(cfg.dev_corpus), wb.corpus(cfg.heldout_corpus)
        if cfg.k_folds and len(dev.doc_ids) < cfg.k_folds:
            raise DataError(f"{cfg.k_folds}-fold stability needs at least {cfg.k_folds} dev documents; "
                            f"{cfg.dev_corpus} has {len(dev.doc_ids)}. Use fewer folds or more documents.")
        h, settings = _settings_hash(wb, cfg, pairs, dev, held)
        ck = _shared_checkpoint(cfg.checkpoint, h, settings, parallel)
        quantized = wb.qstate is not None
        scaled, base = ("quant_scaled", "quant") if quantized else ("fp_scaled", "fp")
        variants = ("fp", "quant", "quant_scaled")
        strategy = STRATEGIES[cfg.strategy]
        if cfg.strategy == "layer":
            layer_groups(wb.n_layers, cfg.layer_groups)  # a bad group count is refused before anything changes
        if not strategy.spreads and parallel is not None and parallel.world_size > 1:
            raise ConfigError(f"The {cfg.strategy} strategy runs in one process: choose another to spread the search over processes.")
        total = search_budget(cfg, len(dev.doc_ids), len(held.doc_ids), [len(c) - 1 for c in cands])
        run = SearchRun(wb, cfg, ck, total, progress, cancel, scaled, base, parallel)
        prior = wb.recipe
        history: list[dict] = []
        try:
            wb.apply(wb.recipe.with_scales([1.0] * wb.bands.n_bands))
            scales, _, _ = strategy.descend(run, "all", dev, cands, history)
            fold_rows = []
            for k in range(cfg.k_folds):
                keep = [d for i, d in enumerate(dev.doc_ids) if i % cfg.k_folds != k]
                fs, _, _ = strategy.descend(run, f"fold{k}", dev.subset(keep), cands, history)
                fold_rows += ([dict(fold=k, layer=i, band=b, g=g) for i, row in enumerate(fs) for b, g in enumerate(row)]
                              if _layered(fs) else [dict(fold=k, band=b, g=g) for b, g in enumerate(fs)])
            dev_table, dev_obj = _table(run, dev, "all", scales, variants)
            held_table, held_obj = _table(run, held, "heldout", scales, variants + (("fp_scaled",) if quantized else ()))
        except BaseException as e:
            wb.apply(prior)
            if isinstance(e, Cancelled):
                where = (f"progress is saved in {ck.path}: run the same search with it to resume" if ck.path
                         else "no checkpoint file was given, so its progress is lost")
                raise Cancelled(f"Search cancelled after {run.fresh} evaluations; {where}.") from None
            raise
        noise_scales = None
        if note:  # what rounding noise picked is not a result: the honest scales stay 1
            noise_scales, scales = _plain(scales), [1.0] * wb.bands.n_bands
        wb.apply(wb.recipe.with_scales(scales))
        if strategy.bound_only and progress is not None:
            progress(1.0, f"done: {run.done} of at most {run.total} {run.unit}")  # an upper bound racing rarely spends
    folds = None
    if cfg.k_folds:
        f = pd.DataFrame(fold_rows)
        by = ["layer", "band"] if "layer" in f else ["band"]
        folds = f.groupby(by)["g"].agg(["mean", "std"]).reset_index()
        folds = folds.merge(f.pivot_table(index=by, columns="fold", values="g").add_prefix("fold").reset_index(), on=by)
    return SearchResult(
        scales=_plain(scales), scale_cfg=wb.scale_cfg, windows=win_table, candidates=cands,
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS + (["group", "layers"] if cfg.strategy == "layer" else [])),
        dev=dev_table, heldout=held_table, objective={"dev": dev_obj, "heldout": held_obj},
        note=note, noise_scales=noise_scales, recipe=wb.recipe.to_dict(), search_cfg=cfg.to_dict(),
        folds=folds, settings={**settings, "settings_hash": h, "variants": {"quant_scaled": scaled, "quant": base}},
        evaluations=run.fresh, reused=len(run.reused_keys), seconds=round(time.time() - t0, 3),
        doc_evaluations=run.doc_evals, budget=run.total, unit=run.unit, work=run.done,
    )


def _scales_text(scales) -> str:
    """Shared scales on one line; per-layer ones as a layers x bands table (layers of one value run together)."""
    from qroar.rescale import describe_scales

    if not _layered(scales) or all(row == scales[0] for row in scales):
        return describe_scales(scales)
    rows, start = [], 0
    for i in range(1, len(scales) + 1):
        if i == len(scales) or scales[i] != scales[start]:
            rows.append((f"{start}" if i - 1 == start else f"{start}-{i - 1}", scales[start]))
            start = i
    t = pd.DataFrame([r for _, r in rows], index=[n for n, _ in rows], columns=[f"b{b}" for b in range(len(scales[0]))])
    t.index.name = "layers"
    return "per layer (layers x bands)\n" + t.to_string(float_format=lambda x: f"{x:.4g}")


# one row per candidate tried (grid, race), or per step and validation check (grad: step, split "train" | "val")
HISTORY_COLUMNS = ["fold", "sweep", "band", "g", "objective", "short_log_ppl", "guard_ok", "docs",
                   "incumbent_objective", "unscaled_short_log_ppl", "step", "split"]


def format_result(r: SearchResult) -> str:
    """Held-out table (lengths x variants), the scales and the honesty note, for the CLI."""
    piv = r.heldout.pivot(index="length", columns="variant", values="ppl")[["fp", "quant", "quant_scaled"]]
    piv["scaled_vs_quant_%"] = 100 * (piv["quant_scaled"] / piv["quant"] - 1)
    lines = ["held-out perplexity:", piv.to_string(float_format=lambda x: f"{x:.4f}"),
             "scales: " + _scales_text(r.scales),
             f"held-out objective change: {100 * r.heldout_gain():+.3f}% "
             f"(dev {100 * r.objective_change(r.objective['dev']['quant_scaled'], r.objective['dev']['quant']):+.3f}%)"]
    if "kld" in r.heldout:
        kl = r.heldout.pivot(index="length", columns="variant", values="kld")
        kl = kl[[v for v in ("fp", "quant", "quant_scaled", "fp_scaled") if v in kl]]
        lines[2:2] = ["held-out mean KL divergence to full precision (fp_scaled: the same scales on FP, the control):",
                      kl.to_string(float_format=lambda x: f"{x:.5f}")]
    if r.note:
        lines.append(f"note: {r.note} The change above is rounding noise, not a gain: the scales stay 1"
                     + (f" (noise chose {_scales_text(r.noise_scales)})." if r.noise_scales else "."))
    if r.folds is not None:
        lines.append("k-fold stability of the chosen scales:")
        lines.append(r.folds.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return "\n".join(lines)
