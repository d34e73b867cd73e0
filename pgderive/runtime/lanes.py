"""Applying batches to the sinks off the reading thread.

The engine's thread reads the slot and derives Ops while the flusher applies the previous
batch: under load each batch naturally grows to what arrived during one flush (no timer, no
added latency when idle), and Redis and OpenSearch are written in parallel, one thread per
sink. Only one batch is in flight at a time, and the engine stops reading once its next batch
is full (backpressure: memory stays bounded by two batches; a batch is full at 20,000 Ops or
8 MB of wal2json input, see :class:`pgderive.runtime.coordinator.Engine`).

A retryable :class:`~sinks.base.SinkError` is retried with capped backoff inside the flusher;
anything else is kept in :attr:`Flusher.error` for the engine thread to raise.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection, Mapping, TypeVar

from sinks.base import Sink, SinkError

from .batch import Batch

__all__ = ["Flusher", "apply_with_retry", "with_retry", "Backoff", "SaturationMonitor", "SinkDataLoss"]


class SinkDataLoss(RuntimeError):
    """A sink no longer holds what it acknowledged (e.g. Redis restarted without its data):
    the per-view checkpoint is missing or behind. ``views`` need a rebuild."""

    def __init__(self, sink: str, views: list[str], detail: str) -> None:
        super().__init__(f"sink {sink} lost data of view(s) {', '.join(views)}: {detail}")
        self.sink, self.views = sink, views

    @classmethod
    def behind(cls, sink: str, views: list[str], acked: int) -> "SinkDataLoss":
        """The checkpoints of ``views`` were missing or behind ``acked`` (int LSN)."""
        return cls(sink, views, f"checkpoint missing or behind the acknowledged position {acked:#x}")


log = logging.getLogger("pgderive.flusher")
T = TypeVar("T")


class Backoff:
    """Capped exponential backoff: 0.5 s, 1 s, 2 s … up to ``cap`` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.first


def with_retry(what: str, fn: Callable[[], T], stop: threading.Event) -> T:
    """``fn()``, retrying retryable :class:`SinkError` with capped backoff until ``stop``.

    Raises the :class:`SinkError` if it is not retryable, or if ``stop`` is set meanwhile.
    """
    backoff = Backoff()
    while True:
        try:
            return fn()
        except SinkError as e:
            if not e.retryable or stop.is_set():
                raise
            delay = backoff.next()
            log.warning("%s failed (%s); retrying in %.1f s", what, " ".join(str(e).split())[:300], delay)
            stop.wait(delay)


def apply_with_retry(sink: Sink, ops: list, stop: threading.Event) -> list:
    """``sink.apply(ops)`` with :func:`with_retry`; returns the sink's rejected Ops
    (``list[sinks.base.Rejected]``: data it refused, e.g. a document OpenSearch cannot map)."""
    return list(with_retry(f"sink {sink.name}", lambda: sink.apply(ops) or [], stop))


class SaturationMonitor:
    """Notices sinks that hold the stream back: the flusher busy (applying, retrying,
    checkpointing) for at least ``threshold`` of a window of at least ``window`` seconds, while
    the reading thread waits for it. Logs a warning naming the sink that took longest, at most
    every ``every`` seconds. Called from the flusher thread only."""

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
            log.warning("sink %s is the bottleneck: the sinks were busy %.0f%% of the last %.0f s "
                        "(%d ops, %.0f ops/s; %s spent %.1f s applying); the slot is read only as fast "
                        "as they acknowledge (backpressure; Postgres retains WAL meanwhile)",
                        slowest, 100 * busy / span, span, n, n / span, slowest, per_sink[slowest])


class Flusher:
    """Applies one :class:`Batch` at a time on a background thread.

    Args:
        sinks: sink name → sink.
        stop: shared stop event; retries give up when it is set.
        on_applied: called on the flusher thread with each batch once every sink acknowledged.
    """

    def __init__(self, sinks: Mapping[str, Sink], stop: threading.Event,
                 on_applied: Callable[[Batch], None],
                 on_rejected: Callable[[Batch, list], None] | None = None,
                 views_by_sink: Mapping[str, list[str]] | None = None,
                 acked_lsn: int = 0) -> None:
        self.sinks = sinks
        self.stop = stop
        self.on_applied = on_applied
        self.on_rejected = on_rejected
        # Checkpoints: after each batch every view of a sink is complete up to the batch's end
        # LSN; advancing them also catches a sink that lost data behind our back (SinkDataLoss
        # through ``error``).
        self.views_by_sink = dict(views_by_sink or {})
        self.acked_lsn = acked_lsn  # end LSN of the last batch every sink acknowledged
        self.error: BaseException | None = None
        self.saturation = SaturationMonitor()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(sinks)), thread_name_prefix="pgderive-sink")
        self._cond = threading.Condition()
        self._batch: Batch | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pgderive-flusher", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """True when no batch is in flight."""
        return self._batch is None

    def submit(self, batch: Batch) -> None:
        """Hand ``batch`` over; the caller must not touch it afterwards. Requires :attr:`idle`."""
        with self._cond:
            if self._batch is not None:
                raise RuntimeError("a batch is already in flight")
            self._batch = batch
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no batch is in flight (or ``timeout`` seconds); returns :attr:`idle`."""
        with self._cond:
            self._cond.wait_for(lambda: self._batch is None, timeout)
            return self._batch is None

    def apply_now(self, batch: Batch) -> None:
        """Apply ``batch`` synchronously on the calling thread (the flusher must be idle)."""
        self._apply(batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._batch is not None or self._closed)
                if self._batch is None:
                    return
                batch = self._batch
            try:
                if self.error is None:
                    self._apply(batch)
                    self.acked_lsn = max(self.acked_lsn, batch.end_lsn)
                    self.on_applied(batch)
            except BaseException as e:  # handed to the engine thread
                self.error = e
            with self._cond:
                self._batch = None
                self._cond.notify_all()

    def apply_direct(self, batch: Batch) -> bool:
        """Apply ``batch`` on the calling thread (the flusher must be idle), as the flusher
        thread would but with a single attempt: returns True once every sink acknowledged it
        (:attr:`acked_lsn` advanced, ``on_applied`` called), False after a retryable
        :class:`SinkError` (logged; :meth:`submit` the batch then: applying it again is
        harmless). Raises what :attr:`error` would hold."""
        try:
            self._apply(batch, retry=False)
        except SinkError as e:
            if not e.retryable:
                raise
            log.warning("direct apply failed (%s); retrying on the flusher thread", " ".join(str(e).split())[:300])
            return False
        self.acked_lsn = max(self.acked_lsn, batch.end_lsn)
        self.on_applied(batch)
        return True

    def _apply(self, batch: Batch, retry: bool = True) -> None:
        """Apply every sink's Ops (in parallel), then hand rejects and the batch's dead
        letters to ``on_rejected`` — all before the batch counts as acknowledged."""
        started = time.monotonic()
        took: dict[str, float] = {}
        lsn = batch.end_lsn if batch.end_lsn > self.acked_lsn else 0  # 0: no checkpoint to advance
        names = [name for name, ops in batch.ops.items() if ops]
        if lsn:  # sinks that advance their checkpoints with their Ops: also those without Ops
            names += [name for name, views in self.views_by_sink.items() if views and name not in names
                      and hasattr(self.sinks[name], "apply_and_advance")]
        work = [(self.sinks[name], list(batch.ops.get(name, {}).values())) for name in names]
        advanced: set[str] = set()
        rejected: list = []
        if len(work) == 1:
            rejected = self._apply_sink(*work[0], lsn, took, advanced, retry)
        elif work:
            futures = [self._pool.submit(self._apply_sink, s, ops, lsn, took, advanced, retry) for s, ops in work]
            for f in futures:
                rejected.extend(f.result())
        if (rejected or batch.dead_letters) and self.on_rejected is not None:
            self.on_rejected(batch, rejected)
        if lsn:
            self.checkpoint(lsn, retry=retry, skip=advanced)
        self.saturation.record(started, time.monotonic(), len(batch), took)
        time.sleep(0)  # let the reading thread run between batches

    def _apply_sink(self, sink: Sink, ops: list, lsn: int, took: dict[str, float], advanced: set[str],
                    retry: bool = True) -> list:
        """Apply ``ops`` to ``sink`` with retries; returns its rejected Ops. With ``lsn`` (int LSN,
        0 = none) and a sink that has ``apply_and_advance`` (one round trip for both, the
        checkpoint moving only if every Op was applied), also advances its views' checkpoints
        to ``lsn`` and adds the sink's name to ``advanced``. Raises like :meth:`checkpoint`."""
        started = time.monotonic()
        try:
            views = self.views_by_sink.get(sink.name)
            both = getattr(sink, "apply_and_advance", None)
            if not (lsn and views and both is not None):
                return apply_with_retry(sink, ops, self.stop) if retry else list(sink.apply(ops) or [])
            previous = self.acked_lsn
            call = lambda: both(ops, views, previous, lsn)  # noqa: E731
            rejected, lost = with_retry(f"sink {sink.name}", call, self.stop) if retry else call()
            if lost:
                raise SinkDataLoss.behind(sink.name, lost, previous)
            advanced.add(sink.name)
            return list(rejected)
        finally:
            took[sink.name] = time.monotonic() - started

    def checkpoint(self, lsn: int, retry: bool = True, skip: Collection[str] = ()) -> None:
        """Record in every sink that all its views are complete up to ``lsn`` (int LSN).

        Each checkpoint must still be at :attr:`acked_lsn` or later: if one is missing or
        behind, the sink lost data it had acknowledged and :class:`SinkDataLoss` is raised.
        With ``retry``, a retryable :class:`SinkError` (a sink down or hung) is retried with
        backoff until :attr:`stop`, like the batch itself (moving a checkpoint to ``lsn`` twice is
        harmless); without it the first :class:`SinkError` is raised. Sinks named in ``skip``
        are left alone (their checkpoints already moved with the batch's Ops).
        """
        for name, views in self.views_by_sink.items():
            if not views or name in skip:
                continue
            sink = self.sinks[name]
            advance = lambda: sink.advance_checkpoint(views, self.acked_lsn, lsn)  # noqa: E731
            lost = with_retry(f"sink {name} checkpoint", advance, self.stop) if retry else advance()
            if lost:
                raise SinkDataLoss.behind(name, lost, self.acked_lsn)
