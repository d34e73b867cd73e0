-- apply: the Ops of one view, compare-and-set. Runs after lib_helpers.lua, lib_apply.lua.
-- KEYS[1] = version hash (pgderive:V:versions), KEYS[2..] = record keys (may repeat).
-- ARGV = per record key, in order: version, kind, payload (see lib_apply.lua).
-- Returns {applied, skipped, partial_missed, {i1, err1, ..}} (see lib_apply.lua).
local reply = apply(KEYS[1], 2, #KEYS, 1)
return reply
