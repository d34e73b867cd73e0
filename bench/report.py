"""Result rows, the console line per row, the markdown report and the PNG plot."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .settings import ROOT, Settings

__all__ = ["Row", "format_row", "machine_info", "write_report", "write_plot", "SCENARIO_TITLES"]

SCENARIO_TITLES = {
    "1": "Backlog drain",
    "2": "Live lag",
    "3": "Snapshot",
    "4": "Memory",
    "5": "Scaling curve",
    "6": "Peers",
}


@dataclass
class Row:
    """One line of the result table.

    ``measured`` and ``baseline`` share ``unit``; ``ratio`` is measured / baseline (for lags
    and memory, where less is better, still measured / baseline: see ``target``). ``met`` is
    None when the row has no target or was not measured; ``error`` marks a failed step."""

    scenario: str
    name: str
    measured: float | None = None
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str = "—"
    met: bool | None = None
    note: str = ""
    error: str | None = None
    lower_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``met`` / ``MISSED`` / ``FAILED`` / ``—``."""
        if self.error:
            return "FAILED"
        if self.met is None:
            return "—"
        return "met" if self.met else "MISSED"


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:,.1f}"
    else:
        text = f"{value:,.2f}"
    return f"{text} {unit}".strip()


def format_row(row: Row) -> str:
    """The one-line console form of ``row``."""
    if row.error:
        return f"[{row.scenario}] {row.name}: FAILED: {row.error.splitlines()[0] if row.error else ''}"
    ratio = f"{row.ratio:.2f}×" if row.ratio is not None else "—"
    return (f"[{row.scenario}] {row.name}: {_num(row.measured, row.unit)} | {row.baseline_name} "
            f"{_num(row.baseline, row.unit)} | ratio {ratio} | target {row.target} | {row.status}")


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(settings: Settings) -> dict[str, str]:
    """CPU model, cores, RAM, kernel, OS, service and library versions, git revision."""
    import psycopg
    import redis
    from opensearchpy import OpenSearch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    osname = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    info = {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores ({psutil.cpu_count(logical=False) or '?'} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "Kernel": f"{platform.system()} {platform.release()}" + (f" ({osname})" if osname else ""),
        "Python": sys.version.split()[0],
    }
    try:
        with psycopg.connect(settings.pg_dsn, autocommit=True, connect_timeout=5) as conn:
            info["PostgreSQL"] = conn.execute("SELECT version()").fetchone()[0].split(" on ")[0]
            info["PostgreSQL settings"] = ", ".join(
                f"{k}={conn.execute(f'SHOW {k}').fetchone()[0]}"
                for k in ("shared_buffers", "synchronous_commit", "wal_level", "max_wal_size"))
    except Exception as e:  # noqa: BLE001 - the report says what it could not read
        info["PostgreSQL"] = f"unavailable: {e}"
    wal2json = _cmd(["dpkg-query", "-W", "-f=${Version}", "postgresql-15-wal2json"])
    if wal2json:
        info["wal2json"] = wal2json
    try:
        r = redis.Redis.from_url(settings.redis_url)
        server = r.info("server")
        persistence = r.config_get("appendfsync")
        info["Redis"] = f"{server['redis_version']} (appendfsync {persistence.get('appendfsync', '?')})"
    except Exception as e:  # noqa: BLE001
        info["Redis"] = f"unavailable: {e}"
    try:
        os_info = OpenSearch(hosts=[settings.opensearch_url]).info()
        info["OpenSearch"] = f"{os_info['version']['number']} (single node)"
    except Exception as e:  # noqa: BLE001
        info["OpenSearch"] = f"unavailable: {e}"
    rev = _cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if rev:
        dirty = _cmd(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "cdc", "views", "sinks"])
        info["pgderive"] = rev + (" + uncommitted changes in cdc/views/sinks" if dirty else "")
    load = os.getloadavg()
    info["Load average at start"] = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    return info


METHOD = """\
Every figure is measured against a baseline taken in the same run, on the same machine, right
before or after it, so the ratios hold on a noisy machine while the absolute numbers do not.
In scenarios 1 (Redis), 2 and 5, after pgderive's bootstrap and before the baseline's slot is
created, the bench waits for the Redis AOF rewrite the bootstrap earned and runs a Postgres
`CHECKPOINT`, so neither lands inside a measurement by accident of the set-up.

* **1. Backlog drain.** `pgbench -i -s SCALE`; pgderive bootstraps its slot B and is stopped;
  slot A (`pg_create_logical_replication_slot(…, 'wal2json')`) is created right after, so both
  see exactly the same changes; `pgbench -n -c C -j J -T SECONDS` builds the backlog. The end of
  the workload is a *marker*: one transaction reads `pg_current_wal_insert_lsn()` = L and then
  updates `pgbench_accounts` row 1 (a no-op update); every workload commit precedes L, the
  marker follows it (pg_recvlogical stops before it, pgderive applies it: one extra change for
  pgderive, not counted). A is drained with `pg_recvlogical --start --endpos L` with exactly
  pgderive's wal2json options (`cdc.wal2json.plugin_options`, incl. `add-tables`) to `/dev/null`;
  then `pgderive run` is started and timed from spawn until `pg_replication_slots.
  confirmed_flush_lsn >= L` (polled every 50 ms), start-up included. **Changes** are counted
  from pgbench's committed transaction count (each TPC-B-like transaction updates one row of each
  of accounts, tellers, branches; the history insert is not watched), and cross-checked against
  pgderive's `--stats-file` `changes` (which include the marker). The OpenSearch variant watches
  `pgbench_accounts` only; its baseline is `opensearch-py` `helpers.parallel_bulk` writing the
  same documents (one per account change, taken from slot A's wal2json output; same `_id` and
  fields; plain index actions, 2,000 per request and 2 requests in flight as pgderive,
  serialized with orjson as pgderive does) into a clone of pgderive's
  generation index made before the workload (so both update the same 1M existing documents).
  Before each of the two drains the bench waits until OpenSearch runs no segment merge (the
  bootstrap's and the first drain's merges would otherwise take CPU from the next one).
* **2. Live lag.** pgderive streams Redis views of accounts, tellers, branches and `bench_probe`
  while pgbench runs at saturation (`-c C -T LAG_SECONDS`) and then rate-limited (`-R RATE`), one
  daemon run per level. pgderive's own lag (stats file: wal2json commit timestamp → every sink
  acknowledged, every transaction) is cross-checked by a probe: a separate connection updates
  `bench_probe` every ~50 ms (commit time = server `clock_timestamp()`), a poller reads the
  Redis hash every ~1 ms. Baseline: the same probe decoded by `pg_recvlogical` on its own slot
  (same options, `add-tables` = the probe table, output to a pipe) — the earliest any logical
  decoding consumer can see a commit on this server under the same load.
* **3. Snapshot.** `COPY pgbench_accounts TO STDOUT` (psycopg, rows counted, data discarded) is
  the baseline; pgderive bootstraps a Redis view, then (another slot) an OpenSearch view of
  `pgbench_accounts`; rows/s are pgderive's own snapshot figures from the stats file (table load
  time, i.e. without process start-up and slot creation; the wall time is in the notes). The
  OpenSearch bootstrap is also compared with the raw bulk loader writing the same documents
  (read beforehand, untimed) into an empty scratch index with the generation indices' settings,
  and the Redis bootstrap with `redis-cli --pipe` sending one `HSET` per record of the same
  records (RESP written to a file beforehand, untimed): what Redis itself can take; a second
  `redis-cli --pipe` run also sends the version entries pgderive writes (one `HSET` of 7,000
  entries into one hash per 7,000 records, as a wire load does): Redis' own bound for
  pgderive's layout. Each of these Redis loads starts from the same state: the scenario's
  keys deleted (pgderive's records go before the `redis-cli` runs) and an AOF rewrite of what
  is left (`BGREWRITEAOF`, waited for), so each earns the same automatic rewrite, which stays
  in its time. Both OpenSearch loads start once OpenSearch runs no segment merge.
* **4. Memory.** Peak RSS of the pgderive process and its children, sampled every 50 ms with
  psutil, during scenario 3's bootstraps and while one transaction updating every row of
  `pgbench_accounts` is streamed into a Redis view. Baseline: the RSS of the same daemon idle
  (freshly resumed, streaming, nothing to do).
* **5. Scaling curve.** The same Redis config drains backlogs of 1×, 2×, 4× `pgbench -t TX`
  (per client); time is measured from the slot becoming active (start-up excluded, it is in
  the notes) to the marker confirmed; `pg_recvlogical` drains the same backlog on its own slot
  as a reference. Linearity = throughput at 4× / throughput at 1× (1.0 = perfectly linear).
* **6. Peers.** pgderive, pgstream v1.3.1 and pgsync 7.3.0 (installed by `scripts/peers.sh`
  from the Go module proxy and PyPI under `.services/peers/`; `PGDERIVE_BENCH_PEERS` picks
  them, quick mode runs pgderive alone) each get a database of their own (`pgbench -i -s
  SCALE`), their own slots and index (`<prefix>-peers-<tool>…`) and run one at a time. Initial
  load of `pgbench_accounts` (fields aid, bid, abalance): timed from spawning the tool until
  `_count` of its index equals the table's rows (polled every 0.25 s; start-up, slot creation
  and the 1 s refresh included for every tool; pgsync: `bootstrap` untimed, then a one-shot
  `pgsync`). The tool is stopped; `pgbench -n -c C -j J -T SECONDS` writes the backlog; a
  marker gives its end L (as in scenario 1); the tool is started again and timed from spawn
  until its slot's `confirmed_flush_lsn` >= L, capped at `PGDERIVE_BENCH_PEERS_TIMEOUT`
  seconds (then the share of the backlog's WAL it confirmed is reported, and its rate is of
  that share); the first time `sum(abalance)` in OpenSearch equals Postgres' is noted (a
  refresh and a sum aggregation every 1 s, the same for every tool). Afterwards: document count and `sum(abalance)` against Postgres (waited for up to
  30 s), a DELETE of 3 rows (documents gone within 30 s?) and last a TRUNCATE (index emptied
  within 30 s? the tool still running?). Peak RSS (process and children, every 50 ms) and CPU
  seconds cover load and drain. Ratios are pgderive / peer; each tool ran its own backlog of
  the same length, so rates are compared, not times. pgstream's request size is set to
  pgderive's (2,000 documents / 16 MiB, 1 s batch timeout); its index is created beforehand
  (see `bench/peers.py` for why). A peer that fails to install or run gets a FAILED row.
* **CPU notes** (where the time went): pgderive's CPU (process and children, psutil, every
  50 ms) over the measured interval; for drains also the lifetime CPU of the walsender serving
  its slot (the decoding work) and the Redis / OpenSearch server processes' CPU meanwhile (all
  of their clients count, so concurrent work on the same servers inflates them). On 2 cores,
  pgderive near 100 % means its Python process is the bottleneck; well below with the sinks busy
  means it waits on them.
"""


def write_report(path: Path, rows: list[Row], meta: dict[str, Any], plot: Path | None,
                 durations: dict[str, float], settings: Settings) -> None:
    """Write the markdown report: header (date, machine), the table, timings, method, errors."""
    lines = ["# pgderive benchmark", ""]
    lines.append(f"Date: {meta['date']} · mode: {'quick' if settings.quick else 'full'} · total wall time "
                 f"{meta['wall_s'] / 60:.1f} min · `{meta['command']}`")
    lines.append("")
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in meta["machine"].items()]
    lines.append("")
    lines.append(f"Parameters: scale {settings.scale}"
                 + (f" (+ snapshot at scale {settings.big_scale})" if settings.big_scale else "")
                 + f", pgbench -c {settings.clients} -j {settings.jobs}, backlog -T {settings.backlog_seconds}, "
                 f"live lag -T {settings.lag_seconds} (saturation and -R {settings.lag_rate}), "
                 f"scaling -t {settings.scaling_tx}×1/2/4 per client, "
                 f"peers: {', '.join(settings.peers) or 'none (pgderive alone)'}.")
    lines.append("")
    lines += ["## Results", "",
              "| # | measurement | pgderive | baseline | ratio | target | result | notes |",
              "|---|---|--:|--:|--:|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.scenario} | {r.name} | — | — | — | {r.target} | **FAILED** | "
                         f"{_md(r.error.splitlines()[0])} |")
            continue
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "—"
        status = {"met": "met", "MISSED": "**missed**", "—": "—"}[r.status]
        baseline = f"{_num(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline_name else _num(r.baseline, r.unit)
        lines.append(f"| {r.scenario} | {_md(r.name)} | {_num(r.measured, r.unit)} | {_md(baseline)} | {ratio} | "
                     f"{_md(r.target)} | {status} | {_md(r.note)} |")
    lines.append("")
    met = sum(1 for r in rows if r.status == "met")
    missed = sum(1 for r in rows if r.status == "MISSED")
    failed = sum(1 for r in rows if r.status == "FAILED")
    lines.append(f"Targets: {met} met, {missed} missed" + (f", {failed} failed" if failed else "") + ".")
    lines.append("")
    if plot is not None and plot.exists():
        rel = os.path.relpath(plot, path.parent)
        lines += [f"![scaling curve and ratios]({rel})", ""]
    lines += ["## Wall time per scenario", "", "| part | seconds |", "|---|--:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in durations.items()]
    lines += [f"| total | {meta['wall_s']:.0f} |", ""]
    lines += ["## Method", "", METHOD]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["## Errors", ""]
        for r in errors:
            lines += [f"### [{r.scenario}] {r.name}", "", "```", r.error.strip()[-4000:], "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_plot(path: Path, rows: list[Row], scaling: list[dict[str, float]]) -> Path:
    """PNG with the scaling curve (drain seconds vs backlog changes, pgderive and
    pg_recvlogical, with the linear extrapolation of the 1× point) and a bar chart of every
    row's ratio (green = target met, red = missed, grey = no target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_rows = [r for r in rows if r.ratio is not None and not r.error]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, max(5.0, 0.32 * len(ratio_rows) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.3]})
    if scaling:
        xs = [p["changes"] for p in scaling]
        ax1.plot(xs, [p["pgderive_s"] for p in scaling], "o-", label="pgderive (slot active → confirmed)")
        ax1.plot(xs, [p["pgderive_total_s"] for p in scaling], "o:", label="pgderive incl. start-up")
        ax1.plot(xs, [p["recvlogical_s"] for p in scaling], "s-", label="pg_recvlogical")
        base = scaling[0]
        ax1.plot([0, max(xs)], [0, base["pgderive_s"] * max(xs) / base["changes"]], "--", color="grey",
                 label="linear from 1×")
        for p in scaling:
            ax1.annotate(f"{p['multiple']:g}×\n{p['changes'] / p['pgderive_s']:,.0f}/s",
                         (p["changes"], p["pgderive_s"]), textcoords="offset points", xytext=(5, -25), fontsize=8)
        ax1.set_xlabel("backlog (changes)")
        ax1.set_ylabel("drain time (s)")
        ax1.set_xlim(left=0)
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "scaling scenario not run", ha="center", va="center")
    ax1.set_title("Scenario 5: drain time vs backlog")
    if ratio_rows:
        labels = [f"[{r.scenario}] {r.name}" + (" (lower is better)" if r.lower_is_better else "")
                  for r in ratio_rows]
        colors = ["tab:green" if r.met else "tab:red" if r.met is False else "tab:grey" for r in ratio_rows]
        ys = range(len(ratio_rows))
        ax2.barh(list(ys), [r.ratio for r in ratio_rows], color=colors)
        ax2.set_yticks(list(ys))
        ax2.set_yticklabels(labels, fontsize=7)
        ax2.invert_yaxis()
        ax2.axvline(1.0, color="black", linewidth=0.8)
        ax2.set_xscale("log")
        for y, r in zip(ys, ratio_rows):
            ax2.text(r.ratio, y, f" {r.ratio:.2f}×", va="center", fontsize=7)
    ax2.set_title("pgderive / baseline (log scale; green met, red missed, grey no target)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows as plain dicts (for results.json), with their status."""
    return [{**asdict(r), "status": r.status} for r in rows]


def now_utc() -> str:
    """Current UTC time, ISO format to the second."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
