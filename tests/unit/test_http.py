"""The HTTP endpoint's pieces without services: health verdicts, the metrics exposition, the
status page, and the HdrHistogram-backed lag histogram's buckets (a stand-in daemon)."""
from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgderive.http.health import assess
from pgderive.http.metrics import Metrics
from pgderive.http.page import render_page, sparkline
from pgderive.http.server import HttpEndpoint, HttpSettings, parse_listen
from pgderive.runtime.batch import Batch
from pgderive.runtime.observed import LoadProgress
from pgderive.runtime.stats import LagHistogram, Stats


class NoSource:
    def get(self):
        return None, "connection refused"

    def close(self) -> None:
        pass


@dataclass
class FakeDaemon:
    stats: Stats = field(default_factory=Stats)
    slot: str = "s1"
    phase: str = "streaming"
    source: NoSource = field(default_factory=NoSource)
    views: dict[str, list[str]] = field(default_factory=lambda: {"cache": ["a", "b"], "search": ["c"]})
    load: list[LoadProgress] = field(default_factory=list)

    def sinks_views(self):
        return self.views

    def sink_types(self):
        return {"cache": "redis", "search": "opensearch"}

    def loads(self):
        return self.load


def test_a_stalled_loop_is_unhealthy_and_not_ready() -> None:
    d = FakeDaemon()
    assert assess(d, stall_seconds=5, ready_lag_seconds=1).healthy
    d.stats.beat = time.monotonic() - 10
    h = assess(d, stall_seconds=5, ready_lag_seconds=1)
    assert not h.healthy and not h.ready
    assert "reading loop made no progress" in h.problems[0]


def test_a_sink_holding_a_batch_is_named() -> None:
    d = FakeDaemon()
    lane = d.stats.lane("cache")
    b = Batch(end_lsn=10)
    b.commit_times.append(time.time() - 3)
    lane.handed(b)
    h = assess(d, stall_seconds=60, ready_lag_seconds=2)
    assert h.healthy and not h.ready  # 3 s behind: not ready, not yet unhealthy
    assert any("sink cache is 3" in r for r in h.not_ready), h.not_ready
    assert h.sink_lag_seconds["search"] == 0.0
    lane.inflight_since = time.monotonic() - 61
    h = assess(d, stall_seconds=60, ready_lag_seconds=2)
    assert not h.healthy and h.problems == [p for p in h.problems if "sink cache" in p] and h.problems
    d.stats.acknowledged(lane, b, 0.01)
    assert assess(d, stall_seconds=60, ready_lag_seconds=2).ready


def test_not_ready_while_bootstrapping() -> None:
    d = FakeDaemon(phase="bootstrapping")
    h = assess(d, stall_seconds=60, ready_lag_seconds=2)
    assert h.healthy and not h.ready and h.not_ready == ["the daemon is bootstrapping"]


def test_metrics_exposition_has_every_view_series() -> None:
    d = FakeDaemon()
    m = Metrics(d)
    lane = d.stats.lane("cache")
    b = Batch(end_lsn=100)
    from sinks.base import Op
    for i in range(3):
        b.add(Op("a", f"k{i}", 100, {"x": i}))
    b.add(Op("b", "k", 100, {"x": 1}))
    b.commit_times.append(time.time() - 0.02)
    d.stats.acknowledged(lane, b, 0.005, rejected={"b": 1})
    d.stats.table_changes["public.t"] = 7
    text = generate_latest(m.registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    applied = {tuple(sorted(s.labels.items())): s.value for s in fams["pgderive_ops_applied"].samples
               if s.name.endswith("_total")}
    assert applied[(("sink", "cache"), ("view", "a"))] == 3
    assert applied[(("sink", "cache"), ("view", "b"))] == 1
    assert applied[(("sink", "search"), ("view", "c"))] == 0  # exists before any Op
    rejected = [s for s in fams["pgderive_ops_rejected"].samples if s.labels.get("view") == "b" and s.name.endswith("_total")]
    assert rejected[0].value == 1
    lag = [s for s in fams["pgderive_lag_seconds"].samples if s.name.endswith("_count")]
    assert lag[0].value == 1 and lag[0].labels == {"sink": "cache"}
    le = {s.labels["le"]: s.value for s in fams["pgderive_lag_seconds"].samples if s.name.endswith("_bucket")}
    assert le["0.01"] == 0 and le["0.05"] == 1 and le["+Inf"] == 1
    batch_ops = [s for s in fams["pgderive_batch_ops"].samples if s.name.endswith("_sum")]
    assert batch_ops[0].value == 4
    assert "pgderive_source_up 0.0" in text and "pgderive_source_lag_bytes" not in text


def test_lag_histogram_buckets_and_percentiles_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(1 / 20.0) for _ in range(20000)]  # ms
    h = LagHistogram()
    h.add(values)
    ordered = sorted(values)
    for p in (0.5, 0.9, 0.99):
        exact = ordered[int(p * len(ordered)) - 1]
        assert abs(h.percentile(p) - exact) <= 0.01 * exact + 0.001, p
    bounds = [1.0, 5.0, 25.0, 100.0]
    counts, samples, _ = h.buckets(bounds)
    assert samples == len(values)
    for bound, count in zip(bounds, counts):
        exact = sum(1 for v in values if v <= bound)
        near = sum(1 for v in values if 0.99 * bound < v <= 1.01 * bound)
        assert abs(count - exact) <= near, bound
    assert h.sum_ms == pytest.approx(sum(values))


def test_page_escapes_names_and_draws_sparklines() -> None:
    status = {"daemon": {"phase": "streaming", "healthy": True, "ready": False, "not_ready": ["sink <x> is behind"],
                         "slot": {"name": "s1", "lag_bytes": 2048, "retained_wal_bytes": 5 << 20},
                         "sinks": {"cache": {"type": "redis", "lag_seconds": 0.5}},
                         "views": [{"name": "v<script>", "sink": "cache", "lag_seconds": 0.5, "ops": 3,
                                    "dead_letters": 2, "load": None}]}}
    page = render_page(status, [], 5.0)
    assert "v&lt;script&gt;" in page and "<script>" not in page
    assert "sink &lt;x&gt; is behind" in page and "5.0 MB" in page and "2.0 kB" in page
    assert sparkline([1.0]) == "" and sparkline([0.0, 2.0, 1.0]).startswith("<svg")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9187") == ("127.0.0.1", 9187)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9187", "host:", ":80", "h:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_endpoint_serves_and_answers_404_and_503() -> None:
    d = FakeDaemon(phase="bootstrapping")
    ep = HttpEndpoint(d, HttpSettings(port=0), status=lambda: {"views": 1})
    ep.start()
    try:
        with urllib.request.urlopen(ep.url + "/healthz") as r:
            assert r.status == 200 and orjson.loads(r.read())["status"] == "ok"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(ep.url + "/readyz")
        assert e.value.code == 503 and orjson.loads(e.value.read())["status"] == "not ready"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(ep.url + "/nope")
        assert e.value.code == 404
        with urllib.request.urlopen(ep.url + "/status") as r:
            doc = orjson.loads(r.read())
        assert doc["status"] == {"views": 1} and doc["daemon"]["slot"]["source_error"] == "connection refused"
        with urllib.request.urlopen(ep.url + "/") as r:
            assert r.headers["Content-Type"].startswith("text/html") and b"bootstrapping" in r.read()
    finally:
        ep.close()


def test_scrapes_while_lanes_record() -> None:
    # HdrHistogram's iterator refuses a histogram modified under it: the lock must prevent it.
    import threading
    d = FakeDaemon()
    m = Metrics(d)
    lane = d.stats.lane("cache")
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            b = Batch(end_lsn=1)
            b.commit_times.extend([time.time() - 0.01] * 50)
            d.stats.acknowledged(lane, b, 0.001)
    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            text = generate_latest(m.registry).decode()
    finally:
        stop.set()
        t.join()
    fam = {f.name: f for f in text_string_to_metric_families(text)}["pgderive_lag_seconds"]
    inf = [s.value for s in fam.samples if s.labels.get("le") == "+Inf"][0]
    top = [s.value for s in fam.samples if s.labels.get("le") == "300.0"][0]
    assert inf >= top > 0
