"""Counters of a run, per lane and in all, and the commit → acknowledged lag histograms
(the ``--stats-file`` summary)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from hdrh.histogram import HdrHistogram

from cdc.lsn import format_lsn

from .batch import Batch

__all__ = ["LagHistogram", "LaneStats", "Stats"]


class LagHistogram:
    """Commit → sink-acknowledged latencies in milliseconds, kept in an HdrHistogram (the
    ``hdrhistogram`` package: microsecond values from 1 µs to 1 hour, 2 significant digits,
    so every percentile is within 1%) in O(1) memory whatever the number of samples; plus the
    exact sum and maximum (Prometheus histograms export the sum).

    Thread-safe: a lock per histogram, taken once per :meth:`add` call (a batch's latencies)
    and by readers (HdrHistogram's iterators refuse a histogram modified under them)."""

    _LOWEST_US = 1
    _HIGHEST_US = 3_600_000_000

    def __init__(self) -> None:
        self._h = HdrHistogram(self._LOWEST_US, self._HIGHEST_US, 2)
        self._lock = threading.Lock()
        self.samples = 0
        self.sum_ms = 0.0
        self.max_ms: float | None = None

    def add(self, values: Iterable[float]) -> None:
        """Record latencies in ms (clamped to 0.001 ms … 1 h)."""
        record, lo, hi = self._h.record_value, self._LOWEST_US, self._HIGHEST_US
        with self._lock:
            for ms in values:
                record(min(hi, max(lo, int(ms * 1000.0))))
                self.samples += 1
                self.sum_ms += ms
                if self.max_ms is None or ms > self.max_ms:
                    self.max_ms = ms

    def add_one(self, ms: float) -> None:
        """Record one latency in ms (see :meth:`add`)."""
        self.add((ms,))

    def percentile(self, p: float) -> float | None:
        """The ``p`` quantile (0 < p ≤ 1) in ms, within 1%, never above :attr:`max_ms`; None
        without samples (an HdrHistogram bucket's highest equivalent value can exceed the
        largest sample in it, hence the clamp: ``p99 <= max`` holds in the stats file)."""
        with self._lock:
            if not self.samples:
                return None
            v = float(self._h.get_value_at_percentile(p * 100.0)) / 1000.0
            return v if self.max_ms is None else min(v, self.max_ms)

    def buckets(self, bounds_ms: Sequence[float]) -> tuple[list[int], int, float]:
        """``(counts, samples, sum_ms)`` read together: ``counts[i]`` samples are at or below
        ``bounds_ms[i]`` (ascending, ms; each within the histogram's 1% precision), never more
        than ``samples`` — the buckets, count and sum of a Prometheus histogram. O(recorded
        buckets), for a scrape, not per sample."""
        counts = [0] * len(bounds_ms)
        bounds_us = [b * 1000.0 for b in bounds_ms]
        with self._lock:
            if self.samples:
                for item in self._h.get_recorded_iterator():
                    value = self._h.get_lowest_equivalent_value(item.value_iterated_to)
                    n = item.count_at_value_iterated_to
                    for i in range(len(bounds_us) - 1, -1, -1):
                        if value > bounds_us[i]:
                            break
                        counts[i] += n
            return counts, self.samples, self.sum_ms


@dataclass
class LaneStats:
    """Counters of one lane (one sink): Ops and batches acknowledged, seconds spent applying,
    and commit → acknowledged-by-this-sink latencies of the transactions that touched it.

    Also, for ``/metrics`` and ``/healthz`` (ARCHITECTURE.md, "Monitoring"): Ops acknowledged,
    Ops the sink rejected and dead letters recorded, per view; retried and failed sink calls;
    the commit timestamp (Unix seconds) of the newest transaction acknowledged; and, while a
    batch is in flight, when it was handed over (``time.monotonic()``) and the commit timestamp
    of its oldest transaction. Written by the lane (its thread, or the daemon's receiver thread
    of a lane's process), read by the HTTP endpoint's threads."""

    name: str = ""
    ops: int = 0
    batches: int = 0
    busy_s: float = 0.0
    acked_lsn: int = 0
    lag_ms: LagHistogram = field(default_factory=LagHistogram)
    view_ops: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    errors: int = 0
    acked_commit_time: float | None = None
    acked_at: float = field(default_factory=time.monotonic)
    inflight_since: float | None = None
    inflight_commit: float | None = None

    def handed(self, batch: Batch) -> None:
        """``batch`` was handed to the sink (it is in flight until :meth:`Stats.acknowledged`)."""
        self.inflight_commit = min(batch.commit_times[:1] + [tok.commit_time for tok in batch.shared[:1]],
                                   default=None)
        self.inflight_since = time.monotonic()

    def failed(self, retried: bool) -> None:
        """A sink call failed; ``retried``: it is being retried (else the lane stops)."""
        self.errors += 1
        if retried:
            self.retries += 1

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
    table_changes: dict[str, int] = field(default_factory=dict)
    read_lsn: int = 0
    beat: float = field(default_factory=time.monotonic)
    backpressure_s: float = 0.0
    #: Commits stored in ``pgderive.commits`` and failed attempts to store them (provenance).
    commits_recorded: int = 0
    commit_record_failures: int = 0
    #: Observes one acknowledged batch: ``(sink, Ops, seconds)`` (the ``/metrics`` batch-size
    #: and flush-duration histograms); None: not observed.
    on_batch: Callable[[str, int, float], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def alive(self) -> None:
        """The reading loop (or a bootstrap load) made progress or heard from the source now
        (``/healthz``)."""
        self.beat = time.monotonic()

    def lane(self, name: str) -> LaneStats:
        """The counters of lane ``name`` (created on first use)."""
        with self._lock:
            return self.lanes.setdefault(name, LaneStats(name))

    def acknowledged(self, lane: LaneStats, batch: Batch, seconds: float,
                     rejected: Mapping[str, int] | None = None) -> None:
        """A lane acknowledged ``batch`` after applying it for ``seconds``: count it and record
        the lag of its transactions (end-to-end for those no other lane still holds).
        ``rejected``: view → Ops of the batch the sink refused (recorded as dead letters)."""
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
        if batch.ops:  # C-speed counting of the batch's (view, key) pairs
            for view, n in Counter(v for v, _ in batch.ops).items():
                lane.view_ops[view] = lane.view_ops.get(view, 0) + n
        for d in batch.dead_letters:
            lane.dead_letters[d.view] = lane.dead_letters.get(d.view, 0) + 1
        for view, n in (rejected or {}).items():
            lane.rejected[view] = lane.rejected.get(view, 0) + n
            lane.dead_letters[view] = lane.dead_letters.get(view, 0) + n
        newest = max(batch.commit_times[-1:] + [tok.commit_time for tok in batch.shared[-1:]], default=None)
        if newest is not None:
            lane.acked_commit_time = max(newest, lane.acked_commit_time or 0.0)
        lane.acked_at = time.monotonic()
        lane.inflight_since = lane.inflight_commit = None
        if self.on_batch is not None and batch.has_data:
            self.on_batch(lane.name, len(batch), seconds)
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
