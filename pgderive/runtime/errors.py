"""Errors of the runtime that need an operator, and the daemon being told to stop."""
from __future__ import annotations

__all__ = ["EngineError", "Terminated"]


class EngineError(RuntimeError):
    """A condition the daemon will not resolve by itself (needs an operator decision)."""


class Terminated(BaseException):
    """SIGTERM/SIGINT arrived while the daemon was blocked where stopping at once is safe
    (connecting, creating the slot, reconnecting): raised by :meth:`Engine.interrupt
    <pgderive.runtime.coordinator.Engine.interrupt>` from the signal handler. A
    ``BaseException``, like ``KeyboardInterrupt``, so no ``except Exception`` swallows it.

    Attributes:
        signal: the signal's name (``"SIGTERM"``).
        phase: what the daemon was doing (``"connecting to the source"``).
    """

    def __init__(self, signal: str, phase: str) -> None:
        super().__init__(f"interrupted by {signal} while {phase}")
        self.signal = signal
        self.phase = phase
