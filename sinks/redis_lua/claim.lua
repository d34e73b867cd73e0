-- claim: record which deployment writes the record keys of each view (by the key template's
-- shape), refusing shapes another deployment still writes. Needs no helpers.
-- KEYS[1] = the claims hash (pgderive:claims: shape -> "<deployment>\n<view>").
-- ARGV[1] = this deployment; ARGV[2..] = pairs (shape, view).
-- A shape held by another deployment D for view W is a conflict while D still has bookkeeping
-- for W here (pgderive:D:W:checkpoint or pgderive:D:W:versions: keys built here, this sink
-- runs on a single Redis, not a cluster); a claim whose owner left none is taken over.
-- Either every shape is claimed, or none (when there is a conflict).
-- Returns {shape1, holder1, shape2, holder2, ..} of the conflicts (empty: all claimed).
local conflicts, mine = {}, {}
for i = 2, #ARGV, 2 do
  local shape, view = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[1], shape)
  if cur then
    local nl = string.find(cur, '\n', 1, true)
    local dep = nl and string.sub(cur, 1, nl - 1) or cur
    local other = nl and string.sub(cur, nl + 1) or ''
    if dep ~= ARGV[1] then
      local base = 'pgderive:' .. dep .. ':' .. other .. ':'
      if redis.call('EXISTS', base .. 'checkpoint', base .. 'versions') > 0 then
        conflicts[#conflicts + 1] = shape
        conflicts[#conflicts + 1] = cur
      end
    end
  end
  mine[#mine + 1] = shape
  mine[#mine + 1] = ARGV[1] .. '\n' .. view
end
if #conflicts == 0 and #mine > 0 then redis.call('HSET', KEYS[1], unpack(mine)) end
return conflicts
