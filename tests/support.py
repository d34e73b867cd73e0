"""Helpers for end-to-end tests: scratch databases, YAML configs, the daemon as a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import psycopg
from psycopg import sql

from cdc.lsn import parse_lsn
from sinks.factory import make_sink
from sinks.base import ViewTarget
from views.check import build_views
from pgderive.runtime.sinks import deployment_of, open_sinks
from views.spec import load_spec
from pgderive.ops.verify import diff_view

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("PGDERIVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5433/postgres")
REDIS_URL = os.environ.get("PGDERIVE_TEST_REDIS_URL", "redis://127.0.0.1:6380/0")
OPENSEARCH_URL = os.environ.get("PGDERIVE_TEST_OPENSEARCH_URL", "http://127.0.0.1:9201")


def db_dsn(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def create_database(name: str) -> str:
    """Create a fresh database ``name``; returns its DSN."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return db_dsn(name)


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            except psycopg.Error:
                pass
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def wait_until(pred: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def lane_processes(pid: int) -> list[int]:
    """Pids of the live lane processes (``multiprocessing`` spawn children) of process ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


class Daemon:
    """``pgderive run`` as a subprocess with its log in ``log_path``."""

    def __init__(self, config: Path, log_path: Path, *extra: str) -> None:
        self.config, self.log_path, self.extra = config, log_path, extra
        self.proc: subprocess.Popen | None = None

    def start(self, *more: str, env: dict[str, str] | None = None) -> "Daemon":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgderive.cli", "run", "-c", str(self.config), *self.extra, *more],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def slot_caught_up(dsn: str, slot: str, target: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
    return row is not None and row[0] is not None and parse_lsn(row[0]) >= target


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def streaming(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('pgderive.slot_state')").fetchone()[0] is None:
            return False
        row = conn.execute("SELECT status FROM pgderive.slot_state WHERE slot = %s", (slot,)).fetchone()
    return row is not None and row[0] == "streaming"


def deployment(config: Path) -> str:
    """The deployment id the daemon of ``config`` namespaces its sink bookkeeping with."""
    return deployment_of(load_spec(config))


def drop_views(config: Path, sink_type: str | None = None) -> None:
    """Remove every view's records and bookkeeping from its sink (only sinks of ``sink_type``
    if given). Works from the YAML alone, without the source catalog, so it also cleans up
    after tests that altered or dropped the tables (the source database must still exist:
    the deployment id is read from it)."""
    spec = load_spec(config)
    dep = deployment_of(spec)
    sinks = {}
    try:
        for name, v in spec.views.items():
            sink = v.sink_name
            if sink_type is not None and spec.sinks[sink].type != sink_type:
                continue
            if sink not in sinks:
                sinks[sink] = make_sink(sink, spec.sinks[sink].model_dump(), deployment=dep)
            shape = v.key_template.shape() if v.key_template is not None else None
            sinks[sink].register(ViewTarget(view=name, format=v.format, index=v.index, key_shape=shape))
            sinks[sink].drop_view(name)
    finally:
        for s in sinks.values():
            s.close()


def diffs(config: Path) -> dict[str, object]:
    """View name → :class:`pgderive.ops.verify.ViewDiff` for every view of ``config``."""
    spec = load_spec(config)
    out = {}
    with psycopg.connect(spec.source.dsn, autocommit=True) as conn:
        views = build_views(spec, conn)
    sinks = open_sinks(spec, views)
    try:
        for v in views:
            if hasattr(sinks[v.sink], "refresh"):
                sinks[v.sink].refresh(v.name)
            out[v.name] = diff_view(spec.source.dsn, v, sinks[v.sink])
    finally:
        for s in sinks.values():
            s.close()
    return out


def assert_views_equal(config: Path, timeout: float = 60.0) -> None:
    """Wait until every view of ``config`` equals its source; fail with examples otherwise."""
    last: dict[str, object] = {}

    def ok() -> bool:
        nonlocal last
        last = diffs(config)
        return all(d.mismatches == 0 for d in last.values())  # type: ignore[attr-defined]

    try:
        wait_until(ok, timeout=timeout, interval=0.5, what="views to equal the source")
    except AssertionError:
        detail = "; ".join(f"{n}: missing={d.missing} extra={d.extra} different={d.different} {d.examples}"  # type: ignore[attr-defined]
                           for n, d in last.items())
        raise AssertionError(f"views differ from the source: {detail}") from None


class Scenario:
    """A scratch database + a YAML config + the daemon, for one test."""

    def __init__(self, tmp_path: Path, schema: str, views: str) -> None:
        self.db = unique("pgd_sem")
        self.dsn = create_database(self.db)
        self.slot = unique("slot")
        self.p = unique("s")
        self.config = tmp_path / "pgderive.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
""" + views.replace("P_", self.p + "_").replace("Pidx", self.p.lower()))
        self.log = tmp_path / "daemon.log"
        self.sql(schema)
        self.daemon: Daemon | None = None

    def sql(self, query: str, params=None):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        self.daemon = Daemon(self.config, self.log).start(env=env)
        def ok() -> bool:
            assert self.daemon.alive(), self.daemon.output()[-3000:]
            return streaming(self.dsn, self.slot)
        wait_until(ok, 120, what="bootstrap")
        return self.daemon

    def caught_up(self, timeout: float = 120) -> None:
        target = current_lsn(self.dsn)

        def ok() -> bool:
            if self.daemon is not None:
                assert self.daemon.alive(), f"daemon exited:\n{self.daemon.output()[-3000:]}"
            return slot_caught_up(self.dsn, self.slot, target)
        wait_until(ok, timeout, what="slot to catch up")

    def close(self) -> None:
        if self.daemon is not None and self.daemon.alive():
            self.daemon.stop()
        drop_views(self.config)
        drop_database(self.db)
