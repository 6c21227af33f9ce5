"""The engine's forward: packed batches, the chunked loss and gradient checkpointing give the
same numbers as a padded batch, full logits and a plain backward.

References are computed here, independently of Bios's forward: each sequence alone through a
plain transformers forward (what padding computes: no token sees another sequence), and the
full (tokens × vocabulary) logits through the model's own forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bios.client.service import ServiceClient
from bios.engine import forward
from bios.engine.batch import (
    attention_cost,
    pack_batch,
    pack_sequences,
    resolve_config,
    resolve_objective,
    row_width,
)
from bios.engine.engine import Engine
from bios.engine.forward import (
    batch_logits,
    chunk_tokens_for,
    gather_logprobs,
    logprobs_and_logits_grad,
    model_inputs,
    target_logprobs,
)
from bios.errors import InvalidInputError
from bios.models.attention import ATTENTION, takes_segments
from bios.models.lora import AdapterHost, LoRAAdapter
from bios.objectives import linear_coefficients
from bios.types import Datum, LoraConfig, ModelInput
from helpers import peak_allocated, random_datum, reference_logprobs
from test_soft_targets import soft_data

FAMILIES = ("llama", "qwen2", "qwen3")
LENGTHS = (7, 3, 12, 5, 12, 1, 9)  # uneven: rows hold several sequences and end in padding


def test_pack_sequences_layout():
    rows = [torch.arange(n) + 10 * i for i, n in enumerate((4, 2, 3, 4, 1))]
    batch = pack_sequences(rows, rows, {})
    # Rows as long as the longest sequence (4), filled in order while the next one fits.
    assert batch.segment_ids.tolist() == [
        [0, 0, 0, 0],
        [1, 1, -1, -1],
        [2, 2, 2, -1],
        [3, 3, 3, 3],
        [4, -1, -1, -1],
    ]
    assert batch.position_ids[1].tolist() == [0, 1, 0, 1]  # padding numbered on its own
    assert batch.input_ids[batch.mask].tolist() == torch.cat(rows).tolist()  # datum order
    assert not batch.shares_rows  # one sequence a row: the plain causal mask suffices

    sequences = [torch.arange(3), torch.arange(1) + 5, torch.arange(2) + 7]
    shared = pack_sequences(sequences, sequences, {})
    assert shared.shares_rows and shared.segment_ids.tolist() == [[0, 0, 0], [1, 2, 2]]
    assert shared.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]
    # Causal within a sequence, nothing across: token 5 and tokens 7, 8 share a row only.
    assert shared.attention_mask()[1, 0].tolist() == [
        [True, False, False],
        [False, True, False],
        [False, True, True],
    ]
    additive = shared.attention_mask(torch.float32)[1, 0]
    assert additive[0, 0] == 0 and additive[0, 1] == torch.finfo(torch.float32).min
    selected = shared.select(1, 3)
    assert selected.lengths == [1, 2]
    assert selected.segment_ids.tolist() == [[0, -1], [1, 1]]
    assert selected.input_ids[selected.mask].tolist() == [5, 7, 8]


def test_rows_of_the_cheapest_width():
    """With a model's attention cost a, rows are as wide as makes Σ rows · W · (1 + a·W) least.
    By hand for lengths 6, 5, 6, 5, 10 and a = 0.01: width 10 (the longest) packs one sequence
    a row, 5 · 10 · 1.1 = 55; capacity 12 packs [6, 5] [6, 5] [10] into 3 rows of 11,
    3 · 11 · 1.11 = 36.6; capacity 18 gives [6, 5, 6] [5, 10], 2 · 17 · 1.17 = 39.8; one row of
    all 32 tokens 32 · 1.32 = 42.2: capacity 12 is the cheapest."""
    lengths = [6, 5, 6, 5, 10]
    assert row_width(lengths, None) == 10
    assert row_width(lengths, 0.01) == 12
    rows = [torch.arange(n) + 100 * i for i, n in enumerate(lengths)]
    batch = pack_sequences(rows, rows, {}, attention_cost=0.01)
    assert tuple(batch.input_ids.shape) == (3, 11)
    assert batch.segment_ids[:, 0].tolist() == [0, 2, 4]
    assert batch.input_ids[batch.mask].tolist() == torch.cat(rows).tolist()  # datum order
    assert batch.select(0, 4).input_ids.shape[0] == 2  # shards are packed the same way
    # Equal lengths: one sequence a row (no mask) is the cheapest whatever a is.
    assert row_width([256] * 8, 3.3e-4) == 256
    # a = 0 (attention sequence by sequence, which packing does not change): the least padding,
    # here one row of all 32 tokens; with equal lengths still one sequence a row.
    assert row_width(lengths, 0.0) == 32 and row_width([256] * 8, 0.0) == 256
    # a for SmolLM2-135M's shapes, by hand: 4·576 / (2·(576·(2·576 + 2·192) + 3·576·1536)).
    config = LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )
    assert attention_cost(config) == pytest.approx(2304 / 7077888, rel=1e-12)


def test_cpu_attention_takes_packed_rows_as_segment_ids(tiny_models, session_engine: Engine):
    """On the CPU, where Bios's attention runs each packed sequence on its own, rows that share
    reach the model with their segment ids in the mask's place, and the engine packs with no
    attention cost (the least padding); an eager model gets the block-diagonal additive mask."""
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=0)
    run = session_engine.run(client.model_id)
    data = uneven_data(384, "cross_entropy")
    batch = pack_batch(data, resolve_objective("cross_entropy"), 384, 1 << 20)
    assert batch.shares_rows
    with run.model() as model:
        assert takes_segments(model)
        inputs = model_inputs(model, batch)
        assert torch.equal(inputs["attention_mask"], batch.segment_ids[:, None, None, :])
        assert torch.equal(inputs["position_ids"], batch.position_ids)
        model.config._attn_implementation = "eager"
        try:
            assert not takes_segments(model)
            eager = model_inputs(model, batch)["attention_mask"]
        finally:
            model.config._attn_implementation = ATTENTION
    assert torch.equal(eager, batch.attention_mask(model.dtype))
    assert session_engine.worker(tiny_models["llama"]).attention_cost == 0.0


def uneven_data(vocab: int, loss_fn: str, seed: int = 0) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    return [random_datum(vocab, n, loss_fn, generator) for n in LENGTHS]


def perturbed_client(service: ServiceClient, engine: Engine, model: str, seed: int = 0):
    """A LoRA run whose B factors are non-zero, so the adapter changes the logits."""
    client = service.create_lora_training_client(model, rank=4, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in engine.run(client.model_id).parameters.items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return client


def grads_of(engine: Engine, run_id: str) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in engine.run(run_id).parameters.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_and_gradients_equal_each_sequence_alone(
    family, tiny_models, session_engine: Engine
):
    """Packing several sequences into a row changes nothing: logprobs equal a plain forward of
    each sequence alone, and the gradients equal those of the padded batch, within 1e-5 in
    float32."""
    service = ServiceClient(engine=session_engine)
    client = perturbed_client(service, session_engine, tiny_models[family])
    run = session_engine.run(client.model_id)
    data = uneven_data(384, "cross_entropy")
    batch = pack_batch(data, resolve_objective("cross_entropy"), 384, 1 << 20)
    assert batch.input_ids.shape[0] < len(data), "the test must pack sequences together"

    output = client.forward_backward(data, "cross_entropy").result()
    packed_grads = grads_of(session_engine, client.model_id)
    with run.model() as model, torch.no_grad():
        for datum, result in zip(data, output.loss_fn_outputs, strict=True):
            expected = reference_logprobs(model, datum)
            torch.testing.assert_close(result["logprobs"].to_torch(), expected, atol=1e-5, rtol=0)

    # Today's padded computation, written out: right-padded rows (under the causal mask a real
    # token never sees the padding after it), the model's own forward, Σ w·logp.
    for param in run.parameters.values():
        param.grad = None
    rows = [torch.tensor(d.model_input.to_ints()) for d in data]
    targets = [d.loss_fn_inputs["target_tokens"].to_torch() for d in data]
    weights = torch.cat([d.loss_fn_inputs["weights"].to_torch() for d in data])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    real = torch.arange(padded.shape[1])[None, :] < torch.tensor(LENGTHS)[:, None]
    with run.model() as model:
        logits = model(input_ids=padded).logits.float()[real]
        logprobs = torch.log_softmax(logits, -1).gather(-1, torch.cat(targets)[:, None])[:, 0]
        (-(weights * logprobs).sum()).backward()
    # Within 1e-5 of each tensor's largest entry: elementwise, float32 accumulations of entries
    # of size ~10 differ by 1.4e-5 on an AVX-512 CPU (its kernels sum in another order).
    for name, grad in grads_of(session_engine, client.model_id).items():
        scale = float(grad.abs().max())
        assert float((packed_grads[name] - grad).abs().max()) <= 1e-5 * scale, name


# Gradients norm-wise within 2e-6 (logprobs and losses within 1e-6). A 4-token chunk's GEMMs
# round differently from one GEMM over all tokens, and how much depends on the CPU's kernels: on
# a Xeon with AVX-512 and AMX, oneDNN's (M × 1000) @ (1000 × 32) products in transposed layouts
# (the lm_head LoRA factor's backward) change with M by up to 4.8e-7 of the largest entry, and
# the chunked gradients differ from the unchunked ones by up to 1.17e-6 norm-wise through two
# layers (within 1e-6 of the largest entry on the AMD EPYCs this ran on before).
GRADIENT_TOLERANCE = 2e-6


def gradient_error(grad: torch.Tensor, reference: torch.Tensor) -> float:
    """‖grad − reference‖ / max(‖reference‖, 1)."""
    difference = float(torch.linalg.vector_norm(grad - reference))
    return difference / max(float(torch.linalg.vector_norm(reference)), 1.0)


OBJECTIVE_CASES = [
    ("cross_entropy", "cross_entropy", {}),
    ("importance_sampling", "importance_sampling", {}),
    ("ppo", "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", "cispo", {}),
    ("dro", "dro", {"beta": 0.3}),
    ("dpo", "cross_entropy", {"beta": 0.1}),
    ("dpo_hinge", "cross_entropy", {}),
    ("ipo", "cross_entropy", {}),
    ("kl", "cross_entropy", {}),
    ([("ppo", 1.0), ("kl", 0.05)], "ppo", {}),
]


def with_reference(data: list[Datum], seed: int) -> list[Datum]:
    """The data with `ref_logprobs` (near a tiny model's own) and, for pairs, an even count."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for datum in data[: len(data) // 2 * 2]:
        inputs = dict(datum.loss_fn_inputs)
        length = datum.model_input.length
        inputs["ref_logprobs"] = -6.0 + 0.3 * torch.randn(length, generator=generator)
        if "weights" not in inputs:
            inputs["weights"] = torch.ones(length)
        out.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return out


@pytest.mark.parametrize(("loss_fn", "data_kind", "config"), OBJECTIVE_CASES, ids=str)
def test_chunked_loss_equals_full_logits(loss_fn, data_kind, config, tiny_models, session_engine):
    """Every built-in objective and a combination: the chunked unembedding (chunks of 4 tokens,
    so every sequence spans several) gives the full-logits path's logprobs and loss within 1e-6
    and gradients within GRADIENT_TOLERANCE, in float32."""
    service = ServiceClient(engine=session_engine)
    client = perturbed_client(service, session_engine, tiny_models["qwen3"], seed=4)
    run = session_engine.run(client.model_id)
    objective = resolve_objective(loss_fn)
    data = uneven_data(384, data_kind, seed=2)
    if objective.needs_reference:
        data = with_reference(data, seed=3)
    batch = pack_batch(data, objective, 384, 1 << 20)
    resolved = resolve_config(objective, config)

    results = {}
    for path in ("full", "chunked"):
        for param in run.parameters.values():
            param.grad = None
        with run.model() as model:
            if path == "full":
                logprobs = gather_logprobs(batch_logits(model, batch), batch)
            else:
                logprobs = target_logprobs(model, batch, chunk_tokens=4)
            loss, _ = objective.fn(logprobs, batch.inputs, resolved)
            loss.backward()
        results[path] = (logprobs.detach(), loss.detach(), grads_of(session_engine, run.run_id))
    (lp_full, loss_full, g_full), (lp_chunk, loss_chunk, g_chunk) = results.values()
    torch.testing.assert_close(lp_chunk, lp_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_chunk, loss_full, atol=1e-6, rtol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_full.values())
    for name, grad in g_full.items():
        assert gradient_error(g_chunk[name], grad) <= GRADIENT_TOLERANCE, name


LINEAR_CASES = [
    ("cross_entropy", "llama"),
    ("cross_entropy", "qwen2"),
    ("cross_entropy", "qwen3"),
    ([("cross_entropy", 0.37)], "qwen3"),
    ("soft", "llama"),
    ("prompts", "llama"),
    ("prompts", "qwen3"),
    ("soft prompts", "llama"),
    ("unweighted", "qwen2"),
]


def with_prompts(data: list[Datum], prompt_share: float) -> list[Datum]:
    """`data` with the weights of each datum's first `prompt_share` of positions (a prompt's)
    set to zero: the whole datum at 1.0."""
    prompted = []
    for datum in data:
        inputs = {name: value.to_torch().clone() for name, value in datum.loss_fn_inputs.items()}
        inputs["weights"][: round(prompt_share * len(inputs["weights"]))] = 0.0
        prompted.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return prompted


@pytest.mark.parametrize(("loss_fn", "family"), LINEAR_CASES, ids=str)
def test_unembedding_backward_in_the_forward_equals_full_logits(
    loss_fn, family, tiny_models, session_engine, monkeypatch
):
    """A linear objective's ∂L/∂logprobs is known before the forward: the unembedding's backward
    then runs chunk by chunk inside it. Logprobs, loss and every gradient (the LoRA factors of
    lm_head among them) equal the full-logits path's within 1e-6 (gradients: GRADIENT_TOLERANCE),
    in float32, with ∂L/∂logits formed the CPU's way and a GPU's (`KERNEL_GRADIENT_DEVICES`);
    the Run's own step takes this path and gives the same gradients."""
    service = ServiceClient(engine=session_engine)
    client = perturbed_client(service, session_engine, tiny_models[family], seed=5)
    run = session_engine.run(client.model_id)
    case = loss_fn
    if loss_fn == "soft":
        data, loss_fn = soft_data(384, seed=3), "cross_entropy"
    elif loss_fn == "soft prompts":
        data, loss_fn = with_prompts(soft_data(384, seed=3), 0.3), "cross_entropy"
    elif loss_fn in ("prompts", "unweighted"):
        # Prompts (weight 0) skip the unembedding's backward; with no weight anywhere, nothing
        # takes part in it and every gradient is zero.
        share = 0.5 if loss_fn == "prompts" else 1.0
        data, loss_fn = (
            with_prompts(uneven_data(384, "cross_entropy", seed=6), share),
            "cross_entropy",
        )
    else:
        data = uneven_data(384, "cross_entropy", seed=6)
    objective = resolve_objective(loss_fn)
    assert objective.linear
    batch = pack_batch(data, objective, 384, 1 << 20)
    config = resolve_config(objective, {})
    known = linear_coefficients(objective, batch.inputs, config, batch.flat_targets())
    if case in ("prompts", "soft prompts"):  # some positions live, some not
        assert 0 < (known != 0).sum() < known.numel()
    # By hand: cross_entropy's L = −c Σ w·logp, so ∂L/∂logp = −c·w.
    coefficient = 0.37 if objective.name != "cross_entropy" else 1.0
    torch.testing.assert_close(known, -coefficient * batch.inputs["weights"], atol=0, rtol=0)

    results = {}
    for path in ("full", "known", "known, by exp", "engine"):
        for param in run.parameters.values():
            param.grad = None
        if path == "engine":
            output = run.forward_backward(batch, objective, config, backward=True)
            results[path] = (None, None, grads_of(session_engine, run.run_id))
            assert float(output.metrics["loss:sum"]) == pytest.approx(float(results["full"][1]))
            continue
        with run.model() as model, monkeypatch.context() as patch:
            if path == "known, by exp":
                patch.setattr(forward, "KERNEL_GRADIENT_DEVICES", frozenset())
            if path == "full":
                logprobs = gather_logprobs(batch_logits(model, batch), batch)
            else:
                logprobs = target_logprobs(model, batch, chunk_tokens=4, logprob_grads=known)
            loss, _ = objective.fn(logprobs, batch.inputs, config)
            loss.backward()
        results[path] = (logprobs.detach(), loss.detach(), grads_of(session_engine, run.run_id))
    lp_full, loss_full, g_full = results["full"]
    for lp_known, loss_known, _ in (results["known"], results["known, by exp"]):
        torch.testing.assert_close(lp_known, lp_full, atol=1e-6, rtol=0)
        torch.testing.assert_close(loss_known, loss_full, atol=1e-6, rtol=1e-6)
    known_grads = [results[path][2] for path in ("known", "known, by exp", "engine")]
    if case == "unweighted":  # every factor still gets its (zero) gradient, as autograd gives
        for grads in (g_full, *known_grads):
            assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        return
    assert any("lm_head" in name and g.abs().sum() > 0 for name, g in g_full.items())
    for grads in known_grads:
        for name, grad in g_full.items():
            assert gradient_error(grads[name], grad) <= GRADIENT_TOLERANCE, name


def test_the_unembedding_holds_three_chunks_of_logits_at_most():
    """With the unembedding's backward run in the forward, a spent chunk is let go before the
    next chunk's logits are made: at the peak the log-softmax buffer and the next chunk's logits
    and LoRA delta (lm_head adapted, as by default), the three chunk-sized tensors the memory
    planner counts (`memory.step_bytes`), not four. A 32k vocabulary and a one-layer decoder of
    width 16, so the chunks are all but the whole of the peak."""
    config = LlamaConfig(
        vocab_size=32768, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).requires_grad_(False)
    host = AdapterHost(model)
    lora = LoraConfig(rank=4, train_attn=False, train_mlp=False, train_unembed=True)
    adapter = LoRAAdapter.for_model(model, lora)
    generator = torch.Generator().manual_seed(1)
    data = [random_datum(32768, n, "cross_entropy", generator) for n in (150, 120, 90)]
    batch = pack_batch(data, resolve_objective("cross_entropy"), 32768, 1 << 20)
    chunk, chunk_bytes = 64, 64 * 32768 * 4
    assert batch.num_tokens >= 4 * chunk

    def chunked():
        with host.use(adapter):
            grads = -batch.inputs["weights"]
            target_logprobs(model, batch, chunk_tokens=chunk, logprob_grads=grads)

    factor_gradients = 2 * sum(p.numel() for p in adapter.parameters()) * 4  # a chunk's, the sum
    assert peak_allocated(chunked) <= 3 * chunk_bytes + factor_gradients + chunk_bytes // 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("by_kernel", [True, False], ids=["by kernel", "by exp"])
def test_logits_gradient_in_place_is_autograds(dtype, soft, by_kernel):
    """The known-gradient path's logprobs are bit for bit autograd's through float32
    log-softmax and gather, and so is its ∂L/∂logits, written over the spent logits, by
    autograd's kernel (the CPU's way); by the exponential (a GPU's way) it is within a few
    units of float32's last place (autograd's kernel has its own vectorised exponential: 2
    units at most here) and, rounded to bf16, the same. One target or K soft targets per
    position (a target listed twice counts twice)."""
    generator = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(37, 500, generator=generator)).to(dtype)
    if soft:
        targets = torch.randint(0, 500, (37, 4), generator=generator)
        targets[:, 3] = targets[:, 0]
        grads = -torch.rand(37, 4, generator=generator)
    else:
        targets = torch.randint(0, 500, (37,), generator=generator)
        grads = -torch.rand(37, generator=generator)
    leaf = logits.clone().requires_grad_()
    log_softmax = leaf.float().log_softmax(dim=-1)
    expected = log_softmax.gather(-1, targets if soft else targets[:, None])
    expected = expected if soft else expected[:, 0]
    (expected_grad,) = torch.autograd.grad(expected, leaf, grads)

    chunk = logits.clone()
    logprobs, logits_grad = logprobs_and_logits_grad(chunk, targets, grads, by_kernel=by_kernel)
    assert logits_grad.dtype == dtype and logprobs.shape == targets.shape
    assert logits_grad.data_ptr() == chunk.data_ptr()  # written over the spent logits
    assert torch.equal(logprobs, expected.detach())
    if dtype == torch.float32 and not by_kernel:
        difference = (logits_grad - expected_grad).abs()
        assert bool((difference <= 4 * torch.finfo(dtype).eps * expected_grad.abs()).all())
    else:
        assert torch.equal(logits_grad, expected_grad)
    # and by hand: Σ_k g_k·e_{y_k} − (Σ_k g_k)·softmax(z), within the gradient dtype's rounding
    index, per_target = (targets, grads) if soft else (targets[:, None], grads[:, None])
    by_hand = -per_target.sum(-1, keepdim=True) * logits.float().softmax(-1)
    by_hand.scatter_add_(-1, index, per_target)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits_grad.float(), by_hand, atol=tolerance, rtol=tolerance)
    # With work buffers left over from a larger chunk (as the chunks of a step share them): the
    # same values, whatever the buffers held.
    buffers: dict[str, torch.Tensor] = {}
    larger = torch.randn(50, 500, generator=generator).to(dtype)
    logprobs_and_logits_grad(
        larger,
        torch.zeros_like(targets[:1]).expand(50, *targets.shape[1:]),
        -torch.ones(50, *grads.shape[1:]),
        buffers,
        by_kernel=by_kernel,
    )
    again, again_grad = logprobs_and_logits_grad(
        logits.clone(), targets, grads, buffers, by_kernel=by_kernel
    )
    assert all(buffer.shape[0] == 50 for buffer in buffers.values())
    assert torch.equal(again, expected.detach()) and torch.equal(again_grad, logits_grad)


def test_unembedding_backward_refuses_another_gradient(tiny_models, session_engine):
    """The gradients computed in the forward are for one ∂L/∂logprobs: a backward that brings
    another one (an objective wrongly marked linear) is an error, and no gradient is added."""
    service = ServiceClient(engine=session_engine)
    client = perturbed_client(service, session_engine, tiny_models["llama"], seed=8)
    run = session_engine.run(client.model_id)
    objective = resolve_objective("cross_entropy")
    batch = pack_batch(uneven_data(384, "cross_entropy", seed=9), objective, 384, 1 << 20)
    known = linear_coefficients(objective, batch.inputs, {}, batch.flat_targets())
    for param in run.parameters.values():
        param.grad = None
    with run.model() as model:
        logprobs = target_logprobs(model, batch, chunk_tokens=4, logprob_grads=known)
        with pytest.raises(RuntimeError, match="marked linear"):
            (-(logprobs**2).sum()).backward()
    assert all(param.grad is None for param in run.parameters.values())


def test_chunk_size_follows_the_vocabulary_and_the_device():
    assert chunk_tokens_for(49152) == (32 << 20) // (4 * 49152) == 170  # SmolLM2's, on a CPU
    assert chunk_tokens_for(128256, "cpu") == 65
    assert chunk_tokens_for(128256, "cuda") == (256 << 20) // (4 * 128256) == 523
    assert chunk_tokens_for(49152, "cpu", budget_bytes=64 << 20) == 341
    assert chunk_tokens_for(10**9) == 64  # never fewer than 64 tokens


def test_engine_forward_never_holds_full_logits(tiny_models, session_engine):
    """The engine's step uses the chunked path: the model's own forward (which computes every
    position's logits) is never called, its decoder and unembedding are."""
    service = ServiceClient(engine=session_engine)
    client = service.create_lora_training_client(tiny_models["llama"], rank=4, seed=0)
    model = session_engine.worker_of(client.model_id).loaded.model
    calls = {"model": 0, "unembedding tokens": 0}
    handles = [
        model.register_forward_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1)),
        model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _o: calls.__setitem__(
                "unembedding tokens", max(calls["unembedding tokens"], args[0].shape[0])
            )
        ),
    ]
    try:
        data = uneven_data(384, "cross_entropy")
        client.forward_backward(data, "cross_entropy").result()
    finally:
        for handle in handles:
            handle.remove()
    assert calls["model"] == 0
    assert 0 < calls["unembedding tokens"] <= chunk_tokens_for(384)


def test_packing_keeps_prompt_order_for_a_single_token_sequence(tiny_models, session_engine):
    """A one-token datum between longer ones (it shares a row) gets its own logprob."""
    service = ServiceClient(engine=session_engine)
    client = perturbed_client(service, session_engine, tiny_models["qwen2"], seed=7)
    data = [
        Datum(
            model_input=ModelInput.from_ints(tokens),
            loss_fn_inputs={"target_tokens": targets, "weights": [1.0] * len(tokens)},
        )
        for tokens, targets in (([5, 6, 7], [6, 7, 8]), ([9], [10]), ([11, 12], [12, 13]))
    ]
    output = client.forward(data, "cross_entropy").result()
    run = session_engine.run(client.model_id)
    with run.model() as model, torch.no_grad():
        for datum, result in zip(data, output.loss_fn_outputs, strict=True):
            expected = reference_logprobs(model, datum)
            torch.testing.assert_close(result["logprobs"].to_torch(), expected, atol=1e-5, rtol=0)


def saved_bytes(fn) -> tuple[object, int]:
    """`fn()`'s result and the bytes of the tensors autograd saved for the backward meanwhile."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, total[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_equals_the_plain_step(family, tiny_models, session_engine):
    """A run with gradient checkpointing gets the same logprobs, loss and gradients as one
    without (1e-6), while autograd keeps less for the backward (each layer's input only)."""
    service = ServiceClient(engine=session_engine)
    data = uneven_data(384, "ppo", seed=5)
    results = {}
    for checkpointing in (False, True):
        client = service.create_lora_training_client(
            tiny_models[family], rank=4, seed=8, gradient_checkpointing=checkpointing
        )
        run = session_engine.run(client.model_id)
        assert run.checkpoint_layers is checkpointing
        generator = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name, param in run.parameters.items():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        batch = pack_batch(data, resolve_objective("ppo"), 384, 1 << 20)
        config = resolve_config(resolve_objective("ppo"), {})
        # On this thread (saved-tensor hooks are per thread), as the worker would run it.
        output, saved = saved_bytes(
            lambda r=run, b=batch, c=config: r.forward_backward(
                b, resolve_objective("ppo"), c, True
            )
        )
        results[checkpointing] = (output, grads_of(session_engine, client.model_id), saved)
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results.values()
    assert ckpt.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], abs=1e-6)
    for a, b in zip(ckpt.loss_fn_outputs, plain.loss_fn_outputs, strict=True):
        torch.testing.assert_close(
            a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-6, rtol=0
        )
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5)
    assert 0 < ckpt_saved < plain_saved / 2


def test_gradient_checkpointing_is_a_boolean(tiny_models, session_engine):
    service = ServiceClient(engine=session_engine)
    with pytest.raises(InvalidInputError, match="gradient_checkpointing: expected true or false"):
        service.create_lora_training_client(tiny_models["llama"], gradient_checkpointing="yes")
