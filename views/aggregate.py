"""``group_by`` + ``aggregate``: one record per group, kept current, exactly once.

Adding a streamed change to a running sum is not idempotent: replaying it after a ``kill -9``
would count it twice. pgderive therefore keeps each source row's *contribution* (its group and
the values it aggregates) with the version that produced it in the source database
(``pgderive.agg_rows``: "keep execution state in the database"). Per batch, in one Postgres
transaction (:meth:`AggregateStore.apply`):

1. the contributions of the touched rows are upserted, each only if its version is newer than
   the stored one (a replayed change is a no-op; a deleted row leaves a tombstone: group NULL);
2. every group a touched row left or entered is recomputed from the stored contributions with
   SQL's own ``count``/``sum``/``min``/``max``/``avg`` (exact numerics, NULLs ignored, collation
   respected, a deleted minimum simply is not there any more), using the index on
   ``(view, grp)``; a group with no rows left is deleted from the sink.

The transaction commits before the sink is written; a crash in between replays the batch, whose
contributions are then skipped but whose groups are recomputed and written again. Records of
groups carry the batch's version (commit LSN), so the sinks' compare-and-set keeps them in
order. Rows come from the same query as ``include`` views (:mod:`views.include`, ``where``
pushed down), so a group can aggregate columns of many-to-one includes
(``sum(inventory.stock)``).

The bootstrap stores every snapshot row's contribution at the consistent point; ``verify``
computes the same aggregates from a TEMPORARY copy inside its own snapshot.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import orjson
import psycopg
from psycopg import sql

from cdc.snapshot import output_text
from cdc.values import converter, to_text

from .catalog import TableInfo
from .include import IncludeNode, KeyTuple

__all__ = ["Aggregation", "Measure", "AggregateStore", "AggregateError", "parse_measure"]

AGG_RE = re.compile(r"^\s*(count|sum|min|max|avg)\s*\(\s*(\*|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\s*\)\s*$",
                    re.IGNORECASE)

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pgderive;
CREATE TABLE IF NOT EXISTS pgderive.agg_rows (
    view     text   NOT NULL,
    row_key  text   NOT NULL,
    version  bigint NOT NULL,
    grp      jsonb,
    vals     jsonb,
    PRIMARY KEY (view, row_key)
);
CREATE INDEX IF NOT EXISTS agg_rows_group ON pgderive.agg_rows (view, grp);
"""

_INT = {"smallint", "integer"}


class AggregateError(ValueError):
    """An ``aggregate``/``group_by`` entry that cannot be computed (message names it)."""


def parse_measure(text: str) -> tuple[str, str | None]:
    """``"sum(inventory.stock)"`` → ``("sum", "inventory.stock")``; ``count(*)`` → ``("count",
    None)``. Raises :class:`AggregateError`."""
    m = AGG_RE.match(text)
    if not m:
        raise AggregateError(f"expected count(*), count(col), sum(col), min(col), max(col) or avg(col), got {text!r}")
    func, arg = m.group(1).lower(), m.group(2)
    if arg == "*":
        if func != "count":
            raise AggregateError(f"{func}(*) is not an aggregate; use {func}(column)")
        return func, None
    return func, arg


@dataclass(frozen=True)
class Measure:
    """One output of a group: ``func`` over ``path`` (root column or ``include.field``) of
    Postgres type ``type`` (``None`` for ``count(*)``)."""

    name: str
    func: str
    path: str | None
    type: str | None

    @property
    def result_type(self) -> str:
        """The Postgres type of the aggregate's result (docs 9.21 "Aggregate Functions")."""
        base = (self.type or "").split("(", 1)[0].strip()
        if self.func == "count":
            return "bigint"
        if self.func in ("min", "max"):
            return self.type or "text"
        if base in ("real", "double precision"):
            return "double precision" if self.func == "avg" or base == "double precision" else "real"
        if self.func == "sum" and base in _INT:
            return "bigint"
        return "numeric"


class Aggregation:
    """The ``group_by``/``aggregate`` of a view, bound to its root table and includes.

    Args:
        group_by: root columns.
        aggregate: output name → ``func(arg)``.
        root: the root table; ``nodes``: its top-level includes (only ``many: false`` ones can
            be aggregated, as ``include_name.field``).

    Raises :class:`AggregateError` naming the bad entry.
    """

    def __init__(self, group_by: Sequence[str], aggregate: dict[str, str], root: TableInfo,
                 nodes: Sequence[IncludeNode]) -> None:
        self.group_by = list(group_by)
        for c in self.group_by:
            if c not in root.columns:
                raise AggregateError(f"group_by: unknown column {c!r} in {root.qualified}")
        self.group_types = [root.columns[c] for c in self.group_by]
        by_name = {n.name: n for n in nodes}
        self.measures: list[Measure] = []
        for name, text in aggregate.items():
            func, arg = parse_measure(text)
            typ = None
            if arg is not None:
                head, _, tail = arg.partition(".")
                if not tail:
                    if head not in root.columns:
                        raise AggregateError(f"{name}: unknown column {head!r} in {root.qualified}")
                    typ = root.columns[head]
                else:
                    node = by_name.get(head)
                    if node is None or node.many:
                        raise AggregateError(f"{name}: {head!r} is not an include with many: false")
                    if tail not in node.fields:
                        raise AggregateError(f"{name}: include {head!r} has no field {tail!r}")
                    typ = node.info.columns[node.fields[tail]]
                if func in ("sum", "avg") and typ.split("(", 1)[0].strip() not in (
                        "smallint", "integer", "bigint", "numeric", "real", "double precision", "money"):
                    raise AggregateError(f"{name}: {func} needs a number column, {arg} is {typ}")
            self.measures.append(Measure(name, func, arg, typ))
        self._group_convs = [converter(t) for t in self.group_types]
        self._result_convs = [converter(m.result_type) for m in self.measures]

    @property
    def root_columns(self) -> list[str]:
        """Root columns the contributions read."""
        cols = list(self.group_by)
        cols += [m.path for m in self.measures if m.path and "." not in m.path]
        return list(dict.fromkeys(cols))

    def contribution(self, row: dict[str, Any]) -> tuple[str, str]:
        """``(grp, vals)`` JSON texts of one row: group values and aggregated values as
        Postgres input text (``null`` for NULL)."""
        grp = [None if row.get(c) is None else to_text(row[c]) for c in self.group_by]
        vals = {}
        for m in self.measures:
            if m.path is None:
                continue
            head, _, tail = m.path.partition(".")
            v = row.get(head)
            if tail:
                v = None if v is None else v.get(tail)
            vals[m.name] = None if v is None else to_text(v)
        return orjson.dumps(grp).decode(), orjson.dumps(vals).decode()

    def group_query(self, table: sql.Composable, groups: bool) -> sql.Composable:
        """SQL computing every (``groups`` False) or the given groups (parameter 2: a
        ``jsonb[]``) of view (parameter 1) from a contributions table."""
        items: list[sql.Composable] = [sql.SQL("grp::text")]
        for m in self.measures:
            if m.path is None:
                expr = sql.SQL("count(*)")
            else:
                arg = sql.SQL("(vals->>{})::{}").format(sql.Literal(m.name), sql.SQL(m.type or "text"))
                expr = sql.SQL("{}({})").format(sql.SQL(m.func), arg)
            items.append(output_text(expr))
        cond = sql.SQL(" AND grp = ANY(%s::jsonb[])") if groups else sql.SQL("")
        return sql.SQL("SELECT {} FROM {} WHERE view = %s AND grp IS NOT NULL{} GROUP BY grp").format(
            sql.SQL(", ").join(items), table, cond)

    def direct_query(self, rows: sql.Composable, nodes: Sequence[IncludeNode]) -> sql.Composable:
        """SQL computing every group straight from the source rows ``rows`` (the SELECT of
        :meth:`views.include.IncludeTree.select`), same result shape as :meth:`group_query`:
        how ``verify`` checks the stored state independently."""
        by_name = {n.name: n for n in nodes}

        def value(path: str) -> sql.Composable:
            head, _, tail = path.partition(".")
            if not tail:
                return sql.Identifier("q", head)
            node = by_name[head]
            pos = list(node.fields).index(tail)
            return sql.SQL("({} ->> {})").format(sql.Identifier("q", head), sql.Literal(pos))

        grp = sql.SQL("jsonb_build_array({})").format(sql.SQL(", ").join(output_text(sql.Identifier("q", c)) for c in self.group_by))
        items: list[sql.Composable] = [sql.SQL("{}::text").format(grp)]
        for m in self.measures:
            if m.path is None:
                expr = sql.SQL("count(*)")
            else:
                expr = sql.SQL("{}(({})::{})").format(sql.SQL(m.func), value(m.path), sql.SQL(m.type or "text"))
            items.append(output_text(expr))
        return sql.SQL("SELECT {} FROM ({}) AS q GROUP BY {}").format(
            sql.SQL(", ").join(items), rows, grp)

    def group_record(self, grp: str, texts: Sequence[str | None]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(group columns → values, document)`` of one result row of :meth:`group_query`."""
        values = orjson.loads(grp)
        group = {c: (None if v is None else conv(v)) for c, conv, v in zip(self.group_by, self._group_convs, values)}
        doc = dict(group)
        for m, conv, t in zip(self.measures, self._result_convs, texts):
            doc[m.name] = None if t is None else conv(t)
        return group, doc


def row_key(key: KeyTuple) -> str:
    """The stored form of a root identity tuple."""
    return orjson.dumps([to_text(v) for v in key]).decode()


class AggregateStore:
    """``pgderive.agg_rows`` in the source database: the contributions of every row of every
    aggregate view, with their versions (see the module docstring).

    Args:
        dsn: libpq connection string of the source (the schema is created on first use).
    """

    TABLE = sql.Identifier("pgderive", "agg_rows")

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, application_name="pgderive-aggregates")
            with self.conn.transaction():
                self.conn.execute(_SCHEMA)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def apply(self, view: str, agg: Aggregation,
              items: Iterable[tuple[KeyTuple, int, dict[str, Any] | None]]) -> tuple[list, list[str]]:
        """Store contributions ``(root identity, version, row or None)`` of ``view`` (newer
        versions only) and recompute every group they touch, in one transaction.

        Returns ``(rows, touched)``: :meth:`Aggregation.group_query` rows of the touched groups
        that still have rows, and the JSON texts of all touched groups (those without a row
        are empty: to delete). Raises :class:`psycopg.Error`."""
        keyed = {}
        for key, version, row in items:
            keyed[row_key(key)] = (version, agg.contribution(row) if row is not None else (None, None))
        if not keyed:
            return [], []
        conn = self.connection()
        with conn.transaction():
            old = conn.execute(sql.SQL("SELECT row_key, version, grp::text FROM {} WHERE view = %s AND "
                                       "row_key = ANY(%s) FOR UPDATE").format(self.TABLE),
                               (view, list(keyed))).fetchall()
            stored = {k: (v, g) for k, v, g in old}
            touched: set[str] = {g for _, g in stored.values() if g is not None}
            write = []
            for k, (version, (grp, vals)) in keyed.items():
                if grp is not None:
                    touched.add(grp)
                prev = stored.get(k)
                if prev is None or version > prev[0]:
                    write.append((view, k, version, grp, vals))
            if write:
                with conn.cursor() as cur:
                    cur.executemany(sql.SQL(
                        "INSERT INTO {} (view, row_key, version, grp, vals) VALUES (%s, %s, %s, %s, %s) "
                        "ON CONFLICT (view, row_key) DO UPDATE SET version = excluded.version, "
                        "grp = excluded.grp, vals = excluded.vals").format(self.TABLE), write)
            groups = sorted(touched)
            rows = conn.execute(agg.group_query(self.TABLE, True), (view, groups)).fetchall() if groups else []
        return rows, groups

    def truncate(self, view: str, version: int) -> None:
        """Every row of ``view``'s table is gone as of ``version`` (a TRUNCATE): tombstones."""
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("UPDATE {} SET grp = NULL, vals = NULL, version = %s WHERE view = %s "
                                 "AND version < %s").format(self.TABLE), (version, view, version))

    def reset(self, view: str) -> None:
        """Forget ``view``'s contributions (before a bootstrap or rebuild loads them again)."""
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {} WHERE view = %s").format(self.TABLE), (view,))

    def load(self, view: str, agg: Aggregation, rows: Iterable[tuple[KeyTuple, dict[str, Any]]],
             version: int) -> None:
        """Append snapshot contributions at ``version`` (after :meth:`reset`), committed."""
        conn = self.connection()
        with conn.transaction(), conn.cursor().copy(sql.SQL(
                "COPY {} (view, row_key, version, grp, vals) FROM STDIN").format(self.TABLE)) as copy:
            for key, row in rows:
                grp, vals = agg.contribution(row)
                copy.write_row((view, row_key(key), version, grp, vals))

    def all_groups(self, view: str, agg: Aggregation) -> list:
        """:meth:`Aggregation.group_query` rows of every group of ``view``."""
        conn = self.connection()
        with conn.transaction():
            return conn.execute(agg.group_query(self.TABLE, False), (view,)).fetchall()
