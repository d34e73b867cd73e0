"""``pgderive.commits``: the xid and commit timestamp of every commit the stream wrote with
(ARCHITECTURE.md, "Provenance").

A record's version is the commit LSN of the transaction that last wrote it (rule 1); this table
turns that LSN into what an operator asks about — the transaction id and the commit time —
for ``pgderive explain``. One row per source transaction that changed at least one view: wal2json
reports both facts in its ``"B"`` message (wal2json README, "format-version 2": ``xid``,
``timestamp``). Rows are written by :class:`pgderive.runtime.provenance.CommitRecorder`: one row
per flush holding that flush's commits as packed parallel arrays (8-byte big-endian integers;
see the migration, ``migrations/0008_commits.sql``, and the view ``pgderive.commit_log`` that
shows one row per commit), deleted after the configured retention (:meth:`CommitStore.prune`).

Why a table in the source, not the sinks' version entries: a sink-neutral store costs one
statement per flush whatever the sinks are (an OpenSearch document has no place for it but
its own fields, which the user queries), and a record loaded from a snapshot has no single
commit anyway. Its cost is measured in ``make bench`` (scenario "1-provenance").
"""
from __future__ import annotations

import datetime as dt
import sys
from array import array
from bisect import bisect_left
from typing import Any, NamedTuple, Sequence

import psycopg

from .schema import migrate

__all__ = ["Commit", "CommitStore", "pack"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
#: Rows a lookup scans past its LSN for one that starts at or before it (replays overlap at
#: most the unconfirmed tail of a stream, a few flushes).
_OVERLAP_ROWS = 50


def pack(values: "array[int]") -> bytes:
    """``values`` (an ``array('q')``) as the table's packed form: 8 bytes each, big-endian."""
    if sys.byteorder == "little":
        values = array("q", values)
        values.byteswap()
    return values.tobytes()


def _unpack(data: bytes) -> "array[int]":
    out = array("q")
    out.frombytes(data)
    if sys.byteorder == "little":
        out.byteswap()
    return out


class Commit(NamedTuple):
    """One source commit: ``lsn`` (int, the commit LSN = the version of its Ops), ``xid`` (the
    transaction id, 32-bit as wal2json reports it) and ``committed_at`` (the commit timestamp,
    timezone-aware, microsecond precision)."""

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
        """Store ``commits`` of ``slot`` (in commit LSN order) as one row (:meth:`insert_packed`)."""
        if not commits:
            return
        self.insert_packed(slot, array("q", [c.lsn for c in commits]), array("q", [c.xid for c in commits]),
                           array("q", [_micros(c.committed_at) for c in commits]))

    def insert_packed(self, slot: str, lsns: "array[int]", xids: "array[int]", micros: "array[int]") -> None:
        """Store every commit the stream read between two flushes, in commit LSN order, as one
        row: parallel ``array('q')`` of commit LSNs, xids and commit times (microseconds since
        the Unix epoch). A row ending at the same LSN stored already (a replay after a restart)
        is kept as it is: it holds the same commits."""
        if not lsns:
            return
        last_at = _EPOCH + dt.timedelta(microseconds=micros[-1])
        self._call(True, lambda conn: conn.execute(
            "INSERT INTO pgderive.commits (slot, first_lsn, last_lsn, lsns, xids, commit_us, last_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (slot, last_lsn) DO NOTHING",
            (slot, lsns[0], lsns[-1], pack(lsns), pack(xids), pack(micros), last_at)))

    def lookup(self, slot: str, lsns: Sequence[int]) -> dict[int, Commit]:
        """The stored commits of ``slot`` at ``lsns`` (int LSNs): ``lsn → Commit``; an LSN not
        stored (a snapshot's version, pruned, or written with provenance off) is absent. Each
        LSN is looked up in the first row ending at or after it that starts at or before it
        (a range scan of the primary key, at most :data:`_OVERLAP_ROWS` rows: after a restart
        the replay's rows may start past a commit an earlier, longer row holds); a row holds
        every commit between its first and last LSN."""
        if not lsns:
            return {}

        def read(conn: psycopg.Connection[Any]) -> dict[int, Commit]:
            if not self._exists(conn):
                return {}
            rows = conn.execute(
                "SELECT q.l, c.lsns, c.xids, c.commit_us FROM unnest(%s::bigint[]) AS q(l) "
                "CROSS JOIN LATERAL (SELECT * FROM (SELECT first_lsn, last_lsn, lsns, xids, commit_us "
                "  FROM pgderive.commits WHERE slot = %s AND last_lsn >= q.l ORDER BY last_lsn LIMIT %s) AS n "
                "  WHERE n.first_lsn <= q.l ORDER BY n.last_lsn LIMIT 1) AS c",
                (list(lsns), slot, _OVERLAP_ROWS)).fetchall()
            out: dict[int, Commit] = {}
            for lsn, packed_lsns, packed_xids, packed_us in rows:
                found = _unpack(packed_lsns)
                i = bisect_left(found, lsn)
                if i < len(found) and found[i] == lsn:
                    out[int(lsn)] = Commit(int(lsn), _unpack(packed_xids)[i],
                                           _EPOCH + dt.timedelta(microseconds=_unpack(packed_us)[i]))
            return out
        result: dict[int, Commit] = self._call(False, read)
        return result

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

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('pgderive.commits') IS NOT NULL").fetchone()
        return row is not None and bool(row[0])


def _micros(t: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
