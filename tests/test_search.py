"""Windows, candidates, the coordinate-descent search, its guard, honesty, k-fold, cancel and resume."""

import json
import math
import random
import re
import threading

import pandas as pd
import pytest
import torch
from conftest import TEXT, save_tiny

from qroar.bands import BandConfig
from qroar.errors import Cancelled, ConfigError
from qroar.perplexity import EvalConfig, weighted_objective
from qroar.quant import QuantConfig
from qroar.rope import PIConfig
from qroar.rescale import ScaleConfig
from qroar.search import SearchConfig, candidates, check_windows, derive_windows, search, search_budget, windows_for
from qroar.workbench import Workbench

RTN = QuantConfig(method="rtn", bits=3, group_size=32)
WINDOWS = [(0.7, 1.3), (0.8, 1.25), (0.85, 1.2), (0.9, 1.1)]


def make_corpus(root, n_dev=4, n_held=2, words=200):
    """Folders dev/ and held/ of pseudo-random prose over the test tokenizer's alphabet."""
    vocab = TEXT.split()
    out = {}
    for split, n in (("dev", n_dev), ("held", n_held)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = random.Random(f"{split}{i}")
            (folder / f"{split}{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))
        out[split] = str(folder)
    return out


@pytest.fixture
def setup(tmp_path):
    corpus = make_corpus(tmp_path)
    wb = Workbench.open(save_tiny(tmp_path / "m"), device="cpu", dtype="fp32")
    wb.set_pi(PIConfig("linear", 2.0))
    wb.set_quant(RTN)
    wb.set_bands(BandConfig(n_bands=4))
    return wb, corpus, tmp_path


def cfg_for(corpus, **kw):
    base = dict(n_candidates=5, lengths=(32, 96), dev_corpus=corpus["dev"], heldout_corpus=corpus["held"],
                max_windows_per_doc=1)
    return SearchConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- windows and candidates


def test_candidates_are_log_spaced_and_include_one():
    c = candidates(0.8, 1.25, 5)
    torch.testing.assert_close(torch.tensor(c, dtype=torch.float64),
                               torch.tensor([0.8, 0.8 ** 0.5, 1.0, 1.25 ** 0.5, 1.25], dtype=torch.float64))
    c = candidates(0.5, 1.1, 7)
    assert len(c) == 7 and 1.0 in c and c == sorted(c) and c[0] == pytest.approx(0.5) and c[-1] == pytest.approx(1.1)
    assert candidates(1.0, 1.0, 7) == [1.0]


def test_derive_windows_known_answer():
    ip = pd.DataFrame({"band": [0, 1, 2, 3], "length": [128] * 4, "ip_mean": [1e4, 1e2, 1.0, 1e-2]})
    w_max, w_min = math.log(1.25), math.log(1.02)
    out = derive_windows(ip, w_max=w_max, w_min=w_min)
    # w_b = w_max * (1e-2 / IP_b)^(1/4), clipped to [w_min, w_max]
    expect = [max(w_max * (1e-2 / x) ** 0.25, w_min) for x in (1e4, 1e2, 1.0, 1e-2)]
    torch.testing.assert_close(torch.tensor(out["g_max"].tolist()), torch.tensor([math.exp(w) for w in expect]))
    torch.testing.assert_close(torch.tensor(out["g_min"].tolist()), torch.tensor([math.exp(-w) for w in expect]))
    assert out["g_max"].is_monotonic_increasing  # high IP (high frequency) is tightest
    tir = pd.DataFrame({"kind": "W", "variant": "fp", "layer": [0, 1] * 4, "proj": "q",
                        "band": [0, 0, 1, 1, 2, 2, 3, 3], "tir": [0.9, 0.9, 1.0, 1.0, 1.5, 1.5, 3.0, 3.0]})
    out = derive_windows(ip, tir, w_max=w_max, w_min=w_min, g_floor=0.5)
    assert out["g_min"][2] == pytest.approx(1 / 1.5) and out["g_min"][3] == pytest.approx(0.5)
    assert out["g_min"][0] == pytest.approx(math.exp(-expect[0]))  # TIR < 1: no room to shrink
    assert "TIR_W" in out["reason"][2] and "TIR_W" not in out["reason"][0]


def test_windows_for_a_model_tighten_with_frequency(setup):
    wb, _, _ = setup
    w = windows_for(wb)
    assert len(w) == 4 and (w["g_min"] <= 1).all() and (w["g_max"] >= 1).all()
    assert w["ip"].is_monotonic_decreasing and w["g_max"].is_monotonic_increasing


def test_bad_windows_and_settings_raise():
    with pytest.raises(ConfigError, match="band 1"):
        check_windows([(0.9, 1.1), (1.05, 1.2)], 2)
    with pytest.raises(ConfigError, match="2 windows for 3 bands"):
        check_windows([(0.9, 1.1), (0.9, 1.2)], 3)
    for bad in (dict(n_candidates=4), dict(sweeps=3), dict(length_weights=(1.0,)), dict(k_folds=1), dict(guard_tol=-1)):
        with pytest.raises(ConfigError):
            SearchConfig(**bad)
    cfg = SearchConfig(lengths=(64, 256), length_weights=(1.0, 3.0), k_folds=3)
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- the search


def _objective(wb, corpus, scales, cfg):
    """Independent check: weighted objective of `scales` computed straight from the workbench."""
    wb.set_scales(scales)
    res = wb.evaluate(corpus, EvalConfig(lengths=cfg.lengths, max_windows_per_doc=cfg.max_windows_per_doc), "quant_scaled")
    return weighted_objective(res.summary, cfg.weights())


def test_search_descends_guards_and_reports_on_heldout(setup):
    wb, corpus, _ = setup
    cfg = cfg_for(corpus)
    seen = []
    r = search(wb, cfg, WINDOWS, progress=lambda f, m: seen.append((f, m)))
    n_cands = sum(len(c) - 1 for c in r.candidates)
    assert len(r.history) == n_cands and r.evaluations == 1 + n_cands + 1 + 3  # + fp dev, + 3 held-out
    # the chosen scales' objective, recomputed independently, is what the search reports and beats the baseline
    obj = r.objective["dev"]
    assert obj["quant_scaled"] <= obj["quant"]
    assert _objective(wb, corpus["dev"], r.scales, cfg) == pytest.approx(obj["quant_scaled"], abs=1e-9)
    # coordinate descent: each band's choice is the best guarded candidate given the bands before it
    last = obj["quant"]
    for b in range(4):
        h = r.history[(r.history.band == b) & r.history.guard_ok]
        best = min([last, *h.objective])
        assert r.scales[b] == (1.0 if best == last else float(h.g[h.objective == best].iloc[0]))
        last = best
    # held-out: fp, quant and scaled per length, on the held-out documents
    # (and the FP + scales control: a gain it shares is a temperature effect, not a repair)
    assert set(r.heldout.variant) == {"fp", "quant", "quant_scaled", "fp_scaled"} and set(r.heldout.length) == {32, 96}
    assert r.note is None and wb.scales.tolist() == r.scales
    fr = [f for f, _ in seen]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0)
    # each message counts evaluations against the announced total and names no time (the bar owns that)
    counts = [re.match(r"(\d+) of (\d+) evaluations · ", m) for _, m in seen]
    assert all(counts) and {int(c[2]) for c in counts} == {r.budget} and int(counts[-1][1]) == r.budget
    assert not any(re.search(r"\beta\b|\bleft\b", m) for _, m in seen)
    # the grid's incumbent is the best so far, on all documents
    best = obj["quant"]
    for row in r.history.itertuples():
        assert row.incumbent_objective == best and row.docs == 4
        if row.guard_ok and row.objective < best:
            best = row.objective


def test_guard_rejects_candidates_that_hurt_short_context(setup):
    wb, corpus, _ = setup
    r = search(wb, cfg_for(corpus, guard_tol=0.0, lengths=(32, 96)), WINDOWS)
    rejected = r.history[~r.history.guard_ok]
    limit = r.dev.query("variant == 'quant' and length == 32").log_ppl.iloc[0]  # tolerance 0: the baseline itself
    assert len(rejected) > 0 and (rejected.short_log_ppl > limit).all() and rejected.objective.isna().all()
    assert (r.history[r.history.guard_ok].short_log_ppl <= limit).all()
    chosen = r.dev.query("variant == 'quant_scaled' and length == 32").log_ppl.iloc[0]
    assert chosen <= limit


def test_symmetric_before_rtn_search_says_gain_is_noise(setup):
    wb, corpus, _ = setup
    wb.set_scales([1.0] * 4, ScaleConfig("symmetric"))
    with pytest.raises(ConfigError, match="rounding"):  # refused up front: it could only measure noise
        search(wb, cfg_for(corpus), WINDOWS)
    r = search(wb, cfg_for(corpus, allow_invariant=True), WINDOWS)
    assert r.gain_is_noise and "rounding" in r.note
    assert r.scales == [1.0] * 4  # whatever noise chose is not a result
    assert abs(r.objective["heldout"]["quant_scaled"] - r.objective["heldout"]["quant"]) < 1e-5


def test_kfold_reports_per_band_mean_and_std(setup):
    wb, corpus, _ = setup
    wb.set_bands(BandConfig(n_bands=2))
    r = search(wb, cfg_for(corpus, k_folds=2, lengths=(32, 64)), WINDOWS[:2])
    f = r.folds
    assert list(f.band) == [0, 1] and {"mean", "std", "fold0", "fold1"} <= set(f.columns)
    torch.testing.assert_close(torch.tensor(f["mean"].tolist()), torch.tensor(((f.fold0 + f.fold1) / 2).tolist()))
    assert set(r.history.fold) == {"all", "fold0", "fold1"}


def test_cancel_keeps_checkpoint_and_resume_reaches_the_same_result(setup):
    wb, corpus, tmp = setup
    ref = search(wb, cfg_for(corpus), WINDOWS)
    wb.set_scales(None)
    ck = tmp / "ck.json"
    cfg = cfg_for(corpus, checkpoint=str(ck))
    cancel = threading.Event()

    def progress(f, m):
        if f > 0.4:
            cancel.set()

    with pytest.raises(Cancelled, match="resume"):
        search(wb, cfg, WINDOWS, progress=progress, cancel=cancel)
    assert wb.scales is None  # the workbench is as it was
    saved = json.loads(ck.read_text())
    assert 3 <= len(saved["evaluations"]) < ref.evaluations and saved["settings_hash"]
    r = search(wb, cfg, WINDOWS)
    assert r.scales == ref.scales and r.objective == ref.objective
    assert r.reused == len(saved["evaluations"]) and r.evaluations == ref.evaluations - r.reused
    with pytest.raises(ConfigError, match="other settings"):
        search(wb, cfg_for(corpus, checkpoint=str(ck), guard_tol=0.01), WINDOWS)


# ----------------------------------------------------------------------------- racing and nested windows


def test_rungs_known_answers():
    from qroar.search import rungs

    assert rungs(10, 3) == [1, 3, 9, 10] and rungs(9, 3) == [1, 3, 9] and rungs(1, 3) == [1]
    assert rungs(4, 2) == [1, 2, 4] and rungs(5, 4) == [1, 4, 5]


def test_racing_with_one_document_is_the_exhaustive_descent(setup, tmp_path):
    """With one dev document every rung is the whole dev set: racing must pick exactly what the
    exhaustive descent picks, with the same objectives."""
    wb, corpus, _ = setup
    one = make_corpus(tmp_path / "one", n_dev=1, n_held=1, words=300)
    ref = search(wb, cfg_for(one), WINDOWS)
    wb.set_scales(None)
    r = search(wb, cfg_for(one, strategy="race"), WINDOWS)
    assert r.scales == ref.scales
    assert r.objective["dev"] == pytest.approx(ref.objective["dev"], abs=1e-9)
    assert r.objective["heldout"] == pytest.approx(ref.objective["heldout"], abs=1e-9)
    h, hr = r.history.set_index(["band", "g"]), ref.history.set_index(["band", "g"])
    assert h.guard_ok.equals(hr.guard_ok) and (h.docs == 1).all()


def test_racing_spends_less_and_its_choice_checks_out(setup):
    """On 4 dev documents (rungs 1, 3, 4): every candidate is scored on the first document, and only
    those beating the incumbent there go on. The chosen scales' objective, recomputed independently,
    is the one reported; documents evaluated (from the checkpoint) stay under the exhaustive count."""
    wb, corpus, tmp = setup
    ck = tmp / "race.json"
    cfg = cfg_for(corpus, strategy="race", checkpoint=str(ck))
    seen = []
    r = search(wb, cfg, WINDOWS, progress=lambda f, m: seen.append(f))
    assert r.objective["dev"]["quant_scaled"] <= r.objective["dev"]["quant"]
    assert _objective(wb, corpus["dev"], r.scales, cfg) == pytest.approx(r.objective["dev"]["quant_scaled"], abs=1e-9)
    n_cands = sum(len(c) - 1 for c in r.candidates)
    assert len(r.history) == n_cands and set(r.history.docs) <= {1, 3, 4} and (r.history.docs == 1).any()
    entries = json.loads(ck.read_text())["evaluations"]
    dev_docs = [e for e in entries if e["scales"] is not None and not e["key"].startswith("doc=held")]
    assert len(dev_docs) < 4 * (1 + n_cands)  # exhaustive: every candidate and the baseline on every document
    # a band's scale moves only to a candidate that went through every document
    for b, g in enumerate(r.scales):
        if g != 1.0:
            assert r.history.query("band == @b and g == @g").docs.iloc[0] == 4
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_racing_progress_never_counts_past_its_announced_total(setup, one_thread):
    """Racing counts document evaluations: every message says how many of at most how many, the count
    never passes that bound, and the result reports the same count in the same unit."""
    wb, corpus, _ = setup
    seen = []
    cfg = cfg_for(corpus, strategy="race", k_folds=2)
    r = search(wb, cfg, WINDOWS, progress=lambda f, m: seen.append(m))
    # the bound the CLI's plan line prints before the model loads is the one the run counts against
    n_dev, n_held = len(wb.corpus(cfg.dev_corpus).doc_ids), len(wb.corpus(cfg.heldout_corpus).doc_ids)
    assert search_budget(cfg, n_dev, n_held, [len(c) - 1 for c in r.candidates]) == r.budget
    counts = [re.search(r"(\d+) of at most (\d+) document evaluations", m) for m in seen]
    assert seen and all(counts), [m for m, c in zip(seen, counts) if not c]
    totals = {int(c[2]) for c in counts}
    assert totals == {r.budget} and all(int(c[1]) <= r.budget for c in counts)
    assert r.unit == "document evaluations" and r.spent == r.doc_evaluations == int(counts[-1][1]) <= r.budget
    assert not any(re.search(r"\beta\b|\bleft\b", m) for m in seen)


def _incumbent_on(wb, docs, scales, cfg):
    """Independent check: (objective, shortest length's log-ppl) of `scales` on `docs`."""
    wb.set_scales(scales)
    logp = wb.evaluate(docs, EvalConfig(lengths=cfg.lengths, max_windows_per_doc=cfg.max_windows_per_doc), "quant_scaled").log_ppl()
    return weighted_objective(logp, cfg.weights()), logp[min(cfg.lengths)]


def test_racing_trace_compares_each_candidate_with_the_incumbent_on_the_same_documents(setup, one_thread):
    """A candidate dropped after 1 or 3 documents is compared with the incumbent on those documents, not
    with the all-documents baseline; the trace chart draws exactly that change, marker size by documents."""
    from app import qroar_charts as qc

    wb, corpus, _ = setup
    cfg = cfg_for(corpus, strategy="race")
    r = search(wb, cfg, WINDOWS)
    h = r.history
    assert set(h.docs) == {1, 3, 4}
    dev = wb.corpus(corpus["dev"])
    for (b, n), rows in h.groupby(["band", "docs"]):
        incumbent = list(r.scales[:b]) + [1.0] * (4 - b)  # one sweep: the bands before b are settled
        obj, _ = _incumbent_on(wb, dev.subset(dev.doc_ids[:n]), incumbent, cfg)
        _, short = _incumbent_on(wb, dev.subset(dev.doc_ids[:n]), [1.0] * 4, cfg)
        assert rows.incumbent_objective.tolist() == pytest.approx([obj] * len(rows), abs=1e-9)
        assert rows.unscaled_short_log_ppl.tolist() == pytest.approx([short] * len(rows), abs=1e-9)
    base_short = float(r.dev.query("variant == 'quant' and length == 32").log_ppl.iloc[0])
    fig = qc.trace_figure(h, r.objective["dev"]["quant"], base_short, cfg.guard_tol, r.scales)
    ok = h[h.guard_ok.astype(bool)]
    top = fig.data[0]
    assert top.name == "sweep 1" and [int(c[2]) for c in top.customdata] == ok.docs.tolist()
    want = [100 * (math.exp(o - i) - 1) for o, i in zip(ok.objective, ok.incumbent_objective)]
    assert list(top.y) == pytest.approx(want, abs=1e-9)
    sizes = dict(zip(ok.docs, top.marker.size))  # more documents, larger marker
    assert len(sizes) > 1 and [sizes[n] for n in sorted(sizes)] == sorted(sizes.values())
    chosen = [t for t in fig.data if t.name == "chosen"]
    if any(g != 1.0 for g in r.scales):  # a chosen candidate beat its incumbent on every document
        assert chosen and all(y < 0 for y in chosen[0].y)


def test_racing_resumes_from_its_checkpoint(setup):
    wb, corpus, tmp = setup
    ref = search(wb, cfg_for(corpus, strategy="race"), WINDOWS)
    wb.set_scales(None)
    cfg = cfg_for(corpus, strategy="race", checkpoint=str(tmp / "ck.json"))
    cancel = threading.Event()
    with pytest.raises(Cancelled, match="resume"):
        search(wb, cfg, WINDOWS, progress=lambda f, m: cancel.set() if f > 0.3 else None, cancel=cancel)
    r = search(wb, cfg, WINDOWS)
    assert r.scales == ref.scales and r.objective == ref.objective and r.reused > 0


def test_nested_search_equals_tiled_search_with_one_window(setup):
    """One window per document: nested windows are the tiled ones, so the search is the same, with
    one forward per document and candidate instead of one per length."""
    wb, corpus, _ = setup
    ref = search(wb, cfg_for(corpus), WINDOWS)
    wb.set_scales(None)
    r = search(wb, cfg_for(corpus, nested=True), WINDOWS)
    assert r.scales == ref.scales
    assert r.objective["heldout"] == pytest.approx(ref.objective["heldout"], abs=1e-6)


def test_racing_settings_are_checked():
    with pytest.raises(ConfigError, match="race_eta"):
        SearchConfig(strategy="race", race_eta=1)
    with pytest.raises(ConfigError, match="true or false"):
        SearchConfig(nested="yes")
