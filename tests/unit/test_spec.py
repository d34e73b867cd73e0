"""The YAML spec and key templates: pure, no services."""
from __future__ import annotations

import textwrap

import pytest

from views.spec import (OpenSearchSinkSpec, RedisSinkSpec, SpecError, ViewSpec, load_spec, parse_spec,
                        parse_table, redact_dsn)
from views.template import KeyTemplate, TemplateError

GOOD = """\
source:
  dsn: ${PGDERIVE_SOURCE_DSN:-postgresql://postgres@127.0.0.1:5433/bench}
  slot: pgderive_bench          # logical replication slot, created on first run
sinks:
  cache:  {type: redis, url: "redis://127.0.0.1:6380/0"}
  search: {type: opensearch, hosts: ["http://127.0.0.1:9201"]}
views:
  account_cache:
    table: public.pgbench_accounts
    sink: cache
    key: "account:{aid}"        # Redis key template over the row's columns
    fields: [aid, bid, abalance]  # list: same names; mapping: output name -> column
    format: hash                # redis: hash | json
  branch_search:
    table: public.pgbench_branches
    sink: search
    index: branches             # the alias users query; generations live behind it
    fields: {branch_id: bid, balance: bbalance}
"""

HEAD = """\
source: {dsn: "postgresql://postgres@127.0.0.1:5433/db", slot: s}
sinks:
  cache: {type: redis}
  search: {type: opensearch, hosts: ["http://127.0.0.1:9201"]}
views:
"""  # views start at line 6


def problems(text: str, env: dict[str, str] | None = None) -> list[tuple[str, int | None, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(text), filename="t.yaml", env=env or {})
    return [tuple(p) for p in info.value.problems]


def one(text: str, env: dict[str, str] | None = None) -> tuple[str, int | None, str]:
    found = problems(text, env)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------- happy path

def test_design_example_parses_with_defaults() -> None:
    spec = parse_spec(GOOD, filename="config/x.yaml", env={})
    assert spec.source.dsn == "postgresql://postgres@127.0.0.1:5433/bench"
    assert spec.source.slot == "pgderive_bench"
    assert isinstance(spec.sinks["cache"], RedisSinkSpec)
    assert spec.sinks["cache"].url == "redis://127.0.0.1:6380/0"
    assert isinstance(spec.sinks["search"], OpenSearchSinkSpec)
    assert spec.sinks["search"].hosts == ["http://127.0.0.1:9201"]
    acc, br = spec.views["account_cache"], spec.views["branch_search"]
    assert (acc.schema, acc.name, acc.qualified) == ("public", "pgbench_accounts",
                                                     "public.pgbench_accounts")
    assert acc.key_template == KeyTemplate("account:{aid}")
    assert acc.field_map == {"aid": "aid", "bid": "bid", "abalance": "abalance"}
    assert acc.format == "hash" and acc.index is None
    assert br.key is None and br.key_template is None and br.format is None
    assert br.index == "branches"
    assert br.field_map == {"branch_id": "bid", "balance": "bbalance"}
    assert spec.filename == "config/x.yaml"


def test_redis_format_defaults_to_hash_and_json_is_kept() -> None:
    spec = parse_spec(HEAD + '  a: {table: t, sink: cache, key: "a:{id}"}\n'
                             '  b: {table: u, sink: cache, key: "b:{id}", format: json}\n', env={})
    assert spec.views["a"].format == "hash"
    assert spec.views["b"].format == "json"
    assert spec.views["a"].qualified == "public.t"
    assert spec.views["a"].fields is None and spec.views["a"].field_map is None


def test_a_view_on_several_sinks_becomes_one_view_per_sink() -> None:
    spec = parse_spec(HEAD + '  a: {table: t, sink: [cache, search], key: "a:{id}", index: ai}\n'
                             '  b: {table: u, sink: cache, key: "b:{id}"}\n', env={})
    assert spec.groups == {"a": ["a@cache", "a@search"], "b": ["b"]}
    assert spec.resolve("a") == ["a@cache", "a@search"] and spec.resolve("a@search") == ["a@search"]
    got = {n: (v.sink, v.sinks, v.sink_name, v.format, v.index) for n, v in spec.views.items()}
    assert got == {"a@cache": ("cache", ["cache"], "cache", "hash", None),
                   "a@search": ("search", ["search"], "search", None, "ai"),
                   "b": ("cache", ["cache"], "cache", "hash", None)}


def test_sinks_and_sink_name_of_a_view_as_declared() -> None:
    view = ViewSpec(table="t", sink=["cache", "search"], key="{id}")
    assert view.sinks == ["cache", "search"]
    with pytest.raises(ValueError, match="lists sinks"):
        view.sink_name
    assert ViewSpec(table="t", sink="cache", key="{id}").sinks == ["cache"]


def test_aggregate_measures_are_checked() -> None:
    spec = parse_spec(HEAD + '  a: {table: t, sink: cache, key: "a:{g}", group_by: [g],'
                             ' aggregate: {n: count(*), total: sum(x)}}\n', env={})
    assert spec.views["a"].aggregate == {"n": "count(*)", "total": "sum(x)"}
    assert one(HEAD + '  a: {table: t, sink: cache, key: "a:{g}", group_by: [g],'
                      ' aggregate: {m: median(x)}}\n') == (
        "views.a.aggregate.m", 6, "expected count(*), count(col), sum(col), min(col), max(col) or"
        " avg(col), got 'median(x)'")


def test_table_names_follow_sql_rules() -> None:
    assert parse_table("t") == ("public", "t")
    assert parse_table("Sales.Orders") == ("sales", "orders")
    assert parse_table('public."Orders"') == ("public", "Orders")
    assert parse_table('"a,b"."x""y"') == ("a,b", 'x"y')
    assert parse_table('"A b"."c.d"') == ("A b", "c.d")
    with pytest.raises(ValueError, match="contains '.'"):
        parse_table('"a.b"."x"')  # a dot in a schema name: refused
    for bad in ["", "a.b.c", "a.", ".b", "a b", '"unterminated']:
        with pytest.raises(ValueError, match="invalid table name"):
            parse_table(bad)


def test_spec_error_and_errors_use_line_map() -> None:
    spec = parse_spec(GOOD, filename="config/pgbench.yaml", env={})
    err = spec.error("views.account_cache.key", "unknown column 'idd'")
    assert str(err) == "config/pgbench.yaml:11: views.account_cache.key: unknown column 'idd'"
    err = spec.errors([("views.account_cache.fields[2]", "m1"),
                       ("views.branch_search.fields.balance", "m2"),
                       ("views.branch_search.key", "m3"),  # not in the file: nearest ancestor
                       ("nowhere", "m4")])
    assert err.problems == [("views.account_cache.fields[2]", 12, "m1"),
                            ("views.branch_search.fields.balance", 18, "m2"),
                            ("views.branch_search.key", 14, "m3"),
                            ("nowhere", None, "m4")]
    assert str(err).splitlines()[-1] == "config/pgbench.yaml: nowhere: m4"


def test_load_spec_reads_file_and_reports_unreadable(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    assert load_spec(path, env={}).filename == str(path)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "missing.yaml", env={})
    assert str(info.value).startswith(f"{tmp_path / 'missing.yaml'}: cannot read the file")


# ----------------------------------------------------------------------------------- interpolation

def test_interpolation_variables_defaults_and_escapes() -> None:
    text = GOOD.replace("slot: pgderive_bench", "slot: ${SLOT}").replace(
        'url: "redis://127.0.0.1:6380/0"', 'url: "redis://${RHOST:-localhost}:${RPORT:-6380}/$$x"')
    spec = parse_spec(text, env={"SLOT": "myslot", "RPORT": "", "PGDERIVE_SOURCE_DSN": "host=h"})
    assert spec.source.slot == "myslot"
    assert spec.source.dsn == "host=h"
    assert spec.sinks["cache"].url == "redis://localhost:6380/$x"  # empty RPORT -> default


def test_interpolation_set_but_empty_without_default_is_empty() -> None:
    text = GOOD.replace('key: "account:{aid}"', 'key: "${PREFIX}account:{aid}"')
    spec = parse_spec(text, env={"PREFIX": ""})
    assert spec.views["account_cache"].key == "account:{aid}"


def test_interpolation_reads_environment_at_call_time(monkeypatch) -> None:
    monkeypatch.setenv("PGDERIVE_SOURCE_DSN", "postgresql://late@host/db")
    assert parse_spec(GOOD).source.dsn == "postgresql://late@host/db"


def test_missing_variable_names_path_line_and_variable() -> None:
    found = problems(GOOD.replace("slot: pgderive_bench", "slot: ${SLOT_NAME}")
                     .replace("index: branches", "index: ${IDX}"))
    assert found == [
        ("source.slot", 3, "environment variable SLOT_NAME is not set"
                           " (or give a default: ${SLOT_NAME:-default})"),
        ("views.branch_search.index", 17, "environment variable IDX is not set"
                                          " (or give a default: ${IDX:-default})"),
    ]


def test_malformed_variable_reference() -> None:
    path, line, message = one(GOOD.replace("slot: pgderive_bench", "slot: ${oops"))
    assert (path, line) == ("source.slot", 3)
    assert message.startswith("invalid variable reference '${oops'")


def test_str_of_spec_error_is_file_line_path_message() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(GOOD.replace("slot: pgderive_bench", "slot: ${SLOT}"),
                   filename="config/pgbench.yaml", env={})
    assert str(info.value) == ("config/pgbench.yaml:3: source.slot: environment variable SLOT is"
                               " not set (or give a default: ${SLOT:-default})")


# ------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("view, expected", [
    # redis views
    ('  v: {table: t, sink: cache}',
     ("views.v.key", 6, 'required for redis views, e.g. key: "account:{aid}"')),
    ('  v: {table: t, sink: cache, key: "{a}", index: i}',
     ("views.v.index", 6, "only for opensearch views; sink 'cache' is redis")),
    ('  v: {table: t, sink: cache, key: "{a}", format: hsh}',
     ("views.v.format", 6, "must be 'hash' or 'json', got 'hsh'")),
    ('  v: {table: t, sink: cache, key: "a:{aid"}',
     ("views.v.key", 6, "key template 'a:{aid': unclosed '{' at position 2"
                        " (write '{{' for a literal brace)")),
    ('  v: {table: t, sink: cache, key: "static"}',
     ("views.v.key", 6, "key template 'static' has no {column} placeholder:"
                        " every row would get the same key")),
    # opensearch views
    ('  v: {table: t, sink: search}',
     ("views.v.index", 6, "required for opensearch views: the alias users query")),
    ('  v: {table: t, sink: search, index: i, format: json}',
     ("views.v.format", 6, "only for redis views; sink 'search' is opensearch")),
    ('  v: {table: t, sink: search, index: Bad}',
     ("views.v.index", 6, "invalid index name 'Bad': use lowercase letters, digits and _ . + -,"
                          " starting with a letter or digit, at most 200 characters")),
    ('  v: {table: t, sink: search, index: _x}',
     ("views.v.index", 6, "invalid index name '_x': use lowercase letters, digits and _ . + -,"
                          " starting with a letter or digit, at most 200 characters")),
    # any view
    ('  v: {table: t, sink: nope, key: "{a}"}',
     ("views.v.sink", 6, "unknown sink 'nope' (declared sinks: cache, search)")),
    ('  bad-name: {table: t, sink: cache, key: "{a}"}',
     ("views.bad-name", 6, "invalid view name 'bad-name': use letters, digits and underscores")),
    ('  v: {sink: cache, key: "{a}"}',
     ("views.v.table", 6, "missing required key 'table'")),
    ('  v: {table: a.b.c, sink: cache, key: "{a}"}',
     ("views.v.table", 6, "invalid table name 'a.b.c': use schema.table or table"
                          " (double-quote mixed-case names: 'public.\"Orders\"')")),
    ('  v: {table: t, sink: cache, key: "{a}", colour: red}',
     ("views.v.colour", 6, "unknown key 'colour' (allowed: table, sink, key, fields, format,"
                           " index, topic, where, derive, include, group_by, aggregate, derive_reads, outputs)")),
    ('  v: {table: 3, sink: cache, key: "{a}"}',
     ("views.v.table", 6, "must be a string, got a number")),
    ('  v: [table, t]',
     ("views.v", 6, "must be a mapping, got a list")),
    ('  v: {table: t, sink: cache, key: "{a}", fields: aid}',
     ("views.v.fields", 6, "must be a list of column names or a mapping output name -> column,"
                           " got a string")),
    ('  v: {table: t, sink: cache, key: "{a}", fields: []}',
     ("views.v.fields", 6, "must name at least one column (leave 'fields' out for all"
                           " columns)")),
])
def test_view_validation_messages(view: str, expected: tuple[str, int, str]) -> None:
    assert one(HEAD + view + "\n") == expected


def test_fields_item_errors_point_at_the_item_line() -> None:
    text = HEAD + ('  v:\n    table: t\n    sink: cache\n    key: "{a}"\n    fields:\n'
                   '      - a\n      - b\n      - 3\n')
    assert one(text) == ("views.v.fields[2]", 13, "must be a column name, got a number")
    assert one(text.replace("- 3", "- a")) == ("views.v.fields[2]", 13, "duplicate column 'a'")
    mapping = HEAD + '  v:\n    table: t\n    sink: cache\n    key: "{a}"\n    fields:\n' \
                     '      out: a\n      other: [x]\n'
    assert one(mapping) == ("views.v.fields.other", 12, "must be a column name, got a list")


def test_duplicate_keys_are_reported() -> None:
    text = HEAD + ('  v: {table: t, sink: cache, key: "{a}"}\n'
                   '  v: {table: u, sink: cache, key: "{b}"}\n')
    assert one(text) == ("views.v", 7, "duplicate key 'v' (also at line 6)")


def test_colliding_keys_and_indexes_across_views() -> None:
    text = HEAD + ('  a: {table: t, sink: cache, key: "x:{id}"}\n'
                   '  b: {table: u, sink: cache, key: "x:{id}"}\n'
                   '  c: {table: t, sink: search, index: idx}\n'
                   '  d: {table: u, sink: search, index: idx}\n')
    assert problems(text) == [
        ("views.b.key", 7, "same key template as view 'a' on sink 'cache': their keys would"
                           " collide"),
        ("views.d.index", 9, "index 'idx' is already used by view 'c' on sink 'search'"),
    ]


@pytest.mark.parametrize("text, expected", [
    ("source: {dsn: 'host=x', slot: Bad-Slot}\nsinks: {}\nviews: {}\n",
     [("source.slot", 1, "invalid slot name 'Bad-Slot': use 1-63 lowercase letters, digits and"
                         " underscores"),
      ("views", 3, "declare at least one view")]),
    ("source: {dsn: '', slot: s, port: 1}\nsinks: {}\nviews: {}\n",
     [("source.dsn", 1, "must be a Postgres connection string,"
                        " e.g. postgresql://user@host:5432/db"),
      ("source.port", 1, "unknown key 'port' (allowed: dsn, slot, deployment, connect_timeout,"
                         " statement_timeout, kafka)"),
      ("views", 3, "declare at least one view")]),
    ("sinks: {}\nviews: {}\nsource:\n  slot: s\n",
     [("views", 2, "declare at least one view"),
      ("source.dsn", 3, "missing required key 'dsn'")]),
    ("source: {dsn: 'host=x', slot: s}\nsinks:\n  a: {type: kafka2}\n  b: {url: x}\n  c: 3\n"
     "  d: {type: redis, url: 'http://x', db: 1}\n  e: {type: opensearch, hosts: []}\n"
     "  f: {type: opensearch, hosts: ['ftp://h']}\n  g: {type: opensearch, hosts: 'http://h'}\n"
     "views: {v: {table: t, sink: d, key: '{a}'}}\nextra: 1\n",
     [("sinks.a.type", 3, "unknown sink type 'kafka2' (expected 'redis', 'opensearch', 'kafka')"),
      ("sinks.b.type", 4, "missing required key 'type' (expected 'redis', 'opensearch' or 'kafka')"),
      ("sinks.c", 5, "must be a mapping, got a number"),
      ("sinks.d.url", 6, "must be a redis://, rediss:// or unix:// URL"),
      ("sinks.d.db", 6, "unknown key 'db' (allowed: type, url, ca_certs, client_cert, client_key,"
                                 " verify_certs, lane, allow)"),
      ("sinks.e.hosts", 7, "must list at least one host, e.g. [\"http://127.0.0.1:9201\"]"),
      ("sinks.f.hosts[0]", 8, "must be an http:// or https:// URL"),
      ("sinks.g.hosts", 9, "must be a list, got a string"),
      ("extra", 11, "unknown key 'extra' (allowed: source, sinks, views, dead_letters, bootstrap, http,"
                        " provenance, classification)")]),
    ("source: x\nsinks: []\nviews: {}\n",
     [("source", 1, "must be a mapping, got a string"),
      ("sinks", 2, "must be a mapping, got a list"),
      ("views", 3, "declare at least one view")]),
])
def test_source_and_sink_validation_messages(text: str, expected) -> None:
    assert problems(text) == expected


def test_yaml_syntax_error_has_line() -> None:
    path, line, message = one(HEAD + "  v: {table: t\n  w: [\n")
    assert path == "" and line == 7
    assert message.startswith("YAML syntax error: ")


def test_whole_file_problems() -> None:
    assert one("") == ("", None, "the file is empty: expected source, sinks and views")
    assert one("- a\n- b\n") == ("", 1, "expected a mapping with source, sinks and views,"
                                        " got a list")
    with pytest.raises(SpecError) as info:
        parse_spec("", filename="c.yaml", env={})
    assert str(info.value) == "c.yaml: the file is empty: expected source, sinks and views"


def test_all_problems_are_collected_in_file_order() -> None:
    text = ("source: {dsn: \"${DSN}\", slot: s}\nsinks: {c: {type: redis}}\nviews:\n"
            "  a: {table: t, sink: c}\n  b: {table: t, sink: zz, key: '{a}'}\n")
    assert [(p, line) for p, line, _ in problems(text)] == [
        ("source.dsn", 1), ("views.a.key", 4), ("views.b.sink", 5)]


# ---------------------------------------------------------------------------------------- secrets

@pytest.mark.parametrize("dsn, expected", [
    ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgres://u:p@ss@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require"),
    ("postgresql://u@h/db?sslmode=require&password=s3cret",
     "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgresql://h/db", "postgresql://h/db"),
    ("host=h user=u password=s3cret dbname=d", "host=h user=u password=*** dbname=d"),
    ("host=h password = 'with space\\' quote' user=u", "host=h password = *** user=u"),
    ("host=h user=u", "host=h user=u"),
    # the passphrase of an encrypted TLS client key (libpq sslpassword)
    ("host=h sslmode=verify-full sslpassword=s3cret", "host=h sslmode=verify-full sslpassword=***"),
    ("postgresql://h/db?sslpassword=s3cret&sslmode=verify-ca", "postgresql://h/db?sslpassword=***&sslmode=verify-ca"),
])
def test_redacted_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected
    spec = parse_spec(HEAD.replace('"postgresql://postgres@127.0.0.1:5433/db"', "\"${DSN}\"")
                      + '  v: {table: t, sink: cache, key: "{a}"}\n', env={"DSN": dsn})
    assert spec.source.dsn == dsn
    assert spec.source.redacted_dsn() == expected
    assert "s3cret" not in repr(spec)


# -------------------------------------------------------------------------------------- templates

def test_template_parse() -> None:
    t = KeyTemplate("t:{a}:{b}")
    assert t.text == "t:{a}:{b}" and t.columns == ("a", "b")
    assert KeyTemplate("{a}-{b}-{a}").columns == ("a", "b")
    assert KeyTemplate("{{lit}}:{x}").render({"x": 1}) == "{lit}:1"
    assert KeyTemplate("a}}{x}{{").render({"x": "y"}) == "a}y{"
    assert KeyTemplate.from_columns(["id", "ts"]).text == "{id}:{ts}"
    assert KeyTemplate.from_columns(["id"], sep="{}").render({"id": 1}) == "1"


@pytest.mark.parametrize("text, message", [
    ("{a", "unclosed '{' at position 0"),
    ("x:{a{b}", "unclosed '{' at position 2"),
    ("a}", "unmatched '}' at position 1"),
    ("{a}}", "unmatched '}' at position 3"),
    ("{}", "empty placeholder"),
    ("plain", "has no {column} placeholder"),
    ("", "has no {column} placeholder"),
])
def test_template_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        KeyTemplate(text)
    assert message in str(info.value)


def test_template_render_value_formats() -> None:
    t = KeyTemplate("k:{v}")
    assert t.render({"v": "s"}) == "k:s"
    assert t.render({"v": 42}) == "k:42"
    assert t.render({"v": -7}) == "k:-7"
    assert t.render({"v": True}) == "k:true"
    assert t.render({"v": False}) == "k:false"
    assert t.render({"v": 1.5}) == "k:1.5"
    assert t.render({"v": "12.50"}) == "k:12.50"  # numeric arrives as its exact text
    assert KeyTemplate("{a}:{b}").render({"a": 1, "b": "x", "c": None}) == "1:x"


def test_template_null_or_missing_column() -> None:
    t = KeyTemplate("account:{aid}")
    with pytest.raises(TemplateError) as info:
        t.render({"aid": None})
    assert info.value.column == "aid"
    assert str(info.value) == info.value.message == "key column 'aid' is NULL"
    assert isinstance(info.value, ValueError)
    with pytest.raises(TemplateError) as info:
        t.render({"bid": 1})
    assert info.value.column == "aid" and "missing" in str(info.value)


# ---------------------------------------------------------- deployments (issue 14, item 11)
def test_checkpoint_index_and_deployment_keys() -> None:
    spec = parse_spec(textwrap.dedent("""\
        source: {dsn: "postgresql://h/db", slot: s, deployment: "staging.eu-1:db"}
        sinks:
          search: {type: opensearch, hosts: ["http://h:9200"], checkpoint_index: pgd-cp}
        views:
          v: {table: t, sink: search, index: items}
        """), filename="t.yaml", env={})
    assert spec.source.deployment == "staging.eu-1:db"
    assert spec.sinks["search"].model_dump()["checkpoint_index"] == "pgd-cp"
    spec = parse_spec(HEAD + "  v: {table: t, sink: search, index: items}\n", filename="t.yaml", env={})
    assert spec.source.deployment is None
    assert spec.sinks["search"].model_dump()["checkpoint_index"] == "pgderive-checkpoints"
    assert problems("""\
        source: {dsn: "host=h", slot: s, deployment: "a b"}
        sinks:
          search: {type: opensearch, hosts: ["http://h:9200"], checkpoint_index: Bad}
          other: {type: opensearch, hosts: ["http://h:9200"]}
        views:
          v: {table: t, sink: search, index: items}
          w: {table: t, sink: search, index: bad}
        """) == [
        ("source.deployment", 1, "invalid deployment id 'a b': use 1-200 letters, digits and '_.:-'"),
        ("sinks.search.checkpoint_index", 3, "invalid index name 'Bad': use lowercase letters, digits"
                                             " and '_.+-', not starting with '_', '-' or '+'"),
    ]


# ------------------------------------------------------------------- TLS (issue 14, item 10)
def test_tls_keys_name_the_missing_file_and_the_yaml_path(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    spec = parse_spec(textwrap.dedent(f"""\
        source: {{dsn: "host=h dbname=d sslmode=verify-full sslrootcert={ca}", slot: s}}
        sinks:
          cache: {{type: redis, url: "rediss://h:6390/0", ca_certs: {ca}, client_cert: {ca}, client_key: {ca}}}
          search: {{type: opensearch, hosts: ["https://h:9443"], ca_certs: {ca}, verify_certs: false,
                    username: u, password: "${{OS_PASSWORD}}"}}
        views:
          v: {{table: t, sink: cache, key: "a:{{id}}"}}
        """), filename="t.yaml", env={"OS_PASSWORD": "pw"})
    search = spec.sinks["search"].model_dump()
    assert (search["ca_certs"], search["verify_certs"], search["password"]) == (str(ca), False, "pw")
    assert "pw" not in repr(spec.sinks["search"])  # the password is kept out of reprs
    assert problems(f"""\
        source: {{dsn: "postgresql://u:secret@h/db?sslmode=verify-ca&sslrootcert={tmp_path}/no-ca.pem", slot: s}}
        sinks:
          a: {{type: redis, url: "rediss://h", ca_certs: {tmp_path}/missing.pem}}
          b: {{type: redis, url: "redis://h", ca_certs: {ca}}}
          c: {{type: redis, url: "rediss://h", client_cert: {ca}}}
          d: {{type: opensearch, hosts: ["http://h:9200"], client_key: {tmp_path}, client_cert: {ca}}}
          e: {{type: opensearch, hosts: ["http://h:9200", "https://h:9443"], ca_certs: {ca}}}
          f: {{type: opensearch, hosts: ["https://h:9443"], username: u}}
        views:
          v: {{table: t, sink: a, key: "a:{{id}}"}}
        """) == [
        ("source.dsn", 1, f"sslrootcert: file not found: {tmp_path}/no-ca.pem"),
        ("sinks.a.ca_certs", 3, f"file not found: {tmp_path}/missing.pem"),
        ("sinks.b.url", 4, "TLS options (ca_certs) need a rediss:// URL"),
        ("sinks.c.client_key", 5, "client_cert and client_key go together"),
        ("sinks.d.client_key", 6, f"not a file: {tmp_path}"),
        ("sinks.e.hosts", 7, "TLS options (ca_certs) need https:// hosts"),
        ("sinks.f.password", 8, "username and password go together"),
    ]


def test_key_template_shape_ignores_column_names() -> None:
    assert KeyTemplate("account:{aid}").shape() == KeyTemplate("account:{id}").shape() == "account:{}"
    assert KeyTemplate("{{x}}:{a}-{b}").shape() == "{{x}}:{}-{}"
    assert KeyTemplate("a:{x}").shape() != KeyTemplate("b:{x}").shape()


def test_a_schema_with_a_dot_is_refused_at_its_yaml_path():
    text = """
source: {dsn: "postgresql://postgres@127.0.0.1:5433/x", slot: s}
sinks: {cache: {type: redis}}
views:
  v: {table: '"my.schema"."t"', sink: cache, key: "k:{id}"}
"""
    with pytest.raises(SpecError) as e:
        parse_spec(text, filename="t.yaml")
    msg = str(e.value)
    assert "views.v.table" in msg and "'my.schema'" in msg and "Traceback" not in msg
    # a dot in the table name is fine
    parse_spec(text.replace('"my.schema"."t"', 'public."a.b"'), filename="t.yaml")


@pytest.mark.parametrize("dsn, message", [
    ("not a dsn", "not a libpq connection string: use key=value pairs (host=... dbname=...)"
                  " or a postgresql:// URI, quoting values with spaces in single quotes"),
    ("host=x port=abc", "port must be an integer from 1 to 65535 (or a comma-separated list), got 'abc'"),
    ("postgresql://u@h:99999/db", "port must be an integer from 1 to 65535 (or a comma-separated list),"
                                  " got '99999'"),
    ("host=x connect_timeout=soon", "connect_timeout must be an integer, got 'soon'"),
    ("host=x colour=red", "unknown connection option 'colour' (see the libpq connection parameters)"),
])
def test_a_garbage_dsn_is_reported_at_source_dsn(dsn: str, message: str) -> None:
    text = HEAD.replace('"postgresql://postgres@127.0.0.1:5433/db"', '"' + dsn + '"') \
        + '  v: {table: t, sink: cache, key: "{a}"}\n'
    assert one(text) == ("source.dsn", 1, message)


def test_a_garbage_dsn_error_never_echoes_a_password() -> None:
    text = HEAD.replace('"postgresql://postgres@127.0.0.1:5433/db"', "\"host=x password=hunter2 oops\"") \
        + '  v: {table: t, sink: cache, key: "{a}"}\n'
    path, _, message = one(text)
    assert path == "source.dsn" and "hunter2" not in message and "oops" not in message


def test_valid_dsns_pass() -> None:
    for dsn in ("host=a,b port=5433,", "postgresql://u@[::1]:5432/db?connect_timeout=5",
                "host=x password='se cret' dbname=d"):
        parse_spec(HEAD.replace('"postgresql://postgres@127.0.0.1:5433/db"', '"' + dsn + '"')
                   + '  v: {table: t, sink: cache, key: "{a}"}\n')


KAFKA = """\
source:
  dsn: postgresql://postgres@127.0.0.1:5433/bench
  kafka: {bootstrap_servers: "127.0.0.1:9093", group: pgderive-workers%s}
sinks: {cache: {type: redis, url: "redis://127.0.0.1:6380/0"}}
views:
  v: {table: public.t, sink: cache, key: "t:{id}", fields: [id]}
%s"""


def test_kafka_source_makes_the_slot_optional_and_names_the_state_after_the_group() -> None:
    spec = parse_spec(KAFKA % ("", ""))
    assert spec.source.kafka is not None and spec.source.kafka.topic_prefix == "pgderive"
    assert spec.source.slot == "kafka_pgderive_workers"
    assert spec.source.kafka.session_timeout == 10.0
    named = parse_spec((KAFKA % ("", "")).replace("  kafka:", "  slot: mine\n  kafka:"))
    assert named.source.slot == "mine"


def test_kafka_source_problems_name_their_yaml_path() -> None:
    assert one(KAFKA % (", bogus: 1", "")) == (
        "source.kafka.bogus", 3, "unknown key 'bogus' (allowed: bootstrap_servers, group, topic_prefix, "
        "session_timeout, options)")
    assert one(KAFKA % (", topic_prefix: 'a/b'", ""))[0] == "source.kafka.topic_prefix"
    assert one(KAFKA % (", session_timeout: 0", ""))[0] == "source.kafka.session_timeout"
    path, line, message = one(KAFKA.replace(', group: pgderive-workers%s', '%s') % ("", ""))
    assert (path, message) == ("source.kafka.group", "missing required key 'group'")
    no_source = "source: {dsn: 'postgresql://x@h/db'}\nsinks: {}\nviews: {v: {table: t, sink: s}}\n"
    assert ("source.slot", 1, "missing required key 'slot' (or 'kafka', for a derivation worker)") in problems(no_source)


def test_aggregate_views_are_accepted_for_kafka_workers() -> None:
    # ARCHITECTURE.md, "Kafka workers": per-group locks and versions make them correct there.
    agg = "  a: {table: public.t, sink: cache, key: 'g:{bid}', group_by: [bid], aggregate: {n: count(*)}}\n"
    spec = parse_spec(KAFKA % ("", agg))
    assert spec.views["a"].group_by == ["bid"]
