"""Saying so while a blocking call waits: a connection to a server that accepts but does not
answer must not look like a silent hang."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["waiting"]


@contextmanager
def waiting(what: str, log: logging.Logger, *, after: float = 2.0, every: float = 5.0,
            limit: float | None = None) -> Iterator[None]:
    """Log ``still <what> (N s…)`` at WARNING if the block has not finished after ``after``
    seconds, then every ``every`` seconds until it does (a timer thread; the block itself is
    not interrupted). ``limit``: the timeout the block is subject to, in seconds, quoted in the
    line. ``what`` must not contain secrets (use a redacted DSN)."""
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        delay = after
        while not done.wait(delay):
            waited = time.monotonic() - t0
            bound = f" of at most {limit:g} s" if limit else ""
            log.warning("still %s after %.0f s%s", what, waited, bound)
            delay = every

    thread = threading.Thread(target=watch, name="pgderive-waiting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
