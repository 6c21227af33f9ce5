"""Custom objectives on the live graph, preference learning, KL terms and combinations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from bios.errors import InvalidInputError
from bios.types import AdamParams, Datum, ModelInput
from helpers import random_datum, reference_logprobs, state_fingerprint
from test_objectives import perturb_adapter


@pytest.fixture
def client(service: ServiceClient, session_engine: Engine, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    perturb_adapter(session_engine, client.model_id)
    return client


def grads(engine: Engine, client) -> dict[str, torch.Tensor]:
    run = engine.run(client.model_id)
    out = {name: p.grad.clone() for name, p in run.parameters.items()}
    run.optimizer.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Equal up to fp32 rounding: `atol` relative to the largest gradient entry."""
    assert a.keys() == b.keys()
    scale = max(1.0, max(g.abs().max().item() for g in b.values()))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol * scale, rtol=1e-5)


def sft_data(n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [random_datum(384, 5 + 2 * i, "cross_entropy", generator) for i in range(n)]


def pair_data(pairs: int = 2, seed: int = 0) -> list[Datum]:
    """(chosen, rejected) pairs sharing a prompt; weights 1 on the response tokens only."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(pairs):
        prompt = torch.randint(0, 384, (4,), generator=generator).tolist()
        for response_length in (3, 5):
            response = torch.randint(0, 384, (response_length,), generator=generator).tolist()
            tokens = prompt + response
            weights = [0.0] * (len(prompt) - 1) + [1.0] * response_length
            data.append(
                Datum(
                    model_input=ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
                )
            )
    return data


# ---- custom objectives -------------------------------------------------------------------------


def test_custom_cross_entropy_equals_builtin(client, session_engine):
    data = sft_data()
    builtin = client.forward_backward(data, "cross_entropy").result()
    expected = grads(session_engine, client)

    def custom(batch, logprobs_list):
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(batch, logprobs_list, strict=True)
        )
        return loss, {"tokens:sum": float(sum(len(lp) for lp in logprobs_list))}

    result = client.forward_backward_custom(data, custom).result()
    assert_same_grads(grads(session_engine, client), expected)
    assert result.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-6)
    assert result.metrics["tokens:sum"] == 5 + 7 + 9
    for a, b in zip(result.loss_fn_outputs, builtin.loss_fn_outputs, strict=True):
        assert a["logprobs"].tolist() == pytest.approx(b["logprobs"].tolist(), abs=1e-6)


def test_custom_logits_input(client, session_engine, llama):
    """`loss_type_input="logits"` gives each datum's (N, vocab) logits with gradient."""
    data = sft_data(2)
    seen = []

    def from_logits(batch, logits_list):
        seen.extend(t.detach().clone() for t in logits_list)
        loss = torch.zeros(())
        for datum, logits in zip(batch, logits_list, strict=True):
            targets = datum.loss_fn_inputs["target_tokens"].to_torch()
            lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
            loss = loss - (lp * datum.loss_fn_inputs["weights"].to_torch()).sum()
        return loss, {}

    client.forward_backward_custom(data, from_logits, loss_type_input="logits").result()
    via_logits = grads(session_engine, client)
    client.forward_backward(data, "cross_entropy").result()
    assert_same_grads(via_logits, grads(session_engine, client))
    assert [t.shape for t in seen] == [(5, 384), (7, 384)]


def test_custom_entropy_bonus_matches_finite_differences(client, session_engine):
    """A loss no built-in offers (mean entropy of the next-token distribution), checked by FD."""
    data = sft_data(1)

    def entropy(batch, logits_list):
        logp = torch.log_softmax(logits_list[0], -1)
        return -(logp.exp() * logp).sum(-1).mean(), {}

    client.forward_backward_custom(data, entropy, loss_type_input="logits").result()
    analytic = grads(session_engine, client)
    check_finite_differences(
        client, session_engine, analytic, lambda: value_of_custom(client, data, entropy)
    )


def value_of_custom(client, data, fn) -> float:
    """The custom loss value (check_finite_differences clears the gradients it leaves)."""
    return (
        client.forward_backward_custom(data, fn, loss_type_input="logits")
        .result()
        .metrics["loss:sum"]
    )


def check_finite_differences(client, engine, analytic, loss_value, count: int = 4, h: float = 1e-2):
    """Central differences on the `count` largest-gradient adapter entries, in float64 arithmetic
    of fp32 losses; agreement to a few percent is what fp32 allows."""
    run = engine.run(client.model_id)
    entries = sorted(
        ((g.abs().max().item(), name, int(g.abs().argmax())) for name, g in analytic.items()),
        reverse=True,
    )[:count]
    for _, name, flat_index in entries:
        param = run.parameters[name]
        original = param.data.view(-1)[flat_index].item()
        values = []
        for delta in (h, -h):
            param.data.view(-1)[flat_index] = original + delta
            values.append(loss_value())
            run.optimizer.zero_grad(set_to_none=True)
        param.data.view(-1)[flat_index] = original
        numeric = (values[0] - values[1]) / (2 * h)
        assert numeric == pytest.approx(
            analytic[name].view(-1)[flat_index].item(), rel=0.05, abs=1e-3
        )


BAD_CUSTOM = {
    "non-scalar": (lambda d, lps: (torch.cat(lps), {}), r"expected a scalar tensor"),
    "NaN": (lambda d, lps: (lps[0].sum() * float("nan"), {}), r"non-finite loss"),
    "not connected": (lambda d, lps: (torch.tensor(1.0, requires_grad=True), {}), r"no gradient"),
    "not a tuple": (lambda d, lps: lps[0].sum(), r"must return \(loss, metrics\)"),
    "bad metrics": (
        lambda d, lps: (lps[0].sum(), {"x": "high"}),
        r"metrics values must be numbers",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CUSTOM))
def test_bad_custom_loss_is_rejected_without_changing_state(case, client, session_engine):
    client.forward_backward(sft_data(), "cross_entropy").result()  # pending gradients count too
    run = session_engine.run(client.model_id)
    before = state_fingerprint(run)
    fn, message = BAD_CUSTOM[case]
    with pytest.raises(InvalidInputError, match=f"loss_fn: .*{message}"):
        client.forward_backward_custom(sft_data(), fn).result()
    assert state_fingerprint(run) == before


def test_custom_loss_exception_propagates_without_changing_state(client, session_engine):
    run = session_engine.run(client.model_id)
    before = state_fingerprint(run)

    def broken(data, logprobs_list):
        raise RuntimeError("my loss has a bug")

    with pytest.raises(RuntimeError, match="my loss has a bug"):
        client.forward_backward_custom(sft_data(), broken).result()
    with pytest.raises(InvalidInputError, match="loss_type_input"):
        client.forward_backward_custom(sft_data(), broken, loss_type_input="probs")
    with pytest.raises(InvalidInputError, match="loss_fn: expected a callable"):
        client.forward_backward_custom(sft_data(), "cross_entropy")
    assert state_fingerprint(run) == before


# ---- preference learning ----------------------------------------------------------------------


def hand_preference(
    name: str, policy: list[float], reference: list[float], beta: float, eps: float = 0.0
):
    """Sequence log-probs (weighted sums) of chosen/rejected pairs -> the loss, by hand."""
    total = 0.0
    for k in range(0, len(policy), 2):
        h = beta * ((policy[k] - reference[k]) - (policy[k + 1] - reference[k + 1]))
        if name == "dpo":
            sig = 1 / (1 + math.exp(-h))
            total += -((1 - eps) * math.log(sig) + eps * math.log(1 - sig))
        elif name == "dpo_hinge":
            total += max(0.0, 1 - h)
        elif name == "ipo":
            total += (h / beta - 1 / (2 * beta)) ** 2
    return total


def sequence_logprobs(model, data) -> list[float]:
    return [
        float((reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum())
        for d in data
    ]


@pytest.mark.parametrize(
    "name, config",
    [
        ("dpo", {"beta": 0.5}),
        ("dpo", {"beta": 0.2, "label_smoothing": 0.1}),
        ("dpo_hinge", {"beta": 0.5}),
        ("ipo", {"beta": 0.5}),
    ],
)
def test_preference_losses_match_hand_formula_and_finite_differences(
    name, config, client, session_engine, llama, tmp_path
):
    data = pair_data()
    out = client.forward_backward(data, name, config).result()
    analytic = grads(session_engine, client)

    # Reference: the plain base model (the default reference); policy: the run's adapter via PEFT.
    base = AutoModelForCausalLM.from_pretrained(llama)
    client.save_weights_for_sampler(f"pref-{name}-{len(config)}").result()
    from peft import PeftModel

    folder = (
        session_engine.home
        / "runs"
        / client.model_id
        / "sampler_weights"
        / f"pref-{name}-{len(config)}"
    )
    policy_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), folder)
    policy, reference = sequence_logprobs(policy_model, data), sequence_logprobs(base, data)
    expected = hand_preference(
        name, policy, reference, config["beta"], config.get("label_smoothing", 0.0)
    )
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    margins = [
        config["beta"] * ((policy[k] - reference[k]) - (policy[k + 1] - reference[k + 1]))
        for k in (0, 2)
    ]
    assert out.metrics["reward_margin:mean"] == pytest.approx(sum(margins) / 2, rel=1e-4, abs=1e-5)
    assert out.metrics["accuracy:mean"] == sum(m > 0 for m in margins) / 2

    check_finite_differences(
        client,
        session_engine,
        analytic,
        lambda: client.forward(data, name, config).result().metrics["loss:sum"],
    )


def test_reference_from_data_or_snapshot(client, session_engine, llama):
    data = pair_data()
    from_base = client.forward(data, "dpo").result().metrics["loss:sum"]
    base = AutoModelForCausalLM.from_pretrained(llama)
    with_ref = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                **d.loss_fn_inputs,
                "ref_logprobs": reference_logprobs(base, d).detach(),
            },
        )
        for d in data
    ]
    assert client.forward(with_ref, "dpo").result().metrics["loss:sum"] == pytest.approx(
        from_base, rel=1e-5
    )

    # A snapshot of the policy itself as the reference: every margin is 0, the loss is log 2.
    path = client.save_weights_for_sampler("self-ref").result().path
    out = client.forward(data, "dpo", reference=path).result()
    assert out.metrics["loss:sum"] == pytest.approx(2 * math.log(2), rel=1e-5)
    assert out.metrics["reward_margin:mean"] == pytest.approx(0.0, abs=1e-5)


def test_dpo_training_raises_accuracy(service, llama):
    client = service.create_lora_training_client(llama, rank=8, seed=1)
    data = pair_data(4, seed=3)
    first = client.forward(data, "dpo").result()
    for _ in range(8):
        client.forward_backward(data, "dpo", {"beta": 0.5})
        client.optim_step(AdamParams(learning_rate=5e-3))
    last = client.forward(data, "dpo").result()
    assert first.metrics["accuracy:mean"] == 0.0  # a new run equals its reference: no margin
    assert last.metrics["accuracy:mean"] == 1.0
    assert last.metrics["loss:sum"] < first.metrics["loss:sum"]


# ---- KL and combinations ----------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [1, 2, 3])
def test_kl_estimators_match_hand_formula(estimator, client, session_engine, llama):
    data = sft_data(2)
    out = client.forward(data, "kl", {"estimator": estimator}).result()
    base = AutoModelForCausalLM.from_pretrained(llama)
    total = 0.0
    for datum, output in zip(data, out.loss_fn_outputs, strict=True):
        d = (
            output["logprobs"].to_torch().double()
            - reference_logprobs(base, datum).detach().double()
        )
        w = datum.loss_fn_inputs["weights"].to_torch().double()
        k = {1: d, 2: 0.5 * d**2, 3: torch.exp(-d) - 1 + d}[estimator]
        total += float((w * k).sum())
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-4, abs=1e-6)


def test_kl_of_a_new_run_to_the_base_is_zero(service, llama):
    client = service.create_lora_training_client(llama, rank=4, seed=0)
    out = client.forward(sft_data(2), "kl").result()
    assert out.metrics["loss:sum"] == pytest.approx(0.0, abs=1e-6)


def test_combination_gradients_equal_the_sum_of_the_parts(client, session_engine):
    generator = torch.Generator().manual_seed(4)
    data = [random_datum(384, 6, "ppo", generator, weights=torch.ones(6)) for _ in range(3)]
    config = {"ppo.clip_low_threshold": 0.9, "estimator": 2}
    combined = client.forward_backward(data, [("ppo", 1.0), ("kl", 0.05)], config).result()
    both = grads(session_engine, client)

    def only(keys):
        return [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k in keys},
            )
            for d in data
        ]

    ppo_data = only({"target_tokens", "logprobs", "advantages"})
    ppo = client.forward_backward(ppo_data, "ppo", {"clip_low_threshold": 0.9}).result()
    ppo_grads = grads(session_engine, client)
    kl = client.forward_backward(
        only({"target_tokens", "weights"}), "kl", {"estimator": 2}
    ).result()
    kl_grads = grads(session_engine, client)
    assert_same_grads(both, {k: ppo_grads[k] + 0.05 * kl_grads[k] for k in both}, atol=1e-5)
    expected = ppo.metrics["loss:sum"] + 0.05 * kl.metrics["loss:sum"]
    assert combined.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert combined.metrics["ppo/loss:sum"] == pytest.approx(ppo.metrics["loss:sum"], rel=1e-6)
    assert combined.metrics["kl/kl:mean"] == pytest.approx(kl.metrics["kl:mean"], rel=1e-6)


BAD_PREFERENCE = {
    "odd count": (lambda: pair_data()[:3], "dpo", None, None, r"data: .*odd number of data \(3\)"),
    "no weights": (
        lambda: [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]},
            )
            for d in pair_data()
        ],
        "dpo",
        None,
        None,
        r"missing key 'weights' required by loss_fn 'dpo'",
    ),
    "negative beta": (
        pair_data,
        "ipo",
        {"beta": -1.0},
        None,
        r"loss_fn_config\['beta'\]: expected a positive number",
    ),
    "smoothing": (
        pair_data,
        "dpo",
        {"label_smoothing": 0.7},
        None,
        r"expected a number in \[0, 0.5\)",
    ),
    "estimator": (lambda: sft_data(1), "kl", {"estimator": 4}, None, r"expected 1, 2 or 3"),
    "bad combination": (
        lambda: sft_data(1),
        [("ppo", "a lot")],
        None,
        None,
        r"loss_fn: expected a loss name or a list",
    ),
    "unknown part": (
        lambda: sft_data(1),
        [("ppo", 1.0), ("klx", 1.0)],
        None,
        None,
        r"unknown loss 'klx'",
    ),
    "unknown config key": (
        pair_data,
        [("dpo", 1.0), ("kl", 0.1)],
        {"gamma": 1.0},
        None,
        r"not a setting",
    ),
    "missing reference": (
        pair_data,
        "dpo",
        None,
        "bios://nope/weights/x",
        r"reference: no checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PREFERENCE))
def test_bad_preference_requests(case, client, session_engine):
    make, loss_fn, config, reference, message = BAD_PREFERENCE[case]
    run = session_engine.run(client.model_id)
    before = state_fingerprint(run)
    with pytest.raises((InvalidInputError, LookupError), match=message):
        client.forward_backward(make(), loss_fn, config, reference=reference)
    client.forward(sft_data(1), "cross_entropy").result()
    assert state_fingerprint(run) == before


def test_full_finetune_checkpoint_cannot_be_a_reference(service, llama, client):
    full = service.create_full_training_client(llama)
    path = full.save_weights_for_sampler("full").result().path
    with pytest.raises(InvalidInputError, match="full fine-tuning checkpoint"):
        client.forward(pair_data(), "dpo", reference=path)


def test_logsigmoid_reference_sanity():
    """The hand formula used above agrees with torch for a known margin."""
    assert hand_preference("dpo", [1.0, 0.0], [0.0, 0.0], 1.0) == pytest.approx(
        -F.logsigmoid(torch.tensor(1.0)).item()
    )
