"""The errors of ``where:`` expressions, defined here so that both the type ports
(:mod:`views.pgtypes`) and the compiler (:mod:`views.where`, which re-exports them) can raise
them."""
from __future__ import annotations

__all__ = ["WhereError", "WhereEvalError", "err"]


class WhereError(ValueError):
    """A ``where:`` expression that cannot be used: it does not parse, names an unknown column
    (``unknown column 'pirce' (did you mean 'price'?)``), uses a construct this module does
    not support (``subqueries are not supported``, ``function calls are not supported
    (md5)``), or is ill-typed the way Postgres would reject it (``operator does not exist:
    text = integer``, ``invalid input syntax for type integer: "10.5"``)."""


class WhereEvalError(WhereError):
    """Evaluating the expression failed where Postgres fails too: ``division by zero``,
    ``integer out of range``, ``value out of range: overflow``, ``invalid input syntax for type
    numeric: "abc"`` (a cast of a text column), ``LIKE pattern must not end with escape
    character``, ... Raised by :meth:`Where.evaluate`/:meth:`Where.matches` for the row, or by
    the constructor when a constant part of the expression fails (Postgres folds constants
    when planning and fails there)."""


def err(msg: str) -> WhereEvalError:
    return WhereEvalError(msg)
