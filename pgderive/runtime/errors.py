"""Errors of the runtime that need an operator."""
from __future__ import annotations

__all__ = ["EngineError"]


class EngineError(RuntimeError):
    """A condition the daemon will not resolve by itself (needs an operator decision)."""
