"""A forward kept for the backward that follows (the SDK's two-request custom loss over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bios.engine.engine import Engine
from bios.types import AdamParams, Datum
from helpers import random_datum


@contextmanager
def count_forwards(engine: Engine, run_id: str) -> Iterator[list[int]]:
    """Counts forward passes of the run's (shared) base model while the block runs: calls of its
    input embedding, which every forward makes once (the chunked-loss path calls the decoder and
    the unembedding, not the model's own forward)."""
    calls = [0]
    model = engine._run_workers[run_id].loaded.model.get_input_embeddings()
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def linearised(data: list[Datum], weights: list[torch.Tensor]) -> list[Datum]:
    return [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": w},
        )
        for d, w in zip(data, weights, strict=True)
    ]


def test_backward_after_kept_forward_skips_the_forward_and_gives_the_same_gradients(
    service, session_engine: Engine, tiny_models
):
    generator = torch.Generator().manual_seed(0)
    data = [random_datum(384, n, "cross_entropy", generator) for n in (5, 8)]
    weights = [
        torch.randn(len(d.loss_fn_inputs["weights"].data), generator=generator) for d in data
    ]

    plain = service.create_lora_training_client(tiny_models["qwen2"], rank=4, seed=0)
    plain.forward_backward(linearised(data, weights), "cross_entropy").result()
    expected = {k: p.grad.clone() for k, p in session_engine.run(plain.model_id).parameters.items()}

    kept = service.create_lora_training_client(tiny_models["qwen2"], rank=4, seed=0)
    with count_forwards(session_engine, kept.model_id) as calls:
        session_engine.forward_backward(
            kept.model_id, data, "cross_entropy", backward=False, keep_graph=True
        ).result()
        session_engine.forward_backward(
            kept.model_id, linearised(data, weights), "cross_entropy"
        ).result()
    assert calls[0] == 1, "the backward must reuse the kept forward"
    for name, param in session_engine.run(kept.model_id).parameters.items():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)
    assert session_engine.run(kept.model_id).kept is None  # used once, then dropped


def test_kept_forward_is_not_used_after_the_weights_change(service, session_engine, tiny_models):
    generator = torch.Generator().manual_seed(1)
    data = [random_datum(384, 6, "cross_entropy", generator)]
    client = service.create_lora_training_client(tiny_models["qwen2"], rank=4, seed=0)
    client.forward_backward(data, "cross_entropy")
    client.optim_step(AdamParams(learning_rate=0.1)).result()
    with count_forwards(session_engine, client.model_id) as calls:
        session_engine.forward_backward(
            client.model_id, data, "cross_entropy", backward=False, keep_graph=True
        ).result()
        # Nothing was accumulated, so the weights stay equal; the request still drops the graph.
        client.optim_step(AdamParams(learning_rate=0.1)).result()
        client.forward_backward(data, "cross_entropy").result()
        assert calls[0] == 2, "a request in between drops the kept forward"

        other = [random_datum(384, 6, "cross_entropy", generator)]
        session_engine.forward_backward(
            client.model_id, data, "cross_entropy", backward=False, keep_graph=True
        ).result()
        client.forward_backward(other, "cross_entropy").result()
    assert calls[0] == 4, "different tokens are computed afresh"
