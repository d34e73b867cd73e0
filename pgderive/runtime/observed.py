"""What the daemon's HTTP endpoint reads of a running daemon (ARCHITECTURE.md, "Monitoring").

:class:`Observed` is the small interface the endpoint (:mod:`pgderive.http.server`), the
Prometheus collector (:mod:`pgderive.http.metrics`) and the health checks
(:mod:`pgderive.http.health`) need; the daemon's :class:`~pgderive.runtime.coordinator.Engine`
implements it, tests can hand in a stand-in. Nothing here runs per change: everything is read
when a request comes.

:class:`SourceWatch` asks Postgres for the slot's row of ``pg_replication_slots`` and the
current WAL position (:func:`cdc.slot.slot_info`) on a connection of its own, at most once a
second whatever the number of scrapes.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import psycopg

from cdc.slot import SlotInfo, slot_info

from .retry import one_line
from .stats import Stats

__all__ = ["Observed", "KafkaObserved", "KafkaFacts", "LoadProgress", "SourceWatch", "PHASES"]

log = logging.getLogger("pgderive.http")

#: What the daemon is doing (:attr:`Observed.phase`).
PHASES = ("starting", "bootstrapping", "streaming", "reconnecting", "stopping")


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """A snapshot load under way: a view's part of the bootstrap, or an online rebuild.

    Attributes:
        view: the view's name.
        kind: ``bootstrap`` or ``rebuild``.
        phase: ``loading`` for a bootstrap; a rebuild's phase (``requested``, ``loading``,
            ``catching_up``, ``switching``).
        rows: snapshot rows read so far.
        rows_total: the planner's estimate of the table's rows (``pg_class.reltuples``), None
            when the table was never analyzed.
    """

    view: str
    kind: str
    phase: str
    rows: int
    rows_total: int | None


class Observed(Protocol):
    """A running daemon as the HTTP endpoint sees it.

    Attributes:
        stats: the run's counters (:class:`~pgderive.runtime.stats.Stats`).
        slot: the replication slot's name.
        phase: one of :data:`PHASES`.
        source: the slot and WAL position, cached (:class:`SourceWatch`).
    """

    stats: Stats
    slot: str
    phase: str
    source: "SourceWatch"

    def sinks_views(self) -> Mapping[str, Sequence[str]]:
        """Sink name → names of the views it serves (every series exists from the start)."""
        ...

    def sink_types(self) -> Mapping[str, str]:
        """Sink name → its type (``redis``, ``opensearch``, …)."""
        ...

    def loads(self) -> Sequence[LoadProgress]:
        """Snapshot loads under way (bootstrap, online rebuilds)."""
        ...


@dataclass(frozen=True, slots=True)
class KafkaFacts:
    """A derivation worker's Kafka side (ARCHITECTURE.md, "Kafka workers").

    Attributes:
        group: the consumer group.
        topics: the topics it subscribes to.
        partitions: ``(topic, partition, lag)`` per assigned partition; lag in messages behind
            the high watermark the consumer last saw, None when unknown.
        rebalances: assignments and revocations seen.
        skipped: messages that were not change envelopes.
        position: the reader's confirmed position (a counter of messages, not an LSN).
    """

    group: str
    topics: list[str]
    partitions: list[tuple[str, int, int | None]]
    rebalances: int
    skipped: int
    position: int


@runtime_checkable
class KafkaObserved(Protocol):
    """A daemon that is a derivation worker (``source.kafka``): the endpoint adds its
    :class:`KafkaFacts` to ``/metrics`` and ``/status``."""

    def kafka_facts(self) -> KafkaFacts:
        """The worker's group, assigned partitions and their lag (any thread, no I/O)."""
        ...


class SourceWatch:
    """The slot's row and the server's WAL position, asked at most every ``max_age`` seconds.

    Args:
        dsn: libpq connection string of the source (a normal connection, not replication).
        slot: the slot's name.
        max_age: seconds a reading is reused (default 1).
        timeout: seconds to connect and to run the query (default 2): a scrape never hangs on
            a source that does not answer.
    """

    def __init__(self, dsn: str, slot: str, *, max_age: float = 1.0, timeout: float = 2.0) -> None:
        self.dsn, self.slot, self.max_age, self.timeout = dsn, slot, max_age, timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._at = 0.0
        self._info: SlotInfo | None = None
        self._error: str | None = None

    def get(self) -> tuple[SlotInfo | None, str | None]:
        """``(the slot's row, None)``, or ``(None, why)`` when the source could not be asked
        (the reason has no secrets: libpq messages name host and port, not passwords) or
        ``(None, None)`` when the slot does not exist."""
        with self._lock:
            now = time.monotonic()
            if now - self._at < self.max_age:
                return self._info, self._error
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                                                 application_name="pgderive-metrics",
                                                 options=f"-c statement_timeout={int(self.timeout * 1000)}")
                self._info, self._error = slot_info(self._conn, self.slot), None
            except psycopg.Error as e:
                self._info, self._error = None, one_line(e)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self._at = time.monotonic()
            return self._info, self._error

    def close(self) -> None:
        """Close the connection (a later :meth:`get` opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
