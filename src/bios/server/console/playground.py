"""The console's playground: one sample from a checkpoint or a base model, token by token.

It goes through the server's own samplers, as the OpenAI API does (`openai_models`): one
session per tenant and set of weights, held in the sampler table (counted in the tenant's
quota, freed when idle), so a playground sample is batched with the SDK's on the same weights.
A chat prompt is rendered by the tokenizer's chat template (`routes_openai.chat_prompt`).
Each sampled token comes back with its text and its logprob under the distribution sampled from.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bios.checkpoints.paths import CheckpointPath
from bios.server.openai_models import HeldSamplers, target_of
from bios.server.openai_replies import token_pieces
from bios.server.routes_openai import chat_prompt
from bios.server.state import ServerState
from bios.types import ModelInput, SamplingParams

WAIT_SECONDS = 300.0


class SampleBody(BaseModel):
    """A playground request (unknown fields are refused, naming them)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1)
    mode: Literal["chat", "raw"] = "chat"
    prompt: str = Field(min_length=1, max_length=100_000)
    temperature: float = Field(default=0.7, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


def models(state: ServerState, tenant: str | None) -> list[dict[str, str]]:
    """What the tenant may sample from: its checkpoints (newest first), then base models (the
    served ones, else those its runs were trained from)."""
    checkpoints = [
        {
            "id": CheckpointPath(row["run_id"], row["kind"], row["name"]).uri("tinker://"),
            "label": f"{row['run_id']} / {row['kind']}/{row['name']}",
        }
        for row in state.store.checkpoints(tenant)
        if row["kind"] in ("weights", "sampler_weights")
    ]
    runs, _ = state.store.runs(tenant, limit=1_000_000, offset=0)
    bases = list(state.config.models) or sorted({row["base_model"] for row in runs})
    return checkpoints + [{"id": name, "label": f"base: {name}"} for name in bases]


def sample(
    state: ServerState, held: HeldSamplers, tenant: str | None, body: SampleBody
) -> dict[str, Any]:
    """Sample once; answers the prompt's token count, the text, its tokens as
    `[{"text", "logprob", "id"}]`, and why it stopped."""
    session, sampler_id = held.session(state, tenant, target_of(state, body.model, tenant))
    tokenizer = session.tokenizer
    if body.mode == "chat":
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": body.prompt}], body.model)
    else:
        prompt = tokenizer.encode(body.prompt)
    params = SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
    )
    future = session.sample(ModelInput.from_ints(prompt), 1, params)
    state.samplers.used(sampler_id, future)
    sequence = future.result(timeout=WAIT_SECONDS).sequences[0]
    tokens = list(sequence.tokens)
    text = tokenizer.decode(tokens)
    pieces = token_pieces(tokenizer, tokens, text)
    logprobs = list(sequence.logprobs or [None] * len(tokens))
    return {
        "prompt_tokens": len(prompt),
        "text": text,
        "stop_reason": sequence.stop_reason,
        "tokens": [
            {"id": token, "text": piece, "logprob": logprob}
            for token, piece, logprob in zip(tokens, pieces, logprobs, strict=True)
        ],
    }
