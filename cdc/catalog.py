"""The source catalog: what pgderive reads about a table (columns, keys, replica identity) and
whether a logical slot with wal2json can be created.

Facts come from ``pg_class``, ``pg_attribute`` and ``pg_index`` (Postgres manual, "System
Catalogs"); the replica identity rules from ``ALTER TABLE ... REPLICA IDENTITY`` (what wal2json
sends as the old key of updates and deletes). Checking a YAML spec against these facts is
:mod:`views.check`.
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

__all__ = ["TableInfo", "table_info", "relation", "probe_plugin", "deployment_id", "PLUGIN", "RELKIND"]

PLUGIN = "wal2json"

RELKIND = {"v": "a view", "m": "a materialized view", "f": "a foreign table",
            "S": "a sequence", "i": "an index", "I": "an index", "c": "a composite type",
            "t": "a TOAST table", "p": "a partitioned table"}


@dataclass
class TableInfo:
    """What pgderive needs to know about one source table.

    Attributes:
        qualified: ``"schema.name"`` (unquoted).
        columns: column name → type (``format_type``, e.g. ``"character(84)"``), in attnum order.
        primary_key: primary key columns in key order; ``()`` without one.
        replica_identity: ``pg_class.relreplident``: ``d`` default, ``f`` full, ``i`` index,
            ``n`` nothing.
        identity_columns: the columns wal2json sends as the old key of updates/deletes: the
            primary key for ``d``, the index's columns for ``i``, every column for ``f``, ``()``
            for ``n`` (and for ``d`` without a primary key, ``i`` without its index).
    """

    qualified: str
    columns: dict[str, str]
    primary_key: tuple[str, ...]
    replica_identity: str
    identity_columns: tuple[str, ...]


def _index_columns(conn: psycopg.Connection, oid: int, flag: str) -> tuple[str, ...]:
    """Columns of the table's index with ``pg_index.<flag>`` set, in index order."""
    query = sql.SQL("""
        SELECT a.attname
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = %s AND i.{}
         ORDER BY k.ord""").format(sql.Identifier(flag))
    return tuple(r[0] for r in conn.execute(query, (oid,)))


def relation(conn: psycopg.Connection, schema: str, name: str) -> tuple[int, str, str] | None:
    """``(oid, relkind, relreplident)`` of ``schema.name``, or ``None``."""
    return conn.execute(
        """SELECT c.oid, c.relkind::text, c.relreplident::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %s AND c.relname = %s""", (schema, name)).fetchone()


def table_info(conn: psycopg.Connection, schema: str, name: str) -> TableInfo | None:
    """Catalog facts about the ordinary table ``schema.name`` (exact catalog names).

    Returns ``None`` if there is no such relation or it is not an ordinary table.
    """
    rel = relation(conn, schema, name)
    if rel is None or rel[1] != "r":
        return None
    oid, _, replident = rel
    columns: dict[str, str] = dict(conn.execute(
        """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
            WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
        (oid,)).fetchall())
    primary_key = _index_columns(conn, oid, "indisprimary")
    if replident == "d":
        identity = primary_key
    elif replident == "i":
        identity = _index_columns(conn, oid, "indisreplident")
    elif replident == "f":
        identity = tuple(columns)
    else:
        identity = ()
    return TableInfo(f"{schema}.{name}", columns, primary_key, replident, identity)


def probe_plugin(conn: psycopg.Connection, plugin: str, wait: float = 15.0) -> str | None:
    """Create and drop a temporary logical slot with ``plugin``; the error message, or None.

    Creating a logical slot waits for the transactions running at that moment to end; ``wait``
    seconds bound that wait (via ``lock_timeout``, restored afterwards).
    """
    slot = f"pgderive_probe_{conn.info.backend_pid}"
    try:
        with conn.transaction():
            shown = conn.execute("SHOW lock_timeout").fetchone()
            assert shown is not None  # SHOW always returns one row
            previous = shown[0]
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(wait * 1000)}ms",))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, %s, true)", (slot, plugin))
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))
    except psycopg.errors.LockNotAvailable:
        return (f"no slot could be created within {wait:g}s: a logical slot waits for the"
                " transactions running when it is created to end (look for long-running or idle"
                " in transaction sessions in pg_stat_activity)")
    except psycopg.Error as e:
        return e.diag.message_primary or str(e).strip()
    return None


def deployment_id(conn: psycopg.Connection, slot: str) -> str:
    """The id that namespaces pgderive's own bookkeeping in shared sinks for one deployment:
    ``"<system identifier>:<database>:<slot>"``, e.g. ``"7716351362375133678:bench:pgderive_bench"``.

    The system identifier is the cluster's, from ``pg_control_system()`` (Postgres manual,
    "System Information Functions", control data functions; executable by every role), set
    once by ``initdb`` and unique per cluster except for physical copies (``pg_basebackup``,
    a promoted standby keep it: set ``source.deployment`` in the YAML there). Slot names are
    unique within a cluster; the database name is there for the operator reading keys. The
    three parts cannot be confused with another deployment's: the identifier is digits and
    the slot ``[a-z0-9_]``, so the database is what lies between the first and the last
    ``:``. Raises ``psycopg.Error``.
    """
    row = conn.execute("SELECT system_identifier::text, current_database() FROM pg_control_system()").fetchone()
    assert row is not None  # the function returns exactly one row
    return f"{row[0]}:{row[1]}:{slot}"
