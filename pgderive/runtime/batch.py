"""A batch of Ops between two flushes, collapsed per sink key.

DESIGN.md rule 1: within a transaction only the last Op per sink key matters. Across the
transactions of one batch the same holds, because the batch is acknowledged as a whole before
the slot is confirmed, and later commits carry higher versions. Partial upserts (unchanged
TOAST values omitted) are merged into what the batch already holds for the key.
"""
from __future__ import annotations

from sinks.base import Op

__all__ = ["Batch"]


class Batch:
    """Pending Ops per sink, plus the end LSN of the last transaction they cover."""

    def __init__(self, end_lsn: int = 0) -> None:
        self.ops: dict[str, dict[tuple[str, str], Op]] = {}
        self._count = 0  # Ops in ``ops`` (len() is asked once per transaction)
        self.end_lsn = end_lsn  # end LSN of the last COMPLETE transaction covered (confirmable)
        self.transactions = 0  # complete transactions
        self.open_chunks = 0  # leading chunks of a large transaction not yet committed here
        self.changes = 0
        self.nbytes = 0  # wal2json bytes of the changes read into it (a memory estimate)
        self.commit_times: list[float] = []  # commit timestamps (Unix s) of its transactions
        self.dead_letters: list = []  # pgderive.state.deadletters.DeadLetter for rows views could not derive
        # Query-derived views (views.include): what the batch touched, resolved into Ops by the
        # engine before the batch is applied.
        self.affected: dict[str, set] = {}  # view → root identity tuples
        self.links: dict[str, dict[int, tuple]] = {}  # view → id(node) → (IncludeNode, link values)
        self.rederive_all: set[str] = set()  # views whose every record must be read again
        self.affected_version: dict[str, int] = {}  # view → version for those records
        self.xids: set[int] = set()  # transactions whose effects those reads must see
        self.resolved_bytes = 0  # size of the re-derived records added so far (JSON bytes)

    @property
    def pending(self) -> bool:
        """True when the batch has something to apply (complete transactions or chunks)."""
        return bool(self.transactions or self.open_chunks or self.ops or self.dead_letters
                    or self.affected or self.links or self.rederive_all)

    def __len__(self) -> int:
        return self._count

    def add(self, sink: str, op: Op) -> None:
        """Add ``op`` for ``sink``, collapsing it with an earlier Op on the same key."""
        per_sink = self.ops.get(sink)
        if per_sink is None:
            per_sink = self.ops[sink] = {}
        k = (op.view, op.key)
        prev = per_sink.get(k)
        if prev is None:
            self._count += 1
        elif op.partial and prev.doc is not None:
            # A partial update on top of a pending upsert: merge the fields it carries.
            op = Op(op.view, op.key, op.version, {**prev.doc, **op.doc}, partial=prev.partial)
        per_sink[k] = op

    def drop_view(self, sink: str, view: str) -> None:
        """Forget pending Ops of ``view`` (superseded by a TRUNCATE later in the stream)."""
        per_sink = self.ops.get(sink)
        if per_sink:
            for k in [k for k in per_sink if k[0] == view]:
                del per_sink[k]
                self._count -= 1

    def take_ops(self) -> Batch:
        """A batch (end LSN 0: applying it advances no checkpoint) holding this batch's pending
        Ops, which this batch forgets."""
        part = Batch(end_lsn=0)
        part.ops, part._count = self.ops, self._count
        self.ops, self._count = {}, 0
        return part

    def clear_ops(self) -> None:
        """Forget the pending Ops (applied elsewhere)."""
        self.ops = {}
        self._count = 0
