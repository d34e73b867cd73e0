"""Counters of a run and the commit → acknowledged lag histogram (``--stats-file``)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from cdc.lsn import format_lsn

__all__ = ["LagHistogram", "Stats"]


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

    def percentile(self, p: float) -> float | None:
        """The ``p`` quantile (0 < p ≤ 1) in ms, within 1%; None without samples."""
        if not self.samples:
            return None
        rank = min(self.samples, max(1, math.ceil(p * self.samples)))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return self._FLOOR_MS * self._BASE ** (b + 0.5)
        return self.max_ms


@dataclass
class Stats:
    """Counters of a run; ``lag_ms`` holds commit → sink-acknowledged latencies (ms)."""

    transactions: int = 0
    changes: int = 0
    ops: int = 0
    flushes: int = 0
    confirmed_lsn: int = 0
    refetched_rows: int = 0
    lag_ms: LagHistogram = field(default_factory=LagHistogram)
    started: float = field(default_factory=time.time)
    snapshot: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lag = self.lag_ms
        pct = lambda p: None if lag.samples == 0 else round(lag.percentile(p), 2)  # noqa: E731
        elapsed = time.time() - self.started
        return {"transactions": self.transactions, "changes": self.changes, "ops": self.ops,
                "flushes": self.flushes, "confirmed_lsn": format_lsn(self.confirmed_lsn),
                "refetched_rows": self.refetched_rows,
                "elapsed_s": round(elapsed, 1),
                "lag_ms": {"p50": pct(0.5), "p99": pct(0.99),
                           "max": None if lag.max_ms is None else round(lag.max_ms, 2),
                           "samples": lag.samples},
                "snapshot": self.snapshot}
