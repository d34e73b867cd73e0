"""The Stream in worker mode over a KafkaReader and cdc.testing.FakeConsumer, MemorySinks, the
real lanes: versions across partitions, TRUNCATEs once per partition, offsets after acks."""
from __future__ import annotations

import datetime as dt
import threading
import time

from cdc.catalog import TableInfo
from cdc.envelope import encode, truncate_record
from cdc.kafka_source import KafkaReader, consumer_config
from cdc.testing import FakeConsumer
from pgderive.runtime.lanes import Lanes
from pgderive.runtime.stats import Stats
from pgderive.runtime.stream import Limits, Stream
from sinks.base import Sink
from sinks.memory import MemorySink
from views.derive import View
from views.spec import parse_spec

SPEC = """
source:
  dsn: "postgresql://x@127.0.0.1/db"
  kafka: {bootstrap_servers: "127.0.0.1:1", group: g}
sinks:
  cache: {type: redis}
views:
  t_cache: {table: public.t, sink: cache, key: "t:{id}", fields: [id, v]}
"""
T = TableInfo("public.t", {"id": "bigint", "v": "text"}, ("id",), "d", ("id",))
TOPIC = "pgderive.public.t"
WHEN = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def c(lsn: int, id_: int, v: str, op: str = "c") -> bytes:
    return encode(op, view="p", table="public.t", lsn=lsn, xid=1, commit_time=WHEN,  # type: ignore[arg-type]
                  before=None, after={"id": id_, "v": v})


def d(lsn: int, id_: int) -> bytes:
    return encode("d", view="p", table="public.t", lsn=lsn, xid=1, commit_time=WHEN,
                  before={"id": id_}, after=None)


def t(lsn: int) -> bytes:
    return truncate_record(view="p", table="public.t", lsn=lsn, xid=1, commit_time=WHEN)


class Worker:
    """A worker-mode stream over a FakeConsumer on a thread."""

    def __init__(self, fake: FakeConsumer, sink: MemorySink | None = None) -> None:
        spec = parse_spec(SPEC)
        self.views = [View(n, spec.views[n], T) for n in spec.views]
        self.sink = sink or MemorySink("cache")
        for v in self.views:
            self.sink.register(v.target)
        sinks: dict[str, Sink] = {"cache": self.sink}
        self.fake = fake
        self.reader = KafkaReader(consumer_config("x:1", "g"), [TOPIC], consumer_factory=lambda _c: fake)
        self.reader.connect()
        self.reader.start()
        self.stop = threading.Event()
        self.lanes = Lanes(sinks, {"cache": []}, self.stop, stats=Stats(), truncate_below=True)
        self.stream = Stream(self.views, self.lanes, stats=Stats(), stop=self.stop,
                             limits=Limits(checkpoint_every=0.0), worker=True)
        self.reader.on_revoke = lambda timeout: (self.stream.drain(timeout), self.stream.confirmable)[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stream.run(self.reader)
        except BaseException as e:
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.lanes.close(1.0)
        assert self.error is None, self.error

    def records(self) -> dict[str, dict]:
        return dict(self.sink.scan("t_cache"))


def wait(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_partitions_in_any_interleaving_end_at_the_newest_versions():
    fake = FakeConsumer()
    fake.produce(TOPIC, 0, c(10, 1, "a"), c(30, 1, "b", "u"), d(50, 1))
    fake.produce(TOPIC, 1, c(20, 2, "x"), c(40, 2, "y", "u"))
    fake.assign((TOPIC, 0), (TOPIC, 1))
    w = Worker(fake)
    wait(lambda: fake.committed == {(TOPIC, 0): 3, (TOPIC, 1): 2})
    w.finish()
    assert w.records() == {"t:2": {"id": 2, "v": "y"}}


def test_truncate_from_one_partition_keeps_newer_rows_of_another_and_drops_older():
    # The TRUNCATE at 100 is in both partitions. Partition 1 is read ahead: its row written at
    # 150 (after the TRUNCATE) must survive partition 0's TRUNCATE, and partition 0's row at 50
    # (before it), read after partition 1's TRUNCATE, must not come back.
    fake = FakeConsumer()
    fake.produce(TOPIC, 1, c(20, 2, "old"), t(100), c(150, 3, "new"))
    fake.assign((TOPIC, 1))
    w = Worker(fake)
    wait(lambda: fake.committed.get((TOPIC, 1)) == 3)
    assert w.records() == {"t:3": {"id": 3, "v": "new"}}
    fake.produce(TOPIC, 0, c(50, 1, "gone"), t(100), c(120, 4, "after"))
    fake.assign((TOPIC, 0))
    wait(lambda: fake.committed.get((TOPIC, 0)) == 3)
    w.finish()
    assert w.records() == {"t:3": {"id": 3, "v": "new"}, "t:4": {"id": 4, "v": "after"}}
    assert "truncate_below" in w.sink.calls and "truncate" not in w.sink.calls


def test_truncate_handled_by_two_workers_in_either_order_converges():
    sink = MemorySink("cache")
    logs: dict = {}
    committed: dict = {}
    a_fake = FakeConsumer(logs=logs, committed=committed)
    b_fake = FakeConsumer(logs=logs, committed=committed)
    a_fake.produce(TOPIC, 0, c(10, 1, "p0-old"), t(100), c(110, 5, "p0-new"))
    a_fake.produce(TOPIC, 1, c(20, 2, "p1-old"), t(100), c(130, 6, "p1-new"))
    # B runs partition 1 all the way first (its TRUNCATE, then a write at 130) ...
    b_fake.assign((TOPIC, 1))
    b = Worker(b_fake, sink)
    wait(lambda: committed.get((TOPIC, 1)) == 3)
    # ... then A runs partition 0: its TRUNCATE must not remove B's write at 130.
    a_fake.assign((TOPIC, 0))
    a = Worker(a_fake, sink)
    wait(lambda: committed.get((TOPIC, 0)) == 3)
    a.finish()
    b.finish()
    assert dict(sink.scan("t_cache")) == {"t:5": {"id": 5, "v": "p0-new"}, "t:6": {"id": 6, "v": "p1-new"}}


def test_same_transaction_writes_after_a_truncate_survive_other_partitions_truncates():
    # BEGIN; TRUNCATE t; INSERT id 7; COMMIT at 100: partition 1 carries [t@100, c 7@100],
    # partition 0 only t@100, read later.
    fake = FakeConsumer()
    fake.produce(TOPIC, 1, c(10, 1, "x"), t(100), c(100, 7, "reloaded"))
    fake.assign((TOPIC, 1))
    w = Worker(fake)
    wait(lambda: fake.committed.get((TOPIC, 1)) == 3)
    fake.produce(TOPIC, 0, t(100))
    fake.assign((TOPIC, 0))
    wait(lambda: fake.committed.get((TOPIC, 0)) == 1)
    w.finish()
    assert w.records() == {"t:7": {"id": 7, "v": "reloaded"}}


def test_offsets_move_only_after_the_sink_acknowledged():
    sink = MemorySink("cache")
    sink.block()
    fake = FakeConsumer()
    fake.produce(TOPIC, 0, c(10, 1, "a"), c(20, 2, "b"))
    fake.assign((TOPIC, 0))
    w = Worker(fake, sink)
    time.sleep(0.3)
    assert fake.committed == {}  # read, not acknowledged: nothing committed
    sink.unblock()
    wait(lambda: fake.committed == {(TOPIC, 0): 2})
    w.finish()
    assert set(w.records()) == {"t:1", "t:2"}


def test_revoke_drains_then_commits_what_the_sink_acknowledged():
    fake = FakeConsumer()
    fake.produce(TOPIC, 0, c(10, 1, "a"))
    fake.produce(TOPIC, 1, c(20, 2, "b"))
    fake.assign((TOPIC, 0), (TOPIC, 1))
    w = Worker(fake)
    wait(lambda: len(w.records()) == 2)
    fake.revoke((TOPIC, 0))
    wait(lambda: w.reader.assignment() == [(TOPIC, 1)])
    sync = [offs for offs, asynchronous in fake.commits if not asynchronous]
    w.finish()
    assert fake.committed[(TOPIC, 0)] == 1
    assert all(p == 0 for offs in sync for _t, p, _o in offs)
