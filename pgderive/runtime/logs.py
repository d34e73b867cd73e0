"""Logging of the daemon and of the processes it starts: one format, secrets scrubbed from
every line (:class:`cdc.redact.RedactingFilter`), library tracebacks hidden unless debugging.

The CLI configures the main process with :func:`configure_logging`; a lane's process
(:mod:`pgderive.runtime.lane_process`) calls it with the level the daemon runs at, so both
write the same lines to the same standard error.
"""
from __future__ import annotations

import logging
import sys
import threading

from cdc.redact import RedactingFilter

__all__ = ["configure_logging", "debugging", "LOG_FORMAT", "NOISY_LOGGERS"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: Libraries that log a traceback with every failed request (opensearch-py logs each retry of
#: an unreachable node at WARNING with the urllib3 traceback). pgderive reports the failure
#: itself, in one line; their logs are only shown at level DEBUG.
NOISY_LOGGERS = ("opensearch", "urllib3", "elastic_transport")

_log = logging.getLogger("pgderive")
_debug = False


def debugging() -> bool:
    """True when :func:`configure_logging` was called with level DEBUG (tracebacks are shown)."""
    return _debug


def configure_logging(level: int) -> None:
    """Log records at ``level`` (a :mod:`logging` level) and above to standard error, in
    :data:`LOG_FORMAT`, each scrubbed of registered secrets; the :data:`NOISY_LOGGERS` and
    psycopg only at DEBUG; an exception no thread handled as one line
    (:func:`thread_excepthook`)."""
    global _debug
    _debug = level <= logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if _debug else logging.CRITICAL + 1)
    # psycopg warns ("error ignored in rollback") when a stop interrupts a query: the connection
    # is being thrown away on purpose.
    logging.getLogger("psycopg").setLevel(logging.DEBUG if _debug else logging.ERROR)
    threading.excepthook = thread_excepthook


def thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """An exception no thread handled: one log line (scrubbed by the handlers' filter), the
    traceback only at DEBUG; never Python's default traceback print."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    _log.error("thread %s failed: %s: %s", name, args.exc_type.__name__, args.exc_value,
               exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if _debug and args.exc_value else None)
