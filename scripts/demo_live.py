"""`make demo`, live operation (scripts/demo.py calls these): an online rebuild of one view under
pgbench load while readers poll it, and the single-view load times the parallel bootstrap is
compared with.

Online rebuild: ``pgbench -R RATE`` runs in the background; a reader polls 100 random accounts
through the rebuilt view's OpenSearch alias every ~20 ms (each must be found, and its stored
version, the commit LSN, must never go back) and through the Redis view ``account:{aid}``; a
probe commits an UPDATE of a teller every 100 ms and times until the Redis view
``teller_cache`` holds a version at or past it (the lag of another view as its readers see it),
before and during the rebuild. Then ``pgderive rebuild account_search`` asks the running daemon
and follows it.
"""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis
from opensearchpy import OpenSearch

from cdc.lsn import parse_lsn
from pgderive.runtime.sinks import deployment_of
from sinks.redis import versions_key
from views.spec import Spec

__all__ = ["online_rebuild_under_load", "single_view_loads", "cpu_sample", "cores_busy"]


class _Reader(threading.Thread):
    """Polls random accounts in the alias and in Redis; counts gaps and version regressions."""

    def __init__(self, spec: Spec, alias: str, accounts: int) -> None:
        super().__init__(daemon=True)
        self.os = OpenSearch(spec.sinks["search"].model_dump()["hosts"])
        self.redis = redis.Redis.from_url(spec.sinks["cache"].model_dump()["url"])
        self.alias, self.accounts = alias, accounts
        self.halt = threading.Event()
        self.polls = self.reads = self.gaps = self.regressions = 0
        self.examples: list[str] = []
        self.seen: dict[str, int] = {}

    def run(self) -> None:
        rnd = random.Random(1)
        while not self.halt.is_set():
            ids = [str(rnd.randint(1, self.accounts)) for _ in range(100)]
            try:
                docs = self.os.mget(index=self.alias, body={"ids": ids}, _source=False)["docs"]
                present = self.redis.exists(*[f"account:{i}" for i in ids[:20]])
            except Exception as e:  # a missing alias or index is a gap too
                self.gaps += 1
                self.examples.append(f"{type(e).__name__}: {e}")
                continue
            self.polls += 1
            self.reads += len(docs) + 20
            if present != 20:
                self.gaps += 20 - present
                self.examples.append(f"redis: {20 - present} account keys missing")
            for d in docs:
                if not d.get("found"):
                    self.gaps += 1
                    self.examples.append(f"opensearch: account {d['_id']} missing")
                    continue
                v = int(d["_version"])
                if v < self.seen.get(d["_id"], 0):
                    self.regressions += 1
                    self.examples.append(f"opensearch: account {d['_id']} version went back")
                self.seen[d["_id"]] = max(v, self.seen.get(d["_id"], 0))
            time.sleep(0.02)


class _Probe(threading.Thread):
    """Commit → visible in the Redis view ``teller_cache`` (ms), one probe every 100 ms."""

    def __init__(self, spec: Spec, dsn: str, tellers: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.tellers = dsn, tellers
        self.redis = redis.Redis.from_url(spec.sinks["cache"].model_dump()["url"])
        self.vkey = versions_key("teller_cache", deployment_of(spec))
        self.halt = threading.Event()
        self.marks: list[tuple[float, float]] = []  # (time, lag ms)

    def run(self) -> None:
        rnd = random.Random(2)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.halt.is_set():
                tid = rnd.randint(1, self.tellers)
                with conn.transaction():
                    conn.execute("UPDATE pgbench_tellers SET tbalance = tbalance WHERE tid = %s", (tid,))
                    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                t0 = time.monotonic()
                before = parse_lsn(row[0]) if row else 0
                while not self.halt.is_set():
                    v = self.redis.hget(self.vkey, f"teller:{tid}")
                    if v is not None and int(v[:16], 16) >= before:
                        self.marks.append((t0, (time.monotonic() - t0) * 1000.0))
                        break
                    if time.monotonic() - t0 > 30:
                        self.marks.append((t0, 30_000.0))
                        break
                    time.sleep(0.0005)
                time.sleep(0.1)


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50": round(statistics.median(ordered), 2), "p99": round(p99, 2), "max": round(ordered[-1], 2),
            "samples": len(ordered)}


def online_rebuild_under_load(root: Path, config: Path, spec: Spec, pgbench: list[str], env: dict[str, str],
                              scale: int, view: str = "account_search") -> dict[str, Any]:
    """Rebuild ``view`` online under ``pgbench`` (the command without ``-T``) with readers and a
    lag probe running; returns the measurements (see the module docstring)."""
    dsn = spec.source.dsn
    bench = subprocess.Popen([*pgbench, "-T", "600"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reader = _Reader(spec, spec.views[view].index or view, scale * 100_000)
    probe = _Probe(spec, dsn, scale * 10)
    try:
        reader.start()
        probe.start()
        time.sleep(8.0)  # the baseline: the same load, no rebuild
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", "rebuild", "-c", str(config), view],
                             cwd=root, capture_output=True, text=True, timeout=900)
        t1 = time.monotonic()
        time.sleep(3.0)
    finally:
        reader.halt.set()
        probe.halt.set()
        bench.terminate()
        bench.wait(30)
        reader.join(10)
        probe.join(10)
    before = [ms for t, ms in probe.marks if t < t0]
    during = [ms for t, ms in probe.marks if t0 <= t <= t1]
    return {"view": view, "exit_code": out.returncode, "output": out.stdout.strip().splitlines()[-3:],
            "error": out.stderr.strip()[-500:], "seconds": round(t1 - t0, 1),
            "reader_polls": reader.polls, "reader_reads": reader.reads, "gaps": reader.gaps,
            "regressions": reader.regressions, "examples": reader.examples[:5],
            "other_view_lag_ms": {"view": "teller_cache", "before": _pcts(before), "during": _pcts(during)}}


def cpu_sample() -> tuple[int, int]:
    """The machine's CPU time so far as ``(busy, total)`` jiffies, summed over every core (the
    ``cpu`` line of ``/proc/stat``, proc(5); busy is everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - fields[3] - fields[4], total


def cores_busy(since: tuple[int, int], until: tuple[int, int]) -> float:
    """How many of the machine's cores were busy on average between two :func:`cpu_sample`
    readings (every process: Postgres, the sinks, pgderive, the OpenSearch JVM)."""
    busy, total = until[0] - since[0], until[1] - since[1]
    return (os.cpu_count() or 1) * busy / total if total else 0.0


def single_view_loads(root: Path, config: Path, spec: Spec,
                      busy: dict[str, float] | None = None) -> dict[str, float]:
    """Each view rebuilt alone with the daemon stopped (``pgderive rebuild --offline``): view →
    load seconds as the command reports them. ``busy`` gets view → cores busy on the machine
    during its command (:func:`cores_busy`)."""
    out: dict[str, float] = {}
    for name in spec.views:
        before = cpu_sample()
        proc = subprocess.run([sys.executable, "-m", "pgderive.cli", "rebuild", "--offline", "-c", str(config), name],
                              cwd=root, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"pgderive rebuild --offline {name} failed:\n{proc.stderr}")
        if busy is not None:
            busy[name] = cores_busy(before, cpu_sample())
        # "rebuilt NAME at LSN: N rows in S s"
        out[name] = float(proc.stdout.strip().splitlines()[-1].rsplit(" in ", 1)[1].split()[0])
    return out
