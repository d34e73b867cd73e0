-- pgderive.slot_state: one row per replication slot (pgderive/state/slots.py).
-- Schema pgderive itself and pgderive.schema_version are created by pgderive/state/schema.py.
-- IF NOT EXISTS: a database set up before versioned migrations already has this table and is
-- adopted as it is.
CREATE TABLE IF NOT EXISTS pgderive.slot_state (
    slot             text PRIMARY KEY,
    status           text NOT NULL CHECK (status IN ('bootstrapping', 'streaming')),
    consistent_point pg_lsn NOT NULL,
    views            jsonb NOT NULL DEFAULT '{}',
    updated_at       timestamptz NOT NULL DEFAULT now()
);
