"""The recipes end to end on tiny models, checked against independent references: losses, NLLs,
probabilities, margins and KLs recomputed here with plain transformers (+ PEFT loading the saved
adapter), never the recipe's own numbers alone."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bios.data.chat import prompt_tokens
from bios.recipes import distill, dpo, rl, sft
from bios.recipes.advantages import (
    frac_groups_no_signal,
    group_advantages,
    mean_reverse_kl,
    reverse_kl_advantages,
)
from bios.recipes.batches import batch_indices
from bios.recipes.data import DataError, load_sft
from bios.recipes.run_folder import RunFolder, checkpoint_folder_of
from tiny_models import make_tokenizer

QA = [
    ("capital of France?", "Paris"),
    ("capital of Italy?", "Rome"),
    ("two plus two?", "four"),
    ("hello there", "how are you today?"),
]
CONVERSATIONS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def metrics(folder: Path) -> list[dict]:
    return RunFolder(folder).metrics()


def series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


def hf_model(folder: str, adapter: Path | None = None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


@torch.no_grad()
def log_softmax(model, tokens: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), dim=-1)


def final_adapter(folder: Path, session_engine) -> Path:
    return checkpoint_folder_of(folder, home=session_engine.home)


# ---- SFT ----------------------------------------------------------------------------------------


@torch.no_grad()
def assistant_nll(model, tokenizer, conversations) -> float:
    """NLL per token of each conversation's last assistant turn (content and end of turn)."""
    total, count = 0.0, 0
    for messages in conversations:
        full = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False))
        head = tokenizer.encode(
            tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        )
        assert full[: len(head)] == head
        logprobs = log_softmax(model, full)
        total -= sum(float(logprobs[t - 1, full[t]]) for t in range(len(head), len(full)))
        count += len(full) - len(head)
    return total / count


def test_sft_memorises_and_its_eval_loss_matches_an_independent_nll(
    llama, service, session_engine, tmp_path
):
    data = write_jsonl(tmp_path / "memorise.jsonl", [{"messages": c} for c in CONVERSATIONS])
    config = sft.SFTConfig(
        model=llama,
        data=data,
        eval_data=data,
        steps=12,
        batch_size=4,
        learning_rate=1e-2,
        rank=8,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    folder = sft.run(config, service)
    records = metrics(folder)
    train = series(records, "train_loss")
    assert len(train) == 12 and train[-1] < 0.1 * train[0]

    tokenizer = AutoTokenizer.from_pretrained(llama)
    before = assistant_nll(hf_model(llama), tokenizer, CONVERSATIONS)
    after = assistant_nll(
        hf_model(llama, final_adapter(folder, session_engine)), tokenizer, CONVERSATIONS
    )
    evals = series(records, "eval_loss")
    assert evals[0] == pytest.approx(before, rel=1e-4)  # step 0: the untrained model
    assert evals[-1] == pytest.approx(after, rel=1e-3, abs=1e-5)  # after the last step
    assert after < 0.1 * before
    saved = json.loads((folder / "config.json").read_text())
    assert saved["recipe"] == "sft" and saved["steps"] == 12 and saved["eval_every"] == 2


def weighted_pieces(tokenizer, datum) -> list[str]:
    """The decoded runs of consecutive targets with weight > 0."""
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    pieces, current = [], []
    for token, weight in zip(targets, weights, strict=True):
        if weight > 0:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return [*pieces, tokenizer.decode(current)] if current else pieces


def test_sft_weights_cover_exactly_the_assistant_tokens(tmp_path):
    tokenizer = make_tokenizer()
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "capital of France?"},
                    {"role": "assistant", "content": "Paris"},
                    {"role": "user", "content": "and Italy?"},
                    {"role": "assistant", "content": "Rome"},
                ]
            },
            {"prompt": "two plus two?", "completion": "four"},
            {
                "prompt": [
                    {"role": "user", "content": "capital of Italy?"},
                    {"role": "assistant", "content": "Rome"},
                    {"role": "user", "content": "and France?"},
                ],
                "completion": "Paris",
            },
        ],
    )
    data, dropped = sft.build_data(tokenizer, load_sft(path), "assistant", None)
    assert dropped == 0
    assert weighted_pieces(tokenizer, data[0]) == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]
    assert weighted_pieces(tokenizer, data[1]) == ["four<|im_end|>\n"]
    # An assistant turn inside a prompt is context: only the completion is learned.
    assert weighted_pieces(tokenizer, data[2]) == ["Paris<|im_end|>\n"]
    for datum in data:
        full = datum.model_input.to_ints() + datum.loss_fn_inputs["target_tokens"].tolist()[-1:]
        assert datum.loss_fn_inputs["target_tokens"].tolist() == full[1:]

    everything, _ = sft.build_data(tokenizer, load_sft(path, "all"), "all", None)
    assert all(w == 1.0 for d in everything for w in d.loss_fn_inputs["weights"].tolist())

    # max_length cuts the model input; an example cut before its answer is dropped.
    cut, dropped = sft.build_data(tokenizer, load_sft(path), "assistant", 12)
    assert dropped == 3 and cut == []
    cut, dropped = sft.build_data(tokenizer, load_sft(path), "assistant", 40)
    assert all(d.model_input.length <= 40 for d in cut)


# ---- resume -------------------------------------------------------------------------------------


def interrupted_copy(runs: Path, name: str, at_step: int) -> None:
    """A copy of run `name` as if it had been stopped right after its checkpoint at `at_step`."""
    shutil.copytree(runs / name, runs / f"{name}-resumed")
    folder = RunFolder(runs / f"{name}-resumed")
    kept = [c for c in folder.checkpoints() if c["step"] <= at_step]
    assert kept[-1]["step"] == at_step
    (folder.path / "checkpoints.jsonl").write_text("".join(json.dumps(c) + "\n" for c in kept))


def assert_same_final_state(a: Path, b: Path, session_engine) -> None:
    folder_a, folder_b = final_adapter(a, session_engine), final_adapter(b, session_engine)
    assert folder_a != folder_b
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        tensors_a, tensors_b = load_file(folder_a / file), load_file(folder_b / file)
        assert tensors_a.keys() == tensors_b.keys()
        for key in tensors_a:
            torch.testing.assert_close(tensors_b[key], tensors_a[key], rtol=0, atol=1e-6)


def test_sft_resume_equals_uninterrupted_training(llama, service, session_engine, tmp_path):
    runs = tmp_path / "runs"
    data = write_jsonl(
        tmp_path / "five.jsonl",
        [{"messages": c} for c in CONVERSATIONS[:3]]
        + [
            {"prompt": "say yes", "completion": "yes"},
            {"prompt": "name a color", "completion": "blue"},
        ],
    )
    config = sft.SFTConfig(
        model=llama,
        data=data,
        steps=7,
        batch_size=2,
        learning_rate=5e-3,
        rank=4,
        lr_schedule="cosine",
        warmup_steps=2,
        save_every=3,
        name="a",
        runs_dir=str(runs),
        progress=False,
    )
    uninterrupted = sft.run(config, service)
    interrupted_copy(runs, "a", at_step=3)
    # Resuming needs only the run's name: its saved config supplies everything else.
    resumed = sft.run(
        sft.SFTConfig(
            model=llama,
            data=data,
            name="a-resumed",
            runs_dir=str(runs),
            resume=True,
            progress=False,
        ),
        service,
    )
    assert_same_final_state(uninterrupted, resumed, session_engine)
    steps = [r["step"] for r in metrics(resumed)]
    assert steps == list(range(1, 8))  # redone steps replace the old records, none twice
    torch.testing.assert_close(
        series(metrics(resumed), "train_loss"),
        series(metrics(uninterrupted), "train_loss"),
        rtol=0,
        atol=1e-6,
    )

    with pytest.raises(ValueError, match=r"learning_rate=0\.5"):
        sft.run(
            sft.SFTConfig(
                model=llama, data=data, name="a", runs_dir=str(runs), resume=True, learning_rate=0.5
            ),
            service,
        )
    with pytest.raises(FileExistsError, match="resume"):
        sft.run(config, service)


def test_rl_resume_equals_uninterrupted_training(llama, service, session_engine, tmp_path):
    runs = tmp_path / "runs"
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q, "answer": a} for q, a in QA])
    config = rl.RLConfig(
        model=llama,
        data=data,
        steps=4,
        batch_size=2,
        group_size=4,
        max_tokens=3,
        learning_rate=1e-2,
        rank=4,
        save_every=2,
        name="r",
        runs_dir=str(runs),
        reward=lambda text, example: float(len(text)),
        track_kl=False,
        progress=False,
    )
    uninterrupted = rl.run(config, service)
    interrupted_copy(runs, "r", at_step=2)
    resumed = rl.run(
        rl.RLConfig(
            model=llama,
            data=data,
            name="r-resumed",
            runs_dir=str(runs),
            resume=True,
            reward=config.reward,
            progress=False,
        ),
        service,
    )
    assert_same_final_state(uninterrupted, resumed, session_engine)
    assert series(metrics(resumed), "reward_mean") == series(metrics(uninterrupted), "reward_mean")


def test_a_batch_sent_in_pieces_trains_as_one_request(llama, service, session_engine, tmp_path):
    """tokens_per_request only bounds memory: gradients add up across the pieces (SFT, and DPO
    whose pairs must stay whole)."""
    sft_data = write_jsonl(tmp_path / "mem.jsonl", [{"messages": c} for c in CONVERSATIONS])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": q, "chosen": a, "rejected": "no"} for q, a in QA],
    )
    for module, config in (
        (sft, sft.SFTConfig(model=llama, data=sft_data, batch_size=4)),
        (dpo, dpo.DPOConfig(model=llama, data=pairs, batch_size=4)),
    ):
        folders = [
            module.run(
                dataclasses.replace(
                    config,
                    steps=3,
                    learning_rate=1e-2,
                    rank=4,
                    save_every=0,
                    progress=False,
                    runs_dir=str(tmp_path / f"pieces-{tokens}"),
                    tokens_per_request=tokens,
                ),
                service,
            )
            for tokens in (10_000, 20)  # one request per step; about one sequence each
        ]
        whole, pieces = (final_adapter(f, session_engine) for f in folders)
        a = load_file(whole / "adapter_model.safetensors")
        b = load_file(pieces / "adapter_model.safetensors")
        for key in a:
            # Sums in another order differ in the last fp32 bits; Adam's m/√v turns that into up
            # to ~1e-4 of a parameter after 3 steps at lr 1e-2 (a hundredth of one step).
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
        for key in ("train_loss", "accuracy", "reward_margin"):
            torch.testing.assert_close(
                series(metrics(folders[1]), key),
                series(metrics(folders[0]), key),
                rtol=1e-5,
                atol=1e-6,
            )


def test_token_chunks_keep_groups_whole():
    from bios.recipes.batches import token_chunks
    from bios.types import Datum, ModelInput

    data = [Datum(model_input=ModelInput.from_ints([1] * n)) for n in (3, 4, 5, 6, 9, 1)]
    lengths = lambda pieces: [[d.model_input.length for d in p] for p in pieces]  # noqa: E731
    assert lengths(token_chunks(data, 8)) == [[3, 4], [5], [6], [9], [1]]
    assert lengths(token_chunks(data, 8, group=2)) == [[3, 4], [5, 6], [9, 1]]
    assert lengths(token_chunks(data, 100)) == [[3, 4, 5, 6, 9, 1]]


# ---- RL -----------------------------------------------------------------------------------------


def test_rl_reward_rises_when_the_answer_is_one_token(llama, service, session_engine, tmp_path):
    """Each prompt's answer is the token the base model ranks third (p ≈ 2%); exact match."""
    tokenizer = AutoTokenizer.from_pretrained(llama)
    base = hf_model(llama)
    prompts = [q for q, _ in QA] + ["how are you?", "what is Bios?", "name a color", "say yes"]
    rows, targets = [], []
    for prompt in prompts:
        tokens = prompt_tokens(tokenizer, prompt)
        order = log_softmax(base, tokens)[-1].argsort(descending=True).tolist()
        plain = [
            t
            for t in order
            if t not in tokenizer.all_special_ids
            and tokenizer.decode([t]).strip()
            and len(tokenizer.decode([t]).strip()) > 1
        ]
        target = plain[2]
        rows.append({"prompt": prompt, "answer": tokenizer.decode([target]).strip()})
        targets.append((tokens, target))
    data = write_jsonl(tmp_path / "one_token.jsonl", rows)
    config = rl.RLConfig(
        model=llama,
        data=data,
        steps=8,
        batch_size=8,
        group_size=16,
        max_tokens=1,
        learning_rate=1e-2,
        rank=8,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    folder = rl.run(config, service)
    records = metrics(folder)
    rewards = series(records, "reward_mean")
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.3
    assert all(0 <= f <= 1 for f in series(records, "frac_groups_no_signal"))
    assert series(records, "kl")[-1] > 0  # the policy moved away from the base model

    trained = hf_model(llama, final_adapter(folder, session_engine))
    p_before = [float(log_softmax(base, t)[-1, target].exp()) for t, target in targets]
    p_after = [float(log_softmax(trained, t)[-1, target].exp()) for t, target in targets]
    assert sum(p_after) > 5 * sum(p_before)


# ---- DPO ----------------------------------------------------------------------------------------


def test_dpo_margin_rises_and_matches_an_independent_margin(
    llama, service, session_engine, tmp_path
):
    rows = [
        {"prompt": q, "chosen": a, "rejected": QA[(i + 1) % len(QA)][1]}
        for i, (q, a) in enumerate(QA)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = dpo.DPOConfig(
        model=llama,
        data=data,
        eval_data=data,
        steps=6,
        batch_size=4,
        learning_rate=5e-3,
        rank=8,
        beta=0.1,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    folder = dpo.run(config, service)
    records = metrics(folder)
    margins = series(records, "eval_reward_margin")
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the start
    assert margins[-1] > 0.5 and series(records, "eval_accuracy")[-1] == 1.0

    tokenizer = AutoTokenizer.from_pretrained(llama)
    reference = hf_model(llama)
    policy = hf_model(llama, final_adapter(folder, session_engine))

    def response_logprob(model, prompt: str, response: str) -> float:
        head = prompt_tokens(tokenizer, prompt)
        full = tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
        )
        logprobs = log_softmax(model, full)
        return sum(float(logprobs[t - 1, full[t]]) for t in range(len(head), len(full)))

    independent = [
        0.1
        * (
            (
                response_logprob(policy, r["prompt"], r["chosen"])
                - response_logprob(reference, r["prompt"], r["chosen"])
            )
            - (
                response_logprob(policy, r["prompt"], r["rejected"])
                - response_logprob(reference, r["prompt"], r["rejected"])
            )
        )
        for r in rows
    ]
    assert min(independent) > 0
    assert margins[-1] == pytest.approx(sum(independent) / len(independent), rel=1e-3)


# ---- distillation -------------------------------------------------------------------------------


def test_distill_brings_the_student_closer_to_the_teacher(
    llama, tiny_models, service, session_engine, tmp_path
):
    """Teacher: the tiny Qwen3 (same tokenizer). KL(student ‖ teacher) of the exact next-token
    distributions at each prompt's first reply position, before and after."""
    teacher_folder = tiny_models["qwen3"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in QA])
    config = distill.DistillConfig(
        model=llama,
        teacher=teacher_folder,
        data=data,
        eval_data=data,
        steps=12,
        batch_size=4,
        group_size=8,
        max_tokens=2,
        learning_rate=1e-2,
        rank=8,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    folder = distill.run(config, service)
    records = metrics(folder)
    assert series(records, "eval_teacher_kl")[-1] < series(records, "eval_teacher_kl")[0]

    tokenizer = AutoTokenizer.from_pretrained(llama)
    teacher = hf_model(teacher_folder)

    def exact_kl(student) -> float:
        total = 0.0
        for q, _ in QA:
            tokens = prompt_tokens(tokenizer, q)
            s, t = log_softmax(student, tokens)[-1], log_softmax(teacher, tokens)[-1]
            total += float((s.exp() * (s - t)).sum())
        return total / len(QA)

    before = exact_kl(hf_model(llama))
    after = exact_kl(hf_model(llama, final_adapter(folder, session_engine)))
    assert after < 0.8 * before


# ---- bad data files -----------------------------------------------------------------------------

GOOD = json.dumps({"messages": CONVERSATIONS[0]})


@pytest.mark.parametrize(
    ("recipe", "lines", "expected"),
    [
        ("sft", [GOOD, '{"messages": [', GOOD], r":2: invalid JSON"),
        ("sft", [GOOD, GOOD, json.dumps({"prompt": "hi"})], r":3: missing field 'completion'"),
        ("sft", [], r": no examples .*empty file"),
        ("sft", ["", "  "], r": no examples .*2 blank lines"),
        (
            "sft",
            [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
            r":1: the conversation has no assistant turn",
        ),
        ("sft", [json.dumps({"messages": [{"role": "user"}]})], r":1: messages\[0\]: missing"),
        ("sft", ["[1, 2]"], r":1: expected a JSON object, got list"),
        ("dpo", [json.dumps({"prompt": "p", "chosen": "a"})], r":1: missing field 'rejected'"),
        ("rl", [json.dumps({"prompt": "p"})], r":1: missing field 'answer' .*exact_match"),
    ],
)
def test_bad_data_files_name_the_file_and_line(recipe, lines, expected, llama, service, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    runs = tmp_path / "runs"
    module, config_class = {
        "sft": (sft, sft.SFTConfig),
        "dpo": (dpo, dpo.DPOConfig),
        "rl": (rl, rl.RLConfig),
    }[recipe]
    config = config_class(model=llama, data=str(path), steps=1, runs_dir=str(runs))
    with pytest.raises(DataError, match=f"^{path}{expected}"):
        module.run(config, service)
    assert not runs.exists()  # checked before anything was created


def test_a_missing_data_file_is_named(llama, service, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        sft.run(sft.SFTConfig(model=llama, data=str(tmp_path / "nope.jsonl")), service)


# ---- pure functions -----------------------------------------------------------------------------


def test_group_advantages_and_signal():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    normalized = group_advantages([1.0, 0.0, 0.0, 1.0], normalize_std=True, eps=0.0)
    assert normalized == [1.0, -1.0, -1.0, 1.0]  # population std 0.5
    assert group_advantages([3.0, 3.0], normalize_std=True) == [0.0, 0.0]
    assert frac_groups_no_signal([[1, 1], [0, 1], [0, 0], [2, 3]]) == 0.5


def test_reverse_kl_advantages():
    student, teacher = [[-1.0, -2.0], [-0.5]], [[-1.5, -1.0], [-0.5]]
    gaps = [-0.5, 1.0, 0.0]  # teacher − student per token
    mean = sum(gaps) / 3
    got = reverse_kl_advantages(student, teacher, coef=2.0)
    assert got[0] == pytest.approx([2 * -0.5 - 2 * mean, 2 * 1.0 - 2 * mean])
    assert got[1] == pytest.approx([-2 * mean])
    assert reverse_kl_advantages(student, teacher, baseline=False) == [[-0.5, 1.0], [0.0]]
    assert mean_reverse_kl(student, teacher) == pytest.approx(-mean)


def test_batches_walk_through_epoch_permutations():
    stream = [i for step in range(6) for i in batch_indices(5, 3, step, seed=7)]
    for epoch in range(3):  # 18 positions: epochs 0-2 complete, the last one partly
        chunk = stream[5 * epoch : 5 * epoch + 5]
        assert sorted(chunk) == list(range(5))
    assert batch_indices(5, 3, 4, seed=7) == batch_indices(5, 3, 4, seed=7)
    assert stream[:5] != [i for s in range(2) for i in batch_indices(5, 3, s, seed=8)][:5]


# ---- over HTTP ----------------------------------------------------------------------------------


def test_recipes_over_http_match_in_process(llama, service, tmp_path, tmp_path_factory):
    """The recipes use only the client API: against `bios serve` they compute the same run."""
    import bios
    from server_process import ServerProcess

    sft_data = write_jsonl(tmp_path / "mem.jsonl", [{"messages": c} for c in CONVERSATIONS])
    rl_data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": q, "answer": a} for q, a in QA])
    sft_config = sft.SFTConfig(
        model=llama,
        data=sft_data,
        eval_data=sft_data,
        steps=3,
        batch_size=2,
        learning_rate=1e-2,
        rank=4,
        save_every=2,
        progress=False,
    )
    rl_config = rl.RLConfig(
        model=llama,
        data=rl_data,
        steps=2,
        batch_size=2,
        group_size=4,
        max_tokens=3,
        learning_rate=1e-2,
        rank=4,
        save_every=0,
        progress=False,
        reward=lambda text, example: float(len(text) % 3 == 0),
    )
    server = ServerProcess(tmp_path_factory.mktemp("recipes-server"), [llama])
    try:
        remote = bios.ServiceClient(base_url=server.url, api_key="tml-test")
        results = {}
        for where, client in (("local", service), ("http", remote)):
            runs = str(tmp_path / where)
            results[where] = [
                metrics(sft.run(dataclasses.replace(sft_config, runs_dir=runs), client)),
                metrics(rl.run(dataclasses.replace(rl_config, runs_dir=runs), client)),
            ]
            # Saved: every 2 steps, at the end, and at each eval lower than all before it.
            folder = RunFolder(next(Path(runs).glob("sft-*")))
            evals = [(r["step"], r["eval_loss"]) for r in folder.metrics() if "eval_loss" in r]
            improved = {
                s
                for s, v in evals
                if s > 0 and v < min((u for t, u in evals if 0 < t < s), default=math.inf)
            }
            saved = [c["step"] for c in folder.checkpoints()]
            assert saved == sorted({2, 3} | improved)
    finally:
        server.stop()
    for local, http in zip(results["local"], results["http"], strict=True):
        for key in ("train_loss", "eval_loss", "reward_mean", "grad_norm", "kl"):
            torch.testing.assert_close(series(http, key), series(local, key), rtol=1e-4, atol=1e-5)


def test_default_run_names_never_collide(tmp_path):
    first = RunFolder.prepare(str(tmp_path), None, "sft", resume=False)
    first.write_config({"recipe": "sft"})
    second = RunFolder.prepare(str(tmp_path), None, "sft", resume=False)
    assert second.path != first.path and second.path.name.startswith(first.path.name)
    with pytest.raises(FileExistsError, match="holds a run already"):
        RunFolder.prepare(str(tmp_path), first.path.name, "sft", resume=False)


# ---- the result: the checkpoint with the lowest eval loss ------------------------------------

# The same prompts with other answers: training toward QA's answers makes these less likely, so
# after a first improvement (the chat format is learned) the eval loss climbs.
CONTRADICTIONS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("capital of France?", "Rome"),
        ("capital of Italy?", "Paris"),
        ("two plus two?", "five"),
        ("hello there", "goodbye"),
    ]
]


def test_sft_result_is_the_lowest_eval_checkpoint_and_early_stop_ends_the_run(
    llama, service, session_engine, tmp_path
):
    from bios.checkpoints.paths import checkpoint_folder
    from bios.cli import main
    from bios.recipes.run_folder import checkpoint_path

    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS])
    eval_data = write_jsonl(tmp_path / "eval.jsonl", [{"messages": c} for c in CONTRADICTIONS])
    config = sft.SFTConfig(
        model=llama,
        data=data,
        eval_data=eval_data,
        steps=30,
        batch_size=4,
        learning_rate=1e-2,
        rank=8,
        eval_every=2,
        early_stop=2,
        save_every=0,
        name="stops",
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    folder = sft.run(config, service)
    records = metrics(folder)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and r["step"] > 0]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    # Early stop: exactly 2 evals after the best, then the run ended, well before step 30.
    assert [s for s, _ in evals if s > best_step] == [best_step + 2, best_step + 4]
    assert records[-1]["step"] == best_step + 4 < 30

    rows = RunFolder(folder).checkpoints()
    marked = [row for row in rows if row.get("best")]
    assert len(marked) == 1 and marked[0]["step"] == best_step
    assert marked[0]["eval_loss"] == best_loss and "lowest eval loss" in marked[0]["why"]
    assert rows[-1]["step"] == best_step + 4 and rows[-1]["final"] and not rows[-1]["best"]
    assert checkpoint_path(folder) == marked[0]["path"]

    # The kept adapter, loaded with PEFT, gives the recorded best eval loss (an independent NLL).
    kept = checkpoint_folder_of(folder, home=session_engine.home)
    assert kept == checkpoint_folder(session_engine.home, marked[0]["path"])
    tokenizer = AutoTokenizer.from_pretrained(llama)
    nll = assistant_nll(hf_model(llama, kept), tokenizer, CONTRADICTIONS)
    assert nll == pytest.approx(best_loss, rel=1e-3)

    # `bios export RUN` writes that checkpoint, not the last one.
    out = tmp_path / "exported"
    assert (
        main(["export", str(folder), "--adapter", str(out), "--home", str(session_engine.home)])
        == 0
    )
    exported = load_file(out / "adapter_model.safetensors")
    stored = load_file(kept / "adapter_model.safetensors")
    assert exported.keys() and all(
        torch.equal(exported[k], stored[k]) for k in stored if k in exported
    )

    # Resuming a run that stopped early trains no further.
    again = sft.run(
        sft.SFTConfig(
            model=llama,
            data=data,
            name="stops",
            runs_dir=str(tmp_path / "runs"),
            resume=True,
            progress=False,
        ),
        service,
    )
    assert metrics(again)[-1]["step"] == best_step + 4


def test_sft_without_an_eval_file_holds_out_a_slice_and_records_it(llama, service, tmp_path):
    from bios.recipes.batches import holdout_indices

    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in "one two three four five six seven eight nine ten eleven twelve".split() * 5
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # 60 examples
    config = sft.SFTConfig(
        model=llama,
        data=data,
        learning_rate=5e-3,
        rank=4,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        name="held",
        progress=False,
    )
    folder = sft.run(config, service)
    saved = json.loads((folder / "config.json").read_text())
    # ⌊60 / 10⌋ = 6 held out; 54 left: batch 8, 3 passes of 6.75 steps = 20.25 → 21.
    assert saved["holdout"] == 6 and saved["batch_size"] == 8 and saved["steps"] == 21
    assert saved["eval_every"] == 3  # ⌈21 / 10⌉
    held = holdout_indices(60, 6, 0)
    assert len(set(held)) == 6 and held == sorted(held) and held != list(range(6))

    tokenizer = AutoTokenizer.from_pretrained(llama)
    before = assistant_nll(hf_model(llama), tokenizer, [rows[i]["messages"] for i in held])
    assert series(metrics(folder), "eval_loss")[0] == pytest.approx(before, rel=1e-4)
    assert RunFolder(folder).best_checkpoint() is not None

    # With an eval file there is nothing to hold out: a holdout is refused, naming the field.
    with pytest.raises(ValueError, match="holdout"):
        sft.run(dataclasses.replace(config, eval_data=data, holdout=3, name="both"), service)
    # Under 50 examples nothing is held out: the final checkpoint is the result, and says why.
    few = write_jsonl(tmp_path / "few.jsonl", rows[:49])
    small = sft.run(dataclasses.replace(config, data=few, name="few"), service)
    assert json.loads((small / "config.json").read_text())["holdout"] == 0
    assert series(metrics(small), "eval_loss") == []
    result = RunFolder(small).best_checkpoint()
    assert result["final"] and "no eval data" in result["why"]


def test_checkpoints_file_marks_one_result_and_keeps_other_fields(tmp_path):
    from bios.recipes.run_folder import checkpoint_path

    folder = RunFolder(tmp_path / "run")
    folder.write_config({"recipe": "sft"})
    folder.add_checkpoint(2, "bios://r/weights/step-000002", eval_loss=1.5)
    folder.add_checkpoint(4, "bios://r/weights/step-000004", final=True, eval_loss=1.7)
    assert folder.best_checkpoint() is None
    assert checkpoint_path(folder.path) == "bios://r/weights/step-000004"  # no mark: the last
    # A field another writer added survives the rewrite.
    lines = (folder.path / "checkpoints.jsonl").read_text().splitlines()
    first = json.loads(lines[0]) | {"expires_at": 123}
    (folder.path / "checkpoints.jsonl").write_text("\n".join([json.dumps(first), lines[1]]) + "\n")
    folder.mark_best("bios://r/weights/step-000004", "first reason")
    folder.mark_best("bios://r/weights/step-000002", "lowest eval loss")
    rows = folder.checkpoints()
    assert [r["best"] for r in rows] == [True, False] and "why" not in rows[1]
    assert rows[0]["why"] == "lowest eval loss" and rows[0]["expires_at"] == 123
    assert checkpoint_path(folder.path) == "bios://r/weights/step-000002"
    with pytest.raises(ValueError, match="no checkpoint"):
        folder.mark_best("bios://r/weights/step-000009", "?")


def test_keep_best_counts_evals_since_the_best_and_restores_from_a_run():
    from bios.recipes.keep_best import KeepBest

    keeper = KeepBest(patience=2, source="eval.jsonl")
    stream = [(0, 3.0), (2, 2.0), (4, 2.5), (6, 1.5), (8, 1.5), (10, 1.6)]
    seen = [keeper.saw(step, loss) for step, loss in stream]
    # Step 0 is before training (no checkpoint): never the best; a tie keeps the earlier one.
    assert seen == [False, True, False, True, False, False]
    assert (keeper.best_step, keeper.best_loss, keeper.since_best) == (6, 1.5, 2)
    assert keeper.should_stop() and keeper.evals == 5
    assert "of the 5 evals so far" in keeper.why() and "before training" not in keeper.why()
    never = KeepBest(patience=0, source="x")
    for step, loss in [(0, 1.0), (1, 2.0), (2, 3.0)]:
        never.saw(step, loss)
    assert not never.should_stop() and "no trained checkpoint got below" in never.why()
    # A resumed run: the history up to its checkpoint and the marked best give the same state.
    history = [{"step": s, "eval_loss": v} for s, v in stream[:5]] + [{"step": 9}]
    restored = KeepBest.restore(2, "eval.jsonl", history, {"step": 6, "eval_loss": 1.5})
    assert (restored.best_step, restored.best_loss, restored.since_best) == (6, 1.5, 1)
    assert restored.saw(10, 1.6) is False and restored.should_stop()
