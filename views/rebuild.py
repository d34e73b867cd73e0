"""``pgderive rebuild VIEW`` (offline): reload one view from a fresh consistent snapshot.

A TEMPORARY logical slot created with an exported snapshot gives a snapshot exactly at a known
LSN X (its consistent point). The view is loaded into a new generation at version X and
committed, which drops every record older than X. When the daemon restarts it replays the main
slot from its confirmed position (< X): versions protect the newer snapshot records, and the
replay itself converges for the rest (DESIGN.md, "Online rebuild"; the online variant comes
later). The daemon must be stopped: the main slot must not be active.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import psycopg

from cdc.lsn import format_lsn
from cdc.slot import SlotReader, slot_info
from cdc.snapshot import snapshot_connection
from sinks.base import Sink

from .aggregate import AggregateStore
from .bootstrap import SnapshotStats, load_snapshot
from .deadletters import DeadLetterStore
from .derive import View
from .engine import EngineError, build_views, open_sinks, view_fingerprint
from .spec import Spec
from .state import StateStore

__all__ = ["rebuild_view", "reload_views"]

log = logging.getLogger("pgderive.rebuild")


def reload_views(dsn: str, slot: str, views: Sequence[View], sinks: Mapping[str, Sink],
                 dead_letters: DeadLetterStore) -> tuple[int, SnapshotStats]:
    """Load ``views`` into new generations from a snapshot taken by a TEMPORARY slot.

    Returns ``(consistent point LSN, stats)``. Used by ``rebuild`` and by the daemon when a
    sink lost a view's data. Raises :class:`~sinks.base.SinkError` or :class:`psycopg.Error`.
    """
    reader = SlotReader(dsn, f"{slot}_rebuild_{os.getpid()}")
    aggregates = AggregateStore(dsn)
    try:
        reader.connect()
        consistent_point, snapshot = reader.create_slot(temporary=True)
        log.info("rebuilding view(s) %s from a snapshot at %s", ", ".join(v.name for v in views),
                 format_lsn(consistent_point))
        with snapshot_connection(dsn, snapshot) as conn:
            stats = load_snapshot(conn, views, sinks, consistent_point, aggregates=aggregates,
                                  on_dead_letters=lambda e: dead_letters.record(slot, e))
    finally:
        reader.close()
        aggregates.close()
    return consistent_point, stats


def rebuild_view(spec: Spec, name: str) -> tuple[int, SnapshotStats]:
    """Rebuild view ``name`` offline; returns ``(consistent point LSN, snapshot stats)``.

    Raises :class:`~views.engine.EngineError` if the daemon is running (slot active) or the
    view is unknown, :class:`~views.spec.SpecError` for YAML/source problems.
    """
    if name not in spec.views:
        raise EngineError(f"unknown view {name!r}; views in this file: {', '.join(spec.views)}")
    dsn, slot = spec.source.dsn, spec.source.slot
    with psycopg.connect(dsn, autocommit=True) as conn:
        info = slot_info(conn, slot)
        if info is not None and info.active:
            raise EngineError(f"slot {slot} is active (pid {info.active_pid}): stop `pgderive run` "
                              "before an offline rebuild")
        views = build_views(spec, conn, [name])
    sinks = open_sinks(spec, views)
    try:
        consistent_point, stats = reload_views(dsn, slot, views, sinks, DeadLetterStore(dsn))
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
