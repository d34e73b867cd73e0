"""Shared by the demos: drop a demo's replication slot when it ends (an inactive slot retains
WAL until the disk fills), unless ``PGDERIVE_DEMO_KEEP_SLOT=1`` asks to keep it."""
from __future__ import annotations

import os

import psycopg
from rich.console import Console

KEEP_SLOT = os.environ.get("PGDERIVE_DEMO_KEEP_SLOT", "") not in ("", "0")


def drop_slot(dsn: str, slot: str, console: Console) -> None:
    """Drop ``slot`` if it exists and no walsender holds it (the daemon stopped); reports what
    it did on ``console``. Never raises for a Postgres error (prints it instead)."""
    if KEEP_SLOT:
        console.print(f"keeping replication slot {slot} (PGDERIVE_DEMO_KEEP_SLOT is set): "
                      "it retains WAL until dropped")
        return
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                               "WHERE slot_name = %s AND NOT active", (slot,)).fetchone()
    except psycopg.Error as e:
        console.print(f"[yellow]could not drop replication slot {slot}: {e}[/]")
        return
    if row is not None:
        console.print(f"dropped replication slot {slot} (PGDERIVE_DEMO_KEEP_SLOT=1 keeps it)")
