"""Online rebuilds and reloads against a running daemon (ARCHITECTURE.md, "Online rebuild"):
`pgderive rebuild VIEW` while `pgderive run` streams, SIGHUP / `pgderive reload` with added,
changed, removed views and an invalid file, and kill -9 in each phase of a rebuild.

Readers poll the sinks during the whole rebuild: a row that exists in the source the whole time
never goes missing from the view, and its stored version (commit LSN) never goes back."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from cdc.lsn import parse_lsn
from sinks.redis import versions_key

from ..support import (OPENSEARCH_URL, REDIS_URL, ROOT, Scenario, assert_views_equal, deployment, wait_until)

pytestmark = pytest.mark.slow

N = 20_000  # rows; ids 1..STABLE are only ever updated, never deleted
STABLE = 10_000

SCHEMA = f"""
CREATE TABLE acc (id int PRIMARY KEY, bal int NOT NULL, note text);
INSERT INTO acc SELECT g, g, 'n' || g FROM generate_series(1, {N}) g;
ANALYZE acc;
"""
VIEWS = """
  P_cache: {table: acc, sink: cache, key: "P_:acc:{id}", fields: [bal, note], format: hash}
  P_search: {table: acc, sink: search, index: Pidx_acc, fields: [bal, note]}
"""


class Writer:
    """Updates stable rows, inserts and deletes others, from 2 threads, until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, i: int) -> None:
        rnd = random.Random(i)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                nxt = N + 1 + i * 1_000_000
                while not self.stop.is_set():
                    with conn.transaction():
                        for _ in range(5):
                            conn.execute("UPDATE acc SET bal = bal + 1 WHERE id = %s", (rnd.randint(1, STABLE),))
                        conn.execute("INSERT INTO acc VALUES (%s, 0, 'new')", (nxt,))
                        nxt += 1
                        conn.execute("DELETE FROM acc WHERE id = %s", (rnd.randint(STABLE + 1, N),))
                    self.count += 1
                    time.sleep(0.002)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def __enter__(self) -> "Writer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        assert not self.errors, self.errors


class Readers:
    """Polls random stable rows in Redis (record + version entry) and in OpenSearch (the alias:
    mget, found + _version) and records every gap or version regression."""

    def __init__(self, s: Scenario) -> None:
        self.s = s
        self.stop = threading.Event()
        dep = deployment(s.config)
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.vkey = versions_key(f"{s.p}_cache", dep)
        self.os = OpenSearch([OPENSEARCH_URL])
        self.alias = f"{s.p.lower()}_acc"
        self.problems: list[str] = []
        self.polls = 0
        self.seen_redis: dict[int, int] = {}
        self.seen_os: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(7)
        while not self.stop.is_set():
            ids = [rnd.randint(1, STABLE) for _ in range(50)]
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.exists(f"{self.s.p}_:acc:{i}")
                pipe.hget(self.vkey, f"{self.s.p}_:acc:{i}")
            got = pipe.execute()
            for n, i in enumerate(ids):
                exists, version = got[2 * n], got[2 * n + 1]
                if not exists or version is None:
                    self.problems.append(f"redis: key {i} missing")
                    continue
                v = int(version[:16], 16)
                if v < self.seen_redis.get(i, 0):
                    self.problems.append(f"redis: key {i} went back from {self.seen_redis[i]:x} to {v:x}")
                self.seen_redis[i] = max(v, self.seen_redis.get(i, 0))
            try:
                resp = self.os.mget(index=self.alias, body={"ids": [str(i) for i in ids]}, _source=False)
            except Exception as e:
                self.problems.append(f"opensearch: {type(e).__name__}: {e}")
                continue
            for doc in resp["docs"]:
                i = int(doc["_id"])
                if not doc.get("found"):
                    self.problems.append(f"opensearch: document {i} missing ({doc.get('_index')})")
                    continue
                v = int(doc["_version"])
                if v < self.seen_os.get(i, 0):
                    self.problems.append(f"opensearch: document {i} went back from {self.seen_os[i]:x} to {v:x}")
                self.seen_os[i] = max(v, self.seen_os.get(i, 0))
            self.polls += 1
            time.sleep(0.01)

    def __enter__(self) -> "Readers":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def cli(s: Scenario, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgderive.cli", *args, "-c", str(s.config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def generations(s: Scenario, alias: str) -> list[str]:
    found = OpenSearch([OPENSEARCH_URL]).indices.get(index=f"{alias}-g*", ignore=404)
    return sorted(i for i in found if isinstance(found[i], dict))


def alias_target(alias: str) -> list[str]:
    found = OpenSearch([OPENSEARCH_URL]).indices.get_alias(name=alias, ignore=404)
    return sorted(i for i, e in found.items() if isinstance(e, dict))


def slots(s: Scenario) -> list[str]:
    return [r[0] for r in s.sql("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")]


def rebuild_row(s: Scenario, view: str) -> tuple[str, int] | None:
    rows = s.sql("SELECT status, attempts FROM pgderive.rebuilds WHERE slot = %s AND view = %s", (s.slot, view))
    return rows[0] if rows else None


@pytest.fixture
def acc(scenario) -> Scenario:
    return scenario(SCHEMA, VIEWS)


@pytest.mark.parametrize("which", ["search", "cache"])
def test_online_rebuild_writes_the_snapshot_just_below_its_consistent_point(acc: Scenario, which: str) -> None:
    """The lost-update race of December 2026: a commit record may start exactly at the snapshot's
    consistent point X; that commit is not in the snapshot but the stream writes it at version X
    while the load runs, and sinks re-apply an equal version. Snapshot records at X - 1 lose to it
    in either order (cdc.snapshot.snapshot_version): check the rebuilt records carry X - 1."""
    s = acc
    s.start()
    view = f"{s.p}_{which}"
    out = cli(s, "rebuild", view)
    assert out.returncode == 0, out.stdout + out.stderr
    (x_text,), = s.sql("SELECT consistent_point::text FROM pgderive.rebuilds WHERE slot = %s AND view = %s",
                       (s.slot, view))
    want = parse_lsn(x_text) - 1
    ids = [str(i) for i in range(1, STABLE + 1, 997)]  # never written by the stream here
    if which == "search":
        docs = OpenSearch([OPENSEARCH_URL]).mget(index=f"{s.p.lower()}_acc", body={"ids": ids}, _source=False)["docs"]
        got = {int(d["_version"]) for d in docs}
    else:
        entries = redis.Redis.from_url(REDIS_URL).hmget(versions_key(view, deployment(s.config)),
                                                       [f"{s.p}_:acc:{i}" for i in ids])
        got = {int(e[:16], 16) for e in entries}
    assert got == {want}, (sorted(got), want)


@pytest.mark.parametrize("which", ["search", "cache"])
def test_online_rebuild_under_writes_keeps_every_row_readable(acc: Scenario, which: str) -> None:
    s = acc
    s.start()
    view = f"{s.p}_{which}"
    alias = f"{s.p.lower()}_acc"
    before = alias_target(alias)
    with Writer(s.dsn) as w, Readers(s) as r:
        time.sleep(1.0)
        out = cli(s, "rebuild", view)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "done: live at" in out.stdout, out.stdout
        time.sleep(1.0)
    assert w.count > 50 and r.polls > 20, (w.count, r.polls)
    assert not r.problems, r.problems[:10]
    s.caught_up()
    assert_views_equal(s.config)
    log = s.daemon.output()
    assert f"online rebuild of view {view} done" in log, log[-3000:]
    assert rebuild_row(s, view) == ("done", 1)
    after = alias_target(alias)
    if which == "search":
        assert after != before and len(after) == 1, (before, after)  # a new generation took over
    assert generations(s, alias) == after  # the old generation is gone
    assert slots(s) == [s.slot]  # the rebuild's temporary slot went with its connection
    out = cli(s, "status")
    assert "online rebuilds" in out.stdout and "done" in out.stdout, out.stdout


def test_sighup_adds_changes_removes_views_and_refuses_a_bad_file(acc: Scenario) -> None:
    s = acc
    d = s.start()
    text = s.config.read_text()
    # an added Redis view and an added OpenSearch view, the search view changed (a field more)
    added = (f'  {s.p}_more: {{table: acc, sink: cache, key: "{s.p}:more:{{id}}", fields: [bal], format: json}}\n'
             f'  {s.p}_find: {{table: acc, sink: search, index: {s.p.lower()}_find, fields: [note]}}\n')
    changed = text.replace(f"index: {s.p.lower()}_acc, fields: [bal, note]", f"index: {s.p.lower()}_acc, fields: [bal, note, id]")
    assert changed != text
    s.config.write_text(changed + added)
    with Writer(s.dsn):
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)

        def rebuilt() -> bool:
            rows = s.sql("SELECT view, status FROM pgderive.rebuilds WHERE slot = %s", (s.slot,)) \
                if s.sql("SELECT to_regclass('pgderive.rebuilds')")[0][0] else []
            return sorted(rows) == sorted([(f"{s.p}_more", "done"), (f"{s.p}_find", "done"), (f"{s.p}_search", "done")])
        wait_until(rebuilt, 180, what="online rebuilds of the added and changed views")
    s.caught_up()
    assert_views_equal(s.config)
    doc = OpenSearch([OPENSEARCH_URL]).get(index=f"{s.p.lower()}_acc", id="5")
    assert doc["_source"].get("id") == 5  # the changed definition serves now
    # remove a view: no longer maintained, data kept
    s.config.write_text(changed.replace(f'  {s.p}_cache: ', "  # removed: ") + added)
    out = cli(s, "reload")
    assert out.returncode == 0 and f"removed {s.p}_cache" in out.stdout, out.stdout + out.stderr
    r = redis.Redis.from_url(REDIS_URL)
    kept = r.hget(f"{s.p}_:acc:3", "bal")
    s.sql("UPDATE acc SET bal = -1 WHERE id = 3")
    s.caught_up()
    assert kept is not None and r.hget(f"{s.p}_:acc:3", "bal") == kept  # not maintained any more, and kept
    good = s.config.read_text()
    # an invalid file is refused with its YAML path; the daemon keeps running on the previous one
    s.config.write_text(good + "  broken: {table: acc, sink: nowhere}\n")
    out = cli(s, "reload")
    assert out.returncode == 2 and "views.broken.sink: unknown sink 'nowhere'" in out.stderr, out.stderr
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.output(), 30, what="the daemon to refuse the file")
    assert "views.broken.sink: unknown sink 'nowhere'" in d.output()
    # a valid file that changes more than views is refused by the daemon (exit 1)
    s.config.write_text(good.replace("sinks:", "bootstrap: {concurrency: 3}\nsinks:"))
    out = cli(s, "reload")
    assert out.returncode == 1 and "refused: section(s) bootstrap changed" in out.stdout, out.stdout + out.stderr
    s.config.write_text(good)
    s.sql("UPDATE acc SET bal = -2 WHERE id = 4")
    s.caught_up()
    assert b"-2" in (r.get(f"{s.p}:more:4") or b"")
    assert d.alive()
    # the removed view's data goes only with `pgderive drop`
    out = cli(s, "drop", f"{s.p}_cache", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert r.exists(f"{s.p}_:acc:3") == 0 and r.exists(f"{s.p}:more:3") == 1


@pytest.mark.parametrize("phase", ["loading", "catching_up", "switching", "switched"])
@pytest.mark.parametrize("which", ["search", "cache"])
def test_kill9_in_each_phase_of_an_online_rebuild_then_restart(acc: Scenario, phase: str, which: str) -> None:
    """The daemon pauses at the phase (PGDERIVE_INJECT_REBUILD_PAUSE) and is killed there: the
    alias points at one whole generation throughout, and the next start finishes the rebuild by
    itself with no orphan index or slot."""
    s = acc
    view = f"{s.p}_{which}"
    alias = f"{s.p.lower()}_acc"
    d = s.start(env={"PGDERIVE_INJECT_REBUILD_PAUSE": f"{phase}:600"})
    live = alias_target(alias)
    with Writer(s.dsn):
        out = cli(s, "rebuild", view, "--no-wait")
        assert out.returncode == 0, out.stderr
        wait_until(lambda: f"pausing the rebuild 600 s in phase {phase}" in d.output(), 120,
                   what=f"the rebuild to reach {phase}")
        time.sleep(0.3)
        d.kill9()
        assert (rebuild_row(s, view) or ("",))[0] in ("loading", "catching_up", "switching")
        if which == "search":
            served = alias_target(alias)
            assert len(served) == 1 and (served == live or phase == "switched"), (live, served)
        d = s.start()
        wait_until(lambda: (rebuild_row(s, view) or ("",))[0] == "done", 180, what="the rebuild to finish")
    assert rebuild_row(s, view)[1] == 2  # started over once after the crash
    s.caught_up()
    assert_views_equal(s.config)
    assert generations(s, alias) == alias_target(alias) and len(alias_target(alias)) == 1
    assert slots(s) == [s.slot]


TREE_SCHEMA = """
CREATE TABLE cat (id int PRIMARY KEY, name text);
CREATE TABLE item (id int PRIMARY KEY, cat_id int, price int);
INSERT INTO cat SELECT g, 'c' || g FROM generate_series(1, 50) g;
INSERT INTO item SELECT g, g % 50 + 1, g FROM generate_series(1, 3000) g;
"""
TREE_VIEWS = """
  P_items: {table: item, sink: search, index: Pidx_items, fields: [price],
            include: {cat: {table: cat, on: {cat_id: id}, fields: [name]}}}
  P_itemc: {table: item, sink: cache, key: "P_:i:{id}", fields: [price], format: json,
            include: {cat: {table: cat, on: {cat_id: id}, fields: [name]}}}
  P_sums: {table: item, sink: cache, key: "P_:s:{cat_id}", format: json, group_by: [cat_id],
           aggregate: {total: "sum(price)"}}
  P_catsum: {table: item, sink: search, index: Pidx_catsum, group_by: [cat_id],
             aggregate: {total: "sum(price)", top: "max(price)"}}
"""


def test_include_and_aggregate_views_rebuild_online_and_change_by_reload(scenario) -> None:
    s = scenario(TREE_SCHEMA, TREE_VIEWS)
    d = s.start()
    stop = threading.Event()

    def write() -> None:
        rnd = random.Random(3)
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            nxt = 100_000
            while not stop.is_set():
                conn.execute("UPDATE cat SET name = name || 'x' WHERE id = %s", (rnd.randint(1, 50),))
                conn.execute("UPDATE item SET price = price + 1, cat_id = %s WHERE id = %s",
                             (rnd.randint(1, 50), rnd.randint(1, 3000)))
                conn.execute("INSERT INTO item VALUES (%s, %s, 7)", (nxt, rnd.randint(1, 60)))
                conn.execute("DELETE FROM item WHERE id = %s", (nxt - 5,))
                nxt += 1
                time.sleep(0.005)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    try:
        for view in (f"{s.p}_items", f"{s.p}_itemc", f"{s.p}_sums", f"{s.p}_catsum"):
            out = cli(s, "rebuild", view)
            assert out.returncode == 0 and "done: live at" in out.stdout, out.stdout + out.stderr
        # a changed aggregate on each sink kind: a new measure, and another group key shape
        text = s.config.read_text()
        s.config.write_text(text.replace('aggregate: {total: "sum(price)"}', 'aggregate: {total: "sum(price)", n: "count(*)"}')
                            .replace('top: "max(price)"', 'top: "max(price)", low: "min(price)"'))
        out = cli(s, "reload")
        assert out.returncode == 0 and f"changed {s.p}_catsum, {s.p}_sums" in out.stdout, out.stdout + out.stderr

        def done() -> bool:
            rows = dict(s.sql("SELECT view, status FROM pgderive.rebuilds WHERE slot = %s", (s.slot,)))
            return rows.get(f"{s.p}_sums") == "done" and rows.get(f"{s.p}_catsum") == "done"
        wait_until(done, 120, what="the changed aggregate views to be rebuilt")
    finally:
        stop.set()
        t.join(10)
    s.caught_up()
    assert_views_equal(s.config)
    assert len(generations(s, f"{s.p.lower()}_items")) == 1
    assert len(generations(s, f"{s.p.lower()}_catsum")) == 1
    r = redis.Redis.from_url(REDIS_URL)
    assert b'"n"' in r.get(f"{s.p}_:s:1")  # the new definition serves
    state = s.sql("SELECT count(*) FROM pgderive.agg_rows WHERE view LIKE %s", (f"{s.p}_%#rebuild",))[0][0]
    assert state == 0  # no rebuilt state left behind
    assert d.alive()


@pytest.mark.parametrize("phase", ["loading", "switching", "switched"])
def test_kill9_during_an_aggregate_views_online_rebuild(scenario, phase: str) -> None:
    s = scenario(TREE_SCHEMA, TREE_VIEWS)
    view = f"{s.p}_catsum"
    d = s.start(env={"PGDERIVE_INJECT_REBUILD_PAUSE": f"{phase}:600"})
    stop = threading.Event()

    def write() -> None:
        rnd = random.Random(5)
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE item SET price = price + 1, cat_id = %s WHERE id = %s",
                             (rnd.randint(1, 50), rnd.randint(1, 3000)))
                time.sleep(0.005)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    try:
        out = cli(s, "rebuild", view, "--no-wait")
        assert out.returncode == 0, out.stderr
        wait_until(lambda: f"pausing the rebuild 600 s in phase {phase}" in d.output(), 120,
                   what=f"the rebuild to reach {phase}")
        d.kill9()
        assert len(alias_target(f"{s.p.lower()}_catsum")) == 1
        d = s.start()
        wait_until(lambda: (rebuild_row(s, view) or ("",))[0] == "done", 180, what="the rebuild to finish")
    finally:
        stop.set()
        t.join(10)
    s.caught_up()
    assert_views_equal(s.config)
    assert generations(s, f"{s.p.lower()}_catsum") == alias_target(f"{s.p.lower()}_catsum")
    assert s.sql("SELECT count(*) FROM pgderive.agg_rows WHERE view = %s", (f"{view}#rebuild",))[0][0] == 0
    assert slots(s) == [s.slot]
