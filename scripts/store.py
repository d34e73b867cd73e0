#!/usr/bin/env python3
"""The "widget store": a small shop database, its data generator and a random workload.

It is the input of ``config/store.yaml`` and ``make demo-store`` (``scripts/demo_store.py``)::

    python scripts/store.py schema   --dsn DSN             # (re)create the seven tables
    python scripts/store.py load     --dsn DSN --scale 1   # fill them, set-based, then ANALYZE
    python scripts/store.py workload --dsn DSN --seconds 30 --seed 1   # random transactions

Tables (:data:`SCHEMA`): ``categories``, ``products`` (descriptions of 1–30 kB; every third
one an md5 chain that pglz cannot compress, so it is TOASTed out of line), ``inventory`` (at
most one row per product), ``customers``, ``orders``, ``order_items``, ``reviews``. Every
foreign-key column is indexed (pgderive looks up the rows an included row belongs to by it).

Replica identities (:data:`REPLICA_IDENTITY`): ``order_items`` and ``reviews`` are
``REPLICA IDENTITY FULL`` because views include them through a column that is not their key
(``order_items.order_id``, ``reviews.product_id``): a deleted or moved row must say which
order/product it belonged to, and only FULL puts the old value into the WAL. ``products``
keeps the default: ``category_stats`` needs each product's old category when it moves, but
pgderive keeps every row's last contribution itself (``pgderive.agg_rows``).

The workload (:func:`workload`) runs a fixed number of paced transactions per client
(``seconds × rate``), drawn from :data:`KINDS` by a per-client RNG seeded from ``seed``: the
counts per kind depend on the seed only, never on timing. Rows are picked at random (also from
the seed) among the rows that exist when the transaction runs; a transaction that loses a race
against the other client (foreign-key violation, deadlock, lock timeout) is rolled back and
retried with new picks, counted in ``retried``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import threading
import time
from decimal import Decimal
from typing import Any

import psycopg

__all__ = ["SCHEMA", "TABLES", "REPLICA_IDENTITY", "KINDS", "schema", "load", "expected_counts",
           "workload"]

log = logging.getLogger("store")

DEFAULT_DSN = os.environ.get("PGDERIVE_STORE_DSN", "postgresql://postgres@127.0.0.1:5433/store")

#: The tables in dependency order (referenced tables first).
TABLES = ("categories", "products", "inventory", "customers", "orders", "order_items", "reviews")

#: ``pg_class.relreplident`` of every table after :func:`schema`: ``d`` default (primary key),
#: ``f`` full (see the module docstring for why).
REPLICA_IDENTITY = {"categories": "d", "products": "d", "inventory": "d", "customers": "d",
                    "orders": "d", "order_items": "f", "reviews": "f"}

SCHEMA = """
CREATE TABLE categories (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    description text
);
CREATE TABLE products (
    id          serial PRIMARY KEY,
    category_id int REFERENCES categories ON DELETE SET NULL,
    name        text NOT NULL,
    description text,
    price       numeric(10,2) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE inventory (
    product_id  int PRIMARY KEY REFERENCES products ON DELETE CASCADE,
    stock       int NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int REFERENCES customers ON DELETE CASCADE,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE order_items (
    id          serial PRIMARY KEY,
    order_id    int NOT NULL REFERENCES orders ON DELETE CASCADE,
    product_id  int NOT NULL REFERENCES products ON DELETE CASCADE,
    quantity    int NOT NULL,
    unit_price  numeric(10,2) NOT NULL
);
CREATE TABLE reviews (
    id          serial PRIMARY KEY,
    product_id  int NOT NULL REFERENCES products ON DELETE CASCADE,
    customer_id int,
    rating      int NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- every foreign-key column (inventory.product_id is its primary key)
CREATE INDEX products_category_id_idx   ON products (category_id);
CREATE INDEX orders_customer_id_idx     ON orders (customer_id);
CREATE INDEX order_items_order_id_idx   ON order_items (order_id);
CREATE INDEX order_items_product_id_idx ON order_items (product_id);
CREATE INDEX reviews_product_id_idx     ON reviews (product_id);
-- the old value of a non-key column a view joins or groups by is only in the WAL with FULL
ALTER TABLE order_items REPLICA IDENTITY FULL;
ALTER TABLE reviews     REPLICA IDENTITY FULL;
"""

STATUSES = ("new", "paid", "shipped", "delivered", "cancelled")

#: Rows per table at scale 1 (:func:`expected_counts` scales them).
BASE_ROWS = {"categories": 20, "products": 2000, "inventory": 2000, "customers": 1000,
             "orders": 5000, "order_items": 15000, "reviews": 6000}

# Load statements, run in this order in one transaction after ``setseed`` (so a load is
# reproducible). Parameters: the row counts of expected_counts(). random() sits in a
# subquery over generate_series so it is evaluated per row.
_LOAD = (
    """INSERT INTO categories (id, name, description)
       SELECT g, 'Category ' || g, 'All kinds of category-' || g || ' widgets.'
       FROM generate_series(1, %(categories)s) g""",
    # ~1% of the products have no category; every third description is an md5 chain (hex that
    # pglz cannot shrink by 25%: stored uncompressed, out of line once > ~2 kB), the others
    # repeat a sentence (compressed inline).
    """INSERT INTO products (id, category_id, name, description, price, created_at)
       SELECT g,
              CASE WHEN g %% 97 = 0 THEN NULL ELSE cat END,
              'Widget ' || g,
              CASE WHEN g %% 3 = 0
                   THEN (SELECT string_agg(md5(g || ':' || i), '') FROM generate_series(1, len / 32) i)
                   ELSE left(repeat('Widget ' || g || ' is a sturdy, reliable widget. ', len / 30 + 1), len)
              END,
              price,
              timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
       FROM (SELECT g,
                    1 + floor(random() * %(categories)s)::int AS cat,
                    1024 + floor(random() * (30 * 1024 - 1024))::int AS len,
                    round((1 + random() * 999)::numeric, 2) AS price
             FROM generate_series(1, %(products)s) g) s""",
    # ~5% of the stock is below 10 (the low_stock view)
    """INSERT INTO inventory (product_id, stock, updated_at)
       SELECT g, floor(random() * 200)::int, timestamptz '2024-06-01 00:00:00+00'
       FROM generate_series(1, %(inventory)s) g""",
    """INSERT INTO customers (id, name, email)
       SELECT g, 'Customer ' || g, 'customer' || g || '@example.com'
       FROM generate_series(1, %(customers)s) g""",
    """INSERT INTO orders (id, customer_id, status, created_at)
       SELECT g, cust, (ARRAY['new','paid','shipped','delivered','cancelled'])[st], created_at
       FROM (SELECT g,
                    1 + floor(random() * %(customers)s)::int AS cust,
                    1 + floor(random() * 5)::int AS st,
                    timestamptz '2024-01-01 00:00:00+00' + random() * interval '365 days' AS created_at
             FROM generate_series(1, %(orders)s) g) s""",
    """INSERT INTO order_items (id, order_id, product_id, quantity, unit_price)
       SELECT s.g, s.ord, p.id, s.qty, p.price
       FROM (SELECT g,
                    1 + floor(random() * %(orders)s)::int AS ord,
                    1 + floor(random() * %(products)s)::int AS prod,
                    1 + floor(random() * 5)::int AS qty
             FROM generate_series(1, %(order_items)s) g) s
       JOIN products p ON p.id = s.prod""",
    """INSERT INTO reviews (id, product_id, customer_id, rating, body, created_at)
       SELECT g, prod, cust, rating,
              left(repeat('Rated ' || rating || ' stars by customer ' || cust || '. ', 20), len),
              timestamptz '2024-01-01 00:00:00+00' + random() * interval '365 days'
       FROM (SELECT g,
                    1 + floor(random() * %(products)s)::int AS prod,
                    1 + floor(random() * %(customers)s)::int AS cust,
                    1 + floor(random() * 5)::int AS rating,
                    40 + floor(random() * 400)::int AS len
             FROM generate_series(1, %(reviews)s) g) s""",
)


def expected_counts(scale: float) -> dict[str, int]:
    """Rows per table that :func:`load` inserts at ``scale`` (at least one each)."""
    return {t: max(1, round(n * scale)) for t, n in BASE_ROWS.items()}


def schema(dsn: str) -> None:
    """Drop the store's tables if they exist and create them (:data:`SCHEMA`)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TABLE IF EXISTS " + ", ".join(reversed(TABLES)) + " CASCADE")
        conn.execute(SCHEMA)


def load(dsn: str, scale: float = 1, seed: float = 0.42) -> dict[str, int]:
    """Fill the (empty) tables with generated rows, set-based, then ANALYZE.

    Returns the rows per table (:func:`expected_counts`). The data depend only on ``scale`` and
    ``seed`` (passed to ``setseed``, in [-1, 1]). Sequences are moved past the loaded ids.
    """
    counts = expected_counts(scale)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT setseed(%s)", (seed,))
        for stmt in _LOAD:
            conn.execute(stmt, counts)
        for table in TABLES:
            if table != "inventory":
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                             f" (SELECT coalesce(max(id), 0) + 1 FROM {table}), false)")
        # order_items joined products: all prod ids exist, so the count is exact
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE " + ", ".join(TABLES))
    return counts


# ---------------------------------------------------------------------------------------------
# workload

#: Transaction kinds and their relative weights. ``multi`` runs 2–5 other kinds in one
#: transaction, ``rollback`` runs 1–3 and rolls back.
KINDS: dict[str, int] = {
    "product_insert": 4,       # new product, usually with an inventory row
    "product_update": 4,       # rename (description untouched: unchanged TOAST) or new description
    "product_delete": 2,       # cascades to inventory, order_items, reviews
    "price_change": 8,
    "stock_change": 10,        # ± delta (upsert: creates a missing inventory row)
    "stock_low": 3,            # a row with stock ≥ 10 drops below 10
    "stock_restock": 3,        # a row with stock < 10 rises to ≥ 10
    "inventory_delete": 1,     # product without inventory
    "product_move": 5,         # 1–3 products move to another category
    "category_insert": 1,
    "category_rename": 2,
    "category_delete": 1,      # products.category_id SET NULL
    "customer_insert": 2,
    "customer_update": 3,
    "customer_delete": 1,      # cascades to orders and their items
    "order_insert": 8,         # order with 1–5 items
    "order_status": 6,
    "order_delete": 2,         # cascades to its items
    "order_item_move": 4,      # an item moves from one order to another
    "order_item_update": 2,    # quantity
    "order_item_delete": 1,
    "review_insert": 6,
    "review_edit": 2,
    "review_delete": 3,
    "multi": 4,
    "rollback": 2,
}
_SIMPLE = [k for k in KINDS if k not in ("multi", "rollback")]
_MAX_ATTEMPTS = 20


class _Tx:
    """One client's statements against an open transaction; picks rows with ``rng``."""

    def __init__(self, conn: psycopg.Connection, rng: random.Random) -> None:
        self.conn, self.rng = conn, rng

    # -- helpers ------------------------------------------------------------------------------
    def one(self, query: str, params: Any = None) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return row[0] if row else None

    def pick(self, table: str, col: str = "id", where: str = "TRUE", seq: str | None = None) -> int | None:
        """A random existing ``col`` of ``table`` (rows matching ``where``), or None if none.

        The first row at or after a uniform point in [1, the sequence's last value]; wraps to
        the smallest.
        """
        seq = seq or f"{table}_id_seq"
        return self.one(
            f"""SELECT coalesce(
                    (SELECT {col} FROM {table}
                     WHERE {where} AND {col} >= (SELECT ceil(%(u)s * last_value)::bigint FROM {seq})
                     ORDER BY {col} LIMIT 1),
                    (SELECT min({col}) FROM {table} WHERE {where}))""",
            {"u": self.rng.random()})

    def description(self) -> str:
        r = self.rng
        n = r.randint(1024, 30 * 1024)
        if r.random() < 0.4:  # incompressible: TOASTed out of line
            token = f"{r.getrandbits(64):x}"
            text = "".join(hashlib.md5(f"{token}:{i}".encode()).hexdigest() for i in range(n // 32 + 1))
            return text[:n]
        return (f"Widget v{r.randint(1, 99)}, improved. " * (n // 20 + 1))[:n]

    def price(self) -> str:
        return f"{self.rng.uniform(1, 1000):.2f}"

    # -- products -----------------------------------------------------------------------------
    def product_insert(self) -> None:
        r = self.rng
        cat = self.pick("categories") if r.random() < 0.95 else None
        pid = self.one("INSERT INTO products (category_id, name, description, price)"
                       " VALUES (%s, %s, %s, %s) RETURNING id",
                       (cat, f"Widget {r.getrandbits(32):08x}", self.description(), self.price()))
        if r.random() < 0.85:
            self.conn.execute("INSERT INTO inventory (product_id, stock) VALUES (%s, %s)",
                              (pid, r.randint(0, 200)))

    def product_update(self) -> None:
        pid = self.pick("products")
        name = f"Widget {self.rng.getrandbits(32):08x}"
        if self.rng.random() < 0.5:
            self.conn.execute("UPDATE products SET name = %s WHERE id = %s", (name, pid))
        else:
            self.conn.execute("UPDATE products SET name = %s, description = %s WHERE id = %s",
                              (name, self.description(), pid))

    def product_delete(self) -> None:
        self.conn.execute("DELETE FROM products WHERE id = %s", (self.pick("products"),))

    def price_change(self) -> None:
        factor = Decimal(f"{self.rng.uniform(0.8, 1.25):.3f}")
        self.conn.execute("UPDATE products SET price = least(greatest(round(price * %s, 2), 0.01), 99999.99)"
                          " WHERE id = %s", (factor, self.pick("products")))

    def product_move(self) -> None:
        for _ in range(self.rng.randint(1, 3)):
            pid, cat = self.pick("products"), self.pick("categories")
            self.conn.execute("UPDATE products SET category_id = %s WHERE id = %s"
                              " AND category_id IS DISTINCT FROM %s", (cat, pid, cat))

    # -- inventory ----------------------------------------------------------------------------
    def stock_change(self) -> None:
        r = self.rng
        pid = self.pick("products")
        if pid is None:
            return
        self.conn.execute(
            "INSERT INTO inventory (product_id, stock) VALUES (%s, %s)"
            " ON CONFLICT (product_id) DO UPDATE"
            " SET stock = greatest(0, inventory.stock + %s), updated_at = now()",
            (pid, r.randint(0, 200), r.randint(-20, 20)))

    def stock_low(self) -> None:
        pid = self.pick("inventory", "product_id", "stock >= 10", "products_id_seq")
        self.conn.execute("UPDATE inventory SET stock = %s, updated_at = now() WHERE product_id = %s",
                          (self.rng.randint(0, 9), pid))

    def stock_restock(self) -> None:
        pid = self.pick("inventory", "product_id", "stock < 10", "products_id_seq")
        self.conn.execute("UPDATE inventory SET stock = %s, updated_at = now() WHERE product_id = %s",
                          (self.rng.randint(10, 200), pid))

    def inventory_delete(self) -> None:
        self.conn.execute("DELETE FROM inventory WHERE product_id = %s",
                          (self.pick("inventory", "product_id", seq="products_id_seq"),))

    # -- categories ---------------------------------------------------------------------------
    def category_insert(self) -> None:
        n = self.rng.getrandbits(32)
        self.conn.execute("INSERT INTO categories (name, description) VALUES (%s, %s)",
                          (f"Category {n:08x}", f"New widgets {n:08x}."))

    def category_rename(self) -> None:
        self.conn.execute("UPDATE categories SET name = %s WHERE id = %s",
                          (f"Category {self.rng.getrandbits(32):08x}", self.pick("categories")))

    def category_delete(self) -> None:
        self.conn.execute("DELETE FROM categories WHERE id = %s", (self.pick("categories"),))
        if self.one("SELECT count(*) FROM categories") < 3:  # keep a few to move products to
            self.category_insert()

    # -- customers ----------------------------------------------------------------------------
    def customer_insert(self) -> None:
        n = self.rng.getrandbits(32)
        self.conn.execute("INSERT INTO customers (name, email) VALUES (%s, %s)",
                          (f"Customer {n:08x}", f"c{n:08x}@example.com"))

    def customer_update(self) -> None:
        n = self.rng.getrandbits(32)
        self.conn.execute("UPDATE customers SET name = %s, email = %s WHERE id = %s",
                          (f"Customer {n:08x}", f"c{n:08x}@example.org", self.pick("customers")))

    def customer_delete(self) -> None:
        self.conn.execute("DELETE FROM customers WHERE id = %s", (self.pick("customers"),))

    # -- orders -------------------------------------------------------------------------------
    def order_insert(self) -> None:
        r = self.rng
        oid = self.one("INSERT INTO orders (customer_id, status) VALUES (%s, 'new') RETURNING id",
                       (self.pick("customers"),))
        for _ in range(r.randint(1, 5)):
            self.conn.execute("INSERT INTO order_items (order_id, product_id, quantity, unit_price)"
                              " SELECT %s, id, %s, price FROM products WHERE id = %s",
                              (oid, r.randint(1, 5), self.pick("products")))

    def order_status(self) -> None:
        self.conn.execute("UPDATE orders SET status = %s WHERE id = %s",
                          (self.rng.choice(STATUSES), self.pick("orders")))

    def order_delete(self) -> None:
        self.conn.execute("DELETE FROM orders WHERE id = %s", (self.pick("orders"),))

    def order_item_move(self) -> None:
        item, target = self.pick("order_items"), self.pick("orders")
        self.conn.execute("UPDATE order_items SET order_id = %s WHERE id = %s AND order_id <> %s",
                          (target, item, target))

    def order_item_update(self) -> None:
        self.conn.execute("UPDATE order_items SET quantity = %s WHERE id = %s",
                          (self.rng.randint(1, 9), self.pick("order_items")))

    def order_item_delete(self) -> None:
        self.conn.execute("DELETE FROM order_items WHERE id = %s", (self.pick("order_items"),))

    # -- reviews ------------------------------------------------------------------------------
    def review_insert(self) -> None:
        r = self.rng
        rating = r.randint(1, 5)
        self.conn.execute("INSERT INTO reviews (product_id, customer_id, rating, body)"
                          " SELECT id, %s, %s, %s FROM products WHERE id = %s",
                          (self.pick("customers"), rating,
                           f"{rating} stars. " + "Works as described. " * r.randint(1, 20),
                           self.pick("products")))

    def review_edit(self) -> None:
        self.conn.execute("UPDATE reviews SET rating = %s, body = body || ' (edited)' WHERE id = %s",
                          (self.rng.randint(1, 5), self.pick("reviews")))

    def review_delete(self) -> None:
        self.conn.execute("DELETE FROM reviews WHERE id = %s", (self.pick("reviews"),))


def _plan(seed: int, client: int, n: int) -> list[tuple[str, list[str]]]:
    """The ``n`` transactions of one client: ``(kind, sub-kinds of multi/rollback)``.

    Every kind comes once (shuffled) before the weighted random draws, so any run of at least
    ``len(KINDS)`` transactions covers them all.
    """
    rng = random.Random(f"store-plan:{seed}:{client}")
    first = list(KINDS)
    rng.shuffle(first)
    names, weights = list(KINDS), list(KINDS.values())
    kinds = first[:n] + rng.choices(names, weights, k=max(0, n - len(first)))
    plan = []
    for kind in kinds:
        subs: list[str] = []
        if kind == "multi":
            subs = rng.choices(_SIMPLE, [KINDS[k] for k in _SIMPLE], k=rng.randint(2, 5))
        elif kind == "rollback":
            subs = rng.choices(_SIMPLE, [KINDS[k] for k in _SIMPLE], k=rng.randint(1, 3))
        plan.append((kind, subs))
    return plan


def _client(dsn: str, seed: int, client: int, n: int, interval: float, start: float,
            counts: dict[str, int], errors: list[BaseException], lock: threading.Lock,
            stop: threading.Event | None) -> None:
    local = dict.fromkeys([*KINDS, "retried", "failed"], 0)
    rng = random.Random(f"store-rows:{seed}:{client}")
    conn: psycopg.Connection | None = None
    try:
        for i, (kind, subs) in enumerate(_plan(seed, client, n)):
            if stop is not None and stop.is_set():
                break
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(dsn, options="-c lock_timeout=5s")
                    tx = _Tx(conn, rng)
                    for k in subs or [kind]:
                        getattr(tx, k)()
                    if kind == "rollback":
                        conn.rollback()
                    else:
                        conn.commit()
                    local[kind] += 1
                    break
                except psycopg.Error as e:
                    log.debug("client %d: %s failed (%s: %s)", client, kind, type(e).__name__, e)
                    if conn is not None and not conn.closed:
                        try:
                            conn.rollback()
                        except psycopg.Error:
                            conn.close()
                    if kind == "rollback":  # it ended in a rollback all the same
                        local[kind] += 1
                        break
                    local["retried"] += 1
                    time.sleep(0.005 * (attempt + 1))
            else:
                local["failed"] += 1
    except BaseException as e:  # a bug, not a race: workload() re-raises it
        errors.append(e)
    finally:
        if conn is not None:
            conn.close()
        with lock:
            for k, v in local.items():
                counts[k] = counts.get(k, 0) + v


def workload(dsn: str, seconds: float, seed: int = 0, clients: int = 2, rate: float = 100.0,
             stop: threading.Event | None = None) -> dict[str, int]:
    """Run random transactions against the store for about ``seconds``.

    ``clients`` connections each run ``round(seconds × rate / clients)`` transactions, paced
    evenly over ``seconds`` (``rate`` transactions/s in total; a slow server stretches the run
    instead of dropping transactions). Which kinds run depends only on ``seed``; rows are picked
    at random among those that exist at the time. A transaction that fails (a foreign-key race
    with the other client, a deadlock, a lock timeout) is rolled back and retried with new picks,
    up to 20 times (then counted in ``failed``). Setting ``stop`` ends the run early.

    Returns committed transactions per kind (``rollback``: deliberately rolled back), plus
    ``retried`` (failed attempts that were retried: timing-dependent), ``failed`` (gave up) and
    ``transactions`` (kinds in total). Everything except ``retried`` is the same for the same
    ``seed``, ``seconds``, ``clients`` and ``rate`` unless ``stop`` was set or ``failed`` > 0.
    """
    if clients < 1 or rate <= 0:
        raise ValueError("clients must be ≥ 1 and rate > 0")
    n = max(1, round(seconds * rate / clients))
    interval = clients / rate
    counts: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = time.monotonic()
    threads = [threading.Thread(target=_client, name=f"store-client-{c}",
                                args=(dsn, seed, c, n, interval, start, counts, errors, lock, stop))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out = {k: counts.get(k, 0) for k in KINDS}
    out["transactions"] = sum(out.values())
    out["retried"] = counts.get("retried", 0)
    out["failed"] = counts.get("failed", 0)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line: ``schema``, ``load``, ``workload`` (see the module docstring)."""
    p = argparse.ArgumentParser(description="The widget store: schema, data generator, workload.")
    p.add_argument("command", choices=["schema", "load", "workload"])
    p.add_argument("--dsn", default=DEFAULT_DSN, help="the store database (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="load: 1 = 20 categories, 2,000 products, 15,000 order items, …")
    p.add_argument("--seconds", type=float, default=30.0, help="workload: duration")
    p.add_argument("--seed", type=int, default=1, help="workload: RNG seed")
    p.add_argument("--clients", type=int, default=2, help="workload: concurrent connections")
    p.add_argument("--rate", type=float, default=100.0, help="workload: transactions/s in total")
    p.add_argument("-v", "--verbose", action="store_true", help="log every retried transaction")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    t0 = time.monotonic()
    result: dict[str, Any]
    if args.command == "schema":
        schema(args.dsn)
        result = {"tables": list(TABLES)}
    elif args.command == "load":
        result = {"rows": load(args.dsn, args.scale)}
    else:
        result = {"counts": workload(args.dsn, args.seconds, args.seed, args.clients, args.rate)}
    result["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(result, indent=2))
    return 1 if result.get("counts", {}).get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
