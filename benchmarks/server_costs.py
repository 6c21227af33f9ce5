"""`bios serve` on the default model: what an evaluation forward and a custom objective cost over
HTTP, and memory per tenant.

1. Evaluation forward: seconds per forward-only request (`--batch` x `--length` tokens, 4 x 128
   by default) in-process and over HTTP, with the request's `keep_graph` flag off (the default,
   and all the Tinker SDK sends: no autograd graph is built) and on (what every HTTP forward did
   before the flag existed: grad mode on, and the graph held until the next request of the run
   or 60 s), with the server's RSS just after such a forward (the kept graph's memory).
2. Custom vs built-in over HTTP. A custom objective over HTTP is a forward, then a
   `forward_backward` on the same tokens (the client computes the loss's gradient in between).
   Timed against a built-in `forward_backward`: with `keep_graph` on for the forward (what
   Bios's client sends: the backward reuses the graph) and off (what the SDK sends, and what a
   server started with `--no-keep-graphs` does: 1.5x FLOPs).
3. Memory: the server's resident memory (VmRSS) after one LoRA rank-32 run has taken a training
   step, and after eight runs each have, through the official `tinker` SDK, on a fresh server per
   batch size (the batch above, and 2 of its sequences). Figures in the README: `--batch 8
   --length 256 --memory`.

Requests in 1 and 2 are plain JSON to the routes, so both flag settings are timed on one server;
medians of `--repeats` calls after a warm-up. Servers run as real processes on loopback; the
script starts and stops them itself. Part 3 runs only with `--memory` (it adds minutes).
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

import httpx
import numpy as np
import tinker
import torch
from machine import cpu_name
from tinker import types

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
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


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def data_json(data: list[types.Datum]) -> list[dict]:
    """The batch as Bios's JSON wire form (also what `bios.types.Datum` validates)."""
    return [
        {
            "model_input": {"chunks": [{"tokens": d.model_input.to_ints()}]},
            "loss_fn_inputs": {
                name: {"data": tensor.data, "dtype": tensor.dtype}
                for name, tensor in d.loss_fn_inputs.items()
            },
        }
        for d in data
    ]


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


class Wire:
    """Plain JSON requests to `bios serve`, each waited for through `retrieve_future`."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=f"{url}/api/v1", timeout=120)

    def call(self, route: str, body: dict) -> dict:
        request_id = self.http.post(f"/{route}", json=body).raise_for_status().json()["request_id"]
        while True:
            answer = self.http.post("/retrieve_future", json={"request_id": request_id}).json()
            if answer.get("type") != "try_again":
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer

    def forward_backward(self, model_id: str, data: list[dict], **flags) -> dict:
        payload = {"data": data, "loss_fn": "cross_entropy"}
        body = {"model_id": model_id, "forward_backward_input": payload, **flags}
        return self.call("forward_backward", body)


def time_http(url: str, pid: int, data: list[dict], repeats: int) -> dict[str, float]:
    """Seconds per request kind, and the server's RSS just after each kind of forward."""
    wire = Wire(url)
    lora = {"rank": 32, "seed": 0}
    model_id = wire.call("create_model", {"base_model": DEFAULT_MODEL, "lora_config": lora})
    model_id = model_id["model_id"]

    rss: dict[bool, float] = {False: 0.0, True: 0.0}

    def forward(keep: bool) -> None:
        wire.forward_backward(model_id, data, forward_only=True, keep_graph=keep)
        rss[keep] = max(rss[keep], rss_mib(pid))  # a kept graph is held until the next request

    def custom(keep: bool) -> None:
        forward(keep)
        wire.forward_backward(model_id, data)  # weights = -dL/dlogprobs: here the same ones

    seconds = {
        "forward, keep_graph off": median_seconds(lambda: forward(False), repeats),
        "forward, keep_graph on": median_seconds(lambda: forward(True), repeats),
        "builtin": median_seconds(lambda: wire.forward_backward(model_id, data), repeats),
        "custom, keep_graph on": median_seconds(lambda: custom(True), repeats),
        "custom, keep_graph off": median_seconds(lambda: custom(False), repeats),
    }
    return seconds | {"rss, keep_graph off": rss[False], "rss, keep_graph on": rss[True]}


def time_in_process(data: list[dict], repeats: int) -> float:
    from bios.types import Datum

    batch = [Datum.model_validate(d) for d in data]
    with tempfile.TemporaryDirectory() as home:
        service = ServiceClient(engine=Engine(home=Path(home)))
        training = service.create_lora_training_client(DEFAULT_MODEL, rank=32, seed=0)
        return median_seconds(lambda: training.forward(batch, "cross_entropy").result(), repeats)


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--memory", action="store_true", help="also measure memory per tenant")
    args = parser.parse_args()
    resolve_model_path(DEFAULT_MODEL)  # convert once before timing anything
    data = make_batch(49152, args.batch, args.length)

    # Memory first, on a fresh server per batch: RSS keeps the high-water mark of earlier work.
    memory = {}
    for batch in (data, data[:2]) if args.memory else ():
        with tempfile.TemporaryDirectory() as home:
            server = ServerProcess(Path(home), [DEFAULT_MODEL])
            try:
                label = f"{len(batch)} x {args.length}"
                memory[label] = memory_per_tenant(server.url, server.process.pid, batch)
            finally:
                server.stop()
    wire_data = data_json(data)
    with tempfile.TemporaryDirectory() as home:
        server = ServerProcess(Path(home), [DEFAULT_MODEL])
        try:
            http = time_http(server.url, server.process.pid, wire_data, args.repeats)
        finally:
            server.stop()
    in_process = time_in_process(wire_data, args.repeats)

    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"model {DEFAULT_MODEL}, LoRA rank 32, batch {args.batch} x {args.length}, "
        f"median of {args.repeats}"
    )
    print(f"{'evaluation forward':40s} {'s':>8s} {'/ in-process':>13s} {'server RSS after':>17s}")
    rows = (
        ("in-process (ServiceClient.forward)", in_process, ""),
        ("HTTP, keep_graph off (default, SDK)", http["forward, keep_graph off"], "off"),
        ("HTTP, keep_graph on (before the flag)", http["forward, keep_graph on"], "on"),
    )
    for label, seconds, flag in rows:
        rss = f"{http[f'rss, keep_graph {flag}']:.0f} MiB" if flag else ""
        print(f"{label:40s} {seconds:8.3f} {seconds / in_process:12.2f}x {rss:>17s}")
    print(f"{'over HTTP':40s} {'s':>8s} {'/ builtin':>13s}")
    builtin = http["builtin"]
    rows = (
        ("builtin forward_backward", builtin),
        ("custom, keep_graph on (Bios client)", http["custom, keep_graph on"]),
        ("custom, keep_graph off (SDK)", http["custom, keep_graph off"]),
    )
    for label, seconds in rows:
        print(f"{label:40s} {seconds:8.3f} {seconds / builtin:12.2f}x")
    adapter_mib = lora_param_count(DEFAULT_MODEL, 32) * 4 * 3 / 2**20  # weights + 2 moments
    print(f"one rank-32 adapter with its AdamW moments: {adapter_mib:.0f} MiB")
    for batch, (one, eight) in memory.items():
        print(
            f"server RSS, steps of {batch} tokens: 1 LoRA run {one:.0f} MiB, 8 LoRA runs "
            f"{eight:.0f} MiB, ratio {eight / one:.2f}x, {(eight - one) / 7:.0f} MiB per extra run"
        )


if __name__ == "__main__":
    main()
