"""Sampling intervals: the estimators (qroar.stats) by hand, perplexity's per-window sums and intervals,
and each document's own TIR in the tail capture."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_llama
from qroar import capture, rope
from qroar.bands import BandConfig, bands_for, proj_rows
from qroar.models import attention_layers
from qroar.perplexity import EvalConfig, evaluate, log_ppl_interval, paired_change
from qroar.stats import half_width, paired_interval, ratio_interval, t95


def test_t95_matches_students_t():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30, 31, 45, 100, 1000):
        assert t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)
    assert math.isnan(t95(0))


def test_ratio_interval_known_by_hand():
    r, se, n = ratio_interval([2.0, 4.0], [1, 1])  # residuals -1, +1: se = sqrt(2 / 1 * 2) / 2
    assert (r, se, n) == (3.0, 1.0, 2)
    assert half_width(se, n) == pytest.approx(12.706)
    assert math.isnan(ratio_interval([5.0], [2])[1])  # one unit: no spread to measure
    d, se, n = paired_interval([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [1, 1, 1])
    assert d == pytest.approx(0.5) and se == pytest.approx(0.0)  # the shared part cancels


def _docs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (n,), generator=g) for n in (70, 50, 33)]


def test_evaluate_keeps_each_windows_sums_and_they_add_up(llama):
    res = evaluate(llama, _docs(), EvalConfig(lengths=(16, 32), add_bos=False))
    t = res.table
    for r in t.itertuples():
        assert len(r.window_nll) == len(r.window_tokens) == r.windows
        assert sum(r.window_nll) == pytest.approx(r.nll) and sum(r.window_tokens) == r.tokens
    iv = log_ppl_interval(t)
    assert iv["log_ppl"].tolist() == pytest.approx(res.summary["log_ppl"].tolist())
    assert iv["windows"].tolist() == res.summary["windows"].tolist()
    x = [x for r in t[t.length == 16].itertuples() for x in r.window_nll]
    n = [x for r in t[t.length == 16].itertuples() for x in r.window_tokens]
    r16, se16, _ = ratio_interval(x, n)
    row = iv[iv.length == 16].iloc[0]
    assert row.se_log_ppl == pytest.approx(se16) and se16 > 0
    assert row.ppl_lo < math.exp(r16) < row.ppl_hi
    assert row.ppl_hi == pytest.approx(math.exp(r16 + t95(len(x) - 1) * se16))


def test_one_window_gives_no_interval_rather_than_an_invented_one(llama):
    res = evaluate(llama, _docs()[:1], EvalConfig(lengths=(64,), add_bos=False))
    iv = log_ppl_interval(res.table)
    assert iv["windows"].tolist() == [1] and math.isnan(iv["se_log_ppl"].iloc[0]) and math.isnan(iv["ppl_lo"].iloc[0])


def test_paired_change_is_exact_zero_against_itself_and_pairs_the_same_windows(llama):
    cfg = EvalConfig(lengths=(16,), add_bos=False)
    base = evaluate(llama, _docs(), cfg).table
    same = paired_change(base, base).iloc[0]
    assert same.change_pct == 0 and same.half_width == 0
    with torch.no_grad():
        other_model = tiny_llama()
        other_model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    other = evaluate(other_model, _docs(), cfg).table
    ch = paired_change(base, other).iloc[0]
    pooled = 100 * (other.nll.sum() / other.tokens.sum() - base.nll.sum() / base.tokens.sum())
    assert ch.change_pct == pytest.approx(100 * (math.exp(pooled / 100) - 1))
    assert ch.change_lo_pct < ch.change_pct < ch.change_hi_pct and ch.windows == base.windows.sum()
    # the paired interval is narrower than the two unpaired ones side by side: the text both share cancels
    a, b = log_ppl_interval(base).iloc[0], log_ppl_interval(other).iloc[0]
    assert ch.half_width < math.hypot(a.half_width, b.half_width)
    # windows that differ between the two tables are not paired
    assert paired_change(base, evaluate(llama, _docs()[:2], cfg).table).empty


def test_tables_without_window_sums_give_empty_intervals():
    old = pd.DataFrame(dict(doc=[0], length=[16], windows=[2], tokens=[30], nll=[60.0], ppl=[math.exp(2)]))
    assert log_ppl_interval(old).empty and paired_change(old, old).empty


# ----------------------------------------------------------------------------- the capture


def test_capture_reports_each_documents_tir_spread_and_keeps_the_pooled_quantile():
    model = tiny_llama()
    layers = attention_layers(model)
    bands = bands_for(rope.frequencies(model.config), BandConfig(4))
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 128, (1, 160), generator=g) for _ in range(3)]
    trained, eps = 64, 0.01
    cap = capture.TailCapture(layers, bands, trained, 160, len(docs), eps, chunk_tokens=50)
    outs = []
    hook = layers[1].q_lin.register_forward_hook(lambda m, a, o: outs.append(o.detach()[0]))
    with torch.no_grad(), cap.attached(model):
        for ids in docs:
            model.model(input_ids=ids)
    hook.remove()
    t = cap.table().set_index(["kind", "layer", "proj", "band"])
    for b, r in enumerate(bands.ranges()):
        rows = proj_rows(r, 16, 16, 4)
        v = [o[:, rows].abs().numpy() for o in outs]  # per document (160, rows)
        q = lambda x: float(np.quantile(x.ravel(), 1 - eps, method="inverted_cdf"))  # noqa: E731
        per_doc = [math.log(q(x[trained:]) / q(x[:trained])) for x in v]
        pooled = q(np.concatenate([x[trained:] for x in v])) / q(np.concatenate([x[:trained] for x in v]))
        row = t.loc[("W", 1, "q", b)]
        assert row.tir == pytest.approx(pooled, rel=1e-6)
        assert row.docs == 3 and row.tokens_short == 3 * trained and row.tokens_long == 3 * (160 - trained)
        assert row.tir_se_log == pytest.approx(np.std(per_doc, ddof=1) / math.sqrt(3), rel=1e-5)
