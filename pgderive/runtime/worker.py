"""Derivation workers: ``pgderive run`` with ``source.kafka`` (ARCHITECTURE.md, "Kafka workers").

A worker joins a Kafka consumer group and derives its views from the change envelopes of the
partitions it is assigned (:class:`cdc.kafka_source.KafkaReader`), through the same
:class:`~pgderive.runtime.stream.Stream` and lanes as the daemon reading a slot. What differs:

- no slot, no bootstrap: a new group starts at the beginning of the topics, whose snapshot
  (``r``) records load the views; no slot checks, no provenance (``pgderive.commits`` is per
  slot, and the publisher records it).
- no checkpoints: a worker holds only some partitions, so no worker can say "view V is
  complete up to X" (and its positions are not LSNs). Lanes run without views to checkpoint;
  the group's committed offsets are the only progress record.
- TRUNCATEs arrive once per partition: the stream drops older changes of an emptied view and
  the lanes apply them with ``truncate_below`` (records older than the TRUNCATE go, newer
  ones, possibly written by other workers meanwhile, stay).
- a rebalance: before partitions are revoked the stream is drained and the offsets of what the
  sinks acknowledged are committed, so the next owner replays only what was not applied.
- pgderive's state in the source (dead letters, view registry) is kept under
  ``source.slot``, by default ``kafka_<group>`` (:meth:`views.spec.KafkaSourceSpec.state_name`);
  the sinks' bookkeeping is namespaced by the deployment of that name, shared by the group's
  workers (they must share the version entries the compare-and-set reads).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import threading
from typing import Any, Sequence

import orjson
import psycopg

from cdc.envelope import table_topic
from cdc.kafka_source import KafkaReader, consumer_config
from cdc.refetch import RowRefetcher
from cdc.slot import ReplicationError
from sinks.base import Sink, TruncatesBelow
from views.check import build_views
from views.derive import View, view_fingerprint
from views.spec import KafkaSourceSpec, Spec

from ..state.aggregates import AggregateStore
from ..state.deadletters import DeadLetterStore
from ..state.registry import ViewRegistry, entry_of
from ..state.slots import StateStore
from .errors import EngineError, Terminated
from .lane_process import LaneProcessSpec
from .lanes import Lanes
from .observed import KafkaFacts, LoadProgress, SourceWatch
from .preflight import preflight, raise_for
from .recording import DeadLetterRecorder
from .retry import Backoff, one_line
from .sinks import deployment_of, lane_process_specs, open_sinks, prepare_sinks, sink_types, sinks_views
from .stats import Stats
from .stream import Limits, Stream, row_refetcher

__all__ = ["Worker", "worker_topics"]

log = logging.getLogger("pgderive.worker")

#: CPython's GIL switch interval with lanes of several sinks on threads (see the coordinator).
SWITCH_INTERVAL = 0.0005


def worker_topics(kafka: KafkaSourceSpec, views: Sequence[View]) -> list[str]:
    """The topics a worker subscribes to: one per table its views read (roots and included
    tables), ``<topic_prefix>.<schema>.<table>``, sorted."""
    return sorted({table_topic(kafka.topic_prefix, t) for v in views for t in v.tables})


class Worker:
    """The daemon behind ``pgderive run`` when the YAML has ``source.kafka`` (see the module
    docstring). Implements :class:`~pgderive.runtime.observed.Observed` for the HTTP endpoint.

    Args:
        spec: the loaded spec (``spec.source.kafka`` set).
        stop: set it to stop gracefully: what was read is applied, its offsets committed.
        stats_file: a JSON summary of :class:`Stats` is written there every 2 s and at exit.
        batch_ops, batch_bytes, direct_ops: the stream's batch bounds (:class:`Limits`).

    Attributes:
        slot: the name of this group's pgderive state (no replication slot exists).
        phase: ``starting``, ``streaming``, ``reconnecting`` or ``stopping``.
        reader: the Kafka reader while running.
    """

    def __init__(self, spec: Spec, *, stop: threading.Event | None = None, stats_file: str | None = None,
                 batch_ops: int = 20_000, batch_bytes: int = 8 << 20, direct_ops: int = 500) -> None:
        if spec.source.kafka is None:
            raise ValueError("a Worker needs source.kafka")
        self.spec = spec
        self.kafka: KafkaSourceSpec = spec.source.kafka
        self.dsn = spec.source.conninfo()
        self.data_dsn = spec.source.conninfo(statement_timeout=False)
        self.slot = spec.source.slot
        self.stop = stop or threading.Event()
        self.stats_file = stats_file
        self.limits = Limits(batch_ops=batch_ops, batch_bytes=batch_bytes, direct_ops=direct_ops)
        self.stats = Stats()
        self.phase = "starting"
        self.source = SourceWatch(self.dsn, self.slot)
        self.dead_letters = DeadLetterStore(self.dsn, max_bytes=spec.dead_letters.max_bytes)
        self.aggregates = AggregateStore(self.data_dsn)
        self.registry = ViewRegistry(self.dsn)
        self.state = StateStore(self.dsn)
        self.views: list[View] = []
        self.sinks: dict[str, Sink] = {}
        self.deployment: str | None = None
        self.reader: KafkaReader | None = None
        self.refetcher: RowRefetcher | None = None
        self.stream: Stream | None = None
        self.truncated: dict[str, int] = {}  # view -> newest TRUNCATE read (kept by the Stream)
        self._phase: str | None = None
        self._last_stats_write = 0.0

    # -- stopping ----------------------------------------------------------------------------
    def interrupt(self, signal_name: str) -> None:
        """Ask the worker to stop (from the main thread's signal handler): sets :attr:`stop`;
        raises :class:`Terminated` while connecting to the source (nothing to finish)."""
        self.stop.set()
        if self._phase is not None:
            raise Terminated(signal_name, self._phase)

    def request_reload(self) -> None:
        """SIGHUP: not supported by a worker (logged)."""
        log.warning("reload is not supported by a Kafka worker: restart it to apply a new file")

    # -- running -----------------------------------------------------------------------------
    def run(self, *, resnapshot: bool = False) -> None:
        """Check, connect, then stream from the group's partitions until :attr:`stop` is set.

        Raises :class:`EngineError` (``--resnapshot``, a sink that cannot truncate below a
        version), :class:`~views.spec.SpecError` (views that do not match the source),
        :class:`~pgderive.runtime.preflight.PreflightError`, ``psycopg.Error`` and
        :class:`~sinks.base.SinkError`."""
        kafka = self.kafka
        if resnapshot:
            raise EngineError(
                f"--resnapshot: a Kafka worker has no slot. To derive the views again from the topics, stop "
                f"every worker of group {kafka.group} and reset its offsets to the earliest (kafka-consumer-groups "
                f"--group {kafka.group} --reset-offsets --to-earliest --all-topics --execute)")
        source = self.spec.source
        self._phase = "connecting to the source"
        log.info("connecting to the source %s", source.redacted_dsn())
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.views = build_views(self.spec, conn)
        finally:
            self._phase = None
        self.refetcher = row_refetcher(self.data_dsn, self.views)
        self.deployment = deployment_of(self.spec)
        self.sinks = open_sinks(self.spec, self.views, deployment=self.deployment, prepare=False)
        try:
            unable = sorted(n for n, s in self.sinks.items() if not isinstance(s, TruncatesBelow))
            if unable:
                raise EngineError(f"sink(s) {', '.join(unable)} cannot be written by a Kafka worker (no "
                                  "truncate_below)")
            if len(set(self.sinks) - set(self._lane_processes())) > 1:
                sys.setswitchinterval(SWITCH_INTERVAL)
            raise_for(self.spec, preflight(self.spec, self.sinks))
            prepare_sinks(self.sinks, self.views)
            self.state.ensure_schema()
            self.registry.record(self.slot, [entry_of(v, view_fingerprint(v)) for v in self.views])
            topics = worker_topics(kafka, self.views)
            config = consumer_config(kafka.bootstrap_servers, kafka.group, session_timeout=kafka.session_timeout,
                                     options=kafka.options)
            self.reader = KafkaReader(config, topics)
            log.info("joining consumer group %s on %s: topics %s", kafka.group, kafka.bootstrap_servers,
                     ", ".join(topics))
            self._stream(self.reader)
        finally:
            self._write_stats(force=True)
            if self.reader is not None:
                self.reader.on_revoke = None
                self.reader.close()
            self.refetcher.close()
            self.aggregates.close()
            self.dead_letters.close()
            self.source.close()
            for s in self.sinks.values():
                s.close()

    def _stream(self, reader: KafkaReader) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                if not reader.connected:
                    reader.connect()
                reader.start()
                self.phase = "streaming"
                self.stats.alive()
                backoff.reset()
                self._loop(reader)
            except ReplicationError as e:
                if self.stop.is_set():
                    break
                delay = backoff.next()
                log.warning("Kafka consumer failed (%s); joining again in %.1f s", one_line(e), delay)
                self.phase = "reconnecting"
                reader.on_revoke = None
                reader.close()
                self.stop.wait(delay)
        self.phase = "stopping"
        log.info("stopped; offsets committed up to position %d", reader.confirmed_lsn)

    def _loop(self, reader: KafkaReader) -> None:
        """Stream from ``reader`` through one lane per sink until stopped or failed."""
        lanes = Lanes(self.sinks, {name: [] for name in self.sinks}, self.stop, acked_lsn=reader.confirmed_lsn,
                      record=self._recorder(), stats=self.stats, processes=self._lane_processes(),
                      truncate_below=True)
        try:
            stream = Stream(self.views, lanes, stats=self.stats, stop=self.stop, refetcher=self.refetcher,
                            aggregates=self.aggregates, limits=self.limits, on_tick=self._write_stats,
                            open_dead_letters=self.dead_letters.open_rows(self.slot), truncated=self.truncated,
                            worker=True)
            self.stream = stream

            def drain(timeout: float) -> int:
                # A rebalance takes partitions away: apply what was read, so the offsets
                # committed for them cover it and their next owner replays nothing we applied.
                stream.drain(timeout)
                return stream.confirmable
            reader.on_revoke = drain
            stream.run(reader)
        finally:
            reader.on_revoke = None
            self.stream = None
            lanes.close(1.0 if self.stop.is_set() else 5.0)

    def _recorder(self) -> DeadLetterRecorder:
        return DeadLetterRecorder(self.dsn, self.slot, {v.name: v.table for v in self.views},
                                  max_bytes=self.spec.dead_letters.max_bytes, store=self.dead_letters,
                                  sinks={v.name: v.sink for v in self.views})

    def _lane_processes(self) -> dict[str, LaneProcessSpec]:
        """As the slot daemon (:func:`~pgderive.runtime.sinks.process_lanes`), with TRUNCATEs
        that keep newer records (ARCHITECTURE.md, "Kafka workers")."""
        assert self.deployment is not None
        return lane_process_specs(self.spec, self.sinks, self.views, self.deployment, self._recorder(),
                                  truncate_below=True)

    # -- Observed (the HTTP endpoint) ----------------------------------------------------------
    def sinks_views(self) -> dict[str, list[str]]:
        """Sink name → names of the views it serves."""
        return sinks_views(self.spec, self.views)

    def sink_types(self) -> dict[str, str]:
        """Sink name → its type from the YAML."""
        return sink_types(self.spec)

    def loads(self) -> list[LoadProgress]:
        """None: a worker loads nothing from a snapshot (the topics' ``r`` records do it)."""
        return []

    def kafka_facts(self) -> KafkaFacts:
        """:class:`~pgderive.runtime.observed.KafkaFacts` of this worker (any thread, no I/O:
        the reader's lag is computed on the reading thread)."""
        reader = self.reader
        if reader is None:
            return KafkaFacts(self.kafka.group, [], [], 0, 0, 0)
        return KafkaFacts(self.kafka.group, list(reader.topics),
                          [(t, p, n) for (t, p), n in sorted(reader.lag().items())],
                          reader.rebalances, reader.skipped, reader.confirmed_lsn)

    def kafka_status(self) -> dict[str, object]:
        """The worker's Kafka side for ``/status``: ``group``, ``topics``, ``partitions`` (one
        ``{"topic", "partition", "lag"}`` per assigned partition: messages behind the high
        watermark the consumer last saw, None when unknown), ``rebalances``, ``skipped``
        (messages that were not change envelopes) and ``position`` (the reader's confirmed
        position: a counter, not an LSN)."""
        f = self.kafka_facts()
        return {
            "group": f.group,
            "topics": f.topics,
            "partitions": [{"topic": t, "partition": p, "lag": n} for t, p, n in f.partitions],
            "rebalances": f.rebalances,
            "skipped": f.skipped,
            "position": f.position,
        }

    def _write_stats(self, force: bool = False) -> None:
        if not self.stats_file:
            return
        now = time.monotonic()
        if not force and now - self._last_stats_write < 2.0:
            return
        self._last_stats_write = now
        if self.refetcher is not None:
            self.stats.refetched_rows = self.refetcher.lookups
        summary: dict[str, Any] = dict(self.stats.summary())
        summary["kafka"] = self.kafka_status()
        tmp = f"{self.stats_file}.tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.stats_file)
