"""Checkpoints: the LSN up to which a view is known to be complete in its sink, kept in the sink
itself next to the data (ARCHITECTURE.md, "Checkpoints").

A lane moves its views' checkpoints after the sink acknowledged the Ops up to that LSN, and
only from the position it last recorded: a checkpoint found missing or behind that position
means the sink lost data it had acknowledged (e.g. Redis restarted without its AOF), which is
:class:`SinkDataLoss`. At start, comparing every view's checkpoint with the slot's confirmed
position finds views to rebuild, and a slot that moved on without pgderive
(:func:`lost_views`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from cdc.lsn import format_lsn
from sinks.base import Sink, SinkError
from views.derive import View

from .errors import EngineError
from .retry import StopFlag, with_retry

__all__ = ["SinkDataLoss", "advance_checkpoints", "lost_views"]


class SinkDataLoss(RuntimeError):
    """A sink no longer holds what it acknowledged: the checkpoints of ``views`` are missing or
    behind. Those views need a rebuild."""

    def __init__(self, sink: str, views: list[str], detail: str) -> None:
        super().__init__(f"sink {sink} lost data of view(s) {', '.join(views)}: {detail}")
        self.sink, self.views, self.detail = sink, views, detail

    def __reduce__(self) -> tuple[type[SinkDataLoss], tuple[str, list[str], str]]:
        # Raised in a lane's process and re-raised in the daemon (pickled over its pipe).
        return (type(self), (self.sink, self.views, self.detail))

    @classmethod
    def behind(cls, sink: str, views: list[str], acked: int) -> SinkDataLoss:
        """The checkpoints of ``views`` were missing or behind ``acked`` (int LSN)."""
        return cls(sink, views, f"checkpoint missing or behind the acknowledged position {acked:#x}")


def advance_checkpoints(sink: Sink, views: Sequence[str], previous: int, lsn: int,
                        stop: StopFlag, *, retry: bool = True,
                        on_retry: Callable[[SinkError], None] | None = None) -> None:
    """Move the checkpoints of ``views`` in ``sink`` from ``previous`` to ``lsn`` (int LSNs).

    With ``retry``, a retryable :class:`~sinks.base.SinkError` (a sink down or hung) is retried
    with backoff until ``stop`` (moving a checkpoint twice is harmless); without it the first
    one is raised. Raises :class:`SinkDataLoss` if a checkpoint was missing or behind
    ``previous``, and non-retryable :class:`~sinks.base.SinkError`.
    """
    def advance() -> list[str]:
        return sink.advance_checkpoint(views, previous, lsn)
    lost = with_retry(f"sink {sink.name} checkpoint", advance, stop, on_retry,
                      fields={"sink": sink.name, "lsn": lsn}) if retry else advance()
    if lost:
        raise SinkDataLoss.behind(sink.name, lost, previous)


def lost_views(views: Sequence[View], sinks: Mapping[str, Sink], slot: str, confirmed: int) -> list[View]:
    """Views whose sink no longer holds everything the slot was confirmed for (``confirmed``,
    int LSN): their checkpoint is missing or behind it.

    Raises :class:`EngineError` when every view's checkpoint exists but is behind the slot:
    then the slot moved without pgderive (dropped and recreated, or consumed by another
    client), and streaming from it would silently skip changes (ARCHITECTURE.md, rule 5)."""
    behind: list[tuple[View, int]] = []
    missing: list[View] = []
    for v in views:
        cp = sinks[v.sink].read_checkpoint(v.name)
        if cp is None:
            missing.append(v)
        elif cp < confirmed:
            behind.append((v, cp))
    if behind and len(behind) == len(views):
        raise EngineError(
            f"slot {slot} is confirmed at {format_lsn(confirmed)}, past everything the sinks "
            f"acknowledged (e.g. view {behind[0][0].name} at {format_lsn(behind[0][1])}): the slot "
            "was recreated or consumed by another client. Run `pgderive run --resnapshot`.")
    return missing + [v for v, _ in behind]
