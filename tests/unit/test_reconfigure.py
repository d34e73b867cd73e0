"""What a reload changes (pgderive/runtime/reconfigure.py): views added, changed, removed by
fingerprint; any other section changed is refused."""
from __future__ import annotations

import pytest

from cdc.catalog import TableInfo
from pgderive.runtime.reconfigure import ReloadRefused, plan_reload
from views.derive import View
from views.spec import parse_spec

BASE = """
source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks:
  cache: {type: redis}
views:
  a: {table: public.t, sink: cache, key: "a:{id}", fields: [id, v]}
  b: {table: public.t, sink: cache, key: "b:{id}", fields: [id]}
"""
T = TableInfo("public.t", {"id": "bigint", "v": "text"}, ("id",), "d", ("id",))


def bound(text: str):
    spec = parse_spec(text)
    return spec, [View(n, spec.views[n], T) for n in spec.views]


def test_added_changed_and_removed_views_by_fingerprint():
    old, old_views = bound(BASE)
    new, new_views = bound(BASE.replace('fields: [id]}', 'fields: [id, v]}')
                           .replace('  a: {', '  c: {table: public.t, sink: cache, key: "c:{id}", fields: [v]}\n  a: {')
                           .replace('  a: {table: public.t, sink: cache, key: "a:{id}", fields: [id, v]}\n', ''))
    plan = plan_reload(old, new, old_views, new_views)
    assert (plan.added, plan.changed, plan.removed) == (["c"], ["b"], ["a"])
    assert plan.summary() == "added c; changed b; removed a"
    assert not plan.empty


def test_the_same_file_changes_nothing():
    old, views = bound(BASE)
    plan = plan_reload(old, bound(BASE)[0], views, bound(BASE)[1])
    assert plan.empty and plan.summary() == "no view changed"


@pytest.mark.parametrize("edit", [
    ('slot: s}', 'slot: other}'),
    ('cache: {type: redis}', 'cache: {type: redis, url: "redis://127.0.0.1:6390/0"}'),
    ('views:', 'bootstrap: {concurrency: 4}\nviews:'),
    ('views:', 'dead_letters: {max_bytes: 2048}\nviews:'),
])
def test_a_change_outside_views_is_refused(edit):
    old, views = bound(BASE)
    new, new_views = bound(BASE.replace(*edit))
    with pytest.raises(ReloadRefused, match="only views can change without a restart"):
        plan_reload(old, new, views, new_views)


def test_the_classification_policy_may_change_on_reload():
    # classification and a sink's allow are taken (build_views has checked the new file's
    # policy before plan_reload sees it); nothing is rebuilt, the summary says so.
    old, views = bound(BASE)
    text = BASE.replace("cache: {type: redis}", "cache: {type: redis, allow: [pii]}").replace(
        "views:", "classification: {public.t.v: pii}\nviews:")
    new, new_views = bound(text)
    plan = plan_reload(old, new, views, new_views)
    assert plan.empty and plan.policy_changed
    assert plan.summary() == "no view changed; classification policy changed"
    assert plan.spec.classification == {"public.t.v": ["pii"]}
    # the same file again: no policy change
    assert not plan_reload(new, bound(text)[0], new_views, bound(text)[1]).policy_changed


def test_a_sink_change_besides_allow_is_still_refused():
    old, views = bound(BASE)
    new, new_views = bound(BASE.replace("cache: {type: redis}",
                                        'cache: {type: redis, allow: [pii], url: "redis://127.0.0.1:6390/0"}'))
    with pytest.raises(ReloadRefused, match=r"section\(s\) sinks changed"):
        plan_reload(old, new, views, new_views)


def test_a_reload_that_breaks_the_policy_is_refused_before_planning():
    # The daemon binds the new file with build_views, which runs views.policy: a tightened
    # policy under a running view never reaches plan_reload.
    from views.policy import policy_problems

    text = BASE.replace("views:", "classification: {public.t.v: pii}\nviews:")
    new = parse_spec(text)
    assert [p for p, _ in policy_problems(new, {"public.t": T})] == ["views.a.fields[1]"]
