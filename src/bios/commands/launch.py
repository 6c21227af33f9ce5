"""`bios launch`: run a training script on N ranks, and the torchrun command lines behind it.

    bios launch --nproc-per-node 2 train.py --my-flag      # this machine, 2 ranks
    torchrun --standalone --nproc-per-node 2 -m bios.launch train.py --my-flag   # the same

`bios launch` starts `python -m torch.distributed.run` (torchrun) with `-m bios.launch
SCRIPT ARGS`: bios/launch.py is what each rank runs. `bios serve --nproc-per-node N` starts its
ranks with the same flags and command line.

Several machines: run the same command on each with `--nnodes K --node-rank R
--rdzv-endpoint HOST:PORT` (HOST is node 0's address; rank 0 — where the script runs — is on
node 0). Without `--node-rank`, torchrun's c10d rendezvous numbers the nodes itself.
"""

from __future__ import annotations

import argparse
import os
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


def exec_command(command: list[str]) -> int:
    """Become `command` (torchrun), so signals reach it — and through it every rank — directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def add(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser(
        "launch",
        help="run a training script on N ranks (torch.distributed); rank 0 runs the script",
    )
    add_distributed_flags(launch)
    launch.add_argument("script", help="a Python script that uses bios.ServiceClient()")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    launch.set_defaults(run=run)


def run_on_ranks(args: argparse.Namespace, target: list[str], program: str) -> int:
    """Become torchrun starting `target` on the ranks the distributed flags ask for; a bad
    combination of flags is reported as `program: ...` with exit status 2."""
    try:
        command = torchrun_command(
            args.nproc_per_node, args.nnodes, args.rdzv_endpoint, args.node_rank, target
        )
    except ValueError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 2
    return exec_command(command)


def run(args: argparse.Namespace) -> int:
    return run_on_ranks(args, ["-m", "bios.launch", args.script, *args.script_args], "bios launch")
