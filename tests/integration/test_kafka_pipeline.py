"""The whole scale-out pipeline on real services: a publisher daemon (slot → change-log views on
a Kafka sink) and derivation workers (``source.kafka``) deriving a Redis view and an OpenSearch
include view, while a writer commits to Postgres. The publisher is killed (kill -9) twice and a
worker once during the load, a third worker joins (a rebalance), and afterwards every worker view
equals the source (``pgderive verify`` exits 0) and the publisher's topics hold every committed
change exactly once."""
from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter

import orjson
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, assert_views_equal, create_database, current_lsn,
                       drop_database, drop_views, slot_caught_up, streaming, unique, wait_until)
from .test_kafka_sink import read_topic

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE acc (id int PRIMARY KEY, v text, n int);
CREATE TABLE note (id int PRIMARY KEY, acc_id int, body text);
ALTER TABLE note REPLICA IDENTITY FULL;
INSERT INTO acc SELECT i, 'v' || i, i FROM generate_series(1, 2000) i;
INSERT INTO note SELECT i, 1 + i % 2000, 'note ' || i FROM generate_series(1, 1000) i;
"""


class Writer(threading.Thread):
    """Small transactions on acc and note (insert, update, delete), counted."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.halt, self.error, self.commits = dsn, threading.Event(), None, 0

    def run(self) -> None:
        rnd, nid = random.Random(18), 10_000
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.halt.is_set():
                    with conn.transaction():
                        for _ in range(rnd.randint(1, 4)):
                            k = rnd.random()
                            if k < 0.5:
                                conn.execute("UPDATE acc SET n = n + 1, v = 'w' || n WHERE id = %s",
                                             (rnd.randint(1, 2000),))
                            elif k < 0.65:
                                nid += 1
                                conn.execute("INSERT INTO acc VALUES (%s, 'new', 0)", (nid,))
                            elif k < 0.75:
                                conn.execute("DELETE FROM acc WHERE id = %s", (rnd.randint(1, 2000),))
                            elif k < 0.9:
                                conn.execute("UPDATE note SET body = 'b' || %s WHERE id = %s",
                                             (rnd.random(), rnd.randint(1, 1000)))
                            else:
                                nid += 1
                                conn.execute("INSERT INTO note VALUES (%s, %s, 'late')", (nid, rnd.randint(1, 2000)))
                    self.commits += 1
                    time.sleep(0.003)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_publisher_and_workers_survive_kill9_and_a_rebalance(tmp_path, kafka_bootstrap):
    db, slot, prefix, group, p = unique("pgd_kp"), unique("slot"), unique("kp"), unique("kpg"), unique("k")
    dsn = create_database(db)
    pub_cfg, work_cfg = tmp_path / "publisher.yaml", tmp_path / "worker.yaml"
    pub_cfg.write_text(f"""
source: {{dsn: "{dsn}", slot: {slot}}}
sinks:
  log: {{type: kafka, bootstrap_servers: "{kafka_bootstrap}", topic_prefix: {prefix}, partitions: 3}}
views:
  acc_log: {{table: public.acc, sink: log}}
  note_log: {{table: public.note, sink: log}}
http: {{listen: off}}
""")
    work_cfg.write_text(f"""
source:
  dsn: "{dsn}"
  kafka: {{bootstrap_servers: "{kafka_bootstrap}", group: {group}, topic_prefix: {prefix}, session_timeout: 6}}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
  {p}_acc: {{table: acc, sink: cache, key: "{p}:acc:{{id}}", fields: [id, v, n]}}
  {p}_acc_search:
    table: acc
    sink: search
    index: {p.lower()}_acc
    fields: [id, v]
    include:
      notes: {{table: note, on: {{id: acc_id}}, many: true, order_by: [id], fields: [id, body]}}
http: {{listen: off}}
""")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    workers: list[Daemon] = []
    publisher = Daemon(pub_cfg, tmp_path / "publisher.log")
    writer = Writer(dsn)

    def start_publisher() -> None:
        publisher.start()
        wait_until(lambda: publisher.alive() and streaming(dsn, slot), 120, what="the publisher to stream")

    def worker(name: str) -> Daemon:
        d = Daemon(work_cfg, tmp_path / f"{name}.log").start()
        workers.append(d)
        return d

    try:
        start_publisher()
        a, b = worker("a"), worker("b")
        assert_views_equal(work_cfg, timeout=90)  # the snapshot's r records bootstrapped them
        writer.start()
        for victim in ("publisher", "worker", "publisher"):
            time.sleep(random.uniform(1.0, 2.5))
            if victim == "publisher":
                publisher.kill9()
                time.sleep(0.5)
                start_publisher()
            else:
                b.kill9()
        c = worker("c")  # joins: the group rebalances under load
        time.sleep(2.0)
        writer.halt.set()
        writer.join(30)
        assert writer.error is None, writer.error
        target = current_lsn(dsn)
        wait_until(lambda: slot_caught_up(dsn, slot, target), 120, what="the publisher to catch up")
        assert_views_equal(work_cfg, timeout=120)
        for view in (f"{p}_acc", f"{p}_acc_search"):
            proc = subprocess.run([sys.executable, "-m", "pgderive.cli", "verify", "-c", str(work_cfg), view],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0 and "EQUAL" in proc.stdout, proc.stdout + proc.stderr
        assert a.alive() and c.alive() and writer.commits > 100
        # the topics hold every committed change once: no (key, lsn, op, after) twice
        for table in ("acc", "note"):
            msgs = [orjson.loads(v) for _, _, v in read_topic(kafka_bootstrap, f"{prefix}.public.{table}")]
            seen = Counter((orjson.dumps(m["before"]), orjson.dumps(m["after"]), m["source"]["lsn"], m["op"])
                           for m in msgs if m["op"] != "r")
            assert not [k for k, n in seen.items() if n > 1], f"{table}: a change published twice"
    finally:
        writer.halt.set()
        for d in [*workers, publisher]:
            if d.alive():
                try:
                    d.stop()
                except Exception:  # noqa: BLE001 - hung: kill it, cleanup goes on
                    d.kill9()
        try:
            drop_views(work_cfg)
        finally:
            admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
            topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix + ".")]
            for f in [*admin.delete_topics(topics).values(), *admin.delete_consumer_groups([group]).values()] \
                    if topics else []:
                try:
                    f.result(30)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                             " WHERE slot_name = %s AND NOT active", (slot,))
            drop_database(db)
