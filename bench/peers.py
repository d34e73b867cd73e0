"""Scenario 6, peers: pgderive beside pgstream and pgsync on the same OpenSearch workload.

Every tool gets a database of its own (``<prefix>_peers_<tool>``: ``pgbench -i -s SCALE``), its
own slot(s) and its own index (``<prefix>-peers-<tool>…``), and runs alone (one tool at a time):

1. **Initial load** of ``pgbench_accounts`` into OpenSearch, timed from spawning the tool until
   ``_count`` of its index equals the table's rows (polled every 0.25 s; start-up, slot creation
   and the index refresh included, the same for every tool); the tool is then stopped.
2. **Backlog**: a ``CHECKPOINT`` (every backlog pays the same full-page writes), then
   ``pgbench -n -c C -j J -T BACKLOG_SECONDS`` (builtin TPC-B-like: one
   ``pgbench_accounts`` update per transaction) while the tool is stopped, closed by a marker
   (:func:`bench.pg.marker_lsn`: ``pg_current_wal_insert_lsn()`` = L, then one no-op account
   update); the tool is started again and timed from spawn until its slot's
   ``confirmed_flush_lsn`` >= L, capped at ``PGDERIVE_BENCH_PEERS_TIMEOUT`` seconds (then the
   share of the backlog's WAL it confirmed is reported). Meanwhile, once a second, the first
   time OpenSearch's ``sum(abalance)`` equals Postgres' is noted (pgsync re-reads the rows
   changed since its checkpoint from the table at start-up, so its documents can be right long
   before its slot is drained).
3. **Correctness**: OpenSearch's document count and ``sum(abalance)`` against Postgres' (waited
   for up to 30 s, the refresh interval and a tool's batch timeout); then a DELETE of 3 rows
   (are their documents gone within 30 s?) and last a TRUNCATE (is the index emptied within
   30 s, is the tool still running?).

Peak RSS (the tool's process and its children, every 50 ms) and CPU seconds cover the load and
the drain. The peers come from ``scripts/peers.sh`` (package registries only); a peer that does
not install or run gets a FAILED row saying why. Everything the scenario made (databases and
their slots, indices, pgderive's checkpoint documents, pgsync's Redis queue keys, processes) is
removed afterwards, also on failure.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
import yaml
from opensearchpy import OpenSearch

from . import pg
from .daemon import Daemon, ProcessSampler, write_config
from .pg import BenchError
from .report import Row
from .settings import ROOT, Settings
from .stores import clean_opensearch, opensearch_client, settle_opensearch

__all__ = ["scenario_6", "PEERS_SCRIPT", "PEERS_DIR"]

PEERS_SCRIPT = ROOT / "scripts" / "peers.sh"
PEERS_DIR = Path(os.environ.get("PGDERIVE_PEERS_DIR") or ROOT / ".services" / "peers")  # as scripts/peers.sh
MB = 1 << 20
#: Seconds to wait for documents to match Postgres after a drain, a DELETE or a TRUNCATE.
SETTLE_S = 30.0
#: Seconds a tool may take for its initial load (pgsync: ~6,000 rows/s here).
LOAD_TIMEOUT_S = 900.0
#: Rows deleted to see what a tool does with a DELETE.
DELETED_AIDS = (2, 3, 4)
#: Why Debezium has no rows (the report says so in a row of its own).
DEBEZIUM_NOTE = ("not run: Debezium into OpenSearch needs Kafka Connect with an OpenSearch sink connector "
                 "(Debezium Server has no OpenSearch sink); left for a later round")
#: Redis database of pgsync's queue (its keys are named after its slot).
PGSYNC_REDIS_DB = 9


def step(msg: str) -> None:
    """Progress line on the console."""
    print(f"    {time.strftime('%H:%M:%S')} {msg}", flush=True)


# --- processes --------------------------------------------------------------------------------
class Proc:
    """One tool process (or pgderive's :class:`~bench.daemon.Daemon`) with RSS/CPU sampling."""

    def alive(self) -> bool:
        """Whether the process still runs."""
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM, wait up to 60 s, then SIGKILL; never raises."""
        raise NotImplementedError

    def peak_rss(self) -> int:
        """Peak RSS (bytes) of the process and its children over its life (0 if unknown)."""
        raise NotImplementedError

    def cpu(self) -> float:
        """CPU seconds (user + system, children included) over its life so far."""
        raise NotImplementedError

    def tail(self) -> str:
        """The end of its log."""
        raise NotImplementedError


class PeerProc(Proc):
    """A peer's process: ``args`` spawned in ``workdir`` with ``env``, output to ``log``."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        self.sampler = ProcessSampler(self.proc.pid)
        self.sampler.start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the exit; its code, or None if still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            if self.wait(60) is None:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self.sampler.stop()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # its own session: children (pgsync's workers) too
        except ProcessLookupError:
            pass

    def peak_rss(self) -> int:
        return max((s[1] for s in self.sampler.samples), default=0)

    def cpu(self) -> float:
        return self.sampler.cpu_between()

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return "(no log)"


class DaemonProc(Proc):
    """pgderive's :class:`~bench.daemon.Daemon`, started by the constructor."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        daemon.start()

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def stop(self) -> None:
        if self.daemon.proc is None:
            return
        try:
            self.daemon.stop()
        except BenchError as e:
            step(f"pgderive did not stop cleanly: {str(e).splitlines()[0]}")

    def peak_rss(self) -> int:
        try:
            return self.daemon.peak_rss()
        except BenchError:
            return 0

    def cpu(self) -> float:
        return self.daemon.cpu_seconds()

    def tail(self) -> str:
        return self.daemon.log_tail(2000)


# --- OpenSearch and Postgres checks -----------------------------------------------------------
def doc_count(client: OpenSearch, index: str) -> int:
    """Documents in ``index`` (an alias or index); 0 if it does not exist yet."""
    try:
        return int(client.count(index=index)["count"])
    except Exception:  # noqa: BLE001 - not there yet (404) or not searchable yet
        return 0


def doc_sum(client: OpenSearch, index: str, field_name: str) -> int | None:
    """``sum(field_name)`` over ``index`` (refreshed first); None if it cannot be read."""
    try:
        client.indices.refresh(index=index)
        body = {"size": 0, "track_total_hits": True, "aggs": {"s": {"sum": {"field": field_name}}}}
        return int(round(client.search(index=index, body=body)["aggregations"]["s"]["value"]))
    except Exception:  # noqa: BLE001
        return None


def pg_totals(dsn: str, table: str) -> tuple[int, int]:
    """``(count(*), sum(abalance))`` of the accounts ``table`` in Postgres."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*), coalesce(sum(abalance), 0) FROM {table}").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Poll ``check`` every ``interval`` seconds until it is true (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def confirmed_lsn(dsn: str, slot: str) -> int:
    """The slot's ``confirmed_flush_lsn`` (0 if it does not exist)."""
    return pg.slot_position(dsn, slot)[1]


# --- tools ------------------------------------------------------------------------------------
@dataclass
class Tool:
    """One tool of the comparison: how to prepare it, run its load and its stream, and where
    its documents are. Subclasses fill in the hooks."""

    settings: Settings
    name: str
    db: str
    index_prefix: str
    work: Path
    table: str = "pgbench_accounts"  # as the builtin pgbench script sees it
    #: Its load process ends by itself (pgsync's one-shot run).
    exits_after_load: ClassVar[bool] = False
    procs: list[Proc] = field(default_factory=list)
    stream: Proc | None = None  # the streaming process, once started

    @property
    def dsn(self) -> str:
        """DSN of the tool's database."""
        return pg.db_dsn(self.settings, self.db)

    @property
    def index(self) -> str:
        """The index or alias holding the accounts' documents."""
        raise NotImplementedError

    @property
    def slot(self) -> str:
        """The slot whose ``confirmed_flush_lsn`` measures the drain."""
        raise NotImplementedError

    def sum_field(self, client: OpenSearch) -> str:
        """The OpenSearch field holding ``abalance``."""
        return "abalance"

    def prepare(self) -> None:
        """After ``pgbench -i``: schema, slot, index, configs (untimed)."""

    def start_load(self) -> Proc:
        """Spawn the process that makes the initial load."""
        raise NotImplementedError

    def progress(self) -> str:
        """What the tool says about its drain's progress ("" if nothing)."""
        return ""

    def finish_load(self, proc: Proc) -> None:
        """After the load is visible: stop the tool (default) or wait for its exit."""
        proc.stop()

    def start_stream(self) -> Proc:
        """Spawn the tool to stream (drain the backlog, then follow)."""
        raise NotImplementedError

    def spawn(self, proc: Proc) -> Proc:
        """Remember ``proc`` for the clean-up; returns it."""
        self.procs.append(proc)
        return proc

    def clean(self) -> None:
        """Stop every process it started (the scenario drops its database, slots, indices)."""
        for proc in self.procs:
            proc.stop()


class PgderiveTool(Tool):
    """pgderive with one OpenSearch view of pgbench_accounts (fields aid, bid, abalance)."""

    daemon: Daemon

    @property
    def index(self) -> str:
        return f"{self.index_prefix}accounts"

    @property
    def slot(self) -> str:
        return self.db

    def prepare(self) -> None:
        views = {f"{self.db}_accounts": {"table": "public.pgbench_accounts", "sink": "search",
                                         "index": self.index, "key": "{aid}",
                                         "fields": ["aid", "bid", "abalance"]}}
        cfg = write_config(self.work / "pgderive.yaml", dsn=self.dsn, slot=self.slot, views=views,
                           settings=self.settings)
        self.daemon = Daemon(self.settings, cfg, dsn=self.dsn, slot=self.slot, workdir=self.work, name="pgderive")

    def start_load(self) -> Proc:
        return self.spawn(DaemonProc(self.daemon))

    def start_stream(self) -> Proc:
        return self.spawn(DaemonProc(self.daemon))


class PgstreamTool(Tool):
    """pgstream v1.3.1 (wal2json, its ``pgstream`` schema, snapshot then replication).

    pgstream names its index after the Postgres schema (``<schema>-1`` behind the alias
    ``<schema>``), so the pgbench tables are moved into a schema named like the index prefix,
    found through the database's ``search_path``. Its index creation asks for
    ``index.knn=true``, which OpenSearch without the k-NN plugin refuses, so the index and the
    alias are created beforehand the way pgstream would, without the k-NN settings. Its schema
    snapshot of an existing table (pg_dump restored into its WAL pipeline, no target Postgres)
    reached the search processor as an empty diff here, so the columns' fields never got a
    mapping and every document was refused by pgstream's ``dynamic: strict`` mapping: the index
    is created with dynamic mapping instead (integers become ``long``, as pgstream maps them)."""

    def sum_field(self, client: OpenSearch) -> str:
        """pgstream names a column's field ``<table id>-<attnum>`` (abalance is attnum 3)."""
        try:
            mapping = client.indices.get_mapping(index=self.index)
            props = next(iter(mapping.values()))["mappings"].get("properties", {})
        except Exception:  # noqa: BLE001 - no index yet: the sum is then unknown
            return "abalance"
        return next((name for name in props if name.endswith("-3")), "abalance")

    @property
    def schema(self) -> str:
        """The Postgres schema = pgstream's alias name, e.g. ``pgdbench-peers-pgstream``."""
        return self.index_prefix.rstrip("-")

    @property
    def index(self) -> str:
        return self.schema

    @property
    def slot(self) -> str:
        return f"{self.db}_pgstream"

    @property
    def binary(self) -> Path:
        """The installed pgstream binary."""
        return PEERS_DIR / "bin" / "pgstream"

    def prepare(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
            for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"):
                conn.execute(f'ALTER TABLE public.{t} SET SCHEMA "{self.schema}"')
            conn.execute(f'ALTER DATABASE "{self.db}" SET search_path = "{self.schema}", public')
        url = self._pg_url()
        out = subprocess.run([str(self.binary), "init", "--postgres-url", url, "--replication-slot", self.slot,
                              "--with-injector"], capture_output=True, text=True, timeout=120, cwd=self.work)
        if out.returncode != 0:
            raise BenchError(f"pgstream init failed: {(out.stdout + out.stderr).strip()[-1500:]}")
        client = opensearch_client(self.settings)
        client.indices.create(index=f"{self.schema}-1", body={
            "settings": {"number_of_shards": 1, "number_of_replicas": 0, "index.mapping.total_fields.limit": 2000},
            "mappings": {"properties": {"_table": {"type": "keyword"}}}})
        client.indices.put_alias(index=f"{self.schema}-1", name=self.schema)
        self._write_config()

    def _pg_url(self) -> str:
        params = psycopg.conninfo.conninfo_to_dict(self.settings.pg_dsn)
        auth = str(params.get("user", "postgres")) + (f":{params['password']}" if params.get("password") else "")
        return (f"postgres://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{self.db}"
                "?sslmode=disable")

    def _write_config(self) -> None:
        url = self._pg_url()
        table = f"{self.schema}.pgbench_accounts"
        doc = {
            "source": {"postgres": {
                "url": url, "mode": "snapshot_and_replication",
                # Mode full needs a schema snapshot: pg_dump into the WAL pipeline (no target
                # Postgres); it reaches the search processor as an empty diff (class docstring).
                "snapshot": {"mode": "full", "tables": [table],
                             "schema": {"pgdump_pgrestore": {"clean_target_db": False}},
                             "recorder": {"repeatable_snapshots": False, "postgres_url": url}},
                "replication": {"replication_slot": self.slot}}},
            "target": {"search": {
                "engine": "opensearch", "url": self.settings.opensearch_url,
                # The same request size as pgderive's sink (2,000 documents / 16 MiB).
                "batch": {"timeout": 1000, "size": 2000, "max_bytes": 16 << 20},
                "backoff": {"exponential": {"max_retries": 5, "initial_interval": 1000, "max_interval": 60000}}}},
            "modifiers": {"injector": {"enabled": True}, "filter": {"include_tables": [table]}},
        }
        (self.work / "pgstream.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    def _run(self, log: str) -> Proc:
        args = [str(self.binary), "run", "-c", str(self.work / "pgstream.yaml"), "--log-level", "info",
                "--no-color"]
        env = {**os.environ, "PATH": f"{self.settings.pg_bin}:{os.environ.get('PATH', '')}"}  # its pg_dump
        return self.spawn(PeerProc(args, self.work / log, env=env, cwd=self.work))

    def start_load(self) -> Proc:
        return self._run("pgstream-load.log")

    def start_stream(self) -> Proc:
        return self._run("pgstream-stream.log")


class PgsyncTool(Tool):
    """pgsync 7.3.0 (test_decoding slot, triggers, Redis queue in database 9): ``bootstrap``,
    a one-shot ``pgsync`` for the initial load (it exits when done), ``pgsync --daemon`` for the
    stream."""

    exits_after_load: ClassVar[bool] = True

    @property
    def index(self) -> str:
        return self.index_prefix.rstrip("-")

    @property
    def slot(self) -> str:
        return re.sub("[^0-9a-zA-Z_]+", "", f"{self.db.lower()}_{self.index}")  # pgsync's Sync.slot_name

    def _bin(self, name: str) -> str:
        return str(PEERS_DIR / "pgsync-venv" / "bin" / name)

    def env(self) -> dict[str, str]:
        """pgsync's settings (it reads them from the environment)."""
        pgp = psycopg.conninfo.conninfo_to_dict(self.settings.pg_dsn)
        osu = urlsplit(self.settings.opensearch_url)
        ru = urlsplit(self.settings.redis_url)
        env = {**os.environ, "PG_HOST": str(pgp.get("host", "127.0.0.1")), "PG_PORT": str(pgp.get("port", 5432)),
               "PG_USER": str(pgp.get("user", "postgres")), "PG_DATABASE": self.db,
               "REDIS_HOST": ru.hostname or "127.0.0.1", "REDIS_PORT": str(ru.port or 6379),
               "REDIS_DB": str(PGSYNC_REDIS_DB), "OPENSEARCH": "true", "ELASTICSEARCH": "false",
               "ELASTICSEARCH_HOST": osu.hostname or "127.0.0.1", "ELASTICSEARCH_PORT": str(osu.port or 9200),
               "ELASTICSEARCH_SCHEME": osu.scheme or "http", "CHECKPOINT_PATH": str(self.work),
               "ELASTICSEARCH_TIMEOUT": "120"}
        if pgp.get("password"):
            env["PG_PASSWORD"] = str(pgp["password"])
        if ru.password:
            env["REDIS_AUTH"] = ru.password
        return env

    def prepare(self) -> None:
        schema = [{"database": self.db, "index": self.index,
                   "nodes": {"table": "pgbench_accounts", "columns": ["aid", "bid", "abalance"]}}]
        (self.work / "schema.json").write_text(json.dumps(schema, indent=2))
        out = subprocess.run([self._bin("bootstrap"), "--config", str(self.work / "schema.json")],
                             capture_output=True, text=True, timeout=300, env=self.env(), cwd=self.work)
        if out.returncode != 0:
            raise BenchError(f"pgsync bootstrap failed: {(out.stdout + out.stderr).strip()[-1500:]}")

    def start_load(self) -> Proc:
        return self.spawn(PeerProc([self._bin("pgsync"), "--config", str(self.work / "schema.json")],
                                   self.work / "pgsync-load.log", env=self.env(), cwd=self.work))

    def finish_load(self, proc: Proc) -> None:
        assert isinstance(proc, PeerProc)
        if proc.wait(120) is None:
            proc.stop()

    def progress(self) -> str:
        """The last ``done/total`` of its slot replay's progress bar in the stream log."""
        try:
            text = (self.work / "pgsync-stream.log").read_text(errors="replace")
        except OSError:
            return ""
        found = [(int(t.replace(",", "")), int(d.replace(",", "")))
                 for d, t in re.findall(r"WAL \S+ \[[=\-]*\]\s*([\d,]+)/([\d,]+)", text)]
        if not found:
            return ""
        total, done = max(found)  # the backlog's replay: the biggest of its pulls, the furthest point
        return f"its slot replay had decoded {done:,} of {total:,} changes (every table's rows, test_decoding)"

    def start_stream(self) -> Proc:
        return self.spawn(PeerProc([self._bin("pgsync"), "--config", str(self.work / "schema.json"), "--daemon"],
                                   self.work / "pgsync-stream.log", env=self.env(), cwd=self.work))

    def clean(self) -> None:
        super().clean()
        # The URL's database would win over a ``db=`` argument: name database 9 in the URL.
        r = redis.Redis.from_url(urlunsplit(urlsplit(self.settings.redis_url)._replace(path=f"/{PGSYNC_REDIS_DB}")))
        keys = list(r.scan_iter(match=f"queue:{self.slot}*", count=1000))
        if keys:
            r.unlink(*keys)


TOOLS: dict[str, type[Tool]] = {"pgderive": PgderiveTool, "pgstream": PgstreamTool, "pgsync": PgsyncTool}


# --- one tool's run ---------------------------------------------------------------------------
@dataclass
class Result:
    """What one tool did (seconds, bytes); None = not reached / not measured."""

    tool: str
    rows: int = 0
    load_s: float | None = None
    changes: int = 0
    drain_s: float | None = None
    drain_share: float = 0.0  # share of the backlog's WAL confirmed when the wait ended
    waited_s: float = 0.0
    match_s: float | None = None  # seconds from spawn until sum(abalance) matched (checked every 1 s)
    peak_rss: int = 0
    cpu_load: float = 0.0
    cpu_drain: float = 0.0
    docs: int | None = None
    pg_rows: int = 0
    docs_sum: int | None = None
    pg_sum: int = 0
    progress: str = ""  # the tool's own word on its drain when it was stopped
    delete: str = "not tried"
    truncate: str = "not tried"
    notes: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        """Documents and sum(abalance) equal to Postgres after the drain."""
        return self.docs == self.pg_rows and self.docs_sum == self.pg_sum

    @property
    def load_rate(self) -> float | None:
        """Initial load, rows/s."""
        return self.rows / self.load_s if self.load_s else None

    @property
    def drain_rate(self) -> float | None:
        """Backlog drain, changes/s (of the part confirmed when the wait was capped)."""
        if self.drain_s:
            return self.changes / self.drain_s
        if self.waited_s and self.drain_share > 0:
            return self.changes * self.drain_share / self.waited_s
        return None


def run_tool(ctx: Any, name: str) -> Result:
    """The whole workload for tool ``name`` in its own database; removes what it made."""
    s: Settings = ctx.settings
    db = f"{s.prefix}_peers_{name}"
    tool = TOOLS[name](s, name, db, f"{s.prefix}-peers-{name}-", ctx.workdir(f"s6-{name}"))
    res = Result(name)
    with _cleanup(s, tool):
        step(f"{name}: database {db}: pgbench -i -s {s.scale}")
        pg.recreate_database(s, db)
        pg.pgbench_init(s, db, s.scale)
        tool.prepare()
        client = opensearch_client(s)
        res.rows, _ = pg_totals(tool.dsn, tool.table)
        settle_opensearch(client)
        _load(tool, client, res)
        _backlog_and_drain(tool, client, res)
        _check_docs(tool, client, res)
        _delete_and_truncate(tool, client, res)
    return res


@contextmanager
def _cleanup(s: Settings, tool: Tool) -> Iterator[None]:
    """Drop the tool's database (its slots with it), indices, Redis keys; stop its processes."""
    def clean() -> None:
        tool.clean()
        # Every slot of the database goes first: the tool's, and pgsync's ``_tmp_`` (created and
        # dropped at each of its starts) if one of its starts was killed in between.
        pg.drop_database(s, tool.db)
        clean_opensearch(opensearch_client(s), tool.index_prefix.rstrip("-"), [f"{tool.db}_accounts"])

    clean()
    try:
        yield
    finally:
        clean()


def _load(tool: Tool, client: OpenSearch, res: Result) -> None:
    timeout = LOAD_TIMEOUT_S
    t0 = time.monotonic()
    proc = tool.start_load()

    def loaded() -> bool:
        if doc_count(client, tool.index) >= res.rows:
            return True
        if not proc.alive() and not tool.exits_after_load:
            raise BenchError(f"{tool.name} exited during the initial load:\n{proc.tail()}")
        return False

    if not wait_until(loaded, timeout):
        proc.stop()
        raise BenchError(f"{tool.name}: initial load not visible within {timeout:.0f} s "
                         f"({doc_count(client, tool.index):,} of {res.rows:,} documents)\n{proc.tail()}")
    res.load_s = time.monotonic() - t0
    tool.finish_load(proc)
    res.cpu_load, res.peak_rss = proc.cpu(), proc.peak_rss()
    step(f"{tool.name}: initial load {res.rows:,} rows in {res.load_s:.1f} s ({res.rows / res.load_s:,.0f} rows/s), "
         f"CPU {res.cpu_load:.1f} s, peak RSS {res.peak_rss / MB:.0f} MB")


def _backlog_and_drain(tool: Tool, client: OpenSearch, res: Result) -> None:
    s = tool.settings
    with psycopg.connect(tool.dsn, autocommit=True) as conn:
        # Every backlog starts right after a checkpoint, so each pays the same full-page writes
        # (without it one tool's backlog measured 221 MB of WAL, another's 25 MB).
        conn.execute("CHECKPOINT")
    start = confirmed_lsn(tool.dsn, tool.slot)
    bench = pg.pgbench_run(s, tool.db, seconds=s.backlog_seconds)
    end = pg.marker_lsn(tool.dsn)
    res.changes = bench.transactions
    _, target_sum = pg_totals(tool.dsn, tool.table)
    field_name = tool.sum_field(client)
    step(f"{tool.name}: backlog {bench.transactions:,} account changes ({bench.tps:,.0f} tps), "
         f"{(end - start) / MB:.0f} MB of WAL; draining")
    settle_opensearch(client)
    t0 = time.monotonic()
    proc = tool.start_stream()
    tool.stream = proc
    last, next_sum = start, t0 + 1.0

    def confirmed() -> bool:
        nonlocal last, next_sum
        now = time.monotonic()
        if res.match_s is None and now >= next_sum:  # once a second: do the documents match yet?
            next_sum = now + 1.0
            if doc_sum(client, tool.index, field_name) == target_sum:
                res.match_s = now - t0
        last = confirmed_lsn(tool.dsn, tool.slot)
        if last >= end:
            return True
        if not proc.alive():
            raise BenchError(f"{tool.name} exited while draining the backlog:\n{proc.tail()}")
        return False

    reached = wait_until(confirmed, s.peers_timeout, interval=0.05)
    res.waited_s = time.monotonic() - t0
    res.drain_share = min(1.0, max(0.0, (last - start) / max(end - start, 1)))
    if reached:
        res.drain_s = res.waited_s
    res.cpu_drain = proc.cpu()
    res.peak_rss = max(res.peak_rss, proc.peak_rss())
    matched = (f"; documents matched Postgres' sum(abalance) after {res.match_s:.0f} s" if res.match_s is not None
               else "")
    step(f"{tool.name}: " + (f"confirmed the backlog's end in {res.drain_s:.1f} s" if reached else
                             f"confirmed {res.drain_share:.1%} of the backlog's WAL in {res.waited_s:.0f} s (cap)")
         + f", CPU {res.cpu_drain:.1f} s{matched}")


def _check_docs(tool: Tool, client: OpenSearch, res: Result) -> None:
    res.pg_rows, res.pg_sum = pg_totals(tool.dsn, tool.table)

    def equal() -> bool:
        res.docs, res.docs_sum = doc_count(client, tool.index), doc_sum(client, tool.index, tool.sum_field(client))
        return res.correct

    wait_until(equal, SETTLE_S if res.drain_s else 1.0, interval=1.0)
    step(f"{tool.name}: {res.docs} documents (Postgres {res.pg_rows:,}), sum(abalance) {res.docs_sum} "
         f"(Postgres {res.pg_sum:,})")


def _delete_and_truncate(tool: Tool, client: OpenSearch, res: Result) -> None:
    proc = tool.stream
    if proc is None or not proc.alive():
        res.delete = res.truncate = "not tried (the tool had exited)"
        return
    before = doc_count(client, tool.index)
    with psycopg.connect(tool.dsn) as conn:
        gone = conn.execute(f"DELETE FROM {tool.table} WHERE aid = ANY(%s)", (list(DELETED_AIDS),)).rowcount
        conn.commit()
    t0 = time.monotonic()
    if wait_until(lambda: doc_count(client, tool.index) <= before - gone, SETTLE_S):
        res.delete = f"{gone} documents deleted within {time.monotonic() - t0:.1f} s"
    else:
        res.delete = (f"documents NOT deleted within {SETTLE_S:.0f} s ({doc_count(client, tool.index):,} "
                      f"documents, {before - gone:,} expected)")
    with psycopg.connect(tool.dsn) as conn:
        conn.execute(f"TRUNCATE {tool.table}")
        conn.commit()
    t0 = time.monotonic()
    if wait_until(lambda: doc_count(client, tool.index) == 0 or not proc.alive(), SETTLE_S):
        left = doc_count(client, tool.index)
        if left == 0:
            res.truncate = f"index emptied within {time.monotonic() - t0:.1f} s"
        else:
            res.truncate = (f"the tool EXITED on the TRUNCATE ({left:,} documents left): "
                            + _last_error(proc.tail()))
    else:
        res.truncate = f"index NOT emptied within {SETTLE_S:.0f} s ({doc_count(client, tool.index):,} documents left)"
    proc.stop()
    res.progress = tool.progress()
    step(f"{tool.name}: DELETE: {res.delete}; TRUNCATE: {res.truncate}"
         + (f"; {res.progress}" if res.progress else ""))


def _last_error(log: str) -> str:
    """The last log line mentioning an error, shortened."""
    lines = [ln for ln in log.splitlines() if "error" in ln.lower() or "panic" in ln.lower()]
    return (lines[-1] if lines else log.strip().splitlines()[-1] if log.strip() else "no log")[-300:]


# --- the scenario -----------------------------------------------------------------------------
def install_peers(settings: Settings, peers: tuple[str, ...]) -> dict[str, str]:
    """Run ``scripts/peers.sh install PEER`` per peer; returns ``{peer: error}`` for those that
    failed (the script's last lines)."""
    failed: dict[str, str] = {}
    for peer in peers:
        step(f"scripts/peers.sh install {peer}")
        out = subprocess.run([str(PEERS_SCRIPT), "install", peer], capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            failed[peer] = "install failed: " + " / ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
    return failed


def scenario_6(ctx: Any) -> None:
    """pgderive, then each enabled peer, on the same workload; rows pgderive / peer."""
    s: Settings = ctx.settings
    failed = install_peers(s, s.peers)
    ours = run_tool(ctx, "pgderive")
    _correctness_row(ctx, ours)
    for peer in s.peers:
        if peer in failed:
            ctx.add(Row("6", f"vs {peer}", error=failed[peer]))
            continue
        try:
            theirs = run_tool(ctx, peer)
        except Exception as e:  # noqa: BLE001 - a peer that does not run gets a FAILED row, the run goes on
            (s.out / f"error-6-{peer}.txt").write_text(traceback.format_exc())
            ctx.add(Row("6", f"vs {peer}", error=f"{peer} did not run: {type(e).__name__}: {e}"))
            continue
        _peer_rows(ctx, ours, theirs)
        _correctness_row(ctx, theirs)
    if s.peers:
        ctx.add(Row("6", "vs Debezium", note=DEBEZIUM_NOTE))


def _load_label(res: Result) -> str:
    return f"{res.rows / 1e6:g}M rows" if res.rows >= 100_000 else f"{res.rows:,} rows"


def _peer_rows(ctx: Any, ours: Result, theirs: Result) -> None:
    peer = theirs.tool
    lr, plr = ours.load_rate, theirs.load_rate
    ctx.add(Row("6", f"initial load {_load_label(ours)} → OpenSearch vs {peer}", lr, "rows/s", plr, peer,
                lr / plr if lr and plr else None,
                note=f"from spawn until all documents are searchable: pgderive {ours.load_s:.1f} s, "
                     f"{peer} {theirs.load_s:.1f} s; CPU pgderive {ours.cpu_load:.1f} s, {peer} {theirs.cpu_load:.1f} s"))
    dr, pdr = ours.drain_rate, theirs.drain_rate
    capped = "" if theirs.drain_s else (f"; {peer} did NOT reach the backlog's end: {theirs.drain_share:.1%} of its "
                                       f"WAL confirmed after {theirs.waited_s:.0f} s (cap)"
                                       + (", its rate is of that part" if theirs.drain_share > 0 else ""))
    if theirs.progress:
        capped += f"; when stopped {theirs.progress}"
    if theirs.match_s is not None:
        capped += f"; {peer}'s documents matched Postgres' sum(abalance) {theirs.match_s:.0f} s after its spawn"
    ctx.add(Row("6", f"backlog drain → OpenSearch vs {peer}", dr, "changes/s", pdr, peer,
                dr / pdr if dr and pdr else None,
                note=f"pgbench -T {ctx.settings.backlog_seconds} backlog written while each tool was stopped "
                     f"(pgderive {ours.changes:,}, {peer} {theirs.changes:,} account changes), timed from spawn "
                     f"to its slot confirmed past the backlog's end: pgderive {ours.waited_s:.1f} s, {peer} "
                     f"{theirs.waited_s:.1f} s{capped}; CPU pgderive {ours.cpu_drain:.1f} s, {peer} "
                     f"{theirs.cpu_drain:.1f} s"))
    ctx.add(Row("6", f"peak RSS (load and drain) vs {peer}", ours.peak_rss / MB, "MB", theirs.peak_rss / MB, peer,
                ours.peak_rss / theirs.peak_rss if theirs.peak_rss else None, lower_is_better=True,
                note="the process and its children, sampled every 50 ms"))
    oc, pc = ours.cpu_load + ours.cpu_drain, theirs.cpu_load + theirs.cpu_drain
    ctx.add(Row("6", f"CPU seconds (load and drain) vs {peer}", oc, "s", pc, peer, oc / pc if pc else None,
                lower_is_better=True,
                note=f"load {ours.cpu_load:.1f} / {theirs.cpu_load:.1f} s, drain {ours.cpu_drain:.1f} / "
                     f"{theirs.cpu_drain:.1f} s (pgderive / {peer}); the tool's own processes only"))


def _correctness_row(ctx: Any, res: Result) -> None:
    docs = res.docs if res.docs is not None else 0
    ctx.add(Row("6", f"correctness after the drain: {res.tool}", float(docs), "documents", float(res.pg_rows),
                "rows in Postgres", docs / res.pg_rows if res.pg_rows else None,
                "= rows and sum(abalance)", res.correct,
                note=f"sum(abalance) {res.docs_sum} in OpenSearch, {res.pg_sum:,} in Postgres; DELETE of "
                     f"{len(DELETED_AIDS)} rows: {res.delete}; TRUNCATE: {res.truncate}",
                extra={"load_s": res.load_s, "drain_s": res.drain_s, "waited_s": res.waited_s,
                       "drain_share": res.drain_share, "changes": res.changes, "rows": res.rows,
                       "peak_rss": res.peak_rss, "cpu_load": res.cpu_load, "cpu_drain": res.cpu_drain}))
