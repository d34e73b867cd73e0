"""The ``pgderive`` command line (click).

Commands: ``run`` (the daemon), ``validate``, ``status``, ``rebuild VIEW``. Every command takes
``-c/--config FILE`` (default ``$PGDERIVE_CONFIG`` or ``pgderive.yaml``). Exit codes: 0 ok,
1 operational error (message on stderr), 2 usage or configuration error.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import click
import psycopg
from rich.console import Console
from rich.table import Table

from cdc.lsn import format_lsn
from cdc.slot import slot_info

from .spec import Spec, SpecError, load_spec

log = logging.getLogger("pgderive")
_console = Console(stderr=False)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("opensearch", "urllib3", "elastic_transport"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: str) -> Spec:
    try:
        return load_spec(config)
    except FileNotFoundError:
        raise click.UsageError(f"config file not found: {config}")
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)


config_option = click.option("-c", "--config", envvar="PGDERIVE_CONFIG", default="pgderive.yaml",
                             show_default=True, type=click.Path(dir_okay=False),
                             help="YAML file declaring source, sinks and views.")


@click.group()
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(log_level: str) -> None:
    """pgderive: keep Redis and OpenSearch views in sync with PostgreSQL (wal2json slot)."""
    _setup_logging(log_level)


def _fail(e: BaseException) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


@main.command()
@config_option
@click.option("--resnapshot", is_flag=True,
              help="Drop the slot and this slot's state, then bootstrap every view from a new snapshot.")
@click.option("--stats-file", type=click.Path(dir_okay=False),
              help="Write a JSON summary (changes, ops, lag percentiles) here every 2 s.")
def run(config: str, resnapshot: bool, stats_file: str | None) -> None:
    """Run the daemon: bootstrap on first run, then stream. SIGTERM/SIGINT stop after a flush."""
    from .derive import DerivationError
    from .engine import Engine, EngineError
    from sinks.base import SinkError

    spec = _load(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            sys.exit(130)
        log.info("received %s: flushing and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = Engine(spec, stop=stop, stats_file=stats_file)
    try:
        engine.run(resnapshot=resnapshot)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except (EngineError, SinkError, DerivationError, psycopg.Error) as e:
        _fail(e)


@main.command()
@config_option
def validate(config: str) -> None:
    """Check the YAML and the source (tables, columns, keys, wal_level, wal2json)."""
    from .engine import build_views

    spec = _load(config)
    try:
        with psycopg.connect(spec.source.dsn, autocommit=True, connect_timeout=10) as conn:
            views = build_views(spec, conn)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except psycopg.Error as e:
        _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")
    click.echo(f"{config}: OK ({len(views)} view(s): {', '.join(v.name for v in views)})")


@main.command()
@config_option
def status(config: str) -> None:
    """Show the slot, its confirmed LSN, lag in bytes (and seconds while streaming), per-view state."""
    from .engine import build_views, open_sinks
    from .state import StateStore

    spec = _load(config)
    try:
        with psycopg.connect(spec.source.dsn, autocommit=True, connect_timeout=10) as conn:
            info = slot_info(conn, spec.source.slot)
            lag_s = None
            if info is not None and info.active_pid:
                row = conn.execute(
                    "SELECT extract(epoch FROM coalesce(flush_lag, interval '0')) FROM pg_stat_replication WHERE pid = %s",
                    (info.active_pid,)).fetchone()
                lag_s = float(row[0]) if row else None
            views = build_views(spec, conn)
        state = StateStore(spec.source.dsn).get(spec.source.slot)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except psycopg.Error as e:
        _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")
    t = Table(title=f"slot {spec.source.slot}", show_header=False)
    if info is None:
        t.add_row("slot", "absent (bootstraps on the next `pgderive run`)")
    else:
        t.add_row("active", f"yes (pid {info.active_pid})" if info.active else "no")
        t.add_row("confirmed LSN", format_lsn(info.confirmed_flush_lsn or 0))
        t.add_row("current WAL LSN", format_lsn(info.current_wal_lsn))
        t.add_row("lag", f"{info.lag_bytes} bytes" + (f", {lag_s:.3f} s" if lag_s is not None else ""))
    t.add_row("state", "none" if state is None else
              f"{state.status} (consistent point {format_lsn(state.consistent_point)})")
    _console.print(t)
    vt = Table(title="views")
    for col in ("view", "table", "sink", "records", "state"):
        vt.add_column(col)
    sinks = open_sinks(spec, views)
    try:
        for v in views:
            try:
                n = str(sinks[v.sink].count(v.name))
            except Exception as e:  # sink down: still show the rest
                n = f"? ({type(e).__name__})"
            vstate = "not bootstrapped" if state is None or v.name not in state.views else state.status
            vt.add_row(v.name, v.table, v.sink, n, vstate)
    finally:
        for s in sinks.values():
            s.close()
    _console.print(vt)


@main.command()
@config_option
@click.argument("view")
def rebuild(config: str, view: str) -> None:
    """Rebuild VIEW from a fresh consistent snapshot (stop `pgderive run` first)."""
    from .engine import EngineError
    from .rebuild import rebuild_view
    from sinks.base import SinkError

    spec = _load(config)
    try:
        lsn, stats = rebuild_view(spec, view)
    except SpecError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except (EngineError, SinkError, psycopg.Error) as e:
        _fail(e)
    rows = sum(stats.rows.values())
    click.echo(f"rebuilt {view} at {format_lsn(lsn)}: {rows} rows")


if __name__ == "__main__":  # pragma: no cover
    main()
