"""The YAML spec: one file declaring the source, the sinks and the views (DESIGN.md, "YAML").

Loading goes: YAML text → node tree (for line numbers) → plain data → ``${VAR}``
interpolation → pydantic models → cross checks (view ↔ sink). Every problem found on the way is
collected into one :class:`SpecError` whose lines read ``file:line: dotted.path: message``.

Interpolation applies to string scalars after YAML parsing: ``${VAR}`` is the variable (an error
if unset), ``${VAR:-default}`` the default when the variable is unset or empty, ``$$`` a literal
``$``; any other ``$`` is kept as is. Defaults cannot themselves contain ``}`` or ``${...}``.

Table names follow SQL: ``schema.name`` or ``name`` (schema ``public``); unquoted parts are
folded to lower case, double-quoted parts (``'public."Orders"'``) are kept exactly.
"""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Iterable, Literal, Mapping, NamedTuple, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, field_validator)
from pydantic_core import PydanticCustomError

from views.template import KeyTemplate

__all__ = [
    "Spec", "SourceSpec", "SinkSpec", "RedisSinkSpec", "OpenSearchSinkSpec", "ViewSpec", "IncludeSpec",
    "SpecError", "Problem", "load_spec", "parse_spec", "parse_table",
]

SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")
VIEW_NAME_RE = re.compile(r"^[a-zA-Z0-9_]+$")
# Lowercase, not starting with '_', '-', '+' or '.', no '\/*?"<>| ,#:'; short enough to leave
# room for the generation suffix of the physical indices behind the alias.
INDEX_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,199}$")


# --------------------------------------------------------------------------------------- errors

class Problem(NamedTuple):
    """One spec problem: dotted YAML path (``""`` for the whole file), 1-based line or None."""

    path: str
    line: int | None
    message: str


class SpecError(ValueError):
    """The spec (or the source it names) is not usable.

    Attributes:
        problems: every :class:`Problem` found, in file order where known.
        filename: the YAML file name (``"<string>"`` for text).

    ``str(err)`` is one line per problem: ``file:line: path: message`` (``:line`` omitted when
    unknown, ``path: `` omitted for whole-file problems).
    """

    def __init__(self, problems: Iterable[tuple[str, int | None, str]], filename: str = "<string>"):
        self.problems = [Problem(*p) for p in problems]
        self.filename = filename
        super().__init__(self._format())

    def _format(self) -> str:
        out = []
        for path, line, message in self.problems:
            where = self.filename if line is None else f"{self.filename}:{line}"
            out.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        return "\n".join(out)


def _fail(message: str, subpath: str = "") -> PydanticCustomError:
    """A validator error; ``subpath`` (``"[2]"``, ``".out"``) extends the field's YAML path."""
    return PydanticCustomError("pgderive", message, {"pgderive_subpath": subpath})


def _kind(value: Any) -> str:
    """How a YAML value is called in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# --------------------------------------------------------------------------------------- models

_STRICT = ConfigDict(extra="forbid")


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URI userinfo, URI query, key=value form)."""
    if re.match(r"\s*postgres(?:ql)?://", dsn):
        dsn = re.sub(r"^(\s*postgres(?:ql)?://[^:/?#@]*):[^/?#]*@", r"\1:***@", dsn)
        return re.sub(r"([?&]password=)[^&#]*", r"\1***", dsn)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)", r"\1***", dsn)


class SourceSpec(BaseModel):
    """``source:`` — the Postgres database and the logical replication slot.

    Attributes:
        dsn: libpq connection string (URI or key=value). Never log it: use :meth:`redacted_dsn`.
        slot: replication slot name, ``^[a-z0-9_]{1,63}$``.
    """

    model_config = _STRICT
    dsn: str = Field(repr=False)
    slot: str

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if not v.strip():
            raise _fail("must be a Postgres connection string, e.g. postgresql://user@host:5432/db")
        return v

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str) -> str:
        if not SLOT_RE.match(v):
            raise _fail(f"invalid slot name {v!r}: use 1-63 lowercase letters, digits and"
                        " underscores")
        return v

    def redacted_dsn(self) -> str:
        """The DSN with any password hidden, for messages and logs."""
        return redact_dsn(self.dsn)


class RedisSinkSpec(BaseModel):
    """``{type: redis, url: ...}`` — a Redis server (``redis://``, ``rediss://``, ``unix://``)."""

    model_config = _STRICT
    type: Literal["redis"]
    url: str = Field("redis://127.0.0.1:6380/0", repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise _fail("must be a redis://, rediss:// or unix:// URL")
        return v


class OpenSearchSinkSpec(BaseModel):
    """``{type: opensearch, hosts: [...]}`` — an OpenSearch cluster (``http(s)://host:port``)."""

    model_config = _STRICT
    type: Literal["opensearch"]
    hosts: list[str]

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise _fail("must list at least one host, e.g. [\"http://127.0.0.1:9201\"]")
        for i, host in enumerate(v):
            if not host.strip() or ("://" in host and not re.match(r"^https?://", host)):
                raise _fail("must be an http:// or https:// URL", f"[{i}]")
        return v


SinkSpec = Annotated[Union[RedisSinkSpec, OpenSearchSinkSpec], Field(discriminator="type")]

_UNQUOTED = r"[A-Za-z_][A-Za-z0-9_$]*"
_QUOTED = r'"(?:[^"]|"")+"'
_TABLE_RE = re.compile(rf"^({_QUOTED}|{_UNQUOTED})(?:\.({_QUOTED}|{_UNQUOTED}))?$")


def parse_table(text: str) -> tuple[str, str]:
    """``"schema.name"`` / ``"name"`` → ``(schema, name)`` as in the catalog.

    Unquoted parts fold to lower case; double-quoted parts are kept (``""`` → ``"``).

    Raises:
        ValueError: not one or two SQL identifiers separated by a dot.
    """
    m = _TABLE_RE.match(text.strip())
    if not m:
        raise ValueError(f"invalid table name {text!r}: use schema.table or table"
                         " (double-quote mixed-case names: 'public.\"Orders\"')")

    def ident(part: str) -> str:
        return part[1:-1].replace('""', '"') if part.startswith('"') else part.lower()

    first, second = m.group(1), m.group(2)
    return ("public", ident(first)) if second is None else (ident(first), ident(second))


ORDER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_$]*)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)
DERIVE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def _check_table(v: str) -> str:
    try:
        parse_table(v)
    except ValueError as e:
        raise _fail(str(e)) from None
    return v


def _check_fields(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, (list, dict)):
        raise _fail("must be a list of column names or a mapping output name -> column,"
                    f" got {_kind(v)}")
    if not v:
        raise _fail("must name at least one column (leave 'fields' out for all columns)")
    items = list(enumerate(v)) if isinstance(v, list) else list(v.items())
    seen: set[str] = set()
    for out, column in items:
        sub = f"[{out}]" if isinstance(v, list) else f".{out}"
        if not isinstance(out, (int, str)) or isinstance(out, bool):
            raise _fail(f"output name must be a string, got {_kind(out)}", sub)
        if isinstance(out, str) and not out:
            raise _fail("output name must not be empty", sub)
        if not isinstance(column, str) or not column:
            raise _fail(f"must be a column name, got {_kind(column)}", sub)
        if isinstance(v, list) and column in seen:
            raise _fail(f"duplicate column {column!r}", sub)
        seen.add(column)
    return v


#: ``table:`` of views and includes: ``schema.name`` or ``name``.
TableName = Annotated[str, AfterValidator(_check_table)]
#: ``fields:`` of views and includes: list of columns, mapping output → column, or omitted.
Fields = Annotated[Union[list[str], dict[str, str], None], BeforeValidator(_check_fields)]


def _field_map(fields: list[str] | dict[str, str] | None) -> dict[str, str] | None:
    if fields is None:
        return None
    if isinstance(fields, list):
        return {c: c for c in fields}
    return dict(fields)


class IncludeSpec(BaseModel):
    """``views.NAME.include.FIELD`` — a related table joined into each record as ``FIELD``.

    Attributes:
        table: the related table (``schema.name`` or ``name``).
        on: exactly one pair ``{parent_column: column}``: rows of ``table`` whose ``column``
            equals the parent row's ``parent_column`` are joined.
        fields: its columns in the nested value (list, mapping output → column, or all).
        many: ``false`` (default): a nested object, or ``null`` when no row matches (the first
            by ``order_by`` when several do); ``true``: a nested array (``[]`` when none).
        order_by: ``["column [asc|desc]", ...]``: order of the array (default: the related
            table's primary key), ties broken by the primary key.
        limit: at most this many rows in the array (``many: true`` only).
        include: nested includes of the related table (same shape, any depth).
    """

    model_config = _STRICT
    table: TableName
    on: dict[str, str]
    fields: Fields = None
    many: bool = False
    order_by: list[str] | None = None
    limit: int | None = Field(default=None, ge=1)
    include: dict[str, "IncludeSpec"] | None = None

    _schema: str = PrivateAttr("")
    _name: str = PrivateAttr("")

    @field_validator("on")
    @classmethod
    def _on(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) != 1:
            raise _fail("must be one pair {parent_column: column_of_this_table}")
        return v

    @field_validator("order_by")
    @classmethod
    def _order_by(cls, v: list[str] | None) -> list[str] | None:
        for i, item in enumerate(v or []):
            if not ORDER_RE.match(item):
                raise _fail(f"expected 'column', 'column asc' or 'column desc', got {item!r}", f"[{i}]")
        return v

    def model_post_init(self, context: Any) -> None:
        self._schema, self._name = parse_table(self.table)
        if self.limit is not None and not self.many:
            raise ValueError("limit needs many: true")

    @property
    def qualified(self) -> str:
        """``"schema.name"`` of the related table."""
        return f"{self._schema}.{self._name}"

    @property
    def link(self) -> tuple[str, str]:
        """``(parent_column, column)`` from :attr:`on`."""
        return next(iter(self.on.items()))

    @property
    def field_map(self) -> dict[str, str] | None:
        """Output name → column, or ``None`` for all columns."""
        return _field_map(self.fields)

    @property
    def ordering(self) -> list[tuple[str, bool]]:
        """``order_by`` as ``(column, descending)`` pairs."""
        out = []
        for item in self.order_by or []:
            m = ORDER_RE.match(item)
            assert m is not None
            out.append((m.group(1), (m.group(2) or "").lower() == "desc"))
        return out


class ViewSpec(BaseModel):
    """``views.NAME`` — one derived view of one table into one sink.

    Attributes:
        table: ``schema.name`` or ``name`` (public); see :attr:`schema`, :attr:`name`,
            :attr:`qualified`.
        sink: name of a declared sink, or a list of them: the view is then kept in each (one
            internal view ``NAME@SINK`` per sink, see :attr:`Spec.groups`; ``key``/``format``
            apply to the Redis sinks, ``index`` to the OpenSearch ones).
        key: key template (see :class:`~views.template.KeyTemplate`); required for redis views;
            for opensearch views the default is the primary key columns joined by ``:``.
        fields: ``None`` (all columns), a list of column names, or a mapping output name →
            column; see :attr:`field_map`.
        format: redis only, ``hash`` (default) or ``json``; ``None`` for opensearch views.
        index: opensearch only: the alias users query.
        where: a SQL boolean expression over the table's columns; only rows for which it is
            TRUE are in the view (:mod:`views.where`).
        derive: ``package.module:function``: called with each record (dict) pgderive would
            store; returns the record to store (dict) or ``None`` (not in the view).
        include: related tables joined into each record (:class:`IncludeSpec`).
        group_by: root columns; with ``aggregate`` the view holds one record per group
            (:mod:`views.aggregate`), keyed by a template over these columns.
        aggregate: output name → ``count(*)``, ``count(col)``, ``sum(col)``, ``min(col)``,
            ``max(col)`` or ``avg(col)``; ``col`` a root column or ``include_name.field``.
    """

    model_config = _STRICT
    table: TableName
    sink: str | list[str]
    key: str | None = None
    fields: Fields = None
    format: Literal["hash", "json"] | None = None
    index: str | None = None
    where: str | None = None
    derive: str | None = None
    include: dict[str, IncludeSpec] | None = None
    group_by: list[str] | None = None
    aggregate: dict[str, str] | None = None

    _schema: str = PrivateAttr("")
    _name: str = PrivateAttr("")
    _key_template: KeyTemplate | None = PrivateAttr(None)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                KeyTemplate(v)
            except ValueError as e:
                raise _fail(str(e)) from None
        return v

    @field_validator("derive")
    @classmethod
    def _derive(cls, v: str | None) -> str | None:
        if v is not None and not DERIVE_RE.match(v):
            raise _fail(f"expected 'package.module:function', got {v!r}")
        return v

    @field_validator("where")
    @classmethod
    def _where(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise _fail("must not be empty (leave 'where' out for every row)")
        return v

    @field_validator("index")
    @classmethod
    def _index(cls, v: str | None) -> str | None:
        if v is not None and not INDEX_RE.match(v):
            raise _fail(f"invalid index name {v!r}: use lowercase letters, digits and _ . + -,"
                        " starting with a letter or digit, at most 200 characters")
        return v

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        from .aggregate import AggregateError, parse_measure
        for name, text in (v or {}).items():
            try:
                parse_measure(text)
            except AggregateError as e:
                raise _fail(str(e), f".{name}") from None
        if v is not None and not v:
            raise _fail("must declare at least one aggregate, e.g. {n: count(*)}")
        return v

    def model_post_init(self, context: Any) -> None:
        self._schema, self._name = parse_table(self.table)
        self._key_template = KeyTemplate(self.key) if self.key is not None else None
        if (self.group_by is None) != (self.aggregate is None):
            raise ValueError("group_by and aggregate go together")
        if self.aggregate is not None and self.fields is not None:
            raise ValueError("an aggregate view has no fields: its records are the group_by columns and the aggregates")

    @property
    def schema(self) -> str:  # type: ignore[override]  # shadows the deprecated BaseModel.schema()
        """The table's schema, as in the catalog (``"public"`` when not written)."""
        return self._schema

    @property
    def name(self) -> str:
        """The table's name, as in the catalog."""
        return self._name

    @property
    def qualified(self) -> str:
        """``"schema.name"`` (unquoted, as :class:`cdc.changes.Change` names tables)."""
        return f"{self._schema}.{self._name}"

    @property
    def key_template(self) -> KeyTemplate | None:
        """The parsed :attr:`key`, or ``None`` when the key defaults to the primary key."""
        return self._key_template

    @property
    def field_map(self) -> dict[str, str] | None:
        """Output name → column, or ``None`` for all columns under their own names."""
        return _field_map(self.fields)


class Spec(BaseModel):
    """The whole file: ``source``, ``sinks`` (by name) and ``views`` (by name).

    Build it with :func:`load_spec` / :func:`parse_spec`, which also run the cross checks (view
    names, sink references, per-sink-type options) and fill defaults (redis ``format: hash``).
    It remembers its file name and YAML line numbers, so later checks (e.g. against the
    database) can report problems with :meth:`error` / :meth:`errors`.
    """

    model_config = _STRICT
    source: SourceSpec
    sinks: dict[str, SinkSpec]
    views: dict[str, ViewSpec]

    _filename: str = PrivateAttr("<string>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _groups: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    def _expand_sinks(self) -> None:
        """A view with ``sink: [a, b]`` becomes the views ``NAME@a`` and ``NAME@b`` (each with
        only its sink's options); :attr:`groups` maps the declared name to them."""
        views: dict[str, ViewSpec] = {}
        for name, view in self.views.items():
            if isinstance(view.sink, str):
                views[name] = view
                self._groups[name] = [name]
                continue
            self._groups[name] = []
            for sink in view.sink:
                redis = isinstance(self.sinks[sink], RedisSinkSpec)
                views[f"{name}@{sink}"] = view.model_copy(update={
                    "sink": sink, "index": None if redis else view.index,
                    "format": view.format if redis else None})
                self._groups[name].append(f"{name}@{sink}")
        self.views = views

    @property
    def groups(self) -> dict[str, list[str]]:
        """Declared view name → its internal views (itself, or ``NAME@SINK`` per sink)."""
        return self._groups

    def resolve(self, name: str) -> list[str]:
        """Internal view names for ``name`` (a declared name or ``NAME@SINK``); ``[]`` if unknown."""
        if name in self.views:
            return [name]
        return list(self._groups.get(name, []))

    @property
    def filename(self) -> str:
        """The YAML file the spec came from (``"<string>"`` for text)."""
        return self._filename

    def line(self, path: str) -> int | None:
        """1-based line of ``path`` (dotted, e.g. ``views.x.fields[2]``) or of its nearest
        ancestor present in the file; ``None`` if none is."""
        return _lookup_line(self._lines, path)

    def error(self, path: str, message: str) -> SpecError:
        """A :class:`SpecError` with one problem at ``path`` (to raise)."""
        return self.errors([(path, message)])

    def errors(self, problems: Iterable[tuple[str, str]]) -> SpecError:
        """A :class:`SpecError` with one problem per ``(path, message)`` (to raise)."""
        return SpecError([(p, self.line(p), m) for p, m in problems], self._filename)


# ------------------------------------------------------------------------------ line numbers

def _child(path: str, key: Any, container: Any) -> str:
    """The dotted path of ``container[key]``: ``a.b`` for mappings, ``a[2]`` for lists."""
    if isinstance(container, list):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[:path.rindex("[")]
    return path.rsplit(".", 1)[0] if "." in path else ""


def _lookup_line(lines: Mapping[str, int], path: str) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = _parent(path)
    return None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false (any case) are booleans, so keys like
    ``on:`` (include joins) and values like ``no`` stay strings (YAML 1.1 read them as bools)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _line_map(root: yaml.Node) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Dotted path → line of its key (mappings) or item (lists); plus duplicate-key problems."""
    lines: dict[str, int] = {}
    problems: list[tuple[str, str]] = []

    def walk(node: yaml.Node, path: str, active: set[int]) -> None:
        if id(node) in active:  # recursive alias
            return
        active = active | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                child = f"{path}.{key_node.value}" if path else key_node.value
                line = key_node.start_mark.line + 1
                if child in lines:  # the later one wins: forget the earlier one's lines
                    problems.append((child, f"duplicate key {key_node.value!r} (also at line"
                                            f" {lines[child]})"))
                    for stale in [p for p in lines if p.startswith((child + ".", child + "["))]:
                        del lines[stale]
                lines[child] = line
                walk(value_node, child, active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                lines[child] = item.start_mark.line + 1
                walk(item, child, active)

    walk(root, "", set())
    return lines, problems


# ----------------------------------------------------------------------------- interpolation

_VAR_RE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{[^}]*\}?))")


def _interpolate(data: Any, env: Mapping[str, str], path: str,
                 problems: list[tuple[str, str]]) -> Any:
    """``data`` with ``${VAR}``, ``${VAR:-default}`` and ``$$`` replaced in string scalars."""
    if isinstance(data, dict):
        return {k: _interpolate(v, env, _child(path, k, data), problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, env, _child(path, i, data), problems) for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def replace(m: re.Match[str]) -> str:
        dollar, var, default, bad = m.groups()
        if dollar:
            return "$"
        if bad is not None:
            problems.append((path, f"invalid variable reference '${bad}': use ${{NAME}} or"
                                   " ${NAME:-default} (and $$ for a literal $)"))
            return m.group(0)
        value = env.get(var)
        if default is not None and not value:
            return default
        if value is None:
            problems.append((path, f"environment variable {var} is not set"
                                   f" (or give a default: ${{{var}:-default}})"))
            return m.group(0)
        return value

    return _VAR_RE.sub(replace, data)


# ------------------------------------------------------------------- pydantic → path problems

def _allowed_keys(model_loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at ``model_loc`` (pydantic loc, tag included)."""
    model: type[BaseModel] | None = None
    if len(model_loc) == 0:
        model = Spec
    elif model_loc[0] == "source" and len(model_loc) == 1:
        model = SourceSpec
    elif model_loc[0] == "sinks" and len(model_loc) == 3:
        model = RedisSinkSpec if model_loc[2] == "redis" else OpenSearchSinkSpec
    elif model_loc[0] == "views" and len(model_loc) == 2:
        model = ViewSpec
    return list(model.model_fields) if model else []


def _pydantic_problems(err: ValidationError, data: Any) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        orig = tuple(e["loc"])
        loc = list(orig)
        kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc.pop()
        # the discriminated union adds the sink type as a loc element: sinks.NAME.<type>.field
        if len(loc) >= 3 and loc[0] == "sinks" and loc[2] in ("redis", "opensearch"):
            del loc[2]
        path, cur = "", data
        for part in loc:
            path = _child(path, part, cur)
            try:
                cur = cur[part]
            except (KeyError, IndexError, TypeError):
                cur = None

        if is_key:
            message = f"name must be a string, got {_kind(value)}"
        elif kind == "pgderive":
            path += ctx.get("pgderive_subpath", "")
            message = e["msg"]
        elif kind == "missing":
            message = f"missing required key {loc[-1]!r}"
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(orig[:-1])
            message = f"unknown key {loc[-1]!r}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
        elif kind == "string_type":
            message = f"must be a string, got {_kind(value)}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"must be a mapping, got {_kind(value)}"
        elif kind == "list_type":
            message = f"must be a list, got {_kind(value)}"
        elif kind == "literal_error":
            message = f"must be {ctx.get('expected')}, got {value!r}"
        elif kind == "union_tag_invalid":
            path += ".type"
            message = f"unknown sink type {ctx.get('tag')!r} (expected {ctx.get('expected_tags')})"
        elif kind == "union_tag_not_found":
            path += ".type"
            message = "missing required key 'type' (expected 'redis' or 'opensearch')"
        elif kind == "value_error":
            message = str(ctx.get("error", e["msg"]))
        else:
            message = e["msg"][:1].lower() + e["msg"][1:]
        problems.append((path, message))
    return problems


# ------------------------------------------------------------------------------ cross checks

def _cross_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks spanning sections, on the raw data so they run alongside the model errors.

    Values of the wrong type are skipped here: the models report them.
    """
    problems: list[tuple[str, str]] = []
    sinks = data.get("sinks") if isinstance(data.get("sinks"), dict) else {}
    views = data.get("views")
    if not isinstance(views, dict):
        return problems
    if not views:
        problems.append(("views", "declare at least one view"))
    sink_type = {n: s.get("type") for n, s in sinks.items() if isinstance(s, dict)}
    used_keys: dict[tuple[str, str], str] = {}
    for name, view in views.items():
        path = _child("views", name, views)
        if isinstance(name, str) and not VIEW_NAME_RE.match(name):
            problems.append((path, f"invalid view name {name!r}: use letters, digits and"
                                   " underscores"))
        if not isinstance(view, dict):
            continue
        targets = view.get("sink")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            continue
        if not targets:
            problems.append((f"{path}.sink", "name at least one sink"))
        kinds = {sink_type.get(t) for t in targets}
        if len(set(targets)) != len(targets):
            problems.append((f"{path}.sink", "a sink is listed twice"))
        for sink in targets:
            problems += _sink_problems(view, str(name), path, sink, sinks, sink_type, kinds, used_keys)
    return problems


def _sink_problems(view: dict[str, Any], name: str, path: str, sink: str, sinks: dict[str, Any],
                   sink_type: dict[str, Any], kinds: set[Any],
                   used_keys: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if sink not in sinks:
        declared = ", ".join(map(str, sinks)) or "none"
        problems.append((f"{path}.sink", f"unknown sink {sink!r} (declared sinks: {declared})"))
        return problems
    kind = sink_type.get(sink)
    if kind == "redis":
        if view.get("index") is not None and "opensearch" not in kinds:
            problems.append((f"{path}.index", f"only for opensearch views; sink {sink!r} is"
                                              " redis"))
        if view.get("key") is None:
            problems.append((f"{path}.key", "required for redis views, e.g."
                                            " key: \"account:{aid}\""))
        elif isinstance(view["key"], str):
            other = used_keys.setdefault((sink, view["key"]), str(name))
            if other != str(name):
                problems.append((f"{path}.key", f"same key template as view {other!r} on sink"
                                                f" {sink!r}: their keys would collide"))
    elif kind == "opensearch":
        if view.get("format") is not None and "redis" not in kinds:
            problems.append((f"{path}.format", f"only for redis views; sink {sink!r} is"
                                               " opensearch"))
        if view.get("index") is None:
            problems.append((f"{path}.index", "required for opensearch views: the alias"
                                              " users query"))
        elif isinstance(view["index"], str):
            other = used_keys.setdefault((sink, "index:" + view["index"]), str(name))
            if other != str(name):
                problems.append((f"{path}.index", f"index {view['index']!r} is already used"
                                                  f" by view {other!r} on sink {sink!r}"))
    return problems


# -------------------------------------------------------------------------------- entry points

def parse_spec(text: str, *, filename: str = "<string>",
               env: Mapping[str, str] | None = None) -> Spec:
    """Parse, interpolate and validate a YAML spec.

    Args:
        text: the YAML document.
        filename: used in error messages.
        env: variables for ``${VAR}``; ``os.environ`` (read now) when ``None``.

    Raises:
        SpecError: with every problem found (syntax, missing variables, validation, cross checks).
    """
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=_Loader)
        if root is None:
            raise SpecError([("", None, "the file is empty: expected source, sinks and views")],
                            filename)
        lines, problems = _line_map(root)
        loader = _Loader("")
        try:
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(x for x in (e.context, e.problem) if x) or "invalid YAML"
        raise SpecError([("", mark.line + 1 if mark else None, f"YAML syntax error: {what}")],
                        filename) from None
    except yaml.YAMLError as e:
        raise SpecError([("", None, f"YAML error: {e}")], filename) from None

    if not isinstance(data, dict):
        raise SpecError([("", root.start_mark.line + 1,
                          f"expected a mapping with source, sinks and views, got {_kind(data)}")],
                        filename)
    unresolved: list[tuple[str, str]] = []
    data = _interpolate(data, env, "", unresolved)
    spec: Spec | None = None
    later: list[tuple[str, str]] = []
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        later += _pydantic_problems(e, data)
    later += _cross_problems(data)
    # a value whose variable is unresolved is not worth validating: its one problem is enough
    skip = {p for p, _ in unresolved}
    below = tuple(p + sep for p in skip for sep in ".[")
    problems += unresolved + [(p, m) for p, m in later if p not in skip and not p.startswith(below)]
    if problems or spec is None:
        found = [(p, _lookup_line(lines, p), m) for p, m in dict.fromkeys(problems)]
        found.sort(key=lambda p: p[1] if p[1] is not None else 0)
        raise SpecError(found, filename)

    spec._expand_sinks()
    for view in spec.views.values():
        if isinstance(spec.sinks[view.sink], RedisSinkSpec) and view.format is None:
            view.format = "hash"
    spec._filename = filename
    spec._lines = lines
    return spec


def load_spec(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Spec:
    """Read and validate the YAML spec at ``path`` (see :func:`parse_spec`).

    Raises:
        SpecError: the file cannot be read, or the spec is invalid.
    """
    filename = os.fspath(path)
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([("", None, f"cannot read the file: {reason}")], filename) from None
    return parse_spec(text, filename=filename, env=env)
