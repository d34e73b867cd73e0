"""``pgderive drop VIEW`` against real Postgres, Redis and OpenSearch: a retired view's records,
version hash, generation indices, checkpoint, dead letters, aggregate state, fingerprint and
registry row go; every other view's data stays; the refusals change nothing (ARCHITECTURE.md,
"State").

The daemon does not record the view registry yet, so each test records it itself from the bound
views (:func:`pgderive.state.registry.entry_of`), as the daemon will at start and on reload.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
import pytest
import redis
from click.testing import CliRunner
from opensearchpy import OpenSearch

from pgderive import cli
from pgderive.ops.drop import drop_view
from pgderive.state.deadletters import DeadLetter, DeadLetterStore
from pgderive.state.registry import ViewRegistry, entry_of
from pgderive.state.slots import StateStore
from sinks.opensearch import CHECKPOINT_INDEX, checkpoint_id
from sinks.redis import checkpoint_key, versions_key
from views.check import build_views
from views.derive import view_fingerprint
from views.spec import load_spec

from ..support import OPENSEARCH_URL, REDIS_URL, ROOT, Scenario, deployment

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, grp int NOT NULL);
INSERT INTO items SELECT g, 'n' || g, g % 3 FROM generate_series(1, 20) g;
"""
# One line per view: a test removes a view from the YAML by removing its line.
VIEWS = """
  P_gone_r: {table: items, sink: cache, key: "P_gone:{id}", fields: [id, name]}
  P_gone_s: {table: items, sink: search, index: Pidx_gone, fields: [id, name]}
  P_agg: {table: items, sink: cache, key: "P_agg:{grp}", group_by: [grp], aggregate: {n: "count(*)"}}
  P_keep: {table: items, sink: cache, key: "P_keep:{id}", fields: [id, name]}
"""


@dataclass
class Setup:
    """A scenario whose daemon bootstrapped and streamed the four views, then stopped, with
    every view recorded (active) in the registry."""

    s: Scenario
    original: str  # the YAML with every view
    dep: str  # the deployment id
    r: redis.Redis
    es: OpenSearch

    def name(self, short: str) -> str:
        return f"{self.s.p}_{short}"

    @property
    def alias(self) -> str:
        return f"{self.s.p.lower()}_gone"

    @property
    def registry(self) -> ViewRegistry:
        return ViewRegistry(self.s.dsn)

    def remove_from_yaml(self, *names: str) -> None:
        lines = self.original.splitlines(keepends=True)
        self.s.config.write_text("".join(l for l in lines if not any(f"  {n}:" in l for n in names)))

    def drop(self, *args: str, input: str | None = None) -> Any:
        """``pgderive drop`` in this process (click's runner)."""
        return CliRunner().invoke(cli.main, ["drop", "-c", str(self.s.config), *args], input=input)

    # what the sinks hold ------------------------------------------------------------------
    def redis_keys(self, short: str) -> set[str]:
        return {k.decode() for k in self.r.scan_iter(match=f"{self.s.p}_{short}:*", count=1000)}

    def generations(self) -> list[str]:
        found = self.es.indices.get(index=f"{self.alias}-g*", expand_wildcards="open,closed", ignore=404)
        return sorted(i for i in found if i.startswith(f"{self.alias}-g")) if "error" not in found else []

    def os_checkpoint(self, view: str) -> bool:
        return bool(self.es.exists(index=CHECKPOINT_INDEX, id=checkpoint_id(view, self.dep)))


@pytest.fixture
def setup(scenario: Any) -> Iterator[Setup]:
    s: Scenario = scenario(SCHEMA, VIEWS)
    original = s.config.read_text()
    r = redis.Redis.from_url(REDIS_URL)
    es = OpenSearch([OPENSEARCH_URL])
    try:
        s.start()
        s.sql("UPDATE items SET name = 'changed' WHERE id <= 5")  # streamed, not only the snapshot
        s.sql("INSERT INTO items VALUES (21, 'n21', 1)")
        s.caught_up()
        assert s.daemon is not None and s.daemon.stop() == 0
        spec = load_spec(s.config)
        with psycopg.connect(s.dsn, autocommit=True) as conn:
            views = build_views(spec, conn)
        ViewRegistry(s.dsn).record(s.slot, [entry_of(v, view_fingerprint(v)) for v in views])
        yield Setup(s, original, deployment(s.config), r, es)
    finally:
        s.config.write_text(original)  # so the scenario's cleanup drops every view's data
        r.close()
        es.close()


def test_drop_removes_the_retired_views_and_keeps_the_rest(setup: Setup) -> None:
    s, r, es = setup.s, setup.r, setup.es
    gone_r, gone_s, agg, keep = (setup.name(n) for n in ("gone_r", "gone_s", "agg", "keep"))
    # what the daemon wrote
    assert len(setup.redis_keys("gone")) == 21 and r.hlen(versions_key(gone_r, setup.dep)) == 21
    assert r.exists(checkpoint_key(gone_r, setup.dep))
    assert es.indices.exists_alias(name=setup.alias) and setup.generations()
    assert setup.os_checkpoint(gone_s)
    assert len(setup.redis_keys("agg")) == 3
    keep_keys = setup.redis_keys("keep")
    assert len(keep_keys) == 21
    keep_before = {k: r.hgetall(k) for k in keep_keys}
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgderive.agg_groups WHERE view = %s", (agg,)).fetchone() == (3,)
    with DeadLetterStore(s.dsn) as store:
        store.record(s.slot, [DeadLetter(view=v, table="public.items", key=None, lsn=1, error="test", row={"id": 1})
                              for v in (gone_r, gone_r, keep)])
    assert setup.registry.retire(s.slot, [gone_r, gone_s, agg, "never_recorded"]) == sorted([gone_r, gone_s, agg])
    setup.remove_from_yaml(gone_r, gone_s, agg)

    status = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(s.config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    for v in (gone_r, gone_s, agg):
        assert f"retired, data kept: run `pgderive drop {v}`" in status.stdout

    for v in (gone_r, gone_s, agg):
        out = subprocess.run([sys.executable, "-m", "pgderive.cli", "drop", "-c", str(s.config), v, "--yes"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"dropped {v} from sink" in out.stdout
    assert "dropped" in out.stdout and ": 3 record(s), 0 dead letter(s), 3 aggregate group(s)" in out.stdout

    # Redis: the records, the version hash and the checkpoint of both Redis views
    assert setup.redis_keys("gone") == set() and setup.redis_keys("agg") == set()
    for v in (gone_r, agg):
        assert not r.exists(versions_key(v, setup.dep), checkpoint_key(v, setup.dep))
    # OpenSearch: the alias, every generation index and the checkpoint document
    assert not es.indices.exists_alias(name=setup.alias)
    assert setup.generations() == []
    assert not setup.os_checkpoint(gone_s)
    # pgderive's state
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgderive.agg_groups WHERE view = %s", (agg,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pgderive.agg_rows WHERE view = %s", (agg,)).fetchone() == (0,)
    with DeadLetterStore(s.dsn) as store:
        assert store.count(s.slot) == {keep: 1}
    assert [e.view for e in setup.registry.entries(s.slot)] == [keep]
    state = StateStore(s.dsn).get(s.slot)
    assert state is not None and list(state.views) == [keep]
    # the remaining view is untouched, and still resumes
    assert setup.redis_keys("keep") == keep_keys
    assert {k: r.hgetall(k) for k in keep_keys} == keep_before
    assert r.hlen(versions_key(keep, setup.dep)) == 21 and r.exists(checkpoint_key(keep, setup.dep))
    status = subprocess.run([sys.executable, "-m", "pgderive.cli", "status", "-c", str(s.config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "retired views" not in status.stdout
    # dropped is gone: a second drop is refused as unknown
    again = setup.drop(gone_r, "--yes")
    assert again.exit_code == 1
    assert f"view {gone_r} is unknown" in again.output and f"slot {s.slot} has no retired views" in again.output


def test_an_interrupted_drop_runs_again(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    s, r = setup.s, setup.r
    gone_r = setup.name("gone_r")
    setup.registry.retire(s.slot, [gone_r])
    setup.remove_from_yaml(gone_r)
    spec = load_spec(s.config)

    def crash(*args: Any, **kwargs: Any) -> int:
        raise psycopg.OperationalError("the source went away")

    monkeypatch.setattr(DeadLetterStore, "discard", crash)
    with pytest.raises(psycopg.OperationalError):
        drop_view(spec, gone_r)
    assert setup.redis_keys("gone") == set()  # the sink went first ...
    entry = setup.registry.get(s.slot, gone_r)
    assert entry is not None and entry.status == "retired"  # ... the registry row last
    monkeypatch.undo()
    report = drop_view(spec, gone_r)
    assert (report.view, report.sink, report.records) == (gone_r, "cache", 0)
    assert setup.registry.get(s.slot, gone_r) is None
    state = StateStore(s.dsn).get(s.slot)
    assert state is not None and gone_r not in state.views
    assert not r.exists(versions_key(gone_r, setup.dep))
    assert len(setup.redis_keys("keep")) == 21


def test_a_view_still_in_the_yaml_is_refused(setup: Setup) -> None:
    keep = setup.name("keep")
    setup.registry.retire(setup.s.slot, [keep])  # even retired: the YAML wins
    result = setup.drop(keep, "--yes")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: view {keep} is still in the config: remove it from the YAML and reload the daemon first"]
    assert len(setup.redis_keys("keep")) == 21
    assert setup.registry.get(setup.s.slot, keep) is not None


def test_an_unknown_view_is_refused_listing_the_retired_ones(setup: Setup) -> None:
    gone_r, gone_s = setup.name("gone_r"), setup.name("gone_s")
    setup.registry.retire(setup.s.slot, [gone_r, gone_s])
    setup.remove_from_yaml(gone_r, gone_s)
    result = setup.drop("no_such_view", "--yes")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: view no_such_view is unknown: pgderive has no record of it for slot {setup.s.slot} "
        f"(retired views of slot {setup.s.slot}: {gone_r}, {gone_s})"]
    assert len(setup.redis_keys("gone")) == 21 and setup.es.indices.exists_alias(name=setup.alias)


def test_an_active_view_is_refused(setup: Setup) -> None:
    gone_r = setup.name("gone_r")
    setup.remove_from_yaml(gone_r)  # but the daemon has not reloaded: still active
    result = setup.drop(gone_r, "--yes")
    assert result.exit_code == 1
    assert f"error: view {gone_r} is still active: the daemon maintains it" in result.output
    assert len(setup.redis_keys("gone")) == 21
    assert setup.r.hlen(versions_key(gone_r, setup.dep)) == 21
    entry = setup.registry.get(setup.s.slot, gone_r)
    assert entry is not None and entry.status == "active"


def test_declining_the_confirmation_drops_nothing(setup: Setup) -> None:
    gone_s = setup.name("gone_s")
    setup.registry.retire(setup.s.slot, [gone_s])
    setup.remove_from_yaml(gone_s)
    generations = setup.generations()
    assert generations
    result = setup.drop(gone_s, input="n\n")
    assert result.exit_code == 1
    assert f"view {gone_s}: sink search, OpenSearch alias '{setup.alias}'" in result.output
    assert "aborted: nothing was dropped" in result.output
    assert setup.es.indices.exists_alias(name=setup.alias) and setup.generations() == generations
    assert setup.os_checkpoint(gone_s)
    assert setup.registry.get(setup.s.slot, gone_s) is not None
    state = StateStore(setup.s.dsn).get(setup.s.slot)
    assert state is not None and gone_s in state.views
    # answering yes then drops it
    result = setup.drop(gone_s, input="y\n")
    assert result.exit_code == 0, result.output
    assert not setup.es.indices.exists_alias(name=setup.alias) and setup.generations() == []
