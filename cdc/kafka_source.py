"""A :class:`~cdc.slot.ChangeReader` over Kafka: derivation workers (ARCHITECTURE.md, "Kafka workers").

A publisher (``sinks: {type: kafka}``) writes each row change of the watched tables as a change
envelope (:mod:`cdc.envelope`) to the topic ``<topic_prefix>.<schema>.<table>``, keyed by the
row's identity. Workers (``source: {kafka: ...}``) join one consumer group and read the
partitions they are assigned with :class:`KafkaReader`, which hands the runtime the same
:class:`~cdc.changes.Transaction` events a slot does:

- ``commit_lsn`` is the envelope's ``source.lsn``: the version of every Op (rule 1), exactly as
  the slot would have given it.
- ``end_lsn`` is a **position of the reader**, not an LSN: a counter, strictly increasing over
  the messages this reader delivered (1, 2, 3, ...; it restarts with the process). The runtime
  only needs positions to be monotonic: it confirms the position every sink acknowledged.
- :meth:`KafkaReader.confirm` turns a confirmed position into offsets: per partition, the offset
  just past the last message whose position is at or below it, committed to the group
  (asynchronously; synchronously when partitions are revoked and at :meth:`close`). So an offset
  is committed only after every sink acknowledged what came before it (rule 3), and a worker
  that dies replays, on the partition's next owner, exactly what it had not confirmed.

Consecutive messages of one partition that carry the same LSN (one source transaction's changes
of one table) are delivered as one Transaction. Messages are read ``read_committed``, so a
transactional publisher's aborted writes are never seen.

A message that is not a change envelope is logged with its topic, partition and offset and
skipped (counted in :attr:`KafkaReader.skipped`); its offset is committed like any other once
the positions around it are confirmed. It is not a dead letter: those are per view, and such a
message names no view's row.

Rebalances: before partitions are given up (revoked), :attr:`KafkaReader.on_revoke` (set by the
runtime) drains what was read and returns the position every sink acknowledged; the reader
commits it synchronously and forgets the revoked partitions' positions. Whatever a drain could
not finish within its timeout is replayed by the partition's next owner: harmless, sinks keep
the newest version (rule 2). Lost partitions (the group moved on without us) are forgotten
without a commit.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol, Sequence, cast

from confluent_kafka import KafkaError, TopicPartition

from .changes import Transaction
from .envelope import Envelope, EnvelopeError, decode
from .slot import Keepalive, ReplicationError

if TYPE_CHECKING:
    from .slot import ChangeReader

__all__ = ["KafkaReader", "KafkaMessage", "KafkaConsumer", "ConsumerFactory", "consumer_config",
           "PartitionState", "GroupStatus", "PartitionLag", "group_status", "probe_brokers"]

log = logging.getLogger("cdc.kafka")

#: Seconds between two computations of :meth:`KafkaReader.lag`.
LAG_EVERY = 1.0

#: Seconds :meth:`KafkaReader.on_revoke` may take to drain before partitions are given up.
REVOKE_DRAIN = 10.0

TP = tuple[str, int]
"""A partition: ``(topic, partition number)``."""


class KafkaMessage(Protocol):
    """What the reader uses of a :class:`confluent_kafka.Message`."""

    def error(self) -> KafkaError | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...


class KafkaConsumer(Protocol):
    """What the reader uses of a :class:`confluent_kafka.Consumer` (and what a test double
    implements: :class:`cdc.testing.FakeConsumer`)."""

    def subscribe(self, topics: list[str], on_assign: Callable[[Any, list[TopicPartition]], None] = ...,
                  on_revoke: Callable[[Any, list[TopicPartition]], None] = ...,
                  on_lost: Callable[[Any, list[TopicPartition]], None] = ...) -> None: ...
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]: ...
    def commit(self, message: Any = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> Any: ...
    def get_watermark_offsets(self, partition: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int] | None: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def close(self) -> None: ...


ConsumerFactory = Callable[[dict[str, Any]], KafkaConsumer]
"""Builds a consumer from its librdkafka configuration (``confluent_kafka.Consumer``)."""


def consumer_config(bootstrap_servers: str, group: str, *, session_timeout: float = 10.0,
                    options: Mapping[str, str | int | float | bool] | None = None) -> dict[str, Any]:
    """The librdkafka configuration of a worker's consumer: the group, manual commits
    (``enable.auto.commit=false``: offsets move only through :meth:`KafkaReader.confirm`),
    ``isolation.level=read_committed``, ``auto.offset.reset=earliest`` (a new group starts at
    the beginning of the topics: the snapshot's ``r`` records bootstrap its views),
    cooperative-sticky assignment (a rebalance moves only the partitions that change owner),
    ``session_timeout`` seconds before a dead worker's partitions move, and topic metadata
    refreshed every 5 s (a topic created after the worker started is picked up), ``client.id``
    ``pgderive-worker-<host>-<pid>`` (how ``pgderive status`` names members), librdkafka's log
    through :mod:`logging` (logger ``cdc.kafka.librdkafka``, served while reading). ``options``
    (librdkafka properties) override any of these."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": int(session_timeout * 1000),
        "heartbeat.interval.ms": max(100, int(session_timeout * 1000) // 4),
        "topic.metadata.refresh.interval.ms": 5000,
        "client.id": f"pgderive-worker-{socket.gethostname()}-{os.getpid()}",
        "logger": logging.getLogger("cdc.kafka.librdkafka"),  # not librdkafka's own stderr lines
        "log.connection.close": False,
    }
    config.update(options or {})
    return config


class PartitionState:
    """The reader's bookkeeping of one assigned partition.

    Attributes:
        pending: ``(position, next offset)`` of delivered messages not confirmed yet, in order.
        committed: the offset last committed (the next message to read after a restart), or
            None when this reader committed none.
        next_offset: the offset just past the last message read (None: none read yet).
    """

    __slots__ = ("pending", "committed", "next_offset")

    def __init__(self) -> None:
        self.pending: deque[tuple[int, int]] = deque()
        self.committed: int | None = None
        self.next_offset: int | None = None


def _tp(p: TopicPartition) -> TP:
    return (p.topic, p.partition)


class KafkaReader:
    """Reads change envelopes from the partitions a consumer group assigns (see the module
    docstring).

    Args:
        config: the consumer's librdkafka configuration (:func:`consumer_config`).
        topics: the topics to subscribe to (one per table the views read).
        consumer_factory: builds the consumer (default :class:`confluent_kafka.Consumer`;
            tests pass :class:`cdc.testing.FakeConsumer`).
        batch_messages: at most this many messages per ``consume`` call.

    Attributes:
        confirmed_lsn: the highest position passed to :meth:`confirm` (a position, not an LSN).
        received_lsn: the highest position delivered.
        on_revoke: called before partitions are revoked with a timeout (seconds); applies what
            was read and returns the position every sink acknowledged (set by the runtime).
            None: the reader commits what was confirmed so far.
        partitions: assigned partition → :class:`PartitionState`.
        skipped: messages that were not change envelopes.
        rebalances: assignments and revocations seen.
    """

    def __init__(self, config: Mapping[str, Any], topics: Sequence[str], *,
                 consumer_factory: ConsumerFactory | None = None, batch_messages: int = 5000) -> None:
        self.config = dict(config)
        self.topics = sorted(set(topics))
        self.consumer_factory = consumer_factory
        self.batch_messages = batch_messages
        self.confirmed_lsn = 0
        self.received_lsn = 0
        self.on_revoke: Callable[[float], int] | None = None
        self.partitions: dict[TP, PartitionState] = {}
        self.skipped = 0
        self.rebalances = 0
        self._consumer: KafkaConsumer | None = None
        self._subscribed = False
        self._position = 0
        self._warned: set[str] = set()
        self._lag: dict[TP, int | None] = {}
        self._owned: tuple[TP, ...] = ()  # sorted partitions: replaced whole, read by other threads
        self._lag_at = 0.0
        self._buffer: deque[Any] = deque()  # messages consumed, not delivered yet
        self._peeked: tuple[Any, Envelope] | None = None  # the first message of the next run

    # --- ChangeReader -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._consumer is not None

    @property
    def at_transaction_boundary(self) -> bool:
        """Always True: every message is delivered whole."""
        return True

    @property
    def group(self) -> str:
        """The consumer group (``group.id``)."""
        return str(self.config.get("group.id", ""))

    def connect(self) -> None:
        """Create the consumer (not yet subscribed). Raises :class:`ReplicationError` when the
        configuration is refused."""
        self.close()
        factory = self.consumer_factory
        if factory is None:
            from confluent_kafka import Consumer, KafkaException
            try:
                self._consumer = cast(KafkaConsumer, Consumer({**self.config, "on_commit": self._on_commit}))
            except KafkaException as e:
                raise ReplicationError(f"cannot create the Kafka consumer: {e}") from e
        else:
            self._consumer = factory(self.config)
        self._subscribed = False

    def start(self, start_lsn: int = 0) -> None:
        """Subscribe to :attr:`topics` (``start_lsn`` is ignored: the group's committed offsets
        say where each partition resumes). Raises :class:`ReplicationError` when not
        connected."""
        consumer = self._require()
        if not self._subscribed:
            consumer.subscribe(list(self.topics), on_assign=self._assigned, on_revoke=self._revoked,
                               on_lost=self._lost)
            self._subscribed = True

    def read(self, max_wait: float = 1.0, max_events: int = 10_000) -> Iterator[Transaction | Keepalive]:
        """Yield one :class:`Transaction` per run of consecutive messages of one partition with
        one LSN, from at most ``max_events`` messages; waits up to ``max_wait`` seconds for the
        first. Nothing read: one :class:`Keepalive` at the current position. Messages the caller
        did not take (it stopped iterating) are kept for the next call. Raises
        :class:`ReplicationError` on a fatal consumer error."""
        consumer = self._require()
        self._refresh_lag()
        if not self._buffer and self._peeked is None:
            self._buffer.extend(consumer.consume(num_messages=max(1, min(max_events, self.batch_messages)),
                                                 timeout=max_wait))
            if not self._buffer:
                yield Keepalive(self._position)
                return
        run: list[Envelope] = []  # envelopes of the current run
        run_key: tuple[TP, int] | None = None
        nbytes = run_end = taken = 0
        while taken < max_events:
            env: Envelope | None
            if self._peeked is not None:
                (msg, env), self._peeked = self._peeked, None
            elif self._buffer:
                msg, env = self._buffer.popleft(), None
            else:
                break
            tp = (msg.topic(), msg.partition())
            if env is None:
                err = msg.error()
                if err is not None:
                    self._error(err)
                    continue
                state = self.partitions.get(tp)
                if state is None:  # a message of a partition no longer ours
                    continue
                try:
                    env = decode(msg.value())
                except EnvelopeError as e:
                    self.skipped += 1
                    log.error("skipping a message of %s [%d] at offset %d that is not a change envelope: %s",
                              tp[0], tp[1], msg.offset(), e)
                    state.next_offset = msg.offset() + 1
                    self._advance(state, msg.offset(), merge=False)
                    continue
            key = (tp, env.lsn)
            if run and key != run_key:
                # The run ends here: hand it over, keeping this message for what comes next
                # (also when the caller stops iterating now).
                self._peeked = (msg, env)
                yield self._transaction(run, nbytes, run_end)
                run, nbytes = [], 0
                continue
            state = self.partitions.get(tp)
            if state is None:
                continue
            offset = msg.offset()
            state.next_offset = offset + 1
            self._advance(state, offset, merge=bool(run))
            run_key, run_end = key, self._position
            run.append(env)
            nbytes += len(msg.value() or b"")
            taken += 1
        if run:
            yield self._transaction(run, nbytes, run_end)

    def confirm(self, lsn: int) -> None:
        """Every message at or below position ``lsn`` is applied by all sinks: commit, per
        partition, the offset just past the last such message (asynchronously)."""
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
        self._commit(self.confirmed_lsn, asynchronous=True)

    def send_status(self, reply: bool = False) -> None:
        """Nothing to report: the consumer sends its own heartbeats."""

    def close(self) -> None:
        """Commit what is confirmed (synchronously), leave the group and close the consumer
        (idempotent). Errors while closing are logged."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            self._commit(self.confirmed_lsn, asynchronous=False, consumer=consumer)
        except Exception as e:
            log.warning("committing offsets at close failed: %s", e)
        try:
            consumer.close()
        except Exception as e:
            log.warning("closing the Kafka consumer failed: %s", e)
        self.partitions.clear()
        self._owned = ()
        self._buffer.clear()
        self._peeked = None
        self._subscribed = False

    # --- monitoring -------------------------------------------------------------------------

    def assignment(self) -> list[TP]:
        """The partitions assigned to this reader, sorted (any thread)."""
        return list(self._owned)

    def lag(self) -> dict[TP, int | None]:
        """Per assigned partition, offsets between the consumer's position (the next message
        it reads, past transaction markers; else the last one read, else the committed
        offset) and the high watermark it last saw; None when unknown. Computed on the
        reading thread at most every :data:`LAG_EVERY` seconds (a consumer call from another
        thread would wait for the reading thread's ``consume``): any thread may call this."""
        lag = self._lag
        return {tp: lag.get(tp) for tp in self._owned}

    def _refresh_lag(self) -> None:
        """Recompute :meth:`lag` (reading thread; local calls only, no broker round trip)."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY:
            return
        self._lag_at = now
        self._lag = self._compute_lag()

    def _compute_lag(self) -> dict[TP, int | None]:
        consumer = self._consumer
        out: dict[TP, int | None] = {}
        for tp, state in list(self.partitions.items()):
            pos = self._consumer_position(tp)
            if pos is None:
                pos = state.next_offset if state.next_offset is not None else state.committed
            marks = None
            if consumer is not None:
                try:
                    marks = consumer.get_watermark_offsets(TopicPartition(tp[0], tp[1]), cached=True)
                except Exception:
                    marks = None
            if marks is None or pos is None or marks[1] < 0:
                out[tp] = None
            else:
                out[tp] = max(0, marks[1] - pos)
        return out

    # --- internals --------------------------------------------------------------------------

    def _require(self) -> KafkaConsumer:
        if self._consumer is None:
            raise ReplicationError("the Kafka consumer is not open")
        return self._consumer

    def _advance(self, state: PartitionState, offset: int, *, merge: bool) -> None:
        """Give the message at ``offset`` the next position. With ``merge`` (the message
        continues the run of the previous one: one Transaction, confirmed only as a whole)
        the partition's last pending entry moves to it instead of a new entry."""
        self._position += 1
        self.received_lsn = self._position
        if merge and state.pending and state.pending[-1][0] == self._position - 1:
            state.pending[-1] = (self._position, offset + 1)
        else:
            state.pending.append((self._position, offset + 1))

    def _transaction(self, run: list[Envelope], nbytes: int, end: int) -> Transaction:
        """The Transaction of a run of envelopes whose last message has position ``end``."""
        first = run[0]
        return Transaction(xid=first.xid or 0, commit_lsn=first.lsn, end_lsn=end,
                           commit_time=first.commit_time, changes=[e.change() for e in run], nbytes=nbytes)

    def _offsets(self, position: int, only: set[TP] | None = None) -> list[TopicPartition]:
        """Pop, per partition, the pending entries at or below ``position``: the offsets to
        commit (partitions in ``only``, or all)."""
        out: list[TopicPartition] = []
        idle = not self._buffer and self._peeked is None
        for tp, state in self.partitions.items():
            if only is not None and tp not in only:
                continue
            offset = None
            while state.pending and state.pending[0][0] <= position:
                offset = state.pending.popleft()[1]
            if idle and not state.pending and state.next_offset is not None:
                # Every message delivered from it is confirmed: commit the consumer's position,
                # which is past the transaction markers after them (else the group's lag would
                # never reach 0 on a transactional topic).
                ahead = self._consumer_position(tp)
                if ahead is not None and ahead > (offset or state.next_offset) and ahead != state.committed:
                    offset = ahead
            if offset is not None and offset != state.committed:
                state.committed = offset
                out.append(TopicPartition(tp[0], tp[1], offset))
        return out

    def _commit(self, position: int, *, asynchronous: bool, only: set[TP] | None = None,
                consumer: KafkaConsumer | None = None) -> None:
        offsets = self._offsets(position, only)
        consumer = consumer or self._consumer
        if not offsets or consumer is None:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except Exception as e:  # e.g. a rebalance under way: the next confirm commits again
            for p in offsets:
                state = self.partitions.get((p.topic, p.partition))
                if state is not None:
                    state.committed = None
                    state.pending.appendleft((position, p.offset))
            if asynchronous:
                log.warning("committing offsets failed (%s); retried with the next confirmation", e)
            else:
                raise

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's report of an offset commit (served by ``consume`` on the reading
        thread). An asynchronous commit that failed (e.g. during a rebalance) is filed again,
        so the next :meth:`confirm` repeats it: otherwise a partition read to its end would
        keep its older committed offset, and its next owner would replay (harmless) and the
        group's lag would never reach 0."""
        for p in partitions:
            if err is None and p.error is None:
                continue
            state = self.partitions.get(_tp(p))
            if state is None or p.offset is None or p.offset < 0:
                continue
            if state.committed == p.offset:
                state.committed = None
            if not state.pending or state.pending[0][1] > p.offset:
                state.pending.appendleft((0, p.offset))
            why = err if err is not None else p.error
            log.warning("committing offset %d of %s [%d] failed (%s); committing it again", p.offset,
                        p.topic, p.partition, why.str() if why is not None else "unknown error")

    def _consumer_position(self, tp: TP) -> int | None:
        """The consumer's position in ``tp`` (the next offset it returns, past transaction
        markers; local, no broker round trip), None when unknown."""
        consumer = self._consumer
        if consumer is None:
            return None
        try:
            (p,) = consumer.position([TopicPartition(tp[0], tp[1])])
        except Exception:
            return None
        return int(p.offset) if p.offset is not None and p.offset >= 0 else None

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalances += 1
        for p in partitions:
            self.partitions.setdefault(_tp(p), PartitionState())
        self._owned = tuple(sorted(self.partitions))
        if partitions:
            log.info("assigned %s", ", ".join(f"{p.topic} [{p.partition}]" for p in partitions))

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalances += 1
        gone = {_tp(p) for p in partitions}
        position = self.confirmed_lsn
        if self.on_revoke is not None:
            try:
                position = max(position, self.on_revoke(REVOKE_DRAIN))
            except Exception as e:  # the next owner replays what was not acknowledged
                log.warning("draining before a rebalance failed: %s", e)
        self.confirmed_lsn = max(self.confirmed_lsn, position)
        try:
            self._commit(self.confirmed_lsn, asynchronous=False, only=gone)
        except Exception as e:
            log.warning("committing offsets of revoked partitions failed (%s); their next owner "
                        "replays from the previous commit", e)
        for tp in gone:
            self.partitions.pop(tp, None)
        self._owned = tuple(sorted(self.partitions))
        if partitions:
            log.info("revoked %s", ", ".join(f"{p.topic} [{p.partition}]" for p in partitions))

    def _lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rebalances += 1
        for p in partitions:
            self.partitions.pop(_tp(p), None)
        self._owned = tuple(sorted(self.partitions))
        if partitions:
            log.warning("lost %s (the group moved on without this worker); their next owner replays "
                        "what was not committed", ", ".join(f"{p.topic} [{p.partition}]" for p in partitions))

    def _error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise ReplicationError(f"Kafka consumer failed: {err.str()}")
        text = err.str()
        if text not in self._warned:  # e.g. a topic that does not exist yet: once per text
            self._warned.add(text)
            log.warning("Kafka consumer: %s", text)


if TYPE_CHECKING:
    def _implements(reader: KafkaReader) -> ChangeReader:
        """Never called: mypy checks here that KafkaReader implements :class:`ChangeReader`."""
        return reader



# --- the group, as `pgderive status` sees it from outside ------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition of a worker group's topics.

    Attributes:
        topic, partition: which.
        owner: the client id and host of the member it is assigned to (``"pgderive-worker@/127.0.0.1"``),
            None when unassigned.
        committed: the group's committed offset (the next message a new owner reads), None
            when it committed none.
        end: the high watermark (read_committed: the last stable offset), None if unknown.
        lag: ``end - committed`` (``end`` with no commit: the group starts at the beginning),
            None if unknown.
    """

    topic: str
    partition: int
    owner: str | None
    committed: int | None
    end: int | None
    lag: int | None


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A consumer group of derivation workers (:func:`group_status`).

    Attributes:
        group: the group id.
        state: the group's state as the broker reports it (``STABLE``, ``EMPTY``, ``PREPARING_REBALANCE``, …).
        members: one ``"client_id@host"`` per member.
        partitions: every partition of the topics, sorted.
        error: why the broker could not be asked (then the rest is empty), else None.
    """

    group: str
    state: str | None
    members: list[str]
    partitions: list[PartitionLag]
    error: str | None = None


def group_status(bootstrap_servers: str, group: str, topics: Sequence[str], *, timeout: float = 5.0,
                 options: Mapping[str, Any] | None = None) -> GroupStatus:
    """Ask the brokers about ``group``: its state and members, and for every partition of
    ``topics`` its owner, committed offset, end offset and lag. Never raises: a broker that
    cannot be asked gives a :class:`GroupStatus` with ``error`` set. ``options``: librdkafka
    properties (e.g. security) as the workers' ``source.kafka.options``."""
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException
    from confluent_kafka.admin import AdminClient

    base: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "log_level": 0, **(options or {})}
    try:
        admin = AdminClient(base)
        meta = admin.list_topics(timeout=timeout)
        parts = [TopicPartition(t, p) for t in sorted(topics) if t in meta.topics
                 for p in sorted(meta.topics[t].partitions)]
        desc = admin.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout)
        owners: dict[TP, str] = {}
        members = []
        for m in desc.members:
            who = f"{m.client_id}@{m.host}"
            members.append(who)
            for p in (m.assignment.topic_partitions if m.assignment else []):
                owners[(p.topic, p.partition)] = who
        committed: dict[TP, int] = {}
        if parts:
            req = [ConsumerGroupTopicPartitions(group, parts)]
            got = admin.list_consumer_group_offsets(req, request_timeout=timeout)[group].result(timeout)
            committed = {(p.topic, p.partition): p.offset for p in got.topic_partitions if p.offset >= 0}
        probe = Consumer({**base, "group.id": f"{group}.status", "isolation.level": "read_committed",
                          "enable.auto.commit": False})
        try:
            ends: dict[TP, int | None] = {}
            for p in parts:
                try:
                    ends[_tp(p)] = probe.get_watermark_offsets(p, timeout=timeout)[1]
                except KafkaException:
                    ends[_tp(p)] = None
        finally:
            probe.close()
    except Exception as e:  # KafkaException, a refused configuration, a timeout: shown, never raised
        return GroupStatus(group, None, [], [], error=_kafka_text(e))
    out = []
    for p in parts:
        tp = _tp(p)
        end, done = ends.get(tp), committed.get(tp)
        lag = None if end is None else max(0, end - (done if done is not None else 0))
        out.append(PartitionLag(tp[0], tp[1], owners.get(tp), done, end, lag))
    state = getattr(desc.state, "name", None) or str(desc.state)
    return GroupStatus(group, state, sorted(members), out)


def probe_brokers(bootstrap_servers: str, *, timeout: float = 5.0,
                  options: Mapping[str, Any] | None = None) -> str | None:
    """Ask the brokers for their metadata: None when they answer within ``timeout`` seconds,
    else why not (one line, no secrets: librdkafka names brokers, not credentials)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0,  # the answer says it
                     **(options or {})}).list_topics(timeout=timeout)
    except (KafkaException, ValueError, TypeError) as e:  # ValueError: a refused configuration
        return _kafka_text(e)
    return None


def _kafka_text(e: BaseException) -> str:
    """One line for a confluent-kafka error: the KafkaError's own text when it carries one."""
    err = e.args[0] if e.args else None
    text = err.str() if isinstance(err, KafkaError) else str(e)
    return text.splitlines()[0] if text else type(e).__name__
