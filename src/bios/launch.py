"""`bios launch`: run a training script on N ranks, and the entry point each rank starts in.

    bios launch --nproc-per-node 2 train.py --my-flag      # this machine, 2 ranks
    torchrun --standalone --nproc-per-node 2 -m bios.launch train.py --my-flag   # the same

`bios launch` starts `python -m torch.distributed.run` (torchrun) with `-m bios.launch
SCRIPT ARGS`. In each rank, `python -m bios.launch` then runs the script on rank 0 only — its
`ServiceClient()` gets a DistributedEngine that spreads every request over the ranks — while the
other ranks run rank 0's commands until the script ends. The script is the same one you run in
one process; nothing in it changes.

Several machines: run the same command on each with `--nnodes K --node-rank R
--rdzv-endpoint HOST:PORT` (HOST is node 0's address; rank 0 — where the script runs — is on
node 0). Without `--node-rank`, torchrun's c10d rendezvous numbers the nodes itself.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


def torchrun_command(
    nproc_per_node: int,
    nnodes: int,
    rdzv_endpoint: str | None,
    node_rank: int | None,
    target: list[str],
) -> list[str]:
    """The torchrun command line that starts `target` (`-m module args` or a script) on every
    rank."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += ["--nproc-per-node", str(nproc_per_node)]
    if nnodes <= 1 and rdzv_endpoint is None:
        command.append("--standalone")  # a private rendezvous on a free local port
    else:
        if rdzv_endpoint is None:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address)")
        command += ["--nnodes", str(nnodes)]
        if node_rank is not None:
            host, _, port = rdzv_endpoint.rpartition(":")
            command += ["--node-rank", str(node_rank), "--master-addr", host]
            command += ["--master-port", port or "29500"]
        else:
            command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    return command + target


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node", type=int, default=1, help="ranks on this machine (torchrun)"
    )
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the job")
    parser.add_argument("--node-rank", type=int, help="this machine's number, 0 for rank 0's")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT where the machines meet (node 0)")


DISTRIBUTED_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint")


def strip_distributed_flags(argv: list[str]) -> list[str]:
    """`argv` without the flags above (and their values), for the command each rank runs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in DISTRIBUTED_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in DISTRIBUTED_FLAGS)):
            kept.append(arg)
    return kept


def wants_launch(args: argparse.Namespace) -> bool:
    return (args.nproc_per_node > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ


def _cmd_launch(args: argparse.Namespace) -> int:
    target = ["-m", "bios.launch", args.script, *args.script_args]
    try:
        command = torchrun_command(
            args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.node_rank, target
        )
    except ValueError as error:
        print(f"bios launch: {error}", file=sys.stderr)
        return 2
    return exec_command(command)


def exec_command(command: list[str]) -> int:
    """Become `command` (torchrun), so signals reach it — and through it every rank — directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def add_commands(commands) -> None:
    launch = commands.add_parser(
        "launch",
        help="run a training script on N ranks (torch.distributed); rank 0 runs the script",
    )
    add_distributed_flags(launch)
    launch.add_argument("script", help="a Python script that uses bios.ServiceClient()")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    launch.set_defaults(run=_cmd_launch)


def run_script(argv: list[str]) -> int:
    """In each rank: rank 0 runs the script, the others follow rank 0's commands."""
    if not argv:
        print("usage: python -m bios.launch SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script, *script_args = argv
    from bios.distributed import env_world_size

    if env_world_size() > 1:
        from bios.distributed import Group, follow, leader_engine
        from bios.engine.engine import Engine

        group = Group()
        if not group.is_leader:
            return follow(group)
        engine = leader_engine(group)
        Engine._default = engine  # what ServiceClient() uses in the script
        try:
            _run(script, script_args)
        finally:
            engine.shutdown()
        return 0
    _run(script, script_args)
    return 0


def _run(script: str, script_args: list[str]) -> None:
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    sys.exit(run_script(sys.argv[1:]))
