"""Derivations: a source row or Change becomes Ops for one view.

A single-table view projects ``fields`` (output name → column) and names each record by its
``key`` template. Inserts and updates become upserts, deletes become deletes (DESIGN.md rule 1:
every Op carries the commit LSN of its transaction). An update that changes the key deletes the
old sink key and writes the new one. An update missing some projected columns (unchanged TOAST
values omitted by wal2json, rule 6) becomes a *partial* upsert that only sets what it carries.
"""
from __future__ import annotations

from typing import Any

from cdc.changes import Change, Row
from sinks.base import Op, ViewTarget

from .catalog import TableInfo, output_fields, resolve_key
from .spec import ViewSpec
from .template import KeyTemplate, TemplateError

__all__ = ["View", "DerivationError"]


class DerivationError(ValueError):
    """A row this view cannot derive (e.g. its key needs a NULL column).

    Carries ``view``, ``table``, ``row`` and the reason, for logs and dead letters.
    """

    def __init__(self, view: str, table: str, row: Row | None, reason: str) -> None:
        super().__init__(f"view {view}: cannot derive a row of {table}: {reason}")
        self.view, self.table, self.row, self.reason = view, table, row, reason


_FIXED_WIDTH = {"smallint", "integer", "bigint", "real", "double precision", "boolean", "date",
                "time without time zone", "time with time zone", "timestamp without time zone",
                "timestamp with time zone", "uuid", "money", "oid", "interval", "macaddr", "point"}


def _fixed_width(type_name: str) -> bool:
    return type_name.split("(", 1)[0].strip() in _FIXED_WIDTH or type_name.startswith(("timestamp", "time"))


class View:
    """One declared view over one table, bound to its sink.

    Args:
        name: the view's name in the YAML.
        spec: its :class:`~views.spec.ViewSpec`.
        info: the catalog facts of its table (columns, identity).

    Raises ``ValueError`` if the key uses columns outside the table's replica identity (such
    a key could not be computed for deletes, which only carry the identity).
    """

    def __init__(self, name: str, spec: ViewSpec, info: TableInfo) -> None:
        self.name = name
        self.spec = spec
        self.info = info
        self.table = info.qualified
        self.sink = spec.sink
        self.key: KeyTemplate = resolve_key(spec, info)
        self.fields: dict[str, str] = output_fields(spec, info)
        missing = [c for c in self.key.columns if c not in info.identity_columns]
        if missing:
            raise ValueError(
                f"key column(s) {', '.join(missing)} of view {name} are not part of the replica "
                f"identity of {info.qualified} ({', '.join(info.identity_columns) or 'none'}); "
                "deletes could not be routed")
        self.columns: tuple[str, ...] = tuple(dict.fromkeys([*self.key.columns, *self.fields.values()]))
        self.column_types: list[tuple[str, str]] = [(c, info.columns[c]) for c in self.columns]
        self.target = ViewTarget(view=name, format=spec.format, index=spec.index)
        self._items = tuple(self.fields.items())
        self._columns_set = tuple(dict.fromkeys(self.fields.values()))
        # Fixed-width types are never TOASTed, so wal2json always sends them.
        self._fixed_width = frozenset(c for c, t in self.column_types if _fixed_width(t))

    def __repr__(self) -> str:
        return f"View({self.name!r}, table={self.table!r}, sink={self.sink!r})"

    def doc(self, row: Row) -> dict[str, Any]:
        """The full document of ``row``: output field → value."""
        return {out: row.get(col) for out, col in self._items}

    def _key(self, row: Row) -> str:
        try:
            return self.key.render(row)
        except TemplateError as e:
            raise DerivationError(self.name, self.table, row, str(e)) from e

    def row_op(self, row: Row, version: int) -> Op:
        """The upsert of one snapshot row at ``version`` (the consistent point)."""
        return Op(self.name, self._key(row), version, self.doc(row))

    def change_ops(self, change: Change, version: int) -> list[Op]:
        """Ops for one insert/update/delete at ``version`` (the commit LSN).

        Truncates are not handled here (the engine treats them as a barrier).
        Raises :class:`DerivationError`.
        """
        kind = change.kind
        if kind == "delete":
            return [Op(self.name, self._key(change.old_key or {}), version, None)]
        new = change.new or {}
        key = self._key(new)
        ops: list[Op] = []
        if kind == "update" and change.old_key:
            old = self._key({**new, **change.old_key})
            if old != key:
                ops.append(Op(self.name, old, version, None))
        missing = [c for c in self._columns_set if c not in new]
        if not missing:
            ops.append(Op(self.name, key, version, self.doc(new)))
            return ops
        # Only an UPDATE may omit a column, and only a TOASTable one whose value did not change
        # (wal2json omits unchanged TOAST values). Anything else means the column was dropped
        # or renamed under the view: a clear error (dead letter), never a silent partial write.
        hard = [c for c in missing if kind != "update" or c in self._fixed_width]
        if hard:
            raise DerivationError(self.name, self.table, new,
                                  f"column(s) {', '.join(hard)} missing from the {kind}: dropped or "
                                  "renamed since the view was declared?")
        doc = {out: new[col] for out, col in self._items if col in new}
        ops.append(Op(self.name, key, version, doc, partial=True))
        return ops
