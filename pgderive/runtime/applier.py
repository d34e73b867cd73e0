"""The sink side of a lane: apply one batch to one sink and settle what must be settled before
its position counts as acknowledged (ARCHITECTURE.md, "Lanes" and rules 2, 3 and 5).

An :class:`Applier` is what a lane runs, on a thread of the daemon (:class:`~pgderive.runtime.lanes.Lane`)
or in a process of its own (:class:`~pgderive.runtime.lane_process.ProcessLane`): the Ops,
then the dead letters, then the checkpoints, then the TRUNCATEs, then the new position. It
keeps no counters; the lane that owns it does.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence, TypeVar

from sinks.base import AtomicCheckpoint, LiveGenerations, Op, Rejected, Sink, SinkError, TruncatesBelow

from ..state.deadletters import DeadLetter, Supersede
from .batch import Batch, GenerationStep
from .checkpoints import SinkDataLoss, advance_checkpoints
from .retry import StopFlag, with_retry

__all__ = ["Applier", "DeadLetterSink"]

T = TypeVar("T")

#: ``record(dead letters, rejected Ops, supersedes)``: marks the dead letters the batch's later
#: changes superseded, then stores the new ones (``pgderive.dead_letters``), before the batch
#: that carried them is acknowledged and after its Ops were applied. Called from lane threads
#: (or a lane's process).
DeadLetterSink = Callable[[Sequence[DeadLetter], Sequence[Rejected], Sequence[Supersede]], None]


class Applier:
    """Applies batches of one sink's views, one at a time, on the calling thread.

    Args:
        sink: the sink.
        views: names of the views this sink serves (their checkpoints move with the batches).
        stop: retries give up once it is set (:func:`~pgderive.runtime.retry.with_retry`).
        acked_lsn: the position (int LSN) already acknowledged (the slot's confirmed LSN).
        record: stores a batch's dead letters and rejected Ops before it counts as
            acknowledged; None: they are dropped (tests).
        on_retry: called with each retryable error before its call is retried (counted for
            ``/metrics``).
        truncate_below: apply a batch's TRUNCATEs as ``truncate_below(view, version)``
            (:class:`~sinks.base.TruncatesBelow`: only records older than the TRUNCATE go,
            newer ones stay) instead of ``truncate``: derivation workers, whose TRUNCATE comes
            once per partition (ARCHITECTURE.md, "Kafka workers").

    Attributes:
        acked_lsn: every transaction ending at or before it (int LSN) is applied to the sink
            and its views' checkpoints are at least there.
    """

    def __init__(self, sink: Sink, views: Sequence[str], stop: StopFlag, *, acked_lsn: int = 0,
                 record: DeadLetterSink | None = None,
                 on_retry: Callable[[SinkError], None] | None = None,
                 truncate_below: bool = False) -> None:
        self.sink = sink
        self.truncate_below = truncate_below
        self.name = sink.name
        self.views = list(views)
        self.stop = stop
        self.acked_lsn = acked_lsn
        self.record = record
        self.on_retry = on_retry
        self._atomic = isinstance(sink, AtomicCheckpoint)

    def _call(self, what: str, fn: Callable[[], T], retry: bool) -> T:
        return with_retry(f"sink {self.name} {what}".rstrip(), fn, self.stop, self.on_retry,
                          fields={"sink": self.name}) if retry else fn()

    def apply(self, batch: Batch, *, retry: bool = True) -> dict[str, int]:
        """Apply the batch's generation steps (:meth:`step`), then its Ops, record its dead letters, advance the views' checkpoints to
        its position, apply its TRUNCATEs (in stream order, after the Ops), then move
        :attr:`acked_lsn` to ``batch.end_lsn`` (0: a batch without a position moves nothing).

        With ``retry`` a retryable :class:`~sinks.base.SinkError` is retried with backoff
        until :attr:`stop` (every step is idempotent, rule 2); without it the first one is
        raised. Returns view → Ops the sink rejected (recorded as dead letters). Raises :class:`~pgderive.runtime.checkpoints.SinkDataLoss` when a checkpoint
        was missing or behind :attr:`acked_lsn`, non-retryable ``SinkError``, and what
        ``record`` raises (``psycopg.Error``)."""
        sink, views = self.sink, self.views
        for step in batch.steps:
            self._call(f"{step.kind} of generation {step.generation}", lambda: self.step(step), retry)
        lsn = batch.end_lsn if batch.end_lsn > self.acked_lsn else 0  # 0: no checkpoint to advance
        ops: list[Op] = list(batch.ops.values())
        rejected: list[Rejected] = []
        advanced = False
        if lsn and views and self._atomic:
            # One round trip for the Ops and the checkpoints, which move only if every Op landed.
            assert isinstance(sink, AtomicCheckpoint)
            previous = self.acked_lsn
            rejected, lost = self._call("", lambda: sink.apply_and_advance(ops, views, previous, lsn), retry)
            if lost:
                raise SinkDataLoss.behind(self.name, lost, previous)
            advanced = True
        elif ops:
            rejected = self._call("", lambda: sink.apply(ops), retry)
        if (rejected or batch.dead_letters or batch.supersedes) and self.record is not None:
            self.record(batch.dead_letters, rejected, batch.supersedes)
        if lsn and not advanced and views:
            advance_checkpoints(sink, views, self.acked_lsn, lsn, self.stop, retry=retry, on_retry=self.on_retry)
        for view, version in batch.truncates:
            if self.truncate_below:
                below = sink
                if not isinstance(below, TruncatesBelow):
                    raise SinkError(f"sink {self.name} cannot truncate below a version", retryable=False)
                self._call(f"truncate of {view}", lambda: below.truncate_below(view, version), retry)
            else:
                self._call(f"truncate of {view}", lambda: sink.truncate(view, version), retry)
        if lsn:
            self.acked_lsn = lsn
        return dict(Counter(r.op.view for r in rejected)) if rejected else {}

    def step(self, step: GenerationStep) -> None:
        """Apply one generation step to the sink (ARCHITECTURE.md, "Online rebuild"): follow,
        commit or abort an online rebuild's generation. Nothing for a sink without
        :class:`~sinks.base.LiveGenerations` (its generations share the records), nor for a
        ``publish`` step (the reading thread did it; its batch carries the Ops). Raises
        :class:`~sinks.base.SinkError`."""
        sink = self.sink
        if not isinstance(sink, LiveGenerations) or step.kind == "publish":
            return
        if step.kind == "follow":
            sink.follow_generation(step.view, step.generation, exclusive=step.exclusive)
        elif step.kind == "commit":
            sink.commit_generation(step.view, step.generation, step.version)
        else:
            sink.abort_generation(step.view, step.generation)

    def checkpoint(self, lsn: int, *, retry: bool = True) -> None:
        """Record in the sink that every view is complete up to ``lsn`` (int LSN) and make it
        :attr:`acked_lsn`; nothing when ``lsn`` is not past it. See
        :func:`~pgderive.runtime.checkpoints.advance_checkpoints` for the data-loss check
        (raises :class:`~pgderive.runtime.checkpoints.SinkDataLoss`) and ``retry``."""
        if lsn <= self.acked_lsn:
            return
        advance_checkpoints(self.sink, self.views, self.acked_lsn, lsn, self.stop, retry=retry,
                            on_retry=self.on_retry)
        self.acked_lsn = lsn
