"""Calibration data for GPTQ/AWQ and the layer-by-layer forward they run on.

Layer-by-layer (as in the GPTQ reference): capture what every decoder layer is called with
(hidden states entering layer 0, and each layer's own kwargs: position embeddings, masks),
then run one decoder layer at a time on the captured hidden states, so only one layer's
activations and statistics live at once and a 7B model calibrates on one 80 GB GPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from qroar.errors import ConfigError, DataError, ModelError
from qroar.models import decoder_layers


def calibration_batches(
    token_lists: Sequence[Sequence[int] | torch.Tensor], n_samples: int, seq_len: int, seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield n_samples windows of exactly seq_len tokens, each a LongTensor (1, seq_len).

    Windows are drawn uniformly over every possible window of every document (a long
    document contributes more windows), one at a time so long calibration stays lean.
    """
    if n_samples < 1 or seq_len < 2:
        raise ConfigError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len}).")
    lengths = [len(t) for t in token_lists]
    counts = [max(n - seq_len + 1, 0) for n in lengths]  # windows each document offers
    if sum(counts) == 0:
        longest = max(lengths, default=0)
        raise DataError(
            f"no calibration document has {seq_len} tokens (longest: {longest}); "
            f"use seq_len <= {longest} or add longer documents."
        )
    rng = random.Random(seed)
    for _ in range(n_samples):
        doc = rng.choices(range(len(counts)), weights=counts)[0]
        start = rng.randrange(counts[doc])
        window = torch.as_tensor(token_lists[doc][start:start + seq_len], dtype=torch.long)
        yield window.reshape(1, seq_len)


class _Stop(Exception):
    """Raised inside the last patched layer: the rest of the forward is not needed."""


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Run the embeddings only, recording what each decoder layer would be called with.

    Returns (hiddens, kwargs): hiddens[s] is the input of layer 0 for sample s; kwargs[i][s]
    the keyword arguments of layer i for sample s (per layer, since e.g. Gemma 3 passes
    sliding and full attention layers different masks and position embeddings).
    Every layer's forward is swapped for a recorder, so no layer computes anything.
    """
    layers = decoder_layers(model)
    hiddens: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]
    device = next(model.parameters()).device

    def recorder(i):
        def forward(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
            kwargs[i].append(kw)
            if i == 0:
                hiddens.append(hidden)
            if i == len(layers) - 1:
                raise _Stop
            return hidden
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate's device hooks live there
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # instance attribute shadows the class method
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
    if not hiddens:
        raise DataError("no calibration samples were given; pass at least one window of tokens.")
    return hiddens, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on captured inputs (transformers 5 returns a tensor, 4.x a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
