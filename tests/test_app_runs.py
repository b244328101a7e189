"""Runs in the dashboard, driven headless (streamlit AppTest) on a tiny random Llama: every result kept, renamed,
compared on the Runs, Perplexity and Diagnostics pages, carried into the report, and still there after a reload."""

import json

import pytest

from apptest import button, finish, go, load, new_app, ok, record, tiny_dir  # noqa: F401


def _figures(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _names(fig: dict) -> list[str]:
    return [t.get("name") for t in fig["data"]]


def _run(at, page: str, label: str, bits: int | None = None, pi: str | None = None):
    go(at, "setup")
    if bits is not None:
        at.slider(key="w:quant.bits").set_value(bits).run()
    if pi is not None:
        at.selectbox(key="w:pi.rope_type").set_value(pi).run()
    go(at, page)
    button(at, label).click().run()
    return finish(at)


@pytest.mark.slow
def test_runs_page_lists_renames_compares_and_survives_a_reload(tiny_dir):
    at = load(new_app(), tiny_dir)
    at.multiselect(key="w:eval.lengths").set_value([64, 128]).run()
    at.number_input(key="w:eval.max_windows").set_value(1).run()
    _run(at, "perplexity", "Run perplexity", bits=3)
    ok(at)
    assert at.multiselect(key="runs.pick.perplexity").value == []  # nothing chosen: one chart, the page's own
    assert len(at.get("plotly_chart")) == 1
    _run(at, "perplexity", "Run perplexity", bits=4)
    ok(at)

    go(at, "runs")
    ok(at)
    table = at.dataframe[0].value
    assert table["name"].tolist() == ["perplexity · yarn x8 · rtn w4 g64", "perplexity · yarn x8 · rtn w3 g64"]
    assert table["kind"].tolist() == ["perplexity"] * 2 and table["quantizer"].tolist() == ["rtn w4 g64", "rtn w3 g64"]

    at.selectbox(key="runs.manage").set_value("r1").run()
    at.text_input(key="runs.name:r1").input("3-bit").run()
    button(at, "Rename").click().run()
    ok(at)
    assert at.dataframe[0].value["name"].tolist()[-1] == "3-bit"

    at.multiselect(key="runs.pick.all").set_value(["r1", "r2"]).run()
    ok(at)
    diff = at.dataframe[1].value
    assert list(diff.columns) == ["setting", "3-bit", "perplexity · yarn x8 · rtn w4 g64"]
    assert diff.set_index("setting").loc["quant.bits"].tolist() == ["3", "4"] and len(diff) == 1
    (overlay,) = _figures(at)
    assert _names(overlay) == [f"{r} · {v}" for r in ("3-bit", "perplexity · yarn x8 · rtn w4 g64")
                               for v in ("full precision", "quantized")]

    go(at, "perplexity")  # the same choice overlays the runs under the page's own chart
    ok(at)
    assert at.multiselect(key="runs.pick.perplexity").value == ["r1", "r2"]
    figures = _figures(at)
    assert len(figures) == 2 and _names(figures[1]) == _names(overlay)

    again = new_app({"s": at.query_params["s"]})  # a reload re-attaches to the session's runs and choice
    go(again, "runs")
    ok(again)
    assert again.dataframe[0].value["name"].tolist() == ["perplexity · yarn x8 · rtn w4 g64", "3-bit"]
    assert again.multiselect(key="runs.pick.all").value == ["r1", "r2"]

    go(again, "report")
    ok(again)
    toggle = again.toggle(key="report.runs")
    assert toggle.value is True and "3-bit" in toggle.label
    pngs = [b.proto.label for b in again.get("download_button")]
    assert "Compared runs: perplexity" in pngs and "Run r1: 3-bit: perplexity" in pngs

    go(again, "runs")
    again.selectbox(key="runs.manage").set_value("r2").run()
    button(again, "Delete").click().run()
    ok(again)
    assert again.dataframe[0].value["name"].tolist() == ["3-bit"] and record(again).runs.chosen == ["r1"]


@pytest.mark.slow
def test_diagnostics_page_overlays_two_runs(tiny_dir):
    at = load(new_app(), tiny_dir)
    go(at, "diagnostics")
    at.number_input(key="w:diag.n_docs").set_value(1).run()
    at.number_input(key="w:diag.noise_pairs").set_value(16).run()
    _run(at, "diagnostics", "Run diagnostics", bits=3, pi="default")
    _run(at, "diagnostics", "Run diagnostics", pi="yarn")
    ok(at)
    own = len(at.get("plotly_chart"))
    at.multiselect(key="runs.pick.diagnostics").set_value(["r2", "r1"]).run()
    ok(at)
    figures = _figures(at)[own:]
    names = [r.name for r in record(at).runs.chosen_runs()]
    assert names == ["diagnostics · yarn x8 · rtn w3 g64 · 128 tokens", "diagnostics · no PI · rtn w3 g64 · 128 tokens"]
    tir, noise, ip = figures
    assert [n for n, t in zip(_names(tir), tir["data"]) if t.get("showlegend")] == \
        [f"{r} · {v}" for r in names for v in ("full precision", "quantized")]
    assert [a["text"] for a in noise["layout"]["annotations"]] == names  # side by side, a panel per run
    assert [n.split(" · D=")[0] for n in _names(ip)] == names
    assert at.dataframe[-1].value.set_index("setting").loc["pi.rope_type"].tolist() == ["yarn", "default"]
