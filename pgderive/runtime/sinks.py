"""Connecting the sinks a set of views uses, namespaced by the deployment."""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import psycopg

from cdc.catalog import deployment_id
from sinks.base import Claims, LegacyLayout, Sink
from sinks.factory import make_sink
from views.derive import View
from views.spec import Spec

__all__ = ["open_sinks", "prepare_sinks", "deployment_of"]

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
        if prepare:
            prepare_sinks(sinks, views)
    except BaseException:
        for sink in sinks.values():
            sink.close()
        raise
    return sinks


def prepare_sinks(sinks: Mapping[str, Sink], views: Sequence[View]) -> None:
    """The writing half of :func:`open_sinks` (which runs it unless ``prepare=False``): adopt
    each view's bookkeeping written before namespacing (:class:`~sinks.base.LegacyLayout`;
    logged per view), then claim the views' record keys and aliases for the sink's deployment
    (:class:`~sinks.base.Claims`). ``run`` calls it after its preflight, before anything else
    is created. Raises :class:`~sinks.base.SinkError` (a sink unreachable; another deployment
    writing the same record keys or alias: ``retryable=False``)."""
    for name, sink in sinks.items():
        mine = [v.name for v in views if v.sink == name]
        if isinstance(sink, LegacyLayout):
            adopted = sink.adopt_legacy(mine)
            if adopted:
                log.info("sink %s: adopted the bookkeeping of view(s) %s written before it was "
                         "namespaced by its deployment", name, ", ".join(adopted))
        if isinstance(sink, Claims):
            sink.claim(mine)
