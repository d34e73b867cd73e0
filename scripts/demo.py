#!/usr/bin/env python3
"""`make demo`: pgbench → wal2json slot → pgderive → Redis + OpenSearch, then a full comparison,
then the same workload with the Redis views only, to show what OpenSearch costs the Redis views.

Run 1 ("all sinks", config/pgbench.yaml): (re)create database ``bench`` and ``pgbench -i -s
SCALE``; start ``pgderive run --resnapshot`` (bootstrap of SCALE × 100k accounts); run
``pgbench -c CLIENTS -R RATE -T SECONDS`` while it streams (a fixed rate, so both runs offer
the same transactions at the same times: an unthrottled pgbench saturates the machine and its
rate differs between the runs, and lag under saturation measures the run queue, not pgderive); wait until the slot's confirmed LSN reaches
the end of the workload; stop the daemon gracefully; print per view: rows in the source, records
in the sink, mismatches, snapshot rows/s; and per sink: Ops, batches, seconds busy and the lag
commit → acknowledged by that sink (p50/p99/max, from the stats file's ``sinks``).

Run 2 ("Redis only"): the same steps (fresh ``pgbench -i`` at the same scale, fresh slot via
``--resnapshot``, same ``-c``/``-R``/``-T``) with a config derived from config/pgbench.yaml that keeps
only the views whose sink is Redis (written to .services/demo/pgbench-redis-only.yaml).

Then a comparison table: each Redis sink's lag p50/p99 with all sinks vs Redis only, the ratio
and whether the p99 is within 2x; and each other sink's own lag. Both runs are saved in
.services/demo/result.json (stats files and daemon logs next to it). Exits 1 if any view of
either run has a mismatch.

At the end the replication slot (``pgderive_bench``) is dropped: an inactive slot makes Postgres
retain WAL until the disk fills. PGDERIVE_DEMO_KEEP_SLOT=1 keeps it (e.g. to run ``pgderive
status`` or resume the daemon afterwards).

Environment: PGDERIVE_DEMO_SCALE (10), PGDERIVE_DEMO_SECONDS (30), PGDERIVE_DEMO_CLIENTS (4),
PGDERIVE_DEMO_RATE (1000 transactions/s; 0 runs pgbench unthrottled), PGDERIVE_DEMO_KEEP_SLOT
(unset).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import yaml
from psycopg import sql
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc.lsn import format_lsn, parse_lsn  # noqa: E402
from pgderive.ops.verify import diff_view  # noqa: E402
from pgderive.runtime.sinks import open_sinks  # noqa: E402
from sinks.base import Refreshable  # noqa: E402
from views.check import build_views  # noqa: E402
from views.spec import Spec, load_spec  # noqa: E402
from demo_slot import drop_slot  # noqa: E402  (scripts/demo_slot.py)
from demo_live import cores_busy, cpu_sample, online_rebuild_under_load, single_view_loads  # noqa: E402  (scripts/demo_live.py)

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CONFIG = ROOT / "config" / "pgbench.yaml"
SCALE = int(os.environ.get("PGDERIVE_DEMO_SCALE", "10"))
SECONDS = int(os.environ.get("PGDERIVE_DEMO_SECONDS", "30"))
CLIENTS = int(os.environ.get("PGDERIVE_DEMO_CLIENTS", "4"))
RATE = int(os.environ.get("PGDERIVE_DEMO_RATE", "1000"))
RATE_ARGS = ["-R", str(RATE)] if RATE > 0 else []
WORKLOAD = f"{CLIENTS} clients × {SECONDS} s" + (f" at {RATE:,} tps" if RATE > 0 else " unthrottled")
OUT = ROOT / ".services" / "demo"
REDIS_ONLY_CONFIG = OUT / "pgbench-redis-only.yaml"
WITHIN = 2.0  # the Redis views' p99 lag with every sink must stay within this factor of Redis only
console = Console(width=int(os.environ.get("COLUMNS", "120")))


def step(msg: str) -> None:
    console.print(f"[bold cyan]==>[/] {msg}")


def main() -> int:
    spec = load_spec(CONFIG)
    dsn = spec.source.dsn
    OUT.mkdir(parents=True, exist_ok=True)
    redis_sinks = {name for name, s in spec.sinks.items() if s.type == "redis"}
    if not redis_sinks:
        raise SystemExit(f"{CONFIG} has no Redis sink to compare with")
    try:
        both = run_once("all sinks", CONFIG, "all")
        write_redis_only_config(redis_sinks)
        redis_only = run_once("Redis only", REDIS_ONLY_CONFIG, "redis-only")
        compare(spec, both, redis_only, redis_sinks)
        failed = both["failed"] or redis_only["failed"]
        (OUT / "result.json").write_bytes(orjson.dumps(
            {"scale": SCALE, "clients": CLIENTS, "seconds": SECONDS, "rate": RATE, "failed": failed,
             "runs": {"all_sinks": both, "redis_only": redis_only},
             "comparison": comparison_rows(both, redis_only, redis_sinks)},
            option=orjson.OPT_INDENT_2))
        console.print(f"summary of both runs: {OUT / 'result.json'}")
    finally:
        drop_slot(dsn, spec.source.slot, console)
    return 1 if failed else 0


# -- one run ------------------------------------------------------------------------------------
def run_once(label: str, config: Path, tag: str) -> dict[str, Any]:
    """Fresh database and slot, bootstrap, pgbench while streaming, catch up, stop, compare every
    view; prints the per-view and per-sink tables and returns the run's summary."""
    console.rule(f"[bold]run: {label}[/] ({config.relative_to(ROOT)})")
    spec = load_spec(config)
    dsn = spec.source.dsn
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": "5433", "PGUSER": "postgres"}

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
    stats_file = OUT / f"stats-{tag}.json"
    log_file = OUT / f"pgderive-{tag}.log"
    stats_file.unlink(missing_ok=True)
    with open(log_file, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "pgderive.cli", "run", "-c", str(config),
                                   "--resnapshot", "--stats-file", str(stats_file)],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0, cpu0 = time.monotonic(), cpu_sample()
        while not _streaming(dsn, spec.source.slot):
            if daemon.poll() is not None:
                console.print(log_file.read_text()[-4000:])
                raise SystemExit("pgderive exited during the bootstrap")
            time.sleep(0.5)
        bootstrap_s, bootstrap_cores = time.monotonic() - t0, cores_busy(cpu0, cpu_sample())
        console.print(f"    bootstrap finished in {bootstrap_s:.1f} s")

        step(f"pgbench -c {CLIENTS} {' '.join(RATE_ARGS)} -T {SECONDS} while pgderive streams")
        start_lsn = _current_lsn(dsn)
        bench = subprocess.run([str(PG_BIN / "pgbench"), "-n", "-c", str(CLIENTS), "-j", "2",
                                *RATE_ARGS, "-T", str(SECONDS), dbname], env=pg_env, check=True,
                               capture_output=True, text=True)
        tps_line = next((ln for ln in bench.stdout.splitlines() if ln.startswith("tps")), "").strip()
        console.print(f"    {tps_line}")
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
        if tag == "all":
            live = online_rebuild(config, spec, dbname, pg_env)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
    if code != 0:
        console.print(log_file.read_text()[-4000:])
        raise SystemExit(f"pgderive exited with {code}")
    stats = orjson.loads(stats_file.read_bytes())
    if tag == "all":
        live["bootstrap"] = bootstrap_ratio(config, spec, stats, bootstrap_cores)

    step("comparing every view with the source")
    with psycopg.connect(dsn, autocommit=True) as conn:
        views = build_views(spec, conn)
    table = Table(title=f"{label}: pgbench scale {SCALE}, {WORKLOAD}")
    for col in ("view", "sink", "source rows", "sink records", "mismatches", "snapshot rows/s",
                "sink write rows/s"):
        table.add_column(col, justify="right" if col != "view" else "left")
    failed = False
    view_rows = []
    sinks = open_sinks(spec, views)
    try:
        for v in views:
            sink = sinks[v.sink]
            if isinstance(sink, Refreshable):
                sink.refresh(v.name)
            d = diff_view(dsn, v, sink)
            failed |= d.mismatches > 0
            snap = stats.get("snapshot", {}).get("tables", {}).get(v.table, {})
            vsnap = stats.get("snapshot", {}).get("views", {}).get(v.name, {})
            view_rows.append({"view": v.name, "sink": v.sink, "source_rows": d.source_rows,
                              "sink_records": d.sink_records, "mismatches": d.mismatches})
            table.add_row(v.name, v.sink, f"{d.source_rows:,}", f"{d.sink_records:,}",
                          f"[{'red' if d.mismatches else 'green'}]{d.mismatches}[/]",
                          f"{snap.get('rows_per_s', 0):,}", f"{vsnap.get('sink_records_per_s') or 0:,}")
            for ex in d.examples:
                console.print(f"    [red]{v.name}: {ex}[/]")
    finally:
        for s in sinks.values():
            s.close()
    console.print(table)
    console.print(sink_table(f"{label}: lag per sink (commit → acknowledged by that sink)", spec, stats))
    lag = stats.get("lag_ms", {})
    elapsed_stream = max(1e-9, SECONDS + catchup)
    console.print(
        f"streamed {stats['transactions']:,} transactions / {stats['changes']:,} changes "
        f"({stats['changes'] / elapsed_stream:,.0f} changes/s over the run), "
        f"{stats['ops']:,} sink ops in {stats['flushes']:,} flushes; "
        f"end-to-end lag (commit → all sinks acknowledged): p50 {lag.get('p50')} ms, "
        f"p99 {lag.get('p99')} ms, max {lag.get('max')} ms")
    return {"label": label, "config": str(config.relative_to(ROOT)), "bootstrap_s": round(bootstrap_s, 1),
            "tps": _tps(tps_line), "wal_mb": round((end_lsn - start_lsn) / 1e6, 1),
            "catchup_s": round(catchup, 1), "failed": failed or (tag == "all" and not live["ok"]),
            "views": view_rows, "live": live if tag == "all" else None,
            "sink_types": {name: s.type for name, s in spec.sinks.items()}, "stats": stats}


def online_rebuild(config: Path, spec: Spec, dbname: str, pg_env: dict[str, str]) -> dict[str, Any]:
    """`pgderive rebuild account_search` while the daemon streams pgbench's load (scripts/demo_live.py)."""
    step(f"online rebuild of account_search under pgbench -c {CLIENTS} {' '.join(RATE_ARGS)}, readers polling it")
    pgbench = [str(PG_BIN / "pgbench"), "-n", "-c", str(CLIENTS), "-j", "2", *RATE_ARGS, dbname]
    r = online_rebuild_under_load(ROOT, config, spec, pgbench, pg_env, SCALE)
    lag = r["other_view_lag_ms"]
    r["ok"] = r["exit_code"] == 0 and r["gaps"] == 0 and r["regressions"] == 0
    colour = "green" if r["ok"] else "red"
    console.print(f"    rebuild took {r['seconds']:.1f} s: {' / '.join(r['output'])}")
    console.print(f"    [{colour}]readers: {r['reader_reads']:,} reads in {r['reader_polls']:,} polls, "
                  f"{r['gaps']} missing, {r['regressions']} version regressions[/]"
                  + ("" if r["ok"] else f" {r['examples']} {r['error']}"))
    console.print(f"    lag of {lag['view']} (commit → visible in Redis) p50/p99/max: before "
                  f"{_ms(lag['before']['p50'])}/{_ms(lag['before']['p99'])}/{_ms(lag['before']['max'])} ms "
                  f"({lag['before']['samples']} probes), during the rebuild {_ms(lag['during']['p50'])}/"
                  f"{_ms(lag['during']['p99'])}/{_ms(lag['during']['max'])} ms ({lag['during']['samples']} probes)")
    return r


def bootstrap_ratio(config: Path, spec: Spec, stats: dict[str, Any], bootstrap_cores: float) -> dict[str, Any]:
    """The bootstrap's load (parallel, ``bootstrap.concurrency``) against the sum of each view
    loaded alone (``pgderive rebuild --offline``), measured now on the same data, with the cores
    the machine kept busy during each (a load that keeps every core busy alone cannot gain from
    running beside another)."""
    step("single-view loads (pgderive rebuild --offline VIEW, one at a time) against the bootstrap")
    busy: dict[str, float] = {}
    alone = single_view_loads(ROOT, config, spec, busy)
    wall = float(stats.get("snapshot", {}).get("seconds") or 0.0)
    total = sum(alone.values())
    ratio = wall / total if total else None
    console.print(f"    bootstrap (concurrency {spec.bootstrap.concurrency}): {wall:.1f} s; views alone: "
                  + ", ".join(f"{n} {s:.1f} s" for n, s in alone.items())
                  + f" (sum {total:.1f} s); ratio {'—' if ratio is None else f'{ratio:.2f}'} (target ≤ 0.75)")
    console.print(f"    cores busy on this {os.cpu_count()}-core machine: bootstrap {bootstrap_cores:.2f}; alone: "
                  + ", ".join(f"{n} {c:.2f}" for n, c in busy.items()))
    return {"bootstrap_s": wall, "alone_s": alone, "sum_s": round(total, 2),
            "ratio": None if ratio is None else round(ratio, 2), "concurrency": spec.bootstrap.concurrency,
            "cores_busy": {"bootstrap": round(bootstrap_cores, 2), **{n: round(c, 2) for n, c in busy.items()}}}


def sink_table(title: str, spec: Spec, stats: dict[str, Any]) -> Table:
    table = Table(title=title)
    for col in ("sink", "type", "ops", "batches", "busy s", "lag p50 ms", "lag p99 ms", "lag max ms",
                "samples"):
        table.add_column(col, justify="left" if col in ("sink", "type") else "right")
    for name, s in stats.get("sinks", {}).items():
        lag = s.get("lag_ms", {})
        table.add_row(name, spec.sinks[name].type if name in spec.sinks else "?", f"{s['ops']:,}",
                      f"{s['batches']:,}", f"{s['busy_s']:.1f}", _ms(lag.get("p50")), _ms(lag.get("p99")),
                      _ms(lag.get("max")), f"{lag.get('samples', 0):,}")
    return table


# -- Redis only -----------------------------------------------------------------------------------
def write_redis_only_config(redis_sinks: set[str]) -> None:
    """config/pgbench.yaml with only the views whose sink is Redis (and only those sinks); the
    ${VAR} placeholders are kept, so both runs resolve the environment the same way."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["views"] = {name: v for name, v in raw["views"].items() if v["sink"] in redis_sinks}
    raw["sinks"] = {name: s for name, s in raw["sinks"].items() if name in redis_sinks}
    header = (f"# Generated by scripts/demo.py from {CONFIG.relative_to(ROOT)}: its Redis views only.\n"
              "# Do not edit: rewritten by every `make demo`.\n")
    REDIS_ONLY_CONFIG.write_text(header + yaml.safe_dump(raw, sort_keys=False))


def comparison_rows(both: dict[str, Any], redis_only: dict[str, Any], redis_sinks: set[str]) -> list[dict]:
    rows = []
    b_sinks, r_sinks = both["stats"].get("sinks", {}), redis_only["stats"].get("sinks", {})
    for name in sorted(b_sinks):
        b = b_sinks[name].get("lag_ms", {})
        r = r_sinks.get(name, {}).get("lag_ms", {}) if name in redis_sinks else {}
        for p in ("p50", "p99", "max"):
            bv, rv = b.get(p), r.get(p)
            ratio = bv / rv if bv is not None and rv else None
            rows.append({"sink": name, "type": both["sink_types"].get(name), "metric": p,
                         "all_sinks_ms": bv, "redis_only_ms": rv,
                         "ratio": None if ratio is None else round(ratio, 2),
                         "within_2x": None if ratio is None or p != "p99" else ratio <= WITHIN})
    return rows


def compare(spec: Spec, both: dict[str, Any], redis_only: dict[str, Any], redis_sinks: set[str]) -> None:
    console.rule("[bold]comparison[/]")
    table = Table(title=f"lag commit → acknowledged by the sink (ms): all sinks vs Redis only "
                        f"(pgbench scale {SCALE}, {WORKLOAD})")
    for col in ("sink", "type", "lag", "all sinks", "Redis only", "ratio", f"p99 within {WITHIN:g}x"):
        table.add_column(col, justify="left" if col in ("sink", "type", "lag") else "right")
    for row in comparison_rows(both, redis_only, redis_sinks):
        if row["sink"] in redis_sinks:
            verdict = ("" if row["within_2x"] is None else
                       "[green]yes[/]" if row["within_2x"] else "[red]no[/]")
            table.add_row(row["sink"], row["type"], row["metric"], _ms(row["all_sinks_ms"]),
                          _ms(row["redis_only_ms"]),
                          "—" if row["ratio"] is None else f"{row['ratio']:.2f}", verdict)
        else:  # not in the Redis-only run: its own lag only
            table.add_row(row["sink"], row["type"], row["metric"], _ms(row["all_sinks_ms"]), "—", "—", "")
    console.print(table)
    read_b, read_r = both["stats"].get("read_lag_ms", {}), redis_only["stats"].get("read_lag_ms", {})
    console.print(f"commit → read by pgderive (before any sink) p50/p99: all sinks "
                  f"{read_b.get('p50')}/{read_b.get('p99')} ms, Redis only {read_r.get('p50')}/{read_r.get('p99')} ms")
    lag_b, lag_r = both["stats"].get("lag_ms", {}), redis_only["stats"].get("lag_ms", {})
    console.print(f"end-to-end lag p50/p99: all sinks {lag_b.get('p50')}/{lag_b.get('p99')} ms, "
                  f"Redis only {lag_r.get('p50')}/{lag_r.get('p99')} ms; pgbench: all sinks "
                  f"{both['tps'] or 0:,.0f} tps ({both['stats']['transactions']:,} transactions streamed), "
                  f"Redis only {redis_only['tps'] or 0:,.0f} tps "
                  f"({redis_only['stats']['transactions']:,} transactions streamed)")


def _tps(line: str) -> float | None:
    """``tps = 1012.269933 (without initial connection time)`` → 1012.27."""
    try:
        return round(float(line.split()[2]), 2)
    except (IndexError, ValueError):
        return None


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


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
