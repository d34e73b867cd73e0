"""Lineage (views/lineage.py) and its renderings (pgderive/ops/lineage.py), without a database:
the widget store's catalog facts stand in for check_source's."""
from __future__ import annotations

import json
from pathlib import Path

from pgderive.ops.lineage import lineage_document, render_dot, render_json, render_text
from views.lineage import UNDECLARED, analyze
from views.spec import load_spec, parse_spec

from .store_catalog import CATALOG

ROOT = Path(__file__).resolve().parents[2]

HEAD = """
source: {dsn: "postgresql://x@127.0.0.1/store", slot: s}
sinks:
  cache: {type: redis}
  search: {type: opensearch, hosts: ["http://127.0.0.1:9201"]}
classification: {public.customers.email: [pii, contact]}
views:
"""


def store():
    spec = load_spec(ROOT / "config" / "store.yaml")
    return spec, analyze(spec, CATALOG)


def flows_of(lineage, view):
    return [(f.how, f.column, f.field) for v in lineage.views if v.name == view for f in v.flows]


def test_store_order_cache_two_levels_deep():
    _, lineage = store()
    flows = flows_of(lineage, "order_cache")
    assert ("key", "public.orders.id", "(key)") in flows
    assert ("include", "public.customers.name", "customer.name") in flows
    assert ("include", "public.products.name", "items[].product.name") in flows
    assert ("join", "public.order_items.order_id", None) in flows
    assert ("order_by", "public.order_items.id", None) in flows
    route = next(f.route for v in lineage.views for f in v.flows if f.field == "items[].product.name")
    assert route == "include items (many) -> include product -> field name"
    name = next(f for f in lineage.flows if f.column == "public.customers.name")
    assert name.tags == ("pii",) and name.path == "views.order_cache.include.customer.fields[0]"


def test_store_aggregate_view_stores_groups_and_aggregates_only():
    _, lineage = store()
    flows = flows_of(lineage, "category_stats")
    copied = sorted((h, c, f) for h, c, f in flows if h not in ("where", "join", "order_by"))
    assert copied == [
        ("aggregate", "public.inventory.stock", "total_stock"),
        ("aggregate", "public.products.price", "avg_price"),
        ("aggregate", "public.products.price", "max_price"),
        ("aggregate", "public.products.price", "min_price"),
        ("group_by", "public.products.category_id", "category_id"),
        ("key", "public.products.category_id", "(key)"),
    ]  # count(*) reads no column; the include's stock is not a field of its own
    assert ("where", "public.products.category_id", None) in flows


def test_where_columns_are_read_not_copied():
    _, lineage = store()
    where = [f for f in lineage.flows if f.how == "where"]
    assert {(f.view, f.column) for f in where} == {("category_stats", "public.products.category_id"),
                                                   ("low_stock", "public.inventory.stock")}
    assert not any(f.copied for f in where)
    assert all(f.route == "where (filters rows, not stored)" for f in where)


def test_opensearch_key_defaults_to_the_primary_key_as_document_id():
    _, lineage = store()
    ps = next(v for v in lineage.views if v.name == "product_search")
    assert (ps.sink_type, ps.target, ps.key) == ("opensearch", "product_search", "{id}")
    assert ps.flows[0].how == "key" and ps.flows[0].route == 'document _id "{id}"' and ps.flows[0].path == "views.product_search"


def test_every_column_when_fields_are_omitted():
    spec = parse_spec(HEAD + "  c: {table: customers, sink: search, index: c}\n")
    lineage = analyze(spec, CATALOG)
    assert [(f.how, f.field, f.tags) for f in lineage.flows if f.how == "projection"] == [
        ("projection", "id", ()), ("projection", "name", ()), ("projection", "email", ("pii", "contact"))]


def test_undeclared_derive_marks_the_record_it_receives():
    spec = parse_spec(HEAD + """
  c: {table: customers, sink: cache, key: "c:{id}", fields: [name], derive: tests.derivations:shout}
""")
    lineage = analyze(spec, CATALOG)
    name = next(f for f in lineage.flows if f.field == "name")
    assert name.derive == UNDECLARED
    assert name.route == "field name -> derive tests.derivations:shout (undeclared: reads the whole record)"
    key = next(f for f in lineage.flows if f.how == "key")
    assert key.derive is None  # the key is rendered from the row, not from the function's result


def test_declared_derive_routes_reads_to_outputs():
    spec = parse_spec(HEAD + """
  c:
    table: orders
    sink: cache
    key: "c:{id}"
    fields: [id, status]
    include:
      buyer: {table: customers, on: {customer_id: id}, fields: [email, name]}
    derive: tests.derivations:shout
    derive_reads: [buyer]
    outputs: [contact]
""")
    lineage = analyze(spec, CATALOG)
    derived = [(f.column, f.field, f.path, f.tags) for f in lineage.flows if f.how == "derive"]
    assert derived == [("public.customers.email", "contact", "views.c.outputs[0]", ("pii", "contact")),
                       ("public.customers.name", "contact", "views.c.outputs[0]", ())]
    assert not [f for f in lineage.flows if f.how in ("projection", "include")]  # not read: not stored
    assert lineage.problems == ()


def test_json_document_is_stable_and_carries_verdicts():
    spec, lineage = store()
    doc = lineage_document(lineage, spec)
    assert json.loads(render_json(lineage, spec)) == doc
    assert render_json(lineage, spec) == render_json(store()[1], store()[0])
    assert doc["sinks"] == {"cache": {"type": "redis", "allow": ["pii"]}, "search": {"type": "opensearch", "allow": []}}
    assert [v["view"] for v in doc["views"]] == ["product_search", "order_cache", "category_stats", "low_stock"]
    assert all(f["allowed"] for v in doc["views"] for f in v["flows"])


def test_text_and_dot_show_classification_and_refusals():
    spec = parse_spec(HEAD + "  c: {table: customers, sink: search, index: c, fields: [id, email]}\n")
    lineage = analyze(spec, CATALOG)
    text = render_text(lineage, spec)
    line = next(ln for ln in text.splitlines() if "public.customers.email" in ln and "projection" in ln)
    assert "pii,contact" in line and line.endswith("field email  REFUSED")
    dot = render_dot(lineage, spec)
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert '"col:public.customers.email" [shape=ellipse, color=red, fontcolor=red, style=bold, label="email [pii, contact]"];' in dot
    assert '"col:public.customers.email" -> "view:c" [label="projection REFUSED", color=red' in dot
    assert 'label="sink search (allows: none)"' in dot
