"""Counters of a run, per lane and in all, and the commit → acknowledged lag histograms
(the ``--stats-file`` summary)."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from cdc.lsn import format_lsn

from .batch import Batch

__all__ = ["LagHistogram", "LaneStats", "Stats"]


class LagHistogram:
    """Commit → sink-acknowledged latencies (ms) in logarithmic buckets 1% wide: percentiles
    in O(buckets) whatever the number of samples (a sorted window of 200k samples stalled the
    reading thread for up to ~40 ms every time the stats file was written)."""

    _BASE = 1.01
    _FLOOR_MS = 0.01

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.samples = 0
        self.max_ms: float | None = None

    def add(self, values: Iterable[float]) -> None:
        """Record latencies in ms (values below 0.01 ms count as 0.01 ms)."""
        log, floor, base, counts = math.log, self._FLOOR_MS, math.log(self._BASE), self.counts
        for ms in values:
            b = int(log(max(ms, floor) / floor) / base)
            counts[b] = counts.get(b, 0) + 1
            self.samples += 1
            if self.max_ms is None or ms > self.max_ms:
                self.max_ms = ms

    def add_one(self, ms: float) -> None:
        """Record one latency in ms (see :meth:`add`)."""
        self.add((ms,))

    def percentile(self, p: float) -> float | None:
        """The ``p`` quantile (0 < p ≤ 1) in ms, within 1%, never above :attr:`max_ms`; None
        without samples.

        A bucket's midpoint can exceed the largest sample in it (one sample of 10 ms reads as
        10.04 ms): the result is clamped to the recorded maximum, so ``p99 <= max`` holds in
        the stats file."""
        if not self.samples:
            return None
        rank = min(self.samples, max(1, math.ceil(p * self.samples)))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                mid = float(self._FLOOR_MS * self._BASE ** (b + 0.5))
                return mid if self.max_ms is None else min(mid, float(self.max_ms))
        return self.max_ms


@dataclass
class LaneStats:
    """Counters of one lane (one sink): Ops and batches acknowledged, seconds spent applying,
    and commit → acknowledged-by-this-sink latencies of the transactions that touched it."""

    ops: int = 0
    batches: int = 0
    busy_s: float = 0.0
    acked_lsn: int = 0
    lag_ms: LagHistogram = field(default_factory=LagHistogram)

    def summary(self) -> dict[str, Any]:
        return {"ops": self.ops, "batches": self.batches, "busy_s": round(self.busy_s, 2),
                "acked_lsn": format_lsn(self.acked_lsn), "lag_ms": _lag_summary(self.lag_ms)}


def _lag_summary(lag: LagHistogram) -> dict[str, Any]:
    def pct(p: float) -> float | None:
        v = lag.percentile(p)
        return None if v is None else round(v, 2)
    return {"p50": pct(0.5), "p99": pct(0.99),
            "max": None if lag.max_ms is None else round(lag.max_ms, 2), "samples": lag.samples}


@dataclass
class Stats:
    """Counters of a run. ``lag_ms`` holds commit → acknowledged-by-every-sink-it-touched
    latencies (ms), one per transaction that produced Ops; ``read_lag_ms`` commit → read and
    derived by pgderive (the part of the lag spent before any sink: Postgres flushing and
    decoding the WAL, the walsender, the reading thread), one per transaction that produced
    Ops; ``lanes`` the per-sink counters.
    Lanes report from their own threads (:meth:`acknowledged`)."""

    transactions: int = 0
    changes: int = 0
    ops: int = 0
    flushes: int = 0
    confirmed_lsn: int = 0
    refetched_rows: int = 0
    lag_ms: LagHistogram = field(default_factory=LagHistogram)
    read_lag_ms: LagHistogram = field(default_factory=LagHistogram)
    lanes: dict[str, LaneStats] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    snapshot: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def lane(self, name: str) -> LaneStats:
        """The counters of lane ``name`` (created on first use)."""
        with self._lock:
            return self.lanes.setdefault(name, LaneStats())

    def acknowledged(self, lane: LaneStats, batch: Batch, seconds: float) -> None:
        """A lane acknowledged ``batch`` after applying it for ``seconds``: count it and record
        the lag of its transactions (end-to-end for those no other lane still holds)."""
        now = time.time()
        solo = [(now - t) * 1000.0 for t in batch.commit_times]  # transactions of this lane only
        shared = [(now - tok.commit_time) * 1000.0 for tok in batch.shared]
        last = [ms for ms, tok in zip(shared, batch.shared) if tok.acknowledge()]
        lane.ops += len(batch)
        lane.batches += 1
        lane.busy_s += seconds
        lane.acked_lsn = max(lane.acked_lsn, batch.end_lsn)
        lane.lag_ms.add(solo)
        lane.lag_ms.add(shared)
        with self._lock:
            self.ops += len(batch)
            self.flushes += 1
            self.lag_ms.add(solo)
            self.lag_ms.add(last)

    def summary(self) -> dict[str, Any]:
        """The JSON summary written to ``--stats-file``."""
        with self._lock:
            lanes = {name: lane.summary() for name, lane in sorted(self.lanes.items())}
            lag = _lag_summary(self.lag_ms)
            read_lag = _lag_summary(self.read_lag_ms)
        return {"transactions": self.transactions, "changes": self.changes, "ops": self.ops,
                "flushes": self.flushes, "confirmed_lsn": format_lsn(self.confirmed_lsn),
                "refetched_rows": self.refetched_rows,
                "elapsed_s": round(time.time() - self.started, 1),
                "lag_ms": lag, "read_lag_ms": read_lag, "sinks": lanes, "snapshot": self.snapshot}
