"""What a reload of the YAML changes (ARCHITECTURE.md, "Online rebuild": reload on SIGHUP).

A running daemon may take a new file whose ``views:`` differ: views added (bootstrapped
online), changed (their definition's fingerprint differs: rebuilt online into a new
generation, the old one served until the switch) and removed (no longer maintained; their data
is kept until ``pgderive drop VIEW``). Every other section (source, sinks, bootstrap, dead
letters) is fixed for the daemon's life: a change there is refused, the daemon keeps running
on the old file, and the refusal says to restart.
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
    """

    spec: Spec
    views: list[View]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no view is added, changed or removed."""
        return not (self.added or self.changed or self.removed)

    def summary(self) -> str:
        """One line, e.g. ``added a; changed b, c; removed d`` or ``no view changed``."""
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("changed", self.changed), ("removed", self.removed)) if names]
        return "; ".join(parts) if parts else "no view changed"


def plan_reload(old: Spec, new: Spec, old_views: Sequence[View], new_views: Sequence[View]) -> Reconfiguration:
    """Compare the running ``old`` spec and views with ``new`` ones (bound by
    :func:`views.check.build_views`). Raises :class:`ReloadRefused` when a section other than
    ``views`` changed."""
    fixed = [name for name in ("source", "sinks", "bootstrap", "dead_letters", "http")
             if getattr(old, name, None) != getattr(new, name, None)]
    if fixed:
        raise ReloadRefused(f"section(s) {', '.join(fixed)} changed: only views can change without a restart; "
                            "the daemon keeps running on the previous file (restart it to apply the rest)")
    before = {v.name: view_fingerprint(v) for v in old_views}
    after = {v.name: view_fingerprint(v) for v in new_views}
    return Reconfiguration(
        new, list(new_views),
        added=sorted(n for n in after if n not in before),
        changed=sorted(n for n in after if n in before and before[n] != after[n]),
        removed=sorted(n for n in before if n not in after))
