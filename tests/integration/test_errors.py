"""Errors reach the user as one clear line with the documented exit code, never a traceback; a
Postgres that never answers and a stalling OpenSearch neither hang nor kill the daemon, and the
first SIGTERM stops it at every phase without leaving a slot behind (issue 14, items 4 and 5).

The misbehaving servers are local fakes (tests/integration/fake_servers.py); the shared
services are never stopped or paused.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cdc.snapshot import snapshot_connection
from views.spec import load_spec

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, assert_views_equal, create_database, drop_database,
                       drop_views, streaming, unique, wait_until)
from .fake_servers import OpenSearchProxy, SilentPostgres, TcpProxy

pytestmark = pytest.mark.slow


def pgderive(*args: str, timeout: float = 60, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pgderive.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def terminate(proc: subprocess.Popen[bytes], within: float) -> tuple[int, float]:
    """SIGTERM once; the exit code and how long the process took to exit."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the first SIGTERM did not stop the process within {within} s")
    return code, time.monotonic() - t0


def slots(dsn: str, slot: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s", (slot + "%",))]


def closed_port() -> int:
    """A local port nothing listens on (bound, never listened, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text[-3000:]


class Source:
    """A scratch database with one table and a config over it."""

    def __init__(self, tmp_path: Path, rows: int = 100, **source: object) -> None:
        self.db = unique("pgd_err")
        self.dsn = create_database(self.db)
        self.slot = unique("slot_err")
        self.prefix = unique("err")
        self.alias = self.prefix.lower()
        self.tmp = tmp_path
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))
        self.source = source
        self.configs: list[Path] = []

    def config(self, *, dsn: str | None = None, hosts: str = OPENSEARCH_URL, search: bool = True,
               name: str = "c.yaml", **source: object) -> Path:
        extra = "".join(f", {k}: {v}" for k, v in {**self.source, **source}.items())
        text = f"""
source: {{dsn: "{dsn or self.dsn}", slot: {self.slot}{extra}}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{hosts}"]}}
views:
  {self.prefix}_cache: {{table: t, sink: cache, key: "{self.prefix}:{{id}}"}}
""" + (f"  {self.prefix}_search: {{table: t, sink: search, index: {self.alias}}}\n" if search else "")
        path = self.tmp / name
        path.write_text(text)
        self.configs.append(path)
        return path

    def close(self) -> None:
        for c in self.configs:
            # a config may point at a fake or proxy that is gone: drop from the real services
            c.write_text(re.sub(r'hosts: \["[^"]*"\]', f'hosts: ["{OPENSEARCH_URL}"]', c.read_text()))
            try:
                drop_views(c)
            except Exception:
                pass
        drop_database(self.db)


@pytest.fixture
def src(tmp_path: Path):
    s = Source(tmp_path)
    yield s
    s.close()


# ----------------------------------------------------------------------------- item 4

def test_config_problems_are_one_line_with_yaml_path_exit_2(src: Source, tmp_path: Path) -> None:
    mods = tmp_path / "errmods"
    mods.mkdir()
    (mods / "__init__.py").write_text("")
    (mods / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    (mods / "broken.py").write_text("def f(:\n")
    good = src.config(search=False).read_text()
    cases = {
        "derive_raises": (good.replace('key: "', 'format: json, derive: "errmods.raises:f", key: "'),
                          ":7: views.", ".derive: cannot import errmods.raises: it raised RuntimeError: boom at import"),
        "derive_syntax": (good.replace('key: "', 'format: json, derive: "errmods.broken:f", key: "'),
                          ":7: views.", ".derive: cannot import errmods.broken: SyntaxError in "),
        "redis_port": (good.replace("6380/0", "63x80/0"), ":4: sinks.cache.url: invalid URL",
                       "the port '63x80' is not a number from 1 to 65535"),
        "opensearch_port": (good.replace("9201", "92x01"), ":5: sinks.search.hosts[0]: invalid URL",
                            "the port '92x01' is not a number from 1 to 65535"),
        "source_port": (good.replace("127.0.0.1:5433", "127.0.0.1:54x32"), ":2: source.dsn: port must be an integer",
                        "from 1 to 65535 (or a comma-separated list), got '54x32'"),
        "recursive_anchor": (good + "extra: &a {x: *a}\n", ": recursive alias", "contains itself"),
        "deep_nesting": (good + "extra: " + "[" * 3000 + "]" * 3000 + "\n", ": nested deeper than 64 levels",
                         "refusing the file"),
    }
    for name, (text, first, second) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        for command in ("validate", "status", "run"):
            proc, secs = pgderive(command, "-c", str(path), cwd=tmp_path)  # derive: the cwd is on sys.path
            assert proc.returncode == 2, (name, command, proc.stderr)
            no_traceback(proc.stderr + proc.stdout)
            lines = [line for line in proc.stderr.splitlines() if " INFO " not in line]
            assert len(lines) == 1 and lines[0].startswith(str(path)), (name, command, proc.stderr)
            assert first in lines[0] and second in lines[0], (name, command, lines[0])
            assert secs < 30
    assert slots(src.dsn, src.slot) == []


def test_unreachable_opensearch_status_is_one_line(src: Source) -> None:
    port = closed_port()
    config = src.config(hosts=f"http://127.0.0.1:{port}")
    proc, _ = pgderive("status", "-c", str(config))
    assert proc.returncode == 0, proc.stderr  # status shows what it can
    no_traceback(proc.stderr)
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"sink search: count {src.prefix}_search: OpenSearch unavailable" in warnings[0]
    assert "? (SinkError)" in proc.stdout


def test_unreachable_opensearch_at_start_fails_fast_without_a_slot(src: Source, tmp_path: Path) -> None:
    # The preflight finds the sink down before anything is created: one line, exit 1, no slot.
    port = closed_port()
    log = tmp_path / "run.log"
    proc = start("run", "-c", str(src.config(hosts=f"http://127.0.0.1:{port}")), log=log)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        terminate(proc, within=10)
        raise AssertionError("run did not fail fast: " + log.read_text()[-2000:])
    out = log.read_text()
    no_traceback(out)
    assert code == 1, out
    assert "sink search: OpenSearch unreachable" in out, out
    assert slots(src.dsn, src.slot) == []


def test_opensearch_failing_during_bootstrap_is_retried_then_sigterm(src: Source, tmp_path: Path) -> None:
    # OpenSearch answers the preflight, then refuses every _bulk with 503: the bootstrap retries
    # (one line per retry) until SIGTERM, which stops it at once and drops its slot.
    proxy = OpenSearchProxy(OPENSEARCH_URL, lambda method, path: 503 if "_bulk" in path else None)
    log = tmp_path / "run.log"
    proc = start("run", "-c", str(src.config(hosts=proxy.url)), log=log)
    try:
        wait_until(lambda: log.read_text().count("retrying in") >= 3, 60, what="three retries")
    finally:
        code, secs = terminate(proc, within=10)
        proxy.close()
    out = log.read_text()
    no_traceback(out)
    assert code == 0 and secs < 5, out
    assert f"dropped slot {src.slot}" in out, out
    assert slots(src.dsn, src.slot) == []  # the unfinished bootstrap's slot is gone
    # the next start redoes the bootstrap
    assert not streaming(src.dsn, src.slot)


def test_opensearch_stall_during_bootstrap_is_retried(src: Source, tmp_path: Path) -> None:
    # The proxy answers the first requests, then refuses the snapshot's _bulk requests with 429
    # and 503 for 3 s, as a node under pressure does; the bootstrap must wait it out, not exit.
    t_fail: list[float] = []

    def fail(method: str, path: str) -> int | None:
        if "_bulk" not in path:
            return None
        if not t_fail:
            t_fail.append(time.monotonic())
        if time.monotonic() - t_fail[0] < 3:
            return 429 if len(t_fail) % 2 else 503
        return None

    proxy = OpenSearchProxy(OPENSEARCH_URL, fail)
    log = tmp_path / "run.log"
    config = src.config(hosts=proxy.url)
    proc = start("run", "-c", str(config), log=log)
    try:
        wait_until(lambda: streaming(src.dsn, src.slot) or proc.poll() is not None, 90, what="bootstrap")
        assert proc.poll() is None, log.read_text()[-3000:]
        assert_views_equal(config)
    finally:
        code, secs = terminate(proc, within=15)
        proxy.close()
    out = log.read_text()
    no_traceback(out)
    assert proxy.failed >= 1 and "retrying in" in out
    assert code == 0, out
    assert slots(src.dsn, src.slot) == [src.slot]


# ----------------------------------------------------------------------------- item 5

def silent_config(tmp_path: Path, port: int, *, connect_timeout: int) -> Path:
    """A config whose source is the fake Postgres on ``port`` that never answers."""
    config = tmp_path / "c.yaml"
    config.write_text(f"""
source: {{dsn: "postgresql://postgres@127.0.0.1:{port}/db", slot: s_silent, connect_timeout: {connect_timeout}}}
sinks: {{cache: {{type: redis, url: "{REDIS_URL}"}}}}
views: {{v: {{table: t, sink: cache, key: "v:{{id}}"}}}}
""")
    return config


def test_silent_postgres_times_out_with_a_log_line(tmp_path: Path) -> None:
    fake = SilentPostgres()
    try:
        config = silent_config(tmp_path, fake.port, connect_timeout=3)
        for command in ("validate", "status"):
            proc, secs = pgderive(command, "-c", str(config))
            assert proc.returncode == 1, proc.stderr
            no_traceback(proc.stderr)
            assert 2.5 < secs < 15, secs
            assert f"still connecting to the source postgresql://postgres@127.0.0.1:{fake.port}/db" in proc.stderr
            assert proc.stderr.strip().splitlines()[-1] == (
                f"error: cannot reach the source postgresql://postgres@127.0.0.1:{fake.port}/db:"
                " connection timeout expired")
        assert fake.accepted >= 2
    finally:
        fake.close()


def test_sigterm_while_connecting_to_a_silent_postgres(tmp_path: Path) -> None:
    fake = SilentPostgres()
    try:
        config = silent_config(tmp_path, fake.port, connect_timeout=0)
        log = tmp_path / "run.log"
        proc = start("run", "-c", str(config), log=log)
        wait_until(lambda: "still connecting to the source" in log.read_text(), 20, what="the waiting line")
        code, secs = terminate(proc, within=5)
        out = log.read_text()
        no_traceback(out)
        assert code == 1 and secs < 3, out
        assert out.strip().splitlines()[-1] == ("error: interrupted by SIGTERM while connecting to the source;"
                                                " nothing was started (no slot was left behind)")
    finally:
        fake.close()


def test_sigterm_while_the_source_waits_for_a_transaction(src: Source, tmp_path: Path) -> None:
    # Creating a logical slot (the wal2json probe, then the slot itself) waits for every running
    # transaction that has an xid: an idle-in-transaction session blocks it indefinitely.
    holder = psycopg.connect(src.dsn)
    holder.execute("INSERT INTO t VALUES (0, 'held')")
    log = tmp_path / "run.log"
    try:
        proc = start("run", "-c", str(src.config(search=False)), log=log)
        wait_until(lambda: "(waiting for transactions running on the source to end?)" in log.read_text()
                   or "it waits for transactions running" in log.read_text(), 30, what="the waiting line")
        code, secs = terminate(proc, within=5)
        out = log.read_text()
        with psycopg.connect(src.dsn, autocommit=True) as conn:  # checked while the transaction still runs
            left = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                (src.db,)).fetchall()
    finally:
        holder.rollback()
        holder.close()
    no_traceback(out)
    assert code == 1 and secs < 3, out
    assert "error: interrupted by SIGTERM while" in out.strip().splitlines()[-1]
    # psycopg cancelled the statement: no slot at all, not even the probe's temporary one
    assert left == []


def test_sigterm_during_bootstrap_and_while_streaming(src: Source, tmp_path: Path) -> None:
    # Bootstrap: every _bulk fails with 503 (retried); SIGTERM stops it at once, drops the slot.
    proxy = OpenSearchProxy(OPENSEARCH_URL, lambda m, p: 503 if "_bulk" in p else None)
    log = tmp_path / "run.log"
    try:
        proc = start("run", "-c", str(src.config(hosts=proxy.url)), log=log)
        wait_until(lambda: "retrying in" in log.read_text(), 60, what="a retried _bulk")
        code, secs = terminate(proc, within=10)
    finally:
        proxy.close()
    out = log.read_text()
    no_traceback(out)
    assert code == 0 and secs < 5, out
    assert slots(src.dsn, src.slot) == []
    # Streaming: a normal run, then SIGTERM: a graceful stop, exit 0, the slot kept (and no other).
    config = src.config(name="c2.yaml")
    log2 = tmp_path / "run2.log"
    proc = start("run", "-c", str(config), log=log2)
    wait_until(lambda: streaming(src.dsn, src.slot) or proc.poll() is not None, 90, what="bootstrap")
    assert proc.poll() is None, log2.read_text()[-3000:]
    code, secs = terminate(proc, within=10)
    assert code == 0 and secs < 5, log2.read_text()[-3000:]
    no_traceback(log2.read_text())
    assert slots(src.dsn, src.slot) == [src.slot]


def test_sigterm_while_reconnecting_to_a_silent_postgres(src: Source, tmp_path: Path) -> None:
    # The daemon streams through a proxy; the proxy cuts every connection and then accepts new
    # ones without answering: the daemon reconnects, says it waits, and the first SIGTERM ends it.
    proxy = TcpProxy(5433)
    try:
        dsn = src.dsn.replace("127.0.0.1:5433", f"127.0.0.1:{proxy.port}")
        assert dsn != src.dsn
        log = tmp_path / "run.log"
        proc = start("run", "-c", str(src.config(dsn=dsn, search=False, connect_timeout=0)), log=log)
        wait_until(lambda: streaming(src.dsn, src.slot) or proc.poll() is not None, 90, what="bootstrap")
        assert proc.poll() is None, log.read_text()[-3000:]
        wait_until(lambda: "streaming slot" in log.read_text(), 30, what="streaming")
        proxy.go_silent()
        wait_until(lambda: "still reconnecting to the source" in log.read_text(), 60, what="the waiting line")
        code, secs = terminate(proc, within=5)
    finally:
        proxy.close()
    out = log.read_text()
    no_traceback(out)
    assert "replication connection lost" in out
    assert code == 0 and secs < 3, out
    assert "interrupted by SIGTERM while reconnecting to the source" in out
    wait_until(lambda: slots(src.dsn, src.slot) == [src.slot], 10, what="the slot to be released")


def test_sigterm_while_streaming_to_a_hung_opensearch(src: Source, tmp_path: Path) -> None:
    # OpenSearch stops answering _bulk while the daemon streams: the first SIGTERM still stops
    # it within seconds (exit 0), confirming only what both sinks acknowledged; a restart with
    # OpenSearch back replays the rest and the views converge.
    hang = threading.Event()
    release = threading.Event()

    def fail(method: str, path: str) -> int | None:
        if hang.is_set() and "_bulk" in path:
            release.wait(60)
            return 503  # never applied: only the restart's replay can bring the change
        return None

    proxy = OpenSearchProxy(OPENSEARCH_URL, fail)
    config = src.config(hosts=proxy.url)
    log = tmp_path / "run.log"
    try:
        proc = start("run", "-c", str(config), log=log)
        wait_until(lambda: streaming(src.dsn, src.slot) or proc.poll() is not None, 90, what="bootstrap")
        assert proc.poll() is None, log.read_text()[-3000:]
        hang.set()
        with psycopg.connect(src.dsn, autocommit=True) as conn:
            conn.execute("UPDATE t SET v = 'changed' WHERE id <= 10")
        time.sleep(2)  # the search lane is now inside a hung _bulk
        code, secs = terminate(proc, within=15)
        out = log.read_text()
        no_traceback(out)
        assert code == 0 and secs < 9, out[-3000:]
        assert "stopping: sink(s) search did not acknowledge within 5 s" in out
        release.set()
        hang.clear()
        proc = start("run", "-c", str(config), log=log)
        try:
            wait_until(lambda: log.read_text().count("streaming slot") >= 2 or proc.poll() is not None, 60,
                       what="the restart to stream")
            assert proc.poll() is None, log.read_text()[-3000:]
            assert_views_equal(config)
        finally:
            code, _ = terminate(proc, within=15)
        assert code == 0
    finally:
        release.set()
        proxy.close()


def test_statement_timeout_spares_the_bootstrap_copy(tmp_path: Path) -> None:
    src = Source(tmp_path, rows=300_000)
    try:
        strict = load_spec(src.config(search=False, statement_timeout=0.2, name="strict.yaml"))
        # bookkeeping connections carry the limit …
        with psycopg.connect(strict.source.conninfo(), autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "200ms"
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(1)")
        # … the data path's do not, and a snapshot transaction lifts any limit it inherited
        with psycopg.connect(strict.source.conninfo(statement_timeout=False), autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
        with snapshot_connection(strict.source.conninfo(), None) as conn:
            conn.execute("SELECT pg_sleep(0.5)")
        # A real bootstrap whose COPY (300k rows: 1.4-1.8 s measured) outlasts the limit. The
        # limit is 1 s, not 0.2 s: on a loaded machine pgderive's own bookkeeping statements
        # may take a few hundred ms, and must not be what fails here.
        config = src.config(search=False, statement_timeout=1, connect_timeout=5)
        log = tmp_path / "run.log"
        proc = start("run", "-c", str(config), log=log)
        wait_until(lambda: streaming(src.dsn, src.slot) or proc.poll() is not None, 120, what="bootstrap")
        assert proc.poll() is None, log.read_text()[-3000:]
        code, _ = terminate(proc, within=10)
        out = log.read_text()
        assert code == 0, out[-3000:]
        # One line per view whether or not the table was split into key ranges (it is when the
        # planner's estimate, present once autovacuum analyzed the table, exceeds split_rows).
        assert re.search(r"snapshot of view \S+ done: 300000 records in", out), out[-3000:]
        assert "statement timeout" not in out
    finally:
        src.close()
