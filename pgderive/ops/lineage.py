"""``pgderive lineage``: the spec's lineage (:mod:`views.lineage`) as text, JSON or Graphviz dot.

Every renderer takes a :class:`views.lineage.Lineage` and the :class:`views.spec.Spec` it was
computed from (for the sinks' types and ``allow``) and returns a string; nothing here reads a
database or a sink.

* :func:`lineage_document` / :func:`render_json`: a stable document (``"version": 1``; views in
  YAML order, flows as :func:`views.lineage.analyze` orders them)::

      {"version": 1,
       "classification": {"public.customers.email": ["pii", "contact"]},
       "sinks": {"cache": {"type": "redis", "allow": ["pii"]}},
       "views": [{"view": "order_cache", "path": "views.order_cache", "table": "public.orders",
                  "sink": "cache", "sink_type": "redis", "target": "order:{id}", "key": "order:{id}",
                  "derive": null, "derive_reads": null, "outputs": null,
                  "flows": [{"column": "public.orders.id", "how": "key", "field": "(key)",
                             "copied": true, "tags": [], "allowed": true,
                             "path": "views.order_cache.key", "route": "key \\"order:{id}\\""}, …]}]}

  ``allowed`` is the policy's verdict on the flow (:func:`views.policy.violation`).
* :func:`render_text`: one table per view (column, how, field, tags, route).
* :func:`render_dot`: a ``digraph``: source columns (grouped per table) → views → sink fields
  (grouped per sink); classified columns are red with their tags, filtering uses dashed grey
  edges, a flow the policy refuses a bold red edge labelled ``REFUSED``.
"""
from __future__ import annotations

import json
from typing import Any

from views.lineage import Flow, Lineage, ViewLineage
from views.policy import violation
from views.spec import OpenSearchSinkSpec, Spec

__all__ = ["lineage_document", "render_json", "render_text", "render_dot", "FORMATS"]

#: The ``--format`` choices.
FORMATS = ("text", "json", "dot")


def _flow(view: ViewLineage, f: Flow) -> dict[str, Any]:
    return {"column": f.column, "how": f.how, "field": f.field, "copied": f.copied, "tags": list(f.tags),
            "allowed": violation(view, f) is None, "path": f.path, "route": f.route}


def lineage_document(lineage: Lineage, spec: Spec) -> dict[str, Any]:
    """The JSON document (see the module docstring); only JSON types inside."""
    return {
        "version": 1,
        "classification": {c: list(t) for c, t in lineage.classification.items()},
        "sinks": {n: {"type": "opensearch" if isinstance(s, OpenSearchSinkSpec) else "redis", "allow": list(s.allow)}
                  for n, s in spec.sinks.items()},
        "views": [{"view": v.name, "path": v.path, "table": v.table, "sink": v.sink, "sink_type": v.sink_type,
                   "target": v.target, "key": v.key, "derive": v.derive,
                   "derive_reads": list(v.derive_reads) if v.derive_reads is not None else None,
                   "outputs": list(v.outputs) if v.outputs is not None else None,
                   "flows": [_flow(v, f) for f in v.flows]} for v in lineage.views],
    }


def render_json(lineage: Lineage, spec: Spec) -> str:
    """:func:`lineage_document` as indented JSON (2 spaces), ending with a newline."""
    return json.dumps(lineage_document(lineage, spec), indent=2, ensure_ascii=False) + "\n"


def render_text(lineage: Lineage, spec: Spec) -> str:
    """A readable table per view, e.g.::

        order_cache: public.orders -> redis sink cache, key order:{id} (allows: pii)
          COLUMN                  HOW         FIELD            TAGS  ROUTE
          public.orders.id        key         (key)                  key "order:{id}"
          public.customers.name   include     customer.name    pii   include customer -> field name

    A refused flow ends with ``REFUSED``; classified columns no view copies are listed last.
    """
    lines: list[str] = []
    for v in lineage.views:
        where = f"index {v.target}" if v.sink_type == "opensearch" else f"key {v.key}"
        derive = ""
        if v.derive:
            derive = f", derive {v.derive}" + (f" (reads {', '.join(v.derive_reads)}; outputs {', '.join(v.outputs)})"
                                               if v.derive_reads is not None and v.outputs is not None
                                               else " (undeclared)")
        lines.append(f"{v.name}: {v.table} -> {v.sink_type} sink {v.sink}, {where}{derive}"
                     f" (allows: {', '.join(v.allow) or 'none'})")
        rows = [("COLUMN", "HOW", "FIELD", "TAGS", "ROUTE")]
        for f in v.flows:
            verdict = "" if violation(v, f) is None else "  REFUSED"
            rows.append((f.column, f.how, f.field or "-", ",".join(f.tags) or "-", f.route + verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        lines.append("")
    copied = {f.column for f in lineage.flows if f.copied}
    unused = [c for c in lineage.classification if c not in copied]
    if lineage.classification:
        lines.append("classification: " + "; ".join(f"{c} ({', '.join(t)})" for c, t in lineage.classification.items()))
        if unused:
            lines.append("classified, copied by no view: " + ", ".join(unused))
    return "\n".join(lines).rstrip("\n") + "\n"


def _q(text: str) -> str:
    """A dot double-quoted string (a newline in ``text`` becomes a line break of the label)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(lineage: Lineage, spec: Spec) -> str:
    """A Graphviz ``digraph`` (left to right): table clusters of source columns → view boxes →
    sink clusters of fields (``FIELD`` nodes per view and target). Classified columns are red,
    labelled with their tags; filtering uses (``where``, ``join``, ``order_by``) dashed grey
    edges to the view; a refused flow a bold red edge labelled ``REFUSED``. Deterministic: the
    same spec and catalog give the same text."""
    out = ["digraph lineage {", "  rankdir=LR;", "  node [fontname=Helvetica, fontsize=10];",
           "  edge [fontname=Helvetica, fontsize=9];"]
    tables: dict[str, list[str]] = {}
    for f in lineage.flows:
        table, _, column = f.column.rpartition(".")
        tables.setdefault(table, [])
        if column not in tables[table]:
            tables[table].append(column)
    for c in lineage.classification:
        table, _, column = c.rpartition(".")
        if table in tables and column not in tables[table]:
            tables[table].append(column)
    for i, (table, columns) in enumerate(tables.items()):
        out.append(f"  subgraph cluster_t{i} {{ label={_q(table)}; style=rounded; color=grey50;")
        for column in columns:
            tags = lineage.classification.get(f"{table}.{column}", ())
            style = (f", color=red, fontcolor=red, style=bold, label={_q(column + ' [' + ', '.join(tags) + ']')}"
                     if tags else f", label={_q(column)}")
            out.append(f"    {_q('col:' + table + '.' + column)} [shape=ellipse{style}];")
        out.append("  }")
    sinks: dict[str, dict[str, str]] = {}  # sink -> field node -> its label
    for v in lineage.views:
        label = f"{v.name}\n{v.sink_type}: {v.target}" + (f"\nderive {v.derive}" if v.derive else "")
        out.append(f"  {_q('view:' + v.name)} [shape=box, style=filled, fillcolor=lightblue, label={_q(label)}];")
        for f in v.flows:
            if f.field is None:
                continue
            sinks.setdefault(v.sink, {})[f"field:{v.sink}:{v.target}:{f.field}"] = f"{v.target}\n{f.field}"
    for i, (sink, nodes) in enumerate(sinks.items()):
        allow = ", ".join(spec.sinks[sink].allow) or "none"
        out.append(f"  subgraph cluster_s{i} {{ label={_q(f'sink {sink} (allows: {allow})')}; style=filled;"
                   " color=lightyellow;")
        for node, label in nodes.items():
            out.append(f"    {_q(node)} [shape=note, label={_q(label)}];")
        out.append("  }")
    seen: set[str] = set()
    for v in lineage.views:
        for f in v.flows:
            src, view = _q("col:" + f.column), _q("view:" + v.name)
            refused = violation(v, f) is not None
            if not f.copied:
                edge = f"  {src} -> {view} [style=dashed, color=grey60, label={_q(f.how)}];"
            else:
                attrs = f"label={_q(f.how + (' REFUSED' if refused else ''))}"
                if refused:
                    attrs += ", color=red, penwidth=2.5, fontcolor=red"
                elif f.tags:
                    attrs += ", color=red"
                edge = f"  {src} -> {view} [{attrs}];"
            if edge not in seen:
                seen.add(edge)
                out.append(edge)
            if f.field is not None:
                tag = f" [color=red, label={_q(','.join(f.tags))}]" if f.tags else ""
                edge = f"  {view} -> {_q(f'field:{v.sink}:{v.target}:{f.field}')}{tag};"
                if edge not in seen:
                    seen.add(edge)
                    out.append(edge)
    out.append("}")
    return "\n".join(out) + "\n"
