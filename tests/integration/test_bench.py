"""`make bench` end to end in quick mode (PGDERIVE_BENCH_QUICK=1: pgbench scale 1, a few
seconds per workload; scenario 6 runs pgderive alone, no peers): every scenario produces rows
with numeric ratios, the report and the plot are written, nothing is left behind (slots,
databases)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import psycopg
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pgdbenchtest"


def test_quick_bench_reports_every_scenario(tmp_path, pg_dsn, opensearch_hosts, kafka_bootstrap):
    env = {**os.environ, "PGDERIVE_BENCH_QUICK": "1", "PGDERIVE_BENCH_PREFIX": PREFIX,
           "PGDERIVE_BENCH_OUT": str(tmp_path / "out"), "PGDERIVE_BENCH_REPORT": str(tmp_path / "report.md"),
           "PGDERIVE_BENCH_PLOT": str(tmp_path / "plot.png"), "PGDERIVE_BENCH_PG_DSN": pg_dsn,
           "PGDERIVE_BENCH_OPENSEARCH_URL": opensearch_hosts[0], "PGDERIVE_BENCH_KAFKA": kafka_bootstrap}
    env.pop("PGDERIVE_BENCH_SCENARIOS", None)
    env.pop("PGDERIVE_BENCH_PEERS", None)
    proc = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]

    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    table = [line for line in report.splitlines() if re.match(r"^\| [1-7] \|", line)]
    by_scenario: dict[str, list[list[str]]] = {}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        by_scenario.setdefault(cells[0], []).append(cells)
    assert sorted(by_scenario) == ["1", "2", "3", "4", "5", "6", "7"], report
    for scenario, rows in by_scenario.items():
        assert any(re.fullmatch(r"[\d,.]+×", r[4]) for r in rows), f"scenario {scenario}: no numeric ratio\n{report}"
        assert all(r[6] != "**FAILED**" for r in rows), report
    # The machine header and the date are there.
    for label in ("| CPU |", "| RAM |", "| Kernel |", "| PostgreSQL |", "| Redis |", "| OpenSearch |", "Date: "):
        assert label in report

    results = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert all(isinstance(r["ratio"], float) for r in results["rows"])
    assert len(results["scaling"]) == 3

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        slots = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                             (PREFIX + "%",)).fetchall()
        dbs = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",)).fetchall()
    assert slots == [] and dbs == []
