"""Parallel snapshot loads (pgderive/runtime/bootstrap.py, `bootstrap.concurrency`): every task
reads the one exported snapshot on a connection of its own, so a parallel load holds exactly
what a serial one holds, whatever commits meanwhile; a failed task stops the others and its
error is the one raised."""
from __future__ import annotations

import logging
import threading

import psycopg
import pytest

from cdc.snapshot import snapshot_connection
from pgderive.runtime.bootstrap import Interrupted, load_snapshot
from sinks.base import SinkError
from sinks.memory import MemorySink
from views.check import build_views
from views.spec import load_spec

from ..support import current_lsn

SCHEMA = """
CREATE TABLE a (id int PRIMARY KEY, v text);
CREATE TABLE b (id int PRIMARY KEY, a_id int, w int);
CREATE TABLE c (id int PRIMARY KEY, n numeric);
INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 3000) g;
INSERT INTO b SELECT g, g % 3000 + 1, g FROM generate_series(1, 6000) g;
INSERT INTO c SELECT g, g / 7.0 FROM generate_series(1, 2000) g;
"""
VIEWS = """
  P_a: {table: a, sink: cache, key: "P_:a:{id}", fields: [v], format: hash}
  P_a2: {table: a, sink: search, index: Pidx_a, fields: {value: v}}
  P_b: {table: b, sink: cache, key: "P_:b:{id}", fields: [a_id, w], format: json, where: "w % 2 = 0"}
  P_c: {table: c, sink: search, index: Pidx_c, fields: [n]}
  P_tree: {table: b, sink: cache, key: "P_:t:{id}", fields: [w], format: json,
           include: {parent: {table: a, on: {a_id: id}, fields: [v]}}}
  P_agg: {table: b, sink: cache, key: "P_:g:{a_id}", format: json, group_by: [a_id],
          aggregate: {total: "sum(w)", rows: "count(*)"}}
"""


def _memory_sinks(views) -> dict[str, MemorySink]:
    sinks: dict[str, MemorySink] = {}
    for v in views:
        sinks.setdefault(v.sink, MemorySink(v.sink)).register(v.target)
    return sinks


def _export(dsn: str):
    """A connection holding an exported snapshot (REPEATABLE READ + pg_export_snapshot())."""
    conn = psycopg.connect(dsn)
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    name = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
    return conn, name


def _contents(sinks, views) -> dict[str, dict]:
    return {v.name: sinks[v.sink].records(v.name) for v in views}


def test_a_parallel_load_reads_the_one_snapshot_whatever_commits_meanwhile(scenario, caplog):
    s = scenario(SCHEMA, VIEWS)
    spec = load_spec(s.config)
    exporter, snap = _export(s.dsn)
    try:
        version = current_lsn(s.dsn)
        with snapshot_connection(s.dsn, snap) as conn:
            views = build_views(spec, conn)
            serial = _memory_sinks(views)
            load_snapshot(conn, views, serial, version, aggregates=None, concurrency=1)
        # After the snapshot: every table changes; a parallel load must not see any of it.
        s.sql("UPDATE a SET v = 'later'; DELETE FROM b WHERE id > 10; INSERT INTO c VALUES (99999, 1)")
        parallel = _memory_sinks(views)
        opened = []

        def connect():
            opened.append(threading.current_thread().name)
            return snapshot_connection(s.dsn, snap)
        with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"), \
                snapshot_connection(s.dsn, snap) as conn:
            load_snapshot(conn, views, parallel, version, concurrency=3, connect=connect)
    finally:
        exporter.close()
    assert _contents(parallel, views) == _contents(serial, views)
    assert len(_contents(serial, views)[f"{s.p}_a"]) == 3000
    assert all(d["v"].startswith("a") for d in _contents(parallel, views)[f"{s.p}_a"].values())
    assert len(opened) == 3 and len(set(opened)) == 3  # three workers, a connection each
    assert any("loading 5 task(s) on up to 3 connections" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_failed_task_stops_the_load_with_its_own_error(scenario, concurrency):
    s = scenario(SCHEMA, VIEWS)
    spec = load_spec(s.config)
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
        sinks = _memory_sinks(views)
        sinks["search"].fail_next(1, methods=["load"], retryable=False, message="mapping refused")
        with pytest.raises(SinkError, match="mapping refused"):
            load_snapshot(conn, views, sinks, current_lsn(s.dsn), concurrency=concurrency,
                          connect=lambda: snapshot_connection(s.dsn, None))
    for sink in sinks.values():  # nothing committed: no checkpoint anywhere
        assert all(sink.read_checkpoint(v.name) is None for v in views if v.sink == sink.name)


def test_a_stop_interrupts_every_task(scenario):
    s = scenario(SCHEMA, VIEWS)
    spec = load_spec(s.config)
    stop = threading.Event()
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
        sinks = _memory_sinks(views)
        for sink in sinks.values():
            sink.slow(0.5, methods=["load"])
        threading.Timer(0.3, stop.set).start()
        with pytest.raises(Interrupted):
            load_snapshot(conn, views, sinks, current_lsn(s.dsn), concurrency=3, stop=stop,
                          connect=lambda: snapshot_connection(s.dsn, None))
    assert all(sink.read_checkpoint(v.name) is None for sink in sinks.values() for v in views
               if v.sink == sink.name)
