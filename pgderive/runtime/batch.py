"""A lane's batch: the Ops for one sink between two hand-overs, collapsed per sink key.

ARCHITECTURE.md, rule 1: within a transaction only the last Op per sink key matters. Across the
transactions of one batch the same holds, because a lane acknowledges its batch as a whole
before its position moves, and later commits carry higher versions. Partial upserts (unchanged
TOAST values omitted, rule 6) are merged into what the batch already holds for the key.

Besides Ops a batch carries what must be settled with them before its position counts as
acknowledged: dead letters of its views (rule 5), TRUNCATEs (applied after its Ops, in stream
order) and the commit timestamps of the transactions it covers (for the lag histograms).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from sinks.base import Op

from ..state.deadletters import DeadLetter, Supersede

__all__ = ["Batch", "LagToken", "GenerationStep"]


@dataclass(frozen=True, slots=True)
class GenerationStep:
    """A change to which generations a lane's sink instance writes, for an online rebuild of a
    sink with :class:`~sinks.base.LiveGenerations` (ARCHITECTURE.md, "Online rebuild"); applied
    by the lane before its batch's Ops, so it takes effect at an exact point of the stream.

    Attributes:
        seq: increasing per daemon; a lane's ``steps_done`` is the last one it applied.
        kind: ``follow`` (the stream writes ``generation`` too, or only it with ``exclusive``),
            ``publish`` (an aggregate view: its rebuilt state replaces the live one and every
            group is written; the lane does nothing), ``commit`` (make it live at ``version``)
            or ``abort`` (stop and delete it).
        view: the view's name; generation: the id ``begin_generation`` returned.
        version: ``commit``, ``publish``: the snapshot's consistent point (int LSN); else 0.
        exclusive: write the view's Ops to the generation alone (the view's definition is new
            or changed: the live generation keeps the old one's records).
        state: an aggregate view's rebuilt state (:func:`~pgderive.state.aggregates.shadow_name`),
            which the stream feeds from the ``follow`` step on; None for other views.
    """

    seq: int
    kind: Literal["follow", "publish", "commit", "abort"]
    view: str
    generation: str
    version: int = 0
    exclusive: bool = False
    state: str | None = None


class LagToken:
    """One transaction that produced Ops for several lanes: the last lane to acknowledge it
    records the transaction's end-to-end lag (commit → every sink acknowledged).

    Args:
        commit_time: the transaction's commit timestamp (Unix seconds, from wal2json).
        lanes: how many lanes must acknowledge it.
    """

    __slots__ = ("commit_time", "_left", "_lock")

    def __init__(self, commit_time: float, lanes: int) -> None:
        self.commit_time = commit_time
        self._left = lanes
        self._lock = threading.Lock()

    def acknowledge(self) -> bool:
        """Count one lane's acknowledgement; True for the last one."""
        with self._lock:
            self._left -= 1
            return self._left == 0


@dataclass(slots=True)
class Batch:
    """Pending work of one lane (one sink).

    Attributes:
        ops: (view, sink key) → the last Op for it.
        end_lsn: end LSN (int) of the last COMPLETE transaction whose Ops for this sink are all
            in the batch (or were handed over before): acknowledging the batch makes the lane
            complete up to it. 0: nothing confirmable (the Ops of an unfinished transaction).
        nbytes: a memory estimate: wal2json bytes of the transactions that added Ops here, plus
            the JSON size of re-derived include/aggregate records.
        dead_letters: rows this lane's views could not derive (recorded before the ack).
        supersedes: later changes of rows with stored dead letters (marked before the batch's
            own dead letters are recorded, after its Ops are applied).
        truncates: ``(view, version)`` TRUNCATEs to apply after ``ops``, in order.
        commit_times: commit timestamps (Unix s) of transactions that touched only this lane.
        shared: transactions that touched this lane and others.
        steps: generation steps to apply before ``ops``, in order.
    """

    end_lsn: int = 0
    ops: dict[tuple[str, str], Op] = field(default_factory=dict)
    nbytes: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    supersedes: list[Supersede] = field(default_factory=list)
    truncates: list[tuple[str, int]] = field(default_factory=list)
    commit_times: list[float] = field(default_factory=list)
    shared: list[LagToken] = field(default_factory=list)
    steps: list[GenerationStep] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def has_data(self) -> bool:
        """True when the batch has something for the sink besides a new position."""
        return bool(self.ops or self.dead_letters or self.supersedes or self.truncates or self.steps)

    def add(self, op: Op) -> None:
        """Add ``op``, collapsing it with an earlier Op on the same key."""
        k = (op.view, op.key)
        prev = self.ops.get(k)
        if prev is not None and op.partial and prev.doc is not None and op.doc is not None:
            # A partial update on top of a pending upsert: merge the fields it carries.
            op = Op(op.view, op.key, op.version, {**prev.doc, **op.doc}, partial=prev.partial)
        self.ops[k] = op

    def supersede(self, view: str, identity: str, identity_values: dict[str, Any], lsn: int) -> None:
        """A change at ``lsn`` of the row ``identity`` (:func:`identity_json` of
        ``identity_values``) of ``view``: dead letters of that row pending here are marked
        superseded, stored ones will be (:class:`Supersede`)."""
        for d in self.dead_letters:
            if d.view == view and d.superseded_lsn is None and d.identity == identity_values:
                d.superseded_lsn = lsn
        self.supersedes.append(Supersede(view, identity, lsn))

    def drop_view(self, view: str) -> None:
        """Forget pending Ops of ``view`` (superseded by a TRUNCATE later in the stream)."""
        for k in [k for k in self.ops if k[0] == view]:
            del self.ops[k]

    def drop_older(self, view: str, version: int) -> None:
        """Forget pending Ops of ``view`` older than ``version`` (int LSN): a TRUNCATE at
        ``version`` read by a derivation worker, whose batches mix partitions, so Ops at or
        above it may come from transactions after the TRUNCATE."""
        for k in [k for k, op in self.ops.items() if k[0] == view and op.version < version]:
            del self.ops[k]

    def drop_transaction(self, view: str, version: int) -> None:
        """Forget pending Ops of ``view`` at ``version`` (int LSN): the changes a change-log
        view's transaction made before its own TRUNCATE, which no reader could ever see (the
        transaction is atomic), and which a derivation worker could not tell from the changes
        after it."""
        for k in [k for k, op in self.ops.items() if k[0] == view and op.version == version]:
            del self.ops[k]

    def take_ops(self) -> Batch:
        """A batch with no position (applying it advances no checkpoint) holding this batch's
        Ops, dead letters and supersedes, which this batch forgets."""
        part = Batch(end_lsn=0, ops=self.ops, dead_letters=self.dead_letters, supersedes=self.supersedes)
        self.ops, self.dead_letters, self.supersedes, self.nbytes = {}, [], [], 0
        return part

    def portable(self) -> Batch:
        """The batch as a lane's process needs it (what the sink gets, pickled over a pipe):
        the same Ops, dead letters, supersedes, TRUNCATEs, generation steps and position, without the commit
        timestamps and :class:`LagToken`\\ s, which stay with the daemon's counters."""
        return Batch(end_lsn=self.end_lsn, ops=self.ops, nbytes=self.nbytes, dead_letters=self.dead_letters,
                     supersedes=self.supersedes, truncates=self.truncates, steps=self.steps)

    def successor(self) -> Batch:
        """An empty batch at this batch's position (what the reader fills next)."""
        return Batch(end_lsn=self.end_lsn)
