"""Every run's training metrics, kept durably: one row per `forward_backward` and `optim_step`.

Rows live in their own table (`run_metrics`) of the server's SQLite file, written by a thread of
this module through its own connection, so recording never slows or fails a training request: a
request's done-callback only puts the result on a queue (`recorded`). A row holds the request's
kind, when it finished, how long it took from its turn to its end (`seconds`), the tokens it
carried, its weighted tokens, and every metric its result carries (`loss:sum`, `clip_fraction:mean`,
`kl:mean`, `reward_margin:mean`, ...; an `optim_step`'s `grad_norm` and `learning_rate`).

`step_points` turns the rows into one point per optimizer step, and `downsample` bounds the
points sent to a browser; both are pure functions.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger("bios.server.run_metrics")

DATABASE_FILE = "bios.sqlite3"  # the server's database (`ServerState` opens the same file)
RECORDED_KINDS = ("forward_backward", "optim_step")

SCHEMA = """
CREATE TABLE IF NOT EXISTS run_metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, kind TEXT NOT NULL,
    time REAL NOT NULL, seconds REAL NOT NULL, tokens INTEGER NOT NULL,
    weighted_tokens REAL NOT NULL, metrics TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS run_metrics_by_run ON run_metrics (run_id, id);
"""

Row = tuple[str, str, float, float, int, float, str]  # as written: run id first, metrics as JSON
# As read: (kind, time, seconds, tokens, weighted_tokens, metrics).
Record = tuple[str, float, float, int, float, dict[str, float]]


class MetricsLog:
    """The `run_metrics` table of one database: rows are queued and written by a thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], Row] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="bios-metrics", daemon=True)
        self._writer.start()

    # ---- writing ------------------------------------------------------------------------------

    def record(
        self,
        run_id: str,
        kind: str,
        finished: float,
        seconds: float,
        tokens: int,
        weighted_tokens: float,
        metrics: dict[str, float],
    ) -> None:
        """Queue one row (written within milliseconds; `flush` waits for it)."""
        row = (run_id, kind, finished, seconds, tokens, weighted_tokens, json.dumps(metrics))
        self._queue.put(lambda: row)

    def record_later(self, make_row: Callable[[], Row]) -> None:
        """Queue a row the writer thread computes (token sums are counted off the request path)."""
        self._queue.put(make_row)

    def flush(self) -> None:
        self._queue.join()

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # everything queued meanwhile goes in one transaction
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = []
            for make_row in batch:
                if make_row is None:
                    continue
                try:
                    rows.append(make_row())
                except Exception:  # a result this module misread: lose the row, not the server
                    log.exception("a training metric could not be recorded")
            try:
                if rows:
                    with self._lock:
                        self._db.executemany(
                            "INSERT INTO run_metrics (run_id, kind, time, seconds, tokens, "
                            "weighted_tokens, metrics) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            rows,
                        )
            except sqlite3.Error:
                log.exception("training metrics could not be written")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        with self._lock:
            self._db.close()

    # ---- reading ------------------------------------------------------------------------------

    def rows(self, run_id: str, after: int = 0) -> tuple[int, list[Record]]:
        """The run's rows recorded after row id `after`, in order, metrics parsed; and the id
        of the last one (`after` if there is none)."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT id, kind, time, seconds, tokens, weighted_tokens, metrics "
                "FROM run_metrics WHERE run_id = ? AND id > ? ORDER BY id",
                (run_id, after),
            )
            raw = cursor.fetchall()
        if not raw:
            return after, []
        # One parse of all the rows' metrics: far faster than one json.loads per row.
        parsed = json.loads("[" + ",".join(row[6] for row in raw) + "]")
        rows = [(r[1], r[2], r[3], r[4], r[5], m) for r, m in zip(raw, parsed, strict=True)]
        return raw[-1][0], rows

    def summaries(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per run: `steps` (optim_steps), `tokens` (of its forward_backwards), `last` (time of
        its latest row) and `rows` (how many)."""
        if not run_ids:
            return {}
        marks = ", ".join("?" * len(run_ids))
        with self._lock:
            cursor = self._db.execute(
                "SELECT run_id, SUM(kind = 'optim_step'), "
                "SUM(CASE WHEN kind = 'forward_backward' THEN tokens ELSE 0 END), MAX(time), "
                f"COUNT(*) FROM run_metrics WHERE run_id IN ({marks}) GROUP BY run_id",
                tuple(run_ids),
            )
            raw = cursor.fetchall()
        return {
            run_id: {"steps": steps, "tokens": tokens, "last": last, "rows": count}
            for run_id, steps, tokens, last, count in raw
        }


_logs: dict[Path, MetricsLog] = {}
_logs_lock = threading.Lock()


def log_for(home: Path) -> MetricsLog:
    """The metrics log of the server whose home is `home` (one per database per process)."""
    path = (Path(home) / DATABASE_FILE).resolve()
    with _logs_lock:
        if path not in _logs:
            _logs[path] = MetricsLog(path)
        return _logs[path]


# ---- recording a request --------------------------------------------------------------------


def weighted_tokens(data: Iterable[Any]) -> tuple[int, float]:
    """(tokens, weighted tokens) of a batch of `Datum`s: tokens = Σ_d len(model_input_d);
    weighted tokens = Σ_d Σ_t w_dt over each datum's `weights` where it has them (cross-entropy),
    else its count of target positions (policy objectives weight by advantages, not weights)."""
    tokens, weighted = 0, 0.0
    for datum in data:
        length = datum.model_input.length
        tokens += length
        inputs = datum.loss_fn_inputs
        if "weights" in inputs:
            weighted += float(sum(inputs["weights"].data))
        elif "target_tokens" in inputs:
            weighted += len(inputs["target_tokens"].data)
        else:
            weighted += length
    return tokens, weighted


def metrics_of(result: Any) -> dict[str, float]:
    """The numeric metrics of a forward_backward or optim_step result (a model or a dict)."""
    metrics = result.get("metrics") if isinstance(result, dict) else getattr(result, "metrics", {})
    return {
        str(k): float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def recorded(
    home: Path, run_id: str, kind: str, data: Sequence[Any] | None, action: Callable[[], Future]
) -> Callable[[], Future]:
    """`action` (a sequenced request's), recording its metrics in `home`'s log once its future
    succeeds. The request is never slowed or failed by it: the callback only queues."""

    def run() -> Future:
        started = time.perf_counter()
        future = action()

        def done(finished: Future) -> None:
            try:
                if finished.cancelled() or finished.exception() is not None:
                    return
                seconds = time.perf_counter() - started
                at = time.time()
                result = finished.result()

                def row() -> Row:
                    tokens, weighted = weighted_tokens(data) if data is not None else (0, 0.0)
                    metrics = json.dumps(metrics_of(result))
                    return (run_id, kind, at, seconds, tokens, weighted, metrics)

                log_for(home).record_later(row)
            except Exception:  # never the request's failure
                log.exception("a training metric could not be queued")

        future.add_done_callback(done)
        return future

    return run


# ---- curves -----------------------------------------------------------------------------------


def step_points(rows: Iterable[Record]) -> list[dict[str, float]]:
    """One point per optimizer step: the forward_backwards since the previous `optim_step`, and
    that step. For step k with forward_backwards F_k:

        loss           = Σ_{f∈F_k} loss:sum_f / Σ_{f∈F_k} weighted_tokens_f   (per weighted token)
        tokens         = Σ_{f∈F_k} tokens_f
        tokens_per_s   = tokens / (Σ_{f∈F_k} seconds_f + seconds_step)   (the server's time)
        grad_norm, learning_rate                                           (the step's own)
        m:sum          = Σ_{f∈F_k} m:sum_f;   any other metric m: its mean over F_k

    Forward_backwards not yet followed by an `optim_step` make no point.
    """
    steps = Steps()
    steps.add(rows)
    return steps.points


class Steps:
    """`step_points`, folded a batch of rows at a time (a live run's page reads only the rows
    recorded since its last look)."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []
        self.last_id = 0  # the id of the last row folded in (`MetricsLog.rows`)
        self.rows = 0
        self._reset()

    def _reset(self) -> None:
        self._tokens, self._weighted, self._seconds = 0, 0.0, 0.0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, rows: Iterable[Record]) -> None:
        points, sums, counts = self.points, self._sums, self._counts
        for kind, at, seconds, tokens, weighted, metrics in rows:
            self.rows += 1
            self._seconds += seconds
            if kind != "optim_step":
                self._tokens += tokens
                self._weighted += weighted
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + 1
                continue
            point = {"step": float(len(points) + 1), "time": at}
            for name, total in sums.items():
                point[name] = total if name.endswith(":sum") else total / counts[name]
            if "loss:sum" in sums and self._weighted > 0:
                point["loss"] = sums["loss:sum"] / self._weighted
            point["tokens"] = float(self._tokens)
            if self._seconds > 0:
                point["tokens_per_s"] = self._tokens / self._seconds
            point.update(metrics)
            points.append(point)
            self._reset()
            sums, counts = self._sums, self._counts


def columns_of(points: Sequence[dict[str, float]]) -> dict[str, list[float | None]]:
    """Points as columns (a name's missing values are None), `step` first."""
    names = ["step", *sorted({n for p in points for n in p} - {"step"})]
    return {name: [p.get(name) for p in points] for name in names}


def downsample(
    columns: dict[str, list[float | None]], max_points: int
) -> dict[str, list[float | None]]:
    """At most `max_points` points: consecutive points in buckets of b = ⌈n / max_points⌉, each
    bucket its last `step` and the mean of each column's finite values (None if it has none)."""
    n = len(columns.get("step", []))
    if n <= max_points:
        return columns
    size = math.ceil(n / max_points)
    out: dict[str, list[float | None]] = {}
    for name, values in columns.items():
        reduced: list[float | None] = []
        for start in range(0, n, size):
            bucket = values[start : start + size]
            if name == "step":
                reduced.append(bucket[-1])
                continue
            finite = [v for v in bucket if v is not None and math.isfinite(v)]
            reduced.append(sum(finite) / len(finite) if finite else None)
        out[name] = reduced
    return out
