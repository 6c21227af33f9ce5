"""`bios sample MODEL_OR_PATH "prompt"`: completions from a model or a checkpoint."""

from __future__ import annotations

import argparse
import os


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample",
        help="complete a prompt with a model, a checkpoint or a run's result checkpoint",
        description="Complete a prompt (rendered with the chat template unless --raw).",
    )
    parser.add_argument(
        "model",
        metavar="MODEL_OR_PATH",
        help="a model, a bios:// checkpoint path, or a run folder (its result: the lowest-eval "
        "checkpoint marked in checkpoints.jsonl)",
    )
    parser.add_argument("prompt", help="the user's message (or raw text with --raw)")
    parser.add_argument("--max-tokens", type=int, default=128, help="most new tokens [128]")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy [0]")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="completions [1]")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import bios
    from bios.data.chat import prompt_tokens
    from bios.recipes.run_folder import RunFolder, checkpoint_path
    from bios.types import ModelInput, SamplingParams

    service = bios.ServiceClient()
    source = os.fspath(args.model)
    if source.startswith(("bios://", "tinker://")) or RunFolder(source).saved_config():
        sampler = service.create_sampling_client(model_path=checkpoint_path(source))
    else:
        sampler = service.create_sampling_client(base_model=source)
    tokenizer = sampler.get_tokenizer()
    tokens = tokenizer.encode(args.prompt) if args.raw else prompt_tokens(tokenizer, args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    result = sampler.sample(ModelInput.from_ints(tokens), args.num_samples, params).result()
    for index, sequence in enumerate(result.sequences):
        if args.num_samples > 1:
            print(f"--- {index + 1} ({sequence.stop_reason})")
        print(tokenizer.decode(sequence.tokens, skip_special_tokens=True).strip())
    return 0
