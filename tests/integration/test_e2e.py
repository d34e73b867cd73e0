"""End-to-end: Postgres (wal2json slot) → pgderive daemon → real Redis and OpenSearch."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis

from cdc.changes import Transaction
from cdc.slot import SlotReader
from pgderive.runtime.sinks import open_sinks
from pgderive.runtime.lanes import Lanes
from pgderive.runtime.stats import Stats
from pgderive.runtime.stream import Stream, row_refetcher
from views.check import build_views
from views.spec import load_spec

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, assert_views_equal, create_database,
                      current_lsn, diffs, drop_database, drop_views, lane_processes, process_alive, slot_caught_up,
                      streaming, unique, wait_until)

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int, price numeric(12,2),
                    tags text[], meta jsonb, updated timestamptz DEFAULT now());
CREATE TABLE unwatched (id serial PRIMARY KEY, payload text);
"""


def config_text(dsn: str, slot: str, prefix: str, alias: str) -> str:
    return f"""
source:
  dsn: {dsn}
  slot: {slot}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
  {prefix}_hash:
    table: public.items
    sink: cache
    key: "{prefix}:item:{{id}}"
    fields: [id, name, qty, price]
    format: hash
  {prefix}_json:
    table: items
    sink: cache
    key: "{prefix}:itemjson:{{id}}"
    fields: {{ident: id, label: name, quantity: qty, tags: tags, meta: meta}}
    format: json
  {prefix}_search:
    table: public.items
    sink: search
    index: {alias}
    fields: {{item_id: id, name: name, qty: qty, price: price, updated: updated}}
"""


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.db = unique("pgd_e2e")
        self.dsn = create_database(self.db)
        self.slot = unique("slot")
        self.prefix = unique("t")
        self.alias = unique("items").lower()
        self.config = tmp_path / "pgderive.yaml"
        self.config.write_text(config_text(self.dsn, self.slot, self.prefix, self.alias))
        self.log = tmp_path / "daemon.log"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)

    def sql(self, query: str, params=None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)

    def daemon(self) -> Daemon:
        return Daemon(self.config, self.log, "--stats-file", str(self.log.with_suffix(".json")))

    def wait_streaming(self, d: Daemon, timeout: float = 120) -> None:
        def ok() -> bool:
            assert d.alive(), f"daemon exited:\n{d.output()[-3000:]}"
            return streaming(self.dsn, self.slot)
        wait_until(ok, timeout, what="bootstrap to finish")

    def caught_up(self, timeout: float = 60) -> None:
        target = current_lsn(self.dsn)
        wait_until(lambda: slot_caught_up(self.dsn, self.slot, target), timeout, what="slot to catch up")


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    drop_views(e.config)
    drop_database(e.db)


def seed(env: Env, n: int, start: int = 1) -> None:
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO items (id, name, qty, price, tags, meta)
               SELECT g, 'item ' || g, g %% 100, (g * 1.25)::numeric(12,2),
                      ARRAY['a' || (g %% 3), 'b'], jsonb_build_object('g', g, 'even', g %% 2 = 0)
                 FROM generate_series(%s::int, %s::int) g""", (start, start + n - 1))


def random_writes(env: Env, n: int, seed_: int, max_id: int, stop: threading.Event | None = None,
                  progress: list[int] | None = None) -> int:
    """Random inserts/updates/deletes (incl. NULLs and key moves), one per transaction.

    ``progress[0]`` (if given) counts the statements done so far."""
    rnd = random.Random(seed_)
    done = 0
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        for _ in range(n):
            if stop is not None and stop.is_set():
                break
            i = rnd.randint(1, max_id)
            r = rnd.random()
            if r < 0.3:
                conn.execute("INSERT INTO items (id, name, qty) VALUES (%s, %s, %s) ON CONFLICT (id) DO "
                             "UPDATE SET name = excluded.name", (i, f"new {i}", rnd.choice([None, i])))
            elif r < 0.75:
                conn.execute("UPDATE items SET qty = coalesce(qty, 0) + 1, price = %s, name = name || '!' "
                             "WHERE id = %s", (rnd.choice([None, "3.10", "99999.99"]), i))
            elif r < 0.9:
                conn.execute("DELETE FROM items WHERE id = %s", (i,))
            else:
                j = rnd.randint(max_id + 1, max_id * 2)
                conn.execute("UPDATE items SET id = %s WHERE id = %s AND NOT EXISTS "
                             "(SELECT 1 FROM items WHERE id = %s)", (j, i, j))
            done += 1
            if progress is not None:
                progress[0] = done
    return done


def test_bootstrap_then_stream_inserts_updates_deletes(env: Env):
    seed(env, 2000)
    d = env.daemon().start()
    try:
        env.wait_streaming(d)
        assert_views_equal(env.config)
        seed(env, 500, start=5001)
        env.sql("UPDATE items SET qty = NULL, name = 'renamed' WHERE id <= 100")
        env.sql("DELETE FROM items WHERE id BETWEEN 101 AND 300")
        env.sql("UPDATE items SET id = id + 100000 WHERE id BETWEEN 301 AND 310")  # key changes
        env.sql("INSERT INTO unwatched (payload) SELECT 'x' FROM generate_series(1, 1000)")
        env.caught_up()
        assert_views_equal(env.config)
        r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        assert r.exists(f"{env.prefix}:item:150") == 0          # deleted
        assert r.exists(f"{env.prefix}:item:305") == 0          # moved away
        assert r.hgetall(f"{env.prefix}:item:100305")["id"] == "100305"
        assert "qty" not in r.hgetall(f"{env.prefix}:item:5")  # NULL field removed
        assert r.hget(f"{env.prefix}:item:5", "name") == "renamed"
    finally:
        code = d.stop()
    assert code == 0, d.output()[-3000:]
    # Graceful stop flushed everything: the slot is confirmed at least to where we caught up.
    assert "stopped at confirmed LSN" in d.output()


def test_writes_during_bootstrap_all_arrive(env: Env):
    seed(env, 150_000)
    stop = threading.Event()
    d = env.daemon().start()
    progress = [0]
    writer = threading.Thread(target=random_writes, args=(env, 100_000, 1, 150_000, stop, progress))
    try:
        # Start writing as soon as the slot exists, i.e. while the snapshot is being loaded.
        wait_until(lambda: slot_caught_up(env.dsn, env.slot, 0) or not d.alive(), 60, 0.05, "slot creation")
        writer.start()
        env.wait_streaming(d, timeout=300)
        during = progress[0]
        time.sleep(1)  # and a little more while streaming
        stop.set()
        writer.join()
        assert during > 100, f"only {during} writes happened during the bootstrap"
        env.caught_up(120)
        assert_views_equal(env.config, timeout=120)
    finally:
        stop.set()
        d.stop()


def test_kill9_mid_stream_then_restart_converges(env: Env):
    seed(env, 5000)
    d = env.daemon().start()
    env.wait_streaming(d)
    stop = threading.Event()
    writer = threading.Thread(target=random_writes, args=(env, 6000, 2, 5000, stop))
    writer.start()
    try:
        for _ in range(3):
            time.sleep(1.5)
            d.kill9()
            d = env.daemon().start()
        writer.join()
        env.caught_up(120)
        assert_views_equal(env.config, timeout=120)
        assert "resuming slot" in d.output()
    finally:
        stop.set()
        writer.join()
        d.stop()


def test_the_opensearch_lane_runs_in_a_process_that_ends_with_the_daemon(env: Env):
    """Beside a Redis sink the OpenSearch lane gets a process of its own (lane: auto); it
    applies the stream, stops with the daemon, and dies with a daemon killed with SIGKILL."""
    seed(env, 300)
    d = env.daemon().start()
    env.wait_streaming(d)
    assert d.proc is not None
    wait_until(lambda: len(lane_processes(d.proc.pid)) == 1, 30, what="the OpenSearch lane's process")
    [child] = lane_processes(d.proc.pid)
    random_writes(env, 300, 11, 300)
    env.caught_up()
    assert_views_equal(env.config)
    d.kill9()
    wait_until(lambda: not process_alive(child), 10, what="the lane process to die with the daemon")

    d = env.daemon().start()  # resumes; its new lane process applies what the old one had not
    env.wait_streaming(d)
    random_writes(env, 300, 12, 300)
    env.caught_up()
    assert_views_equal(env.config)
    [child] = lane_processes(d.proc.pid)
    assert d.stop() == 0
    assert not process_alive(child)
    assert "Traceback" not in d.output()
    assert "did not stop within" not in d.output()  # an idle lane process stops when asked


def test_replaying_a_stream_suffix_leaves_sinks_unchanged(env: Env):
    seed(env, 1000)
    d = env.daemon().start()
    env.wait_streaming(d)
    replay_slot = unique("replay")
    env.sql("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (replay_slot,))
    random_writes(env, 1500, 3, 1000)
    env.caught_up()
    d.stop()
    assert_views_equal(env.config)
    before = {name: d_.sink_records for name, d_ in diffs(env.config).items()}

    # Re-apply the suffix after replay_slot's start through the engine's own derivation path.
    spec = load_spec(env.config)
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        views = build_views(spec, conn)
    sinks = open_sinks(spec, views)
    reader = SlotReader(env.dsn, replay_slot, tables=["public.items"])
    reader.connect()
    reader.start(0)
    lanes = Lanes(sinks, {}, threading.Event())  # no views: replaying moves no checkpoint
    refetcher = row_refetcher(env.dsn, views)
    stream = Stream(views, lanes, stats=Stats(), stop=threading.Event(), refetcher=refetcher)
    target = current_lsn(env.dsn)
    seen = 0
    deadline = time.monotonic() + 60
    while reader.received_lsn < target and time.monotonic() < deadline:
        for ev in reader.read(max_wait=1.0):
            if isinstance(ev, Transaction):
                stream.add_transaction(ev)
                seen += 1
        stream.drain()
    reader.close()
    lanes.close()
    refetcher.close()
    # The walsender may outlive the closed connection by a moment; the slot is busy until then.
    def released() -> bool:
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (replay_slot,)).fetchone()
        return row is not None and not row[0]
    wait_until(released, 10, what="replay slot released")
    env.sql("SELECT pg_drop_replication_slot(%s)", (replay_slot,))
    for s in sinks.values():
        s.close()
    assert reader.received_lsn >= target and seen > 1000
    after = diffs(env.config)
    assert {n: x.sink_records for n, x in after.items()} == before
    assert all(x.mismatches == 0 for x in after.values()), {n: x.examples for n, x in after.items()}


def test_offline_rebuild_repairs_a_damaged_view(env: Env):
    seed(env, 800)
    d = env.daemon().start()
    env.wait_streaming(d)
    d.stop()
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(f"{env.prefix}:item:7")
    r.hset(f"{env.prefix}:item:8", "name", "tampered")
    bad = diffs(env.config)[f"{env.prefix}_hash"]
    assert bad.missing == 1 and bad.different == 1
    env.sql("DELETE FROM items WHERE id = 9")
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "rebuild", "-c", str(env.config),
                          f"{env.prefix}_hash"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rebuilt" in out.stdout
    d = env.daemon().start()
    try:
        env.caught_up()
        assert_views_equal(env.config)
    finally:
        d.stop()


def test_status_reports_slot_and_lag(env: Env):
    seed(env, 10)
    d = env.daemon().start()
    try:
        env.wait_streaming(d)
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(env.config)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "confirmed LSN" in out.stdout and "bytes" in out.stdout
        assert f"{env.prefix}_hash" in out.stdout and "streaming" in out.stdout
    finally:
        d.stop()


def test_validate_names_the_yaml_path_of_an_error(env: Env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(env.config.read_text().replace('key: "' + env.prefix + ':item:{id}"',
                                                  'key: "' + env.prefix + ':item:{idd}"'))
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(bad)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"views.{env.prefix}_hash.key" in out.stderr and "unknown column 'idd'" in out.stderr
    good = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(env.config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr


def test_vanished_slot_stops_with_a_clear_error(env: Env):
    seed(env, 10)
    d = env.daemon().start()
    env.wait_streaming(d)
    d.stop()
    env.sql("SELECT pg_drop_replication_slot(%s)", (env.slot,))
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "run", "-c", str(env.config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "vanished" in out.stderr and "--resnapshot" in out.stderr


def test_dropped_replication_connection_is_retried_and_resumes(env: Env):
    seed(env, 100)
    d = env.daemon().start()
    try:
        env.wait_streaming(d)
        def walsender() -> int | None:
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                                   (env.slot,)).fetchone()
            return row[0] if row else None

        for round_ in range(2):
            # "streaming" is recorded before START_REPLICATION: wait for the walsender.
            wait_until(lambda: walsender() is not None, 30, what="the daemon's walsender")
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (walsender(),))
            env.sql("UPDATE items SET qty = %s WHERE id <= 50", (1000 + round_,))
            env.sql("DELETE FROM items WHERE id = %s", (90 + round_,))
            env.caught_up(60)
            assert_views_equal(env.config)
        assert d.alive()
        assert "reconnecting" in d.output()
    finally:
        d.stop()
