"""``pgderive rebuild VIEW`` (offline): reload one view from a fresh consistent snapshot.

A TEMPORARY logical slot created with an exported snapshot gives a snapshot exactly at a known
LSN X (its consistent point). The view is loaded into a new generation at version X and
committed, which drops every record older than X. When the daemon restarts it replays the main
slot from its confirmed position (< X): versions protect the newer snapshot records, and the
replay itself converges for the rest (ARCHITECTURE.md, "Online rebuild"; the online variant comes
later). The daemon must be stopped: the main slot must not be active.
"""
from __future__ import annotations

import logging

import psycopg

from cdc.slot import slot_info
from views.check import build_views
from views.derive import view_fingerprint
from views.spec import Spec

from ..runtime.bootstrap import SnapshotStats
from ..runtime.errors import EngineError
from ..runtime.reload import reload_views
from ..runtime.sinks import open_sinks
from ..state.deadletters import DeadLetterStore
from ..state.slots import StateStore

__all__ = ["rebuild_view"]

log = logging.getLogger("pgderive.rebuild")


def rebuild_view(spec: Spec, name: str) -> tuple[int, SnapshotStats]:
    """Rebuild view ``name`` offline; returns ``(consistent point LSN, snapshot stats)``.

    Raises :class:`~pgderive.runtime.coordinator.EngineError` if the daemon is running (slot active) or the
    view is unknown, :class:`~views.spec.SpecError` for YAML/source problems.
    """
    if name not in spec.views:
        raise EngineError(f"unknown view {name!r}; views in this file: {', '.join(spec.views)}")
    dsn, slot = spec.source.conninfo(statement_timeout=False), spec.source.slot
    with psycopg.connect(dsn, autocommit=True) as conn:
        info = slot_info(conn, slot)
        if info is not None and info.active:
            raise EngineError(f"slot {slot} is active (pid {info.active_pid}): stop `pgderive run` "
                              "before an offline rebuild")
        views = build_views(spec, conn, [name])
    sinks = open_sinks(spec, views)
    try:
        consistent_point, stats = reload_views(dsn, slot, views, sinks,
                                               DeadLetterStore(dsn, max_bytes=spec.dead_letters.max_bytes),
                                               concurrency=spec.bootstrap.concurrency,
                                               split_rows=spec.bootstrap.split_rows)
    finally:
        for s in sinks.values():
            s.close()
    store = StateStore(dsn)
    state = store.get(slot)
    if state is not None:
        fps = dict(state.views)
        fps[name] = view_fingerprint(views[0])
        store.set(slot, state.status, state.consistent_point, fps)
    return consistent_point, stats
