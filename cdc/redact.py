"""Hiding secrets in connection strings, URLs and any text printed or logged.

The one place that knows what a secret looks like (ARCHITECTURE.md, "Layers": ``cdc`` is the
lowest layer, so sinks, views and the application all use it):

* libpq connection strings, both forms (Postgres docs, "Connection Strings", 34.1.1): the
  key=value form (``password=s3cret``, ``password = 'a b'``) and the URI form (userinfo
  ``postgresql://user:s3cret@host`` and query parameters ``?sslpassword=s3cret``). The secret
  key words are :data:`SECRET_KEYWORDS`, from "Parameter Key Words" (34.1.2): ``password``,
  ``sslpassword`` (the client key's passphrase) and ``oauth_client_secret`` (Postgres 18).
  libpq key words are case-sensitive, but ``PASSWORD=`` is still someone's password: matching
  here ignores case (and percent-encoding of URI query names).
* URLs of the sinks (``redis://user:s3cret@host``, ``http://user:s3cret@host:9200``, a
  ``?password=`` query parameter as redis-py accepts): :func:`redact_url`.
* Everything else that reaches a user: :func:`scrub` replaces every secret value registered
  with :func:`register_secrets` (the CLI registers those of the loaded spec) in arbitrary text,
  and :class:`RedactingFilter` does it for every log record, so a library that echoes part of
  a connection string in an error message cannot leak it either.

Redaction replaces a secret with ``***`` and keeps everything else, so a message still says
which host, user and database it is about.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Iterable
from urllib.parse import unquote

__all__ = ["SECRET_KEYWORDS", "MASK", "redact_dsn", "redact_url", "dsn_secrets", "url_secrets",
           "register_secrets", "registered_secrets", "scrub", "RedactingFilter"]

#: libpq connection parameters whose value is a secret (Postgres docs, "Parameter Key Words").
#: ``passfile``, ``sslkey`` and ``sslcert`` name files and stay visible.
SECRET_KEYWORDS: frozenset[str] = frozenset({"password", "sslpassword", "oauth_client_secret"})
MASK = "***"

_KEYWORDS = "|".join(sorted(SECRET_KEYWORDS))
# key=value form: the keyword (any case, at a word start), optional spaces, '=', optional spaces,
# then a single-quoted value with backslash escapes or an unquoted one up to whitespace.
_KV_RE = re.compile(rf"(?i)(?<![\w.])((?:{_KEYWORDS})\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)")
_URI_RE = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.-]*://)(.*)$", re.DOTALL)
_QUERY_PARAM_RE = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def _is_secret_name(name: str) -> bool:
    return unquote(name).strip().lower() in SECRET_KEYWORDS


def _split_userinfo(rest: str) -> tuple[str, str, str] | None:
    """``user:pass@host…`` → ``(user, pass, host…)``; None without a password.

    The userinfo ends at the LAST ``@`` before the path (a password may itself hold an ``@``);
    when the text after ``://`` has no ``/`` at all, at the last ``@`` anywhere. Erring towards
    hiding more is fine: this only shapes messages.
    """
    at = rest.rfind("@", 0, rest.find("/") if "/" in rest else len(rest))
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return None
    userinfo = rest[:at]
    if ":" not in userinfo:
        return None
    user, _, password = userinfo.partition(":")
    return user, password, rest[at + 1:]


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo) and secret query parameters replaced by ``***``.

    Works for every scheme pgderive sees: ``postgresql://``, ``postgres://``, ``redis://``,
    ``rediss://``, ``unix://``, ``http(s)://``. Text that is not a URL is returned unchanged.
    """
    m = _URI_RE.match(url)
    if not m:
        return url
    scheme, rest = m.groups()
    parts = _split_userinfo(rest)
    if parts is not None:
        user, _password, tail = parts
        rest = f"{user}:{MASK}@{tail}"

    def query(q: re.Match[str]) -> str:
        sep, name, value = q.groups()
        return f"{sep}{name}={MASK}" if _is_secret_name(name) else q.group(0)

    return scheme + _QUERY_PARAM_RE.sub(query, rest)


def redact_dsn(dsn: str) -> str:
    """A libpq connection string (URI or key=value) with every secret parameter's value
    replaced by ``***`` (:data:`SECRET_KEYWORDS`, any case)."""
    if _URI_RE.match(dsn):
        return redact_url(dsn)
    return _KV_RE.sub(lambda m: m.group(1) + MASK, dsn)


def _unquote_kv(value: str) -> str:
    if value.startswith("'"):
        value = value[1:-1] if value.endswith("'") and len(value) > 1 else value[1:]
        return re.sub(r"\\(.)", r"\1", value)
    return value


def url_secrets(url: str) -> list[str]:
    """The secret values in ``url`` (its userinfo password and secret query parameters), both
    as written and percent-decoded; empty ones left out."""
    out: list[str] = []
    m = _URI_RE.match(url)
    if not m:
        return out
    rest = m.group(2)
    parts = _split_userinfo(rest)
    if parts is not None:
        out.append(parts[1])
    out += [q.group(3) for q in _QUERY_PARAM_RE.finditer(rest) if _is_secret_name(q.group(2))]
    return [s for s in dict.fromkeys(out + [unquote(s) for s in out]) if s]


def dsn_secrets(dsn: str) -> list[str]:
    """The secret values of a libpq connection string (see :func:`url_secrets` for URIs)."""
    if _URI_RE.match(dsn):
        return url_secrets(dsn)
    out = [_unquote_kv(m.group(2)) for m in _KV_RE.finditer(dsn)]
    out += [m.group(2) for m in _KV_RE.finditer(dsn)]
    return [s for s in dict.fromkeys(out) if s]


_lock = threading.Lock()
_secrets: list[str] = []


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values for :func:`scrub` (process-wide). A value with spaces is also
    remembered word by word (libpq may quote one word of a bad string back); words and values
    shorter than 4 characters are not, as hiding them would mangle ordinary text."""
    with _lock:
        for v in values:
            for part in [v, *v.split()]:
                if len(part) >= 4 and part not in _secrets:
                    _secrets.append(part)
        _secrets.sort(key=len, reverse=True)  # longest first: a word never hides half a value


def registered_secrets() -> list[str]:
    """The values :func:`register_secrets` remembered (to register them in a process this one
    starts: a lane's process scrubs the same secrets)."""
    with _lock:
        return list(_secrets)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` and every connection string
    or URL in it redacted (:func:`redact_url`, key=value ``password=`` pairs)."""
    with _lock:
        secrets = list(_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    text = _KV_RE.sub(lambda m: m.group(0) if m.group(2).startswith(MASK) else m.group(1) + MASK, text)
    return re.sub(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact_url(m.group(0)), text)


class RedactingFilter(logging.Filter):
    """A logging filter (install it on handlers) that :func:`scrub`\\ s each record's message,
    arguments included, and its exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True
