"""The streaming loop: slot → Transaction → views → Ops → one batch per lane → sinks.

The reading thread reads what the slot has, derives each change into Ops for every view of its
table and files them into the batch of the view's sink lane (:mod:`pgderive.runtime.lanes`).
A lane that is idle takes its batch at once; a busy lane's batch grows until the lane is free,
so every sink gets batches sized to its own speed and none waits for another. The slot is
confirmed at the minimum position all lanes acknowledged (ARCHITECTURE.md, rule 3). With
nothing pending anywhere, keepalives advance every checkpoint and the slot, so idle or
unwatched traffic never makes Postgres retain WAL.

Backpressure: a busy lane whose next batch is full (``batch_ops`` Ops or ``batch_bytes``
bytes) stops the reading; memory stays bounded by two batches per lane.

Provenance (ARCHITECTURE.md, "Provenance"): each transaction that produced work is handed to the
commit recorder, and the slot is confirmed no further than the oldest commit it has not stored.

TRUNCATE is a barrier for the lane of each emptied view: the Ops before it are applied, then
the sink drops every record of the view at or below the commit LSN, then the Ops after it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import orjson


from cdc.changes import Change, Transaction
from cdc.lsn import format_lsn
from cdc.refetch import RowRefetcher
from cdc.slot import ChangeReader, Keepalive
from sinks.base import Op, SinkError
from views.derive import DerivationError, View

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetter, identity_json
from .batch import Batch, GenerationStep, LagToken
from .lanes import Lanes, SinkLane
from .provenance import CommitRecorder
from .resolve import IncludeResolver
from .retry import StopFlag, one_line
from .stats import Stats

__all__ = ["Limits", "Stream", "StepReply", "row_refetcher"]

log = logging.getLogger("pgderive.stream")


def row_refetcher(dsn: str, views: Sequence[View]) -> RowRefetcher:
    """A :class:`~cdc.refetch.RowRefetcher` for the tables of ``views`` that stream row by row
    (columns and the key that finds a row again: primary key, else replica identity)."""
    tables = {}
    for v in views:
        if v.tree is None and v.table not in tables:
            tables[v.table] = (v.info.columns, v.info.primary_key or v.info.identity_columns)
    return RowRefetcher(dsn, tables)


class StepReply:
    """The reading thread's answer to :meth:`Stream.request_step`: :attr:`filed` is set once it
    took the step; :attr:`refused` then says why it did not file it (None: filed)."""

    def __init__(self) -> None:
        self.filed = threading.Event()
        self.refused: str | None = None

    def settle(self, refused: str | None) -> None:
        self.refused = refused
        self.filed.set()


@dataclass(frozen=True, slots=True)
class Limits:
    """Batch bounds of the stream.

    Attributes:
        batch_ops: a lane's batch is full at this many Ops.
        batch_bytes: … or at this many bytes (wal2json input of the transactions that added to
            it, plus re-derived records).
        direct_ops: a batch of at most this many Ops, for an idle lane, is applied on the
            reading thread (one attempt; the lane retries it if that fails).
        checkpoint_every: seconds between hand-overs of a batch that only moves a lane's
            position (its sink got no Ops meanwhile): bounds the checkpoint writes a quiet
            sink gets while another sink is busy.
        linger: seconds the batch of a lane whose sink shows writes only after a refresh
            interval (:class:`~sinks.base.Refreshable`: OpenSearch, 1 s by default) may wait for
            more Ops after the lane's previous hand-over, unless it is full: fewer, larger
            requests cost the sink and the reading process less CPU, which on a shared machine
            is CPU the other lanes get, and the sink's readers see no difference.
    """

    batch_ops: int = 20_000
    batch_bytes: int = 8 << 20
    direct_ops: int = 500
    checkpoint_every: float = 0.1
    linger: float = 0.05


class Stream:
    """Reads a slot and keeps every lane fed until stopped (see the module docstring).

    Args:
        views: the bound views.
        lanes: one lane per sink the views use, positioned at the slot's confirmed LSN.
        stats: the run's counters (transactions and changes are counted as they are read).
        stop: set it to stop gracefully: what was read is applied and confirmed, waiting up to
            ``stop_grace`` seconds for the sinks to acknowledge it.
        refetcher: reads rows back from the source (non-finite numbers, ``where``/``derive``
            views' unchanged TOAST values, include records); None when no view needs it.
        aggregates: the aggregate state store; None when no view aggregates.
        limits: batch bounds.
        on_tick: called on the reading thread after every read (e.g. to write stats).
        open_dead_letters: view → identities (:func:`~pgderive.state.deadletters.identity_json`)
            of rows with open dead letters (:meth:`DeadLetterStore.open_rows`): a later change
            of such a row supersedes them. Kept up to date as the stream
            records and supersedes dead letters.
        stop_grace: seconds a stop waits for the sinks' acknowledgements (default 5). A sink
            that is hung or retrying keeps its batch unacknowledged: the slot is confirmed only
            up to what every sink acknowledged (rule 3), so it replays on the next start.
        held: names of views whose changes are not derived until a ``follow`` step of theirs
            is filed (:meth:`request_step`): a new or changed view waiting for its online
            rebuild's generation (ARCHITECTURE.md, "Online rebuild"; the rebuild's snapshot,
            taken after that step, covers what was skipped).
        truncated: view name → commit LSN of the last TRUNCATE that emptied it, kept up to date
            by the stream (shared with the daemon, across streams).
        provenance: records the xid and commit timestamp of every transaction that produced
            work (:class:`~pgderive.runtime.provenance.CommitRecorder`, started and closed by the
            caller); the slot is confirmed only past commits it stored. None: not recorded.
        worker: the reader is a derivation worker's (:class:`cdc.kafka_source.KafkaReader`,
            ARCHITECTURE.md, "Kafka workers"): transactions come in order per partition only,
            and a TRUNCATE once per partition. Then a TRUNCATE at V drops only pending Ops
            older than V (the lanes apply it with ``truncate_below``), and every change of an
            emptied view older than the newest TRUNCATE read is skipped: the TRUNCATE removed
            that row, whose later state (if any) has a newer version. Aggregate views move their
            groups under per-group locks and write them at per-group versions
            (:meth:`AggregateStore.apply_worker`); their TRUNCATE rewrites every group
            (:meth:`AggregateStore.truncate_worker`).
    """

    def __init__(self, views: Sequence[View], lanes: Lanes, *, stats: Stats, stop: StopFlag,
                 refetcher: RowRefetcher | None = None, aggregates: AggregateStore | None = None,
                 limits: Limits = Limits(), on_tick: Callable[[], None] | None = None,
                 open_dead_letters: dict[str, set[str]] | None = None,
                 stop_grace: float = 5.0, held: set[str] | None = None,
                 truncated: dict[str, int] | None = None, provenance: CommitRecorder | None = None,
                 worker: bool = False) -> None:
        self.views = list(views)
        self.worker = worker
        self.provenance = provenance
        self.by_name = {v.name: v for v in self.views}
        self.position = 0  # commit LSN of the last transaction read
        self.held: set[str] = set(held or ())
        self.truncated: dict[str, int] = truncated if truncated is not None else {}
        #: (sink, step, reply) filed by other threads, taken by the reading thread.
        self._steps: queue.SimpleQueue[tuple[str, GenerationStep, StepReply]] = queue.SimpleQueue()
        self._open_dead: dict[str, set[str]] = {k: set(v) for k, v in (open_dead_letters or {}).items() if v}
        self.stop_grace = stop_grace
        self.lanes = lanes
        self.stats = stats
        self.stop = stop
        self.refetcher = refetcher
        self.aggregates = aggregates
        self.limits = limits
        self.on_tick = on_tick
        by_table: dict[str, list[View]] = defaultdict(list)
        for v in self.views:
            for t in sorted(v.tables):  # a query-derived view also listens to its included tables
                by_table[t].append(v)
        self.by_table = dict(by_table)
        simple: dict[str, list[View]] = defaultdict(list)
        for v in self.views:
            if v.tree is None:
                simple[v.table].append(v)
        self._used_columns = {t: frozenset(c for v in vs for c in v.columns) for t, vs in simple.items()}
        self._full_row_tables = {t for t, vs in simple.items() if any(v.needs_full_row for v in vs)}
        tree_views = [v for v in self.views if v.tree is not None]
        self.resolver: IncludeResolver | None = None
        if tree_views:
            if refetcher is None or aggregates is None:
                raise ValueError("include/aggregate views need a refetcher and an aggregate store")
            self.resolver = IncludeResolver(tree_views, refetcher, aggregates, worker=worker)
        self.pending: dict[str, Batch] = {lane.name: Batch(end_lsn=lane.acked_lsn) for lane in lanes}
        self._handed: dict[str, float] = {lane.name: 0.0 for lane in lanes}
        self._touched: set[str] = set()  # lanes the current transaction produced work for
        self._seq = 0  # numbers change-log Ops so that a batch keeps each one (views.changelog)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, reader: ChangeReader) -> None:
        """Read, derive and hand batches to the lanes until :attr:`stop` is set or the stream
        fails; then apply and confirm what was read. Raises what a lane raised
        (:class:`~sinks.base.SinkError`, :class:`~pgderive.runtime.checkpoints.SinkDataLoss`),
        and the reader's errors (:class:`cdc.slot.ReplicationError`)."""
        lanes = self.lanes
        last_idle_checkpoint = 0.0
        stats = self.stats
        while True:
            stats.alive()
            if not self.stop.is_set():  # stopping: a lane's retry gave up because of it; see _finish
                lanes.raise_error()
            if self.provenance is not None and self.provenance.error is not None:
                raise self.provenance.error
            reader.confirm(self.confirmable)
            if self._hand_over():
                reader.confirm(self.confirmable)
            if self.stop.is_set():
                break
            if self._blocked():
                # Backpressure: a busy lane's next batch is full; wait for it, keep the
                # walsender informed meanwhile.
                t0 = time.monotonic()
                if self.provenance is not None and self.provenance.full:
                    self.provenance.wait_room(1.0)
                else:
                    lanes.wait_change(1.0)
                stats.backpressure_s += time.monotonic() - t0
                if self._blocked():
                    reader.send_status()
                continue
            for event in reader.read(max_wait=self._read_wait(), max_events=self.limits.batch_ops):
                if isinstance(event, Keepalive):
                    if (event.wal_end > lanes.acked_lsn and reader.at_transaction_boundary and self._quiet()
                            and time.monotonic() - last_idle_checkpoint >= 1.0):
                        # Nothing pending: the sinks are complete up to walEnd. Record it,
                        # then let the slot go (rule 3: unwatched traffic frees WAL).
                        last_idle_checkpoint = time.monotonic()
                        if self._idle_checkpoint(event.wal_end):
                            reader.confirm(event.wal_end)
                    continue
                if self.add_transaction(event):
                    break  # a batch is full: hand it over (or wait for its lane) before reading on
            self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, self.confirmable)
            if self.on_tick is not None:
                self.on_tick()
        self._finish()
        reader.confirm(self.confirmable)
        reader.send_status()
        self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, self.confirmable)

    @property
    def confirmable(self) -> int:
        """The position (int LSN) the slot may be confirmed to: what every lane acknowledged,
        capped at the oldest commit the provenance recorder has not stored yet (rule 3)."""
        acked = self.lanes.acked_lsn
        bound = self.provenance.bound() if self.provenance is not None else None
        return acked if bound is None else min(acked, bound)

    def _finish(self) -> None:
        """Stopping: apply what was read, waiting at most :attr:`stop_grace` seconds for the
        sinks. A sink that does not acknowledge in time (hung, or retrying an outage: its retry
        gives up once stopped) is left behind with a warning; its unacknowledged changes are
        not confirmed to the slot and replay on the next start. Raises a lane's
        non-retryable error."""
        try:
            t0 = time.monotonic()
            done = self.drain(timeout=self.stop_grace)
            if done and self.provenance is not None:
                self.provenance.wait_idle(max(0.0, self.stop_grace - (time.monotonic() - t0)))
        except SinkError as e:
            if not e.retryable:
                raise
            log.warning("stopping: %s; what it did not acknowledge replays on the next start", one_line(e))
            return
        if not done:
            late = [lane.name for lane in self.lanes if not lane.idle]
            log.warning("stopping: sink(s) %s did not acknowledge within %g s; their unacknowledged"
                        " changes replay on the next start", ", ".join(late), self.stop_grace,
                        extra={"sink": ",".join(late)})

    def drain(self, timeout: float | None = None) -> bool:
        """Apply everything read so far and wait until every lane acknowledged it: True. With
        ``timeout`` (seconds), False once it has passed with a lane still busy."""
        lanes = self.lanes
        deadline = None if timeout is None else time.monotonic() + timeout
        if not lanes.wait_idle(deadline):
            return False
        self._resolve()
        for lane in lanes:
            batch = self.pending[lane.name]
            if batch.has_data or batch.end_lsn > lane.acked_lsn:
                self.pending[lane.name] = batch.successor()
                lanes.submit(lane.name, batch)
        return lanes.wait_idle(deadline)

    # -- deriving ----------------------------------------------------------------------------------
    def add_transaction(self, tx: Transaction) -> bool:
        """Derive ``tx`` (or one chunk of a large transaction) into the lanes' batches; True
        when a batch it added to is now full (hand it over before reading on)."""
        version = tx.commit_lsn
        self.position = max(self.position, version)
        pending, touched = self.pending, self._touched
        full_rows = self._full_row_tables
        table_changes = self.stats.table_changes
        for change in tx.changes:
            views = self.by_table.get(change.table)
            if not views:
                continue
            table_changes[change.table] = table_changes.get(change.table, 0) + 1
            if change.kind == "truncate":
                emptied = [v for v in views if v.table == change.table]
                for v in emptied:
                    self.truncated[v.name] = max(version, self.truncated.get(v.name, 0)) if self.worker else version
                emptied = [v for v in emptied if v.name not in self.held]
                if emptied:
                    self._truncate(emptied, version, tx.xid)
                    touched.update(v.sink for v in emptied)
                for v in views:
                    if v.tree is not None and v.table != change.table and v.name not in self.held:
                        assert self.resolver is not None
                        self.resolver.note_emptied(v, version, tx.xid)  # an included table emptied
                        touched.add(v.sink)
                continue
            # Most changes need no read-back: test that inline (this loop runs per change).
            gone = (change.new is not None and (change.maybe_nonfinite or change.table in full_rows)
                    and self._refetch(change, tx.xid))
            for v in views:
                if v.name in self.held:
                    continue
                if self.worker and version < self.truncated.get(v.name, 0):
                    continue  # older than a TRUNCATE of the view read from another partition
                if v.publisher is not None:
                    # A change log (views.changelog): every change, in stream order, never collapsed.
                    self._seq += 1
                    batch = pending[v.sink]
                    for op in v.publisher.change_ops(change, tx, self._seq):
                        batch.add(op)
                    touched.add(v.sink)
                    continue
                if v.tree is not None:
                    assert self.resolver is not None
                    self.resolver.note(v, change, version, tx.xid)
                    touched.add(v.sink)
                    continue
                if self._open_dead and v.name in self._open_dead:
                    self._supersede(v, change, version)
                if gone and v.needs_full_row:
                    continue
                try:
                    ops = v.change_ops(change, version)
                except DerivationError as e:
                    pending[v.sink].dead_letters.append(self._dead_letter(v, e, version))
                    touched.add(v.sink)
                    continue
                if ops:
                    batch = pending[v.sink]
                    for op in ops:
                        batch.add(op)
                    touched.add(v.sink)
        self.stats.changes += len(tx.changes)
        full = False
        for name in touched:
            batch = pending[name]
            batch.nbytes += tx.nbytes
            full = full or self._full(batch)
        if not tx.final:
            return full  # a chunk of a large transaction: applied, not confirmable
        self.stats.transactions += 1
        self.stats.read_lsn = tx.end_lsn
        for batch in pending.values():
            batch.end_lsn = tx.end_lsn
        if touched and tx.commit_time is not None:
            t = tx.commit_time.timestamp()
            if self.provenance is not None:
                self.provenance.add(version, tx.xid, t)
            self.stats.read_lag_ms.add_one((time.time() - t) * 1000.0)
            if len(touched) == 1:
                pending[next(iter(touched))].commit_times.append(t)
            else:
                token = LagToken(t, len(touched))
                for name in touched:
                    pending[name].shared.append(token)
        touched.clear()
        return full

    def _dead_letter(self, view: View, err: DerivationError, version: int) -> DeadLetter:
        """The dead letter of a row ``view`` could not derive: only the columns the view reads,
        the row's identity (watched from now on, so a later change supersedes it)."""
        dead = DeadLetter.for_view(view, err, version)
        if dead.identity is not None:
            self._open_dead.setdefault(view.name, set()).add(identity_json(dead.identity))
        return dead

    def _supersede(self, view: View, change: Change, version: int) -> None:
        """``change`` is a later change of a row of ``view``: if that row (by its old or new
        identity) has open dead letters, they are superseded at ``version`` — pending ones in
        the batch at once, stored ones when the lane applies the batch (after its Ops)."""
        open_rows = self._open_dead[view.name]
        seen: list[dict[str, Any]] = []
        for row in (change.old_key, change.new):
            ident = view.row_identity(row)
            if ident is not None and ident not in seen:
                seen.append(ident)
                text = identity_json(ident)
                if text in open_rows:
                    open_rows.discard(text)
                    self.pending[view.sink].supersede(view.name, text, ident, version)
                    self._touched.add(view.sink)
        if not open_rows:
            del self._open_dead[view.name]

    def _refetch(self, change: Change, xid: int) -> bool:
        """Complete ``change`` from the table where wal2json cannot carry a value (non-finite
        numbers, unchanged TOAST values of views that need whole rows); True when the row is
        gone (its delete is ahead in the stream) and a needed value is missing."""
        used = self._used_columns.get(change.table)
        if change.new is None or not used or not (change.maybe_nonfinite or change.table in self._full_row_tables):
            return False
        fetch = [c for c in change.maybe_nonfinite if c in used]
        if change.table in self._full_row_tables:
            fetch += [c for c in used if c not in change.new]
        if not fetch:
            return False
        assert self.refetcher is not None
        self.refetcher.wait_visible((xid,))
        if self.refetcher.fill(change, fetch):
            return False
        return any(c not in change.new for c in fetch)

    def _resolve(self) -> None:
        """Read back the include/aggregate records the batches touched (before any lane gets a
        batch whose position covers their changes)."""
        if self.resolver is not None and self.resolver.pending:
            self.resolver.resolve(self._emit)

    def _emit(self, view: View, ops: Sequence[Op], errors: Sequence[DerivationError], version: int) -> None:
        """Add re-derived Ops; when they pile up past ``batch_bytes`` (a category rename can
        touch every product), hand them to the lane at once without a position, so memory
        stays bounded by the batch size, not by the fan-out."""
        batch = self.pending[view.sink]
        floor = self.truncated.get(view.name, 0) if self.worker else 0
        for op in ops:
            if op.version < floor:
                continue
            batch.add(op)
            batch.nbytes += 64 + (len(orjson.dumps(op.doc)) if op.doc is not None else 0)
        batch.dead_letters += [DeadLetter.for_view(view, e, version) for e in errors]
        if batch.nbytes >= self.limits.batch_bytes:
            self.lanes.submit(view.sink, batch.take_ops())

    def _truncate(self, views: list[View], version: int, xid: int | None = None) -> None:
        """TRUNCATE barrier: pending Ops of the emptied views are dropped (the TRUNCATE removes
        them anyway; a change log's are kept), the rest of each affected lane's batch is handed over with the TRUNCATEs
        after its Ops; later Ops go into the next batch. ``version``: the transaction's commit
        LSN (int); ``xid``: its id (for the log line), if known."""
        for v in views:
            if self.worker:
                self.pending[v.sink].drop_older(v.name, version)
            elif v.publisher is not None:
                # A change log keeps the changes of earlier transactions, and drops those of the
                # TRUNCATE's own transaction before it (ARCHITECTURE.md, "Kafka").
                self.pending[v.sink].drop_transaction(v.name, version)
            else:
                self.pending[v.sink].drop_view(v.name)
        self._resolve()
        for v in views:
            if v.aggregation is not None:
                assert self.aggregates is not None
                if self.worker:
                    # Every group is written again at a version at or above the TRUNCATE's, so
                    # truncate_below leaves it (ARCHITECTURE.md, "Kafka workers").
                    moved = self.aggregates.truncate_worker(v.name, v.aggregation, version)
                    self._emit(v, *v.group_ops(moved.rows, moved.touched, version, moved.versions), version)
                else:
                    self.aggregates.truncate(v.name, v.aggregation, version)
        for name in dict.fromkeys(v.sink for v in views):
            batch = self.pending[name]
            batch.truncates += [(v.name, version) for v in views if v.sink == name]
            self.pending[name] = batch.successor()
            self._handed[name] = time.monotonic()
            self.lanes.submit(name, batch)
        for v in views:
            log.info("TRUNCATE of %s empties view %s at %s", v.table, v.name, format_lsn(version),
                     extra={"view": v.name, "table": v.table, "sink": v.sink, "lsn": version, "xid": xid})

    # -- handing batches to lanes ----------------------------------------------------------------
    def _has_work(self, lane: SinkLane, now: float) -> bool:
        batch = self.pending[lane.name]
        waited = now - self._handed[lane.name]
        if batch.has_data:
            return not lane.lingers or waited >= self.limits.linger or bool(batch.truncates) or self._full(batch)
        return batch.end_lsn > lane.acked_lsn and waited >= self.limits.checkpoint_every

    def request_step(self, sink: str, step: GenerationStep) -> StepReply:
        """File ``step`` for the lane of ``sink`` (any thread): the reading thread adds it to
        that lane's next batch, ahead of its Ops; a ``follow`` step also releases the view from
        :attr:`held` at that point of the stream. A ``commit`` step is refused (not filed) when
        a TRUNCATE emptied the view after the generation's consistent point: the generation
        holds rows the TRUNCATE removed. The reply says which; the lane's ``steps_done``
        reaches ``step.seq`` once its sink applied it."""
        reply = StepReply()
        self._steps.put((sink, step, reply))
        return reply

    def _take_steps(self) -> None:
        while True:
            try:
                sink, step, reply = self._steps.get_nowait()
            except queue.Empty:
                return
            truncated = self.truncated.get(step.view, 0)
            if step.kind in ("commit", "publish") and truncated > step.version:
                reply.settle(f"a TRUNCATE emptied view {step.view} at {format_lsn(truncated)}, after "
                             f"the snapshot at {format_lsn(step.version)}")
                continue
            try:
                self._step(step)
            except Exception as e:  # the rebuild fails; the stream goes on
                log.error("generation step %s of view %s failed: %s", step.kind, step.view, one_line(e),
                          extra={"view": step.view, "sink": sink, "lsn": step.version})
                reply.settle(f"{step.kind} failed: {one_line(e)}")
                continue
            self.pending[sink].steps.append(step)
            reply.settle(None)

    def _step(self, step: GenerationStep) -> None:
        """The reading thread's part of a generation step: a ``follow`` releases a held view
        (and, for an aggregate view, feeds its rebuilt state from here on); a ``publish``
        makes the rebuilt state live and writes every group at the current position; an
        ``abort`` stops feeding it (and holds a new or changed definition again)."""
        resolver = self.resolver
        if step.kind == "follow":
            self.held.discard(step.view)
            if step.state is not None and resolver is not None:
                resolver.shadows[step.view] = (step.state, step.exclusive)
        elif step.kind == "abort":
            if resolver is not None:
                resolver.shadows.pop(step.view, None)
            if step.exclusive:
                self.held.add(step.view)
        elif step.kind == "publish":
            view = self.by_name[step.view]
            assert resolver is not None and self.aggregates is not None and view.aggregation is not None
            assert step.state is not None
            self._resolve()  # everything read so far into both states
            self.aggregates.swap(step.state, view.name)
            resolver.shadows.pop(view.name, None)
            version = max(self.position, step.version)
            groups = self.aggregates.all_groups(view.name, view.aggregation)
            self._emit(view, *view.group_ops(groups, [], version), version)
            log.info("view %s: rebuilt state live, %d groups written at %s", view.name, len(groups),
                     format_lsn(version), extra={"view": view.name, "sink": view.sink, "lsn": version})

    def _hand_over(self) -> bool:
        """Give every idle lane with work its batch; True if any got one."""
        if not self._steps.empty():
            self._take_steps()
        now = time.monotonic()
        ready = [lane for lane in self.lanes if lane.idle and self._has_work(lane, now)]
        if not ready:
            return False
        if self.resolver is not None and self.resolver.pending:
            self._resolve()
            ready = [lane for lane in self.lanes if lane.idle and self._has_work(lane, now)]
        for lane in ready:
            batch = self.pending[lane.name]
            self.pending[lane.name] = batch.successor()
            self._handed[lane.name] = now
            # A small batch for a fast sink is applied here: handing it to the lane's thread and
            # noticing its end would cost two thread wake-ups for nothing to overlap.
            direct = lane.fast and not batch.truncates and len(batch) <= self.limits.direct_ops
            if not (direct and lane.apply_direct(batch)):
                lane.submit(batch)
        return True

    def _full(self, batch: Batch) -> bool:
        return len(batch) >= self.limits.batch_ops or batch.nbytes >= self.limits.batch_bytes

    def _blocked(self) -> bool:
        """True when a busy lane's next batch is full, or the provenance recorder holds too
        many commits not stored yet (the reader must wait for it)."""
        if self.provenance is not None and self.provenance.full:
            return True
        return any(not lane.idle and self._full(self.pending[lane.name]) for lane in self.lanes)

    def _quiet(self) -> bool:
        """Nothing read is unacknowledged: every lane idle and at its batch's position."""
        if self.resolver is not None and self.resolver.pending:
            return False
        if self.provenance is not None and not self.provenance.idle:
            return False
        return all(lane.idle and not self.pending[lane.name].has_data
                   and self.pending[lane.name].end_lsn <= lane.acked_lsn for lane in self.lanes)

    def _read_wait(self) -> float:
        """How long the next read may wait for the first message (seconds): short while some
        batch has data to hand over, long when everything is acknowledged."""
        if (self.resolver is not None and self.resolver.pending) or any(
                b.has_data for b in self.pending.values()):
            return 0.002
        if self.provenance is not None and not self.provenance.idle:
            return 0.01  # confirm as soon as the recorder stored them
        if any(b.end_lsn > lane.acked_lsn or not lane.idle for lane, b in
               ((lane, self.pending[lane.name]) for lane in self.lanes)):
            return self.limits.checkpoint_every
        return 0.5

    def _idle_checkpoint(self, lsn: int) -> bool:
        """Checkpoint every view at ``lsn`` (int LSN, a keepalive's walEnd) while nothing is
        pending. Only an optimisation (it lets the slot free WAL nobody watches), so a sink that
        is down is not waited for: False after a retryable :class:`SinkError` (logged), True once
        every lane recorded it. Raises :class:`~pgderive.runtime.checkpoints.SinkDataLoss` and
        non-retryable :class:`SinkError`."""
        for lane in self.lanes:
            try:
                lane.checkpoint(lsn, retry=False)
            except SinkError as e:
                if not e.retryable:
                    raise
                log.warning("idle checkpoint of sink %s at %s skipped: %s", lane.name, format_lsn(lsn), one_line(e),
                            extra={"sink": lane.name, "lsn": lsn})
                return False
        return True
