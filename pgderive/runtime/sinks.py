"""Connecting the sinks a set of views uses."""
from __future__ import annotations

from typing import Sequence

from sinks.base import Sink
from sinks.factory import make_sink
from views.derive import View
from views.spec import Spec

__all__ = ["open_sinks"]


def open_sinks(spec: Spec, views: Sequence[View]) -> dict[str, Sink]:
    """Connect the sinks the views use and register each view's target layout."""
    sinks: dict[str, Sink] = {}
    for v in views:
        if v.sink not in sinks:
            sinks[v.sink] = make_sink(v.sink, spec.sinks[v.sink].model_dump())
        sinks[v.sink].register(v.target)
    return sinks
