"""``numeric``: normalisation, comparison, arithmetic with Postgres' result scales, typmod,
input and text (``src/backend/utils/adt/numeric.c``; manual 8.1.2 "Arbitrary Precision
Numbers", 9.3 "Mathematical Functions and Operators").

Values are :class:`~decimal.Decimal`: finite ones with exponent <= 0 and no negative zero (like
Postgres' NumericVar with its display scale), or NaN/±Infinity."""
from __future__ import annotations

import decimal
import re
from decimal import Decimal
from fractions import Fraction
from typing import cast

from .errors import err
from .integers import int_check
from .tags import TNAME


CTX = decimal.Context(prec=400000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                      rounding=decimal.ROUND_HALF_UP,
                      traps=[decimal.InvalidOperation, decimal.DivisionByZero])
D_NAN = Decimal("NaN")
D_PINF = Decimal("Infinity")
D_NINF = Decimal("-Infinity")
_D_ONE = Decimal(1)


def _dscale(d: Decimal) -> int:
    e = d.as_tuple().exponent
    return -e if isinstance(e, int) and e < 0 else 0


def num_norm(d: Decimal) -> Decimal:
    """Postgres' numeric: no positive exponent, no negative zero, within the format's limits."""
    if not d.is_finite():
        return d
    e = cast(int, d.as_tuple().exponent)  # an int: d is finite
    if e > 0:
        d = d.quantize(_D_ONE, context=CTX)
    if d.is_zero():
        if d.is_signed():
            d = d.copy_abs()
        return d
    if d.adjusted() >= 131072 or -cast(int, d.as_tuple().exponent) > 16383:
        raise err("value overflows numeric format")
    return d


def num_cmp(a: Decimal, b: Decimal) -> int:
    if a.is_nan():
        return 0 if b.is_nan() else 1
    if b.is_nan():
        return -1
    return (a > b) - (a < b)


def _num_sign(d: Decimal) -> int:
    return 0 if d.is_zero() else (-1 if d.is_signed() else 1)


def num_add(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return D_NAN
    if a.is_infinite():
        return D_NAN if (b.is_infinite() and b != a) else a
    if b.is_infinite():
        return b
    return num_norm(CTX.add(a, b))


def num_neg(a: Decimal) -> Decimal:
    if a.is_nan():
        return a
    if a.is_zero():
        return a
    return CTX.minus(a)


def num_sub(a: Decimal, b: Decimal) -> Decimal:
    return num_add(a, num_neg(b))


def num_mul(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return D_NAN
    if a.is_infinite() or b.is_infinite():
        s = _num_sign(a) * _num_sign(b)
        return D_NAN if s == 0 else (D_PINF if s > 0 else D_NINF)
    r = CTX.multiply(a, b)
    if _dscale(r) > 16383:
        r = r.quantize(Decimal(1).scaleb(-16383), context=CTX)
    return num_norm(r)


def _weight_first(d: Decimal) -> tuple[int, int]:
    """Weight and first digit of ``d`` in Postgres' base-10000 representation."""
    if d.is_zero():
        return 0, 0
    v = abs(d)
    w = v.adjusted() // 4
    first = int(v.scaleb(-4 * w, context=CTX).to_integral_value(rounding=decimal.ROUND_FLOOR,
                                                                context=CTX))
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
    return Decimal(m).scaleb(-scale, context=CTX)


def num_div(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return D_NAN
    if a.is_infinite():
        if b.is_infinite():
            return D_NAN
        s = _num_sign(b)
        if s == 0:
            raise err("division by zero")
        return a if s > 0 else num_neg(a)
    if b.is_infinite():
        return Decimal(0)
    if b.is_zero():
        raise err("division by zero")
    rscale = _div_rscale(a, b)
    return num_norm(_round_half_away(Fraction(a) / Fraction(b), rscale))


def num_mod(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan():
        return D_NAN
    if a.is_infinite():
        if _num_sign(b) == 0:
            raise err("division by zero")
        return D_NAN
    if b.is_infinite():
        return a
    if b.is_zero():
        raise err("division by zero")
    q = Fraction(a) / Fraction(b)
    t = abs(q.numerator) // q.denominator
    if q < 0:
        t = -t
    r = CTX.subtract(a, CTX.multiply(b, Decimal(t)))
    scale = max(_dscale(a), _dscale(b))
    return num_norm(r.quantize(Decimal(1).scaleb(-scale), context=CTX))


def num_typmod(d: Decimal, p: int, s: int) -> Decimal:
    """numeric.c apply_typmod()/apply_typmod_special()."""
    if d.is_nan():
        return d
    if d.is_infinite():
        raise err("numeric field overflow")
    r = d.quantize(Decimal(1).scaleb(-s), rounding=decimal.ROUND_HALF_UP, context=CTX)
    if not r.is_zero():
        int_digits = max(r.adjusted() + 1, 0)
        if int_digits > p - s:
            raise err("numeric field overflow")
    return num_norm(r)


def num_text(d: Decimal) -> str:
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "-Infinity" if d.is_signed() else "Infinity"
    return format(d, "f")


def num_to_int(d: Decimal, t: str) -> int:
    if d.is_nan():
        raise err(f"cannot convert NaN to {TNAME[t]}")
    if d.is_infinite():
        raise err(f"cannot convert infinity to {TNAME[t]}")
    return int_check(int(d.to_integral_value(rounding=decimal.ROUND_HALF_UP, context=CTX)), t)


_NUM_IN_RE = re.compile(
    r"[ \t\n\r\f\v]*(?:(?P<nan>[nN][aA][nN])|(?P<isign>[+-]?)(?P<inf>[iI][nN][fF](?:[iI][nN][iI][tT][yY])?)"
    r"|(?P<sign>[+-]?)(?P<digits>[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][ \t\n\r\f\v]*(?P<exp>[+-]?[0-9]+))?)"
    r"[ \t\n\r\f\v]*")


def numeric_in(s: str) -> Decimal:
    """numeric.c numeric_in() (no typmod)."""
    m = _NUM_IN_RE.fullmatch(s)
    if not m:
        raise err(f'invalid input syntax for type numeric: "{s}"')
    if m.group("nan"):
        return D_NAN
    if m.group("inf"):
        return D_NINF if m.group("isign") == "-" else D_PINF
    e = m.group("exp")
    if e is not None and abs(int(e)) >= (2 ** 31 - 1) // 2:
        raise err("value overflows numeric format")
    text = m.group("sign") + m.group("digits") + (("e" + e) if e is not None else "")
    return num_norm(Decimal(text))
