"""Spec problems and how they are reported: :class:`Problem`, :class:`SpecError`, dotted YAML
paths and their lines, and the translation of pydantic errors into ``(path, message)`` problems.

A path is dotted like the YAML it names: ``views.x.fields[2]``, ``sinks.cache.url``; ``""`` is
the whole file. Validators raise :func:`_fail` so that their messages reach the user unchanged
(optionally one step deeper than the field, e.g. ``[2]`` or ``.out``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["Problem", "SpecError"]


class Problem(NamedTuple):
    """One spec problem: dotted YAML path (``""`` for the whole file), 1-based line or None."""

    path: str
    line: int | None
    message: str


class SpecError(ValueError):
    """The spec (or the source it names) is not usable.

    Attributes:
        problems: every :class:`Problem` found, in file order where known.
        filename: the YAML file name (``"<string>"`` for text).

    ``str(err)`` is one line per problem: ``file:line: path: message`` (``:line`` omitted when
    unknown, ``path: `` omitted for whole-file problems).
    """

    def __init__(self, problems: Iterable[tuple[str, int | None, str]], filename: str = "<string>"):
        self.problems = [Problem(*p) for p in problems]
        self.filename = filename
        super().__init__(self._format())

    def _format(self) -> str:
        out = []
        for path, line, message in self.problems:
            where = self.filename if line is None else f"{self.filename}:{line}"
            out.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        return "\n".join(out)


def _fail(message: str, subpath: str = "") -> PydanticCustomError:
    """A validator error; ``subpath`` (``"[2]"``, ``".out"``) extends the field's YAML path."""
    return PydanticCustomError("pgderive", message, {"pgderive_subpath": subpath})


def _kind(value: Any) -> str:
    """How a YAML value is called in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# ------------------------------------------------------------------------------ dotted paths

def _child(path: str, key: Any, container: Any) -> str:
    """The dotted path of ``container[key]``: ``a.b`` for mappings, ``a[2]`` for lists."""
    if isinstance(container, list):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _parent(path: str) -> str:
    """The dotted path one level up: ``a.b[2]`` → ``a.b`` → ``a`` → ``""``."""
    if path.endswith("]"):
        return path[:path.rindex("[")]
    return path.rsplit(".", 1)[0] if "." in path else ""


def _lookup_line(lines: Mapping[str, int], path: str) -> int | None:
    """The line of ``path`` in ``lines``, else of its nearest ancestor there; ``None`` if none is."""
    while path:
        if path in lines:
            return lines[path]
        path = _parent(path)
    return None


# ------------------------------------------------------------------- pydantic → path problems

def _pydantic_problems(err: ValidationError, data: Any,
                       allowed_keys: Callable[[tuple[Any, ...]], list[str]]) -> list[tuple[str, str]]:
    """One ``(path, message)`` per error of ``err``, raised validating ``data``.

    ``allowed_keys(model_loc)`` names the keys allowed in the mapping at a pydantic loc (the
    models know, see :func:`views.spec.models._allowed_keys`); used for unknown-key messages.
    """
    problems = []
    for e in err.errors():
        orig = tuple(e["loc"])
        loc = list(orig)
        kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc.pop()
        # the discriminated union adds the sink type as a loc element: sinks.NAME.<type>.field
        if len(loc) >= 3 and loc[0] == "sinks" and loc[2] in ("redis", "opensearch", "kafka"):
            del loc[2]
        path, cur = "", data
        for part in loc:
            path = _child(path, part, cur)
            try:
                cur = cur[part]
            except (KeyError, IndexError, TypeError):
                cur = None

        if is_key:
            message = f"name must be a string, got {_kind(value)}"
        elif kind == "pgderive":
            path += ctx.get("pgderive_subpath", "")
            message = e["msg"]
        elif kind == "missing":
            message = f"missing required key {loc[-1]!r}"
        elif kind == "extra_forbidden":
            allowed = allowed_keys(orig[:-1])
            message = f"unknown key {loc[-1]!r}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
        elif kind == "string_type":
            message = f"must be a string, got {_kind(value)}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping, got {_kind(value)}"
        elif kind == "list_type":
            message = f"must be a list, got {_kind(value)}"
        elif kind == "literal_error":
            message = f"must be {ctx.get('expected')}, got {value!r}"
        elif kind == "union_tag_invalid":
            path += ".type"
            message = f"unknown sink type {ctx.get('tag')!r} (expected {ctx.get('expected_tags')})"
        elif kind == "union_tag_not_found":
            path += ".type"
            message = "missing required key 'type' (expected 'redis', 'opensearch' or 'kafka')"
        elif kind == "value_error":
            message = str(ctx.get("error", e["msg"]))
        else:
            message = e["msg"][:1].lower() + e["msg"][1:]
        problems.append((path, message))
    return problems
