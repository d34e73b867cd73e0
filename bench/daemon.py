"""Running ``pgderive run`` as a subprocess: config files, start/stop, progress, peak RSS.

:class:`Daemon` starts the real CLI (the venv's ``pgderive`` script) with ``--stats-file``,
samples the resident set size of the process and its children every 50 ms with psutil
(:class:`ProcessSampler`, which also records CPU time), and measures progress from the outside only: ``pgderive.slot_state``
(bootstrap finished) and ``pg_replication_slots`` (slot active, confirmed flush LSN).
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
import yaml

from cdc.lsn import parse_lsn

from .cpu import cpu_breakdown, process_cpu
from .pg import BenchError, format_lsn, slot_position
from .settings import Settings

__all__ = ["write_config", "ProcessSampler", "Daemon", "Drain"]


def write_config(path: Path, *, dsn: str, slot: str, views: dict[str, dict[str, Any]],
                 settings: Settings) -> Path:
    """Write a pgderive YAML config with ``views``; only the sinks they use are declared
    (``cache`` = Redis, ``search`` = OpenSearch)."""
    used = {v["sink"] for v in views.values()}
    sinks: dict[str, Any] = {}
    if "cache" in used:
        sinks["cache"] = {"type": "redis", "url": settings.redis_url}
    if "search" in used:
        sinks["search"] = {"type": "opensearch", "hosts": [settings.opensearch_url]}
    doc = {"source": {"dsn": dsn, "slot": slot}, "sinks": sinks, "views": views}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ProcessSampler(threading.Thread):
    """Samples the RSS and the CPU time of a process plus all its descendants every
    ``interval`` seconds.

    ``samples`` holds ``(monotonic time, rss bytes, cpu seconds)`` (CPU = user + system, the
    children's included); :meth:`peak` reads the maximum RSS over a time window and
    :meth:`cpu_between` the CPU spent in one. A process that exits ends the sampling."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    cpu_s = cpu.user + cpu.system + cpu.children_user + cpu.children_system
                for child in proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                        ccpu = child.cpu_times()
                        cpu_s += ccpu.user + ccpu.system
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic(), rss, cpu_s))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling (returns at once; the thread ends within one interval)."""
        self._halt.set()

    def _window(self, start: float | None, end: float | None) -> list[tuple[float, int, float]]:
        return [s for s in list(self.samples)
                if (start is None or s[0] >= start) and (end is None or s[0] <= end)]

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        """Highest RSS sample (bytes) taken in ``[start, end]`` (monotonic times; None = open)."""
        window = self._window(start, end)
        if not window:
            raise BenchError("no RSS sample in the window (the daemon exited too early?)")
        return max(s[1] for s in window)

    def cpu_between(self, start: float | None = None, end: float | None = None) -> float:
        """CPU seconds spent between the first and the last sample in ``[start, end]``
        (from spawn when ``start`` is None)."""
        window = self._window(start, end)
        if not window:
            return 0.0
        return window[-1][2] - (window[0][2] if start is not None else 0.0)


@dataclass
class Drain:
    """Timings of one catch-up, in seconds from spawning the daemon (``total``) and from the
    moment its slot became active (``streaming``)."""

    startup: float
    total: float
    cpu: float = 0.0  # CPU seconds of the daemon from spawn to the target confirmed
    walsender_cpu: float | None = None  # lifetime CPU of the walsender serving its slot
    services: dict[str, float] = field(default_factory=dict)  # Redis/OpenSearch CPU meanwhile
    resolution: float = 0.05  # the polling interval both times were observed with

    def cpu_note(self) -> str:
        """Where the CPU went from spawn to confirmed: pgderive (its share of the wall time),
        the walsender decoding for it, and the sink servers."""
        return (f"pgderive CPU {self.cpu / max(self.total, 1e-9):.0%} of its wall time; "
                + cpu_breakdown(self.total, {"pgderive": self.cpu, "walsender": self.walsender_cpu,
                                             **self.services}))

    @property
    def streaming(self) -> float:
        """Seconds from the slot becoming active to the target LSN being confirmed; never
        below the polling interval (a small backlog can be drained between two polls)."""
        return max(self.total - self.startup, self.resolution)


class Daemon:
    """One ``pgderive run -c CONFIG --stats-file STATS`` subprocess with RSS sampling.

    Args:
        settings: benchmark settings (where the ``pgderive`` script is).
        config: the YAML file; ``dsn``/``slot`` must match it.
        workdir: directory for ``<name>.log`` and ``<name>.stats.json`` (one pair per start:
            every :meth:`start` increments a counter in the file names).
    """

    def __init__(self, settings: Settings, config: Path, *, dsn: str, slot: str, workdir: Path,
                 name: str) -> None:
        self.settings = settings
        self.config = config.resolve()  # the daemon runs in ``workdir``
        self.dsn = dsn
        self.slot = slot
        self.workdir = workdir.resolve()
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.sampler: ProcessSampler | None = None
        self.started_at = 0.0
        self.runs = 0
        self.log_path = workdir / f"{name}.log"
        self.stats_path = workdir / f"{name}.stats.json"
        #: Extra arguments of ``pgderive run`` (e.g. ``["--http", "off"]``). The default
        #: ``--http off`` keeps the daemons of a run from racing for 127.0.0.1:9187; the
        #: endpoint's own cost is measured by scenario 1's "HTTP endpoint" part.
        self.args: list[str] = ["--http", "off"]

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, *, resnapshot: bool = False) -> None:
        """Spawn the daemon (``--resnapshot`` if asked) and start sampling its RSS."""
        if self.proc is not None:
            raise BenchError(f"{self.name}: already running")
        self.runs += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.{self.runs}.log"
        self.stats_path = self.workdir / f"{self.name}.{self.runs}.stats.json"
        self.stats_path.unlink(missing_ok=True)
        args = [str(self.settings.pgderive), "run", "-c", str(self.config), "--stats-file", str(self.stats_path),
                *self.args]
        if resnapshot:
            args.append("--resnapshot")
        with open(self.log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.sampler = ProcessSampler(self.proc.pid)
        self.sampler.start()

    def stop(self, timeout: float = 180) -> dict[str, Any]:
        """SIGTERM (graceful: apply, confirm, exit 0), wait, and return the final stats.

        Raises :class:`BenchError` with the log's tail if it exits non-zero or hangs."""
        proc = self._require()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        if self.sampler:
            self.sampler.stop()
        self.proc = None
        if code != 0:
            raise BenchError(f"{self.name}: pgderive exited with {code}\n{self.log_tail()}")
        return self.stats()

    def kill(self) -> None:
        """Stop at once (cleanup after a failure): SIGTERM, then SIGKILL after 20 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sampler:
            self.sampler.stop()
        self.proc = None

    def stats(self) -> dict[str, Any]:
        """The last stats JSON written by the current/last run ({} if none yet)."""
        try:
            return orjson.loads(self.stats_path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the current run's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    # -- progress -----------------------------------------------------------------------------
    def _require(self) -> subprocess.Popen:
        if self.proc is None:
            raise BenchError(f"{self.name}: not running")
        return self.proc

    def _check_alive(self, what: str) -> None:
        proc = self._require()
        if proc.poll() is not None:
            self.proc = None
            if self.sampler:
                self.sampler.stop()
            raise BenchError(f"{self.name}: pgderive exited with {proc.returncode} while {what}\n{self.log_tail()}")

    def wait_bootstrapped(self, timeout: float = 1800) -> float:
        """Wait until ``pgderive.slot_state`` says ``streaming`` for the slot (bootstrap done);
        returns seconds since spawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("bootstrapping")
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    if conn.execute("SELECT to_regclass('pgderive.slot_state')").fetchone()[0] is not None:
                        row = conn.execute("SELECT status FROM pgderive.slot_state WHERE slot = %s",
                                           (self.slot,)).fetchone()
                        if row and row[0] == "streaming":
                            return time.monotonic() - self.started_at
            except psycopg.OperationalError:
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.name}: bootstrap did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def wait_active(self, timeout: float = 120) -> float:
        """Wait until the daemon's slot is active (it is streaming); seconds since spawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("starting")
            if slot_position(self.dsn, self.slot)[0]:
                return time.monotonic() - self.started_at
            time.sleep(0.05)
        raise BenchError(f"{self.name}: slot {self.slot} not active within {timeout:.0f} s\n{self.log_tail()}")

    def wait_confirmed(self, lsn: int, timeout: float = 1800, poll: float = 0.05) -> Drain:
        """Wait until the slot's ``confirmed_flush_lsn`` >= ``lsn``, polling every ``poll``
        seconds; returns the :class:`Drain` timings (relative to spawn)."""
        startup: float | None = None
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                self._check_alive(f"draining to {format_lsn(lsn)}")
                row = conn.execute("SELECT active, confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                                   "WHERE slot_name = %s", (self.slot,)).fetchone()
                now = time.monotonic() - self.started_at
                if row is None:
                    raise BenchError(f"{self.name}: slot {self.slot} vanished")
                if row[0] and startup is None:
                    startup = now
                if row[1] and parse_lsn(row[1]) >= lsn:
                    return Drain(startup if startup is not None else now, now, self.cpu_seconds(),
                                 process_cpu(row[2]), resolution=poll)
                time.sleep(poll)
        raise BenchError(f"{self.name}: slot {self.slot} did not confirm {format_lsn(lsn)} within "
                         f"{timeout:.0f} s\n{self.log_tail()}")

    def rss_now(self) -> int:
        """The latest RSS sample (bytes)."""
        if not self.sampler or not self.sampler.samples:
            raise BenchError(f"{self.name}: no RSS sample yet")
        return self.sampler.samples[-1][1]

    def cpu_seconds(self, start: float | None = None, end: float | None = None) -> float:
        """CPU seconds (user + system, children included) of the current/last run within
        ``[start, end]`` (monotonic; None = from spawn / to the last sample)."""
        return self.sampler.cpu_between(start, end) if self.sampler else 0.0

    def peak_rss(self, start: float | None = None, end: float | None = None) -> int:
        """Peak RSS (bytes) of the current/last run within ``[start, end]`` (monotonic)."""
        if not self.sampler:
            raise BenchError(f"{self.name}: never started")
        return self.sampler.peak(start, end)
