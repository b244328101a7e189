"""Shared fixtures: tiny random-weight RoPE models built from configs (no download)."""

import os

import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """QROAR_SKIP_BROWSER=1 (README, quick start) skips the tests marked `browser`, which drive Chromium."""
    if os.environ.get("QROAR_SKIP_BROWSER", "") in ("", "0"):
        return
    # a skipif on the test itself is read before the module's "no Chromium" one, so this reason is the one shown
    skip = pytest.mark.skipif(True, reason="QROAR_SKIP_BROWSER is set: browser tests skipped (unset it to run them; "
                              "`make chromium` installs Debian's Chromium)")
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(skip)


def tiny_llama(**overrides):
    """A 2-layer Llama with GQA (4 query heads, 2 key/value heads, head_dim 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_qwen2(**overrides):
    """A 2-layer Qwen2 (q/k/v biases) with GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen2():
    return tiny_qwen2()


TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. 0123456789 +-*/=()[]{}.,;:!?'\"\n"
)


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level BPE tokenizer (ids < vocab_size) with BOS/EOS, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=sorted(set(TEXT)))
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny(path, model=None):
    """Save a tiny random model plus tokenizer as a Hugging Face folder; returns the path as str."""
    model = model if model is not None else tiny_llama()
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return str(path)


def tiny_workbench(path, quant=None, double: bool = False):
    """The tiny Llama saved under `path`, opened on the CPU under linear PI x2, `quant` (default RTN W3 g32) and
    4 bands: the workbench most engine tests start from. double: the model in float64 (finite differences)."""
    from qroar.bands import BandConfig
    from qroar.quant import QuantConfig
    from qroar.rope import PIConfig
    from qroar.workbench import Workbench

    wb = Workbench.open(save_tiny(path), device="cpu", dtype="fp32")
    if double:
        wb.model.double()
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(quant if quant is not None else QuantConfig(method="rtn", bits=3, group_size=32))
    wb.set_bands(BandConfig(n_bands=4))
    return wb


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny-llama")


def save_char_tiny(out) -> str:
    """A tiny random Llama with a character-level tokenizer (every printable character, vocab < 128)."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = dict.fromkeys(string.printable[:95] + "\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tiny_llama().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread each, far faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
