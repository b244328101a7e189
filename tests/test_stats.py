"""Sampling intervals: the estimators (qroar.stats) by hand, and each document's own TIR in the tail capture."""

import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from qroar import capture, rope
from qroar.bands import BandConfig, bands_for, proj_rows
from qroar.models import attention_layers
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
