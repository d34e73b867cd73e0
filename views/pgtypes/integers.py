"""``smallint``, ``integer``, ``bigint``: ranges, input and checked arithmetic
(``src/backend/utils/adt/int.c``, ``int8.c``, ``numutils.c``; manual 8.1.1 "Integer Types",
9.3 "Mathematical Functions and Operators")."""
from __future__ import annotations

import re
from typing import Callable

from .errors import err
from .tags import TNAME


INT_RANGE = {"int2": (-(1 << 15), (1 << 15) - 1), "int4": (-(1 << 31), (1 << 31) - 1),
             "int8": (-(1 << 63), (1 << 63) - 1)}


def int_check(v: int, t: str) -> int:
    lo, hi = INT_RANGE[t]
    if v < lo or v > hi:
        raise err(f"{TNAME[t]} out of range")
    return v


_INT_IN_RE = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+)[ \t\n\r\f\v]*")


def int_in(s: str, t: str) -> int:
    """pg_strtoint16/32/64 (int2in, int4in, int8in) of Postgres 15."""
    m = _INT_IN_RE.fullmatch(s)
    if not m:
        raise err(f'invalid input syntax for type {TNAME[t]}: "{s}"')
    v = int(m.group(1))
    lo, hi = INT_RANGE[t]
    if v < lo or v > hi:
        raise err(f'value "{s}" is out of range for type {TNAME[t]}')
    return v


def int_op(op: str, t: str) -> Callable[[int, int], int]:
    # int.c / int8.c: overflow checks on the result type; / truncates toward zero.
    if op == "+":
        return lambda a, b: int_check(a + b, t)
    if op == "-":
        return lambda a, b: int_check(a - b, t)
    if op == "*":
        return lambda a, b: int_check(a * b, t)
    if op == "/":
        def div(a: int, b: int) -> int:
            if b == 0:
                raise err("division by zero")
            q = abs(a) // abs(b)
            return int_check(-q if (a < 0) != (b < 0) else q, t)
        return div

    def mod(a: int, b: int) -> int:
        if b == 0:
            raise err("division by zero")
        r = abs(a) % abs(b)
        return -r if a < 0 else r
    return mod
