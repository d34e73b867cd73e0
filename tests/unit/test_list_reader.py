"""cdc.testing: ListReader and the wal2json message builders (no services needed)."""
from __future__ import annotations

import threading

import orjson
import pytest

from cdc.slot import ChangeReader, Keepalive, ReplicationError, SlotReader
from cdc.testing import (ListReader, begin, commit, delete, insert, keepalive, logical_message, transaction,
                         truncate, update)


def _started(*entries, **kw) -> ListReader:
    r = ListReader(entries, **kw)
    r.connect()
    r.start()
    return r


def test_both_readers_are_change_readers():
    assert isinstance(ListReader(), ChangeReader)
    assert isinstance(SlotReader("dbname=x", "s"), ChangeReader)
    assert SlotReader("dbname=x", "s").connected is False


def test_builders_write_wal2json_format_2():
    assert begin(7, "0/20", "0/30") == {"action": "B", "xid": 7, "timestamp": "2026-01-01 00:00:00+00",
                                        "lsn": "0/20", "nextlsn": "0/30"}
    assert commit(7, 0x20)["action"] == "C" and commit(7, 0x20)["nextlsn"] == "0/21"
    assert insert("t", {"id": 1, "ok": True, "f": 0.5, "s": "x", "j": {"a": 1}, "n": None}) == {
        "action": "I", "schema": "public", "table": "t", "columns": [
            {"name": "id", "type": "bigint", "value": 1},
            {"name": "ok", "type": "boolean", "value": True},
            {"name": "f", "type": "double precision", "value": 0.5},
            {"name": "s", "type": "text", "value": "x"},
            {"name": "j", "type": "jsonb", "value": '{"a":1}'},
            {"name": "n", "type": "text", "value": None}]}
    assert update("app.t", {"id": 2}, {"id": 1}, types={"id": "integer"})["identity"] == [
        {"name": "id", "type": "integer", "value": 1}]
    assert "identity" not in update("t", {"id": 1})
    assert delete("t", {"id": 1})["action"] == "D" and truncate("s.t") == {
        "action": "T", "schema": "s", "table": "t"}


def test_messages_decode_into_the_same_events_as_from_a_slot():
    r = _started(
        transaction(7, "0/20", insert("t", {"id": 1, "doc": {"a": [1, 2]}}),
                    update("t", {"id": 5}, {"id": 1}, types={"id": "integer"}),
                    delete("t", {"id": 5}), truncate("t"), logical_message("p", "hello"),
                    end_lsn="0/30"),
        keepalive("0/40"),
    )
    tx, ka = list(r.read(max_wait=0))
    assert (tx.xid, tx.commit_lsn, tx.end_lsn, tx.final) == (7, 0x20, 0x30, True)
    assert tx.commit_time is not None and tx.commit_time.year == 2026
    assert [c.kind for c in tx.changes] == ["insert", "update", "delete", "truncate"]
    assert tx.changes[0].new == {"id": 1, "doc": {"a": [1, 2]}} and tx.changes[0].table == "public.t"
    assert tx.changes[1].old_key == {"id": 1}
    assert ka == Keepalive(0x40)
    assert r.received_lsn == 0x40 and r.at_transaction_boundary
    assert r.delivered == [tx, ka] and r.exhausted


def test_json_text_entries_and_exact_numerics():
    raw = ('{"action":"I","schema":"public","table":"n","columns":'
           '[{"name":"a","type":"numeric","value":12345678901234567890.123456789012345678901}]}')
    r = _started(orjson.dumps(begin(1, 2)).decode(), raw, orjson.dumps(commit(1, 2)))
    (tx,) = r.read(max_wait=0)
    assert tx.changes[0].new == {"a": "12345678901234567890.123456789012345678901"}


def test_large_transactions_arrive_in_chunks():
    r = _started(transaction(3, 0x100, *[insert("t", {"id": i}) for i in range(5)]), chunk_changes=2)
    chunks = list(r.read(max_wait=0))
    assert [(len(c.changes), c.final, c.commit_lsn) for c in chunks] == [(2, False, 0x100), (2, False, 0x100),
                                                                         (1, True, 0x100)]


def test_read_stops_after_max_events_messages():
    r = _started(transaction(1, 0x10, insert("t", {"id": 1})), transaction(2, 0x20, insert("t", {"id": 2})))
    assert list(r.read(max_wait=0, max_events=3)) != []  # B, I, C of the first transaction
    assert [tx.xid for tx in r.read(max_wait=0)] == [2]
    assert list(r.read(max_wait=0)) == []


def test_confirms_are_recorded_forward_only():
    r = _started(transaction(1, 0x10, end_lsn=0x18))
    list(r.read(max_wait=0))
    r.confirm(0x18)
    r.confirm(0x10)  # behind: recorded, not applied
    r.send_status(reply=True)
    assert r.confirmed_lsn == 0x18 and r.confirms == [0x18, 0x10]
    assert r.status_updates == [(0x18, False), (0x18, True)]


def test_reconnect_replays_what_was_not_confirmed():
    r = _started(transaction(1, 0x10, insert("t", {"id": 1}), end_lsn=0x18),
                 transaction(2, 0x20, insert("t", {"id": 2}), end_lsn=0x28),
                 keepalive(0x30))
    assert [getattr(e, "xid", None) for e in r.read(max_wait=0)] == [1, 2, None]
    r.confirm(0x18)
    r.break_stream()
    with pytest.raises(ReplicationError, match="connection lost"):
        list(r.read(max_wait=0))
    with pytest.raises(ReplicationError):
        list(r.read(max_wait=0))  # not streaming until started again
    r.close()
    assert not r.connected
    r.connect()
    r.start()  # from the confirmed position
    replay = list(r.read(max_wait=0))
    assert [getattr(e, "xid", None) for e in replay] == [2, None]
    r.close()
    r.connect()
    r.start(0x30)  # an explicit start position skips everything before
    assert list(r.read(max_wait=0)) == [Keepalive(0x30)]
    assert r.calls["connect"] == 3 and r.calls["start"] == 3


def test_a_half_received_transaction_is_forgotten_on_connect():
    r = _started(begin(1, 0x10), insert("t", {"id": 1}))
    assert list(r.read(max_wait=0)) == [] and not r.at_transaction_boundary
    r.connect()
    assert r.at_transaction_boundary


def test_read_waits_for_fed_messages():
    r = _started()
    got: list = []
    t = threading.Thread(target=lambda: got.extend(r.read(max_wait=5)))
    t.start()
    r.feed(transaction(1, 0x10, insert("t", {"id": 1})))
    t.join(5)
    assert [tx.xid for tx in got] == [1]
    assert list(_started(wait_when_idle=False).read(max_wait=5)) == []  # returns at once


def test_reading_before_start_fails():
    r = ListReader()
    with pytest.raises(ReplicationError):
        r.start()
    r.connect()
    with pytest.raises(ReplicationError):
        list(r.read(max_wait=0))


def test_entries_must_be_messages():
    with pytest.raises(TypeError, match="not a wal2json message"):
        ListReader([42])
