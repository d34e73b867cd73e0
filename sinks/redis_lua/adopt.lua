-- adopt: move one view's bookkeeping from the legacy, un-namespaced keys to its deployment's
-- keys (the first start after the upgrade that namespaced them). Needs no helpers.
-- KEYS[1], KEYS[2] = legacy version hash and checkpoint (pgderive:V:versions,
-- pgderive:V:checkpoint); KEYS[3], KEYS[4] = the deployment's (pgderive:D:V:versions,
-- pgderive:D:V:checkpoint).
-- When neither new key exists, each legacy key that exists is RENAMEd to its new name (read
-- old, write new, remove old, atomically). When either new key exists the deployment already
-- has its own bookkeeping: the legacy keys are left alone (another deployment may adopt them).
-- Returns the number of keys moved (0, 1 or 2).
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local moved = 0
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 2])
    moved = moved + 1
  end
end
return moved
