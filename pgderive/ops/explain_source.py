"""The source side of ``pgderive explain``: one record's source rows and what the view derives
for it now, read in one snapshot (ARCHITECTURE.md, "Explain").

:func:`read_source` opens a ``REPEATABLE READ READ ONLY`` transaction whose first statement
reads ``pg_current_wal_flush_lsn()``: the snapshot is taken as that statement starts, and a
commit is visible only once its commit record is flushed (``synchronous_commit`` on), so every
commit visible in the snapshot ends at or before that LSN (S), and a slot confirmed at S has had
all of them applied. The flush position, not ``pg_current_wal_lsn()`` (the write position): a
logical slot only decodes flushed WAL, and on an idle server a record written after the last
flush (a page pruned by a read, a running-transactions record) can stay unflushed, so an idle
daemon would never confirm the write position (measured: 56 bytes short for over 10 s). An
asynchronous commit visible before its flush is caught by the verify's second round. Everything
else is read in the same snapshot:

* the root rows whose key columns render the key (:func:`views.keys.parse_key`), whether or
  not they satisfy the view's ``where`` (that is reported), with their ``xmin`` and, when
  ``track_commit_timestamp`` is on, ``pg_xact_commit_timestamp(xmin)``;
* for an ``include`` view every included row, by include path (``customer``, ``items[]``,
  ``items[].product``), read parent by parent with the include's own ``on``, ``order_by`` and
  ``limit``;
* for an aggregate view the group: its rows in the source, and what the aggregate state
  (``pgderive.agg_rows``) counts for it with a sample of its keys;
* the expected document, through the derivation paths bootstrap and verify use: a plain view's
  :meth:`~views.derive.View.row_op`, an include view's :meth:`~views.include.IncludeTree.rows`
  for that root, an aggregate view's :meth:`~views.aggregate.Aggregation.direct_query` over the
  group's rows.

Only the columns a view reads are shown of each row (its identity, key, fields, ``where``,
link and aggregate columns): a column no view copies is not printed, classified or not.
Values are in the value model (:mod:`cdc.values`). Every SQL value is a literal
(:class:`psycopg.sql.Literal`), never a parameter, so a ``%`` in a ``where`` stays text.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Sequence

import psycopg
from psycopg import sql

from cdc.catalog import TableInfo
from cdc.lsn import parse_lsn
from cdc.snapshot import output_text
from cdc.values import converter, to_text
from sinks.base import Doc
from views.derive import DerivationError, View
from views.include import IncludeNode
from views.keys import KeyMismatch

from ..state.aggregates import GroupMembers, group_members

__all__ = ["SourceRow", "GroupFacts", "SourceRead", "read_source", "MAX_INCLUDED", "SAMPLE"]

#: Included rows read at most per record (an order with thousands of items stays bounded).
MAX_INCLUDED = 200
#: Contributions of an aggregate group shown.
SAMPLE = 5
_MAX_ROOTS = 10


@dataclass(frozen=True)
class SourceRow:
    """One source row a record is derived from.

    Attributes:
        path: ``""`` for the root row, else the include path (``items[].product``: ``[]`` marks
            a ``many: true`` include).
        table: qualified table name.
        key: the row's identity (primary key, else replica identity columns) → value.
        values: the columns the view reads of it → current value (model values).
        xmin: the root row's ``xmin`` (the transaction that wrote its current version), None
            for included rows.
        xmin_committed_at: that transaction's commit time (``track_commit_timestamp``), None
            when unknown.
        in_view: for a root row, whether it satisfies the view's ``where`` (True without one).
    """

    path: str
    table: str
    key: dict[str, Any]
    values: dict[str, Any]
    xmin: int | None = None
    xmin_committed_at: dt.datetime | None = None
    in_view: bool = True


@dataclass(frozen=True)
class GroupFacts:
    """The group an aggregate record stands for.

    Attributes:
        values: group column → value as Postgres text (from the key).
        source_rows: the view's source rows in the group now (after ``where``).
        identity: the root table's identity columns (names of the sample keys' values).
        state: what ``pgderive.agg_rows`` holds of the group, None without aggregate state.
    """

    values: dict[str, str]
    source_rows: int
    identity: tuple[str, ...]
    state: GroupMembers | None


@dataclass
class SourceRead:
    """What one snapshot of the source says about one key.

    Attributes:
        lsn: S, ``pg_current_wal_flush_lsn()`` when the snapshot was taken (int LSN).
        expected: the document the view derives for the key now (model values); None when the
            view holds no record for it (no row, ``where`` false, ``derive`` returned None, or
            no group).
        rows: the root rows rendering the key, then every included row.
        group: an aggregate view's group, else None.
        underivable: why the row cannot be derived (a dead letter), else None.
        truncated: more than :data:`MAX_INCLUDED` included rows: the rest are not listed.
        commit_ts_note: why ``xmin`` has no commit time (``track_commit_timestamp`` off), or None.
    """

    lsn: int
    expected: Doc | None = None
    rows: list[SourceRow] = field(default_factory=list)
    group: GroupFacts | None = None
    underivable: str | None = None
    truncated: bool = False
    commit_ts_note: str | None = None


def _ident(table: str) -> sql.Identifier:
    schema, _, name = table.partition(".")
    return sql.Identifier(schema, name)


def _equals(alias: str, column: str, type_name: str, text: str) -> sql.Composable:
    """``alias.column = 'text'``, the literal taken as the column's type (json as jsonb)."""
    ident = sql.Identifier(alias, column)
    if type_name.split("(", 1)[0].strip() in ("json", "jsonb"):
        return sql.SQL("{}::jsonb = {}::jsonb").format(ident, sql.Literal(text))
    return sql.SQL("{} = {}").format(ident, sql.Literal(text))


def _identity(info: TableInfo) -> tuple[str, ...]:
    return tuple(info.primary_key or info.identity_columns)


def _convert(columns: Sequence[tuple[str, str]], values: Sequence[Any]) -> dict[str, Any]:
    return {c: (None if v is None else converter(t)(v)) for (c, t), v in zip(columns, values)}


def read_source(dsn: str, view: View, key: str, candidates: Sequence[dict[str, str]]) -> SourceRead:
    """Read what the source holds for ``key`` of ``view`` in one snapshot (module docstring).

    Args:
        dsn: libpq DSN of the source.
        view: the bound view.
        key: the sink key.
        candidates: the key column values that render ``key`` (:func:`views.keys.parse_key`).

    Raises:
        KeyMismatch: no candidate is a valid value of its columns' types (e.g. ``'x'`` for a
            ``uuid``), or several candidates name existing rows (an ambiguous key).
        psycopg.Error: the source cannot be read.
    """
    with psycopg.connect(dsn, application_name="pgderive-explain") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text, "
                           "current_setting('track_commit_timestamp')").fetchone()
        assert row is not None
        out = SourceRead(parse_lsn(row[0]))
        track = row[1] == "on"
        if not track:
            out.commit_ts_note = "track_commit_timestamp is off"
        try:
            if view.aggregation is not None:
                _read_group(conn, view, key, candidates, out)
            else:
                _read_record(conn, view, key, candidates, out, track)
        finally:
            conn.rollback()
    return out


def _root_columns(view: View) -> list[tuple[str, str]]:
    links = [i.link[0] for i in (view.spec.include or {}).values()]
    names = dict.fromkeys([*_identity(view.info), *view.columns, *links])
    return [(c, view.info.columns[c]) for c in names if c in view.info.columns]


def _roots(conn: psycopg.Connection, view: View, key: str, candidates: Sequence[dict[str, str]],
           track: bool) -> list[SourceRow]:
    """The root rows whose key columns hold one candidate's values and render ``key``."""
    columns = _root_columns(view)
    where = view.where.sql() if view.where is not None else sql.SQL("true")
    hits: list[list[SourceRow]] = []
    valid = 0
    for cand in candidates:
        conds = [_equals("t0", c, view.info.columns[c], cand[c]) for c in view.key.columns]
        query = sql.SQL("SELECT {}, ({}) IS TRUE, xmin::text FROM {} AS t0 WHERE {} LIMIT {}").format(
            sql.SQL(", ").join(output_text(sql.Identifier("t0", c)) for c, _ in columns), where,
            _ident(view.table), sql.SQL(" AND ").join(conds), sql.Literal(_MAX_ROOTS))
        try:
            with conn.transaction():  # a savepoint: a value the type refuses only ends this candidate
                fetched = conn.execute(query).fetchall()
        except psycopg.errors.DataError:
            continue
        valid += 1
        rows = []
        for r in fetched:
            values = _convert(columns, r[:len(columns)])
            try:
                if view.key.render(values) != key:  # e.g. numeric 1.50 for the key "…:1.5"
                    continue
            except ValueError:
                continue
            xmin = int(r[len(columns) + 1])
            ident = _identity(view.info)
            rows.append(SourceRow("", view.table, {c: values[c] for c in ident},
                                  {c: values[c] for c, _ in columns}, xmin,
                                  _commit_time(conn, xmin) if track else None, bool(r[len(columns)])))
        if rows:
            hits.append(rows)
    if valid == 0:
        raise KeyMismatch(f"key {key!r} does not fit the key template {view.key.text!r}: no value of "
                          f"the column type(s) renders it")
    if len(hits) > 1:
        raise KeyMismatch(f"key {key!r} is ambiguous for the key template {view.key.text!r}: rows with "
                          "different key column values render it")
    return hits[0] if hits else []


def _commit_time(conn: psycopg.Connection, xid: int) -> dt.datetime | None:
    """``pg_xact_commit_timestamp(xid)``, None when Postgres cannot tell (a frozen or bootstrap
    xid, older than the commit timestamps kept, or written before tracking was on)."""
    if xid < 3:
        return None
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL("SELECT pg_xact_commit_timestamp({}::text::xid)").format(
                sql.Literal(str(xid)))).fetchone()
    except psycopg.Error:
        return None
    return None if row is None else row[0]


def _read_record(conn: psycopg.Connection, view: View, key: str, candidates: Sequence[dict[str, str]],
                 out: SourceRead, track: bool) -> None:
    roots = _roots(conn, view, key, candidates, track)
    out.rows.extend(roots)
    root = next((r for r in roots if r.in_view), None)
    if root is None:
        return
    if view.tree is None:
        row = root.values
    else:
        ident = tuple(root.values[c] for c in view.tree.identity)
        found = [r for chunk in view.tree.rows(conn, [ident]) for r in chunk]
        if not found:
            return
        row = found[0]
        budget = [MAX_INCLUDED]
        _included(conn, view.tree.nodes, root.values, "", out, budget)
    try:
        op = view.row_op(row, 0)
    except DerivationError as e:
        out.underivable = e.reason
        return
    out.expected = None if op is None else op.doc


def _included(conn: psycopg.Connection, nodes: Sequence[IncludeNode], parent: dict[str, Any], prefix: str,
              out: SourceRead, budget: list[int]) -> None:
    """Append the rows each of ``nodes`` includes for ``parent`` (and theirs, depth first)."""
    for node in nodes:
        value = parent.get(node.parent_col)
        if value is None:
            continue
        if budget[0] <= 0:
            out.truncated = True
            return
        ident = _identity(node.info)
        names = dict.fromkeys([*ident, *node.fields.values(), node.col, *(c.parent_col for c in node.children)])
        columns = [(c, node.info.columns[c]) for c in names if c in node.info.columns]
        want = 1 if not node.many else (node.limit or MAX_INCLUDED)
        take = min(want, budget[0])
        order = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier("a", c), sql.SQL("DESC" if desc else "ASC"))
                                   for c, desc in node.ordering)
        query = sql.SQL("SELECT {} FROM {} AS a WHERE {} ORDER BY {} LIMIT {}").format(
            sql.SQL(", ").join(output_text(sql.Identifier("a", c)) for c, _ in columns), _ident(node.table),
            _equals("a", node.col, node.info.columns[node.col], to_text(value)), order,
            sql.Literal(take + 1 if take < want else take))
        fetched = conn.execute(query).fetchall()
        if len(fetched) > take:
            out.truncated = True
        path = prefix + node.name + ("[]" if node.many else "")
        for r in fetched[:take]:
            values = _convert(columns, r)
            budget[0] -= 1
            out.rows.append(SourceRow(path, node.table, {c: values[c] for c in ident},
                                      {c: values[c] for c in names if c in values}))
            _included(conn, node.children, values, path + ".", out, budget)


def _read_group(conn: psycopg.Connection, view: View, key: str, candidates: Sequence[dict[str, str]],
                out: SourceRead) -> None:
    tree, agg = view.tree, view.aggregation
    assert tree is not None and agg is not None
    types = dict(zip(agg.group_by, agg.group_types))
    chosen: dict[str, str] | None = None
    valid = 0
    for cand in candidates:  # the first candidate naming a group with rows wins; else the first valid one
        conds = sql.SQL(" AND ").join(_equals("g", c, types[c], cand[c]) for c in view.key.columns)
        rows_sql = sql.SQL("SELECT * FROM ({}) AS g WHERE {}").format(tree.select(), conds)
        try:
            with conn.transaction():
                counted = conn.execute(sql.SQL("SELECT count(*) FROM ({}) AS q").format(rows_sql)).fetchone()
                groups = conn.execute(agg.direct_query(rows_sql, tree.nodes)).fetchall()
        except psycopg.errors.DataError:
            continue
        valid += 1
        n = int(counted[0]) if counted else 0
        if chosen is None or n:
            chosen = cand
            ops, errors = view.group_ops(groups, [], 0)
            op = next((o for o in ops if o.key == key), None)
            out.expected = None if op is None else op.doc
            out.underivable = errors[0].reason if errors and op is None else None
            state = group_members(conn, view.name, [(agg.group_by.index(c), cand[c]) for c in view.key.columns],
                                  SAMPLE)
            out.group = GroupFacts({c: cand[c] for c in view.key.columns}, n, tuple(tree.identity),
                                   state)
        if n:
            break
    if valid == 0:
        raise KeyMismatch(f"key {key!r} does not fit the key template {view.key.text!r}: no value of "
                          f"the column type(s) renders it")
