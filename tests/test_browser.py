"""The dashboard in a real browser: headless Chromium (Debian's, never a downloaded one) driven by Playwright.

One test walks the path a user takes on the embedded default model: Setup (load), Diagnostics (run,
heatmaps drawn), Tune (move a band's scale, the PTQ + scales curve changes), Export (download the
scales file, check it), Report (download the HTML). A screenshot of each step goes to test-artifacts/browser/.
"""

import json
import os
import time

import pytest

from browser_kit import CHROMIUM, JOB, ROOT, STEP, browser_page, curve, go, idle, ok, plots, remove_chips, serve

ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(290),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run `make chromium` "
                       "(Debian: apt-get install chromium) to enable the browser tests"),
]


@pytest.fixture(scope="module")
def app_url():
    with serve(ARTIFACTS / "server.log") as url:
        yield url


@pytest.fixture
def page(app_url):
    with browser_page() as pg:
        yield pg


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def scaled_curve(pg, differs_from=None):
    return curve(pg, "PTQ + scales", differs_from)


# ----------------------------------------------------------------------------- the walk


def test_main_path_setup_diagnostics_tune_export(page, app_url):
    (ARTIFACTS / "failed.png").unlink(missing_ok=True)
    try:
        walk(page, app_url)
    except Exception:
        shot(page, "failed")  # what the browser showed when the walk stopped
        raise


def walk(pg, app_url: str) -> None:
    t0, times = time.time(), {}

    def lap(name):
        times[name] = round(time.time() - t0, 1)

    # Setup: the embedded default model is preselected; load it.
    pg.goto(app_url)
    pg.get_by_role("heading", name="Setup", level=1).wait_for()
    idle(pg)
    assert "?s=" in pg.url, "the session token is put in the address"
    assert pg.get_by_role("combobox", name="Model").input_value() == "qroar-tiny (preset)"  # the embedded default
    pg.get_by_role("button", name="Load model").click()
    pg.get_by_role("button", name="Model loaded").wait_for(timeout=JOB)
    idle(pg)
    pg.get_by_text("Trained context").first.wait_for()
    remove_chips(pg, "1K (4x)", "2K (8x)")  # two short lengths keep every perplexity run quick on two cores
    chips = pg.get_by_test_id("stMultiSelect").inner_text()
    assert "256 (1x)" in chips and "512 (2x)" in chips and "1K" not in chips, chips
    ok(pg)
    shot(pg, "01-setup-loaded")
    lap("setup")

    # Diagnostics on one document (the default capture length), then every heatmap drawn with data.
    go(pg, "Diagnostics")
    docs = pg.get_by_role("spinbutton", name="Documents")
    docs.fill("1")
    docs.press("Enter")
    idle(pg)
    pg.get_by_role("button", name="Run diagnostics").click()
    pg.get_by_role("heading", name="Position-dependent logit noise").wait_for(timeout=JOB)
    idle(pg)
    ok(pg)
    figs = plots(pg)
    heatmaps = [t for f in figs for t in f["traces"] if t["type"] == "heatmap"]
    assert len(figs) >= 5 and len(heatmaps) >= 8, figs
    assert all(t["n"] > 0 for t in heatmaps), "every heatmap has cells"
    pg.get_by_role("heading", name="Tail Inflation Ratio of the projections (TIR_W)").scroll_into_view_if_needed()
    shot(pg, "02-diagnostics")
    pg.reload()  # the finished result belongs to the session (?s= token), not to the browser tab
    pg.get_by_role("heading", name="Position-dependent logit noise").wait_for()
    idle(pg)
    assert [len(f["traces"]) for f in plots(pg)] == [len(f["traces"]) for f in figs]
    lap("diagnostics")

    # Tune: the first run draws FP, PTQ and PTQ + scales; moving b7's scale changes the PTQ + scales curve.
    go(pg, "Tune")
    before = scaled_curve(pg)
    thumb = pg.get_by_test_id("stSlider").filter(has_text="b7 · pairs").get_by_role("slider")
    start = float(thumb.input_value())
    thumb.focus()
    thumb.press("PageUp")  # one keyboard step of a tenth of the window: one change, one re-run
    pg.wait_for_function("el => Number(el.value) > %r" % start, arg=thumb.element_handle())
    set_to = float(thumb.input_value())
    assert set_to > start
    after = scaled_curve(pg, differs_from=before)
    assert len(after) == len(before) and after != before
    ok(pg)
    shot(pg, "03-tune-moved")
    lap("tune")

    # Export: the scales file holds the scale just set.
    go(pg, "Export")
    button = pg.get_by_role("button", name="Download scales file")
    pg.wait_for_function("b => b && !b.disabled", arg=button.element_handle(timeout=JOB), timeout=JOB)
    with pg.expect_download(timeout=STEP) as info:
        button.click()
    path = ARTIFACTS / info.value.suggested_filename
    info.value.save_as(path)
    scales = json.loads(path.read_text())
    assert scales["schema_version"] == 3
    assert scales["scales"][7] == pytest.approx(set_to, abs=5e-4) and scales["scales"][:7] == [1.0] * 7
    ok(pg)
    shot(pg, "04-export")
    lap("export")

    # Report: one click downloads the whole session as one self-contained HTML file.
    go(pg, "Report")
    with pg.expect_download(timeout=STEP) as info:
        pg.get_by_role("button", name="Download the HTML report").click()
    path = ARTIFACTS / info.value.suggested_filename
    info.value.save_as(path)
    html = path.read_text()
    for section in ("Settings", "Diagnostics", "Tune", "Reproduce"):
        assert f"<h2>{section}</h2>" in html
    assert f"b7={set_to:.4g}" in html and "qroar diagnose" in html and "<script src" not in html
    shot(pg, "05-report")
    lap("report")

    print(f"browser walk timings (s since start): {times}")

