"""``${VAR}`` interpolation of the spec's string scalars, after YAML parsing.

``${VAR}`` is the variable (an error if unset), ``${VAR:-default}`` the default when the variable
is unset or empty, ``$$`` a literal ``$``; any other ``$`` is kept as is. Defaults cannot
themselves contain ``}`` or ``${...}``. Only string values are interpolated, never keys.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import _child

__all__ = ["interpolate"]

_VAR_RE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{[^}]*\}?))")


def interpolate(data: Any, env: Mapping[str, str], path: str,
                problems: list[tuple[str, str]]) -> Any:
    """``data`` with ``${VAR}``, ``${VAR:-default}`` and ``$$`` replaced in string scalars.

    ``path`` is the dotted YAML path of ``data`` (``""`` for the document); a ``(path, message)``
    is appended to ``problems`` for each unset variable or malformed reference, which is then
    left as written.
    """
    if isinstance(data, dict):
        return {k: interpolate(v, env, _child(path, k, data), problems) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, env, _child(path, i, data), problems) for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def replace(m: re.Match[str]) -> str:
        dollar, var, default, bad = m.groups()
        if dollar:
            return "$"
        if bad is not None:
            problems.append((path, f"invalid variable reference '${bad}': use ${{NAME}} or"
                                   " ${NAME:-default} (and $$ for a literal $)"))
            return m.group(0)
        value = env.get(var)
        if default is not None and not value:
            return default
        if value is None:
            problems.append((path, f"environment variable {var} is not set"
                                   f" (or give a default: ${{{var}:-default}})"))
            return m.group(0)
        return value

    return _VAR_RE.sub(replace, data)
