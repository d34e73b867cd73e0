"""OpenSearch sink: one cluster serving several views, idempotent by external versioning.

Layout of one view with alias ``A`` (``ViewTarget.index``, the name users query):

* generations are indices ``A-g<version>`` where ``<version>`` is :func:`cdc.lsn.version_hex`
  of the generation's consistent point (16 lowercase hex digits), e.g. ``branches-g00000000016b3748``;
  settings: 1 shard, 0 replicas, ``refresh_interval`` 1s.
* the alias ``A`` points at exactly one generation, the live one. A view written before any
  generation was committed gets ``A-g0000000000000000`` and the alias on its first write.

Every index/delete action carries ``version=op.version, version_type=external``: OpenSearch
keeps the greater version, and answers 409 (version conflict) to an older or equal one, which
counts as success; deleting a missing document (404) is success too. A generation being loaded
keeps delete tombstones longer (``index.gc_deletes`` = :data:`LOAD_GC_DELETES`, reset to the
default when committed) so a snapshot row cannot resurrect a document deleted meanwhile.
While a generation begun by this sink instance is not committed yet, :meth:`OpenSearchSink.apply`
writes every Op to both the alias and that generation (DESIGN.md "Online rebuild").

Partial Ops are rejected: the ``update`` API does not support external versioning.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterator, Sequence

import orjson
from opensearchpy import OpenSearch, helpers
from opensearchpy import exceptions as ox

from cdc.lsn import version_hex
from sinks.base import Op, SinkError, ViewTarget

__all__ = ["OpenSearchSink", "generation_index", "LOAD_GC_DELETES"]

LOAD_GC_DELETES = "6h"
_GEN_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"}
_BULK_FILTER = "errors,items.*._id,items.*._index,items.*.status,items.*.error.type,items.*.error.reason"
_MAX_REPORTED = 3


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

    Every method raises :class:`SinkError`: ``retryable=True`` for connection failures, timeouts,
    HTTP 429/5xx and items rejected with 429/5xx; ``retryable=False`` for rejected documents
    (naming the view, key and OpenSearch's reason), partial Ops, unregistered views and an alias
    name taken by a concrete (legacy) index.
    """

    def __init__(self, name: str, hosts: list[str], *, bulk_docs: int = 2000) -> None:
        if bulk_docs < 1:
            raise ValueError("bulk_docs must be >= 1")
        self.name = name
        self.bulk_docs = bulk_docs
        self._client = OpenSearch(hosts, http_compress=False, timeout=60)
        self._targets: dict[str, ViewTarget] = {}
        self._has_alias: set[str] = set()  # views whose alias is known to exist
        self._loading: dict[str, set[str]] = defaultdict(set)  # view -> uncommitted generations

    # --- protocol -------------------------------------------------------------------------

    def register(self, target: ViewTarget) -> None:
        """Declare a view; ``target.index`` (the alias) is required."""
        if not target.index:
            raise ValueError(f"sink {self.name}: view {target.view}: no index (alias) given")
        self._targets[target.view] = target

    def apply(self, ops: Sequence[Op]) -> None:
        """Write ``ops`` (any views) to their aliases, plus to generations being loaded by this
        instance; return once OpenSearch acknowledged every action. Creates the first
        generation and the alias of a view that has none. Raises :class:`SinkError`."""
        by_view: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_view[op.view].append(op)
        for view, vops in by_view.items():
            alias = self._alias(view)
            self._ensure_alias(view, alias)
            self._bulk(view, [alias, *sorted(self._loading.get(view, ()))], vops)

    def begin_generation(self, view: str, version: int) -> str:
        """Create (or reuse) index ``alias-g<version hex>`` for a load at ``version`` (int LSN)
        and return its name as the generation id."""
        alias = self._alias(view)
        with self._errors(f"begin_generation {view}"):
            if not self._client.indices.exists_alias(name=alias):
                self._refuse_legacy(alias)
        index = generation_index(alias, version)
        self._create_index(index, loading=True)
        self._loading[view].add(index)
        return index

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> None:
        """Write snapshot Ops into the generation index only. Raises :class:`SinkError`."""
        for op in ops:
            if op.view != view:
                raise SinkError(
                    f"sink {self.name}: load into {view!r} got an Op of view {op.view!r}",
                    retryable=False,
                )
        self._bulk(view, [generation], ops)

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Move the alias to ``generation`` in one ``_aliases`` call, restore the default delete
        tombstone retention on it, then delete every other generation index of the view."""
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
            self._client.indices.put_settings(
                index=generation, body={"index": {"gc_deletes": None}}
            )
            stale = [i for i in self._generations(alias) if i != generation]
            for index in stale:
                self._loading[view].discard(index)
            if stale:
                self._client.indices.delete(index=",".join(stale), ignore_unavailable=True)

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

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` as :meth:`scan` returns it: the ``_source`` JSON round trip."""
        return orjson.loads(orjson.dumps(doc))

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

    def drop_view(self, view: str) -> None:
        """Delete the alias' indices and every generation index of the view (never a legacy
        concrete index named like the alias)."""
        alias = self._alias(view)
        with self._errors(f"drop_view {view}"):
            names = set(self._alias_indices(alias)) | set(self._generations(alias))
            if names:
                self._client.indices.delete(index=",".join(sorted(names)), ignore_unavailable=True)
        self._has_alias.discard(view)
        self._loading.pop(view, None)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # --- internals ------------------------------------------------------------------------

    def _alias(self, view: str) -> str:
        try:
            return self._targets[view].index  # type: ignore[return-value]
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
                self._create_index(first, loading=False)
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

    def _create_index(self, index: str, *, loading: bool) -> None:
        settings = dict(_GEN_SETTINGS)
        if loading:
            settings["gc_deletes"] = LOAD_GC_DELETES
        with self._errors(f"create index {index}"):
            try:
                self._client.indices.create(index=index, body={"settings": {"index": settings}})
            except ox.RequestError as e:
                if e.error != "resource_already_exists_exception":
                    raise

    def _alias_indices(self, alias: str) -> list[str]:
        try:
            return sorted(self._client.indices.get_alias(name=alias))
        except ox.NotFoundError:
            return []

    def _generations(self, alias: str) -> list[str]:
        found = self._client.indices.get(
            index=f"{alias}-g*", expand_wildcards="open,closed", filter_path="*.settings.index.uuid"
        )
        return sorted(i for i in (found or {}) if _is_generation_of(alias, i))

    def _bulk(self, view: str, indices: list[str], ops: Sequence[Op]) -> None:
        """Send ``ops`` as index/delete actions to each of ``indices``, ``bulk_docs`` actions
        per request, and check every item."""
        lines: list[bytes] = []
        keys: list[str] = []
        for op in ops:
            if op.partial:
                raise SinkError(
                    f"sink {self.name}: view {view}: key {op.key}: "
                    "partial updates not supported yet",
                    retryable=False,
                )
            if op.doc is not None:
                try:
                    source = orjson.dumps(op.doc)
                except TypeError as e:
                    raise SinkError(
                        f"sink {self.name}: view {view}: key {op.key}: not JSON-encodable: {e}",
                        retryable=False,
                    ) from e
            action = "delete" if op.doc is None else "index"
            for index in indices:
                meta = {"_index": index, "_id": op.key, "version": op.version,
                        "version_type": "external"}
                lines.append(orjson.dumps({action: meta}))
                if op.doc is not None:
                    lines.append(source)
                keys.append(op.key)
                if len(keys) >= self.bulk_docs:
                    self._send(view, lines, keys)
                    lines, keys = [], []
        if keys:
            self._send(view, lines, keys)

    def _send(self, view: str, lines: list[bytes], keys: list[str]) -> None:
        body = b"\n".join(lines) + b"\n"
        with self._errors(f"apply {view}"):
            resp = self._client.bulk(body=body, filter_path=_BULK_FILTER)
        if not resp.get("errors"):
            return
        failed: list[tuple[str, str, int, str]] = []
        for key, item in zip(keys, resp["items"]):
            (action, result), = item.items()
            status = int(result.get("status", 0))
            if status < 300 or status == 409 or (action == "delete" and status == 404):
                continue
            err = result.get("error") or {}
            reason = f"{err.get('type', status)}: {err.get('reason', '')}"
            failed.append((key, result.get("_index", "?"), status, reason))
        if not failed:
            return
        retryable = all(s == 429 or s >= 500 for _, _, s, _ in failed)
        shown = "; ".join(f"key {k} (index {i}): {r}" for k, i, _, r in failed[:_MAX_REPORTED])
        more = f" (+{len(failed) - _MAX_REPORTED} more)" if len(failed) > _MAX_REPORTED else ""
        raise SinkError(
            f"sink {self.name}: view {view}: {len(failed)} document(s) rejected: {shown}{more}",
            retryable=retryable,
        )

    def _errors(self, what: str) -> "_ErrorMap":
        return _ErrorMap(self.name, what)


class _ErrorMap:
    """Context manager translating opensearch-py exceptions into :class:`SinkError`."""

    def __init__(self, sink: str, what: str) -> None:
        self.prefix = f"sink {sink}: {what}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type | None, e: BaseException | None, tb: Any) -> bool:
        if e is None or isinstance(e, SinkError):
            return False
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


def _reason(e: Any) -> str:
    info = e.info if isinstance(e.info, dict) else {}
    err = info.get("error")
    if isinstance(err, dict):
        return str(err.get("reason", ""))
    return str(info or "")
