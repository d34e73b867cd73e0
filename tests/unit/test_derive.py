"""Derivation of Ops from Changes and their collapse in a batch (no services needed)."""
from __future__ import annotations

import pytest

from cdc.changes import Change
from pgderive.runtime.batch import Batch
from cdc.catalog import TableInfo
from views.derive import DerivationError, View
from views.spec import parse_spec

SPEC = """
source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks: {cache: {type: redis}}
views:
  v:
    table: public.t
    sink: cache
    key: "t:{id}"
    fields: {ident: id, label: name, body: big}
"""
INFO = TableInfo("public.t", {"id": "integer", "name": "text", "big": "text"}, ("id",), "d", ("id",))


@pytest.fixture
def view() -> View:
    return View("v", parse_spec(SPEC).views["v"], INFO)


def test_insert_update_delete(view: View):
    [op] = view.change_ops(Change("insert", "public.t", new={"id": 1, "name": "a", "big": "x"}), 10)
    assert (op.key, op.version, op.doc, op.partial) == ("t:1", 10, {"ident": 1, "label": "a", "body": "x"}, False)
    [op] = view.change_ops(Change("delete", "public.t", old_key={"id": 1}), 11)
    assert op.key == "t:1" and op.doc is None and op.version == 11


def test_key_change_deletes_the_old_key(view: View):
    ops = view.change_ops(Change("update", "public.t", new={"id": 2, "name": "a", "big": "x"},
                                 old_key={"id": 1}), 12)
    assert [(o.key, o.doc is None) for o in ops] == [("t:1", True), ("t:2", False)]


def test_unchanged_toast_becomes_a_partial_update(view: View):
    # wal2json omits an unchanged TOASTed column ("big") from the update.
    [op] = view.change_ops(Change("update", "public.t", new={"id": 1, "name": "b"}), 13)
    assert op.partial and op.doc == {"ident": 1, "label": "b"}


def test_null_key_is_a_derivation_error(view: View):
    with pytest.raises(DerivationError, match="NULL"):
        view.change_ops(Change("insert", "public.t", new={"id": None, "name": "a", "big": None}), 1)


def test_key_outside_replica_identity_is_refused():
    spec = parse_spec(SPEC.replace('"t:{id}"', '"t:{name}"')).views["v"]
    with pytest.raises(ValueError, match="replica identity"):
        View("v", spec, INFO)


def test_batch_collapses_per_key_and_merges_partials(view: View):
    b = Batch()
    for op in view.change_ops(Change("insert", "public.t", new={"id": 1, "name": "a", "big": "x"}), 10):
        b.add(op)
    for op in view.change_ops(Change("update", "public.t", new={"id": 1, "name": "b"}), 20):
        b.add(op)
    [op] = b.ops.values()
    assert not op.partial and op.version == 20 and op.doc == {"ident": 1, "label": "b", "body": "x"}
    for op in view.change_ops(Change("delete", "public.t", old_key={"id": 1}), 30):
        b.add(op)
    [op] = b.ops.values()
    assert op.doc is None and op.version == 30
    assert len(b) == 1


def test_dropped_column_is_an_error_not_a_partial_write():
    info = TableInfo("public.t", {"id": "integer", "name": "text", "big": "text"}, ("id",), "d", ("id",))
    spec = parse_spec(SPEC.replace("body: big", "body: big, n: id")).views["v"]
    v = View("v", spec, info)
    # An INSERT without a projected column: the column was dropped/renamed.
    with pytest.raises(DerivationError, match="missing from the insert"):
        v.change_ops(Change("insert", "public.t", new={"id": 1, "name": "a"}), 1)


def test_update_missing_a_fixed_width_column_is_an_error():
    info = TableInfo("public.t", {"id": "integer", "name": "text", "qty": "integer"}, ("id",), "d", ("id",))
    spec = parse_spec(SPEC.replace("{ident: id, label: name, body: big}", "{ident: id, label: name, q: qty}")).views["v"]
    v = View("v", spec, info)
    with pytest.raises(DerivationError, match="qty"):
        v.change_ops(Change("update", "public.t", new={"id": 1, "name": "a"}), 1)


def test_a_derive_failure_carries_the_row_key():
    # issue 14 item 12: dead letters of derive failures showed key '-'
    spec = parse_spec(SPEC.replace("    fields:", "    derive: tests.derivations:product_card\n    fields:")
                      .replace("{ident: id, label: name, body: big}", "{name: name, price: id}")).views["v"]
    v = View("v", spec, INFO)
    with pytest.raises(DerivationError) as e:
        v.change_ops(Change("insert", "public.t", new={"id": 7, "name": "boom", "big": "x"}), 1)
    assert e.value.key == "t:7" and "boom is not a product" in e.value.reason
    with pytest.raises(DerivationError) as e:
        v.row_op({"id": 8, "name": "boom", "big": "x"}, 1)
    assert e.value.key == "t:8"


def test_dead_letter_rows_keep_only_what_the_view_reads():
    info = TableInfo("public.t", {"id": "integer", "code": "text", "name": "text", "blob": "text", "w": "integer"},
                     ("id",), "f", ("id", "code", "name", "blob", "w"))
    spec = parse_spec(SPEC.replace('"t:{id}"', '"t:{code}"').replace("{ident: id, label: name, body: big}", "[name]")
                      .replace("    fields:", "    where: \"w > 0\"\n    fields:")).views["v"]
    v = View("v", spec, info)
    row = {"id": 1, "code": None, "name": "n", "blob": "x" * 1000, "w": 3}
    assert v.dead_letter_row(row) == {"id": 1, "code": None, "name": "n", "w": 3}  # identity, key, fields, where
    assert v.row_identity(row) == {"id": 1}
    assert v.row_identity({"code": "c"}) is None and v.dead_letter_row(None) is None


def test_an_update_from_a_null_key_to_a_valid_one_writes_the_record():
    # issue 14 item 6: the old key could not be rendered, so the update itself failed
    info = TableInfo("public.t", {"id": "integer", "code": "text"}, ("id",), "f", ("id", "code"))
    v = View("v", parse_spec(SPEC.replace('"t:{id}"', '"t:{code}"').replace("{ident: id, label: name, body: big}",
                                                                            "[id, code]")).views["v"], info)
    ops = v.change_ops(Change("update", "public.t", new={"id": 1, "code": "a"}, old_key={"id": 1, "code": None}), 5)
    assert [(o.key, o.doc) for o in ops] == [("t:a", {"id": 1, "code": "a"})]
    with pytest.raises(DerivationError):  # the other way round the new key is the problem
        v.change_ops(Change("update", "public.t", new={"id": 1, "code": None}, old_key={"id": 1, "code": "a"}), 6)


def test_a_delete_of_a_keyless_row_deletes_nothing():
    info = TableInfo("public.t", {"id": "integer", "code": "text"}, ("id",), "f", ("id", "code"))
    v = View("v", parse_spec(SPEC.replace('"t:{id}"', '"t:{code}"').replace("{ident: id, label: name, body: big}",
                                                                            "[id, code]")).views["v"], info)
    assert v.change_ops(Change("delete", "public.t", old_key={"id": 1, "code": None}), 5) == []
    with pytest.raises(DerivationError):  # a key column missing (dropped?) is still an error
        v.change_ops(Change("delete", "public.t", old_key={"id": 1}), 5)
