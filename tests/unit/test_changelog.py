"""Change-log views for a Kafka sink: the envelope, the Ops a change becomes, their batch (never
collapsed), and the spec's checks of kafka sinks and views (no services needed)."""
from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest

from cdc.catalog import TableInfo
from cdc.changes import Change, Transaction
from cdc.envelope import EnvelopeError, decode, encode, table_topic
from pgderive.runtime.batch import Batch
from views.changelog import message_key
from views.derive import View
from views.spec import SpecError, parse_spec

SPEC = """
source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks: {log: {type: kafka, topic_prefix: app}}
views:
  v: {table: public.t, sink: log}
"""
INFO = TableInfo("public.t", {"id": "integer", "name": "text", "big": "text"}, ("id",), "d", ("id",))
WHEN = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture
def view() -> View:
    return View("v", parse_spec(SPEC).views["v"], INFO)


def tx(*changes: Change) -> Transaction:
    return Transaction(xid=77, commit_lsn=1000, end_lsn=1100, commit_time=WHEN, changes=list(changes))


def test_default_topic_and_target(view: View) -> None:
    assert view.spec.topic_name == table_topic("app", "public.t") == "app.public.t"
    assert view.target.topic == "app.public.t" and view.target.table == "public.t"
    assert view.publisher is not None


def test_insert_update_delete_become_envelopes(view: View) -> None:
    assert view.publisher is not None
    ins = Change("insert", "public.t", new={"id": 1, "name": "a", "big": "x"})
    [op] = view.publisher.change_ops(ins, tx(ins), 1)
    assert message_key(op.key) == '{"id":1}' and op.version == 1000
    env = decode(orjson.dumps(op.doc))
    assert (env.op, env.after, env.before, env.xid, env.lsn, env.table) == ("c", ins.new, None, 77, 1000, "public.t")
    assert env.commit_time == WHEN and env.change() == Change("insert", "public.t", new=ins.new)
    upd = Change("update", "public.t", new={"id": 1, "name": "b"}, old_key={"id": 1})
    [op] = view.publisher.change_ops(upd, tx(upd), 2)
    env = decode(orjson.dumps(op.doc))
    assert env.op == "u" and env.partial and env.after == {"id": 1, "name": "b"}  # unchanged TOAST omitted
    dele = Change("delete", "public.t", old_key={"id": 1})
    [op] = view.publisher.change_ops(dele, tx(dele), 3)
    env = decode(orjson.dumps(op.doc))
    assert (env.op, env.before, env.after) == ("d", {"id": 1}, None) and env.change().kind == "delete"


def test_key_change_is_a_delete_then_a_create(view: View) -> None:
    assert view.publisher is not None
    upd = Change("update", "public.t", new={"id": 2, "name": "a", "big": "x"}, old_key={"id": 1})
    ops = view.publisher.change_ops(upd, tx(upd), 5)
    assert [(message_key(o.key), o.doc["op"]) for o in ops if o.doc] == [('{"id":1}', "d"), ('{"id":2}', "c")]


def test_snapshot_rows_are_reads_without_xid(view: View) -> None:
    op = view.row_op({"id": 3, "name": "c", "big": "z"}, 900)
    assert op is not None and message_key(op.key) == '{"id":3}'
    env = decode(orjson.dumps(op.doc))
    assert (env.op, env.xid, env.lsn, env.commit_time) == ("r", None, 900, None)
    assert orjson.loads(orjson.dumps(op.doc))["source"]["snapshot"] is True


def test_a_batch_keeps_every_change_of_a_row_in_order(view: View) -> None:
    assert view.publisher is not None
    batch = Batch()
    changes = [Change("update", "public.t", new={"id": 1, "name": n, "big": "x"}, old_key={"id": 1}) for n in "abc"]
    for seq, c in enumerate(changes):
        for op in view.publisher.change_ops(c, tx(c), seq):
            batch.add(op)
    assert [op.doc["after"]["name"] for op in batch.ops.values() if op.doc] == ["a", "b", "c"]


def test_decode_names_what_is_wrong() -> None:
    with pytest.raises(EnvelopeError, match="not JSON"):
        decode(b"{nope")
    with pytest.raises(EnvelopeError, match="unknown op"):
        decode(b'{"op": "x", "source": {"lsn": 1}}')
    with pytest.raises(EnvelopeError, match="source.lsn"):
        decode(b'{"op": "c", "source": {}}')
    with pytest.raises(EnvelopeError, match="tombstone"):
        decode(None)
    ok = encode("t", view="v", table="s.t", lsn=5, xid=None, commit_time=None, before=None, after=None)
    assert decode(ok).change().kind == "truncate"


def test_kafka_spec_errors_name_the_yaml_path() -> None:
    bad = """
source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks:
  log: {type: kafka, bootstrap_servers: "nohost", partitions: 0, producer: {acks: "0"}}
  cache: {type: redis}
views:
  a: {table: public.t, sink: log, where: "id > 1", key: "{id}", topic: "bad topic"}
  b: {table: public.t, sink: log}
  c: {table: public.u, sink: cache, key: "u:{id}", topic: x}
"""
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    text = str(e.value)
    for path in ("sinks.log.bootstrap_servers", "sinks.log.partitions", "sinks.log.producer.acks",
                 "views.a.where", "views.a.key", "views.a.topic", "views.c.topic"):
        assert path in text, (path, text)
    good = parse_spec(SPEC.replace("{table: public.t, sink: log}", "{table: public.t, sink: log, topic: one}")
                      .replace("sinks: {log: {type: kafka, topic_prefix: app}}",
                               "sinks: {log: {type: kafka, producer: {sasl.password: s3cret}}}"))
    assert good.views["v"].topic_name == "one" and "s3cret" in good.secrets()


def test_two_views_cannot_share_a_topic() -> None:
    twice = SPEC + "  w: {table: public.t, sink: log, fields: [id]}\n"
    with pytest.raises(SpecError, match="already published by view"):
        parse_spec(twice)
