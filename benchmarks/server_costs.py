"""`bios serve` on the default model: what a custom objective costs over HTTP, and memory per
tenant.

1. Custom vs built-in over HTTP, through the official `tinker` SDK. The same batch (8 x 256
   tokens) goes through `forward_backward(data, "cross_entropy")` and through
   `forward_backward_custom(data, fn)` with fn computing the same loss; the SDK turns the latter
   into a forward and a second forward_backward. Measured against two servers in turn: one that
   keeps the forward's graph for the backward (the default) and one started with
   `--no-keep-graphs` (what the SDK's own service does: 1.5x FLOPs). Median of `--repeats`
   calls each, after a warm-up.
2. Memory: the server's resident memory (VmRSS) after one LoRA rank-32 run has taken a training
   step, and after eight runs each have, on a fresh server per batch size (8 x 256 tokens, the
   training batch above, and 2 x 256).

Servers run as real processes on loopback; the script starts and stops them itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import numpy as np
import tinker
import torch
from machine import cpu_name
from tinker import types

from bios.hparams import lora_param_count
from bios.models.loading import DEFAULT_MODEL, resolve_model_path
from server_process import ServerProcess


def make_batch(vocab: int, count: int, length: int) -> list[types.Datum]:
    rng = np.random.default_rng(0)
    data = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, length + 1)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(tokens[1:].astype(np.int64)),
                    "weights": types.TensorData.from_numpy(np.ones(length, dtype=np.float32)),
                },
            )
        )
    return data


def custom_cross_entropy(data, logprobs_list):
    loss = sum(
        -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return loss, {}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def time_custom(url: str, data, repeats: int) -> dict[str, float]:
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    training = service.create_lora_training_client(base_model=DEFAULT_MODEL, rank=32, seed=0)
    calls = {
        "builtin": lambda: training.forward_backward(data, "cross_entropy").result(),
        "custom": lambda: training.forward_backward_custom(data, custom_cross_entropy).result(),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats + 1):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if repeat:  # round 0 warms up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(samples) for name, samples in times.items()}


def memory_per_tenant(url: str, pid: int, data) -> tuple[float, float]:
    adam = types.AdamParams(learning_rate=1e-4)
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    runs = []
    figures = []
    for count in range(1, 9):
        training = service.create_lora_training_client(
            base_model=DEFAULT_MODEL, rank=32, seed=count
        )
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(adam).result()
        runs.append(training)
        if count in (1, 8):
            figures.append(rss_mib(pid))
    return figures[0], figures[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    resolve_model_path(DEFAULT_MODEL)  # convert once before timing anything
    data = make_batch(49152, args.batch, args.length)

    # Memory first, on a fresh server per batch: RSS keeps the high-water mark of earlier work.
    memory = {}
    for batch in (data, data[:2]):
        with tempfile.TemporaryDirectory() as home:
            server = ServerProcess(Path(home), [DEFAULT_MODEL])
            try:
                label = f"{len(batch)} x {args.length}"
                memory[label] = memory_per_tenant(server.url, server.process.pid, batch)
            finally:
                server.stop()
    results = {}
    for label, extra in (("keep graphs (Bios)", []), ("no kept graphs", ["--no-keep-graphs"])):
        with tempfile.TemporaryDirectory() as home:
            server = ServerProcess(Path(home), [DEFAULT_MODEL], extra_args=extra)
            try:
                results[label] = time_custom(server.url, data, args.repeats)
            finally:
                server.stop()

    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"SDK tinker {tinker.__version__ if hasattr(tinker, '__version__') else '?'}, "
        f"model {DEFAULT_MODEL}, LoRA rank 32, batch {args.batch} x {args.length}, "
        f"median of {args.repeats}"
    )
    print(f"{'server':22s} {'builtin s':>10s} {'custom s':>10s} {'custom/builtin':>15s}")
    for label, figures in results.items():
        ratio = figures["custom"] / figures["builtin"]
        print(f"{label:22s} {figures['builtin']:10.3f} {figures['custom']:10.3f} {ratio:14.2f}x")
    adapter_mib = lora_param_count(DEFAULT_MODEL, 32) * 4 * 3 / 2**20  # weights + 2 moments
    print(f"one rank-32 adapter with its AdamW moments: {adapter_mib:.0f} MiB")
    for batch, (one, eight) in memory.items():
        print(
            f"server RSS, steps of {batch} tokens: 1 LoRA run {one:.0f} MiB, 8 LoRA runs "
            f"{eight:.0f} MiB, ratio {eight / one:.2f}x, {(eight - one) / 7:.0f} MiB per extra run"
        )


if __name__ == "__main__":
    main()
