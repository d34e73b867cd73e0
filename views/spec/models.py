"""The spec's pydantic models and the rules they check (README.md, "YAML").

:class:`Spec` is the whole file: a :class:`SourceSpec`, named sinks (:class:`RedisSinkSpec`,
:class:`OpenSearchSinkSpec`) and named views (:class:`ViewSpec`, with nested
:class:`IncludeSpec`). Field validators raise :func:`~views.spec.errors._fail` so their messages
reach the user as written; :func:`_cross_problems` holds the checks that span sections (view ↔
sink), run on the raw data alongside the model validation by :func:`views.spec.parse_spec`.

Table names follow SQL: ``schema.name`` or ``name`` (schema ``public``); unquoted parts are
folded to lower case, double-quoted parts (``'public."Orders"'``) are kept exactly.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      field_validator, model_validator)

from pydantic_core import PydanticCustomError

from cdc.redact import dsn_secrets, redact_dsn, redact_url, url_secrets
from views.template import KeyTemplate

from .errors import SpecError, _child, _fail, _kind, _lookup_line

__all__ = [
    "LaneMode", "BootstrapSpec", "HttpSpec", "HTTP_LISTEN", "ProvenanceSpec",
    "Spec", "SourceSpec", "KafkaSourceSpec", "DeadLettersSpec", "SinkSpec", "RedisSinkSpec", "OpenSearchSinkSpec",
    "KafkaSinkSpec", "ViewSpec", "IncludeSpec",
    "parse_table", "redact_dsn", "TableName", "Fields",
    "SLOT_RE", "VIEW_NAME_RE", "INDEX_RE", "TAG_RE", "COLUMN_RE", "Tags", "ORDER_RE", "DERIVE_RE", "DEPLOYMENT_RE",
]

SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
VIEW_NAME_RE = re.compile(r"^[a-zA-Z0-9_]+$")
# Lowercase, not starting with '_', '-', '+' or '.', no '\/*?"<>| ,#:'; short enough to leave
# room for the generation suffix of the physical indices behind the alias.
INDEX_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,199}$")
#: A Kafka topic name (Kafka's ``Topic.validate``: 1-249 of ``[a-zA-Z0-9._-]``, not ``.``/``..``).
TOPIC_RE = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}$")
DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


_STRICT = ConfigDict(extra="forbid")


_INT_OPTIONS = ("port", "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                "keepalives_count", "tcp_user_timeout")


def _check_dsn(dsn: str) -> None:
    """Refuse a DSN libpq would refuse at connect time, without echoing it (it may hold a
    password): not parseable as key=value pairs or a URI (libpq ``PQconninfoParse``, Postgres
    manual 34.1.1 "Connection Strings"), an unknown option, or a non-integer where libpq wants
    an integer (``port`` also takes a comma-separated list, 34.1.1.3; ``1``–``65535``).
    Raises the spec's validation error (reported at ``source.dsn``)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError as e:
        m = re.search(r'invalid (?:connection|URI query parameter):? ?(?:option )?"([A-Za-z_]+)"', str(e))
        if m:
            raise _fail(f"unknown connection option {m.group(1)!r} (see the libpq connection"
                        " parameters)") from None
        raise _fail("not a libpq connection string: use key=value pairs (host=... dbname=...)"
                    " or a postgresql:// URI, quoting values with spaces in single quotes") from None
    for name in _INT_OPTIONS:
        raw = params.get(name)
        if raw is None:
            continue
        parts = str(raw).split(",") if name == "port" else [str(raw)]
        for part in parts:
            part = part.strip()
            if name == "port" and part == "":
                continue  # an empty entry means the default port
            if not re.fullmatch(r"-?[0-9]+", part) or (name == "port" and not 1 <= int(part) <= 65535):
                raise _fail(f"{name} must be an integer" + (" from 1 to 65535 (or a comma-separated list)"
                                                               if name == "port" else "")
                            + f", got {part[:20]!r}")
    # TLS files (libpq "SSL Support"): named here, with the YAML path, rather than by libpq's
    # "could not read root certificate file" when the daemon connects. "system" (libpq >= 16)
    # is the system's trust store, not a file.
    for key in ("sslrootcert", "sslcert", "sslkey", "sslcrl"):
        path = params.get(key)
        if isinstance(path, str) and path and path != "system":
            try:
                _check_file(path)
            except PydanticCustomError as e:
                raise _fail(f"{key}: {e.message()}") from None


class KafkaSourceSpec(BaseModel):
    """``source.kafka:`` — read row changes from Kafka as a derivation worker instead of from
    a replication slot (ARCHITECTURE.md, "Kafka workers").

    Attributes:
        bootstrap_servers: the brokers, ``host:port[,host:port...]`` (librdkafka
            ``bootstrap.servers``).
        group: the consumer group the workers share (``^[A-Za-z0-9._-]{1,200}$``); the
            partitions of the views' topics are split among its members.
        topic_prefix: the publisher's ``topic_prefix``: a table's topic is
            ``<topic_prefix>.<schema>.<table>`` (default ``pgderive``).
        session_timeout: seconds without a heartbeat before the group gives a worker's
            partitions to the others (librdkafka ``session.timeout.ms``; the broker allows 6 to
            1800 by default). Default 10.
        options: further librdkafka consumer properties (strings, numbers, booleans), e.g.
            ``security.protocol``; they override pgderive's own.
    """

    model_config = _STRICT
    bootstrap_servers: str
    group: str
    topic_prefix: str = "pgderive"
    session_timeout: float = Field(10.0, ge=1, le=3600)
    options: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        if not re.fullmatch(r"[^\s,]+(,[^\s,]+)*", v.strip()):
            raise _fail("expected host:port, or a comma-separated list of them")
        return v.strip()

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if not GROUP_RE.match(v):
            raise _fail(f"invalid group {v!r}: use 1-200 letters, digits and '._-'")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not TOPIC_PREFIX_RE.match(v):
            raise _fail(f"invalid topic_prefix {v!r}: use 1-200 letters, digits and '._-'")
        return v

    def state_name(self) -> str:
        """The name of this group's pgderive state (dead letters, view registry) in the
        source database, where a daemon uses its slot's name: ``kafka_`` and the group,
        lowercased, other characters than letters, digits and ``_`` as ``_``, at most 63
        characters (a valid slot name, so it can never clash with a slot's state)."""
        return ("kafka_" + re.sub(r"[^a-z0-9_]", "_", self.group.lower()))[:63]


class SourceSpec(BaseModel):
    """``source:`` — the Postgres database and the logical replication slot.

    Attributes:
        dsn: libpq connection string (URI or key=value). Never log it: use :meth:`redacted_dsn`.
            TLS: libpq's ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey`` parameters
            (Postgres manual, "libpq: Connection Strings" and "SSL Support").
        slot: replication slot name, ``^[a-z0-9_]{1,63}$``. Optional with ``kafka``: then it
            only names pgderive's state in the source (no slot is created), by default
            :meth:`KafkaSourceSpec.state_name`.
        kafka: read changes from Kafka as a derivation worker (:class:`KafkaSourceSpec`)
            instead of from a slot.
        deployment: optional id namespacing pgderive's bookkeeping in the sinks (default
            ``<system identifier>:<database>:<slot>``, :func:`cdc.catalog.deployment_id`); set
            it when two physical copies of one cluster (same system identifier) with the same
            database and slot names share a sink. ``^[A-Za-z0-9_.:-]{1,200}$``.
        connect_timeout: seconds to wait for a connection to the source, libpq's
            ``connect_timeout`` (Postgres docs, "Parameter Key Words": whole seconds, applied to
            each host; 0 = wait forever). Default 10. A ``connect_timeout`` in the DSN wins.
        statement_timeout: seconds pgderive's own bookkeeping queries may run (catalog checks,
            slot lookups, ``pgderive.*`` tables; the server's ``statement_timeout`` setting,
            sent as ``options=-c statement_timeout=…``). Never applied to the snapshot ``COPY``
            of a bootstrap, the replication connection or the stream's read-backs, which last as
            long as the data needs. Default 30; 0 = no limit.
    """

    model_config = _STRICT
    dsn: str = Field(repr=False)
    slot: str = ""
    deployment: str | None = None

    @model_validator(mode="after")
    def _slot_or_kafka(self) -> "SourceSpec":
        if not self.slot:
            if self.kafka is None:
                raise _fail("missing required key 'slot' (or 'kafka', for a derivation worker)", ".slot")
            self.slot = self.kafka.state_name()
        return self

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, v: str | None) -> str | None:
        if v is not None and not DEPLOYMENT_RE.match(v):
            raise _fail(f"invalid deployment id {v!r}: use 1-200 letters, digits and '_.:-'")
        return v
    connect_timeout: int = Field(10, ge=0)
    statement_timeout: float = Field(30.0, ge=0)
    kafka: KafkaSourceSpec | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if not v.strip():
            raise _fail("must be a Postgres connection string, e.g. postgresql://user@host:5432/db")
        _check_dsn(v)
        return v

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str) -> str:
        if not SLOT_RE.match(v):
            raise _fail(f"invalid slot name {v!r}: use 1-63 lowercase letters, digits and"
                        " underscores")
        return v

    def redacted_dsn(self) -> str:
        """The DSN with every secret parameter hidden (:func:`cdc.redact.redact_dsn`), for
        messages and logs."""
        return redact_dsn(self.dsn)

    def conninfo(self, *, statement_timeout: bool = True) -> str:
        """The DSN to connect with: :attr:`dsn` plus ``connect_timeout`` (unless the DSN sets
        one) and, with ``statement_timeout``, ``-c statement_timeout=…ms`` appended to the
        ``options`` of the DSN (or of ``$PGOPTIONS``). Returns the key=value form; contains the
        password: never print it (:meth:`redacted_dsn`).

        Raises:
            psycopg.ProgrammingError: the DSN is not a valid libpq connection string.
        """
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(self.dsn)
        extra: dict[str, str] = {}
        if "connect_timeout" not in params and self.connect_timeout:
            extra["connect_timeout"] = str(self.connect_timeout)
        if statement_timeout and self.statement_timeout:
            options = str(params.get("options", os.environ.get("PGOPTIONS", "")))
            ms = max(1, round(self.statement_timeout * 1000))
            extra["options"] = f"{options} -c statement_timeout={ms}".strip()
        return make_conninfo(self.dsn, **extra) if extra else self.dsn

    def secrets(self) -> list[str]:
        """The secret values in :attr:`dsn` (for :func:`cdc.redact.register_secrets`)."""
        return dsn_secrets(self.dsn)



def _check_file(v: str | None) -> str | None:
    """A TLS file option: ``None``, or a path (relative to the working directory) to a file
    this process can read; else the problem, naming the file."""
    if v is None:
        return v
    if not v.strip():
        raise _fail("must be a file path")
    if not os.path.exists(v):
        raise _fail(f"file not found: {v}")
    if not os.path.isfile(v):
        raise _fail(f"not a file: {v}")
    try:
        with open(v, "rb"):
            pass
    except OSError as e:
        raise _fail(f"cannot read {v}: {e.strerror}") from None
    return v


#: A classification tag: a word such as ``pii`` or ``secret`` (README, "Provenance and governance").
TAG_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def _check_tags(v: Any) -> Any:
    """A tag or a list of tags (``pii`` or ``[pii, secret]``) → the list, without repeats."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise _fail(f"must be a tag (e.g. pii) or a list of tags, got {_kind(v)}")
    for i, tag in enumerate(items):
        sub = f"[{i}]" if isinstance(v, list) else ""
        if not isinstance(tag, str) or not TAG_RE.match(tag):
            shown = repr(tag) if isinstance(tag, str) else _kind(tag)
            raise _fail(f"invalid tag {shown}: use a lowercase word such as pii or secret"
                        " (letters, digits, '_', '-')", sub)
    return list(dict.fromkeys(items))


#: ``allow:`` of a sink and each value of ``classification:``: tags, one or a list.
Tags = Annotated[list[str], BeforeValidator(_check_tags)]

#: A classified column: ``schema.table.column`` (unquoted names, as in the catalog).
COLUMN_RE = re.compile(r"^([^.\s]+)\.([^.\s]+)\.([^.\s]+)$")


#: TLS file options of both sink kinds: an existing, readable file (or omitted).
TlsFile = Annotated[Union[str, None], AfterValidator(_check_file)]

_TLS_KEYS = ("ca_certs", "client_cert", "client_key")


def _tls_pairing(spec: Any) -> None:
    """``client_cert`` and ``client_key`` go together (a key inside the certificate's PEM file
    is not supported: name the file twice)."""
    if (spec.client_cert is None) != (spec.client_key is None):
        missing = "client_key" if spec.client_key is None else "client_cert"
        raise _fail("client_cert and client_key go together", f".{missing}")


#: Where ``pgderive run`` applies a sink's batches (``sinks.NAME.lane``; ARCHITECTURE.md,
#: "Lanes"): ``thread`` (a thread of the daemon), ``process`` (a process of its own, which
#: takes the sink client's CPU time off the daemon's interpreter lock), ``auto`` (the
#: default: ``process`` for an OpenSearch sink when the daemon writes to another sink too,
#: else ``thread``).
LaneMode = Literal["auto", "thread", "process"]


class RedisSinkSpec(BaseModel):
    """``{type: redis, url: ...}`` — a Redis server (``redis://``, ``rediss://``, ``unix://``).

    TLS (``rediss://`` URLs; redis-py's ``ssl_*`` connection options, Redis manual "TLS"):

    Attributes:
        ca_certs: PEM file of the CA(s) that sign the server's certificate (default: the
            system's trust store).
        client_cert, client_key: PEM files of a client certificate and its key, for a server
            started with ``tls-auth-clients yes``.
        verify_certs: verify the server's certificate chain and host name (default true;
            false encrypts without knowing who answers).
        lane: where the daemon applies this sink's batches (:data:`LaneMode`).
        allow: classification tags (:attr:`Spec.classification`) whose columns views may copy
            into this sink (default none: no classified column; :mod:`views.policy`).
    """

    model_config = _STRICT
    type: Literal["redis"]
    url: str = Field("redis://127.0.0.1:6380/0", repr=False)
    ca_certs: TlsFile = None
    client_cert: TlsFile = None
    client_key: TlsFile = None
    verify_certs: bool = True
    lane: LaneMode = "auto"
    allow: Tags = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise _fail("must be a redis://, rediss:// or unix:// URL")
        problem = _url_problem(v)
        if problem:
            raise _fail(problem)
        return v

    @model_validator(mode="after")
    def _tls(self) -> "RedisSinkSpec":
        _tls_pairing(self)
        given = [k for k in _TLS_KEYS if getattr(self, k) is not None]
        if (given or not self.verify_certs) and not self.url.startswith("rediss://"):
            raise _fail(f"TLS options ({', '.join(given) or 'verify_certs'}) need a rediss:// URL",
                        ".url")
        return self


class OpenSearchSinkSpec(BaseModel):
    """``{type: opensearch, hosts: [...]}`` — an OpenSearch cluster (``http(s)://host:port``).

    Attributes:
        checkpoint_index: the index holding pgderive's checkpoint documents (default
            ``pgderive-checkpoints``); an OpenSearch index name (lowercase, ``INDEX_RE``).
        ca_certs, client_cert, client_key, verify_certs: TLS for ``https://`` hosts, as
            :class:`RedisSinkSpec` (opensearch-py's options of the same names).
        username, password: HTTP basic auth (OpenSearch security plugin, "HTTP basic
            authentication"); give them from the environment, e.g. ``password:
            ${OPENSEARCH_PASSWORD}``. Never logged. Sent over plain ``http://`` hosts with a
            warning.
        lane: where the daemon applies this sink's batches (:data:`LaneMode`).
        allow: classification tags whose columns views may copy into this sink (as
            :class:`RedisSinkSpec`).
    """

    model_config = _STRICT
    type: Literal["opensearch"]
    hosts: list[str]
    checkpoint_index: str = "pgderive-checkpoints"
    ca_certs: TlsFile = None
    client_cert: TlsFile = None
    client_key: TlsFile = None
    verify_certs: bool = True
    username: str | None = None
    password: str | None = Field(None, repr=False)
    lane: LaneMode = "auto"
    allow: Tags = Field(default_factory=list)

    @model_validator(mode="after")
    def _tls(self) -> "OpenSearchSinkSpec":
        _tls_pairing(self)
        given = [k for k in _TLS_KEYS if getattr(self, k) is not None]
        plain = [h for h in self.hosts if not h.startswith("https://")]
        if (given or not self.verify_certs) and plain:
            raise _fail(f"TLS options ({', '.join(given) or 'verify_certs'}) need https:// hosts",
                        ".hosts")
        if (self.username is None) != (self.password is None):
            raise _fail("username and password go together",
                        ".password" if self.password is None else ".username")
        return self

    @field_validator("checkpoint_index")
    @classmethod
    def _checkpoint_index(cls, v: str) -> str:
        if not INDEX_RE.match(v):
            raise _fail(f"invalid index name {v!r}: use lowercase letters, digits and '_.+-',"
                        " not starting with '_', '-' or '+'")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise _fail("must list at least one host, e.g. [\"http://127.0.0.1:9201\"]")
        for i, host in enumerate(v):
            if not host.strip() or ("://" in host and not re.match(r"^https?://", host)):
                raise _fail("must be an http:// or https:// URL", f"[{i}]")
            problem = _url_problem(host if "://" in host else f"http://{host}")
            if problem:
                raise _fail(problem, f"[{i}]")
        return v


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url``'s host and port (never quoting its password), or None."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" of an IPv6 host
        return f"invalid URL {redact_url(url)!r}"
    try:
        port = parts.port  # raises ValueError for "6x80" or 99999
    except ValueError:
        port_text = parts.netloc.rsplit("@", 1)[-1].rsplit(":", 1)[-1]
        return (f"invalid URL {redact_url(url)!r}: the port {port_text!r} is not a number from 1"
                " to 65535")
    if parts.scheme != "unix" and not parts.hostname:
        return f"invalid URL {redact_url(url)!r}: no host"
    if port == 0:
        return f"invalid URL {redact_url(url)!r}: the port '0' is not a number from 1 to 65535"
    return None


#: librdkafka settings a Kafka sink may pass through (``producer:``): connection and security
#: options only; what pgderive's guarantees rest on (transactions, idempotence, acks) is its own.
KAFKA_PASSTHROUGH_RE = re.compile(r"^(security\.protocol|ssl\.[a-z.]+|sasl\.[a-z.]+|client\.id|"
                                  r"socket\.[a-z.]+|compression\.type|linger\.ms|batch\.size|"
                                  r"message\.max\.bytes|request\.timeout\.ms)$")
#: ``producer:`` settings whose values are secrets (never logged).
KAFKA_SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"})


class KafkaSinkSpec(BaseModel):
    """``{type: kafka, bootstrap_servers: ...}`` — an Apache Kafka cluster the daemon publishes
    the change stream to (ARCHITECTURE.md, "Kafka"): one topic per view (by default
    ``<topic_prefix>.<schema>.<table>``), one message per row change in the envelope of
    :mod:`cdc.envelope`, written by a transactional producer.

    Attributes:
        bootstrap_servers: ``host:port[,host:port...]`` (librdkafka ``bootstrap.servers``).
        topic_prefix: prefix of the default topic names (default ``pgderive``); the
            checkpoint topic is ``<topic_prefix>._checkpoints``.
        partitions: partitions of the topics pgderive creates (default 3, from 1 to 10000);
            an existing topic keeps its own.
        replication_factor: of the topics pgderive creates (default 1; use 3 in production).
        transaction_timeout: seconds a Kafka transaction may stay open (librdkafka
            ``transaction.timeout.ms``; default 60, from 1 to 900).
        max_message_bytes: a change whose message is larger is refused as a dead letter
            instead of failing the batch (default 1000000 bytes, Kafka's ``message.max.bytes``).
        producer: further librdkafka settings, limited to connection and security ones
            (``security.protocol``, ``ssl.*``, ``sasl.*``, ``client.id``, ``socket.*``,
            ``compression.type``, ``linger.ms``, ``batch.size``, ``message.max.bytes``,
            ``request.timeout.ms``); secrets such as ``sasl.password`` are never logged.
        lane: where the daemon applies this sink's batches (:data:`LaneMode`).
        allow: classification tags whose columns views may publish (as :class:`RedisSinkSpec`).
    """

    model_config = _STRICT
    type: Literal["kafka"]
    bootstrap_servers: str = "127.0.0.1:9093"
    topic_prefix: str = "pgderive"
    partitions: int = 3
    replication_factor: int = 1
    transaction_timeout: float = 60.0
    max_message_bytes: int = 1_000_000
    producer: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict, repr=False)
    lane: LaneMode = "auto"
    allow: Tags = Field(default_factory=list)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        for i, server in enumerate(v.split(",")):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise _fail(f"expected host:port[,host:port...], got {server.strip()!r}"
                            + (f" (server {i + 1})" if "," in v else ""))
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not TOPIC_RE.match(v) or len(v) > 120:
            raise _fail(f"invalid topic prefix {v!r}: use up to 120 letters, digits and '._-'")
        return v

    @field_validator("partitions", mode="before")
    @classmethod
    def _partitions(cls, v: Any) -> Any:
        return _count(v, 1, 10_000, "partitions")

    @field_validator("replication_factor", mode="before")
    @classmethod
    def _replicas(cls, v: Any) -> Any:
        return _count(v, 1, 32, "replicas")

    @field_validator("max_message_bytes", mode="before")
    @classmethod
    def _max_bytes(cls, v: Any) -> Any:
        return _count(v, 1024, 1 << 30, "bytes", " bytes")

    @field_validator("transaction_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 900:
            raise _fail(f"must be a number of seconds from 1 to 900, got {v!r}")
        return float(v)

    @field_validator("producer")
    @classmethod
    def _producer(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not KAFKA_PASSTHROUGH_RE.match(key):
                raise _fail(f"setting {key!r} is not passed through: only connection and security"
                            " settings (security.protocol, ssl.*, sasl.*, client.id, socket.*,"
                            " compression.type, linger.ms, batch.size, message.max.bytes,"
                            " request.timeout.ms); pgderive owns the transactional ones", f".{key}")
        return v


SinkSpec = Annotated[Union[RedisSinkSpec, OpenSearchSinkSpec, KafkaSinkSpec], Field(discriminator="type")]

_UNQUOTED = r"[A-Za-z_][A-Za-z0-9_$]*"
_QUOTED = r'"(?:[^"]|"")+"'
_TABLE_RE = re.compile(rf"^({_QUOTED}|{_UNQUOTED})(?:\.({_QUOTED}|{_UNQUOTED}))?$")


def parse_table(text: str) -> tuple[str, str]:
    """``"schema.name"`` / ``"name"`` → ``(schema, name)`` as in the catalog.

    Unquoted parts fold to lower case; double-quoted parts are kept (``""`` → ``"``).

    Raises:
        ValueError: not one or two SQL identifiers separated by a dot, or a schema name holding
            a dot (table names may hold any character).
    """
    m = _TABLE_RE.match(text.strip())
    if not m:
        raise ValueError(f"invalid table name {text!r}: use schema.table or table"
                         " (double-quote mixed-case names: 'public.\"Orders\"')")

    def ident(part: str) -> str:
        return part[1:-1].replace('""', '"') if part.startswith('"') else part.lower()

    first, second = m.group(1), m.group(2)
    schema, name = ("public", ident(first)) if second is None else (ident(first), ident(second))
    if "." in schema:
        # pgderive names a table "schema.name" (Change.table, dead letters, add-tables) and
        # splits that at the first dot: a dot in the table name is fine, one in the schema not.
        raise ValueError(f"schema {schema!r} contains '.', which pgderive does not support in schema"
                         " names (table names may contain any character): rename the schema")
    if "\x00" in schema + name:
        raise ValueError("a table name cannot contain NUL")
    return schema, name


ORDER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_$]*)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)
DERIVE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def _check_table(v: str) -> str:
    try:
        parse_table(v)
    except ValueError as e:
        raise _fail(str(e)) from None
    return v


def _check_fields(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, (list, dict)):
        raise _fail("must be a list of column names or a mapping output name -> column,"
                    f" got {_kind(v)}")
    if not v:
        raise _fail("must name at least one column (leave 'fields' out for all columns)")
    items = list(enumerate(v)) if isinstance(v, list) else list(v.items())
    seen: set[str] = set()
    for out, column in items:
        sub = f"[{out}]" if isinstance(v, list) else f".{out}"
        if not isinstance(out, (int, str)) or isinstance(out, bool):
            raise _fail(f"output name must be a string, got {_kind(out)}", sub)
        if isinstance(out, str) and not out:
            raise _fail("output name must not be empty", sub)
        if not isinstance(column, str) or not column:
            raise _fail(f"must be a column name, got {_kind(column)}", sub)
        if isinstance(v, list) and column in seen:
            raise _fail(f"duplicate column {column!r}", sub)
        seen.add(column)
    return v


#: ``table:`` of views and includes: ``schema.name`` or ``name``.
TableName = Annotated[str, AfterValidator(_check_table)]
#: ``fields:`` of views and includes: list of columns, mapping output → column, or omitted.
Fields = Annotated[Union[list[str], dict[str, str], None], BeforeValidator(_check_fields)]


def _field_map(fields: list[str] | dict[str, str] | None) -> dict[str, str] | None:
    if fields is None:
        return None
    if isinstance(fields, list):
        return {c: c for c in fields}
    return dict(fields)


class IncludeSpec(BaseModel):
    """``views.NAME.include.FIELD`` — a related table joined into each record as ``FIELD``.

    Attributes:
        table: the related table (``schema.name`` or ``name``).
        on: exactly one pair ``{parent_column: column}``: rows of ``table`` whose ``column``
            equals the parent row's ``parent_column`` are joined.
        fields: its columns in the nested value (list, mapping output → column, or all).
        many: ``false`` (default): a nested object, or ``null`` when no row matches (the first
            by ``order_by`` when several do); ``true``: a nested array (``[]`` when none).
        order_by: ``["column [asc|desc]", ...]``: order of the array (default: the related
            table's primary key), ties broken by the primary key.
        limit: at most this many rows in the array (``many: true`` only).
        include: nested includes of the related table (same shape, any depth).
    """

    model_config = _STRICT
    table: TableName
    on: dict[str, str]
    fields: Fields = None
    many: bool = False
    order_by: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)
    include: dict[str, "IncludeSpec"] | None = None

    _schema: str = PrivateAttr("")
    _name: str = PrivateAttr("")

    @field_validator("on")
    @classmethod
    def _on(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) != 1:
            raise _fail("must be one pair {parent_column: column_of_this_table}")
        return v

    @field_validator("order_by")
    @classmethod
    def _order_by(cls, v: list[str] | None) -> list[str] | None:
        for i, item in enumerate(v or []):
            if not ORDER_RE.match(item):
                raise _fail(f"expected 'column', 'column asc' or 'column desc', got {item!r}", f"[{i}]")
        return v

    def model_post_init(self, context: Any) -> None:
        self._schema, self._name = parse_table(self.table)
        if self.limit is not None and not self.many:
            raise ValueError("limit needs many: true")

    @property
    def qualified(self) -> str:
        """``"schema.name"`` of the related table."""
        return f"{self._schema}.{self._name}"

    @property
    def link(self) -> tuple[str, str]:
        """``(parent_column, column)`` from :attr:`on`."""
        return next(iter(self.on.items()))

    @property
    def field_map(self) -> dict[str, str] | None:
        """Output name → column, or ``None`` for all columns."""
        return _field_map(self.fields)

    @property
    def ordering(self) -> list[tuple[str, bool]]:
        """``order_by`` as ``(column, descending)`` pairs."""
        out = []
        for item in self.order_by or []:
            m = ORDER_RE.match(item)
            assert m is not None
            out.append((m.group(1), (m.group(2) or "").lower() == "desc"))
        return out


class ViewSpec(BaseModel):
    """``views.NAME`` — one derived view of one table into one sink.

    Attributes:
        table: ``schema.name`` or ``name`` (public); see :attr:`schema`, :attr:`name`,
            :attr:`qualified`.
        sink: name of a declared sink, or a list of them: the view is then kept in each (one
            internal view ``NAME@SINK`` per sink, see :attr:`Spec.groups`; ``key``/``format``
            apply to the Redis sinks, ``index`` to the OpenSearch ones). Read it through
            :attr:`sinks` (always a list) or :attr:`sink_name` (the one sink of a view of a
            parsed :class:`Spec`) rather than handling the union.
        key: key template (see :class:`~views.template.KeyTemplate`); required for redis views;
            for opensearch views the default is the primary key columns joined by ``:``.
        fields: ``None`` (all columns), a list of column names, or a mapping output name →
            column; see :attr:`field_map`.
        format: redis only, ``hash`` (default) or ``json``; ``None`` for opensearch views.
        index: opensearch only: the alias users query.
        topic: kafka only: the topic the view's changes go to (default
            ``<topic_prefix>.<schema>.<table>``; see :attr:`topic_name`).
        where: a SQL boolean expression over the table's columns; only rows for which it is
            TRUE are in the view (:mod:`views.where`).
        derive: ``package.module:function``: called with each record (dict) pgderive would
            store; returns the record to store (dict) or ``None`` (not in the view).
        include: related tables joined into each record (:class:`IncludeSpec`).
        group_by: root columns; with ``aggregate`` the view holds one record per group
            (:mod:`views.aggregate`), keyed by a template over these columns.
        aggregate: output name → ``count(*)``, ``count(col)``, ``sum(col)``, ``min(col)``,
            ``max(col)`` or ``avg(col)``; ``col`` a root column or ``include_name.field``.
        derive_reads: with ``derive``: the record's fields the function reads (output names;
            ``include.field`` or an include's name for nested values). A declaration for the
            classification policy (:mod:`views.policy`), which cannot read Python code.
        outputs: with ``derive``: the fields the function returns; for the policy they carry
            the tags of every declared read. ``derive_reads`` and ``outputs`` go together.
    """

    model_config = _STRICT
    table: TableName
    sink: str | list[str]
    key: str | None = None
    fields: Fields = None
    format: Literal["hash", "json"] | None = None
    index: str | None = None
    topic: str | None = None
    where: str | None = None
    derive: str | None = None
    include: dict[str, IncludeSpec] | None = None
    group_by: list[str] | None = None
    aggregate: dict[str, str] | None = None
    derive_reads: list[str] | None = None
    outputs: list[str] | None = None

    _schema: str = PrivateAttr("")
    _name: str = PrivateAttr("")
    _key_template: KeyTemplate | None = PrivateAttr(None)
    _topic_name: str | None = PrivateAttr(None)

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is not None and not TOPIC_RE.match(v):
            raise _fail(f"invalid topic name {v!r}: use 1-249 letters, digits and '._-'")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                KeyTemplate(v)
            except ValueError as e:
                raise _fail(str(e)) from None
        return v

    @field_validator("derive")
    @classmethod
    def _derive(cls, v: str | None) -> str | None:
        if v is not None and not DERIVE_RE.match(v):
            raise _fail(f"expected 'package.module:function', got {v!r}")
        return v

    @field_validator("where")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise _fail("must not be empty (leave 'where' out for every row)")
        return v

    @field_validator("index")
    @classmethod
    def _index(cls, v: str | None) -> str | None:
        if v is not None and not INDEX_RE.match(v):
            raise _fail(f"invalid index name {v!r}: use lowercase letters, digits and _ . + -,"
                        " starting with a letter or digit, at most 200 characters")
        return v

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # imported here: views.aggregate imports views.catalog, which imports views.spec
        from views.aggregate import AggregateError, parse_measure
        for name, text in (v or {}).items():
            try:
                parse_measure(text)
            except AggregateError as e:
                raise _fail(str(e), f".{name}") from None
        if v is not None and not v:
            raise _fail("must declare at least one aggregate, e.g. {n: count(*)}")
        return v

    def model_post_init(self, context: Any) -> None:
        self._schema, self._name = parse_table(self.table)
        self._key_template = KeyTemplate(self.key) if self.key is not None else None
        if (self.group_by is None) != (self.aggregate is None):
            raise ValueError("group_by and aggregate go together")
        if self.aggregate is not None and self.fields is not None:
            raise ValueError("an aggregate view has no fields: its records are the group_by columns and the aggregates")
        if (self.derive_reads is None) != (self.outputs is None):
            raise ValueError("derive_reads and outputs go together (the fields a derive function reads and returns)")
        if self.derive_reads is not None and self.derive is None:
            raise ValueError("derive_reads and outputs declare a derive function: add derive or remove them")

    @property
    def schema(self) -> str:  # type: ignore[override]  # shadows the deprecated BaseModel.schema()
        """The table's schema, as in the catalog (``"public"`` when not written)."""
        return self._schema

    @property
    def name(self) -> str:
        """The table's name, as in the catalog."""
        return self._name

    @property
    def qualified(self) -> str:
        """``"schema.name"`` (unquoted, as :class:`cdc.changes.Change` names tables)."""
        return f"{self._schema}.{self._name}"

    @property
    def key_template(self) -> KeyTemplate | None:
        """The parsed :attr:`key`, or ``None`` when the key defaults to the primary key."""
        return self._key_template

    @property
    def topic_name(self) -> str | None:
        """The topic a view on a Kafka sink publishes to (its :attr:`topic`, else
        ``<topic_prefix>.<schema>.<table>``); None for views on other sinks. Set when the spec
        is parsed."""
        return self._topic_name

    @property
    def field_map(self) -> dict[str, str] | None:
        """Output name → column, or ``None`` for all columns under their own names."""
        return _field_map(self.fields)

    @property
    def sinks(self) -> list[str]:
        """The sink names :attr:`sink` declares, always a list (``[sink]`` for a single name)."""
        return [self.sink] if isinstance(self.sink, str) else list(self.sink)

    @property
    def sink_name(self) -> str:
        """The view's one sink: use it rather than :attr:`sink` wherever a view meets its sink.

        Every view in :attr:`Spec.views` of a parsed spec has exactly one: a view declared with
        several sinks is split into one ``NAME@SINK`` view per sink (:attr:`Spec.groups`).

        Raises:
            ValueError: :attr:`sink` lists sinks (a view not taken from a parsed :class:`Spec`).
        """
        if not isinstance(self.sink, str):
            raise ValueError(f"the view of {self.qualified} lists sinks {self.sink}: take views"
                             " from a parsed Spec, which has one NAME@SINK view per sink")
        return self.sink


def _count(v: Any, low: int, high: int, what: str, unit: str = "") -> int:
    """``v`` if it is an integer (not a bool) from ``low`` to ``high``, else the problem:
    "must be a number of WHAT" or "must be from LOW to HIGH[UNIT]"."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"must be a number of {what}, got {_kind(v)}")
    if not low <= v <= high:
        raise _fail(f"must be from {low} to {high}{unit}, got {v}")
    return int(v)


#: Default and bounds of ``dead_letters.max_bytes`` (bytes of a dead letter's stored row JSON).
DEAD_LETTER_MAX_BYTES = 64 * 1024
DEAD_LETTER_MAX_BYTES_RANGE = (1024, 64 << 20)


class DeadLettersSpec(BaseModel):
    """``dead_letters:`` — how dead letters are stored (``pgderive.dead_letters``).

    Attributes:
        max_bytes: cap on the JSON of one dead letter's stored row, in bytes (default 65536 =
            64 KiB, from 1024 to 67108864): larger values are cut to a prefix and their columns
            listed in the dead letter's ``truncated`` (the row's identity columns are never cut).
    """

    model_config = _STRICT
    max_bytes: int = DEAD_LETTER_MAX_BYTES

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _max_bytes(cls, v: Any) -> Any:
        low, high = DEAD_LETTER_MAX_BYTES_RANGE
        return _count(v, low, high, "bytes", " bytes")


#: Default and bounds of ``bootstrap.split_rows`` (rows of a table's planner estimate).
SPLIT_ROWS = 250_000
SPLIT_ROWS_RANGE = (0, 1_000_000_000)


class BootstrapSpec(BaseModel):
    """``bootstrap:`` — how snapshots are loaded (first start, ``--resnapshot``, rebuilds).

    Attributes:
        concurrency: how many loads run at once, each on its own connection inside the same
            exported snapshot (``SET TRANSACTION SNAPSHOT``; Postgres docs, "SET TRANSACTION"):
            a wire load per view, a row-by-row read per table, an include view, the aggregate
            views together (default 2, from 1 to 64; 1 loads one after another).
        split_rows: a table whose planner estimate (``pg_class.reltuples``) exceeds this many
            rows and whose primary key is one integer column is loaded in min(``concurrency``,
            ceil(estimate / split_rows)) key ranges, each a load of its own (ARCHITECTURE.md,
            "Bootstrap"; default 250000, from 0 to 1000000000; 0 never splits, nor does
            ``concurrency`` 1).
    """

    model_config = _STRICT
    concurrency: int = 2
    split_rows: int = SPLIT_ROWS

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        return _count(v, 1, 64, "connections")

    @field_validator("split_rows", mode="before")
    @classmethod
    def _split_rows(cls, v: Any) -> Any:
        low, high = SPLIT_ROWS_RANGE
        return _count(v, low, high, "rows")


#: Default of ``provenance.retention``.
PROVENANCE_RETENTION = "1d"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ProvenanceSpec(BaseModel):
    """``provenance:`` — keeping the xid and commit timestamp of every commit the stream
    writes with, in ``pgderive.commits`` (ARCHITECTURE.md, "Provenance"; read by ``pgderive
    explain``). ``provenance: off`` (YAML ``false`` too) records nothing.

    Attributes:
        enabled: record commits (default true).
        retention: how long commits are kept, by commit timestamp: a number and a unit ``s``,
            ``m``, ``h`` or ``d`` (default ``1d``; from 1 minute to 3650 days), or ``forever``.
            A record whose last write is older shows its commit LSN only.
    """

    model_config = _STRICT
    enabled: bool = True
    retention: str = PROVENANCE_RETENTION

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "forever":
            return "forever"
        m = _DURATION_RE.match(v) if isinstance(v, str) else None
        if m is None:
            raise _fail(f"must be a duration such as 12h or 7d, or forever, got {v!r}")
        secs = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if not 60 <= secs <= 3650 * 86400:
            raise _fail(f"must be from 1m to 3650d, got {v!r}")
        return v.strip()

    @property
    def retention_seconds(self) -> float | None:
        """The retention in seconds; None for ``forever``."""
        m = _DURATION_RE.match(self.retention)
        return None if m is None else float(m.group(1)) * _DURATION_UNITS[m.group(2)]


#: Where the daemon's HTTP endpoint listens unless configured otherwise (DESIGN: port 9187).
HTTP_LISTEN = "127.0.0.1:9187"


class HttpSpec(BaseModel):
    """``http:`` — the daemon's HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``,
    ``/status``, ``/``; ARCHITECTURE.md, "Monitoring").

    Attributes:
        listen: ``HOST:PORT`` to bind (default ``127.0.0.1:9187``; port 0: any free port), or
            ``off`` (YAML ``false`` too) for no endpoint. The default address, when taken by
            another process, is skipped with a warning; a configured one must bind.
        stall_seconds: ``/healthz`` fails when the daemon made no progress for this long
            (default 60, from 0.1 to 86400).
        ready_lag_seconds: ``/readyz`` fails while a sink is further behind than this (default
            30, from 0.1 to 86400).
    """

    model_config = _STRICT
    listen: str | None = HTTP_LISTEN
    stall_seconds: float = 60.0
    ready_lag_seconds: float = 30.0

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        if v is False or v is None or (isinstance(v, str) and v.strip().lower() == "off"):
            return None
        if not isinstance(v, str):
            raise _fail(f"must be HOST:PORT or off, got {_kind(v)}")
        host, sep, port = v.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise _fail(f"must be HOST:PORT (e.g. 127.0.0.1:9187) or off, got {v!r}")
        return v.strip()

    @field_validator("stall_seconds", "ready_lag_seconds", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(f"must be a number of seconds, got {_kind(v)}")
        if not 0.1 <= v <= 86400:
            raise _fail(f"must be from 0.1 to 86400 seconds, got {v}")
        return float(v)


class Spec(BaseModel):
    """The whole file: ``source``, ``sinks`` (by name), ``views`` (by name) and the optional
    ``dead_letters`` settings (:class:`DeadLettersSpec`) and ``classification``
    (``schema.table.column`` → list of tags such as ``pii``; checked against the sinks'
    ``allow`` by :func:`views.policy.policy_problems`).

    Build it with :func:`load_spec` / :func:`parse_spec`, which also run the cross checks (view
    names, sink references, per-sink-type options) and fill defaults (redis ``format: hash``).
    It remembers its file name and YAML line numbers, so later checks (e.g. against the
    database) can report problems with :meth:`error` / :meth:`errors`.
    """

    model_config = _STRICT
    source: SourceSpec
    sinks: dict[str, SinkSpec]
    views: dict[str, ViewSpec]
    dead_letters: DeadLettersSpec = Field(default_factory=DeadLettersSpec)
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)
    http: HttpSpec = Field(default_factory=HttpSpec)
    provenance: ProvenanceSpec = Field(default_factory=ProvenanceSpec)
    classification: dict[str, Tags] = Field(default_factory=dict)

    @field_validator("provenance", mode="before")
    @classmethod
    def _provenance(cls, v: Any) -> Any:
        if v is False or (isinstance(v, str) and v.strip().lower() == "off"):
            return {"enabled": False}
        return v

    @field_validator("classification")
    @classmethod
    def _classification(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for column in v:
            if not COLUMN_RE.match(column):
                raise _fail(f"expected schema.table.column, got {column!r}", f".{column}")
        return v

    _filename: str = PrivateAttr("<string>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _groups: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    def _expand_sinks(self) -> None:
        """A view with ``sink: [a, b]`` becomes the views ``NAME@a`` and ``NAME@b`` (each with
        only its sink's options); :attr:`groups` maps the declared name to them."""
        views: dict[str, ViewSpec] = {}
        for name, view in self.views.items():
            if isinstance(view.sink, str):
                views[name] = view
                self._groups[name] = [name]
                continue
            self._groups[name] = []
            for sink in view.sink:
                target = self.sinks[sink]
                redis, search = isinstance(target, RedisSinkSpec), isinstance(target, OpenSearchSinkSpec)
                views[f"{name}@{sink}"] = view.model_copy(update={
                    "sink": sink, "index": view.index if search else None,
                    "format": view.format if redis else None,
                    "topic": view.topic if isinstance(target, KafkaSinkSpec) else None})
                self._groups[name].append(f"{name}@{sink}")
        self.views = views

    @property
    def groups(self) -> dict[str, list[str]]:
        """Declared view name → its internal views (itself, or ``NAME@SINK`` per sink)."""
        return self._groups

    def resolve(self, name: str) -> list[str]:
        """Internal view names for ``name`` (a declared name or ``NAME@SINK``); ``[]`` if unknown."""
        if name in self.views:
            return [name]
        return list(self._groups.get(name, []))

    @property
    def filename(self) -> str:
        """The YAML file the spec came from (``"<string>"`` for text)."""
        return self._filename

    def line(self, path: str) -> int | None:
        """1-based line of ``path`` (dotted, e.g. ``views.x.fields[2]``) or of its nearest
        ancestor present in the file; ``None`` if none is."""
        return _lookup_line(self._lines, path)

    def secrets(self) -> list[str]:
        """Every secret value of the file: the source DSN's secret parameters and the passwords
        in sink URLs (for :func:`cdc.redact.register_secrets`)."""
        out = self.source.secrets()
        for sink in self.sinks.values():
            if isinstance(sink, KafkaSinkSpec):
                out += [str(v) for k, v in sink.producer.items() if k in KAFKA_SECRET_KEYS and str(v)]
                continue
            for url in [sink.url] if isinstance(sink, RedisSinkSpec) else sink.hosts:
                out += url_secrets(url)
            if isinstance(sink, OpenSearchSinkSpec) and sink.password:
                out.append(sink.password)
        return list(dict.fromkeys(out))

    def error(self, path: str, message: str) -> SpecError:
        """A :class:`SpecError` with one problem at ``path`` (to raise)."""
        return self.errors([(path, message)])

    def errors(self, problems: Iterable[tuple[str, str]]) -> SpecError:
        """A :class:`SpecError` with one problem per ``(path, message)`` (to raise)."""
        return SpecError([(p, self.line(p), m) for p, m in problems], self._filename)


# ------------------------------------------------------------------ keys for error messages

def _allowed_keys(model_loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at ``model_loc`` (pydantic loc, tag included)."""
    model: type[BaseModel] | None = None
    if len(model_loc) == 0:
        model = Spec
    elif model_loc[0] == "source" and len(model_loc) == 1:
        model = SourceSpec
    elif model_loc[:2] == ("source", "kafka") and len(model_loc) == 2:
        model = KafkaSourceSpec
    elif model_loc[0] == "sinks" and len(model_loc) == 3:
        kinds: dict[str, type[BaseModel]] = {"redis": RedisSinkSpec, "kafka": KafkaSinkSpec}
        model = kinds.get(str(model_loc[2]), OpenSearchSinkSpec)
    elif model_loc[0] == "views" and len(model_loc) == 2:
        model = ViewSpec
    elif model_loc[0] == "dead_letters" and len(model_loc) == 1:
        model = DeadLettersSpec
    return list(model.model_fields) if model else []


# ------------------------------------------------------------------------------ cross checks

def _cross_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks spanning sections, on the raw data so they run alongside the model errors.

    Values of the wrong type are skipped here: the models report them.
    """
    problems: list[tuple[str, str]] = []
    raw_sinks = data.get("sinks")
    sinks: dict[str, Any] = raw_sinks if isinstance(raw_sinks, dict) else {}
    views = data.get("views")
    if not isinstance(views, dict):
        return problems
    if not views:
        problems.append(("views", "declare at least one view"))
    sink_type = {n: s.get("type") for n, s in sinks.items() if isinstance(s, dict)}
    used_keys: dict[tuple[str, str], str] = {}
    for name, view in views.items():
        path = _child("views", name, views)
        if isinstance(name, str) and not VIEW_NAME_RE.match(name):
            problems.append((path, f"invalid view name {name!r}: use letters, digits and"
                                   " underscores"))
        if not isinstance(view, dict):
            continue
        targets = view.get("sink")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            continue
        if not targets:
            problems.append((f"{path}.sink", "name at least one sink"))
        kinds = {sink_type.get(t) for t in targets}
        if len(set(targets)) != len(targets):
            problems.append((f"{path}.sink", "a sink is listed twice"))
        for sink in targets:
            problems += _sink_problems(view, str(name), path, sink, sinks, sink_type, kinds, used_keys)
    return problems


def _sink_problems(view: dict[str, Any], name: str, path: str, sink: str, sinks: dict[str, Any],
                   sink_type: dict[str, Any], kinds: set[Any],
                   used_keys: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if sink not in sinks:
        declared = ", ".join(map(str, sinks)) or "none"
        problems.append((f"{path}.sink", f"unknown sink {sink!r} (declared sinks: {declared})"))
        return problems
    kind = sink_type.get(sink)
    if view.get("topic") is not None and "kafka" not in kinds:
        problems.append((f"{path}.topic", f"only for kafka views; sink {sink!r} is {kind}"))
    if kind == "redis":
        if view.get("index") is not None and "opensearch" not in kinds:
            problems.append((f"{path}.index", f"only for opensearch views; sink {sink!r} is"
                                              " redis"))
        if view.get("key") is None:
            problems.append((f"{path}.key", "required for redis views, e.g."
                                            " key: \"account:{aid}\""))
        elif isinstance(view["key"], str):
            other = used_keys.setdefault((sink, view["key"]), str(name))
            if other != str(name):
                problems.append((f"{path}.key", f"same key template as view {other!r} on sink"
                                                f" {sink!r}: their keys would collide"))
    elif kind == "kafka":
        problems += _kafka_view_problems(view, path, sink, sinks[sink], kinds, used_keys, name)
    elif kind == "opensearch":
        if view.get("format") is not None and "redis" not in kinds:
            problems.append((f"{path}.format", f"only for redis views; sink {sink!r} is"
                                               " opensearch"))
        if view.get("index") is None:
            problems.append((f"{path}.index", "required for opensearch views: the alias"
                                              " users query"))
        elif isinstance(view["index"], str):
            other = used_keys.setdefault((sink, "index:" + view["index"]), str(name))
            if other != str(name):
                problems.append((f"{path}.index", f"index {view['index']!r} is already used"
                                                  f" by view {other!r} on sink {sink!r}"))
    return problems


#: What a view on a Kafka sink may not have: it publishes its table's row changes as they are.
_KAFKA_REFUSED = {
    "key": "the message key is the row's primary key (replica identity)",
    "where": "a change log publishes every change; filter in the consumers",
    "derive": "a change log publishes rows as they are; derive in the workers (source: {kafka: ...})",
    "include": "a change log publishes one table; join in the workers (source: {kafka: ...})",
    "group_by": "a change log publishes rows; aggregate in the workers (source: {kafka: ...})",
}


def _kafka_view_problems(view: dict[str, Any], path: str, sink: str, sink_spec: Any, kinds: set[Any],
                         used_keys: dict[tuple[str, str], str], name: str) -> list[tuple[str, str]]:
    """Problems of a view on the Kafka sink ``sink``: options that do not apply, and a topic
    another view of the sink already publishes to."""
    problems: list[tuple[str, str]] = []
    for key, why in _KAFKA_REFUSED.items():
        if view.get(key) is not None and (key != "key" or kinds == {"kafka"}):
            problems.append((f"{path}.{key}", f"not for kafka views: {why}"))
    if view.get("format") is not None and "redis" not in kinds:
        problems.append((f"{path}.format", f"only for redis views; sink {sink!r} is kafka"))
    if view.get("index") is not None and "opensearch" not in kinds:
        problems.append((f"{path}.index", f"only for opensearch views; sink {sink!r} is kafka"))
    topic = view.get("topic")
    table = view.get("table")
    if topic is None and isinstance(table, str) and isinstance(sink_spec, dict):
        try:
            schema, tname = parse_table(table)
        except ValueError:
            return problems
        topic = f"{sink_spec.get('topic_prefix', 'pgderive')}.{schema}.{tname}"
    if isinstance(topic, str):
        other = used_keys.setdefault((sink, "topic:" + topic), str(name))
        if other != str(name):
            problems.append((f"{path}.topic", f"topic {topic!r} is already published by view"
                                              f" {other!r} on sink {sink!r}"))
    return problems
