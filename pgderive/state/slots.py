"""pgderive's own execution state, kept in the source database (schema ``pgderive``).

"Keep execution state in the database": whether a slot finished its bootstrap, and at which
consistent point, lives next to the data it describes, so a crash at any moment is resolved on
restart by reading it back. The table is outside every view's table list, so wal2json's
``add-tables`` filter keeps these writes out of the stream.

Table ``pgderive.slot_state``: one row per slot — ``slot`` (text, PK), ``status``
(``bootstrapping`` | ``streaming``), ``consistent_point`` (pg_lsn), ``views`` (jsonb: view
name → spec fingerprint), ``updated_at``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from cdc.lsn import format_lsn, parse_lsn

__all__ = ["StateStore", "SlotState"]

_DDL = """
CREATE SCHEMA IF NOT EXISTS pgderive;
CREATE TABLE IF NOT EXISTS pgderive.slot_state (
    slot             text PRIMARY KEY,
    status           text NOT NULL CHECK (status IN ('bootstrapping', 'streaming')),
    consistent_point pg_lsn NOT NULL,
    views            jsonb NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(slots=True, frozen=True)
class SlotState:
    """The stored state of one slot; ``consistent_point`` is an LSN (int)."""

    slot: str
    status: str
    consistent_point: int
    views: dict[str, Any]


class StateStore:
    """Reads and writes ``pgderive.slot_state`` through its own autocommit connection."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-state")

    def ensure_schema(self) -> None:
        """Create the ``pgderive`` schema and table if missing."""
        with self._connect() as conn:
            conn.execute(_DDL)

    def get(self, slot: str) -> SlotState | None:
        """The stored state of ``slot``, or None if pgderive never bootstrapped it."""
        with self._connect() as conn:
            exists = conn.execute("SELECT to_regclass('pgderive.slot_state')").fetchone()
            if exists is None or exists[0] is None:
                return None
            row = conn.execute(
                "SELECT slot, status, consistent_point::text, views FROM pgderive.slot_state WHERE slot = %s",
                (slot,)).fetchone()
        if row is None:
            return None
        return SlotState(row[0], row[1], parse_lsn(row[2]), row[3] or {})

    def set(self, slot: str, status: str, consistent_point: int, views: dict[str, Any]) -> None:
        """Upsert the state of ``slot``."""
        with self._connect() as conn:
            conn.execute(
                """INSERT INTO pgderive.slot_state (slot, status, consistent_point, views)
                   VALUES (%s, %s, %s::pg_lsn, %s::jsonb)
                   ON CONFLICT (slot) DO UPDATE SET status = EXCLUDED.status,
                       consistent_point = EXCLUDED.consistent_point, views = EXCLUDED.views,
                       updated_at = now()""",
                (slot, status, format_lsn(consistent_point), orjson.dumps(views).decode()))

    def delete(self, slot: str) -> None:
        """Forget ``slot`` (used by ``run --resnapshot``)."""
        with self._connect() as conn:
            if conn.execute("SELECT to_regclass('pgderive.slot_state')").fetchone()[0]:
                conn.execute("DELETE FROM pgderive.slot_state WHERE slot = %s", (slot,))
