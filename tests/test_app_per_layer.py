"""Per-layer scales in the dashboard: the Search page offers the layer strategy and draws its scales as a layer x band
heatmap, Tune's sliders move a per-band multiplier over per-layer scales, and the Report's command reproduces them."""

import shlex

import pytest

from apptest import button, finish, go, load, new_app, ok, record, tiny_dir, update  # noqa: F401
from app import qroar_charts as qc
from qroar.cli import build_parser
from qroar.recipe import Recipe


def test_layer_scales_figure_and_table():
    fig = qc.layer_scales_figure([[1.1, 0.9, 1.0], [1.0, 1.2, 0.8]])
    z = fig.data[0].z
    assert fig.data[0].type == "heatmap" and len(z) == 2 and len(z[0]) == 3
    assert list(fig.data[0].y) == ["L0", "L1"] and list(fig.data[0].x) == ["b0", "b1", "b2"]
    assert z[0][1] < 0 < z[1][1] and z[0][2] == 0  # log g: below 1 negative, 1 at the middle of the colour scale
    t = qc.scales_table([[1.1, 0.9, 1.0], [1.0, 1.2, 0.8]])
    assert list(t.columns) == ["layer", "b0", "b1", "b2"] and t["b1"].tolist() == [0.9, 1.2]
    assert list(qc.scales_table([1.1, 0.9]).columns) == ["band", "scale g_b"]
    with pytest.raises(ValueError):
        qc.layer_scales_figure([[1.0, 1.0], [1.0]])


def _app(tiny_dir, tmp_path, **extra):
    from conftest import TEXT

    (tmp_path / "dev.txt").write_text(TEXT * 12)
    (tmp_path / "heldout.txt").write_text(TEXT[::-1] * 12)
    at = load(new_app(), tiny_dir)
    update(record(at), {"eval.lengths": [64, 128], "eval.max_windows": 1, "bands.n_bands": 4, "qroar.auto_run": False,
                        "search.dev": str(tmp_path / "dev.txt"), "search.heldout": str(tmp_path / "heldout.txt"),
                        "corpus.source": "path", "corpus.path": str(tmp_path / "heldout.txt"), **extra})
    return at


def test_search_page_runs_the_layer_strategy_and_draws_the_heatmap_then_tune_moves_multipliers(tiny_dir, tmp_path):
    at = go(_app(tiny_dir, tmp_path), "search")
    ok(at)
    at.radio(key="w:search.strategy").set_value("layer").run()
    ok(at)
    at.number_input(key="w:search.layer_groups").set_value(2).run()
    at.slider(key="w:search.n_candidates").set_value(5).run()
    at.multiselect(key="w:search.lengths").set_value([64, 128]).run()
    button(at, "Start search").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    r = record(at).jobs["search"].result
    assert r.search_cfg["strategy"] == "layer" and r.search_cfg["layer_groups"] == 2
    assert len(r.scales) == 2 and len(r.scales[0]) == 4
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the heatmap and the trace
    assert '"type":"heatmap"' in charts[0].proto.spec.replace(" ", "")

    button(at, "Use these scales on Tune").click().run()
    ok(at)
    assert at.title[0].value == "Tune" and record(at).recipe.per_layer
    base = [list(row) for row in record(at).recipe.scales]
    assert [at.slider(key=f"w:qroar.g{b}").value for b in range(4)] == [1.0] * 4  # multipliers start at 1
    assert any("multiplies band b's scale in every layer" in c.value for c in at.caption)
    g1 = at.slider(key="w:qroar.g1")
    g1.set_value(round(g1.max, 3)).run()
    ok(at)
    m = record(at).recipe.scales[0][1] / base[0][1]
    assert m > 1
    assert record(at).recipe.scales == tuple(tuple(g * (m if b == 1 else 1.0) for b, g in enumerate(row)) for row in base)
    at = go(at, "tune")  # (AppTest reruns the page it switched from)
    ok(at)
    assert at.slider(key="w:qroar.g1").value == pytest.approx(m, abs=1e-3)  # the slider shows the multiplier
    assert at.slider(key="w:qroar.g0").value == 1.0 and record(at).recipe.scales[0][0] == base[0][0]

    # the Report's reproducing command carries the per-layer scales, and the CLI reads back the same Recipe
    from app.report import ReportSettings, eval_command

    rec = record(at)
    s = ReportSettings({"name": tiny_dir}, rec.recipe.to_dict(), "embedded:heldout", {"lengths": [64, 128]})
    argv = shlex.split(eval_command(s, scales=True).replace("\\\n", " "))[1:]
    assert ";" in argv[argv.index("--scales") + 1]
    got = Recipe.from_args(build_parser().parse_args(argv))
    assert got.scales == rec.recipe.scales
