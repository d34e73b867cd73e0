"""The coordinator: what ``pgderive run`` does, from the YAML to a streaming slot.

One daemon, one slot. At start it binds the views to the source catalog, connects the sinks and
decides between a bootstrap (create the slot with an exported snapshot, load every view at its
consistent point: ARCHITECTURE.md, rule 4) and a resume (check that every view's checkpoint
covers the slot's confirmed position, rebuilding views whose sink lost data). Then it streams
(:mod:`pgderive.runtime.stream`, one lane per sink: :mod:`pgderive.runtime.lanes`). A dropped
replication connection is retried with capped backoff and resumes from the slot's confirmed
position; a sink that lost acknowledged data gets its views rebuilt, then streaming resumes.

Stopping (SIGTERM/SIGINT, :meth:`Engine.interrupt`): while the daemon is blocked where nothing
needs finishing (connecting, creating the slot, reconnecting) it stops at once
(:class:`~pgderive.runtime.errors.Terminated`); while it loads or streams it stops gracefully,
at the next chunk or batch. A bootstrap that does not finish, for whatever reason, drops the slot
it created: the next start creates a new one (an abandoned slot would retain WAL).
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import orjson
import psycopg

from cdc.lsn import format_lsn
from cdc.refetch import RowRefetcher
from cdc.slot import ReplicationError, SlotInfo, SlotReader, slot_info
from cdc.snapshot import row_estimate, snapshot_connection
from sinks.base import LiveGenerations, Sink
from views.check import build_views
from views.derive import View, view_fingerprint
from views.spec import Spec, SpecError

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetter, DeadLetterStore
from ..state.provenance import CommitStore
from ..state.rebuilds import RebuildStore
from ..state.registry import ViewRegistry, entry_of
from ..state.slots import StateStore
from .batch import GenerationStep
from .bootstrap import Interrupted, load_snapshot
from .checkpoints import SinkDataLoss, lost_views
from .errors import EngineError, Terminated
from .lane_process import LaneProcessSpec
from .lanes import Lanes
from .observed import LoadProgress, SourceWatch
from .online import OnlineRebuild
from .preflight import check_privileges, preflight, raise_for
from .provenance import CommitRecorder
from .reconfigure import Reconfiguration, ReloadRefused, plan_reload
from .recording import DeadLetterRecorder
from .reload import reload_views
from .retry import AnyOf, Backoff, one_line
from .sinks import (SinkOpener, deployment_of, lane_process_specs, open_sinks, prepare_sinks, process_lanes, sink_types,
                    sinks_views)
from .stats import Stats
from .stream import Limits, StepReply, Stream, row_refetcher
from .waiting import waiting

__all__ = ["Engine", "EngineError"]

log = logging.getLogger("pgderive.engine")

#: CPython's GIL switch interval while several sinks have lanes on threads (seconds; the default is
#: 0.005). Their lanes hand work between threads; with the default a CPU-bound thread (the reader
#: deriving, a lane encoding a large OpenSearch batch) keeps the GIL up to 5 ms while another
#: lane's acknowledged I/O waits for it: a 10-command Redis pipeline measured 0.2 ms alone,
#: 10.4 ms beside a CPU-bound thread, 0.19 ms with 0.0005 (ARCHITECTURE.md, "Lanes"). With one
#: thread lane (one sink, or Redis beside an OpenSearch lane in a process) the default stays:
#: more switches only cost the reader throughput there.
SWITCH_INTERVAL = 0.0005

#: Seconds a failed bootstrap waits for its slot to become inactive before giving up dropping it.
DROP_WAIT = 10.0

#: Seconds between two polls of ``pgderive.rebuilds`` and the reload handshake by a running daemon.
CONTROL_EVERY = 1.0
#: Seconds the control thread and online rebuilds get to end when the daemon stops; past that
#: they are left behind as daemon threads (an unfinished rebuild starts over at the next start).
STOP_GRACE = 1.5


def _estimate(conn: psycopg.Connection[Any], table: str) -> int | None:
    """The planner's row estimate of ``table`` (:func:`cdc.snapshot.row_estimate`), None when
    unknown or on error (progress only)."""
    try:
        n = row_estimate(conn, table)
    except psycopg.Error:
        return None
    return None if n is None else int(n)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="pgderive")


class Engine:
    """The daemon behind ``pgderive run``.

    Args:
        spec: the loaded YAML spec.
        stop: set it (e.g. from a signal handler) to stop gracefully after flushing.
        stats_file: if given, a JSON summary of :class:`Stats` is written there every few
            seconds and at exit.
        batch_ops, batch_bytes, direct_ops: the stream's batch bounds
            (:class:`~pgderive.runtime.stream.Limits`).
        reload_spec: reads the YAML again for a reload (:meth:`request_reload`, ``pgderive
            reload``); raises :class:`~views.spec.SpecError` for a bad file. None: reloads are
            refused.
    """

    def __init__(self, spec: Spec, *, stop: threading.Event | None = None,
                 stats_file: str | None = None, batch_ops: int = 20_000,
                 batch_bytes: int = 8 << 20, direct_ops: int = 500,
                 reload_spec: Callable[[], Spec] | None = None) -> None:
        self.spec = spec
        # Bookkeeping connections get the source's connect and statement timeouts; the data
        # path (replication, snapshot COPY, read-backs) only the connect timeout (SourceSpec).
        self.dsn = spec.source.conninfo()
        self.data_dsn = spec.source.conninfo(statement_timeout=False)
        self.slot = spec.source.slot
        self.stop = stop or threading.Event()
        self.stats_file = stats_file
        self.limits = Limits(batch_ops=batch_ops, batch_bytes=batch_bytes, direct_ops=direct_ops)
        self.stats = Stats()
        #: What the daemon does, for the HTTP endpoint (:data:`~pgderive.runtime.observed.PHASES`).
        self.phase = "starting"
        self.source = SourceWatch(self.dsn, self.slot)
        self._bootstrap_rows: dict[str, int] = {}
        self._bootstrap_total: dict[str, int | None] = {}
        self.state = StateStore(self.dsn)
        self.dead_letters = DeadLetterStore(self.dsn, max_bytes=spec.dead_letters.max_bytes)
        self.aggregates = AggregateStore(self.data_dsn)
        self.views: list[View] = []
        self.sinks: dict[str, Sink] = {}
        self.deployment: str | None = None
        self.reader: SlotReader | None = None
        self.refetcher: RowRefetcher | None = None
        self.stream: Stream | None = None
        self._last_stats_write = 0.0
        self._phase: str | None = None  # set while blocked where stopping at once is safe
        # Online rebuilds and reloads (ARCHITECTURE.md, "Online rebuild").
        self.reload_spec = reload_spec
        self.rebuild_store = RebuildStore(self.dsn)
        self.registry = ViewRegistry(self.dsn)
        self.truncated: dict[str, int] = {}  # view -> last TRUNCATE that emptied it (kept by Stream)
        #: view -> fingerprint of the definition complete in its sink (pgderive.slot_state's
        #: ``views``, as this daemon last read or wrote it): no database round trip to ask.
        self.known: dict[str, str] = {}
        self._control_failing = 0.0  # when the control thread's last failure was logged
        self.jobs: dict[str, OnlineRebuild] = {}
        self.lanes: Lanes | None = None
        self._epoch = 0
        self._lock = threading.Lock()  # the current stream and lanes
        self._state_lock = threading.Lock()  # read-modify-writes of pgderive.slot_state
        self._cycle = threading.Event()  # ends the current stream so the loop starts it again
        self._reload_signal = threading.Event()  # SIGHUP
        self._reload_pending: Reconfiguration | None = None
        self._reload_applied = threading.Event()
        self._reload_seen: Any = None  # the reload_requested_at answered last
        self._control: threading.Thread | None = None
        self._job_dead_letters: DeadLetterStore | None = None

    # -- stopping ----------------------------------------------------------------------------
    def interrupt(self, signal_name: str) -> None:
        """Ask the daemon to stop (call it from the main thread's signal handler).

        Sets :attr:`stop`, which ends a load at its next chunk and the stream at its next
        batch, both gracefully. While the daemon is blocked in a phase where nothing needs
        finishing (connecting, creating the slot, reconnecting) it raises
        :class:`Terminated` instead, so a Postgres that never answers cannot hold it for the
        whole connect timeout.
        """
        self.stop.set()
        if self._phase is not None:
            raise Terminated(signal_name, self._phase)

    def _blocking(self, phase: str | None) -> None:
        """Enter (a description) or leave (None) a phase :meth:`interrupt` may cut short."""
        self._phase = phase
        if phase is not None and self.stop.is_set():
            raise Terminated("a stop request", phase)

    # -- startup -----------------------------------------------------------------------------
    def run(self, *, resnapshot: bool = False) -> None:
        """Bootstrap if needed, then stream until :attr:`stop` is set.

        Raises :class:`EngineError` for conditions that need an operator (slot vanished,
        another daemon active, views changed), :class:`~views.spec.SpecError` for bad YAML.
        """
        source = self.spec.source
        self._blocking("connecting to the source")
        log.info("connecting to the source %s", source.redacted_dsn())
        with waiting(f"connecting to the source {source.redacted_dsn()}", log,
                     limit=source.connect_timeout or None):
            conn = psycopg.connect(self.dsn, autocommit=True)
        with conn:
            self._blocking("reading the source catalog")
            # Its wal2json probe creates a temporary slot, which waits for running transactions.
            with waiting("reading the source catalog (waiting for transactions running on the"
                         " source to end?)", log, limit=source.statement_timeout or None):
                self.views = build_views(self.spec, conn)
        tables = sorted({t for v in self.views for t in v.tables})  # include views listen to every table
        self.refetcher = row_refetcher(self.data_dsn, self.views)
        self.deployment = deployment_of(self.spec)
        self.sinks = open_sinks(self.spec, self.views, deployment=self.deployment, prepare=False)
        if len(set(self.sinks) - self._process_lanes()) > 1:
            sys.setswitchinterval(SWITCH_INTERVAL)  # lanes on threads of different sinks share the GIL
        self.reader = SlotReader(self.data_dsn, self.slot, tables=tables)
        try:
            # Before the schema, a slot or anything else exists: a start that cannot succeed
            # must not leave a slot retaining WAL (ARCHITECTURE.md, "The flow").
            raise_for(self.spec, preflight(self.spec, self.sinks))
            # Then the sinks' own bookkeeping: legacy keys adopted, record keys and aliases
            # claimed for this deployment, still before any slot exists.
            prepare_sinks(self.sinks, self.views)
            try:
                self._blocking("preparing the slot")
                start_lsn = self._prepare(resnapshot)
                if start_lsn is None:
                    return
                self._register(self.views)
                self._start_control()
                self._stream(start_lsn)
            except psycopg.errors.InsufficientPrivilege as e:
                raise self._privilege_error(e) from e
        except Interrupted as e:
            log.warning("%s; stopped before streaming", e)
        finally:
            self._blocking(None)
            self._stop_control()
            self._write_stats(force=True)
            self.reader.close()
            self.refetcher.close()
            self.aggregates.close()
            for s in self.sinks.values():
                s.close()

    def _privilege_error(self, e: psycopg.Error) -> EngineError:
        """``e`` (permission denied) as an :class:`EngineError` naming the views that lack a
        privilege (the preflight's privilege check, asked again now), or ``e``'s own message
        when that finds nothing (e.g. the privilege was granted back meanwhile)."""
        try:
            with _connect(self.dsn) as conn:
                found = check_privileges(self.spec, conn)
        except psycopg.Error:
            found = []
        first = (e.diag.message_primary or str(e)).strip()
        if not found:
            return EngineError(f"permission denied while running: {first}")
        return EngineError(f"permission denied while running ({first}): "
                           + "; ".join(p.message for p in found))

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
                    log.warning("--resnapshot: dropping slot %s", self.slot,
                                extra={"lsn": info.confirmed_flush_lsn})
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
        fps = self._fingerprints()
        self.known = {n: fp for n, fp in state.views.items() if n in fps}
        fresh = sorted(n for n, fp in fps.items() if state.views.get(n) != fp)  # new or changed
        removed = sorted(n for n in state.views if n not in fps)
        if removed:
            self._retire(removed)
        confirmed = info.confirmed_flush_lsn or 0
        added = [v for v in self.views if v.name not in state.views]
        lost = lost_views([v for v in self.views if v.name in state.views], self.sinks, self.slot, confirmed)
        if lost:
            log.warning("sink data of view(s) %s is missing or behind the slot (sink restarted "
                        "without its data?); rebuilding them first", ", ".join(v.name for v in lost),
                        extra={"view": ",".join(v.name for v in lost), "lsn": confirmed})
            self._blocking(None)
            self._rebuild(lost)
        if added:
            self._start_checkpoints(added, confirmed)
        for name in fresh:
            why = "new view" if name not in state.views else "definition changed"
            log.warning("view %s: %s since the last run; rebuilding it online while the others stream", name, why,
                        extra={"view": name})
            self.rebuild_store.request(self.slot, name, why)
        log.info("resuming slot %s from its confirmed position %s", self.slot,
                 format_lsn(info.confirmed_flush_lsn or 0), extra={"lsn": info.confirmed_flush_lsn or 0})
        return 0

    def _bootstrap(self) -> int | None:
        """Create the slot with an exported snapshot, load every view, record the state."""
        assert self.reader is not None
        fps = self._fingerprints()
        self.state.set(self.slot, "bootstrapping", 0, fps)
        walsender: int | None = None  # our replication connection's server process
        created = False
        try:
            self._blocking("creating the slot")
            self.reader.connect()
            walsender = self.reader.backend_pid
            with waiting(f"creating slot {self.slot} (it waits for transactions running on the"
                         " source to end)", log):
                consistent_point, snapshot = self.reader.create_slot()
            created = True
            self.state.set(self.slot, "bootstrapping", consistent_point, fps)
            self._blocking(None)  # from here on a stop is graceful: at the next chunk
            loading = time.monotonic()
            self.phase = "bootstrapping"
            self.stats.alive()
            with snapshot_connection(self.data_dsn, snapshot) as conn:
                self._bootstrap_total = {v.name: _estimate(conn, v.table) for v in self.views}
                self._bootstrap_rows = {v.name: 0 for v in self.views}
                stats = load_snapshot(conn, self.views, self.sinks, consistent_point, aggregates=self.aggregates,
                                      stop=self.stop, concurrency=self.spec.bootstrap.concurrency,
                                      split_rows=self.spec.bootstrap.split_rows,
                                      connect=lambda: snapshot_connection(self.data_dsn, snapshot),
                                      on_dead_letters=lambda e: self.dead_letters.record(self.slot, e),
                                      progress=self._bootstrap_progress)
            self._bootstrap_rows, self._bootstrap_total = {}, {}
        except Interrupted as e:
            self._abandon_bootstrap(e, created, walsender)  # logs that the next start redoes it
            return None
        except psycopg.errors.DuplicateObject:
            raise  # CREATE_REPLICATION_SLOT: another process created the slot meanwhile: not ours
        except BaseException as e:
            self._abandon_bootstrap(e, created, walsender)
            raise
        self.stats.snapshot = {
            "consistent_point": format_lsn(consistent_point),
            "seconds": round(time.monotonic() - loading, 2),  # the whole load, wall time
            "tables": {t: {"rows": n, "seconds": round(stats.seconds[t], 2),
                           "rows_per_s": round(stats.rows_per_second(t))} for t, n in stats.rows.items()},
            # Per view: records written and the time its sink spent writing them (loads of
            # different sinks overlap, so these rates are each sink's own throughput).
            "views": {v: {"records": n, "sink_seconds": round(stats.sink_seconds.get(v, 0.0), 2),
                          "sink_records_per_s": round(n / stats.sink_seconds[v]) if stats.sink_seconds.get(v) else None}
                      for v, n in stats.records.items()},
        }
        self.state.set(self.slot, "streaming", consistent_point, fps)
        self.known = dict(fps)
        cancelled = self.rebuild_store.cancel_all(self.slot, "a bootstrap loaded every view")
        if cancelled:
            log.info("online rebuild(s) of %s cancelled: the bootstrap loaded every view", ", ".join(cancelled),
                     extra={"view": ",".join(cancelled)})
        log.info("bootstrap done at consistent point %s", format_lsn(consistent_point),
                 extra={"lsn": consistent_point})
        return consistent_point

    def _abandon_bootstrap(self, cause: BaseException, created: bool = True,
                           walsender: int | None = None) -> None:
        """A bootstrap that did not finish: drop the slot it created and pgderive's record of it,
        so the slot retains no WAL and the next start begins from scratch (ARCHITECTURE.md,
        "Preflight").

        Only our own slot: one ``create_slot`` returned (``created``), or one still held by our
        replication connection's server process ``walsender`` (interrupted while creating it;
        psycopg has cancelled the command, which normally discards the unfinished slot). The
        replication connection is closed first (it holds the slot and its exported snapshot);
        the walsender may take a moment to release the slot, so the drop waits up to
        :data:`DROP_WAIT` seconds while Postgres says the slot is active, ending our own
        walsender if it stays busy (Postgres manual, "Replication Management Functions").
        Raises :class:`EngineError` naming ``cause`` and the exact SQL to run when the slot
        cannot be dropped (a :class:`BaseException` cause such as a signal is only logged).
        """
        assert self.reader is not None
        self.reader.close()
        if created or walsender is not None:
            deadline = time.monotonic() + DROP_WAIT
            try:
                with _connect(self.dsn) as conn:
                    while True:
                        info = slot_info(conn, self.slot)
                        if info is None:
                            break
                        if not created and info.active_pid != walsender:
                            return  # not the slot we were creating: leave it alone
                        if not info.active:
                            try:
                                conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                                break
                            except psycopg.errors.ObjectInUse:
                                pass  # the walsender took it again meanwhile: wait
                        elif time.monotonic() > deadline:
                            self._cannot_drop(cause, "it is still in use")
                            return
                        elif (walsender and info.active_pid == walsender
                              and time.monotonic() > deadline - DROP_WAIT / 2):
                            # Our own walsender, still busy after we closed its connection (e.g.
                            # creating the slot): end it; an unfinished slot goes with it.
                            conn.execute("SELECT pg_terminate_backend(%s)", (walsender,))
                        time.sleep(0.1)
            except (psycopg.Error, OSError) as e:
                self._cannot_drop(cause, one_line(e))
                return
        try:
            self.state.delete(self.slot)
        except psycopg.Error as e:
            log.warning("could not delete pgderive's record of slot %s (%s); the next start redoes the "
                        "bootstrap all the same", self.slot, one_line(e))
        log.warning("bootstrap did not finish (%s): dropped slot %s and pgderive's record of it; the next "
                    "start bootstraps from scratch", one_line(cause), self.slot)

    def _cannot_drop(self, cause: BaseException, why: str) -> None:
        fix = f"SELECT pg_drop_replication_slot('{self.slot}')"
        log.error("bootstrap did not finish and slot %s could not be dropped (%s): it retains WAL until "
                  "you run %s on the source database", self.slot, why, fix)
        if isinstance(cause, Exception):
            raise EngineError(f"{one_line(cause)}; the slot {self.slot} this bootstrap created could not be "
                              f"dropped ({why}) and retains WAL until dropped: run {fix} on the source "
                              "database") from cause

    # -- streaming ---------------------------------------------------------------------------
    def _stream(self, start_lsn: int) -> None:
        reader = self.reader
        assert reader is not None
        self._blocking(None)
        backoff = Backoff()
        connected = reader.connected
        # Everything allocated so far (modules, spec, views, catalog) lives as long as the
        # daemon: keep it out of the cyclic GC, whose full collections otherwise walk it all
        # (~26 ms for the 85k objects of the imports alone), a stall in the lag's tail.
        gc.collect()
        gc.freeze()
        while not self.stop.is_set():
            try:
                if not connected:
                    self.phase = "reconnecting"
                    self._blocking("reconnecting to the source")
                    with waiting(f"reconnecting to the source {self.spec.source.redacted_dsn()}", log,
                                 limit=self.spec.source.connect_timeout or None):
                        reader.connect()
                    info = self._check_slot()
                    self._blocking(None)
                    reader.confirmed_lsn = info.confirmed_flush_lsn or 0
                    start_lsn = 0  # resume from the slot's confirmed position
                reader.start(start_lsn)
                connected = True
                backoff.reset()
                self.phase = "streaming"
                self.stats.alive()
                self._loop(reader)
                if self._cycle.is_set() and not self.stop.is_set():
                    # A reload: the stream drained and stopped; start it again on the new views
                    # from the slot's confirmed position (tables may have changed: a new reader).
                    self._cycle.clear()
                    connected = False
                    reader.close()
                    self._apply_reload()
                    assert self.reader is not None
                    reader = self.reader
            except (ReplicationError, psycopg.OperationalError) as e:
                if self.stop.is_set():
                    break
                delay = backoff.next()
                log.warning("replication connection lost (%s); reconnecting in %.1f s", one_line(e), delay)
                self.phase = "reconnecting"
                connected = False
                reader.close()
                self.stop.wait(delay)
            except SinkDataLoss as e:
                log.error("%s; rebuilding them from a new snapshot, then resuming", e)
                connected = False
                reader.close()
                self._rebuild([v for v in self.views if v.name in e.views])
            except Terminated as e:  # while reconnecting: everything acknowledged is confirmed
                log.info("%s", e)
                break
        self.phase = "stopping"
        log.info("stopped at confirmed LSN %s", format_lsn(reader.confirmed_lsn), extra={"lsn": reader.confirmed_lsn})

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
        reload_views(self.data_dsn, self.slot, views, self.sinks, self.dead_letters, stop=self.stop,
                     concurrency=self.spec.bootstrap.concurrency, split_rows=self.spec.bootstrap.split_rows)

    def _recorder(self) -> DeadLetterRecorder:
        return DeadLetterRecorder(self.dsn, self.slot, {v.name: v.table for v in self.views},
                                  max_bytes=self.spec.dead_letters.max_bytes, store=self.dead_letters,
                                  sinks={v.name: v.sink for v in self.views})

    def _process_lanes(self) -> set[str]:
        """The sinks whose lanes run in a process of their own (:func:`~pgderive.runtime.sinks.process_lanes`)."""
        return process_lanes(self.spec, self.sinks)

    def _lane_processes(self) -> dict[str, LaneProcessSpec]:
        """How each of :meth:`_process_lanes` opens its sink in its process."""
        assert self.deployment is not None
        return lane_process_specs(self.spec, self.sinks, self.views, self.deployment, self._recorder())

    def _views_by_sink(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for v in self.views:
            out[v.sink].append(v.name)
        return dict(out)

    def _loop(self, reader: SlotReader) -> None:
        """Stream from ``reader`` (started) through one lane per sink until stopped, failed or
        asked to start again (a reload)."""
        lanes = Lanes(self.sinks, self._views_by_sink(), self.stop, acked_lsn=reader.confirmed_lsn,
                      record=self._recorder(), stats=self.stats, processes=self._lane_processes())
        commits = self._commit_recorder()
        try:
            if commits is not None:
                commits.start()
            stream = Stream(self.views, lanes, stats=self.stats, stop=AnyOf(self.stop, self._cycle),
                            refetcher=self.refetcher, aggregates=self.aggregates, limits=self.limits,
                            on_tick=self._write_stats, open_dead_letters=self.dead_letters.open_rows(self.slot),
                            held=self._held(), truncated=self.truncated, provenance=commits)
            with self._lock:
                self._epoch += 1
                self.stream, self.lanes = stream, lanes
            stream.run(reader)
        finally:
            with self._lock:
                self.stream = self.lanes = None
            lanes.close(1.0 if self.stop.is_set() else 5.0)  # stopping: Stream waited already
            if commits is not None:
                commits.close(1.0 if self.stop.is_set() else 5.0)

    def _commit_recorder(self) -> CommitRecorder | None:
        """The recorder of the stream's commits (YAML ``provenance``), None when it is off."""
        p = self.spec.provenance
        if not p.enabled:
            return None
        secs = p.retention_seconds
        return CommitRecorder(CommitStore(self.dsn), self.slot, None if secs is None else dt.timedelta(seconds=secs),
                              stats=self.stats)

    # -- online rebuilds and reloads (ARCHITECTURE.md, "Online rebuild") ------------------------
    @property
    def epoch(self) -> int:
        """Increases each time the stream and its lanes start (see :class:`~pgderive.runtime.online.RebuildHost`)."""
        return self._epoch

    def file_step(self, sink: str, step: GenerationStep) -> tuple[int, StepReply] | None:
        """Hand ``step`` to the running stream: ``(epoch, reply)``; None while none runs."""
        with self._lock:
            if self.stream is None:
                return None
            return self._epoch, self.stream.request_step(sink, step)

    def lane_position(self, sink: str) -> tuple[int, int, int] | None:
        """``(epoch, acked LSN, steps_done)`` of the lane of ``sink``; None while no stream runs."""
        with self._lock:
            if self.lanes is None:
                return None
            lane = self.lanes[sink]
            return self._epoch, lane.acked_lsn, lane.steps_done

    def record_dead_letters(self, entries: list[DeadLetter]) -> None:
        """Store dead letters of an online rebuild's load (its own connection)."""
        if self._job_dead_letters is None:
            self._job_dead_letters = DeadLetterStore(self.dsn, max_bytes=self.spec.dead_letters.max_bytes)
        self._job_dead_letters.record(self.slot, entries)

    # -- Observed (the HTTP endpoint; pgderive.runtime.observed) --------------------------------
    def sinks_views(self) -> dict[str, list[str]]:
        """Sink name → names of the views it serves (every configured sink, even without views)."""
        return sinks_views(self.spec, self.views)

    def sink_types(self) -> dict[str, str]:
        """Sink name → its type from the YAML."""
        return sink_types(self.spec)

    def loads(self) -> list[LoadProgress]:
        """The bootstrap's loads (while it runs) and the online rebuilds under way."""
        out = [LoadProgress(v, "bootstrap", "loading", rows, self._bootstrap_total.get(v))
               for v, rows in list(self._bootstrap_rows.items())]
        for name, job in list(self.jobs.items()):
            if job.alive:
                out.append(LoadProgress(name, "rebuild", job.phase, job.rows, job.rows_total))
        return out

    def _bootstrap_progress(self, view: str, rows: int) -> None:
        self._bootstrap_rows[view] = rows
        self.stats.alive()

    def rebuilt(self, view: View, consistent_point: int) -> None:
        """An online rebuild made ``view``'s new generation live: its definition's fingerprint
        becomes the slot's record of it (``pgderive.slot_state``)."""
        with self._state_lock:
            state = self.state.get(self.slot)
            if state is None:
                return
            fps = dict(state.views)
            fps[view.name] = view_fingerprint(view)
            self.state.set(self.slot, state.status, state.consistent_point, fps)
            self.known[view.name] = fps[view.name]
        self._register([view])

    def _held(self) -> set[str]:
        """Views whose changes the stream must not derive yet: a new or changed definition on a
        sink with separate generations, or of an aggregate view (whose live state has the old
        definition's shape), until its online rebuild's ``follow`` step (the live generation
        must not get Ops of the new definition)."""
        known = self.known
        fps = self._fingerprints()
        return {v.name for v in self.views if known.get(v.name) != fps[v.name] and (
                isinstance(self.sinks.get(v.sink), LiveGenerations) or v.aggregation is not None)}

    def _retire(self, names: list[str]) -> None:
        """Stop maintaining views that left the file: forget their fingerprints (a view added
        back later is bootstrapped again); their data stays in the sinks."""
        with self._state_lock:
            self.state.remove_views(self.slot, names)
            for name in names:
                self.known.pop(name, None)
        self.registry.retire(self.slot, names)
        for name in names:
            job = self.jobs.pop(name, None)
            if job is not None:
                job.cancel()
            if (r := self.rebuild_store.get(self.slot, name)) is not None and r.active:
                self.rebuild_store.finish(self.slot, name, "cancelled", "the view was removed")
            log.warning("view %s is no longer in the configuration: it is not maintained any more; its data "
                        "stays in its sink until `pgderive drop %s`", name, name, extra={"view": name})

    def _register(self, views: Sequence[View]) -> None:
        """Record the views this daemon maintains, with their layout, in ``pgderive.views``
        (what ``pgderive drop`` finds a retired view's data by)."""
        self.registry.record(self.slot, [entry_of(v, view_fingerprint(v)) for v in views])

    def _start_checkpoints(self, views: list[View], lsn: int) -> None:
        """Give new views a checkpoint at ``lsn`` (the slot's confirmed position), where their
        lanes start advancing it; their online rebuild makes them complete."""
        by_sink: dict[str, list[str]] = defaultdict(list)
        for v in views:
            by_sink[v.sink].append(v.name)
        for sink, names in by_sink.items():
            self.sinks[sink].write_checkpoint(names, lsn)

    def request_reload(self) -> None:
        """Ask for a reload of the YAML (the SIGHUP handler); the control thread does it."""
        self._reload_signal.set()

    def _start_control(self) -> None:
        self._control = threading.Thread(target=self._control_loop, name="pgderive-control", daemon=True)
        self._control.start()

    def _stop_control(self) -> None:
        """Stop the control thread and the online rebuilds: nothing of theirs needs finishing
        (an unfinished rebuild is started over by the next start), so they get a short grace
        and are left behind as daemon threads (e.g. blocked connecting to a silent source)."""
        self.stop.set()
        deadline = time.monotonic() + STOP_GRACE
        for job in list(self.jobs.values()):
            job.cancel()
        if self._control is not None:
            self._control.join(max(0.0, deadline - time.monotonic()))
        for job in list(self.jobs.values()):
            job.join(max(0.0, deadline - time.monotonic()))
        if self._job_dead_letters is not None:
            self._job_dead_letters.close()
        self.rebuild_store.close(wait=0.2)
        self.source.close()

    def _control_loop(self) -> None:
        """Every :data:`CONTROL_EVERY` seconds: start the online rebuilds ``pgderive.rebuilds``
        asks for (a request, a reload, a crash's unfinished one) and answer reload requests
        (SIGHUP or ``pgderive reload``). Errors are logged; the stream is never held up."""
        while not self.stop.wait(CONTROL_EVERY):
            try:
                reload = self._reload_signal.is_set()
                handshake = self.rebuild_store.reload_state(self.slot)
                if handshake.requested_at is not None and handshake.requested_at != self._reload_seen and (
                        handshake.reloaded_at is None or handshake.reloaded_at < handshake.requested_at):
                    reload = True
                if reload:
                    self._reload_signal.clear()
                    self._reload_seen = handshake.requested_at
                    result = self._reload()
                    self.rebuild_store.reloaded(self.slot, handshake.requested_at, result)
                self._start_jobs()
            except (psycopg.Error, OSError) as e:
                # The source is away: the stream says so too; one line a minute is enough here.
                now = time.monotonic()
                if now - self._control_failing >= 60.0:
                    self._control_failing = now
                    log.warning("cannot poll pgderive.rebuilds and reload requests (%s); retrying every %g s",
                                one_line(e), CONTROL_EVERY)
                continue
            except Exception as e:  # never let the control thread die silently
                log.error("control: %s", one_line(e), exc_info=True)
            if self._control_failing:
                self._control_failing = 0.0
                log.info("polling pgderive.rebuilds and reload requests again")

    def _start_jobs(self) -> None:
        for name in [n for n, j in self.jobs.items() if not j.alive]:
            del self.jobs[name]
        wanted = [r for r in self.rebuild_store.all(self.slot, active=True) if r.view not in self.jobs]
        if not wanted or self.stop.is_set():
            return
        by_name = {v.name: v for v in self.views}
        known = self.known
        for r in wanted:
            view = by_name.get(r.view)
            if view is None:
                self.rebuild_store.finish(self.slot, r.view, "failed", f"view {r.view} is not in the configuration")
                continue
            assert self.deployment is not None
            job = OnlineRebuild(self, view, SinkOpener.of(self.spec, view.sink, [view], self.deployment),
                                self.data_dsn, self.rebuild_store,
                                exclusive=known.get(view.name) != view_fingerprint(view), reason=r.reason)
            self.jobs[r.view] = job
            job.start()

    def _reload(self) -> str:
        """Read the YAML again and, when only views changed, hand the new views to the stream
        (which starts again on them) and ask for their online rebuilds. Returns the one-line
        result; a bad file or a change outside ``views`` is refused and changes nothing."""
        if self.reload_spec is None:
            return "refused: this daemon was started without a file to reload"
        log.info("reloading the configuration")
        try:
            spec = self.reload_spec()
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                views = build_views(spec, conn)
            plan = plan_reload(self.spec, spec, self.views, views)
        except (SpecError, ReloadRefused) as e:
            text = " ".join(str(e).split())
            log.error("reload refused, still running on the previous file: %s", str(e).strip())
            return f"refused: {text}"
        except psycopg.Error as e:
            log.error("reload refused, still running on the previous file: cannot read the source catalog: %s",
                      one_line(e))
            return f"refused: cannot read the source catalog: {one_line(e)}"
        if plan.empty:
            if plan.policy_changed:  # nothing to rebuild: the new policy passed build_views
                self.spec = plan.spec
            log.info("reload: %s", plan.summary())
            return f"ok: {plan.summary()}"
        self._reload_applied.clear()
        self._reload_pending = plan
        self._cycle.set()
        while not self._reload_applied.wait(0.2):
            if self.stop.is_set():
                return "refused: the daemon is stopping"
        for name in plan.added + plan.changed:
            self.rebuild_store.request(self.slot, name, "new view" if name in plan.added else "definition changed")
        log.info("reload: %s", plan.summary())
        return f"ok: {plan.summary()}"

    def _apply_reload(self) -> None:
        """On the reading thread, between two streams: take the reload's new views."""
        plan, self._reload_pending = self._reload_pending, None
        if plan is None:
            return
        try:
            added = [v for v in plan.views if v.name in plan.added]
            for name in plan.changed:  # its running rebuild loads the old definition: start over
                job = self.jobs.pop(name, None)
                if job is not None:
                    job.cancel()
                    job.join(30.0)
            for v in plan.views:
                if v.name in plan.added or v.name in plan.changed:
                    self.sinks[v.sink].register(v.target)
            prepare_sinks(self.sinks, added)
            if added:
                assert self.reader is not None
                self._start_checkpoints(added, self.reader.confirmed_lsn)
            if plan.removed:
                self._retire(plan.removed)
            self._register([v for v in plan.views if v.name in plan.added or v.name in plan.changed])
            self.spec = plan.spec
            self.views = plan.views
            old_refetcher, self.refetcher = self.refetcher, row_refetcher(self.data_dsn, self.views)
            if old_refetcher is not None:
                old_refetcher.close()
            tables = sorted({t for v in self.views for t in v.tables})
            assert self.reader is not None
            confirmed = self.reader.confirmed_lsn
            self.reader.close()
            self.reader = SlotReader(self.data_dsn, self.slot, tables=tables)
            self.reader.confirmed_lsn = confirmed
        finally:
            self._reload_applied.set()

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
