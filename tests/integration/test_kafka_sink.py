"""The Kafka sink on a real broker (127.0.0.1:9093) and a real Postgres: the change envelope,
TRUNCATE control records on every partition, and exactly-once publication across kill -9 of
the daemon while a writer commits small and large (chunked) transactions."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from cdc.envelope import decode
from tests.support import (Daemon, create_database, current_lsn, drop_database, slot_caught_up, streaming,
                           unique, wait_until)

pytestmark = pytest.mark.slow

ROWS = 3000


def read_topic(servers: str, topic: str, committed: bool = True) -> list[tuple[int, bytes | None, bytes]]:
    """Every message of ``topic``: (partition, key, value), in order per partition."""
    c = Consumer({"bootstrap.servers": servers, "group.id": unique("rd"), "enable.auto.commit": False,
                  "isolation.level": "read_committed" if committed else "read_uncommitted",
                  "enable.partition.eof": True})
    try:
        meta = c.list_topics(timeout=10).topics[topic]
        n = len(meta.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
        left, out = set(range(n)), []
        while left:
            m = c.poll(10)
            assert m is not None, f"reading {topic} timed out"
            if m.error() is not None:
                assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                left.discard(m.partition())
                continue
            out.append((m.partition(), m.key(), m.value()))
        return out
    finally:
        c.close()


class Setup:
    def __init__(self, tmp_path: Path, servers: str) -> None:
        self.servers = servers
        self.db = unique("pgd_kafka")
        self.dsn = create_database(self.db)
        self.slot = unique("slot")
        self.prefix = unique("kt")
        self.topic = f"{self.prefix}.public.acc"
        self.config = tmp_path / "pgderive.yaml"
        self.config.write_text(f"""
source: {{dsn: "{self.dsn}", slot: {self.slot}}}
sinks:
  log: {{type: kafka, bootstrap_servers: "{servers}", topic_prefix: {self.prefix}, partitions: 3}}
views:
  acc_log: {{table: public.acc, sink: log}}
http: {{listen: off}}
""")
        self.log = tmp_path / "daemon.log"
        self.sql(f"CREATE TABLE acc(id int PRIMARY KEY, bal int NOT NULL, note text);"
                 f"INSERT INTO acc SELECT g, 0, 'n' || g FROM generate_series(1, {ROWS}) g")
        self.daemon: Daemon | None = None

    def sql(self, q: str, params: tuple | None = None) -> list | None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(q, params)
            return cur.fetchall() if cur.description else None

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        self.daemon = Daemon(self.config, self.log).start(env=env)
        d = self.daemon

        def ok() -> bool:
            assert d.alive(), d.output()[-3000:]
            return streaming(self.dsn, self.slot)
        wait_until(ok, 120, what="bootstrap")
        return d

    def caught_up(self) -> None:
        target = current_lsn(self.dsn)
        wait_until(lambda: slot_caught_up(self.dsn, self.slot, target), 120, what="slot to catch up")

    def messages(self) -> list[tuple[int, bytes | None, dict]]:
        return [(p, k, orjson.loads(v)) for p, k, v in read_topic(self.servers, self.topic)]

    def close(self) -> None:
        if self.daemon is not None and self.daemon.alive():
            self.daemon.stop()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND NOT active", (self.slot,))
        drop_database(self.db)
        admin = AdminClient({"bootstrap.servers": self.servers})
        for f in admin.delete_topics([self.topic]).values():
            try:
                f.result(10)
            except Exception:  # noqa: BLE001 - best effort
                pass


@pytest.fixture
def setup(tmp_path, kafka_bootstrap):
    s = Setup(tmp_path, kafka_bootstrap)
    yield s
    s.close()


def fold(msgs: list[tuple[int, bytes | None, dict]]) -> dict[int, dict]:
    """id → row after replaying the change log (per partition order is all a reader gets)."""
    state: dict[int, tuple[dict | None, int]] = {}
    truncated = -1
    for _, key, doc in msgs:
        env = decode(orjson.dumps(doc))
        if env.op == "t":
            truncated = max(truncated, env.lsn)
            state = {k: v for k, v in state.items() if v[1] >= env.lsn}
            continue
        if env.lsn < truncated:
            continue  # older than a TRUNCATE read from another partition
        ident = orjson.loads(key)["id"]
        prev = state.get(ident)
        if prev is not None and prev[1] > env.lsn:
            continue
        state[ident] = (None if env.op == "d" else env.after, env.lsn)
    return {k: v[0] for k, v in state.items() if v[0] is not None}


def test_envelope_key_change_and_truncate_on_every_partition(setup):
    setup.start()
    setup.sql("BEGIN; UPDATE acc SET bal = 7 WHERE id = 1; DELETE FROM acc WHERE id = 2;"
              " UPDATE acc SET id = 5000 WHERE id = 3; INSERT INTO acc VALUES (6000, 1, 'x'); COMMIT")
    xid_row = setup.sql("SELECT xmin::text::bigint FROM acc WHERE id = 6000")
    # the insert before the TRUNCATE in its own transaction is never published
    setup.sql("BEGIN; INSERT INTO acc VALUES (8000, 0, 'gone'); TRUNCATE acc;"
              " INSERT INTO acc VALUES (7000, 2, 'after'); COMMIT")
    setup.caught_up()
    msgs = setup.messages()
    ops = Counter(d["op"] for _, _, d in msgs)
    # snapshot rows, then: u 1, d 2, (d 3 + c 5000), c 6000, t on each of 3 partitions, c 7000
    assert ops == {"r": ROWS, "u": 1, "d": 2, "c": 3, "t": 3}, ops
    by_key = {(k, d["op"]): d for _, k, d in msgs if k is not None and d["op"] != "r"}
    upd = by_key[(b'{"id":1}', "u")]
    assert upd["after"] == {"id": 1, "bal": 7, "note": "n1"} and upd["before"] == {"id": 1}
    assert upd["source"]["txId"] == xid_row[0][0] and upd["source"]["table"] == "acc"
    assert upd["source"]["schema"] == "public" and upd["source"]["snapshot"] is False
    assert upd["source"]["ts_ms"] is not None and upd["source"]["lsn"] > 0
    assert by_key[(b'{"id":3}', "d")]["before"] == {"id": 3}
    assert by_key[(b'{"id":5000}', "c")]["after"]["note"] == "n3"
    truncs = [(p, d) for p, k, d in msgs if d["op"] == "t"]
    assert sorted(p for p, _ in truncs) == [0, 1, 2] and all(k is None for _, k, d in msgs if d["op"] == "t")
    # every change of one transaction shares its commit LSN; the TRUNCATE comes later
    assert not [k for _, k, _ in msgs if k == b'{"id":8000}']
    lsns = {d["source"]["lsn"] for _, k, d in msgs if d["op"] in "ucd" and k != b'{"id":7000}'}
    assert len(lsns) == 1 and truncs[0][1]["source"]["lsn"] > next(iter(lsns))
    assert fold(msgs) == {7000: {"id": 7000, "bal": 2, "note": "after"}}
    # the snapshot rows are op "r" at the consistent point, with no xid
    r = [d for _, _, d in msgs if d["op"] == "r"]
    assert len({d["source"]["lsn"] for d in r}) == 1 and all(d["source"]["txId"] is None for d in r)
    assert all(d["source"]["snapshot"] is True for d in r)


class Writer(threading.Thread):
    """Commits transactions of 1-5 updates/inserts/deletes, and now and then one large one
    (more changes than a decoder chunk), counting every row change it committed."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop, self.changes, self.error = dsn, threading.Event(), 0, None
        self.next_id = 100_000

    def run(self) -> None:
        rnd = random.Random(7)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    with conn.transaction():
                        if n % 60 == 0:
                            cur = conn.execute("UPDATE acc SET bal = bal + 1 WHERE id <= 12000")
                            changed = cur.rowcount
                        else:
                            changed = 0
                            for _ in range(rnd.randint(1, 5)):
                                kind = rnd.random()
                                if kind < 0.7:
                                    cur = conn.execute("UPDATE acc SET bal = bal + 1 WHERE id = %s",
                                                       (rnd.randint(1, ROWS),))
                                elif kind < 0.85:
                                    self.next_id += 1
                                    cur = conn.execute("INSERT INTO acc VALUES (%s, 0, 'w')", (self.next_id,))
                                else:
                                    cur = conn.execute("DELETE FROM acc WHERE id = %s", (rnd.randint(1, ROWS),))
                                changed += cur.rowcount
                    self.changes += changed
                    time.sleep(0.002)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_exactly_once_into_kafka_across_kill_9(setup):
    setup.sql("INSERT INTO acc SELECT g, 0, 'big' FROM generate_series(%s, 12000) g" % (ROWS + 1))
    snapshot_rows = setup.sql("SELECT count(*) FROM acc")[0][0]
    setup.start()
    writer = Writer(setup.dsn)
    writer.start()
    kills = 0
    try:
        # Killed inside a Kafka transaction, then after its commit but before the slot moved.
        for phase in ("before_commit", "after_commit", "before_commit"):
            time.sleep(0.5)
            assert setup.daemon is not None
            setup.daemon.kill9()
            kills += 1
            d = setup.start(env={"PGDERIVE_INJECT_KAFKA_PAUSE": f"{phase}:600"})
            wait_until(lambda: d.output().count("pausing 600 s") == kills, 60, what=f"a pause {phase}")
        for _ in range(5):
            time.sleep(random.uniform(0.5, 2.0))
            assert setup.daemon is not None
            setup.daemon.kill9()
            kills += 1
            time.sleep(0.3)
            setup.start()
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    setup.caught_up()
    assert setup.daemon is not None and setup.daemon.stop() == 0
    msgs = setup.messages()
    stream = [(k, d) for _, k, d in msgs if d["op"] != "r"]
    # exactly once: every committed row change is in the topic once, none twice, none lost
    keys = Counter((k, d["source"]["lsn"], d["op"], orjson.dumps(d["after"])) for k, d in stream)
    dupes = [k for k, n in keys.items() if n > 1]
    assert not dupes, f"{len(dupes)} changes published twice, e.g. {dupes[:3]}"
    assert len(stream) == writer.changes, (len(stream), writer.changes)
    assert sum(1 for _, _, d in msgs if d["op"] == "r") == snapshot_rows
    rows = {r[0]: {"id": r[0], "bal": r[1], "note": r[2]} for r in setup.sql("SELECT id, bal, note FROM acc")}
    assert fold(msgs) == rows
    assert kills == 8 and writer.changes > 12000
    # The kills left aborted Kafka transactions (a read_uncommitted reader sees them) and a
    # replay of changes Kafka had committed, which the restarted daemon skipped.
    uncommitted = read_topic(setup.servers, setup.topic, committed=False)
    assert len(uncommitted) > len(msgs)
    assert "published before the restart" in setup.daemon.output()
    assert setup.daemon.output().count("Traceback") == 0


def test_a_second_producer_of_the_same_deployment_fences_the_first(kafka_bootstrap):
    """Two sink instances with one deployment and sink name share a transactional id: the one
    that starts second fences the first, whose next publication fails for good (a SinkError
    that is not retryable) instead of writing beside it."""
    from sinks.base import Op, SinkError, ViewTarget
    from sinks.kafka import KafkaSink

    prefix = unique("kf")
    target = ViewTarget("v", topic=f"{prefix}.public.t", table="public.t")
    first = KafkaSink("log", kafka_bootstrap, deployment=f"dep-{prefix}", topic_prefix=prefix)
    second = KafkaSink("log", kafka_bootstrap, deployment=f"dep-{prefix}", topic_prefix=prefix)
    try:
        for s in (first, second):
            s.register(target)
        def op(seq: int, lsn: int) -> Op:
            return Op("v", f'{{"id":1}}\x00{seq}', lsn, {"op": "u", "after": {"id": 1}, "source": {"lsn": lsn}})

        assert first.apply_and_advance([op(1, 10)], ["v"], -1, 20) == ([], [])
        second.write_checkpoint(["v"], 20)  # a write: its producer's init_transactions fences the first
        assert second.read_checkpoint("v") == 20
        with pytest.raises(SinkError) as e:
            first.apply_and_advance([op(2, 30)], ["v"], 20, 40)
        assert not e.value.retryable and "fenced" in str(e.value)
        assert second.apply_and_advance([op(2, 30)], ["v"], 20, 40) == ([], [])
        assert second.read_checkpoint("v") == 40
        msgs = read_topic(kafka_bootstrap, f"{prefix}.public.t")
        assert [orjson.loads(v)["source"]["lsn"] for _, _, v in msgs] == [10, 30]
    finally:
        first.close()
        second.close()
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        for f in admin.delete_topics([f"{prefix}.public.t", f"{prefix}._checkpoints"]).values():
            try:
                f.result(10)
            except Exception:  # noqa: BLE001 - best effort
                pass


def test_reading_a_deployments_checkpoints_and_topics_does_not_fence_its_writer(kafka_bootstrap):
    """``pgderive status``, ``verify`` and ``explain`` open the sink beside the running daemon
    and read checkpoints and topics: that must not make a producer (its init_transactions would
    fence the daemon's), nor create topics."""
    from sinks.base import Op, ViewTarget
    from sinks.kafka import KafkaSink

    prefix = unique("kr")
    topic = f"{prefix}.public.t"
    target = ViewTarget("v", topic=topic, table="public.t")
    writer = KafkaSink("log", kafka_bootstrap, deployment=f"dep-{prefix}", topic_prefix=prefix)
    reader = KafkaSink("log", kafka_bootstrap, deployment=f"dep-{prefix}", topic_prefix=prefix)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        for s in (writer, reader):
            s.register(target)
        assert reader.read_checkpoint("v") is None and reader.count("v") == 0
        assert not {topic, f"{prefix}._checkpoints"} & set(admin.list_topics(timeout=10).topics)  # nothing made

        def op(seq: int, lsn: int) -> Op:
            return Op("v", f'{{"id":{seq}}}\x00{seq}', lsn, {"op": "c", "after": {"id": seq}, "source": {"lsn": lsn}})

        assert writer.apply_and_advance([op(1, 10)], ["v"], -1, 20) == ([], [])
        time.sleep(1.1)  # past the reader's one-second cache
        assert reader.read_checkpoint("v") == 20 and reader.count("v") == 1
        assert writer.apply_and_advance([op(2, 30)], ["v"], 20, 40) == ([], [])  # not fenced
        time.sleep(1.1)
        assert reader.read_checkpoint("v") == 40 and reader.count("v") == 2
    finally:
        writer.close()
        reader.close()
        for f in admin.delete_topics([topic, f"{prefix}._checkpoints"]).values():
            try:
                f.result(10)
            except Exception:  # noqa: BLE001 - best effort
                pass
