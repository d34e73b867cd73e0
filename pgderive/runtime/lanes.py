"""Sink lanes: each sink applies its own batches on its own thread (:class:`Lane`) or in a
process of its own (:class:`~pgderive.runtime.lane_process.ProcessLane`), so a slow sink only
holds back its own views (ARCHITECTURE.md, "Lanes"). Both are :class:`SinkLane`\\ s and run the
same :class:`~pgderive.runtime.applier.Applier`.

The reading thread derives Ops and files them into one :class:`~pgderive.runtime.batch.Batch`
per lane; a lane that is idle takes its batch, applies it, records its dead letters, advances
its views' checkpoints and applies its TRUNCATEs, in stream order, then reports its position
(:attr:`Lane.acked_lsn`: every transaction ending at or before it is acknowledged by this
sink). The slot is confirmed at the minimum position over all lanes (rule 3, "flush last").

Under load each lane's batch grows to what arrived during its previous apply (no timer, no
added latency when idle). At most one batch is in flight per lane and the reader stops reading
while a busy lane's next batch is full (backpressure: memory stays bounded by two batches per
lane), so a sink that falls behind by more than a batch holds the stream back, and Postgres
retains WAL meanwhile (``pgderive status`` shows it).

A retryable :class:`~sinks.base.SinkError` is retried with capped backoff inside the lane;
anything else is kept in the lane's ``error`` for the reading thread to raise.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterator, Mapping, Protocol, Sequence

from sinks.base import Refreshable, Sink, SinkError

from .applier import Applier, DeadLetterSink
from .batch import Batch
from .lane_process import LaneProcessSpec, ProcessLane
from .retry import one_line
from .saturation import SaturationMonitor
from .stats import LaneStats, Stats

__all__ = ["Lane", "Lanes", "SinkLane", "SaturationMonitor", "FAST_S", "DeadLetterSink"]

#: A lane whose batches take less than this on average (seconds) may have its small batches
#: applied on the reading thread. Measured on 2 cores under pgbench saturation: Redis 1-5 ms per
#: batch (GIL waits included), OpenSearch 20-50 ms.
FAST_S = 0.010

log = logging.getLogger("pgderive.lanes")


class SinkLane(Protocol):
    """What the stream needs of a lane, wherever it applies its batches: on a thread of the
    daemon (:class:`Lane`) or in a process of its own
    (:class:`~pgderive.runtime.lane_process.ProcessLane`). Every method is called from the
    reading thread."""

    name: str
    views: list[str]
    #: The position (int LSN) the sink acknowledged: every transaction ending at or before it.
    acked_lsn: int
    #: What the lane's last batch raised; the reading thread raises it (:meth:`Lanes.raise_error`).
    error: BaseException | None
    #: The sink shows writes only after a refresh interval: its batch may wait for more Ops.
    lingers: bool
    #: The ``seq`` of the last :class:`~pgderive.runtime.batch.GenerationStep` the sink applied.
    steps_done: int

    @property
    def idle(self) -> bool:
        """True when no batch is in flight."""
        ...

    @property
    def fast(self) -> bool:
        """True when small batches may be applied on the reading thread (:meth:`apply_direct`)."""
        ...

    def submit(self, batch: Batch) -> None:
        """Hand ``batch`` over (the lane must be idle; the caller must not touch it afterwards)."""
        ...

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no batch is in flight (or ``timeout`` seconds); returns :attr:`idle`."""
        ...

    def apply_direct(self, batch: Batch) -> bool:
        """Apply ``batch`` on the calling thread, one attempt: True once acknowledged, False
        when it must be :meth:`submit`\\ ted instead."""
        ...

    def checkpoint(self, lsn: int, retry: bool = True) -> None:
        """Record that every view of the lane is complete up to ``lsn`` (int LSN; the lane
        must be idle)."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Stop the lane, waiting up to ``timeout`` seconds for its batch in flight."""
        ...


class Lane:
    """Applies one sink's batches, one at a time, on a thread of its own (a :class:`SinkLane`).

    Args:
        sink: the sink.
        views: names of the views this sink serves (their checkpoints move with the lane).
        stop: shared stop event; retries give up when it is set.
        acked_lsn: the position (int LSN) already acknowledged (the slot's confirmed LSN).
        record: stores a batch's dead letters and rejected Ops before it counts as acknowledged.
        stats: the run's counters (this lane's :class:`~pgderive.runtime.stats.LaneStats` and
            the end-to-end lag).
        changed: notified whenever a lane becomes idle (shared by all lanes of a daemon).
    """

    def __init__(self, sink: Sink, views: Sequence[str], stop: threading.Event, *, acked_lsn: int = 0,
                 record: DeadLetterSink | None = None, stats: Stats | None = None,
                 changed: threading.Condition | None = None, truncate_below: bool = False) -> None:
        self.name = sink.name
        self.views = list(views)
        self.stats = stats or Stats()
        self.lane_stats: LaneStats = self.stats.lane(self.name)
        self.applier = Applier(sink, views, stop, acked_lsn=acked_lsn, record=record,
                               on_retry=lambda _e: self.lane_stats.failed(retried=True),
                               truncate_below=truncate_below)
        self.error: BaseException | None = None
        self.saturation = SaturationMonitor()
        # A sink whose readers see writes only after a refresh interval (OpenSearch: 1 s) loses
        # nothing visible when its batch waits a little for more Ops (Limits.linger).
        self.lingers = isinstance(sink, Refreshable)
        # Moving average of a batch's apply time (seconds). It starts high: a lane earns direct
        # applies on the reading thread only after ~20 quick batches on its own thread, so a
        # sink that turns out slow (or hangs on its first call) never stalls the reader.
        self.apply_s = 1.0
        self.steps_done = 0
        self._cond = changed or threading.Condition()
        self._batch: Batch | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"pgderive-lane-{self.name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lane({self.name!r}, acked={self.acked_lsn:#x}, idle={self.idle})"

    @property
    def acked_lsn(self) -> int:
        """The position (int LSN) the sink acknowledged (see :class:`SinkLane`)."""
        return self.applier.acked_lsn

    @acked_lsn.setter
    def acked_lsn(self, lsn: int) -> None:
        self.applier.acked_lsn = lsn

    @property
    def idle(self) -> bool:
        """True when no batch is in flight."""
        return self._batch is None

    @property
    def fast(self) -> bool:
        """True when the sink usually acknowledges a batch within 10 ms (a local Redis, even
        under load; an OpenSearch ``_bulk`` takes tens of ms): its small batches may be applied
        on the reading thread (:meth:`apply_direct`) without holding the other lanes back
        noticeably (a slow lane's batch lingers longer than that anyway)."""
        return self.apply_s < FAST_S

    def submit(self, batch: Batch) -> None:
        """Hand ``batch`` to the lane's thread; the caller must not touch it afterwards.

        Raises ``RuntimeError`` unless :attr:`idle`."""
        with self._cond:
            if self._batch is not None:
                raise RuntimeError(f"lane {self.name}: a batch is already in flight")
            self._batch = batch
            self.lane_stats.handed(batch)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no batch is in flight (or ``timeout`` seconds); returns :attr:`idle`."""
        with self._cond:
            self._cond.wait_for(lambda: self._batch is None, timeout)
            return self._batch is None

    def apply_direct(self, batch: Batch) -> bool:
        """Apply ``batch`` on the calling thread with a single attempt (the lane must be idle):
        True once acknowledged; False after a retryable :class:`SinkError` (logged: then
        :meth:`submit` it, applying it again is harmless). Saves two thread wake-ups for the
        small batches of a lightly loaded stream. Raises what :attr:`error` would hold."""
        self.lane_stats.handed(batch)
        try:
            self._apply(batch, retry=False)
        except SinkError as e:
            if not e.retryable:
                raise
            log.warning("sink %s: direct apply failed (%s); retrying on its lane", self.name, one_line(e),
                        extra={"sink": self.name})
            self.lane_stats.failed(retried=True)
            return False
        return True

    def checkpoint(self, lsn: int, retry: bool = True) -> None:
        """Record in the sink that every view of the lane is complete up to ``lsn`` (int LSN)
        and make it the lane's position (:meth:`~pgderive.runtime.applier.Applier.checkpoint`:
        raises :class:`~pgderive.runtime.checkpoints.SinkDataLoss` and ``SinkError``)."""
        self.applier.checkpoint(lsn, retry=retry)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the lane's thread (after the batch in flight, if any, waiting at most
        ``timeout`` seconds for it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the lane's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._batch is not None or self._closed)
                if self._batch is None:
                    return
                batch = self._batch
            try:
                if self.error is None:
                    self._apply(batch, retry=True)
            except BaseException as e:  # handed to the reading thread
                self.error = e
                self.lane_stats.failed(retried=False)
            with self._cond:
                self._batch = None
                self._cond.notify_all()

    def _apply(self, batch: Batch, retry: bool) -> None:
        """Apply the batch (:meth:`~pgderive.runtime.applier.Applier.apply`), then count it."""
        started = time.monotonic()
        rejected = self.applier.apply(batch, retry=retry)
        if batch.steps:
            self.steps_done = batch.steps[-1].seq
        ended = time.monotonic()
        self.apply_s += 0.2 * ((ended - started) - self.apply_s)
        self.stats.acknowledged(self.lane_stats, batch, ended - started, rejected)
        self.saturation.record(started, ended, len(batch), {self.name: ended - started})


class Lanes:
    """The lanes of one daemon, one per sink.

    Args:
        sinks: sink name → sink.
        views_by_sink: sink name → names of its views.
        stop: shared stop event.
        acked_lsn: the slot's confirmed position (every lane starts there).
        record: see :class:`Lane`.
        stats: the run's counters.
        processes: sink name → how to open that sink in a process of its own: those sinks get
            a :class:`~pgderive.runtime.lane_process.ProcessLane` (ARCHITECTURE.md, "Lanes":
            a sink whose client work would take the reading thread's CPU), the others a
            :class:`Lane` on a thread.
        truncate_below: TRUNCATEs keep newer records (:class:`~pgderive.runtime.applier.Applier`;
            a process lane takes it from its :class:`~pgderive.runtime.lane_process.LaneProcessSpec`).
    """

    def __init__(self, sinks: Mapping[str, Sink], views_by_sink: Mapping[str, Sequence[str]],
                 stop: threading.Event, *, acked_lsn: int = 0, record: DeadLetterSink | None = None,
                 stats: Stats | None = None, processes: Mapping[str, LaneProcessSpec] | None = None,
                 truncate_below: bool = False) -> None:
        self.changed = threading.Condition()
        self.by_name: dict[str, SinkLane] = {}
        try:
            for name, sink in sinks.items():
                views = views_by_sink.get(name, ())
                spec = (processes or {}).get(name)
                if spec is None:
                    self.by_name[name] = Lane(sink, views, stop, acked_lsn=acked_lsn, record=record,
                                              stats=stats, changed=self.changed, truncate_below=truncate_below)
                else:
                    self.by_name[name] = ProcessLane(spec, views, stop, acked_lsn=acked_lsn,
                                                     lingers=isinstance(sink, Refreshable),
                                                     stats=stats, changed=self.changed)
        except BaseException:
            self.close(1.0)
            raise

    def __iter__(self) -> Iterator[SinkLane]:
        return iter(self.by_name.values())

    def __getitem__(self, name: str) -> SinkLane:
        return self.by_name[name]

    @property
    def acked_lsn(self) -> int:
        """The position every lane acknowledged (int LSN): what the slot may be confirmed at."""
        return min((lane.acked_lsn for lane in self.by_name.values()), default=0)

    def raise_error(self) -> None:
        """Raise the first error a lane's thread hit, if any."""
        for lane in self.by_name.values():
            if lane.error is not None:
                raise lane.error

    def wait_change(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a lane to finish its batch."""
        with self.changed:
            self.changed.wait(timeout)

    def wait_idle(self, deadline: float | None = None) -> bool:
        """Wait until every lane finished its batch in flight, then raise the first error a
        lane's thread hit, if any; True. With ``deadline`` (a ``time.monotonic()`` value),
        False as soon as it has passed with a lane still busy."""
        for lane in self.by_name.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not lane.wait_idle(remaining):
                return False
        self.raise_error()
        return True

    def submit(self, name: str, batch: Batch) -> None:
        """Hand ``batch`` to lane ``name`` once it finished its batch in flight (raising first
        the error a lane's thread hit, if any)."""
        lane = self.by_name[name]
        lane.wait_idle()
        self.raise_error()
        lane.submit(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every lane's thread, waiting up to ``timeout`` seconds for each (a lane blocked
        in a hung sink call is a daemon thread: it does not keep the process alive)."""
        for lane in self.by_name.values():
            lane.close(timeout)
