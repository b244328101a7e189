"""The Learn page driven headless (streamlit AppTest): it renders four live figures and the widgets move them."""

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from apptest import go, new_app, ok


@pytest.fixture
def at() -> AppTest:
    at = go(new_app(), "learn")
    ok(at)
    return at


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def values(v) -> list:
    """A trace's x / y as a list: plotly sends numpy arrays as base64 {"dtype", "bdata"}."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def trace(fig: dict, name: str) -> dict:
    return next(t for t in fig["data"] if t.get("name") == name)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_learn_page_renders_four_figures_and_explanations(at):
    assert at.title[0].value == "Learn"
    assert [h.value[:2] for h in at.subheader] == ["1 ", "2 ", "3 ", "4 "]
    figs = figures(at)
    assert len(figs) == 4
    assert figs[0]["layout"]["yaxis"]["scaleanchor"] == "x"  # the rotation picture has equal aspect
    assert float(metric(at, "Tail Inflation Ratio")) > 1
    assert not at.error


def test_moving_the_position_slider_moves_the_pair(at):
    before = values(trace(figures(at)[0], "rotated pair")["x"])
    at.slider(key="learn.pos").set_value(500).run()
    after = values(trace(figures(at)[0], "rotated pair")["x"])
    assert before != after and not at.exception


def test_interpolation_type_and_distance_change_the_phase_table(at):
    def turns_pi(fig):
        return values(next(t for t in fig["data"] if t.get("legendgroup") == "turns_pi")["y"])

    yarn = turns_pi(figures(at)[1])
    at.selectbox(key="learn.rope_type").set_value("linear").run()
    linear = turns_pi(figures(at)[1])
    assert linear != yarn
    at.select_slider(key="learn.dist").set_value(8).run()
    assert turns_pi(figures(at)[1])[-1] == pytest.approx(2 * linear[-1], rel=1e-6)  # twice the distance


def test_outlier_growth_moves_the_tail_inflation_ratio(at):
    at.slider(key="learn.growth").set_value(0.0).run()
    flat = float(metric(at, "Tail Inflation Ratio"))
    at.slider(key="learn.growth").set_value(3.0).run()
    assert float(metric(at, "Tail Inflation Ratio")) > flat + 0.5


def test_shared_mode_changes_the_band_and_symmetric_mode_does_not(at):
    def rescaled_fp(fig):
        bars = [t for t in fig["data"] if t.get("legendgroup") == "rescaled"]
        return values(bars[0]["y"])  # left panel: RMS contribution in full precision

    at.select_slider(key="learn.g").set_value(2.0).run()
    at.selectbox(key="learn.band").set_value(1).run()
    symmetric = rescaled_fp(figures(at)[3])
    assert metric(at, "Largest logit change from rescaling, quantized") == "0"  # power-of-two g, row-wise RTN
    at.radio(key="learn.mode").set_value("shared").run()
    shared = rescaled_fp(figures(at)[3])
    assert shared[1] == pytest.approx(4 * symmetric[1], rel=1e-5)  # band 1 contribution times g^2
    assert shared[0] == symmetric[0]
