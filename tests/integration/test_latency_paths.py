"""The two round-trip savers of the streaming path, on the real services: one ``read`` call takes
everything the walsender already sent (not one libpq buffer's worth), and the Redis sink applies a
batch and advances its checkpoints in one Lua call that never advances past a failed write."""
from __future__ import annotations

import time
import uuid

import pytest
import redis
from redis import exceptions as rx

from cdc.changes import Transaction
from cdc.lsn import format_lsn, version_hex
from cdc.slot import SlotReader
from sinks.base import Op, ViewTarget
from sinks.redis import RedisSink, checkpoint_key

from ..support import REDIS_URL, Scenario, current_lsn, wait_until


def test_one_read_takes_everything_already_sent(tmp_path):
    s = Scenario(tmp_path, "CREATE TABLE t (id int PRIMARY KEY, v text);",
                 '  P_t: {table: t, sink: cache, key: "P_:{id}", format: hash}\n')
    try:
        reader = SlotReader(s.dsn, s.slot, tables=["public.t"])
        reader.connect()
        reader.create_slot()
        # ~90 kB of wal2json output: six libpq buffers' worth, under the socket's receive buffer
        # (with 400 rows, ~150 kB, the rest waited in the walsender's send buffer for our reads
        # to open the TCP window, and one read took 363 of them)
        for i in range(250):
            s.sql("INSERT INTO t VALUES (%s, repeat('x', 200))", (i,))
        end = current_lsn(s.dsn)
        reader.start(0)

        def all_sent() -> bool:  # the walsender decoded and sent everything into our socket
            row = s.sql("SELECT r.sent_lsn >= %s::pg_lsn FROM pg_stat_replication r JOIN pg_replication_slots s "
                        "ON s.active_pid = r.pid WHERE s.slot_name = %s", (format_lsn(end), s.slot))
            return bool(row and row[0][0])
        wait_until(all_sent, 30, interval=0.05, what="walsender to send the inserts")
        time.sleep(0.2)  # the last bytes reach the socket
        first = [e for e in reader.read(max_wait=5, max_events=100_000) if isinstance(e, Transaction) and e.changes]
        reader.close()
        assert len(first) == 250, len(first)
    finally:
        s.close()


@pytest.fixture
def sink():
    sink = RedisSink("cache", REDIS_URL)
    views = [f"t_adv_{uuid.uuid4().hex[:8]}", f"t_adv_{uuid.uuid4().hex[:8]}"]
    sink.register(ViewTarget(views[0], format="hash"))
    sink.register(ViewTarget(views[1], format="json"))
    sink.write_checkpoint(views, 0x100)
    yield sink, views
    for v in views:
        sink.drop_view(v)
    sink.close()


def test_apply_and_advance_in_one_call(sink):
    sink, (h, j) = sink
    r = redis.Redis.from_url(REDIS_URL)
    ops = [Op(h, f"{h}:1", 0x200, {"a": 1}), Op(j, f"{j}:1", 0x200, {"b": [1]}), Op(h, f"{h}:2", 0x200, None)]
    rejected, lost = sink.apply_and_advance(ops, [h, j], 0x100, 0x200)
    assert rejected == [] and lost == []
    assert r.hgetall(f"{h}:1") == {b"a": b"1"} and r.get(f"{j}:1") == b'{"b":[1]}'
    assert sink.read_checkpoint(h) == sink.read_checkpoint(j) == 0x200
    # A checkpoint Redis lost is reported and not written; the Ops still apply.
    r.delete(checkpoint_key(j))
    rejected, lost = sink.apply_and_advance([Op(h, f"{h}:1", 0x300, {"a": 2})], [h, j], 0x200, 0x300)
    assert lost == [j] and sink.read_checkpoint(j) is None and sink.read_checkpoint(h) == 0x300
    assert r.hget(f"{h}:1", "a") == b"2"
    # A foreign key type is refused, the rest applied, the checkpoint advanced (the refusal
    # becomes a dead letter).
    r.set(f"{h}:9", "foreign")
    rejected, lost = sink.apply_and_advance([Op(h, f"{h}:9", 0x400, {"a": 1}), Op(h, f"{h}:3", 0x400, {"a": 3})],
                                            [h], 0x300, 0x400)
    assert [x.op.key for x in rejected] == [f"{h}:9"] and "WRONGTYPE" in rejected[0].error
    assert r.hget(f"{h}:3", "a") == b"3" and sink.read_checkpoint(h) == 0x400
    r.delete(f"{h}:9")
    # More Ops than one Lua call takes: two calls, same result.
    many = [Op(h, f"{h}:m{i}", 0x500, {"i": i}) for i in range(sink.batch_size + 5)]
    rejected, lost = sink.apply_and_advance(many, [h], 0x400, 0x500)
    assert not rejected and not lost and sink.read_checkpoint(h) == 0x500
    assert r.hget(f"{h}:m{sink.batch_size + 4}", "i") == str(sink.batch_size + 4).encode()


def test_a_failed_write_stops_the_call_before_the_checkpoint(sink):
    sink, (h, _) = sink
    # An Op kind the script does not know makes it raise midway (white box: no public call can).
    keys = [checkpoint_key(h), f"pgderive:{h}:versions", f"{h}:1"]
    args = [version_hex(0x200), version_hex(0x100), 1, 1, 1, version_hex(0x200), "?"]
    with pytest.raises(rx.ResponseError, match="unknown op kind"):
        sink._run(sink._apply_advance_script, [(keys, args)])
    assert sink.read_checkpoint(h) == 0x100
