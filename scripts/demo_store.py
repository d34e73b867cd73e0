#!/usr/bin/env python3
"""`make demo-store`: the widget store (scripts/store.py) → pgderive → Redis + OpenSearch, verified.

Steps: drop and recreate database ``store`` (and its replication slots), create the schema and
load it at ``--scale``; start ``pgderive run -c config/store.yaml --resnapshot --stats-file …``
in the background (log and stats in ``.services/demo-store/``); wait until it streams; run the
random workload (``--seconds``, ``--seed``) while it streams; wait until the slot's
``confirmed_flush_lsn`` reaches ``pg_current_wal_lsn()``; run ``pgderive verify -c
config/store.yaml VIEW`` for every view while the daemon still runs; then ``pgderive explain``
one order document (``order_cache``, an order with items, the newest) and one ``category_stats``
aggregate record (the largest category); print a table per view (sink, records, differences,
verify's exit code, seconds) and the workload's counts; stop the daemon with SIGTERM and drop
its replication slot (an inactive slot retains WAL) unless PGDERIVE_DEMO_KEEP_SLOT=1; and end
with the two explain reports.

Exits 0 when every verify and both explains exited 0 and the daemon ran and stopped cleanly, 1
otherwise (with the tail of the daemon log), 2 when the config cannot be loaded. ``.services/demo-store/result.json``
holds the summary.

Options default from the environment: PGDERIVE_STORE_SCALE (1), PGDERIVE_STORE_SECONDS (60),
PGDERIVE_STORE_SEED (1); the database and slot come from config/store.yaml
(PGDERIVE_STORE_DSN, PGDERIVE_STORE_SLOT).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import store  # noqa: E402
from cdc.lsn import format_lsn  # noqa: E402
from tests.support import current_lsn, slot_caught_up, streaming  # noqa: E402
from views.spec import SpecError, load_spec  # noqa: E402
from demo_slot import drop_slot  # noqa: E402  (scripts/demo_slot.py)

CONFIG = ROOT / "config" / "store.yaml"
OUT = ROOT / ".services" / "demo-store"
_VENV_PGDERIVE = ROOT / ".venv" / "bin" / "pgderive"
PGDERIVE = [str(_VENV_PGDERIVE)] if _VENV_PGDERIVE.exists() else [sys.executable, "-m", "pgderive.cli"]
BOOTSTRAP_TIMEOUT = 600.0
CATCHUP_TIMEOUT = 600.0
VERIFY_TIMEOUT = 900.0
console = Console(width=int(os.environ.get("COLUMNS", "120")))


class DemoFailed(Exception):
    """A step failed; the message says which and why."""


def step(msg: str) -> None:
    console.print(f"[bold cyan]==>[/] {msg}")


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the daemon log (or a note that there is none)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


_NUM = r"(\d[\d,_]*)"


def _int(text: str) -> int:
    return int(re.sub(r"[,_]", "", text))


def parse_verify(output: str) -> tuple[int | None, int | None]:
    """``(records, differences)`` from ``pgderive verify`` output, ``None`` where not found.

    Accepts a JSON object on one line (keys like ``sink_records``/``records`` and
    ``differences``/``mismatches`` or ``missing`` + ``extra`` + ``different``) or text such as
    ``sink records: 2,000 … missing 0, extra 0, different 0`` / ``2000 records, 0 differences``.
    verify's exit code stays the verdict; these numbers are for the table.
    """
    values: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            values = {k.lower().replace(" ", "_"): v for k, v in doc.items()
                      if isinstance(v, int) and not isinstance(v, bool)}
            break
    if not values:
        text = output.lower()
        for name in ("sink records", "sink_records", "records", "differences", "mismatches",
                     "missing", "extra", "different"):
            m = (re.search(rf"\b{name}\b\s*[:=]?\s*{_NUM}", text)
                 or re.search(rf"{_NUM}\s+{name}\b", text))
            if m:
                values[name.replace(" ", "_")] = _int(m.group(1))
    records = next((values[k] for k in ("sink_records", "records") if k in values), None)
    diffs = next((values[k] for k in ("differences", "mismatches") if k in values), None)
    if diffs is None and any(k in values for k in ("missing", "extra", "different")):
        diffs = sum(values.get(k, 0) for k in ("missing", "extra", "different"))
    return records, diffs


def fresh_database(dsn: str, scale: float) -> tuple[dict[str, int], float]:
    """Drop and recreate the store database, create the schema, load it; (rows, seconds)."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for slot, active in conn.execute(
                "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", (dbname,)).fetchall():
            if active:
                raise DemoFailed(f"replication slot {slot} of database {dbname} is in use (is another"
                                 " pgderive run still running?); stop it first")
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    store.schema(dsn)
    t0 = time.monotonic()
    rows = store.load(dsn, scale)
    return rows, time.monotonic() - t0


def run_workload(daemon: subprocess.Popen, dsn: str, seconds: float, seed: int, clients: int,
                 rate: float) -> dict[str, int]:
    """The workload in a thread while watching the daemon; stops early if the daemon dies."""
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["counts"] = store.workload(dsn, seconds, seed, clients, rate, stop=stop)
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=target, name="store-workload")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
            if daemon.poll() is not None:
                raise DemoFailed(f"pgderive exited with {daemon.returncode} during the workload")
    finally:
        stop.set()
        thread.join()
    if "error" in result:
        raise DemoFailed(f"the workload failed: {result['error']!r}")
    return result["counts"]


def wait_for(what: str, done, daemon: subprocess.Popen, timeout: float, interval: float = 0.5) -> float:
    """Poll ``done()`` until true; fail if the daemon exits or ``timeout`` passes. Returns seconds."""
    t0 = time.monotonic()
    while not done():
        if daemon.poll() is not None:
            raise DemoFailed(f"pgderive exited with {daemon.returncode} while waiting for {what}")
        if time.monotonic() - t0 > timeout:
            raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def verify(config: Path, view: str) -> dict[str, Any]:
    """Run ``pgderive verify -c CONFIG VIEW``: exit code, seconds, parsed numbers, output."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run([*PGDERIVE, "verify", "-c", str(config), view], cwd=ROOT,
                              capture_output=True, text=True, timeout=VERIFY_TIMEOUT)
        code, output = proc.returncode, proc.stdout + proc.stderr
        records, diffs = parse_verify(proc.stdout)  # the report; stderr has the log lines
        if records is None and diffs is None:
            records, diffs = parse_verify(output)
    except subprocess.TimeoutExpired as e:
        code, records, diffs = None, None, None
        output = f"(verify timed out after {VERIFY_TIMEOUT:.0f} s)\n{e.stdout or ''}{e.stderr or ''}"
    return {"view": view, "exit_code": code, "seconds": round(time.monotonic() - t0, 2),
            "records": records, "differences": diffs, "output": output}


def explain_examples(config: Path, dsn: str) -> list[dict[str, Any]]:
    """``pgderive explain`` of one order document and one category aggregate: the newest order
    that has items and a customer (likely written by the workload, so its version is a streamed
    commit) and the category with the most products. Returns ``{view, key, exit_code, output}``
    per explain."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        order = conn.execute("SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id "
                             "WHERE EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id) "
                             "ORDER BY o.id DESC LIMIT 1").fetchone()
        category = conn.execute("SELECT category_id FROM products WHERE category_id IS NOT NULL "
                                "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1").fetchone()
    out = []
    for view, key in (("order_cache", f"order:{order[0]}" if order else None),
                      ("category_stats", f"category_stats:{category[0]}" if category else None)):
        if key is None:
            out.append({"view": view, "key": None, "exit_code": None, "output": f"(no row to explain for {view})"})
            continue
        try:
            proc = subprocess.run([*PGDERIVE, "explain", "-c", str(config), view, key], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "COLUMNS": str(console.width)})
            code, output = proc.returncode, proc.stdout + (proc.stderr if proc.returncode else "")
        except subprocess.TimeoutExpired:
            code, output = None, "(explain timed out after 120 s)"
        out.append({"view": view, "key": key, "exit_code": code, "output": output})
    return out


def stop_daemon(daemon: subprocess.Popen) -> int:
    """SIGTERM (graceful: flush, confirm, exit 0); SIGKILL only if it hangs for 60 s."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            return daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            return -signal.SIGKILL
    return daemon.returncode


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=float(env.get("PGDERIVE_STORE_SCALE", "1")))
    p.add_argument("--seconds", type=float, default=float(env.get("PGDERIVE_STORE_SECONDS", "60")))
    p.add_argument("--seed", type=int, default=int(env.get("PGDERIVE_STORE_SEED", "1")))
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rate", type=float, default=100.0, help="workload transactions/s in total")
    p.add_argument("-c", "--config", type=Path, default=CONFIG)
    args = p.parse_args(argv)

    try:
        spec = load_spec(args.config)
    except SpecError as e:
        console.print(f"[red]{e}[/]")
        return 2
    dsn, slot = spec.source.dsn, spec.source.slot
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    OUT.mkdir(parents=True, exist_ok=True)
    log_file, stats_file = OUT / "pgderive.log", OUT / "stats.json"
    stats_file.unlink(missing_ok=True)

    counts: dict[str, int] = {}
    results: list[dict[str, Any]] = []
    explained: list[dict[str, Any]] = []
    problems: list[str] = []
    daemon: subprocess.Popen | None = None
    try:
        step(f"fresh database {dbname}: schema + load at scale {args.scale:g}")
        rows, load_s = fresh_database(dsn, args.scale)
        console.print(f"    loaded {sum(rows.values()):,} rows in {load_s:.1f} s: "
                      + ", ".join(f"{t} {n:,}" for t, n in rows.items()))

        step(f"starting pgderive run --resnapshot (log: {log_file.relative_to(ROOT)})")
        with open(log_file, "wb") as log:
            daemon = subprocess.Popen([*PGDERIVE, "run", "-c", str(args.config), "--resnapshot",
                                       "--stats-file", str(stats_file)],
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        took = wait_for("the bootstrap to finish", lambda: streaming(dsn, slot), daemon, BOOTSTRAP_TIMEOUT)
        console.print(f"    streaming after {took:.1f} s")

        step(f"workload: {args.clients} clients × {args.seconds:g} s at {args.rate:g} tx/s, seed {args.seed}")
        t0 = time.monotonic()
        counts = run_workload(daemon, dsn, args.seconds, args.seed, args.clients, args.rate)
        console.print(f"    {counts['transactions']:,} transactions in {time.monotonic() - t0:.1f} s"
                      f" ({counts['retried']} retried after races, {counts['failed']} failed)")
        if counts["failed"]:
            problems.append(f"{counts['failed']} workload transaction(s) failed 20 times")

        end = current_lsn(dsn)
        step(f"waiting for slot {slot} to confirm {format_lsn(end)}")
        took = wait_for(f"slot {slot} to confirm {format_lsn(end)}",
                        lambda: slot_caught_up(dsn, slot, end), daemon, CATCHUP_TIMEOUT, 0.2)
        console.print(f"    caught up {took:.1f} s after the workload")

        step("pgderive verify, every view (daemon still running)")
        for name in spec.views:
            r = verify(args.config, name)
            results.append(r)
            ok = r["exit_code"] == 0
            console.print(f"    {name}: exit {r['exit_code']} in {r['seconds']:.1f} s")
            if not ok:
                problems.append(f"verify {name} exited with {r['exit_code']}")
                console.print("      " + "\n      ".join(r["output"].strip().splitlines()[-15:]))
        if daemon.poll() is not None:
            raise DemoFailed(f"pgderive exited with {daemon.returncode} during verify")

        step("pgderive explain: one order document and one category aggregate (shown at the end)")
        explained = explain_examples(args.config, dsn)
        for e in explained:
            console.print(f"    {e['view']} {e['key']}: exit {e['exit_code']}")
            if e["exit_code"] != 0:
                problems.append(f"explain {e['view']} {e['key']} exited with {e['exit_code']}")
    except DemoFailed as e:
        problems.append(str(e))
        console.print(f"[red]error: {e}[/]")
        console.print(f"[dim]--- tail of {log_file} ---[/]\n{log_tail(log_file)}")
    finally:
        if daemon is not None:
            was_running = daemon.poll() is None
            code = stop_daemon(daemon)
            if was_running and code != 0:
                problems.append(f"pgderive exited with {code} after SIGTERM (expected 0)")
                console.print(f"[red]pgderive exited with {code} after SIGTERM[/]\n{log_tail(log_file)}")
            drop_slot(dsn, slot, console)

    _report(spec, args, results, counts, stats_file)
    (OUT / "result.json").write_text(json.dumps(
        {"views": [{k: v for k, v in r.items() if k != "output"} for r in results],
         "explained": [{k: v for k, v in e.items() if k != "output"} for e in explained],
         "workload": counts, "problems": problems}, indent=2))
    for e in explained:
        console.rule(f"pgderive explain -c {args.config.name} {e['view']} {e['key']}  (exit {e['exit_code']})")
        console.out(e["output"].rstrip(), highlight=False)
    if problems:
        console.print("[bold red]FAILED:[/] " + "; ".join(problems))
        return 1
    console.print("[bold green]OK:[/] every view verified, both records explained equal")
    return 0


def _report(spec, args, results: list[dict[str, Any]], counts: dict[str, int], stats_file: Path) -> None:
    if results:
        t = Table(title=f"pgderive demo-store: scale {args.scale:g}, {args.clients} clients × {args.seconds:g} s")
        for col in ("view", "sink", "records", "differences", "verify exit", "seconds"):
            t.add_column(col, justify="left" if col in ("view", "sink") else "right")
        for r in results:
            sink = spec.views[r["view"]].sink_name
            ok = r["exit_code"] == 0
            diffs = "?" if r["differences"] is None else f"{r['differences']:,}"
            t.add_row(r["view"], f"{sink} ({spec.sinks[sink].type})",
                      "?" if r["records"] is None else f"{r['records']:,}",
                      f"[{'green' if r['differences'] == 0 else 'red'}]{diffs}[/]",
                      f"[{'green' if ok else 'red'}]{r['exit_code']}[/]", f"{r['seconds']:.1f}")
        console.print(t)
    if counts:
        t = Table(title="workload (committed transactions per kind)")
        t.add_column("kind")
        t.add_column("count", justify="right")
        for kind, n in counts.items():
            t.add_row(kind, f"{n:,}")
        console.print(t)
    try:
        stats = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return
    lag = stats.get("lag_ms", {})
    console.print(f"streamed {stats.get('transactions', 0):,} transactions / {stats.get('changes', 0):,} changes, "
                  f"{stats.get('ops', 0):,} sink ops; end-to-end lag p50 {lag.get('p50')} ms, "
                  f"p99 {lag.get('p99')} ms, max {lag.get('max')} ms")


if __name__ == "__main__":
    sys.exit(main())
