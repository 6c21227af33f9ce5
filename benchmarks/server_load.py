"""A bounded load test of `bios serve`: 16 concurrent clients, forward_backward + optim_step.

Each client is a tenant (its own API key) with its own LoRA run on one tiny Llama-architecture
model (~0.8M parameters, built on the fly). Clients loop `forward_backward` then `optim_step`,
waiting for each, until `--seconds` have passed or `--steps` steps are done, whichever is first.
Printed: requests/s, p50/p99 latency per request kind, errors, and fairness (the fewest and most
steps any client completed). Traffic stays on loopback; the script starts and stops the server.

`--heavy` adds a second phase: the same load while one more tenant loops maximal in-range
`sample` requests on the base model (`--max-samples` × the rest of the context, within the
server's default limits), and prints the other tenants' p99 alone, with the heavy tenant, and
the ratio (the target is ≤ 2×: a decode runs in bounded turns, see `docs/operations.md`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch

import bios
from bios.types import AdamParams, ModelInput, SamplingParams
from helpers import random_datum
from server_process import ServerProcess
from tiny_models import make_tiny_model


def create_key(home: Path, tenant: str) -> str:
    command = [sys.executable, "-m", "bios.cli", "keys", "create", "--tenant", tenant]
    done = subprocess.run(
        [*command, "--home", str(home)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def client_loop(url, key, model, index, deadline, max_steps, latencies, errors, steps) -> None:
    generator = torch.Generator().manual_seed(index)
    data = [random_datum(384, 32, "cross_entropy", generator) for _ in range(4)]
    try:
        training = bios.ServiceClient(base_url=url, api_key=key).create_lora_training_client(
            model, rank=8, seed=index
        )
    except Exception as error:
        errors.append(f"client {index}: {error}")
        return
    done = 0
    while time.monotonic() < deadline and done < max_steps:
        for kind, call in (
            ("forward_backward", lambda: training.forward_backward(data, "cross_entropy")),
            ("optim_step", lambda: training.optim_step(AdamParams(learning_rate=1e-3))),
        ):
            started = time.perf_counter()
            try:
                call().result()
            except Exception as error:
                errors.append(f"client {index} {kind}: {error}")
                continue
            latencies[kind].append(time.perf_counter() - started)
        done += 1
    steps[index] = done


def heavy_loop(url, key, model, samples, max_tokens, stop, latencies, errors) -> None:
    """Maximal in-range samples, one after another, until `stop` is set."""
    try:
        sampler = bios.ServiceClient(base_url=url, api_key=key).create_sampling_client(
            base_model=model
        )
    except Exception as error:
        errors.append(f"heavy: {error}")
        return
    prompt = ModelInput.from_ints([5, 17, 42, 9])
    seed = 0
    while not stop.is_set():
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        started = time.perf_counter()
        try:
            sampler.sample(prompt, samples, params).result()
        except Exception as error:
            errors.append(f"heavy sample: {error}")
            return
        latencies["sample (heavy)"].append(time.perf_counter() - started)
        seed += 1


def run_phase(server, keys, model, args, heavy: bool):
    """One load phase: (latencies by kind, errors, steps per client, seconds)."""
    latencies: dict[str, list[float]] = {"forward_backward": [], "optim_step": []}
    errors: list[str] = []
    steps = [0] * args.clients
    started = time.monotonic()
    deadline = started + args.seconds
    threads = [
        threading.Thread(
            target=client_loop,
            args=(server.url, keys[i], model, i, deadline, args.steps, latencies, errors, steps),
        )
        for i in range(args.clients)
    ]
    stop = threading.Event()
    heavy_thread = None
    if heavy:
        latencies["sample (heavy)"] = []
        heavy_thread = threading.Thread(
            target=heavy_loop,
            args=(
                server.url,
                keys[args.clients],
                model,
                args.heavy_samples,
                args.heavy_tokens,
                stop,
                latencies,
                errors,
            ),
        )
        heavy_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.seconds + 120)
    stop.set()
    if heavy_thread is not None:
        heavy_thread.join(timeout=args.seconds + 120)
    return latencies, errors, steps, time.monotonic() - started


def print_phase(title, latencies, errors, steps, elapsed) -> None:
    total = sum(len(v) for v in latencies.values())
    print(f"{title}: {elapsed:.1f} s, requests/s: {total / elapsed:.1f}   errors: {len(errors)}")
    print(f"{'request':18s} {'count':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    for kind, values in latencies.items():
        if values:
            print(
                f"{kind:18s} {len(values):6d} {1000 * percentile(values, 0.5):8.1f} "
                f"{1000 * percentile(values, 0.99):8.1f} {1000 * statistics.mean(values):8.1f}"
            )
    print(
        f"fairness: steps per client min {min(steps)}, max {max(steps)}, "
        f"min/max {min(steps) / max(max(steps), 1):.2f}"
    )
    for error in errors[:5]:
        print("error:", error)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--heavy", action="store_true", help="add a phase with one tenant sampling maximally"
    )
    parser.add_argument("--heavy-samples", type=int, default=256, help="the --max-samples default")
    parser.add_argument(
        "--heavy-tokens",
        type=int,
        default=508,
        help="max_tokens: the tiny model's context - prompt",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = str(make_tiny_model("llama", home / "tiny-llama"))
        tenants = args.clients + (1 if args.heavy else 0)
        keys = [create_key(home / "server", f"tenant-{i}") for i in range(tenants)]
        server = ServerProcess(home / "server", [model], extra_args=["--auth"])
        try:
            alone = run_phase(server, keys, model, args, heavy=False)
            loaded = run_phase(server, keys, model, args, heavy=True) if args.heavy else None
        finally:
            server.stop()

    print(
        f"{args.clients} clients, tiny Llama (~0.8M params), LoRA rank 8, "
        f"4 x 32 tokens per forward_backward, {os.cpu_count()} cores"
    )
    print_phase("alone", *alone)
    if loaded is None:
        return
    print(f"+ 1 heavy tenant: {args.heavy_samples} samples x {args.heavy_tokens} tokens per sample")
    print_phase("with heavy tenant", *loaded)
    print(f"{'others p99':18s} {'alone ms':>9s} {'heavy ms':>9s} {'ratio':>6s}")
    for kind in ("forward_backward", "optim_step"):
        if alone[0][kind] and loaded[0][kind]:
            a, b = percentile(alone[0][kind], 0.99), percentile(loaded[0][kind], 0.99)
            print(f"{kind:18s} {1000 * a:9.1f} {1000 * b:9.1f} {b / a:6.2f}")


if __name__ == "__main__":
    main()
