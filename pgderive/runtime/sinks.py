"""Connecting the sinks a set of views uses, namespaced by the deployment."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import psycopg

from cdc.catalog import deployment_id
from cdc.redact import registered_secrets
from sinks.base import Claims, LegacyLayout, Refreshable, Sink, ViewTarget
from sinks.factory import make_sink
from views.derive import View
from views.spec import Spec

from .applier import DeadLetterSink
from .lane_process import LaneProcessSpec
from .logs import log_format

__all__ = ["open_sinks", "prepare_sinks", "deployment_of", "SinkOpener"]

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
        for name in dict.fromkeys(v.sink for v in views):
            sinks[name] = SinkOpener.of(spec, name, views, deployment)()
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
                         "namespaced by its deployment", name, ", ".join(adopted),
                         extra={"sink": name, "view": ",".join(adopted)})
        if isinstance(sink, Claims):
            sink.claim(mine)


@dataclass(frozen=True)
class SinkOpener:
    """Opens one sink with its views' targets registered, as :func:`open_sinks` does, in
    another process: a lane's process calls it (picklable: a sink's YAML section, the
    deployment id and the targets; the section may hold a password, which travels only over
    the pipe to the process the daemon starts).

    Attributes:
        name: the sink's name in the YAML.
        config: its ``sinks.NAME`` section as a dict (:func:`sinks.factory.make_sink`).
        deployment: the deployment id (:func:`deployment_of`).
        targets: the targets of the views it serves (:attr:`views.derive.View.target`).
    """

    name: str
    config: dict[str, Any]
    deployment: str
    targets: tuple[ViewTarget, ...]

    @classmethod
    def of(cls, spec: Spec, name: str, views: Sequence[View], deployment: str) -> SinkOpener:
        """The opener of sink ``name`` of ``spec`` serving those of ``views`` that use it."""
        return cls(name, spec.sinks[name].model_dump(), deployment,
                   tuple(v.target for v in views if v.sink == name))

    def __call__(self) -> Sink:
        """A new connection to the sink (nothing written), closed again if a target is
        refused. Raises ``ValueError`` (bad section or target) and :class:`~sinks.base.SinkError`."""
        sink = make_sink(self.name, self.config, deployment=self.deployment)
        try:
            for target in self.targets:
                sink.register(target)
        except BaseException:
            sink.close()
            raise
        return sink


def process_lanes(spec: Spec, sinks: Mapping[str, Sink]) -> set[str]:
    """The sinks whose lanes run in a process of their own (ARCHITECTURE.md, "Lanes"):
    ``lane: process``, or ``lane: auto`` (the default) for a sink that lingers
    (:class:`~sinks.base.Refreshable`: OpenSearch) while the daemon writes to another sink as
    well. Alone, a sink has no other lane to take CPU time from."""
    return {name for name, sink in sinks.items()
            if spec.sinks[name].lane == "process" or (
                spec.sinks[name].lane == "auto" and len(sinks) > 1 and isinstance(sink, Refreshable))}


def lane_process_specs(spec: Spec, sinks: Mapping[str, Sink], views: Sequence[View], deployment: str,
                       record: DeadLetterSink | None, *, truncate_below: bool = False) -> dict[str, LaneProcessSpec]:
    """How each sink of :func:`process_lanes` opens its sink in its process (by sink name),
    with this process's log level, log format and secrets; ``truncate_below`` for derivation
    workers (:class:`~pgderive.runtime.applier.Applier`)."""
    return {name: LaneProcessSpec(name, SinkOpener.of(spec, name, views, deployment), record=record,
                                  log_level=logging.getLogger().getEffectiveLevel(), log_format=log_format(),
                                  secrets=tuple(registered_secrets()), truncate_below=truncate_below)
            for name in sorted(process_lanes(spec, sinks))}


def sinks_views(spec: Spec, views: Sequence[View]) -> dict[str, list[str]]:
    """Sink name → names of the views it serves (every configured sink, even without views)."""
    out: dict[str, list[str]] = {name: [] for name in spec.sinks}
    for v in list(views):
        out.setdefault(v.sink, []).append(v.name)
    return out


def sink_types(spec: Spec) -> dict[str, str]:
    """Sink name → its type from the YAML (``redis``, ``opensearch``, ``kafka``)."""
    return {name: s.type for name, s in spec.sinks.items()}
