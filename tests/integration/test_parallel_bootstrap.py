"""Parallel snapshot loads (pgderive/runtime/bootstrap.py, `bootstrap.concurrency`): every task
reads the one exported snapshot on a connection of its own, so a parallel load holds exactly
what a serial one holds, whatever commits meanwhile; a failed task stops the others and its
error is the one raised. A large table split into key ranges (`bootstrap.split_rows`) is loaded
exactly once, row by row and by wire loads into real Redis and OpenSearch."""
from __future__ import annotations

import logging
import re
import threading
from collections import Counter

import psycopg
import pytest
import redis
from psycopg import sql

from cdc.snapshot import KeyRange, key_ranges, snapshot_connection
from pgderive.runtime.bootstrap import Interrupted, load_snapshot
from pgderive.runtime.sinks import open_sinks
from sinks.base import SinkError
from sinks.memory import MemorySink
from sinks.redis import versions_key
from views.check import build_views
from views.spec import load_spec

from ..support import REDIS_URL, current_lsn, deployment
from .test_wire import _documents, _drop, _dump

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


# 10,000 keys from -14997 to 15000 (step 3), 1,501 of them deleted (a gap across the middle
# range), ANALYZEd so that pg_class.reltuples holds the estimate the split is decided on.
SPLIT_SCHEMA = """
CREATE TABLE big (id bigint PRIMARY KEY, g int, v text);
CREATE TABLE grp (g int PRIMARY KEY, name text);
INSERT INTO big SELECT g * 3 - 15000, g % 7, 'r' || g FROM generate_series(1, 10000) g;
DELETE FROM big WHERE id BETWEEN -3000 AND 1500;
INSERT INTO grp SELECT g, 'group ' || g FROM generate_series(0, 6) g;
ANALYZE big;
"""
SPLIT_VIEWS = """
  P_big: {table: big, sink: cache, key: "P_:big:{id}", fields: [g, v], format: json}
  P_bigs: {table: big, sink: search, index: Pidx_big, fields: [g, v]}
  P_bigw: {table: big, sink: cache, key: "P_:bw:{id}", fields: [v], format: hash, where: "g % 2 = 0 AND id <> 42"}
  P_bigd: {table: big, sink: cache, key: "P_:bd:{id}", fields: [g, v], format: json, derive: "tests.derivations:shout"}
  P_bigt: {table: big, sink: cache, key: "P_:bt:{id}", fields: [v], format: json,
           include: {grp: {table: grp, on: {g: g}, fields: [name]}}}
  P_bigg: {table: big, sink: cache, key: "P_:bg:{g}", format: json, group_by: [g], aggregate: {n: "count(*)"}}
"""
RANGE_LOG = re.compile(r"\((id < -?\d+|-?\d+ <= id < -?\d+|id >= -?\d+)\)")


def _counting(sinks: dict[str, MemorySink]) -> Counter:
    """Count every (view, key) each sink's ``load`` is given."""
    loaded: Counter = Counter()
    lock = threading.Lock()
    for sink in sinks.values():
        def load(view, generation, ops, _real=sink.load):
            with lock:
                loaded.update((view, op.key) for op in ops)
            return _real(view, generation, ops)
        sink.load = load
    return loaded


def test_key_ranges_hold_every_row_exactly_once(scenario):
    s = scenario("""
        CREATE TABLE k8 (id bigint PRIMARY KEY);
        INSERT INTO k8 VALUES (-9223372036854775808), (9223372036854775807), (-1), (0), (1), (5);
        INSERT INTO k8 SELECT g FROM generate_series(100, 1100) g;
        CREATE TABLE k2 (id smallint PRIMARY KEY);
        INSERT INTO k2 VALUES (-32768), (-1), (32767);
        CREATE TABLE k4 (id int PRIMARY KEY);
        INSERT INTO k4 VALUES (5), (6);
        CREATE TABLE k0 (id int PRIMARY KEY);
    """, '  P_x: {table: k4, sink: cache, key: "P_:x:{id}", fields: [id], format: hash}\n')
    with snapshot_connection(s.dsn, None) as conn:
        def check(table: str, parts: int, expected: int) -> list[KeyRange]:
            ranges = key_ranges(conn, f"public.{table}", "id", parts)
            assert len(ranges) == expected, ranges
            assert ranges[0].low is None and ranges[-1].high is None
            assert all(a.high == b.low for a, b in zip(ranges, ranges[1:]))  # adjacent, half-open
            t = sql.Identifier(table)
            total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0]
            counts = [conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(t, r.sql())).fetchone()[0]
                      for r in ranges]
            assert sum(counts) == total, (table, counts)
            missed = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE NOT ({})").format(
                t, sql.SQL(" OR ").join(r.sql() for r in ranges))).fetchone()[0]
            assert missed == 0
            return ranges
        r8 = check("k8", 4, 4)  # the whole bigint span: most rows in the two middle ranges
        assert [str(r) for r in r8] == ["id < -4611686018427387904", "-4611686018427387904 <= id < 0",
                                        "0 <= id < 4611686018427387904", "id >= 4611686018427387904"]
        check("k2", 3, 3)
        assert check("k4", 5, 2) == [KeyRange("id", None, 6), KeyRange("id", 6, None)]  # span of 2 keys
        assert check("k4", 1, 1) == [KeyRange("id")]
        assert check("k0", 3, 1) == [KeyRange("id")]  # empty: the whole table
        assert KeyRange("id").sql().as_string(conn) == "true"


def test_a_split_table_loads_every_row_once_as_the_serial_load_does(scenario, caplog):
    """Row-by-row views (MemorySink) over a table split into 3 key ranges (negative keys, a
    gap, a ``where``), beside a ``derive``, an include and an aggregate view over it, which keep
    one task each; rows changed after the snapshot are not seen."""
    s = scenario(SPLIT_SCHEMA, SPLIT_VIEWS)
    spec = load_spec(s.config)
    n = s.sql("SELECT count(*) FROM big")[0][0]
    nw = s.sql("SELECT count(*) FROM big WHERE g % 2 = 0 AND id <> 42")[0][0]
    assert n == 8499
    exporter, snap = _export(s.dsn)
    try:
        version = current_lsn(s.dsn)
        with snapshot_connection(s.dsn, snap) as conn:
            views = build_views(spec, conn)
            serial = _memory_sinks(views)
            load_snapshot(conn, views, serial, version, concurrency=1, split_rows=1000)  # serial: unsplit
        s.sql("UPDATE big SET v = 'later' WHERE id > 0; DELETE FROM big WHERE id < -10000;"
              "INSERT INTO big VALUES (99999, 1, 'new'), (-99999, 2, 'new')")
        parallel = _memory_sinks(views)
        loaded = _counting(parallel)
        with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"), \
                snapshot_connection(s.dsn, snap) as conn:
            stats = load_snapshot(conn, views, parallel, version, concurrency=3, split_rows=1000,
                                  connect=lambda: snapshot_connection(s.dsn, snap))
    finally:
        exporter.close()
    names = {k: f"{s.p}_{k}" for k in ("big", "bigs", "bigw", "bigd", "bigt", "bigg")}
    assert _contents(parallel, views) == _contents(serial, views)
    got = _contents(parallel, views)
    assert len(got[names["big"]]) == len(got[names["bigs"]]) == len(got[names["bigt"]]) == n
    assert len(got[names["bigw"]]) == nw and len(got[names["bigg"]]) == 7
    assert all(not d["v"].startswith("later") for d in got[names["big"]].values())
    # 3 ranges x 2 reads (where "" and the where view) + the derive view + include + aggregates
    assert any("split into 3 key ranges of id" in m for m in caplog.messages)
    assert any("loading 9 task(s) on up to 3 connections" in m for m in caplog.messages)
    ranged = {m for m in caplog.messages if "done:" in m and RANGE_LOG.search(m)}
    assert len(ranged) == 6, ranged
    for key in ("big", "bigs", "bigw"):  # every row written exactly once
        keys = Counter({k: c for (view, k), c in loaded.items() if view == names[key]})
        assert set(keys) == set(got[names[key]]) and set(keys.values()) == {1}, key
        assert stats.records[names[key]] == len(got[names[key]])
    # rows add up over the ranges: the shared read, the where read, derive, include, aggregate
    assert stats.rows["public.big"] == 4 * n + nw
    assert stats.seconds["public.big"] > 0


SPLIT_WIRE_VIEWS = """
  P_wh: {table: big, sink: cache, key: "P_:wh:{id}", fields: [g, v], format: hash}
  P_ww: {table: big, sink: cache, key: "P_:ww:{id}", fields: [v], format: hash, where: "g % 2 = 0"}
  P_ws: {table: big, sink: search, index: Pidx_ws, fields: [g, v]}
  P_wj: {table: big, sink: cache, key: "P_:wj:{id}", fields: [g, v], format: json}
"""


def test_split_wire_loads_write_what_a_serial_row_by_row_load_writes(scenario, caplog):
    """Redis hash views (one with ``where``) and an OpenSearch view loaded by wire loads, and a
    Redis json view row by row, each in 3 key ranges on 3 connections, against a serial
    row-by-row load of the same snapshot: Redis byte for byte with version entries, OpenSearch
    document and version for version."""
    s = scenario(SPLIT_SCHEMA, SPLIT_WIRE_VIEWS)
    spec = load_spec(s.config)
    r = redis.Redis.from_url(REDIS_URL)
    dep = deployment(s.config)
    n = s.sql("SELECT count(*) FROM big")[0][0]
    nw = s.sql("SELECT count(*) FROM big WHERE g % 2 = 0")[0][0]
    names = {k: f"{s.p}_{k}" for k in ("wh", "ww", "ws", "wj")}
    version = current_lsn(s.dsn)

    def redis_state() -> dict:
        return {k: _dump(r, names[k], f"{s.p}_:{k}:", dep) for k in ("wh", "ww", "wj")}

    exporter, snap = _export(s.dsn)
    try:
        with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"), \
                snapshot_connection(s.dsn, snap) as conn:
            views = build_views(spec, conn)
            sinks = open_sinks(spec, views)
            stats = load_snapshot(conn, views, sinks, version, concurrency=3, split_rows=1000,
                                  connect=lambda: snapshot_connection(s.dsn, snap))
            for sink in sinks.values():
                sink.close()
    finally:
        exporter.close()
    fast, fast_docs = redis_state(), _documents(s, [names["ws"]])
    assert any("loading 12 task(s) on up to 3 connections" in m for m in caplog.messages)
    wired = [m for m in caplog.messages if "wire load" in m and "done" in m]
    assert len(wired) == 9 and all(RANGE_LOG.search(m) for m in wired), wired
    assert len([m for m in caplog.messages if "done:" in m and "wire load" not in m and RANGE_LOG.search(m)]) == 3
    assert {k: stats.records[names[k]] for k in names} == {"wh": n, "ww": nw, "ws": n, "wj": n}
    assert stats.rows["public.big"] == 3 * n + nw and stats.sink_seconds[names["ws"]] > 0

    _drop(s)
    with snapshot_connection(s.dsn, None) as conn:  # nothing changed since: the same rows
        views = build_views(spec, conn)
        sinks = open_sinks(spec, views)
        load_snapshot(conn, views, sinks, version, wire_loads=False, concurrency=1)
        for sink in sinks.values():
            sink.close()
    slow, slow_docs = redis_state(), _documents(s, [names["ws"]])
    assert len(slow["wh"]) == len(slow["wj"]) == n and len(slow["ww"]) == nw
    assert len(slow_docs[names["ws"]]) == n
    for k in slow:
        assert fast[k] == slow[k], k
    assert fast_docs == slow_docs
    assert r.hlen(versions_key(names["wh"], dep)) == n


def test_a_refused_wire_load_of_one_range_reloads_the_view_row_by_row(scenario, caplog):
    """Redis refuses one record of the first range (WRONGTYPE): its wire load removes the view's
    version entries, other ranges' included, so every range is loaded again row by row; the
    foreign key alone becomes a dead letter and every other record keeps its version entry."""
    s = scenario(SPLIT_SCHEMA, '  P_h: {table: big, sink: cache, key: "P_:h:{id}", fields: [v], format: hash}\n')
    spec = load_spec(s.config)
    r = redis.Redis.from_url(REDIS_URL)
    n = s.sql("SELECT count(*) FROM big")[0][0]
    foreign = f"{s.p}_:h:-14997"  # the smallest key: in the first range
    r.set(foreign, "a string, not a hash")
    dead: list = []
    try:
        with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"), \
                snapshot_connection(s.dsn, None) as conn:
            views = build_views(spec, conn)
            sinks = open_sinks(spec, views)
            exporter, snap = _export(s.dsn)
            try:
                with snapshot_connection(s.dsn, snap) as conn:
                    stats = load_snapshot(conn, views, sinks, current_lsn(s.dsn), concurrency=3, split_rows=1000,
                                          connect=lambda: snapshot_connection(s.dsn, snap),
                                          on_dead_letters=dead.extend)
            finally:
                exporter.close()
            for sink in sinks.values():
                sink.close()
        assert any("WRONGTYPE" in m and "every key range" in m for m in caplog.messages)
        assert any("row by row: a sink refused the wire load of a key range" in m for m in caplog.messages)
        assert [d.key for d in dead] == [foreign]
        assert r.hlen(versions_key(f"{s.p}_h", deployment(s.config))) == n - 1
        assert r.hgetall(f"{s.p}_:h:15000") == {b"v": b"r10000"}
        assert r.hgetall(f"{s.p}_:h:-14994") == {b"v": b"r2"}
        assert stats.records[f"{s.p}_h"] == n  # counted once, by the row-by-row load
    finally:
        r.delete(foreign)
