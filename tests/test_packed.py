"""Packed exports (compressed-tensors, GGUF): the format's own quantizer, the round trip through stock loaders in a
separate process (weights bit for bit, same perplexity, PI present after reload), and the inputs they refuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qroar import packed
from qroar.errors import ConfigError
from qroar.export import export, save_scales
from qroar.perplexity import EvalConfig
from qroar.quant import QUANTIZERS, QuantConfig
from qroar.recipe import Recipe
from qroar.rescale import ScaleConfig
from qroar.rope import PIConfig, rope_parameters
from qroar.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
STOCK = ROOT / "qroar" / "stock_reload.py"
LENGTH = 512  # twice qroar-tiny's trained context: the YaRN scaling is in play
SCALES = (1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0, 1.1)
PPL_RTOL = 1e-5  # same weights, another forward (transformers' own loss vs qroar's chunked one): float32 summation order


@pytest.fixture(scope="module")
def wb():
    return Workbench.open("qroar-tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def window(wb, tmp_path_factory):
    ids = wb.corpus("embedded:dev").tokens[0][:LENGTH].tolist()
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(ids))
    return ids, path


def recipe(method, bits=None, group=None, order="before"):
    r = Recipe(pi=PIConfig("yarn", 4.0), scale=ScaleConfig("shared", order)).set("quant.method", method)
    if bits is not None:
        r = r.set("quant.bits", bits)
    if group is not None:
        r = r.set("quant.group_size", group)
    return r.with_scales(SCALES)


def stock(path, ids_path, weights=None):
    args = [sys.executable, str(STOCK), str(path), "--tokens", str(ids_path)] + (["--weights", str(weights)] if weights else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt,method,bits", [("compressed-tensors", "ct", 4), ("compressed-tensors", "ct", 8),
                                             ("gguf", "gguf-q8_0", None), ("gguf", "gguf-q4_0", None)])
def test_export_reloads_in_stock_loaders_with_the_same_weights_ppl_and_pi(wb, window, tmp_path, fmt, method, bits):
    ids, ids_path = window
    wb.apply(recipe(method, bits, 32))
    out = export(wb, fmt, tmp_path / "out")
    qroar_ppl = float(wb.evaluate([torch.tensor(ids)], EvalConfig(lengths=(LENGTH,), max_windows_per_doc=1, add_bos=False),
                                  "quant_scaled").table["ppl"].iloc[0])
    got = stock(out, ids_path, tmp_path / "w.pt")
    # weights: the stock loader's dequantized linears equal the quantizer's in-memory weights bit for bit
    loaded = torch.load(tmp_path / "w.pt")
    with wb.variant("quant_scaled") as model:
        for name in wb.qstate.originals:
            assert torch.equal(loaded[name], model.get_submodule(name).weight), name
    assert got["ppl"] == pytest.approx(qroar_ppl, rel=PPL_RTOL)
    rp, mine = got["rope_parameters"], rope_parameters(wb.model.config)
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"]) == ("yarn", 4.0, 256)
    assert rp["rope_type"] == mine["rope_type"] and rp["factor"] == mine["factor"]
    record = json.loads((out / "qroar_scales.json").read_text())
    assert record["export"]["format"] == fmt and record["scales"] == list(SCALES)


def test_gguf_loader_alone_drops_the_rope_scaling_that_the_file_holds(wb, window, tmp_path):
    """Why stock_reload re-applies it: transformers' GGUF config mapping has no rope.scaling.* key."""
    from transformers import AutoConfig

    from qroar.stock_reload import read_gguf_rope

    wb.apply(recipe("gguf-q8_0"))
    out = export(wb, "gguf", tmp_path / "g")
    keys = read_gguf_rope(out / packed.GGUF_FILE)
    assert keys["rope.scaling.type"] == "yarn" and keys["rope.scaling.factor"] == 4.0
    assert keys["rope.scaling.original_context_length"] == 256 and keys["rope.scaling.yarn_beta_fast"] == 32.0
    plain = AutoConfig.from_pretrained(str(out), gguf_file=packed.GGUF_FILE)
    assert plain.rope_parameters.get("rope_type", "default") == "default"  # if this fails, transformers learned the keys


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (4, 0), (8, 0)])
def test_ct_quantizer_is_compressed_tensors_own_rule(bits, group):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    w[0, :32] = 0  # an all-zero group
    cfg = QuantConfig(method="ct", bits=bits, group_size=group, symmetric=True)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group" if group else "channel",
                            group_size=group or None)
    x = w.reshape(16, -1, group or 64)
    scale, zp = calculate_qparams(x.amin(-1), x.amax(-1), args)
    ref = fake_quantize(w, scale if group else scale[:, :1], zp if group else zp[:, :1], args)
    assert torch.equal(QUANTIZERS["ct"](w, cfg), ref)


@pytest.mark.parametrize("method", ["gguf-q4_0", "gguf-q8_0", "gguf-q4_1", "gguf-q5_0"])
def test_gguf_quantizer_output_requantizes_to_the_same_bytes(method):
    """The export quantizes the in-memory weights again: the blocks' largest weight pins the scale, so it holds."""
    from gguf import GGMLQuantizationType, quants

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    t = GGMLQuantizationType[method.split("-")[1].upper()]
    cfg = QuantConfig(method=method, **dict(QUANTIZERS[method].fixed))
    once = QUANTIZERS[method](w, cfg)
    assert (quants.quantize(once.numpy(), t) == quants.quantize(w.numpy(), t)).all()
    assert torch.equal(torch.from_numpy(quants.dequantize(quants.quantize(once.numpy(), t), t)), once)


# ----------------------------------------------------------------------------- bad inputs: clear message, nothing written


def test_gguf_q4_0_refuses_groups_of_64():
    with pytest.raises(ConfigError, match="--group-size 32"):
        QuantConfig(method="gguf-q4_0", bits=4, group_size=64, symmetric=True)


def test_three_bits_have_no_type_in_compressed_tensors(wb, tmp_path):
    with pytest.raises(ConfigError, match="no 3-bit type"):
        QuantConfig(method="ct", bits=3, group_size=32, symmetric=True)
    wb.apply(Recipe(pi=PIConfig("yarn", 4.0), quant=QuantConfig(method="rtn", bits=3, group_size=32, symmetric=True)))
    with pytest.raises(ConfigError, match="no 3-bit type"):
        export(wb, "compressed-tensors", tmp_path / "ct3")
    assert not (tmp_path / "ct3").exists() and not list(tmp_path.glob(".ct3*"))


def test_a_quantizer_that_is_not_the_formats_own_is_refused(wb, tmp_path):
    wb.apply(Recipe(quant=QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True)))
    with pytest.raises(ConfigError, match="gguf-q4_0"):
        export(wb, "gguf", tmp_path / "g")
    wb.apply(recipe("ct", 4, 32, order="after"))
    with pytest.raises(ConfigError, match="order 'before'"):
        export(wb, "compressed-tensors", tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_gguf_writer_refuses_an_architecture_it_does_not_know(tmp_path):
    from conftest import save_tiny, tiny_qwen2

    other = Workbench.open(save_tiny(tmp_path / "qwen", tiny_qwen2()), device="cpu", dtype="fp32")
    other.apply(Recipe(quant=QuantConfig(method="gguf-q8_0", bits=8, group_size=32, symmetric=True)))
    with pytest.raises(ConfigError, match="architecture"):
        export(other, "gguf", tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_existing_export_is_not_replaced_without_overwrite(wb, tmp_path):
    wb.apply(recipe("gguf-q8_0"))
    out = export(wb, "gguf", tmp_path / "g")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match="overwrite"):
        export(wb, "gguf", out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_installed_qroar_export_writes_both_formats(wb, window, tmp_path):
    """The installed `qroar` command, in a subprocess: a scales file made with each format's quantizer -> the file."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    for fmt, method in (("compressed-tensors", "ct"), ("gguf", "gguf-q4_0")):
        wb.apply(recipe(method, 4, 32))
        scales = save_scales(tmp_path / f"{method}.json", wb)
        out = tmp_path / fmt
        r = subprocess.run([str(bindir / "qroar"), "export", str(scales), "--format", fmt, "--out", str(out), "--quiet"],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "wrote" in r.stdout
        assert (out / ("model.gguf" if fmt == "gguf" else "model.safetensors")).is_file()
        # bad input through the same command: an rtn scales file into GGUF, refused before the model loads
    wb.apply(Recipe(quant=QuantConfig(method="rtn", bits=4, group_size=32, symmetric=True)).with_scales([1.0] * 8))
    bad = save_scales(tmp_path / "rtn.json", wb)
    r = subprocess.run([str(bindir / "qroar"), "export", str(bad), "--format", "gguf", "--out", str(tmp_path / "bad")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "gguf-q4_0" in r.stderr and not (tmp_path / "bad").exists()
