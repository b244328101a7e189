"""Scales files (round trip, every validation error) and folded checkpoints (reload gives the same perplexity)."""

import json
import os

import pytest
import torch
from conftest import save_tiny, tiny_llama

from qroar import export
from qroar.bands import BandConfig
from qroar.errors import ScalesFileError
from qroar.export import apply_scales, export_checkpoint, load_scales, save_scales
from qroar.perplexity import EvalConfig, evaluate
from qroar.quant import QuantConfig
from qroar.rescale import ScaleConfig
from qroar.rope import PIConfig
from qroar.workbench import Workbench

RTN = QuantConfig(method="rtn", bits=3, group_size=32)
SCALES = [1.3, 0.8, 1.1, 0.9]


@pytest.fixture
def wb(tmp_path):
    w = Workbench.open(save_tiny(tmp_path / "m"), device="cpu", dtype="fp32")
    w.set_pi(PIConfig("linear", 2.0))
    w.set_quant(RTN)
    w.set_bands(BandConfig(n_bands=4))
    w.set_scales(SCALES, ScaleConfig("shared", "before"))
    return w


@pytest.fixture
def saved(wb, tmp_path):
    return save_scales(tmp_path / "scales.json", wb)


def test_scales_file_round_trip(wb, saved):
    d = json.loads(saved.read_text())
    assert d["schema_version"] == 2 and d["model"]["fingerprint"] == wb.info.fingerprint
    assert d["rope"]["rope_parameters"]["rope_type"] == "linear" and d["bands"]["edges"] == [0, 2, 4, 6, 8]
    for key in ("created_at", "qroar_version", "objective", "dev", "heldout", "quant", "mode", "order"):
        assert key in d
    sf = load_scales(saved, wb)
    assert sf.scales == tuple(SCALES) and sf.scale_cfg == ScaleConfig("shared", "before")
    assert sf.pi == PIConfig("linear", 2.0) and sf.quant == RTN and sf.edges == (0, 2, 4, 6, 8)


def test_apply_scales_on_a_fresh_workbench_gives_the_same_model(wb, saved, tmp_path):
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with wb.variant("quant_scaled"), torch.no_grad():
        ref = wb.model(ids).logits
    fresh = Workbench.open(wb.info.source, device="cpu", dtype="fp32")
    apply_scales(fresh, load_scales(saved, fresh))
    with fresh.variant("quant_scaled"), torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, ref)


def _rewrite(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.write_text("{\"schema_version\": 1, \"scales\": [1.0,, 2]}"), "not valid JSON"),
    (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "truncated"),
    (lambda p: p.write_text(""), "empty"),
    (lambda p: p.write_text("[1, 2]"), "JSON object"),
    (lambda p: _rewrite(p, scales=KeyError), "lacks key"),
    (lambda p: _rewrite(p, scales="1.0,2.0"), "'scales' should be list"),
    (lambda p: _rewrite(p, mode=3), "'mode' should be str"),
    (lambda p: _rewrite(p, scales=[1.0, 0.0, 1.0, 1.0]), "band 1"),
    (lambda p: _rewrite(p, scales=[1.0, 1.0, -1.0, 1.0]), "band 2"),
    (lambda p: p.write_text(p.read_text().replace("1.3", "NaN", 1)), "band 0"),
    (lambda p: p.write_text(p.read_text().replace("0.9", "Infinity", 1)), "band 3"),
    (lambda p: _rewrite(p, scales=[1.0, 1.0, 1.0]), "3 scales for 4 bands"),
    (lambda p: _rewrite(p, mode="sideways"), "invalid setting"),
    (lambda p: _rewrite(p, schema_version=3), "newer qroar.*upgrade"),
])
def test_bad_scales_files_raise_clear_errors(saved, edit, match):
    edit(saved)
    with pytest.raises(ScalesFileError, match=match):
        load_scales(saved)


def test_scales_file_for_another_model_names_both(saved, tmp_path):
    other = Workbench.open(save_tiny(tmp_path / "other", tiny_llama(initializer_range=0.05)), device="cpu", dtype="fp32")
    with pytest.raises(ScalesFileError, match=r"made for m \(fingerprint \w+\).*loaded model is other \(fingerprint \w+\)"):
        load_scales(saved, other)
    deeper = Workbench.open(save_tiny(tmp_path / "deep", tiny_llama(num_hidden_layers=3)), device="cpu", dtype="fp32")
    with pytest.raises(ScalesFileError, match="is for m \\(2 layers.*deep has 3 layers"):
        load_scales(saved, deeper)


def test_save_is_atomic(wb, saved, monkeypatch):
    before = saved.read_text()
    wb.set_scales([2.0, 2.0, 2.0, 2.0])

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_scales(saved, wb)
    assert saved.read_text() == before and sorted(p.name for p in saved.parent.iterdir() if p.suffix == ".tmp") == []


@pytest.mark.parametrize("quantized,variant", [(False, "fp_scaled"), (True, "quant_scaled")])
def test_exported_checkpoint_reloads_with_the_same_perplexity(wb, tmp_path, quantized, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_checkpoint(wb, tmp_path / "export", quantized=quantized)
    export_checkpoint(wb, out, quantized=quantized)  # an existing folder is replaced whole
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export")]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 2.0
    docs = [torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = EvalConfig(lengths=(32, 128), max_windows_per_doc=2)
    got = evaluate(model, docs, cfg, tokenizer=tok).table
    ref = wb.evaluate(docs, cfg, variant).table
    torch.testing.assert_close(torch.tensor(got.nll.tolist()), torch.tensor(ref.nll.tolist()), rtol=1e-6, atol=1e-5)
    unscaled = wb.evaluate(docs, cfg, "quant" if quantized else "fp").table
    assert (got.nll - unscaled.nll).abs().max() > 1e-4  # the scales really are folded in
    meta = json.loads((out / "qroar_scales.json").read_text())
    assert meta["scales"] == SCALES and meta["export"] == {"variant": variant, "quantized": quantized}


def test_quantized_export_needs_a_quantizer(wb, tmp_path):
    from qroar.errors import ConfigError

    wb.set_quant(None)
    with pytest.raises(ConfigError, match="quantizer"):
        export_checkpoint(wb, tmp_path / "x", quantized=True)
    assert not (tmp_path / "x").exists()
    assert export.SCHEMA_VERSION == 2
