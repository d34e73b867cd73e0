"""Redis sink: one Redis database serving several views, idempotent by compare-and-set in Lua.

Layout of one view ``V``:

* record keys: the view's own keys (``Op.key``, e.g. ``account:42``). Format ``hash``: one Redis
  hash per record, one field per output field; format ``json``: one string holding the JSON doc.
* version hash ``pgderive:D:V:versions`` (``D`` = the deployment,
  :func:`cdc.catalog.deployment_id`, e.g. ``7716351362375133678:bench:pgderive_bench``; every
  key pgderive writes for itself carries it, so two deployments sharing a Redis database with
  same-named views keep separate state): record key → stored version, as
  :func:`cdc.lsn.version_hex` (16 lowercase hex digits). A **tombstone** (the record was deleted
  at that version) is the same 16 digits followed by ``"d"`` (17 characters). Tombstones keep an
  older upsert from resurrecting a deleted key; they are removed by :meth:`RedisSink.
  commit_generation` once older than the committed generation.

An Op applies when the key has no stored version or when ``op.version`` is greater than or
equal to the stored one (tombstones included). Equal versions come from one transaction (the
same commit LSN), which the engine always applies in order — a large transaction arrives in
several chunks that may touch one key twice — so the later one must win; a replay of the same
Op rewrites the same value.
Versions are compared in Lua numerically, falling back to two 32-bit halves when both round to
the same double (exact, and independent of the server's ``LC_COLLATE``, which Lua's string
comparison would use).

Each Lua call handles up to ``batch_size`` Ops of one view (one HMGET of their versions, the
record writes, one HSET of the new versions); all calls of one :meth:`RedisSink.apply` are
pipelined on one connection. Durability is Redis' own: an acknowledged write survives a Redis
crash only with ``appendonly yes`` and ``appendfsync always`` (``everysec`` may lose ~1 s).

Hash field values: ``str`` as is, ``int`` in decimal, ``float`` via ``repr``, ``bool`` as
``"true"``/``"false"``, ``dict``/``list`` as JSON, ``None`` → field absent. A full upsert replaces
the whole hash/JSON document.

Partial Ops (``Op.partial``) only apply to a live record: a partial Op for a missing or deleted
record is skipped (the cache must not hold an incomplete record) and counted in
``stats["partial_missed"]``. ``hash`` views: Lua sets the given fields and deletes those given as
``None``. ``json`` views: read-modify-write, relying on one writer per key (the daemon applies
batches one after the other): after the full Ops of the call are written, the current JSON and
version of the partial keys are read (one pipelined round trip), the partial docs are merged in
Python in version order (a ``None`` field becomes JSON ``null``, as in a full upsert), and the
result is written through the same compare-and-set as a full upsert with the partial Op's version.

Rejected Ops (:class:`sinks.base.Rejected`): a document that cannot be encoded (not
JSON-serializable, e.g. a ``set`` or a non-string dict key), and a record key that holds a
foreign Redis type (``WRONGTYPE``). They get no version entry; everything else is applied.

Checkpoints: string key ``pgderive:D:V:checkpoint`` holding :func:`cdc.lsn.version_hex` of the LSN,
raised (never lowered) by one Lua call for all views.

Upgrade: keys written before namespacing (``pgderive:V:versions``, ``pgderive:V:checkpoint``)
are adopted by :meth:`RedisSink.adopt_legacy` (``RENAME``, atomic) on the first start.
The record keys are the user's (the view's key template): two deployments writing the same
record keys clash whatever pgderive does; that is a configuration error.

Wire loads (:meth:`RedisSink.wire_select`, :meth:`RedisSink.wire_load`): a snapshot of a plain
``hash`` view can be encoded by Postgres itself. The snapshot query returns, per row, the RESP
bytes of the commands that write the record at the snapshot's version (``DEL key`` first when the
view already holds data, ``HSET key f v ..`` — or ``DEL key`` when every field is NULL — and
``HSET pgderive:D:V:versions key version``, sent for a whole chunk before its records: see
:func:`wire_chunk`), and pgderive relays them to Redis without decoding a row. No compare-and-set is needed: a snapshot is loaded while nothing else writes the view, at a
consistent point newer than every version already stored (ARCHITECTURE.md, rules 1 and 4), exactly as
the compare-and-set would decide.
"""
from __future__ import annotations

import select
import socket
import ssl
from collections import defaultdict
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Sequence, cast

import hiredis
import orjson
import redis
from psycopg import sql
from redis import exceptions as rx

from cdc.lsn import version_hex
from sinks.base import Op, Rejected, SinkError, TlsOptions, ViewTarget, tls_verify_failure

if TYPE_CHECKING:
    from sinks.base import AtomicCheckpoint, Claims, LegacyLayout, Sink, TruncatesBelow, WireLoad

__all__ = ["RedisSink", "wire_chunk", "versions_key", "checkpoint_key", "CLAIMS_KEY", "TOMBSTONE_SUFFIX", "WRONGTYPE_FIELD"]

TOMBSTONE_SUFFIX = b"d"
CLAIMS_KEY = "pgderive:claims"
"""Hash shared by every deployment: key template shape → ``"<deployment>\n<view>"``
(:meth:`RedisSink.claim`)."""
WRONGTYPE_FIELD = "<redis WRONGTYPE>"  # :meth:`RedisSink.get`: a record key of another Redis type
_VERSION_LEN = 16
_MAX_ARGS_PER_CALL = 50_000  # bounds one Lua call for views with very wide documents
_SCAN_COUNT = 1000
_WIRE_IN_FLIGHT = 200_000  # wire load: replies outstanding before the sender waits for Redis
_CRLF = sql.Literal("\r\n")

_Call = tuple[list[Any], list[Any], list[Op]]
"""One encoded apply call (:meth:`RedisSink._encode`): ``(KEYS, ARGV, Ops)``, ``Ops[i]`` being the
Op of ``KEYS[i + 1]``."""


def _bulk(raw: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def wire_chunk(vkey: bytes, chunk: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The bytes a wire load sends for one chunk of ``(record commands, version entry)`` rows
    (:meth:`RedisSink.wire_select`): one ``HSET vkey`` of the chunk's version entries, then the
    record commands.

    The entries go first. Redis executes a connection's commands in order, so a load cut short
    anywhere (kill -9, a lost connection) has written an entry for every record it wrote; the
    next load then finds the view populated and deletes each record before writing it. A record
    written without its entry would look foreign to the next load, which would ``HSET`` over it
    and keep the fields the new row no longer has (a NULL since then). An entry without its
    record is harmless: the next load or the generation's sweep replaces it.
    """
    entries = b"".join(e for _, e in chunk)
    return b"".join([b"*%d\r\n" % (2 + 2 * len(chunk)), _bulk(b"HSET"), _bulk(vkey), entries,
                     *(r for r, _ in chunk)])


def _socket(conn: Any) -> socket.socket:
    """The socket of a connected redis-py connection (``ConnectionInterface`` does not declare
    it). Raises ``redis.ConnectionError`` when there is none."""
    sock: socket.socket | None = getattr(conn, "_sock", None)
    if sock is None:
        raise rx.ConnectionError("Redis connection has no socket")
    return sock


# The Lua scripts live in sinks/redis_lua/ (package data; each file's header describes its KEYS,
# ARGV and reply). A script is its library files followed by its own body.
_LUA_DIR = "redis_lua"


def _lua(*names: str) -> str:
    """The concatenated text of ``sinks/redis_lua/<name>.lua`` for each of ``names``."""
    root = resources.files("sinks").joinpath(_LUA_DIR)
    return "".join(root.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


_APPLY_LUA = _lua("lib_helpers", "lib_apply", "apply")
_SWEEP_LUA = _lua("lib_helpers", "sweep")
_CHECKPOINT_LUA = _lua("lib_helpers", "checkpoint")
_ADVANCE_LUA = _lua("lib_helpers", "lib_advance", "advance")
_APPLY_ADVANCE_LUA = _lua("lib_helpers", "lib_apply", "lib_advance", "apply_advance")
_GET_LUA = _lua("get")
_ADOPT_LUA = _lua("adopt")
_CLAIM_LUA = _lua("claim")

_RETRYABLE_REPLIES = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def versions_key(view: str, deployment: str | None = None) -> str:
    """Name of the version hash of ``view``: ``pgderive:{deployment}:{view}:versions``, or the
    legacy ``pgderive:{view}:versions`` when ``deployment`` is None (before namespacing)."""
    return f"pgderive:{view}:versions" if deployment is None else f"pgderive:{deployment}:{view}:versions"


def checkpoint_key(view: str, deployment: str | None = None) -> str:
    """Name of the checkpoint key of ``view``: ``pgderive:{deployment}:{view}:checkpoint``, or the
    legacy ``pgderive:{view}:checkpoint`` when ``deployment`` is None (before namespacing)."""
    return (f"pgderive:{view}:checkpoint" if deployment is None
            else f"pgderive:{deployment}:{view}:checkpoint")


def encode_field(value: Any) -> str | bytes | int:
    """Encode one non-None hash field value (see the module docstring for the rules)."""
    t = type(value)
    same: str | bytes | int  # the value itself (``type(v) is`` tests do not narrow for mypy)
    if t is str or t is int:  # hiredis packs int as decimal
        same = value
        return same
    if t is bool:
        return "true" if value else "false"
    if t is float:
        return repr(value)
    if t is dict or t is list:
        return orjson.dumps(value)
    if t is bytes:
        same = value
        return same
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int(value)
    return str(value)


class RedisSink:
    """Sink writing views into one Redis database (see the module docstring for the layout).

    Args:
        name: the sink's name in the YAML (for error messages).
        url: a redis-py URL, e.g. ``redis://127.0.0.1:6380/0``.
        batch_size: maximum Ops per Lua call (1..4000); all calls of one :meth:`apply` share
            one pipeline. A call blocks Redis for roughly ``batch_size`` x 2-10 us.
        tls: TLS settings for a ``rediss://`` URL (redis-py's ``ssl_ca_certs``,
            ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``);
            default: verify the server against the system's trust store. ``ValueError`` with
            another scheme.
        deployment: namespaces pgderive's own keys (:func:`cdc.catalog.deployment_id`), so that
            deployments sharing the database keep separate version hashes and checkpoints;
            None writes the legacy un-namespaced keys (tests and tools only).

    Attributes:
        stats: running counters ``applied``, ``skipped`` (older or equal version),
            ``partial_missed`` (partial Op for a missing or deleted record).

    Every method raises :class:`SinkError`: ``retryable=True`` for connection, timeout and
    transient server states (OOM, LOADING, BUSY, READONLY, ...), ``retryable=False`` for misuse
    (unregistered view, a load with Ops of another view) and other error replies. Refused
    records are returned as :class:`~sinks.base.Rejected` instead (see the module docstring).
    """

    def __init__(self, name: str, url: str, *, batch_size: int = 1000,
                 deployment: str | None = None, tls: TlsOptions | None = None) -> None:
        if not 1 <= batch_size <= 4000:
            raise ValueError("batch_size must be within 1..4000 (Lua unpack limit)")
        self.name = name
        self.batch_size = batch_size
        self.deployment = deployment
        options: dict[str, Any] = {}
        if url.startswith("rediss://"):
            tls = tls or TlsOptions()
            options = {"ssl_ca_certs": tls.ca_certs, "ssl_certfile": tls.client_cert,
                       "ssl_keyfile": tls.client_key, "ssl_cert_reqs": "required" if tls.verify else "none",
                       "ssl_check_hostname": tls.verify}
        elif tls is not None:
            raise ValueError(f"sink {name}: TLS options need a rediss:// URL")
        self._client = redis.Redis.from_url(
            url, decode_responses=False, socket_timeout=60, socket_connect_timeout=10, **options
        )
        self._apply_script = self._client.register_script(_APPLY_LUA)
        self._sweep_script = self._client.register_script(_SWEEP_LUA)
        self._checkpoint_script = self._client.register_script(_CHECKPOINT_LUA)
        self._advance_script = self._client.register_script(_ADVANCE_LUA)
        self._apply_advance_script = self._client.register_script(_APPLY_ADVANCE_LUA)
        self._get_script = self._client.register_script(_GET_LUA)
        self._adopt_script = self._client.register_script(_ADOPT_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._targets: dict[str, ViewTarget] = {}
        self._wire_plans: dict[str, tuple[int, bytes]] = {}  # view -> (commands per row, version hash key)
        self._fresh: set[str] = set()  # views whose current generation began with no version entry
        self.stats = {"applied": 0, "skipped": 0, "partial_missed": 0}

    # --- protocol -------------------------------------------------------------------------

    def check(self) -> None:
        """``PING`` over a new connection: the connection handshake runs ``AUTH`` and ``SELECT
        db`` when the URL asks for them, so this proves Redis reachable, the credentials
        accepted and the database index valid, writing nothing (Redis manual, ``PING``,
        ``AUTH``, ``SELECT``).

        Raises :class:`SinkError`: ``retryable=True`` when Redis cannot be reached,
        ``retryable=False`` when it refuses the client (wrong or missing password, an ACL
        user without ``PING``, a database index out of range, any other error reply) or its
        TLS certificate fails verification (``ca_certs``, the host name).
        """
        prefix = f"sink {self.name}: Redis"
        try:
            try:
                self._client.ping()
            except rx.RedisError as e:
                reason = tls_verify_failure(e)
                if reason is None:
                    raise
                raise SinkError(f"{prefix}: TLS certificate verification failed ({reason}): check "
                                "ca_certs and the host name in the URL", retryable=False) from e
        except (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError) as e:
            # Subclasses of ConnectionError: the server answered and refused the credentials.
            raise SinkError(f"{prefix} refused the credentials: {e}", retryable=False) from e
        except (rx.ConnectionError, rx.TimeoutError) as e:
            raise SinkError(f"{prefix} unreachable: {e}", retryable=True) from e
        except rx.RedisError as e:  # NOAUTH, NOPERM, "ERR DB index is out of range", ...
            raise SinkError(f"{prefix} refused the connection: {e}", retryable=False) from e

    def register(self, target: ViewTarget) -> None:
        """Declare a view; its ``format`` must be ``"hash"`` or ``"json"`` (default ``hash``)."""
        fmt = target.format or "hash"
        if fmt not in ("hash", "json"):
            raise ValueError(f"sink {self.name}: view {target.view}: unknown format {fmt!r}")
        self._targets[target.view] = target

    def apply(self, ops: Sequence[Op]) -> list[Rejected]:
        """Write ``ops`` (any views) with compare-and-set; return once Redis replied to all.

        Partial Ops of ``json`` views are merged after the other Ops (one more round trip to
        read, one to write). Returns the refused Ops; raises :class:`SinkError` (see the class
        docstring).
        """
        rejected: list[Rejected] = []
        if not ops:
            return rejected
        by_view: dict[str, list[Op]] = defaultdict(list)
        json_partial: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            if op.partial and op.doc is not None and self._format(op.view) == "json":
                json_partial[op.view].append(op)
            else:
                by_view[op.view].append(op)
        self._write(by_view, rejected)
        if json_partial:
            merged: dict[str, list[Op]] = {}
            for view, vops in json_partial.items():
                merged[view] = self._merge_json(view, vops, rejected)
            self._write(merged, rejected)
        return rejected

    def apply_and_advance(self, ops: Sequence[Op], views: Sequence[str], previous: int,
                          lsn: int) -> tuple[list[Rejected], list[str]]:
        """:meth:`apply`, then :meth:`advance_checkpoint` of ``views`` (int LSNs), in one Lua
        call (one round trip) when the Ops fit in one: at most ``batch_size`` of them, no partial
        Op of a ``json`` view; otherwise as the two calls. A failing write stops the script
        before the advance, so a checkpoint never moves past Ops Redis did not apply. Returns
        ``(refused Ops, views whose checkpoint was missing or behind previous)``; raises
        :class:`SinkError`."""
        rejected: list[Rejected] = []
        by_view: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_view[op.view].append(op)
        one_call = views and len(ops) <= self.batch_size and not any(
            op.partial and op.doc is not None and self._format(op.view) == "json" for op in ops)
        if not one_call:
            return self.apply(ops), self.advance_checkpoint(views, previous, lsn)
        calls = [c for view, vops in by_view.items() for c in self._encode(view, vops, rejected)]
        if len(calls) > len(by_view):  # wide documents: more than one call per view
            self._apply_calls(calls, rejected)
            return rejected, self.advance_checkpoint(views, previous, lsn)
        keys: list[Any] = [self._ckey(v) for v in views]
        args: list[Any] = [version_hex(lsn), version_hex(previous), len(views), len(calls)]
        args += [len(k) - 1 for k, _, _ in calls]
        for k, a, _ in calls:
            keys += k
            args += a
        with self._errors("apply"):
            ((results, lost),) = self._run(self._apply_advance_script, [(keys, args)])
        self._count(calls, results, rejected)
        return rejected, [views[int(i) - 1] for i in lost]

    def begin_generation(self, view: str, version: int) -> str:
        """Redis keys are shared by all generations: returns ``view`` as the generation id.

        Notes whether the view holds no version entry yet (a first load): then nothing in it
        can be older than ``version`` when the generation is committed (everything written
        meanwhile is the load itself or newer stream writes), and :meth:`commit_generation`
        skips its sweep. Raises :class:`SinkError`."""
        self._target(view)
        with self._errors("begin_generation"):
            if self._client.exists(self._vkey(view)):
                self._fresh.discard(view)
            else:
                self._fresh.add(view)
        return view

    def load(self, view: str, generation: str, ops: Sequence[Op]) -> list[Rejected]:
        """Write snapshot Ops: the same compare-and-set as :meth:`apply`; returns the refused
        Ops."""
        for op in ops:
            if op.view != view:
                raise SinkError(
                    f"sink {self.name}: load into {view!r} got an Op of view {op.view!r}",
                    retryable=False,
                )
        return self.apply(ops)

    def wire_select(self, view: str, fields: Sequence[str], version: int,
                    types: Sequence[str] = (), *, generation: str | None = None,
                    live: bool = False) -> sql.Composable | None:
        """The SELECT list of a wire load of ``view`` at ``version`` (int LSN) (:mod:`pgderive.runtime.wire`;
        ``types``, the fields' column types, do not matter here: a hash field is the value's text).

        It reads the columns of an inner query: ``k`` (the record key as text, never NULL) and
        ``f0``, ``f1``, .. (the text of output field ``fields[i]``, NULL when absent), and yields
        two ``bytea`` columns per row: the RESP commands writing the record (see the module
        docstring; field values exactly as :func:`encode_field` writes their model values), and
        the record's version-hash entry (key and version as two RESP bulk strings), which
        :meth:`wire_load` sends as one ``HSET`` per batch. Returns None when the view cannot be
        loaded this way: ``json`` format, or ``live`` (the stream writes the view meanwhile:
        these commands overwrite without the compare-and-set). ``generation`` is the view
        itself (Redis keeps one). Raises :class:`SinkError`.
        """
        if self._format(view) != "hash" or live:
            return None
        vkey = self._vkey(view)
        with self._errors("wire_select"):
            populated = bool(self._client.exists(vkey))

        def lit(b: bytes) -> sql.Composable:
            return sql.Literal(b.decode())

        def bulk(expr: sql.Composable) -> sql.Composable:
            return sql.SQL("'$' || octet_length({0}) || {1} || {0} || {1}").format(expr, _CRLF)

        k = sql.Identifier("k")
        cols = [sql.Identifier(f"f{i}") for i in range(len(fields))]
        delete = sql.SQL("{} || {}").format(lit(b"*2\r\n" + _bulk(b"DEL")), bulk(k))
        present = sql.SQL(" + ").join(sql.SQL("({} IS NOT NULL)::int").format(c) for c in cols) \
            if cols else sql.SQL("0")
        pairs = [sql.SQL("coalesce({} || {}, '')").format(lit(_bulk(name.encode())), bulk(c))
                 for name, c in zip(fields, cols)]
        hset = sql.SQL("'*' || (2 + 2 * ({})) || {} || {} || {}").format(
            present, _CRLF, lit(_bulk(b"HSET")), bulk(k))
        record = sql.SQL("CASE WHEN {} = 0 THEN {} ELSE {} END").format(
            present, delete, sql.SQL(" || ").join([hset, *pairs]))
        vhex = version_hex(version).encode()
        entry = sql.SQL("{} || {}").format(bulk(k), lit(_bulk(vhex)))
        commands = [delete, record] if populated else [record]
        self._wire_plans[view] = (len(commands), vkey)
        return sql.SQL("convert_to({}, 'UTF8'), convert_to({}, 'UTF8')").format(
            sql.SQL(" || ").join(commands), entry)

    def wire_load(self, view: str, chunks: Iterable[Sequence[tuple[bytes, bytes]]]) -> int:
        """Relay a wire load of ``view`` to Redis, pipelined: ``chunks`` yields lists of the
        ``(record commands, version entry)`` rows that :meth:`wire_select`'s SELECT list returns;
        each chunk is sent as one ``HSET`` of its version entries, then its record commands
        (:func:`wire_chunk` says why in that order).
        Returns once Redis answered every command, with the number of records.

        Raises :class:`SinkError`: retryable for connection failures and transient replies
        (OOM, LOADING, ...), ``retryable=False`` for other error replies (e.g. WRONGTYPE: a
        record key holding another Redis type), after deleting the version entries it wrote;
        the caller then loads the view through :meth:`load`, which refuses such records one by
        one. Every command is idempotent, so the whole load may be repeated.
        """
        if view not in self._wire_plans:
            raise SinkError(f"sink {self.name}: wire_load of {view!r} without wire_select", retryable=False)
        per_row, vkey = self._wire_plans[view]
        pool = self._client.connection_pool
        with self._errors("wire_load"):
            conn = pool.get_connection()
        expected = got = rows = 0
        error: bytes | None = None
        tail = b""
        vhex = b""

        def receive(block: bool) -> None:
            nonlocal got, error, tail
            # A TLS socket may hold decrypted bytes the kernel no longer reports as readable.
            if not block and not (isinstance(sock, ssl.SSLSocket) and sock.pending()) \
                    and not select.select([sock], [], [], 0)[0]:
                return
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("Redis closed the connection")
            got += data.count(b"\n")  # integer and error replies are one line each
            if error is None and b"-" in data:  # only an error reply has a '-'
                lines = (tail + data).split(b"\n")
                error = next((ln for ln in lines if ln.startswith(b"-")), None)
            tail = data[-200:]

        try:
            conn.send_command("PING")  # a live connection (reconnects a stale one)
            conn.read_response()
            sock = _socket(conn)
            for chunk in chunks:
                if not chunk:
                    continue
                if not vhex:
                    vhex = chunk[0][1].rsplit(b"\r\n", 2)[-2]
                sock.sendall(wire_chunk(vkey, chunk))
                expected += len(chunk) * per_row + 1
                rows += len(chunk)
                receive(False)
                while expected - got > _WIRE_IN_FLIGHT:
                    receive(True)
            while got < expected:
                receive(True)
        except (OSError, rx.ConnectionError, rx.TimeoutError) as e:
            conn.disconnect()
            raise SinkError(f"sink {self.name}: wire_load: Redis unavailable: {e}", retryable=True) from e
        except BaseException:
            conn.disconnect()  # replies may still be pending on it: never reuse
            raise
        finally:
            pool.release(conn)
        if error is not None:
            text = error[1:].decode(errors="replace").strip()
            retryable = text.startswith(_RETRYABLE_REPLIES)
            if not retryable and vhex:
                # The version entries were written even where the record was refused; the
                # row-by-row load that follows must not take them for records of this view
                # (it would delete a foreign key instead of refusing it).
                self._forget_versions(view, vhex)
            raise SinkError(f"sink {self.name}: wire_load of {view}: Redis error: {text}", retryable=retryable)
        self.stats["applied"] += rows
        return rows

    def _forget_versions(self, view: str, vhex: bytes) -> None:
        """Delete the version entries of ``view`` equal to ``vhex`` (a wire load's version)."""
        vkey = self._vkey(view)
        with self._errors("wire_load (undo)"):
            for page in self._version_pages(vkey):
                mine = [k for k, v in page.items() if v == vhex]
                if mine:
                    self._client.hdel(vkey, *mine)

    def commit_generation(self, view: str, generation: str, version: int) -> None:
        """Sweep: delete every record of ``view`` (and its version entry, tombstones included)
        whose stored version is < ``version`` (int LSN), with compare-and-set in Lua. Nothing
        to do for a generation begun on an empty view (see :meth:`begin_generation`)."""
        self._target(view)
        if view in self._fresh:
            self._fresh.discard(view)
            return
        self._sweep(view, version)

    def _sweep(self, view: str, version: int) -> None:
        """Delete the records of ``view`` stored at a version < ``version`` (one HSCAN of the
        version hash; 5M entries take about 5 s)."""
        vkey = self._vkey(view)
        vhex = version_hex(version)
        vhex_b = vhex.encode()
        with self._errors("commit_generation"):
            for page in self._version_pages(vkey):
                stale = [k for k, v in page.items() if v[:_VERSION_LEN] < vhex_b]
                calls = [
                    ([vkey, *stale[i : i + self.batch_size]], [vhex])
                    for i in range(0, len(stale), self.batch_size)
                ]
                if calls:
                    self._run(self._sweep_script, calls)

    def truncate(self, view: str, version: int) -> None:
        """Empty ``view`` as of a TRUNCATE committed at ``version`` (int LSN): delete every
        record (and version entry) at or below ``version`` — Ops of the same transaction that
        came before the TRUNCATE included; those after it are applied afterwards."""
        self._target(view)
        self._sweep(view, version + 1)

    def truncate_below(self, view: str, version: int) -> None:
        """Delete every record (and version entry) of ``view`` stored at a version <
        ``version`` (int LSN), with compare-and-set in Lua (:class:`~sinks.base.TruncatesBelow`):
        records at or above it, written before or during the sweep, stay."""
        self._target(view)
        self._sweep(view, version)

    def scan(self, view: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, doc)`` for every live record: hash views give ``{field: str}``, json
        views the parsed document. Tombstones are skipped."""
        fmt = self._format(view)
        vkey = self._vkey(view)
        cursor = 0
        while True:
            with self._errors("scan"):
                cursor, page = self._hscan(vkey, cursor)
                keys = [k for k, v in page.items() if len(v) == _VERSION_LEN]
                pipe = self._client.pipeline(transaction=False)
                for k in keys:
                    if fmt == "hash":
                        pipe.hgetall(k)
                    else:
                        pipe.get(k)
                values = pipe.execute() if keys else []
            for k, raw in zip(keys, values):
                if fmt == "hash":
                    if raw:  # a version entry whose key vanished (e.g. evicted) is not a record
                        fields: dict[bytes, bytes] = raw
                        yield k.decode(), {f.decode(): v.decode() for f, v in fields.items()}
                elif raw is not None:
                    yield k.decode(), orjson.loads(raw)
            if cursor == 0:
                return

    def get(self, view: str, keys: Sequence[str], *,
            realtime: bool = True) -> dict[str, tuple[dict[str, Any] | None, int | None]]:
        """``key -> (stored doc | None, version | None)`` for every key of ``keys`` (always the
        latest writes: ``realtime`` is accepted for the protocol and ignored), in one
        pipelined round trip of read-only Lua calls (``batch_size`` keys each: HMGET on the
        version hash, HGETALL or GET per key; one reply per call keeps the client's parsing
        in hiredis). The doc is in :meth:`scan`'s form; a tombstone gives ``(None, its
        version)``, a key without version entry ``(doc, None)``. A key holding another Redis
        type comes back as ``({WRONGTYPE_FIELD: error text}, version)``, so it compares
        different from any document. Each call blocks Redis for roughly ``batch_size`` x 5-10
        us. Raises :class:`SinkError`."""
        fmt = self._format(view)
        keys = list(keys)
        if not keys:
            return {}
        vkey = self._vkey(view)
        read = "HGETALL" if fmt == "hash" else "GET"
        calls: list[tuple[list[Any], list[Any]]] = [
            ([vkey, *keys[i : i + self.batch_size]], [read]) for i in range(0, len(keys), self.batch_size)]
        with self._errors("get"):
            replies = self._run(self._get_script, calls)
        out: dict[str, tuple[dict[str, Any] | None, int | None]] = {}
        loads = orjson.loads
        for (call_keys, _), (versions, records, errors) in zip(calls, replies):
            failed = {int(errors[i]): errors[i + 1] for i in range(0, len(errors), 2)}
            for i, (key, stored, raw) in enumerate(zip(call_keys[1:], versions, records), 1):
                version = int(stored[:_VERSION_LEN], 16) if stored else None
                doc: dict[str, Any] | None
                if i in failed:
                    err = failed[i]
                    doc = {WRONGTYPE_FIELD: err.decode() if isinstance(err, bytes) else str(err)}
                elif raw is None:
                    doc = None
                elif fmt == "hash":
                    doc = ({raw[j].decode(): raw[j + 1].decode() for j in range(0, len(raw), 2)}
                           if raw else None)
                else:
                    doc = loads(raw)
                out[key] = (doc, version)
        return out

    def scan_keys(self, view: str) -> Iterator[tuple[str, int | None]]:
        """Yield ``(key, version)`` for every non-tombstone entry of the version hash (HSCAN,
        no record reads). A version entry whose record vanished is yielded too; keys written
        without pgderive's version hash are not seen. Raises :class:`SinkError`."""
        self._target(view)
        vkey = self._vkey(view)
        cursor = 0
        while True:
            with self._errors("scan_keys"):
                cursor, page = self._hscan(vkey, cursor)
            for k, v in page.items():
                if len(v) == _VERSION_LEN:
                    yield k.decode(), int(v, 16)
            if cursor == 0:
                return

    def stored_form(self, view: str, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` as :meth:`scan` returns it: hash views ``{field: str}`` without NULL fields,
        json views the JSON round trip."""
        if self._format(view) == "hash":
            out: dict[str, Any] = {}
            for f, v in doc.items():
                if v is None:
                    continue
                t = type(v)
                if t is str:  # the common cases first (verify calls this once per record)
                    out[f] = v
                elif t is int:
                    out[f] = int.__repr__(v)
                else:
                    e = encode_field(v)
                    out[f] = e.decode() if isinstance(e, bytes) else str(e)
            return out
        same: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return same

    def count(self, view: str) -> int:
        """Number of live records of ``view`` (version entries that are not tombstones)."""
        self._target(view)
        vkey = self._vkey(view)
        with self._errors("count"):
            return sum(1 for page in self._version_pages(vkey) for v in page.values() if len(v) == _VERSION_LEN)

    def write_checkpoint(self, views: Sequence[str], lsn: int) -> None:
        """Raise the checkpoint of each of ``views`` to ``lsn`` (int LSN) in one Lua call (a
        checkpoint at or past ``lsn`` is kept). Raises :class:`SinkError`."""
        if not views:
            return
        keys = [self._ckey(v) for v in views]
        with self._errors("write_checkpoint"):
            self._run(self._checkpoint_script, [(keys, [version_hex(lsn)])])

    def advance_checkpoint(self, views: Sequence[str], previous: int, lsn: int) -> list[str]:
        """Move the checkpoints of ``views`` from at least ``previous`` to ``lsn`` (int LSNs)
        atomically in one Lua call. Returns the views whose checkpoint was missing or below
        ``previous`` — Redis lost data it had acknowledged — and leaves those untouched.
        Raises :class:`SinkError`."""
        if not views:
            return []
        keys = [self._ckey(v) for v in views]
        with self._errors("advance_checkpoint"):
            (lost,) = self._run(self._advance_script, [(keys, [version_hex(lsn), version_hex(previous)])])
        return [views[int(i) - 1] for i in lost]

    def read_checkpoint(self, view: str) -> int | None:
        """The checkpoint LSN (int) of ``view``, or None if Redis holds none. Raises
        :class:`SinkError`."""
        with self._errors("read_checkpoint"):
            raw = self._client.get(self._ckey(view))
        return None if raw is None else int(raw, 16)

    def drop_view(self, view: str) -> None:
        """Delete every record key listed in the version hash, then the version hash, the
        checkpoint and this deployment's claim of the view's key shape."""
        vkey = self._vkey(view)
        with self._errors("drop_view"):
            for page in self._version_pages(vkey):
                if page:
                    self._client.unlink(*page.keys())
            self._client.unlink(vkey, self._ckey(view))
            self._release(view)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def adopt_legacy(self, views: Sequence[str]) -> list[str]:
        """Move the bookkeeping of ``views`` written before namespacing (``pgderive:V:versions``,
        ``pgderive:V:checkpoint``) to this deployment's keys, one atomic Lua call per view
        (``RENAME``: read old, write new, remove old). A view whose new keys exist already is
        left alone, and so are its legacy keys (another deployment sharing this database may
        adopt them). Returns the views adopted. Nothing to do without a deployment. Raises
        :class:`SinkError`."""
        if self.deployment is None or not views:
            return []
        calls: list[tuple[list[Any], list[Any]]] = [
            ([versions_key(v), checkpoint_key(v), self._vkey(v), self._ckey(v)], []) for v in views]
        with self._errors("adopt legacy keys"):
            moved = self._run(self._adopt_script, calls)
        return [v for v, n in zip(views, moved) if int(n)]

    def claim(self, views: Sequence[str]) -> None:
        """Claim the record keys of ``views`` for this deployment in :data:`CLAIMS_KEY`, by
        their key template's shape (``ViewTarget.key_shape``, e.g. ``account:{}``), in one Lua
        call: all or none. Two deployments whose views have the same shape write the same
        keys; a shape held by another deployment that still has bookkeeping for its view here
        raises :class:`SinkError` (``retryable=False``) naming it; a claim whose owner left
        none is taken over. Nothing to do without a deployment. Raises :class:`SinkError`."""
        pairs = [(t.key_shape, v) for v in views if (t := self._target(v)).key_shape]
        if self.deployment is None or not pairs:
            return
        with self._errors("claim"):
            (conflicts,) = self._run(self._claim_script,
                                     [([CLAIMS_KEY], [self.deployment, *(x for p in pairs for x in p)])])
        if conflicts:
            shape = conflicts[0].decode()
            dep, _, other = conflicts[1].decode().partition("\n")
            view = next(v for s, v in pairs if s == shape)
            raise SinkError(
                f"sink {self.name}: view {view}: its record keys ({shape!r}) are already written by "
                f"deployment {dep} (view {other}); two deployments must not share record keys: change "
                f"the key template, or if {dep} is retired, delete its bookkeeping (redis-cli DEL "
                f"{checkpoint_key(other, dep)} {versions_key(other, dep)})", retryable=False)

    def _release(self, view: str) -> None:
        """Drop this deployment's claim of ``view``'s key shape (after :meth:`drop_view`)."""
        shape = self._target(view).key_shape
        if self.deployment is None or not shape:
            return
        if self._client.hget(CLAIMS_KEY, shape) == f"{self.deployment}\n{view}".encode():
            self._client.hdel(CLAIMS_KEY, shape)

    # --- internals ------------------------------------------------------------------------

    def _vkey(self, view: str) -> bytes:
        """The name of the version hash of ``view`` (:func:`versions_key`), as bytes."""
        return versions_key(view, self.deployment).encode()

    def _ckey(self, view: str) -> str:
        """The name of the checkpoint key of ``view`` (:func:`checkpoint_key`)."""
        return checkpoint_key(view, self.deployment)

    def _target(self, view: str) -> ViewTarget:
        try:
            return self._targets[view]
        except KeyError:
            raise SinkError(
                f"sink {self.name}: view {view!r} is not registered", retryable=False
            ) from None

    def _format(self, view: str) -> str:
        return self._target(view).format or "hash"

    def _version_pages(self, vkey: bytes) -> Iterator[dict[bytes, bytes]]:
        """The pages of an HSCAN of the version hash ``vkey`` (record key → entry). Raises
        redis-py exceptions: iterate it inside :meth:`_errors`."""
        cursor = 0
        while True:
            cursor, page = self._hscan(vkey, cursor)
            yield page
            if cursor == 0:
                return

    def _hscan(self, vkey: bytes, cursor: int) -> tuple[int, dict[bytes, bytes]]:
        """One HSCAN page of the version hash ``vkey``: ``(next cursor, {record key: entry})``
        (bytes: the client does not decode replies). Raises redis-py exceptions."""
        cursor, page = self._client.hscan(vkey, cursor, count=_SCAN_COUNT)
        return cursor, cast("dict[bytes, bytes]", page)

    def _write(self, by_view: dict[str, list[Op]], rejected: list[Rejected]) -> None:
        """Apply full/delete/hash-partial Ops with the Lua compare-and-set (all calls in one
        pipeline), update :attr:`stats` and append refused Ops to ``rejected``."""
        self._apply_calls([c for view, vops in by_view.items() for c in self._encode(view, vops, rejected)],
                          rejected)

    def _apply_calls(self, calls: list[_Call], rejected: list[Rejected]) -> None:
        """Run encoded apply calls (:meth:`_encode`) in one pipeline, then :meth:`_count`."""
        if not calls:
            return
        with self._errors("apply"):
            results = self._run(self._apply_script, [(keys, args) for keys, args, _ in calls])
        self._count(calls, results, rejected)

    def _count(self, calls: list[_Call], results: list[Any], rejected: list[Rejected]) -> None:
        """Add the replies of apply calls to :attr:`stats`, append refused Ops to ``rejected``."""
        for (_, _, call_ops), (applied, skipped, missed, refused) in zip(calls, results):
            self.stats["applied"] += applied
            self.stats["skipped"] += skipped
            self.stats["partial_missed"] += missed
            for i in range(0, len(refused), 2):
                reason = refused[i + 1]
                reason = reason.decode() if isinstance(reason, bytes) else str(reason)
                rejected.append(Rejected(call_ops[refused[i] - 1], reason))

    def _merge_json(self, view: str, ops: list[Op], rejected: list[Rejected]) -> list[Op]:
        """Read-modify-write step for partial Ops of a ``json`` view: read the current JSON and
        stored version of their keys (``batch_size`` keys per HMGET/MGET pair, all pipelined in
        one round trip), merge each key's partial docs in version order and return one full
        upsert per key with the newest merged version. Stale partials (version < stored) are
        counted as skipped, partials for missing/deleted records as skipped + partial_missed.
        Appends unencodable partial docs to ``rejected``. Raises :class:`SinkError`."""
        by_key: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            by_key[op.key].append(op)
        keys = list(by_key)
        vkey = self._vkey(view)
        commands: list[tuple[Any, ...]] = []
        for i in range(0, len(keys), self.batch_size):
            chunk = keys[i : i + self.batch_size]
            commands += (("HMGET", vkey, *chunk), ("MGET", *chunk))
        with self._errors("apply (read for partial update)"):
            replies = self._pipeline(commands)
            for r in replies:
                if isinstance(r, Exception):
                    raise r
        versions = [v for r in replies[0::2] for v in r]
        records = [v for r in replies[1::2] for v in r]
        out: list[Op] = []
        for key, stored, raw in zip(keys, versions, records):
            ver = int(stored[:_VERSION_LEN], 16) if stored else -1
            live = stored is not None and len(stored) == _VERSION_LEN and raw is not None
            doc: dict[str, Any] | None = None
            n = 0
            for op in sorted(by_key[key], key=lambda o: o.version):
                if op.version < ver:
                    self.stats["skipped"] += 1
                    continue
                if not live:
                    self.stats["skipped"] += 1
                    self.stats["partial_missed"] += 1
                    continue
                try:
                    orjson.dumps(op.doc)
                    if doc is None:
                        doc = orjson.loads(raw)
                        if not isinstance(doc, dict):
                            raise ValueError(f"stored record is not a JSON object: {raw[:80]!r}")
                except (TypeError, ValueError) as e:  # orjson errors subclass both
                    rejected.append(Rejected(op, f"partial update: {e}"))
                    continue
                doc.update(op.doc or {})
                ver, n = op.version, n + 1
            if doc is not None and n:
                self.stats["applied"] += n - 1  # n partials become one write
                out.append(Op(view, key, ver, doc))
        return out

    def _encode(self, view: str, ops: list[Op], rejected: list[Rejected]) -> Iterator[_Call]:
        """Encode the Ops of one view into Lua calls ``(keys, argv, ops)`` of <= batch_size
        Ops (``ops[i]`` is ``keys[i + 1]``'s Op). Ops whose document cannot be encoded are
        appended to ``rejected`` instead. Partial Ops of a json view must be merged first."""
        is_json = self._format(view) == "json"
        vkey = self._vkey(view)
        hex_cache: dict[int, str] = {}
        keys: list[Any] = [vkey]
        args: list[Any] = []
        call_ops: list[Op] = []
        for op in ops:
            ver = hex_cache.get(op.version)
            if ver is None:
                ver = hex_cache[op.version] = version_hex(op.version)
            doc = op.doc
            try:
                if doc is None:
                    entry: tuple[Any, ...] = (ver, "d")
                elif is_json:
                    if op.partial:
                        raise AssertionError("partial json Ops are merged before encoding")
                    entry = (ver, "j", orjson.dumps(doc))
                elif op.partial:
                    sets: list[Any] = []
                    dels: list[str] = []
                    for f, v in doc.items():
                        if v is None:
                            dels.append(f)
                        else:
                            sets += (f, encode_field(v))
                    entry = (ver, "p", len(sets), *sets, len(dels), *dels)
                else:
                    pairs: list[Any] = []
                    for f, v in doc.items():
                        if v is not None:
                            pairs += (f, encode_field(v))
                    entry = (ver, "h", len(pairs), *pairs)
            except (TypeError, ValueError) as e:  # orjson.JSONEncodeError is a TypeError
                rejected.append(Rejected(op, f"not encodable: {e}"))
                continue
            keys.append(op.key)
            args += entry
            call_ops.append(op)
            if len(keys) > self.batch_size or len(args) >= _MAX_ARGS_PER_CALL:
                yield keys, args, call_ops
                keys, args, call_ops = [vkey], [], []
        if len(keys) > 1:
            yield keys, args, call_ops

    def _run(self, script: Any, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """Run ``script`` once per ``(keys, argv)`` with EVALSHA, pipelined on one connection;
        return the replies in order. Raises redis-py exceptions (mapped by the caller).

        The scripts are idempotent: on NOSCRIPT the script is loaded and every call re-run, and
        a broken connection is retried once on a new one.
        """
        for attempt in (0, 1):
            try:
                replies = self._pipeline(
                    ("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls
                )
            except (rx.ConnectionError, rx.TimeoutError):
                if attempt:
                    raise
                continue
            errors = [r for r in replies if isinstance(r, rx.ResponseError)]
            if not errors:
                return replies
            if attempt or not isinstance(errors[0], rx.NoScriptError):
                raise errors[0]
            self._client.script_load(script.script)  # same sha
        raise AssertionError("unreachable")

    def _pipeline(self, commands: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Pack each command with hiredis and send it at once (Redis executes it while the next
        one is packed), then read one reply per command; error replies are returned as
        exception objects, not raised. redis-py's own pipeline packs per argument in Python,
        which costs more than the Lua work."""
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            sent = 0
            for command in commands:
                conn.send_packed_command([hiredis.pack_command(command)], check_health=sent == 0)
                sent += 1
            replies: list[Any] = []
            for _ in range(sent):
                try:
                    replies.append(conn.read_response())
                except rx.ResponseError as e:
                    replies.append(e)
            return replies
        except BaseException:
            conn.disconnect()  # replies may still be pending on it: never reuse
            raise
        finally:
            pool.release(conn)

    def _errors(self, what: str) -> "_ErrorMap":
        return _ErrorMap(self.name, what)


class _ErrorMap:
    """Context manager translating redis-py exceptions into :class:`SinkError`."""

    def __init__(self, sink: str, what: str) -> None:
        self.prefix = f"sink {sink}: {what}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if e is None or isinstance(e, SinkError) or not isinstance(e, rx.RedisError):
            return False
        reason = tls_verify_failure(e)
        if reason is not None:
            raise SinkError(f"{self.prefix}: TLS certificate verification failed ({reason}): check "
                            "ca_certs and the host name in the URL", retryable=False) from e
        if isinstance(e, (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError)):
            raise SinkError(f"{self.prefix}: Redis unavailable: {e}", retryable=True) from e
        text = str(e)
        retryable = any(text.startswith(p) or f" {p} " in text for p in _RETRYABLE_REPLIES)
        raise SinkError(f"{self.prefix}: Redis error: {text}", retryable=retryable) from e


if TYPE_CHECKING:
    def _implements(sink: RedisSink) -> tuple[Sink, AtomicCheckpoint, WireLoad, LegacyLayout, Claims, TruncatesBelow]:
        """Never called: mypy checks here that RedisSink implements these protocols."""
        return sink, sink, sink, sink, sink, sink
