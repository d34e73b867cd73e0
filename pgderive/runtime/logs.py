"""Logging of the daemon and of the processes it starts: one format, secrets scrubbed from
every line (:class:`cdc.redact.RedactingFilter`), library tracebacks hidden unless debugging.

The CLI configures the main process with :func:`configure_logging`; a lane's process
(:mod:`pgderive.runtime.lane_process`) calls it with the level and format the daemon runs
with, so both write the same lines to the same standard error.

Two formats (``--log-format``, ``$PGDERIVE_LOG_FORMAT``):

* ``text`` (the default): ``2026-12-07 10:54:41,123 INFO    pgderive.engine: message``
  (:data:`LOG_FORMAT`).
* ``json``: one JSON object per line (:class:`JsonFormatter`)::

    {"time":"2026-12-07T10:54:41.123Z","level":"INFO","logger":"pgderive.bootstrap",
     "message":"snapshot of public.t done: …","view":"t_cache","table":"public.t"}

  Call sites attach the context fields :data:`FIELDS` with logging's ``extra=``
  (``log.info("…", extra={"view": v.name})``); only those present are written.
"""
from __future__ import annotations

import datetime
import logging
import sys
import threading
from typing import Final, Literal

import orjson

from cdc.lsn import format_lsn
from cdc.redact import RedactingFilter, scrub

__all__ = ["configure_logging", "debugging", "log_format", "JsonFormatter", "LogFormat", "LOG_FORMATS",
           "LOG_FORMAT", "FIELDS", "NOISY_LOGGERS"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: The values of ``--log-format``.
LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")

#: The context fields a JSON line carries when the call site passed them with ``extra=``:
#: ``view`` (a view's name), ``sink`` (a sink's name), ``table`` (``schema.name``), ``lsn``
#: (a WAL position: an int is written as ``"0/16B3748"``, a string as given) and ``xid`` (a
#: transaction id, int).
FIELDS: Final[tuple[str, ...]] = ("view", "sink", "table", "lsn", "xid")

#: Libraries that log a traceback with every failed request (opensearch-py logs each retry of
#: an unreachable node at WARNING with the urllib3 traceback). pgderive reports the failure
#: itself, in one line; their logs are only shown at level DEBUG.
NOISY_LOGGERS = ("opensearch", "urllib3", "elastic_transport")

_log = logging.getLogger("pgderive")
_debug = False
_format: LogFormat = "text"


def debugging() -> bool:
    """True when :func:`configure_logging` was called with level DEBUG (tracebacks are shown)."""
    return _debug


def log_format() -> LogFormat:
    """The format :func:`configure_logging` was last called with (``"text"`` before that)."""
    return _format


def _field(name: str, value: object) -> str | int | float | bool:
    """A context field's value as written to a JSON line: strings scrubbed of secrets, an int
    ``lsn`` as ``X/Y``, anything else that is not a JSON scalar as its (scrubbed) ``str``."""
    if name == "lsn" and isinstance(value, int) and not isinstance(value, bool):
        return format_lsn(value)
    if isinstance(value, (bool, int, float)):
        return value
    return scrub(value if isinstance(value, str) else str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (no newline inside; the handler adds the one at the
    end), an object with the keys, in this order:

    * ``time``: when the record was made, ISO 8601 in UTC with milliseconds
      (``"2026-12-07T10:54:41.123Z"``);
    * ``level``: ``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ``"ERROR"`` or ``"CRITICAL"``;
    * ``logger``: the logger's name (``"pgderive.bootstrap"``);
    * ``message``: the formatted message;
    * each of :data:`FIELDS` the record has (given with ``extra=``) and that is not None;
    * ``error``: with an exception, ``"Type: message"`` on one line;
    * ``traceback``: with an exception and only when :func:`debugging`, the traceback (a string
      whose newlines JSON escapes, so the line stays one line).

    Every string written, context fields included, passes through :func:`cdc.redact.scrub`
    (the same scrubbing as :class:`~cdc.redact.RedactingFilter`), so no registered secret, no
    DSN password and no URL password reaches the line whatever field it was put in.
    """

    def format(self, record: logging.LogRecord) -> str:
        """``record`` as one JSON line (see the class docstring); never raises for a value of
        an odd type (it is written as its ``str``)."""
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        out: dict[str, str | int | float | bool] = {
            "time": created.strftime("%Y-%m-%dT%H:%M:%S.") + f"{created.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = _field(name, value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = " ".join(str(exc).split())
            out["error"] = scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
            if _debug:
                out["traceback"] = scrub(record.exc_text or self.formatException(record.exc_info))
        elif record.exc_text and _debug:  # exception text without the exception (a record from elsewhere)
            out["traceback"] = scrub(record.exc_text)
        if record.stack_info and _debug:
            out["stack"] = scrub(record.stack_info)
        return orjson.dumps(out).decode()


def configure_logging(level: int, fmt: str = "text") -> None:
    """Log records at ``level`` (a :mod:`logging` level) and above to standard error, as
    ``fmt`` says (``"text"``: :data:`LOG_FORMAT`; ``"json"``: :class:`JsonFormatter`), each
    scrubbed of registered secrets; the :data:`NOISY_LOGGERS` and psycopg only at DEBUG; an
    exception no thread handled as one line (:func:`thread_excepthook`).

    May be called again (``run --log-format`` after the group's option): the standard error
    handler it installed switches format. Raises ``ValueError`` for a format not in
    :data:`LOG_FORMATS`.
    """
    global _debug, _format
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    _debug = level <= logging.DEBUG
    _format = fmt
    root = logging.getLogger()
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if type(handler) is logging.StreamHandler:  # ours (basicConfig's), not a test's capture
            if _format == "json" and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
            elif _format == "text" and isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(logging.Formatter(LOG_FORMAT))
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
