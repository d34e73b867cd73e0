"""Versioned migrations of schema ``pgderive``, pgderive's own state in the source database.

pgderive keeps its execution state next to the data it describes (ARCHITECTURE.md, "State"):
``pgderive.slot_state`` (:mod:`pgderive.state.slots`), ``pgderive.views``
(:mod:`pgderive.state.registry`), ``pgderive.dead_letters`` (:mod:`pgderive.state.deadletters`),
``pgderive.agg_rows``, ``pgderive.agg_groups`` and ``pgderive.agg_touched``
(:mod:`pgderive.state.aggregates`). Their DDL is the numbered SQL files in ``migrations/``
(package data, read with :mod:`importlib.resources`): ``NNNN_name.sql``, versions 1, 2, 3, …
without gaps, applied in order and never edited once released — a change to the schema is a new
file.

Table ``pgderive.schema_version``: one row per applied migration — ``version`` (int, PK),
``name`` (the file name without number and ``.sql``), ``applied_at`` (timestamptz). The
database's version is ``max(version)``; 0 when the table does not exist.

:func:`migrate` is what every store calls once per connection:

* **Up to date: read only.** It first reads ``pgderive.schema_version`` and returns when the
  database is at this code's version, without any DDL or lock, so a least-privilege role that
  owns nothing — ``USAGE`` on schema ``pgderive`` and ``SELECT``/``INSERT``/``UPDATE``/``DELETE``
  on its tables — can start. ``CREATE SCHEMA IF NOT EXISTS`` would not do: Postgres checks the
  ``CREATE`` privilege on the database before it looks whether the schema exists (Postgres
  manual, "CREATE SCHEMA"); the schema is therefore only created when ``to_regnamespace`` says
  it is missing.
* **Behind: one transaction per migration, under an advisory lock.** Each pending migration
  runs with its version row in one transaction, so a failure leaves the database at the last
  complete version. Concurrent starts are serialized by the session-level advisory lock
  ``pg_advisory_lock(LOCK_KEY)`` (Postgres manual, "Advisory Lock Functions"), held around
  those transactions and released at the end (or when the session ends); the one that waited
  re-reads the version and finds the work done.

  Why not ``pg_advisory_xact_lock`` inside each transaction: a backend refreshes its catalog
  caches at transaction start and when it takes a lock on a relation, not when it is granted an
  advisory lock. A transaction that began before another session committed ``CREATE SCHEMA
  pgderive`` and then waited for the advisory lock still resolves ``pgderive`` from its stale
  cache as missing, creates it again and fails with a unique violation (measured: 5 of 6
  concurrent starts failed). With the session lock every migration transaction *begins* after
  the lock is held, so it sees every migration committed before.
* **Adopting older databases.** The first migrations are the DDL pgderive ran before it had
  versions, with ``IF NOT EXISTS``: a database that already has those tables is adopted as it is
  and recorded at the current version.
* **Ahead: refused.** A database recorded at a version newer than this code knows raises
  :class:`SchemaVersionError` naming both versions: an older pgderive must not write state whose
  shape it does not know.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import pq, sql

__all__ = ["LOCK_KEY", "SCHEMA", "Migration", "SchemaVersionError", "current_version", "init_schema",
           "latest_version", "migrate", "migrations"]

SCHEMA = "pgderive"
VERSION_TABLE = "schema_version"

#: The advisory lock key (bigint) that serializes migrations: the ASCII bytes of ``pgderive`` as a
#: big-endian integer (0x7067646572697665, fits a signed bigint).
LOCK_KEY = int.from_bytes(b"pgderive", "big")

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_QUALIFIED = sql.Identifier(SCHEMA, VERSION_TABLE)
_VERSION_DDL = sql.SQL("""
CREATE TABLE IF NOT EXISTS {table} (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)""").format(table=_QUALIFIED)


class SchemaVersionError(RuntimeError):
    """The database's ``pgderive`` schema is newer than this code, or the migrations shipped with
    it are malformed."""


@dataclass(slots=True, frozen=True)
class Migration:
    """One file of ``migrations/``: ``version`` (its number), ``name`` and the SQL text."""

    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """Every shipped migration, by version (read once per process).

    Raises :class:`SchemaVersionError` if a ``.sql`` file is misnamed or the versions are not
    1, 2, 3, … without gaps or repeats."""
    found: list[Migration] = []
    for entry in (resources.files("pgderive.state") / "migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.match(entry.name)
        if match is None:
            raise SchemaVersionError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaVersionError(f"migration versions must be 1..{len(found)} without gaps, found {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this code knows: the number of the last migration."""
    return len(migrations())


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The version recorded in ``pgderive.schema_version`` (0 when the table does not exist).

    Reads only; inside a transaction of its own when ``conn`` is idle, else in the caller's."""
    with conn.transaction():
        return _recorded(conn) or 0


def _scalar(conn: psycopg.Connection[Any], query: str | sql.Composed, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row of ``query``."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise psycopg.ProgrammingError(f"no row from {query!r}")
    return row[0]


def _recorded(conn: psycopg.Connection[Any]) -> int | None:
    """``max(version)`` of ``pgderive.schema_version`` (0 if empty), None if there is no such table."""
    if not _scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.{VERSION_TABLE}",)):
        return None
    return int(_scalar(conn, sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(_QUALIFIED)))


def _check_not_newer(version: int, latest: int) -> None:
    if version > latest:
        raise SchemaVersionError(
            f"database schema {SCHEMA} is at version {version}, newer than version {latest} that this "
            f"pgderive knows: upgrade pgderive (an older release must not write state of a newer one)")


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring schema ``pgderive`` in ``conn``'s database to :func:`latest_version`; returns it.

    ``conn`` must be idle (no transaction open; autocommit or not): each step commits on its
    own. When the database is already current this only reads ``pgderive.schema_version`` (no
    DDL, no lock, no ``CREATE`` privilege needed). Otherwise, holding the session advisory lock
    ``LOCK_KEY``, every pending migration runs in its own transaction and is recorded in
    ``pgderive.schema_version``; concurrent callers wait for each other and all return the same
    version.

    Raises :class:`SchemaVersionError` if the database is at a newer version than this code,
    :class:`ValueError` if ``conn`` is inside a transaction, :class:`psycopg.Error` if Postgres
    refuses (e.g. no ``CREATE`` privilege where a migration is due).
    """
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("migrate() needs an idle connection: each migration commits on its own")
    latest = latest_version()
    version = current_version(conn)
    _check_not_newer(version, latest)
    if version == latest:
        return version
    with conn.transaction():
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        while True:
            # Begun after the lock was granted: sees every migration another session committed.
            with conn.transaction():
                recorded = _recorded(conn)
                if recorded is None:
                    if not _scalar(conn, "SELECT to_regnamespace(%s) IS NOT NULL", (SCHEMA,)):
                        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
                    conn.execute(_VERSION_DDL)
                version = recorded or 0
                _check_not_newer(version, latest)
                if version == latest:
                    return version
                step = migrations()[version]  # versions are 1..latest: index v holds version v + 1
                conn.execute(step.sql)
                conn.execute(sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(_QUALIFIED),
                             (step.version, step.name))
    finally:
        if not conn.broken:  # a lost session has released its locks already
            with conn.transaction():
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def init_schema(conn: psycopg.Connection[Any], owner: str | None = None) -> int:
    """``pgderive init``: an admin creates schema ``pgderive`` and applies every migration, so a
    least-privilege role can then run without ``CREATE`` on the database; returns the version.

    With ``owner`` (an existing role), the schema and every table in it (their sequences
    follow their tables: Postgres manual, "ALTER TABLE", ``OWNER TO``) are owned by that
    role afterwards, so it needs no further grant on them. Without it they stay the admin's and
    the role needs ``USAGE`` on the schema, ``SELECT, INSERT, UPDATE, DELETE`` on its tables and
    ``USAGE`` on its sequences. Idempotent: a current schema is only (re)assigned.

    ``conn``: an idle connection as a role that may create the schema (``CREATE`` on the
    database) and, with ``owner``, is a member of ``owner`` or superuser (Postgres manual,
    "ALTER SCHEMA"). Raises :class:`LookupError` when ``owner`` does not exist,
    :class:`SchemaVersionError` like :func:`migrate`, :class:`psycopg.Error` when Postgres
    refuses.
    """
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("init_schema() needs an idle connection")
    with conn.transaction():
        if owner is not None and conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)).fetchone() is None:
            raise LookupError(f"role {owner!r} does not exist")
        if not _scalar(conn, "SELECT to_regnamespace(%s) IS NOT NULL", (SCHEMA,)):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    version = migrate(conn)
    if owner is not None:
        with conn.transaction():
            who = sql.Identifier(owner)
            conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(SCHEMA), who))
            tables = conn.execute(
                """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname""", (SCHEMA,)).fetchall()
            for (name,) in tables:
                conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(SCHEMA, name), who))
    return version
