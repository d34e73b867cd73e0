"""Versioned migrations of schema ``pgderive`` (pgderive/state/schema.py) against the real Postgres:
fresh databases, re-runs, databases created by the DDL pgderive ran before it had versions, newer
databases, concurrent starts and a least-privilege role."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgderive.state import aggregates, deadletters, schema
from pgderive.state.aggregates import AggregateStore
from pgderive.state.deadletters import DeadLetter, DeadLetterStore
from pgderive.state.schema import SchemaVersionError, latest_version, migrate
from pgderive.state.slots import StateStore

from ..support import PG_ADMIN_DSN, create_database, drop_database, unique

# The DDL each store ran before versioned migrations, verbatim (slots.py, deadletters.py with its
# identifiers filled in, aggregates.py): databases created by it must be adopted as they are.
OLD_SLOT_STATE = """
CREATE SCHEMA IF NOT EXISTS pgderive;
CREATE TABLE IF NOT EXISTS pgderive.slot_state (
    slot             text PRIMARY KEY,
    status           text NOT NULL CHECK (status IN ('bootstrapping', 'streaming')),
    consistent_point pg_lsn NOT NULL,
    views            jsonb NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
"""
OLD_DEAD_LETTERS = """
CREATE SCHEMA IF NOT EXISTS "pgderive";
CREATE TABLE IF NOT EXISTS "pgderive"."dead_letters" (
    id           bigserial PRIMARY KEY,
    slot         text NOT NULL,
    view         text NOT NULL,
    source_table text NOT NULL,
    sink_key     text NULL,
    commit_lsn   pg_lsn NOT NULL,
    error        text NOT NULL,
    row          jsonb NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retries      int NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS "dead_letters_slot_view_id_idx" ON "pgderive"."dead_letters" (slot, view, id);
"""
OLD_AGGREGATES = """
CREATE SCHEMA IF NOT EXISTS pgderive;
CREATE TABLE IF NOT EXISTS pgderive.agg_rows (
    view     text   NOT NULL,
    row_key  text   NOT NULL,
    version  bigint NOT NULL,
    grp      jsonb,
    vals     jsonb,
    PRIMARY KEY (view, row_key)
);
CREATE INDEX IF NOT EXISTS agg_rows_group ON pgderive.agg_rows (view, grp);
CREATE TABLE IF NOT EXISTS pgderive.agg_groups (
    view     text   NOT NULL,
    grp      jsonb  NOT NULL,
    state    jsonb  NOT NULL,
    PRIMARY KEY (view, grp)
);
"""
STATE_TABLES = ["agg_groups", "agg_rows", "dead_letters", "slot_state"]  # the old DDL's tables
ALL_TABLES = ["agg_groups", "agg_rows", "agg_touched", "commits", "dead_letters", "rebuilds", "schema_version",
              "slot_state", "views"]
EXPECTED_VERSIONS = [(1, "slot_state"), (2, "dead_letters"), (3, "aggregates"), (4, "agg_touched"),
                     (5, "dead_letter_rows"), (6, "rebuilds"), (7, "view_registry"),
                     (8, "commits")]


@pytest.fixture
def dsn() -> Iterator[str]:
    """A scratch database per test; dropped afterwards."""
    name = unique("pgd_schema")
    dsn = create_database(name)
    yield dsn
    drop_database(name)


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def tables(dsn: str) -> list[str]:
    with connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgderive' ORDER BY 1")]


def versions(dsn: str) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn:
        return conn.execute("SELECT version, name, applied_at FROM pgderive.schema_version ORDER BY version").fetchall()


def shape(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Columns (type, nullability, default), constraints and indexes of the four state tables."""
    with connect(dsn) as conn:
        cols = conn.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_attrdef d"
            " ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE n.nspname = 'pgderive'"
            " AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, a.attnum",
            (STATE_TABLES,)).fetchall()
        cons = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'pgderive'::regnamespace AND conrelid::regclass::text = ANY(%s)"
            " ORDER BY 1, 2", ([f"pgderive.{t}" for t in STATE_TABLES],)).fetchall()
        idx = conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgderive'"
            " AND tablename = ANY(%s) ORDER BY 1, 2", (STATE_TABLES,)).fetchall()
    return {"columns": cols, "constraints": cons, "indexes": idx}


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    assert [(m.version, m.name) for m in schema.migrations()] == EXPECTED_VERSIONS
    assert latest_version() == 8


def test_fresh_database_gets_every_table_and_the_latest_version(dsn: str) -> None:
    with connect(dsn) as conn:
        assert schema.current_version(conn) == 0
        assert migrate(conn) == latest_version()
        assert schema.current_version(conn) == latest_version()
    assert tables(dsn) == ALL_TABLES
    assert [v[:2] for v in versions(dsn)] == EXPECTED_VERSIONS


def test_migrations_build_exactly_the_old_ddl(dsn: str) -> None:
    """Same columns, defaults, constraints and indexes as the DDL the stores used to run, plus
    what the migrations after it add (0005: dead_letters.row_identity/truncated/superseded_lsn)."""
    old = unique("pgd_schema_old")
    old_dsn = create_database(old)
    try:
        with connect(old_dsn) as conn:
            for ddl in (OLD_SLOT_STATE, OLD_DEAD_LETTERS, OLD_AGGREGATES):
                conn.execute(ddl)
            for m in schema.migrations()[4:]:  # 0005 alters dead_letters; 0006-0008 add tables
                conn.execute(m.sql)
        with connect(dsn) as conn:
            migrate(conn)
        assert shape(dsn) == shape(old_dsn)
        # 4 primary keys, dead_letters_slot_view_id_idx, agg_rows_group, dead_letters_open_rows_idx
        assert len(shape(dsn)["indexes"]) == 7
    finally:
        drop_database(old)


def test_second_migrate_is_a_no_op(dsn: str) -> None:
    with connect(dsn) as conn:
        assert migrate(conn) == latest_version()
    before = versions(dsn)
    with connect(dsn) as conn:
        assert migrate(conn) == latest_version()
        assert migrate(conn) == latest_version()
    assert versions(dsn) == before  # nothing re-applied, applied_at untouched


def test_non_autocommit_connection_is_left_idle(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert migrate(conn) == latest_version()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="idle connection"):
            migrate(conn)  # inside the transaction that SELECT opened


@pytest.mark.parametrize("old_ddl", [[OLD_SLOT_STATE, OLD_DEAD_LETTERS, OLD_AGGREGATES],
                                     [OLD_SLOT_STATE, OLD_DEAD_LETTERS]],  # no aggregate view ever ran
                         ids=["all-tables", "no-aggregates"])
def test_database_created_by_the_old_ddl_is_adopted(dsn: str, old_ddl: list[str]) -> None:
    with connect(dsn) as conn:
        for ddl in old_ddl:
            conn.execute(ddl)
        conn.execute("INSERT INTO pgderive.slot_state (slot, status, consistent_point) VALUES ('s', 'streaming', '0/16B3748')")
    with DeadLetterStore(dsn) as store:
        store.record("s", [DeadLetter(view="v", table="public.t", key="k", lsn=0x16B3748, error="e", row={"id": 1})])
        assert store.count("s") == {"v": 1}
    assert [v[:2] for v in versions(dsn)] == EXPECTED_VERSIONS
    assert tables(dsn) == ALL_TABLES
    state = StateStore(dsn).get("s")
    assert state is not None and state.consistent_point == 0x16B3748  # rows kept
    with connect(dsn) as conn:
        assert migrate(conn) == latest_version()


def test_newer_database_is_refused_naming_both_versions(dsn: str) -> None:
    with connect(dsn) as conn:
        migrate(conn)
        conn.execute("INSERT INTO pgderive.schema_version (version, name) VALUES (99, 'from_the_future')")
        with pytest.raises(SchemaVersionError, match=rf"version 99, newer than version {latest_version()}"):
            migrate(conn)
    with pytest.raises(SchemaVersionError, match="99"):
        StateStore(dsn).ensure_schema()
    with pytest.raises(SchemaVersionError, match="99"):
        AggregateStore(dsn).connection()


def test_concurrent_migrates_all_succeed_with_one_set_of_tables(dsn: str) -> None:
    n = 6
    barrier = threading.Barrier(n)
    results: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with connect(dsn) as conn:
                barrier.wait(timeout=30)
                results.append(migrate(conn))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert results == [latest_version()] * n
    assert [v[:2] for v in versions(dsn)] == EXPECTED_VERSIONS
    assert tables(dsn) == ALL_TABLES


def test_each_store_migrates_once_not_per_write(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(module: str) -> Any:
        def wrapped(conn: psycopg.Connection[Any]) -> int:
            calls.append(module)
            return migrate(conn)
        return wrapped

    monkeypatch.setattr(deadletters, "migrate", counting("deadletters"))
    monkeypatch.setattr(aggregates, "migrate", counting("aggregates"))
    letter = DeadLetter(view="v", table="public.t", key=None, lsn=1, error="e", row=None)
    with DeadLetterStore(dsn) as store:
        for _ in range(3):
            store.record("s", [letter])
    store = AggregateStore(dsn)
    try:
        for _ in range(3):
            store.reset("v")
    finally:
        store.close()
    assert calls == ["deadletters", "aggregates"]


def test_least_privilege_role_starts_on_a_current_schema(dsn: str) -> None:
    """A role that owns nothing and may not CREATE in the database, but can use the tables."""
    role = unique("pgd_app")
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    role_dsn = make_conninfo(dsn, user=role)
    try:
        with connect(role_dsn) as conn:  # not migrated yet: the role cannot create the schema
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                migrate(conn)
        with connect(dsn) as conn:
            migrate(conn)
            conn.execute(sql.SQL("REVOKE CREATE ON DATABASE {} FROM PUBLIC").format(sql.Identifier(str(dbname))))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgderive TO {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgderive TO {}")
                         .format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgderive TO {}").format(sql.Identifier(role)))
        with connect(role_dsn) as conn:
            # What the stores used to run fails for this role (Postgres checks CREATE on the
            # database before it looks whether the schema exists) ...
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(OLD_SLOT_STATE)
            # ... while migrate only reads.
            assert migrate(conn) == latest_version()
        state = StateStore(role_dsn)
        state.ensure_schema()
        state.set("s", "streaming", 0x1000, {"v": "fp"})
        got = state.get("s")
        assert got is not None and got.consistent_point == 0x1000
        with DeadLetterStore(role_dsn) as store:
            store.record("s", [DeadLetter(view="v", table="public.t", key=None, lsn=1, error="e", row=None)])
            assert store.count("s") == {"v": 1}
        agg = AggregateStore(role_dsn)
        try:
            agg.reset("v")
        finally:
            agg.close()
    finally:
        drop_database(str(dbname))  # the grants go with it; then the role can be dropped
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
