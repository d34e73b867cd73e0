"""Conversions of ``where:`` values: casts (manual 4.2.9 "Type Casts"; pg_cast), the reading of
unknown-typed literals by a type's input function, the canonical rendering of date/time
literals, and the reading of row values (pgderive's value model, ``cdc/values.py``) into the
internal representation of :mod:`views.pgtypes`."""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable

from ..pgtypes.datetime import (DT_NOBEGIN, DT_NOEND, date_text, date_to_ts, parse_dt, parse_time,
                                time_part, ts_text, ts_to_date)
from ..pgtypes.errors import WhereError
from ..pgtypes.floats import (f8_to_f4, f32, float_in, float_text, float_to_int, float_to_numeric,
                              int_to_f32, numeric_to_float)
from ..pgtypes.integers import int_check, int_in
from ..pgtypes.misc import bool_in, uuid_in, uuid_text
from ..pgtypes.numeric import num_norm, num_text, num_to_int, num_typmod, numeric_in
from ..pgtypes.tags import FLOATS, INTS, STRS
from ..pgtypes.text import rtrim
from .types import tname


def _to_text_fn(src: str) -> Callable[[Any], str] | None:
    if src in INTS:
        return str
    if src == "numeric":
        return num_text
    if src in FLOATS:
        return lambda v: float_text(v, src)
    if src == "bool":
        return lambda v: "true" if v else "false"
    if src == "bpchar":
        return rtrim
    if src in ("text", "varchar") or src.startswith("enum:"):
        return lambda v: v
    if src == "date":
        return date_text
    if src == "timestamp":
        return ts_text
    if src == "time":
        return time_part
    if src == "uuid":
        return uuid_text
    return None


def cast_fn(src: str, dst: str, typmod: tuple[int, int] | None) -> Callable[[Any], Any] | None:
    """The function converting a non-NULL value of type ``src`` to ``dst`` (4.2.9 "Type
    Casts"; pg_cast), or None if Postgres has no such cast or this module refuses it."""
    fn = _cast_fn_base(src, dst)
    if fn is None or dst != "numeric" or typmod is None:
        return fn
    p, s = typmod
    return lambda v: num_typmod(fn(v), p, s)


def _cast_fn_base(src: str, dst: str) -> Callable[[Any], Any] | None:
    if src == dst:
        return lambda v: v
    if dst in INTS:
        if src in INTS:
            return lambda v: int_check(v, dst)
        if src == "numeric":
            return lambda v: num_to_int(v, dst)
        if src in FLOATS:
            return lambda v: float_to_int(v, dst)
        if src == "bool" and dst == "int4":
            return lambda v: 1 if v else 0
        if src in STRS:
            return lambda v: int_in(v, dst)
        return None
    if dst == "numeric":
        if src in INTS:
            return lambda v: Decimal(v)
        if src == "float8":
            return lambda v: float_to_numeric(v, 15)
        if src == "float4":
            return lambda v: float_to_numeric(v, 6)
        if src in STRS:
            return numeric_in
        return None
    if dst == "float4":
        if src in INTS:
            return int_to_f32
        if src == "numeric":
            return lambda v: numeric_to_float(v, "float4")
        if src == "float8":
            return f8_to_f4
        if src in STRS:
            return lambda v: float_in(v, "float4")
        return None
    if dst == "float8":
        if src in INTS:
            return float
        if src == "numeric":
            return lambda v: numeric_to_float(v, "float8")
        if src == "float4":
            return lambda v: v
        if src in STRS:
            return lambda v: float_in(v, "float8")
        return None
    if dst == "bool":
        if src == "int4":
            return lambda v: v != 0
        if src in STRS:
            return bool_in
        return None
    if dst in ("text", "varchar"):
        return _to_text_fn(src)
    if dst == "bpchar" and src in ("text", "varchar"):
        return lambda v: v
    if dst == "date" and src == "timestamp":
        return ts_to_date
    if dst == "timestamp" and src == "date":
        return date_to_ts
    if dst == "uuid" and src in STRS:
        return uuid_in
    return None


def literal_in(s: str, t: str, typmod: tuple[int, int] | None) -> Any:
    """An unknown-typed literal read by type ``t``'s input function (at construction)."""
    if t in INTS:
        return int_in(s, t)
    if t == "numeric":
        v = numeric_in(s)
        return num_typmod(v, *typmod) if typmod else v
    if t in FLOATS:
        return float_in(s, t)
    if t == "bool":
        return bool_in(s)
    if t in STRS or t.startswith("enum:"):
        return s
    if t in ("date", "timestamp", "timestamptz"):
        return parse_dt(s, t, literal=True)
    if t == "time":
        return parse_time(s, literal=True)
    if t == "uuid":
        return uuid_in(s)
    raise WhereError(f"literals of type {tname(t)} are not supported")


def canonical_literal(v: Any, t: str) -> str | None:
    """The text a date/time literal is rendered as: ISO, and ``+00`` for timestamptz."""
    if t == "date":
        return date_text(v)
    if t == "timestamp":
        return ts_text(v)
    if t == "time":
        return time_part(v)
    if t == "timestamptz":
        if v in (DT_NOBEGIN, DT_NOEND):
            return ts_text(v)
        text = ts_text(v)
        if text.endswith(" BC"):
            return text[:-3] + "+00 BC"
        return text + "+00"
    return None


def reader(t: str) -> Callable[[Any], Any]:
    """Reads a row value of type ``t`` (pgderive's value model, ``cdc/values.py``) into the
    internal representation."""
    if t in INTS:
        return lambda v: v if type(v) is int else int(v)
    if t == "numeric":
        return lambda v: num_norm(Decimal(v if isinstance(v, str) else str(v)))
    if t == "float8":
        return lambda v: v if type(v) is float else float(v)
    if t == "float4":
        return lambda v: f32(float(v))
    if t == "bool":
        return lambda v: v if isinstance(v, bool) else v in ("t", "true")
    if t in ("date", "timestamp", "timestamptz"):
        return lambda v: parse_dt(v, t, literal=False)
    if t == "time":
        return lambda v: parse_time(v, literal=False)
    if t == "uuid":
        return uuid_in
    return lambda v: v
