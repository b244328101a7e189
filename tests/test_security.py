"""Security defaults: the dashboard listens on 127.0.0.1, nothing is unpickled or imported from a
model folder unless allowed, there is no upload widget, input paths are only read, and exports
write only inside the folder the user chose (names inside a scales file never become paths).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_llama
from test_bad_inputs import tree_hash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qroar import data, models  # noqa: E402
from qroar.bands import BandConfig  # noqa: E402
from qroar.errors import ModelError  # noqa: E402
from qroar.export import apply_scales, export_checkpoint, load_scales, save_scales  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.quant import QuantConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_dashboard_listens_on_loopback_only_and_sends_no_telemetry():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["server"].get("enableXsrfProtection", True) and cfg["server"].get("enableCORS", True)
    assert 0 < cfg["server"]["maxUploadSize"] <= 200  # MB, should an upload widget ever be added
    assert cfg["client"]["showErrorDetails"] == "none"  # tracebacks stay in the server log
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^HOST\s*\?=\s*127\.0\.0\.1$", make, re.M)
    assert "--server.address $(HOST)" in make


def test_every_upload_widget_is_size_limited_and_json_only_and_unsafe_loading_is_off_by_default():
    from app import state
    from app.engine import ModelKey

    sources = [p for d in ("app", "pages") for p in (ROOT / d).glob("*.py")]
    calls = [m.group(0) for p in sources for m in re.finditer(r"st\.file_uploader\((?:[^()]|\([^()]*\))*\)", p.read_text())]
    for call in calls:  # the one upload is the scales file on the Export page
        assert "max_upload_size=" in call and 'type=["json"]' in call, call
    assert state.DEFAULTS["model.allow_pickle"] is False and state.DEFAULTS["model.trust_remote_code"] is False
    assert ModelKey("m").allow_pickle is False and ModelKey("m").trust_remote_code is False


def test_an_uploaded_scales_file_is_size_limited_parsed_as_json_and_never_executed(wb, tmp_path):
    from app.engine import MAX_SCALES_FILE_BYTES, Backend, ModelCache, ModelKey, import_scales
    from qroar.errors import ScalesFileError

    key = ModelKey("m", "cpu", "fp32")
    backend = Backend(models=ModelCache(opener=lambda k: wb))
    backend.models.get(key)
    good = save_scales(tmp_path / "s.json", wb).read_bytes()
    assert import_scales(backend, key, good, "mine.json").scales == tuple(float(g) for g in wb.scales)
    with pytest.raises(ScalesFileError, match=r"big\.json is [\d,]+ bytes; a scales file is a few kB"):
        import_scales(backend, key, b" " * (MAX_SCALES_FILE_BYTES + 1), "big.json")
    marker = tmp_path / "code-ran"
    import pickle

    for name, payload in (("evil.json", pickle.dumps(Payload(marker))), ("evil2.json", b'{"__class__": "os.system"}')):
        with pytest.raises(ScalesFileError, match=re.escape(name)):
            import_scales(backend, key, payload, name)
    assert not marker.exists()


def test_an_export_never_replaces_a_folder_of_other_files(wb, tmp_path):
    from app.engine import check_export_folder
    from qroar.errors import ConfigError

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not an earlier qroar export"):
        export_checkpoint(wb, home)
    with pytest.raises(ConfigError, match="not a qroar export"):
        check_export_folder(str(home))
    assert (home / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in tmp_path.iterdir()) == ["home", "model"]
    out = export_checkpoint(wb, tmp_path / "export")
    assert export_checkpoint(wb, out, overwrite=True) == out  # an earlier export is replaced only when asked


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_weights_are_never_unpickled_by_default_and_code_in_them_never_runs(tmp_path):
    folder = Path(save_tiny(tmp_path / "m"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights"):
        models.load_model(str(folder))
    assert not marker.exists()
    with pytest.raises(ModelError, match="hold objects other than tensors.*not loaded"):  # allowed: tensors only
        models.load_model(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_remote_code_in_a_model_folder_is_never_imported_unless_allowed(tmp_path):
    folder = Path(save_tiny(tmp_path / "m"))
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.Config", "AutoModelForCausalLM": "modeling_evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code"):
        models.load_model(str(folder))
    assert not marker.exists()


@pytest.fixture
def wb(tmp_path):
    w = Workbench.open(save_tiny(tmp_path / "model", tiny_llama()), device="cpu", dtype="fp32")
    w.set_pi(PIConfig("linear", 2.0))
    w.set_quant(QuantConfig(method="rtn", bits=3, group_size=32))
    w.set_bands(BandConfig(n_bands=4))
    w.set_scales([1.2, 0.9, 1.1, 0.95])
    return w


def test_model_and_corpus_paths_are_only_read(wb, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("It is a truth universally acknowledged. " * 20)
    (corpus / "b.md").write_text("However little known the feelings. " * 20)
    before = tree_hash(tmp_path / "model", corpus)
    stamps = {p: p.stat().st_mtime_ns for p in [*corpus.rglob("*"), *(tmp_path / "model").rglob("*")]}
    models.load_model(str(tmp_path / "model"))
    assert len(data.load_corpus(str(corpus))) == 2
    wb.perplexity(str(corpus), EvalConfig(lengths=(32,), max_windows_per_doc=1))
    assert tree_hash(tmp_path / "model", corpus) == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_exports_write_only_inside_the_chosen_folder_whatever_a_scales_file_says(wb, tmp_path):
    path = save_scales(tmp_path / "scales.json", wb)
    d = json.loads(path.read_text())
    d["model"].update(name="../../escaped", source="../../../tmp/escaped")  # names only: never used as paths
    d["bands"]["name"] = "../x"
    path.write_text(json.dumps(d))
    sf = load_scales(path, wb)
    fresh = Workbench.open(str(tmp_path / "model"), device="cpu", dtype="fp32")
    apply_scales(fresh, sf)
    others = tree_hash(tmp_path)
    out = export_checkpoint(fresh, tmp_path / "exports" / "mine", meta=sf.raw)
    assert out == tmp_path / "exports" / "mine"
    after = tree_hash(tmp_path)
    new = {k for k in after if k not in others}
    assert all(k.startswith(f"{tmp_path.name}/exports/mine/") for k in new), new
    assert {k: v for k, v in after.items() if k in others} == others  # nothing else touched
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["mine"]  # no temporary folder left
    assert not (tmp_path.parent / "escaped").exists() and not Path("/tmp/escaped").exists()
    meta = json.loads((out / "qroar_scales.json").read_text())
    assert meta["model"]["name"] == "../../escaped"  # kept as text
