-- apply(vh, first, last, a): compare-and-set of the Ops of one view. Needs lib_helpers.lua.
--
-- vh = the view's version hash; KEYS[first..last] = record keys (may repeat); the Ops'
-- arguments start at ARGV[a]. Per record key, in order: version (16 hex digits), kind, payload:
--   'h' n f1 v1 ..                    full hash upsert (n = 2 * fields)
--   'p' n f1 v1 .. m d1 .. dm         partial hash update (m = fields to delete)
--   'j' json                          json upsert
--   'd'                               delete (leaves the tombstone "<version>d")
-- An Op applies when the key has no version entry or its version is >= the stored one
-- (tombstones included). Stored versions are read with one HMGET and written back with one HSET.
-- A partial Op applies only to a live record (entry of 16 digits): else it is counted as missed.
-- Returns {applied, skipped, partial_missed, {i1, err1, i2, err2, ..}}, next ARGV index:
--   i = 1-based position (among KEYS[first..last]) of a record key whose write failed with
--   WRONGTYPE; it is rejected and gets no version entry. skipped includes partial_missed.
local function apply(vh, first, last, a)
  local stored = redis.call('HMGET', vh, unpack(KEYS, first, last))
  local latest = {}          -- key -> version entry written by this call (repeated keys)
  local out = {}             -- HSET arguments for the version hash
  local applied, skipped, missed = 0, 0, 0
  local rejected = {}
  local err
  for i = first, last do
    local key = KEYS[i]
    local ver = ARGV[a]
    local kind = ARGV[a + 1]
    a = a + 2
    local cur = latest[key]
    if cur == nil then cur = stored[i - first + 1] end
    -- Equal versions re-apply: they come from the same transaction, applied in order
    -- (e.g. chunks of a large transaction, or a commit exactly at a snapshot's consistent point).
    local newer = (not cur) or not older(ver, string.sub(cur, 1, 16))
    local entry = ver
    err = nil
    if kind == 'h' then
      local n = tonumber(ARGV[a])
      if newer then
        if cur then redis.call('DEL', key) end
        if n > 0 then err = try_spread('HSET', key, ARGV, a + 1, a + n) end
      end
      a = a + 1 + n
    elseif kind == 'j' then
      if newer then redis.call('SET', key, ARGV[a]) end
      a = a + 1
    elseif kind == 'd' then
      if newer then
        redis.call('DEL', key)
        entry = ver .. 'd'
      end
    elseif kind == 'p' then
      local n = tonumber(ARGV[a])
      local m = tonumber(ARGV[a + 1 + n])
      if newer and cur and #cur == 16 then
        if n > 0 then err = try_spread('HSET', key, ARGV, a + 1, a + n) end
        if m > 0 and not err then err = try_spread('HDEL', key, ARGV, a + 2 + n, a + 1 + n + m) end
      elseif newer then
        missed = missed + 1
        newer = false
      end
      a = a + 2 + n + m
    else
      error('pgderive: unknown op kind ' .. tostring(kind))
    end
    if err then
      rejected[#rejected + 1] = i - first + 1
      rejected[#rejected + 1] = err
    elseif newer then
      applied = applied + 1
      latest[key] = entry
      out[#out + 1] = key
      out[#out + 1] = entry
    else
      skipped = skipped + 1
    end
  end
  if #out > 0 then call_spread('HSET', vh, out, 1, #out) end
  return {applied, skipped, missed, rejected}, a
end
