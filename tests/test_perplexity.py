"""Perplexity engine: windows, chunked loss, evaluate(), memory guards, objective."""

import json
import math
import threading
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama, tiny_qwen2
from qroar import perplexity as P
from qroar.errors import Cancelled, ConfigError, DataError, OutOfMemory
from qroar.perplexity import EvalConfig, chunked_nll, evaluate, make_windows, needs_bos, weighted_objective


def docs(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def naive_nll(model, doc, L, bos=None, stride=None):
    """Independent reference: full logits, log_softmax, gather, by hand, window by window."""
    doc = doc.tolist()
    span = L - 1 if bos is not None else L
    step = stride or span
    total, tokens, start, first = 0.0, 0, 0, True
    while start + span <= len(doc):
        w = ([bos] if bos is not None else []) + doc[start:start + span]
        logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
        n_pred = L - 1 if first or stride is None else stride
        for p in range(L - 1 - n_pred, L - 1):
            total -= logp[p, w[p + 1]].item()
            tokens += 1
        start += step
        first = False
    return total, tokens


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("add_bos,stride", [(False, None), (True, None), (False, 10), (True, 7)])
def test_evaluate_matches_naive_full_logits(factory, add_bos, stride):
    model = factory()
    ds = docs(70, 33, 50)
    res = evaluate(model, ds, EvalConfig(lengths=(16, 32), add_bos=add_bos, stride=stride))
    bos = 1 if add_bos else None
    with torch.no_grad():
        for r in res.table.itertuples():
            nll, tokens = naive_nll(model, ds[r.doc], r.length, bos, stride)
            assert r.tokens == tokens
            assert r.nll == pytest.approx(nll, rel=1e-5)
            assert r.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    s = res.summary.set_index("length")
    for L in (16, 32):
        t = res.table[res.table.length == L]
        assert s.loc[L, "tokens"] == t.tokens.sum()
        assert s.loc[L, "ppl"] == pytest.approx(math.exp(t.nll.sum() / t.tokens.sum()))


def naive_prefix_nll(model, doc, Lf, L, bos=None, max_windows=None):
    """Independent reference for nested windows: windows of Lf tiling the document, each scored on
    its first L-1 predictions, from full logits of the L-token prefix alone."""
    doc = doc.tolist()
    span = Lf - 1 if bos is not None else Lf
    total, tokens, start, n = 0.0, 0, 0, 0
    while start + span <= len(doc) and (max_windows is None or n < max_windows):
        w = (([bos] if bos is not None else []) + doc[start:start + span])[:L]
        logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
        total -= sum(logp[p, w[p + 1]].item() for p in range(L - 1))
        tokens += L - 1
        start, n = start + span, n + 1
    return total, tokens


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("max_windows", [None, 1])
def test_nested_windows_equal_prefix_windows_scored_alone(llama, add_bos, max_windows):
    """One forward at the longest length a document fills scores every shorter length: each equals
    the prefix window evaluated on its own. The 40-token document fills 32 but not 64; the 20-token
    one fills only 16: it is skipped (and listed) at 32 and 64."""
    ds = docs(150, 40, 20)
    cfg = EvalConfig(lengths=(16, 32, 64), add_bos=add_bos, nested=True, max_windows_per_doc=max_windows, loss_chunk=7)
    res = evaluate(llama, ds, cfg)
    bos = 1 if add_bos else None
    need = lambda L: L - 1 if add_bos else L  # noqa: E731
    with torch.no_grad():
        for r in res.table.itertuples():
            top = max(L for L in (16, 32, 64) if len(ds[r.doc]) >= need(L))
            nll, tokens = naive_prefix_nll(llama, ds[r.doc], top, r.length, bos, max_windows)
            assert (r.tokens, r.nll) == (tokens, pytest.approx(nll, rel=1e-5))
    assert sorted(map(tuple, res.skipped[["doc", "length"]].values.tolist())) == [(1, 64), (2, 32), (2, 64)]
    assert set(res.table.doc[res.table.length == 16]) == {0, 1, 2}


def test_nested_one_window_per_doc_equals_separate_lengths(qwen2):
    """With one window per document, tiling and nesting pick the same text: identical results, from
    one forward per document instead of one per length."""
    ds = docs(70, 90)
    a = evaluate(qwen2, ds, EvalConfig(lengths=(8, 24, 64), max_windows_per_doc=1, add_bos=False))
    b = evaluate(qwen2, ds, EvalConfig(lengths=(8, 24, 64), max_windows_per_doc=1, add_bos=False, nested=True))
    pd.testing.assert_frame_equal(a.table[["doc", "length", "windows", "tokens"]], b.table[["doc", "length", "windows", "tokens"]])
    assert b.table.nll.tolist() == pytest.approx(a.table.nll.tolist(), rel=1e-5)
    calls = []
    hook = qwen2.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    try:
        evaluate(qwen2, ds, EvalConfig(lengths=(8, 24, 64), max_windows_per_doc=1, add_bos=False, nested=True, batch_size=1))
    finally:
        hook.remove()
    assert calls == [64, 64]


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 39, 40, 1000])
def test_chunked_nll_equals_model_loss_for_any_chunk(llama, chunk):
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    sums = chunked_nll(llama, ids, loss_chunk=chunk)
    with torch.no_grad():
        for b in range(3):
            ref = llama(ids[b:b + 1], labels=ids[b:b + 1]).loss.item() * 39
            assert sums[b].item() == pytest.approx(ref, rel=1e-5)


def test_chunked_nll_applies_gemma_final_logit_softcapping():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           final_logit_softcapping=2.0, sliding_window=8)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item() * 23
    assert chunked_nll(model, ids, loss_chunk=5)[0].item() == pytest.approx(ref, rel=1e-5)
    assert needs_bos(None, model)  # Gemma always gets BOS


def test_evaluate_in_bf16_and_under_inference_mode(llama):
    model = llama.to(torch.bfloat16)
    ids = docs(32)[0]
    with torch.inference_mode():
        res = evaluate(model, [ids], EvalConfig(lengths=(32,), add_bos=False))
        ref = model(ids[None], labels=ids[None]).loss.float().item()
    assert res.summary.log_ppl[0] == pytest.approx(ref, rel=1e-2)


# ----------------------------------------------------------------------------- windows


def test_windows_known_answer_with_and_without_bos():
    doc = torch.arange(10, 20)
    ids, scored = make_windows(doc, 4, bos=1)
    assert ids.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    assert scored.tolist() == [3, 3, 3]
    ids, scored = make_windows(doc, 4, bos=None)
    assert ids.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert scored.tolist() == [3, 3]
    ids, scored = make_windows(doc, 4, bos=None, stride=2)
    assert ids.tolist() == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17], [16, 17, 18, 19]]
    assert scored.tolist() == [3, 2, 2, 2]
    assert make_windows(doc, 4, bos=1, max_windows=2)[0].shape == (2, 4)


def test_evaluate_bos_counts_scored_tokens(llama):
    bos_tok = SimpleNamespace(bos_token_id=1, encode=lambda s: [1, 50])
    plain_tok = SimpleNamespace(bos_token_id=1, encode=lambda s: [50])
    d = docs(10)
    with_bos = evaluate(llama, d, EvalConfig(lengths=(4,)), tokenizer=bos_tok)
    without = evaluate(llama, d, EvalConfig(lengths=(4,)), tokenizer=plain_tok)
    assert with_bos.bos and not without.bos
    assert with_bos.table[["windows", "tokens"]].values.tolist() == [[3, 9]]
    assert without.table[["windows", "tokens"]].values.tolist() == [[2, 6]]


@pytest.mark.parametrize("n,L,stride,bos", [(50, 8, 3, None), (50, 8, 7, 1), (41, 16, 5, 1), (30, 5, 1, None)])
def test_sliding_window_scores_each_token_once(n, L, stride, bos):
    doc = torch.arange(100, 100 + n)  # token id = 100 + document position
    ids, scored = make_windows(doc, L, bos=bos, stride=stride)
    targets = []
    for w, k in zip(ids.tolist(), scored.tolist()):
        targets += w[L - k:]
    assert len(targets) == len(set(targets))
    first = 0 if bos is not None else 1
    assert targets == list(range(100 + first, 100 + first + len(targets)))  # contiguous, in order
    assert n - (first + len(targets)) < stride  # only a tail shorter than the stride is left unscored


def test_short_documents_are_reported_not_dropped(llama):
    res = evaluate(llama, docs(40, 10, 20), EvalConfig(lengths=(16, 32), add_bos=False), doc_ids=["a", "b", "c"])
    assert res.skipped.values.tolist() == [["b", 16, 10], ["b", 32, 10], ["c", 32, 20]]
    assert set(res.table.doc[res.table.length == 32]) == {"a"}
    with pytest.raises(DataError, match="shorter length"):
        evaluate(llama, docs(10), EvalConfig(lengths=(16,), add_bos=False))


def test_bad_documents_raise_data_error(llama):
    with pytest.raises(DataError, match="No documents"):
        evaluate(llama, [], EvalConfig(lengths=(8,)))
    with pytest.raises(DataError, match="vocabulary"):
        evaluate(llama, [torch.full((20,), 500)], EvalConfig(lengths=(8,)))
    with pytest.raises(DataError, match="1-D"):
        evaluate(llama, [torch.zeros(2, 20, dtype=torch.long)], EvalConfig(lengths=(8,)))


def test_needs_bos_rules():
    llama_model = SimpleNamespace(config=SimpleNamespace(model_type="llama", bos_token_id=1))
    gemma_model = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text", bos_token_id=2))
    adds = SimpleNamespace(bos_token_id=1, encode=lambda s: [1, 9])
    plain = SimpleNamespace(bos_token_id=1, encode=lambda s: [9])
    no_bos = SimpleNamespace(bos_token_id=None, encode=lambda s: [9])
    flag_only = SimpleNamespace(bos_token_id=1, add_bos_token=True)
    assert needs_bos(adds, llama_model) and not needs_bos(plain, llama_model)
    assert needs_bos(flag_only, llama_model)
    assert needs_bos(plain, gemma_model)
    assert not needs_bos(no_bos, gemma_model) and not needs_bos(no_bos, llama_model)
    assert not needs_bos(None, llama_model)


# ----------------------------------------------------------------------------- config and objective


@pytest.mark.parametrize("kw,msg", [
    (dict(lengths=()), "non-empty"),
    (dict(lengths=512), "non-empty"),
    (dict(lengths=(0,)), ">= 2"),
    (dict(lengths=(-8, 16)), ">= 2"),
    (dict(lengths=(16.5,)), ">= 2"),
    (dict(lengths=(True,)), ">= 2"),
    (dict(lengths=(16, 32), stride=16), "from 1 to 15"),
    (dict(lengths=(16,), stride=0), "from 1 to 15"),
    (dict(lengths=(16,), batch_size=0), "batch_size"),
    (dict(lengths=(16,), max_windows_per_doc=-1), "max_windows_per_doc"),
    (dict(lengths=(16,), loss_chunk=0), "loss_chunk"),
    (dict(lengths=(16,), add_bos="yes"), "add_bos"),
    (dict(lengths=(16, 32), stride=8, nested=True), "nested"),
])
def test_eval_config_validation_messages(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EvalConfig(**kw)


def test_eval_config_round_trips_through_json():
    cfg = EvalConfig(lengths=(4096, 1024), stride=512, max_windows_per_doc=3, batch_size=2, loss_chunk=256, add_bos=True)
    back = EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.lengths == (1024, 4096)
    nested = EvalConfig(lengths=(8, 16), nested=True)
    assert EvalConfig.from_dict(json.loads(json.dumps(nested.to_dict()))) == nested


def test_weighted_objective_known_answer():
    summary = pd.DataFrame({"length": [100, 300], "log_ppl": [2.0, 4.0]})
    assert weighted_objective(summary) == pytest.approx((100 * 2 + 300 * 4) / 400)
    assert weighted_objective(summary, {100: 1, 300: 1}) == pytest.approx(3.0)
    assert weighted_objective(summary, {100: 1, 300: 0, 50: 9}) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="missing"):
        weighted_objective(summary, {100: 1})
    with pytest.raises(ConfigError, match="not all zero"):
        weighted_objective(summary, {100: 0, 300: 0})


# ----------------------------------------------------------------------------- memory, progress, cancel


def _raise_oom_when(model, pred, exc):
    body = model.model
    orig = body.forward

    def forward(input_ids=None, **kw):
        if pred(input_ids):
            raise exc
        return orig(input_ids=input_ids, **kw)

    body.forward = forward
    return lambda: setattr(body, "forward", orig)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory")])
def test_out_of_memory_is_caught_and_explained(llama, exc):
    restore = _raise_oom_when(llama, lambda ids: True, exc)
    with pytest.raises(OutOfMemory, match=r"length 32 with batch 1.*try a length of at most about \d+ tokens"):
        evaluate(llama, docs(64), EvalConfig(lengths=(32,), add_bos=False))
    with pytest.raises(OutOfMemory, match="try batch size 1"):
        evaluate(llama, docs(64), EvalConfig(lengths=(32,), add_bos=False, batch_size=2))
    restore()
    assert len(evaluate(llama, docs(64), EvalConfig(lengths=(32,), add_bos=False)).table) == 1  # still usable


def test_other_runtime_errors_are_not_swallowed(llama):
    _raise_oom_when(llama, lambda ids: True, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(llama, docs(64), EvalConfig(lengths=(32,), add_bos=False))


def test_automatic_batch_halves_after_oom(llama, monkeypatch):
    ds = docs(130, 70)
    ref = evaluate(llama, ds, EvalConfig(lengths=(16,), add_bos=False, batch_size=1)).table
    monkeypatch.setattr(P, "auto_batch_size", lambda *a: 8)
    sizes = []
    _raise_oom_when(llama, lambda ids: sizes.append(len(ids)) or len(ids) > 2, torch.OutOfMemoryError("out of memory"))
    res = evaluate(llama, ds, EvalConfig(lengths=(16,), add_bos=False)).table
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2
    pd.testing.assert_frame_equal(res, ref, rtol=1e-5)


def test_batched_windows_equal_one_at_a_time(qwen2):
    ds = docs(100, 60, 45)
    one = evaluate(qwen2, ds, EvalConfig(lengths=(16,), batch_size=1, add_bos=True)).table
    many = evaluate(qwen2, ds, EvalConfig(lengths=(16,), batch_size=5, add_bos=True)).table
    pd.testing.assert_frame_equal(one, many, rtol=1e-5)


def test_memory_estimate_grows_and_check_fits_names_largest_length(llama, monkeypatch):
    est = P.estimate_eval_memory
    assert est(llama, 64, 1) < est(llama, 128, 1) < est(llama, 128, 2)
    sdpa = est(llama, 4096, 1)
    llama.config._attn_implementation = "eager"
    assert est(llama, 4096, 1) - sdpa >= 4 * 4096 * 4096 * 4  # eager holds (heads, L, L) scores
    llama.config._attn_implementation = "sdpa"

    budget = est(llama, 1000, 1)
    monkeypatch.setattr(P, "available_memory", lambda device: budget)
    P.check_fits(llama, 1000, 1)
    with pytest.raises(OutOfMemory, match=r"Length 4000 at batch 2 .* about 1000 tokens"):
        P.check_fits(llama, 4000, 2)
    with pytest.raises(OutOfMemory, match="about 1000 tokens"):  # evaluate checks before any forward
        evaluate(llama, docs(4000), EvalConfig(lengths=(4000,), add_bos=False))


def test_progress_reaches_one_and_cancel_stops(llama):
    seen = []
    evaluate(llama, docs(64, 48), EvalConfig(lengths=(8, 16), add_bos=False), progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 8 + 6 + 4 + 3

    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        evaluate(llama, docs(64), EvalConfig(lengths=(8,)), cancel=ev)

    ev = threading.Event()
    calls = []
    with pytest.raises(Cancelled):
        evaluate(llama, docs(64), EvalConfig(lengths=(8,)), cancel=ev,
                 progress=lambda f, m: (calls.append(f), ev.set()))
    assert len(calls) == 1


def test_auto_loss_chunk_known_values():
    from qroar.perplexity import auto_loss_chunk

    assert auto_loss_chunk(32000, "cpu") == 1024
    assert auto_loss_chunk(32000, "cuda") == 8192  # 2^28 / 32000 = 8388 -> 8192: fp32 logits ~1 GiB
    assert auto_loss_chunk(152064, "cuda") == 1024  # large vocabularies keep small chunks
    assert auto_loss_chunk(128, "cuda") == 16384


def test_head_loss_function_equals_cross_entropy_with_and_without_softcap():
    """The function QROAR_FUSED_LOSS compiles on a GPU is plain cross-entropy of the head's logits."""
    g = torch.Generator().manual_seed(0)
    h, W, b = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    y = torch.randint(0, 50, (9,), generator=g)
    ref = F.cross_entropy(h @ W.T + b, y, reduction="none")
    torch.testing.assert_close(P._head_loss(h, W, b, y, None), ref)
    capped = F.cross_entropy(torch.tanh((h @ W.T) / 3.0) * 3.0, y, reduction="none")
    torch.testing.assert_close(P._head_loss(h, W, None, y, 3.0), capped)


def test_fused_loss_setting_is_ignored_off_cuda(llama, monkeypatch):
    ds = docs(70)
    cfg = EvalConfig(lengths=(16,), add_bos=False)
    ref = evaluate(llama, ds, cfg).table.nll.tolist()
    monkeypatch.setenv(P.FUSED_LOSS_ENV, "1")
    assert evaluate(llama, ds, cfg).table.nll.tolist() == ref and not P._fused


def test_eval_result_log_ppl_equals_its_summary(llama):
    res = evaluate(llama, docs(70, 40), EvalConfig(lengths=(16, 32), add_bos=False))
    s = res.summary
    assert res.log_ppl() == pytest.approx(dict(zip(s["length"].tolist(), s["log_ppl"].tolist())), rel=1e-12)
    assert list(res.log_ppl()) == [16, 32]
