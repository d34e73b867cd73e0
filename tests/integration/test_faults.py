"""Outages and tampering on real services: sinks losing data, a recreated slot, a Postgres
restart, OpenSearch hanging for a minute, Redis restarting and Redis throttled."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import psycopg
import pytest
import redis

from ..support import (REDIS_URL, ROOT, assert_views_equal, current_lsn, drop_views, slot_caught_up,
                      wait_until)

pytestmark = pytest.mark.slow

SCHEMA = "CREATE TABLE acc (id int PRIMARY KEY, bal int, note text);"
VIEWS = """
  P_h: {table: acc, sink: cache, key: "P_:a:{id}", fields: [id, bal], format: hash}
  P_j: {table: acc, sink: cache, key: "P_:aj:{id}", format: json}
  P_s: {table: acc, sink: search, index: Pidx_acc, fields: [id, bal, note]}
"""


def seed(s, n: int = 500) -> None:
    s.sql(f"INSERT INTO acc SELECT g, g, 'n' || g FROM generate_series(1, {n}) g")


def lose_redis_views(s) -> None:
    """What a Redis restart without its AOF does to pgderive's views: records, versions and
    checkpoints gone (per view, so other tests' data on the shared Redis survives)."""
    drop_views(s.config, sink_type="redis")


def test_redis_lost_its_data_while_the_daemon_was_down(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    s.sql("UPDATE acc SET bal = bal + 1 WHERE id <= 100")
    s.caught_up()
    d.stop()
    lose_redis_views(s)
    s.sql("DELETE FROM acc WHERE id <= 10")
    d = s.start()
    s.caught_up()
    assert_views_equal(s.config)
    assert "rebuilding them first" in d.output()


def test_redis_lost_its_data_while_streaming(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    lose_redis_views(s)
    # Keep writing: the daemon notices the missing checkpoints and rebuilds the views.
    for i in range(30):
        s.sql("UPDATE acc SET bal = bal + 1 WHERE id = %s", (i + 1,))
        time.sleep(0.3)
    s.caught_up()
    assert_views_equal(s.config, timeout=60)
    assert "lost data" in d.output() and d.alive()


def test_a_recreated_slot_is_refused(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    d.stop()
    s.sql("SELECT pg_drop_replication_slot(%s)", (s.slot,))
    s.sql("UPDATE acc SET bal = 0 WHERE id = 1")  # a change the new slot will never show
    s.sql("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (s.slot,))
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "run", "-c", str(s.config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "recreated" in out.stderr and "--resnapshot" in out.stderr
    # The explicit way forward works.
    d = s.daemon = type(d)(s.config, s.log, "--resnapshot").start()
    s.caught_up()
    assert_views_equal(s.config)


def _pg_data_dir() -> str | None:
    path = ROOT / ".services" / "pg" / "data"
    return str(path) if (path / "postmaster.pid").exists() else None


@pytest.mark.skipif(_pg_data_dir() is None, reason="Postgres not started by scripts/services.sh")
def test_postgres_restart_while_streaming(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    pg_ctl = ["/usr/lib/postgresql/15/bin/pg_ctl", "-D", _pg_data_dir(), "-m", "fast", "-w", "restart",
              "-l", str(ROOT / ".services" / "log" / "postgres.log")]
    cmd = pg_ctl if os.getuid() != 0 else ["su", "-s", "/bin/bash", "pgderive", "-c", " ".join(pg_ctl)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    wait_until(lambda: _answers(s.dsn), 60, what="postgres to come back")
    s.sql("UPDATE acc SET bal = -1 WHERE id <= 50")
    s.sql("DELETE FROM acc WHERE id > 490")
    s.caught_up()
    assert_views_equal(s.config)
    assert d.alive() and "reconnecting" in d.output()


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _opensearch_pid() -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "org.opensearch.bootstrap.OpenSearch" in cmd:
            return p.pid
    return None


@pytest.mark.skipif(_opensearch_pid() is None, reason="no local OpenSearch process to pause")
def test_opensearch_unavailable_for_a_minute(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    proc = psutil.Process(d.proc.pid)
    pid = _opensearch_pid()
    stop = threading.Event()

    def writes() -> None:
        i = 0
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE acc SET bal = bal + 1 WHERE id = %s", (i % 500 + 1,))
                i += 1
    w = threading.Thread(target=writes)
    rss = []
    os.kill(pid, signal.SIGSTOP)  # hung, not refusing: the harder case for clients
    try:
        w.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            rss.append(proc.memory_info().rss)
            assert d.alive(), d.output()[-2000:]
            time.sleep(1)
    finally:
        os.kill(pid, signal.SIGCONT)
        stop.set()
        w.join()
    s.caught_up(180)
    assert_views_equal(s.config, timeout=120)
    print(f"daemon RSS during the outage: {min(rss) / 2**20:.0f}-{max(rss) / 2**20:.0f} MiB")
    assert "retrying" in d.output()


@pytest.mark.skipif(_opensearch_pid() is None, reason="no local OpenSearch process to pause")
def test_checkpoint_waits_out_a_hung_opensearch(opensearch_hosts, caplog):
    """A checkpoint that times out is retried like a batch, not fatal (CI once lost the daemon
    this way: the batch landed just before OpenSearch hung, then its checkpoint timed out)."""
    from sinks.base import ViewTarget
    from sinks.opensearch import OpenSearchSink
    from pgderive.runtime.checkpoints import advance_checkpoints

    sink = OpenSearchSink("search", opensearch_hosts, timeout=1.0)
    view = f"t_cp_{os.getpid()}_{int(time.time())}"
    sink.register(ViewTarget(view, index=f"pgd-test-cp-{os.getpid()}-{int(time.time())}"))
    try:
        sink.write_checkpoint([view], 0x10)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                advance_checkpoints(sink, [view], 0x10, 0x20, threading.Event())
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        pid = _opensearch_pid()
        os.kill(pid, signal.SIGSTOP)
        t = threading.Thread(target=run)
        try:
            with caplog.at_level("WARNING", logger="pgderive.lanes"):
                t.start()
                time.sleep(3.5)  # > 2 client timeouts of 1 s
                assert t.is_alive() and not errors, errors
        finally:
            os.kill(pid, signal.SIGCONT)
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert sink.read_checkpoint(view) == 0x20
        assert any("checkpoint failed" in r.getMessage() and "retrying" in r.getMessage()
                   for r in caplog.records)
    finally:
        sink.drop_view(view)
        sink.close()


def _redis_server() -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline", "name"]):
        if (p.info["name"] or "").startswith("redis-server") and "6380" in " ".join(p.info["cmdline"] or []):
            return p
    return None


@pytest.mark.skipif(_redis_server() is None or not (ROOT / ".services" / "redis").exists(),
                    reason="Redis not started by scripts/services.sh")
def test_redis_restart_while_streaming(scenario):
    s = scenario(SCHEMA, VIEWS)
    seed(s)
    d = s.start()
    subprocess.run(["redis-cli", "-p", "6380", "shutdown"], capture_output=True, timeout=30)  # saves, AOF kept
    wait_until(lambda: _redis_server() is None, 30, what="redis to stop")
    s.sql("UPDATE acc SET bal = bal * 2 WHERE id <= 200")  # written while Redis is down
    time.sleep(2)
    subprocess.run([str(ROOT / "scripts" / "services.sh"), "up"], check=True, capture_output=True, timeout=300)
    s.sql("DELETE FROM acc WHERE id <= 20")
    s.caught_up(120)
    assert_views_equal(s.config)
    assert d.alive() and "retrying" in d.output()


def test_slow_redis_gets_backpressure_not_a_growing_queue(scenario):
    """Redis throttled for real (``CLIENT PAUSE … WRITE`` for 1.9 s of every 2 s: writes and
    scripts wait, reads go on) under a 60k-row backlog: the daemon stops reading the slot
    instead of queueing (the slot falls behind, RSS stays flat), says so, and converges."""
    s = scenario(SCHEMA, """
  P_h: {table: acc, sink: cache, key: "P_:a:{id}", format: hash}
  P_j: {table: acc, sink: cache, key: "P_:aj:{id}", format: json}
""")
    seed(s, 10)
    d = s.start()
    proc = psutil.Process(d.proc.pid)
    r = redis.Redis.from_url(REDIS_URL)
    stop = threading.Event()

    def throttle() -> None:
        while not stop.is_set():
            r.execute_command("CLIENT", "PAUSE", 1900, "WRITE")
            time.sleep(2.0)
    t = threading.Thread(target=throttle)
    rss, behind = [], []
    t.start()
    try:
        for i in range(60):  # 60 transactions of 1000 rows, ~400 bytes each
            s.sql(f"INSERT INTO acc SELECT g, g, repeat(md5(g::text), 12) "
                  f"FROM generate_series({1000 + i * 1000}, {1999 + i * 1000}) g")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            rss.append(proc.memory_info().rss)
            behind.append(not slot_caught_up(s.dsn, s.slot, current_lsn(s.dsn)))
            assert d.alive(), d.output()[-2000:]
            time.sleep(0.5)
    finally:
        stop.set()
        t.join()
        r.execute_command("CLIENT", "UNPAUSE")
    s.caught_up(300)
    assert_views_equal(s.config, timeout=120)
    print(f"daemon RSS while Redis was throttled: {min(rss) / 2**20:.0f}-{max(rss) / 2**20:.0f} MiB")
    print(f"slot behind in {sum(behind)} of {len(behind)} samples")
    assert sum(behind) >= 10, "the slot caught up at once while Redis was throttled: not throttled"
    assert max(rss) < 200 * 2**20, f"RSS grew to {max(rss) / 2**20:.0f} MiB under a slow sink"
    assert "sink cache is the bottleneck" in d.output(), d.output()[-3000:]
