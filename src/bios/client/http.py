"""The HTTP transport: the same calls as the in-process engine, made to `bios serve`.

`ServiceClient(base_url=..., api_key=...)` uses this instead of the embedded engine; the client
classes cannot tell the difference. Requests of one run carry increasing `seq_id`s and are sent
in call order, so the server executes them in that order; each answers `{request_id}` and a pool
of threads long-polls `/retrieve_future` to complete the local future. A request the server
rejects at once (400/404) raises here, at call time, as with the embedded engine.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from bios.checkpoints.paths import CheckpointPath
from bios.concurrency import then
from bios.errors import BiosError, InvalidInputError, NotFoundError
from bios.objectives.custom import check_custom_loss, checked_custom_result, linearised
from bios.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoraConfig,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    checked_adam_params,
    checked_data,
)


class ServerError(BiosError):
    """The server failed a request (its message says why)."""


@dataclass
class RemoteSession:
    """A sampling session living on the server."""

    session_id: str
    base_model: str
    _tokenizer: Callable[[], Any]

    @property
    def tokenizer(self):
        return self._tokenizer()


def _bios_path(path: str) -> str:
    return CheckpointPath.parse(path).uri() if path.startswith("tinker://") else path


class HttpTransport:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout
        )
        self._pollers = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bios-poll")
        self._seq: dict[str, itertools.count] = {}
        self._lock = threading.Lock()
        self._session_id = self._call("create_session", {"tags": ["bios"], "sdk_version": "bios"})[
            "session_id"
        ]
        self._models = itertools.count()

    # ---- plumbing -----------------------------------------------------------------------------

    def _call(self, route: str, body: dict | None = None, method: str = "POST") -> Any:
        response = self._http.request(method, f"/{route}", json=body)
        if response.status_code >= 400:
            message = _error_text(response)
            if response.status_code == 404:
                raise NotFoundError(message)
            if response.status_code in (400, 422):
                field, _, problem = message.partition(": ")
                raise InvalidInputError(field, problem or message)
            raise ServerError(f"{route}: HTTP {response.status_code}: {message}")
        return response.json()

    def _future(self, answer: dict, decode: Callable[[dict], Any]) -> Future:
        """A local future completed by polling the server for `answer["request_id"]`."""
        future: Future = Future()
        self._pollers.submit(self._poll, answer["request_id"], decode, future)
        return future

    def _poll(self, request_id: str, decode: Callable[[dict], Any], future: Future) -> None:
        try:
            while True:
                result = self._call("retrieve_future", {"request_id": request_id})
                if result.get("type") == "try_again":
                    continue
                if "error" in result and "category" in result:
                    error_class = InvalidInputError if result["category"] == "user" else ServerError
                    if error_class is InvalidInputError:
                        field, _, problem = result["error"].partition(": ")
                        future.set_exception(InvalidInputError(field, problem))
                    else:
                        future.set_exception(ServerError(result["error"]))
                    return
                future.set_result(decode(result))
                return
        except BaseException as error:  # the caller sees it on .result()
            future.set_exception(error)

    def _sequenced(
        self, route: str, run_id: str, body: dict, decode: Callable[[dict], Any]
    ) -> Future:
        # The sequence number and the POST must go together, or two threads could swap them.
        with self._lock:
            seq_id = next(self._seq.setdefault(run_id, itertools.count(1)))
            answer = self._call(route, {**body, "model_id": run_id, "seq_id": seq_id})
        return self._future(answer, decode)

    # ---- runs ---------------------------------------------------------------------------------

    def create_run(
        self,
        base_model: str,
        lora: LoraConfig | None,
        *,
        user_metadata: Mapping[str, str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> str:
        body: dict[str, Any] = {
            "session_id": self._session_id,
            "model_seq_id": next(self._models),
            "base_model": base_model,
            "user_metadata": dict(user_metadata) if user_metadata is not None else None,
        }
        if gradient_checkpointing:  # a Bios extension: only sent when asked for
            body["gradient_checkpointing"] = True
        if lora is None:
            body["full_finetune"] = True
        else:
            body["lora_config"] = lora.model_dump()
        answer = self._call("create_model", body)
        return self._future(answer, lambda r: r["model_id"]).result()

    def create_run_from_state(
        self,
        path: str,
        with_optimizer: bool,
        *,
        user_metadata: Mapping[str, str] | None = None,
    ) -> str:
        body = {
            "session_id": self._session_id,
            "model_seq_id": next(self._models),
            "path": path,
            "optimizer": with_optimizer,
            "user_metadata": dict(user_metadata) if user_metadata is not None else None,
        }
        return self._future(self._call("load_weights", body), lambda r: r["model_id"]).result()

    def get_info(self, run_id: str) -> GetInfoResponse:
        info = self._call("get_info", {"model_id": run_id})
        info.pop("optimizer_config", None)
        return GetInfoResponse.model_validate(info)

    def tokenizer(self, run_id: str):
        return _tokenizer(self.get_info(run_id).model_data.tokenizer_id)

    # ---- training -----------------------------------------------------------------------------

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str | Sequence[tuple[str, float]],
        loss_fn_config: Mapping[str, float] | None = None,
        backward: bool = True,
        reference: str | None = None,
        *,
        keep_graph: bool = False,
    ) -> Future[ForwardBackwardOutput]:
        """`keep_graph` (a forward only): the server keeps the forward's autograd graph for the
        `forward_backward` on the same tokens that follows (a custom objective's second pass)."""
        payload = {
            "data": [d.model_dump(mode="json") for d in checked_data(data)],
            "loss_fn": loss_fn if isinstance(loss_fn, str) else [list(p) for p in loss_fn],
            "loss_fn_config": dict(loss_fn_config) if loss_fn_config else None,
            "reference": reference,
        }
        body = {
            "forward_backward_input": payload,
            "forward_only": not backward,
            "keep_graph": keep_graph,
        }
        return self._sequenced(
            "forward_backward", run_id, body, ForwardBackwardOutput.model_validate
        )

    def forward_backward_custom(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: Callable,
        loss_type_input: str = "logprobs",
    ) -> Future[ForwardBackwardOutput]:
        """A forward, the loss's gradient here, then a backward of Σ −(∂L/∂logprob)·logprob.

        The server keeps the forward's graph for that backward, so it costs one forward pass.
        """
        check_custom_loss(
            loss_fn,
            loss_type_input,
            available=("logprobs",),
            why=" (only 'logprobs' is available over HTTP)",
        )
        data = checked_data(data)
        targets_only = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "weights": [0.0] * d.model_input.length,
                },
            )
            for d in data
        ]
        forward = self.forward_backward(
            run_id, targets_only, "cross_entropy", backward=False, keep_graph=True
        )
        out: Future = Future()
        self._pollers.submit(self._finish_custom, run_id, data, loss_fn, forward, out)
        return out

    def _finish_custom(self, run_id, data, loss_fn, forward: Future, out: Future) -> None:
        try:
            result = forward.result()
            logprobs = [
                o["logprobs"].to_torch().requires_grad_(True) for o in result.loss_fn_outputs
            ]
            loss, metrics = checked_custom_result(loss_fn(list(data), logprobs))
            loss.backward()
            backward = self.forward_backward(
                run_id, linearised(data, logprobs), "cross_entropy"
            ).result()
            backward.metrics.update(metrics)
            backward.metrics["loss:sum"] = float(loss.detach())
            out.set_result(backward)
        except BaseException as error:  # the caller sees it on .result()
            out.set_exception(error)

    def optim_step(self, run_id: str, adam_params: AdamParams) -> Future[OptimStepResponse]:
        body = {"adam_params": checked_adam_params(adam_params).model_dump()}
        return self._sequenced("optim_step", run_id, body, OptimStepResponse.model_validate)

    def save_state(
        self, run_id: str, name: str, kind: str = "weights", overwrite: bool = False
    ) -> Future[str]:
        route = "save_weights" if kind == "weights" else "save_weights_for_sampler"
        return self._sequenced(
            route, run_id, {"path": name, "overwrite": overwrite}, lambda r: _bios_path(r["path"])
        )

    def load_state(self, run_id: str, path: str, with_optimizer: bool) -> Future[str]:
        body = {"path": path, "optimizer": with_optimizer}
        return self._sequenced("load_weights", run_id, body, lambda r: _bios_path(r["path"]))

    def generate(self, run_id: str, tokens: Sequence[int], max_tokens: int) -> Future[list[int]]:
        session = self.snapshot_for_sampling(run_id).result()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        response = self.sample(session.session_id, ModelInput.from_ints(list(tokens)), 1, params)
        return then(response, lambda r: r.sequences[0].tokens)

    # ---- sampling -----------------------------------------------------------------------------

    def snapshot_for_sampling(self, run_id: str) -> Future[RemoteSession]:
        base_model = self.get_info(run_id).model_name
        tokenizer = functools.partial(self.tokenizer, run_id)
        return self._sequenced(
            "save_weights_for_sampler",
            run_id,
            {"sampling_session_seq_id": 0},
            lambda r: RemoteSession(r["sampling_session_id"], base_model, tokenizer),
        )

    def create_sampling_session(
        self,
        run_id: str | None = None,
        model_path: str | None = None,
        base_model: str | None = None,
    ) -> RemoteSession:
        if run_id is not None:
            return self.snapshot_for_sampling(run_id).result()
        body = {"session_id": self._session_id, "model_path": model_path, "base_model": base_model}
        session_id = self._call("create_sampling_session", body)["sampling_session_id"]
        sampler = self._call(f"samplers/{session_id}", method="GET")
        return RemoteSession(
            session_id, sampler["base_model"], functools.partial(_tokenizer, sampler["base_model"])
        )

    def sample(
        self,
        session_id: str,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        *,
        topk_sample_logprobs: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> Future[SampleResponse]:
        params = (
            sampling_params.model_dump()
            if isinstance(sampling_params, SamplingParams)
            else sampling_params
        )
        body = {
            "sampling_session_id": session_id,
            "prompt": _model_input(prompt).model_dump(mode="json"),
            "num_samples": num_samples,
            "sampling_params": params,
            "prompt_logprobs": include_prompt_logprobs,
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": topk_sample_logprobs,
            "prompt_logprobs_last_n": prompt_logprobs_last_n,
        }
        return self._future(self._call("asample", body), SampleResponse.model_validate)

    def compute_logprobs(self, session_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        params = SamplingParams(max_tokens=1, temperature=1.0)
        response = self.sample(session_id, prompt, 1, params, include_prompt_logprobs=True)
        return then(response, lambda r: r.prompt_logprobs)


def _model_input(prompt: ModelInput | Sequence[int]) -> ModelInput:
    return prompt if isinstance(prompt, ModelInput) else ModelInput.from_ints(list(prompt))


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_id: str):
    from transformers import AutoTokenizer

    from bios.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_id))


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    return body.get("error", str(body)) if isinstance(body, dict) else str(body)


__all__ = ["HttpTransport", "RemoteSession", "ServerError"]
