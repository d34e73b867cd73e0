-- advance(n, new, prev): move the checkpoint keys KEYS[1..n] from at least prev to new
-- (16 hex digits each). Needs lib_helpers.lua.
-- Returns the 1-based indices of the keys missing or below prev (the sink lost acknowledged
-- data); those are left untouched. The others are raised to new, never lowered.
local function advance(n, new, prev)
  local lost = {}
  for i = 1, n do
    local cur = redis.call('GET', KEYS[i])
    if (not cur) or older(cur, prev) then
      lost[#lost + 1] = i
    elseif older(cur, new) then
      redis.call('SET', KEYS[i], new)
    end
  end
  return lost
end
