"""Sinks against the real Redis and OpenSearch (scripts/services.sh up)."""
from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator

import pytest
import redis

from sinks.base import Op, Rejected, SinkError, ViewTarget
from sinks.factory import make_sink
from sinks.opensearch import CHECKPOINT_INDEX, OpenSearchSink, generation_index
from sinks.redis import RedisSink, checkpoint_key, versions_key


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def rsink(redis_url: str) -> Iterator[RedisSink]:
    sink = RedisSink("cache", redis_url)
    yield sink
    for view in list(sink._targets):
        sink.drop_view(view)
    sink.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def hview(rsink: RedisSink) -> str:
    view = _name("t_hash")
    rsink.register(ViewTarget(view, format="hash"))
    return view


@pytest.fixture
def jview(rsink: RedisSink) -> str:
    view = _name("t_json")
    rsink.register(ViewTarget(view, format="json"))
    return view


@pytest.fixture
def ossink(opensearch_hosts: list[str]) -> Iterator[OpenSearchSink]:
    sink = OpenSearchSink("search", opensearch_hosts)
    yield sink
    for view in list(sink._targets):
        sink.drop_view(view)
    sink.close()


@pytest.fixture
def osview(ossink: OpenSearchSink) -> str:
    view = _name("t_os")
    ossink.register(ViewTarget(view, index=f"pgd-test-{uuid.uuid4().hex[:10]}"))
    return view


def _k(view: str, i: int) -> str:
    return f"{view}:{i}"


# --- Redis ----------------------------------------------------------------------------------


def test_redis_hash_upserts_read_back_with_encoded_values(rsink, rclient, hview):
    doc = {"s": "x y", "i": -42, "f": 0.1, "b": True, "b2": False, "j": {"a": [1, 2]}, "n": None}
    rsink.apply([Op(hview, _k(hview, 1), 100, doc), Op(hview, _k(hview, 2), 100, {"i": 7})])
    assert rclient.hgetall(_k(hview, 1)) == {
        b"s": b"x y", b"i": b"-42", b"f": b"0.1", b"b": b"true", b"b2": b"false",
        b"j": b'{"a":[1,2]}',
    }
    assert dict(rsink.scan(hview)) == {
        _k(hview, 1): {"s": "x y", "i": "-42", "f": "0.1", "b": "true", "b2": "false",
                       "j": '{"a":[1,2]}'},
        _k(hview, 2): {"i": "7"},
    }
    assert rsink.count(hview) == 2
    assert rclient.hget(versions_key(hview), _k(hview, 1)) == b"%016x" % 100


def test_redis_json_upserts_read_back(rsink, rclient, jview):
    rsink.apply([Op(jview, _k(jview, 1), 5, {"a": 1, "b": [True, None], "c": "é"})])
    assert rclient.get(_k(jview, 1)) == '{"a":1,"b":[true,null],"c":"é"}'.encode()
    assert list(rsink.scan(jview)) == [(_k(jview, 1), {"a": 1, "b": [True, None], "c": "é"})]


def test_redis_replay_leaves_state_unchanged(rsink, hview):
    ops = [Op(hview, _k(hview, i), 1000 + i, {"v": i}) for i in range(50)]
    ops += [Op(hview, _k(hview, 3), 2000, None), Op(hview, _k(hview, 4), 2001, {"v": "new"})]
    rsink.apply(ops)
    before = dict(rsink.scan(hview))
    rsink.apply(ops)
    rsink.apply(ops[10:])  # any suffix
    assert dict(rsink.scan(hview)) == before  # equal versions re-apply the same values
    assert rsink.count(hview) == 49


@pytest.mark.parametrize("fmt", ["hash", "json"])
def test_redis_older_op_after_newer_is_ignored(rsink, fmt):
    view = _name(f"t_{fmt}")
    rsink.register(ViewTarget(view, format=fmt))
    key = _k(view, 1)
    rsink.apply([Op(view, key, 200, {"v": "new"})])
    rsink.apply([Op(view, key, 199, {"v": "old"})])
    # also inside one batch, newer first
    rsink.apply([Op(view, _k(view, 2), 20, {"v": "new"}), Op(view, _k(view, 2), 10, {"v": "old"})])
    expect = {"v": "new"}
    assert dict(rsink.scan(view)) == {key: expect, _k(view, 2): expect}


def test_redis_versions_compare_exactly_above_2_pow_53(rsink, hview):
    base = 2**60 + 1  # 2**60 and 2**60 + 1 are the same double
    key = _k(hview, 1)
    rsink.apply([Op(hview, key, base, {"v": "new"})])
    rsink.apply([Op(hview, key, base - 1, {"v": "old"})])
    assert dict(rsink.scan(hview)) == {key: {"v": "new"}}
    rsink.apply([Op(hview, key, base + 1, {"v": "newer"})])
    assert dict(rsink.scan(hview)) == {key: {"v": "newer"}}


def test_redis_delete_leaves_tombstone_that_blocks_older_upsert(rsink, rclient, hview):
    key = _k(hview, 1)
    rsink.apply([Op(hview, key, 10, {"v": 1}), Op(hview, _k(hview, 2), 10, {"v": 2})])
    rsink.apply([Op(hview, key, 30, None)])
    assert rclient.exists(key) == 0
    assert rclient.hget(versions_key(hview), key) == b"%016xd" % 30
    rsink.apply([Op(hview, key, 20, {"v": "zombie"})])
    assert rclient.exists(key) == 0
    assert dict(rsink.scan(hview)) == {_k(hview, 2): {"v": "2"}}
    assert rsink.count(hview) == 1
    rsink.apply([Op(hview, key, 31, {"v": "back"})])  # a newer insert does come back
    assert rsink.count(hview) == 2


def test_redis_full_upsert_removes_fields_that_became_null(rsink, rclient, hview):
    key = _k(hview, 1)
    rsink.apply([Op(hview, key, 1, {"a": 1, "b": "x", "c": 3})])
    rsink.apply([Op(hview, key, 2, {"a": 1, "b": None, "c": 4})])
    assert rclient.hgetall(key) == {b"a": b"1", b"c": b"4"}


def test_redis_partial_update_keeps_other_fields(rsink, rclient, hview):
    key = _k(hview, 1)
    rsink.apply([Op(hview, key, 1, {"a": 1, "big": "toast" * 100, "c": 3})])
    rsink.apply([Op(hview, key, 2, {"a": 2, "c": None}, partial=True)])
    assert rclient.hgetall(key) == {b"a": b"2", b"big": b"toast" * 100}
    rsink.apply([Op(hview, key, 1, {"a": 9}, partial=True)])  # older: ignored
    assert rclient.hget(key, "a") == b"2"


def test_redis_partial_update_of_missing_record_is_skipped(rsink, rclient, hview):
    rsink.apply([Op(hview, _k(hview, 1), 5, {"a": 1}, partial=True)])
    rsink.apply([Op(hview, _k(hview, 2), 5, None), Op(hview, _k(hview, 2), 6, {"a": 1}, partial=True)])
    assert rsink.count(hview) == 0
    assert rclient.exists(_k(hview, 1), _k(hview, 2)) == 0
    assert rsink.stats["partial_missed"] == 2


BIG = "toast-" * 20_000  # 100 kB: TOASTed in Postgres, so absent from wal2json updates


def test_redis_json_partial_update_merges_into_stored_record(rsink, rclient, jview):
    key, other = _k(jview, 1), _k(jview, 2)
    rsink.apply([Op(jview, key, 10, {"a": 1, "big": BIG, "c": 3}),
                 Op(jview, other, 10, {"a": 0})])
    assert rsink.apply([Op(jview, key, 11, {"a": 2, "c": None}, partial=True)]) == []
    assert dict(rsink.scan(jview))[key] == {"a": 2, "big": BIG, "c": None}
    assert rclient.hget(versions_key(jview), key) == b"%016x" % 11
    stats = dict(rsink.stats)
    rsink.apply([Op(jview, key, 11, {"a": 8}, partial=True),    # equal version: same txn, later
                 Op(jview, key, 9, {"a": 9}, partial=True)])    # older: ignored
    assert dict(rsink.scan(jview))[key]["a"] == 8
    assert rsink.stats["skipped"] == stats["skipped"] + 1
    # one batch: a full upsert of one key, several partials of another (any order), a delete
    rsink.apply([Op(jview, key, 14, {"c": "last"}, partial=True),
                 Op(jview, other, 12, {"a": 5, "big": "b"}),
                 Op(jview, key, 12, {"a": 3, "c": "first"}, partial=True),
                 Op(jview, other, 13, {"a": 6}, partial=True)])
    assert dict(rsink.scan(jview)) == {key: {"a": 3, "big": BIG, "c": "last"},
                                       other: {"a": 6, "big": "b"}}
    assert rclient.hget(versions_key(jview), key) == b"%016x" % 14


def test_redis_json_partial_update_of_missing_record_is_skipped(rsink, rclient, jview):
    rsink.apply([Op(jview, _k(jview, 2), 5, None)])
    rsink.apply([Op(jview, _k(jview, 1), 5, {"a": 1}, partial=True),
                 Op(jview, _k(jview, 2), 6, {"a": 1}, partial=True)])  # deleted at 5
    assert rsink.count(jview) == 0
    assert rclient.exists(_k(jview, 1), _k(jview, 2)) == 0
    assert rclient.hget(versions_key(jview), _k(jview, 1)) is None
    assert rsink.stats["partial_missed"] == 2


def test_redis_unencodable_documents_are_rejected_and_neighbours_applied(rsink, hview, jview):
    bad_json = Op(jview, _k(jview, 1), 5, {"s": {1, 2}})
    bad_partial = Op(jview, _k(jview, 2), 6, {"s": {3}}, partial=True)
    bad_hash = Op(hview, _k(hview, 1), 5, {"j": {"x": {1}}})
    rejected = rsink.apply([bad_json, Op(jview, _k(jview, 2), 5, {"s": "ok"}), bad_partial,
                            bad_hash, Op(hview, _k(hview, 2), 5, {"j": "ok"})])
    assert sorted((r.op.key, type(r)) for r in rejected) == sorted(
        (op.key, Rejected) for op in (bad_json, bad_partial, bad_hash))
    assert all(r.op in (bad_json, bad_partial, bad_hash) for r in rejected)
    assert all("serializable" in r.error for r in rejected)
    assert dict(rsink.scan(jview)) == {_k(jview, 2): {"s": "ok"}}
    assert dict(rsink.scan(hview)) == {_k(hview, 2): {"j": "ok"}}


def test_redis_foreign_key_type_is_rejected_and_neighbours_applied(rsink, rclient, hview):
    foreign = _k(hview, 1)
    rclient.set(foreign, "not a hash")
    try:
        rejected = rsink.apply([Op(hview, foreign, 5, {"a": 1}),
                                Op(hview, _k(hview, 2), 5, {"a": 2})])
        assert [(r.op.key, "WRONGTYPE" in r.error) for r in rejected] == [(foreign, True)]
        assert "WRONGTYPE" in str(rejected[0]) and hview in str(rejected[0])
        assert rclient.get(foreign) == b"not a hash"
        assert rclient.hget(versions_key(hview), foreign) is None
        assert dict(rsink.scan(hview)) == {_k(hview, 2): {"a": "2"}}
    finally:
        rclient.delete(foreign)


def test_redis_checkpoints_move_forward_only(rsink, rclient, hview, jview):
    assert rsink.read_checkpoint(hview) is None
    rsink.write_checkpoint([hview, jview], 0x16_B374_D848)
    assert rsink.read_checkpoint(hview) == rsink.read_checkpoint(jview) == 0x16_B374_D848
    assert rclient.get(checkpoint_key(hview)) == b"00000016b374d848"
    rsink.write_checkpoint([hview], 0x16_0000_0000)  # older: kept
    assert rsink.read_checkpoint(hview) == 0x16_B374_D848
    rsink.write_checkpoint([hview], 2**60 + 1)
    rsink.write_checkpoint([hview], 2**60)  # same double as 2**60 + 1: still exact
    assert rsink.read_checkpoint(hview) == 2**60 + 1
    rsink.write_checkpoint([], 5)  # nothing to do
    gen = rsink.begin_generation(hview, 2**61)
    rsink.commit_generation(hview, gen, 2**61)  # does not touch the checkpoint
    assert rsink.read_checkpoint(hview) == 2**60 + 1
    rsink.drop_view(hview)
    assert rsink.read_checkpoint(hview) is None and rclient.exists(checkpoint_key(hview)) == 0
    assert rsink.read_checkpoint(jview) == 0x16_B374_D848


def test_redis_generation_commit_sweeps_stale_keys(rsink, rclient, hview):
    live = [Op(hview, _k(hview, i), 100, {"v": "old"}) for i in range(10)]
    live.append(Op(hview, _k(hview, 50), 100, None))  # old tombstone
    rsink.apply(live)
    x = 500  # the snapshot's consistent point
    gen = rsink.begin_generation(hview, x)
    rsink.apply([Op(hview, _k(hview, 1), 600, {"v": "stream"}),   # stream beats the snapshot
                 Op(hview, _k(hview, 2), 601, None)])             # deleted after X
    rsink.load(hview, gen, [Op(hview, _k(hview, i), x, {"v": "snap"}) for i in (0, 1, 2, 3, 20)])
    rsink.commit_generation(hview, gen, x)
    assert dict(rsink.scan(hview)) == {
        _k(hview, 0): {"v": "snap"}, _k(hview, 1): {"v": "stream"},
        _k(hview, 3): {"v": "snap"}, _k(hview, 20): {"v": "snap"},
    }
    assert rclient.exists(*[_k(hview, i) for i in range(4, 10)]) == 0
    versions = rclient.hgetall(versions_key(hview))
    assert _k(hview, 50).encode() not in versions  # old tombstone swept
    assert versions[_k(hview, 2).encode()] == b"%016xd" % 601  # newer tombstone kept


def _hscans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hscan", {}).get("calls", 0))


def test_redis_first_generation_commits_without_a_sweep(rsink, rclient, hview):
    """A generation begun on an empty view has nothing older to sweep: its commit reads no
    version entry (5M of them took 5.6 s); a later generation and a TRUNCATE still sweep."""
    x = 500
    gen = rsink.begin_generation(hview, x)
    rsink.load(hview, gen, [Op(hview, _k(hview, i), x, {"v": "snap"}) for i in range(5)])
    before = _hscans(rclient)
    rsink.commit_generation(hview, gen, x)
    assert _hscans(rclient) == before
    assert len(dict(rsink.scan(hview))) == 5
    gen = rsink.begin_generation(hview, 600)  # populated now: the commit sweeps
    rsink.load(hview, gen, [Op(hview, _k(hview, i), 600, {"v": "snap2"}) for i in (1, 2)])
    rsink.commit_generation(hview, gen, 600)
    assert _hscans(rclient) > before
    assert dict(rsink.scan(hview)) == {_k(hview, 1): {"v": "snap2"}, _k(hview, 2): {"v": "snap2"}}
    rsink.truncate(hview, 700)
    assert dict(rsink.scan(hview)) == {}


def test_redis_drop_view_removes_records_and_versions(rsink, rclient, hview):
    rsink.apply([Op(hview, _k(hview, i), 1, {"v": i}) for i in range(5)])
    rsink.drop_view(hview)
    assert rclient.exists(versions_key(hview), *[_k(hview, i) for i in range(5)]) == 0
    assert rsink.count(hview) == 0


def test_redis_unregistered_view_and_connection_errors():
    sink = RedisSink("cache", "redis://127.0.0.1:1/0")
    with pytest.raises(SinkError) as ei:
        sink.apply([Op("nope", "k", 1, {"a": 1})])
    assert ei.value.retryable is False
    sink.register(ViewTarget("v", format="hash"))
    with pytest.raises(SinkError) as ei:
        sink.apply([Op("v", "k", 1, {"a": 1})])
    assert ei.value.retryable is True
    sink.close()


def test_redis_throughput_sanity(rsink, hview):
    n = 100_000
    ops = [Op(hview, _k(hview, i), 1000 + i // 10, {"aid": i, "bid": i % 10, "abalance": -5,
                                                   "filler": "x" * 20}) for i in range(n)]
    t = time.perf_counter()
    rsink.apply(ops)
    dt = time.perf_counter() - t
    print(f"\nRedis: {n} hash upserts in {dt:.2f}s = {n / dt:,.0f} ops/s")
    assert rsink.count(hview) == n


# --- OpenSearch -----------------------------------------------------------------------------


def _docs(sink: OpenSearchSink, view: str) -> dict[str, dict]:
    sink.refresh(view)
    return dict(sink.scan(view))


def test_opensearch_upserts_read_back_and_alias_exists(ossink, osview):
    ossink.apply([Op(osview, "1", 10, {"a": 1, "s": "x"}), Op(osview, "2", 10, {"a": 2})])
    assert _docs(ossink, osview) == {"1": {"a": 1, "s": "x"}, "2": {"a": 2}}
    assert ossink.count(osview) == 2
    alias = ossink._alias(osview)
    assert list(ossink._client.indices.get_alias(name=alias)) == [generation_index(alias, 0)]


def test_opensearch_replay_and_same_version_conflicts_count_as_success(ossink, osview):
    ops = [Op(osview, str(i), 100 + i, {"v": i}) for i in range(20)]
    ops.append(Op(osview, "5", 300, None))
    ossink.apply(ops)
    before = _docs(ossink, osview)
    ossink.apply(ops)  # every item is a 409 (or a 404 delete): success
    ossink.apply(ops[7:])
    assert _docs(ossink, osview) == before
    assert len(before) == 19


def test_opensearch_older_op_after_newer_is_ignored(ossink, osview):
    ossink.apply([Op(osview, "1", 200, {"v": "new"})])
    ossink.apply([Op(osview, "1", 199, {"v": "old"})])
    ossink.apply([Op(osview, "2", 20, {"v": "new"}), Op(osview, "2", 10, {"v": "old"})])
    assert _docs(ossink, osview) == {"1": {"v": "new"}, "2": {"v": "new"}}


def test_opensearch_delete_then_older_upsert_does_not_resurrect(ossink, osview):
    ossink.apply([Op(osview, "1", 10, {"v": "one"}), Op(osview, "2", 10, {"v": "two"})])
    ossink.apply([Op(osview, "1", 30, None), Op(osview, "missing", 30, None)])
    ossink.apply([Op(osview, "1", 20, {"v": "zombie"})])
    assert _docs(ossink, osview) == {"2": {"v": "two"}}


def test_opensearch_rejected_document_is_returned_and_neighbours_land(ossink, osview):
    assert ossink.apply([Op(osview, "good", 1, {"n": 1})]) == []  # maps n as long
    bad = Op(osview, "bad-1", 2, {"n": "abc"})
    unencodable = Op(osview, "bad-2", 2, {"n": {1}})
    rejected = ossink.apply([Op(osview, "good2", 2, {"n": 2}), bad, unencodable,
                             Op(osview, "good3", 2, {"n": 3})])
    assert [r.op for r in rejected] == [unencodable, bad]
    assert "not JSON-encodable" in rejected[0].error
    assert "mapper_parsing_exception" in rejected[1].error
    assert "bad-1" in str(rejected[1]) and osview in str(rejected[1])
    assert _docs(ossink, osview) == {"good": {"n": 1}, "good2": {"n": 2}, "good3": {"n": 3}}


def test_opensearch_small_bulk_requests_still_land_everything(opensearch_hosts, osview):
    sink = OpenSearchSink("search", opensearch_hosts, bulk_bytes=1)  # one action per request
    sink.register(ViewTarget(osview, index=f"pgd-test-{uuid.uuid4().hex[:10]}"))
    try:
        rejected = sink.apply([Op(osview, str(i), 5, {"n": i}) for i in range(5)]
                              + [Op(osview, "x", 5, {"n": "abc"})])
        assert [r.op.key for r in rejected] == ["x"]
        assert _docs(sink, osview) == {str(i): {"n": i} for i in range(5)}
    finally:
        sink.drop_view(osview)
        sink.close()


def test_opensearch_concurrent_bulk_requests_land_everything_and_report_rejects_in_order(
        opensearch_hosts, osview, caplog):
    """Requests of one call are sent 4 at a time, each on a kept-alive connection: every good
    document lands, every refused one is reported once, in the order of the Ops."""
    sink = OpenSearchSink("search", opensearch_hosts, bulk_docs=7, bulk_concurrency=4)
    sink.register(ViewTarget(osview, index=f"pgd-test-{uuid.uuid4().hex[:10]}"))
    try:
        assert sink.apply([Op(osview, "seed", 1, {"n": 0})]) == []  # maps n as long
        ops = [Op(osview, str(i), 5, {"n": "abc"} if i % 37 == 3 else {"n": i}) for i in range(300)]
        with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
            rejected = sink.apply(ops)
        assert not [m for m in caplog.messages if "pool is full" in m]  # no reconnect per request
        assert [r.op.key for r in rejected] == [str(i) for i in range(300) if i % 37 == 3]
        expected = {str(i): {"n": i} for i in range(300) if i % 37 != 3}
        assert _docs(sink, osview) == {"seed": {"n": 0}, **expected}
    finally:
        sink.drop_view(osview)
        sink.close()


def test_opensearch_partial_update_merges_into_stored_document(ossink, osview):
    ossink.apply([Op(osview, "1", 10, {"a": 1, "big": BIG, "c": "3"}),
                  Op(osview, "2", 10, {"a": 0})])
    assert ossink.apply([Op(osview, "1", 11, {"a": 2, "c": None}, partial=True)]) == []
    assert _docs(ossink, osview)["1"] == {"a": 2, "big": BIG, "c": None}
    ossink.apply([Op(osview, "1", 11, {"a": 8}, partial=True),  # equal version: replay
                  Op(osview, "1", 9, {"a": 9}, partial=True)])  # older
    # one batch: a full upsert, several partials of one key, a partial of a missing doc
    assert ossink.apply([Op(osview, "1", 14, {"c": "last"}, partial=True),
                         Op(osview, "2", 12, {"a": 5, "big": "b"}),
                         Op(osview, "1", 12, {"a": 3, "c": "first"}, partial=True),
                         Op(osview, "2", 13, {"a": 6}, partial=True),
                         Op(osview, "gone", 13, {"a": 6}, partial=True)]) == []
    assert _docs(ossink, osview) == {"1": {"a": 3, "big": BIG, "c": "last"},
                                     "2": {"a": 6, "big": "b"}}
    assert ossink.stats["partial_missed"] == 1
    got = ossink._client.get(index=ossink._alias(osview), id="1")
    assert got["_version"] == 14


def test_opensearch_partial_update_reaches_the_generation_being_loaded(ossink, osview):
    ossink.apply([Op(osview, "1", 100, {"a": 1, "big": BIG})])
    x = 500
    gen = ossink.begin_generation(osview, x)
    ossink.apply([Op(osview, "1", 600, {"a": 2}, partial=True)])  # before the snapshot row
    ossink.load(osview, gen, [Op(osview, "1", x, {"a": 1, "big": BIG})])  # older: 409
    ossink.commit_generation(osview, gen, x)
    assert _docs(ossink, osview) == {"1": {"a": 2, "big": BIG}}


def test_opensearch_partial_update_of_missing_document_is_skipped(ossink, osview):
    ossink.apply([Op(osview, "1", 5, None)])
    assert ossink.apply([Op(osview, "1", 6, {"a": 1}, partial=True),
                         Op(osview, "2", 6, {"a": 1}, partial=True)]) == []
    assert ossink.count(osview) == 0
    assert ossink.stats["partial_missed"] == 2


def test_opensearch_checkpoints_move_forward_only(ossink, osview):
    other = _name("t_os_other")
    assert ossink.read_checkpoint(osview) is None
    try:
        ossink.write_checkpoint([osview, other], 0x16_B374_D848)
        # realtime GET: visible before any refresh
        assert ossink.read_checkpoint(osview) == ossink.read_checkpoint(other) == 0x16_B374_D848
        ossink.write_checkpoint([osview], 0x16_0000_0000)  # older: 409, kept
        assert ossink.read_checkpoint(osview) == 0x16_B374_D848
        ossink.write_checkpoint([osview], 2**60 + 1)
        assert ossink.read_checkpoint(osview) == 2**60 + 1
        settings = ossink._client.indices.get_settings(index=CHECKPOINT_INDEX)
        index_settings = settings[CHECKPOINT_INDEX]["settings"]["index"]
        shards = (index_settings["number_of_shards"], index_settings["number_of_replicas"])
        assert shards == ("1", "0")
        alias = ossink._alias(osview)
        ossink.apply([Op(osview, "1", 10, {"a": 1})])
        gen = ossink.begin_generation(osview, 2**61)
        ossink.commit_generation(osview, gen, 2**61)  # does not touch the checkpoint
        assert ossink.read_checkpoint(osview) == 2**60 + 1
        ossink.drop_view(osview)
        assert ossink.read_checkpoint(osview) is None
        assert not ossink._client.indices.exists_alias(name=alias)
        assert ossink.read_checkpoint(other) == 0x16_B374_D848
    finally:
        ossink._client.delete(index=CHECKPOINT_INDEX, id=other, ignore=[404])


def test_opensearch_generation_commit_swaps_alias_and_deletes_old_index(ossink, osview):
    alias = ossink._alias(osview)
    client = ossink._client
    ossink.apply([Op(osview, str(i), 100, {"v": "old"}) for i in range(5)])
    x = 0x1_0000_0500
    gen = ossink.begin_generation(osview, x)
    assert gen == generation_index(alias, x) == f"{alias}-g0000000100000500"
    assert ossink.begin_generation(osview, x) == gen  # reuse an existing generation index
    # the live stream keeps writing both generations while the load runs
    ossink.apply([Op(osview, "1", x + 10, {"v": "stream"}), Op(osview, "2", x + 11, None)])
    ossink.load(osview, gen, [Op(osview, str(i), x, {"v": "snap"}) for i in (0, 1, 2, 3, 9)])
    assert list(client.indices.get_alias(name=alias)) == [generation_index(alias, 0)]
    ossink.commit_generation(osview, gen, x)
    assert list(client.indices.get_alias(name=alias)) == [gen]
    assert not client.indices.exists(index=generation_index(alias, 0))
    assert _docs(ossink, osview) == {
        "0": {"v": "snap"}, "1": {"v": "stream"}, "3": {"v": "snap"}, "9": {"v": "snap"},
    }
    settings = client.indices.get_settings(index=gen)[gen]["settings"]["index"]
    assert "gc_deletes" not in settings  # back to the default once live
    ossink.apply([Op(osview, "0", x + 20, {"v": "after"})])
    assert _docs(ossink, osview)["0"] == {"v": "after"}


def test_opensearch_refuses_a_legacy_concrete_index(ossink, osview):
    alias = ossink._alias(osview)
    ossink._client.indices.create(index=alias)
    try:
        with pytest.raises(SinkError, match="concrete index") as ei:
            ossink.apply([Op(osview, "1", 1, {"a": 1})])
        assert ei.value.retryable is False
        with pytest.raises(SinkError, match="concrete index"):
            ossink.begin_generation(osview, 5)
    finally:
        ossink._client.indices.delete(index=alias)


def test_opensearch_connection_error_is_retryable():
    sink = OpenSearchSink("search", ["http://127.0.0.1:1"])
    sink._client.transport.max_retries = 0
    sink.register(ViewTarget("v", index="pgd-test-unreachable"))
    with pytest.raises(SinkError) as ei:
        sink.apply([Op("v", "1", 1, {"a": 1})])
    assert ei.value.retryable is True
    sink.close()


def test_opensearch_throughput_sanity(ossink, osview):
    n = 20_000
    ops = [Op(osview, str(i), 1000 + i // 10, {"aid": i, "bid": i % 10, "abalance": -5,
                                               "filler": "x" * 20}) for i in range(n)]
    t = time.perf_counter()
    ossink.apply(ops)
    dt = time.perf_counter() - t
    print(f"\nOpenSearch: {n} index actions in {dt:.2f}s = {n / dt:,.0f} ops/s")
    assert ossink.count(osview) == n


# --- factory --------------------------------------------------------------------------------


def test_make_sink(redis_url, opensearch_hosts):
    r = make_sink("cache", {"type": "redis", "url": redis_url})
    o = make_sink("search", {"type": "opensearch", "hosts": opensearch_hosts})
    assert isinstance(r, RedisSink) and r.name == "cache"
    assert isinstance(o, OpenSearchSink) and o.name == "search"
    r.close()
    o.close()
    from sinks.kafka import KafkaSink
    k = make_sink("log", {"type": "kafka", "bootstrap_servers": "127.0.0.1:9093", "topic_prefix": "t"})
    assert isinstance(k, KafkaSink) and k.name == "log" and k.checkpoints_topic == "t._checkpoints"
    k.close()
    with pytest.raises(ValueError, match="'weird'.*'pulsar'.*expected 'redis', 'opensearch' or 'kafka'"):
        make_sink("weird", {"type": "pulsar"})


@pytest.mark.parametrize("which", ["redis", "opensearch"])
def test_advance_checkpoint_reports_lost_views(which, rsink, ossink):
    sink = rsink if which == "redis" else ossink
    a, b = _name("cka"), _name("ckb")
    for v in (a, b):
        sink.register(ViewTarget(v, format="hash") if which == "redis" else ViewTarget(v, index=f"pgd-test-{v.lower()}"))
    try:
        sink.write_checkpoint([a, b], 100)
        assert sink.advance_checkpoint([a, b], 100, 200) == []
        assert sink.read_checkpoint(a) == 200 and sink.read_checkpoint(b) == 200
        sink.drop_view(b)  # b's data (and checkpoint) lost
        assert sink.advance_checkpoint([a, b], 200, 300) == [b]
        assert sink.read_checkpoint(a) == 300 and sink.read_checkpoint(b) is None
    finally:
        sink.drop_view(a)
        sink.drop_view(b)


def test_opensearch_truncate_below_keeps_newer_documents_and_refuses_older_writes(ossink, osview):
    ossink.apply([Op(osview, "1", 10, {"v": 1}), Op(osview, "2", 20, {"v": 2}), Op(osview, "3", 30, {"v": 3})])
    index_before = ossink.locate(osview, ["3"])["3"]
    ossink.truncate_below(osview, 20)  # a worker's TRUNCATE at 20: the write at 20 (a reload) stays
    ossink.refresh(osview)
    assert dict(ossink.scan(osview)) == {"2": {"v": 2}, "3": {"v": 3}}
    assert ossink.locate(osview, ["3"])["3"] == index_before  # no index was replaced
    ossink.truncate_below(osview, 20)  # another partition's TRUNCATE record: idempotent
    ossink.apply([Op(osview, "1", 15, {"v": "older than the truncate"})])  # refused by the tombstone
    ossink.refresh(osview)
    assert ossink.count(osview) == 2
