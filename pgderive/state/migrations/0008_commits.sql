-- pgderive.commits: provenance of the stream's writes (pgderive/state/provenance.py): the xid
-- and commit timestamp of every source transaction the daemon read that changed at least one
-- view, so that a record's version (the commit LSN) can be told as a transaction and a time
-- (`pgderive explain`). One row per flush of the recorder (at most every 20 ms under load),
-- holding the commits it read since the previous flush, in commit LSN order, as packed arrays:
-- a row per flush rather than per commit keeps the cost per commit to a few bytes (the values
-- are TOASTed and compressed) and far below a microsecond of Postgres time, and packed bytes
-- cost the daemon ~0.1 us per commit to encode where bigint[]/timestamptz[] parameters cost 1.5.
-- Written before the slot is confirmed past those commits; rows whose last commit is older than
-- `provenance.retention` are deleted. pgderive.commit_log shows one row per commit.
--   slot                 the deployment's slot (deployments sharing a database keep apart)
--   first_lsn, last_lsn  the commit LSNs (int) of the row's first and last commit: every commit
--                        that changed a view between them is in the row
--   lsns, xids, commit_us  8 bytes per commit each, big-endian signed integers: the commit LSN
--                        (the version its Ops carry), the transaction id and the commit time in
--                        microseconds since 1970-01-01 UTC, as wal2json reported them
--   last_at              the last commit's time (what retention compares)
-- A replay after a restart may store a row overlapping earlier ones (the same commits again).
CREATE TABLE IF NOT EXISTS pgderive.commits (
    slot       text NOT NULL,
    first_lsn  bigint NOT NULL,
    last_lsn   bigint NOT NULL,
    lsns       bytea NOT NULL,
    xids       bytea NOT NULL,
    commit_us  bytea NOT NULL,
    last_at    timestamptz NOT NULL,
    PRIMARY KEY (slot, last_lsn)
);
CREATE OR REPLACE VIEW pgderive.commit_log AS
SELECT c.slot,
       ('x' || encode(substring(c.lsns FROM 8 * i + 1 FOR 8), 'hex'))::bit(64)::bigint AS lsn,
       ('x' || encode(substring(c.xids FROM 8 * i + 1 FOR 8), 'hex'))::bit(64)::bigint AS xid,
       to_timestamp(('x' || encode(substring(c.commit_us FROM 8 * i + 1 FOR 8), 'hex'))::bit(64)::bigint
                    / 1e6) AS committed_at
  FROM pgderive.commits AS c, generate_series(0, octet_length(c.lsns) / 8 - 1) AS i;
