"""The dashboard driven headless (streamlit AppTest) on a tiny random Llama saved to a folder."""

import pytest

from apptest import button, finish, go, load, new_app, ok, tiny_dir  # noqa: F401
from app import state


def test_setup_page_renders_with_defaults_and_a_session_token():
    at = new_app()
    ok(at)
    assert at.title[0].value == "Setup"
    assert at.selectbox(key="w:pi.rope_type").value == "yarn"
    assert at.selectbox(key="w:quant.method").value == "rtn"
    assert at.slider(key="w:quant.bits").value == 4
    assert len(at.query_params["s"]) >= 8


def test_settings_persist_across_page_switches(tiny_dir):
    at = load(new_app(), tiny_dir)
    ok(at)
    at.number_input(key="w:pi.factor").set_value(4.0).run()
    at.slider(key="w:quant.bits").set_value(3).run()
    at.selectbox(key="w:quant.group_size").set_value(32).run()
    at.toggle(key="w:quant.symmetric").set_value(True).run()
    go(at, "perplexity")
    ok(at)
    assert at.title[0].value == "Perplexity"
    assert "PI yarn x4" in at.markdown[0].value and "rtn w3 g32 sym" in at.markdown[0].value
    go(at, "setup")
    ok(at)
    assert at.number_input(key="w:pi.factor").value == 4.0
    assert at.slider(key="w:quant.bits").value == 3
    assert at.selectbox(key="w:quant.group_size").value == 32
    assert at.toggle(key="w:quant.symmetric").value is True
    assert at.text_input(key="w:model.custom").value == tiny_dir


def test_group_sizes_offered_divide_the_loaded_model_widths(tiny_dir):
    at = load(new_app(), tiny_dir)
    # tiny Llama: hidden 64, intermediate 128 -> 128 does not divide 64
    assert at.selectbox(key="w:quant.group_size").options == ["16", "32", "64", "per channel", "per tensor"]
    assert at.selectbox(key="w:quant.group_size").value == 64
    assert [m.value for m in at.metric if m.label == "Trained context"] == ["64"]


def test_loading_a_model_fits_the_group_size_even_before_setup_redraws(tiny_dir):
    at = new_app()
    at.selectbox(key="w:model.choice").set_value(state.OTHER_MODEL).run()
    at.text_input(key="w:model.custom").input(tiny_dir).run()
    button(at, "Load model").click().run()
    state.backend().queue.wait_idle(timeout=120)
    go(at, "perplexity")  # straight to another page: Setup never ran with the model loaded
    ok(at)
    assert "rtn w4 g64 asym" in at.markdown[0].value


def test_bad_model_path_shows_a_clear_error_and_the_app_keeps_running(tmp_path):
    at = load(new_app(), str(tmp_path / "no-such-model"))
    ok(at)
    assert any("does not exist" in e.value for e in at.error)
    go(at, "perplexity")
    ok(at)
    assert any("Load a model" in i.value for i in at.info)


def test_pickle_and_remote_code_warn_when_turned_on():
    at = new_app()
    assert not at.warning
    at.toggle(key="w:model.allow_pickle").set_value(True).run()
    at.toggle(key="w:model.trust_remote_code").set_value(True).run()
    texts = " ".join(w.value for w in at.warning)
    assert "Pickle weights can run arbitrary code" in texts and "own Python code will run" in texts


@pytest.mark.slow
def test_perplexity_run_shows_chart_table_and_downloads_and_survives_a_reload(tiny_dir):
    at = load(new_app(), tiny_dir)
    at.multiselect(key="w:eval.lengths").set_value([64, 256]).run()
    at.number_input(key="w:eval.max_windows").set_value(1).run()
    go(at, "perplexity")
    button(at, "Run perplexity").click().run()
    ok(at)
    finish(at)
    ok(at)
    assert not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    table = at.dataframe[0].value
    assert table["length"].tolist() == [64, 256]
    assert {"ppl fp", "ppl quant", "penalty quant %"} <= set(table.columns)
    assert (table["ppl fp"] > 1).all() and (table["ppl quant"] > 1).all()
    assert [d.label for d in at.get("download_button")] == ["Download summary (CSV)", "Download per-document table (CSV)"]

    # a reload of the same URL (?s=token) is a fresh browser session that re-attaches to the result
    again = new_app({"s": at.query_params["s"]})
    go(again, "perplexity")
    ok(again)
    assert len(again.get("plotly_chart")) == 1
    assert again.dataframe[0].value.equals(table)
    go(again, "setup")
    assert again.number_input(key="w:eval.max_windows").value == 1
    assert [m.value for m in again.metric if m.label == "Layers"] == ["2"]


def test_perplexity_page_without_a_model_points_to_setup():
    at = new_app()
    go(at, "perplexity")
    ok(at)
    assert any("Load a model on the Setup page" in i.value for i in at.info)
    assert not at.get("plotly_chart")
