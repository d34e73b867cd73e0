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
:func:`pgderive.state.schema.migrate` (ARCHITECTURE.md, "State"). Migration
``0005_dead_letter_rows.sql`` adds ``row_identity`` (jsonb), ``truncated`` (text[]) and
``superseded_lsn`` (pg_lsn).

What is stored: a derivation's dead letter keeps only the columns the view
reads (:meth:`views.derive.View.dead_letter_row`: identity, key, ``fields``, ``where``, include
link and aggregate columns), a refused document the document; the stored row is bounded by
:attr:`DeadLetterStore.max_bytes` (YAML ``dead_letters.max_bytes``, default 64 KiB of JSON):
the largest values are cut to a prefix (non-string values to a prefix of their JSON text) and
their columns listed in ``truncated``. Identity columns are never cut (a retry looks the row up
by them), so a row whose identity alone exceeds the cap is stored above it.

Superseded dead letters: a later change of the same row in the same view
(same ``row_identity``) makes the row's earlier dead letters moot: the view now holds (or
lacks) the row as of that later change, or the later change is itself a dead letter holding
the newer state. The daemon then sets ``superseded_lsn`` to that change's commit LSN, after
the batch holding the change was applied (:meth:`DeadLetterStore.supersede`). They are marked,
not deleted, so the history stays visible until ``discard``; ``list``, ``count`` and retry see
only open ones. Retrying a superseded dead letter would be harmless but pointless: a retry
re-derives the *current* row at the old LSN, which the later change already wrote at a newer
version.
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
from views.derive import DerivationError, View

from .schema import migrate

__all__ = ["DEFAULT_MAX_BYTES", "DeadLetter", "DeadLetterRecord", "DeadLetterStore", "Supersede", "bound_row",
           "encode_row", "identity_json"]

log = logging.getLogger("pgderive.deadletters")

SCHEMA = "pgderive"
TABLE = "dead_letters"
_QUALIFIED = sql.Identifier(SCHEMA, TABLE)
_T = TypeVar("_T")

_COLUMNS = sql.SQL("id, slot, view, source_table, sink_key, commit_lsn::text, error, row, created_at, retries,"
                   " row_identity, truncated, superseded_lsn::text")


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
        identity: the row's identity columns → values (see :func:`identity_json`), or ``None``
            (a refused document, a table without identity).
        superseded_lsn: set when a later change of the same row, in the same batch, already
            superseded it (stored as superseded).
    """

    view: str
    table: str
    key: str | None
    lsn: int
    error: str
    row: dict[str, Any] | None
    identity: dict[str, Any] | None = None
    superseded_lsn: int | None = None

    @classmethod
    def from_derivation_error(cls, err: DerivationError, lsn: int, *,
                              row: dict[str, Any] | None = None,
                              identity: dict[str, Any] | None = None) -> "DeadLetter":
        """A dead letter for a :class:`views.derive.DerivationError` raised at ``lsn``, with
        the error's sink key (when it could be rendered). ``row``: what to store instead of
        the error's whole row (:meth:`views.derive.View.dead_letter_row`)."""
        return cls(view=err.view, table=err.table, key=err.key, lsn=lsn,
                   error=err.reason, row=err.row if row is None else row, identity=identity)

    @classmethod
    def for_view(cls, view: View, err: DerivationError, lsn: int) -> "DeadLetter":
        """The dead letter of a row ``view`` could not derive at ``lsn``: only the columns the
        view reads (:meth:`views.derive.View.dead_letter_row`), the row's identity
        (:meth:`views.derive.View.row_identity`), the sink key when it could be rendered."""
        return cls.from_derivation_error(err, lsn, row=view.dead_letter_row(err.row),
                                         identity=view.row_identity(err.row))


@dataclass(slots=True, frozen=True)
class Supersede:
    """A later change (at commit LSN ``lsn``) of the row ``identity`` (:func:`identity_json`)
    of ``view``: its stored open dead letters at or before ``lsn`` are superseded."""

    view: str
    identity: str
    lsn: int


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
    identity: dict[str, Any] | None = None
    truncated: tuple[str, ...] = ()
    superseded_lsn: int | None = None


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


def identity_json(identity: dict[str, Any]) -> str:
    """Canonical JSON text of a row identity (keys sorted, values as :func:`encode_row`
    encodes them): equal identities give equal texts, in the stream and from the table."""
    try:
        return orjson.dumps(identity, default=_default,
                            option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(identity, default=_default, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


#: Default of ``dead_letters.max_bytes``: the JSON of a stored row is cut to this many bytes.
DEFAULT_MAX_BYTES = 64 * 1024


def _size(value: Any) -> int:
    text = encode_row({"": value})
    return len(text.encode()) - 5 if text is not None else 0  # minus '{"":' and '}'


def _prefix(value: Any, nbytes: int) -> str:
    """At most ``nbytes`` UTF-8 bytes of ``value``'s text (a str itself, else its JSON)."""
    text = value if isinstance(value, str) else (encode_row({"": value}) or "")[4:-1]
    return text.encode()[:max(0, nbytes)].decode(errors="ignore")


def bound_row(row: dict[str, Any], max_bytes: int,
              keep: frozenset[str] | set[str] = frozenset()) -> tuple[dict[str, Any], list[str]]:
    """``row`` cut so that its JSON (:func:`encode_row`) takes at most ``max_bytes`` bytes,
    and the columns whose values were cut (in ``row``'s order; empty when it fits).

    Water-filling: values are visited from the smallest; each keeps its whole value when it
    fits its fair share of the bytes left, else is cut to that share (a string to a prefix, any
    other value to a prefix of its JSON text). Columns in ``keep`` (the identity) are never
    cut, so a row whose kept columns alone exceed ``max_bytes`` stays above it. JSON escapes
    (quotes, control characters) can make a prefix longer than its share: the shares then
    shrink until the row fits.
    """
    text = encode_row(row)
    if text is None or len(text.encode()) <= max_bytes:
        return row, []
    sizes = {c: _size(v) for c, v in row.items()}
    names = [c for c in row if c not in keep]
    overhead = sum(len(c.encode()) + 4 for c in row) + 2  # "name": and , per column, {}
    budget = max_bytes - overhead - sum(sizes[c] for c in row if c in keep)
    out = dict(row)
    for _ in range(8):
        cut: list[str] = []
        left = budget
        order = sorted(names, key=lambda c: sizes[c])
        for i, c in enumerate(order):
            share = max(0, left // (len(order) - i))
            if sizes[c] <= share:
                out[c] = row[c]
                left -= sizes[c]
                continue
            out[c] = _prefix(row[c], share - 2)  # its quotes
            cut.append(c)
            left -= share
        text = encode_row(out)
        if text is None or len(text.encode()) <= max_bytes or budget <= 0:
            break
        budget -= len(text.encode()) - max_bytes
    return out, [c for c in row if c in cut]


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd")


# -- the store ----------------------------------------------------------------------------------
class DeadLetterStore:
    """Reads and writes ``pgderive.dead_letters`` in the source database at ``dsn``.

    Holds one autocommit connection (opened on first use, reopened after a failure); safe to
    share between threads (calls are serialized). Schema ``pgderive`` is migrated
    (:func:`~pgderive.state.schema.migrate`) once per store, on the first write or the first
    read of an existing table; reads of a database without the table return nothing instead of
    creating it. ``max_bytes``: the cap on a stored row's JSON (bytes, see :func:`bound_row`;
    YAML ``dead_letters.max_bytes``).
    """

    def __init__(self, dsn: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dsn = dsn
        self.max_bytes = max_bytes
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

    def _exists(self, conn: psycopg.Connection[Any]) -> bool:
        """True when the table exists (then brought to the current schema version)."""
        row = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.{TABLE}",)).fetchone()
        if row is None or row[0] is None:
            return False
        self._ensure(conn)
        return True

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
        cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [], [])
        for e in entries:
            row, cut = (e.row, []) if e.row is None else bound_row(
                e.row, self.max_bytes, frozenset(e.identity or ()))
            for target, value in zip(cols, (slot, e.view, e.table,
                                            None if e.key is None else _clean(e.key),
                                            format_lsn(e.lsn), _clean(e.error or "unknown error"),
                                            encode_row(row),
                                            None if e.identity is None else identity_json(e.identity),
                                            orjson.dumps([_clean(c) for c in cut]).decode() if cut else None,
                                            None if e.superseded_lsn is None else format_lsn(e.superseded_lsn))):
                target.append(value)
        query = sql.SQL(
            "INSERT INTO {} (slot, view, source_table, sink_key, commit_lsn, error, row, row_identity,"
            " truncated, superseded_lsn)"
            " SELECT s, v, t, k, l, e, r, i,"
            " CASE WHEN c IS NULL THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(c)) END, x"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
            " %s::pg_lsn[], %s::text[], %s::jsonb[], %s::jsonb[], %s::jsonb[], %s::pg_lsn[])"
            " AS u(s, v, t, k, l, e, r, i, c, x)").format(_QUALIFIED)

        def insert(conn: psycopg.Connection[Any]) -> None:
            self._ensure(conn)
            conn.execute(query, cols)

        self._run(insert)

    def supersede(self, slot: str, items: Sequence[Supersede]) -> int:
        """Mark the open dead letters of ``slot`` that ``items`` supersede: same view, same
        ``row_identity``, ``commit_lsn`` ≤ the item's LSN (a replay after a crash may find
        dead letters recorded for later changes: those stay open). Returns how many were
        marked. Raises :class:`psycopg.Error` if the source database cannot be written."""
        if not items:
            return 0
        query = sql.SQL(
            "UPDATE {} d SET superseded_lsn = u.l"
            " FROM unnest(%s::text[], %s::jsonb[], %s::pg_lsn[]) AS u(v, i, l)"
            " WHERE d.slot = %s AND d.view = u.v AND d.row_identity = u.i"
            " AND d.superseded_lsn IS NULL AND d.commit_lsn <= u.l").format(_QUALIFIED)
        params = ([i.view for i in items], [i.identity for i in items], [format_lsn(i.lsn) for i in items], slot)

        def update(conn: psycopg.Connection[Any]) -> int:
            self._ensure(conn)
            return conn.execute(query, params).rowcount

        return self._run(update)

    def open_rows(self, slot: str) -> dict[str, builtins.set[str]]:
        """View → the row identities (:func:`identity_json`) with open dead letters of ``slot``:
        what the stream watches for superseding changes."""
        query = sql.SQL("SELECT DISTINCT view, row_identity::text FROM {}"
                        " WHERE slot = %s AND superseded_lsn IS NULL AND row_identity IS NOT NULL").format(_QUALIFIED)

        def run(conn: psycopg.Connection[Any]) -> dict[str, builtins.set[str]]:
            out: dict[str, builtins.set[str]] = {}
            if not self._exists(conn):
                return out
            for view, ident in conn.execute(query, (slot,)):
                out.setdefault(view, builtins.set()).add(identity_json(json.loads(ident)))
            return out

        return self._run(run)

    def discard(self, slot: str, ids: Sequence[int] | None = None, view: str | None = None) -> int:
        """Delete dead letters of ``slot``: those in ``ids`` and/or of ``view``; every one of
        the slot's if both are None. Returns how many were deleted."""
        where, params = self._where(slot, ids, view, open_only=False)
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
        """Number of open (not superseded) dead letters of ``slot`` per view (views without any
        are absent)."""
        query = sql.SQL("SELECT view, count(*) FROM {} WHERE slot = %s AND superseded_lsn IS NULL"
                        " GROUP BY view ORDER BY view").format(_QUALIFIED)

        def run(conn: psycopg.Connection[Any]) -> dict[str, int]:
            if not self._exists(conn):
                return {}
            return {v: int(n) for v, n in conn.execute(query, (slot,))}

        return self._run(run)

    def list(self, slot: str, view: str | None = None, limit: int | None = 50, *,
             superseded: bool = False) -> builtins.list[DeadLetterRecord]:
        """Open dead letters of ``slot`` (of ``view`` if given), oldest first, at most
        ``limit``; with ``superseded`` the superseded ones too."""
        return self._select(slot, None, view, order=sql.SQL("id"), limit=limit, open_only=not superseded)

    def of_key(self, slot: str, view: str, key: str, limit: int = 5) -> builtins.list[DeadLetterRecord]:
        """The open dead letters of ``view`` under sink key ``key``, newest first, at most
        ``limit`` (``pgderive explain``: why a record is missing or old). Nothing when the
        table does not exist."""
        return self._select(slot, None, view, order=sql.SQL("id DESC"), limit=limit, key=key)

    def take_for_retry(self, slot: str, ids: Sequence[int] | None = None,
                       view: str | None = None) -> builtins.list[DeadLetterRecord]:
        """The dead letters to retry, in stream order (commit LSN, then id).

        Selects those in ``ids`` and/or of ``view`` (every one of the slot's if both are None).
        Nothing is removed: after retrying, call :meth:`delete` for the ones that now applied
        and :meth:`mark_retried` for the ones that failed again.
        """
        return self._select(slot, ids, view, order=sql.SQL("commit_lsn, id"), limit=None)

    def _select(self, slot: str, ids: Sequence[int] | None, view: str | None, *,
                order: sql.Composable, limit: int | None, open_only: bool = True,
                key: str | None = None) -> builtins.list[DeadLetterRecord]:
        where, params = self._where(slot, ids, view, open_only=open_only, key=key)
        query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(_COLUMNS, _QUALIFIED, where, order)
        if limit is not None:
            query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(int(limit)))

        def run(conn: psycopg.Connection[Any]) -> builtins.list[DeadLetterRecord]:
            if not self._exists(conn):
                return []
            return [DeadLetterRecord(id=r[0], slot=r[1], view=r[2], table=r[3], key=r[4],
                                     commit_lsn=parse_lsn(r[5]), error=r[6], row=r[7],
                                     created_at=r[8], retries=r[9], identity=r[10],
                                     truncated=tuple(r[11] or ()),
                                     superseded_lsn=None if r[12] is None else parse_lsn(r[12]))
                    for r in conn.execute(query, params)]

        return self._run(run)

    @staticmethod
    def _where(slot: str, ids: Sequence[int] | None, view: str | None, *,
               open_only: bool = True, key: str | None = None) -> tuple[sql.Composable, builtins.list[Any]]:
        parts: builtins.list[sql.Composable] = [sql.SQL("slot = %s")]
        if open_only:
            parts.append(sql.SQL("superseded_lsn IS NULL"))
        params: builtins.list[Any] = [slot]
        if ids is not None:
            parts.append(sql.SQL("id = ANY(%s)"))
            params.append([int(i) for i in ids])
        if view is not None:
            parts.append(sql.SQL("view = %s"))
            params.append(view)
        if key is not None:
            parts.append(sql.SQL("sink_key = %s"))
            params.append(key)
        return sql.SQL(" AND ").join(parts), params
