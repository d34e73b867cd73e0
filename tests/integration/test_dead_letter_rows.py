"""Dead letters while streaming, against real Postgres/wal2json and Redis (issue 14):

* item 6: a later change of a row (an update to a valid key, a delete) supersedes its dead
  letter, in stream order, also across a restart of the daemon;
* item 7: a dead letter stores only the columns the view reads, bounded by
  ``dead_letters.max_bytes`` with the cut columns named; ``dead-letters retry`` still works;
* item 12: a dead letter of a ``derive`` failure carries the row's sink key.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from cdc.lsn import parse_lsn

from ..support import REDIS_URL, ROOT, Scenario, assert_views_equal, current_lsn

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, code text, name text, outside text);
ALTER TABLE items REPLICA IDENTITY FULL;  -- every column is identity: the key may use 'code'
"""
VIEWS = """
  P_items:
    table: items
    sink: cache
    key: "P_item:{code}"
    fields: [code, name]
  P_cards:
    table: items
    sink: cache
    key: "P_card:{id}"
    format: json
    fields: {name: name, price: id}
    derive: tests.derivations:product_card
"""
CAP = 16384


@pytest.fixture
def s(tmp_path):
    sc = Scenario(tmp_path, SCHEMA, VIEWS)
    sc.config.write_text(sc.config.read_text() + f"dead_letters: {{max_bytes: {CAP}}}\n")
    yield sc
    sc.close()


def letters(s: Scenario, view: str) -> list[dict]:
    rows = s.sql("""SELECT id, sink_key, commit_lsn::text, row, row_identity, truncated, superseded_lsn::text,
                           octet_length(row::text), error
                      FROM pgderive.dead_letters WHERE slot = %s AND view = %s ORDER BY id""",
                 (s.slot, f"{s.p}_{view}"))
    names = ("id", "key", "lsn", "row", "identity", "truncated", "superseded", "bytes", "error")
    return [dict(zip(names, r)) for r in rows or []]


def cli(s: Scenario, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgderive.cli", "dead-letters", *args, "-c", str(s.config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})


def test_a_later_change_supersedes_the_rows_dead_letter_in_order(s: Scenario):
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    d = s.start()
    try:
        s.sql("INSERT INTO items VALUES (1, NULL, 'one', 'x'), (2, NULL, 'two', 'x'), (3, NULL, 'three', 'x')")
        s.caught_up()
        dead = letters(s, "items")
        assert [(x["identity"], x["superseded"], x["key"]) for x in dead] == \
            [({"id": i}, None, None) for i in (1, 2, 3)]
        assert cli(s, "list").stdout.count(f"{s.p}_items") == 3

        before = current_lsn(s.dsn)
        s.sql("UPDATE items SET code = 'a' WHERE id = 1")   # now valid: the record appears ...
        s.sql("DELETE FROM items WHERE id = 2")              # gone: nothing left to derive
        s.caught_up()
        assert r.hgetall(f"{s.p}_item:a") == {"code": "a", "name": "one"}
        dead = {x["identity"]["id"]: x for x in letters(s, "items")}
        # ... and the dead letters are marked superseded at the LSN of the change that did it
        for i in (1, 2):
            assert dead[i]["superseded"] is not None and parse_lsn(dead[i]["superseded"]) > before
            assert parse_lsn(dead[i]["superseded"]) > parse_lsn(dead[i]["lsn"])
        assert dead[3]["superseded"] is None
        out = cli(s, "list")
        assert out.stdout.count(f"{s.p}_items") == 1, out.stdout   # list and count: open ones only
        out = cli(s, "list", "--superseded")
        assert out.stdout.count(f"{s.p}_items") == 3 and dead[1]["superseded"] in out.stdout, out.stdout

        # Inside one transaction: the NULL-key insert's dead letter is stored already superseded.
        s.sql("BEGIN; INSERT INTO items VALUES (4, NULL, 'four', 'x'); UPDATE items SET code = 'd' WHERE id = 4;"
              " COMMIT;")
        s.caught_up()
        assert r.hgetall(f"{s.p}_item:d") == {"code": "d", "name": "four"}
        [four] = [x for x in letters(s, "items") if x["identity"] == {"id": 4}]
        assert four["superseded"] is not None
    finally:
        assert d.stop() == 0, d.output()[-3000:]

    # Across a restart: the open dead letter of row 3 is superseded by a change the daemon
    # reads after starting again (made while it was stopped).
    s.sql("UPDATE items SET code = 'c' WHERE id = 3")
    d = s.start()
    try:
        s.caught_up()
        assert r.hgetall(f"{s.p}_item:c") == {"code": "c", "name": "three"}
        assert all(x["superseded"] is not None for x in letters(s, "items"))
        # A later change that fails again supersedes the earlier dead letter and is the open one.
        s.sql("INSERT INTO items VALUES (5, NULL, 'five', 'x')")
        s.sql("UPDATE items SET name = 'five!' WHERE id = 5")
        s.caught_up()
        five = [x for x in letters(s, "items") if x["identity"] == {"id": 5}]
        assert [x["superseded"] is None for x in five] == [False, True]
        assert five[1]["row"]["name"] == "five!"
        s.sql("UPDATE items SET code = 'e' WHERE id = 5")
        s.caught_up()
        assert_views_equal(s.config)
        assert cli(s, "list").stdout.count(f"{s.p}_items") == 0
    finally:
        assert d.stop() == 0, d.output()[-3000:]


def test_dead_letters_store_what_the_view_reads_bounded(s: Scenario):
    d = s.start()
    try:
        # 5 MB outside the view's columns, 200 kB in a field, a NULL key: a dead letter
        s.sql("INSERT INTO items VALUES (10, NULL, repeat('n', 200000), repeat('o', 5000000))")
        # a derive failure ('boom' raises) on a row with a valid key
        s.sql("INSERT INTO items VALUES (11, 'k', 'boom', 'x')")
        s.caught_up()
        [big] = letters(s, "items")
        assert set(big["row"]) == {"id", "code", "name"}          # not 'outside'
        assert big["truncated"] == ["name"] and big["bytes"] <= CAP + 64
        assert big["row"]["id"] == 10 and big["row"]["code"] is None
        assert 1000 < len(big["row"]["name"]) < CAP and set(big["row"]["name"]) == {"n"}
        out = cli(s, "list")
        assert "(row truncated: name)" in out.stdout, out.stdout
        cards = letters(s, "cards")
        assert [(c["key"], c["row"]["id"]) for c in cards] == [(f"{s.p}_card:11", 11)]  # not '-'
        assert "boom is not a product" in cards[0]["error"]
        assert set(cards[0]["row"]) == {"id", "name"}
    finally:
        assert d.stop() == 0, d.output()[-3000:]
    # Retry still works from the bounded row: the row (fixed while the daemon is stopped) is
    # looked up by its identity and written whole.
    s.sql("UPDATE items SET code = 'big' WHERE id = 10")
    out = cli(s, "retry", "--view", f"{s.p}_items")
    assert out.returncode == 0 and "1 applied, 0 still failing" in out.stdout, out.stdout + out.stderr
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    assert len(r.hget(f"{s.p}_item:big", "name")) == 200000
    assert letters(s, "items") == []
    s.start()
    s.caught_up()
    assert_views_equal(s.config)
