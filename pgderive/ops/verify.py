"""``pgderive verify VIEW [--repair]``: diff a view against a consistent snapshot of its source.

**The snapshot.** A TEMPORARY logical slot (``<slot>_verify_<pid>_<n>``, dropped with its
connection) is created with an exported snapshot: its consistent point X is an exact LSN; every
transaction that committed before X is visible in the snapshot, every one committing at or after
X is not (it is in the stream from X on). The expected records are what the view derives from
that snapshot through :func:`pgderive.runtime.bootstrap.derive_snapshot`, the derivation path bootstrap
and rebuild use. Creating a logical slot waits for the transactions running at that moment
(cluster-wide) to end, like ``rebuild``.

**The daemon.** If the daemon's slot is active, verify first waits (``wait`` seconds, default
60) until its ``confirmed_flush_lsn`` reaches X. The daemon confirms a position only after every
sink acknowledged every Op before it, so from then on every record the sink holds at a version
< X is the daemon's final word on commits before X. An inactive slot (daemon stopped) is
compared as is; if it is behind X, differences include changes the daemon has not applied yet,
and :attr:`ViewDiff.daemon_note` says so.

**The comparison is streamed.** For each snapshot chunk (5,000 rows) the sink's records for
exactly those keys are read in bulk (:meth:`sinks.base.Sink.get` with ``realtime=False``, on a
worker thread while the next chunk is read and derived) and compared with
:meth:`~sinks.base.Sink.stored_form` of the expected document; records that differ are read
again in realtime before they count. Then the sink's keys are scanned with their versions
(:meth:`~sinks.base.Sink.scan_keys`); a key the snapshot did not produce is a candidate *extra*,
confirmed by a realtime read. Memory: two or three chunks plus one 8-byte digest per expected
key (a Python ``set`` of ints, about 70 bytes per key: ~14 MB for 200k rows, ~70 MB for 1M),
never the documents of the whole view. Progress is logged every 5 s.

**Versions decide what counts.** Versions are commit LSNs (ARCHITECTURE.md, rule 1). A record whose
stored version is >= X was written for a commit at or after X, after the snapshot: it is not
compared ("newer, skipped"). A record whose version the sink does not know (OpenSearch returns
no version for a deleted document and forgets it after ``index.gc_deletes``, 60 s; a Redis key
without an entry in the version hash) is checked against the temporary slot's own change
stream, which starts exactly at X: if a change since X touched its key, it is newer too (see
:class:`_ChangesSince`). That stream is read only when such a record differs; it keeps one
digest per key changed since X.

**Repair, and why it is safe while the daemon runs.** ``repair=True`` writes, through
:meth:`~sinks.base.Sink.apply` in batches of 1,000, the expected document of each missing or
different record and a delete (Redis: a tombstone) of each extra one, all at version X - 1:

* X - 1 is the version the snapshot state really has: it is the state after every commit with
  commit LSN < X. X itself may be the commit LSN of a transaction that is *not* in the snapshot
  (a commit record right at the consistent point), and sinks re-apply equal versions, so a
  repair at X could overwrite that commit's write.
* A repair is only sent for a record verify saw at a version < X (or, without a known version,
  untouched since X according to the stream). Sinks apply it by compare-and-set: it lands only
  over a stored version <= X - 1. Anything the daemon writes for a commit after the snapshot
  carries a version >= X, so whichever order the two writes reach the sink in, the daemon's
  wins: applied later, it overwrites the repair; applied earlier, it turns the repair into a
  no-op (Redis keeps the newer version, OpenSearch answers 409, counted as success).
* A daemon that is behind (or restarts and replays from its confirmed position) later sends
  changes committed before X at versions < X - 1 over the repaired records: they are skipped,
  which is right, as the snapshot state already contains them.
* A delete after X whose version the sink forgot would let a repair resurrect the record; the
  change-stream check excludes exactly those keys. Between that check and the write, the
  delete's tombstone is seconds old (OpenSearch keeps it 60 s; Redis until a sweep).

The result is counted before repair; ``pgderive verify --repair`` verifies again afterwards.

Used by ``pgderive verify``, ``make demo`` and the tests (:func:`diff_view`).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import psycopg

from cdc.changes import Transaction
from cdc.lsn import format_lsn, parse_lsn
from cdc.slot import Keepalive, SlotReader, slot_info
from cdc.snapshot import snapshot_connection, snapshot_version
from sinks.base import Doc, Op, Refreshable, Sink
from views.check import build_views
from views.derive import View
from views.spec import Spec
from views.template import TemplateError

from ..runtime.bootstrap import derive_snapshot
from ..runtime.sinks import open_sinks

if TYPE_CHECKING:
    from rich.console import Group, RenderableType

__all__ = ["ViewDiff", "Example", "VerifyError", "verify_view", "diff_view", "render_diff",
           "EXAMPLES_PER_KIND"]

log = logging.getLogger("pgderive.verify")

# What Sink.get returns: key -> (stored doc or None, stored version or None).
_Stored = dict[str, tuple[Doc | None, int | None]]

EXAMPLES_PER_KIND = 5
_VALUE_WIDTH = 60          # characters of a value shown in an example
_FIELDS_SHOWN = 4          # differing fields shown per "different" example
_PENDING_MAX = 2000        # records of unknown version checked against the stream at once
_FIX_BATCH = 1000          # repair Ops per sink.apply call
_EXTRA_BATCH = 1000        # extra candidates confirmed per sink.get call
_PROGRESS_S = 5.0
_PREFETCH = 1              # chunks whose sink reads are in flight while one is compared
                           # (more does not help on 2 cores: source, sink and verify share them)
_slot_counter = itertools.count(1)


class VerifyError(RuntimeError):
    """Verification could not be completed (e.g. the change stream since the snapshot could
    not be read in time). Sink and source failures raise their own errors
    (:class:`~sinks.base.SinkError`, :class:`psycopg.Error`,
    :class:`~cdc.slot.ReplicationError`)."""


@dataclass(frozen=True)
class Example:
    """One example record of a kind of difference.

    Attributes:
        kind: ``missing`` (source has it, sink does not), ``extra`` (sink has it, source does
            not), ``different``, ``underivable`` (a source row the view cannot derive: a dead
            letter, not a mismatch) or ``refused`` (a repair write the sink refused).
        key: the sink key (``""`` for an underivable row).
        version: the sink's stored version (int LSN) when known.
        fields: for ``different``: ``(field, sink value, source value)`` of up to
            ``_FIELDS_SHOWN`` differing fields, values as truncated ``repr`` (``<absent>`` when
            the field is not there).
        note: free text (the error of an underivable row or a refused write; the extra
            record's document).
    """

    kind: str
    key: str
    version: int | None = None
    fields: tuple[tuple[str, str, str], ...] = ()
    note: str = ""

    def __str__(self) -> str:
        ver = f" (sink version {format_lsn(self.version)})" if self.version is not None else ""
        if self.kind == "different":
            parts = "; ".join(f"{f}: sink {a} != source {b}" for f, a, b in self.fields)
            return f"different {self.key}{ver}: {parts}"
        if self.kind == "underivable":
            return f"underivable row: {self.note}"
        if self.kind == "refused":
            return f"repair of {self.key} refused: {self.note}"
        if self.kind == "extra" and self.note:
            return f"extra {self.key}{ver}: {self.note}"
        return f"{self.kind} {self.key}{ver}"


@dataclass
class ViewDiff:
    """Result of verifying one view.

    Counts: ``source_rows`` (rows of the view's table in the snapshot), ``sink_records``
    (records the sink held: expected keys found plus other live keys), ``missing``, ``extra``,
    ``different`` (the mismatches), ``newer_skipped`` (records written after the snapshot, not
    compared), ``underivable`` (source rows the view cannot derive, e.g. a NULL key column:
    dead letters, not mismatches). ``examples``: one line per example (up to
    :data:`EXAMPLES_PER_KIND` per kind), ``details``: the same as :class:`Example`.
    ``snapshot_lsn``: X; ``elapsed_s``: wall seconds, ``waited_s`` of them waiting for the
    daemon; ``daemon_note``/``daemon_caught_up``:
    whether the daemon had applied everything up to X (None when no slot was given).
    ``repaired``/``refused``: repair writes the sink accepted / refused (``repair=True``).
    """

    view: str
    source_rows: int = 0
    sink_records: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    examples: list[str] = field(default_factory=list)
    newer_skipped: int = 0
    underivable: int = 0
    snapshot_lsn: int | None = None
    elapsed_s: float = 0.0
    waited_s: float = 0.0
    details: list[Example] = field(default_factory=list)
    daemon_note: str | None = None
    daemon_caught_up: bool | None = None
    repaired: int = 0
    refused: int = 0

    @property
    def mismatches(self) -> int:
        return self.missing + self.extra + self.different

    @property
    def equal(self) -> bool:
        return self.mismatches == 0

    @property
    def rows_per_second(self) -> float:
        """Source rows per second of comparison (the wait for the daemon excluded)."""
        secs = self.elapsed_s - self.waited_s
        return self.source_rows / secs if secs > 0 else 0.0

    def add_example(self, example: Example) -> None:
        """Keep ``example`` if fewer than :data:`EXAMPLES_PER_KIND` of its kind are kept."""
        if sum(1 for e in self.details if e.kind == example.kind) < EXAMPLES_PER_KIND:
            self.details.append(example)
            self.examples.append(str(example))


# What the extras pass remembers per expected key: Python's own 64-bit string hash (SipHash,
# keyed per process, cached on the str; ~20x cheaper than hashlib here). A collision would hide
# one extra key; with 64 bits and 10M keys its probability is below 1e-5.
_digest = hash


def _short(value: Any, width: int = _VALUE_WIDTH) -> str:
    text = "<absent>" if value is _ABSENT else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


_ABSENT = object()


def _field_diffs(stored: dict[str, Any], want: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    out = []
    for f in list(dict.fromkeys([*want, *stored])):
        a, b = stored.get(f, _ABSENT), want.get(f, _ABSENT)
        if a != b or type(a) is not type(b):
            out.append((f, _short(a), _short(b)))
            if len(out) >= _FIELDS_SHOWN:
                break
    return tuple(out)


def _temp_slot_name(base: str) -> str:
    suffix = f"_verify_{os.getpid()}_{next(_slot_counter)}"
    return base[: 63 - len(suffix)] + suffix


def _current_lsn(conn: psycopg.Connection) -> int:
    return parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]


def _wait_for_daemon(conn: psycopg.Connection, slot: str | None, x: int,
                     wait: float) -> tuple[str | None, bool | None]:
    """Wait up to ``wait`` seconds for an active ``slot`` to confirm X; returns
    ``(note for the output, caught up?)``."""
    if slot is None:
        return None, None
    t0 = time.monotonic()
    info = slot_info(conn, slot)
    if info is None:
        return (f"slot {slot} does not exist (the daemon has not bootstrapped): the sink is "
                "compared as is"), False
    if not info.active:
        c = info.confirmed_flush_lsn or 0
        if c >= x:
            return f"daemon not running; slot {slot} confirmed {format_lsn(c)} (>= snapshot)", True
        return (f"daemon not running: slot {slot} confirmed {format_lsn(c)}, {x - c} bytes before the "
                "snapshot: differences may be changes the daemon has not applied yet"), False
    log.info("waiting up to %.0f s for the daemon (slot %s, pid %s) to confirm %s", wait, slot,
             info.active_pid, format_lsn(x))
    while True:
        c = info.confirmed_flush_lsn or 0
        if c >= x:
            return (f"daemon running (pid {info.active_pid}), caught up with the snapshot "
                    f"(confirmed {format_lsn(c)} after {time.monotonic() - t0:.1f} s)"), True
        if time.monotonic() - t0 >= wait:
            return (f"daemon running (pid {info.active_pid}) but still behind after {wait:.0f} s: "
                    f"confirmed {format_lsn(c)}, {x - c} bytes before the snapshot: differences "
                    "may be changes it has not applied yet"), False
        time.sleep(0.2)
        info = slot_info(conn, slot)
        if info is None:
            return f"slot {slot} vanished while waiting for it: the sink is compared as is", False


class _ChangesSince:
    """Keys of one view touched by commits at or after X, read lazily from the temporary slot
    that gave the snapshot (wal2json ``add-tables`` = the view's tables only).

    For a single-table view the keys are rendered from each change's new row and old replica
    identity (no derivation code runs). For a query-derived view (``include``, ``group_by``)
    a change of a related table can touch any record, so any change of its tables since X
    counts as touching every key, as does a TRUNCATE: conservative (such records are skipped,
    never reported or repaired wrongly).

    Started on first use; afterwards :meth:`poll` must be called regularly (it also sends the
    standby status updates that keep the walsender from timing out)."""

    def __init__(self, reader: SlotReader, view: View) -> None:
        self.reader, self.view = reader, view
        self.tables = _view_tables(view)
        self.per_key = view.tree is None
        self.keys: set[int] = set()
        self.everything = False  # a TRUNCATE, or any change of a query-derived view's tables
        self.started = False

    def touched(self, key: str) -> bool:
        return self.everything or _digest(key) in self.keys

    def pump(self, target: int, timeout: float = 60.0) -> None:
        """Read the stream until the server has sent everything before ``target`` (int LSN).
        Raises :class:`VerifyError` after ``timeout`` seconds."""
        if not self.started:
            self.reader.start(0)  # from the slot's consistent point X
            self.started = True
        deadline = time.monotonic() + timeout
        while self.reader.received_lsn < target:
            if time.monotonic() > deadline:
                raise VerifyError(f"could not read the changes since the snapshot up to {format_lsn(target)} "
                                  f"within {timeout:.0f} s (at {format_lsn(self.reader.received_lsn)})")
            self._consume(self.reader.read(max_wait=0.5))

    def poll(self) -> None:
        if self.started:
            self._consume(self.reader.read(max_wait=0))

    def _consume(self, events: Iterable[Transaction | Keepalive]) -> None:
        for ev in events:
            if not isinstance(ev, Transaction):
                continue
            for ch in ev.changes:
                if ch.table not in self.tables:
                    continue
                if ch.kind == "truncate" or not self.per_key:
                    self.everything = True
                    continue
                for row in (ch.new, {**(ch.new or {}), **ch.old_key} if ch.old_key else None):
                    if row:
                        try:
                            self.keys.add(_digest(self.view.key.render(row)))
                        except TemplateError:  # a NULL key column: no record to touch
                            pass


def _view_tables(view: View) -> frozenset[str]:
    """Every table a view's records depend on (the root table, plus included ones)."""
    return view.tables


class _Verifier:
    """One verification pass of one view (see the module docstring)."""

    def __init__(self, view: View, sink: Sink, x: int, result: ViewDiff, changes: _ChangesSince,
                 aux: psycopg.Connection, repair: bool) -> None:
        self.view, self.sink, self.x, self.result = view, sink, x, result
        self.changes, self.aux, self.repair = changes, aux, repair
        self.version = snapshot_version(x)  # X - 1: see the module docstring
        self.expected: set[int] = set()
        self.pending: list[tuple[str, Op, dict[str, Any] | None, dict[str, Any]]] = []
        self.fixes: list[Op] = []
        self.extras_seen: set[int] = set()
        self.t0 = self.last_log = time.monotonic()

    # -- the pass ----------------------------------------------------------------------------
    def run(self, conn: psycopg.Connection, chunk_rows: int) -> None:
        name = self.view.name
        r = self.result
        self._refresh()  # every write before X is acknowledged by now: make it visible
        # Prefetch: the sink reads the keys of the last _PREFETCH chunks while the oldest is
        # compared and the next one is read from the source.
        with ThreadPoolExecutor(max_workers=_PREFETCH, thread_name_prefix="pgderive-verify") as pool:
            inflight: deque[tuple[list[Op], Future[_Stored]]] = deque()
            for chunk in derive_snapshot(conn, [self.view], self.version, chunk_rows=chunk_rows):
                ops = chunk.ops.get(name, [])
                for e in chunk.errors.get(name, []):
                    r.underivable += 1
                    r.add_example(Example("underivable", "", note=f"{e.reason}; row {_short(e.row, 120)}"))
                inflight.append((ops, pool.submit(self.sink.get, name, [op.key for op in ops],
                                                  realtime=False)))
                if len(inflight) > _PREFETCH:
                    self._check(*inflight.popleft())
                r.source_rows += chunk.rows
                self._progress("compared", r.source_rows, "source rows")
            while inflight:
                self._check(*inflight.popleft())
        self._resolve_pending(force=True)
        self._flush_fixes(force=True)
        self._extras()
        self._flush_fixes(force=True)

    def _check(self, ops: list[Op], fut: Future[_Stored]) -> None:
        got = fut.result()
        r, name = self.result, self.view.name
        stored_form, expected_add = self.sink.stored_form, self.expected.add
        suspects: list[tuple[Op, dict[str, Any]]] = []
        for op in ops:
            expected_add(_digest(op.key))
            doc, ver = got.get(op.key, (None, None))
            if doc is not None:
                r.sink_records += 1
            want = stored_form(name, op.doc or {})
            if doc != want and (ver is None or ver < self.x):
                suspects.append((op, want))
        if suspects:
            # The bulk read may lag (OpenSearch: up to the last refresh): re-read what differs.
            again = self.sink.get(name, [op.key for op, _ in suspects])
            for op, want in suspects:
                doc, ver = again.get(op.key, (None, None))
                if ver is not None and ver >= self.x:
                    r.newer_skipped += 1
                    continue
                if doc is None:
                    kind = "missing"
                elif doc != want:
                    kind = "different"
                else:
                    continue
                if ver is None:  # no version to tell whether it changed after X: ask the stream
                    self.pending.append((kind, op, doc, want))
                else:
                    self._mismatch(kind, op, doc, want, ver)
        self._resolve_pending()
        self._flush_fixes()
        self.changes.poll()

    def _resolve_pending(self, force: bool = False) -> None:
        if not self.pending or (not force and len(self.pending) < _PENDING_MAX):
            return
        # Everything the sink could hold when it was read was committed before this LSN.
        self.changes.pump(_current_lsn(self.aux))
        for kind, op, doc, want in self.pending:
            if self.changes.touched(op.key):
                self.result.newer_skipped += 1
            else:
                self._mismatch(kind, op, doc, want, None)
        self.pending.clear()

    def _mismatch(self, kind: str, op: Op, doc: dict[str, Any] | None, want: dict[str, Any],
                  version: int | None) -> None:
        r = self.result
        if kind == "missing":
            r.missing += 1
            r.add_example(Example("missing", op.key, version))
        else:
            r.different += 1
            r.add_example(Example("different", op.key, version, _field_diffs(doc or {}, want)))
        if self.repair:
            self.fixes.append(op)  # the expected upsert, already at version X - 1

    def _extras(self) -> None:
        r, x = self.result, self.x
        self._refresh()
        candidates: list[str] = []
        scanned = 0
        for key, ver in self.sink.scan_keys(self.view.name):
            scanned += 1
            if _digest(key) in self.expected:
                continue
            if ver is not None and ver >= x:
                r.newer_skipped += 1
                r.sink_records += 1
                continue
            candidates.append(key)
            if len(candidates) >= _EXTRA_BATCH:
                self._check_extras(candidates)
                candidates = []
            if scanned % 5000 == 0:
                self.changes.poll()
                self._progress("scanned", scanned, "sink keys")
        if candidates:
            self._check_extras(candidates)

    def _check_extras(self, keys: list[str]) -> None:
        """Confirm extra candidates with a realtime read (the scan may be stale)."""
        r = self.result
        got = self.sink.get(self.view.name, keys)
        for key in keys:
            doc, ver = got.get(key, (None, None))
            if doc is None:  # deleted since the scan, or a version entry without record
                continue
            d = _digest(key)
            if d in self.extras_seen:  # a scan may yield a key twice
                continue
            self.extras_seen.add(d)
            r.sink_records += 1
            if ver is not None and ver >= self.x:
                r.newer_skipped += 1
                continue
            r.extra += 1
            r.add_example(Example("extra", key, ver, note=_short(doc, 100)))
            if self.repair:
                self.fixes.append(Op(self.view.name, key, self.version, None))
        self._flush_fixes()

    def _refresh(self) -> None:
        """OpenSearch: make every acknowledged write visible to searches and scans."""
        if isinstance(self.sink, Refreshable):
            self.sink.refresh(self.view.name)

    def _flush_fixes(self, force: bool = False) -> None:
        if not self.fixes or (not force and len(self.fixes) < _FIX_BATCH):
            return
        rejected = self.sink.apply(self.fixes)
        self.result.repaired += len(self.fixes) - len(rejected)
        self.result.refused += len(rejected)
        for rej in rejected:
            self.result.add_example(Example("refused", rej.op.key, note=_short(rej.error, 200)))
        self.fixes = []

    def _progress(self, verb: str, n: int, what: str) -> None:
        now = time.monotonic()
        if now - self.last_log >= _PROGRESS_S:
            self.last_log = now
            log.info("verify %s: %s %d %s (%.0f/s), %d mismatch(es) so far", self.view.name, verb, n,
                     what, n / (now - self.t0), self.result.mismatches + len(self.pending))


def verify_view(dsn: str, view: View, sink: Sink, *, slot: str | None = None, wait: float = 60.0,
                repair: bool = False, chunk_rows: int = 5000) -> ViewDiff:
    """Verify ``view`` in ``sink`` against a snapshot of the source at ``dsn`` at an exact LSN.

    Args:
        dsn: libpq DSN of the source (needs the REPLICATION privilege: it creates a temporary
            logical slot, dropped when done).
        view: the bound view; ``sink``: its sink, with the view registered.
        slot: the daemon's slot: when active, wait until it confirmed the snapshot's LSN
            before comparing (see the module docstring); None: compare as is.
        wait: seconds to wait for the daemon (>= 0).
        repair: write the fixes at version X - 1 (safe while the daemon runs, see above).
        chunk_rows: source rows per chunk (memory holds about two chunks).

    Returns the :class:`ViewDiff` (its counts are those found *before* any repair). Raises
    :class:`~sinks.base.SinkError`, :class:`psycopg.Error`,
    :class:`~cdc.slot.ReplicationError`, :class:`VerifyError`.
    """
    t0 = time.monotonic()
    result = ViewDiff(view.name)
    reader = SlotReader(dsn, _temp_slot_name(slot or "pgderive"), tables=sorted(_view_tables(view)),
                        status_interval=5.0)
    try:
        reader.connect()
        x, snapshot = reader.create_slot(temporary=True)
        result.snapshot_lsn = x
        with snapshot_connection(dsn, snapshot) as conn, \
                psycopg.connect(dsn, autocommit=True, application_name="pgderive-verify") as aux:
            # The snapshot is imported: the replication connection is free for the stream.
            t_wait = time.monotonic()
            result.daemon_note, result.daemon_caught_up = _wait_for_daemon(aux, slot, x, wait)
            result.waited_s = time.monotonic() - t_wait
            if result.daemon_note:
                log.info("verify %s: %s", view.name, result.daemon_note)
            log.info("verify %s against a snapshot at %s%s", view.name, format_lsn(x),
                     " (repairing)" if repair else "")
            _Verifier(view, sink, x, result, _ChangesSince(reader, view), aux, repair).run(conn, chunk_rows)
    finally:
        reader.close()
    result.elapsed_s = time.monotonic() - t0
    log.info("verify %s: %d source rows, %d sink records, %d missing, %d extra, %d different, "
             "%d newer (skipped) in %.1f s (%.0f rows/s)", view.name, result.source_rows,
             result.sink_records, result.missing, result.extra, result.different,
             result.newer_skipped, result.elapsed_s, result.rows_per_second)
    return result


def diff_view(dsn: str, view: View, sink: Sink) -> ViewDiff:
    """Compare ``view`` in ``sink`` with the source at ``dsn`` right now (no daemon wait, no
    repair): :func:`verify_view` with ``slot=None``. Rows the view cannot derive are counted in
    :attr:`ViewDiff.underivable` (not mismatches)."""
    return verify_view(dsn, view, sink)


def verify(spec: Spec, name: str, *, wait: float = 60.0, repair: bool = False) -> tuple[ViewDiff, ViewDiff | None]:
    """``pgderive verify``: verify view ``name`` of ``spec`` (a :class:`~views.spec.Spec`),
    repair it if asked and there is something to repair, then verify again.

    Returns ``(first result, second result or None)``. Raises :class:`KeyError` for an unknown
    view, :class:`~views.spec.SpecError` for YAML/source problems, and what
    :func:`verify_view` raises.
    """

    if name not in spec.views:
        raise KeyError(name)
    dsn = spec.source.conninfo(statement_timeout=False)  # snapshot reads last as long as they need
    with psycopg.connect(dsn, autocommit=True) as conn:
        views = build_views(spec, conn, [name])
    sinks = open_sinks(spec, views)
    try:
        v = views[0]
        first = verify_view(dsn, v, sinks[v.sink], slot=spec.source.slot, wait=wait,
                            repair=repair)
        second = None
        if repair and first.mismatches:
            second = verify_view(dsn, v, sinks[v.sink], slot=spec.source.slot, wait=wait)
        return first, second
    finally:
        for s in sinks.values():
            s.close()


def render_diff(diff: ViewDiff, sink: str | None = None) -> Group:
    """A rich renderable of ``diff`` for the terminal (see ``pgderive verify``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(f"view {diff.view}", style="bold")
    if sink:
        head.append(f" (sink {sink})")
    if diff.snapshot_lsn is not None:
        head.append(f", snapshot at {format_lsn(diff.snapshot_lsn)}")
    head.append(f", {diff.elapsed_s:.1f} s ({diff.rows_per_second:,.0f} rows/s)")
    parts: list[RenderableType] = [head]
    if diff.daemon_note:
        parts.append(Text(diff.daemon_note, style="" if diff.daemon_caught_up else "yellow"))
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(justify="left")
    t.add_column(justify="right")

    def bad(n: int) -> str:
        return "red" if n else "green"

    t.add_row("source rows", f"{diff.source_rows:,}")
    t.add_row("sink records", f"{diff.sink_records:,}")
    t.add_row("missing", Text(f"{diff.missing:,}", style=bad(diff.missing)))
    t.add_row("extra", Text(f"{diff.extra:,}", style=bad(diff.extra)))
    t.add_row("different", Text(f"{diff.different:,}", style=bad(diff.different)))
    t.add_row("newer than the snapshot (skipped)", f"{diff.newer_skipped:,}")
    if diff.underivable:
        t.add_row("rows the view cannot derive (dead letters)", Text(f"{diff.underivable:,}", style="yellow"))
    parts.append(t)
    if diff.details:
        ex = Table(title="examples", title_justify="left", show_header=True, box=None, padding=(0, 2))
        ex.add_column("kind")
        ex.add_column("key", overflow="fold")
        ex.add_column("detail", overflow="fold")
        for e in diff.details:
            if e.kind == "different":
                detail = "\n".join(f"{f}: sink {a} ≠ source {b}" for f, a, b in e.fields)
            else:
                detail = e.note
            if e.version is not None:
                detail = (detail + "\n" if detail else "") + f"sink version {format_lsn(e.version)}"
            ex.add_row(Text(e.kind), Text(e.key or "-"), Text(detail))
        parts.append(ex)
    if diff.equal:
        parts.append(Text("EQUAL", style="bold green"))
    else:
        parts.append(Text(f"NOT EQUAL: {diff.mismatches:,} mismatch(es)", style="bold red"))
    return Group(*parts)
