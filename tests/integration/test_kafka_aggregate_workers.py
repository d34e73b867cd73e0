"""Aggregate views (``group_by`` + ``aggregate``) derived by two workers of one consumer group
on the real broker, Postgres, Redis and OpenSearch (ARCHITECTURE.md, "Kafka workers"). The rows
of every group are spread over all partitions (messages are keyed by the row's own id), so both
workers move every group concurrently; every group record must end equal to a fresh
``GROUP BY`` of the source (``pgderive verify``'s diff) after concurrent writers, rows moving
between groups, deletes that empty groups, a ``kill -9`` of one worker mid-load and TRUNCATEs."""
from __future__ import annotations

import random
import threading
import time
import zlib

import psycopg
import pytest
import redis

from cdc.lsn import parse_lsn

from cdc.envelope import encode_key

from ..kafka_support import PARTITIONS, World
from ..support import REDIS_URL, assert_views_equal, wait_until
from .test_kafka_workers import all_partitions, owned

pytestmark = pytest.mark.slow

GROUPS = 6
SCHEMA = f"""
CREATE TABLE sale (id int PRIMARY KEY, grp int NOT NULL, n int, price numeric(8,2), w float8);
INSERT INTO sale SELECT i, i % {GROUPS}, i, (i % 7) * 1.25, i * 0.5 FROM generate_series(1, 60) i;
"""
TABLES = ["public.sale"]
VIEWS = """
  P_by_grp:
    table: sale
    sink: cache
    key: "P_:grp:{grp}"
    group_by: [grp]
    aggregate: {cnt: "count(*)", total: "sum(n)", counted: "count(n)", top: "max(n)", low: "min(price)",
                avg_price: "avg(price)"}
  P_by_grp_search:
    table: sale
    sink: search
    index: Pidx_grp
    group_by: [grp]
    aggregate: {cnt: "count(*)", total: "sum(n)", wsum: "sum(w)"}
"""


@pytest.fixture
def world(tmp_path, kafka_bootstrap):
    made: list[World] = []

    def make() -> World:
        w = World(tmp_path, kafka_bootstrap, SCHEMA, TABLES, VIEWS)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def two_workers(w: World) -> None:
    """Start workers a and b and wait until they split the partitions."""
    w.worker("a"), w.worker("b")
    every = all_partitions(w, ("public.sale",))
    wait_until(lambda: owned(w, "a") and owned(w, "b") and owned(w, "a") | owned(w, "b") == every
               and not owned(w, "a") & owned(w, "b"), timeout=30, what="both workers to own partitions")


def writer(w: World, seed: int, ids: range, rounds: int, pause: float, existing: bool) -> None:
    """``rounds`` transactions of inserts (ids from ``ids``), updates of ``n`` and of ``grp``
    (a row moving between groups) and deletes, a few rows each, each published after its
    commit. Rows of one transaction fall on every partition."""
    rnd = random.Random(seed)
    live = set(rnd.sample(range(1, 61), 20)) if seed % 2 else set()  # writers share no row
    fresh = iter(ids)
    for _ in range(rounds):
        time.sleep(pause)
        stmts, changes = [], []
        for _ in range(rnd.randint(1, 4)):
            kind = rnd.random()
            if kind < 0.4 or not live:
                i = next(fresh)
                live.add(i)
                stmts.append(f"INSERT INTO sale VALUES ({i}, {rnd.randrange(GROUPS)}, {rnd.randint(-5, 50)}, "
                             f"{rnd.randint(0, 900) / 4}, {rnd.randint(0, 400) / 4})")  # w: exact in float8
                changes.append(("c", "public.sale", i))
                continue
            i = rnd.choice(sorted(live))
            if any(c[2] == i for c in changes):
                continue  # one change per row and transaction, as the publisher would send it
            if kind < 0.65:
                stmts.append(f"UPDATE sale SET n = n + {rnd.randint(1, 9)} WHERE id = {i}")
                changes.append(("u", "public.sale", i))
            elif kind < 0.85:
                stmts.append(f"UPDATE sale SET grp = {rnd.randrange(GROUPS)}, w = w + 1 WHERE id = {i}")
                changes.append(("u", "public.sale", i))
            else:
                live.discard(i)
                stmts.append(f"DELETE FROM sale WHERE id = {i}")
                changes.append(("d", "public.sale", i))
        if stmts:
            w.commit(";".join(stmts), changes)


def load(w: World, rounds: int, pause: float, ids: int = 1000, existing: bool = True) -> None:
    """Two writers side by side (their commits interleave in LSN order across partitions),
    inserting ids from ``ids`` on (writer 1) and ``ids + 1000`` on (writer 2). A writer's
    error fails the test."""
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            writer(w, seed, range(ids + 1000 * (seed - 1), ids + 1000 * (seed - 1) + 900), rounds, pause, existing)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_two_workers_keep_aggregate_views_exact_across_a_kill9(world):
    w = world()
    w.snapshot()
    two_workers(w)
    assert_views_equal(w.config, timeout=45)
    failed: list[BaseException] = []

    def loading() -> None:
        try:
            load(w, 120, 0.03)  # ~5-8 s
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)
    loader = threading.Thread(target=loading)
    loader.start()
    time.sleep(1.5)
    assert loader.is_alive()
    w.workers[1].kill9()  # mid-load: its partitions replay on the survivor
    loader.join(120)
    assert not failed, failed
    # an emptied group (deleted from the sinks) that comes back
    w.commit(f"DELETE FROM sale WHERE grp = {GROUPS - 1}",
             [("d", "public.sale", i) for (i,) in w.sql(f"SELECT id FROM sale WHERE grp = {GROUPS - 1}") or []])
    wait_until(lambda: owned(w, "a") == all_partitions(w, ("public.sale",)), timeout=30,
               what="the survivor to take every partition")
    assert_views_equal(w.config, timeout=45)
    r = redis.Redis.from_url(REDIS_URL)
    assert not r.exists(f"{w.p}_:grp:{GROUPS - 1}")
    w.commit(f"INSERT INTO sale VALUES (9000, {GROUPS - 1}, 3, 1.50, 0.25)", [("c", "public.sale", 9000)])
    w.worker("c")  # a fresh member joins: a rebalance while the view is current
    load(w, 30, 0.02, ids=5000, existing=False)
    assert_views_equal(w.config, timeout=45)
    assert r.hget(f"{w.p}_:grp:0", "cnt") == str(w.sql("SELECT count(*) FROM sale WHERE grp = 0")[0][0]).encode()
    assert w.workers[0].alive() and w.workers[2].alive()


def test_truncate_and_reload_of_an_aggregated_table_with_two_workers(world):
    # Each worker reads the TRUNCATE on its own partitions, at its own time, while the other
    # already moves the groups by the reload and later rows: the groups end exactly as the
    # source's, in Redis and OpenSearch.
    w = world()
    w.snapshot()
    two_workers(w)
    load(w, 30, 0.0)
    reload = range(1, 41, 3)
    w.commit("TRUNCATE sale; " + ";".join(f"INSERT INTO sale VALUES ({i}, {i % 3}, {i}, 2.50, 1)" for i in reload),
             [("c", "public.sale", i) for i in reload], truncated=["public.sale"])
    load(w, 30, 0.0, ids=5000, existing=False)
    assert_views_equal(w.config, timeout=45)


def _commit_unpublished(w: World, statement: str) -> tuple[int, int]:
    """Run ``statement`` in a transaction of its own without publishing it: ``(commit LSN, xid)``."""
    with psycopg.connect(w.dsn) as conn:
        xid = conn.execute("SELECT txid_current() % 4294967296").fetchone()[0]
        conn.execute(statement)
        conn.commit()
        lsn = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    return lsn, int(xid)


def _partition(i: int) -> int:
    """The partition of row ``i``'s messages: librdkafka's default partitioner for keyed
    messages (``consistent_random``: CRC-32 of the key modulo the partition count)."""
    key = encode_key({"id": i})
    return zlib.crc32(key if isinstance(key, bytes) else key.encode()) % PARTITIONS


def test_a_group_change_read_after_a_newer_one_still_lands(world):
    # Rows x and y of group 0 sit on partitions of different workers. The change of x commits
    # first (LSN 1), the change of y later (LSN 2), but y's is read first (x's consumer is
    # behind): group 0 is written from a state with the new y and the old x. Then x's change is
    # read, on the other worker, and group 0 is written again, now complete. With the change's
    # LSN as the version that write (LSN 1 < LSN 2) is refused by the sinks and the group stays
    # without it; with the group's own version it lands.
    w = world()
    w.snapshot()
    two_workers(w)
    assert_views_equal(w.config, timeout=45)
    topic = w.topics[0]
    of_a = {p for t, p in owned(w, "a") if t == topic}
    x = next(i for i in range(6, 61, GROUPS) if _partition(i) in of_a)
    y = next(i for i in range(6, 61, GROUPS) if _partition(i) not in of_a)
    (total,) = w.sql("SELECT sum(n) FROM sale WHERE grp = 0")[0]
    lsn1, xid1 = _commit_unpublished(w, f"UPDATE sale SET n = n + 100 WHERE id = {x}")
    lsn2, xid2 = _commit_unpublished(w, f"UPDATE sale SET n = n + 1000 WHERE id = {y}")
    assert lsn1 < lsn2
    rows = {("public.sale", i): w.sql(f"SELECT to_jsonb(s) FROM sale s WHERE id = {i}")[0][0] for i in (x, y)}
    r = redis.Redis.from_url(REDIS_URL)
    w.publish(lsn2, xid2, [("u", "public.sale", y)], rows)
    wait_until(lambda: r.hget(f"{w.p}_:grp:0", "total") == str(total + 1000).encode(), timeout=30,
               what="group 0 to have y's change only")
    w.publish(lsn1, xid1, [("u", "public.sale", x)], rows)
    assert_views_equal(w.config, timeout=30)
    assert r.hget(f"{w.p}_:grp:0", "total") == str(total + 1100).encode()
