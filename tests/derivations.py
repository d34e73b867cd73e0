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
