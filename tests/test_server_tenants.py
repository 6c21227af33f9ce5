"""Eight clients train concurrently on one server and base model; each ends exactly where it
would have ended training alone."""

from __future__ import annotations

import threading

import pytest
import torch

import bios
from bios.engine.engine import Engine
from bios.types import AdamParams
from helpers import random_datum
from server_process import ServerProcess

CLIENTS = 8
STEPS = 3


def train(service: bios.ServiceClient, model: str, index: int) -> list[list[float]]:
    """A client's whole job: its own data and seed, a few steps, its final logprobs."""
    generator = torch.Generator().manual_seed(100 + index)
    data = [random_datum(384, 6 + index, "cross_entropy", generator) for _ in range(2)]
    client = service.create_lora_training_client(model, rank=4, seed=index)
    for _ in range(STEPS):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=1e-2))
    out = client.forward(data, "cross_entropy").result()
    return [o["logprobs"].tolist() for o in out.loss_fn_outputs]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("tenants"), [tiny_models["qwen3"]])
    yield process
    process.stop()


def test_concurrent_clients_equal_each_alone(server, tiny_models, tmp_path):
    model = tiny_models["qwen3"]
    alone_service = bios.ServiceClient(engine=Engine(home=tmp_path))
    alone = [train(alone_service, model, i) for i in range(CLIENTS)]

    together: list = [None] * CLIENTS
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            service = bios.ServiceClient(base_url=server.url, api_key=f"tml-tenant-{index}")
            together[index] = train(service, model, index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for index in range(CLIENTS):
        for got, want in zip(together[index], alone[index], strict=True):
            assert got == pytest.approx(want, abs=1e-5), f"client {index}"
