"""Every connection over TLS (issue 14, item 10): Postgres with ``sslmode=verify-full``, Redis over
``rediss://`` with a client certificate, OpenSearch over ``https://`` with a client certificate and
basic auth.

The test makes a throwaway CA (and a second, wrong one) with the ``openssl`` CLI, starts a
TLS-only ``redis-server`` on a free port, puts ``haproxy`` in front of the shared OpenSearch (the
integ-test distribution has no security plugin: haproxy terminates TLS, requires the client
certificate and checks basic auth), and turns on TLS in the shared Postgres cluster with
``ALTER SYSTEM`` + ``pg_reload_conf()`` (``ssl`` is reloadable; plain connections keep working),
resetting it at the end. Nothing is installed at run time: ``scripts/services.sh up`` installs
haproxy and openssl.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import redis

from sinks.opensearch import OpenSearchSink
from views.spec import load_spec

from ..support import (OPENSEARCH_URL, PG_ADMIN_DSN, ROOT, Daemon, assert_views_equal, create_database,
                       current_lsn, drop_database, drop_views, slot_caught_up, streaming, unique, wait_until)

pytestmark = pytest.mark.slow

OS_USER, OS_PASSWORD = "pgd", "s3cret-not-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    """``name.pem``/``name.key``: a self-signed CA (EC P-256, 2 days)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=pgderive test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def make_cert(d: Path, name: str, ca: str, usage: str) -> None:
    """``name.crt``/``name.key`` signed by ``ca``, for 127.0.0.1 and localhost."""
    (d / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        f"keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None or shutil.which("haproxy") is None:
        pytest.fail("openssl and haproxy are needed: run scripts/services.sh up (it installs them)")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "wrong-ca")
    make_cert(d, "server", "ca", "serverAuth")
    make_cert(d, "client", "ca", "clientAuth")
    (d / "server.pem").write_bytes((d / "server.crt").read_bytes() + (d / "server.key").read_bytes())
    return d


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False
    wait_until(up, 20, 0.05, what=what)


@pytest.fixture(scope="module")
def tls_redis(pki, tmp_path_factory):
    """A TLS-only redis-server (client certificates required) on a free port: its port."""
    port = free_port()
    work = tmp_path_factory.mktemp("redis-tls")
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.pem"), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "TLS redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def tls_opensearch(pki, tmp_path_factory):
    """haproxy terminating TLS in front of the shared OpenSearch, requiring a client certificate
    signed by the test CA and basic auth: its https URL."""
    port = free_port()
    upstream = OPENSEARCH_URL.split("://", 1)[1].rstrip("/")
    cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    cfg.write_text(f"""
global
  maxconn 256
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
userlist pgderive_users
  user {OS_USER} insecure-password {OS_PASSWORD}
frontend tls
  bind 127.0.0.1:{port} ssl crt {pki / 'server.pem'} ca-file {pki / 'ca.pem'} verify required
  http-request auth realm opensearch unless {{ http_auth(pgderive_users) }}
  default_backend opensearch
backend opensearch
  server os1 {upstream}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "haproxy")
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def tls_postgres(pki):
    """TLS on in the shared cluster (reloaded, not restarted), reset at the end: the CA path.

    The server certificate and key go next to the data directory, owned by the cluster's OS
    user (Postgres refuses a key others can read), so a later restart still finds them even if
    this test dies before resetting ``ssl``."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        data = Path(conn.execute("SHOW data_directory").fetchone()[0])
        was_on = conn.execute("SHOW ssl").fetchone()[0] == "on"
        folder = data.parent / "tls-test"
        folder.mkdir(exist_ok=True)
        owner = data.stat()
        for name in ("server.crt", "server.key"):
            shutil.copyfile(pki / name, folder / name)
            os.chown(folder / name, owner.st_uid, owner.st_gid)
            os.chmod(folder / name, 0o600)
        if not was_on:
            conn.execute("ALTER SYSTEM SET ssl_cert_file = %s" % psycopg.sql.quote(str(folder / "server.crt")))
            conn.execute("ALTER SYSTEM SET ssl_key_file = %s" % psycopg.sql.quote(str(folder / "server.key")))
            conn.execute("ALTER SYSTEM SET ssl = on")
            conn.execute("SELECT pg_reload_conf()")
    try:
        def tls_up() -> bool:
            try:
                with psycopg.connect(PG_ADMIN_DSN, sslmode="verify-full", sslrootcert=str(pki / "ca.pem")):
                    return True
            except psycopg.OperationalError:
                return False
        wait_until(tls_up, 20, 0.1, what="Postgres to serve TLS after pg_reload_conf()")
        yield pki / "ca.pem"
    finally:
        if not was_on:
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True, sslmode="disable") as conn:
                for name in ("ssl", "ssl_cert_file", "ssl_key_file"):
                    conn.execute(f"ALTER SYSTEM RESET {name}")
                conn.execute("SELECT pg_reload_conf()")


def pg_tls_dsn(db: str, ca: Path) -> str:
    """A key=value DSN for ``db`` on the shared cluster with ``sslmode=verify-full``."""
    return f"host=127.0.0.1 port=5433 user=postgres dbname={db} sslmode=verify-full sslrootcert={ca}"


def write_config(path: Path, dsn: str, slot: str, redis_port: int, os_url: str, pki: Path, prefix: str,
                 alias: str, *, redis_ca: str = "ca.pem", os_ca: str = "ca.pem") -> None:
    path.write_text(f"""
source: {{dsn: "{dsn}", slot: {slot}}}
sinks:
  cache:
    type: redis
    url: "rediss://127.0.0.1:{redis_port}/0"
    ca_certs: {pki / redis_ca}
    client_cert: {pki / 'client.crt'}
    client_key: {pki / 'client.key'}
  search:
    type: opensearch
    hosts: ["{os_url}"]
    ca_certs: {pki / os_ca}
    client_cert: {pki / 'client.crt'}
    client_key: {pki / 'client.key'}
    username: {OS_USER}
    password: "${{PGDERIVE_TEST_OS_PASSWORD}}"
views:
  {prefix}_r: {{table: items, sink: cache, key: "{prefix}:{{id}}", fields: [id, name, qty]}}
  {prefix}_s: {{table: items, sink: search, index: {alias}, fields: [id, name, qty]}}
""")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PGDERIVE_TEST_OS_PASSWORD": OS_PASSWORD})


def test_every_connection_over_tls(tmp_path, monkeypatch, pki, tls_redis, tls_opensearch, tls_postgres):
    monkeypatch.setenv("PGDERIVE_TEST_OS_PASSWORD", OS_PASSWORD)
    db = unique("pgd_tls")
    create_database(db)
    dsn = pg_tls_dsn(db, tls_postgres)
    slot, prefix, alias = unique("slot"), unique("tls"), unique("tls").lower()
    config = tmp_path / "pgderive.yaml"
    write_config(config, dsn, slot, tls_redis, tls_opensearch, pki, prefix, alias)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int)")
            conn.execute("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 200) g")
        daemon.start()

        def bootstrapped() -> bool:
            assert daemon.alive(), daemon.output()[-3000:]
            return streaming(dsn, slot)
        wait_until(bootstrapped, 90, what="bootstrap over TLS")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE items SET qty = -qty WHERE id <= 50")
            conn.execute("DELETE FROM items WHERE id > 180")
            conn.execute("INSERT INTO items VALUES (1000, 'new', 1)")
            # the replication connection itself is encrypted ("streaming" is recorded just
            # before START_REPLICATION: wait for the walsender)
            query = ("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid"
                     " WHERE r.slot_name = %s")
            wait_until(lambda: conn.execute(query, (slot,)).fetchone() is not None, 30, what="the walsender")
            (ssl_on,) = conn.execute(query, (slot,)).fetchone()
        assert ssl_on is True
        target = current_lsn(dsn)
        wait_until(lambda: slot_caught_up(dsn, slot, target), 60, what="the slot to catch up")
        assert_views_equal(config, timeout=30)  # read back through the same TLS sinks
        out = daemon.output()
        assert OS_PASSWORD not in out and "Traceback" not in out
        # both snapshots went over the wire-load paths (raw sockets: the TLS socket for Redis)
        assert f"view {prefix}_r done" in out and f"view {prefix}_s done" in out and "row by row instead" not in out
        assert out.count("wire load)") >= 2, out
        assert daemon.stop() == 0

        # A wrong CA for a sink: the preflight's one line naming the sink's YAML path, exit 2 (a
        # configuration problem: retrying cannot fix it), nothing created.
        for what, kwargs, line in (("redis", {"redis_ca": "wrong-ca.pem"}, 4), ("opensearch", {"os_ca": "wrong-ca.pem"}, 10)):
            bad = tmp_path / f"wrong-{what}.yaml"
            write_config(bad, dsn, slot, tls_redis, tls_opensearch, pki, prefix, alias, **kwargs)
            sink = "cache" if what == "redis" else "search"
            res = cli("run", "-c", str(bad))
            assert res.returncode == 2, res.stderr
            lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{bad}:")]
            assert len(lines) == 1 and lines[0].startswith(f"{bad}:{line}: sinks.{sink}: sink {sink}:"), res.stderr
            assert "TLS certificate verification failed" in lines[0], res.stderr
            assert "Traceback" not in res.stderr and OS_PASSWORD not in res.stderr
        bad = tmp_path / "wrong-pg.yaml"
        write_config(bad, pg_tls_dsn(db, pki / "wrong-ca.pem"), slot, tls_redis, tls_opensearch, pki, prefix, alias)
        res = cli("run", "-c", str(bad))
        assert res.returncode == 1, res.stderr
        assert "certificate verify failed" in res.stderr and "Traceback" not in res.stderr, res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "certificate verify failed" in errors[0], res.stderr
        assert all(ln.startswith(("error: ", "20")) for ln in res.stderr.splitlines() if ln.strip()), res.stderr

        # A missing certificate file: exit 2, the YAML path and the file named.
        missing = tmp_path / "missing.yaml"
        write_config(missing, dsn, slot, tls_redis, tls_opensearch, pki, prefix, alias, redis_ca="no-such-ca.pem")
        res = cli("run", "-c", str(missing))
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip() == f"{missing}:7: sinks.cache.ca_certs: file not found: {pki / 'no-such-ca.pem'}"
    finally:
        if daemon.alive():
            daemon.stop()
        try:
            drop_views(config)
        finally:
            drop_database(db)


def test_basic_auth_over_plain_http_warns_without_the_password(caplog):
    caplog.set_level(logging.WARNING, logger="pgderive.sinks.opensearch")
    sink = OpenSearchSink("search", [OPENSEARCH_URL], basic_auth=(OS_USER, OS_PASSWORD),
                          checkpoint_index=unique("pgd-cp").lower(), deployment="test")
    try:
        (record,) = [r for r in caplog.records if "plain http" in r.getMessage()]
        assert "sink search" in record.getMessage() and OS_PASSWORD not in record.getMessage()
        sink.write_checkpoint(["v"], 42)  # the real cluster (security off) still answers
        assert sink.read_checkpoint("v") == 42
    finally:
        sink._client.indices.delete(index=sink.checkpoint_index, ignore=404)
        sink.close()
    caplog.clear()
    OpenSearchSink("search", ["https://127.0.0.1:1"], basic_auth=(OS_USER, OS_PASSWORD)).close()
    assert not [r for r in caplog.records if "plain http" in r.getMessage()]


def test_redis_verify_certs_false_and_a_wrong_ca_is_not_retried(pki, tls_redis):
    from sinks.base import SinkError, TlsOptions
    from sinks.redis import RedisSink

    url = f"rediss://127.0.0.1:{tls_redis}/0"
    client = {"client_cert": str(pki / "client.crt"), "client_key": str(pki / "client.key")}
    unchecked = RedisSink("cache", url, deployment="t", tls=TlsOptions(ca_certs=str(pki / "wrong-ca.pem"),
                                                                      verify=False, **client))
    checked = RedisSink("cache", url, deployment="t", tls=TlsOptions(ca_certs=str(pki / "wrong-ca.pem"), **client))
    try:
        unchecked.write_checkpoint(["v"], 7)  # encrypted, server not authenticated
        assert unchecked.read_checkpoint("v") == 7
        with pytest.raises(SinkError, match="TLS certificate verification failed") as info:
            checked.read_checkpoint("v")
        assert info.value.retryable is False  # a retry cannot fix a CA
    finally:
        unchecked.close()
        checked.close()
    with pytest.raises(ValueError, match="rediss://"):
        RedisSink("cache", "redis://127.0.0.1:6380/0", tls=TlsOptions(ca_certs=str(pki / "ca.pem")))
