"""Preflight, least privilege and slot hygiene (issue 14, items 1 and 2), on the real services.

Every command runs as a subprocess (``python -m pgderive.cli``) with the DSN of a
least-privilege role made for the test: LOGIN REPLICATION and SELECT on the views' tables, no
CREATE on the database (Postgres 15 no longer grants CREATE on schema public to PUBLIC either).
The role and the database are unique per test and dropped at the end; so are the slots.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sinks.opensearch import OpenSearchSink
from ..support import (OPENSEARCH_URL, PG_ADMIN_DSN, REDIS_URL, ROOT, Daemon, create_database,
                           drop_database, drop_views, streaming, unique, wait_until)

pytestmark = pytest.mark.slow


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Env:
    tmp: Path
    db: str
    admin_dsn: str  # superuser, on the test database
    role: str
    dsn: str  # the least-privilege role, on the test database
    p: str  # unique prefix for slots, views and keys

    def sql(self, query: str | sql.Composable, params: tuple[object, ...] | None = None) -> list[tuple]:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def config(self, views: str, *, slot: str | None = None, redis_url: str = REDIS_URL,
               opensearch_url: str = OPENSEARCH_URL, name: str = "pgderive.yaml") -> Path:
        path = self.tmp / name
        path.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {slot or self.p + '_slot'}}}
sinks:
  cache: {{type: redis, url: "{redis_url}"}}
  search: {{type: opensearch, hosts: ["{opensearch_url}"]}}
views:
""" + views.replace("P_", self.p + "_"))
        return path

    def slots(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT slot_name FROM pg_replication_slots WHERE database = %s "
                                       "ORDER BY 1", (self.db,))]

    def slot_state(self) -> list[tuple]:
        if self.sql("SELECT to_regclass('pgderive.slot_state')")[0][0] is None:
            return []
        return self.sql("SELECT slot, status FROM pgderive.slot_state ORDER BY 1")

    def grant(self, statement: str) -> None:
        self.sql(sql.SQL(statement).format(role=sql.Identifier(self.role)))

    def init(self, *extra: str) -> subprocess.CompletedProcess[str]:
        out = cli("init", "-c", str(self.config(VIEWS, name="init.yaml")), "--dsn", self.admin_dsn, *extra)
        assert out.returncode == 0, out.stderr
        return out


VIEWS = """
  P_acc: {table: acc, sink: cache, key: "P_acc:{aid}"}
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    db = unique("pgd_pf")
    admin_dsn = create_database(db)
    role = unique("pgd_pf_role")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    e = Env(tmp_path, db, admin_dsn, role, make_conninfo(admin_dsn, user=role), unique("pf"))
    e.sql("""CREATE TABLE acc (aid int PRIMARY KEY, bal int);
             INSERT INTO acc SELECT g, g * 10 FROM generate_series(1, 20) g;
             CREATE TABLE secret (id int PRIMARY KEY, v text);
             CREATE TABLE noise (id int PRIMARY KEY, pad text)""")
    e.grant("GRANT SELECT ON acc TO {role}")
    try:
        yield e
    finally:
        drop_database(db)  # drops its slots first
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def lines(out: subprocess.CompletedProcess[str]) -> str:
    return out.stdout + out.stderr


def assert_clean(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in lines(out), lines(out)


# -- validate ---------------------------------------------------------------------------------

def test_validate_reports_every_problem_at_once(env: Env) -> None:
    """Unreachable Redis and OpenSearch, a table without SELECT, a role without REPLICATION and
    no CREATE on the database: all reported in one run, exit code 1 (a service unreachable)."""
    env.grant("ALTER ROLE {role} NOREPLICATION")
    config = env.config("""
  P_acc: {table: acc, sink: cache, key: "P_acc:{aid}"}
  P_secret: {table: secret, sink: search, index: P_secret}
""", redis_url=f"redis://127.0.0.1:{closed_port()}/0", opensearch_url=f"http://127.0.0.1:{closed_port()}")
    out = cli("validate", "-c", str(config))
    text = lines(out)
    assert out.returncode == 1, text
    assert_clean(out)
    assert "sinks.cache: sink cache: Redis unreachable" in text
    assert "sinks.search: sink search: OpenSearch unreachable" in text
    assert f'views.{env.p}_secret.table: view {env.p}_secret: role "{env.role}" lacks SELECT on public.secret' in text
    assert f'role "{env.role}" lacks the REPLICATION attribute' in text
    assert f'role "{env.role}" lacks CREATE on database {env.db}' in text
    assert "pgderive init" in text
    assert env.slots() == []  # the plugin probe's temporary slot is gone too
    assert env.sql("SELECT to_regnamespace('pgderive')")[0][0] is None


def test_validate_missing_select_names_view_and_table_exit_2(env: Env) -> None:
    env.init("--owner", env.role)
    config = env.config("""
  P_acc: {table: acc, sink: cache, key: "P_acc:{aid}"}
  P_secret: {table: secret, sink: cache, key: "P_secret:{id}"}
""")
    out = cli("validate", "-c", str(config))
    assert out.returncode == 2, lines(out)
    assert_clean(out)
    assert (f'views.{env.p}_secret.table: view {env.p}_secret: role "{env.role}" lacks SELECT on public.secret'
            in out.stderr), out.stderr
    assert f"{env.p}_acc:" not in out.stderr  # SELECT on acc is granted: no problem reported for it
    env.grant("GRANT SELECT ON secret TO {role}")
    out = cli("validate", "-c", str(config))
    assert out.returncode == 0, lines(out)
    assert "OK (2 view(s)" in out.stdout


def test_validate_missing_replication_exit_2(env: Env) -> None:
    env.init("--owner", env.role)
    env.grant("ALTER ROLE {role} NOREPLICATION")
    out = cli("validate", "-c", str(env.config(VIEWS)))
    assert out.returncode == 2, lines(out)
    assert_clean(out)
    assert f'source.dsn: role "{env.role}" lacks the REPLICATION attribute' in out.stderr
    assert "ALTER ROLE" in out.stderr


def test_validate_malformed_redis_port_is_a_config_error(env: Env) -> None:
    config = env.config(VIEWS, redis_url="redis://:hunter2@127.0.0.1:63x80/0")
    out = cli("validate", "-c", str(config))
    assert out.returncode == 2, lines(out)
    assert_clean(out)
    assert "sinks.cache.url: invalid URL " in out.stderr
    assert "the port '63x80' is not a number from 1 to 65535" in out.stderr
    assert "hunter2" not in lines(out)


def test_validate_refused_redis_credentials_are_a_config_error(env: Env) -> None:
    """A Redis ACL user (made for the test, deleted after) with a wrong password, and a database
    index the server does not have: exit 2, the password never printed."""
    env.init("--owner", env.role)
    user = unique("pgd_pf_acl")
    r = redis.Redis.from_url(REDIS_URL)
    r.execute_command("ACL", "SETUSER", user, "on", ">right-pw-1", "~*", "+@all")
    try:
        host = REDIS_URL.split("://", 1)[1].split("/", 1)[0]
        out = cli("validate", "-c", str(env.config(VIEWS, redis_url=f"redis://{user}:wrong-pw-2@{host}/0")))
        assert out.returncode == 2, lines(out)
        assert "sinks.cache: sink cache: Redis refused the credentials" in out.stderr
        assert "wrong-pw-2" not in lines(out)
        out = cli("validate", "-c", str(env.config(VIEWS, redis_url=f"redis://{user}:right-pw-1@{host}/0")))
        assert out.returncode == 0, lines(out)
        out = cli("validate", "-c", str(env.config(VIEWS, redis_url=f"redis://{host}/999")))
        assert out.returncode == 2, lines(out)
        assert "sinks.cache: sink cache: Redis refused the connection: DB index is out of range" in out.stderr
    finally:
        r.execute_command("ACL", "DELUSER", user)
        r.close()


def test_validate_refuses_an_alias_clashing_with_pgderive_indices(env: Env) -> None:
    own = OpenSearchSink("probe", [OPENSEARCH_URL]).checkpoint_index  # read from the sink: configurable
    env.init("--owner", env.role)
    config = env.config(f"""
  P_a: {{table: acc, sink: search, index: {own}}}
  P_b: {{table: acc, sink: search, index: Pidx_b}}
  P_c: {{table: acc, sink: search, index: Pidx_b-g0123456789abcdef}}
""".replace("Pidx", env.p))
    out = cli("validate", "-c", str(config))
    assert out.returncode == 2, lines(out)
    assert_clean(out)
    assert f"views.{env.p}_a.index: view {env.p}_a: index '{own}' is the index pgderive keeps" in out.stderr
    assert (f"views.{env.p}_c.index: view {env.p}_c: index '{env.p}_b-g0123456789abcdef' has the form of a "
            f"generation index of view {env.p}_b's alias") in out.stderr
    assert f"views.{env.p}_b.index" not in out.stderr


# -- run --------------------------------------------------------------------------------------

def test_run_without_privileges_or_sinks_creates_nothing(env: Env) -> None:
    """No CREATE on the database and no schema yet: exit 2 before anything exists. After
    `pgderive init`, an unreachable Redis: exit 1, still no slot."""
    config = env.config(VIEWS)
    out = cli("run", "-c", str(config))
    assert out.returncode == 2, lines(out)
    assert_clean(out)
    assert f'lacks CREATE on database {env.db}' in out.stderr
    assert env.slots() == [] and env.sql("SELECT to_regnamespace('pgderive')")[0][0] is None

    env.init("--owner", env.role)
    config = env.config(VIEWS, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    out = cli("run", "-c", str(config))
    assert out.returncode == 1, lines(out)
    assert_clean(out)
    assert "sinks.cache: sink cache: Redis unreachable" in out.stderr
    assert env.slots() == []
    assert env.slot_state() == []


def test_failed_bootstrap_drops_its_slot_and_a_retry_starts_clean(env: Env) -> None:
    """The snapshot query fails midway (a `where` dividing by zero for one row, as Postgres
    would): the slot the bootstrap created and pgderive's record of it are dropped; the same
    failure again is reported the same way (not as an unfinished bootstrap); once the row is
    fixed the next start bootstraps."""
    env.init("--owner", env.role)
    config = env.config("""
  P_acc: {table: acc, sink: cache, key: "P_acc:{aid}", where: "100 / (aid - 3) <> 0"}
""")
    for _ in range(2):
        out = cli("run", "-c", str(config))
        assert out.returncode == 1, lines(out)
        assert env.slots() == []
        assert env.slot_state() == []
        assert "division by zero" in out.stderr
        assert f"dropped slot {env.p}_slot and pgderive's record of it" in out.stderr
        assert "did not finish; starting it again" not in out.stderr
    env.sql("DELETE FROM acc WHERE aid = 3")
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        wait_until(lambda: streaming(env.dsn, f"{env.p}_slot"), 60, what="bootstrap")
        assert daemon.alive(), daemon.output()
        assert env.slots() == [f"{env.p}_slot"]
    finally:
        assert daemon.stop() == 0, daemon.output()
        drop_views(config)


def test_least_privilege_role_runs_after_init_with_owner(env: Env) -> None:
    """LOGIN REPLICATION + SELECT, no CREATE on the database: `pgderive init --owner` by an
    admin, then the role bootstraps and streams. A SELECT revoked afterwards is caught by
    validate and by the next start, naming the view, and the slot is kept (it is streaming)."""
    out = env.init("--owner", env.role)
    assert f"owned by {env.role}" in out.stdout
    assert env.sql("SELECT has_database_privilege(%s, current_database(), 'CREATE')", (env.role,)) == [(False,)]
    config = env.config(VIEWS)
    r = redis.Redis.from_url(REDIS_URL)
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        wait_until(lambda: streaming(env.dsn, f"{env.p}_slot") or not daemon.alive(), 60, what="bootstrap")
        assert daemon.alive(), daemon.output()
        env.sql("INSERT INTO acc VALUES (100, 1000)")
        wait_until(lambda: r.hget(f"{env.p}_acc:100", "bal") == b"1000", 30, what="the streamed row")
        assert daemon.stop() == 0, daemon.output()

        env.grant("REVOKE SELECT ON acc FROM {role}")
        message = f'view {env.p}_acc: role "{env.role}" lacks SELECT on public.acc'
        out = cli("validate", "-c", str(config))
        assert out.returncode == 2 and message in out.stderr, lines(out)
        out = cli("run", "-c", str(config))
        assert out.returncode == 2 and message in out.stderr, lines(out)
        assert_clean(out)
        assert env.slots() == [f"{env.p}_slot"]  # a streaming slot is never dropped for this
    finally:
        if daemon.alive():
            daemon.stop()
        r.close()
        drop_views(config)


def test_least_privilege_role_runs_with_the_documented_grants(env: Env) -> None:
    """The README's other way: `pgderive init` without --owner, then the grants it lists."""
    env.init()
    for statement in ("GRANT USAGE ON SCHEMA pgderive TO {role}",
                      "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgderive TO {role}",
                      "GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgderive TO {role}"):
        out = cli("validate", "-c", str(env.config(VIEWS)))
        assert out.returncode == 2, lines(out)  # each grant is reported missing until given
        env.grant(statement)
    config = env.config(VIEWS)
    out = cli("validate", "-c", str(config))
    assert out.returncode == 0, lines(out)
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        wait_until(lambda: streaming(env.dsn, f"{env.p}_slot") or not daemon.alive(), 60, what="bootstrap")
        assert daemon.alive(), daemon.output()
    finally:
        assert daemon.stop() == 0, daemon.output()
        drop_views(config)


# -- status -----------------------------------------------------------------------------------

def test_status_flags_an_inactive_slot_that_retains_wal(env: Env) -> None:
    env.init("--owner", env.role)
    config = env.config(VIEWS)
    slot = f"{env.p}_slot"
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        wait_until(lambda: streaming(env.dsn, slot) or not daemon.alive(), 60, what="bootstrap")
        out = cli("status", "-c", str(config))
        assert out.returncode == 0, lines(out)
        assert "streaming" in out.stdout and "warning" not in lines(out)
        assert daemon.stop() == 0, daemon.output()

        env.sql("INSERT INTO noise SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        retained = env.sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                           "FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0][0]
        assert retained > 4 << 20  # the unwatched writes are retained all the same
        out = cli("status", "-c", str(config))
        assert out.returncode == 0, lines(out)
        assert_clean(out)
        assert "streaming" not in out.stdout, out.stdout
        assert "inactive" in out.stdout
        drop = f"SELECT pg_drop_replication_slot('{slot}')"
        warning = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and f"slot {slot} is inactive" in warning[0] and drop in warning[0], out.stdout
        assert " MiB of WAL (" in warning[0]

        env.sql(drop)  # the printed command works
        out = cli("status", "-c", str(config))
        assert "warning:" not in out.stdout and env.slots() == []
    finally:
        if daemon.alive():
            daemon.stop()
        drop_views(config)


def test_select_revoked_while_running_stops_the_daemon_naming_the_view(env: Env) -> None:
    """An include view reads its records back from the source while streaming: with SELECT on
    the included table revoked under a running daemon, the next change of that table stops it
    with exit code 1 and an error naming the view, the privilege and the table; the slot stays."""
    env.sql("""CREATE TABLE child (id int PRIMARY KEY, name text);
               CREATE TABLE parent (id int PRIMARY KEY, cid int);
               INSERT INTO child VALUES (1, 'one'); INSERT INTO parent VALUES (10, 1)""")
    env.grant("GRANT SELECT ON parent, child TO {role}")
    env.init("--owner", env.role)
    config = env.config("""
  P_par:
    table: parent
    sink: cache
    key: "P_par:{id}"
    format: json
    include:
      child: {table: child, on: {cid: id}, fields: [name]}
""")
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        wait_until(lambda: streaming(env.dsn, f"{env.p}_slot") or not daemon.alive(), 60, what="bootstrap")
        assert daemon.alive(), daemon.output()
        env.grant("REVOKE SELECT ON child FROM {role}")
        env.sql("UPDATE child SET name = 'uno' WHERE id = 1")
        wait_until(lambda: not daemon.alive(), 30, what="the daemon to stop")
        assert daemon.proc is not None and daemon.proc.returncode == 1, daemon.output()
        out = daemon.output()
        assert f'view {env.p}_par: role "{env.role}" lacks SELECT on public.child' in out, out
        assert "Traceback" not in out, out
        assert env.slots() == [f"{env.p}_slot"]
    finally:
        if daemon.alive():
            daemon.stop()
        drop_views(config)


def test_a_slot_that_cannot_be_dropped_is_named_with_the_sql_to_drop_it(env: Env) -> None:
    """When dropping the slot of a failed bootstrap fails (here: the daemon's role lost
    REPLICATION, which pg_drop_replication_slot needs), the error keeps the bootstrap's cause
    and gives the exact statement, which then works."""
    from pgderive.runtime.coordinator import Engine
    from pgderive.runtime.errors import EngineError
    from cdc.slot import SlotReader
    from views.spec import load_spec

    env.init("--owner", env.role)
    slot = f"{env.p}_slot"
    engine = Engine(load_spec(env.config(VIEWS)))
    engine.reader = SlotReader(env.admin_dsn, slot)  # the slot exists, made by someone allowed to
    engine.reader.connect()
    engine.reader.create_slot()
    env.grant("ALTER ROLE {role} NOREPLICATION")
    with pytest.raises(EngineError) as e:
        engine._abandon_bootstrap(RuntimeError("the snapshot failed"))
    drop = f"SELECT pg_drop_replication_slot('{slot}')"
    assert str(e.value).startswith("the snapshot failed; ") and drop in str(e.value), str(e.value)
    assert env.slots() == [slot]
    env.sql(drop)
    assert env.slots() == []


def slow_derive(record: dict) -> dict:
    """A derive function for the interrupted-bootstrap test: 1 ms per row."""
    import time
    time.sleep(0.001)
    return record


def test_bootstrap_interrupted_by_sigterm_drops_its_slot(env: Env) -> None:
    """SIGTERM while the snapshot loads (10,000 rows at 1 ms each, checked every 5,000-row
    chunk): the daemon exits 0 and leaves neither the slot nor pgderive's record of it."""
    env.sql("CREATE TABLE big (id int PRIMARY KEY); INSERT INTO big SELECT generate_series(1, 10000)")
    env.grant("GRANT SELECT ON big TO {role}")
    env.init("--owner", env.role)
    config = env.config("""
  P_big: {table: big, sink: cache, key: "P_big:{id}", derive: "tests.integration.test_preflight:slow_derive"}
""")
    daemon = Daemon(config, env.tmp / "daemon.log").start()
    try:
        # The snapshot load has begun (a SIGTERM while the slot is still being created stops
        # at once with exit 1 instead: test_errors covers that phase).
        wait_until(lambda: "snapshot of public.big at" in daemon.output() or not daemon.alive(), 30,
                   what="the snapshot load")
        assert daemon.alive(), daemon.output()
        assert daemon.stop(60) == 0, daemon.output()
        out = daemon.output()
        assert "interrupted" in out and f"dropped slot {env.p}_slot" in out, out
        assert env.slots() == [] and env.slot_state() == []
    finally:
        if daemon.alive():
            daemon.stop()
        drop_views(config)
