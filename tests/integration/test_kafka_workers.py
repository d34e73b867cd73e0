"""Derivation workers (``source.kafka``) on the real broker, Postgres, Redis and OpenSearch: the
test publishes the source's changes itself as change envelopes (a transactional producer), one
or two ``pgderive run`` workers in one consumer group derive the views, and every view must end
equal to a fresh derivation from Postgres (``pgderive verify``'s diff) whatever the workers went
through: r/c/u/d/t records, include re-reads, a rebalance, ``kill -9`` mid-load, a kill between
reading and the sink's acknowledgement."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from ..kafka_support import PARTITIONS, FreezingProxy, World, redis_target
from ..support import REDIS_URL, assert_views_equal, wait_until

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE acc (id int PRIMARY KEY, v text, n int);
CREATE TABLE note (id int PRIMARY KEY, acc_id int, body text);
ALTER TABLE note REPLICA IDENTITY FULL;
INSERT INTO acc SELECT i, 'v' || i, i FROM generate_series(1, 30) i;
INSERT INTO note SELECT i, 1 + i % 30, 'note ' || i FROM generate_series(1, 20) i;
"""
TABLES = ["public.acc", "public.note"]
VIEWS = """
  P_acc:
    table: acc
    sink: cache
    key: "P_:acc:{id}"
    fields: [id, v, n]
  P_acc_search:
    table: acc
    sink: search
    index: Pidx_acc
    fields: [id, v]
    include:
      notes: {table: note, on: {id: acc_id}, many: true, order_by: [id], fields: [id, body]}
"""
REDIS_ONLY = """
  P_acc:
    table: acc
    sink: cache
    key: "P_:acc:{id}"
    fields: [id, v, n]
"""


@pytest.fixture
def world(tmp_path, kafka_bootstrap):
    made: list[World] = []

    def make(views: str = VIEWS, **kw) -> World:
        w = World(tmp_path, kafka_bootstrap, SCHEMA, TABLES, views, full_identity=["public.note"], **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def owned(w: World, name: str) -> set[tuple[str, int]]:
    return set(w.partitions(name))


def all_partitions(w: World, tables: tuple[str, ...] = ("public.acc",)) -> set[tuple[str, int]]:
    """The partitions of the topics of ``tables`` (those the workers subscribe to)."""
    return {(t, p) for t in w.topics if t.split(".", 1)[1] in tables for p in range(PARTITIONS)}


def acc_ends(w: World) -> dict[tuple[str, int], int]:
    """The end offsets of the acc topic's partitions that hold anything (what a group reading
    only acc has committed once it applied everything: past the last transaction marker)."""
    return {tp: n for tp, n in w.end_offsets().items() if tp in all_partitions(w) and n > 0}


def load(w: World, start: int, count: int, per_tx: int = 10, pause: float = 0.0) -> None:
    """Inserts, updates and deletes of acc rows ``start`` .. ``start + count - 1``, ``per_tx``
    rows per transaction, each published after its commit; ``pause`` seconds between rounds."""
    for lo in range(start, start + count, per_tx):
        time.sleep(pause)
        ids = range(lo, min(lo + per_tx, start + count))
        w.commit(";".join(f"INSERT INTO acc VALUES ({i}, 'new{i}', {i})" for i in ids),
                 [("c", "public.acc", i) for i in ids])
        w.commit(";".join(f"UPDATE acc SET v = 'upd{i}', n = n + 1 WHERE id = {i}" for i in ids),
                 [("u", "public.acc", i) for i in ids])
        gone = [i for i in ids if i % 3 == 0]
        if gone:
            w.commit(";".join(f"DELETE FROM acc WHERE id = {i}" for i in gone), [("d", "public.acc", i) for i in gone])


def test_one_worker_derives_redis_and_opensearch_views_from_r_c_u_d_t(world):
    w = world()
    w.snapshot()
    w.worker("a")
    assert_views_equal(w.config, timeout=45)
    # c/u/d of roots and of included rows (re-read from Postgres), then a TRUNCATE + reload in
    # one transaction (its t record goes to every partition, its inserts share its version).
    w.commit("INSERT INTO acc VALUES (100, 'hundred', 100)", [("c", "public.acc", 100)])
    w.commit("UPDATE acc SET v = 'changed' WHERE id = 2; DELETE FROM acc WHERE id = 3",
             [("u", "public.acc", 2), ("d", "public.acc", 3)])
    w.commit("INSERT INTO note VALUES (100, 100, 'on hundred'); UPDATE note SET body = 'edited' WHERE id = 1;"
             " DELETE FROM note WHERE id = 2",
             [("c", "public.note", 100), ("u", "public.note", 1), ("d", "public.note", 2)])
    assert_views_equal(w.config, timeout=30)
    w.commit("TRUNCATE acc; INSERT INTO acc VALUES (1, 'reloaded', 1), (7, 'seven', 7)",
             [("c", "public.acc", 1), ("c", "public.acc", 7)], truncated=["public.acc"])
    w.commit("INSERT INTO acc VALUES (8, 'eight', 8)", [("c", "public.acc", 8)])
    assert_views_equal(w.config, timeout=30)
    r = redis.Redis.from_url(REDIS_URL)
    assert r.hgetall(f"{w.p}_:acc:1") == {b"id": b"1", b"v": b"reloaded", b"n": b"1"}
    assert not r.exists(f"{w.p}_:acc:2")
    assert owned(w, "a") == all_partitions(w, ("public.acc", "public.note"))
    assert w.workers[0].stop() == 0


def test_two_workers_split_the_partitions_and_one_survives_the_others_kill9(world):
    w = world()  # a Redis view and an OpenSearch include view (acc with its notes)
    w.snapshot()
    a, b = w.worker("a"), w.worker("b")
    both = all_partitions(w, ("public.acc", "public.note"))
    wait_until(lambda: owned(w, "a") and owned(w, "b") and owned(w, "a") | owned(w, "b") == both,
               timeout=30, what="both workers to own partitions")
    assert not owned(w, "a") & owned(w, "b")
    assert_views_equal(w.config, timeout=30)
    writer = threading.Thread(target=load, args=(w, 1000, 300, 10, 0.15))  # ~5 s
    writer.start()
    time.sleep(1.0)
    b.kill9()  # mid-load
    writer.join(60)
    w.commit("INSERT INTO note VALUES (500, 1001, 'late'); DELETE FROM note WHERE id = 3",
             [("c", "public.note", 500), ("d", "public.note", 3)])
    wait_until(lambda: owned(w, "a") == both, timeout=30, what="the survivor to take every partition")
    assert_views_equal(w.config, timeout=30)
    assert a.alive()


def test_a_second_worker_joining_takes_partitions_over_without_loss(world):
    w = world(REDIS_ONLY)
    w.snapshot()
    w.worker("a")
    load(w, 1000, 60)
    assert_views_equal(w.config, timeout=30)
    w.worker("b")
    writer = threading.Thread(target=load, args=(w, 2000, 150, 10, 0.3))  # ~5 s: the rebalance falls inside
    writer.start()
    wait_until(lambda: owned(w, "b") and owned(w, "a") | owned(w, "b") == all_partitions(w)
               and not owned(w, "a") & owned(w, "b"), timeout=30, what="the rebalance")
    writer.join(60)
    assert_views_equal(w.config, timeout=30)
    assert w.stats("a")["kafka"]["rebalances"] >= 2
    for d in w.workers:
        assert d.stop() == 0
    # everything acknowledged is committed: the group is at the end of every partition
    assert w.committed() == acc_ends(w)


def test_offsets_are_committed_only_after_the_sink_acknowledged(world):
    proxy = FreezingProxy(redis_target())
    try:
        w = world(REDIS_ONLY, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        w.snapshot()
        w.worker("a")
        assert_views_equal(w.config, timeout=30)
        wait_until(lambda: w.committed() == acc_ends(w), timeout=20, what="the snapshot's offsets to be committed")
        before = w.committed()
        proxy.freeze()  # Redis stops answering the worker: nothing read from now on is acknowledged
        load(w, 5000, 30)
        ends = acc_ends(w)
        # The worker reads everything (its lag goes to 0) but commits nothing past the snapshot.
        wait_until(lambda: all(p["lag"] == 0 for p in w.stats("a").get("kafka", {}).get("partitions", [{"lag": 1}])),
                   timeout=20, what="the worker to read every message")
        time.sleep(1.0)
        assert w.committed() == before
        assert ends != before
        w.workers[0].kill9()
        proxy.thaw()
        w.write_config(REDIS_URL)  # the next worker writes Redis directly
        w.worker("b")
        assert_views_equal(w.config, timeout=30)  # the records were applied again by the new worker
        wait_until(lambda: w.committed() == ends, timeout=20,
                   what="the offsets to be committed after the acknowledgement")
    finally:
        proxy.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_and_http_endpoint_describe_the_worker_group(world):
    import json
    import subprocess
    import sys
    import urllib.request

    from ..support import ROOT, Daemon

    w = world(REDIS_ONLY)
    w.snapshot()
    port = _free_port()
    d = Daemon(w.config, w.tmp / "http.log", "--http", f"127.0.0.1:{port}")
    d.start()
    w.workers.append(d)
    assert_views_equal(w.config, timeout=30)

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.read()
    wait_until(lambda: w.committed() == acc_ends(w), timeout=20, what="offsets committed")
    metrics = get("/metrics").decode()
    assert f'pgderive_kafka_worker_info{{group="{w.group}"}} 1.0' in metrics
    assert "pgderive_kafka_assigned_partitions 3.0" in metrics
    wait_until(lambda: 'pgderive_kafka_partition_lag_messages{partition="0"' in get("/metrics").decode(),
               timeout=10, what="the lag of partition 0 in /metrics")
    assert get("/").endswith(b"</html>")  # the status page renders
    get("/healthz")
    get("/readyz")
    status = json.loads(get("/status"))["status"]
    assert status["slot"]["status"] == "kafka worker"
    assert status["worker"]["group"] == w.group
    assert {(p["topic"], p["partition"]) for p in status["worker"]["partitions"]} == all_partitions(w), status["worker"]
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(w.config), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    kafka = doc["kafka"]
    assert kafka["group"] == w.group and kafka["error"] is None and len(kafka["members"]) == 1
    assert {(p["topic"], p["partition"]) for p in kafka["partitions"]} == all_partitions(w)
    assert kafka["lag_total"] == 0 and all(p["owner"] for p in kafka["partitions"])
    assert doc["views"][0]["records"] == 30
    text = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(w.config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert f"kafka group {w.group}" in text.stdout and "partitions" in text.stdout


def test_validate_and_run_refuse_unreachable_brokers_before_anything_is_created(world):
    import subprocess
    import sys

    from ..support import ROOT

    w = world(REDIS_ONLY)
    bad = w.tmp / "bad.yaml"
    bad.write_text(w.config.read_text().replace(w.bootstrap, "127.0.0.1:1"))
    for command in (["validate"], ["run"]):
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", *command, "-c", str(bad)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "source.kafka.bootstrap_servers: cannot reach the Kafka brokers 127.0.0.1:1" in out.stderr + out.stdout
    assert w.sql("SELECT to_regnamespace('pgderive') IS NULL") == [(True,)]  # nothing created


def test_a_worker_started_before_its_topics_exist_picks_them_up(world):
    w = world(REDIS_ONLY, topics=False)
    d = w.worker("a")
    time.sleep(2.0)
    assert d.alive()
    w.create_topics()
    w.snapshot()
    w.commit("UPDATE acc SET v = 'later' WHERE id = 5", [("u", "public.acc", 5)])
    assert_views_equal(w.config, timeout=40)


def test_truncate_and_reload_with_two_workers_keeps_only_the_reload(world):
    # Each worker sees the TRUNCATE on its own partitions, at its own time, while the other
    # already writes the reload (same version) and later rows: nothing older survives, nothing
    # newer is lost, in Redis and in OpenSearch.
    w = world()
    w.snapshot()
    w.worker("a"), w.worker("b")
    both = all_partitions(w, ("public.acc", "public.note"))
    wait_until(lambda: owned(w, "a") and owned(w, "b") and owned(w, "a") | owned(w, "b") == both
               and not owned(w, "a") & owned(w, "b"), timeout=30, what="both workers to own partitions")
    load(w, 1000, 30)
    reload = range(1, 41, 2)
    w.commit("TRUNCATE acc; " + ";".join(f"INSERT INTO acc VALUES ({i}, 'reloaded{i}', {i})" for i in reload),
             [("c", "public.acc", i) for i in reload], truncated=["public.acc"])
    load(w, 3000, 30)
    assert_views_equal(w.config, timeout=30)
    r = redis.Redis.from_url(REDIS_URL)
    assert not r.exists(f"{w.p}_:acc:1001") and r.hget(f"{w.p}_:acc:3", "v") == b"reloaded3"
