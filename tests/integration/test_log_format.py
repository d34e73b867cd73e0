"""``--log-format json`` (issue 16, part 3): a real daemon against the real Postgres, Redis and
OpenSearch writes one JSON object per line on standard error, with the context fields where
they apply, from its lane process too (the OpenSearch sink's lane runs in a process of its own
beside Redis), and never the password of its DSN.

The source role is made for this test with a password; the shared cluster trusts 127.0.0.1, so
libpq sends the password and the server does not check it: it is in every connection string
the daemon holds, which is what must not leak. Names: databases and slots ``logj_…``, Redis
database 11, OpenSearch indices ``logj-…``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from ..support import (OPENSEARCH_URL, PG_ADMIN_DSN, REDIS_URL, ROOT, create_database, drop_database,
                       drop_views, streaming, unique, wait_until)

pytestmark = pytest.mark.slow

KEYS = ("time", "level", "logger", "message")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Env:
    """A database with ``public.t`` (a jsonb column the OpenSearch index maps from the first
    rows), a role with a password, and a config with a Redis and an OpenSearch view."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = unique("logj")
        plain = create_database(self.db)
        self.role = unique("logj_role")
        self.password = f"zzLogPw{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(self.role), sql.Literal(self.password)))
        self.admin_dsn = plain
        host = plain.split("@", 1)[1].rsplit("/", 1)[0]
        self.dsn = f"postgresql://{self.role}:{self.password}@{host}/{self.db}"
        self.sql("CREATE TABLE t (id int PRIMARY KEY, v text, j jsonb)",
                 "INSERT INTO t SELECT g, 'row ' || g, jsonb_build_object('n', g) FROM generate_series(1, 200) g")
        self.slot = unique("logj")
        self.prefix = unique("logj")
        self.index = "logj-" + self.prefix.split("_", 1)[1]
        self.cache_view, self.search_view = f"{self.prefix}_cache", f"{self.prefix}_search"
        redis_url = REDIS_URL.rsplit("/", 1)[0] + "/11"
        self.config = tmp_path / "logj.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}, connect_timeout: 5}}
sinks:
  cache: {{type: redis, url: "{redis_url}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
  {self.cache_view}: {{table: t, sink: cache, key: "{self.prefix}:{{id}}", fields: [id, v]}}
  {self.search_view}: {{table: t, sink: search, index: {self.index}, fields: [id, v, j]}}
""")
        self.outputs: list[str] = []

    def sql(self, *statements: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for s in statements:
                conn.execute(s)  # type: ignore[arg-type]

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> "Run":
        return Run(self, name, list(args), env or {})

    def close(self) -> None:
        try:
            drop_views(self.config)
        finally:
            drop_database(self.db)
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.role)))


class Run:
    """``pgderive ARGS`` as a subprocess; standard output and standard error in files of their
    own. ``environ`` is added to the environment; a variable set to ``""`` is removed."""

    def __init__(self, env: Env, name: str, args: list[str], environ: dict[str, str]) -> None:
        self.env = env
        self.out_path, self.err_path = env.tmp / f"{name}.out", env.tmp / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT, stdout=out,
                                         stderr=err, env={k: v for k, v in {**os.environ, **environ}.items() if v})

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, object]]:
        """Every line of standard error as a JSON object (fails naming the first that is not)."""
        out = []
        for n, line in enumerate(self.stderr().splitlines(), 1):
            try:
                value = json.loads(line)
            except ValueError:
                raise AssertionError(f"stderr line {n} is not JSON: {line!r}") from None
            assert isinstance(value, dict), line
            out.append(value)
        return out

    def wait_for(self, pred: object, what: str, timeout: float = 120) -> None:
        def ok() -> bool:
            assert self.proc.poll() is None, f"the daemon exited: {self.stderr()[-3000:]}"
            return bool(pred() if callable(pred) else pred in self.stderr())
        wait_until(ok, timeout, interval=0.3, what=what)

    def stop(self) -> None:
        """SIGTERM; it must exit 0 and leave every output in the test's record."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        text = self.out_path.read_text(errors="replace") + self.stderr()
        self.env.outputs.append(text)
        assert code == 0, text[-3000:]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def check_lines(lines: list[dict[str, object]]) -> None:
    assert lines, "no log line at all"
    for line in lines:
        missing = [k for k in KEYS if k not in line]
        assert not missing, (missing, line)
        assert TIME.match(str(line["time"])), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert str(line["logger"]).startswith("pgderive"), line
        assert "Traceback" not in json.dumps(line), line


def test_the_daemon_logs_json_lines_with_context_and_no_password(env: Env) -> None:
    run = env.start("first", "--log-format", "json", "run", "-c", str(env.config))
    try:
        run.wait_for(lambda: streaming(env.admin_dsn, env.slot), "bootstrap")
        run.wait_for('"streaming slot ', "the stream")
        env.sql("UPDATE t SET v = v || '!' WHERE id <= 20",
                # n was mapped as a number from the first rows: OpenSearch refuses this one, a
                # dead letter recorded (and logged) in the OpenSearch lane's process
                "UPDATE t SET j = '{\"n\": \"not a number\"}' WHERE id = 7")
        run.wait_for('"dead letter: ', "the dead letter's line")
        env.sql("TRUNCATE t")  # after: a TRUNCATE drops the pending Ops of the views it empties
        run.wait_for('"TRUNCATE of ', "the TRUNCATE's line")
    finally:
        run.stop()
    lines = run.lines()
    check_lines(lines)
    by_message = {str(line["message"]): line for line in lines}

    # the source's DSN is logged, with the password masked
    connecting = [m for m in by_message if m.startswith("connecting to the source ")]
    assert connecting and f"{env.role}:***@" in connecting[0], connecting
    # bootstrap progress: view and table
    done = [line for line in lines if re.match(r"snapshot of public\.t.* done: ", str(line["message"]))]
    assert done and all(line.get("table") == "public.t" and line.get("view") for line in done), done
    assert any(env.search_view in str(line["view"]) for line in done), done
    # LSNs as Postgres writes them
    with_lsn = [line for line in lines if "lsn" in line]
    assert with_lsn and all(re.match(r"^[0-9A-F]+/[0-9A-F]+$", str(line["lsn"])) for line in with_lsn), with_lsn
    bootstrap = [line for line in lines if str(line["message"]).startswith("bootstrap done at consistent point ")]
    assert len(bootstrap) == 1 and str(bootstrap[0]["message"]).endswith(str(bootstrap[0]["lsn"])), bootstrap
    # the dead letter, logged by the OpenSearch lane's own process: view, sink, table, lsn
    dead = [line for line in lines if str(line["message"]).startswith("dead letter: ")]
    assert dead, lines
    assert dead[0]["view"] == env.search_view and dead[0]["sink"] == "search", dead
    assert dead[0]["table"] == "public.t" and dead[0]["level"] == "WARNING", dead
    assert "lsn" in dead[0] and "mapper_parsing_exception" in str(dead[0]["message"]), dead
    # the TRUNCATE: each view, with its transaction's LSN and id
    truncates = [line for line in lines if str(line["message"]).startswith("TRUNCATE of public.t")]
    assert {line["view"] for line in truncates} == {env.cache_view, env.search_view}, truncates
    assert all(isinstance(line.get("xid"), int) and "lsn" in line for line in truncates), truncates
    assert any(str(line["message"]).startswith("stopped at confirmed LSN ") and "lsn" in line for line in lines)
    assert env.password not in "\n".join(env.outputs)


def test_the_env_var_and_runs_own_option_choose_json(env: Env) -> None:
    """``PGDERIVE_LOG_FORMAT=json`` alone; then ``run --log-format json`` over
    ``PGDERIVE_LOG_FORMAT=text`` (the command's option wins); then the text default."""
    first = env.start("env", "run", "-c", str(env.config), env={"PGDERIVE_LOG_FORMAT": "json"})
    try:
        first.wait_for(lambda: streaming(env.admin_dsn, env.slot), "bootstrap")
        first.wait_for('"streaming slot ', "the stream")
    finally:
        first.stop()
    check_lines(first.lines())

    second = env.start("option", "run", "--log-format", "json", "-c", str(env.config),
                       env={"PGDERIVE_LOG_FORMAT": "text"})
    try:
        second.wait_for('"streaming slot ', "the stream")
    finally:
        second.stop()
    lines = second.lines()
    check_lines(lines)
    resumed = [line for line in lines if str(line["message"]).startswith("resuming slot ")]
    assert len(resumed) == 1 and "lsn" in resumed[0], lines

    third = env.start("text", "run", "-c", str(env.config), env={"PGDERIVE_LOG_FORMAT": ""})
    try:
        third.wait_for("streaming slot ", "the stream")
    finally:
        third.stop()
    text = third.stderr().splitlines()
    assert text and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +pgderive", line)
                        for line in text), text
    assert env.password not in "\n".join(env.outputs)
