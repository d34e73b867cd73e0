"""Postgres side of the benchmark: scratch databases, pgbench, slots, pg_recvlogical, COPY.

Every database and slot the benchmark makes is named after ``Settings.prefix`` and removed by
:func:`drop_database` (slots first: a leftover slot retains WAL forever).
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from cdc.lsn import format_lsn, parse_lsn
from cdc.wal2json import plugin_options

from .settings import Settings

__all__ = [
    "PgbenchResult", "db_dsn", "pg_env", "recreate_database", "drop_database", "pgbench_init", "pgbench_run",
    "marker_lsn", "current_lsn", "create_slot", "drop_slot", "slot_position", "recvlogical_args",
    "recvlogical_drain", "copy_count", "format_lsn", "server_version", "BenchError",
]


class BenchError(RuntimeError):
    """A step of a scenario failed (the message says which and why)."""


@dataclass
class PgbenchResult:
    """What one pgbench run did: committed ``transactions``, its ``tps`` and wall ``seconds``."""

    transactions: int
    tps: float
    seconds: float
    failed: int = 0


def db_dsn(settings: Settings, db: str) -> str:
    """DSN of database ``db`` on the benchmark's server."""
    return psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=db)


def pg_env(settings: Settings) -> dict[str, str]:
    """Environment for Postgres' client programs: PGHOST/PGPORT/PGUSER(/PGPASSWORD) of the
    benchmark's server."""
    params = psycopg.conninfo.conninfo_to_dict(settings.pg_dsn)
    env = {**os.environ, "PGHOST": str(params.get("host", "127.0.0.1")),
           "PGPORT": str(params.get("port", "5432")), "PGUSER": str(params.get("user", "postgres"))}
    if params.get("password"):
        env["PGPASSWORD"] = str(params["password"])
    return env


def drop_database(settings: Settings, db: str) -> None:
    """Drop every replication slot of ``db`` (terminating their consumers), then ``db`` itself."""
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        for slot, pid in conn.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (db,)).fetchall():
            if pid:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.2)
            _drop_slot(conn, slot)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def recreate_database(settings: Settings, db: str) -> str:
    """Drop ``db`` (and its slots) if it exists, create it empty; returns its DSN."""
    drop_database(settings, db)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    return db_dsn(settings, db)


def pgbench_init(settings: Settings, db: str, scale: int) -> None:
    """``pgbench -i -s scale`` into ``db`` (the standard four tables, vacuumed, with keys)."""
    _run([str(settings.pg_bin / "pgbench"), "-i", "-q", "-s", str(scale), db], settings, "pgbench -i")


def pgbench_run(settings: Settings, db: str, *, seconds: int | None = None,
                transactions: int | None = None, rate: int | None = None) -> PgbenchResult:
    """Run the default TPC-B-like script (``-n``, ``-c clients -j jobs``) for ``seconds`` (``-T``)
    or ``transactions`` per client (``-t``), optionally rate-limited (``-R``).

    Each transaction updates one row each of pgbench_accounts, pgbench_tellers and
    pgbench_branches and inserts into pgbench_history."""
    args = [str(settings.pg_bin / "pgbench"), "-n", "-c", str(settings.clients), "-j", str(settings.jobs)]
    if seconds is not None:
        args += ["-T", str(seconds)]
    if transactions is not None:
        args += ["-t", str(transactions)]
    if rate is not None:
        args += ["-R", str(rate)]
    t0 = time.monotonic()
    out = _run(args + [db], settings, "pgbench")
    elapsed = time.monotonic() - t0
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    tps = re.search(r"tps = ([\d.]+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not m:
        raise BenchError(f"pgbench printed no transaction count:\n{out[-2000:]}")
    return PgbenchResult(int(m.group(1)), float(tps.group(1)) if tps else 0.0, elapsed,
                         int(failed.group(1)) if failed else 0)


def _run(args: list[str], settings: Settings, what: str) -> str:
    proc = subprocess.run(args, env=pg_env(settings), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def current_lsn(dsn: str) -> int:
    """``pg_current_wal_lsn()`` of the server."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def marker_lsn(dsn: str) -> int:
    """Close a workload with a marker and return the LSN that marks "everything before is in".

    In one transaction: read ``pg_current_wal_insert_lsn()`` (L), then
    ``UPDATE pgbench_accounts SET abalance = abalance WHERE aid = 1`` (a no-op change of a
    watched table, one more change in the stream), commit. Every workload commit precedes L and
    the marker's own records follow it, so a consumer has drained the workload exactly when it
    confirms a position >= L (pgderive confirms the marker's end once it is applied) or, for
    ``pg_recvlogical --endpos L``, stops at the marker's first message. Unlike
    ``pg_current_wal_lsn()`` this does not depend on the consumer advancing over trailing WAL
    of other databases by keepalives (which pgderive does at most once a second).
    """
    with psycopg.connect(dsn) as conn:
        lsn = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        conn.execute("UPDATE pgbench_accounts SET abalance = abalance WHERE aid = 1")
        conn.commit()
    return lsn


def create_slot(dsn: str, slot: str) -> int:
    """Create logical slot ``slot`` with wal2json in the DSN's database; returns its LSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'wal2json')",
                           (slot,)).fetchone()
    return parse_lsn(row[0])


def _drop_slot(conn: psycopg.Connection, slot: str) -> None:
    for _ in range(50):
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        except psycopg.errors.UndefinedObject:
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.2)  # its consumer is still exiting
    raise BenchError(f"slot {slot} stayed in use; drop it by hand: SELECT pg_drop_replication_slot('{slot}')")


def drop_slot(settings: Settings, slot: str) -> None:
    """Drop ``slot`` if it exists (waiting up to 10 s for its consumer to go away)."""
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        _drop_slot(conn, slot)


def slot_position(dsn: str, slot: str) -> tuple[bool, int]:
    """``(active, confirmed_flush_lsn)`` of ``slot`` (``(False, 0)`` if it does not exist)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots "
                           "WHERE slot_name = %s", (slot,)).fetchone()
    if not row:
        return False, 0
    return bool(row[0]), parse_lsn(row[1]) if row[1] else 0


def recvlogical_args(settings: Settings, dsn: str, slot: str, tables: list[str]) -> list[str]:
    """``pg_recvlogical --start`` on ``slot`` with exactly the wal2json options pgderive sends
    (:func:`cdc.wal2json.plugin_options`, including ``add-tables`` for ``tables``)."""
    args = [str(settings.pg_bin / "pg_recvlogical"), "-d", dsn, "-S", slot, "--start", "--no-loop"]
    for name, value in plugin_options(tables).items():
        args += ["-o", f"{name}={value}"]
    return args


def recvlogical_drain(settings: Settings, dsn: str, slot: str, end_lsn: int, tables: list[str],
                      output: str | Path = "/dev/null", timeout: float = 900) -> float:
    """Drain ``slot`` up to ``end_lsn`` with ``pg_recvlogical --endpos`` into ``output``;
    returns the wall seconds from spawning it to its exit."""
    args = recvlogical_args(settings, dsn, slot, tables) + ["--endpos", format_lsn(end_lsn), "-f", str(output)]
    t0 = time.monotonic()
    proc = subprocess.run(args, env=pg_env(settings), capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"pg_recvlogical failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed


def copy_count(dsn: str, query: str) -> tuple[int, float]:
    """Run ``COPY (query) TO STDOUT`` (or ``COPY table TO STDOUT`` if ``query`` is a table
    name), count the rows (text format: one newline per row) and discard the data; returns
    ``(rows, seconds)``."""
    source = f"({query})" if " " in query.strip() else query
    rows = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.monotonic()
        with conn.cursor().copy(f"COPY {source} TO STDOUT") as copy:
            for block in copy:
                rows += bytes(block).count(b"\n")
        elapsed = time.monotonic() - t0
    return rows, elapsed


def server_version(dsn: str) -> str:
    """The server's ``version()`` string, shortened to ``PostgreSQL 15.x``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return "PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0].split()[0]
