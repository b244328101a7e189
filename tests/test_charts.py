"""Chart builders on synthetic tables: traces, penalty values, axes, trained-context line, hover."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.charts import length_label, penalty_table, perplexity_figure  # noqa: E402

LENGTHS = [256, 512, 1024, 2048]
FP = [20.0, 19.0, 25.0, 40.0]
QUANT = [21.0, 20.9, 30.0, 52.0]


def summary(variants=("fp", "quant")):
    ppl = {"fp": FP, "quant": QUANT, "qroar": [20.5, 19.5, 26.0, 42.0]}
    rows = [{"variant": v, "length": n, "ppl": p, "tokens": 10 * n}
            for v in variants for n, p in zip(LENGTHS, ppl[v])]
    return pd.DataFrame(rows)


def test_length_label():
    assert [length_label(n) for n in (64, 256, 1024, 1536, 4096, 32768, 1 << 20)] == \
        ["64", "256", "1K", "1.5K", "4K", "32K", "1M"]


def test_penalty_table_is_relative_increase_over_fp():
    t = penalty_table(summary(), trained_context=512)
    assert list(t.columns) == ["length", "x trained", "ppl fp", "ppl quant", "penalty quant %"]
    assert t["length"].tolist() == LENGTHS
    assert t["x trained"].tolist() == [0.5, 1.0, 2.0, 4.0]
    assert t["penalty quant %"].tolist() == pytest.approx([5.0, 10.0, 20.0, 30.0])


def test_perplexity_figure_has_one_line_per_variant_and_a_penalty_panel():
    fig = perplexity_figure(summary(), trained_context=512)
    names = [t.name for t in fig.data]
    assert names == ["full precision", "quantized", "quantized penalty"]
    fp, quant, pen = fig.data
    assert list(fp.x) == LENGTHS and list(fp.y) == FP and list(quant.y) == QUANT
    assert list(pen.y) == pytest.approx([100 * (q / f - 1) for q, f in zip(QUANT, FP)])
    assert fp.xaxis == "x" and pen.xaxis == "x2" and pen.yaxis == "y2"
    # hover shows the value and the number of scored tokens
    assert "%{y:.3f}" in fp.hovertemplate and "%{customdata:,} tokens" in fp.hovertemplate
    assert list(fp.customdata) == [10 * n for n in LENGTHS]
    assert "%{y:+.2f}%" in pen.hovertemplate
    lay = fig.layout
    assert lay.yaxis.title.text == "perplexity" and lay.yaxis2.title.text == "penalty (%)"
    assert lay.xaxis2.title.text == "context length (tokens)"
    assert lay.xaxis.type == "log" and list(lay.xaxis.ticktext) == ["256", "512", "1K", "2K"]
    assert lay.hovermode == "x unified"


def test_trained_context_line_in_both_panels_with_label():
    fig = perplexity_figure(summary(), trained_context=512)
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1 == 512]
    assert {s.xref for s in vlines} == {"x", "x2"}
    label = [a for a in fig.layout.annotations if "trained context" in a.text]
    assert len(label) == 1 and label[0].text == "trained context 512"
    assert label[0].x == pytest.approx(math.log10(512))  # annotations on a log axis are placed in log10 units


def test_log_y_and_no_trained_line():
    fig = perplexity_figure(summary(), trained_context=None, log_y=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type != "log"
    assert not [s for s in fig.layout.shapes if s.x0 == s.x1]


def test_fp_only_has_a_single_panel_and_extra_variants_get_their_own_penalty():
    single = perplexity_figure(summary(("fp",)), trained_context=512)
    assert [t.name for t in single.data] == ["full precision"] and "yaxis2" not in single.layout
    three = perplexity_figure(summary(("fp", "quant", "qroar")), trained_context=512)
    assert [t.name for t in three.data] == ["full precision", "quantized", "quantized + Q-ROAR",
                                             "quantized penalty", "quantized + Q-ROAR penalty"]
    assert len({t.line.color for t in three.data[:3]}) == 3


def test_empty_summary_is_refused():
    with pytest.raises(ValueError):
        perplexity_figure(summary().iloc[:0])
