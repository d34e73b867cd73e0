-- sweep: drop what a committed generation (or a TRUNCATE) leaves behind. Runs after
-- lib_helpers.lua.
-- KEYS[1] = version hash, KEYS[2..] = candidate record keys; ARGV[1] = generation version
-- (16 hex digits).
-- Deletes each record still older than ARGV[1] and its version entry (tombstones: the entry
-- only); keys at or above ARGV[1] (written meanwhile) are kept.
-- Returns the number of records (not tombstones) deleted.
local vh = KEYS[1]
local stored = redis.call('HMGET', vh, unpack(KEYS, 2))
local removed = 0
for i = 2, #KEYS do
  local cur = stored[i - 1]
  if cur and older(string.sub(cur, 1, 16), ARGV[1]) then
    if #cur == 16 then
      redis.call('DEL', KEYS[i])
      removed = removed + 1
    end
    redis.call('HDEL', vh, KEYS[i])
  end
end
return removed
