"""The `bios` recipe commands: --help, options from YAML with flags winning, and the life of a
run through `bios sft`, `runs`, `plot`, `sample` and `export`."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bios.cli import main
from bios.data.chat import prompt_tokens
from bios.distributed import process
from bios.engine.engine import Engine
from bios.recipes.run_folder import RunFolder, checkpoint_folder_of

COMMANDS = ["sft", "rl", "dpo", "distill", "sample", "runs", "export", "plot"]
CONVERSATIONS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [("capital of France?", "Paris"), ("two plus two?", "four")]
]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private Bios home for `ServiceClient()` (the process-wide engine), run from tmp_path."""
    folder = tmp_path / "home"
    monkeypatch.setenv("BIOS_HOME", str(folder))
    monkeypatch.setattr(process, "_engine", Engine(home=folder))
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_complete_and_short(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: bios {command}")
    assert len(text.splitlines()) < 80
    if command in ("sft", "rl", "dpo", "distill"):
        for option in ("--model", "--data", "--eval", "--config", "--learning-rate", "--resume"):
            assert option in text


def test_a_run_from_yaml_then_runs_plot_sample_export(home, llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    config = tmp_path / "sft.yaml"
    # YAML 1.1 reads 1e-2 as a string: it is converted like a command-line value.
    config.write_text(
        f"model: {llama}\ndata: {data}\nlearning-rate: 1e-2\nsteps: 9\nbatch_size: 2\n"
        "rank: 4\nsave_every: 2\nname: cli\nprogress: false\n"
    )
    assert main(["sft", "--config", str(config), "--steps", "4"]) == 0  # the flag wins
    run = tmp_path / "runs" / "cli"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["steps"], saved["learning_rate"], saved["rank"]) == (4, 0.01, 4)
    checkpoints = RunFolder(run).checkpoints()
    assert [c["step"] for c in checkpoints] == [2, 4]
    capsys.readouterr()

    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    assert str(run.resolve()) in listing or "runs/cli" in listing
    assert "step 4/4" in listing
    for checkpoint in checkpoints:
        assert checkpoint["path"] in listing
        assert str(checkpoint_folder_of(checkpoint["path"], home)) in listing

    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    capsys.readouterr()
    assert main(["sample", str(run), "capital of France?", "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(llama)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama), checkpoint_folder_of(run, home)
    ).eval()
    prompt = prompt_tokens(tokenizer, "capital of France?")
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :]
    assert printed == tokenizer.decode(output, skip_special_tokens=True).strip()

    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["export", checkpoints[0]["path"], "--adapter", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()

    # A run's own config.json is a valid --config: resuming a finished run has nothing to do.
    assert main(["sft", "--config", str(run / "config.json"), "--resume"]) == 0
    assert [r["step"] for r in RunFolder(run).metrics()] == [1, 2, 3, 4]

    # A run named by Bios records its name, so its config.json resumes it too.
    assert main(["sft", "--model", llama, "--data", str(data), "--steps", "2", "--rank", "4"]) == 0
    (dated,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("sft-")]
    assert json.loads((dated / "config.json").read_text())["name"] == dated.name
    assert main(["sft", "--config", str(dated / "config.json"), "--resume"]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_mistakes_are_reported_without_a_traceback(home, llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n{broken\n")
    assert main(["sft", "--model", llama, "--data", str(data)]) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err

    config = tmp_path / "bad.yaml"
    config.write_text("learnin_rate: 0.1\n")
    assert main(["sft", "--config", str(config)]) == 2
    assert "unknown setting 'learnin_rate'" in capsys.readouterr().err

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    assert main(["sft", "--model", llama, "--data", str(good), "--steps", "x"]) == 2
    assert "steps: expected int, got 'x'" in capsys.readouterr().err
    assert main(["sft", "--model", llama, "--data", str(good), "--tensorboard"]) == 2
    assert "pip install" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["rl", "--loss-fn", "ppo2"])
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "m")]) == 2
    assert "neither a bios:// checkpoint path nor a run folder" in capsys.readouterr().err
