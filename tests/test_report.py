"""The session report on real results of a tiny random Llama: sections, settings, self-containment, the
reproducing command lines (parsed by the real CLI, and `qroar eval` re-run to the same numbers), PNG export."""

import json
import random
import re
import shlex
import sys
import threading
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import TEXT, save_tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import report  # noqa: E402
from app.engine import Backend, ModelKey, perplexity_job, search_job, tune_job  # noqa: E402
from qroar import cli  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.diagnostics import DiagConfig, run_diagnostics  # noqa: E402
from qroar.errors import ConfigError  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.search import SearchConfig  # noqa: E402

PI = PIConfig("yarn", 2.0, None, (("beta_fast", 32.0), ("beta_slow", 1.0)))
QUANT = QuantConfig(method="rtn", bits=3, group_size=32, seq_len=64, n_samples=2)
EVAL = EvalConfig(lengths=(32, 96), max_windows_per_doc=1)
SCALES = (1.0, 1.1, 0.9, 1.2)


def _corpus(root: Path, split: str, n: int) -> str:
    folder = root / split
    folder.mkdir(parents=True)
    words = TEXT.split()
    for i in range(n):
        rng = random.Random(f"{split}{i}")
        (folder / f"{split}{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    return str(folder)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Every result kind the report draws, computed by the app's own job functions on a tiny model."""
    tmp = tmp_path_factory.mktemp("report")
    dev, held = _corpus(tmp, "dev", 2), _corpus(tmp, "held", 1)
    backend, key = Backend(), ModelKey(save_tiny(tmp / "model"), "cpu", "fp32")
    go_on, stop = (lambda f, m="": None), threading.Event()
    recipe = Recipe(pi=PI, quant=QUANT, calib=dev, bands=BandConfig(4), scale=ScaleConfig("shared", "before"), scales=SCALES)
    results = {"perplexity": perplexity_job(backend, key, recipe, held, EVAL)(go_on, stop),
               "tune": tune_job(backend, key, recipe, held, EVAL)(go_on, stop)}
    entry = backend.models.get(key)
    entry.wb.apply(recipe.with_scales(None))
    results["diagnostics"] = run_diagnostics(entry.wb, dev, DiagConfig(bands=BandConfig(4), capture_length=128, n_docs=1,
                                                                       noise_pairs=16))
    windows = pd.DataFrame({"band": range(4), "g_min": [0.9, 0.85, 0.8, 0.8], "g_max": [1.1, 1.2, 1.25, 1.25],
                            "reason": ["given"] * 4})
    search_cfg = SearchConfig(n_candidates=5, lengths=(32,), dev_corpus=dev, heldout_corpus=held, max_windows_per_doc=1)
    results["search"] = search_job(backend, key, recipe, windows, search_cfg)(go_on, stop)
    settings = report.ReportSettings(model=key.to_dict(), recipe=recipe.to_dict(), corpus=held, eval=EVAL.to_dict(),
                                     model_info=entry.wb.info.to_dict())
    return results, settings, tmp


@pytest.fixture(scope="module")
def html(session):
    results, settings, _ = session
    return report.build_html(report.sections(results, settings))


def test_report_has_every_section_figure_and_setting(session, html):
    results, settings, _ = session
    parts = report.sections(results, settings)
    assert [p.title for p in parts] == ["Settings", "Perplexity", "Diagnostics", "Tune", "Search", "Chosen scales", "Reproduce"]
    for p in parts:
        assert f'<h2>{p.title}</h2>' in html
    figures = [f"fig-{report._anchor(p.title)}-{name}" for p in parts for name, _ in p.figures]
    assert len(figures) >= 10 and len(set(figures)) == len(figures)
    for div in figures:  # every figure drawn, with its data inline
        assert f'id="{div}"' in html and re.search(rf'Plotly\.newPlot\(\s*"{div}",\s*\[\{{', html)
    table = report.settings_table(settings).set_index("setting")["value"]
    assert table["position interpolation"] == "yarn x2; beta_fast=32.0, beta_slow=1.0"
    assert table["quantizer"] == "rtn w3 group 32 asym, scope linear"
    assert table["context lengths"] == "32, 96" and table["scales"] == "b0=1, b1=1.1, b2=0.9, b3=1.2"
    for value in table:
        assert value.replace("&", "&amp;") in html
    # the search's held-out table and chosen scales are there, numbers as the result has them
    held = results["search"].heldout
    ppl = float(held[(held.variant == "quant_scaled") & (held.length == 32)].ppl.iloc[0])
    assert f"{ppl:.4g}" in html


def test_report_is_self_contained_with_plotly_inlined_once(html):
    from plotly.offline import get_plotlyjs

    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "no external scripts"
    assert not re.search(r"<link[^>]*href\s*=\s*[\"']?https?:", html, re.I), "no external style sheets"
    assert html.count(get_plotlyjs()[:2000]) == 1
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def _parse(command: str):
    assert all(len(line) <= 92 for line in command.splitlines())  # continued lines, readable
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "qroar"
    return cli.build_parser().parse_args(argv[1:])


def test_commands_parse_back_to_the_session_settings(session):
    results, settings, _ = session
    e = _parse(report.eval_command(settings))
    assert (e.command, e.model, e.device, e.dtype, e.corpus) == ("eval", settings.model["name"], "cpu", "fp32", settings.corpus)
    assert Recipe.from_args(e) == Recipe.from_dict(settings.recipe).with_scales(None)
    q = Recipe.from_args(e).quant
    assert (q.method, q.bits, q.group_size, q.symmetric, q.scope) == ("rtn", 3, 32, False, "linear")
    assert cli.lengths_from_args(e, 64) == (32, 96) and e.max_windows == 1 and e.stride is None

    diag = results["diagnostics"].settings
    cmd, missing = report.diagnose_command(settings, diag)
    d = _parse(cmd)
    assert (d.bands, d.band_align, d.capture_length, d.n_docs, d.eps) == (4, "log", 128, 1, 1e-3)
    assert Recipe.from_args(d).pi == PI and d.corpus == diag["corpus"]
    assert missing == ["noise_pairs=16"]  # the CLI has no flag for it: the report says so

    s = _parse(report.search_command(settings, results["search"]))
    cfg = results["search"].search_cfg
    assert (s.candidates, s.sweeps, s.guard, s.folds, s.mode, s.order) == (5, 1, 0.005, 0, "shared", "before")
    assert (s.dev_corpus, s.heldout_corpus, s.lengths, s.max_windows) == (cfg["dev_corpus"], cfg["heldout_corpus"], "32", 1)
    assert [tuple(map(float, w.split(":"))) for w in s.windows.split(",")] == [(0.9, 1.1), (0.85, 1.2), (0.8, 1.25), (0.8, 1.25)]


def test_commands_for_every_window_say_so_to_the_cli():
    """The CLI's default is a few windows per document: a session that used all of them says --max-windows 0."""
    from qroar import preflight
    from qroar.search import search_args, search_config_from_args

    every = EvalConfig(lengths=(32,), max_windows_per_doc=None).to_dict()
    settings = report.ReportSettings(model={"name": "qroar-tiny"}, recipe=Recipe(pi=PI, quant=QUANT).to_dict(), corpus="c",
                                     eval=every)
    e = _parse(report.eval_command(settings))
    cfg = SearchConfig(lengths=(32,), max_windows_per_doc=None)
    s = cli.build_parser().parse_args(["search", *search_args(cfg)])
    assert e.max_windows == s.max_windows == 0 and preflight.max_windows(e.max_windows) is None
    assert search_config_from_args(s, 64) == cfg


def test_eval_command_reproduces_the_session_perplexity(session, capsys):
    results, settings, tmp = session
    out = tmp / "reproduced"
    cmd = report.eval_command(settings, out=str(out)) + " --quiet"
    assert cli.main(shlex.split(cmd.replace("\\\n", " "))[1:]) == 0
    again = pd.DataFrame(json.loads((out.with_suffix(".json")).read_text())["summary"])
    app = results["perplexity"].summary
    merged = app.merge(again, on=["variant", "length"], suffixes=("_app", "_cli"))
    assert len(merged) == 4 and merged.ppl_cli.to_numpy() == pytest.approx(merged.ppl_app.to_numpy(), rel=1e-6)


def test_empty_session_report_still_has_settings_and_a_command(session):
    _, settings, _ = session
    bare = report.ReportSettings.from_dict({**settings.to_dict(), "recipe": {**settings.recipe, "scales": None}})
    parts = report.sections({}, bare)
    assert [p.title for p in parts] == ["Settings", "Reproduce"] and parts[-1].code == (report.eval_command(bare),)
    page = report.build_html(parts)
    assert "qroar eval" in page and "Plotly.newPlot" not in page
    assert report.ReportSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_png_export_of_a_small_figure():
    if report.find_browser() is None:
        pytest.skip("no Chrome/Chromium on this machine: kaleido cannot draw PNGs")
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))
    png = report.figure_png(fig, width=320, height=200)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 320 and int.from_bytes(png[20:24], "big") == 200  # IHDR width, height


def test_png_export_without_a_browser_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    with pytest.raises(ConfigError, match="Chromium"):
        report.figure_png(go.Figure())


def test_report_page_renders_contents_commands_and_download(tmp_path):
    from apptest import go, load, new_app, ok

    at = go(load(new_app(), save_tiny(tmp_path / "m")), "report")
    ok(at)
    assert at.title[0].value == "Report"
    assert any(c.value.startswith("qroar eval --model") for c in at.code)  # no results yet: the settings' command
    assert any("not run yet" in m.value for m in at.markdown)
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download the HTML report" in labels
