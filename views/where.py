"""The ``where:`` clause of a view: one SQL boolean expression, evaluated twice.

A view may declare ``where: "<SQL boolean expression over the row's columns>"``. The expression
is parsed once (with sqlglot, dialect ``postgres``) into a small typed tree that

* renders back to SQL with :mod:`psycopg.sql` (:meth:`Where.sql`): identifiers through
  ``sql.Identifier``, literals through ``sql.Literal``, so no user text is ever pasted; the
  snapshot query pushes it down (``WHERE <where.sql()>``);
* evaluates in Python on streamed rows (:meth:`Where.evaluate`, :meth:`Where.matches`) with
  the same result Postgres gives for the same row, three-valued logic included.

Both sides must agree on every row, otherwise a view built from the snapshot and then kept up
to date from the stream would differ from one rebuilt later. So the Python side mirrors what
Postgres does, step by step, for the constructs it accepts, and refuses (:class:`WhereError`,
at construction) everything else rather than guessing. The Postgres 15 documentation sections
this relies on are cited where used; in short:

* **Typing** (chapter 10, "Type Conversion"; 10.2 "Operators", 10.5 "UNION, CASE, and Related
  Constructs"): a string literal is of type *unknown* and takes the type of the other operand
  (``created_at > '2026-01-01'`` compares timestamps, ``price > '10.5'`` numerics; an
  invalid literal is an error at construction, as Postgres rejects it when parsing). Integer
  literals are ``integer``, ``bigint`` or ``numeric`` by size, other number literals
  ``numeric`` (4.1.2.6 "Numeric Constants"). Mixed numeric operands follow Postgres' operator
  resolution: integer types compare exactly with each other, integers with ``numeric`` as
  numerics (so ``int_col = 10.5`` is exact), anything with ``real``/``double precision`` as
  doubles (``bigint`` and ``numeric`` rounded to the nearest double first, ``real`` exact).
* **Three-valued logic** (9.1 "Logical Operators", 9.2 "Comparison Functions and Operators",
  9.24.1/9.24.2 "IN"/"NOT IN"): ``x NOT IN (1, NULL)`` is NULL unless ``x`` is 1;
  ``IS [NOT] DISTINCT FROM``, ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE/UNKNOWN``.
* **Numbers** (8.1 "Numeric Types", 9.3 "Mathematical Functions and Operators"): integer
  arithmetic is checked for overflow (``integer out of range``) and ``/`` truncates toward
  zero; ``numeric`` is exact, its division keeps the scale Postgres picks (at least 16
  significant digits, ``numeric.c`` ``select_div_scale``), ``NaN`` equals ``NaN`` and sorts
  above everything, ``Infinity`` above every finite value (8.1.2); floats likewise
  (8.1.3), ``-0`` equals ``0``; overflow/underflow raise as in Postgres. Division by zero
  raises :class:`WhereEvalError` (Postgres raises too).
* **Text** (8.3 "Character Types", 9.7.1 "LIKE"): ``=``/``<>``/``IN`` compare exactly (the
  default collation is deterministic); ``character(n)`` compares ignoring trailing spaces,
  and a ``character(n)`` turned into ``text`` loses them; ``LIKE``/``ILIKE`` with ``%``, ``_``,
  backslash or ``ESCAPE`` escapes, Postgres' matcher ported (including its errors, e.g.
  ``LIKE pattern must not end with escape character`` only when the matcher gets there).
  Ordering comparisons of text depend on the collation and are refused.
* **Dates and times** (8.5 "Date/Time Types"): values are read from Postgres' ISO output
  (``DateStyle`` ISO, the default) into Postgres' own representation (days / microseconds
  since 2000-01-01, ``±infinity`` as the extreme values), so BC dates, years past 9999 and
  ``infinity`` compare as in Postgres. ``timestamptz`` values carry their offset (``+00``,
  ``+05:30``, ``+05:53:28``).
* **Evaluation order and errors** (4.2.14 "Expression Evaluation Rules"): constant
  subexpressions are folded at construction like the planner folds them (an error there is
  an error here), ``AND``/``OR`` evaluate left to right and stop at the first ``FALSE``/
  ``TRUE``, and :meth:`Where.sql` renders the whole expression as ``((…) IS TRUE)`` so that
  the planner cannot split a top-level ``AND`` and reorder its terms: a row then raises in
  Python exactly when it would raise in Postgres.

* **Functions** (9.4 "String Functions and Operators", 9.18.2 "COALESCE"): ``lower``,
  ``upper``, ``length``/``char_length`` of text, ``COALESCE`` (common type as in 10.5, later
  arguments not evaluated). Every other function call is refused.

Known limits, each refused or documented:

* ``timestamptz`` literals without an offset are read as UTC and rendered with ``+00``
  (Postgres would use the session ``TimeZone``; the rendered SQL and the Python side agree
  whatever the server's setting). Conversions that depend on the session ``TimeZone``
  (``date``/``timestamp`` against ``timestamptz``, casts to or from ``timestamptz``) and on
  ``DateStyle`` (text to date/time) are refused; date/time literals are accepted in ISO form
  only (``'2026-01-01'``, ``'2026-01-01 10:00:00.5+05:30'``, ``'infinity'``, ``'epoch'``).
* Column types this module does not know (user enums, and domains, which ``format_type``
  names like enums) are compared as enum labels, by exact text, with ``=``, ``<>`` and ``IN``
  only; a label the enum does not have is an error in Postgres but just unequal here.
* ``ILIKE``, ``lower()``, ``upper()`` fold case like a UTF-8 libc locale (per-character simple
  mappings, as ``C.UTF-8`` and ``en_US.UTF-8`` do), not like a database whose ``LC_CTYPE`` is
  ``C`` (ASCII only).
* A constant ``LIKE`` pattern ending in a lone escape character is refused: Postgres fails on
  it only if matching reaches the end, and its planner also runs the match on sampled column
  values when estimating selectivity, so whether a query fails would depend on statistics.
* ``real``/``double precision`` to text uses the shortest exact form, Postgres' output with
  ``extra_float_digits`` >= 1 (the default), like pgderive's value model itself.
"""
from __future__ import annotations

import decimal
import difflib
import math
import re
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Sequence

import sqlglot
from psycopg import sql
from sqlglot import exp

__all__ = ["Where", "WhereError", "WhereEvalError"]


class WhereError(ValueError):
    """A ``where:`` expression that cannot be used: it does not parse, names an unknown column
    (``unknown column 'pirce' (did you mean 'price'?)``), uses a construct this module does
    not support (``subqueries are not supported``, ``function calls are not supported
    (md5)``), or is ill-typed the way Postgres would reject it (``operator does not exist:
    text = integer``, ``invalid input syntax for type integer: "10.5"``)."""


class WhereEvalError(WhereError):
    """Evaluating the expression failed where Postgres fails too: ``division by zero``,
    ``integer out of range``, ``value out of range: overflow``, ``invalid input syntax for type
    numeric: "abc"`` (a cast of a text column), ``LIKE pattern must not end with escape
    character``, ... Raised by :meth:`Where.evaluate`/:meth:`Where.matches` for the row, or by
    the constructor when a constant part of the expression fails (Postgres folds constants
    when planning and fails there)."""


# ---------------------------------------------------------------------------------------------
# Types. Tags: int2 int4 int8 numeric float4 float8 bool text varchar bpchar date timestamp
# timestamptz time uuid unknown, "enum:<name>", "opaque:<name>".
# ---------------------------------------------------------------------------------------------

_INTS = ("int2", "int4", "int8")
_FLOATS = ("float4", "float8")
_NUMS = (*_INTS, "numeric", *_FLOATS)
_STRS = ("text", "varchar", "bpchar")
_DATETIMES = ("date", "timestamp", "timestamptz", "time")

_TNAME = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "numeric": "numeric",
    "float4": "real", "float8": "double precision", "bool": "boolean", "text": "text",
    "varchar": "character varying", "bpchar": "character", "date": "date",
    "timestamp": "timestamp without time zone", "timestamptz": "timestamp with time zone",
    "time": "time without time zone", "uuid": "uuid", "unknown": "unknown",
}

_INT_RANGE = {"int2": (-(1 << 15), (1 << 15) - 1), "int4": (-(1 << 31), (1 << 31) - 1),
              "int8": (-(1 << 63), (1 << 63) - 1)}

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
    if t in _NUMS:
        return "N"
    if t in _STRS:
        return "S"
    if t in _DATETIMES:
        return "D"
    if t == "bool":
        return "B"
    if t.startswith("enum:"):
        return "E"
    return "U:" + t


def _tname(t: str) -> str:
    return _TNAME.get(t) or t.split(":", 1)[1]


def _can_implicit(src: str, dst: str) -> bool:
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


def _column_tag(type_name: str) -> str:
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


# ---------------------------------------------------------------------------------------------
# Values: internal representations and Postgres' conversion functions.
#   ints: int; numeric: Decimal (finite ones with exponent <= 0 and no negative zero, like
#   Postgres' NumericVar with its display scale) or Decimal NaN/±Infinity; floats: float
#   (real values are exactly representable in binary32); bool: bool; text types and enums:
#   str; date: days since 2000-01-01; timestamp(tz): microseconds since 2000-01-01 (UTC for
#   timestamptz); ±infinity: Postgres' sentinels (INT32/INT64 min and max); time: microseconds;
#   uuid: int.
# ---------------------------------------------------------------------------------------------

_CTX = decimal.Context(prec=400000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                       rounding=decimal.ROUND_HALF_UP,
                       traps=[decimal.InvalidOperation, decimal.DivisionByZero])
_D_NAN = Decimal("NaN")
_D_PINF = Decimal("Infinity")
_D_NINF = Decimal("-Infinity")
_D_ONE = Decimal(1)
_SPACES = " \t\n\r\f\v"  # C isspace()


def _err(msg: str) -> WhereEvalError:
    return WhereEvalError(msg)


def _int_check(v: int, t: str) -> int:
    lo, hi = _INT_RANGE[t]
    if v < lo or v > hi:
        raise _err(f"{_TNAME[t]} out of range")
    return v


def _dscale(d: Decimal) -> int:
    e = d.as_tuple().exponent
    return -e if isinstance(e, int) and e < 0 else 0


def _num_norm(d: Decimal) -> Decimal:
    """Postgres' numeric: no positive exponent, no negative zero, within the format's limits."""
    if not d.is_finite():
        return d
    e = d.as_tuple().exponent
    if e > 0:
        d = d.quantize(_D_ONE, context=_CTX)
    if d.is_zero():
        if d.is_signed():
            d = d.copy_abs()
        return d
    if d.adjusted() >= 131072 or -d.as_tuple().exponent > 16383:
        raise _err("value overflows numeric format")
    return d


def _num_cmp(a: Decimal, b: Decimal) -> int:
    if a.is_nan():
        return 0 if b.is_nan() else 1
    if b.is_nan():
        return -1
    return (a > b) - (a < b)


def _num_sign(d: Decimal) -> int:
    return 0 if d.is_zero() else (-1 if d.is_signed() else 1)


def _num_add(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return _D_NAN
    if a.is_infinite():
        return _D_NAN if (b.is_infinite() and b != a) else a
    if b.is_infinite():
        return b
    return _num_norm(_CTX.add(a, b))


def _num_neg(a: Decimal) -> Decimal:
    if a.is_nan():
        return a
    if a.is_zero():
        return a
    return _CTX.minus(a)


def _num_sub(a: Decimal, b: Decimal) -> Decimal:
    return _num_add(a, _num_neg(b))


def _num_mul(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return _D_NAN
    if a.is_infinite() or b.is_infinite():
        s = _num_sign(a) * _num_sign(b)
        return _D_NAN if s == 0 else (_D_PINF if s > 0 else _D_NINF)
    r = _CTX.multiply(a, b)
    if _dscale(r) > 16383:
        r = r.quantize(Decimal(1).scaleb(-16383), context=_CTX)
    return _num_norm(r)


def _weight_first(d: Decimal) -> tuple[int, int]:
    """Weight and first digit of ``d`` in Postgres' base-10000 representation."""
    if d.is_zero():
        return 0, 0
    v = abs(d)
    w = v.adjusted() // 4
    first = int(v.scaleb(-4 * w, context=_CTX).to_integral_value(rounding=decimal.ROUND_FLOOR,
                                                                 context=_CTX))
    return w, first


def _div_rscale(a: Decimal, b: Decimal) -> int:
    # numeric.c select_div_scale(): at least NUMERIC_MIN_SIG_DIGITS (16) significant digits.
    w1, f1 = _weight_first(a)
    w2, f2 = _weight_first(b)
    qweight = w1 - w2
    if f1 <= f2:
        qweight -= 1
    rscale = 16 - qweight * 4
    rscale = max(rscale, _dscale(a), _dscale(b), 0)
    return min(rscale, 1000)


def _round_half_away(q: Fraction, scale: int) -> Decimal:
    s = q * (10 ** scale) if scale >= 0 else q / (10 ** -scale)
    n = abs(s.numerator)
    d = s.denominator
    m = (2 * n + d) // (2 * d)
    if s < 0:
        m = -m
    return Decimal(m).scaleb(-scale, context=_CTX)


def _num_div(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return _D_NAN
    if a.is_infinite():
        if b.is_infinite():
            return _D_NAN
        s = _num_sign(b)
        if s == 0:
            raise _err("division by zero")
        return a if s > 0 else _num_neg(a)
    if b.is_infinite():
        return Decimal(0)
    if b.is_zero():
        raise _err("division by zero")
    rscale = _div_rscale(a, b)
    return _num_norm(_round_half_away(Fraction(a) / Fraction(b), rscale))


def _num_mod(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return _D_NAN
    if a.is_infinite():
        if _num_sign(b) == 0:
            raise _err("division by zero")
        return _D_NAN
    if b.is_infinite():
        return a
    if b.is_zero():
        raise _err("division by zero")
    q = Fraction(a) / Fraction(b)
    t = abs(q.numerator) // q.denominator
    if q < 0:
        t = -t
    r = _CTX.subtract(a, _CTX.multiply(b, Decimal(t)))
    scale = max(_dscale(a), _dscale(b))
    return _num_norm(r.quantize(Decimal(1).scaleb(-scale), context=_CTX))


def _num_typmod(d: Decimal, p: int, s: int) -> Decimal:
    """numeric.c apply_typmod()/apply_typmod_special()."""
    if d.is_nan():
        return d
    if d.is_infinite():
        raise _err("numeric field overflow")
    r = d.quantize(Decimal(1).scaleb(-s), rounding=decimal.ROUND_HALF_UP, context=_CTX)
    if not r.is_zero():
        int_digits = max(r.adjusted() + 1, 0)
        if int_digits > p - s:
            raise _err("numeric field overflow")
    return _num_norm(r)


def _num_text(d: Decimal) -> str:
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "-Infinity" if d.is_signed() else "Infinity"
    return format(d, "f")


def _num_to_int(d: Decimal, t: str) -> int:
    if d.is_nan():
        raise _err(f"cannot convert NaN to {_TNAME[t]}")
    if d.is_infinite():
        raise _err(f"cannot convert infinity to {_TNAME[t]}")
    return _int_check(int(d.to_integral_value(rounding=decimal.ROUND_HALF_UP, context=_CTX)), t)


_NUM_IN_RE = re.compile(
    r"[ \t\n\r\f\v]*(?:(?P<nan>[nN][aA][nN])|(?P<isign>[+-]?)(?P<inf>[iI][nN][fF](?:[iI][nN][iI][tT][yY])?)"
    r"|(?P<sign>[+-]?)(?P<digits>[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][ \t\n\r\f\v]*(?P<exp>[+-]?[0-9]+))?)"
    r"[ \t\n\r\f\v]*")


def _numeric_in(s: str) -> Decimal:
    """numeric.c numeric_in() (no typmod)."""
    m = _NUM_IN_RE.fullmatch(s)
    if not m:
        raise _err(f'invalid input syntax for type numeric: "{s}"')
    if m.group("nan"):
        return _D_NAN
    if m.group("inf"):
        return _D_NINF if m.group("isign") == "-" else _D_PINF
    e = m.group("exp")
    if e is not None and abs(int(e)) >= (2 ** 31 - 1) // 2:
        raise _err("value overflows numeric format")
    text = m.group("sign") + m.group("digits") + (("e" + e) if e is not None else "")
    return _num_norm(Decimal(text))


_INT_IN_RE = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+)[ \t\n\r\f\v]*")


def _int_in(s: str, t: str) -> int:
    """pg_strtoint16/32/64 (int2in, int4in, int8in) of Postgres 15."""
    m = _INT_IN_RE.fullmatch(s)
    if not m:
        raise _err(f'invalid input syntax for type {_TNAME[t]}: "{s}"')
    v = int(m.group(1))
    lo, hi = _INT_RANGE[t]
    if v < lo or v > hi:
        raise _err(f'value "{s}" is out of range for type {_TNAME[t]}')
    return v


_FLOAT_SPECIAL_RE = re.compile(
    r"(?P<sign>[+-]?)(?:(?P<nan>nan(?:\([0-9a-z_]*\))?)|(?P<inf>inf(?:inity)?))", re.I)
_FLOAT_DEC_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLOAT_HEX_RE = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?")


def _float_in(s: str, t: str) -> float:
    """float8in()/float4in(): strtod()/strtof() as glibc reads them, plus Postgres' range
    checks (an overflow to infinity or an underflow to zero is an error)."""
    body = s.strip(_SPACES)
    if body == "":
        raise _err(f'invalid input syntax for type {_TNAME[t]}: "{s}"')
    m = _FLOAT_SPECIAL_RE.fullmatch(body)
    if m:
        if m.group("nan"):
            return math.nan
        return -math.inf if m.group("sign") == "-" else math.inf
    if _FLOAT_DEC_RE.fullmatch(body):
        exact = Fraction(Decimal(body))
    elif _FLOAT_HEX_RE.fullmatch(body):
        h = body.replace("X", "x")
        if "p" not in h.lower():
            h += "p0"
        exact = Fraction(float.fromhex(h))
    else:
        raise _err(f'invalid input syntax for type {_TNAME[t]}: "{s}"')
    if t == "float4":
        v = _f32_from_fraction(exact)
    else:
        v = float(Decimal(body)) if _FLOAT_DEC_RE.fullmatch(body) else float(exact)
    if math.isinf(v) or (v == 0.0 and exact != 0):
        raise _err(f'"{body}" is out of range for type {_TNAME[t]}')
    if v == 0.0 and body.lstrip().startswith("-"):
        v = -0.0
    return v


_FLT_MAX = float.fromhex("0x1.fffffep+127")


def _f32_from_fraction(q: Fraction) -> float:
    """The binary32 value nearest to ``q`` (ties to even), as a float; ±inf on overflow."""
    if q == 0:
        return 0.0
    sign = -1.0 if q < 0 else 1.0
    q = abs(q)
    n, d = q.numerator, q.denominator
    e = n.bit_length() - d.bit_length()
    if (n << max(0, -e)) < (d << max(0, e)):
        e -= 1
    ulp = max(e - 23, -149)
    if ulp >= 0:
        num, den = n, d << ulp
    else:
        num, den = n << -ulp, d
    m, rem = divmod(num, den)
    if 2 * rem > den or (2 * rem == den and m & 1):
        m += 1
    if ulp + m.bit_length() > 128:
        return sign * math.inf
    v = math.ldexp(m, ulp)
    if v > _FLT_MAX:
        return sign * math.inf
    return sign * v


def _f32(x: float) -> float:
    """C's ``(float) x``: the nearest binary32 (ties to even), ±inf on overflow."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _fcmp(a: float, b: float) -> int:
    """float.h float8_cmp semantics: NaNs equal each other and sort above everything."""
    if a != a:
        return 0 if b != b else 1
    if b != b:
        return -1
    return (a > b) - (a < b)


def _float_check(r: float, a: float, b: float, op: str) -> float:
    if op in "+-":
        if math.isinf(r) and not math.isinf(a) and not math.isinf(b):
            raise _err("value out of range: overflow")
    elif op == "*":
        if math.isinf(r) and not math.isinf(a) and not math.isinf(b):
            raise _err("value out of range: overflow")
        if r == 0.0 and a != 0.0 and b != 0.0:
            raise _err("value out of range: underflow")
    return r


def _float_arith(op: str, a: float, b: float, single: bool) -> float:
    # float.h float4_pl ... float8_div; a binary32 result is computed in double and rounded
    # (exact for + - * /: double has more than 2*24+2 bits).
    if op == "/":
        if b == 0.0 and a == a:
            raise _err("division by zero")
        r = a / b if b != 0.0 else math.nan
        if single:
            r = _f32(r)
        if math.isinf(r) and not math.isinf(a):
            raise _err("value out of range: overflow")
        if r == 0.0 and a != 0.0 and not math.isinf(b):
            raise _err("value out of range: underflow")
        return r
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    else:
        r = a * b
    if single:
        r = _f32(r)
    return _float_check(r, a, b, op)


def _float_to_int(v: float, t: str) -> int:
    # float.c dtoi2/dtoi4/dtoi8 (ftoi*): rint() then a range check; NaN is out of range.
    if v != v or math.isinf(v):
        raise _err(f"{_TNAME[t]} out of range")
    return _int_check(round(v), t)


def _float_to_numeric(v: float, digits: int) -> Decimal:
    # float8_numeric/float4_numeric: "%.*g" with DBL_DIG (15) / FLT_DIG (6), then numeric_in.
    if v != v:
        return _D_NAN
    if math.isinf(v):
        return _D_NINF if v < 0 else _D_PINF
    return _num_norm(Decimal(format(v, f".{digits}g")))


def _numeric_to_float(d: Decimal, t: str) -> float:
    # numeric_float8/numeric_float4: numeric_out() then float8in()/float4in().
    if d.is_nan():
        return math.nan
    if d.is_infinite():
        return -math.inf if d.is_signed() else math.inf
    if t == "float4":
        v = _f32_from_fraction(Fraction(d))
    else:
        v = float(d)
    if math.isinf(v) or (v == 0.0 and not d.is_zero()):
        raise _err(f'"{_num_text(d)}" is out of range for type {_TNAME[t]}')
    return v


def _int_to_f32(v: int) -> float:
    return _f32_from_fraction(Fraction(v))


def _f8_to_f4(v: float) -> float:
    # float.c dtof(): overflow and underflow are errors.
    r = _f32(v)
    if math.isinf(r) and not math.isinf(v):
        raise _err("value out of range: overflow")
    if r == 0.0 and v != 0.0:
        raise _err("value out of range: underflow")
    return r


def _shortest_text(neg: bool, digits: str, exp10: int, fixed_hi: int) -> str:
    # src/common/d2s.c / f2s.c: fixed notation for -4 <= exponent < 15 (double) / 6 (real).
    if -4 <= exp10 < fixed_hi:
        if exp10 >= 0:
            if len(digits) <= exp10 + 1:
                s = digits + "0" * (exp10 + 1 - len(digits))
            else:
                s = digits[:exp10 + 1] + "." + digits[exp10 + 1:]
        else:
            s = "0." + "0" * (-exp10 - 1) + digits
    else:
        s = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        s += ("e-" if exp10 < 0 else "e+") + f"{abs(exp10):02d}"
    return ("-" if neg else "") + s


def _digits_of(d: Decimal) -> tuple[str, int]:
    t = d.normalize(_CTX).as_tuple()
    digits = "".join(map(str, t.digits))
    return digits, t.exponent + len(digits) - 1


def _float_text(v: float, t: str) -> str:
    """float8out()/float4out() with extra_float_digits >= 1: the shortest exact text."""
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "-Infinity" if v < 0 else "Infinity"
    if v == 0.0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    neg = v < 0
    a = -v if neg else v
    if t == "float8":
        digits, e10 = _digits_of(Decimal(repr(a)))
        return _shortest_text(neg, digits, e10, 15)
    exact = Fraction(a)
    for p in range(1, 10):
        base = Decimal(format(a, f".{p - 1}e"))
        step = Decimal(1).scaleb(base.adjusted() - p + 1)
        best = None
        for c in (base, base - step, base + step):
            if c > 0 and _f32_from_fraction(Fraction(c)) == a:
                dist = abs(Fraction(c) - exact)
                if best is None or dist < best[0]:
                    best = (dist, c)
        if best is not None:
            digits, e10 = _digits_of(best[1])
            return _shortest_text(neg, digits, e10, 6)
    digits, e10 = _digits_of(Decimal(repr(a)))  # not reached
    return _shortest_text(neg, digits, e10, 6)


def _bool_in(s: str) -> bool:
    """bool.c parse_bool_with_len() after trimming whitespace (boolin)."""
    v = s.strip(_SPACES)
    low = v.lower()
    n = len(v)
    if n:
        c = low[0]
        if c == "t" and "true".startswith(low):
            return True
        if c == "f" and "false".startswith(low):
            return False
        if c == "y" and "yes".startswith(low):
            return True
        if c == "n" and "no".startswith(low):
            return False
        if c == "o" and n >= 2:
            if "on".startswith(low):
                return True
            if "off".startswith(low):
                return False
        if low == "1":
            return True
        if low == "0":
            return False
    raise _err(f'invalid input syntax for type boolean: "{s}"')


def _uuid_in(s: str) -> int:
    """uuid.c string_to_uuid()."""
    i = 0
    braces = s.startswith("{")
    if braces:
        i = 1
    out = 0
    for k in range(16):
        pair = s[i:i + 2]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise _err(f'invalid input syntax for type uuid: "{s}"')
        out = (out << 8) | int(pair, 16)
        i += 2
        if s[i:i + 1] == "-" and k % 2 == 1 and k < 15:
            i += 1
    if braces:
        if s[i:i + 1] != "}":
            raise _err(f'invalid input syntax for type uuid: "{s}"')
        i += 1
    if i != len(s):
        raise _err(f'invalid input syntax for type uuid: "{s}"')
    return out


def _uuid_text(v: int) -> str:
    h = f"{v:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- dates and times -------------------------------------------------------------------------

_USECS_PER_DAY = 86_400_000_000
_EPOCH_JDATE = 2451545  # date2j(2000, 1, 1)
_DATE_NOBEGIN, _DATE_NOEND = -(1 << 31), (1 << 31) - 1
_DT_NOBEGIN, _DT_NOEND = -(1 << 63), (1 << 63) - 1
_DATE_END_JULIAN = 2147483494
_TIMESTAMP_END_JULIAN = 109203528
_MIN_TIMESTAMP = -211813488000000000
_END_TIMESTAMP = (_TIMESTAMP_END_JULIAN - _EPOCH_JDATE) * _USECS_PER_DAY


def _date2j(y: int, m: int, d: int) -> int:
    """datetime.c date2j(); ``y`` astronomical (1 BC = 0)."""
    if m > 2:
        m += 1
        y += 4800
    else:
        m += 13
        y += 4799
    century = y // 100
    julian = y * 365 - 32167
    julian += y // 4 - century + century // 4
    julian += 7834 * m // 256 + d
    return julian


def _j2date(jd: int) -> tuple[int, int, int]:
    """datetime.c j2date()."""
    julian = jd + 32044
    quad = julian // 146097
    extra = (julian - quad * 146097) * 4 + 3
    julian += 60 + quad * 3 + extra // 146097
    quad = julian // 1461
    julian -= quad * 1461
    y = julian * 4 // 1461
    julian = ((julian + 305) % 365 if y != 0 else (julian + 306) % 366) + 123
    y += quad * 4
    year = y - 4800
    quad = julian * 2141 // 65536
    day = julian - 7834 * quad // 256
    month = (quad + 10) % 12 + 1
    return year, month, day


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
        return 29 if leap else 28
    return 30 if m in (4, 6, 9, 11) else 31


_DT_RE = re.compile(
    r"(?P<y>[0-9]{4,})-(?P<mo>[0-9]{1,2})-(?P<d>[0-9]{1,2})"
    r"(?:(?:T|[ \t]+)(?P<h>[0-9]{1,2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?P<f>\.[0-9]+)?)?"
    r"(?:[ \t]*(?P<tz>[zZ]|UTC|utc|[+-][0-9]{2}(?::[0-9]{2}(?::[0-9]{2})?|[0-9]{2})?))?)?"
    r"(?:[ \t]+(?P<era>BC|bc|AD|ad))?")
_TIME_RE = re.compile(r"(?P<h>[0-9]{1,2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?P<f>\.[0-9]+)?)?")


def _fsec(f: str | None) -> int:
    # datetime.c ParseFractionalSecond(): rint(strtod(".ddd") * 1000000)
    return round(float(f) * 1000000) if f else 0


def _parse_dt(s: str, want: str, *, literal: bool) -> int:
    """A date/timestamp/timestamptz from ISO text (the model's text, or a literal in the
    subset of Postgres' input syntax that means the same under every ``DateStyle``).
    Raises WhereEvalError if it does not read as one."""
    body = s.strip(_SPACES)
    low = body.lower()
    what = _TNAME[want]
    if low in ("infinity", "+infinity", "-infinity"):
        if want == "date":
            return _DATE_NOBEGIN if low[0] == "-" else _DATE_NOEND
        return _DT_NOBEGIN if low[0] == "-" else _DT_NOEND
    if low == "epoch":
        return (_date2j(1970, 1, 1) - _EPOCH_JDATE) * (1 if want == "date" else _USECS_PER_DAY)
    m = _DT_RE.fullmatch(body)
    if not m:
        if literal:
            raise WhereError(f"unsupported {what} literal '{s}': write it as ISO 'YYYY-MM-DD"
                             + ("'" if want == "date" else " HH:MM:SS[.ffffff]"
                                + ("[+HH[:MM]]'" if want == "timestamptz" else "'"))
                             + ", 'infinity' or '-infinity'")
        raise _err(f"cannot read {what} value '{s}' (needs DateStyle ISO)")
    y, mo, d = int(m.group("y")), int(m.group("mo")), int(m.group("d"))
    era = (m.group("era") or "").lower()
    if y == 0 or not 1 <= mo <= 12:
        raise _err(f'date/time field value out of range: "{s}"')
    if era == "bc":
        y = 1 - y
    if not 1 <= d <= _days_in_month(y, mo):
        raise _err(f'date/time field value out of range: "{s}"')
    if (y, mo, d) < (-4713, 11, 24):
        raise _err(f'date out of range: "{s}"')
    days = _date2j(y, mo, d) - _EPOCH_JDATE
    h = int(m.group("h") or 0)
    mi = int(m.group("mi") or 0)
    sec = int(m.group("s") or 0)
    if h > 23 or mi > 59 or sec > 59:
        if literal:
            raise WhereError(f"unsupported {what} literal '{s}': hours 0-23, minutes and seconds 0-59")
        raise _err(f'date/time field value out of range: "{s}"')
    if want == "date":  # date_in() reads a time (and zone) too, and ignores them
        if not days < _DATE_END_JULIAN - _EPOCH_JDATE:
            raise _err(f'date out of range: "{s}"')
        return days
    us = days * _USECS_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1_000_000 + _fsec(m.group("f"))
    if want == "timestamptz":
        tz = m.group("tz")
        off = 0
        if tz and tz[0] in "+-":
            parts = tz[1:].split(":") if ":" in tz else ([tz[1:3], tz[3:5]] if len(tz) > 3 else [tz[1:]])
            hh = int(parts[0])
            mm = int(parts[1]) if len(parts) > 1 else 0
            ss = int(parts[2]) if len(parts) > 2 else 0
            if hh > 15 or mm > 59 or ss > 59:
                raise _err(f'time zone displacement out of range: "{s}"')
            off = (hh * 3600 + mm * 60 + ss) * (-1 if tz[0] == "-" else 1)
        us -= off * 1_000_000
    if not _MIN_TIMESTAMP <= us < _END_TIMESTAMP:
        raise _err(f'timestamp out of range: "{s}"')
    return us


def _parse_time(s: str, *, literal: bool) -> int:
    m = _TIME_RE.fullmatch(s.strip(_SPACES))
    if m:
        h, mi, sec = int(m.group("h")), int(m.group("mi")), int(m.group("s") or 0)
        us = ((h * 60 + mi) * 60 + sec) * 1_000_000 + _fsec(m.group("f"))
        if (h < 24 and mi < 60 and sec < 60) or us == _USECS_PER_DAY:
            if us <= _USECS_PER_DAY:  # time_in() accepts up to 24:00:00
                return us
    if literal:
        raise WhereError(f"unsupported time literal '{s}': write it as 'HH:MM[:SS[.ffffff]]'")
    raise _err(f"cannot read time value '{s}'")


def _date_text(days: int) -> str:
    if days == _DATE_NOBEGIN:
        return "-infinity"
    if days == _DATE_NOEND:
        return "infinity"
    y, m, d = _j2date(days + _EPOCH_JDATE)
    if y <= 0:
        return f"{1 - y:04d}-{m:02d}-{d:02d} BC"
    return f"{y:04d}-{m:02d}-{d:02d}"


def _time_part(us: int) -> str:
    s, f = divmod(us, 1_000_000)
    mi, s = divmod(s, 60)
    h, mi = divmod(mi, 60)
    out = f"{h:02d}:{mi:02d}:{s:02d}"
    if f:
        out += ("." + f"{f:06d}").rstrip("0")
    return out


def _ts_text(us: int) -> str:
    if us == _DT_NOBEGIN:
        return "-infinity"
    if us == _DT_NOEND:
        return "infinity"
    days, rem = divmod(us, _USECS_PER_DAY)
    y, m, d = _j2date(days + _EPOCH_JDATE)
    out = f"{(1 - y) if y <= 0 else y:04d}-{m:02d}-{d:02d} {_time_part(rem)}"
    return out + " BC" if y <= 0 else out


def _ts_to_date(us: int) -> int:
    if us == _DT_NOBEGIN:
        return _DATE_NOBEGIN
    if us == _DT_NOEND:
        return _DATE_NOEND
    return us // _USECS_PER_DAY


def _date_to_ts(days: int) -> int:
    # date.c date2timestamp(): infinities map, a date past the timestamp range is an error.
    if days == _DATE_NOBEGIN:
        return _DT_NOBEGIN
    if days == _DATE_NOEND:
        return _DT_NOEND
    if days >= _TIMESTAMP_END_JULIAN - _EPOCH_JDATE:
        raise _err("date out of range for timestamp")
    return days * _USECS_PER_DAY


def _date_ts_key(days: int) -> int:
    # date_cmp_timestamp_internal(): a date past the timestamp range sorts after every finite
    # timestamp and before infinity.
    if days == _DATE_NOBEGIN:
        return _DT_NOBEGIN
    if days == _DATE_NOEND:
        return _DT_NOEND
    if days >= _TIMESTAMP_END_JULIAN - _EPOCH_JDATE:
        return _DT_NOEND - 1
    return days * _USECS_PER_DAY


# --- LIKE ------------------------------------------------------------------------------------

_LIKE_TRUE, _LIKE_FALSE, _LIKE_ABORT = 1, 0, -1


def _like_match(t: str, ti: int, p: str, pi: int) -> int:
    """like_match.c MatchText() over code points (equivalent to its byte-wise UTF-8 walk)."""
    tlen, plen = len(t), len(p)
    if plen - pi == 1 and p[pi] == "%":
        return _LIKE_TRUE
    while ti < tlen and pi < plen:
        c = p[pi]
        if c == "\\":
            pi += 1
            if pi >= plen:
                raise _err("LIKE pattern must not end with escape character")
            if p[pi] != t[ti]:
                return _LIKE_FALSE
        elif c == "%":
            pi += 1
            while pi < plen:
                if p[pi] == "%":
                    pi += 1
                elif p[pi] == "_":
                    if ti >= tlen:
                        return _LIKE_ABORT
                    ti += 1
                    pi += 1
                else:
                    break
            if pi >= plen:
                return _LIKE_TRUE
            if p[pi] == "\\":
                if plen - pi < 2:
                    raise _err("LIKE pattern must not end with escape character")
                first = p[pi + 1]
            else:
                first = p[pi]
            while ti < tlen:
                if t[ti] == first:
                    r = _like_match(t, ti, p, pi)
                    if r != _LIKE_FALSE:
                        return r
                ti += 1
            return _LIKE_ABORT
        elif c == "_":
            ti += 1
            pi += 1
            continue
        elif c != t[ti]:
            return _LIKE_FALSE
        ti += 1
        pi += 1
    if ti < tlen:
        return _LIKE_FALSE
    while pi < plen and p[pi] == "%":
        pi += 1
    return _LIKE_TRUE if pi >= plen else _LIKE_ABORT


def _ends_in_escape(pat: str) -> bool:
    """Does the (backslash-escaped) LIKE pattern end with an escape that escapes nothing?"""
    i, n = 0, len(pat)
    while i < n:
        if pat[i] == "\\":
            if i + 1 == n:
                return True
            i += 2
        else:
            i += 1
    return False


def _like_escape(pat: str, esc: str) -> str:
    """like_match.c do_like_escape(): rewrite ``pat`` to use backslash as its escape."""
    if esc == "":
        return pat.replace("\\", "\\\\")
    if len(esc) != 1:
        raise _err("invalid escape string (must be empty or one character)")
    if esc == "\\":
        return pat
    out = []
    after = False
    for ch in pat:
        if ch == esc and not after:
            out.append("\\")
            after = True
        elif ch == "\\":
            out.append("\\")
            if not after:
                out.append("\\")
            after = False
        else:
            out.append(ch)
            after = False
    return "".join(out)


def _lower_char(c: str) -> str:
    low = c.lower()
    return low if len(low) == 1 else ("i" if c == "\u0130" else c)


def _upper_char(c: str) -> str:
    up = c.upper()
    if len(up) == 1:
        return up
    title = c.title()  # the simple mapping where the full one has several characters
    return title if len(title) == 1 else c


def _lower(s: str) -> str:
    """Postgres' lower() in a UTF-8 libc locale: towlower() per character, i.e. Unicode's
    simple case mapping (checked against the server for every code point)."""
    return "".join(map(_lower_char, s))


def _upper(s: str) -> str:
    """Postgres' upper() in a UTF-8 libc locale: towupper() per character."""
    return "".join(map(_upper_char, s))


# ---------------------------------------------------------------------------------------------
# Expression tree. Every node has a type tag ``t``, its SQL rendering ``q`` (a Composable,
# built at construction from the user's expression), ``ev(vals)`` and ``fold()``.
# ---------------------------------------------------------------------------------------------

class _Node:
    t: str
    q: sql.Composable
    var: bool = False  # reads a column

    def ev(self, vals: dict[str, Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fold(self) -> "_Node":
        return self


class _Const(_Node):
    def __init__(self, t: str, value: Any, q: sql.Composable | None = None, literal: str | None = None):
        self.t, self.value, self.q = t, value, q if q is not None else sql.Literal(None)
        self.literal = literal  # the text of an unknown-typed string literal

    def ev(self, vals):
        return self.value


class _Col(_Node):
    var = True

    def __init__(self, name: str, t: str):
        self.name, self.t, self.q = name, t, sql.Identifier(name)

    def ev(self, vals):
        return vals[self.name]


def _is_null_const(n: _Node) -> bool:
    return isinstance(n, _Const) and n.value is None


class _Op(_Node):
    """A strict function/operator: NULL if any argument is NULL; all arguments are evaluated
    (left to right) first, as the executor does."""

    def __init__(self, t: str, kids: Sequence[_Node], fn: Callable[..., Any], q: sql.Composable):
        self.t, self.kids, self.fn, self.q = t, list(kids), fn, q
        self.var = any(k.var for k in kids)

    def ev(self, vals):
        args = [k.ev(vals) for k in self.kids]
        for a in args:
            if a is None:
                return None
        return self.fn(*args)

    def fold(self):
        kids = [k.fold() for k in self.kids]
        if any(_is_null_const(k) for k in kids):
            return _Const(self.t, None)
        if all(isinstance(k, _Const) for k in kids):
            return _Const(self.t, self.fn(*[k.value for k in kids]))
        return _Op(self.t, kids, self.fn, self.q)


class _BoolOp(_Node):
    def __init__(self, is_and: bool, args: Sequence[_Node], q: sql.Composable):
        self.t, self.is_and, self.args, self.q = "bool", is_and, list(args), q
        self.var = any(a.var for a in args)

    def ev(self, vals):
        stop = not self.is_and  # AND stops at FALSE, OR at TRUE
        null = False
        for a in self.args:
            v = a.ev(vals)
            if v is None:
                null = True
            elif v is stop:
                return stop
        return None if null else (not stop)

    def fold(self):
        # clauses.c simplify_and_arguments()/simplify_or_arguments(): flatten, simplify in
        # order, stop at the first constant that decides, drop the neutral ones, keep one NULL.
        stop = not self.is_and
        pending = list(self.args)
        out: list[_Node] = []
        null = False
        while pending:
            a = _unsugar(pending.pop(0))
            if isinstance(a, _BoolOp) and a.is_and == self.is_and:
                pending = a.args + pending
                continue
            a = _unsugar(a.fold())
            if isinstance(a, _BoolOp) and a.is_and == self.is_and:
                pending = a.args + pending
                continue
            if isinstance(a, _Const):
                if a.value is None:
                    null = True
                elif a.value is stop:
                    return _Const("bool", stop)
                continue
            out.append(a)
        if null:
            out.append(_Const("bool", None))
        if not out:
            return _Const("bool", not stop)
        if len(out) == 1:
            return out[0]
        return _BoolOp(self.is_and, out, self.q)


class _Not(_Node):
    def __init__(self, x: _Node, q: sql.Composable):
        self.t, self.x, self.q, self.var = "bool", x, q, x.var

    def ev(self, vals):
        v = self.x.ev(vals)
        return None if v is None else not v

    def fold(self):
        x = self.x.fold()
        if isinstance(x, _Const):
            return _Const("bool", None if x.value is None else not x.value)
        return _Not(x, self.q)


class _Test(_Node):
    """Non-strict tests: IS [NOT] NULL, IS TRUE / IS FALSE, IS [NOT] DISTINCT FROM."""

    def __init__(self, kids: Sequence[_Node], fn: Callable[..., bool], q: sql.Composable):
        self.t, self.kids, self.fn, self.q = "bool", list(kids), fn, q
        self.var = any(k.var for k in kids)

    def ev(self, vals):
        return self.fn(*[k.ev(vals) for k in self.kids])

    def fold(self):
        kids = [k.fold() for k in self.kids]
        if all(isinstance(k, _Const) for k in kids):
            return _Const("bool", self.fn(*[k.value for k in kids]))
        return _Test(kids, self.fn, self.q)


class _AnyArray(_Node):
    """``x = ANY (ARRAY[consts])``, what ``x IN (c1, c2, ...)`` becomes (parse_expr.c
    transformAExprIn): NULL if x is NULL, TRUE at the first equal element, else NULL if an
    element was NULL, else FALSE."""

    def __init__(self, x: _Node, elems: Sequence[_Node], eq: Callable[[Any, Any], bool]):
        self.t, self.x, self.elems, self.eq, self.q = "bool", x, list(elems), eq, sql.SQL("")
        self.var = x.var

    def ev(self, vals):
        a = self.x.ev(vals)
        items = [e.ev(vals) for e in self.elems]
        if a is None:
            return None
        null = False
        for b in items:
            if b is None:
                null = True
            elif self.eq(a, b):
                return True
        return None if null else False

    def fold(self):
        x = self.x.fold()
        elems = [e.fold() for e in self.elems]
        node = _AnyArray(x, elems, self.eq)
        if isinstance(x, _Const) and all(isinstance(e, _Const) for e in elems):
            return _Const("bool", node.ev({}))
        return node


class _Coalesce(_Node):
    def __init__(self, t: str, args: Sequence[_Node], q: sql.Composable):
        self.t, self.args, self.q = t, list(args), q
        self.var = any(a.var for a in args)

    def ev(self, vals):
        for a in self.args:
            v = a.ev(vals)
            if v is not None:
                return v
        return None

    def fold(self):
        # clauses.c: NULL constants dropped, nothing after the first non-NULL constant kept
        out: list[_Node] = []
        for a in self.args:
            f = a.fold()
            if isinstance(f, _Const):
                if f.value is None:
                    continue
                if not out:
                    return f
                out.append(f)
                break
            out.append(f)
        if not out:
            return _Const(self.t, None)
        return _Coalesce(self.t, out, self.q)


class _Sugar(_Node):
    """A construct rendered as written (IN, BETWEEN, an explicit cast of a literal) but
    evaluated as what Postgres turns it into."""

    def __init__(self, impl: _Node, q: sql.Composable):
        self.impl, self.q, self.t, self.var = impl, q, impl.t, impl.var

    def ev(self, vals):
        return self.impl.ev(vals)

    def fold(self):
        return self.impl.fold()


def _unsugar(n: _Node) -> _Node:
    while isinstance(n, _Sugar):
        n = n.impl
    return n


# ---------------------------------------------------------------------------------------------
# Operators.
# ---------------------------------------------------------------------------------------------

_ORDERING = ("<", "<=", ">", ">=")


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
    return (a > b) - (a < b)


def _rtrim(s: str) -> str:
    return s.rstrip(" ")


def _bpchar_cmp(a: str, b: str) -> int:
    return _plain_cmp(_rtrim(a), _rtrim(b))


def _resolve_cmp(a: str, b: str) -> tuple[str, str, str] | None:
    """Postgres' choice of comparison operator for argument types ``a`` and ``b`` (10.2,
    "Operators"): (domain, type ``a`` is converted to, type ``b`` is converted to)."""
    if a in _NUMS and b in _NUMS:
        if a in _INTS and b in _INTS:
            return "int", a, b
        if a in _FLOATS or b in _FLOATS:
            return "float", a if a in _FLOATS else "float8", b if b in _FLOATS else "float8"
        return "numeric", "numeric", "numeric"
    if a in _STRS and b in _STRS:
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


def _cmp_fn(kind: str, op: str, at: str, bt: str) -> Callable[[Any, Any], bool]:
    if kind == "float":
        return lambda x, y: _cmp_result(op, _fcmp(x, y))
    if kind == "numeric":
        return lambda x, y: _cmp_result(op, _num_cmp(x, y))
    if kind == "bpchar":
        return lambda x, y: _cmp_result(op, _bpchar_cmp(x, y))
    if kind == "date_ts":
        ka = _date_ts_key if at == "date" else (lambda v: v)
        kb = _date_ts_key if bt == "date" else (lambda v: v)
        return lambda x, y: _cmp_result(op, _plain_cmp(ka(x), kb(y)))
    return lambda x, y: _cmp_result(op, _plain_cmp(x, y))


def _select_common_type(types: Sequence[str]) -> str | None:
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
        if (ptype not in _PREFERRED and _can_implicit(ptype, t) and not _can_implicit(t, ptype)):
            ptype = t
    return "text" if ptype == "unknown" else ptype


# --- casts -----------------------------------------------------------------------------------

def _to_text_fn(src: str) -> Callable[[Any], str] | None:
    if src in _INTS:
        return str
    if src == "numeric":
        return _num_text
    if src in _FLOATS:
        return lambda v: _float_text(v, src)
    if src == "bool":
        return lambda v: "true" if v else "false"
    if src == "bpchar":
        return _rtrim
    if src in ("text", "varchar") or src.startswith("enum:"):
        return lambda v: v
    if src == "date":
        return _date_text
    if src == "timestamp":
        return _ts_text
    if src == "time":
        return _time_part
    if src == "uuid":
        return _uuid_text
    return None


def _cast_fn(src: str, dst: str, typmod: tuple[int, int] | None) -> Callable[[Any], Any] | None:
    """The function converting a non-NULL value of type ``src`` to ``dst`` (4.2.9 "Type
    Casts"; pg_cast), or None if Postgres has no such cast or this module refuses it."""
    fn = _cast_fn_base(src, dst)
    if fn is None or dst != "numeric" or typmod is None:
        return fn
    p, s = typmod
    return lambda v: _num_typmod(fn(v), p, s)


def _cast_fn_base(src: str, dst: str) -> Callable[[Any], Any] | None:
    if src == dst:
        return lambda v: v
    if dst in _INTS:
        if src in _INTS:
            return lambda v: _int_check(v, dst)
        if src == "numeric":
            return lambda v: _num_to_int(v, dst)
        if src in _FLOATS:
            return lambda v: _float_to_int(v, dst)
        if src == "bool" and dst == "int4":
            return lambda v: 1 if v else 0
        if src in _STRS:
            return lambda v: _int_in(v, dst)
        return None
    if dst == "numeric":
        if src in _INTS:
            return lambda v: Decimal(v)
        if src == "float8":
            return lambda v: _float_to_numeric(v, 15)
        if src == "float4":
            return lambda v: _float_to_numeric(v, 6)
        if src in _STRS:
            return _numeric_in
        return None
    if dst == "float4":
        if src in _INTS:
            return _int_to_f32
        if src == "numeric":
            return lambda v: _numeric_to_float(v, "float4")
        if src == "float8":
            return _f8_to_f4
        if src in _STRS:
            return lambda v: _float_in(v, "float4")
        return None
    if dst == "float8":
        if src in _INTS:
            return float
        if src == "numeric":
            return lambda v: _numeric_to_float(v, "float8")
        if src == "float4":
            return lambda v: v
        if src in _STRS:
            return lambda v: _float_in(v, "float8")
        return None
    if dst == "bool":
        if src == "int4":
            return lambda v: v != 0
        if src in _STRS:
            return _bool_in
        return None
    if dst in ("text", "varchar"):
        return _to_text_fn(src)
    if dst == "bpchar" and src in ("text", "varchar"):
        return lambda v: v
    if dst == "date" and src == "timestamp":
        return _ts_to_date
    if dst == "timestamp" and src == "date":
        return _date_to_ts
    if dst == "uuid" and src in _STRS:
        return _uuid_in
    return None


def _literal_in(s: str, t: str, typmod: tuple[int, int] | None) -> Any:
    """An unknown-typed literal read by type ``t``'s input function (at construction)."""
    if t in _INTS:
        return _int_in(s, t)
    if t == "numeric":
        v = _numeric_in(s)
        return _num_typmod(v, *typmod) if typmod else v
    if t in _FLOATS:
        return _float_in(s, t)
    if t == "bool":
        return _bool_in(s)
    if t in _STRS or t.startswith("enum:"):
        return s
    if t in ("date", "timestamp", "timestamptz"):
        return _parse_dt(s, t, literal=True)
    if t == "time":
        return _parse_time(s, literal=True)
    if t == "uuid":
        return _uuid_in(s)
    raise WhereError(f"literals of type {_tname(t)} are not supported")


def _canonical_literal(v: Any, t: str) -> str | None:
    """The text a date/time literal is rendered as: ISO, and ``+00`` for timestamptz."""
    if t == "date":
        return _date_text(v)
    if t == "timestamp":
        return _ts_text(v)
    if t == "time":
        return _time_part(v)
    if t == "timestamptz":
        if v in (_DT_NOBEGIN, _DT_NOEND):
            return _ts_text(v)
        text = _ts_text(v)
        if text.endswith(" BC"):
            return text[:-3] + "+00 BC"
        return text + "+00"
    return None


_TYPE_SQL = {
    "int2": "smallint", "int4": "integer", "int8": "bigint", "numeric": "numeric",
    "float4": "real", "float8": "double precision", "bool": "boolean", "text": "text",
    "varchar": "character varying", "date": "date", "timestamp": "timestamp without time zone",
    "timestamptz": "timestamp with time zone", "time": "time without time zone", "uuid": "uuid",
}


# ---------------------------------------------------------------------------------------------
# Compiler: sqlglot AST -> typed tree.
# ---------------------------------------------------------------------------------------------

_CMP_OPS = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">="}
_ARITH_OPS = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.Mod: "%"}
_NUMBER_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _paren(fmt: str, *parts: sql.Composable) -> sql.Composable:
    return sql.SQL(fmt).format(*parts)


class _Compiler:
    def __init__(self, columns: dict[str, str]):
        self.columns = dict(columns)
        self.tags = {}
        self.used: set[str] = set()

    # -- helpers -------------------------------------------------------------------------

    def tag(self, name: str) -> str:
        if name not in self.tags:
            self.tags[name] = _column_tag(self.columns[name])
        return self.tags[name]

    @staticmethod
    def describe(n: _Node) -> str:
        n = _unsugar(n)
        while isinstance(n, _Op) and getattr(n, "implicit", False):
            n = n.kids[0]
        if isinstance(n, _Col):
            return f"column '{n.name}' ({_tname(n.t)})"
        return f"an expression of type {_tname(n.t)}"

    def usable(self, n: _Node) -> _Node:
        if n.t.startswith("opaque:"):
            raise WhereError(f"{self.describe(n)}: only IS [NOT] NULL is supported for type"
                             f" {_tname(n.t)}")
        return n

    def coerce_unknown(self, n: _Node, t: str, typmod: tuple[int, int] | None = None) -> _Node:
        """Give an unknown-typed literal (or NULL) the type ``t``."""
        if n.t != "unknown":
            return n
        assert isinstance(n, _Const)
        if t.startswith("opaque:"):
            raise WhereError(f"comparisons with type {_tname(t)} are not supported")
        if n.value is None:
            return _Const(t, None, sql.Literal(None))
        try:
            v = _literal_in(n.value, t, typmod)
        except WhereEvalError as e:
            raise WhereError(str(e)) from None
        canon = _canonical_literal(v, t)
        q = sql.Literal(canon) if canon is not None else n.q
        return _Const(t, v, q, literal=n.value)

    def implicit(self, n: _Node, t: str) -> _Node:
        """An implicit cast of ``n`` to ``t`` (rendered as ``n`` itself: Postgres adds it)."""
        if n.t == t:
            return n
        if n.t == "unknown":
            return self.coerce_unknown(n, t)
        fn = _cast_fn(n.t, t, None)
        if fn is None:  # pragma: no cover - resolution only asks for existing casts
            raise WhereError(f"cannot convert {_tname(n.t)} to {_tname(t)}")
        node = _Op(t, [n], fn, n.q)
        node.implicit = True  # type: ignore[attr-defined]
        return node

    def boolean(self, n: _Node, ctx: str) -> _Node:
        if n.t == "unknown":
            return self.coerce_unknown(n, "bool")
        if n.t != "bool":
            self.usable(n)
            raise WhereError(f"argument of {ctx} must be type boolean, not type {_tname(n.t)}"
                             f" ({self.describe(n)})")
        return n

    # -- entry ---------------------------------------------------------------------------

    def compile(self, e: exp.Expression) -> _Node:
        if isinstance(e, exp.Paren):
            return self.compile(e.this)
        if isinstance(e, exp.Column):
            return self.column(e)
        if isinstance(e, exp.Literal):
            return self.literal(e)
        if isinstance(e, exp.RawString):
            return _Const("unknown", e.this, sql.Literal(e.this))
        if isinstance(e, exp.Boolean):
            v = bool(e.this)
            return _Const("bool", v, sql.SQL("TRUE" if v else "FALSE"))
        if isinstance(e, exp.Null):
            return _Const("unknown", None, sql.SQL("NULL"))
        if isinstance(e, exp.Neg):
            return self.negate(e)
        for cls, op in _ARITH_OPS.items():
            if type(e) is cls:
                return self.arith(op, self.compile(e.this), self.compile(e.expression))
        for cls, op in _CMP_OPS.items():
            if type(e) is cls:
                return self.comparison(op, self.compile(e.this), self.compile(e.expression))
        if isinstance(e, (exp.NullSafeEQ, exp.NullSafeNEQ)):
            return self.distinct(isinstance(e, exp.NullSafeNEQ), self.compile(e.this),
                                 self.compile(e.expression))
        if isinstance(e, (exp.And, exp.Or)):
            return self.boolop(e)
        if isinstance(e, exp.Not):
            x = self.boolean(self.compile(e.this), "NOT")
            return _Not(x, _paren("(NOT {})", x.q))
        if isinstance(e, exp.Is):
            return self.is_(e)
        if isinstance(e, exp.In):
            return self.in_(e)
        if isinstance(e, exp.Between):
            return self.between(e)
        if isinstance(e, exp.Escape):
            like = e.this
            if not isinstance(like, (exp.Like, exp.ILike)):
                raise WhereError("ESCAPE is only supported with LIKE and ILIKE")
            return self.like(like, e.expression)
        if isinstance(e, (exp.Like, exp.ILike)):
            return self.like(e, e.args.get("escape"))
        if isinstance(e, exp.Cast) and type(e) is exp.Cast:
            return self.cast(e)
        if type(e) in (exp.Lower, exp.Upper, exp.Length):
            return self.text_function(e)
        if type(e) is exp.Coalesce:
            return self.coalesce(e)
        self.refuse(e)
        raise AssertionError("unreachable")  # pragma: no cover

    def refuse(self, e: exp.Expression) -> None:
        if isinstance(e, (exp.Subquery, exp.Select, exp.Exists, exp.Query)) or e.find(exp.Select):
            raise WhereError("subqueries are not supported")
        if isinstance(e, (exp.Any, exp.All)):
            raise WhereError("ANY/ALL are not supported (use IN)")
        if isinstance(e, exp.Cast):
            raise WhereError(f"{e.key.upper()} is not supported (use CAST or ::)")
        if isinstance(e, exp.Func):
            if isinstance(e, exp.Anonymous):
                name = e.name
            else:
                try:
                    name = e.sql(dialect="postgres").split("(", 1)[0]
                except Exception:  # pragma: no cover - sqlglot cannot print some nodes
                    name = e.sql_name()
            raise WhereError(f"function calls are not supported ({name.lower()}); supported:"
                             " lower, upper, length, char_length, coalesce")
        if isinstance(e, (exp.ByteString, exp.UnicodeString, exp.HexString, exp.BitString)):
            raise WhereError("only standard '...' and $$...$$ string literals are supported"
                             " (no E'', U&'', X'' or B'' literals)")
        if isinstance(e, (exp.Placeholder, exp.Parameter)):
            raise WhereError("parameters are not supported")
        if isinstance(e, exp.Star):
            raise WhereError("* is not supported")
        what = type(e).__name__
        try:
            snippet = e.sql(dialect="postgres")
        except Exception:  # pragma: no cover - sqlglot cannot print some nodes
            snippet = ""
        raise WhereError(f"unsupported construct {what}" + (f": {snippet[:60]}" if snippet else ""))

    # -- leaves --------------------------------------------------------------------------

    def column(self, e: exp.Column) -> _Node:
        if e.table or e.args.get("db") or e.args.get("catalog"):
            raise WhereError(f"qualified column references are not supported ({e.sql(dialect='postgres')})")
        ident = e.this
        if not isinstance(ident, exp.Identifier):
            self.refuse(ident)
        name = ident.this if ident.quoted else ident.this.translate(_ASCII_LOWER)
        if name not in self.columns:
            close = difflib.get_close_matches(name, list(self.columns), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise WhereError(f"unknown column '{name}'{hint}")
        t = self.tag(name)
        if t == "opaque:jsonb":
            raise WhereError(f"column '{name}' is jsonb, which where: does not support (the value"
                             " model reads a JSON null as SQL NULL)")
        self.used.add(name)
        return _Col(name, t)

    def literal(self, e: exp.Literal) -> _Node:
        if e.is_string:
            return _Const("unknown", e.this, sql.Literal(e.this))
        return self.number(e.this, False)

    def number(self, text: str, negative: bool) -> _Node:
        if not _NUMBER_RE.fullmatch(text):
            raise WhereError(f"unsupported number literal {text!r}")
        if re.fullmatch(r"[0-9]+", text):
            v = -int(text) if negative else int(text)
            lo4, hi4 = _INT_RANGE["int4"]
            lo8, hi8 = _INT_RANGE["int8"]
            if lo4 <= v <= hi4:
                return _Const("int4", v, sql.Literal(v))
            if lo8 <= v <= hi8:
                return _Const("int8", v, sql.Literal(v))
            d = Decimal(v)
            return _Const("numeric", d, sql.Literal(v))
        d = Decimal(text)
        if d.adjusted() >= 131072 or -d.as_tuple().exponent > 16383:
            raise WhereError(f"number literal {text!r}: value overflows numeric format")
        d = _num_norm(-d if negative else d)
        s = str(d)
        if "." in s or "E" in s:
            q = sql.Literal(d)
        else:
            q = _paren("CAST({} AS numeric)", sql.Literal(s))
        return _Const("numeric", d, q)

    def negate(self, e: exp.Neg) -> _Node:
        inner = e.this
        negative = True
        while True:  # gram.y doNegate(): a minus in front of a number constant is folded
            while isinstance(inner, exp.Paren):
                inner = inner.this
            if isinstance(inner, exp.Neg):
                negative = not negative
                inner = inner.this
                continue
            break
        if isinstance(inner, exp.Literal) and not inner.is_string:
            return self.number(inner.this, negative)
        x = self.usable(self.compile(e.this))
        if x.t == "unknown":
            raise WhereError("operator is not unique: - unknown (cast the literal)")
        if x.t not in _NUMS:
            raise WhereError(f"operator does not exist: - {_tname(x.t)} ({self.describe(x)})")
        t = x.t
        if t in _INTS:
            fn = lambda v: _int_check(-v, t)  # noqa: E731
        elif t == "numeric":
            fn = _num_neg
        else:
            fn = lambda v: -v  # noqa: E731
        return _Op(t, [x], fn, _paren("(- {})", x.q))

    # -- operators -----------------------------------------------------------------------

    def unify(self, a: _Node, b: _Node) -> tuple[_Node, _Node]:
        """An unknown literal takes the other operand's type; two unknowns are text."""
        self.usable(a)
        self.usable(b)
        if a.t == "unknown" and b.t == "unknown":
            return self.coerce_unknown(a, "text"), self.coerce_unknown(b, "text")
        if a.t == "unknown":
            a = self.coerce_unknown(a, b.t)
        elif b.t == "unknown":
            b = self.coerce_unknown(b, a.t)
        return a, b

    def comparison(self, op: str, a: _Node, b: _Node, q: sql.Composable | None = None) -> _Node:
        a, b = self.unify(a, b)
        r = _resolve_cmp(a.t, b.t)
        if r is None:
            raise WhereError(f"operator does not exist: {_tname(a.t)} {op} {_tname(b.t)}"
                             f" ({self.describe(a)}, {self.describe(b)})")
        kind, at, bt = r
        if kind == "tz":
            raise WhereError(f"comparing {_tname(a.t)} with {_tname(b.t)} depends on the session"
                             " TimeZone and is not supported: compare timestamp with time zone"
                             " values with each other (literals with an explicit offset)")
        if op in _ORDERING and kind in ("text", "bpchar", "enum"):
            subject = b if isinstance(_unsugar(b), _Col) and not isinstance(_unsugar(a), _Col) else a
            if kind == "enum":
                raise WhereError(f"ordering comparisons (<, <=, >, >=, BETWEEN) on {_tname(a.t)}"
                                 f" are not supported ({self.describe(subject)}): the sort order"
                                 " of an enum is not known here; use =, <> or IN")
            raise WhereError("ordering comparisons (<, <=, >, >=, BETWEEN) on text are not"
                             f" supported ({self.describe(subject)}): they depend on the"
                             " collation; compare text with =, <>, IN or LIKE")
        a2, b2 = self.implicit(a, at), self.implicit(b, bt)
        fn = _cmp_fn(kind, op, at, bt)
        return _Op("bool", [a2, b2], fn,
                   q if q is not None else _paren("({} " + op + " {})", a.q, b.q))

    def distinct(self, negate: bool, a: _Node, b: _Node) -> _Node:
        eq = self.comparison("=", a, b)
        assert isinstance(eq, _Op)
        a2, b2 = eq.kids
        f = eq.fn

        def test(x, y):
            if x is None or y is None:
                same = x is None and y is None
            else:
                same = f(x, y)
            return same if not negate else not same

        word = "IS DISTINCT FROM" if negate else "IS NOT DISTINCT FROM"
        return _Test([a2, b2], test, _paren("({} " + word + " {})", a2.q, b2.q))

    def arith(self, op: str, a: _Node, b: _Node) -> _Node:
        self.usable(a)
        self.usable(b)
        if a.t == "unknown" and b.t == "unknown":
            raise WhereError(f"operator is not unique: unknown {op} unknown (cast a literal)")
        a, b = self.unify(a, b)
        q = _paren("({} " + op + " {})", a.q, b.q)
        if a.t not in _NUMS or b.t not in _NUMS:
            raise WhereError(f"operator does not exist: {_tname(a.t)} {op} {_tname(b.t)}"
                             f" ({self.describe(a)}, {self.describe(b)})")
        if a.t in _INTS and b.t in _INTS:
            t = max(a.t, b.t, key=_INTS.index)
            fn = _int_op(op, t)
            return _Op(t, [a, b], fn, q)
        if a.t in _FLOATS or b.t in _FLOATS:
            if op == "%":
                raise WhereError(f"operator does not exist: {_tname(a.t)} % {_tname(b.t)}")
            single = a.t == b.t == "float4"
            t = "float4" if single else "float8"
            a2 = a if a.t in _FLOATS else self.implicit(a, "float8")
            b2 = b if b.t in _FLOATS else self.implicit(b, "float8")
            return _Op(t, [a2, b2], lambda x, y: _float_arith(op, x, y, single), q)
        fn = {"+": _num_add, "-": _num_sub, "*": _num_mul, "/": _num_div, "%": _num_mod}[op]
        return _Op("numeric", [self.implicit(a, "numeric"), self.implicit(b, "numeric")], fn, q)

    def boolop(self, e: exp.Expression) -> _Node:
        is_and = isinstance(e, exp.And)
        cls = exp.And if is_and else exp.Or
        flat: list[exp.Expression] = []

        def walk(x: exp.Expression) -> None:
            if type(x) is cls:
                walk(x.this)
                walk(x.expression)
            else:
                flat.append(x)

        walk(e)
        word = "AND" if is_and else "OR"
        args = [self.boolean(self.compile(x), word) for x in flat]
        q = sql.SQL("(") + sql.SQL(f" {word} ").join(a.q for a in args) + sql.SQL(")")
        return _BoolOp(is_and, args, q)

    def is_(self, e: exp.Is) -> _Node:
        negate = bool(e.args.get("negate"))
        x = self.compile(e.this)
        target = e.expression
        if isinstance(target, exp.Null):
            word = "IS NOT NULL" if negate else "IS NULL"
            fn = (lambda v: v is not None) if negate else (lambda v: v is None)
            return _Test([x], fn, _paren("({} " + word + ")", x.q))
        if isinstance(target, exp.Boolean):
            x = self.boolean(x, "IS " + ("TRUE" if target.this else "FALSE"))
            want = bool(target.this)
            word = ("IS NOT " if negate else "IS ") + ("TRUE" if want else "FALSE")
            if negate:
                fn = lambda v: v is not want  # noqa: E731
            else:
                fn = lambda v: v is want  # noqa: E731
            return _Test([x], fn, _paren("({} " + word + ")", x.q))
        self.refuse(e)
        raise AssertionError("unreachable")  # pragma: no cover

    def in_(self, e: exp.In) -> _Node:
        if e.args.get("query") is not None or e.args.get("unnest") is not None:
            raise WhereError("subqueries are not supported")
        if e.args.get("field") is not None:
            self.refuse(e)
        x = self.usable(self.compile(e.this))
        items = [self.usable(self.compile(i)) for i in e.expressions]
        if not items:
            raise WhereError("IN needs at least one value")
        # parse_expr.c transformAExprIn(): constants go into one array compared with = ANY
        # when there are several and they have a common type; the rest become = ... OR ...
        parts: list[_Node] = []
        rendered: dict[int, sql.Composable] = {}  # item index -> its coerced rendering
        xq = None
        rest = list(range(len(items)))
        nonvar = [k for k, i in enumerate(items) if not i.var]
        if len(nonvar) > 1:
            types = [x.t] + [items[k].t for k in nonvar]
            ct = _select_common_type(types)
            if ct is not None and all(_can_implicit(t, ct) for t in types):
                elems = [self.implicit(items[k], ct) for k in nonvar]
                eq = self.comparison("=", x if x.t != "unknown" else self.coerce_unknown(x, ct),
                                     _Const(ct, None, sql.SQL("")))
                assert isinstance(eq, _Op)
                lhs = eq.kids[0]
                xq = lhs.q
                rt = eq.kids[1].t
                elems = [self.implicit(el, rt) for el in elems]
                rendered.update({k: el.q for k, el in zip(nonvar, elems)})
                parts.append(_AnyArray(lhs, elems, eq.fn))
                rest = [k for k, i in enumerate(items) if i.var]
        for k in rest:
            cmp = self.comparison("=", x, items[k])
            assert isinstance(cmp, _Op)
            xq = xq if xq is not None else cmp.kids[0].q
            rendered[k] = cmp.kids[1].q
            parts.append(cmp)
        q = _paren("({} IN ({}))", xq, sql.SQL(", ").join(rendered[k] for k in range(len(items))))
        impl = parts[0] if len(parts) == 1 else _BoolOp(False, parts, q)
        return _Sugar(impl, q)

    def between(self, e: exp.Between) -> _Node:
        x = self.compile(e.this)
        lo = self.compile(e.args["low"])
        hi = self.compile(e.args["high"])
        sym = bool(e.args.get("symmetric"))
        word = "BETWEEN SYMMETRIC" if sym else "BETWEEN"
        # parse_expr.c transformAExprBetween(): x >= lo AND x <= hi (each resolved on its own)
        ge, le = self.comparison(">=", x, lo), self.comparison("<=", x, hi)
        assert isinstance(ge, _Op) and isinstance(le, _Op)
        # rendered from the operands as coerced (a timestamptz literal gets its offset)
        q = _paren("({} " + word + " {} AND {})", ge.kids[0].q, ge.kids[1].q, le.kids[1].q)
        first = _BoolOp(True, [ge, le], q)
        if not sym:
            return _Sugar(first, q)
        second = _BoolOp(True, [self.comparison(">=", x, hi), self.comparison("<=", x, lo)], q)
        return _Sugar(_BoolOp(False, [first, second], q), q)

    def like(self, e: exp.Expression, escape: exp.Expression | None) -> _Node:
        ilike = isinstance(e, exp.ILike)
        negate = bool(e.args.get("negate"))
        a = self.usable(self.compile(e.this))
        p = self.usable(self.compile(e.expression))
        word = ("NOT " if negate else "") + ("ILIKE" if ilike else "LIKE")
        if a.t == "unknown":
            a = self.coerce_unknown(a, "text")
        if a.t not in _STRS:
            raise WhereError(f"operator does not exist: {_tname(a.t)} {'~~*' if ilike else '~~'}"
                             f" {_tname(p.t)} ({self.describe(a)}; cast it to text)")
        if p.t not in _STRS and p.t != "unknown":
            raise WhereError(f"{word} pattern must be text, not {_tname(p.t)} ({self.describe(p)})")
        p2 = self.implicit(p, "text")
        if escape is not None:
            esc = self.usable(self.compile(escape))
            if esc.t not in _STRS and esc.t != "unknown":
                raise WhereError(f"ESCAPE must be text, not {_tname(esc.t)}")
            q = _paren("({} " + word + " {} ESCAPE {})", a.q, p.q, esc.q)
            p2 = _Op("text", [p2, self.implicit(esc, "text")], _like_escape, q)
        else:
            q = _paren("({} " + word + " {})", a.q, p.q)
        try:
            const = p2.fold()
        except WhereEvalError:  # e.g. a bad ESCAPE: fails (or not) when the tree is folded
            const = None
        if isinstance(const, _Const) and const.value is not None and _ends_in_escape(const.value):
            # Postgres fails on such a pattern only when matching reaches its end, and its
            # planner runs the match on sampled column values (patternsel()) when estimating:
            # whether a query fails then depends on the table's statistics.
            raise WhereError("LIKE pattern must not end with escape character")

        def fn(s: str, pat: str) -> bool:
            if ilike:
                s, pat = _lower(s), _lower(pat)
            r = _like_match(s, 0, pat, 0) == _LIKE_TRUE
            return not r if negate else r

        return _Op("bool", [a, p2], fn, q)

    def text_function(self, e: exp.Expression) -> _Node:
        """lower(), upper(), length()/char_length() of text (9.4 "String Functions")."""
        name = {exp.Lower: "lower", exp.Upper: "upper", exp.Length: "length"}[type(e)]
        if any(v is not None for k, v in e.args.items() if k != "this"):
            self.refuse(e)
        x = self.usable(self.compile(e.this))
        if x.t == "unknown":
            x = self.coerce_unknown(x, "text")
        if x.t not in _STRS:
            raise WhereError(f"function {name}({_tname(x.t)}) does not exist ({self.describe(x)};"
                             " cast it to text)")
        q = _paren("pg_catalog." + name + "({})", x.q)
        if name == "length":
            # length(character) does not count trailing spaces (bpcharlen)
            fn = (lambda v: len(_rtrim(v))) if x.t == "bpchar" else len
            return _Op("int4", [x], fn, q)
        return _Op("text", [self.implicit(x, "text")], _lower if name == "lower" else _upper, q)

    def coalesce(self, e: exp.Expression) -> _Node:
        """COALESCE(a, b, ...) (9.18.2): the first non-NULL argument, later ones not evaluated;
        the arguments' common type as for UNION/CASE (10.5)."""
        if any(v for k, v in e.args.items() if k not in ("this", "expressions")):
            self.refuse(e)
        args = [self.usable(self.compile(a)) for a in [e.this, *e.expressions]]
        types = [a.t for a in args]
        ct = _select_common_type(types)
        if ct is None or not all(_can_implicit(t, ct) for t in types):
            known = [t for t in types if t != "unknown"]
            raise WhereError("COALESCE types " + " and ".join(dict.fromkeys(_tname(t) for t in known))
                             + " cannot be matched")
        args = [self.implicit(a, ct) for a in args]
        q = sql.SQL("COALESCE(") + sql.SQL(", ").join(a.q for a in args) + sql.SQL(")")
        return _Coalesce(ct, args, q)

    def cast(self, e: exp.Cast) -> _Node:
        dst, typmod, tq = self.datatype(e.to)
        x = self.compile(e.this)
        q = _paren("CAST({} AS " + tq + ")", x.q)
        if x.t == "unknown":
            c = self.coerce_unknown(x, dst, typmod)
            q = _paren("CAST({} AS " + tq + ")", c.q)
            return _Sugar(c, q)
        self.usable(x)
        if x.t == "timestamptz" or dst == "timestamptz":
            if x.t != dst:
                raise WhereError(f"casts between {_tname(x.t)} and {_tname(dst)} depend on the"
                                 " session TimeZone and are not supported")
        if dst in ("date", "timestamp", "time") and x.t in _STRS:
            raise WhereError(f"casting {self.describe(x)} to {_tname(dst)} is not supported (it"
                             " depends on DateStyle); compare with a literal instead")
        fn = _cast_fn(x.t, dst, typmod)
        if fn is None:
            raise WhereError(f"cannot cast type {_tname(x.t)} to {_tname(dst)} ({self.describe(x)})")
        return _Op(dst, [x], fn, q)

    def datatype(self, dt: exp.DataType) -> tuple[str, tuple[int, int] | None, str]:
        T = exp.DataType.Type
        params: list[int] = []
        for prm in dt.expressions:
            v = prm.this if isinstance(prm, exp.DataTypeParam) else prm
            if not (isinstance(v, exp.Literal) and not v.is_string and v.this.isdigit()):
                raise WhereError(f"unsupported type {dt.sql(dialect='postgres')}")
            params.append(int(v.this))
        kind = dt.this
        simple = {T.SMALLINT: "int2", T.INT: "int4", T.BIGINT: "int8", T.FLOAT: "float4",
                  T.TEXT: "text", T.BOOLEAN: "bool", T.DATE: "date", T.TIMESTAMP: "timestamp",
                  T.TIMESTAMPTZ: "timestamptz", T.TIME: "time", T.UUID: "uuid",
                  T.VARCHAR: "varchar"}
        if kind == T.DECIMAL:
            if not params:
                return "numeric", None, "numeric"
            p = params[0]
            s = params[1] if len(params) > 1 else 0
            if len(params) > 2 or not 1 <= p <= 1000 or not 0 <= s <= p:
                raise WhereError(f"unsupported type {dt.sql(dialect='postgres')}: numeric(p, s)"
                                 " needs 1 <= p <= 1000 and 0 <= s <= p")
            return "numeric", (p, s), f"numeric({p},{s})"
        if kind == T.DOUBLE:
            if params:
                if len(params) > 1 or not 1 <= params[0] <= 53:
                    raise WhereError("precision for type float must be between 1 and 53 bits")
                t = "float4" if params[0] <= 24 else "float8"
                return t, None, _TYPE_SQL[t]
            return "float8", None, _TYPE_SQL["float8"]
        if kind in simple and not params:
            t = simple[kind]
            return t, None, _TYPE_SQL[t]
        raise WhereError(f"casts to {dt.sql(dialect='postgres')} are not supported")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _int_op(op: str, t: str) -> Callable[[int, int], int]:
    # int.c / int8.c: overflow checks on the result type; / truncates toward zero.
    if op == "+":
        return lambda a, b: _int_check(a + b, t)
    if op == "-":
        return lambda a, b: _int_check(a - b, t)
    if op == "*":
        return lambda a, b: _int_check(a * b, t)
    if op == "/":
        def div(a: int, b: int) -> int:
            if b == 0:
                raise _err("division by zero")
            q = abs(a) // abs(b)
            return _int_check(-q if (a < 0) != (b < 0) else q, t)
        return div

    def mod(a: int, b: int) -> int:
        if b == 0:
            raise _err("division by zero")
        r = abs(a) % abs(b)
        return -r if a < 0 else r
    return mod


# ---------------------------------------------------------------------------------------------
# Reading row values (pgderive's value model, cdc/values.py) into the internal representation.
# ---------------------------------------------------------------------------------------------

def _reader(t: str) -> Callable[[Any], Any]:
    if t in _INTS:
        return lambda v: v if type(v) is int else int(v)
    if t == "numeric":
        return lambda v: _num_norm(Decimal(v if isinstance(v, str) else str(v)))
    if t == "float8":
        return lambda v: v if type(v) is float else float(v)
    if t == "float4":
        return lambda v: _f32(float(v))
    if t == "bool":
        return lambda v: v if isinstance(v, bool) else v in ("t", "true")
    if t in ("date", "timestamp", "timestamptz"):
        return lambda v: _parse_dt(v, t, literal=False)
    if t == "time":
        return lambda v: _parse_time(v, literal=False)
    if t == "uuid":
        return _uuid_in
    return lambda v: v


class Where:
    """A view's ``where:`` expression over the columns of its table.

    ``Where(text, columns)``: ``text`` is a SQL boolean expression (Postgres syntax);
    ``columns`` maps each column name of the table to its Postgres type name as
    ``format_type()`` prints it (``"integer"``, ``"numeric(10,2)"``, ``"character(4)"``,
    ``"timestamp with time zone"``, an enum's name, ``"text[]"``, ...). Raises
    :class:`WhereError` at construction for anything unsupported, ill-typed or naming an
    unknown column (:class:`WhereEvalError`, a subclass, when a constant part fails).

    Supported: ``=`` ``<>`` ``!=`` ``<`` ``<=`` ``>`` ``>=``; ``AND``/``OR``/``NOT`` (9.1);
    ``[NOT] IN (...)`` (9.24.1/9.24.2); ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE``,
    ``IS [NOT] DISTINCT FROM`` (9.2); ``[NOT] BETWEEN [SYMMETRIC]`` (9.2); ``[NOT] LIKE``/
    ``ILIKE`` with ``%``, ``_``, backslash and ``ESCAPE`` (9.7.1); ``+ - * / %`` and unary
    minus (9.3); ``x::type`` and ``CAST(x AS type)`` to ``smallint``, ``integer``, ``bigint``,
    ``numeric[(p,s)]``, ``real``, ``double precision``, ``text``, ``varchar``, ``boolean``,
    ``date``, ``timestamp``, ``timestamptz``, ``time``, ``uuid`` (4.2.9; casts that need the
    session TimeZone or DateStyle are refused); ``lower``, ``upper``, ``length``/
    ``char_length`` of text (9.4) and ``COALESCE`` (9.18.2); string (also ``$$…$$``), number,
    boolean and NULL literals (4.1.2), typed literals (``DATE '2026-01-01'``), parentheses.
    Columns of the types smallint/integer/bigint, numeric, real, double precision, boolean,
    text, varchar, character(n), date, timestamp, timestamptz, time and uuid take part in all
    of these (text ordering excepted); enums (and unknown types) in ``=``/``<>``/``IN``
    against labels; other types (arrays, interval, bytea, json, ...) only in
    ``IS [NOT] NULL``; jsonb not at all.

    Attributes: ``text`` (the expression as given), ``columns`` (frozenset of the column names
    it reads).
    """

    def __init__(self, text: str, columns: dict[str, str]) -> None:
        if not isinstance(text, str) or not text.strip():
            raise WhereError("the where expression is empty")
        self.text = text
        try:
            trees = sqlglot.parse(text, dialect="postgres")
        except sqlglot.errors.SqlglotError as e:
            raise WhereError(f"cannot parse where expression: {_first_line(e)}") from None
        trees = [t for t in trees if t is not None]
        if len(trees) != 1:
            raise WhereError("the where expression must be a single expression (no ';')")
        comp = _Compiler(columns)
        root = comp.compile(trees[0])
        root = comp.boolean(root, "WHERE")
        self._root = root
        self.columns: frozenset[str] = frozenset(comp.used)
        self._readers = {c: _reader(comp.tag(c)) for c in self.columns}
        self._tree = root.fold()  # the planner's constant folding; may raise WhereEvalError

    def sql(self) -> sql.Composable:
        """The expression as SQL for a ``WHERE`` clause: ``((<expression>) IS TRUE)``, rebuilt
        from the parsed tree with ``sql.Identifier``/``sql.Literal`` (no user text pasted).

        The ``IS TRUE`` keeps the expression one qual: the planner may reorder the terms of a
        top-level ``AND`` by cost (and so skip or reach an erroring term differently), but not
        inside an expression. In a ``WHERE`` clause it does not change which rows match.

        The SQL may contain ``%`` (LIKE patterns, the modulo operator): execute the statement
        it is composed into without query parameters (psycopg reads ``%`` as a placeholder
        marker when parameters are passed), as ``COPY (SELECT …) TO STDOUT`` does; pass values
        as ``sql.Literal`` instead."""
        return sql.SQL("({} IS TRUE)").format(self._root.q)

    def evaluate(self, row: dict[str, Any]) -> bool | None:
        """The three-valued result for ``row`` (column → value in pgderive's value model):
        True, False or None (SQL NULL). Raises :class:`WhereEvalError` where Postgres raises
        for the same row (division by zero, overflow, a bad cast), or when ``row`` lacks a
        column the expression reads."""
        vals = {}
        for c, read in self._readers.items():
            try:
                v = row[c]
            except KeyError:
                raise WhereEvalError(f"row has no column '{c}'") from None
            if v is None:
                vals[c] = None
            else:
                try:
                    vals[c] = read(v)
                except WhereEvalError:
                    raise
                except (ValueError, TypeError, ArithmeticError) as e:
                    raise WhereEvalError(f"cannot read column '{c}' value {v!r}: {e}") from None
        return self._tree.ev(vals)

    def matches(self, row: dict[str, Any]) -> bool:
        """True only when the expression is TRUE for ``row`` (NULL and FALSE do not match, as
        in a ``WHERE`` clause). Raises like :meth:`evaluate`."""
        return self.evaluate(row) is True

    def __repr__(self) -> str:
        return f"Where({self.text!r})"


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
