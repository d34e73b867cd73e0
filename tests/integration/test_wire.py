"""Wire loads (pgderive/runtime/wire.py): a snapshot encoded by Postgres into RESP must land in Redis
byte for byte as the row-by-row path writes it, for every type it accepts, NULLs, awkward text
and both an empty and a populated view; views it cannot serve fall back to the row-by-row path."""
from __future__ import annotations

import logging
import threading

import pytest
import redis

from cdc.snapshot import snapshot_connection
from cdc.lsn import version_hex
from sinks.base import SinkError
from sinks.redis import versions_key
from pgderive.runtime.bootstrap import load_snapshot
from views.check import build_views
from pgderive.runtime.sinks import open_sinks
from views.spec import load_spec
from pgderive.runtime.wire import wire_query

from ..support import REDIS_URL, current_lsn, deployment

SCHEMA = """
CREATE TYPE mood AS ENUM ('ok', 'sad');
CREATE TABLE t (id int, code text, s smallint, b bigint, n numeric, n2 numeric(8,3), flag boolean,
  ch char(5), vc varchar(20), u uuid, d date, ts timestamptz, iv interval, ip inet, by bytea,
  ia int[], ta text[], js json, m mood, f float8, jb jsonb, PRIMARY KEY (id, code));
INSERT INTO t (id, code, s, b, n, n2, flag, ch, vc, u, d, ts, iv, ip, by, ia, ta, js, m, f, jb)
SELECT g, 'c' || (g % 3), (g % 100)::smallint, g::bigint * 9000000000000, (g / 7.0)::numeric(20,6), g * 1.5,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'x' END, repeat('é', g % 4),
       md5(g::text)::uuid, date '2024-02-29' + g, timestamptz '2024-01-01 00:00+02' + g * interval '1 min',
       g * interval '1 hour 2 sec', '10.0.0.1/8', decode(md5(g::text), 'hex'),
       ARRAY[g, NULL, -g], ARRAY['a b', 'q"t', NULL], '{"k": [1, 2.50]}', 'sad', g / 3.0, '{"a": 1}'
  FROM generate_series(1, 300) g;
INSERT INTO t (id, code, n, vc, js) VALUES
  (1000, 'crlf', 'NaN', E'a\\r\\nb\\\\c$-\\t', '  {"sp" : 1}  '),
  (1001, E'k\\r\\n-é😀', 'Infinity', '-', NULL), (1002, '', '-Infinity', '', NULL),
  (1003, 'tiny', 0.0000001, NULL, NULL), (1004, 'none', NULL, NULL, NULL);
"""
FIELDS = "[s, b, n, n2, flag, ch, vc, u, d, ts, iv, ip, by, ia, ta, js, m]"
VIEWS = f"""
  P_all: {{table: t, sink: cache, key: "P_:a:{{id}}/{{code}}", fields: {FIELDS}, format: hash}}
  P_ren: {{table: t, sink: cache, key: "P_:r:{{code}}:{{id}}", fields: {{val: n, who: vc}}, format: hash,
           where: "id % 2 = 0 AND vc IS NOT NULL"}}
  P_none: {{table: t, sink: cache, key: "P_:z:{{id}}:{{code}}", fields: [vc], format: hash}}
  P_float: {{table: t, sink: cache, key: "P_:f:{{id}}:{{code}}", fields: [f], format: hash}}
  P_jsonb: {{table: t, sink: cache, key: "P_:j:{{id}}:{{code}}", fields: [jb], format: hash}}
  P_doc: {{table: t, sink: cache, key: "P_:d:{{id}}:{{code}}", fields: [s, vc], format: json}}
"""


def _dump(r: redis.Redis, view: str, prefix: str, dep: str) -> dict[bytes, tuple]:
    """Every record of ``view`` as Redis holds it (hash fields, type) plus its version entry
    (deployment ``dep``)."""
    versions = r.hgetall(versions_key(view, dep))
    out = {}
    for key in r.scan_iter(match=prefix + "*", count=1000):
        kind = r.type(key)
        body = r.hgetall(key) if kind == b"hash" else r.get(key)
        out[key] = (kind, body, versions.get(key))
    for key, ver in versions.items():
        out.setdefault(key, (None, None, ver))
    return out


def _load(s, wire: bool, version: int, dead: list | None = None):
    spec = load_spec(s.config)
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
        sinks = open_sinks(spec, views)
        queries = {v.name: wire_query(conn, v, sinks[v.sink], version) for v in views}
        load_snapshot(conn, views, sinks, version, wire_loads=wire,
                      on_dead_letters=None if dead is None else dead.extend)
    for sink in sinks.values():
        sink.close()
    return queries


def _drop(s) -> None:
    spec = load_spec(s.config)
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
    sinks = open_sinks(spec, views)
    for v in views:
        sinks[v.sink].drop_view(v.name)


def test_wire_load_writes_what_the_row_by_row_path_writes(scenario, caplog):
    s = scenario(SCHEMA, VIEWS)
    r = redis.Redis.from_url(REDIS_URL)
    names = {k: f"{s.p}_{k}" for k in ("all", "ren", "none", "float", "jsonb", "doc")}
    prefixes = {"all": "a", "ren": "r", "none": "z", "float": "f", "jsonb": "j", "doc": "d"}
    version = current_lsn(s.dsn)
    dep = deployment(s.config)

    def state() -> dict:
        return {k: _dump(r, names[k], f"{s.p}_:{prefixes[k]}:", dep) for k in names}

    with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"):
        queries = _load(s, True, version)
    wired = {k for k, name in names.items() if queries[name] is not None}
    assert wired == {"all", "ren", "none"}  # floats, jsonb and json documents go row by row
    assert sum("wire load" in m and "done" in m for m in caplog.messages) == 3
    fast = state()
    _drop(s)
    _load(s, False, version)
    slow = state()
    assert len(slow["all"]) == 305 and len(slow["ren"]) > 100
    assert sum(kind == b"hash" for kind, _, _ in slow["all"].values()) == 304
    for k in names:
        assert fast[k] == slow[k], k
    # every field NULL: no hash, only the version entry
    assert fast["all"][f"{s.p}_:a:1004/none".encode()] == (None, None, version_hex(version).encode())

    # A populated view: rows changed (fields now NULL) and deleted since; the wire load of the
    # new snapshot over the old records must give what a fresh row-by-row load gives.
    s.sql("UPDATE t SET vc = NULL, ia = NULL, flag = NOT flag WHERE id % 4 = 0")
    s.sql("DELETE FROM t WHERE id % 10 = 1")
    newer = current_lsn(s.dsn)
    assert newer > version
    _load(s, True, newer)
    fast = state()
    _drop(s)
    _load(s, False, newer)
    slow = state()
    for k in names:
        assert fast[k] == slow[k], k
    assert len(slow["all"]) == 274  # 30 of 1..300 and 1001 deleted


def test_wire_load_falls_back_when_redis_refuses_a_record(scenario, caplog):
    s = scenario("CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
                 '  P_h: {table: t, sink: cache, key: "P_:h:{id}", fields: [v], format: hash}\n')
    r = redis.Redis.from_url(REDIS_URL)
    r.set(f"{s.p}_:h:7", "a string, not a hash")  # WRONGTYPE for HSET
    dead: list = []
    with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"):
        _load(s, True, current_lsn(s.dsn), dead)
    assert any("WRONGTYPE" in m and "row by row" in m for m in caplog.messages)
    assert [d.key for d in dead] == [f"{s.p}_:h:7"]
    assert r.hgetall(f"{s.p}_:h:8") == {b"v": b"v8"}
    assert r.hlen(versions_key(f"{s.p}_h", deployment(s.config))) == 49
    r.delete(f"{s.p}_:h:7")


@pytest.mark.parametrize("view", [
    '{table: t, sink: cache, key: "P_:k:{v}", fields: [v], format: hash}',  # key outside the PK
    '{table: t, sink: cache, key: "P_:k:{id}", fields: [v], format: hash, derive: "tests.derivations:product_card"}',
])
def test_views_the_wire_load_cannot_serve(scenario, view):
    s = scenario("CREATE TABLE t (id int PRIMARY KEY, v text); ALTER TABLE t REPLICA IDENTITY FULL;",
                 f"  P_x: {view}\n")
    spec = load_spec(s.config)
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
        sinks = open_sinks(spec, views)
        assert wire_query(conn, views[0], sinks["cache"], 1) is None


def test_wire_load_that_fails_mid_copy_falls_back_without_hanging(scenario, caplog):
    """The sink fails after the first chunk, while the COPY still streams (and holds the
    connection): the COPY must be cancelled before the savepoint rollback, then the view loads
    row by row. Without closing the reader first, the rollback waits on the COPY's lock forever."""
    s = scenario("CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, repeat('v', 200) || g FROM generate_series(1, 30000) g;",
                 '  P_m: {table: t, sink: cache, key: "P_:m:{id}", fields: [v], format: hash}\n')
    spec = load_spec(s.config)
    done: list = []

    def run() -> None:
        with snapshot_connection(s.dsn, None) as conn:
            views = build_views(spec, conn)
            sinks = open_sinks(spec, views)
            sink = sinks["cache"]
            real = sink.wire_load

            def failing(view, chunks):
                def first_then_fail():
                    for i, chunk in enumerate(chunks):
                        if i == 1:
                            raise SinkError("injected: Redis refused the second chunk", retryable=False)
                        yield chunk
                return real(view, first_then_fail())

            sink.wire_load = failing
            load_snapshot(conn, views, sinks, current_lsn(s.dsn))
            done.append(sink.count(views[0].name))
            sink.close()

    worker = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"):
        worker.start()
        worker.join(120)
    assert not worker.is_alive(), "the snapshot hung after the failed wire load"
    assert any("injected" in m and "row by row" in m for m in caplog.messages)
    assert done == [30000]


OS_VIEWS = f"""
  P_osall: {{table: t, sink: search, index: Pidx_wall, fields: {FIELDS}}}
  P_osren: {{table: t, sink: search, index: Pidx_wren, key: "{{code}}/{{id}}", fields: {{val: n, who: vc, flag: flag}},
            where: "id % 2 = 0"}}
  P_osfloat: {{table: t, sink: search, index: Pidx_wfloat, fields: [id, f]}}
"""


def _documents(s, names) -> dict[str, dict]:
    """``_id -> (_source, _version)`` of every document of each view, after a refresh."""
    spec = load_spec(s.config)
    with snapshot_connection(s.dsn, None) as conn:
        views = build_views(spec, conn)
    sink = open_sinks(spec, views)["search"]
    out = {}
    for name in names:
        sink.count(name)  # refreshes
        versions = dict(sink.scan_keys(name))
        out[name] = {k: (doc, versions[k]) for k, doc in sink.scan(name)}
    sink.close()
    return out


def test_opensearch_wire_load_writes_what_the_row_by_row_path_writes(scenario, caplog):
    s = scenario(SCHEMA, OS_VIEWS)
    names = [f"{s.p}_{k}" for k in ("osall", "osren", "osfloat")]
    version = current_lsn(s.dsn)
    with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"):
        queries = _load(s, True, version)
    assert {n for n in names if queries[n] is not None} == set(names[:2])  # float8: row by row
    assert sum("wire load" in m and "done" in m for m in caplog.messages) == 2
    fast = _documents(s, names)
    _drop(s)
    _load(s, False, version)
    slow = _documents(s, names)
    assert len(slow[names[0]]) == 305 and len(slow[names[1]]) == 153
    for n in names:
        assert fast[n] == slow[n], n
    doc, ver = fast[names[0]]["1001:k\r\n-é😀"]
    assert ver == version and doc["vc"] == "-" and doc["s"] is None
    doc, _ = fast[names[0]]["4:c1"]
    assert doc["s"] == 4 and doc["b"] == 36000000000000 and doc["flag"] is True
    assert doc["n2"] == "6.000" and doc["ia"] == "{4,NULL,-4}" and doc["ta"] == '{"a b","q\\"t",NULL}'
    assert doc["js"] == '{"k": [1, 2.50]}' and doc["ch"] == "x    " and doc["vc"] == ""
    assert fast[names[1]]["crlf/1000"][0] == {"val": "NaN", "who": "a\r\nb\\c$-\t", "flag": None}


def test_opensearch_wire_load_falls_back_when_a_document_is_refused(scenario, caplog):
    """Dynamic mapping makes ``v`` a date from the first documents; the row whose ``v`` is not
    a date is refused (400): the wire load gives up, the row-by-row load dead-letters that row
    alone and writes the rest."""
    s = scenario("CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, CASE WHEN g = 4321 THEN 'not a date' ELSE '2024-01-02' END"
                 "  FROM generate_series(1, 5000) g;",
                 "  P_d: {table: t, sink: search, index: Pidx_wdate, fields: [v]}\n")
    dead: list = []
    with caplog.at_level(logging.INFO, logger="pgderive.bootstrap"):
        _load(s, True, current_lsn(s.dsn), dead)
    assert any("wire_load" in m and "mapper_parsing_exception" in m and "row by row" in m
               for m in caplog.messages)
    assert [d.key for d in dead] == ["4321"]
    docs = _documents(s, [f"{s.p}_d"])[f"{s.p}_d"]
    assert len(docs) == 4999 and docs["1"][0] == {"v": "2024-01-02"}


def _resp_commands(data: bytes) -> list[list[bytes]]:
    """Split RESP arrays of bulk strings (what a wire load sends) into commands."""
    out: list[list[bytes]] = []
    i = 0
    while i < len(data):
        assert data[i:i + 1] == b"*"
        j = data.index(b"\r\n", i)
        n, i = int(data[i + 1:j]), j + 2
        args = []
        for _ in range(n):
            assert data[i:i + 1] == b"$"
            j = data.index(b"\r\n", i)
            size, i = int(data[i + 1:j]), j + 2
            args.append(data[i:i + size])
            i += size + 2
        out.append(args)
    return out


def test_a_wire_load_cut_short_leaves_an_entry_for_every_record():
    """A load killed mid-chunk must not leave a record without its version entry: the next load
    would take the record for a foreign one, HSET over it without the DEL, and keep a field the
    row no longer has (chaos seed 903877111: a hash record kept price and note that the source
    had set to NULL). Every prefix of a chunk's commands, as Redis would execute them, is tried."""
    from sinks.redis import wire_chunk

    r = redis.Redis.from_url(REDIS_URL)
    prefix = f"cut{threading.get_ident() % 100000}:"
    vkey = versions_key(f"{prefix}view", "test:cut").encode()
    ver = version_hex(0x1234ABCD).encode()

    def bulk(b: bytes) -> bytes:
        return b"$%d\r\n%s\r\n" % (len(b), b)

    rows = []
    for i in range(3):
        key = f"{prefix}{i}".encode()
        record = b"*6\r\n" + bulk(b"HSET") + bulk(key) + bulk(b"id") + bulk(b"%d" % i) + bulk(b"note") + bulk(b"x")
        rows.append((record, bulk(key) + bulk(ver)))
    commands = _resp_commands(wire_chunk(vkey, rows))
    assert len(commands) == 4
    try:
        for cut in range(len(commands) + 1):
            r.delete(vkey, *(f"{prefix}{i}" for i in range(3)))
            for args in commands[:cut]:
                r.execute_command(*args)
            written = [f"{prefix}{i}" for i in range(3) if r.exists(f"{prefix}{i}")]
            assert len(written) == max(0, cut - 1)
            for key in written:
                assert r.hget(vkey, key) == ver, f"record {key} without its version entry after {cut} commands"
    finally:
        r.delete(vkey, *(f"{prefix}{i}" for i in range(3)))
