"""Log sequence numbers (LSN): 64-bit byte positions in the WAL.

Postgres prints an LSN as two hexadecimal 32-bit halves, ``"16/B374D848"`` (see the
``pg_lsn`` type in the Postgres docs). Internally pgderive keeps LSNs as ``int``.
"""
from __future__ import annotations

__all__ = ["parse_lsn", "format_lsn", "version_hex"]


def parse_lsn(text: str) -> int:
    """Parse ``"X/Y"`` (hex halves) into an int byte position.

    Raises ``ValueError`` on anything that is not two hex numbers separated by ``/``.
    """
    hi, sep, lo = text.partition("/")
    if not sep or not hi or not lo:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    """Format an int byte position as Postgres does: ``"16/B374D848"``."""
    if lsn < 0:
        raise ValueError(f"negative LSN: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def version_hex(lsn: int) -> str:
    """A fixed-width 16-digit hex form of an LSN; lexical order equals numeric order.

    Used where versions are compared as strings (Redis Lua numbers are doubles and would
    round LSNs above 2**53).
    """
    return f"{lsn:016x}"
