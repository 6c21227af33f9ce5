"""`bios serve` and `bios keys`: running the server and managing its API keys."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def _home(args: argparse.Namespace) -> Path:
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


def serve(args: argparse.Namespace) -> int:
    from bios.launch import exec_command, strip_distributed_flags, torchrun_command, wants_launch

    if wants_launch(args):
        # Start every rank under torchrun; rank 0 serves, the others follow it (bios.distributed).
        if args.nnodes > 1 and args.node_rank is None:
            print(
                "bios serve: --nnodes > 1 needs --node-rank (0 on the serving machine)",
                file=sys.stderr,
            )
            return 2
        own_args = sys.argv[sys.argv.index("serve") + 1 :]
        target = ["-m", "bios.cli", "serve", *strip_distributed_flags(own_args)]
        try:
            command = torchrun_command(
                args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.node_rank, target
            )
        except ValueError as error:
            print(f"bios serve: {error}", file=sys.stderr)
            return 2
        return exec_command(command)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bios.distributed import Group, env_world_size, follow, leader_engine
    from bios.server.app import create_app
    from bios.server.state import ServerConfig, ServerState

    engine = None
    if env_world_size() > 1:
        group = Group()
        if not group.is_leader:
            return follow(group)  # rank 0 serves; this rank runs its commands until it stops
        engine = leader_engine(group, home=_home(args))
        print(f"bios serve: rank 0 of {group.world} ({group.backend})")
    auth = args.auth if args.auth is not None else not is_loopback(args.host)
    config = ServerConfig(
        home=_home(args),
        models=args.model,
        auth=auth,
        keep_graphs=not args.no_keep_graphs,
        max_runs_per_tenant=args.max_runs,
        max_checkpoint_bytes_per_tenant=int(args.max_checkpoint_gib * 2**30),
        max_body_bytes=int(args.max_body_mib * 2**20),
    )
    state = ServerState(config, engine=engine)
    print(f"bios serve: loading {', '.join(args.model) or 'no model yet'} (home {config.home})")
    state.preload()
    keys_needed = "required" if auth else "not required"
    print(f"bios serve: listening on http://{args.host}:{args.port}, API keys {keys_needed}")
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if engine is not None:
            engine.shutdown()  # the other ranks leave their loop
    return 0


def keys(args: argparse.Namespace) -> int:
    from bios.server.auth import hash_key, key_prefix, new_key
    from bios.server.store import Store

    store = Store(_home(args) / "bios.sqlite3")
    if args.action == "create":
        if not args.tenant:
            print("bios keys create: --tenant NAME is required", file=sys.stderr)
            return 2
        key = new_key()
        store.add_key(hash_key(key), key_prefix(key), args.tenant)
        print(key)
        print(f"(tenant {args.tenant}; shown once, stored only as a hash)", file=sys.stderr)
    elif args.action == "revoke":
        if not args.key:
            print("bios keys revoke: give the key or its prefix", file=sys.stderr)
            return 2
        revoked = store.revoke_keys(key_prefix(args.key))
        print(f"revoked {revoked} key(s)")
        return 0 if revoked else 1
    else:
        for row in store.keys():
            status = "revoked" if row["revoked"] else "active"
            print(f"{row['key_prefix']}…  tenant={row['tenant']}  {status}")
    return 0


def add_commands(commands) -> None:
    serve_parser = commands.add_parser(
        "serve", help="run the training server (speaks Tinker's wire protocol; Bios's client too)"
    )
    serve_parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a base model to serve (repeatable); without one, any model on this machine",
    )
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--home", help="database and checkpoints (default: $BIOS_HOME/server)"
    )
    serve_parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API keys (default: on unless --host is a loopback address)",
    )
    serve_parser.add_argument("--max-runs", type=int, default=64, help="open runs per tenant")
    serve_parser.add_argument(
        "--max-checkpoint-gib", type=float, default=100.0, help="checkpoint storage per tenant"
    )
    serve_parser.add_argument(
        "--max-body-mib", type=float, default=256.0, help="largest request body accepted"
    )
    serve_parser.add_argument("--log-level", default="warning")
    serve_parser.add_argument(
        "--no-keep-graphs",
        action="store_true",
        help="do not keep a forward's graph for the backward after it (for comparisons)",
    )
    from bios.launch import add_distributed_flags

    add_distributed_flags(serve_parser)  # --nproc-per-node N [--nnodes K --rdzv-endpoint H:P]
    serve_parser.set_defaults(run=serve)

    keys_parser = commands.add_parser("keys", help="create, revoke or list the server's API keys")
    keys_parser.add_argument("action", choices=["create", "revoke", "list"])
    keys_parser.add_argument("key", nargs="?", help="revoke: the key, or its first characters")
    keys_parser.add_argument("--tenant", help="create: the tenant the key acts for")
    keys_parser.add_argument("--home", help="the server's home (default: $BIOS_HOME/server)")
    keys_parser.set_defaults(run=keys)
