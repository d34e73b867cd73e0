"""Helpers for the Kafka worker tests: a scratch database whose changes the test publishes
itself as change envelopes (cdc.envelope) with a transactional producer, topics and a consumer
group of its own, a worker YAML, and workers as subprocesses."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from cdc.envelope import encode, encode_key, table_topic, truncate_record
from cdc.lsn import parse_lsn

from .support import OPENSEARCH_URL, REDIS_URL, Daemon, create_database, drop_database, drop_views, unique

PARTITIONS = 3

Change = tuple[str, str, int]
"""``(op, table, id)``: ``c``/``u``/``d``/``r`` of the row ``id`` of ``table`` (``"public.x"``)."""


class World:
    """One test's source database, topics (``<prefix>.public.<table>``, 3 partitions each),
    consumer group, worker YAML and workers."""

    def __init__(self, tmp_path: Path, bootstrap: str, schema: str, tables: Sequence[str], views: str,
                 *, redis_url: str = REDIS_URL, full_identity: Sequence[str] = (), topics: bool = True) -> None:
        self.tmp = tmp_path
        self.full_identity = set(full_identity)  # tables whose deletes carry the whole old row
        self.bootstrap = bootstrap
        self.db = unique("pgd_kw")
        self.dsn = create_database(self.db)
        self.prefix = unique("kw")
        self.group = unique("kwg")
        self.p = unique("k")
        self.tables = list(tables)
        self.topics = [table_topic(self.prefix, t) for t in self.tables]
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        if topics:
            self.create_topics()
        self.config = tmp_path / "worker.yaml"
        self._views_yaml = views
        self.write_config(redis_url)
        self.sql(schema)
        self.producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": self.prefix,
                                  "linger.ms": 0})
        self.producer.init_transactions(30)
        self._publishing = threading.Lock()  # one Kafka transaction at a time (writer threads)
        self.workers: list[Daemon] = []

    def write_config(self, redis_url: str) -> None:
        views = self._views_yaml
        self.config.write_text(f"""
source:
  dsn: "{self.dsn}"
  kafka: {{bootstrap_servers: "{self.bootstrap}", group: {self.group}, topic_prefix: {self.prefix},
          session_timeout: 6}}
sinks:
  cache: {{type: redis, url: "{redis_url}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
""" + (views or "").replace("P_", self.p + "_").replace("Pidx", self.p.lower()))

    def create_topics(self) -> None:
        for f in self.admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in self.topics]).values():
            f.result(30)

    # --- the source ------------------------------------------------------------------------

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]] | None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

    def _row(self, conn: psycopg.Connection, table: str, id_: int) -> dict[str, Any] | None:
        cur = conn.execute(f"SELECT to_jsonb(t) FROM {table} t WHERE id = %s", (id_,))
        row = cur.fetchone()
        return None if row is None else row[0]

    def commit(self, statements: str, changes: Sequence[Change], *, truncated: Iterable[str] = ()) -> int:
        """Run ``statements`` in one transaction, then publish its changes as the publisher
        would (TRUNCATE control records of ``truncated`` tables first, to every partition; then
        ``changes`` with the rows as committed). Returns the commit's LSN (the version)."""
        with psycopg.connect(self.dsn) as conn:
            old = {(t, i): (self._row(conn, t, i) if t in self.full_identity else {"id": i})
                   for op, t, i in changes if op == "d"}
            conn.commit()
            xid = conn.execute("SELECT txid_current() % 4294967296").fetchone()[0]
            conn.execute(statements)
            conn.commit()
            lsn = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
            conn.commit()
            rows = {(t, i): self._row(conn, t, i) for op, t, i in changes if op != "d"}
            rows.update(old)
        self.publish(lsn, int(xid), changes, rows, truncated=truncated)
        return lsn

    def snapshot(self) -> int:
        """Publish every row of every table as ``r`` records at the current LSN (a bootstrap)."""
        with psycopg.connect(self.dsn) as conn:
            lsn = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
            changes: list[Change] = []
            rows = {}
            for t in self.tables:
                for (doc,) in conn.execute(f"SELECT to_jsonb(t) FROM {t} t ORDER BY id"):
                    changes.append(("r", t, doc["id"]))
                    rows[(t, doc["id"])] = doc
        self.publish(lsn, None, changes, rows)
        return lsn

    def publish(self, lsn: int, xid: int | None, changes: Sequence[Change], rows: dict[tuple[str, int], Any],
                *, truncated: Iterable[str] = ()) -> None:
        now = time.time()
        from datetime import datetime, timezone
        when = datetime.fromtimestamp(now, tz=timezone.utc)
        with self._publishing:
            self._publish(lsn, xid, changes, rows, truncated, when)

    def _publish(self, lsn: int, xid: int | None, changes: Sequence[Change], rows: dict[tuple[str, int], Any],
                 truncated: Iterable[str], when: Any) -> None:
        p = self.producer
        p.begin_transaction()
        for t in truncated:
            value = truncate_record(view="pub", table=t, lsn=lsn, xid=xid, commit_time=when)
            for part in range(PARTITIONS):
                p.produce(table_topic(self.prefix, t), value, partition=part)
        for op, t, i in changes:
            after = None if op == "d" else rows[(t, i)]
            before = rows.get((t, i)) or {"id": i} if op == "d" else None
            p.produce(table_topic(self.prefix, t),
                      encode(op, view="pub", table=t, lsn=lsn, xid=xid, commit_time=when,  # type: ignore[arg-type]
                             before=before, after=after),
                      key=encode_key({"id": i}))
        p.commit_transaction(30)

    # --- Kafka -----------------------------------------------------------------------------

    def committed(self) -> dict[tuple[str, int], int]:
        """The group's committed offsets (partitions without one are left out)."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group, "enable.auto.commit": False})
        try:
            parts = [TopicPartition(t, p) for t in self.topics for p in range(PARTITIONS)]
            return {(tp.topic, tp.partition): tp.offset for tp in c.committed(parts, timeout=10) if tp.offset >= 0}
        finally:
            c.close()

    def end_offsets(self) -> dict[tuple[str, int], int]:
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group + "-probe",
                      "isolation.level": "read_committed"})
        try:
            return {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                    for t in self.topics for p in range(PARTITIONS)}
        finally:
            c.close()

    # --- workers ---------------------------------------------------------------------------

    def worker(self, name: str) -> Daemon:
        """Start a worker; its stats file is ``<tmp>/<name>.json``."""
        d = Daemon(self.config, self.tmp / f"{name}.log", "--stats-file", str(self.tmp / f"{name}.json"))
        d.start()
        d.name = name  # type: ignore[attr-defined]
        self.workers.append(d)
        return d

    def stats(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.tmp / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def partitions(self, name: str) -> list[tuple[str, int]]:
        """The partitions worker ``name`` reported owning (its stats file, every 2 s)."""
        kafka = self.stats(name).get("kafka") or {}
        return [(p["topic"], p["partition"]) for p in kafka.get("partitions", [])]

    def close(self) -> None:
        for d in self.workers:
            if d.alive():
                try:
                    d.stop()
                except Exception:  # hung: kill it, cleanup goes on
                    d.kill9()
        try:
            self.producer.flush(5)
        except Exception:
            pass
        try:
            drop_views(self.config)
        finally:
            try:
                for f in self.admin.delete_topics(self.topics).values():
                    f.result(30)
            except Exception:
                pass
            try:
                for f in self.admin.delete_consumer_groups([self.group]).values():
                    f.result(30)
            except Exception:
                pass  # a killed member may still hold it until its session times out
            drop_database(self.db)


class FreezingProxy:
    """A TCP proxy to ``target`` (host, port) on a free local port; :meth:`freeze` stops
    forwarding (connections stay open, bytes wait), :meth:`thaw` resumes. Daemon threads."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.open.clear()

    def thaw(self) -> None:
        self.open.set()

    def close(self) -> None:
        self._closed = True
        self.open.set()
        self.server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def redis_target(url: str = REDIS_URL) -> tuple[str, int]:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 6379

