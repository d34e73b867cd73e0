"""Compiling a ``where:`` expression: sqlglot's AST (dialect ``postgres``) is bound to the
table's columns, typed as Postgres types it (:mod:`.types`), and built into the evaluator
tree (:mod:`.nodes`) together with its SQL rendering (:mod:`psycopg.sql`); :class:`Where` is
the result."""
from __future__ import annotations

import difflib
import re
from decimal import Decimal
from typing import Any, Callable, cast

import sqlglot
from psycopg import sql
from sqlglot import exp

from ..pgtypes.errors import WhereError, WhereEvalError
from ..pgtypes.floats import float_arith
from ..pgtypes.integers import INT_RANGE, int_check, int_op
from ..pgtypes.numeric import num_add, num_div, num_mod, num_mul, num_neg, num_norm, num_sub
from ..pgtypes.tags import FLOATS, INTS, NUMS, STRS
from ..pgtypes.text import LIKE_TRUE, ends_in_escape, like_escape, like_match, lower, rtrim, upper
from .casts import canonical_literal, cast_fn, literal_in, reader
from .nodes import AnyArray, BoolOp, Coalesce, Col, Const, Node, Not, Op, Sugar, Test, unsugar
from .types import (ORDERING, TYPE_SQL, can_implicit, cmp_fn, column_tag, resolve_cmp,
                    select_common_type, tname)

__all__ = ["Where"]


_CMP_OPS: dict[type[exp.Expression], str] = {
    exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">="}
_ARITH_OPS: dict[type[exp.Expression], str] = {
    exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/", exp.Mod: "%"}
_TEXT_FUNCTIONS: dict[type[exp.Expression], str] = {
    exp.Lower: "lower", exp.Upper: "upper", exp.Length: "length"}
_NUMBER_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _paren(fmt: str, *parts: sql.Composable) -> sql.Composable:
    return sql.SQL(fmt).format(*parts)


class _Compiler:
    def __init__(self, columns: dict[str, str]) -> None:
        self.columns = dict(columns)
        self.tags: dict[str, str] = {}
        self.used: set[str] = set()

    # -- helpers -------------------------------------------------------------------------

    def tag(self, name: str) -> str:
        if name not in self.tags:
            self.tags[name] = column_tag(self.columns[name])
        return self.tags[name]

    @staticmethod
    def describe(n: Node) -> str:
        n = unsugar(n)
        while isinstance(n, Op) and n.implicit:
            n = n.kids[0]
        if isinstance(n, Col):
            return f"column '{n.name}' ({tname(n.t)})"
        return f"an expression of type {tname(n.t)}"

    def usable(self, n: Node) -> Node:
        if n.t.startswith("opaque:"):
            raise WhereError(f"{self.describe(n)}: only IS [NOT] NULL is supported for type"
                             f" {tname(n.t)}")
        return n

    def coerce_unknown(self, n: Node, t: str, typmod: tuple[int, int] | None = None) -> Node:
        """Give an unknown-typed literal (or NULL) the type ``t``."""
        if n.t != "unknown":
            return n
        assert isinstance(n, Const)
        if t.startswith("opaque:"):
            raise WhereError(f"comparisons with type {tname(t)} are not supported")
        if n.value is None:
            return Const(t, None, sql.Literal(None))
        try:
            v = literal_in(n.value, t, typmod)
        except WhereEvalError as e:
            raise WhereError(str(e)) from None
        canon = canonical_literal(v, t)
        q = sql.Literal(canon) if canon is not None else n.q
        return Const(t, v, q, literal=n.value)

    def implicit(self, n: Node, t: str) -> Node:
        """An implicit cast of ``n`` to ``t`` (rendered as ``n`` itself: Postgres adds it)."""
        if n.t == t:
            return n
        if n.t == "unknown":
            return self.coerce_unknown(n, t)
        fn = cast_fn(n.t, t, None)
        if fn is None:  # pragma: no cover - resolution only asks for existing casts
            raise WhereError(f"cannot convert {tname(n.t)} to {tname(t)}")
        node = Op(t, [n], fn, n.q)
        node.implicit = True
        return node

    def boolean(self, n: Node, ctx: str) -> Node:
        if n.t == "unknown":
            return self.coerce_unknown(n, "bool")
        if n.t != "bool":
            self.usable(n)
            raise WhereError(f"argument of {ctx} must be type boolean, not type {tname(n.t)}"
                             f" ({self.describe(n)})")
        return n

    # -- entry ---------------------------------------------------------------------------

    def compile(self, e: exp.Expression) -> Node:
        if isinstance(e, exp.Paren):
            return self.compile(e.this)
        if isinstance(e, exp.Column):
            return self.column(e)
        if isinstance(e, exp.Literal):
            return self.literal(e)
        if isinstance(e, exp.RawString):
            return Const("unknown", e.this, sql.Literal(e.this))
        if isinstance(e, exp.Boolean):
            v = bool(e.this)
            return Const("bool", v, sql.SQL("TRUE" if v else "FALSE"))
        if isinstance(e, exp.Null):
            return Const("unknown", None, sql.SQL("NULL"))
        if isinstance(e, exp.Neg):
            return self.negate(e)
        for cls, op in _ARITH_OPS.items():
            if type(e) is cls:
                return self.arith(op, self.compile(e.this), self.compile(e.expression))
        for cls, op in _CMP_OPS.items():
            if type(e) is cls:
                return self.comparison(op, self.compile(e.this), self.compile(e.expression))
        if isinstance(e, (exp.NullSafeEQ, exp.NullSafeNEQ)):
            return self.distinct(isinstance(e, exp.NullSafeNEQ), self.compile(e.this),
                                 self.compile(e.expression))
        if isinstance(e, (exp.And, exp.Or)):
            return self.boolop(e)
        if isinstance(e, exp.Not):
            x = self.boolean(self.compile(e.this), "NOT")
            return Not(x, _paren("(NOT {})", x.q))
        if isinstance(e, exp.Is):
            return self.is_(e)
        if isinstance(e, exp.In):
            return self.in_(e)
        if isinstance(e, exp.Between):
            return self.between(e)
        if isinstance(e, exp.Escape):
            like = e.this
            if not isinstance(like, (exp.Like, exp.ILike)):
                raise WhereError("ESCAPE is only supported with LIKE and ILIKE")
            return self.like(like, e.expression)
        if isinstance(e, (exp.Like, exp.ILike)):
            return self.like(e, e.args.get("escape"))
        if isinstance(e, exp.Cast) and type(e) is exp.Cast:
            return self.cast(e)
        if type(e) in (exp.Lower, exp.Upper, exp.Length):
            return self.text_function(e)
        if type(e) is exp.Coalesce:
            return self.coalesce(e)
        self.refuse(e)
        raise AssertionError("unreachable")  # pragma: no cover

    def refuse(self, e: exp.Expression) -> None:
        if isinstance(e, (exp.Subquery, exp.Select, exp.Exists, exp.Query)) or e.find(exp.Select):
            raise WhereError("subqueries are not supported")
        if isinstance(e, (exp.Any, exp.All)):
            raise WhereError("ANY/ALL are not supported (use IN)")
        if isinstance(e, exp.Cast):
            raise WhereError(f"{e.key.upper()} is not supported (use CAST or ::)")
        if isinstance(e, exp.Func):
            if isinstance(e, exp.Anonymous):
                name = e.name
            else:
                try:
                    name = e.sql(dialect="postgres").split("(", 1)[0]
                except Exception:  # pragma: no cover - sqlglot cannot print some nodes
                    name = e.sql_name()
            raise WhereError(f"function calls are not supported ({name.lower()}); supported:"
                             " lower, upper, length, char_length, coalesce")
        if isinstance(e, (exp.ByteString, exp.UnicodeString, exp.HexString, exp.BitString)):
            raise WhereError("only standard '...' and $$...$$ string literals are supported"
                             " (no E'', U&'', X'' or B'' literals)")
        if isinstance(e, (exp.Placeholder, exp.Parameter)):
            raise WhereError("parameters are not supported")
        if isinstance(e, exp.Star):
            raise WhereError("* is not supported")
        try:
            snippet = e.sql(dialect="postgres")
        except Exception:  # pragma: no cover - sqlglot cannot print some nodes
            snippet = ""
        # The SQL it stands for, never the parser's class name (an implementation detail).
        raise WhereError("unsupported construct" + (f": {snippet[:60]}" if snippet else " in the expression"))

    # -- leaves --------------------------------------------------------------------------

    def column(self, e: exp.Column) -> Node:
        if e.table or e.args.get("db") or e.args.get("catalog"):
            raise WhereError(f"qualified column references are not supported ({e.sql(dialect='postgres')})")
        ident = e.this
        if not isinstance(ident, exp.Identifier):
            self.refuse(ident)
        name = ident.this if ident.quoted else ident.this.translate(_ASCII_LOWER)
        if name not in self.columns:
            close = difflib.get_close_matches(name, list(self.columns), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise WhereError(f"unknown column '{name}'{hint}")
        t = self.tag(name)
        if t == "opaque:jsonb":
            raise WhereError(f"column '{name}' is jsonb, which where: does not support (the value"
                             " model reads a JSON null as SQL NULL)")
        self.used.add(name)
        return Col(name, t)

    def literal(self, e: exp.Literal) -> Node:
        if e.is_string:
            return Const("unknown", e.this, sql.Literal(e.this))
        return self.number(e.this, False)

    def number(self, text: str, negative: bool) -> Node:
        if not _NUMBER_RE.fullmatch(text):
            raise WhereError(f"unsupported number literal {text!r}")
        if re.fullmatch(r"[0-9]+", text):
            v = -int(text) if negative else int(text)
            lo4, hi4 = INT_RANGE["int4"]
            lo8, hi8 = INT_RANGE["int8"]
            if lo4 <= v <= hi4:
                return Const("int4", v, sql.Literal(v))
            if lo8 <= v <= hi8:
                return Const("int8", v, sql.Literal(v))
            d = Decimal(v)
            return Const("numeric", d, sql.Literal(v))
        d = Decimal(text)
        if d.adjusted() >= 131072 or -cast(int, d.as_tuple().exponent) > 16383:  # d is finite
            raise WhereError(f"number literal {text!r}: value overflows numeric format")
        d = num_norm(-d if negative else d)
        s = str(d)
        q: sql.Composable
        if "." in s or "E" in s:
            q = sql.Literal(d)
        else:
            q = _paren("CAST({} AS numeric)", sql.Literal(s))
        return Const("numeric", d, q)

    def negate(self, e: exp.Neg) -> Node:
        inner = e.this
        negative = True
        while True:  # gram.y doNegate(): a minus in front of a number constant is folded
            while isinstance(inner, exp.Paren):
                inner = inner.this
            if isinstance(inner, exp.Neg):
                negative = not negative
                inner = inner.this
                continue
            break
        if isinstance(inner, exp.Literal) and not inner.is_string:
            return self.number(inner.this, negative)
        x = self.usable(self.compile(e.this))
        if x.t == "unknown":
            raise WhereError("operator is not unique: - unknown (cast the literal)")
        if x.t not in NUMS:
            raise WhereError(f"operator does not exist: - {tname(x.t)} ({self.describe(x)})")
        t = x.t
        fn: Callable[[Any], Any]
        if t in INTS:
            fn = lambda v: int_check(-v, t)  # noqa: E731
        elif t == "numeric":
            fn = num_neg
        else:
            fn = lambda v: -v  # noqa: E731
        return Op(t, [x], fn, _paren("(- {})", x.q))

    # -- operators -----------------------------------------------------------------------

    def unify(self, a: Node, b: Node) -> tuple[Node, Node]:
        """An unknown literal takes the other operand's type; two unknowns are text."""
        self.usable(a)
        self.usable(b)
        if a.t == "unknown" and b.t == "unknown":
            return self.coerce_unknown(a, "text"), self.coerce_unknown(b, "text")
        if a.t == "unknown":
            a = self.coerce_unknown(a, b.t)
        elif b.t == "unknown":
            b = self.coerce_unknown(b, a.t)
        return a, b

    def comparison(self, op: str, a: Node, b: Node, q: sql.Composable | None = None) -> Node:
        a, b = self.unify(a, b)
        r = resolve_cmp(a.t, b.t)
        if r is None:
            raise WhereError(f"operator does not exist: {tname(a.t)} {op} {tname(b.t)}"
                             f" ({self.describe(a)}, {self.describe(b)})")
        kind, at, bt = r
        if kind == "tz":
            raise WhereError(f"comparing {tname(a.t)} with {tname(b.t)} depends on the session"
                             " TimeZone and is not supported: compare timestamp with time zone"
                             " values with each other (literals with an explicit offset)")
        if op in ORDERING and kind in ("text", "bpchar", "enum"):
            subject = b if isinstance(unsugar(b), Col) and not isinstance(unsugar(a), Col) else a
            if kind == "enum":
                raise WhereError(f"ordering comparisons (<, <=, >, >=, BETWEEN) on {tname(a.t)}"
                                 f" are not supported ({self.describe(subject)}): the sort order"
                                 " of an enum is not known here; use =, <> or IN")
            raise WhereError("ordering comparisons (<, <=, >, >=, BETWEEN) on text are not"
                             f" supported ({self.describe(subject)}): they depend on the"
                             " collation; compare text with =, <>, IN or LIKE")
        a2, b2 = self.implicit(a, at), self.implicit(b, bt)
        fn = cmp_fn(kind, op, at, bt)
        return Op("bool", [a2, b2], fn,
                  q if q is not None else _paren("({} " + op + " {})", a.q, b.q))

    def distinct(self, negate: bool, a: Node, b: Node) -> Node:
        eq = self.comparison("=", a, b)
        assert isinstance(eq, Op)
        a2, b2 = eq.kids
        f = eq.fn

        def test(x: Any, y: Any) -> bool:
            same: bool
            if x is None or y is None:
                same = x is None and y is None
            else:
                same = f(x, y)
            return same if not negate else not same

        word = "IS DISTINCT FROM" if negate else "IS NOT DISTINCT FROM"
        return Test([a2, b2], test, _paren("({} " + word + " {})", a2.q, b2.q))

    def arith(self, op: str, a: Node, b: Node) -> Node:
        self.usable(a)
        self.usable(b)
        if a.t == "unknown" and b.t == "unknown":
            raise WhereError(f"operator is not unique: unknown {op} unknown (cast a literal)")
        a, b = self.unify(a, b)
        q = _paren("({} " + op + " {})", a.q, b.q)
        if a.t not in NUMS or b.t not in NUMS:
            raise WhereError(f"operator does not exist: {tname(a.t)} {op} {tname(b.t)}"
                             f" ({self.describe(a)}, {self.describe(b)})")
        if a.t in INTS and b.t in INTS:
            t = max(a.t, b.t, key=INTS.index)
            fn: Callable[[Any, Any], Any] = int_op(op, t)
            return Op(t, [a, b], fn, q)
        if a.t in FLOATS or b.t in FLOATS:
            if op == "%":
                raise WhereError(f"operator does not exist: {tname(a.t)} % {tname(b.t)}")
            single = a.t == b.t == "float4"
            t = "float4" if single else "float8"
            a2 = a if a.t in FLOATS else self.implicit(a, "float8")
            b2 = b if b.t in FLOATS else self.implicit(b, "float8")
            return Op(t, [a2, b2], lambda x, y: float_arith(op, x, y, single), q)
        fn = {"+": num_add, "-": num_sub, "*": num_mul, "/": num_div, "%": num_mod}[op]
        return Op("numeric", [self.implicit(a, "numeric"), self.implicit(b, "numeric")], fn, q)

    def boolop(self, e: exp.Expression) -> Node:
        is_and = isinstance(e, exp.And)
        cls = exp.And if is_and else exp.Or
        flat: list[exp.Expression] = []

        def walk(x: exp.Expression) -> None:
            if type(x) is cls:
                walk(x.this)
                walk(x.expression)
            else:
                flat.append(x)

        walk(e)
        word = "AND" if is_and else "OR"
        args = [self.boolean(self.compile(x), word) for x in flat]
        q = sql.SQL("(") + sql.SQL(f" {word} ").join(a.q for a in args) + sql.SQL(")")
        return BoolOp(is_and, args, q)

    def is_(self, e: exp.Is) -> Node:
        negate = bool(e.args.get("negate"))
        x = self.compile(e.this)
        target = e.expression
        if isinstance(target, exp.Null):
            word = "IS NOT NULL" if negate else "IS NULL"
            fn = (lambda v: v is not None) if negate else (lambda v: v is None)
            return Test([x], fn, _paren("({} " + word + ")", x.q))
        if isinstance(target, exp.Boolean):
            x = self.boolean(x, "IS " + ("TRUE" if target.this else "FALSE"))
            want = bool(target.this)
            word = ("IS NOT " if negate else "IS ") + ("TRUE" if want else "FALSE")
            if negate:
                fn = lambda v: v is not want  # noqa: E731
            else:
                fn = lambda v: v is want  # noqa: E731
            return Test([x], fn, _paren("({} " + word + ")", x.q))
        self.refuse(e)
        raise AssertionError("unreachable")  # pragma: no cover

    def in_(self, e: exp.In) -> Node:
        if e.args.get("query") is not None or e.args.get("unnest") is not None:
            raise WhereError("subqueries are not supported")
        if e.args.get("field") is not None:
            self.refuse(e)
        x = self.usable(self.compile(e.this))
        items = [self.usable(self.compile(i)) for i in e.expressions]
        if not items:
            raise WhereError("IN needs at least one value")
        # parse_expr.c transformAExprIn(): constants go into one array compared with = ANY
        # when there are several and they have a common type; the rest become = ... OR ...
        parts: list[Node] = []
        rendered: dict[int, sql.Composable] = {}  # item index -> its coerced rendering
        xq = None
        rest = list(range(len(items)))
        nonvar = [k for k, i in enumerate(items) if not i.var]
        if len(nonvar) > 1:
            types = [x.t] + [items[k].t for k in nonvar]
            ct = select_common_type(types)
            if ct is not None and all(can_implicit(t, ct) for t in types):
                elems = [self.implicit(items[k], ct) for k in nonvar]
                eq = self.comparison("=", x if x.t != "unknown" else self.coerce_unknown(x, ct),
                                     Const(ct, None, sql.SQL("")))
                assert isinstance(eq, Op)
                lhs = eq.kids[0]
                xq = lhs.q
                rt = eq.kids[1].t
                elems = [self.implicit(el, rt) for el in elems]
                rendered.update({k: el.q for k, el in zip(nonvar, elems)})
                parts.append(AnyArray(lhs, elems, eq.fn))
                rest = [k for k, i in enumerate(items) if i.var]
        for k in rest:
            cmp = self.comparison("=", x, items[k])
            assert isinstance(cmp, Op)
            xq = xq if xq is not None else cmp.kids[0].q
            rendered[k] = cmp.kids[1].q
            parts.append(cmp)
        assert xq is not None  # items is not empty
        q = _paren("({} IN ({}))", xq, sql.SQL(", ").join(rendered[k] for k in range(len(items))))
        impl = parts[0] if len(parts) == 1 else BoolOp(False, parts, q)
        return Sugar(impl, q)

    def between(self, e: exp.Between) -> Node:
        x = self.compile(e.this)
        lo = self.compile(e.args["low"])
        hi = self.compile(e.args["high"])
        sym = bool(e.args.get("symmetric"))
        word = "BETWEEN SYMMETRIC" if sym else "BETWEEN"
        # parse_expr.c transformAExprBetween(): x >= lo AND x <= hi (each resolved on its own)
        ge, le = self.comparison(">=", x, lo), self.comparison("<=", x, hi)
        assert isinstance(ge, Op) and isinstance(le, Op)
        # rendered from the operands as coerced (a timestamptz literal gets its offset)
        q = _paren("({} " + word + " {} AND {})", ge.kids[0].q, ge.kids[1].q, le.kids[1].q)
        first = BoolOp(True, [ge, le], q)
        if not sym:
            return Sugar(first, q)
        second = BoolOp(True, [self.comparison(">=", x, hi), self.comparison("<=", x, lo)], q)
        return Sugar(BoolOp(False, [first, second], q), q)

    def like(self, e: exp.Expression, escape: exp.Expression | None) -> Node:
        ilike = isinstance(e, exp.ILike)
        negate = bool(e.args.get("negate"))
        a = self.usable(self.compile(e.this))
        p = self.usable(self.compile(e.expression))
        word = ("NOT " if negate else "") + ("ILIKE" if ilike else "LIKE")
        if a.t == "unknown":
            a = self.coerce_unknown(a, "text")
        if a.t not in STRS:
            raise WhereError(f"operator does not exist: {tname(a.t)} {'~~*' if ilike else '~~'}"
                             f" {tname(p.t)} ({self.describe(a)}; cast it to text)")
        if p.t not in STRS and p.t != "unknown":
            raise WhereError(f"{word} pattern must be text, not {tname(p.t)} ({self.describe(p)})")
        p2 = self.implicit(p, "text")
        if escape is not None:
            esc = self.usable(self.compile(escape))
            if esc.t not in STRS and esc.t != "unknown":
                raise WhereError(f"ESCAPE must be text, not {tname(esc.t)}")
            q = _paren("({} " + word + " {} ESCAPE {})", a.q, p.q, esc.q)
            p2 = Op("text", [p2, self.implicit(esc, "text")], like_escape, q)
        else:
            q = _paren("({} " + word + " {})", a.q, p.q)
        try:
            const = p2.fold()
        except WhereEvalError:  # e.g. a bad ESCAPE: fails (or not) when the tree is folded
            const = None
        if isinstance(const, Const) and const.value is not None and ends_in_escape(const.value):
            # Postgres fails on such a pattern only when matching reaches its end, and its
            # planner runs the match on sampled column values (patternsel()) when estimating:
            # whether a query fails then depends on the table's statistics.
            raise WhereError("LIKE pattern must not end with escape character")

        def fn(s: str, pat: str) -> bool:
            if ilike:
                s, pat = lower(s), lower(pat)
            r = like_match(s, 0, pat, 0) == LIKE_TRUE
            return not r if negate else r

        return Op("bool", [a, p2], fn, q)

    def text_function(self, e: exp.Expression) -> Node:
        """lower(), upper(), length()/char_length() of text (9.4 "String Functions")."""
        name = _TEXT_FUNCTIONS[type(e)]
        if any(v is not None for k, v in e.args.items() if k != "this"):
            self.refuse(e)
        x = self.usable(self.compile(e.this))
        if x.t == "unknown":
            x = self.coerce_unknown(x, "text")
        if x.t not in STRS:
            raise WhereError(f"function {name}({tname(x.t)}) does not exist ({self.describe(x)};"
                             " cast it to text)")
        q = _paren("pg_catalog." + name + "({})", x.q)
        if name == "length":
            # length(character) does not count trailing spaces (bpcharlen)
            fn = (lambda v: len(rtrim(v))) if x.t == "bpchar" else len
            return Op("int4", [x], fn, q)
        return Op("text", [self.implicit(x, "text")], lower if name == "lower" else upper, q)

    def coalesce(self, e: exp.Expression) -> Node:
        """COALESCE(a, b, ...) (9.18.2): the first non-NULL argument, later ones not evaluated;
        the arguments' common type as for UNION/CASE (10.5)."""
        if any(v for k, v in e.args.items() if k not in ("this", "expressions")):
            self.refuse(e)
        args = [self.usable(self.compile(a)) for a in [e.this, *e.expressions]]
        types = [a.t for a in args]
        ct = select_common_type(types)
        if ct is None or not all(can_implicit(t, ct) for t in types):
            known = [t for t in types if t != "unknown"]
            raise WhereError("COALESCE types " + " and ".join(dict.fromkeys(tname(t) for t in known))
                             + " cannot be matched")
        args = [self.implicit(a, ct) for a in args]
        q = sql.SQL("COALESCE(") + sql.SQL(", ").join(a.q for a in args) + sql.SQL(")")
        return Coalesce(ct, args, q)

    def cast(self, e: exp.Cast) -> Node:
        dst, typmod, tq = self.datatype(e.to)
        x = self.compile(e.this)
        q = _paren("CAST({} AS " + tq + ")", x.q)
        if x.t == "unknown":
            c = self.coerce_unknown(x, dst, typmod)
            q = _paren("CAST({} AS " + tq + ")", c.q)
            return Sugar(c, q)
        self.usable(x)
        if x.t == "timestamptz" or dst == "timestamptz":
            if x.t != dst:
                raise WhereError(f"casts between {tname(x.t)} and {tname(dst)} depend on the"
                                 " session TimeZone and are not supported")
        if dst in ("date", "timestamp", "time") and x.t in STRS:
            raise WhereError(f"casting {self.describe(x)} to {tname(dst)} is not supported (it"
                             " depends on DateStyle); compare with a literal instead")
        fn = cast_fn(x.t, dst, typmod)
        if fn is None:
            raise WhereError(f"cannot cast type {tname(x.t)} to {tname(dst)} ({self.describe(x)})")
        return Op(dst, [x], fn, q)

    def datatype(self, dt: exp.DataType) -> tuple[str, tuple[int, int] | None, str]:
        T = exp.DataType.Type
        params: list[int] = []
        for prm in dt.expressions:
            v = prm.this if isinstance(prm, exp.DataTypeParam) else prm
            if not (isinstance(v, exp.Literal) and not v.is_string and v.this.isdigit()):
                raise WhereError(f"unsupported type {dt.sql(dialect='postgres')}")
            params.append(int(v.this))
        kind = dt.this
        simple = {T.SMALLINT: "int2", T.INT: "int4", T.BIGINT: "int8", T.FLOAT: "float4",
                  T.TEXT: "text", T.BOOLEAN: "bool", T.DATE: "date", T.TIMESTAMP: "timestamp",
                  T.TIMESTAMPTZ: "timestamptz", T.TIME: "time", T.UUID: "uuid",
                  T.VARCHAR: "varchar"}
        if kind == T.DECIMAL:
            if not params:
                return "numeric", None, "numeric"
            p = params[0]
            s = params[1] if len(params) > 1 else 0
            if len(params) > 2 or not 1 <= p <= 1000 or not 0 <= s <= p:
                raise WhereError(f"unsupported type {dt.sql(dialect='postgres')}: numeric(p, s)"
                                 " needs 1 <= p <= 1000 and 0 <= s <= p")
            return "numeric", (p, s), f"numeric({p},{s})"
        if kind == T.DOUBLE:
            if params:
                if len(params) > 1 or not 1 <= params[0] <= 53:
                    raise WhereError("precision for type float must be between 1 and 53 bits")
                t = "float4" if params[0] <= 24 else "float8"
                return t, None, TYPE_SQL[t]
            return "float8", None, TYPE_SQL["float8"]
        if kind in simple and not params:
            t = simple[kind]
            return t, None, TYPE_SQL[t]
        raise WhereError(f"casts to {dt.sql(dialect='postgres')} are not supported")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Where:
    """A view's ``where:`` expression over the columns of its table.

    ``Where(text, columns)``: ``text`` is a SQL boolean expression (Postgres syntax);
    ``columns`` maps each column name of the table to its Postgres type name as
    ``format_type()`` prints it (``"integer"``, ``"numeric(10,2)"``, ``"character(4)"``,
    ``"timestamp with time zone"``, an enum's name, ``"text[]"``, ...). Raises
    :class:`WhereError` at construction for anything unsupported, ill-typed or naming an
    unknown column (:class:`WhereEvalError`, a subclass, when a constant part fails).

    Supported: ``=`` ``<>`` ``!=`` ``<`` ``<=`` ``>`` ``>=``; ``AND``/``OR``/``NOT`` (9.1);
    ``[NOT] IN (...)`` (9.24.1/9.24.2); ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE``,
    ``IS [NOT] DISTINCT FROM`` (9.2); ``[NOT] BETWEEN [SYMMETRIC]`` (9.2); ``[NOT] LIKE``/
    ``ILIKE`` with ``%``, ``_``, backslash and ``ESCAPE`` (9.7.1); ``+ - * / %`` and unary
    minus (9.3); ``x::type`` and ``CAST(x AS type)`` to ``smallint``, ``integer``, ``bigint``,
    ``numeric[(p,s)]``, ``real``, ``double precision``, ``text``, ``varchar``, ``boolean``,
    ``date``, ``timestamp``, ``timestamptz``, ``time``, ``uuid`` (4.2.9; casts that need the
    session TimeZone or DateStyle are refused); ``lower``, ``upper``, ``length``/
    ``char_length`` of text (9.4) and ``COALESCE`` (9.18.2); string (also ``$$…$$``), number,
    boolean and NULL literals (4.1.2), typed literals (``DATE '2026-01-01'``), parentheses.
    Columns of the types smallint/integer/bigint, numeric, real, double precision, boolean,
    text, varchar, character(n), date, timestamp, timestamptz, time and uuid take part in all
    of these (text ordering excepted); enums (and unknown types) in ``=``/``<>``/``IN``
    against labels; other types (arrays, interval, bytea, json, ...) only in
    ``IS [NOT] NULL``; jsonb not at all.

    Attributes: ``text`` (the expression as given), ``columns`` (frozenset of the column names
    it reads).
    """

    def __init__(self, text: str, columns: dict[str, str]) -> None:
        if not isinstance(text, str) or not text.strip():
            raise WhereError("the where expression is empty")
        self.text = text
        try:
            parsed = sqlglot.parse(text, dialect="postgres")
        except sqlglot.errors.SqlglotError as e:
            raise WhereError(f"cannot parse where expression: {_syntax_error(e)}") from None
        # sqlglot's parser builds exp.Expression nodes (its stubs may say a base class)
        trees = [cast(exp.Expression, t) for t in parsed if t is not None]
        if len(trees) != 1:
            raise WhereError("the where expression must be a single expression (no ';')")
        comp = _Compiler(columns)
        root = comp.compile(trees[0])
        root = comp.boolean(root, "WHERE")
        self._root = root
        self.columns: frozenset[str] = frozenset(comp.used)
        self._readers = {c: reader(comp.tag(c)) for c in self.columns}
        self._tree = root.fold()  # the planner's constant folding; may raise WhereEvalError

    def sql(self) -> sql.Composable:
        """The expression as SQL for a ``WHERE`` clause: ``((<expression>) IS TRUE)``, rebuilt
        from the parsed tree with ``sql.Identifier``/``sql.Literal`` (no user text pasted).

        The ``IS TRUE`` keeps the expression one qual: the planner may reorder the terms of a
        top-level ``AND`` by cost (and so skip or reach an erroring term differently), but not
        inside an expression. In a ``WHERE`` clause it does not change which rows match.

        The SQL may contain ``%`` (LIKE patterns, the modulo operator): execute the statement
        it is composed into without query parameters (psycopg reads ``%`` as a placeholder
        marker when parameters are passed), as ``COPY (SELECT …) TO STDOUT`` does; pass values
        as ``sql.Literal`` instead."""
        return sql.SQL("({} IS TRUE)").format(self._root.q)

    def evaluate(self, row: dict[str, Any]) -> bool | None:
        """The three-valued result for ``row`` (column → value in pgderive's value model):
        True, False or None (SQL NULL). Raises :class:`WhereEvalError` where Postgres raises
        for the same row (division by zero, overflow, a bad cast), or when ``row`` lacks a
        column the expression reads."""
        vals: dict[str, Any] = {}
        for c, read in self._readers.items():
            try:
                v = row[c]
            except KeyError:
                raise WhereEvalError(f"row has no column '{c}'") from None
            if v is None:
                vals[c] = None
            else:
                try:
                    vals[c] = read(v)
                except WhereEvalError:
                    raise
                except (ValueError, TypeError, ArithmeticError) as e:
                    raise WhereEvalError(f"cannot read column '{c}' value {v!r}: {e}") from None
        result: bool | None = self._tree.ev(vals)
        return result

    def matches(self, row: dict[str, Any]) -> bool:
        """True only when the expression is TRUE for ``row`` (NULL and FALSE do not match, as
        in a ``WHERE`` clause). Raises like :meth:`evaluate`."""
        return self.evaluate(row) is True

    def __repr__(self) -> str:
        return f"Where({self.text!r})"


def _syntax_error(e: Exception) -> str:
    """A parser failure in the user's terms, like Postgres' own ``syntax error at or near "x"``:
    the offending token and its line/column, never sqlglot's class or token-type names."""
    if isinstance(e, sqlglot.errors.ParseError) and e.errors:
        err = e.errors[0]
        token = str(err.get("highlight") or "").strip()
        where = f"line {err.get('line')}, column {err.get('col')}"
        return (f'syntax error at or near "{token[:40]}" ({where})' if token
                else f"syntax error ({where})")
    if isinstance(e, sqlglot.errors.TokenError):
        return "syntax error: an unterminated quoted string or identifier, or a character SQL does not allow"
    return "syntax error"
