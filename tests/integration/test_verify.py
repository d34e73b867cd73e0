"""``pgderive verify VIEW [--repair]`` on real services: equal views, tampered Redis and
OpenSearch records, repair while the daemon and a writer run, and a 200k-row view with bounded
memory."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time

import psutil
import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from views.check import build_views
from pgderive.runtime.sinks import open_sinks
from views.spec import load_spec
from pgderive.ops.verify import verify_view

from sinks.redis import versions_key

from ..support import OPENSEARCH_URL, REDIS_URL, ROOT, assert_views_equal, deployment

pytestmark = pytest.mark.slow

ACC = "CREATE TABLE acc (id int PRIMARY KEY, bal int NOT NULL, note text);"
ACC_VIEWS = """
  P_hash: {table: acc, sink: cache, key: "P_:a:{id}", fields: [id, bal, note], format: hash}
  P_search: {table: acc, sink: search, index: Pidx_acc, fields: [id, bal, note]}
"""
FILL = "INSERT INTO acc SELECT g, g * 10, 'n' || g FROM generate_series(1, %s) g"


def cli_verify(config, view: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgderive.cli", "verify", "-c", str(config), view, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def count_of(out: str, label: str) -> int:
    m = re.search(rf"^\s*{re.escape(label)}\s+([\d,]+)\s*$", out, re.M)
    assert m, f"no {label!r} line in:\n{out}"
    return int(m.group(1).replace(",", ""))


def verify_api(config, view: str, **kw):
    spec = load_spec(config)
    with psycopg.connect(spec.source.dsn, autocommit=True) as conn:
        (v,) = build_views(spec, conn, [view])
    sinks = open_sinks(spec, [v])
    try:
        return verify_view(spec.source.dsn, v, sinks[v.sink], slot=spec.source.slot, **kw)
    finally:
        for s in sinks.values():
            s.close()


def os_client() -> OpenSearch:
    return OpenSearch([OPENSEARCH_URL])


def test_equal_views_verify_with_exit_0(scenario):
    s = scenario(ACC, ACC_VIEWS)
    s.sql(FILL, (500,))
    s.start()
    s.sql("UPDATE acc SET bal = bal + 1 WHERE id % 7 = 0")
    s.sql("DELETE FROM acc WHERE id % 50 = 0")
    s.sql("INSERT INTO acc VALUES (1000, 1, NULL)")
    for view in (f"{s.p}_hash", f"{s.p}_search"):
        out = cli_verify(s.config, view)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "EQUAL" in out.stdout and "NOT EQUAL" not in out.stdout
        assert count_of(out.stdout, "source rows") == 491
        assert count_of(out.stdout, "sink records") == 491
        assert "caught up with the snapshot" in out.stdout
    out = cli_verify(s.config, "no_such_view")
    assert out.returncode == 2 and "unknown view" in out.stderr


def test_tampered_sinks_are_reported_with_examples(scenario):
    s = scenario(ACC, ACC_VIEWS)
    s.sql(FILL, (300,))
    s.start()
    s.caught_up()
    p = s.p
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(f"{p}_:a:7")                                    # missing (its version entry stays)
    r.hset(f"{p}_:a:8", "bal", "999")                        # different
    r.hset(f"{p}_:a:9", mapping={"zzz": "1"})                # different: a field too many
    r.hset(f"{p}_:a:x1", mapping={"id": "1", "bal": "2"})    # extra ...
    r.hset(versions_key(f"{p}_hash", deployment(s.config)), f"{p}_:a:x1", "0000000000000001")  # ... with a version entry
    es = os_client()
    alias = f"{p.lower()}_acc"
    es.delete(index=alias, id="17")                          # missing (OpenSearch forgets its version)
    es.index(index=alias, id="18", body={"id": 18, "bal": -1, "note": "n18"})   # different
    es.index(index=alias, id="extra1", body={"id": 0, "bal": 0, "note": None})  # extra

    out = cli_verify(s.config, f"{p}_hash")
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    print(text)
    assert (count_of(text, "missing"), count_of(text, "extra"), count_of(text, "different")) == (1, 1, 2), text
    assert count_of(text, "source rows") == 300 and "NOT EQUAL: 4 mismatch(es)" in text
    assert f"{p}_:a:7" in text and f"{p}_:a:x1" in text and f"{p}_:a:8" in text
    assert "bal: sink '999' ≠ source '80'" in text and "zzz: sink '1' ≠ source <absent>" in text

    out = cli_verify(s.config, f"{p}_search")
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    print(text)
    assert (count_of(text, "missing"), count_of(text, "extra"), count_of(text, "different")) == (1, 1, 1), text
    assert "bal: sink -1 ≠ source 180" in text and "extra1" in text

    d = verify_api(s.config, f"{p}_search")
    assert (d.missing, d.extra, d.different, d.source_rows) == (1, 1, 1, 300)
    assert {e.kind: e.key for e in d.details} == {"missing": "17", "extra": "extra1", "different": "18"}
    assert d.daemon_caught_up is True

    # Later writes of the daemon fix the records it rewrites.
    s.sql("UPDATE acc SET bal = 0 WHERE id IN (7, 8, 17, 18)")
    s.caught_up()
    d = verify_api(s.config, f"{p}_hash")
    assert (d.missing, d.extra, d.different) == (0, 1, 1), d.examples


def test_repair_while_the_daemon_and_a_writer_run(scenario):
    s = scenario(ACC, ACC_VIEWS)
    s.sql(FILL, (2000,))
    s.start()
    s.caught_up()
    p = s.p
    stop = threading.Event()
    writes = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        rnd = random.Random(7)
        try:
            with psycopg.connect(s.dsn, autocommit=True) as conn:
                while not stop.is_set():
                    i = rnd.randint(1, 120)  # a hot set that overlaps the tampered keys
                    op = rnd.random()
                    with conn.transaction():
                        if op < 0.7:
                            conn.execute("UPDATE acc SET bal = bal + 1, note = %s WHERE id = %s",
                                         (f"w{writes[0]}", i))
                        elif op < 0.85:
                            conn.execute("DELETE FROM acc WHERE id = %s", (i,))
                        else:
                            conn.execute("INSERT INTO acc VALUES (%s, 0, 'ins') ON CONFLICT (id) DO UPDATE "
                                         "SET bal = acc.bal - 1", (i,))
                    writes[0] += 1
                    time.sleep(0.002)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        r = redis.Redis.from_url(REDIS_URL)
        es = os_client()
        alias = f"{p.lower()}_acc"
        tampered = [*range(1, 121, 6), *range(1500, 1530)]  # hot keys the writer races on + cold ones
        for i in tampered:
            r.hset(f"{p}_:a:{i}", "bal", "-5")
            es.index(index=alias, id=str(i), body={"id": i, "bal": -5, "note": "bad"})
        for i in range(1600, 1610):
            r.delete(f"{p}_:a:{i}")
            es.delete(index=alias, id=str(i))
        for i in range(5):
            r.hset(f"{p}_:a:x{i}", "id", "0")
            r.hset(versions_key(f"{p}_hash", deployment(s.config)), f"{p}_:a:x{i}", "0000000000000001")
            es.index(index=alias, id=f"x{i}", body={"id": 0})
        for view in (f"{p}_hash", f"{p}_search"):
            out = cli_verify(s.config, view, "--repair")
            print(out.stdout)
            assert out.returncode == 0, out.stdout + out.stderr
            m = re.search(r"repaired ([\d,]+) record\(s\)", out.stdout)
            assert m and int(m.group(1).replace(",", "")) >= 45, out.stdout  # 30 cold + 10 + 5 at least
            assert out.stdout.count("EQUAL") == 2 and out.stdout.rstrip().endswith("EQUAL")
        time.sleep(1)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert writes[0] > 100
    s.caught_up()
    assert_views_equal(s.config)


def test_a_200k_row_view_verifies_with_bounded_memory(scenario):
    n = 200_000
    s = scenario("CREATE TABLE big (id int PRIMARY KEY, a int, b text, c text);",
                 '  P_big: {table: big, sink: cache, key: "P_:b:{id}", fields: [id, a, b, c], format: hash}\n')
    s.sql(f"INSERT INTO big SELECT g, g % 1000, md5(g::text), 'c' || g FROM generate_series(1, {n}) g")
    s.start()
    proc = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "verify", "-c", str(s.config), f"{s.p}_big"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert count_of(out, "source rows") == n and count_of(out, "sink records") == n
    rate = float(re.search(r"\(([\d,]+) rows/s\)", out).group(1).replace(",", ""))
    print(f"\nverify of {n:,} rows: {rate:,.0f} rows/s, peak RSS {peak / 2**20:.0f} MiB")
    assert peak < 250 * 2**20


def test_sink_get_and_scan_keys(redis_url, opensearch_hosts):
    """The two sink reads verify is built on, for every sink kind and format."""
    from sinks.base import Op, ViewTarget
    from sinks.opensearch import OpenSearchSink
    from sinks.redis import WRONGTYPE_FIELD, RedisSink

    p = f"gv{random.randrange(1 << 30):x}"
    rs = RedisSink("cache", redis_url)
    es = OpenSearchSink("search", opensearch_hosts)
    views = {f"{p}_h": (rs, ViewTarget(f"{p}_h", format="hash")),
             f"{p}_j": (rs, ViewTarget(f"{p}_j", format="json")),
             f"{p}_s": (es, ViewTarget(f"{p}_s", index=f"{p}_s"))}
    try:
        for name, (sink, target) in views.items():
            sink.register(target)
            assert sink.get(name, ["nothing"]) == {"nothing": (None, None)}
            assert list(sink.scan_keys(name)) == []
            doc = {"a": 1, "b": "x", "c": None, "d": {"e": [1.5, 2.5]}}
            assert sink.apply([Op(name, f"{p}:1", 10, doc), Op(name, f"{p}:2", 11, doc),
                               Op(name, f"{p}:3", 12, doc)]) == []
            assert sink.apply([Op(name, f"{p}:2", 20, None)]) == []
            want = sink.stored_form(name, doc)
            for realtime in (True, False):
                if not realtime and sink is es:
                    es.refresh(name)
                got = sink.get(name, [f"{p}:1", f"{p}:2", f"{p}:4"], realtime=realtime)
                deleted = (None, 20) if sink is rs else (None, None)  # Redis keeps the tombstone's version
                assert got == {f"{p}:1": (want, 10), f"{p}:2": deleted, f"{p}:4": (None, None)}, (name, got)
            if sink is es:
                es.refresh(name)
            assert sorted(sink.scan_keys(name)) == [(f"{p}:1", 10), (f"{p}:3", 12)]
        r = redis.Redis.from_url(redis_url)
        r.set(f"{p}:1", "not a hash")  # a foreign Redis type under a hash view's key
        (doc, ver), = rs.get(f"{p}_h", [f"{p}:1"]).values()
        assert ver == 10 and WRONGTYPE_FIELD in doc
    finally:
        for name, (sink, _) in views.items():
            sink.drop_view(name)
        rs.close()
        es.close()
