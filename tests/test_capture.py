"""capture.py: the streaming tail quantile against numpy, RoPE on captured q/k against transformers,
and the hooks' reduction (TIR exactly 1 on identical data, a planted outlier found in its band)."""

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import tiny_llama
from qroar import capture, rope
from qroar.bands import BandConfig, bands_for, proj_rows
from qroar.models import attention_layers


@pytest.mark.parametrize("eps", [1e-3, 0.01, 0.037, 0.2, 0.49])
@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (1000, 1000), (1000, 17), (5003, 64), (20000, 4096)])
def test_streaming_quantile_equals_numpy_inverted_cdf(eps, n, chunk):
    g = np.random.default_rng(n + int(eps * 1000))
    x = g.standard_t(3, n).astype(np.float32)
    x[: n // 3] = np.round(x[: n // 3])  # ties
    got = capture.tail_quantile(torch.from_numpy(x).split(chunk), eps)
    assert got == float(np.quantile(x, 1 - eps, method="inverted_cdf"))
    assert got == float(np.sort(x)[n - 1 - int(np.floor(eps * n))])  # the k-th largest, k = floor(eps n) + 1


def test_topk_buffer_never_exceeds_k():
    top = capture.TopK(5)
    for c in torch.arange(100.0).split(7):
        top.update(c)
        assert top.buf.numel() <= 5
    assert top.kth_largest() == 95.0 and top.seen == 100


def test_project_matches_the_models_own_rotary_q_and_k():
    model = tiny_llama()
    base = rope.rope_parameters(model.config)
    rope.apply_pi(model, rope.PIConfig("yarn", 4.0), base)  # attention factor != 1
    L = attention_layers(model)[1]
    h = torch.randn(1, 20, 64)
    pos = torch.arange(20)[None]
    cos, sin = rope.rotary_modules(model)[0](h, pos)
    q = L.q_lin(h).view(1, 20, 4, 16).transpose(1, 2)
    k = L.k_lin(h).view(1, 20, 2, 16).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    q_got = capture.project(h[0], L.q_lin.weight, None, 4, 16, None, cos[0], sin[0])
    k_got = capture.project(h[0], L.k_lin.weight, None, 2, 16, None, cos[0], sin[0])
    torch.testing.assert_close(q_got, q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_got, k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def _capture(model, ids, trained, eps=1e-3, **kw):
    layers = attention_layers(model)
    bands = bands_for(rope.frequencies(model.config), BandConfig(4))
    cap = capture.TailCapture(layers, bands, trained, ids.shape[1], 1, eps, **kw)
    with torch.no_grad(), cap.attached(model):
        model.model(input_ids=ids)
    return cap.table()


def test_tir_is_exactly_one_when_long_tokens_repeat_the_short_ones():
    """Layer 0's input depends on the token only, so repeating the short tokens makes the long
    tokens the same data (each value 3 times): the inverted_cdf quantile, hence TIR_W, is exactly 1."""
    model = tiny_llama()
    short = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    t = _capture(model, short.repeat(1, 4), 64, eps=0.02, chunk_tokens=50)
    w0 = t[(t.kind == "W") & (t.layer == 0)]
    assert len(w0) == 8 and (w0.tir == 1.0).all()
    assert (w0.n_long == 3 * w0.n_short).all()
    assert (t[(t.kind == "W") & (t.layer == 1)].tir != 1.0).any()  # later layers see position through attention


def test_planted_outlier_is_found_in_its_layer_projection_and_band():
    """A channel that only one token uses (with a huge value) appears only at long positions; only the
    q rows of band 2 in layer 1 read that channel."""
    model = tiny_llama()
    c, special, band = 5, 7, 2
    layers = attention_layers(model)
    bands = bands_for(rope.frequencies(model.config), BandConfig(4))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, c] = 0
        model.model.embed_tokens.weight[special, c] = 200.0
        for L in layers:
            L.q_lin.weight[:, c] = 0
            L.k_lin.weight[:, c] = 0
        rows = proj_rows(bands.ranges()[band], 16, 16, 4)
        layers[1].q_lin.weight[rows, c] = 2.0
    ids = torch.randint(10, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    ids[0, 100::12] = special  # 13 long tokens, none short
    t = _capture(model, ids, 64)
    w = t[t.kind == "W"].set_index(["layer", "proj", "band"]).tir
    assert w.idxmax() == (1, "q", band)
    assert w[(1, "q", band)] > 5 and w.drop((1, "q", band)).max() < 2
    a = t[t.kind == "A"].set_index(["layer", "proj", "band"]).tir
    assert a.idxmax() == (1, "q", band)  # RoPE mixes rows only within a pair, so it stays in its band


def test_hooks_are_removed_even_when_the_forward_fails():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 100))
    layers = attention_layers(model)
    bands = bands_for(rope.frequencies(model.config), BandConfig(4))
    cap = capture.TailCapture(layers, bands, 64, 128, 1)  # expects 128 tokens, gets 100
    with pytest.raises(ValueError, match="128 tokens"):
        with cap.attached(model):
            model.model(input_ids=ids)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
