-- pgderive.commits: provenance of the stream's writes (pgderive/state/provenance.py): the xid
-- and commit timestamp of every source transaction the daemon read that changed at least one
-- view, so that a record's version (the commit LSN) can be told as a transaction and a time
-- (`pgderive explain`). One row per flush of the recorder (every 0.2 s while the stream has work),
-- holding the commits it read since the previous flush, in commit LSN order, as parallel arrays:
-- a row per flush rather than per commit keeps the cost per commit to a few bytes (the arrays
-- are TOASTed and compressed) and far below a microsecond of Postgres time. Written before the
-- slot is confirmed past those commits; rows older than `provenance.retention` are deleted.
--   slot               the deployment's slot (deployments sharing a database keep apart)
--   first_lsn, last_lsn  the commit LSNs (int) of the first and last commit of the row: every
--                      commit that changed a view between them is in the row
--   lsns, xids, committed_at  per commit: its commit LSN (the version its Ops carry), the
--                      transaction id and the commit timestamp wal2json reported ("B" message)
--   last_at            the last commit's timestamp (what retention compares)
-- A replay after a restart may store a row overlapping earlier ones (same commits again).
CREATE TABLE IF NOT EXISTS pgderive.commits (
    slot         text NOT NULL,
    first_lsn    bigint NOT NULL,
    last_lsn     bigint NOT NULL,
    lsns         bigint[] NOT NULL,
    xids         bigint[] NOT NULL,
    committed_at timestamptz[] NOT NULL,
    last_at      timestamptz NOT NULL,
    PRIMARY KEY (slot, last_lsn)
);
