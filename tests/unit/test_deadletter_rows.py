"""Bounding a dead letter's stored row (pgderive.state.deadletters.bound_row; issue 14, item 7)."""
from __future__ import annotations

import pytest

from pgderive.state.deadletters import bound_row, encode_row, identity_json
from views.spec import SpecError, parse_spec


def size(row: dict) -> int:
    return len(encode_row(row).encode())


def test_a_row_that_fits_is_kept_as_is():
    row = {"id": 1, "name": "x" * 100}
    assert bound_row(row, 1024) == (row, [])


def test_oversized_values_are_cut_and_named_small_ones_kept():
    row = {"id": 42, "small": "s" * 50, "big": "b" * 200_000, "doc": {"a": ["y" * 100_000]}, "n": 7}
    out, cut = bound_row(row, 4096, frozenset({"id"}))
    assert cut == ["big", "doc"]
    assert size(out) <= 4096
    assert out["id"] == 42 and out["small"] == row["small"] and out["n"] == 7
    assert row["big"].startswith(out["big"]) and len(out["big"]) > 1000   # a prefix, not nothing
    assert isinstance(out["doc"], str) and out["doc"].startswith('{"a":["yyy')


def test_escapes_and_multibyte_text_still_fit():
    for ch in ('"', "\n", "ü", "表", "\x01"):
        out, cut = bound_row({"id": 1, "v": ch * 50_000}, 2048, frozenset({"id"}))
        assert cut == ["v"] and size(out) <= 2048, ch


def test_identity_columns_are_never_cut():
    row = {"id": "i" * 5000, "v": "v" * 5000}
    out, cut = bound_row(row, 1024, frozenset({"id"}))
    assert out["id"] == row["id"] and cut == ["v"]


def test_identity_json_is_canonical():
    assert identity_json({"b": 1, "a": "x"}) == identity_json({"a": "x", "b": 1}) == '{"a":"x","b":1}'


HEAD = """source: {dsn: "postgresql://x@127.0.0.1/db", slot: s}
sinks: {cache: {type: redis}}
views: {v: {table: t, sink: cache, key: "{id}"}}
"""


def test_max_bytes_setting():
    assert parse_spec(HEAD).dead_letters.max_bytes == 65536
    assert parse_spec(HEAD + "dead_letters: {max_bytes: 2048}\n").dead_letters.max_bytes == 2048
    for bad, msg in (("100", "must be from 1024 to 67108864 bytes, got 100"),
                     ("'lots'", "must be a number of bytes, got a string")):
        with pytest.raises(SpecError) as e:
            parse_spec(HEAD + f"dead_letters: {{max_bytes: {bad}}}\n")
        assert e.value.problems == [("dead_letters.max_bytes", 4, msg)], e.value.problems
    with pytest.raises(SpecError, match="unknown key 'cap' \\(allowed: max_bytes\\)"):
        parse_spec(HEAD + "dead_letters: {cap: 1}\n")
