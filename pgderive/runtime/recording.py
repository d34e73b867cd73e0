"""Recording a batch's dead letters before the batch counts as acknowledged (ARCHITECTURE.md,
rule 5), from whichever thread or process applied it."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from cdc.lsn import format_lsn
from sinks.base import Rejected

from ..state.deadletters import DEFAULT_MAX_BYTES, DeadLetter, DeadLetterStore, Supersede

__all__ = ["DeadLetterRecorder"]

log = logging.getLogger("pgderive.deadletters")


class DeadLetterRecorder:
    """A lane's ``record`` callback (:data:`~pgderive.runtime.applier.DeadLetterSink`): marks the
    dead letters a batch's later changes superseded, then stores the batch's dead letters
    (rows views could not derive, documents sinks refused) in ``pgderive.dead_letters`` of the
    source database, and logs the first few.

    Picklable: a lane's process gets a copy that opens its own connection on first use (the
    store is not pickled).

    Args:
        dsn: the source's bookkeeping connection string (statement timeout set).
        slot: the slot whose dead letters these are.
        tables: view name → its source table ``schema.name`` (named in refused documents'
            dead letters).
        max_bytes: cap on a stored row's JSON (bytes; YAML ``dead_letters.max_bytes``).
        store: the store to use in this process (default: one opened from ``dsn``).
        sinks: view name → the name of its sink (the ``sink`` field of the dead letters' log
            lines; a view not in it gets none).

    Raises ``psycopg.Error`` when Postgres cannot store them (the batch is then not
    acknowledged and is applied again: rule 2).
    """

    def __init__(self, dsn: str, slot: str, tables: Mapping[str, str], *,
                 max_bytes: int = DEFAULT_MAX_BYTES, store: DeadLetterStore | None = None,
                 sinks: Mapping[str, str] | None = None) -> None:
        self.dsn, self.slot, self.tables, self.max_bytes = dsn, slot, dict(tables), max_bytes
        self.sinks = dict(sinks or {})
        self._store = store

    def __getstate__(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "slot": self.slot, "tables": self.tables, "max_bytes": self.max_bytes,
                "sinks": self.sinks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store = None

    @property
    def store(self) -> DeadLetterStore:
        """The store dead letters go to (opened on first use)."""
        if self._store is None:
            self._store = DeadLetterStore(self.dsn, max_bytes=self.max_bytes)
        return self._store

    def __call__(self, dead: Sequence[DeadLetter], rejected: Sequence[Rejected],
                 supersedes: Sequence[Supersede] = ()) -> None:
        if supersedes:
            n = self.store.supersede(self.slot, supersedes)
            if n:
                log.info("%d dead letter(s) superseded by later changes of their rows (views %s)", n,
                         ", ".join(sorted({s.view for s in supersedes})),
                         extra={"view": ",".join(sorted({s.view for s in supersedes}))})
        entries = list(dead)
        entries += [DeadLetter(r.op.view, self.tables.get(r.op.view, "?"), r.op.key, r.op.version, r.error,
                               r.op.doc) for r in rejected]
        self.store.record(self.slot, entries)
        for e in entries[:5]:
            log.warning("dead letter: view %s, %s, key %s, at %s: %s", e.view, e.table, e.key,
                        format_lsn(e.lsn), e.error,
                        extra={"view": e.view, "sink": self.sinks.get(e.view), "table": e.table, "lsn": e.lsn})
        if len(entries) > 5:
            log.warning("… and %d more dead letters (see `pgderive dead-letters list`)", len(entries) - 5)
