"""Passkey retrieval: prompts of exactly L tokens with the key at the asked depth for any tokenizer, a copying
model scores 1, reproducible trials, bad inputs refused before any work, the `qroar retrieval` command."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TEXT, save_char_tiny, save_tiny, tiny_tokenizer
from test_search import RTN, make_corpus

from qroar import retrieval
from qroar.errors import ConfigError, DataError
from qroar.rope import PIConfig
from qroar.workbench import Workbench

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "models" / "qroar-tiny"


def sentencepiece_like():
    """A BPE tokenizer with a Metaspace pre-tokenizer ("▁" word starts), digits merged by training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = [TEXT, " ".join(str(n) for n in range(10000, 10400)), retrieval.INTRO, retrieval.FILLER,
            *(k.lead + k.tail + k.question for k in retrieval.KEYS.values()), " ".join(retrieval.WORDS)]
    tok.train_from_iterator(text * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tokenizers():
    from transformers import AutoTokenizer

    yield "byte-level BPE merging digits (qroar-tiny)", AutoTokenizer.from_pretrained(str(TINY))
    yield "metaspace BPE merging digits", sentencepiece_like()
    yield "character BPE", tiny_tokenizer(128)


@pytest.mark.parametrize("kind", ["digits", "words"])
def test_the_key_sits_at_the_asked_depth_inside_exactly_L_tokens(kind):
    for name, tok in tokenizers():
        key = "70145" if kind == "digits" else "velvet anchor"
        hay = retrieval.filler_ids(tok, 4000)
        answer = retrieval.key_tokens(tok, retrieval.KEYS[kind], key)
        assert tok.decode(answer).strip() == key, name
        for L in (300, 420, 1000):
            for d in (0.0, 0.3, 0.5, 0.77, 1.0):
                for bos in (None, 1):
                    p = retrieval.build_prompt(tok, L, d, key, hay, kind, bos)
                    k = p.answer.numel()
                    assert p.ids.numel() == L, (name, L, d)
                    assert torch.equal(p.ids[p.key_start:p.key_start + k], p.answer), name
                    assert tok.decode(p.ids[p.key_start:p.key_start + k]).strip() == key
                    assert abs(p.insert - d * p.haystack) <= 0.5 and 0 <= p.insert <= p.haystack
                    assert (p.ids[0] == 1) == (bos is not None)
                    q = retrieval._encode(tok, retrieval.KEYS[kind].question)
                    assert p.ids[-len(q):].tolist() == q  # the prompt ends with the question
                    assert key in tok.decode(p.ids[p.needle_start:p.key_start + k + 4])
                    if d == 0.0:
                        assert p.needle_start == (bos is not None) + len(retrieval._encode(tok, retrieval.INTRO))
                    if d == 1.0:
                        assert p.needle_start + (p.key_start - p.needle_start) + k + len(
                            retrieval._encode(tok, retrieval.KEYS[kind].tail.format(key=key))) == L - len(q)


def test_a_tokenizer_that_merges_digits_gets_fewer_key_tokens_than_digits():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    ids = retrieval.key_tokens(tok, retrieval.KEYS["digits"], "71432")
    assert len(ids) < 5 and tok.decode(ids).strip() == "71432"


# ----------------------------------------------------------------------------- a model that copies perfectly


class CopyModel(torch.nn.Module):
    """Predicts, at each of the last `tail` positions, the token that followed the earlier position with the
    longest matching suffix (an ideal induction head); logits 30 on that token, 0 elsewhere."""

    def __init__(self, vocab: int, tail: int = 12):
        super().__init__()
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        self.head.weight.data = torch.eye(vocab)
        self.vocab, self.tail = vocab, tail
        self.config = SimpleNamespace(final_logit_softcapping=None, model_type="llama")

    def predict(self, ids: list[int], p: int) -> int:
        best, tok = 0, ids[p]
        for j in range(p - 1, -1, -1):
            m = 0
            while m <= j and ids[j - m] == ids[p - m]:
                m += 1
            if m > best:
                best, tok = m, ids[j + 1]
        return tok

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(*x.shape, self.vocab)
        for b in range(x.shape[0]):
            ids = x[b].tolist()
            for p in range(max(0, len(ids) - self.tail), len(ids)):
                h[b, p, self.predict(ids, p)] = 30.0
        return h

    def get_decoder(self):
        return lambda input_ids, use_cache=False: SimpleNamespace(last_hidden_state=self.hidden(input_ids))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        ids = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        return SimpleNamespace(logits=self.head(self.hidden(ids))[:, -1:], past_key_values=ids)


@pytest.mark.parametrize("kind,key", [("digits", "71432"), ("words", "copper lantern")])
def test_a_model_that_copies_perfectly_scores_one(kind, key):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    model = CopyModel(len(tok))
    prompts = [retrieval.build_prompt(tok, L, d, key, retrieval.filler_ids(tok, 400), kind)
               for L in (150, 200) for d in (0.0, 0.5, 1.0)]
    for s in retrieval.teacher_forced(model, prompts):
        assert s["token_acc"] == 1.0 and s["exact"] and s["key_prob"] > 0.999 and s["key_logprob"] <= 0
    p = prompts[2]
    text = tok.decode(retrieval.greedy(model, p.ids, p.answer.numel() + 2))
    assert retrieval.generated_match(text, key)


def test_generated_match():
    assert retrieval.generated_match(" 71432. Remember", "71432") and retrieval.generated_match("71432", "71432")
    assert not retrieval.generated_match(" 714329", "71432") and not retrieval.generated_match(" the 71432", "71432")
    assert retrieval.generated_match("  copper   lantern are", "copper lantern")


# ----------------------------------------------------------------------------- runs on a workbench


@pytest.fixture
def wb(tmp_path):
    w = Workbench.open(save_char_tiny(tmp_path / "m"), device="cpu", dtype="fp32")
    w.apply(w.recipe.with_pi(PIConfig("linear", 2.0)))
    w.set_quant(RTN)
    return w, make_corpus(tmp_path / "corpus", words=400)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_run_scores_every_cell_of_every_variant_and_rebuilds_its_prompts(wb):
    w, corpus = wb
    cfg = retrieval.RetrievalConfig(lengths=(260, 320), depths=(0.0, 0.5, 1.0), trials=2, corpus=corpus["held"],
                                    digits=4, generate=True)
    res = retrieval.run(w, cfg)
    s = res.summary
    assert len(s) == 2 * 2 * 3 and set(s["variant"]) == {"fp", "quant"} and (s["trials"] == 2).all()
    t = res.trials
    assert t["token_acc"].between(0, 1).all() and t["gen_exact"].isin([0.0, 1.0]).all()
    assert (t["key_logprob"] <= 0).all() and t["key"].str.fullmatch(r"[1-9]\d{3}").all()
    again = retrieval.run(w, cfg)
    cols = ["variant", "length", "depth", "trial", "key", "doc", "offset", "key_logprob"]
    assert again.trials[cols].equals(t[cols])  # fixed seeds: the same prompts and scores
    docs = list(zip(w.corpus(corpus["held"]).doc_ids, w.corpus(corpus["held"]).tokens))
    cells, prompts, bos = retrieval.plan_prompts(w, cfg)
    row = t.iloc[7].to_dict()  # any cell's prompt is rebuilt from its row
    p = retrieval.prompt_for(w.tokenizer, cfg, row, row["length"], row["depth"], docs, bos)
    i = next(i for i, (L, d, spec) in enumerate(cells) if (L, d, spec["trial"]) == (row["length"], row["depth"], row["trial"]))
    assert torch.equal(p.ids, prompts[i].ids) and p.key_start == row["key_start"]
    other = retrieval.run(w, retrieval.RetrievalConfig(**{**cfg.to_dict(), "lengths": (260, 320), "depths": (0.0, 0.5, 1.0),
                                                          "seed": 1, "generate": False}))
    assert list(other.trials["key"]) != list(t.query("variant == 'fp' or variant == 'quant'")["key"])
    ch = retrieval.paired_change(t, "quant", "fp")
    assert len(ch) == 6 and (ch["trials"] == 2).all()
    one = t.query("length == 260 and depth == 0.5")
    assert ch.query("length == 260 and depth == 0.5")["change"].iloc[0] == pytest.approx(
        one.query("variant == 'quant'")["key_logprob"].mean() - one.query("variant == 'fp'")["key_logprob"].mean())
    json.dumps(res.to_dict(), default=str)
    assert "teacher-forced key token accuracy" in retrieval.format_result(res)


def test_filler_haystack_and_word_keys(wb):
    w, _ = wb
    cfg = retrieval.RetrievalConfig(lengths=(320,), depths=(0.25,), trials=3, haystack="filler", key="words")
    res = retrieval.run(w, cfg, variants=("quant",))
    assert list(res.summary["variant"]) == ["quant"] and res.trials["doc"].isna().all()
    assert res.trials["key"].str.fullmatch(r"[a-z]+ [a-z]+").all()


def test_bad_inputs_are_refused_and_change_nothing(wb):
    w, corpus = wb
    tok = w.tokenizer
    hay = retrieval.filler_ids(tok, 2000)
    with pytest.raises(ConfigError, match="depth is a fraction"):
        retrieval.build_prompt(tok, 300, 1.5, "1234", hay)
    with pytest.raises(ConfigError, match="depth is a fraction"):
        retrieval.RetrievalConfig(depths=(0.0, -0.1))
    with pytest.raises(ConfigError, match="depth is a fraction"):
        retrieval.RetrievalConfig(depths=(float("nan"),))
    with pytest.raises(ConfigError, match="too long for length 200"):
        retrieval.build_prompt(tok, 200, 0.5, "7" * 60, hay)
    with pytest.raises(ConfigError, match="shorter than the question"):
        retrieval.build_prompt(tok, 20, 0.5, "1234", hay)
    with pytest.raises(DataError, match="haystack has"):
        retrieval.build_prompt(tok, 300, 0.5, "1234", hay[:10])
    with pytest.raises(ConfigError, match="Unknown key kind"):
        retrieval.RetrievalConfig(key="emoji")
    before, recipe = weights(w.model), w.recipe
    for cfg in (retrieval.RetrievalConfig(lengths=(20, 200), corpus=corpus["held"]),
                retrieval.RetrievalConfig(lengths=(200,), digits=64, corpus=corpus["held"])):
        with pytest.raises(ConfigError):
            retrieval.run(w, cfg)
    with pytest.raises(DataError, match="No document"):
        retrieval.run(w, retrieval.RetrievalConfig(lengths=(100000,), corpus=corpus["held"]))
    with pytest.raises(ConfigError, match="None of"):
        retrieval.run(w, retrieval.RetrievalConfig(lengths=(200,), corpus=corpus["held"]), variants=("quant_scaled",))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), weights(w.model).values())) and w.recipe == recipe


# ----------------------------------------------------------------------------- the command


def test_qroar_retrieval_command_on_the_embedded_model(tmp_path):
    exe = Path(sys.executable).parent / "qroar"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qroar.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ret"
    p = subprocess.run([*cmd, "retrieval", "--model", "qroar-tiny", "--device", "cpu", "--pi", "yarn", "--factor", "8",
                        "--quant", "rtn", "--bits", "3", "--group-size", "64", "--lengths", "128,300", "--depths", "0,1",
                        "--trials", "1", "--quiet", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "teacher-forced key token accuracy" in p.stdout
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["command"] == "retrieval" and len(d["summary"]) == 2 * 2 * 2 and len(d["trials"]) == 8
    assert {r["variant"] for r in d["summary"]} == {"fp", "quant"} and all(math.isnan(r["gen_exact"]) for r in d["summary"])
    assert out.with_suffix(".csv").read_text().startswith("variant,length,depth,seed,trial,key,doc,offset")
    bad = subprocess.run([*cmd, "retrieval", "--model", "qroar-tiny", "--depths", "0,2"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "error: A depth is a fraction" in bad.stderr
    short = subprocess.run([*cmd, "retrieval", "--model", "qroar-tiny", "--lengths", "30", "--quant", "none"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "shorter than the question" in short.stderr


def test_retrieval_inputs_are_checked_before_the_model_loads(capsys):
    from qroar.cli import main

    assert main(["retrieval", "--model", "qroar-tiny", "--lengths", "256,100000", "--quiet"]) == 2
    assert "needs a document that long" in capsys.readouterr().err
    assert main(["retrieval", "--model", "qroar-tiny", "--trials", "0", "--quiet"]) == 2
    assert "trials must be a positive integer" in capsys.readouterr().err
