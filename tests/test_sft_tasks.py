"""The benchmark tasks that calibrate and check the default LR: held-out splits really held out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sft_tasks


def answers(rows: list[dict]) -> list[tuple[str, str]]:
    return [(row["messages"][1]["content"], row["messages"][2]["content"]) for row in rows]


@pytest.mark.parametrize("name", list(sft_tasks.TASKS))
def test_eval_items_never_occur_in_train_and_the_seed_fixes_the_files(name: str) -> None:
    task = sft_tasks.make_task(name, seed=0)
    train, held_out = answers(task.train), answers(task.eval)
    assert not set(held_out) & set(train)
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert sft_tasks.make_task(name, seed=0) == task
    assert sft_tasks.make_task(name, seed=1) != task


def test_the_docs_halves_share_no_module_and_no_function() -> None:
    halves = {}
    for half in "ab":
        task = sft_tasks.make_task(f"docs-{half}")
        assert (len(task.train), len(task.eval)) == (400, 64)
        questions = [q for q, _ in answers(task.train + task.eval)]
        halves[half] = {q.split("Python's ")[1].removesuffix(" module do?") for q in questions}
        assert halves[half] <= set(sft_tasks.DOC_MODULES[{"a": 0, "b": 1}[half] :: 2])
    assert len(halves["a"]) > 20 and len(halves["b"]) > 20
    assert not halves["a"] & halves["b"]


def test_docstring_summary_takes_whole_sentences_of_the_first_paragraph() -> None:
    def documented() -> None:
        """Return the thing.  It is computed
        carefully.

        Details that are not part of the summary."""

    assert sft_tasks.docstring_summary(documented) == "Return the thing. It is computed carefully."
    long_sentence = "Word " * 40 + "end."  # 204 characters: kept whole
    documented.__doc__ = f"{long_sentence} A second sentence that would not fit in the limit."
    assert sft_tasks.docstring_summary(documented) == long_sentence
    documented.__doc__ = "documented(x) -> None\n\nDo it to x."  # a builtin's signature line
    assert sft_tasks.docstring_summary(documented) is None  # under 20 characters
    documented.__doc__ = "documented(x) -> None\n\nApply the operation to x, in place."
    assert sft_tasks.docstring_summary(documented) == "Apply the operation to x, in place."
    documented.__doc__ = None
    assert sft_tasks.docstring_summary(documented) is None
