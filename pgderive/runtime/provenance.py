"""Recording the provenance of the stream's writes: every commit that changed a view goes into
``pgderive.commits`` (:mod:`pgderive.state.provenance`) before the slot is confirmed past it
(ARCHITECTURE.md, "Provenance").

The reading thread calls :meth:`CommitRecorder.add` once per transaction that produced work
(O(1): an append under a lock). A thread of the recorder stores what was added every
``flush_every`` seconds as one row of ``pgderive.commits``, and once a minute deletes the commits older
than the retention. :meth:`CommitRecorder.bound` caps the position the stream confirms to the
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

import psycopg

from cdc.lsn import format_lsn

from ..state.provenance import Commit, CommitStore
from .retry import one_line
from .stats import Stats

__all__ = ["CommitRecorder", "FLUSH_EVERY", "PRUNE_EVERY"]

log = logging.getLogger("pgderive.provenance")

#: Seconds between two flushes of the commits added meanwhile.
FLUSH_EVERY = 0.2
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
        flush_every: seconds between flushes.
        max_pending: commits waiting to be stored past which :attr:`full` is true.
        stats: the daemon's counters (``commits_recorded``, ``commit_record_failures``); None:
            counted on the recorder only (:attr:`stored`, :attr:`failures`).
    """

    def __init__(self, store: CommitStore, slot: str, retention: dt.timedelta | None, *,
                 flush_every: float = FLUSH_EVERY, max_pending: int = 50_000, stats: Stats | None = None) -> None:
        self.store = store
        self.stats = stats
        self.slot = slot
        self.retention = retention
        self.flush_every = flush_every
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[Commit] = []  # added, not taken by a flush yet (commit LSN order)
        self._inflight: list[Commit] = []  # taken by the flush in progress
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="pgderive-provenance", daemon=True)
        #: Commits stored so far, and flushes that failed (retried).
        self.stored = 0
        self.failures = 0

    # -- the reading thread ----------------------------------------------------------------------
    def add(self, lsn: int, xid: int, committed_at: dt.datetime) -> None:
        """Record a commit: ``lsn`` (int, its commit LSN), ``xid``, ``committed_at`` (aware)."""
        with self._lock:
            self._pending.append(Commit(lsn, xid, committed_at))

    def bound(self) -> int | None:
        """The highest position (int LSN) the slot may be confirmed to: the commit LSN of the
        oldest commit not stored yet (a transaction ends after its commit record starts, so
        confirming there keeps it); None when every commit added is stored."""
        with self._lock:
            if self._inflight:
                return self._inflight[0].lsn
            if self._pending:
                return self._pending[0].lsn
            return None

    @property
    def idle(self) -> bool:
        """True when every commit added is stored."""
        return self.bound() is None

    @property
    def full(self) -> bool:
        """True when more than ``max_pending`` commits wait to be stored (the reader waits)."""
        with self._lock:
            return len(self._pending) + len(self._inflight) > self.max_pending

    def wait_room(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds while :attr:`full` (the reading thread, held back)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._pending) + len(self._inflight) > self.max_pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    def wait_idle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds until every commit added is stored; True if so."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify()
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
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
            self._wake.notify()
        self._thread.join(timeout)
        done = self.idle
        if not self._thread.is_alive():
            self.store.close()
        elif not done:
            log.warning("provenance: %d commit(s) not recorded within %g s; they replay on the next start",
                        len(self._pending) + len(self._inflight), timeout)
        return done

    # -- the recorder's thread -------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        next_prune = time.monotonic() + 5.0
        while True:
            with self._lock:
                if not self._pending and not self._inflight and not self._closing:
                    self._wake.wait(self.flush_every)
                if not self._inflight:
                    self._inflight, self._pending = self._pending, []
                batch = list(self._inflight)
                closing = self._closing
            try:
                if batch:
                    self.store.insert(self.slot, batch)
                if self.retention is not None and time.monotonic() >= next_prune and not closing:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    self._prune()
            except psycopg.Error as e:
                self.failures += 1
                if self.stats is not None:
                    self.stats.commit_record_failures += 1
                if closing:
                    log.warning("provenance: %d commit(s) not recorded (%s); they replay on the next start",
                                len(batch), one_line(e))
                    return
                log.warning("provenance: storing %d commit(s) from %s failed, retrying in %.1f s: %s", len(batch),
                            format_lsn(batch[0].lsn) if batch else "-", backoff, one_line(e))
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = 0.5
            with self._lock:
                self.stored += len(batch)
                if self.stats is not None:
                    self.stats.commits_recorded += len(batch)
                self._inflight = []
                self._wake.notify_all()  # a reader waiting for room
                if closing and not self._pending:
                    return
            if not closing:
                time.sleep(self.flush_every)

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
