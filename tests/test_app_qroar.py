"""The Q-ROAR pages (Tune, Search, Export) driven headless (AppTest) on a tiny random Llama saved to a folder,
and the app-side engine helpers they use."""

import json
import re
import string

import pytest
import torch

from apptest import button, finish, go, load, new_app, ok, record, tiny_dir, update  # noqa: F401
from app import engine, state
from conftest import tiny_llama
from qroar.errors import ConfigError, ScalesFileError


def loaded_app(tiny_dir: str, **settings):
    """Setup with the tiny model loaded, lengths 64 and 128 (1x, 2x trained), one window per document."""
    at = load(new_app(), tiny_dir)
    update(record(at), {"eval.lengths": [64, 128], "eval.max_windows": 1, **settings})
    return at


# ----------------------------------------------------------------------------- Tune


def test_tune_moving_one_slider_redraws_the_scaled_curve_and_symmetric_rtn_warns(tiny_dir, tmp_path):
    from conftest import TEXT

    (tmp_path / "doc.txt").write_text(TEXT * 12)
    at = go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "corpus.source": "path", "corpus.path": str(tmp_path / "doc.txt")}),
            "tune")
    ok(at)
    assert [s.key for s in at.slider if s.key.startswith("w:qroar.g")] == [f"w:qroar.g{b}" for b in range(4)]
    finish(at)
    ok(at)
    assert not at.warning  # shared mode under RTN can change the model
    first = at.dataframe[0].value
    assert first["length"].tolist() == [64, 128]
    assert first["ppl quant_scaled"].tolist() == first["ppl quant"].tolist()  # all scales 1: the quantizer's own rows

    g0 = at.slider(key="w:qroar.g0")
    assert g0.min < 1 < g0.max  # the window holds 1
    g0.set_value(g0.max).run()
    assert 1 < record(at).recipe.scales[0] <= g0.max  # clamped into the window, never past the slider
    finish(at)
    ok(at)
    moved = at.dataframe[0].value
    assert (moved["ppl quant_scaled"] != moved["ppl quant"]).all()
    assert moved["ppl quant"].tolist() == first["ppl quant"].tolist()  # PTQ and FP do not depend on the scales
    assert record(at).jobs["tune"].result.reused_base  # ... so the move evaluated only the scaled variant
    assert len(at.get("plotly_chart")) == 2  # curves, scales with windows

    at.radio(key="w:scale.mode").set_value("symmetric").run()
    ok(at)
    texts = [w.value for w in at.warning]
    assert any("cannot change the quantized model beyond rounding" in t and "rtn w4" in t for t in texts)

    button(at, "Reset scales to 1").click().run()
    assert record(at).recipe.scales is None
    assert at.slider(key="w:qroar.g0").value == 1.0
    finish(at)


# ----------------------------------------------------------------------------- Search


def test_search_runs_and_shows_the_held_out_table_then_hands_its_scales_to_tune(tiny_dir, tmp_path):
    from conftest import TEXT

    (tmp_path / "dev.txt").write_text(TEXT * 12)
    (tmp_path / "heldout.txt").write_text(TEXT[::-1] * 12)
    at = go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "qroar.auto_run": False, "search.dev": str(tmp_path / "dev.txt"),
                                    "search.heldout": str(tmp_path / "heldout.txt")}), "search")
    ok(at)
    at.slider(key="w:search.n_candidates").set_value(5).run()
    at.multiselect(key="w:search.lengths").set_value([64, 128]).run()
    at.number_input(key="w:search.max_windows").set_value(1).run()
    button(at, "Start search").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert table["length"].tolist() == [64, 128]
    assert {"ppl fp", "ppl quant", "ppl quant_scaled", "scaled vs PTQ %"} <= set(table.columns)
    assert (table[["ppl fp", "ppl quant", "ppl quant_scaled"]] > 1).all().all()

    r = record(at).jobs["search"].result
    assert len(r.history) == 4 * 4  # 4 bands x (5 candidates - the 1 already in place), one sweep
    for row in r.history.itertuples():
        w = r.windows.iloc[row.band]
        assert w.g_min - 1e-12 <= row.g <= w.g_max + 1e-12
    for b, g in enumerate(r.scales):  # a chosen scale is 1 or a tried candidate that passed the guard
        assert g == 1.0 or ((r.history.band == b) & (r.history.g == g) & r.history.guard_ok).any()
    expected = 100 * (table["ppl quant_scaled"] / table["ppl quant"] - 1)
    assert table["scaled vs PTQ %"].tolist() == pytest.approx(expected.tolist())
    assert len(at.get("plotly_chart")) == 2  # chosen scales, trace

    button(at, "Use these scales on Tune").click().run()
    ok(at)
    assert at.title[0].value == "Tune"
    assert list(record(at).recipe.scales) == r.scales
    assert [at.slider(key=f"w:qroar.g{b}").value for b in range(4)] == pytest.approx(r.scales, abs=1e-3)


def search_page(tiny_dir, tmp_path, n_dev: int = 3):
    """The Search page of a loaded app, 4 bands, with n_dev small dev documents and one held-out document."""
    from conftest import TEXT

    dev = tmp_path / "dev"
    dev.mkdir()
    for i in range(n_dev):
        (dev / f"d{i}.txt").write_text((TEXT[i:] + TEXT[:i]) * 12)
    (tmp_path / "heldout.txt").write_text(TEXT[::-1] * 12)
    return go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "qroar.auto_run": False, "search.dev": str(dev),
                                      "search.heldout": str(tmp_path / "heldout.txt")}), "search")


def test_search_page_races_over_documents_with_nested_windows(tiny_dir, tmp_path):
    """The two toggles reach the engine: candidates are first scored on one dev document, survivors on
    all three (rungs 1, 3), every length from one forward at the longest."""
    at = search_page(tiny_dir, tmp_path, n_dev=3)
    ok(at)
    at.slider(key="w:search.n_candidates").set_value(5).run()
    at.multiselect(key="w:search.lengths").set_value([64, 128]).run()
    at.number_input(key="w:search.max_windows").set_value(1).run()
    at.radio(key="w:search.strategy").set_value("race").run()
    at.toggle(key="w:search.nested").set_value(True).run()
    button(at, "Start search").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    job = record(at).jobs["search"]
    cfg = job.meta["cfg"]
    assert cfg.race and cfg.nested
    r = job.result
    assert len(r.history) == 4 * 4 and set(r.history.docs) <= {1, 3} and (r.history.docs == 1).any()
    assert at.dataframe[0].value["length"].tolist() == [64, 128]
    # the count is in the unit the progress announced (document evaluations), under its bound
    m = next(x for x in at.metric if x.label.startswith("Document evaluations"))
    bound = int(re.fullmatch(r"Document evaluations \(at most (\d+)\)", m.label).group(1))
    spent = int(m.value)
    assert spent == r.doc_evaluations <= bound == r.budget
    assert "Search over 4 bands" in job.label and "evaluations" not in job.label
    assert any("on the same documents" in c.value for c in at.caption)  # how the trace compares candidates


def test_kl_search_shows_its_control_as_fp_plus_scales_kl_to_fp(tiny_dir, tmp_path):
    """Under the KL objective FP's own KL is 0, so the control is FP + scales' KL to FP (beside PTQ's),
    not a perplexity ratio."""
    at = search_page(tiny_dir, tmp_path, n_dev=2)
    ok(at)
    at.slider(key="w:search.n_candidates").set_value(5).run()
    at.multiselect(key="w:search.lengths").set_value([64, 128]).run()
    at.number_input(key="w:search.max_windows").set_value(1).run()
    at.selectbox(key="w:search.objective").set_value("kld").run()
    button(at, "Start search").click().run()
    finish(at)
    ok(at)
    r = record(at).jobs["search"].result
    held = r.objective["heldout"]
    assert held["fp"] == pytest.approx(0.0, abs=1e-9) and held["fp_scaled"] >= 0
    labels = [m.label for m in at.metric]
    assert "Control: FP + scales vs FP" not in labels
    m = next(x for x in at.metric if x.label == "Control: FP + scales, KL to FP")
    assert m.value == f"{held['fp_scaled']:.4f}"
    gain = next(x for x in at.metric if x.label == "Held-out objective vs PTQ")
    assert gain.value == f"{100 * (held['quant_scaled'] / held['quant'] - 1):+.3f}%"


def test_gradient_search_takes_its_steps_and_rate_from_the_page_and_draws_the_objective_against_steps(tiny_dir, tmp_path):
    at = search_page(tiny_dir, tmp_path, n_dev=3)
    ok(at)
    at.multiselect(key="w:search.lengths").set_value([64, 128]).run()
    at.number_input(key="w:search.max_windows").set_value(1).run()
    at.radio(key="w:search.strategy").set_value("grad").run()
    at.number_input(key="w:search.grad_steps").set_value(2).run()
    at.number_input(key="w:search.grad_lr").set_value(0.1).run()
    button(at, "Start search").click().run()
    finish(at)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    job = record(at).jobs["search"]
    cfg, r = job.meta["cfg"], job.result
    assert (cfg.strategy, cfg.grad_steps, cfg.grad_lr) == ("grad", 2, pytest.approx(0.1))
    assert r.history["step"].max() <= 2 and set(r.history["split"].dropna()) <= {"train", "val"}
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("step" in t.lower() for t in titles)  # the objective drawn against steps


# ----------------------------------------------------------------------------- Export


def test_export_previews_the_current_scales_downloads_and_folds_them_into_a_checkpoint(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qroar import bands

    scales = [1.1, 1.0, 0.95, 1.0]
    at = go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "scales": scales, "export.folder": str(tmp_path / "out")}),
            "export")
    ok(at)
    finish(at)
    ok(at)
    payload = at.json[0].value
    payload = json.loads(payload) if isinstance(payload, str) else payload
    assert payload["scales"] == scales and payload["mode"] == "shared" and payload["kind"] == "qroar-scales"
    assert len(payload["bands"]["edges"]) == 5
    assert [d.label for d in at.get("download_button")] == ["Download scales file"]

    button(at, "Export folded checkpoint").click().run()
    finish(at)
    ok(at)
    assert any(str(tmp_path / "out") in s.value for s in at.success)
    assert "AutoModelForCausalLM.from_pretrained" in at.code[0].value
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    edges = payload["bands"]["edges"]
    for b, g in enumerate(scales):  # full precision, shared mode: every row of band b in q and k is g times the original
        for proj, heads in (("q_proj", 4), ("k_proj", 2)):
            rows = bands.proj_rows(range(edges[b], edges[b + 1]), 16, 16, heads)
            w_new = getattr(exported.model.layers[1].self_attn, proj).weight[rows]
            w_old = getattr(original.model.layers[1].self_attn, proj).weight[rows]
            torch.testing.assert_close(w_new, g * w_old, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "out" / "qroar_scales.json").read_text())["scales"] == scales

    (tmp_path / "out" / "notes.txt").write_text("mine")  # exporting again: refused unless Overwrite is on
    button(at, "Export folded checkpoint").click().run()
    finish(at)
    assert any("earlier qroar export" in e.value for e in at.error), [e.value for e in at.error]
    at.toggle(key="w:export.overwrite").set_value(True).run()
    button(at, "Export folded checkpoint").click().run()
    finish(at)
    ok(at)
    assert any(str(tmp_path / "out") in s.value for s in at.success) and not at.error
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_importing_a_scales_file_sets_the_session_and_a_malformed_one_shows_an_error(tiny_dir):
    at = go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "scales": [1.05, 1.0, 1.0, 0.9]}), "export")
    finish(at)
    good = json.loads(at.json[0].value) if isinstance(at.json[0].value, str) else at.json[0].value
    update(record(at), {"scales": None, "bands.n_bands": 8, "pi.factor": 2.0})
    at.run()
    at.file_uploader[0].set_value(("bad.json", b'{"schema_version": 1, "scales": [1.0, ', "application/json")).run()
    ok(at)
    errors = [e.value for e in at.error]
    assert any("bad.json" in e and "truncated" in e for e in errors), errors
    assert not any("/tmp" in e or "upload.json" in e for e in errors)  # the upload's name, not a temporary path
    assert record(at).recipe.bands.n_bands == 8  # nothing changed

    at.file_uploader[0].set_value(("mine.json", json.dumps(good).encode(), "application/json")).run()
    ok(at)
    r = record(at).recipe
    assert r.scales == (1.05, 1.0, 1.0, 0.9) and r.bands.n_bands == 4 and r.pi.factor == 8.0
    assert any("Imported **mine.json**" in m.value for m in at.success)
    finish(at)
    ok(at)


# ----------------------------------------------------------------------------- engine helpers (no Streamlit)


def test_uploaded_file_from_another_model_or_too_large_is_refused(tiny_dir, tmp_path):
    from conftest import save_tiny

    backend = engine.Backend()
    key = engine.ModelKey(tiny_dir, device="cpu")
    backend.models.get(key)
    with pytest.raises(ScalesFileError, match="a few kB"):
        engine.import_scales(backend, key, b" " * (engine.MAX_SCALES_FILE_BYTES + 1), "big.json")
    other = engine.ModelKey(save_tiny(tmp_path / "other", tiny_llama(num_hidden_layers=3)), device="cpu")
    backend.models.max_models = 2
    wb = backend.models.get(other).wb
    wb.set_scales([1.0] * wb.bands.n_bands)
    from qroar.export import scales_payload

    data = json.dumps(scales_payload(wb)).encode()
    with pytest.raises(ScalesFileError, match="load the model the scales were made for"):
        engine.import_scales(backend, key, data, "other.json")
    assert engine.import_scales(backend, other, data, "other.json").scales == (1.0,) * wb.bands.n_bands


def test_export_folder_that_holds_other_files_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a qroar export"):
        engine.check_export_folder(str(tmp_path))
    with pytest.raises(ConfigError, match="Type the folder"):
        engine.check_export_folder("  ")
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "qroar_scales.json").write_text("{}")
    assert engine.check_export_folder(str(tmp_path / "again")) == (tmp_path / "again").resolve()


def test_apply_moves_only_the_changed_band(tiny_dir):
    from qroar import models
    from qroar.bands import BandConfig, proj_rows
    from qroar.quant import QuantConfig
    from qroar.rescale import ScaleConfig
    from qroar.workbench import Workbench

    wb = Workbench(models.load_model(tiny_dir, device="cpu"))
    from qroar.recipe import Recipe

    wb.set_quant(QuantConfig(method="rtn", bits=4, group_size=16))
    t = Recipe(quant=QuantConfig(method="rtn", bits=4, group_size=16), bands=BandConfig(4), scale=ScaleConfig(),
               scales=(1.0, 1.0, 1.0, 1.0))
    wb.apply(t)
    before = {n: p.detach().clone() for n, p in wb.model.named_parameters()}  # the quantized weights
    wb.apply(t.with_scales((1.0, 1.2, 1.0, 1.0)))
    with wb.variant("quant_scaled") as m:
        q = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rows = set(proj_rows(range(wb.bands.edges[1], wb.bands.edges[2]), 16, 16, 4).tolist())
    changed = {int(i) for i in (q != before["model.layers.0.self_attn.q_proj.weight"]).any(dim=1).nonzero()}
    assert changed and changed <= rows  # only band 1's rows moved
    assert wb.scales.tolist() == [1.0, 1.2, 1.0, 1.0]


def test_tune_job_control_adds_fp_plus_scales_and_keeps_it_apart_from_ptq_plus_scales(tiny_dir, tmp_path):
    import threading

    from qroar.bands import BandConfig
    from qroar.perplexity import EvalConfig
    from qroar.quant import QuantConfig
    from qroar.recipe import Recipe
    from qroar.rescale import ScaleConfig
    from qroar.rope import PIConfig

    text = "".join(string.ascii_letters[(i * 7) % 52] for i in range(600))
    (tmp_path / "doc.txt").write_text(text)
    backend = engine.Backend()
    key = engine.ModelKey(tiny_dir, "cpu", "auto", False, False)
    recipe = Recipe(pi=PIConfig("linear", 2.0), quant=QuantConfig(method="rtn", bits=3, group_size=16), bands=BandConfig(4),
                    scale=ScaleConfig("shared", "before"), scales=(1.3, 1.0, 0.8, 1.0))
    fn = engine.tune_job(backend, key, recipe, str(tmp_path / "doc.txt"), EvalConfig(lengths=(64, 128), max_windows_per_doc=1),
                         control=True)
    res = fn(lambda f, m: None, threading.Event())
    ppl = res.summary.set_index(["variant", "length"])["ppl"]
    assert set(res.summary["variant"]) == {"fp", "quant", "quant_scaled", "fp_scaled"}
    for n in (64, 128):  # shared scales move both curves away from their unscaled ones, independently
        assert ppl[("fp_scaled", n)] != ppl[("fp", n)] and ppl[("quant_scaled", n)] != ppl[("quant", n)]
        assert ppl[("fp_scaled", n)] != ppl[("quant_scaled", n)]


def test_tune_job_max_docs_evaluates_only_the_first_documents(tiny_dir, tmp_path):
    import threading

    from qroar.bands import BandConfig
    from qroar.perplexity import EvalConfig
    from qroar.quant import QuantConfig
    from qroar.recipe import Recipe
    from qroar.rescale import ScaleConfig
    from qroar.rope import PIConfig

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"d{i}.txt").write_text("".join(string.ascii_letters[(k * (i + 3)) % 52] for k in range(300)))
    backend = engine.Backend()
    key = engine.ModelKey(tiny_dir, "cpu", "auto", False, False)
    recipe = Recipe(quant=QuantConfig(method="rtn", bits=4, group_size=16), bands=BandConfig(4),
                    scale=ScaleConfig("shared", "before"), scales=(1.2, 1.0, 1.0, 1.0))
    run = lambda n: engine.tune_job(backend, key, recipe, str(folder), EvalConfig(lengths=(64,), max_windows_per_doc=1),
                                    max_docs=n)(lambda f, m: None, threading.Event())
    one, every = run(1), run(0)
    assert one.table["doc"].nunique() == 1 and every.table["doc"].nunique() == 3
    first = every.table[every.table["doc"] == one.table["doc"].iloc[0]].set_index("variant")["nll"]
    assert one.table.set_index("variant")["nll"].to_dict() == pytest.approx(first.to_dict())


def test_export_page_writes_gguf_shows_size_and_verifies_with_stock_libraries(tiny_dir, tmp_path):
    """The packed formats are choices of the Export page; Verify reloads the file in another process with transformers
    + gguf and shows both perplexities on the same window (equal: the file holds the weights the dashboard measured)."""
    from qroar.export import FORMATS

    at = go(loaded_app(tiny_dir, **{"bands.n_bands": 4, "scales": [1.1, 1.0, 0.95, 1.0], "pi.rope_type": "yarn",
                                    "quant.method": "gguf-q8_0", "export.folder": str(tmp_path / "g")}), "export")
    finish(at)
    ok(at)
    options = at.radio(key="w:export.format").options
    assert {FORMATS["gguf"].label, FORMATS["compressed-tensors"].label} <= set(options)
    at.radio(key="w:export.format").set_value("gguf").run()
    button(at, "Export folded checkpoint").click().run()
    finish(at)
    ok(at)
    assert (tmp_path / "g" / "model.gguf").is_file()
    assert any("full-precision weights" in c.value for c in at.caption)  # size against FP
    button(at, "Verify: reload with stock libraries and compare perplexity").click().run()
    finish(at)
    ok(at)
    metrics = {m.label: float(m.value) for m in at.metric}
    ours, theirs = metrics["Dashboard (qroar, in memory)"], metrics["Reloaded file (stock libraries)"]
    assert theirs == pytest.approx(ours, rel=1e-3)  # shown to 4 decimals
    assert any("rope after reload: yarn" in c.value for c in at.caption)
    assert any("GGUFReader" in c.value for c in at.caption)
