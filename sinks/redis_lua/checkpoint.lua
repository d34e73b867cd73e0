-- checkpoint: raise checkpoints, forward only. Runs after lib_helpers.lua.
-- KEYS = checkpoint keys (pgderive:V:checkpoint); ARGV[1] = LSN (16 hex digits).
-- Sets each key to ARGV[1] unless it already holds ARGV[1] or a later LSN.
-- Returns the number of keys.
for i = 1, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if (not cur) or older(cur, ARGV[1]) then redis.call('SET', KEYS[i], ARGV[1]) end
end
return #KEYS
