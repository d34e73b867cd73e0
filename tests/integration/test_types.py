"""Type fidelity: a matrix of Postgres types round-trips into Redis (hash and json) and OpenSearch.

Table ``typematrix`` holds a column per type (33 columns). Each *case* (a set of source values)
is written three times: as row ``k`` before the daemon starts (it arrives through the bootstrap
snapshot, COPY text), as row ``100 + k`` inserted while the daemon streams, and as row
``200 + k`` inserted all-NULL before the start and updated to the case's values while streaming
(both arrive through wal2json). Table ``plainfloats`` repeats the float columns without any
numeric column, so its messages take the decoder's orjson fast path. Every column of both
tables is in a Redis hash view, a Redis json view and an OpenSearch view. For every column the
tests check that each sink holds the mapping documented in the README ("What lands in the
sinks") of Postgres' own text output (the type's output function, read with
``format('%s', col)``; a ``::text`` cast differs for char(n) and inet), and that the three
copies of a case are identical in every sink.

wal2json 2.5 prints numeric and float ``NaN``/``Infinity``/``-Infinity`` as JSON ``null``
(format 2); pgderive reads those values back from the source (:mod:`cdc.refetch`), which
``test_streamed_nonfinite_numbers`` checks separately.

OpenSearch maps fields dynamically from the first document it sees. A double beyond the float
range, a non-finite float (kept as its text ``"NaN"``) in a field mapped as a number, a date like
``infinity`` in a field mapped as a date, or jsonb values of different shapes are refused unless
the index keeps malformed values (``index.mapping.ignore_malformed``: kept in ``_source``, not
indexed) and maps jsonb as ``flat_object``: the test installs that as an index template on the
views' generations, as the README recommends.
"""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis
from opensearchpy import OpenSearch

from ..support import (OPENSEARCH_URL, REDIS_URL, Daemon, create_database, current_lsn, drop_database,
                      slot_caught_up, streaming, unique, wait_until)

pytestmark = pytest.mark.slow

# (column, SQL type, mapping kind)
COLUMNS: list[tuple[str, str, str]] = [
    ("n", "numeric", "numeric"),
    ("n12", "numeric(12,2)", "numeric"),
    ("i2", "smallint", "int"),
    ("i4", "integer", "int"),
    ("i8", "bigint", "int"),
    ("f4", "real", "float"),
    ("f8", "double precision", "float"),
    ("tstz", "timestamptz", "text"),
    ("ts", "timestamp", "text"),
    ("d", "date", "text"),
    ("tm", "time", "text"),
    ("ttz", "timetz", "text"),
    ("iv", "interval", "text"),
    ("u", "uuid", "text"),
    ("jb", "jsonb", "jsonb"),
    ("j", "json", "text"),
    ("ia", "int[]", "text"),
    ("ta", "text[]", "text"),
    ("by", "bytea", "text"),
    ("e", "mood", "text"),
    ("dom", "short_text", "text"),
    ("ip", "inet", "text"),
    ("net", "cidr", "text"),
    ("mac", "macaddr", "text"),
    ("m", "money", "text"),
    ("b", "boolean", "bool"),
    ("tx", "text", "text"),
    ("big", "text", "text"),
    ("c5", "char(5)", "text"),
    ("vc", "varchar(10)", "text"),
    ("pt", "point", "text"),
    ("tsv", "tsvector", "text"),
    ("bv", "bit varying", "text"),
]
KIND = {c: k for c, _, k in COLUMNS}
NAMES = [c for c, _, _ in COLUMNS]

SCHEMA = "\n".join([
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀');",
    "CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100);",
    "CREATE TABLE typematrix (id int PRIMARY KEY, "
    + ", ".join(f"{c} {t}" for c, t, _ in COLUMNS) + ");",
])

TYPICAL: dict[str, str] = {
    "n": "3.14", "n12": "1234.50", "i2": "1", "i4": "42", "i8": "1", "f4": "'1.5'", "f8": "'0.1'",
    "tstz": "'2024-02-29 12:34:56.789012+00'", "ts": "'2024-02-29 12:34:56.789012'",
    "d": "'2024-02-29'", "tm": "'12:34:56.789'", "ttz": "'12:34:56+05:30'",
    "iv": "'1 year 2 mons 3 days 04:05:06.789'", "u": "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
    "jb": """$${"name": "Zoë 🎉 日本語", "nested": {"list": [1, 2.5, null, true, "x"],
              "empty": {}, "obj": {"deeper": {"k": "\\u00e9"}}}, "num": 1.10}$$""",
    "j": """$${"b":1,  "a" : [1,2],
  "b": "dup"}$$""",
    "ia": "'{1,2,3}'", "ta": """$${a,"b c",NULL,""}$$""", "by": r"'\x00ff10'::bytea",
    "e": "'happy 😀'", "dom": "'hello'", "ip": "'192.168.0.1/24'", "net": "'10.0.0.0/8'",
    "mac": "'08:00:2b:01:02:03'", "m": "'12.34'", "b": "true", "tx": "'plain text'",
    "c5": "'ab'", "vc": "'abcdefghij'", "pt": "'(1.5,-2)'", "tsv": "'a fat cat sat'",
    "bv": "B'10101'",
}

CASES: dict[str, dict[str, str]] = {
    "typical": TYPICAL,
    "extremes": {
        "n": "'1234567890123456789012345678901234567890'",  # 40 digits
        "n12": "'-9999999999.99'", "i2": "-32768", "i4": "-2147483648",
        "i8": "-9223372036854775808", "f4": "'-3.4028235e+38'", "f8": "'1e-300'",
        "tstz": "'-infinity'", "ts": "'infinity'", "d": "'4713-01-01 BC'", "tm": "'24:00:00'",
        "ttz": "'00:00:00-15:59'", "iv": "'-178000000 years -1 microsecond'",
        "u": "'00000000-0000-0000-0000-000000000000'",
        "jb": """$${"big": 123456789012345678901234567890, "tiny": 1e-300, "u64": 18446744073709551615,
                   "precise": 0.30000000000000000001, "deep": {"a": {"b": ["é", "👩‍👩‍👧", "\\n"]}}}$$""",
        "j": """$$ {"a":1,"a":2,"a":{"a" :	[ ]}} $$""",
        "ia": "'{{1,2},{3,NULL}}'", "ta": r"""E'{{"x",NULL},{"NULL","\\"q\\" \\\\ ,{}"}}'""",
        "by": r"'\x'::bytea", "e": "'sad'", "dom": "''", "ip": "'::1'", "net": "'2001:db8::/32'",
        "mac": "'ff:ff:ff:ff:ff:ff'", "m": "'-92233720368547758.08'", "b": "false",
        "tx": r"""E'emoji 👩‍👩‍👧 🎉 ctl \x01\x02\t\n\r\x1b\x7f \\back\\slash "quote" \u2028 ''apos'''""",
        "c5": "'a'", "vc": "''", "pt": "'(1e+300,-0)'", "tsv": r"""$$'quoted':1A,2B 'it''s' fat:3$$""",
        "bv": "B''",
    },
    "maxima": {
        "n": "'-0.000000000000000000000000000000000000001'", "n12": "'0.00'", "i2": "32767",
        "i4": "2147483647", "i8": "9223372036854775807", "f4": "'-0'",
        "f8": "'1.7976931348623157e+308'", "tstz": "'1999-12-31 23:59:59.999999-08'",
        "ts": "'0001-01-01 00:00:00 BC'", "d": "'infinity'", "tm": "'00:00:00'",
        "ttz": "'23:59:59.999999+15:59'", "iv": "'0'", "u": "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        "jb": """$${"list": [], "obj": {}, "s": "", "n": -0.5}$$""", "j": "'[]'",
        "ia": "'{}'", "ta": "'{}'", "by": r"'\x5c22'::bytea", "e": "'ok'", "dom": "' padded  '",
        "ip": "'0.0.0.0/0'", "net": "'0.0.0.0/0'", "mac": "'00:00:00:00:00:00'",
        "m": "'92233720368547758.07'", "b": "true", "tx": "''", "c5": "'abcde'",
        "vc": "'ü😀ü😀ü😀ü😀ü😀'", "pt": "'(-0,0)'", "tsv": "''", "bv": "B'1'",
    },
    "huge": {
        "n": "('1' || repeat('0', 5000) || '.' || repeat('9', 100))::numeric",
        "f4": "'1e-45'", "f8": "'-0'", "i4": "0", "n12": "'-0.01'",
        "big": "(SELECT string_agg(md5(i::text) || ' é🎉', '') FROM generate_series(1, 5900) i)",
        "jb": """$${"many": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "huge": 1e400}$$""",
        "j": "'null'", "tx": "repeat('x', 3000)",
    },
    "nulls": {},
    # non-finite numerics and floats, and top-level jsonb scalars/arrays; the rest as in "typical"
    "nan": {**TYPICAL, "n": "'NaN'", "f4": "'NaN'", "f8": "'NaN'", "jb": "'null'"},
    "inf": {**TYPICAL, "n": "'Infinity'", "f4": "'Infinity'", "f8": "'Infinity'",
            "jb": """'"a string"'"""},
    "ninf": {**TYPICAL, "n": "'-Infinity'", "f4": "'-Infinity'", "f8": "'-Infinity'",
             "jb": """'[1, "a", null, {"b": false}, 1.5e300]'"""},
}
CASE_IDS = {name: k for k, name in enumerate(CASES, start=1)}
STREAM_INSERT, STREAM_UPDATE = 100, 200  # id offsets of the streamed copies

NONFINITE_CELLS = [(case, col) for case in ("nan", "inf", "ninf") for col in ("n", "f4", "f8")]
SINKS = ("hash", "json", "search")


# --- the documented mapping (README, "What lands in the sinks") ------------------------------

def _jsonb_float(s: str) -> Any:
    f = float(s)
    if f not in (float("inf"), float("-inf")) and Decimal(repr(f)) == Decimal(s):
        return f
    return s


def _jsonb_int(s: str) -> Any:
    if len(s) <= 20 and -(1 << 63) <= int(s) < (1 << 64):
        return int(s)
    return _jsonb_float(s)


def model(col: str, text: str | None) -> Any:
    """The model value (= the JSON value in Redis json and OpenSearch) of Postgres text."""
    if text is None:
        return None
    kind = KIND[col]
    if kind == "int":
        return int(text)
    if kind == "float":
        return text if text in ("NaN", "Infinity", "-Infinity") else float(text)
    if kind == "bool":
        return {"t": True, "f": False}[text]  # boolout
    if kind == "jsonb":
        return json.loads(text, parse_float=_jsonb_float, parse_int=_jsonb_int)
    return text  # numeric, json and every other type: the text itself


def hash_field(value: Any) -> str:
    """A model value as a Redis hash field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def expected(sink: str, col: str, text: str | None) -> Any:
    value = model(col, text)
    if sink == "hash":
        return None if value is None else hash_field(value)
    return canon(value)


def canon(v: Any) -> Any:
    """A JSON value with the type and the sign of zero made explicit (``0.0 == -0.0`` and
    ``1 == 1.0 == True`` in Python)."""
    if isinstance(v, dict):
        return {k: canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [canon(x) for x in v]
    if v is None:
        return None
    return (type(v).__name__, repr(v))


# --- the scenario ------------------------------------------------------------------------------

# typematrix: every column. plainfloats: the floats again in a table without numeric columns, so
# their wal2json messages take the decoder's orjson fast path (a numeric column makes a message
# take the exact stdlib path).
TABLES: dict[str, list[str]] = {"typematrix": NAMES, "plainfloats": ["f4", "f8", "b"]}
SCHEMA += "\nCREATE TABLE plainfloats (id int PRIMARY KEY, f4 real, f8 double precision, b boolean);"


class Matrix:
    """Source text and sink contents of every row, after bootstrap and streaming."""

    def __init__(self) -> None:
        self.source: dict[str, dict[int, dict[str, str | None]]] = {t: {} for t in TABLES}
        self.sink: dict[tuple[str, str], dict[int, dict[str, Any] | None]] = {
            (s, t): {} for s in SINKS for t in TABLES}
        self.daemon_log = ""

    def cell(self, sink: str, table: str, row: int, col: str) -> Any:
        doc = self.sink[sink, table][row]
        assert doc is not None, f"{table} row {row} missing from the {sink} view"
        if sink == "hash":
            return doc.get(col)  # NULL: field absent
        assert col in doc, f"{table} row {row}: field {col} missing from the {sink} view"
        return canon(doc[col])


def _insert(conn: psycopg.Connection, table: str, row: int, values: dict[str, str]) -> None:
    values = {c: v for c, v in values.items() if c in TABLES[table]}
    cols, exprs = ["id", *values], [str(row), *values.values()]
    conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(exprs)})")


def _update(conn: psycopg.Connection, table: str, row: int, values: dict[str, str]) -> None:
    sets = ", ".join(f"{c} = {v}" for c, v in values.items() if c in TABLES[table])
    conn.execute(f"UPDATE {table} SET {sets or 'b = NULL'} WHERE id = {row}")


def _config(dsn: str, slot: str, prefix: str, alias: str) -> str:
    views = "".join(f"""
  {prefix}_{table}_hash:
    table: {table}
    sink: cache
    key: "{prefix}:{table}:h:{{id}}"
    format: hash
  {prefix}_{table}_json:
    table: {table}
    sink: cache
    key: "{prefix}:{table}:j:{{id}}"
    format: json
  {prefix}_{table}_search:
    table: {table}
    sink: search
    index: {alias}-{table}
""" for table in TABLES)
    return f"""
source:
  dsn: {dsn}
  slot: {slot}
sinks:
  cache: {{type: redis, url: "{REDIS_URL}"}}
  search: {{type: opensearch, hosts: ["{OPENSEARCH_URL}"]}}
views:{views}"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Matrix:
    tmp: Path = tmp_path_factory.mktemp("types")
    db, slot, prefix = unique("pgd_types"), unique("slot"), unique("ty")
    alias = unique("types").lower()
    dsn = create_database(db)
    osc = OpenSearch([OPENSEARCH_URL])
    template = f"{alias}-template"
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    config = tmp / "pgderive.yaml"
    config.write_text(_config(dsn, slot, prefix, alias))
    d = Daemon(config, tmp / "daemon.log")
    out = Matrix()
    try:
        # The README's recommendation for OpenSearch views of arbitrary values (see the module
        # docstring): keep malformed values in _source, and map jsonb as flat_object.
        osc.indices.put_index_template(name=template, body={
            "index_patterns": [f"{alias}-*-g*"], "priority": 1000,
            "template": {"settings": {"index": {"mapping": {"ignore_malformed": True}}},
                         "mappings": {"properties": {"jb": {"type": "flat_object"}}}}})
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for table in TABLES:
                for name, k in CASE_IDS.items():
                    _insert(conn, table, k, CASES[name])
                    _insert(conn, table, STREAM_UPDATE + k, {})
        d.start()

        def bootstrapped() -> bool:
            assert d.alive(), f"daemon exited:\n{d.output()[-3000:]}"
            return streaming(dsn, slot)
        wait_until(bootstrapped, 180, what="bootstrap to finish")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in TABLES:
                for name, k in CASE_IDS.items():
                    _insert(conn, table, STREAM_INSERT + k, CASES[name])
                    _update(conn, table, STREAM_UPDATE + k, CASES[name])
        target = current_lsn(dsn)

        def caught_up() -> bool:
            assert d.alive(), f"daemon exited:\n{d.output()[-3000:]}"
            return slot_caught_up(dsn, slot, target)
        wait_until(caught_up, 120, what="slot to catch up")

        rows = [k + off for k in CASE_IDS.values() for off in (0, STREAM_INSERT, STREAM_UPDATE)]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table, names in TABLES.items():
                # Each type's output function (format's %s), as COPY and wal2json use it; a
                # ::text cast differs for char(n) (drops the padding) and inet (adds /32, /128).
                outputs = ", ".join(f"CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END"
                                    for c in names)
                for row in conn.execute(f"SELECT id, {outputs} FROM {table}").fetchall():
                    out.source[table][row[0]] = dict(zip(names, row[1:]))
        for table in TABLES:
            for row in rows:
                h = r.hgetall(f"{prefix}:{table}:h:{row}")
                out.sink["hash", table][row] = h or None
                raw = r.get(f"{prefix}:{table}:j:{row}")
                out.sink["json", table][row] = None if raw is None else json.loads(raw)
            docs = osc.mget(index=f"{alias}-{table}", body={"ids": [str(x) for x in rows]})["docs"]
            for row, doc in zip(rows, docs):
                out.sink["search", table][row] = doc["_source"] if doc.get("found") else None
        assert d.alive(), d.output()[-3000:]
    finally:
        if d.proc is not None:
            d.stop()
            out.daemon_log = d.output()
        for pattern in (f"{prefix}:*", f"pgderive:{prefix}_*", f"pgderive:*:{prefix}_*"):
            keys = list(r.scan_iter(pattern, count=1000))
            if keys:
                r.delete(*keys)
        r.close()
        osc.indices.delete(index=f"{alias}-*-g*", ignore_unavailable=True)
        osc.indices.delete_index_template(name=template, ignore=[404])
        osc.close()
        drop_database(db)
    return out


COLUMN_PARAMS = [pytest.param(t, c, id=f"{t}.{c}") for t, cols in TABLES.items() for c in cols]
NONFINITE_PARAMS = [pytest.param(t, case, c, id=f"{t}.{c}-{case}")
                    for t, cols in TABLES.items() for case, c in NONFINITE_CELLS if c in cols]


def test_matrix_covers_the_issue():
    assert len(COLUMNS) >= 25
    assert set(KIND.values()) == {"numeric", "int", "float", "text", "jsonb", "bool"}


def test_source_copies_are_identical(matrix: Matrix):
    for table in TABLES:
        source = matrix.source[table]
        for k in CASE_IDS.values():
            assert source[STREAM_INSERT + k] == source[k]
            assert source[STREAM_UPDATE + k] == source[k]
    huge = matrix.source["typematrix"][CASE_IDS["huge"]]
    assert len(huge["big"]) >= 200_000 and len(huge["n"]) > 5000


def test_every_row_is_in_every_sink(matrix: Matrix):
    for (sink, table), docs in matrix.sink.items():
        missing = [row for row, doc in docs.items() if doc is None]
        assert not missing, f"{sink} view of {table}: rows {missing} missing\n{matrix.daemon_log[-3000:]}"


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("table, col", COLUMN_PARAMS)
def test_snapshot_rows_follow_the_mapping(matrix: Matrix, sink: str, table: str, col: str):
    _check_mapping(matrix, sink, table, col, offsets=(0,))


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("table, col", COLUMN_PARAMS)
def test_streamed_rows_follow_the_mapping(matrix: Matrix, sink: str, table: str, col: str):
    _check_mapping(matrix, sink, table, col, offsets=(STREAM_INSERT, STREAM_UPDATE))


def _check_mapping(matrix: Matrix, sink: str, table: str, col: str, offsets: tuple[int, ...]) -> None:
    bad = []
    for name, k in CASE_IDS.items():
        for row in (k + off for off in offsets):
            text = matrix.source[table][row][col]
            want, got = expected(sink, col, text), matrix.cell(sink, table, row, col)
            if got != want:
                bad.append(f"row {row} ({name}): source {_short(text)} -> sink {_short(got)}, "
                           f"documented {_short(want)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("table, col", COLUMN_PARAMS)
def test_snapshot_and_streamed_copies_are_identical(matrix: Matrix, sink: str, table: str, col: str):
    bad = []
    for name, k in CASE_IDS.items():
        snap = matrix.cell(sink, table, k, col)
        for row in (STREAM_INSERT + k, STREAM_UPDATE + k):
            got = matrix.cell(sink, table, row, col)
            if got != snap:
                bad.append(f"case {name}: snapshot {_short(snap)} != streamed row {row} {_short(got)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("table, case, col", NONFINITE_PARAMS)
def test_streamed_nonfinite_numbers(matrix: Matrix, table: str, case: str, col: str):
    """wal2json prints these as null; the streamed copies must still hold the value."""
    k = CASE_IDS[case]
    text = matrix.source[table][k][col]
    assert text in ("NaN", "Infinity", "-Infinity")
    for sink in SINKS:
        want = expected(sink, col, text)
        for row in (k, STREAM_INSERT + k, STREAM_UPDATE + k):
            assert matrix.cell(sink, table, row, col) == want, (sink, row)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 120 else f"{s[:100]}…({len(s)} chars)"
