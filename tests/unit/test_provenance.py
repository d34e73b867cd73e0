"""The commit recorder (pgderive.runtime.provenance) and its place in rule 3: the slot is
confirmed only past commits stored in pgderive.commits. No services: an in-memory CommitStore
double, the ListReader and MemorySinks of test_stream's harness."""
from __future__ import annotations

import datetime as dt
import threading
from array import array

import psycopg

from pgderive.runtime.provenance import CommitRecorder
from pgderive.runtime.stream import Limits
from pgderive.state.provenance import Commit, CommitStore

from .test_stream import Harness, rows

T0 = dt.datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class MemoryCommits(CommitStore):
    """pgderive.commits in a dict; ``fail`` makes inserts raise an OperationalError while set,
    ``gate`` holds them until set."""

    def __init__(self) -> None:
        super().__init__("postgresql://unused")
        self.rows: dict[int, Commit] = {}
        self.fail = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.inserts = 0

    def insert_packed(self, slot: str, lsns: "array[int]", xids: "array[int]", micros: "array[int]") -> None:
        self.gate.wait(10)
        if self.fail.is_set():
            raise psycopg.OperationalError("the source went away")
        self.inserts += 1
        for lsn, xid, us in zip(lsns, xids, micros):
            self.rows.setdefault(lsn, Commit(lsn, xid, EPOCH + dt.timedelta(microseconds=us)))

    def prune(self, slot: str, older_than: dt.timedelta, limit: int = 100_000) -> int:
        return 0

    def close(self) -> None:
        pass


def harness(store: MemoryCommits, n: int = 20) -> tuple[Harness, CommitRecorder]:
    h = Harness(rows(n))
    rec = CommitRecorder(store, "s", dt.timedelta(days=1), flush_every=0.01)
    h.stream.provenance = rec
    rec.start()
    return h, rec


def test_every_streamed_commit_is_stored_with_its_xid_and_time() -> None:
    store = MemoryCommits()
    h, rec = harness(store)
    h.start()
    end = 0x1000 + 0x10 * 20 + 8
    h.wait(lambda: h.reader.confirmed_lsn == end, "the slot confirmed past the last commit")
    h.finish()
    assert rec.close(2.0)
    assert sorted(store.rows) == [0x1000 + 0x10 * i for i in range(1, 21)]
    c = store.rows[0x1000 + 0x10 * 7]
    assert c.xid == 7 and c.committed_at.tzinfo is not None
    assert store.inserts < 20  # batched: one statement per flush, not per commit


def test_the_slot_waits_for_commits_not_stored_yet() -> None:
    store = MemoryCommits()
    store.gate.clear()  # the first insert hangs
    h, rec = harness(store)
    h.start()
    end = 0x1000 + 0x10 * 20 + 8
    h.wait(lambda: h.lanes.acked_lsn == end, "every sink acknowledged")
    assert h.reader.confirmed_lsn <= 0x1000 + 0x10  # capped at the oldest commit not stored
    assert h.stream.confirmable <= 0x1000 + 0x10
    store.gate.set()
    h.wait(lambda: h.reader.confirmed_lsn == end, "the slot confirmed once stored")
    h.finish()
    rec.close(2.0)
    assert len(store.rows) == 20


def test_a_failing_store_is_retried_and_holds_the_slot_meanwhile() -> None:
    store = MemoryCommits()
    store.fail.set()
    h, rec = harness(store, n=5)
    h.start()
    end = 0x1000 + 0x10 * 5 + 8
    h.wait(lambda: h.lanes.acked_lsn == end and rec.failures >= 1, "a failed insert")
    assert h.reader.confirmed_lsn <= 0x1000 + 0x10
    store.fail.clear()
    h.wait(lambda: h.reader.confirmed_lsn == end, "the slot confirmed after the retry", timeout=15)
    h.finish()
    rec.close(2.0)
    assert len(store.rows) == 5


def test_a_full_recorder_stops_the_reader() -> None:
    store = MemoryCommits()
    store.gate.clear()
    h = Harness(rows(40), limits=Limits(checkpoint_every=0.0, batch_ops=4))
    rec = CommitRecorder(store, "s", None, flush_every=0.01, max_pending=5)
    h.stream.provenance = rec
    rec.start()
    h.start()
    h.wait(lambda: rec.full, "the recorder full")
    read = h.stats.transactions
    threading.Event().wait(0.3)
    assert h.stats.transactions == read < 40  # the reader waits (backpressure)
    store.gate.set()
    h.wait(lambda: h.stats.transactions == 40, "everything read once stored")
    h.finish()
    rec.close(2.0)
    assert len(store.rows) == 40


def test_close_stores_what_was_added() -> None:
    store = MemoryCommits()
    rec = CommitRecorder(store, "s", None, flush_every=5.0)
    rec.start()
    for i in range(3):
        rec.add(0x100 + i, 700 + i, T0.timestamp())
    assert rec.bound() == 0x100
    assert rec.close(2.0) and rec.bound() is None
    assert [c.xid for c in sorted(store.rows.values(), key=lambda c: c.lsn)] == [700, 701, 702]
    assert {c.committed_at for c in store.rows.values()} == {T0}  # microseconds kept


def test_a_recorder_that_breaks_stops_the_stream_instead_of_holding_the_slot() -> None:
    class Broken(MemoryCommits):
        def insert_packed(self, slot: str, lsns: "array[int]", xids: "array[int]", micros: "array[int]") -> None:
            raise TypeError("a bug, not a database error")

    h, rec = harness(Broken(), n=3)
    h.start()
    h.wait(lambda: h.error is not None, "the stream to fail")
    assert isinstance(h.error, TypeError) and rec.error is h.error
    h.finish()
