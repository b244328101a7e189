"""Faults injected into real runs: out of memory inside a forward (evaluation, diagnostics capture,
quantization, an app job), a search killed twice and resumed, exports killed or failing mid-write.
Each must end with a clear message, memory released, nothing half-written, and a next run that works.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from conftest import TEXT, save_tiny
from test_bad_inputs import model_hash, tree_hash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine import Backend, ModelCache, ModelKey, perplexity_job  # noqa: E402
from app.jobs import DONE, FAILED, JobQueue  # noqa: E402
from qroar import export, perplexity, quant  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.diagnostics import DiagConfig, run_diagnostics  # noqa: E402
from qroar.errors import OutOfMemory  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RTN = QuantConfig(method="rtn", bits=3, group_size=32)
DOCS = [torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
EVAL = EvalConfig(lengths=(32, 64), max_windows_per_doc=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("faults") / "m")


def open_wb(path, quantize=True) -> Workbench:
    wb = Workbench.open(str(path), device="cpu", dtype="fp32")
    wb.set_pi(PIConfig("linear", 2.0))
    if quantize:
        wb.set_quant(RTN)
    wb.set_bands(BandConfig(n_bands=4))
    wb.set_scales([1.2, 0.9, 1.1, 0.95], ScaleConfig("shared", "before"))
    return wb


@pytest.fixture
def wb(model_dir):
    return open_wb(model_dir)


class OOMHook:
    """A forward hook that allocates a tensor (as a real forward would), then raises CUDA's out-of-memory
    error when `when(output)` is true; `seen` records the shapes it was called with."""

    def __init__(self, module, when, times=1):
        self.when, self.times, self.seen, self.refs = when, times, [], []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.seen.append(tuple(out.shape))
        if self.times and self.when(out):
            self.times -= 1
            scratch = torch.empty(1 << 20)  # 4 MiB the failed step had allocated
            self.refs.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def freed(self) -> bool:
        return all(r() is None for r in self.refs)

    def remove(self):
        self.handle.remove()


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- out of memory


def test_oom_in_evaluation_frees_memory_says_what_fits_and_the_next_run_works(wb):
    ref = wb.evaluate(DOCS, EVAL, "quant_scaled").table
    before, variant, hooks = model_hash(wb), wb._variant, hooks_on(wb.model)
    fault = OOMHook(wb.model.model.layers[1].self_attn.k_proj, lambda out: out.shape[1] == 64)
    with pytest.raises(OutOfMemory, match=r"Out of memory at length 64 with batch 1; memory was freed: "
                                          r"try a length of at most about (\d+) tokens") as caught:
        wb.evaluate(DOCS, EVAL, "quant_scaled")
    assert fault.freed() and caught.value.__context__ is None  # the error holds no tensor of the failed step
    fault.remove()
    assert model_hash(wb) == before and wb._variant == variant and hooks_on(wb.model) == hooks
    fit = int(re.search(r"at most about (\d+) tokens", str(caught.value)).group(1))
    assert 2 <= fit < 64
    assert not wb.evaluate(DOCS, EvalConfig(lengths=(fit,), max_windows_per_doc=1), "quant_scaled").table.empty
    again = wb.evaluate(DOCS, EVAL, "quant_scaled").table
    assert again.nll.tolist() == ref.nll.tolist()


def test_oom_with_automatic_batch_halves_the_batch_and_gives_the_same_numbers(wb, monkeypatch):
    ref = wb.evaluate(DOCS, EVAL, "quant_scaled").table
    monkeypatch.setattr(perplexity, "auto_batch_size", lambda model, length, n, chunk=1024: min(4, n))
    fault = OOMHook(wb.model.model.layers[0].self_attn.q_proj, lambda out: out.shape[0] > 2, times=1)
    got = wb.evaluate(DOCS, EvalConfig(lengths=(32, 64), max_windows_per_doc=2), "quant_scaled").table
    fault.remove()
    assert (4, 32, 64) in fault.seen and (2, 32, 64) in fault.seen  # tried 4 windows at once, then 2
    torch.testing.assert_close(torch.tensor(got.nll.tolist()), torch.tensor(ref.nll.tolist()), rtol=1e-5, atol=1e-4)
    assert fault.freed()


def test_oom_during_diagnostics_capture_removes_hooks_frees_memory_and_the_next_run_works(wb):
    cfg = DiagConfig(bands=None, capture_length=160, n_docs=1, noise_layers=(1,), noise_pairs=16)
    ref = run_diagnostics(wb, DOCS, cfg)
    before, variant, hooks = model_hash(wb), wb._variant, hooks_on(wb.model)
    fault = OOMHook(wb.model.model.layers[1].self_attn.k_proj, lambda out: True)  # inside the capture's own hooks
    with pytest.raises(OutOfMemory, match=r"Diagnostics at 160 tokens ran out of memory; memory was freed and the "
                                          r"model is unchanged\. Try a capture length of about 80 tokens"):
        run_diagnostics(wb, DOCS, cfg)
    assert fault.freed()
    fault.remove()
    assert model_hash(wb) == before and wb._variant == variant and hooks_on(wb.model) == hooks
    again = run_diagnostics(wb, DOCS, cfg)
    for name in ("tir", "quant_error", "logit_noise"):
        assert again.tables[name].equals(ref.tables[name]), name


def test_oom_during_quantization_restores_full_precision(model_dir, monkeypatch):
    wb = open_wb(model_dir, quantize=False)
    before = model_hash(wb)
    calls = []

    def failing(w, cfg, stats=None):
        calls.append(1)
        if len(calls) == 5:  # part-way through the model
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return quant.fake_quant(w, cfg)

    monkeypatch.setitem(quant.QUANTIZERS, "rtn", quant.Quantizer(failing))
    with pytest.raises(OutOfMemory, match=r"ran out of GPU memory; the model was restored"):
        wb.set_quant(RTN)
    assert model_hash(wb) == before and wb.qstate is None and wb.available_variants() == ("fp", "fp_scaled")
    monkeypatch.undo()
    wb.set_quant(RTN)  # the next run works
    assert wb.available_variants() == ("fp", "quant", "fp_scaled", "quant_scaled")


def test_oom_inside_an_app_job_is_a_message_and_the_next_job_works(model_dir):
    wb = open_wb(model_dir)
    backend = Backend(queue=JobQueue(), models=ModelCache(opener=lambda key: wb))
    key, pi = ModelKey(model_dir, "cpu", "fp32"), PIConfig("linear", 2.0)
    fault = OOMHook(wb.model.model.layers[0].self_attn.q_proj, lambda out: out.shape[1] == 64)
    rec = backend.registry.session("tab")
    job = backend.submit(rec, "perplexity", perplexity_job(backend, key, Recipe(pi=pi, quant=RTN), DOCS, EVAL))
    backend.queue.wait(job.id, 60)
    assert job.status == FAILED and "Out of memory at length 64" in job.error and "try a length" in job.error
    fault.remove()
    ok = backend.submit(rec, "perplexity", perplexity_job(backend, key, Recipe(pi=pi, quant=RTN), DOCS, EVAL))
    backend.queue.wait(ok.id, 60)
    assert ok.status == DONE and set(ok.result.summary.length) == {32, 64}
    assert backend.result(rec, "perplexity") is ok
    backend.queue.shutdown()


# ----------------------------------------------------------------------------- a search killed twice

def search_setup(model, corpus, checkpoint=None):
    """The same search in this process and in the child processes."""
    from qroar.search import SearchConfig

    wb = open_wb(model)
    wb.set_scales(None)
    wb.set_bands(BandConfig(n_bands=2))  # two bands keep the search to about a dozen evaluations
    cfg = SearchConfig(n_candidates=5, sweeps=1, lengths=(32, 64), dev_corpus=f"{corpus}/dev",
                       heldout_corpus=f"{corpus}/held", max_windows_per_doc=1, checkpoint=checkpoint)
    return wb, cfg, [(0.7, 1.3), (0.8, 1.25)]


def write_corpus(root: Path) -> Path:
    words = TEXT.split()
    for split, n in (("dev", 2), ("held", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            rng = random.Random(f"{split}{i}")
            (root / split / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)))
    return root


def evaluations(ck: Path) -> int:
    try:
        return len(json.loads(ck.read_text())["evaluations"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def search_child(model, corpus, checkpoint) -> None:
    """The search in a forked process: a real process, killed for real, without a second import of torch."""
    from qroar.search import search

    torch.set_num_threads(1)
    search(*search_setup(model, corpus, checkpoint))
    os._exit(0)


def run_until(args, ck: Path, at_least: int, timeout: float = 120) -> int:
    """Start the search in a child process, SIGKILL it once the checkpoint holds `at_least` evaluations."""
    child = multiprocessing.get_context("fork").Process(target=search_child, args=args, daemon=True)
    child.start()
    deadline = time.time() + timeout
    try:
        while evaluations(ck) < at_least:
            assert child.is_alive(), f"the search ended (exit code {child.exitcode}) before it could be killed"
            assert time.time() < deadline, "the search made no progress"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    return evaluations(ck)


def test_search_killed_at_two_points_resumes_to_the_uninterrupted_result(model_dir, tmp_path):
    from qroar.search import search

    corpus = write_corpus(tmp_path / "corpus")
    wb, cfg, windows = search_setup(model_dir, corpus)
    ref = search(wb, cfg, windows)
    ck = tmp_path / "ck.json"
    args = (model_dir, corpus, str(ck))
    first = run_until(args, ck, 2)  # killed early in the sweep
    second = run_until(args, ck, first + 3)  # resumed, killed again further on
    assert 2 <= first < second < ref.evaluations
    wb2, cfg2, _ = search_setup(model_dir, corpus, str(ck))
    r = search(wb2, cfg2, windows)
    assert r.scales == ref.scales and r.objective == ref.objective
    assert r.reused == second and r.evaluations == ref.evaluations - second
    assert r.heldout.equals(ref.heldout)


# ----------------------------------------------------------------------------- exports killed mid-write

WRITER = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from qroar.export import atomic_write_bytes, atomic_replace_dir
target, mode = Path({target!r}), {mode!r}
i = 0
while True:
    tag = b"AB"[i % 2:i % 2 + 1]
    if mode == "file":
        atomic_write_bytes(target, tag * {size})
    else:
        build = target.with_name(".build-%d" % i)
        build.mkdir()
        for n in range(4):
            (build / ("part%d" % n)).write_bytes(tag * ({size} // 4))
        atomic_replace_dir(build, target)
    i += 1
    print(i, flush=True)
"""


def uniform(data: bytes) -> bytes | None:
    """The one byte a file is made of, or None when it mixes contents (a torn write)."""
    return data[:1] if data and data.count(data[:1]) == len(data) else None


@pytest.mark.parametrize("mode", ["file", "folder"])
def test_atomic_writes_killed_at_random_moments_leave_a_whole_old_or_new_version(tmp_path, mode):
    size = 32 << 20
    target = tmp_path / ("scales.json" if mode == "file" else "export")
    if mode == "file":
        target.write_bytes(b"O" * size)
    else:
        target.mkdir()
        for n in range(4):
            (target / f"part{n}").write_bytes(b"O" * (size // 4))
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT), target=str(target), mode=mode, size=size))
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child.stdout.readline()  # one version is in place: the next write is under way
        time.sleep(rng.uniform(0.0, 0.15))
        child.kill()
        child.wait()
        if mode == "file":
            data = target.read_bytes()
            assert len(data) == size and uniform(data) in (b"O", b"A", b"B")
        else:
            parts = [target / f"part{n}" for n in range(4)]
            tags = {uniform(p.read_bytes()) for p in parts}
            assert sorted(p.name for p in target.iterdir()) == [p.name for p in parts]
            assert len(tags) == 1 and tags <= {b"A", b"B"}  # every part from one and the same version
            for p in parts:
                assert p.stat().st_size == size // 4


def test_failed_folder_export_keeps_the_old_folder_whole(wb, tmp_path, monkeypatch):
    out = export.export_checkpoint(wb, tmp_path / "export")
    before = tree_hash(out)
    wb.set_scales([1.5, 1.5, 1.5, 1.5])

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wb.tokenizer, "save_pretrained", disk_full)  # after the weights, before the move
    with pytest.raises(OSError, match="No space left"):
        export.export_checkpoint(wb, out, overwrite=True)
    assert tree_hash(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_folder_swap_without_atomic_exchange_puts_the_old_folder_back(tmp_path, monkeypatch):
    final, build = tmp_path / "export", tmp_path / "build"
    for d, tag in ((final, "old"), (build, "new")):
        d.mkdir()
        (d / "config.json").write_text(tag)
    monkeypatch.setattr(export, "_exchange", lambda a, b: False)  # e.g. a filesystem without RENAME_EXCHANGE
    real = os.replace

    def second_rename_fails(src, dst):
        if Path(src) == build:
            raise OSError("interrupted")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="interrupted"):
        export.atomic_replace_dir(build, final)
    assert (final / "config.json").read_text() == "old"
    # a kill between the two renames leaves the old folder parked; the next swap puts it back first
    monkeypatch.setattr(os, "replace", real)
    os.replace(final, tmp_path / ".export.old")
    export.atomic_replace_dir(build, tmp_path / "export")
    assert (final / "config.json").read_text() == "new" and not (tmp_path / ".export.old").exists()


def test_atomic_exchange_is_used_where_the_os_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("A")
    (b / "y").write_text("B")
    if not export._exchange(a, b):
        pytest.skip("this OS or filesystem has no atomic exchange: the two-rename fallback is tested above")
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
    gc.collect()
