"""Entry point: run the enabled scenarios, then write the report, the plot and results.json.

A scenario that fails prints its error, gets a FAILED row, and the run goes on; the exit code
is 1 if anything failed (a missed target is not a failure), 0 otherwise. SIGTERM ends the run
like Ctrl-C: the running scenario's clean-up (databases, slots, indices, processes) still runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import orjson

from .report import Row, machine_info, now_utc, rows_to_json, write_plot, write_report
from .kafka import UNITS as KAFKA_UNITS
from .scenarios import UNITS, Context
from .settings import load_settings

__all__ = ["main"]


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C (``finally`` blocks clean up), exit 128 + signal."""
    raise SystemExit(128 + signum)


def main() -> int:
    """Run the benchmark with the environment's settings; returns the exit code."""
    signal.signal(signal.SIGTERM, _terminated)
    settings = load_settings()
    settings.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings)
    started = time.monotonic()
    date = now_utc()
    print(f"pgderive benchmark, {'quick' if settings.quick else 'full'} mode, {date}", flush=True)
    machine = machine_info(settings)
    for k, v in machine.items():
        print(f"  {k}: {v}")
    durations: dict[str, float] = {}
    failed = False
    for key, number, title, fn, enabled in UNITS + KAFKA_UNITS:
        if not enabled(settings) or (settings.units and key not in settings.units):
            continue
        print(f"\n== scenario {number}: {title} ==", flush=True)
        t0 = time.monotonic()
        try:
            fn(ctx)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - reported as a FAILED row, the run goes on
            failed = True
            detail = traceback.format_exc()
            (settings.out / f"error-{key}.txt").write_text(detail)
            print(detail, file=sys.stderr, flush=True)
            ctx.add(Row(number, title, error=f"{type(e).__name__}: {e}\n{detail}"))
        durations[f"{number}: {title}"] = time.monotonic() - t0
        print(f"   ({durations[f'{number}: {title}']:.0f} s)", flush=True)
    wall = time.monotonic() - started
    load = os.getloadavg()
    machine["Load average at end"] = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    meta = {"date": date, "wall_s": wall, "machine": machine,
            "command": "PGDERIVE_BENCH_QUICK=1 make bench" if settings.quick else "make bench"}
    plot = None
    try:
        plot = write_plot(settings.plot, ctx.rows, ctx.shared.get("scaling", []))
    except Exception as e:  # noqa: BLE001
        failed = True
        print(f"plot failed: {e!r}", file=sys.stderr)
    write_report(settings.report, ctx.rows, meta, plot, durations, settings)
    (settings.out / "results.json").write_bytes(orjson.dumps(
        {"meta": meta, "durations": durations, "rows": rows_to_json(ctx.rows),
         "scaling": ctx.shared.get("scaling", [])}, option=orjson.OPT_INDENT_2, default=str))
    print(f"\nreport: {settings.report}\nplot:   {settings.plot}\ntotal wall time {wall / 60:.1f} min", flush=True)
    if failed:
        print("some scenarios FAILED (see the report's Errors section)", file=sys.stderr)
    return 1 if failed else 0
