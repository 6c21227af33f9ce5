"""Shared fixtures: tiny real-architecture models on disk and an engine with a private home."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The correctness tests compare float32 on the CPU with float32 references: on a GPU machine or
# a CPU with native bf16, Bios's own default would be bf16 (tests of that pass dtype explicitly).
os.environ.setdefault("BIOS_DEVICE", "cpu")
os.environ.setdefault("BIOS_DTYPE", "fp32")


import pytest
import torch

from bios.client.service import ServiceClient
from bios.engine.engine import Engine
from tiny_models import FAMILIES, make_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """family -> folder of a saved ~1M parameter model with its tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: str(make_tiny_model(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def session_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """One engine for the whole session, so each tiny model is loaded once."""
    return Engine(home=tmp_path_factory.mktemp("bios-home"))


@pytest.fixture
def service(session_engine: Engine) -> ServiceClient:
    return ServiceClient(engine=session_engine)


@pytest.fixture
def llama(tiny_models: dict[str, str]) -> str:
    return tiny_models["llama"]
