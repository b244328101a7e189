"""Work spread over processes (gloo, 2 processes on the CPU): gathered results equal the single-process ones."""

import json
import os
import pickle
import random
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TEXT, save_tiny

from qroar import distributed
from qroar.bands import BandConfig
from qroar.perplexity import EvalConfig
from qroar.quant import QuantConfig
from qroar.rope import PIConfig
from qroar.search import SearchConfig, search
from qroar.workbench import Workbench

EVAL = EvalConfig(lengths=(32, 96), max_windows_per_doc=1)
VARIANTS = ("fp", "quant", "fp_scaled", "quant_scaled")
WINDOWS = [(1.0, 1.0), (0.8, 1.25), (1.0, 1.0), (1.0, 1.0)]  # one band searched: 4 candidates, 2 per process


ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, one thread each


def search_cfg(corpus, checkpoint=None) -> SearchConfig:
    return SearchConfig(n_candidates=5, lengths=(32, 64), dev_corpus=corpus["dev"], heldout_corpus=corpus["held"],
                        max_windows_per_doc=1, checkpoint=checkpoint)


def prepared(path) -> Workbench:
    wb = Workbench.open(path, device="cpu", dtype="fp32")
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(QuantConfig(method="rtn", bits=3, group_size=32))
    wb.set_bands(BandConfig(n_bands=4))
    wb.set_scales([1.1, 1.0, 0.9, 1.0])
    return wb


def _worker(rank, world, port, path, corpus, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = distributed.init("gloo")
    wb = prepared(path)
    table = distributed.perplexity(wb, corpus["mixed"], EVAL, ranks, VARIANTS)
    res = distributed.search(wb, search_cfg(corpus, checkpoint=out + ".ckpt.json"), ranks, WINDOWS)
    mine = distributed.split_by_tokens([int(t.numel()) for t in wb.corpus(corpus["mixed"]).tokens], world)[rank]
    got = {"rank": rank, "world": ranks.world_size, "table": table, "scales": res.scales, "history": res.history,
           "heldout": res.heldout, "objective": res.objective, "evaluations": res.evaluations, "mine": mine}
    gathered = ranks.gather(got)
    if ranks.is_main:
        with open(out, "wb") as f:
            pickle.dump(gathered, f)
    ranks.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    vocab = TEXT.split()
    corpus = {}
    for split, words in (("dev", [200, 200, 200]), ("held", [200, 200]), ("mixed", [300, 12, 200, 90, 150])):
        (root / split).mkdir()
        for i, n in enumerate(words):  # "mixed": one document too short for the 96-token windows
            rng = random.Random(f"{split}{i}")
            (root / split / f"{split}{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(n)))
        corpus[split] = str(root / split)
    return save_tiny(root / "model"), corpus, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gather_the_single_process_results(tiny):
    import torch.multiprocessing as mp

    path, corpus, root = tiny
    out = str(root / "gathered.pkl")
    mp.spawn(_worker, args=(2, free_port(), path, corpus, out), nprocs=2, join=True)
    with open(out, "rb") as f:
        parts = pickle.load(f)
    assert [p["rank"] for p in parts] == [0, 1] and all(p["world"] == 2 for p in parts)
    assert sorted(parts[0]["mine"] + parts[1]["mine"]) == list(range(5)) and parts[0]["mine"] and parts[1]["mine"]

    wb = prepared(path)
    table = wb.perplexity(corpus["mixed"], EVAL, VARIANTS)
    assert table.groupby("length")["doc"].nunique().to_dict() == {32: 5, 96: 4}  # the short document only at 32
    one = search(wb, search_cfg(corpus), WINDOWS)
    for p in parts:  # every process holds the whole gathered result, in single-process order
        pd.testing.assert_frame_equal(p["table"], table)
        assert p["scales"] == one.scales
        pd.testing.assert_frame_equal(p["history"], one.history)
        pd.testing.assert_frame_equal(p["heldout"], one.heldout)
        assert p["objective"] == one.objective
    # each process computed only part of the candidates; rank 0 wrote every one of them to the checkpoint
    assert parts[0]["evaluations"] == parts[1]["evaluations"] == one.evaluations
    resumed = search(prepared(path), search_cfg(corpus, checkpoint=out + ".ckpt.json"), WINDOWS)
    assert resumed.evaluations == 0 and resumed.reused == one.evaluations and resumed.scales == one.scales


def test_split_by_tokens_balances_and_covers_every_document():
    sizes = [100, 10, 90, 50, 40, 5]
    parts = distributed.split_by_tokens(sizes, 2)
    assert sorted(parts[0] + parts[1]) == list(range(6))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 10
    assert distributed.split_by_tokens(sizes, 1) == [list(range(6))]
    assert distributed.split_by_tokens([7], 3) == [[0], [], []]


def test_one_process_maps_in_order_and_gathers_itself():
    r = distributed.Ranks()
    assert r.is_main and r.map(lambda x: x * x, [3, 1, 2]) == [9, 1, 4] and r.gather("a") == ["a"]


def test_init_without_a_launcher_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    r = distributed.init()
    assert (r.rank, r.world_size) == (0, 1) and r.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- racing spread, under torchrun

RACE = ["--pi", "linear", "--factor", "2", "--quant", "rtn", "--bits", "3", "--group-size", "32", "--bands", "4",
        "--lengths", "32,96", "--max-windows", "1", "--candidates", "7", "--strategy", "race", "--batch-size", "1",
        "--windows", "0.7:1.3,0.8:1.25,0.85:1.2,0.9:1.1", "--quiet"]


def _qroar(args, procs=1, timeout=300):
    """The installed command, alone or under torchrun (gloo on the CPU, one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if procs == 1:
        cmd = [sys.executable, "-m", "qroar.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
               str(free_port()), "-m", "qroar.cli", *args, "--distributed"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def _word_corpus(root: Path, seed: str, words: dict[str, list[int]]) -> dict[str, str]:
    """{split: folder} of documents of random words, one per count (seeded by `seed`, the split and the index)."""
    vocab, corpus = TEXT.split(), {}
    for split, counts in words.items():
        (root / split).mkdir()
        for i, n in enumerate(counts):
            rng = random.Random(f"{seed}{split}{i}")
            (root / split / f"{split}{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(n)))
        corpus[split] = str(root / split)
    return corpus


def _doc_entries(path) -> dict:
    return {e["key"]: e["per_length"] for e in json.loads(Path(path).read_text())["evaluations"] if e["key"].startswith("doc=")}


def test_racing_spread_over_two_processes_equals_one_process(tmp_path):
    """torchrun --nproc-per-node 2 (gloo): the racing search's (candidate, document, length) work split over two
    processes gives the same scales, history and held-out table, the same per-document numbers bit for bit
    (batch 1: no window shares a forward), the same count of document evaluations within the budget; rank 0's
    checkpoint holds every one, and a 2-process run resumes a partial single-process checkpoint."""
    corpus = _word_corpus(tmp_path, "race", {"dev": [200, 90, 260, 150, 9], "held": [200, 120]})  # dev4: too short for 96
    model = save_tiny(tmp_path / "model")
    base = ["search", "--model", model, "--dev-corpus", corpus["dev"], "--heldout-corpus", corpus["held"], *RACE]
    run = lambda name, procs, ck: _qroar([*base, "--checkpoint", str(tmp_path / ck), "--report", str(tmp_path / name)], procs)  # noqa: E731
    out1 = run("one", 1, "one.ckpt.json")
    out2 = run("two", 2, "two.ckpt.json")
    assert "spread over 2 processes" in out2
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["scales"] == one["scales"] and two["history"] == one["history"] and two["heldout"] == one["heldout"]
    assert two["objective"] == one["objective"] and two["dev"] == one["dev"]
    assert two["doc_evaluations"] == one["doc_evaluations"] <= one["budget"] == two["budget"]
    assert two["evaluations"] == one["evaluations"] and two["unit"] == "document evaluations"
    docs1, docs2 = _doc_entries(tmp_path / "one.ckpt.json"), _doc_entries(tmp_path / "two.ckpt.json")
    assert docs2 == docs1 and len(docs1) == one["doc_evaluations"]
    assert any(set(v) == {"32"} for v in docs1.values())  # the short document has no 96-token window
    assert f"{one['doc_evaluations']} document evaluations (at most {one['budget']})" in out1

    # two processes resume a single-process checkpoint cut in half: only the missing documents are computed
    d = json.loads((tmp_path / "one.ckpt.json").read_text())
    keys = sorted(docs1)
    dropped = set(keys[::2])
    d["evaluations"] = [e for e in d["evaluations"] if e["key"] not in dropped]
    (tmp_path / "half.ckpt.json").write_text(json.dumps(d))
    run("resumed", 2, "half.ckpt.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["scales"] == one["scales"] and resumed["doc_evaluations"] == len(dropped)
    assert _doc_entries(tmp_path / "half.ckpt.json") == docs1


# ----------------------------------------------------------------------------- gradient and per-layer searches spread

GRAD = [*RACE[:RACE.index("--candidates")], "--batch-size", "1", "--windows", "0.7:1.3,0.8:1.25,0.85:1.2,0.9:1.1", "--quiet"]


@pytest.mark.parametrize("strategy,extra", [("grad", ["--steps", "4", "--grad-batch", "3", "--grad-every", "2", "--lr", "0.2"]),
                                            ("grad-layer", ["--steps", "3", "--grad-batch", "2", "--grad-every", "3", "--lr", "0.2"]),
                                            ("layer", ["--layer-groups", "2", "--candidates", "5"]),
                                            ("grad", ["--steps", "2", "--grad-batch", "1", "--grad-every", "2", "--lr", "0.2"])])
def test_gradient_and_per_layer_searches_spread_over_two_processes_equal_one_process(tmp_path, strategy, extra):
    """torchrun --nproc-per-node 2 (gloo): the gradient searches split each step's windows, each validation
    check's windows and each evaluation's documents over the processes, and the per-layer descent its
    candidates; the scales, the optimisation history (training and validation objectives at every step),
    the dev and held-out tables are those of one process, and a 2-process run resumes from the checkpoint."""
    corpus = _word_corpus(tmp_path, "grad", {"dev": [200, 90, 260, 150, 120, 210], "held": [200, 120]})
    model = save_tiny(tmp_path / "model")
    base = ["search", "--model", model, "--dev-corpus", corpus["dev"], "--heldout-corpus", corpus["held"], *GRAD,
            "--strategy", strategy, *extra]
    run = lambda name, procs: _qroar([*base, "--checkpoint", str(tmp_path / f"{name}.ckpt.json"),  # noqa: E731
                                      "--report", str(tmp_path / name)], procs)
    run("one", 1)
    out2 = run("two", 2)
    assert "spread over 2 processes" in out2 or strategy == "layer"
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["scales"] == one["scales"] and two["history"] == one["history"]
    assert two["heldout"] == one["heldout"] and two["dev"] == one["dev"] and two["objective"] == one["objective"]
    # the work is counted as one process counts it (every process's share, not rank 0's alone)
    assert (two["evaluations"], two["doc_evaluations"], two["work"]) == (one["evaluations"], one["doc_evaluations"], one["work"])
    if strategy.startswith("grad"):
        steps = [h for h in one["history"] if h["split"] == "train"]
        assert len(steps) >= 2  # it ran steps
    # resumed with 2 processes from its own finished checkpoint: nothing computed again, the same result
    again = _qroar([*base, "--checkpoint", str(tmp_path / "two.ckpt.json"), "--report", str(tmp_path / "again")], 2)
    rep = json.loads((tmp_path / "again.json").read_text())
    assert rep["scales"] == one["scales"] and rep["evaluations"] == 0, again[-500:]
