"""The slot reader: a logical replication connection speaking the streaming replication protocol.

Postgres docs, "Streaming Replication Protocol": after ``START_REPLICATION SLOT s LOGICAL lsn
(options)`` the connection is in COPY BOTH mode. The server sends CopyData messages:

* XLogData ``'w'``: Int64 dataStart, Int64 walEnd, Int64 sendTime, then one wal2json message;
* Primary keepalive ``'k'``: Int64 walEnd, Int64 sendTime, Byte1 replyRequested.

The client sends Standby status updates ``'r'``: Int64 write, Int64 flush, Int64 apply,
Int64 clock (µs since 2000-01-01), Byte1 replyRequested. The slot's ``confirmed_flush_lsn``
follows the flush position, so pgderive only reports positions the engine has confirmed after
every sink acknowledged (ARCHITECTURE.md, rule 3).

psycopg 3 runs ``START_REPLICATION`` through ``conn.execute`` and leaves the connection in
COPY_BOTH; CopyData is then exchanged with ``conn.pgconn.get_copy_data`` / ``put_copy_data``.
"""
from __future__ import annotations

import logging
import select
import struct
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, runtime_checkable

import psycopg
from psycopg import sql

from .changes import Transaction
from .lsn import format_lsn, parse_lsn
from .wal2json import Wal2JsonDecoder, plugin_options, replication_literal

__all__ = ["SlotReader", "SlotInfo", "Keepalive", "ReplicationError", "ChangeReader", "slot_info"]

log = logging.getLogger("pgderive.slot")

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in µs since the Unix epoch
_XLOGDATA_HEADER = struct.Struct("!cQQq")
_KEEPALIVE = struct.Struct("!cQqB")
_STATUS = struct.Struct("!cQQQqB")


class ReplicationError(RuntimeError):
    """The replication stream ended or failed (connection lost, slot gone, server error)."""


@dataclass(slots=True, frozen=True)
class Keepalive:
    """A primary keepalive: the server has sent all WAL up to ``wal_end`` (LSN)."""

    wal_end: int


@dataclass(slots=True, frozen=True)
class SlotInfo:
    """A row of ``pg_replication_slots`` plus the server's current WAL position (LSNs as int)."""

    name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    current_wal_lsn: int

    @property
    def lag_bytes(self) -> int | None:
        """WAL bytes written since the confirmed position (what pgderive has yet to acknowledge)."""
        if self.confirmed_flush_lsn is None:
            return None
        return max(0, self.current_wal_lsn - self.confirmed_flush_lsn)

    @property
    def retained_bytes(self) -> int | None:
        """WAL bytes Postgres keeps for this slot: from its ``restart_lsn`` (the oldest WAL the
        slot may still need to decode) to the current position (Postgres manual, "Replication
        Slots", ``pg_replication_slots``)."""
        if self.restart_lsn is None:
            return None
        return max(0, self.current_wal_lsn - self.restart_lsn)


def slot_info(conn: psycopg.Connection, slot: str) -> SlotInfo | None:
    """Look the slot up in ``pg_replication_slots`` with a normal (non-replication) connection."""
    row = conn.execute(
        """SELECT slot_name, plugin, database, active, active_pid, restart_lsn::text,
                  confirmed_flush_lsn::text, pg_current_wal_lsn()::text
             FROM pg_replication_slots WHERE slot_name = %s""",
        (slot,),
    ).fetchone()
    if row is None:
        return None

    def lsn(v: str | None) -> int | None:
        return parse_lsn(v) if v else None

    return SlotInfo(row[0], row[1], row[2], row[3], row[4], lsn(row[5]), lsn(row[6]), parse_lsn(row[7]))


@runtime_checkable
class ChangeReader(Protocol):
    """What the runtime uses of a change stream: :class:`SlotReader` (a replication slot) and
    :class:`cdc.testing.ListReader` (a list of wal2json messages, for tests).

    Positions are int LSNs. Usage: :meth:`connect`, :meth:`start`, then :meth:`read` in a
    loop, :meth:`confirm` what every sink acknowledged; :meth:`close` and :meth:`connect` again
    after a :class:`ReplicationError`, then :meth:`start` resumes after :attr:`confirmed_lsn`
    (transactions not confirmed are delivered again: at least once, ARCHITECTURE.md, rule 3).
    """

    confirmed_lsn: int
    """The position confirmed to the source: every transaction ending at or before it is
    applied by all sinks (the runtime may also set it after looking the slot up)."""
    received_lsn: int
    """The highest position the source reported having sent (message or keepalive)."""

    @property
    def connected(self) -> bool:
        """True between :meth:`connect` and :meth:`close`."""
        ...

    @property
    def at_transaction_boundary(self) -> bool:
        """True when no transaction is half received (a keepalive's position may then be
        confirmed)."""
        ...

    def connect(self) -> None:
        """Open the stream's connection (forgetting a half-received transaction). Raises
        :class:`psycopg.OperationalError` (a slot) when connecting fails."""
        ...

    def start(self, start_lsn: int = 0) -> None:
        """Start streaming after ``start_lsn`` (0: after the confirmed position)."""
        ...

    def read(self, max_wait: float = 1.0, max_events: int = 10_000) -> Iterator[Transaction | Keepalive]:
        """Yield committed transactions (or chunks of large ones, ``final=False``) and
        keepalives in stream order: waits up to ``max_wait`` seconds for the first message,
        returns once nothing more is at hand or after ``max_events`` messages. Raises
        :class:`ReplicationError` when the stream ends or fails."""
        ...

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` is applied: raise :attr:`confirmed_lsn` (never lowers it)
        and report it to the source."""
        ...

    def send_status(self, reply: bool = False) -> None:
        """Report the confirmed position to the source now (a heartbeat)."""
        ...

    def close(self) -> None:
        """Close the connection (idempotent)."""
        ...


class SlotReader:
    """Reads committed transactions from one wal2json logical replication slot.

    Args:
        dsn: libpq connection string of the source database (never logged).
        slot: replication slot name.
        tables: qualified table names to decode (wal2json ``add-tables``); None = all.
        status_interval: seconds between standby status updates when nothing else is sent.

    Usage: :meth:`connect`, optionally :meth:`create_slot` (exported snapshot), :meth:`start`,
    then iterate :meth:`read`; call :meth:`confirm` once sinks acknowledged a transaction.
    Raises :class:`ReplicationError` when the stream fails; :class:`psycopg.OperationalError`
    when connecting fails.
    """

    def __init__(self, dsn: str, slot: str, *, tables: Iterable[str] | None = None,
                 status_interval: float = 10.0) -> None:
        self.dsn = dsn
        self.slot = slot
        self.tables = None if tables is None else sorted(set(tables))
        self.status_interval = status_interval
        self.decoder = Wal2JsonDecoder()
        self.conn: psycopg.Connection | None = None
        self.confirmed_lsn = 0  # flush position reported to the server
        self.received_lsn = 0  # highest walEnd seen
        self._last_status = 0.0
        self._reply_due = False
        self._streaming = False

    # -- connection and slot management -------------------------------------------------------
    def connect(self) -> None:
        """Open the replication connection (``replication=database``)."""
        self.close()
        self.conn = psycopg.connect(self.dsn, autocommit=True, replication="database",
                                    application_name="pgderive")
        self.decoder.reset()
        self._streaming = False

    @property
    def backend_pid(self) -> int | None:
        """The server process (walsender) of the open replication connection, else None."""
        return self.conn.info.backend_pid if self.conn is not None else None

    def create_slot(self, *, temporary: bool = False) -> tuple[int, str]:
        """``CREATE_REPLICATION_SLOT … [TEMPORARY] LOGICAL wal2json (SNAPSHOT 'export')``.

        Returns ``(consistent_point, snapshot_name)``. The exported snapshot stays valid until
        this connection runs its next command (Postgres docs, CREATE_REPLICATION_SLOT), so
        read the snapshot before calling :meth:`start`. A temporary slot disappears with the
        connection (used by ``rebuild`` to get a snapshot at a known LSN).
        """
        conn = self._require_conn()
        row = conn.execute(
            sql.SQL("CREATE_REPLICATION_SLOT {} {} LOGICAL wal2json (SNAPSHOT 'export')").format(
                sql.Identifier(self.slot), sql.SQL("TEMPORARY" if temporary else ""))
        ).fetchone()
        assert row is not None
        consistent_point = parse_lsn(row[1])
        self.confirmed_lsn = consistent_point
        # extra: the context fields of pgderive's JSON log lines (pgderive.runtime.logs.FIELDS)
        log.info("created slot %s at consistent point %s (snapshot %s)",
                 self.slot, row[1], row[2], extra={"lsn": consistent_point})
        return consistent_point, row[2]

    def drop_slot(self) -> None:
        """``DROP_REPLICATION_SLOT`` (waits for it to become inactive)."""
        conn = self._require_conn()
        conn.execute(sql.SQL("DROP_REPLICATION_SLOT {} WAIT").format(sql.Identifier(self.slot)))

    def start(self, start_lsn: int = 0) -> None:
        """``START_REPLICATION SLOT … LOGICAL start_lsn (wal2json options)``.

        With ``start_lsn`` 0 the server resumes from the slot's ``confirmed_flush_lsn``.
        """
        conn = self._require_conn()
        opts = plugin_options(self.tables)
        # Not sql.Literal: it sends E'…' for a value holding a backslash (an escaped add-tables
        # entry), which the replication grammar rejects with a bare "syntax error".
        options = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.SQL(replication_literal(v))) for k, v in opts.items())
        query = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(self.slot), sql.SQL(format_lsn(start_lsn)), options)
        conn.execute(query)
        self._streaming = True
        self.received_lsn = max(self.received_lsn, start_lsn)
        self.confirmed_lsn = max(self.confirmed_lsn, start_lsn)
        self._last_status = time.monotonic()
        log.info("streaming slot %s from %s", self.slot, format_lsn(start_lsn) if start_lsn else "its confirmed position",
                 extra={"lsn": start_lsn} if start_lsn else None)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # pragma: no cover - best effort on a broken connection
                pass
            self.conn = None
            self._streaming = False

    def _require_conn(self) -> psycopg.Connection:
        if self.conn is None:
            raise ReplicationError("replication connection is not open")
        return self.conn

    # -- streaming ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the replication connection is open (between :meth:`connect` and
        :meth:`close`)."""
        return self.conn is not None

    @property
    def at_transaction_boundary(self) -> bool:
        """True when no transaction is half received (safe to confirm a keepalive's walEnd)."""
        return not self.decoder.in_transaction

    def confirm(self, lsn: int) -> None:
        """Mark every transaction ending at or before ``lsn`` as applied by all sinks.

        The position is sent with the next status update (immediately when it advances).
        """
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            self.send_status()

    def send_status(self, reply: bool = False) -> None:
        """Send a standby status update with write = flush = apply = the confirmed LSN."""
        if not self._streaming or self.conn is None:
            return
        pos = self.confirmed_lsn
        now_us = int(time.time() * 1_000_000) - _PG_EPOCH_US
        pg = self.conn.pgconn
        if pg.put_copy_data(_STATUS.pack(b"r", pos, pos, pos, now_us, 1 if reply else 0)) != 1:
            raise ReplicationError(f"sending status update failed: {self._pg_error()}")
        pg.flush()
        self._last_status = time.monotonic()

    def read(self, max_wait: float = 1.0, max_events: int = 10_000) -> Iterator[Transaction | Keepalive]:
        """Yield committed transactions and keepalives.

        Waits up to ``max_wait`` seconds for the first message, then yields what is already
        buffered and returns as soon as the socket has nothing more (or after ``max_events``
        messages), so callers can flush small batches quickly under light load.
        Raises :class:`ReplicationError` if the stream ends or fails.
        """
        pg = self._require_conn().pgconn
        deadline = time.monotonic() + max_wait
        got = 0
        drained = False  # consume_input found nothing new since the last message
        while True:
            if self._reply_due:
                self._reply_due = False
                self.send_status()
            elif time.monotonic() - self._last_status >= self.status_interval:
                self.send_status()
            n, buf = pg.get_copy_data(1)
            if n > 0:
                got += 1
                drained = False
                event = self._parse(buf)
                if event is not None:
                    yield event
                if got >= max_events:
                    return
                continue
            if n == 0:
                if got:
                    # libpq's buffer is drained; go on while the socket has more (read() is
                    # about what arrived, not about one buffer's worth of it). libpq's socket
                    # is non-blocking: consume_input takes what is there, or nothing.
                    if not drained:
                        drained = True
                        pg.consume_input()
                        continue
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                ready, _, _ = select.select([pg.socket], [], [], min(remaining, self.status_interval))
                if ready:
                    pg.consume_input()
                continue
            # n == -1: COPY finished by the server; n == -2: error.
            self._streaming = False
            raise ReplicationError(f"replication stream of slot {self.slot} ended: {self._pg_error()}")

    def _parse(self, buf: memoryview) -> Transaction | Keepalive | None:
        kind = buf[0]
        if kind == 0x77:  # 'w' XLogData
            _, _start, wal_end, _ = _XLOGDATA_HEADER.unpack_from(buf)
            if wal_end > self.received_lsn:
                self.received_lsn = wal_end
            return self.decoder.feed(buf[_XLOGDATA_HEADER.size:])
        if kind == 0x6B:  # 'k' keepalive
            _, wal_end, _, reply = _KEEPALIVE.unpack_from(buf)
            if wal_end > self.received_lsn:
                self.received_lsn = wal_end
            if reply:
                self._reply_due = True
            return Keepalive(wal_end)
        log.warning("ignoring unknown replication message type %r", bytes(buf[:1]))
        return None

    def _pg_error(self) -> str:
        if self.conn is None:
            return "connection closed"
        pg = self.conn.pgconn
        msg = pg.error_message.decode(errors="replace").strip()
        res = pg.get_result()
        if res is not None and res.error_message:
            msg = res.error_message.decode(errors="replace").strip() or msg
        return msg or "no error message"
