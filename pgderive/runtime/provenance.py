"""Recording the provenance of the stream's writes: every commit that changed a view goes into
``pgderive.commits`` (:mod:`pgderive.state.provenance`) before the slot is confirmed past it
(ARCHITECTURE.md, "Provenance").

The reading thread calls :meth:`CommitRecorder.add` once per transaction that produced work
(O(1): a deque append, no lock). A thread of the recorder stores what was added as one row of
``pgderive.commits``, at once after a quiet spell and at most every ``flush_every`` seconds under
load, and once a minute deletes the commits older than the retention. :meth:`CommitRecorder.bound` caps the position the stream confirms to the
slot at the oldest commit not stored yet, so a crash replays (and records again) exactly what
was not recorded: rule 3, "flush last", with the commit log as one more acknowledger. While the
store fails (the source restarting, a lock), the recorder retries with capped backoff and logs
a warning; past ``max_pending`` commits waiting, :attr:`CommitRecorder.full` makes the reader
wait (backpressure), as a full lane does.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from array import array
from collections import deque

import psycopg

from cdc.lsn import format_lsn

from ..state.provenance import CommitStore
from .retry import one_line
from .stats import Stats

__all__ = ["CommitRecorder", "FLUSH_EVERY", "PRUNE_EVERY"]

log = logging.getLogger("pgderive.provenance")

#: Seconds between the starts of two flushes at most (under load; a commit after a quiet spell
#: is stored at once).
FLUSH_EVERY = 0.02
#: Seconds between two deletions of commits older than the retention.
PRUNE_EVERY = 60.0
_BACKOFF_MAX = 10.0


class CommitRecorder:
    """Stores the commits the stream adds into ``pgderive.commits`` on a thread of its own (see
    the module docstring).

    Args:
        store: the table's store (its own connection; only this recorder's thread uses it).
        slot: the deployment's slot (rows are keyed by slot and commit LSN).
        retention: commits older than this (by commit timestamp) are deleted; None keeps all.
        flush_every: seconds between the starts of two flushes at most.
        max_pending: commits waiting to be stored past which :attr:`full` is true.
        stats: the daemon's counters (``commits_recorded``, ``commit_record_failures``); None:
            counted on the recorder only (:attr:`stored`, :attr:`failures`).

    Threads: :meth:`add`, :meth:`bound`, :attr:`full` and :meth:`wait_room` are the reading
    thread's; the deque they share with the recorder's thread needs no lock (its ``append`` and
    ``popleft`` are atomic), so a commit costs the reading thread one tuple and one append.
    """

    def __init__(self, store: CommitStore, slot: str, retention: dt.timedelta | None, *,
                 flush_every: float = FLUSH_EVERY, max_pending: int = 50_000, stats: Stats | None = None) -> None:
        self.store = store
        self.stats = stats
        self.slot = slot
        self.retention = retention
        self.flush_every = flush_every
        self.max_pending = max_pending
        #: ``(commit LSN, xid, commit time in seconds since the epoch)`` added, not taken yet.
        self._pending: deque[tuple[int, int, float]] = deque()
        #: The first commit LSN of the flush in progress (None: none) and its size.
        self._inflight_first: int | None = None
        self._inflight_n = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idling = False  # the recorder's thread waits for a first commit
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="pgderive-provenance", daemon=True)
        #: Commits stored so far, and flushes that failed (retried).
        self.stored = 0
        self.failures = 0
        #: What ended the recorder's thread other than a retried database error; the reading
        #: thread raises it (no commit after it would ever be confirmed).
        self.error: BaseException | None = None

    # -- the reading thread ----------------------------------------------------------------------
    def add(self, lsn: int, xid: int, committed_at: float) -> None:
        """Record a commit: ``lsn`` (int, its commit LSN), ``xid``, ``committed_at`` (seconds
        since the Unix epoch, as :meth:`datetime.timestamp` gives it)."""
        self._pending.append((lsn, xid, committed_at))
        if self._idling:
            with self._lock:
                self._wake.notify_all()

    def bound(self) -> int | None:
        """The highest position (int LSN) the slot may be confirmed to: the commit LSN of the
        oldest commit not stored yet (a transaction ends after its commit record starts, so
        confirming there keeps it); None when every commit added is stored."""
        with self._lock:  # the flush takes the head of the deque under it (add() never does)
            if self._inflight_first is not None:
                return self._inflight_first
            return self._pending[0][0] if self._pending else None

    @property
    def idle(self) -> bool:
        """True when every commit added is stored."""
        return self.bound() is None

    @property
    def full(self) -> bool:
        """True when more than ``max_pending`` commits wait to be stored (the reader waits)."""
        return len(self._pending) + self._inflight_n > self.max_pending

    def wait_room(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds while :attr:`full` (the reading thread, held back)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.full:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    def wait_idle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until every commit added is stored; True if so."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify_all()
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    # -- lifetime --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the recorder's thread."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Store what was added (waiting at most ``timeout`` seconds), stop the thread and close
        the connection. True when everything added was stored; what was not is confirmed to no
        one and replays on the next start."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)
        done = self.idle
        if not self._thread.is_alive():
            self.store.close()
        elif not done:
            log.warning("provenance: %d commit(s) not recorded within %g s; they replay on the next start",
                        len(self._pending) + self._inflight_n, timeout)
        return done

    # -- the recorder's thread -------------------------------------------------------------------
    def _take(self) -> tuple["array[int]", "array[int]", "array[int]"]:
        """Take what was added, as in flight: commit LSNs, xids, commit times in microseconds
        since the epoch."""
        pending = self._pending
        with self._lock:
            n = len(pending)
            if n == 0:
                return array("q"), array("q"), array("q")
            self._inflight_first = pending[0][0]
            self._inflight_n = n
            items = [pending.popleft() for _ in range(n)]
        return (array("q", [c[0] for c in items]), array("q", [c[1] for c in items]),
                array("q", [round(c[2] * 1_000_000) for c in items]))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # raised on the reading thread (Stream.run): the daemon stops
            log.error("provenance: the recorder failed: %s", one_line(e), exc_info=log.isEnabledFor(logging.DEBUG))
            self.error = e

    def _loop(self) -> None:
        backoff = 0.5
        next_prune = time.monotonic() + 5.0
        last_start = 0.0
        batch: tuple[array[int], array[int], array[int]] | None = None  # taken, not stored yet
        while True:
            if batch is None:
                with self._lock:
                    # Idle until the first commit after a flush (add() wakes it), or a prune is due.
                    while not self._pending and not self._closing:
                        if self.retention is not None and time.monotonic() >= next_prune:
                            break
                        self._idling = True
                        if self._pending:  # added between the test and the flag
                            break
                        self._wake.wait(1.0)
                    self._idling = False
                    closing = self._closing
                # At most one flush per flush_every: under load the commits of that interval
                # share a row; a commit after a quiet spell is stored at once.
                pause = last_start + self.flush_every - time.monotonic()
                if pause > 0 and not closing:
                    time.sleep(pause)
                batch = self._take()
            closing = self._closing
            last_start = time.monotonic()
            lsns, xids, micros = batch
            try:
                if lsns:
                    self.store.insert_packed(self.slot, lsns, xids, micros)
                if self.retention is not None and time.monotonic() >= next_prune and not closing:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    self._prune()
            except psycopg.Error as e:
                self.failures += 1
                if self.stats is not None:
                    self.stats.commit_record_failures += 1
                if closing:
                    log.warning("provenance: %d commit(s) not recorded (%s); they replay on the next start",
                                len(lsns), one_line(e))
                    return
                log.warning("provenance: storing %d commit(s) from %s failed, retrying in %.1f s: %s", len(lsns),
                            format_lsn(lsns[0]) if lsns else "-", backoff, one_line(e))
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = 0.5
            batch = None
            self.stored += len(lsns)
            if self.stats is not None:
                self.stats.commits_recorded += len(lsns)
            with self._lock:
                self._inflight_n = 0
                self._inflight_first = None
                self._wake.notify_all()  # a reader waiting for room
            if closing and not self._pending:
                return

    def _prune(self) -> None:
        assert self.retention is not None
        total = 0
        while True:
            n = self.store.prune(self.slot, self.retention, limit=1000)
            total += n
            if n < 1000:
                break
        if total:
            log.info("provenance: deleted %d flush(es) of commits older than %s", total, self.retention)
