"""Time left from measured throughput: the one estimate behind the CLI's progress bar and the dashboard's job panel.

A job reports (fraction done, time). Its first part is often fixed start-up (loading the model,
quantizing, tokenizing) whose pace says nothing about the rest, and work can change pace on the way
(a cached model makes the first 30% instant, the evaluations after it take minutes). So:

- a step is one increase of the fraction; steps that start below `work_from` (the start-up share of
  the job, when the caller knows it) are never measured;
- a step more than JUMP times slower than the median of the steps kept so far starts a new pace:
  the earlier steps are dropped. Leading kept steps JUMP times slower than the median (a slow start
  before quick steps) are left out of the rate;
- the rate is sum(fraction) / sum(seconds) over the last `recent` steps kept, and the time left is
  (1 - fraction) / rate less the time since the last step;
- it is unknown (None: "estimating...") until `min_steps` steps over at least `min_seconds` are kept,
  and again when no step has come for JUMP times the longest kept step (a stall or a slower phase).
"""

from __future__ import annotations

import threading
import time
from statistics import median

JUMP = 4.0


class Estimator:
    """Feed it (fraction, time) as progress is reported; `seconds_left()` is the estimate or None."""

    def __init__(self, work_from: float = 0.0, recent: int = 12, min_steps: int = 3, min_seconds: float = 1.0):
        self.work_from, self.recent, self.min_steps, self.min_seconds = float(work_from), recent, min_steps, min_seconds
        self.last: tuple[float, float] | None = None  # (time, fraction) of the latest increase
        self.steps: list[tuple[float, float]] = []  # (fraction gained, seconds) of the current pace
        self._lock = threading.Lock()  # the worker updates while a page reads

    def update(self, fraction: float, now: float | None = None) -> None:
        now = time.time() if now is None else float(now)
        f = min(max(float(fraction), 0.0), 1.0)
        with self._lock:
            if self.last is None:
                self.last = (now, f)
                return
            t0, f0 = self.last
            if f <= f0:
                return
            self.last = (now, f)
            if f0 < self.work_from:
                return
            step = (f - f0, max(now - t0, 1e-9))
            if self.steps and _rate(step) * JUMP < median(_rate(s) for s in self.steps):
                self.steps = []  # a slower pace begins: what came before does not predict the rest
            self.steps = (self.steps + [step])[-self.recent:]

    @property
    def fraction(self) -> float:
        return 0.0 if self.last is None else self.last[1]

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds left at the recent pace; None while that pace is not known (see the module docstring)."""
        now = time.time() if now is None else float(now)
        with self._lock:
            if self.last is None:
                return None
            t_last, f = self.last
            if f >= 1.0:
                return 0.0
            steps = list(self.steps)
        if steps:
            mid = median(_rate(s) for s in steps)
            while steps and _rate(steps[0]) * JUMP < mid:
                steps.pop(0)
        if len(steps) < self.min_steps or sum(dt for _, dt in steps) < self.min_seconds:
            return None
        since = now - t_last
        if since > max(JUMP * max(dt for _, dt in steps), self.min_seconds):
            return None
        rate = sum(df for df, _ in steps) / sum(dt for _, dt in steps)
        return max((1.0 - f) / rate - since, 0.0)


def _rate(step: tuple[float, float]) -> float:
    return step[0] / step[1]


def format_seconds(s: float | None) -> str:
    """"2 min 05 s", "4 s", or "estimating..." when the time left is not known."""
    if s is None:
        return "estimating..."
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"
