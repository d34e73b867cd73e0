"""wal2json format-2 decoding and LSN helpers (no services needed)."""
from __future__ import annotations

import orjson
import pytest

from cdc.lsn import format_lsn, parse_lsn, version_hex
from cdc.wal2json import DecodeError, Wal2JsonDecoder, add_tables_entry, plugin_options, replication_literal


def msg(**kw) -> bytes:
    return orjson.dumps(kw)


def test_lsn_round_trip():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/19B4C88")) == "0/19B4C88"
    assert version_hex(1) < version_hex(0x1_0000_0000)
    with pytest.raises(ValueError):
        parse_lsn("19B4C88")


def test_transaction_assembly_and_types():
    d = Wal2JsonDecoder()
    assert d.feed(msg(action="B", xid=7, timestamp="2026-11-23 10:39:55.709476+00",
                      lsn="0/20", nextlsn="0/30")) is None
    assert d.in_transaction
    d.feed(msg(action="I", xid=7, lsn="0/10", schema="public", table="t", columns=[
        {"name": "id", "type": "integer", "value": 1},
        {"name": "ok", "type": "boolean", "value": True},
        {"name": "doc", "type": "jsonb", "value": '{"a": [1, 2]}'},
        {"name": "note", "type": "text", "value": None},
        {"name": "c", "type": "character(4)", "value": "ab  "},
    ]))
    d.feed(msg(action="U", xid=7, lsn="0/11", schema="public", table="t",
               columns=[{"name": "id", "type": "integer", "value": 5}],
               identity=[{"name": "id", "type": "integer", "value": 1}]))
    d.feed(msg(action="D", xid=7, lsn="0/12", schema="public", table="t",
               identity=[{"name": "id", "type": "integer", "value": 5}]))
    d.feed(msg(action="T", xid=7, lsn="0/13", schema="public", table="t"))
    tx = d.feed(msg(action="C", xid=7, lsn="0/20", nextlsn="0/30"))
    assert tx is not None and not d.in_transaction
    assert (tx.xid, tx.commit_lsn, tx.end_lsn) == (7, 0x20, 0x30)
    assert tx.commit_time is not None and tx.commit_time.utcoffset().total_seconds() == 0
    ins, upd, dele, trunc = tx.changes
    assert ins.kind == "insert" and ins.table == "public.t"
    assert ins.new == {"id": 1, "ok": True, "doc": {"a": [1, 2]}, "note": None, "c": "ab  "}
    assert upd.new == {"id": 5} and upd.old_key == {"id": 1}
    assert dele.kind == "delete" and dele.old_key == {"id": 5} and dele.new is None
    assert trunc.kind == "truncate"


def test_numeric_is_lossless():
    d = Wal2JsonDecoder()
    d.feed(b'{"action":"B","xid":1,"lsn":"0/2","nextlsn":"0/3"}')
    d.feed(b'{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"n","columns":['
           b'{"name":"a","type":"numeric","value":12345678901234567890.123456789012345678901},'
           b'{"name":"b","type":"numeric(10,2)","value":1.50},'
           b'{"name":"c","type":"numeric","value":7},'
           b'{"name":"f","type":"double precision","value":0.1}]}')
    tx = d.feed(b'{"action":"C","xid":1,"lsn":"0/2","nextlsn":"0/3"}')
    row = tx.changes[0].new
    assert row["a"] == "12345678901234567890.123456789012345678901"
    assert row["b"] == "1.50"
    assert row["c"] == "7"
    assert row["f"] == 0.1


def test_out_of_order_messages_are_rejected():
    d = Wal2JsonDecoder()
    with pytest.raises(DecodeError):
        d.feed(b'{"action":"I","schema":"public","table":"t","columns":[]}')
    d.feed(b'{"action":"B","xid":1,"lsn":"0/2","nextlsn":"0/3"}')
    with pytest.raises(DecodeError):
        d.feed(b'{"action":"B","xid":2,"lsn":"0/4","nextlsn":"0/5"}')


def test_plugin_options_filter_tables():
    opts = plugin_options(["public.b", "public.a", "we.ird,name"])
    assert opts["format-version"] == "2"
    assert opts["add-tables"] == "public.a,public.b,we.ird\\,name"
    assert "add-tables" not in plugin_options(None)


def test_add_tables_entries_escape_everything_wal2json_parses():
    # wal2json.c string_to_SelectTable/parse_table_identifier: ',' and whitespace split entries,
    # the first '.' splits schema from table, '*' alone is a wildcard, '\\' escapes one byte.
    assert add_tables_entry("My Schema", "a.b,c") == "My\\ Schema.a\\.b\\,c"
    assert add_tables_entry("s", "*") == "s.\\*"
    assert add_tables_entry("s", "a\\b") == "s.a\\\\b"
    assert add_tables_entry("s", "it's größe") == "s.it\\'s\\ gr\\ö\\ße"
    assert add_tables_entry("Public", "Mixed_Case9") == "Public.Mixed_Case9"


def test_replication_literal_is_standard_conforming():
    # the walsender's grammar has no E'' strings: backslashes stay as they are, quotes double
    assert replication_literal("a\\,b") == "'a\\,b'"
    assert replication_literal("it's") == "'it''s'"
    with pytest.raises(ValueError):
        replication_literal("a\x00b")


def test_null_floats_and_numerics_are_flagged_as_maybe_nonfinite():
    """wal2json prints NaN/±Infinity as null: such columns (and only those) are flagged."""
    d = Wal2JsonDecoder()
    d.feed(msg(action="B", xid=1, lsn="0/20", nextlsn="0/30"))
    cols = [{"name": "id", "type": "integer", "value": None},
            {"name": "f4", "type": "real", "value": None},
            {"name": "f8", "type": "double precision", "value": None},
            {"name": "n", "type": "numeric(12,2)", "value": None},
            {"name": "arr", "type": "numeric[]", "value": None},
            {"name": "t", "type": "text", "value": None},
            {"name": "ok", "type": "numeric", "value": "1.5"}]
    d.feed(msg(action="I", schema="public", table="t", columns=cols))
    d.feed(msg(action="U", schema="public", table="t", columns=cols, identity=cols[:2]))
    d.feed(msg(action="D", schema="public", table="t", identity=cols[:2]))
    tx = d.feed(msg(action="C"))
    assert [c.maybe_nonfinite for c in tx.changes] == [("f4", "f8", "n"), ("f4", "f8", "n"), ()]


def test_exact_numbers_beside_the_fast_path():
    """Messages are parsed by orjson; one holding a numeric, or a float zero (maybe -0), is read
    again keeping number literals exact, in its identity too, and the next message is fast again."""
    import math

    d = Wal2JsonDecoder()
    d.feed(b'{"action":"B","xid":1,"lsn":"0/20","nextlsn":"0/30"}')
    d.feed(b'{"action":"U","schema":"public","table":"t","columns":['
           b'{"name":"id","type":"bigint","value":9223372036854775807},'
           b'{"name":"n","type":"numeric(30,10)","value":12345678901234567890.1234567891},'
           b'{"name":"f","type":"double precision","value":-0},'
           b'{"name":"ok","type":"boolean","value":true},{"name":"s","type":"text","value":"-0"}],'
           b'"identity":[{"name":"f","type":"real","value":-0}]}')
    d.feed(b'{"action":"I","schema":"public","table":"t","columns":['
           b'{"name":"id","type":"integer","value":2},{"name":"f","type":"real","value":0},'
           b'{"name":"g","type":"double precision","value":100000},{"name":"b","type":"bytea","value":"0aff"}]}')
    d.feed(b'{"action":"I","schema":"public","table":"t","columns":['
           b'{"name":"id","type":"integer","value":3},{"name":"f","type":"real","value":0.5},'
           b'{"name":"j","type":"jsonb","value":"{\\"a\\": [1, 2.5]}"}]}')
    tx = d.feed(b'{"action":"C","xid":1,"lsn":"0/20","nextlsn":"0/30"}')
    upd, zero, fast = (c.new for c in tx.changes)
    assert upd["id"] == 9223372036854775807 and type(upd["id"]) is int
    assert upd["n"] == "12345678901234567890.1234567891"
    assert math.copysign(1.0, upd["f"]) == -1.0 and upd["ok"] is True and upd["s"] == "-0"
    assert math.copysign(1.0, tx.changes[0].old_key["f"]) == -1.0
    assert math.copysign(1.0, zero["f"]) == 1.0 and type(zero["f"]) is float
    assert zero["g"] == 100000.0 and type(zero["g"]) is float and zero["b"] == "\\x0aff"
    assert fast == {"id": 3, "f": 0.5, "j": {"a": [1, 2.5]}}
