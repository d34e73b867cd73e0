-- pgderive.agg_touched: per aggregate view and group, the highest version (commit LSN) of a batch
-- that moved the group's state (pgderive/state/aggregates.py). A batch replayed after a crash
-- finds its contributions already stored and moves no state; the groups other batches moved at
-- or after its version are then re-emitted from their current state, so a group a crash left
-- stale in the sink (e.g. emptied by a batch whose sink write never landed) is written again.
CREATE TABLE IF NOT EXISTS pgderive.agg_touched (
    view     text   NOT NULL,
    grp      jsonb  NOT NULL,
    version  bigint NOT NULL,
    PRIMARY KEY (view, grp)
);
