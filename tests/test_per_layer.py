"""Per-layer band scales: shape checks, equality with shared scales when every layer agrees, cheap moves of one
layer's band, the Recipe's round trips, scales files (schema 3) and folded checkpoints."""

import json
import shlex

import pytest
import torch
from conftest import tiny_workbench

from qroar import quant
from qroar.bands import BandConfig
from qroar.cli import build_parser
from qroar.errors import ConfigError
from qroar.export import apply_scales, export_checkpoint, load_scales, save_scales
from qroar.perplexity import EvalConfig, evaluate
from qroar.quant import QuantConfig
from qroar.recipe import Recipe
from qroar.rescale import ScaleConfig, check_scales, describe_scales, per_layer
from qroar.workbench import Workbench

RTN = QuantConfig(method="rtn", bits=3, group_size=32)
SHARED = [1.3, 0.8, 1.1, 0.9]
LAYERED = [[1.3, 0.8, 1.1, 0.9], [0.7, 1.0, 1.25, 1.05]]
IDS = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def wb(tmp_path):
    return tiny_workbench(tmp_path / "m", RTN)


def _weights(wb, variant):
    with wb.variant(variant):
        return {n: p.detach().clone() for n, p in wb.model.named_parameters()}


def _logits(wb, variant):
    with wb.variant(variant), torch.no_grad():
        return wb.model(IDS).logits


def test_check_scales_accepts_shared_and_per_layer_and_names_the_layer():
    assert check_scales(SHARED, 4).shape == (4,)
    assert check_scales(LAYERED, 4, 2).shape == (2, 4) and check_scales(LAYERED).dtype == torch.float64
    assert torch.equal(per_layer(SHARED, 3), torch.tensor([SHARED] * 3, dtype=torch.float64))
    assert torch.equal(per_layer(LAYERED, 2), torch.tensor(LAYERED, dtype=torch.float64))
    with pytest.raises(ConfigError, match="layer 1, band 2"):
        check_scales([[1.0] * 4, [1.0, 1.0, -2.0, 1.0]], 4)
    with pytest.raises(ConfigError, match="3 layers but the model has 2"):
        check_scales([[1.0] * 4] * 3, 4, 2)
    with pytest.raises(ConfigError, match="3 scales for 4 bands: .* in every layer"):
        check_scales([[1.0] * 3] * 2, 4)
    with pytest.raises(ConfigError, match="one per band"):
        check_scales([[1.0] * 4, [1.0] * 3])  # ragged
    assert describe_scales(SHARED).startswith("b0=1.3, b1=0.8")
    assert describe_scales([SHARED] * 2).startswith("per layer, every layer the same: b0=1.3")
    assert describe_scales(LAYERED).startswith("L0: 1.3, 0.8, 1.1, 0.9 | L1: 0.7")


@pytest.mark.parametrize("order", ["before", "after"])
def test_per_layer_scales_that_agree_act_exactly_like_shared_ones(wb, order):
    wb.set_scales(SHARED, ScaleConfig("shared", order))
    shared = {v: _weights(wb, v) for v in ("quant_scaled", "fp_scaled")}
    ref_logits = _logits(wb, "quant_scaled")
    docs = [torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = EvalConfig(lengths=(32, 96), max_windows_per_doc=2)
    ref_ppl = wb.evaluate(docs, cfg, "quant_scaled").table
    wb.set_scales(None)
    wb.set_scales([SHARED, SHARED], ScaleConfig("shared", order))
    assert wb.per_layer and wb.scales.shape == (2, 4)
    for v, w in shared.items():
        got = _weights(wb, v)
        assert all(torch.equal(got[n], w[n]) for n in w), v  # bit for bit
    assert torch.equal(_logits(wb, "quant_scaled"), ref_logits)
    assert wb.evaluate(docs, cfg, "quant_scaled").table.nll.tolist() == ref_ppl.nll.tolist()


def test_per_layer_scales_scale_each_layers_rows_by_its_own_factor(wb):
    rows = torch.tensor([h * 16 + d for h in range(4) for d in (0, 1, 8, 9)])  # band 0 of the q heads
    fp = _weights(wb, "fp")
    qw = _weights(wb, "quant")
    wb.set_scales(LAYERED, ScaleConfig("shared", "before"))
    got = _weights(wb, "quant_scaled")
    for i in range(2):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        torch.testing.assert_close(got[name][rows], quant.fake_quant(LAYERED[i][0] * fp[name][rows], RTN))
    wb.set_scales(LAYERED, ScaleConfig("shared", "after"))
    got = _weights(wb, "quant_scaled")
    for i in range(2):
        name = f"model.layers.{i}.self_attn.k_proj.weight"
        k_rows = torch.tensor([h * 16 + d for h in range(2) for d in (2, 3, 10, 11)])  # band 1 of the k heads
        torch.testing.assert_close(got[name][k_rows], LAYERED[i][1] * qw[name][k_rows])


def test_moving_one_layers_band_requantizes_only_those_rows(wb, monkeypatch):
    wb.set_scales(LAYERED, ScaleConfig("shared", "before"))
    calls = []
    real = quant.requantize_rows
    monkeypatch.setattr(quant, "requantize_rows", lambda s, n, r, idx: calls.append((n, len(idx))) or real(s, n, r, idx))
    wb.set_band_scale(2, 1.5, layer=1)
    assert sorted(calls) == [("model.layers.1.self_attn.k_proj", 8), ("model.layers.1.self_attn.q_proj", 16)]
    assert wb.recipe.scales == (tuple(LAYERED[0]), (0.7, 1.0, 1.5, 1.05))
    got = _logits(wb, "quant_scaled")
    calls.clear()
    wb.set_band_scale(0, 1.2)  # no layer: band 0 of every layer
    assert len(calls) == 4 and wb.recipe.scales[0][0] == wb.recipe.scales[1][0] == 1.2
    monkeypatch.undo()
    wb.set_scales(None)
    wb.set_scales([[1.2, 0.8, 1.1, 0.9], [1.2, 1.0, 1.5, 1.05]])  # built from scratch
    wb.set_band_scale(0, 1.3, layer=0), wb.set_band_scale(0, 0.7, layer=1)
    assert torch.equal(_logits(wb, "quant_scaled"), got)
    with pytest.raises(ConfigError, match="Layer 5 does not exist"):
        wb.set_band_scale(0, 1.0, layer=5)
    with pytest.raises(ConfigError, match="3 layers but the model has 2"):
        wb.set_scales([[1.0] * 4] * 3)
    assert wb.recipe.scales[1][0] == 0.7  # a refused setting changed nothing


def test_recipe_with_per_layer_scales_round_trips_and_is_hashable():
    r = Recipe(bands=BandConfig(4), scales=LAYERED)
    assert r.per_layer and r.scales == tuple(tuple(x) for x in LAYERED) and hash(r) == hash(Recipe.from_dict(r.to_dict()))
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert "--scales" in r.to_args() and ";" in r.to_args()[r.to_args().index("--scales") + 1]
    args = build_parser().parse_args(["eval", *shlex.split(shlex.join(r.to_args()))])
    assert Recipe.from_args(args) == r
    assert not Recipe(scales=SHARED).per_layer
    with pytest.raises(ConfigError, match="layer 1, band 3"):
        Recipe(scales=[[1.0] * 4, [1.0, 1.0, 1.0, float("nan")]])
    with pytest.raises(ConfigError, match="same number of bands in every layer"):
        Recipe(scales=[[1.0] * 4, [1.0] * 3])
    with pytest.raises(ConfigError, match="3 scales for 4 bands"):
        Recipe(edges=(0, 2, 4, 6, 8), scales=[[1.0] * 3] * 2)


def test_per_layer_scales_file_round_trip_and_apply_on_a_fresh_workbench(wb, tmp_path):
    wb.set_scales(LAYERED, ScaleConfig("shared", "before"))
    path = save_scales(tmp_path / "s.json", wb)
    d = json.loads(path.read_text())
    assert d["schema_version"] == 3 and d["per_layer"] is True and d["scales"] == LAYERED
    sf = load_scales(path, wb)
    assert sf.scales == tuple(tuple(x) for x in LAYERED) and sf.recipe.per_layer
    ref = _logits(wb, "quant_scaled")
    fresh = Workbench.open(wb.info.source, device="cpu", dtype="fp32")
    apply_scales(fresh, load_scales(path, fresh))
    assert torch.equal(_logits(fresh, "quant_scaled"), ref)


@pytest.mark.parametrize("quantized,variant", [(False, "fp_scaled"), (True, "quant_scaled")])
def test_export_with_per_layer_scales_reloads_in_plain_transformers_with_the_same_perplexity(wb, tmp_path, quantized, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wb.set_scales(LAYERED, ScaleConfig("shared", "before"))
    out = export_checkpoint(wb, tmp_path / "export", quantized=quantized)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    docs = [torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = EvalConfig(lengths=(32, 128), max_windows_per_doc=2)
    got = evaluate(model, docs, cfg, tokenizer=tok).table
    ref = wb.evaluate(docs, cfg, variant).table
    torch.testing.assert_close(torch.tensor(got.nll.tolist()), torch.tensor(ref.nll.tolist()), rtol=1e-6, atol=1e-5)
    # the per-layer scales really are folded: the shared scales of layer 0 give another model
    wb.set_scales(LAYERED[0])
    other = wb.evaluate(docs, cfg, variant).table
    assert (got.nll - other.nll).abs().max() > 1e-4
    assert json.loads((out / "qroar_scales.json").read_text())["scales"] == LAYERED
