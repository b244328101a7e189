"""Inputs a user gets wrong fail before the model loads (qroar.preflight), in seconds; a length too
long for every document is skipped with a warning; unknown model names never wait for the hub;
eval/apply default to a few windows per document and print their cost first."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_search import make_corpus

from qroar import data, models, preflight
from qroar.cli import build_parser, main
from qroar.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent
QUANT = ["--quant", "rtn", "--bits", "3", "--group-size", "32"]


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def no_load(monkeypatch):
    """The model's weights must never load (nor be quantized) in a test that uses this."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    from qroar import quant

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(quant, "quantize_model", refuse)


def run_fast(argv, capsys, limit=10.0):
    t = time.perf_counter()
    rc = main(argv)
    elapsed = time.perf_counter() - t
    out = capsys.readouterr()
    assert elapsed < limit, f"took {elapsed:.1f}s"
    return rc, out


@pytest.mark.parametrize("extra, message", [
    (["--corpus", "/no/such/corpus.txt", "--lengths", "32"], "error: No such file or folder: /no/such/corpus.txt"),
    (["--lengths", "100000,200000"], "error: Every length in --lengths (100000, 200000) is longer than every document"),
    (["--lengths", "32", "--group-size", "48"], "error: --group-size 48 does not divide the input width 64"),
    (["--lengths", "32,abc"], "error: --lengths expects comma-separated integers (e.g. 256,1024,2048), got '32,abc'."),
    (["--lengths", "32", "--max-windows", "-1"], "error: --max-windows must be a positive number"),
    (["--lengths", "32", "--stride", "40"], "error: stride must be an integer from 1 to 31"),
    (["--lengths", "32", "--quant", "gptq", "--calib", "/no/such/calib"], "error: No such file or folder: /no/such/calib"),
])
def test_bad_eval_input_fails_before_the_model_loads(tiny_dir, corpus, no_load, capsys, extra, message):
    argv = ["eval", "--model", tiny_dir, "--corpus", corpus["held"], *QUANT, "--quiet", *extra]
    rc, out = run_fast(argv, capsys)
    assert rc == 2 and out.err.startswith(message), out.err


def test_every_length_too_long_names_the_longest_document(tiny_dir, corpus, no_load, capsys):
    rc, out = run_fast(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "100000", *QUANT,
                        "--quiet"], capsys)
    sizes = [len(p.read_text()) for p in Path(corpus["held"]).glob("*.txt")]  # one token per character
    assert rc == 2 and f"has {max(sizes)} tokens. Use lengths up to {max(sizes)}" in out.err


def test_bad_group_size_on_the_embedded_model_names_the_widths(no_load, capsys):
    rc, out = run_fast(["eval", "--model", "qroar-tiny", "--group-size", "100", "--lengths", "256", "--quiet"], capsys)
    assert rc == 2 and "--group-size 100 does not divide the input width 384 of qroar-tiny" in out.err
    assert "group sizes that divide it: 16, 32, 64, 128" in out.err


def test_group_size_is_read_from_every_linear_width(tmp_path, no_load, capsys):
    """o_proj takes num_heads x head_dim (48 here, not the hidden size 64); down_proj intermediate_size."""
    from conftest import save_tiny, tiny_llama

    folder = save_tiny(tmp_path / "m", tiny_llama(head_dim=12, intermediate_size=96))
    spec = preflight.read_model(folder)
    assert [w for w, _ in spec.input_widths("linear")] == [64, 48, 96]
    assert [w for w, _ in spec.input_widths("qk")] == [64]
    with pytest.raises(Exception, match=r"input width 48 .*o_proj"):
        preflight.check_group_size(spec, 32, "linear")
    preflight.check_group_size(spec, 32, "qk")  # only q/k: the hidden size alone


def test_length_too_long_for_every_document_is_skipped_and_the_others_run(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "32,100000", *QUANT,
               "--max-windows", "1", "--quiet", "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    longest = max(Path(corpus["held"]).glob("*.txt"), key=lambda p: len(p.read_text()))
    assert (f"warning: skipping length 100000: the longest document of {corpus['held']}, {longest.stem!r}, "
            f"has {len(longest.read_text())} tokens") in text.err
    payload = json.loads(out.with_suffix(".json").read_text())
    assert {r["length"] for r in payload["summary"]} == {32} and payload["eval"]["lengths"] == [32]


def test_search_skips_a_length_and_its_weight(tiny_dir, corpus, no_load, capsys):
    a = build_parser().parse_args(["search", "--model", tiny_dir, "--dev-corpus", corpus["dev"], "--heldout-corpus",
                                   corpus["held"], *QUANT, "--lengths", "32,100000,64", "--length-weights", "1,2,3"])
    preflight.check(a, "search")
    assert a.lengths == "32,64" and a.length_weights == "1.0,3.0"
    out = capsys.readouterr()
    assert "warning: skipping length 100000" in out.err
    assert "plan: search, at most 55 evaluations" in out.out  # 1 + 8 bands x 6 candidates, + fp, quant, scaled on dev and held-out


def test_diagnose_capture_length_too_long_fails_early(tiny_dir, corpus, no_load, capsys):
    rc, out = run_fast(["diagnose", "--model", tiny_dir, "--corpus", corpus["dev"], "--capture-length", "100000", *QUANT,
                        "--quiet"], capsys)
    assert rc == 2 and "error: Every length in --capture-length (100000)" in out.err


# ----------------------------------------------------------------------------- model names


def test_bare_unknown_name_fails_at_once_with_the_nearest_preset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    t = time.perf_counter()
    with pytest.raises(ModelError) as e:
        models.load_model("qroar-tinny")
    assert time.perf_counter() - t < 1.0
    assert "qroar-tinny is not a preset or a local folder. Did you mean qroar-tiny?" in str(e.value)
    assert "Presets: qroar-tiny, smollm2-135m" in str(e.value) and "owner/name" in str(e.value)


def test_hub_id_offline_and_not_cached_fails_without_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(models, "in_hub_cache", lambda repo: False)
    with pytest.raises(ModelError, match=r"someone/qroar-tiny is not a preset .* The hub is off \(TRANSFORMERS_OFFLINE\)"):
        models.resolve("someone/qroar-tiny")


def test_hub_id_online_says_what_it_is_before_trying_the_hub(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    asked = []

    def not_there(repo, filename, **k):
        asked.append((repo, filename))
        print("asked the hub", file=sys.stderr)
        raise OSError("404: repository not found")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_there)
    with pytest.raises(ModelError, match=r"Could not find someone/qroar-tiny on the hub .*Presets: qroar-tiny"):
        preflight.read_model("someone/qroar-tiny")
    err = capsys.readouterr().err
    assert asked == [("someone/qroar-tiny", "config.json")]
    assert err.index("note: someone/qroar-tiny is not a preset or a local folder") < err.index("asked the hub")


SUBPROCESS_LIMIT = 20  # a fresh interpreter imports torch first: seconds on a busy 2-core machine


def _cli(*args, **env):
    full = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qroar.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)
    return proc, time.perf_counter() - t


def test_cli_unknown_model_offline_errors_at_once_with_presets_and_suggestion():
    proc, elapsed = _cli("eval", "--model", "qroar-tinny", "--quiet", HF_HUB_OFFLINE="1")
    assert proc.returncode == 2 and elapsed < SUBPROCESS_LIMIT, (proc.returncode, elapsed, proc.stderr)
    assert proc.stderr.startswith("error: qroar-tinny is not a preset or a local folder. Did you mean qroar-tiny? "
                                  "Presets: qroar-tiny, smollm2-135m, random:llama2-7b")
    assert "Retrying" not in proc.stderr and "huggingface.co" not in proc.stderr


def test_cli_bad_group_size_fails_in_seconds(tiny_dir, corpus):
    proc, elapsed = _cli("eval", "--model", tiny_dir, "--corpus", corpus["held"], "--group-size", "48", "--lengths", "32")
    assert proc.returncode == 2 and elapsed < SUBPROCESS_LIMIT, (proc.returncode, elapsed, proc.stderr)
    assert proc.stderr.startswith("error: --group-size 48 does not divide the input width 64")
    assert "plan:" not in proc.stdout and "model " not in proc.stdout  # nothing was loaded


# ----------------------------------------------------------------------------- windows and the plan


def test_eval_and_apply_default_to_two_windows_per_document_and_zero_means_all(tiny_dir, corpus, tmp_path, capsys,
                                                                               one_thread):
    p = build_parser()
    assert p.parse_args(["eval"]).max_windows == 2 and p.parse_args(["apply", "s.json"]).max_windows == 2
    assert p.parse_args(["search"]).max_windows == 2
    out = tmp_path / "all"
    assert main(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "128", *QUANT,
                 "--max-windows", "0", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    sizes = {p.stem: len(p.read_text()) for p in Path(corpus["held"]).glob("*.txt")}
    assert {r["doc"]: r["windows"] for r in rows} == {d: n // 128 for d, n in sizes.items()}  # every window
    n = sum(n // 128 for n in sizes.values())
    assert f"plan: 2 variants on 2 documents of {corpus['held']}: 2 x ({n} x 128) windows x tokens = {2 * n * 128:,} tokens" in text


def test_plan_estimates_the_time_on_the_cpu(tiny_dir, corpus, capsys):
    a = build_parser().parse_args(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "32,64",
                                   *QUANT, "--device", "cpu"])
    preflight.check(a, "eval")
    line = capsys.readouterr().out
    assert line.startswith("plan: 2 variants on 2 documents") and "(4 x 32, 4 x 64)" in line and "on this CPU" in line
    assert a.max_windows == 2 and a.lengths == "32,64"


def test_plan_counts_the_variants_the_recipe_runs(tiny_dir, corpus, capsys):
    """eval runs fp, + quant with a quantizer, + quant_scaled with a quantizer and --scales (cli.cmd_eval)."""
    for extra, n in (([], "2 variants"), (["--bands", "4", "--scales", "1,1.1,0.9,1.2"], "3 variants"), (["--quant", "none"], "1 variant on")):
        a = build_parser().parse_args(["eval", "--model", tiny_dir, "--corpus", corpus["held"], "--lengths", "32",
                                       *QUANT, "--device", "cpu", *extra])
        preflight.check(a, "eval")
        assert capsys.readouterr().out.startswith(f"plan: {n}")


def test_scales_file_group_size_is_checked_before_apply_and_quantized_export(tiny_dir, corpus, tmp_path, monkeypatch,
                                                                              capsys):
    from qroar.bands import BandConfig
    from qroar.export import save_scales
    from qroar.quant import QuantConfig
    from qroar.recipe import Recipe
    from qroar.workbench import Workbench

    wb = Workbench.open(tiny_dir, device="cpu", dtype="fp32")
    wb.apply(Recipe(quant=QuantConfig(method="rtn", bits=3, group_size=32), bands=BandConfig(4), scales=(1.0, 1.1, 0.9, 1.2)))
    path = save_scales(tmp_path / "scales.json", wb)
    d = json.loads(path.read_text())
    d["quant"]["group_size"] = d["recipe"]["quant"]["group_size"] = 48  # 64 wide layers: no longer divides
    path.write_text(json.dumps(d))
    capsys.readouterr()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc, out = run_fast(["apply", str(path), "--corpus", corpus["held"], "--lengths", "32", "--quiet"], capsys)
    assert rc == 2 and out.err.startswith(f"error: {path}: group size 48 does not divide the input width 64"), out.err
    rc, out = run_fast(["export", str(path), "--format", "fake-quant", "--out", str(tmp_path / "ckpt")], capsys)
    assert rc == 2 and "group size 48 does not divide" in out.err
    a = build_parser().parse_args(["export", str(path), "--format", "hf", "--out", str(tmp_path / "ckpt")])
    preflight.check(a, "export")  # full precision: the quantizer is not used


def test_bos_rule_without_transformers_matches_the_engine(tiny_dir, tmp_path):
    """preflight reads tokenizer.json with `tokenizers` alone; its BOS decision is perplexity.needs_bos's."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from conftest import save_tiny, tiny_llama, tiny_tokenizer
    from qroar.perplexity import needs_bos

    with_bos = tmp_path / "bos"
    save_tiny(with_bos)
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(with_bos)
    model = tiny_llama()
    for folder in (tiny_dir, with_bos, models.EMBEDDED_MODEL):
        spec = preflight.read_model(str(folder))
        assert spec.bos == needs_bos(AutoTokenizer.from_pretrained(folder), model), folder
    assert preflight.read_model(str(with_bos)).bos


def test_tokens_are_cached_per_tokenizer_and_text():
    from tokenizers import Tokenizer

    class Counting:
        def __init__(self, tok):
            self.tok, self.calls = tok, 0

        def to_str(self):
            return self.tok.to_str()

        def encode(self, text, add_special_tokens=False):
            self.calls += 1
            return self.tok.encode(text, add_special_tokens=add_special_tokens)

    class Fast:  # what a transformers fast tokenizer exposes
        def __init__(self, backend):
            self.backend_tokenizer = backend

    raw = Tokenizer.from_file(str(models.EMBEDDED_MODEL / "tokenizer.json"))
    docs = [data.Document(f"d{i}", f"text number {i} for the cache " * 20, "user", "all", "test") for i in range(3)]
    first = Counting(raw)
    ids = data.tokenize(docs, Fast(first))
    again = Counting(raw)
    assert [t.tolist() for t in data.tokenize(docs, Fast(again))] == [t.tolist() for t in ids] and again.calls == 0
    assert first.calls == 3
    assert [t.tolist() for t in data.tokenize(docs, raw)] == [t.tolist() for t in ids]  # a bare Tokenizer: same key
