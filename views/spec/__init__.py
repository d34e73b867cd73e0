"""The YAML spec: one file declaring the source, the sinks and the views (README.md, "YAML").

Loading goes: YAML text → node tree (for line numbers) → plain data → ``${VAR}``
interpolation → pydantic models → cross checks (view ↔ sink). Every problem found on the way is
collected into one :class:`SpecError` whose lines read ``file:line: dotted.path: message``.

The package:

- :mod:`views.spec.models`: the pydantic models, their validators and the cross checks;
- :mod:`views.spec.loader`: :func:`parse_spec` / :func:`load_spec` and the YAML line map;
- :mod:`views.spec.interpolate`: ``${VAR}``, ``${VAR:-default}`` and ``$$`` in string values;
- :mod:`views.spec.errors`: :class:`Problem`, :class:`SpecError`, dotted paths and the
  translation of pydantic errors into them.

Every public name of the former single module ``views/spec.py`` is re-exported here.
"""
from __future__ import annotations

from .errors import Problem, SpecError
from .loader import load_spec, parse_spec
from .models import (DERIVE_RE as DERIVE_RE, INDEX_RE as INDEX_RE, ORDER_RE as ORDER_RE,
                     SLOT_RE as SLOT_RE, VIEW_NAME_RE as VIEW_NAME_RE, Fields as Fields,
                     IncludeSpec, KafkaSinkSpec, KafkaSourceSpec, OpenSearchSinkSpec, RedisSinkSpec, SinkSpec,
                     SourceSpec, Spec, TableName as TableName, ViewSpec, parse_table, redact_dsn as redact_dsn)

__all__ = [
    "Spec", "SourceSpec", "KafkaSourceSpec", "SinkSpec", "RedisSinkSpec", "OpenSearchSinkSpec", "KafkaSinkSpec",
    "ViewSpec", "IncludeSpec",
    "SpecError", "Problem", "load_spec", "parse_spec", "parse_table",
]
