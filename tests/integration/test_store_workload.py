"""The widget store (scripts/store.py) against real Postgres: schema, load and random workload.

No pgderive here: these tests check the demo's input itself — row counts, replica identities,
indexes, TOASTed descriptions, and that the workload runs every kind of transaction, keeps
referential integrity and is reproducible by seed.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Iterator

import psycopg
import pytest

from tests.support import ROOT, create_database, drop_database, unique

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("pgderive_store_demo", ROOT / "scripts" / "store.py")
assert _spec is not None and _spec.loader is not None
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)

SCALE = 0.2  # 4 categories, 400 products, 3,000 order items, …


@pytest.fixture
def store_db() -> Iterator[Callable[[], str]]:
    """Factory: a fresh database with the store's schema, loaded at SCALE; returns its DSN."""
    names: list[str] = []

    def make() -> str:
        name = unique("store")
        names.append(name)
        dsn = create_database(name)
        store.schema(dsn)
        store.load(dsn, SCALE)
        return dsn

    yield make
    for name in names:
        drop_database(name)


def _scalar(conn: psycopg.Connection, query: str) -> object:
    return conn.execute(query).fetchone()[0]  # type: ignore[index]


def test_schema_and_load(store_db: Callable[[], str]) -> None:
    dsn = store_db()
    expected = store.expected_counts(SCALE)
    assert expected == {"categories": 4, "products": 400, "inventory": 400, "customers": 200,
                        "orders": 1000, "order_items": 3000, "reviews": 1200}
    with psycopg.connect(dsn) as conn:
        assert {t: _scalar(conn, f"SELECT count(*) FROM {t}") for t in store.TABLES} == expected

        identities = dict(conn.execute(
            "SELECT relname::text, relreplident::text FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'").fetchall())
        assert identities == {"categories": "d", "products": "d", "inventory": "d", "customers": "d",
                              "orders": "d", "order_items": "f", "reviews": "f"}
        assert identities == store.REPLICA_IDENTITY

        # every foreign-key column leads some index
        unindexed = conn.execute("""
            SELECT c.conrelid::regclass::text, a.attname::text
            FROM pg_constraint c
            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
            WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
              AND NOT EXISTS (SELECT 1 FROM pg_index i
                              WHERE i.indrelid = c.conrelid AND i.indkey[0] = c.conkey[1])""").fetchall()
        assert unindexed == []
        assert _scalar(conn, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
                             " AND connamespace = 'public'::regnamespace") == 6

        lengths = conn.execute("SELECT min(octet_length(description)), max(octet_length(description))"
                               " FROM products").fetchone()
        assert lengths is not None and 1024 <= lengths[0] and lengths[1] <= 30 * 1024
        # md5 chains are stored uncompressed, and out of line: the TOAST table has data
        assert _scalar(conn, "SELECT count(*) FROM products"
                             " WHERE pg_column_size(description) >= octet_length(description)") > 50
        assert _scalar(conn, "SELECT pg_relation_size(reltoastrelid) FROM pg_class"
                             " WHERE oid = 'products'::regclass") > 0
        assert _scalar(conn, "SELECT count(*) FROM products WHERE category_id IS NULL") > 0
        assert _scalar(conn, "SELECT count(*) FROM inventory WHERE stock < 10") > 0
        # sequences are past the loaded ids: plain inserts work
        conn.execute("INSERT INTO categories (name) VALUES ('new')")
        assert _scalar(conn, "SELECT max(id) FROM categories") == expected["categories"] + 1


INTEGRITY = {
    "products without their category": "SELECT count(*) FROM products p WHERE p.category_id IS NOT NULL"
                                       " AND NOT EXISTS (SELECT 1 FROM categories c WHERE c.id = p.category_id)",
    "inventory without product": "SELECT count(*) FROM inventory i"
                                 " WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = i.product_id)",
    "orders without customer": "SELECT count(*) FROM orders o WHERE o.customer_id IS NOT NULL"
                               " AND NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)",
    "items without order": "SELECT count(*) FROM order_items x"
                           " WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = x.order_id)",
    "items without product": "SELECT count(*) FROM order_items x"
                             " WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = x.product_id)",
    "reviews without product": "SELECT count(*) FROM reviews r"
                               " WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = r.product_id)",
    "negative stock": "SELECT count(*) FROM inventory WHERE stock < 0",
    "orders without customer_id": "SELECT count(*) FROM orders WHERE customer_id IS NULL",
}


def test_workload_every_kind_integrity_reproducible(store_db: Callable[[], str]) -> None:
    runs = []
    for _ in range(2):
        dsn = store_db()
        counts = store.workload(dsn, 5, seed=11)
        assert counts["failed"] == 0, counts
        assert counts["transactions"] == 500  # 2 clients × round(5 s × 100 tx/s / 2)
        assert sum(counts[k] for k in store.KINDS) == counts["transactions"]
        assert [k for k in store.KINDS if counts[k] < 1] == [], counts
        with psycopg.connect(dsn) as conn:
            broken = {what: n for what, q in INTEGRITY.items() if (n := _scalar(conn, q))}
            assert broken == {}
            # the workload did write: new rows beyond the loaded ids in every growing table
            for table in ("categories", "products", "customers", "orders", "order_items", "reviews"):
                assert _scalar(conn, f"SELECT max(id) FROM {table}") > store.expected_counts(SCALE)[table]
            assert _scalar(conn, "SELECT count(*) FROM products WHERE category_id IS NULL") > 0
        runs.append({k: v for k, v in counts.items() if k != "retried"})  # retries depend on timing
    assert runs[0] == runs[1]
