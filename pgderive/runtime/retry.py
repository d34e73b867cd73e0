"""Retrying sink calls: a retryable :class:`~sinks.base.SinkError` (a sink down, hung or
restarting) is retried with capped exponential backoff until the daemon stops. Sinks are
idempotent (ARCHITECTURE.md, rule 2), so repeating a call whose outcome is unknown is safe."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Protocol, TypeVar

from sinks.base import SinkError

__all__ = ["AnyOf", "Backoff", "StopFlag", "with_retry", "one_line"]

log = logging.getLogger("pgderive.lanes")
T = TypeVar("T")


def one_line(e: BaseException, width: int = 300) -> str:
    """``e``'s message on one line, at most ``width`` characters (for log lines)."""
    return " ".join(str(e).split())[:width]


class Backoff:
    """Capped exponential backoff: ``first`` seconds, then twice as long each time up to
    ``cap`` seconds (0.5 s, 1 s, 2 s … 30 s by default)."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        """The delay to wait now (seconds); doubles the next one."""
        d = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return d

    def reset(self) -> None:
        """Back to the first delay (after a success)."""
        self.delay = self.first


class StopFlag(Protocol):
    """What a retry loop needs of a stop request: :class:`threading.Event` in the daemon,
    :func:`multiprocessing.Event` in a lane's process."""

    def is_set(self) -> bool:
        """True once a stop was requested."""
        ...

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; True if one came."""
        ...


class AnyOf:
    """A :class:`StopFlag` that is set when either of two events is (e.g. the daemon's stop
    and a failed task's, or a stop and a request to restart the stream)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        """True once either event is set."""
        return self.a.is_set() or self.b.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: forever) for either event; returns :meth:`is_set`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                break
            self.a.wait(left)
        return self.is_set()


def with_retry(what: str, fn: Callable[[], T], stop: StopFlag,
               on_retry: Callable[[SinkError], None] | None = None, *,
               fields: Mapping[str, object] | None = None) -> T:
    """``fn()``, retrying retryable :class:`SinkError` with :class:`Backoff` until ``stop``.

    ``what`` names the call in the warning logged before each retry; ``fields`` are that
    warning's context (``{"sink": name, "view": name}``: :data:`pgderive.runtime.logs.FIELDS`,
    written by the JSON log format); ``on_retry`` is called
    with the error before each retry (the lanes count them for ``/metrics``). Raises the
    :class:`SinkError` if it is not retryable, or if ``stop`` is set meanwhile.
    """
    backoff = Backoff()
    while True:
        try:
            return fn()
        except SinkError as e:
            if not e.retryable or stop.is_set():
                raise
            if on_retry is not None:
                on_retry(e)
            delay = backoff.next()
            log.warning("%s failed (%s); retrying in %.1f s", what, one_line(e), delay, extra=fields)
            stop.wait(delay)
