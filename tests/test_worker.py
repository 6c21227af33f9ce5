"""The model worker: per-lane order, fair turns across lanes."""

from __future__ import annotations

import threading

import pytest

from bios.engine.worker import ModelWorker
from bios.models.loading import load_model


def test_lanes_keep_order_and_take_fair_turns(session_engine, llama):
    worker: ModelWorker = session_engine.worker(llama)
    gate = threading.Event()
    order: list[str] = []
    worker.submit(gate.wait, lane="blocker")  # hold the thread while the queues fill up
    greedy = [worker.submit(order.append, f"a{i}", lane="tenant-a") for i in range(50)]
    polite = worker.submit(order.append, "b0", lane="tenant-b")
    gate.set()
    polite.result(timeout=30)
    for future in greedy:
        future.result(timeout=30)
    assert order.index("b0") <= 1, "tenant b waited behind all of tenant a's queue"
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(50)]


def test_each_sampler_has_its_own_lane(session_engine, llama):
    """A sampler's requests take turns with other lanes instead of queueing behind everything
    else submitted to the worker (loading, other samplers)."""
    from bios.types import ModelInput, SamplingParams

    worker: ModelWorker = session_engine.worker(llama)
    session = session_engine.create_sampling_session(base_model=llama)
    gate = threading.Event()
    order: list[str] = []
    worker.submit(gate.wait, lane="blocker")
    backlog = [worker.submit(order.append, f"other{i}") for i in range(20)]  # the shared lane
    params = SamplingParams(max_tokens=2, temperature=0.0)
    sampled = session.sample(ModelInput.from_ints([5, 6, 7]), 1, params)
    sampled.add_done_callback(lambda _: order.append("sampled"))
    gate.set()
    sampled.result(timeout=60)
    for future in backlog:
        future.result(timeout=30)
    assert order.index("sampled") <= 1, order


def test_a_long_decode_takes_turns_with_a_forward_on_another_lane(session_engine, llama):
    """A big sample decodes in turns: a training forward queued behind its first turn runs
    after that one turn, not after the whole decode, and the tokens are those of one decode."""
    import math

    import torch

    from bios.types import LoraConfig, ModelInput, SamplingParams
    from helpers import random_datum

    worker: ModelWorker = session_engine.worker(llama)
    run_id = session_engine.create_run(llama, LoraConfig(rank=4))
    datum = random_datum(worker.vocab_size, 8, "cross_entropy", torch.Generator().manual_seed(0))
    session = session_engine.create_sampling_session(base_model=llama)
    big, late = ModelInput.from_ints([5, 6, 7]), ModelInput.from_ints([9, 10])
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=11)
    session.turn_seconds = math.inf  # the references: each decoded in one turn
    want_big = session.sample(big, 16, params).result(timeout=60)
    want_late = session.sample(late, 3, params).result(timeout=60)

    session.turn_seconds, session.whole_below = 0.0, 0  # one decode step per turn
    events: list[str] = []
    late_sample = []
    turn = session._turn

    def counted(*args):
        events.append("turn")
        if not late_sample:  # a request arriving while the big one decodes
            late_sample.append(session.sample(late, 3, params))
        turn(*args)

    session._turn = counted
    gate = threading.Event()
    worker.submit(gate.wait, lane="blocker")
    sampled = session.sample(big, 16, params)
    forward = session_engine.forward_backward(run_id, [datum], "cross_entropy", backward=False)
    forward.add_done_callback(lambda _: events.append("forward"))
    sampled.add_done_callback(lambda _: events.append("sampled"))
    gate.set()
    got_big = sampled.result(timeout=60)
    forward.result(timeout=60)
    got_late = late_sample[0].result(timeout=60)

    assert events.index("forward") == 1, events[:5]  # after the sample's first turn
    assert events.index("sampled") > events.index("forward")
    assert events.count("turn") > 2
    assert got_big == want_big
    assert got_late == want_late


def test_a_streamed_sample_reports_its_tokens_after_every_turn(session_engine, llama):
    """`on_progress` gets the sequences so far after each turn: prefixes of the final ones, one
    token longer each turn (one step a turn here), and the final tokens are a plain decode's."""
    from bios.types import ModelInput, SamplingParams

    session = session_engine.create_sampling_session(base_model=llama)
    prompt = ModelInput.from_ints([5, 6, 7])
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4, stop=[])
    want = session.sample(prompt, 2, params, topk_sample_logprobs=2).result(timeout=60)
    session.turn_seconds = 0.0  # one decode step per turn, however small the request
    seen: list[list] = []
    got = session.sample(prompt, 2, params, topk_sample_logprobs=2, on_progress=seen.append).result(
        timeout=60
    )
    assert got == want
    assert [len(s[0].tokens) for s in seen] == list(range(1, 12))  # after steps 1..11
    for partial in seen:
        for sequence, final in zip(partial, got.sequences, strict=True):
            n = len(sequence.tokens)
            assert sequence.tokens == final.tokens[:n]
            assert sequence.logprobs == final.logprobs[:n]
            assert sequence.topk_logprobs == final.topk_logprobs[:n]


def test_stop_lets_the_running_item_finish_and_cancels_the_queue(tiny_models):
    """What the interpreter's exit runs for every worker (`bios.engine.worker._stop_workers`),
    before Python finalizes: the item running completes, queued items are cancelled, the thread
    is joined, and nothing more is taken."""
    worker = ModelWorker(load_model(tiny_models["llama"]))
    started, gate = threading.Event(), threading.Event()

    def running() -> str:
        started.set()
        gate.wait(timeout=30)
        return "done"

    first = worker.submit(running, lane="a")
    queued = [worker.submit(str, i, lane=lane) for i, lane in enumerate(["a", "b", "b"])]
    assert started.wait(timeout=30)
    threading.Timer(0.2, gate.set).start()
    worker.stop()
    assert first.result(timeout=0) == "done"
    assert all(future.cancelled() for future in queued)
    assert not worker._thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(str, 1)
