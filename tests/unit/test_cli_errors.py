"""The CLI's last-resort handler: an unexpected exception becomes one line ``error: …`` and exit
1, secrets scrubbed; the traceback only with ``--log-level debug`` (issue 14, item 4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pgderive import cli
from pgderive.ops import status as status_mod

CONFIG = """\
source: {dsn: "postgresql://postgres:zz-unit-pw-1@127.0.0.1:5433/db", slot: s}
sinks:
  cache: {type: redis, url: "redis://u:zz-unit-pw-2@127.0.0.1:6380/0"}
views:
  v: {table: t, sink: cache, key: "v:{id}"}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def test_unexpected_exception_is_one_line(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec: object) -> None:
        raise RuntimeError("boom while talking to postgresql://postgres:zz-unit-pw-1@127.0.0.1/db "
                           "and redis with zz-unit-pw-2")
    monkeypatch.setattr(status_mod, "slot_status", boom)
    result = CliRunner().invoke(cli.main, ["status", "-c", str(config)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: RuntimeError: boom while talking to postgresql://postgres:***@127.0.0.1/db and redis"
        " with *** (--log-level debug shows the traceback)"]
    assert "Traceback" not in result.output and "zz-unit-pw" not in result.output


def test_recursion_error_is_one_line(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deep(spec: object) -> None:
        deep(spec)
    monkeypatch.setattr(status_mod, "slot_status", deep)
    result = CliRunner().invoke(cli.main, ["status", "-c", str(config)])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: the configuration or data is nested too deeply (RecursionError)"
                                     " (--log-level debug shows the traceback)")


def test_config_errors_exit_2_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("6380/0", "63x80/0"))
    for command in ("validate", "status", "run"):
        proc = subprocess.run([sys.executable, "-m", "pgderive.cli", command, "-c", str(bad)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"{bad}:3: sinks.cache.url: invalid URL"
                                       " 'redis://u:***@127.0.0.1:63x80/0': the port '63x80' is not a"
                                       " number from 1 to 65535")
        assert proc.stdout == ""


def test_debug_shows_the_traceback(config: Path) -> None:
    # The real process (logging goes to its stderr): a status against a source that is not
    # there fails in one line; an unexpected error shows the traceback only under debug.
    code = ("import sys; from pgderive import cli; from pgderive.ops import status as s\n"
            "def boom(spec): raise KeyError('zz-unit-pw-1')\n"
            "s.slot_status = boom\n"
            "sys.argv = ['pgderive'] + sys.argv[1:]\ncli.main()\n")
    plain = subprocess.run([sys.executable, "-c", code, "status", "-c", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == "error: KeyError: '***' (--log-level debug shows the traceback)"
    debug = subprocess.run([sys.executable, "-c", code, "--log-level", "debug", "status", "-c", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "zz-unit-pw-1" not in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == "error: KeyError: '***'"


def test_an_exception_in_a_thread_is_one_log_line(config: Path) -> None:
    code = ("import sys, threading; from pgderive import cli; from pgderive.ops import status as s\n"
            "def boom(spec):\n"
            "    t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
            "    raise SystemExit(0)\n"
            "s.slot_status = boom\n"
            "sys.argv = ['pgderive'] + sys.argv[1:]\ncli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith("ERROR   pgderive: thread worker failed: ZeroDivisionError: division by zero")
