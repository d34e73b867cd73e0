"""The hard cases of the change stream on real services: TOAST, TRUNCATE, schema changes,
replica identity, big transactions, unwatched traffic and poison rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import redis

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, assert_views_equal, current_lsn, diffs,
                      slot_caught_up, streaming, wait_until)

pytestmark = pytest.mark.slow


DOCS_VIEWS = """
  P_hash: {table: docs, sink: cache, key: "P_:d:{id}", fields: [id, title, body, n], format: hash}
  P_json: {table: docs, sink: cache, key: "P_:dj:{id}", fields: [id, title, body, n], format: json}
  P_search: {table: docs, sink: search, index: Pidx_docs, fields: [id, title, body, n]}
"""
DOCS = "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, n int);"


def test_unchanged_toast_values_stay_intact(scenario):
    s = scenario(DOCS, DOCS_VIEWS)
    # Random hex does not compress below the TOAST threshold: stored out of line.
    big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 3125))"
    s.sql(f"INSERT INTO docs VALUES (1, 'a', {big}, 1), (2, 'b', 'small', 2)")
    s.start()
    s.sql(f"INSERT INTO docs VALUES (3, 'c', {big}, 3)")
    # body (100 kB, TOASTed) is unchanged: wal2json omits it from these updates.
    s.sql("UPDATE docs SET title = 'a2', n = 10 WHERE id IN (1, 3)")
    s.caught_up()
    assert_views_equal(s.config)
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert len(r.hget(f"{s.p}_:d:3", "body")) == 100_000 and r.hget(f"{s.p}_:d:3", "title") == "a2"


NUMS = """
CREATE TABLE nums (id int PRIMARY KEY, x float8, y numeric);
CREATE TABLE nofull (a int, y numeric);
ALTER TABLE nofull REPLICA IDENTITY FULL;
"""
NUMS_VIEWS = """
  P_hash: {table: nums, sink: cache, key: "P_:n:{id}", format: hash}
  P_full: {table: nofull, sink: cache, key: "P_:f:{a}", format: json}
"""


def test_streamed_nan_and_infinity_are_read_back_and_converge(scenario):
    """wal2json prints float/numeric NaN and ±Infinity as null; pgderive reads them back from
    the table. Rows changed or deleted after the change (read back later than it happened) and
    real NULLs must still end equal to the source."""
    s = scenario(NUMS, NUMS_VIEWS)
    s.sql("INSERT INTO nums VALUES (0, 0, 0)")
    s.start()
    s.sql("INSERT INTO nums VALUES (1, 'NaN', 'Infinity'), (3, NULL, NULL), (4, '-Infinity', '-Infinity')")
    s.sql("INSERT INTO nofull VALUES (1, 'NaN'), (2, NULL)")
    s.caught_up()
    s.daemon.stop()
    # Applied while the daemon is down: it reads these back after later commits changed them.
    s.sql("UPDATE nums SET x = 'Infinity', y = NULL WHERE id = 1")
    s.sql("UPDATE nums SET x = 5, y = 'NaN' WHERE id = 1")
    s.sql("INSERT INTO nums VALUES (2, 'NaN', 'NaN')")
    s.sql("DELETE FROM nums WHERE id = 2")
    s.sql("UPDATE nums SET y = 'NaN' WHERE id = 3")
    s.sql("UPDATE nums SET y = NULL WHERE id = 3")
    s.sql("UPDATE nofull SET y = 'Infinity' WHERE a = 2")
    s.start()
    s.caught_up()
    assert_views_equal(s.config)
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert r.hgetall(f"{s.p}_:n:1") == {"id": "1", "x": "5.0", "y": "NaN"}
    assert r.hgetall(f"{s.p}_:n:3") == {"id": "3"}  # real NULLs stay NULL (absent in a hash)
    assert r.hgetall(f"{s.p}_:n:4") == {"id": "4", "x": "-Infinity", "y": "-Infinity"}
    assert not r.exists(f"{s.p}_:n:2")
    assert json.loads(r.get(f"{s.p}_:f:1")) == {"a": 1, "y": "NaN"}  # REPLICA IDENTITY FULL
    assert json.loads(r.get(f"{s.p}_:f:2")) == {"a": 2, "y": "Infinity"}


TRUNC_SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY, v text);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent, v text);
CREATE TABLE other (id int PRIMARY KEY, v text);
"""
TRUNC_VIEWS = """
  P_parent: {table: parent, sink: cache, key: "P_:p:{id}", format: hash}
  P_child: {table: child, sink: search, index: Pidx_child}
  P_other: {table: other, sink: cache, key: "P_:o:{id}", format: json}
"""


def test_truncate_cascade_and_several_tables(scenario):
    s = scenario(TRUNC_SCHEMA, TRUNC_VIEWS)
    fill = """INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 50) g;
              INSERT INTO child SELECT g, 1 + g % 50, 'c' || g FROM generate_series(1, 200) g;
              INSERT INTO other SELECT g, 'o' || g FROM generate_series(1, 30) g;"""
    s.sql(fill)
    s.start()
    s.sql("TRUNCATE parent CASCADE")
    s.caught_up()
    assert_views_equal(s.config)
    counts = {k: v.sink_records for k, v in diffs(s.config).items()}
    assert counts[f"{s.p}_parent"] == 0 and counts[f"{s.p}_child"] == 0 and counts[f"{s.p}_other"] == 30
    s.sql(fill.split(";")[0] + ";" + fill.split(";")[1])
    # Inserts before and after a TRUNCATE of two tables in one transaction.
    s.sql("BEGIN; INSERT INTO other VALUES (100, 'gone'); TRUNCATE child, other; "
          "INSERT INTO other VALUES (101, 'kept'); COMMIT;")
    s.caught_up()
    assert_views_equal(s.config)
    r = redis.Redis.from_url(REDIS_URL)
    assert r.exists(f"{s.p}_:o:101") == 1 and r.exists(f"{s.p}_:o:100") == 0 and r.exists(f"{s.p}_:o:5") == 0


def test_schema_changes_while_streaming(scenario):
    s = scenario("CREATE TABLE t (id int PRIMARY KEY, a text, b int, c text);",
                 """
  P_t: {table: t, sink: cache, key: "P_:t:{id}", fields: [id, a, b], format: hash}
  P_ts: {table: t, sink: search, index: Pidx_t, fields: [id, a]}
""")
    s.sql("INSERT INTO t SELECT g, 'a' || g, g, 'c' FROM generate_series(1, 20) g")
    d = s.start()
    s.sql("ALTER TABLE t ADD COLUMN d int")                     # no default
    s.sql("ALTER TABLE t ADD COLUMN e text DEFAULT 'e'")        # with default
    s.sql("INSERT INTO t (id, a, b, d) VALUES (21, 'x', 1, 5)")
    s.sql("ALTER TABLE t DROP COLUMN c")                        # not projected
    s.sql("ALTER TABLE t ALTER COLUMN b TYPE bigint")           # projected, new type
    s.sql("UPDATE t SET b = 9000000000 WHERE id = 2")
    s.sql("CREATE TABLE brand_new (id int PRIMARY KEY); INSERT INTO brand_new VALUES (1)")
    s.caught_up()
    assert_views_equal(s.config)
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert r.hget(f"{s.p}_:t:2", "b") == "9000000000"
    # A projected column renamed away: rows become dead letters, the stream goes on.
    s.sql("ALTER TABLE t RENAME COLUMN a TO a2")
    s.sql("INSERT INTO t (id, a2, b) VALUES (30, 'renamed', 1)")
    s.sql("UPDATE t SET b = 77 WHERE id = 3")
    s.caught_up()
    assert d.alive()
    rows = s.sql("SELECT view, error FROM pgderive.dead_letters WHERE slot = %s", (s.slot,))
    assert rows and all("a" in err and "missing" in err for _, err in rows), rows
    assert {v for v, _ in rows} == {f"{s.p}_t", f"{s.p}_ts"}
    # A projected column dropped: P_t (projects b) dead-letters, P_ts keeps flowing.
    s.sql("ALTER TABLE t RENAME COLUMN a2 TO a")
    s.sql("ALTER TABLE t DROP COLUMN b")
    s.sql("INSERT INTO t (id, a) VALUES (40, 'after drop')")
    s.caught_up()
    assert d.alive()
    errs = s.sql("SELECT error FROM pgderive.dead_letters WHERE slot = %s AND view = %s AND row->>'id' = '40'",
                 (s.slot, f"{s.p}_t"))
    assert errs and "b" in errs[0][0] and "missing" in errs[0][0]
    r = redis.Redis.from_url(REDIS_URL)
    assert r.exists(f"{s.p}_:t:40") == 0
    # The OpenSearch view (id, a) still gets the row.
    from opensearchpy import OpenSearch
    doc = OpenSearch([OPENSEARCH_URL]).get(index=f"{s.p.lower()}_t", id="40")
    assert doc["_source"] == {"id": 40, "a": "after drop"}


def test_replica_identity_full_and_refusal_without_identity(scenario):
    s = scenario("""CREATE TABLE nopk_full (a int, b text); ALTER TABLE nopk_full REPLICA IDENTITY FULL;
                    CREATE TABLE by_index (a int NOT NULL, b text); CREATE UNIQUE INDEX ON by_index (a);
                    ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_a_idx;""",
                 """
  P_full: {table: nopk_full, sink: cache, key: "P_:f:{a}", format: json}
  P_idx: {table: by_index, sink: search, index: Pidx_idx, key: "{a}"}
""")
    s.sql("INSERT INTO nopk_full SELECT g, 'v' FROM generate_series(1, 10) g;"
          "INSERT INTO by_index SELECT g, 'v' FROM generate_series(1, 10) g;")
    s.start()
    s.sql("UPDATE nopk_full SET b = 'w' WHERE a <= 3; DELETE FROM nopk_full WHERE a = 4;"
          "UPDATE by_index SET a = 100 WHERE a = 5; DELETE FROM by_index WHERE a = 6;")
    s.caught_up()
    assert_views_equal(s.config)
    s.daemon.stop()
    # A table without primary key or replica identity is refused with what to change.
    s.sql("CREATE TABLE bare (a int, b text)")
    bad = s.config.parent / "bad.yaml"
    bad.write_text(s.config.read_text() + f'  {s.p}_bare: {{table: bare, sink: cache, key: "b:{{a}}"}}\n')
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "REPLICA IDENTITY" in out.stderr, out.stderr


def test_big_transaction_streams_in_bounded_memory_and_is_confirmed_after(scenario):
    n = int(os.environ.get("PGDERIVE_BIG_TXN_ROWS", "200000"))
    s = scenario("CREATE TABLE big (id int PRIMARY KEY, v int);",
                 '  P_big: {table: big, sink: cache, key: "P_:b:{id}", format: hash}\n')
    s.sql(f"INSERT INTO big SELECT g, 0 FROM generate_series(1, {n}) g")
    d = s.start()
    s.sql("UPDATE big SET v = v + 1")  # one transaction, n changes
    end = current_lsn(s.dsn)  # at or past the transaction's commit record
    proc = psutil.Process(d.proc.pid)
    peak = 0
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    deadline = time.monotonic() + 300
    while not slot_caught_up(s.dsn, s.slot, end):
        peak = max(peak, proc.memory_info().rss)
        assert time.monotonic() < deadline and d.alive()
        time.sleep(0.05)
    # The moment the slot is confirmed past the commit, every row is already applied.
    probe = [r.hget(f"{s.p}_:b:{i}", "v") for i in (1, n // 2, n - 1, n)]
    assert probe == ["1"] * 4, probe
    assert_views_equal(s.config)
    print(f"peak RSS during a {n}-row transaction: {peak / 2**20:.0f} MiB")
    assert peak < 200 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"


def _peak_rss_until_caught_up(s, proc: psutil.Process, timeout: float = 300) -> int:
    end, peak = current_lsn(s.dsn), 0
    deadline = time.monotonic() + timeout
    while not slot_caught_up(s.dsn, s.slot, end):
        peak = max(peak, proc.memory_info().rss)
        assert time.monotonic() < deadline and s.daemon.alive(), s.daemon.output()[-2000:]
        time.sleep(0.05)
    return peak


def test_wide_rows_stream_in_bounded_memory(scenario):
    """1,500 rows of 100 kB (150 MB) in the snapshot, 1,500 more in one transaction, then all
    updated in another: snapshot chunks, decoder chunks and batches are bounded by bytes too,
    not only by row count."""
    s = scenario("CREATE TABLE wide (id int PRIMARY KEY, body text);",
                 '  P_w: {table: wide, sink: cache, key: "P_:w:{id}", format: json}\n')
    big = "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 3125 + 0 * g) i)"
    s.sql(f"INSERT INTO wide SELECT g, {big} FROM generate_series(1501, 3000) g")
    d = Daemon(s.config, s.log).start()
    s.daemon = d
    proc = psutil.Process(d.proc.pid)
    peak_snapshot = 0
    while not streaming(s.dsn, s.slot):
        peak_snapshot = max(peak_snapshot, proc.memory_info().rss)
        assert d.alive(), d.output()[-2000:]
        time.sleep(0.05)
    s.sql(f"INSERT INTO wide SELECT g, {big} FROM generate_series(1, 1500) g")
    peak_insert = _peak_rss_until_caught_up(s, proc)
    s.sql("UPDATE wide SET body = upper(body)")  # 3,000 rows, 300 MB
    peak_update = _peak_rss_until_caught_up(s, proc)
    r = redis.Redis.from_url(REDIS_URL)
    doc = json.loads(r.get(f"{s.p}_:w:777"))
    assert len(doc["body"]) == 100_000 and doc["body"] == doc["body"].upper()
    assert_views_equal(s.config)
    print(f"peak RSS with 150 MB of 100 kB rows: snapshot {peak_snapshot / 2**20:.0f} MiB, "
          f"insert {peak_insert / 2**20:.0f} MiB, update {peak_update / 2**20:.0f} MiB")
    assert max(peak_snapshot, peak_insert, peak_update) < 200 * 2**20


def test_unwatched_traffic_keeps_the_slot_advancing(scenario):
    s = scenario("CREATE TABLE watched (id int PRIMARY KEY); CREATE TABLE noise (id bigserial PRIMARY KEY, pad text);",
                 '  P_w: {table: watched, sink: cache, key: "P_:w:{id}", format: hash}\n')
    s.start()
    for _ in range(10):  # ~150 MB of WAL on a table no view reads
        s.sql("INSERT INTO noise (pad) SELECT repeat('n', 100) FROM generate_series(1, 100000)")
    end = current_lsn(s.dsn)
    wait_until(lambda: slot_caught_up(s.dsn, s.slot, end), 120, what="keepalives to advance the slot")
    s.sql("CHECKPOINT")
    s.sql("INSERT INTO watched VALUES (1)")  # lets the slot's restart_lsn move on
    s.caught_up()
    retained = s.sql("SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = %s",
                     (s.slot,))[0][0]
    assert retained < 64 * 2**20, f"slot retains {retained} bytes of WAL"


def test_poison_rows_become_dead_letters_and_the_stream_goes_on(scenario):
    s = scenario("CREATE TABLE p (id int PRIMARY KEY, code text, meta jsonb);",
                 """
  P_code: {table: p, sink: cache, key: "P_:c:{code}", fields: [id, code], format: hash}
  P_ps: {table: p, sink: search, index: Pidx_p, fields: [id, meta]}
""")
    # P_code's key needs `code` (not the replica identity): refused up front.
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(s.config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "replica identity" in out.stderr
    s.sql("ALTER TABLE p REPLICA IDENTITY FULL")
    s.sql("""INSERT INTO p VALUES (1, 'a', '{"x": 1}'), (2, NULL, '{"x": 2}')""")  # NULL key column: poison
    d = s.start()
    s.sql("""INSERT INTO p VALUES (3, NULL, '{"x": 3}'), (4, 'd', '{"x": 4}')""")
    s.sql("""INSERT INTO p VALUES (5, 'e', '{"x": "not a number"}')""")  # OpenSearch mapped x as long
    s.sql("""INSERT INTO p VALUES (6, 'f', '{"x": 6}')""")
    s.caught_up()
    assert d.alive()
    rows = s.sql("SELECT view, sink_key, error, row->>'id' FROM pgderive.dead_letters WHERE slot = %s ORDER BY id",
                 (s.slot,))
    by_view = {}
    for view, key, err, rid in rows:
        by_view.setdefault(view, []).append((rid, err))
    assert sorted(r for r, _ in by_view[f"{s.p}_code"]) == ["2", "3"]
    assert [r for r, _ in by_view.get(f"{s.p}_ps", [])] == ["5"], rows
    r = redis.Redis.from_url(REDIS_URL)
    assert r.exists(f"{s.p}_:c:f") == 1 and r.exists(f"{s.p}_:c:d") == 1
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(s.config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "dead" in out.stdout.lower(), out.stdout
