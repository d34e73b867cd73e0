"""The typed expression tree a ``where:`` expression compiles to. Every node has a type tag
``t``, its SQL rendering ``q`` (a Composable, built at construction from the user's
expression), ``ev(vals)`` (its value for a row's values, three-valued: ``None`` is SQL NULL)
and ``fold()`` (the planner's constant folding, ``src/backend/optimizer/util/clauses.c``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence, cast

from psycopg import sql


class Node:
    t: str
    q: sql.Composable
    var: bool = False  # reads a column

    def ev(self, vals: dict[str, Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fold(self) -> Node:
        return self


class Const(Node):
    def __init__(self, t: str, value: Any, q: sql.Composable | None = None,
                 literal: str | None = None) -> None:
        self.t, self.value, self.q = t, value, q if q is not None else sql.Literal(None)
        self.literal = literal  # the text of an unknown-typed string literal

    def ev(self, vals: dict[str, Any]) -> Any:
        return self.value


class Col(Node):
    var = True

    def __init__(self, name: str, t: str) -> None:
        self.name, self.t, self.q = name, t, sql.Identifier(name)

    def ev(self, vals: dict[str, Any]) -> Any:
        return vals[self.name]


def _is_null_const(n: Node) -> bool:
    return isinstance(n, Const) and n.value is None


class Op(Node):
    """A strict function/operator: NULL if any argument is NULL; all arguments are evaluated
    (left to right) first, as the executor does."""

    implicit: bool = False  # an implicit cast, rendered as its argument (Compiler.implicit)

    def __init__(self, t: str, kids: Sequence[Node], fn: Callable[..., Any],
                 q: sql.Composable) -> None:
        self.t, self.kids, self.fn, self.q = t, list(kids), fn, q
        self.var = any(k.var for k in kids)

    def ev(self, vals: dict[str, Any]) -> Any:
        args = [k.ev(vals) for k in self.kids]
        for a in args:
            if a is None:
                return None
        return self.fn(*args)

    def fold(self) -> Node:
        kids = [k.fold() for k in self.kids]
        if any(_is_null_const(k) for k in kids):
            return Const(self.t, None)
        if all(isinstance(k, Const) for k in kids):
            return Const(self.t, self.fn(*[cast(Const, k).value for k in kids]))
        return Op(self.t, kids, self.fn, self.q)


class BoolOp(Node):
    def __init__(self, is_and: bool, args: Sequence[Node], q: sql.Composable) -> None:
        self.t, self.is_and, self.args, self.q = "bool", is_and, list(args), q
        self.var = any(a.var for a in args)

    def ev(self, vals: dict[str, Any]) -> Any:
        stop = not self.is_and  # AND stops at FALSE, OR at TRUE
        null = False
        for a in self.args:
            v = a.ev(vals)
            if v is None:
                null = True
            elif v is stop:
                return stop
        return None if null else (not stop)

    def fold(self) -> Node:
        # clauses.c simplify_and_arguments()/simplify_or_arguments(): flatten, simplify in
        # order, stop at the first constant that decides, drop the neutral ones, keep one NULL.
        stop = not self.is_and
        pending = list(self.args)
        out: list[Node] = []
        null = False
        while pending:
            a = unsugar(pending.pop(0))
            if isinstance(a, BoolOp) and a.is_and == self.is_and:
                pending = a.args + pending
                continue
            a = unsugar(a.fold())
            if isinstance(a, BoolOp) and a.is_and == self.is_and:
                pending = a.args + pending
                continue
            if isinstance(a, Const):
                if a.value is None:
                    null = True
                elif a.value is stop:
                    return Const("bool", stop)
                continue
            out.append(a)
        if null:
            out.append(Const("bool", None))
        if not out:
            return Const("bool", not stop)
        if len(out) == 1:
            return out[0]
        return BoolOp(self.is_and, out, self.q)


class Not(Node):
    def __init__(self, x: Node, q: sql.Composable) -> None:
        self.t, self.x, self.q, self.var = "bool", x, q, x.var

    def ev(self, vals: dict[str, Any]) -> Any:
        v = self.x.ev(vals)
        return None if v is None else not v

    def fold(self) -> Node:
        x = self.x.fold()
        if isinstance(x, Const):
            return Const("bool", None if x.value is None else not x.value)
        return Not(x, self.q)


class Test(Node):
    """Non-strict tests: IS [NOT] NULL, IS TRUE / IS FALSE, IS [NOT] DISTINCT FROM."""

    def __init__(self, kids: Sequence[Node], fn: Callable[..., bool], q: sql.Composable) -> None:
        self.t, self.kids, self.fn, self.q = "bool", list(kids), fn, q
        self.var = any(k.var for k in kids)

    def ev(self, vals: dict[str, Any]) -> Any:
        return self.fn(*[k.ev(vals) for k in self.kids])

    def fold(self) -> Node:
        kids = [k.fold() for k in self.kids]
        if all(isinstance(k, Const) for k in kids):
            return Const("bool", self.fn(*[cast(Const, k).value for k in kids]))
        return Test(kids, self.fn, self.q)


class AnyArray(Node):
    """``x = ANY (ARRAY[consts])``, what ``x IN (c1, c2, ...)`` becomes (parse_expr.c
    transformAExprIn): NULL if x is NULL, TRUE at the first equal element, else NULL if an
    element was NULL, else FALSE."""

    def __init__(self, x: Node, elems: Sequence[Node], eq: Callable[[Any, Any], bool]) -> None:
        self.t, self.x, self.elems, self.eq, self.q = "bool", x, list(elems), eq, sql.SQL("")
        self.var = x.var

    def ev(self, vals: dict[str, Any]) -> Any:
        a = self.x.ev(vals)
        items = [e.ev(vals) for e in self.elems]
        if a is None:
            return None
        null = False
        for b in items:
            if b is None:
                null = True
            elif self.eq(a, b):
                return True
        return None if null else False

    def fold(self) -> Node:
        x = self.x.fold()
        elems = [e.fold() for e in self.elems]
        node = AnyArray(x, elems, self.eq)
        if isinstance(x, Const) and all(isinstance(e, Const) for e in elems):
            return Const("bool", node.ev({}))
        return node


class Coalesce(Node):
    def __init__(self, t: str, args: Sequence[Node], q: sql.Composable) -> None:
        self.t, self.args, self.q = t, list(args), q
        self.var = any(a.var for a in args)

    def ev(self, vals: dict[str, Any]) -> Any:
        for a in self.args:
            v = a.ev(vals)
            if v is not None:
                return v
        return None

    def fold(self) -> Node:
        # clauses.c: NULL constants dropped, nothing after the first non-NULL constant kept
        out: list[Node] = []
        for a in self.args:
            f = a.fold()
            if isinstance(f, Const):
                if f.value is None:
                    continue
                if not out:
                    return f
                out.append(f)
                break
            out.append(f)
        if not out:
            return Const(self.t, None)
        return Coalesce(self.t, out, self.q)


class Sugar(Node):
    """A construct rendered as written (IN, BETWEEN, an explicit cast of a literal) but
    evaluated as what Postgres turns it into."""

    def __init__(self, impl: Node, q: sql.Composable) -> None:
        self.impl, self.q, self.t, self.var = impl, q, impl.t, impl.var

    def ev(self, vals: dict[str, Any]) -> Any:
        return self.impl.ev(vals)

    def fold(self) -> Node:
        return self.impl.fold()


def unsugar(n: Node) -> Node:
    while isinstance(n, Sugar):
        n = n.impl
    return n
