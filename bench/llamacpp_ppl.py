"""Opt-in: llama.cpp's perplexity of a qroar GGUF export, on the same token ids, against qroar's in-memory number.

Needs `llama_cpp` (llama-cpp-python; builds from source in about 6 minutes on 2 CPU cores: not part of the default
install or test run). llama.cpp reads the rope scaling from the file itself: no rope flags are passed.

    pip install llama-cpp-python==0.3.36
    python bench/llamacpp_ppl.py --model qroar-tiny --quant gguf-q8_0 --length 512 --out docs/results/llamacpp-ppl

Prints qroar's perplexity, llama.cpp's, and the rope metadata read back with gguf.GGUFReader; writes OUT.json.
"""

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qroar.export import export  # noqa: E402
from qroar.perplexity import EvalConfig  # noqa: E402
from qroar.recipe import Recipe  # noqa: E402
from qroar.rescale import ScaleConfig  # noqa: E402
from qroar.rope import PIConfig  # noqa: E402
from qroar.stock_reload import read_gguf_rope  # noqa: E402
from qroar.workbench import Workbench  # noqa: E402


def llamacpp_ppl(path: Path, ids: list[int]) -> float:
    """exp(mean next-token loss) from llama.cpp's logits for every position (logits_all), context = the window."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids), logits_all=True, verbose=False, n_batch=min(512, len(ids)))
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # (L, vocab)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return math.exp(nll.mean())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qroar-tiny")
    p.add_argument("--quant", default="gguf-q8_0")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable: pip install llama-cpp-python==0.3.36 (a source build, ~6 min on 2 cores)")
        return 0
    wb = Workbench.open(a.model, device="cpu", dtype="fp32")
    scales = [1.0 + 0.05 * ((-1) ** b) for b in range(8)]
    wb.apply(Recipe(pi=PIConfig("yarn", a.factor), scale=ScaleConfig("shared", "before"))
             .set("quant.method", a.quant).with_scales(scales))
    ids = wb.corpus("embedded:dev").tokens[0][:a.length].tolist()
    ours = float(wb.evaluate([torch.tensor(ids)], EvalConfig(lengths=(len(ids),), max_windows_per_doc=1, add_bos=False),
                             "quant_scaled").table["ppl"].iloc[0])
    with tempfile.TemporaryDirectory() as tmp:
        out = export(wb, "gguf", Path(tmp) / "g")
        theirs = llamacpp_ppl(out / "model.gguf", ids)
        keys = read_gguf_rope(out / "model.gguf")
    row = {"model": a.model, "quant": a.quant, "tokens": len(ids), "qroar_ppl": ours, "llamacpp_ppl": theirs,
           "rel_diff": abs(theirs - ours) / ours, "rope_keys": {k: str(v) for k, v in keys.items()}}
    print(json.dumps(row, indent=1))
    if a.out:
        Path(a.out).with_suffix(".json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
