"""``real`` and ``double precision``: input, comparison, arithmetic with Postgres' overflow and
underflow checks, conversions and the shortest exact text (``src/backend/utils/adt/float.c``,
``src/include/utils/float.h``, ``src/common/d2s.c``/``f2s.c``; manual 8.1.3 "Floating-Point
Types").

Values are Python floats; ``real`` values are exactly representable in binary32."""
from __future__ import annotations

import math
import re
import struct
from decimal import Decimal
from fractions import Fraction
from typing import cast

from .errors import err
from .integers import int_check
from .numeric import CTX, D_NAN, D_NINF, D_PINF, num_norm, num_text
from .tags import TNAME
from .text import SPACES


_FLOAT_SPECIAL_RE = re.compile(
    r"(?P<sign>[+-]?)(?:(?P<nan>nan(?:\([0-9a-z_]*\))?)|(?P<inf>inf(?:inity)?))", re.I)
_FLOAT_DEC_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLOAT_HEX_RE = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?")


def float_in(s: str, t: str) -> float:
    """float8in()/float4in(): strtod()/strtof() as glibc reads them, plus Postgres' range
    checks (an overflow to infinity or an underflow to zero is an error)."""
    body = s.strip(SPACES)
    if body == "":
        raise err(f'invalid input syntax for type {TNAME[t]}: "{s}"')
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
        raise err(f'invalid input syntax for type {TNAME[t]}: "{s}"')
    if t == "float4":
        v = _f32_from_fraction(exact)
    else:
        v = float(Decimal(body)) if _FLOAT_DEC_RE.fullmatch(body) else float(exact)
    if math.isinf(v) or (v == 0.0 and exact != 0):
        raise err(f'"{body}" is out of range for type {TNAME[t]}')
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


def f32(x: float) -> float:
    """C's ``(float) x``: the nearest binary32 (ties to even), ±inf on overflow."""
    try:
        r: float = struct.unpack("f", struct.pack("f", x))[0]
        return r
    except OverflowError:
        return math.copysign(math.inf, x)


def fcmp(a: float, b: float) -> int:
    """float.h float8_cmp semantics: NaNs equal each other and sort above everything."""
    if a != a:
        return 0 if b != b else 1
    if b != b:
        return -1
    return (a > b) - (a < b)


def _float_check(r: float, a: float, b: float, op: str) -> float:
    if op in "+-":
        if math.isinf(r) and not math.isinf(a) and not math.isinf(b):
            raise err("value out of range: overflow")
    elif op == "*":
        if math.isinf(r) and not math.isinf(a) and not math.isinf(b):
            raise err("value out of range: overflow")
        if r == 0.0 and a != 0.0 and b != 0.0:
            raise err("value out of range: underflow")
    return r


def float_arith(op: str, a: float, b: float, single: bool) -> float:
    # float.h float4_pl ... float8_div; a binary32 result is computed in double and rounded
    # (exact for + - * /: double has more than 2*24+2 bits).
    if op == "/":
        if b == 0.0 and a == a:
            raise err("division by zero")
        r = a / b if b != 0.0 else math.nan
        if single:
            r = f32(r)
        if math.isinf(r) and not math.isinf(a):
            raise err("value out of range: overflow")
        if r == 0.0 and a != 0.0 and not math.isinf(b):
            raise err("value out of range: underflow")
        return r
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    else:
        r = a * b
    if single:
        r = f32(r)
    return _float_check(r, a, b, op)


def float_to_int(v: float, t: str) -> int:
    # float.c dtoi2/dtoi4/dtoi8 (ftoi*): rint() then a range check; NaN is out of range.
    if v != v or math.isinf(v):
        raise err(f"{TNAME[t]} out of range")
    return int_check(round(v), t)


def float_to_numeric(v: float, digits: int) -> Decimal:
    # float8_numeric/float4_numeric: "%.*g" with DBL_DIG (15) / FLT_DIG (6), then numeric_in.
    if v != v:
        return D_NAN
    if math.isinf(v):
        return D_NINF if v < 0 else D_PINF
    return num_norm(Decimal(format(v, f".{digits}g")))


def numeric_to_float(d: Decimal, t: str) -> float:
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
        raise err(f'"{num_text(d)}" is out of range for type {TNAME[t]}')
    return v


def int_to_f32(v: int) -> float:
    return _f32_from_fraction(Fraction(v))


def f8_to_f4(v: float) -> float:
    # float.c dtof(): overflow and underflow are errors.
    r = f32(v)
    if math.isinf(r) and not math.isinf(v):
        raise err("value out of range: overflow")
    if r == 0.0 and v != 0.0:
        raise err("value out of range: underflow")
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
    t = d.normalize(CTX).as_tuple()
    digits = "".join(map(str, t.digits))
    return digits, cast(int, t.exponent) + len(digits) - 1  # an int: d is finite


def float_text(v: float, t: str) -> str:
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
