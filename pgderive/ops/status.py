"""``pgderive status``: the facts about a slot and its views, gathered once, rendered by the CLI.

Everything comes from the source and the sinks, not from the daemon: the slot row of
``pg_replication_slots`` (confirmed and restart LSN, active pid; Postgres manual, "Replication
Slots"), the walsender's ``flush_lag`` in ``pg_stat_replication`` while it streams,
``pgderive.slot_state``, the dead-letter counts, each view's record count and checkpoint in
its sink, and the retired views of the view registry (``pgderive.views``: removed from the YAML,
their data kept until ``pgderive drop VIEW``; :mod:`pgderive.ops.drop`), and the online rebuilds
of ``pgderive.rebuilds``. Each lane moves its own views' checkpoints, so a slow sink shows as
checkpoints behind the current WAL position, and the slot (the slowest lane) as retained WAL.

:func:`slot_status` gathers the facts (:class:`SlotStatus`); the CLI renders them as tables, and
:func:`status_document` turns them into one JSON-ready document (``pgderive status --json``, and
what a daemon endpoint serves), free of any rendering library.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from cdc.envelope import table_topic
from cdc.kafka_source import GroupStatus
from cdc.lsn import format_lsn
from cdc.redact import scrub
from cdc.slot import SlotInfo, slot_info
from views.check import build_views
from views.spec import Spec

from ..runtime.retry import one_line
from ..runtime.sinks import open_sinks
from ..runtime.waiting import waiting
from ..state.deadletters import DeadLetterStore
from ..state.rebuilds import Rebuild, RebuildStore
from ..state.registry import RETIRED, ViewEntry, ViewRegistry
from ..state.slots import SlotState, StateStore
from .drop import describe

__all__ = ["SlotStatus", "ViewStatus", "IdleSlot", "slot_status", "idle_slots", "status_document"]

log = logging.getLogger("pgderive.status")


@dataclass(frozen=True, slots=True)
class ViewStatus:
    """One view as its sink holds it.

    Attributes:
        name, table, sink: from the spec.
        records: live records in the sink, or None when the sink could not be asked.
        checkpoint: the LSN (int) the view is complete up to in its sink; None when it holds none.
        state: ``streaming``/``bootstrapping`` (the slot's), or ``not bootstrapped``.
        dead_letters: its dead letters, or None when they could not be counted.
        error: why the sink could not be asked (e.g. ``ConnectionError``), else None.
    """

    name: str
    table: str
    sink: str
    records: int | None
    checkpoint: int | None
    state: str
    dead_letters: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IdleSlot:
    """A pgderive slot nobody reads that retains WAL: Postgres keeps every WAL segment from its
    ``restart_lsn`` on until a client confirms past it or the slot is dropped (Postgres manual,
    "Replication Slots"), so an abandoned one fills the disk.

    Attributes:
        slot: the slot's name.
        retained_bytes: WAL bytes from its ``restart_lsn`` to the current WAL position.
        drop_sql: the statement that drops it, e.g. ``SELECT pg_drop_replication_slot('pgderive_bench')``.
    """

    slot: str
    retained_bytes: int
    drop_sql: str


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """The slot and its views.

    Attributes:
        slot: the slot's name (from the spec).
        info: its ``pg_replication_slots`` row and the current WAL LSN, None when it does not exist.
        lag_s: the walsender's ``flush_lag`` (seconds) while a daemon streams, else None.
        state: pgderive's record of the slot (``pgderive.slot_state``), None when there is none.
        views: one entry per view of the spec.
        idle: every pgderive slot of the source database (this spec's, and those recorded in
            ``pgderive.slot_state``) that no client reads and that retains WAL (:func:`idle_slots`).
        retired: the slot's retired views that the spec no longer declares (view registry,
            :class:`~pgderive.state.registry.ViewRegistry`): not maintained, data kept in the
            sink until ``pgderive drop VIEW``; by name.
        rebuilds: the slot's online rebuilds (``pgderive.rebuilds``, every row: unfinished,
            done, failed), by view; None when they could not be read.
        kafka: for derivation workers (``source.kafka``; :attr:`slot` then names their state,
            no slot exists): the consumer group, its members, and per partition its owner,
            committed offset and lag (:func:`cdc.kafka_source.group_status`); else None.
    """

    slot: str
    info: SlotInfo | None
    lag_s: float | None
    state: SlotState | None
    views: list[ViewStatus] = field(default_factory=list)
    idle: list[IdleSlot] = field(default_factory=list)
    retired: list[ViewEntry] = field(default_factory=list)
    rebuilds: list[Rebuild] | None = field(default_factory=list)
    kafka: GroupStatus | None = None

    @property
    def word(self) -> str:
        """The slot's state in one word or phrase: ``none`` (pgderive has no record of it),
        ``bootstrapping`` or ``streaming`` while a client reads the slot, ``inactive`` when
        pgderive bootstrapped it but nobody reads it now (no daemon: WAL accumulates), ``absent``
        when the record exists but the slot does not."""
        if self.kafka is not None:
            return "kafka worker"
        if self.state is None:
            return "none"
        if self.info is None:
            return "absent"
        if not self.info.active:
            return "inactive" if self.state.status == "streaming" else "inactive (bootstrap not finished)"
        return self.state.status

    def behind(self, checkpoint: int | None) -> int | None:
        """Bytes of WAL between ``checkpoint`` (int LSN) and the current position, or None."""
        if checkpoint is None or self.info is None:
            return None
        return max(0, self.info.current_wal_lsn - checkpoint)


def slot_status(spec: Spec) -> SlotStatus:
    """Gather the status of ``spec``'s slot and views.

    Raises :class:`views.spec.SpecError` when the spec does not match the source and
    :class:`psycopg.Error` when the source is unreachable; a sink that cannot be asked is
    reported in its views' ``error`` instead.
    """
    dsn = spec.source.conninfo()  # the source's connect and statement timeouts
    with waiting(f"connecting to the source {spec.source.redacted_dsn()}", log,
                 limit=spec.source.connect_timeout or None):
        conn = psycopg.connect(dsn, autocommit=True)
    with conn:
        info = slot_info(conn, spec.source.slot)
        lag_s = None
        if info is not None and info.active_pid:
            row = conn.execute(
                "SELECT extract(epoch FROM coalesce(flush_lag, interval '0')) FROM pg_stat_replication WHERE pid = %s",
                (info.active_pid,)).fetchone()
            lag_s = float(row[0]) if row else None
        views = build_views(spec, conn)
        idle = idle_slots(conn, spec.source.slot)
    state = StateStore(dsn).get(spec.source.slot)
    try:
        with DeadLetterStore(dsn) as store:
            dead: dict[str, int] | None = store.count(spec.source.slot)
    except psycopg.Error as e:  # still show the rest
        log.warning("cannot count dead letters: %s", one_line(e))
        dead = None
    try:
        retired = [e for e in ViewRegistry(dsn).entries(spec.source.slot, RETIRED)
                   if e.view not in spec.views and not spec.resolve(e.view)]
    except psycopg.Error as e:  # still show the rest
        log.warning("cannot read the view registry: %s", one_line(e))
        retired = []
    rstore = RebuildStore(dsn)
    try:
        rebuilds: list[Rebuild] | None = rstore.all(spec.source.slot)
    except psycopg.Error as e:  # still show the rest
        log.warning("cannot read the online rebuilds: %s", one_line(e))
        rebuilds = None
    finally:
        rstore.close()
    kafka, group = spec.source.kafka, None
    if kafka is not None:
        from cdc.kafka_source import group_status  # brokers are asked only for workers
        topics = sorted({table_topic(kafka.topic_prefix, t) for v in views for t in v.tables})
        group = group_status(kafka.bootstrap_servers, kafka.group, topics, options=kafka.options)
    out = SlotStatus(spec.source.slot, info, lag_s, state, idle=idle, retired=retired, rebuilds=rebuilds,
                     kafka=group)
    sinks = open_sinks(spec, views, prepare=False)  # read-only: a sink down is shown per view
    failed: set[str] = set()
    try:
        for v in views:
            vstate = out.word if out.kafka is not None else (
                "not bootstrapped" if state is None or v.name not in state.views else out.word)
            records: int | None = None
            checkpoint: int | None = None
            error: str | None = None
            try:
                records = sinks[v.sink].count(v.name)
                checkpoint = sinks[v.sink].read_checkpoint(v.name)
            except Exception as e:  # a sink down: still show the rest
                error = type(e).__name__
                if v.sink not in failed:  # one line per sink, not a traceback per request
                    failed.add(v.sink)
                    msg = one_line(e)
                    log.warning("%s", msg if msg.startswith(f"sink {v.sink}") else f"sink {v.sink}: {msg}")
            out.views.append(ViewStatus(v.name, v.table, v.sink, records, checkpoint, vstate,
                                        None if dead is None else dead.get(v.name, 0), error))
    finally:
        for s in sinks.values():
            s.close()
    return out


def idle_slots(conn: psycopg.Connection, slot: str) -> list[IdleSlot]:
    """pgderive's inactive slots in ``conn``'s database that retain WAL, largest first.

    pgderive's slots: ``slot`` (the spec's) and every slot ``pgderive.slot_state`` records (when
    the table exists and is readable). A slot is inactive when ``pg_replication_slots.active`` is
    false (no walsender has it); it retains the WAL from its ``restart_lsn`` to
    ``pg_current_wal_lsn()``. ``conn``: autocommit, as any role (``pg_replication_slots`` is
    readable by every role).
    """
    names = {slot}
    readable = conn.execute(
        """SELECT has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'pgderive' AND c.relname = 'slot_state'""").fetchone()
    if readable is not None and readable[0]:
        names.update(r[0] for r in conn.execute("SELECT slot FROM pgderive.slot_state"))
    rows = conn.execute(
        """SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
             FROM pg_replication_slots
            WHERE database = current_database() AND NOT active AND restart_lsn IS NOT NULL
              AND slot_name = ANY(%s)
              AND pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) > 0
            ORDER BY 2 DESC, 1""", (sorted(names),)).fetchall()
    return [IdleSlot(name, int(size), sql.SQL("SELECT pg_drop_replication_slot({})").format(
        sql.Literal(name)).as_string(conn)) for name, size in rows]


def _lsn(value: int | None) -> str | None:
    return None if value is None else format_lsn(value)


def _text(value: str | None) -> str | None:
    """Free text from the source or a sink (an error, a reason): secrets scrubbed
    (:func:`cdc.redact.scrub`: registered secrets, URL passwords, ``password=`` pairs)."""
    return None if value is None else scrub(value)


def status_document(st: SlotStatus) -> dict[str, object]:
    """``st`` as one JSON-ready document: the facts ``pgderive status`` shows as tables.

    Only str, int, float, bool, None, lists and dicts; every key is always present (None where
    a fact is unknown or does not apply). LSNs are text ``"X/Y"`` (hex, as Postgres prints a
    ``pg_lsn``), sizes ``*_bytes`` (int), durations ``*_seconds`` and rates ``*_per_s`` (float),
    timestamps ISO 8601 with their UTC offset. No connection string or sink URL appears; free
    text (errors, reasons) is scrubbed of secrets. Keys:

    * ``slot``: ``name``; ``exists`` (the slot is in ``pg_replication_slots``); ``active``
      (a client reads it); ``active_pid`` (the walsender's pid, int or None);
      ``confirmed_lsn``, ``restart_lsn``, ``current_wal_lsn`` (text or None);
      ``lag_bytes`` (WAL written since the confirmed LSN); ``lag_seconds`` (the walsender's
      ``flush_lag`` while a daemon streams, else None); ``retained_wal_bytes`` (WAL kept for
      the slot, from its restart LSN); ``status`` (:attr:`SlotStatus.word`: ``none``,
      ``absent``, ``bootstrapping``, ``streaming``, ``inactive``, ``inactive (bootstrap not
      finished)``); ``consistent_point_lsn`` (pgderive's record of the bootstrap snapshot).
    * ``views``: one object per view of the spec, in spec order: ``name``, ``table``, ``sink``
      (its name in the YAML), ``records`` (live records in the sink, None when the sink could
      not be asked), ``checkpoint_lsn`` (text, None when the sink holds none),
      ``checkpoint_behind_bytes`` (WAL from the checkpoint to the current position), ``state``
      (``streaming``/``bootstrapping``/``inactive…`` as the slot, or ``not bootstrapped``),
      ``dead_letters`` (int, None when they could not be counted), ``error`` (why the sink
      could not be asked, e.g. ``ConnectionError``, else None).
    * ``rebuilds``: the online rebuilds (``pgderive.rebuilds``), None when they could not be
      read: ``view``, ``phase`` (``requested``, ``loading``, ``catching_up``, ``switching``,
      ``done``, ``failed``, ``cancelled``), ``active`` (not finished), ``reason``,
      ``consistent_point_lsn``, ``rows`` (loaded so far), ``rows_total_estimate`` (None:
      unknown), ``rows_per_s``, ``eta_seconds`` (while loading, at the rate so far),
      ``attempts``, ``error``, ``requested_at``, ``updated_at``.
    * ``retired_views``: views removed from the YAML whose data is kept: ``view``, ``sink``,
      ``layout`` (e.g. ``sink search, OpenSearch alias 'branches'``), ``index`` (OpenSearch
      alias or None), ``key_shape`` and ``format`` (Redis, else None), ``drop_command``.
    * ``idle_slots``: pgderive's slots no client reads that retain WAL, largest first:
      ``slot``, ``retained_wal_bytes``, ``drop_sql``.
    * ``kafka``: None, or for derivation workers (``source.kafka``) the consumer group
      (:func:`kafka_document`); ``slot.name`` then names the workers' state, and
      ``slot.status`` is ``kafka worker``.
    """
    info = st.info
    slot: dict[str, object] = {
        "name": st.slot,
        "exists": info is not None,
        "active": bool(info is not None and info.active),
        "active_pid": None if info is None else info.active_pid,
        "confirmed_lsn": None if info is None else _lsn(info.confirmed_flush_lsn),
        "restart_lsn": None if info is None else _lsn(info.restart_lsn),
        "current_wal_lsn": None if info is None else _lsn(info.current_wal_lsn),
        "lag_bytes": None if info is None else info.lag_bytes,
        "lag_seconds": st.lag_s,
        "retained_wal_bytes": None if info is None else info.retained_bytes,
        "status": st.word,
        "consistent_point_lsn": None if st.state is None else _lsn(st.state.consistent_point),
    }
    views: list[dict[str, object]] = [{
        "name": v.name,
        "table": v.table,
        "sink": v.sink,
        "records": v.records,
        "checkpoint_lsn": _lsn(v.checkpoint),
        "checkpoint_behind_bytes": st.behind(v.checkpoint),
        "state": v.state,
        "dead_letters": v.dead_letters,
        "error": _text(v.error),
    } for v in st.views]
    rebuilds: list[dict[str, object]] | None = None if st.rebuilds is None else [{
        "view": r.view,
        "phase": r.status,
        "active": r.active,
        "reason": _text(r.reason),
        "consistent_point_lsn": _lsn(r.consistent_point),
        "rows": r.rows_done,
        "rows_total_estimate": r.rows_total,
        "rows_per_s": r.rows_per_s,
        "eta_seconds": r.eta_seconds,
        "attempts": r.attempts,
        "error": _text(r.error),
        "requested_at": r.requested_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    } for r in st.rebuilds]
    retired: list[dict[str, object]] = [{
        "view": e.view,
        "sink": e.sink,
        "layout": describe(e),
        "index": e.target.index,
        "key_shape": e.target.key_shape,
        "format": None if e.target.index is not None else (e.target.format or "hash"),
        "drop_command": f"pgderive drop {e.view}",
    } for e in st.retired]
    idle: list[dict[str, object]] = [
        {"slot": i.slot, "retained_wal_bytes": i.retained_bytes, "drop_sql": i.drop_sql} for i in st.idle]
    return {"slot": slot, "views": views, "rebuilds": rebuilds, "retired_views": retired, "idle_slots": idle,
            "kafka": None if st.kafka is None else kafka_document(st.kafka)}


def kafka_document(g: GroupStatus) -> dict[str, object]:
    """The ``kafka`` key of :func:`status_document` (derivation workers): ``group``, ``state``
    (the broker's word, e.g. ``STABLE``, ``EMPTY``; None if unknown), ``members``
    (``client_id@host``), ``partitions`` (``topic``, ``partition``, ``owner`` (a member or
    None), ``committed_offset``, ``end_offset``, ``lag`` (messages not yet committed by the
    group; None if unknown)), ``lag_total`` and ``error`` (why the brokers could not be asked,
    else None)."""
    lags = [p.lag for p in g.partitions]
    return {
        "group": g.group,
        "state": g.state,
        "members": list(g.members),
        "partitions": [{"topic": p.topic, "partition": p.partition, "owner": p.owner,
                        "committed_offset": p.committed, "end_offset": p.end, "lag": p.lag}
                       for p in g.partitions],
        "lag_total": None if any(n is None for n in lags) else sum(n for n in lags if n is not None),
        "error": _text(g.error),
    }
