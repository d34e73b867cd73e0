"""Outages and tampering on real services: sinks losing data, a recreated slot, a Postgres
restart, OpenSearch hanging for a minute."""
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


from .support import ROOT, assert_views_equal, drop_views, wait_until
from .test_stream_semantics import scenario  # noqa: F401

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
    out = subprocess.run([sys.executable, "-m", "views.cli", "run", "-c", str(s.config)], cwd=ROOT,
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
