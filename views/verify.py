"""Diffing a view against its source (used by ``make demo`` and the tests).

The expected records are derived from a fresh REPEATABLE READ snapshot of the source with the
view's own derivation, put into the sink's stored form (:meth:`sinks.base.Sink.stored_form`),
and compared with what the sink holds. This first version keeps the expected side in memory
(fine for a few million small records); the streamed ``pgderive verify`` comes with issue 4.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdc.snapshot import read_table, snapshot_connection
from sinks.base import Sink

from .derive import View

__all__ = ["ViewDiff", "diff_view"]


@dataclass
class ViewDiff:
    """Result of comparing one view: counts and a few example keys of each kind."""

    view: str
    source_rows: int = 0
    sink_records: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.missing + self.extra + self.different

    def _example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


def diff_view(dsn: str, view: View, sink: Sink) -> ViewDiff:
    """Compare ``view`` in ``sink`` with the source at ``dsn`` right now.

    Rows the view cannot derive raise :class:`~views.derive.DerivationError`.
    """
    result = ViewDiff(view.name)
    expected: dict[str, dict[str, Any]] = {}
    with snapshot_connection(dsn, None) as conn:
        for chunk in read_table(conn, view.table, view.column_types):
            for row in chunk:
                op = view.row_op(row, 0)
                expected[op.key] = sink.stored_form(view.name, op.doc or {})
            result.source_rows += len(chunk)
    for key, doc in sink.scan(view.name):
        result.sink_records += 1
        want = expected.pop(key, None)
        if want is None:
            result.extra += 1
            result._example(f"extra {key}")
        elif want != doc:
            result.different += 1
            result._example(f"different {key}: sink {doc} != source {want}")
    result.missing = len(expected)
    for key in list(expected)[:3]:
        result._example(f"missing {key}")
    return result
