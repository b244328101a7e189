"""Chart builders of the Q-ROAR pages on synthetic DataFrames (no Streamlit, no model)."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import qroar_charts as qc  # noqa: E402


def summary(scaled=(10.0, 19.0), quant=(10.5, 20.0), fp=(10.0, 18.0), lengths=(256, 1024)):
    rows = [dict(variant=v, length=n, ppl=p, tokens=1000) for v, ps in (("fp", fp), ("quant", quant), ("quant_scaled", scaled))
            for n, p in zip(lengths, ps)]
    return pd.DataFrame(rows)


def windows(n=3):
    return pd.DataFrame(dict(band=range(n), g_min=[0.98, 0.9, 0.8][:n], g_max=[1.02, 1.1, 1.25][:n],
                             reason=["tight", "mid", "wide"][:n]))


def test_change_table_gives_percent_changes_known_by_hand():
    t = qc.change_table(summary())
    assert t["length"].tolist() == [256, 1024]
    assert t["PTQ vs FP %"].tolist() == pytest.approx([5.0, 100 * (20 / 18 - 1)])
    assert t["scaled vs PTQ %"].tolist() == pytest.approx([100 * (10 / 10.5 - 1), -5.0])
    only_fp = qc.change_table(summary().query("variant == 'fp'"))
    assert list(only_fp.columns) == ["length", "ppl fp"]


def test_tune_figure_draws_three_curves_and_the_change_panel():
    fig = qc.tune_figure(summary(), trained_context=256)
    names = [t.name for t in fig.data]
    assert names[:3] == ["FP (full precision)", "PTQ (quantized)", "PTQ + scales"]
    change = fig.data[3]
    assert list(change.y) == pytest.approx([100 * (10 / 10.5 - 1), -5.0])
    assert change.yaxis == "y2" and fig.layout.xaxis.type == "log"
    assert len(fig.layout.shapes) == 2 + 1  # trained-context line in both panels, zero line


def test_tune_figure_shows_the_previous_scales_dashed_and_works_without_a_quantizer():
    fig = qc.tune_figure(summary(), 256, previous=summary(scaled=(10.4, 19.5)))
    prev = [t for t in fig.data if t.name == "previous scales"]
    assert len(prev) == 1 and prev[0].line.dash == "dash" and list(prev[0].y) == [10.4, 19.5]
    fp_only = qc.tune_figure(summary().query("variant != 'quant'"))
    assert len(fp_only.data) == 2 and "yaxis2" not in fp_only.layout.to_plotly_json()
    with pytest.raises(ValueError):
        qc.tune_figure(summary().iloc[0:0])


def test_scales_figure_puts_each_window_around_its_scale():
    fig = qc.scales_figure([1.0, 1.05, 0.8], windows())
    bar, points = fig.data[0], fig.data[1]
    assert list(bar.base) == [1.0] * 3 and list(bar.y) == pytest.approx([0.0, 0.05, -0.2])
    assert list(points.y) == [1.0, 1.05, 0.8]
    lo = [g - e for g, e in zip(points.y, points.error_y.arrayminus)]
    hi = [g + e for g, e in zip(points.y, points.error_y.array)]
    assert lo == pytest.approx([0.98, 0.9, 0.8]) and hi == pytest.approx([1.02, 1.1, 1.25])
    folds = pd.DataFrame(dict(band=[0, 1, 2], mean=[1, 1, 1], std=[0, 0, 0], fold0=[1.0, 1.1, 0.9], fold1=[1.0, 1.0, 0.8]))
    with_folds = qc.scales_figure([1.0, 1.05, 0.8], windows(), folds)
    assert [t.name for t in with_folds.data[2:]] == ["k-fold choices"] * 2
    with pytest.raises(ValueError):
        qc.scales_figure([1.0, 1.0], windows())


def history():
    """Two bands, three candidates each; band 1's largest candidate fails the guard."""
    rows = []
    for b in (0, 1):
        for g, d_obj, d_short in ((0.9, 0.01, 0.001), (1.1, -0.02, 0.002), (1.2, -0.03, 0.02)):
            bad = b == 1 and g == 1.2
            rows.append(dict(fold="all", sweep=0, band=b, g=g, objective=None if bad else 2.0 + d_obj,
                             short_log_ppl=1.5 + d_short, guard_ok=not bad))
    return pd.DataFrame(rows)


def test_trace_positions_spread_candidates_by_scale_within_their_band():
    x = qc.trace_positions(history())
    assert x.iloc[0] < x.iloc[1] < x.iloc[2] < 0.5 < x.iloc[3] < x.iloc[4] < x.iloc[5]
    assert x.iloc[1] == pytest.approx(0.0) and x.iloc[4] == pytest.approx(1.0)


def test_trace_figure_separates_rejected_candidates_and_marks_the_chosen():
    fig = qc.trace_figure(history(), baseline_objective=2.0, baseline_short=1.5, guard_tol=0.005, chosen=[1.2, 1.1])
    top = fig.data[0]
    assert top.name == "sweep 1" and len(top.y) == 5  # the rejected candidate has no objective
    assert top.y[0] == pytest.approx(100 * (math.exp(0.01) - 1))
    rejected = [t for t in fig.data if t.name == "rejected by the guard"]
    assert len(rejected) == 1 and list(rejected[0].y) == pytest.approx([100 * (math.exp(0.02) - 1)])
    assert rejected[0].marker.symbol == "x"
    chosen = [t for t in fig.data if t.name == "chosen"][0]
    assert list(chosen.y) == pytest.approx([100 * (math.exp(-0.03) - 1), 100 * (math.exp(-0.02) - 1)])
    guard = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert guard and guard[0].y0 == pytest.approx(0.5)


def test_tune_figure_draws_the_fp_plus_scales_control_dashed():
    s = pd.concat([summary(), pd.DataFrame([dict(variant="fp_scaled", length=n, ppl=p, tokens=1000)
                                            for n, p in ((256, 9.5), (1024, 17.0))])], ignore_index=True)
    fig = qc.tune_figure(s, trained_context=256)
    control = next(t for t in fig.data if t.name == "FP + scales (control)")
    assert list(control.y) == [9.5, 17.0] and control.line.dash == "dash"


# ----------------------------------------------------------------------------- intervals and the control


def tidy(windows=((2.0, 2.2), (2.4, 2.1)), shift=None):
    """A tidy per-document table (two documents, one length) with each window's sums, 100 tokens a window:
    variant -> per-window log-ppl offset, so every variant reads the same windows."""
    shift = shift or {"fp": (0.0, 0.0), "quant": (0.05, 0.04), "quant_scaled": (0.03, 0.03), "fp_scaled": (0.0, -0.01)}
    rows = []
    for v, (d0, d1) in shift.items():
        for doc, ws in enumerate(windows):
            nll = [100 * (x + (d0 if i == 0 else d1)) for i, x in enumerate(ws)]
            rows.append(dict(variant=v, doc=doc, length=256, windows=len(ws), tokens=100 * len(ws), nll=sum(nll),
                             ppl=math.exp(sum(nll) / (100 * len(ws))), window_nll=nll, window_tokens=[100] * len(ws)))
    return pd.DataFrame(rows)


def summary_of(table):
    from qroar.perplexity import summarize

    return pd.concat([summarize(g).assign(variant=v) for v, g in table.groupby("variant", sort=False)], ignore_index=True)


def test_change_table_gives_each_change_a_paired_interval_and_the_control():
    t = tidy()
    c = qc.change_table(summary_of(t), t)
    assert {"ppl fp_scaled", "FP + scales vs FP %", "FP + scales vs FP 95%", "scaled vs PTQ 95%"} <= set(c.columns)
    assert c["windows"].tolist() == [4]
    # scaled - quant per window: -0.02, -0.02 (first windows), -0.01, -0.01: a narrow interval below 0
    lo, hi = (float(x.rstrip("%")) for x in c["scaled vs PTQ 95%"].iloc[0].split(" to "))
    assert lo < c["scaled vs PTQ %"].iloc[0] < hi < 0
    assert "FP + scales vs FP" in qc.change_note(c) and "paired on the same windows" in qc.change_note(c)
    one = tidy(windows=((2.0,),))
    c1 = qc.change_table(summary_of(one), one)
    assert c1["scaled vs PTQ 95%"].tolist() == ["none: 1 window"] and "One window per length" in qc.change_note(c1)
    assert "95%" not in " ".join(qc.change_table(summary_of(t)).columns)  # no per-window table: no intervals


def test_tune_figure_draws_the_intervals_and_the_control_in_the_change_panel():
    t = tidy()
    fig = qc.tune_figure(summary_of(t), trained_context=256, table=t)
    band = [d for d in fig.data if d.fill == "tonexty"]
    assert len(band) == 1 and band[0].name == "PTQ: 95% across windows"
    change = next(d for d in fig.data if d.name == "change vs PTQ")
    control = next(d for d in fig.data if d.name == "change vs FP (control)")
    assert change.yaxis == control.yaxis == "y2" and control.line.dash == "dash"
    assert change.error_y.array[0] > 0 and control.error_y.array[0] > 0
    assert "Perplexity" in fig.layout.annotations[0].text and "control" in fig.layout.annotations[1].text
    quiet = qc.tune_figure(summary_of(tidy(windows=((2.0,),))), 256, table=tidy(windows=((2.0,),)))
    assert not any(d.fill == "tonexty" for d in quiet.data)
    assert all(d.error_y.array is None for d in quiet.data)


def test_control_change_reads_the_objective_or_weighs_the_held_out_rows():
    assert qc.control_change({"fp": 2.0, "fp_scaled": 1.99, "quant": 2.1, "quant_scaled": 2.05}, None) == pytest.approx(math.exp(-0.01) - 1)
    held = pd.DataFrame(dict(variant=["fp", "fp", "fp_scaled", "fp_scaled"], length=[64, 128] * 2,
                             log_ppl=[2.0, 2.2, 1.9, 2.2]))
    assert qc.control_change({"quant": 2.1, "quant_scaled": 2.0}, held) == pytest.approx(math.exp(-0.1 * 64 / 192) - 1)
    assert qc.control_change({"quant": 2.1, "quant_scaled": 2.0}, held.query("variant == 'fp'")) is None


def test_steps_figure_draws_training_and_validation_against_steps():
    h = pd.DataFrame({"step": [0, 1, 2, 2, 3, 4, 4], "split": ["val", "train", "train", "val", "train", "train", "val"],
                      "objective": [3.0, 3.2, 3.1, 2.9, 3.0, 2.8, 2.95], "guard_ok": [True, None, None, True, None, None, False],
                      "band": None, "g": None})
    fig = qc.steps_figure(h)
    names = [t.name for t in fig.data]
    assert names == ["training minibatch", "held-back dev documents", "failed the guard"]
    assert list(fig.data[0].x) == [1, 2, 3, 4] and list(fig.data[1].y) == [3.0, 2.9, 2.95] and list(fig.data[2].x) == [4]
    with pytest.raises(ValueError):
        qc.steps_figure(h.assign(step=None))
