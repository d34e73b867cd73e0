"""Dead letters (views/deadletters.py and `pgderive dead-letters`) against real Postgres and Redis."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis

from cdc.lsn import format_lsn, version_hex
from sinks.base import Op, ViewTarget
from sinks.factory import make_sink
from pgderive.state.deadletters import DeadLetter, DeadLetterStore, encode_row

from sinks.redis import versions_key

from ..support import REDIS_URL, ROOT, create_database, current_lsn, deployment, drop_database, unique


@pytest.fixture
def db():
    """A scratch database per test: (name, dsn); dropped afterwards."""
    name = unique("pgd_dl")
    dsn = create_database(name)
    yield name, dsn
    drop_database(name)


def _letter(view: str, i: int, lsn: int = 0x1000, **row) -> DeadLetter:
    return DeadLetter(view=view, table="public.items", key=None if i % 2 else f"k:{i}", lsn=lsn + i,
                      error=f"key column 'code' is NULL ({i})", row={"id": i, **row})


def test_record_list_count_discard_round_trip(db):
    _, dsn = db
    with DeadLetterStore(dsn) as store:
        # reading a database without the table neither fails nor creates it
        assert store.count("s1") == {} and store.list("s1") == [] and store.discard("s1") == 0
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT to_regclass('pgderive.dead_letters')").fetchone()[0] is None
        store.record("s1", [])  # no-op
        store.record("s1", [_letter("a", 1), _letter("a", 2), _letter("b", 3)])
        store.record("s2", [_letter("a", 4)])
        store.ensure_schema()  # idempotent DDL, also from a second store
        DeadLetterStore(dsn).ensure_schema()

        assert store.count("s1") == {"a": 2, "b": 1}
        assert store.count("s2") == {"a": 1}
        records = store.list("s1")
        assert [r.row["id"] for r in records] == [1, 2, 3]
        assert [r.id for r in records] == sorted(r.id for r in records)
        first = records[0]
        assert (first.slot, first.view, first.table, first.key, first.commit_lsn, first.retries) == \
            ("s1", "a", "public.items", None, 0x1001, 0)
        assert first.error == "key column 'code' is NULL (1)"
        assert records[1].key == "k:2"
        assert isinstance(first.created_at, datetime) and first.created_at.tzinfo is not None
        assert [r.row["id"] for r in store.list("s1", view="b")] == [3]
        assert len(store.list("s1", limit=2)) == 2

        assert store.discard("s1", ids=[first.id]) == 1
        assert store.discard("s1", ids=[first.id]) == 0
        assert store.discard("s1", ids=[records[1].id], view="b") == 0  # id of view a: kept
        assert store.count("s1") == {"a": 1, "b": 1}
        assert store.discard("s1", view="b") == 1
        assert store.count("s1") == {"a": 1}
        assert store.discard("s1") == 1
        assert store.count("s1") == {}
        assert store.count("s2") == {"a": 1}  # other slots untouched


def test_take_for_retry_mark_retried_delete(db):
    _, dsn = db
    with DeadLetterStore(dsn) as store:
        # recorded out of LSN order; retried in stream order
        store.record("s", [_letter("a", 3, lsn=0x500), _letter("a", 1, lsn=0x100), _letter("b", 2, lsn=0x300)])
        taken = store.take_for_retry("s")
        assert [r.commit_lsn for r in taken] == [0x101, 0x302, 0x503]
        assert [r.row["id"] for r in store.take_for_retry("s", view="a")] == [1, 3]
        assert [r.row["id"] for r in store.take_for_retry("s", ids=[taken[2].id])] == [3]
        assert store.take_for_retry("s", ids=[]) == []
        assert store.count("s") == {"a": 2, "b": 1}  # taking removes nothing

        assert store.mark_retried([taken[0].id], "still NULL") == 1
        assert store.mark_retried([taken[0].id]) == 1
        again = store.take_for_retry("s", ids=[taken[0].id])[0]
        assert again.retries == 2 and again.error == "still NULL"
        assert store.delete([taken[0].id, taken[1].id]) == 2
        assert [r.id for r in store.take_for_retry("s")] == [taken[2].id]


def test_row_json_with_odd_types(db):
    _, dsn = db
    at = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    row = {"price": Decimal("12.30"), "at": at, "day": date(2024, 5, 6), "blob": b"\x00\xffA",
           "mem": memoryview(b"\x01"), "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
           "nested": {"n": [1, 2.5, None, True]}, "nul": "a\x00b", "big": 2 ** 70, "none": None,
           "text": "plain ünïcode"}
    with DeadLetterStore(dsn) as store:
        store.record("s", [DeadLetter("v", "public.t", "t:1", 0x16B374D848, "boom\x00!", row),
                           DeadLetter("v", "public.t", None, 1, "no row", None)])
        got, no_row = store.list("s")
    assert got.commit_lsn == 0x16B374D848 and format_lsn(got.commit_lsn) == "16/B374D848"
    assert got.error == "boom\ufffd!"
    assert no_row.row is None
    r = got.row
    assert r["price"] == "12.30"
    assert datetime.fromisoformat(r["at"]) == at
    assert r["day"] == "2024-05-06"
    assert r["blob"] == "\\x00ff41" and r["mem"] == "\\x01"
    assert r["uid"] == "12345678-1234-5678-1234-567812345678"
    assert r["nested"] == {"n": [1, 2.5, None, True]}
    assert r["nul"] == "a\ufffdb"
    assert int(r["big"]) == 2 ** 70
    assert r["none"] is None and r["text"] == "plain ünïcode"
    assert encode_row(None) is None


# -- the CLI ------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, code text, name text);
ALTER TABLE items REPLICA IDENTITY FULL;  -- every column is identity: the key may use 'code'
"""


def config_text(dsn: str, slot: str, view: str, prefix: str) -> str:
    return f"""
source:
  dsn: {dsn}
  slot: {slot}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
views:
  {view}:
    table: public.items
    sink: cache
    key: "{prefix}:item:{{code}}"
    fields: [id, code, name]
    format: hash
  {view}_doc:
    table: public.items
    sink: cache
    key: "{prefix}:doc:{{id}}"
    fields: {{ident: id, c: code, label: name}}
    format: json
"""


class Env:
    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.dsn = dsn
        self.slot = unique("slot")
        self.prefix = unique("dl")
        self.view = f"{self.prefix}_cache"
        self.config = tmp_path / "pgderive.yaml"
        self.config.write_text(config_text(dsn, self.slot, self.view, self.prefix))
        self.sql(SCHEMA)
        self.store = DeadLetterStore(dsn)

    def sql(self, query: str, params=None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query, params)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pgderive.cli", "dead-letters", *args, "-c", str(self.config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "250"})

    def key(self, code: str) -> str:
        return f"{self.prefix}:item:{code}"

    def letter(self, row: dict, lsn: int, key: str | None = None) -> DeadLetter:
        return DeadLetter(self.view, "public.items", key, lsn, "key column 'code' is NULL", row)


@pytest.fixture
def env(tmp_path, db):
    e = Env(tmp_path, db[1])
    yield e
    e.store.close()
    sink = make_sink("cache", {"type": "redis", "url": REDIS_URL}, deployment=deployment(e.config))
    for view, fmt in ((e.view, "hash"), (f"{e.view}_doc", "json")):
        sink.register(ViewTarget(view=view, format=fmt))
        sink.drop_view(view)
    sink.close()


def test_cli_list_and_discard(env: Env):
    out = env.cli("list")
    assert out.returncode == 0, out.stderr
    assert "no dead letters" in out.stdout
    env.store.record(env.slot, [env.letter({"id": i, "code": None, "name": f"n{i}"}, 0x2000 + i)
                                for i in range(1, 5)])
    env.store.record("other_slot", [env.letter({"id": 9, "code": None, "name": "x"}, 0x2000)])
    ids = [r.id for r in env.store.list(env.slot)]

    out = env.cli("list")
    assert out.returncode == 0, out.stderr
    listed = [line.split("│")[1].strip() for line in out.stdout.splitlines() if line.startswith("│")]
    assert listed == [str(i) for i in ids]
    assert env.view in out.stdout and "public.items" in out.stdout
    assert format_lsn(0x2001) in out.stdout and "is NULL" in out.stdout
    out = env.cli("list", "--limit", "2")
    assert out.returncode == 0 and "2 of 4" in out.stdout

    out = env.cli("discard")
    assert out.returncode == 2 and "--all" in out.stderr
    assert env.store.count(env.slot) == {env.view: 4}

    out = env.cli("discard", str(ids[0]), str(ids[1]))
    assert out.returncode == 0, out.stderr
    assert "discarded 2" in out.stdout
    assert [r.id for r in env.store.list(env.slot)] == ids[2:]
    out = env.cli("discard", "--view", "no_such_view")
    assert out.returncode == 0 and "discarded 0" in out.stdout
    out = env.cli("discard", "--all")
    assert out.returncode == 0 and "discarded 2" in out.stdout
    assert env.store.count(env.slot) == {}
    assert env.store.count("other_slot") == {env.view: 1}


def test_cli_retry_applies_the_current_row_at_the_dead_letters_lsn(env: Env):
    r = redis.Redis.from_url(REDIS_URL)
    versions = versions_key(env.view, deployment(env.config))
    env.sql("INSERT INTO items VALUES (1, NULL, 'one'), (2, 'c2', 'two'), (3, NULL, 'three'), (4, 'c4', 'four')")
    lsn = current_lsn(env.dsn)
    sink = make_sink("cache", {"type": "redis", "url": REDIS_URL}, deployment=deployment(env.config))
    sink.register(ViewTarget(view=env.view, format="hash"))
    try:
        # c2: an old record the sink holds; its row will be deleted before the retry
        # c4: the stream already wrote a NEWER version than the dead letter's: it must win
        sink.apply([Op(env.view, env.key("c2"), lsn - 100, {"id": 2, "code": "c2", "name": "old"}),
                    Op(env.view, env.key("c4"), lsn + 1000, {"id": 4, "code": "c4", "name": "newer"})])
    finally:
        sink.close()
    env.store.record(env.slot, [
        env.letter({"id": 1, "code": None, "name": "one"}, lsn),
        env.letter({"id": 2, "code": "c2", "name": "two"}, lsn, key=env.key("c2")),
        env.letter({"id": 3, "code": None, "name": "three"}, lsn),
        env.letter({"id": 4, "code": "c4", "name": "four"}, lsn, key=env.key("c4")),
    ])
    by_row = {rec.row["id"]: rec.id for rec in env.store.list(env.slot)}

    # the operator fixes the source: row 1 gets its key column, row 2 is gone, row 3 stays NULL
    env.sql("UPDATE items SET code = 'c1' WHERE id = 1")
    env.sql("DELETE FROM items WHERE id = 2")

    out = env.cli("retry", str(by_row[1]), str(by_row[2]), str(by_row[4]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{by_row[1]} ({env.view}): upserted {env.key('c1')}" in out.stdout
    assert "row no longer exists" in out.stdout
    assert r.hgetall(env.key("c1")) == {b"id": b"1", b"code": b"c1", b"name": b"one"}
    assert r.hget(versions, env.key("c1")) == version_hex(lsn).encode()
    assert not r.exists(env.key("c2"))
    assert r.hget(versions, env.key("c2")) == version_hex(lsn).encode() + b"d"  # tombstone
    assert r.hget(env.key("c4"), "name") == b"newer"  # a later stream write wins by version
    assert r.hget(versions, env.key("c4")) == version_hex(lsn + 1000).encode()
    assert [rec.row["id"] for rec in env.store.list(env.slot)] == [3]

    # row 3 still has a NULL key column: kept, retries counted, exit code 1
    out = env.cli("retry")
    assert out.returncode == 1
    assert f"{by_row[3]} ({env.view}): still failing" in out.stdout and "NULL" in out.stdout
    (left,) = env.store.list(env.slot)
    assert left.id == by_row[3] and left.retries == 1 and "NULL" in left.error

    env.sql("UPDATE items SET code = 'c3' WHERE id = 3")
    out = env.cli("retry", "--view", env.view)
    assert out.returncode == 0, out.stdout + out.stderr
    assert r.hget(env.key("c3"), "name") == b"three"
    assert env.store.count(env.slot) == {}
    out = env.cli("retry", "12345")
    assert out.returncode == 1 and "12345: no such dead letter" in out.stdout


def test_cli_retry_of_a_refused_document(env: Env):
    """A sink-refused document is stored as the derived doc (output names): retry maps it back
    to the source columns to find the row."""
    r = redis.Redis.from_url(REDIS_URL)
    view = f"{env.view}_doc"
    env.sql("INSERT INTO items VALUES (5, 'c5', 'five')")
    lsn = current_lsn(env.dsn)
    key = f"{env.prefix}:doc:5"
    env.store.record(env.slot, [DeadLetter(view, "public.items", key, lsn, "mapper_parsing_exception: ...",
                                           {"ident": 5, "c": "c5", "label": "five"})])
    env.sql("UPDATE items SET name = 'five, fixed' WHERE id = 5")
    out = env.cli("retry", "--view", view)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"upserted {key}" in out.stdout
    assert json.loads(r.get(key)) == {"ident": 5, "c": "c5", "label": "five, fixed"}
    assert env.store.count(env.slot) == {}

    # a document without the identity columns cannot be looked up: kept, retries counted
    env.store.record(env.slot, [DeadLetter(view, "public.items", key, lsn, "refused", {"label": "x"})])
    out = env.cli("retry")
    assert out.returncode == 1 and "lacks the identity columns" in out.stdout
    assert env.store.list(env.slot)[0].retries == 1
