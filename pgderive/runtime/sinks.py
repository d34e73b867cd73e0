"""Connecting the sinks a set of views uses, namespaced by the deployment."""
from __future__ import annotations

import logging
from typing import Sequence

import psycopg

from cdc.catalog import deployment_id
from sinks.base import Claims, LegacyLayout, Sink
from sinks.factory import make_sink
from views.derive import View
from views.spec import Spec

__all__ = ["open_sinks", "deployment_of"]

log = logging.getLogger("pgderive.sinks")


def deployment_of(spec: Spec) -> str:
    """The deployment id of ``spec``: ``source.deployment`` when set, else
    :func:`cdc.catalog.deployment_id` read from the source (one short connection). Raises
    ``psycopg.Error`` when the source cannot be reached."""
    if spec.source.deployment:
        return spec.source.deployment
    with psycopg.connect(spec.source.dsn, autocommit=True) as conn:
        return deployment_id(conn, spec.source.slot)


def open_sinks(spec: Spec, views: Sequence[View], *, deployment: str | None = None,
               prepare: bool = True) -> dict[str, Sink]:
    """Connect the sinks the views use, namespaced by ``deployment`` (default
    :func:`deployment_of` ``spec``), register each view's target layout, adopt each view's
    bookkeeping written before namespacing (:class:`~sinks.base.LegacyLayout`; logged per
    view) and claim the views' record keys and aliases for the deployment
    (:class:`~sinks.base.Claims`). With ``prepare=False`` the last two steps are skipped and
    nothing is written or asked of the sinks (read-only commands such as ``status``, which must
    work while a sink is down). Raises ``psycopg.Error`` (reading the deployment) and
    :class:`~sinks.base.SinkError` (a sink unreachable, or another deployment writing the same
    record keys or alias: ``retryable=False``); closes the sinks it opened before raising."""
    if deployment is None:
        deployment = deployment_of(spec)
    sinks: dict[str, Sink] = {}
    try:
        for v in views:
            if v.sink not in sinks:
                sinks[v.sink] = make_sink(v.sink, spec.sinks[v.sink].model_dump(), deployment=deployment)
            sinks[v.sink].register(v.target)
        for name, sink in sinks.items() if prepare else ():
            if isinstance(sink, LegacyLayout):
                adopted = sink.adopt_legacy([v.name for v in views if v.sink == name])
                if adopted:
                    log.info("sink %s: adopted the bookkeeping of view(s) %s written before it was "
                             "namespaced by deployment %s", name, ", ".join(adopted), deployment)
            if isinstance(sink, Claims):
                sink.claim([v.name for v in views if v.sink == name])
    except BaseException:
        for sink in sinks.values():
            sink.close()
        raise
    return sinks
