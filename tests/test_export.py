"""Export round trips: a PEFT adapter folder and a merged Hugging Face model, loaded by peft and
transformers themselves, give the logits of Bios's own model with the same weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bios.checkpoints.export import export_adapter, export_merged
from bios.recipes.run_folder import checkpoint_folder_of
from bios.types import AdamParams, Datum, ModelInput

TOKENS = [5, 17, 42, 9, 100, 3, 7, 8, 250, 11, 12]


def trained(training, steps: int = 3):
    """A few SFT steps so every LoRA B (or full weight) has moved away from the base."""
    datum = Datum(
        model_input=ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )
    for _ in range(steps):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(AdamParams(learning_rate=1e-2)).result()
    return training


def bios_logits(session_engine, training) -> torch.Tensor:
    """Logits of the run's model as the engine computes them (on its worker thread)."""
    run = session_engine.run(training.model_id)

    def forward():
        with torch.no_grad(), run.model() as model:
            return model(input_ids=torch.tensor([TOKENS])).logits[0].float()

    return session_engine.worker(run.base_model).submit(forward).result()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([TOKENS])).logits[0].float()


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: tied input/output embeddings
def test_lora_adapter_and_merged_model_give_bios_logits(
    family, tiny_models, service, session_engine, tmp_path
):
    base = tiny_models[family]
    training = trained(service.create_lora_training_client(base, rank=4, seed=0))
    expected = bios_logits(session_engine, training)
    path = training.save_state("export").result().path
    folder = checkpoint_folder_of(path, home=session_engine.home)

    adapter = export_adapter(folder, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    torch.testing.assert_close(hf_logits(peft_model), expected, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(adapter).encode("hello") == AutoTokenizer.from_pretrained(
        base
    ).encode("hello")

    merged = AutoModelForCausalLM.from_pretrained(export_merged(folder, tmp_path / "merged"))
    torch.testing.assert_close(hf_logits(merged), expected, rtol=0, atol=1e-4)
    assert not torch.equal(hf_logits(merged), hf_logits(AutoModelForCausalLM.from_pretrained(base)))
    original = AutoModelForCausalLM.from_pretrained(base)
    torch.testing.assert_close(  # the input embedding is not adapted, even when it was tied
        merged.get_input_embeddings().weight, original.get_input_embeddings().weight
    )


def test_full_finetuning_exports_merged_only(llama, service, session_engine, tmp_path):
    training = trained(service.create_full_training_client(llama), steps=2)
    expected = bios_logits(session_engine, training)
    folder = checkpoint_folder_of(
        training.save_state("export-full").result().path, home=session_engine.home
    )
    merged = AutoModelForCausalLM.from_pretrained(export_merged(folder, tmp_path / "merged"))
    torch.testing.assert_close(hf_logits(merged), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter; use --merged"):
        export_adapter(folder, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a Bios checkpoint"):
        export_merged(tmp_path, tmp_path / "out")
