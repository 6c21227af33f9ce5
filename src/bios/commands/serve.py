"""`bios serve`: run the training server, in one process or on N ranks (rank 0 serves)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from bios.commands.launch import (
    add_distributed_flags,
    run_on_ranks,
    strip_distributed_flags,
    wants_launch,
)

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def server_home(args: argparse.Namespace) -> Path:
    """The server's database and checkpoints: `--home`, else $BIOS_HOME/server."""
    from bios.models.loading import bios_home

    return Path(args.home) if args.home else bios_home() / "server"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def run(args: argparse.Namespace) -> int:
    if wants_launch(args):
        # Start every rank under torchrun; rank 0 serves, the others follow it (bios.distributed).
        if args.nnodes > 1 and args.node_rank is None:
            print(
                "bios serve: --nnodes > 1 needs --node-rank (0 on the serving machine)",
                file=sys.stderr,
            )
            return 2
        # Every rank reads the device and dtype from the environment (rank 0 and its followers
        # alike), each rank on its own GPU (bios.engine.devices).
        for variable, value in (("BIOS_DEVICE", args.device), ("BIOS_DTYPE", args.dtype)):
            if value is not None:
                os.environ[variable] = value
        own_args = sys.argv[sys.argv.index("serve") + 1 :]
        target = ["-m", "bios.cli", "serve", *strip_distributed_flags(own_args)]
        return run_on_ranks(args, target, "bios serve")
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bios.distributed import process_engine, shutdown_process_engine
    from bios.distributed.leader import DistributedEngine
    from bios.server.app import create_app
    from bios.server.state import ServerConfig, ServerState

    # One rank of several: rank 0 serves; every other rank runs its commands here until it stops.
    engine = process_engine(home=server_home(args), device=args.device, dtype=args.dtype)
    if isinstance(engine, DistributedEngine):
        print(f"bios serve: rank 0 of {engine.group.world} ({engine.group.backend})")
    print(f"bios serve: base models on {engine.precision.describe()}")
    auth = args.auth if args.auth is not None else not is_loopback(args.host)
    config = ServerConfig(
        home=server_home(args),
        models=args.model,
        auth=auth,
        keep_graphs=not args.no_keep_graphs,
        max_runs_per_tenant=args.max_runs,
        max_checkpoint_bytes_per_tenant=int(args.max_checkpoint_gib * 2**30),
        max_body_bytes=int(args.max_body_mib * 2**20),
        max_samples_per_request=args.max_samples,
        max_tokens_per_request=args.max_tokens_per_request,
        max_lora_rank=args.max_lora_rank,
        model_dirs=[Path(d) for d in args.model_dir],
        max_samplers_per_tenant=args.max_samplers,
        sampler_idle_seconds=args.sampler_idle_minutes * 60,
    )
    state = ServerState(config, engine=engine)
    print(f"bios serve: loading {', '.join(args.model) or 'no model yet'} (home {config.home})")
    state.preload()
    keys_needed = "required" if auth else "not required"
    print(f"bios serve: listening on http://{args.host}:{args.port}, API keys {keys_needed}")
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        shutdown_process_engine()  # the other ranks leave their loop (one process: nothing)
    return 0


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="run the training server (speaks Tinker's wire protocol; Bios's client too)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a base model to serve (repeatable); without one, any model on this machine",
    )
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="without --model: a folder whose model folders may be loaded by path (repeatable); "
        "hub ids in the Hugging Face cache and the bundled default are always allowed",
    )
    parser.add_argument(
        "--device",
        help="where base models live: cpu, cuda, cuda:N (default: $BIOS_DEVICE, else CUDA when "
        "there is a GPU, else cpu; each rank of several takes cuda:LOCAL_RANK)",
    )
    parser.add_argument(
        "--dtype",
        help="base models' dtype: bf16, fp32 or auto (default: bf16 on GPUs and on CPUs with "
        "native bf16, else fp32); adapters and optimizer state are float32 always",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--home", help="database and checkpoints (default: $BIOS_HOME/server)")
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys (default: on unless --host is a loopback address)",
    )
    parser.add_argument("--max-runs", type=int, default=64, help="open runs per tenant")
    parser.add_argument(
        "--max-checkpoint-gib", type=float, default=100.0, help="checkpoint storage per tenant"
    )
    parser.add_argument(
        "--max-samplers", type=int, default=64, help="sampling sessions held per tenant"
    )
    parser.add_argument(
        "--sampler-idle-minutes",
        type=float,
        default=60.0,
        help="free a sampling session unused this long (0: never)",
    )
    parser.add_argument(
        "--max-body-mib",
        type=float,
        default=256.0,
        help="largest request body accepted, as sent and (zstd) unpacked",
    )
    parser.add_argument(
        "--max-samples", type=int, default=256, help="largest num_samples of one asample"
    )
    parser.add_argument(
        "--max-tokens-per-request",
        type=int,
        default=2**20,
        help="most tokens one forward(_backward) or asample (prompt + samples) may hold",
    )
    parser.add_argument("--max-lora-rank", type=int, default=1024, help="largest LoRA rank")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--no-keep-graphs",
        action="store_true",
        help="do not keep a forward's graph for the backward after it (for comparisons)",
    )
    add_distributed_flags(parser)  # --nproc-per-node N [--nnodes K --rdzv-endpoint H:P]
    parser.set_defaults(run=run)
