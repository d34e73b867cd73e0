"""Checks of a spec against the source: server settings, the output plugin, the views' tables.

:func:`check_source` is what ``pgderive validate`` (and the daemon at start) runs after the YAML
itself is valid: every problem is reported at the YAML path it concerns, all at once.
:func:`build_views` then binds every view to its table's catalog facts.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping

import psycopg
from psycopg import sql

from cdc.catalog import PLUGIN, RELKIND, TableInfo, probe_plugin, relation, table_info

from .aggregate import AggregateError
from .derive import View, load_function
from .policy import policy_problems
from .spec import IncludeSpec, Spec, ViewSpec
from .spec.models import COLUMN_RE

__all__ = ["check_source", "build_views", "catalog_facts"]


def _unknown(column: str, info: TableInfo) -> str:
    message = f"unknown column {column!r} in table {info.qualified}"
    close = difflib.get_close_matches(column, list(info.columns), n=1)
    return message + (f" (did you mean {close[0]!r}?)" if close else "")


def _view_problems(view: ViewSpec, path: str, info: TableInfo,
                   conn: psycopg.Connection) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    table = sql.Identifier(view.schema, view.name)
    fix = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table).as_string(conn)

    # rows must be identifiable in the stream: updates/deletes carry the replica identity
    if not info.identity_columns:
        if info.replica_identity == "n":
            why, remedy = "has REPLICA IDENTITY NOTHING", f"run {fix}"
            if info.primary_key:
                default = sql.SQL("ALTER TABLE {} REPLICA IDENTITY DEFAULT").format(table)
                remedy = f"run {default.as_string(conn)} (or {fix})"
        elif info.replica_identity == "i":
            why, remedy = "has REPLICA IDENTITY USING INDEX but that index is gone", f"run {fix}"
        else:
            why, remedy = "has no primary key", f"add a primary key or run {fix}"
        problems.append((f"{path}.table", f"table {info.qualified} {why}: its updates and deletes"
                                          f" cannot be streamed; {remedy}"))

    if view.group_by is not None:  # one record per group: the key is over group_by columns
        for i, column in enumerate(view.group_by):
            if column not in info.columns:
                problems.append((f"{path}.group_by[{i}]", _unknown(column, info)))
        if view.key_template is not None:
            for column in view.key_template.columns:
                if column not in view.group_by:
                    problems.append((f"{path}.key", f"key column {column!r} is not in group_by"))
    # key columns: must exist, and be part of the replica identity (a delete carries only it)
    elif view.key_template is not None:
        for column in view.key_template.columns:
            if column not in info.columns:
                problems.append((f"{path}.key", _unknown(column, info)))
            elif info.identity_columns and column not in info.identity_columns:
                problems.append((
                    f"{path}.key",
                    f"key column {column!r} is not in the replica identity of {info.qualified}"
                    f" ({', '.join(info.identity_columns)}): deletes and key changes could not be"
                    f" applied; key on those columns or run {fix}"))
    elif not info.primary_key:
        problems.append((f"{path}.key", f"required: table {info.qualified} has no primary key to"
                                        " default to; declare a key template over columns that"
                                        " identify a row"))

    problems += _field_problems(view.fields, path, info)
    if view.where is not None:
        # Imported here, as in views.derive: the compiler loads sqlglot (~8 MB of RSS, ~0.3 s),
        # which a daemon whose views have no `where:` never needs.
        from .where import Where, WhereError
        try:
            Where(view.where, info.columns)
        except WhereError as e:
            problems.append((f"{path}.where", str(e)))
    if view.derive is not None:
        try:
            load_function(view.derive)
        except ValueError as e:
            problems.append((f"{path}.derive", str(e)))
    return problems


def _field_problems(fields: list[str] | dict[str, str] | None, path: str,
                    info: TableInfo) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if isinstance(fields, list):
        for i, column in enumerate(fields):
            if column not in info.columns:
                problems.append((f"{path}.fields[{i}]", _unknown(column, info)))
    elif isinstance(fields, dict):
        for out, column in fields.items():
            if column not in info.columns:
                problems.append((f"{path}.fields.{out}", _unknown(column, info)))
    return problems


def _include_problems(includes: Mapping[str, IncludeSpec], path: str, parent: TableInfo,
                      conn: psycopg.Connection, infos: dict[str, TableInfo]) -> list[tuple[str, str]]:
    """Check ``include`` entries recursively, loading their tables' facts into ``infos``."""
    problems: list[tuple[str, str]] = []
    for name, inc in includes.items():
        ipath = f"{path}.include.{name}"
        info = infos.get(inc.qualified)
        if info is None:
            info = table_info(conn, *inc.qualified.split(".", 1))
            if info is None:
                problems.append((f"{ipath}.table", f"table {inc.qualified} does not exist or is not an ordinary table"))
                continue
            infos[inc.qualified] = info
        parent_col, col = inc.link
        if parent_col not in parent.columns:
            problems.append((f"{ipath}.on", _unknown(parent_col, parent)))
        if col not in info.columns:
            problems.append((f"{ipath}.on", _unknown(col, info)))
        elif col not in info.identity_columns:
            # Updates/deletes of a related row must say which parent it belonged to.
            fix = sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(
                sql.Identifier(*inc.qualified.split(".", 1))).as_string(conn)
            if info.replica_identity != "f":
                problems.append((f"{ipath}.on", f"{inc.qualified}.{col} is not in the table's replica identity "
                                 f"({', '.join(info.identity_columns) or 'none'}): a moved or deleted row's old "
                                 f"{col} would not be in the WAL; run {fix}"))
        if not info.identity_columns:
            problems.append((f"{ipath}.table", f"table {inc.qualified} has no replica identity: add a primary key "
                             "or set REPLICA IDENTITY FULL"))
        problems += _field_problems(inc.fields, ipath, info)
        for i, (c, _) in enumerate(inc.ordering):
            if c not in info.columns:
                problems.append((f"{ipath}.order_by[{i}]", _unknown(c, info)))
        if inc.include:
            problems += _include_problems(inc.include, ipath, info, conn, infos)
    return problems


def check_source(spec: Spec, conn: psycopg.Connection) -> dict[str, TableInfo]:
    """Check the source database against the spec; collect every problem.

    Checks: ``wal_level`` is ``logical``; the wal2json output plugin can create a slot (a
    temporary slot is created and dropped: needs REPLICATION or superuser and a free slot;
    neither for a derivation worker, ``source.kafka``);
    each view's table exists and is an ordinary table; its key and fields name existing
    columns; its updates/deletes are identifiable (primary key or REPLICA IDENTITY FULL/USING
    INDEX) and the key columns are part of that identity; opensearch views without ``key``
    have a primary key to default to; ``classification`` names existing columns and no view
    copies a classified column into a sink whose ``allow`` lacks its tag
    (:func:`views.policy.policy_problems`).

    Args:
        spec: a validated spec (from :func:`views.spec.load_spec`).
        conn: a connection to the source database (not in a failed transaction; its
            transaction state is left as found).

    Returns:
        ``TableInfo`` by qualified table name, for every view's table.

    Raises:
        views.spec.SpecError: every problem, each at its YAML path (``source.dsn``, ``views.X.table``, ...).
    """
    problems: list[tuple[str, str]] = []
    with conn.transaction():
        infos = _check(spec, conn, problems)
    if problems:
        raise spec.errors(problems)
    return infos


def _check(spec: Spec, conn: psycopg.Connection,
           problems: list[tuple[str, str]]) -> dict[str, TableInfo]:
    where = spec.source.redacted_dsn()
    shown = conn.execute("SHOW wal_level").fetchone()
    assert shown is not None  # SHOW always returns one row
    wal_level = shown[0]
    if spec.source.kafka is not None:
        pass  # a derivation worker reads Kafka: no slot, so neither wal_level nor the plugin matter
    elif wal_level != "logical":
        problems.append(("source.dsn", f"wal_level is {wal_level!r} on {where}: set"
                                       " wal_level=logical in postgresql.conf and restart the"
                                       " server"))
    else:
        error = probe_plugin(conn, PLUGIN)
        if error:
            major = (conn.info.server_version or 0) // 10000
            problems.append(("source.dsn", f"cannot create a logical replication slot with"
                                           f" {PLUGIN} on {where}: {error} (install it, e.g."
                                           f" Debian postgresql-{major}-{PLUGIN}, and check the"
                                           " role has REPLICATION and max_replication_slots"
                                           " has room)"))

    infos: dict[str, TableInfo] = {}
    for name, view in spec.views.items():
        path = f"views.{name.split('@', 1)[0]}"  # NAME@SINK copies report at the declared view
        if view.qualified not in infos:
            info = table_info(conn, view.schema, view.name)
            if info is None:
                rel = relation(conn, view.schema, view.name)
                what = "does not exist" if rel is None else \
                    f"is {RELKIND.get(rel[1], f'of relkind {rel[1]!r}')}, not an ordinary table"
                problems.append((f"{path}.table", f"table {view.qualified} {what}"))
                continue
            infos[view.qualified] = info
        problems += _view_problems(view, path, infos[view.qualified], conn)
        if view.include:
            problems += _include_problems(view.include, path, infos[view.qualified], conn, infos)
    for column in spec.classification:  # classified tables no view reads still must exist
        m = COLUMN_RE.match(column)
        if m is not None and f"{m.group(1)}.{m.group(2)}" not in infos:
            info = table_info(conn, m.group(1), m.group(2))
            if info is not None:
                infos[info.qualified] = info
    problems += policy_problems(spec, infos)
    return infos


def _named_tables(spec: Spec) -> list[tuple[str, str]]:
    """``(schema, name)`` of every table the spec names: views, includes at any depth, classification."""
    found: list[tuple[str, str]] = []

    def walk(includes: Mapping[str, IncludeSpec] | None) -> None:
        for inc in (includes or {}).values():
            found.append(tuple(inc.qualified.split(".", 1)))  # type: ignore[arg-type]
            walk(inc.include)
    for view in spec.views.values():
        found.append((view.schema, view.name))
        walk(view.include)
    for column in spec.classification:
        m = COLUMN_RE.match(column)
        if m is not None:
            found.append((m.group(1), m.group(2)))
    return list(dict.fromkeys(found))


def catalog_facts(spec: Spec, conn: psycopg.Connection) -> dict[str, TableInfo]:
    """Catalog facts (``schema.name`` → :class:`TableInfo`) of every table the spec names, read
    without checking anything (``pgderive lineage``); tables that do not exist are left out.

    Raises :class:`psycopg.Error` when the catalog cannot be read."""
    infos: dict[str, TableInfo] = {}
    for schema, name in _named_tables(spec):
        info = table_info(conn, schema, name)
        if info is not None:
            infos[info.qualified] = info
    return infos


def build_views(spec: Spec, conn: psycopg.Connection, names: Iterable[str] | None = None) -> list[View]:
    """Check the spec against the source catalog and bind every (or the named) view.

    Raises :class:`~views.spec.SpecError` naming the YAML path of each problem.
    """
    infos = check_source(spec, conn)
    wanted = set(names) if names is not None else None
    views: list[View] = []
    problems: list[tuple[str, str]] = []
    for name, vspec in spec.views.items():
        if wanted is not None and name not in wanted:
            continue
        try:
            views.append(View(name, vspec, infos[vspec.qualified], infos))
        except AggregateError as e:
            problems.append((f"views.{name}.aggregate", str(e)))
        except ValueError as e:
            problems.append((f"views.{name}.key", str(e)))
    if problems:
        raise spec.errors(problems)
    return views
