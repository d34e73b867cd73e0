"""Key templates: ``"account:{aid}"`` → ``"account:42"``.

A template is literal text with ``{column}`` placeholders; ``{{`` and ``}}`` stand for literal
braces. It is parsed once and rendered once per row, so rendering is a single ``str.join``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["KeyTemplate", "TemplateError"]


class TemplateError(ValueError):
    """A row cannot be rendered: a key column is missing or NULL.

    Attributes:
        column: the offending column name.
        message: human-readable message, e.g. ``"key column 'aid' is NULL"`` (also ``str(err)``).
    """

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


def _format_value(value: Any) -> str:
    """str as is, bool as ``true``/``false``, int in decimal, anything else ``str()``."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)  # decimal, even for int subclasses such as IntEnum
    return str(value)


class KeyTemplate:
    """A parsed key template.

    Attributes:
        text: the template as written, e.g. ``"t:{a}:{b}"``.
        columns: the placeholder columns in order of first appearance, e.g. ``("a", "b")``.

    Raises:
        ValueError: on a malformed template (unbalanced or empty braces, no placeholder at all).
    """

    __slots__ = ("text", "columns", "_parts", "_slots", "_single")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise ValueError(f"key template must be a string, got {type(text).__name__}")
        self.text = text
        parts: list[str] = []  # literal text and column names, alternating kinds per _slots
        slots: list[tuple[int, str]] = []  # (index in parts, column) for each placeholder
        literal: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "{":
                if text.startswith("{{", i):
                    literal.append("{")
                    i += 2
                    continue
                end = text.find("}", i + 1)
                brace = text.find("{", i + 1)
                if end < 0 or (0 <= brace < end):
                    raise ValueError(f"key template {text!r}: unclosed '{{' at position {i}"
                                     " (write '{{' for a literal brace)")
                column = text[i + 1:end]
                if not column.strip():
                    raise ValueError(f"key template {text!r}: empty placeholder '{{}}'"
                                     f" at position {i}")
                if literal:
                    parts.append("".join(literal))
                    literal = []
                slots.append((len(parts), column))
                parts.append("")
                i = end + 1
            elif ch == "}":
                if text.startswith("}}", i):
                    literal.append("}")
                    i += 2
                    continue
                raise ValueError(f"key template {text!r}: unmatched '}}' at position {i}"
                                 " (write '}}' for a literal brace)")
            else:
                literal.append(ch)
                i += 1
        if literal:
            parts.append("".join(literal))
        if not slots:
            raise ValueError(f"key template {text!r} has no {{column}} placeholder:"
                             " every row would get the same key")
        self._parts = parts
        self._slots = tuple(slots)
        self._single: tuple[str, str, str] | None = None
        if len(slots) == 1:
            index, column = slots[0]
            self._single = ("".join(parts[:index]), column, "".join(parts[index + 1:]))
        self.columns: tuple[str, ...] = tuple(dict.fromkeys(c for _, c in slots))

    @classmethod
    def from_columns(cls, columns: Iterable[str], sep: str = ":") -> KeyTemplate:
        """The template ``"{c1}<sep>{c2}..."`` (e.g. the default key from primary key columns).

        Raises:
            ValueError: if ``columns`` is empty or a column name contains a brace.
        """
        columns = list(columns)
        for column in columns:
            if "{" in column or "}" in column:
                raise ValueError(f"column name {column!r} contains a brace and cannot be"
                                 " a key column")
        sep = sep.replace("{", "{{").replace("}", "}}")
        return cls(sep.join("{" + c + "}" for c in columns))

    def render(self, row: Mapping[str, Any]) -> str:
        """Render the key of ``row`` (column name → value).

        Raises:
            TemplateError: a placeholder column is absent from ``row`` or is ``None`` (NULL).
        """
        if self._single is not None:  # "prefix{column}suffix": the common shape
            prefix, column, suffix = self._single
            value = row.get(column)
            if value is not None:
                return prefix + (value if type(value) is str else _format_value(value)) + suffix
        parts = self._parts.copy()  # a private copy keeps render() thread-safe
        for index, column in self._slots:
            value = row.get(column)
            if value is None:
                if column in row:
                    raise TemplateError(column, f"key column {column!r} is NULL")
                raise TemplateError(column, f"key column {column!r} is missing from the row")
            parts[index] = value if type(value) is str else _format_value(value)
        return "".join(parts)

    def pieces(self) -> list[str | tuple[str, str]]:
        """The template in order: literal text as ``str``, each placeholder as
        ``("column", name)`` (e.g. ``"t:{a}"`` → ``["t:", ("column", "a")]``)."""
        slots = dict(self._slots)
        return [("column", slots[i]) if i in slots else part for i, part in enumerate(self._parts)]

    def shape(self) -> str:
        """The template with every placeholder as ``{}`` and literal braces doubled (``"t:{a}:x"``
        → ``"t:{}:x"``): two templates of the same shape render the same keys for the same
        values, whatever their columns are called."""
        return "".join("{}" if isinstance(p, tuple) else p.replace("{", "{{").replace("}", "}}")
                       for p in self.pieces())

    def __repr__(self) -> str:
        return f"KeyTemplate({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTemplate) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)
