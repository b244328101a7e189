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
