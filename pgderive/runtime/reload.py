"""Reloading views from a fresh snapshot taken by a TEMPORARY slot (offline rebuild, and the
daemon's answer to a sink that lost a view's data)."""
from __future__ import annotations

import logging
import os
import threading
from typing import Mapping, Sequence

from cdc.lsn import format_lsn
from cdc.slot import SlotReader
from cdc.snapshot import snapshot_connection
from sinks.base import Sink
from views.derive import View

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetterStore
from .bootstrap import SnapshotStats, load_snapshot

__all__ = ["reload_views"]

log = logging.getLogger("pgderive.rebuild")


def reload_views(dsn: str, slot: str, views: Sequence[View], sinks: Mapping[str, Sink],
                 dead_letters: DeadLetterStore, *,
                 stop: threading.Event | None = None, concurrency: int = 1,
                 split_rows: int = 0) -> tuple[int, SnapshotStats]:
    """Load ``views`` into new generations from a snapshot taken by a TEMPORARY slot.

    Returns ``(consistent point LSN, stats)``. Used by ``rebuild`` and by the daemon when a
    sink lost a view's data. ``stop``: set it to stop the load (raises
    :class:`~pgderive.runtime.bootstrap.Interrupted`; nothing is committed, the temporary slot
    goes with its connection). ``concurrency``: loads at once (YAML ``bootstrap.concurrency``);
    ``split_rows``: a larger table is loaded in key ranges (YAML ``bootstrap.split_rows``, 0:
    never; both as in :func:`~pgderive.runtime.bootstrap.load_snapshot`). Raises :class:`~sinks.base.SinkError` or :class:`psycopg.Error`.
    """
    reader = SlotReader(dsn, f"{slot}_rebuild_{os.getpid()}")
    aggregates = AggregateStore(dsn)
    try:
        reader.connect()
        consistent_point, snapshot = reader.create_slot(temporary=True)
        log.info("rebuilding view(s) %s from a snapshot at %s", ", ".join(v.name for v in views),
                 format_lsn(consistent_point),
                 extra={"view": ",".join(v.name for v in views), "lsn": consistent_point})
        with snapshot_connection(dsn, snapshot) as conn:
            stats = load_snapshot(conn, views, sinks, consistent_point, aggregates=aggregates, stop=stop,
                                  concurrency=concurrency, split_rows=split_rows,
                                  connect=lambda: snapshot_connection(dsn, snapshot),
                                  on_dead_letters=lambda e: dead_letters.record(slot, e))
    finally:
        reader.close()
        aggregates.close()
    return consistent_point, stats
