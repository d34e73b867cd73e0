"""The change envelope: how one row change travels through Kafka (ARCHITECTURE.md, "Kafka").

The publisher (a view on a ``type: kafka`` sink, :mod:`sinks.kafka`) writes one message per row
change; derivation workers (``source: {kafka: ...}``) read them back as :class:`cdc.changes.Change`
records with their transaction's commit LSN, xid and commit timestamp. Both sides use this
module, so the format has one definition.

Message **key**: the row's identity as compact JSON, columns in primary-key (else replica
identity) order, e.g. ``{"aid":1}``. Kafka's default partitioner hashes it, so every change of
one row lands in one partition, in commit order.

Message **value** (JSON, close to Debezium's Postgres envelope, Debezium manual "PostgreSQL
connector", "Data change events")::

    {"op": "c" | "u" | "d" | "r" | "t",      # create, update, delete, read (snapshot), truncate
     "before": {...} | null,                 # update/delete: the old replica identity (all
                                             #   columns with REPLICA IDENTITY FULL)
     "after": {...} | null,                  # create/update/read: the new row
     "partial": true,                        # only when "after" lacks unchanged TOAST columns
     "source": {"connector": "pgderive", "schema": "public",
                "table": "pgbench_accounts", "view": "accounts_log",
                "lsn": 23819080,             # commit LSN (int): the version of the change
                "txId": 1234,                # xid; null for snapshot rows
                "ts_ms": 1733580000123,      # commit timestamp, ms since the epoch (null if unknown)
                "ts_us": 1733580000123456,   # the same in µs
                "snapshot": false}}          # true for rows of a snapshot (op "r")

Values follow :mod:`cdc.changes`' value model (``numeric`` as exact text, ``jsonb`` parsed).
A TRUNCATE is a *control record*: ``op "t"``, no key, ``before``/``after`` null, written to every
partition of the table's topic so each consumer of a partition sees it in order.

A key change (an UPDATE that changes the identity) is published as a delete of the old key and
a create of the new one, as Debezium does, so per-key order holds in each partition.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import orjson

from .changes import Change, ChangeKind, Row

__all__ = ["EnvelopeOp", "Envelope", "EnvelopeError", "encode_key", "envelope", "encode", "decode",
           "truncate_record", "table_topic", "DEFAULT_TOPIC_PREFIX"]

#: The default ``topic_prefix`` of a Kafka sink (and of a worker's Kafka source).
DEFAULT_TOPIC_PREFIX = "pgderive"


def table_topic(prefix: str, table: str) -> str:
    """The topic of ``table`` (``"schema.table"``) under ``prefix``: ``"<prefix>.<schema>.<table>"``
    (Debezium's ``<topic.prefix>.<schema>.<table>``), e.g. ``pgderive.public.pgbench_accounts``."""
    return f"{prefix}.{table}"

EnvelopeOp = Literal["c", "u", "d", "r", "t"]
_KIND: dict[str, ChangeKind] = {"c": "insert", "r": "insert", "u": "update", "d": "delete", "t": "truncate"}


class EnvelopeError(ValueError):
    """A message that is not a pgderive change envelope (names what is wrong)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded change message.

    Attributes:
        op: ``c``/``u``/``d``/``r``/``t`` (see the module docstring).
        table: ``"schema.table"``.
        lsn: the commit LSN (int) of the transaction, or the snapshot's version for ``r``.
        xid: the transaction id; None for snapshot rows and when unknown.
        commit_time: the commit timestamp (UTC, µs precision) or None.
        before, after: rows (column → value) or None.
        partial: ``after`` lacks unchanged TOAST columns (merge, do not replace).
        view: the publishing view's name.
    """

    op: EnvelopeOp
    table: str
    lsn: int
    xid: int | None
    commit_time: datetime | None
    before: Row | None
    after: Row | None
    partial: bool = False
    view: str = ""

    def change(self) -> Change:
        """The :class:`~cdc.changes.Change` this envelope carries (``r`` becomes an insert,
        ``t`` a truncate)."""
        return Change(_KIND[self.op], self.table, new=self.after, old_key=self.before)


def encode_key(identity: Row) -> bytes:
    """The message key of a row: its identity columns (in the given order) as compact JSON."""
    return orjson.dumps(identity)


def envelope(op: EnvelopeOp, *, view: str, table: str, lsn: int, xid: int | None,
             commit_time: datetime | None, before: Row | None, after: Row | None,
             partial: bool = False) -> dict[str, Any]:
    """The message value of one change as a dict (see the module docstring); :func:`encode`
    gives its bytes."""
    schema, _, name = table.partition(".")
    us = None if commit_time is None else int(commit_time.timestamp() * 1_000_000)
    doc: dict[str, Any] = {"op": op, "before": before, "after": after}
    if partial:
        doc["partial"] = True
    doc["source"] = {"connector": "pgderive", "schema": schema, "table": name, "view": view,
                     "lsn": lsn, "txId": xid, "ts_ms": None if us is None else us // 1000, "ts_us": us,
                     "snapshot": op == "r"}
    return doc


def encode(op: EnvelopeOp, *, view: str, table: str, lsn: int, xid: int | None,
           commit_time: datetime | None, before: Row | None, after: Row | None,
           partial: bool = False) -> bytes:
    """The message value of one change (see the module docstring), as JSON bytes. Raises
    ``TypeError`` for a value orjson cannot encode."""
    return orjson.dumps(envelope(op, view=view, table=table, lsn=lsn, xid=xid, commit_time=commit_time,
                                 before=before, after=after, partial=partial))


def truncate_record(*, view: str, table: str, lsn: int, xid: int | None = None,
                    commit_time: datetime | None = None) -> bytes:
    """The value of a TRUNCATE control record (sent with no key to every partition)."""
    return encode("t", view=view, table=table, lsn=lsn, xid=xid, commit_time=commit_time,
                  before=None, after=None)


def decode(value: bytes | None) -> Envelope:
    """Parse a message value. Raises :class:`EnvelopeError` naming the problem (not JSON, a
    missing or mistyped field, an unknown ``op``)."""
    if value is None:
        raise EnvelopeError("empty message (a tombstone?): not a change envelope")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise EnvelopeError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("not a JSON object")
    op, src = doc.get("op"), doc.get("source")
    if op not in _KIND:
        raise EnvelopeError(f"unknown op {op!r} (expected c, u, d, r or t)")
    if not isinstance(src, dict) or not isinstance(src.get("lsn"), int):
        raise EnvelopeError("source.lsn missing or not an integer")
    schema, name = src.get("schema"), src.get("table")
    if not isinstance(schema, str) or not isinstance(name, str):
        raise EnvelopeError("source.schema/source.table missing")
    before, after = doc.get("before"), doc.get("after")
    if before is not None and not isinstance(before, dict) or after is not None and not isinstance(after, dict):
        raise EnvelopeError("before/after must be objects or null")
    us = src.get("ts_us")
    when = None if not isinstance(us, int) else datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc)
    xid = src.get("txId")
    return Envelope(op, f"{schema}.{name}", src["lsn"], xid if isinstance(xid, int) else None, when,
                    before, after, bool(doc.get("partial", False)), str(src.get("view") or ""))
