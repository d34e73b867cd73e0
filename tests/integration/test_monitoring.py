"""The daemon's HTTP endpoint against real components: a Prometheus server scraping it under
pgbench load (and ``promtool check metrics``), ``/healthz`` and ``/readyz`` while Redis is frozen,
the status page rendered by headless Chromium, and no secret in anything served.

Prometheus and Chromium are the Debian packages ``scripts/services.sh`` installs; the test starts
its own Prometheus on a free port. The screenshot lands in ``.services/artifacts/`` (the README
shows a copy, ``docs/status-page.png``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.support import (ROOT, Daemon, assert_views_equal, create_database, drop_database, drop_views,
                           streaming, unique, wait_until)

PASSWORD = "s3cr3t-Monitor-pw"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
ARTIFACTS = ROOT / ".services" / "artifacts"
REDIS_URL = os.environ.get("PGDERIVE_TEST_REDIS_URL", "redis://127.0.0.1:6380/0")
OPENSEARCH_URL = os.environ.get("PGDERIVE_TEST_OPENSEARCH_URL", "http://127.0.0.1:9201")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):  # not listening (yet)
        return 0, b""


class Env:
    """A pgbench database, two views (Redis, OpenSearch), a daemon serving HTTP on a free port."""

    def __init__(self, tmp_path: Path, http: str = "") -> None:
        self.db = unique("pgd_mon")
        plain = create_database(self.db)
        # Trust authentication ignores the password; it is in the DSN so it must be scrubbed.
        self.dsn = plain.replace("postgres@", f"postgres:{PASSWORD}@", 1)
        assert PASSWORD in self.dsn
        self.plain = plain
        self.slot = unique("mon")
        self.p = unique("m")
        self.port = free_port()
        subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", "1", plain], check=True,
                       capture_output=True)
        self.config = tmp_path / "monitor.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
http:
  listen: "127.0.0.1:{self.port}"
{http}
views:
  {self.p}_accounts:
    table: public.pgbench_accounts
    sink: cache
    key: "{self.p}:acc:{{aid}}"
    fields: [aid, bid, abalance]
  {self.p}_tellers:
    table: public.pgbench_tellers
    sink: cache
    key: "{self.p}:tel:{{tid}}"
    fields: [tid, tbalance]
  {self.p}_branches:
    table: public.pgbench_branches
    sink: search
    index: {self.p.lower()}_branches
    fields: {{branch: bid, balance: bbalance}}
""")
        self.daemon = Daemon(self.config, tmp_path / "daemon.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # PGDERIVE_HTTP (off for the other tests) wins over the YAML's listen: the same address.
        self.daemon.start(env={"PGDERIVE_HTTP": f"127.0.0.1:{self.port}"})

        def ok() -> bool:
            assert self.daemon.alive(), self.daemon.output()[-3000:]
            return streaming(self.plain, self.slot)
        wait_until(ok, 120, what="bootstrap")

    def pgbench(self, seconds: int, clients: int = 4) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(PG_BIN / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
                                 "-R", "300", self.plain], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        if self.daemon.alive():
            self.daemon.stop()
        drop_views(self.config)
        drop_database(self.db)


@pytest.fixture
def env(tmp_path: Path):
    envs: list[Env] = []

    def make(http: str = "") -> Env:
        e = Env(tmp_path, http)
        envs.append(e)
        return e
    yield make
    for e in envs:
        e.close()


def prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: pgderive
    static_configs: [{{targets: ["{target}"]}}]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(url + "/-/ready")[0] == 200 if proc.poll() is None else
                   pytest.fail((tmp_path / "prometheus.log").read_text()[-2000:]), 60, what="prometheus")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, url


def query(url: str, expr: str) -> list[dict]:
    code, body = get(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert code == 200, body
    return json.loads(body)["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian prometheus not installed (scripts/services.sh)")
def test_prometheus_scrapes_the_daemon_under_pgbench(env, tmp_path: Path) -> None:
    e = env()
    e.start()
    prom, purl = prometheus(tmp_path, f"127.0.0.1:{e.port}")
    try:
        bench = e.pgbench(25)
    except BaseException:
        prom.kill()
        raise
    try:
        # Prometheus sees the daemon up, changes flowing and a finite lag quantile.
        def flowing() -> bool:
            r = query(purl, "sum(rate(pgderive_changes_total[5s]))")
            return bool(r) and float(r[0]["value"][1]) > 0
        wait_until(flowing, 60, interval=1, what="rate(pgderive_changes_total) > 0")
        assert query(purl, 'up{job="pgderive"}')[0]["value"][1] == "1"
        q = query(purl, 'histogram_quantile(0.99, sum by (le) (rate(pgderive_lag_seconds_bucket{sink="cache"}[10s])))')
        assert q and math.isfinite(float(q[0]["value"][1])), q
        applied = query(purl, f'pgderive_ops_applied_total{{view="{e.p}_accounts"}}')
        assert applied and float(applied[0]["value"][1]) > 0
        retained = query(purl, "pgderive_slot_retained_wal_bytes")
        assert retained and float(retained[0]["value"][1]) >= 0
        # The exposition passes promtool's lint (names, units, _total counters, HELP).
        code, body = get(e.url + "/metrics")
        assert code == 200
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        text = body.decode()
        for name in ("pgderive_transactions_total", "pgderive_changes_total", "pgderive_ops_applied_total",
                     "pgderive_ops_rejected_total", "pgderive_dead_letters_total", "pgderive_sink_retries_total",
                     "pgderive_sink_errors_total", "pgderive_lag_seconds_bucket", "pgderive_source_lag_bytes",
                     "pgderive_slot_retained_wal_bytes", "pgderive_sink_last_commit_timestamp_seconds",
                     "pgderive_batch_ops_bucket", "pgderive_flush_duration_seconds_bucket",
                     "pgderive_backpressure_seconds_total", "process_resident_memory_bytes",
                     "process_cpu_seconds_total", "pgderive_build_info"):
            assert name in text, name
    finally:
        prom.terminate()
        prom.wait(30)
        bench.wait(60)
    assert_views_equal(e.config)
    # Nothing served or logged carries the source's password.
    for path in ("/metrics", "/status", "/", "/healthz", "/readyz"):
        assert PASSWORD not in get(e.url + path)[1].decode(), path
    assert PASSWORD not in e.daemon.output()


def _redis_pid() -> int | None:
    port = int(urllib.parse.urlsplit(REDIS_URL).port or 6379)
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "redis-server" in (p.info.get("name") or "") + cmd and f":{port}" in cmd:
            return p.pid
    return None


@pytest.mark.skipif(_redis_pid() is None, reason="no local Redis process to pause")
def test_health_and_readiness_while_redis_is_frozen(env) -> None:
    e = env("  stall_seconds: 4\n  ready_lag_seconds: 2")
    e.start()
    wait_until(lambda: get(e.url + "/readyz")[0] == 200, 30, what="ready")
    code, body = get(e.url + "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    pid = _redis_pid()
    assert pid is not None
    stop = threading.Event()

    def writes() -> None:
        with psycopg.connect(e.plain, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s", (i % 1000 + 1,))
                i += 1
                time.sleep(0.01)
    w = threading.Thread(target=writes)
    os.kill(pid, signal.SIGSTOP)
    try:
        w.start()
        # Not ready first (the cache falls behind), then unhealthy (it holds a batch too long).
        wait_until(lambda: get(e.url + "/readyz")[0] == 503, 30, what="readyz 503")
        code, body = get(e.url + "/readyz")
        assert json.loads(body)["status"] == "not ready"
        wait_until(lambda: get(e.url + "/healthz")[0] == 503, 40, what="healthz 503")
        doc = json.loads(get(e.url + "/healthz")[1])
        assert doc["status"] == "unhealthy" and doc["problems"], doc
        assert any("cache" in p or "reading loop" in p for p in doc["problems"]), doc
        # The other sink's lane is not the one reported.
        assert not any("sink search" in p for p in doc["problems"]), doc
    finally:
        os.kill(pid, signal.SIGCONT)
        stop.set()
        w.join()
    wait_until(lambda: get(e.url + "/healthz")[0] == 200, 60, what="healthy again")
    wait_until(lambda: get(e.url + "/readyz")[0] == 200, 60, what="ready again")
    assert e.daemon.alive()
    assert_views_equal(e.config)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (scripts/services.sh)")
def test_status_page_renders_in_chromium(env, tmp_path: Path) -> None:
    e = env()
    e.start()
    bench = e.pgbench(12, clients=2)
    time.sleep(11)  # two sparkline samples at least
    bench.wait(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    base = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1100,900"]
    r = subprocess.run([*base, f"--screenshot={shot}", e.url + "/"], capture_output=True, timeout=120)
    assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, r.stderr.decode()[-2000:]
    dom = subprocess.run([*base, "--dump-dom", e.url + "/"], capture_output=True, timeout=120)
    html = dom.stdout.decode()
    assert "<table" in html and "healthy" in html, html[:2000]
    status = json.loads(get(e.url + "/status")[1])
    views = status["daemon"]["views"]
    assert len(views) == 3
    for v in views:
        # Every view is a row of the page: its name, its sink, then its lag in seconds.
        m = re.search(rf'<tr><td class="l">{re.escape(v["name"])}</td><td class="l">([^<]*)</td><td>([0-9.]+)</td>',
                      html)
        assert m is not None, (v["name"], html[:3000])
        assert m.group(1) == v["sink"]
        assert float(m.group(2)) >= 0
    assert "<svg" in html  # the throughput sparkline
    assert PASSWORD not in html
