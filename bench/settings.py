"""Benchmark settings, all overridable from the environment (``PGDERIVE_BENCH_*``).

Defaults are the full run of ``make bench`` (about 20 minutes on a 2-core machine, of which
the snapshot at scale 50 takes about 5 and the peers of scenario 6 about 8;
``PGDERIVE_BENCH_BIG_SCALE=0`` and ``PGDERIVE_BENCH_PEERS=`` skip them);
``PGDERIVE_BENCH_QUICK=1`` switches every default to a smoke-test size (pgbench scale 1, a few
seconds per workload, scenario 6 with pgderive alone, under 3 minutes) that writes its report under ``bench/out/quick/`` so it
never overwrites the real report. An explicitly set variable always wins over both.

| variable | default (quick) | meaning |
|---|---|---|
| ``PGDERIVE_BENCH_QUICK`` | 0 | smoke-test sizes |
| ``PGDERIVE_BENCH_SCALE`` | 10 (1) | pgbench scale of every scenario (100k accounts per unit) |
| ``PGDERIVE_BENCH_BIG_SCALE`` | 50 (0) | also run the snapshot scenario at this scale (50 = 5M rows); 0 = off |
| ``PGDERIVE_BENCH_CLIENTS`` / ``_JOBS`` | 4 / 2 | pgbench ``-c`` / ``-j`` |
| ``PGDERIVE_BENCH_BACKLOG_SECONDS`` | 20 (3) | scenario 1: pgbench ``-T`` building the backlog |
| ``PGDERIVE_BENCH_LAG_SECONDS`` | 60 (4) | scenario 2: pgbench ``-T`` of each load level |
| ``PGDERIVE_BENCH_LAG_RATE`` | 1000 | scenario 2: pgbench ``-R`` of the rate-limited level |
| ``PGDERIVE_BENCH_PROBE_MS`` / ``_POLL_MS`` | 50 / 1 | scenario 2: probe update / Redis poll interval |
| ``PGDERIVE_BENCH_SCALING_TX`` | 5000 (150) | scenario 5: pgbench ``-t`` (per client) of the 1x backlog |
| ``PGDERIVE_BENCH_SCENARIOS`` | 1,2,3,4,5,6,7 | which scenarios to run |
| ``PGDERIVE_BENCH_PEERS`` | pgstream,pgsync (empty) | scenario 6: the peers run beside pgderive (installed by ``scripts/peers.sh``); empty = pgderive alone |
| ``PGDERIVE_BENCH_PEERS_TIMEOUT`` | 180 (60) | scenario 6: seconds a tool may take to drain the backlog before the share it reached is reported |
| ``PGDERIVE_BENCH_UNITS`` | (all) | only these parts of them, by key (e.g. ``1-http,1-provenance``; see ``bench/scenarios.py`` ``UNITS``) |
| ``PGDERIVE_BENCH_PREFIX`` | pgdbench (pgdbenchq) | prefix of databases, slots, views, Redis keys, indices |
| ``PGDERIVE_BENCH_REPORT`` / ``_PLOT`` | bench/report.md, bench/plot.png | outputs |
| ``PGDERIVE_BENCH_OUT`` | bench/out (bench/out/quick) | logs, stats files, results.json |
| ``PGDERIVE_BENCH_PG_DSN`` | postgresql://postgres@127.0.0.1:5433/postgres | admin DSN |
| ``PGDERIVE_BENCH_REDIS_URL`` | redis://127.0.0.1:6380/12 | Redis (its own database: clean-up scans it by key prefix, which is slow in a database holding millions of other keys) |
| ``PGDERIVE_BENCH_OPENSEARCH_URL`` | http://127.0.0.1:9201 | OpenSearch |
| ``PGDERIVE_BENCH_KAFKA`` | 127.0.0.1:9093 | Kafka bootstrap servers (scenario 7) |
| ``PG_BIN`` | /usr/lib/postgresql/15/bin | pgbench, pg_recvlogical |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"


def _env(name: str, default: str) -> str:
    value = os.environ.get(f"PGDERIVE_BENCH_{name}")
    return value if value not in (None, "") else default


def _int(name: str, default: int, quick_default: int | None, quick: bool) -> int:
    fallback = quick_default if quick and quick_default is not None else default
    return int(_env(name, str(fallback)))


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know; build it with :func:`load_settings`."""

    quick: bool
    scale: int
    big_scale: int
    clients: int
    jobs: int
    backlog_seconds: int
    lag_seconds: int
    lag_rate: int
    probe_interval_ms: float
    poll_interval_ms: float
    scaling_tx: int
    scenarios: frozenset[int]
    prefix: str
    report: Path
    plot: Path
    out: Path
    pg_dsn: str
    redis_url: str
    opensearch_url: str
    pg_bin: Path
    #: Kafka bootstrap servers (scenario 7).
    kafka: str = "127.0.0.1:9093"
    #: Scenario 6: the peers run beside pgderive, in order (``pgstream``, ``pgsync``).
    peers: tuple[str, ...] = ()
    #: Scenario 6: seconds a tool may take to drain the backlog (then its share is reported).
    peers_timeout: float = 180.0
    #: Unit keys to run (``UNITS`` of :mod:`bench.scenarios`); empty: every enabled one.
    units: frozenset[str] = frozenset()

    @property
    def pgderive(self) -> Path:
        """The ``pgderive`` console script of the running interpreter's venv."""
        import sys

        return Path(sys.executable).with_name("pgderive")


KNOWN_PEERS = ("pgstream", "pgsync")


def _peers(quick: bool) -> tuple[str, ...]:
    """``PGDERIVE_BENCH_PEERS`` (comma list; set but empty = none), checked against
    :data:`KNOWN_PEERS`; default both, none in quick mode."""
    raw = os.environ.get("PGDERIVE_BENCH_PEERS")
    if raw is None:
        raw = "" if quick else ",".join(KNOWN_PEERS)
    peers = tuple(p for p in raw.replace(" ", "").split(",") if p)
    unknown = sorted(set(peers) - set(KNOWN_PEERS))
    if unknown:
        raise SystemExit(f"PGDERIVE_BENCH_PEERS: unknown peer(s) {unknown} ({', '.join(KNOWN_PEERS)})")
    return tuple(dict.fromkeys(peers))


def load_settings() -> Settings:
    """Read :class:`Settings` from the environment (see the module docstring)."""
    quick = _env("QUICK", "0").lower() not in ("0", "", "false", "no")
    out = Path(_env("OUT", str(BENCH_DIR / "out" / ("quick" if quick else "")))).resolve()
    scenarios = frozenset(int(s) for s in _env("SCENARIOS", "1,2,3,4,5,6,7").replace(" ", "").split(",") if s)
    unknown = scenarios - {1, 2, 3, 4, 5, 6, 7}
    if unknown:
        raise SystemExit(f"PGDERIVE_BENCH_SCENARIOS: unknown scenario(s) {sorted(unknown)} (1-7)")
    peers = _peers(quick)
    units = frozenset(u for u in _env("UNITS", "").replace(" ", "").split(",") if u)
    return Settings(
        units=units,
        quick=quick,
        scale=_int("SCALE", 10, 1, quick),
        big_scale=_int("BIG_SCALE", 50, 0, quick),
        clients=_int("CLIENTS", 4, None, quick),
        jobs=_int("JOBS", 2, None, quick),
        backlog_seconds=_int("BACKLOG_SECONDS", 20, 3, quick),
        lag_seconds=_int("LAG_SECONDS", 60, 4, quick),
        lag_rate=_int("LAG_RATE", 1000, None, quick),
        probe_interval_ms=float(_env("PROBE_MS", "50")),
        poll_interval_ms=float(_env("POLL_MS", "1")),
        scaling_tx=_int("SCALING_TX", 5000, 150, quick),
        scenarios=scenarios,
        peers=peers,
        peers_timeout=float(_int("PEERS_TIMEOUT", 180, 60, quick)),
        prefix=_env("PREFIX", "pgdbenchq" if quick else "pgdbench"),
        report=Path(_env("REPORT", str(out / "report.md" if quick else BENCH_DIR / "report.md"))).resolve(),
        plot=Path(_env("PLOT", str(out / "plot.png" if quick else BENCH_DIR / "plot.png"))).resolve(),
        out=out,
        pg_dsn=_env("PG_DSN", "postgresql://postgres@127.0.0.1:5433/postgres"),
        redis_url=_env("REDIS_URL", "redis://127.0.0.1:6380/12"),
        opensearch_url=_env("OPENSEARCH_URL", "http://127.0.0.1:9201"),
        pg_bin=Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")),
        kafka=_env("KAFKA", "127.0.0.1:9093"),
    )
