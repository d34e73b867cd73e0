"""Lineage: which source columns flow into which sink keys and fields, through which view and how.

Static analysis of the spec and the catalog alone (no sink is contacted, no row read):
:func:`analyze` turns a parsed :class:`~views.spec.Spec` and the catalog facts of its tables
(``schema.name`` → :class:`cdc.catalog.TableInfo`, as :func:`views.check.check_source`
returns them) into a :class:`Lineage`: one :class:`Flow` per (view, source column, use).

A flow's :attr:`Flow.how` says how the column is used:

=============  ==========================================================  =======
how            meaning                                                     copied
=============  ==========================================================  =======
``projection`` ``fields`` (or every column): the value under its own name   yes
``rename``     ``fields: {out: column}``: the value under another name      yes
``key``        a column of the key template (Redis key, OpenSearch ``_id``) yes
``include``    a field of an included table, at any depth                   yes
``group_by``   a group column of an aggregate view (field and key)          yes
``aggregate``  the input of an aggregate (``sum(col)``, ``count(col)``, …)  yes
``derive``     a declared ``derive`` output carrying a declared read        yes
``where``      read by the ``where`` filter only                            no
``join``       an include's ``on`` column: matches rows, not stored         no
``order_by``   orders an include's array, not stored                       no
=============  ==========================================================  =======

A view with an undeclared ``derive`` function (no ``derive_reads``/``outputs``) keeps the
flows into the record the function receives, each marked :attr:`Flow.derive` = ``"undeclared:
reads the whole record"``: what it returns cannot be known. With declarations, record fields
the function does not read are dropped, and every declared output gets one ``derive`` flow per
column of every declared read (the conservative reading: any read may reach any output).

The module is pure: it imports no database driver and never raises for a missing table or
column (such views or entries are skipped; :func:`views.check.check_source` reports them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from cdc.catalog import TableInfo

from .aggregate import AggregateError, parse_measure
from .spec import IncludeSpec, OpenSearchSinkSpec, Spec, ViewSpec
from .template import KeyTemplate

__all__ = ["Flow", "ViewLineage", "Lineage", "analyze", "COPYING", "FILTERING", "UNDECLARED"]

How = Literal["projection", "rename", "key", "include", "group_by", "aggregate", "derive",
              "where", "join", "order_by"]

#: Uses that copy the column's value (or something computed from it) into the sink.
COPYING: frozenset[str] = frozenset({"projection", "rename", "key", "include", "group_by", "aggregate", "derive"})
#: Uses that only read the value (to filter, join or order rows): nothing of it is stored.
FILTERING: frozenset[str] = frozenset({"where", "join", "order_by"})
#: :attr:`Flow.derive` of a flow into an undeclared ``derive`` function.
UNDECLARED = "undeclared: reads the whole record"


@dataclass(frozen=True)
class Flow:
    """One use of one source column by one view.

    Attributes:
        view: the internal view name (``NAME`` or ``NAME@SINK``).
        path: the YAML path that declares the use, e.g. ``views.order_cache.include.customer.fields[0]``
            (``NAME@SINK`` copies report at the declared ``views.NAME``).
        column: the source column, ``schema.table.column``.
        how: see the module docstring; copied when in :data:`COPYING`.
        field: where the value lands: the record field path (``customer.name``, ``items[].product.name``
            for arrays), ``"(key)"`` for the key, ``None`` for filtering uses.
        route: the way there, for people: ``include customer -> field mail``.
        tags: the column's classification tags (empty when unclassified).
        derive: ``None``, :data:`UNDECLARED`, or ``"declared"`` for flows through a declared function.
    """

    view: str
    path: str
    column: str
    how: How
    field: str | None
    route: str
    tags: tuple[str, ...] = ()
    derive: str | None = None

    @property
    def copied(self) -> bool:
        """True when the value (or a value computed from it) is stored in the sink."""
        return self.how in COPYING


@dataclass(frozen=True)
class ViewLineage:
    """One internal view: where it writes and its flows.

    Attributes:
        name: internal view name; ``path``: its YAML path (``views.NAME``).
        table: the root table, ``schema.name``.
        sink, sink_type: the sink's name and type (``redis`` | ``opensearch``).
        target: the Redis key pattern (``order:{id}``) or the OpenSearch alias.
        key: the key template's text (Redis key or OpenSearch ``_id``).
        allow: the sink's ``allow`` tags.
        derive: the ``derive`` function or ``None``; ``derive_reads``/``outputs`` its declarations.
        flows: every :class:`Flow` of the view, in YAML order.
    """

    name: str
    path: str
    table: str
    sink: str
    sink_type: str
    target: str
    key: str
    allow: tuple[str, ...]
    derive: str | None = None
    derive_reads: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    flows: tuple[Flow, ...] = ()


@dataclass(frozen=True)
class Lineage:
    """The whole spec's lineage.

    Attributes:
        views: one :class:`ViewLineage` per internal view whose table is in the catalog.
        classification: ``schema.table.column`` → tags, as declared.
        problems: ``(yaml path, message)`` found on the way that only the analysis sees
            (a ``derive_reads`` entry naming no field of the record).
    """

    views: tuple[ViewLineage, ...]
    classification: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    problems: tuple[tuple[str, str], ...] = ()

    @property
    def flows(self) -> list[Flow]:
        """Every flow of every view."""
        return [f for v in self.views for f in v.flows]


def _fields(fields: list[str] | dict[str, str] | None, info: TableInfo,
            path: str) -> list[tuple[str, str, str, bool]]:
    """``(output, column, yaml path, renamed)`` of a ``fields:`` entry (every column when omitted)."""
    if fields is None:
        return [(c, c, path, False) for c in info.columns]
    if isinstance(fields, list):
        return [(c, c, f"{path}.fields[{i}]", False) for i, c in enumerate(fields)]
    return [(out, c, f"{path}.fields.{out}", out != c) for out, c in fields.items()]


class _Builder:
    def __init__(self, spec: Spec, infos: Mapping[str, TableInfo]) -> None:
        self.spec, self.infos = spec, infos
        self.tags = {c: tuple(t) for c, t in spec.classification.items()}
        self.problems: list[tuple[str, str]] = []

    def flow(self, view: str, path: str, table: str, column: str, how: How, field: str | None,
             route: str) -> Flow:
        qualified = f"{table}.{column}"
        return Flow(view, path, qualified, how, field, route, self.tags.get(qualified, ()))

    def includes(self, view: str, includes: Mapping[str, IncludeSpec], parent: TableInfo, path: str,
                 prefix: str, route: str, record: bool) -> list[Flow]:
        """Flows of ``include`` entries, recursively; ``record``: their fields are stored
        (False under an aggregate view, whose record is its groups and aggregates)."""
        out: list[Flow] = []
        for name, inc in includes.items():
            ipath = f"{path}.include.{name}"
            info = self.infos.get(inc.qualified)
            if info is None:
                continue
            step = f"{route}include {name}{' (many)' if inc.many else ''}"
            where = f"{prefix}{name}{'[]' if inc.many else ''}"
            parent_col, col = inc.link
            if parent_col in parent.columns:
                out.append(self.flow(view, f"{ipath}.on", parent.qualified, parent_col, "join", None,
                                     f"{step}: on {parent_col} = {name}.{col} (matches rows, not stored)"))
            if col in info.columns:
                out.append(self.flow(view, f"{ipath}.on", inc.qualified, col, "join", None,
                                     f"{step}: on {parent_col} = {name}.{col} (matches rows, not stored)"))
            for i, (c, _) in enumerate(inc.ordering):
                if c in info.columns:
                    out.append(self.flow(view, f"{ipath}.order_by[{i}]", inc.qualified, c, "order_by", None,
                                         f"{step}: order_by {c} (orders the array, not stored)"))
            if record:
                for outname, c, fpath, renamed in _fields(inc.fields, info, ipath):
                    if c in info.columns:
                        text = f"{step} -> field {outname}" + (f" (renamed from {c})" if renamed else "")
                        out.append(self.flow(view, fpath, inc.qualified, c, "include", f"{where}.{outname}", text))
            if inc.include:
                out += self.includes(view, inc.include, info, ipath, f"{where}.", f"{step} -> ", record)
        return out

    def view(self, name: str, vs: ViewSpec) -> ViewLineage | None:
        info = self.infos.get(vs.qualified)
        if info is None:
            return None
        declared = name.split("@", 1)[0]
        path = f"views.{declared}"
        sink = self.spec.sinks.get(vs.sink_name)
        opensearch = isinstance(sink, OpenSearchSinkSpec)
        try:
            if vs.key_template is not None:
                key = vs.key_template
            elif vs.group_by is not None:
                key = KeyTemplate.from_columns(vs.group_by)
            else:
                key = KeyTemplate.from_columns(info.primary_key or info.identity_columns or tuple(info.columns))
        except ValueError:  # a brace in a column name: check_source refuses the view
            return None
        target = (vs.index or "") if opensearch else key.text
        key_route = f"document _id \"{key.text}\"" if opensearch else f"key \"{key.text}\""
        key_path = f"{path}.key" if vs.key is not None else path
        flows: list[Flow] = []
        for c in key.columns:
            if c in info.columns:
                flows.append(self.flow(name, key_path, vs.qualified, c, "key", "(key)", key_route))
        record: list[Flow] = []
        if vs.group_by is None:
            for out, c, fpath, renamed in _fields(vs.fields, info, path):
                if c in info.columns:
                    how: How = "rename" if renamed else "projection"
                    text = f"field {out}" + (f" (renamed from {c})" if renamed else "")
                    record.append(self.flow(name, fpath, vs.qualified, c, how, out, text))
            incs = self.includes(name, vs.include or {}, info, path, "", "", True)
            record += [f for f in incs if f.copied]
            flows += [f for f in incs if not f.copied]
        else:
            for i, c in enumerate(vs.group_by):
                if c in info.columns:
                    record.append(self.flow(name, f"{path}.group_by[{i}]", vs.qualified, c, "group_by", c,
                                            f"group_by -> field {c}"))
            flows += self.includes(name, vs.include or {}, info, path, "", "", False)
            record += self.measures(name, vs, info, path)
        if vs.where is not None:
            flows += self.where(name, vs, info, path)
        if vs.derive is not None:
            record = self.derived(name, vs, path, record)
        flows = _ordered(flows + record)
        return ViewLineage(
            name, path, vs.qualified, vs.sink_name, "opensearch" if opensearch else "redis", target, key.text,
            tuple(sink.allow) if sink is not None else (), vs.derive,
            tuple(vs.derive_reads) if vs.derive_reads is not None else None,
            tuple(vs.outputs) if vs.outputs is not None else None, tuple(flows))

    def measures(self, name: str, vs: ViewSpec, info: TableInfo, path: str) -> list[Flow]:
        out: list[Flow] = []
        for mname, text in (vs.aggregate or {}).items():
            try:
                _, arg = parse_measure(text)
            except AggregateError:
                continue
            if arg is None:
                continue  # count(*) reads no column
            head, _, tail = arg.partition(".")
            mpath = f"{path}.aggregate.{mname}"
            if not tail:
                if head in info.columns:
                    out.append(self.flow(name, mpath, vs.qualified, head, "aggregate", mname,
                                         f"aggregate {text} -> field {mname}"))
                continue
            inc = (vs.include or {}).get(head)
            iinfo = self.infos.get(inc.qualified) if inc is not None else None
            if inc is None or iinfo is None:
                continue
            column = (inc.field_map or {c: c for c in iinfo.columns}).get(tail)
            if column in iinfo.columns:
                out.append(self.flow(name, mpath, inc.qualified, column, "aggregate", mname,
                                     f"include {head} -> aggregate {text} -> field {mname}"))
        return out

    def where(self, name: str, vs: ViewSpec, info: TableInfo, path: str) -> list[Flow]:
        from .where import Where, WhereError
        try:
            columns = sorted(Where(vs.where or "", info.columns).columns)
        except WhereError:
            return []
        return [self.flow(name, f"{path}.where", vs.qualified, c, "where", None,
                          "where (filters rows, not stored)") for c in columns]

    def derived(self, name: str, vs: ViewSpec, path: str, record: list[Flow]) -> list[Flow]:
        """The record's flows through the view's ``derive`` function (see the module docstring)."""
        fn = vs.derive
        if vs.derive_reads is None or vs.outputs is None:
            return [Flow(f.view, f.path, f.column, f.how, f.field, f"{f.route} -> derive {fn} ({UNDECLARED})",
                         f.tags, UNDECLARED) for f in record]
        top = {f.field.split(".", 1)[0].removesuffix("[]") for f in record if f.field}
        read: list[Flow] = []
        for i, r in enumerate(vs.derive_reads):
            if r not in top:
                self.problems.append((f"{path}.derive_reads[{i}]",
                                      f"{r!r} is not a field of the record {fn} receives"
                                      f" (fields: {', '.join(sorted(top)) or 'none'})"))
                continue
            read += [f for f in record if f.field and f.field.split(".", 1)[0].removesuffix("[]") == r]
        out: list[Flow] = []
        for j, o in enumerate(vs.outputs):
            for f in read:
                out.append(Flow(f.view, f"{path}.outputs[{j}]", f.column, "derive", o,
                                f"{f.route} -> derive {fn} -> output {o}", f.tags, "declared"))
        return out


_ORDER = {h: i for i, h in enumerate(("key", "projection", "rename", "include", "group_by", "aggregate", "derive",
                                      "where", "join", "order_by"))}


def _ordered(flows: list[Flow]) -> list[Flow]:
    """Flows by kind (key first, filters last), otherwise in YAML order; duplicates dropped."""
    seen: set[Flow] = set()
    out = []
    for f in sorted(flows, key=lambda f: _ORDER[f.how]):
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def analyze(spec: Spec, infos: Mapping[str, TableInfo]) -> Lineage:
    """The lineage of every view of ``spec``.

    Args:
        spec: a parsed spec (views already split into one ``NAME@SINK`` view per sink).
        infos: catalog facts by ``schema.name``: every view's table and every included table
            (missing ones: the view or include is skipped, nothing raised).

    Returns:
        A :class:`Lineage`; its ``problems`` lists ``derive_reads`` entries naming no field.
    """
    b = _Builder(spec, infos)
    views = [lv for n, vs in spec.views.items() if (lv := b.view(n, vs)) is not None]
    return Lineage(tuple(views), dict(b.tags), tuple(dict.fromkeys(b.problems)))
