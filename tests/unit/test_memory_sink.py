"""MemorySink: the sink contract (versions, tombstones, partial Ops, generations, truncate,
checkpoints) and its test hooks. No services needed.

The contract tests take a ``sink`` fixture: MemorySink always, and the real RedisSink (``hash``
and ``json`` views) when ``PGDERIVE_CONTRACT_REDIS=1`` (Redis at PGDERIVE_TEST_REDIS_URL or
redis://127.0.0.1:6380/0), to show both keep the same contract. Documents are compared through
``stored_form`` and contain no ``None`` fields (Redis hashes drop them, MemorySink keeps them).
"""
from __future__ import annotations

import os
import threading
import uuid
from importlib import resources
from typing import Callable, Iterator

import pytest

from sinks.base import AtomicCheckpoint, Op, Refreshable, Rejected, Sink, SinkError, ViewTarget, WireLoad
from sinks.memory import MemorySink

CONTRACT_SINKS = ["memory"]
if os.environ.get("PGDERIVE_CONTRACT_REDIS") == "1":
    CONTRACT_SINKS += ["redis-hash", "redis-json"]


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=CONTRACT_SINKS)
def sink(request: pytest.FixtureRequest) -> Iterator[Sink]:
    made: Sink
    if request.param == "memory":
        made = MemorySink("cache")
    else:
        from sinks.redis import RedisSink

        made = RedisSink("cache", os.environ.get("PGDERIVE_TEST_REDIS_URL", "redis://127.0.0.1:6380/0"))
    yield made
    made.close()


@pytest.fixture
def register(sink: Sink, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``register(prefix)`` registers a new view (hash format, json for "redis-json")."""
    fmt = "json" if request.node.callspec.params["sink"] == "redis-json" else "hash"
    views: list[str] = []

    def reg(prefix: str = "v") -> str:
        views.append(_name(prefix))
        sink.register(ViewTarget(views[-1], format=fmt))
        return views[-1]
    yield reg
    for v in views:
        sink.drop_view(v)


@pytest.fixture
def view(register) -> str:
    return register()


def _k(view: str, i: int) -> str:
    return f"{view}:{i}"


def _state(sink: Sink, view: str) -> dict[str, dict]:
    return dict(sink.scan(view))


def _form(sink: Sink, view: str, docs: dict[str, dict]) -> dict[str, dict]:
    return {k: sink.stored_form(view, d) for k, d in docs.items()}


# --- contract -------------------------------------------------------------------------------


def test_replay_leaves_state_unchanged(sink, view):
    ops = [Op(view, _k(view, i), 1000 + i, {"v": i}) for i in range(50)]
    ops += [Op(view, _k(view, 3), 2000, None), Op(view, _k(view, 4), 2001, {"v": "new"})]
    assert sink.apply(ops) == []
    before = _state(sink, view)
    sink.apply(ops)
    sink.apply(ops[10:])  # any suffix
    assert _state(sink, view) == before
    assert sink.count(view) == 49
    assert before[_k(view, 4)] == sink.stored_form(view, {"v": "new"})


def test_older_op_after_newer_is_ignored(sink, view):
    key = _k(view, 1)
    sink.apply([Op(view, key, 200, {"v": "new"})])
    sink.apply([Op(view, key, 199, {"v": "old"})])
    sink.apply([Op(view, _k(view, 2), 20, {"v": "new"}), Op(view, _k(view, 2), 10, {"v": "old"})])
    assert _state(sink, view) == _form(sink, view, {key: {"v": "new"}, _k(view, 2): {"v": "new"}})


def test_equal_version_reapplies_in_order(sink, view):
    key = _k(view, 1)
    sink.apply([Op(view, key, 7, {"v": "first"}), Op(view, key, 7, {"v": "second"})])
    assert _state(sink, view) == _form(sink, view, {key: {"v": "second"}})


def test_versions_compare_exactly_above_2_pow_53(sink, view):
    base = 2**60 + 1  # 2**60 and 2**60 + 1 are the same double
    key = _k(view, 1)
    sink.apply([Op(view, key, base, {"v": "new"})])
    sink.apply([Op(view, key, base - 1, {"v": "old"})])
    assert _state(sink, view) == _form(sink, view, {key: {"v": "new"}})
    sink.apply([Op(view, key, base + 1, {"v": "newer"})])
    assert _state(sink, view) == _form(sink, view, {key: {"v": "newer"}})
    assert sink.get(view, [key])[key][1] == base + 1


def test_delete_leaves_tombstone_that_blocks_older_upsert(sink, view):
    key = _k(view, 1)
    sink.apply([Op(view, key, 10, {"v": 1}), Op(view, _k(view, 2), 10, {"v": 2})])
    sink.apply([Op(view, key, 30, None)])
    assert sink.get(view, [key]) == {key: (None, 30)}
    sink.apply([Op(view, key, 20, {"v": "zombie"})])
    assert _state(sink, view) == _form(sink, view, {_k(view, 2): {"v": 2}})
    assert sink.count(view) == 1
    assert sorted(sink.scan_keys(view)) == [(_k(view, 2), 10)]
    sink.apply([Op(view, key, 31, {"v": "back"})])  # a newer insert does come back
    assert sink.count(view) == 2


def test_full_upsert_replaces_the_record(sink, view):
    key = _k(view, 1)
    sink.apply([Op(view, key, 1, {"a": 1, "b": "x", "c": 3})])
    sink.apply([Op(view, key, 2, {"a": 1, "c": 4})])
    assert _state(sink, view) == _form(sink, view, {key: {"a": 1, "c": 4}})


def test_partial_update_merges_into_the_stored_record(sink, view):
    key = _k(view, 1)
    sink.apply([Op(view, key, 1, {"a": 1, "big": "toast" * 100, "c": 3})])
    assert sink.apply([Op(view, key, 2, {"a": 2, "c": 5}, partial=True)]) == []
    assert _state(sink, view) == _form(sink, view, {key: {"a": 2, "big": "toast" * 100, "c": 5}})
    sink.apply([Op(view, key, 1, {"a": 9}, partial=True)])  # older: ignored
    assert _state(sink, view)[key] == sink.stored_form(view, {"a": 2, "big": "toast" * 100, "c": 5})
    assert sink.get(view, [key])[key][1] == 2


def test_partial_ops_of_one_call_apply_after_full_ops_in_version_order(sink, view):
    key, other = _k(view, 1), _k(view, 2)
    sink.apply([Op(view, key, 10, {"a": 1, "big": "B", "c": 3}), Op(view, other, 10, {"a": 0})])
    sink.apply([Op(view, key, 14, {"c": "last"}, partial=True),
                Op(view, other, 12, {"a": 5, "big": "b"}),
                Op(view, key, 12, {"a": 3, "c": "first"}, partial=True),
                Op(view, other, 13, {"a": 6}, partial=True)])
    expect = {key: {"a": 3, "big": "B", "c": "last"}, other: {"a": 6, "big": "b"}}
    if getattr(sink, "_format", None) and sink._format(view) == "hash":
        # Redis hash views apply partial Ops in the given order (one Lua pass): key's v12 came
        # after its v14 and is older. The engine hands over Ops in commit order anyway.
        expect[key] = {"a": 1, "big": "B", "c": "last"}
    assert _state(sink, view) == _form(sink, view, expect)


def test_partial_update_of_missing_or_deleted_record_is_skipped(sink, view):
    missed = sink.stats["partial_missed"]
    sink.apply([Op(view, _k(view, 1), 5, {"a": 1}, partial=True)])
    sink.apply([Op(view, _k(view, 2), 5, None), Op(view, _k(view, 2), 6, {"a": 1}, partial=True)])
    assert sink.count(view) == 0
    assert sink.get(view, [_k(view, 1)]) == {_k(view, 1): (None, None)}
    assert sink.get(view, [_k(view, 2)]) == {_k(view, 2): (None, 5)}  # the tombstone stays
    assert sink.stats["partial_missed"] == missed + 2


def test_checkpoints_move_forward_only(sink, register):
    a, b = register("cka"), register("ckb")
    assert sink.read_checkpoint(a) is None
    sink.write_checkpoint([a, b], 0x16_B374_D848)
    assert sink.read_checkpoint(a) == sink.read_checkpoint(b) == 0x16_B374_D848
    sink.write_checkpoint([a], 0x16_0000_0000)  # older: kept
    assert sink.read_checkpoint(a) == 0x16_B374_D848
    sink.write_checkpoint([a], 2**60 + 1)
    sink.write_checkpoint([a], 2**60)
    assert sink.read_checkpoint(a) == 2**60 + 1
    sink.write_checkpoint([], 5)  # nothing to do
    gen = sink.begin_generation(a, 2**61)
    sink.commit_generation(a, gen, 2**61)  # does not touch the checkpoint
    assert sink.read_checkpoint(a) == 2**60 + 1
    sink.drop_view(a)
    assert sink.read_checkpoint(a) is None
    assert sink.read_checkpoint(b) == 0x16_B374_D848


def test_advance_checkpoint_reports_lost_views(sink, register):
    a, b = register("cka"), register("ckb")
    sink.write_checkpoint([a, b], 100)
    assert sink.advance_checkpoint([a, b], 100, 200) == []
    assert sink.read_checkpoint(a) == 200 and sink.read_checkpoint(b) == 200
    assert sink.advance_checkpoint([a], 100, 150) == []  # behind lsn already: kept
    assert sink.read_checkpoint(a) == 200
    sink.drop_view(b)  # b's data (and checkpoint) lost
    assert sink.advance_checkpoint([a, b], 200, 300) == [b]
    assert sink.read_checkpoint(a) == 300 and sink.read_checkpoint(b) is None
    sink.write_checkpoint([b], 250)
    assert sink.advance_checkpoint([a, b], 300, 400) == [b]  # behind previous
    assert sink.read_checkpoint(b) == 250


def test_apply_and_advance_applies_then_moves_checkpoints(sink, register):
    if not isinstance(sink, AtomicCheckpoint):
        pytest.skip("sink has no apply_and_advance")
    a, b = register("aa"), register("ab")
    sink.write_checkpoint([a, b], 0x100)
    rejected, lost = sink.apply_and_advance([Op(a, _k(a, 1), 0x200, {"x": 1})], [a, b], 0x100, 0x200)
    assert (rejected, lost) == ([], [])
    assert _state(sink, a) == _form(sink, a, {_k(a, 1): {"x": 1}})
    assert sink.read_checkpoint(a) == sink.read_checkpoint(b) == 0x200
    sink.drop_view(b)
    rejected, lost = sink.apply_and_advance([Op(b, _k(b, 1), 0x300, {"x": 2})], [a, b], 0x200, 0x300)
    assert (rejected, lost) == ([], [b])
    assert sink.read_checkpoint(a) == 0x300 and sink.read_checkpoint(b) is None
    assert sink.count(b) == 1  # the Ops are applied all the same


def test_generation_commit_sweeps_stale_records_and_tombstones(sink, view):
    live = [Op(view, _k(view, i), 100, {"v": "old"}) for i in range(10)]
    live.append(Op(view, _k(view, 50), 100, None))  # old tombstone
    sink.apply(live)
    x = 500  # the snapshot's consistent point
    gen = sink.begin_generation(view, x)
    sink.apply([Op(view, _k(view, 1), 600, {"v": "stream"}),   # stream beats the snapshot
                Op(view, _k(view, 2), 601, None)])             # deleted after X
    sink.load(view, gen, [Op(view, _k(view, i), x, {"v": "snap"}) for i in (0, 1, 2, 3, 20)])
    sink.commit_generation(view, gen, x)
    assert _state(sink, view) == _form(sink, view, {
        _k(view, 0): {"v": "snap"}, _k(view, 1): {"v": "stream"},
        _k(view, 3): {"v": "snap"}, _k(view, 20): {"v": "snap"},
    })
    got = sink.get(view, [_k(view, 50), _k(view, 2), _k(view, 5)])
    assert got == {_k(view, 50): (None, None),  # old tombstone swept
                   _k(view, 2): (None, 601),    # newer tombstone kept
                   _k(view, 5): (None, None)}   # stale record swept


def test_load_refuses_ops_of_another_view(sink, register):
    a, b = register("la"), register("lb")
    gen = sink.begin_generation(a, 10)
    with pytest.raises(SinkError) as ei:
        sink.load(a, gen, [Op(b, "k", 10, {"x": 1})])
    assert ei.value.retryable is False


def test_truncate_drops_records_at_or_below_its_version(sink, view):
    sink.apply([Op(view, _k(view, 1), 10, {"v": 1}), Op(view, _k(view, 2), 20, {"v": 2}),
                Op(view, _k(view, 3), 30, {"v": 3}), Op(view, _k(view, 4), 15, None)])
    sink.truncate(view, 20)
    assert _state(sink, view) == _form(sink, view, {_k(view, 3): {"v": 3}})
    assert sink.get(view, [_k(view, 4)]) == {_k(view, 4): (None, None)}
    sink.truncate(view, 20)  # replay: idempotent
    assert sink.count(view) == 1
    sink.apply([Op(view, _k(view, 1), 10, {"v": "before the truncate"})])
    assert sink.count(view) == 2  # nothing remembers it was truncated: the stream is ordered


def test_truncate_below_keeps_records_at_or_above_its_version(sink, view):
    sink.apply([Op(view, _k(view, 1), 10, {"v": 1}), Op(view, _k(view, 2), 20, {"v": 2}),
                Op(view, _k(view, 3), 30, {"v": 3}), Op(view, _k(view, 4), 15, None)])
    sink.truncate_below(view, 20)  # a TRUNCATE at 20 (workers): the reload at 20 stays
    assert _state(sink, view) == _form(sink, view, {_k(view, 2): {"v": 2}, _k(view, 3): {"v": 3}})
    sink.truncate_below(view, 20)  # another partition's TRUNCATE record: idempotent
    assert sink.count(view) == 2


def test_unregistered_view_is_not_retryable(sink):
    with pytest.raises(SinkError) as ei:
        sink.apply([Op("nope_" + uuid.uuid4().hex, "k", 1, {"a": 1})])
    assert ei.value.retryable is False


# --- MemorySink specifics -------------------------------------------------------------------


@pytest.fixture
def mem() -> MemorySink:
    s = MemorySink("mem")
    s.register(ViewTarget("v"))
    return s


def test_memory_sink_keeps_documents_as_given(mem):
    doc = {"n": None, "f": 0.5, "j": {"a": [1, None]}, "b": True}
    mem.apply([Op("v", "k", 1, doc)])
    doc["j"]["a"].append(2)  # the caller's later changes do not leak in
    assert mem.records("v") == {"k": {"n": None, "f": 0.5, "j": {"a": [1, None]}, "b": True}}
    assert dict(mem.scan("v")) == mem.records("v")
    assert mem.stored_form("v", {"n": None}) == {"n": None}
    mem.apply([Op("v", "k", 2, {"f": None}, partial=True)])  # None is stored, not removed
    assert mem.records("v")["k"]["f"] is None
    assert mem.versions("v") == {"k": (2, False)}
    assert mem.stats["applied"] == 2


def test_memory_sink_satisfies_the_protocols():
    s = MemorySink()
    assert isinstance(s, Sink) and isinstance(s, AtomicCheckpoint)
    assert not isinstance(s, WireLoad) and not isinstance(s, Refreshable)


def test_redis_and_opensearch_sinks_declare_their_capabilities():
    from sinks.opensearch import OpenSearchSink
    from sinks.redis import RedisSink

    assert issubclass(RedisSink, AtomicCheckpoint) and issubclass(RedisSink, WireLoad)
    assert not issubclass(RedisSink, Refreshable)
    assert issubclass(OpenSearchSink, WireLoad) and issubclass(OpenSearchSink, Refreshable)
    assert not issubclass(OpenSearchSink, AtomicCheckpoint)


def test_redis_lua_scripts_are_package_data():
    from sinks import redis as rs

    names = sorted(p.name for p in resources.files("sinks").joinpath("redis_lua").iterdir()
                   if p.name.endswith(".lua"))
    assert names == ["adopt.lua", "advance.lua", "apply.lua", "apply_advance.lua", "checkpoint.lua", "claim.lua", "get.lua",
                     "lib_advance.lua", "lib_apply.lua", "lib_helpers.lua", "sweep.lua"]
    assert "local function apply(" in rs._APPLY_ADVANCE_LUA and "local function advance(" in rs._APPLY_ADVANCE_LUA
    assert rs._GET_LUA.startswith("-- get:")
    assert rs._ADOPT_LUA.startswith("-- adopt:")


def test_fail_next_raises_before_changing_anything(mem):
    mem.write_checkpoint(["v"], 100)
    mem.fail_next(2)
    for _ in range(2):
        with pytest.raises(SinkError) as ei:
            mem.apply_and_advance([Op("v", "k", 200, {"a": 1})], ["v"], 100, 200)
        assert ei.value.retryable is True
    assert mem.count("v") == 0 and mem.read_checkpoint("v") == 100
    assert mem.apply_and_advance([Op("v", "k", 200, {"a": 1})], ["v"], 100, 200) == ([], [])
    assert mem.read_checkpoint("v") == 200
    assert mem.calls["apply_and_advance"] == 3
    assert [m for m, _ in mem.batches] == ["apply_and_advance"]


def test_fail_next_can_target_other_methods_and_be_permanent(mem):
    mem.fail_next(1, methods=["write_checkpoint"], retryable=False, message="disk full")
    mem.apply([Op("v", "k", 1, {"a": 1})])  # not targeted
    with pytest.raises(SinkError, match="disk full") as ei:
        mem.write_checkpoint(["v"], 5)
    assert ei.value.retryable is False
    mem.write_checkpoint(["v"], 5)
    assert mem.read_checkpoint("v") == 5


def test_block_holds_writes_until_released_while_reads_go_on(mem):
    gate = mem.block()
    done: list[list[Rejected]] = []
    t = threading.Thread(target=lambda: done.append(mem.apply([Op("v", "k", 1, {"a": 1})])))
    t.start()
    assert mem.waiting.wait(5)
    assert mem.count("v") == 0 and not done  # reads are not blocked
    assert not gate.is_set()
    mem.unblock()
    t.join(5)
    assert done == [[]] and mem.count("v") == 1
    mem.apply([Op("v", "k2", 1, {"a": 2})])  # no longer blocked


def test_block_with_timeout_is_a_retryable_failure(mem):
    mem.block(timeout=0.01)
    with pytest.raises(SinkError, match="timed out") as ei:
        mem.apply([Op("v", "k", 1, {"a": 1})])
    assert ei.value.retryable is True and mem.count("v") == 0


def test_rejected_keys_are_returned_and_neighbours_applied(mem):
    mem.reject_keys("v", ["bad"], "mapper_parsing_exception")
    mem.reject = lambda op: "too big" if op.doc and "huge" in op.doc else None
    ops = [Op("v", "bad", 1, {"a": 1}), Op("v", "ok", 1, {"a": 2}), Op("v", "big", 1, {"huge": "x"})]
    rejected = mem.apply(ops)
    assert [(r.op.key, r.error) for r in rejected] == [("bad", "mapper_parsing_exception"), ("big", "too big")]
    assert rejected[0].op is ops[0]
    assert mem.records("v") == {"ok": {"a": 2}}
    assert "bad" not in mem.versions("v") and mem.stats["rejected"] == 2


def test_lose_data_is_reported_by_the_next_advance(mem):
    mem.register(ViewTarget("w"))
    mem.apply([Op("v", "k", 1, {"a": 1}), Op("w", "k", 1, {"a": 1})])
    mem.write_checkpoint(["v", "w"], 10)
    mem.lose_data(["w"])
    assert mem.count("w") == 0 and mem.count("v") == 1
    assert mem.advance_checkpoint(["v", "w"], 10, 20) == ["w"]
    mem.lose_data()
    assert mem.count("v") == 0 and mem.advance_checkpoint(["v"], 20, 30) == ["v"]


def test_load_needs_a_begun_generation(mem):
    with pytest.raises(SinkError, match="unknown generation") as ei:
        mem.load("v", "v@1", [Op("v", "k", 1, {"a": 1})])
    assert ei.value.retryable is False
    gen = mem.begin_generation("v", 1)
    assert mem.load("v", gen, [Op("v", "k", 1, {"a": 1})]) == []


def test_concurrent_writers_converge_on_the_newest_versions():
    s = MemorySink()
    s.register(ViewTarget("v"))

    def writer(offset: int) -> None:
        for version in range(offset, 400, 4):
            s.apply([Op("v", f"k{version % 10}", version, {"version": version})])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.records("v") == {f"k{i}": {"version": 390 + i} for i in range(10)}
    assert s.calls["apply"] == 400


def test_close_keeps_the_data_readable(mem):
    mem.apply([Op("v", "k", 1, {"a": 1})])
    mem.close()
    assert mem.closed and mem.count("v") == 1
