"""Noticing a sink that cannot keep up (a lane busy nearly all the time), for a log warning."""
from __future__ import annotations

import logging
from typing import Mapping

__all__ = ["SaturationMonitor"]

log = logging.getLogger("pgderive.lanes")


class SaturationMonitor:
    """Notices a sink that cannot keep up: its lane busy (applying, retrying, checkpointing) for
    at least ``threshold`` of a window of at least ``window`` seconds. Logs a warning naming the
    sink, at most every ``every`` seconds. Called from one lane's thread only."""

    def __init__(self, window: float = 10.0, threshold: float = 0.9, every: float = 60.0) -> None:
        self.window, self.threshold, self.every = window, threshold, every
        self._start: float | None = None
        self._busy = 0.0
        self._ops = 0
        self._per_sink: dict[str, float] = {}
        self._logged = -1e18

    def record(self, started: float, ended: float, ops: int, per_sink: Mapping[str, float]) -> None:
        """One batch of ``ops`` Ops applied from ``started`` to ``ended`` (monotonic seconds);
        ``per_sink``: seconds each sink spent applying its part."""
        if self._start is None:
            self._start = started
        self._busy += ended - started
        self._ops += ops
        for name, secs in per_sink.items():
            self._per_sink[name] = self._per_sink.get(name, 0.0) + secs
        span = ended - self._start
        if span < self.window:
            return
        busy, n, per_sink = self._busy, self._ops, self._per_sink
        self._start, self._busy, self._ops, self._per_sink = None, 0.0, 0, {}
        if busy / span >= self.threshold and ended - self._logged >= self.every and per_sink:
            self._logged = ended
            slowest = max(per_sink, key=per_sink.__getitem__)
            log.warning("sink %s is the bottleneck: its lane was busy %.0f%% of the last %.0f s "
                        "(%d ops, %.0f ops/s; %s spent %.1f s applying); its views lag, and once its "
                        "next batch is full the slot is read only as fast as it acknowledges "
                        "(backpressure; Postgres retains WAL meanwhile)",
                        slowest, 100 * busy / span, span, n, n / span, slowest, per_sink[slowest],
                        extra={"sink": slowest})
