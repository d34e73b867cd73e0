"""``/healthz`` and ``/readyz`` of the daemon's HTTP endpoint (ARCHITECTURE.md, "Monitoring").

**Healthy** (``/healthz``, for a supervisor's liveness probe: restart when it fails) means the
daemon makes progress or has nothing to do. It fails when

- the reading loop has not turned for ``stall_seconds`` (it turns at least once a second while
  it streams, waits for a lane or idles; it does not while it reconnects to a source that is
  gone, nor while it is stuck in a call), outside the bootstrap; or a bootstrap load has reported
  no rows for ``stall_seconds``;
- a sink has held a batch for ``stall_seconds`` without acknowledging it (down, frozen, or
  retrying: every sink call is retried until it lands, so a sink that never comes back would
  otherwise hold the daemon forever).

**Ready** (``/readyz``, for a readiness probe or a deploy gate) means the views can be read as
current: the bootstrap is finished, the daemon streams, and no sink is more than
``ready_lag_seconds`` behind (commit timestamp of the oldest transaction in flight to it).
Online rebuilds do not make a daemon unready: readers keep the old generation meanwhile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..runtime.observed import Observed

__all__ = ["Health", "assess"]


@dataclass(frozen=True, slots=True)
class Health:
    """The two verdicts and their reasons.

    Attributes:
        healthy: ``/healthz`` answers 200 when true, 503 otherwise.
        ready: ``/readyz`` answers 200 when true, 503 otherwise.
        phase: what the daemon does (:data:`~pgderive.runtime.observed.PHASES`).
        problems: why it is unhealthy (empty when healthy), one sentence each.
        not_ready: why it is not ready (empty when ready).
        loop_seconds: seconds since the reading loop (or a bootstrap load) last made progress.
        sink_lag_seconds: sink → seconds its oldest transaction in flight waits (0: nothing in
            flight).
    """

    healthy: bool
    ready: bool
    phase: str
    problems: list[str] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)
    loop_seconds: float = 0.0
    sink_lag_seconds: dict[str, float] = field(default_factory=dict)

    def healthz(self) -> dict[str, object]:
        """The JSON body of ``/healthz``: ``status`` (``ok``/``unhealthy``), ``phase``,
        ``problems``, ``loop_seconds``, ``sinks`` (sink → ``lag_seconds``)."""
        return {"status": "ok" if self.healthy else "unhealthy", "phase": self.phase, "problems": self.problems,
                "loop_seconds": round(self.loop_seconds, 3),
                "sinks": {s: {"lag_seconds": round(v, 3)} for s, v in self.sink_lag_seconds.items()}}

    def readyz(self) -> dict[str, object]:
        """The JSON body of ``/readyz``: ``status`` (``ready``/``not ready``), ``phase``,
        ``reasons``, ``sinks`` (sink → ``lag_seconds``)."""
        return {"status": "ready" if self.ready else "not ready", "phase": self.phase, "reasons": self.not_ready,
                "sinks": {s: {"lag_seconds": round(v, 3)} for s, v in self.sink_lag_seconds.items()}}


def sink_lags(daemon: Observed, now: float | None = None) -> dict[str, float]:
    """Sink → seconds since the commit of the oldest transaction in flight to it (0 when none
    is): from each lane's :class:`~pgderive.runtime.stats.LaneStats`."""
    now = time.time() if now is None else now
    out: dict[str, float] = {}
    for name in daemon.sinks_views():
        lane = daemon.stats.lanes.get(name)
        commit = lane.inflight_commit if lane is not None else None
        out[name] = max(0.0, now - commit) if commit is not None else 0.0
    return out


def assess(daemon: Observed, *, stall_seconds: float, ready_lag_seconds: float) -> Health:
    """Judge ``daemon`` now (see the module's docstring). O(sinks); no I/O."""
    mono = time.monotonic()
    loop = mono - daemon.stats.beat
    problems: list[str] = []
    not_ready: list[str] = []
    phase = daemon.phase
    if phase in ("streaming", "reconnecting", "bootstrapping") and loop > stall_seconds:
        what = ("the bootstrap loaded no rows" if phase == "bootstrapping"
                else "the reading loop made no progress (reconnecting to the source?)" if phase == "reconnecting"
                else "the reading loop made no progress")
        problems.append(f"{what} for {loop:.0f} s (limit {stall_seconds:g} s)")
    for name in daemon.sinks_views():
        lane = daemon.stats.lanes.get(name)
        if lane is None or lane.inflight_since is None:
            continue
        held = mono - lane.inflight_since
        if held > stall_seconds:
            problems.append(f"sink {name} has not acknowledged a batch for {held:.0f} s "
                            f"(limit {stall_seconds:g} s; {lane.retries} retries so far)")
    lags = sink_lags(daemon)
    if phase != "streaming":
        not_ready.append(f"the daemon is {phase}")
    for name, lag in sorted(lags.items()):
        if lag > ready_lag_seconds:
            not_ready.append(f"sink {name} is {lag:.1f} s behind (limit {ready_lag_seconds:g} s)")
    not_ready.extend(problems)
    return Health(healthy=not problems, ready=not not_ready, phase=phase, problems=problems,
                  not_ready=not_ready, loop_seconds=loop, sink_lag_seconds=lags)
