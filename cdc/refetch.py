"""Reading back the values wal2json cannot print: float/numeric ``NaN`` and ``±Infinity``.

wal2json's format 2 prints a float or numeric ``NaN``/``Infinity``/``-Infinity`` as JSON
``null`` (checked with wal2json 2.5, Debian's package; JSON has no such numbers), so a streamed
``null`` in such a column means "SQL NULL or a non-finite number". The decoder flags those
columns (:attr:`cdc.changes.Change.maybe_nonfinite`); :class:`RowRefetcher` looks the row up by
its replica identity and takes the column's current value from the table.

Why the current value is right: the sinks only need to converge (DESIGN.md rule 1). The row's
state read now is at least as new as the change being applied (that change committed before
pgderive read it), and every later change of the row is still ahead in the stream and carries a
higher version, so the last write a record gets reflects the last committed state. Until then a
record may briefly show a value newer than its version. A row that is gone (deleted, or its key
moved, since) keeps ``None``: the delete or key move is ahead in the stream as well.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import orjson
import psycopg
from psycopg import sql

from .changes import Change
from .values import converter

__all__ = ["RowRefetcher"]

log = logging.getLogger("pgderive.refetch")


def _as_text(value: Any) -> str:
    """A key value of the change model as Postgres input text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


class RowRefetcher:
    """Resolves :attr:`~cdc.changes.Change.maybe_nonfinite` columns by reading the source row.

    Args:
        dsn: libpq connection string of the source (a normal, non-replication connection; it
            is opened on first use and reopened after an error).
        tables: ``"schema.table"`` → ``(columns, identity)``: ``columns`` maps every column to
            its ``format_type`` name, ``identity`` lists the replica identity columns (primary
            key, ``USING INDEX`` columns or, for ``FULL``, every column).

    :meth:`fill` raises :class:`psycopg.OperationalError` when the source is unreachable (the
    engine treats it like a lost replication connection: reconnect, then re-read the stream
    from the slot's confirmed position).
    """

    def __init__(self, dsn: str, tables: Mapping[str, tuple[Mapping[str, str], Iterable[str]]]) -> None:
        self.dsn = dsn
        self.tables = {t: (dict(cols), tuple(ident)) for t, (cols, ident) in tables.items()}
        self.conn: psycopg.Connection | None = None
        self.lookups = 0  #: rows read back (for stats and tests)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def fill(self, change: Change, wanted: Iterable[str]) -> None:
        """Replace the flagged ``None`` values of ``change.new`` that a view uses (``wanted``)
        with the row's current values. Leaves them ``None`` when the row cannot be identified
        (no identity, an identity column missing or itself unsure) or no longer exists."""
        wanted = set(wanted)
        cols = [c for c in change.maybe_nonfinite if c in wanted]
        if not cols or change.new is None or change.table not in self.tables:
            return
        types, identity = self.tables[change.table]
        unsure = set(change.maybe_nonfinite)
        keys = [c for c in identity if c not in unsure]
        key_row = {**(change.old_key or {}), **change.new}
        if not keys or any(c not in key_row for c in keys):
            return
        row = self._lookup(change.table, types, cols, [(c, key_row[c]) for c in keys])
        if row is not None:
            change.new.update(row)

    def _lookup(self, table: str, types: dict[str, str], cols: list[str],
                key: list[tuple[str, Any]]) -> dict[str, Any] | None:
        schema, _, name = table.partition(".")
        conds, params = [], []
        for c, v in key:
            if v is None:
                conds.append(sql.SQL("{} IS NULL").format(sql.Identifier(c)))
            else:
                # format_type output is valid SQL for the type (it quotes names as needed).
                conds.append(sql.SQL("{} = %s::text::{}").format(sql.Identifier(c), sql.SQL(types[c])))
                params.append(_as_text(v))
        query = sql.SQL("SELECT {} FROM {} WHERE {} LIMIT 2").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in cols),
            sql.Identifier(schema, name), sql.SQL(" AND ").join(conds))
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="pgderive-refetch")
        try:
            rows = self.conn.execute(query, params, prepare=True).fetchall()
        except psycopg.OperationalError:
            self.close()
            raise
        except psycopg.Error as e:  # e.g. the table changed shape since; the NULL stays
            log.warning("could not read back %s of %s %s (%s); keeping NULL", ", ".join(cols),
                        table, dict(key), " ".join(str(e).split()))
            return None
        self.lookups += 1
        if len(rows) != 1:  # gone since, or not unique (REPLICA IDENTITY FULL duplicates)
            log.debug("refetch of %s %s found %d rows; keeping NULL", table, key, len(rows))
            return None
        return {c: (None if v is None else converter(types[c])(v)) for c, v in zip(cols, rows[0])}
