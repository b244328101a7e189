"""The app's job queue and model cache: FIFO, no interleaving, cancel, progress/ETA, failures, owners."""

import re
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine import (  # noqa: E402
    Backend, LoadedModel, ModelCache, ModelKey, Sessions, default_group_size, group_size_options,
)
from app.jobs import CANCELLED, DONE, FAILED, JobQueue, format_seconds, panel_text  # noqa: E402
from qroar.errors import Cancelled, ConfigError  # noqa: E402


@pytest.fixture
def q():
    queue = JobQueue()
    yield queue
    queue.shutdown()


def test_jobs_run_in_submission_order(q):
    order = []
    jobs = [q.submit("k", "a", lambda p, c, i=i: order.append(i) or i) for i in range(6)]
    for j in jobs:
        q.wait(j.id, 10)
    assert order == list(range(6))
    assert [j.result for j in jobs] == list(range(6))
    assert all(j.status == DONE and j.progress == 1.0 for j in jobs)


def test_two_submitters_never_interleave(q):
    events, live, peak = [], [0], [0]
    lock = threading.Lock()

    def work(tag):
        def fn(progress, cancel):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            events.append(("start", tag))
            time.sleep(0.01)
            events.append(("end", tag))
            with lock:
                live[0] -= 1
        return fn

    def submitter(owner):
        for i in range(8):
            q.submit("k", owner, work(f"{owner}{i}"))

    threads = [threading.Thread(target=submitter, args=(o,)) for o in ("tab1", "tab2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.wait_idle(20)
    assert peak[0] == 1
    assert len(events) == 32
    for a, b in zip(events[::2], events[1::2]):  # every start is followed by its own end
        assert a[0] == "start" and b == ("end", a[1])


def test_cancel_running_job_stops_it_and_cancel_queued_job_never_runs(q):
    started = threading.Event()
    ran = []

    def long(progress, cancel):
        started.set()
        for _ in range(500):
            if cancel.is_set():
                raise Cancelled("stopped by the user")
            time.sleep(0.01)
        return "finished"

    running = q.submit("k", "a", long)
    queued = q.submit("k", "a", lambda p, c: ran.append(1))
    assert started.wait(5)
    assert q.cancel(queued.id) and queued.status == CANCELLED
    assert q.cancel(running.id)
    q.wait(running.id, 5)
    assert running.status == CANCELLED and running.error == "stopped by the user" and running.result is None
    time.sleep(0.05)
    assert ran == []
    assert not q.cancel(running.id)  # already finished


def test_time_left_follows_the_pace_of_the_work_not_of_the_start_up(q):
    """Half the bar is start-up (a cached model: instant); then 5% per 0.3 s. The time left is the
    work's pace times what is left (about 1.8 s at 70%), not elapsed * (1 - p) / p (0.5 s)."""
    release, steps = threading.Event(), threading.Event()

    def fn(progress, cancel):
        progress(0.5, "start-up done")
        for i in range(1, 5):
            time.sleep(0.3)
            progress(0.5 + 0.05 * i, f"step {i}")
        steps.set()
        release.wait(5)
        return "ok"

    fn.work_from = 0.5
    job = q.submit("k", "a", fn)
    assert steps.wait(5)
    assert job.progress == pytest.approx(0.7) and job.message == "step 4"
    left = job.eta
    assert left is not None and 1.2 < left < 2.0
    bar, caption = panel_text(job)
    assert bar.endswith("step 4") and caption.endswith(f"about {format_seconds(left)} left")
    release.set()
    q.wait(job.id, 5)
    assert job.eta is None and job.progress == 1.0


def test_search_job_panel_shows_one_time_left_figure(q, tmp_path, one_thread):
    """A racing search through the queue: at every report the panel has one time-left figure, in its
    caption; the search's own messages carry none (they used to add "(eta 1870s)")."""
    from conftest import save_tiny
    from test_search import RTN, WINDOWS, cfg_for, make_corpus

    from qroar.bands import BandConfig
    from qroar.rope import PIConfig
    from qroar.search import search
    from qroar.workbench import Workbench

    corpus = make_corpus(tmp_path)
    wb = Workbench.open(save_tiny(tmp_path / "m"), device="cpu", dtype="fp32")
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(RTN)
    wb.set_bands(BandConfig(n_bands=4))
    submitted, seen = threading.Event(), []
    holder = {}

    def fn(progress, cancel):
        submitted.wait(5)

        def report(f, m):
            progress(f, m)
            seen.append(panel_text(holder["job"]))
        return search(wb, cfg_for(corpus, strategy="race"), WINDOWS, progress=report, cancel=cancel)

    holder["job"] = q.submit("search", "a", fn, label="Search over 4 bands, racing")
    submitted.set()
    q.wait(holder["job"].id, 120)
    assert holder["job"].status == DONE and len(seen) > 10
    for bar, caption in seen:
        assert len(re.findall(r"\beta\b|\bleft\b", f"{bar} {caption}")) == 1, (bar, caption)
        assert re.search(r"(estimating time left|about \d+ (min \d+ )?s left)$", caption), caption


def test_user_error_is_captured_with_its_message_and_a_bug_keeps_the_worker_alive(q):
    def bad_setting(p, c):
        raise ConfigError("group size 96 does not divide 64; choose 32")

    def bug(p, c):
        raise ZeroDivisionError("oops")

    j1 = q.submit("k", "a", bad_setting)
    j2 = q.submit("k", "a", bug)
    j3 = q.submit("k", "a", lambda p, c: 42)
    for j in (j1, j2, j3):
        q.wait(j.id, 5)
    assert j1.status == FAILED and j1.error == "group size 96 does not divide 64; choose 32"
    assert j2.status == FAILED and "ZeroDivisionError" in j2.error and "bug" in j2.error
    assert j3.status == DONE and j3.result == 42


def test_results_are_retrievable_by_owner_and_kind(q):
    a1 = q.submit("load", "alice", lambda p, c: "model")
    b1 = q.submit("perplexity", "bob", lambda p, c: "b-ppl")
    a2 = q.submit("perplexity", "alice", lambda p, c: "a-ppl-1")
    a3 = q.submit("perplexity", "alice", lambda p, c: "a-ppl-2")
    q.wait_idle(5)
    assert q.jobs(owner="alice") == [a1, a2, a3]
    assert q.jobs(owner="bob", kind="perplexity") == [b1]
    assert q.latest("alice", "perplexity").result == "a-ppl-2"
    assert q.latest("carol", "perplexity") is None


def test_queue_position_counts_jobs_ahead(q):
    gate = threading.Event()
    first = q.submit("k", "a", lambda p, c: gate.wait(5))
    second = q.submit("k", "b", lambda p, c: None)
    third = q.submit("k", "a", lambda p, c: None)
    time.sleep(0.05)
    assert (q.position(first), q.position(second), q.position(third)) == (0, 1, 2)
    gate.set()
    q.wait_idle(5)


def test_session_record_survives_and_keeps_the_last_job_of_each_kind():
    backend = Backend(queue=JobQueue())
    rec = backend.registry.session("tok")
    assert backend.registry.session("tok") is rec and "tok" in backend.registry
    backend.submit(rec, "perplexity", lambda p, c: 1)
    j = backend.submit(rec, "perplexity", lambda p, c: 2)
    backend.queue.wait_idle(5)
    assert rec.jobs["perplexity"] is j and j.result == 2 and j.owner == "tok"
    assert Sessions.new_token() != Sessions.new_token()
    backend.submit(rec, "perplexity", lambda p, c: (_ for _ in ()).throw(ConfigError("no lengths")))
    backend.queue.wait_idle(5)
    assert rec.jobs["perplexity"].status == FAILED
    assert backend.result(rec, "perplexity") is j  # the last good result stays visible after a failed run
    assert backend.result(rec, "search") is None
    backend.queue.shutdown()


def test_model_cache_loads_once_per_key_and_evicts_the_oldest():
    opened = []
    cache = ModelCache(max_models=1, opener=lambda k: opened.append(k.name) or f"wb:{k.name}")
    a, b = ModelKey("a"), ModelKey("b")
    assert cache.get(a).wb == "wb:a" and cache.get(a).wb == "wb:a"
    assert opened == ["a"]
    cache.get(b)
    assert cache.keys() == [b] and cache.peek(a) is None
    cache.get(a)
    assert opened == ["a", "b", "a"]
    assert ModelKey.from_dict(a.to_dict()) == a


def test_quantized_state_depends_on_the_pi_only_for_calibrated_methods():
    from qroar.quant import QuantConfig
    from qroar.recipe import Recipe
    from qroar.rope import PIConfig

    rtn, yarn4, yarn8 = QuantConfig("rtn", 4, 64), PIConfig("yarn", 4.0), PIConfig("yarn", 8.0)
    assert Recipe(pi=yarn4, quant=rtn).quant_key() == Recipe(pi=yarn8, quant=rtn).quant_key()  # RTN ignores PI
    gptq = QuantConfig("gptq", 4, 64)
    assert Recipe(pi=yarn4, quant=gptq).quant_key() != Recipe(pi=yarn8, quant=gptq).quant_key()  # GPTQ calibrates under PI
    assert Recipe(pi=yarn4, quant=gptq).quant_key() != Recipe(pi=yarn4, quant=gptq, calib="x").quant_key()
    assert Recipe(quant=QuantConfig("none")).quant_key() is None


def test_group_size_options_divide_every_width():
    # SmolLM2: hidden 576 = 9 x 64, intermediate 1536
    assert group_size_options([576, 1536]) == [16, 32, 64, 0, -2]
    assert group_size_options([4096, 11008]) == [16, 32, 64, 128, 256, 0, -2]  # 11008 = 2^8 x 43
    assert group_size_options(None) == [16, 32, 64, 128, 256, 512, 1024, 0, -2]
    assert default_group_size([16, 32, 64, 0]) == 64 and default_group_size([0]) == 0


def test_format_seconds():
    assert format_seconds(None) == "estimating..."
    assert format_seconds(4.4) == "4 s" and format_seconds(125) == "2 min 05 s"
