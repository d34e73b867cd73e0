"""``where`` on a plain (single-table) view while streaming: rows enter and leave the view as
they start and stop matching, NULLs follow three-valued logic, and a condition on a TOASTed
column an update leaves out is evaluated on the value read back from the table."""
from __future__ import annotations

import pytest
import redis

from ..support import REDIS_URL, assert_views_equal

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE stock (id int PRIMARY KEY, qty int, tag text, note text);
INSERT INTO stock SELECT g, g, CASE WHEN g % 2 = 0 THEN 'even' END, 'n' FROM generate_series(1, 20) g;
"""
VIEWS = """
  P_low: {table: stock, sink: cache, key: "P_:low:{id}", fields: [id, qty], where: "qty < 10 AND tag IS DISTINCT FROM 'hidden'"}
  P_long: {table: stock, sink: cache, key: "P_:long:{id}", fields: [id], format: json, where: "note LIKE 'x%' OR qty > 100"}
"""


def test_rows_enter_and_leave_a_where_view(scenario):
    s = scenario(SCHEMA, VIEWS)
    s.start()
    r = redis.Redis.from_url(REDIS_URL)
    assert r.exists(f"{s.p}_:low:9") and not r.exists(f"{s.p}_:low:10")
    s.sql("UPDATE stock SET qty = 50 WHERE id = 3")           # leaves
    s.sql("UPDATE stock SET qty = 1 WHERE id = 15")           # enters
    s.sql("UPDATE stock SET qty = NULL WHERE id = 4")         # NULL < 10 is not TRUE: leaves
    s.sql("UPDATE stock SET tag = 'hidden' WHERE id = 5")     # leaves through the second condition
    s.sql("INSERT INTO stock VALUES (30, 2, NULL, 'n'), (31, 99, NULL, 'n')")
    # note becomes 100 kB (TOASTed) and matches; later updates leave it out of the WAL
    big = "'x' || (SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 3125) i)"
    s.sql(f"UPDATE stock SET note = {big} WHERE id = 7")
    s.sql("UPDATE stock SET qty = 8 WHERE id = 7")            # note unchanged: read back, still matches
    s.sql("UPDATE stock SET qty = 200 WHERE id = 12")         # enters P_long by qty
    s.caught_up()
    assert_views_equal(s.config)
    assert not r.exists(f"{s.p}_:low:3") and r.exists(f"{s.p}_:low:15") and not r.exists(f"{s.p}_:low:4")
    assert not r.exists(f"{s.p}_:low:5") and r.exists(f"{s.p}_:low:30") and not r.exists(f"{s.p}_:low:31")
    assert r.exists(f"{s.p}_:long:7") and r.exists(f"{s.p}_:long:12") and not r.exists(f"{s.p}_:long:1")
    assert r.hget(f"{s.p}_:low:7", "qty") == b"8"


def test_rows_read_back_look_like_snapshot_rows(tmp_path):
    """Read-backs (NaN, unchanged TOAST, dead-letter retries) use cdc.snapshot.read_rows: the
    same text output as COPY, so char(n) keeps its padding and inet its form."""
    import psycopg

    from cdc.snapshot import read_rows, read_table

    from ..support import create_database, drop_database, unique

    db = unique("pgd_rows")
    dsn = create_database(db)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, c char(5), ip inet, j json, n numeric)")
            conn.execute("""INSERT INTO t VALUES (1, 'ab', '10.0.0.1/32', '{"a": 1}', 'NaN')""")
            cols = [("id", "integer"), ("c", "character(5)"), ("ip", "inet"), ("j", "json"), ("n", "numeric")]
            types = dict(cols)
            snap = next(read_table(conn, "public.t", cols))[0]
            assert read_rows(conn, "public.t", cols, {"id": 1}, types) == [snap]
            assert read_rows(conn, "public.t", cols, {"j": {"a": 1}}, types) == [snap]
            assert snap["c"] == "ab   " and snap["ip"] == "10.0.0.1"
            assert read_rows(conn, "public.t", cols, {"id": 2}, types) == []
    finally:
        drop_database(db)
