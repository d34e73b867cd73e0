"""Reading tables under an exported snapshot (ARCHITECTURE.md, rule 4).

A snapshot exported by ``CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`` is imported with
``SET TRANSACTION SNAPSHOT`` as the first statement of a REPEATABLE READ transaction (Postgres
docs, "SET TRANSACTION"); every row committed before the slot's consistent point is visible,
nothing after it. Rows are streamed with ``COPY (SELECT …) TO STDOUT`` in text format and
converted with the same value model as the stream (:mod:`cdc.values`).

A large table can be read in parts (:class:`KeyRange`, :func:`key_ranges`; ARCHITECTURE.md,
"Bootstrap"): ranges of its single integer primary-key column, each read on a connection of its
own in the same snapshot.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import psycopg
from psycopg import sql

from .changes import Row
from .values import converter, to_text

__all__ = ["snapshot_connection", "read_table", "read_rows", "output_text", "KeyRange", "key_ranges",
           "row_estimate", "snapshot_version", "SPLIT_TYPES"]

#: Types (``format_type`` names) of a primary-key column a table may be split on.
SPLIT_TYPES = frozenset({"smallint", "integer", "bigint"})


def snapshot_version(consistent_point: int) -> int:
    """The version (int LSN) of the state a snapshot exported at ``consistent_point`` shows:
    ``consistent_point - 1``, for writes that may race with the stream (ARCHITECTURE.md,
    rule 1).

    The snapshot holds every commit whose commit record starts before the consistent point; the
    slot streams every commit whose commit record starts at or after it (Postgres'
    ``SnapBuildXactNeedsSkip``: skipped when the record's start < ``start_decoding_at``). A commit
    record may start *exactly* at the consistent point: measured here under two writers, the
    first streamed commit of 22 of 300 new slots had commit LSN == consistent point. Its Ops carry
    that version, and sinks re-apply an equal version, so a snapshot row written at the
    consistent point after that commit's Op would undo it. At ``consistent_point - 1`` the
    snapshot row loses to every streamed commit whatever the order of the two writes, and still
    wins over every commit the snapshot holds (commit LSN <= ``consistent_point - 1``).
    """
    return consistent_point - 1


@contextmanager
def snapshot_connection(dsn: str, snapshot_name: str | None, *,
                        read_only: bool = True) -> Iterator[psycopg.Connection]:
    """A connection inside a REPEATABLE READ (by default READ ONLY) transaction on
    ``snapshot_name``; the transaction is rolled back at the end.

    With ``snapshot_name`` None the transaction takes its own snapshot. ``read_only=False``
    allows temporary tables (``verify`` computes aggregate views in one). The transaction runs
    with ``statement_timeout = 0`` (``SET LOCAL``): its ``COPY`` may take as long as it needs.
    Raises :class:`psycopg.Error` if the snapshot no longer exists (its exporting replication
    connection moved on or closed).
    """
    with psycopg.connect(dsn, application_name="pgderive-snapshot") as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if read_only
                     else "BEGIN ISOLATION LEVEL REPEATABLE READ")
        if snapshot_name is not None:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
        # A snapshot read lasts as long as the tables need: no statement_timeout (from the
        # DSN's options, the role or the database) may cancel a bootstrap's COPY half way.
        conn.execute("SET LOCAL statement_timeout = 0")
        try:
            yield conn
        finally:
            conn.rollback()


def read_table(conn: psycopg.Connection, table: str, columns: Sequence[tuple[str, str]],
               *, chunk_rows: int = 5000, chunk_bytes: int = 4 << 20,
               where: sql.Composable | None = None) -> Iterator[list[Row]]:
    """Yield the rows of ``table`` (``schema.name``) in chunks of up to ``chunk_rows`` rows or
    about ``chunk_bytes`` bytes of text values, whichever comes first (wide rows: 1,500 rows
    of 100 kB would otherwise make a 150 MB chunk).

    ``columns``: ``(name, format_type type name)`` pairs to read. Each row is a dict
    column → value in the stream's value model. Memory is bounded by one chunk. ``where``:
    an SQL condition over the table's (unqualified) columns; only rows where it is TRUE.
    """
    schema, _, name = table.partition(".")
    names = [c for c, _ in columns]
    convs = [converter(t) for _, t in columns]
    query = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in names), sql.Identifier(schema, name),
        sql.SQL(" WHERE {}").format(where) if where is not None else sql.SQL(""))
    chunk: list[Row] = []
    nbytes = 0
    with conn.cursor().copy(query) as copy:
        for values in copy.rows():
            chunk.append({c: (None if v is None else conv(v))
                          for c, conv, v in zip(names, convs, values)})
            nbytes += sum(len(v) for v in values if v is not None)
            if len(chunk) >= chunk_rows or nbytes >= chunk_bytes:
                yield chunk
                chunk = []
                nbytes = 0
    if chunk:
        yield chunk


@dataclass(frozen=True)
class KeyRange:
    """One part of a table split on its integer key column ``column``: the rows with
    ``low <= column < high``. ``low`` None: no lower bound (the first part), ``high`` None: no
    upper bound (the last part); the parts :func:`key_ranges` returns hold every row exactly
    once, whatever the table held when the bounds were chosen."""

    column: str
    low: int | None = None
    high: int | None = None

    def sql(self) -> sql.Composable:
        """The condition as SQL over the table's unqualified column (bounds as literals, no
        ``%``: safe with or without query parameters); ``true`` for an unbounded range."""
        col = sql.Identifier(self.column)
        conds: list[sql.Composable] = []
        if self.low is not None:
            conds.append(sql.SQL("{} >= {}").format(col, sql.Literal(self.low)))
        if self.high is not None:
            conds.append(sql.SQL("{} < {}").format(col, sql.Literal(self.high)))
        return sql.SQL("({})").format(sql.SQL(" AND ").join(conds)) if conds else sql.SQL("true")

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return f"all of {self.column}"
        if self.low is None:
            return f"{self.column} < {self.high}"
        if self.high is None:
            return f"{self.column} >= {self.low}"
        return f"{self.low} <= {self.column} < {self.high}"


def row_estimate(conn: psycopg.Connection, table: str) -> float | None:
    """The planner's row estimate of ``table`` (``schema.name``): ``pg_class.reltuples``, kept by
    VACUUM and ANALYZE (autovacuum included). None when the table was never vacuumed or analyzed
    (reltuples is -1) or does not exist. Raises :class:`psycopg.Error`."""
    schema, _, name = table.partition(".")
    row = conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                       " WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone()
    return float(row[0]) if row is not None and row[0] is not None and row[0] >= 0 else None


def key_ranges(conn: psycopg.Connection, table: str, column: str, parts: int) -> list[KeyRange]:
    """Split ``table`` (``schema.name``) into up to ``parts`` ranges of its integer key
    ``column``, as the snapshot ``conn`` is in sees it, in key order.

    The bounds are equal-width between ``min(column)`` and ``max(column)`` (one query, two
    index probes when the column is indexed, as a primary key is): even parts for dense keys
    (serials), uneven ones where the keys cluster; an exact split by quantiles
    (``percentile_disc``) would sort the whole column first. The first range has no lower bound
    and the last no upper one, so no row is missed whatever the estimate that chose ``parts``;
    a NULL key is not in any range (a primary key has none). Fewer ranges when the key span is
    narrower than ``parts``; ``[KeyRange(column)]`` (the whole table) for an empty table or
    ``parts`` < 2. Raises :class:`psycopg.Error`."""
    schema, _, name = table.partition(".")
    col = sql.Identifier(column)
    row = conn.execute(sql.SQL("SELECT min({0}), max({0}) FROM {1}").format(col, sql.Identifier(schema, name))).fetchone()
    if row is None or row[0] is None:
        return [KeyRange(column)]
    low, high = int(row[0]), int(row[1])
    parts = min(parts, high - low + 1)
    if parts < 2:
        return [KeyRange(column)]
    span = high - low + 1
    edges: list[int | None] = [None, *(low + span * i // parts for i in range(1, parts)), None]
    return [KeyRange(column, a, b) for a, b in zip(edges, edges[1:])]


def output_text(expr: sql.Composable) -> sql.Composable:
    """SQL for ``expr`` as its type's text output, NULL staying NULL: what ``COPY`` prints, so
    the value model's converters apply (``concat`` calls the output function; a ``::text``
    cast differs for ``char(n)``, which loses its padding, and ``inet``). Contains no ``%``,
    so it is safe in statements that take parameters."""
    return sql.SQL("CASE WHEN {0} IS NULL THEN NULL ELSE concat({0}) END").format(expr)


def read_rows(conn: psycopg.Connection, table: str, columns: Sequence[tuple[str, str]],
              key: Mapping[str, Any], types: Mapping[str, str], *, limit: int = 2,
              prepare: bool = False) -> list[Row]:
    """The rows of ``table`` (``schema.name``) whose ``key`` columns equal the given model
    values (``None`` matches SQL NULL), at most ``limit`` of them, as ``columns`` (``(name,
    type)`` pairs) in the value model.

    ``types``: column → ``format_type`` name, for the ``key`` columns. Values are sent as
    untyped text, so Postgres compares them as the column's own type (``json``/``jsonb`` as
    ``jsonb``: ``json`` has no equality). Raises :class:`psycopg.Error`.
    """
    schema, _, name = table.partition(".")
    conds: list[sql.Composable] = []
    params: list[str] = []
    for column, value in key.items():
        ident = sql.Identifier(column)
        if value is None:
            conds.append(sql.SQL("{} IS NULL").format(ident))
            continue
        if types.get(column, "").split("(", 1)[0].strip() in ("json", "jsonb"):
            conds.append(sql.SQL("{}::jsonb = %s::jsonb").format(ident))
        else:
            conds.append(sql.SQL("{} = %s").format(ident))
        params.append(to_text(value))
    query = sql.SQL("SELECT {} FROM {} WHERE {} LIMIT {}").format(
        sql.SQL(", ").join(output_text(sql.Identifier(c)) for c, _ in columns),
        sql.Identifier(schema, name), sql.SQL(" AND ").join(conds) if conds else sql.SQL("true"),
        sql.Literal(limit))
    convs = [converter(t) for _, t in columns]
    return [{c: (None if v is None else conv(v)) for (c, _), conv, v in zip(columns, convs, row)}
            for row in conn.execute(query, params, prepare=prepare)]
