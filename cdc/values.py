"""One value model for snapshot rows and streamed rows.

The snapshot reads rows with ``COPY … TO STDOUT`` in text format (every value is Postgres' text
output), the stream reads wal2json JSON, where wal2json prints integer, float and numeric values
as bare JSON numbers, booleans as JSON booleans and every other type as a JSON string holding
the type's text output (wal2json README, "format-version 2"). Both are converted here by the
column's type name (``format_type`` spelling, e.g. ``"integer"``, ``"character(84)"``,
``"numeric(12,2)"``) into the model documented in :mod:`cdc.changes`.

Lossless numerics: wal2json 2.5 has no ``numeric-data-types-as-string`` option in format 2, so
a message with a numeric column is parsed with the stdlib JSON parser keeping number literals
as text (see :func:`cdc.wal2json.loads_message`). numeric ``NaN``/``±Infinity`` are printed as
``null`` by wal2json 2.5: a known loss, documented in the README.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson

__all__ = ["converter", "Converter"]

Converter = Callable[[Any], Any]

_INT_TYPES = {"smallint", "integer", "bigint", "oid", "xid"}
_FLOAT_TYPES = {"real", "double precision"}
_JSON_TYPES = {"json", "jsonb"}


def _to_int(v: Any) -> Any:
    return v if isinstance(v, int) else int(v)


def _to_float(v: Any) -> Any:
    return v if isinstance(v, float) else float(v)


def _to_numeric(v: Any) -> Any:
    # Stream values arrive as text already (number literals kept as text); snapshot too.
    return v if isinstance(v, str) else str(v)


def _to_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    return v in ("t", "true")


def _to_json(v: Any) -> Any:
    return orjson.loads(v) if isinstance(v, (str, bytes)) else v


def _identity(v: Any) -> Any:
    return v


def _base_type(type_name: str) -> str:
    base = type_name.split("(", 1)[0].strip()
    return base


_BY_BASE: dict[str, Converter] = {
    **{t: _to_int for t in _INT_TYPES},
    **{t: _to_float for t in _FLOAT_TYPES},
    "numeric": _to_numeric,
    "boolean": _to_bool,
    **{t: _to_json for t in _JSON_TYPES},
}


def converter(type_name: str) -> Converter:
    """The converter for a column of type ``type_name`` (``format_type`` spelling).

    The returned callable takes a non-NULL value (snapshot text or wal2json JSON value) and
    returns the model value. Arrays (``integer[]``) stay Postgres array text.
    """
    if type_name.endswith("]"):
        return _identity
    return _BY_BASE.get(_base_type(type_name), _identity)


def is_numeric_type(type_name: str) -> bool:
    """True for ``numeric``/``numeric(p,s)``: its JSON literals must be parsed as text."""
    return _base_type(type_name) == "numeric"
