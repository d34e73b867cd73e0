"""The engine loop: slot → Transaction → view → Op → sink → flush.

One daemon, one slot. The loop reads what the slot has (:meth:`cdc.slot.SlotReader.read`),
derives Ops per view, collapses them in a :class:`~pgderive.runtime.batch.Batch`, applies the batch to
every sink and only then confirms the last transaction's end LSN to the slot (DESIGN.md rule
3). With nothing pending, keepalives advance the slot so idle or unwatched traffic never makes
Postgres retain WAL. A dropped replication connection is retried with capped backoff and
resumes from the slot's confirmed position; a failing sink is retried the same way while the
stream waits (backpressure: nothing is read meanwhile).
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Iterable

import orjson
import psycopg

from cdc.changes import Change, Transaction
from cdc.lsn import format_lsn
from cdc.refetch import RowRefetcher
from cdc.slot import Keepalive, ReplicationError, SlotInfo, SlotReader, slot_info
from cdc.snapshot import snapshot_connection
from sinks.base import Sink, SinkError
from views.check import build_views
from views.derive import DerivationError, View, view_fingerprint
from views.spec import Spec

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetter, DeadLetterStore
from ..state.slots import StateStore
from .batch import Batch
from .bootstrap import Interrupted, load_snapshot
from .errors import EngineError
from .lanes import Backoff, Flusher, SinkDataLoss, with_retry
from .reload import reload_views
from .sinks import open_sinks
from .stats import Stats

__all__ = ["Engine", "EngineError"]

log = logging.getLogger("pgderive.engine")





class Engine:
    """The daemon behind ``pgderive run``.

    Args:
        spec: the loaded YAML spec.
        stop: set it (e.g. from a signal handler) to stop gracefully after flushing.
        stats_file: if given, a JSON summary of :class:`Stats` is written there every few
            seconds and at exit.
        direct_ops: a batch of at most this many Ops, found while the flusher is idle, is
            applied on the reading thread (one attempt; the flusher retries it if that fails).
    """

    def __init__(self, spec: Spec, *, stop: threading.Event | None = None,
                 stats_file: str | None = None, batch_ops: int = 20_000,
                 batch_bytes: int = 8 << 20, direct_ops: int = 500) -> None:
        self.spec = spec
        self.dsn = spec.source.dsn
        self.slot = spec.source.slot
        self.stop = stop or threading.Event()
        self.stats_file = stats_file
        self.batch_ops = batch_ops
        self.batch_bytes = batch_bytes
        self.direct_ops = direct_ops
        self.stats = Stats()
        self.state = StateStore(self.dsn)
        self.dead_letters = DeadLetterStore(self.dsn)
        self.aggregates = AggregateStore(self.dsn)
        self.views: list[View] = []
        self.by_table: dict[str, list[View]] = {}
        self.sinks: dict[str, Sink] = {}
        self.reader: SlotReader | None = None
        self.refetcher: RowRefetcher | None = None
        self._used_columns: dict[str, frozenset[str]] = {}
        self.flusher: Flusher | None = None
        self._last_stats_write = 0.0

    # -- startup -----------------------------------------------------------------------------
    def run(self, *, resnapshot: bool = False) -> None:
        """Bootstrap if needed, then stream until :attr:`stop` is set.

        Raises :class:`EngineError` for conditions that need an operator (slot vanished,
        another daemon active, views changed), :class:`~views.spec.SpecError` for bad YAML.
        """
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.views = build_views(self.spec, conn)
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
        self.refetcher = RowRefetcher(self.dsn, {t: (vs[0].info.columns, vs[0].info.primary_key or vs[0].info.identity_columns)
                                                 for t, vs in simple.items()})
        self.sinks = open_sinks(self.spec, self.views)
        self.reader = SlotReader(self.dsn, self.slot, tables=self.by_table)
        try:
            start_lsn = self._prepare(resnapshot)
            if start_lsn is None:
                return
            self._stream(start_lsn)
        finally:
            self._write_stats(force=True)
            self.reader.close()
            self.refetcher.close()
            self.aggregates.close()
            for s in self.sinks.values():
                s.close()

    def _fingerprints(self) -> dict[str, str]:
        return {v.name: view_fingerprint(v) for v in self.views}

    def _prepare(self, resnapshot: bool) -> int | None:
        """Decide between bootstrap and resume; returns the LSN to stream from (0 = slot's)."""
        self.state.ensure_schema()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            info = slot_info(conn, self.slot)
            state = self.state.get(self.slot)
            if info is not None and info.active:
                raise EngineError(f"slot {self.slot} is in use by another process (pid {info.active_pid}); "
                                  "is another pgderive running?")
            if resnapshot:
                # Mark the state first: a crash between the two steps then resumes as an
                # interrupted bootstrap instead of looking like a vanished slot.
                self.state.set(self.slot, "bootstrapping", 0, self._fingerprints())
                if info is not None:
                    log.warning("--resnapshot: dropping slot %s", self.slot)
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                info = state = None
            if info is None:
                if state is not None and state.status == "streaming":
                    raise EngineError(
                        f"slot {self.slot} vanished (pgderive bootstrapped it at "
                        f"{format_lsn(state.consistent_point)}); changes since then may be lost. "
                        "Run `pgderive run --resnapshot` to rebuild every view from a new snapshot.")
                return self._bootstrap()
            if state is None:
                raise EngineError(
                    f"slot {self.slot} exists but pgderive has no record of bootstrapping it "
                    "(pgderive.slot_state); refusing to stream from an unknown position. "
                    "Run `pgderive run --resnapshot` to start over.")
            if state.status == "bootstrapping":
                log.warning("a previous bootstrap of slot %s did not finish; starting it again", self.slot)
                conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                return self._bootstrap()
        changed = [n for n, fp in self._fingerprints().items() if state.views.get(n) != fp]
        if changed:
            raise EngineError(
                f"view(s) {', '.join(changed)} are new or changed since slot {self.slot} was "
                "bootstrapped; run `pgderive rebuild -c FILE VIEW` for each (daemon stopped) "
                "or `pgderive run --resnapshot`.")
        lost = self._lost_views(info.confirmed_flush_lsn or 0)
        if lost:
            log.warning("sink data of view(s) %s is missing or behind the slot (sink restarted "
                        "without its data?); rebuilding them first", ", ".join(v.name for v in lost))
            self._rebuild(lost)
        log.info("resuming slot %s from its confirmed position %s", self.slot,
                 format_lsn(info.confirmed_flush_lsn or 0))
        return 0

    def _bootstrap(self) -> int | None:
        """Create the slot with an exported snapshot, load every view, record the state."""
        assert self.reader is not None
        fps = self._fingerprints()
        self.state.set(self.slot, "bootstrapping", 0, fps)
        self.reader.connect()
        consistent_point, snapshot = self.reader.create_slot()
        self.state.set(self.slot, "bootstrapping", consistent_point, fps)
        try:
            with snapshot_connection(self.dsn, snapshot) as conn:
                stats = load_snapshot(conn, self.views, self.sinks, consistent_point, aggregates=self.aggregates,
                                      should_stop=self.stop.is_set,
                                      on_dead_letters=lambda e: self.dead_letters.record(self.slot, e))
        except Interrupted as e:
            log.warning("%s; the next start redoes the bootstrap", e)
            return None
        self.stats.snapshot = {
            "consistent_point": format_lsn(consistent_point),
            "tables": {t: {"rows": n, "seconds": round(stats.seconds[t], 2),
                           "rows_per_s": round(stats.rows_per_second(t))} for t, n in stats.rows.items()},
            # Per view: records written and the time its sink spent writing them (loads of
            # different sinks overlap, so these rates are each sink's own throughput).
            "views": {v: {"records": n, "sink_seconds": round(stats.sink_seconds.get(v, 0.0), 2),
                          "sink_records_per_s": round(n / stats.sink_seconds[v]) if stats.sink_seconds.get(v) else None}
                      for v, n in stats.records.items()},
        }
        self.state.set(self.slot, "streaming", consistent_point, fps)
        log.info("bootstrap done at consistent point %s", format_lsn(consistent_point))
        return consistent_point

    # -- streaming ---------------------------------------------------------------------------
    def _stream(self, start_lsn: int) -> None:
        reader = self.reader
        assert reader is not None
        backoff = Backoff()
        connected = reader.conn is not None
        # Everything allocated so far (modules, spec, views, catalog) lives as long as the
        # daemon: keep it out of the cyclic GC, whose full collections otherwise walk it all
        # (~26 ms for the 85k objects of the imports alone), a stall in the lag's tail.
        gc.collect()
        gc.freeze()
        while not self.stop.is_set():
            try:
                if not connected:
                    reader.connect()
                    info = self._check_slot()
                    reader.confirmed_lsn = info.confirmed_flush_lsn or 0
                    start_lsn = 0  # resume from the slot's confirmed position
                reader.start(start_lsn)
                connected = True
                backoff.reset()
                self._loop(reader)
            except (ReplicationError, psycopg.OperationalError) as e:
                if self.stop.is_set():
                    break
                delay = backoff.next()
                log.warning("replication connection lost (%s); reconnecting in %.1f s", _one_line(e), delay)
                connected = False
                reader.close()
                self.stop.wait(delay)
            except SinkDataLoss as e:
                log.error("%s; rebuilding them from a new snapshot, then resuming", e)
                connected = False
                reader.close()
                self._rebuild([v for v in self.views if v.name in e.views])
        log.info("stopped at confirmed LSN %s", format_lsn(reader.confirmed_lsn))

    def _check_slot(self) -> SlotInfo:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            info = slot_info(conn, self.slot)
        if info is None:
            raise EngineError(f"slot {self.slot} vanished while pgderive was streaming; "
                              "run `pgderive run --resnapshot` to rebuild from a new snapshot")
        return info

    def _rebuild(self, views: list[View]) -> None:
        """Reload ``views`` from a fresh snapshot into the engine's own sinks (the main slot
        is not being read meanwhile; its replay afterwards converges by versions)."""
        reload_views(self.dsn, self.slot, views, self.sinks, self.dead_letters)

    def _views_by_sink(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for v in self.views:
            out[v.sink].append(v.name)
        return dict(out)

    @staticmethod
    def _idle_checkpoint(flusher: Flusher, lsn: int) -> bool:
        """Checkpoint every view at ``lsn`` (int LSN, a keepalive's walEnd) while nothing is
        pending. Only an optimisation (it lets the slot free WAL nobody watches), so a sink
        that is down is not waited for here: returns False after a retryable
        :class:`SinkError` (logged), True once recorded. Raises :class:`SinkDataLoss` and
        non-retryable :class:`SinkError`."""
        try:
            flusher.checkpoint(lsn, retry=False)
        except SinkError as e:
            if not e.retryable:
                raise
            log.warning("idle checkpoint at %s skipped: %s", format_lsn(lsn), " ".join(str(e).split())[:300])
            return False
        return True

    def _lost_views(self, confirmed: int) -> list[View]:
        """Views whose sink no longer holds everything the slot was confirmed for.

        Raises :class:`EngineError` when every view's checkpoint exists but is behind the
        slot: then the slot moved without pgderive (dropped and recreated, or consumed by
        another client), and streaming from it would silently skip changes."""
        behind, missing = [], []
        for v in self.views:
            cp = self.sinks[v.sink].read_checkpoint(v.name)
            if cp is None:
                missing.append(v)
            elif cp < confirmed:
                behind.append((v, cp))
        if behind and len(behind) == len(self.views):
            raise EngineError(
                f"slot {self.slot} is confirmed at {format_lsn(confirmed)}, past everything the sinks "
                f"acknowledged (e.g. view {behind[0][0].name} at {format_lsn(behind[0][1])}): the slot "
                "was recreated or consumed by another client. Run `pgderive run --resnapshot`.")
        return missing + [v for v, _ in behind]

    def _loop(self, reader: SlotReader) -> None:
        """Read, derive and hand batches to the flusher until stopped or the stream fails."""
        flusher = Flusher(self.sinks, self.stop, self._applied, self._rejected,
                          views_by_sink=self._views_by_sink(), acked_lsn=reader.confirmed_lsn)
        self.flusher = flusher
        batch = Batch()
        last_idle_checkpoint = 0.0
        try:
            while True:
                if flusher.error is not None:
                    raise flusher.error
                if flusher.idle:
                    reader.confirm(flusher.acked_lsn)
                    if batch.pending:
                        self._resolve(batch)
                        # A small batch is applied here: handing it to the flusher thread and
                        # noticing its end cost two thread wake-ups for nothing to overlap.
                        if not (len(batch) <= self.direct_ops and flusher.apply_direct(batch)):
                            flusher.submit(batch)
                        batch = Batch(end_lsn=batch.end_lsn)
                        if flusher.idle:
                            reader.confirm(flusher.acked_lsn)
                if self.stop.is_set():
                    break
                if self._full(batch):
                    # Backpressure: the next batch is full; wait for the sinks, keep the
                    # walsender informed meanwhile.
                    if not flusher.wait_idle(1.0):
                        reader.send_status()
                    continue
                idle = flusher.idle and not batch.pending
                for event in reader.read(max_wait=0.5 if idle else 0.002, max_events=self.batch_ops):
                    if isinstance(event, Keepalive):
                        if (flusher.idle and not batch.pending and reader.at_transaction_boundary
                                and event.wal_end > flusher.acked_lsn
                                and time.monotonic() - last_idle_checkpoint >= 1.0):
                            # Nothing pending: the sinks are complete up to walEnd. Record it,
                            # then let the slot go (rule 3: unwatched traffic frees WAL).
                            last_idle_checkpoint = time.monotonic()
                            if self._idle_checkpoint(flusher, event.wal_end):
                                flusher.acked_lsn = event.wal_end
                                reader.confirm(event.wal_end)
                        continue
                    self._add_transaction(batch, event)
                    if self._full(batch):
                        break
                self._write_stats()
            # Graceful stop: apply what was read, then confirm it.
            flusher.wait_idle()
            if flusher.error is None and batch.pending:
                self._resolve(batch)
                flusher.submit(batch)
                flusher.wait_idle()
            if flusher.error is not None:
                raise flusher.error
            reader.confirm(flusher.acked_lsn)
            reader.send_status()
        finally:
            flusher.close()

    def _full(self, batch: Batch) -> bool:
        """A batch is full at ``batch_ops`` Ops or ``batch_bytes`` bytes of wal2json input."""
        return batch.nbytes >= self.batch_bytes or len(batch) >= self.batch_ops

    def _add_transaction(self, batch: Batch, tx: Transaction) -> None:
        version = tx.commit_lsn
        for change in tx.changes:
            views = self.by_table.get(change.table)
            if not views:
                continue
            if change.kind == "truncate":
                emptied = [v for v in views if v.table == change.table]
                if emptied:
                    self._truncate(batch, emptied, version)
                for v in views:
                    if v.tree is not None and v.table != change.table:
                        batch.rederive_all.add(v.name)  # an included table emptied: every record
                        batch.affected_version[v.name] = version
                        batch.xids.add(tx.xid)
                continue
            gone = False
            used = self._used_columns.get(change.table)
            if change.new is not None and used and (
                    change.maybe_nonfinite or change.table in self._full_row_tables):
                fetch = [c for c in change.maybe_nonfinite if c in used]
                if change.table in self._full_row_tables:
                    fetch += [c for c in used if c not in change.new]
                if fetch:
                    self.refetcher.wait_visible((tx.xid,))
                    if not self.refetcher.fill(change, fetch):
                        # The row is gone (its delete is ahead in the stream) or not identifiable.
                        gone = any(c not in change.new for c in fetch)
            for v in views:
                if v.tree is not None:
                    self._note_affected(batch, v, change, version)
                    batch.xids.add(tx.xid)
                    continue
                if gone and v.needs_full_row:
                    continue
                try:
                    ops = v.change_ops(change, version)
                except DerivationError as e:
                    batch.dead_letters.append(DeadLetter.from_derivation_error(e, version))
                    continue
                for op in ops:
                    batch.add(v.sink, op)
        batch.changes += len(tx.changes)
        batch.nbytes += tx.nbytes
        if not tx.final:
            batch.open_chunks += 1  # a chunk of a large transaction: applied, not confirmable
            return
        batch.transactions += 1
        batch.end_lsn = tx.end_lsn
        if tx.commit_time is not None and (tx.changes or batch.open_chunks):
            batch.commit_times.append(tx.commit_time.timestamp())

    def _note_affected(self, batch: Batch, view: View, change: Change, version: int) -> None:
        """Record which records of query-derived ``view`` the change touches (resolved by
        :meth:`_resolve` before the batch is applied)."""
        tree = view.tree
        assert tree is not None
        new, old = change.new or {}, change.old_key or {}
        batch.affected_version[view.name] = max(version, batch.affected_version.get(view.name, 0))
        if change.table == view.table:
            keys = batch.affected.setdefault(view.name, set())
            for row in (new, {**new, **old} if old else None):
                if row:
                    k = tree.root_key(row)
                    if k is not None:
                        keys.add(k)
        for node in tree.all_nodes():
            if node.table == change.table:
                values = batch.links.setdefault(view.name, {}).setdefault(id(node), (node, set()))[1]
                for row in (new, old):
                    if node.col in row and row[node.col] is not None:
                        values.add(row[node.col])

    def _resolve(self, batch: Batch) -> None:
        """Read the records of query-derived views the batch touched and add their Ops."""
        if not (batch.affected or batch.links or batch.rederive_all):
            return
        self.refetcher.wait_visible(batch.xids)  # records are read after their changes
        conn = self.refetcher.connection()
        by_name = {v.name: v for v in self.views}
        for name in set(batch.affected) | set(batch.links) | batch.rederive_all:
            view, version = by_name[name], batch.affected_version[name]
            tree = view.tree
            assert tree is not None
            found: set = set(batch.affected.get(name, ()))
            for node, values in batch.links.get(name, {}).values():
                found |= tree.affected_roots(conn, node, values)
            keys = sorted(found, key=repr)
            # The touched roots (deletes included), then, after a TRUNCATE of an included
            # table, every root (upserts only: no root disappeared by it).
            parts: list = [keys[i:i + 1000] for i in range(0, len(keys), 1000)]
            if name in batch.rederive_all:
                parts.append(None)
            for part_keys, rows in _read_roots(tree, conn, parts):
                if view.aggregation is not None:
                    items = [(tree.root_key(r), version, r) for r in rows]
                    present = {k for k, _, _ in items}
                    items += [(k, version, None) for k in part_keys if k not in present]
                    result, touched = self.aggregates.apply(view.name, view.aggregation, items)
                    self._add_resolved(batch, view, *view.group_ops(result, touched, version), version)
                else:
                    self._add_resolved(batch, view, *view.key_ops(part_keys, rows, version), version)
        batch.xids.clear()
        batch.affected.clear()
        batch.links.clear()
        batch.rederive_all.clear()

    def _add_resolved(self, batch: Batch, view: View, ops: list, errors: list, version: int) -> None:
        """Add re-derived Ops; when they pile up past ``batch_bytes`` (a category rename can
        touch every product), apply them at once (the flusher is idle while resolving) without
        a checkpoint, so memory stays bounded by the batch size, not by the fan-out."""
        for op in ops:
            batch.add(view.sink, op)
            batch.resolved_bytes += 64 + (len(orjson.dumps(op.doc)) if op.doc is not None else 0)
        batch.dead_letters += [DeadLetter.from_derivation_error(e, version) for e in errors]
        if batch.resolved_bytes >= self.batch_bytes:
            assert self.flusher is not None
            self.flusher.apply_now(batch.take_ops())
            batch.resolved_bytes = 0

    def _truncate(self, batch: Batch, views: list[View], version: int) -> None:
        """A TRUNCATE empties its views: a barrier that applies the pending Ops, then each sink
        drops every record of the view at or below the commit LSN (so earlier Ops of the same
        transaction go too); the Ops that follow in the stream are applied after it."""
        for v in views:
            batch.drop_view(v.sink, v.name)
        self.flusher.wait_idle()
        if self.flusher.error is not None:
            raise self.flusher.error
        self._resolve(batch)
        self.flusher.apply_now(batch)
        batch.clear_ops()
        batch.dead_letters = []  # recorded by apply_now
        for v in views:
            if v.aggregation is not None:
                self.aggregates.truncate(v.name, v.aggregation, version)
            sink = self.sinks[v.sink]
            with_retry(f"sink {v.sink} truncate of {v.name}",
                       lambda: sink.truncate(v.name, version), self.flusher.stop)
            log.info("TRUNCATE of %s emptied view %s at %s", v.table, v.name, format_lsn(version))

    def _rejected(self, batch: Batch, rejected: list) -> None:
        """Flusher callback: store dead letters (rows views could not derive, documents sinks
        refused) in ``pgderive.dead_letters`` before the batch is confirmed (rule 5)."""
        tables = {v.name: v.table for v in self.views}
        entries = list(batch.dead_letters)
        entries += [DeadLetter(r.op.view, tables.get(r.op.view, "?"), r.op.key, r.op.version, r.error, r.op.doc)
                    for r in rejected]
        self.dead_letters.record(self.slot, entries)
        for e in entries[:5]:
            log.warning("dead letter: view %s, %s, key %s, at %s: %s", e.view, e.table, e.key,
                        format_lsn(e.lsn), e.error)
        if len(entries) > 5:
            log.warning("… and %d more dead letters (see `pgderive dead-letters list`)", len(entries) - 5)

    def _applied(self, batch: Batch) -> None:
        """Flusher callback: every sink acknowledged ``batch``."""
        now = time.time()
        self.stats.lag_ms.add((now - t) * 1000.0 for t in batch.commit_times)
        self.stats.transactions += batch.transactions
        self.stats.changes += batch.changes
        self.stats.ops += len(batch)
        self.stats.flushes += 1
        self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, batch.end_lsn)

    def _write_stats(self, force: bool = False) -> None:
        if not self.stats_file:
            return
        now = time.monotonic()
        if not force and now - self._last_stats_write < 2.0:
            return
        self._last_stats_write = now
        if self.refetcher is not None:
            self.stats.refetched_rows = self.refetcher.lookups
        if self.reader is not None:
            self.stats.confirmed_lsn = max(self.stats.confirmed_lsn, self.reader.confirmed_lsn)
        tmp = f"{self.stats_file}.tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(self.stats.summary(), option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.stats_file)


def _read_roots(tree: Any, conn: psycopg.Connection, parts: list) -> Iterable[tuple[list, list]]:
    """``(keys, rows)`` per part: for a list of at most 1,000 root identities, all their rows
    at once (``keys`` without a row are gone or no longer match ``where``); for ``None``,
    every root in chunks with no keys (nothing to delete)."""
    for part in parts:
        if part is None:
            for rows in tree.rows(conn):
                yield [], rows
        else:
            yield part, [r for chunk in tree.rows(conn, part) for r in chunk]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
