"""Base models: the catalog of known models and loading them from this machine.

The catalog is imported eagerly (it is a table); the loading names are imported on first use,
so `from bios.models import lookup` does not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import Any

from bios.models.catalog import CATALOG, ModelSpec, family_from_config, lookup, spec_from_config

_LOADING_NAMES = (
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelNotFoundError",
    "bios_home",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
)

__all__ = [
    "CATALOG",
    "ModelSpec",
    "family_from_config",
    "lookup",
    "spec_from_config",
    *_LOADING_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LOADING_NAMES:
        from bios.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'bios.models' has no attribute {name!r}")
