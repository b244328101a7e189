"""The dashboard walked as its two kinds of users walk it, in headless Chromium, on the embedded model, timed step by step.

- lecturer: "no PI vs YaRN under 3-bit", then "RTN vs AWQ", each pair compared on the Runs page; Diagnostics; Learn.
- engineer: Diagnostics, Tune (the first run and two hand moves), Search (racing), Fidelity & retrieval, Export, Report.

Every step keeps the dashboard's defaults except what the story changes. Prints a table of seconds per step,
writes bench/results/dashboard_walk.json and a screenshot per step (--shots, default test-artifacts/walk).

    python bench/dashboard_walk.py [--story lecturer|engineer|both] [--shots DIR]

Needs Chromium at /usr/bin/chromium and Playwright (both installed by `make test`).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser_kit import (JOB, browser_page, choose, curve, go, idle, ok, plots, serve,  # noqa: E402
                         time_left_figures, wait_job)

LONG = 600  # s: the longest a default step may take before the walk calls it failed


class Walk:
    def __init__(self, pg, story: str, shots: Path):
        self.pg, self.story, self.shots, self.rows, self.t = pg, story, shots, [], time.perf_counter()
        self.notes: list[str] = []

    def step(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        ok(self.pg)
        shot = self.shots / f"{self.story}-{len(self.rows) + 1:02d}-{name.replace(' ', '-')}.png"
        self.pg.screenshot(path=str(shot))
        self.rows.append(dict(story=self.story, step=name, seconds=round(now - self.t, 1), note=note,
                              screenshot=str(shot.relative_to(ROOT)) if shot.is_relative_to(ROOT) else str(shot)))
        print(f"  {self.story:9s} {name:34s} {now - self.t:7.1f} s  {note}", flush=True)
        self.t = time.perf_counter()

    def watch(self, text: str) -> None:
        if time_left_figures(text) > 1:
            self.notes.append(f"two time-left figures: {text}")


def load(w: Walk) -> None:
    pg = w.pg
    pg.get_by_role("heading", name="Setup", level=1).wait_for()
    idle(pg)
    w.step("open the dashboard")
    pg.get_by_role("button", name="Load model").click()
    pg.get_by_role("button", name="Model loaded").wait_for(timeout=JOB)
    idle(pg)
    w.step("load the default model")


def perplexity(w: Walk, label: str) -> None:
    pg = w.pg
    go(pg, "Perplexity")
    cost = pg.get_by_text("Next run:").first.inner_text() if pg.get_by_text("Next run:").count() else ""
    pg.get_by_role("button", name="Run perplexity").click()
    wait_job(pg, pg.get_by_text("scored tokens"), timeout_s=LONG, watch=w.watch)
    w.step(f"perplexity: {label}", cost.split("; ", 1)[-1][:90])


def set_bits(pg, bits: int) -> None:
    thumb = pg.get_by_test_id("stSlider").filter(has_text="Bits").get_by_role("slider")
    thumb.focus()
    while int(thumb.input_value()) != bits:
        thumb.press("ArrowLeft" if int(thumb.input_value()) > bits else "ArrowRight")
        idle(pg)


def compare(w: Walk, label: str, n: int = 2) -> None:
    """Runs page: the last n runs chosen, their differences and overlays drawn."""
    pg = w.pg
    go(pg, "Runs")
    box = pg.get_by_role("combobox", name="Runs to compare")
    clear = pg.get_by_test_id("stMultiSelect").filter(has=box).get_by_role("button", name="Clear all")
    if clear.count():  # the picker keeps the last comparison's runs
        clear.first.click()
        idle(pg)
    for _ in range(n):
        box.click()
        pg.get_by_role("option").last.click()
        idle(pg)
        pg.keyboard.press("Escape")
    idle(pg)
    n_figs = len(plots(pg))
    w.step(f"runs: {label}", f"{n_figs} overlay figure(s)")


def lecturer(w: Walk) -> None:
    pg = w.pg
    load(w)
    set_bits(pg, 3)
    choose(pg, "RoPE scaling type", "default")
    w.step("setup: no PI, 3-bit")
    perplexity(w, "no PI, RTN W3")
    go(pg, "Setup")
    choose(pg, "RoPE scaling type", "yarn")
    perplexity(w, "YaRN x8, RTN W3")
    compare(w, "no PI vs YaRN, 3-bit")
    go(pg, "Setup")
    choose(pg, "Method", "awq")
    perplexity(w, "YaRN x8, AWQ W3")
    compare(w, "RTN vs AWQ")
    go(pg, "Diagnostics")
    pg.get_by_role("button", name="Run diagnostics").click()
    wait_job(pg, pg.get_by_role("heading", name="Position-dependent logit noise"), timeout_s=LONG, watch=w.watch)
    w.step("diagnostics (defaults)")
    go(pg, "Learn")
    w.step("learn page")


def engineer(w: Walk) -> None:
    pg = w.pg
    load(w)
    go(pg, "Diagnostics")
    pg.get_by_role("button", name="Run diagnostics").click()
    wait_job(pg, pg.get_by_role("heading", name="Position-dependent logit noise"), timeout_s=LONG, watch=w.watch)
    w.step("diagnostics (defaults)")
    go(pg, "Tune")
    first = curve(pg, "PTQ + scales", timeout_s=LONG)
    w.step("tune: first run (fp, PTQ, PTQ + scales)")
    for band, key in (("b7", "PageUp"), ("b4", "PageDown")):
        thumb = pg.get_by_test_id("stSlider").filter(has_text=f"{band} · pairs").get_by_role("slider")
        thumb.focus()
        thumb.press(key)
        first = curve(pg, "PTQ + scales", differs_from=first, timeout_s=LONG)
        w.step(f"tune: move {band}")
    go(pg, "Search")
    if not pg.get_by_text("Candidates per band").count():
        pg.get_by_text("Search settings").first.click()
        idle(pg)
    pg.get_by_test_id("stRadio").filter(has_text="Strategy").get_by_text("race", exact=True).click()
    idle(pg)
    cost = pg.get_by_text("This search:").first.inner_text() if pg.get_by_text("This search:").count() else ""
    pg.get_by_role("button", name="Start search").click()
    wait_job(pg, pg.get_by_role("heading", name="Search trace"), timeout_s=3 * LONG, watch=w.watch)
    gain = pg.get_by_test_id("stMetric").first.inner_text().replace("\n", " ")
    w.step("search (racing, other defaults)", f"{gain}; announced {cost.split('; ')[-1][:60]}")
    go(pg, "Fidelity & retrieval")
    pg.get_by_role("button", name="Run fidelity").click()
    wait_job(pg, pg.get_by_role("button", name="Download the position table (CSV)"), timeout_s=LONG, watch=w.watch)
    w.step("fidelity (defaults, with the scales)", f"{len(plots(pg))} figure(s)")
    pg.get_by_role("button", name="Run retrieval").click()
    wait_job(pg, pg.get_by_role("button", name="Download every prompt's scores (CSV)"), timeout_s=LONG, watch=w.watch)
    w.step("passkey retrieval (defaults)", f"{len(plots(pg))} figure(s)")
    go(pg, "Export")
    pg.get_by_role("button", name="Download scales file").wait_for(timeout=JOB)
    idle(pg)
    src = pg.get_by_text("From ").first.inner_text()[:60]
    w.step("export: scales file ready", src)
    go(pg, "Report")
    with pg.expect_download(timeout=JOB) as info:
        pg.get_by_role("button", name="Download the HTML report").click()
    size = Path(info.value.path()).stat().st_size
    w.step("report: HTML downloaded", f"{size / 1024:.0f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--story", choices=["lecturer", "engineer", "both"], default="both")
    ap.add_argument("--shots", type=Path, default=ROOT / "test-artifacts" / "walk")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard_walk.json")
    a = ap.parse_args()
    a.shots.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for story in (["lecturer", "engineer"] if a.story == "both" else [a.story]):
        # a fresh server per story: nothing cached from the other one
        with serve(a.shots / f"server-{story}.log") as url, browser_page() as pg:
            pg.goto(url)
            w = Walk(pg, story, a.shots)
            try:
                {"lecturer": lecturer, "engineer": engineer}[story](w)
            finally:
                rows += w.rows
                notes += w.notes
    total = {s: round(sum(r["seconds"] for r in rows if r["story"] == s), 1) for s in {r["story"] for r in rows}}
    print("\n| story | step | seconds | note |\n| --- | --- | ---: | --- |")
    for r in rows:
        print(f"| {r['story']} | {r['step']} | {r['seconds']} | {r['note']} |")
    print(f"\ntotal: {total}" + (f"\nproblems seen: {notes}" if notes else ""))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                 "steps": rows, "total_seconds": total, "problems": notes}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
