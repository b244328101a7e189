"""Scales files (round trip, every validation error) and folded checkpoints (reload gives the same perplexity)."""

import json
import os

import pytest
import torch
from conftest import save_tiny, tiny_llama, tiny_workbench

from qroar import export
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
    w = tiny_workbench(tmp_path / "m", RTN)
    w.set_scales(SCALES, ScaleConfig("shared", "before"))
    return w


@pytest.fixture
def saved(wb, tmp_path):
    return save_scales(tmp_path / "scales.json", wb)


def test_scales_file_round_trip(wb, saved):
    d = json.loads(saved.read_text())
    assert d["schema_version"] == 3 and d["model"]["fingerprint"] == wb.info.fingerprint
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
    (lambda p: _rewrite(p, schema_version=4), "newer qroar.*upgrade"),
    (lambda p: _rewrite(p, scales=[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), "3/4 scales per layer for 4 bands"),
    (lambda p: _rewrite(p, scales=[[1.0] * 4] * 3), "per-layer scales for 3 layers but its model has 2"),
    (lambda p: _rewrite(p, scales=[[1.0] * 4, [1.0, 0.0, 1.0, 1.0]]), "layer 1, band 1"),
    (lambda p: _rewrite(p, scales=[[1.0] * 4] * 2, schema_version=2), "per-layer scales under schema version 2"),
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
    export_checkpoint(wb, out, quantized=quantized, overwrite=True)  # an earlier export is replaced when asked
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
    files = sorted(p.name for p in out.iterdir())
    fmt = "fake-quant" if quantized else "hf"
    assert meta["scales"] == SCALES and meta["export"] == {"format": fmt, "variant": variant, "quantized": quantized, "files": files}


def test_quantized_export_needs_a_quantizer(wb, tmp_path):
    from qroar.errors import ConfigError

    wb.set_quant(None)
    with pytest.raises(ConfigError, match="quantizer"):
        export_checkpoint(wb, tmp_path / "x", quantized=True)
    assert not (tmp_path / "x").exists()
    assert export.SCHEMA_VERSION == 3


# ----------------------------------------------------------------------------- replacing an earlier export


def snapshot(folder):
    """Every entry under `folder` with its content (files) or link target, to compare before and after."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def test_an_earlier_export_is_not_replaced_without_overwrite(wb, saved, tmp_path, capsys):
    from qroar.cli import main
    from qroar.errors import ConfigError

    out = export_checkpoint(wb, tmp_path / "export")
    (out / "notes.txt").write_text("mine")
    before, beside = snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    wb.set_scales([1.5, 1.5, 1.5, 1.5])
    with pytest.raises(ConfigError, match="earlier qroar export.*--overwrite"):
        export_checkpoint(wb, out)
    assert main(["export", str(saved), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == beside

    assert main(["export", str(saved), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "qroar_scales.json").read_text())["scales"] == SCALES


def test_overwrite_keeps_the_users_own_files_and_drops_the_old_exports(wb, tmp_path):
    out = export_checkpoint(wb, tmp_path / "export")
    (out / "notes.txt").write_text("mine")
    (out / "gguf").mkdir()
    (out / "gguf" / "model-q4.gguf").write_bytes(b"GGUF" * 100)
    (out / "latest").symlink_to("gguf/model-q4.gguf")
    record = json.loads((out / "qroar_scales.json").read_text())
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")  # as if the old export had been sharded
    record["export"]["files"].append("model-00001-of-00002.safetensors")
    (out / "qroar_scales.json").write_text(json.dumps(record))
    wb.set_scales([1.5, 1.5, 1.5, 1.5])

    export_checkpoint(wb, out, overwrite=True)
    meta = json.loads((out / "qroar_scales.json").read_text())
    assert meta["scales"] == [1.5] * 4
    assert (out / "notes.txt").read_text() == "mine" and (out / "gguf" / "model-q4.gguf").read_bytes() == b"GGUF" * 100
    assert os.readlink(out / "latest") == "gguf/model-q4.gguf"
    assert not (out / "model-00001-of-00002.safetensors").exists()  # the old export's file, not the user's
    assert sorted(p.name for p in out.iterdir()) == sorted(meta["export"]["files"] + ["gguf", "latest", "notes.txt"])
    assert "notes.txt" not in meta["export"]["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "m"]


def test_overwrite_refuses_when_a_users_file_has_a_name_the_export_writes(wb, tmp_path):
    from qroar.errors import ConfigError

    out = export_checkpoint(wb, tmp_path / "export")
    record = json.loads((out / "qroar_scales.json").read_text())
    record["export"]["files"].remove("tokenizer.json")  # so tokenizer.json reads as the user's own
    (out / "qroar_scales.json").write_text(json.dumps(record))
    before = snapshot(out)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        export_checkpoint(wb, out, overwrite=True)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export", "m"]


def test_an_export_that_did_not_record_its_files_is_not_overwritten(wb, tmp_path):
    from qroar.errors import ConfigError

    out = export_checkpoint(wb, tmp_path / "export")
    record = json.loads((out / "qroar_scales.json").read_text())
    del record["export"]["files"]  # as an older qroar wrote it
    (out / "qroar_scales.json").write_text(json.dumps(record))
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="did not record"):
        export_checkpoint(wb, out, overwrite=True)
    assert snapshot(out) == before


def test_temporaries_of_killed_exports_are_removed_and_a_running_ones_respected(wb, tmp_path):
    import fcntl

    from qroar.errors import ConfigError

    out = export_checkpoint(wb, tmp_path / "export")
    for name in (".export.tmp-k1ll3d", ".export.old"):  # what a kill mid-export leaves beside the target
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.tmp-x").mkdir()  # another target's: not ours to remove
    running = tmp_path / ".export.tmp-running"
    running.mkdir()
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running export holds it
        with pytest.raises(ConfigError, match="Another export"):
            export_checkpoint(wb, out, overwrite=True)
        assert (tmp_path / ".export.tmp-k1ll3d").exists() and (tmp_path / ".export.old").exists()
    finally:
        os.close(fd)
    export_checkpoint(wb, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "export", "m"]


def test_an_old_export_parked_by_a_killed_swap_is_put_back_not_replaced(wb, tmp_path):
    from qroar.errors import ConfigError

    out = export_checkpoint(wb, tmp_path / "export")
    (out / "notes.txt").write_text("mine")
    os.replace(out, tmp_path / ".export.old")  # killed between the swap's two renames
    with pytest.raises(ConfigError, match="earlier qroar export"):
        export_checkpoint(wb, out)
    export_checkpoint(wb, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["export", "m"]


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_every_format_replaces_an_earlier_export_only_with_overwrite(wb, tmp_path, fmt):
    from qroar.errors import ConfigError

    own = {"compressed-tensors": QuantConfig(method="ct", bits=4, group_size=32, symmetric=True),
           "gguf": QuantConfig(method="gguf-q8_0", bits=8, group_size=32, symmetric=True)}
    if fmt in own:  # a packed format stores only its own quantizer's grid
        wb.set_quant(own[fmt])
    out = export.export(wb, fmt, tmp_path / "out")
    before = snapshot(out) if out.is_dir() else out.read_bytes()
    wb.set_scales([1.5, 1.5, 1.5, 1.5])
    with pytest.raises(ConfigError, match="overwrite"):
        export.export(wb, fmt, out)
    assert (snapshot(out) if out.is_dir() else out.read_bytes()) == before
    assert export.export(wb, fmt, out, overwrite=True) == out
    record = json.loads((out / "qroar_scales.json" if out.is_dir() else out).read_text())
    assert record["scales"] == [1.5] * 4 and sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    if out.is_dir():
        assert record["export"]["format"] == fmt and sorted(record["export"]["files"]) == sorted(p.name for p in out.iterdir())


def test_a_new_format_gets_the_record_and_the_overwrite_rule_from_the_registry(wb, tmp_path, monkeypatch):
    from qroar.errors import ConfigError

    def write_notes(wb, folder, result=None, meta=None):
        (folder / "scales.txt").write_text(" ".join(f"{float(g):.3f}" for g in wb.scales))
        return {"scales": [float(g) for g in wb.scales]}

    monkeypatch.setitem(export.FORMATS, "notes", export.ExportFormat(write_notes, "scales as text"))
    out = export.export(wb, "notes", tmp_path / "notes")
    (out / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match="earlier qroar export"):
        export.export(wb, "notes", out)
    export.export(wb, "notes", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "qroar_scales.json", "scales.txt"]
    assert json.loads((out / "qroar_scales.json").read_text())["export"]["files"] == ["qroar_scales.json", "scales.txt"]


def test_export_scales_format_from_the_cli_refuses_an_existing_file_without_overwrite(saved, tmp_path, capsys):
    from qroar.cli import main

    out = tmp_path / "copy.json"
    out.write_text("mine")
    assert main(["export", str(saved), "--format", "scales", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export", str(saved), "--format", "scales", "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(saved), "--format", "scales", "--out", str(out), "--quiet", "--overwrite"]) == 2
    assert "not a file qroar wrote" in capsys.readouterr().err and out.read_text() == "mine"  # never the user's file
    out.write_text(saved.read_text())  # a scales file: --overwrite may replace it
    assert main(["export", str(saved), "--format", "scales", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads(out.read_text())["scales"] == SCALES


# ----------------------------------------------------------------------------- file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_follow_the_umask(wb, tmp_path, umask_022):
    mode = lambda p: oct(p.stat().st_mode & 0o777)  # noqa: E731
    scales = save_scales(tmp_path / "scales.json", wb)
    out = export_checkpoint(wb, tmp_path / "export")
    assert mode(scales) == oct(0o644) and mode(out) == oct(0o755)
    assert {mode(p) for p in out.iterdir()} == {oct(0o644)}
    os.umask(0o027)
    assert mode(save_scales(tmp_path / "other.json", wb)) == oct(0o640)
    scales.chmod(0o600)  # a file the user made private stays private when rewritten
    assert mode(save_scales(scales, wb)) == oct(0o600)
