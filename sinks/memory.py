"""In-memory sink: the semantics of :class:`sinks.redis.RedisSink` in a dict, for tests.

Layout of one view: ``records`` (key → document) and ``versions`` (key → ``(version,
tombstone)``). Documents are stored as given (deep copies: no encoding, ``None`` values kept),
so :meth:`MemorySink.scan` and :meth:`MemorySink.stored_form` return the documents themselves.

Semantics (those of the Redis sink, ARCHITECTURE.md, rule 2):

* An Op applies when the key has no version entry or ``op.version`` is >= the stored one
  (tombstones included): an older Op never overwrites a newer one, an equal one re-applies
  (same transaction, applied in order), so replaying Ops leaves the state unchanged.
* A delete removes the record and leaves a tombstone ``(version, True)`` that keeps an older
  upsert from resurrecting it.
* A partial Op (``Op.partial``) merges its fields into the stored record (a ``None`` field is
  stored as ``None``, as in a full upsert); for a missing or deleted record it is skipped and
  counted in ``stats["partial_missed"]``. Within one call the full Ops and deletes are applied
  first, in the given order, then the partial Ops in version order (as the Redis ``json``
  format does).
* Generations: :meth:`MemorySink.begin_generation` returns an id; :meth:`MemorySink.load`
  writes into the shared records with the same compare-and-set;
  :meth:`MemorySink.commit_generation` sweeps records and tombstones older than its version.
  :meth:`MemorySink.truncate` sweeps those at or below its version. Checkpoints are untouched.
* Checkpoints are forward only; :meth:`MemorySink.advance_checkpoint` (and
  :meth:`MemorySink.apply_and_advance`, :class:`~sinks.base.AtomicCheckpoint`) report the
  views whose checkpoint is missing or behind ``previous`` and leave them untouched.

Test hooks (see :class:`MemorySink`): failing the next calls with a :class:`SinkError`,
blocking calls until an event is set (a slow or hung sink), refusing keys as
:class:`~sinks.base.Rejected`, simulating data loss, and call counters. Every method is
thread-safe: the runtime calls sinks from worker threads.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from sinks.base import Doc, Op, Rejected, SinkError, ViewTarget

if TYPE_CHECKING:
    from sinks.base import AtomicCheckpoint, Sink, TruncatesBelow

__all__ = ["MemorySink", "MemorySinkOpener", "WRITE_METHODS"]

WRITE_METHODS = frozenset({"apply", "apply_and_advance", "load"})
"""The calls :meth:`MemorySink.fail_next` and :meth:`MemorySink.block` affect by default."""


@dataclass(slots=True)
class _View:
    records: dict[str, Doc] = field(default_factory=dict)
    versions: dict[str, tuple[int, bool]] = field(default_factory=dict)  # key -> (version, tombstone)


@dataclass(slots=True)
class _Failure:
    left: int
    methods: frozenset[str]
    retryable: bool
    message: str


class MemorySink:
    """A :class:`~sinks.base.Sink` and :class:`~sinks.base.AtomicCheckpoint` held in memory.

    Args:
        name: the sink's name (for error messages and the runtime's lanes).
        reject: optional predicate ``op -> error text | None``: Ops for which it returns a text
            are refused as :class:`~sinks.base.Rejected` with that text (see also
            :meth:`reject_keys`).
        deployment: the deployment id, as the Redis sink takes it; recorded only: one
            MemorySink instance is one deployment's store (nothing is shared between
            instances), so there is no other deployment's state to keep apart, and no legacy
            layout to adopt (it is no :class:`~sinks.base.LegacyLayout`).
        journal: a file to which every completed write call appends one JSON line
            ``{"call": name, "ops": [[view, key, version, deleted], ...], "lsn": int | null}``
            (``lsn``: where checkpoints moved): what a test reads back from a sink that lives
            in another process (:class:`MemorySinkOpener`).

    Attributes:
        stats: running counters ``applied``, ``skipped`` (older or equal-but-missed version,
            partial Ops for missing records included), ``partial_missed``, ``rejected``.
        calls: :class:`collections.Counter` of public method calls by name (every call,
            failed or blocked ones included).
        batches: ``(method, ops)`` of every ``apply``/``apply_and_advance``/``load`` call that
            completed, in order.
        closed: :meth:`close` was called (the sink keeps working: tests read it afterwards).
        waiting: an :class:`threading.Event` set whenever a call starts waiting in
            :meth:`block`.

    Errors: :class:`SinkError` with ``retryable=False`` for an unregistered view, a load with
    Ops of another view or an unknown generation; the hooks raise what they are told to.
    """

    def __init__(self, name: str = "memory", *,
                 reject: Callable[[Op], str | None] | None = None, deployment: str | None = None,
                 journal: str | None = None) -> None:
        self.name = name
        self.journal = journal
        self.deployment = deployment
        self.reject = reject
        self.stats: dict[str, int] = {"applied": 0, "skipped": 0, "partial_missed": 0, "rejected": 0}
        self.calls: Counter[str] = Counter()
        self.batches: list[tuple[str, list[Op]]] = []
        self.closed = False
        self.waiting = threading.Event()
        self._lock = threading.RLock()
        self._targets: dict[str, ViewTarget] = {}
        self._views: dict[str, _View] = {}
        self._checkpoints: dict[str, int] = {}
        self._generations: dict[str, tuple[str, int]] = {}  # id -> (view, version)
        self._rejected_keys: dict[tuple[str, str], str] = {}  # (view, key) -> error
        self._failure: _Failure | None = None
        self._gate: threading.Event | None = None
        self._gate_methods: frozenset[str] = frozenset()
        self._gate_timeout: float | None = None
        self._delay = 0.0
        self._delay_methods: frozenset[str] = frozenset()

    # --- test hooks -------------------------------------------------------------------------

    def fail_next(self, n: int = 1, *, methods: Iterable[str] = WRITE_METHODS, retryable: bool = True,
                  message: str = "injected failure") -> None:
        """Make the next ``n`` calls of any of ``methods`` (public method names; default the
        writes: ``apply``, ``apply_and_advance``, ``load``) raise :class:`SinkError` with
        ``retryable`` before changing anything. Replaces a previous :meth:`fail_next`;
        ``n=0`` disarms it."""
        with self._lock:
            self._failure = _Failure(n, frozenset(methods), retryable, message) if n > 0 else None

    def block(self, *, methods: Iterable[str] = WRITE_METHODS, until: threading.Event | None = None,
              timeout: float | None = None) -> threading.Event:
        """Make calls of ``methods`` wait, before changing anything, until the returned event
        (``until``, or a new one) is set: a slow or hung sink. With ``timeout`` (seconds) a
        call that waited that long raises a retryable :class:`SinkError` instead (a sink timing
        out). :attr:`waiting` is set when a call starts waiting. :meth:`unblock` sets the event
        and removes the gate. The lock is not held while waiting: other calls proceed."""
        gate = until if until is not None else threading.Event()
        with self._lock:
            self._gate, self._gate_methods, self._gate_timeout = gate, frozenset(methods), timeout
        return gate

    def slow(self, seconds: float, *, methods: Iterable[str] = WRITE_METHODS) -> None:
        """Make every call of ``methods`` take ``seconds`` longer (a sink that keeps up, slowly:
        a remote search cluster); 0 removes the delay. The lock is not held while delaying."""
        with self._lock:
            self._delay, self._delay_methods = seconds, frozenset(methods)

    def unblock(self) -> None:
        """Release the calls waiting in :meth:`block` and stop blocking new ones."""
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    def reject_keys(self, view: str, keys: Iterable[str], error: str = "refused by MemorySink") -> None:
        """Refuse every later Op of ``view`` for one of ``keys`` as :class:`Rejected` with
        ``error`` (nothing is written for it, no version entry)."""
        with self._lock:
            for key in keys:
                self._rejected_keys[(view, key)] = error

    def lose_data(self, views: Iterable[str] | None = None) -> None:
        """Forget the records, versions and checkpoints of ``views`` (default: all), as a Redis
        restarted without its AOF would: the next :meth:`advance_checkpoint` reports them."""
        with self._lock:
            for view in list(self._views) if views is None else list(views):
                self._views.pop(view, None)
                self._checkpoints.pop(view, None)
            if views is None:
                self._checkpoints.clear()

    def records(self, view: str) -> dict[str, Doc]:
        """A copy of the live records of ``view`` (key → document); no hook, no call count."""
        with self._lock:
            return copy.deepcopy(self._view(view).records)

    def versions(self, view: str) -> dict[str, tuple[int, bool]]:
        """A copy of the version entries of ``view``: key → ``(version, is_tombstone)``."""
        with self._lock:
            return dict(self._view(view).versions)

    # --- Sink -------------------------------------------------------------------------------

    def register(self, target: ViewTarget) -> None:
        """Declare a view (``format``/``index`` are kept but do not matter)."""
        self._enter("register")
        with self._lock:
            self._targets[target.view] = target
            self._views.setdefault(target.view, _View())

    def apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """Compare-and-set every Op (any registered views); returns the refused Ops."""
        self._enter("apply")
        with self._lock:
            rejected = self._apply(ops)
            self.batches.append(("apply", list(ops)))
            self._journal("apply", ops)
            return rejected

    def apply_and_advance(self, ops: Sequence[Op], views: Sequence[str], previous: int,
                          lsn: int) -> tuple[list[Rejected], list[str]]:
        """:meth:`apply` then :meth:`advance_checkpoint`, atomically under the sink's lock (see
        :class:`~sinks.base.AtomicCheckpoint`). A failure injected by :meth:`fail_next` raises
        before either half."""
        self._enter("apply_and_advance")
        with self._lock:
            rejected = self._apply(ops)
            lost = self._advance(views, previous, lsn)
            self.batches.append(("apply_and_advance", list(ops)))
            self._journal("apply_and_advance", ops, None if lost else lsn)
            return rejected, lost

    def begin_generation(self, view: str, version: int) -> str:
        """Returns the generation id ``"<view>@<version>"``."""
        self._enter("begin_generation")
        with self._lock:
            self._target(view)
            gen = f"{view}@{version}"
            self._generations[gen] = (view, version)
            return gen

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> list[Rejected]:
        """The same compare-and-set as :meth:`apply`, for Ops of ``view`` only."""
        self._enter("load")
        with self._lock:
            self._target(view)
            if self._generations.get(generation, (None, 0))[0] != view:
                raise SinkError(f"sink {self.name}: load into {view!r}: unknown generation {generation!r}",
                                retryable=False)
            for op in ops:
                if op.view != view:
                    raise SinkError(f"sink {self.name}: load into {view!r} got an Op of view {op.view!r}",
                                    retryable=False)
            rejected = self._apply(ops)
            self.batches.append(("load", list(ops)))
            return rejected

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Delete the records and tombstones of ``view`` stored at a version < ``version``."""
        self._enter("commit_generation")
        with self._lock:
            self._target(view)
            self._generations.pop(generation, None)
            self._sweep(view, version)

    def write_checkpoint(self, views: Sequence[str], lsn: int) -> None:
        """Raise each checkpoint to ``lsn`` (never lowers one)."""
        self._enter("write_checkpoint")
        with self._lock:
            for view in views:
                if self._checkpoints.get(view, -1) < lsn:
                    self._checkpoints[view] = lsn

    def advance_checkpoint(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        """Raise the checkpoints at or past ``previous`` to ``lsn``; return the views whose
        checkpoint is missing or behind ``previous`` (left untouched)."""
        self._enter("advance_checkpoint")
        with self._lock:
            lost = self._advance(views, previous, lsn)
            self._journal("advance_checkpoint", (), None if lost else lsn)
            return lost

    def read_checkpoint(self, view: str) -> int | None:
        self._enter("read_checkpoint")
        with self._lock:
            return self._checkpoints.get(view)

    def truncate(self, view: str, version: int) -> None:
        """Delete the records and tombstones of ``view`` at or below ``version``."""
        self._enter("truncate")
        with self._lock:
            self._target(view)
            self._sweep(view, version + 1)
            self._journal("truncate", (), version)

    def truncate_below(self, view: str, version: int) -> None:
        """Delete the records and tombstones of ``view`` below ``version``
        (:class:`~sinks.base.TruncatesBelow`)."""
        self._enter("truncate_below")
        with self._lock:
            self._target(view)
            self._sweep(view, version)
            self._journal("truncate_below", (), version)

    def scan(self, view: str) -> Iterator[tuple[str, Doc]]:
        """``(key, doc)`` of every live record (a snapshot taken at the call; docs are copies)."""
        self._enter("scan")
        with self._lock:
            self._target(view)
            items = copy.deepcopy(list(self._view(view).records.items()))
        return iter(items)

    def get(self, view: str, keys: Sequence[str], *,
            realtime: bool = True) -> dict[str, tuple[Doc | None, int | None]]:
        """``key -> (doc | None, version | None)``; a tombstone gives ``(None, its version)``."""
        self._enter("get")
        with self._lock:
            self._target(view)
            v = self._view(view)
            out: dict[str, tuple[Doc | None, int | None]] = {}
            for key in keys:
                entry = v.versions.get(key)
                doc = v.records.get(key)
                out[key] = (copy.deepcopy(doc), None if entry is None else entry[0])
            return out

    def scan_keys(self, view: str) -> Iterator[tuple[str, int | None]]:
        """``(key, version)`` of every live record."""
        self._enter("scan_keys")
        with self._lock:
            self._target(view)
            v = self._view(view)
            items: list[tuple[str, int | None]] = [(k, v.versions[k][0]) for k in v.records]
        return iter(items)

    def count(self, view: str) -> int:
        self._enter("count")
        with self._lock:
            self._target(view)
            return len(self._view(view).records)

    def stored_form(self, view: str, doc: Doc) -> Doc:
        """The document itself (a deep copy): the sink stores documents as given."""
        return copy.deepcopy(doc)

    def drop_view(self, view: str) -> None:
        """Forget the records, versions and checkpoint of ``view`` (it stays registered)."""
        self._enter("drop_view")
        with self._lock:
            self._views.pop(view, None)
            self._checkpoints.pop(view, None)

    def check(self) -> None:
        """Reachable unless a hook says otherwise: ``fail_next(methods=["check"])`` makes it
        raise (retryable: unreachable; not retryable: refused), ``block(methods=["check"])``
        hangs it. Raises :class:`SinkError`."""
        self._enter("check")

    def close(self) -> None:
        """Sets :attr:`closed`; the data stays readable."""
        self._enter("close")
        self.closed = True

    # --- internals --------------------------------------------------------------------------

    def _journal(self, call: str, ops: Sequence[Op], lsn: int | None = None) -> None:
        if self.journal is not None:
            line = {"call": call, "ops": [[o.view, o.key, o.version, o.doc is None] for o in ops], "lsn": lsn}
            with open(self.journal, "ab") as f:
                f.write(json.dumps(line).encode() + b"\n")

    def _enter(self, method: str) -> None:
        """Count the call, then apply the :meth:`slow`, :meth:`block` and :meth:`fail_next` hooks."""
        with self._lock:
            self.calls[method] += 1
            gate = self._gate if method in self._gate_methods else None
            timeout = self._gate_timeout
            delay = self._delay if method in self._delay_methods else 0.0
        if delay:
            time.sleep(delay)
        if gate is not None and not gate.is_set():
            self.waiting.set()
            if not gate.wait(timeout):
                raise SinkError(f"sink {self.name}: {method}: timed out after {timeout} s (blocked)")
        with self._lock:
            f = self._failure
            if f is not None and method in f.methods:
                f.left -= 1
                if f.left <= 0:
                    self._failure = None
                raise SinkError(f"sink {self.name}: {method}: {f.message}", retryable=f.retryable)

    def _target(self, view: str) -> ViewTarget:
        try:
            return self._targets[view]
        except KeyError:
            raise SinkError(f"sink {self.name}: view {view!r} is not registered", retryable=False) from None

    def _view(self, view: str) -> _View:
        v = self._views.get(view)
        if v is None:
            v = self._views[view] = _View()
        return v

    def _refusal(self, op: Op) -> str | None:
        error = self._rejected_keys.get((op.view, op.key))
        if error is None and self.reject is not None:
            error = self.reject(op)
        return error

    def _apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """The compare-and-set of :meth:`apply` (lock held): every view checked first, then
        full Ops and deletes in order, then partial Ops in version order."""
        for op in ops:
            self._target(op.view)
        rejected: list[Rejected] = []
        full = [op for op in ops if not (op.partial and op.doc is not None)]
        partial = sorted((op for op in ops if op.partial and op.doc is not None), key=lambda o: o.version)
        for op in (*full, *partial):
            error = self._refusal(op)
            if error is not None:
                rejected.append(Rejected(op, error))
                self.stats["rejected"] += 1
                continue
            v = self._view(op.view)
            cur = v.versions.get(op.key)
            if cur is not None and op.version < cur[0]:
                self.stats["skipped"] += 1
                continue
            if op.doc is None:
                v.records.pop(op.key, None)
                v.versions[op.key] = (op.version, True)
            elif op.partial:
                stored = v.records.get(op.key)
                if cur is None or cur[1] or stored is None:
                    self.stats["skipped"] += 1
                    self.stats["partial_missed"] += 1
                    continue
                stored.update(copy.deepcopy(op.doc))
                v.versions[op.key] = (op.version, False)
            else:
                v.records[op.key] = copy.deepcopy(op.doc)
                v.versions[op.key] = (op.version, False)
            self.stats["applied"] += 1
        return rejected

    def _advance(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        lost: list[str] = []
        for view in views:
            cur = self._checkpoints.get(view)
            if cur is None or cur < previous:
                lost.append(view)
            elif cur < lsn:
                self._checkpoints[view] = lsn
        return lost

    def _sweep(self, view: str, version: int) -> None:
        """Delete the records and version entries of ``view`` older than ``version``."""
        v = self._view(view)
        for key in [k for k, (ver, _) in v.versions.items() if ver < version]:
            del v.versions[key]
            v.records.pop(key, None)


if TYPE_CHECKING:
    def _implements(sink: MemorySink) -> tuple[Sink, AtomicCheckpoint, TruncatesBelow]:
        """Never called: mypy checks here that MemorySink implements these protocols."""
        return sink, sink, sink


@dataclass(frozen=True)
class MemorySinkOpener:
    """Opens a :class:`MemorySink` in another process (picklable): the test double of a lane
    that runs in a process of its own. Its writes are read back from ``journal``.

    Attributes:
        name: the sink's name.
        targets: the views to register.
        journal: see :class:`MemorySink`.
        checkpoints: view → checkpoint (int LSN) the sink starts with (what it acknowledged
            before; without one, a batch that moves checkpoints reports the view as lost).
        fail: the first ``fail`` write calls raise :class:`SinkError` (:meth:`MemorySink.fail_next`)
            with ``retryable``.
        slow: seconds every write call takes (:meth:`MemorySink.slow`).
        open_error: raise a non-retryable :class:`SinkError` with this text instead of opening.
    """

    name: str
    targets: tuple[ViewTarget, ...] = ()
    journal: str | None = None
    checkpoints: tuple[tuple[str, int], ...] = ()
    fail: int = 0
    retryable: bool = True
    slow: float = 0.0
    open_error: str | None = None

    def __call__(self) -> MemorySink:
        """The sink. Raises :class:`SinkError` (``open_error``)."""
        if self.open_error is not None:
            raise SinkError(f"sink {self.name}: {self.open_error}", retryable=False)
        sink = MemorySink(self.name, journal=self.journal)
        for target in self.targets:
            sink.register(target)
        for view, lsn in self.checkpoints:
            sink.write_checkpoint([view], lsn)
        if self.fail:
            sink.fail_next(self.fail, retryable=self.retryable)
        if self.slow:
            sink.slow(self.slow)
        return sink
