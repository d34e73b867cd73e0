"""The classification policy: no view copies a classified column into a sink that does not allow it.

``classification:`` tags source columns (``public.customers.email: pii``, or a list of tags);
each sink's ``allow:`` lists the tags whose columns it may receive (default none). Over the
:mod:`views.lineage` of the spec, a view is refused when a column it *copies* carries a tag its
sink does not allow: projected, renamed, in the key template, included at any depth, grouped
by or aggregated (``count(col)`` too), or returned by a declared ``derive`` function. Columns
only read to filter (``where``), join (an include's ``on``) or order (``order_by``) are
allowed: their values are not stored.

A ``derive`` function is Python and cannot be read: without ``derive_reads``/``outputs`` it is
treated as copying every field of the record it receives, so it is refused when that record
holds a column its sink may not receive; with them, every declared output carries the tags of
every declared read (and the daemon enforces them: the function receives only the declared
reads, a record with an undeclared field is a dead letter).

:func:`policy_problems` is pure (spec + catalog facts in, problems out); :func:`views.check.check_source`
runs it, so ``pgderive validate``, ``pgderive run`` (before any slot is created) and a reload
(``plan_reload`` takes a file only once it is bound) all refuse the same way.
"""
from __future__ import annotations

import difflib
from typing import Mapping

from cdc.catalog import TableInfo

from .lineage import UNDECLARED, Flow, Lineage, ViewLineage, analyze
from .spec import Spec
from .spec.models import COLUMN_RE

__all__ = ["policy_problems", "classification_problems", "violation"]


def _tags(tags: tuple[str, ...] | list[str]) -> str:
    return ", ".join(tags) or "none"


def classification_problems(spec: Spec, infos: Mapping[str, TableInfo]) -> list[tuple[str, str]]:
    """``(path, message)`` for every ``classification`` entry naming a table missing from
    ``infos`` (not an ordinary table of the source) or a column its table lacks."""
    problems: list[tuple[str, str]] = []
    for column in spec.classification:
        m = COLUMN_RE.match(column)
        if m is None:
            continue  # refused by the spec's own validation
        schema, table, name = m.groups()
        path = f"classification.{column}"
        info = infos.get(f"{schema}.{table}")
        if info is None:
            problems.append((path, f"unknown table {schema}.{table}: classify columns of existing tables"
                                   " (schema.table.column)"))
        elif name not in info.columns:
            close = difflib.get_close_matches(name, list(info.columns), n=1)
            problems.append((path, f"unknown column {name!r} in table {info.qualified}"
                                   + (f" (did you mean {close[0]!r}?)" if close else "")))
    return problems


def violation(view: ViewLineage, flow: Flow) -> tuple[str, str] | None:
    """The ``(path, message)`` refusing ``flow`` of ``view``, or ``None`` when the flow is
    allowed: not copied, unclassified, or every tag allowed by the view's sink."""
    if not flow.copied:
        return None
    denied = [t for t in flow.tags if t not in view.allow]
    if not denied:
        return None
    reach = (f"{flow.column} ({_tags(flow.tags)}) reaches sink {view.sink} (allows: {_tags(view.allow)})"
             f" via {flow.route}")
    if flow.derive == UNDECLARED:
        return (f"{view.path}.derive", f"{reach}: Python code cannot be checked; declare derive_reads and"
                                       " outputs (the record fields the function reads and returns)")
    return flow.path, reach


def policy_problems(spec: Spec, infos: Mapping[str, TableInfo], lineage: Lineage | None = None) -> list[tuple[str, str]]:
    """Every classification and sink-policy problem of ``spec``, each ``(yaml path, message)``.

    Args:
        spec: a parsed spec.
        infos: catalog facts by ``schema.name`` of every view's table, every included table
            and every table named in ``classification``.
        lineage: :func:`views.lineage.analyze` of them, if already computed.

    Returns:
        Unknown classified columns (at ``classification.COLUMN``), ``derive_reads`` naming no
        field (at ``views.X.derive_reads[i]``), then each copy of a classified column into a
        sink that does not allow one of its tags, at the YAML path that declares the copy, e.g.
        ``("views.order_docs.include.customer.fields.mail", "public.customers.email (pii) reaches
        sink search (allows: none) via include customer -> field mail")``. Empty: allowed.
    """
    lineage = lineage if lineage is not None else analyze(spec, infos)
    problems = classification_problems(spec, infos) + list(lineage.problems)
    for view in lineage.views:
        for flow in view.flows:
            p = violation(view, flow)
            if p is not None:
                problems.append(p)
    return list(dict.fromkeys(problems))
