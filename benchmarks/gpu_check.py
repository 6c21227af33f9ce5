"""Bios on one GPU, checked and measured in one command that prints one table (114 s on an H200,
2026-12-04, before the sampling checks were added; parts (i) and (iii) alone took 88 s after).

    python benchmarks/gpu_check.py [--json out.json]
    python benchmarks/gpu_check.py --allow-cpu --tiny       # its code on the CPU, tiny configs
    python benchmarks/gpu_check.py --parts ii,iii           # a rerun of some parts only

Where torch sees no CUDA GPU it refuses with one line and exit status 2. `--allow-cpu --tiny` is
for debugging the script itself: every part runs, on the CPU, with tiny configs and short
sequences; its figures mean nothing.

(i) correctness, against float32 references computed here, as relative errors (‖got − ref‖ /
    ‖ref‖ over all tokens' logprobs and all LoRA gradients; |Δ| / |ref| for the loss). Small
    random-weight Llama, Qwen2 and Qwen3 models (hidden 128, 4 layers, from their real config
    classes, saved with a byte-level BPE tokenizer from tests/tiny_models.py) are loaded through
    Bios's own loader by `Engine(device=..., dtype=...)` behind a `ServiceClient`, every LoRA
    factor set to the same random values, and every built-in objective (and ppo + 0.05·kl) runs
    one `forward_backward` on four sequences of 5-120 tokens. The reference is a plain
    transformers + peft float32 forward on the CPU, one sequence at a time, with each loss
    written out by hand (DESIGN.md's formulas) and its gradients from autograd. Rows: Bios
    float32 on the GPU against it; Bios bf16 on the GPU against it; Bios float32 on the GPU
    against Bios float32 on the CPU; packing = padding (Bios's packed batch against a padded,
    attention-masked transformers batch on the GPU, float32); chunked = unchunked (a 128256-token
    vocabulary, 4 × 2048 tokens: full float32 logits would be 3.9 GiB, so a chunked loss shows
    as a smaller peak; against full-logit references on the GPU). Sampling on the GPU in
    float32, decode steps replayed as CUDA graphs: greedy tokens against a step-by-step argmax of
    transformers (the whole sequence each step, no cache), and 8 samples at T = 1 against the
    same decode run eagerly (`BIOS_CUDA_GRAPHS=0`).
(ii) LoRA rank 32 SFT (attention, MLP and lm_head) on random-weight models of the Llama-3.2-1B and
    Llama-3.1-8B shapes (numbers below, as bios/models/catalog.py lists them), bf16, 8 × 2048
    random tokens a step, cross-entropy summed over every token, AdamW. Bios: `forward_backward`
    + `optim_step`. Plain loop: the same model in bf16 (SDPA attention), `peft.get_peft_model`,
    logits upcast to float32 for `F.cross_entropy`, backward, `torch.optim.AdamW`. A side that
    runs out of memory is retried with the step split into micro-batches (accumulated
    gradients, one optimizer step), and the table says how it ran. Each model is built on the
    GPU in bf16 with random weights and saved, so Bios loads it through its real loading path.
    Peak memory: `torch.cuda.max_memory_allocated` over the side's steps, less what was
    allocated before the side's model existed (weights, adapters, optimizer and activations).
(iii) sampling on the 1B shape: 1 prompt × 1 sample and 1 × 16, 128 new tokens at temperature 1,
    Bios's `SamplingClient.sample` against transformers `generate(num_return_sequences=...,
    min_new_tokens=128)` on the same bf16 weights, and against Bios without CUDA graphs;
    generated tokens per second, median of 3. Then graphed against eager tokens for one seed,
    and at 16 samples a diagnosis of any difference: the first decode step's logits, graphed
    against eager and eager against eager, and where the tokens first differ (eager against
    eager, graphed against eager, graphed cut into one-step turns against graphed whole).

Model FLOPs utilisation, per trained token:
    4·N + 6·N_lora + 6·L·s·d
N: the weights of every matrix product (attention and MLP projections and lm_head; not the
embedding lookup): forward 2·N, and the backward still computes input gradients through the
frozen weights, 2·N, but no weight gradients for them, so 4·N rather than the 6·N of full
training. N_lora: the LoRA factors, forward, input and weight gradients (6·N_lora). Attention:
QKᵀ and AV cost 4·t·d forward at position t, over the causal lower triangle 2·s·d on average,
and twice that backward: 6·L·s·d (s: sequence length, d = heads × head_dim, L: layers). Peak:
989 TFLOP/s, the H200 SXM's dense bf16 datasheet figure (a product of 8192³ bf16 matrices was
measured at about 790 on these machines, so 35% MFU here is about 44% of what is reachable).

Targets: Bios ≥ 1.5× the plain loop's tokens/s, ≥ 35% MFU on the 8B shape, ≥ 2× `generate` at 16
samples. A time budget (7.5 minutes) skips what is left, with a note, once it is spent; each part
runs in its own try/except, so a failure prints its error line and the rest still runs. Exit
status: 0 when nothing failed, 1 when a check failed or a part raised, 2 when it refused to run.

On the project's H200 machine (torch 2.11, transformers 5.17, peft; no network) Bios's own
dependency pydantic is not installed: carry its wheels as /work/.library/device/README.md says
(pydantic, pydantic-core, annotated-types, typing-inspection for Python 3.12) and run from the
repository root; this script puts `src/` on the path when Bios is not installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    import torch
except ImportError:  # refused in main() with one line
    torch = None

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12  # H200 SXM, dense bf16, datasheet
BUDGET_SECONDS = 450
# Estimated seconds for both sides of one training shape on an H200 (build, save, load, steps):
# a part starts only where its estimate still fits the budget.
TRAIN_SECONDS = {"Llama-3.2-1B": 60, "Llama-3.1-8B": 200}
RANK = 32
LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-12
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS.append("lm_head")

# The published configs' shapes (bios/models/catalog.py); rope scaling left out (no effect on cost).
LLAMA_SHAPES = {
    "Llama-3.2-1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
TINY_SHAPES = {
    "tiny (1B-like)": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "tiny (8B-like)": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=1024,
        tie_word_embeddings=False,
    ),
}
SHARED_LLAMA = dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)

# Objective -> (loss_fn, config, the loss_fn_inputs it reads besides target_tokens).
POLICY = ("logprobs", "advantages")
PAIRED = ("weights", "ref_logprobs")
OBJECTIVES: dict[str, tuple[object, dict, tuple[str, ...]]] = {
    "cross_entropy": ("cross_entropy", {}, ("weights",)),
    "importance_sampling": ("importance_sampling", {}, POLICY),
    "ppo": ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, POLICY),
    "cispo": ("cispo", {}, POLICY),
    "dro": ("dro", {"beta": 0.3}, POLICY),
    "dpo": ("dpo", {}, PAIRED),
    "dpo_hinge": ("dpo_hinge", {}, PAIRED),
    "ipo": ("ipo", {}, PAIRED),
    "kl": ("kl", {}, PAIRED),
    "ppo+0.05*kl": ([("ppo", 1.0), ("kl", 0.05)], {}, POLICY + PAIRED),
}
FP32_LIMIT = 1e-4  # float32 on two devices or in two summation orders
PACKING_LIMIT = 1e-5  # the packing = padding and chunked = unchunked bound
# bf16 against float32: 8 significant bits (rounding of up to 2^-9 ≈ 2e-3 of each weight and
# activation) through every layer. Measured on these tiny models with bf16 on a CPU (the same
# rounding; products accumulate in float32 there as on a GPU): logprobs ≤ 4.1e-3, loss ≤ 3.9e-2
# of Σ|terms| (dpo: a pair's one term sums a sequence's rounding errors), gradients ≤ 9.4e-2 (a
# LoRA gradient is a product of two rounded activations). The limits are 2-5x those: above
# them some float32 step is being done in bf16.
BF16_LIMITS = {"loss": 1e-1, "logprobs": 2e-2, "grads": 2e-1}


# ---- the report --------------------------------------------------------------------------------


@dataclass
class Row:
    part: str
    check: str
    figure: str
    target: str = ""
    result: str = ""  # "ok", "FAIL", "error", "skipped", or "" for a figure without a target


@dataclass
class Context:
    device: str
    tiny: bool
    workdir: Path
    budget: float
    steps: int
    warmup: int
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)
    folders: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self, part: str, what: str, need: float = 0.0) -> bool:
        """Whether `what`, estimated to take `need` seconds on an H200, still fits the budget;
        if not, a "skipped" row says so."""
        if self.elapsed() + (0.0 if self.tiny else need) <= self.budget:
            return True
        note = f"skipped: {self.elapsed():.0f} s spent, about {need:.0f} s needed"
        self.rows.append(Row(part, what, f"{note}, budget {self.budget:.0f} s", result="skipped"))
        return False

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def engine(self, device: str, dtype: str):
        """One engine per (device, dtype), made on first use: its base models live there."""
        from bios.engine.engine import Engine

        key = (device, dtype)
        if key not in self.engines:
            self.engines[key] = Engine(home=self.workdir / "bios-home", device=device, dtype=dtype)
        return self.engines[key]


def verdict(errors: dict[str, float], limits: dict[str, float]) -> str:
    return "ok" if all(errors[k] <= limits[k] for k in limits) else "FAIL"


def print_table(rows: list[Row], header: list[str]) -> None:
    columns = ("part", "check", "figure", "target", "result")
    cells = [columns] + [(r.part, r.check, r.figure, r.target, r.result) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    line = "  ".join("-" * w for w in widths)
    print("\n".join(header))
    print(line)
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print(line)
    print(line)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# ---- models ------------------------------------------------------------------------------------


def tokenizer():
    """A small byte-level BPE with a ChatML template (tests/tiny_models.py), offline. Bios takes
    the vocabulary size from the model's lm_head, so a tokenizer smaller than the config's
    vocabulary is fine: its ids are a prefix of the model's."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tokenizer

    return make_tokenizer()


def family_config(family: str, tok, **overrides):
    """A ~1M-parameter config of `family` from its real config class."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**{"tie_word_embeddings": False, **common})
    if family == "qwen2":
        return Qwen2Config(**{"tie_word_embeddings": False, **common})
    return Qwen3Config(**{"head_dim": 32, "tie_word_embeddings": True, **common})


def save_model(config, folder: Path, device: str, dtype, seed: int = 0):
    """Build a random-weight model of `config` directly on `device` in `dtype`, save it with the
    tokenizer to `folder`, and return it (still on the device)."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def llama_config(shape: dict):
    from transformers import LlamaConfig

    tok = tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaConfig(**shape, **SHARED_LLAMA, **ids, pad_token_id=tok.pad_token_id)


def peft_model(model):
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def bios_name(peft_name: str) -> str:
    """peft's name -> Bios's: `base_model.model.X.lora_A.default.weight` -> `X.lora_A`."""
    return peft_name.removeprefix("base_model.model.").replace(".default.weight", "")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- (i) correctness ---------------------------------------------------------------------------


@dataclass
class Result:
    loss: float
    logprobs: list  # per sequence, float32 on the CPU
    grads: dict  # Bios parameter name -> float32 gradient on the CPU
    scale: float | None = None  # a reference's Σ|terms| of the loss (see `errors`)


def make_data(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> Callable[[str], list]:
    """A function objective -> the same sequences with the inputs that objective reads. Policy
    logprobs sit near a uniform model's (-log vocab), so ratios spread around 1; preference and
    KL weights are 1 on the last two thirds (the "response"), cross-entropy's random there and 0
    on the first third (a prompt's: those positions skip the unembedding's backward)."""
    from bios.types import Datum, ModelInput

    generator = torch.Generator().manual_seed(seed)
    centre = -math.log(vocab)
    sequences, inputs = [], []
    for n in lengths:
        sequences.append(torch.randint(0, vocab, (n + 1,), generator=generator))
        inputs.append(
            {
                "target_tokens": sequences[-1][1:],
                "ce_weights": torch.rand(n, generator=generator) * (torch.arange(n) >= n // 3),
                "weights": (torch.arange(n) >= n // 3).float(),
                "logprobs": centre + 0.3 * torch.randn(n, generator=generator),
                "advantages": torch.randn(n, generator=generator),
                "ref_logprobs": centre + 0.3 * torch.randn(n, generator=generator),
            }
        )

    def data_for(objective: str) -> list:
        keys = OBJECTIVES[objective][2]
        data = []
        for sequence, values in zip(sequences, inputs, strict=True):
            chosen = {"target_tokens": values["target_tokens"]}
            for key in keys:
                ce = key == "weights" and objective == "cross_entropy"
                chosen[key] = values["ce_weights" if ce else key]
            data.append(
                Datum(
                    model_input=ModelInput.from_ints(sequence[:-1].tolist()), loss_fn_inputs=chosen
                )
            )
        return data

    return data_for


def hand_terms(objective: str, lps: list, inputs: list[dict]) -> torch.Tensor:
    """DESIGN.md's formulas, written out independently of bios.objectives: the terms whose sum is
    the loss, one per token (one per pair for the preference objectives; data[2k] chosen,
    data[2k+1] rejected)."""
    if objective == "ppo+0.05*kl":
        kl = hand_terms("kl", lps, inputs)
        return torch.cat([hand_terms("ppo_default", lps, inputs), 0.05 * kl])
    if objective in ("dpo", "dpo_hinge", "ipo"):
        beta = 0.1
        pairs = zip(lps, inputs, strict=True)
        rewards = torch.stack(
            [beta * (x["weights"] * (lp - x["ref_logprobs"])).sum() for lp, x in pairs]
        )
        h = rewards[0::2] - rewards[1::2]
        if objective == "dpo":
            return -torch.nn.functional.logsigmoid(h)
        if objective == "dpo_hinge":
            return torch.relu(1 - h)
        return (h / beta - 1 / (2 * beta)) ** 2
    terms = []
    for lp, x in zip(lps, inputs, strict=True):
        if objective == "cross_entropy":
            terms.append(-(x["weights"] * lp))
            continue
        if objective == "kl":
            d = lp - x["ref_logprobs"]
            terms.append(x["weights"] * (torch.exp(-d) - 1 + d))
            continue
        ratio, adv = torch.exp(lp - x["logprobs"]), x["advantages"]
        lo, hi = (0.9, 1.1) if objective == "ppo" else (0.8, 1.2)
        if objective == "importance_sampling":
            terms.append(-(ratio * adv))
        elif objective in ("ppo", "ppo_default"):
            terms.append(-torch.min(ratio * adv, ratio.clamp(lo, hi) * adv))
        elif objective == "cispo":
            terms.append(-(ratio.clamp(lo, hi).detach() * lp * adv))
        elif objective == "dro":
            terms.append(-(lp * adv - 0.5 * 0.3 * (lp - x["logprobs"]) ** 2))
        else:
            raise AssertionError(objective)
    return torch.cat(terms)


def lora_values(parameters: dict, seed: int = 1) -> dict:
    """The same random value for every LoRA factor of every run and reference (B too, so
    gradients reach both factors), from the names and shapes alone."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: 0.05 * torch.randn(tuple(parameters[name].shape), generator=generator)
        for name in sorted(parameters)
    }


def bios_results(ctx: Context, folder: Path, device: str, dtype: str, data_for, objectives):
    """Bios's loss, logprobs and gradients for each objective on one engine."""
    from bios.client.service import ServiceClient

    engine = ctx.engine(device, dtype)
    training = ServiceClient(engine=engine).create_lora_training_client(
        str(folder), rank=RANK, seed=0
    )
    run = engine.run(training.model_id)
    check_placement(engine, training.model_id, device, dtype)
    values = ctx.details.setdefault("lora_values", {}).setdefault(
        str(folder), lora_values(run.parameters)
    )
    with torch.no_grad():
        for name, parameter in run.parameters.items():
            parameter.copy_(values[name])
    results = {}
    for objective in objectives:
        loss_fn, config, _ = OBJECTIVES[objective]
        output = training.forward_backward(data_for(objective), loss_fn, config or None).result()
        grads = {}
        for name, parameter in run.parameters.items():
            grad = parameter.grad
            grads[name] = (
                torch.zeros(parameter.shape) if grad is None else grad.detach().float().cpu()
            )
            parameter.grad = None
        logprobs = [out["logprobs"].to_torch().float() for out in output.loss_fn_outputs]
        results[objective] = Result(output.metrics["loss:sum"], logprobs, grads)
    engine.drop_run(training.model_id)
    return results, values


def check_placement(engine, run_id: str, device: str, dtype: str) -> None:
    """The base model is where and in the dtype asked for (else the comparison means nothing)."""
    model = engine.worker_of(run_id).loaded.model
    parameter = next(model.parameters())
    want = {"bf16": torch.bfloat16, "float32": torch.float32}[dtype]
    if parameter.device.type != torch.device(device).type or parameter.dtype != want:
        raise RuntimeError(
            f"asked for {device} {dtype}, Bios loaded {parameter.device} {parameter.dtype}"
        )


def reference_results(folder: Path, values: dict, data_for, objectives, device: str, padded: bool):
    """The float32 reference: transformers + peft with the same LoRA values, one sequence at a
    time (or one padded, attention-masked batch), each loss by hand, gradients by autograd."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = peft_model(base.to(device))
    named = {bios_name(n): p for n, p in model.named_parameters() if "lora_" in n}
    if set(named) != set(values):
        missing = sorted(set(values) ^ set(named))[:3]
        raise RuntimeError(f"Bios's and peft's LoRA parameters differ, e.g. {missing}")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(values[name])
    data = data_for("cross_entropy")  # the same tokens for every objective
    tokens = [torch.tensor(d.model_input.to_ints(), device=device) for d in data]
    targets = [d.loss_fn_inputs["target_tokens"].to_torch().to(device) for d in data]
    lps = (
        padded_logprobs(model, tokens, targets)
        if padded
        else sequence_logprobs(model, tokens, targets)
    )
    names = sorted(named)
    results = {}
    for objective in objectives:
        inputs = [
            {k: v.to_torch().float().to(device) for k, v in d.loss_fn_inputs.items()}
            for d in data_for(objective)
        ]
        terms = hand_terms(objective, lps, inputs)
        loss = terms.sum()
        grads = torch.autograd.grad(
            loss, [named[n] for n in names], retain_graph=True, allow_unused=True
        )
        results[objective] = Result(
            loss.item(),
            [lp.detach().float().cpu() for lp in lps],
            {
                n: (torch.zeros(named[n].shape) if g is None else g.float().cpu())
                for n, g in zip(names, grads, strict=True)
            },
            terms.abs().sum().item(),
        )
    del model, base, lps
    free_memory()
    return results


def sequence_logprobs(model, tokens: list, targets: list) -> list:
    out = []
    for ids, target in zip(tokens, targets, strict=True):
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0])
    return out


def padded_logprobs(model, tokens: list, targets: list) -> list:
    """One right-padded batch with an attention mask, as a usual collator makes it."""
    longest = max(len(t) for t in tokens)
    device = tokens[0].device
    ids = torch.zeros(len(tokens), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(tokens):
        ids[row, : len(t)], mask[row, : len(t)] = t, 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [
        logprobs[row, : len(t)].gather(-1, targets[row][:, None])[:, 0]
        for row, t in enumerate(tokens)
    ]


def relative(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def errors(got: dict, ref: dict, scales: dict) -> dict:
    """Per objective: the relative errors of the logprobs and gradients (‖got − ref‖ / ‖ref‖),
    and of the loss, |Δ| / Σ|terms| with the terms of the hand reference in `scales`: a loss
    like dro's or ppo's sums terms of both signs, so |Δ| / |loss| would measure how much they
    cancel, not how exact each is."""
    out = {}
    for objective in got:
        g, r = got[objective], ref[objective]
        names = sorted(r.grads)
        out[objective] = {
            "loss": abs(g.loss - r.loss) / max(scales[objective].scale, 1e-12),
            "logprobs": relative(torch.cat(g.logprobs), torch.cat(r.logprobs)),
            "grads": relative(
                torch.cat([g.grads[n].flatten() for n in names]),
                torch.cat([r.grads[n].flatten() for n in names]),
            ),
        }
    return out


def worst(per_objective: dict) -> tuple[dict, str]:
    """The largest error of each kind over the objectives, and a figure naming where."""
    figure, maxima = [], {}
    for kind in ("loss", "logprobs", "grads"):
        objective = max(per_objective, key=lambda o: per_objective[o][kind])
        maxima[kind] = per_objective[objective][kind]
        figure.append(f"{kind} {maxima[kind]:.1e} ({objective})")
    return maxima, " · ".join(figure)


def add_comparison(ctx, part, check, got, ref, limits: dict, scales: dict | None = None) -> None:
    per_objective = errors(got, ref, scales or ref)
    ctx.details.setdefault("correctness", {})[check] = per_objective
    maxima, figure = worst(per_objective)
    bounds = sorted(set(limits.values()))
    target = (
        f"each ≤ {bounds[0]:.0e}"
        if len(bounds) == 1
        else "≤ " + "/".join(f"{limits[k]:.0e}" for k in ("loss", "logprobs", "grads"))
    )
    ctx.rows.append(Row(part, check, figure, target, verdict(maxima, limits)))


def check_correctness(ctx: Context) -> None:
    part, dev = "i correctness", ctx.device
    fp32 = {k: FP32_LIMIT for k in ("loss", "logprobs", "grads")}
    tight = {k: PACKING_LIMIT for k in ("loss", "logprobs", "grads")}
    tok = tokenizer()
    objectives = list(OBJECTIVES)
    for family in ("llama", "qwen2", "qwen3"):
        if not ctx.time_left(part, family, need=15):
            return
        try:
            folder = ctx.workdir / f"check-{family}"
            config = family_config(family, tok)
            save_model(config, folder, "cpu", torch.float32)
            data_for = make_data(config.vocab_size, (37, 64, 5, 120))
            ctx.log(f"(i) {family}: Bios {dev} float32")
            gpu32, values = bios_results(ctx, folder, dev, "float32", data_for, objectives)
            ctx.log(f"(i) {family}: Bios {dev} bf16, Bios cpu float32, references")
            gpu16, _ = bios_results(ctx, folder, dev, "bf16", data_for, objectives)
            cpu32, _ = bios_results(ctx, folder, "cpu", "float32", data_for, objectives)
            reference = reference_results(folder, values, data_for, objectives, "cpu", padded=False)
            padded = reference_results(folder, values, data_for, objectives, dev, padded=True)
        except Exception as error:  # this family's rows only
            ctx.rows.append(Row(part, family, one_line(error), result="error"))
            ctx.log(traceback.format_exc())
            continue
        add_comparison(ctx, part, f"{family}: Bios {dev} fp32 vs ref", gpu32, reference, fp32)
        check = f"{family}: Bios {dev} bf16 vs ref"
        add_comparison(ctx, part, check, gpu16, reference, BF16_LIMITS)
        check = f"{family}: Bios {dev} fp32 vs Bios cpu fp32"
        add_comparison(ctx, part, check, gpu32, cpu32, fp32, scales=reference)
        check = f"{family}: packing = padding (Bios vs padded batch, {dev} fp32)"
        add_comparison(ctx, part, check, gpu32, padded, tight)
        try:
            check_sampling(ctx, part, family, folder, config.vocab_size)
        except Exception as error:
            ctx.rows.append(Row(part, f"{family}: sampling", one_line(error), result="error"))
            ctx.log(traceback.format_exc())
    if ctx.time_left(part, "chunked = unchunked", need=20):
        check_chunking(ctx, part, tok, tight)


@contextmanager
def cuda_graphs(enabled: bool) -> Iterator[None]:
    """Inside the block, decodes replay CUDA graphs or run eagerly (`BIOS_CUDA_GRAPHS`, read as
    each decode starts); the variable is restored afterwards."""
    before = os.environ.get("BIOS_CUDA_GRAPHS")
    os.environ["BIOS_CUDA_GRAPHS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["BIOS_CUDA_GRAPHS"]
        else:
            os.environ["BIOS_CUDA_GRAPHS"] = before


def bios_sample(sampler, prompt: list[int], samples: int, params, graphs: bool):
    """`sampler.sample`, its decode steps replayed as CUDA graphs or run eagerly."""
    from bios.types import ModelInput

    with cuda_graphs(graphs):
        return sampler.sample(ModelInput.from_ints(prompt), samples, params).result()


def same_samples(a, b) -> tuple[bool, float]:
    """Whether two responses hold the same tokens, and their logprobs' largest difference."""
    tokens = [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    if not tokens:
        return False, math.inf
    pairs = zip(a.sequences, b.sequences, strict=True)
    gaps = [abs(x - y) for s, t in pairs for x, y in zip(s.logprobs, t.logprobs, strict=True)]
    return True, max(gaps, default=0.0)


def check_sampling(ctx: Context, part: str, family: str, folder: Path, vocab: int) -> None:
    """On the device in float32: greedy decoding (CUDA graphs) against a step-by-step argmax of
    transformers (no cache, the whole sequence each step), and T = 1 graphed against eager."""
    from transformers import AutoModelForCausalLM

    from bios.client.service import ServiceClient
    from bios.types import SamplingParams

    dev, new_tokens = ctx.device, 24
    sampler = ServiceClient(engine=ctx.engine(dev, "float32")).create_sampling_client(
        base_model=str(folder)
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    ).to(dev)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (7, 19)]
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])
    equal = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=dev)
            for _ in range(new_tokens):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
            expected = ids[0, len(prompt) :].tolist()
            got = bios_sample(sampler, prompt, 2, greedy, graphs=True)
            equal += all(s.tokens == expected for s in got.sequences)
    del model
    free_memory()
    params = SamplingParams(max_tokens=32, temperature=1.0, seed=5, stop=[])
    graphed = bios_sample(sampler, prompts[1], 8, params, graphs=True)
    eager = bios_sample(sampler, prompts[1], 8, params, graphs=False)
    tokens, gap = same_samples(graphed, eager)
    figure = (
        f"greedy = argmax step by step: {equal}/{len(prompts)} prompts; 8 samples at T=1, graphed"
        f" vs eager: tokens {'equal' if tokens else 'DIFFER'}, max |Δ logprob| {gap:.1e}"
    )
    ok = equal == len(prompts) and tokens and gap <= 1e-5
    check = f"{family}: sampling on {dev} fp32 (CUDA graphs)"
    ctx.rows.append(Row(part, check, figure, "all equal, |Δ| ≤ 1e-05", "ok" if ok else "FAIL"))


def check_chunking(ctx: Context, part: str, tok, limits: dict) -> None:
    """Bios on many tokens of a large vocabulary against full-logit references."""
    dev = ctx.device
    vocab, lengths = (32768, (512, 511)) if ctx.tiny else (128256, (2048,) * 4)
    overrides = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    config = family_config("llama", tok, **overrides)
    folder = ctx.workdir / "check-chunking"
    save_model(config, folder, "cpu", torch.float32)
    objectives = ["cross_entropy", "ppo+0.05*kl"]
    data_for = make_data(vocab, lengths)
    ctx.log(f"(i) chunking: {sum(lengths)} tokens x {vocab} vocabulary")
    before = memory_allocated()
    reset_peak()
    got, values = bios_results(ctx, folder, dev, "float32", data_for, objectives)
    bios_peak = peak_memory() - before
    reference = reference_results(folder, values, data_for, objectives, dev, padded=False)
    logits_gib = sum(lengths) * vocab * 4 / 2**30
    chunks = ""
    try:  # how many chunks Bios's rule makes of these tokens, where this Bios has the rule
        from bios.engine.forward import chunk_tokens_for

        try:
            per_chunk = chunk_tokens_for(vocab, dev)
        except TypeError:  # a Bios whose rule takes no device
            per_chunk = chunk_tokens_for(vocab)
        chunks = f", {math.ceil(sum(lengths) / per_chunk)} chunks"
    except ImportError:
        pass
    check = f"chunked = unchunked ({sum(lengths)} tokens x {vocab} vocab{chunks}, {dev} fp32)"
    add_comparison(ctx, part, check, got, reference, limits)
    if bios_peak > 0:
        figure = (
            f"{bios_peak / 2**30:.2f} GiB with the model; full fp32 logits: {logits_gib:.2f} GiB"
        )
        result = "ok" if bios_peak / 2**30 < logits_gib else "FAIL"
        check = "chunked: Bios's peak memory over those forward_backward calls"
        ctx.rows.append(Row(part, check, figure, f"< {logits_gib:.2f} GiB", result))


# ---- (ii) training throughput ------------------------------------------------------------------


def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_params(shape: dict) -> int:
    """Weights of every matrix product: q, k, v, o and the MLP's three per layer, and lm_head."""
    h, inner, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inner
    return shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * h


def lora_params(shape: dict, rank: int = RANK) -> int:
    h, inner, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    per_layer = rank * (2 * (h + heads * hd) + 2 * (h + kv * hd) + 3 * (h + inner))
    return shape["num_hidden_layers"] * per_layer + rank * (h + shape["vocab_size"])


def flops_per_token(shape: dict, seq: int) -> float:
    """4·N + 6·N_lora + 6·L·s·d (the module docstring says why)."""
    attention = (
        6 * shape["num_hidden_layers"] * seq * shape["num_attention_heads"] * shape["head_dim"]
    )
    return 4 * matmul_params(shape) + 6 * lora_params(shape) + attention


def timed_steps(ctx: Context, step: Callable[[int], float], batch: int) -> dict:
    """Warm up, then time `ctx.steps` steps; on running out of memory, split the step into
    micro-batches of half the size and start over. Returns the timings and how it ran."""
    micro, failures = batch, []
    while micro >= 1:
        try:
            reset_peak()
            losses = [step(micro) for _ in range(ctx.warmup)]
            synchronize()
            start = time.perf_counter()
            seconds = []
            for _ in range(ctx.steps):
                begin = time.perf_counter()
                losses.append(step(micro))
                synchronize()
                seconds.append(time.perf_counter() - begin)
            return {
                "micro_batch": micro,
                "seconds": time.perf_counter() - start,
                "median_step": statistics.median(seconds),
                "first_loss": losses[0],
                "peak": peak_memory(),
                "failures": failures,
            }
        except Exception as error:
            if not out_of_memory(error) or micro == 1:
                raise
            failures.append(f"micro-batch {micro}: {one_line(error)[:120]}")
            ctx.log(f"    out of memory at micro-batch {micro}: retrying at {micro // 2}")
        free_memory()  # here, not in the except block: its traceback holds the step's tensors
        micro //= 2
    raise AssertionError("unreachable")


def out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return True
    return "needs about" in text and "is free" in text  # Bios's planned refusal


def plain_backward(model, tokens, micro: int):
    """The plain loop's forward and backward over `tokens` (rows, n + 1) in micro-batches of
    `micro` rows: logits upcast to float32, cross-entropy summed; returns the summed loss."""
    import torch.nn.functional as F

    total = torch.zeros((), device=tokens.device)
    for start in range(0, len(tokens), micro):
        rows = tokens[start : start + micro]
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        loss.backward()
        total += loss.detach()
        del logits, loss
    return total


def plain_training(ctx: Context, model, tokens) -> dict:
    """The plain transformers + peft bf16 SDPA loop on `model` (already on the device)."""
    model = peft_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    def step(micro: int) -> float:
        total = plain_backward(model, tokens, micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return timed_steps(ctx, step, len(tokens))  # the caller frees the model


def sft_data(tokens) -> list:
    """One cross-entropy datum per row of `tokens` (rows, n + 1): every next token, weight 1."""
    from bios.types import Datum, ModelInput

    return [
        Datum(
            model_input=ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:], "weights": torch.ones(len(row) - 1)},
        )
        for row in tokens.cpu()
    ]


def bios_training(ctx: Context, folder: Path, tokens) -> dict:
    """Bios at bf16 on the device: forward_backward (split into micro-batches if it must be),
    then optim_step."""
    from bios.client.service import ServiceClient
    from bios.types import AdamParams

    engine = ctx.engine(ctx.device, "bf16")
    training = ServiceClient(engine=engine).create_lora_training_client(
        str(folder), rank=RANK, seed=0
    )
    check_placement(engine, training.model_id, ctx.device, "bf16")
    data = sft_data(tokens)
    adam = AdamParams(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def step(micro: int) -> float:
        futures = [
            training.forward_backward(data[i : i + micro], "cross_entropy")
            for i in range(0, len(data), micro)
        ]
        training.optim_step(adam).result()
        return sum(f.result().metrics["loss:sum"] for f in futures)

    try:
        return timed_steps(ctx, step, len(data))
    finally:
        engine.drop_run(training.model_id)
        free_memory()


def bench_training(ctx: Context) -> None:
    part = "ii training"
    shapes = TINY_SHAPES if ctx.tiny else LLAMA_SHAPES
    batch, seq = (2, 64) if ctx.tiny else (8, 2048)
    for name, shape in shapes.items():
        if not ctx.time_left(part, name, need=TRAIN_SECONDS.get(name, 0)):
            return
        try:
            train_one(ctx, part, name, shape, batch, seq)
        except Exception as error:
            ctx.rows.append(Row(part, name, one_line(error), result="error"))
            ctx.log(traceback.format_exc())
        free_memory()


def train_one(ctx: Context, part: str, name: str, shape: dict, batch: int, seq: int) -> None:
    folder = ctx.workdir / f"model-{len(ctx.folders)}"
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (batch, seq + 1), generator=generator)
    tokens = tokens.to(ctx.device)
    flops = flops_per_token(shape, seq) * batch * seq
    sides: dict[str, dict] = {}

    ctx.log(f"(ii) {name}: building random bf16 weights on {ctx.device} and saving them")
    before = memory_allocated()
    model = save_model(llama_config(shape), folder, ctx.device, torch.bfloat16)
    ctx.folders[name] = folder
    ctx.log(f"(ii) {name}: plain transformers + peft loop")
    try:
        sides["plain"] = plain_training(ctx, model, tokens)
        sides["plain"]["peak"] -= before
    except Exception as error:
        ctx.rows.append(Row(part, f"{name}: plain loop", one_line(error), result="error"))
    finally:
        del model
        free_memory()
    if not ctx.time_left(part, f"{name}: Bios", need=TRAIN_SECONDS.get(name, 0) / 2):
        return
    ctx.log(f"(ii) {name}: Bios")
    before = memory_allocated()
    try:
        sides["bios"] = bios_training(ctx, folder, tokens)
        sides["bios"]["peak"] = max(0, sides["bios"]["peak"] - before)
    except Exception as error:
        ctx.rows.append(Row(part, f"{name}: Bios", one_line(error), result="error"))
        ctx.log(traceback.format_exc())
    ctx.details.setdefault("training", {})[name] = sides

    for side, label in (("plain", "plain transformers+peft bf16 SDPA loop"), ("bios", "Bios bf16")):
        if side not in sides:
            continue
        r = sides[side]
        r["tokens_per_second"] = batch * seq * ctx.steps / r["seconds"]
        r["mfu"] = flops * ctx.steps / r["seconds"] / PEAK_FLOPS
        memory = f", peak {r['peak'] / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
        split = f", micro-batch {r['micro_batch']}" if r["micro_batch"] != batch else ""
        speed = f"{r['tokens_per_second']:.0f} tok/s, {r['median_step']:.3f} s/step"
        figure = f"{speed}, MFU {r['mfu']:.1%}{memory}{split}, first loss {r['first_loss']:.4g}"
        ctx.rows.append(Row(part, f"{name}: {label}", figure))
    if "plain" in sides and "bios" in sides:
        ratio = sides["bios"]["tokens_per_second"] / sides["plain"]["tokens_per_second"]
        ctx.rows.append(
            Row(
                part,
                f"{name}: Bios / plain tokens/s",
                f"{ratio:.2f}x",
                ">= 1.5x",
                "ok" if ratio >= 1.5 else "FAIL",
            )
        )
        if torch.cuda.is_available():
            memory = sides["bios"]["peak"] / max(sides["plain"]["peak"], 1)
            ctx.rows.append(Row(part, f"{name}: Bios / plain peak GPU memory", f"{memory:.2f}x"))
    if "8B" in name and "bios" in sides:
        mfu = sides["bios"]["mfu"]
        ctx.rows.append(
            Row(part, f"{name}: Bios MFU", f"{mfu:.1%}", ">= 35%", "ok" if mfu >= 0.35 else "FAIL")
        )


# ---- (iii) sampling ----------------------------------------------------------------------------


def bench_sampling(ctx: Context) -> None:
    from transformers import AutoModelForCausalLM

    from bios.client.service import ServiceClient
    from bios.types import SamplingParams

    part = "iii sampling"
    name = next(iter(TINY_SHAPES if ctx.tiny else LLAMA_SHAPES))
    shape = (TINY_SHAPES if ctx.tiny else LLAMA_SHAPES)[name]
    new_tokens, counts = (8, (1, 4)) if ctx.tiny else (128, (1, 16))
    folder = ctx.folders.get(name)
    if folder is None:  # the training part did not get to build it
        folder = ctx.workdir / "model-sampling"
        save_model(llama_config(shape), folder, ctx.device, torch.bfloat16)
        free_memory()
    sampler = ServiceClient(engine=ctx.engine(ctx.device, "bf16")).create_sampling_client(
        base_model=str(folder)
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = model.to(ctx.device).eval()
    prompt = torch.randint(3, 384, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids = torch.tensor([prompt], device=ctx.device)

    responses = {}

    def run_bios(samples: int, seed: int, graphs: bool = True) -> int:
        params = SamplingParams(max_tokens=new_tokens, seed=seed, temperature=1.0)
        response = bios_sample(sampler, prompt, samples, params, graphs)
        responses[graphs, samples, seed] = response
        return sum(len(sequence.tokens) for sequence in response.sequences)

    def run_bios_eager(samples: int, seed: int) -> int:
        return run_bios(samples, seed, graphs=False)

    def run_generate(samples: int, seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        return int(output[:, len(prompt) :].numel())

    sides = {"bios": run_bios, "generate": run_generate, "bios eager": run_bios_eager}
    for samples in counts:
        if not ctx.time_left(part, f"1 x {samples}", need=20):
            break
        ctx.log(f"(iii) 1 prompt x {samples} samples, {new_tokens} new tokens")
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for run in sides.values():
            run(samples, 1000)  # warm-up
        for repeat in range(3):
            order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
            for side in order:
                synchronize()
                start = time.perf_counter()
                produced = sides[side](samples, repeat)
                synchronize()
                rates[side].append(produced / (time.perf_counter() - start))
        bios_rate, base_rate, eager_rate = (statistics.median(rates[s]) for s in sides)
        ratio = bios_rate / base_rate
        target = ">= 2x" if samples > 1 else ""
        result = ("ok" if ratio >= 2 else "FAIL") if samples > 1 else ""
        figure = (
            f"Bios {bios_rate:.0f} tok/s, generate {base_rate:.0f} tok/s: {ratio:.2f}x "
            f"(Bios without CUDA graphs {eager_rate:.0f} tok/s)"
        )
        ctx.rows.append(
            Row(
                part,
                f"{name}: 1 prompt x {samples}, {new_tokens} new tokens",
                figure,
                target,
                result,
            )
        )
        ctx.details.setdefault("sampling", {})[samples] = rates
        tokens, gap = same_samples(responses[True, samples, 0], responses[False, samples, 0])
        figure = f"tokens {'equal' if tokens else 'DIFFER'}, max |Δ logprob| {gap:.1e}"
        ok = "ok" if tokens and gap <= 1e-5 else "FAIL"
        check = f"{name}: 1 x {samples}, CUDA graphs = eager, seed 0"
        ctx.rows.append(Row(part, check, figure, "equal, |Δ| ≤ 1e-05", ok))
        if samples > 1:
            try:
                diagnose_graphs(ctx, part, name, sampler, prompt, samples, new_tokens)
            except Exception as error:
                ctx.rows.append(Row(part, "graphs: diagnosis", one_line(error), result="error"))
                ctx.log(traceback.format_exc())


def first_difference(a, b) -> str:
    """Where two decoders' tokens first differ (the earliest step over the rows), or "equal"."""
    steps = [
        next((i for i, (x, y) in enumerate(zip(s.tokens, t.tokens, strict=False)) if x != y), None)
        for s, t in zip(a.sequences, b.sequences, strict=True)
    ]
    differing = [step for step in steps if step is not None]
    return f"differ from token {min(differing)}" if differing else "equal"


def diagnose_graphs(ctx, part, name, sampler, prompt, samples, new_tokens) -> None:
    """Graphed against eager decoding of one request of `samples` rows, Decoder by Decoder on
    the sampler's model: the first decode step's logits, and the tokens, with eager against
    eager too (cuBLAS promises the same bits only while a single stream is active, and a
    capture runs on a second), and graphed whole against graphed cut into one-step turns."""
    from bios.engine.decoding import Decoder, SampleRequest, SampleSettings

    session = sampler._session
    tokenizer = session.worker.loaded.tokenizer

    def decode(graphs: bool, max_tokens: int, turns: bool = False) -> Decoder:
        settings = SampleSettings(
            max_tokens=max_tokens, temperature=1.0, top_k=-1, top_p=1.0, seed=0
        )
        with cuda_graphs(graphs), session.model() as model, torch.inference_mode():
            decoder = Decoder(model, [SampleRequest(prompt, samples, settings)], tokenizer)
            while not decoder.advance(model, 0.0 if turns else math.inf):
                pass
        return decoder

    # max_tokens=2: one decode forward, whose logits the decoder keeps.
    eager, again, graphed = decode(False, 2), decode(False, 2), decode(True, 2)
    figure = (
        f"max |Δ logit|, graphed vs eager {(graphed.logits - eager.logits).abs().max():.1e}, "
        f"eager vs eager {(again.logits - eager.logits).abs().max():.1e}"
    )
    ctx.rows.append(Row(part, f"{name}: 1 x {samples}, first decode step (diagnosis)", figure))
    whole = {graphs: decode(graphs, new_tokens).responses()[0] for graphs in (False, True)}
    again = decode(False, new_tokens).responses()[0]
    turns = decode(True, new_tokens, turns=True).responses()[0]
    figure = (
        f"eager vs eager {first_difference(whole[False], again)}; graphed vs eager "
        f"{first_difference(whole[True], whole[False])}; graphed in turns vs whole "
        f"{first_difference(turns, whole[True])}"
    )
    ctx.rows.append(Row(part, f"{name}: 1 x {samples}, tokens (diagnosis)", figure))


# ---- the command -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="debugging: run on the CPU")
    parser.add_argument("--tiny", action="store_true", help="debugging: tiny configs")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument(
        "--workdir", type=Path, help="where the models are saved (default: a temp folder)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--parts",
        default="i,ii,iii",
        help="which parts to run, comma-separated (default: i,ii,iii): a rerun of one part",
    )
    return parser.parse_args()


def refuse(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


def import_bios() -> None:
    """Bios from the environment, else from this checkout's src/; a missing dependency refused."""
    try:
        import bios
    except ModuleNotFoundError as error:
        if error.name != "bios":
            refuse(f"Bios needs the package {error.name!r}, which is not installed here")
        sys.path.insert(0, str(REPO / "src"))
        try:
            import bios  # noqa: F401
        except ModuleNotFoundError as inner:
            refuse(f"Bios needs the package {inner.name!r}, which is not installed here")


def header(ctx: Context) -> list[str]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    where = (
        torch.cuda.get_device_name()
        if ctx.device == "cuda"
        else "CPU (--allow-cpu: figures mean nothing)"
    )
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return [
        f"Bios GPU check on {where}: {versions}, peft {peft_version}; {ctx.elapsed():.0f} s "
        f"(budget {ctx.budget:.0f} s); matmul TF32 {torch.backends.cuda.matmul.allow_tf32}",
        "(i) ref: transformers + peft float32 on the CPU, one sequence at a time, losses by hand; "
        "errors ‖Δ‖/‖ref‖ (loss: |Δ|/Σ|terms|)",
        "(ii) MFU: FLOPs/token = 4·N + 6·N_lora + 6·L·s·d (N: matmul weights incl. lm_head; "
        "frozen weights need input grads only); peak 989 TFLOP/s (H200 SXM dense bf16)",
    ]


def main() -> None:
    args = parse_args()
    if torch is None:
        refuse("torch is not installed here")
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        refuse(
            "no CUDA GPU here (torch.cuda.is_available() is False): this check needs one. "
            "`--allow-cpu --tiny` runs its code on the CPU with tiny configs."
        )
    if not cuda and not args.tiny:
        refuse("--allow-cpu needs --tiny: the full-size configs are not for a CPU")
    try:
        import peft  # noqa: F401
    except ImportError:
        refuse("peft not installed: the plain loops and the references need it")
    parts = set(args.parts.split(","))
    unknown = parts - {"i", "ii", "iii"}
    if unknown:
        refuse(f"--parts: expected some of i, ii, iii, got {', '.join(sorted(unknown))}")
    import_bios()
    # Known and harmless here: peft's note on an adapted tied lm_head, transformers deprecations.
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    with tempfile.TemporaryDirectory(prefix="bios-gpu-check-", dir=args.workdir) as workdir:
        ctx = Context(
            device="cuda" if cuda else "cpu",
            tiny=args.tiny,
            workdir=Path(workdir),
            budget=args.budget,
            steps=args.steps,
            warmup=args.warmup,
        )
        for name, part in (
            ("i correctness", check_correctness),
            ("ii training", bench_training),
            ("iii sampling", bench_sampling),
        ):
            if name.split()[0] not in parts:
                continue
            if not ctx.time_left(name, "(all)"):
                continue
            try:
                part(ctx)
            except Exception as error:
                ctx.rows.append(Row(name, "(part)", one_line(error), result="error"))
                ctx.log(traceback.format_exc())
            free_memory()
        print_table(ctx.rows, header(ctx))
        if args.json is not None:
            rows = [vars(row) for row in ctx.rows]
            details = {k: v for k, v in ctx.details.items() if k != "lora_values"}
            args.json.write_text(
                json.dumps({"rows": rows, "details": details}, indent=2, default=str)
            )
    sys.exit(1 if any(row.result in ("FAIL", "error") for row in ctx.rows) else 0)


if __name__ == "__main__":
    main()
