"""Rows of a ``COPY … TO STDOUT`` read straight from libpq: one C call per row.

psycopg's :class:`~psycopg.Copy` reads every row through a generator and a wait loop, about a
microsecond of Python per row; a wire load (:mod:`views.wire`) relays a million rows in a few
seconds, so that per-row cost was a third of pgderive's CPU there. :func:`copy_rows` drives the
same protocol with the libpq functions psycopg exposes on ``conn.pgconn`` (PostgreSQL docs,
libpq, "Asynchronous Command Processing" and "Functions Associated with the COPY Command"):
``PQsendQuery``, then ``PQgetCopyData`` in async mode, waiting on the socket only when libpq
holds no complete row, then ``PQgetResult`` for the final status.
"""
from __future__ import annotations

import select
from typing import Iterator

import psycopg
from psycopg import pq

__all__ = ["copy_rows"]


def copy_rows(conn: psycopg.Connection, statement: bytes) -> Iterator[memoryview]:
    """Run ``statement`` (a ``COPY … TO STDOUT``, already composed to bytes) on ``conn`` and
    yield its rows: each CopyData message's payload (Postgres sends one row per message; in
    text format a line ending with a newline).

    ``conn`` must be idle or idle in a transaction, and is held (its lock) until the
    generator ends, so nothing else may use it meanwhile. Close the generator when not
    reading it to the end (``generator.close()``, or a ``with closing(...)``): the statement
    is then cancelled and its results drained, which leaves a transaction aborted (roll back,
    e.g. to a savepoint) and the connection usable.

    Raises :class:`psycopg.OperationalError` when the connection fails and
    :class:`psycopg.DatabaseError` with the server's message when the statement fails.
    """
    pg = conn.pgconn
    with conn.lock:
        pg.send_query(statement)  # raises psycopg.OperationalError itself
        first = _result(pg)
        if first is None or first.status != pq.ExecStatus.COPY_OUT:
            _finish(pg, first)
            raise psycopg.ProgrammingError("copy_rows: the statement is not a COPY … TO STDOUT")
        done = False
        try:
            while True:
                n, data = pg.get_copy_data(1)
                if n > 0:
                    yield data
                elif n == 0:
                    _wait(pg)
                else:  # -1: the COPY ended (psycopg raises for -2 itself)
                    break
            done = True
            _finish(pg, None)
        finally:
            if not done:
                _abandon(pg)


def _message(raw: bytes | None) -> str:
    return (raw or b"").decode(errors="replace").strip() or "no error message"


def _wait(pg: pq.abc.PGconn) -> None:
    """Block until the socket is readable, then let libpq read what arrived."""
    select.select([pg.socket], [], [])
    pg.consume_input()


def _result(pg: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result (``PQgetResult``) without blocking the process outside ``select``."""
    while pg.is_busy():
        _wait(pg)
    return pg.get_result()


def _finish(pg: pq.abc.PGconn, first: pq.abc.PGresult | None) -> None:
    """Read the remaining results (after ``first``); raise the first failed one's message."""
    failed = first if first is not None and first.status == pq.ExecStatus.FATAL_ERROR else None
    while (res := _result(pg)) is not None:
        if failed is None and res.status == pq.ExecStatus.FATAL_ERROR:
            failed = res
    if failed is not None:
        raise psycopg.DatabaseError(_message(failed.error_message))


def _abandon(pg: pq.abc.PGconn) -> None:
    """Cancel a COPY left unread and drain it, so the connection can take the next command.
    Errors are left to that command (the connection may be gone)."""
    try:
        pg.get_cancel().cancel()
        while True:
            n, _ = pg.get_copy_data(1)
            if n == 0:
                _wait(pg)
            elif n < 0:
                break
        _finish(pg, None)
    except (psycopg.Error, OSError):
        pass
