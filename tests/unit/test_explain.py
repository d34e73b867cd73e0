"""``pgderive explain`` without services: key parsing (views/keys.py), the one-record verify's
rounds over fake reads (pgderive/ops/explain.py ``settle``), the JSON document and the text
report, and ``/explain`` on the HTTP endpoint with a stand-in explain function."""
from __future__ import annotations

import datetime as dt
import time
import urllib.error
import urllib.request

import orjson
import pytest
from rich.console import Console

from pgderive.http.server import HttpEndpoint, HttpSettings
from pgderive.ops.explain import (BadKey, Explanation, Stored, UnknownView, Verdict, explanation_document,
                                  field_diffs, settle)
from pgderive.ops.explain_report import render_explanation, short_value
from pgderive.ops.explain_source import GroupFacts, SourceRead, SourceRow
from pgderive.state.aggregates import GroupMembers
from pgderive.state.provenance import Commit
from views.keys import MAX_CANDIDATES, KeyMismatch, parse_key
from views.template import KeyTemplate

from .test_http import FakeDaemon


# -- key parsing ---------------------------------------------------------------------------------
def test_a_single_placeholder_takes_the_rest_between_literals() -> None:
    assert parse_key(KeyTemplate("order:{id}"), "order:42", {"id": "integer"}) == [{"id": "42"}]
    assert parse_key(KeyTemplate("{id}"), "a:b", {"id": "text"}) == [{"id": "a:b"}]
    assert parse_key(KeyTemplate("p:{sku}:v"), "p:x:y:v") == [{"sku": "x:y"}]


def test_a_key_that_does_not_fit_the_template_is_refused_with_the_template() -> None:
    with pytest.raises(KeyMismatch, match=r"key 'ord:1' does not fit the key template 'order:\{id\}'"):
        parse_key(KeyTemplate("order:{id}"), "ord:1", {"id": "integer"})
    with pytest.raises(KeyMismatch, match=r"id \(integer\)"):
        parse_key(KeyTemplate("order:{id}"), "order:abc", {"id": "integer"})
    with pytest.raises(KeyMismatch):  # an int renders without leading zeros or a plus sign
        parse_key(KeyTemplate("order:{id}"), "order:007", {"id": "bigint"})
    with pytest.raises(KeyMismatch):
        parse_key(KeyTemplate("flag:{on}"), "flag:t", {"on": "boolean"})
    assert parse_key(KeyTemplate("flag:{on}"), "flag:true", {"on": "boolean"}) == [{"on": "true"}]
    assert parse_key(KeyTemplate("n:{x}"), "n:-5", {"x": "smallint"}) == [{"x": "-5"}]


def test_every_split_of_an_ambiguous_key_is_a_candidate_types_narrow_them() -> None:
    t = KeyTemplate("{a}:{b}")
    assert parse_key(t, "x:y:z") == [{"a": "x", "b": "y:z"}, {"a": "x:y", "b": "z"}]
    with pytest.raises(KeyMismatch):  # z is not an integer
        parse_key(t, "x:y:z", {"a": "text", "b": "integer"})
    assert parse_key(t, "x:y:1", {"a": "text", "b": "integer"}) == [{"a": "x:y", "b": "1"}]
    # the default OpenSearch _id of a two-column primary key
    assert parse_key(KeyTemplate.from_columns(["tenant", "id"]), "7:12",
                     {"tenant": "integer", "id": "integer"}) == [{"tenant": "7", "id": "12"}]


def test_repeated_columns_must_agree_and_braces_are_literal() -> None:
    t = KeyTemplate("{a}-{a}")
    assert parse_key(t, "x-x") == [{"a": "x"}]
    with pytest.raises(KeyMismatch):
        parse_key(t, "x-y")
    assert parse_key(KeyTemplate("{{{id}}}"), "{5}", {"id": "integer"}) == [{"id": "5"}]


def test_adjacent_placeholders_split_anywhere_but_candidates_are_bounded() -> None:
    got = parse_key(KeyTemplate("{a}{b}"), "ab")
    assert got == [{"a": "", "b": "ab"}, {"a": "a", "b": "b"}, {"a": "ab", "b": ""}]
    many = parse_key(KeyTemplate("{a}:{b}:{c}"), ":" * 40)
    assert len(many) == MAX_CANDIDATES


def test_rendering_what_was_parsed_gives_the_key_back() -> None:
    t = KeyTemplate("o:{region}:{id}")
    for key in ("o:eu:1", "o:eu-west:22", "o::3"):
        for cand in parse_key(t, key, {"id": "integer"}):
            assert t.render(cand) == key


# -- the one-record verify -------------------------------------------------------------------------
class Script:
    """Fake source and sink reads, served in order (the last one repeats)."""

    def __init__(self, sources: list[dict | None], stored: list[Stored], confirm: int | None = 10**9) -> None:
        self.sources, self.stored, self.confirm = sources, stored, confirm
        self.source_reads = self.stored_reads = 0
        self.waits: list[int] = []

    def source(self) -> SourceRead:
        doc = self.sources[min(self.source_reads, len(self.sources) - 1)]
        self.source_reads += 1
        return SourceRead(lsn=100 * self.source_reads, expected=doc)

    def sink(self) -> Stored:
        s = self.stored[min(self.stored_reads, len(self.stored) - 1)]
        self.stored_reads += 1
        return s

    def confirmed(self, target: int, deadline: float) -> tuple[int | None, str]:
        self.waits.append(target)
        if self.confirm is not None and self.confirm >= target:
            return self.confirm, ""
        return self.confirm, f"newer commits not applied yet (slot confirmed {self.confirm}, source at {target})"

    def run(self, wait: float = 1.0) -> tuple[SourceRead, Stored, Verdict]:
        return settle(self.source, self.sink, lambda d: {k: str(v) for k, v in d.items()}, self.confirmed, wait)


def test_equal_at_once_reads_once_and_does_not_wait() -> None:
    s = Script([{"a": 1}], [Stored({"a": "1"}, 5)])
    _, _, v = s.run()
    assert (v.status, v.exit_code, v.rounds, s.waits) == ("equal", 0, 1, [])


def test_neither_side_having_a_record_is_absent_exit_0() -> None:
    _, _, v = Script([None], [Stored(None, None)]).run()
    assert (v.status, v.exit_code) == ("absent", 0)


def test_a_lagging_sink_that_catches_up_is_equal() -> None:
    s = Script([{"a": 2}], [Stored({"a": "1"}, 5), Stored({"a": "2"}, 150)])
    _, stored, v = s.run()
    assert v.status == "equal" and stored.version == 150 and s.waits == [100]


def test_a_stable_difference_is_reported_after_two_rounds_with_its_fields() -> None:
    s = Script([{"a": 2, "b": "x"}], [Stored({"a": "9", "b": "x", "z": "1"}, 5)])
    _, _, v = s.run()
    assert (v.status, v.exit_code, v.rounds) == ("different", 1, 2)
    assert [(d.field, d.sink, d.source, d.absent) for d in v.differences] == [("a", "9", "2", None),
                                                                              ("z", "1", None, "source")]
    assert "daemon confirmed" in v.note and s.waits == [100, 200]


def test_missing_and_extra_records() -> None:
    _, _, v = Script([{"a": 1}], [Stored(None, None)]).run()
    assert (v.status, v.exit_code, v.differences) == ("missing", 1, [])
    _, _, v = Script([None], [Stored({"a": "1"}, 7)]).run()
    assert (v.status, v.exit_code) == ("extra", 1)
    _, _, v = Script([{"a": 1}], [Stored(None, 8)]).run()  # a tombstone while the source has the row
    assert v.status == "missing"


def test_a_daemon_behind_the_snapshot_is_pending_not_different() -> None:
    s = Script([{"a": 2}], [Stored({"a": "1"}, 5)], confirm=50)
    _, _, v = s.run()
    assert (v.status, v.exit_code, v.confirmed_lsn) == ("pending", 1, 50)
    assert v.note.startswith("newer commits not applied yet (slot confirmed 50, source at 100")


def test_a_record_that_keeps_changing_until_the_deadline_is_pending() -> None:
    s = Script([{"a": 0}], [])
    s.sink = lambda: Stored({"a": str(time.monotonic_ns())}, time.monotonic_ns())  # type: ignore[method-assign]
    _, _, v = s.run(wait=0.05)
    assert v.status == "pending" and "kept changing" in v.note and v.rounds >= 2


def test_a_difference_that_goes_away_in_the_second_round_is_equal() -> None:
    # round 1: a commit just before S was not visible yet; round 2's snapshot sees it
    s = Script([{"a": 1}, {"a": 2}], [Stored({"a": "2"}, 90)])
    _, _, v = s.run()
    assert v.status == "equal" and v.rounds == 2


def test_field_diffs_compare_types_too() -> None:
    assert [d.field for d in field_diffs({"a": 1, "b": "x"}, {"a": 1.0, "b": "x"})] == ["a"]
    assert field_diffs({"a": [1]}, {"a": [1]}) == []


# -- document and report ---------------------------------------------------------------------------
def _explanation(status: str = "different") -> Explanation:
    src = SourceRead(lsn=0x1_0000_0100, expected={"id": 42, "status": "paid"})
    src.rows = [SourceRow("", "public.orders", {"id": 42}, {"id": 42, "status": "[paid]"}, xmin=777,
                          xmin_committed_at=dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.timezone.utc)),
                SourceRow("items[].product", "public.products", {"id": 5}, {"id": 5, "name": "Widget 5"})]
    verdict = Verdict(status, 0x1_0000_0100, 0x1_0000_0200, {"id": 42, "status": "paid"},
                      field_diffs({"id": 42, "status": "shipped"}, {"id": 42, "status": "paid"})
                      if status == "different" else [], rounds=2, waited_s=0.25, note="why")
    return Explanation("order_cache", "order:42", "cache", "redis", "public.orders", "include",
                       Stored({"id": 42, "status": "shipped"}, 0x1_0000_0080), src, verdict,
                       commit=Commit(0x1_0000_0080, 777, dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.timezone.utc)),
                       origin="stream", origin_note="written by the stream", fingerprint="abc",
                       written_fingerprint="abc", registered_fingerprint="abc", registry_status="active",
                       generation_note="records are shared by generations")


def test_the_json_document_has_its_documented_keys_and_lsn_text() -> None:
    doc = explanation_document(_explanation())
    assert list(doc) == ["version", "view", "key", "sink", "table", "shape", "record", "provenance", "sources",
                         "sources_truncated", "commit_timestamps", "underivable", "dead_letters", "group", "definition",
                         "generation", "verify", "exit_code"]
    assert doc["record"] == {"found": True, "doc": {"id": 42, "status": "shipped"}, "version": "1/80",
                             "tombstone": False}
    assert doc["provenance"]["xid"] == 777 and doc["provenance"]["committed_at"] == "2026-12-07T13:00:00+00:00"
    assert doc["sources"][1]["path"] == "items[].product" and doc["sources"][0]["xmin"] == 777
    assert doc["verify"]["status"] == "different" and doc["exit_code"] == 1
    assert doc["verify"]["differences"] == [{"field": "status", "sink": "shipped", "source": "paid", "absent": None}]
    assert doc["definition"]["current"] is True
    orjson.dumps(doc)  # JSON-ready


def test_the_document_of_an_aggregate_group_names_its_sample_keys() -> None:
    e = _explanation("equal")
    e.source.rows = []
    e.source.group = GroupFacts({"category_id": "3"}, 4, ("id",),
                                GroupMembers(4, [(["11"], 0x20), (["12"], 0x10)], True))
    doc = explanation_document(e)
    assert doc["group"] == {"values": {"category_id": "3"}, "source_rows": 4, "state_rows": 4, "has_state": True,
                            "sample": [{"key": {"id": "11"}, "version": "0/20"}, {"key": {"id": "12"}, "version": "0/10"}]}
    assert doc["exit_code"] == 0


def _text(e: Explanation) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(render_explanation(e))
    return console.export_text()


def test_the_report_names_version_transaction_rows_and_differences() -> None:
    text = _text(_explanation())
    assert "view order_cache (sink cache, redis; include view over public.orders), key order:42" in text
    assert "1/80 (commit LSN), transaction 777, committed 2026-12-07T13:00:00+00:00" in text
    assert "items[].product" in text and "public.products" in text
    assert 'status="[paid]"' in text  # a value with brackets is not taken as markup
    assert "(the record's transaction)" in text  # xmin 777 is the commit's xid
    assert "DIFFERENT" in text and '"shipped"' in text and '"paid"' in text


def test_the_report_and_document_name_the_keys_dead_letters() -> None:
    from pgderive.state.deadletters import DeadLetterRecord

    e = _explanation("missing")
    e.dead_letters = [DeadLetterRecord(12, "s", "order_cache", "public.orders", "order:42", 0x77,
                                       "mapper_parsing_exception", None,
                                       dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc), 0)]
    assert "dead letter 12 of this key at 0/77" in _text(e)
    assert explanation_document(e)["dead_letters"] == [{"id": 12, "lsn": "0/77", "error": "mapper_parsing_exception",
                                                        "created_at": "2026-12-07T00:00:00+00:00"}]


def test_the_report_of_an_equal_tombstone_and_a_stale_definition() -> None:
    e = _explanation("equal")
    e.stored = Stored(None, 0x99)
    e.written_fingerprint = "old"
    text = _text(e)
    assert "deleted (a tombstone at 0/99)" in text and "EQUAL" in text
    assert "the YAML's is abc: a rebuild is pending" in text


def test_short_values_are_cut() -> None:
    assert short_value("x" * 100, 10) == '"xxxxxxxx…'
    assert short_value({"a": [1, None]}) == '{"a":[1,null]}'


# -- /explain ------------------------------------------------------------------------------------
def test_explain_endpoint_serves_the_document_404_unknown_view_400_bad_key() -> None:
    calls: list[tuple[str, str, float]] = []

    def explain(view: str, key: str, wait: float) -> dict[str, object]:
        calls.append((view, key, wait))
        if view == "nope":
            raise UnknownView("unknown view 'nope'")
        if key == "bad":
            raise BadKey("key 'bad' does not fit")
        if key == "boom":
            raise RuntimeError("password=hunter2 refused")
        return explanation_document(_explanation())

    ep = HttpEndpoint(FakeDaemon(), HttpSettings(port=0), explain=explain)
    ep.start()
    try:
        with urllib.request.urlopen(ep.url + "/explain?view=order_cache&key=order%3A42&wait=2") as r:
            doc = orjson.loads(r.read())
        assert r.status == 200 and doc["key"] == "order:42" and doc["verify"]["status"] == "different"
        assert calls[-1] == ("order_cache", "order:42", 2.0)
        for query, code in (("view=nope&key=x", 404), ("view=v&key=bad", 400), ("view=v", 400),
                            ("view=v&key=x&wait=600", 400), ("view=v&key=x&wait=z", 400), ("view=v&key=boom", 503)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(ep.url + "/explain?" + query)
            assert e.value.code == code, query
            body = orjson.loads(e.value.read())
            assert "error" in body
        assert calls[-1][2] == 10.0 or calls[-1][1] == "boom"
    finally:
        ep.close()


def test_a_version_is_traced_to_the_stream_a_snapshot_load_or_nothing() -> None:
    from pgderive.ops.explain import _origin

    commit = Commit(0x500, 9, dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc))
    assert _origin(0x500, commit, 0x100, None)[0] == "stream"
    assert _origin(0x100, None, 0x100, 0x300) == ("bootstrap", "a snapshot load: the bootstrap at the slot's "
                                                              "consistent point 0/100")
    origin, note = _origin(0x2FF, None, 0x100, 0x300)  # online rebuilds load at X - 1
    assert origin == "rebuild" and "0/300" in note
    assert _origin(0x300, None, 0x100, 0x300) == ("unknown", "not recorded (older than provenance retention, "
                                                             "or provenance off)")
    assert _origin(None, None, 0x100, None)[0] is None


def test_classified_source_values_are_masked_the_rest_kept() -> None:
    from pgderive.ops.explain import mask_classified

    rows = [SourceRow("", "public.orders", {"id": 1}, {"id": 1, "customer_id": 7}),
            SourceRow("customer", "public.customers", {"id": 7}, {"id": 7, "name": "Ann", "email": "a@x"})]
    got = mask_classified(rows, {"public.customers.name": ["pii"], "public.customers.email": ["pii", "contact"]})
    assert got[0] is rows[0]
    assert got[1].values == {"id": 7, "name": "<classified: pii>", "email": "<classified: pii, contact>"}
    assert got[1].key == {"id": 7} and rows[1].values["name"] == "Ann"
    assert mask_classified(rows, {}) == rows
