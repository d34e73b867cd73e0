"""Preflight: everything ``pgderive run`` needs, checked before anything is created.

``pgderive validate`` runs it after the YAML and source checks (:func:`views.check.check_source`),
and ``pgderive run`` runs it before it creates a replication slot or schema ``pgderive``, so a
first start that cannot succeed fails without leaving a slot behind (an inactive slot retains
WAL until it is dropped: Postgres manual, "Replication Slots"). Nothing here writes anything:
the sinks are asked with a read-only call, Postgres with catalog queries and the ``has_*_privilege``
functions (Postgres manual, "System Information Functions and Operators", "Access Privilege
Inquiry Functions").

The classification policy (no view copies a classified column into a sink that does not
``allow`` its tag, :mod:`views.policy`) is not checked here but by
:func:`views.check.check_source`, which both ``validate`` and ``run`` call before this module:
one function, the same messages.

What is checked (every problem is collected, none stops the others):

* **Sinks** (:meth:`sinks.base.Sink.check`): each sink a view uses is reachable and accepts the
  credentials. An unreachable sink is an operational problem (exit code 1); a refused one a
  configuration problem (exit code 2).
* **Names**: a view's OpenSearch alias must not be one of the names pgderive keeps for itself
  in that sink (:class:`sinks.base.ReservedNames`, e.g. the checkpoint index), nor could its
  generation indices (``ALIAS-g<16 hex digits>``) be one, nor may it have the form of another
  view's generation index (two views on one alias are refused by the spec already).
* **Kafka** (derivation workers, ``source.kafka``): the brokers answer a metadata request
  (an unreachable broker is an operational problem). Topics that do not exist yet are not a
  problem: the publisher may create them later, and the worker picks them up.
* **Privileges of the role** the DSN logs in as:

  - ``REPLICATION`` (or superuser): creating and reading a logical slot needs it (Postgres
    manual, "Streaming Replication Protocol" and "CREATE ROLE"); not for a derivation worker.
  - ``USAGE`` on the schema and ``SELECT`` on every table a view reads, included tables too
    (the snapshot's ``COPY``, read-backs and include queries).
  - schema ``pgderive``: missing, it is created on the first run, which needs ``CREATE`` on the
    database; present but behind this code's migrations, ``USAGE`` + ``CREATE`` on it; present
    and current, ``USAGE`` on it and ``SELECT, INSERT, UPDATE, DELETE`` on its tables (``USAGE``
    on its sequences). ``pgderive init`` lets an admin create it once
    (:func:`pgderive.state.schema.init_schema`).

Each problem names the YAML path it concerns, the privilege, the object and the view(s) that
need it, e.g. ``views.account_cache.table: view account_cache: role "app" lacks SELECT on
public.pgbench_accounts (GRANT SELECT ON public.pgbench_accounts TO app)``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import psycopg
from psycopg import sql

from sinks.base import ReservedNames, Sink, SinkError, ViewTarget
from sinks.factory import make_sink
from views.spec import IncludeSpec, Spec, SpecError

from ..state.schema import SCHEMA, latest_version
from .errors import EngineError

__all__ = ["Problem", "PreflightError", "preflight", "check_sinks", "check_names", "check_privileges", "check_kafka",
           "view_tables", "open_spec_sinks", "raise_for", "as_spec_error"]

#: Privileges a role needs on each table of schema ``pgderive`` once it is current.
_STATE_TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True, slots=True)
class Problem:
    """One preflight finding.

    Attributes:
        path: the dotted YAML path it concerns (``source.dsn``, ``sinks.cache``,
            ``views.account_cache.table``), for the file's line number.
        message: one line for a person: what is wrong and how to fix it; never a password.
        unreachable: True when a service could not be reached (operational, exit code 1),
            False for a configuration or privilege problem (exit code 2).
    """

    path: str
    message: str
    unreachable: bool = False


class PreflightError(EngineError):
    """Preflight found problems; nothing was created.

    Attributes:
        problems: every :class:`Problem`.
        exit_code: 1 when any service was unreachable (the check is incomplete), else 2.

    ``str()`` is one line per problem, ``file:line: path: message`` like
    :class:`views.spec.SpecError`.
    """

    def __init__(self, spec: Spec, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        self.exit_code = 1 if any(p.unreachable for p in problems) else 2
        super().__init__(str(spec.errors([(p.path, p.message) for p in problems])))


def _declared(name: str) -> str:
    """The view name as declared in the YAML (``NAME@SINK`` copies report at ``NAME``)."""
    return name.split("@", 1)[0]


def _include_tables(includes: Mapping[str, IncludeSpec]) -> Iterator[str]:
    for inc in includes.values():
        yield inc.qualified
        if inc.include:
            yield from _include_tables(inc.include)


def view_tables(spec: Spec) -> dict[str, list[str]]:
    """View name → the qualified tables (``"schema.name"``, unquoted) it reads: its own table,
    then every included table at any depth, without repeats. From the YAML alone."""
    out: dict[str, list[str]] = {}
    for name, view in spec.views.items():
        tables = [view.qualified, *(_include_tables(view.include) if view.include else ())]
        out[name] = list(dict.fromkeys(tables))
    return out


def open_spec_sinks(spec: Spec) -> tuple[dict[str, Sink], list[Problem]]:
    """Create (without connecting) every sink a view of ``spec`` uses and register each view's
    target, from the YAML alone. Returns the sinks by name and the problems of sinks that could
    not even be created (their settings); close the sinks after use."""
    sinks: dict[str, Sink] = {}
    problems: list[Problem] = []
    for name, view in spec.views.items():
        sink_name = view.sink_name
        if sink_name not in sinks:
            if any(p.path == f"sinks.{sink_name}" for p in problems):
                continue
            try:
                sinks[sink_name] = make_sink(sink_name, spec.sinks[sink_name].model_dump())
            except ValueError as e:
                problems.append(Problem(f"sinks.{sink_name}", str(e)))
                continue
        sinks[sink_name].register(ViewTarget(view=name, format=view.format, index=view.index,
                                             topic=view.topic_name,
                                             table=view.qualified if view.topic_name else None))
    return sinks, problems


def check_sinks(sinks: Mapping[str, Sink]) -> list[Problem]:
    """:meth:`~sinks.base.Sink.check` of every sink: one problem per sink that fails, at
    ``sinks.NAME`` (``unreachable`` when its :class:`SinkError` is retryable)."""
    problems: list[Problem] = []
    for name, sink in sinks.items():
        try:
            sink.check()
        except SinkError as e:
            text = " ".join(str(e).split())
            problems.append(Problem(f"sinks.{name}", text, unreachable=e.retryable))
    return problems


def _generation_of(alias: str, index: str) -> bool:
    return re.fullmatch(re.escape(alias) + r"-g[0-9a-f]{16}", index) is not None


def check_names(spec: Spec, sinks: Mapping[str, Sink]) -> list[Problem]:
    """Views' OpenSearch aliases against the names pgderive keeps for itself in their sink and
    against the other views' generation indices (same sink): one problem per clash, at
    ``views.X.index``."""
    problems: list[Problem] = []
    taken: dict[tuple[str, str], str] = {}  # (sink, alias) -> first view
    for name, view in spec.views.items():
        alias = view.index
        sink = sinks.get(view.sink_name)
        if alias is None or sink is None:
            continue
        path = f"views.{_declared(name)}.index"
        if isinstance(sink, ReservedNames):
            for own in sorted(sink.reserved_names()):
                if alias == own:
                    problems.append(Problem(path, f"view {name}: index {alias!r} is the index pgderive keeps "
                                                  f"its own bookkeeping in (sink {view.sink_name}): choose "
                                                  "another name"))
                elif _generation_of(alias, own):
                    problems.append(Problem(path, f"view {name}: the generation indices of alias {alias!r} "
                                                  f"({alias}-g<16 hex digits>) could take {own!r}, the index "
                                                  f"pgderive keeps its own bookkeeping in (sink "
                                                  f"{view.sink_name}): choose another name"))
        taken.setdefault((view.sink_name, alias), name)  # two views on one alias: a spec error already
    for (sink_name, alias), name in taken.items():
        for (other_sink, other), other_name in taken.items():
            if other_sink == sink_name and other_name != name and _generation_of(other, alias):
                problems.append(Problem(f"views.{_declared(name)}.index",
                                        f"view {name}: index {alias!r} has the form of a generation index "
                                        f"of view {other_name}'s alias {other!r}: choose another name"))
    return problems


def _ident(conn: psycopg.Connection[Any], *parts: str) -> str:
    return sql.Identifier(*parts).as_string(conn)


def check_kafka(spec: Spec) -> list[Problem]:
    """For a derivation worker (``source.kafka``): the brokers answer (5 s); nothing otherwise."""
    kafka = spec.source.kafka
    if kafka is None:
        return []
    from cdc.kafka_source import probe_brokers

    why = probe_brokers(kafka.bootstrap_servers, options=kafka.options)
    if why is None:
        return []
    return [Problem("source.kafka.bootstrap_servers",
                    f"cannot reach the Kafka brokers {kafka.bootstrap_servers}: {why}", unreachable=True)]


def check_privileges(spec: Spec, conn: psycopg.Connection[Any]) -> list[Problem]:
    """The privileges of ``conn``'s role that ``run`` needs (see the module docstring).

    ``conn``: a connection to the source as the configured role (autocommit or idle; left as
    found). Tables that do not exist are skipped (:func:`views.check.check_source` reports
    them). Raises :class:`psycopg.Error` only if the catalog cannot be read.
    """
    problems: list[Problem] = []
    with conn.transaction():
        row = conn.execute("""SELECT current_user, current_database(), r.rolsuper, r.rolreplication,
                                     has_database_privilege(current_database(), 'CREATE')
                                FROM pg_roles r WHERE r.rolname = current_user""").fetchone()
        assert row is not None  # current_user is a role
        role, database, superuser, replication, db_create = row
        who = f'role "{role}"'
        grantee = _ident(conn, role)
        if not (superuser or replication) and spec.source.kafka is None:  # a worker has no slot
            problems.append(Problem("source.dsn", f"{who} lacks the REPLICATION attribute, needed to create and "
                                                  f"read the replication slot (ALTER ROLE {grantee} REPLICATION)"))
        problems += _table_problems(spec, conn, who, grantee)
        if not superuser:
            problems += _state_problems(conn, who, grantee, database, bool(db_create))
    return problems


def _table_problems(spec: Spec, conn: psycopg.Connection[Any], who: str, grantee: str) -> list[Problem]:
    needed: dict[str, list[str]] = defaultdict(list)  # table -> views reading it
    for view, tables in view_tables(spec).items():
        for t in tables:
            needed[t].append(view)
    problems: list[Problem] = []
    for table, views in needed.items():
        schema, name = table.split(".", 1)
        row = conn.execute("""SELECT has_schema_privilege(n.oid, 'USAGE'), has_table_privilege(c.oid, 'SELECT')
                                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = %s AND c.relname = %s""", (schema, name)).fetchone()
        if row is None:
            continue  # reported by check_source
        usage, select = row
        missing = []
        if not usage:
            missing.append((f"USAGE on schema {schema}", f"GRANT USAGE ON SCHEMA {_ident(conn, schema)} TO {grantee}"))
        if not select:
            missing.append((f"SELECT on {table}", f"GRANT SELECT ON {_ident(conn, schema, name)} TO {grantee}"))
        for what, fix in missing:
            for view in views:
                problems.append(Problem(f"views.{_declared(view)}.table", f"view {view}: {who} lacks {what} ({fix})"))
    return problems


def _state_problems(conn: psycopg.Connection[Any], who: str, grantee: str, database: str,
                    db_create: bool) -> list[Problem]:
    path = "source.dsn"
    init = "have an admin run `pgderive init -c FILE --owner ROLE` once"
    row = conn.execute("""SELECT has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE')
                            FROM pg_namespace WHERE nspname = %s""", (SCHEMA,)).fetchone()
    if row is None:
        if db_create:
            return []
        return [Problem(path, f"{who} lacks CREATE on database {database}, needed to create schema {SCHEMA} "
                              f"on the first run: {init} (or GRANT CREATE ON DATABASE "
                              f"{_ident(conn, database)} TO {grantee})")]
    usage, create = row
    if not usage:
        return [Problem(path, f"{who} lacks USAGE on schema {SCHEMA} (GRANT USAGE ON SCHEMA {SCHEMA} TO {grantee}, "
                              f"or {init})")]
    version_table = conn.execute("SELECT to_regclass(%s)::oid", (f"{SCHEMA}.schema_version",)).fetchone()
    version = 0
    if version_table is not None and version_table[0] is not None:
        readable = conn.execute("SELECT has_table_privilege(%s, 'SELECT')", (version_table[0],)).fetchone()
        if readable is None or not readable[0]:
            return [Problem(path, f"{who} lacks SELECT on {SCHEMA}.schema_version (GRANT SELECT ON ALL TABLES "
                                  f"IN SCHEMA {SCHEMA} TO {grantee}, or {init})")]
        got = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(
            sql.Identifier(SCHEMA, "schema_version"))).fetchone()
        version = int(got[0]) if got is not None else 0
    if version < latest_version():
        if create:
            return []
        return [Problem(path, f"{who} lacks CREATE on schema {SCHEMA}, needed to bring it from version {version} "
                              f"to {latest_version()}: {init} (it migrates the schema)")]
    problems: list[Problem] = []
    for relname, relkind, privileges in conn.execute(
            """SELECT c.relname, c.relkind::text,
                      ARRAY[has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
                            has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE'),
                            c.relkind <> 'S' OR has_sequence_privilege(c.oid, 'USAGE')]
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'S') ORDER BY c.relname""", (SCHEMA,)):
        if relkind == "S":
            if not privileges[4]:
                problems.append(Problem(path, f"{who} lacks USAGE on sequence {SCHEMA}.{relname} (GRANT USAGE ON "
                                              f"ALL SEQUENCES IN SCHEMA {SCHEMA} TO {grantee}, or {init})"))
            continue
        wanted = ("SELECT",) if relname == "schema_version" else _STATE_TABLE_PRIVILEGES
        lacking = [p for p, ok in zip(_STATE_TABLE_PRIVILEGES, privileges[:4]) if p in wanted and not ok]
        if lacking:
            problems.append(Problem(path, f"{who} lacks {', '.join(lacking)} on {SCHEMA}.{relname} (GRANT "
                                          f"SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO "
                                          f"{grantee}, or {init})"))
    return problems


def preflight(spec: Spec, sinks: Mapping[str, Sink] | None = None, *,
              conn: psycopg.Connection[Any] | None = None) -> list[Problem]:
    """Every problem :func:`check_sinks`, :func:`check_names` and :func:`check_privileges` find.

    Args:
        spec: the loaded spec.
        sinks: the sinks by name, each with its views registered (the daemon's own); None
            creates them from the spec (:func:`open_spec_sinks`) and closes them afterwards.
        conn: a connection to the source as the configured role; None opens one (10 s connect
            timeout).

    Raises :class:`psycopg.Error` when the source cannot be reached (reported by the caller
    like any unreachable source).
    """
    problems: list[Problem] = []
    own = sinks is None
    if sinks is None:
        sinks, problems = open_spec_sinks(spec)
    try:
        problems += check_sinks(sinks)
        problems += check_names(spec, sinks)
        problems += check_kafka(spec)
        if conn is None:
            with psycopg.connect(spec.source.dsn, autocommit=True, connect_timeout=10,
                                 application_name="pgderive-preflight") as c:
                problems += check_privileges(spec, c)
        else:
            problems += check_privileges(spec, conn)
    finally:
        if own:
            for s in sinks.values():
                s.close()
    return problems


def raise_for(spec: Spec, problems: Sequence[Problem]) -> None:
    """Raise :class:`PreflightError` with ``problems``, if any."""
    if problems:
        raise PreflightError(spec, problems)


def as_spec_error(spec: Spec, problems: Sequence[Problem]) -> SpecError:
    """``problems`` as a :class:`~views.spec.SpecError` (to print like the YAML checks)."""
    return spec.errors([(p.path, p.message) for p in problems])
