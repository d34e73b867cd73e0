"""The text report of ``pgderive explain`` (ARCHITECTURE.md, "Explain"): an
:class:`~pgderive.ops.explain.Explanation` as a rich renderable.

Every value comes from a sink or the source, so it is put in :class:`rich.text.Text` objects
(never parsed as markup: a ``[x]`` in a value stays as it is) and cut to a readable width; the
``--json`` document (:func:`pgderive.ops.explain.explanation_document`) has them whole.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import orjson

from cdc.lsn import format_lsn

from .explain import Explanation

if TYPE_CHECKING:
    from rich.console import Group, RenderableType

__all__ = ["render_explanation", "short_value", "pairs"]

_WIDTH = 60          # characters of one value
_DOC_WIDTH = 400     # characters of the record shown
_STYLE = {"equal": "bold green", "absent": "bold green", "different": "bold red", "missing": "bold red",
          "extra": "bold red", "pending": "bold yellow"}


def short_value(value: object, width: int = _WIDTH) -> str:
    """``value`` as compact JSON (``<absent>`` for the absent marker None is not), cut to
    ``width`` characters with ``…``."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def pairs(values: Mapping[str, Any], width: int = _WIDTH) -> str:
    """``col=value, …`` with each value as :func:`short_value`."""
    return ", ".join(f"{k}={short_value(v, width)}" for k, v in values.items())


def render_explanation(e: Explanation) -> Group:
    """A rich renderable of ``e`` for the terminal: the record and its version, where it came
    from, the source rows, the definition and generation, then the verdict."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st, src, v = e.stored, e.source, e.verdict
    head = Text()
    head.append(f"view {e.view}", style="bold")
    head.append(f" (sink {e.sink}, {e.sink_type}; {e.shape} view over {e.table}), key ")
    head.append(e.key, style="bold")
    parts: list[RenderableType] = [head]

    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    if st.doc is not None:
        t.add_row("record", Text(short_value(st.doc, _DOC_WIDTH)))
    elif st.version is not None:
        t.add_row("record", Text(f"none: deleted (a tombstone at {format_lsn(st.version)})"))
    else:
        t.add_row("record", Text("none in the sink"))
    if st.version is not None:
        version = f"{format_lsn(st.version)} (commit LSN)"
        if e.commit is not None:
            version += f", transaction {e.commit.xid}, committed {e.commit.committed_at.isoformat()}"
        t.add_row("version", Text(version))
    t.add_row("origin", Text(e.origin_note))
    current = e.written_fingerprint in (None, e.fingerprint)
    definition = f"fingerprint {e.written_fingerprint or e.fingerprint}"
    if e.written_fingerprint is None:
        definition += " (the YAML's; pgderive has no record of the one the sink holds)"
    elif current:
        definition += " (the YAML's definition)"
    else:
        definition += f"; the YAML's is {e.fingerprint}: a rebuild is pending or under way"
    if e.registry_status is not None and e.registry_status != "active":
        definition += f"; the view is {e.registry_status}"
    t.add_row("definition", Text(definition, style="" if current else "yellow"))
    t.add_row("generation", Text(e.generation_note))
    parts.append(t)

    if src.rows:
        rows = Table(title="source rows (current values of the columns the view reads)", title_justify="left",
                     box=None, padding=(0, 2))
        for col in ("path", "table", "key", "values", "written by"):
            rows.add_column(col, overflow="fold")
        for r in src.rows:
            by = ""
            if r.xmin is not None:
                by = f"xmin {r.xmin}"
                if r.xmin_committed_at is not None:
                    by += f", committed {r.xmin_committed_at.isoformat()}"
                if e.commit is not None and e.commit.xid == r.xmin:
                    by += " (the record's transaction)"
            path = r.path or "(root)"
            if not r.in_view:
                path += " (where: false)"
            rows.add_row(Text(path), Text(r.table), Text(pairs(r.key)), Text(pairs(r.values)), Text(by))
        parts.append(rows)
        if src.truncated:
            parts.append(Text("(more included rows than shown)", style="dim"))
        if src.commit_ts_note and any(r.xmin is not None for r in src.rows):
            parts.append(Text(f"commit times of xmin unknown: {src.commit_ts_note}", style="dim"))
    elif src.group is None:
        parts.append(Text("source rows: none render this key", style="dim"))
    if src.group is not None:
        g = src.group
        line = f"group {pairs(g.values)}: {g.source_rows} source row(s)"
        if g.state is None:
            line += "; no aggregate state in pgderive.agg_rows"
        else:
            line += f"; the aggregate state counts {g.state.rows}"
            if g.state.sample:
                sample = "; ".join(f"{pairs(dict(zip(g.identity, k)))} at {format_lsn(ver)}"
                                   for k, ver in g.state.sample)
                line += f", e.g. {sample}"
        parts.append(Text(line))
    for letter in e.dead_letters:
        parts.append(Text(f"dead letter {letter.id} of this key at {format_lsn(letter.commit_lsn)}: "
                          f"{short_value(letter.error, 200)}"
                          " (pgderive dead-letters list)", style="yellow"))
    if src.underivable:
        parts.append(Text(f"the view cannot derive this row (a dead letter): {src.underivable}", style="yellow"))

    verdict = Text()
    verdict.append(v.status.upper(), style=_STYLE[v.status])
    verdict.append(f"  one-record verify against the source at {format_lsn(v.snapshot_lsn)}")
    if v.confirmed_lsn is not None:
        verdict.append(f", daemon confirmed {format_lsn(v.confirmed_lsn)}")
    verdict.append(f" ({v.rounds} round{'s' if v.rounds != 1 else ''}, waited {v.waited_s:.1f} s)")
    parts.append(verdict)
    if v.note:
        parts.append(Text(v.note, style="" if v.exit_code == 0 else _STYLE[v.status].replace("bold ", "")))
    if v.differences:
        d = Table(box=None, padding=(0, 2))
        for col in ("field", "sink", "source"):
            d.add_column(col, overflow="fold")
        for f in v.differences:
            d.add_row(Text(f.field), Text("<absent>" if f.absent == "sink" else short_value(f.sink)),
                      Text("<absent>" if f.absent == "source" else short_value(f.source)))
        parts.append(d)
    elif v.status in ("missing", "extra") and v.expected is not None:
        parts.append(Text(f"expected: {short_value(v.expected, _DOC_WIDTH)}"))
    return Group(*parts)
