"""The diagnostics page driven headless (AppTest) on a tiny random Llama, and its chart builders on real tables."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from app import diag_charts as dc, state  # noqa: E402
from conftest import TEXT, save_tiny  # noqa: E402
from qroar import diagnostics as dg, models, quant, rope  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

MAIN = str(ROOT / "app" / "main.py")
TIMEOUT = 60


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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import save_char_tiny

    return save_char_tiny(tmp_path_factory.mktemp("tiny-llama"))


def _ok(at):
    assert not at.exception, [e.message for e in at.exception]


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def test_diagnostics_page_runs_and_draws_every_chart(tiny_dir):
    torch.manual_seed(0)
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    at.selectbox(key="w:model.choice").set_value(state.OTHER_MODEL).run()
    at.text_input(key="w:model.custom").input(tiny_dir).run()
    _button(at, "Load model").click().run()
    state.backend().queue.wait_idle(timeout=120)
    at.run()  # Setup redraws with the loaded model (group sizes that divide its widths)
    at.switch_page("../pages/diagnostics.py").run()
    _ok(at)
    assert at.title[0].value == "Diagnostics" and not at.get("plotly_chart")
    at.slider(key="w:diag.n_bands").set_value(4).run()
    at.number_input(key="w:diag.n_docs").set_value(1).run()
    at.number_input(key="w:diag.noise_pairs").set_value(16).run()
    _button(at, "Run diagnostics").click().run()
    state.backend().queue.wait_idle(timeout=120)
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 7  # bands, IP, TIR_W, TIR_A, quant error, noise heatmap, noise lines
    at.selectbox(key="w:diag.noise_layer").set_value("1").run()
    _ok(at)
    assert len(at.get("plotly_chart")) == 7
    # switching pages and back re-uses the finished job: no recomputation
    at.switch_page("../pages/perplexity.py").run()
    at.switch_page("../pages/diagnostics.py").run()
    _ok(at)
    assert len(at.get("plotly_chart")) == 7 and not state.backend().queue.active()
