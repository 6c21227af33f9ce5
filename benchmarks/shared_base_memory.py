"""Memory of LoRA runs on one shared base model (Bios) against one peft model per run (naive).

What is measured: the resident memory of a process as LoRA runs (rank 32, attention + MLP +
lm_head, on the default model SmolLM2-135M-Instruct in float32) are added to it.

  bios           one process, one engine: `ServiceClient().create_lora_training_client(...)` for
                 run 1, 2, 3, 4 (`--runs`), all on the engine's single copy of the base weights.
  naive          one process holding a separate model per run: `from_pretrained` +
                 `peft.get_peft_model` + its own `torch.optim.AdamW`, `--naive-copies` times.
  naive-private  the same, loaded with `disable_mmap=True`, so the weights live in private
                 memory as they do whenever loading converts them (another dtype, GGUF, ...).

How: each approach runs in its own fresh subprocess of this script, so none sees another's
memory. After adding a run the process takes one tiny training step on it (one sequence of 32
tokens: forward_backward + optim_step), so the run holds its AdamW state and every base weight
has been read, then reads /proc/self/status:

  VmRSS    resident memory, as `top` shows it; pages of a file mapped twice count twice.
  RssAnon  private (anonymous) memory: what the process itself allocated.
  RssFile  resident pages of mapped files. transformers 5 memory-maps float32 safetensors, so
           the base weights are file pages; two models loaded from one file share those pages
           in the page cache (physically one copy) but VmRSS counts them once per model.

The increase per extra run (mean over runs 2..N) is compared with the base model's parameter
bytes and with one adapter's bytes plus its AdamW state (two moments per weight, as counted in
the live optimizer after one step). Left out on purpose: the HTTP server, bf16 and full
fine-tuning runs, which own a full copy of the weights by design.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

APPROACHES = ("bios", "naive", "naive-private")
RANK, ALPHA, TINY_LEN, MIB = 32, 32, 32, 1024 * 1024
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES.append("lm_head")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="Bios runs on the shared base")
    parser.add_argument("--naive-copies", type=int, default=2, help="separate peft models")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--approach", choices=APPROACHES, help=argparse.SUPPRESS)  # child only
    return parser.parse_args()


# ---- measurement helpers (used inside each approach's process) --------------------------------


def memory_mib() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process, in MiB."""
    wanted = ("VmRSS", "RssAnon", "RssFile")
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in wanted:
            values[key] = int(line.split()[1]) / 1024
    return values


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the AdamW moments (and step counters) held by `optimizer`."""
    states = optimizer.state.values()
    return tensor_bytes(v for state in states for v in state.values() if torch.is_tensor(v))


def tiny_tokens() -> list[int]:
    """TINY_LEN + 1 fixed token ids: inputs are [:-1], targets [1:]."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (TINY_LEN + 1,), generator=generator).tolist()


# ---- the approaches ---------------------------------------------------------------------------
# Each returns one row per run: memory after adding the run, plus the sizes of its parts.


def measure_bios(runs: int) -> dict:
    import bios
    from bios.client.local import local_engine
    from bios.models.loading import DEFAULT_MODEL
    from bios.types import AdamParams, Datum, ModelInput

    tokens = tiny_tokens()
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * TINY_LEN},
    )
    service, rows, sizes = bios.ServiceClient(), [memory_mib()], {}
    for index in range(runs):
        training = service.create_lora_training_client(DEFAULT_MODEL, rank=RANK, seed=index)
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(AdamParams(learning_rate=1e-4)).result()
        rows.append(memory_mib())
        # The engine's live objects, read only to count bytes.
        run = local_engine().run(training.model_id)
        sizes = {
            "adapter_bytes": tensor_bytes(run.parameters.values()),
            "optimizer_bytes": optimizer_bytes(run.optimizer),
        }
    base = local_engine().worker(DEFAULT_MODEL).loaded.model
    return {"rows": rows, "base_bytes": tensor_bytes(base.parameters()), **sizes}


def measure_naive(copies: int, private: bool) -> dict:
    import peft
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from bios.models.loading import DEFAULT_MODEL, resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    tokens = torch.tensor([tiny_tokens()])
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    models, rows, sizes = [], [memory_mib()], {}
    for _ in range(copies):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, disable_mmap=private)
        base_bytes = tensor_bytes(base.parameters())
        model = peft.get_peft_model(base, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[0, 1:], reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
        models.append((model, optimizer))
        rows.append(memory_mib())
        sizes = {
            "base_bytes": base_bytes,
            "adapter_bytes": tensor_bytes(trainable),
            "optimizer_bytes": optimizer_bytes(optimizer),
        }
    return {"rows": rows, **sizes}


def measure(approach: str, args: argparse.Namespace) -> dict:
    """Child process: measure one approach."""
    warnings.filterwarnings("ignore")  # peft's tied-lm_head note; nothing here depends on it
    torch.manual_seed(0)
    if approach == "bios":
        return measure_bios(args.runs)
    return measure_naive(args.naive_copies, private=approach == "naive-private")


# ---- the coordinating process -----------------------------------------------------------------


def run_in_subprocess(approach: str, args: argparse.Namespace) -> dict:
    """Run this script for one approach in a fresh process; its last stdout line is the result."""
    command = [sys.executable, __file__, "--approach", approach, "--runs", str(args.runs)]
    command += ["--naive-copies", str(args.naive_copies)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{approach} failed with exit code {done.returncode}")
    return json.loads(done.stdout.splitlines()[-1])


def summarise(result: dict) -> dict:
    """Increase per extra run (mean over runs 2..N) and its ratios to the base and adapter."""
    rows = result["rows"]
    extra = len(rows) - 2  # rows[0] is before any model, rows[1] after the first run
    per_run = {
        key: (rows[-1][key] - rows[1][key]) / extra if extra > 0 else float("nan")
        for key in ("VmRSS", "RssAnon", "RssFile")
    }
    base_mib = result["base_bytes"] / MIB
    run_state_mib = (result["adapter_bytes"] + result["optimizer_bytes"]) / MIB
    return {
        **result,
        "per_extra_run_mib": per_run,
        "base_mib": base_mib,
        "run_state_mib": run_state_mib,
        "ratio_to_base": {key: value / base_mib for key, value in per_run.items()},
        "ratio_to_run_state": {key: value / run_state_mib for key, value in per_run.items()},
    }


def print_report(summaries: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    for approach, summary in summaries.items():
        table = Table(title=f"{approach}: resident memory as runs are added (MiB)")
        for column in ("runs", "VmRSS", "ΔVmRSS", "RssAnon", "ΔRssAnon", "RssFile"):
            table.add_column(column, justify="right")
        rows = summary["rows"]
        for count, row in enumerate(rows):
            previous = rows[count - 1] if count > 0 else row
            table.add_row(
                str(count) + (" (before loading)" if count == 0 else ""),
                f"{row['VmRSS']:.0f}",
                f"{row['VmRSS'] - previous['VmRSS']:+.0f}" if count > 0 else "",
                f"{row['RssAnon']:.0f}",
                f"{row['RssAnon'] - previous['RssAnon']:+.0f}" if count > 0 else "",
                f"{row['RssFile']:.0f}",
            )
        console.print(table)
    console.print(summary_table(summaries))
    console.print(
        "ΔVmRSS counts a file mapped twice twice. The naive copies map one safetensors file, so\n"
        "their base weights are one set of shared page-cache pages and ΔRssAnon is their physical\n"
        "cost per run; naive-private shows the cost when the weights are private memory."
    )


def summary_table(summaries: dict[str, dict]):
    from rich.table import Table

    table = Table(title="Per extra run (mean over runs 2..N), against the base model's weights")
    columns = ["approach", "base", "adapter+AdamW", "ΔVmRSS", "ΔRssAnon", "ΔVmRSS/base"]
    columns += ["ΔRssAnon/base", "ΔRssAnon/(adapter+AdamW)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "approach" else "right")
    for approach, s in summaries.items():
        per_run, ratio = s["per_extra_run_mib"], s["ratio_to_base"]
        table.add_row(
            approach,
            f"{s['base_mib']:.0f} MiB",
            f"{s['adapter_bytes'] / MIB:.0f} + {s['optimizer_bytes'] / MIB:.0f} MiB",
            f"{per_run['VmRSS']:.0f} MiB",
            f"{per_run['RssAnon']:.0f} MiB",
            f"{ratio['VmRSS']:.2f}",
            f"{ratio['RssAnon']:.2f}",
            f"{s['ratio_to_run_state']['RssAnon']:.2f}",
        )
    return table


def main() -> None:
    args = parse_args()
    if args.approach is not None:  # a child process: measure, print the result as one line
        print(json.dumps(measure(args.approach, args)))
        return
    from bios.models.loading import DEFAULT_MODEL, resolve_model_path

    resolve_model_path(DEFAULT_MODEL)  # convert the default model once, outside the children
    summaries = {a: summarise(run_in_subprocess(a, args)) for a in APPROACHES}
    print_report(summaries)
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
