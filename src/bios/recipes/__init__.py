"""Recipes: plain training loops over the client API, one module each.

    sft      supervised fine-tuning on chat or prompt/completion data
    rl       reinforcement learning with a reward, group-relative advantages
    dpo      preference learning on (prompt, chosen, rejected) pairs
    distill  on-policy distillation from a teacher (reverse-KL advantages)

Each has a config dataclass and `run(config, service=None) -> Path` (the run folder), and a
`bios` subcommand with the same options.
"""
