"""``date``, ``timestamp``, ``timestamptz`` and ``time`` in Postgres' own representation: dates
as days and timestamps as microseconds since 2000-01-01 (UTC for ``timestamptz``), ``time`` as
microseconds, ``±infinity`` as Postgres' sentinels (INT32/INT64 min and max). Read from ISO
text (``DateStyle`` ISO), written as Postgres' ISO output (``src/backend/utils/adt/datetime.c``,
``date.c``, ``timestamp.c``; manual 8.5 "Date/Time Types")."""
from __future__ import annotations

import re

from .errors import WhereError, err
from .tags import TNAME
from .text import SPACES


_USECS_PER_DAY = 86_400_000_000
_EPOCH_JDATE = 2451545  # date2j(2000, 1, 1)
_DATE_NOBEGIN, _DATE_NOEND = -(1 << 31), (1 << 31) - 1
DT_NOBEGIN, DT_NOEND = -(1 << 63), (1 << 63) - 1
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


def parse_dt(s: str, want: str, *, literal: bool) -> int:
    """A date/timestamp/timestamptz from ISO text (the model's text, or a literal in the
    subset of Postgres' input syntax that means the same under every ``DateStyle``).
    Raises WhereEvalError if it does not read as one."""
    body = s.strip(SPACES)
    low = body.lower()
    what = TNAME[want]
    if low in ("infinity", "+infinity", "-infinity"):
        if want == "date":
            return _DATE_NOBEGIN if low[0] == "-" else _DATE_NOEND
        return DT_NOBEGIN if low[0] == "-" else DT_NOEND
    if low == "epoch":
        return (_date2j(1970, 1, 1) - _EPOCH_JDATE) * (1 if want == "date" else _USECS_PER_DAY)
    m = _DT_RE.fullmatch(body)
    if not m:
        if literal:
            raise WhereError(f"unsupported {what} literal '{s}': write it as ISO 'YYYY-MM-DD"
                             + ("'" if want == "date" else " HH:MM:SS[.ffffff]"
                                + ("[+HH[:MM]]'" if want == "timestamptz" else "'"))
                             + ", 'infinity' or '-infinity'")
        raise err(f"cannot read {what} value '{s}' (needs DateStyle ISO)")
    y, mo, d = int(m.group("y")), int(m.group("mo")), int(m.group("d"))
    era = (m.group("era") or "").lower()
    if y == 0 or not 1 <= mo <= 12:
        raise err(f'date/time field value out of range: "{s}"')
    if era == "bc":
        y = 1 - y
    if not 1 <= d <= _days_in_month(y, mo):
        raise err(f'date/time field value out of range: "{s}"')
    if (y, mo, d) < (-4713, 11, 24):
        raise err(f'date out of range: "{s}"')
    days = _date2j(y, mo, d) - _EPOCH_JDATE
    h = int(m.group("h") or 0)
    mi = int(m.group("mi") or 0)
    sec = int(m.group("s") or 0)
    if h > 23 or mi > 59 or sec > 59:
        if literal:
            raise WhereError(f"unsupported {what} literal '{s}': hours 0-23, minutes and seconds 0-59")
        raise err(f'date/time field value out of range: "{s}"')
    if want == "date":  # date_in() reads a time (and zone) too, and ignores them
        if not days < _DATE_END_JULIAN - _EPOCH_JDATE:
            raise err(f'date out of range: "{s}"')
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
                raise err(f'time zone displacement out of range: "{s}"')
            off = (hh * 3600 + mm * 60 + ss) * (-1 if tz[0] == "-" else 1)
        us -= off * 1_000_000
    if not _MIN_TIMESTAMP <= us < _END_TIMESTAMP:
        raise err(f'timestamp out of range: "{s}"')
    return us


def parse_time(s: str, *, literal: bool) -> int:
    m = _TIME_RE.fullmatch(s.strip(SPACES))
    if m:
        h, mi, sec = int(m.group("h")), int(m.group("mi")), int(m.group("s") or 0)
        us = ((h * 60 + mi) * 60 + sec) * 1_000_000 + _fsec(m.group("f"))
        if (h < 24 and mi < 60 and sec < 60) or us == _USECS_PER_DAY:
            if us <= _USECS_PER_DAY:  # time_in() accepts up to 24:00:00
                return us
    if literal:
        raise WhereError(f"unsupported time literal '{s}': write it as 'HH:MM[:SS[.ffffff]]'")
    raise err(f"cannot read time value '{s}'")


def date_text(days: int) -> str:
    if days == _DATE_NOBEGIN:
        return "-infinity"
    if days == _DATE_NOEND:
        return "infinity"
    y, m, d = _j2date(days + _EPOCH_JDATE)
    if y <= 0:
        return f"{1 - y:04d}-{m:02d}-{d:02d} BC"
    return f"{y:04d}-{m:02d}-{d:02d}"


def time_part(us: int) -> str:
    s, f = divmod(us, 1_000_000)
    mi, s = divmod(s, 60)
    h, mi = divmod(mi, 60)
    out = f"{h:02d}:{mi:02d}:{s:02d}"
    if f:
        out += ("." + f"{f:06d}").rstrip("0")
    return out


def ts_text(us: int) -> str:
    if us == DT_NOBEGIN:
        return "-infinity"
    if us == DT_NOEND:
        return "infinity"
    days, rem = divmod(us, _USECS_PER_DAY)
    y, m, d = _j2date(days + _EPOCH_JDATE)
    out = f"{(1 - y) if y <= 0 else y:04d}-{m:02d}-{d:02d} {time_part(rem)}"
    return out + " BC" if y <= 0 else out


def ts_to_date(us: int) -> int:
    if us == DT_NOBEGIN:
        return _DATE_NOBEGIN
    if us == DT_NOEND:
        return _DATE_NOEND
    return us // _USECS_PER_DAY


def date_to_ts(days: int) -> int:
    # date.c date2timestamp(): infinities map, a date past the timestamp range is an error.
    if days == _DATE_NOBEGIN:
        return DT_NOBEGIN
    if days == _DATE_NOEND:
        return DT_NOEND
    if days >= _TIMESTAMP_END_JULIAN - _EPOCH_JDATE:
        raise err("date out of range for timestamp")
    return days * _USECS_PER_DAY


def date_ts_key(days: int) -> int:
    # date_cmp_timestamp_internal(): a date past the timestamp range sorts after every finite
    # timestamp and before infinity.
    if days == _DATE_NOBEGIN:
        return DT_NOBEGIN
    if days == _DATE_NOEND:
        return DT_NOEND
    if days >= _TIMESTAMP_END_JULIAN - _EPOCH_JDATE:
        return DT_NOEND - 1
    return days * _USECS_PER_DAY
