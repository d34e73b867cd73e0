"""Errors of the runtime that need an operator, and the daemon being told to stop."""
from __future__ import annotations

__all__ = ["EngineError", "Terminated"]


class EngineError(RuntimeError):
    """A condition the daemon will not resolve by itself (needs an operator decision)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived while the daemon was blocked where stopping at once is safe
    (connecting, creating the slot, reconnecting): raised by :meth:`Engine.interrupt
    <pgderive.runtime.coordinator.Engine.interrupt>` from the signal handler.

    A ``KeyboardInterrupt``: no ``except Exception`` swallows it, and psycopg, interrupted by
    one in the middle of a query, sends the server a cancel request (and waits up to 5 s for
    it) instead of leaving the statement running. A server still waiting to create a slot
    (``CREATE_REPLICATION_SLOT`` waits for running transactions) would otherwise create it
    after the client left, and leave it behind.

    Attributes:
        signal: the signal's name (``"SIGTERM"``).
        phase: what the daemon was doing (``"connecting to the source"``).
    """

    def __init__(self, signal: str, phase: str) -> None:
        super().__init__(f"interrupted by {signal} while {phase}")
        self.signal = signal
        self.phase = phase
