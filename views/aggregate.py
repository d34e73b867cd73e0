"""``group_by`` + ``aggregate``: one record per group, kept current incrementally, exactly once.

Adding a streamed change to a running sum is not idempotent: replaying it after a ``kill -9``
would count it twice. pgderive therefore keeps, in the source database ("keep execution state
in the database"), each source row's *contribution* (its group and the values it aggregates)
with the version that produced it (``pgderive.agg_rows``) and each group's aggregate *state*
(``pgderive.agg_groups``). Per batch, in one Postgres transaction (:meth:`pgderive.state.aggregates.AggregateStore.apply`):

1. the contributions of the touched rows are upserted, each only if its version is newer than
   the stored one (a replayed change is a no-op; a deleted row leaves a tombstone: group NULL);
2. only the contributions actually replaced become deltas: ``-old`` from the group the row
   left, ``+new`` into the group it entered. Each group's state is updated by its deltas in
   O(changed rows), not O(group size):

   * ``count(*)``, ``count(col)``, and ``sum``/``avg`` of ``smallint``/``integer``/``bigint``/
     ``numeric`` keep additive counters summed in ``numeric`` (exact): row count, non-NULL
     count, finite sum, finite count; for ``numeric`` also the counts of ``NaN``,
     ``±Infinity`` and of each display scale, so the result is exactly what Postgres'
     ``sum``/``avg`` return over the group (its scale is the largest input scale, ``NaN`` and
     opposite infinities give ``NaN``: ``numeric_sum``/``numeric_avg`` in
     ``src/backend/utils/adt/numeric.c``; ``avg`` is ``sum / count`` by ``numeric_div``);
   * ``min``/``max`` keep the current extreme, moved by ``least``/``greatest`` (Postgres'
     comparison, collation included) when values arrive; when a removed value reaches the
     extreme and no added one replaces it, the group is recomputed from its stored
     contributions (index on ``(view, grp)``);
   * ``sum``/``avg`` of ``real``, ``double precision`` and ``money`` are recomputed from the
     stored contributions of every touched group: a float sum depends on summation order, so
     no delta reproduces it.

   A group with no rows left is deleted from the state and from the sink.

The transaction commits before the sink is written; a crash in between replays the batch, whose
contributions are then skipped (no delta) but whose groups' current states are written again.
Records of groups carry the batch's version (commit LSN), so the sinks' compare-and-set keeps
them in order. Derivation workers, several of which move one group, write each group at a
version of its own that grows with every move instead
(:meth:`pgderive.state.aggregates.AggregateStore.apply_worker`, ARCHITECTURE.md, "Kafka workers"). Rows come from the same query as ``include`` views (:mod:`views.include`,
``where`` pushed down), so a group can aggregate columns of many-to-one includes
(``sum(inventory.stock)``).

The bootstrap stores every snapshot row's contribution at the consistent point and computes
the states from them; ``verify`` computes the aggregates straight from the source rows inside
its own snapshot (:meth:`Aggregation.direct_query`), independent of the stored state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import orjson
from psycopg import sql

from cdc.catalog import TableInfo
from cdc.snapshot import output_text
from cdc.values import converter, to_text

from .include import IncludeNode, KeyTuple

__all__ = ["Aggregation", "Measure", "AggregateError", "group_text", "parse_measure", "row_key"]

AGG_RE = re.compile(r"^\s*(count|sum|min|max|avg)\s*\(\s*(\*|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\s*\)\s*$",
                    re.IGNORECASE)

_INT = {"smallint", "integer", "bigint"}
_NUMBER = _INT | {"numeric", "real", "double precision", "money"}


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


def _base(typ: str | None) -> str:
    return (typ or "").split("(", 1)[0].strip()


def _counter(i: int, name: str) -> sql.Literal:
    """The key ``i.name`` of measure ``i``'s counter ``name`` in a state's ``add`` object."""
    return sql.Literal(f"{i}.{name}")


def _has(i: int, name: str) -> sql.Composed:
    """``(a ? 'i.name')``: the state's ``add`` object ``a`` has measure ``i``'s counter ``name``."""
    return sql.SQL("(a ? {})").format(_counter(i, name))


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
        base = _base(self.type)
        if self.func == "count":
            return "bigint"
        if self.func in ("min", "max"):
            return self.type or "text"
        if base in ("real", "double precision"):
            return "double precision" if self.func == "avg" or base == "double precision" else "real"
        if base == "money" and self.func == "sum":
            return "money"
        if self.func == "sum" and base in ("smallint", "integer"):
            return "bigint"
        return "numeric"

    @property
    def kind(self) -> str:
        """How the group state keeps it: ``"rows"`` (``count(*)``), ``"additive"`` (exact
        counters), ``"extreme"`` (``min``/``max``) or ``"recompute"`` (float and money sums)."""
        if self.path is None:
            return "rows"
        if self.func in ("min", "max"):
            return "extreme"
        if self.func == "count" or _base(self.type) in _INT | {"numeric"}:
            return "additive"
        return "recompute"


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
                if func in ("sum", "avg") and _base(typ) not in _NUMBER:
                    raise AggregateError(f"{name}: {func} needs a number column, {arg} is {typ}")
                if func == "avg" and _base(typ) == "money":  # Postgres has sum(money), no avg(money)
                    raise AggregateError(f"{name}: Postgres has no avg(money); declare sum({arg}) and "
                                         f"count({arg}) and divide them in a derive function")
            self.measures.append(Measure(name, func, arg, typ))
        self._group_convs = [converter(t) for t in self.group_types]
        self._result_convs = [converter(m.result_type) for m in self.measures]

    @property
    def root_columns(self) -> list[str]:
        """Root columns the contributions read."""
        cols = list(self.group_by)
        cols += [m.path for m in self.measures if m.path and "." not in m.path]
        return list(dict.fromkeys(cols))

    @property
    def incremental(self) -> bool:
        """Whether every measure is kept by deltas (no float or money sums)."""
        return all(m.kind != "recompute" for m in self.measures)

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

    # -- SQL over contributions (a relation with columns grp jsonb, vals jsonb) ---------------

    @staticmethod
    def _value(m: Measure) -> sql.Composable:
        return sql.SQL("((vals->>{})::{})").format(sql.Literal(m.name), sql.SQL(m.type or "text"))

    def _vector(self) -> sql.Composable:
        """A contribution's additive counters as a ``jsonb`` object (absent key = 0): ``n``
        (rows) and, for measure ``i``, ``i.c`` (non-NULL), ``i.s`` (finite sum), and for
        ``numeric`` ``i.f`` (finite), ``i.n``/``i.p``/``i.m`` (NaN, ±Infinity), ``i.d<scale>``."""
        parts: list[sql.Composable] = [sql.SQL("jsonb_build_object('n', 1)")]
        for i, m in enumerate(self.measures):
            if m.kind != "additive":
                continue
            v, k = self._value(m), partial(_counter, i)
            pairs = [sql.SQL("{}, CASE WHEN {} IS NOT NULL THEN 1 END").format(k("c"), v)]
            if m.func != "count" and _base(m.type) == "numeric":
                pairs += [sql.SQL("{}, CASE WHEN scale({}) IS NOT NULL THEN {} END").format(k("s"), v, v),
                          sql.SQL("{}, CASE WHEN scale({}) IS NOT NULL THEN 1 END").format(k("f"), v),
                          sql.SQL("{}, CASE WHEN {} = 'NaN' THEN 1 END").format(k("n"), v),
                          sql.SQL("{}, CASE WHEN {} = 'Infinity' THEN 1 END").format(k("p"), v),
                          sql.SQL("{}, CASE WHEN {} = '-Infinity' THEN 1 END").format(k("m"), v),
                          sql.SQL("coalesce({} || scale({}), {}), CASE WHEN scale({}) IS NOT NULL THEN 1 END")
                          .format(k("d"), v, k("d"), v)]
            elif m.func != "count":
                pairs.append(sql.SQL("{}, {}").format(k("s"), v))
            parts.append(sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs)))
        return sql.SQL("jsonb_strip_nulls({})").format(sql.SQL(" || ").join(parts))

    def _x_object(self, items: Sequence[tuple[int, sql.Composable]]) -> sql.Composable:
        if not items:
            return sql.SQL("'{}'::jsonb")
        return sql.SQL(" || ").join(sql.SQL("jsonb_build_object({}, {})").format(sql.Literal(str(i)), output_text(e))
                                    for i, e in items)

    def state_sql(self, groups: bool) -> sql.Composed:
        """``INSERT … ON CONFLICT DO UPDATE`` of ``pgderive.agg_groups``: the states of every
        (``groups`` False) or the given groups (``%(groups)s``, ``jsonb[]``) of view
        ``%(view)s``, computed from all their stored contributions with plain aggregates (the
        same counters :meth:`_vector` gives per row, zeros left out)."""
        cond = sql.SQL(" AND grp = ANY(%(groups)s::jsonb[])") if groups else sql.SQL("")
        counters: list[sql.Composable] = [sql.SQL("jsonb_build_object('n', count(*))")]
        scales: list[tuple[int, sql.Composable]] = []
        x: list[tuple[int, sql.Composable]] = []
        for i, m in enumerate(self.measures):
            v, k = self._value(m), partial(_counter, i)
            if m.kind in ("extreme", "recompute"):
                x.append((i, sql.SQL("{}({})").format(sql.SQL(m.func), v)))
                continue
            if m.kind != "additive":
                continue
            pairs = [sql.SQL("{}, nullif(count({}), 0)").format(k("c"), v)]
            if m.func != "count" and _base(m.type) == "numeric":
                finite = sql.SQL("FILTER (WHERE scale({}) IS NOT NULL)").format(v)
                pairs += [sql.SQL("{}, nullif(sum({}) {}, 0)").format(k("s"), v, finite),
                          sql.SQL("{}, nullif(count(*) {}, 0)").format(k("f"), finite)]
                pairs += [sql.SQL("{}, nullif(count(*) FILTER (WHERE {} = {}), 0)").format(k(key), v, sql.Literal(lit))
                          for key, lit in (("n", "NaN"), ("p", "Infinity"), ("m", "-Infinity"))]
                scales.append((i, v))
            elif m.func != "count":
                pairs.append(sql.SQL("{}, nullif(sum({}::numeric), 0)").format(k("s"), v))
            counters.append(sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs)))
        ctes = [sql.SQL("r AS (SELECT grp, vals FROM pgderive.agg_rows WHERE view = %(view)s AND grp IS NOT NULL{})")
                .format(cond),
                sql.SQL("c AS (SELECT grp, jsonb_strip_nulls({}) AS add, {} AS x FROM r GROUP BY grp)").format(
                    sql.SQL(" || ").join(counters), self._x_object(x))]
        add: sql.Composable = sql.SQL("c.add")
        for i, v in scales:  # counts per display scale: a second grouping
            name = sql.Identifier(f"d{i}")
            ctes.append(sql.SQL("{} AS (SELECT grp, jsonb_object_agg({} || sc, k) AS h FROM (SELECT grp, scale({}) AS sc, "
                                "count(*) AS k FROM r WHERE scale({}) IS NOT NULL GROUP BY 1, 2) t GROUP BY grp)")
                        .format(name, sql.Literal(f"{i}.d"), v, v))
            add = sql.SQL("{} || coalesce({}.h, '{{}}')").format(add, name)
        joins = sql.SQL("").join(sql.SQL(" LEFT JOIN {} USING (grp)").format(sql.Identifier(f"d{i}")) for i, _ in scales)
        return sql.SQL(
            "WITH {ctes} INSERT INTO pgderive.agg_groups (view, grp, state) "
            "SELECT %(view)s, c.grp, jsonb_build_object('add', {add}, 'x', c.x) FROM c{joins} "
            "ON CONFLICT (view, grp) DO UPDATE SET state = excluded.state").format(
                ctes=sql.SQL(", ").join(ctes), add=add, joins=joins)

    def merge_sql(self) -> sql.Composed:
        """The deltas ``%(sign)s`` (``int[]``, ±1), ``%(grp)s``, ``%(vals)s`` (``jsonb[]``)
        applied to the stored states of view ``%(view)s``: one row per group, ``(grp text,
        new state text, has rows bool, stale bool)``; a stale group's ``min``/``max`` lost its
        extreme and must be recomputed (:meth:`state_sql`)."""
        add, new, stale = [], [], []
        for i, m in enumerate(self.measures):
            if m.kind != "extreme":
                continue
            typ, v = sql.SQL(m.type or "text"), self._value(m)
            cur = sql.SQL("(g.state->'x'->>{})::{}").format(sql.Literal(str(i)), typ)
            a, r = sql.Identifier(f"a{i}"), sql.Identifier(f"r{i}")
            add.append(sql.SQL("{f}({v}) FILTER (WHERE sign > 0) AS {a}, {f}({v}) FILTER (WHERE sign < 0) AS {r}")
                       .format(f=sql.SQL(m.func), v=v, a=a, r=r))
            new.append((i, sql.SQL("{}({}, x.{})").format(sql.SQL("least" if m.func == "min" else "greatest"), cur, a)))
            # Stale: a removed value reached the extreme and no added value reaches past it
            # (an update of the latest row's max(updated_at) stays incremental).
            stale.append(sql.SQL("(x.{r} IS NOT NULL AND NOT coalesce(x.{r} {op} {cur}, false) "
                                 "AND NOT coalesce(x.{a} {covers} x.{r}, false))").format(
                r=r, a=a, op=sql.SQL(">" if m.func == "min" else "<"), cur=cur,
                covers=sql.SQL("<=" if m.func == "min" else ">=")))
        return sql.SQL(
            "WITH d AS (SELECT * FROM unnest(%(sign)s::int[], %(grp)s::jsonb[], %(vals)s::jsonb[]) AS d(sign, grp, vals)), "
            "g AS (SELECT grp, state FROM pgderive.agg_groups WHERE view = %(view)s AND grp IN (SELECT grp FROM d)), "
            "s AS (SELECT grp, key, sum(v) AS v FROM ("
            "  SELECT d.grp, e.key, d.sign * e.value::numeric AS v FROM d, jsonb_each({vec}) AS e "
            "  UNION ALL SELECT g.grp, e.key, e.value::numeric FROM g, jsonb_each(g.state->'add') AS e) u "
            "  GROUP BY grp, key), "
            "a AS (SELECT grp, jsonb_object_agg(key, v) FILTER (WHERE v <> 0) AS add FROM s GROUP BY grp), "
            "x AS (SELECT grp{add} FROM d GROUP BY grp) "
            "SELECT x.grp::text, jsonb_build_object('add', coalesce(a.add, '{{}}'), 'x', {new})::text, "
            "coalesce(a.add ? 'n', false), {stale} "
            "FROM x LEFT JOIN a USING (grp) LEFT JOIN g USING (grp)").format(
                vec=self._vector(), add=sql.SQL("").join(sql.SQL(", ") + p for p in add),
                new=self._x_object(new), stale=sql.SQL(" OR ").join([*stale, sql.SQL("false")]))

    def result_sql(self, groups: bool) -> sql.Composed:
        """``(grp text, one output text per measure)`` of every (``groups`` False) or the
        given groups (``%(groups)s``) of view ``%(view)s``, from their stored states: the
        values Postgres' own aggregates give over the groups' rows."""
        items: list[sql.Composable] = [sql.SQL("grp::text")]
        for i, m in enumerate(self.measures):
            k, has = partial(_counter, i), partial(_has, i)
            expr: sql.Composable
            if m.kind == "rows":
                expr = sql.SQL("(a->>'n')::bigint")
            elif m.kind in ("extreme", "recompute"):
                expr = sql.SQL("(x->>{})::{}").format(sql.Literal(str(i)), sql.SQL(m.result_type))
            elif m.func == "count":
                expr = sql.SQL("coalesce((a->>{})::bigint, 0)").format(k("c"))
            else:
                total: sql.Composable = sql.SQL("coalesce((a->>{})::numeric, 0)").format(k("s"))
                if _base(m.type) == "numeric":
                    scale = sql.SQL("(SELECT max(substr(d, {})::int) FROM jsonb_object_keys(a) AS d "
                                    "WHERE starts_with(d, {}))").format(sql.Literal(len(f"{i}.d") + 1), k("d"))
                    total = sql.SQL("round({}, {})").format(total, scale)
                    count = sql.SQL("(a->>{})::numeric").format(k("f"))
                else:
                    count = sql.SQL("(a->>{})::numeric").format(k("c"))
                value = total if m.func == "sum" else sql.SQL("{} / {}").format(total, count)
                special: sql.Composable = sql.SQL("")
                if _base(m.type) == "numeric":
                    special = sql.SQL("WHEN {n} OR ({p} AND {m}) THEN 'NaN' WHEN {p} THEN 'Infinity' "
                                      "WHEN {m} THEN '-Infinity' ").format(n=has("n"), p=has("p"), m=has("m"))
                expr = sql.SQL("(CASE WHEN NOT {} THEN NULL {}ELSE {} END)::{}").format(
                    has("c"), special, value, sql.SQL(m.result_type))
            items.append(output_text(expr))
        cond = sql.SQL(" AND grp = ANY(%(groups)s::jsonb[])") if groups else sql.SQL("")
        return sql.SQL("SELECT {} FROM (SELECT grp, state->'add' AS a, state->'x' AS x FROM pgderive.agg_groups "
                       "WHERE view = %(view)s{}) AS g").format(sql.SQL(", ").join(items), cond)

    def direct_query(self, rows: sql.Composable, nodes: Sequence[IncludeNode]) -> sql.Composed:
        """SQL computing every group straight from the source rows ``rows`` (the SELECT of
        :meth:`views.include.IncludeTree.select`) with Postgres' own aggregates, same result
        shape as :meth:`result_sql`: how ``verify`` checks the stored state independently."""
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
            expr: sql.Composable
            if m.path is None:
                expr = sql.SQL("count(*)")
            else:
                expr = sql.SQL("{}(({})::{})").format(sql.SQL(m.func), value(m.path), sql.SQL(m.type or "text"))
            items.append(output_text(expr))
        return sql.SQL("SELECT {} FROM ({}) AS q GROUP BY {}").format(
            sql.SQL(", ").join(items), rows, grp)

    def group_record(self, grp: str, texts: Sequence[str | None]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(group columns → values, document)`` of one result row of :meth:`result_sql`."""
        values = orjson.loads(grp)
        group = {c: (None if v is None else conv(v)) for c, conv, v in zip(self.group_by, self._group_convs, values)}
        doc = dict(group)
        for m, conv, t in zip(self.measures, self._result_convs, texts):
            doc[m.name] = None if t is None else conv(t)
        return group, doc


def row_key(key: KeyTuple) -> str:
    """The stored form of a root identity tuple."""
    return orjson.dumps([to_text(v) for v in key]).decode()


def group_text(grp: str) -> str:
    """One spelling of a group's JSON text (``pgderive.agg_rows.grp``): jsonb prints ``["a", 1]``,
    :meth:`Aggregation.contribution` ``["a",1]``; both become the compact form. What derivation
    workers key a group's lock and record version by (:mod:`pgderive.state.aggregates`).
    Raises :class:`orjson.JSONDecodeError` for a text that is not JSON."""
    return orjson.dumps(orjson.loads(grp)).decode()
