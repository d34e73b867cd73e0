"""OpenSearch sink: one cluster serving several views, idempotent by external versioning.

Layout of one view with alias ``A`` (``ViewTarget.index``, the name users query):

* generations are indices ``A-g<version>`` where ``<version>`` is :func:`cdc.lsn.version_hex`
  of the generation's consistent point (16 lowercase hex digits), e.g. ``branches-g00000000016b3748``;
  settings: 1 shard, 0 replicas, ``refresh_interval`` 1s.
* the alias ``A`` points at exactly one generation, the live one. A view written before any
  generation was committed gets ``A-g0000000000000000`` and the alias on its first write.

Every index/delete action carries ``version=op.version, version_type=external_gte``: OpenSearch
keeps the greater version (an equal one re-applies: it comes from the same transaction, applied
in order, see :mod:`sinks.redis`), and answers 409 (version conflict) to an older one, which
counts as success; deleting a missing document (404) is success too. A generation being loaded
keeps delete tombstones longer (``index.gc_deletes`` = :data:`LOAD_GC_DELETES`, reset to the
default when committed) so a snapshot row cannot resurrect a document deleted meanwhile.
While a generation begun by this sink instance is not committed yet, :meth:`OpenSearchSink.apply`
writes every Op to both the alias and that generation (ARCHITECTURE.md, "Online rebuild").

Partial Ops (``Op.partial``): the ``update`` API does not support external versioning, so they
are a read-modify-write relying on one writer per key (the daemon applies batches one after the
other): after the full Ops of the call, one ``mget`` (realtime) reads the current ``_source`` of
the partial keys from every target index (the alias and generations being loaded), the newest
copy is the base, the partial docs are merged in version order, and the result is sent as a
full ``index`` action with the partial Op's external version. A partial Op for a document found
nowhere is skipped and counted in ``stats["partial_missed"]``.

Rejected Ops (:class:`sinks.base.Rejected`): a document that is not JSON-encodable, a bulk item
refused with 400 (``mapper_parsing_exception``, ``illegal_argument_exception``, ...) or 413, and a
document too large for the server's ``http.max_content_length`` (the request is split until the
offending document is alone). Other documents of the same request are applied regardless.
Requests hold at most ``bulk_docs`` actions and about ``bulk_bytes`` bytes.

Wire loads (:meth:`OpenSearchSink.wire_select`, :meth:`OpenSearchSink.wire_load`): a snapshot of
a plain projection is rendered into ``_bulk`` lines by the snapshot query itself (see
:mod:`pgderive.runtime.wire`) and relayed in requests of the same size and concurrency; any refused document
makes the load fall back to :meth:`OpenSearchSink.load`, which reports it.

Checkpoints: index :attr:`OpenSearchSink.checkpoint_index` (YAML ``checkpoint_index``, default
:data:`CHECKPOINT_INDEX`; 1 shard, 0 replicas, ``gc_deletes`` 0), one document ``{"lsn": <int>}``
per view with ``_id`` = ``<deployment>:<view>`` (:func:`checkpoint_id`; the deployment,
:func:`cdc.catalog.deployment_id`, keeps deployments sharing a cluster apart), written with
``version`` = LSN (``external``: a checkpoint only moves forward) and without refresh; read with a
realtime GET. Documents written before namespacing (``_id`` = view, in :data:`CHECKPOINT_INDEX`)
are adopted on the first start (:meth:`OpenSearchSink.adopt_legacy`). The aliases and generation
indices are named by the user's ``index``: two deployments declaring the same alias clash, a
configuration error.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict, deque
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Optional, Sequence
from urllib.parse import urlsplit

import orjson
from opensearchpy import OpenSearch, helpers
from opensearchpy import exceptions as ox
from psycopg import sql

from cdc.lsn import version_hex
from cdc.values import json_bare
from sinks.base import Op, Rejected, SinkError, TlsOptions, ViewTarget, tls_verify_failure

if TYPE_CHECKING:
    from sinks.base import (Claims, LegacyLayout, LiveGenerations, Locates, Refreshable, ReservedNames, Sink,
                            TruncatesBelow, WireLoad)

__all__ = ["OpenSearchSink", "generation_index", "LOAD_GC_DELETES", "CHECKPOINT_INDEX", "checkpoint_id"]

log = logging.getLogger("pgderive.sinks.opensearch")


def _without_traceback(record: logging.LogRecord) -> bool:
    """opensearch-py logs every failed request at WARNING with the exception's traceback
    (``Connection.log_request_fail``); pgderive reports the failure itself, in one line, as a
    :class:`SinkError`. Keep the client's one-line message, drop the traceback."""
    record.exc_info = None
    record.exc_text = None
    return True


logging.getLogger("opensearch").addFilter(_without_traceback)

LOAD_GC_DELETES = "6h"
_GEN_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"}
_BULK_FILTER = (
    "errors,items.*._id,items.*._index,items.*.status,items.*.error.type,items.*.error.reason"
)
_MGET_FILTER = "docs._id,docs.found,docs._version,docs._source"
_IDS_FILTER = "hits.hits._id,hits.hits._version,hits.hits._source"
_IDS_PER_SEARCH = 2500  # <= index.max_result_window (10,000)
_MAX_REPORTED = 3
CHECKPOINT_INDEX = "pgderive-checkpoints"
_CHECKPOINT_BODY = {
    "settings": {"index": {"number_of_shards": 1, "number_of_replicas": 0, "gc_deletes": "0s"}},
    "mappings": {"dynamic": "strict", "properties": {"lsn": {"type": "long"}}},
}
_REJECT_STATUS = (400, 413)  # bulk item statuses meaning "this document", not "this cluster"
_META = "pgderive"  # key of the generation indices' mapping ``_meta``: {deployment, view}

# one bulk action: (the Op to report, action line, source line or None for a delete)
_Action = tuple[Op, bytes, Optional[bytes]]


_ACTION_TAIL = b',"version_type":"external_gte"}}'


def _action_head(action: str, index: str) -> bytes:
    """``{"ACTION":{"_index":INDEX,"_id":`` — the start of a bulk action line."""
    return orjson.dumps({action: {"_index": index}})[:-2] + b',"_id":'


def _bulk_failures(resp: dict[str, Any]) -> Iterator[tuple[int, int, str, str, str]]:
    """``(position, status, _id, _index, reason)`` of every item of a ``_bulk`` response (read
    with ``_BULK_FILTER``) that failed. A 409 (version conflict: the stored document is as new
    or newer) and a delete's 404 (already gone) are successes for pgderive."""
    if not resp.get("errors"):
        return
    for pos, item in enumerate(resp["items"]):
        (action, result), = item.items()
        status = int(result.get("status", 0))
        if status < 300 or status == 409 or (action == "delete" and status == 404):
            continue
        err = result.get("error") or {}
        yield (pos, status, result.get("_id", "?"), result.get("_index", "?"),
               f"{err.get('type', status)}: {err.get('reason', '')}")


def _connection_options(name: str, hosts: list[str], tls: TlsOptions | None,
                        basic_auth: tuple[str, str] | None) -> dict[str, Any]:
    """opensearch-py's keyword arguments for TLS and basic auth (its ``Urllib3HttpConnection``:
    ``use_ssl`` follows each host's scheme, ``verify_certs``, ``ca_certs``, ``client_cert``,
    ``client_key``, ``http_auth``); logs a warning when credentials would go over plain http
    or certificates are not verified."""
    options: dict[str, Any] = {}
    secure = all(h.startswith("https://") for h in hosts)
    if tls is not None:
        options.update(verify_certs=tls.verify, ca_certs=tls.ca_certs, client_cert=tls.client_cert,
                       client_key=tls.client_key, ssl_show_warn=False)
        if not tls.verify:
            log.warning("sink %s: verify_certs is false: TLS without checking who answers", name)
    if basic_auth is not None:
        options["http_auth"] = basic_auth
    has_userinfo = any("@" in urlsplit(h).netloc for h in hosts)
    if (basic_auth is not None or has_userinfo) and not secure:
        log.warning("sink %s: basic auth credentials are sent over plain http:// (readable on the "
                    "network); use https:// hosts", name)
    return options


def checkpoint_id(view: str, deployment: str | None = None) -> str:
    """``_id`` of the checkpoint document of ``view``: ``"<deployment>:<view>"``, or the legacy
    ``"<view>"`` when ``deployment`` is None (before namespacing)."""
    return view if deployment is None else f"{deployment}:{view}"


def generation_index(alias: str, version: int) -> str:
    """Index name of the generation of ``alias`` at ``version`` (int LSN): ``alias-g<16 hex>``."""
    return f"{alias}-g{version_hex(version)}"


def _is_generation_of(alias: str, index: str) -> bool:
    return re.fullmatch(re.escape(alias) + r"-g[0-9a-f]{16}", index) is not None


class OpenSearchSink:
    """Sink writing views into one OpenSearch cluster (see the module docstring for the layout).

    Args:
        name: the sink's name in the YAML (for error messages).
        hosts: node URLs, e.g. ``["http://127.0.0.1:9201"]``.
        bulk_docs: maximum actions per ``_bulk`` request.
        bulk_bytes: a ``_bulk`` request is sent once its body reaches this many bytes.
        bulk_concurrency: ``_bulk`` requests of one call in flight at once (each Op of a
            call has its own key, and versions order writes anyway, so requests may land in any
            order); 1 sends them one after the other.
        timeout: seconds before a request counts as failed (retryable).
        deployment: namespaces the checkpoint documents (:func:`checkpoint_id`,
            :func:`cdc.catalog.deployment_id`) so deployments sharing the cluster keep separate
            checkpoints; None uses the legacy ``_id`` = view (tests and tools only).
        tls: TLS settings for ``https://`` hosts (opensearch-py's ``ca_certs``,
            ``client_cert``, ``client_key``, ``verify_certs``); default: verify the server
            against the system's trust store (certifi's bundle when installed).
        basic_auth: ``(username, password)`` for HTTP basic auth; never logged. With a plain
            ``http://`` host (or credentials in a host URL) a warning is logged once: they
            cross the network in clear text.
        checkpoint_index: the index holding the checkpoint documents (YAML
            ``checkpoint_index``; default :data:`CHECKPOINT_INDEX`), a public attribute.

    Attributes:
        stats: running counter ``partial_missed`` (partial Op for a document found nowhere).

    Every method raises :class:`SinkError`: ``retryable=True`` for connection failures, timeouts,
    HTTP 429/5xx and items failed with 429/5xx; ``retryable=False`` for unregistered views, an
    alias name taken by a concrete (legacy) index and other unexpected errors. Refused documents
    are returned as :class:`~sinks.base.Rejected` instead (see the module docstring).
    """

    def __init__(self, name: str, hosts: list[str], *, bulk_docs: int = 2000,
                 bulk_bytes: int = 16 << 20, bulk_concurrency: int = 2, timeout: float = 30.0,
                 deployment: str | None = None, checkpoint_index: str = CHECKPOINT_INDEX,
                 tls: TlsOptions | None = None, basic_auth: tuple[str, str] | None = None) -> None:
        if bulk_docs < 1 or bulk_bytes < 1 or bulk_concurrency < 1:
            raise ValueError("bulk_docs, bulk_bytes and bulk_concurrency must be >= 1")
        self.name = name
        self.deployment = deployment
        #: The index holding pgderive's checkpoints in this cluster (one document per view); no
        #: view alias may take it (:meth:`reserved_names`).
        self.checkpoint_index = checkpoint_index
        self.bulk_docs = bulk_docs
        self.bulk_bytes = bulk_bytes
        self.bulk_concurrency = bulk_concurrency
        self._senders: ThreadPoolExecutor | None = None  # created on the first concurrent call
        self._senders_lock = threading.Lock()  # parallel snapshot loads call from several threads
        self.stats = {"partial_missed": 0}
        self._checkpoint_index_ready = False
        # A request that hangs longer than ``timeout`` seconds is a retryable failure: the
        # engine backs off and retries rather than waiting on a stuck node indefinitely.
        # One kept-alive connection per sender thread plus the calling thread (urllib3 keeps
        # one per host by default: every concurrent request then opened a new connection and
        # logged "Connection pool is full, discarding connection").
        self._client = OpenSearch(hosts, http_compress=False, timeout=timeout,
                                  pool_maxsize=bulk_concurrency + 2,
                                  **_connection_options(name, hosts, tls, basic_auth))
        self._targets: dict[str, ViewTarget] = {}
        self._aliases: dict[str, str] = {}  # view -> its alias (ViewTarget.index)
        self._has_alias: set[str] = set()  # views whose alias is known to exist
        self._loading: dict[str, set[str]] = defaultdict(set)  # view -> uncommitted generations
        self._exclusive: set[str] = set()  # views written only to their loading generations

    # --- protocol -------------------------------------------------------------------------

    def check(self, timeout: float = 10.0) -> None:
        """``GET /`` (the cluster's info, OpenSearch REST API "Info"): proves the cluster
        reachable and the credentials accepted, creating nothing. ``timeout`` (seconds) bounds
        each attempt.

        Raises :class:`SinkError`: ``retryable=True`` when no node answers (or answers 429/5xx),
        ``retryable=False`` for HTTP 401/403 (credentials refused), a TLS certificate that
        fails verification and other refusals.
        """
        prefix = f"sink {self.name}: OpenSearch"
        # The client logs every failed attempt as a warning with a traceback; the SinkError
        # below says it once, in one line.
        client_log = logging.getLogger("opensearch")
        level = client_log.level
        client_log.setLevel(logging.ERROR)
        try:
            self._client.info(request_timeout=timeout)
        except ox.ConnectionError as e:  # includes timeouts and TLS failures
            reason = tls_verify_failure(e)
            if reason is not None:
                raise SinkError(f"{prefix}: TLS certificate verification failed ({reason}): check "
                                "ca_certs and the host names in hosts", retryable=False) from e
            raise SinkError(f"{prefix} unreachable: {_cause(e)}", retryable=True) from e
        except ox.TransportError as e:
            status = e.status_code
            if status in (401, 403):
                raise SinkError(f"{prefix} refused the credentials (HTTP {status}): {_reason(e) or e.error}",
                                retryable=False) from e
            retryable = not isinstance(status, int) or status == 429 or status >= 500
            raise SinkError(f"{prefix} error {status}: {e.error}: {_reason(e)}", retryable=retryable) from e
        finally:
            client_log.setLevel(level)

    def reserved_names(self) -> frozenset[str]:
        """The index names pgderive keeps for itself in this cluster: :attr:`checkpoint_index`
        (:class:`~sinks.base.ReservedNames`)."""
        return frozenset({self.checkpoint_index})

    def register(self, target: ViewTarget) -> None:
        """Declare a view; ``target.index`` (the alias) is required."""
        if not target.index:
            raise ValueError(f"sink {self.name}: view {target.view}: no index (alias) given")
        self._targets[target.view] = target
        self._aliases[target.view] = target.index

    def apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """Write ``ops`` (any views) to their aliases, plus to generations being loaded by this
        instance; return once OpenSearch acknowledged every action, with the refused Ops.
        Creates the first generation and the alias of a view that has none. Raises
        :class:`SinkError`."""
        by_view: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_view[op.view].append(op)
        rejected: list[Rejected] = []
        for view, vops in by_view.items():
            loading = sorted(self._loading.get(view, ()))
            if view in self._exclusive and loading:
                rejected += self._write(view, loading, vops)  # the live generation stays as it is
                continue
            alias = self._alias(view)
            self._ensure_alias(view, alias)
            rejected += self._write(view, [alias, *loading], vops)
        return rejected

    def follow_generation(self, view: str, generation: str, *, exclusive: bool) -> None:
        """Write ``view``'s Ops to ``generation`` too from the next :meth:`apply` on; with
        ``exclusive`` only there (the alias is left as it is, and not created if missing)."""
        self._alias(view)
        self._loading[view].add(generation)
        if exclusive:
            self._exclusive.add(view)
        else:
            self._exclusive.discard(view)

    def abort_generation(self, view: str, generation: str) -> None:
        """Stop following ``generation`` and delete its index unless the alias points at it.
        Raises :class:`SinkError`."""
        alias = self._alias(view)
        self._loading[view].discard(generation)
        if not self._loading[view]:
            self._exclusive.discard(view)
        with self._errors(f"abort_generation {view}"):
            if generation not in self._alias_indices(alias):
                self._client.indices.delete(index=generation, ignore_unavailable=True)

    def discard_unserved(self, view: str) -> list[str]:
        """Delete the generation indices of ``view`` that the alias does not point at and this
        instance does not follow (left by a load that did not finish); returns their names.
        Raises :class:`SinkError`."""
        alias = self._alias(view)
        with self._errors(f"discard_unserved {view}"):
            keep = set(self._alias_indices(alias)) | self._loading.get(view, set())
            stale = [i for i in self._generations(alias) if i not in keep]
            if stale:
                self._client.indices.delete(index=",".join(stale), ignore_unavailable=True)
        return stale

    def begin_generation(self, view: str, version: int) -> str:
        """Create (or reuse) index ``alias-g<version hex>`` for a load at ``version`` (int LSN)
        and return its name as the generation id."""
        alias = self._alias(view)
        with self._errors(f"begin_generation {view}"):
            if not self._client.indices.exists_alias(name=alias):
                self._refuse_legacy(alias)
        index = generation_index(alias, version)
        self._create_index(index, view, loading=True)
        self._loading[view].add(index)
        return index

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> list[Rejected]:
        """Write snapshot Ops into the generation index only; returns the refused Ops. Raises
        :class:`SinkError`."""
        for op in ops:
            if op.view != view:
                raise SinkError(
                    f"sink {self.name}: load into {view!r} got an Op of view {op.view!r}",
                    retryable=False,
                )
        return self._write(view, [generation], ops)

    def wire_select(self, view: str, fields: Sequence[str], version: int,
                    types: Sequence[str], *, generation: str | None = None,
                    live: bool = False) -> sql.Composable:
        """The SELECT list of a wire load (:mod:`pgderive.runtime.wire`) of ``view`` at ``version`` (int
        LSN) into its generation index (begun by :meth:`begin_generation`).

        It reads the inner query's ``k`` (the document ``_id``, never NULL) and ``f0``, ``f1``,
        .. (the text of output field ``fields[i]``, whose column has type ``types[i]``; NULL for
        SQL NULL) and yields two ``bytea`` columns per row: the ``_bulk`` lines :meth:`load`
        would send for the row's Op (the ``index`` action with ``version``/``external_gte``,
        newline, the document, newline) and an empty value. In the document, a field is a bare
        JSON number or boolean where the model value is an ``int``/``bool``
        (:func:`cdc.values.json_bare`), else a JSON string made by Postgres' ``to_json``; SQL
        NULL is ``null``. The bytes may differ from orjson's (escapes), the parsed document
        does not. ``generation``: the index to load (default: the one named by ``version``);
        ``live`` changes nothing: every action carries the external version, so a concurrent
        newer write wins. Raises :class:`SinkError`.
        """
        index = generation or generation_index(self._alias(view), version)
        head = _action_head("index", index).decode()
        tail = (b',"version":%d' % version + _ACTION_TAIL).decode() + "\n{"
        pieces: list[sql.Composable] = [sql.Literal(head), sql.SQL("to_json(k)::text"), sql.Literal(tail)]
        for i, (name, type_name) in enumerate(zip(fields, types)):
            col = sql.Identifier(f"f{i}")
            value = col if json_bare(type_name) else sql.SQL("to_json({})::text").format(col)
            label = ("," if i else "") + orjson.dumps(name).decode() + ":"
            pieces += [sql.Literal(label), sql.SQL("coalesce({}, 'null')").format(value)]
        pieces.append(sql.Literal("}\n"))
        return sql.SQL("convert_to({}, 'UTF8'), ''::bytea").format(sql.SQL(" || ").join(pieces))

    def wire_load(self, view: str, chunks: Iterable[Sequence[tuple[bytes, bytes]]]) -> int:
        """Relay a wire load of ``view``: ``chunks`` yields lists of the rows
        :meth:`wire_select`'s SELECT list returns; they are sent as ``_bulk`` requests of at
        most ``bulk_docs`` actions / about ``bulk_bytes`` bytes, ``bulk_concurrency`` at once.
        Returns the number of documents once OpenSearch acknowledged all of them.

        Raises :class:`SinkError`: retryable for connection failures, HTTP 429/5xx and items
        failed so; ``retryable=False`` for any refused document (e.g. a mapping conflict) or a
        request refused as too large, after which the caller loads the view through
        :meth:`load`, which reports such documents one by one. Every action carries the same
        external version, so the whole load may be repeated.
        """
        lines = ((line, len(line)) for chunk in chunks for line, _ in chunk)
        return sum(self._in_flight(lambda request: self._wire_send(view, request), self._requests(lines)))

    def _wire_send(self, view: str, lines: list[bytes]) -> int:
        """One ``_bulk`` request of a wire load; returns its number of documents, raises
        :class:`SinkError` for any failed item (see :meth:`wire_load`)."""
        with self._errors(f"wire_load of {view}"):
            resp = self._client.bulk(body=b"".join(lines), filter_path=_BULK_FILTER)
        failed = [(key, index, status, reason) for _, status, key, index, reason in _bulk_failures(resp)]
        if failed:
            raise self._failure(f"wire_load of {view}", failed)
        return len(lines)

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Move the alias to ``generation`` in one ``_aliases`` call, restore the default delete
        tombstone retention on it, then delete every other generation index of the view except
        those this instance follows for an online rebuild (:meth:`follow_generation`)."""
        alias = self._alias(view)
        with self._errors(f"commit_generation {view}"):
            current = self._alias_indices(alias)
            actions: list[dict[str, Any]] = [
                {"remove": {"index": i, "alias": alias}} for i in current if i != generation
            ]
            actions.append({"add": {"index": generation, "alias": alias}})
            self._client.indices.update_aliases(body={"actions": actions})
            self._has_alias.add(view)
            self._loading[view].discard(generation)
            self._exclusive.discard(view)
            self._client.indices.put_settings(
                index=generation, body={"index": {"gc_deletes": None}}
            )
            # Other generations being loaded by this instance (an online rebuild's, followed
            # by the stream) stay: a TRUNCATE meanwhile makes that rebuild start over.
            stale = [i for i in self._generations(alias) if i != generation and i not in self._loading[view]]
            if stale:
                self._client.indices.delete(index=",".join(stale), ignore_unavailable=True)

    def truncate(self, view: str, version: int) -> None:
        """Empty ``view`` as of a TRUNCATE committed at ``version`` (int LSN): a new empty
        generation ``alias-g<version+1>`` becomes live and every older one is deleted, so Ops of
        the same transaction that came before the TRUNCATE are gone too. On a replay the
        generation may exist already (holding rows written after the TRUNCATE and replayed
        older ones): it is recreated empty, and the later Ops of the replay fill it again."""
        alias = self._alias(view)
        index = generation_index(alias, version + 1)
        with self._errors(f"truncate {view}"):
            if self._client.indices.exists(index=index):
                self._client.indices.delete(index=index)
        self._create_index(index, view, loading=False)
        self.commit_generation(view, index, version + 1)

    def truncate_below(self, view: str, version: int) -> None:
        """Delete every document of ``view`` stored at a version < ``version`` (int LSN)
        (:class:`~sinks.base.TruncatesBelow`): after a refresh, a scroll of ``(_id,
        _version)`` behind the alias, then versioned deletes at ``version - 1``
        (``external_gte``: a document rewritten at ``version`` or later meanwhile conflicts and
        stays). The delete leaves a tombstone for ``index.gc_deletes`` (60 s), so an older write
        arriving meanwhile is refused. Unlike :meth:`truncate` no index is replaced, so writes
        of other workers at or above ``version`` are never lost."""
        self.refresh(view)
        stale = [Op(view, key, version - 1, None) for key, ver in self.scan_keys(view)
                 if ver is not None and ver < version]
        if stale:
            rejected = self.apply(stale)
            if rejected:
                raise SinkError(f"truncate of {view} below {version:#x}: {len(rejected)} deletes refused "
                                f"({rejected[0].error})", retryable=True)

    def scan(self, view: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(_id, _source)`` for every document behind the alias (nothing if none)."""
        alias = self._alias(view)
        with self._errors(f"scan {view}"):
            if not self._client.indices.exists_alias(name=alias):
                return
            for hit in helpers.scan(
                self._client, index=alias, query={"query": {"match_all": {}}}, size=1000
            ):
                yield hit["_id"], hit["_source"]

    def get(self, view: str, keys: Sequence[str], *,
            realtime: bool = True) -> dict[str, tuple[dict[str, Any] | None, int | None]]:
        """``key -> (_source | None, _version | None)`` for every key of ``keys``.

        ``realtime`` (default): ``mget`` on the alias (``bulk_docs`` ids per request), which
        sees every acknowledged write. ``realtime=False``: an ``ids`` search (2,500 ids per
        request), about 3x cheaper for the node but only showing writes up to the last refresh
        (``verify`` re-reads what differs in realtime). A missing document gives ``(None,
        None)``: OpenSearch does not return the version of a deleted document (it keeps it only
        ``index.gc_deletes``, 60 s by default, for conflict checks). All keys are missing when
        the view has no alias yet. Raises :class:`SinkError`."""
        alias = self._alias(view)
        keys = list(keys)
        out: dict[str, tuple[dict[str, Any] | None, int | None]] = {k: (None, None) for k in keys}
        if not keys:
            return out
        with self._errors(f"get {view}"):
            if view not in self._has_alias:
                if not self._client.indices.exists_alias(name=alias):
                    return out
                self._has_alias.add(view)
            if realtime:
                for i in range(0, len(keys), self.bulk_docs):
                    resp = self._client.mget(index=alias, body={"ids": keys[i : i + self.bulk_docs]},
                                             realtime="true", filter_path=_MGET_FILTER)
                    for d in resp.get("docs", []):
                        if d.get("found"):
                            out[d["_id"]] = (d.get("_source", {}), d.get("_version"))
            else:
                for i in range(0, len(keys), _IDS_PER_SEARCH):
                    batch = keys[i : i + _IDS_PER_SEARCH]
                    resp = self._client.search(
                        index=alias, filter_path=_IDS_FILTER,
                        body={"query": {"ids": {"values": batch}}, "size": len(batch),
                              "version": True, "track_total_hits": False})
                    for h in resp.get("hits", {}).get("hits", []):
                        out[h["_id"]] = (h.get("_source", {}), h.get("_version"))
        return out

    def locate(self, view: str, keys: Sequence[str]) -> dict[str, str]:
        """``_id → index`` of the documents of ``keys`` found behind the view's alias (a
        realtime ``mget`` returning only ``_index``): the generation each was written under
        (:class:`~sinks.base.Locates`). Nothing when the view has no alias yet. Raises
        :class:`SinkError`."""
        alias = self._alias(view)
        keys = list(keys)
        out: dict[str, str] = {}
        if not keys:
            return out
        with self._errors(f"locate {view}"):
            if not self._client.indices.exists_alias(name=alias):
                return out
            for i in range(0, len(keys), self.bulk_docs):
                resp = self._client.mget(index=alias, body={"ids": keys[i : i + self.bulk_docs]},
                                         realtime="true", _source="false",
                                         filter_path="docs._id,docs.found,docs._index")
                for d in resp.get("docs", []):
                    if d.get("found"):
                        out[d["_id"]] = str(d["_index"])
        return out

    def scan_keys(self, view: str) -> Iterator[tuple[str, int | None]]:
        """Yield ``(_id, _version)`` of every document behind the alias (a scroll without
        ``_source``; sees writes up to the last refresh). Nothing if there is no alias. Raises
        :class:`SinkError`."""
        alias = self._alias(view)
        with self._errors(f"scan_keys {view}"):
            if not self._client.indices.exists_alias(name=alias):
                return
            for hit in helpers.scan(self._client, index=alias, size=5000,
                                    query={"query": {"match_all": {}}, "_source": False, "version": True}):
                yield hit["_id"], hit.get("_version")

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` as :meth:`scan` returns it: the ``_source`` JSON round trip."""
        same: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return same

    def count(self, view: str) -> int:
        """Number of documents behind the alias, after a refresh (0 if there is no alias)."""
        alias = self._alias(view)
        with self._errors(f"count {view}"):
            if not self._client.indices.exists_alias(name=alias):
                return 0
            self._client.indices.refresh(index=alias)
            return int(self._client.count(index=alias)["count"])

    def refresh(self, view: str) -> None:
        """Make every acknowledged write of ``view`` visible to search (alias and generations
        being loaded)."""
        alias = self._alias(view)
        with self._errors(f"refresh {view}"):
            names = [*self._alias_indices(alias), *self._loading.get(view, ())]
            if names:
                self._client.indices.refresh(index=",".join(sorted(set(names))))

    def write_checkpoint(self, views: Sequence[str], lsn: int) -> None:
        """Raise the checkpoint of each of ``views`` to ``lsn`` (int LSN, < 2**63) in one
        ``_bulk`` request without refresh; a checkpoint at or past ``lsn`` is kept (409).
        Creates :attr:`checkpoint_index` on first use. Raises :class:`SinkError`."""
        if not views:
            return
        self._ensure_checkpoint_index()
        source = orjson.dumps({"lsn": lsn})
        lines: list[bytes] = []
        for view in views:
            meta = {"_index": self.checkpoint_index, "_id": self._cid(view), "version": lsn,
                    "version_type": "external"}
            lines += (orjson.dumps({"index": meta}), source)
        with self._errors("write_checkpoint"):
            resp = self._client.bulk(body=b"\n".join(lines) + b"\n", refresh="false",
                                     filter_path=_BULK_FILTER)
        for item in resp.get("items", []) if resp.get("errors") else []:
            (result,) = item.values()
            status = int(result.get("status", 0))
            if status >= 300 and status != 409:  # 409: already at or past lsn
                raise SinkError(f"sink {self.name}: write_checkpoint {result.get('_id')}: "
                                f"{result.get('error')}", retryable=status == 429 or status >= 500)

    def advance_checkpoint(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        """Move the checkpoints of ``views`` from at least ``previous`` to ``lsn`` (int LSNs):
        one realtime ``mget``, then :meth:`write_checkpoint` for the views still at or past
        ``previous``. Returns the views whose checkpoint was missing or behind (the cluster
        lost data it had acknowledged), which are not written. Raises :class:`SinkError`."""
        if not views:
            return []
        self._ensure_checkpoint_index()
        with self._errors("advance_checkpoint"):
            resp = self._client.mget(index=self.checkpoint_index,
                                     body={"ids": [self._cid(v) for v in views]}, realtime=True)
        lost = [view for view, d in zip(views, resp.get("docs", []))
                if not d.get("found") or int(d["_source"]["lsn"]) < previous]
        self.write_checkpoint([v for v in views if v not in lost], lsn)
        return lost

    def read_checkpoint(self, view: str) -> int | None:
        """The checkpoint LSN (int) of ``view`` by a realtime GET, or None if there is none.
        Raises :class:`SinkError`."""
        with self._errors("read_checkpoint"):  # 404: no such document, or no index yet
            doc = self._client.get(index=self.checkpoint_index, id=self._cid(view), _source_includes="lsn",
                                   ignore=404)
        return int(doc["_source"]["lsn"]) if doc.get("found") else None

    def drop_view(self, view: str) -> None:
        """Delete the alias' indices and every generation index of the view (never a legacy
        concrete index named like the alias), and its checkpoint."""
        alias = self._alias(view)
        with self._errors(f"drop_view {view}"):
            names = set(self._alias_indices(alias)) | set(self._generations(alias))
            if names:
                self._client.indices.delete(index=",".join(sorted(names)), ignore_unavailable=True)
            self._client.delete(index=self.checkpoint_index, id=self._cid(view), refresh="false", ignore=404)
        self._has_alias.discard(view)
        self._loading.pop(view, None)
        self._exclusive.discard(view)

    def close(self) -> None:
        """Close the HTTP connections."""
        if self._senders is not None:
            self._senders.shutdown(wait=True)
            self._senders = None
        self._client.close()

    def adopt_legacy(self, views: Sequence[str]) -> list[str]:
        """Move the checkpoint documents of ``views`` written before namespacing (index
        :data:`CHECKPOINT_INDEX`, ``_id`` = view) to this deployment's (:attr:`checkpoint_index`,
        ``_id`` = :func:`checkpoint_id`): read old, write new (external version = the LSN, so
        a repeat is harmless), then delete old. A view that already has its new document is
        left alone and so is its legacy one (another deployment sharing the cluster may adopt
        it), unless both hold the same LSN (a previous adoption interrupted before the delete).
        Returns the views adopted. Nothing to do without a deployment. Raises
        :class:`SinkError`."""
        if self.deployment is None or not views:
            return []
        views = list(views)
        with self._errors("adopt legacy checkpoints"):
            if not self._client.indices.exists(index=CHECKPOINT_INDEX):
                return []
            old = self._client.mget(index=CHECKPOINT_INDEX, body={"ids": views}, realtime=True)
            found = {v: int(d["_source"]["lsn"]) for v, d in zip(views, old.get("docs", [])) if d.get("found")}
            if not found:
                return []
            current = {v: self.read_checkpoint(v) for v in found}
        adopted: list[str] = []
        for view, lsn in found.items():
            now = current[view]
            if now is None:
                self.write_checkpoint([view], lsn)
                adopted.append(view)
            elif now != lsn:
                continue
            with self._errors("adopt legacy checkpoints"):
                self._client.delete(index=CHECKPOINT_INDEX, id=view, refresh="false", ignore=404)
        return adopted

    def claim(self, views: Sequence[str]) -> None:
        """Refuse views whose alias serves another deployment: the indices behind it carry
        their deployment in the mapping's ``_meta`` (written by pgderive when it creates a
        generation; indices without it, e.g. from before namespacing, claim nothing). One
        ``get_mapping`` per view with an alias. Raises :class:`SinkError` (``retryable=False``
        for a conflict, naming the other deployment and what to do)."""
        if self.deployment is None:
            return
        for view in views:
            alias = self._alias(view)
            with self._errors(f"claim {view}"):
                if not self._client.indices.exists_alias(name=alias):
                    continue
                found = self._client.indices.get_mapping(index=alias, filter_path=f"*.mappings._meta.{_META}")
            for index, entry in (found or {}).items():
                meta = entry.get("mappings", {}).get("_meta", {}).get(_META, {})
                other = meta.get("deployment")
                if other is not None and other != self.deployment:
                    raise SinkError(
                        f"sink {self.name}: view {view}: alias {alias!r} already serves deployment {other} "
                        f"(view {meta.get('view')}, index {index}); two deployments must not share an alias: "
                        f"change the view's index, or if {other} is retired, delete the alias' indices",
                        retryable=False)

    # --- internals ------------------------------------------------------------------------

    def _cid(self, view: str) -> str:
        """``_id`` of the checkpoint document of ``view`` (:func:`checkpoint_id`)."""
        return checkpoint_id(view, self.deployment)

    def _alias(self, view: str) -> str:
        try:
            return self._aliases[view]
        except KeyError:
            raise SinkError(
                f"sink {self.name}: view {view!r} is not registered", retryable=False
            ) from None

    def _ensure_alias(self, view: str, alias: str) -> None:
        """Give the view generation 0 and the alias if it has no alias yet."""
        if view in self._has_alias:
            return
        with self._errors(f"apply {view}"):
            if not self._client.indices.exists_alias(name=alias):
                self._refuse_legacy(alias)
                first = generation_index(alias, 0)
                self._create_index(first, view, loading=False)
                self._client.indices.update_aliases(
                    body={"actions": [{"add": {"index": first, "alias": alias}}]}
                )
        self._has_alias.add(view)

    def _refuse_legacy(self, alias: str) -> None:
        """Raise if ``alias`` (known not to be an alias) names a concrete index."""
        if self._client.indices.exists(index=alias):
            raise SinkError(
                f"sink {self.name}: {alias!r} is a concrete index, not an alias: a legacy index "
                "pgderive did not create. Rename or delete it (pgderive serves views through "
                f"an alias over generation indices {alias}-g<version>)",
                retryable=False,
            )

    def _create_index(self, index: str, view: str, *, loading: bool) -> None:
        """Create generation ``index`` of ``view`` (existing: kept), stamped with the deployment
        and view in its mapping's ``_meta`` (read by :meth:`claim`)."""
        settings = dict(_GEN_SETTINGS)
        if loading:
            settings["gc_deletes"] = LOAD_GC_DELETES
        body: dict[str, Any] = {"settings": {"index": settings}}
        if self.deployment is not None:
            body["mappings"] = {"_meta": {_META: {"deployment": self.deployment, "view": view}}}
        with self._errors(f"create index {index}"):
            try:
                self._client.indices.create(index=index, body=body)
            except ox.RequestError as e:
                if e.error != "resource_already_exists_exception":
                    raise

    def _alias_indices(self, alias: str) -> list[str]:
        """The indices behind ``alias``; none before a view's first commit (asked with
        ``ignore=404``: the client neither raises nor logs a warning, and the 404 body,
        ``{"error": str, "status": 404}``, holds no index entry)."""
        found = self._client.indices.get_alias(name=alias, ignore=404)
        return sorted(i for i, entry in found.items() if isinstance(entry, dict))

    def _generations(self, alias: str) -> list[str]:
        found = self._client.indices.get(
            index=f"{alias}-g*", expand_wildcards="open,closed", filter_path="*.settings.index.uuid"
        )
        return sorted(i for i in (found or {}) if _is_generation_of(alias, i))

    def _ensure_checkpoint_index(self) -> None:
        if self._checkpoint_index_ready:
            return
        with self._errors(f"create index {self.checkpoint_index}"):
            # Looked up first: a refused create is logged by the client as a warning.
            if not self._client.indices.exists(index=self.checkpoint_index):
                try:
                    self._client.indices.create(index=self.checkpoint_index, body=_CHECKPOINT_BODY)
                except ox.RequestError as e:
                    if e.error != "resource_already_exists_exception":
                        raise
        self._checkpoint_index_ready = True

    def _write(self, view: str, indices: list[str], ops: Sequence[Op]) -> list[Rejected]:
        """Write ``ops`` to each of ``indices``: full Ops and deletes first, then partial Ops
        merged by :meth:`_merge`. Returns the refused Ops."""
        full = [op for op in ops if not op.partial or op.doc is None]
        rejected = self._bulk(view, indices, full)
        if len(full) < len(ops):
            partial = [op for op in ops if op.partial and op.doc is not None]
            merged, origin = self._merge(view, indices, partial, rejected)
            for r in self._bulk(view, indices, merged):
                rejected.append(Rejected(origin[id(r.op)], r.error))
        return rejected

    def _merge(self, view: str, indices: list[str], ops: list[Op],
               rejected: list[Rejected]) -> tuple[list[Op], dict[int, Op]]:
        """Read-modify-write step for partial Ops: ``mget`` (realtime, ``bulk_docs`` keys per
        request) each key from every index in ``indices``, take the copy with the highest
        version, merge the key's partial docs in version order (skipping those not newer) and
        return one full upsert per key, plus ``id(upsert) -> last merged partial Op`` to report
        a rejection. Appends unencodable partial docs to ``rejected``. Raises
        :class:`SinkError`."""
        by_key: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_key[op.key].append(op)
        keys = list(by_key)
        base: dict[str, tuple[int, dict[str, Any]]] = {}
        for i in range(0, len(keys), self.bulk_docs):
            chunk = keys[i : i + self.bulk_docs]
            docs = [{"_index": ix, "_id": k} for k in chunk for ix in indices]
            with self._errors(f"apply {view} (read for partial update)"):
                resp = self._client.mget(body={"docs": docs}, realtime="true",
                                         filter_path=_MGET_FILTER)
            for d in resp.get("docs", []):
                if d.get("found") and d["_version"] > base.get(d["_id"], (-1,))[0]:
                    base[d["_id"]] = (d["_version"], d["_source"])
        out: list[Op] = []
        origin: dict[int, Op] = {}
        for key in keys:
            if key not in base:
                self.stats["partial_missed"] += len(by_key[key])
                continue
            ver, doc = base[key]
            last: Op | None = None
            for op in sorted(by_key[key], key=lambda o: o.version):
                if op.version >= ver:
                    try:
                        orjson.dumps(op.doc)
                    except TypeError as e:
                        rejected.append(Rejected(op, f"partial update: not JSON-encodable: {e}"))
                        continue
                    doc.update(op.doc or {})
                    ver, last = op.version, op
            if last is not None:
                merged = Op(view, key, ver, doc)
                origin[id(merged)] = last
                out.append(merged)
        return out, origin

    def _bulk(self, view: str, indices: list[str], ops: Sequence[Op]) -> list[Rejected]:
        """Send ``ops`` as index/delete actions to each of ``indices`` in requests of at most
        ``bulk_docs`` actions and about ``bulk_bytes`` bytes; return the refused Ops (each once)."""
        rejected: list[Rejected] = []
        for refused in self._in_flight(lambda actions: self._send(view, actions),
                                       self._requests(self._actions(indices, ops, rejected))):
            rejected += refused
        if len(indices) > 1:  # an Op refused by several indices is reported once
            rejected = list({id(r.op): r for r in reversed(rejected)}.values())[::-1]
        return rejected

    def _in_flight(self, send: Callable[[Any], Any], requests: Iterable[Any]) -> Iterator[Any]:
        """Call ``send`` on each of ``requests`` with up to ``bulk_concurrency`` calls running
        at once (on the sink's sender threads); yields their results in request order. A failed
        call raises here, but only once none of the calls is still running (a retry of the
        caller must not race with them)."""
        requests = iter(requests)
        first = next(requests, None)
        if first is None:
            return
        second = next(requests, None)
        if self.bulk_concurrency == 1 or second is None:
            # One request (the small batches of a stream) is sent on the calling thread: a
            # sender thread would only add two thread switches (and GIL hand-offs).
            yield send(first)
            if second is not None:
                yield send(second)
                for request in requests:
                    yield send(request)
            return
        requests = itertools.chain((first, second), requests)
        with self._senders_lock:
            if self._senders is None:
                self._senders = ThreadPoolExecutor(self.bulk_concurrency, thread_name_prefix=f"pgderive-{self.name}")
            senders = self._senders
        pending: deque[Future[Any]] = deque()
        try:
            for request in requests:
                while len(pending) >= self.bulk_concurrency:
                    yield pending.popleft().result()
                pending.append(senders.submit(send, request))
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.exception()

    def _requests(self, items: Iterable[tuple[Any, int]]) -> Iterator[list[Any]]:
        """Cut ``(item, bytes)`` pairs into ``_bulk`` requests: lists of at most ``bulk_docs``
        items and about ``bulk_bytes`` bytes (a single larger item goes alone)."""
        batch: list[Any] = []
        size = 0
        for item, n in items:
            if batch and size + n > self.bulk_bytes:
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += n
            if len(batch) >= self.bulk_docs:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _actions(self, indices: list[str], ops: Sequence[Op], rejected: list[Rejected]) -> Iterator[tuple[_Action, int]]:
        """``(action, bytes)`` for every Op and index; Ops whose document cannot be encoded go
        to ``rejected``."""
        # The action line is {"ACTION":{"_index":INDEX,"_id":ID,"version":N,"version_type":
        # "external_gte"}}: only the id and the version vary, so the rest is encoded once.
        heads = {(a, i): _action_head(a, i) for a in ("index", "delete") for i in indices}
        for op in ops:
            source: bytes | None = None
            if op.doc is not None:
                try:
                    source = orjson.dumps(op.doc)
                except TypeError as e:
                    rejected.append(Rejected(op, f"not JSON-encodable: {e}"))
                    continue
            action = "delete" if source is None else "index"
            ident = orjson.dumps(op.key) + b',"version":%d' % op.version + _ACTION_TAIL
            for index in indices:
                meta = heads[action, index] + ident
                yield (op, meta, source), len(meta) + (len(source) + 2 if source is not None else 1)

    def _send(self, view: str, actions: list[_Action]) -> list[Rejected]:
        """One ``_bulk`` request; returns the items refused for data reasons, raises
        :class:`SinkError` for any other failed item. A request refused as too large (413) is
        split in halves; a single action refused so is rejected."""
        parts: list[bytes] = []
        for _, meta, source in actions:
            parts += (meta, b"\n") if source is None else (meta, b"\n", source, b"\n")
        with self._errors(f"apply {view}"):
            try:
                resp = self._client.bulk(body=b"".join(parts), filter_path=_BULK_FILTER)
            except ox.TransportError as e:
                if e.status_code != 413:
                    raise
                resp = None
        if resp is None:
            if len(actions) == 1:
                return [Rejected(actions[0][0], "document too large: HTTP 413 (the request "
                                 "exceeds the server's http.max_content_length)")]
            half = len(actions) // 2
            return self._send(view, actions[:half]) + self._send(view, actions[half:])
        rejected: list[Rejected] = []
        failed: list[tuple[str, str, int, str]] = []
        for pos, status, _, index, reason in _bulk_failures(resp):
            op = actions[pos][0]
            if status in _REJECT_STATUS:
                rejected.append(Rejected(op, f"index {index}: {reason}"))
            else:
                failed.append((op.key, index, status, reason))
        if failed:
            raise self._failure(f"view {view}", failed)
        return rejected

    def _failure(self, what: str, failed: list[tuple[str, str, int, str]]) -> SinkError:
        """The error for ``_bulk`` items that failed for other than data reasons (``failed``:
        ``(key, index, status, reason)``); retryable when every status is 429 or 5xx."""
        shown = "; ".join(f"key {k} (index {i}): {r}" for k, i, _, r in failed[:_MAX_REPORTED])
        more = f" (+{len(failed) - _MAX_REPORTED} more)" if len(failed) > _MAX_REPORTED else ""
        return SinkError(f"sink {self.name}: {what}: {len(failed)} document(s) failed: {shown}{more}",
                         retryable=all(s == 429 or s >= 500 for _, _, s, _ in failed))

    def _errors(self, what: str) -> "_ErrorMap":
        return _ErrorMap(self.name, what)


class _ErrorMap:
    """Context manager translating opensearch-py exceptions into :class:`SinkError`."""

    def __init__(self, sink: str, what: str) -> None:
        self.prefix = f"sink {sink}: {what}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if e is None or isinstance(e, SinkError):
            return False
        reason = tls_verify_failure(e)
        if reason is not None and isinstance(e, ox.ConnectionError):
            raise SinkError(f"{self.prefix}: TLS certificate verification failed ({reason}): check "
                            "ca_certs and the host names in hosts", retryable=False) from e
        if isinstance(e, ox.ConnectionError):  # includes timeouts
            raise SinkError(f"{self.prefix}: OpenSearch unavailable: {e}", retryable=True) from e
        if isinstance(e, ox.TransportError):
            status = e.status_code
            retryable = not isinstance(status, int) or status == 429 or status >= 500
            raise SinkError(
                f"{self.prefix}: OpenSearch error {status}: {e.error}: {_reason(e)}",
                retryable=retryable,
            ) from e
        if isinstance(e, (ox.OpenSearchException, helpers.ScanError)):
            raise SinkError(f"{self.prefix}: {e}", retryable=True) from e
        return False


def _cause(e: Any) -> str:
    """The innermost reason of an opensearch-py ``ConnectionError`` (e.g. ``[Errno 111]
    Connection refused``), without the client's object reprs."""
    info = getattr(e, "info", None)
    text = str(info if isinstance(info, BaseException) else e)
    marker = "Failed to establish a new connection: "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.split(")", 1)[0] if text.startswith("[Errno") else text


def _reason(e: Any) -> str:
    info = e.info if isinstance(e.info, dict) else {}
    err = info.get("error")
    if isinstance(err, dict):
        return str(err.get("reason", ""))
    return str(info or "")


if TYPE_CHECKING:
    def _implements(sink: OpenSearchSink) -> tuple[Sink, WireLoad, Refreshable, ReservedNames, LegacyLayout,
                                                   Claims, LiveGenerations, Locates, TruncatesBelow]:
        """Never called: mypy checks here that OpenSearchSink implements these protocols."""
        return sink, sink, sink, sink, sink, sink, sink, sink, sink
