"""The change model: what the source side hands to the views.

A :class:`Transaction` is one committed Postgres transaction, in commit order; its
``changes`` are the row-level :class:`Change` records of the tables pgderive watches.

Value model (shared by the snapshot and the stream, see :mod:`cdc.values`): integer types are
``int``, ``real``/``double precision`` are ``float``, ``numeric`` is its exact text (``str``),
``boolean`` is ``bool``, ``jsonb`` is parsed (dict/list/scalars), ``json`` stays its exact text, SQL NULL is ``None``
and every other type is Postgres' text output (``str``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = ["Change", "Transaction", "Row", "ChangeKind"]

Row = dict[str, Any]
ChangeKind = Literal["insert", "update", "delete", "truncate"]


@dataclass(slots=True)
class Change:
    """One row-level change of one table.

    Attributes:
        kind: ``insert`` | ``update`` | ``delete`` | ``truncate``.
        table: qualified table name ``"schema.table"`` (unquoted, as in the catalog).
        new: the new row (insert/update): column name → value. For updates of tables with
            REPLICA IDENTITY DEFAULT, unchanged TOASTed columns are absent (wal2json omits them).
        old_key: the old replica identity (update/delete): column name → value; for updates
            wal2json only sends it when the key changed (or with REPLICA IDENTITY FULL).
        maybe_nonfinite: columns of ``new`` that are ``None`` but may really hold ``NaN`` or
            ``±Infinity``: wal2json (format 2, up to 2.5 at least) prints those float/numeric
            values as JSON ``null``, the same as SQL NULL. :class:`cdc.refetch.RowRefetcher`
            resolves them against the source.
    """

    kind: ChangeKind
    table: str
    new: Row | None = None
    old_key: Row | None = None
    maybe_nonfinite: tuple[str, ...] = ()


@dataclass(slots=True)
class Transaction:
    """One committed transaction.

    Attributes:
        xid: transaction id.
        commit_lsn: LSN of the commit record: the version of every Op it produces.
        end_lsn: LSN just past the commit record (wal2json's ``nextlsn``): the position to
            confirm to the slot once every Op of this transaction is acknowledged.
        commit_time: commit timestamp (timezone-aware) from wal2json ``include-timestamp``.
        changes: row changes of watched tables, in WAL order.
        final: False for a leading chunk of a large transaction (the decoder hands changes over
            every ``chunk_changes`` so memory stays bounded); the chunk with ``final=True``
            closes the transaction. Only a final chunk may be confirmed to the slot.
        nbytes: size of the wal2json messages of these changes (bytes): the decoder and the
            engine bound memory by it as well as by the number of changes (rows can be 1 GB).
    """

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime | None
    changes: list[Change] = field(default_factory=list)
    final: bool = True
    nbytes: int = 0
