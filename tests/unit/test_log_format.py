"""pgderive.runtime.logs: the JSON log format (issue 16, part 3). One object per line with
time, level, logger, message and the context fields given with ``extra=``; an exception as one
``error`` field (its traceback only when debugging); every string scrubbed of secrets, the
context fields included; the lane process writes the same format as the daemon."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from cdc.redact import MASK, RedactingFilter, register_secrets
from pgderive.runtime import logs
from pgderive.runtime.batch import Batch
from pgderive.runtime.lane_process import LaneProcessSpec, ProcessLane
from pgderive.runtime.logs import FIELDS, JsonFormatter, configure_logging
from sinks.base import Op, ViewTarget
from sinks.memory import MemorySinkOpener

from ..support import ROOT

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Capture:
    """A logger writing through a handler with :class:`JsonFormatter` (and, unless ``bare``,
    the :class:`RedactingFilter` every handler of the daemon has) into a string."""

    def __init__(self, bare: bool = False) -> None:
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(JsonFormatter())
        if not bare:
            handler.addFilter(RedactingFilter())
        self.log = logging.getLogger(f"pgderive.test.{uuid.uuid4().hex[:8]}")
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.text.splitlines():
            value = json.loads(line)
            assert isinstance(value, dict), line
            out.append(value)
        return out


@pytest.fixture
def capture() -> Iterator[Capture]:
    yield Capture()


def test_a_line_has_the_keys_and_only_the_fields_given(capture: Capture) -> None:
    capture.log.info("snapshot of %s: %d rows", "public.t", 42,
                     extra={"view": "t_cache", "table": "public.t", "lsn": 0x16B3748, "xid": 731})
    capture.log.warning("plain")
    first, second = capture.lines()
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert TIME.match(str(first["time"])), first["time"]
    assert first["level"] == "INFO" and first["logger"] == capture.log.name
    assert first["message"] == "snapshot of public.t: 42 rows"
    assert first["view"] == "t_cache" and first["table"] == "public.t"
    assert first["lsn"] == "0/16B3748"  # an int LSN is written as Postgres writes it
    assert first["xid"] == 731
    assert "sink" not in first
    assert second["level"] == "WARNING" and second["message"] == "plain"
    assert not set(FIELDS) & set(second)


def test_time_is_utc_with_milliseconds(capture: Capture) -> None:
    record = logging.LogRecord("pgderive.x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 1_800_000_000.1234  # 2027-01-15T08:00:00.123 UTC
    assert json.loads(JsonFormatter().format(record))["time"] == "2027-01-15T08:00:00.123Z"


def test_a_string_lsn_and_an_odd_value_are_kept_as_text(capture: Capture) -> None:
    capture.log.info("m", extra={"lsn": "0/1A", "view": ("a", "b")})
    (line,) = capture.lines()
    assert line["lsn"] == "0/1A" and line["view"] == "('a', 'b')"


def test_an_exception_is_one_error_field_without_traceback(capture: Capture) -> None:
    try:
        raise ValueError("bad\nvalue in row 3")
    except ValueError:
        capture.log.error("lane failed", exc_info=True, extra={"sink": "search"})
    assert capture.text.count("\n") == 1, capture.text
    (line,) = capture.lines()
    assert line["error"] == "ValueError: bad value in row 3"
    assert line["sink"] == "search" and line["message"] == "lane failed"
    assert "traceback" not in line and "Traceback" not in capture.text


def test_the_traceback_is_a_field_when_debugging(capture: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_debug", True)
    try:
        raise KeyError("k")
    except KeyError:
        capture.log.error("failed", exc_info=True)
    assert capture.text.count("\n") == 1  # still one line: JSON escapes the traceback's newlines
    (line,) = capture.lines()
    assert line["error"] == "KeyError: 'k'"
    assert str(line["traceback"]).startswith("Traceback (most recent call last)")
    assert 'raise KeyError("k")' in str(line["traceback"])


@pytest.mark.parametrize("bare", [False, True], ids=["with-filter", "formatter-alone"])
def test_secrets_are_scrubbed_everywhere_extra_fields_included(bare: bool) -> None:
    capture = Capture(bare=bare)
    registered = f"zzreg{uuid.uuid4().hex[:10]}"
    register_secrets([registered])
    url_pw, kv_pw, exc_pw, msg_pw = (f"zz{k}{uuid.uuid4().hex[:8]}" for k in ("url", "kv", "exc", "msg"))
    try:
        raise RuntimeError(f"connection to postgresql://u:{exc_pw}@h/db failed")
    except RuntimeError:
        capture.log.warning("connecting to %s", f"host=h user=u password={msg_pw} dbname=d", exc_info=True,
                            extra={"view": f"postgresql://u:{url_pw}@h:5432/db", "table": f"password={kv_pw}",
                                   "sink": f"redis with {registered}"})
    (line,) = capture.lines()
    for pw in (registered, url_pw, kv_pw, exc_pw, msg_pw):
        assert pw not in capture.text, (pw, capture.text)
    assert line["view"] == f"postgresql://u:{MASK}@h:5432/db"
    assert line["table"] == f"password={MASK}"
    assert line["sink"] == f"redis with {MASK}"
    assert line["message"] == f"connecting to host=h user=u password={MASK} dbname=d"
    assert line["error"] == f"RuntimeError: connection to postgresql://u:{MASK}@h/db failed"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_configure_logging_writes_json_to_stderr_and_can_switch_back() -> None:
    """In a fresh process (no handler yet, as in the CLI): the standard error handler gets the
    JSON format; called again with "text" (``run --log-format``) it goes back."""
    out = run_python(
        "import logging\n"
        "from pgderive.runtime.logs import configure_logging\n"
        "configure_logging(logging.INFO, 'json')\n"
        "logging.getLogger('pgderive.engine').info('one %s', 'postgresql://u:zzpw1234@h/db', extra={'lsn': 16})\n"
        "logging.getLogger('pgderive.engine').debug('hidden at INFO')\n"
        "configure_logging(logging.INFO, 'text')\n"
        "logging.getLogger('pgderive.engine').info('two')\n")
    assert out.returncode == 0, out.stderr
    first, second = out.stderr.splitlines()
    line = json.loads(first)
    assert line["message"] == "one postgresql://u:***@h/db" and line["lsn"] == "0/10"
    assert line["logger"] == "pgderive.engine" and line["level"] == "INFO"
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    pgderive\.engine: two$", second), second


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging(logging.INFO, "xml")
    assert logs.log_format() in logs.LOG_FORMATS  # the refused call changed nothing


def test_the_lane_process_logs_in_the_daemons_format(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    """A real lane process (spawned: it configures its own logging) whose sink fails twice
    retryably: its retry lines are JSON with the sink's name."""
    opener = MemorySinkOpener("search", (ViewTarget(view="v"),), journal=str(tmp_path / "j"),
                              checkpoints=(("v", 0x100),), fail=2)
    spec = LaneProcessSpec("search", opener, log_format="json")
    ln = ProcessLane(spec, ["v"], threading.Event(), acked_lsn=0x100)
    try:
        assert ln.wait_idle(30), "the process did not open its sink"
        b = Batch(end_lsn=0x200)
        b.add(Op("v", "a", 0x200, {"k": "a"}))
        ln.submit(b)
        assert ln.wait_idle(20) and ln.error is None and ln.acked_lsn == 0x200
    finally:
        ln.close()
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    retries = [line for line in lines if "retrying" in str(line["message"])]
    assert len(retries) == 2, err
    assert all(line["sink"] == "search" and line["level"] == "WARNING" for line in retries), retries
    assert all(line["logger"] == "pgderive.lanes" for line in retries)
