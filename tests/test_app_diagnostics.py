"""The diagnostics page driven headless (AppTest) on a tiny random Llama, and its chart builders on real tables."""

import pandas as pd
import pytest
import torch

from apptest import button, finish, go, load, new_app, ok, tiny_dir  # noqa: F401
from app import diag_charts as dc, state
from conftest import TEXT, save_tiny
from qroar import diagnostics as dg, models, quant, rope
from qroar.bands import BandConfig
from qroar.workbench import Workbench


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diag")
    wb = Workbench(models.load_model(save_tiny(tmp / "m"), device="cpu"))
    (tmp / "doc.txt").write_text(TEXT * 3)
    wb.set_pi(rope.PIConfig("yarn", 4.0))
    wb.set_quant(quant.QuantConfig(method="rtn", bits=3, group_size=16))
    cfg = dg.DiagConfig(bands=BandConfig(4), capture_length=160, n_docs=1, noise_pairs=16)
    return dg.run_diagnostics(wb, str(tmp / "doc.txt"), cfg)


def test_chart_builders_on_real_tables(tables):
    t, s = tables.tables, tables.settings
    fig = dc.bands_figure(t["pairs"], s["trained_context"])
    assert [tr.name for tr in fig.data] == ["wavelength before PI", "wavelength after PI", "s_j = omega / inv_freq"]
    assert fig.layout.yaxis.type == "log" and len(fig.layout.shapes) == 4 + 1  # 4 band shades + trained line
    h = dc.ip_heatmap(t["ip"], s["trained_context"])
    assert h.data[0].z.shape == (4, 5) and "64 (trained)" in list(h.data[0].x)
    tir = dc.tir_heatmaps(t["tir"], "W")
    assert len(tir.data) == 6 and [d.zmid for d in tir.data] == [1, 1, 0] * 2
    diff = t["tir"][(t["tir"].kind == "W") & (t["tir"].proj == "k")].pivot_table(index=["layer", "band"], columns="variant", values="tir")
    assert tir.data[5].z.flatten().tolist() == pytest.approx((diff["quant"] - diff["fp"]).tolist())
    q = dc.quant_error_heatmap(t["quant_error"])
    assert q.data[0].z.max() == pytest.approx(100 * t["quant_error"].query("proj == 'q'").rel_err.max())
    hm = dc.noise_heatmap(t["logit_noise_pooled"], "accumulated")
    assert list(hm.data[0].x) == ["1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-159"]
    lines = dc.noise_lines(t["logit_noise"][t["logit_noise"].layer == 1], "isolated", value="rms_err")
    assert len(lines.data) == 4 and lines.layout.xaxis.type == "log"
    with pytest.raises(ValueError):
        dc.tir_heatmaps(t["tir"][t["tir"].kind == "W"], "A")


def test_tir_colour_scale_is_centred_at_one_and_symmetric_in_log():
    rows = [dict(kind="W", variant=v, layer=0, proj=p, band=b, tir=x)
            for v, x in (("fp", 2.0), ("quant", 0.8)) for p in ("q", "k") for b in (0, 1)]
    fig = dc.tir_heatmaps(pd.DataFrame(rows))
    assert fig.data[0].zmin == pytest.approx(0.5) and fig.data[0].zmax == pytest.approx(2.0)
    assert fig.data[2].zmin == pytest.approx(-1.2) and fig.data[2].zmax == pytest.approx(1.2)


# ----------------------------------------------------------------------------- the page


def test_diagnostics_page_runs_and_draws_every_chart(tiny_dir):
    torch.manual_seed(0)
    at = load(new_app(), tiny_dir)  # Setup redraws with the loaded model (group sizes that divide its widths)
    go(at, "diagnostics")
    ok(at)
    assert at.title[0].value == "Diagnostics" and not at.get("plotly_chart")
    at.slider(key="w:diag.n_bands").set_value(4).run()
    at.number_input(key="w:diag.n_docs").set_value(1).run()
    at.number_input(key="w:diag.noise_pairs").set_value(16).run()
    button(at, "Run diagnostics").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 7  # bands, IP, TIR_W, TIR_A, quant error, noise heatmap, noise lines
    at.selectbox(key="w:diag.noise_layer").set_value("1").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 7
    # switching pages and back re-uses the finished job: no recomputation
    at.switch_page("../pages/perplexity.py").run()
    at.switch_page("../pages/diagnostics.py").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 7 and not state.backend().queue.active()
