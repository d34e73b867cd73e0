"""Two deployments sharing one Redis database and one OpenSearch cluster (issue 14, item 11).

Each deployment (source database + slot) namespaces pgderive's own bookkeeping (version hashes,
checkpoints) by its deployment id, so same-named views in two daemons never touch each other's
state; bookkeeping written before namespacing is adopted on the first start after the upgrade.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from cdc.lsn import parse_lsn
from sinks.opensearch import CHECKPOINT_INDEX, checkpoint_id
from sinks.redis import CLAIMS_KEY, checkpoint_key, versions_key

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, assert_views_equal, create_database, current_lsn,
                       deployment, drop_database, drop_views, slot_caught_up, streaming, unique, wait_until)

pytestmark = pytest.mark.slow

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int);"


class Deployment:
    """A scratch database, a slot and a YAML whose views are named ``view`` + ``_r``/``_s``
    (shared with the other deployment), with their own record keys and alias."""

    def __init__(self, tmp_path: Path, label: str, view: str, checkpoint_index: str, *,
                 keys: str | None = None, alias: str | None = None) -> None:
        self.db = unique(f"pgd_dep{label}")
        self.dsn = create_database(self.db)
        self.slot = unique("slot")
        self.keys = keys or unique(f"dep{label}")
        self.alias = alias or unique(f"dep{label}").lower()
        self.view = view
        self.config = tmp_path / f"pgderive-{label}.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"], checkpoint_index: {checkpoint_index}}}
views:
  {view}_r: {{table: items, sink: cache, key: "{self.keys}:{{id}}", fields: [id, name, qty]}}
  {view}_s: {{table: items, sink: search, index: {self.alias}, fields: [id, name, qty]}}
""")
        self.log = tmp_path / f"daemon-{label}.log"
        self.sql(SCHEMA)
        self.daemon: Daemon | None = None

    def sql(self, query: str, params: object = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)  # type: ignore[arg-type]

    def start(self) -> None:
        self.daemon = Daemon(self.config, self.log).start()

        def ok() -> bool:
            assert self.daemon is not None and self.daemon.alive(), self.daemon and self.daemon.output()[-3000:]
            return streaming(self.dsn, self.slot)
        wait_until(ok, 120, what="bootstrap")

    def caught_up(self) -> None:
        target = current_lsn(self.dsn)

        def ok() -> bool:
            assert self.daemon is not None and self.daemon.alive(), self.daemon and self.daemon.output()[-3000:]
            return slot_caught_up(self.dsn, self.slot, target)
        wait_until(ok, 120, what="slot to catch up")

    def confirmed(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                               (self.slot,)).fetchone()
        assert row is not None
        return parse_lsn(row[0])

    def close(self) -> None:
        try:
            if self.daemon is not None and self.daemon.alive():
                self.daemon.stop()
            drop_views(self.config)
        finally:
            drop_database(self.db)


@pytest.fixture
def clients():
    r = redis.Redis.from_url(REDIS_URL)
    es = OpenSearch([OPENSEARCH_URL])
    yield r, es
    r.close()
    es.close()


def os_checkpoint(es: OpenSearch, index: str, doc_id: str) -> int | None:
    doc = es.get(index=index, id=doc_id, ignore=404)
    return int(doc["_source"]["lsn"]) if doc.get("found") else None


def test_two_daemons_with_same_named_views_share_redis_and_opensearch(tmp_path, clients):
    r, es = clients
    view = unique("shared")
    cp_index = unique("pgd-cp").lower()  # checkpoint_index set in the YAML
    a = Deployment(tmp_path, "a", view, cp_index)
    b = Deployment(tmp_path, "b", view, cp_index)
    try:
        b.sql("INSERT INTO items SELECT g, 'b' || g, g FROM generate_series(1, 300) g")
        b.start()
        b.caught_up()
        assert_views_equal(b.config)
        # A bootstraps a same-named view into the same Redis database while B streams. With a
        # shared version hash, A's bootstrap sweep deleted every B record older than A's
        # consistent point.
        a.sql("INSERT INTO items SELECT g, 'a' || g, g * 2 FROM generate_series(1, 200) g")
        a.start()
        b.sql("UPDATE items SET qty = qty + 1000 WHERE id <= 50")
        a.sql("DELETE FROM items WHERE id > 150")
        a.caught_up()
        b.caught_up()
        assert_views_equal(a.config)
        assert_views_equal(b.config)

        dep_a, dep_b = deployment(a.config), deployment(b.config)
        assert dep_a != dep_b and dep_a.endswith(f":{a.db}:{a.slot}") and dep_b.endswith(f":{b.db}:{b.slot}")
        # each deployment's version hash holds only its own record keys
        keys_a = {k.decode() for k in r.hkeys(versions_key(f"{view}_r", dep_a))}
        keys_b = {k.decode() for k in r.hkeys(versions_key(f"{view}_r", dep_b))}
        assert len(keys_a) == 200 and all(k.startswith(f"{a.keys}:") for k in keys_a)
        assert len(keys_b) == 300 and all(k.startswith(f"{b.keys}:") for k in keys_b)
        assert not r.exists(versions_key(f"{view}_r"), checkpoint_key(f"{view}_r"))  # no legacy keys
        # independent checkpoints: stop A, keep B streaming; A's stay where A left them
        assert a.daemon is not None and a.daemon.stop() == 0
        stopped_a = a.confirmed()
        cp_a_redis = int(r.get(checkpoint_key(f"{view}_r", dep_a)), 16)
        cp_a_os = os_checkpoint(es, cp_index, checkpoint_id(f"{view}_s", dep_a))
        assert cp_a_redis >= stopped_a and cp_a_os is not None and cp_a_os >= stopped_a
        for i in range(5):
            b.sql("UPDATE items SET name = %s WHERE id = %s", (f"again{i}", i + 1))
        b.caught_up()
        wait_until(lambda: (os_checkpoint(es, cp_index, checkpoint_id(f"{view}_s", dep_b)) or 0) > cp_a_os,
                   30, what="B's OpenSearch checkpoint to pass A's")
        assert int(r.get(checkpoint_key(f"{view}_r", dep_b)), 16) > cp_a_redis
        assert int(r.get(checkpoint_key(f"{view}_r", dep_a)), 16) == cp_a_redis
        assert os_checkpoint(es, cp_index, checkpoint_id(f"{view}_s", dep_a)) == cp_a_os
        assert not es.exists(index=CHECKPOINT_INDEX, id=f"{view}_s")  # nothing in the default index
        # A resumes from its own checkpoints: no view rebuilt, both views still equal
        a.sql("INSERT INTO items VALUES (500, 'a500', 1)")
        a.daemon.start()
        wait_until(lambda: "resuming slot" in a.log.read_text(), 60, what="A to resume")
        a.caught_up()
        assert "rebuilding" not in a.log.read_text()
        assert_views_equal(a.config)
        assert_views_equal(b.config)
    finally:
        for d in (a, b):
            d.close()
        es.indices.delete(index=cp_index, ignore=404)


def test_bookkeeping_written_before_namespacing_is_adopted(tmp_path, clients):
    r, es = clients
    view = unique("legacy")
    cp_index = unique("pgd-cp").lower()
    d = Deployment(tmp_path, "l", view, cp_index)
    try:
        d.sql("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 100) g")
        d.start()
        d.caught_up()
        assert d.daemon is not None and d.daemon.stop() == 0
        dep = deployment(d.config)
        # Turn the bookkeeping back into the layout of the previous release: Redis
        # pgderive:V:versions / pgderive:V:checkpoint, OpenSearch _id = view in the fixed index.
        rv, sv = f"{view}_r", f"{view}_s"
        r.rename(versions_key(rv, dep), versions_key(rv))
        r.rename(checkpoint_key(rv, dep), checkpoint_key(rv))
        cp_redis = int(r.get(checkpoint_key(rv)), 16)
        cp_os = os_checkpoint(es, cp_index, checkpoint_id(sv, dep))
        assert cp_os is not None
        es.index(index=CHECKPOINT_INDEX, id=sv, body={"lsn": cp_os}, version=cp_os, version_type="external",
                 refresh="false")
        es.delete(index=cp_index, id=checkpoint_id(sv, dep))
        # a key the previous release tracked: a later bootstrap sweep must still find it
        assert r.hexists(versions_key(rv), f"{d.keys}:7")

        d.sql("UPDATE items SET qty = -1 WHERE id <= 10")
        d.daemon.start()
        wait_until(lambda: "resuming slot" in d.log.read_text(), 60, what="the daemon to resume")
        d.caught_up()
        out = d.log.read_text()
        assert "adopted the bookkeeping of view(s)" in out and rv in out and sv in out
        assert "rebuilding" not in out, out[-3000:]
        assert not r.exists(versions_key(rv), checkpoint_key(rv))
        assert r.hlen(versions_key(rv, dep)) == 100
        assert int(r.get(checkpoint_key(rv, dep)), 16) >= cp_redis
        assert not es.exists(index=CHECKPOINT_INDEX, id=sv)
        assert (os_checkpoint(es, cp_index, checkpoint_id(sv, dep)) or 0) >= cp_os
        assert_views_equal(d.config)
    finally:
        d.close()
        es.indices.delete(index=cp_index, ignore=404)


def slot_exists(d: Deployment) -> bool:
    with psycopg.connect(d.dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                            (d.slot,)).fetchone()[0] > 0


def test_another_deployment_writing_the_same_keys_or_alias_is_refused(tmp_path, clients):
    r, es = clients
    cp_index = unique("pgd-cp").lower()
    x = Deployment(tmp_path, "x", unique("x"), cp_index)
    same_keys = Deployment(tmp_path, "k", unique("k"), cp_index, keys=x.keys)
    same_alias = Deployment(tmp_path, "i", unique("i"), cp_index, alias=x.alias)
    try:
        x.sql("INSERT INTO items SELECT g, 'x' || g, g FROM generate_series(1, 20) g")
        x.start()
        x.caught_up()
        dep_x = deployment(x.config)
        for other, expect in ((same_keys, f"its record keys ('{x.keys}:{{}}') are already written by deployment {dep_x}"),
                              (same_alias, f"alias '{x.alias}' already serves deployment {dep_x}")):
            res = subprocess.run([sys.executable, "-m", "pgderive.cli", "run", "-c", str(other.config)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 1, res.stderr
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and expect in errors[0], res.stderr
            assert not slot_exists(other) and not streaming(other.dsn, other.slot)  # refused before anything
        assert x.daemon is not None and x.daemon.stop() == 0
        # X retired without cleaning up its claim: once its bookkeeping is gone, the claim is stale
        # and another deployment may take the keys over.
        r.delete(checkpoint_key(f"{x.view}_r", dep_x), versions_key(f"{x.view}_r", dep_x))
        assert r.hget(CLAIMS_KEY, f"{x.keys}:{{}}") == f"{dep_x}\n{x.view}_r".encode()
        same_keys.sql("INSERT INTO items SELECT g, 'k' || g, g FROM generate_series(1, 30) g")
        same_keys.start()
        same_keys.caught_up()
        assert_views_equal(same_keys.config)
        dep_k = deployment(same_keys.config)
        assert r.hget(CLAIMS_KEY, f"{x.keys}:{{}}") == f"{dep_k}\n{same_keys.view}_r".encode()
        assert same_keys.daemon is not None and same_keys.daemon.stop() == 0
    finally:
        for d in (x, same_keys, same_alias):
            d.close()
        es.indices.delete(index=cp_index, ignore=404)
    # drop_views released the claims
    assert r.hget(CLAIMS_KEY, f"{x.keys}:{{}}") is None


def test_status_stays_read_only_and_works_with_a_sink_down(tmp_path):
    """open_sinks(prepare=False): status neither adopts nor claims, so a sink that is down is
    reported per view instead of failing the command."""
    d = Deployment(tmp_path, "s", unique("st"), "pgderive-checkpoints")
    try:
        d.config.write_text(d.config.read_text().replace(REDIS_URL, "redis://127.0.0.1:1/0"))
        res = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(d.config)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", **os.environ})
        assert res.returncode == 0, res.stderr
        assert f"{d.view}_r" in res.stdout and "? (SinkError)" in res.stdout, res.stdout
    finally:
        drop_database(d.db)
