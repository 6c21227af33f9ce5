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
