"""Bios: an open, self-hostable fine-tuning platform for language models.

import bios
service = bios.ServiceClient()              # the engine runs in this process
training = service.create_lora_training_client("HuggingFaceTB/SmolLM2-135M-Instruct")
"""

from bios import types
from bios.client.futures import APIFuture
from bios.client.service import ServiceClient, TrainingClient
from bios.errors import BiosError, InvalidInputError, NotFoundError

__version__ = "0.1.0"

__all__ = [
    "APIFuture",
    "BiosError",
    "InvalidInputError",
    "NotFoundError",
    "ServiceClient",
    "TrainingClient",
    "__version__",
    "types",
]
