"""Where a Bios training step's GPU time goes: LoRA rank 32 SFT in bf16 on a random-weight model
of a catalog shape (`gpu_check.py`'s shapes and data), one step under `torch.profiler`.

    python benchmarks/profile_step.py [--shape Llama-3.2-1B] [--batch 8] [--seq 2048]

    python benchmarks/profile_step.py --side plain --micro 4  # the plain transformers + peft loop
    python benchmarks/profile_step.py --allow-cpu --tiny      # its code on the CPU, a tiny model
    python benchmarks/profile_step.py --ablations              # and each change undone in turn

Prints the operators (with their input shapes) by the GPU time of the kernels each launched, the
kernels by their GPU time, and the step's wall time, split into `forward_backward` and
`optim_step`, against the GPU's busy time (the kernels' total); for Bios first the memory
planner's estimate of the step against its peak and against what autograd saves (the largest
groups by shape). With `--ablations`, Bios's step is timed again with each of the changes
that cut its passes over memory undone in turn (`ABLATIONS`: the LoRA backward's sum inside a
GEMM, the logits' gradient by the exponential, the fused RMSNorm), each against the step with
all of them, in the same process: written without a GPU to measure them on, this says what each
gives. Needs a CUDA GPU (refused with exit status 2 otherwise; `--allow-cpu --tiny` debugs the
script itself); on the project's H200 machine carry pydantic's wheels as `gpu_check.py` says.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from gpu_check import (
    BETAS,
    EPS,
    LLAMA_SHAPES,
    LR,
    RANK,
    TINY_SHAPES,
    free_memory,
    import_bios,
    llama_config,
    memory_allocated,
    peak_memory,
    peft_model,
    plain_backward,
    refuse,
    reset_peak,
    save_model,
    sft_data,
    synchronize,
    torch,
)


@contextlib.contextmanager
def lora_backward_by_autograd(model) -> Iterator[None]:
    """No `AdaptedLinear`: autograd sums the adapted layers' two input-gradient terms."""
    with mock.patch("bios.models.lora.frozen_linear_weight", lambda module: None):
        yield


@contextlib.contextmanager
def logits_gradient_by_kernel(model) -> Iterator[None]:
    """The logits' gradient by autograd's log-softmax backward kernel, as on the CPU."""
    with mock.patch("bios.engine.forward.KERNEL_GRADIENT_DEVICES", frozenset({"cpu", "cuda"})):
        yield


@contextlib.contextmanager
def rms_norms_unfused(model) -> Iterator[None]:
    """transformers' own RMSNorm, under autograd (the fused one's instance forwards taken off)."""
    from bios.models.rms_norm import fuse_rms_norms, is_fused

    fused = [module for module in model.modules() if is_fused(module)]
    for module in fused:
        del module.forward  # the instance attribute: the class's forward shows again
    try:
        yield
    finally:
        fuse_rms_norms(model)


ABLATIONS = {
    "LoRA backward by autograd": lora_backward_by_autograd,
    "logits gradient by kernel": logits_gradient_by_kernel,
    "RMSNorm unfused": rms_norms_unfused,
}


def bios_step(
    folder: Path, workdir: Path, tokens, device: str
) -> tuple[Callable[[], tuple[float, float]], torch.nn.Module]:
    """Bios's step: `forward_backward` then `optim_step`, each timed to its end on the GPU, and
    the base model it runs on. Also prints the memory planner's estimate of the step against
    its measured peak."""
    from bios.client.service import ServiceClient
    from bios.engine import memory
    from bios.engine.batch import resolve_config, resolve_objective
    from bios.engine.engine import Engine
    from bios.types import AdamParams

    engine = Engine(home=workdir / "home", device=device, dtype="bf16")
    training = ServiceClient(engine=engine).create_lora_training_client(
        str(folder), rank=RANK, seed=0
    )
    data = sft_data(tokens)
    adam = AdamParams(learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS)
    worker = engine.worker_of(training.model_id)
    batch = worker.pack(data, resolve_objective("cross_entropy"))
    estimate = memory.step_bytes(memory.Shape.of(worker.loaded.model), batch, False, RANK)
    synchronize()
    before = memory_allocated()
    reset_peak()
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(adam).result()
    synchronize()
    peak = peak_memory() - before  # 0 - 0 off a GPU
    print(
        f"memory: {before / 2**30:.2f} GiB allocated before the step (weights, run state); the "
        f"step's peak above that {peak / 2**30:.2f} GiB, the planner's estimate of it "
        f"(memory.step_bytes) {estimate / 2**30:.2f} GiB: {peak / estimate:.2f}x"
    )
    # What autograd saves, as tests/test_memory.py measures it on the CPU: the run's own step
    # on this thread (the worker is idle), under saved-tensor hooks.
    run, model = engine.run(training.model_id), worker.loaded.model
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *run.parameters.values()]}
    saved: dict[int, tuple[int, str]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = (storage.nbytes(), f"{tuple(tensor.shape)} {tensor.dtype}")
        return tensor

    objective = resolve_objective("cross_entropy")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run.forward_backward(batch, objective, resolve_config(objective, {}), True)
    by_shape: dict[str, list[int]] = {}
    for size, what in saved.values():
        by_shape.setdefault(what, []).append(size)
    total = sum(size for size, _ in saved.values())
    print(
        f"saved for the backward: {total / 2**30:.2f} GiB in {len(saved)} storages "
        f"({total / estimate:.2f}x the estimate); the largest groups:"
    )
    for what, sizes in sorted(by_shape.items(), key=lambda item: -sum(item[1]))[:12]:
        print(f"  {sum(sizes) / 2**30:7.2f} GiB  {len(sizes):4d} x {what}")

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        training.forward_backward(data, "cross_entropy").result()
        synchronize()
        middle = time.perf_counter()
        training.optim_step(adam).result()
        synchronize()
        return middle - start, time.perf_counter() - middle

    return step, model


def median_times(step: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """(forward_backward, optim_step): the medians of 3 timed steps after 2 untimed ones."""
    for _ in range(2):
        step()
    timings = [step() for _ in range(3)]
    return sorted(t[0] for t in timings)[1], sorted(t[1] for t in timings)[1]


def plain_step(folder: Path, tokens, micro: int, device: str) -> Callable[[], tuple[float, float]]:
    """`gpu_check.py`'s plain transformers + peft bf16 SDPA loop, in micro-batches of `micro`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = peft_model(model.to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    rows = tokens.to(device)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        plain_backward(model, rows, micro)
        synchronize()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
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
    busy_or_one = busy or 1.0  # no kernels off a GPU
    print(f"\noperators by their kernels' GPU time (of {busy * 1e3:.1f} ms):")
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  operator  input shapes")
    for e in ops[:rows]:
        share = e.self_device_time_total / 1e6 / busy_or_one
        shapes = str(e.input_shapes)[:110]
        print(f"{e.self_device_time_total / 1e3:8.2f} {share:6.1%} {e.count:6d}  {e.key}  {shapes}")
    kernels.sort(key=lambda e: -e.self_device_time_total)
    print("\nkernels by GPU time:")
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  kernel")
    for e in kernels[:rows]:
        share = e.self_device_time_total / 1e6 / busy_or_one
        print(f"{e.self_device_time_total / 1e3:8.2f} {share:6.1%} {e.count:6d}  {e.key[:140]}")
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="Llama-3.2-1B", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--allow-cpu", action="store_true", help="debugging: run on the CPU")
    parser.add_argument("--tiny", action="store_true", help="debugging: a tiny model")
    parser.add_argument("--side", default="bios", choices=["bios", "plain"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, help="the plain loop's micro-batch (default: all)")
    parser.add_argument("--rows", type=int, default=30, help="table rows")
    parser.add_argument(
        "--ablations", action="store_true", help="Bios: time the step with each change undone"
    )
    args = parser.parse_args()
    cuda = torch is not None and torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        refuse("no CUDA GPU here: this profile needs one (`--allow-cpu --tiny` debugs it)")
    if not cuda and not args.tiny:
        refuse("--allow-cpu needs --tiny: the full-size shapes are not for a CPU")
    import_bios()
    from torch.profiler import ProfilerActivity, profile

    device = "cuda" if cuda else "cpu"
    name = next(iter(TINY_SHAPES)) if args.tiny else args.shape
    shape = TINY_SHAPES[name] if args.tiny else LLAMA_SHAPES[name]
    batch, seq = (2, 64) if args.tiny else (args.batch, args.seq)
    with tempfile.TemporaryDirectory(prefix="bios-profile-") as workdir:
        folder = Path(workdir) / "model"
        save_model(llama_config(shape), folder, device, torch.bfloat16)  # kept on disk only
        free_memory()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (batch, seq + 1), generator=generator)
        model = None
        if args.side == "bios":
            step, model = bios_step(folder, Path(workdir), tokens, device)
        else:
            step = plain_step(folder, tokens, args.micro or batch, device)
        forward_backward, optim = median_times(step)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            step()
        where = torch.cuda.get_device_name() if cuda else "CPU (--allow-cpu: figures mean nothing)"
        print(
            f"{args.side}: {name}, {batch} x {seq} tokens, LoRA r{RANK}, bf16, {where}, "
            f"torch {torch.__version__}"
        )
        busy = print_profile(profiler, args.rows)
        print(
            f"\nstep (median of 3): forward_backward {forward_backward:.3f} s, optim_step "
            f"{optim:.3f} s; GPU busy in the profiled step {busy:.3f} s (kernels' own time), "
            f"{busy / (forward_backward + optim):.0%} of the step"
        )
        if args.ablations and model is not None:
            print("\nablations (each change undone alone; forward_backward, median of 3):")
            for what, undone in ABLATIONS.items():
                with undone(model):
                    time_without, _ = median_times(step)
                ratio = time_without / forward_backward
                print(
                    f"ablation: {what}: {time_without:.3f} s, {ratio:.3f}x the step with every "
                    f"change ({forward_backward:.3f} s)"
                )


if __name__ == "__main__":
    main()
