"""One background worker per process: every GPU computation of every browser tab runs here, in order.

A page submits a function `fn(progress, cancel) -> result`; the worker runs jobs one at a time
(FIFO), so two tabs never interleave work on the same model. A job records its progress, time left,
result or error; `qroar` errors become a message for the user, anything else is logged as a bug.
The time left is qroar.progress's estimate (the CLI's too); a job function may set `fn.work_from`
to the share of its progress that is start-up (model load, quantization), never measured.
Pure Python: no Streamlit here, so the queue is testable on its own.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from qroar.errors import Cancelled, QroarError
from qroar.progress import Estimator, format_seconds

log = logging.getLogger("qroar.app.jobs")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

Progress = Callable[[float, str], None]
JobFn = Callable[[Progress, threading.Event], Any]


@dataclass(eq=False)
class Job:
    id: str
    kind: str  # "load", "perplexity", "diagnostics", "search", ...
    owner: str  # session token of the tab that submitted it
    label: str
    fn: JobFn = field(repr=False)
    status: str = QUEUED
    progress: float = 0.0
    message: str = "waiting for the worker"
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = field(default=None, repr=False)
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    meta: dict = field(default_factory=dict)  # settings the job ran with, for display and re-attach
    on_done: Callable[["Job", Any], None] | None = field(default=None, repr=False)  # (job, result) on success
    estimate: Estimator = field(init=False, repr=False)

    def __post_init__(self):
        self.estimate = Estimator(work_from=getattr(self.fn, "work_from", 0.0))

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left at the recent pace of the work (qroar.progress.Estimator); None while not known."""
        if self.status != RUNNING:
            return None
        return self.estimate.seconds_left()

    def report(self, fraction: float, message: str = "") -> None:
        """The `progress` callback handed to the engine."""
        self.progress = min(max(float(fraction), 0.0), 1.0)
        self.estimate.update(self.progress)
        if message:
            self.message = message


class JobQueue:
    """A FIFO of jobs consumed by a single daemon worker thread (started on first submit)."""

    def __init__(self, keep: int = 200):
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._keep = keep  # finished jobs kept for look-up; older ones are forgotten
        self._worker: threading.Thread | None = None
        self.current: Job | None = None

    # ------------------------------------------------------------------ submitting and looking up

    def submit(self, kind: str, owner: str, fn: JobFn, label: str = "", meta: dict | None = None,
               on_done: Callable[[Job, Any], None] | None = None) -> Job:
        with self._lock:
            job = Job(id=f"{kind}-{next(self._ids)}", kind=kind, owner=owner, label=label or kind, fn=fn,
                      meta=dict(meta or {}), on_done=on_done)
            self._jobs[job.id] = job
            self._forget_old()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="qroar-worker", daemon=True)
                self._worker.start()
        self._q.put(job)
        return job

    def get(self, job_id: str | None) -> Job | None:
        return self._jobs.get(job_id) if job_id else None

    def jobs(self, owner: str | None = None, kind: str | None = None) -> list[Job]:
        """Jobs in submission order, optionally of one owner and/or kind."""
        with self._lock:
            return [j for j in self._jobs.values()
                    if (owner is None or j.owner == owner) and (kind is None or j.kind == kind)]

    def latest(self, owner: str, kind: str) -> Job | None:
        js = self.jobs(owner, kind)
        return js[-1] if js else None

    def active(self, owner: str | None = None) -> list[Job]:
        return [j for j in self.jobs(owner) if not j.is_finished]

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0 = running or next)."""
        if job.status != QUEUED:
            return 0
        ahead = [j for j in self.jobs() if not j.is_finished and j.submitted <= job.submitted and j is not job]
        return len(ahead)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or ask a running one to stop at its next safe point."""
        job = self.get(job_id)
        if job is None or job.is_finished:
            return False
        job.cancel_event.set()
        with self._lock:
            if job.status == QUEUED:
                self._finish(job, CANCELLED, error="Cancelled before it started.")
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (for tests and scripts)."""
        deadline = None if timeout is None else time.time() + timeout
        with self._lock:
            job = self._jobs[job_id]
            while not job.is_finished:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
                self._idle.wait(left)
            return job

    def wait_idle(self, timeout: float | None = None) -> None:
        for job in self.active():
            self.wait(job.id, timeout)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                if job.is_finished:  # cancelled while queued
                    continue
                job.status, job.started, job.message = RUNNING, time.time(), "starting"
                job.estimate.update(0.0, job.started)
                self.current = job
            status, result, error = DONE, None, None
            try:
                result = job.fn(job.report, job.cancel_event)
                if job.cancel_event.is_set():
                    status, error = CANCELLED, "Cancelled."
            except Cancelled as e:
                status, error = CANCELLED, str(e) or "Cancelled."
            except QroarError as e:
                status, error = FAILED, str(e)
            except Exception as e:  # a bug, not a user error: log it, keep the worker alive
                log.exception("job %s (%s) crashed", job.id, job.kind)
                status, error = FAILED, f"Unexpected error ({type(e).__name__}: {e}). This is a bug; the details are in the server log."
            if status == DONE and job.on_done is not None:  # before the job reads as done, so waiters see its effect
                try:
                    job.on_done(job, result)
                except Exception:  # keeping a record must never lose the result itself
                    log.exception("job %s (%s): on_done failed", job.id, job.kind)
            with self._lock:
                self.current = None
                self._finish(job, status, result, error)

    def _finish(self, job: Job, status: str, result: Any = None, error: str | None = None) -> None:
        job.status, job.result, job.error, job.finished = status, result, error, time.time()
        if status == DONE:
            job.progress, job.message = 1.0, "done"
        self._idle.notify_all()

    def _forget_old(self) -> None:
        done = [k for k, j in self._jobs.items() if j.is_finished]
        for k in done[: max(0, len(done) - self._keep)]:
            del self._jobs[k]

    def shutdown(self) -> None:
        self._q.put(None)


def panel_text(job: Job, ahead: int = 0) -> tuple[str, str]:
    """The running-job panel's two lines: the bar's text and the caption under it, which holds the
    one time-left figure (engine messages carry none). `ahead`: jobs before a queued one."""
    if job.status == QUEUED:
        return f"{job.label}: waiting for {ahead} job(s) ahead in the queue (one computation at a time)", "queued"
    left = job.eta
    left = "estimating time left" if left is None else f"about {format_seconds(left)} left"
    return f"{job.label}: {job.message}", f"{100 * job.progress:.0f}% · elapsed {format_seconds(job.elapsed)} · {left}"
