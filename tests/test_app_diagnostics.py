"""The diagnostics page driven headless (AppTest) on a tiny random Llama, and its chart builders on real tables."""

import math

import numpy as np
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
    maps = [d for d in tir.data if d.type == "heatmap"]
    assert len(maps) == 6 and [d.zmid for d in maps] == [0, 0, 0] * 2  # ratios in log: centred at log 1 = 0
    diff = t["tir"][(t["tir"].kind == "W") & (t["tir"].proj == "k")].pivot_table(index=["layer", "band"], columns="variant", values="tir")
    assert maps[5].z.flatten().tolist() == pytest.approx((diff["quant"] - diff["fp"]).tolist())
    assert maps[0].customdata[..., 0].flatten().tolist() == pytest.approx(
        t["tir"].query("kind == 'W' and proj == 'q' and variant == 'fp'").sort_values(["layer", "band"]).tir.tolist())
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
    assert fig.data[0].zmin == pytest.approx(-math.log(2)) and fig.data[0].zmax == pytest.approx(math.log(2))
    assert fig.data[0].colorbar.ticktext[:3] == ("0.5", "0.67", "0.8")
    assert fig.data[2].zmin == pytest.approx(-1.2) and fig.data[2].zmax == pytest.approx(1.2)


def _tir_rows(values, docs=None):
    """TIR rows of one layer, 4 bands, q and k, fp and quant; values per band, docs: per-document TIRs per band."""
    return pd.DataFrame([dict(kind="W", variant=v, layer=0, proj=p, band=b, tir=x + (0.01 if v == "quant" else 0),
                              n_short=4096 * 48 if p == "q" else 4096 * 16, tokens_short=4096, tokens_long=4096,
                              **({} if docs is None else dict(
                                  docs=len(docs[b]), tir_docs=[d + (0.01 if v == "quant" else 0) for d in docs[b]],
                                  tir_se_log=float(np.std(np.log(docs[b]), ddof=1) / math.sqrt(len(docs[b])))
                                  if len(docs[b]) > 1 else float("nan"))))
                         for v in ("fp", "quant") for p in ("q", "k") for b, x in enumerate(values)])


def test_tir_near_one_stays_pale_and_each_heatmap_has_its_own_colour_bar():
    """0.97-1.04 (sampling noise on 4 x 512 tokens) must not look like deep red and blue."""
    fig = dc.tir_heatmaps(_tir_rows([0.97, 1.0, 1.02, 1.04]))
    maps = [d for d in fig.data if d.type == "heatmap"]
    assert maps[0].zmax == pytest.approx(math.log(dc.TIR_SPAN))
    assert max(abs(z) for z in maps[0].z.flatten()) / maps[0].zmax < 0.2  # within a fifth of the way to full colour
    assert all(m.showscale is not False for m in maps)
    bars = {(round(m.colorbar.x, 3), round(m.colorbar.y, 3)) for m in maps}
    assert len(bars) == 6  # one bar beside each heatmap
    assert {m.colorscale for m in maps[:2]} != {maps[2].colorscale}  # differences: another palette
    assert maps[2].colorbar.title.text == "quant - fp" and maps[0].colorbar.title.text == "TIR"


def test_tir_cells_within_sampling_noise_carry_a_dot():
    # band 0: documents agree on 1.5 (real inflation); bands 1-3: documents scatter around 1 (noise)
    docs = [[1.5, 1.49, 1.51, 1.5], [0.9, 1.1, 1.05, 0.97], [0.95, 1.08, 1.0, 1.02], [1.1, 0.9, 1.0, 1.05]]
    t = _tir_rows([1.5, 1.0, 1.02, 1.04], docs)
    fig = dc.tir_heatmaps(t)
    dots = [d for d in fig.data if d.type == "scatter" and d.legendgroup == "noise"]
    ratio_dots = [d for d in dots if d.xaxis in ("x", "x2")]  # q: full precision, quantized
    assert [list(d.x) for d in ratio_dots] == [["b1", "b2", "b3"]] * 2
    assert sum(d.showlegend for d in dots) == 1
    iv = dg.tir_intervals(t).query("variant == 'fp' and proj == 'q'").set_index("band")
    assert iv.tir_lo[0] > 1 and iv.tir_lo[1] < 1 < iv.tir_hi[1] and iv.within_noise.tolist() == [False, True, True, True]
    # the difference quant - fp is 0.01 in every document: no noise at all, so no dot
    assert not any(d.xaxis == "x3" for d in dots)
    note = dc.tir_sampling_note(t, "W", 1e-3)
    assert "4,096 short and 4,096 long tokens from 4 documents" in note and "12 of 16 ratio cells" in note
    assert "197th (q) / 66th (k)" in note
    one = dc.tir_sampling_note(_tir_rows([1.0] * 4, [[1.0]] * 4), "W")
    assert "One document gives no estimate of sampling noise" in one


def test_noise_lines_give_every_band_its_own_hue_and_bands_axis_covers_s():
    rows = [dict(mode="isolated", band=b, bucket_lo=lo, bucket_hi=2 * lo - 1, rel_err=0.01 * (b + 1))
            for b in range(8) for lo in (1, 2, 4)]
    fig = dc.noise_lines(pd.DataFrame(rows))
    colours = [d.line.color for d in fig.data]
    assert len(set(colours)) == 8
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colours]
    close = min(sum((a - b) ** 2 for a, b in zip(rgb[i], rgb[j])) ** 0.5 for i in range(8) for j in range(i + 1, 8))
    assert close > 60  # b3 and b4 were two greens ~25 apart
    pairs = pd.DataFrame(dict(j=range(4), band=[0, 0, 1, 1], s=[1.0, 1.0, 3.0, 8.0], wavelength=[6.0, 20, 200, 2000],
                              wavelength_after=[6.0, 20, 600, 16000]))
    bands = dc.bands_figure(pairs, 256)
    assert bands.layout.yaxis2.range[0] == 0 and bands.layout.yaxis2.range[1] >= 8.0
    assert bands.layout.yaxis2.tickmode == "auto"


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
    notes = [c.value for c in at.caption if c.value.startswith("Each cell:")]
    assert len(notes) == 2 and "64 short and 64 long tokens from 1 document" in notes[0]  # 64 trained, 128 captured
    assert "One document gives no estimate of sampling noise" in notes[0]
    at.selectbox(key="w:diag.noise_layer").set_value("1").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 7
    # switching pages and back re-uses the finished job: no recomputation
    at.switch_page("../pages/perplexity.py").run()
    at.switch_page("../pages/diagnostics.py").run()
    ok(at)
    assert len(at.get("plotly_chart")) == 7 and not state.backend().queue.active()
