"""Views with ``include:``: records assembled from several tables by SQL.

A view with includes is *query-derived*: its records are read from the source by one SQL
statement per batch, never pieced together from streamed rows. The statement selects the root
table's columns and, per include, a correlated subquery that builds the nested value with
``json_build_array`` (positional, every value as the type's text output via ``concat(…)``,
so nested values go through the same converters as the snapshot, :mod:`cdc.values`):

* ``many: false`` → ``(SELECT json_build_array(…) FROM t c WHERE c.col = p.parent_col
  ORDER BY … LIMIT 1)``: a nested object, ``null`` when nothing matches;
* ``many: true`` → ``json_agg`` over the ordered (and limited) matching rows: a nested array.

The bootstrap runs it over the whole root table (one statement, set-based; Postgres plans the
subqueries as index lookups), the stream runs it for the root rows a batch affected. Which
roots a change affects (:meth:`IncludeTree.affected_roots`):

* a root-table change: the row's own identity (old and new);
* a change of an included row: the parents whose ``parent_col`` equals the row's link column
  (old and new value), walked up to the root by a join along the include path.

The old value of a link column that is not part of the included table's replica identity
(``order_items.order_id``) is only in the WAL with ``REPLICA IDENTITY FULL``; the catalog check
requires it (see :func:`views.check.check_source`).

Records are read at the time the batch is resolved, i.e. at or after the commit of every change
that triggered them, and written with the commit LSN of the last such change: later changes of
any involved row are still ahead in the stream and re-derive the record with a higher version,
so every record converges to the source (ARCHITECTURE.md, rule 1).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, TypeAlias

import orjson
import psycopg
from psycopg import sql

from cdc.catalog import TableInfo
from cdc.snapshot import output_text
from cdc.values import Converter, converter, to_text

__all__ = ["IncludeNode", "IncludeTree", "KeyTuple"]

KeyTuple: TypeAlias = tuple[Any, ...]  # the root's identity values, in identity-column order (model values)


def _text(alias: str, column: str) -> sql.Composable:
    """The column's type output text (``COPY`` form), NULL stays NULL."""
    return output_text(sql.Identifier(alias, column))


def _typed_array(values: Sequence[Any], type_name: str) -> sql.Composable:
    """``ARRAY['v1', …]::text[]::type[]`` from model values (literals quoted by psycopg)."""
    return sql.SQL("ARRAY[{}]::text[]::{}[]").format(
        sql.SQL(", ").join(sql.Literal(to_text(v)) for v in values), sql.SQL(type_name))


@dataclass
class IncludeNode:
    """One ``include`` entry bound to the catalog.

    Attributes:
        name: the output field holding the nested value.
        table: qualified related table; ``info`` its catalog facts.
        parent_col: column of the parent table; ``col``: column of ``table`` it must equal.
        fields: output name → column of ``table``.
        many, ordering, limit: as in :class:`views.spec.IncludeSpec`; ``ordering`` ends with the
            table's primary key (or identity) for a deterministic order.
        children: nested includes; ``parent``: the enclosing node (``None`` under the root).
    """

    name: str
    table: str
    info: TableInfo
    parent_col: str
    col: str
    fields: dict[str, str]
    many: bool
    ordering: list[tuple[str, bool]]
    limit: int | None
    children: list["IncludeNode"] = field(default_factory=list)
    parent: "IncludeNode | None" = None

    def __post_init__(self) -> None:
        self._convs: list[tuple[str, Converter]] = [
            (out, converter(self.info.columns[col])) for out, col in self.fields.items()]

    def walk(self) -> Iterator["IncludeNode"]:
        yield self
        for c in self.children:
            yield from c.walk()

    def expression(self, parent_alias: str, aliases: Iterator[str]) -> sql.Composable:
        """The correlated subquery building this node's value for the parent row ``parent_alias``."""
        a = next(aliases)
        schema, _, name = self.table.partition(".")
        items = [_text(a, col) for col in self.fields.values()]
        items += [c.expression(a, aliases) for c in self.children]
        row = sql.SQL("json_build_array({})").format(sql.SQL(", ").join(items))
        order = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(a, col), sql.SQL("DESC" if desc else "ASC"))
            for col, desc in self.ordering)
        where = sql.SQL("{} = {}").format(sql.Identifier(a, self.col), sql.Identifier(parent_alias, self.parent_col))
        source = sql.SQL("{} AS {}").format(sql.Identifier(schema, name), sql.Identifier(a))
        if not self.many:
            return sql.SQL("(SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT 1)").format(row, source, where, order)
        limit = sql.SQL(" LIMIT {}").format(sql.Literal(self.limit)) if self.limit else sql.SQL("")
        return sql.SQL("(SELECT json_agg(s.r ORDER BY s.n) FROM (SELECT {} AS r, row_number() OVER "
                       "(ORDER BY {}) AS n FROM {} WHERE {} ORDER BY {}{}) AS s)").format(
            row, order, source, where, order, limit)

    def convert(self, value: Any) -> Any:
        """The decoded ``json_build_array`` value (or array of them) → nested dict(s)."""
        if self.many:
            return [self._one(v) for v in value or ()]
        return None if value is None else self._one(value)

    def _one(self, arr: list[Any]) -> dict[str, Any]:
        out = {name: (None if v is None else conv(v)) for (name, conv), v in zip(self._convs, arr)}
        for c, v in zip(self.children, arr[len(self._convs):]):
            out[c.name] = c.convert(v)
        return out


class IncludeTree:
    """The root table of a view and its include nodes: builds the record query and finds the
    roots a change affects.

    Args:
        root: the root table's :class:`~cdc.catalog.TableInfo`.
        root_columns: root columns to select (``(name, type)``), identity columns first.
        nodes: top-level :class:`IncludeNode` objects.
        where: SQL of the view's ``where`` (unqualified root columns) or ``None``.
    """

    def __init__(self, root: TableInfo, root_columns: Sequence[tuple[str, str]],
                 nodes: Sequence[IncludeNode], where: sql.Composable | None) -> None:
        self.root = root
        # Rows are looked up by the primary key when there is one (with REPLICA IDENTITY FULL
        # the identity is every column, NULLs and TOASTed values included).
        self.identity = root.primary_key or root.identity_columns
        cols = [c for c in self.identity] + [c for c, _ in root_columns if c not in self.identity]
        self.columns = [(c, root.columns[c]) for c in cols]
        self.nodes = list(nodes)
        self.where = where
        self._convs = [converter(t) for _, t in self.columns]

    def all_nodes(self) -> Iterator[IncludeNode]:
        for n in self.nodes:
            yield from n.walk()

    @property
    def tables(self) -> set[str]:
        """Every table whose changes can affect a record (root and included)."""
        return {self.root.qualified} | {n.table for n in self.all_nodes()}

    # -- reading records -------------------------------------------------------------------
    def select(self, keys: Sequence[KeyTuple] | None = None) -> sql.Composed:
        """The ``SELECT`` of the view's source rows: root columns by name, then one column per
        include named after it (a ``json`` value); see :meth:`rows`."""
        aliases = (f"t{i}" for i in itertools.count(1))
        schema, _, name = self.root.qualified.partition(".")
        items: list[sql.Composable] = [sql.Identifier("t0", c) for c, _ in self.columns]
        items += [sql.SQL("{} AS {}").format(n.expression("t0", aliases), sql.Identifier(n.name)) for n in self.nodes]
        conds: list[sql.Composable] = []
        if self.where is not None:
            conds.append(self.where)
        if keys is not None:
            if len(self.identity) == 1:
                c = self.identity[0]
                conds.append(sql.SQL("{} = ANY({})").format(
                    sql.Identifier("t0", c), _typed_array([k[0] for k in keys], self.root.columns[c])))
            else:
                rows = sql.SQL(", ").join(
                    sql.SQL("({})").format(sql.SQL(", ").join(
                        sql.SQL("{}::text::{}").format(sql.Literal(to_text(v)), sql.SQL(self.root.columns[c]))
                        for c, v in zip(self.identity, k)))
                    for k in keys)
                conds.append(sql.SQL("({}) IN ({})").format(
                    sql.SQL(", ").join(sql.Identifier("t0", c) for c in self.identity), rows))
        where = sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(conds)) if conds else sql.SQL("")
        return sql.SQL("SELECT {} FROM {} AS t0{}").format(
            sql.SQL(", ").join(items), sql.Identifier(schema, name), where)

    def _select(self, keys: Sequence[KeyTuple] | None) -> sql.Composed:
        return sql.SQL("COPY ({}) TO STDOUT").format(self.select(keys))

    def rows(self, conn: psycopg.Connection, keys: Sequence[KeyTuple] | None = None, *,
             chunk_rows: int = 2000) -> Iterator[list[dict[str, Any]]]:
        """Yield the view's source rows (root columns + one entry per include, nested values
        converted) in chunks; all root rows matching ``where``, or only those whose identity
        is in ``keys``. Raises :class:`psycopg.Error`."""
        names = [c for c, _ in self.columns]
        ncols = len(names)
        chunk: list[dict[str, Any]] = []
        for part in ([None] if keys is None else _chunks(keys, 1000)):
            with conn.cursor().copy(self._select(part)) as copy:
                for values in copy.rows():
                    row = {c: (None if v is None else conv(v))
                           for c, conv, v in zip(names, self._convs, values)}
                    for n, raw in zip(self.nodes, values[ncols:]):
                        row[n.name] = n.convert(None if raw is None else orjson.loads(raw))
                    chunk.append(row)
                    if len(chunk) >= chunk_rows:
                        yield chunk
                        chunk = []
        if chunk:
            yield chunk

    # -- finding affected roots --------------------------------------------------------------
    def root_key(self, row: dict[str, Any]) -> KeyTuple | None:
        """The identity tuple of a root row (``None`` if a value is missing)."""
        if any(c not in row for c in self.identity):
            return None
        return tuple(row[c] for c in self.identity)

    def row_identity(self, row: dict[str, Any]) -> KeyTuple:
        """The identity tuple of a root row read from the table (it carries every identity
        column). Raises ``KeyError`` naming the column if it does not."""
        return tuple(row[c] for c in self.identity)

    def affected_roots(self, conn: psycopg.Connection, node: IncludeNode,
                       values: Iterable[Any]) -> set[KeyTuple]:
        """Roots whose record contains rows of ``node.table`` with ``node.col`` in ``values``:
        a join from the root along the include path to ``node``'s parent, filtered on the
        parent's ``parent_col``. Raises :class:`psycopg.Error`."""
        values = [v for v in set(values) if v is not None]
        if not values:
            return set()
        path: list[IncludeNode] = []
        p = node.parent
        while p is not None:
            path.insert(0, p)
            p = p.parent
        schema, _, name = self.root.qualified.partition(".")
        joins: list[sql.Composable] = []
        prev = "t0"
        for i, n in enumerate(path, 1):
            s, _, t = n.table.partition(".")
            joins.append(sql.SQL(" JOIN {} AS {} ON {} = {}").format(
                sql.Identifier(s, t), sql.Identifier(f"t{i}"), sql.Identifier(f"t{i}", n.col),
                sql.Identifier(prev, n.parent_col)))
            prev = f"t{i}"
        parent_info = path[-1].info if path else self.root
        convs = [converter(self.root.columns[c]) for c in self.identity]
        out: set[KeyTuple] = set()
        for part in _chunks(values, 1000):  # keeps statements small
            q = sql.SQL("SELECT DISTINCT {} FROM {} AS t0{} WHERE {} = ANY({})").format(
                sql.SQL(", ").join(_text("t0", c) for c in self.identity), sql.Identifier(schema, name),
                sql.SQL("").join(joins), sql.Identifier(prev, node.parent_col),
                _typed_array(part, parent_info.columns[node.parent_col]))
            for r in conn.execute(q):
                out.add(tuple(None if v is None else conv(v) for conv, v in zip(convs, r)))
        return out


def _chunks(items: Sequence[Any] | Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while True:
        part = list(itertools.islice(it, n))
        if not part:
            return
        yield part
