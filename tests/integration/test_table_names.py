"""Tables whose names need quoting stream (issue 14, item 3).

A table named with a space, dot, comma, backslash, quote, asterisk, upper case or non-ASCII
letters used to bootstrap and then fail at every start: the ``add-tables`` entry was escaped
only for ``,`` ``.`` ``\\`` (wal2json then split ``a b`` at the space: "could not parse value"),
and psycopg sent the escaped value as ``E'…'``, which the replication grammar rejects ("syntax
error"). These tests run wal2json and the daemon on the real server.
"""
from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from psycopg import sql

from cdc.wal2json import plugin_options

from ..support import ROOT, Scenario, assert_views_equal, create_database, drop_database, unique

# One schema (no dot: refused, see the last test) and tables whose names wal2json's add-tables
# parser treats specially, plus decoys that a sloppy escaping would match instead.
SCHEMA = "Sch ema, 'ü' \\ *"
TABLES = ["a b", "a.b", "a,b", "a\\b", "it's", "MixedCase", "größe 表", "*", "x\ty"]
DECOYS = ["a", "b", "ab", "mixedcase", "x"]


def _create(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    for t in TABLES + DECOYS:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, label text)").format(
            sql.Identifier(SCHEMA, t)))


def _write(conn: psycopg.Connection, tables: list[str], base: int) -> None:
    for i, t in enumerate(tables):
        ident = sql.Identifier(SCHEMA, t)
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, %s || g FROM generate_series(%s::int, %s::int) g").format(ident),
                     (t, base, base + 9))
        conn.execute(sql.SQL("UPDATE {} SET label = 'upd ' || label WHERE id %% 3 = %s::int").format(ident), (i % 3,))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s::int").format(ident), (base + 4,))


def test_add_tables_selects_exactly_the_named_tables(tmp_path):
    """wal2json itself, with pgderive's options, decodes the odd tables and none of the decoys."""
    db = unique("pgd_names")
    dsn = create_database(db)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            _create(conn)
            slot = unique("names")
            # TEMPORARY: dropped with this connection, never left behind.
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json', true)", (slot,))
            _write(conn, TABLES + DECOYS, 1)
            opts = plugin_options([f"{SCHEMA}.{t}" for t in TABLES])
            args = [x for kv in opts.items() for x in kv]
            rows = conn.execute(
                sql.SQL("SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, {})").format(
                    sql.SQL(", ").join(sql.Placeholder() * len(args))), [slot, *args]).fetchall()
        seen: dict[str, int] = {}
        for (data,) in rows:
            msg = json.loads(data)
            if msg["action"] in "IUD":
                assert msg["schema"] == SCHEMA
                seen[msg["table"]] = seen.get(msg["table"], 0) + 1
        assert set(seen) == set(TABLES)  # every odd name matched, no decoy
    finally:
        drop_database(db)


@pytest.fixture
def scenario(tmp_path):
    views = ""
    for i, t in enumerate(TABLES):
        quoted = '"' + SCHEMA.replace('"', '""') + '"."' + t.replace('"', '""') + '"'
        table = json.dumps(quoted, ensure_ascii=False)  # a JSON string is a YAML double-quoted one
        sink = "search" if i == 0 else "cache"
        target = f"index: Pidx-n{i}" if sink == "search" else f'key: "P_n{i}:{{id}}"'
        views += f"  v{i}: {{table: {table}, sink: {sink}, {target}}}\n"
    s = Scenario(tmp_path, "SELECT 1", views)
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        _create(conn)
        _write(conn, TABLES + DECOYS, 1)  # bootstrap data
    yield s
    s.close()


def test_odd_table_names_bootstrap_stream_and_restart(scenario: Scenario):
    s = scenario
    check = subprocess.run([sys.executable, "-m", "pgderive.cli", "validate", "-c", str(s.config)],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    d = s.start()
    try:
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            _write(conn, TABLES + DECOYS, 100)
        s.caught_up()
        assert_views_equal(s.config)
    finally:
        assert d.stop() == 0, d.output()[-3000:]
    # The failure used to come at every start after the bootstrap: start again, stream again.
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        _write(conn, TABLES, 200)  # while stopped: replayed from the slot
    d = s.start()
    try:
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            _write(conn, TABLES, 300)
        s.caught_up()
        assert_views_equal(s.config)
        out = d.output()
        assert "syntax error" not in out and "could not parse" not in out, out[-3000:]
    finally:
        assert d.stop() == 0, d.output()[-3000:]

