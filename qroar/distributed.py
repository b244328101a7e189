"""Spreading work over processes, one GPU each: documents for perplexity, one band's candidates for search.

Run under `torchrun` or `accelerate launch`, which start one process per GPU and set RANK, WORLD_SIZE,
LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Every process loads the whole model on its own GPU
(`cuda:LOCAL_RANK`) and applies the same settings, so the processes hold identical models:

  perplexity  documents are split over the processes (greedy by token count, so each gets about as
              many tokens); each evaluates its share, and the per-document tables are gathered and put
              back in single-process order: the same table, row for row.
  search      the coordinate descent runs on every process in lockstep; the work of one step is split
              over the processes and the results gathered on all of them, so every process takes the
              same decision (qroar.search's `parallel` argument). Same scales as one process.
              grid: one band's candidates (each on every dev document). race: the rung's
              (candidate, document, length) work items, balanced by tokens (`Ranks.spread`).

A model larger than one GPU is spread with a device_map in one process (qroar.models.load_model);
this module spreads work when the model fits one GPU. Without torchrun (WORLD_SIZE unset or 1)
everything here runs in the one process: `Ranks()` maps sequentially and gathers a list of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from qroar.errors import ConfigError, DataError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process (picklable objects)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def map(self, fn: Callable, items: list) -> list:
        """[fn(x) for x in items], item i computed by process i % world_size, results gathered everywhere."""
        mine = [(i, fn(x)) for i, x in enumerate(items) if i % self.world_size == self.rank]
        out = [None] * len(items)
        for part in self.gather(mine):
            for i, r in part:
                out[i] = r
        return out

    def spread(self, fn: Callable, items: list, cost: Callable | None = None, key: Callable | None = None) -> list:
        """[result of each item], the items split over the processes and the results gathered everywhere.

        The general map over work items (a search's (scales, document) pairs, a gradient's documents):
        items go longest first to the process with the least cost so far (`split_by_cost`; cost(item),
        default 1 each); on each process the items sharing key(item) (e.g. one scale vector, which the
        workbench holds one at a time) are handed to fn together, in their order: fn(list) -> one result
        per item. Every process gets the whole list of results, in item order. One process: every
        group here, in order of first appearance.
        """
        costs = [float(cost(x)) if cost is not None else 1.0 for x in items]
        mine = split_by_cost(costs, self.world_size)[self.rank]
        groups: dict = {}
        for i in mine:
            groups.setdefault(key(items[i]) if key is not None else i, []).append(i)
        done = []
        for idx in groups.values():
            res = fn([items[i] for i in idx])
            if len(res) != len(idx):
                raise ValueError(f"spread: fn returned {len(res)} results for {len(idx)} items")
            done += list(zip(idx, res))
        out = [None] * len(items)
        for part in self.gather(done):
            for i, r in part:
                out[i] = r
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every process (picklable)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init(backend: str | None = None) -> Ranks:
    """Join the process group torchrun / accelerate launch describe in the environment.

    backend: "nccl" when GPUs are visible, else "gloo". Each process takes GPU LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"Process {rank} wants GPU {local} but {torch.cuda.device_count()} are visible: "
                          "start at most one process per GPU (torchrun --nproc_per_node).")
    device = f"cuda:{local}" if cuda else "cpu"
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend or ("nccl" if cuda else "gloo"))
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Ranks(rank, world, local, device)


# ----------------------------------------------------------------------------- perplexity over documents


def split_by_cost(costs: list[float], world_size: int) -> list[list[int]]:
    """Item indices per process: costliest first, each to the process with the least cost so far
    (ties: the lower index, the lower rank), each process's indices sorted."""
    load, parts = [0.0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += costs[i]
    return [sorted(p) for p in parts]


def split_by_tokens(sizes: list[int], world_size: int) -> list[list[int]]:
    """Document indices per process, balanced by token count (split_by_cost)."""
    return split_by_cost(sizes, world_size)


def perplexity(wb, corpus, eval_cfg, ranks: Ranks, variants=("fp", "quant"), progress=None, cancel=None) -> pd.DataFrame:
    """Workbench.perplexity with the documents spread over the processes; the same table on every process."""
    from dataclasses import replace

    from qroar.perplexity import bos_id, needs_bos
    from qroar.workbench import Corpus

    c = wb._as_corpus(corpus)
    bos = eval_cfg.add_bos if eval_cfg.add_bos is not None else needs_bos(wb.tokenizer, wb.model)
    span = {L: L - 1 if bos and bos_id(wb.tokenizer, wb.model) is not None else L for L in eval_cfg.lengths}
    sizes = [int(t.numel()) for t in c.tokens]
    for L in eval_cfg.lengths:  # the single-process run fails here too: say so before anything runs
        if not any(n >= span[L] for n in sizes):
            raise DataError(f"No document has the {span[L]} tokens one window of length {L} needs: "
                            "choose a shorter length or add longer documents.")
    mine = split_by_tokens(sizes, ranks.world_size)[ranks.rank]
    lengths = tuple(L for L in eval_cfg.lengths if any(sizes[i] >= span[L] for i in mine))
    table = None
    if lengths:  # a process whose documents are all too short for a length leaves that length out
        sub = Corpus(c.spec, [c.doc_ids[i] for i in mine], [c.tokens[i] for i in mine])
        table = wb.perplexity(sub, replace(eval_cfg, lengths=lengths), variants, progress=progress, cancel=cancel)
    parts = [t for t in ranks.gather(table) if t is not None]
    order = {d: i for i, d in enumerate(c.doc_ids)}
    vorder = {v: i for i, v in enumerate(variants)}
    out = pd.concat(parts, ignore_index=True)
    keys = pd.DataFrame({"v": out["variant"].map(vorder), "L": out["length"], "d": out["doc"].map(order)})
    return out.loc[keys.sort_values(["v", "L", "d"], kind="stable").index].reset_index(drop=True)


# ----------------------------------------------------------------------------- search


def search(wb, cfg, ranks: Ranks, windows=None, progress=None, cancel=None):
    """qroar.search.search with its work spread over the processes (the same result as one process)."""
    from qroar.search import search as run_search

    if ranks.world_size > 1 and cancel is not None:
        raise ConfigError("A search spread over processes cannot be cancelled from one of them: stop the launcher.")
    return run_search(wb, cfg, windows, progress=progress if ranks.is_main else None, cancel=cancel, parallel=ranks)
