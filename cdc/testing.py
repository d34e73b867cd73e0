"""Test doubles for the source side: :class:`ListReader`, a :class:`~cdc.slot.ChangeReader` fed
from a list of wal2json messages, and builders that write such messages briefly.

A stream is a list of wal2json ``format-version 2`` messages (dicts, JSON ``str``/``bytes``, as
wal2json emits them with the options of :func:`cdc.wal2json.plugin_options`) and
:class:`~cdc.slot.Keepalive` entries; nested lists are flattened, so the builders compose::

    reader = ListReader([
        transaction(1, "0/100", insert("public.t", {"id": 1, "v": "a"})),
        transaction(2, 0x200, update("t", {"id": 1, "v": "b"}), delete("t", {"id": 2})),
        keepalive(0x300),
    ])

The messages go through the real :class:`~cdc.wal2json.Wal2JsonDecoder`, so a test sees the
same :class:`~cdc.changes.Transaction` events (and chunks of large transactions) as from a slot.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, Union

import orjson

from .changes import Transaction
from .lsn import format_lsn, parse_lsn
from .slot import Keepalive, ReplicationError
from .wal2json import Wal2JsonDecoder, loads_message

if TYPE_CHECKING:
    from .slot import ChangeReader

__all__ = ["ListReader", "Message", "Entry", "begin", "commit", "insert", "update", "delete", "truncate",
           "logical_message", "transaction", "keepalive", "FakeConsumer", "FakeMessage"]

Message = Union[dict[str, Any], str, bytes, Keepalive]
"""One stream entry: a wal2json message (dict or JSON text) or a keepalive."""
Entry = Union[Message, Sequence[Message]]
"""A message or a list of them (e.g. :func:`transaction`); lists may nest."""

LSN = Union[int, str]
"""An LSN as an int or in Postgres' ``"16/B374D848"`` form."""

DEFAULT_TIMESTAMP = "2026-01-01 00:00:00+00"


# --- builders -------------------------------------------------------------------------------


def _lsn(value: LSN) -> int:
    return parse_lsn(value) if isinstance(value, str) else value


def _column_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return "text"


def _columns(row: dict[str, Any], types: dict[str, str] | None) -> list[dict[str, Any]]:
    """wal2json's column list: ``{"name", "type", "value"}`` per column. Types not given in
    ``types`` follow the Python value: bool → boolean, int → bigint, float → double precision,
    dict/list → jsonb (sent as JSON text, as wal2json prints jsonb), anything else → text."""
    out = []
    for name, value in row.items():
        t = (types or {}).get(name) or _column_type(value)
        if t == "jsonb" and value is not None and not isinstance(value, str):
            value = orjson.dumps(value).decode()
        out.append({"name": name, "type": t, "value": value})
    return out


def _table(table: str) -> tuple[str, str]:
    schema, sep, name = table.partition(".")
    return (schema, name) if sep else ("public", table)


def begin(xid: int, lsn: LSN, end_lsn: LSN | None = None, *,
          timestamp: str | None = DEFAULT_TIMESTAMP) -> dict[str, Any]:
    """The ``B`` message of transaction ``xid`` committing at ``lsn`` (the commit record: the
    version of its Ops); ``end_lsn`` (wal2json ``nextlsn``, the position to confirm) defaults to
    ``lsn + 1``."""
    commit_lsn = _lsn(lsn)
    end = commit_lsn + 1 if end_lsn is None else _lsn(end_lsn)
    msg: dict[str, Any] = {"action": "B", "xid": xid}
    if timestamp is not None:
        msg["timestamp"] = timestamp
    msg["lsn"] = format_lsn(commit_lsn)
    msg["nextlsn"] = format_lsn(end)
    return msg


def commit(xid: int, lsn: LSN, end_lsn: LSN | None = None, *,
           timestamp: str | None = DEFAULT_TIMESTAMP) -> dict[str, Any]:
    """The ``C`` message closing transaction ``xid`` (same arguments as :func:`begin`)."""
    msg = begin(xid, lsn, end_lsn, timestamp=timestamp)
    msg["action"] = "C"
    return msg


def insert(table: str, row: dict[str, Any], *, types: dict[str, str] | None = None) -> dict[str, Any]:
    """An ``I`` message: ``row`` (column → value) inserted into ``table`` (``"schema.table"``,
    or ``"table"`` in ``public``); ``types`` overrides column types (see :func:`_columns`)."""
    schema, name = _table(table)
    return {"action": "I", "schema": schema, "table": name, "columns": _columns(row, types)}


def update(table: str, row: dict[str, Any], identity: dict[str, Any] | None = None, *,
           types: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``U`` message: the new ``row`` (leave out unchanged TOASTed columns, as wal2json
    does); ``identity`` is the old replica identity, which wal2json sends only when the key
    changed or with REPLICA IDENTITY FULL."""
    schema, name = _table(table)
    msg: dict[str, Any] = {"action": "U", "schema": schema, "table": name, "columns": _columns(row, types)}
    if identity is not None:
        msg["identity"] = _columns(identity, types)
    return msg


def delete(table: str, identity: dict[str, Any], *, types: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``D`` message: the row with replica identity ``identity`` deleted from ``table``."""
    schema, name = _table(table)
    return {"action": "D", "schema": schema, "table": name, "identity": _columns(identity, types)}


def truncate(table: str) -> dict[str, Any]:
    """A ``T`` message: ``table`` truncated."""
    schema, name = _table(table)
    return {"action": "T", "schema": schema, "table": name}


def logical_message(prefix: str, content: str, *, transactional: bool = True) -> dict[str, Any]:
    """An ``M`` message (``pg_logical_emit_message``); the decoder ignores it."""
    return {"action": "M", "transactional": transactional, "prefix": prefix, "content": content}


def transaction(xid: int, lsn: LSN, *changes: dict[str, Any], end_lsn: LSN | None = None,
                timestamp: str | None = DEFAULT_TIMESTAMP) -> list[dict[str, Any]]:
    """``[B, *changes, C]``: one committed transaction (see :func:`begin`)."""
    return [begin(xid, lsn, end_lsn, timestamp=timestamp), *changes,
            commit(xid, lsn, end_lsn, timestamp=timestamp)]


def keepalive(wal_end: LSN) -> Keepalive:
    """A primary keepalive: the source sent everything up to ``wal_end``."""
    return Keepalive(_lsn(wal_end))


# --- the reader -----------------------------------------------------------------------------


def _flatten(entries: Iterable[object]) -> Iterator[Message]:
    for e in entries:
        if isinstance(e, (list, tuple)):
            yield from _flatten(e)
        elif isinstance(e, (dict, str, bytes, Keepalive)):
            yield e
        else:
            raise TypeError(f"not a wal2json message or Keepalive: {e!r}")


class ListReader:
    """A :class:`~cdc.slot.ChangeReader` over a list of wal2json messages and keepalives.

    The list is the source's WAL, in order. :meth:`start` positions the stream after
    ``start_lsn`` (0: after :attr:`confirmed_lsn`) as a slot would: transactions whose commit
    LSN is below it are skipped, so after a failure (:meth:`break_stream`), ``close``,
    ``connect`` and ``start`` the transactions not confirmed are delivered again. Keepalives
    below the position are skipped too.

    Args:
        messages: the stream (see the module docstring); more can be appended with :meth:`feed`.
        chunk_changes, chunk_bytes: the decoder's chunking of large transactions
            (:class:`~cdc.wal2json.Wal2JsonDecoder`).
        wait_when_idle: when :meth:`read` finds no message, wait up to its ``max_wait`` for
            :meth:`feed` (True, as a slot would), or return at once (False).

    Attributes:
        confirmed_lsn: the highest LSN passed to :meth:`confirm` (or set by the caller).
        received_lsn: the highest ``nextlsn``/keepalive position read.
        confirms: every LSN passed to :meth:`confirm`, in order (advancing or not).
        status_updates: ``(confirmed_lsn, reply)`` of every :meth:`send_status` and of every
            :meth:`confirm` that advanced (a slot sends a status update then).
        delivered: every :class:`~cdc.changes.Transaction` and :class:`~cdc.slot.Keepalive`
            :meth:`read` yielded, in order (replays included).
        calls: how often each method was called, by name.

    Thread-safe: :meth:`feed` and :meth:`break_stream` may be called from the test thread
    while another thread reads.
    """

    def __init__(self, messages: Iterable[Entry] = (), *, chunk_changes: int = 5000, chunk_bytes: int = 4 << 20,
                 wait_when_idle: bool = True) -> None:
        self.decoder = Wal2JsonDecoder(chunk_changes=chunk_changes, chunk_bytes=chunk_bytes)
        self.wait_when_idle = wait_when_idle
        self.confirmed_lsn = 0
        self.received_lsn = 0
        self.confirms: list[int] = []
        self.status_updates: list[tuple[int, bool]] = []
        self.delivered: list[Transaction | Keepalive] = []
        self.calls: dict[str, int] = {}
        self._messages: list[Message] = []
        self._pos = 0
        self._skip_below = 0  # commit LSN / keepalive position below which entries are skipped
        self._skipping = False  # inside a transaction being skipped
        self._connected = False
        self._streaming = False
        self._broken: str | None = None
        self._cond = threading.Condition()
        self.feed(*messages)

    # --- test hooks -------------------------------------------------------------------------

    def feed(self, *entries: Entry) -> None:
        """Append messages (or lists of them) to the stream and wake a waiting :meth:`read`."""
        with self._cond:
            self._messages.extend(_flatten(entries))
            self._cond.notify_all()

    def break_stream(self, message: str = "connection lost") -> None:
        """Make the current or next :meth:`read` raise :class:`ReplicationError` (as a lost
        connection does) and end streaming; the runtime then closes, reconnects and starts
        again from its confirmed position."""
        with self._cond:
            self._broken = message
            self._cond.notify_all()

    @property
    def exhausted(self) -> bool:
        """Every message of the list was read."""
        with self._cond:
            return self._pos >= len(self._messages)

    # --- ChangeReader -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def at_transaction_boundary(self) -> bool:
        return not self.decoder.in_transaction and not self._skipping

    def connect(self) -> None:
        """Open the (simulated) connection, forgetting a half-received transaction."""
        self._count("connect")
        self._connected = True
        self._streaming = False
        self.decoder.reset()
        self._skipping = False

    def start(self, start_lsn: int = 0) -> None:
        """Stream from the first entry again, skipping what lies before ``start_lsn`` (0: the
        confirmed position). Raises :class:`ReplicationError` when not connected."""
        self._count("start")
        if not self._connected:
            raise ReplicationError("replication connection is not open")
        with self._cond:
            self._pos = 0
            self._skip_below = start_lsn or self.confirmed_lsn
            self._skipping = False
            self._streaming = True
            self._broken = None
        self.received_lsn = max(self.received_lsn, start_lsn)
        self.confirmed_lsn = max(self.confirmed_lsn, start_lsn)

    def read(self, max_wait: float = 1.0, max_events: int = 10_000) -> Iterator[Transaction | Keepalive]:
        """Yield the events of the next messages (at most ``max_events`` messages); when none
        is left, wait up to ``max_wait`` seconds for :meth:`feed` (see ``wait_when_idle``).
        Raises :class:`ReplicationError` after :meth:`break_stream` or when not started."""
        self._count("read")
        if not self._streaming:
            raise ReplicationError("replication stream is not started")
        deadline = time.monotonic() + max_wait
        got = 0
        while got < max_events:
            with self._cond:
                while True:
                    if self._broken is not None:
                        message, self._broken = self._broken, None
                        self._streaming = False
                        raise ReplicationError(f"replication stream ended: {message}")
                    if self._pos < len(self._messages):
                        entry = self._messages[self._pos]
                        self._pos += 1
                        break
                    remaining = deadline - time.monotonic()
                    if got or not self.wait_when_idle or remaining <= 0:
                        return
                    self._cond.wait(remaining)
            got += 1
            event = self._event(entry)
            if event is not None:
                self.delivered.append(event)
                yield event

    def confirm(self, lsn: int) -> None:
        self._count("confirm")
        self.confirms.append(lsn)
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            self.send_status()

    def send_status(self, reply: bool = False) -> None:
        self._count("send_status")
        if self._streaming:
            self.status_updates.append((self.confirmed_lsn, reply))

    def close(self) -> None:
        self._count("close")
        self._connected = False
        self._streaming = False

    # --- internals --------------------------------------------------------------------------

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    def _event(self, entry: Message) -> Transaction | Keepalive | None:
        """Decode one entry, or skip it when it lies before the start position."""
        if isinstance(entry, Keepalive):
            if entry.wal_end < self._skip_below:
                return None
            self.received_lsn = max(self.received_lsn, entry.wal_end)
            return entry
        if isinstance(entry, dict):
            raw, msg = orjson.dumps(entry), entry
        else:
            raw = entry.encode() if isinstance(entry, str) else entry
            msg = loads_message(raw)
        action = msg.get("action")
        if action == "B":
            self._skipping = "lsn" in msg and parse_lsn(msg["lsn"]) < self._skip_below
        if "nextlsn" in msg and not self._skipping:
            self.received_lsn = max(self.received_lsn, parse_lsn(msg["nextlsn"]))
        if self._skipping:
            if action == "C":
                self._skipping = False
            return None
        return self.decoder.feed(raw)


if TYPE_CHECKING:
    def _implements(reader: ListReader) -> ChangeReader:
        """Never called: mypy checks here that ListReader implements :class:`ChangeReader`."""
        return reader


# --- Kafka ----------------------------------------------------------------------------------


class FakeMessage:
    """A :class:`cdc.kafka_source.KafkaMessage`: one record of a :class:`FakeConsumer`'s log
    (``error`` set: a consumer error event instead of a record)."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None,
                 key: bytes | None = None, error: Any = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key, self._error = value, key, error

    def error(self) -> Any:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key


class FakeConsumer:
    """A :class:`cdc.kafka_source.KafkaConsumer` over in-memory partition logs, for
    :class:`~cdc.kafka_source.KafkaReader` tests: no broker, no threads.

    The test appends records with :meth:`produce` and drives the group with :meth:`assign`,
    :meth:`revoke` and :meth:`lose`, which take effect (calling the reader's callbacks) at the
    next :meth:`consume`, as librdkafka serves rebalance callbacks from ``poll``. An assigned
    partition is read from its committed offset (else 0). ``consume`` returns records of the
    assigned partitions round-robin, one per partition per turn.

    Attributes:
        logs: ``(topic, partition)`` → its records' values (offset = index).
        committed: ``(topic, partition)`` → the committed offset (the group's, shared by every
            FakeConsumer built on the same ``logs``/``committed`` dicts).
        commits: every commit: ``([(topic, partition, offset), ...], asynchronous)``.
        closed: :meth:`close` was called.
        fail_commits: make :meth:`commit` raise (``KafkaException``).
        markers: offsets :meth:`position` adds at the end of a partition (a transactional
            topic's commit marker: the consumer's position skips it).
    """

    def __init__(self, config: dict[str, Any] | None = None, *,
                 logs: dict[tuple[str, int], list[bytes | None]] | None = None,
                 committed: dict[tuple[str, int], int] | None = None) -> None:
        self.config = dict(config or {})
        self.logs = logs if logs is not None else {}
        self.committed = committed if committed is not None else {}
        self.commits: list[tuple[list[tuple[str, int, int]], bool]] = []
        self.topics: list[str] = []
        self.closed = False
        self.fail_commits = False
        self.markers = 0
        self._callbacks: dict[str, Any] = {}
        self._assigned: dict[tuple[str, int], int] = {}  # partition -> next offset to read
        self._events: list[tuple[str, list[tuple[str, int]]]] = []
        self._errors: list[Any] = []

    # --- test hooks ---------------------------------------------------------------------------

    def produce(self, topic: str, partition: int, *values: bytes | None) -> None:
        """Append records to a partition's log."""
        self.logs.setdefault((topic, partition), []).extend(values)

    def assign(self, *partitions: tuple[str, int]) -> None:
        """Assign partitions at the next :meth:`consume` (``on_assign``)."""
        self._events.append(("assign", list(partitions)))

    def revoke(self, *partitions: tuple[str, int]) -> None:
        """Revoke partitions at the next :meth:`consume` (``on_revoke``)."""
        self._events.append(("revoke", list(partitions)))

    def lose(self, *partitions: tuple[str, int]) -> None:
        """Lose partitions at the next :meth:`consume` (``on_lost``)."""
        self._events.append(("lost", list(partitions)))

    def error_event(self, error: Any) -> None:
        """Return ``error`` (a :class:`confluent_kafka.KafkaError`) as an error event from the
        next :meth:`consume`."""
        self._errors.append(error)

    # --- KafkaConsumer ------------------------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None,
                  on_lost: Any = None) -> None:
        self.topics = list(topics)
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        from confluent_kafka import TopicPartition

        events, self._events = self._events, []
        for kind, parts in events:
            callback = self._callbacks.get(kind)
            if kind == "assign":
                for tp in parts:
                    self._assigned[tp] = self.committed.get(tp, 0)
            if callback is not None:
                callback(self, [TopicPartition(t, p) for t, p in parts])
            if kind != "assign":
                for tp in parts:
                    self._assigned.pop(tp, None)
        out: list[Any] = [FakeMessage("", 0, -1, None, error=e) for e in self._errors]
        self._errors = []
        progress = True
        while len(out) < num_messages and progress:
            progress = False
            for tp in sorted(self._assigned):
                log = self.logs.get(tp, [])
                at = self._assigned[tp]
                if at < len(log) and len(out) < num_messages:
                    out.append(FakeMessage(tp[0], tp[1], at, log[at]))
                    self._assigned[tp] = at + 1
                    progress = True
        return out

    def commit(self, message: Any = None, offsets: list[Any] | None = None,
               asynchronous: bool = True) -> None:
        if self.fail_commits:
            from confluent_kafka import KafkaException
            raise KafkaException("commit refused (test)")
        done = [(p.topic, p.partition, p.offset) for p in offsets or []]
        self.commits.append((done, asynchronous))
        for t, p, o in done:
            self.committed[(t, p)] = o

    def get_watermark_offsets(self, partition: Any, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        return 0, len(self.logs.get((partition.topic, partition.partition), [])) + self.markers

    def position(self, partitions: list[Any]) -> list[Any]:
        """The next offset :meth:`consume` returns per partition (-1001, "invalid", when not
        assigned), as librdkafka's ``position``: past what was consumed, plus :attr:`markers`
        at the end of a partition (transaction markers the consumer skips)."""
        from confluent_kafka import TopicPartition

        out = []
        for p in partitions:
            tp = (p.topic, p.partition)
            at = self._assigned.get(tp, -1001)
            if at >= 0 and at >= len(self.logs.get(tp, [])):
                at += self.markers
            out.append(TopicPartition(p.topic, p.partition, at))
        return out

    def close(self) -> None:
        self.closed = True
