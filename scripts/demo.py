#!/usr/bin/env python3
"""`make demo`: pgbench → wal2json slot → pgderive → Redis + OpenSearch, then a full comparison.

Steps: (re)create database ``bench`` and ``pgbench -i -s SCALE``; start ``pgderive run
--resnapshot`` (bootstrap of SCALE × 100k accounts); run ``pgbench -c 4 -T 30`` while it
streams; wait until the slot's confirmed LSN reaches the end of the workload; stop the daemon
gracefully; print per view: rows in the source, records in the sink, mismatches, snapshot rows/s
and the end-to-end lag. Exits 1 if any view has a mismatch.

Environment: PGDERIVE_DEMO_SCALE (10), PGDERIVE_DEMO_SECONDS (30), PGDERIVE_DEMO_CLIENTS (4).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc.lsn import format_lsn, parse_lsn  # noqa: E402
from views.check import build_views
from pgderive.runtime.sinks import open_sinks  # noqa: E402
from views.spec import load_spec  # noqa: E402
from pgderive.ops.verify import diff_view  # noqa: E402

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CONFIG = ROOT / "config" / "pgbench.yaml"
SCALE = int(os.environ.get("PGDERIVE_DEMO_SCALE", "10"))
SECONDS = int(os.environ.get("PGDERIVE_DEMO_SECONDS", "30"))
CLIENTS = int(os.environ.get("PGDERIVE_DEMO_CLIENTS", "4"))
OUT = ROOT / ".services" / "demo"
console = Console(width=int(os.environ.get("COLUMNS", "120")))


def step(msg: str) -> None:
    console.print(f"[bold cyan]==>[/] {msg}")


def main() -> int:
    spec = load_spec(CONFIG)
    dsn = spec.source.dsn
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": "5433", "PGUSER": "postgres"}
    OUT.mkdir(parents=True, exist_ok=True)

    step(f"fresh database {dbname}: pgbench -i -s {SCALE}")
    with psycopg.connect(admin, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                    (dbname,)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    init = subprocess.run([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(SCALE), dbname], env=pg_env,
                          capture_output=True, text=True)
    if init.returncode != 0:
        raise SystemExit(f"pgbench -i failed:\n{init.stderr}")

    step("starting pgderive run (bootstrap from an exported snapshot, then streaming)")
    stats_file = OUT / "stats.json"
    log_file = OUT / "pgderive.log"
    stats_file.unlink(missing_ok=True)
    with open(log_file, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "run", "-c", str(CONFIG),
                                   "--resnapshot", "--stats-file", str(stats_file)],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not _streaming(dsn, spec.source.slot):
            if daemon.poll() is not None:
                console.print(log_file.read_text()[-4000:])
                raise SystemExit("pgderive exited during the bootstrap")
            time.sleep(0.5)
        console.print(f"    bootstrap finished in {time.monotonic() - t0:.1f} s")

        step(f"pgbench -c {CLIENTS} -T {SECONDS} while pgderive streams")
        start_lsn = _current_lsn(dsn)
        bench = subprocess.run([str(PG_BIN / "pgbench"), "-n", "-c", str(CLIENTS), "-j", "2",
                                "-T", str(SECONDS), dbname], env=pg_env, check=True,
                               capture_output=True, text=True)
        tps = next((ln for ln in bench.stdout.splitlines() if ln.startswith("tps")), "")
        console.print(f"    {tps.strip()}")
        end_lsn = _current_lsn(dsn)
        step(f"waiting for the slot to confirm {format_lsn(end_lsn)} "
             f"({(end_lsn - start_lsn) / 1e6:.0f} MB of WAL)")
        t1 = time.monotonic()
        while _confirmed(dsn, spec.source.slot) < end_lsn:
            if daemon.poll() is not None:
                console.print(log_file.read_text()[-4000:])
                raise SystemExit("pgderive exited while streaming")
            if time.monotonic() - t1 > 600:
                raise SystemExit("the slot did not catch up within 10 minutes")
            time.sleep(0.2)
        catchup = time.monotonic() - t1
        console.print(f"    caught up {catchup:.1f} s after pgbench ended")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
    if code != 0:
        console.print(log_file.read_text()[-4000:])
        raise SystemExit(f"pgderive exited with {code}")
    stats = orjson.loads(stats_file.read_bytes())

    step("comparing every view with the source")
    with psycopg.connect(dsn, autocommit=True) as conn:
        views = build_views(spec, conn)
    table = Table(title=f"pgderive demo: pgbench scale {SCALE}, {CLIENTS} clients × {SECONDS} s")
    for col in ("view", "sink", "source rows", "sink records", "mismatches", "snapshot rows/s",
                "sink write rows/s"):
        table.add_column(col, justify="right" if col != "view" else "left")
    failed = False
    sinks = open_sinks(spec, views)
    for v in views:
        sink = sinks[v.sink]
        if hasattr(sink, "refresh"):
            sink.refresh(v.name)
        d = diff_view(dsn, v, sink)
        failed |= d.mismatches > 0
        snap = stats.get("snapshot", {}).get("tables", {}).get(v.table, {})
        vsnap = stats.get("snapshot", {}).get("views", {}).get(v.name, {})
        table.add_row(v.name, v.sink, f"{d.source_rows:,}", f"{d.sink_records:,}",
                      f"[{'red' if d.mismatches else 'green'}]{d.mismatches}[/]",
                      f"{snap.get('rows_per_s', 0):,}", f"{vsnap.get('sink_records_per_s') or 0:,}")
        for ex in d.examples:
            console.print(f"    [red]{v.name}: {ex}[/]")
    for s in sinks.values():
        s.close()
    console.print(table)
    lag = stats.get("lag_ms", {})
    elapsed_stream = max(1e-9, SECONDS + catchup)
    console.print(
        f"streamed {stats['transactions']:,} transactions / {stats['changes']:,} changes "
        f"({stats['changes'] / elapsed_stream:,.0f} changes/s over the run), "
        f"{stats['ops']:,} sink ops in {stats['flushes']:,} flushes; "
        f"end-to-end lag (commit → all sinks acknowledged): p50 {lag.get('p50')} ms, "
        f"p99 {lag.get('p99')} ms, max {lag.get('max')} ms")
    (OUT / "result.json").write_bytes(orjson.dumps({"stats": stats, "failed": failed}))
    return 1 if failed else 0


def _streaming(dsn: str, slot: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('pgderive.slot_state')").fetchone()[0] is None:
            return False
        row = conn.execute("SELECT status FROM pgderive.slot_state WHERE slot = %s", (slot,)).fetchone()
    return bool(row and row[0] == "streaming")


def _current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def _confirmed(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


if __name__ == "__main__":
    sys.exit(main())
