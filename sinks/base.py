"""The sink protocol: what the engine needs from a Redis cache or an OpenSearch index.

Every write is an :class:`Op` carrying a version (the commit LSN of the transaction that produced
it, or a snapshot's consistent point). Sinks are idempotent (DESIGN.md rule 2): applying an Op
twice, or an older Op after a newer one, leaves the newer state.

A *generation* is one physical copy of a view (an OpenSearch index behind the view's alias; for
Redis the keys themselves, swept by version). Bootstrap and rebuild load a new generation at the
snapshot's consistent point X and then commit it, which removes everything older than X.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Protocol, Sequence

__all__ = ["Op", "ViewTarget", "Sink", "SinkError"]


@dataclass(slots=True)
class Op:
    """An upsert or delete of one sink key, with a version.

    Attributes:
        view: the view's name (from the YAML).
        key: the sink key: the Redis key, or the OpenSearch document ``_id``.
        version: commit LSN (int, bytes) of the producing transaction, or the consistent point
            for snapshot rows.
        doc: the derived document (output field → value, values in the model of
            :mod:`cdc.changes`), or ``None`` for a delete.
        partial: ``doc`` holds only some fields (unchanged TOAST values were omitted by
            wal2json): merge them into the stored record instead of replacing it.
    """

    view: str
    key: str
    version: int
    doc: dict[str, Any] | None
    partial: bool = False

    @property
    def is_delete(self) -> bool:
        return self.doc is None


@dataclass(slots=True, frozen=True)
class ViewTarget:
    """How one view is laid out in its sink.

    Attributes:
        view: view name; namespaces the sink's own bookkeeping (e.g. Redis version hash).
        format: Redis only: ``"hash"`` (one field per output field) or ``"json"`` (a JSON string).
        index: OpenSearch only: the alias users query; generations are indices behind it.
    """

    view: str
    format: Literal["hash", "json"] | None = None
    index: str | None = None


class SinkError(RuntimeError):
    """A sink failed to acknowledge a batch (connection, server error, rejected document).

    ``retryable`` is True for transport/availability failures, False for rejected input.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Sink(Protocol):
    """One sink instance (one Redis database, one OpenSearch cluster) serving several views."""

    name: str

    def register(self, target: ViewTarget) -> None:
        """Declare a view this sink serves; must be called before any Op for it."""

    def apply(self, ops: Sequence[Op]) -> None:
        """Write Ops to the live generation; return only once the sink acknowledged them all.

        Ops may belong to several views. Idempotent and order-insensitive per key thanks to
        versions. Raises :class:`SinkError`.
        """

    def begin_generation(self, view: str, version: int) -> str:
        """Start a new generation of ``view`` to be loaded at ``version`` (a consistent point).

        Returns a generation id to pass to :meth:`load` and :meth:`commit_generation`.
        """

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> None:
        """Write snapshot Ops into a generation that is not live yet. Raises :class:`SinkError`."""

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Make ``generation`` the live one and drop every record older than ``version``.

        Redis: deletes the view's keys whose stored version is < ``version``.
        OpenSearch: atomically points the alias at the generation's index, deletes older ones.
        """

    def scan(self, view: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, doc)`` for every live record of ``view`` (for verify/demo/tests).

        Values come back as the sink stores them (Redis hash values are strings).
        """

    def count(self, view: str) -> int:
        """Number of live records of ``view``."""

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`scan` yields for a record written with ``doc`` (used to diff views)."""

    def drop_view(self, view: str) -> None:
        """Remove every record and all bookkeeping of ``view`` (used by re-snapshot and tests)."""

    def close(self) -> None:
        """Release connections."""
