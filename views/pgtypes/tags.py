"""Type tags: the names :mod:`views.pgtypes` and :mod:`views.where` give the Postgres types they
support, and the SQL names (``format_type`` spelling) used in messages."""
from __future__ import annotations


INTS = ("int2", "int4", "int8")
FLOATS = ("float4", "float8")
NUMS = (*INTS, "numeric", *FLOATS)
STRS = ("text", "varchar", "bpchar")
DATETIMES = ("date", "timestamp", "timestamptz", "time")

TNAME = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "numeric": "numeric",
    "float4": "real", "float8": "double precision", "bool": "boolean", "text": "text",
    "varchar": "character varying", "bpchar": "character", "date": "date",
    "timestamp": "timestamp without time zone", "timestamptz": "timestamp with time zone",
    "time": "time without time zone", "uuid": "uuid", "unknown": "unknown",
}
