"""``pgderive.commits``: the xid and commit timestamp of every commit the stream wrote with
(ARCHITECTURE.md, "Provenance").

A record's version is the commit LSN of the transaction that last wrote it (rule 1); this table
turns that LSN into what an operator asks about — the transaction id and the commit time —
for ``pgderive explain``. One row per source transaction that changed at least one view: wal2json
reports both facts in its ``"B"`` message (wal2json README, "format-version 2": ``xid``,
``timestamp``). Rows are written by :class:`pgderive.runtime.provenance.CommitRecorder`, one
multi-row ``INSERT`` per flush, and deleted after the configured retention
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
        """Store ``commits`` of ``slot`` in one statement (two when some are stored already, a
        replay after a restart: those are kept as they are)."""
        if not commits:
            return
        lsns = [c.lsn for c in commits]
        xids = [c.xid for c in commits]
        times = [c.committed_at for c in commits]
        query = ("INSERT INTO pgderive.commits (slot, lsn, xid, committed_at) "
                 "SELECT %b, * FROM unnest(%b::bigint[], %b::bigint[], %b::timestamptz[])")

        def write(conn: psycopg.Connection[Any]) -> None:
            # Binary parameters: 1.5 µs of client CPU per commit against 7.5 µs in text. A plain
            # INSERT first (6 µs per commit in Postgres against 9 µs with ON CONFLICT, measured
            # with 2,000 per statement); only a replay after a restart meets stored commits.
            try:
                conn.cursor(binary=True).execute(query, (slot, lsns, xids, times))
            except psycopg.errors.UniqueViolation:
                conn.cursor(binary=True).execute(query + " ON CONFLICT (slot, lsn) DO NOTHING",
                                                 (slot, lsns, xids, times))
        self._call(True, write)

    def lookup(self, slot: str, lsns: Sequence[int]) -> dict[int, Commit]:
        """The stored commits of ``slot`` at ``lsns`` (int LSNs): ``lsn → Commit``; an LSN not
        stored (a snapshot's version, pruned, or written with provenance off) is absent."""
        if not lsns:
            return {}

        def read(conn: psycopg.Connection[Any]) -> dict[int, Commit]:
            if not self._exists(conn):
                return {}
            rows = conn.execute("SELECT lsn, xid, committed_at FROM pgderive.commits "
                                "WHERE slot = %s AND lsn = ANY(%s)", (slot, list(lsns))).fetchall()
            return {int(r[0]): Commit(int(r[0]), int(r[1]), r[2]) for r in rows}
        out: dict[int, Commit] = self._call(False, read)
        return out

    def prune(self, slot: str, older_than: dt.timedelta, limit: int = 100_000) -> int:
        """Delete the commits of ``slot`` committed more than ``older_than`` ago among its
        ``limit`` oldest by LSN (the primary key's order, which is commit order: no index on
        the timestamp); returns how many (call again while it returns ``limit``)."""
        def delete(conn: psycopg.Connection[Any]) -> int:
            if not self._exists(conn):
                return 0
            cur = conn.execute(
                "DELETE FROM pgderive.commits WHERE slot = %s AND lsn IN (SELECT lsn FROM pgderive.commits "
                "WHERE slot = %s ORDER BY lsn LIMIT %s) AND committed_at < now() - %s",
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
