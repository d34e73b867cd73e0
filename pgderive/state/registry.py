"""The view registry: every view pgderive maintains or maintained per slot, with its layout.

A view's layout in its sink (the Redis key template's shape and record format, the OpenSearch
alias; :class:`sinks.base.ViewTarget`) is known from the YAML only while the view is declared
there. When a view is removed from the YAML the daemon stops maintaining it but keeps its data
in the sink ("retired") until an operator runs ``pgderive drop VIEW``
(:func:`pgderive.ops.drop.drop_view`), which needs that layout to find the records, the version
hash, the generation indices and the checkpoint. So pgderive remembers it in its own state, next
to the slot it belongs to (ARCHITECTURE.md, "State").

Table ``pgderive.views``: one row per ``(slot, view)`` (PK) — ``sink`` (text: the sink's name in
the YAML), ``target`` (jsonb: the :class:`~sinks.base.ViewTarget` fields ``view``, ``format``,
``index``, ``key_shape``, null when unset), ``fingerprint`` (text:
:func:`views.derive.view_fingerprint` when last recorded), ``status`` (``active`` | ``retired``,
a CHECK constraint), ``updated_at`` (timestamptz). Its DDL is migration
``0007_view_registry.sql``, applied by :func:`pgderive.state.schema.migrate`. The schema is never
in wal2json's ``add-tables``, so these writes never reach the stream.

Lifecycle: :meth:`ViewRegistry.record` (the daemon, for the views it maintains: upserted as
``active``) → :meth:`ViewRegistry.retire` (removed from the YAML: ``retired``, data kept) →
:meth:`ViewRegistry.forget` (``pgderive drop`` removed the data: the row goes last, so an
interrupted drop can be run again). A retired view declared again is simply recorded as active.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, cast

import orjson
import psycopg

from sinks.base import ViewTarget
from views.derive import View

from .schema import migrate

__all__ = ["ACTIVE", "RETIRED", "STATUSES", "ViewEntry", "ViewRegistry", "entry_of", "target_from_json",
           "target_json"]

ACTIVE = "active"
RETIRED = "retired"
#: Every value of ``pgderive.views.status`` (its CHECK constraint).
STATUSES = (ACTIVE, RETIRED)

_COLUMNS = "view, sink, target, fingerprint, status"


@dataclass(slots=True, frozen=True)
class ViewEntry:
    """One row of ``pgderive.views`` (without its slot).

    Attributes:
        view: the view's (internal) name, e.g. ``account_cache`` or ``card@search`` for one copy
            of a view kept in several sinks.
        sink: the name of its sink in the YAML (``sinks.NAME``).
        target: its layout in that sink (:attr:`views.derive.View.target`).
        fingerprint: :func:`views.derive.view_fingerprint` of the view when it was recorded.
        status: ``"active"`` (the daemon maintains it) or ``"retired"`` (removed from the YAML,
            data kept in the sink until ``pgderive drop``).
    """

    view: str
    sink: str
    target: ViewTarget
    fingerprint: str
    status: str = ACTIVE


def entry_of(view: View, fingerprint: str) -> ViewEntry:
    """The active registry entry of a bound ``view`` (its name, :attr:`~views.derive.View.sink`
    and :attr:`~views.derive.View.target`) with ``fingerprint``
    (:func:`views.derive.view_fingerprint` of it)."""
    return ViewEntry(view=view.name, sink=view.sink, target=view.target, fingerprint=fingerprint, status=ACTIVE)


def target_json(target: ViewTarget) -> dict[str, str | None]:
    """``target`` as the JSON object stored in ``pgderive.views.target``: every field, None
    when unset."""
    return {"view": target.view, "format": target.format, "index": target.index, "key_shape": target.key_shape,
            "topic": target.topic, "table": target.table}


def target_from_json(obj: Mapping[str, Any]) -> ViewTarget:
    """The :class:`~sinks.base.ViewTarget` stored as ``obj`` (:func:`target_json`); unknown keys
    are ignored (a newer pgderive may store more). Raises ``ValueError`` when ``view`` is
    missing or a field has the wrong type, or ``format`` is neither ``hash``, ``json`` nor null."""
    view = obj.get("view")
    if not isinstance(view, str) or not view:
        raise ValueError(f"stored view target {dict(obj)!r} has no view name")
    fmt = obj.get("format")
    if fmt not in (None, "hash", "json"):
        raise ValueError(f"stored view target of {view}: format {fmt!r} is not hash, json or null")
    for name in ("index", "key_shape", "topic", "table"):
        if obj.get(name) is not None and not isinstance(obj.get(name), str):
            raise ValueError(f"stored view target of {view}: {name} {obj.get(name)!r} is not text")
    return ViewTarget(view=view, format=cast(Literal["hash", "json"] | None, fmt),
                      index=obj.get("index"), key_shape=obj.get("key_shape"), topic=obj.get("topic"),
                      table=obj.get("table"))


class ViewRegistry:
    """Reads and writes ``pgderive.views`` in the source database at ``dsn`` (see the module
    docstring); every call opens its own autocommit connection, like
    :class:`~pgderive.state.slots.StateStore`.

    Reads (:meth:`get`, :meth:`entries`) of a database without the table return nothing and
    create nothing (``pgderive status`` on a database pgderive never ran against); so do
    :meth:`retire` and :meth:`forget`, which only change existing rows. :meth:`record` first
    brings schema ``pgderive`` to the current version (:func:`~pgderive.state.schema.migrate`:
    only a read of ``pgderive.schema_version`` when it is current). Every method raises
    :class:`psycopg.Error` when the database cannot be reached or refuses, and
    :class:`~pgderive.state.schema.SchemaVersionError` (:meth:`record`) when it is newer than
    this code.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-registry")

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('pgderive.views') IS NOT NULL").fetchone()
        return row is not None and bool(row[0])

    @staticmethod
    def _entry(row: Sequence[Any]) -> ViewEntry:
        return ViewEntry(view=row[0], sink=row[1], target=target_from_json(row[2]), fingerprint=row[3],
                         status=row[4])

    # writes -------------------------------------------------------------------------------
    def record(self, slot: str, entries: Sequence[ViewEntry]) -> None:
        """Upsert ``entries`` for ``slot`` as ``active`` (whatever their ``status``), in one
        statement: sink, target and fingerprint are replaced, a retired view becomes active
        again. Nothing for an empty list; of two entries of one view the last wins. Raises
        ``ValueError`` when an entry's target names another view than the entry."""
        if not entries:
            return
        by_view: dict[str, ViewEntry] = {}
        for e in entries:
            if e.target.view != e.view:
                raise ValueError(f"registry entry {e.view}: its target is view {e.target.view}")
            by_view[e.view] = e
        rows = list(by_view.values())
        params = (slot, [e.view for e in rows], [e.sink for e in rows],
                  [orjson.dumps(target_json(e.target)).decode() for e in rows], [e.fingerprint for e in rows])
        with self._connect() as conn:
            migrate(conn)
            conn.execute(
                """INSERT INTO pgderive.views (slot, view, sink, target, fingerprint, status)
                   SELECT %s, v, s, t, f, 'active'
                     FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::text[]) AS u(v, s, t, f)
                   ON CONFLICT (slot, view) DO UPDATE SET sink = EXCLUDED.sink, target = EXCLUDED.target,
                       fingerprint = EXCLUDED.fingerprint, status = 'active', updated_at = now()""",
                params)

    def retire(self, slot: str, names: Sequence[str]) -> list[str]:
        """Mark the active views ``names`` of ``slot`` retired (the daemon no longer maintains
        them; their data stays in the sink). Returns the views that changed, sorted: names
        already retired or never recorded are left alone."""
        if not names:
            return []
        with self._connect() as conn:
            if not self._exists(conn):
                return []
            rows = conn.execute(
                """UPDATE pgderive.views SET status = 'retired', updated_at = now()
                    WHERE slot = %s AND view = ANY(%s) AND status = 'active' RETURNING view""",
                (slot, list(names))).fetchall()
        return sorted(r[0] for r in rows)

    def forget(self, slot: str, view: str) -> None:
        """Delete the row of ``view`` of ``slot`` (nothing if there is none): the last step of
        ``pgderive drop``."""
        with self._connect() as conn:
            if self._exists(conn):
                conn.execute("DELETE FROM pgderive.views WHERE slot = %s AND view = %s", (slot, view))

    # reads --------------------------------------------------------------------------------
    def get(self, slot: str, view: str) -> ViewEntry | None:
        """The entry of ``view`` of ``slot``, or None when pgderive has no record of it. Raises
        ``ValueError`` when the stored target is malformed (:func:`target_from_json`)."""
        with self._connect() as conn:
            if not self._exists(conn):
                return None
            row = conn.execute(f"SELECT {_COLUMNS} FROM pgderive.views WHERE slot = %s AND view = %s",
                               (slot, view)).fetchone()
        return None if row is None else self._entry(row)

    def entries(self, slot: str, status: str | None = None) -> list[ViewEntry]:
        """Every entry of ``slot`` (only those with ``status``, ``"active"`` or ``"retired"``, if
        given), by view name. Raises ``ValueError`` for another ``status`` or a malformed
        stored target."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        with self._connect() as conn:
            if not self._exists(conn):
                return []
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM pgderive.views WHERE slot = %s AND (%s::text IS NULL OR status = %s)"
                " ORDER BY view", (slot, status, status)).fetchall()
        return [self._entry(r) for r in rows]
