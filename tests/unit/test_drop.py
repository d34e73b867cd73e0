"""``pgderive drop VIEW`` without services: the refusal rules, resolving a name to registry
entries, the stored target's JSON form, and the command's confirmation (ARCHITECTURE.md,
"State"). The drop itself against real sinks is tests/integration/test_drop.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cdc.catalog import TableInfo
from pgderive import cli
from pgderive.ops import drop as drop_mod
from pgderive.ops.drop import DropReport, check_droppable, describe, resolve_entries
from pgderive.runtime.errors import EngineError
from pgderive.state.registry import ViewEntry, ViewRegistry, entry_of, target_from_json, target_json
from sinks.base import ViewTarget
from views.derive import View, view_fingerprint
from views.spec import Spec, parse_spec

SPEC = """
source: {dsn: "postgresql://x@127.0.0.1:1/db", slot: s}
sinks:
  cache: {type: redis, url: "redis://127.0.0.1:1/0"}
  search: {type: opensearch, hosts: ["http://127.0.0.1:1"]}
views:
  kept: {table: public.t, sink: cache, key: "kept:{id}"}
  both: {table: public.t, sink: [cache, search], key: "both:{id}", index: both}
"""
INFO = TableInfo("public.t", {"id": "integer", "name": "text"}, ("id",), "d", ("id",))

REDIS = ViewEntry("gone_r", "cache", ViewTarget("gone_r", format="json", key_shape="gone:{}"), "fp1", "retired")
SEARCH = ViewEntry("gone_s", "search", ViewTarget("gone_s", index="gone"), "fp2", "retired")


@pytest.fixture
def spec() -> Spec:
    return parse_spec(SPEC)


def test_a_declared_view_is_refused(spec: Spec) -> None:
    with pytest.raises(EngineError, match=r"^view kept is still in the config: remove it from the YAML and "
                                          r"reload the daemon first$"):
        check_droppable(spec, "kept", REDIS, [])
    # a view kept in several sinks: its declared name and each copy
    for name in ("both", "both@search"):
        with pytest.raises(EngineError, match="still in the config"):
            check_droppable(spec, name, SEARCH, [])


def test_an_unknown_view_names_the_retired_ones(spec: Spec) -> None:
    with pytest.raises(EngineError, match=r"view nope is unknown: .* slot s \(retired views of slot s: gone_r, gone_s\)"):
        check_droppable(spec, "nope", None, ["gone_r", "gone_s"])
    with pytest.raises(EngineError, match=r"\(slot s has no retired views\)"):
        check_droppable(spec, "nope", None, [])


def test_an_active_view_is_refused(spec: Spec) -> None:
    active = ViewEntry("gone_r", "cache", REDIS.target, "fp1", "active")
    with pytest.raises(EngineError, match="view gone_r is still active: the daemon maintains it"):
        check_droppable(spec, "gone_r", active, [])


def test_a_view_whose_sink_left_the_config_is_refused(spec: Spec) -> None:
    orphan = ViewEntry("gone_x", "old_cache", ViewTarget("gone_x", key_shape="x:{}"), "fp", "retired")
    with pytest.raises(EngineError, match=r"sink old_cache, which is no longer in the config: add "
                                          r"sinks\.old_cache back"):
        check_droppable(spec, "gone_x", orphan, [])


def test_a_sink_of_another_type_is_refused(spec: Spec) -> None:
    moved = ViewEntry("gone_s", "cache", ViewTarget("gone_s", index="gone"), "fp", "retired")
    with pytest.raises(EngineError, match=r"OpenSearch alias 'gone', but sinks\.cache is now a redis sink"):
        check_droppable(spec, "gone_s", moved, [])


def test_a_view_sharing_records_with_a_declared_one_is_refused(spec: Spec) -> None:
    same_alias = ViewEntry("old_both", "search", ViewTarget("old_both", index="both"), "fp", "retired")
    with pytest.raises(EngineError, match=r"shares its records with view both@search of the config"):
        check_droppable(spec, "old_both", same_alias, [])
    same_keys = ViewEntry("old_kept", "cache", ViewTarget("old_kept", format="hash", key_shape="kept:{}"), "fp",
                          "retired")
    with pytest.raises(EngineError, match=r"shares its records with view kept of the config"):
        check_droppable(spec, "old_kept", same_keys, [])


def test_a_retired_view_whose_sink_is_declared_may_be_dropped(spec: Spec) -> None:
    assert check_droppable(spec, "gone_r", REDIS, []) is REDIS
    assert check_droppable(spec, "gone_s", SEARCH, []) is SEARCH


def test_resolve_entries_by_name_or_by_copies() -> None:
    copies = [ViewEntry(f"card@{s}", s, ViewTarget(f"card@{s}"), "fp", "retired") for s in ("a", "b")]
    entries = [REDIS, SEARCH, *copies]
    assert resolve_entries(entries, "gone_r") == [REDIS]
    assert resolve_entries(entries, "card") == copies
    assert resolve_entries(entries, "card@b") == [copies[1]]
    assert resolve_entries(entries, "gone") == []  # a prefix is not a name


def test_describe_names_the_layout() -> None:
    assert describe(REDIS) == "sink cache, Redis keys 'gone:{}' (json)"
    assert describe(SEARCH) == "sink search, OpenSearch alias 'gone'"


def test_target_json_round_trip() -> None:
    for target in (REDIS.target, SEARCH.target, ViewTarget("v")):
        assert target_from_json(target_json(target)) == target
    assert target_json(SEARCH.target) == {"view": "gone_s", "format": None, "index": "gone", "key_shape": None,
                                          "topic": None, "table": None}
    assert target_from_json({"view": "v", "index": "i", "later": 1}) == ViewTarget("v", index="i")
    with pytest.raises(ValueError, match="format 'xml'"):
        target_from_json({"view": "v", "format": "xml"})
    with pytest.raises(ValueError, match="no view name"):
        target_from_json({"index": "i"})


def test_entry_of_a_bound_view(spec: Spec) -> None:
    view = View("kept", spec.views["kept"], INFO)
    entry = entry_of(view, view_fingerprint(view))
    assert entry == ViewEntry("kept", "cache", ViewTarget("kept", format="hash", key_shape="kept:{}"),
                              view_fingerprint(view), "active")
    copy = View("both@search", spec.views["both@search"], INFO)
    assert entry_of(copy, "fp").target == ViewTarget("both@search", index="both", key_shape="both:{}")


def test_entries_refuses_an_unknown_status_before_connecting() -> None:
    with pytest.raises(ValueError, match="status must be one of active, retired"):
        ViewRegistry("postgresql://x@127.0.0.1:1/db").entries("s", "gone")


def test_record_refuses_a_target_of_another_view() -> None:
    bad = ViewEntry("a", "cache", ViewTarget("b"), "fp")
    with pytest.raises(ValueError, match="registry entry a: its target is view b"):
        ViewRegistry("postgresql://x@127.0.0.1:1/db").record("s", [bad])


# -- the command ---------------------------------------------------------------------------
@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def dropped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """plan_drop finds gone_r; drop_view records its calls instead of dropping."""
    calls: list[str] = []

    def drop_view(spec: Spec, name: str) -> DropReport:
        calls.append(name)
        return DropReport(name, "cache", REDIS.target, records=3, dead_letters=1, aggregate_groups=0)

    monkeypatch.setattr(drop_mod, "plan_drop", lambda spec, name: [REDIS])
    monkeypatch.setattr(drop_mod, "drop_view", drop_view)
    return calls


def test_declining_the_confirmation_drops_nothing(config: Path, dropped: list[str]) -> None:
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "gone_r"], input="n\n")
    assert result.exit_code == 1
    assert dropped == []
    assert "view gone_r: sink cache, Redis keys 'gone:{}' (json)" in result.output
    assert "aborted: nothing was dropped" in result.output
    # no input at all (not a terminal): a no
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "gone_r"], input="")
    assert result.exit_code == 1 and dropped == []


def test_confirming_drops_and_prints_what_was_removed(config: Path, dropped: list[str]) -> None:
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "gone_r"], input="y\n")
    assert result.exit_code == 0, result.output
    assert dropped == ["gone_r"]
    assert result.output.strip().splitlines()[-1] == (
        "dropped gone_r from sink cache: 3 record(s), 1 dead letter(s), 0 aggregate group(s)")
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "gone_r", "--yes"])
    assert result.exit_code == 0 and dropped == ["gone_r", "gone_r"]
    assert "[y/N]" not in result.output


def test_a_refusal_is_one_line_and_exit_1(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(spec: Spec, name: str) -> list[ViewEntry]:
        raise EngineError(f"view {name} is still active: the daemon maintains it")

    monkeypatch.setattr(drop_mod, "plan_drop", refuse)
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "gone_r", "--yes"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: view gone_r is still active: the daemon maintains it"]


def test_a_view_still_in_the_config_is_refused_before_any_connection(config: Path) -> None:
    """The source in SPEC is unreachable (port 1): the refusal comes first, as one line."""
    result = CliRunner().invoke(cli.main, ["drop", "-c", str(config), "both", "--yes"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: view both is still in the config: remove it from the YAML and reload the daemon first"]
