"""``pgderive lineage`` and the classification policy against a real database holding the widget
store's schema (scripts/store.py), with config/store.yaml itself: its lineage equals the
hand-written tests/integration/expected/store_lineage.json, its dot renders with Graphviz, and
``validate``/``run`` refuse a copy of the store config that routes a pii column to OpenSearch,
``run`` before any slot or schema exists."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis

from ..support import (OPENSEARCH_URL, ROOT, Daemon, create_database, drop_database, drop_views, streaming,
                       unique, wait_until)

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("pgderive_store_demo", ROOT / "scripts" / "store.py")
assert _spec is not None and _spec.loader is not None
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

REDIS_URL = "redis://127.0.0.1:6380/14"
EXPECTED = Path(__file__).parent / "expected" / "store_lineage.json"
CONFIG = ROOT / "config" / "store.yaml"


class Store:
    def __init__(self, db: str, dsn: str, slot: str) -> None:
        self.db, self.dsn, self.slot = db, dsn, slot
        self.env = {**os.environ, "PGDERIVE_STORE_DSN": dsn, "PGDERIVE_STORE_SLOT": slot,
                    "PGDERIVE_REDIS_URL": REDIS_URL, "PGDERIVE_OPENSEARCH_URL": OPENSEARCH_URL}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgderive.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def slots(self) -> list[str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                               (self.db,))]

    def has_state_schema(self) -> bool:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute("SELECT to_regnamespace('pgderive') IS NOT NULL").fetchone()[0]


@pytest.fixture
def db() -> Iterator[Store]:
    name = unique("lin_store")
    dsn = create_database(name)
    try:
        store.schema(dsn)
        yield Store(name, dsn, unique("lin_slot"))
    finally:
        drop_database(name)


def test_store_lineage_json_matches_the_hand_written_expectation(db: Store) -> None:
    out = db.cli("lineage", "-c", str(CONFIG), "--format", "json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = json.loads(EXPECTED.read_text())
    for g, e in zip(got["views"], expected["views"]):  # a readable first difference
        assert g["flows"] == e["flows"], g["view"]
    assert got == expected
    assert db.slots() == [] and not db.has_state_schema()  # lineage creates nothing


def test_store_lineage_text_shows_classification(db: Store) -> None:
    out = db.cli("lineage", "-c", str(CONFIG))
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "public.customers.name" in ln and "include" in ln)
    assert line.split() == ["public.customers.name", "include", "customer.name", "pii", "include", "customer",
                            "->", "field", "name"]
    assert "classified, copied by no view: public.customers.email" in out.stdout
    assert "REFUSED" not in out.stdout


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz (Debian graphviz) is not installed")
def test_store_lineage_dot_renders_with_graphviz(db: Store, tmp_path: Path) -> None:
    out = db.cli("lineage", "-c", str(CONFIG), "--format", "dot")
    assert out.returncode == 0, out.stderr
    assert '"col:public.customers.name" [shape=ellipse, color=red' in out.stdout  # classified: red
    dot_file, png = tmp_path / "store.dot", tmp_path / "store.png"
    dot_file.write_text(out.stdout)
    rendered = subprocess.run(["dot", "-Tpng", str(dot_file), "-o", str(png)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0 and not rendered.stderr.strip(), rendered.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert len(data) > 50_000 and width > 500 and height > 1000, (len(data), width, height)


def test_lineage_without_a_source_exits_1(tmp_path: Path) -> None:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PGDERIVE_STORE_DSN": f"postgresql://postgres@127.0.0.1:{port}/store?connect_timeout=3"}
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "lineage", "-c", str(CONFIG)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: cannot read the source catalog"), out.stderr
    assert "Traceback" not in out.stderr


LEAK = """
  lin_order_search:
    table: orders
    sink: search
    index: lin-orders
    fields: [id, status]
    include:
      customer: {table: customers, on: {customer_id: id}, fields: {mail: email}}
"""


def leaking_config(tmp_path: Path) -> Path:
    config = tmp_path / "leak.yaml"
    config.write_text(CONFIG.read_text() + LEAK)
    return config


def test_validate_refuses_pii_routed_to_opensearch(db: Store, tmp_path: Path) -> None:
    config = leaking_config(tmp_path)
    line = len(CONFIG.read_text().splitlines()) + 8  # the `customer:` line of LEAK
    out = db.cli("validate", "-c", str(config))
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"{config}:{line}: views.lin_order_search.include.customer.fields.mail: public.customers.email"
            " (pii, contact) reaches sink search (allows: none) via include customer -> field mail"
            " (renamed from email)") in out.stderr
    assert "Traceback" not in out.stderr
    ok = db.cli("validate", "-c", str(CONFIG))  # the store config itself: pii only in the cache, which allows it
    assert ok.returncode == 0, ok.stderr
    assert db.slots() == []


def test_run_refuses_pii_routed_to_opensearch_before_creating_a_slot(db: Store, tmp_path: Path) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys_before = r.dbsize()
    out = db.cli("run", "-c", str(leaking_config(tmp_path)), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "views.lin_order_search.include.customer.fields.mail: public.customers.email (pii, contact) reaches" \
           " sink search (allows: none)" in text
    assert db.slots() == [] and not db.has_state_schema()  # nothing created, no slot retaining WAL
    assert r.dbsize() == keys_before


def test_a_running_daemon_reloads_policy_changes_only_when_they_pass(tmp_path: Path) -> None:
    """classification/allow may change on reload: a policy that a running view breaks is
    refused (the daemon keeps the previous file and keeps streaming), one it passes is taken."""
    name = unique("lin_reload")
    dsn = create_database(name)
    slot, p = unique("lin_slot"), unique("lin")
    config = tmp_path / "people.yaml"

    def write(sink_extra: str = "", classification: str = "") -> None:
        config.write_text(f"""
source: {{dsn: "{dsn}", slot: {slot}}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"{sink_extra}}}
{classification}
views:
  {p}_people: {{table: people, sink: cache, key: "{p}:person:{{id}}", fields: [id, email]}}
""")

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pgderive.cli", "reload", "-c", str(config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, name text, email text);"
                     "INSERT INTO people VALUES (1, 'ann', 'ann@example.com')")
    write()
    d = Daemon(config, tmp_path / "daemon.log")
    r = redis.Redis.from_url(REDIS_URL)
    try:
        d.start()
        wait_until(lambda: (d.alive() or pytest.fail(d.output()[-3000:])) and streaming(dsn, slot), 120,
                   what="bootstrap")
        assert r.hget(f"{p}:person:1", "email") == b"ann@example.com"
        # tightened under the running view: refused, naming the path and route
        write(classification="classification: {public.people.email: pii}")
        out = reload()
        assert out.returncode == 1, out.stdout + out.stderr
        assert (f"refused: {config}:7: views.{p}_people.fields[1]: public.people.email (pii) reaches sink cache"
                " (allows: none) via field email") in out.stdout, out.stdout
        # the same classification with a sink that allows it: taken, nothing rebuilt
        write(sink_extra=", allow: [pii]", classification="classification: {public.people.email: pii}")
        out = reload()
        assert out.returncode == 0, out.stdout + out.stderr
        assert "no view changed; classification policy changed" in out.stdout
        # any other sink change still needs a restart
        write(sink_extra=", allow: [pii], lane: thread", classification="classification: {public.people.email: pii}")
        out = reload()
        assert out.returncode == 1 and "section(s) sinks changed" in out.stdout, out.stdout + out.stderr
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE people SET email = 'ann@example.org' WHERE id = 1")
        wait_until(lambda: r.hget(f"{p}:person:1", "email") == b"ann@example.org", 60, what="the stream")
        assert d.alive()
    finally:
        if d.alive():
            d.stop()
        drop_views(config)
        drop_database(name)
