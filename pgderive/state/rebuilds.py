"""Online rebuilds and reload requests, kept in the source database (ARCHITECTURE.md, "State"
and "Online rebuild").

Table ``pgderive.rebuilds`` (migration ``0006_rebuilds.sql``): one row per ``(slot, view)``, the
latest rebuild of that view by the running daemon — its phase (``status``), why it was asked
for, its snapshot's consistent point and its progress. ``pgderive rebuild VIEW`` inserts a
``requested`` row and follows it; the daemon takes it, moves it through ``loading``,
``catching_up`` and ``switching`` and ends it ``done`` or ``failed``. A row left in an unfinished
phase by a crash is started over by the next daemon: the rebuild's intent survives ``kill -9``.

``pgderive reload`` uses three columns of ``pgderive.slot_state``: it sets
``reload_requested_at``; the daemon, which polls it, reloads its YAML and sets ``reloaded_at``
and ``reload_result`` (one line: what changed, or why the new file was refused).
"""
from __future__ import annotations

import datetime as dt
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg

from cdc.lsn import format_lsn, parse_lsn

from .schema import migrate

__all__ = ["RebuildStore", "Rebuild", "ReloadState", "ACTIVE", "PHASES"]

#: Seconds a connection of this store may take to open.
CONNECT_TIMEOUT = 10

#: The phases of a rebuild that is not finished, in order.
PHASES = ("requested", "loading", "catching_up", "switching")
#: ``status`` values of an unfinished rebuild (the daemon resumes them).
ACTIVE = frozenset(PHASES)


@dataclass(frozen=True, slots=True)
class Rebuild:
    """One row of ``pgderive.rebuilds``.

    Attributes:
        view: the view's name.
        status: ``requested``, ``loading``, ``catching_up``, ``switching``, ``done``, ``failed``
            or ``cancelled``.
        reason: why it was asked for, e.g. ``"pgderive rebuild"`` or ``"definition changed"``.
        consistent_point: the snapshot's LSN (int), None before the snapshot exists.
        rows_done: rows loaded so far; rows_total: the estimate of all (None: unknown).
        rows_per_s: the load's rate so far (None before the first chunk).
        attempts: how many times it started (a crash or a TRUNCATE starts it over).
        error: why it failed (one line), else None.
        requested_at, updated_at: timestamps (timezone-aware).
    """

    view: str
    status: str
    reason: str
    consistent_point: int | None
    rows_done: int
    rows_total: int | None
    rows_per_s: float | None
    attempts: int
    error: str | None
    requested_at: dt.datetime
    updated_at: dt.datetime

    @property
    def active(self) -> bool:
        """True while the rebuild is not finished."""
        return self.status in ACTIVE

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the load is done at the rate so far (None when unknown)."""
        if not self.rows_per_s or self.rows_total is None or self.status != "loading":
            return None
        return max(0.0, (self.rows_total - self.rows_done) / self.rows_per_s)


@dataclass(frozen=True, slots=True)
class ReloadState:
    """The reload handshake of a slot: when a reload was last requested, when the daemon last
    reloaded and with what result (None where never)."""

    requested_at: dt.datetime | None
    reloaded_at: dt.datetime | None
    result: str | None


_COLUMNS = ("view, status, reason, consistent_point::text, rows_done, rows_total, rows_per_s, attempts, "
            "error, requested_at, updated_at")


def _row(r: tuple[Any, ...]) -> Rebuild:
    return Rebuild(r[0], r[1], r[2], parse_lsn(r[3]) if r[3] is not None else None, r[4], r[5], r[6],
                   r[7], r[8], r[9], r[10])


class RebuildStore:
    """Reads and writes ``pgderive.rebuilds`` and the reload columns of
    ``pgderive.slot_state`` on one autocommit connection, opened on first use, shared by the
    daemon's threads one call at a time, and opened again after a failure. Reads of a database
    whose schema lacks the table return nothing; the first write migrates the schema
    (:func:`~pgderive.state.schema.migrate`). Raises :class:`psycopg.Error`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._mutex = threading.Lock()

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[psycopg.Connection[Any]]:
        with self._mutex:
            if self._conn is None or self._conn.closed:
                # Bounded whatever the source's connect_timeout: a daemon's control thread polls
                # with it and must not hang on a source that accepts and never answers.
                self._conn = psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-state",
                                             connect_timeout=CONNECT_TIMEOUT)
            try:
                if write and not self._migrated:
                    migrate(self._conn)
                    self._migrated = True
                yield self._conn
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None
                raise

    def close(self, wait: float = 1.0) -> None:
        """Close the connection (a later call opens it again). Waits at most ``wait`` seconds
        for a call in progress on another thread (e.g. one connecting to a source that does not
        answer); past that the connection is left to that call, which ends with the process."""
        if not self._mutex.acquire(timeout=wait):
            return
        try:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        finally:
            self._mutex.release()

    @staticmethod
    def _exists(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass('pgderive.rebuilds') IS NOT NULL").fetchone()
        return row is not None and bool(row[0])

    def request(self, slot: str, view: str, reason: str) -> Rebuild:
        """Ask for an online rebuild of ``view``: a new ``requested`` row, unless one is
        unfinished already (then that one is returned unchanged, and followed)."""
        with self._connect(write=True) as conn:
            row = conn.execute(
                f"""INSERT INTO pgderive.rebuilds AS r (slot, view, status, reason)
                    VALUES (%s, %s, 'requested', %s)
                    ON CONFLICT (slot, view) DO UPDATE SET status = 'requested', reason = EXCLUDED.reason,
                        requested_at = now(), updated_at = now(), started_at = NULL, consistent_point = NULL,
                        rows_done = 0, rows_total = NULL, rows_per_s = NULL, attempts = 0, error = NULL
                      WHERE r.status NOT IN ('requested', 'loading', 'catching_up', 'switching')
                    RETURNING {_COLUMNS}""", (slot, view, reason)).fetchone()
            if row is None:
                row = conn.execute(f"SELECT {_COLUMNS} FROM pgderive.rebuilds WHERE slot = %s AND view = %s",
                                   (slot, view)).fetchone()
        assert row is not None
        return _row(row)

    def get(self, slot: str, view: str) -> Rebuild | None:
        """The latest rebuild of ``view``, or None."""
        with self._connect(write=False) as conn:
            if not self._exists(conn):
                return None
            row = conn.execute(f"SELECT {_COLUMNS} FROM pgderive.rebuilds WHERE slot = %s AND view = %s",
                               (slot, view)).fetchone()
        return _row(row) if row is not None else None

    def all(self, slot: str, *, active: bool = False) -> list[Rebuild]:
        """Every rebuild row of ``slot`` (``active``: only unfinished ones), by view name."""
        with self._connect(write=False) as conn:
            if not self._exists(conn):
                return []
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM pgderive.rebuilds WHERE slot = %s"
                + (" AND status = ANY(%s)" if active else "") + " ORDER BY view",
                (slot, list(PHASES)) if active else (slot,)).fetchall()
        return [_row(r) for r in rows]

    def start(self, slot: str, view: str) -> None:
        """A daemon begins (or begins again) the rebuild: ``loading``, one more attempt,
        progress reset."""
        with self._connect(write=True) as conn:
            conn.execute(
                """UPDATE pgderive.rebuilds SET status = 'loading', attempts = attempts + 1, started_at = now(),
                       updated_at = now(), consistent_point = NULL, rows_done = 0, rows_total = NULL,
                       rows_per_s = NULL, error = NULL
                   WHERE slot = %s AND view = %s""", (slot, view))

    def progress(self, slot: str, view: str, *, status: str | None = None, consistent_point: int | None = None,
                 rows_done: int | None = None, rows_total: int | None = None,
                 rows_per_s: float | None = None) -> None:
        """Record the phase and progress of a rebuild (arguments left None keep their value)."""
        with self._connect(write=True) as conn:
            conn.execute(
                """UPDATE pgderive.rebuilds SET status = coalesce(%s, status),
                       consistent_point = coalesce(%s::pg_lsn, consistent_point),
                       rows_done = coalesce(%s, rows_done), rows_total = coalesce(%s, rows_total),
                       rows_per_s = coalesce(%s, rows_per_s), updated_at = now()
                   WHERE slot = %s AND view = %s""",
                (status, format_lsn(consistent_point) if consistent_point is not None else None, rows_done,
                 rows_total, rows_per_s, slot, view))

    def finish(self, slot: str, view: str, status: str, error: str | None = None) -> None:
        """End the rebuild: ``done``, ``failed`` (with ``error``, one line) or ``cancelled``."""
        with self._connect(write=True) as conn:
            conn.execute("UPDATE pgderive.rebuilds SET status = %s, error = %s, updated_at = now() "
                         "WHERE slot = %s AND view = %s", (status, error, slot, view))

    def cancel_all(self, slot: str, why: str) -> list[str]:
        """End every unfinished rebuild of ``slot`` as ``cancelled`` with ``why`` (a bootstrap
        loads every view anyway); returns their views."""
        with self._connect(write=True) as conn:
            rows = conn.execute(
                "UPDATE pgderive.rebuilds SET status = 'cancelled', error = %s, updated_at = now() "
                "WHERE slot = %s AND status = ANY(%s) RETURNING view", (why, slot, list(PHASES))).fetchall()
        return [r[0] for r in rows]

    # -- reload handshake --------------------------------------------------------------------
    def request_reload(self, slot: str) -> dt.datetime:
        """Ask the daemon of ``slot`` to reload its YAML; returns the request's time. Raises
        ``LookupError`` when pgderive never bootstrapped ``slot``."""
        with self._connect(write=True) as conn:
            row = conn.execute("UPDATE pgderive.slot_state SET reload_requested_at = clock_timestamp() "
                               "WHERE slot = %s RETURNING reload_requested_at", (slot,)).fetchone()
        if row is None:
            raise LookupError(slot)
        return row[0]  # type: ignore[no-any-return]

    def reload_state(self, slot: str) -> ReloadState:
        """The reload handshake of ``slot`` (all None when there is no such slot or column)."""
        with self._connect(write=False) as conn:
            if not self._exists(conn):
                return ReloadState(None, None, None)
            row = conn.execute("SELECT reload_requested_at, reloaded_at, reload_result FROM pgderive.slot_state "
                               "WHERE slot = %s", (slot,)).fetchone()
        return ReloadState(*row) if row is not None else ReloadState(None, None, None)

    def reloaded(self, slot: str, requested_at: dt.datetime | None, result: str) -> None:
        """The daemon answered the reload requested at ``requested_at`` with ``result``."""
        with self._connect(write=True) as conn:
            conn.execute("UPDATE pgderive.slot_state SET reloaded_at = greatest(coalesce(%s, clock_timestamp()), "
                         "clock_timestamp()), reload_result = %s WHERE slot = %s", (requested_at, result, slot))
