"""``pgderive status``: the facts about a slot and its views, gathered once, rendered by the CLI.

Everything comes from the source and the sinks, not from the daemon: the slot row of
``pg_replication_slots`` (confirmed and restart LSN, active pid; Postgres manual, "Replication
Slots"), the walsender's ``flush_lag`` in ``pg_stat_replication`` while it streams,
``pgderive.slot_state``, the dead-letter counts, each view's record count and checkpoint in
its sink, and the retired views of the view registry (``pgderive.views``: removed from the YAML,
their data kept until ``pgderive drop VIEW``; :mod:`pgderive.ops.drop`). Each lane moves its own views' checkpoints, so a slow sink shows as checkpoints behind
the current WAL position, and the slot (the slowest lane) as retained WAL.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from cdc.slot import SlotInfo, slot_info
from views.check import build_views
from views.spec import Spec

from ..runtime.retry import one_line
from ..runtime.sinks import open_sinks
from ..runtime.waiting import waiting
from ..state.deadletters import DeadLetterStore
from ..state.registry import RETIRED, ViewEntry, ViewRegistry
from ..state.slots import SlotState, StateStore

__all__ = ["SlotStatus", "ViewStatus", "IdleSlot", "slot_status", "idle_slots"]

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
    """

    slot: str
    info: SlotInfo | None
    lag_s: float | None
    state: SlotState | None
    views: list[ViewStatus] = field(default_factory=list)
    idle: list[IdleSlot] = field(default_factory=list)
    retired: list[ViewEntry] = field(default_factory=list)

    @property
    def word(self) -> str:
        """The slot's state in one word or phrase: ``none`` (pgderive has no record of it),
        ``bootstrapping`` or ``streaming`` while a client reads the slot, ``inactive`` when
        pgderive bootstrapped it but nobody reads it now (no daemon: WAL accumulates), ``absent``
        when the record exists but the slot does not."""
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
    out = SlotStatus(spec.source.slot, info, lag_s, state, idle=idle, retired=retired)
    sinks = open_sinks(spec, views, prepare=False)  # read-only: a sink down is shown per view
    failed: set[str] = set()
    try:
        for v in views:
            vstate = "not bootstrapped" if state is None or v.name not in state.views else out.word
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
