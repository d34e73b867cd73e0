"""Retrying dead letters: derive the current source row again and apply it at the dead
letter's commit LSN (see :mod:`pgderive.state.deadletters` for what a dead letter is)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import psycopg

from cdc.catalog import TableInfo, table_info
from cdc.lsn import format_lsn
from cdc.snapshot import read_rows
from sinks.base import Op, Rejected, SinkError
from views.check import build_views
from views.derive import View
from views.spec import Spec

from ..runtime.sinks import open_sinks
from ..state.deadletters import DeadLetterRecord, DeadLetterStore

__all__ = ["RetryOutcome", "lookup_columns", "retry_dead_letters"]

log = logging.getLogger("pgderive.deadletters")


# -- retry ----------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class RetryOutcome:
    """What a retry did with one dead letter.

    Attributes:
        record: the dead letter as it was before the retry.
        resolved: True if the view now reflects the row (the record was deleted); False if it
            failed again (the record was kept, ``retries`` incremented, ``error`` updated).
        message: what happened, for the operator.
    """

    record: DeadLetterRecord
    resolved: bool
    message: str


def lookup_columns(info: TableInfo, row: dict[str, Any]) -> tuple[str, ...] | None:
    """The columns that find ``row`` again in its table: the primary key if the row carries
    it, else the replica identity columns (every column for REPLICA IDENTITY FULL without a
    primary key); ``None`` if the row lacks them."""
    for columns in (info.primary_key, info.identity_columns):
        if columns and all(c in row for c in columns):
            return tuple(columns)
    return None


def _source_row(view: View, info: TableInfo,
                stored: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...] | None]:
    """The stored row in column names, and the columns that find it again (or None).

    A dead letter holds either a source row (a row the view could not derive: column names)
    or a derived document (a document the sink refused: the view's output names). Both
    readings are tried; a row whose keys are exactly the view's output names (and the view
    renames columns) is read as a document first.
    """
    as_columns = {col: stored[out] for out, col in view.fields.items() if out in stored}
    renames = any(out != col for out, col in view.fields.items())
    looks_like_doc = renames and set(stored) == set(view.fields)
    for row in ((as_columns, stored) if looks_like_doc else (stored, as_columns)):
        identity = lookup_columns(info, row)
        if identity is not None:
            return row, identity
    return stored, None


def _rejections(result: Sequence[Rejected]) -> list[str]:
    """Error texts of what ``Sink.apply`` returned."""
    return [r.error for r in result]


def retry_dead_letters(spec: Spec, store: DeadLetterStore,
                       records: Sequence[DeadLetterRecord]) -> Iterator[RetryOutcome]:
    """Retry ``records`` (from :meth:`DeadLetterStore.take_for_retry`) one by one, in order.

    For each: the CURRENT row is read from the source table by the identity taken from the
    stored row (:func:`lookup_columns`). If it still exists, the view derives it again and the
    upsert is applied at the dead letter's commit LSN — not at the current WAL position: stream
    Ops after that LSN keep winning by version, so a retry never overwrites newer data (a delete
    of the stored sink key is added if the row's key changed since). If the row no longer
    exists, a delete of its sink key is applied at that LSN. Success deletes the record; a new
    failure (derivation error, document rejected by the sink) keeps it with ``retries`` + 1 and
    the new error. Yields one :class:`RetryOutcome` per record as it goes.

    Raises :class:`sinks.base.SinkError` (retryable) when a sink is unavailable (records not yet
    retried are left untouched), :class:`psycopg.Error` when the source is unreachable, and
    :class:`views.spec.SpecError` for a config that does not match the source.
    """
    if not records:
        return
    names = {r.view for r in records if r.view in spec.views}
    with psycopg.connect(spec.source.conninfo(), autocommit=True, application_name="pgderive-retry") as conn:
        views = {v.name: v for v in build_views(spec, conn, names)} if names else {}
        sinks = open_sinks(spec, list(views.values()))
        infos: dict[str, TableInfo | None] = {}
        try:
            for rec in records:
                def failed(message: str) -> RetryOutcome:
                    store.mark_retried([rec.id], message)
                    return RetryOutcome(rec, False, message)

                view = views.get(rec.view)
                if view is None:
                    yield failed(f"view {rec.view} is not in the config")
                    continue
                if view.table != rec.table:
                    yield failed(f"view {rec.view} now reads {view.table}, the dead letter is a row of {rec.table}")
                    continue
                if view.table not in infos:
                    schema, _, name = view.table.partition(".")
                    infos[view.table] = table_info(conn, schema, name)
                info = infos[view.table]
                if info is None:
                    yield failed(f"table {view.table} no longer exists")
                    continue
                stored, identity = _source_row(view, info, rec.row or {})
                if identity is None:
                    yield failed(f"the stored row lacks the identity columns of {view.table} "
                                 f"({', '.join(info.primary_key or info.identity_columns) or 'none'}); "
                                 "it cannot be looked up (discard it, or rebuild the view)")
                    continue
                found = read_rows(conn, info.qualified, view.column_types,
                                  {c: stored[c] for c in identity}, info.columns, limit=1)
                current = found[0] if found else None
                version = rec.commit_lsn
                if view.aggregation is not None:
                    yield failed("dead letters of aggregate views are not retried one by one: fix the "
                                 f"cause, then `pgderive rebuild -c FILE {view.name}`")
                    continue
                try:
                    if current is not None and view.tree is not None:
                        # Query-derived: read the whole record (includes) for this root.
                        root = view.tree.root_key({**stored, **current})
                        if root is None:
                            raise ValueError(f"the row lacks the identity columns of {view.table} "
                                             f"({', '.join(view.tree.identity)}): cannot read its record")
                        rows = [r for chunk in view.tree.rows(conn, [root]) for r in chunk]
                        ops, errors = view.key_ops([root], rows, version)
                        if errors:
                            raise errors[0]
                        done = f"re-derived {', '.join(op.key for op in ops)} at {format_lsn(version)}"
                    elif current is not None:
                        key = view.key.render(current)
                        matches = view.where is None or view.where.matches(current)
                        op = view.row_op(current, version) if matches else None
                        ops = [op if op is not None else Op(view.name, key, version, None)]
                        if rec.key is not None and rec.key != key:
                            ops.insert(0, Op(view.name, rec.key, version, None))
                        done = (f"upserted {key} at {format_lsn(version)}" if op is not None else
                                f"{key} is not in the view (where/derive): deleted at {format_lsn(version)}")
                    else:
                        keys = [rec.key] if rec.key is not None else []
                        try:
                            old = view.key.render(stored)
                        except ValueError:
                            old = None
                        if old is not None and old not in keys:
                            keys.append(old)
                        ops = [Op(view.name, k, version, None) for k in keys]
                        done = (f"row no longer exists: deleted {', '.join(keys)} at {format_lsn(version)}"
                                if keys else "row no longer exists and never had a sink key: nothing to delete")
                except Exception as e:  # derivation failed again (any error of a derivation)
                    yield failed(str(getattr(e, "reason", None) or e))
                    continue
                if ops:
                    try:
                        rejected = _rejections(sinks[view.sink].apply(ops))
                    except SinkError as e:
                        if e.retryable:
                            raise
                        rejected = [str(e)]
                    if rejected:
                        yield failed("; ".join(rejected))
                        continue
                store.delete([rec.id])
                yield RetryOutcome(rec, True, done)
        finally:
            for s in sinks.values():
                s.close()
