"""Packed quantized checkpoints that stock runtimes load: compressed-tensors and GGUF.

Both writers store the weights the workbench evaluates (the "quant_scaled" variant, or "quant" without scales), so
the perplexity a stock loader measures on the file is the one qroar showed:

- compressed-tensors (pack-quantized W4A16 / W8A16, written by the `compressed-tensors` library's pack-quantized
  compressor): each quantized linear's codes are recovered from its in-memory weight and the grid it was quantized
  on (the ct quantizer's scale rule, or RTN's symmetric grid), so the dequantized file equals the weights bit for bit.
  config.json holds the PI rope_parameters and the quantization_config.
- GGUF (`gguf` package: GGUFWriter and gguf.quants, Llama architecture): tensors in llama.cpp's layout (q/k rows
  permuted to its interleaved RoPE pairs), the quantized linears in the gguf-* quantizer's type (re-quantizing its
  own output gives the same bytes: the blocks' largest weight pins the scale), the rest in the model's float type,
  the byte-level BPE tokenizer, and the rope scaling under `llama.rope.scaling.*` (type, factor,
  original_context_length, YaRN's beta_fast/beta_slow and attention factor).

Both need order "before" when scales are set: "after" scales dequantized rows off the grid a file stores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qroar.errors import ConfigError

GGUF_FILE = "model.gguf"
CT_METHODS = ("ct", "rtn")  # quantizers whose grid compressed-tensors stores exactly (rtn: symmetric grids only)
CT_BITS = (4, 8)  # W4A16, W8A16
GGUF_ARCHS = ("llama",)  # model_type -> the GGUF writer's architecture (Llama layout, rotate_half q/k)
GGUF_ROPE_TYPES = ("default", "linear", "yarn")  # GGUF has keys for these; llama3/dynamic/longrope have none


def _variant(wb) -> str:
    return "quant_scaled" if wb.scales is not None else "quant"


def check_quant(fmt: str, q, order: str | None) -> None:
    """ConfigError when quantizer `q` (QuantConfig or None) with scale order `order` (None: no scales) cannot be stored
    in `fmt`: run on the recipe before a model loads, and again on the workbench before anything is written."""
    from qroar.quant import GGUF_TYPES

    if q is None or q.is_identity:
        raise ConfigError(f"The {fmt} format stores quantized weights and no quantizer is set: choose one "
                          f"({'ct or rtn --sym' if fmt == 'compressed-tensors' else 'gguf-q4_0 or gguf-q8_0'}).")
    if order is not None and order != "before":
        raise ConfigError(f"The {fmt} format stores one grid per group and order 'after' scales the dequantized rows "
                          "off it: use order 'before' (the scaled weights are quantized) to export them.")
    if fmt == "gguf":
        if q.method not in GGUF_TYPES:
            raise ConfigError(f"GGUF stores llama.cpp's block types; the {q.method} quantizer's grid is not one of "
                              f"them: quantize with {' or '.join(GGUF_TYPES)} (what you tune is then what the file holds).")
        return
    if q.method not in CT_METHODS:
        raise ConfigError(f"compressed-tensors stores a symmetric int grid; the {q.method} quantizer's weights are not "
                          "on one: quantize with ct (compressed-tensors' own rule) or rtn --sym.")
    if q.bits not in CT_BITS:
        raise ConfigError(f"compressed-tensors W4A16/W8A16 has no {q.bits}-bit type: use --bits 4 or --bits 8.")
    if not q.symmetric:
        raise ConfigError("compressed-tensors' pack-quantized W4A16/W8A16 are symmetric: add --sym.")
    if q.group_size < -1:
        raise ConfigError("compressed-tensors has no per-tensor int4/int8 weight grid here: use groups or 0 (per channel).")


def _check_common(wb, fmt: str) -> None:
    check_quant(fmt, wb.quant_cfg if wb.qstate is not None else None,
                wb.scale_cfg.order if wb.scales is not None else None)


def check_compressed_tensors(wb) -> None:
    """ConfigError, before anything is written, when the recipe's quantizer is not one compressed-tensors holds."""
    _check_common(wb, "compressed-tensors")


def _targets(wb) -> list[str]:
    return list(wb.qstate.originals)


def _grid_scale(w_pre: torch.Tensor, cfg) -> torch.Tensor:
    from qroar import quant

    return quant.ct_scale(w_pre, cfg) if cfg.method == "ct" else quant.rtn_scale(w_pre, cfg)


def _ct_scheme(cfg, targets: list[str], all_linears: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = cfg.group_size > 0
    args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=True, strategy="group" if group else "channel",
                            group_size=cfg.group_size if group else None)
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return QuantizationScheme(targets=["Linear"] if all_linears else [f"re:.*\\.({'|'.join(suffixes)})$"],
                              weights=args)


def write_compressed_tensors(wb, folder: Path) -> dict:
    """Pack the quantized linears with compressed-tensors' PackedQuantizationCompressor; save config (+ PI and the
    quantization_config) and tokenizer."""
    check_compressed_tensors(wb)
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cfg, names = wb.quant_cfg, _targets(wb)
    all_linears = cfg.scope == "linear"
    scheme = _ct_scheme(cfg, names, all_linears)
    fp_variant = "fp_scaled" if wb.scales is not None else "fp"
    with wb.lock:
        with wb.variant(fp_variant) as model:  # the grid comes from the weights the quantizer saw
            scales = {n: _grid_scale(model.get_submodule(n).weight.data, cfg) for n in names}
        with wb.variant(_variant(wb)) as model:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            for n in names:
                w = state.pop(f"{n}.weight")
                s = scales[n].to(torch.float32 if cfg.method == "rtn" else w.dtype).cpu().reshape(w.shape[0], -1)
                packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": s}, scheme)
                for k, v in packed.items():
                    state[f"{n}.{k}"] = v.contiguous()
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)
            model.config.save_pretrained(folder)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(folder)
    from safetensors.torch import save_file

    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=["lm_head"] if all_linears else [])
    ModelCompressor(quantization_config=qc).update_config(str(folder))
    if wb.tokenizer is not None:
        wb.tokenizer.save_pretrained(folder)
    label = f"W{cfg.bits}A16" + (f" g{cfg.group_size}" if cfg.group_size > 0 else " per channel")
    return {"scheme": label, "quantizer": cfg.describe(), "layers": len(names)}


# ----------------------------------------------------------------------------- GGUF


def _gguf_qtype(cfg):
    from gguf import GGMLQuantizationType

    from qroar.quant import GGUF_TYPES

    return GGMLQuantizationType[GGUF_TYPES[cfg.method]]


def gguf_rope_keys(rp: dict) -> dict:
    """GGUF's rope-scaling metadata (key suffix after `llama.`) for transformers' rope_parameters."""
    t = rp.get("rope_type", "default")
    if t not in GGUF_ROPE_TYPES:
        raise ConfigError(f"GGUF has rope-scaling keys for linear and yarn only, not {t!r}: export compressed-tensors "
                          "or hf (their config.json carries any rope_parameters), or choose linear or yarn.")
    if t == "default":
        return {}
    out = {"rope.scaling.type": t, "rope.scaling.factor": float(rp["factor"])}
    if rp.get("original_max_position_embeddings"):
        out["rope.scaling.original_context_length"] = int(rp["original_max_position_embeddings"])
    if t == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if rp.get(key):
                raise ConfigError(f"GGUF has no key for YaRN's {key}: export compressed-tensors or hf instead.")
        out["rope.scaling.yarn_beta_fast"] = float(rp.get("beta_fast") or 32.0)
        out["rope.scaling.yarn_beta_slow"] = float(rp.get("beta_slow") or 1.0)
        if rp.get("attention_factor") is not None:  # llama.cpp multiplies its own 0.1 ln(s) + 1 by this
            out["rope.scaling.yarn_attn_factor"] = float(rp["attention_factor"]) / (0.1 * math.log(rp["factor"]) + 1)
    return out


def check_gguf(wb) -> None:
    """ConfigError, before anything is written, for a quantizer, architecture, RoPE or tokenizer GGUF cannot hold."""
    from qroar import rope

    mt = getattr(wb.model.config, "model_type", None)
    if mt not in GGUF_ARCHS:
        raise ConfigError(f"The GGUF writer knows the {', '.join(GGUF_ARCHS)} architecture(s), not {mt!r}: "
                          "export compressed-tensors or hf for this model.")
    _check_common(wb, "gguf")
    gguf_rope_keys(rope.rope_parameters(wb.model.config))
    tok = _tokenizer_json(wb)
    if tok is not None and tok["model"]["type"] != "BPE":
        raise ConfigError(f"The GGUF writer stores byte-level BPE tokenizers; this one is {tok['model']['type']}.")
    for name in _targets(wb):
        cols = wb.model.get_submodule(name).weight.shape[1]
        if cols % 32:
            raise ConfigError(f"{name} has {cols} input columns, not a multiple of GGUF's block of 32.")


def _tokenizer_json(wb) -> dict | None:
    tok = getattr(wb.tokenizer, "backend_tokenizer", None) or getattr(wb.tokenizer, "_tokenizer", None)
    return None if tok is None else json.loads(tok.to_str())


def _permute(w, n_head: int):
    """HF's rotate_half rows -> llama.cpp's interleaved pairs (what its converter does; transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str | None:
    base = hf[:-len(".weight")] if hf.endswith(".weight") else None
    if base is None:
        return None
    if base == "model.embed_tokens":
        return "token_embd.weight"
    if base == "model.norm":
        return "output_norm.weight"
    if base == "lm_head":
        return "output.weight"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"]:
        sub = _GGUF_NAMES.get(".".join(parts[3:]))
        if sub is not None:
            return f"blk.{parts[2]}.{sub}.weight"
    return None


def write_gguf(wb, folder: Path) -> dict:
    """One GGUF file (GGUF_FILE) in `folder` with the quantized weights, tokenizer and rope scaling."""
    check_gguf(wb)
    import gguf
    import numpy as np

    from qroar import rope

    cfg = rope.text_config(wb.model.config)
    rp = rope.rope_parameters(wb.model.config)
    qtype, targets = _gguf_qtype(wb.quant_cfg), set(_targets(wb))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    path = Path(folder) / GGUF_FILE
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(str(wb.info.name)).name)
    ctx = int(cfg.max_position_embeddings)
    if rp.get("rope_type", "default") != "default" and rp.get("original_max_position_embeddings"):
        ctx = max(ctx, int(rp["original_max_position_embeddings"] * rp["factor"]))  # the context the PI reaches
    w.add_context_length(ctx)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
                     gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
                     gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
                     gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    rope_keys = gguf_rope_keys(rp)
    for k, v in rope_keys.items():
        key = f"llama.{k}"
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_float32(key, v)
    _add_tokenizer(w, wb)
    float_type = {torch.float16: gguf.GGMLQuantizationType.F16, torch.bfloat16: gguf.GGMLQuantizationType.BF16}
    with wb.lock, wb.variant(_variant(wb)) as model:
        tied = getattr(model.config, "tie_word_embeddings", False)
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            gname = _gguf_name(name)
            if gname is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ConfigError(f"The GGUF writer has no llama.cpp name for tensor {name}: export compressed-tensors "
                                  "or hf for this model.")
            x = t.detach().float().cpu()
            if gname.startswith("blk.") and gname.endswith("attn_q.weight"):
                x = _permute(x, n_head)
            elif gname.startswith("blk.") and gname.endswith("attn_k.weight"):
                x = _permute(x, n_kv)
            arr = np.ascontiguousarray(x.numpy())
            if name[:-len(".weight")] in targets:
                w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
            elif arr.ndim == 1 or t.dtype == torch.float32:
                w.add_tensor(gname, arr)
            else:
                ft = float_type.get(t.dtype, gguf.GGMLQuantizationType.F32)
                w.add_tensor(gname, gguf.quants.quantize(arr, ft), raw_dtype=ft)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"gguf_file": GGUF_FILE, "gguf_type": qtype.name, "rope_keys": {f"llama.{k}": v for k, v in rope_keys.items()},
            "quantizer": wb.quant_cfg.describe()}


def rope_text_vocab(wb) -> int:
    from qroar import rope

    return rope.text_config(wb.model.config).vocab_size


def _add_tokenizer(w, wb) -> None:
    tok = _tokenizer_json(wb)
    if tok is None:
        return
    vocab = dict(tok["model"]["vocab"])
    for a in tok.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    n = max(max(vocab.values()) + 1, int(rope_text_vocab(wb)))  # llama.cpp wants one token per embedding row
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(n)])  # 3: control, 1: normal
    w.add_token_merges(merges)
    t = wb.tokenizer
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(t, attr, None)
        if isinstance(v, int):
            add(v)
