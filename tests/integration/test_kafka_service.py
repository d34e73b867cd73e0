"""The local Kafka broker (scripts/services.sh up: one KRaft node on 127.0.0.1:9093) serves
transactions: a read_committed consumer sees a committed transaction's messages and none of an
aborted one's. The daemon's Kafka output relies on exactly that."""
from __future__ import annotations

import socket
import time
import uuid
from typing import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 3
SENTINEL = b"sentinel"


def _reachable(bootstrap: str) -> None:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        pytest.fail(f"Kafka is not reachable at {bootstrap} (run scripts/services.sh up): {e}")


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    _reachable(kafka_bootstrap)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    name = f"pgderive_test_kafka_{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])[name].result(30)
    yield name
    admin.delete_topics([name])[name].result(30)


def _producer(bootstrap: str) -> Producer:
    p = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": f"pgderive-test-{uuid.uuid4().hex}",
        "enable.idempotence": True,
        "acks": "all",
    })
    p.init_transactions(60)  # the first ever also creates __transaction_state
    return p


def _read_all(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    """Every value of ``topic`` up to the sentinel each partition ends with, read under
    ``isolation``. Transaction markers are written after commit_transaction() returns, so the
    read only stops at the sentinels (committed last), not at the first end of a partition."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"pgderive-test-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        values: list[bytes] = []
        ended: set[int] = set()
        deadline = time.monotonic() + 60
        while len(ended) < PARTITIONS:
            assert time.monotonic() < deadline, f"sentinels of {sorted(ended)} only, got {values}"
            msg: Message | None = c.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                continue
            value = msg.value()
            assert value is not None
            if value == SENTINEL:
                ended.add(msg.partition())
            else:
                values.append(value)
        return values
    finally:
        c.close()


def test_read_committed_sees_only_committed_transactions(kafka_bootstrap: str, topic: str) -> None:
    p = _producer(kafka_bootstrap)
    committed = [f"committed-{i}".encode() for i in range(3)]
    p.begin_transaction()
    for i, value in enumerate(committed):
        p.produce(topic, value, partition=i % PARTITIONS)
    p.commit_transaction(30)

    p.begin_transaction()
    p.produce(topic, b"aborted", partition=0)
    p.flush(30)  # the message reaches the log before the abort
    p.abort_transaction(30)

    p.begin_transaction()
    for part in range(PARTITIONS):
        p.produce(topic, SENTINEL, partition=part)
    p.commit_transaction(30)

    assert sorted(_read_all(kafka_bootstrap, topic, "read_committed")) == committed
    # The aborted message was written all the same: only the isolation level hides it.
    assert sorted(_read_all(kafka_bootstrap, topic, "read_uncommitted")) == sorted(committed + [b"aborted"])
