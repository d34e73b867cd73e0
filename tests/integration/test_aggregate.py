"""``group_by`` + ``aggregate`` on real services: moves between groups, deletes of the current
minimum, NULLs, groups that empty out, aggregates over an include, and exactly-once counts
under ``kill -9`` with a random workload."""
from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from ..support import OPENSEARCH_URL, REDIS_URL, assert_views_equal

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE products (id int PRIMARY KEY, category_id int, name text, price numeric(10,2));
CREATE TABLE inventory (product_id int PRIMARY KEY, stock int NOT NULL);
INSERT INTO products SELECT g, g % 3, 'p' || g, (g * 1.10)::numeric(10,2) FROM generate_series(1, 30) g;
INSERT INTO inventory SELECT g, g * 2 FROM generate_series(1, 30) g;
"""
VIEWS = """
  P_stats:
    table: products
    sink: cache
    key: "P_:cat:{category_id}"
    format: hash
    where: "category_id IS NOT NULL"
    include:
      inventory: {table: inventory, on: {id: product_id}, fields: [stock]}
    group_by: [category_id]
    aggregate: {n: "count(*)", priced: "count(price)", total: "sum(price)", avg_price: "avg(price)",
                lo: "min(price)", hi: "max(price)", last_name: "max(name)", stock: "sum(inventory.stock)"}
  P_os:
    table: products
    sink: search
    index: Pidx_stats
    where: "category_id IS NOT NULL"
    group_by: [category_id]
    aggregate: {n: "count(*)", total: "sum(price)"}
"""


def test_groups_follow_moves_deletes_nulls_and_empty_out(scenario):
    s = scenario(SCHEMA, VIEWS)
    s.start()
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    # category 1: ids 1, 4, …, 28 (10 rows); min price 1.10 (id 1)
    assert r.hget(f"{s.p}_:cat:1", "n") == "10" and r.hget(f"{s.p}_:cat:1", "lo") == "1.10"
    s.sql("DELETE FROM products WHERE id = 1")                       # the current minimum
    s.sql("UPDATE products SET category_id = 2 WHERE id = 4")        # moves between groups
    s.sql("UPDATE products SET price = NULL WHERE id = 7")           # NULLs are not counted
    s.sql("UPDATE inventory SET stock = stock + 1000 WHERE product_id = 10")  # an included row
    s.sql("INSERT INTO products VALUES (100, 7, 'new', 5)")          # a new group
    s.caught_up()
    assert_views_equal(s.config)
    cat1 = r.hgetall(f"{s.p}_:cat:1")
    assert cat1["n"] == "8" and cat1["priced"] == "7" and cat1["lo"] == "11.00", cat1
    assert r.hget(f"{s.p}_:cat:7", "n") == "1"
    s.sql("DELETE FROM products WHERE category_id = 7")              # the group empties: removed
    s.sql("UPDATE products SET category_id = NULL WHERE category_id = 0")  # leaves via where
    s.caught_up()
    assert_views_equal(s.config)
    assert not r.exists(f"{s.p}_:cat:7") and not r.exists(f"{s.p}_:cat:0")
    os_ = OpenSearch([OPENSEARCH_URL])
    assert os_.get(index=f"{s.p.lower()}_stats", id="1")["_source"]["n"] == 8


def _workload(dsn: str, seconds: float, seed: int) -> int:
    rnd = random.Random(seed)
    n = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            i = rnd.randint(1, 60)
            k = rnd.random()
            if k < 0.3:
                conn.execute("INSERT INTO products VALUES (%s, %s, 'w' || %s, %s) ON CONFLICT (id) DO UPDATE "
                             "SET category_id = excluded.category_id", (i, rnd.randint(0, 5), i,
                                                                        rnd.choice([None, "1.00", "2.50", "9.99"])))
            elif k < 0.55:
                conn.execute("UPDATE products SET category_id = %s WHERE id = %s", (rnd.choice([None, 1, 2, 3]), i))
            elif k < 0.7:
                conn.execute("UPDATE products SET price = %s WHERE id = %s", (rnd.choice([None, "0.01", "7.77"]), i))
            elif k < 0.85:
                conn.execute("DELETE FROM products WHERE id = %s", (i,))
            else:
                conn.execute("INSERT INTO inventory VALUES (%s, %s) ON CONFLICT (product_id) DO UPDATE SET "
                             "stock = inventory.stock + excluded.stock", (i, rnd.randint(-5, 5)))
            n += 1
    return n


def test_aggregates_are_exactly_once_under_kill9(scenario):
    s = scenario(SCHEMA, VIEWS)
    d = s.start()
    done: list[int] = []
    w = threading.Thread(target=lambda: done.append(_workload(s.dsn, 12, 7)))
    w.start()
    try:
        for _ in range(4):
            time.sleep(2.5)
            d.kill9()
            d = s.daemon = type(d)(s.config, s.log).start()
    finally:
        w.join()
    s.caught_up(120)
    assert_views_equal(s.config, timeout=120)
    assert done and done[0] > 100, done
    assert "resuming slot" in d.output()
