"""Rewards for the RL recipe: `reward(completion, example) -> float`.

`completion` is the sampled text (special tokens removed); `example` is the prompt's JSONL record,
so a reward can read any field of it. Built in:

    exact_match   1.0 if the completion equals the record's "answer" (or one of a list of
                  answers) after normalising both — lower case, surrounding whitespace, quotes
                  and final punctuation removed, runs of spaces collapsed — else 0.0

Your own: a Python callable, or on the command line `module:function` or `path/to/file.py:function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RewardFn = Callable[[str, dict[str, Any]], float]
_STRIP = " \t\n\"'`.,;:!?"


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip(_STRIP).lower())


def exact_match(completion: str, example: dict[str, Any]) -> float:
    """1.0 when the normalised completion equals a normalised `example["answer"]`."""
    answers = example["answer"]
    answers = answers if isinstance(answers, list) else [answers]
    got = normalize_answer(completion)
    return float(any(got == normalize_answer(str(a)) for a in answers))


BUILT_IN: dict[str, tuple[RewardFn, tuple[str, ...]]] = {
    # name -> (function, the record fields it needs)
    "exact_match": (exact_match, ("answer",)),
}


def load_reward(reward: str | RewardFn) -> tuple[RewardFn, tuple[str, ...]]:
    """(the reward function, fields every prompt record must have) from a callable, a built-in
    name, `module:function` or `file.py:function`."""
    if callable(reward):
        return reward, ()
    if reward in BUILT_IN:
        return BUILT_IN[reward]
    source, sep, name = reward.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"reward: {reward!r} is not built in ({', '.join(BUILT_IN)}) nor module:function "
            "or file.py:function"
        )
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"reward: no such file {source}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(source)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward: {source} has no function {name!r}")
    return function, ()
