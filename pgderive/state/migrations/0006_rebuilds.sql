-- pgderive.rebuilds: online rebuilds a running daemon performs, requested by `pgderive rebuild`,
-- a reload (new or changed views) or the daemon's start (pgderive/state/rebuilds.py). One row
-- per (slot, view): the latest rebuild, its phase and progress. A row in an unfinished phase is
-- resumed (started over) by the daemon after a crash.
--   status            requested | loading | catching_up | switching | done | failed | cancelled
--   reason            why it was asked for (a CLI request, a reload, a changed definition)
--   consistent_point  the LSN of its snapshot (NULL before the snapshot exists)
--   rows_done, rows_total  rows loaded so far and the estimate of the total (pg_class.reltuples)
--   rows_per_s        the load's rate so far
--   attempts          starts of this rebuild (a crash or a TRUNCATE starts it over)
-- pgderive.slot_state gets the reload handshake of `pgderive reload`:
--   reload_requested_at  set by the CLI; reloaded_at, reload_result set by the daemon.
CREATE TABLE IF NOT EXISTS pgderive.rebuilds (
    slot             text NOT NULL,
    view             text NOT NULL,
    status           text NOT NULL CHECK (status IN ('requested', 'loading', 'catching_up', 'switching',
                                                     'done', 'failed', 'cancelled')),
    reason           text NOT NULL DEFAULT '',
    requested_at     timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    consistent_point pg_lsn NULL,
    rows_done        bigint NOT NULL DEFAULT 0,
    rows_total       bigint NULL,
    rows_per_s       double precision NULL,
    attempts         int NOT NULL DEFAULT 0,
    error            text NULL,
    PRIMARY KEY (slot, view)
);
ALTER TABLE pgderive.slot_state ADD COLUMN IF NOT EXISTS reload_requested_at timestamptz NULL;
ALTER TABLE pgderive.slot_state ADD COLUMN IF NOT EXISTS reloaded_at timestamptz NULL;
ALTER TABLE pgderive.slot_state ADD COLUMN IF NOT EXISTS reload_result text NULL;
