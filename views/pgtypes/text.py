"""Text: ``LIKE`` matching and ``ESCAPE`` (``src/backend/utils/adt/like_match.c``, ``like.c``;
manual 9.7.1 "LIKE"), ``lower``/``upper`` as a UTF-8 libc locale folds case
(``oracle_compat.c``, ``formatting.c`` str_tolower/str_toupper; manual 9.4 "String Functions
and Operators"), ``character(n)`` comparison ignoring trailing spaces (``varchar.c``
bpcharcmp; manual 8.3 "Character Types")."""
from __future__ import annotations

from .errors import err


SPACES = " \t\n\r\f\v"  # C isspace()

LIKE_TRUE, _LIKE_FALSE, _LIKE_ABORT = 1, 0, -1


def like_match(t: str, ti: int, p: str, pi: int) -> int:
    """like_match.c MatchText() over code points (equivalent to its byte-wise UTF-8 walk)."""
    tlen, plen = len(t), len(p)
    if plen - pi == 1 and p[pi] == "%":
        return LIKE_TRUE
    while ti < tlen and pi < plen:
        c = p[pi]
        if c == "\\":
            pi += 1
            if pi >= plen:
                raise err("LIKE pattern must not end with escape character")
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
                return LIKE_TRUE
            if p[pi] == "\\":
                if plen - pi < 2:
                    raise err("LIKE pattern must not end with escape character")
                first = p[pi + 1]
            else:
                first = p[pi]
            while ti < tlen:
                if t[ti] == first:
                    r = like_match(t, ti, p, pi)
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
    return LIKE_TRUE if pi >= plen else _LIKE_ABORT


def ends_in_escape(pat: str) -> bool:
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


def like_escape(pat: str, esc: str) -> str:
    """like_match.c do_like_escape(): rewrite ``pat`` to use backslash as its escape."""
    if esc == "":
        return pat.replace("\\", "\\\\")
    if len(esc) != 1:
        raise err("invalid escape string (must be empty or one character)")
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


def lower(s: str) -> str:
    """Postgres' lower() in a UTF-8 libc locale: towlower() per character, i.e. Unicode's
    simple case mapping (checked against the server for every code point)."""
    return "".join(map(_lower_char, s))


def upper(s: str) -> str:
    """Postgres' upper() in a UTF-8 libc locale: towupper() per character."""
    return "".join(map(_upper_char, s))


def rtrim(s: str) -> str:
    return s.rstrip(" ")


def bpchar_cmp(a: str, b: str) -> int:
    """varchar.c bpcharcmp(): compare ignoring trailing spaces."""
    x, y = rtrim(a), rtrim(b)
    return (x > y) - (x < y)
