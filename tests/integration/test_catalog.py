"""Source checks against the real Postgres (scripts/services.sh up): tables, keys, identity."""
from __future__ import annotations

import os
import uuid
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from cdc.catalog import TableInfo, probe_plugin, table_info
from views.check import check_source
from views.derive import output_fields, resolve_key
from views.spec import Spec, SpecError, parse_spec

DSN = os.environ.get("PGDERIVE_TEST_DSN", "postgresql://postgres@127.0.0.1:5433/postgres")


@pytest.fixture(scope="module")
def conn() -> Iterator[psycopg.Connection]:
    try:
        connection = psycopg.connect(DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"Postgres is not reachable at {DSN} (run scripts/services.sh up): {e}")
    with connection:
        yield connection


@pytest.fixture(scope="module")
def schema(conn: psycopg.Connection) -> Iterator[str]:
    """A scratch schema with tables covering every replica identity case."""
    name = f"pgderive_cat_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    statements = [
        "CREATE SCHEMA {s}",
        "CREATE TABLE {s}.accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84))",
        "CREATE TABLE {s}.pair (a int, b text, c int, PRIMARY KEY (b, a))",
        "CREATE TABLE {s}.nopk (x int, y int)",
        "CREATE TABLE {s}.full_ri (x int, y int)",
        "ALTER TABLE {s}.full_ri REPLICA IDENTITY FULL",
        "CREATE TABLE {s}.idx_ri (id int NOT NULL, y int)",
        "CREATE UNIQUE INDEX idx_ri_id ON {s}.idx_ri (id)",
        "ALTER TABLE {s}.idx_ri REPLICA IDENTITY USING INDEX idx_ri_id",
        "CREATE TABLE {s}.nothing_ri (id int PRIMARY KEY)",
        "ALTER TABLE {s}.nothing_ri REPLICA IDENTITY NOTHING",
        'CREATE TABLE {s}."Mixed" (id int PRIMARY KEY, dropped int, "Val" text)',
        'ALTER TABLE {s}."Mixed" DROP COLUMN dropped',
        "CREATE VIEW {s}.a_view AS SELECT 1 AS id",
    ]
    for statement in statements:
        conn.execute(sql.SQL(statement).format(s=ident))
    yield name
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(ident))


def make_spec(schema: str, views: str) -> Spec:
    """A spec over ``schema``: views start at line 6 of the text."""
    text = ('source: {dsn: "postgresql://postgres:hunter2@127.0.0.1:5433/postgres", slot: s}\n'
            "sinks:\n"
            "  cache: {type: redis}\n"
            '  search: {type: opensearch, hosts: ["http://127.0.0.1:9201"]}\n'
            "views:\n" + views.replace("S.", f"{schema}."))
    return parse_spec(text, filename="config/t.yaml", env={})


def check_problems(spec: Spec, conn: psycopg.Connection) -> list[tuple[str, int | None, str]]:
    with pytest.raises(SpecError) as info:
        check_source(spec, conn)
    assert "hunter2" not in str(info.value)
    return [tuple(p) for p in info.value.problems]


def test_table_info_shapes(conn: psycopg.Connection, schema: str) -> None:
    assert table_info(conn, schema, "accounts") == TableInfo(
        f"{schema}.accounts",
        {"aid": "integer", "bid": "integer", "abalance": "integer", "filler": "character(84)"},
        ("aid",), "d", ("aid",))
    pair = table_info(conn, schema, "pair")
    assert pair.primary_key == ("b", "a") and pair.identity_columns == ("b", "a")
    nopk = table_info(conn, schema, "nopk")
    assert (nopk.primary_key, nopk.replica_identity, nopk.identity_columns) == ((), "d", ())
    full = table_info(conn, schema, "full_ri")
    assert (full.replica_identity, full.identity_columns) == ("f", ("x", "y"))
    idx = table_info(conn, schema, "idx_ri")
    assert (idx.primary_key, idx.replica_identity, idx.identity_columns) == ((), "i", ("id",))
    nothing = table_info(conn, schema, "nothing_ri")
    assert (nothing.replica_identity, nothing.identity_columns) == ("n", ())
    mixed = table_info(conn, schema, "Mixed")
    assert mixed.columns == {"id": "integer", "Val": "text"}  # dropped column skipped
    assert table_info(conn, schema, "mixed") is None
    assert table_info(conn, schema, "missing") is None
    assert table_info(conn, schema, "a_view") is None


def test_valid_spec_returns_table_infos(conn: psycopg.Connection, schema: str) -> None:
    spec = make_spec(schema, (
        '  accounts: {table: S.accounts, sink: cache, key: "account:{aid}",'
        " fields: [aid, bid, abalance]}\n"
        "  pairs: {table: S.pair, sink: search, index: pairs, fields: {first: a, second: b}}\n"
        '  full: {table: S.full_ri, sink: cache, key: "f:{y}"}\n'
        '  idx: {table: S.idx_ri, sink: search, index: idx, key: "{id}"}\n'
        f'  mixed: {{table: \'{schema}."Mixed"\', sink: search, index: mixed}}\n'))
    infos = check_source(spec, conn)
    assert set(infos) == {f"{schema}.{t}" for t in ("accounts", "pair", "full_ri", "idx_ri",
                                                     "Mixed")}
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    accounts = spec.views["accounts"]
    info = infos[accounts.qualified]
    assert resolve_key(accounts, info).render({"aid": 7}) == "account:7"
    assert output_fields(accounts, info) == {"aid": "aid", "bid": "bid", "abalance": "abalance"}

    pairs = spec.views["pairs"]
    assert resolve_key(pairs, infos[pairs.qualified]).text == "{b}:{a}"  # primary key order
    assert output_fields(pairs, infos[pairs.qualified]) == {"first": "a", "second": "b"}

    mixed = spec.views["mixed"]
    assert resolve_key(mixed, infos[mixed.qualified]).render({"id": 1, "Val": "v"}) == "1"
    assert output_fields(mixed, infos[mixed.qualified]) == {"id": "id", "Val": "Val"}


def test_unknown_columns_name_the_yaml_path(conn: psycopg.Connection, schema: str) -> None:
    spec = make_spec(schema, (
        "  account_cache:\n"
        "    table: S.accounts\n"
        "    sink: cache\n"
        '    key: "account:{idd}"\n'
        "    fields: [aid, bid, balance]\n"
        "  branch_search:\n"
        "    table: S.accounts\n"
        "    sink: search\n"
        "    index: accounts\n"
        "    fields:\n"
        "      id: aid\n"
        "      other: nope\n"))
    assert check_problems(spec, conn) == [
        ("views.account_cache.key", 9,
         f"unknown column 'idd' in table {schema}.accounts (did you mean 'bid'?)"),
        ("views.account_cache.fields[2]", 10,
         f"unknown column 'balance' in table {schema}.accounts (did you mean 'abalance'?)"),
        ("views.branch_search.fields.other", 17,
         f"unknown column 'nope' in table {schema}.accounts"),
    ]
    with pytest.raises(SpecError) as info:
        check_source(spec, conn)
    assert str(info.value).splitlines()[0].startswith(
        "config/t.yaml:9: views.account_cache.key: unknown column 'idd'")


def test_tables_that_cannot_be_streamed(conn: psycopg.Connection, schema: str) -> None:
    spec = make_spec(schema, (
        '  missing: {table: S.missing, sink: cache, key: "{id}"}\n'
        '  view: {table: S.a_view, sink: cache, key: "v:{id}"}\n'
        '  nopk: {table: S.nopk, sink: cache, key: "n:{x}"}\n'
        "  nopk_search: {table: S.nopk, sink: search, index: nopk}\n"
        "  nothing: {table: S.nothing_ri, sink: search, index: nothing}\n"
        "  unquoted_mixed: {table: S.Mixed, sink: search, index: mixed}\n"))
    s = schema
    assert check_problems(spec, conn) == [
        ("views.missing.table", 6, f"table {s}.missing does not exist"),
        ("views.view.table", 7, f"table {s}.a_view is a view, not an ordinary table"),
        ("views.nopk.table", 8, f"table {s}.nopk has no primary key: its updates and deletes"
                                f" cannot be streamed; add a primary key or run"
                                f' ALTER TABLE "{s}"."nopk" REPLICA IDENTITY FULL'),
        ("views.nopk_search.table", 9, f"table {s}.nopk has no primary key: its updates and"
                                       f" deletes cannot be streamed; add a primary key or run"
                                       f' ALTER TABLE "{s}"."nopk" REPLICA IDENTITY FULL'),
        ("views.nopk_search.key", 9, f"required: table {s}.nopk has no primary key to default"
                                     " to; declare a key template over columns that identify a"
                                     " row"),
        ("views.nothing.table", 10, f"table {s}.nothing_ri has REPLICA IDENTITY NOTHING: its"
                                    " updates and deletes cannot be streamed; run"
                                    f' ALTER TABLE "{s}"."nothing_ri" REPLICA IDENTITY DEFAULT'
                                    f' (or ALTER TABLE "{s}"."nothing_ri" REPLICA IDENTITY FULL)'),
        ("views.unquoted_mixed.table", 11, f"table {s}.mixed does not exist"),
    ]


def test_key_must_be_within_replica_identity(conn: psycopg.Connection, schema: str) -> None:
    spec = make_spec(schema, (
        '  by_branch: {table: S.accounts, sink: cache, key: "acc:{aid}:{bid}"}\n'
        '  by_y: {table: S.idx_ri, sink: cache, key: "{y}"}\n'
        "  full_no_key: {table: S.full_ri, sink: search, index: full}\n"))
    s = schema
    assert check_problems(spec, conn) == [
        ("views.by_branch.key", 6, f"key column 'bid' is not in the replica identity of"
                                   f" {s}.accounts (aid): deletes and key changes could not be"
                                   " applied; key on those columns or run"
                                   f' ALTER TABLE "{s}"."accounts" REPLICA IDENTITY FULL'),
        ("views.by_y.key", 7, f"key column 'y' is not in the replica identity of {s}.idx_ri (id):"
                              " deletes and key changes could not be applied; key on those"
                              f' columns or run ALTER TABLE "{s}"."idx_ri" REPLICA IDENTITY FULL'),
        ("views.full_no_key.key", 8, f"required: table {s}.full_ri has no primary key to default"
                                     " to; declare a key template over columns that identify a"
                                     " row"),
    ]


def test_resolve_key_without_primary_key(conn: psycopg.Connection, schema: str) -> None:
    spec = make_spec(schema, "  v: {table: S.full_ri, sink: search, index: v}\n")
    view = spec.views["v"]
    with pytest.raises(ValueError, match="has no primary key"):
        resolve_key(view, table_info(conn, view.schema, view.name))


def test_plugin_probe(conn: psycopg.Connection) -> None:
    assert probe_plugin(conn, "wal2json") is None
    error = probe_plugin(conn, "pgderive_no_such_plugin")
    assert error and "pgderive_no_such_plugin" in error
    slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE"
                         " 'pgderive_probe_%' AND active_pid = pg_backend_pid()").fetchone()[0]
    assert slots == 0  # nothing left behind


def test_check_source_keeps_an_open_transaction_usable(schema: str) -> None:
    with psycopg.connect(DSN) as c:  # not autocommit: check_source runs inside the caller's tx
        before = c.execute("SHOW lock_timeout").fetchone()
        spec = make_spec(schema, '  a: {table: S.accounts, sink: cache, key: "{aid}"}\n')
        assert set(check_source(spec, c)) == {f"{schema}.accounts"}
        assert c.execute("SHOW lock_timeout").fetchone() == before  # probe's setting undone
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_plugin_probe_bounded_by_running_transactions(conn: psycopg.Connection,
                                                      schema: str) -> None:
    before = conn.execute("SHOW lock_timeout").fetchone()
    with psycopg.connect(DSN) as writer:  # a write transaction left open blocks slot creation
        writer.execute(sql.SQL("INSERT INTO {}.nopk VALUES (1, 1)").format(sql.Identifier(schema)))
        error = probe_plugin(conn, "wal2json", wait=0.5)
        assert error and error.startswith("no slot could be created within 0.5s")
        writer.rollback()
    assert conn.execute("SHOW lock_timeout").fetchone() == before
    assert probe_plugin(conn, "wal2json") is None


def test_avg_of_money_is_refused_at_its_yaml_path(conn: psycopg.Connection, schema: str) -> None:
    from views.check import build_views

    conn.execute(sql.SQL("CREATE TABLE {}.prices (id int PRIMARY KEY, shop int, price money)").format(
        sql.Identifier(schema)))
    spec = make_spec(schema, (
        "  by_shop: {table: S.prices, sink: cache, key: \"shop:{shop}\", group_by: [shop],\n"
        "            aggregate: {total: sum(price), mean: avg(price), n: count(*)}}\n"))
    with pytest.raises(SpecError) as info:
        build_views(spec, conn)
    assert [(p.path, p.line) for p in info.value.problems] == [("views.by_shop.aggregate", 7)]
    assert "no avg(money)" in str(info.value)
    ok = make_spec(schema, "  by_shop: {table: S.prices, sink: cache, key: \"s:{shop}\", group_by: [shop], aggregate: {total: sum(price)}}\n")
    assert [v.name for v in build_views(ok, conn)] == ["by_shop"]
