-- Shared helpers, prepended to every script that compares versions (see sinks/redis.py, _lua).
--
-- older(a, b): is version a < version b? Both are 16 lowercase hex digits (cdc.lsn.version_hex).
--   Exact: whole-number compare first, then the two 32-bit halves when both round to the same
--   double. Lua's string '<' is not used: it goes through strcoll, and Redis sets LC_COLLATE from
--   its environment (e.g. da_DK sorts "aa" after "ab").
-- call_spread(cmd, key, t, i, j): runs `cmd key t[i] .. t[j]` in slices of 1000 arguments
--   (Lua's unpack is bounded).
-- try_spread(cmd, key, t, i, j): call_spread on a record key; returns the error text of a
--   WRONGTYPE reply (a key of another Redis type), nil on success; other errors are raised.
local function older(a, b)
  if a == b then return false end
  local x, y = tonumber(a, 16), tonumber(b, 16)  -- doubles: rounding is monotonic, so
  if x ~= y then return x < y end                -- distinct doubles order correctly
  local ah = tonumber(string.sub(a, 1, 8), 16)
  local bh = tonumber(string.sub(b, 1, 8), 16)
  if ah ~= bh then return ah < bh end
  return tonumber(string.sub(a, 9, 16), 16) < tonumber(string.sub(b, 9, 16), 16)
end
local function call_spread(cmd, key, t, i, j)
  while i <= j do
    local k = math.min(i + 999, j)
    redis.call(cmd, key, unpack(t, i, k))
    i = k + 1
  end
end
-- like call_spread on a record key; returns the error of a WRONGTYPE reply (other errors raise)
local function try_spread(cmd, key, t, i, j)
  while i <= j do
    local k = math.min(i + 999, j)
    local r = redis.pcall(cmd, key, unpack(t, i, k))
    if type(r) == 'table' and r.err then
      if string.sub(r.err, 1, 9) == 'WRONGTYPE' then return r.err end
      error(r)
    end
    i = k + 1
  end
  return nil
end
