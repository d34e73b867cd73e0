"""``pgderive explain VIEW KEY`` against real Postgres/wal2json, Redis and OpenSearch
(ARCHITECTURE.md, "Explain"): a plain, a ``where``, an ``include`` and an aggregate view and an
OpenSearch view explained while the daemon streams a writer's updates; records tampered with
directly in Redis and OpenSearch reported as different with their fields (exit 1); a deleted
record reported missing; usage errors (exit 2); the xid and commit time of a record the stream
wrote; ``/explain`` on the daemon's HTTP endpoint."""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from cdc.lsn import format_lsn, parse_lsn
from pgderive.state.deadletters import DeadLetter, DeadLetterStore
from pgderive.state.provenance import CommitStore
from sinks.redis import versions_key

from ..support import OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, Scenario, current_lsn, deployment, streaming, wait_until

pytestmark = pytest.mark.slow

HOT = 100  # orders 1..HOT (region 'hot') and their items are updated by the writer; the rest never are

SCHEMA = f"""
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, region text NOT NULL, status text NOT NULL,
                     total int NOT NULL);
CREATE TABLE items (id int PRIMARY KEY, order_id int NOT NULL, qty int NOT NULL);
ALTER TABLE items REPLICA IDENTITY FULL;
INSERT INTO customers SELECT g, 'Customer ' || g FROM generate_series(1, 20) g;
INSERT INTO orders SELECT g, g % 20 + 1, CASE WHEN g <= {HOT} THEN 'hot' ELSE 'cold' END, 'new', g
  FROM generate_series(1, 200) g;
UPDATE orders SET total = 50 WHERE id = 199;
INSERT INTO items SELECT g, g % 200 + 1, 1 FROM generate_series(1, 400) g;
"""
VIEWS = """
  P_plain: {table: orders, sink: cache, key: "P_:o:{id}", fields: [id, status, total], format: hash}
  P_where: {table: orders, sink: cache, key: "P_:big:{id}", fields: [id, total], where: "total >= 100", format: hash}
  P_inc:
    table: orders
    sink: cache
    key: "P_:oi:{id}"
    format: json
    fields: [id, status]
    include:
      customer: {table: customers, on: {customer_id: id}, fields: [name]}
      items: {table: items, on: {id: order_id}, many: true, order_by: [id], fields: [id, qty]}
  P_agg:
    table: orders
    sink: cache
    key: "P_:rg:{region}"
    format: hash
    group_by: [region]
    aggregate: {n: "count(*)", sum_total: "sum(total)"}
  P_search: {table: orders, sink: search, index: Pidx_orders, fields: [id, status, total]}
"""


class Writer:
    """Updates hot orders' totals and hot items' quantities from one thread until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[BaseException] = []
        #: Held by a test that needs a moment without the writer's commits (each transaction holds it).
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(3)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    with self.lock, conn.transaction():
                        conn.execute("UPDATE orders SET total = total + 1 WHERE id = %s", (rnd.randint(1, HOT),))
                        conn.execute("UPDATE items SET qty = qty + 1 WHERE id = %s", (rnd.randint(1, HOT - 1),))
                    self.count += 1
                    time.sleep(0.01)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def __enter__(self) -> "Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.errors, self.errors


def explain(s: Scenario, view: str, key: str, *extra: str, as_json: bool = True) -> tuple[int, Any, str]:
    """``pgderive explain`` as a subprocess: ``(exit code, the JSON document or stdout, stderr)``."""
    args = [sys.executable, "-m", "pgderive.cli", "explain", "-c", str(s.config), view, key, *extra]
    if as_json:
        args.append("--json")
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    if as_json and out.returncode in (0, 1):
        return out.returncode, json.loads(out.stdout), out.stderr
    return out.returncode, out.stdout, out.stderr


def name(s: Scenario, suffix: str) -> str:
    return f"{s.p}_{suffix}"


def key(s: Scenario, text: str) -> str:
    return f"{s.p}_:{text}"


def test_explain_plain_where_include_aggregate_and_opensearch_views_while_streaming(scenario) -> None:
    s = scenario(SCHEMA, VIEWS)
    # a classified join column: no view copies it, explain shows it masked
    s.config.write_text(s.config.read_text() + "classification:\n  public.items.order_id: internal\n")
    s.start()
    with Writer(s.dsn) as w:
        wait_until(lambda: w.count > 20, 30, what="the writer")
        bootstrap = parse_lsn(s.sql("SELECT consistent_point::text FROM pgderive.slot_state WHERE slot = %s",
                                    (s.slot,))[0][0])
        # plain: a row the writer updates and one it never touches (still its bootstrap version)
        for oid in (7, 150):
            rc, doc, err = explain(s, name(s, "plain"), key(s, f"o:{oid}"))
            assert rc == 0 and doc["verify"]["status"] == "equal", (doc["verify"], err)
            root = doc["sources"][0]
            assert (root["path"], root["table"], root["key"], root["in_view"]) == ("", "public.orders", {"id": oid}, True)
            assert doc["record"]["doc"] == {"id": str(oid), "status": "new", "total": str(root["values"]["total"])}
            assert isinstance(root["xmin"], int) and root["xmin"] > 2
            assert doc["shape"] == "plain" and doc["sink"] == {"name": "cache", "type": "redis"}
            assert doc["definition"]["current"] and doc["definition"]["written_fingerprint"] == doc["definition"]["fingerprint"]
            assert "shared by generations" in doc["generation"]["note"]
        assert doc["provenance"]["origin"] == "bootstrap" and doc["record"]["version"] == format_lsn(bootstrap)
        # where: a row in the view, and one whose total keeps it out (no record, none expected)
        rc, doc, _ = explain(s, name(s, "where"), key(s, "big:150"))
        assert rc == 0 and doc["verify"]["status"] == "equal" and doc["shape"] == "where"
        rc, doc, _ = explain(s, name(s, "where"), key(s, "big:199"))
        assert rc == 0 and doc["verify"]["status"] == "absent" and doc["record"]["found"] is False
        assert doc["sources"][0]["in_view"] is False and doc["sources"][0]["values"]["total"] == 50
        # OpenSearch: the document's generation index behind the alias
        rc, doc, _ = explain(s, name(s, "search"), "150")
        alias = f"{s.p.lower()}_orders"
        assert rc == 0 and doc["verify"]["status"] == "equal", doc["verify"]
        assert doc["generation"]["index"].startswith(alias + "-g") and doc["sink"]["type"] == "opensearch"
        assert doc["provenance"]["origin"] == "bootstrap"
        # a hot OpenSearch document, updated by the writer
        rc, doc, _ = explain(s, name(s, "search"), "9")
        assert rc == 0 and doc["verify"]["status"] == "equal", doc["verify"]
        # aggregate: the cold group while the hot one keeps changing
        rc, doc, _ = explain(s, name(s, "agg"), key(s, "rg:cold"))
        assert rc == 0 and doc["verify"]["status"] == "equal", doc["verify"]
        g = doc["group"]
        assert g["values"] == {"region": "cold"} and g["source_rows"] == 100 and g["state_rows"] == 100
        assert g["has_state"] and len(g["sample"]) == 5
        assert all(101 <= int(x["key"]["id"]) <= 200 for x in g["sample"])
        assert doc["record"]["doc"]["n"] == "100" and doc["shape"] == "aggregate"
        # include: change a child row last; explain names it and the record is equal. The writer
        # pauses meanwhile: an include record carries the newest commit of the batch that
        # re-derived it, which would otherwise be one of the writer's.
        vkey = versions_key(name(s, "inc"), deployment(s.config))
        r = redis.Redis.from_url(REDIS_URL)

        def version() -> int:
            v = r.hget(vkey, key(s, "oi:150"))
            return int(v[:16], 16) if v else 0
        with w.lock:
            s.caught_up()
            lo = current_lsn(s.dsn)
            with psycopg.connect(s.dsn) as conn:
                xid = conn.execute("SELECT pg_current_xact_id()::xid::text::bigint").fetchone()[0]
                conn.execute("UPDATE items SET qty = 4242 WHERE id = 349")  # an item of order 150
                committed_at = conn.execute("SELECT now()").fetchone()[0]
            hi = current_lsn(s.dsn)
            wait_until(lambda: version() > lo, 30, what="the include record rewritten")
        assert lo < version() <= hi
        store = CommitStore(s.dsn)
        try:  # the daemon's recorder stores it before the slot is confirmed past it
            wait_until(lambda: bool(store.lookup(s.slot, [version()])), 30, what="the commit recorded")
        finally:
            store.close()
        rc, doc, _ = explain(s, name(s, "inc"), key(s, "oi:150"))
        assert rc == 0 and doc["verify"]["status"] == "equal", doc["verify"]
        items = [x for x in doc["sources"] if x["path"] == "items[]"]
        assert [x["key"] for x in items] == [{"id": 149}, {"id": 349}]
        assert items[1]["values"] == {"id": 349, "order_id": "<classified: internal>", "qty": 4242}
        customer = next(x for x in doc["sources"] if x["path"] == "customer")
        assert customer["table"] == "public.customers" and customer["key"] == {"id": 150 % 20 + 1}
        assert doc["record"]["doc"]["items"][1] == {"id": 349, "qty": 4242}
        prov = doc["provenance"]
        assert prov["origin"] == "stream" and prov["xid"] == xid and prov["lsn"] == format_lsn(version())
        assert abs(dt.datetime.fromisoformat(prov["committed_at"]) - committed_at) < dt.timedelta(seconds=5)
        # text report of the same record
        rc, text, _ = explain(s, name(s, "inc"), key(s, "oi:150"), as_json=False)
        assert rc == 0 and f"transaction {xid}" in text and "items[]" in text and "EQUAL" in text
        assert w.count > 50
    s.caught_up()
    rc, doc, _ = explain(s, name(s, "agg"), key(s, "rg:hot"))
    total = s.sql("SELECT sum(total) FROM orders WHERE region = 'hot'")[0][0]
    assert rc == 0 and doc["verify"]["status"] == "equal" and doc["record"]["doc"]["sum_total"] == str(total)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BOTH = """
  P_both: {table: customers, sink: [cache, search], key: "P_:c:{id}", index: Pidx_cust, fields: [name]}
"""


def test_tampered_records_are_different_with_their_fields_and_http_explain(scenario) -> None:
    s = scenario(SCHEMA, VIEWS + BOTH)
    port = _free_port()
    s.daemon = Daemon(s.config, s.log, "--http", f"127.0.0.1:{port}").start()
    wait_until(lambda: streaming(s.dsn, s.slot), 120, what="bootstrap")
    with Writer(s.dsn):
        # Redis: a field changed behind pgderive's back (its version entry untouched)
        r = redis.Redis.from_url(REDIS_URL)
        r.hset(key(s, "o:120"), "total", "999999")
        rc, doc, _ = explain(s, name(s, "plain"), key(s, "o:120"), "--wait", "5")
        assert rc == 1 and doc["verify"]["status"] == "different" and doc["exit_code"] == 1
        assert doc["verify"]["differences"] == [{"field": "total", "sink": "999999", "source": "120", "absent": None}]
        rc, text, _ = explain(s, name(s, "plain"), key(s, "o:120"), as_json=False)
        assert rc == 1 and "DIFFERENT" in text and "999999" in text and "total" in text
        # OpenSearch: a document reindexed with another status
        client = OpenSearch([OPENSEARCH_URL])
        alias = f"{s.p.lower()}_orders"
        client.index(index=alias, id="130", body={"id": 130, "status": "tampered", "total": 130}, refresh=True)
        rc, doc, _ = explain(s, name(s, "search"), "130")
        assert rc == 1 and doc["verify"]["status"] == "different"
        assert [d["field"] for d in doc["verify"]["differences"]] == ["status"]
        assert doc["verify"]["differences"][0]["sink"] == "tampered"
        # a record deleted from Redis: missing while the source has the row; its dead letter named
        r.delete(key(s, "o:140"))
        with DeadLetterStore(s.dsn) as letters:
            letters.record(s.slot, [DeadLetter(name(s, "plain"), "public.orders", key(s, "o:140"), 0x10,
                                               "refused for the test", {"id": 140})])
        rc, doc, _ = explain(s, name(s, "plain"), key(s, "o:140"))
        assert rc == 1 and doc["verify"]["status"] == "missing" and doc["verify"]["expected"]["total"] == "140"
        assert [(d["lsn"], d["error"]) for d in doc["dead_letters"]] == [("0/10", "refused for the test")]
        # usage errors: exit 2, one line
        rc, _, err = explain(s, "nope", "x")
        assert rc == 2 and err.startswith("error: unknown view 'nope'"), err
        rc, _, err = explain(s, name(s, "plain"), key(s, "o:abc"))
        assert rc == 2 and "does not fit the key template" in err, err
        rc, _, err = explain(s, name(s, "plain"), "other:1")
        assert rc == 2 and "does not fit the key template" in err, err
        # /explain on the daemon's endpoint: the same document
        base = f"http://127.0.0.1:{port}/explain"
        from urllib.parse import quote
        with urllib.request.urlopen(f"{base}?view={name(s, 'plain')}&key={quote(key(s, 'o:150'))}", timeout=60) as resp:
            got = json.loads(resp.read())
        assert got["verify"]["status"] == "equal" and got["sources"][0]["key"] == {"id": 150}
        with urllib.request.urlopen(f"{base}?view={name(s, 'plain')}&key={quote(key(s, 'o:120'))}&wait=2",
                                    timeout=60) as resp:
            got = json.loads(resp.read())
        assert got["verify"]["status"] == "different" and got["exit_code"] == 1
        for query, code in ((f"view=nope&key=x", 404), (f"view={name(s, 'plain')}&key=zzz", 400)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{base}?{query}", timeout=60)
            assert e.value.code == code and "error" in json.loads(e.value.read())
        # a view kept in two sinks: name one copy
        rc, _, err = explain(s, name(s, "both"), key(s, "c:3"))
        assert rc == 2 and "kept in several sinks" in err, err
        rc, doc, _ = explain(s, name(s, "both") + "@search", key(s, "c:3"))
        assert rc == 0 and doc["verify"]["status"] == "equal" and doc["sink"]["name"] == "search"
        assert doc["record"]["doc"] == {"name": "Customer 3"}
    # an idle daemon (no writes): its slot still reaches S through keepalives
    s.caught_up()
    r.hset(key(s, "o:121"), "status", "lost")
    rc, doc, _ = explain(s, name(s, "plain"), key(s, "o:121"), "--wait", "30")
    assert rc == 1 and doc["verify"]["status"] == "different", doc["verify"]
    assert [d["field"] for d in doc["verify"]["differences"]] == ["status"]
    assert s.daemon.alive()
    # the daemon stopped: a change it has not applied is pending, not different
    assert s.daemon.stop() == 0
    s.sql("UPDATE orders SET total = 7 WHERE id = 160")
    rc, doc, _ = explain(s, name(s, "plain"), key(s, "o:160"), "--wait", "1")
    assert rc == 1 and doc["verify"]["status"] == "pending", doc["verify"]
    assert doc["verify"]["note"].startswith("newer commits not applied yet (slot ") and "not running" in doc["verify"]["note"]
    assert doc["verify"]["differences"] == [] and doc["verify"]["expected"]["total"] == "7"


def test_commit_time_of_xmin_is_none_not_an_error_when_postgres_cannot_tell(pg_dsn) -> None:
    """track_commit_timestamp off (this cluster's setting), a bootstrap xid: no time, and the
    snapshot transaction goes on (the failed call ran in a savepoint)."""
    from pgderive.ops.explain_source import _commit_time

    with psycopg.connect(pg_dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        track = conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()[0]
        xid = int(conn.execute("SELECT pg_current_xact_id()::xid::text").fetchone()[0])
        got = _commit_time(conn, xid - 1)
        if track == "off":
            assert got is None
        assert _commit_time(conn, 2) is None  # FrozenTransactionId
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.rollback()
