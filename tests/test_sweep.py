"""`bios sweep`: each variation is exactly the SFT run `bios sft` would make with that setting,
checked against independently configured `sft.run` calls; the files read back to the same
numbers; bad input is refused before any run starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bios.cli import main
from bios.distributed import process
from bios.engine.engine import Engine
from bios.recipes import sft
from bios.recipes.run_folder import RunFolder
from bios.recipes.sweep import SweepConfig, run_sweep, sweep_values
from bios.recipes.sweep_report import read_csv

QA = [
    ("capital of France?", "Paris"),
    ("capital of Italy?", "Rome"),
    ("two plus two?", "four"),
    ("hello there", "how are you today?"),
    ("capital of Spain?", "Madrid"),
    ("three plus one?", "four"),
    ("what is blue?", "a colour"),
    ("good morning", "good morning to you"),
]
EVAL_QA = [("capital of Portugal?", "Lisbon"), ("two plus three?", "five")]
STEPS = 6


def write_chat(path: Path, pairs: list[tuple[str, str]]) -> str:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    return write_chat(tmp_path / "train.jsonl", QA), write_chat(tmp_path / "eval.jsonl", EVAL_QA)


def base_config(llama: str, files: tuple[str, str], tmp_path: Path, **settings) -> sft.SFTConfig:
    data, eval_data = files
    values = dict(
        model=llama,
        data=data,
        eval_data=eval_data,
        steps=STEPS,
        save_every=0,
        runs_dir=str(tmp_path / "runs"),
        progress=False,
    )
    return sft.SFTConfig(**(values | settings))


def final_eval_loss(folder: Path) -> float:
    return [r["eval_loss"] for r in RunFolder(folder).metrics() if "eval_loss" in r][-1]


# The LR `bios sft` picks for the tiny Llama, computed here from the published formula rather
# than with bios.hparams: hidden size 128, Llama exponent, LoRA, 8 examples → batch 8.
def tiny_llama_lr(batch: int) -> float:
    return 5e-5 * 10 * (2000 / 128) ** 0.781 * math.sqrt(batch / 128)


def test_lr_sweep_rows_equal_independent_sft_runs(llama, service, files, tmp_path):
    config = base_config(llama, files, tmp_path, rank=4)
    result = run_sweep(SweepConfig(config, "lr", out=str(tmp_path / "sweep")), service)

    chosen = tiny_llama_lr(8)
    assert result.default_value == pytest.approx(chosen, rel=1e-12)
    assert [row.multiplier for row in result.rows] == [0.25, 0.5, 1.0, 2.0, 4.0]
    for row in result.rows:
        lr = row.multiplier * chosen
        assert row.learning_rate == pytest.approx(lr, rel=1e-12)
        assert (row.batch_size, row.steps, row.rank) == (8, STEPS, 4)
        alone = sft.run(
            base_config(llama, files, tmp_path, rank=4, batch_size=8, learning_rate=lr), service
        )
        assert row.final_eval_loss == pytest.approx(final_eval_loss(alone), rel=1e-6)
    losses = [row.final_eval_loss for row in result.rows]
    assert len(set(losses)) == 5  # the LR made a difference
    assert result.best.final_eval_loss == min(losses)
    assert [row.default for row in result.rows] == [False, False, True, False, False]

    # The files: the CSV reads back to the same numbers, the table shows them, the PNG is one.
    parsed = read_csv(result.out / "sweep.csv")
    assert [r["final_eval_loss"] for r in parsed] == losses
    assert [r["learning_rate"] for r in parsed] == [row.learning_rate for row in result.rows]
    assert [r["ratio_to_best"] for r in parsed] == [x / min(losses) for x in losses]
    assert [r["best"] for r in parsed] == [x == min(losses) for x in losses]
    table = (result.out / "sweep.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and "**" not in line[:3]]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body[1:]]
    assert [float(c[7]) for c in cells] == pytest.approx(losses, abs=5e-6)
    assert [float(c[8]) for c in cells] == pytest.approx([x / min(losses) for x in losses], 1e-4)
    # The kept checkpoint of each run: its lowest eval loss and that eval's step.
    lowest = [min((v, s) for s, v in row.eval_curve if s > 0) for row in result.rows]
    assert [(row.result_eval_loss, row.result_step) for row in result.rows] == lowest
    assert [r["result_eval_loss"] for r in parsed] == [v for v, _ in lowest]
    assert [c[9] for c in cells] == [f"{v:.5f} ({s})" for v, s in lowest]
    marked = [c[10] for c in cells]
    assert marked[losses.index(min(losses))].count("**best**") == 1
    assert "**default**" in marked[2]
    png = (result.out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(result.out / "sweep.png").shape[0] >= 300


def test_batch_sweep_scales_the_lr_like_recommend(llama, service, files, tmp_path):
    config = base_config(llama, files, tmp_path, rank=4)
    result = run_sweep(SweepConfig(config, "batch", out=str(tmp_path / "sweep")), service)
    assert [row.batch_size for row in result.rows] == [4, 8, 16]
    assert any("√(B/128)" in note for note in result.notes)
    for row in result.rows:
        lr = tiny_llama_lr(row.batch_size)
        assert row.learning_rate == pytest.approx(lr, rel=1e-12)
        alone = sft.run(
            base_config(
                llama, files, tmp_path, rank=4, batch_size=row.batch_size, learning_rate=lr
            ),
            service,
        )
        assert row.final_eval_loss == pytest.approx(final_eval_loss(alone), rel=1e-6)


def test_rank_sweep_from_the_command_line_shares_one_service(
    llama, files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BIOS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(process, "_engine", Engine(home=tmp_path / "home"))
    services = []
    real_run = sft.run

    def recording_run(config, service=None):
        services.append(service)
        return real_run(config, service)

    monkeypatch.setattr(sft, "run", recording_run)
    data, eval_data = files
    out = tmp_path / "ranks"
    argv = ["sweep", "rank", "--model", llama, "--data", data, "--eval", eval_data]
    argv += ["--values", "2,8", "4", "--steps", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert len(services) == 3 and services[0] is not None
    assert all(s is services[0] for s in services)  # one client: the base model loaded once
    rows = read_csv(out / "sweep.csv")
    assert [r["rank"] for r in rows] == [2, 4, 8]
    for row in rows:
        saved = RunFolder(row["run"]).saved_config()
        assert saved["rank"] == row["rank"] and saved["steps"] == 3
        assert row["final_eval_loss"] == final_eval_loss(Path(row["run"]))
    text = capsys.readouterr().out
    assert "sweep of rank" in text and "best rank:" in text


def test_sweep_values_round_integer_settings_and_drop_repeats():
    def values(setting, default, **given):
        return sweep_values(SweepConfig(sft.SFTConfig(), setting, **given), default)

    assert values("batch", 5.0) == [(3.0, 0.6), (5.0, 1.0), (10.0, 2.0)]
    assert values("batch", 1.0) == [(1.0, 1.0), (2.0, 2.0)]  # ×½ of 1 rounds to 1
    assert values("rank", 8.0) == [(8.0, 1.0), (16.0, 2.0), (32.0, 4.0), (64.0, 8.0), (128, 16)]
    assert values("rank", 32.0, multipliers=[0.5, 0.5, 3]) == [(16.0, 0.5), (96.0, 3.0)]
    lr = values("lr", 1e-3, values=[4e-3, 1e-3, 2e-3])
    assert lr == [(1e-3, 1.0), (2e-3, 2.0), (4e-3, 4.0)]
    assert values("lr", 1e-3)[0] == (0.25e-3, 0.25)


@pytest.mark.parametrize(
    ("setting", "settings", "expected"),
    [
        ("momentum", {}, "setting: expected one of lr, rank, batch, got 'momentum'"),
        ("lr", {"values": [1e-3, -1e-3]}, "values: expected positive numbers, got -0.001"),
        ("lr", {"multipliers": [0.0]}, "multipliers: expected positive numbers, got 0"),
        ("rank", {"values": [8, 4.5]}, "values: rank must be a positive integer, got 4.5"),
        ("batch", {"values": []}, "values: expected at least one number, got an empty list"),
        ("lr", {"values": [1e-3], "multipliers": [2.0]}, "values, multipliers: give one"),
        ("lr", {"values": [math.inf]}, "values: expected positive numbers, got inf"),
        ("lr", {"eval_data": None}, "eval_data: a sweep compares final eval loss"),
        ("lr", {"steps": 0}, "lr=0.000267438: "),  # the first value: ×¼ the chosen 1.07e-3
    ],
)
def test_bad_input_is_refused_before_any_run(
    setting, settings, expected, llama, service, files, tmp_path
):
    sweep_keys = {k: settings.pop(k) for k in ("values", "multipliers") if k in settings}
    config = SweepConfig(
        base_config(llama, files, tmp_path, rank=4, **settings),
        setting,
        out=str(tmp_path / "sweep"),
        **sweep_keys,
    )
    with pytest.raises(ValueError) as error:
        run_sweep(config, service)
    assert str(error.value).startswith(expected)
    if "steps" in settings:
        assert "steps: expected at least 1, got 0" in str(error.value)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()


def test_bad_command_line_input_exits_2_naming_the_field(llama, files, tmp_path, capsys):
    data, eval_data = files
    out = tmp_path / "sweep"
    common = ["--model", llama, "--data", data, "--eval", eval_data, "--out", str(out)]
    assert main(["sweep", "lr", *common, "--values", "1e-3,abc"]) == 2
    assert "values: expected numbers, got 'abc'" in capsys.readouterr().err
    assert main(["sweep", "depth", *common]) == 2
    assert "setting: expected one of lr, rank, batch" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: bios sweep")
    for option in ("--values", "--multipliers", "--out", "--data", "--eval", "--learning-rate"):
        assert option in text
    assert "--resume" not in text
