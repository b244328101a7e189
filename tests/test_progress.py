"""The time-left estimate on known synthetic timelines, and the CLI bar that shows it."""

import re
import time

import pytest

from qroar.progress import Estimator, format_seconds


def feed(est, points):
    for t, f in points:
        est.update(f, t)


def test_constant_rate_gives_the_exact_time_left_and_counts_down_between_steps():
    est = Estimator()
    feed(est, [(0.0, 0.0), (2.0, 0.02)])
    assert est.seconds_left(2.0) is None  # one step is not a rate yet
    feed(est, [(4.0, 0.04), (6.0, 0.06)])
    assert est.seconds_left(6.0) == pytest.approx(0.94 / 0.01)
    assert est.seconds_left(7.0) == pytest.approx(0.94 / 0.01 - 1.0)
    feed(est, [(t, t / 100) for t in range(8, 52, 2)])
    assert est.seconds_left(50.0) == pytest.approx(50.0)


def test_a_quick_start_up_is_not_taken_for_the_pace_of_the_work():
    """A cached model and a quick quantization take the job to 30% in 2 s; the evaluations after it
    take 10 s per 1%. No figure from the start-up's pace: unknown until the work has a pace of its own."""
    est = Estimator()
    feed(est, [(0.0, 0.0)] + [(0.1 * i, 0.015 * i) for i in range(1, 21)])  # 30% in 2 s, 20 quick steps
    quick = est.seconds_left(2.0)
    assert quick is not None and quick < 10  # what the start-up alone suggests
    assert est.seconds_left(5.0) is None  # the first evaluation is overdue at that pace: not known
    feed(est, [(12.0, 0.31)])
    assert est.seconds_left(12.0) is None  # a new, slower pace: one step of it is not a rate
    feed(est, [(22.0, 0.32), (32.0, 0.33)])
    assert est.seconds_left(32.0) == pytest.approx(0.67 / 0.001)


def test_with_the_start_up_share_known_nothing_before_it_is_measured():
    est = Estimator(work_from=0.3)
    feed(est, [(0.0, 0.0)] + [(0.1 * i, 0.015 * i) for i in range(1, 20)] + [(2.0, 0.3)])
    assert est.seconds_left(2.0) is None  # 30% done in 2 s says nothing about the other 70%
    feed(est, [(12.0, 0.31), (22.0, 0.32), (32.0, 0.33)])
    assert est.seconds_left(32.0) == pytest.approx(0.67 / 0.001)


def test_a_slow_start_is_left_out_of_the_rate():
    """30 s to load the model (5%), then 1% per second."""
    est = Estimator()
    feed(est, [(0.0, 0.0), (30.0, 0.05), (31.0, 0.06), (32.0, 0.07)])
    assert est.seconds_left(32.0) is None  # two steps at the new pace
    feed(est, [(33.0, 0.08)])
    assert est.seconds_left(33.0) == pytest.approx(92.0)


def test_a_stall_makes_the_time_left_unknown_and_progress_brings_it_back():
    est = Estimator()
    feed(est, [(float(t), t / 100) for t in range(0, 11)])
    assert est.seconds_left(10.0) == pytest.approx(90.0)
    assert est.seconds_left(13.0) == pytest.approx(87.0)
    assert est.seconds_left(15.0) is None  # nothing for 5 steps' time
    feed(est, [(16.0, 0.11), (17.0, 0.12), (18.0, 0.13)])
    assert est.seconds_left(18.0) is None  # a slower step starts a new pace: three steps of it are needed
    est.update(0.14, 19.0)
    assert est.seconds_left(19.0) == pytest.approx(86.0)


def test_done_is_zero_left_and_steps_of_different_size_keep_one_rate():
    est = Estimator()
    # racing: rungs of 1, 2 and 6 documents, each document 1 s and 1%
    feed(est, [(0.0, 0.0), (1.0, 0.01), (2.0, 0.02), (4.0, 0.04), (10.0, 0.10), (11.0, 0.11)])
    assert est.seconds_left(11.0) == pytest.approx(89.0)
    est.update(1.0, 12.0)
    assert est.seconds_left(12.0) == 0.0


def test_format_seconds_says_estimating_when_unknown():
    assert format_seconds(None) == "estimating..."
    assert format_seconds(4.4) == "4 s" and format_seconds(125) == "2 min 05 s"


def test_cli_progress_bar_shows_the_estimators_one_figure(monkeypatch, capsys):
    from qroar.cli import ProgressBar

    clock = [100.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    bar = ProgressBar()
    lines = []
    for i in range(1, 6):
        clock[0] = 100.0 + 2 * i
        bar(0.1 * i, "1 of at most 52 document evaluations · a message that names no time")
        lines.append(capsys.readouterr().err)
    assert "estimating..." in lines[1] and "left" not in lines[1]
    assert "10 s left" in lines[4]  # 50% in 10 s at a steady 10% per 2 s
    assert all(len(re.findall(r"\beta\b|\bleft\b|estimating", s)) == 1 for s in lines)
