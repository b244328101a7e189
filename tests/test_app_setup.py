"""The Setup page driven headless (AppTest): context-length chips that keep their meaning, the model card
with the RoPE as trained beside the PI applied, and a device table that reads in words."""

import pandas as pd

from apptest import load, new_app, ok
from app import widgets as w
from conftest import save_tiny


def test_length_chips_wait_for_the_model_and_count_in_its_trained_context(tmp_path):
    at = new_app()
    ok(at)
    assert not [m for m in at.multiselect if m.key == "w:eval.lengths"]  # no chips from a guessed 2048
    assert any("load a model first" in c.value for c in at.caption)
    at = load(at, save_tiny(tmp_path / "m"))  # trained context 64
    ok(at)
    chips = at.multiselect(key="w:eval.lengths")
    assert chips.options[:4] == ["16 (0.25x)", "32 (0.5x)", "64 (1x)", "128 (2x)"]
    assert chips.value == [64, 128, 256, 512]


def test_model_card_shows_the_rope_as_trained_beside_the_pi_applied(tmp_path):
    at = load(new_app(), save_tiny(tmp_path / "m"))
    text = " ".join(m.value for m in at.markdown)
    assert "**RoPE as trained:** `default` · theta 10,000 · context 64" in text
    assert "**Applied by the settings below:** `yarn` x8 · context 64 stretched to about 512 tokens" in text
    assert not any("rope_type" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert list(table.columns) == ["Device", "Modules", "Model weights", "In use on device", "Device total", "This process"]
    assert table["Modules"].iloc[0].startswith("embed_tokens, layers.0-1")  # the shared "model." left out


def test_device_table_reads_in_words_and_prints_no_none():
    t = w.device_table({"meta": {"modules": ["model.layers.9", "model.norm"], "bytes": 3 * 1024**3}})
    assert t.to_dict("records") == [{"Device": "meta", "Modules": "layers.9, norm", "Model weights": "3.00 GiB",
                                     "In use on device": "—", "Device total": "—", "This process": "—"}]
    assert not t.isna().any().any() and "None" not in t.to_string()
    assert isinstance(w.device_memory({"meta": {"modules": [], "bytes": 0}}), pd.DataFrame)  # raw numbers kept


def _two_gpus(monkeypatch, total=(141, 141)):
    """torch.cuda as a host with two GPUs would answer (nothing is placed on them: no model is loaded)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(total))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=f"NVIDIA H200 #{i}", total_memory=total[i] * 2**30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int((total[i] - 1) * 2**30), total[i] * 2**30))


def test_setup_lists_every_gpu_lets_the_model_split_and_says_what_the_queue_does(monkeypatch):
    _two_gpus(monkeypatch)
    at = new_app()
    ok(at)
    gpus = at.dataframe[0].value
    assert gpus.to_dict("records") == [
        {"GPU": "cuda:0", "Name": "NVIDIA H200 #0", "Memory": "141.0 GiB", "Free now": "140.0 GiB"},
        {"GPU": "cuda:1", "Name": "NVIDIA H200 #1", "Memory": "141.0 GiB", "Free now": "140.0 GiB"}]
    split = at.selectbox(key="w:model.device_map")
    assert split.options == ["one device (above)", "balanced: layers split evenly over every GPU",
                             "auto: fill the first GPU, then the next"]
    assert any("sits on one: the job queue runs one job at a time" in c.value and "--distributed" in c.value for c in at.caption)
    split.select("balanced").run()
    ok(at)
    assert any("split over the 2 GPUs (balanced): every job" in c.value for c in at.caption)
    at.text_input(key="w:model.max_memory").input("0=70GiB,1=70GiB").run()
    ok(at)
    from app.engine import ModelKey

    assert ModelKey("m", device_map="balanced", max_memory="0=70GiB,1=70GiB").placement() == ("balanced", {0: "70GiB", 1: "70GiB"})
    at.text_input(key="w:model.max_memory").input("70GiB").run()  # not DEVICE=SIZE: said before anything loads
    ok(at)
    assert any("--max-memory expects DEVICE=SIZE" in e.value for e in at.error)
    assert next(b for b in at.button if b.label == "Load model").disabled


def test_one_gpu_shows_it_and_offers_no_split(monkeypatch):
    _two_gpus(monkeypatch, total=(80,))
    at = new_app()
    ok(at)
    assert at.dataframe[0].value["GPU"].tolist() == ["cuda:0"]
    assert not [s for s in at.selectbox if s.key == "w:model.device_map"]
