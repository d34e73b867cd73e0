"""Lanes in a process of their own (pgderive/runtime/lane_process.py), with the shipped
MemorySinkOpener: a real child process and a real pipe, no service."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest

from pgderive.runtime.batch import Batch, LagToken
from pgderive.runtime.checkpoints import SinkDataLoss
from pgderive.runtime.lane_process import LaneProcessError, LaneProcessSpec, ProcessLane
from pgderive.runtime.lanes import Lanes
from pgderive.runtime.stats import Stats
from sinks.base import Op, SinkError, ViewTarget
from sinks.memory import MemorySink, MemorySinkOpener

TARGET = ViewTarget(view="v")


def journal(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def lane(tmp_path, stop=None, acked=0x100, stats=None, **opener) -> ProcessLane:
    opener.setdefault("checkpoints", (("v", acked),))
    spec = LaneProcessSpec("search", MemorySinkOpener("search", (TARGET,), journal=str(tmp_path / "j"), **opener))
    return ProcessLane(spec, ["v"], stop or threading.Event(), acked_lsn=acked, stats=stats)


def batch(end_lsn: int, *keys: str, version: int | None = None) -> Batch:
    b = Batch(end_lsn=end_lsn)
    for k in keys:
        b.add(Op("v", k, version or end_lsn, {"k": k}))
    return b


def test_batches_are_applied_in_the_process_in_order_and_counted(tmp_path, caplog):
    stats = Stats()
    ln = lane(tmp_path, stats=stats)
    try:
        assert ln.wait_idle(30), "the process did not open its sink"
        assert ln.pid is not None and ln.pid != os.getpid()
        b1 = batch(0x200, "a", "b")
        b1.commit_times.append(time.time() - 0.5)
        b1.shared.append(LagToken(time.time() - 0.25, 2))
        ln.submit(b1)
        assert ln.wait_idle(10) and ln.error is None
        assert ln.acked_lsn == 0x200
        ln.submit(batch(0x300, "a"))
        assert ln.wait_idle(10) and ln.acked_lsn == 0x300
        ln.checkpoint(0x380, retry=False)  # an idle checkpoint: no Ops
        assert ln.acked_lsn == 0x380
    finally:
        with caplog.at_level(logging.WARNING, logger="pgderive.lanes"):
            ln.close(timeout=5.0)
    # an idle process stops when asked, and is not killed (see ProcessLane.close)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert ln._process.exitcode == 0
    calls = journal(tmp_path / "j")
    assert [(c["call"], c["lsn"]) for c in calls] == [
        ("apply_and_advance", 0x200), ("apply_and_advance", 0x300), ("advance_checkpoint", 0x380)]
    assert [op[1] for op in calls[0]["ops"]] == ["a", "b"]
    lane_stats = stats.lanes["search"]
    assert (lane_stats.ops, lane_stats.batches, lane_stats.acked_lsn) == (3, 2, 0x300)
    # the lag of the batch's transactions is measured in the daemon, from its own batch
    assert lane_stats.lag_ms.samples == 2 and lane_stats.lag_ms.max_ms >= 500
    assert not ln._process.is_alive()


def test_retryable_failures_are_retried_inside_the_process(tmp_path):
    ln = lane(tmp_path, fail=2)
    try:
        assert ln.wait_idle(30)
        ln.submit(batch(0x200, "a"))
        assert ln.wait_idle(20) and ln.error is None and ln.acked_lsn == 0x200
    finally:
        ln.close()
    assert [c["call"] for c in journal(tmp_path / "j")] == ["apply_and_advance"]


def test_a_non_retryable_error_reaches_the_reading_thread_as_raised(tmp_path):
    ln = lane(tmp_path, fail=1, retryable=False)
    try:
        assert ln.wait_idle(30)
        ln.submit(batch(0x200, "a"))
        assert ln.wait_idle(10)
        assert isinstance(ln.error, SinkError) and not ln.error.retryable
        assert "injected failure" in str(ln.error)
        assert ln.acked_lsn == 0x100  # not acknowledged
        ln.submit(batch(0x300, "b"))  # after an error nothing more is sent
        assert ln.idle and ln.acked_lsn == 0x100
    finally:
        ln.close()
    assert journal(tmp_path / "j") == []


def test_lost_checkpoints_come_back_as_sink_data_loss(tmp_path):
    ln = lane(tmp_path, checkpoints=())  # the sink has no checkpoint at 0x100
    try:
        assert ln.wait_idle(30)
        ln.submit(batch(0x200, "a"))
        assert ln.wait_idle(10)
        assert isinstance(ln.error, SinkDataLoss) and ln.error.views == ["v"]
        assert ln.error.sink == "search"
    finally:
        ln.close()


def test_a_sink_that_cannot_be_opened_is_the_lane_error(tmp_path):
    ln = lane(tmp_path, open_error="authentication failed")
    try:
        assert ln.wait_idle(30)
        assert isinstance(ln.error, SinkError) and "authentication failed" in str(ln.error)
    finally:
        ln.close()


def test_a_killed_process_stops_the_lane_naming_the_sink(tmp_path):
    ln = lane(tmp_path, slow=30.0)
    try:
        assert ln.wait_idle(30)
        ln.submit(batch(0x200, "a"))
        time.sleep(0.3)
        os.kill(ln.pid, signal.SIGKILL)
        assert ln.wait_idle(10)
        assert isinstance(ln.error, LaneProcessError)
        assert "sink search" in str(ln.error) and "killed by signal 9" in str(ln.error)
        assert ln.acked_lsn == 0x100
    finally:
        ln.close()


def test_close_kills_a_process_hung_in_the_sink(tmp_path):
    ln = lane(tmp_path, slow=60.0)
    assert ln.wait_idle(30)
    ln.submit(batch(0x200, "a"))
    time.sleep(0.3)
    started = time.monotonic()
    ln.close(timeout=1.0)
    assert time.monotonic() - started < 8
    assert not ln._process.is_alive()


def test_a_stop_ends_the_retries_in_the_process(tmp_path):
    stop = threading.Event()
    ln = lane(tmp_path, stop=stop, fail=1000)  # a sink that is down
    try:
        assert ln.wait_idle(30)
        ln.submit(batch(0x200, "a"))
        assert not ln.wait_idle(1.0)  # retrying
        stop.set()
        assert ln.wait_idle(10)
        assert isinstance(ln.error, SinkError) and ln.error.retryable
        assert ln.acked_lsn == 0x100
    finally:
        ln.close()


def test_a_slow_process_lane_holds_back_only_itself(tmp_path):
    """A thread lane keeps acknowledging while the process lane applies a slow batch; the
    position the slot may be confirmed at is the minimum."""
    stop = threading.Event()
    fast = MemorySink("cache")
    fast.register(ViewTarget(view="c"))
    fast.write_checkpoint(["c"], 0x100)
    slow = MemorySink("search")  # only its type matters in the daemon: its data is in the process
    opener = MemorySinkOpener("search", (TARGET,), journal=str(tmp_path / "j"), checkpoints=(("v", 0x100),),
                              slow=2.0)
    lanes = Lanes({"cache": fast, "search": slow}, {"cache": ["c"], "search": ["v"]}, stop,
                  acked_lsn=0x100, processes={"search": LaneProcessSpec("search", opener)})
    try:
        assert isinstance(lanes["search"], ProcessLane)
        assert lanes["search"].wait_idle(30)
        lanes.submit("search", batch(0x200, "a"))
        for lsn in (0x200, 0x300, 0x400):
            b = Batch(end_lsn=lsn)
            b.add(Op("c", f"k{lsn}", lsn, {"x": 1}))
            lanes.submit("cache", b)
            assert lanes["cache"].wait_idle(5)
        assert lanes["cache"].acked_lsn == 0x400
        assert not lanes["search"].idle and lanes.acked_lsn == 0x100
        assert lanes.wait_idle(time.monotonic() + 10)
        assert lanes.acked_lsn == 0x200
    finally:
        lanes.close()
    assert fast.records("c").keys() == {"k512", "k768", "k1024"}
    assert [c["lsn"] for c in journal(tmp_path / "j")] == [0x200]


@pytest.mark.parametrize("exc", [SinkError("x", retryable=False), SinkDataLoss("s", ["a", "b"], "gone")])
def test_lane_errors_survive_the_pipe(exc):
    import pickle

    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert getattr(back, "retryable", None) == getattr(exc, "retryable", None)
    assert getattr(back, "views", None) == getattr(exc, "views", None)
