"""The Recipe: settings described once, round trips (JSON, CLI arguments, scales files, the Report's
command), the registries that drive the CLI and the app, and Workbench.apply doing only what changed."""

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_cli import corpus, search_args  # noqa: F401  (fixture)

from qroar import quant
from qroar.bands import BandConfig
from qroar.cli import build_parser, main
from qroar.errors import ConfigError
from qroar.export import FORMATS, load_scales
from qroar.quant import QUANTIZERS, QuantConfig
from qroar.recipe import Recipe
from qroar.rescale import ScaleConfig
from qroar.rope import PIConfig
from qroar.search import OBJECTIVES, STRATEGIES, SearchConfig, search_args as sargs, search_config_from_args

BIN = Path(sys.executable).parent

RECIPES = [
    Recipe(),
    Recipe(quant=None),
    Recipe(pi=PIConfig("yarn", 8.0, None, (("beta_fast", 24.0), ("beta_slow", 1.5))), quant=QuantConfig("awq", 3, 64, True, "attention", n_samples=4, seq_len=512),
           calib="embedded:heldout", bands=BandConfig(6, "yarn"), scale=ScaleConfig("symmetric", "after"),
           scales=(1.0, 0.93, 1.1, 1.0, 1.0, 0.8125)),
    Recipe(pi=PIConfig("llama3", 4.0, 128, (("high_freq_factor", 4.0), ("low_freq_factor", 1.0))), quant=QuantConfig("rtn", 4, -2),
           edges=(0, 3, 9, 20, 32), bands=BandConfig(4), scales=(1.0 / 3, 1.0, 2.0, 0.7), windows=((0.5, 2.0), (0.9, 1.1), (1.0, 1.0), (0.7, 1.3))),
    Recipe(pi=PIConfig("linear", 2.5, 300), quant=QuantConfig("gptq", 2, 0, n_samples=8, seq_len=0)),
]


@pytest.mark.parametrize("r", RECIPES, ids=range(len(RECIPES)))
def test_recipe_round_trips_through_json_exactly(r):
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("r", RECIPES, ids=range(len(RECIPES)))
def test_recipe_round_trips_through_cli_arguments_exactly(r):
    args = build_parser().parse_args(["eval", *r.to_args()])
    assert Recipe.from_args(args) == r
    # the shell form too: what the Report prints is quoted text
    assert Recipe.from_args(build_parser().parse_args(["eval", *shlex.split(shlex.join(r.to_args()))])) == r


def test_recipe_edits_by_path_drop_what_no_longer_fits():
    r = Recipe(pi=PIConfig("yarn", 8.0), scales=(1.1,) * 8, windows=((0.9, 1.1),) * 8)
    assert r.set("quant.bits", 3).quant.bits == 3 and r.set("quant.bits", 3).scales == r.scales
    assert r.set("bands.n_bands", 6).scales is None  # another band count: the scales no longer fit
    assert r.set("bands.align", "yarn").scales == r.scales  # same count: kept
    assert r.set("pi.factor", 4.0).windows is None and r.set("pi.factor", 4.0).scales == r.scales
    assert r.set("pi.rope_type", "default").pi == PIConfig()
    assert r.set("pi.rope_type", "llama3").pi.extra == {"high_freq_factor": 4.0, "low_freq_factor": 1.0}
    assert r.get("pi.beta_fast") == 32.0 and r.set("pi.beta_fast", 16.0).get("pi.beta_fast") == 16.0
    with pytest.raises(ConfigError, match="band 2"):
        r.set("scales", (1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="bits"):
        r.set("quant.bits", 11)


def test_old_scales_file_loads_as_the_same_recipe(wb, tmp_path):
    from qroar.export import save_scales

    wb.apply(Recipe(pi=PIConfig("linear", 2.0), quant=QuantConfig("rtn", 3, 32), bands=BandConfig(4),
                    scales=(1.2, 0.9, 1.0, 1.05), scale=ScaleConfig("shared", "after")))
    new = json.loads(save_scales(tmp_path / "new.json", wb).read_text())
    assert new["schema_version"] == 3 and Recipe.from_dict(new["recipe"]) == wb.recipe and new["per_layer"] is False
    v2 = {k: v for k, v in new.items() if k != "per_layer"}  # what qroar wrote before per-layer scales
    v2["schema_version"] = 2
    old = {k: v for k, v in v2.items() if k != "recipe"}  # what qroar wrote before the Recipe existed
    old["schema_version"] = 1
    for name, payload in (("v2.json", v2), ("old.json", old)):
        (tmp_path / name).write_text(json.dumps(payload))
        r = load_scales(tmp_path / name, wb).recipe
        assert (r.pi, r.quant, r.edges, r.scales, r.scale) == (wb.recipe.pi, wb.recipe.quant, wb.bands.edges, wb.recipe.scales,
                                                               wb.recipe.scale)


def test_registries_drive_the_cli_choices(monkeypatch):
    def choices(cmd, flag):
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]
        return next(a.choices for a in sub._actions if flag in a.option_strings)

    assert list(choices("eval", "--quant")) == list(QUANTIZERS)
    assert list(choices("search", "--strategy")) == list(STRATEGIES)
    assert list(choices("search", "--objective")) == list(OBJECTIVES)
    assert list(choices("export", "--format")) == list(FORMATS)
    # adding a quantizer is one registry line: the CLI offers it and QuantConfig accepts it
    monkeypatch.setitem(QUANTIZERS, "halfgrid", quant.Quantizer(lambda w, cfg, stats=None: w.half().to(w.dtype)))
    assert "halfgrid" in choices("eval", "--quant") and QuantConfig("halfgrid").method == "halfgrid"
    monkeypatch.setitem(STRATEGIES, "first", STRATEGIES["grid"])
    assert "first" in choices("search", "--strategy") and SearchConfig(strategy="first").strategy == "first"


def test_search_config_round_trips_through_arguments():
    cfg = SearchConfig(n_candidates=9, sweeps=2, lengths=(256, 1024), length_weights=(1.0, 0.25), guard_tol=0.01,
                       dev_corpus="a", heldout_corpus="b", max_windows_per_doc=3, checkpoint="ck.json", k_folds=3,
                       nested=True, strategy="race", race_eta=2)
    p = build_parser()
    assert search_config_from_args(p.parse_args(["search", *sargs(cfg)]), 256) == cfg
    assert search_config_from_args(p.parse_args(["search", "--race", "--lengths", "8,16"]), 8).strategy == "race"
    assert SearchConfig.from_dict({"race": True, "mode": "shared", "order": "before"}).strategy == "race"  # old files


def test_apply_twice_quantizes_once_and_a_moved_scale_touches_one_band(wb, monkeypatch):
    calls = []
    real = quant.quantize_model
    monkeypatch.setattr(quant, "quantize_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = Recipe(pi=PIConfig("linear", 2.0), quant=QuantConfig("rtn", 3, 32), bands=BandConfig(4), scales=(1.0,) * 4)
    wb.apply(r)
    wb.apply(r)
    wb.apply(r.set("pi.factor", 4.0))  # RTN does not see the PI: no re-quantization
    assert len(calls) == 1
    rows = []
    real_rows = quant.requantize_rows
    monkeypatch.setattr(quant, "requantize_rows", lambda s, n, w, i: rows.append(n) or real_rows(s, n, w, i))
    wb.apply(wb.recipe.with_scales((1.0, 1.3, 1.0, 1.0)))
    assert len(rows) == 2 * 2  # q and k of 2 layers, band 1 only
    wb.apply(r.set("quant.method", "none"))
    assert wb.qstate is None and wb.available_variants() == ("fp", "fp_scaled")


def test_report_search_command_rebuilds_the_same_recipe_and_search(wb, tmp_path):
    from app.report import ReportSettings, search_command
    from qroar.search import search

    from test_search import make_corpus

    c = make_corpus(tmp_path / "c")
    wb.apply(Recipe(pi=PIConfig("linear", 2.0), quant=QuantConfig("rtn", 3, 32), bands=BandConfig(4), scales=(1.0,) * 4))
    cfg = SearchConfig(n_candidates=5, lengths=(32, 96), dev_corpus=c["dev"], heldout_corpus=c["held"],
                       max_windows_per_doc=1, strategy="race", nested=True)
    res = search(wb, cfg, [(0.8, 1.25)] * 4)
    s = ReportSettings({"name": "m"}, wb.recipe.to_dict(), c["held"], {"lengths": [32, 96]})
    cmd = search_command(s, res)
    argv = shlex.split(cmd.replace("\\\n", " "))[1:]
    a = build_parser().parse_args(argv)
    assert "--strategy race" in cmd and "--nested" in cmd
    assert Recipe.from_args(a) == replace(Recipe.from_dict(res.recipe), scales=None, windows=((0.8, 1.25),) * 4)
    assert search_config_from_args(a, 32) == cfg


def test_symmetric_search_under_rowwise_rtn_refuses_up_front(tiny_dir, corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "s.json"
    assert main(search_args(tiny_dir, corpus, "--mode", "symmetric", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "rounding" in err and "--allow-invariant" in err and not out.exists()
    # insisting runs it, shows what noise chose, and writes no scales file
    assert main(search_args(tiny_dir, corpus, "--mode", "symmetric", "--allow-invariant", "--out", str(out))) == 0
    text = capsys.readouterr().out
    assert "rounding noise" in text and "scales: b0=1, b1=1, b2=1, b3=1" in text and not out.exists()


@pytest.mark.slow
def test_installed_commands_write_diagnostics_and_figures(tiny_dir, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "diag"
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no repository on the path: the installed commands
    run = lambda *a: subprocess.run([*a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run(str(BIN / "qroar"), "diagnose", "--model", tiny_dir, "--corpus", corpus["dev"], "--n-docs", "1",
            "--capture-length", "96", "--bands", "4", "--group-size", "32", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run(str(BIN / "qroar-figures"), str(out))
    assert r.returncode == 0, r.stderr
    html = sorted(p.name for p in out.glob("*.html"))
    assert html and all((out / h).stat().st_size > 10_000 for h in html)


def test_engine_never_imports_the_app():
    import re

    for f in Path(__file__).resolve().parent.parent.joinpath("qroar").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", f.read_text(), re.M)
        assert not [m for m in imports if m.split(".")[0] in ("app", "streamlit", "plotly")], f.name


@pytest.fixture
def wb(tiny_dir):
    from qroar.workbench import Workbench

    return Workbench.open(tiny_dir)
