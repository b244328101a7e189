"""Reload a packed export with stock libraries only and measure perplexity on one window of token ids.

Runs as a script in its own process (`python stock_reload.py PATH --tokens IDS.json`) and imports no qroar: torch,
transformers (+ compressed-tensors for a compressed-tensors folder) and gguf only. Prints one JSON line: the
perplexity, the rope_parameters in force after the load, how it was loaded.

- compressed-tensors folder: `AutoModelForCausalLM.from_pretrained(folder, quantization_config=
  CompressedTensorsConfig(dequantize=True))`; transformers reads config.json's quantization_config and unpacks the
  int4/int8 codes to dense weights as they load (CPU has no packed kernels).
- GGUF file (or a folder holding model.gguf): `from_pretrained(folder, gguf_file=...)`. transformers' GGUF mapping
  reads rope.freq_base but no rope.scaling.* key, so a YaRN or linear file would load without its scaling: the
  scaling is read here with gguf.GGUFReader and put on the config before the weights load (reported as
  "rope_from_gguf_reader").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

GGUF_FILE = "model.gguf"


def read_gguf_rope(path) -> dict:
    """The `{arch}.rope.*` and `{arch}.context_length` metadata of a GGUF file (arch prefix dropped)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    out = {}
    for name, f in r.fields.items():
        if name.startswith(f"{arch}.rope.") or name == f"{arch}.context_length":
            out[name[len(arch) + 1:]] = f.contents()
    return out


def rope_from_gguf_keys(keys: dict) -> dict:
    """transformers' rope_parameters from GGUF rope metadata (llama.cpp's keys)."""
    theta = float(keys.get("rope.freq_base", 10000.0))
    t = keys.get("rope.scaling.type")
    if not t or t == "none":
        return {"rope_type": "default", "rope_theta": theta}
    rp = {"rope_type": t, "rope_theta": theta, "factor": float(keys["rope.scaling.factor"])}
    if "rope.scaling.original_context_length" in keys:
        rp["original_max_position_embeddings"] = int(keys["rope.scaling.original_context_length"])
    if t == "yarn":
        rp["beta_fast"] = float(keys.get("rope.scaling.yarn_beta_fast", 32.0))
        rp["beta_slow"] = float(keys.get("rope.scaling.yarn_beta_slow", 1.0))
        if "rope.scaling.yarn_attn_factor" in keys:  # llama.cpp multiplies its 0.1 ln(s) + 1 by this
            rp["attention_factor"] = float(keys["rope.scaling.yarn_attn_factor"]) * (0.1 * math.log(rp["factor"]) + 1)
    return rp


def gguf_path(path) -> Path | None:
    p = Path(path)
    if p.suffix == ".gguf":
        return p
    return p / GGUF_FILE if (p / GGUF_FILE).exists() else None


def load(path):
    """(model, info) loaded with transformers alone; info says how and which rope_parameters are in force."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    g = gguf_path(path)
    if g is None:  # dequantize=True: transformers unpacks the int4/int8 codes to dense weights as they load
        from transformers import CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        info = {"loader": "transformers + compressed-tensors (config.json quantization_config, dequantized on load)"}
    else:
        keys = read_gguf_rope(g)
        config = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
        rp = rope_from_gguf_keys(keys)
        config.rope_parameters = rp
        if rp["rope_type"] != "default":
            config.max_position_embeddings = int(keys.get("context_length", config.max_position_embeddings))
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, config=config,
                                                     dtype=torch.float32)
        info = {"loader": "transformers GGUF loader", "gguf_rope_keys": {k: v for k, v in keys.items()},
                "rope_from_gguf_reader": rp["rope_type"] != "default"}
    model.eval()
    info["rope_parameters"] = dict(model.config.rope_parameters)
    return model, info


def perplexity(model, ids, chunk: int = 1024) -> float:
    """exp(mean next-token loss) over one window of token ids (no BOS added: the window is used as given)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        h = model.model(input_ids=x).last_hidden_state[0, :-1]
        target, total = x[0, 1:], 0.0
        for i in range(0, h.shape[0], chunk):
            logits = model.lm_head(h[i:i + chunk]).float()
            total += torch.nn.functional.cross_entropy(logits, target[i:i + chunk], reduction="sum").item()
    return math.exp(total / (len(ids) - 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a compressed-tensors folder, a .gguf file, or a folder holding model.gguf")
    p.add_argument("--tokens", required=True, help="JSON list of token ids: the window")
    p.add_argument("--weights", default=None, help="also save the loaded linear weights (torch.save) here")
    a = p.parse_args(argv)
    import torch

    t0 = time.time()
    model, info = load(a.path)
    info["load_seconds"] = round(time.time() - t0, 2)
    ids = json.loads(Path(a.tokens).read_text())
    t0 = time.time()
    info["ppl"] = perplexity(model, ids)
    info["tokens"] = len(ids)
    info["eval_seconds"] = round(time.time() - t0, 2)
    if a.weights:
        torch.save({n: m.weight.detach().clone() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)}, a.weights)
    print(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
