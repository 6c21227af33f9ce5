"""What the benchmark scripts say about the machine they ran on, and how they reach Bios there."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo (or what `platform` knows elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor() or "unknown")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg states them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def bios_service(device: str | None = None, dtype: str | None = None):
    """`bios.ServiceClient(device=..., dtype=...)`, each passed only when given, so None means
    Bios's own default (and a Bios without the arguments still runs at its defaults)."""
    import bios

    options = {key: value for key, value in (("device", device), ("dtype", dtype)) if value}
    return bios.ServiceClient(**options)


def bios_precision(service) -> str:
    """Where and in which dtype the in-process engine behind `service` keeps base models, with
    its reason, e.g. "cpu, float32 (this CPU has no native bf16 ...)". Benchmark-only: it reads
    the client's private engine, as no public call reports it."""
    engine = getattr(service, "_engine", None)
    precision = getattr(engine, "precision", None)
    if precision is not None:
        return precision.describe()
    for worker in getattr(engine, "_workers", {}).values():  # an engine without `precision`
        parameter = next(worker.loaded.model.parameters())
        return f"{parameter.device}, {str(parameter.dtype).removeprefix('torch.')}"
    return "unknown"
