"""qroar-tiny, the embedded default model: loads offline with plain transformers, is the Llama/RoPE/GQA
model its card describes, and reproduces the held-out perplexity its card reports. Also pins the
data helpers of scripts/train_tiny_model.py that decide what the model was trained and judged on."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "models" / "qroar-tiny"
CORPUS = ROOT / "assets" / "corpus"


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", ROOT / "scripts" / "train_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local folder must load without reaching for a hub
        model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
    return model, tokenizer


def card_figures() -> tuple[str, float]:
    card = (MODEL / "README.md").read_text(encoding="utf-8")
    m = re.search(r"Test slice perplexity: ([0-9.]+) .*?held-out document `([^`]+)`", card, re.S)
    return m.group(2), float(m.group(1))


def test_loads_offline_as_llama_with_fp32_weights(loaded):
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    n = sum(p.numel() for p in model.parameters())
    assert 9e6 <= n <= 30e6
    files = list(MODEL.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 40e6
    assert not list(MODEL.glob("*.bin")) and not list(MODEL.glob("*.pt"))


def test_config_is_rope_default_gqa_trained_at_256(loaded):
    cfg = loaded[0].config
    assert cfg.model_type == "llama"
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_parameters["rope_type"] == "default"
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.hidden_size // cfg.num_attention_heads == 64


def test_tokenizer_round_trips_and_adds_no_bos(loaded):
    _, tokenizer = loaded
    text = "It is a truth universally acknowledged,\n\tthat  x_1 <= 3.5e-2 |- ( ph -> ps ) ; café ✓"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [0, 1, 2, 3]
    assert len(tokenizer) == loaded[0].config.vocab_size


def test_heldout_slice_perplexity_matches_model_card(loaded):
    model, tokenizer = loaded
    doc_id, card_ppl = card_figures()
    manifest = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
    doc = next(d for d in manifest["documents"] if d["id"] == doc_id)
    assert doc["split"] == "heldout"
    text = (CORPUS / doc["file"]).read_text(encoding="utf-8")[:20_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : 4 * 256].view(4, 256)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids]
    ppl = math.exp(sum(losses) / len(losses))
    assert ppl == pytest.approx(card_ppl, rel=2e-3)
    assert ppl < 100  # a model that learned something, not a uniform guess over 8192 tokens


def test_longer_than_trained_context_runs(loaded):
    model, _ = loaded
    ids = torch.randint(4, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 512, model.config.vocab_size) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- script helpers


def test_piecewise_encoding_equals_whole_text_encoding(loaded):
    script = load_script()
    backend = loaded[1].backend_tokenizer
    text = "line one\n\n\n  indented\n\tTab\n's quote\nx\n \n\nend \n"
    whole = backend.encode(text, add_special_tokens=False).ids
    assert script.encode(backend, text).tolist() == whole


def test_validation_blocks_are_disjoint_and_cover_the_stream():
    script = load_script()
    tokens = np.arange(10 * script.VAL_BLOCK + 7, dtype=np.int64)
    train, val = script.split_val(tokens, 0.2, seed=0)
    assert len(val) == 2 * script.VAL_BLOCK
    assert sorted(np.concatenate([train, val]).tolist()) == tokens.tolist()
    assert (np.diff(val.reshape(2, -1), axis=1) == 1).all()  # each block contiguous


def test_eval_windows_never_cross_a_document():
    script = load_script()
    tokens = np.arange(100)
    w = script.eval_windows(tokens, np.array([0, 25, 100]), 10)
    assert w.shape == (2 + 7, 10)
    assert not any(r[0] < 25 <= r[-1] for r in w)


def test_epoch_covers_each_training_token_once():
    script = load_script()
    starts = script.epoch_starts(1000, 16, np.random.default_rng(3))
    covered = np.concatenate([np.arange(s, s + 17) for s in starts])  # input + next-token target
    inputs = np.concatenate([np.arange(s, s + 16) for s in starts])
    assert len(np.unique(inputs)) == len(inputs) and covered.max() < 1000
    assert len(inputs) >= 1000 - 2 * 16


def test_overlap_probe_measures_copied_text():
    script = load_script()
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 10_000, 400)) for _ in range(3)]
    half = docs[2][: len(docs[2]) // 2]
    got = script.overlap_fractions(docs[:2] + [half], {"new": docs[2], "copied": docs[1].replace(" ", "\n  ")})
    assert got["copied"] == 1.0  # whitespace-normalised
    assert 0.2 < got["new"] < 0.8  # about the half that was copied
