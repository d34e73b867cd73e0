"""Change-log views: a table's row changes as messages for a Kafka sink (ARCHITECTURE.md, "Kafka").

A view on a ``type: kafka`` sink derives nothing: every insert, update and delete of its table
becomes one :mod:`cdc.envelope` message, in stream order, and a snapshot row becomes an ``r``
(read) message. Its Ops carry the envelope as their ``doc``; they are not collapsed per key the
way other views' Ops are (ARCHITECTURE.md, rule 1 lets a cache keep only the last write of a
transaction, but a change log is read by consumers that may want every change), so each Op's
``key`` is the message key followed by a NUL character and a suffix unique within the stream
(:func:`message_key` takes it off again; JSON text never holds a raw NUL). A snapshot row's Op
key is the message key itself.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from cdc.changes import Change, Row, Transaction
from cdc.envelope import envelope
from sinks.base import Op

__all__ = ["Publisher", "message_key"]


def message_key(op_key: str) -> str:
    """The Kafka message key (the row identity's JSON) of a change-log Op's ``key``."""
    return op_key.partition("\x00")[0]


def _json_key(identity: Row) -> str:
    # orjson keeps dict order; the identity columns come in primary-key order.
    import orjson
    return orjson.dumps(identity).decode()


class Publisher:
    """The change-log derivation of one view.

    Args:
        view: the view's name.
        table: ``"schema.table"``.
        fields: output name → column (the columns published in ``after``).
        identity: the row identity's columns, in primary-key (else replica identity) order:
            the message key, and what ``before`` holds with REPLICA IDENTITY DEFAULT.
    """

    def __init__(self, view: str, table: str, fields: dict[str, str], identity: Sequence[str]) -> None:
        self.view, self.table = view, table
        self.fields = dict(fields)
        self.identity = tuple(identity)
        self._plain = all(k == v for k, v in self.fields.items())
        self._columns = frozenset(self.fields.values())

    def _after(self, row: Row) -> tuple[dict[str, Any], bool]:
        """The published columns of ``row`` and whether some are missing (unchanged TOAST)."""
        if self._plain and row.keys() == self._columns:
            return dict(row), False
        after = {out: row[col] for out, col in self.fields.items() if col in row}
        return after, len(after) < len(self.fields)

    def _key(self, row: Row) -> str:
        return _json_key({c: row.get(c) for c in self.identity})

    def row_op(self, row: Row, version: int) -> Op:
        """The ``r`` message of one snapshot row at ``version`` (the consistent point)."""
        after, _ = self._after(row)
        doc = envelope("r", view=self.view, table=self.table, lsn=version, xid=None, commit_time=None,
                       before=None, after=after)
        return Op(self.view, self._key(row), version, doc)

    def change_ops(self, change: Change, tx: Transaction, seq: int) -> list[Op]:
        """The messages of one insert/update/delete of ``tx`` (its commit LSN is their
        version); ``seq`` is unique within the stream (it keeps the Ops apart in a batch). An
        update that changes the identity is a delete of the old key and a create of the new
        one. TRUNCATEs are not handled here (the sink writes their control records)."""
        lsn, xid, when, view, table = tx.commit_lsn, tx.xid, tx.commit_time, self.view, self.table
        if change.kind == "delete":
            before = change.old_key or {}
            doc = envelope("d", view=view, table=table, lsn=lsn, xid=xid, commit_time=when,
                           before=before, after=None)
            return [Op(view, f"{self._key(before)}\x00{seq}", lsn, doc)]
        new = change.new or {}
        after, partial = self._after(new)
        key = self._key(new)
        old = change.old_key
        if change.kind == "update" and old and any(c in old and old[c] != new.get(c) for c in self.identity):
            before = {**old}
            gone = envelope("d", view=view, table=table, lsn=lsn, xid=xid, commit_time=when,
                            before=before, after=None)
            made = envelope("c", view=view, table=table, lsn=lsn, xid=xid, commit_time=when,
                            before=None, after=after, partial=partial)
            return [Op(view, f"{self._key({**new, **old})}\x00{seq}d", lsn, gone),
                    Op(view, f"{key}\x00{seq}", lsn, made)]
        op: Literal["c", "u"] = "c" if change.kind == "insert" else "u"
        doc = envelope(op, view=view, table=table, lsn=lsn, xid=xid, commit_time=when,
                       before=old if op == "u" else None, after=after, partial=partial)
        return [Op(view, f"{key}\x00{seq}", lsn, doc)]
