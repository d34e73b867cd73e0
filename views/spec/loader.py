"""Loading a spec: YAML text → node tree (for line numbers) → plain data → ``${VAR}``
interpolation (:mod:`views.spec.interpolate`) → pydantic models (:mod:`views.spec.models`) →
cross checks (view ↔ sink). Every problem found on the way is collected into one
:class:`~views.spec.errors.SpecError` whose lines read ``file:line: dotted.path: message``.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import yaml
from pydantic import ValidationError

from .errors import SpecError, _kind, _lookup_line, _pydantic_problems
from .interpolate import interpolate
from .models import KafkaSinkSpec, RedisSinkSpec, Spec, _allowed_keys, _cross_problems

__all__ = ["load_spec", "parse_spec"]


# ---------------------------------------------------------------------------------- limits

#: The largest spec file read, in bytes. Real ones are a few kB (config/store.yaml: ~5 kB).
MAX_BYTES = 4 << 20
#: The deepest nesting of mappings and lists, counted through aliases. PyYAML composes and
#: constructs recursively, so a deeper document would end in a RecursionError.
MAX_DEPTH = 64
#: Aliases (``*name``) per file.
MAX_ALIASES = 1_000
#: Nodes once every alias is expanded. A "billion laughs" file of a few hundred bytes expands to
#: 10^9 nodes (3 GiB and > 30 s before this limit); the largest shipped spec has ~400.
MAX_NODES = 100_000


def _limit_error(filename: str, where: yaml.Node | yaml.Event, message: str) -> SpecError:
    mark = where.start_mark
    return SpecError([("", mark.line + 1 if mark is not None else None, message)], filename)


def _check_events(text: str, filename: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and more than :data:`MAX_ALIASES` aliases,
    reading the event stream (PyYAML's parser keeps its own stack: no recursion) before the
    recursive composer sees the document. Raises :class:`SpecError` at the offending line."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _limit_error(filename, event,
                                   f"nested deeper than {MAX_DEPTH} levels: refusing the file")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _limit_error(filename, event,
                                   f"more than {MAX_ALIASES} aliases: refusing the file")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, filename: str) -> None:
    """Refuse a node graph that contains itself (a recursive alias), expands to more than
    :data:`MAX_NODES` nodes or deeper than :data:`MAX_DEPTH` levels once aliases are
    expanded. Linear in the composed graph (an alias is the anchored node itself, visited once),
    never expanding anything. Raises :class:`SpecError` at the anchored node's line."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, list[yaml.Node]]] = [(root, _children(root))]
    open_.add(id(root))
    while stack:
        node, todo = stack[-1]
        if todo:
            child = todo.pop()
            if id(child) in open_:
                raise _limit_error(filename, child, "recursive alias: the node anchored here"
                                                    " contains itself")
            if id(child) not in size:
                open_.add(id(child))
                stack.append((child, _children(child)))
            continue
        stack.pop()
        open_.discard(id(node))
        kids = _children(node)
        size[id(node)] = 1 + sum(size[id(c)] for c in kids)
        depth[id(node)] = 1 + max((depth[id(c)] for c in kids), default=0)
        if size[id(node)] > MAX_NODES:
            raise _limit_error(filename, node, f"aliases expand this node to more than {MAX_NODES:,}"
                                               " nodes (an alias bomb?): refusing the file")
        if depth[id(node)] > MAX_DEPTH + 1:
            raise _limit_error(filename, node, f"aliases nest this node deeper than {MAX_DEPTH}"
                                               " levels: refusing the file")


# ------------------------------------------------------------------------------ line numbers

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


# -------------------------------------------------------------------------------- entry points

def parse_spec(text: str, *, filename: str = "<string>",
               env: Mapping[str, str] | None = None) -> Spec:
    """Parse, interpolate and validate a YAML spec.

    Args:
        text: the YAML document.
        filename: used in error messages.
        env: variables for ``${VAR}``; ``os.environ`` (read now) when ``None``.

    Raises:
        SpecError: with every problem found (syntax, missing variables, validation, cross
            checks), or the document is beyond a limit: :data:`MAX_BYTES` characters,
            :data:`MAX_DEPTH` levels, :data:`MAX_ALIASES` aliases, :data:`MAX_NODES` nodes
            once aliases are expanded, or an alias that contains itself.
    """
    env = os.environ if env is None else env
    if len(text) > MAX_BYTES:
        raise SpecError([("", None, f"the file has {len(text):,} characters, more than the"
                                    f" {MAX_BYTES:,} a spec may have: refusing it")], filename)
    try:
        _check_events(text, filename)
        root = yaml.compose(text, Loader=_Loader)
        if root is None:
            raise SpecError([("", None, "the file is empty: expected source, sinks and views")],
                            filename)
        _check_expansion(root, filename)
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
    data = interpolate(data, env, "", unresolved)
    spec: Spec | None = None
    later: list[tuple[str, str]] = []
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        later += _pydantic_problems(e, data, _allowed_keys)
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
        target = spec.sinks[view.sink_name]
        if isinstance(target, RedisSinkSpec) and view.format is None:
            view.format = "hash"
        if isinstance(target, KafkaSinkSpec):
            view._topic_name = view.topic or f"{target.topic_prefix}.{view.qualified}"
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
            if os.fstat(f.fileno()).st_size > MAX_BYTES:
                size = os.fstat(f.fileno()).st_size
                raise SpecError([("", None, f"the file has {size:,} bytes, more than the"
                                            f" {MAX_BYTES:,} a spec may have: refusing it")], filename)
            text = f.read(MAX_BYTES + 1)  # a pipe or device has no size: read one more at most
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError([("", None, f"cannot read the file: {reason}")], filename) from None
    return parse_spec(text, filename=filename, env=env)
