-- pgderive.dead_letters: rows a view could not derive, documents a sink rejected
-- (pgderive/state/deadletters.py). IF NOT EXISTS: see 0001.
CREATE TABLE IF NOT EXISTS pgderive.dead_letters (
    id           bigserial PRIMARY KEY,
    slot         text NOT NULL,
    view         text NOT NULL,
    source_table text NOT NULL,
    sink_key     text NULL,
    commit_lsn   pg_lsn NOT NULL,
    error        text NOT NULL,
    row          jsonb NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retries      int NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_slot_view_id_idx ON pgderive.dead_letters (slot, view, id);
