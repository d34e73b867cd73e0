"""The type system of ``where:`` expressions: type tags of columns, categories and implicit
casts (pg_cast), comparison operator resolution and the common type of several expressions
(manual chapter 10 "Type Conversion": 10.2 "Operators", 10.5 "UNION, CASE, and Related
Constructs"; ``src/backend/parser/parse_coerce.c``).

Tags: ``int2 int4 int8 numeric float4 float8 bool text varchar bpchar date timestamp
timestamptz time uuid unknown`` (:mod:`views.pgtypes.tags`), ``"enum:<name>"``,
``"opaque:<name>"``."""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from ..pgtypes.datetime import date_ts_key
from ..pgtypes.floats import fcmp
from ..pgtypes.numeric import num_cmp
from ..pgtypes.tags import DATETIMES, FLOATS, INTS, NUMS, STRS, TNAME
from ..pgtypes.text import bpchar_cmp


# Implicit casts among the supported types (pg_cast, castcontext 'i').
_IMPLICIT = {
    "int2": {"int4", "int8", "numeric", "float4", "float8"},
    "int4": {"int8", "numeric", "float4", "float8"},
    "int8": {"numeric", "float4", "float8"},
    "numeric": {"float4", "float8"},
    "float4": {"float8"},
    "float8": set(),
    "text": {"bpchar", "varchar"},
    "varchar": {"text", "bpchar"},
    "bpchar": {"text", "varchar"},
    "date": {"timestamp", "timestamptz"},
    "timestamp": {"timestamptz"},
    "timestamptz": set(),
    "time": set(),
    "bool": set(),
    "uuid": set(),
}
_PREFERRED = {"float8", "text", "bool", "timestamptz"}


def _category(t: str) -> str:
    if t in NUMS:
        return "N"
    if t in STRS:
        return "S"
    if t in DATETIMES:
        return "D"
    if t == "bool":
        return "B"
    if t.startswith("enum:"):
        return "E"
    return "U:" + t


def tname(t: str) -> str:
    return TNAME.get(t) or t.split(":", 1)[1]


def can_implicit(src: str, dst: str) -> bool:
    return src == dst or src == "unknown" or dst in _IMPLICIT.get(src, ())


_OPAQUE_BUILTINS = {
    "json", "bytea", "interval", "inet", "cidr", "macaddr", "macaddr8", "money", "xml", "point",
    "line", "lseg", "box", "path", "polygon", "circle", "tsvector", "tsquery", "bit",
    "bit varying", "oid", "xid", "xid8", "cid", "tid", "name", '"char"', "pg_lsn", "regclass",
    "regtype", "regproc", "regprocedure", "regoper", "regoperator", "regnamespace", "regrole",
    "regconfig", "regdictionary", "regcollation", "txid_snapshot", "pg_snapshot", "int4range",
    "int8range", "numrange", "tsrange", "tstzrange", "daterange", "int4multirange",
    "int8multirange", "nummultirange", "tsmultirange", "tstzmultirange", "datemultirange",
    "record", "void", "aclitem", "gtsvector", "pg_node_tree", "refcursor",
}


def column_tag(type_name: str) -> str:
    """The tag of a column of ``type_name`` (``format_type`` spelling)."""
    t = type_name.strip()
    if t.endswith("]"):
        return "opaque:" + t
    low = t.lower()
    base = re.sub(r"\(\s*\d+(\s*,\s*-?\d+)?\s*\)", "", low).strip()
    simple = {
        "smallint": "int2", "integer": "int4", "bigint": "int8", "numeric": "numeric",
        "real": "float4", "double precision": "float8", "boolean": "bool", "text": "text",
        "character varying": "varchar", "character": "bpchar", "bpchar": "bpchar",
        "date": "date", "timestamp without time zone": "timestamp",
        "timestamp with time zone": "timestamptz", "time without time zone": "time",
        "uuid": "uuid", "jsonb": "opaque:jsonb",
    }
    if base in simple:
        return simple[base]
    if base in _OPAQUE_BUILTINS or base.startswith(("interval", "time with time zone", "bit")):
        return "opaque:" + t
    return "enum:" + t


TYPE_SQL = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "numeric": "numeric",
    "float4": "real", "float8": "double precision", "bool": "boolean", "text": "text",
    "varchar": "character varying", "date": "date", "timestamp": "timestamp without time zone",
    "timestamptz": "timestamp with time zone", "time": "time without time zone", "uuid": "uuid",
}


ORDERING = ("<", "<=", ">", ">=")


def _cmp_result(op: str, c: int) -> bool:
    if op == "=":
        return c == 0
    if op == "<>":
        return c != 0
    if op == "<":
        return c < 0
    if op == "<=":
        return c <= 0
    if op == ">":
        return c > 0
    return c >= 0


def _plain_cmp(a: Any, b: Any) -> int:
    c: int = (a > b) - (a < b)
    return c


def resolve_cmp(a: str, b: str) -> tuple[str, str, str] | None:
    """Postgres' choice of comparison operator for argument types ``a`` and ``b`` (10.2,
    "Operators"): (domain, type ``a`` is converted to, type ``b`` is converted to)."""
    if a in NUMS and b in NUMS:
        if a in INTS and b in INTS:
            return "int", a, b
        if a in FLOATS or b in FLOATS:
            return "float", a if a in FLOATS else "float8", b if b in FLOATS else "float8"
        return "numeric", "numeric", "numeric"
    if a in STRS and b in STRS:
        if a == b == "bpchar":
            return "bpchar", a, b
        if "text" in (a, b) or a == b == "varchar":
            return "text", "text", "text"
        return "bpchar", "bpchar", "bpchar"  # varchar against character(n)
    if a == b and a in ("bool", "date", "timestamp", "timestamptz", "time", "uuid"):
        return a, a, b
    if {a, b} == {"date", "timestamp"}:
        return "date_ts", a, b
    if a in ("date", "timestamp", "timestamptz") and b in ("date", "timestamp", "timestamptz"):
        return "tz", a, b
    if a == b and a.startswith("enum:"):
        return "enum", a, b
    return None


def cmp_fn(kind: str, op: str, at: str, bt: str) -> Callable[[Any, Any], bool]:
    if kind == "float":
        return lambda x, y: _cmp_result(op, fcmp(x, y))
    if kind == "numeric":
        return lambda x, y: _cmp_result(op, num_cmp(x, y))
    if kind == "bpchar":
        return lambda x, y: _cmp_result(op, bpchar_cmp(x, y))
    if kind == "date_ts":
        ka = date_ts_key if at == "date" else (lambda v: v)
        kb = date_ts_key if bt == "date" else (lambda v: v)
        return lambda x, y: _cmp_result(op, _plain_cmp(ka(x), kb(y)))
    return lambda x, y: _cmp_result(op, _plain_cmp(x, y))


def select_common_type(types: Sequence[str]) -> str | None:
    """parse_coerce.c select_common_type() with a NULL context (10.5); None when it fails."""
    ptype = types[0]
    for t in types[1:]:
        if t == "unknown" or t == ptype:
            continue
        if ptype == "unknown":
            ptype = t
            continue
        if _category(t) != _category(ptype):
            return None
        if (ptype not in _PREFERRED and can_implicit(ptype, t) and not can_implicit(t, ptype)):
            ptype = t
    return "text" if ptype == "unknown" else ptype
