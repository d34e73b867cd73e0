"""The daemon's HTTP endpoint (ARCHITECTURE.md, "Monitoring"): ``/metrics``, ``/healthz``,
``/readyz``, ``/status``, ``/explain?view=V&key=K[&wait=SECONDS]`` (``pgderive explain --json``,
ARCHITECTURE.md, "Explain") and ``/``, the status page.

A :class:`http.server.ThreadingHTTPServer` on threads of its own: a request never runs on the
reading thread or a lane, and reads only counters the daemon keeps anyway
(:class:`~pgderive.runtime.observed.Observed`), plus one cached query of the slot per second
(:class:`~pgderive.runtime.observed.SourceWatch`) and, for ``/status``, the ``pgderive status``
facts cached for :data:`STATUS_MAX_AGE` seconds. A sampler thread records the counters every
:data:`SAMPLE_EVERY` seconds for the page's throughput sparklines (the last
:data:`SAMPLES` samples).

Bound to 127.0.0.1:9187 unless configured otherwise (``http.listen`` in the YAML, ``run --http``):
the page and ``/status`` show table and view names, so exposing them is the operator's choice.
Nothing served carries a secret: DSNs and sink URLs never appear.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdc.lsn import format_lsn
from cdc.redact import scrub

from ..ops.explain import DEFAULT_WAIT, ExplainUsageError
from ..runtime.observed import Observed
from .health import Health, assess
from .metrics import Metrics
from .page import render_page

__all__ = ["HttpEndpoint", "HttpSettings", "Sample", "parse_listen", "SAMPLE_EVERY", "SAMPLES"]

log = logging.getLogger("pgderive.http")

#: Seconds between two samples of the counters (the page's sparklines).
SAMPLE_EVERY = 5.0
#: Samples kept: 10 minutes.
SAMPLES = 120
#: Seconds the ``pgderive status`` facts of ``/status`` are reused.
STATUS_MAX_AGE = 2.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Where and how the endpoint judges the daemon.

    Attributes:
        host, port: the address to bind (port 0: any free port, logged).
        stall_seconds: ``/healthz`` fails after this long without progress (:mod:`.health`).
        ready_lag_seconds: ``/readyz`` fails while a sink is further behind.
    """

    host: str = "127.0.0.1"
    port: int = 9187
    stall_seconds: float = 60.0
    ready_lag_seconds: float = 30.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``. Raises ``ValueError`` with
    a message for the user."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9187)")
    n = int(port)
    if n > 65535:
        raise ValueError(f"port {n} is out of range (0-65535)")
    return host.strip("[]"), n


@dataclass(frozen=True, slots=True)
class Sample:
    """The counters at one moment: ``at`` (Unix seconds), transactions and changes read,
    sink → Ops acknowledged."""

    at: float
    transactions: int
    changes: int
    ops: dict[str, int]


class HttpEndpoint:
    """Serves a running daemon's endpoint until :meth:`close`.

    Args:
        daemon: the daemon (:class:`~pgderive.runtime.observed.Observed`).
        settings: address and health limits.
        status: returns the ``pgderive status`` facts as a JSON-ready dict (called at most every
            :data:`STATUS_MAX_AGE` seconds; may raise, the error is served instead), or None.
        explain: ``(view, key, wait seconds)`` → the ``pgderive explain --json`` document
            (:func:`pgderive.ops.explain.explanation_document`) for ``/explain``; raises
            :class:`~pgderive.ops.explain.ExplainUsageError` (served as 404 for an unknown view,
            400 for a bad key); None: ``/explain`` answers 404.

    Raises ``OSError`` when the address cannot be bound (e.g. ``EADDRINUSE``).
    """

    def __init__(self, daemon: Observed, settings: HttpSettings,
                 status: Callable[[], Mapping[str, object]] | None = None,
                 explain: Callable[[str, str, float], Mapping[str, object]] | None = None) -> None:
        self.daemon = daemon
        self._explain = explain
        self.settings = settings
        self.metrics = Metrics(daemon)
        self.samples: deque[Sample] = deque(maxlen=SAMPLES)
        self._status = status
        self._status_cache: tuple[float, Mapping[str, object] | None, str | None] = (0.0, None, None)
        self._status_lock = threading.Lock()
        self._stop = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pgderive"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                endpoint._serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                endpoint._serve(self, head=True)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((settings.host, settings.port), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.address = (str(host), int(port))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="pgderive-http", daemon=True)
        self._sampler = threading.Thread(target=self._sample_loop, name="pgderive-http-sampler", daemon=True)

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the bound address."""
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"http://{host}:{self.address[1]}"

    def start(self) -> None:
        """Start serving (and sampling) on threads of their own."""
        self._sample()
        self._thread.start()
        self._sampler.start()
        log.info("serving /metrics, /healthz, /readyz, /status%s and the status page on %s",
                 ", /explain" if self._explain is not None else "", self.url)

    def close(self) -> None:
        """Stop serving; requests in progress end with the process (their threads are daemons)."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    # -- facts ---------------------------------------------------------------------------------
    def health(self) -> Health:
        """The verdicts of ``/healthz`` and ``/readyz`` now."""
        s = self.settings
        return assess(self.daemon, stall_seconds=s.stall_seconds, ready_lag_seconds=s.ready_lag_seconds)

    def status(self) -> dict[str, object]:
        """The JSON of ``/status``: ``daemon`` (phase, health, sinks, views, loads, slot position
        as the daemon sees it) and, when a status function was given, ``status`` (the facts of
        ``pgderive status``) or ``status_error``."""
        doc: dict[str, object] = {"daemon": self._daemon_facts()}
        facts, error = self._status_facts()
        if facts is not None:
            doc["status"] = facts
        if error is not None:
            doc["status_error"] = error
        return doc

    def _status_facts(self) -> tuple[Mapping[str, object] | None, str | None]:
        if self._status is None:
            return None, None
        with self._status_lock:
            at, facts, error = self._status_cache
            if time.monotonic() - at < STATUS_MAX_AGE:
                return facts, error
            try:
                facts, error = self._status(), None
            except Exception as e:  # served as a field: the page must render anyway
                facts, error = None, " ".join(str(e).split())[:300]
            self._status_cache = (time.monotonic(), facts, error)
            return facts, error

    def _daemon_facts(self) -> dict[str, object]:
        d = self.daemon
        stats = d.stats
        health = self.health()
        info, why = d.source.get()
        slot: dict[str, object] = {"name": d.slot, "source_error": why}
        if info is not None:
            slot.update(active=info.active, lag_bytes=info.lag_bytes, retained_wal_bytes=info.retained_bytes,
                        confirmed_lsn=_lsn(info.confirmed_flush_lsn), current_wal_lsn=_lsn(info.current_wal_lsn))
        types = d.sink_types()
        sinks: dict[str, object] = {}
        views: list[dict[str, object]] = []
        loads = {load.view: load for load in d.loads()}
        for sink, names in sorted(d.sinks_views().items()):
            lane = stats.lanes.get(sink)
            lag = health.sink_lag_seconds.get(sink, 0.0)
            sinks[sink] = {
                "type": types.get(sink, "?"), "lag_seconds": round(lag, 3),
                "ops": lane.ops if lane else 0, "batches": lane.batches if lane else 0,
                "retries": lane.retries if lane else 0, "errors": lane.errors if lane else 0,
                "acked_lsn": _lsn(lane.acked_lsn) if lane and lane.acked_lsn else None,
                "lag_p50_ms": _round(lane.lag_ms.percentile(0.5)) if lane else None,
                "lag_p99_ms": _round(lane.lag_ms.percentile(0.99)) if lane else None,
                "in_flight_seconds": (round(time.monotonic() - lane.inflight_since, 3)
                                      if lane and lane.inflight_since is not None else None),
            }
            for name in names:
                load = loads.get(name)
                views.append({
                    "name": name, "sink": sink, "lag_seconds": round(lag, 3),
                    "ops": lane.view_ops.get(name, 0) if lane else 0,
                    "dead_letters": lane.dead_letters.get(name, 0) if lane else 0,
                    "load": None if load is None else {"kind": load.kind, "phase": load.phase, "rows": load.rows,
                                                       "rows_total": load.rows_total},
                })
        return {"phase": d.phase, "healthy": health.healthy, "ready": health.ready,
                "problems": health.problems, "not_ready": health.not_ready,
                "uptime_seconds": round(time.time() - stats.started, 1), "transactions": stats.transactions,
                "changes": sum(stats.table_changes.values()), "read_lsn": _lsn(stats.read_lsn) if stats.read_lsn else None,
                "slot": slot, "sinks": sinks, "views": views}

    # -- serving -------------------------------------------------------------------------------
    def _serve(self, req: BaseHTTPRequestHandler, head: bool = False) -> None:
        path = urlsplit(req.path).path.rstrip("/") or "/"
        try:
            if path == "/metrics":
                self._reply(req, 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry), head)
            elif path == "/healthz":
                h = self.health()
                self._reply(req, 200 if h.healthy else 503, "application/json", orjson.dumps(h.healthz()), head)
            elif path == "/readyz":
                h = self.health()
                self._reply(req, 200 if h.ready else 503, "application/json", orjson.dumps(h.readyz()), head)
            elif path == "/status":
                self._reply(req, 200, "application/json",
                            orjson.dumps(self.status(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS), head)
            elif path == "/explain" and self._explain is not None:
                code, body = self.explain(urlsplit(req.path).query)
                self._reply(req, code, "application/json", body, head)
            elif path == "/":
                page = render_page(self.status(), list(self.samples), SAMPLE_EVERY)
                self._reply(req, 200, "text/html; charset=utf-8", page.encode(), head)
            else:
                self._reply(req, 404, "application/json",
                            orjson.dumps({"error": f"no such page: {path}",
                                          "pages": ["/", "/metrics", "/healthz", "/readyz", "/status", "/explain"]}), head)
        except Exception as e:  # one line in the log, a 500 to the client; never a traceback
            log.warning("HTTP %s failed: %s: %s", path, type(e).__name__, " ".join(str(e).split())[:300],
                        exc_info=log.isEnabledFor(logging.DEBUG))
            try:
                self._reply(req, 500, "application/json", orjson.dumps({"error": type(e).__name__}), head)
            except OSError:
                pass

    def explain(self, query: str) -> tuple[int, bytes]:
        """``/explain``: the status code and JSON body for the query string ``query``
        (``view``, ``key``, optional ``wait`` in seconds, default
        :data:`~pgderive.ops.explain.DEFAULT_WAIT`, at most 60). 200 with the document
        whatever the verdict (its ``verify.status`` and ``exit_code`` say it); 400 for a
        missing parameter, a bad ``wait`` or a key that does not fit the view; 404 for an unknown
        view; 503 when the source or a sink cannot be read (``{"error": "Type: message"}``,
        one line, no DSN)."""
        args = parse_qs(query, keep_blank_values=True)
        view, key = args.get("view", [None])[0], args.get("key", [None])[0]
        if not view or key is None:
            return 400, orjson.dumps({"error": "usage: /explain?view=VIEW&key=KEY[&wait=SECONDS]"})
        try:
            wait = float(args.get("wait", [str(DEFAULT_WAIT)])[0])
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= 60:
            return 400, orjson.dumps({"error": "wait must be a number of seconds from 0 to 60"})
        assert self._explain is not None
        try:
            doc = self._explain(view, key, wait)
        except ExplainUsageError as e:
            return e.http_status, orjson.dumps({"error": str(e)})
        except Exception as e:  # the source or a sink: one line, as the CLI prints it
            return 503, orjson.dumps({"error": scrub(f"{type(e).__name__}: {' '.join(str(e).split())}")[:500]})
        return 200, orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes, head: bool) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        if not head:
            req.wfile.write(body)

    # -- sampling ------------------------------------------------------------------------------
    def _sample(self) -> None:
        stats = self.daemon.stats
        self.samples.append(Sample(time.time(), stats.transactions, sum(stats.table_changes.values()),
                                   {s: lane.ops for s, lane in list(stats.lanes.items())}))

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._sample()


def _lsn(v: int | None) -> str | None:
    return None if v is None else format_lsn(v)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
