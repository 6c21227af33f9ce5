"""The model worker: per-lane order, fair turns across lanes."""

from __future__ import annotations

import threading

from bios.engine.worker import ModelWorker


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
