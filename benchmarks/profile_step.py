"""Where a Bios training step's GPU time goes: LoRA rank 32 SFT in bf16 on a random-weight model
of a catalog shape (`gpu_check.py`'s shapes and data), one step under `torch.profiler`.

    python benchmarks/profile_step.py [--shape Llama-3.2-1B] [--batch 8] [--seq 2048]

    python benchmarks/profile_step.py --side plain --micro 4  # the plain transformers + peft loop

Prints the operators (with their input shapes) by the GPU time of the kernels each launched, the
kernels by their GPU time, and the step's wall time, split into `forward_backward` and
`optim_step`, against the GPU's busy time (the kernels' total). Needs a CUDA GPU (refused with
exit status 2 otherwise); on the project's H200 machine carry pydantic's wheels as
`gpu_check.py` says.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gpu_check import (
    BETAS,
    EPS,
    LLAMA_SHAPES,
    LR,
    RANK,
    free_memory,
    import_bios,
    llama_config,
    peft_model,
    plain_backward,
    refuse,
    save_model,
    sft_data,
    torch,
)


def bios_step(folder: Path, workdir: Path, tokens) -> Callable[[], tuple[float, float]]:
    """Bios's step: `forward_backward` then `optim_step`, each timed to its end on the GPU. Also
    prints the memory planner's estimate of the step against its measured peak."""
    from bios.client.service import ServiceClient
    from bios.engine import memory
    from bios.engine.batch import pack_batch, resolve_objective
    from bios.engine.engine import Engine
    from bios.types import AdamParams

    engine = Engine(home=workdir / "home", device="cuda", dtype="bf16")
    training = ServiceClient(engine=engine).create_lora_training_client(
        str(folder), rank=RANK, seed=0
    )
    data = sft_data(tokens)
    adam = AdamParams(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
    worker = engine.worker_of(training.model_id)
    batch = pack_batch(
        data,
        resolve_objective("cross_entropy"),
        worker.vocab_size,
        worker.max_length,
        attention_cost=worker.attention_cost,
    )
    estimate = memory.step_bytes(memory.Shape.of(worker.loaded.model), batch, False, RANK)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    print(
        f"memory: {before / 2**30:.2f} GiB allocated before the step (weights, run state); the "
        f"step's peak above that {peak / 2**30:.2f} GiB, the planner's estimate of it "
        f"(memory.step_bytes) {estimate / 2**30:.2f} GiB: {peak / estimate:.2f}x"
    )

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        training.forward_backward(data, "cross_entropy").result()
        torch.cuda.synchronize()
        middle = time.perf_counter()
        training.optim_step(adam).result()
        torch.cuda.synchronize()
        return middle - start, time.perf_counter() - middle

    return step


def plain_step(folder: Path, tokens, micro: int) -> Callable[[], tuple[float, float]]:
    """`gpu_check.py`'s plain transformers + peft bf16 SDPA loop, in micro-batches of `micro`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = peft_model(model.to("cuda"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    rows_on_gpu = tokens.to("cuda")

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        plain_backward(model, rows_on_gpu, micro)
        torch.cuda.synchronize()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return middle - start, time.perf_counter() - middle

    return step


def print_profile(profiler, rows: int) -> float:
    """The leaf operators by the GPU time of the kernels they launched (with their input
    shapes), then the kernels; returns the GPU's busy time in seconds."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernels = [e for e in profiler.key_averages() if e.device_type == cuda]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    ops = [
        e
        for e in profiler.key_averages(group_by_input_shape=True)
        if e.device_type == cpu and e.self_device_time_total > 0
    ]
    ops.sort(key=lambda e: -e.self_device_time_total)
    print(f"\noperators by their kernels' GPU time (of {busy * 1e3:.1f} ms):")
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  operator  input shapes")
    for e in ops[:rows]:
        share = e.self_device_time_total / 1e6 / busy
        shapes = str(e.input_shapes)[:110]
        print(f"{e.self_device_time_total / 1e3:8.2f} {share:6.1%} {e.count:6d}  {e.key}  {shapes}")
    kernels.sort(key=lambda e: -e.self_device_time_total)
    print("\nkernels by GPU time:")
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  kernel")
    for e in kernels[:rows]:
        share = e.self_device_time_total / 1e6 / busy
        print(f"{e.self_device_time_total / 1e3:8.2f} {share:6.1%} {e.count:6d}  {e.key[:140]}")
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="Llama-3.2-1B", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--side", default="bios", choices=["bios", "plain"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, help="the plain loop's micro-batch (default: all)")
    parser.add_argument("--rows", type=int, default=30, help="table rows")
    args = parser.parse_args()
    if torch is None or not torch.cuda.is_available():
        refuse("no CUDA GPU here: this profile needs one")
    import_bios()
    from torch.profiler import ProfilerActivity, profile

    shape = LLAMA_SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="bios-profile-") as workdir:
        folder = Path(workdir) / "model"
        save_model(llama_config(shape), folder, "cuda", torch.bfloat16)  # kept on disk only
        free_memory()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(
            0, shape["vocab_size"], (args.batch, args.seq + 1), generator=generator
        )
        if args.side == "bios":
            step = bios_step(folder, Path(workdir), tokens)
        else:
            step = plain_step(folder, tokens, args.micro or args.batch)
        for _ in range(2):
            step()
        timings = [step() for _ in range(3)]
        forward_backward = sorted(t[0] for t in timings)[1]
        optim = sorted(t[1] for t in timings)[1]
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=True) as profiler:
            step()
        print(
            f"{args.side}: {args.shape}, {args.batch} x {args.seq} tokens, LoRA r{RANK}, bf16, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        )
        busy = print_profile(profiler, args.rows)
        print(
            f"\nstep (median of 3): forward_backward {forward_backward:.3f} s, optim_step "
            f"{optim:.3f} s; GPU busy in the profiled step {busy:.3f} s (kernels' own time), "
            f"{busy / (forward_backward + optim):.0%} of the step"
        )


if __name__ == "__main__":
    main()
