"""Search in a real browser (headless Chromium, Playwright), the defects a user met there pinned:

- the progress panel shows one time-left figure, and its count never passes the total it names;
- the search trace compares each candidate with the incumbent on the same documents, and says so;
- after Tune then Search, Export and Report use the latest scales (the search's), say where they come from,
  and the user can pick Tune's instead, in the preview and in the downloaded file.
"""

import json
import os
import re

import pytest

from browser_kit import (CHROMIUM, JOB, ROOT, browser_page, curve, go, idle, ok, plots, remove_chips, serve, set_number,
                         time_left_figures, wait_done)

ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run `make chromium` "
                       "(Debian: apt-get install chromium) to enable the browser tests"),
]


@pytest.fixture(scope="module")
def page():
    with serve(ARTIFACTS / "server-search.log") as url, browser_page() as pg:
        pg.goto(url)
        yield pg


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def one_estimate(text: str) -> None:
    """One time-left figure per panel, and a count never past its total."""
    assert time_left_figures(text) <= 1, text
    for n, total in re.findall(r"(\d+) of (?:at most )?(\d+) ", text):
        assert int(n) <= int(total), text


def download(pg, button_name: str) -> dict:
    with pg.expect_download(timeout=JOB) as info:
        pg.get_by_role("button", name=button_name).click()
    path = ARTIFACTS / info.value.suggested_filename
    info.value.save_as(path)
    return json.loads(path.read_text())


def test_tune_then_search_then_export_and_report(page):
    pg = page
    (ARTIFACTS / "search-failed.png").unlink(missing_ok=True)
    try:
        walk(pg)
    except Exception:
        shot(pg, "search-failed")
        raise


def walk(pg) -> None:
    # Setup: the embedded model at one length (256) and one window per document keeps every run short.
    pg.get_by_role("heading", name="Setup", level=1).wait_for()
    idle(pg)
    pg.get_by_role("button", name="Load model").click()
    pg.get_by_role("button", name="Model loaded").wait_for(timeout=JOB)
    idle(pg)
    remove_chips(pg, "512 (2x)", "1K (4x)", "2K (8x)")
    pg.get_by_text("Evaluation options").click()  # the expander holding the windows per document
    idle(pg)
    set_number(pg, "Windows per document and length (0 = all)", 1)

    # Perplexity: while it runs, one time-left figure per panel.
    go(pg, "Perplexity")
    pg.get_by_role("button", name="Run perplexity").click()
    seen = wait_done(pg, pg.get_by_text("scored tokens"), watch=one_estimate)
    ok(pg)

    # Tune: b7 moved by hand.
    go(pg, "Tune")
    before = curve(pg, "PTQ + scales")
    thumb = pg.get_by_test_id("stSlider").filter(has_text="b7 · pairs").get_by_role("slider")
    start = float(thumb.input_value())
    thumb.focus()
    thumb.press("PageUp")
    pg.wait_for_function("el => Number(el.value) > %r" % start, arg=thumb.element_handle())
    tuned = float(thumb.input_value())
    curve(pg, "PTQ + scales", differs_from=before)

    # Search: racing, 5 candidates, one window; progress sampled while it runs.
    go(pg, "Search")
    if not pg.get_by_text("Candidates per band").count():  # the settings expander is open until a search ran
        pg.get_by_text("Search settings").first.click()
        idle(pg)
    pg.get_by_test_id("stRadio").filter(has_text="Strategy").get_by_text("race", exact=True).click()
    idle(pg)
    set_number(pg, "Windows per document and length (0 = all)", 1)
    slider = pg.get_by_test_id("stSlider").filter(has_text="Candidates per band").get_by_role("slider")
    slider.focus()
    while int(slider.input_value()) > 5:
        slider.press("ArrowLeft")
        idle(pg)
    pg.get_by_role("button", name="Start search").click()
    seen += wait_done(pg, pg.get_by_role("heading", name="Search trace"), timeout_s=300, watch=one_estimate)
    assert any(re.search(r"\d+ of at most \d+ document evaluations", t) for t in seen), seen
    ok(pg)
    # the trace: each candidate against the incumbent on the same documents, said on the chart; the chosen
    # candidates beat their incumbent there (under the old drawing they sat at 0% beside points at -40%)
    trace = [f for f in plots(pg) if any("same documents" in a for a in f["annotations"])]
    assert len(trace) == 1, [f["annotations"] for f in plots(pg)]
    chosen = [t for t in trace[0]["traces"] if t["name"] == "chosen"]
    assert all(y <= 1e-9 for t in chosen for y in t["y"]), chosen
    searched = download(pg, "Download the search result (JSON)")["scales"]
    shot(pg, "search-done")

    # Export: the latest scales are the search's, named so; the file holds them and the search's results.
    go(pg, "Export")
    picker = pg.get_by_test_id("stRadio").filter(has_text="Scales to export")
    assert "Search result" in picker.inner_text() and "Tune (set by hand)" in picker.inner_text()
    assert pg.get_by_text(re.compile(r"From Search result")).count()
    f = download(pg, "Download scales file")
    assert f["scales"] == pytest.approx(searched, abs=1e-9) and f["search"] is not None
    shot(pg, "search-export")
    # picking Tune's exports Tune's
    picker.get_by_text("Tune (set by hand)").click()
    idle(pg)
    pg.get_by_text(re.compile(r"From Tune \(set by hand\)")).wait_for(timeout=JOB)
    idle(pg, JOB / 1000)
    f = download(pg, "Download scales file")
    assert f["scales"][7] == pytest.approx(tuned, abs=5e-4) and f["scales"][:7] == [1.0] * 7
    # and back to the search for the Report
    picker.get_by_text("Search result").click()
    idle(pg)

    # Report: the chosen scales are the search's, with where they came from.
    go(pg, "Report")
    with pg.expect_download(timeout=JOB) as info:
        pg.get_by_role("button", name="Download the HTML report").click()
    html = info.value.path().read_text()
    assert "Search result" in html
    assert all(f"b{b}={g:.4g}" in html for b, g in enumerate(searched))
    assert "--strategy race" in html
