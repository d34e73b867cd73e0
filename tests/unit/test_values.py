"""The value model (cdc.values): snapshot text and wal2json JSON give the same model value."""
from __future__ import annotations

import math

import orjson
import pytest

from cdc.values import NONFINITE, converter, is_numeric_type
from cdc.wal2json import Wal2JsonDecoder, loads_message


def stream_value(type_name: str, literal: bytes):
    """The model value of one column whose wal2json value is the JSON ``literal``."""
    d = Wal2JsonDecoder()
    d.feed(b'{"action":"B","xid":1,"lsn":"0/2","nextlsn":"0/3"}')
    d.feed(b'{"action":"I","xid":1,"lsn":"0/1","schema":"public","table":"t","columns":['
           b'{"name":"v","type":"' + type_name.encode() + b'","value":' + literal + b'}]}')
    return d.feed(b'{"action":"C","xid":1,"lsn":"0/2","nextlsn":"0/3"}').changes[0].new["v"]


def same(a, b) -> bool:
    """Equal including the type and the sign of zero (0.0 == -0.0 in Python)."""
    return type(a) is type(b) and repr(a) == repr(b)


@pytest.mark.parametrize("type_name, text, literal", [
    ("double precision", "1e-300", b"1e-300"),
    ("double precision", "1.7976931348623157e+308", b"1.7976931348623157e+308"),
    ("double precision", "-0", b"-0"),
    ("double precision", "100000", b"100000"),
    ("double precision", "0.1", b"0.1"),
    ("real", "-0", b"-0"),
    ("real", "1e-45", b"1e-45"),
    ("real", "3.4028235e+38", b"3.4028235e+38"),
    ("integer", "-2147483648", b"-2147483648"),
    ("bigint", "9223372036854775807", b"9223372036854775807"),
    ("bigint", "-9223372036854775808", b"-9223372036854775808"),
    ("numeric", "1234567890123456789012345678901234567890", b"1234567890123456789012345678901234567890"),
    ("numeric(12,2)", "-0.50", b"-0.50"),
    ("numeric", "7", b"7"),
    ("numeric", "1" + "0" * 5000, b"1" + b"0" * 5000),  # beyond Python's int-string limit
])
def test_snapshot_and_stream_agree(type_name, text, literal):
    snap = converter(type_name)(text)
    assert same(snap, stream_value(type_name, literal))


def test_float_negative_zero_survives_the_stream():
    assert math.copysign(1.0, stream_value("double precision", b"-0")) == -1.0
    assert math.copysign(1.0, stream_value("real", b"-0")) == -1.0
    # ... even beside other columns and in the identity.
    msg = loads_message(b'{"action":"U","columns":[{"name":"f","type":"real","value":-0},'
                        b'{"name":"i","type":"integer","value":3}],'
                        b'"identity":[{"name":"f","type":"real","value":-0}]}')
    assert msg["columns"][0]["value"] == "-0" and msg["identity"][0]["value"] == "-0"


def test_negative_fractions_keep_the_fast_path_exact():
    assert same(stream_value("double precision", b"-0.25"), -0.25)
    assert same(stream_value("double precision", b"-0.0001"), -0.0001)


@pytest.mark.parametrize("text", sorted(NONFINITE))
def test_nonfinite_floats_are_their_postgres_text(text):
    assert converter("double precision")(text) == text
    assert converter("real")(text) == text
    assert converter("numeric")(text) == text
    # JSON has no NaN: the text survives a JSON round trip, a float would become null.
    assert orjson.loads(orjson.dumps({"v": converter("real")(text)})) == {"v": text}


def test_json_keeps_its_text():
    text = '{"a":1,  "a" : [2, {"b": null}] }'
    assert converter("json")(text) == text


def test_jsonb_is_parsed():
    assert converter("jsonb")('{"a": [1, 2.5, "ü🎉"], "b": {"c": null, "d": true}}') == \
        {"a": [1, 2.5, "ü🎉"], "b": {"c": None, "d": True}}
    assert same(converter("jsonb")('{"x": 1.10}')["x"], 1.1)  # same number (jsonb '=' agrees)
    assert converter("jsonb")('"s"') == "s"


def test_jsonb_numbers_a_double_cannot_hold_stay_exact_text():
    doc = converter("jsonb")(
        '{"big": 123456789012345678901234567890, "u64": 18446744073709551615, '
        '"i64": -9223372036854775808, "precise": 0.30000000000000000001, '
        '"tiny": 0.' + "0" * 299 + '1, "huge": 1' + "0" * 400 + ', "fine": 1234567890.12345, '
        '"digits_in_text": "12345678901234567890"}')
    assert doc["big"] == "123456789012345678901234567890"
    assert same(doc["u64"], 18446744073709551615)
    assert same(doc["i64"], -9223372036854775808)
    assert doc["precise"] == "0.30000000000000000001"
    assert same(doc["tiny"], 1e-300)
    assert doc["huge"] == "1" + "0" * 400
    assert same(doc["fine"], 1234567890.12345)
    assert doc["digits_in_text"] == "12345678901234567890"
    orjson.dumps(doc)  # every value is JSON-encodable
    # doubles an application stored (shortest repr, 17 digits) stay floats
    assert same(converter("jsonb")('{"f": 0.14285714285714285, "g": -2.220446049250313e-16}')["f"],
                0.14285714285714285)
    # not Postgres output, but valid JSON: exponents beyond the double range
    assert converter("jsonb")('[1e400, 1.5e300]') == ["1e400", 1.5e300]


def test_bytea_keeps_its_hex_prefix_from_the_stream():
    # wal2json 2.5 prints bytea output without its leading "\\x"; COPY keeps it.
    assert converter("bytea")("\\x00ff10") == "\\x00ff10"
    assert stream_value("bytea", b'"00ff10"') == "\\x00ff10"
    assert converter("bytea")("\\x") == stream_value("bytea", b'""') == "\\x"
    assert converter("bytea[]")('{"\\\\x00"}') == '{"\\\\x00"}'  # arrays: untouched text


def test_other_types_are_text():
    for t in ("text", "character(5)", "character varying(10)", "integer[]", "uuid",
              "timestamp with time zone", "interval", "inet", "money", "bit varying", "mood"):
        assert converter(t)("x") == "x"
    assert converter("boolean")("t") is True and converter("boolean")(False) is False
    assert is_numeric_type("numeric(12,2)") and not is_numeric_type("numeric[]")
