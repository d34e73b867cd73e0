"""Secrets planted in every DSN and URL never appear in any output of any command, nor in the
daemon's logs, on success and on error paths (issue 14, item 9).

Every secret is a unique string. The source's passwords are real parameters libpq sends (the
shared cluster trusts 127.0.0.1, so they are accepted unchecked; a fake server that refuses the
password gives the "wrong password" path); the Redis password belongs to a real ACL user made
for this test; OpenSearch (security off) gets the credentials as basic auth and ignores them.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis

from pgderive.state.deadletters import DeadLetter, DeadLetterStore
from views.spec import load_spec

from ..support import OPENSEARCH_URL, REDIS_URL, ROOT, create_database, drop_database, drop_views, streaming, \
    unique, wait_until
from .fake_servers import PasswordRefusingPostgres

pytestmark = pytest.mark.slow


def secret(kind: str) -> str:
    return f"zz{kind}{uuid.uuid4().hex[:10]}"


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = unique("pgd_sec")
        self.dsn = create_database(self.db)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g")
        self.slot = unique("slot_sec")
        self.prefix = unique("sec")
        self.pg = secret("pgpw")
        self.pg_kv = secret("pgkv") + " with space"
        self.ssl = secret("sslpw")
        self.ssl_kv = secret("sslkv")
        self.upper = secret("upper")
        self.redis_user = unique("pgd_sec_user")
        self.redis_pw = secret("redispw")
        self.os_pw = secret("ospw")
        self.refused_pw = secret("refused")
        self.unreach_pw = secret("unreach")
        self.url_pw = secret("urlpw")
        self.planted = [self.pg, self.ssl, self.ssl_kv, self.upper, self.redis_pw, self.os_pw,
                        self.refused_pw, self.unreach_pw, self.url_pw, *self.pg_kv.split()]
        self.admin = redis.Redis.from_url(REDIS_URL)
        self.admin.execute_command("ACL", "SETUSER", self.redis_user, "on", f">{self.redis_pw}",
                                   "~*", "&*", "+@all")
        host, port = "127.0.0.1", 5433
        base = self.dsn.rsplit("/", 1)[0]
        assert base.endswith(f"@{host}:{port}")
        self.uri_dsn = f"postgresql://postgres:{self.pg}@{host}:{port}/{self.db}?sslpassword={self.ssl}"
        self.kv_dsn = (f"host={host} port={port} dbname={self.db} user=postgres "
                       f"password='{self.pg_kv}' sslpassword={self.ssl_kv}")
        redis_host = REDIS_URL.split("://", 1)[1]
        self.redis_url = f"redis://{self.redis_user}:{self.redis_pw}@{redis_host}"
        self.os_url = OPENSEARCH_URL.replace("://", f"://admin:{self.os_pw}@", 1)
        self.outputs: list[str] = []

    def config(self, name: str, dsn: str, *, redis_url: str | None = None, os_url: str | None = None) -> Path:
        path = self.tmp / name
        path.write_text(f"""
source: {{dsn: "{dsn}", slot: {self.slot}, connect_timeout: 3}}
sinks:
  cache: {{type: redis, url: "{redis_url or self.redis_url}"}}
  search: {{type: opensearch, hosts: ["{os_url or self.os_url}"]}}
views:
  {self.prefix}_cache: {{table: t, sink: cache, key: "{self.prefix}:{{id}}"}}
  {self.prefix}_search: {{table: t, sink: search, index: {self.prefix.lower()}}}
""")
        return path

    def cli(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        self.outputs.append(f"$ pgderive {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
        if expect is not None:
            assert proc.returncode == expect, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def assert_clean(self) -> None:
        text = "\n".join(self.outputs)
        leaked = [s for s in self.planted if s in text]
        assert not leaked, f"planted secrets printed: {leaked}\n{text[-5000:]}"

    def close(self) -> None:
        for c in self.tmp.glob("*.yaml"):
            try:
                drop_views(c)
            except Exception:
                pass
        self.admin.execute_command("ACL", "DELUSER", self.redis_user)
        self.admin.close()
        drop_database(self.db)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def test_no_command_prints_a_planted_secret(env: Env) -> None:
    for form, dsn in (("uri", env.uri_dsn), ("kv", env.kv_dsn)):
        config = env.config(f"{form}.yaml", dsn)
        c = str(config)
        out = env.cli("validate", "-c", c)
        assert "OK (2 view(s)" in out.stdout
        env.cli("status", "-c", c)
        # run (debug logging: every library's log lines too), stats file included
        log = env.tmp / f"run-{form}.log"
        stats = env.tmp / f"stats-{form}.json"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "--log-level", "debug", "run", "-c", c,
                                     "--stats-file", str(stats)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: streaming(env.dsn, env.slot) or proc.poll() is not None, 90, what="bootstrap")
                assert proc.poll() is None, log.read_text()[-3000:]
                with psycopg.connect(env.dsn, autocommit=True) as conn:
                    conn.execute("UPDATE t SET v = v || '!' WHERE id <= 5")
                env.cli("status", "-c", c)  # while the daemon streams
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0, log.read_text()[-3000:]
        env.outputs.append(log.read_text(errors="replace"))
        env.outputs.append(stats.read_text())
        assert "Traceback" not in env.outputs[-2]
        assert "pgderive.engine: connecting to the source" in env.outputs[-2]  # the log is a real one
        # dead letters: one planted so the listing shows rows
        spec = load_spec(config)
        with DeadLetterStore(env.dsn) as store:
            store.record(env.slot, [DeadLetter(f"{env.prefix}_cache", "public.t", f"{env.prefix}:1", 0x1000,
                                               "boom", {"id": 1})])
        out = env.cli("dead-letters", "list", "-c", c)
        assert "boom" in out.stdout
        env.cli("dead-letters", "retry", "-c", c, expect=None)
        env.cli("dead-letters", "discard", "--all", "-c", c)
        env.cli("verify", "-c", c, f"{env.prefix}_cache", "--wait", "5")
        env.cli("verify", "-c", c, f"{env.prefix}_search", "--wait", "5")
        env.cli("rebuild", "-c", c, f"{env.prefix}_cache")
        assert spec.source.slot == env.slot
        # start over for the other form
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (env.slot,))
            conn.execute("DELETE FROM pgderive.slot_state WHERE slot = %s", (env.slot,))
        drop_views(config)
    env.assert_clean()


def test_error_paths_print_no_planted_secret(env: Env) -> None:
    # wrong password: a server that asks for it and refuses it
    refusing = PasswordRefusingPostgres()
    try:
        wrong = env.config("wrong.yaml", f"postgresql://postgres:{env.refused_pw}@127.0.0.1:{refusing.port}/db")
        for args in (["validate"], ["status"], ["dead-letters", "list"], ["run"]):
            proc = env.cli(*args, "-c", str(wrong), expect=1)
            assert "password authentication failed" in proc.stderr, proc.stderr
        assert env.refused_pw.encode() in refusing.passwords  # the secret really was sent
    finally:
        refusing.close()
    # unreachable host
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = env.config("unreachable.yaml", f"host=127.0.0.1 port={port} dbname=db user=postgres "
                                                 f"password={env.unreach_pw} sslpassword={env.ssl}")
    for args in (["validate"], ["status"], ["run"], ["verify", "x"], ["rebuild", "x"]):
        proc = env.cli(*args, "-c", str(unreachable), expect=None)
        assert proc.returncode in (1, 2) and proc.stderr.strip(), proc
    # upper-case PASSWORD= (libpq refuses the key word: the message must not quote the value)
    upper = env.config("upper.yaml", f"host=127.0.0.1 port=5433 dbname={env.db} user=postgres PASSWORD={env.upper}")
    for args in (["validate"], ["status"], ["run"], ["dead-letters", "list"]):
        proc = env.cli(*args, "-c", str(upper), expect=None)
        assert proc.returncode in (1, 2) and proc.stderr.strip(), proc
    # malformed URLs carrying passwords
    bad_redis = env.config("bad_redis.yaml", env.uri_dsn,
                           redis_url=f"redis://u:{env.url_pw}@127.0.0.1:63x80/0")
    proc = env.cli("validate", "-c", str(bad_redis), expect=2)
    assert "sinks.cache.url: invalid URL 'redis://u:***@127.0.0.1:63x80/0'" in proc.stderr
    bad_os = env.config("bad_os.yaml", env.uri_dsn, os_url=f"http://admin:{env.url_pw}@127.0.0.1:99999")
    proc = env.cli("status", "-c", str(bad_os), expect=2)
    assert "sinks.search.hosts[0]: invalid URL 'http://admin:***@127.0.0.1:99999'" in proc.stderr
    # a wrong Redis password (a real ACL user, wrong password): status reports it, no secret
    wrong_redis = env.config("wrong_redis.yaml", env.uri_dsn,
                             redis_url=f"redis://{env.redis_user}:{env.url_pw}@{REDIS_URL.split('://', 1)[1]}")
    env.cli("status", "-c", str(wrong_redis))
    env.assert_clean()
