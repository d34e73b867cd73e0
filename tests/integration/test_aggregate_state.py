"""Incremental group states (``pgderive.agg_groups``) against Postgres' own aggregates.

A seeded random sequence of inserts, updates and deletes runs on a real table; after each batch
the changed rows are fed to :meth:`AggregateStore.apply` as the engine feeds them (current row
or ``None``, increasing versions, sometimes a whole batch replayed), and the stored states must
give exactly what ``count``/``sum``/``avg``/``min``/``max`` compute over the table: numerics of
mixed display scales with ``NaN`` and ``±Infinity``, integer sums and averages, ``char(n)`` and
text extremes when the extreme is deleted, groups emptied and refilled. The second view adds a
float sum, which is recomputed per touched group instead of merged.
"""
from __future__ import annotations

import random
from decimal import Decimal, InvalidOperation

import orjson
import psycopg
import pytest

from pgderive.state.aggregates import AggregateStore
from views.aggregate import Aggregation
from cdc.catalog import table_info
from views.include import IncludeTree

from ..support import create_database, drop_database, unique

SCHEMA = """
CREATE TABLE src (id int PRIMARY KEY, g int, num numeric, dec numeric(12,3), big bigint, small smallint,
                  i int, f float8, t text, c char(3), ts timestamptz);
"""
EXACT = {"n": "count(*)", "cn": "count(num)", "sn": "sum(num)", "an": "avg(num)", "lo": "min(num)",
         "hi": "max(num)", "sd": "sum(dec)", "ad": "avg(dec)", "sb": "sum(big)", "ab": "avg(big)",
         "ss": "sum(small)", "as_": "avg(small)", "si": "sum(i)", "ci": "count(i)", "mt": "min(t)",
         "xt": "max(t)", "mc": "min(c)", "xts": "max(ts)"}
MIXED = {"n": "count(*)", "sf": "sum(f)", "af": "avg(f)", "sn": "sum(num)", "lo": "min(f)"}

NUMS = [None, "1", "1.5", "1.50", "-2.125", "0", "0.000", "1e20", "3.14159265358979323846", "NaN",
        "Infinity", "-Infinity", "-7"]
FLOATS = [None, "0.5", "1.25", "-2", "1000", "NaN", "Infinity", "-Infinity"]
TEXTS = [None, "a", "B", "b", "ab", "zz", "é", ""]


def _value(rnd: random.Random) -> tuple:
    return (rnd.randint(0, 4), rnd.choice(NUMS), rnd.choice([None, "1.5", "-0.125", "99.999"]),
            rnd.choice([None, 1, -5, 9_000_000_000_000_000]), rnd.choice([None, 1, 32767, -3]),
            rnd.choice([None, 2_000_000_000, -1, 7]), rnd.choice(FLOATS), rnd.choice(TEXTS),
            rnd.choice([None, "a", "ab", "b  "]), rnd.choice([None, "2026-01-01 00:00+00", "1999-12-31 23:59:59.5+00"]))


def _same(text: str | None) -> str | None:
    """Equal numerics of different display scales compare equal: ``min`` over 1.5 and 1.50 may
    give either, in Postgres as here (the first one met wins)."""
    try:
        d = Decimal(text)  # type: ignore[arg-type]
    except (TypeError, InvalidOperation):
        return text
    return str(d.normalize()) if d.is_finite() else text


def _groups(rows: list, agg: Aggregation) -> dict:
    extremes = [m.kind == "extreme" for m in agg.measures]
    return {tuple(orjson.loads(r[0])): tuple(_same(t) if x else t for t, x in zip(r[1:], extremes)) for r in rows}


@pytest.mark.parametrize("seed", [1, 2])
def test_incremental_states_equal_postgres_aggregates(seed):
    name = unique("aggstate")
    dsn = create_database(name)
    store = AggregateStore(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("INSERT INTO src SELECT g, g % 3, (g * 1.5)::numeric, 1.5, g, g, g, g * 0.5, 't' || g, 'c', "
                         "now() FROM generate_series(1, 20) g")
            info = table_info(conn, "public", "src")
            assert info is not None
            views = {"exact": Aggregation(["g"], EXACT, info, []), "mixed": Aggregation(["g"], MIXED, info, [])}
            assert views["exact"].incremental and not views["mixed"].incremental
            tree = IncludeTree(info, [(c, info.columns[c]) for c in info.columns], [], None)
            direct = {v: agg.direct_query(tree.select(), []) for v, agg in views.items()}
            for v, agg in views.items():
                store.reset(v)
                store.load(v, agg, ((tree.root_key(r), r) for rows in tree.rows(conn) for r in rows), 1)
            rnd = random.Random(seed)
            version, history = 1, []
            for step in range(120):
                ids = set()
                for _ in range(rnd.randint(1, 6)):
                    i, k = rnd.randint(1, 30), rnd.random()
                    if k < 0.45:
                        conn.execute("INSERT INTO src VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) "
                                     "DO UPDATE SET (g, num, dec, big, small, i, f, t, c, ts) = (excluded.g, excluded.num, "
                                     "excluded.dec, excluded.big, excluded.small, excluded.i, excluded.f, excluded.t, "
                                     "excluded.c, excluded.ts)", (i, *_value(rnd)))
                    elif k < 0.7:
                        conn.execute("UPDATE src SET g = %s WHERE id = %s", (rnd.choice([None, 0, 1, 2, 3]), i))
                    else:
                        conn.execute("DELETE FROM src WHERE id = %s", (i,))
                    ids.add((i,))
                version += 1
                found = {tree.root_key(r): r for rows in tree.rows(conn, sorted(ids)) for r in rows}
                batch = [(k, version, found.get(k)) for k in sorted(ids)]
                history.append(batch)
                for v, agg in views.items():
                    rows, touched = store.apply(v, agg, batch)
                    if rnd.random() < 0.2:  # a replay of an older batch changes nothing
                        store.apply(v, agg, rnd.choice(history))
                    want = _groups(conn.execute(direct[v]).fetchall(), agg)
                    got = _groups(rows, agg)
                    for g in touched:  # every touched group: current, or gone when empty
                        key = tuple(orjson.loads(g))
                        assert got.get(key) == want.get(key), (v, step, key, got.get(key), want.get(key))
                    if step % 10 == 9:
                        assert _groups(store.all_groups(v, agg), agg) == want, (v, step)
            with store.connection().transaction():
                states = store.connection().execute("SELECT count(*) FROM pgderive.agg_groups").fetchone()[0]
            assert states == sum(len(conn.execute(q).fetchall()) for q in direct.values())
            # A TRUNCATE tombstones every contribution and empties the states.
            conn.execute("TRUNCATE src")
            for v, agg in views.items():
                store.truncate(v, agg, version + 1)
                assert store.all_groups(v, agg) == []
    finally:
        store.close()
        drop_database(name)


def test_a_replay_re_emits_groups_a_lost_batch_moved():
    """kill -9 between a batch's commit in pgderive.agg_* and its sink write: the stream replays
    the batch, whose contributions are already stored. The groups it moved must come back from
    the replay too — here a group the row left and that became empty (its sink record would
    otherwise stay forever), and one changed by a later lost batch the replay precedes."""
    name = unique("aggreplay")
    dsn = create_database(name)
    store = AggregateStore(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE src (id int PRIMARY KEY, g int, n int)")
            conn.execute("INSERT INTO src VALUES (1, 10, 1), (2, 20, 2), (3, 30, 3)")
            info = table_info(conn, "public", "src")
            assert info is not None
            agg = Aggregation(["g"], {"c": "count(*)", "s": "sum(n)"}, info, [])
            tree = IncludeTree(info, [(c, info.columns[c]) for c in info.columns], [], None)
            store.reset("v")
            store.load("v", agg, ((tree.root_key(r), r) for rows in tree.rows(conn) for r in rows), 1)

            def current(i: int) -> dict | None:
                found = [r for rows in tree.rows(conn, [(i,)]) for r in rows]
                return found[0] if found else None
            # Batch at version 5 (lost): row 1 moves from group 10 (now empty) to group 20.
            conn.execute("UPDATE src SET g = 20 WHERE id = 1")
            lost5 = [((1,), 5, current(1))]
            _, touched = store.apply("v", agg, lost5)
            assert sorted(touched) == ['["10"]', '["20"]']
            # Batch at version 7 (lost too): row 3 leaves group 30 for group 20.
            conn.execute("UPDATE src SET g = 20 WHERE id = 3")
            store.apply("v", agg, [((3,), 7, current(3))])
            # The replay of version 5 must name group 10 (to delete) and 30 (moved at 7 >= 5).
            rows, touched = store.apply("v", agg, lost5)
            assert {'["10"]', '["20"]', '["30"]'} <= set(touched)
            assert _groups(rows, agg) == {("20",): ("3", "6")}  # 10 and 30 are empty: deletes
            # A replay of version 7 alone no longer names group 10 (moved at 5 < 7).
            _, touched = store.apply("v", agg, [((3,), 7, current(3))])
            assert '["10"]' not in touched and {'["20"]', '["30"]'} <= set(touched)
    finally:
        store.close()
        drop_database(name)


def test_two_workers_moving_the_same_groups_concurrently_end_exact():
    """Derivation workers (ARCHITECTURE.md, "Kafka workers"): two connections apply batches of
    disjoint rows to the same groups at once, out of version order between them, then a
    TRUNCATE arrives twice (once per partition) while rows after it keep coming. The states
    must equal Postgres' aggregates, each group's returned versions must be distinct and its
    highest-versioned result the final state (what the sinks keep), including deletes."""
    import threading

    name = unique("aggworkers")
    dsn = create_database(name)
    stores = [AggregateStore(dsn), AggregateStore(dsn)]
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            info = table_info(conn, "public", "src")
            assert info is not None
        agg = Aggregation(["g"], EXACT, info, [])
        tree = IncludeTree(info, [(c, info.columns[c]) for c in info.columns], [], None)
        direct = agg.direct_query(tree.select(), [])
        lock = threading.Lock()
        emitted: list[tuple[str, int, object]] = []  # (group, version, result or None)
        errors: list[BaseException] = []

        def record(moved) -> None:
            got = _groups(moved.rows, agg)
            with lock:
                for g in moved.touched:
                    emitted.append((g, moved.versions[g], got.get(tuple(orjson.loads(g)))))

        def run(worker: int, steps: int, base: int, truncate_at: int | None = None) -> None:
            try:
                rnd = random.Random(worker)
                store = stores[worker]
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for step in range(steps):
                        # versions interleave: worker 0 lags worker 1 by ~40 steps
                        version = base + 10 * step + (0 if worker else 400) + worker
                        if step == truncate_at:  # the second partition's TRUNCATE record
                            record(store.truncate_worker("v", agg, TRUNCATED))
                        ids = {rnd.randrange(60) * 2 + worker for _ in range(rnd.randint(1, 5))}
                        for i in ids:
                            if rnd.random() < 0.7:
                                conn.execute("INSERT INTO src VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                                             "ON CONFLICT (id) DO UPDATE SET g = excluded.g, num = excluded.num, "
                                             "i = excluded.i, f = excluded.f, t = excluded.t", (i, *_value(rnd)))
                            else:
                                conn.execute("DELETE FROM src WHERE id = %s", (i,))
                        found = {tree.root_key(r): r for rows in tree.rows(conn, sorted((i,) for i in ids))
                                 for r in rows}
                        record(store.apply_worker("v", agg, [((i,), version, found.get((i,))) for i in sorted(ids)]))
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                errors.append(e)

        TRUNCATED = 9_999
        threads = [threading.Thread(target=run, args=(w, 300, 1000)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors

        def check() -> None:
            with psycopg.connect(dsn) as conn:
                want = _groups(conn.execute(direct).fetchall(), agg)
            assert _groups(stores[0].all_groups("v", agg), agg) == want
            last: dict[str, tuple[int, object]] = {}
            seen: set[tuple[str, int]] = set()
            for g, v, result in emitted:
                assert (g, v) not in seen, (g, v)  # a group's versions never repeat
                seen.add((g, v))
                if g not in last or v > last[g][0]:
                    last[g] = (v, result)
            assert {tuple(orjson.loads(g)): r for g, (_, r) in last.items() if r is not None} == want

        check()
        # A TRUNCATE at 9,999 (the table emptied at the source): worker 0 reads it first, then
        # both apply rows after it while worker 1 reads it from its own partition.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE src")
        record(stores[0].truncate_worker("v", agg, TRUNCATED))
        threads = [threading.Thread(target=run, args=(w, 30, 10_000, 4 if w else None)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        check()
    finally:
        for s in stores:
            s.close()
        drop_database(name)


@pytest.mark.xfail(strict=True, reason="slot daemon: AggregateStore.truncate tombstones at V, so a row the "
                   "TRUNCATE's own transaction inserts again (same key, version V) is taken for a replay and "
                   "left out; truncate_worker tombstones at V - 1. Not changed here (daemon behaviour kept).")
def test_a_row_reinserted_in_the_truncates_transaction_counts():
    name = unique("aggreins")
    dsn = create_database(name)
    store = AggregateStore(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE s (id int PRIMARY KEY, g int)")
            info = table_info(conn, "public", "s")
            assert info is not None
        agg = Aggregation(["g"], {"n": "count(*)"}, info, [])
        store.apply("v", agg, [((1,), 100, {"id": 1, "g": 1})])
        store.truncate("v", agg, 200)  # TRUNCATE s; INSERT INTO s VALUES (1, 1) -- one transaction
        store.apply("v", agg, [((1,), 200, {"id": 1, "g": 1})])
        assert store.all_groups("v", agg) == [('["1"]', "1")]
    finally:
        store.close()
        drop_database(name)
