"""Loading views from a snapshot: the first run's bootstrap and ``rebuild``.

Every snapshot row is written at version = the snapshot's consistent point (ARCHITECTURE.md, rule 1)
into a new generation of each view, which is then committed: the sink makes it live and drops
everything older than the consistent point (rows deleted before it, leftovers of an
interrupted earlier bootstrap).
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import psycopg
from psycopg import sql

from cdc.changes import Row
from cdc.lsn import format_lsn
from cdc.snapshot import SPLIT_TYPES, KeyRange, key_ranges, read_table, row_estimate
from sinks.base import Op, Rejected, Sink, SinkError, WireLoad

from views.derive import DerivationError, View
from views.include import KeyTuple

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetter
from .retry import AnyOf, one_line, with_retry
from .wire import load_wire, wire_query

__all__ = ["load_snapshot", "derive_snapshot", "SnapshotChunk", "SnapshotConnect", "SnapshotStats", "Interrupted"]

log = logging.getLogger("pgderive.bootstrap")


class Interrupted(RuntimeError):
    """The load was stopped (SIGTERM/SIGINT) before it finished; nothing was committed."""


@dataclass
class SnapshotStats:
    """Rows read per table and records written per view, with time in seconds.

    ``rows[table]`` and ``seconds[table]`` add up every read of the table (each wire load, each
    row-by-row read, each key range: ARCHITECTURE.md, "Bootstrap"), so with parallel tasks
    ``seconds`` can exceed the wall time; ``records[view]`` and ``sink_seconds[view]`` add up
    the view's chunks and key ranges."""

    rows: dict[str, int] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sink_seconds: dict[str, float] = field(default_factory=dict)  # per view: time inside load()

    def rows_per_second(self, table: str) -> float:
        secs = self.seconds.get(table) or 0.0
        return self.rows.get(table, 0) / secs if secs > 0 else 0.0


@dataclass
class SnapshotChunk:
    """One chunk of a snapshot read: ``rows`` source rows of ``table`` and, per view over it,
    the Ops derived from them (``ops``: view name → list of :class:`~sinks.base.Op`) and the
    rows it could not derive (``errors``: view name → list of
    :class:`~views.derive.DerivationError`)."""

    table: str
    rows: int
    views: list[View]
    ops: dict[str, list[Op]]
    errors: dict[str, list[DerivationError]]


def derive_snapshot(conn: psycopg.Connection, views: Sequence[View], version: int, *,
                    chunk_rows: int = 5000, aggregates: AggregateStore | None = None,
                    key_range: KeyRange | None = None) -> Iterator[SnapshotChunk]:
    """What ``views`` hold according to the snapshot ``conn`` is in, as Ops at ``version``.

    The one derivation path shared by bootstrap, rebuild and ``verify``: each table is read
    once (``COPY``, chunks bounded by rows and bytes) for all views over it. Memory is bounded
    by one chunk. ``key_range``: only the rows in that range of the table's key (one part of a
    split table, ARCHITECTURE.md, "Bootstrap"); ``views`` must then be plain views of one table
    (no ``include``, no aggregate). Raises :class:`psycopg.Error` on read failures and
    :class:`ValueError` for a ``key_range`` with an include or aggregate view.
    """
    if key_range is not None and any(v.tree is not None for v in views):
        raise ValueError("a key range applies to plain views only, not include or aggregate views")
    # Views over the same table with the same ``where`` share one read.
    groups: dict[tuple[str, str], list[View]] = defaultdict(list)
    for v in views:
        if v.tree is None:
            groups[(v.table, v.spec.where or "")].append(v)
    for (table, _), tviews in groups.items():
        columns = list(dict.fromkeys(ct for v in tviews for ct in v.column_types))
        conds = [c for c in (tviews[0].where.sql() if tviews[0].where is not None else None,
                             key_range.sql() if key_range is not None else None) if c is not None]
        where = sql.SQL(" AND ").join(conds) if conds else None
        empty = True
        for chunk in read_table(conn, table, columns, chunk_rows=chunk_rows, where=where):
            empty = False
            yield _derive_chunk(table, tviews, chunk, version)
        if empty:  # still announce the table (an empty view is a result too)
            yield SnapshotChunk(table, 0, tviews, {v.name: [] for v in tviews}, {v.name: [] for v in tviews})
    for v in views:
        if v.aggregation is not None:
            yield _snapshot_groups(conn, v, version, aggregates)
            continue
        if v.tree is None:
            continue
        empty = True
        for rows in v.tree.rows(conn, chunk_rows=min(chunk_rows, 2000)):
            empty = False
            yield _derive_chunk(v.table, [v], rows, version)
        if empty:
            yield SnapshotChunk(v.table, 0, [v], {v.name: []}, {v.name: []})


def _snapshot_groups(conn: psycopg.Connection, v: View, version: int,
                     store: AggregateStore | None) -> SnapshotChunk:
    tree, agg = v.tree, v.aggregation
    assert tree is not None and agg is not None
    nrows = 0

    def contributions() -> Iterator[tuple[KeyTuple, dict[str, Any]]]:
        nonlocal nrows
        for rows in tree.rows(conn):
            nrows += len(rows)
            for row in rows:
                yield tree.row_identity(row), row
    if store is not None:
        store.reset(v.name)
        store.load(v.name, agg, contributions(), version)
        groups = store.all_groups(v.name, agg)
    else:  # verify: straight from the source rows, independent of the stored state
        groups = conn.execute(agg.direct_query(tree.select(), tree.nodes)).fetchall()
        counted = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS q").format(tree.select())).fetchone()
        nrows = counted[0] if counted is not None else 0
    ops, errors = v.group_ops(groups, [], version)
    return SnapshotChunk(v.table, nrows, [v], {v.name: ops}, {v.name: errors})


def _derive_chunk(table: str, tviews: list[View], chunk: list[Row], version: int) -> SnapshotChunk:
    ops: dict[str, list[Op]] = {}
    errors: dict[str, list[DerivationError]] = {}
    for v in tviews:
        vops, bad = [], []
        for r in chunk:
            try:
                op = v.row_op(r, version)
                if op is not None:
                    vops.append(op)
            except DerivationError as e:
                bad.append(e)
        ops[v.name], errors[v.name] = vops, bad
    return SnapshotChunk(table, len(chunk), tviews, ops, errors)


#: Opens another connection inside the same exported snapshot (``SET TRANSACTION SNAPSHOT``):
#: ``with connect() as conn: ...`` (:func:`cdc.snapshot.snapshot_connection`).
SnapshotConnect = Callable[[], ContextManager[psycopg.Connection]]


@dataclass(eq=False)
class _Task:
    """One unit of a parallel load: a wire load of one view (``query`` set), the row-by-row read
    of views sharing one table read, one include view, or every aggregate view (they share the
    aggregate store's connection). ``key_range``: the part of a split table it loads (wire or
    row by row; ARCHITECTURE.md, "Bootstrap"); None: the whole table."""

    views: list[View]
    query: sql.Composed | None = None
    key_range: KeyRange | None = None

    @property
    def part(self) -> str:
        """`` (RANGE)`` for a key range, to follow the table's name in log lines; else empty."""
        return f" ({self.key_range})" if self.key_range is not None else ""

    @property
    def label(self) -> str:
        return ", ".join(v.name for v in self.views) + self.part


def load_snapshot(conn: psycopg.Connection, views: Sequence[View], sinks: Mapping[str, Sink],
                  version: int, *, chunk_rows: int = 5000,
                  should_stop: Callable[[], bool] = lambda: False,
                  stop: threading.Event | None = None,
                  on_dead_letters: Callable[[list[DeadLetter]], None] | None = None,
                  aggregates: AggregateStore | None = None, wire_loads: bool = True,
                  connect: SnapshotConnect | None = None, concurrency: int = 1,
                  generations: Mapping[str, str] | None = None, commit: bool = True,
                  live: bool = False, progress: Callable[[str, int], None] | None = None,
                  split_rows: int = 0) -> SnapshotStats:
    """Load ``views`` from ``conn`` (already inside the snapshot's transaction) at ``version``.

    Views that qualify for a wire load (:mod:`pgderive.runtime.wire`; ``wire_loads=False`` turns it off)
    are loaded by one ``COPY`` each, encoded by Postgres. The others are read row by row:
    each table once (``COPY``) for all views over it. Progress is logged every 5 s
    with rows/s. Rows a view cannot derive and documents a sink rejects become dead letters
    passed to ``on_dead_letters`` (without it, the first one raises).

    Parallel loads (ARCHITECTURE.md, "Bootstrap"): with ``concurrency`` > 1 and ``connect`` (a
    connection inside the same exported snapshot), up to ``concurrency`` tasks run at once,
    each on a connection of its own: a wire load per view, a row-by-row read per table (shared
    by the views over it), an include view, all aggregate views together. Every task reads the
    same snapshot, so the result is the one a serial load gives. The first task that fails
    stops the others (its error is raised). With ``concurrency`` 1 the same tasks run one after
    another on ``conn``: the wire loads first, then the row-by-row reads.

    Key ranges (ARCHITECTURE.md, "Bootstrap"): in a parallel load, a table whose planner
    estimate (``pg_class.reltuples``) exceeds ``split_rows`` (YAML ``bootstrap.split_rows``; 0,
    the default here, never splits, nor does a serial load) and whose primary key is one ``smallint``/``integer``/
    ``bigint`` column is read in min(``concurrency``, ceil(estimate / ``split_rows``)) ranges of
    that key (:func:`cdc.snapshot.key_ranges`), each a task of its own: every wire load over it
    and the row-by-row read of its plain views. Include, aggregate and ``derive`` views keep one
    task. If a sink refuses the wire load of one range, every range of that view is loaded again
    row by row once every task ended (a refused Redis wire load removes the view's version
    entries at ``version``, other ranges' included).

    Every sink call (beginning and committing generations, each chunk, checkpoints) is retried
    with capped backoff (0.5 s … 30 s, a warning per retry) while it fails with a retryable
    :class:`~sinks.base.SinkError` (a sink down, stalled, answering 429/503): a sink outage
    during a bootstrap delays it, it does not end it.

    Online rebuilds (ARCHITECTURE.md, "Online rebuild"): ``generations`` (view name → the id
    ``begin_generation`` returned) are generations begun already, which this call loads without
    beginning them; ``commit=False`` leaves every generation uncommitted and no checkpoint
    written (the caller switches later); ``live``: the stream writes these views meanwhile, so
    only wire loads that keep a newer concurrent write are used. ``progress(view, rows)`` is
    called after each chunk with the rows read so far for that view (summed over its key ranges).

    Raises :class:`Interrupted` when ``should_stop()`` turns true or ``stop`` is set (checked
    per chunk and between retries) and :class:`~sinks.base.SinkError` when a sink fails in a way
    a retry cannot fix. Generations are committed only once every view is loaded.
    """
    by_name = {v.name: v for v in views}
    stats_lock = threading.Lock()
    # Rows read so far per (view, task): a view's progress is the sum over its key ranges.
    done: dict[tuple[str, int], int] = {}
    # Views of split tables whose wire load a sink refused in some range: every range of theirs
    # is loaded row by row once the other tasks ended (see the docstring).
    refused: set[str] = set()

    def report(view: str, task: _Task, rows: int) -> None:
        if progress is None:
            return
        with stats_lock:
            done[(view, id(task))] = rows
            total = sum(n for (name, _), n in done.items() if name == view)
        progress(view, total)

    def dead(entries: list[DeadLetter]) -> None:
        if not entries:
            return
        if on_dead_letters is None:
            raise DerivationError(entries[0].view, entries[0].table, entries[0].row, entries[0].error)
        on_dead_letters(entries)

    def write(v: View, ops: list[Op]) -> list[Rejected]:
        """Load one chunk of ``v`` into its generation (retrying), timing the sink's share."""
        sink = sinks[v.sink]
        t0 = time.monotonic()
        rejected = list(retried(f"sink {sink.name} (snapshot of {v.name})",
                                lambda: sink.load(v.name, begun[v.name], ops) or []))
        with stats_lock:
            stats.sink_seconds[v.name] = stats.sink_seconds.get(v.name, 0.0) + time.monotonic() - t0
        return rejected

    def settle(futures: list[tuple[View, Future[list[Rejected]]]]) -> None:
        for v, f in futures:
            dead([DeadLetter(v.name, v.table, r.op.key, version, r.error, r.op.doc) for r in f.result()])

    def wire(conn: psycopg.Connection, task: _Task) -> bool:
        """Load the task's view (of its key range, if any) by a wire load; False (nothing lost:
        it is loaded row by row instead) when the sink refuses it, e.g. a record key holding
        another Redis type."""
        v, query, part = task.views[0], task.query, task.part
        assert query is not None
        sink = sinks[v.sink]
        assert isinstance(sink, WireLoad)  # wire_query() returned a query only for such a sink
        log.info("snapshot of %s%s at %s for view %s (wire load: encoded by Postgres)", v.table, part,
                 format_lsn(version), v.name, extra={"view": v.name, "table": v.table, "sink": v.sink, "lsn": version})

        def attempt() -> tuple[int, float]:
            conn.execute("SAVEPOINT pgderive_wire")  # a failed COPY must not abort the snapshot
            try:
                out = load_wire(conn, v, sink, query, stopping, interrupted,
                                None if progress is None else lambda n: report(v.name, task, n), part)
            except BaseException:
                conn.execute("ROLLBACK TO SAVEPOINT pgderive_wire")
                raise
            conn.execute("RELEASE SAVEPOINT pgderive_wire")
            return out

        def interrupted(rows: int) -> Interrupted:
            halted.set()
            return Interrupted(f"snapshot of {v.table}{part} for view {v.name} interrupted after {rows} rows")
        try:
            records, secs = retried(f"sink {sink.name} (snapshot of {v.name})", attempt,
                                    {"view": v.name, "table": v.table, "sink": sink.name})
        except SinkError as e:
            if e.retryable:
                raise
            log.warning("%s; loading view %s row by row instead%s", one_line(e), v.name,
                        " (every key range, once the other tasks ended)" if task.key_range is not None else "",
                        extra={"view": v.name, "table": v.table, "sink": v.sink})
            return False
        with stats_lock:
            stats.rows[v.table] = stats.rows.get(v.table, 0) + records
            stats.seconds[v.table] = stats.seconds.get(v.table, 0.0) + secs
            stats.records[v.name] = stats.records.get(v.name, 0) + records
            stats.sink_seconds[v.name] = stats.sink_seconds.get(v.name, 0.0) + secs
        log.info("snapshot of %s%s for view %s done: %d rows in %.1f s (%.0f rows/s, wire load)", v.table,
                 part, v.name, records, secs, records / secs if secs else 0.0,
                 extra={"view": v.name, "table": v.table, "sink": v.sink})
        return True

    def retried(what: str, fn: Callable[[], Any], fields: Mapping[str, object] | None = None) -> Any:
        """``fn()`` through :func:`with_retry` (``fields``: its retry lines' log context);
        :class:`Interrupted` if a stop ends the retries."""
        try:
            return with_retry(what, fn, halt, fields=fields)
        except SinkError:
            if halt.is_set():
                raise Interrupted(f"snapshot stopped while retrying {what}") from None
            raise

    def row_by_row(conn: psycopg.Connection, task: _Task) -> None:
        """Read and derive the task's views (each table once for the views over it; only its key
        range, if any) and write them."""
        row_views, part = task.views, task.part
        # One writer thread per sink: Redis and OpenSearch load in parallel, and the next chunk is
        # read and derived while the previous one is being written (at most 2 chunks in memory).
        nsinks = len({v.sink for v in row_views})
        with ThreadPoolExecutor(max_workers=max(1, nsinks), thread_name_prefix="pgderive-load") as pool:
            in_flight: list[tuple[View, Future[list[Rejected]]]] = []
            table, t0, last_log, rows = None, 0.0, 0.0, 0
            names = ""  # the current table's views, comma-separated (the log lines' "view" field)

            def table_done() -> None:
                settle(in_flight)
                in_flight.clear()
                if table is None:
                    return
                secs = time.monotonic() - t0
                with stats_lock:
                    stats.rows[table] = stats.rows.get(table, 0) + rows
                    stats.seconds[table] = stats.seconds.get(table, 0.0) + secs
                log.info("snapshot of %s%s done: %d rows in %.1f s (%.0f rows/s)", table, part, rows, secs,
                         rows / secs if secs else 0.0, extra={"view": names, "table": table})

            # A table's time starts when its first chunk is asked for: an aggregate view's chunk
            # arrives only after all its rows were read and folded into groups.
            asked = time.monotonic()
            for chunk in derive_snapshot(conn, row_views, version, chunk_rows=chunk_rows, aggregates=aggregates,
                                         key_range=task.key_range):
                if chunk.table != table:
                    table_done()
                    table, t0, rows = chunk.table, asked, 0
                    names = ",".join(v.name for v in chunk.views)
                    last_log = t0
                    log.info("snapshot of %s%s at %s for view(s) %s", table, part, format_lsn(version),
                             ", ".join(v.name for v in chunk.views),
                             extra={"view": names, "table": table, "lsn": version})
                if stopping():
                    halted.set()
                    raise Interrupted(f"snapshot of {table}{part} interrupted after {rows} rows")
                dead([DeadLetter.for_view(by_name[name], e, version) if name in by_name
                      else DeadLetter.from_derivation_error(e, version)
                      for name, errs in chunk.errors.items() for e in errs])
                settle(in_flight)
                in_flight[:] = [(v, pool.submit(write, v, chunk.ops[v.name])) for v in chunk.views]
                with stats_lock:
                    for v in chunk.views:
                        stats.records[v.name] = stats.records.get(v.name, 0) + len(chunk.ops[v.name])
                rows += chunk.rows
                for v in chunk.views:
                    report(v.name, task, rows)
                now = time.monotonic()
                if now - last_log >= 5:
                    log.info("snapshot of %s%s: %d rows, %.0f rows/s", table, part, rows, rows / (now - t0),
                             extra={"view": names, "table": table})
                    last_log = now
                asked = now
            table_done()

    def run_task(conn: psycopg.Connection, task: _Task) -> None:
        if task.query is None:
            row_by_row(conn, task)
            return
        name = task.views[0].name
        if task.key_range is None:
            if not wire(conn, task):
                row_by_row(conn, task)
            return
        with stats_lock:
            if name in refused:  # loaded row by row after the other tasks
                return
        if not wire(conn, task):
            with stats_lock:
                refused.add(name)

    def run(tasks: list[_Task]) -> None:
        if connect is None or concurrency <= 1 or len(tasks) <= 1:
            for task in tasks:
                run_task(conn, task)
        else:
            _run_parallel(tasks, connect, concurrency, run_task, halted)

    stats = SnapshotStats()
    # Set when stopping() turns true or the caller's ``stop`` is set: gives up retries.
    stop_event = stop if stop is not None else threading.Event()
    # Set when the load must end (interrupted, or a parallel task failed): the other tasks stop
    # at their next chunk and retries give up.
    halted = threading.Event()
    halt = AnyOf(stop_event, halted)
    def stopping() -> bool:
        return should_stop() or halt.is_set()

    def begin(v: View) -> Any:
        return retried(f"sink {sinks[v.sink].name} (new generation of {v.name})",
                       lambda: sinks[v.sink].begin_generation(v.name, version))

    started = time.monotonic()
    given = generations or {}
    begun = {v.name: given[v.name] if v.name in given else begin(v) for v in views}
    parallel = concurrency > 1 and connect is not None
    tasks = _plan(conn, views, sinks, version, wire_loads, begun, live,
                  concurrency=concurrency if parallel else 1, split_rows=split_rows if parallel else 0)
    run(tasks)
    if refused:
        # Every range again (the wire-loaded ones' version entries may be gone), row by row.
        again = [_Task(t.views, None, t.key_range) for t in tasks
                 if t.query is not None and t.views[0].name in refused]
        with stats_lock:
            for name in refused:
                stats.records[name] = 0
                stats.sink_seconds[name] = 0.0
            for key in [k for k in done if k[0] in refused]:
                del done[key]
        log.warning("loading view(s) %s row by row: a sink refused the wire load of a key range",
                    ", ".join(sorted(refused)), extra={"view": ",".join(sorted(refused))})
        run(again)
    secs = time.monotonic() - started
    for v in views:  # one line per view, whatever its key ranges and tasks
        log.info("snapshot of view %s done: %d records in %.1f s", v.name, stats.records.get(v.name, 0), secs,
                 extra={"view": v.name, "table": v.table, "sink": v.sink, "lsn": version})
    if not commit:
        return stats
    for v in views:
        sink = sinks[v.sink]
        if stopping():
            halted.set()
            raise Interrupted(f"snapshot interrupted before committing view {v.name}")
        retried(f"sink {sink.name} (commit of {v.name})",
                lambda: sink.commit_generation(v.name, begun[v.name], version))
        # The view is complete as of ``version``: its checkpoint says so (see engine startup).
        retried(f"sink {sink.name} (checkpoint of {v.name})", lambda: sink.write_checkpoint([v.name], version))
    return stats


def _plan(conn: psycopg.Connection, views: Sequence[View], sinks: Mapping[str, Sink], version: int,
          wire_loads: bool, generations: Mapping[str, str], live: bool, *,
          concurrency: int = 1, split_rows: int = 0) -> list[_Task]:
    """The load's tasks, largest-first where it is known cheaply (wire loads first): a wire load
    per qualifying view, a row-by-row read per ``(table, where)`` (views over it share it), one
    task per include view, one for all aggregate views. With ``split_rows`` > 0 and
    ``concurrency`` > 1, the wire loads and row-by-row reads of a large table's plain views are
    a task per key range (:func:`_split`); its ``derive`` views keep one task. The wire loads of
    split views take turns range by range (view A's first range, view B's first, A's second, ..),
    so the first tasks to run write to different sinks, as unsplit wire loads do."""
    splits: dict[str, list[KeyRange | None]] = {}

    def parts(v: View) -> list[KeyRange | None]:
        if split_rows <= 0 or concurrency <= 1 or v.tree is not None or v.derive_fn is not None:
            return [None]
        if v.table not in splits:
            splits[v.table] = _split(conn, v, concurrency, split_rows)
        return splits[v.table]

    wired: list[list[_Task]] = []  # per view: its one task, or one per key range
    rows: dict[tuple[str, str], list[View]] = defaultdict(list)
    trees: list[_Task] = []
    aggs: list[View] = []
    for v in views:
        query = (wire_query(conn, v, sinks[v.sink], version, generation=generations[v.name], live=live)
                 if wire_loads else None)
        if query is not None:
            ranges = parts(v)
            if ranges == [None]:
                wired.append([_Task([v], query)])
            else:  # the same query, restricted to each range (a view qualifies whatever the range)
                wired.append([_Task([v], wire_query(conn, v, sinks[v.sink], version, generation=generations[v.name],
                                                    live=live, within=r.sql() if r is not None else None), r)
                              for r in ranges])
        elif v.aggregation is not None:
            aggs.append(v)
        elif v.tree is not None:
            trees.append(_Task([v]))
        else:
            rows[(v.table, v.spec.where or "")].append(v)
    read: list[_Task] = []
    for vs in rows.values():
        plain = [v for v in vs if v.derive_fn is None]
        ranges = parts(plain[0]) if plain else [None]
        if ranges == [None]:
            read.append(_Task(vs))
            continue
        read += [_Task(plain, None, r) for r in ranges]
        derived = [v for v in vs if v.derive_fn is not None]
        if derived:
            read.append(_Task(derived))
    turns = [t for turn in itertools.zip_longest(*wired) for t in turn if t is not None]
    return turns + read + trees + ([_Task(aggs)] if aggs else [])


def _split(conn: psycopg.Connection, v: View, concurrency: int, split_rows: int) -> list[KeyRange | None]:
    """The key ranges ``v``'s table is read in (ARCHITECTURE.md, "Bootstrap"): ``[None]`` (one
    task, the whole table) unless the table's primary key is a single ``smallint``/``integer``/
    ``bigint`` column and its planner estimate (``pg_class.reltuples``, None before the first
    VACUUM/ANALYZE: not split) exceeds ``split_rows``; then min(``concurrency``,
    ceil(estimate / ``split_rows``)) ranges of that column (:func:`cdc.snapshot.key_ranges`:
    equal-width between its min and max in the snapshot). Raises :class:`psycopg.Error`."""
    pk = v.info.primary_key
    if len(pk) != 1 or v.info.columns.get(pk[0]) not in SPLIT_TYPES:
        return [None]
    estimate = row_estimate(conn, v.table)
    if estimate is None or estimate <= split_rows:
        return [None]
    t0 = time.monotonic()
    ranges = key_ranges(conn, v.table, pk[0], min(concurrency, math.ceil(estimate / split_rows)))
    if len(ranges) < 2:
        return [None]
    log.info("snapshot of %s (about %.0f rows) split into %d key ranges of %s in %.2f s: %s", v.table,
             estimate, len(ranges), pk[0], time.monotonic() - t0, "; ".join(str(r) for r in ranges),
             extra={"view": v.name, "table": v.table})
    return list(ranges)


def _run_parallel(tasks: list[_Task], connect: SnapshotConnect, concurrency: int,
                  run: Callable[[psycopg.Connection, _Task], None], failed: threading.Event) -> None:
    """Run ``tasks`` on ``concurrency`` threads, each with a connection of its own in the
    snapshot (opened when the thread takes its first task). The first error sets ``failed``
    (the other tasks stop at their next chunk) and is raised once every thread has ended."""
    pending = list(tasks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with ExitStack() as stack:
            conn: psycopg.Connection | None = None
            while True:
                with lock:
                    if not pending or errors:
                        return
                    task = pending.pop(0)
                try:
                    if conn is None:
                        conn = stack.enter_context(connect())
                    log.debug("loading %s", task.label)
                    run(conn, task)
                except BaseException as e:
                    with lock:
                        errors.append(e)
                    failed.set()
                    return

    log.info("loading %d task(s) on up to %d connections in the snapshot", len(tasks), concurrency)
    threads = [threading.Thread(target=worker, name=f"pgderive-bootstrap-{i}", daemon=True)
               for i in range(min(concurrency, len(tasks)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
        raise first
