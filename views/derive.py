"""Derivations: a source row or Change becomes Ops for one view.

A single-table view projects ``fields`` (output name → column) and names each record by its
``key`` template. Inserts and updates become upserts, deletes become deletes (ARCHITECTURE.md, rule 1:
every Op carries the commit LSN of its transaction). An update that changes the key deletes the
old sink key and writes the new one. An update missing some projected columns (unchanged TOAST
values omitted by wal2json, rule 6) becomes a *partial* upsert that only sets what it carries.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import orjson

from cdc.catalog import TableInfo
from cdc.changes import Change, Row
from sinks.base import Op, ViewTarget

from .aggregate import Aggregation, group_text
from .changelog import Publisher
from .include import IncludeNode, IncludeTree, KeyTuple
from .spec import IncludeSpec, ViewSpec
from .template import KeyTemplate, TemplateError

if TYPE_CHECKING:
    from .where import Where

__all__ = ["View", "DerivationError", "view_fingerprint", "load_function", "resolve_key", "output_fields"]


class DerivationError(ValueError):
    """A row this view cannot derive (e.g. its key needs a NULL column).

    Carries ``view``, ``table``, ``row``, the reason and ``key`` (the row's sink key when it
    could be rendered, e.g. a ``derive`` function that raised; ``None`` when the key itself is
    the problem), for logs and dead letters.
    """

    def __init__(self, view: str, table: str, row: Row | None, reason: str, key: str | None = None) -> None:
        super().__init__(f"view {view}: cannot derive a row of {table}: {reason}")
        self.view, self.table, self.row, self.reason, self.key = view, table, row, reason, key


_FIXED_WIDTH = {"smallint", "integer", "bigint", "real", "double precision", "boolean", "date",
                "time without time zone", "time with time zone", "timestamp without time zone",
                "timestamp with time zone", "uuid", "money", "oid", "interval", "macaddr", "point"}


def _fixed_width(type_name: str) -> bool:
    return type_name.split("(", 1)[0].strip() in _FIXED_WIDTH or type_name.startswith(("timestamp", "time"))


def resolve_key(view: ViewSpec, info: TableInfo) -> KeyTemplate:
    """The view's key template: its ``key``, or the primary key columns joined by ``:``.

    Raises:
        ValueError: no ``key`` and the table has no primary key.
    """
    if view.key_template is not None:
        return view.key_template
    if not info.primary_key:
        raise ValueError(f"table {info.qualified} has no primary key: declare a key template"
                         " over columns that identify a row, e.g. key: \"{id}\"")
    return KeyTemplate.from_columns(info.primary_key)


def output_fields(view: ViewSpec, info: TableInfo) -> dict[str, str]:
    """Output name → column: the view's ``fields``, or every column under its own name."""
    mapping = view.field_map
    return dict(mapping) if mapping is not None else {c: c for c in info.columns}


class View:
    """One declared view over one table, bound to its sink.

    Args:
        name: the view's name in the YAML.
        spec: its :class:`~views.spec.ViewSpec`.
        info: the catalog facts of its table (columns, identity).

    Raises ``ValueError`` if the key uses columns outside the table's replica identity (such
    a key could not be computed for deletes, which only carry the identity), if ``where`` does
    not compile (:class:`views.where.WhereError`) or ``derive`` cannot be imported.

    A view with ``include`` is *query-derived* (:attr:`tree` set, see :mod:`views.include`):
    its records are read from the source by SQL; :meth:`change_ops` is not used for it.
    ``infos`` must then hold the catalog facts of every included table.
    """

    def __init__(self, name: str, spec: ViewSpec, info: TableInfo,
                 infos: Mapping[str, TableInfo] | None = None) -> None:
        self.name = name
        self.spec = spec
        self.info = info
        self.table = info.qualified
        self.sink: str = spec.sink_name  # a parsed Spec's view has one sink
        self.aggregation: Aggregation | None = None
        if spec.group_by is not None:
            self.key = spec.key_template or KeyTemplate.from_columns(spec.group_by)
            self.fields: dict[str, str] = {}
            bad = [c for c in self.key.columns if c not in spec.group_by]
            if bad:
                raise ValueError(f"key column(s) {', '.join(bad)} of view {name} are not in its group_by")
        elif spec.topic_name is not None:
            # A change log (views.changelog): keyed by the row identity, every column by default.
            identity = info.primary_key or info.identity_columns
            if not identity:
                raise ValueError(f"table {info.qualified} has no primary key nor replica identity:"
                                 " a change log needs one to key its messages (ALTER TABLE ..."
                                 " REPLICA IDENTITY FULL, or add a primary key)")
            self.key = KeyTemplate.from_columns(identity)
            self.fields = output_fields(spec, info)
        else:
            self.key = resolve_key(spec, info)
            self.fields = output_fields(spec, info)
        missing = [c for c in self.key.columns if c not in info.identity_columns]
        if missing and spec.group_by is None:
            raise ValueError(
                f"key column(s) {', '.join(missing)} of view {name} are not part of the replica "
                f"identity of {info.qualified} ({', '.join(info.identity_columns) or 'none'}); "
                "deletes could not be routed")
        self.where: Where | None = None
        if spec.where is not None:
            from .where import Where
            self.where = Where(spec.where, info.columns)
        self.derive_fn = load_function(spec.derive) if spec.derive else None
        self.publisher: Publisher | None = None
        if spec.topic_name is not None:
            self.publisher = Publisher(name, info.qualified, output_fields(spec, info), self.key.columns)
        self.needs_full_row = self.where is not None or self.derive_fn is not None
        where_cols = sorted(self.where.columns) if self.where is not None else []
        self.columns: tuple[str, ...] = tuple(dict.fromkeys([*self.key.columns, *self.fields.values(), *where_cols]))
        self.tree: IncludeTree | None = None
        if spec.include or spec.group_by is not None:
            nodes = [_node(n, i, infos or {}, None) for n, i in (spec.include or {}).items()]
            if spec.group_by is not None:
                self.aggregation = Aggregation(spec.group_by, spec.aggregate or {}, info, nodes)
                self.columns = tuple(dict.fromkeys([*self.columns, *self.aggregation.root_columns]))
            self.tree = IncludeTree(info, [(c, info.columns[c]) for c in self.columns], nodes,
                                    self.where.sql() if self.where is not None else None)
        self.tables: frozenset[str] = frozenset(self.tree.tables if self.tree else {self.table})
        self.column_types: list[tuple[str, str]] = [(c, info.columns[c]) for c in self.columns]
        self.target = ViewTarget(view=name, format=spec.format, index=spec.index, key_shape=self.key.shape(),
                                 topic=spec.topic_name, table=info.qualified if spec.topic_name else None)
        self._items = tuple(self.fields.items())
        self._field_columns = tuple(dict.fromkeys(self.fields.values()))
        self._columns_set = frozenset(self._field_columns)
        # Fixed-width types are never TOASTed, so wal2json always sends them.
        self._fixed_width = frozenset(c for c, t in self.column_types if _fixed_width(t))
        self.identity_columns: tuple[str, ...] = tuple(info.primary_key or info.identity_columns)
        links = [i.link[0] for i in (spec.include or {}).values()]
        self.stored_columns: frozenset[str] = frozenset(
            [*self.identity_columns, *self.columns, *links, *(n.name for n in (self.tree.nodes if self.tree else ()))])

    def dead_letter_row(self, row: Row | None) -> dict[str, Any] | None:
        """What a dead letter of this view keeps of ``row``: only what the view reads, i.e.
        :attr:`stored_columns` = the row's identity (primary key, else replica identity
        columns: what ``dead-letters retry`` looks the row up by), the key, ``fields``,
        ``where``, ``group_by``/``aggregate`` columns, the root columns of ``include`` links,
        and the included values of a query-derived record. ``None`` stays ``None``."""
        if row is None:
            return None
        keep = self.stored_columns
        return {c: v for c, v in row.items() if c in keep}

    def row_identity(self, row: Row | None) -> dict[str, Any] | None:
        """``row``'s identity (:attr:`identity_columns` → value), or ``None`` when the row
        lacks one of them or the table has no identity."""
        if not row or not self.identity_columns:
            return None
        try:
            return {c: row[c] for c in self.identity_columns}
        except KeyError:
            return None

    def __repr__(self) -> str:
        return f"View({self.name!r}, table={self.table!r}, sink={self.sink!r})"

    def doc(self, row: Row) -> dict[str, Any]:
        """The full document of ``row``: output field → value (plus included values)."""
        doc = {out: row.get(col) for out, col in self._items}
        if self.tree is not None:
            for n in self.tree.nodes:
                doc[n.name] = row.get(n.name)
        return doc

    def _matches(self, where: Where, row: Row, key: str | None = None) -> bool:
        """``where`` on a streamed row; an evaluation error (e.g. division by zero, which
        Postgres raises too) makes the row a dead letter (under its sink ``key``)."""
        from .where import WhereError
        try:
            return where.matches(row)
        except WhereError as e:
            raise DerivationError(self.name, self.table, row, f"where: {e}", key) from e

    def _final(self, row: Row, doc: dict[str, Any], key: str | None = None) -> dict[str, Any] | None:
        """``doc`` after the view's ``derive`` function (None: not in the view); a failure is a
        :class:`DerivationError` carrying the row's sink ``key``. With ``derive_reads`` and
        ``outputs`` declared (:mod:`views.policy`), the function receives only the declared
        reads, and a result holding a field not in ``outputs`` is a :class:`DerivationError`."""
        if self.derive_fn is None:
            return doc
        reads, outputs = self.spec.derive_reads, self.spec.outputs
        if reads is not None:
            doc = {k: doc[k] for k in reads if k in doc}
        try:
            out = self.derive_fn(doc)
        except Exception as e:  # a user function: any failure is this row's dead letter
            raise DerivationError(self.name, self.table, row,
                                  f"derive {self.spec.derive} raised {type(e).__name__}: {e}", key) from e
        if out is not None and not isinstance(out, dict):
            raise DerivationError(self.name, self.table, row,
                                  f"derive {self.spec.derive} returned {type(out).__name__}, not dict or None", key)
        if out is not None and outputs is not None:
            extra = [k for k in out if k not in outputs]
            if extra:
                raise DerivationError(self.name, self.table, row,
                                      f"derive {self.spec.derive} returned undeclared field(s) {', '.join(map(str, extra))}"
                                      f" (outputs: {', '.join(outputs)})", key)
        return out

    def _key(self, row: Row) -> str:
        try:
            return self.key.render(row)
        except TemplateError as e:
            raise DerivationError(self.name, self.table, row, str(e)) from e

    def row_op(self, row: Row, version: int) -> Op | None:
        """The upsert of one snapshot row at ``version`` (the consistent point); ``None`` when
        ``derive`` leaves it out. (``where`` is applied by the snapshot query.)"""
        if self.publisher is not None:
            return self.publisher.row_op(row, version)
        key = self._key(row)
        doc = self._final(row, self.doc(row), key)
        return None if doc is None else Op(self.name, key, version, doc)

    def group_ops(self, rows: Sequence[Sequence[Any]], touched: list[str],
                  version: int, versions: Mapping[str, int] | None = None
                  ) -> tuple[list[Op], list["DerivationError"]]:
        """Ops of an aggregate view from :meth:`pgderive.state.aggregates.AggregateStore.apply`'s result:
        an upsert per group with rows, a delete per touched group without, at ``version``;
        ``versions`` (a derivation worker's, by :func:`views.aggregate.group_text`): each
        group's own version instead, ``version`` for a group not in it."""
        agg = self.aggregation
        assert agg is not None
        ops: list[Op] = []
        errors: list[DerivationError] = []
        seen: set[tuple[Any, ...]] = set()  # compared parsed: jsonb and orjson print arrays differently

        def at(grp: str) -> int:
            return version if versions is None else versions.get(group_text(grp), version)

        for grp, *texts in rows:
            seen.add(tuple(orjson.loads(grp)))
            group, doc = agg.group_record(grp, texts)
            try:
                key = self._key(group)
                ops.append(Op(self.name, key, at(grp), self._final(group, doc, key)))
            except DerivationError as e:
                errors.append(e)
        for grp in touched:
            if tuple(orjson.loads(grp)) not in seen:
                group, _ = agg.group_record(grp, [])
                try:
                    ops.append(Op(self.name, self._key(group), at(grp), None))
                except DerivationError as e:
                    errors.append(e)
        return ops, errors

    def key_ops(self, keys: list[KeyTuple], rows: list[Row], version: int) -> tuple[list[Op], list["DerivationError"]]:
        """Ops of a query-derived view for the roots ``keys``, given the ``rows`` the record
        query returned for them: an upsert per row, a delete per key without a row (gone or no
        longer matching ``where``), all at ``version``."""
        assert self.tree is not None
        ops: list[Op] = []
        errors: list[DerivationError] = []
        found: set[KeyTuple | None] = set()
        for row in rows:
            k = self.tree.root_key(row)
            found.add(k)
            try:
                op = self.row_op(row, version)
                ops.append(op if op is not None else Op(self.name, self._key(row), version, None))
            except DerivationError as e:
                errors.append(e)
        for k in keys:
            if k not in found:
                ident = dict(zip(self.tree.identity, k))
                try:
                    ops.append(Op(self.name, self._key(ident), version, None))
                except DerivationError as e:
                    errors.append(e)
        return ops, errors

    def _keyless(self, row: Row) -> bool:
        """True when ``row`` carries every key column and one of them is NULL: such a row has
        no sink key, so it never had a record (it was a dead letter). A key column *missing*
        from the row (dropped, renamed) is not keyless: rendering the key reports it."""
        cols = self.key.columns
        return all(c in row for c in cols) and any(row[c] is None for c in cols)

    def _key_moved(self, new: Row, old_key: Row) -> bool:
        """True when an update's old identity differs from the new row in a key column (the
        record moves to another key: the old one must go)."""
        for c in self.key.columns:
            if c in old_key and old_key[c] != new.get(c):
                return True
        return False

    def change_ops(self, change: Change, version: int) -> list[Op]:
        """Ops for one insert/update/delete at ``version`` (the commit LSN).

        Truncates are not handled here (the engine treats them as a barrier).
        Raises :class:`DerivationError`.
        """
        kind = change.kind
        if kind == "delete":
            gone = change.old_key or {}
            if self._keyless(gone):
                return []  # never had a record (see _keyless); its dead letters are superseded
            return [Op(self.name, self._key(gone), version, None)]
        new = change.new or {}
        key = self._key(new)
        ops: list[Op] = []
        old_key = change.old_key
        if kind == "update" and old_key and self._key_moved(new, old_key):
            before = {**new, **old_key}
            # The old row had no key (a NULL key column): it never had a record, it was a dead
            # letter, which this change supersedes. Nothing to delete.
            old = None if self._keyless(before) else self._key(before)
            if old is not None and old != key:
                ops.append(Op(self.name, old, version, None))
        if self.needs_full_row:
            missing = [c for c in self.columns if c not in new]
            if missing:
                raise DerivationError(self.name, self.table, new,
                                      f"column(s) {', '.join(missing)} missing from the {kind} and "
                                      "not readable from the table (dropped or renamed?)", key)
            if self.where is not None and not self._matches(self.where, new, key):
                # Not (or no longer) in the view. An insert never was: nothing to remove.
                if kind == "update":
                    ops.append(Op(self.name, key, version, None))
                return ops
            doc = self._final(new, self.doc(new), key)
            ops.append(Op(self.name, key, version, doc))
            return ops
        if new.keys() >= self._columns_set:
            ops.append(Op(self.name, key, version, self.doc(new)))
            return ops
        missing = [c for c in self._field_columns if c not in new]
        # Only an UPDATE may omit a column, and only a TOASTable one whose value did not change
        # (wal2json omits unchanged TOAST values). Anything else means the column was dropped
        # or renamed under the view: a clear error (dead letter), never a silent partial write.
        hard = [c for c in missing if kind != "update" or c in self._fixed_width]
        if hard:
            raise DerivationError(self.name, self.table, new,
                                  f"column(s) {', '.join(hard)} missing from the {kind}: dropped or "
                                  "renamed since the view was declared?", key)
        doc = {out: new[col] for out, col in self._items if col in new}
        ops.append(Op(self.name, key, version, doc, partial=True))
        return ops


def load_function(ref: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """Import ``package.module:function``; the working directory is on the import path (as
    with ``python -m``, uvicorn or gunicorn).

    Raises:
        ValueError: one line saying what failed: the module is missing, has a syntax error
            (file and line), raised while being imported (the exception's type and message), or
            lacks the function.
    """
    module, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module}: {e}") from e
    except SyntaxError as e:
        where = f"{e.filename}, line {e.lineno}" if e.filename else module
        raise ValueError(f"cannot import {module}: {type(e).__name__} in {where}: {e.msg}") from e
    except Exception as e:  # the module's own code raised: its problem, reported in one line
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot import {module}: it raised {type(e).__name__}"
                         + (f": {detail}" if detail else "")) from e
    try:
        fn: Callable[[dict[str, Any]], dict[str, Any] | None] = getattr(mod, attr)
    except AttributeError:
        raise ValueError(f"module {module} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"{ref} is not callable")
    return fn


def _node(name: str, spec: IncludeSpec, infos: Mapping[str, TableInfo], parent: IncludeNode | None) -> IncludeNode:
    info = infos[spec.qualified]
    parent_col, col = spec.link
    fields = spec.field_map or {c: c for c in info.columns}
    order_cols = {c for c, _ in spec.ordering}
    tiebreak = [(c, False) for c in (info.primary_key or info.identity_columns) if c not in order_cols]
    node = IncludeNode(name, spec.qualified, info, parent_col, col, fields, spec.many,
                       spec.ordering + tiebreak, spec.limit, parent=parent)
    node.children = [_node(n, s, infos, node) for n, s in (spec.include or {}).items()]
    return node


def view_fingerprint(view: View) -> str:
    """A short hash of what a view derives; a change means its sink data must be rebuilt."""
    raw = orjson.dumps({"table": view.table, "key": view.key.text, "fields": view.fields,
                        "sink": view.sink, "target": [view.target.format, view.target.index],
                        **({"where": view.spec.where} if view.spec.where else {}),
                        **({"derive": view.spec.derive} if view.spec.derive else {}),
                        **({"derive_io": [view.spec.derive_reads, view.spec.outputs]}
                           if view.spec.derive_reads is not None else {}),
                        **({"include": view.spec.model_dump(include={"include"})} if view.spec.include else {}),
                        # "state" 2: group states in pgderive.agg_groups (a view stored before them rebuilds)
                        **({"group": [view.spec.group_by, view.spec.aggregate], "state": 2}
                           if view.spec.group_by else {})},
                       option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()[:16]
