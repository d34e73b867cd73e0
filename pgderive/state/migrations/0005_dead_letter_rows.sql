-- pgderive.dead_letters: bounded rows and superseded dead letters (pgderive/state/deadletters.py;
-- issue 14, items 6 and 7).
--   row_identity   the row's identity (primary key, else replica identity columns) as a JSON
--                  object: a later change of the same row supersedes its dead letters.
--   truncated      the columns of `row` whose values were cut to fit the dead-letter size cap
--                  (NULL: nothing was cut).
--   superseded_lsn the commit LSN of the later change of the same row that superseded this dead
--                  letter (NULL: still open; list, count and retry see only open ones).
ALTER TABLE pgderive.dead_letters ADD COLUMN IF NOT EXISTS row_identity jsonb NULL;
ALTER TABLE pgderive.dead_letters ADD COLUMN IF NOT EXISTS truncated text[] NULL;
ALTER TABLE pgderive.dead_letters ADD COLUMN IF NOT EXISTS superseded_lsn pg_lsn NULL;
CREATE INDEX IF NOT EXISTS dead_letters_open_rows_idx ON pgderive.dead_letters (slot, view, row_identity)
    WHERE superseded_lsn IS NULL;
