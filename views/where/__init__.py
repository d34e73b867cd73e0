"""The ``where:`` clause of a view: one SQL boolean expression, evaluated twice.

A view may declare ``where: "<SQL boolean expression over the row's columns>"``. The expression
is parsed once (with sqlglot, dialect ``postgres``) into a small typed tree that

* renders back to SQL with :mod:`psycopg.sql` (:meth:`Where.sql`): identifiers through
  ``sql.Identifier``, literals through ``sql.Literal``, so no user text is ever pasted; the
  snapshot query pushes it down (``WHERE <where.sql()>``);
* evaluates in Python on streamed rows (:meth:`Where.evaluate`, :meth:`Where.matches`) with
  the same result Postgres gives for the same row, three-valued logic included.

Both sides must agree on every row, otherwise a view built from the snapshot and then kept up
to date from the stream would differ from one rebuilt later. So the Python side mirrors what
Postgres does, step by step, for the constructs it accepts, and refuses (:class:`WhereError`,
at construction) everything else rather than guessing. The Postgres 15 documentation sections
this relies on are cited where used; in short:

* **Typing** (chapter 10, "Type Conversion"; 10.2 "Operators", 10.5 "UNION, CASE, and Related
  Constructs"): a string literal is of type *unknown* and takes the type of the other operand
  (``created_at > '2026-01-01'`` compares timestamps, ``price > '10.5'`` numerics; an
  invalid literal is an error at construction, as Postgres rejects it when parsing). Integer
  literals are ``integer``, ``bigint`` or ``numeric`` by size, other number literals
  ``numeric`` (4.1.2.6 "Numeric Constants"). Mixed numeric operands follow Postgres' operator
  resolution: integer types compare exactly with each other, integers with ``numeric`` as
  numerics (so ``int_col = 10.5`` is exact), anything with ``real``/``double precision`` as
  doubles (``bigint`` and ``numeric`` rounded to the nearest double first, ``real`` exact).
* **Three-valued logic** (9.1 "Logical Operators", 9.2 "Comparison Functions and Operators",
  9.24.1/9.24.2 "IN"/"NOT IN"): ``x NOT IN (1, NULL)`` is NULL unless ``x`` is 1;
  ``IS [NOT] DISTINCT FROM``, ``IS [NOT] NULL``, ``IS [NOT] TRUE/FALSE/UNKNOWN``.
* **Numbers** (8.1 "Numeric Types", 9.3 "Mathematical Functions and Operators"): integer
  arithmetic is checked for overflow (``integer out of range``) and ``/`` truncates toward
  zero; ``numeric`` is exact, its division keeps the scale Postgres picks (at least 16
  significant digits, ``numeric.c`` ``select_div_scale``), ``NaN`` equals ``NaN`` and sorts
  above everything, ``Infinity`` above every finite value (8.1.2); floats likewise
  (8.1.3), ``-0`` equals ``0``; overflow/underflow raise as in Postgres. Division by zero
  raises :class:`WhereEvalError` (Postgres raises too).
* **Text** (8.3 "Character Types", 9.7.1 "LIKE"): ``=``/``<>``/``IN`` compare exactly (the
  default collation is deterministic); ``character(n)`` compares ignoring trailing spaces,
  and a ``character(n)`` turned into ``text`` loses them; ``LIKE``/``ILIKE`` with ``%``, ``_``,
  backslash or ``ESCAPE`` escapes, Postgres' matcher ported (including its errors, e.g.
  ``LIKE pattern must not end with escape character`` only when the matcher gets there).
  Ordering comparisons of text depend on the collation and are refused.
* **Dates and times** (8.5 "Date/Time Types"): values are read from Postgres' ISO output
  (``DateStyle`` ISO, the default) into Postgres' own representation (days / microseconds
  since 2000-01-01, ``±infinity`` as the extreme values), so BC dates, years past 9999 and
  ``infinity`` compare as in Postgres. ``timestamptz`` values carry their offset (``+00``,
  ``+05:30``, ``+05:53:28``).
* **Evaluation order and errors** (4.2.14 "Expression Evaluation Rules"): constant
  subexpressions are folded at construction like the planner folds them (an error there is
  an error here), ``AND``/``OR`` evaluate left to right and stop at the first ``FALSE``/
  ``TRUE``, and :meth:`Where.sql` renders the whole expression as ``((…) IS TRUE)`` so that
  the planner cannot split a top-level ``AND`` and reorder its terms: a row then raises in
  Python exactly when it would raise in Postgres.

* **Functions** (9.4 "String Functions and Operators", 9.18.2 "COALESCE"): ``lower``,
  ``upper``, ``length``/``char_length`` of text, ``COALESCE`` (common type as in 10.5, later
  arguments not evaluated). Every other function call is refused.

Known limits, each refused or documented:

* ``timestamptz`` literals without an offset are read as UTC and rendered with ``+00``
  (Postgres would use the session ``TimeZone``; the rendered SQL and the Python side agree
  whatever the server's setting). Conversions that depend on the session ``TimeZone``
  (``date``/``timestamp`` against ``timestamptz``, casts to or from ``timestamptz``) and on
  ``DateStyle`` (text to date/time) are refused; date/time literals are accepted in ISO form
  only (``'2026-01-01'``, ``'2026-01-01 10:00:00.5+05:30'``, ``'infinity'``, ``'epoch'``).
* Column types this module does not know (user enums, and domains, which ``format_type``
  names like enums) are compared as enum labels, by exact text, with ``=``, ``<>`` and ``IN``
  only; a label the enum does not have is an error in Postgres but just unequal here.
* ``ILIKE``, ``lower()``, ``upper()`` fold case like a UTF-8 libc locale (per-character simple
  mappings, as ``C.UTF-8`` and ``en_US.UTF-8`` do), not like a database whose ``LC_CTYPE`` is
  ``C`` (ASCII only).
* A constant ``LIKE`` pattern ending in a lone escape character is refused: Postgres fails on
  it only if matching reaches the end, and its planner also runs the match on sampled column
  values when estimating selectivity, so whether a query fails would depend on statistics.
* ``real``/``double precision`` to text uses the shortest exact form, Postgres' output with
  ``extra_float_digits`` >= 1 (the default), like pgderive's value model itself.

The package: :mod:`.compiler` parses, types and renders an expression (:class:`Where`);
:mod:`.types` holds the type tags, categories, implicit casts and operator resolution;
:mod:`.casts` the casts, literal input and the reading of row values; :mod:`.nodes` the
evaluator tree. The Postgres type semantics themselves are ported in :mod:`views.pgtypes`.
"""
from __future__ import annotations

from ..pgtypes.errors import WhereError, WhereEvalError
from .compiler import Where

__all__ = ["Where", "WhereError", "WhereEvalError"]
