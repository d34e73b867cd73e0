"""The live-lag probe: a one-row table updated every ~50 ms, watched in two places.

* :class:`ProbeWriter` updates ``bench_probe`` (``seq`` + 1) on its own autocommit connection
  and records each version's commit time as the server's ``clock_timestamp()`` taken in the
  statement (the same clock wal2json's commit ``timestamp``, pgderive's own lag origin, uses).
* :class:`RedisPoller` reads the probe's Redis hash (written by pgderive) every ~1 ms; a
  version counts as visible at the first poll that shows it *or a later one*.
* :class:`DecodeWatcher` is the baseline: ``pg_recvlogical`` on its own slot, filtered to the
  probe table (``add-tables``), printing to a pipe; a version counts as decoded when its
  wal2json message arrives. This is the earliest any logical decoding consumer could know.

All times are ``time.time()`` / server ``clock_timestamp()`` on the same host (one clock).
"""
from __future__ import annotations

import subprocess
import threading
import time

import orjson
import psycopg
import redis

__all__ = ["PROBE_DDL", "ProbeWriter", "RedisPoller", "DecodeWatcher", "lags_ms", "percentile"]

PROBE_DDL = ("CREATE TABLE bench_probe (id int PRIMARY KEY, seq bigint NOT NULL);"
             "INSERT INTO bench_probe VALUES (1, 0)")


class ProbeWriter(threading.Thread):
    """Bumps ``bench_probe.seq`` every ``interval`` seconds from ``first_seq`` on;
    ``commits[seq]`` = commit time (epoch seconds)."""

    def __init__(self, dsn: str, interval: float, first_seq: int) -> None:
        super().__init__(daemon=True, name="probe-writer")
        self.dsn = dsn
        self.interval = interval
        self.seq = first_seq - 1
        self.first_seq = first_seq
        self.commits: dict[int, float] = {}
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                next_at = time.monotonic()
                while not self._halt.is_set():
                    seq = self.seq + 1
                    ts = conn.execute("UPDATE bench_probe SET seq = %s WHERE id = 1 "
                                      "RETURNING extract(epoch FROM clock_timestamp())::float8",
                                      (seq,)).fetchone()[0]
                    self.commits[seq] = ts
                    self.seq = seq
                    next_at += self.interval
                    self._halt.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as e:  # reported by the scenario
            self.error = e

    def stop(self) -> None:
        """Stop after the current update; joins the thread."""
        self._halt.set()
        self.join(10)


class RedisPoller(threading.Thread):
    """Polls ``HGET key seq`` every ``interval`` seconds; ``seen[seq]`` = first time a value
    >= seq was read."""

    def __init__(self, url: str, key: str, interval: float) -> None:
        super().__init__(daemon=True, name="probe-poller")
        self.client = redis.Redis.from_url(url)
        self.key = key
        self.interval = interval
        self.seen: dict[int, float] = {}
        self.last = -1
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            raw = self.client.hget(self.key, "seq")
            self.last = int(raw) if raw is not None else 0
            while not self._halt.is_set():
                raw = self.client.hget(self.key, "seq")
                now = time.time()
                if raw is not None:
                    value = int(raw)
                    if value > self.last:
                        for s in range(self.last + 1, value + 1):
                            self.seen[s] = now
                        self.last = value
                time.sleep(self.interval)
        except BaseException as e:
            self.error = e

    def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until ``seq`` was seen (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last >= seq:
                return True
            time.sleep(0.01)
        return self.last >= seq

    def stop(self) -> None:
        """Stop polling; joins the thread."""
        self._halt.set()
        self.join(10)


class DecodeWatcher(threading.Thread):
    """Runs ``args`` (a ``pg_recvlogical --start … -f -`` command filtered to the probe table)
    and records ``seen[seq]`` = arrival time of each probe update's wal2json message."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True, name="probe-decoder")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.seen: dict[int, float] = {}
        self.last = -1

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            if b'"action":"U"' not in line:
                continue
            msg = orjson.loads(line)
            cols = {c["name"]: c["value"] for c in msg.get("columns", [])}
            seq = int(cols.get("seq", -1))
            self.seen.setdefault(seq, now)
            self.last = max(self.last, seq)

    def stop(self) -> str:
        """Terminate pg_recvlogical (SIGTERM to its pid) and return its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.join(5)
        return (err or b"").decode(errors="replace")


def lags_ms(commits: dict[int, float], seen: dict[int, float]) -> tuple[list[float], int]:
    """Lag in ms of every committed probe version that was seen, and how many were not."""
    lags = [(seen[s] - t) * 1000.0 for s, t in commits.items() if s in seen]
    return lags, len(commits) - len(lags)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..1) as pgderive's stats compute it; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
