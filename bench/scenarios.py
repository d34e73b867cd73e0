"""The six benchmark scenarios; scenario 6, the peers, is in :mod:`bench.peers` (see
``report.METHOD`` for what each measures and how).

Each ``scenario_*`` function takes the run's :class:`Context`, builds its own database, slots,
Redis keys and OpenSearch indices (all named after :class:`Names`), adds its rows with
:meth:`Context.add`, and removes everything it made, also when it fails.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.request
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import psycopg

from . import pg
from .cpu import ServiceCpu, cpu_breakdown
from .daemon import Daemon, Drain, write_config
from .pg import BenchError
from .peers import scenario_6
from .probe import PROBE_DDL, DecodeWatcher, ProbeWriter, RedisPoller, lags_ms, percentile
from .report import Row, format_row
from .settings import Settings
from .stores import (settle_redis, settle_opensearch, redis_pipe_load, alias_index, bulk_load, clean_opensearch, clean_redis, clone_index,
                     create_scratch_index, opensearch_client, redis_client)

__all__ = ["Context", "UNITS"]

MB = 1 << 20
ACCOUNTS, TELLERS, BRANCHES = "public.pgbench_accounts", "public.pgbench_tellers", "public.pgbench_branches"
PGBENCH_TABLES = sorted([ACCOUNTS, TELLERS, BRANCHES])
# Targets (issue 5)
DRAIN_VS_RECVLOGICAL = 0.8
OPENSEARCH_VS_BULK = 0.9
LAG_P50_MS, LAG_P99_MS = 10.0, 50.0
SNAPSHOT_REDIS_ROWS_S = 300_000
RSS_LIMIT_MB = 150.0
LINEARITY = 0.8


@dataclass
class Context:
    """State of one benchmark run: settings, rows so far, values shared between scenarios
    (``shared``: scenario 3's peak RSS for scenario 4, scenario 5's curve for the plot)."""

    settings: Settings
    rows: list[Row] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        """Record ``row`` and print its one-line form."""
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def workdir(self, key: str) -> Path:
        """``<out>/<key>/`` for this part's configs, logs and stats files."""
        path = self.settings.out / key
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Names:
    """Names of everything one scenario part creates, all derived from the run prefix."""

    prefix: str
    key: str

    @property
    def db(self) -> str:
        """The scenario's database, e.g. ``pgdbench_s1r``."""
        return f"{self.prefix}_{self.key}"

    def slot(self, suffix: str = "") -> str:
        """pgderive's slot (no suffix: named like the database) or another one (``_raw``)."""
        return f"{self.db}_{suffix}" if suffix else self.db

    @property
    def redis_prefix(self) -> str:
        """Prefix of every Redis record key, e.g. ``pgdbench:s1r:``."""
        return f"{self.prefix}:{self.key}:"

    @property
    def index_prefix(self) -> str:
        """Prefix of every OpenSearch alias and index, e.g. ``pgdbench-s1o-``."""
        return f"{self.prefix}-{self.key}-"

    def view(self, name: str) -> str:
        """A view name, e.g. ``pgdbench_s1r_accounts``."""
        return f"{self.db}_{name}"


def step(msg: str) -> None:
    """Progress line on the console."""
    print(f"    {time.strftime('%H:%M:%S')} {msg}", flush=True)


def redis_views(n: Names, tables: tuple[str, ...] = ("accounts", "tellers", "branches")) -> dict[str, Any]:
    """Redis views over pgbench tables, shaped like config/pgbench.yaml's."""
    all_views = {
        "accounts": {"table": ACCOUNTS, "sink": "cache", "key": f"{n.redis_prefix}account:{{aid}}",
                     "fields": ["aid", "bid", "abalance"], "format": "hash"},
        "tellers": {"table": TELLERS, "sink": "cache", "key": f"{n.redis_prefix}teller:{{tid}}",
                    "fields": {"teller": "tid", "branch": "bid", "balance": "tbalance"}, "format": "json"},
        "branches": {"table": BRANCHES, "sink": "cache", "key": f"{n.redis_prefix}branch:{{bid}}",
                     "fields": ["bid", "bbalance"], "format": "hash"},
    }
    return {n.view(t): all_views[t] for t in tables}


def opensearch_views(n: Names) -> dict[str, Any]:
    """One OpenSearch view of pgbench_accounts (config/pgbench.yaml's ``account_search``)."""
    return {n.view("accounts"): {"table": ACCOUNTS, "sink": "search", "index": f"{n.index_prefix}accounts",
                                 "key": "{aid}", "fields": {"account_id": "aid", "branch_id": "bid",
                                                            "balance": "abalance"}}}


def account_doc(aid: int, bid: int, abalance: int) -> dict[str, int]:
    """The OpenSearch document of one account, as the view above derives it."""
    return {"account_id": aid, "branch_id": bid, "balance": abalance}


@contextmanager
def scratch(ctx: Context, key: str, views: list[str]) -> Iterator[Names]:
    """Names for one scenario part; drops its database and slots, Redis keys and OpenSearch
    indices before (leftovers of an aborted run) and after (also on failure)."""
    n = Names(ctx.settings.prefix, key)

    def clean() -> None:
        pg.drop_database(ctx.settings, n.db)
        clean_redis(redis_client(ctx.settings), n.redis_prefix, [n.view(v) for v in views])
        clean_opensearch(opensearch_client(ctx.settings), n.index_prefix, [n.view(v) for v in views])

    clean()
    try:
        yield n
    finally:
        clean()


def fresh_pgbench(ctx: Context, n: Names, scale: int) -> str:
    """Recreate ``n.db`` with ``pgbench -i -s scale``; returns its DSN."""
    step(f"database {n.db}: pgbench -i -s {scale}")
    dsn = pg.recreate_database(ctx.settings, n.db)
    pg.pgbench_init(ctx.settings, n.db, scale)
    return dsn


def streaming_setup(ctx: Context, n: Names, dsn: str, work: Path, views: dict[str, Any]) -> Daemon:
    """The set-up of the streaming scenarios (1 → Redis, 2, 5): a daemon over ``views``
    bootstrapped and stopped, then, for isolation, Redis' AOF rewrite that the 1M-record
    bootstrap earned finished and a Postgres ``CHECKPOINT`` (pgbench -i's writes), so neither
    lands inside the measurement; last the baseline's slot ``n.slot("raw")`` at the same LSN."""
    s = ctx.settings
    cfg = write_config(work / "pgderive.yaml", dsn=dsn, slot=n.slot(), views=views, settings=s)
    daemon = Daemon(s, cfg, dsn=dsn, slot=n.slot(), workdir=work, name="pgderive")
    bootstrap(daemon)
    settle_redis(s)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    pg.create_slot(dsn, n.slot("raw"))
    return daemon


def bootstrap(daemon: Daemon) -> float:
    """First run of ``daemon``: create the slot, load every view, stop; returns bootstrap seconds."""
    daemon.start()
    try:
        seconds = daemon.wait_bootstrapped()
        daemon.stop()
    except BaseException:
        daemon.kill()
        raise
    step(f"pgderive bootstrapped slot {daemon.slot} in {seconds:.1f} s")
    return seconds


def drain(daemon: Daemon, end_lsn: int) -> tuple[Drain, dict[str, Any]]:
    """Start ``daemon``, wait until it confirmed ``end_lsn``, stop it; returns the
    :class:`~bench.daemon.Drain` timings (with the sink servers' CPU meanwhile) and its final
    stats."""
    services = ServiceCpu(daemon.settings)
    services.start()
    daemon.start()
    try:
        timing = daemon.wait_confirmed(end_lsn)
        timing.services = services.stop()
        stats = daemon.stop()
    except BaseException:
        daemon.kill()
        raise
    return timing, stats


def _changes_note(changes: int, stats: dict[str, Any]) -> str:
    """Cross-check of the workload's ``changes`` with pgderive's stats, which also count the
    marker (:func:`bench.pg.marker_lsn`)."""
    got = stats.get("changes")
    if got is None:
        return "stats file has no change count"
    if got == changes + 1:
        return "pgderive's stats agree (+1 marker)"
    return f"pgderive's stats count {got:,} changes (expected {changes + 1:,} incl. the marker)"


# --- scenario 1 -------------------------------------------------------------------------------
def scenario_1_redis(ctx: Context) -> None:
    """Backlog drain into Redis views of accounts, tellers, branches vs pg_recvlogical."""
    s = ctx.settings
    with scratch(ctx, "s1r", ["accounts", "tellers", "branches"]) as n:
        dsn = fresh_pgbench(ctx, n, s.scale)
        work = ctx.workdir("s1r")
        daemon = streaming_setup(ctx, n, dsn, work, redis_views(n))
        step(f"backlog: pgbench -c {s.clients} -j {s.jobs} -T {s.backlog_seconds}")
        bench = pg.pgbench_run(s, n.db, seconds=s.backlog_seconds)
        end = pg.marker_lsn(dsn)
        changes = 3 * bench.transactions
        step(f"{bench.transactions:,} transactions ({bench.tps:,.0f} tps) = {changes:,} changes; draining")
        raw_s = pg.recvlogical_drain(s, dsn, n.slot("raw"), end, PGBENCH_TABLES)
        step(f"pg_recvlogical: {raw_s:.2f} s")
        timing, stats = drain(daemon, end)
        step(f"pgderive: {timing.total:.2f} s ({timing.startup:.2f} s start-up)")
        rate, raw_rate = changes / timing.total, changes / raw_s
        ratio = rate / raw_rate
        ctx.add(Row("1", "backlog drain → Redis (3 views)", rate, "changes/s", raw_rate, "pg_recvlogical",
                    ratio, f"≥ {DRAIN_VS_RECVLOGICAL}×", ratio >= DRAIN_VS_RECVLOGICAL,
                    note=f"{changes:,} changes from {bench.transactions:,} pgbench tx ({bench.tps:,.0f} tps); "
                         f"pgderive {timing.total:.1f} s incl. {timing.startup:.1f} s start-up "
                         f"({changes / timing.streaming:,.0f}/s without it), pg_recvlogical {raw_s:.1f} s; "
                         f"{timing.cpu_note()}; {_changes_note(changes, stats)}",
                    extra={"changes": changes, "pgderive_s": timing.total, "startup_s": timing.startup,
                           "recvlogical_s": raw_s, "stats": stats}))


#: The HTTP endpoint, scraped every second, may cost at most this share of drain throughput.
HTTP_COST = 0.03


class Scraper(threading.Thread):
    """Fetches ``/metrics`` and ``/healthz`` every ``interval`` seconds, as a Prometheus with a
    1 s scrape interval and a supervisor's probe would; counts what it got."""

    def __init__(self, base: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="scraper")
        self.base, self.interval = base, interval
        self.halt = threading.Event()
        self.ok = self.failed = 0
        self.nbytes = 0

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            for path in ("/metrics", "/healthz"):
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as r:
                        self.nbytes += len(r.read())
                        self.ok += 1
                except (OSError, ValueError):
                    self.failed += 1  # the daemon is starting or stopping


@dataclass
class PairedDrain:
    """Two daemons' drains of the same backlogs (see :func:`_paired_drain`): seconds streaming
    and from spawn per label, and the changes each drained."""

    seconds: dict[str, float]
    totals: dict[str, float]
    changes: int


def _paired_drain(ctx: Context, tag: str, labels: tuple[str, str],
                  configure: Callable[[str, Path, Daemon], None],
                  around: Callable[[str], Any] | None = None,
                  finish: Callable[[str], None] | None = None) -> PairedDrain:
    """The same Redis backlog drained by two daemons (each on a slot of its own, created at the
    same LSN, writing views of its own), configured per label by ``configure(label, yaml_path,
    daemon)`` before their bootstrap ends; twice, in both orders, so neither profits from going
    second (a warm page cache). ``around(label)``: a context manager entered while that daemon
    drains (e.g. a scraper). ``finish(dsn)`` runs before the scratch database is dropped."""
    s = ctx.settings
    a, b = labels
    with scratch(ctx, f"s1{tag}", ["accounts", "tellers", "branches"]) as n, \
            scratch(ctx, f"s1{tag}b", ["accounts", "tellers", "branches"]) as m:
        dsn = fresh_pgbench(ctx, n, s.scale)
        work = ctx.workdir(f"s1{tag}")
        daemons: dict[str, Daemon] = {}
        for label, names in ((a, n), (b, m)):
            cfg = write_config(work / f"pgderive-{label}.yaml", dsn=dsn, slot=n.slot(label), views=redis_views(names),
                               settings=s)
            d = Daemon(s, cfg, dsn=dsn, slot=n.slot(label), workdir=work, name=f"pgderive-{tag}-{label}")
            configure(label, cfg, d)
            bootstrap(d)
            daemons[label] = d
        settle_redis(s)
        out = PairedDrain({a: 0.0, b: 0.0}, {a: 0.0, b: 0.0}, 0)
        for order in ((a, b), (b, a)):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
            step(f"backlog: pgbench -c {s.clients} -j {s.jobs} -T {s.backlog_seconds}")
            bench = pg.pgbench_run(s, n.db, seconds=s.backlog_seconds)
            end = pg.marker_lsn(dsn)
            out.changes += 3 * bench.transactions
            for label in order:
                with (around(label) if around is not None else _nothing()):
                    timing, _ = drain(daemons[label], end)
                out.seconds[label] += timing.streaming
                out.totals[label] += timing.total
                step(f"{tag} {label}: {timing.streaming:.2f} s streaming, {timing.total:.2f} s from spawn; "
                     f"{timing.cpu_note()}")
        if finish is not None:
            finish(dsn)
        return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def scenario_1_http(ctx: Context) -> None:
    """The HTTP endpoint's cost (:func:`_paired_drain`): one daemon with ``--http off``, one
    serving HTTP and scraped every second."""
    port = _free_port()
    scrapes = 0

    def configure(label: str, cfg: Path, d: Daemon) -> None:
        if label == "on":
            d.args = ["--http", f"127.0.0.1:{port}"]

    @contextmanager
    def scraped(label: str) -> Iterator[None]:
        nonlocal scrapes
        if label != "on":
            yield
            return
        scraper = Scraper(f"http://127.0.0.1:{port}")
        scraper.start()
        try:
            yield
        finally:
            scraper.halt.set()
            scraper.join()
            scrapes += scraper.ok

    r = _paired_drain(ctx, "h", ("off", "on"), configure, scraped)
    if scrapes == 0:
        raise BenchError("the scraper got no answer from the daemon's HTTP endpoint")
    rate_on, rate_off = r.changes / r.seconds["on"], r.changes / r.seconds["off"]
    ratio = rate_on / rate_off
    ctx.add(Row("1", "backlog drain → Redis, HTTP endpoint scraped every 1 s", rate_on, "changes/s", rate_off,
                "the same drain with --http off", ratio, f"≥ {1 - HTTP_COST:.2f}×", ratio >= 1 - HTTP_COST,
                note=f"{r.changes:,} changes in two backlogs, each drained by both daemons in turn (off→on, "
                     f"on→off): {r.seconds['on']:.2f} s streaming with HTTP ({scrapes} scrapes of /metrics and "
                     f"/healthz answered) vs {r.seconds['off']:.2f} s without; from spawn (start-up included: "
                     f"the endpoint's imports and socket) {r.totals['on']:.2f} vs {r.totals['off']:.2f} s",
                extra={"changes": r.changes, "on_s": r.seconds["on"], "off_s": r.seconds["off"],
                       "on_total_s": r.totals["on"], "off_total_s": r.totals["off"], "scrapes": scrapes}))


#: Recording provenance (pgderive.commits) may cost at most this share of drain throughput.
PROVENANCE_COST = 0.05


def scenario_1_provenance(ctx: Context) -> None:
    """The cost of provenance (:func:`_paired_drain`): one daemon with ``provenance: off``, one
    recording every commit's xid and timestamp in ``pgderive.commits`` (the default); also the
    table's size per recorded commit."""
    def configure(label: str, cfg: Path, d: Daemon) -> None:
        if label == "off":
            cfg.write_text(cfg.read_text() + "provenance: off\n")

    table: dict[str, int] = {}

    def measure(dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT coalesce(sum(octet_length(lsns) / 8), 0), count(*), "
                               "pg_total_relation_size('pgderive.commits') FROM pgderive.commits").fetchone()
        assert row is not None
        table["commits"], table["rows"], table["bytes"] = int(row[0]), int(row[1]), int(row[2])

    r = _paired_drain(ctx, "p", ("off", "on"), configure, finish=measure)
    rate_on, rate_off = r.changes / r.seconds["on"], r.changes / r.seconds["off"]
    ratio = rate_on / rate_off
    per = table["bytes"] / table["commits"] if table.get("commits") else 0.0
    size = (f"; pgderive.commits: {table.get('commits', 0):,} commits in {table.get('rows', 0):,} rows (one per "
            f"flush), {table.get('bytes', 0) / 1e6:.2f} MB with TOAST and key, {per:.1f} bytes per commit")
    ctx.add(Row("1", "backlog drain → Redis, provenance recorded", rate_on, "changes/s", rate_off,
                "the same drain with provenance: off", ratio, f"≥ {1 - PROVENANCE_COST:.2f}×",
                ratio >= 1 - PROVENANCE_COST,
                note=f"{r.changes:,} changes in two backlogs, each drained by both daemons in turn (off→on, "
                     f"on→off): {r.seconds['on']:.2f} s streaming with provenance vs {r.seconds['off']:.2f} s "
                     f"without{size}",
                extra={"changes": r.changes, "on_s": r.seconds["on"], "off_s": r.seconds["off"], **table}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scenario_1_opensearch(ctx: Context) -> None:
    """Backlog drain into an OpenSearch view of accounts vs a raw helpers.parallel_bulk loader."""
    s = ctx.settings
    with scratch(ctx, "s1o", ["accounts"]) as n:
        dsn = fresh_pgbench(ctx, n, s.scale)
        work = ctx.workdir("s1o")
        cfg = write_config(work / "pgderive.yaml", dsn=dsn, slot=n.slot(), views=opensearch_views(n), settings=s)
        daemon = Daemon(s, cfg, dsn=dsn, slot=n.slot(), workdir=work, name="pgderive")
        bootstrap(daemon)
        client = opensearch_client(s)
        raw_index = f"{n.index_prefix}raw"
        generation = alias_index(client, f"{n.index_prefix}accounts")
        clone_index(client, generation, raw_index)
        step(f"cloned {generation} → {raw_index} for the raw loader")
        pg.create_slot(dsn, n.slot("raw"))
        step(f"backlog: pgbench -c {s.clients} -j {s.jobs} -T {s.backlog_seconds}")
        bench = pg.pgbench_run(s, n.db, seconds=s.backlog_seconds)
        end = pg.marker_lsn(dsn)
        changes = bench.transactions
        dump = work / "changes.jsonl"
        raw_s = pg.recvlogical_drain(s, dsn, n.slot("raw"), end, [ACCOUNTS], output=dump)
        docs = _account_docs(dump)
        dump.unlink()
        if len(docs) != changes:
            raise BenchError(f"slot A decoded {len(docs):,} account changes, pgbench says {changes:,}")
        step(f"{changes:,} account changes ({bench.tps:,.0f} tps); pg_recvlogical {raw_s:.2f} s; draining")
        settle_opensearch(client)
        timing, stats = drain(daemon, end)
        step(f"pgderive: {timing.total:.2f} s ({timing.startup:.2f} s start-up)")
        settle_opensearch(client)
        n_docs, bulk_s = bulk_load(client, raw_index, docs)
        step(f"raw bulk loader: {n_docs:,} documents in {bulk_s:.2f} s")
        rate, bulk_rate = changes / timing.total, n_docs / bulk_s
        ratio = rate / bulk_rate
        ctx.add(Row("1", "backlog drain → OpenSearch (accounts)", rate, "changes/s", bulk_rate,
                    "raw _bulk loader", ratio, f"≥ {OPENSEARCH_VS_BULK}×", ratio >= OPENSEARCH_VS_BULK,
                    note=f"{changes:,} changes; pgderive {timing.total:.1f} s incl. {timing.startup:.1f} s "
                         f"start-up ({changes / timing.streaming:,.0f}/s without it); raw loader {bulk_s:.1f} s; "
                         f"pg_recvlogical (to a file) {changes / raw_s:,.0f}/s (pgderive {rate / (changes / raw_s):.2f}× of it); "
                         f"{timing.cpu_note()}; {_changes_note(changes, stats)}",
                    extra={"changes": changes, "pgderive_s": timing.total, "bulk_s": bulk_s,
                           "recvlogical_s": raw_s, "stats": stats}))


def _account_docs(path: Path) -> list[tuple[int, dict[str, int]]]:
    """``(aid, document)`` for every pgbench_accounts insert/update in a wal2json format-2 dump."""
    docs = []
    with open(path, "rb") as f:
        for line in f:
            if b'"table":"pgbench_accounts"' not in line:
                continue
            msg = orjson.loads(line)
            if msg.get("action") not in ("I", "U"):
                continue
            cols = {c["name"]: c["value"] for c in msg["columns"]}
            docs.append((cols["aid"], account_doc(cols["aid"], cols["bid"], cols["abalance"])))
    return docs


# --- scenario 2 -------------------------------------------------------------------------------
def scenario_2(ctx: Context) -> None:
    """Live lag at saturation and at ``-R rate``: pgderive's stats and the Redis probe, against
    the probe as decoded by pg_recvlogical."""
    s = ctx.settings
    with scratch(ctx, "s2", ["accounts", "tellers", "branches", "probe"]) as n:
        dsn = fresh_pgbench(ctx, n, s.scale)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(PROBE_DDL)
        work = ctx.workdir("s2")
        probe_key = f"{n.redis_prefix}probe:1"
        views = redis_views(n)
        views[n.view("probe")] = {"table": "public.bench_probe", "sink": "cache", "key": f"{n.redis_prefix}probe:{{id}}",
                                  "fields": ["seq"], "format": "hash"}
        daemon = streaming_setup(ctx, n, dsn, work, views)
        watcher = DecodeWatcher(pg.recvlogical_args(s, dsn, n.slot("raw"), ["public.bench_probe"]) + ["-f", "-"],
                                env=pg.pg_env(s))
        watcher.start()
        next_seq = 1
        try:
            for label, rate in (("saturation", None), (f"-R {s.lag_rate}", s.lag_rate)):
                next_seq = _lag_level(ctx, daemon, watcher, dsn, n, probe_key, label, rate, next_seq)
        finally:
            daemon.kill()
            err = watcher.stop()
            if watcher.proc.returncode not in (0, -15, 143, None) and err:
                step(f"pg_recvlogical (probe baseline) said: {err.strip()[-300:]}")


def _lag_level(ctx: Context, daemon: Daemon, watcher: DecodeWatcher, dsn: str, n: Names, probe_key: str,
               label: str, rate: int | None, first_seq: int) -> int:
    """One load level of scenario 2 (one daemon run); adds its rows, returns the next probe seq."""
    s = ctx.settings
    daemon.start()
    try:
        daemon.wait_active()
        poller = RedisPoller(s.redis_url, probe_key, s.poll_interval_ms / 1000)
        poller.start()
        writer = ProbeWriter(dsn, s.probe_interval_ms / 1000, first_seq)
        writer.start()
        step(f"{label}: pgbench -c {s.clients} -j {s.jobs} -T {s.lag_seconds}" + (f" -R {rate}" if rate else ""))
        try:
            bench = pg.pgbench_run(s, n.db, seconds=s.lag_seconds, rate=rate)
        finally:
            writer.stop()
        bench_done = time.monotonic()
        end = pg.marker_lsn(dsn)
        daemon.wait_confirmed(end)
        catchup = time.monotonic() - bench_done
        cpu = daemon.cpu_seconds(bench_done - bench.seconds, bench_done)
        poller.wait_for(writer.seq, 30)
        deadline = time.monotonic() + 30
        while watcher.last < writer.seq and time.monotonic() < deadline:
            time.sleep(0.01)
        poller.stop()
        stats = daemon.stop()
    except BaseException:
        daemon.kill()
        raise
    for thread in (writer, poller):
        if thread.error is not None:
            raise BenchError(f"probe {thread.name} failed: {thread.error!r}")
    probe, probe_missing = lags_ms(writer.commits, poller.seen)
    decoded, decoded_missing = lags_ms(writer.commits, watcher.seen)
    lag = stats.get("lag_ms", {})
    common = (f"pgbench {bench.tps:,.0f} tps; pgderive CPU {cpu / bench.seconds:.0%} of the workload's "
              f"wall time; {len(writer.commits)} probes"
              + (f", {probe_missing} never seen in Redis" if probe_missing else "")
              + (f", {decoded_missing} never decoded" if decoded_missing else ""))
    for pct, target in ((0.5, LAG_P50_MS), (0.99, LAG_P99_MS)):
        name = f"p{int(pct * 100)}"
        base = percentile(decoded, pct)
        stat_value = lag.get(name)
        probe_value = percentile(probe, pct)
        ctx.add(Row("2", f"lag {name}, {label}: stats (commit → acked)", stat_value, "ms", base,
                    "pg_recvlogical probe", _ratio(stat_value, base), f"< {target:g} ms",
                    None if stat_value is None else stat_value < target, lower_is_better=True,
                    note=f"{lag.get('samples', 0):,} transactions, max {lag.get('max')} ms; {common}; "
                         f"caught up {catchup:.1f} s after pgbench ended",
                    extra={"stats": stats}))
        ctx.add(Row("2", f"lag {name}, {label}: probe (commit → visible)", probe_value, "ms", base,
                    "pg_recvlogical probe", _ratio(probe_value, base), f"< {target:g} ms",
                    None if probe_value is None else probe_value < target, lower_is_better=True,
                    note=f"{len(probe)} probe versions seen in Redis (polled every {s.poll_interval_ms:g} ms), "
                         f"max {max(probe, default=0):.1f} ms"))
    return writer.seq + 1


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


# --- scenario 3 -------------------------------------------------------------------------------
def scenario_3(ctx: Context) -> None:
    """Snapshot at the run's scale."""
    _snapshot(ctx, ctx.settings.scale, "s3")


def scenario_3_big(ctx: Context) -> None:
    """Snapshot at ``PGDERIVE_BENCH_BIG_SCALE`` (skipped when 0)."""
    _snapshot(ctx, ctx.settings.big_scale, "s3big")


def _snapshot(ctx: Context, scale: int, key: str) -> None:
    """Bootstrap ``scale`` × 100k accounts into Redis, then OpenSearch; baselines COPY and the
    raw bulk loader; records the daemons' peak RSS for scenario 4."""
    s = ctx.settings
    rows_label = f"{scale * 100_000 / 1e6:g}M rows"
    with scratch(ctx, key, ["redis", "search"]) as n:
        dsn = fresh_pgbench(ctx, n, scale)
        copy_rows, copy_s = pg.copy_count(dsn, "pgbench_accounts")
        copy_rate = copy_rows / copy_s
        step(f"COPY pgbench_accounts TO STDOUT: {copy_rows:,} rows in {copy_s:.2f} s")
        work = ctx.workdir(key)
        peaks: dict[str, int] = {}
        rates: dict[str, float] = {}
        notes: dict[str, str] = {}
        for sink, views in (("redis", {n.view("redis"): redis_views(n, ("accounts",))[n.view("accounts")]}),
                            ("search", {n.view("search"): opensearch_views(n)[n.view("accounts")]})):
            slot = n.slot(sink)
            cfg = write_config(work / f"{sink}.yaml", dsn=dsn, slot=slot, views=views, settings=s)
            daemon = Daemon(s, cfg, dsn=dsn, slot=slot, workdir=work, name=sink)
            if sink == "redis":
                settle_redis(s)  # like the redis-cli baselines: no earlier load's AOF rewrite inside
            else:
                settle_opensearch(opensearch_client(s))  # like the raw loader below
            services = ServiceCpu(s)
            services.start()
            daemon.start()
            try:
                wall = daemon.wait_bootstrapped(timeout=3600)
                service_cpu = services.stop()
                peaks[sink] = daemon.peak_rss()
                cpu = daemon.cpu_seconds()
                stats = daemon.stop()
            except BaseException:
                daemon.kill()
                raise
            pg.drop_slot(s, slot)
            if sink == "redis":
                # The redis-cli baselines below start from the same empty database (and,
                # after settle_redis, the same small AOF base) as this load did, so they
                # earn the same automatic AOF rewrite.
                clean_redis(redis_client(s), n.redis_prefix, [n.view("redis")])
            table = stats.get("snapshot", {}).get("tables", {}).get(ACCOUNTS, {})
            if table.get("rows") != copy_rows:
                raise BenchError(f"{sink}: pgderive loaded {table.get('rows')} rows, COPY counted {copy_rows}")
            load_s = table.get("seconds") or wall
            rates[sink] = copy_rows / load_s
            notes[sink] = (f"load {load_s:.1f} s (wall {wall:.1f} s from spawn incl. slot creation); "
                           f"pgderive CPU {cpu / wall:.0%} of its wall time; "
                           f"{cpu_breakdown(wall, {'pgderive': cpu, **service_cpu})}; "
                           f"peak RSS {peaks[sink] / MB:.0f} MB")
            step(f"{sink}: {copy_rows:,} rows in {load_s:.1f} s ({rates[sink]:,.0f} rows/s), wall {wall:.1f} s")
        ctx.add(Row("3", f"snapshot {rows_label} → Redis", rates["redis"], "rows/s", copy_rate, "COPY TO STDOUT",
                    rates["redis"] / copy_rate, f"≥ {SNAPSHOT_REDIS_ROWS_S:,} rows/s",
                    rates["redis"] >= SNAPSHOT_REDIS_ROWS_S, note=notes["redis"]))
        docs = _Accounts(dsn)
        prefix = f"{n.redis_prefix}pipe:"
        for versions in (None, f"{prefix}versions"):
            settle_redis(s)  # an AOF rewrite earned by the previous load is not this one's
            pipe_n, pipe_s = redis_pipe_load(s, ((f"{prefix}{aid}", {"aid": aid, "bid": bid, "abalance": bal})
                                                 for aid, bid, bal in zip(docs.aid, docs.bid, docs.abalance)),
                                             versions=versions)
            clean_redis(redis_client(s), prefix, [])
            pipe_rate = pipe_n / pipe_s
            what = "HSET only" if versions is None else "HSET + version entries"
            step(f"redis-cli --pipe ({what}): {pipe_n:,} records in {pipe_s:.1f} s ({pipe_rate:,.0f}/s)")
            ctx.add(Row("3", f"snapshot {rows_label} → Redis vs Redis' own ingest", rates["redis"], "rows/s",
                        pipe_rate, f"redis-cli --pipe ({what})", rates["redis"] / pipe_rate, "—", None,
                        note="the baseline writes only the records; pgderive also writes each record's version "
                             "entry (one more HSET per chunk of rows)" if versions is None else
                             "the baseline writes what pgderive writes (records, and their version entries "
                             "in one hash, one HSET per 7,000 rows) without reading Postgres: Redis' own "
                             "bound for this layout on this machine"))
        client = opensearch_client(s)
        raw_index = f"{n.index_prefix}raw"
        create_scratch_index(client, raw_index)
        settle_opensearch(client)  # pgderive's load leaves merges running
        n_docs, bulk_s = bulk_load(client, raw_index, docs)
        del docs
        client.indices.delete(index=raw_index, ignore=[404])
        bulk_rate = n_docs / bulk_s
        step(f"raw bulk loader: {n_docs:,} documents in {bulk_s:.1f} s ({bulk_rate:,.0f}/s)")
        ratio = rates["search"] / bulk_rate
        ctx.add(Row("3", f"snapshot {rows_label} → OpenSearch", rates["search"], "rows/s", bulk_rate,
                    "raw _bulk loader", ratio, f"≥ {OPENSEARCH_VS_BULK}×", ratio >= OPENSEARCH_VS_BULK,
                    note=f"{notes['search']}; vs COPY {rates['search'] / copy_rate:.2f}×"))
        ctx.shared.setdefault("snapshot_rss", {})[scale] = peaks


class _Accounts:
    """Every account's ``(aid, bid, abalance)``, read with COPY into three compact int arrays
    (24 bytes a row: 5M rows fit in 120 MB); iterating yields ``(aid, document)`` pairs, the
    raw loader's input, building each small dict on the fly."""

    def __init__(self, dsn: str) -> None:
        self.aid, self.bid, self.abalance = array("q"), array("q"), array("q")
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.cursor().copy("COPY (SELECT aid, bid, abalance FROM pgbench_accounts) TO STDOUT") as copy:
                for aid, bid, abalance in copy.rows():
                    self.aid.append(int(aid))
                    self.bid.append(int(bid))
                    self.abalance.append(int(abalance))

    def __len__(self) -> int:
        return len(self.aid)

    def __iter__(self) -> Iterator[tuple[int, dict[str, int]]]:
        for aid, bid, abalance in zip(self.aid, self.bid, self.abalance):
            yield aid, account_doc(aid, bid, abalance)


# --- scenario 4 -------------------------------------------------------------------------------
def scenario_4(ctx: Context) -> None:
    """Peak RSS: scenario 3's bootstraps, and one transaction updating every account streamed
    into Redis; baseline the idle daemon's RSS."""
    s = ctx.settings
    with scratch(ctx, "s4", ["accounts"]) as n:
        dsn = fresh_pgbench(ctx, n, s.scale)
        work = ctx.workdir("s4")
        cfg = write_config(work / "pgderive.yaml", dsn=dsn, slot=n.slot(),
                           views=redis_views(n, ("accounts",)), settings=s)
        daemon = Daemon(s, cfg, dsn=dsn, slot=n.slot(), workdir=work, name="pgderive")
        bootstrap(daemon)
        daemon.start()
        try:
            daemon.wait_active()
            time.sleep(1.5)
            idle = daemon.rss_now()
            step(f"idle daemon RSS {idle / MB:.0f} MB")
            t0 = time.monotonic()
            with psycopg.connect(dsn) as conn:
                rows = conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1").rowcount
                conn.commit()
            update_s = time.monotonic() - t0
            end = pg.marker_lsn(dsn)
            step(f"UPDATE of {rows:,} rows committed in {update_s:.1f} s; draining")
            services = ServiceCpu(s)
            services.start()
            daemon.wait_confirmed(end, timeout=3600)
            t1 = time.monotonic()
            service_cpu = services.stop()
            peak = daemon.peak_rss(t0, t1)
            cpu = daemon.cpu_seconds(t0 + update_s, t1)
            stats = daemon.stop()
        except BaseException:
            daemon.kill()
            raise
        stream_s = t1 - t0 - update_s
        step(f"streamed in {stream_s:.1f} s after the commit; peak RSS {peak / MB:.0f} MB")
    snap = ctx.shared.get("snapshot_rss", {})
    for scale, peaks in sorted(snap.items()):
        for sink, label in (("redis", "Redis"), ("search", "OpenSearch")):
            if sink in peaks:
                _rss_row(ctx, f"peak RSS, snapshot {scale * 100_000 / 1e6:g}M rows → {label} (scenario 3)",
                         peaks[sink], idle, "")
    if not snap:
        ctx.add(Row("4", "peak RSS during scenario 3", target=f"≤ {RSS_LIMIT_MB:g} MB",
                    error="scenario 3 did not run (or failed), so its peak RSS is unknown"))
    _rss_row(ctx, f"peak RSS, one {rows / 1e6:g}M-row transaction → Redis", peak, idle,
             f"streamed {rows:,} changes in {stream_s:.1f} s after the commit "
             f"({rows / max(stream_s, 1e-9):,.0f} changes/s); pgderive CPU {cpu / max(stream_s, 1e-9):.0%} "
             f"of that time; {cpu_breakdown(stream_s, {'pgderive': cpu, **service_cpu})}; "
             f"{_changes_note(rows, stats)}")


def _rss_row(ctx: Context, name: str, peak: int, idle: int, note: str) -> None:
    ctx.add(Row("4", name, peak / MB, "MB", idle / MB, "idle daemon", peak / idle, f"≤ {RSS_LIMIT_MB:g} MB",
                peak / MB <= RSS_LIMIT_MB, note=note, lower_is_better=True))


# --- scenario 5 -------------------------------------------------------------------------------
def scenario_5(ctx: Context) -> None:
    """Drain time of 1×, 2×, 4× a base backlog (Redis views) with pg_recvlogical as reference."""
    s = ctx.settings
    with scratch(ctx, "s5", ["accounts", "tellers", "branches"]) as n:
        dsn = fresh_pgbench(ctx, n, s.scale)
        work = ctx.workdir("s5")
        daemon = streaming_setup(ctx, n, dsn, work, redis_views(n))
        points: list[dict[str, float]] = []
        for multiple in (1, 2, 4):
            per_client = s.scaling_tx * multiple
            bench = pg.pgbench_run(s, n.db, transactions=per_client)
            end = pg.marker_lsn(dsn)
            changes = 3 * bench.transactions
            raw_s = pg.recvlogical_drain(s, dsn, n.slot("raw"), end, PGBENCH_TABLES)
            timing, stats = drain(daemon, end)
            step(f"{multiple}×: {changes:,} changes: pgderive {timing.streaming:.2f} s "
                 f"(+{timing.startup:.2f} s start-up), pg_recvlogical {raw_s:.2f} s")
            points.append({"multiple": multiple, "changes": changes, "pgderive_s": timing.streaming,
                           "pgderive_total_s": timing.total, "startup_s": timing.startup,
                           "recvlogical_s": raw_s, "stats_changes": stats.get("changes", -1)})
            rate, raw_rate = changes / timing.streaming, changes / raw_s
            ctx.add(Row("5", f"drain {multiple}× ({changes:,} changes)", rate, "changes/s", raw_rate,
                        "pg_recvlogical", rate / raw_rate,
                        note=f"pgderive {timing.streaming:.1f} s from slot active (+{timing.startup:.1f} s "
                             f"start-up), pg_recvlogical {raw_s:.1f} s; pgbench -t {per_client} "
                             f"({bench.tps:,.0f} tps); {timing.cpu_note()}; {_changes_note(changes, stats)}"))
        ctx.shared["scaling"] = points
        one, four = points[0], points[-1]
        r1, r4 = one["changes"] / one["pgderive_s"], four["changes"] / four["pgderive_s"]
        ctx.add(Row("5", "linearity: throughput 4× / 1×", r4, "changes/s", r1, "throughput at 1×", r4 / r1,
                    f"≥ {LINEARITY}", r4 / r1 >= LINEARITY,
                    note=f"drain time 4×/1× = {four['pgderive_s'] / one['pgderive_s']:.2f} (4.00 = linear); "
                         f"pg_recvlogical {four['recvlogical_s'] / one['recvlogical_s']:.2f}; "
                         f"incl. start-up {four['pgderive_total_s'] / one['pgderive_total_s']:.2f}"))


# (key, scenario number, title, function, enabled?)
UNITS: list[tuple[str, str, str, Callable[[Context], None], Callable[[Settings], bool]]] = [
    ("1-redis", "1", "backlog drain → Redis", scenario_1_redis, lambda s: 1 in s.scenarios),
    ("1-opensearch", "1", "backlog drain → OpenSearch", scenario_1_opensearch, lambda s: 1 in s.scenarios),
    ("1-http", "1", "HTTP endpoint cost", scenario_1_http, lambda s: 1 in s.scenarios),
    ("1-provenance", "1", "provenance cost", scenario_1_provenance, lambda s: 1 in s.scenarios),
    ("2", "2", "live lag", scenario_2, lambda s: 2 in s.scenarios),
    ("3", "3", "snapshot", scenario_3, lambda s: 3 in s.scenarios),
    ("3-big", "3", "snapshot at the big scale", scenario_3_big, lambda s: 3 in s.scenarios and s.big_scale > 0),
    ("4", "4", "memory", scenario_4, lambda s: 4 in s.scenarios),
    ("5", "5", "scaling curve", scenario_5, lambda s: 5 in s.scenarios),
    ("6", "6", "peers", scenario_6, lambda s: 6 in s.scenarios),
]
