"""One tinker-cookbook 0.6.1 entry point, run unpatched against `bios serve`, printing what it
learned as a `RESULTS {json}` line for tests/test_cookbook.py to check.

    python cookbook_scenario.py SCENARIO --model PATH --workdir DIR [--student PATH] [--sft-log DIR]

Scenarios: sft, rl_sync, rl_async, dpo, distill, checkpoints. The server and the key come from
the environment the SDK reads itself (`TINKER_BASE_URL`, `TINKER_API_KEY`), so the cookbook's
`ServiceClient()` calls find it as a user's would. Every run is small (a few steps, tiny batches,
short generations) so the tiny model shows its learning signal within seconds.

The tiny models are unknown to the cookbook's `model_info`, so every config names the generic
`role_colon` renderer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.rl.types import (
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

RENDERER = "role_colon"
COOKBOOK = Path(renderers.__file__).resolve().parents[1]
CONVERSATIONS = COOKBOOK / "example_data" / "conversations.jsonl"


# ----------------------------------------------------------------------------- shared readers


def metric_series(log_path: Path, key: str) -> list[float]:
    """The values of `key` in the cookbook's metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    rows = sorted((row for row in rows if key in row), key=lambda row: row.get("step", 0))
    return [float(row[key]) for row in rows]


def checkpoint_records(log_path: Path) -> list[dict]:
    path = log_path / "checkpoints.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def session_status(recipe_name: str) -> list[dict | None]:
    """The status Bios recorded for each session whose `user_metadata` names `recipe_name`
    (the cookbook tags its `ServiceClient` with it), read back through the SDK's own search."""
    request = tinker.types.SessionSearchRequest(user_metadata={"recipe_name": recipe_name})
    page = tinker.RestClient().search_sessions(request).result()
    return [s.status.model_dump(mode="json") if s.status else None for s in page.sessions]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- an RL task

# The reward: the fraction of sampled tokens whose id is even. A random tiny model starts near
# one half and a policy-gradient step can raise it through a single direction of the last hidden
# state, so a few steps suffice to show the reward rising.


class EvenTokenEnv(Env):
    def __init__(self, renderer: renderers.Renderer) -> None:
        self.renderer = renderer

    async def initial_observation(self):
        prompt = self.renderer.build_generation_prompt([{"role": "user", "content": "Say it."}])
        return prompt, self.renderer.get_stop_sequences()

    async def step(self, action, *, extra=None) -> StepResult:
        reward = sum(1 for token in action if token % 2 == 0) / max(len(action), 1)
        return StepResult(
            reward=reward,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.renderer.get_stop_sequences(),
        )


class EvenTokenGroup(EnvGroupBuilder):
    def __init__(self, model: str, group_size: int) -> None:
        self.model = model
        self.group_size = group_size

    async def make_envs(self) -> Sequence[Env]:
        renderer = renderers.get_renderer(RENDERER, get_tokenizer(self.model))
        return [EvenTokenEnv(renderer) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return ["even"]


class EvenTokenDataset(RLDataset):
    def __init__(self, model: str, batches: int, groups: int, group_size: int) -> None:
        self.model, self.batches, self.groups, self.group_size = model, batches, groups, group_size

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        return [EvenTokenGroup(self.model, self.group_size) for _ in range(self.groups)]

    def __len__(self) -> int:
        return self.batches


@chz.chz
class EvenTokenDatasetBuilder(RLDatasetBuilder):
    model: str
    batches: int
    groups: int
    group_size: int

    async def __call__(self) -> tuple[RLDataset, None]:
        return EvenTokenDataset(self.model, self.batches, self.groups, self.group_size), None


# ----------------------------------------------------------------------------- scenarios


def run_sft(args) -> dict:
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    log_path = args.workdir / "sft"
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=args.model,
        renderer_name=RENDERER,
        max_length=96,
        batch_size=8,
    )
    config = train.Config(
        log_path=str(log_path),
        model_name=args.model,
        recipe_name="bios_test_sft",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(
            common_config=common, file_path=str(CONVERSATIONS), test_size=8
        ),
        learning_rate=1e-2,
        lr_schedule="constant",
        lora_rank=8,
        max_steps=6,
        save_every=3,
        eval_every=3,
    )
    asyncio.run(train.main(config))
    return {
        "train_nll": metric_series(log_path, "train_mean_nll"),
        "test_nll": metric_series(log_path, "test/nll"),
        "checkpoints": checkpoint_records(log_path),
        "files": files_under(log_path),
        "log_path": str(log_path),
        "sessions": session_status("bios_test_sft"),
    }


def run_rl(args, mode: str) -> dict:
    from tinker_cookbook.rl import train

    recipe = f"bios_test_rl_{mode}"
    log_path = args.workdir / recipe
    extra = {}
    if mode == "async":
        # Its default loss, stable_reinforce: AsyncConfig.loss_fn is left alone.
        extra["async_config"] = train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=4)
    else:
        extra["loss_fn"] = "importance_sampling"
    # Async trains on samples one step stale: a smaller step keeps them near the policy (at
    # 2e-2 their KL to it reached 1-3 nats and capped ratios made the reward rise erratic).
    steps = 16 if mode == "async" else 8
    # Sync's 8 steps take 8 groups of 4 a batch: with 4 groups (16 samples) the reward gained
    # over the run ranged 0.27-0.50 over six runs alone and fell to 0.14 once in a full test run
    # (the policy gradient of 16 samples is noisy); with 8, 0.44-0.52 over six runs.
    groups = 4 if mode == "async" else 8
    config = train.Config(
        learning_rate=1e-2 if mode == "async" else 2e-2,
        dataset_builder=EvenTokenDatasetBuilder(
            model=args.model, batches=steps, groups=groups, group_size=4
        ),
        model_name=args.model,
        recipe_name=recipe,
        max_tokens=8,
        log_path=str(log_path),
        eval_every=0,
        save_every=0,
        renderer_name=RENDERER,
        lora_rank=8,
        num_groups_to_log=0,
        max_steps=steps,
        **extra,
    )
    asyncio.run(train.main(config))
    return {
        "reward": metric_series(log_path, "env/all/reward/total"),
        "kl_sample_train": metric_series(log_path, "optim/kl_sample_train_v1"),
        # The loss the run trained with, as the cookbook recorded its config.
        "loss_fn": config.training_loss_fn(),
        "checkpoints": checkpoint_records(log_path),
        "files": files_under(log_path),
        "sessions": session_status(recipe),
    }


def write_comparisons(path: Path) -> None:
    """Preference pairs where the chosen answer is a repeated letter and the rejected one a
    different repeated letter, in `ComparisonBuilderFromJsonl`'s row format."""
    rows = []
    for index, (good, bad) in enumerate(zip("abcdefgh", "stuvwxyz", strict=True)):
        prompt = [{"role": "user", "content": f"Answer number {index}."}]
        rows.append(
            {
                "comparison": {
                    "prompt_conversation": prompt,
                    "completion_A": [{"role": "assistant", "content": f"{good} " * 6}],
                    "completion_B": [{"role": "assistant", "content": f"{bad} " * 6}],
                },
                "label": "A",
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_dpo(args) -> dict:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    log_path = args.workdir / "dpo"
    log_path.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "comparisons.jsonl"
    write_comparisons(data)
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=args.model, renderer_name=RENDERER, max_length=64, batch_size=8
    )
    config = train_dpo.Config(
        log_path=str(log_path),
        model_name=args.model,
        recipe_name="bios_test_dpo",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=common,
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(data)),
        ),
        learning_rate=3e-3,
        lr_schedule="constant",
        num_epochs=3,
        dpo_beta=0.5,
        lora_rank=8,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
    train_dpo.main(config)
    return {
        "dpo_loss": metric_series(log_path, "dpo_loss"),
        "accuracy": metric_series(log_path, "accuracy"),
        "checkpoints": checkpoint_records(log_path),
        "files": files_under(log_path),
    }


@chz.chz
class PromptsBuilder(RLDatasetBuilder):
    """Prompt-only distillation data from a fixed local list (the cookbook's own builder
    downloads DeepMath or Tulu3)."""

    model: str
    prompts: list[str]
    batch_size: int
    group_size: int

    async def __call__(self):
        from tinker_cookbook.distillation.datasets import PromptOnlyDataset

        tokenizer = get_tokenizer(self.model)
        dataset = PromptOnlyDataset(
            prompts=self.prompts,
            batch_size=self.batch_size,
            group_size=self.group_size,
            renderer=renderers.get_renderer(RENDERER, tokenizer),
            tokenizer=tokenizer,
        )
        return dataset, None


def run_distill(args) -> dict:
    """On-policy distillation of the base model (the teacher) into a student that starts from the
    SFT run's checkpoint: the fine-tuned student is sharper than the teacher, so the reverse KL
    the cookbook logs starts high and a few steps bring it down. (A random tiny teacher is as
    hard to match in six steps as any random distribution.)"""
    from tinker_cookbook.distillation import train_on_policy
    from tinker_cookbook.distillation.datasets import DistillationDatasetConfig, TeacherConfig

    log_path = args.workdir / "distill"
    builder = PromptsBuilder(
        model=args.model, prompts=["Tell me a story."] * 8, batch_size=2, group_size=8
    )
    config = train_on_policy.Config(
        learning_rate=1e-2,
        dataset_configs=[
            DistillationDatasetConfig(
                dataset_builder=builder,
                teacher_config=TeacherConfig(base_model=args.model),
                groups_per_batch=2,
            )
        ],
        model_name=args.model,
        recipe_name="bios_test_distill",
        renderer_name=RENDERER,
        max_tokens=8,
        lora_rank=8,
        log_path=str(log_path),
        eval_every=0,
        save_every=0,
        load_checkpoint_path=args.student,
    )
    asyncio.run(train_on_policy.main(config))
    return {
        "teacher_kl": metric_series(log_path, "teacher_kl"),
        "checkpoints": checkpoint_records(log_path),
        "files": files_under(log_path),
    }


def run_checkpoints(args) -> dict:
    """RestClient list/get/TTL/delete on the checkpoints an SFT run left, then downloads through
    the SDK's own paths: the cookbook's `weights.download` and `tinker checkpoint download`."""
    from tinker_cookbook import weights

    records = checkpoint_records(args.sft_log)
    periodic, final = records[0], records[-1]
    run_id = tinker.ParsedCheckpointTinkerPath.from_tinker_path(final["state_path"]).training_run_id
    rest = tinker.RestClient()

    def listing() -> dict[str, dict]:
        listed = rest.list_checkpoints(run_id).result().checkpoints
        return {
            c.tinker_path: {
                "time": c.time.isoformat(),
                "expires_at": c.expires_at.isoformat() if c.expires_at else None,
            }
            for c in listed
        }

    results: dict = {"periodic": periodic, "final": final}
    results["run_user_metadata"] = rest.get_training_run(run_id).result().user_metadata
    results["listed"] = listing()
    results["ttl_set_at"] = datetime.now(UTC).isoformat()
    rest.set_checkpoint_ttl_from_tinker_path(periodic["state_path"], 3600).result()
    results["after_ttl"] = listing()

    out = args.workdir / "download"
    weights.download(tinker_path=final["state_path"], output_dir=str(out / "cookbook"))
    results["cookbook_files"] = files_under(out / "cookbook")
    # The SDK's console script, beside this interpreter in the venv.
    tinker_cli = Path(sys.executable).parent / "tinker"
    cli = subprocess.run(
        [
            str(tinker_cli),
            "checkpoint",
            "download",
            final["state_path"],
            "--output",
            str(out / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    results["cli"] = {"rc": cli.returncode, "tail": (cli.stdout + cli.stderr)[-2000:]}
    results["cli_files"] = files_under(out / "cli") if (out / "cli").exists() else []

    # Each download exported the checkpoint from a run of its own, then deleted the export.
    runs = rest.list_training_runs(limit=100).result().training_runs
    results["export_runs"] = {
        (run.user_metadata or {}).get("created_by"): [
            c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints
        ]
        for run in runs
        if "created_by" in (run.user_metadata or {})
    }

    rest.delete_checkpoint_from_tinker_path(periodic["sampler_path"]).result()
    results["after_delete"] = listing()
    return results


SCENARIOS = {
    "sft": run_sft,
    "rl_sync": lambda args: run_rl(args, "sync"),
    "rl_async": lambda args: run_rl(args, "async"),
    "dpo": run_dpo,
    "distill": run_distill,
    "checkpoints": run_checkpoints,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--student", help="the student's starting checkpoint (tinker://...)")
    parser.add_argument("--sft-log", type=Path)
    args = parser.parse_args()
    assert os.environ.get("TINKER_BASE_URL"), "set TINKER_BASE_URL to the bios serve URL"
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = SCENARIOS[args.scenario](args)
    print("RESULTS " + json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main()
