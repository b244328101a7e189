"""Driving the dashboard in headless Chromium (Debian's, never a downloaded one) with Playwright: start the app on a
free local port, wait until Streamlit is idle, open pages, read the Plotly figures as drawn, take screenshots.

Shared by the browser tests and bench/dashboard_walk.py (the timed walks of the two user stories).
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1440, "height": 900}
STEP = 30_000  # ms: a page or a widget (two shared CPU cores)
JOB = 150_000  # ms: a computation on the worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(log_path: Path, env: dict | None = None):
    """`streamlit run app/main.py` on a free local port, in its own process group (killed whole on exit); yields
    its URL. Raises RuntimeError when it does not come up within a minute."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not healthy(url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not start (exit code {proc.poll()}); see {log_path}")
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


@contextlib.contextmanager
def browser_page():
    """One Chromium page (1440 x 900, downloads accepted, STEP as the default timeout)."""
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


def idle(pg, timeout_s: float = STEP / 1000) -> None:
    """Wait until the script run has finished: no 'running' status widget and no skeleton for ~0.6 s."""
    deadline, quiet = time.time() + timeout_s, 0
    while quiet < 3:
        if time.time() > deadline:
            raise TimeoutError(f"the app was still running after {timeout_s:.0f} s")
        busy = pg.evaluate("() => !!document.querySelector('[data-testid=\"stStatusWidget\"], [data-testid=\"stSkeleton\"]')")
        quiet = 0 if busy else quiet + 1
        pg.wait_for_timeout(200)


def go(pg, title: str) -> None:
    """Open a page from the sidebar and wait for its title."""
    pg.get_by_test_id("stSidebarNav").get_by_role("link", name=title, exact=True).click()
    pg.get_by_role("heading", name=title, level=1).wait_for()
    idle(pg)


def plots(pg) -> list[dict]:
    """Every Plotly figure on the page as drawn (plotly.js's decoded _fullData and layout): trace name, type,
    values, and the figure's annotation texts (subplot titles among them)."""
    return pg.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
        annotations: ((el._fullLayout || {}).annotations || []).map(a => a.text || ''),
        traces: (el._fullData || []).map(t => ({
            name: t.name || '', type: t.type || 'scatter',
            n: Array.from(t.z || t.y || t.x || []).length,
            y: Array.from(t.y || []).map(Number)}))}))""")


def curve(pg, name: str, differs_from: list | None = None, timeout_s: float = JOB / 1000) -> list[float]:
    """The y values of the first trace called `name` once drawn (and, if given, once they differ from `differs_from`)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        ys = [t["y"] for f in plots(pg) for t in f["traces"] if t["name"] == name]
        if ys and ys[0] and (differs_from is None or ys[0] != differs_from):
            idle(pg)
            return ys[0]
        pg.wait_for_timeout(500)
    raise TimeoutError(f"no {'new ' if differs_from else ''}{name} curve after {timeout_s:.0f} s")


def ok(pg) -> None:
    """No exception box on the page."""
    assert pg.get_by_test_id("stException").count() == 0, pg.get_by_test_id("stException").first.inner_text()


def remove_chips(pg, *chips: str) -> None:
    """Take context lengths out of Setup's length picker (chip labels such as '1K (4x)')."""
    for chip in chips:
        pg.get_by_role("button", name=f"Remove {chip}").click()
        idle(pg)


def set_number(pg, label: str, value) -> None:
    box = pg.get_by_role("spinbutton", name=label)
    box.fill(str(value))
    box.press("Enter")
    idle(pg)


def choose(pg, label: str, option: str) -> None:
    """Pick `option` in the select box called `label`."""
    box = pg.get_by_role("combobox", name=label)
    box.click()
    box.fill(option)  # the list filters as one types; the exact option is then clicked
    pg.get_by_role("option", name=option, exact=True).click()
    idle(pg)



def progress_texts(pg) -> list[str]:
    """The running jobs' panel texts: the bar's text and the caption under it."""
    return pg.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stProgress"]')).map(el => {
        const box = el.closest('[data-testid="stVerticalBlock"]');
        return (box ? box.innerText : el.innerText).replace(/\\s+/g, ' ');})""")


def time_left_figures(text: str) -> int:
    """How many time-left figures a text holds ('about 4 min 25 s left', 'eta 1870s', ...)."""
    return len(re.findall(r"\bleft\b|\beta\b", text, flags=re.I))


def wait_done(pg, marker, timeout_s: float = JOB / 1000, watch=None) -> list[str]:
    """Wait for `marker` (a locator) to appear, sampling the progress panels meanwhile; returns the samples."""
    seen, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        for t in progress_texts(pg):
            if t and (not seen or seen[-1] != t):
                seen.append(t)
                if watch:
                    watch(t)
        if marker.count():
            idle(pg)
            return seen
        pg.wait_for_timeout(300)
    raise TimeoutError(f"not done after {timeout_s:.0f} s; last progress: {seen[-1:] or 'none'}")


def wait_job(pg, marker, timeout_s: float = JOB / 1000, watch=None) -> list[str]:
    """After pressing a page's run button: wait until its job has finished (no progress panel, no 'previous
    result' caption) and `marker` (a locator) shows, sampling the progress panels meanwhile (see wait_done)."""
    seen, deadline = [], time.time() + timeout_s
    started = time.time()
    while time.time() < deadline:
        texts = progress_texts(pg)
        for t in texts:
            if t and (not seen or seen[-1] != t):
                seen.append(t)
                if watch:
                    watch(t)
        previous = pg.get_by_text("Showing the previous").count()
        # a job quicker than a poll may never show a panel: after 3 s without one, the marker decides
        if not texts and not previous and marker.count() and (seen or time.time() - started > 3):
            idle(pg)
            if not progress_texts(pg) and marker.count():
                return seen
        pg.wait_for_timeout(300)
    raise TimeoutError(f"not done after {timeout_s:.0f} s; last progress: {seen[-1:] or 'none'}")
