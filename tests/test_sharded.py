"""Models placed with accelerate's device_map: placement summary, refusals, and results equal to the plain model.

One CPU is one device, so on CPU the map puts every module on "cpu" and accelerate's AlignDevicesHook is
attached to every module (force_hooks): the hooks run on every forward, calibration pass, capture and
weight edit, and every result must equal the plain model's exactly. The CUDA test splits the model
over cuda:0 and the CPU for real (run where a GPU is visible).
"""

import random

import pandas as pd
import pytest
import torch
from conftest import TEXT, save_tiny

from qroar import models
from qroar.bands import BandConfig
from qroar.diagnostics import DiagConfig, run_diagnostics
from qroar.errors import ModelError
from qroar.perplexity import EvalConfig
from qroar.quant import QuantConfig
from qroar.rope import PIConfig
from qroar.search import SearchConfig, search
from qroar.workbench import Workbench

RTN = QuantConfig(method="rtn", bits=3, group_size=32)
SCALES = [1.15, 0.9, 1.0, 1.2]
WINDOWS = [(0.8, 1.25), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]  # one band searched: a short run


def layer_map(n_layers: int, on_first, first: int, rest) -> dict:
    """embed + layers [0, first) + head on `on_first`, the other layers and the final norm on `rest`."""
    return {"model.embed_tokens": on_first, **{f"model.layers.{i}": on_first if i < first else rest for i in range(n_layers)},
            "model.norm": rest, "model.rotary_emb": on_first, "lm_head": on_first}


CPU_MAP = layer_map(2, "cpu", 1, "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls, one thread each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    vocab = TEXT.split()
    corpus = {}
    for split, n in (("dev", 3), ("held", 2)):
        (root / split).mkdir()
        for i in range(n):
            rng = random.Random(f"{split}{i}")
            (root / split / f"{split}{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(200)))
        corpus[split] = str(root / split)
    return save_tiny(root / "model"), corpus


def hooked(path, device_map=CPU_MAP) -> Workbench:
    """A workbench whose model carries accelerate's AlignDevicesHook on every module."""
    from accelerate import dispatch_model

    loaded = models.load_model(path, device_map=device_map, dtype="fp32")
    dispatch_model(loaded.model, device_map, main_device="cpu", force_hooks=True)
    return Workbench(loaded)


def prepared(wb: Workbench, quant=RTN) -> Workbench:
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(quant, calib_corpus=None)
    wb.set_bands(BandConfig(n_bands=4))
    return wb


def has_align_hooks(model) -> bool:
    from accelerate.hooks import AlignDevicesHook

    layers = models.decoder_layers(model)
    return all(isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and "forward" in m.__dict__
               for m in [*layers, models.attention_layers(model)[0].q_lin])


# ----------------------------------------------------------------------------- loading and placement


def test_dict_map_loads_resident_and_reports_placement(tiny):
    plain = models.load_model(tiny[0], device="cpu", dtype="fp32")
    mapped = models.load_model(tiny[0], device_map=CPU_MAP, dtype="fp32")
    assert mapped.info.fingerprint == plain.info.fingerprint
    assert list(mapped.info.devices) == ["cpu"]
    cpu = mapped.info.devices["cpu"]
    assert cpu["modules"][:2] == ["model.embed_tokens", "model.layers.0-1"]
    assert {"model.norm", "lm_head", "model.rotary_emb"} <= set(cpu["modules"])
    weights = sum(t.numel() * t.element_size() for t in [*plain.model.parameters(), *plain.model.buffers()])
    assert cpu["bytes"] == weights
    assert plain.info.devices == mapped.info.devices


def test_placement_names_each_device_and_layer_ranges(llama):
    llama.model.layers[1].to("meta")  # a second "device" for the summary (and an offloaded-looking layer)
    p = models.placement(llama)
    assert p["cpu"]["modules"][:2] == ["model.embed_tokens", "model.layers.0"]
    assert p["meta"]["modules"] == ["model.layers.1"]
    per_layer = sum(t.numel() * 4 for t in llama.model.layers[1].parameters())
    assert p["meta"]["bytes"] == per_layer
    assert all(n.startswith("model.layers.1.") for n in models.offloaded(llama))
    with pytest.raises(ModelError, match="resident"):
        models._finish(llama, "auto", "tiny")


def test_ranges_compress_consecutive_layers():
    assert models._ranges("m.layers", [0, 1, 2, 5, 7, 8]) == ["m.layers.0-2", "m.layers.5", "m.layers.7-8"]
    assert models._ranges("m.layers", []) == []


def test_disk_in_device_map_is_refused_before_loading(tiny):
    with pytest.raises(ModelError, match="disk"):
        models.load_model(tiny[0], device_map={**CPU_MAP, "model.layers.1": "disk"})


def test_bad_device_map_values_are_refused(tiny):
    with pytest.raises(ModelError, match="device_map"):
        models.load_model(tiny[0], device_map=["cpu"])
    with pytest.raises(ModelError, match="not a device"):
        models.load_model(tiny[0], device_map={**CPU_MAP, "lm_head": "gpu-please"})
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no GPU"):
            models.load_model(tiny[0], device_map={**CPU_MAP, "lm_head": 0})


def test_auto_map_that_offloads_weights_is_refused(tiny):
    # 20 kB of CPU memory: accelerate offloads every weight, which in-place q/k edits cannot work on
    with pytest.raises(ModelError, match="offloaded .* resident"):
        models.load_model(tiny[0], device_map="auto", max_memory={"cpu": 20000}, dtype="fp32")


# ----------------------------------------------------------------------------- same results with the hooks on


def test_perplexity_with_device_hooks_equals_plain(tiny):
    path, corpus = tiny
    plain, wb = prepared(Workbench.open(path, device="cpu", dtype="fp32")), prepared(hooked(path))
    assert has_align_hooks(wb.model)
    for w in (plain, wb):
        w.set_scales(SCALES)
    cfg = EvalConfig(lengths=(32, 96), max_windows_per_doc=1)
    variants = ("fp", "quant", "fp_scaled", "quant_scaled")
    a, b = plain.perplexity(corpus["held"], cfg, variants), wb.perplexity(corpus["held"], cfg, variants)
    assert set(b["variant"]) == set(variants)
    pd.testing.assert_frame_equal(a, b)
    assert has_align_hooks(wb.model)
    for name, w in plain.qstate.originals.items():  # the rescaled, quantized weights themselves
        torch.testing.assert_close(wb.model.get_submodule(name).weight, plain.model.get_submodule(name).weight,
                                   rtol=0, atol=0)


def test_diagnostics_with_device_hooks_equal_plain(tiny):
    path, corpus = tiny
    plain, wb = prepared(Workbench.open(path, device="cpu", dtype="fp32")), prepared(hooked(path))
    cfg = DiagConfig(bands=BandConfig(n_bands=4), capture_length=128, n_docs=2, noise_pairs=16, noise_layers=(0, 1))
    a, b = run_diagnostics(plain, corpus["dev"], cfg), run_diagnostics(wb, corpus["dev"], cfg)
    assert set(a.tables) == set(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], obj=name)
    assert len(b.tables["tir"]) > 0 and b.tables["logit_noise"]["rms_err"].gt(0).any()


def test_search_with_device_hooks_equals_plain(tiny):
    path, corpus = tiny
    cfg = SearchConfig(n_candidates=5, lengths=(32, 64), dev_corpus=corpus["dev"], heldout_corpus=corpus["held"],
                       max_windows_per_doc=1)
    res = [search(prepared(w), cfg, WINDOWS) for w in (Workbench.open(path, device="cpu", dtype="fp32"), hooked(path))]
    assert res[0].scales == res[1].scales
    pd.testing.assert_frame_equal(res[0].history, res[1].history)
    pd.testing.assert_frame_equal(res[0].heldout, res[1].heldout)


def test_gptq_calibration_keeps_the_device_hooks(tiny):
    path, corpus = tiny
    gptq = QuantConfig(method="gptq", bits=4, group_size=32, n_samples=2, seq_len=32)
    plain, wb = Workbench.open(path, device="cpu", dtype="fp32"), hooked(path)
    for w in (plain, wb):
        w.set_quant(gptq, calib_corpus=corpus["dev"])
    assert has_align_hooks(wb.model)  # the layer-by-layer pass swaps forwards; accelerate's must come back
    for name in plain.qstate.originals:
        torch.testing.assert_close(wb.model.get_submodule(name).weight, plain.model.get_submodule(name).weight,
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------- a real split: GPU + CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: splits the model over cuda:0 and the CPU")
def test_gpu_plus_cpu_split_equals_cpu_model(tiny):
    path, corpus = tiny
    split = layer_map(2, 0, 1, "cpu")
    plain = prepared(Workbench.open(path, device="cpu", dtype="fp32"))
    wb = prepared(Workbench.open(path, dtype="fp32", device_map=split))
    assert set(wb.info.devices) == {"cuda:0", "cpu"} and "model.layers.1" in wb.info.devices["cpu"]["modules"]
    assert wb.model.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"  # resident, not offloaded
    for w in (plain, wb):
        w.set_scales(SCALES)
    cfg = EvalConfig(lengths=(32, 96), max_windows_per_doc=2, batch_size=1)
    variants = ("fp", "quant", "fp_scaled", "quant_scaled")
    a, b = plain.perplexity(corpus["held"], cfg, variants), wb.perplexity(corpus["held"], cfg, variants)
    pd.testing.assert_frame_equal(a, b, rtol=1e-4)
    dcfg = DiagConfig(bands=BandConfig(n_bands=4), capture_length=128, n_docs=2, noise_pairs=16, noise_layers=(0, 1))
    da, db = run_diagnostics(plain, corpus["dev"], dcfg), run_diagnostics(wb, corpus["dev"], dcfg)
    for name in ("tir", "quant_error", "logit_noise"):
        pd.testing.assert_frame_equal(da.tables[name], db.tables[name], rtol=1e-3, obj=name)


def test_dashboard_device_table_lists_each_device_with_its_memory(tiny):
    from app.widgets import device_memory

    info = models.load_model(tiny[0], device_map=CPU_MAP, dtype="fp32").info
    t = device_memory({**info.devices, "meta": {"modules": ["model.layers.9"], "bytes": 3 * 1024**3}})
    assert list(t["device"]) == ["cpu", "meta"]
    cpu, meta = t.iloc[0], t.iloc[1]
    assert cpu["modules"].startswith("model.embed_tokens, model.layers.0-1")
    assert cpu["weights_gib"] == info.devices["cpu"]["bytes"] / 1024**3
    assert 0 < cpu["this_process_gib"] <= cpu["total_gib"] and 0 < cpu["used_gib"] <= cpu["total_gib"]
    assert meta["weights_gib"] == 3 and pd.isna(meta["used_gib"])  # no memory to read on a device that is not one
