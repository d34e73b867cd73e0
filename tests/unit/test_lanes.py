"""Lanes: the saturation warning and the lag histogram (pure logic; the lane rules themselves are
in test_stream.py, with the shipped test doubles)."""
from __future__ import annotations

import logging

from pgderive.runtime.lanes import SaturationMonitor


def test_saturation_is_logged_once_per_interval_naming_the_slowest_sink(caplog):
    m = SaturationMonitor(window=10, threshold=0.9, every=60)
    with caplog.at_level(logging.WARNING, logger="pgderive.lanes"):
        t = 0.0
        for _ in range(30):  # 2 s batches back to back with 0.05 s gaps: ~97% busy
            m.record(t, t + 2.0, 1000, {"cache": 1.9, "search": 0.4})
            t += 2.05
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # 61 s of saturation, one warning per 60 s
    assert warnings[0].startswith("sink cache is the bottleneck")


def test_a_mostly_idle_lane_is_not_reported(caplog):
    m = SaturationMonitor(window=10, threshold=0.9, every=60)
    with caplog.at_level(logging.WARNING, logger="pgderive.lanes"):
        t = 0.0
        for _ in range(30):  # 1 s batches every 2 s: 50% busy
            m.record(t, t + 1.0, 1000, {"cache": 1.0})
            t += 2.0
    assert not caplog.records


def test_lag_histogram_percentiles_within_one_percent():
    import random

    from pgderive.runtime.stats import LagHistogram

    rng = random.Random(7)
    values = [rng.lognormvariate(2, 1.5) for _ in range(50_000)] + [0.0, 0.001]
    h = LagHistogram()
    h.add(values)
    values.sort()
    for p in (0.5, 0.9, 0.99, 0.999):
        exact = values[min(len(values) - 1, int(p * len(values)))]
        assert abs(h.percentile(p) / exact - 1) < 0.012, (p, h.percentile(p), exact)
    assert h.samples == len(values) and h.max_ms == values[-1]
    assert LagHistogram().percentile(0.5) is None


def test_lag_histogram_percentiles_never_exceed_the_max():
    from pgderive.runtime.stats import LagHistogram

    # issue 14 item 12: a bucket midpoint above the largest sample made p99 > max
    for sample in (10.0, 0.5, 123.456, 0.01):
        h = LagHistogram()
        h.add_one(sample)
        assert h.percentile(0.99) <= h.max_ms == sample
        assert abs(h.percentile(0.99) / sample - 1) < 0.01
    h = LagHistogram()
    h.add([1.0] * 98 + [50.0, 50.0])
    assert h.percentile(0.99) <= h.max_ms == 50.0
    assert abs(h.percentile(0.5) - 1.0) < 0.01
