"""Aggregate state in the source database: ``pgderive.agg_rows`` (each source row's
contribution with its version) and ``pgderive.agg_groups`` (each group's state).

Why the state lives in Postgres and how a batch moves it exactly once is explained in
:mod:`views.aggregate`, which defines the aggregations themselves (ARCHITECTURE.md, "State").

Table ``pgderive.agg_rows``: ``view``, ``row_key`` (text, :func:`views.aggregate.row_key` of the
root identity; PK with ``view``), ``version`` (bigint: the commit LSN, as an int, of the change
that last set the row — versions are LSNs, ARCHITECTURE.md rule 1), ``grp`` and ``vals`` (jsonb;
both NULL for a deleted row's tombstone); index on ``(view, grp)``. Table ``pgderive.agg_groups``:
``view``, ``grp`` (jsonb; PK with ``view``), ``state`` (jsonb). Table ``pgderive.agg_touched``:
``view``, ``grp`` (jsonb; PK with ``view``), ``version`` (bigint: the highest version of a batch
that touched the group; what a replay re-emits, see :meth:`AggregateStore.apply`; for a
derivation worker also the version of the group's record, see :meth:`AggregateStore.apply_worker`).
Their DDL is
migrations ``0003_aggregates.sql`` and ``0004_agg_touched.sql``, applied by
:func:`pgderive.state.schema.migrate`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import orjson
import psycopg
from psycopg import sql

from views.aggregate import Aggregation, group_text, row_key

from .schema import migrate

__all__ = ["AggregateStore", "GroupMembers", "WorkerGroups", "group_lock_keys", "group_members",
           "next_group_version", "shadow_name"]

Row = tuple[Any, ...]
#: A root's identity values: views.include.KeyTuple, a bare ``tuple`` alias that mypy --strict
#: rejects with or without type arguments.
Key = tuple[Any, ...]


def _query(part: sql.Composable) -> sql.Composed:
    """``part`` as a :class:`~psycopg.sql.Composed`: :class:`views.aggregate.Aggregation`'s
    builders return the :class:`~psycopg.sql.Composable` base, which ``execute`` is not typed
    to accept."""
    return sql.Composed([part])


def shadow_name(view: str) -> str:
    """The name an online rebuild of ``view`` builds its new state under (ARCHITECTURE.md,
    "Online rebuild"): ``VIEW#rebuild``; ``#`` cannot appear in a view's name."""
    return f"{view}#rebuild"


def _lock(conn: psycopg.Connection[Any], view: str, shared: bool = False) -> None:
    """The transaction-level advisory lock of ``view``'s state: an online rebuild's final
    recomputation and the stream's applies to the state it builds take it, so neither sees
    half of the other (Postgres manual, "Advisory Lock Functions"). ``shared``: the shared
    mode, which derivation workers' applies take (:meth:`AggregateStore.apply_worker`; they
    exclude each other per group instead) and a worker's TRUNCATE excludes."""
    func = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(f"SELECT {func}(hashtext(%s))", (f"pgderive.agg:{view}",))


def group_lock_keys(view: str, groups: Iterable[str]) -> list[int]:
    """The advisory lock keys (signed 64-bit ints) of ``view``'s groups (their JSON texts as
    ``pgderive.agg_rows.grp::text`` prints them), distinct and in ascending order: the order in
    which every derivation worker takes them, so two workers never wait for each other in a
    cycle. A key is the first 8 bytes of BLAKE2b over ``pgderive.agg:VIEW`` NUL ``GROUP``; two
    groups sharing a key (a collision) only serialize more than needed. Either spelling of a
    group's text (:func:`views.aggregate.group_text`) gives the same key."""
    keys = set()
    for grp in groups:
        text = group_text(grp)  # jsonb and Python spell a group differently
        digest = hashlib.blake2b(f"pgderive.agg:{view}\0{text}".encode(), digest_size=8).digest()
        keys.add(int.from_bytes(digest, "big", signed=True))
    return sorted(keys)


def next_group_version(previous: int | None, top: int) -> int:
    """The version (int) a derivation worker writes a group's record at, given the version its
    record was last written at (``previous``; None: never) and the highest version (commit LSN)
    of the changes now applied to it (``top``): ``max(previous + 1, top)``. Strictly increasing
    per group, so of two writes of a group the one computed later from the state wins in the
    sink whatever order they arrive in, and never below a change the record includes (a
    TRUNCATE at V then sweeps only records computed before it). The SQL of
    :meth:`AggregateStore.apply_worker` computes the same (kept here for the tests and the
    docs)."""
    return top if previous is None else max(previous + 1, top)


@dataclass(frozen=True, slots=True)
class WorkerGroups:
    """What a derivation worker's apply or TRUNCATE produced for an aggregate view.

    Attributes:
        rows: :meth:`Aggregation.result_sql` rows of the groups that have rows.
        touched: JSON texts of every group concerned (those without a row: to delete).
        versions: group JSON text → the version to write its record (or delete) at
            (:func:`next_group_version`), read in the transaction that computed ``rows``.
    """

    rows: list[tuple[Any, ...]]
    touched: list[str]
    versions: dict[str, int]


class AggregateStore:
    """``pgderive.agg_rows`` and ``pgderive.agg_groups`` in the source database: the
    contributions of every row of every aggregate view with their versions, and every group's
    state (see the module docstring).

    Args:
        dsn: libpq connection string of the source. Schema ``pgderive`` is migrated
            (:func:`~pgderive.state.schema.migrate`) once per connection, when it opens.
    """

    TABLE = sql.Identifier("pgderive", "agg_rows")

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None

    def connection(self) -> psycopg.Connection[Any]:
        """The store's connection (not autocommit; every method runs one transaction), opened
        and migrated on first use and after it was closed."""
        if self.conn is None or self.conn.closed:
            conn = psycopg.connect(self.dsn, application_name="pgderive-aggregates")
            try:
                migrate(conn)
            except BaseException:
                conn.close()  # never hand out a connection to an unmigrated schema
                raise
            self.conn = conn
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def apply(self, view: str, agg: Aggregation,
              items: Iterable[tuple[Key, int, dict[str, Any] | None]], *,
              lock: bool = False) -> tuple[list[Row], list[str]]:
        """Store contributions ``(root identity, version, row or None)`` of ``view`` (newer
        versions only) and move the states of the groups they leave and enter by the
        replaced contributions, in one transaction.

        Returns ``(rows, touched)``: :meth:`Aggregation.result_sql` rows of the touched groups
        that still have rows, and the JSON texts of all touched groups (those without a row
        are empty: to delete). A replay changes no state and returns the current groups: those
        its rows are in, and every group another batch moved at or after the replayed version
        (``pgderive.agg_touched``), since the crash that caused the replay may have come
        between that batch's commit here and its write to the sink. ``lock``: take the state's
        advisory lock first (a state an online rebuild builds, :meth:`load_newer`).
        Raises :class:`psycopg.Error`."""
        keyed = self._keyed(agg, items)
        if not keyed:
            return [], []
        conn = self.connection()
        with conn.transaction():
            if lock:
                _lock(conn, view)
            rows, groups, _ = self._apply_in(conn, view, agg, keyed, worker=False)
        return rows, groups

    def apply_worker(self, view: str, agg: Aggregation,
                     items: Iterable[tuple[Key, int, dict[str, Any] | None]], *,
                     attempts: int = 3) -> WorkerGroups:
        """:meth:`apply` for a derivation worker (ARCHITECTURE.md, "Kafka workers"), where
        several processes move one view's groups concurrently: the transaction takes the
        view's advisory lock in shared mode (a worker's :meth:`truncate_worker` takes it
        exclusively), then one advisory lock per touched group in :func:`group_lock_keys` order,
        so two workers move a group one after the other, each from the state the other
        committed. Every touched group's ``pgderive.agg_touched.version`` becomes
        :func:`next_group_version` of itself and the batch's top version, and is returned as
        the version to write the group's record at: a later transaction of a group always
        writes at a higher version, so the sinks keep the record computed last, whatever order
        the workers' lanes deliver them in, and no lock is held across the sink write. The
        column keeps its meaning for replays (at least the top version of every batch that
        touched the group). A deadlock (two workers' row locks of one row after a rebalance) is
        retried, ``attempts`` times in all. Raises :class:`psycopg.Error`."""
        keyed = self._keyed(agg, items)
        if not keyed:
            return WorkerGroups([], [], {})
        conn = self.connection()
        for attempt in range(attempts):
            try:
                with conn.transaction():
                    _lock(conn, view, shared=True)
                    rows, groups, versions = self._apply_in(conn, view, agg, keyed, worker=True)
                return WorkerGroups(rows, groups, versions or {})
            except psycopg.errors.DeadlockDetected:
                if attempt + 1 >= attempts:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _keyed(agg: Aggregation, items: Iterable[tuple[Key, int, dict[str, Any] | None]]
               ) -> dict[str, tuple[int, tuple[str | None, str | None]]]:
        """``row_key → (version, (grp, vals))`` of the items, the last one per row."""
        keyed: dict[str, tuple[int, tuple[str | None, str | None]]] = {}
        for key, version, row in items:
            keyed[row_key(key)] = (version, agg.contribution(row) if row is not None else (None, None))
        return keyed

    def _apply_in(self, conn: psycopg.Connection[Any], view: str, agg: Aggregation,
                  keyed: dict[str, tuple[int, tuple[str | None, str | None]]], *,
                  worker: bool) -> tuple[list[Row], list[str], dict[str, int] | None]:
        """The body of :meth:`apply` (``worker`` False) and :meth:`apply_worker`, inside the
        caller's transaction; returns ``(rows, touched, versions)``, versions (keyed by
        :func:`~views.aggregate.group_text`) only for a worker."""
        old = conn.execute(sql.SQL("SELECT row_key, version, grp::text, vals::text FROM {} WHERE view = %s "
                                   "AND row_key = ANY(%s) FOR UPDATE").format(self.TABLE),
                           (view, list(keyed))).fetchall()
        stored = {k: (v, g, x) for k, v, g, x in old}
        touched: set[str] = {g for _, g, _ in stored.values() if g is not None}
        write, deltas = [], []
        replayed: int | None = None  # lowest version of a contribution already stored
        for k, (version, (grp, vals)) in keyed.items():
            if grp is not None:
                touched.add(grp)
            prev = stored.get(k)
            if prev is not None and version <= prev[0]:
                replayed = version if replayed is None else min(replayed, version)
            elif prev is None or version > prev[0]:
                write.append((view, k, version, grp, vals))
                if prev is not None and prev[1] is not None:
                    deltas.append((-1, prev[1], prev[2]))
                if grp is not None:
                    deltas.append((1, grp, vals))
        if replayed is not None:
            touched.update(g for (g,) in conn.execute(
                "SELECT grp::text FROM pgderive.agg_touched WHERE view = %s AND version >= %s",
                (view, replayed)))
        if worker and touched:
            # One spelling per group (jsonb's and Python's differ), then the group locks, before
            # any state is read or written: the previous holder of a group has committed its
            # move. unnest reads the array in order, so the locks are taken in ascending order.
            touched = {group_text(g) for g in touched}
            conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS u(k)",
                         (group_lock_keys(view, touched),))
        if write:
            with conn.cursor() as cur:
                cur.executemany(sql.SQL(
                    "INSERT INTO {} (view, row_key, version, grp, vals) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (view, row_key) DO UPDATE SET version = excluded.version, "
                    "grp = excluded.grp, vals = excluded.vals").format(self.TABLE), write)
        if deltas:
            self._move(conn, view, agg, deltas)
        groups = sorted(touched)
        versions: dict[str, int] | None = None
        if groups:
            top = max(version for version, _ in keyed.values())
            versions = self._touch(conn, view, groups, top, worker)
        rows = (conn.execute(_query(agg.result_sql(True)), {"view": view, "groups": groups}).fetchall()
                if groups else [])
        return rows, groups, versions

    @staticmethod
    def _touch(conn: psycopg.Connection[Any], view: str, groups: list[str], top: int,
               worker: bool) -> dict[str, int] | None:
        """Raise ``pgderive.agg_touched.version`` of ``groups`` to ``top``, or, for a worker, to
        :func:`next_group_version` (the group's locks are held), returning the new versions by
        :func:`~views.aggregate.group_text`. Inside the caller's transaction."""
        new = ("greatest(pgderive.agg_touched.version + 1, excluded.version)" if worker
               else "greatest(pgderive.agg_touched.version, excluded.version)")
        cur = conn.execute(f"INSERT INTO pgderive.agg_touched (view, grp, version) SELECT %s, g, %s "
                           f"FROM unnest(%s::jsonb[]) AS u(g) ON CONFLICT (view, grp) DO UPDATE SET "
                           f"version = {new} RETURNING grp::text, version", (view, top, groups))
        if not worker:
            return None
        return {group_text(g): int(v) for g, v in cur.fetchall()}

    @staticmethod
    def _move(conn: psycopg.Connection, view: str, agg: Aggregation, deltas: list[tuple[int, str, str]]) -> None:
        """Apply ``(sign, grp, vals)`` deltas to the stored group states (inside the caller's
        transaction): merged where exact, recomputed from the contributions where not."""
        if agg.incremental:
            merged = conn.execute(_query(agg.merge_sql()), {"view": view, "sign": [d[0] for d in deltas],
                                                    "grp": [d[1] for d in deltas],
                                                    "vals": [d[2] for d in deltas]}).fetchall()
        else:
            merged = [(g, None, True, True) for g in {d[1] for d in deltas}]
        keep = [(g, s) for g, s, rows, stale in merged if rows and not stale]
        gone = [g for g, _, rows, stale in merged if not rows or stale]
        stale = [g for g, _, rows, stale in merged if rows and stale]
        if gone:
            conn.execute("DELETE FROM pgderive.agg_groups WHERE view = %s AND grp = ANY(%s::jsonb[])", (view, gone))
        if keep:
            conn.execute("INSERT INTO pgderive.agg_groups (view, grp, state) SELECT %s, g, s FROM "
                         "unnest(%s::jsonb[], %s::jsonb[]) AS u(g, s) ON CONFLICT (view, grp) DO UPDATE "
                         "SET state = excluded.state", (view, [k[0] for k in keep], [k[1] for k in keep]))
        if stale:
            conn.execute(_query(agg.state_sql(True)), {"view": view, "groups": stale})

    def truncate(self, view: str, agg: Aggregation, version: int) -> None:
        """Every row of ``view``'s table is gone as of ``version`` (a TRUNCATE): tombstones;
        the group states are recomputed from what is left (rows a replay already re-added)."""
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("UPDATE {} SET grp = NULL, vals = NULL, version = %s WHERE view = %s "
                                 "AND version < %s").format(self.TABLE), (version, view, version))
            conn.execute("DELETE FROM pgderive.agg_groups WHERE view = %s", (view,))
            conn.execute(_query(agg.state_sql(False)), {"view": view})

    def truncate_worker(self, view: str, agg: Aggregation, version: int) -> WorkerGroups:
        """:meth:`truncate` for a derivation worker, which reads a TRUNCATE at ``version`` once
        per partition, on any worker, while other workers apply changes after it: under the
        view's advisory lock in exclusive mode (no :meth:`apply_worker` of the view runs
        meanwhile), the contributions older than ``version`` become tombstones (at ``version``
        - 1: the TRUNCATE's own transaction may insert the same rows at ``version``) and the states
        are recomputed from what is left (rows after the TRUNCATE that other partitions brought
        already). Every group the view ever had (``pgderive.agg_touched`` and the states before)
        gets :func:`next_group_version` of itself and ``version``; the result says how to write
        each: its record, or a delete when it has no rows left. A record written before this
        from a state that still held rows older than the TRUNCATE may carry a version above it
        (it also held a newer row); rewriting every group supersedes it. Idempotent: the second
        partition's TRUNCATE finds nothing older to remove and writes the same records at higher
        versions. Raises :class:`psycopg.Error`."""
        conn = self.connection()
        with conn.transaction():
            _lock(conn, view)
            before = [g for (g,) in conn.execute(
                "SELECT grp::text FROM pgderive.agg_groups WHERE view = %s UNION "
                "SELECT grp::text FROM pgderive.agg_touched WHERE view = %s", (view, view))]
            # Tombstones at V - 1, not V: they refuse every change older than the TRUNCATE
            # (version <= V - 1) and let in the rows its own transaction inserts (version V),
            # which other partitions deliver before or after it.
            conn.execute(sql.SQL("UPDATE {} SET grp = NULL, vals = NULL, version = %s WHERE view = %s "
                                 "AND version < %s").format(self.TABLE), (version - 1, view, version))
            conn.execute("DELETE FROM pgderive.agg_groups WHERE view = %s", (view,))
            conn.execute(_query(agg.state_sql(False)), {"view": view})
            groups = sorted({group_text(g) for g in before})
            if not groups:
                return WorkerGroups([], [], {})
            versions = self._touch(conn, view, groups, version, True) or {}
            rows = conn.execute(_query(agg.result_sql(True)), {"view": view, "groups": groups}).fetchall()
        return WorkerGroups(rows, groups, versions)

    def reset(self, view: str) -> int:
        """Forget ``view``'s contributions and states (before a bootstrap or rebuild loads
        them again, or when ``pgderive drop`` removes the view), in one transaction; returns
        how many group states were removed. A view that is not an aggregate view has no rows
        here: nothing is removed (0). The tables are keyed by view name only, not by slot."""
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {} WHERE view = %s").format(self.TABLE), (view,))
            groups = conn.execute("DELETE FROM pgderive.agg_groups WHERE view = %s", (view,)).rowcount
            conn.execute("DELETE FROM pgderive.agg_touched WHERE view = %s", (view,))
        return max(groups, 0)

    def load(self, view: str, agg: Aggregation, rows: Iterable[tuple[Key, dict[str, Any]]],
             version: int) -> None:
        """Append snapshot contributions at ``version`` (after :meth:`reset`) and compute every
        group's state from them, committed."""
        conn = self.connection()
        with conn.transaction():
            with conn.cursor().copy(sql.SQL(
                    "COPY {} (view, row_key, version, grp, vals) FROM STDIN").format(self.TABLE)) as copy:
                for key, row in rows:
                    grp, vals = agg.contribution(row)
                    copy.write_row((view, row_key(key), version, grp, vals))
            conn.execute(_query(agg.state_sql(False)), {"view": view})

    def load_newer(self, view: str, agg: Aggregation, rows: Iterable[tuple[Key, dict[str, Any]]],
                   version: int, chunk_rows: int = 5000) -> int:
        """An online rebuild's snapshot load (ARCHITECTURE.md, "Online rebuild"): contributions
        at ``version`` (int LSN) into ``view``'s state, each kept only where the stream has not
        stored a newer one meanwhile (a later change or a delete's tombstone), then every group's
        state computed again from the contributions. The contributions are staged in a temporary
        table, then written ``chunk_rows`` at a time, each chunk and the final computation in a
        transaction holding the state's advisory lock: the stream's applies to this state
        (:meth:`apply` with ``lock``) wait at most one chunk, and never deadlock with the load
        on the rows both write. Returns the rows read. Raises :class:`psycopg.Error`."""
        conn = self.connection()
        n = 0
        with conn.transaction():
            conn.execute("DROP TABLE IF EXISTS pgderive_agg_load")
            conn.execute("CREATE TEMP TABLE pgderive_agg_load (n bigint, row_key text, grp jsonb, vals jsonb)")
            with conn.cursor().copy("COPY pgderive_agg_load (n, row_key, grp, vals) FROM STDIN") as copy:
                for key, row in rows:
                    grp, vals = agg.contribution(row)
                    copy.write_row((n, row_key(key), grp, vals))
                    n += 1
            conn.execute("CREATE INDEX ON pgderive_agg_load (n)")
        try:
            for start in range(0, n, chunk_rows):
                with conn.transaction():
                    _lock(conn, view)
                    conn.execute(sql.SQL(
                        "INSERT INTO {t} AS r (view, row_key, version, grp, vals) "
                        "SELECT %s, row_key, %s, grp, vals FROM pgderive_agg_load WHERE n >= %s AND n < %s "
                        "ON CONFLICT (view, row_key) DO UPDATE SET version = excluded.version, "
                        "grp = excluded.grp, vals = excluded.vals WHERE r.version < excluded.version"
                    ).format(t=self.TABLE), (view, version, start, start + chunk_rows))
            with conn.transaction():
                _lock(conn, view)
                conn.execute("DELETE FROM pgderive.agg_groups WHERE view = %s", (view,))
                conn.execute(_query(agg.state_sql(False)), {"view": view})
        finally:
            with conn.transaction():
                conn.execute("DROP TABLE IF EXISTS pgderive_agg_load")
        return n

    def swap(self, source: str, view: str) -> None:
        """Make the state built under ``source`` (:func:`shadow_name`) ``view``'s, replacing
        what ``view`` had, in one transaction under both states' advisory locks. Raises
        :class:`psycopg.Error`."""
        conn = self.connection()
        with conn.transaction():
            for name in sorted((source, view)):
                _lock(conn, name)
            for table in ("agg_rows", "agg_groups", "agg_touched"):
                ident = sql.Identifier("pgderive", table)
                conn.execute(sql.SQL("DELETE FROM {} WHERE view = %s").format(ident), (view,))
                conn.execute(sql.SQL("UPDATE {} SET view = %s WHERE view = %s").format(ident), (view, source))

    def all_groups(self, view: str, agg: Aggregation) -> list[Row]:
        """:meth:`Aggregation.result_sql` rows of every group of ``view``."""
        conn = self.connection()
        with conn.transaction():
            return conn.execute(_query(agg.result_sql(False)), {"view": view}).fetchall()


@dataclass(frozen=True, slots=True)
class GroupMembers:
    """What ``pgderive.agg_rows``/``agg_groups`` hold of one group of one view (``pgderive
    explain``, ARCHITECTURE.md, "Explain").

    Attributes:
        rows: the live contributions in the group (source rows counted by its state).
        sample: up to the asked number of them, ``(root identity texts, version)``: the
            identity values as Postgres text in identity-column order (``None`` for NULL) and the
            int LSN of the change that last set the contribution; highest versions first.
        has_state: whether ``pgderive.agg_groups`` has a state for the group.
    """

    rows: int
    sample: list[tuple[list[str | None], int]]
    has_state: bool


def group_members(conn: psycopg.Connection[Any], view: str, group: Sequence[tuple[int, str]],
                  sample: int = 5) -> GroupMembers | None:
    """The contributions of ``view``'s groups whose ``group_by`` values at the given positions
    equal the given texts (``group``: ``(position in group_by, value as Postgres text)``; the
    text :func:`views.aggregate.Aggregation.contribution` stores), on ``conn`` (in the caller's
    transaction). None when schema ``pgderive`` has no aggregate state (never created; nothing
    is created here). Raises :class:`psycopg.Error`."""
    row = conn.execute("SELECT to_regclass('pgderive.agg_rows') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    conds = sql.SQL("").join(sql.SQL(" AND grp->>{} = {}").format(sql.Literal(i), sql.Literal(text))
                             for i, text in group)
    count = conn.execute(sql.SQL("SELECT count(*) FROM pgderive.agg_rows WHERE view = %s AND grp IS NOT NULL{}")
                         .format(conds), (view,)).fetchone()
    picked = conn.execute(sql.SQL("SELECT row_key, version FROM pgderive.agg_rows WHERE view = %s AND grp IS NOT NULL{} "
                                  "ORDER BY version DESC, row_key LIMIT %s").format(conds), (view, sample)).fetchall()
    state = conn.execute(sql.SQL("SELECT count(*) FROM pgderive.agg_groups WHERE view = %s{}").format(conds),
                         (view,)).fetchone()
    return GroupMembers(rows=int(count[0]) if count else 0,
                        sample=[(list(orjson.loads(k)), int(v)) for k, v in picked],
                        has_state=bool(state and state[0]))
