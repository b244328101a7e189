"""Text corpora: the embedded long-document corpus, local text files, Hugging Face datasets.

A corpus spec string picks one (`load_corpus`):
  "embedded"                      every embedded document (assets/corpus/manifest.json)
  "embedded:dev" / "embedded:heldout"  one split; "embedded:heldout:prose,math" also picks roles
  "path/to/file.txt" or a folder  a text file, or every .txt/.md file under a folder
  "hf:name[:config[:split[:field]]]"  a Hugging Face dataset (needs `datasets` and its hub)

Documents are tokenized without special tokens; BOS handling belongs to the perplexity engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qroar.errors import DataError

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
CORPUS_ENV = "QROAR_CORPUS_DIR"  # overrides EMBEDDED_DIR, e.g. for an installed package
SPLITS = ("dev", "heldout")
ROLES = ("prose", "gov", "math")
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    role: str    # prose | gov | math for the embedded corpus, "user" otherwise
    split: str   # dev | heldout for the embedded corpus, "all" otherwise
    source: str  # where the text came from (package and version, file path, dataset)


# ----------------------------------------------------------------------------- embedded corpus

def embedded_dir(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(CORPUS_ENV) or EMBEDDED_DIR)


def load_manifest(root: str | Path | None = None) -> list[dict]:
    path = embedded_dir(root) / "manifest.json"
    if not path.is_file():
        raise DataError(f"The embedded corpus manifest {path} is missing. Rebuild it with "
                        f"`python scripts/build_corpus.py`, or point {CORPUS_ENV} at a corpus folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))["documents"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{path} is not a valid corpus manifest ({e}); rebuild it with "
                        "`python scripts/build_corpus.py`.") from e


def load_embedded(split: str | None = None, roles=None, root: str | Path | None = None) -> list[Document]:
    """Embedded documents of one split (None: both) and the given roles (None: all)."""
    if split not in (None, *SPLITS):
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)} (or none for both).")
    roles = [roles] if isinstance(roles, str) else roles
    bad = sorted(set(roles or ()) - set(ROLES))
    if bad:
        raise DataError(f"Unknown role(s) {', '.join(bad)}; use any of {', '.join(ROLES)}.")
    folder, docs = embedded_dir(root), []
    for entry in load_manifest(root):
        if (split and entry["split"] != split) or (roles and entry["role"] not in roles):
            continue
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"Embedded document {path} is missing; rebuild with `python scripts/build_corpus.py`.")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise DataError(f"Embedded document {path} does not match its manifest checksum (edited or "
                            "truncated?); rebuild with `python scripts/build_corpus.py`.")
        src = entry["source"]
        docs.append(Document(entry["id"], raw.decode("utf-8"), entry["role"], entry["split"],
                             f"{src['package']} {src['version']}"))
    return docs


# ----------------------------------------------------------------------------- local files

def read_text_file(path: str | Path) -> str:
    """UTF-8 text of one file, or a DataError that says what is wrong with it and what to do."""
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; give a file with some text in it.")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} looks binary (NUL byte at offset {nul}); give a plain-text file "
                        "(.txt or .md), not a PDF, archive or model file.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} cannot be "
                        f"decoded. Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}`.") from e


def load_path(path: str | Path) -> list[Document]:
    """One document per file: a single text file, or every .txt/.md file under a folder (sorted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"No such file or folder: {path}. Give a .txt/.md file, a folder of them, "
                        "'embedded', or 'hf:<dataset>'.")
    if path.is_file():
        return [Document(path.stem, read_text_file(path), "user", "all", str(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"Folder {path} has no .txt or .md files; put the documents there as UTF-8 text files.")
    return [Document(str(p.relative_to(path).with_suffix("")), read_text_file(p), "user", "all", str(p))
            for p in files]


# ----------------------------------------------------------------------------- Hugging Face datasets

def load_hf(name: str, config: str | None = None, split: str = "test", field: str = "text",
            limit: int | None = None) -> list[Document]:
    """Rows of a Hugging Face dataset split, one document per non-empty `field` value."""
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError as e:
        raise DataError("Loading a Hugging Face dataset needs the `datasets` package: "
                        "`pip install 'qroar[datasets]'`, or save the text to files and pass their path.") from e
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the hub raises many types (connection, not found, bad config): all mean "unreachable"
        raise DataError(f"Could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(e).__name__}: {str(e)[:300]}. Check the name, config and split, and that the "
                        "hub is reachable; offline, save the text to files and pass their path.") from e
    if field not in rows.column_names:
        raise DataError(f"Dataset {name!r} has no field {field!r}; its fields are {', '.join(rows.column_names)}. "
                        f"Use hf:{name}:{config or ''}:{split}:<field>.")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    docs = [Document(f"{name}:{split}:{i}", text, "user", split, f"hf:{name}")
            for i, text in enumerate(rows[field]) if isinstance(text, str) and text.strip()]
    if not docs:
        raise DataError(f"Dataset {name!r} split {split!r} has no non-empty {field!r} text.")
    return docs


# ----------------------------------------------------------------------------- specs and tokens

def load_corpus(spec: str) -> list[Document]:
    """Documents named by a spec string (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise DataError("Empty corpus spec; use 'embedded', 'embedded:dev', 'embedded:heldout', a path, or 'hf:<name>'.")
    head, _, rest = spec.partition(":")
    if head == "embedded":
        split, _, roles = rest.partition(":")
        return load_embedded(None if split in ("", "all") else split,
                             [r for r in roles.split(",") if r] or None)
    if head == "hf":
        parts = rest.split(":")
        if not parts[0]:
            raise DataError("Give a dataset name: hf:name[:config[:split[:field]]].")
        if len(parts) > 4:
            raise DataError(f"Too many ':' in {spec!r}; the form is hf:name[:config[:split[:field]]].")
        name, config, split, field = parts + [""] * (4 - len(parts))
        return load_hf(name, config or None, split or "test", field or "text")
    return load_path(spec)


_TOKENS: dict[tuple[str, str], torch.LongTensor] = {}  # (tokenizer, text) digests -> ids
_TOKENS_MAX = 256  # documents kept; a corpus of ~60K-token documents is a few MB


def _tokenizer_key(tokenizer) -> str | None:
    """A digest of a `tokenizers` tokenizer's whole definition; None for others (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    return hashlib.sha256(to_str().encode()).hexdigest() if callable(to_str) else None


def tokenize(docs: list[Document], tokenizer) -> list[torch.LongTensor]:
    """Token ids of each document, without special tokens (no BOS/EOS).

    Cached per (tokenizer definition, text): the CLI's checks tokenize a corpus before the model
    loads (qroar.preflight), and the run that follows gets the same ids without tokenizing again."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # HF fast tokenizers: skip the length warning
    key = _tokenizer_key(tokenizer)
    out = []
    for doc in docs:
        k = (key, hashlib.sha256(doc.text.encode()).hexdigest()) if key else None
        if k in _TOKENS:
            out.append(_TOKENS[k].clone())
            continue
        if backend is not None:
            ids = backend.encode(doc.text, add_special_tokens=False).ids
        else:
            ids = tokenizer.encode(doc.text, add_special_tokens=False)
            ids = getattr(ids, "ids", ids)  # a bare `tokenizers.Tokenizer` returns an Encoding
        out.append(torch.tensor(ids, dtype=torch.long))
        if k:
            if len(_TOKENS) >= _TOKENS_MAX:
                del _TOKENS[next(iter(_TOKENS))]
            _TOKENS[k] = out[-1].clone()
    return out


def check_lengths(doc_ids: list[str], token_lists, lengths: list[int], bos: bool = False) -> dict[int, list[str]]:
    """Map each context length to the documents too short for one window of it.

    A window of L positions needs L document tokens (L-1 when the engine prepends BOS). Raises
    DataError when, for some length, no document is long enough.
    """
    if len(doc_ids) != len(token_lists):
        raise DataError(f"{len(doc_ids)} document ids for {len(token_lists)} token lists.")
    if not token_lists:
        raise DataError("The corpus has no documents.")
    sizes = [len(t) for t in token_lists]
    longest = max(range(len(sizes)), key=sizes.__getitem__)
    short = {}
    for L in lengths:
        need = L - 1 if bos else L
        short[L] = [d for d, n in zip(doc_ids, sizes) if n < need]
        if len(short[L]) == len(doc_ids):
            raise DataError(f"No document is long enough for context length {L} (needs {need} tokens); the "
                            f"longest, {doc_ids[longest]!r}, has {sizes[longest]} tokens. Use a shorter length "
                            "or longer documents.")
    return short
