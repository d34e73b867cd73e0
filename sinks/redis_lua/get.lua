-- get: read records and their version entries in one call. Read only; needs no helpers.
-- KEYS[1] = version hash, KEYS[2..] = record keys; ARGV[1] = 'HGETALL' (hash views) or 'GET'
-- (json views).
-- Returns {versions, records, errors}: the HMGET of the keys' version entries (nil for none),
-- per key the HGETALL list / GET string (false for none), and {i1, err1, ..} for keys whose
-- read failed (WRONGTYPE; i = 1-based position among the record keys).
local versions = redis.call('HMGET', KEYS[1], unpack(KEYS, 2))
local records, errors = {}, {}
for i = 2, #KEYS do
  local r = redis.pcall(ARGV[1], KEYS[i])
  if type(r) == 'table' and r.err then
    errors[#errors + 1] = i - 1
    errors[#errors + 1] = r.err
    r = false
  end
  records[i - 1] = r
end
return {versions, records, errors}
