"""The sink protocol: what the engine needs from a Redis cache or an OpenSearch index.

Every write is an :class:`Op` carrying a version (the commit LSN of the transaction that produced
it, or a snapshot's consistent point). Sinks are idempotent (ARCHITECTURE.md, rule 2): applying an Op
twice, or an older Op after a newer one, leaves the newer state.

A *generation* is one physical copy of a view (an OpenSearch index behind the view's alias; for
Redis the keys themselves, swept by version). Bootstrap and rebuild load a new generation at the
snapshot's consistent point X and then commit it, which removes everything older than X.

Writes never fail a whole batch for one bad record: :meth:`Sink.apply` and :meth:`Sink.load`
return the Ops the sink refused for data reasons as :class:`Rejected` (for a dead-letter record)
and apply all the others. :class:`SinkError` is for everything else.

A *checkpoint* is the LSN up to which a view is known to be complete in its sink, stored in the
sink itself (:meth:`Sink.write_checkpoint`). Comparing it with pgderive's own record detects a
sink that lost data (e.g. Redis restarted without its AOF) or a slot that moved on without us.

Optional capabilities are separate protocols, tested with ``isinstance`` (they are
``runtime_checkable``; the check only looks for the methods' names, the signatures are checked
by mypy):

* :class:`AtomicCheckpoint`: ``apply_and_advance`` — a batch's Ops and the checkpoint advance in
  one call (Redis).
* :class:`WireLoad`: ``wire_select`` + ``wire_load`` — snapshot rows encoded by Postgres in the
  sink's own protocol and relayed as bytes (Redis hash views, OpenSearch; :mod:`pgderive.runtime.wire`).
* :class:`Refreshable`: ``refresh`` — make acknowledged writes visible to scans (OpenSearch).
* :class:`ReservedNames`: ``reserved_names`` — names in the sink's namespace that pgderive uses
  for its own bookkeeping (OpenSearch: the checkpoint index), which no view may take.
* :class:`LegacyLayout`: ``adopt_legacy`` — move bookkeeping written before it was namespaced by
  deployment to the deployment's own keys (Redis, OpenSearch).
* :class:`Claims`: ``claim`` — refuse a view whose record keys or alias another deployment
  writes (Redis, OpenSearch).
* :class:`LiveGenerations`: ``follow_generation`` + ``abort_generation`` + ``discard_unserved``
  — the sink keeps generations apart (OpenSearch: one index each), so while an online rebuild
  loads a new generation the stream must write it too, through the lane's own sink instance
  (ARCHITECTURE.md, "Online rebuild"). A sink without it (Redis) writes every generation to the
  same keys, under the same compare-and-set.

Deployments: every key or document a sink writes for pgderive's own bookkeeping (version
entries, checkpoints) is namespaced by the deployment (:func:`cdc.catalog.deployment_id`: the
source cluster's system identifier, the database and the slot), so two daemons with same-named
views sharing one Redis database or one OpenSearch cluster never see each other's state. The
records themselves live where the view's ``key``/``index`` say: those names are the user's.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from psycopg import sql

__all__ = ["Op", "Rejected", "ViewTarget", "Sink", "SinkError", "AtomicCheckpoint", "WireLoad",
           "Refreshable", "TruncatesBelow", "ReservedNames", "LegacyLayout", "Claims", "LiveGenerations", "Locates", "TlsOptions",
           "Doc"]

Doc = dict[str, Any]
"""A derived document: output field → value (values in the model of :mod:`cdc.changes`)."""


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
            wal2json): merge them into the stored record instead of replacing it. A partial Op
            for a record the sink does not hold (missing or deleted) is skipped and counted.
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
class Rejected:
    """An Op the sink refused for a data reason; every other Op of the call was applied.

    Attributes:
        op: the refused Op as it was passed in (for a merged partial update: the partial Op).
        error: the sink's reason, e.g. ``"mapper_parsing_exception: failed to parse field [n]
            of type [long] ..."`` or ``"not JSON-encodable: ..."``.
    """

    op: Op
    error: str

    def __str__(self) -> str:
        return f"view {self.op.view}: key {self.op.key}: {self.error}"


@dataclass(slots=True, frozen=True)
class ViewTarget:
    """How one view is laid out in its sink.

    Attributes:
        view: view name; namespaces the sink's own bookkeeping (e.g. Redis version hash).
        format: Redis only: ``"hash"`` (one field per output field) or ``"json"`` (a JSON string).
        index: OpenSearch only: the alias users query; generations are indices behind it.
        key_shape: the view's key template with placeholders as ``{}``
            (:meth:`views.template.KeyTemplate.shape`), e.g. ``"account:{}"``; None when
            unknown. A Redis sink claims it for the deployment (:class:`Claims`).
        topic: Kafka only: the topic of a change-log view (:mod:`views.changelog`).
        table: Kafka only: the view's table, ``"schema.table"`` (named in TRUNCATE control
            records).
    """

    view: str
    format: Literal["hash", "json"] | None = None
    index: str | None = None
    key_shape: str | None = None
    topic: str | None = None
    table: str | None = None


@dataclass(slots=True, frozen=True)
class TlsOptions:
    """TLS settings of a sink connection (YAML ``ca_certs``, ``client_cert``, ``client_key``,
    ``verify_certs`` of a ``rediss://`` Redis or ``https://`` OpenSearch sink).

    Attributes:
        ca_certs: path of a PEM file with the CA certificates that sign the server's
            certificate; None: the system's trust store (OpenSSL's default paths).
        client_cert, client_key: paths of the PEM client certificate and its private key,
            for servers that authenticate clients by certificate; both or neither.
        verify: verify the server's certificate chain and that it names the host connected
            to (Python's ``ssl`` module, ``CERT_REQUIRED`` + ``check_hostname``); False
            encrypts without authenticating the server.
    """

    ca_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True


def tls_verify_failure(e: BaseException) -> str | None:
    """The reason when ``e`` (or an exception it was raised from or during) is a failed TLS
    certificate verification (``ssl.SSLCertVerificationError``, as raised through redis-py,
    urllib3 or opensearch-py), else None. Such a failure is not retryable: only another CA,
    certificate or host name fixes it."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur.verify_message or str(cur)
        stack += [cur.__cause__, cur.__context__, *(a for a in cur.args if isinstance(a, BaseException))]
    text = str(e)
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in text else None


class SinkError(RuntimeError):
    """A sink failed to acknowledge a call (connection, timeout, server error, misuse).

    ``retryable`` is True for transport/availability failures (retry the same call: sinks are
    idempotent), False for what a retry cannot fix (unregistered view, an index name taken by a
    foreign index, an unexpected server reply). Records refused for data reasons are not errors:
    they come back as :class:`Rejected`.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@runtime_checkable
class Sink(Protocol):
    """One sink instance (one Redis database, one OpenSearch cluster) serving several views."""

    name: str

    def check(self) -> None:
        """Make sure the sink is reachable and accepts this client's credentials, creating
        nothing and writing nothing (``pgderive validate`` and ``run`` before a slot exists).

        Raises :class:`SinkError`: ``retryable=True`` when the sink cannot be reached (refused,
        timed out, DNS), ``retryable=False`` when it answers but refuses the client
        (authentication, permissions, e.g. a Redis database index out of range). The message
        names the sink and never contains a password.
        """

    def register(self, target: ViewTarget) -> None:
        """Declare a view this sink serves; must be called before any Op for it."""

    def apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """Write Ops to the live generation; return only once the sink acknowledged them all.

        Ops may belong to several views. Idempotent and order-insensitive per key thanks to
        versions (partial Ops are merged into the stored record, in version order). Returns the
        Ops refused for data reasons (all others are applied, or skipped as older). Raises
        :class:`SinkError`; after a retryable one the whole call may be repeated.
        """

    def begin_generation(self, view: str, version: int) -> str:
        """Start a new generation of ``view`` to be loaded at ``version`` (a consistent point).

        Returns a generation id to pass to :meth:`load` and :meth:`commit_generation`.
        """

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> list[Rejected]:
        """Write snapshot Ops into a generation that is not live yet; returns the refused Ops
        like :meth:`apply`. Raises :class:`SinkError`."""

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Make ``generation`` the live one and drop every record older than ``version``.

        Redis: deletes the view's keys whose stored version is < ``version``.
        OpenSearch: atomically points the alias at the generation's index, deletes older ones.
        Checkpoints are not touched.
        """

    def write_checkpoint(self, views: Sequence[str], lsn: int) -> None:
        """Record that every view in ``views`` is complete up to ``lsn`` (int LSN), in one cheap
        call. Forward only: a checkpoint already at or past ``lsn`` is kept. Call it after the
        Ops up to ``lsn`` were acknowledged. Raises :class:`SinkError`."""

    def advance_checkpoint(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        """Move the views' checkpoints from at least ``previous`` to ``lsn``; return the views
        whose checkpoint was missing or behind ``previous`` (the sink lost acknowledged data),
        which are left untouched."""

    def read_checkpoint(self, view: str) -> int | None:
        """The checkpoint LSN of ``view``, or None if the sink holds none (never written, dropped,
        or lost by the sink). Reads the latest write (no refresh needed). Raises
        :class:`SinkError`."""

    def truncate(self, view: str, version: int) -> None:
        """Empty ``view`` for a TRUNCATE committed at ``version``: drop every record at or
        below ``version``. Idempotent under replay of the stream."""

    def scan(self, view: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, doc)`` for every live record of ``view`` (for verify/demo/tests).

        Values come back as the sink stores them (Redis hash values are strings).
        """

    def get(self, view: str, keys: Sequence[str], *,
            realtime: bool = True) -> dict[str, tuple[dict[str, Any] | None, int | None]]:
        """The current records of ``keys`` in one bulk read (for ``verify``).

        Returns, for every key of ``keys``, ``(stored doc, version)``: the doc as :meth:`scan`
        yields it, or None when the sink holds no record; the stored version (int LSN), or
        None when the sink keeps none for the key. ``(None, v)`` is a record deleted at ``v``
        (a Redis tombstone) or a version entry whose record vanished. With ``realtime`` (the
        default) reads the latest acknowledged writes; ``realtime=False`` lets a sink answer
        from a cheaper view that may lag by a refresh interval (OpenSearch). Raises
        :class:`SinkError`.
        """

    def scan_keys(self, view: str) -> Iterator[tuple[str, int | None]]:
        """Yield ``(key, version)`` for every live record of ``view`` (tombstones skipped), without
        the documents: the cheap pass over the sink that ``verify`` uses to find extra records.
        May lag the latest writes by a refresh interval (OpenSearch) and, like any scan over a
        changing store, may yield a key twice. Raises :class:`SinkError`."""

    def count(self, view: str) -> int:
        """Number of live records of ``view``."""

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`scan` yields for a record written with ``doc`` (used to diff views)."""

    def drop_view(self, view: str) -> None:
        """Remove every record and all bookkeeping of ``view``, its checkpoint included (used by
        re-snapshot and tests)."""

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class AtomicCheckpoint(Protocol):
    """A sink that applies a batch and advances its views' checkpoints in one call.

    Without it the runtime calls :meth:`Sink.apply`, then :meth:`Sink.advance_checkpoint`
    (two round trips); with it, one. Use: ``isinstance(sink, AtomicCheckpoint)``.
    """

    def apply_and_advance(self, ops: Sequence[Op], views: Sequence[str], previous: int,
                          lsn: int) -> tuple[list[Rejected], list[str]]:
        """:meth:`Sink.apply` of ``ops``, then :meth:`Sink.advance_checkpoint` of ``views`` from
        ``previous`` to ``lsn``.

        Args:
            ops: Ops of any views served by the sink (as for :meth:`Sink.apply`).
            views: the views whose checkpoints move (may include views without Ops here).
            previous: int LSN every checkpoint of ``views`` must already be at or past (what
                the runtime last acknowledged).
            lsn: int LSN the checkpoints move to (forward only: one already past it is kept).

        Returns ``(rejected, lost)``: the Ops refused for data reasons (as :meth:`Sink.apply`
        returns them; all others are applied or skipped as older), and the views whose
        checkpoint was missing or behind ``previous`` (the sink lost acknowledged data; their
        checkpoints are left untouched, the Ops are applied all the same).

        The checkpoints never move unless every Op was applied: a failing write raises before
        the advance. Raises :class:`SinkError`; after a retryable one the whole call may be
        repeated (both halves are idempotent).
        """
        ...


@runtime_checkable
class WireLoad(Protocol):
    """A sink that loads a snapshot from rows Postgres encodes in the sink's own protocol
    (:mod:`pgderive.runtime.wire`): pgderive relays bytes and decodes no row. The result equals
    :meth:`Sink.load` of the same rows' Ops at ``version``. Use: ``isinstance(sink, WireLoad)``.
    """

    def wire_select(self, view: str, fields: Sequence[str], version: int,
                    types: Sequence[str], *, generation: str | None = None,
                    live: bool = False) -> sql.Composable | None:
        """The SELECT list of a wire load of ``view`` at ``version`` (int LSN, the snapshot's
        consistent point) into ``generation`` (the id :meth:`Sink.begin_generation` returned;
        None: the one begun at ``version``), or None when the sink cannot load this view so.
        ``live``: the stream writes the view meanwhile (an online rebuild); a sink whose wire
        load does not keep the newer of its record and a concurrent write returns None.

        It reads the columns of an inner query: ``k`` (the record key as text, never NULL) and
        ``f0``, ``f1``, .. (the text of output field ``fields[i]``, whose column has the
        Postgres type name ``types[i]``; NULL for SQL NULL), and yields two ``bytea`` columns
        per row, opaque to the caller, for :meth:`wire_load`. Call it after
        :meth:`Sink.begin_generation` of ``view`` at ``version``. Raises :class:`SinkError`.
        """
        ...

    def wire_load(self, view: str, chunks: Iterable[Sequence[tuple[bytes, bytes]]]) -> int:
        """Relay the rows of :meth:`wire_select`'s SELECT list to the sink: ``chunks`` yields
        lists of ``(bytes, bytes)`` rows. Returns the number of records once the sink
        acknowledged all of them.

        Raises :class:`SinkError`: ``retryable=True`` for transport failures (the whole load
        may be repeated: every write carries ``version``), ``retryable=False`` when the sink
        refused a record (the caller then loads the view through :meth:`Sink.load`, which
        reports such records one by one as :class:`Rejected`).
        """
        ...


@runtime_checkable
class LiveGenerations(Protocol):
    """A sink whose generations are separate copies (OpenSearch: an index each, behind the
    view's alias), so a generation loaded while the stream runs must be written by the stream
    too (ARCHITECTURE.md, "Online rebuild"). Use: ``isinstance(sink, LiveGenerations)``.

    Which generations an instance follows is that instance's state: the lane that applies the
    stream (a thread's or a process's own instance) must be the one told."""

    def follow_generation(self, view: str, generation: str, *, exclusive: bool) -> None:
        """From the next :meth:`Sink.apply` on, write ``view``'s Ops to ``generation`` (begun by
        :meth:`Sink.begin_generation`) as well; with ``exclusive`` only there, not to the live
        generation (a view whose definition changed: the live one keeps serving the old
        definition, unchanged, until the switch). Asks the sink nothing."""
        ...

    def abort_generation(self, view: str, generation: str) -> None:
        """Stop following ``generation`` and delete it, unless it is the live one. Raises
        :class:`SinkError`."""
        ...

    def discard_unserved(self, view: str) -> list[str]:
        """Delete every generation of ``view`` that is neither live nor followed by this
        instance (left by a load that did not finish); returns their names. Raises
        :class:`SinkError`."""
        ...


@runtime_checkable
class Refreshable(Protocol):
    """A sink whose scans and searches may lag acknowledged writes by a refresh interval
    (OpenSearch) and can be told to catch up. Use: ``isinstance(sink, Refreshable)``."""

    def refresh(self, view: str) -> None:
        """Make every acknowledged write of ``view`` (its live generation and any generation
        being loaded) visible to :meth:`Sink.scan`, :meth:`Sink.scan_keys` and
        :meth:`Sink.count`. Raises :class:`SinkError`."""
        ...


@runtime_checkable
class TruncatesBelow(Protocol):
    """A sink that can empty a view of everything older than a TRUNCATE without touching newer
    records: what derivation workers need, where a TRUNCATE arrives once per partition while
    other partitions' newer writes land in between (ARCHITECTURE.md, "Kafka workers"). Use:
    ``isinstance(sink, TruncatesBelow)``."""

    def truncate_below(self, view: str, version: int) -> None:
        """Delete every record of ``view`` stored at a version < ``version`` (int LSN), with
        compare-and-set against concurrent writes: records at or above ``version`` stay.
        Idempotent, and commutes with writes at or above ``version``. Raises
        :class:`SinkError`."""
        ...


@runtime_checkable
class ReservedNames(Protocol):
    """A sink whose namespace holds names pgderive uses for itself (OpenSearch: the checkpoint
    index), so a view's target must not take them. Use: ``isinstance(sink, ReservedNames)``."""

    def reserved_names(self) -> frozenset[str]:
        """The names (e.g. OpenSearch index names) pgderive writes its own bookkeeping under in
        this sink; a view alias equal to one of them, or whose generation indices
        (``ALIAS-g<16 hex digits>``) could be one, clashes. Asks the sink nothing."""
        ...


@runtime_checkable
class LegacyLayout(Protocol):
    """A sink that may hold bookkeeping written before it was namespaced by deployment (see the
    module docstring) and can adopt it. Use: ``isinstance(sink, LegacyLayout)``; called once
    per start by :func:`pgderive.runtime.sinks.open_sinks`."""

    def adopt_legacy(self, views: Sequence[str]) -> list[str]:
        """Move the legacy bookkeeping of ``views`` (registered views) to this deployment's
        keys: read old, write new, then remove old; a view that already has its own is left
        alone. Idempotent; returns the views adopted. Raises :class:`SinkError`."""
        ...


@runtime_checkable
class Claims(Protocol):
    """A sink that records which deployment writes a view's user-visible names (Redis: the
    key template's shape; OpenSearch: the alias) and refuses another deployment's view that
    would write the same ones. Use: ``isinstance(sink, Claims)``; called once per start by
    :func:`pgderive.runtime.sinks.open_sinks`, after :class:`LegacyLayout` adoption."""

    def claim(self, views: Sequence[str]) -> None:
        """Claim the names of ``views`` (registered views) for this deployment. A claim held
        by another deployment whose view still has its bookkeeping in this sink refuses:
        :class:`SinkError` with ``retryable=False``, naming that deployment and what to do.
        A claim whose owner left no bookkeeping is taken over. Raises :class:`SinkError`."""
        ...


@runtime_checkable
class Locates(Protocol):
    """A sink whose generations are separate copies (OpenSearch: an index each) and can say
    which one holds a record: ``pgderive explain`` names the generation a record was written
    under (ARCHITECTURE.md, "Explain"). Use: ``isinstance(sink, Locates)``."""

    def locate(self, view: str, keys: Sequence[str]) -> dict[str, str]:
        """``key → generation id`` (OpenSearch: the index behind the view's alias) of every key
        of ``keys`` that has a live record; keys without one are absent. Raises
        :class:`SinkError`."""
        ...
