"""Build a sink from its YAML spec (the ``sinks:`` section of the config)."""
from __future__ import annotations

from typing import Any

from sinks.base import Sink, TlsOptions

__all__ = ["make_sink"]


def _tls(spec: dict[str, Any]) -> TlsOptions | None:
    """The TLS options of a sink's section (``ca_certs``, ``client_cert``, ``client_key``,
    ``verify_certs``), or None when it sets none of them."""
    keys = ("ca_certs", "client_cert", "client_key")
    if all(spec.get(k) is None for k in keys) and spec.get("verify_certs", True):
        return None
    ca, cert, key = (None if spec.get(k) is None else str(spec[k]) for k in keys)
    return TlsOptions(ca_certs=ca, client_cert=cert, client_key=key,
                      verify=bool(spec.get("verify_certs", True)))


def make_sink(name: str, spec: dict[str, Any], *, deployment: str | None = None) -> Sink:
    """Create the sink ``name`` from ``spec``.

    ``spec`` is ``{"type": "redis", "url": "redis://host:port/db"}`` (optional ``batch_size``)
    or ``{"type": "opensearch", "hosts": ["http://host:port", ...]}`` (optional ``bulk_docs``,
    ``bulk_concurrency``, ``checkpoint_index``, ``username``/``password``); both take the TLS
    keys ``ca_certs``, ``client_cert``, ``client_key``, ``verify_certs``
    (:class:`~sinks.base.TlsOptions`); or ``{"type": "kafka", "bootstrap_servers": "host:port"}``
    (optional ``topic_prefix``, ``partitions``, ``replication_factor``, ``transaction_timeout``,
    ``max_message_bytes``, ``producer``; :class:`~sinks.kafka.KafkaSink`). ``deployment`` namespaces pgderive's own keys
    and documents in the sink (:func:`cdc.catalog.deployment_id`; None: the legacy layout).
    Raises ``ValueError`` naming the sink for an unknown type or a missing/invalid setting.
    """
    kind = spec.get("type")
    if kind == "redis":
        from sinks.redis import RedisSink

        url = spec.get("url")
        if not isinstance(url, str) or not url:
            raise ValueError(f"sink {name!r}: redis sink needs a 'url'")
        kwargs = {"batch_size": int(spec["batch_size"])} if "batch_size" in spec else {}
        return RedisSink(name, url, deployment=deployment, tls=_tls(spec), **kwargs)
    if kind == "opensearch":
        from sinks.opensearch import CHECKPOINT_INDEX, OpenSearchSink

        hosts = spec.get("hosts")
        if isinstance(hosts, str):
            hosts = [hosts]
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise ValueError(f"sink {name!r}: opensearch sink needs 'hosts' (a list of URLs)")
        kwargs = {k: int(spec[k]) for k in ("bulk_docs", "bulk_concurrency") if k in spec}
        index = spec.get("checkpoint_index") or CHECKPOINT_INDEX
        user, password = spec.get("username"), spec.get("password")
        auth = (str(user), str(password)) if user is not None and password is not None else None
        return OpenSearchSink(name, hosts, deployment=deployment, checkpoint_index=str(index),
                              tls=_tls(spec), basic_auth=auth, **kwargs)
    if kind == "kafka":
        from sinks.kafka import KafkaSink

        servers = spec.get("bootstrap_servers", "127.0.0.1:9093")
        if not isinstance(servers, str) or not servers:
            raise ValueError(f"sink {name!r}: kafka sink needs 'bootstrap_servers' (host:port,...)")
        settings = spec.get("producer") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"sink {name!r}: kafka 'producer' must be a mapping of librdkafka settings")
        return KafkaSink(name, servers, deployment=deployment, topic_prefix=str(spec.get("topic_prefix", "pgderive")),
                         partitions=int(spec.get("partitions", 3)),
                         replication_factor=int(spec.get("replication_factor", 1)),
                         transaction_timeout=float(spec.get("transaction_timeout", 60.0)),
                         max_message_bytes=int(spec.get("max_message_bytes", 1_000_000)), settings=settings)
    raise ValueError(f"sink {name!r}: unknown sink type {kind!r} (expected 'redis', 'opensearch' or 'kafka')")
