"""A lane that applies its sink's batches in a process of its own (ARCHITECTURE.md, "Lanes").

Why: the daemon's threads share one interpreter lock. A sink whose client does much Python
work per request (OpenSearch: building ``_bulk`` bodies, the HTTP client, parsing replies)
takes CPU time from the reading thread and the other lanes at the moments they need it, so
even a lane that never waits for another sink's acknowledgement sees its lag grow (measured in
``make demo``: the Redis views' p99 lag was 3-4x their Redis-only value beside an OpenSearch
lane on a thread, within 2x with the OpenSearch lane in a process).

How: the daemon starts the process (``multiprocessing``, start method ``spawn``: a fresh
interpreter, nothing inherited from the daemon's threads) with a :class:`LaneProcessSpec`; the
process opens its own connection to the sink and runs an
:class:`~pgderive.runtime.applier.Applier`. The daemon's :class:`ProcessLane` sends it one batch
at a time over a pipe (:meth:`~pgderive.runtime.batch.Batch.portable`) and a thread of the
daemon receives the replies: ``("done", acked LSN, seconds, {view: rejected Ops})`` or
``("error", exception)``, and ``("retry",)`` whenever a sink call is about to be retried.
Every rule of a thread lane holds unchanged, since the same Applier does the same steps in the
same order: one batch in flight, the position moves only after the sink, the dead letters and
the checkpoints acknowledged it, and the slot is confirmed at the minimum over all lanes.

Failure: an exception in the process comes back and is raised by the reading thread as a
thread lane's would be. If the process dies (killed, out of memory), the lane's error says so
and the daemon stops; what the sink did not acknowledge replays on the next start. If the
daemon dies, the process gets SIGKILL from the kernel (``PR_SET_PDEATHSIG``) or, elsewhere,
exits when its pipe closes. The process ignores SIGINT and SIGTERM: a Ctrl-C or a supervisor's
SIGTERM to the process group stops the daemon, which stops its lanes in order.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Sequence

from cdc.redact import register_secrets
from sinks.base import Sink

from .applier import Applier, DeadLetterSink
from .batch import Batch
from .logs import LogFormat, configure_logging
from .saturation import SaturationMonitor
from .stats import LaneStats, Stats

__all__ = ["LaneProcessSpec", "ProcessLane", "LaneProcessError"]

log = logging.getLogger("pgderive.lanes")

_PR_SET_PDEATHSIG = 1  # prctl(2)

#: The lane's process runs at this niceness above the daemon's (``os.nice``, setpriority(2)):
#: when CPU is short, the reading thread and the other lanes go first. Its sink lingers for
#: more Ops anyway (tens of ms) and shows writes only after a refresh interval (OpenSearch: 1 s).
NICE = 10

#: Sent by the daemon to ask the process to stop retrying (its stop event); a signal rather than
#: a shared semaphore, so nothing outlives a daemon killed with SIGKILL.
STOP_SIGNAL = signal.SIGUSR1


class LaneProcessError(RuntimeError):
    """A lane's process ended without being asked to (killed, crashed), or an exception raised
    in it could not be sent back as it was (its type and message are kept)."""


@dataclass(frozen=True)
class LaneProcessSpec:
    """What a lane's process needs; pickled to it when it starts.

    Attributes:
        name: the sink's name.
        open_sink: opens the sink in the process (picklable, e.g.
            :class:`~pgderive.runtime.sinks.SinkOpener`); raises what opening raises.
        record: stores dead letters from the process (picklable, e.g.
            :class:`~pgderive.runtime.recording.DeadLetterRecorder`); None: dropped.
        log_level: the daemon's :mod:`logging` level.
        log_format: the daemon's log format (``"text"`` or ``"json"``,
            :data:`~pgderive.runtime.logs.LOG_FORMATS`).
        secrets: values to scrub from the process's log lines
            (:func:`cdc.redact.registered_secrets` of the daemon).
        truncate_below: TRUNCATEs keep newer records (see :class:`~pgderive.runtime.applier.Applier`).
    """

    name: str
    open_sink: Callable[[], Sink]
    record: DeadLetterSink | None = None
    log_level: int = logging.INFO
    log_format: LogFormat = "text"
    secrets: tuple[str, ...] = ()
    truncate_below: bool = False


class ProcessLane:
    """A :class:`~pgderive.runtime.lanes.SinkLane` whose batches are applied in a process of
    its own (see the module docstring).

    Args:
        spec: how the process opens the sink.
        views: names of the views this sink serves.
        stop: the daemon's stop event; the process's retries give up once it is set.
        acked_lsn: the position (int LSN) already acknowledged (the slot's confirmed LSN).
        lingers: the sink shows writes only after a refresh interval (its batches may wait).
        stats: the run's counters.
        changed: notified whenever the lane becomes idle (shared by all lanes of a daemon).

    The lane starts busy: it becomes idle once the process has opened the sink (a failure to
    open it is the lane's :attr:`error`); the other lanes stream meanwhile.
    """

    fast = False  # a batch always crosses the pipe: never applied on the reading thread

    def __init__(self, spec: LaneProcessSpec, views: Sequence[str], stop: threading.Event, *,
                 acked_lsn: int = 0, lingers: bool = False, stats: Stats | None = None,
                 changed: threading.Condition | None = None) -> None:
        self.name = spec.name
        self.views = list(views)
        self.stop = stop
        self.acked_lsn = acked_lsn
        self.lingers = lingers
        self.stats = stats or Stats()
        self.lane_stats: LaneStats = self.stats.lane(self.name)
        self.error: BaseException | None = None
        self.saturation = SaturationMonitor()
        self.steps_done = 0
        self._cond = changed or threading.Condition()
        self._inflight: str | None = "open"  # "open", "apply", "checkpoint" or None (idle)
        self._batch: Batch | None = None
        self._checkpoint_error: BaseException | None = None
        self._closing = False
        self._stop_sent = False
        self._opened = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_lane_process_main, name=f"pgderive-lane-{self.name}",
                                    args=(spec, self.views, acked_lsn, child_conn, os.getpid()), daemon=True)
        self._process.start()
        child_conn.close()
        self._receiver = threading.Thread(target=self._receive, name=f"pgderive-lane-{self.name}-replies",
                                          daemon=True)
        self._receiver.start()

    def __repr__(self) -> str:
        return f"ProcessLane({self.name!r}, acked={self.acked_lsn:#x}, idle={self.idle})"

    @property
    def pid(self) -> int | None:
        """The process id of the lane's process."""
        return self._process.pid

    @property
    def idle(self) -> bool:
        """True when no batch (nor the opening of the sink, nor a checkpoint) is in flight."""
        return self._inflight is None

    def submit(self, batch: Batch) -> None:
        """Send ``batch`` to the process; the caller must not touch it afterwards. After an
        error (:attr:`error`) nothing is sent and the lane stays idle. Raises
        ``RuntimeError`` unless :attr:`idle`."""
        with self._cond:
            if self._inflight is not None:
                raise RuntimeError(f"lane {self.name}: a batch is already in flight")
            if self.error is not None:
                return
            self._inflight, self._batch = "apply", batch
            self.lane_stats.handed(batch)
        self._send(("apply", batch.portable(), True))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight (or ``timeout`` seconds); returns :attr:`idle`."""
        with self._cond:
            self._cond.wait_for(lambda: self._inflight is None, timeout)
            return self._inflight is None

    def apply_direct(self, batch: Batch) -> bool:
        """Never applies on the calling thread (the sink lives in the process): False, so the
        caller :meth:`submit`\\ s ``batch``."""
        return False

    def checkpoint(self, lsn: int, retry: bool = True) -> None:
        """Have the process record that every view of the lane is complete up to ``lsn`` (int
        LSN) and wait for it (:meth:`~pgderive.runtime.applier.Applier.checkpoint`: raises
        :class:`~pgderive.runtime.checkpoints.SinkDataLoss` and ``SinkError``, as it raised
        them in the process). The lane must be idle; raises :attr:`error` if the lane failed
        before."""
        if lsn <= self.acked_lsn:
            return
        with self._cond:
            if self._inflight is not None:
                raise RuntimeError(f"lane {self.name}: a batch is in flight")
            if self.error is not None:
                raise self.error
            self._inflight, self._checkpoint_error = "checkpoint", None
        self._send(("checkpoint", lsn, retry))
        self.wait_idle()
        if self._checkpoint_error is not None:
            raise self._checkpoint_error
        if self.error is not None:
            raise self.error

    def close(self, timeout: float = 5.0) -> None:
        """Stop the process: after its batch in flight, waiting at most ``timeout`` seconds for
        it, then with SIGKILL (what the sink did not acknowledge replays on the next start).

        Only the reply thread waits for the process (a second ``waitpid`` from this thread
        could reap it first and leave the other believing it still runs): the process has
        ended once that thread has."""
        self._closing = True
        try:
            self._conn.send(("close",))
        except OSError:
            pass  # already gone
        self._receiver.join(timeout)
        if self._receiver.is_alive():
            log.warning("sink %s: its lane's process did not stop within %g s; killing it",
                        self.name, timeout, extra={"sink": self.name})
            self._process.kill()
            self._receiver.join(5.0)
        self._conn.close()

    # -- the daemon's side of the pipe -------------------------------------------------------------
    def _send(self, message: tuple[object, ...]) -> None:
        try:
            self._conn.send(message)
        except OSError:  # the process is gone: the receiver says why
            self._receiver.join(2.0)
            with self._cond:
                if self.error is None:
                    self.error = LaneProcessError(f"sink {self.name}: its lane's process is gone")
                self._inflight = self._batch = None
                self._cond.notify_all()

    def _receive(self) -> None:
        """The replies of the process, on a thread of the daemon; also passes a stop request on
        (so the process's retries give up)."""
        while True:
            # Not before the process has installed its handler (its first reply): the signal
            # would end it.
            if self.stop.is_set() and not self._stop_sent and self._opened:
                self._stop_sent = True
                self._signal_stop()
            try:
                if not self._conn.poll(0.1):
                    continue
                message = self._conn.recv()
            except (EOFError, OSError):
                self._gone()
                return
            self._handle(message)

    def _signal_stop(self) -> None:
        pid = self._process.pid
        if pid is not None and self._process.exitcode is None:
            try:
                os.kill(pid, STOP_SIGNAL)
            except ProcessLookupError:
                pass

    def _handle(self, message: tuple[object, ...]) -> None:
        kind = message[0]
        if kind == "retry":  # the call in flight failed and is retried: it stays in flight
            self.lane_stats.failed(retried=True)
            return
        self._opened = True
        with self._cond:
            inflight, batch = self._inflight, self._batch
        if kind == "done":
            acked, seconds, rejected = message[1], message[2], message[3]
            assert isinstance(acked, int) and isinstance(seconds, float) and isinstance(rejected, dict)
            self.acked_lsn = acked
            if inflight == "apply" and batch is not None:
                if batch.steps:
                    self.steps_done = batch.steps[-1].seq
                ended = time.monotonic()
                self.stats.acknowledged(self.lane_stats, batch, seconds, rejected)
                self.saturation.record(ended - seconds, ended, len(batch), {self.name: seconds})
        elif kind == "error":
            exc = message[1]
            assert isinstance(exc, BaseException)
            self.lane_stats.failed(retried=False)
            if inflight == "checkpoint":
                self._checkpoint_error = exc
            else:
                self.error = exc
        with self._cond:
            self._inflight = self._batch = None
            self._cond.notify_all()

    def _gone(self) -> None:
        """The pipe closed: the process exited."""
        self._process.join(2.0)
        with self._cond:
            if not self._closing and self.error is None:
                code = self._process.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                self.error = LaneProcessError(
                    f"sink {self.name}: its lane's process (pid {self._process.pid}) {how}; what the "
                    "sink did not acknowledge replays on the next start")
            self._inflight = self._batch = None
            self._cond.notify_all()


# -- the lane's process ----------------------------------------------------------------------------
def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling as it is, else a :class:`LaneProcessError` with its type
    and message."""
    try:
        return pickle.loads(pickle.dumps(e))  # type: ignore[no-any-return]
    except Exception:
        return LaneProcessError(f"{type(e).__name__}: {e}")


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the daemon dies (a kill -9 of the daemon must not
    leave a process writing to the sink); elsewhere the closed pipe ends it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(1)


def _lane_process_main(spec: LaneProcessSpec, views: list[str], acked_lsn: int, conn: Connection,
                       parent: int) -> None:
    """The lane's process: open the sink, then apply what the daemon sends until it says
    ``close`` or its pipe closes."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, lambda _signum, _frame: stop.set())
    _die_with_parent(parent)
    try:
        os.nice(NICE)
    except OSError:
        pass
    register_secrets(spec.secrets)
    configure_logging(spec.log_level, spec.log_format)
    try:
        sink = spec.open_sink()
    except BaseException as e:
        conn.send(("error", _portable(e)))
        return
    # A retry is reported as it happens (the batch may take long to land): ("retry",).
    applier = Applier(sink, views, stop, acked_lsn=acked_lsn, record=spec.record,
                      on_retry=lambda _e: conn.send(("retry",)), truncate_below=spec.truncate_below)
    try:
        conn.send(("done", applier.acked_lsn, 0.0, {}))  # opened: the lane is idle
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the daemon is gone
            if message[0] == "close":
                return
            started = time.monotonic()
            rejected: dict[str, int] = {}
            try:
                if message[0] == "apply":
                    rejected = applier.apply(message[1], retry=message[2])
                else:
                    applier.checkpoint(message[1], retry=message[2])
            except BaseException as e:
                log.debug("sink %s: lane process error", spec.name, exc_info=True, extra={"sink": spec.name})
                conn.send(("error", _portable(e)))
            else:
                conn.send(("done", applier.acked_lsn, time.monotonic() - started, rejected))
    finally:
        sink.close()
