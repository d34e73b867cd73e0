"""``status_document``: the facts of ``pgderive status`` as one JSON-ready document (issue 16,
part 2), from hand-built facts; and the CLI's refusal of ``--json --watch``."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
from click.testing import CliRunner

from cdc.slot import SlotInfo
from sinks.base import ViewTarget
from pgderive import cli
from pgderive.ops import status as status_mod
from pgderive.ops.status import IdleSlot, SlotStatus, ViewStatus, status_document
from pgderive.state.rebuilds import Rebuild
from pgderive.state.registry import RETIRED, ViewEntry
from pgderive.state.slots import SlotState

T0 = dt.datetime(2026, 12, 7, 10, 0, 0, tzinfo=dt.timezone.utc)


def _streaming() -> SlotStatus:
    info = SlotInfo(name="s1", plugin="wal2json", database="db", active=True, active_pid=4242,
                    restart_lsn=0x1_0000_0000, confirmed_flush_lsn=0x1_0000_0800, current_wal_lsn=0x1_0000_1000)
    state = SlotState(slot="s1", status="streaming", consistent_point=0x0_0000_0100, views={"a": "f", "b": "f"})
    views = [ViewStatus("a", "public.t", "cache", 10, 0x1_0000_0c00, "streaming", 0),
             ViewStatus("b", "public.t", "search", None, None, "streaming", None, "ConnectionError")]
    rebuilds = [Rebuild("a", "loading", "pgderive rebuild", 0x1_0000_0400, 500, 2000, 250.0, 2, None, T0, T0),
                Rebuild("b", "failed", "definition changed", None, 0, None, None, 1,
                        "sink said no at http://u:hunter2@127.0.0.1:9201/x", T0, T0)]
    retired = [ViewEntry("old", "cache", ViewTarget(view="old", format="json", key_shape="old:{}"), "fp", RETIRED),
               ViewEntry("gone", "search", ViewTarget(view="gone", index="gone_idx"), "fp", RETIRED)]
    idle = [IdleSlot("s0", 123456, "SELECT pg_drop_replication_slot('s0')")]
    return SlotStatus("s1", info, 0.25, state, views=views, idle=idle, retired=retired, rebuilds=rebuilds)


def test_slot_facts_with_units_and_lsn_text() -> None:
    doc = status_document(_streaming())
    assert list(doc) == ["slot", "views", "rebuilds", "retired_views", "idle_slots", "kafka"]
    assert doc["slot"] == {
        "name": "s1", "exists": True, "active": True, "active_pid": 4242,
        "confirmed_lsn": "1/800", "restart_lsn": "1/0", "current_wal_lsn": "1/1000",
        "lag_bytes": 0x800, "lag_seconds": 0.25, "retained_wal_bytes": 0x1000,
        "status": "streaming", "consistent_point_lsn": "0/100"}


def test_views_records_checkpoints_and_errors() -> None:
    views = status_document(_streaming())["views"]
    assert views == [
        {"name": "a", "table": "public.t", "sink": "cache", "records": 10, "checkpoint_lsn": "1/C00",
         "checkpoint_behind_bytes": 0x400, "state": "streaming", "dead_letters": 0, "error": None},
        {"name": "b", "table": "public.t", "sink": "search", "records": None, "checkpoint_lsn": None,
         "checkpoint_behind_bytes": None, "state": "streaming", "dead_letters": None,
         "error": "ConnectionError"}]


def test_rebuilds_progress_and_scrubbed_errors() -> None:
    loading, failed = status_document(_streaming())["rebuilds"]  # type: ignore[misc]
    assert loading == {
        "view": "a", "phase": "loading", "active": True, "reason": "pgderive rebuild",
        "consistent_point_lsn": "1/400", "rows": 500, "rows_total_estimate": 2000, "rows_per_s": 250.0,
        "eta_seconds": 6.0, "attempts": 2, "error": None,
        "requested_at": "2026-12-07T10:00:00+00:00", "updated_at": "2026-12-07T10:00:00+00:00"}
    assert failed["phase"] == "failed" and failed["active"] is False and failed["eta_seconds"] is None
    assert failed["error"] == "sink said no at http://u:***@127.0.0.1:9201/x"


def test_retired_views_and_idle_slots() -> None:
    doc = status_document(_streaming())
    assert doc["retired_views"] == [
        {"view": "old", "sink": "cache", "layout": "sink cache, Redis keys 'old:{}' (json)", "index": None,
         "key_shape": "old:{}", "format": "json", "drop_command": "pgderive drop old"},
        {"view": "gone", "sink": "search", "layout": "sink search, OpenSearch alias 'gone_idx'",
         "index": "gone_idx", "key_shape": None, "format": None, "drop_command": "pgderive drop gone"}]
    assert doc["idle_slots"] == [{"slot": "s0", "retained_wal_bytes": 123456,
                                  "drop_sql": "SELECT pg_drop_replication_slot('s0')"}]


def test_absent_slot_and_unreadable_rebuilds_keep_every_key() -> None:
    st = SlotStatus("s1", None, None, SlotState("s1", "streaming", 0x10, {}),
                    views=[ViewStatus("a", "public.t", "cache", 0, None, "not bootstrapped", 0)], rebuilds=None)
    doc = status_document(st)
    assert doc["slot"] == {
        "name": "s1", "exists": False, "active": False, "active_pid": None, "confirmed_lsn": None,
        "restart_lsn": None, "current_wal_lsn": None, "lag_bytes": None, "lag_seconds": None,
        "retained_wal_bytes": None, "status": "absent", "consistent_point_lsn": "0/10"}
    assert doc["rebuilds"] is None and doc["retired_views"] == [] and doc["idle_slots"] == []
    assert doc["views"][0]["checkpoint_behind_bytes"] is None  # type: ignore[index]


def test_inactive_slot_word() -> None:
    info = SlotInfo("s1", "wal2json", "db", False, None, 0x100, 0x200, 0x300)
    doc = status_document(SlotStatus("s1", info, None, SlotState("s1", "streaming", 0x10, {})))
    assert doc["slot"]["active"] is False and doc["slot"]["status"] == "inactive"  # type: ignore[index]


def test_document_round_trips_through_orjson() -> None:
    doc = status_document(_streaming())
    assert orjson.loads(orjson.dumps(doc, option=orjson.OPT_INDENT_2)) == doc


CONFIG = """\
source: {dsn: "postgresql://postgres:zz-stj-pw-1@127.0.0.1:5433/db", slot: s1}
sinks:
  cache: {type: redis, url: "redis://u:zz-stj-pw-2@127.0.0.1:6380/12"}
views:
  a: {table: t, sink: cache, key: "a:{id}"}
"""


def test_cli_json_prints_the_document_without_secrets(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    monkeypatch.setattr(status_mod, "slot_status", lambda spec: _streaming())
    result = CliRunner().invoke(cli.main, ["status", "--json", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout) == orjson.loads(orjson.dumps(status_document(_streaming())))
    assert "zz-stj-pw" not in result.output and "hunter2" not in result.output


def test_cli_refuses_json_with_watch(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    for args in (["--json", "--watch"], ["--watch", "1", "--json"]):
        result = CliRunner().invoke(cli.main, ["status", *args, "-c", str(config)])
        assert result.exit_code == 2, result.output
        assert "--json and --watch cannot be combined" in result.output


def test_kafka_worker_group_document() -> None:
    from cdc.kafka_source import GroupStatus, PartitionLag

    group = GroupStatus("g", "STABLE", ["w1@/127.0.0.1"], [
        PartitionLag("pgderive.public.t", 0, "w1@/127.0.0.1", 10, 12, 2),
        PartitionLag("pgderive.public.t", 1, None, None, 5, 5)])
    st = SlotStatus("kafka_g", None, None, None, views=[ViewStatus("a", "public.t", "cache", 3, None, "kafka worker", 0)],
                    kafka=group)
    assert st.word == "kafka worker"
    doc = status_document(st)
    assert doc["slot"]["status"] == "kafka worker"  # type: ignore[index]
    assert doc["kafka"] == {
        "group": "g", "state": "STABLE", "members": ["w1@/127.0.0.1"],
        "partitions": [{"topic": "pgderive.public.t", "partition": 0, "owner": "w1@/127.0.0.1",
                        "committed_offset": 10, "end_offset": 12, "lag": 2},
                       {"topic": "pgderive.public.t", "partition": 1, "owner": None,
                        "committed_offset": None, "end_offset": 5, "lag": 5}],
        "lag_total": 7, "error": None}
    assert status_document(_streaming())["kafka"] is None
    cli._console.print(cli._status_tables(st))  # renders
