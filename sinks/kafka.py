"""The Kafka sink: the change stream published to Apache Kafka (ARCHITECTURE.md, "Kafka").

Each view on this sink is a change log of one table (:mod:`views.changelog`): its Ops carry
:mod:`cdc.envelope` messages, written in stream order to the view's topic, keyed by the row
identity (Kafka's default partitioner keeps a row's changes in one partition, in order).

Exactly once into Kafka, across kill -9 (Kafka "Transactions" design, KIP-98):

* One **transactional producer** per sink and deployment (``transactional.id`` =
  ``pgderive.<deployment>.<sink>``). A batch's messages and the views' **checkpoint records**
  (topic ``<topic_prefix>._checkpoints``, compacted, key ``<deployment>|<view>``, value the
  LSN) are committed in one Kafka transaction (:meth:`KafkaSink.apply_and_advance`, the
  :class:`~sinks.base.AtomicCheckpoint` capability), so the slot is confirmed only after the
  Kafka commit (rule 3), and a reader with ``isolation.level=read_committed`` sees a source
  transaction's changes all at once or not at all.
* A restarted daemon's ``init_transactions`` aborts whatever the killed one left open (and
  fences it, should it still run), then reads the checkpoints back. The slot replays from its
  confirmed LSN, which may lie before the last Kafka commit; a replayed change whose commit LSN
  is below its view's checkpoint was published already and is skipped. TRUNCATE control records
  carry their own checkpoint (``<deployment>|<view>|truncate``), for the same reason.
* The Ops of a large transaction's leading chunks (:meth:`KafkaSink.apply` without a position)
  stay in the open Kafka transaction until the chunk that completes it commits; they are kept
  in memory to be produced again if the Kafka transaction must be aborted and retried.

Snapshot loads (op ``r``) go through a second producer (``…​.load``), one Kafka transaction
per call; an interrupted load is published again from its start (readers are idempotent by
``source.lsn``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar

import orjson
from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

from cdc.envelope import truncate_record
from cdc.lsn import format_lsn

from .base import Op, Rejected, SinkError, ViewTarget

__all__ = ["KafkaSink", "checkpoint_topic"]

log = logging.getLogger("pgderive.sinks.kafka")
T = TypeVar("T")

#: Settings pgderive's guarantees rest on; the YAML cannot override them.
_OWN = {"enable.idempotence": True, "acks": "all", "max.in.flight.requests.per.connection": 5}


#: Fault injection for crash tests (like Postgres' injection points): ``PHASE:SECONDS`` pauses
#: the first publication of this process that carries changes that long, ``before_commit`` (the
#: Kafka transaction holds them, uncommitted) or ``after_commit`` (committed in Kafka, not yet
#: acknowledged to the runtime, so not confirmed to the slot), so a test can ``kill -9`` it
#: there. Never set it in production.
PAUSE_ENV = "PGDERIVE_INJECT_KAFKA_PAUSE"
_paused = threading.Event()


def _injected_pause(phase: str) -> None:
    name, _, secs = os.environ.get(PAUSE_ENV, "").partition(":")
    if name == phase and secs and not _paused.is_set():
        _paused.set()
        log.warning("%s: pausing %s s %s the Kafka transaction", PAUSE_ENV, secs, phase.replace("_", " "))
        time.sleep(float(secs))


def checkpoint_topic(prefix: str) -> str:
    """The checkpoint topic of a sink with ``topic_prefix`` ``prefix``."""
    return f"{prefix}._checkpoints"


def _kafka_error(e: BaseException) -> KafkaError | None:
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        return e.args[0]
    return None


@dataclass(frozen=True, slots=True)
class _Item:
    """One message to publish: a change (``key``, ``value``) or a TRUNCATE control record
    (``truncate``: ``value`` goes to every partition, plus its checkpoint record)."""

    view: str
    version: int
    key: bytes | None
    value: bytes
    truncate: bool = False


@dataclass
class _Fold:
    """A view's topic replayed so far (:meth:`KafkaSink._fold`)."""

    state: dict[str, tuple[dict[str, Any] | None, int]] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    truncated: int = -1  # LSN of the newest TRUNCATE read


class KafkaSink:
    """A Kafka cluster holding one topic per change-log view (see the module docstring).

    Args:
        name: the sink's name in the YAML.
        bootstrap_servers: librdkafka ``bootstrap.servers`` (``host:port,...``).
        deployment: namespaces the transactional id and the checkpoint records
            (:func:`cdc.catalog.deployment_id`); None: the sink's name alone.
        topic_prefix: prefix of default topic names and of the checkpoint topic.
        partitions, replication_factor: of the topics this sink creates.
        transaction_timeout: seconds (``transaction.timeout.ms``; also the commit's timeout).
        max_message_bytes: larger messages are refused as :class:`~sinks.base.Rejected`.
        settings: further librdkafka settings (connection and security only; see
            :class:`views.spec.KafkaSinkSpec`).
        timeout: seconds to wait for metadata and admin calls.
    """

    def __init__(self, name: str, bootstrap_servers: str, *, deployment: str | None = None,
                 topic_prefix: str = "pgderive", partitions: int = 3, replication_factor: int = 1,
                 transaction_timeout: float = 60.0, max_message_bytes: int = 1_000_000,
                 settings: Mapping[str, str | int | float | bool] | None = None, timeout: float = 10.0) -> None:
        self.name = name
        self.servers = bootstrap_servers
        self.deployment = deployment or name
        self.prefix = topic_prefix
        self.partitions, self.replication_factor = partitions, replication_factor
        self.transaction_timeout = transaction_timeout
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        # librdkafka's own log lines go to Python logging (not its stderr lines).
        self._settings: dict[str, Any] = {"bootstrap.servers": bootstrap_servers,
                                          "logger": logging.getLogger("pgderive.sinks.kafka.librdkafka"),
                                          "log.connection.close": False, **(settings or {})}
        self.checkpoints_topic = checkpoint_topic(topic_prefix)
        self.topics: dict[str, str] = {}  # view -> topic
        self.tables: dict[str, str] = {}  # view -> "schema.table"
        self._partitions: dict[str, int] = {}  # topic -> partition count
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._loader: Producer | None = None
        self._load_lock = threading.Lock()
        self._open = False  # a Kafka transaction of the stream producer is open
        self._inflight: list[_Item] = []  # messages in the open Kafka transaction, from earlier calls
        self._ckpt: dict[str, int] | None = None  # view -> checkpoint LSN (None: not read yet)
        self._ckpt_read = 0.0  # time.monotonic() of the last read of the checkpoint topic
        self._trunc: dict[str, int] = {}  # view -> LSN of the last TRUNCATE published
        self._folds: dict[str, _Fold] = {}  # view -> its topic replayed so far (verify, tests)
        self.skipped = 0  # replayed Ops skipped as already published (below their checkpoint)

    # -- plumbing ---------------------------------------------------------------------------------
    def _fail(self, what: str, e: BaseException) -> SinkError:
        err = _kafka_error(e)
        text = err.str() if err is not None else str(e)
        fatal = err is not None and (err.fatal() or err.code() in (KafkaError._FENCED,
                                                                    KafkaError.PRODUCER_FENCED))
        if fatal:
            self._producer = None  # unusable: a new one is made (and fenced again if another runs)
            self._open = False
            return SinkError(f"sink {self.name}: {what}: {text}: another pgderive of the same deployment"
                             " writes this Kafka sink (its transactional id fenced this one)",
                             retryable=False)
        auth = err is not None and err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                                                  KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                                  KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                                                  KafkaError.CLUSTER_AUTHORIZATION_FAILED)
        return SinkError(f"sink {self.name}: {what}: {text}", retryable=not auth)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (KafkaException, BufferError) as e:
            raise self._fail(what, e) from None

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(dict(self._settings))
        return self._admin

    def _new_producer(self, suffix: str) -> Producer:
        self._ensure_topic(self.checkpoints_topic, compact=True)
        for topic in self.topics.values():
            self._ensure_topic(topic)
        conf = {**self._settings, "linger.ms": self._settings.get("linger.ms", 5),
                "transactional.id": f"pgderive.{self.deployment}.{self.name}{suffix}",
                "transaction.timeout.ms": int(self.transaction_timeout * 1000),
                "message.max.bytes": max(int(self._settings.get("message.max.bytes", 0) or 0),
                                         self.max_message_bytes + 4096),
                "queue.buffering.max.messages": 500_000, **_OWN}
        p = Producer(conf)
        try:
            p.init_transactions(self.timeout + self.transaction_timeout)
        except KafkaException as e:
            raise self._fail("init_transactions", e) from None
        return p

    def _stream_producer(self) -> Producer:
        """The stream's transactional producer, made on first use: its ``init_transactions``
        aborts what a killed predecessor left open (and fences it), so the checkpoints are read
        again afterwards. Only writers call this: a reader (``status``, ``verify``) that made
        one would fence the running daemon."""
        if self._producer is None:
            self._producer = self._new_producer("")
            self._open = False
            self._ckpt = None
        return self._producer

    def _consumer(self) -> Consumer:
        return Consumer({**self._settings, "group.id": f"pgderive-reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True, "auto.offset.reset": "earliest",
                         "fetch.wait.max.ms": 10})

    def _ensure_topic(self, topic: str, *, compact: bool = False, create: bool = True) -> int:
        """Create ``topic`` unless it exists (only with ``create``); returns its partition
        count, 0 for a missing topic not created."""
        if topic in self._partitions:
            return self._partitions[topic]
        admin = self._admin_client()
        # All topics: a metadata request naming a missing topic would make a broker with
        # auto.create.topics.enable create it with its defaults.
        meta = self._call("list topics", lambda: admin.list_topics(timeout=self.timeout))
        found = meta.topics.get(topic)
        if (found is None or found.error is not None) and not create:
            return 0
        if found is None or found.error is not None:
            config = {"cleanup.policy": "compact", "segment.ms": "60000",
                      "min.cleanable.dirty.ratio": "0.1"} if compact else {}
            parts = 1 if compact else self.partitions
            futures = admin.create_topics([NewTopic(topic, parts, self.replication_factor, config=config)],
                                          operation_timeout=self.timeout)
            try:
                futures[topic].result(self.timeout)
            except KafkaException as e:
                err = _kafka_error(e)
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise self._fail(f"create topic {topic}", e) from None
            meta = self._call("list topics", lambda: admin.list_topics(timeout=self.timeout))
            found = meta.topics.get(topic)
        if found is None or not found.partitions:
            raise SinkError(f"sink {self.name}: topic {topic} has no partitions after creating it")
        self._partitions[topic] = len(found.partitions)
        return self._partitions[topic]

    # -- Sink -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Make sure the cluster answers (metadata request); creates nothing. Raises
        :class:`SinkError` (``retryable=False`` for refused credentials)."""
        admin = self._admin_client()
        try:
            admin.list_topics(timeout=self.timeout)
        except KafkaException as e:
            err = self._fail(f"cannot reach Kafka at {self.servers}", e)
            raise err from None

    def register(self, target: ViewTarget) -> None:
        """Declare a change-log view; asks Kafka nothing (its topic is created, if missing, when
        the sink first writes). Raises :class:`SinkError` (non-retryable for a view without a
        topic, or one that names the checkpoint topic)."""
        if target.topic is None or target.table is None:
            raise SinkError(f"sink {self.name}: view {target.view} has no topic: only change-log"
                            " views (no key, format or index) go to a Kafka sink", retryable=False)
        if target.topic == self.checkpoints_topic:
            raise SinkError(f"sink {self.name}: view {target.view}: topic {target.topic} is pgderive's"
                            " checkpoint topic", retryable=False)
        self.topics[target.view] = target.topic
        self.tables[target.view] = target.table

    def _topic(self, view: str) -> str:
        try:
            return self.topics[view]
        except KeyError:
            raise SinkError(f"sink {self.name}: view {view} is not registered", retryable=False) from None

    # -- checkpoints ------------------------------------------------------------------------------
    def _ckpt_key(self, view: str, suffix: str = "") -> bytes:
        return f"{self.deployment}|{view}{suffix}".encode()

    def _read_checkpoints(self) -> dict[str, int]:
        """Fold the checkpoint topic (read committed) into view → LSN; also fills the TRUNCATE
        checkpoints. A missing topic holds none (it is not created here)."""
        prefix = f"{self.deployment}|".encode()
        found: dict[str, int] = {}
        trunc: dict[str, int] = {}
        for msg in self._read_all(self.checkpoints_topic):
            key = msg.key()
            if not key or not key.startswith(prefix):
                continue
            name = key[len(prefix):].decode()
            value = msg.value()
            target, view = (trunc, name[:-len("|truncate")]) if name.endswith("|truncate") else (found, name)
            if value is None:
                target.pop(view, None)
            else:
                target[view] = int(orjson.loads(value)["lsn"])
        self._trunc = trunc
        return found

    def _checkpoints(self, *, write: bool = True) -> dict[str, int]:
        """view → checkpoint LSN. A writer (``write``) makes its producer first, which aborts
        what a killed predecessor left open: a ``read_committed`` read stops at an open
        transaction, so checkpoints committed after it are read only then."""
        if write:
            self._stream_producer()
        if self._ckpt is None:
            self._ckpt_read = time.monotonic()
            self._ckpt = self._read_checkpoints()
        return self._ckpt

    def _read_all(self, topic: str, start: dict[int, int] | None = None) -> Iterator[Message]:
        """Every committed message of ``topic`` up to its end when called, in order within each
        partition, from offset ``start[p]`` of partition ``p`` (default: the beginning)."""
        n = self._ensure_topic(topic, compact=topic == self.checkpoints_topic, create=False)
        if not n:
            return
        consumer = self._consumer()
        try:
            consumer.assign([TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING)) for p in range(n)])
            left = set(range(n))
            while left:
                msg = consumer.poll(self.timeout)
                if msg is None:
                    raise SinkError(f"sink {self.name}: reading topic {topic} timed out after {self.timeout:g} s")
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(msg.partition() or 0)
                        continue
                    raise SinkError(f"sink {self.name}: reading topic {topic}: {err.str()}")
                yield msg
        finally:
            consumer.close()

    def write_checkpoint(self, views: Sequence[str], lsn: int) -> None:
        """Record that ``views`` are complete up to ``lsn`` (int LSN), with whatever the open
        transaction holds, in one Kafka transaction. Forward only. Raises :class:`SinkError`."""
        self._publish([], [v for v in views if self._checkpoints().get(v, -1) < lsn], lsn)

    def advance_checkpoint(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        """Move the checkpoints of ``views`` from at least ``previous`` to ``lsn``; returns the
        views whose checkpoint was missing or behind ``previous`` (left untouched)."""
        ckpt = self._checkpoints()
        lost = [v for v in views if ckpt.get(v, -1) < previous]
        self._publish([], [v for v in views if v not in lost and ckpt.get(v, -1) < lsn], lsn)
        return lost

    def read_checkpoint(self, view: str) -> int | None:
        """The checkpoint LSN of ``view`` as committed in Kafka, or None. Read from Kafka again
        unless read within the last second or written by this instance since (its
        transactional id fences any other writer)."""
        if time.monotonic() - self._ckpt_read > 1.0 and self._producer is None:
            self._ckpt = None
        return self._checkpoints(write=False).get(view)

    def apply_and_advance(self, ops: Sequence[Op], views: Sequence[str], previous: int,
                          lsn: int) -> tuple[list[Rejected], list[str]]:
        """Publish ``ops`` and move the checkpoints of ``views`` to ``lsn`` in one Kafka
        transaction (see :class:`~sinks.base.AtomicCheckpoint`)."""
        ckpt = self._checkpoints()
        lost = [v for v in views if ckpt.get(v, -1) < previous]
        rejected = self._publish(ops, [v for v in views if v not in lost and ckpt.get(v, -1) < lsn], lsn)
        return rejected, lost

    def apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """Produce ``ops`` into the open Kafka transaction (begun if none is), committed by the
        next call that moves a position (a large transaction's leading chunks)."""
        return self._publish(ops, [], 0, commit=False)

    # -- publishing -------------------------------------------------------------------------------
    def _produce(self, producer: Producer, topic: str, key: bytes | None, value: bytes,
                 partition: int | None = None) -> None:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value, key)
                else:
                    producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                producer.poll(0.05)  # the local queue is full: let deliveries drain it

    def _accept(self, ops: Sequence[Op], truncates: Sequence[tuple[str, int]],
                rejected: list[Rejected]) -> list[_Item]:
        """The messages of ``ops`` and ``truncates`` that are not published yet, in stream order
        (TRUNCATEs after the Ops, as the runtime applies them); refused Ops go to ``rejected``."""
        ckpt, trunc = self._ckpt or {}, self._trunc
        out: list[_Item] = []
        dumps = orjson.dumps
        for op in ops:
            if op.version < ckpt.get(op.view, -1):
                if not self.skipped:
                    log.info("sink %s: view %s: skipping the replayed changes below checkpoint %s,"
                             " published before the restart", self.name, op.view,
                             format_lsn(ckpt[op.view]), extra={"sink": self.name, "view": op.view})
                self.skipped += 1
                continue
            if op.view not in self.topics:
                raise SinkError(f"sink {self.name}: view {op.view} is not registered", retryable=False)
            try:
                value = dumps(op.doc)
            except TypeError as e:
                rejected.append(Rejected(op, f"not JSON-encodable: {e}"))
                continue
            if len(value) > self.max_message_bytes:
                rejected.append(Rejected(op, f"message of {len(value)} bytes exceeds max_message_bytes"
                                             f" ({self.max_message_bytes})"))
                continue
            out.append(_Item(op.view, op.version, op.key.partition("\x00")[0].encode(), value))
        for view, version in truncates:
            if version > trunc.get(view, -1):
                record = truncate_record(view=view, table=self.tables[view], lsn=version)
                out.append(_Item(view, version, None, record, truncate=True))
        return out

    def _produce_items(self, producer: Producer, items: Sequence[_Item]) -> None:
        topics = self.topics
        for it in items:
            topic = topics[it.view]
            if not it.truncate:
                self._produce(producer, topic, it.key, it.value)
                continue
            for p in range(self._ensure_topic(topic)):
                self._produce(producer, topic, None, it.value, partition=p)
            self._produce(producer, self.checkpoints_topic, self._ckpt_key(it.view, "|truncate"),
                          orjson.dumps({"lsn": it.version}))

    def _publish(self, ops: Sequence[Op], views: Sequence[str], lsn: int, *, commit: bool = True,
                 truncates: Sequence[tuple[str, int]] = ()) -> list[Rejected]:
        """Produce ``ops`` and the TRUNCATE control records of ``truncates`` into the stream
        producer's open Kafka transaction; with ``commit``, commit every message of a
        transaction below ``lsn`` (int LSN: a batch's position) together with checkpoint
        records of ``views`` at ``lsn``, and carry the messages at or past ``lsn`` (a
        transaction not complete yet) into the next Kafka transaction. On a failure the Kafka
        transaction is aborted and this call's messages forgotten (a retry repeats the call);
        earlier calls' messages stay, to be produced again."""
        self._checkpoints()
        base = self._inflight
        rejected: list[Rejected] = []
        fresh = self._accept(ops, truncates, rejected)
        if not fresh and not views and not (commit and base):
            return rejected
        producer = self._stream_producer()
        pending = base + fresh
        cut = len(pending) if not commit else next((i for i, it in enumerate(pending) if it.version >= lsn),
                                                   len(pending))
        try:
            if cut < len(base):
                # A message of the open Kafka transaction belongs to a source transaction that
                # does not end by lsn: start the Kafka transaction over with what does.
                self._abort(producer)
            if not self._open:
                producer.begin_transaction()
                self._open = True
                self._produce_items(producer, pending[:cut] if commit else base)
                if not commit:
                    self._produce_items(producer, fresh)
            else:
                self._produce_items(producer, fresh[:max(0, cut - len(base))] if commit else fresh)
            if not commit:
                self._inflight = pending
                return rejected
            for view in views:
                self._produce(producer, self.checkpoints_topic, self._ckpt_key(view), orjson.dumps({"lsn": lsn}))
            if cut:
                _injected_pause("before_commit")
            producer.commit_transaction(self.transaction_timeout)
            self._open = False
            if cut:
                _injected_pause("after_commit")
        except (KafkaException, BufferError) as e:
            self._abort(producer)
            self._inflight = base
            raise self._fail("publish", e) from None
        self._inflight = []
        ckpt = self._ckpt if self._ckpt is not None else {}
        for view in views:
            ckpt[view] = max(ckpt.get(view, -1), lsn)
        for it in pending[:cut]:
            if it.truncate:
                self._trunc[it.view] = max(self._trunc.get(it.view, -1), it.version)
        later = pending[cut:]
        if later:
            self._publish_later(producer, later)
        return rejected

    def _publish_later(self, producer: Producer, items: list[_Item]) -> None:
        """Open the next Kafka transaction with the messages of a source transaction not
        complete yet. A failure leaves them to be produced again by the next call."""
        self._inflight = items
        try:
            producer.begin_transaction()
            self._open = True
            self._produce_items(producer, items)
        except (KafkaException, BufferError) as e:
            self._abort(producer)
            raise self._fail("publish", e) from None

    def _abort(self, producer: Producer) -> None:
        if not self._open:
            return
        self._open = False
        try:
            producer.abort_transaction(self.transaction_timeout)
        except KafkaException as e:
            log.warning("sink %s: aborting the Kafka transaction failed: %s; making a new producer",
                        self.name, e, extra={"sink": self.name})
            self._producer = None

    def truncate(self, view: str, version: int) -> None:
        """Produce a TRUNCATE control record at ``version`` into every partition of the view's
        topic, in the open Kafka transaction: committed with its source transaction, by the
        next call that moves a position (a replayed TRUNCATE at or below the last one
        committed is skipped)."""
        self._topic(view)
        self._publish([], [], 0, commit=False, truncates=[(view, version)])

    # -- generations (snapshot loads) ---------------------------------------------------------------
    def begin_generation(self, view: str, version: int) -> str:
        """A load of ``view`` at ``version``: the ``r`` messages go to the view's topic
        itself (a change log has one generation). Returns ``g<version as 16 hex digits>``."""
        self._topic(view)
        return f"g{version:016x}"

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> list[Rejected]:
        """Publish snapshot Ops (``r`` messages) in one Kafka transaction of the load
        producer. Raises :class:`SinkError`."""
        rejected: list[Rejected] = []
        with self._load_lock:
            if self._loader is None:
                self._loader = self._new_producer(".load")
            producer = self._loader
            try:
                producer.begin_transaction()
                saved, self._ckpt = self._ckpt, {}  # a load never skips (its version may be below a checkpoint)
                try:
                    items = self._accept(ops, (), rejected)
                finally:
                    self._ckpt = saved
                self._produce_items(producer, items)
                producer.commit_transaction(self.transaction_timeout)
            except (KafkaException, BufferError) as e:
                try:
                    producer.abort_transaction(self.transaction_timeout)
                except KafkaException:
                    self._loader = None
                raise self._fail(f"load of {view}", e) from None
        return rejected

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Nothing to switch: the snapshot's messages are in the topic already."""

    # -- reading back (verify, tests) ---------------------------------------------------------------
    def _fold(self, view: str) -> dict[str, tuple[dict[str, Any] | None, int]]:
        """Message key → (the row after its last change, or None once deleted; the change's
        LSN), replaying the view's topic in order per partition. A TRUNCATE control record at
        LSN ``t`` empties what is older, and a change older than ``t`` read later (from another
        partition) is stale. Kept between calls: each reads only what was added since."""
        fold = self._folds.setdefault(view, _Fold())
        state = fold.state
        for msg in self._read_all(self._topic(view), fold.offsets):
            fold.offsets[msg.partition() or 0] = (msg.offset() or 0) + 1
            doc = orjson.loads(msg.value() or b"null")
            if not isinstance(doc, dict):
                continue
            lsn = int(doc["source"]["lsn"])
            if doc["op"] == "t":
                if lsn > fold.truncated:
                    fold.truncated = lsn
                    for k, (_, v) in list(state.items()):
                        if v < lsn:
                            state[k] = (None, lsn)
                continue
            if lsn < fold.truncated:
                continue
            key = (msg.key() or b"").decode()
            prev = state.get(key)
            if prev is not None and prev[1] > lsn:
                continue
            after = doc.get("after")
            if doc.get("partial") and prev is not None and prev[0] is not None and after is not None:
                after = {**prev[0], **after}
            state[key] = (after if doc["op"] != "d" else None, lsn)
        return state

    def scan(self, view: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(message key, row)`` of every row the topic holds now (its last change not a
        delete). Reads the whole topic."""
        for key, (row, _) in self._fold(view).items():
            if row is not None:
                yield key, row

    def scan_keys(self, view: str) -> Iterator[tuple[str, int | None]]:
        """Yield ``(message key, LSN)`` of every row the topic holds now."""
        for key, (row, lsn) in self._fold(view).items():
            if row is not None:
                yield key, lsn

    def get(self, view: str, keys: Sequence[str], *,
            realtime: bool = True) -> dict[str, tuple[dict[str, Any] | None, int | None]]:
        """``key → (row, LSN)`` for ``keys`` (message keys; a change-log Op's key with its
        suffix is taken as its message key). Reads the whole topic."""
        state = self._fold(view)
        out: dict[str, tuple[dict[str, Any] | None, int | None]] = {}
        for k in keys:
            row, lsn = state.get(k.partition("\x00")[0], (None, None))
            out[k] = (row, lsn)
        return out

    def count(self, view: str) -> int:
        """Rows the topic holds now (reads the whole topic)."""
        return sum(1 for _ in self.scan(view))

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """A change-log record is its ``after`` row."""
        after = doc.get("after") if "source" in doc else doc
        return dict(after or {})

    def drop_view(self, view: str) -> None:
        """Delete the view's topic and its checkpoint records (a re-snapshot publishes anew)."""
        topic = self._topic(view)
        admin = self._admin_client()
        futures = admin.delete_topics([topic], operation_timeout=self.timeout)
        try:
            futures[topic].result(self.timeout)
        except KafkaException as e:
            err = _kafka_error(e)
            if err is None or err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise self._fail(f"delete topic {topic}", e) from None
        self._partitions.pop(topic, None)
        self._folds.pop(view, None)
        producer = self._stream_producer()
        try:
            producer.begin_transaction()
            for suffix in ("", "|truncate"):
                producer.produce(self.checkpoints_topic, None, self._ckpt_key(view, suffix))
            producer.commit_transaction(self.transaction_timeout)
        except KafkaException as e:
            self._open = True
            self._abort(producer)
            raise self._fail(f"drop of {view}", e) from None
        if self._ckpt is not None:
            self._ckpt.pop(view, None)
        self._trunc.pop(view, None)
        self._ensure_topic(topic)

    def reserved_names(self) -> frozenset[str]:
        """The checkpoint topic, which no view may publish to."""
        return frozenset({self.checkpoints_topic})

    def close(self) -> None:
        """Abort an open Kafka transaction (its changes were never confirmed: they replay) and
        release the producers."""
        if self._producer is not None:
            self._abort(self._producer)
            self._producer.flush(1.0)
        if self._loader is not None:
            self._loader.flush(1.0)
        self._producer = self._loader = None
        self._admin = None




if TYPE_CHECKING:
    from .base import AtomicCheckpoint, ReservedNames, Sink

    def _implements(sink: KafkaSink) -> tuple[Sink, AtomicCheckpoint, ReservedNames]:
        """Never called: mypy checks here that KafkaSink implements these protocols."""
        return sink, sink, sink
