"""Reading back what a change lacks: float/numeric ``NaN``/``±Infinity`` and unchanged TOAST values.

wal2json's format 2 prints a float or numeric ``NaN``/``Infinity``/``-Infinity`` as JSON
``null`` (checked with wal2json 2.5, Debian's package; JSON has no such numbers), so a streamed
``null`` in such a column means "SQL NULL or a non-finite number". The decoder flags those
columns (:attr:`cdc.changes.Change.maybe_nonfinite`); :class:`RowRefetcher` looks the row up by
its replica identity and takes the column's current value from the table.

Reads wait until the transaction being applied is visible (:meth:`RowRefetcher.wait_visible`):
the walsender may send it a moment before other sessions can see it. Why the current value is
right once it is: the sinks only need to converge (ARCHITECTURE.md, rule 1). The row's
state read now is at least as new as the change being applied (that change committed before
pgderive read it), and every later change of the row is still ahead in the stream and carries a
higher version, so the last write a record gets reflects the last committed state. Until then a
record may briefly show a value newer than its version. A row that is gone (deleted, or its key
moved, since) keeps ``None``: the delete or key move is ahead in the stream as well.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping

import psycopg
from psycopg import sql

from .changes import Change
from .snapshot import read_rows

__all__ = ["RowRefetcher"]

log = logging.getLogger("pgderive.refetch")

_VISIBLE = sql.SQL("""
    SELECT bool_and(txid_visible_in_snapshot(
             ((txid_snapshot_xmax(s) >> 32) << 32) + x
             - CASE WHEN x > (txid_snapshot_xmax(s) & 4294967295) THEN 4294967296 ELSE 0 END, s))
      FROM unnest(%s::bigint[]) AS x, txid_current_snapshot() AS s""")


class RowRefetcher:
    """Completes changes by reading their row from the source table (see :meth:`fill`).

    Args:
        dsn: libpq connection string of the source (a normal, non-replication connection; it
            is opened on first use and reopened after an error).
        tables: ``"schema.table"`` → ``(columns, identity)``: ``columns`` maps every column to
            its ``format_type`` name, ``identity`` lists the replica identity columns (primary
            key, ``USING INDEX`` columns or, for ``FULL``, every column).

    :meth:`fill` raises :class:`psycopg.OperationalError` when the source is unreachable (the
    engine treats it like a lost replication connection: reconnect, then re-read the stream
    from the slot's confirmed position).
    """

    def __init__(self, dsn: str, tables: Mapping[str, tuple[Mapping[str, str], Iterable[str]]]) -> None:
        self.dsn = dsn
        self.tables = {t: (dict(cols), tuple(ident)) for t, (cols, ident) in tables.items()}
        self.conn: psycopg.Connection | None = None
        self.lookups = 0  #: rows read back (for stats and tests)
        self._visible: set[int] = set()

    def connection(self) -> psycopg.Connection:
        """The autocommit source connection (opened on demand; also used by the engine to
        read query-derived records)."""
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-refetch")
        return self.conn

    def wait_visible(self, xids: Iterable[int], timeout: float = 30.0) -> None:
        """Wait until the transactions ``xids`` (32-bit xids from wal2json) are visible to new
        snapshots.

        Logical decoding may hand out a transaction as soon as its commit record is flushed,
        a moment *before* the committing backend leaves the proc array; a read in that window
        would see the state before the transaction (found by the ``kill -9`` test: a refetch
        returned the previous price). ``txid_visible_in_snapshot`` on the 64-bit form of each
        xid (epoch taken from the snapshot's xmax, Postgres docs 9.27.5 "Transaction ID and
        Snapshot Information Functions") says when every later statement will see it.
        Gives up after ``timeout`` seconds with a warning.
        """
        pending = sorted(set(xids) - self._visible)
        if not pending:
            return
        delay, deadline = 0.0005, time.monotonic() + timeout
        conn = self.connection()
        while True:
            row = conn.execute(_VISIBLE, (pending,), prepare=True).fetchone()
            if row is not None and row[0]:
                break
            if time.monotonic() > deadline:
                log.warning("transaction(s) %s still not visible after %.0f s; reading anyway", pending, timeout)
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if len(self._visible) > 10_000:
            self._visible.clear()
        self._visible.update(pending)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def fill(self, change: Change, columns: Iterable[str]) -> bool:
        """Read ``columns`` of ``change``'s row from the table into ``change.new``: flagged
        ``None`` values (:attr:`~cdc.changes.Change.maybe_nonfinite`) and columns the change
        lacks (unchanged TOAST values, for views that need whole rows).

        Returns False, leaving ``change.new`` as it was, when the row cannot be identified (no
        identity, an identity column missing or itself unsure) or no longer exists; its delete
        or key change is then still ahead in the stream."""
        cols = list(dict.fromkeys(columns))
        if not cols or change.new is None or change.table not in self.tables:
            return False
        types, identity = self.tables[change.table]
        unsure = set(change.maybe_nonfinite)
        keys = [c for c in identity if c not in unsure]
        key_row = {**(change.old_key or {}), **change.new}
        if not keys or any(c not in key_row for c in keys):
            return False
        row = self._lookup(change.table, types, cols, [(c, key_row[c]) for c in keys])
        if row is None:
            return False
        change.new.update(row)
        return True

    def _lookup(self, table: str, types: dict[str, str], cols: list[str],
                key: list[tuple[str, Any]]) -> dict[str, Any] | None:
        try:
            rows = read_rows(self.connection(), table, [(c, types[c]) for c in cols], dict(key), types,
                             prepare=True)
        except psycopg.OperationalError:
            self.close()
            raise
        except psycopg.Error as e:  # e.g. the table changed shape since; the NULL stays
            log.warning("could not read back %s of %s %s (%s); keeping NULL", ", ".join(cols),
                        table, dict(key), " ".join(str(e).split()))
            return None
        self.lookups += 1
        if len(rows) != 1:  # gone since, or not unique (REPLICA IDENTITY FULL duplicates)
            log.debug("refetch of %s %s found %d rows; keeping NULL", table, key, len(rows))
            return None
        return rows[0]
