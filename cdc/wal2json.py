"""Decoding wal2json ``format-version 2`` messages into :class:`~cdc.changes.Transaction`.

Format 2 sends one JSON object per message (wal2json README, "format-version 2"):
``{"action":"B", "xid", "timestamp", "lsn", "nextlsn"}`` opens a transaction (``lsn`` is the
commit record's LSN, ``nextlsn`` the position just past it), ``I``/``U``/``D`` carry one row
(``columns`` = new values, ``identity`` = old replica identity), ``T`` is a TRUNCATE of one
table, ``M`` a logical message (ignored) and ``C`` closes the transaction.

Options pgderive sends are built by :func:`plugin_options`.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable, Iterable

import orjson

from .changes import Change, Row, Transaction
from .lsn import parse_lsn
from .values import Converter, converter, is_numeric_type, may_be_nonfinite

__all__ = ["Wal2JsonDecoder", "DecodeError", "plugin_options", "add_tables_entry", "replication_literal",
           "loads_message"]


class DecodeError(ValueError):
    """A wal2json message that does not fit format 2 (or arrives out of transaction order)."""


def plugin_options(tables: Iterable[str] | None = None) -> dict[str, str]:
    """wal2json options for ``START_REPLICATION … LOGICAL``.

    ``tables``: qualified ``schema.table`` names (as in the catalog, unquoted; the schema holds
    no ``.``, :func:`views.spec.parse_table` refuses such schemas) to decode; others are
    filtered out inside the server (``add-tables``) so unwatched traffic costs no decoding
    (wal2json README, "Parameters"). Each name is escaped by :func:`add_tables_entry`.
    Returns option name → value; the values are raw text (quote them with
    :func:`replication_literal`, never as ``E'…'``).
    """
    opts = {
        "format-version": "2",
        "include-xids": "1",
        "include-timestamp": "1",
        "include-lsn": "1",
        "include-types": "1",
        "include-transaction": "1",
        "include-pk": "0",
    }
    if tables is not None:
        names = sorted(set(tables))
        opts["add-tables"] = (",".join(add_tables_entry(*t.partition(".")[::2]) for t in names)
                              if names else "pgderive.__none__")
    return opts


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def add_tables_entry(schema: str, table: str) -> str:
    r"""One ``add-tables`` entry naming exactly the table ``schema``.``table`` (catalog names).

    wal2json (``string_to_SelectTable`` / ``parse_table_identifier`` in wal2json.c, 2.x; README,
    "Parameters": "Special characters (space, single quote, comma, period, asterisk) must be
    escaped with backslash") splits the list on unescaped ``,`` and whitespace, then each entry
    on the first unescaped ``.``; a backslash makes the next byte literal (the backslash is
    removed, whatever that byte is), and an unescaped ``*`` alone is a wildcard. Escaping every
    character outside ``[A-Za-z0-9_]`` is therefore always exact: ``,`` ``.`` ``\`` ``*``,
    space and other whitespace, quotes, and non-ASCII characters (a backslash before the first
    byte of a character: in a single-byte encoding that is the whole character, and UTF-8
    continuation bytes are never whitespace nor ASCII punctuation). Names keep their case (wal2json compares them with
    ``strcmp``). Example: ``("My Schema", "a.b,c")`` → ``My\ Schema.a\.b\,c``.
    """

    def esc(s: str) -> str:
        return "".join(c if c in _PLAIN else "\\" + c for c in s)

    return f"{esc(schema)}.{esc(table)}"


def replication_literal(value: str) -> str:
    """``value`` as a string literal of the replication command grammar: ``'…'`` with ``'``
    doubled and nothing else escaped.

    The walsender's lexer (Postgres ``src/backend/replication/repl_scanner.l``) knows only
    standard-conforming ``'…'`` strings (``''`` is a quote, a backslash is an ordinary
    character) and rejects ``E'…'``, which ``psycopg.sql.Literal`` emits for any string holding
    a backslash. Raises ``ValueError`` for a NUL character (no Postgres string holds one).
    """
    if "\x00" in value:
        raise ValueError("a replication option value cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def loads_message(data: bytes | memoryview) -> dict[str, Any]:
    """Parse one wal2json message.

    Fast path: orjson. A message with a ``numeric`` column, or with a bare ``-0`` (a float
    negative zero: integer types never print it, orjson would read it as the integer 0), is
    parsed with the stdlib parser keeping every number literal as text, so 40-digit (or
    5000-digit) numerics are not rounded through float nor refused by Python's int-string limit;
    :mod:`cdc.values` converts the literals by column type.
    """
    raw = bytes(data)
    msg: dict[str, Any]
    if b'"type":"numeric' in raw or b":-0}" in raw or b":-0," in raw:
        msg = json.loads(raw, parse_float=str, parse_int=str)
    else:
        msg = orjson.loads(raw)
    return msg


class _Inexact(Exception):
    """orjson parsed a number of this message that must be read from its literal."""


def _INEXACT(value: Any) -> Any:  # noqa: N802 - a sentinel, compared by identity
    """The converter :func:`_kind` gives ``numeric``: a marker, never called
    (:meth:`Wal2JsonDecoder._fast_row` raises :class:`_Inexact` instead)."""
    raise _Inexact


_Kind = tuple[Converter | None, bool, bool]


def _kind(type_name: str) -> _Kind:
    """How :meth:`Wal2JsonDecoder._fast_row` treats a column type: ``(converter, or None when
    orjson's value already is the model value, or _INEXACT for numeric; may print NaN/±Infinity
    as null; a zero may be a float -0)``."""
    conv: Converter | None = converter(type_name)
    if is_numeric_type(type_name) and not type_name.endswith("]"):
        conv = _INEXACT
    elif conv is converter("integer") or conv is converter("boolean") or conv is converter("text"):
        conv = None  # orjson gives int / bool / str already
    floaty = conv is converter("double precision")
    return conv, may_be_nonfinite(type_name), floaty


class Wal2JsonDecoder:
    """Assembles format-2 messages into committed transactions.

    Call :meth:`feed` with each XLogData payload in order; it returns a finished
    :class:`Transaction` on the ``C`` message and ``None`` otherwise. A transaction with more
    than ``chunk_changes`` changes or ``chunk_bytes`` bytes of messages is handed over in chunks (``final=False``, same xid and
    commit LSN — wal2json's ``B`` already carries the commit LSN since decoding happens at
    commit), so one huge transaction never sits in memory whole. Raises
    :class:`DecodeError` on messages out of order (e.g. ``I`` outside a transaction).
    """

    def __init__(self, chunk_changes: int = 5000, chunk_bytes: int = 4 << 20) -> None:
        self.chunk_changes = chunk_changes
        self.chunk_bytes = chunk_bytes
        self._tx: Transaction | None = None
        self._converters: dict[str, Converter] = {}
        self._kinds: dict[str, _Kind] = {}

    @property
    def in_transaction(self) -> bool:
        """True between a ``B`` and its ``C``."""
        return self._tx is not None

    def reset(self) -> None:
        """Forget a half-received transaction (after a reconnect the server resends it)."""
        self._tx = None

    def feed(self, data: bytes | memoryview) -> Transaction | None:
        """Decode one XLogData payload (one wal2json message); returns the finished
        :class:`Transaction` on ``C`` (or a chunk of a large one), else None. Raises
        :class:`DecodeError` and ``orjson.JSONDecodeError``/``ValueError`` on bad JSON."""
        if len(data) > 12 and data[11] == 0x43 and data[:13] == b'{"action":"C"' and self._tx is not None:
            # COMMIT: nothing in it is needed (wal2json prints "action" first).
            tx, self._tx = self._tx, None
            return tx
        row = self._fast_row
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:  # e.g. a numeric beyond 64 bits: read literals exactly
            msg, row = loads_message(data), self._row
        action = msg.get("action")
        if action == "B":
            if self._tx is not None:
                raise DecodeError(f"BEGIN of xid {msg.get('xid')} inside xid {self._tx.xid}")
            ts = msg.get("timestamp")
            self._tx = Transaction(
                xid=msg.get("xid", 0),
                commit_lsn=parse_lsn(msg["lsn"]),
                end_lsn=parse_lsn(msg["nextlsn"]),
                commit_time=datetime.fromisoformat(ts) if ts else None,
            )
            return None
        if action == "C":
            tx = self._require_tx(msg)
            self._tx = None
            return tx
        if action in ("I", "U", "D", "T"):
            tx = self._require_tx(msg)
            try:
                change = self._change(action, msg, row)
            except _Inexact:
                # A numeric or a float zero (maybe -0): orjson's numbers are not exact there.
                change = self._change(action, loads_message(data), self._row)
            tx.changes.append(change)
            tx.nbytes += len(data)
            if len(tx.changes) >= self.chunk_changes or tx.nbytes >= self.chunk_bytes:
                self._tx = Transaction(tx.xid, tx.commit_lsn, tx.end_lsn, tx.commit_time)
                tx.final = False
                return tx
            return None
        if action == "M":
            return None
        raise DecodeError(f"unknown wal2json action {action!r}")

    def _require_tx(self, msg: dict[str, Any]) -> Transaction:
        if self._tx is None:
            raise DecodeError(f"wal2json {msg.get('action')!r} message outside a transaction")
        return self._tx

    def _change(self, action: str, msg: dict[str, Any], row: Callable[..., Row]) -> Change:
        table = f"{msg['schema']}.{msg['table']}"
        if action == "I" or action == "U":
            unsure: list[str] = []
            new = row(msg["columns"], unsure)
            ident = msg.get("identity") if action == "U" else None
            return Change("insert" if action == "I" else "update", table, new=new,
                          old_key=row(ident) if ident else None,
                          maybe_nonfinite=tuple(unsure))
        if action == "D":
            return Change("delete", table, old_key=row(msg.get("identity") or []))
        return Change("truncate", table)

    def _fast_row(self, columns: list[dict[str, Any]], unsure: list[str] | None = None) -> Row:
        """:meth:`_row` for a message parsed by orjson: converters that would return orjson's
        value unchanged are skipped. Raises :class:`_Inexact` at a column whose number orjson
        may not have read exactly (any ``numeric``; a float ``0``, which may be ``-0``)."""
        row: Row = {}
        kinds = self._kinds
        for col in columns:
            value = col.get("value")
            t = col.get("type", "")
            kind = kinds.get(t)
            if kind is None:
                kind = kinds[t] = _kind(t)
            if value is None:
                if unsure is not None and kind[1]:
                    unsure.append(col["name"])
            elif kind[0] is not None:
                if kind[0] is _INEXACT or (kind[2] and not value):
                    raise _Inexact
                value = kind[0](value)
            row[col["name"]] = value
        return row

    def _row(self, columns: list[dict[str, Any]], unsure: list[str] | None = None) -> Row:
        """Column list → row; names of float/numeric columns printed as ``null`` (SQL NULL,
        or a NaN/±Infinity wal2json cannot print) are appended to ``unsure``."""
        row: Row = {}
        convs = self._converters
        for col in columns:
            value = col.get("value")
            if value is None:
                if unsure is not None and may_be_nonfinite(col.get("type", "")):
                    unsure.append(col["name"])
            else:
                t = col.get("type", "")
                conv = convs.get(t)
                if conv is None:
                    conv = convs[t] = converter(t)
                value = conv(value)
            row[col["name"]] = value
        return row
