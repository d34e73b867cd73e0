"""The widget store's catalog facts (scripts/store.py) for tests without a database."""
from __future__ import annotations

from cdc.catalog import TableInfo

# The widget store's catalog (scripts/store.py), as views.check.check_source returns it.
CATALOG = {i.qualified: i for i in [
    TableInfo("public.categories", {"id": "integer", "name": "text", "description": "text"}, ("id",), "d", ("id",)),
    TableInfo("public.products", {"id": "integer", "category_id": "integer", "name": "text", "description": "text",
                                  "price": "numeric(10,2)", "created_at": "timestamp with time zone"},
              ("id",), "f", ("id", "category_id", "name", "description", "price", "created_at")),
    TableInfo("public.inventory", {"product_id": "integer", "stock": "integer",
                                   "updated_at": "timestamp with time zone"}, ("product_id",), "d", ("product_id",)),
    TableInfo("public.customers", {"id": "integer", "name": "text", "email": "text"}, ("id",), "d", ("id",)),
    TableInfo("public.orders", {"id": "integer", "customer_id": "integer", "status": "text",
                                "created_at": "timestamp with time zone"}, ("id",), "d", ("id",)),
    TableInfo("public.order_items", {"id": "integer", "order_id": "integer", "product_id": "integer",
                                     "quantity": "integer", "unit_price": "numeric(10,2)"},
              ("id",), "f", ("id", "order_id", "product_id", "quantity", "unit_price")),
    TableInfo("public.reviews", {"id": "integer", "product_id": "integer", "customer_id": "integer",
                                 "rating": "integer", "body": "text", "created_at": "timestamp with time zone"},
              ("id",), "f", ("id", "product_id", "customer_id", "rating", "body", "created_at")),
]}
