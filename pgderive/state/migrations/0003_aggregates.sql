-- pgderive.agg_rows and pgderive.agg_groups: every aggregate view's row contributions and group
-- states (pgderive/state/aggregates.py). IF NOT EXISTS: see 0001.
CREATE TABLE IF NOT EXISTS pgderive.agg_rows (
    view     text   NOT NULL,
    row_key  text   NOT NULL,
    version  bigint NOT NULL,
    grp      jsonb,
    vals     jsonb,
    PRIMARY KEY (view, row_key)
);
CREATE INDEX IF NOT EXISTS agg_rows_group ON pgderive.agg_rows (view, grp);
CREATE TABLE IF NOT EXISTS pgderive.agg_groups (
    view     text   NOT NULL,
    grp      jsonb  NOT NULL,
    state    jsonb  NOT NULL,
    PRIMARY KEY (view, grp)
);
