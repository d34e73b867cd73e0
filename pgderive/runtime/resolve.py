"""Query-derived views (``include``, ``group_by``): which records a batch touched, and reading
them back from the source before the batch is handed to the lanes.

A change to any table of such a view marks the records it affects (root identities, or link
values of an included table, resolved to roots by SQL); before the lanes get the batch, the
marked records are read in one query per 1,000 roots under a snapshot that sees the batch's
transactions (:meth:`cdc.refetch.RowRefetcher.wait_visible`), derived, and their Ops carry the
batch's version. Aggregate views move their group states in ``pgderive.agg_*`` first
(:mod:`pgderive.state.aggregates`). See :mod:`views.include` for why a re-read record can show a
state newer than its version, and why that converges.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import psycopg

from cdc.changes import Change
from cdc.refetch import RowRefetcher
from sinks.base import Op
from views.derive import DerivationError, View
from views.include import IncludeNode, IncludeTree, KeyTuple

from ..state.aggregates import AggregateStore

__all__ = ["IncludeResolver"]

#: ``emit(view, ops, errors, version)``: re-derived Ops and the rows that failed to derive.
Emit = Callable[[View, Sequence[Op], Sequence[DerivationError], int], None]


class IncludeResolver:
    """What the changes read so far touched in query-derived views, until :meth:`resolve`.

    Args:
        views: the daemon's views (only those with a ``tree`` are handled here).
        refetcher: reads the source under a snapshot that sees given transactions.
        aggregates: the aggregate state store.
        worker: a derivation worker's (ARCHITECTURE.md, "Kafka workers"): aggregate views move
            their groups with :meth:`AggregateStore.apply_worker`, under per-group locks, and
            each group's Ops carry the group's own version from it.
    """

    def __init__(self, views: Sequence[View], refetcher: RowRefetcher, aggregates: AggregateStore,
                 worker: bool = False) -> None:
        self.worker = worker
        self.by_name = {v.name: v for v in views}
        self.refetcher = refetcher
        self.aggregates = aggregates
        self.affected: dict[str, set[KeyTuple]] = {}  # view → root identity tuples
        self.links: dict[str, dict[int, tuple[IncludeNode, set[Any]]]] = {}  # view → id(node) → link values
        self.rederive_all: set[str] = set()  # views whose every record must be read again
        self.version: dict[str, int] = {}  # view → version for those records
        self.xids: set[int] = set()  # transactions whose effects those reads must see
        #: aggregate view → (state an online rebuild builds, that state only): its contributions
        #: also go there; with ``only`` nowhere else and no Ops (ARCHITECTURE.md, "Online rebuild").
        self.shadows: dict[str, tuple[str, bool]] = {}

    @property
    def pending(self) -> bool:
        """True when some records are waiting to be read back."""
        return bool(self.affected or self.links or self.rederive_all)

    def note(self, view: View, change: Change, version: int, xid: int) -> None:
        """Record which records of ``view`` the change (committed at ``version``) touches."""
        tree = view.tree
        assert tree is not None
        self.xids.add(xid)
        new, old = change.new or {}, change.old_key or {}
        self.version[view.name] = max(version, self.version.get(view.name, 0))
        if change.table == view.table:
            keys = self.affected.setdefault(view.name, set())
            for row in (new, {**new, **old} if old else None):
                if row:
                    k = tree.root_key(row)
                    if k is not None:
                        keys.add(k)
        for node in tree.all_nodes():
            if node.table == change.table:
                values = self.links.setdefault(view.name, {}).setdefault(id(node), (node, set()))[1]
                for row in (new, old):
                    if node.col in row and row[node.col] is not None:
                        values.add(row[node.col])

    def note_emptied(self, view: View, version: int, xid: int) -> None:
        """An included table of ``view`` was truncated at ``version``: every record changes."""
        self.rederive_all.add(view.name)
        self.version[view.name] = max(version, self.version.get(view.name, 0))
        self.xids.add(xid)

    def resolve(self, emit: Emit) -> None:
        """Read the touched records back, derive them and ``emit`` their Ops; forget them."""
        if not self.pending:
            return
        self.refetcher.wait_visible(self.xids)  # records are read after their changes
        conn = self.refetcher.connection()
        for name in set(self.affected) | set(self.links) | self.rederive_all:
            view, version = self.by_name[name], self.version[name]
            tree = view.tree
            assert tree is not None
            found: set[KeyTuple] = set(self.affected.get(name, ()))
            for node, values in self.links.get(name, {}).values():
                found |= tree.affected_roots(conn, node, values)
            keys = sorted(found, key=repr)
            # The touched roots (deletes included), then, after a TRUNCATE of an included
            # table, every root (upserts only: no root disappeared by it).
            parts: list[list[KeyTuple] | None] = [keys[i:i + 1000] for i in range(0, len(keys), 1000)]
            if name in self.rederive_all:
                parts.append(None)
            shadow = self.shadows.get(name)
            for part_keys, rows in _read_roots(tree, conn, parts):
                if view.aggregation is not None:
                    items: list[tuple[KeyTuple, int, dict[str, Any] | None]] = [
                        (tree.row_identity(r), version, r) for r in rows]
                    present = {k for k, _, _ in items}
                    items += [(k, version, None) for k in part_keys if k not in present]
                    if shadow is not None:
                        self.aggregates.apply(shadow[0], view.aggregation, items, lock=True)
                        if shadow[1]:
                            continue
                    if self.worker:
                        moved = self.aggregates.apply_worker(view.name, view.aggregation, items)
                        emit(view, *view.group_ops(moved.rows, moved.touched, version, moved.versions), version)
                        continue
                    result, touched = self.aggregates.apply(view.name, view.aggregation, items)
                    emit(view, *view.group_ops(result, touched, version), version)
                else:
                    emit(view, *view.key_ops(part_keys, rows, version), version)
        self.xids.clear()
        self.affected.clear()
        self.links.clear()
        self.rederive_all.clear()


def _read_roots(tree: IncludeTree, conn: psycopg.Connection,
                parts: list[list[KeyTuple] | None]) -> Iterable[tuple[list[KeyTuple], list[dict[str, Any]]]]:
    """``(keys, rows)`` per part: for a list of at most 1,000 root identities, all their rows
    at once (``keys`` without a row are gone or no longer match ``where``); for ``None``,
    every root in chunks with no keys (nothing to delete)."""
    for part in parts:
        if part is None:
            for rows in tree.rows(conn):
                yield [], rows
        else:
            yield part, [r for chunk in tree.rows(conn, part) for r in chunk]
