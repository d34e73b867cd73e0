"""KafkaReader's bookkeeping against cdc.testing.FakeConsumer: positions, offsets, rebalances."""
from __future__ import annotations

import datetime as dt

import pytest
from confluent_kafka import KafkaError

from cdc.changes import Transaction
from cdc.envelope import encode, truncate_record
from cdc.kafka_source import KafkaReader, consumer_config
from cdc.slot import Keepalive, ReplicationError
from cdc.testing import FakeConsumer

T = "pgderive.public.t"
WHEN = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def env(op: str, lsn: int, row: dict | None = None, xid: int | None = 7) -> bytes:
    before = row if op == "d" else None
    after = None if op == "d" else row
    return encode(op, view="pub", table="public.t", lsn=lsn, xid=xid, commit_time=WHEN,  # type: ignore[arg-type]
                  before=before, after=after)


def make(fake: FakeConsumer) -> KafkaReader:
    reader = KafkaReader(consumer_config("x:1", "g"), [T], consumer_factory=lambda _c: fake)
    reader.connect()
    reader.start()
    return reader


def txs(reader: KafkaReader) -> list[Transaction]:
    return [e for e in reader.read(0.0) if isinstance(e, Transaction)]


def test_config_defaults_and_overrides():
    c = consumer_config("h:9093", "grp", session_timeout=6, options={"client.id": "w1"})
    assert c["group.id"] == "grp" and c["enable.auto.commit"] is False
    assert c["isolation.level"] == "read_committed" and c["auto.offset.reset"] == "earliest"
    assert c["session.timeout.ms"] == 6000 and c["client.id"] == "w1"


def test_transactions_carry_envelope_versions_and_synthetic_positions():
    fake = FakeConsumer()
    fake.produce(T, 0, env("r", 100, {"id": 1}, xid=None), env("c", 200, {"id": 2}), env("c", 200, {"id": 3}))
    fake.produce(T, 1, env("u", 150, {"id": 4}))
    fake.assign((T, 0), (T, 1))
    reader = make(fake)
    got = txs(reader)
    assert fake.topics == [T]
    # round-robin: p0@0 (100), p1@0 (150), p0@1 (200), p0@2 (200, same run as p0@1)
    assert [t.commit_lsn for t in got] == [100, 150, 200]
    assert [len(t.changes) for t in got] == [1, 1, 2]
    assert [t.end_lsn for t in got] == [1, 2, 4]  # positions, strictly increasing
    assert got[0].xid == 0 and got[2].xid == 7 and got[2].commit_time == WHEN
    assert got[0].changes[0].kind == "insert" and got[1].changes[0].kind == "update"
    assert reader.received_lsn == 4


def test_keepalive_when_idle_at_current_position():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 5, {"id": 1}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 1
    assert list(reader.read(0.0)) == [Keepalive(1)]


def test_confirm_commits_offsets_past_confirmed_positions_only():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 30, {"id": 2}))
    fake.produce(T, 1, env("c", 20, {"id": 3}), env("c", 40, {"id": 4}))
    fake.assign((T, 0), (T, 1))
    reader = make(fake)
    got = txs(reader)
    assert [(t.commit_lsn, t.end_lsn) for t in got] == [(10, 1), (20, 2), (30, 3), (40, 4)]
    reader.confirm(0)
    assert fake.commits == []
    reader.confirm(2)  # p0@0 and p1@0 are acknowledged
    assert fake.committed == {(T, 0): 1, (T, 1): 1}
    assert fake.commits[-1][1] is True  # asynchronous
    reader.confirm(3)
    assert fake.committed == {(T, 0): 2, (T, 1): 1}
    n = len(fake.commits)
    reader.confirm(3)  # nothing new: no commit call
    assert len(fake.commits) == n
    reader.confirm(2)  # never lowers
    assert reader.confirmed_lsn == 3 and fake.committed[(T, 0)] == 2
    reader.close()  # synchronous commit of what is confirmed, then close
    assert fake.closed and fake.committed == {(T, 0): 2, (T, 1): 1}


def test_unconfirmed_messages_replay_on_the_next_consumer():
    logs: dict = {}
    committed: dict = {}
    first = FakeConsumer(logs=logs, committed=committed)
    first.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}), env("c", 30, {"id": 3}))
    first.assign((T, 0))
    a = make(first)
    assert len(txs(a)) == 3
    a.confirm(1)  # only the first acknowledged; then the worker dies (no close)
    second = FakeConsumer(logs=logs, committed=committed)
    second.assign((T, 0))
    b = make(second)
    assert [t.commit_lsn for t in txs(b)] == [20, 30]


def test_invalid_message_is_skipped_and_its_offset_committed():
    fake = FakeConsumer()
    fake.produce(T, 0, b"not json", None, env("c", 10, {"id": 1}))
    fake.assign((T, 0))
    reader = make(fake)
    got = txs(reader)
    assert [t.commit_lsn for t in got] == [10] and got[0].end_lsn == 3
    assert reader.skipped == 2
    reader.confirm(3)
    assert fake.committed == {(T, 0): 3}


def test_invalid_tail_is_committed_by_a_keepalive_confirmation():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), b"{}")
    fake.assign((T, 0))
    reader = make(fake)
    assert [t.end_lsn for t in txs(reader)] == [1]
    assert list(reader.read(0.0)) == [Keepalive(2)]
    reader.confirm(2)
    assert fake.committed == {(T, 0): 2}


def test_truncate_control_record_is_a_truncate_change():
    fake = FakeConsumer()
    fake.produce(T, 0, truncate_record(view="pub", table="public.t", lsn=50, xid=9, commit_time=WHEN))
    fake.assign((T, 0))
    reader = make(fake)
    (tx,) = txs(reader)
    assert tx.commit_lsn == 50 and tx.changes[0].kind == "truncate" and tx.changes[0].table == "public.t"


def test_revoke_drains_commits_synchronously_and_forgets_the_partition():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 30, {"id": 2}))
    fake.produce(T, 1, env("c", 20, {"id": 3}))
    fake.assign((T, 0), (T, 1))
    reader = make(fake)
    assert len(txs(reader)) == 3
    drained: list[float] = []

    def drain(timeout: float) -> int:
        drained.append(timeout)
        return 3  # everything read is acknowledged
    reader.on_revoke = drain
    fake.revoke((T, 0))
    fake.produce(T, 1, env("c", 40, {"id": 4}))
    assert [t.commit_lsn for t in txs(reader)] == [40]
    assert drained and reader.assignment() == [(T, 1)]
    sync = [c for c in fake.commits if c[1] is False]
    assert sync == [([(T, 0, 2)], False)]  # only the revoked partition, synchronously
    reader.confirm(4)
    assert fake.committed == {(T, 0): 2, (T, 1): 2}


def test_revoke_without_acknowledgement_commits_nothing_for_it():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 30, {"id": 2}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 2
    reader.confirm(1)
    reader.on_revoke = lambda _t: 1  # the second message is not acknowledged in time
    fake.revoke((T, 0))
    assert txs(reader) == []
    assert fake.committed == {(T, 0): 1}  # the next owner replays offset 1
    reader.confirm(2)  # confirming later never commits for a partition no longer ours
    assert fake.committed == {(T, 0): 1}


def test_lost_partition_is_forgotten_without_commit():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 1
    fake.lose((T, 0))
    assert txs(reader) == []
    reader.confirm(1)
    assert fake.commits == [] and reader.assignment() == []


def test_reassigned_partition_restarts_bookkeeping():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 2
    reader.on_revoke = lambda _t: 1
    fake.revoke((T, 0))
    assert txs(reader) == []
    fake.assign((T, 0))  # back: read again from the committed offset 1
    got = txs(reader)
    assert [(t.commit_lsn, t.end_lsn) for t in got] == [(20, 3)]
    reader.confirm(3)
    assert fake.committed == {(T, 0): 2}


def test_failed_async_commit_is_retried_by_the_next_confirm():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 1
    fake.fail_commits = True
    reader.confirm(1)
    assert fake.committed == {}
    fake.fail_commits = False
    reader.confirm(1)
    assert fake.committed == {(T, 0): 1}


def test_fatal_error_raises_replication_error_other_errors_are_logged():
    fake = FakeConsumer()
    fake.assign((T, 0))
    reader = make(fake)
    fake.error_event(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "no such topic"))
    assert list(reader.read(0.0)) == []
    fake.error_event(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    with pytest.raises(ReplicationError):
        list(reader.read(0.0))


def test_lag_from_watermarks():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}))
    fake.assign((T, 0))
    reader = make(fake)
    list(reader.read(0.0, max_events=1))
    assert reader._compute_lag() == {(T, 0): 1}
    reader._lag_at = 0.0
    list(reader.read(0.0))
    assert reader.lag() == {(T, 0): 1}  # computed at the start of the read: one was still unread


def test_not_connected_raises():
    reader = KafkaReader({}, [T], consumer_factory=lambda _c: FakeConsumer())
    with pytest.raises(ReplicationError):
        reader.start()


def test_messages_not_taken_by_the_caller_are_delivered_by_the_next_read():
    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}), env("c", 20, {"id": 3}),
                 env("c", 30, {"id": 4}))
    fake.assign((T, 0))
    reader = make(fake)
    events = reader.read(0.0)
    first = next(events)
    events.close()  # the stream stopped iterating (a full batch): nothing may be lost
    assert isinstance(first, Transaction) and first.commit_lsn == 10
    rest = txs(reader)
    assert [(t.commit_lsn, len(t.changes), t.end_lsn) for t in rest] == [(20, 2, 3), (30, 1, 4)]


def test_max_events_bounds_a_read_and_keeps_the_rest():
    fake = FakeConsumer()
    fake.produce(T, 0, *[env("c", 10 * i, {"id": i}) for i in range(1, 6)])
    fake.assign((T, 0))
    reader = make(fake)
    assert len([e for e in reader.read(0.0, max_events=2)]) == 2
    assert [t.commit_lsn for t in txs(reader)] == [30, 40, 50]


def test_an_idle_partition_commits_the_position_past_transaction_markers():
    fake = FakeConsumer()
    fake.markers = 1  # the commit marker after the last record
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 2
    reader.confirm(1)
    assert fake.committed == {(T, 0): 1}  # a message is still unconfirmed: not past it
    reader.confirm(2)
    assert fake.committed == {(T, 0): 3}  # everything confirmed: the consumer's position
    assert reader._compute_lag() == {(T, 0): 0}


def test_an_async_commit_the_broker_refused_is_committed_again():
    """librdkafka reports an asynchronous commit's failure later, through ``on_commit`` (e.g.
    "Specified group generation id is not valid" during a rebalance): the offset is filed again
    and the next confirmation commits it; one the broker accepted is not repeated."""
    from confluent_kafka import TopicPartition

    fake = FakeConsumer()
    fake.produce(T, 0, env("c", 10, {"id": 1}), env("c", 20, {"id": 2}))
    fake.assign((T, 0))
    reader = make(fake)
    assert len(txs(reader)) == 2
    reader.confirm(2)
    assert fake.committed == {(T, 0): 2}
    fake.committed.clear()  # the broker did not take it
    reader._on_commit(KafkaError(KafkaError.ILLEGAL_GENERATION, "generation"), [TopicPartition(T, 0, 2)])
    n = len(fake.commits)
    reader.confirm(2)
    assert fake.committed == {(T, 0): 2} and len(fake.commits) == n + 1
    reader._on_commit(None, [TopicPartition(T, 0, 2)])  # a success changes nothing
    reader.confirm(2)
    assert len(fake.commits) == n + 1
