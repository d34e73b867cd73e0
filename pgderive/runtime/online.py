"""Online rebuilds: load a view into a new generation from a fresh snapshot while the daemon
keeps streaming every view, then switch (ARCHITECTURE.md, "Online rebuild").

One :class:`OnlineRebuild` per view, on a thread of the daemon, in phases recorded in
``pgderive.rebuilds`` (:mod:`pgderive.state.rebuilds`):

1. **begin** — the rebuild opens its own connection to the view's sink and begins a generation.
   For a sink with :class:`~sinks.base.LiveGenerations` (OpenSearch: a new index named by the
   current WAL position) it asks the stream to *follow* it: from an exact point of the stream on,
   the lane writes every Op of the view to the new generation as well (or, for a new or changed
   definition, only there: the live generation keeps serving what it had). The rebuild waits
   until the lane's sink applied that step.
2. **loading** — a TEMPORARY slot created with an exported snapshot gives a snapshot at a known
   LSN X, later than the follow step; the view is loaded at version X - 1
   (:func:`cdc.snapshot.snapshot_version`) into the new generation, with progress (rows, rows/s,
   ETA) in ``pgderive.rebuilds`` and the log. Writes for commits at or after X that the stream
   makes meanwhile carry higher versions and win (rule 2); delete
   tombstones are kept while the generation loads, so no snapshot row resurrects a row deleted
   after X.
3. **catching_up** — wait until the view's lane acknowledged X (the stream has passed the
   snapshot).
4. **switching** — OpenSearch: a *commit* step moves the alias to the new index in one
   ``_aliases`` call at an exact point of the stream and deletes the old one. Redis (records
   shared by every generation): the records older than X - 1, which the snapshot did not hold, are
   deleted by the compare-and-set sweep. A TRUNCATE of the view after X makes the rebuild start
   over (the generation holds rows it removed).

Anything that stops a rebuild half-way leaves the live generation serving: a generation that
never became live is deleted (at once, or by the next attempt's
:meth:`~sinks.base.LiveGenerations.discard_unserved` after a crash), and the row in
``pgderive.rebuilds`` makes the next daemon start it over.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import psycopg
from psycopg import sql

from cdc.lsn import format_lsn, parse_lsn
from cdc.slot import SlotReader
from cdc.snapshot import snapshot_connection, snapshot_version
from sinks.base import LiveGenerations, Sink
from views.derive import View

from ..state.aggregates import AggregateStore, shadow_name
from ..state.deadletters import DeadLetter
from ..state.rebuilds import RebuildStore
from .batch import GenerationStep
from .bootstrap import Interrupted, load_snapshot
from .retry import one_line, with_retry
from .stream import StepReply

__all__ = ["OnlineRebuild", "RebuildHost", "StartOver"]

log = logging.getLogger("pgderive.rebuild")

#: Seconds between two progress rows written to ``pgderive.rebuilds`` during a load.
PROGRESS_EVERY = 2.0
#: A rebuild that had to start over this many times (TRUNCATEs, reconnects) fails.
MAX_ATTEMPTS = 5

_seq = itertools.count(1)

#: Fault injection for crash tests (Postgres calls these injection points): ``PHASE:SECONDS``
#: pauses every online rebuild of this process that long when it enters ``PHASE`` (``loading``,
#: ``catching_up``, ``switching`` or ``switched``: the new generation is live, not yet recorded),
#: so a test can ``kill -9`` it there. Never set it in production.
PAUSE_ENV = "PGDERIVE_INJECT_REBUILD_PAUSE"


def _injected_pause(phase: str, halt: threading.Event) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, secs = spec.partition(":")
    if name == phase and secs:
        log.warning("%s: pausing the rebuild %s s in phase %s", PAUSE_ENV, secs, phase)
        halt.wait(float(secs))


class StartOver(Exception):
    """The rebuild must start again from a new snapshot (a TRUNCATE after its snapshot, or the
    stream was restarted and its lanes forgot the generation)."""


class RebuildHost(Protocol):
    """What an online rebuild needs of the running daemon (:class:`~pgderive.runtime.coordinator.Engine`)."""

    slot: str
    stop: threading.Event
    #: view name → commit LSN of the last TRUNCATE that emptied it (kept by the stream).
    truncated: dict[str, int]

    @property
    def epoch(self) -> int:
        """Increases whenever the stream and its lanes are started again (a reconnect or a
        reload): lanes of an older epoch no longer follow a generation."""
        ...

    def file_step(self, sink: str, step: GenerationStep) -> tuple[int, StepReply] | None:
        """Hand ``step`` to the current stream: ``(epoch, reply)``, or None while no stream runs."""
        ...

    def lane_position(self, sink: str) -> tuple[int, int, int] | None:
        """``(epoch, acked LSN, steps_done)`` of the lane of ``sink``, None while no stream runs."""
        ...

    def record_dead_letters(self, entries: list[DeadLetter]) -> None:
        """Store dead letters of the load."""
        ...

    def rebuilt(self, view: View, consistent_point: int) -> None:
        """The view's new generation is live (the daemon records its definition's fingerprint)."""
        ...


class OnlineRebuild:
    """Rebuild one view online on a thread of its own (see the module docstring).

    Args:
        host: the running daemon.
        view: the view (its current definition).
        open_sink: opens a new connection to the view's sink, the view registered (a
            :class:`~pgderive.runtime.sinks.SinkOpener`).
        dsn: libpq connection string of the source (no statement timeout: the snapshot COPY).
        store: ``pgderive.rebuilds``.
        exclusive: the stream writes the view only to the new generation while it loads (a new
            or changed definition); else to both.
        reason: recorded and logged.

    Nothing raised in the rebuild's thread escapes it: a failure is logged and recorded in
    ``pgderive.rebuilds`` (:attr:`outcome` ``failed``).
    """

    def __init__(self, host: RebuildHost, view: View, open_sink: Callable[[], Sink], dsn: str,
                 store: RebuildStore, *, exclusive: bool, reason: str) -> None:
        self.host = host
        self.view = view
        self.open_sink = open_sink
        self.dsn = dsn
        self.store = store
        self.exclusive = exclusive
        self.reason = reason
        self.halt = threading.Event()  # set to give up (daemon stopping, view removed)
        self.outcome: str | None = None  # done | failed | stopped, once the thread ended
        #: Progress as ``/metrics`` shows it: the phase (:data:`~pgderive.state.rebuilds.PHASES`),
        #: snapshot rows loaded so far and the planner's estimate of the total (None: unknown).
        self.phase = "requested"
        self.rows = 0
        self.rows_total: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"pgderive-rebuild-{view.name}", daemon=True)

    @property
    def alive(self) -> bool:
        """True while the rebuild's thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the rebuild's thread."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread (``timeout`` seconds at most)."""
        self._thread.join(timeout)

    def cancel(self) -> None:
        """Give up at the next chunk or wait; the live generation stays (the row stays
        unfinished, so a later daemon starts it over, unless the caller ends it)."""
        self.halt.set()

    # -- the thread ------------------------------------------------------------------------------
    @property
    def _fields(self) -> dict[str, object]:
        """The log context of this rebuild's lines (:data:`pgderive.runtime.logs.FIELDS`)."""
        return {"view": self.view.name, "sink": self.view.sink, "table": self.view.table}

    def _stopping(self) -> bool:
        return self.halt.is_set() or self.host.stop.is_set()

    def _run(self) -> None:
        name, slot = self.view.name, self.host.slot
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self.store.start(slot, name)
                log.info("online rebuild of view %s (%s), attempt %d", name, self.reason, attempt, extra=self._fields)
                x = self._attempt()
            except StartOver as e:
                log.warning("online rebuild of view %s starts over: %s", name, e, extra=self._fields)
                continue
            except Interrupted as e:
                log.info("online rebuild of view %s stopped (%s); the next start does it again", name, e,
                         extra=self._fields)
                self.outcome = "stopped"
                return
            except BaseException as e:  # recorded: an operator reads it in `pgderive status`
                if self._stopping():
                    log.info("online rebuild of view %s stopped (%s); the next start does it again",
                             name, one_line(e), extra=self._fields)
                    self.outcome = "stopped"
                    return
                log.error("online rebuild of view %s failed: %s", name, one_line(e),
                          exc_info=log.isEnabledFor(logging.DEBUG), extra=self._fields)
                self._finish("failed", one_line(e))
                return
            self.host.rebuilt(self.view, x)
            self._finish("done", None)
            log.info("online rebuild of view %s done: live at %s", name, format_lsn(x),
                     extra={**self._fields, "lsn": x})
            return
        self._finish("failed", f"started over {MAX_ATTEMPTS} times")

    def _finish(self, status: str, error: str | None) -> None:
        self.outcome = status
        try:
            self.store.finish(self.host.slot, self.view.name, status, error)
        except psycopg.Error as e:
            log.warning("could not record the end of the rebuild of view %s: %s", self.view.name, one_line(e),
                        extra=self._fields)

    def _attempt(self) -> int:
        """One attempt; returns the consistent point the view is live at."""
        view = self.view
        sink = self.open_sink()
        live = isinstance(sink, LiveGenerations)
        state = shadow_name(view.name) if view.aggregation is not None else None
        stepped = live or state is not None  # the stream takes part: generation steps
        generation: str | None = None
        epoch: int | None = None
        aggregates = AggregateStore(self.dsn) if state is not None else None
        try:
            if live:
                assert isinstance(sink, LiveGenerations)
                stale = self._retry("discard_unserved", lambda: sink.discard_unserved(view.name))
                if stale:
                    log.info("view %s: deleted generation(s) %s left by an unfinished load", view.name,
                             ", ".join(stale), extra=self._fields)
            if aggregates is not None and state is not None:
                aggregates.reset(state)  # what an unfinished attempt left
            with psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-rebuild") as conn:
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            here = parse_lsn(row[0])
            begun: str = self._retry("begin_generation", lambda: sink.begin_generation(view.name, here))
            generation = begun
            if stepped:
                epoch = self._step(GenerationStep(next(_seq), "follow", view.name, generation,
                                                  exclusive=self.exclusive, state=state))
            x = self._load(sink, generation, aggregates, state)
            self.phase = "catching_up"
            self.store.progress(self.host.slot, view.name, status="catching_up")
            _injected_pause("catching_up", self.halt)
            self._catch_up(x, epoch)
            self.phase = "switching"
            self.store.progress(self.host.slot, view.name, status="switching")
            _injected_pause("switching", self.halt)
            if state is not None:  # the rebuilt state goes live, every group is written
                self._step(GenerationStep(next(_seq), "publish", view.name, generation, version=x, state=state),
                           epoch)
            if live:
                self._step(GenerationStep(next(_seq), "commit", view.name, generation, version=x), epoch)
            else:
                truncated = self.host.truncated.get(view.name, 0)
                if truncated > x:
                    raise StartOver(f"a TRUNCATE emptied it at {format_lsn(truncated)}, after the snapshot")
                # The snapshot's records are at X - 1: the sweep deletes what is older.
                self._retry("commit_generation",
                            lambda: sink.commit_generation(view.name, begun, snapshot_version(x)))
            generation = None  # live now: nothing to abort
            _injected_pause("switched", self.halt)
            return x
        finally:
            try:
                if generation is not None and stepped:
                    self._abort(sink, generation, epoch, state)
            finally:
                sink.close()
                if aggregates is not None:
                    aggregates.close()

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        return with_retry(f"sink {self.view.sink} ({what} of {self.view.name})", fn, self.halt,
                          fields={"sink": self.view.sink, "view": self.view.name, "table": self.view.table})

    def _step(self, step: GenerationStep, epoch: int | None = None) -> int:
        """File ``step`` and wait until the lane's sink applied it; returns the stream's epoch.
        Raises :class:`StartOver` when the stream restarted meanwhile (its lanes forgot what
        the rebuild asked) or the step was refused, :class:`Interrupted` when stopping."""
        sink = self.view.sink
        while True:
            if self._stopping():
                raise Interrupted(f"stopped before the {step.kind} step")
            filed = self.host.file_step(sink, step)
            if filed is not None:
                break
            time.sleep(0.2)  # the stream is restarting
        got, reply = filed
        if epoch is not None and got != epoch:
            raise StartOver("the stream restarted")
        while not reply.filed.wait(0.2):
            if self.host.epoch != got:
                raise StartOver("the stream restarted")
            if self._stopping():
                raise Interrupted(f"stopped before the {step.kind} step")
        if reply.refused is not None:
            raise StartOver(reply.refused)
        while True:
            pos = self.host.lane_position(sink)
            if pos is None or pos[0] != got:
                raise StartOver("the stream restarted")
            if pos[2] >= step.seq:
                return got
            if self._stopping():
                raise Interrupted(f"stopped before the {step.kind} step was applied")
            time.sleep(0.05)

    def _abort(self, sink: Sink, generation: str, epoch: int | None, state: str | None) -> None:
        """Stop the stream following ``generation`` (when it still does), then delete it."""
        view = self.view
        step = GenerationStep(next(_seq), "abort", view.name, generation, exclusive=self.exclusive, state=state)
        if self.host.stop.is_set():
            # The daemon stops: its lane may still write G while it drains, and a write to a
            # deleted index would create it again. The row stays unfinished: the next start's
            # attempt deletes G (discard_unserved) before anything else.
            return
        try:
            if epoch is not None and self.host.epoch == epoch and not self.host.stop.is_set():
                try:
                    self._step(step, epoch)
                except (StartOver, Interrupted):
                    pass
            if isinstance(sink, LiveGenerations):
                sink.abort_generation(view.name, generation)
        except Exception as e:  # the next attempt's discard_unserved deletes it
            log.warning("view %s: could not delete generation %s (%s); the next rebuild does", view.name,
                        generation, one_line(e), extra=self._fields)

    def _load(self, sink: Sink, generation: str, aggregates: AggregateStore | None, state: str | None) -> int:
        """Phase 2: a snapshot at X from a TEMPORARY slot, loaded into ``generation`` (an
        aggregate view: its contributions into the rebuilt ``state``; the groups are written
        when it goes live); returns X."""
        view, slot = self.view, self.host.slot
        reader = SlotReader(self.dsn, f"{slot}_rb{os.getpid()}_{next(_seq)}")
        try:
            reader.connect()
            x, snapshot = reader.create_slot(temporary=True)
            total = self._estimate()
            self.phase, self.rows, self.rows_total = "loading", 0, total
            self.store.progress(slot, view.name, status="loading", consistent_point=x, rows_total=total)
            _injected_pause("loading", self.halt)
            log.info("online rebuild of view %s: snapshot at %s, about %s rows", view.name, format_lsn(x),
                     total if total is not None else "?", extra={**self._fields, "lsn": x})
            t0 = last = time.monotonic()

            def progress(_view: str, rows: int) -> None:
                nonlocal last
                self.rows = rows
                now = time.monotonic()
                if now - last < PROGRESS_EVERY:
                    return
                last = now
                rate = rows / (now - t0) if now > t0 else None
                eta = f", ETA {(total - rows) / rate:.0f} s" if rate and total and total > rows else ""
                log.info("online rebuild of view %s: %d rows, %.0f rows/s%s", view.name, rows, rate or 0.0, eta,
                         extra=self._fields)
                try:
                    self.store.progress(slot, view.name, rows_done=rows, rows_per_s=rate)
                except psycopg.Error as e:
                    log.debug("progress of the rebuild of %s not recorded: %s", view.name, one_line(e),
                              extra=self._fields)

            # Snapshot rows go in at X - 1, not X: the stream, writing G meanwhile, may hold a
            # commit at exactly X that the snapshot lacks (cdc.snapshot.snapshot_version).
            version = snapshot_version(x)
            with snapshot_connection(self.dsn, snapshot) as conn:
                if aggregates is not None and state is not None:
                    rows = self._load_state(conn, aggregates, state, version, progress)
                else:
                    stats = load_snapshot(conn, [view], {view.sink: sink}, version, stop=self.halt,
                                          should_stop=self.host.stop.is_set, generations={view.name: generation},
                                          commit=False, live=True, progress=progress,
                                          on_dead_letters=self.host.record_dead_letters)
                    rows = stats.records.get(view.name, 0)
            secs = time.monotonic() - t0
            self.rows = rows
            self.store.progress(slot, view.name, rows_done=rows, rows_per_s=rows / secs if secs > 0 else None)
            log.info("online rebuild of view %s: loaded %d rows in %.1f s", view.name, rows, secs,
                     extra=self._fields)
            return x
        finally:
            reader.close()  # the temporary slot goes with its connection

    def _load_state(self, conn: psycopg.Connection[Any], aggregates: AggregateStore, state: str, version: int,
                    progress: Callable[[str, int], None]) -> int:
        """An aggregate view's snapshot: its rows' contributions at ``version`` (X - 1) into the
        rebuilt ``state`` (:meth:`~pgderive.state.aggregates.AggregateStore.load_newer`: the
        stream feeds it meanwhile, newer contributions kept). Returns the rows read."""
        view, tree, agg = self.view, self.view.tree, self.view.aggregation
        assert tree is not None and agg is not None
        seen = 0

        def contributions() -> Iterator[tuple[Any, dict[str, Any]]]:
            nonlocal seen
            for chunk in tree.rows(conn):
                if self._stopping():
                    raise Interrupted(f"snapshot of view {view.name} interrupted after {seen} rows")
                for row in chunk:
                    yield tree.row_identity(row), row
                seen += len(chunk)
                progress(view.name, seen)
        return aggregates.load_newer(state, agg, contributions(), version)

    def _estimate(self) -> int | None:
        """The planner's row estimate of the view's table (``pg_class.reltuples``; None when the
        table was never analyzed)."""
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-rebuild") as conn:
                name = sql.Identifier(*self.view.table.split(".", 1)).as_string(conn)
                row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                                   (name,)).fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row is not None and row[0] is not None and row[0] >= 0 else None

    def _catch_up(self, x: int, epoch: int | None) -> None:
        """Phase 3: wait until the view's lane acknowledged ``x`` (int LSN)."""
        sink = self.view.sink
        while True:
            pos = self.host.lane_position(sink)
            if pos is not None:
                if epoch is not None and pos[0] != epoch:
                    raise StartOver("the stream restarted")
                if pos[1] >= x:
                    return
            if self._stopping():
                raise Interrupted("stopped while catching up")
            time.sleep(0.1)
