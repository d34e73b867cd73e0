"""The streaming runtime with its shipped test doubles (no services): a :class:`cdc.testing.ListReader`
fed wal2json messages, :class:`sinks.memory.MemorySink` sinks, the real lanes and stream.

These pin the lane rules of ARCHITECTURE.md ("Lanes", "Checkpoints"): a slow sink holds back
only its own views, the slot is confirmed at the slowest lane, checkpoints never trail the slot,
TRUNCATE keeps its place in each lane, a full lane stops the reader, and every Op lands once.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import pytest

from cdc.catalog import TableInfo
from cdc.testing import ListReader, delete, insert, keepalive, transaction, truncate, update
from pgderive.runtime.checkpoints import SinkDataLoss
from pgderive.runtime.lanes import Lanes
from pgderive.runtime.stats import Stats
from pgderive.runtime.stream import Limits, Stream
from pgderive.state.deadletters import DeadLetter, Supersede
from sinks.base import Rejected, Sink
from sinks.memory import MemorySink
from views.derive import View
from views.spec import parse_spec

SPEC = """
source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks:
  cache: {type: redis}
  search: {type: opensearch, hosts: ["http://127.0.0.1:1"]}
views:
  t_cache: {table: public.t, sink: cache, key: "t:{id}", fields: [id, v]}
  t_search: {table: public.t, sink: search, index: ts, fields: [id, v]}
  u_cache: {table: public.u, sink: cache, key: "u:{id}", fields: [id, v]}
"""
T = TableInfo("public.t", {"id": "bigint", "v": "text"}, ("id",), "d", ("id",))
U = TableInfo("public.u", {"id": "bigint", "v": "text"}, ("id",), "d", ("id",))


class RefreshingSink(MemorySink):
    """A MemorySink whose readers would see writes after a refresh (like OpenSearch)."""

    def refresh(self, view: str) -> None:
        pass


class Harness:
    """A stream over a ListReader with two MemorySinks, running on a thread."""

    def __init__(self, messages: Sequence[object] = (), limits: Limits = Limits(checkpoint_every=0.0),
                 search: MemorySink | None = None) -> None:
        spec = parse_spec(SPEC)
        self.views = [View(n, spec.views[n], T if spec.views[n].qualified == "public.t" else U)
                      for n in spec.views]
        self.cache, self.search = MemorySink("cache"), search or MemorySink("search")
        self.sinks: dict[str, Sink] = {"cache": self.cache, "search": self.search}
        by_sink: dict[str, list[str]] = {}
        for v in self.views:
            self.sinks[v.sink].register(v.target)
            by_sink.setdefault(v.sink, []).append(v.name)
        for name, names in by_sink.items():  # as the bootstrap leaves them
            self.sinks[name].write_checkpoint(names, 0x10)
        self.reader = ListReader(messages)
        self.reader.connect()
        self.reader.start(0x10)
        self.stop = threading.Event()
        self.stats = Stats()
        self.dead: list[DeadLetter] = []
        self.rejected: list[Rejected] = []
        self.supersedes: list[Supersede] = []
        self.lanes = Lanes(self.sinks, by_sink, self.stop, acked_lsn=0x10, record=self._record, stats=self.stats)
        self.stream = Stream(self.views, self.lanes, stats=self.stats, stop=self.stop, limits=limits)
        self.error: BaseException | None = None
        self.checkpoint_behind_slot: list[tuple[str, int, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _record(self, dead: Sequence[DeadLetter], rejected: Sequence[Rejected],
                supersedes: Sequence[Supersede] = ()) -> None:
        self.dead += dead
        self.rejected += rejected
        self.supersedes += supersedes

    def _run(self) -> None:
        try:
            self.stream.run(self.reader)
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            self.error = e

    def start(self) -> Harness:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.lanes.close()

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.error is not None:
                raise AssertionError(f"stream failed while waiting for {what}") from self.error
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")

    def check_checkpoints(self) -> None:
        """Rule: a view's checkpoint is never behind what the slot was confirmed at."""
        confirmed = self.reader.confirmed_lsn
        for v in self.views:
            cp = self.sinks[v.sink].read_checkpoint(v.name) or 0
            if confirmed and cp < confirmed:
                self.checkpoint_behind_slot.append((v.name, cp, confirmed))


def tx(xid: int, lsn: int, *changes: dict) -> list[dict]:
    return transaction(xid, lsn, *changes, end_lsn=lsn + 8)


def rows(n: int, start_lsn: int = 0x1000, table: str = "t", value: str = "a") -> list[list[dict]]:
    return [tx(i, start_lsn + 0x10 * i, insert(table, {"id": i, "v": f"{value}{i}"})) for i in range(1, n + 1)]


def test_a_blocked_sink_holds_back_only_its_own_views_and_the_slot():
    h = Harness(rows(50))
    gate = h.search.block()
    h.start()
    end = 0x1000 + 0x10 * 50 + 8
    # The cache lane is complete while search is stuck on its first batch.
    h.wait(lambda: len(h.cache.records("t_cache")) == 50 and h.lanes["cache"].acked_lsn == end, "cache lane")
    assert h.cache.read_checkpoint("t_cache") == end
    assert h.search.records("t_search") == {}
    assert h.reader.confirmed_lsn < end  # the slot waits for the slowest lane
    assert h.lanes.acked_lsn == h.lanes["search"].acked_lsn
    h.check_checkpoints()
    gate.set()
    h.search.unblock()
    h.wait(lambda: h.reader.confirmed_lsn == end, "slot confirmed at the end")
    h.check_checkpoints()
    h.finish()
    assert h.error is None
    assert len(h.search.records("t_search")) == 50
    assert h.search.read_checkpoint("t_search") == end
    assert not h.checkpoint_behind_slot
    lanes = h.stats.summary()["sinks"]
    assert lanes["cache"]["lag_ms"]["samples"] == 50 and lanes["search"]["lag_ms"]["samples"] == 50
    # Every transaction touched both lanes: one end-to-end sample each, by the last lane.
    assert h.stats.lag_ms.samples == 50
    # Each transaction was read once, before any sink acknowledged it (search was blocked).
    read = h.stats.summary()["read_lag_ms"]
    assert read["samples"] == 50
    assert read["max"] < lanes["search"]["lag_ms"]["max"]


def test_a_busy_lane_collapses_what_arrived_meanwhile_into_one_op_per_key():
    h = Harness([tx(1, 0x100, insert("t", {"id": 1, "v": "first"}))])
    gate = h.search.block()
    h.start()
    h.wait(lambda: h.search.waiting.is_set(), "search busy with the first batch")
    h.reader.feed(*[tx(1 + i, 0x100 + 0x10 * i, update("t", {"id": 1, "v": f"v{i}"})) for i in range(1, 40)],
                  tx(99, 0x800, delete("t", {"id": 2})), tx(100, 0x810, insert("t", {"id": 2, "v": "back"})))
    h.wait(lambda: h.reader.exhausted and len(h.stream.pending["search"]) == 2, "the next batch collected")
    gate.set()
    h.search.unblock()
    h.wait(lambda: h.reader.confirmed_lsn == 0x818, "all confirmed")
    h.finish()
    second = [ops for method, ops in h.search.batches if ops][1]
    assert sorted((op.key, op.version, op.doc and op.doc["v"]) for op in second) == \
        [("1", 0x100 + 0x10 * 39, "v39"), ("2", 0x810, "back")]
    assert h.search.records("t_search") == {"1": {"id": 1, "v": "v39"}, "2": {"id": 2, "v": "back"}}


def test_truncate_keeps_its_place_in_each_lane_even_behind_a_slow_sink():
    h = Harness([tx(1, 0x100, insert("t", {"id": 1, "v": "old"}), insert("t", {"id": 2, "v": "old"})),
                 tx(2, 0x200, insert("t", {"id": 3, "v": "gone"}), truncate("t"),
                    insert("t", {"id": 4, "v": "same tx"})),
                 tx(3, 0x300, insert("t", {"id": 5, "v": "after"}))])
    h.search.slow(0.05)
    h.search.fail_next(1)  # and its first call fails (retried)
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x308, "all confirmed", timeout=20)
    h.finish()
    want = {"4": {"id": 4, "v": "same tx"}, "5": {"id": 5, "v": "after"}}
    assert h.search.records("t_search") == want
    assert h.cache.records("t_cache") == {"t:4": want["4"], "t:5": want["5"]}


def test_a_full_lane_stops_the_reader_and_memory_stays_bounded():
    h = Harness(rows(400), limits=Limits(batch_ops=20, checkpoint_every=0.0))
    gate = h.search.block()
    h.start()
    h.wait(lambda: h.search.waiting.is_set(), "search busy")
    time.sleep(0.3)
    assert not h.reader.exhausted  # backpressure: the reader stopped
    assert len(h.stream.pending["search"]) <= 20 + 1  # one transaction past the bound at most
    read_while_blocked = len(h.reader.delivered)
    assert read_while_blocked < 60
    gate.set()
    h.search.unblock()
    h.wait(lambda: h.reader.confirmed_lsn == 0x1000 + 0x10 * 400 + 8, "all confirmed")
    h.finish()
    assert len(h.search.records("t_search")) == 400 and len(h.cache.records("t_cache")) == 400
    assert max(len(ops) for _, ops in h.search.batches) <= 21


def test_a_retryable_failure_is_retried_and_nothing_is_applied_twice_in_effect():
    h = Harness(rows(5))
    h.cache.fail_next(1)
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x1000 + 0x50 + 8, "all confirmed")
    h.finish()
    assert h.error is None
    assert h.cache.records("t_cache") == {f"t:{i}": {"id": i, "v": f"a{i}"} for i in range(1, 6)}


def test_a_sink_that_lost_acknowledged_data_stops_the_stream_with_sink_data_loss():
    h = Harness(rows(3))
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x1000 + 0x30 + 8, "first rows confirmed")
    h.cache.lose_data()
    h.reader.feed(*rows(2, start_lsn=0x2000))
    h.wait(lambda: h.error is not None, "the error")
    h.finish()
    assert isinstance(h.error, SinkDataLoss) and h.error.sink == "cache"
    assert set(h.error.views) == {"t_cache", "u_cache"}


def test_rows_a_view_cannot_derive_become_dead_letters_before_the_slot_moves():
    h = Harness([tx(1, 0x100, insert("t", {"id": None, "v": "no key"})), *rows(2, start_lsn=0x200)])
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x200 + 0x20 + 8, "all confirmed")
    h.finish()
    assert sorted(d.view for d in h.dead) == ["t_cache", "t_search"]
    assert all(d.lsn == 0x100 and d.row == {"id": None, "v": "no key"} for d in h.dead)
    assert len(h.cache.records("t_cache")) == 2


def test_unwatched_traffic_moves_every_checkpoint_and_the_slot_on_keepalives():
    h = Harness(rows(1))
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x1018, "first row confirmed")
    h.reader.feed(tx(7, 0x5000, insert("other", {"id": 1, "v": "x"})))
    h.wait(lambda: h.reader.confirmed_lsn == 0x5008, "slot past the unwatched transaction")
    h.reader.feed(keepalive(0x6000))  # the walsender's keepalive: nothing more to send
    h.wait(lambda: h.reader.confirmed_lsn == 0x6000, "slot at the keepalive")
    h.finish()
    for v in h.views:
        assert h.sinks[v.sink].read_checkpoint(v.name) == 0x6000


def test_a_transaction_on_one_lane_only_records_lag_there():
    h = Harness([tx(1, 0x100, insert("u", {"id": 1, "v": "x"}))])
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == 0x108, "confirmed")
    h.finish()
    lanes = h.stats.summary()["sinks"]
    assert lanes["cache"]["lag_ms"]["samples"] == 1
    assert lanes["search"]["lag_ms"]["samples"] == 0 and lanes["search"]["ops"] == 0
    assert h.stats.lag_ms.samples == 1
    assert h.search.read_checkpoint("t_search") == 0x108  # its position still moved


def test_a_graceful_stop_applies_and_confirms_what_was_read():
    h = Harness(rows(30))
    gate = h.search.block()
    h.start()
    h.wait(lambda: h.reader.exhausted, "everything read")
    h.stop.set()
    time.sleep(0.05)
    gate.set()
    h.search.unblock()
    h.thread.join(10)
    h.lanes.close()
    assert h.error is None
    assert h.reader.confirmed_lsn == 0x1000 + 0x10 * 30 + 8
    assert len(h.search.records("t_search")) == 30


def test_a_stop_does_not_wait_for_a_hung_sink_beyond_its_grace(caplog: pytest.LogCaptureFixture):
    # SIGTERM while a sink hangs (issue 14, item 5): the stop gives up on it after stop_grace
    # seconds, confirms only what every sink acknowledged, and raises nothing.
    h = Harness(rows(30))
    h.stream.stop_grace = 0.5
    gate = h.search.block()
    h.start()
    h.wait(lambda: h.reader.exhausted and len(h.cache.records("t_cache")) == 30, "the cache applied everything")
    t0 = time.monotonic()
    h.stop.set()
    h.thread.join(10)
    took = time.monotonic() - t0
    try:
        assert not h.thread.is_alive() and h.error is None
        assert 0.4 < took < 3, took
        # the search lane never acknowledged: the slot stays where it was
        assert h.reader.confirmed_lsn == 0x10
        assert "stopping: sink(s) search did not acknowledge within 0.5 s" in caplog.text
    finally:
        gate.set()
        h.search.unblock()
        h.lanes.close()


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_end_equal_to_their_last_writes_whatever_the_sink_speed(seed: int):
    import random

    rng = random.Random(seed)
    messages, want, lsn = [], {}, 0x100
    for xid in range(1, 120):
        changes = []
        for _ in range(rng.randint(1, 4)):
            i = rng.randint(1, 15)
            if rng.random() < 0.25:
                changes.append(delete("t", {"id": i}))
                want.pop(i, None)
            else:
                v = f"{xid}-{rng.random():.6f}"
                changes.append(insert("t", {"id": i, "v": v}))
                want[i] = v
        lsn += rng.randint(0x10, 0x100)
        messages.append(tx(xid, lsn, *changes))
    h = Harness(messages, limits=Limits(batch_ops=rng.choice([3, 50, 20_000]), checkpoint_every=0.0))
    h.search.slow(rng.choice([0.001, 0.02]))  # a slower sink, whose first call fails (retried)
    h.search.fail_next(1)
    h.start()
    h.wait(lambda: h.reader.confirmed_lsn == lsn + 8, "all confirmed", timeout=60)
    h.finish()
    assert h.search.records("t_search") == {str(i): {"id": i, "v": v} for i, v in want.items()}
    assert h.cache.records("t_cache") == {f"t:{i}": {"id": i, "v": v} for i, v in want.items()}


def test_a_refreshable_sink_gets_fewer_larger_batches_and_the_others_do_not_wait():
    h = Harness(search=RefreshingSink("search"), limits=Limits(checkpoint_every=0.0, linger=0.2))
    assert h.lanes["search"].lingers and not h.lanes["cache"].lingers
    h.start()
    for i in range(1, 21):  # a trickle: each row once the previous one is in the cache
        h.reader.feed(tx(i, 0x1000 + 0x10 * i, insert("t", {"id": i, "v": "x"})))
        h.wait(lambda: len(h.cache.records("t_cache")) == i, f"row {i} in the cache")
    h.wait(lambda: h.reader.confirmed_lsn == 0x1000 + 0x10 * 20 + 8, "all confirmed")
    h.finish()
    cache_writes = [ops for _, ops in h.cache.batches if ops]
    search_writes = [ops for _, ops in h.search.batches if ops]
    assert len(cache_writes) >= 15  # each row went to Redis on its own, at once
    assert len(search_writes) <= 6 and sum(map(len, search_writes)) == 20


class GenerationSink(RefreshingSink):
    """A MemorySink with :class:`~sinks.base.LiveGenerations`: records the generation steps in
    stream order, interleaved with the Ops it applies."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.events: list[tuple[str, ...]] = []

    def apply(self, ops):
        self.events += [("op", op.view, op.key) for op in ops]
        return super().apply(ops)

    def apply_and_advance(self, ops, views, previous, lsn):
        self.events += [("op", op.view, op.key) for op in ops]
        return super().apply_and_advance(ops, views, previous, lsn)

    def follow_generation(self, view: str, generation: str, *, exclusive: bool) -> None:
        self.events.append(("follow", view, generation, str(exclusive)))

    def abort_generation(self, view: str, generation: str) -> None:
        self.events.append(("abort", view, generation))

    def discard_unserved(self, view: str) -> list[str]:
        return []

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        self.events.append(("commit", view, generation))
        super().commit_generation(view, generation, version)


def test_a_generation_step_lands_ahead_of_the_ops_read_after_it():
    from pgderive.runtime.batch import GenerationStep
    from sinks.base import LiveGenerations

    search = GenerationSink("search")
    assert isinstance(search, LiveGenerations)
    first, later = rows(5), rows(5, start_lsn=0x2000, value="b")
    h = Harness(first, search=search).start()
    h.wait(lambda: len(search.records("t_search")) == 5, "the first rows")
    reply = h.stream.request_step("search", GenerationStep(7, "follow", "t_search", "g1"))
    assert reply.filed.wait(5) and reply.refused is None
    h.wait(lambda: h.lanes["search"].steps_done == 7, "the step to be applied")
    h.reader.feed(*later)
    h.wait(lambda: len([e for e in search.events if e[0] == "op"]) == 10, "the later rows")
    h.finish()
    at = search.events.index(("follow", "t_search", "g1", "False"))
    assert len([e for e in search.events[:at] if e[0] == "op"]) == 5  # the rows read before it
    assert len([e for e in search.events[at:] if e[0] == "op"]) == 5  # every later Op after the step


def test_a_held_view_derives_nothing_until_its_follow_step():
    from pgderive.runtime.batch import GenerationStep

    search = GenerationSink("search")
    h = Harness(rows(5), search=search)
    h.stream.held.add("t_search")
    h.start()
    h.wait(lambda: len(h.cache.records("t_cache")) == 5, "the cache view")
    assert h.search.records("t_search") == {}  # held: not derived, not written
    h.stream.request_step("search", GenerationStep(1, "follow", "t_search", "g1", exclusive=True))
    h.wait(lambda: h.lanes["search"].steps_done == 1, "the follow step")
    h.reader.feed(*rows(3, start_lsn=0x3000, value="c"))
    h.wait(lambda: len(h.search.records("t_search")) == 3, "the rows after the step")
    h.finish()
    assert "t_search" not in h.stream.held
    assert sorted(h.search.records("t_search")) == ["1", "2", "3"]


def test_a_commit_step_is_refused_after_a_truncate_past_its_snapshot():
    from pgderive.runtime.batch import GenerationStep

    search = GenerationSink("search")
    h = Harness([*rows(3), tx(50, 0x5000, truncate("t"))], search=search).start()
    h.wait(lambda: h.stream.truncated.get("t_search") == 0x5000, "the TRUNCATE")
    refused = h.stream.request_step("search", GenerationStep(1, "commit", "t_search", "g1", version=0x4000))
    assert refused.filed.wait(5) and refused.refused is not None and "TRUNCATE" in refused.refused
    ok = h.stream.request_step("search", GenerationStep(2, "commit", "t_search", "g1", version=0x6000))
    assert ok.filed.wait(5) and ok.refused is None
    h.wait(lambda: h.lanes["search"].steps_done == 2, "the accepted commit")
    h.finish()
    assert [e for e in search.events if e[0] == "commit"] == [("commit", "t_search", "g1")]
