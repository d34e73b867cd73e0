"""``pgderive status --json`` and ``--watch`` against a real source, sinks and daemon (issue 16,
part 2): the JSON document lists every view with its records and the slot's confirmed LSN while
the daemon streams, shows the slot inactive once it stopped; ``--watch`` redraws the tables
until Ctrl-C (exit 0, no traceback), on a terminal and into a pipe; ``--json --watch`` is a
usage error (2); an unreachable source is one line on stderr (1), also with ``--json``."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from cdc.lsn import parse_lsn

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, create_database, current_lsn, drop_database,
                       drop_views, slot_caught_up, streaming, wait_until)

pytestmark = pytest.mark.slow

REDIS_DB12 = REDIS_URL.rsplit("/", 1)[0] + "/12"
ROWS = 300


class Env:
    """A scratch database ``stj_…`` with table ``acc``, a config with a Redis view (db 12) and an
    OpenSearch view (index ``stj-…``), and the daemon."""

    def __init__(self, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.db = f"stj_{tag}"
        self.dsn = create_database(self.db)
        self.slot = f"stj_{tag}"
        self.views = [f"stj_{tag}_cache", f"stj_{tag}_search"]
        self.config = tmp / "stj.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}}}
sinks:
  cache: {{type: redis, url: "{REDIS_DB12}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
  {self.views[0]}: {{table: acc, sink: cache, key: "stj_{tag}:acc:{{id}}", fields: [bal], format: hash}}
  {self.views[1]}: {{table: acc, sink: search, index: stj-{tag}-acc, fields: [bal]}}
""")
        self.sql(f"CREATE TABLE acc (id int PRIMARY KEY, bal int NOT NULL);"
                 f"INSERT INTO acc SELECT g, g FROM generate_series(1, {ROWS}) g")
        self.daemon = Daemon(self.config, tmp / "daemon.log")
        self.next_id = ROWS + 1

    def sql(self, query: str) -> list[tuple[object, ...]] | None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else None

    def write(self) -> None:
        """One transaction: an insert and an update (moves the WAL and the confirmed LSN)."""
        self.sql(f"INSERT INTO acc VALUES ({self.next_id}, 0); UPDATE acc SET bal = bal + 1 WHERE id = 1")
        self.next_id += 1

    def confirmed(self) -> int:
        rows = self.sql(f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
        assert rows and rows[0][0] is not None
        return parse_lsn(str(rows[0][0]))

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(self.config), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **(env or {})})

    def status_json(self) -> dict:
        out = self.cli("--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)  # stdout is the document and nothing else
        assert isinstance(doc, dict)
        for secret_ish in (self.dsn, "postgresql://", "redis://", OPENSEARCH_URL):
            assert secret_ish not in out.stdout
        return doc

    def close(self) -> None:
        if self.daemon.alive():
            self.daemon.stop()
        try:
            drop_views(self.config)
        finally:
            drop_database(self.db)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("stj"))
    try:
        e.daemon.start()

        def up() -> bool:
            assert e.daemon.alive(), e.daemon.output()[-3000:]
            return streaming(e.dsn, e.slot)
        wait_until(up, 120, what="bootstrap")
        yield e
    finally:
        e.close()


def test_json_while_streaming_lists_every_view_and_the_confirmed_lsn(env: Env) -> None:
    for _ in range(20):
        env.write()
    env.sql("DELETE FROM acc WHERE id BETWEEN 2 AND 6")
    target = current_lsn(env.dsn)
    wait_until(lambda: slot_caught_up(env.dsn, env.slot, target), 60, what="slot to catch up")
    source_rows = env.sql("SELECT count(*) FROM acc")[0][0]  # type: ignore[index]
    assert source_rows == ROWS + 20 - 5
    doc: dict = {}

    def counted() -> bool:  # OpenSearch counts what it has refreshed: give it its refresh interval
        nonlocal doc
        doc = env.status_json()
        return all(v["records"] == source_rows for v in doc["views"])
    wait_until(counted, 30, interval=0.5, what="records to equal the source rows")
    after = env.confirmed()
    slot = doc["slot"]
    assert slot["name"] == env.slot and slot["exists"] is True
    assert slot["active"] is True and isinstance(slot["active_pid"], int) and slot["status"] == "streaming"
    assert target <= parse_lsn(slot["confirmed_lsn"]) <= after  # the slot's row, as "X/Y" text
    assert parse_lsn(slot["restart_lsn"]) <= parse_lsn(slot["confirmed_lsn"]) <= parse_lsn(slot["current_wal_lsn"])
    assert isinstance(slot["lag_bytes"], int) and isinstance(slot["retained_wal_bytes"], int)
    assert "lag_seconds" in slot and parse_lsn(slot["consistent_point_lsn"]) > 0
    assert [v["name"] for v in doc["views"]] == env.views
    for v in doc["views"]:
        assert v["table"] == "public.acc" and v["state"] == "streaming" and v["error"] is None
        assert v["dead_letters"] == 0 and parse_lsn(v["checkpoint_lsn"]) >= parse_lsn(slot["consistent_point_lsn"])
        assert isinstance(v["checkpoint_behind_bytes"], int)
    assert [v["sink"] for v in doc["views"]] == ["cache", "search"]
    assert doc["rebuilds"] == [] and doc["retired_views"] == []
    assert env.slot not in [i["slot"] for i in doc["idle_slots"]]  # read by the daemon


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONFIRMED = re.compile(r"confirmed LSN\s*│\s*([0-9A-F]+/[0-9A-F]+)")


def _plain_env() -> dict[str, str]:
    """The environment without what makes rich pretend (not) to be on a terminal."""
    return {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}


def _write_for(env: Env, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        env.write()
        time.sleep(0.1)


def test_watch_on_a_terminal_redraws_until_ctrl_c(env: Env) -> None:
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "status", "-c", str(env.config), "--watch", "0.5"],
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            env={**_plain_env(), "COLUMNS": "120", "TERM": "xterm-256color"})
    os.close(slave)
    chunks: list[bytes] = []

    def read(timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)
    try:
        deadline = time.monotonic() + 60
        while b"confirmed LSN" not in b"".join(chunks):  # the first frame
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(chunks).decode(errors="replace")
            read(0.5)
        start = time.monotonic()
        while time.monotonic() - start < 2.0:  # writes meanwhile: the confirmed LSN moves
            env.write()
            read(0.1)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        read(1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    raw = b"".join(chunks).decode(errors="replace")
    text = _ANSI.sub("", raw)
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text and "Aborted" not in text, text[-3000:]
    frames = text.count("pgderive status at")
    assert frames >= 3, text[-3000:]  # the first frame and at least two refreshes
    assert "\x1b[" in raw and "A" in "".join(re.findall(r"\x1b\[\d*A", raw)), "no cursor-up: not redrawn in place"
    lsns = _CONFIRMED.findall(text)
    assert len(lsns) >= 3 and len(set(lsns)) >= 2, lsns  # gathered again, not the first facts redrawn
    assert all(v in text for v in env.views)
    assert max(len(line) for line in text.splitlines()) <= 120  # the terminal's width (COLUMNS)


def test_watch_into_a_pipe_prints_each_refresh_until_ctrl_c(env: Env) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "status", "-c", str(env.config), "--watch", "0.5"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_plain_env(), "COLUMNS": "120"})
    try:
        _write_for(env, 4.0)  # interpreter start + the first gathering + a few refreshes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err and "Aborted" not in out + err, err
    assert out.count("pgderive status at") >= 2 and out.count(f"slot {env.slot}") >= 2, out
    assert "\x1b[" not in out  # not a terminal: plain text, one block per refresh
    lsns = _CONFIRMED.findall(out)
    assert len(set(lsns)) >= 2, lsns


def test_json_with_watch_is_a_usage_error(env: Env) -> None:
    for args in (("--json", "--watch"), ("--watch", "0.5", "--json")):
        out = env.cli(*args)
        assert out.returncode == 2, out
        assert "--json and --watch cannot be combined" in out.stderr and out.stdout == ""


def test_json_with_the_source_unreachable_is_one_line_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "down.yaml"
    config.write_text(f"""
source: {{dsn: "postgresql://stj:stj-secret-pw@127.0.0.1:1/stj_none", slot: stj_none, connect_timeout: 2}}
sinks:
  cache: {{type: redis, url: "{REDIS_DB12}"}}
views:
  stj_v: {{table: t, sink: cache, key: "stj_v:{{id}}"}}
""")
    for args in ((), ("--json",)):
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(config), *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("error: cannot reach the source postgresql://stj:***@127.0.0.1:1/stj_none"), lines
        assert "stj-secret-pw" not in out.stderr + out.stdout and out.stdout == ""


def test_json_after_the_daemon_stopped_shows_the_slot_inactive(env: Env) -> None:
    assert env.daemon.stop() == 0, env.daemon.output()[-3000:]
    env.write()  # WAL past the slot's restart LSN: the stopped slot retains it
    doc = env.status_json()
    slot = doc["slot"]
    assert slot["exists"] is True and slot["active"] is False and slot["active_pid"] is None
    assert slot["status"] == "inactive" and slot["lag_seconds"] is None
    assert parse_lsn(slot["confirmed_lsn"]) == env.confirmed()
    assert [v["state"] for v in doc["views"]] == ["inactive", "inactive"]
    idle = {i["slot"]: i for i in doc["idle_slots"]}
    assert env.slot in idle and idle[env.slot]["retained_wal_bytes"] > 0
    assert idle[env.slot]["drop_sql"] == f"SELECT pg_drop_replication_slot('{env.slot}')"
