"""Packed exports measured: file size against full precision, export time, perplexity of each reloaded file (stock
libraries, separate process) against qroar's in-memory PTQ + scales on the same window, rope settings read back.

    python bench/export_formats.py --model qroar-tiny --length 2048 --out results/export-formats-tiny
    python bench/export_formats.py --model smollm2-135m --length 2048 --out results/export-formats-smollm2

Prints a table and writes OUT.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qroar.export import export  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402

CASES = [("compressed-tensors", "ct", 4), ("compressed-tensors", "ct", 8), ("gguf", "gguf-q4_0", 4), ("gguf", "gguf-q8_0", 8)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qroar-tiny")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    wb = Workbench.open(a.model, device="cpu", dtype="fp32")
    n_bands = 8
    scales = [1.0 + 0.05 * ((-1) ** b) for b in range(n_bands)]  # a fixed, non-trivial set (shared mode)
    ids = wb.corpus("embedded:dev").tokens[0][:a.length].tolist()
    fp_bytes = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in wb.model.parameters()}.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.json"
        ids_path.write_text(json.dumps(ids))
        for fmt, method, bits in CASES:
            r = Recipe(pi=PIConfig("yarn", a.factor), scale=ScaleConfig("shared", "before")).set("quant.method", method)
            r = r.set("quant.bits", bits).set("quant.group_size", a.group).with_scales(scales)
            wb.apply(r)
            ours = float(wb.evaluate([torch.tensor(ids)], EvalConfig(lengths=(len(ids),), max_windows_per_doc=1,
                                                                      add_bos=False), "quant_scaled").table["ppl"].iloc[0])
            t0 = time.time()
            out = export(wb, fmt, Path(tmp) / f"{fmt}-{method}-{bits}")
            seconds = time.time() - t0
            size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".gguf"))
            res = subprocess.run([sys.executable, str(ROOT / "qroar" / "stock_reload.py"), str(out), "--tokens",
                                  str(ids_path)], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            got = json.loads(res.stdout.strip().splitlines()[-1])
            rp = got["rope_parameters"]
            rows.append({"model": a.model, "format": fmt, "quantizer": wb.quant_cfg.describe(), "weights_bytes": size,
                         "fp_bytes": fp_bytes, "ratio": size / fp_bytes, "export_s": round(seconds, 2),
                         "tokens": len(ids), "qroar_ppl": ours, "reloaded_ppl": got["ppl"],
                         "rel_diff": abs(got["ppl"] - ours) / ours,
                         "rope_read_back": {k: rp.get(k) for k in ("rope_type", "factor", "original_max_position_embeddings",
                                                                   "beta_fast", "beta_slow")},
                         "loader": got["loader"], "rope_from_gguf_reader": bool(got.get("rope_from_gguf_reader"))})
            print(f"{fmt:18s} {rows[-1]['quantizer']:18s} {size / 1e6:8.2f} MB / {fp_bytes / 1e6:.2f} MB FP "
                  f"({rows[-1]['ratio']:.0%})  export {seconds:5.1f} s  ppl qroar {ours:.4f}  reloaded {got['ppl']:.4f} "
                  f"(rel {rows[-1]['rel_diff']:.1e})  rope {rp.get('rope_type')} x{rp.get('factor')} "
                  f"orig {rp.get('original_max_position_embeddings')}", flush=True)
    if a.out:
        Path(a.out).with_suffix(".json").write_text(json.dumps({"model": a.model, "length": a.length, "pi": f"yarn x{a.factor}",
                                                               "scales": scales, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
