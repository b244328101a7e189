"""The dashboard in a real browser: headless Chromium (Debian's, never a downloaded one) driven by Playwright.

One test walks the path a user takes on the embedded default model: Setup (load), Diagnostics (run,
heatmaps drawn), Tune (move a band's scale, the PTQ + scales curve changes), Export (download the
scales file, check it), Report (download the HTML). A screenshot of each step goes to test-artifacts/browser/.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1440, "height": 900}
STEP = 30_000  # ms: a page or a widget (two shared CPU cores)
JOB = 150_000  # ms: a computation on the worker

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(290),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run `make chromium` "
                       "(Debian: apt-get install chromium) to enable the browser tests"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def app_url():
    """`streamlit run app/main.py` on a free local port, in its own process group (killed whole at teardown)."""
    port = _free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not _healthy(url):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the app did not start (exit code {proc.poll()}); see {ARTIFACTS / 'server.log'}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        context.set_default_timeout(STEP)
        pg = context.new_page()
        try:
            yield pg
        finally:
            context.close()
            browser.close()


# ----------------------------------------------------------------------------- helpers


def idle(pg, timeout_s: float = STEP / 1000) -> None:
    """Wait until the script run has finished: no 'running' status widget and no skeleton for ~0.6 s."""
    deadline, quiet = time.time() + timeout_s, 0
    while quiet < 3:
        if time.time() > deadline:
            raise TimeoutError(f"the app was still running after {timeout_s:.0f} s")
        busy = pg.evaluate("() => !!document.querySelector('[data-testid=\"stStatusWidget\"], [data-testid=\"stSkeleton\"]')")
        quiet = 0 if busy else quiet + 1
        pg.wait_for_timeout(200)


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def go(pg, title: str) -> None:
    """Open a page from the sidebar and wait for its title."""
    pg.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    pg.get_by_role("heading", name=title, level=1).wait_for()
    idle(pg)


def plots(pg) -> list[dict]:
    """Every Plotly figure on the page as drawn (plotly.js's decoded _fullData): trace name, type, values."""
    return pg.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
        traces: (el._fullData || []).map(t => ({
            name: t.name || '', type: t.type || 'scatter',
            n: Array.from(t.z || t.y || t.x || []).length,
            y: Array.from(t.y || []).map(Number)}))}))""")


def scaled_curve(pg, differs_from: list | None = None, timeout_s: float = JOB / 1000) -> list[float]:
    """The y values of the PTQ + scales trace once drawn (and, if given, once they differ from `differs_from`)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ys = [t["y"] for f in plots(pg) for t in f["traces"] if t["name"] == "PTQ + scales"]
        if ys and ys[0] and (differs_from is None or ys[0] != differs_from):
            idle(pg)
            return ys[0]
        pg.wait_for_timeout(500)
    raise TimeoutError(f"no {'new ' if differs_from else ''}PTQ + scales curve after {timeout_s:.0f} s")


def ok(pg) -> None:
    """No exception box and no failed job on the page."""
    assert pg.get_by_test_id("stException").count() == 0, pg.get_by_test_id("stException").first.inner_text()


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
    for chip in ("1K (4x)", "2K (8x)"):  # two short lengths keep every perplexity run quick on two cores
        pg.get_by_role("button", name=f"Remove {chip}").click()
        idle(pg)
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
    assert scales["schema_version"] == 2
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

