"""``pgderive explain VIEW KEY``: where one record of a sink comes from, and whether it is right
(ARCHITECTURE.md, "Explain").

For one key of one view it gathers:

1. **The record** as the sink stores it and its version (the commit LSN that last wrote it,
   rule 1), with that commit's xid and commit time from ``pgderive.commits``
   (:class:`~pgderive.state.provenance.CommitStore`). A version that table does not know is a
   snapshot load when it equals the slot's bootstrap consistent point
   (``pgderive.slot_state``) or an online rebuild's consistent point - 1 (``pgderive.rebuilds``,
   :func:`cdc.snapshot.snapshot_version`); else it is "not recorded".
2. **The source rows** it is derived from (:mod:`pgderive.ops.explain_source`): the root row
   (with its ``xmin`` and, where Postgres tracks it, that transaction's commit time), every
   included row by include path, or an aggregate's group with its contributions in
   ``pgderive.agg_rows``. A column the YAML's ``classification`` tags shows
   ``<classified: TAGS>`` instead of its value (:func:`mask_classified`).
3. **The definition and generation**: the view's fingerprint as the sink's data was completed
   under (``pgderive.slot_state``), as registered (``pgderive.views``) and as the YAML says now;
   the OpenSearch index behind the alias holding the document (:class:`~sinks.base.Locates`),
   or for Redis the note that generations share one set of keys.
4. **A one-record verify** (:func:`settle`): the expected record, derived from one snapshot of
   the source taken at WAL position S (``pg_current_wal_flush_lsn()`` in that snapshot), compared
   with the stored one (:meth:`~sinks.base.Sink.stored_form`). When they differ, it waits up to
   ``wait`` seconds for the daemon's slot to confirm S (every commit in the snapshot then
   reached the sink, rule 3) and reads the sink again. A difference is reported only when it
   held in two consecutive rounds, each after the daemon confirmed that round's S, with the
   record unchanged in the sink meanwhile: a commit whose record was written just before S but
   was not yet visible to the snapshot cannot make a correct record look wrong. When the daemon
   does not reach S in time, or the record keeps changing until the deadline, the verdict is
   ``pending``: newer commits not applied yet.

Verdicts (:attr:`Verdict.status`) and exit codes: ``equal`` (0), ``absent`` (neither the sink
nor the source has a record for the key, 0), ``different``, ``missing`` (the source derives a
record the sink lacks), ``extra`` (the sink has a record the source does not derive) and
``pending`` (1). Usage errors (:class:`ExplainUsageError`: unknown view, a key that does not fit
the key template) are exit code 2.

Read-only: nothing is written to the source or a sink (sinks are opened without their claim
step). :func:`explanation_document` is the ``--json`` and ``/explain`` shape.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import psycopg

from cdc.lsn import format_lsn
from cdc.slot import slot_info
from cdc.snapshot import snapshot_version
from sinks.base import Doc, Locates, Sink
from views.check import build_views
from views.derive import View, view_fingerprint
from views.keys import KeyMismatch, parse_key
from views.spec import Spec

from ..runtime.sinks import open_sinks
from ..state.deadletters import DeadLetterRecord, DeadLetterStore
from ..state.provenance import Commit, CommitStore
from ..state.rebuilds import RebuildStore
from ..state.registry import ViewRegistry
from ..state.slots import StateStore
from .explain_source import SourceRead, SourceRow, read_source

__all__ = ["Explanation", "Verdict", "FieldDiff", "Stored", "ExplainUsageError", "UnknownView", "BadKey",
           "explain", "explain_view", "settle", "explanation_document", "field_diffs", "mask_classified",
           "classified_marker", "DOCUMENT_VERSION", "DEFAULT_WAIT"]

#: ``version`` of :func:`explanation_document`'s shape; raised when a key changes meaning.
DOCUMENT_VERSION = 1
#: Seconds to wait for the daemon by default (``--wait``).
DEFAULT_WAIT = 10.0
_POLL_S = 0.1

EXIT_CODES = {"equal": 0, "absent": 0, "different": 1, "missing": 1, "extra": 1, "pending": 1}


class ExplainUsageError(ValueError):
    """The request cannot name a record (exit code 2; HTTP 400): a view kept in several sinks
    named without ``@SINK``, or :class:`BadKey`, or :class:`UnknownView`."""

    http_status = 400


class UnknownView(ExplainUsageError):
    """No view of that name in the spec (HTTP 404)."""

    http_status = 404


class BadKey(ExplainUsageError):
    """The key does not fit the view's key template (:class:`views.keys.KeyMismatch`)."""


@dataclass(frozen=True)
class Stored:
    """The sink's side of a key: ``doc`` (in :meth:`~sinks.base.Sink.get`'s form, None when
    there is no record) and ``version`` (int LSN; a Redis tombstone has a version and no doc;
    None when the sink keeps none)."""

    doc: Doc | None
    version: int | None


@dataclass(frozen=True)
class FieldDiff:
    """One field that differs: ``sink`` and ``source`` values (JSON values, stored form);
    ``absent`` names the side without the field (``"sink"``/``"source"``) or is None."""

    field: str
    sink: object
    source: object
    absent: str | None = None


@dataclass
class Verdict:
    """The one-record verify.

    Attributes:
        status: ``equal``, ``absent``, ``different``, ``missing``, ``extra`` or ``pending``.
        snapshot_lsn: S of the last round (int LSN).
        confirmed_lsn: the daemon slot's ``confirmed_flush_lsn`` when last read (None: not read,
            or no slot).
        expected: the expected record in the sink's stored form (None: none expected).
        differences: the differing fields (``different`` only).
        rounds: comparisons made; waited_s: seconds spent waiting for the daemon.
        note: one line saying why (e.g. ``newer commits not applied yet (…)``).
    """

    status: str
    snapshot_lsn: int
    confirmed_lsn: int | None = None
    expected: Doc | None = None
    differences: list[FieldDiff] = field(default_factory=list)
    rounds: int = 1
    waited_s: float = 0.0
    note: str = ""

    @property
    def exit_code(self) -> int:
        """0 for ``equal``/``absent``, else 1."""
        return EXIT_CODES[self.status]


@dataclass
class Explanation:
    """Everything ``pgderive explain`` says of one key (see the module docstring).

    Attributes:
        view, key: as asked (``view`` the internal name, e.g. ``card@search``).
        sink, sink_type: the view's sink and its type (``redis``, ``opensearch``).
        table: the view's root table; shape: ``plain``, ``where``, ``derive``, ``include`` or
            ``aggregate``.
        stored: the record as stored (the last round's read).
        commit: the commit at the record's version from ``pgderive.commits``, or None.
        origin: ``stream``, ``bootstrap``, ``rebuild``, ``unknown``, or None without a version.
        origin_note: one line on the version's origin.
        source: the last round's :class:`~pgderive.ops.explain_source.SourceRead`.
        fingerprint: the YAML's definition now (:func:`views.derive.view_fingerprint`);
        written_fingerprint: the one the sink's data was completed under (``slot_state``);
        registered_fingerprint, registry_status: ``pgderive.views``' row (None: no row).
        generation: the OpenSearch index holding the record, None otherwise;
        generation_note: one line on the generation.
        dead_letters: the key's open dead letters in ``pgderive.dead_letters``, newest first
            (at most 5): why a record may be missing or old.
        verdict: the one-record verify.
    """

    view: str
    key: str
    sink: str
    sink_type: str
    table: str
    shape: str
    stored: Stored
    source: SourceRead
    verdict: Verdict
    commit: Commit | None = None
    origin: str | None = None
    origin_note: str = ""
    fingerprint: str = ""
    written_fingerprint: str | None = None
    registered_fingerprint: str | None = None
    registry_status: str | None = None
    generation: str | None = None
    generation_note: str = ""
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code


_ABSENT = object()


def field_diffs(stored: Doc, want: Doc) -> list[FieldDiff]:
    """The fields of ``stored`` and ``want`` (both in the sink's stored form) that differ, in
    ``want``'s order then ``stored``'s extra ones; a value of another type differs."""
    out = []
    for f in dict.fromkeys([*want, *stored]):
        a, b = stored.get(f, _ABSENT), want.get(f, _ABSENT)
        if a is _ABSENT or b is _ABSENT or a != b or type(a) is not type(b):
            out.append(FieldDiff(f, None if a is _ABSENT else a, None if b is _ABSENT else b,
                                 "sink" if a is _ABSENT else "source" if b is _ABSENT else None))
    return out


def _shape(view: View) -> str:
    if view.aggregation is not None:
        return "aggregate"
    if view.tree is not None:
        return "include"
    if view.spec.derive:
        return "derive"
    return "where" if view.where is not None else "plain"


def _read_stored(sink: Sink, view: str, key: str) -> Stored:
    doc, version = sink.get(view, [key]).get(key, (None, None))
    return Stored(doc, version)


def _compare(stored: Stored, want: Doc | None) -> str:
    if stored.doc is None and want is None:
        return "absent"
    if stored.doc == want:
        return "equal"
    if stored.doc is None:
        return "missing"
    return "extra" if want is None else "different"


def _confirmed(conn: psycopg.Connection, slot: str, target: int, deadline: float) -> tuple[int | None, str]:
    """Wait until ``slot`` confirms ``target`` or ``deadline`` (monotonic) passes; returns
    ``(confirmed LSN or None, why it is not past target: "" when it is)``."""
    while True:
        info = slot_info(conn, slot)
        if info is None:
            return None, f"slot {slot} does not exist (no daemon has bootstrapped it)"
        c = info.confirmed_flush_lsn
        if c is not None and c >= target:
            return c, ""
        if not info.active:
            return c, (f"newer commits not applied yet (slot {slot} confirmed {format_lsn(c or 0)}, "
                       f"source at {format_lsn(target)}; the daemon is not running)")
        if time.monotonic() >= deadline:
            return c, (f"newer commits not applied yet (slot confirmed {format_lsn(c or 0)}, "
                       f"source at {format_lsn(target)})")
        time.sleep(_POLL_S)


def settle(read_source_now: Callable[[], SourceRead], read_stored: Callable[[], Stored],
           stored_form: Callable[[Doc], Doc], confirmed: Callable[[int, float], tuple[int | None, str]],
           wait: float) -> tuple[SourceRead, Stored, Verdict]:
    """The one-record verify (module docstring, step 4) over injected reads, so it can be
    tested without services.

    Args:
        read_source_now: a new snapshot of the source (its ``lsn`` is S).
        read_stored: the sink's record now.
        stored_form: a document as the sink would store it.
        confirmed: ``(S, deadline)`` → ``(slot's confirmed LSN, reason it is not past S or "")``,
            waiting until it is or the deadline (``time.monotonic()``) passes.
        wait: seconds to wait at most for the daemon over all rounds.

    Returns the last round's source read, sink read and the :class:`Verdict`.
    """
    t0 = time.monotonic()
    deadline = t0 + wait
    waited = 0.0
    last: tuple[object, ...] | None = None
    rounds = 0
    while True:
        rounds += 1
        src = read_source_now()
        want = None if src.expected is None else stored_form(src.expected)
        stored = read_stored()
        status = _compare(stored, want)
        if status in ("equal", "absent"):
            return src, stored, Verdict(status, src.lsn, None, want, rounds=rounds, waited_s=waited)
        t = time.monotonic()
        c, why = confirmed(src.lsn, deadline)
        waited += time.monotonic() - t
        if why:
            return src, stored, Verdict("pending", src.lsn, c, want, rounds=rounds, waited_s=waited, note=why)
        again = read_stored()
        status = _compare(again, want)
        if status in ("equal", "absent"):
            return src, again, Verdict(status, src.lsn, c, want, rounds=rounds, waited_s=waited)
        if again == stored:  # the daemon passed S and the record did not move meanwhile
            seen = (again.doc, again.version, want)
            if seen == last:
                diffs = field_diffs(again.doc or {}, want or {}) if status == "different" else []
                note = {"different": "the record differs from what the view derives from the source",
                        "missing": "the source derives a record the sink does not hold",
                        "extra": "the sink holds a record the source does not derive"}[status]
                return src, again, Verdict(status, src.lsn, c, want, diffs, rounds, waited,
                                           note + f" (daemon confirmed {format_lsn(c or 0)} >= source "
                                                  f"{format_lsn(src.lsn)})")
            last = seen
        else:
            last = None
        if time.monotonic() >= deadline and rounds >= 2:
            return src, again, Verdict("pending", src.lsn, c, want, rounds=rounds, waited_s=waited,
                                       note="newer commits not applied yet: the record kept changing while it "
                                            f"was compared ({rounds} rounds, last source at {format_lsn(src.lsn)})")


def classified_marker(tags: Sequence[str]) -> str:
    """What ``pgderive explain`` shows instead of a classified column's source value."""
    return f"<classified: {', '.join(tags)}>"


def mask_classified(rows: Sequence[SourceRow], classification: Mapping[str, Sequence[str]]) -> list[SourceRow]:
    """``rows`` with the value of every column ``classification`` tags (``schema.table.column``
    → tags, the YAML's ``classification:``) replaced by :func:`classified_marker`: explain
    prints source values a sink never received (a ``where`` or join column, a column of a row
    the sink does not allow), and serves them on ``/explain``, so a classified one is never
    shown. The record and the expected record are what the sink holds (or would hold) and stay
    as they are."""
    if not classification:
        return list(rows)
    out = []
    for r in rows:
        values = {c: (classified_marker(classification[f"{r.table}.{c}"]) if f"{r.table}.{c}" in classification
                      else v) for c, v in r.values.items()}
        out.append(replace(r, values=values) if values != r.values else r)
    return out


def _origin(version: int | None, commit: Commit | None, bootstrap: int | None,
            rebuild: int | None, unrecorded: str = "older than provenance retention, or provenance off",
            batched: bool = False) -> tuple[str | None, str]:
    if version is None:
        return None, "the sink keeps no version for this key"
    if commit is not None:
        note = (f"written by the stream for transaction {commit.xid}, committed "
                f"{commit.committed_at.isoformat()} at {format_lsn(version)}")
        if batched:
            note += ("; an include or aggregate record is re-read per batch and carries the batch's newest "
                     "commit of the view, which need not have changed one of its rows")
        return "stream", note
    if bootstrap is not None and version == bootstrap:
        return "bootstrap", f"a snapshot load: the bootstrap at the slot's consistent point {format_lsn(version)}"
    if rebuild is not None and version == snapshot_version(rebuild):
        return "rebuild", (f"a snapshot load: the online rebuild at {format_lsn(rebuild)} "
                           f"(loaded at {format_lsn(version)} = consistent point - 1)")
    return "unknown", f"not recorded ({unrecorded})"


def _unrecorded(spec: Spec) -> str:
    """Why a streamed version may have no commit in ``pgderive.commits``, given the YAML's
    ``provenance`` (ARCHITECTURE.md, "Provenance")."""
    p = spec.provenance
    if not p.enabled:
        return "provenance is off in this configuration"
    return (f"older than the provenance retention ({p.retention}), or written while provenance was off; "
            "or a snapshot load pgderive keeps no record of: an offline rebuild, verify --repair")


def explain_view(spec: Spec, view: View, sink: Sink, key: str, *, wait: float = DEFAULT_WAIT) -> Explanation:
    """Explain ``key`` of the bound ``view`` in its open ``sink`` (see the module docstring).

    Raises :class:`BadKey`, :class:`psycopg.Error` and :class:`~sinks.base.SinkError`."""
    dsn, slot = spec.source.conninfo(), spec.source.slot
    try:
        candidates = parse_key(view.key, key, view.info.columns)
    except KeyMismatch as e:
        raise BadKey(f"view {view.name}: {e}") from None
    with psycopg.connect(dsn, autocommit=True, application_name="pgderive-explain") as aux:
        def source() -> SourceRead:
            try:
                return read_source(dsn, view, key, candidates)
            except KeyMismatch as e:
                raise BadKey(f"view {view.name}: {e}") from None
        src, stored, verdict = settle(source, lambda: _read_stored(sink, view.name, key),
                                      lambda doc: sink.stored_form(view.name, doc),
                                      lambda target, deadline: _confirmed(aux, slot, target, deadline), wait)
    src.rows = mask_classified(src.rows, spec.classification)
    out = Explanation(view.name, key, view.sink, spec.sinks[view.sink].type, view.table, _shape(view), stored, src, verdict,
                      fingerprint=view_fingerprint(view))
    commits = CommitStore(dsn)
    try:
        out.commit = commits.lookup(slot, [stored.version]).get(stored.version) if stored.version else None
    finally:
        commits.close()
    state = StateStore(dsn).get(slot)
    rebuilds = RebuildStore(dsn)
    try:
        rebuild = rebuilds.get(slot, view.name)
    finally:
        rebuilds.close()
    out.origin, out.origin_note = _origin(stored.version, out.commit,
                                          state.consistent_point if state is not None else None,
                                          rebuild.consistent_point if rebuild is not None else None,
                                          _unrecorded(spec), batched=view.tree is not None)
    if state is not None:
        fp = state.views.get(view.name)
        out.written_fingerprint = fp if isinstance(fp, str) else None
    with DeadLetterStore(dsn) as letters:
        out.dead_letters = letters.of_key(slot, view.name, key)
    entry = ViewRegistry(dsn).get(slot, view.name)
    if entry is not None:
        out.registered_fingerprint, out.registry_status = entry.fingerprint, entry.status
    if isinstance(sink, Locates):
        out.generation = sink.locate(view.name, [key]).get(key)
        out.generation_note = (f"index {out.generation} behind alias {view.target.index}" if out.generation
                               else f"no document behind alias {view.target.index}")
    else:
        out.generation_note = ("records are shared by generations (one set of keys); a generation is the "
                               "records written at or after its version"
                               + (f"; this record's version is {format_lsn(stored.version)}"
                                  if stored.version is not None else ""))
    return out


def explain(spec: Spec, name: str, key: str, *, wait: float = DEFAULT_WAIT) -> Explanation:
    """``pgderive explain``: explain ``key`` of view ``name`` (a declared name, or ``NAME@SINK``
    for one copy of a view kept in several sinks).

    Raises :class:`UnknownView`, :class:`ExplainUsageError` (a view in several sinks named
    without ``@SINK``), :class:`BadKey`, :class:`~views.spec.SpecError` (YAML/source problems),
    :class:`psycopg.Error` and :class:`~sinks.base.SinkError`."""
    names = spec.resolve(name)
    if not names:
        raise UnknownView(f"unknown view {name!r}; views: {', '.join(spec.groups)}")
    if len(names) > 1:
        raise ExplainUsageError(f"view {name} is kept in several sinks: name one copy ({', '.join(names)})")
    with psycopg.connect(spec.source.conninfo(), autocommit=True) as conn:
        view = build_views(spec, conn, names)[0]
    sinks = open_sinks(spec, [view], prepare=False)
    try:
        return explain_view(spec, view, sinks[view.sink], key, wait=wait)
    finally:
        for s in sinks.values():
            s.close()


def _lsn(v: int | None) -> str | None:
    return None if v is None else format_lsn(v)


def _time(v: dt.datetime | None) -> str | None:
    return None if v is None else v.isoformat()


def explanation_document(e: Explanation) -> dict[str, Any]:
    """``e`` as the JSON document of ``pgderive explain --json`` and ``/explain`` (version
    :data:`DOCUMENT_VERSION`; LSNs as ``"X/Y"`` text, times ISO 8601 with offset, null where
    unknown). Keys: ``version``, ``view``, ``key``, ``sink`` {name, type}, ``table``, ``shape``,
    ``record`` {found, doc, version, tombstone}, ``provenance`` {lsn, xid, committed_at,
    origin, note}, ``sources`` [{path, table, key, values, xmin, xmin_committed_at, in_view}],
    ``sources_truncated``, ``commit_timestamps`` (why xmin has no time, or null),
    ``underivable``, ``dead_letters`` [{id, lsn, error, created_at}], ``group`` ({values, source_rows, state_rows, has_state, sample [{key,
    version}]} or null), ``definition`` {fingerprint, written_fingerprint,
    registered_fingerprint, registry_status, current}, ``generation`` {index, note},
    ``verify`` {status, snapshot_lsn, confirmed_lsn, rounds, waited_seconds, expected,
    differences [{field, sink, source, absent}], note}, ``exit_code``."""
    src, st, v = e.source, e.stored, e.verdict
    group = None
    if src.group is not None:
        g = src.group
        group = {"values": g.values, "source_rows": g.source_rows,
                 "state_rows": None if g.state is None else g.state.rows,
                 "has_state": None if g.state is None else g.state.has_state,
                 "sample": [] if g.state is None else [
                     {"key": dict(zip(g.identity, k)), "version": format_lsn(ver)} for k, ver in g.state.sample]}
    return {
        "version": DOCUMENT_VERSION,
        "view": e.view, "key": e.key, "sink": {"name": e.sink, "type": e.sink_type},
        "table": e.table, "shape": e.shape,
        "record": {"found": st.doc is not None, "doc": st.doc, "version": _lsn(st.version),
                   "tombstone": st.doc is None and st.version is not None},
        "provenance": {"lsn": _lsn(st.version), "xid": e.commit.xid if e.commit else None,
                       "committed_at": _time(e.commit.committed_at) if e.commit else None,
                       "origin": e.origin, "note": e.origin_note},
        "sources": [{"path": r.path, "table": r.table, "key": r.key, "values": r.values, "xmin": r.xmin,
                     "xmin_committed_at": _time(r.xmin_committed_at), "in_view": r.in_view} for r in src.rows],
        "sources_truncated": src.truncated,
        "commit_timestamps": src.commit_ts_note,
        "underivable": src.underivable,
        "dead_letters": [{"id": d.id, "lsn": format_lsn(d.commit_lsn), "error": d.error,
                          "created_at": d.created_at.isoformat()} for d in e.dead_letters],
        "group": group,
        "definition": {"fingerprint": e.fingerprint, "written_fingerprint": e.written_fingerprint,
                       "registered_fingerprint": e.registered_fingerprint, "registry_status": e.registry_status,
                       "current": e.written_fingerprint in (None, e.fingerprint)},
        "generation": {"index": e.generation, "note": e.generation_note},
        "verify": {"status": v.status, "snapshot_lsn": format_lsn(v.snapshot_lsn), "confirmed_lsn": _lsn(v.confirmed_lsn),
                   "rounds": v.rounds, "waited_seconds": round(v.waited_s, 3), "expected": v.expected,
                   "differences": [{"field": d.field, "sink": d.sink, "source": d.source, "absent": d.absent}
                                   for d in v.differences],
                   "note": v.note},
        "exit_code": e.exit_code,
    }
