"""`stable_reinforce` (Bios's definition, see `bios.objectives.stable_reinforce`) and `gspo`
(Tinker's): the objectives against hand formulas, the sampling records and provenance spans
they rest on, and both through the official SDK against a real `bios serve`."""

from __future__ import annotations

import math

import httpx
import pytest
import tinker
import torch

from bios.client.service import ServiceClient
from bios.engine.batch import pack_batch, resolve_config, resolve_objective
from bios.engine.provenance import SampledSequences
from bios.errors import InvalidInputError
from bios.objectives import DATUM_INDEX, SAMPLED, SAMPLER_LOGPROBS, get_objective
from bios.types import Datum, ModelInput, ProvenanceSpan
from server_process import ServerProcess

# ---- the objectives, against hand formulas -----------------------------------------------------


def hand_stable_reinforce(lp, mu, sampled, adv, kl_coeff, cap):
    """The loss and its gradient ∂L/∂lp, token by token in plain floats."""
    loss, grad = 0.0, []
    for t in range(len(lp)):
        if not sampled[t]:
            grad.append(0.0)
            continue
        rho = math.exp(lp[t] - mu[t])
        weight = min(rho, cap)
        loss += -weight * adv[t] * lp[t] + 0.5 * kl_coeff * (lp[t] - mu[t]) ** 2
        grad.append(-weight * adv[t] + kl_coeff * (lp[t] - mu[t]))
    return loss, grad


@pytest.mark.parametrize(("kl_coeff", "cap"), [(0.0, 2.0), (0.3, 1.5)])
def test_stable_reinforce_matches_the_hand_formula(kl_coeff, cap):
    generator = torch.Generator().manual_seed(0)
    n = 40
    mu = -2.0 + torch.randn(n, generator=generator)
    lp = (mu + 0.8 * torch.randn(n, generator=generator)).requires_grad_(True)
    sampled = (torch.rand(n, generator=generator) > 0.3).float()
    adv = torch.randn(n, generator=generator) * sampled
    inputs = {"advantages": adv, SAMPLER_LOGPROBS: mu * sampled, SAMPLED: sampled}
    objective = get_objective("stable_reinforce")
    config = resolve_config(objective, {"kl_coeff": kl_coeff, "ratio_cap": cap})
    loss, metrics = objective.fn(lp, inputs, config)
    loss.backward()
    want, want_grad = hand_stable_reinforce(
        lp.tolist(), mu.tolist(), sampled.tolist(), adv.tolist(), kl_coeff, cap
    )
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad), atol=1e-5, rtol=1e-5)
    rhos = [
        math.exp(a - b)
        for a, b, s in zip(lp.tolist(), mu.tolist(), sampled.tolist(), strict=True)
        if s
    ]
    assert any(r > cap for r in rhos) and any(r < cap for r in rhos)  # both sides exercised
    assert metrics["importance_ratio:mean"] == pytest.approx(sum(rhos) / len(rhos), rel=1e-5)
    assert metrics["clip_fraction:mean"] == pytest.approx(
        sum(r > cap for r in rhos) / len(rhos), rel=1e-6
    )
    k3 = [r - 1 - math.log(r) for r in rhos]
    assert metrics["sampler_kl:mean"] == pytest.approx(sum(k3) / len(k3), rel=1e-4)


def hand_gspo(lp, q, adv, mask, index, lo, hi):
    """Tinker's GSPO-token, sequence by sequence: the loss and ∂L/∂lp."""
    loss, grad = 0.0, [0.0] * len(lp)
    for datum in sorted(set(index)):
        tokens = [t for t in range(len(lp)) if index[t] == datum]
        masked = [t for t in tokens if mask[t]]
        s = math.exp(sum(lp[t] - q[t] for t in masked) / len(masked))
        for t in tokens:
            clipped = min(max(s, lo), hi)
            loss -= min(s * adv[t], clipped * adv[t])
            # d s_t / d lp_t = s; the clipped branch is constant wherever it is the smaller one.
            takes_unclipped = s * adv[t] <= clipped * adv[t] or lo <= s <= hi
            grad[t] = -adv[t] * s if takes_unclipped else 0.0
    return loss, grad


def test_gspo_matches_the_hand_formula():
    generator = torch.Generator().manual_seed(1)
    lengths = [6, 9, 4, 7]
    n = sum(lengths)
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q = -2.0 + torch.randn(n, generator=generator)
    # Sequences 0 and 2 move outside the clip range [0.97, 1.03], 1 and 3 stay inside.
    shift = torch.tensor([0.1, 0.0, -0.1, 0.01])[index]
    lp = (q + shift + 0.01 * torch.randn(n, generator=generator)).requires_grad_(True)
    mask = (torch.rand(n, generator=generator) > 0.3).float()
    mask[torch.tensor([0, 6, 15, 19])] = 1.0  # every sequence has a masked token
    adv = torch.randn(n, generator=generator)
    inputs = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": mask, DATUM_INDEX: index}
    config = {"clip_low_threshold": 0.97, "clip_high_threshold": 1.03}
    loss, metrics = get_objective("gspo").fn(lp, inputs, config)
    loss.backward()
    want, want_grad = hand_gspo(
        lp.tolist(), q.tolist(), adv.tolist(), mask.tolist(), index.tolist(), 0.97, 1.03
    )
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad), atol=1e-5, rtol=1e-5)
    assert 0 < metrics["clip_fraction:mean"] < 1  # some sequences clipped, some not


# ---- sampling records -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_records_are_owned_expire_and_are_bounded():
    clock = Clock()
    records = SampledSequences(max_tokens=10, ttl_seconds=100, clock=clock)
    records.record("alice", "r:0", 4, [1, 2, 3], [-0.1, -0.2, -0.3])
    assert records.lookup("bob", "r:0") is None  # another tenant's sequence is not found
    found = records.lookup("alice", "r:0")
    assert found.tokens.tolist() == [1, 2, 3] and found.prompt_length == 4
    clock.now = 90
    assert records.lookup("alice", "r:0") is not None  # use restarts its lifetime ...
    clock.now = 180
    assert records.lookup("alice", "r:0") is not None
    clock.now = 281
    assert records.lookup("alice", "r:0") is None  # ... and 100 s unused ends it
    records.record("alice", "a", 1, [1] * 4, [0.0] * 4)
    records.record("alice", "b", 1, [1] * 4, [0.0] * 4)
    records.lookup("alice", "a")  # b is now the least recently used
    records.record("alice", "c", 1, [1] * 4, [0.0] * 4)  # 12 tokens > 10: b goes
    assert records.lookup("alice", "b") is None
    assert records.lookup("alice", "a") is not None and records.lookup("alice", "c") is not None
    assert records.tokens == 8 and len(records) == 2


# ---- provenance spans in a batch ---------------------------------------------------------------

PROMPT, SAMPLED_TOKENS, MU = [3, 4, 5, 6], [7, 8, 9], [-1.0, -2.0, -0.5]


def rl_datum(sequence_id: str = "req-1:0", **changes) -> Datum:
    """A datum as the cookbook's `rl_loop` builds it: the prompt plus all but the last sampled
    token in, zeros then the sampled tokens as targets."""
    ob = len(PROMPT) - 1
    inputs = {
        "target_tokens": torch.tensor([0] * ob + SAMPLED_TOKENS),
        "logprobs": torch.tensor([0.0] * ob + MU),
        "advantages": torch.tensor([0.0] * ob + [0.5] * len(SAMPLED_TOKENS)),
    }
    inputs.update(changes.pop("inputs", {}))
    spans = {
        "model_input_spans": [
            ProvenanceSpan(type="prompt", sequence_id=sequence_id, length=len(PROMPT)),
            ProvenanceSpan(type="sampled", sequence_id=sequence_id, length=2),
        ],
        "loss_fn_input_spans": [
            ProvenanceSpan(type="prompt", sequence_id=sequence_id, offset=1, length=ob),
            ProvenanceSpan(type="sampled", sequence_id=sequence_id, length=3),
        ],
    }
    spans.update(changes)
    return Datum(
        model_input=ModelInput.from_ints(PROMPT + SAMPLED_TOKENS[:-1]),
        loss_fn_inputs=inputs,
        **spans,
    )


@pytest.fixture
def records():
    records = SampledSequences()
    records.record("me", "req-1:0", len(PROMPT), SAMPLED_TOKENS, MU)
    return records


def pack(data, records, loss_fn="stable_reinforce", owner="me"):
    lookup = lambda sequence_id: records.lookup(owner, sequence_id)  # noqa: E731
    return pack_batch(data, resolve_objective(loss_fn), 384, 1 << 20, lookup=lookup)


def test_spans_resolve_to_the_recorded_sampler_logprobs(records):
    batch = pack([rl_datum(), rl_datum()], records)
    torch.testing.assert_close(
        batch.inputs[SAMPLER_LOGPROBS], torch.tensor([0.0] * 3 + MU).repeat(2)
    )
    assert batch.inputs[SAMPLED].tolist() == [0.0] * 3 + [1.0] * 3 + [0.0] * 3 + [1.0] * 3


def span(kind, length, sequence_id="req-1:0", offset=0):
    return ProvenanceSpan(type=kind, sequence_id=sequence_id, offset=offset, length=length)


@pytest.mark.parametrize(
    ("datum", "owner", "field", "words"),
    [
        (rl_datum("req-9:0"), "me", "data[0].model_input_spans[0].sequence_id", "'req-9:0'"),
        (rl_datum(), "someone else", "data[0].model_input_spans[0].sequence_id", "'req-1:0'"),
        (rl_datum(loss_fn_input_spans=[span("sampled", 6)]), "me",
         "data[0].loss_fn_input_spans[0]", "outside sequence"),
        (rl_datum(loss_fn_input_spans=[span("prompt", 3), span("sampled", 2)]), "me",
         "data[0].loss_fn_input_spans", "cover 5 positions but there are 6"),
        (rl_datum(model_input_spans=None), "me", "data[0].model_input_spans", "pair"),
        (rl_datum(model_input_spans=None, loss_fn_input_spans=None), "me",
         "data[0].loss_fn_input_spans", "missing"),
        (rl_datum(inputs={"target_tokens": torch.tensor([0, 0, 0, 7, 1, 9])}), "me",
         "data[0].loss_fn_inputs['target_tokens']", "position 4 is token 1"),
        (rl_datum(inputs={"advantages": torch.tensor([0.0, 1.0, 0, 1, 1, 1])}), "me",
         "data[0].loss_fn_inputs['advantages']", "position 1"),
        (rl_datum(inputs={"logprobs": torch.tensor([0.0] * 3 + [-1.0, -2.5, -0.5])}), "me",
         "data[0].loss_fn_inputs['logprobs']", "recorded -2.0"),
    ],
)  # fmt: skip
def test_bad_provenance_names_the_field(records, datum, owner, field, words):
    with pytest.raises(InvalidInputError) as caught:
        pack([datum], records, owner=owner)
    assert caught.value.field == field and words in caught.value.problem


def test_other_losses_check_only_that_spans_tile(records):
    """The cookbook attaches provenance whatever the loss; without recording it names nothing
    known, and that is fine for a loss that does not read it."""
    pack([rl_datum("never-recorded")], records, loss_fn="importance_sampling")
    with pytest.raises(InvalidInputError) as caught:
        bad = rl_datum(loss_fn_input_spans=[span("sampled", 2)])
        pack([bad], records, loss_fn="importance_sampling")
    assert caught.value.field == "data[0].loss_fn_input_spans"


def test_engine_gradients_equal_a_custom_loss_of_the_hand_formula(tiny_models, session_engine):
    """The engine's stable_reinforce step accumulates the same LoRA gradients as the hand
    formula run as a user's custom loss on the same data (an independent path)."""
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=1)
    run = session_engine.run(client.model_id)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in run.parameters.items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    mu = [-6.2, -5.7, -6.0]  # about -log 384, the tiny model's own logprobs
    session_engine.sampled.record(None, "req-e:0", len(PROMPT), SAMPLED_TOKENS, mu)
    datum = rl_datum("req-e:0", inputs={"logprobs": torch.tensor([0.0] * 3 + mu)})
    config = {"kl_coeff": 0.2, "ratio_cap": 1.05}
    output = client.forward_backward([datum], "stable_reinforce", config).result()
    engine_grads = {n: p.grad.clone() for n, p in run.parameters.items()}
    for param in run.parameters.values():
        param.grad = None
    lp = output.loss_fn_outputs[0]["logprobs"].to_torch()
    sampled = [0.0] * 3 + [1.0] * 3
    adv = datum.loss_fn_inputs["advantages"].to_torch().tolist()
    mu_full = [0.0] * 3 + mu
    want, _ = hand_stable_reinforce(lp.tolist(), mu_full, sampled, adv, 0.2, 1.05)
    assert output.metrics["loss:sum"] == pytest.approx(want, rel=1e-5, abs=1e-5)

    def hand(data, logprobs):
        (x,) = logprobs
        total = torch.zeros(())
        for t in range(3, 6):
            rho = torch.exp(x[t].detach() - mu_full[t]).clamp(max=1.05)
            total = total - rho * adv[t] * x[t] + 0.1 * (x[t] - mu_full[t]) ** 2
        return total, {}

    client.forward_backward_custom([datum], hand).result()
    for name, grad in run.parameters.items():
        scale = max(1.0, float(grad.grad.abs().max()))
        torch.testing.assert_close(engine_grads[name], grad.grad, atol=1e-6 * scale, rtol=1e-5)
    run.optimizer.zero_grad(set_to_none=True)


# ---- through the official SDK against a real `bios serve` ------------------------------------

KEY = "tml-stable-reinforce"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("stable-reinforce"), [tiny_models["llama"]])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def service(server):
    return tinker.ServiceClient(base_url=server.url, api_key=KEY)


def rollouts(sampler, prompt: list[int], count: int = 3):
    params = tinker.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    response = sampler.sample(tinker.ModelInput.from_ints(prompt), count, params).result()
    return response.sequences


def sdk_datum(prompt, sequence, advantage, provenance=True, ratio_mask=False):
    """The cookbook's `rl_loop` datum (with `with_sampled_provenance`)."""
    ob = len(prompt) - 1
    tokens = list(sequence.tokens)
    inputs = {
        "target_tokens": torch.tensor([0] * ob + tokens),
        "logprobs": torch.tensor([0.0] * ob + list(sequence.logprobs)),
        "advantages": torch.tensor([0.0] * ob + [advantage] * len(tokens)),
    }
    if ratio_mask:
        inputs["sequence_ratio_mask"] = torch.tensor([0.0] * ob + [1.0] * len(tokens))
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(prompt + tokens[:-1]), loss_fn_inputs=inputs
    )
    if not provenance:
        return datum
    sid = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            tinker.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
            tinker.SampledProvenanceSpan(sequence_id=sid, length=len(tokens) - 1),
        ],
        loss_fn_inputs=[
            tinker.PromptProvenanceSpan(sequence_id=sid, offset=1, length=ob),
            tinker.SampledProvenanceSpan(sequence_id=sid, length=len(tokens)),
        ],
    )


def test_sdk_stable_reinforce_against_bios_serve(service, tiny_models):
    training = service.create_lora_training_client(base_model=tiny_models["llama"], rank=4)
    training = training.result()
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = [5, 17, 33, 2, 9]
    sequences = rollouts(sampler, prompt)
    ids = [s.sequence_id for s in sequences]
    assert len(set(ids)) == 3 and all(ids)
    advantages = [1.0, -0.5, -0.5]
    data = [sdk_datum(prompt, s, a) for s, a in zip(sequences, advantages, strict=True)]
    config = {"kl_coeff": 0.1}
    result = training.forward_backward(data, "stable_reinforce", loss_fn_config=config).result()
    want = 0.0
    for sequence, output, advantage in zip(
        sequences, result.loss_fn_outputs, advantages, strict=True
    ):
        lp = output["logprobs"].to_torch().tolist()[len(prompt) - 1 :]
        n = len(lp)
        loss, _ = hand_stable_reinforce(
            lp, sequence.logprobs, [1] * n, [advantage] * n, kl_coeff=0.1, cap=2.0
        )
        want += loss
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    # The same weights sampled and trained: every ratio is 1 up to the sampler's numerics.
    assert result.metrics["importance_ratio:mean"] == pytest.approx(1.0, abs=1e-3)
    training.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()

    # A sequence sampled without recording is named in the 400.
    plain = training.save_weights_and_get_sampling_client().result()
    (unrecorded,) = rollouts(plain, prompt, count=1)
    with pytest.raises(tinker.BadRequestError) as caught:
        training.forward_backward([sdk_datum(prompt, unrecorded, 1.0)], "stable_reinforce").result()
    assert unrecorded.sequence_id in str(caught.value)
    with pytest.raises(tinker.BadRequestError) as caught:  # no provenance at all
        no_spans = sdk_datum(prompt, sequences[0], 1.0, provenance=False)
        training.forward_backward([no_spans], "stable_reinforce").result()
    assert "loss_fn_input_spans" in str(caught.value)


def test_sdk_gspo_against_bios_serve(service, tiny_models):
    training = service.create_lora_training_client(base_model=tiny_models["llama"], rank=4)
    training = training.result()
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = [8, 3, 21, 40]
    sequences = rollouts(sampler, prompt)
    advantages = [0.7, -0.2, -0.5]
    data = [
        sdk_datum(prompt, s, a, ratio_mask=True) for s, a in zip(sequences, advantages, strict=True)
    ]
    result = training.forward_backward(data, "gspo").result()
    want = 0.0
    for sequence, output, advantage in zip(
        sequences, result.loss_fn_outputs, advantages, strict=True
    ):
        lp = output["logprobs"].to_torch().tolist()[len(prompt) - 1 :]
        n = len(lp)
        loss, _ = hand_gspo(lp, sequence.logprobs, [advantage] * n, [1] * n, [0] * n, 0.8, 1.2)
        want += loss
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    with pytest.raises(tinker.BadRequestError) as caught:  # the mask is required
        bare = sdk_datum(prompt, sequences[0], 1.0)
        training.forward_backward([bare], "gspo").result()
    assert "sequence_ratio_mask" in str(caught.value)


def test_json_sample_responses_carry_sequence_ids(server, tiny_models):
    """The JSON answer (older SDKs, Bios's client) names each sequence as the protobuf one's
    promise did."""
    headers = {"X-API-Key": KEY}
    body = {
        "base_model": tiny_models["llama"],
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
        "num_samples": 2,
        "sampling_params": {"max_tokens": 3, "seed": 1},
    }
    accepted = httpx.post(f"{server.url}/api/v1/asample", json=body, headers=headers).json()
    for _ in range(600):
        answer = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": accepted["request_id"]},
            headers=headers,
        ).json()
        if answer.get("type") != "try_again":
            break
    ids = [sequence["sequence_id"] for sequence in answer["sequences"]]
    assert ids == accepted["sample_sequence_ids"]


def test_gspo_needs_a_masked_token_per_sequence():
    datum = Datum(
        model_input=ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": torch.tensor([2, 3, 4]),
            "logprobs": torch.zeros(3),
            "advantages": torch.ones(3),
            "sequence_ratio_mask": torch.zeros(3),
        },
    )
    with pytest.raises(InvalidInputError) as caught:
        pack_batch([datum], resolve_objective("gspo"), 384, 1 << 20)
    assert caught.value.field == "data[0].loss_fn_inputs['sequence_ratio_mask']"
