"""``derive:`` functions used by the tests (imported by the daemon as ``tests.derivations:…``)."""
from __future__ import annotations

from typing import Any


def product_card(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A search card: title-cased name, price in cents, review count; hidden products (name
    starting with '_') are left out; a name 'boom' raises (a dead letter)."""
    name = doc["name"] or ""
    if name == "boom":
        raise ValueError("boom is not a product")
    if name.startswith("_"):
        return None
    cents = None if doc["price"] is None else int(round(float(doc["price"]) * 100))
    return {"title": name.title(), "cents": cents, "reviews": len(doc.get("reviews") or [])}


def shout(doc: dict[str, Any]) -> dict[str, Any] | None:
    """``v`` in capitals; rows with ``g`` 3 are left out (a ``derive`` view over a split table)."""
    if doc.get("g") == 3:
        return None
    return {**doc, "v": (doc.get("v") or "").upper()}
