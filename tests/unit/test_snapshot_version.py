"""The version of snapshot rows written beside the stream (cdc.snapshot.snapshot_version,
ARCHITECTURE.md rule 1): a commit record may start exactly at the consistent point X, and that
commit is streamed, not in the snapshot."""
from __future__ import annotations

import itertools

from cdc.snapshot import snapshot_version
from sinks.base import Op, ViewTarget
from sinks.memory import MemorySink

X = 0x16B3748  # a consistent point; records start 8-byte aligned
OLD = {"bal": 1}   # the row as the snapshot holds it
NEW = {"bal": 2}   # the row after the commit at exactly X


def _final(version: int, stream_first: bool, stream_doc: dict[str, int] | None) -> tuple[object, int]:
    sink = MemorySink()
    sink.register(ViewTarget("v", key_shape="k:{}"))
    gen = sink.begin_generation("v", version)
    snapshot = [Op("v", "k:1", version, OLD)]
    stream = [Op("v", "k:1", X, stream_doc)]
    for step in ((stream, None), (snapshot, gen)) if stream_first else ((snapshot, gen), (stream, None)):
        ops, generation = step
        if generation is None:
            sink.apply(ops)
        else:
            sink.load("v", generation, ops)
    return sink.records("v").get("k:1"), sink.versions("v")["k:1"][0]


def test_snapshot_version_is_just_below_the_consistent_point() -> None:
    assert snapshot_version(X) == X - 1
    assert snapshot_version(X) < X


def test_a_commit_at_the_consistent_point_wins_over_the_snapshot_in_either_order() -> None:
    for stream_first, doc in itertools.product([True, False], [NEW, None]):
        record, version = _final(snapshot_version(X), stream_first, doc)
        assert (record, version) == (doc, X), (stream_first, doc)


def test_at_the_consistent_point_itself_the_snapshot_would_undo_that_commit() -> None:
    # Why not X: an equal version re-applies, so a snapshot row written after the commit's Op
    # brings the old row back (an update lost, or a deleted row resurrected).
    assert _final(X, True, NEW)[0] == OLD
    assert _final(X, True, None)[0] == OLD
