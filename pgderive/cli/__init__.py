"""The ``pgderive`` command line (click).

Commands: ``run`` (the daemon), ``validate``, ``init`` (an admin creates schema ``pgderive``),
``status``, ``rebuild VIEW`` (online through the running daemon, or ``--offline``), ``reload``,
``drop VIEW`` (a retired view's data, :mod:`pgderive.ops.drop`), ``verify VIEW [--repair]``
(:mod:`pgderive.ops.verify`), ``explain VIEW KEY [--json]`` (:mod:`pgderive.ops.explain`), ``lineage [--format text|json|dot]`` (:mod:`pgderive.ops.lineage`), ``dead-letters list|retry|discard`` (rows a view could not derive,
see :mod:`pgderive.state.deadletters`). Every command takes
``-c/--config FILE`` (default ``$PGDERIVE_CONFIG`` or ``pgderive.yaml``). Exit codes: 0 ok,
1 operational error (message on stderr), 2 usage or configuration error.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Callable, NoReturn, TypeVar

import click
import psycopg
from rich.markup import escape
from rich.console import Console
from rich.table import Table

from cdc.lsn import format_lsn
from cdc.redact import register_secrets, scrub

from views.spec import Spec, SpecError, load_spec

from ..runtime.logs import LOG_FORMATS, configure_logging, debugging

if TYPE_CHECKING:
    from rich.console import RenderableType

    from ..ops.status import SlotStatus
    from ..state.rebuilds import Rebuild
    from ..runtime.coordinator import Engine
    from ..runtime.worker import Worker
    from ..http.server import HttpEndpoint

log = logging.getLogger("pgderive")
_F = TypeVar("_F", bound=Callable[..., object])
# Not a terminal (a pipe, a log): wide enough that no table wraps a view name or an LSN.
_console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)


def _setup_logging(level: str, fmt: str = "text") -> None:
    configure_logging(getattr(logging, level.upper(), logging.INFO), fmt.lower())


def _log_format_option(envvar: str | None, default: str | None) -> Callable[[_F], _F]:
    """``--log-format text|json``: the root group's (default ``$PGDERIVE_LOG_FORMAT``, else
    text) and ``run``'s (overrides it when given)."""
    return click.option("--log-format", envvar=envvar, default=default, show_default=default is not None,
                        type=click.Choice(LOG_FORMATS, case_sensitive=False),
                        help="Log lines as text, or as one JSON object per line (keys time, level, logger, "
                             "message, and view, sink, lsn, xid, table where they apply).")


class _Group(click.Group):
    """The root command: the last-resort handler. An exception no command turned into a message
    becomes one line ``error: …`` (secrets scrubbed) and exit code 1; the traceback only with
    ``--log-level debug``. ``click`` usage errors (2), ``sys.exit`` and Ctrl-C keep theirs."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SpecError as e:  # a configuration problem found late: still exit 2
            click.echo(scrub(str(e)), err=True)
            sys.exit(2)
        except RecursionError:
            _unexpected("the configuration or data is nested too deeply (RecursionError)")
        except MemoryError:
            _unexpected("out of memory")
        except Exception as e:
            _unexpected(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _unexpected(message: str) -> NoReturn:
    if debugging():
        log.debug("unexpected error", exc_info=True)
    click.echo(f"error: {_one_line(message)}" + ("" if debugging() else " (--log-level debug shows the"
                                                  " traceback)"), err=True)
    sys.exit(1)


def _one_line(text: str, width: int = 2000) -> str:
    """``text`` scrubbed of secrets, on one line (libpq's messages span several)."""
    return scrub(" ".join(str(text).split()))[:width]


def _size(n: int) -> str:
    """``n`` bytes for a person: ``"0 B"``, ``"1.5 MiB"``, ``"6.6 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _load(config: str) -> Spec:
    try:
        spec = load_spec(config)
    except FileNotFoundError:
        raise click.UsageError(f"config file not found: {config}")
    except SpecError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(2)
    register_secrets(spec.secrets())  # scrubbed from every message and log line from now on
    return spec


config_option = click.option("-c", "--config", envvar="PGDERIVE_CONFIG", default="pgderive.yaml",
                             show_default=True, type=click.Path(dir_okay=False),
                             help="YAML file declaring source, sinks and views.")


@click.group(cls=_Group)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@_log_format_option("PGDERIVE_LOG_FORMAT", "text")
def main(log_level: str, log_format: str) -> None:
    """pgderive: keep Redis and OpenSearch views in sync with PostgreSQL (wal2json slot)."""
    _setup_logging(log_level, log_format)


def _fail(e: BaseException | str) -> NoReturn:
    """``error: e`` on one line, secrets scrubbed (:func:`cdc.redact.scrub`), and exit 1."""
    click.echo(f"error: {_one_line(str(e))}", err=True)
    sys.exit(1)


@main.command()
@config_option
@click.option("--resnapshot", is_flag=True,
              help="Drop the slot and this slot's state, then bootstrap every view from a new snapshot.")
@click.option("--stats-file", type=click.Path(dir_okay=False),
              help="Write a JSON summary (changes, ops, lag percentiles) here every 2 s.")
@click.option("--http", "http_listen", metavar="HOST:PORT|off", envvar="PGDERIVE_HTTP",
              help="Serve /metrics, /healthz, /readyz, /status, /explain and the status page here "
                   "(default: $PGDERIVE_HTTP, else the YAML's http.listen, else 127.0.0.1:9187; "
                   "port 0: any free port).")
@_log_format_option(None, None)
def run(config: str, resnapshot: bool, stats_file: str | None, http_listen: str | None,
        log_format: str | None) -> None:
    """Run the daemon: bootstrap on first run, then stream. SIGTERM/SIGINT stop after a flush."""
    if log_format is not None:  # `run --log-format`, after the group's option
        configure_logging(logging.getLogger().level, log_format.lower())
    from views.derive import DerivationError

    from ..runtime.coordinator import Engine
    from ..runtime.errors import EngineError, Terminated
    from ..runtime.worker import Worker
    from sinks.base import SinkError

    spec = _load(config)
    stop = threading.Event()
    engine: Engine | Worker | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second signal: exiting now")
            sys.exit(130)
        log.info("received %s: stopping", name)
        if engine is None:
            raise Terminated(name, "starting")
        engine.interrupt(name)  # sets stop; raises Terminated where stopping at once is safe

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        if engine is None:
            log.warning("received SIGHUP while starting: ignored (send it again once the daemon streams)")
            return
        log.info("received SIGHUP: reloading %s", config)
        engine.request_reload()

    def reload_spec() -> Spec:
        new = load_spec(config)
        register_secrets(new.secrets())
        return new

    # Installed before anything can block, so the first SIGTERM is honoured at every phase.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    endpoint = None
    try:
        if spec.source.kafka is not None:  # a derivation worker (ARCHITECTURE.md, "Kafka workers")
            engine = Worker(spec, stop=stop, stats_file=stats_file)
        else:
            engine = Engine(spec, stop=stop, stats_file=stats_file, reload_spec=reload_spec)
        endpoint = _start_http(engine, spec, http_listen)
        _run_engine(engine, resnapshot)
    except Terminated as e:
        _fail(f"{e}; nothing was started (no slot was left behind)")
    except SpecError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(2)
    except (EngineError, SinkError, DerivationError, psycopg.Error) as e:
        _fail(e)
    finally:
        if endpoint is not None:
            endpoint.close()


def _start_http(engine: "Engine | Worker", spec: Spec, option: str | None) -> "HttpEndpoint | None":
    """Start the daemon's HTTP endpoint (ARCHITECTURE.md, "Monitoring") where ``--http`` or
    the YAML's ``http.listen`` say, else on 127.0.0.1:9187; None for ``off``. An address that
    was asked for must bind (else exit 1 naming it); the default one, taken (e.g. by another
    pgderive on this machine), is skipped with a warning."""
    from ..http.server import HttpEndpoint, HttpSettings, parse_listen

    explicit = option is not None or "listen" in spec.http.model_fields_set
    listen = spec.http.listen if option is None else (None if option.strip().lower() == "off" else option.strip())
    if listen is None:
        return None
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        click.echo(f"error: --http: {e}", err=True)
        sys.exit(2)
    settings = HttpSettings(host, port, spec.http.stall_seconds, spec.http.ready_lag_seconds)

    def status() -> dict[str, object]:
        # The facts of `pgderive status` (source, sinks, pgderive's tables), on the endpoint's
        # thread, at most every 2 s (HttpEndpoint caches them).
        # engine.spec: the views of the last reload, not those of the start.
        from ..ops.status import slot_status, status_document
        from ..runtime.worker import Worker

        doc = status_document(slot_status(engine.spec))
        if isinstance(engine, Worker):
            doc["worker"] = engine.kafka_status()
        return doc

    def explain(view: str, key: str, wait: float) -> dict[str, object]:
        # `pgderive explain --json` on the endpoint's thread; usage errors become 404/400.
        from ..ops.explain import explain as explain_key, explanation_document
        return explanation_document(explain_key(engine.spec, view, key, wait=wait))

    try:
        endpoint = HttpEndpoint(engine, settings, status=status, explain=explain)
    except OSError as e:
        if explicit:
            _fail(f"cannot serve HTTP on {listen}: {e.strerror or e} (set http.listen, or --http off)")
        log.warning("HTTP endpoint not started: %s is taken (%s); set http.listen or --http to serve it elsewhere",
                    listen, e.strerror or e)
        return None
    endpoint.start()
    return endpoint


def _run_engine(engine: "Engine | Worker", resnapshot: bool) -> None:
    """``engine.run``; a failed preflight (nothing created) exits with its own code: 2 for
    configuration and privilege problems, 1 when a service was unreachable."""
    from ..runtime.preflight import PreflightError

    try:
        engine.run(resnapshot=resnapshot)
    except PreflightError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(e.exit_code)


@main.command()
@config_option
def validate(config: str) -> None:
    """Check the YAML, the source (tables, columns, keys, wal_level, wal2json), every sink
    (reachable, credentials accepted, index names free) and every privilege `run` needs.
    Reports every problem; exit code 2 for configuration or privilege problems, 1 when the
    source or a sink cannot be reached."""
    spec = _load(config)
    sys.exit(_validate(spec, config))


def _validate(spec: Spec, config: str) -> int:
    """Run every check of ``validate``, print every problem (stderr) or the OK line (stdout);
    return the exit code."""
    from views.check import build_views

    from ..runtime.waiting import waiting
    from ..runtime.preflight import (Problem, as_spec_error, check_kafka, check_names, check_privileges, check_sinks,
                                     open_spec_sinks)

    problems: list[Problem] = []
    spec_error: SpecError | None = None
    views: list[str] = []
    sinks, problems = open_spec_sinks(spec)
    try:
        problems += check_sinks(sinks)
        problems += check_names(spec, sinks)
        problems += check_kafka(spec)
    finally:
        for sink in sinks.values():
            sink.close()
    source_error: str | None = None
    try:
        with waiting(f"connecting to the source {spec.source.redacted_dsn()}", log,
                     limit=spec.source.connect_timeout or None):
            conn = psycopg.connect(spec.source.conninfo(), autocommit=True)
        with conn:
            try:
                views = [v.name for v in build_views(spec, conn)]
            except SpecError as e:
                spec_error = e
            problems += check_privileges(spec, conn)
    except psycopg.Error as e:
        source_error = f"cannot reach the source {spec.source.redacted_dsn()}: {' '.join(str(e).split())}"
    if spec_error is not None:
        click.echo(scrub(str(spec_error)), err=True)
    if problems:
        click.echo(scrub(str(as_spec_error(spec, problems))), err=True)
    if source_error is not None:
        click.echo(scrub(f"error: {source_error}"), err=True)
    if source_error is not None or any(p.unreachable for p in problems):
        return 1
    if spec_error is not None or problems:
        return 2
    click.echo(f"{config}: OK ({len(views)} view(s): {', '.join(views)}; sinks reachable, privileges sufficient)")
    return 0


@main.command()
@config_option
@click.option("--owner", metavar="ROLE",
              help="Make ROLE (the role in the config's DSN) own schema pgderive and its tables.")
@click.option("--dsn", "admin_dsn", envvar="PGDERIVE_ADMIN_DSN", metavar="DSN",
              help="Connect as this (admin) role instead of the config's source.dsn "
                   "(default $PGDERIVE_ADMIN_DSN).")
def init(config: str, owner: str | None, admin_dsn: str | None) -> None:
    """Create schema pgderive in the source database and apply its migrations, as an admin,
    once: afterwards a role with LOGIN REPLICATION, SELECT on the views' tables and the
    schema (owned with --owner, or granted) runs without CREATE on the database."""
    spec = _load(config)
    sys.exit(_init(spec, owner, admin_dsn))


def _init(spec: Spec, owner: str | None, admin_dsn: str | None) -> int:
    """``pgderive init``: returns the exit code (0 done, 1 Postgres refused or unreachable,
    2 unknown ``owner``)."""
    from views.spec import redact_dsn

    from ..state.schema import SCHEMA, SchemaVersionError, init_schema

    dsn = admin_dsn or spec.source.dsn
    where = redact_dsn(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="pgderive-init") as conn:
            version = init_schema(conn, owner)
            database = conn.info.dbname
    except LookupError as e:
        click.echo(f"error: --owner: {e}", err=True)
        return 2
    except SchemaVersionError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except psycopg.Error as e:
        message = (e.diag.message_primary if isinstance(e, psycopg.errors.DatabaseError) else None) or str(e)
        click.echo(f"error: cannot initialise schema {SCHEMA} on {where}: {' '.join(message.split())} "
                   "(run it as a role with CREATE on the database, e.g. --dsn with the admin's DSN)", err=True)
        return 1
    click.echo(f"schema {SCHEMA} in database {database} is at version {version}"
               + (f", owned by {owner}" if owner else ""))
    return 0


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the same facts as one JSON document (stable keys, units in their names).")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Refresh the tables every SECONDS (default 2) until Ctrl-C.")
def status(config: str, as_json: bool, watch: float | None) -> None:
    """Show the slot, its confirmed LSN, lag in bytes (and seconds while streaming), retained WAL,
    per view its records, checkpoint and state, online rebuilds, retired views and idle slots.

    --json prints them as one JSON document (keys: pgderive.ops.status.status_document);
    --watch refreshes the tables in place every SECONDS until Ctrl-C (exit 0)."""
    if as_json and watch is not None:
        raise click.UsageError("--json and --watch cannot be combined: --json prints one document; "
                               "run it again (e.g. from `watch`) to poll")
    spec = _load(config)
    if watch is not None:
        _watch_status(spec, watch)
        return
    st = _gather_status(spec)
    if as_json:
        import orjson

        from ..ops.status import status_document

        click.echo(orjson.dumps(status_document(st), option=orjson.OPT_INDENT_2).decode())
        return
    _console.print(_status_tables(st))
    _warn_idle(st)


def _gather_status(spec: Spec) -> "SlotStatus":
    """:func:`~pgderive.ops.status.slot_status`, its errors as one line: a spec that does not
    match the source exits 2, an unreachable source ``error: cannot reach the source …`` exit 1."""
    from ..ops.status import slot_status

    try:
        return slot_status(spec)
    except SpecError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(2)
    except psycopg.Error as e:
        _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")


def _status_tables(st: "SlotStatus") -> "RenderableType":
    """The tables of ``pgderive status``: slot, views, online rebuilds and retired views (the
    last two only when there are any)."""
    from rich.console import Group

    info = st.info
    if st.kafka is not None:
        return _worker_tables(st)
    t = Table(title=f"slot {escape(st.slot)}", show_header=False)
    if info is None:
        t.add_row("slot", "absent (bootstraps on the next `pgderive run`)")
    else:
        t.add_row("active", f"yes (pid {info.active_pid})" if info.active else "no")
        t.add_row("confirmed LSN", format_lsn(info.confirmed_flush_lsn or 0))
        t.add_row("current WAL LSN", format_lsn(info.current_wal_lsn))
        t.add_row("lag", f"{info.lag_bytes} bytes" + (f", {st.lag_s:.3f} s" if st.lag_s is not None else ""))
        t.add_row("retained WAL", "?" if info.retained_bytes is None else
                  f"{info.retained_bytes} bytes ({_size(info.retained_bytes)})")
    t.add_row("state", "none" if st.state is None else
              f"{st.word} (consistent point {format_lsn(st.state.consistent_point)})")
    tables: list[RenderableType] = [t]
    vt = Table(title="views")
    for col in ("view", "table", "sink", "records", "checkpoint", "state", "dead letters"):
        vt.add_column(col)
    for v in st.views:
        if v.error is not None:
            records = checkpoint = f"? ({v.error})"
        else:
            records = str(v.records)
            behind = st.behind(v.checkpoint)
            checkpoint = "none" if v.checkpoint is None else (
                format_lsn(v.checkpoint) + ("" if behind is None else f" ({_size(behind)} behind)"))
        vt.add_row(v.name, v.table, v.sink, records, checkpoint, v.state,
                   "?" if v.dead_letters is None else str(v.dead_letters))
    tables.append(vt)
    if st.rebuilds:
        bt = Table(title="online rebuilds")
        for col in ("view", "reason", "progress", "updated"):
            bt.add_column(col)
        for r in st.rebuilds:
            bt.add_row(r.view, escape(scrub(r.reason)), escape(scrub(_rebuild_line(r))),
                       r.updated_at.strftime("%Y-%m-%d %H:%M:%S"))
        tables.append(bt)
    if st.retired:
        from ..ops.drop import describe

        rt = Table(title="retired views")
        for col in ("view", "layout", "state"):
            rt.add_column(col)
        for entry in st.retired:
            rt.add_row(escape(entry.view), escape(describe(entry)),
                       f"retired, data kept: run `pgderive drop {escape(entry.view)}`")
        tables.append(rt)
    return Group(*tables)


def _worker_tables(st: "SlotStatus") -> "RenderableType":
    """``pgderive status`` of derivation workers: the consumer group (state, members, per
    partition its owner, committed offset and lag) and the views (records, dead letters; no
    checkpoints: a worker keeps none)."""
    from rich.console import Group

    g = st.kafka
    assert g is not None
    t = Table(title=f"kafka group {escape(g.group)}", show_header=False)
    if g.error is not None:
        t.add_row("error", escape(scrub(g.error)))
    else:
        t.add_row("state", g.state or "?")
        t.add_row("members", escape(", ".join(g.members)) or "none (no worker runs)")
        lags = [p.lag for p in g.partitions]
        t.add_row("lag", "?" if any(n is None for n in lags) else f"{sum(n for n in lags if n is not None)} messages")
    t.add_row("state kept as", escape(st.slot))
    pt = Table(title="partitions")
    for col in ("topic", "partition", "owner", "committed", "end", "lag"):
        pt.add_column(col)
    for p in g.partitions:
        pt.add_row(escape(p.topic), str(p.partition), escape(p.owner or "-"),
                   "-" if p.committed is None else str(p.committed), "?" if p.end is None else str(p.end),
                   "?" if p.lag is None else str(p.lag))
    vt = Table(title="views")
    for col in ("view", "table", "sink", "records", "dead letters"):
        vt.add_column(col)
    for v in st.views:
        vt.add_row(v.name, v.table, v.sink, f"? ({v.error})" if v.error is not None else str(v.records),
                   "?" if v.dead_letters is None else str(v.dead_letters))
    return Group(t, pt, vt)


def _watch_status(spec: Spec, every: float) -> None:
    """``pgderive status --watch``: gather and show the tables every ``every`` seconds until
    Ctrl-C (then return: exit 0). On a terminal the tables are redrawn in place
    (:class:`rich.live.Live`); into a pipe or file each refresh is printed after the last.
    The first gathering fails as a plain ``status`` does; a later one that fails shows its error
    in place of the tables and the next refresh tries again."""
    import time

    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from ..ops.status import slot_status

    def header() -> Text:
        return Text(f"pgderive status at {time.strftime('%H:%M:%S')}, every {every:g} s (Ctrl-C stops)",
                    style="dim")

    def frame() -> RenderableType:
        try:
            st = slot_status(spec)
        except (SpecError, psycopg.Error) as e:
            what = "" if isinstance(e, SpecError) else f"cannot reach the source {spec.source.redacted_dsn()}: "
            return Group(header(), Text(f"error: {_one_line(what + str(e))} (retrying)", style="red"))
        warnings = [Text(w, style="yellow") for w in _idle_warnings(st)]
        return Group(header(), _status_tables(st), *warnings)

    try:
        st = _gather_status(spec)  # a first failure ends the command, as without --watch
        first: RenderableType = Group(header(), _status_tables(st),
                                      *(Text(w, style="yellow") for w in _idle_warnings(st)))
        # Warnings of later gatherings (a sink down) would scroll the redrawn tables away: the
        # tables show them per view already.
        logging.getLogger("pgderive.status").setLevel(logging.ERROR)
        if not _console.is_terminal or _console.is_dumb_terminal:
            while True:
                _console.print(first)
                sys.stdout.flush()
                time.sleep(every)
                first = frame()
        with Live(first, console=_console, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                time.sleep(every)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return


def _idle_warnings(st: "SlotStatus") -> list[str]:
    """One warning line per inactive pgderive slot that retains WAL."""
    return [f"warning: slot {idle.slot} is inactive (no pgderive daemon reads it) and retains "
            f"{_size(idle.retained_bytes)} of WAL ({idle.retained_bytes} bytes), growing with every "
            f"write; if no daemon will resume it, drop it: {idle.drop_sql} "
            "(a later `pgderive run` then needs --resnapshot)" for idle in st.idle]


def _warn_idle(st: "SlotStatus") -> None:
    """One warning line per inactive pgderive slot that retains WAL (stdout, after the tables)."""
    for line in _idle_warnings(st):
        click.echo(line)


@main.command()
@config_option
@click.argument("view")
@click.option("--offline", is_flag=True,
              help="Rebuild here, with the daemon stopped (refused while it runs).")
@click.option("--no-wait", is_flag=True, help="Online: ask the daemon and return without following it.")
def rebuild(config: str, view: str, offline: bool, no_wait: bool) -> None:
    """Rebuild VIEW from a fresh consistent snapshot.

    While `pgderive run` runs (its slot is active) the daemon does it online: the other views
    keep streaming, readers keep the old generation until the new one is complete, and this
    command follows its progress (Ctrl-C stops following, not the rebuild). With the daemon
    stopped (or --offline) it is done here."""
    from cdc.slot import slot_info
    from ..ops.rebuild import rebuild_view
    from ..runtime.errors import EngineError
    from sinks.base import SinkError

    spec = _load(config)
    names = spec.resolve(view) or [view]  # a view kept in several sinks: each copy
    if not offline:
        try:
            with psycopg.connect(spec.source.conninfo(), autocommit=True) as conn:
                info = slot_info(conn, spec.source.slot)
        except psycopg.Error as e:
            _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")
        if info is not None and info.active:
            _rebuild_online(spec, names, wait=not no_wait)
            return
    import time

    for name in names:
        t0 = time.monotonic()
        try:
            lsn, stats = rebuild_view(spec, name)
        except SpecError as e:
            click.echo(scrub(str(e)), err=True)
            sys.exit(2)
        except (EngineError, SinkError, psycopg.Error) as e:
            _fail(e)
        rows = sum(stats.rows.values())
        click.echo(f"rebuilt {name} at {format_lsn(lsn)}: {rows} rows in {time.monotonic() - t0:.1f} s")


def _rebuild_online(spec: Spec, names: list[str], *, wait: bool) -> None:
    """Ask the running daemon to rebuild ``names`` (``pgderive.rebuilds``) and follow them."""
    import time

    from ..state.rebuilds import RebuildStore

    unknown = [n for n in names if n not in spec.views]
    if unknown:
        raise click.UsageError(f"unknown view {unknown[0]!r}; views in this file: {', '.join(spec.views)}")
    store = RebuildStore(spec.source.conninfo())
    try:
        for name in names:
            req = store.request(spec.source.slot, name, "pgderive rebuild")
            click.echo(f"{name}: online rebuild "
                       f"{'requested' if req.status == 'requested' else 'already ' + req.status}")
        if not wait:
            return
        shown: dict[str, str] = {}
        last = 0.0
        rows: dict[str, Rebuild | None] = {}
        while True:
            rows = {n: store.get(spec.source.slot, n) for n in names}
            for n, r in rows.items():
                if r is None:
                    continue
                line = _rebuild_line(r)
                now = time.monotonic()
                if line != shown.get(n) and (not r.active or r.status != "loading" or now - last >= 2.0):
                    click.echo(f"{n}: {line}")
                    shown[n], last = line, now
            if all(r is not None and not r.active for r in rows.values()):
                break
            time.sleep(0.5)
    except psycopg.Error as e:
        _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")
    except KeyboardInterrupt:
        click.echo("stopped following; the daemon goes on with the rebuild (see `pgderive status`)")
        sys.exit(130)
    finally:
        store.close()
    failed = [n for n, r in rows.items() if r is not None and r.status != "done"]
    if failed:
        sys.exit(1)


def _rebuild_line(r: "Rebuild") -> str:
    """One line for a rebuild row: phase, rows, rate, ETA or error."""
    if r.status == "done":
        return f"done: live at {format_lsn(r.consistent_point or 0)}, {r.rows_done} rows"
    if r.status in ("failed", "cancelled"):
        return f"{r.status}: {r.error or '?'}"
    text = r.status.replace("_", " ")
    if r.status == "loading" and r.consistent_point is not None:
        text += f" snapshot at {format_lsn(r.consistent_point)}: {r.rows_done}"
        text += f" of ~{r.rows_total} rows" if r.rows_total else " rows"
        if r.rows_per_s:
            text += f", {r.rows_per_s:.0f} rows/s"
        if r.eta_seconds is not None:
            text += f", ETA {r.eta_seconds:.0f} s"
    if r.attempts > 1:
        text += f" (attempt {r.attempts})"
    return text


@main.command()
@config_option
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait for the daemon's answer.")
def reload(config: str, timeout: float) -> None:
    """Ask the running daemon to reload its YAML (as SIGHUP does), and print its answer.

    New views are bootstrapped online, changed views rebuilt online (the old generation is
    served until the new one is complete), removed views no longer maintained (their data
    stays until `pgderive drop VIEW`). A file that is invalid, or changes anything besides
    views, is refused and the daemon keeps running on the old one (exit 1)."""
    import time

    from cdc.slot import slot_info
    from ..state.rebuilds import RebuildStore

    spec = _load(config)
    store = RebuildStore(spec.source.conninfo())
    try:
        with psycopg.connect(spec.source.conninfo(), autocommit=True) as conn:
            info = slot_info(conn, spec.source.slot)
        if info is None or not info.active:
            _fail(f"no daemon is running on slot {spec.source.slot} (the slot is "
                  f"{'absent' if info is None else 'inactive'}); a start reads the file anyway")
        try:
            asked = store.request_reload(spec.source.slot)
        except LookupError:
            _fail(f"pgderive has no record of slot {spec.source.slot}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = store.reload_state(spec.source.slot)
            if st.reloaded_at is not None and st.reloaded_at >= asked and st.result is not None:
                click.echo(st.result)
                sys.exit(0 if st.result.startswith("ok") else 1)
            time.sleep(0.3)
        _fail(f"the daemon did not answer within {timeout:g} s")
    except psycopg.Error as e:
        _fail(f"cannot reach the source {spec.source.redacted_dsn()}: {e}")
    finally:
        store.close()


def _confirm(question: str) -> bool:
    """``click.confirm`` (default no); end of input (no terminal, nothing piped) is a no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo("", err=True)
        return False


@main.command()
@config_option
@click.argument("view")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def drop(config: str, view: str, yes: bool) -> None:
    """Delete a retired VIEW (removed from the YAML; its data was kept) for good: its records,
    version hash, generation indices and checkpoint in its sink, its dead letters and
    aggregate state, and pgderive's record of it. Asks for confirmation unless --yes."""
    from ..ops.drop import describe, drop_view, plan_drop
    from ..runtime.errors import EngineError
    from sinks.base import SinkError

    spec = _load(config)
    try:
        entries = plan_drop(spec, view)
    except EngineError as e:
        _fail(e)
    except psycopg.Error as e:
        _fail(f"cannot read the view registry from {spec.source.redacted_dsn()}: {e}")
    for entry in entries:
        click.echo(f"view {entry.view}: {describe(entry)}")
    if not yes and not _confirm(f"Delete the data of {len(entries)} retired view(s) from the sink(s) for good?"):
        click.echo("aborted: nothing was dropped", err=True)
        sys.exit(1)
    for entry in entries:
        try:
            report = drop_view(spec, entry.view)
        except (EngineError, SinkError, psycopg.Error) as e:
            _fail(f"dropping view {entry.view} stopped: {e} (run `pgderive drop {view}` again to finish)")
        extra = (f"; aggregate state kept: slot(s) {', '.join(report.aggregate_shared)} also name a view "
                 f"{report.view}" if report.aggregate_shared else f", {report.aggregate_groups} aggregate group(s)")
        click.echo(f"dropped {report.view} from sink {report.sink}: {report.records} record(s), "
                   f"{report.dead_letters} dead letter(s){extra}")


@main.command()
@config_option
@click.argument("view")
@click.option("--repair", is_flag=True,
              help="Write the fixes (at the snapshot's version, so the daemon's later writes win: "
                   "safe while it runs), then verify again.")
@click.option("--wait", "wait", default=60.0, show_default=True, type=click.FloatRange(min=0),
              metavar="SECONDS",
              help="Seconds to wait for a running daemon to apply everything up to the snapshot.")
def verify(config: str, view: str, repair: bool, wait: float) -> None:
    """Diff VIEW against a consistent snapshot of its source: missing, extra and different
    records with examples. Exit code 0 only when equal (after --repair: when the second
    verification is), 1 otherwise or on errors, 2 for usage/configuration errors."""
    from cdc.slot import ReplicationError
    from sinks.base import SinkError
    from ..ops.verify import VerifyError, render_diff, verify as verify_view

    spec = _load(config)
    names = spec.resolve(view)
    if not names:
        click.echo(f"unknown view {view!r}; views in {config}: {', '.join(spec.groups)}", err=True)
        sys.exit(2)
    equal = True
    for name in names:  # a view kept in several sinks: each copy
        try:
            first, second = verify_view(spec, name, wait=wait, repair=repair)
        except SpecError as e:
            click.echo(scrub(str(e)), err=True)
            sys.exit(2)
        except (SinkError, VerifyError, ReplicationError, psycopg.Error) as e:
            _fail(e)
        sink = spec.views[name].sink_name
        _console.print(render_diff(first, sink))
        final = first
        if repair:
            if first.mismatches == 0:
                _console.print("nothing to repair")
            else:
                _console.print(f"repaired {first.repaired:,} record(s) at version "
                               f"{format_lsn((first.snapshot_lsn or 1) - 1)}"
                               + (f", {first.refused:,} refused by the sink" if first.refused else "")
                               + "; verifying again:")
                assert second is not None
                _console.print(render_diff(second, sink))
                final = second
        equal = equal and final.equal
    sys.exit(0 if equal else 1)


@main.command()
@config_option
@click.argument("view")
@click.argument("key")
@click.option("--wait", "wait", default=10.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Seconds to wait for a running daemon to apply the commits the source shows, when the "
                   "record differs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (keys: pgderive.ops.explain.explanation_document).")
def explain(config: str, view: str, key: str, wait: float, as_json: bool) -> None:
    """Explain one record: the record as stored in VIEW's sink under KEY, its version (commit
    LSN, xid, commit time), the source rows it is derived from, the view's fingerprint and
    generation, and a one-record verify against the source now.

    Exit code 0 when the record equals what the view derives (or neither has one), 1 when it
    differs, is missing or extra, or newer commits were not applied within --wait; 2 for an
    unknown view or a key that does not fit the view's key template."""
    from cdc.slot import ReplicationError
    from sinks.base import SinkError
    from ..ops.explain import ExplainUsageError, explain as explain_key, explanation_document
    from ..ops.explain_report import render_explanation

    spec = _load(config)
    try:
        result = explain_key(spec, view, key, wait=wait)
    except ExplainUsageError as e:
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except SpecError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(2)
    except (SinkError, ReplicationError, psycopg.Error) as e:
        _fail(e)
    if as_json:
        import orjson

        click.echo(orjson.dumps(explanation_document(result),
                                option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    else:
        # Into a pipe the report takes $COLUMNS when set (make demo-store passes its own width).
        columns = os.environ.get("COLUMNS", "")
        wide = not _console.is_terminal and columns.isdigit()
        (Console(width=int(columns)) if wide else _console).print(render_explanation(result))
    sys.exit(result.exit_code)


@main.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot"]), default="text", show_default=True,
              help="text: a table per view; json: a stable document; dot: a Graphviz digraph (dot -Tpng).")
def lineage(config: str, fmt: str) -> None:
    """Which source columns flow into which sink keys and fields, through which view and how
    (projection, rename, key, include, where, group_by, aggregate, derive), with their
    classification: from the YAML and the source catalog only, no sink contacted. Flows the
    policy refuses are marked. Exit code 0, 1 when the source cannot be read, 2 for a bad file."""
    from views.check import catalog_facts
    from views.lineage import analyze

    from ..ops.lineage import render_dot, render_json, render_text

    spec = _load(config)
    try:
        with psycopg.connect(spec.source.conninfo(), autocommit=True) as conn:
            infos = catalog_facts(spec, conn)
    except psycopg.Error as e:
        _fail(f"cannot read the source catalog {spec.source.redacted_dsn()}: {e}")
    render = {"text": render_text, "json": render_json, "dot": render_dot}[fmt]
    click.echo(render(analyze(spec, infos), spec), nl=False)


@main.group("dead-letters")
def dead_letters() -> None:
    """Rows a view could not derive and documents a sink rejected (table pgderive.dead_letters
    in the source database): list them, retry them after fixing the cause, or discard them."""


def _short(text: str, width: int = 80) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[:width - 1] + "…"


@dead_letters.command("list")
@config_option
@click.option("--view", help="Only this view's dead letters.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1),
              help="Show at most this many (oldest first).")
@click.option("--superseded", is_flag=True,
              help="Also list dead letters that a later change of their row superseded.")
def dead_letters_list(config: str, view: str | None, limit: int, superseded: bool) -> None:
    """List the open dead letters of the config's slot, oldest first (with --superseded, also
    those a later change of the same row made moot: its commit LSN is shown)."""
    from ..state.deadletters import DeadLetterStore

    spec = _load(config)
    try:
        with DeadLetterStore(spec.source.conninfo()) as store:
            records = store.list(spec.source.slot, view=view, limit=limit, superseded=superseded)
            total = sum(n for v, n in store.count(spec.source.slot).items() if view is None or v == view)
    except psycopg.Error as e:
        _fail(f"cannot read dead letters from {spec.source.redacted_dsn()}: {e}")
    if not records:
        click.echo(f"no dead letters for slot {spec.source.slot}" + (f", view {view}" if view else ""))
        return
    t = Table(title=f"dead letters of slot {spec.source.slot}"
                    + (f" ({len(records)} of {total})" if total > len(records) else ""))
    t.add_column("id", no_wrap=True, justify="right")
    t.add_column("view", overflow="fold")
    t.add_column("table", overflow="fold")
    t.add_column("key", overflow="fold")
    t.add_column("commit LSN", overflow="fold")
    t.add_column("error", overflow="fold")
    t.add_column("retries", justify="right")
    t.add_column("created", overflow="fold")
    if superseded:
        t.add_column("superseded at", overflow="fold")
    for r in records:
        # escape: rich would read "[...]" in an error or a column name as markup and drop it
        error = escape(_short(r.error) + (f" (row truncated: {', '.join(r.truncated)})" if r.truncated else ""))
        cells = [str(r.id), r.view, r.table, "-" if r.key is None else r.key, format_lsn(r.commit_lsn),
                 error, str(r.retries), r.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")]
        if superseded:
            cells.append("" if r.superseded_lsn is None else format_lsn(r.superseded_lsn))
        t.add_row(*cells)
    # Piped output (no terminal, no $COLUMNS) is not squeezed into 80 columns.
    wide = not _console.is_terminal and "COLUMNS" not in os.environ
    (Console(width=200) if wide else _console).print(t)


@dead_letters.command("retry")
@config_option
@click.option("--view", help="Only this view's dead letters.")
@click.argument("ids", nargs=-1, type=int)
def dead_letters_retry(config: str, view: str | None, ids: tuple[int, ...]) -> None:
    """Derive the CURRENT source row of each dead letter again and apply it at the dead
    letter's commit LSN (newer stream writes keep winning); a row that no longer exists is
    deleted at that LSN. Applied ones are removed; ones that fail again are kept (retries + 1).

    Without IDS and --view, every dead letter of the slot is retried. Exit code 1 if any
    still fails.
    """
    from ..ops.deadletters import retry_dead_letters
    from ..state.deadletters import DeadLetterStore
    from sinks.base import SinkError

    spec = _load(config)
    resolved = failed = 0
    try:
        with DeadLetterStore(spec.source.conninfo()) as store:
            records = store.take_for_retry(spec.source.slot, ids=list(ids) or None, view=view)
            for missing in sorted(set(ids) - {r.id for r in records}):
                click.echo(f"{missing}: no such dead letter" + (f" of view {view}" if view else ""))
                failed += 1
            if not records and not ids:
                click.echo(f"no dead letters to retry for slot {spec.source.slot}"
                           + (f", view {view}" if view else ""))
                return
            for outcome in retry_dead_letters(spec, store, records):
                rec = outcome.record
                if outcome.resolved:
                    resolved += 1
                    click.echo(f"{rec.id} ({rec.view}): {outcome.message}; dead letter removed")
                else:
                    failed += 1
                    click.echo(f"{rec.id} ({rec.view}): still failing: {_short(outcome.message, 200)}"
                               f" (kept, retries {rec.retries + 1})")
    except SpecError as e:
        click.echo(scrub(str(e)), err=True)
        sys.exit(2)
    except (SinkError, psycopg.Error) as e:
        _fail(f"retry stopped: {e} ({resolved} applied so far; the rest are kept)")
    click.echo(f"{resolved} applied, {failed} still failing")
    if failed:
        sys.exit(1)


@dead_letters.command("discard")
@config_option
@click.option("--view", help="Discard this view's dead letters (with IDS: only those of this view).")
@click.option("--all", "all_", is_flag=True, help="Discard every dead letter of the slot.")
@click.argument("ids", nargs=-1, type=int)
def dead_letters_discard(config: str, view: str | None, all_: bool, ids: tuple[int, ...]) -> None:
    """Delete dead letters for good: IDS, every one of --view, or --all."""
    from ..state.deadletters import DeadLetterStore

    if not ids and view is None and not all_:
        raise click.UsageError("name the dead letters to discard: IDS, --view VIEW or --all")
    if all_ and (ids or view is not None):
        raise click.UsageError("--all cannot be combined with IDS or --view")
    spec = _load(config)
    try:
        with DeadLetterStore(spec.source.conninfo()) as store:
            n = store.discard(spec.source.slot, ids=list(ids) or None, view=view)
    except psycopg.Error as e:
        _fail(f"cannot discard dead letters in {spec.source.redacted_dsn()}: {e}")
    click.echo(f"discarded {n} dead letter(s) of slot {spec.source.slot}")


if __name__ == "__main__":  # pragma: no cover
    main()
