"""``boolean`` and ``uuid`` input and text (``src/backend/utils/adt/bool.c``, ``uuid.c``;
manual 8.6 "Boolean Type", 8.12 "UUID Type"). A uuid is held as an int."""
from __future__ import annotations

from .errors import err
from .text import SPACES


def bool_in(s: str) -> bool:
    """bool.c parse_bool_with_len() after trimming whitespace (boolin)."""
    v = s.strip(SPACES)
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
    raise err(f'invalid input syntax for type boolean: "{s}"')


def uuid_in(s: str) -> int:
    """uuid.c string_to_uuid()."""
    i = 0
    braces = s.startswith("{")
    if braces:
        i = 1
    out = 0
    for k in range(16):
        pair = s[i:i + 2]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise err(f'invalid input syntax for type uuid: "{s}"')
        out = (out << 8) | int(pair, 16)
        i += 2
        if s[i:i + 1] == "-" and k % 2 == 1 and k < 15:
            i += 1
    if braces:
        if s[i:i + 1] != "}":
            raise err(f'invalid input syntax for type uuid: "{s}"')
        i += 1
    if i != len(s):
        raise err(f'invalid input syntax for type uuid: "{s}"')
    return out


def uuid_text(v: int) -> str:
    h = f"{v:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
