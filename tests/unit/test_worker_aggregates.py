"""The pure parts of aggregate views on derivation workers (ARCHITECTURE.md, "Kafka workers"):
group lock keys, the per-group record version, and that writing each group's records at those
versions makes the sink keep the record computed last, whatever order the workers' lanes
deliver them in (the property the integration tests rely on)."""
from __future__ import annotations

import random

from cdc.catalog import TableInfo
from pgderive.state.aggregates import group_lock_keys, next_group_version
from sinks.base import Op, ViewTarget
from sinks.memory import MemorySink
from views.aggregate import group_text
from views.derive import View
from views.spec import parse_spec

SPEC = """
source: {dsn: "postgresql://postgres@127.0.0.1:5433/db", kafka: {bootstrap_servers: "127.0.0.1:9093", group: g}}
sinks: {cache: {type: redis}}
views:
  a: {table: t, sink: cache, key: "g:{grp}", group_by: [grp], aggregate: {n: "count(*)", total: "sum(x)"}}
"""
INFO = TableInfo("public.t", {"id": "integer", "grp": "integer", "x": "integer"}, ("id",), "d", ("id",))


def test_group_lock_keys_are_sorted_distinct_and_independent_of_the_spelling() -> None:
    keys = group_lock_keys("v", ['["1", "b"]', '["1","b"]', '["2"]', "[null]"])
    assert keys == sorted(keys) and len(keys) == 3  # jsonb's and Python's spelling: one group
    assert all(-2 ** 63 <= k < 2 ** 63 for k in keys)  # Postgres bigint
    assert group_lock_keys("v", ['["2"]']) == group_lock_keys("v", ['["2"]'])  # stable across processes
    assert group_lock_keys("w", ['["2"]']) != group_lock_keys("v", ['["2"]'])  # per view
    assert group_lock_keys("v", []) == []
    assert group_text('["1", null]') == '["1",null]'


def test_next_group_version_only_grows_and_never_falls_below_the_changes() -> None:
    assert next_group_version(None, 100) == 100
    assert next_group_version(100, 90) == 101  # a late change of another partition
    assert next_group_version(100, 100) == 101  # a replay rewrites at a higher version
    assert next_group_version(101, 500) == 500
    v: int | None = None
    rnd = random.Random(3)
    for _ in range(1000):
        top = rnd.randint(1, 10_000)
        new = next_group_version(v, top)
        assert new >= top and (v is None or new > v)
        v = new


def test_group_ops_carry_each_groups_own_version() -> None:
    view = View("a", parse_spec(SPEC).views["a"], INFO)
    rows = [('["1"]', "2", "7")]
    ops, errors = view.group_ops(rows, ['["1"]', '["2"]'], 50, {'["1"]': 120, '["2"]': 121})
    assert not errors
    assert [(o.key, o.version, o.doc) for o in ops] == [("g:1", 120, {"grp": 1, "n": 2, "total": 7}),
                                                        ("g:2", 121, None)]  # emptied: a delete
    # the slot daemon's form: every Op at the batch's version
    assert {o.version for o in view.group_ops(rows, ['["1"]', '["2"]'], 50)[0]} == {50}


def _sink() -> MemorySink:
    sink = MemorySink()
    sink.register(ViewTarget("v"))
    return sink


def test_records_written_at_group_versions_converge_in_any_delivery_order() -> None:
    """Two workers move one group in turns (the per-group lock orders their transactions); each
    computes the record from the state so far and writes it at next_group_version. Their lanes
    deliver the writes in any order, some twice: the sink ends with the last computed record.
    With the change's own LSN as the version it does not."""
    rnd = random.Random(7)
    for trial in range(200):
        lsns = sorted(rnd.sample(range(1, 10_000), 12))
        changes = list(lsns)
        rnd.shuffle(changes)  # partitions deliver out of LSN order across workers
        total, version = 0, None
        writes = []
        for lsn in changes:  # in lock order: each transaction sees the previous ones' state
            total += lsn
            version = next_group_version(version, lsn)
            writes.append(Op("v", "g", version, {"total": total}))
        delivered = writes + rnd.sample(writes, 3)  # at least once
        rnd.shuffle(delivered)
        sink = _sink()
        for op in delivered:
            sink.apply([op])
        assert dict(sink.scan("v"))["g"] == {"total": sum(lsns)}, trial
    # the race the per-group versions fix: A computed the group before B's change landed in the
    # state, B computed it later with both changes, but B's change has the lower LSN
    sink = _sink()
    sink.apply([Op("v", "g", 100, {"total": 1})])
    sink.apply([Op("v", "g", 90, {"total": 2})])
    assert dict(sink.scan("v"))["g"] == {"total": 1}  # refused as older: stale
