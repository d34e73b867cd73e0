"""pgderive's own execution state, kept in the source database (schema ``pgderive``).

"Keep execution state in the database": whether a slot finished its bootstrap, and at which
consistent point, lives next to the data it describes, so a crash at any moment is resolved on
restart by reading it back. The table is outside every view's table list, so wal2json's
``add-tables`` filter keeps these writes out of the stream.

Table ``pgderive.slot_state``: one row per slot — ``slot`` (text, PK), ``status``
(``bootstrapping`` | ``streaming``), ``consistent_point`` (pg_lsn), ``views`` (jsonb: view
name → spec fingerprint), ``updated_at``. Its DDL is migration ``0001_slot_state.sql``, applied by
:func:`pgderive.state.schema.migrate` (ARCHITECTURE.md, "State").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import orjson
import psycopg

from cdc.lsn import format_lsn, parse_lsn

from .schema import migrate

__all__ = ["StateStore", "SlotState"]


@dataclass(slots=True, frozen=True)
class SlotState:
    """The stored state of one slot: ``status`` is ``bootstrapping`` or ``streaming``;
    ``consistent_point`` is an LSN as an int (a pg_lsn column); ``views`` maps view name → spec
    fingerprint."""

    slot: str
    status: str
    consistent_point: int
    views: dict[str, Any]


class StateStore:
    """Reads and writes ``pgderive.slot_state``; every call opens its own autocommit connection.

    :meth:`ensure_schema` migrates schema ``pgderive`` (the daemon calls it once at start);
    :meth:`get` and :meth:`delete` of a database without the table neither fail nor create it.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-state")

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('pgderive.slot_state') IS NOT NULL").fetchone()
        return row is not None and bool(row[0])

    def ensure_schema(self) -> None:
        """Bring schema ``pgderive`` to the current version (:func:`~pgderive.state.schema.migrate`);
        reads only when it is current."""
        with self._connect() as conn:
            migrate(conn)

    def get(self, slot: str) -> SlotState | None:
        """The stored state of ``slot``, or None if pgderive never bootstrapped it."""
        with self._connect() as conn:
            if not self._exists(conn):
                return None
            row = conn.execute(
                "SELECT slot, status, consistent_point::text, views FROM pgderive.slot_state WHERE slot = %s",
                (slot,)).fetchone()
        if row is None:
            return None
        return SlotState(row[0], row[1], parse_lsn(row[2]), row[3] or {})

    def set(self, slot: str, status: str, consistent_point: int, views: dict[str, Any]) -> None:
        """Upsert the state of ``slot`` (``consistent_point``: an LSN as an int). The table must
        exist (:meth:`ensure_schema`)."""
        with self._connect() as conn:
            conn.execute(
                """INSERT INTO pgderive.slot_state (slot, status, consistent_point, views)
                   VALUES (%s, %s, %s::pg_lsn, %s::jsonb)
                   ON CONFLICT (slot) DO UPDATE SET status = EXCLUDED.status,
                       consistent_point = EXCLUDED.consistent_point, views = EXCLUDED.views,
                       updated_at = now()""",
                (slot, status, format_lsn(consistent_point), orjson.dumps(views).decode()))

    def remove_views(self, slot: str, names: Sequence[str]) -> list[str]:
        """Remove ``names`` from the ``views`` fingerprint map of ``slot`` in one transaction
        holding the row's lock (the map is changed in place with jsonb ``-``, so a concurrent
        :meth:`set` of the daemon is neither overwritten by a stale copy nor lost). Returns the names that were in the map, sorted; nothing when the
        table or the slot's row does not exist (used by ``pgderive drop``)."""
        if not names:
            return []
        with self._connect() as conn, conn.transaction():
            if not self._exists(conn):
                return []
            row = conn.execute("SELECT views FROM pgderive.slot_state WHERE slot = %s FOR UPDATE", (slot,)).fetchone()
            present = sorted(n for n in set(names) if row is not None and n in (row[0] or {}))
            if present:
                conn.execute("UPDATE pgderive.slot_state SET views = views - %s::text[], updated_at = now()"
                             " WHERE slot = %s", (present, slot))
        return present

    def slots_with_view(self, view: str) -> list[str]:
        """The slots whose ``views`` map names ``view`` (maintained or retired there), sorted;
        none when the table does not exist."""
        with self._connect() as conn:
            if not self._exists(conn):
                return []
            rows = conn.execute("SELECT slot FROM pgderive.slot_state WHERE views ? %s ORDER BY slot",
                                (view,)).fetchall()
        return [r[0] for r in rows]

    def delete(self, slot: str) -> None:
        """Forget ``slot`` (used by ``run --resnapshot``)."""
        with self._connect() as conn:
            if self._exists(conn):
                conn.execute("DELETE FROM pgderive.slot_state WHERE slot = %s", (slot,))
