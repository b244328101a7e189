"""The Fidelity & retrieval page and its results as runs and report sections, on a tiny random Llama."""

import shlex
import sys
import threading
from pathlib import Path

import pytest
from apptest import button, finish, go, load, new_app, ok, record, tiny_dir, update  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import fidelity_charts, report  # noqa: E402
from app.engine import Backend, ModelKey, fidelity_job, retrieval_job  # noqa: E402
from app.runs import RunStore, comparison  # noqa: E402
from qroar import cli  # noqa: E402
from qroar.fidelity import FidelityConfig  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.retrieval import RetrievalConfig, paired_change  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402

PI = PIConfig("yarn", 4.0, None, (("beta_fast", 32.0), ("beta_slow", 1.0)))
RECIPE = Recipe(pi=PI, quant=QuantConfig(method="rtn", bits=3, group_size=32), scales=(1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 1.0, 1.0))
FID = FidelityConfig(lengths=(64, 128), max_docs=1, nopi=True)
RET = RetrievalConfig(lengths=(256, 384), depths=(0.0, 1.0), trials=1)


@pytest.fixture(scope="module")
def results(tiny_dir):
    backend, key = Backend(), ModelKey(tiny_dir, "cpu", "fp32")
    go_on, stop = (lambda f, m="": None), threading.Event()
    fid = fidelity_job(backend, key, RECIPE, "embedded:heldout", FID)(go_on, stop)
    ret = retrieval_job(backend, key, RECIPE, RET)(go_on, stop)
    return key, fid, ret


def _parse(command: str):
    assert all(len(line) <= 92 for line in command.splitlines())
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "qroar"
    return cli.build_parser().parse_args(argv[1:])


def test_fidelity_and_retrieval_run_every_variant_the_recipe_has(results):
    _, fid, ret = results
    assert set(fid.buckets["variant"]) == {"quant", "quant_scaled", "fp_scaled", "fp"}  # fp: against FP without PI
    assert set(ret.summary["variant"]) == {"fp", "quant", "quant_scaled", "fp_scaled"}
    assert fid.settings["recipe"] == RECIPE.to_dict() == ret.settings["recipe"]
    fig = fidelity_charts.fidelity_figure(fid.buckets, 64)
    assert fig.layout.xaxis.type == "log" and len(fig.data) == 2 * 3  # KL and same top per variant against FP
    heat = fidelity_charts.passkey_figure(ret.summary, paired_change(ret.trials))
    assert [a.text for a in heat.layout.annotations][-1] == "PTQ + scales<br>minus PTQ" and len(heat.data) == 5


def test_fidelity_and_retrieval_results_become_named_runs(results):
    key, fid, ret = results
    store = RunStore()
    f = store.record("fidelity", fid, model=key.to_dict())
    r = store.record("retrieval", ret, model=key.to_dict())
    assert f.name == "fidelity · yarn x4 · rtn w3 g32 · KL to 128 tokens"
    assert r.name == "retrieval · yarn x4 · rtn w3 g32 · passkey 256,384"
    assert f.recipe == RECIPE == r.recipe
    assert f.settings["fidelity"] == FID.to_dict() and f.settings["corpus"] == "embedded:heldout"
    assert r.settings["retrieval"] == RET.to_dict()
    diff, figs = comparison([f, r])  # side by side on Runs and in the Report: settings only, no overlay
    assert figs == {} and len(diff)
    s = report.ReportSettings(model=key.to_dict(), recipe=RECIPE.to_dict(), corpus="embedded:heldout",
                              eval=EvalConfig(lengths=(64,)).to_dict())
    titles = [p.title for p in report.with_runs(report.sections({}, s), [f, r], s)]
    assert titles[-3:] == [f"Run {f.id}: {f.name}", f"Run {r.id}: {r.name}", "Reproduce"]


def test_report_has_fidelity_and_retrieval_sections_with_their_commands(results):
    key, fid, ret = results
    s = report.ReportSettings(model=key.to_dict(), recipe=RECIPE.to_dict(), corpus="embedded:heldout",
                              eval=EvalConfig(lengths=(64,)).to_dict())
    parts = report.sections({"fidelity": fid, "retrieval": ret}, s)
    assert [p.title for p in parts] == ["Settings", "Fidelity", "Retrieval", "Chosen scales", "Reproduce"]
    html = report.build_html(parts)
    assert 'id="fig-fidelity-fidelity"' in html and 'id="fig-retrieval-passkey"' in html
    f = _parse(report.fidelity_command(s, fid))
    assert (f.command, f.model, f.corpus, f.lengths, f.max_docs, f.max_windows, f.nopi) == \
        ("fidelity", key.name, "embedded:heldout", "64,128", 1, 1, True)
    assert Recipe.from_args(f) == RECIPE
    r = _parse(report.retrieval_command(s, ret))
    assert (r.command, r.lengths, r.depths, r.trials, r.key, r.seed, r.generate) == \
        ("retrieval", "256,384", "0,1", 1, "digits", 0, False)
    assert Recipe.from_args(r) == RECIPE
    assert report.fidelity_command(s, fid) in parts[-1].code and report.retrieval_command(s, ret) in parts[-1].code


def test_fidelity_page_runs_both_jobs_and_refuses_bad_input(tiny_dir):
    at = load(new_app(), tiny_dir)
    go(at, "fidelity")
    ok(at)
    assert any("Fidelity run" in c.value for c in at.caption)  # the cost line before running
    # a malformed length says so and runs nothing
    at.text_input(key="w:fid.lengths").input("64,abc").run()
    button(at, "Run fidelity").click().run()
    ok(at)
    assert any("comma-separated integers" in e.value for e in at.error)
    assert record(at).jobs.get("fidelity") is None and not at.get("plotly_chart")

    at.text_input(key="w:fid.lengths").input("64,128").run()
    at.number_input(key="w:fid.max_docs").set_value(1).run()
    button(at, "Run fidelity").click().run()
    finish(at)
    ok(at)
    assert not at.error
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert set(table["length"]) == {64, 128} and "mean KLD" in table and (table["same top %"] <= 100).all()

    at.text_input(key="w:ret.lengths").input("512").run()
    at.text_input(key="w:ret.depths").input("0,1").run()
    at.number_input(key="w:ret.trials").set_value(1).run()
    at.radio(key="w:ret.key").set_value("words").run()
    at.radio(key="w:ret.haystack").set_value("filler").run()
    at.number_input(key="w:ret.seed").set_value(7).run()
    button(at, "Run retrieval").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 2 and len(at.dataframe) == 2
    rec = record(at)
    cfg = rec.jobs["retrieval"].result.settings["config"]  # the key, haystack and seed chosen reach the engine
    assert (cfg["key"], cfg["haystack"], cfg["seed"]) == ("words", "filler", 7)
    assert [r.kind for r in rec.runs.runs()][-2:] == ["fidelity", "retrieval"]

    # a bad depth afterwards: an error, and the results shown stay as they were
    at.text_input(key="w:ret.depths").input("0,x").run()
    button(at, "Run retrieval").click().run()
    ok(at)
    assert any("Depths expects" in e.value for e in at.error)
    assert len(at.get("plotly_chart")) == 2 and rec.jobs["retrieval"].status == "done"
