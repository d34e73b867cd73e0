-- pgderive.commits: provenance of the stream's writes (pgderive/state/provenance.py). One row
-- per source transaction the daemon read that changed at least one view, so that a record's
-- version (the commit LSN) can be turned into the commit's xid and commit timestamp
-- (`pgderive explain`). Written by the daemon in one multi-row INSERT per flush, before the slot
-- is confirmed past the transaction; rows older than `provenance.retention` are deleted (oldest
-- LSNs first: commit LSN order is commit order, so no index on committed_at is needed).
--   slot          the deployment's slot (deployments sharing a database keep apart)
--   lsn           the commit LSN (int), the version the transaction's Ops carry
--   xid           the transaction id wal2json reported ("xid" of the "B" message)
--   committed_at  the commit timestamp wal2json reported ("timestamp")
CREATE TABLE IF NOT EXISTS pgderive.commits (
    slot         text NOT NULL,
    lsn          bigint NOT NULL,
    xid          bigint NOT NULL,
    committed_at timestamptz NOT NULL,
    PRIMARY KEY (slot, lsn)
);
