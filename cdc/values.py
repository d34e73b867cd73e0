"""One value model for snapshot rows and streamed rows.

The snapshot reads rows with ``COPY … TO STDOUT`` in text format (every value is Postgres' text
output), the stream reads wal2json JSON, where wal2json prints integer, float and numeric values
as bare JSON numbers, booleans as JSON booleans and every other type as a JSON string holding
the type's text output (wal2json README, "format-version 2"). Both are converted here by the
column's type name (``format_type`` spelling, e.g. ``"integer"``, ``"character(84)"``,
``"numeric(12,2)"``) into the model documented in :mod:`cdc.changes` and in the README table
"What lands in the sinks":

* ``smallint``/``integer``/``bigint``/``oid``/``xid``: ``int``.
* ``real``/``double precision``: ``float`` (the double nearest Postgres' shortest text, so
  ``'1e-300'`` from COPY and the JSON number ``1e-300`` from wal2json give the same float; ``-0``
  stays ``-0.0``); ``NaN``/``Infinity``/``-Infinity`` stay their Postgres text (``str``): JSON has
  no such numbers and a ``null`` would read as SQL NULL.
* ``numeric``: its exact text (``str``), never rounded through float.
* ``boolean``: ``bool``.
* ``jsonb``: the parsed JSON value; a number inside it that neither a 64-bit integer nor a double
  holds exactly (jsonb numbers are ``numeric``) is kept as its exact text (``str``), like
  ``numeric`` itself, instead of being rounded (or failing, e.g. ``1e400``).
* ``json``: its text as stored (``str``): ``json`` keeps whitespace, key order and duplicate
  keys, which any parsed form would lose.
* ``bytea``: its hex text ``\\x…`` (wal2json 2.5 drops the ``\\x``, restored here; needs the
  default ``bytea_output = hex``).
* everything else (text, char(n) with its padding, dates and times, uuid, arrays, enums,
  domains, ...): Postgres' text output (``str``).

Lossless numerics on the stream: wal2json 2.5 has no ``numeric-data-types-as-string`` option, so
a message with a numeric column (or a float ``-0``) is parsed with the stdlib JSON parser keeping
number literals as text (see :func:`cdc.wal2json.loads_message`); the converters below accept
both forms. wal2json 2.5 prints numeric and float ``NaN``/``±Infinity`` as ``null``, like SQL
NULL: the decoder flags such columns (:func:`may_be_nonfinite`) and :mod:`cdc.refetch` reads
their value back from the source (README, "Non-finite numbers on the stream").
"""
from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any, Callable

import orjson

__all__ = ["converter", "Converter", "is_numeric_type", "may_be_nonfinite", "to_text", "text_form", "json_bare",
           "NONFINITE"]

Converter = Callable[[Any], Any]

_INT_TYPES = {"smallint", "integer", "bigint", "oid", "xid"}
_FLOAT_TYPES = {"real", "double precision"}

#: Postgres' text for the non-finite float/numeric values; kept as ``str`` in the model.
NONFINITE = frozenset(("NaN", "Infinity", "-Infinity"))


def _to_int(v: Any) -> Any:
    return v if type(v) is int else int(v)


def _to_float(v: Any) -> Any:
    if type(v) is float:
        return v
    f = float(v)  # text, or an int: wal2json prints integral floats as 100000
    if f - f == 0.0:  # finite
        return f
    return v  # "NaN", "Infinity", "-Infinity": only the snapshot has them


def _to_numeric(v: Any) -> Any:
    # Stream values arrive as text already (number literals kept as text); snapshot too.
    return v if isinstance(v, str) else str(v)


def _to_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    return v in ("t", "true")


# jsonb numbers are numeric; orjson reads them as int64/uint64 or double. Postgres prints jsonb
# numbers in plain notation (1e-300 is a run of 300 zeros), so a literal a double might not hold
# exactly has a run of 16+ digits: found by a byte-table translation (digits and '.' -> 'd') and
# one substring search. Such a run is usually a double an application stored, whose literal is
# the double's shortest repr: the tokens (split at every other character) are checked one by
# one, and only a literal that is not exact (or a digit run inside a string that does not read
# as one) sends the value through the exact, slower parse.
_CLASSES = bytes(ord("d") if chr(b) in "0123456789." else ord("_") for b in range(256))
_TOKENS = bytes(b if chr(b) in "0123456789.eE+-" else ord(" ") for b in range(256))
_LONG_RUN = b"d" * 16
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what orjson reads and writes as integers


def _exact_float(s: str) -> Any:
    f = float(s)
    r = repr(f)
    if r == s or (math.isfinite(f) and Decimal(r) == Decimal(s)):
        return f
    return s


def _exact_int(s: str) -> Any:
    if len(s) <= 20:
        i = int(s)
        if _INT_MIN <= i <= _INT_MAX:
            return i
    return _exact_float(s)


def _token_is_exact(t: bytes) -> bool:
    """Would orjson read the number literal ``t`` exactly?"""
    if t.lstrip(b"-").isdigit():
        return len(t) <= 20 and _INT_MIN <= int(t) <= _INT_MAX
    try:
        f = float(t)
    except ValueError:
        return False
    r = repr(f)
    return r.encode() == t or (math.isfinite(f) and Decimal(r) == Decimal(t.decode()))


def _to_jsonb(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    raw = v.encode()
    if _LONG_RUN in raw.translate(_CLASSES):
        for t in raw.translate(_TOKENS).split():
            if len(t) >= 16:
                try:
                    if repr(float(t)).encode() == t:  # a double's shortest repr: exact
                        continue
                except ValueError:
                    pass
                if not _token_is_exact(t):
                    return _exact_loads(v)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:  # e.g. 1e400 in exponent notation (not Postgres output)
        return _exact_loads(v)


def _exact_loads(v: str) -> Any:
    return json.loads(v, parse_float=_exact_float, parse_int=_exact_int)


def _to_bytea(v: Any) -> Any:
    # wal2json 2.5 drops the first two characters of bytea output (the "\x" of the hex format);
    # COPY keeps them. Hex digits never start with a backslash, so the prefix is restored here.
    return v if v.startswith("\\x") else "\\x" + v


def _identity(v: Any) -> Any:
    return v


def _base_type(type_name: str) -> str:
    return type_name.split("(", 1)[0].strip()


_BY_BASE: dict[str, Converter] = {
    **{t: _to_int for t in _INT_TYPES},
    **{t: _to_float for t in _FLOAT_TYPES},
    "numeric": _to_numeric,
    "boolean": _to_bool,
    "jsonb": _to_jsonb,
    "bytea": _to_bytea,
}


def converter(type_name: str) -> Converter:
    """The converter for a column of type ``type_name`` (``format_type`` spelling).

    The returned callable takes a non-NULL value (snapshot text or wal2json JSON value) and
    returns the model value. Arrays (``integer[]``) stay Postgres array text.
    """
    if type_name.endswith("]"):
        return _identity
    return _BY_BASE.get(_base_type(type_name), _identity)


def text_form(type_name: str) -> str | None:
    """How a model value of this column type prints, compared with Postgres' text output.

    ``"text"``: the model value is that text (``str``) or an ``int`` whose decimal form is that
    text, so ``str(value)`` equals the output; ``"boolean"``: the model's ``True``/``False``
    prints as ``true``/``false`` where Postgres prints ``t``/``f``; ``None``: the forms differ
    (floats print by Python's ``repr``, ``jsonb`` is parsed). Lets a snapshot be encoded by
    Postgres itself (:mod:`pgderive.runtime.wire`) exactly as pgderive would encode the model value.
    """
    if type_name.endswith("]"):
        return "text"
    base = _base_type(type_name)
    if base == "boolean":
        return "boolean"
    if base in _FLOAT_TYPES or base == "jsonb":
        return None
    return "text"


def json_bare(type_name: str) -> bool:
    """True when a non-NULL model value of this column type is a JSON number or boolean whose
    JSON text is the text :func:`text_form` describes (integer types: the decimal digits;
    ``boolean``: ``true``/``false``), so a document can be encoded by Postgres from that text
    without quotes; False when the model value is a ``str`` (a JSON string) or when
    :func:`text_form` is None (arrays included: their converter keeps the text)."""
    return converter(type_name) in (_to_int, _to_bool)


def is_numeric_type(type_name: str) -> bool:
    """True for ``numeric``/``numeric(p,s)``: its JSON literals must be parsed as text."""
    return _base_type(type_name) == "numeric"


def may_be_nonfinite(type_name: str) -> bool:
    """True for ``real``, ``double precision`` and ``numeric[(p,s)]`` columns (not arrays):
    the types that can hold ``NaN``/``±Infinity``, which wal2json prints as ``null``.

    Domains over these types are reported by wal2json under the domain's name and are not
    recognised (README, "Known limitations")."""
    return not type_name.endswith("]") and _base_type(type_name) in _NONFINITE_BASES


_NONFINITE_BASES = frozenset((*_FLOAT_TYPES, "numeric"))


def to_text(value: Any) -> str:
    """A model value back to Postgres input text (for ``'…'::type`` literals and parameters):
    the inverse of the converters for the types that can be keys and link columns."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)
