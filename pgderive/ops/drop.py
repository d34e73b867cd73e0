"""``pgderive drop VIEW``: remove a retired view's data from its sink and pgderive's state.

A view removed from the YAML is *retired*: the daemon stops maintaining it but keeps its data in
the sink, so removing a line from a config never deletes anything by itself. Dropping it is an
explicit operator step. Its layout (Redis key shape and format, OpenSearch alias) is no longer in
the config, so it is read from the view registry, ``pgderive.views``
(:mod:`pgderive.state.registry`; ARCHITECTURE.md, "State").

What a drop removes, in this order (each step idempotent, so a drop interrupted at any point is
simply run again; the registry row goes last, so the view stays droppable until everything else
is gone):

1. the sink's data, through :meth:`sinks.base.Sink.drop_view` with the stored target registered:
   Redis: every record key listed in the view's version hash, the version hash, the checkpoint
   and the deployment's claim of the key shape (record keys pgderive never versioned are
   foreign and stay); OpenSearch: the indices behind the alias, every generation index
   ``ALIAS-g<16 hex digits>`` and the checkpoint document (ARCHITECTURE.md, "State",
   "Deployments");
2. the view's dead letters of the slot (``pgderive.dead_letters``, superseded ones too);
3. its aggregate contributions and group states (``pgderive.agg_*``; none for other views),
   unless another slot's record names a view of the same name (those tables are keyed by view
   name only): then they are left alone and the report says so;
4. the view's fingerprint in ``pgderive.slot_state.views``;
5. its row in ``pgderive.views``.

A view kept in several sinks (``sink: [a, b]``) is the views ``NAME@a`` and ``NAME@b``;
:func:`plan_drop` resolves ``NAME`` to every retired copy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sinks.base import ViewTarget
from views.spec import Spec

from ..runtime.errors import EngineError
from ..runtime.sinks import SinkOpener, deployment_of
from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetterStore
from ..state.registry import ACTIVE, RETIRED, ViewEntry, ViewRegistry
from ..state.slots import StateStore

__all__ = ["DropReport", "check_droppable", "describe", "drop_view", "plan_drop", "resolve_entries"]

log = logging.getLogger("pgderive.drop")


@dataclass(frozen=True, slots=True)
class DropReport:
    """What :func:`drop_view` removed.

    Attributes:
        view: the view's (internal) name.
        sink: the name of the sink it was kept in.
        target: its layout there (from the registry).
        records: the live records the sink held just before the drop (its
            :meth:`~sinks.base.Sink.count`: Redis version entries that are not tombstones,
            OpenSearch documents behind the alias); 0 when a previous, interrupted drop
            already removed them.
        dead_letters: dead letters of the view (open and superseded) discarded.
        aggregate_groups: aggregate group states removed (0 for a view that is not an
            aggregate view).
        aggregate_shared: the other slots whose ``pgderive.slot_state`` names a view of the same
            name; when not empty the aggregate state was left alone (it may be theirs).
    """

    view: str
    sink: str
    target: ViewTarget
    records: int
    dead_letters: int
    aggregate_groups: int
    aggregate_shared: tuple[str, ...] = ()


def describe(entry: ViewEntry) -> str:
    """``entry``'s layout for a person: ``sink cache, Redis keys 'account:{}' (hash)`` or
    ``sink search, OpenSearch alias 'branches'``."""
    t = entry.target
    if t.index is not None:
        return f"sink {entry.sink}, OpenSearch alias {t.index!r}"
    shape = f"keys {t.key_shape!r}" if t.key_shape else "keys of unknown shape"
    return f"sink {entry.sink}, Redis {shape} ({t.format or 'hash'})"


def resolve_entries(entries: list[ViewEntry], name: str) -> list[ViewEntry]:
    """The registry ``entries`` that ``name`` means: the entry named ``name``, else every copy
    ``name@SINK`` of a view kept in several sinks; ``[]`` when none."""
    exact = [e for e in entries if e.view == name]
    return exact or [e for e in entries if e.view.startswith(f"{name}@")]


def check_droppable(spec: Spec, name: str, entry: ViewEntry | None, retired: list[str]) -> ViewEntry:
    """The registry ``entry`` of ``name`` if the view may be dropped, else an
    :class:`~pgderive.runtime.errors.EngineError` with a one-line reason:

    * ``name`` is still declared in ``spec`` (itself, or as a view kept in several sinks);
    * pgderive has no record of it (``entry`` is None; the message lists ``retired``, the
      slot's retired views);
    * it is active: the daemon still maintains it (it has not reloaded a config without it);
    * its sink is no longer in ``spec.sinks``, or is now of another type than the stored
      layout (Redis keys vs. OpenSearch alias);
    * a view of the config writes the same records in the same sink (the same OpenSearch
      alias, the same Redis key shape): dropping would delete that view's data.
    """
    slot = spec.source.slot
    if name in spec.views or spec.resolve(name):
        raise EngineError(f"view {name} is still in the config: remove it from the YAML and reload the daemon "
                          "first")
    if entry is None:
        known = f"retired views of slot {slot}: {', '.join(retired)}" if retired else \
            f"slot {slot} has no retired views"
        raise EngineError(f"view {name} is unknown: pgderive has no record of it for slot {slot} ({known})")
    if entry.status == ACTIVE:
        raise EngineError(f"view {name} is still active: the daemon maintains it until it reloads a config "
                          "without it; reload (or restart) the daemon first, then drop it")
    if entry.status != RETIRED:
        raise EngineError(f"view {name} has an unknown registry status {entry.status!r}")
    sink = spec.sinks.get(entry.sink)
    if sink is None:
        raise EngineError(f"view {name} was kept in sink {entry.sink}, which is no longer in the config: add "
                          f"sinks.{entry.sink} back to the YAML to drop the view's data")
    stored = "opensearch" if entry.target.index is not None else "redis"
    if sink.type != stored:
        raise EngineError(f"view {name} was kept in sink {entry.sink} as {describe(entry)}, but sinks.{entry.sink} "
                          f"is now a {sink.type} sink: point it at the {stored} sink that holds the view's data")
    for other, view in spec.views.items():
        if view.sink_name != entry.sink:
            continue
        shape = view.key_template.shape() if view.key_template is not None else None
        if (entry.target.index is not None and view.index == entry.target.index) or (
                entry.target.index is None and entry.target.key_shape and shape == entry.target.key_shape):
            raise EngineError(f"view {name} ({describe(entry)}) shares its records with view {other} of the "
                              f"config: dropping it would delete {other}'s data; refusing")
    return entry


def plan_drop(spec: Spec, name: str) -> list[ViewEntry]:
    """The registry entries ``pgderive drop NAME`` would drop (``NAME``, or every ``NAME@SINK``
    copy), each checked by :func:`check_droppable`. Changes nothing. Raises
    :class:`~pgderive.runtime.errors.EngineError` (not droppable) and ``psycopg.Error``."""
    if name in spec.views or spec.resolve(name):
        check_droppable(spec, name, None, [])  # raises: still in the config
    entries = ViewRegistry(spec.source.conninfo()).entries(spec.source.slot)
    retired = [e.view for e in entries if e.status == RETIRED]
    found = resolve_entries(entries, name)
    if not found:
        check_droppable(spec, name, None, retired)  # raises: unknown
    return [check_droppable(spec, e.view, e, retired) for e in found]


def drop_view(spec: Spec, name: str) -> DropReport:
    """Drop the retired view ``name`` (an internal name, e.g. ``card@search``) of
    ``spec``'s slot: its data in its sink, its dead letters, aggregate state, fingerprint and
    registry row, in the order of the module docstring. Works whether or not the daemon runs
    (it no longer maintains a retired view). Idempotent: after an interruption, run it again.

    Raises :class:`~pgderive.runtime.errors.EngineError` when the view may not be dropped
    (:func:`check_droppable`), :class:`~sinks.base.SinkError` when its sink fails (nothing after
    the sink step was done then), ``psycopg.Error`` when the source cannot be reached.
    """
    slot = spec.source.slot
    dsn = spec.source.conninfo()  # bookkeeping: the source's statement timeout
    data_dsn = spec.source.conninfo(statement_timeout=False)  # deletes that may be large
    registry = ViewRegistry(dsn)
    if name in spec.views or spec.resolve(name):
        check_droppable(spec, name, None, [])  # raises: still in the config
    entry = registry.get(slot, name)
    retired = [] if entry is not None else [e.view for e in registry.entries(slot, RETIRED)]
    entry = check_droppable(spec, name, entry, retired)

    opener = SinkOpener(entry.sink, spec.sinks[entry.sink].model_dump(), deployment_of(spec), (entry.target,))
    sink = opener()
    try:
        records = sink.count(name)
        sink.drop_view(name)
    finally:
        sink.close()
    log.info("view %s: removed from %s (%d record(s))", name, describe(entry), records)

    with DeadLetterStore(data_dsn) as dead:
        dead_letters = dead.discard(slot, view=name)
    state = StateStore(dsn)
    shared = tuple(s for s in state.slots_with_view(name) if s != slot)
    groups = 0
    if shared:
        log.warning("view %s: aggregate state (pgderive.agg_*) left alone: slot(s) %s also name a view %s",
                    name, ", ".join(shared), name)
    else:
        aggregates = AggregateStore(data_dsn)
        try:
            groups = aggregates.reset(name)
        finally:
            aggregates.close()
    state.remove_views(slot, [name])
    registry.forget(slot, name)
    return DropReport(view=name, sink=entry.sink, target=entry.target, records=records,
                      dead_letters=dead_letters, aggregate_groups=groups, aggregate_shared=shared)
