"""Preflight parts that need no service: sink URL ports, alias clashes, view tables, the
MemorySink's check hook. The checks against Postgres, Redis and OpenSearch themselves are in
tests/integration/test_preflight.py."""
from __future__ import annotations

import pytest

from pgderive.runtime.preflight import check_names, check_sinks, open_spec_sinks, view_tables
from sinks.memory import MemorySink
from sinks.opensearch import OpenSearchSink
from views.spec import SpecError, parse_spec


def spec_text(sinks: str, views: str) -> str:
    return f"""
source: {{dsn: "postgresql://app@127.0.0.1:5433/db", slot: s}}
sinks:
{sinks}
views:
{views}
"""


@pytest.mark.parametrize("url, port", [("redis://127.0.0.1:63x80/0", "63x80"),
                                       ("redis://:pw@127.0.0.1:99999/0", "99999"),
                                       ("rediss://u:pw@host:-1", "-1")])
def test_malformed_redis_port_is_a_spec_error_at_the_url(url: str, port: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(spec_text(f'  cache: {{type: redis, url: "{url}"}}',
                             '  v: {table: t, sink: cache, key: "k:{id}"}'))
    assert "<string>:4: sinks.cache.url: invalid URL " in str(e.value)
    assert f"the port '{port}' is not a number from 1 to 65535" in str(e.value)
    assert "pw" not in str(e.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6380/0", "redis://h/0", "unix:///tmp/r.sock?db=1",
                                 "redis://h:6379/$x"])
def test_well_formed_redis_urls_pass(url: str) -> None:
    parse_spec(spec_text(f'  cache: {{type: redis, url: "{url}"}}', '  v: {table: t, sink: cache, key: "k:{id}"}'))


def test_alias_clashes_with_the_sinks_own_index_and_generations() -> None:
    own = OpenSearchSink("search", ["http://127.0.0.1:1"]).checkpoint_index
    spec = parse_spec(spec_text(
        '  search: {type: opensearch, hosts: ["http://127.0.0.1:1"]}',
        f"""  a: {{table: t, sink: search, index: {own}}}
  b: {{table: t, sink: search, index: {own.rsplit('-', 1)[0]}}}
  c: {{table: t, sink: search, index: c_ok}}
  d: {{table: t, sink: search, index: c_ok-g00000000000000ff}}"""))
    sinks, problems = open_spec_sinks(spec)
    assert problems == []
    found = {p.path: p.message for p in check_names(spec, sinks)}
    assert set(found) == {"views.a.index", "views.d.index"}, found
    assert f"index {own!r} is the index pgderive keeps its own bookkeeping in (sink search)" in found["views.a.index"]
    assert "generation index of view c's alias 'c_ok'" in found["views.d.index"]


def test_a_generation_shaped_reserved_name_clashes_with_its_alias() -> None:
    sink = OpenSearchSink("search", ["http://127.0.0.1:1"])
    sink.checkpoint_index = "ck-g0123456789abcdef"
    spec = parse_spec(spec_text('  search: {type: opensearch, hosts: ["http://127.0.0.1:1"]}',
                                "  a: {table: t, sink: search, index: ck}"))
    [problem] = check_names(spec, {"search": sink})
    assert problem.path == "views.a.index" and "could take 'ck-g0123456789abcdef'" in problem.message


def test_view_tables_lists_included_tables_once() -> None:
    spec = parse_spec(spec_text('  cache: {type: redis, url: "redis://127.0.0.1:6380/0"}', """  o:
    table: orders
    sink: cache
    key: "o:{id}"
    format: json
    include:
      customer: {table: customers, on: {customer_id: id}}
      items:
        table: shop.items
        on: {id: order_id}
        many: true
        include:
          product: {table: customers, on: {product_id: id}}"""))
    assert view_tables(spec) == {"o": ["public.orders", "public.customers", "shop.items"]}


def test_memory_sink_check_follows_its_hooks() -> None:
    sink = MemorySink("mem")
    assert check_sinks({"mem": sink}) == []
    sink.fail_next(methods=["check"], retryable=True)
    [down] = check_sinks({"mem": sink})
    assert down.path == "sinks.mem" and down.unreachable
    sink.fail_next(methods=["check"], retryable=False)
    [refused] = check_sinks({"mem": sink})
    assert not refused.unreachable
    assert sink.calls["check"] == 3


def test_the_configured_checkpoint_index_is_reserved() -> None:
    """checkpoint_index from the YAML (issue 14, item 11) is what the sink keeps for itself."""
    spec = parse_spec(spec_text(
        '  search: {type: opensearch, hosts: ["http://127.0.0.1:1"], checkpoint_index: team-a-cp}',
        """  a: {table: t, sink: search, index: team-a-cp}
  b: {table: t, sink: search, index: pgderive-checkpoints}"""))
    sinks, problems = open_spec_sinks(spec)
    try:
        assert problems == [] and sinks["search"].checkpoint_index == "team-a-cp"  # type: ignore[attr-defined]
        found = {p.path: p.message for p in check_names(spec, sinks)}
        assert set(found) == {"views.a.index"}, found  # the default index is free for a view here
    finally:
        for s in sinks.values():
            s.close()
