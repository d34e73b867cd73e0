"""The classification policy (views/policy.py): a classified column may reach a sink only when
the sink allows its tag; each refusal names the YAML path of the copy and the column's route."""
from __future__ import annotations

import pytest

from cdc.catalog import TableInfo
from cdc.changes import Change
from views.derive import DerivationError, View
from views.policy import policy_problems
from views.spec import SpecError, parse_spec

from .store_catalog import CATALOG

HEAD = """
source: {dsn: "postgresql://x@127.0.0.1/store", slot: s}
sinks:
  cache: {type: redis}
  search: {type: opensearch, hosts: ["http://127.0.0.1:9201"]%(allow)s}
classification:
  public.customers.email: pii
  public.products.price: [commercial]
  public.customers.name: [pii]
views:
"""


def problems(views: str, allow: str = "", classification: str | None = None) -> list[str]:
    text = HEAD % {"allow": allow} + views
    if classification is not None:
        text = text.replace("""  public.customers.email: pii
  public.products.price: [commercial]
  public.customers.name: [pii]
""", classification)
    spec = parse_spec(text, filename="store.yaml")
    found = policy_problems(spec, CATALOG)
    return [str(spec.error(p, m)) for p, m in found]


def test_a_direct_copy_into_a_sink_without_allow_is_refused():
    got = problems("""
  customer_docs: {table: customers, sink: search, index: customers, fields: [id, email]}
""")
    assert got == ["store.yaml:12: views.customer_docs.fields[1]: public.customers.email (pii) reaches sink search"
                   " (allows: none) via field email"]


def test_a_renamed_copy_is_refused_at_the_mapping_entry():
    got = problems("""
  customer_docs:
    table: customers
    sink: search
    index: customers
    fields: {id: id, mail: email}
""")
    assert len(got) == 1
    assert "views.customer_docs.fields.mail: public.customers.email (pii) reaches sink search (allows: none)" \
           " via field mail (renamed from email)" in got[0]


def test_a_classified_key_column_is_refused():
    got = problems("""
  by_mail: {table: customers, sink: cache, key: "customer:{email}", fields: [id]}
""")
    assert got == ['store.yaml:12: views.by_mail.key: public.customers.email (pii) reaches sink cache (allows: none)'
                   ' via key "customer:{email}"']


def test_an_include_two_levels_deep_is_refused_with_its_route():
    got = problems("""
  item_docs:
    table: order_items
    sink: search
    index: items
    fields: [id, quantity]
    include:
      order:
        table: orders
        on: {order_id: id}
        fields: [id, status]
        include:
          buyer: {table: customers, on: {customer_id: id}, fields: {id: id, mail: email}}
""")
    assert len(got) == 1, got
    assert got[0].endswith("views.item_docs.include.order.include.buyer.fields.mail: public.customers.email (pii)"
                           " reaches sink search (allows: none) via include order -> include buyer -> field mail"
                           " (renamed from email)")


def test_the_example_of_the_brief():
    got = problems("""
  order_docs:
    table: orders
    sink: search
    index: orders
    include:
      customer: {table: customers, on: {customer_id: id}, fields: {mail: email}}
""")
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.order_docs.include.customer.fields.mail: public.customers.email (pii) reaches sink search"
        " (allows: none) via include customer -> field mail (renamed from email)"]


def test_an_aggregate_input_is_refused_even_count():
    got = problems("""
  price_stats:
    table: products
    sink: cache
    key: "stats:{category_id}"
    group_by: [category_id]
    aggregate: {n: "count(*)", priced: "count(price)", top: "max(price)"}
""")
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.price_stats.aggregate.priced: public.products.price (commercial) reaches sink cache (allows: none)"
        " via aggregate count(price) -> field priced",
        "views.price_stats.aggregate.top: public.products.price (commercial) reaches sink cache (allows: none)"
        " via aggregate max(price) -> field top"]


def test_an_aggregate_group_by_is_refused_and_key_too():
    got = problems("""
  per_mail:
    table: customers
    sink: cache
    key: "per_mail:{email}"
    group_by: [email]
    aggregate: {n: "count(*)"}
""")
    paths = sorted(g.split(": ", 2)[1] for g in got)
    assert paths == ["views.per_mail.group_by[0]", "views.per_mail.key"]
    assert any("via group_by -> field email" in g for g in got)


def test_an_aggregate_over_an_include_field_is_refused_with_the_include():
    got = problems("""
  stock_by_category:
    table: products
    sink: cache
    key: "sbc:{category_id}"
    include:
      inventory: {table: inventory, on: {id: product_id}, fields: [stock]}
    group_by: [category_id]
    aggregate: {total: "sum(inventory.stock)"}
""", classification="  public.inventory.stock: secret\n")
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.stock_by_category.aggregate.total: public.inventory.stock (secret) reaches sink cache (allows: none)"
        " via include inventory -> aggregate sum(inventory.stock) -> field total"]


def test_an_undeclared_derive_over_a_classified_column_is_refused():
    got = problems("""
  cards:
    table: customers
    sink: search
    index: cards
    fields: [id, email]
    derive: tests.derivations:shout
""")
    assert len(got) == 1 and "views.cards.derive: public.customers.email (pii) reaches sink search (allows: none)" \
        " via field email -> derive tests.derivations:shout (undeclared: reads the whole record): Python code" \
        " cannot be checked; declare derive_reads and outputs" in got[0], got


DECLARED = """
  cards:
    table: customers
    sink: search
    index: cards
    fields: [id, name, email]
    derive: tests.derivations:shout
    derive_reads: [id, email]
    outputs: [id, domain]
"""


def test_a_declared_derive_is_refused_into_a_sink_that_does_not_allow():
    got = problems(DECLARED)
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.cards.outputs[0]: public.customers.email (pii) reaches sink search (allows: none)"
        " via field email -> derive tests.derivations:shout -> output id",
        "views.cards.outputs[1]: public.customers.email (pii) reaches sink search (allows: none)"
        " via field email -> derive tests.derivations:shout -> output domain"]


def test_a_declared_derive_is_accepted_into_a_sink_that_allows():
    assert problems(DECLARED, allow=", allow: [pii]") == []


def test_a_declared_derive_that_does_not_read_the_classified_column_is_accepted():
    assert problems(DECLARED.replace("derive_reads: [id, email]", "derive_reads: [id]")) == []


def test_derive_reads_must_name_fields_of_the_record():
    got = problems(DECLARED.replace("derive_reads: [id, email]", "derive_reads: [id, mail]"))
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.cards.derive_reads[1]: 'mail' is not a field of the record tests.derivations:shout receives"
        " (fields: email, id, name)"]


def test_a_sink_that_allows_the_tag_accepts_the_copy():
    assert problems("""
  customer_docs: {table: customers, sink: search, index: customers, fields: [id, email, name]}
""", allow=", allow: [pii]") == []


def test_allowing_one_tag_does_not_allow_another():
    got = problems("""
  product_docs: {table: products, sink: search, index: products, fields: [id, price]}
""", allow=", allow: [pii]")
    assert len(got) == 1 and "public.products.price (commercial) reaches sink search (allows: pii)" in got[0]


def test_unclassified_columns_go_anywhere():
    assert problems("""
  orders: {table: orders, sink: search, index: orders, fields: [id, customer_id, status]}
  products: {table: products, sink: cache, key: "p:{id}", fields: [id, name, description]}
""") == []


def test_a_where_on_a_classified_column_is_accepted():
    assert problems("""
  with_mail:
    table: customers
    sink: search
    index: with_mail
    fields: [id]
    where: "email IS NOT NULL AND email LIKE '%@example.com'"
""") == []


def test_joining_and_ordering_on_classified_columns_is_accepted():
    assert problems("""
  orders:
    table: orders
    sink: search
    index: orders
    fields: [id]
    include:
      buyer: {table: customers, on: {customer_id: id}, fields: [name]}
      lines: {table: order_items, on: {id: order_id}, many: true, order_by: [unit_price desc], fields: [id]}
""", classification="  public.orders.customer_id: pii\n  public.customers.id: pii\n"
                     "  public.order_items.order_id: pii\n  public.order_items.unit_price: secret\n") == []


def test_all_columns_of_a_table_include_the_classified_ones():
    got = problems("""
  customers: {table: customers, sink: search, index: customers}
""")
    assert sorted(g.split(": ", 2)[1] for g in got) == ["views.customers", "views.customers"]
    assert any("public.customers.email (pii)" in g and "via field email" in g for g in got)


def test_an_unknown_classified_column_is_refused_with_its_path():
    got = problems("""
  orders: {table: orders, sink: search, index: orders, fields: [id]}
""", classification="  public.customers.emial: pii\n  public.nope.x: secret\n")
    assert got == ["store.yaml:7: classification.public.customers.emial: unknown column 'emial' in table"
                   " public.customers (did you mean 'email'?)",
                   "store.yaml:8: classification.public.nope.x: unknown table public.nope: classify columns of"
                   " existing tables (schema.table.column)"]


def test_a_view_in_two_sinks_is_checked_per_sink():
    got = problems("""
  customers:
    table: customers
    sink: [cache, search]
    key: "c:{id}"
    index: customers
    fields: [id, email]
""", allow=", allow: [pii]")
    assert [g.split(": ", 1)[1] for g in got] == [
        "views.customers.fields[1]: public.customers.email (pii) reaches sink cache (allows: none) via field email"]


@pytest.mark.parametrize("yaml_text, message", [
    ("classification: {public.customers: pii}", "classification.public.customers: expected schema.table.column"),
    ("classification: {public.customers.email: PII}", "invalid tag 'PII'"),
    ("classification: {public.customers.email: [pii, 3]}", "classification.public.customers.email[1]: invalid tag"),
])
def test_malformed_classification_is_refused_by_the_spec(yaml_text, message):
    text = (HEAD % {"allow": ""}).replace("""classification:
  public.customers.email: pii
  public.products.price: [commercial]
  public.customers.name: [pii]
""", yaml_text + "\n") + "  o: {table: orders, sink: search, index: o}\n"
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(text, filename="store.yaml")


def test_derive_declarations_go_together_and_need_derive():
    base = (HEAD % {"allow": ""}) + "  o: {table: orders, sink: search, index: o, %s}\n"
    with pytest.raises(SpecError, match="derive_reads and outputs go together"):
        parse_spec(base % "derive: tests.derivations:shout, derive_reads: [id]")
    with pytest.raises(SpecError, match="declare a derive function"):
        parse_spec(base % "derive_reads: [id], outputs: [id]")


def test_the_daemon_enforces_the_declaration():
    # The function sees only the declared reads; an undeclared output field is a dead letter.
    spec = parse_spec((HEAD % {"allow": ""}) + """
  cards:
    table: customers
    sink: cache
    key: "card:{id}"
    fields: [id, name, email]
    derive: tests.derivations:shout
    derive_reads: [id, name]
    outputs: [id, name, v]
""")
    view = View("cards", spec.views["cards"], CATALOG["public.customers"])
    change = Change("insert", "public.customers", {"id": 1, "name": "ann", "email": "a@x"}, None)
    ops = view.change_ops(change, 10)
    assert [op.doc for op in ops] == [{"id": 1, "name": "ann", "v": ""}]  # shout saw no email
    narrow = parse_spec((HEAD % {"allow": ""}) + """
  cards:
    table: customers
    sink: cache
    key: "card:{id}"
    fields: [id, name, email]
    derive: tests.derivations:shout
    derive_reads: [id, name]
    outputs: [id, name]
""")
    view = View("cards", narrow.views["cards"], CATALOG["public.customers"])
    with pytest.raises(DerivationError, match=r"returned undeclared field\(s\) v \(outputs: id, name\)"):
        view.change_ops(change, 10)
