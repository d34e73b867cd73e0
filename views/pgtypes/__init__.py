"""Python ports of Postgres' own type semantics, so that a view's ``where:`` expression
(:mod:`views.where`) gives the same answer when pgderive evaluates it on a streamed row as
when Postgres evaluates it in the snapshot query.

Each module follows the Postgres 15 sources and documentation it names, function by function
(the Postgres function a port follows is named in its docstring or comment):

* :mod:`.numeric`: ``numeric`` input, text, arithmetic, scale and typmod
  (``src/backend/utils/adt/numeric.c``; manual 8.1.2 "Arbitrary Precision Numbers", 9.3
  "Mathematical Functions and Operators");
* :mod:`.floats`: ``real``/``double precision`` input, arithmetic with its overflow and
  underflow checks, conversions and shortest text (``src/backend/utils/adt/float.c``,
  ``src/include/utils/float.h``, ``src/common/d2s.c``/``f2s.c``; manual 8.1.3
  "Floating-Point Types");
* :mod:`.integers`: ``smallint``/``integer``/``bigint`` input, ranges and checked arithmetic
  (``src/backend/utils/adt/int.c``, ``int8.c``, ``numutils.c``; manual 8.1.1 "Integer
  Types");
* :mod:`.datetime`: ``date``/``timestamp``/``timestamptz``/``time`` read from ISO text, their
  text and conversions (``src/backend/utils/adt/datetime.c``, ``date.c``, ``timestamp.c``;
  manual 8.5 "Date/Time Types");
* :mod:`.text`: ``LIKE`` matching and its ``ESCAPE``, ``lower``/``upper``, ``character(n)``
  comparison (``src/backend/utils/adt/like_match.c``, ``like.c``, ``oracle_compat.c``,
  ``varchar.c``; manual 8.3 "Character Types", 9.4 "String Functions and Operators", 9.7.1
  "LIKE");
* :mod:`.misc`: ``boolean`` and ``uuid`` input and text (``src/backend/utils/adt/bool.c``,
  ``uuid.c``; manual 8.6 "Boolean Type", 8.12 "UUID Type").

Types are named by tags (:mod:`.tags`): ``int2 int4 int8 numeric float4 float8 bool text
varchar bpchar date timestamp timestamptz time uuid unknown``, and in :mod:`views.where` also
``"enum:<name>"`` and ``"opaque:<name>"``. Values have these internal representations:
ints: int; numeric: Decimal (finite ones with exponent <= 0 and no negative zero, like
Postgres' NumericVar with its display scale) or Decimal NaN/±Infinity; floats: float (real
values are exactly representable in binary32); bool: bool; text types and enums: str; date:
days since 2000-01-01; timestamp(tz): microseconds since 2000-01-01 (UTC for timestamptz);
±infinity: Postgres' sentinels (INT32/INT64 min and max); time: microseconds; uuid: int.

Failures Postgres reports for a value raise :class:`~.errors.WhereEvalError` with Postgres'
message.
"""
