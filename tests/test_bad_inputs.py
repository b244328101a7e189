"""The catalogue of bad inputs: every row names an input a user can give, the error class and a
distinctive phrase of its message, and proves that nothing changed (weights, config, settings,
files on disk) and that the workbench and the app's job queue still work afterwards.

Then property-based tests feed random settings to the engine's public functions and accept only
a result without NaN or one of the documented errors (QroarError subclasses).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import save_tiny, tiny_llama, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.jobs import DONE, FAILED, JobQueue  # noqa: E402
from qroar import diagnostics, models, perplexity, rope  # noqa: E402
from qroar.bands import BandConfig, make_bands  # noqa: E402
from qroar.errors import ConfigError, DataError, ModelError, OutOfMemory, QroarError, ScalesFileError  # noqa: E402
from qroar.export import load_scales, save_scales  # noqa: E402
from qroar.perplexity import EvalConfig, evaluate  # noqa: E402
from qroar.quant import QuantConfig, fake_quant  # noqa: E402
from qroar.rescale import ScaleConfig, check_scales  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

RTN = QuantConfig(method="rtn", bits=3, group_size=32)
SCALES = [1.2, 0.9, 1.1, 0.95]
PROBE_DOCS = [torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
PROBE_EVAL = EvalConfig(lengths=(40,), max_windows_per_doc=1)
SETTLE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- "nothing changed"


def tree_hash(*roots) -> dict[str, str]:
    """sha256 of every file under the roots (relative path -> digest)."""
    out = {}
    for root in roots:
        root = Path(root)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[f"{root.name}/{p.relative_to(root)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def model_hash(wb: Workbench) -> str:
    """Every parameter and buffer of the model, plus the parked full-precision originals."""
    h = hashlib.sha256()
    tensors = list(wb.model.state_dict().items())
    if wb.qstate is not None:
        tensors += [(f"orig.{k}", v) for k, v in wb.qstate.originals.items()]
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def probe(wb: Workbench) -> list[float]:
    """The workbench still computes: per-document nll of the scaled (or quantized) model."""
    variant = "quant_scaled" if "quant_scaled" in wb.available_variants() else "quant"
    return wb.evaluate(PROBE_DOCS, PROBE_EVAL, variant).table.nll.tolist()


def snapshot(wb: Workbench, *roots) -> dict:
    return {
        "weights": model_hash(wb),
        "config": json.dumps(wb.model.config.to_dict(), sort_keys=True, default=str),
        "settings": json.dumps(wb.settings(), sort_keys=True),
        "variants": wb.available_variants(),
        "files": tree_hash(*roots),
        "nll": probe(wb),
    }


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bad-inputs") / "m")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Same shape, other weights: a scales file made here is 'for another model'."""
    return save_tiny(tmp_path_factory.mktemp("bad-inputs") / "other", tiny_llama(initializer_range=0.05))


def open_wb(path) -> Workbench:
    wb = Workbench.open(str(path), device="cpu", dtype="fp32")
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(RTN)
    wb.set_bands(BandConfig(n_bands=4))
    wb.set_scales(SCALES, ScaleConfig("shared", "before"))
    return wb


@dataclass
class Ctx:
    wb: Workbench
    model_dir: Path
    other_dir: Path
    root: Path  # a fresh folder for the row's own files
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture
def ctx(model_dir, other_dir, tmp_path, monkeypatch):
    return Ctx(open_wb(model_dir), Path(model_dir), Path(other_dir), tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def jobs():
    q = JobQueue()
    yield q
    q.shutdown()


# ----------------------------------------------------------------------------- building bad inputs


def copy_model(c: Ctx, name="copy") -> Path:
    """A private copy of the tiny model folder that a row may damage."""
    import shutil

    return Path(shutil.copytree(c.model_dir, c.root / name))


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def gpt2_dir(c: Ctx) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = c.root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(out)
    tiny_tokenizer(64).save_pretrained(out)
    return out


def pickle_only_dir(c: Ctx) -> Path:
    out = copy_model(c, "pickled")
    torch.save(tiny_llama().state_dict(), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def truncated_weights(c: Ctx) -> Path:
    out = copy_model(c)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return out


def short_tensor_data(c: Ctx) -> Path:
    """A valid header whose tensor data ends early (a download cut off near the end)."""
    out = copy_model(c)
    f = out / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    f.write_bytes(raw[: 8 + n + (len(raw) - 8 - n) // 2])
    return out


def garbage_header(c: Ctx) -> Path:
    out = copy_model(c)
    f = out / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"\x00garbage{" + raw[17:])
    return out


def no_tokenizer(c: Ctx) -> Path:
    out = copy_model(c)
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / n).unlink(missing_ok=True)
    return out


def write(c: Ctx, name: str, content: bytes | str) -> Path:
    p = c.root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def scales_file(c: Ctx, edit: Callable[[dict], object] | None = None, wb: Workbench | None = None) -> Path:
    p = save_scales(c.root / "scales.json", wb or c.wb)
    if edit is not None:
        d = json.loads(p.read_text())
        edit(d)
        p.write_text(json.dumps(d))
    return p


def truncated_scales(c: Ctx) -> Path:
    p = scales_file(c)
    p.write_text(p.read_text()[: len(p.read_text()) // 2])
    return p


def corpus(c: Ctx, path):
    return lambda: c.wb.corpus(str(path))


def diagnose(c: Ctx, path, **kw):
    return lambda: diagnostics.run_diagnostics(c.wb, str(path), diagnostics.DiagConfig(n_docs=1, **kw))


def calibrate(c: Ctx, cfg: QuantConfig, path):
    return lambda: c.wb.set_quant(cfg, calib_corpus=str(path))


def load(path, **kw):
    return lambda: models.load_model(str(path), **kw)


def low_memory(c: Ctx):
    """Only 1 MiB free: a 4096-token window of the tiny model needs about 10 MiB of activations."""
    c.monkeypatch.setattr(perplexity, "available_memory", lambda device: 2**20)
    doc = torch.randint(3, 128, (5000,), generator=torch.Generator().manual_seed(0))
    return lambda: c.wb.evaluate([doc], EvalConfig(lengths=(4096,)), "quant_scaled")


def evaluate_text(c: Ctx, text: str, lengths):
    p = write(c, "doc.txt", text)
    return lambda: c.wb.evaluate(str(p), EvalConfig(lengths=lengths), "quant_scaled")


def after_dynamic(c: Ctx, bad: PIConfig):
    c.wb.set_pi(PIConfig("dynamic", 4.0, original_max_position_embeddings=16))  # dynamic NTK edits the config
    return lambda: c.wb.set_pi(bad)


# ----------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Row:
    id: str
    prepare: Callable[[Ctx], Callable[[], object]]  # builds the bad input (before the snapshot), returns the action
    error: type
    phrase: str  # a regular expression that the message must contain


ROWS = [
    # -- models
    Row("model-path-missing", lambda c: load(c.root / "no" / "such" / "model"), ModelError, r"does not exist"),
    Row("model-path-is-a-file", lambda c: load(write(c, "w.safetensors", b"x")), ModelError, r"is a file: give the folder"),
    Row("model-name-empty", lambda c: load(""), ModelError, r"No model given"),
    Row("model-without-rope", lambda c: load(gpt2_dir(c)), ModelError, r"learned absolute position embeddings, not RoPE"),
    Row("pickle-weights-only", lambda c: load(pickle_only_dir(c)), ModelError, r"only pickle weights.*allow pickle"),
    Row("remote-code-auto-map", lambda c: load(edit_config(copy_model(c), auto_map={"AutoModelForCausalLM": "evil.M"})),
        ModelError, r"needs custom code.*trust_remote_code"),
    Row("architecture-unknown", lambda c: load(edit_config(copy_model(c), model_type="evil_model")),
        ModelError, r"does not recognize this architecture.*trust_remote_code"),
    Row("config-not-json", lambda c: load(_broken_config(c)), ModelError, r"Could not read copy/config\.json"),
    Row("safetensors-truncated", lambda c: load(truncated_weights(c)), ModelError, r"weights of copy are corrupted"),
    Row("safetensors-data-cut-short", lambda c: load(short_tensor_data(c)), ModelError, r"weights of copy are corrupted"),
    Row("safetensors-garbage-header", lambda c: load(garbage_header(c)), ModelError, r"weights of copy are corrupted"),
    Row("weights-missing", lambda c: load(_unlink(copy_model(c), "model.safetensors")), ModelError, r"holds no weights"),
    Row("tokenizer-missing", lambda c: load(no_tokenizer(c)), ModelError, r"no tokenizer files"),
    Row("dtype-unknown", lambda c: load(c.model_dir, dtype="int3"), ModelError, r"Unknown dtype 'int3'"),
    # -- corpus
    Row("corpus-missing", lambda c: lambda: c.wb.corpus(str(c.root / "nope.txt")), DataError, r"No such file or folder"),
    Row("corpus-empty-file", lambda c: corpus(c, write(c, "e.txt", b"")), DataError, r"is empty"),
    Row("corpus-whitespace-only", lambda c: corpus(c, write(c, "w.txt", " \n\t\n")), DataError, r"is empty"),
    Row("corpus-binary", lambda c: corpus(c, write(c, "b.txt", bytes(range(256)))), DataError,
        r"looks binary \(NUL byte at offset 0\)"),
    Row("corpus-not-utf8", lambda c: corpus(c, write(c, "l.txt", "caf\u00e9 au lait".encode("latin-1"))),
        DataError, r"is not UTF-8 text: byte 0xe9 at offset 3.*iconv"),
    Row("corpus-folder-without-text", lambda c: corpus(c, write(c, "d/x.bin", b"1").parent), DataError,
        r"has no \.txt or \.md files"),
    Row("corpus-spec-empty", lambda c: lambda: c.wb.corpus("   "), DataError, r"Empty corpus spec"),
    Row("document-shorter-than-every-length", lambda c: evaluate_text(c, "It is a truth.", (32, 64)), DataError,
        r"No document has the 32 tokens one window of length 32 needs"),
    Row("capture-document-too-short", lambda c: diagnose(c, write(c, "s.txt", "It is a truth."), capture_length=128),
        DataError, r"has 128 tokens for a 128-token window"),
    Row("token-ids-outside-vocab", lambda c: lambda: c.wb.evaluate([torch.tensor([5, 500, 7] * 20)], PROBE_EVAL, "quant"),
        DataError, r"outside the model's vocabulary \(0\.\.127\)"),
    # -- lengths and evaluation settings
    Row("length-zero", lambda c: lambda: EvalConfig(lengths=(0,)), ConfigError, r"integer >= 2 tokens, got 0"),
    Row("length-negative", lambda c: lambda: EvalConfig(lengths=(64, -5)), ConfigError, r"integer >= 2 tokens, got -5"),
    Row("length-not-integer", lambda c: lambda: EvalConfig(lengths=(32.5,)), ConfigError, r"got 32\.5"),
    Row("lengths-empty", lambda c: lambda: EvalConfig(lengths=()), ConfigError, r"non-empty list"),
    Row("stride-not-below-length", lambda c: lambda: EvalConfig(lengths=(32,), stride=32), ConfigError,
        r"stride must be an integer from 1 to 31"),
    Row("batch-size-zero", lambda c: lambda: EvalConfig(batch_size=0), ConfigError, r"batch_size must be a positive integer"),
    Row("length-beyond-memory", low_memory, OutOfMemory,
        r"Length 4096 at batch 1 needs about .* GiB .* the longest context that fits at batch 1 is about \d+ tokens"),
    # -- quantizer
    Row("group-size-not-dividing", lambda c: lambda: c.wb.set_quant(QuantConfig(group_size=48)), ConfigError,
        r"group size 48 does not divide the input width 64 .*16, 32, 64"),
    Row("group-size-wider-than-layer", lambda c: lambda: c.wb.set_quant(QuantConfig(group_size=128)), ConfigError,
        r"group size 128 does not divide the input width 64"),
    Row("group-size-negative", lambda c: lambda: QuantConfig(group_size=-3), ConfigError, r"use a positive size"),
    Row("bits-too-few", lambda c: lambda: QuantConfig(bits=1), ConfigError, r"bits=1 is out of range"),
    Row("bits-too-many", lambda c: lambda: c.wb.set_quant(QuantConfig(bits=9)), ConfigError, r"bits=9 is out of range"),
    Row("bits-fractional", lambda c: lambda: QuantConfig(bits=4.5), ConfigError, r"bits must be a whole number"),
    Row("quant-method-unknown", lambda c: lambda: QuantConfig(method="nf4"), ConfigError, r"'nf4' is unknown"),
    Row("gptq-calibration-too-short", lambda c: calibrate(c, QuantConfig(method="gptq", group_size=32, seq_len=512),
                                                          write(c, "cal.txt", "It is a truth.")),
        DataError, r"no calibration document has 512 tokens"),
    # -- bands
    Row("bands-more-than-rope-pairs", lambda c: lambda: c.wb.set_bands(BandConfig(n_bands=9)), ConfigError,
        r"9 bands is more than this model's 8 RoPE pairs"),
    Row("bands-zero", lambda c: lambda: c.wb.set_bands(BandConfig(n_bands=0)), ConfigError, r"positive integer, got 0"),
    Row("band-alignment-unknown", lambda c: lambda: c.wb.set_bands(BandConfig(n_bands=4, align="mel")), ConfigError,
        r"Unknown band alignment 'mel'"),
    Row("yarn-band-betas-inverted", lambda c: lambda: c.wb.set_bands(BandConfig(4, "yarn", beta_fast=1.0, beta_slow=32.0)),
        ConfigError, r"beta_fast > beta_slow > 0"),
    # -- scales
    Row("scale-zero", lambda c: lambda: c.wb.set_scales([1.0, 0.0, 1.0, 1.0]), ConfigError, r"scale of band 1 is 0\.0"),
    Row("scale-negative", lambda c: lambda: c.wb.set_scales([1.0, 1.0, -0.5, 1.0]), ConfigError, r"band 2 is -0\.5"),
    Row("scale-nan", lambda c: lambda: c.wb.set_scales([math.nan, 1.0, 1.0, 1.0]), ConfigError, r"band 0 is nan"),
    Row("scale-infinite", lambda c: lambda: c.wb.set_scales([1.0, 1.0, 1.0, math.inf]), ConfigError, r"band 3 is inf"),
    Row("one-band-scale-nan", lambda c: lambda: c.wb.set_band_scale(1, math.nan), ConfigError, r"band 1 is nan"),
    Row("scale-count-wrong", lambda c: lambda: c.wb.set_scales([1.0, 1.0, 1.0]), ConfigError, r"Got 3 scales for 4 bands"),
    Row("scales-not-numbers", lambda c: lambda: c.wb.set_scales("1,2,3,4"), ConfigError, r"list of numbers"),
    # -- scales files
    Row("scales-file-other-model", lambda c: _load_scales(scales_file(c, wb=open_wb(c.other_dir)), c.wb), ScalesFileError,
        r"made for other \(fingerprint \w+\) but the loaded model is m"),
    Row("scales-file-other-shape", lambda c: _load_scales(scales_file(c, lambda d: d["model"].update(n_layers=3)), c.wb),
        ScalesFileError, r"is for m \(3 layers.*has 2 layers"),
    Row("scales-file-truncated", lambda c: _load_scales(truncated_scales(c), c.wb), ScalesFileError, r"is truncated"),
    Row("scales-file-future-schema", lambda c: _load_scales(scales_file(c, lambda d: d.update(schema_version=7)), c.wb),
        ScalesFileError, r"schema version 7: it was written by a newer qroar"),
    Row("scales-file-empty", lambda c: _load_scales(write(c, "scales.json", ""), c.wb), ScalesFileError, r"is empty"),
    Row("scales-file-not-json", lambda c: _load_scales(write(c, "scales.json", "scales: [1, 2]"), c.wb), ScalesFileError,
        r"not valid JSON"),
    Row("scales-file-nan-scale", lambda c: _load_scales(scales_file(c, lambda d: d["scales"].__setitem__(2, math.nan)), c.wb),
        ScalesFileError, r"band 2 is nan"),
    Row("scales-file-missing", lambda c: _load_scales(c.root / "none.json", c.wb), ScalesFileError, r"does not exist"),
    # -- position interpolation
    Row("pi-factor-below-one", lambda c: lambda: PIConfig("linear", 0.5), ConfigError, r"finite number >= 1, got 0\.5"),
    Row("pi-factor-nan", lambda c: lambda: PIConfig("yarn", math.nan), ConfigError, r"finite number >= 1, got nan"),
    Row("pi-type-unknown", lambda c: lambda: PIConfig("xpos", 2.0), ConfigError, r"Unknown rope_type 'xpos'"),
    Row("pi-option-foreign", lambda c: lambda: PIConfig("linear", 2.0, params=(("beta_fast", 8.0),)), ConfigError,
        r"'beta_fast' does not apply to rope_type 'linear'"),
    Row("pi-yarn-beta-negative", lambda c: lambda: c.wb.set_pi(PIConfig("yarn", 4.0, params=(("beta_fast", -1.0),))),
        ConfigError, r"'yarn' rejected these parameters"),
    Row("pi-yarn-attention-factor-nan", lambda c: lambda: c.wb.set_pi(PIConfig("yarn", 4.0, params=(("attention_factor", math.nan),))),
        ConfigError, r"non-finite"),
    Row("pi-llama3-low-freq-zero", lambda c: lambda: c.wb.set_pi(PIConfig("llama3", 4.0, params=(("low_freq_factor", 0.0),))),
        ConfigError, r"'llama3' rejected these parameters"),
    Row("pi-longrope-wrong-length", lambda c: lambda: c.wb.set_pi(PIConfig("longrope", 4.0, params=(("long_factor", (1.0, 2.0, 3.0)),))),
        ConfigError, r"long_factor needs one factor per RoPE pair \(8 for this model\), got 3"),
    Row("pi-rejected-after-dynamic", lambda c: after_dynamic(c, PIConfig("yarn", 4.0, params=(("beta_fast", -1.0),))),
        ConfigError, r"rejected these parameters"),
]
if not torch.cuda.is_available():
    ROWS.append(Row("cuda-without-gpu", lambda c: load(c.model_dir, device="cuda"), ModelError, r"no GPU is visible"))


def _broken_config(c: Ctx) -> Path:
    out = copy_model(c)
    (out / "config.json").write_text("{not json")
    return out


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _load_scales(path, wb):
    return lambda: load_scales(path, wb)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_with_its_message_and_changes_nothing(row, ctx, jobs):
    act = row.prepare(ctx)
    before = snapshot(ctx.wb, ctx.root, ctx.model_dir)
    with pytest.raises(row.error, match=row.phrase) as caught:
        act()
    assert type(caught.value).__module__ == "qroar.errors"
    assert snapshot(ctx.wb, ctx.root, ctx.model_dir) == before  # weights, config, settings, files, results
    # the app's worker shows the same message as a user error (not "a bug"), and the next job runs
    job = jobs.wait(jobs.submit("bad", "tester", lambda p, c: act()).id, 60)
    assert job.status == FAILED and re.search(row.phrase, job.error) and "bug" not in job.error
    again = jobs.wait(jobs.submit("probe", "tester", lambda p, c: probe(ctx.wb)).id, 60)
    assert again.status == DONE and again.result == before["nll"]


def test_catalogue_ids_are_unique_and_cover_every_error_class():
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert {r.error for r in ROWS} >= {ModelError, DataError, ConfigError, ScalesFileError, OutOfMemory}


def test_pickle_weights_load_when_allowed(ctx):
    loaded = models.load_model(str(pickle_only_dir(ctx)), allow_pickle=True)
    assert loaded.info.n_layers == 2


# ----------------------------------------------------------------------------- random settings (hypothesis)

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6))
ROPE_KEYS = sorted({k for keys in rope.EXTRA_KEYS.values() for k in keys} | {"low_freq_factor", "high_freq_factor"})


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def assert_documented(fn):
    """Run fn: a result passes through; only QroarError subclasses may be raised."""
    try:
        return fn()
    except QroarError:
        return None


@SETTLE
@given(rope_type=st.sampled_from((*rope.ROPE_TYPES, "xpos")), factor=NUMBERS,
       original=st.one_of(st.none(), st.integers(-4, 4096)),
       params=st.dictionaries(st.sampled_from(ROPE_KEYS), st.one_of(NUMBERS, st.lists(st.floats(0.5, 64), max_size=9)), max_size=3),
       seq_len=st.one_of(st.none(), st.integers(1, 4096)))
def test_random_pi_settings_give_finite_frequencies_or_a_documented_error(tiny, rope_type, factor, original, params, seq_len):
    pi = assert_documented(lambda: PIConfig(rope_type, factor, original, tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))))
    if pi is None:
        return
    f = assert_documented(lambda: rope.frequencies(tiny.config, pi, seq_len=seq_len))
    if f is not None:
        assert torch.isfinite(f.s).all() and (f.inv_freq > 0).all() and math.isfinite(f.attention_factor)
        assert PIConfig.from_dict(json.loads(json.dumps(pi.to_dict()))) == pi


@SETTLE
@given(bits=st.one_of(st.integers(-2, 20), st.floats(1, 9)), group_size=st.one_of(st.integers(-4, 130), st.just(2.5)),
       symmetric=st.booleans(), rows=st.integers(1, 6), cols=st.integers(1, 130), magnitude=st.integers(-20, 20),
       zeros=st.booleans(), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_random_quant_settings_give_a_bounded_finite_weight_or_a_documented_error(
        bits, group_size, symmetric, rows, cols, magnitude, zeros, seed, bf16):
    cfg = assert_documented(lambda: QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    if cfg is None:
        return
    w = torch.zeros(rows, cols) if zeros else torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10.0**magnitude
    w = w.to(torch.bfloat16) if bf16 else w
    out = assert_documented(lambda: fake_quant(w, cfg))
    if out is None:
        return
    assert out.shape == w.shape and out.dtype == w.dtype and torch.isfinite(out).all()
    if not cfg.is_identity:  # every value is within half a step of the widest grid any group can have
        step = 2 * w.float().abs().max() / (2 ** (cfg.bits - 1) - 1)
        assert (out.float() - w.float()).abs().max() <= 0.5 * step * (1 + 1e-2) + 1e-30


@SETTLE
@given(n_bands=st.one_of(st.integers(-2, 40), st.floats(0, 10), st.booleans()), align=st.sampled_from(("log", "yarn", "mel")),
       beta_fast=NUMBERS, beta_slow=NUMBERS, n_pairs=st.integers(1, 64), theta=st.floats(100, 1e7),
       context=st.integers(16, 1 << 17))
def test_random_band_settings_partition_the_pairs_or_raise_a_documented_error(n_bands, align, beta_fast, beta_slow,
                                                                              n_pairs, theta, context):
    cfg = BandConfig(n_bands, align, beta_fast, beta_slow)
    b = assert_documented(lambda: make_bands(n_pairs, cfg, theta, context))
    if b is not None:
        assert b.n_bands == n_bands and b.edges[0] == 0 and b.edges[-1] == n_pairs
        assert all(x < y for x, y in zip(b.edges, b.edges[1:]))
        assert BandConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture(scope="module")
def eval_wb(model_dir):
    return Workbench.open(model_dir, device="cpu", dtype="fp32")


@SETTLE
@given(lengths=st.lists(st.one_of(st.integers(-3, 90), st.floats(-1, 90)), max_size=3),
       stride=st.one_of(st.none(), st.integers(-1, 90)), max_windows=st.one_of(st.none(), st.integers(-1, 3)),
       batch=st.one_of(st.none(), st.integers(-1, 4)), loss_chunk=st.integers(-1, 200), add_bos=st.sampled_from((None, True, False, 1)),
       doc_lengths=st.lists(st.integers(0, 150), max_size=3), seed=st.integers(0, 99))
def test_random_eval_settings_give_finite_perplexity_or_a_documented_error(eval_wb, lengths, stride, max_windows, batch,
                                                                         loss_chunk, add_bos, doc_lengths, seed):
    cfg = assert_documented(lambda: EvalConfig(tuple(lengths), stride, max_windows, batch, loss_chunk, add_bos))
    if cfg is None:
        return
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 128, (n,), generator=g) for n in doc_lengths]
    res = assert_documented(lambda: evaluate(eval_wb.model, docs, cfg, tokenizer=eval_wb.tokenizer))
    if res is None:
        return
    assert not res.table.empty and res.table[["nll", "ppl"]].map(math.isfinite).all().all()
    assert (res.table.ppl >= 1).all() and (res.summary.tokens > 0).all()
    assert res.table.tokens.sum() == res.summary.tokens.sum()
    assert EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.fixture(scope="module")
def scale_wb(model_dir):
    wb = Workbench.open(model_dir, device="cpu", dtype="fp32")
    wb.set_quant(RTN)
    wb.set_bands(BandConfig(n_bands=4))
    return wb


@SETTLE
@given(scales=st.one_of(st.lists(st.one_of(NUMBERS, st.floats(1e-30, 1e30)), min_size=0, max_size=6),
                        st.text(max_size=4), st.lists(st.lists(st.floats(0.5, 2), max_size=2), max_size=3)),
       mode=st.sampled_from(("shared", "symmetric")), order=st.sampled_from(("before", "after")))
def test_random_scales_rescale_to_a_finite_model_or_raise_a_documented_error(scale_wb, scales, mode, order):
    ok = assert_documented(lambda: check_scales(scales, 4))
    if ok is not None:
        assert ok.numel() == 4 and torch.isfinite(ok).all() and (ok > 0).all()
    before = model_hash(scale_wb)
    try:
        scale_wb.set_scales(scales, ScaleConfig(mode, order))
    except QroarError:
        assert model_hash(scale_wb) == before  # a refused scale leaves the weights as they were
        return
    try:
        table = scale_wb.evaluate(PROBE_DOCS, EvalConfig(lengths=(32,), max_windows_per_doc=1), "quant_scaled").table
        assert table.nll.map(math.isfinite).all()
    except ConfigError as e:  # scales so far from 1 that the logits overflow fp32: said so, never a NaN
        assert "not finite" in str(e)
    finally:
        scale_wb.set_scales(None)
    assert model_hash(scale_wb) == before  # removing the scales restores the weights exactly
