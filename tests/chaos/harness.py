"""Crash harness ("crash anywhere"): ``kill -9`` the ``pgderive run`` daemon at random moments.

A background thread (its own connection) runs a mixed workload against two watched tables and an
unwatched one — inserts, updates (NULLs, primary-key changes incl. composite keys and swaps),
deletes, TRUNCATEs (alone, with refills, amid other changes of the same transaction, together
with an unwatched table), multi-statement transactions with savepoints and rollbacks, and a few
transactions of 5,000–20,000 rows — while the main thread kills the daemon (five views: Redis
hash, Redis json and OpenSearch over ``items``; Redis json and OpenSearch over ``events``) with
SIGKILL after a random 0.2–3 s of life and starts it again, over and over:

1. during the first bootstrap of the seeded source, until ``BOOT_KILLS`` kills landed in the
   snapshot load (slot created, bootstrap not done; these kills come 0–0.4 s after the slot was
   created, not 0.2–3 s after the start); then one start is let finish its bootstrap;
2. while it streams, until ``KILLS - BOOT_KILLS - 1`` kills landed after the start-up (kills in
   the start-up — before the slot is created or resumed — happen too but do not count) and every
   big and TRUNCATE transaction was committed; ``RESNAPSHOTS`` times in between, a start with
   ``--resnapshot`` is killed in its bootstrap over full sinks and restarted without the flag;
3. the workload stops, a last daemon (left alive) must catch up with the slot, every view must
   equal what its derivation gives on the source (:func:`tests.support.assert_views_equal`), no
   dead letter may have been recorded, and a SIGTERM must stop it with exit code 0.

A daemon that exits by itself fails the run, except for "slot in use" (the killed predecessor's
walsender has not noticed yet) and an error saying a service was unreachable (a supervisor would
restart it; at most 5 times, listed in the result). The run's directory (default
``.services/chaos/<time>-seed<seed>/``) holds the YAML, ``daemon.log`` (every start and kill is
marked with a ``=== chaos`` line) and, after a failure, ``failure.txt``.

Random but reproducible: everything derives from one seed (``PGDERIVE_CHAOS_SEED``, random if
unset, printed in every failure). The workload's SQL sequence and the list of kill delays are
pure functions of the seed (separate RNGs); only their interleaving depends on timing.

Environment (all optional; the CI test uses the defaults of :class:`ChaosConfig`):

=============================  =====================================================================
``PGDERIVE_CHAOS_SEED``        the seed (int)
``PGDERIVE_CHAOS_KILLS``       minimum number of kills in total (default 20)
``PGDERIVE_CHAOS_BOOT_KILLS``  kills that must land in the first bootstrap's snapshot load (3)
``PGDERIVE_CHAOS_RESNAPSHOTS`` ``--resnapshot`` restarts, each killed in its bootstrap (1)
``PGDERIVE_CHAOS_ROWS``        rows seeded into ``items`` before the first start (25000; ``events``
                               gets a quarter of that)
``PGDERIVE_CHAOS_TPS``         workload rate, transactions per second (150)
``PGDERIVE_CHAOS_BIG_TX``      transactions of 5k–20k rows (4)
``PGDERIVE_CHAOS_TRUNCATES``   TRUNCATE transactions of watched tables (4)
``PGDERIVE_CHAOS_TIMEOUT``     seconds allowed for the final catch-up + comparison (180)
``PGDERIVE_CHAOS_KEEP``        1: keep the database and sink data after a failure (for inspection),
                               and the run's directory under ``.services/chaos/`` even on success
=============================  =====================================================================
"""
from __future__ import annotations

import os
import random
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psycopg


from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Daemon, assert_views_equal, create_database,
                      current_lsn, drop_database, drop_views, slot_caught_up, unique, wait_until)

__all__ = ["ChaosConfig", "ChaosRun", "ChaosFailure", "Workload", "run_chaos"]

KILL_MIN, KILL_MAX = 0.2, 3.0
CHAOS_DIR = ROOT / ".services" / "chaos"
_FATAL = re.compile(r"^(error: .*|Traceback \(most recent call last\):)$", re.M)
# Exits a supervisor would just restart: a service briefly unreachable (shared machines, slow GC).
_TRANSIENT = re.compile(r"unavailable|ConnectionTimeout|connection failed|Connection refused|"
                        r"database system is (starting up|shutting down)|administrator command", re.I)
MAX_ENV_RESTARTS = 5

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int, price numeric(12,2),
                    tags text[], meta jsonb, note text, updated timestamptz DEFAULT now());
CREATE TABLE events (tenant int NOT NULL, code text NOT NULL, seq bigint NOT NULL, amount numeric,
                     flag boolean, payload jsonb, PRIMARY KEY (tenant, code));
CREATE TABLE noise (id bigserial PRIMARY KEY, payload text);
"""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass
class ChaosConfig:
    """How big a chaos run is. :meth:`from_env` overrides the defaults from ``PGDERIVE_CHAOS_*``."""

    seed: int
    kills: int = 20
    boot_kills: int = 3
    resnapshots: int = 1
    rows: int = 25_000
    tps: int = 150
    big_tx: int = 4
    truncates: int = 4
    timeout: int = 180
    keep: bool = False

    @property
    def id_space(self) -> int:
        """Item ids live in [-id_space, id_space] (negative: moved by a bulk key change)."""
        return max(self.rows, 20_000)

    @property
    def codes(self) -> int:
        return max(self.rows // 80, 200)  # events: 20 tenants x codes

    @property
    def planned_tx(self) -> int:
        """Workload transactions over which the special ones (big, TRUNCATE) are spread once the
        daemon streams: about what ``tps`` gives during the streaming kills (~1.9 s per kill)."""
        return max(500, int(self.tps * 1.9 * max(1, self.kills - self.boot_kills) * 0.8))

    @classmethod
    def from_env(cls, **defaults: Any) -> "ChaosConfig":
        raw_seed = os.environ.get("PGDERIVE_CHAOS_SEED", "").strip()
        seed = int(raw_seed) if raw_seed else random.SystemRandom().randrange(1, 2**31)
        base = cls(seed=seed, **defaults)
        return cls(
            seed=seed,
            kills=_env_int("PGDERIVE_CHAOS_KILLS", base.kills),
            boot_kills=_env_int("PGDERIVE_CHAOS_BOOT_KILLS", base.boot_kills),
            resnapshots=_env_int("PGDERIVE_CHAOS_RESNAPSHOTS", base.resnapshots),
            rows=_env_int("PGDERIVE_CHAOS_ROWS", base.rows),
            tps=_env_int("PGDERIVE_CHAOS_TPS", base.tps),
            big_tx=_env_int("PGDERIVE_CHAOS_BIG_TX", base.big_tx),
            truncates=_env_int("PGDERIVE_CHAOS_TRUNCATES", base.truncates),
            timeout=_env_int("PGDERIVE_CHAOS_TIMEOUT", base.timeout),
            keep=os.environ.get("PGDERIVE_CHAOS_KEEP", "") not in ("", "0"),
        )

    def describe(self) -> str:
        return (f"PGDERIVE_CHAOS_SEED={self.seed} PGDERIVE_CHAOS_KILLS={self.kills} "
                f"PGDERIVE_CHAOS_BOOT_KILLS={self.boot_kills} PGDERIVE_CHAOS_RESNAPSHOTS={self.resnapshots} "
                f"PGDERIVE_CHAOS_ROWS={self.rows} PGDERIVE_CHAOS_TPS={self.tps} "
                f"PGDERIVE_CHAOS_BIG_TX={self.big_tx} PGDERIVE_CHAOS_TRUNCATES={self.truncates}")


class ChaosFailure(AssertionError):
    """A chaos run found a problem; the message holds the seed, the kills and a log excerpt."""


# ------------------------------------------------------------------------------------------
# The workload
# ------------------------------------------------------------------------------------------

@dataclass
class WorkloadStats:
    transactions: int = 0
    statements: int = 0
    rollbacks: int = 0
    reconnects: int = 0  # the source restarted under the workload (not expected in CI)
    big: list[str] = field(default_factory=list)        # description of each big transaction
    truncates: list[str] = field(default_factory=list)  # description of each TRUNCATE transaction
    kinds: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items()))
        return (f"{self.transactions} transactions ({self.statements} statements, {self.rollbacks} rolled "
                f"back, {self.reconnects} reconnects); big: {self.big or 'none'}; truncates: {self.truncates or 'none'}; kinds: {kinds}")


class Workload:
    """The mixed write workload; :meth:`run` in a thread until :meth:`finish`.

    Transaction ``k`` is drawn from ``Random(seed)``. Until :meth:`begin_specials` (called when
    the first bootstrap is done) only small and multi-statement transactions run; the big and
    TRUNCATE transactions are then placed at seeded positions among the next
    :attr:`ChaosConfig.planned_tx` transactions.
    One writer, so statements never conflict with each other (they may wait for the daemon's
    snapshot lock: a TRUNCATE waits for a running bootstrap ``COPY``).
    """

    def __init__(self, dsn: str, cfg: ChaosConfig) -> None:
        self.dsn, self.cfg = dsn, cfg
        self.rnd = random.Random(cfg.seed * 1_000_003 + 1)
        plan = random.Random(cfg.seed * 1_000_003 + 2)
        n = cfg.planned_tx
        positions = plan.sample(range(int(n * 0.05), int(n * 0.9)), cfg.big_tx + cfg.truncates)
        kinds = ["big"] * cfg.big_tx + ["truncate"] * cfg.truncates
        plan.shuffle(kinds)
        self.specials: dict[int, str] = dict(zip(positions, kinds))
        self.last_special = max(self.specials, default=-1)
        self.stats = WorkloadStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self.k = 0
        self.base: int | None = None  # k at which the special transactions' schedule starts

    def begin_specials(self) -> None:
        self.base = self.k

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="chaos-workload", daemon=True)
        self._thread.start()

    @property
    def planned_done(self) -> bool:
        """True once every big and TRUNCATE transaction was committed (or the thread failed)."""
        return (self.base is not None and self.k > self.base + self.last_special) or self.error is not None

    def finish(self, timeout: float = 120, abort: bool = False) -> None:
        """Stop after the planned special transactions (at once with ``abort``)."""
        self._stop.set()
        if abort:
            self._abort.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise ChaosFailure("the workload thread did not stop")

    def _main(self) -> None:
        interval = 1.0 / self.cfg.tps if self.cfg.tps > 0 else 0.0
        next_at = time.monotonic()
        conn: psycopg.Connection | None = None
        lost_since: float | None = None
        try:
            while not (self._stop.is_set() and self.planned_done) and not self._abort.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.dsn, autocommit=True, application_name="chaos-workload")
                    self.one(conn, self.k)
                    lost_since = None
                except psycopg.OperationalError:
                    # The server went away (restarted under us): what committed is in the source,
                    # which is all the comparison needs. Reconnect and go on with the next one.
                    now = time.monotonic()
                    lost_since = lost_since or now
                    if now - lost_since > 120:
                        raise
                    self.stats.reconnects += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(1.0)
                self.k += 1
                if interval:
                    next_at = max(next_at + interval, time.monotonic() - 1.0)
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
        except BaseException as e:  # reported by the harness
            self.error = e
            self.error_tb = traceback.format_exc()
        finally:
            if conn is not None:
                conn.close()

    # -- random values -------------------------------------------------------------------------
    def _item_id(self) -> int:
        r = self.rnd
        n = self.cfg.id_space
        return r.randint(1, n) if r.random() < 0.85 else -r.randint(1, n)

    def _item_values(self) -> tuple:
        r = self.rnd
        return (
            r.choice([None, r.randint(-5, 1000)]),                              # qty
            r.choice([None, f"{r.randint(0, 10**7) / 100:.2f}", "0.00", "99999.99"]),  # price
            r.choice([None, [], ["a", "b"], [f"t{r.randint(0, 9)}", None, 'quo"te']]),  # tags
            r.choice([None, {"k": r.randint(0, 9)}, {"nested": {"x": [1, 2, None]}, "s": "é"}]),  # meta
            r.choice([None, "", f"note {r.random():.6f}", "line\nbreak\ttab"]),  # note
        )

    def _event_key(self) -> tuple[int, str]:
        return self.rnd.randint(1, 20), f"c{self.rnd.randint(0, self.cfg.codes)}"

    def _event_values(self) -> tuple:
        r = self.rnd
        return (r.randint(0, 10**9), r.choice([None, f"{r.randint(-10**6, 10**6)}.{r.randint(0, 999):03d}"]),
                r.choice([None, True, False]), r.choice([None, {"n": r.randint(0, 99)}, [1, "two"]]))

    # -- statements ----------------------------------------------------------------------------
    def _exec(self, conn: psycopg.Connection, query: str, params: Any = None) -> None:
        conn.execute(query, params)
        self.stats.statements += 1

    def _small(self, conn: psycopg.Connection) -> str:
        """One random small statement; returns its kind."""
        from psycopg.types.json import Jsonb
        r = self.rnd.random()
        if r < 0.22:
            i = self._item_id()
            qty, price, tags, meta, note = self._item_values()
            self._exec(conn, "INSERT INTO items (id, name, qty, price, tags, meta, note) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                       "ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty, meta = excluded.meta",
                       (i, f"item {i} v{self.k}", qty, price, tags, Jsonb(meta) if meta is not None else None, note))
            return "item_upsert"
        if r < 0.45:
            i = self._item_id()
            qty, price, tags, meta, note = self._item_values()
            cols = self.rnd.sample(["qty", "price", "tags", "meta", "note", "name"], self.rnd.randint(1, 3))
            vals = {"qty": qty, "price": price, "tags": tags, "meta": Jsonb(meta) if meta is not None else None,
                    "note": note, "name": f"renamed {self.k}"}
            sets = ", ".join(f"{c} = %s" for c in cols) + ", updated = now()"
            self._exec(conn, f"UPDATE items SET {sets} WHERE id = %s", (*[vals[c] for c in cols], i))
            return "item_update"
        if r < 0.55:
            self._exec(conn, "DELETE FROM items WHERE id = %s", (self._item_id(),))
            return "item_delete"
        if r < 0.63:
            i, j = self._item_id(), self._item_id()
            self._exec(conn, "UPDATE items SET id = %s, name = name || '>' WHERE id = %s "
                       "AND NOT EXISTS (SELECT 1 FROM items WHERE id = %s)", (j, i, j))
            return "item_key_change"
        if r < 0.66:
            a = self._item_id()
            self._exec(conn, "UPDATE items SET qty = NULL, price = NULL, tags = NULL, meta = NULL, note = NULL "
                       "WHERE id BETWEEN %s AND %s", (a, a + self.rnd.randint(1, 100)))
            return "item_range_nulls"
        if r < 0.68:
            a = self._item_id()
            self._exec(conn, "DELETE FROM items WHERE id BETWEEN %s AND %s", (a, a + self.rnd.randint(1, 60)))
            return "item_range_delete"
        if r < 0.80:
            t, c = self._event_key()
            seq, amount, flag, payload = self._event_values()
            self._exec(conn, "INSERT INTO events (tenant, code, seq, amount, flag, payload) VALUES (%s, %s, %s, %s, %s, %s) "
                       "ON CONFLICT (tenant, code) DO UPDATE SET seq = excluded.seq, amount = excluded.amount, "
                       "flag = excluded.flag", (t, c, seq, amount, flag, Jsonb(payload) if payload is not None else None))
            return "event_upsert"
        if r < 0.86:
            t, c = self._event_key()
            seq, amount, flag, _ = self._event_values()
            self._exec(conn, "UPDATE events SET seq = %s, amount = %s, flag = %s WHERE tenant = %s AND code = %s",
                       (seq, amount, flag, t, c))
            return "event_update"
        if r < 0.91:
            t, c = self._event_key()
            self._exec(conn, "DELETE FROM events WHERE tenant = %s AND code = %s", (t, c))
            return "event_delete"
        if r < 0.96:
            t, c = self._event_key()
            t2, c2 = self._event_key()
            # A key change of a composite key: one part, or both.
            self._exec(conn, "UPDATE events SET tenant = %s, code = %s WHERE tenant = %s AND code = %s "
                       "AND NOT EXISTS (SELECT 1 FROM events WHERE tenant = %s AND code = %s)",
                       (t2, c2, t, c, t2, c2))
            return "event_key_change"
        self._exec(conn, "INSERT INTO noise (payload) SELECT md5(g::text) FROM generate_series(1, %s) g",
                   (self.rnd.randint(1, 50),))
        return "noise"

    def _multi(self, conn: psycopg.Connection) -> str:
        """A multi-statement transaction: several random statements plus one interplay of
        statements on the same key (collapsed by the engine), sometimes a savepoint rolled back,
        sometimes the whole transaction rolled back."""
        r = self.rnd
        rollback = r.random() < 0.08
        with conn.transaction(force_rollback=rollback):
            for _ in range(r.randint(1, 6)):
                self._small(conn)
            i = self._item_id()
            pattern = r.randrange(6)
            if pattern == 0:  # insert, update, delete the same row
                self._exec(conn, "DELETE FROM items WHERE id = %s", (i,))
                self._exec(conn, "INSERT INTO items (id, name) VALUES (%s, 'tmp')", (i,))
                self._exec(conn, "UPDATE items SET qty = 7 WHERE id = %s", (i,))
                if r.random() < 0.5:
                    self._exec(conn, "DELETE FROM items WHERE id = %s", (i,))
            elif pattern == 1:  # swap two primary keys through a temporary key
                j = self._item_id()
                tmp = -(self.cfg.id_space + 1 + r.randint(0, 1000))
                if i != j:
                    self._exec(conn, "UPDATE items SET id = %s WHERE id = %s", (tmp, i))
                    self._exec(conn, "UPDATE items SET id = %s WHERE id = %s", (i, j))
                    self._exec(conn, "UPDATE items SET id = %s WHERE id = %s", (j, tmp))
            elif pattern == 2:  # key change, then update the moved row, then move it again
                j, k = self._item_id(), self._item_id()
                self._exec(conn, "UPDATE items SET id = %s WHERE id = %s AND NOT EXISTS (SELECT 1 FROM items WHERE id = %s)",
                           (j, i, j))
                self._exec(conn, "UPDATE items SET note = NULL, qty = qty + 1 WHERE id = %s", (j,))
                self._exec(conn, "UPDATE items SET id = %s WHERE id = %s AND NOT EXISTS (SELECT 1 FROM items WHERE id = %s)",
                           (k, j, k))
            elif pattern == 3:  # a savepoint that is rolled back: its changes must never show up
                try:
                    with conn.transaction():
                        self._exec(conn, "DELETE FROM items WHERE id BETWEEN %s AND %s", (i, i + 20))
                        self._exec(conn, "UPDATE events SET seq = -1 WHERE tenant = %s", (r.randint(1, 20),))
                        raise _Rollback()
                except _Rollback:
                    self.stats.count("savepoint_rollback")
            elif pattern == 4:  # delete and re-insert the same key with other values
                self._exec(conn, "DELETE FROM items WHERE id = %s", (i,))
                self._exec(conn, "INSERT INTO items (id, name, qty, price) VALUES (%s, 'reborn', NULL, 1.50)", (i,))
            else:  # same events key updated many times
                t, c = self._event_key()
                self._exec(conn, "INSERT INTO events (tenant, code, seq) VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", (t, c))
                for n in range(r.randint(2, 10)):
                    self._exec(conn, "UPDATE events SET seq = seq + 1, amount = %s WHERE tenant = %s AND code = %s",
                               (None if n % 2 else f"{n}.5", t, c))
        if rollback:
            self.stats.rollbacks += 1
        return "multi_rollback" if rollback else "multi"

    def _big(self, conn: psycopg.Connection) -> str:
        """One transaction touching 5,000–20,000 rows."""
        r = self.rnd
        n = r.randint(5_000, 20_000)
        a = r.randint(1, max(1, self.cfg.id_space - n))
        kind = r.choice(["upsert", "update", "delete_insert", "negate_keys", "events"])
        with conn.transaction():
            if kind == "upsert":
                self._exec(conn, "INSERT INTO items (id, name, qty, price, tags, meta) "
                           "SELECT g, 'bulk ' || g, CASE WHEN g %% 7 = 0 THEN NULL ELSE g %% 1000 END, (g %% 10000) / 4.0, "
                           "ARRAY['x' || (g %% 5)], jsonb_build_object('g', g) FROM generate_series(%s::int, %s::int) g "
                           "ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty",
                           (a, a + n - 1))
            elif kind == "update":
                self._exec(conn, "UPDATE items SET qty = CASE WHEN qty IS NULL THEN 1 WHEN qty %% 5 = 0 THEN NULL "
                           "ELSE qty + 1 END, note = 'bulk', updated = now() WHERE id BETWEEN %s AND %s",
                           (a, a + n - 1))
                self._exec(conn, "INSERT INTO items (id, name) SELECT g, 'bulk-fill ' || g FROM generate_series(%s::int, %s::int) g "
                           "ON CONFLICT DO NOTHING", (a, a + n // 4))
            elif kind == "delete_insert":
                self._exec(conn, "DELETE FROM items WHERE id BETWEEN %s AND %s", (a, a + n // 2))
                self._exec(conn, "INSERT INTO items (id, name, qty) SELECT g, 'refill ' || g, NULL "
                           "FROM generate_series(%s::int, %s::int) g ON CONFLICT DO NOTHING",
                           (a + n // 4, a + n - 1))
            elif kind == "negate_keys":  # a bulk primary-key change (ids move to the negative space and back)
                sign = r.choice([1, -1])
                lo, hi = (a, a + n - 1) if sign == 1 else (-(a + n - 1), -a)
                self._exec(conn, "UPDATE items SET id = -id WHERE id BETWEEN %s AND %s "
                           "AND NOT EXISTS (SELECT 1 FROM items x WHERE x.id = -items.id)", (lo, hi))
            else:
                t = r.randint(1, 20)
                self._exec(conn, "INSERT INTO events (tenant, code, seq, amount, flag, payload) "
                           "SELECT %s, 'b' || g, g, (g / 3.0)::numeric(20,4), g %% 2 = 0, jsonb_build_object('g', g) "
                           "FROM generate_series(1, %s) g ON CONFLICT (tenant, code) DO UPDATE SET seq = excluded.seq + 1",
                           (t, n))
                self._exec(conn, "DELETE FROM events WHERE tenant = %s AND code LIKE 'b%%' AND seq %% 3 = 0", (t,))
        desc = f"{kind}({n} rows at {a}, tx #{self.k})"
        self.stats.big.append(desc)
        return "big"

    def _truncate(self, conn: psycopg.Connection) -> str:
        r = self.rnd
        kind = r.choice(["items", "items_events_refill", "mixed_in_tx", "events", "with_noise"])
        n = r.randint(1_000, 5_000)
        with conn.transaction():
            if kind == "items":
                self._exec(conn, "TRUNCATE items")
            elif kind == "items_events_refill":
                self._exec(conn, "TRUNCATE items, events")
                self._exec(conn, "INSERT INTO items (id, name, qty) SELECT g, 'after-truncate ' || g, g %% 3 "
                           "FROM generate_series(1, %s) g", (n,))
                self._exec(conn, "INSERT INTO events (tenant, code, seq) SELECT 1 + g %% 20, 'c' || g, g "
                           "FROM generate_series(1, %s) g", (n // 4,))
            elif kind == "mixed_in_tx":  # changes before the TRUNCATE vanish, changes after it stay
                self._exec(conn, "UPDATE items SET qty = -1 WHERE id BETWEEN 1 AND 500")
                self._exec(conn, "DELETE FROM items WHERE id BETWEEN 501 AND 600")
                self._exec(conn, "TRUNCATE items")
                self._exec(conn, "INSERT INTO items (id, name) SELECT g, 'post ' || g FROM generate_series(1, %s) g", (n,))
                self._exec(conn, "UPDATE items SET qty = NULL, note = 'x' WHERE id % 10 = 0")
                self._exec(conn, "DELETE FROM items WHERE id % 10 = 1")
            elif kind == "events":
                self._exec(conn, "TRUNCATE events")
            else:  # a watched table and an unwatched one together
                self._exec(conn, "TRUNCATE items, noise")
                self._exec(conn, "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(%s::int, %s::int) g",
                           (-n, -1))
        self.stats.truncates.append(f"{kind}(tx #{self.k})")
        return "truncate"

    def one(self, conn: psycopg.Connection, k: int) -> None:
        """Run workload transaction ``k``."""
        special = self.specials.get(k - self.base) if self.base is not None else None
        if special == "big":
            kind = self._big(conn)
        elif special == "truncate":
            kind = self._truncate(conn)
        elif self.rnd.random() < 0.3:
            kind = self._multi(conn)
        else:
            kind = self._small(conn)
        self.stats.transactions += 1
        self.stats.count(kind)


class _Rollback(Exception):
    pass


# ------------------------------------------------------------------------------------------
# The source, the views and the daemon
# ------------------------------------------------------------------------------------------

def config_text(dsn: str, slot: str, p: str) -> str:
    return f"""
source:
  dsn: {dsn}
  slot: {slot}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:
  {p}_items_hash:
    table: public.items
    sink: cache
    key: "{p}:ih:{{id}}"
    fields: [id, name, qty, price, note]
    format: hash
  {p}_items_json:
    table: items
    sink: cache
    key: "{p}:ij:{{id}}"
    fields: {{ident: id, label: name, quantity: qty, tags: tags, meta: meta, note: note}}
    format: json
  {p}_items_search:
    table: public.items
    sink: search
    index: {p.lower()}_items
    fields: {{item_id: id, name: name, qty: qty, price: price, tags: tags, updated: updated}}
  {p}_events_json:
    table: public.events
    sink: cache
    key: "{p}:ej:{{tenant}}:{{code}}"
    format: json
  {p}_events_search:
    table: public.events
    sink: search
    index: {p.lower()}_events
    fields: {{tenant: tenant, code: code, seq: seq, amount: amount, flag: flag}}
"""


@dataclass
class Kill:
    n: int
    after_s: float     # planned life time of the daemon before the SIGKILL (in_bootstrap: after its slot)
    phase: str         # startup | bootstrap | resnapshot-bootstrap | stream

    def __str__(self) -> str:
        return f"#{self.n} {self.phase} after {self.after_s:.2f}s"


class ChaosRun:
    """One chaos run in ``workdir``: a scratch database, five views, the daemon, the workload."""

    def __init__(self, cfg: ChaosConfig, workdir: Path, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.say = log
        self.kill_rnd = random.Random(cfg.seed * 1_000_003 + 3)
        self.db = unique("pgd_chaos")
        self.slot = unique("chaos")
        self.prefix = unique("ch")
        self.config = workdir / "pgderive.yaml"
        self.log_path = workdir / "daemon.log"
        self.kills: list[Kill] = []
        self.starts = 0
        self.busy_restarts = 0
        self.env_restarts: list[str] = []  # daemon exits on an unreachable service (restarted)
        self.daemon: Daemon | None = None
        self.all_daemons: list[Daemon] = []
        self.workload: Workload | None = None
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}
        self.dsn = ""

    # -- set-up / tear-down --------------------------------------------------------------------
    def setup(self) -> None:
        self.dsn = create_database(self.db)  # from here on, teardown drops it
        self.config.write_text(config_text(self.dsn, self.slot, self.prefix))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            n, ev = self.cfg.rows, self.cfg.rows // 4
            conn.execute("""INSERT INTO items (id, name, qty, price, tags, meta, note)
                            SELECT g, 'item ' || g, CASE WHEN g %% 11 = 0 THEN NULL ELSE g %% 100 END,
                                   (g * 1.25)::numeric(12,2), ARRAY['a' || (g %% 3), 'b'],
                                   jsonb_build_object('g', g, 'even', g %% 2 = 0),
                                   CASE WHEN g %% 2 = 0 THEN 'seeded' END
                              FROM generate_series(1, %s) g""", (n,))
            conn.execute("""INSERT INTO events (tenant, code, seq, amount, flag, payload)
                            SELECT 1 + g %% 20, 'c' || (g / 20), g, (g / 7.0)::numeric(20,4), g %% 3 = 0,
                                   jsonb_build_object('g', g)
                              FROM generate_series(0, %s) g ON CONFLICT DO NOTHING""", (ev - 1,))
            conn.execute("INSERT INTO noise (payload) SELECT 'x' FROM generate_series(1, 1000)")
            conn.execute("ANALYZE")

    def teardown(self, failed: bool) -> None:
        for d in self.all_daemons:  # never leave a daemon behind (it would hold the slot)
            if d.alive():
                d.kill9()
        if failed and self.cfg.keep:
            self.say(f"chaos: keeping database {self.db} and the views of {self.config} for inspection")
            return
        if not self.dsn:
            return
        try:
            if not self.config.exists():
                return
            drop_views(self.config)
        finally:
            self._wait_slot_released()
            drop_database(self.db)

    def _wait_slot_released(self, timeout: float = 15) -> None:
        """After a SIGKILL the walsender may hold the slot a moment longer."""
        def released() -> bool:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                   (self.slot,)).fetchone()
            return row is None or not row[0]
        try:
            wait_until(released, timeout, 0.2, "the slot to be released")
        except (AssertionError, psycopg.Error):
            pass

    # -- the daemon ----------------------------------------------------------------------------
    def _mark(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            now = time.time()
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
            f.write(f"=== chaos {stamp} (+{time.monotonic() - self.t0:.2f}s): {text}\n")

    def _start(self, *extra: str) -> Daemon:
        if self.daemon is not None and self.daemon.alive():
            raise RuntimeError("chaos harness bug: starting a daemon while another one runs")
        self.starts += 1
        self._mark(f"start #{self.starts} {' '.join(extra)}".rstrip())
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.daemon = Daemon(self.config, self.log_path, "--stats-file",
                             str(self.log_path.with_suffix(".json"))).start(*extra)
        self.all_daemons.append(self.daemon)
        return self.daemon

    def _since_start(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def _exited_by_itself(self, extra: tuple[str, ...]) -> None:
        """The daemon exited without being killed: a slot still held by the walsender of the
        killed predecessor is expected (retry like a supervisor would); anything else fails."""
        d = self.daemon
        assert d is not None and d.proc is not None
        out = self._since_start()
        if d.proc.returncode == 1 and "is in use by another process" in out:
            self.busy_restarts += 1
            time.sleep(0.3)
            self._start(*extra)
            return
        if d.proc.returncode == 1 and self._transient(out):
            time.sleep(2.0)
            self._start(*extra)
            return
        raise self.failure(f"the daemon exited by itself with code {d.proc.returncode} "
                           f"(start #{self.starts}):\n{out[-4000:]}")

    def _transient(self, out: str) -> bool:
        """True (and counted) if the daemon's fatal error says a service was unreachable."""
        fatal = _FATAL.search(out)
        errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        if fatal is None or not errors or not _TRANSIENT.search(errors[-1]):
            return False
        if len(self.env_restarts) >= MAX_ENV_RESTARTS:
            return False
        self.env_restarts.append(f"start #{self.starts}: {errors[-1][:200]}")
        self._mark(f"daemon exited on an unreachable service; restarting it (#{len(self.env_restarts)})")
        return True

    def _phase(self, resnapshot: bool) -> str:
        """Where the (now dead) daemon was, from its log since its start: ``startup`` (before it
        created or resumed the slot), ``bootstrap`` (slot created, snapshot not committed yet),
        ``stream``."""
        out = self._since_start()
        if "bootstrap done" in out or "resuming slot" in out:
            return "stream"
        if "created slot" in out:
            return "resnapshot-bootstrap" if resnapshot else "bootstrap"
        return "startup"

    def _query(self, query: str, params: Any = None, timeout: float = 120) -> list[tuple]:
        """Run one query on a fresh connection, retrying while the server is unreachable."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    return conn.execute(query, params).fetchall()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _streaming(self) -> bool:
        try:
            rows = self._query("SELECT status FROM pgderive.slot_state WHERE slot = %s", (self.slot,))
        except psycopg.errors.UndefinedTable:
            return False
        return bool(rows) and rows[0][0] == "streaming"

    def _live_then_kill(self, *extra: str, running: bool = False, in_bootstrap: bool = False) -> Kill:
        """Start the daemon (or take the ``running`` one), let it live a random 0.2–3 s more,
        SIGKILL it; returns the kill. ``in_bootstrap``: wait until it created its slot, then
        live a random 0–0.4 s more, so the kill lands in the snapshot load however fast the
        machine loads it (the 0.2–3 s clock missed loads under a second)."""
        d = self.daemon if running else self._start(*extra)
        assert d is not None
        if in_bootstrap:
            started = time.monotonic()
            while "created slot" not in self._since_start() and time.monotonic() - started < 120:
                if not d.alive():
                    break  # exited by itself: the loop below deals with it
                time.sleep(0.01)
            after = self.kill_rnd.uniform(0.0, 0.4)
        else:
            after = self.kill_rnd.uniform(KILL_MIN, KILL_MAX)
        deadline = time.monotonic() + after
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
            if not d.alive():
                self._exited_by_itself(extra)
                d = self.daemon  # restarted: its clock keeps running from the first start
                assert d is not None
            self._check_workload()
        d.kill9()
        d.log.close()
        kill = Kill(len(self.kills) + 1, after, self._phase("--resnapshot" in extra))
        self.kills.append(kill)
        self._mark(f"SIGKILL {kill}")
        # A daemon that already reported a fatal error (and was still exiting) is a finding too.
        out = self._since_start()
        fatal = _FATAL.search(out)
        if fatal and "is in use by another process" not in fatal.group(0) and not self._transient(out):
            raise self.failure(f"the daemon reported a fatal error before it was killed (start #{self.starts}):\n"
                               f"{out[fatal.start():][:4000]}")
        return kill

    def _wait_streaming(self, timeout: float = 300) -> None:
        def ok() -> bool:
            d = self.daemon
            assert d is not None
            if not d.alive():
                self._exited_by_itself(())
            self._check_workload()
            return self._streaming()
        wait_until(ok, timeout, 0.1, "the bootstrap to finish")

    def _check_workload(self) -> None:
        w = self.workload
        if w is not None and w.error is not None:
            raise self.failure(f"the workload failed: {w.error!r}\n{getattr(w, 'error_tb', '')}")

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        self.say(f"chaos: {cfg.describe()}")
        self.setup()
        self.timings["setup"] = time.monotonic() - self.t0
        self.workload = Workload(self.dsn, cfg)
        self.workload.start()
        # 1. Kills during the first bootstrap (the snapshot load of the seeded tables).
        boot_budget = cfg.boot_kills * 5 + 5
        while sum(k.phase == "bootstrap" for k in self.kills) < cfg.boot_kills:
            if len(self.kills) >= boot_budget:
                raise self.failure(f"only {sum(k.phase == 'bootstrap' for k in self.kills)} of "
                                   f"{len(self.kills)} kills landed in the bootstrap: seed more rows")
            self._live_then_kill(in_bootstrap=True)
        self._start()
        self._wait_streaming()
        self.timings["bootstrap_phase"] = time.monotonic() - self.t0
        self.workload.begin_specials()
        self._live_then_kill(running=True)
        # 2. Kills while streaming (and during --resnapshot bootstraps, spread over the phase).
        #    Kills that land in the start-up (before the slot is resumed) do not count towards
        #    the streaming quota; the phase also lasts until every planned big/TRUNCATE
        #    transaction has been committed.
        stream_kills = max(1, cfg.kills - cfg.boot_kills - 1)
        resnap_rnd = random.Random(cfg.seed * 1_000_003 + 4)
        resnap_at = set(resnap_rnd.sample(range(stream_kills), min(cfg.resnapshots, stream_kills)))
        i = landed = 0
        while landed < stream_kills or not self.workload.planned_done:
            if i > 4 * stream_kills + 40:
                raise self.failure(f"after {i} restarts only {landed} kills landed after the start-up")
            if i in resnap_at:
                # Bootstraps from scratch over full sinks; kill it inside its load (retry the
                # kill with a fresh delay while it is still in the start-up).
                for _ in range(6):
                    k = self._live_then_kill("--resnapshot")
                    if k.phase == "resnapshot-bootstrap":
                        break
                # The next start (no flag) finds state "bootstrapping" and redoes it.
                self._start()
                self._wait_streaming()
                self._live_then_kill(running=True)
            landed += self._live_then_kill().phase != "startup"
            i += 1
        self.timings["kill_phase"] = time.monotonic() - self.t0
        self.say(f"chaos: {len(self.kills)} kills done: {self._kill_summary()}")
        # 3. Stop the workload, let a last daemon catch up, compare.
        self.workload.finish()
        self._check_workload()
        self.say(f"chaos: workload: {self.workload.stats.summary()}")
        self._start()
        self._wait_streaming()
        target = current_lsn(self.dsn)
        try:
            wait_until(lambda: self._alive_and(lambda: slot_caught_up(self.dsn, self.slot, target)),
                       cfg.timeout, 0.25, "the slot to catch up")
        except AssertionError as e:
            raise self.failure(str(e)) from None
        self.timings["caught_up"] = time.monotonic() - self.t0
        try:
            assert_views_equal(self.config, timeout=60)
        except AssertionError as e:
            raise self.failure(str(e)) from None
        self.timings["compared"] = time.monotonic() - self.t0
        if self._query("SELECT to_regclass('pgderive.dead_letters')")[0][0] is not None:
            dead = self._query("SELECT view, sink_key, commit_lsn::text, error FROM pgderive.dead_letters "
                               "WHERE slot = %s ORDER BY id", (self.slot,))
            if dead:
                raise self.failure(f"{len(dead)} dead letter(s) recorded, e.g. {dead[:5]}")
        code = self.daemon.stop(60)  # type: ignore[union-attr]
        if code != 0:
            raise self.failure(f"graceful stop exited with code {code}")
        self.say(f"chaos: OK seed={cfg.seed}: {len(self.kills)} kills, {self.starts} starts "
                 f"({self.busy_restarts} retried: slot still held; {len(self.env_restarts)} after an unreachable "
                 f"service{': ' + '; '.join(self.env_restarts) if self.env_restarts else ''}), timings "
                 + ", ".join(f"{k}={v:.1f}s" for k, v in self.timings.items()))

    def _alive_and(self, pred: Callable[[], bool]) -> bool:
        d = self.daemon
        if d is not None and not d.alive():
            self._exited_by_itself(())
        return pred()

    # -- reporting -----------------------------------------------------------------------------
    def _kill_summary(self) -> str:
        phases: dict[str, int] = {}
        for k in self.kills:
            phases[k.phase] = phases.get(k.phase, 0) + 1
        return ", ".join(f"{p}={n}" for p, n in phases.items())

    def log_excerpt(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no daemon log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        notable = [ln for ln in text if re.search(r"ERROR|CRITICAL|Traceback|Error:|error:|WARNING|TRUNCATE|"
                                                  r"=== chaos .*(start|SIGKILL)", ln)]
        return ("notable lines (last 40):\n" + "\n".join(notable[-40:]) +
                f"\n--- last {lines} lines ---\n" + "\n".join(text[-lines:]))

    def failure(self, symptom: str) -> ChaosFailure:
        w = self.workload
        return ChaosFailure(
            f"chaos run FAILED — reproduce with: {self.cfg.describe()}\n"
            f"symptom: {symptom}\n"
            f"kills: {len(self.kills)} ({self._kill_summary()}), starts: {self.starts}, "
            f"busy restarts: {self.busy_restarts}, restarts after an unreachable service: {self.env_restarts or 0}; last kills: {', '.join(map(str, self.kills[-5:]))}\n"
            f"workload: {w.stats.summary() if w else '-'}\n"
            f"daemon log: {self.log_path}\n{self.log_excerpt()}")


def run_chaos(cfg: ChaosConfig, workdir: Path | None = None, log: Callable[[str], None] = print) -> ChaosRun:
    """Run one chaos round; raises :class:`ChaosFailure` (seed, kills, symptom, log excerpt).

    ``workdir`` (default ``.services/chaos/<time>-seed<seed>/``) receives the YAML, the daemon
    log (all starts, with ``=== chaos`` markers for every start and kill) and, on failure,
    ``failure.txt``; it is deleted after a successful run unless ``PGDERIVE_CHAOS_KEEP`` is set.
    """
    own = workdir is None
    if workdir is None:
        workdir = CHAOS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{cfg.seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    run = ChaosRun(cfg, workdir, log)
    failed = True
    try:
        run.run()
        failed = False
        return run
    except BaseException as e:
        failure = e if isinstance(e, ChaosFailure) else \
            run.failure(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        (workdir / "failure.txt").write_text(str(failure))
        log(str(failure))
        if failure is e:
            raise
        raise failure from e
    finally:
        try:
            if run.workload is not None:
                run.workload.finish(abort=failed)
        except ChaosFailure:
            pass
        try:
            run.teardown(failed)
        except Exception as e:  # never hide the run's own result behind a clean-up problem
            log(f"chaos: clean-up failed: {type(e).__name__}: {e}")
        if own and not failed and not cfg.keep:
            shutil.rmtree(workdir, ignore_errors=True)
