"""The daemon's Prometheus metrics (``/metrics``; ARCHITECTURE.md, "Monitoring").

Names and units follow the Prometheus conventions ("Metric and label naming"): the ``pgderive_``
prefix, ``_total`` counters, base units (``_seconds``, ``_bytes``), labels ``sink``, ``view``,
``table``. The registry is the daemon's own (:class:`Metrics`), so two daemons in one test
process do not mix.

Cost: nothing per change. The counters live in :class:`~pgderive.runtime.stats.Stats` as plain
integers the stream and the lanes already keep; :class:`DaemonCollector` turns them into metric
families when Prometheus scrapes (O(sinks × views + tables + histogram buckets)). The two
histograms observed as events happen (batch sizes and flush durations) are observed once per
acknowledged batch. The lag histograms are the run's HdrHistograms
(:class:`~pgderive.runtime.stats.LagHistogram`) exported with fixed buckets at scrape time.
"""
from __future__ import annotations

import platform
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..runtime.observed import PHASES, KafkaFacts, KafkaObserved, Observed
from ..runtime.stats import LagHistogram
from .health import sink_lags

__all__ = ["Metrics", "DaemonCollector", "LAG_BUCKETS"]

#: Upper bounds (seconds) of the lag histograms' buckets: 1 ms … 5 min.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Upper bounds (Ops) of the batch-size histogram's buckets.
BATCH_BUCKETS = (1, 10, 100, 1000, 5000, 20000, 100000)
#: Upper bounds (seconds) of the flush-duration histogram's buckets.
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pgderive")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


class Metrics:
    """The daemon's registry: the standard process and platform collectors (RSS, CPU seconds,
    open file descriptors, Python version), the batch histograms and a :class:`DaemonCollector`.

    Args:
        daemon: what the collector reads at each scrape.

    Attributes:
        registry: what ``/metrics`` renders (``prometheus_client.generate_latest``).
    """

    def __init__(self, daemon: Observed) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.batch_ops = Histogram("pgderive_batch_ops", "Ops per batch acknowledged by a sink", ["sink"],
                                   buckets=BATCH_BUCKETS, registry=self.registry)
        self.flush_seconds = Histogram("pgderive_flush_duration_seconds",
                                       "Time a sink took to apply and acknowledge one batch", ["sink"],
                                       buckets=FLUSH_BUCKETS, registry=self.registry)
        self.registry.register(DaemonCollector(daemon))
        daemon.stats.on_batch = self.observe_batch

    def observe_batch(self, sink: str, ops: int, seconds: float) -> None:
        """One batch acknowledged by ``sink``: ``ops`` Ops in ``seconds`` (called by the lanes)."""
        self.batch_ops.labels(sink).observe(ops)
        self.flush_seconds.labels(sink).observe(seconds)


def _histogram(name: str, doc: str, labels: list[str], series: list[tuple[list[str], LagHistogram]]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    bounds_ms = [b * 1000.0 for b in LAG_BUCKETS]
    for values, h in series:
        counts, samples, sum_ms = h.buckets(bounds_ms)
        buckets = [(_le(b), float(c)) for b, c in zip(LAG_BUCKETS, counts)] + [("+Inf", float(samples))]
        family.add_metric(values, buckets, sum_ms / 1000.0)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


def _kafka_metrics(f: KafkaFacts) -> Iterator[Metric]:
    """A derivation worker's group, assigned partitions and their lag (ARCHITECTURE.md, "Kafka workers")."""
    worker = GaugeMetricFamily("pgderive_kafka_worker_info", "A derivation worker of this consumer group (value 1)",
                               labels=["group"])
    worker.add_metric([f.group], 1.0)
    yield worker
    yield GaugeMetricFamily("pgderive_kafka_assigned_partitions", "Partitions the group assigned to this worker",
                            value=float(len(f.partitions)))
    lag = GaugeMetricFamily("pgderive_kafka_partition_lag_messages",
                            "Offsets between this worker's position and the partition's high watermark",
                            labels=["topic", "partition"])
    for topic, partition, n in f.partitions:
        if n is not None:
            lag.add_metric([topic, str(partition)], float(n))
    yield lag
    yield CounterMetricFamily("pgderive_kafka_rebalances_total", "Partition assignments and revocations seen",
                              value=float(f.rebalances))
    yield CounterMetricFamily("pgderive_kafka_skipped_messages_total",
                              "Messages skipped because they were not change envelopes", value=float(f.skipped))


class DaemonCollector(Collector):
    """Turns the daemon's counters into metric families at each scrape (see the module's
    docstring for the cost). Every series a view or sink has exists from the start with 0, so
    ``rate()`` works from the first scrape."""

    def __init__(self, daemon: Observed) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        stats = d.stats
        sinks_views = {s: list(v) for s, v in d.sinks_views().items()}
        types = d.sink_types()

        info = GaugeMetricFamily("pgderive_build_info", "pgderive's version (value 1)",
                                 labels=["version", "python_version"])
        info.add_metric([_version(), platform.python_version()], 1.0)
        yield info
        phase = GaugeMetricFamily("pgderive_phase", "What the daemon does (1 for the current phase)",
                                  labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if d.phase == p else 0.0)
        yield phase

        yield CounterMetricFamily("pgderive_transactions_total",
                                  "Committed transactions read from the slot (with changes of watched tables or not)",
                                  value=stats.transactions)
        changes = CounterMetricFamily("pgderive_changes_total", "Row changes read from the slot, per source table",
                                      labels=["table"])
        for table, n in sorted(dict(stats.table_changes).items()):
            changes.add_metric([table], n)
        yield changes

        applied = CounterMetricFamily("pgderive_ops_applied_total",
                                      "Ops (upserts and deletes) acknowledged by a sink, per view", labels=["sink", "view"])
        rejected = CounterMetricFamily("pgderive_ops_rejected_total",
                                       "Ops a sink refused for a data reason (each becomes a dead letter)",
                                       labels=["sink", "view"])
        dead = CounterMetricFamily("pgderive_dead_letters_total",
                                   "Rows or documents recorded as dead letters (derivation errors and rejected Ops)",
                                   labels=["sink", "view"])
        retries = CounterMetricFamily("pgderive_sink_retries_total", "Sink calls that failed and were retried",
                                      labels=["sink"])
        errors = CounterMetricFamily("pgderive_sink_errors_total",
                                     "Sink calls that failed (retried or not)", labels=["sink"])
        batches = CounterMetricFamily("pgderive_batches_total", "Batches acknowledged by a sink", labels=["sink"])
        busy = CounterMetricFamily("pgderive_sink_busy_seconds_total", "Time sinks spent applying batches",
                                   labels=["sink"])
        acked = GaugeMetricFamily("pgderive_sink_acknowledged_lsn_bytes",
                                  "The LSN up to which a sink acknowledged everything, as a byte position",
                                  labels=["sink"])
        last_commit = GaugeMetricFamily("pgderive_sink_last_commit_timestamp_seconds",
                                        "Commit timestamp of the newest transaction a sink acknowledged",
                                        labels=["sink"])
        lag_now = GaugeMetricFamily("pgderive_sink_lag_seconds",
                                    "Age of the oldest transaction in flight to a sink (0 when nothing is)",
                                    labels=["sink"])
        up = GaugeMetricFamily("pgderive_sink_info", "A configured sink (value 1)", labels=["sink", "type"])
        lags = sink_lags(d)
        for sink, views in sorted(sinks_views.items()):
            lane = stats.lanes.get(sink)
            up.add_metric([sink, types.get(sink, "?")], 1.0)
            for view in views:
                applied.add_metric([sink, view], lane.view_ops.get(view, 0) if lane else 0)
                rejected.add_metric([sink, view], lane.rejected.get(view, 0) if lane else 0)
                dead.add_metric([sink, view], lane.dead_letters.get(view, 0) if lane else 0)
            retries.add_metric([sink], lane.retries if lane else 0)
            errors.add_metric([sink], lane.errors if lane else 0)
            batches.add_metric([sink], lane.batches if lane else 0)
            busy.add_metric([sink], lane.busy_s if lane else 0.0)
            if lane is not None and lane.acked_lsn:
                acked.add_metric([sink], float(lane.acked_lsn))
            if lane is not None and lane.acked_commit_time is not None:
                last_commit.add_metric([sink], lane.acked_commit_time)
            lag_now.add_metric([sink], lags.get(sink, 0.0))
        yield from (up, applied, rejected, dead, retries, errors, batches, busy, acked, last_commit, lag_now)

        yield _histogram("pgderive_lag_seconds", "Commit → acknowledged by the sink, per transaction that touched it",
                         ["sink"], [([s], lane.lag_ms) for s, lane in sorted(stats.lanes.items())])
        yield _histogram("pgderive_end_to_end_lag_seconds",
                         "Commit → acknowledged by every sink it touched, per transaction", [], [([], stats.lag_ms)])
        yield _histogram("pgderive_read_lag_seconds",
                         "Commit → read and derived by pgderive (before any sink), per transaction", [],
                         [([], stats.read_lag_ms)])
        yield CounterMetricFamily("pgderive_backpressure_seconds_total",
                                  "Time the reading loop waited for a busy sink's lane before reading on",
                                  value=stats.backpressure_s)
        yield CounterMetricFamily("pgderive_provenance_commits_total",
                                  "Commits whose xid and commit timestamp were stored in pgderive.commits",
                                  value=stats.commits_recorded)
        yield CounterMetricFamily("pgderive_provenance_failures_total",
                                  "Failed attempts to store commits in pgderive.commits (retried)",
                                  value=stats.commit_record_failures)
        yield GaugeMetricFamily("pgderive_read_lsn_bytes", "End LSN of the last transaction read, as a byte position",
                                value=float(stats.read_lsn))

        rows = GaugeMetricFamily("pgderive_load_rows", "Snapshot rows loaded so far by a bootstrap or online rebuild",
                                 labels=["view", "kind"])
        total = GaugeMetricFamily("pgderive_load_rows_estimated",
                                  "Planner's estimate of the rows a bootstrap or online rebuild loads",
                                  labels=["view", "kind"])
        for load in d.loads():
            rows.add_metric([load.view, load.kind], float(load.rows))
            if load.rows_total is not None:
                total.add_metric([load.view, load.kind], float(load.rows_total))
        yield rows
        yield total

        if isinstance(d, KafkaObserved):
            yield from _kafka_metrics(d.kafka_facts())
        info_row, why = d.source.get()
        source_up = GaugeMetricFamily("pgderive_source_up",
                                      "1 when the source answered the last slot query (at most one a second)")
        source_up.add_metric([], 0.0 if why is not None else 1.0)
        yield source_up
        if info_row is not None:
            if info_row.lag_bytes is not None:
                yield GaugeMetricFamily("pgderive_source_lag_bytes",
                                        "WAL written since the slot's confirmed position (pg_current_wal_lsn() − "
                                        "confirmed_flush_lsn)", value=float(info_row.lag_bytes))
            if info_row.retained_bytes is not None:
                yield GaugeMetricFamily("pgderive_slot_retained_wal_bytes",
                                        "WAL the server keeps for the slot (pg_current_wal_lsn() − restart_lsn)",
                                        value=float(info_row.retained_bytes))
            yield GaugeMetricFamily("pgderive_slot_active", "1 when the slot has a reader",
                                    value=1.0 if info_row.active else 0.0)
            if info_row.confirmed_flush_lsn is not None:
                yield GaugeMetricFamily("pgderive_slot_confirmed_lsn_bytes",
                                        "The slot's confirmed_flush_lsn, as a byte position",
                                        value=float(info_row.confirmed_flush_lsn))
