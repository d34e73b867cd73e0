"""Sink keys back to the column values that render them: the inverse of a key template.

A view names each record by its key template (:mod:`views.template`): ``"order:{id}"`` renders
``"order:42"``; an OpenSearch view without ``key`` uses the primary key columns joined by ``:``
as the document ``_id`` (:func:`views.derive.resolve_key`). ``pgderive explain VIEW KEY``
(ARCHITECTURE.md, "Explain") goes the other way: from a key to the values of the key columns,
so it can find the source rows the record was derived from.

A template's literal text is matched exactly; each placeholder takes the text between them.
Several splits can fit when a value may contain the literal that follows its placeholder
(``"{a}:{b}"`` and ``"x:y:z"``): every fitting split is returned, and the caller looks them up
in the source. The column's type narrows what a placeholder takes, as the template renders it
(:func:`views.template.KeyTemplate.render`): integers in decimal without leading zeros,
booleans as ``true``/``false``; other types take any text (their rendering is the value's text,
which the source compares as the column's own type).
"""
from __future__ import annotations

import re
from typing import Mapping

from .template import KeyTemplate

__all__ = ["KeyMismatch", "parse_key", "MAX_CANDIDATES"]

#: At most this many splits are returned (a template with several placeholders and a key full
#: of separators could otherwise fit in very many ways).
MAX_CANDIDATES = 64

_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_BOOL = re.compile(r"true|false")
_INT_TYPES = frozenset({"smallint", "integer", "bigint", "oid"})


class KeyMismatch(ValueError):
    """A key that no value of the template's columns renders; the message says why, e.g.
    ``key 'ord:1' does not fit the key template 'order:{id}'``."""


def _pattern(type_name: str | None) -> re.Pattern[str] | None:
    """What a value of ``type_name`` (``format_type`` spelling) renders as, or None: any text."""
    if type_name is None:
        return None
    base = type_name.split("(", 1)[0].strip()
    if base in _INT_TYPES:
        return _INT
    if base == "boolean":
        return _BOOL
    return None


def parse_key(template: KeyTemplate, key: str,
              types: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Every assignment ``column → text`` of ``template``'s columns that renders ``key``.

    Args:
        template: the view's key template.
        key: a sink key (Redis key, OpenSearch ``_id``).
        types: column → ``format_type`` type name; a column's type restricts its text (see the
            module docstring). Columns absent here take any text.

    Returns the fitting assignments (at most :data:`MAX_CANDIDATES`), in order of the shortest
    first placeholder. Each value is the text the template printed, which is also Postgres
    input text for the column's type. A column that appears twice must take the same text.

    Raises:
        KeyMismatch: no assignment renders ``key``.
    """
    pieces = template.pieces()
    types = types or {}
    found: list[dict[str, str]] = []

    def fits(column: str, text: str, bound: dict[str, str]) -> bool:
        if column in bound:
            return bound[column] == text
        pat = _pattern(types.get(column))
        return pat is None or pat.fullmatch(text) is not None

    def walk(i: int, pos: int, bound: dict[str, str]) -> None:
        if len(found) >= MAX_CANDIDATES:
            return
        if i == len(pieces):
            if pos == len(key):
                found.append(dict(bound))
            return
        piece = pieces[i]
        if isinstance(piece, str):
            if key.startswith(piece, pos):
                walk(i + 1, pos + len(piece), bound)
            return
        column = piece[1]
        nxt = pieces[i + 1] if i + 1 < len(pieces) else None
        if nxt is None:  # the last placeholder takes the rest
            ends = [len(key)]
        elif isinstance(nxt, str):  # up to an occurrence of the next literal
            ends = []
            at = key.find(nxt, pos)
            while at >= 0:
                ends.append(at)
                at = key.find(nxt, at + 1)
        else:  # two placeholders side by side: any split
            ends = list(range(pos, len(key) + 1))
        for end in ends:
            text = key[pos:end]
            if not fits(column, text, bound):
                continue
            was = column in bound
            bound[column] = text
            walk(i + 1, end, bound)
            if not was:
                del bound[column]

    walk(0, 0, {})
    if not found:
        shown = key if len(key) <= 200 else key[:199] + "…"
        cols = ", ".join(f"{c} ({types[c]})" if c in types else c for c in template.columns)
        raise KeyMismatch(f"key {shown!r} does not fit the key template {template.text!r} "
                          f"(columns {cols})")
    return found
