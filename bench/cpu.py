"""CPU seconds of the services around pgderive, to say where a measured interval's time went.

:class:`ServiceCpu` reads the CPU time (user + system) of the Redis and OpenSearch server
processes at :meth:`~ServiceCpu.start` and :meth:`~ServiceCpu.stop`; :func:`process_cpu`
reads one process's lifetime CPU (e.g. the walsender serving pgderive's slot). Best effort:
a process that cannot be found or read (another host, another user without root) is left out.
"""
from __future__ import annotations

import psutil
import redis
from opensearchpy import OpenSearch

from .settings import Settings

__all__ = ["ServiceCpu", "process_cpu", "cpu_breakdown"]


def process_cpu(pid: int | None) -> float | None:
    """Lifetime CPU seconds (user + system) of process ``pid``; None if unknown/unreadable."""
    if not pid:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (psutil.Error, OSError):
        return None


def _service_pids(settings: Settings) -> dict[str, int]:
    pids: dict[str, int] = {}
    try:
        pids["Redis"] = int(redis.Redis.from_url(settings.redis_url).info("server")["process_id"])
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        nodes = OpenSearch(hosts=[settings.opensearch_url]).nodes.info(
            node_id="_local", metric="process", filter_path="nodes.*.process.id")
        pids["OpenSearch"] = int(next(iter(nodes["nodes"].values()))["process"]["id"])
    except Exception:  # noqa: BLE001
        pass
    return {name: pid for name, pid in pids.items() if psutil.pid_exists(pid)}


class ServiceCpu:
    """CPU seconds the Redis and OpenSearch servers spend between :meth:`start` and :meth:`stop`
    (all their work, not only pgderive's: other clients of the same servers count too)."""

    def __init__(self, settings: Settings) -> None:
        self.pids = _service_pids(settings)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        """Take the starting CPU readings."""
        self._start = {n: c for n, pid in self.pids.items() if (c := process_cpu(pid)) is not None}

    def stop(self) -> dict[str, float]:
        """CPU seconds per service since :meth:`start`."""
        out = {}
        for name, before in self._start.items():
            after = process_cpu(self.pids[name])
            if after is not None:
                out[name] = after - before
        return out


def cpu_breakdown(wall: float, parts: dict[str, float | None]) -> str:
    """``CPU in 5.0 s: pgderive 4.1 s, walsender 1.2 s, Redis 1.0 s`` (parts under 0.05 s and
    unknown ones left out)."""
    shown = [f"{name} {sec:.1f} s" for name, sec in parts.items() if sec is not None and sec >= 0.05]
    return f"CPU in {wall:.1f} s: " + (", ".join(shown) if shown else "n/a")
