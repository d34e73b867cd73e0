"""Redis and OpenSearch side of the benchmark: clean-up by prefix and the raw ``_bulk`` loader.

The raw loader is the OpenSearch baseline: opensearch-py's ``helpers.parallel_bulk`` writing
plain ``index`` actions (no versions, no checkpoints) of documents prepared in memory beforehand,
in requests of the same size and concurrency pgderive uses (2,000 actions / 16 MiB, 2 requests
in flight), into a scratch index with
the settings of pgderive's generation indices (1 shard, 0 replicas, refresh 1 s). Its client
serializes with orjson (:class:`OrjsonSerializer`) like pgderive does: with the default stdlib
``json`` serializer the loader is about 25 % slower on this kind of machine, which would flatter
pgderive.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from typing import Any, Iterable, Iterator

import orjson
import redis
from opensearchpy import OpenSearch, helpers
from opensearchpy.serializer import JSONSerializer

from .settings import Settings

__all__ = ["settle_redis", "settle_opensearch", "redis_pipe_load", "redis_client", "opensearch_client", "clean_redis", "clean_opensearch", "bulk_load",
           "create_scratch_index", "clone_index", "alias_index"]

# Same as sinks/opensearch.py's generation indices, so the baseline writes into the same kind of index.
SCRATCH_SETTINGS = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"}
CHECKPOINT_INDEX = "pgderive-checkpoints"  # sinks.opensearch.CHECKPOINT_INDEX
BULK_DOCS = 2000  # sinks.opensearch.OpenSearchSink default bulk_docs
BULK_BYTES = 16 << 20  # ... and bulk_bytes
BULK_CONCURRENCY = 2  # ... and bulk_concurrency


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client for the benchmark's server."""
    return redis.Redis.from_url(settings.redis_url)


class OrjsonSerializer(JSONSerializer):
    """opensearch-py serializer using orjson (strings pass through, as in the default one)."""

    def dumps(self, data: Any) -> str:
        if isinstance(data, str):
            return data
        return orjson.dumps(data).decode()


def settle_redis(settings: Settings, timeout: float = 120.0) -> None:
    """Rewrite Redis' append-only file now and wait for it (``BGREWRITEAOF``), so that the
    rewrite the previous bulk load or clean-up earned does not fork Redis (blocking it for tens
    of ms) inside a latency measurement. Without AOF it does nothing."""
    r = redis_client(settings)
    if r.config_get("appendonly").get("appendonly") != "yes":
        return
    deadline = time.monotonic() + timeout
    while r.info("persistence").get("aof_rewrite_in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        r.bgrewriteaof()
    except redis.ResponseError:  # one already scheduled
        pass
    time.sleep(0.2)
    while time.monotonic() < deadline:
        info = r.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.1)


def redis_pipe_load(settings: Settings, records: Iterable[tuple[str, dict[str, Any]]],
                    versions: str | None = None) -> tuple[int, float]:
    """The Redis baseline: ``redis-cli --pipe`` (Redis' own mass-insertion tool) sending one
    ``HSET key field value ..`` per record, the RESP written to a file beforehand (untimed).
    No compare-and-set: what it costs Redis itself to take these records on this machine.
    With ``versions`` (a hash key), also what pgderive's layout adds: each record's version
    entry in that hash, one ``HSET`` per 7,000 records (a wire load's ~1 MiB chunk). Returns
    ``(records, seconds)``; raises ``RuntimeError`` if Redis refused any command."""
    def arg(v: Any) -> bytes:
        raw = str(v).encode()
        return b"$%d\r\n%s\r\n" % (len(raw), raw)
    n = commands = 0
    entries: list[bytes] = []

    def flush_entries(f: Any) -> None:
        nonlocal commands
        if entries:
            f.write(b"*%d\r\n$4\r\nHSET\r\n" % (2 + len(entries)) + arg(versions) + b"".join(entries))
            entries.clear()
            commands += 1

    with tempfile.NamedTemporaryFile(prefix="pgdbench-resp-", suffix=".bin") as f:
        for key, doc in records:
            f.write(b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(doc)) + arg(key)
                    + b"".join(arg(k) + arg(v) for k, v in doc.items()))
            n += 1
            commands += 1
            if versions is not None:
                entries += (arg(key), arg("00000000075bcd15"))
                if len(entries) >= 14_000:
                    flush_entries(f)
        flush_entries(f)
        f.flush()
        f.seek(0)
        t0 = time.monotonic()
        out = subprocess.run(["redis-cli", "-u", settings.redis_url, "--pipe"], stdin=f,
                             capture_output=True, text=True, check=True)
        secs = time.monotonic() - t0
    m = re.search(r"errors: (\d+), replies: (\d+)", out.stdout)
    if not m or int(m.group(1)) or int(m.group(2)) != commands:
        raise RuntimeError(f"redis-cli --pipe: {out.stdout.strip()} {out.stderr.strip()}")
    return n, secs


def opensearch_client(settings: Settings) -> OpenSearch:
    """An OpenSearch client with a generous timeout (bulk loads of 1M documents) and the
    orjson serializer."""
    return OpenSearch(hosts=[settings.opensearch_url], timeout=120, serializer=OrjsonSerializer(),
                      pool_maxsize=BULK_CONCURRENCY + 2)  # as pgderive's sink: no reconnect per request


def clean_redis(r: redis.Redis, key_prefix: str, views: Iterable[str]) -> int:
    """Delete every key starting with ``key_prefix`` and pgderive's bookkeeping keys of
    ``views`` (``pgderive:<deployment>:<view>:*``, and the legacy ``pgderive:<view>:*``); returns
    the number of keys deleted."""
    deleted = 0
    patterns = [f"{key_prefix}*"] + [p for v in views for p in (f"pgderive:*:{v}:*", f"pgderive:{v}:*")]
    for pattern in patterns:
        batch: list[bytes] = []
        for key in r.scan_iter(match=pattern, count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += r.unlink(*batch)
                batch = []
        if batch:
            deleted += r.unlink(*batch)
    return deleted


def clean_opensearch(client: OpenSearch, index_prefix: str, views: Iterable[str]) -> None:
    """Delete every index named ``index_prefix*`` (pgderive's generations behind the aliases
    and scratch indices) and the checkpoint documents of ``views`` (``_id`` ``<deployment>:<view>``,
    or the legacy ``<view>``)."""
    client.indices.delete(index=f"{index_prefix}*", ignore=[404], expand_wildcards="all")
    if client.indices.exists(index=CHECKPOINT_INDEX):
        names = set(views)
        client.indices.refresh(index=CHECKPOINT_INDEX)
        hits = client.search(index=CHECKPOINT_INDEX, body={"query": {"match_all": {}}, "size": 10000,
                                                           "_source": False})["hits"]["hits"]
        for hit in hits:
            if hit["_id"] in names or hit["_id"].rsplit(":", 1)[-1] in names:
                client.delete(index=CHECKPOINT_INDEX, id=hit["_id"], ignore=[404])


def create_scratch_index(client: OpenSearch, index: str) -> None:
    """(Re)create ``index`` with the settings of pgderive's generation indices."""
    client.indices.delete(index=index, ignore=[404])
    client.indices.create(index=index, body={"settings": {"index": SCRATCH_SETTINGS}})


def alias_index(client: OpenSearch, alias: str) -> str:
    """The single index behind ``alias``."""
    names = sorted(client.indices.get_alias(name=alias))
    if len(names) != 1:
        raise RuntimeError(f"alias {alias} points at {names}, expected one index")
    return names[0]


def settle_opensearch(client: OpenSearch, timeout: float = 300.0) -> None:
    """Wait until no segment merge runs on any node (twice in a row, 0.2 s apart): a bulk load
    leaves merges running for seconds after its last request, which would take CPU from the
    next measurement (whichever of pgderive and the raw loader came second would gain)."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        stats = client.nodes.stats(metric="indices", index_metric="merge")
        running = sum(n["indices"]["merges"]["current"] for n in stats["nodes"].values())
        quiet = quiet + 1 if running == 0 else 0
        time.sleep(0.2)


def clone_index(client: OpenSearch, source: str, target: str) -> None:
    """Clone ``source`` into ``target`` (same documents and segments, hard-linked): the write
    block the clone API needs is set and lifted around it; waits until the clone is usable."""
    client.indices.delete(index=target, ignore=[404])
    client.indices.put_settings(index=source, body={"index.blocks.write": True})
    try:
        client.indices.clone(index=source, target=target, wait_for_active_shards=1,
                             body={"settings": {"index.blocks.write": None, "index.number_of_replicas": 0}})
    finally:
        client.indices.put_settings(index=source, body={"index.blocks.write": None})
    client.cluster.health(index=target, wait_for_status="green")


def bulk_load(client: OpenSearch, index: str, docs: Iterable[tuple[Any, dict[str, Any]]]) -> tuple[int, float]:
    """Write ``(id, source)`` pairs to ``index`` as plain index actions with
    ``helpers.parallel_bulk`` (``BULK_DOCS`` actions / ``BULK_BYTES`` per request,
    ``BULK_CONCURRENCY`` requests in flight); raises on any failed item. Returns
    ``(documents, seconds)``."""

    def actions() -> Iterator[dict[str, Any]]:
        for _id, source in docs:
            yield {"_op_type": "index", "_index": index, "_id": _id, "_source": source}

    n = 0
    t0 = time.monotonic()
    for ok, item in helpers.parallel_bulk(client, actions(), thread_count=BULK_CONCURRENCY,
                                          chunk_size=BULK_DOCS, max_chunk_bytes=BULK_BYTES,
                                          raise_on_error=True, request_timeout=120):
        n += 1
    return n, time.monotonic() - t0

