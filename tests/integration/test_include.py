"""Views with ``include:`` (nested objects and arrays, two levels deep) and ``derive:`` on
real services: every change of a root or included row re-derives exactly the affected
records, moves between parents included, and the sinks end equal to a fresh derivation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis
from opensearchpy import OpenSearch

from ..support import OPENSEARCH_URL, REDIS_URL, ROOT, assert_views_equal

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE categories (id int PRIMARY KEY, name text);
CREATE TABLE products (id int PRIMARY KEY, category_id int REFERENCES categories ON DELETE SET NULL,
                       name text, price numeric(10,2));
CREATE TABLE reviews (id int PRIMARY KEY, product_id int REFERENCES products ON DELETE CASCADE,
                      rating int, body text);
ALTER TABLE reviews REPLICA IDENTITY FULL;
CREATE TABLE orders (id int PRIMARY KEY, customer text);
CREATE TABLE order_items (id int PRIMARY KEY, order_id int REFERENCES orders ON DELETE CASCADE,
                          product_id int REFERENCES products ON DELETE CASCADE ON UPDATE CASCADE, qty int);
ALTER TABLE order_items REPLICA IDENTITY FULL;
INSERT INTO categories VALUES (1, 'tools'), (2, 'toys');
INSERT INTO products VALUES (1, 1, 'hammer', 9.50), (2, 1, 'saw', 20), (3, 2, 'ball', 1.25), (4, NULL, 'misc', 0);
INSERT INTO reviews VALUES (1, 1, 5, 'great'), (2, 1, 3, 'ok'), (3, 2, 1, 'bad');
INSERT INTO orders VALUES (1, 'ann'), (2, 'bob');
INSERT INTO order_items VALUES (1, 1, 1, 2), (2, 1, 3, 1), (3, 2, 2, 5);
"""
VIEWS = """
  P_prod:
    table: products
    sink: cache
    key: "P_:p:{id}"
    format: json
    fields: [id, name, price]
    include:
      category: {table: categories, on: {category_id: id}, fields: [name]}
      reviews: {table: reviews, on: {id: product_id}, many: true, order_by: [rating desc], limit: 2, fields: [rating, body]}
  P_ord:
    table: orders
    sink: search
    index: Pidx_orders
    include:
      items:
        table: order_items
        on: {id: order_id}
        many: true
        fields: [id, qty]
        include:
          product:
            table: products
            on: {product_id: id}
            fields: [name]
            include:
              category: {table: categories, on: {category_id: id}, fields: {category: name}}
  P_card:
    table: products
    sink: cache
    key: "P_:c:{id}"
    format: json
    fields: [name, price]
    include:
      reviews: {table: reviews, on: {id: product_id}, many: true, fields: [rating]}
    derive: tests.derivations:product_card
"""


def _get(r: redis.Redis, key: str):
    raw = r.get(key)
    return None if raw is None else json.loads(raw)


def test_nested_records_follow_every_related_change(scenario):
    s = scenario(SCHEMA, VIEWS)
    s.start()
    r = redis.Redis.from_url(REDIS_URL)
    os_ = OpenSearch([OPENSEARCH_URL])
    assert _get(r, f"{s.p}_:p:1") == {"id": 1, "name": "hammer", "price": "9.50", "category": {"name": "tools"},
                                       "reviews": [{"rating": 5, "body": "great"}, {"rating": 3, "body": "ok"}]}
    s.sql("UPDATE categories SET name = 'TOOLS' WHERE id = 1")           # many-to-one parent renamed
    s.sql("UPDATE products SET category_id = 2 WHERE id = 2")           # product moves category
    s.sql("INSERT INTO reviews VALUES (4, 1, 4, 'nice'), (5, 3, 2, 'meh')")  # array with a limit
    s.sql("UPDATE order_items SET order_id = 2 WHERE id = 2")            # child moves to another parent
    s.sql("UPDATE products SET name = 'sledge' WHERE id = 1")             # two levels down in orders
    s.caught_up()
    assert_views_equal(s.config)
    assert _get(r, f"{s.p}_:p:1")["reviews"] == [{"rating": 5, "body": "great"}, {"rating": 4, "body": "nice"}]
    assert _get(r, f"{s.p}_:p:2")["category"] == {"name": "toys"}
    doc = os_.get(index=f"{s.p.lower()}_orders", id="1")["_source"]
    assert doc["items"] == [{"id": 1, "qty": 2, "product": {"name": "sledge", "category": {"category": "TOOLS"}}}]
    assert [i["id"] for i in os_.get(index=f"{s.p.lower()}_orders", id="2")["_source"]["items"]] == [2, 3]

    s.sql("DELETE FROM categories WHERE id = 1")   # SET NULL on products: category becomes null
    s.sql("DELETE FROM products WHERE id = 2")     # cascades to reviews and order_items
    s.sql("DELETE FROM orders WHERE id = 1")       # root delete (and its items by cascade)
    s.sql("TRUNCATE reviews")                      # an included table emptied
    s.sql("UPDATE products SET id = 10 WHERE id = 3")  # root key change; ON UPDATE CASCADE moves items
    s.caught_up()
    assert_views_equal(s.config)
    assert _get(r, f"{s.p}_:p:1") == {"id": 1, "name": "sledge", "price": "9.50", "category": None, "reviews": []}
    assert _get(r, f"{s.p}_:p:2") is None and _get(r, f"{s.p}_:p:3") is None
    assert _get(r, f"{s.p}_:p:10")["name"] == "ball"
    assert not os_.exists(index=f"{s.p.lower()}_orders", id="1")


def test_derive_function_shapes_records_and_its_errors_are_dead_letters(scenario):
    s = scenario(SCHEMA, VIEWS)
    s.start()
    r = redis.Redis.from_url(REDIS_URL)
    assert _get(r, f"{s.p}_:c:1") == {"title": "Hammer", "cents": 950, "reviews": 2}
    s.sql("UPDATE products SET name = '_hidden' WHERE id = 1")  # derive returns None: removed
    s.sql("UPDATE products SET name = 'boom' WHERE id = 4")     # derive raises: a dead letter
    s.sql("INSERT INTO reviews VALUES (9, 3, 5, 'wow')")
    s.caught_up()
    assert _get(r, f"{s.p}_:c:1") is None
    assert _get(r, f"{s.p}_:c:3") == {"title": "Ball", "cents": 125, "reviews": 1}
    rows = s.sql("SELECT view, error FROM pgderive.dead_letters WHERE view = %s", (f"{s.p}_card",))
    assert len(rows) == 1 and "ValueError: boom is not a product" in rows[0][1], rows

    def retry() -> str:
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", "dead-letters", "retry", "-c", str(s.config)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        return out.stdout + out.stderr
    assert "still failing" in retry()                           # the row still says boom
    s.sql("UPDATE products SET name = 'bang' WHERE id = 4")     # fixed at the source
    s.caught_up()
    assert "dead letter removed" in retry()                     # re-derived with its includes
    assert _get(r, f"{s.p}_:c:4") == {"title": "Bang", "cents": 0, "reviews": 0}
    assert not s.sql("SELECT 1 FROM pgderive.dead_letters WHERE view = %s", (f"{s.p}_card",))


def test_validate_requires_full_identity_where_a_child_link_is_not_its_key(scenario):
    s = scenario(SCHEMA + "ALTER TABLE reviews REPLICA IDENTITY DEFAULT;", VIEWS)
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(s.config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "include.reviews.on" in out.stderr and 'ALTER TABLE "public"."reviews" REPLICA IDENTITY FULL' in out.stderr, out.stderr


def test_one_view_in_two_sinks_and_two_views_of_one_table(scenario):
    s = scenario(SCHEMA, """
  P_both:
    table: products
    sink: [cache, search]
    key: "P_:b:{id}"
    format: json
    index: Pidx_both
    fields: [id, name]
    include:
      category: {table: categories, on: {category_id: id}, fields: [name]}
  P_plain: {table: products, sink: cache, key: "P_:plain:{id}", fields: [id, price]}
""")
    s.start()
    s.sql("UPDATE categories SET name = 'gadgets' WHERE id = 2")
    s.sql("DELETE FROM products WHERE id = 4")
    s.caught_up()
    r = redis.Redis.from_url(REDIS_URL)
    os_ = OpenSearch([OPENSEARCH_URL])
    want = {"id": 3, "name": "ball", "category": {"name": "gadgets"}}
    assert _get(r, f"{s.p}_:b:3") == want
    assert os_.get(index=f"{s.p.lower()}_both", id=f"{s.p}_:b:3")["_source"] == want  # key = _id
    assert r.hget(f"{s.p}_:plain:3", "price") == b"1.25" and not r.exists(f"{s.p}_:plain:4")
    out = subprocess.run([sys.executable, "-m", "pgderive.cli", "verify", "-c", str(s.config), f"{s.p}_both"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.count("EQUAL") == 2, out.stdout + out.stderr
