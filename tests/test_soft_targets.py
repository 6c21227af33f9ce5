"""`cross_entropy` with soft targets: (N, K) `target_tokens` and `weights` (top-K distillation).

Each position has K targets; the output `logprobs` is (N, K) and the loss is
-Σ_{n,k} w[n,k] · log p(target[n,k] | prefix n) (Tinker's cross-entropy page). References are
computed here with a plain transformers forward and torch's log_softmax on the full logits.
"""

from __future__ import annotations

import pytest
import tinker
import torch
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.engine.batch import pack_batch, resolve_objective
from bios.engine.engine import Engine
from bios.engine.forward import batch_logits, gather_logprobs, target_logprobs
from bios.errors import InvalidInputError
from bios.types import Datum, ModelInput
from server_process import ServerProcess

K = 3
LENGTHS = (7, 3, 12, 5)


def soft_data(vocab: int, seed: int = 0, k: int = K) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for n in LENGTHS:
        tokens = torch.randint(0, vocab, (n,), generator=generator)
        targets = torch.randint(0, vocab, (n, k), generator=generator)
        weights = torch.rand(n, k, generator=generator)
        weights = weights / weights.sum(-1, keepdim=True)  # a teacher's renormalised top K
        data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens.tolist()),
                loss_fn_inputs={"target_tokens": targets, "weights": weights},
            )
        )
    return data


def reference_soft_logprobs(model, datum: Datum) -> torch.Tensor:
    """(N, K): torch's log_softmax over one datum's full logits, gathered at its K targets."""
    logits = model(input_ids=torch.tensor([datum.model_input.to_ints()])).logits[0].float()
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets)


def perturbed(service: ServiceClient, engine: Engine, model: str, seed: int = 0):
    client = service.create_lora_training_client(model, rank=4, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in engine.run(client.model_id).parameters.items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return client


def grads(engine: Engine, run_id: str) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in engine.run(run_id).parameters.items()}


def test_soft_targets_match_the_hand_formula(tiny_models, session_engine: Engine):
    """Logprobs (N, K), loss and LoRA gradients equal the hand formula on full logits."""
    service = ServiceClient(engine=session_engine)
    client = perturbed(service, session_engine, tiny_models["qwen3"], seed=2)
    run = session_engine.run(client.model_id)
    data = soft_data(384)
    output = client.forward_backward(data, "cross_entropy").result()
    got_grads = grads(session_engine, client.model_id)
    for param in run.parameters.values():
        param.grad = None

    expected_loss = torch.zeros(())
    with run.model() as model:
        for datum, result in zip(data, output.loss_fn_outputs, strict=True):
            lp = reference_soft_logprobs(model, datum)
            got = result["logprobs"].to_torch()
            assert got.shape == (datum.model_input.length, K)
            torch.testing.assert_close(got, lp.detach(), atol=1e-5, rtol=0)
            weights = datum.loss_fn_inputs["weights"].to_torch()
            expected_loss = expected_loss - (weights * lp).sum()
        expected_loss.backward()
    assert output.metrics["loss:sum"] == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-5)
    for name, grad in grads(session_engine, client.model_id).items():
        scale = max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5 * scale, rtol=1e-4)
    run.optimizer.zero_grad(set_to_none=True)


def test_soft_targets_through_the_packed_chunked_path(tiny_models, session_engine: Engine):
    """Rows shared by several sequences and the unembedding in chunks of 4 tokens give the
    full-logits path's (T, K) logprobs, and each datum's those of its own plain forward."""
    service = ServiceClient(engine=session_engine)
    client = perturbed(service, session_engine, tiny_models["llama"], seed=5)
    run = session_engine.run(client.model_id)
    data = soft_data(384, seed=1)
    batch = pack_batch(data, resolve_objective("cross_entropy"), 384, 1 << 20)
    assert batch.shares_rows and batch.targets.shape[-1] == K
    with run.model() as model, torch.no_grad():
        chunked = target_logprobs(model, batch, chunk_tokens=4)
        full = gather_logprobs(batch_logits(model, batch), batch)
        assert chunked.shape == (sum(LENGTHS), K)
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
        for datum, piece in zip(data, batch.split(chunked), strict=True):
            torch.testing.assert_close(
                piece, reference_soft_logprobs(model, datum), atol=1e-5, rtol=0
            )


def _datum(targets, weights, n: int = 4) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(list(range(1, n + 1))),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


@pytest.mark.parametrize(
    ("data", "loss_fn", "field", "words"),
    [
        (
            [_datum(torch.ones(4, 2, dtype=torch.int64), torch.ones(4))],
            "cross_entropy",
            "data[0].loss_fn_inputs['weights']",
            "that of target_tokens",
        ),
        (
            [_datum(torch.ones(4, dtype=torch.int64), torch.ones(4, 2))],
            "cross_entropy",
            "data[0].loss_fn_inputs['weights']",
            "that of target_tokens",
        ),
        (
            [_datum(torch.ones(5, 2, dtype=torch.int64), torch.ones(5, 2))],
            "cross_entropy",
            "data[0].loss_fn_inputs['target_tokens']",
            "[4, K]",
        ),
        (
            [
                _datum(torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2)),
                _datum(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3)),
            ],
            "cross_entropy",
            "data[1].loss_fn_inputs['target_tokens']",
            "same number",
        ),
        (
            [_datum(torch.full((4, 2), 999, dtype=torch.int64), torch.ones(4, 2))],
            "cross_entropy",
            "data[0].loss_fn_inputs['target_tokens']",
            "outside the vocabulary",
        ),
        (
            [_datum(torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2))],
            [("cross_entropy", 1.0), ("kl", 0.1)],
            "data[0].loss_fn_inputs['target_tokens']",
            "cross_entropy's",
        ),
    ],
)
def test_bad_soft_targets_name_the_field(data, loss_fn, field, words):
    with pytest.raises(InvalidInputError) as caught:
        pack_batch(data, resolve_objective(loss_fn), 384, 1 << 20)
    assert caught.value.field == field and words in caught.value.problem


def test_soft_targets_only_for_cross_entropy():
    datum = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": torch.ones(3, 2, dtype=torch.int64),
            "logprobs": torch.zeros(3),
            "advantages": torch.ones(3),
        },
    )
    with pytest.raises(InvalidInputError) as caught:
        pack_batch([datum], resolve_objective("ppo"), 384, 1 << 20)
    assert caught.value.field == "data[0].loss_fn_inputs['target_tokens']"
    with pytest.raises(InvalidInputError):  # a custom loss takes one target per position
        pack_batch([_datum(torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2))], None, 384, 99)


# ---- through the official SDK against a real `bios serve` ------------------------------------


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("soft-targets"), [tiny_models["llama"]])
    yield process
    process.stop()


def test_sdk_soft_targets_against_bios_serve(server, tiny_models):
    """SDK 0.38 sends 2-D torch target_tokens / weights as sparse CSR protobuf tensors; Bios
    answers (N, K) logprobs, and the loss is the hand formula on the base model's logits (a new
    LoRA adapter changes nothing until it is trained)."""
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-soft-targets")
    training = service.create_lora_training_client(base_model=tiny_models["llama"], rank=4).result()
    data = soft_data(384, seed=7)
    # Zero weights the SDK's sparse encoding drops: the targets under them must still be scored.
    data[0].loss_fn_inputs["weights"].data[0] = 0.0
    sdk_data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(d.model_input.to_ints()),
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"].to_torch(),
                "weights": d.loss_fn_inputs["weights"].to_torch(),
            },
        )
        for d in data
    ]
    result = training.forward_backward(sdk_data, "cross_entropy").result()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    expected = 0.0
    with torch.no_grad():
        for datum, output in zip(data, result.loss_fn_outputs, strict=True):
            lp = reference_soft_logprobs(model, datum)
            got = output["logprobs"].to_torch()
            assert list(got.shape) == [datum.model_input.length, K]
            torch.testing.assert_close(got, lp, atol=1e-4, rtol=0)
            expected -= float((datum.loss_fn_inputs["weights"].to_torch() * lp).sum())
    assert result.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    step = training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert step.metrics is not None
    after = training.forward(sdk_data, "cross_entropy").result()
    assert after.metrics["loss:sum"] < result.metrics["loss:sum"]  # it learns from soft targets
