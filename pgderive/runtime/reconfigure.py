"""What a reload of the YAML changes (ARCHITECTURE.md, "Online rebuild": reload on SIGHUP).

A running daemon may take a new file whose ``views:`` differ: views added (bootstrapped
online), changed (their definition's fingerprint differs: rebuilt online into a new
generation, the old one served until the switch) and removed (no longer maintained; their data
is kept until ``pgderive drop VIEW``). The classification policy may change too:
``classification`` and the sinks' ``allow`` lists, since the new file is bound by
:func:`views.check.build_views`, whose policy check (:mod:`views.policy`) refuses a file in
which a view would copy a classified column where it may not (tightening the policy under a
running view is refused like any bad file; loosening it is taken). Every other section
(source, the rest of sinks, bootstrap, dead letters, http) is fixed for the daemon's life: a
change there is refused, the daemon keeps running on the old file, and the refusal says to
restart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from views.derive import View, view_fingerprint
from views.spec import Spec

__all__ = ["Reconfiguration", "ReloadRefused", "plan_reload"]


class ReloadRefused(ValueError):
    """The new file cannot be taken without a restart (or is invalid); the message says why."""


@dataclass(frozen=True)
class Reconfiguration:
    """The difference between the running views and a new file's.

    Attributes:
        spec: the new spec; views: its views, bound to the source catalog.
        added, changed, removed: view names, sorted.
        policy_changed: ``classification`` or a sink's ``allow`` differs (the new file passed
            the policy check).
    """

    spec: Spec
    views: list[View]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    policy_changed: bool = False

    @property
    def empty(self) -> bool:
        """True when no view is added, changed or removed."""
        return not (self.added or self.changed or self.removed)

    def summary(self) -> str:
        """One line, e.g. ``added a; changed b, c; removed d`` or ``no view changed``, followed
        by ``; classification policy changed`` when :attr:`policy_changed`."""
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("changed", self.changed), ("removed", self.removed)) if names]
        text = "; ".join(parts) if parts else "no view changed"
        return text + ("; classification policy changed" if self.policy_changed else "")


def plan_reload(old: Spec, new: Spec, old_views: Sequence[View], new_views: Sequence[View]) -> Reconfiguration:
    """Compare the running ``old`` spec and views with ``new`` ones (bound by
    :func:`views.check.build_views`, which checks the classification policy). Raises
    :class:`ReloadRefused` when a section other than ``views``, ``classification`` and the
    sinks' ``allow`` changed."""
    fixed = [name for name in ("source", "bootstrap", "dead_letters", "http")
             if getattr(old, name, None) != getattr(new, name, None)]
    if _without_allow(old) != _without_allow(new):
        fixed.insert(1, "sinks")
    if fixed:
        raise ReloadRefused(f"section(s) {', '.join(fixed)} changed: only views can change without a restart; "
                            "the daemon keeps running on the previous file (restart it to apply the rest)")
    policy = old.classification != new.classification or _allows(old) != _allows(new)
    before = {v.name: view_fingerprint(v) for v in old_views}
    after = {v.name: view_fingerprint(v) for v in new_views}
    return Reconfiguration(
        new, list(new_views),
        added=sorted(n for n in after if n not in before),
        changed=sorted(n for n in after if n in before and before[n] != after[n]),
        removed=sorted(n for n in before if n not in after), policy_changed=policy)


def _allows(spec: Spec) -> dict[str, list[str]]:
    return {n: list(s.allow) for n, s in spec.sinks.items()}


def _without_allow(spec: Spec) -> dict[str, object]:
    """The sinks with their ``allow`` left out (what a reload may not change)."""
    return {n: s.model_copy(update={"allow": []}) for n, s in spec.sinks.items()}
