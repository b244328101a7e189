"""Runs: every finished result kept with its settings (store, settings diff, overlays, report), on real results
of a tiny random Llama computed through the app's own Backend and job functions."""

import html
import random
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import TEXT, save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import report, run_charts  # noqa: E402
from app.engine import Backend, ModelKey, diagnostics_job, perplexity_job, search_job, tune_job  # noqa: E402
from app.runs import (  # noqa: E402
    MISSING, RunStore, auto_name, comparison, curves_frame, diagnostics_frame, flatten, runs_table, settings_diff,
)
from qroar.bands import BandConfig  # noqa: E402
from qroar.diagnostics import DiagConfig  # noqa: E402
from qroar.errors import ConfigError, DataError  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402

NO_PI = PIConfig()
YARN = PIConfig("yarn", 2.0, None, (("beta_fast", 32.0), ("beta_slow", 1.0)))
W3 = QuantConfig(method="rtn", bits=3, group_size=32, seq_len=64, n_samples=2)
EVAL = EvalConfig(lengths=(32, 96), max_windows_per_doc=1)
CORPORA = {}  # dev, held: small folders written by the session fixture


DIAG = DiagConfig(bands=BandConfig(4), capture_length=128, n_docs=1, noise_pairs=16)


def recipe(pi=YARN, quant=W3, scales=None) -> Recipe:
    """The session's Recipe: 4 bands, shared mode before quantization, calibrated on the dev folder."""
    return Recipe(pi=pi, quant=quant, calib=CORPORA.get("dev", "embedded:dev"), bands=BandConfig(4),
                  scale=ScaleConfig("shared", "before"), scales=scales)


def _corpus(folder: Path, n: int) -> str:
    """n documents of 150 random words (a few hundred tokens each): quick on two shared CPU cores."""
    folder.mkdir(parents=True)
    for i in range(n):
        rng = random.Random(f"{folder.name}{i}")
        (folder / f"{i}.txt").write_text(" ".join(rng.choice(TEXT.split()) for _ in range(150)))
    return str(folder)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One session's record after "no PI vs YaRN under 3-bit", for perplexity and diagnostics, through Backend.submit."""
    tmp = tmp_path_factory.mktemp("runs")
    backend = Backend()
    key = ModelKey(save_tiny(tmp / "model"), "cpu", "fp32")
    CORPORA.update(dev=_corpus(tmp / "dev", 2), held=_corpus(tmp / "held", 1))
    rec = backend.registry.session("lecture")
    rec.model_key = key
    for pi in (NO_PI, YARN):
        backend.submit(rec, "perplexity", perplexity_job(backend, key, recipe(pi), CORPORA["held"], EVAL))
        backend.submit(rec, "diagnostics", diagnostics_job(backend, key, recipe(pi), CORPORA["dev"], DIAG))
    backend.queue.wait_idle(timeout=300)
    yield backend, rec, key
    backend.queue.shutdown()


def _fake(factor: float) -> SimpleNamespace:
    """A full-precision perplexity-like result under YaRN x`factor`: the store reads only its settings."""
    r = Recipe(pi=_pi(factor), quant=QuantConfig(method="none"))
    return SimpleNamespace(settings={"model": {"name": "m"}, "recipe": r.to_dict(), "corpus": "c", "eval": EVAL.to_dict()},
                           summary=pd.DataFrame(columns=["variant", "length", "ppl"]))


def _pi(factor: float) -> PIConfig:
    return replace(YARN, factor=float(factor))


# ----------------------------------------------------------------------------- the store


def test_each_finished_job_is_a_named_run_with_its_settings(session):
    backend, rec, key = session
    runs = rec.runs.runs()
    assert [r.kind for r in runs] == ["perplexity", "diagnostics", "perplexity", "diagnostics"]
    assert [r.id for r in runs] == ["r1", "r2", "r3", "r4"]
    assert runs[0].name == "perplexity · no PI · rtn w3 g32" and runs[2].name == "perplexity · yarn x2 · rtn w3 g32"
    assert runs[1].name == "diagnostics · no PI · rtn w3 g32 · 128 tokens"
    # the run's settings: the model, its Recipe (no scales: perplexity and diagnostics measure without), the options
    assert runs[2].settings == {"model": key.to_dict(), **recipe().to_dict(), "corpus": CORPORA["held"],
                                "eval": EVAL.to_dict()}
    assert runs[2].recipe == recipe() and runs[0].recipe == recipe(NO_PI)
    d = runs[3].settings
    assert d["model"] == key.to_dict() and d["pi"] == YARN.to_dict() and d["capture_length"] == 128
    assert runs[3].recipe == recipe() and d["diag"]["n_docs"] == 1 and d["corpus"] == CORPORA["dev"]
    assert "seconds" not in d and "docs" not in d  # not settings: they differ between any two runs
    assert runs[3].result is rec.jobs["diagnostics"].result and runs[3].job_id == rec.jobs["diagnostics"].id


def test_failed_cancelled_and_load_jobs_are_not_runs():
    backend = Backend()
    rec = backend.registry.session("t")

    def fails(progress, cancel):
        raise DataError("no such corpus")

    def cancelled(progress, cancel):
        cancel.set()
        return _fake(2.0)

    jobs = [backend.submit(rec, "perplexity", fails), backend.submit(rec, "perplexity", cancelled),
            backend.submit(rec, "load", lambda p, c: {"name": "m"})]
    backend.queue.wait_idle(timeout=10)
    assert [j.status for j in jobs] == ["failed", "cancelled", "done"]
    assert rec.runs.runs() == []
    backend.submit(rec, "perplexity", lambda p, c: _fake(4.0))
    backend.queue.wait_idle(timeout=10)
    assert [r.name for r in rec.runs.runs()] == ["perplexity · yarn x4 · fp"]
    backend.queue.shutdown()


def test_store_is_bounded_and_drops_the_oldest_unpinned_run_first():
    store = RunStore(max_runs=3)
    runs = [store.record("perplexity", _fake(f)) for f in (2, 3, 4)]
    store.pin(runs[0].id)
    store.choose([runs[1].id, runs[2].id])
    store.record("perplexity", _fake(5))
    assert [r.name for r in store.runs()] == ["perplexity · yarn x2 · fp", "perplexity · yarn x4 · fp",
                                              "perplexity · yarn x5 · fp"]
    assert store.chosen == [runs[2].id]  # a dropped run leaves the comparison too
    with pytest.raises(ConfigError, match="no longer kept"):
        store.get(runs[1].id)
    store.pin(runs[0].id, False)
    store.record("perplexity", _fake(6))
    assert runs[0] not in store.runs() and len(store) == 3


def test_rename_delete_and_unique_names():
    store = RunStore()
    a = store.record("perplexity", _fake(2))
    b = store.record("perplexity", _fake(2))
    assert (a.name, b.name) == ("perplexity · yarn x2 · fp", "perplexity · yarn x2 · fp (2)")  # legends tell them apart
    store.rename(a.id, "  YaRN   under 3-bit ")
    assert a.name == "YaRN under 3-bit" and a.renamed
    with pytest.raises(ConfigError, match="already named"):
        store.rename(b.id, "YaRN under 3-bit")
    with pytest.raises(ConfigError, match="Type a name"):
        store.rename(b.id, "   ")
    store.choose([b.id, a.id, "r99"])
    assert store.chosen == [b.id, a.id]
    store.delete(a.id)
    assert store.runs() == [b] and store.chosen_runs() == [b]
    with pytest.raises(ConfigError):
        store.delete(a.id)
    assert store.record("load", {"name": "m"}) is None  # not a kind of run


def test_tune_moves_on_one_setup_update_one_run_until_it_is_renamed(session):
    backend, _, key = session
    rec = backend.registry.session("tuning")
    rec.model_key = key

    def tune(scales, quant=W3):
        backend.submit(rec, "tune", tune_job(backend, key, recipe(quant=quant, scales=scales), CORPORA["held"], EVAL))
        backend.queue.wait_idle(timeout=120)
        return rec.runs.runs()

    first = tune((1.0, 1.0, 1.0, 1.0))
    assert [r.name for r in first] == ["tune · yarn x2 · rtn w3 g32 · 4 bands, 0 scaled"]
    moved = tune((1.0, 1.1, 1.0, 1.2))
    assert moved == first and moved[0].settings["scales"] == [1.0, 1.1, 1.0, 1.2]
    assert moved[0].name == "tune · yarn x2 · rtn w3 g32 · 4 bands, 2 scaled"
    assert moved[0].settings == {"model": key.to_dict(), **recipe(scales=(1.0, 1.1, 1.0, 1.2)).to_dict(),
                                 "corpus": CORPORA["held"], "eval": EVAL.to_dict(), "max_docs": 0, "control": False}
    rec.runs.rename(moved[0].id, "before Q-ROAR")
    after = tune((1.0, 0.9, 1.0, 1.2))
    assert [r.name for r in after] == ["before Q-ROAR", "tune · yarn x2 · rtn w3 g32 · 4 bands, 2 scaled"]
    diff = comparison(after)[0].set_index("setting")  # by the Recipe's own dotted paths: only the scales moved
    assert diff.to_dict("index") == {"scales": {"before Q-ROAR": "[1.0, 1.1, 1.0, 1.2]", after[1].name: "[1.0, 0.9, 1.0, 1.2]"}}
    other = tune((1.0, 0.9, 1.0, 1.2), QuantConfig(method="rtn", bits=4, group_size=32, seq_len=64, n_samples=2))
    assert len(other) == 3 and other[-1].settings["quant"]["bits"] == 4  # another set-up: a run of its own


def test_runs_survive_a_reload_on_the_session_record(session):
    backend, rec, _ = session
    assert backend.registry.session("lecture").runs is rec.runs and len(rec.runs) == 4


# ----------------------------------------------------------------------------- settings differences


def test_flatten_dots_nested_dicts_and_keeps_lists_whole():
    assert flatten({"pi": {"factor": 8.0, "params": {"beta_fast": 32}}, "eval": {"lengths": [1, 2]}, "q": None,
                    "empty": {}}) == {"pi.factor": 8.0, "pi.params.beta_fast": 32, "eval.lengths": [1, 2], "q": None}


def test_settings_diff_keeps_only_the_settings_that_differ():
    a = {"pi": {"rope_type": "yarn", "factor": 8.0, "params": {"beta_fast": 32.0}}, "quant": {"method": "rtn", "bits": 3},
         "eval": {"lengths": [64, 128]}, "corpus": "embedded:heldout"}
    b = {"pi": {"rope_type": "yarn", "factor": 8, "params": {"beta_fast": 16.0}}, "quant": {"method": "awq", "bits": 3},
         "eval": {"lengths": [64, 128]}, "corpus": "embedded:heldout", "max_docs": 1}
    diff = settings_diff({"RTN": a, "AWQ": b})
    assert list(diff.columns) == ["setting", "RTN", "AWQ"]
    assert diff.set_index("setting").to_dict("index") == {
        "pi.params.beta_fast": {"RTN": "32", "AWQ": "16"}, "quant.method": {"RTN": "rtn", "AWQ": "awq"},
        "max_docs": {"RTN": MISSING, "AWQ": "1"}}  # 8.0 and 8 are the same factor
    assert settings_diff({"a": a, "same": dict(a)}).empty
    three = settings_diff({"a": a, "b": b, "c": {**a, "quant": None}})
    assert three.set_index("setting").loc["quant.bits"].tolist() == ["3", "3", MISSING]
    assert three.set_index("setting").loc["quant"].tolist() == [MISSING, MISSING, "None"]


def test_diff_of_real_runs_names_the_pi_and_the_kind(session):
    _, rec, _ = session
    p1, d1, p2, _ = rec.runs.runs()
    diff, _ = comparison([p1, p2])
    assert set(diff.setting) == {"pi.rope_type", "pi.factor", "pi.params.beta_fast", "pi.params.beta_slow"}
    assert diff.set_index("setting").loc["pi.rope_type"].tolist() == ["default", "yarn"]
    mixed, _ = comparison([p1, d1])
    assert mixed.set_index("setting").loc["kind"].tolist() == ["perplexity", "diagnostics"]


def test_runs_table_lists_newest_first_with_key_settings(session):
    _, rec, _ = session
    t = runs_table(rec.runs.runs())
    assert t.id.tolist() == ["r4", "r3", "r2", "r1"]
    assert t.PI.tolist() == ["yarn x2", "yarn x2", "no PI", "no PI"] and set(t.quantizer) == {"rtn w3 g32"}
    assert t.lengths.tolist() == ["128", "32, 96", "128", "32, 96"]


def test_auto_names_follow_the_settings():
    q = W3.to_dict()
    assert auto_name("perplexity", {"pi": _pi(8).to_dict(), "quant": {**q, "group_size": 64}}) == "perplexity · yarn x8 · rtn w3 g64"
    assert auto_name("perplexity", {"pi": NO_PI.to_dict(), "quant": {**q, "group_size": 0, "symmetric": True}}) \
        == "perplexity · no PI · rtn w3 ch sym"
    assert auto_name("search", {"pi": _pi(2).to_dict(), "quant": {"method": "none"}, "bands": {"n_bands": 8},
                                "edges": [0, 2, 4, 8]}) == "search · yarn x2 · fp · 3 bands"  # explicit edges count
    assert auto_name("search", {"pi": NO_PI.to_dict(), "quant": q, "bands": {"n_bands": 4}, "edges": None}) \
        == "search · no PI · rtn w3 g32 · 4 bands"


# ----------------------------------------------------------------------------- overlay charts


def test_perplexity_overlay_has_a_line_per_run_and_variant(session):
    _, rec, _ = session
    p1, _, p2, _ = rec.runs.runs()
    curves = curves_frame([p1, p2])
    assert set(curves.columns) == {"run", "variant", "length", "ppl"} and len(curves) == 8
    fig = run_charts.perplexity_overlay(curves, trained_context=64)
    assert [t.name for t in fig.data] == [f"{r} · {v}" for r in (p1.name, p2.name) for v in ("full precision", "quantized")]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color  # a colour per run
    assert fig.data[0].line.dash == "solid" and fig.data[1].line.dash == "dash"  # a line style per variant
    quant = p2.result.summary.query("variant == 'quant'").sort_values("length")
    assert list(fig.data[3].y) == quant.ppl.tolist() and list(fig.data[3].x) == [32, 96]
    with pytest.raises(ValueError, match="no runs"):
        run_charts.perplexity_overlay(curves.iloc[:0])


def test_diagnostics_overlays_per_run(session):
    _, rec, _ = session
    _, d1, _, d2 = rec.runs.runs()
    names = [d1.name, d2.name]
    tir = diagnostics_frame([d1, d2], "tir")
    fig = run_charts.tir_overlay(tir, "W")
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend == [f"{r} · {v}" for r in names for v in ("full precision", "quantized")]
    assert len(fig.data) == 8 and all(list(t.x) == ["b0", "b1", "b2", "b3"] for t in fig.data)  # q and k panels
    q_fp = d2.result.tables["tir"].query("kind == 'W' and proj == 'q' and variant == 'fp'").groupby("band").tir.median()
    assert list(fig.data[4].y) == pytest.approx(q_fp.tolist())

    noise = run_charts.noise_overlay(diagnostics_frame([d1, d2], "logit_noise_pooled"), "isolated")
    assert [a.text for a in noise.layout.annotations] == names  # one panel per run, side by side
    assert len(noise.data) == 8 and [t.name for t in noise.data if t.showlegend] == ["b0", "b1", "b2", "b3"]
    assert {t.xaxis for t in noise.data} == {"x", "x2"}

    many = pd.concat([diagnostics_frame([d1], "logit_noise_pooled").assign(run=f"run {i}") for i in range(5)])
    wrapped = run_charts.noise_overlay(many, "isolated")
    assert len(wrapped.data) == 20 and len({t.xaxis for t in wrapped.data}) == 5
    assert wrapped.layout.yaxis5.domain[1] < wrapped.layout.yaxis4.domain[0]  # 4 panels a row, the 5th below

    ip = run_charts.ip_overlay(diagnostics_frame([d1, d2], "ip"))
    assert [t.name for t in ip.data] == [f"{r} · D=1K" for r in names]  # the longest length both have
    assert list(ip.data[0].y) != list(ip.data[1].y)  # no PI vs YaRN: different pressure

    _, figs = comparison([d1, d2])
    assert list(figs) == ["tir_W", "tir_A", "logit_noise_isolated", "logit_noise_accumulated", "ip"]


# ----------------------------------------------------------------------------- the report


def test_report_with_two_runs_has_their_settings_figures_and_differences(session):
    _, rec, key = session
    p1, _, p2, _ = rec.runs.runs()
    rec.runs.rename(p1.id, "no PI, 3-bit")
    settings = report.ReportSettings(model=key.to_dict(), recipe=recipe().to_dict(), corpus=CORPORA["held"],
                                     eval=EVAL.to_dict())
    parts = report.with_runs(report.sections({"perplexity": p2.result}, settings), [p1, p2], settings)
    titles = [p.title for p in parts]
    assert titles == ["Settings", "Perplexity", "Compared runs", "Run r1: no PI, 3-bit", f"Run r3: {p2.name}", "Reproduce"]
    compared = parts[2]
    assert [n for n, _ in compared.figures] == ["perplexity"] and len(compared.figures[0][1].data) == 4
    diff = dict(compared.tables)["Settings that differ"]
    assert list(diff.columns) == ["setting", "no PI, 3-bit", p2.name] and "pi.rope_type" in set(diff.setting)
    own = dict(parts[3].tables)
    assert own["Settings of this run"].set_index("setting").loc["pi.rope_type", "value"] == "default"
    # each run's command reproduces that run (its own recipe.to_args()), not the session's settings
    assert "--pi" not in parts[3].code[0] and "--pi yarn" in parts[4].code[0]
    flat = " ".join(parts[3].code[0].replace("\\\n", " ").split())
    assert shlex.join(p1.recipe.to_args()) in flat and "--bits 3" in flat
    assert parts[-1].code == (parts[1].code[0], parts[3].code[0])  # the session's run is run r3: one command each
    page = report.build_html(parts)
    assert all(f"<h2>{html.escape(p.title)}</h2>" in page for p in parts)
    divs = re.findall(r'id="(fig-[^"]+)"', page)
    assert len(divs) == len(set(divs)) == 4  # the session's, the overlay, one per run
    assert "no PI, 3-bit · quantized" in page  # the overlay's legend names the runs


def test_a_search_is_a_run_and_its_report_section_reproduces_it(session):
    from qroar.search import SearchConfig

    backend, _, key = session
    corpora = CORPORA
    rec = backend.registry.session("searching")
    rec.model_key = key
    windows = pd.DataFrame({"band": range(4), "g_min": [0.9] * 4, "g_max": [1.1] * 4, "reason": ["given"] * 4})
    cfg = SearchConfig(n_candidates=5, lengths=(32,), dev_corpus=corpora["dev"], heldout_corpus=corpora["held"],
                       max_windows_per_doc=1)
    backend.submit(rec, "search", search_job(backend, key, recipe(), windows, cfg))
    backend.queue.wait_idle(timeout=300)
    (run,) = rec.runs.runs()
    assert run.name == "search · yarn x2 · rtn w3 g32 · 4 bands" and run.settings["model"] == key.to_dict()
    assert run.settings["search"]["lengths"] == [32] and run.settings["windows"] == [[0.9, 1.1]] * 4
    assert run.settings["scales"] == run.result.scales and "checkpoint" not in run.settings["search"]
    assert set(run.curves.variant) == {"fp", "quant", "quant_scaled", "fp_scaled"}  # the held-out control too
    s = report.ReportSettings(model=key.to_dict(), recipe=recipe(NO_PI, QuantConfig(method="none")).to_dict(),
                              corpus=CORPORA["held"], eval=EVAL.to_dict())
    (section,) = report.run_sections([run], s)[1:]
    assert [n for n, _ in section.figures][0] == "search_scales"
    cmd = section.code[0]
    assert "--pi yarn" in cmd and "--bits 3" in cmd and "--bands 4" in cmd and f"--dev-corpus {corpora['dev']}" in cmd


def test_on_done_sees_the_result_before_the_job_reads_done_and_cannot_lose_it():
    from app.jobs import JobQueue

    q, seen = JobQueue(), []
    ok = q.submit("k", "a", lambda p, c: 42, on_done=lambda job, result: seen.append((job.status, result)))
    broken = q.submit("k", "a", lambda p, c: 7, on_done=lambda job, result: 1 / 0)
    failed = q.submit("k", "a", lambda p, c: 1 / 0, on_done=lambda job, result: seen.append("failed"))
    q.wait_idle(timeout=10)
    assert seen == [("running", 42)]  # once, on success only, while the job still runs
    assert (ok.status, ok.result, broken.status, broken.result, failed.status) == ("done", 42, "done", 7, "failed")
    q.shutdown()
