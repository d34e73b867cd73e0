"""Provenance of the stream's writes (ARCHITECTURE.md, "Provenance"): the daemon stores the xid
and commit timestamp of every commit it writes with in pgderive.commits, keyed by the commit
LSN that is the records' version; `provenance: off` stores nothing; old commits are pruned."""
from __future__ import annotations

import datetime as dt

import psycopg
import pytest
import redis

from cdc.lsn import parse_lsn
from pgderive.state.provenance import Commit, CommitStore
from sinks.redis import versions_key

from ..support import REDIS_URL, Scenario, deployment, wait_until

SCHEMA = "CREATE TABLE acc (id int PRIMARY KEY, bal int NOT NULL)"
VIEWS = '  P_cache: {table: acc, sink: cache, key: "P_:acc:{id}", fields: [bal], format: hash}\n'


@pytest.fixture
def acc(scenario) -> Scenario:
    return scenario(SCHEMA, VIEWS)


def _write(s: Scenario, key: int) -> tuple[int, int]:
    """Insert a row in a transaction of its own: (its xid, the LSN after it committed)."""
    with psycopg.connect(s.dsn) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO acc VALUES (%s, 1)", (key,))
            (xid,) = conn.execute("SELECT pg_current_xact_id()::xid::text::bigint").fetchone()
        (after,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return int(xid), parse_lsn(after)


def _version(s: Scenario, key: int) -> int:
    entry = redis.Redis.from_url(REDIS_URL).hget(versions_key(f"{s.p}_cache", deployment(s.config)),
                                                 f"{s.p}_:acc:{key}")
    assert entry is not None
    return int(entry[:16], 16)


def test_each_streamed_commit_is_recorded_with_its_xid_and_timestamp(acc: Scenario) -> None:
    s = acc
    s.start()
    store = CommitStore(s.dsn)
    old = Commit(1, 1, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2))
    store.insert(s.slot, [old])  # older than the default retention (1 day): pruned
    written = {k: _write(s, k) for k in (1, 2, 3)}
    s.caught_up()
    versions = {k: _version(s, k) for k in written}
    assert len(set(versions.values())) == 3
    # before the slot was confirmed past them, the commits were stored
    got = store.lookup(s.slot, list(versions.values()))
    now = dt.datetime.now(dt.timezone.utc)
    for k, (xid, after) in written.items():
        c = got[versions[k]]
        assert c.xid == xid and c.lsn < after
        assert now - dt.timedelta(minutes=1) < c.committed_at <= now
    # the first prune runs 5 s after the stream starts
    wait_until(lambda: not store.lookup(s.slot, [1]), 90, what="the 2-day-old commit to be pruned")
    assert store.lookup(s.slot, list(versions.values())).keys() == set(versions.values())
    store.close()


def test_provenance_off_records_nothing(acc: Scenario) -> None:
    s = acc
    s.config.write_text(s.config.read_text() + "provenance: off\n")
    s.start()
    _write(s, 1)
    s.caught_up()
    _version(s, 1)
    (n,), = s.sql("SELECT count(*) FROM pgderive.commits")
    assert n == 0


def test_lookup_finds_commits_across_overlapping_rows_and_prune_keeps_recent_ones(acc: Scenario) -> None:
    """One row per flush; a replay after a restart stores rows overlapping earlier ones."""
    s = acc
    store = CommitStore(s.dsn)
    now = dt.datetime.now(dt.timezone.utc)
    old = now - dt.timedelta(days=3)
    commits = [Commit(0x1000 + 8 * i, 500 + i, old if i < 50 else now) for i in range(100)]
    store.insert(s.slot, commits[:40])
    store.insert(s.slot, commits[40:100])
    store.insert(s.slot, commits[30:60])   # a replay: overlaps both
    store.insert(s.slot, commits[35:40])   # ends where the first row ends: skipped
    store.insert("other_slot", [Commit(0x1000, 1, now)])
    probe = [c.lsn for c in commits] + [0x1000 + 4, 0x0FF8, 0x9000]  # + not commits
    got = store.lookup(s.slot, probe)
    assert sorted(got) == [c.lsn for c in commits]
    assert all(got[c.lsn].xid == c.xid for c in commits)
    assert store.lookup("other_slot", [0x1000])[0x1000].xid == 1
    # rows whose last commit is old go; the one holding recent commits stays whole
    assert store.prune(s.slot, dt.timedelta(days=1)) == 1  # commits[:40]; [30:60] and [40:100] end recent
    assert sorted(store.lookup(s.slot, probe)) == [c.lsn for c in commits[30:]]
    store.close()
