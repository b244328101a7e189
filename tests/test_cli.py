"""The command line end to end on a tiny model folder: eval, search -> apply -> export, errors, kill and resume."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import make_corpus

from qroar.cli import main

ROOT = Path(__file__).resolve().parent.parent
QUANT = ["--quant", "rtn", "--bits", "3", "--group-size", "32"]


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def search_args(model, corpus, *extra):
    return ["search", "--model", model, "--pi", "linear", "--factor", "2", *QUANT, "--bands", "4",
            "--dev-corpus", corpus["dev"], "--heldout-corpus", corpus["held"], "--lengths", "32,96",
            "--max-windows", "1", "--candidates", "5", "--windows", "0.7:1.3,0.8:1.25,0.85:1.2,0.9:1.1", "--quiet", *extra]


def test_eval_end_to_end(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "32,64", *QUANT,
               "--max-windows", "2", "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "penalty_%" in text and "quantized (rtn W3 g32" in text
    payload = json.loads(out.with_suffix(".json").read_text())
    assert {r["variant"] for r in payload["summary"]} == {"fp", "quant"} and {r["length"] for r in payload["summary"]} == {32, 64}
    assert out.with_suffix(".csv").read_text().startswith("doc,")


def test_user_errors_print_error_and_exit_2(tiny_dir, corpus, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: Model path")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"schema_version\": 7}")
    assert main(["apply", str(bad), "--model", tiny_dir, "--quiet"]) == 2
    assert "newer qroar" in capsys.readouterr().err
    assert main(search_args(tiny_dir, corpus, "--candidates", "3")) == 2
    assert "5 to 9 candidates" in capsys.readouterr().err


def test_search_apply_export(tiny_dir, corpus, tmp_path, capsys):
    scales = tmp_path / "scales.json"
    assert main(search_args(tiny_dir, corpus, "--out", str(scales), "--report", str(tmp_path / "rep"))) == 0
    text = capsys.readouterr().out
    assert "held-out perplexity" in text and f"wrote {scales}" in text
    d = json.loads(scales.read_text())
    assert len(d["scales"]) == 4 and d["heldout"] and d["objective"]["heldout"]["quant_scaled"] is not None
    assert json.loads((tmp_path / "rep.json").read_text())["command"] == "search"

    assert main(["apply", str(scales), "--corpus", corpus["held"], "--max-windows", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "scaled_vs_quant_%" in text and "linear x2" in text

    out = tmp_path / "folded"
    assert main(["export", str(scales), "--out", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["factor"] == 2.0


def test_symmetric_search_prints_the_invariance_note(tiny_dir, corpus, capsys):
    assert main(search_args(tiny_dir, corpus, "--mode", "symmetric", "--allow-invariant")) == 0
    text = capsys.readouterr().out
    assert "note:" in text and "rounding noise, not a gain" in text


def test_killed_search_resumes_to_the_same_result(tiny_dir, corpus, tmp_path, capsys):
    ck, killed_out = tmp_path / "ck.json", tmp_path / "resumed.json"
    args = search_args(tiny_dir, corpus, "--checkpoint", str(ck), "--out", str(killed_out))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "qroar.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ck.exists():
            seen = len(json.loads(ck.read_text())["evaluations"])  # atomic writes: always whole JSON
            if seen >= 3:
                break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9 and seen >= 3, "the search must be killed mid-way"
    assert not killed_out.exists()
    before = len(json.loads(ck.read_text())["evaluations"])

    assert main(args) == 0  # resumed in another process than the killed one
    assert f"({before} reused from the checkpoint)" in capsys.readouterr().out

    plain = tmp_path / "plain.json"
    assert main(search_args(tiny_dir, corpus, "--out", str(plain))) == 0
    a, b = json.loads(killed_out.read_text()), json.loads(plain.read_text())
    assert a["scales"] == b["scales"]
    for split in ("dev", "heldout"):
        for v in ("fp", "quant", "quant_scaled"):
            assert a["objective"][split][v] == pytest.approx(b["objective"][split][v], abs=1e-9)


def test_diagnose_writes_every_table_and_figures(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "diag"
    rc = main(["diagnose", "--model", tiny_dir, "--pi", "yarn", "--factor", "4", *QUANT, "--corpus", corpus["dev"],
               "--bands", "4", "--capture-length", "128", "--n-docs", "2", "--out", str(out), "--quiet"])
    from app.figures_cli import main as figures_main

    assert figures_main([str(out)]) == 0  # the charts come from the dashboard's own command
    text = capsys.readouterr().out
    assert rc == 0 and "TIR_W, median over layers" in text and "Interpolation Pressure" in text
    payload = json.loads((out / "diagnostics.json").read_text())
    assert set(payload["tables"]) >= {"pairs", "ip", "tir", "quant_error", "logit_noise", "logit_noise_pooled"}
    assert payload["settings"]["capture_length"] == 128 and payload["settings"]["pi"]["rope_type"] == "yarn"
    for name in ("tir", "ip", "quant_error", "logit_noise"):
        assert (out / f"{name}.csv").read_text().count("\n") > 1
    html = (out / "tir_W.html").read_text()
    assert "plotly" in html.lower() and "<script src=\"http" not in html  # self-contained


def test_diagnose_bad_settings_exit_2(tiny_dir, corpus, capsys):
    assert main(["diagnose", "--model", tiny_dir, "--corpus", corpus["dev"], "--bands", "40", "--quiet"]) == 2
    assert "4 to 16 bands" in capsys.readouterr().err
