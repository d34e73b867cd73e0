"""Wire loads: a snapshot encoded by Postgres straight into the sink's protocol.

For a plain projection (no ``derive``, ``include`` or aggregate) whose columns all print in the
value model exactly as Postgres prints them (:func:`cdc.values.text_form`), the snapshot query
itself renders each row as the sink's write commands and pgderive only relays bytes: no row is
decoded, derived or encoded in Python. Redis gets RESP commands
(:meth:`sinks.redis.RedisSink.wire_select`), OpenSearch ``_bulk`` lines
(:meth:`sinks.opensearch.OpenSearchSink.wire_select`). The result is the same as the row-by-row
path (:func:`pgderive.runtime.bootstrap.derive_snapshot` + ``Sink.load``), which ``tests/integration/test_wire.py``
checks (byte for byte in Redis, document and version in OpenSearch), and that path remains
the fallback whenever a view, its sink or the server does not qualify, or the sink answers an
error.

A sink offering wire loads has two methods: ``wire_select(view, fields, version, types,
generation=, live=)``
returns the SELECT list over an inner query with columns ``k`` (the record key as text) and
``f0``, ``f1``, .. (the text of output field ``fields[i]``, whose column has type name
``types[i]``), yielding two ``bytea`` columns, or None when it cannot serve the view; and
``wire_load(view, chunks)`` relays the rows (lists of those byte pairs) and returns the number
of records, raising :class:`~sinks.base.SinkError` (``retryable=False`` makes the caller load
the view row by row instead).
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from typing import Any, Callable, Generator

import psycopg
from psycopg import sql

from cdc.snapshot import output_text
from cdc.values import text_form

from sinks.base import Sink, WireLoad
from views.derive import View

__all__ = ["wire_query", "load_wire"]

log = logging.getLogger("pgderive.bootstrap")

_CHUNK_BYTES = 1 << 20  # bytes of record commands handed to the sink per send


def _text(column: str, type_name: str) -> sql.Composable | None:
    """SQL printing ``column``'s value as pgderive prints its model value, or None if the two
    differ for this type."""
    form = text_form(type_name)
    ident = sql.Identifier(column)
    if form == "text":
        return output_text(ident)
    if form == "boolean":
        return sql.SQL("CASE WHEN {0} THEN 'true' WHEN NOT {0} THEN 'false' END").format(ident)
    return None


def wire_query(conn: psycopg.Connection[Any], view: View, sink: Sink, version: int, *,
               generation: str | None = None, live: bool = False,
               within: sql.Composable | None = None) -> sql.Composed | None:
    """The ``COPY`` statement of a wire load of ``view`` into ``sink`` at ``version`` (int LSN),
    into ``generation`` (the id ``begin_generation`` returned; None: the one named by
    ``version``), or None when the view does not qualify (``live``: the stream writes the view
    meanwhile, and the sink's wire load must keep the newer write): a ``derive``/``include``/aggregate view, a key
    column outside the primary key (it could be NULL, which must become a dead letter), a column
    whose model value prints differently from Postgres (floats, ``jsonb``), a server encoding
    other than UTF8, or a sink without wire loads. ``within``: an SQL condition over the table's
    columns ANDed to the view's ``where`` (a key range, :meth:`cdc.snapshot.KeyRange.sql`;
    ARCHITECTURE.md, "Bootstrap"): the load covers only those rows. Raises
    :class:`~sinks.base.SinkError`."""
    if view.derive_fn is not None or view.tree is not None or view.aggregation is not None:
        return None
    if not isinstance(sink, WireLoad):
        return None
    types = view.info.columns
    if any(c not in view.info.primary_key for c in view.key.columns):
        return None
    if any(_text(c, types[c]) is None for c in view.columns):
        return None
    encoding = conn.execute("SHOW server_encoding").fetchone()
    if encoding is None or encoding[0] != "UTF8":
        return None
    names = list(view.fields)
    select = sink.wire_select(view.name, names, version, [types[view.fields[n]] for n in names],
                              generation=generation, live=live)
    if select is None:
        return None
    key = sql.SQL(" || ").join(
        sql.Literal(part) if isinstance(part, str) else _text(part[1], types[part[1]])
        for part in view.key.pieces())
    conds = [c for c in (view.where.sql() if view.where is not None else None, within) if c is not None]
    inner = sql.SQL("SELECT {} AS k{} FROM {}{} OFFSET 0").format(
        key, sql.SQL("").join(sql.SQL(", {} AS {}").format(_text(view.fields[n], types[view.fields[n]]),
                                                            sql.Identifier(f"f{i}"))
                              for i, n in enumerate(names)),
        sql.Identifier(*view.table.split(".", 1)),
        sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(conds)) if conds else sql.SQL(""))
    # OFFSET 0 keeps the inner query a subquery: each value is printed once, not once per use.
    return sql.SQL("COPY (SELECT {} FROM ({}) AS r) TO STDOUT (FORMAT binary)").format(select, inner)


def load_wire(conn: psycopg.Connection[Any], view: View, sink: WireLoad, query: sql.Composed,
              should_stop: Callable[[], bool], stopped: Callable[[int], BaseException],
              progress: Callable[[int], None] | None = None, part: str = "") -> tuple[int, float]:
    """Run ``query`` (from :func:`wire_query`) and relay its rows to ``sink``. Returns
    ``(records, seconds)``. Logs progress every 5 s (``part``, e.g. ``" (aid < 500001)"``, follows
    the table's name: the key range loaded) and calls ``progress(rows sent so far)``
    per chunk handed to the sink. Raises what ``stopped(rows)`` returns when
    ``should_stop()`` turns true (checked per MiB), :class:`~sinks.base.SinkError` from the sink
    and :class:`psycopg.Error` from the read."""
    t0 = last_log = time.monotonic()
    sent = 0

    def chunks() -> Generator[list[tuple[bytes, bytes]], None, None]:
        nonlocal sent, last_log
        chunk: list[tuple[bytes, bytes]] = []
        size = 0
        with conn.cursor().copy(query) as copy:
            copy.set_types(["bytea", "bytea"])
            for row in copy.rows():
                chunk.append(row)
                size += len(row[0])
                if size >= _CHUNK_BYTES:
                    if should_stop():
                        raise stopped(sent)
                    yield chunk
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent)
                    chunk, size = [], 0
                    now = time.monotonic()
                    if now - last_log >= 5:
                        log.info("snapshot of %s%s for view %s: %d rows, %.0f rows/s (wire load)",
                                 view.table, part, view.name, sent, sent / (now - t0),
                                 extra={"view": view.name, "table": view.table, "sink": view.sink})
                        last_log = now
        if chunk:
            yield chunk
            sent += len(chunk)

    # Closed explicitly: when the sink fails, the COPY (which holds the connection's lock) is
    # cancelled now, not when the traceback lets go of the generator, so the caller's
    # ROLLBACK TO SAVEPOINT can run.
    with closing(chunks()) as gen:
        records = sink.wire_load(view.name, gen)
    return records, time.monotonic() - t0
