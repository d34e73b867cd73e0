"""cdc.redact: every libpq secret parameter and URL password is hidden, in every form."""
from __future__ import annotations

import logging

import pytest

from cdc.redact import (MASK, RedactingFilter, SECRET_KEYWORDS, dsn_secrets, redact_dsn, redact_url,
                        register_secrets, scrub)
from views.spec import SpecError, parse_spec


@pytest.mark.parametrize("dsn, expected, secrets", [
    ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db", ["s3cret"]),
    ("postgres://u:p@ss@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require", ["p@ss"]),
    ("postgresql://u@h/db?sslmode=require&password=s3cret", "postgresql://u@h/db?sslmode=require&password=***",
     ["s3cret"]),
    ("postgresql://u@h/db?sslpassword=k3yphrase&sslkey=/k.pem", "postgresql://u@h/db?sslpassword=***&sslkey=/k.pem",
     ["k3yphrase"]),
    ("postgresql://u@h/db?SSLPASSWORD=k3y&pass%77ord=x%21y", "postgresql://u@h/db?SSLPASSWORD=***&pass%77ord=***",
     ["k3y", "x%21y", "x!y"]),
    ("postgresql://u:a%2Fb@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db", ["a%2Fb", "a/b"]),
    ("host=h user=u password=s3cret dbname=d", "host=h user=u password=*** dbname=d", ["s3cret"]),
    ("host=h password = 'with space\\' quote' user=u", "host=h password = *** user=u", None),
    ("host=h PASSWORD=UpPeR dbname=d", "host=h PASSWORD=*** dbname=d", ["UpPeR"]),
    ("host=h sslpassword=kv1 Password='x y' oauth_client_secret=cs1", "host=h sslpassword=*** Password=*** oauth_client_secret=***",
     ["kv1", "x y", "'x y'", "cs1"]),
    ("host=h passfile=/p sslkey=/k user=u", "host=h passfile=/p sslkey=/k user=u", []),
    ("host=h user=u", "host=h user=u", []),
])
def test_redact_dsn(dsn: str, expected: str, secrets: list[str] | None) -> None:
    assert redact_dsn(dsn) == expected
    if secrets is not None:
        assert sorted(dsn_secrets(dsn)) == sorted(secrets)


@pytest.mark.parametrize("url, expected", [
    ("redis://:pw1@h:6380/0", "redis://:***@h:6380/0"),
    ("rediss://user:pw2@h:6380/0", "rediss://user:***@h:6380/0"),
    ("redis://h:6380/0?password=pw3", "redis://h:6380/0?password=***"),
    ("unix://u:pw4@/tmp/r.sock?db=0", "unix://u:***@/tmp/r.sock?db=0"),
    ("http://admin:pw5@127.0.0.1:9201", "http://admin:***@127.0.0.1:9201"),
    ("https://127.0.0.1:9201", "https://127.0.0.1:9201"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_secret_keywords_follow_libpq() -> None:
    # Postgres docs, "Parameter Key Words": the parameters whose values are secrets.
    assert {"password", "sslpassword"} <= SECRET_KEYWORDS
    assert not {"passfile", "sslkey", "sslcert", "user"} & SECRET_KEYWORDS


def test_scrub_registered_secrets_and_log_records(caplog: pytest.LogCaptureFixture) -> None:
    register_secrets(["zz-scrub-secret-1", "two words-zz9"])
    text = ('failed: zz-scrub-secret-1 at postgresql://u:other@h/db; host=h PASSWORD=abc; '
            'missing "=" after "words-zz9" in connection info string')
    out = scrub(text)
    assert "zz-scrub-secret-1" not in out and "other" not in out and "abc" not in out
    assert "words-zz9" not in out
    assert out.startswith(f"failed: {MASK} at postgresql://u:***@h/db")
    # already redacted text keeps its punctuation
    assert scrub("source host=h password=***: refused") == "source host=h password=***: refused"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "cannot connect to %s", ("zz-scrub-secret-1",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"cannot connect to {MASK}"


def test_spec_secrets_cover_source_and_sinks() -> None:
    spec = parse_spec(
        'source: {dsn: "host=h password=pgpw1 sslpassword=sslpw1", slot: s}\n'
        'sinks:\n  cache: {type: redis, url: "redis://u:redispw1@h:6380/0"}\n'
        '  search: {type: opensearch, hosts: ["http://u:ospw1@h:9201"]}\n'
        'views:\n  v: {table: t, sink: cache, key: "{a}"}\n')
    assert set(spec.secrets()) >= {"pgpw1", "sslpw1", "redispw1", "ospw1"}
    assert not any(s in repr(spec) for s in ("pgpw1", "sslpw1", "redispw1"))


@pytest.mark.parametrize("dsn", ["postgresql://u:zz-port-pw@h:54x32/db", "host=h port=99999 password=zz-port-pw",
                                 "postgresql://u@h1:5432,h2:x/db"])
def test_malformed_source_port_is_a_config_error(dsn: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(f'source: {{dsn: "{dsn}", slot: s}}\nsinks: {{c: {{type: redis}}}}\n'
                   'views: {v: {table: t, sink: c, key: "{a}"}}\n', filename="c.yaml")
    (problem,) = info.value.problems
    assert problem.path == "source.dsn" and problem.line == 1
    assert problem.message.startswith("port must be an integer from 1 to 65535")
    assert "zz-port-pw" not in str(info.value)
