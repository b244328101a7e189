"""Corpus loading: embedded manifest integrity, training-corpus disjointness, loaders, bad input."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qroar import data
from qroar.data import Document, check_lengths, load_corpus, load_embedded, load_path, tokenize
from qroar.errors import DataError

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "assets" / "corpus"
TRAIN = REPO / "data" / "train"


# ----------------------------------------------------------------------------- embedded corpus

@pytest.fixture(scope="module")
def manifest():
    return json.loads((CORPUS / "manifest.json").read_text())["documents"]


def test_manifest_documents_are_long_utf8_and_match_their_checksums(manifest):
    for m in manifest:
        raw = (CORPUS / m["file"]).read_bytes()
        assert len(raw) == m["bytes"] >= 100_000, m["id"]
        assert hashlib.sha256(raw).hexdigest() == m["sha256"], m["id"]
        raw.decode("utf-8")
        assert m["source"]["package"] and m["source"]["version"] and m["licence"]
    assert len({m["id"] for m in manifest}) == len(manifest)


def test_every_role_has_two_dev_and_two_heldout_documents(manifest):
    for role in data.ROLES:
        for split in data.SPLITS:
            assert sum(m["role"] == role and m["split"] == split for m in manifest) >= 2, (role, split)
    total = sum(m["bytes"] for m in manifest)
    assert 2_000_000 < total < 6_000_000


def test_licences_name_every_source_package(manifest):
    text = (CORPUS / "LICENSES.md").read_text()
    for pkg in {m["source"]["package"] for m in manifest}:
        assert f"## {pkg} " in text


def test_load_embedded_filters_by_split_and_role(manifest):
    dev = load_embedded("dev")
    held = load_embedded("heldout", roles=["prose", "math"])
    assert {d.split for d in dev} == {"dev"} and {d.role for d in dev} == set(data.ROLES)
    assert {d.role for d in held} == {"prose", "math"}
    assert len(load_embedded()) == len(manifest)
    assert [d.id for d in load_corpus("embedded:heldout:prose,math")] == [d.id for d in held]
    assert [d.id for d in load_corpus("embedded:dev")] == [d.id for d in dev]
    by_id = {m["id"]: m for m in manifest}
    for d in dev:
        assert hashlib.sha256(d.text.encode()).hexdigest() == by_id[d.id]["sha256"]


def test_load_embedded_rejects_unknown_split_role_and_edited_files(tmp_path, manifest):
    with pytest.raises(DataError, match="Unknown split"):
        load_embedded("test")
    with pytest.raises(DataError, match="Unknown role"):
        load_embedded(roles=["poetry"])
    with pytest.raises(DataError, match="build_corpus.py"):
        load_embedded(root=tmp_path)
    m = manifest[0]
    (tmp_path / "manifest.json").write_text(json.dumps({"documents": [m]}))
    (tmp_path / m["file"]).write_bytes((CORPUS / m["file"]).read_bytes()[:-1])
    with pytest.raises(DataError, match="checksum"):
        load_embedded(root=tmp_path)


def _paragraph_keys(text):
    """Whitespace-normalised blank-line-separated blocks of at least 64 characters."""
    blocks = (" ".join(b.split()) for b in re.split(r"\n\s*\n", text))
    return {hashlib.sha1(b.encode()).digest() for b in blocks if len(b) >= 64}


@pytest.mark.skipif(not (TRAIN / "manifest.json").exists(), reason="no training corpus built")
def test_training_corpus_shares_no_paragraph_with_evaluation_documents(manifest):
    tm = json.loads((TRAIN / "manifest.json").read_text())
    assert set(tm["excluded_evaluation_documents"]) == {m["id"] for m in manifest}
    evals = set().union(*(_paragraph_keys((CORPUS / m["file"]).read_text()) for m in manifest))
    assert len(evals) > 5000
    for f in tm["files"]:
        path = TRAIN / f["file"]
        assert path.stat().st_size == f["bytes"]
        overlap = evals & _paragraph_keys(path.read_text(encoding="utf-8"))
        assert not overlap, f"{f['file']} repeats {len(overlap)} evaluation paragraphs"


# ----------------------------------------------------------------------------- local files

def test_load_path_reads_a_file_and_a_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# first\n\nnaïve café\n")
    (tmp_path / "skip.json").write_text("{}")
    (tmp_path / ".hidden.txt").write_text("not loaded")
    docs = load_path(tmp_path)
    assert [d.id for d in docs] == ["b", "sub/a"]
    assert docs[1].text == "# first\n\nnaïve café\n"
    one = load_corpus(str(tmp_path / "b.txt"))
    assert one == [Document("b", "second document\n", "user", "all", str(tmp_path / "b.txt"))]


def test_load_path_strips_a_utf8_byte_order_mark(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert load_path(tmp_path / "bom.txt")[0].text == "hello"


@pytest.mark.parametrize("content, message", [
    (b"", r"empty; give a file with some text"),
    (b" \n\t\n", r"empty"),
    (b"text\x00\x01more", r"looks binary \(NUL byte at offset 4\)"),
    (b"caf\xe9 au lait", r"not UTF-8 text: byte 0xe9 at offset 3.*Re-encode it as UTF-8"),
])
def test_bad_text_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_path(path)
    assert "doc.txt" in str(err.value)


def test_missing_path_and_folder_without_text_files(tmp_path):
    with pytest.raises(DataError, match="No such file or folder.*embedded"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="has no .txt or .md files"):
        load_path(tmp_path)


def test_bad_file_inside_a_folder_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="bad.txt.*offset 0"):
        load_path(tmp_path)


# ----------------------------------------------------------------------------- Hugging Face

def test_hf_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_hf_spec_parsing_passes_name_config_split_field(monkeypatch):
    seen = {}
    monkeypatch.setattr(data, "load_hf", lambda *a: seen.setdefault("args", a) and [])
    load_corpus("hf:org/name:cfg:validation:body")
    assert seen["args"] == ("org/name", "cfg", "validation", "body")
    seen.clear()
    load_corpus("hf:org/name")
    assert seen["args"] == ("org/name", None, "test", "text")
    with pytest.raises(DataError, match="hf:name"):
        load_corpus("hf:a:b:c:d:e")


def test_hf_unreachable_dataset_and_local_dataset_in_offline_mode(tmp_path):
    # A fresh interpreter, so the offline switches are read when `datasets` is imported.
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text('{"text": "alpha beta"}\n{"text": ""}\n{"text": "gamma"}\n')
    script = f"""
from qroar import data
from qroar.errors import DataError
try:
    data.load_hf("surely-not/a-dataset-that-exists")
except DataError as e:
    print("ERR1", e)
print("DOCS", [d.text for d in data.load_hf({str(tmp_path / "ds")!r}, split="test")])
try:
    data.load_hf({str(tmp_path / "ds")!r}, split="test", field="body")
except DataError as e:
    print("ERR2", e)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120).stdout
    assert re.search(r"ERR1 Could not load Hugging Face dataset 'surely-not/a-dataset-that-exists'.*"
                     r"save the text to files", out), out
    assert "DOCS ['alpha beta', 'gamma']" in out
    assert "ERR2 Dataset" in out and "no field 'body'; its fields are text" in out


# ----------------------------------------------------------------------------- tokens and lengths

@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level `tokenizers` tokenizer with a [BOS] special token that must not appear."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[BOS]": 1, "the": 2, "cat": 3, "sat": 4, ".": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return tok


def test_tokenize_adds_no_special_tokens(word_tokenizer):
    docs = [Document("a", "the cat sat .", "user", "all", "x"), Document("b", "cat dog", "user", "all", "x")]
    assert word_tokenizer.encode("the").ids == [1, 2]  # the post-processor would add BOS
    out = tokenize(docs, word_tokenizer)
    assert [t.tolist() for t in out] == [[2, 3, 4, 5], [3, 0]]
    assert all(t.dtype == torch.long for t in out)


def test_tokenize_with_a_transformers_tokenizer_matches_plain_encode(word_tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer, bos_token="[BOS]", unk_token="[UNK]")
    doc = Document("a", "the cat . " * 50, "user", "all", "x")
    (ids,) = tokenize([doc], hf)
    assert ids.tolist() == hf.encode(doc.text, add_special_tokens=False) == [2, 3, 5] * 50


def test_check_lengths_lists_short_docs_and_raises_naming_the_longest():
    toks = [torch.zeros(100, dtype=torch.long), torch.zeros(300, dtype=torch.long)]
    assert check_lengths(["a", "b"], toks, [64, 128, 300]) == {64: [], 128: ["a"], 300: ["a"]}
    assert check_lengths(["a", "b"], toks, [301], bos=True) == {301: ["a"]}  # BOS fills one position
    with pytest.raises(DataError, match=r"context length 512.*'b', has 300 tokens"):
        check_lengths(["a", "b"], toks, [128, 512])
    with pytest.raises(DataError, match="no documents"):
        check_lengths([], [], [128])
