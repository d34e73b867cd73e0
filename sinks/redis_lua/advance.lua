-- advance: move checkpoints from a previous LSN to a new one. Runs after lib_helpers.lua,
-- lib_advance.lua.
-- KEYS = checkpoint keys; ARGV[1] = new LSN, ARGV[2] = the LSN each must already be at (16 hex
-- digits each).
-- Returns the 1-based indices of keys missing or below ARGV[2] (left untouched); the others are
-- raised to ARGV[1].
return advance(#KEYS, ARGV[1], ARGV[2])
