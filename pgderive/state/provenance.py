"""``pgderive.commits``: the xid and commit timestamp of every commit the stream wrote with
(ARCHITECTURE.md, "Provenance").

A record's version is the commit LSN of the transaction that last wrote it (rule 1); this table
turns that LSN into what an operator asks about — the transaction id and the commit time —
for ``pgderive explain``. One row per source transaction that changed at least one view: wal2json
reports both facts in its ``"B"`` message (wal2json README, "format-version 2": ``xid``,
``timestamp``). Rows are written by :class:`pgderive.runtime.provenance.CommitRecorder`: one row
per flush holding that flush's commits as parallel arrays (see the migration,
``migrations/0008_commits.sql``), deleted after the configured retention
(:meth:`CommitStore.prune`).

Why a table in the source, not the sinks' version entries: a sink-neutral store costs one
statement per flush whatever the sinks are (an OpenSearch document has no place for it but
its own fields, which the user queries), and a record loaded from a snapshot has no single
commit anyway. Its cost is measured in ``make bench`` (scenario "1-provenance").
"""
from __future__ import annotations

import datetime as dt
from typing import Any, NamedTuple, Sequence

import psycopg

from .schema import migrate

__all__ = ["Commit", "CommitStore"]


class Commit(NamedTuple):
    """One source commit: ``lsn`` (int, the commit LSN = the version of its Ops), ``xid`` (the
    transaction id, 32-bit as wal2json reports it) and ``committed_at`` (the commit timestamp,
    timezone-aware)."""

    lsn: int
    xid: int
    committed_at: dt.datetime


class CommitStore:
    """Reads and writes ``pgderive.commits`` on a connection of its own (autocommit, opened on
    first use and again after a failure; one thread at a time). Reads of a database whose schema
    lacks the table return nothing; the first write migrates the schema
    (:func:`~pgderive.state.schema.migrate`). Raises :class:`psycopg.Error`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False

    def _connection(self, *, write: bool) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-provenance")
        if write and not self._migrated:
            migrate(self._conn)
            self._migrated = True
        return self._conn

    def _call(self, write: bool, fn: Any) -> Any:
        conn = self._connection(write=write)
        try:
            return fn(conn)
        except psycopg.OperationalError:
            conn.close()
            self._conn = None
            raise

    def close(self) -> None:
        """Close the connection (a later call opens it again)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def insert(self, slot: str, commits: Sequence[Commit]) -> None:
        """Store ``commits`` of ``slot`` (every commit the stream read between two flushes, in
        commit LSN order) as one row. A row ending at the same LSN stored already (a replay
        after a restart) is kept as it is: it holds the same commits."""
        if not commits:
            return
        lsns = [c.lsn for c in commits]
        xids = [c.xid for c in commits]
        times = [c.committed_at for c in commits]
        # Binary parameters: 1.5 µs of client CPU per commit against 7.5 µs in text.
        self._call(True, lambda conn: conn.cursor(binary=True).execute(
            "INSERT INTO pgderive.commits (slot, first_lsn, last_lsn, lsns, xids, committed_at, last_at) "
            "VALUES (%b, %b, %b, %b::bigint[], %b::bigint[], %b::timestamptz[], %b) "
            "ON CONFLICT (slot, last_lsn) DO NOTHING",
            (slot, lsns[0], lsns[-1], lsns, xids, times, times[-1])))

    def lookup(self, slot: str, lsns: Sequence[int]) -> dict[int, Commit]:
        """The stored commits of ``slot`` at ``lsns`` (int LSNs): ``lsn → Commit``; an LSN not
        stored (a snapshot's version, pruned, or written with provenance off) is absent. Each
        LSN is looked up in the first row ending at or after it (an index probe of the primary
        key), which holds it if any row does: a row holds every commit between its first and
        last LSN."""
        if not lsns:
            return {}

        def read(conn: psycopg.Connection[Any]) -> dict[int, Commit]:
            if not self._exists(conn):
                return {}
            rows = conn.execute(
                "SELECT q.l, c.xids[p.i], c.committed_at[p.i] FROM unnest(%s::bigint[]) AS q(l) "
                "CROSS JOIN LATERAL (SELECT lsns, xids, committed_at FROM pgderive.commits "
                "  WHERE slot = %s AND last_lsn >= q.l ORDER BY last_lsn LIMIT 1) AS c "
                "CROSS JOIN LATERAL (SELECT array_position(c.lsns, q.l) AS i) AS p WHERE p.i IS NOT NULL",
                (list(lsns), slot)).fetchall()
            return {int(r[0]): Commit(int(r[0]), int(r[1]), r[2]) for r in rows}
        out: dict[int, Commit] = self._call(False, read)
        return out

    def prune(self, slot: str, older_than: dt.timedelta, limit: int = 1000) -> int:
        """Delete the rows of ``slot`` whose last commit is more than ``older_than`` old, among
        its ``limit`` oldest (by last LSN, the primary key's order, which is commit order);
        returns how many rows (call again while it returns ``limit``)."""
        def delete(conn: psycopg.Connection[Any]) -> int:
            if not self._exists(conn):
                return 0
            cur = conn.execute(
                "DELETE FROM pgderive.commits WHERE slot = %s AND last_lsn IN (SELECT last_lsn FROM "
                "pgderive.commits WHERE slot = %s ORDER BY last_lsn LIMIT %s) AND last_at < now() - %s",
                (slot, slot, limit, older_than))
            return cur.rowcount
        n: int = self._call(False, delete)
        return n

    def drop_slot(self, slot: str) -> int:
        """Delete every commit of ``slot`` (its deployment re-snapshots or goes away)."""
        def delete(conn: psycopg.Connection[Any]) -> int:
            if not self._exists(conn):
                return 0
            return conn.execute("DELETE FROM pgderive.commits WHERE slot = %s", (slot,)).rowcount
        n: int = self._call(False, delete)
        return n

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('pgderive.commits') IS NOT NULL").fetchone()
        return row is not None and bool(row[0])
