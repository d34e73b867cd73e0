"""Dead letters: rows a view could not derive and documents a sink rejected (ARCHITECTURE.md,
rule 5).

"Never lose silently": a poison row — its key template needs a NULL column, a derivation raised,
a sink refused the document — must not stop the stream, and must not vanish either. It becomes a
*dead-letter record* holding the view, the source table, the sink key (when it could be
computed), the commit LSN of its transaction, the error and the row itself; the stream goes on.
An operator lists them (``pgderive dead-letters list``), fixes the cause and retries them
(``pgderive dead-letters retry``: the *current* source row is derived again and applied at the
dead letter's commit LSN, so stream Ops after it still win by version), or discards them.

Where they live: table ``pgderive.dead_letters`` in the **source** database, next to
``pgderive.slot_state`` (:mod:`pgderive.state.slots`), written through this module's own autocommit
connection. Writing it does not feed back into the stream: the slot reader asks wal2json to
decode only the views' tables (``add-tables``), and schema ``pgderive`` is never one of them, so
these inserts are filtered out by the output plugin and never reach the engine.

Table ``pgderive.dead_letters``: ``id`` (bigserial PK), ``slot``, ``view``, ``source_table``,
``sink_key`` (NULL when the key could not be rendered), ``commit_lsn`` (pg_lsn), ``error``,
``row`` (jsonb: column → value in the model of :mod:`cdc.changes`; odd Python values are
encoded as text — ``Decimal`` as its digits, ``bytes`` as Postgres hex ``\\x…``, datetimes in
ISO 8601), ``created_at``, ``retries`` (how many retries failed again); index on ``(slot, view,
id)``. Its DDL is migration ``0002_dead_letters.sql``, applied by
:func:`pgderive.state.schema.migrate` (ARCHITECTURE.md, "State").
"""
from __future__ import annotations

import builtins
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable, Sequence, TypeVar

import orjson
import psycopg
from psycopg import sql

from cdc.lsn import format_lsn, parse_lsn
from views.derive import DerivationError

from .schema import migrate

__all__ = ["DeadLetter", "DeadLetterRecord", "DeadLetterStore", "encode_row"]

log = logging.getLogger("pgderive.deadletters")

SCHEMA = "pgderive"
TABLE = "dead_letters"
_QUALIFIED = sql.Identifier(SCHEMA, TABLE)
_T = TypeVar("_T")

_COLUMNS = sql.SQL("id, slot, view, source_table, sink_key, commit_lsn::text, error, row, created_at, retries")


@dataclass(slots=True)
class DeadLetter:
    """One row or document that could not be derived or applied, as the engine reports it.

    Attributes:
        view: the view's name.
        table: the source table, ``schema.name``.
        key: the sink key, or ``None`` when it could not be rendered (e.g. a NULL key column).
        lsn: commit LSN (int) of the transaction that carried the row (a snapshot's consistent
            point for snapshot rows).
        error: what went wrong, for the operator.
        row: the source row (column → value), or ``None`` if unknown.
    """

    view: str
    table: str
    key: str | None
    lsn: int
    error: str
    row: dict[str, Any] | None

    @classmethod
    def from_derivation_error(cls, err: DerivationError, lsn: int) -> "DeadLetter":
        """A dead letter for a :class:`views.derive.DerivationError` raised at ``lsn``."""
        return cls(view=err.view, table=err.table, key=None, lsn=lsn,
                   error=err.reason, row=err.row)


@dataclass(slots=True, frozen=True)
class DeadLetterRecord:
    """A stored dead letter (one row of ``pgderive.dead_letters``); ``commit_lsn`` is an int."""

    id: int
    slot: str
    view: str
    table: str
    key: str | None
    commit_lsn: int
    error: str
    row: dict[str, Any] | None
    created_at: datetime
    retries: int


# -- row encoding -------------------------------------------------------------------------------
def _default(value: Any) -> Any:
    """orjson fallback: text for everything JSON has no type for."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()  # Postgres bytea hex output
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _strip_nul(value: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000: replace it (recursively) with U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_strip_nul(str(k)): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strip_nul(v) for v in value]
    return value


def encode_row(row: dict[str, Any] | None) -> str | None:
    """JSON text of ``row`` for the ``row`` jsonb column; never raises.

    orjson with :func:`_default` (Decimal → its digits, bytes → ``\\x<hex>``, anything else
    ``str()``); values orjson refuses outright (e.g. ints beyond 64 bits) go through the stdlib
    encoder; as a last resort the row is kept as ``{"repr": "..."}``.
    """
    if row is None:
        return None
    try:
        data = orjson.dumps(row, default=_default, option=orjson.OPT_NON_STR_KEYS)
        text = data.decode()
    except (TypeError, orjson.JSONEncodeError):
        try:
            text = json.dumps(row, default=_default, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            text = orjson.dumps({"repr": repr(row)}).decode()
    if "\\u0000" in text:
        return encode_row(_strip_nul(row)) if isinstance(row, dict) else text.replace("\\u0000", "\\ufffd")
    return text


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd")


# -- the store ----------------------------------------------------------------------------------
class DeadLetterStore:
    """Reads and writes ``pgderive.dead_letters`` in the source database at ``dsn``.

    Holds one autocommit connection (opened on first use, reopened after a failure); safe to
    share between threads (calls are serialized). Schema ``pgderive`` is migrated
    (:func:`~pgderive.state.schema.migrate`) once per store, on the first write; reads of a
    database without the table return nothing instead of creating it.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._schema_ready = False

    # connection handling ------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.dsn, autocommit=True,
                                         application_name="pgderive-deadletters")
        return self._conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Call ``fn(conn)`` under the lock; after a lost connection, reconnect and retry once."""
        with self._lock:
            conn = self._connection()
            try:
                return fn(conn)
            except psycopg.OperationalError:
                if not conn.broken:
                    raise
                log.warning("dead-letter store: connection lost; reconnecting")
                conn.close()
            return fn(self._connection())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "DeadLetterStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.{TABLE}",)).fetchone()
        return row is not None and row[0] is not None

    def _ensure(self, conn: psycopg.Connection[Any]) -> None:
        if not self._schema_ready:
            migrate(conn)  # serialized against concurrent starts by its advisory lock
            self._schema_ready = True

    def ensure_schema(self) -> None:
        """Bring schema ``pgderive`` to the current version, ``pgderive.dead_letters`` included
        (:func:`~pgderive.state.schema.migrate`; idempotent, reads only when current)."""
        self._schema_ready = False
        self._run(self._ensure)

    # writes -------------------------------------------------------------------------------
    def record(self, slot: str, entries: Sequence[DeadLetter]) -> None:
        """Store ``entries`` for ``slot`` with one multi-row INSERT (nothing for an empty list).

        Creates the table on first use. If the connection drops mid-call the INSERT is sent
        once more on a new connection: a dead letter may then be stored twice, never lost.
        Raises :class:`psycopg.Error` if the source database cannot be written.
        """
        if not entries:
            return
        cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
        for e in entries:
            for target, value in zip(cols, (slot, e.view, e.table,
                                            None if e.key is None else _clean(e.key),
                                            format_lsn(e.lsn), _clean(e.error or "unknown error"),
                                            encode_row(e.row))):
                target.append(value)
        query = sql.SQL(
            "INSERT INTO {} (slot, view, source_table, sink_key, commit_lsn, error, row)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::pg_lsn[], %s::text[], %s::jsonb[])").format(_QUALIFIED)

        def insert(conn: psycopg.Connection[Any]) -> None:
            self._ensure(conn)
            conn.execute(query, cols)

        self._run(insert)

    def discard(self, slot: str, ids: Sequence[int] | None = None, view: str | None = None) -> int:
        """Delete dead letters of ``slot``: those in ``ids`` and/or of ``view``; every one of
        the slot's if both are None. Returns how many were deleted."""
        where, params = self._where(slot, ids, view)
        query = sql.SQL("DELETE FROM {} WHERE {}").format(_QUALIFIED, where)
        return self._run(lambda conn: conn.execute(query, params).rowcount if self._exists(conn) else 0)

    def mark_retried(self, ids: Sequence[int], error: str | None = None) -> int:
        """A retry of ``ids`` failed again: increment ``retries`` (and store the new ``error``)."""
        if not ids:
            return 0
        query = sql.SQL("UPDATE {} SET retries = retries + 1, error = coalesce(%s, error)"
                        " WHERE id = ANY(%s)").format(_QUALIFIED)
        return self._run(lambda conn: conn.execute(
            query, (None if error is None else _clean(error), list(ids))).rowcount)

    def delete(self, ids: Sequence[int]) -> int:
        """Delete the dead letters ``ids`` (e.g. after a successful retry); returns the count."""
        if not ids:
            return 0
        query = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(_QUALIFIED)
        return self._run(lambda conn: conn.execute(query, (list(ids),)).rowcount if self._exists(conn) else 0)

    # reads --------------------------------------------------------------------------------
    def count(self, slot: str) -> dict[str, int]:
        """Number of dead letters of ``slot`` per view (views without any are absent)."""
        query = sql.SQL("SELECT view, count(*) FROM {} WHERE slot = %s GROUP BY view ORDER BY view").format(_QUALIFIED)

        def run(conn: psycopg.Connection[Any]) -> dict[str, int]:
            if not self._exists(conn):
                return {}
            return {v: int(n) for v, n in conn.execute(query, (slot,))}

        return self._run(run)

    def list(self, slot: str, view: str | None = None, limit: int | None = 50) -> builtins.list[DeadLetterRecord]:
        """Dead letters of ``slot`` (of ``view`` if given), oldest first, at most ``limit``."""
        return self._select(slot, None, view, order=sql.SQL("id"), limit=limit)

    def take_for_retry(self, slot: str, ids: Sequence[int] | None = None,
                       view: str | None = None) -> builtins.list[DeadLetterRecord]:
        """The dead letters to retry, in stream order (commit LSN, then id).

        Selects those in ``ids`` and/or of ``view`` (every one of the slot's if both are None).
        Nothing is removed: after retrying, call :meth:`delete` for the ones that now applied
        and :meth:`mark_retried` for the ones that failed again.
        """
        return self._select(slot, ids, view, order=sql.SQL("commit_lsn, id"), limit=None)

    def _select(self, slot: str, ids: Sequence[int] | None, view: str | None, *,
                order: sql.Composable, limit: int | None) -> builtins.list[DeadLetterRecord]:
        where, params = self._where(slot, ids, view)
        query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(_COLUMNS, _QUALIFIED, where, order)
        if limit is not None:
            query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(int(limit)))

        def run(conn: psycopg.Connection[Any]) -> builtins.list[DeadLetterRecord]:
            if not self._exists(conn):
                return []
            return [DeadLetterRecord(id=r[0], slot=r[1], view=r[2], table=r[3], key=r[4],
                                     commit_lsn=parse_lsn(r[5]), error=r[6], row=r[7],
                                     created_at=r[8], retries=r[9])
                    for r in conn.execute(query, params)]

        return self._run(run)

    @staticmethod
    def _where(slot: str, ids: Sequence[int] | None, view: str | None) -> tuple[sql.Composable, builtins.list[Any]]:
        parts: builtins.list[sql.Composable] = [sql.SQL("slot = %s")]
        params: builtins.list[Any] = [slot]
        if ids is not None:
            parts.append(sql.SQL("id = ANY(%s)"))
            params.append([int(i) for i in ids])
        if view is not None:
            parts.append(sql.SQL("view = %s"))
            params.append(view)
        return sql.SQL(" AND ").join(parts), params
