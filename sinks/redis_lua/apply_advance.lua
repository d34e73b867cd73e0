-- apply_advance: the Ops of one batch and the checkpoint advance in one call, so a checkpoint
-- moves only if every write before it succeeded (an error stops the script before the advance).
-- Runs after lib_helpers.lua, lib_apply.lua, lib_advance.lua.
-- KEYS = the checkpoint keys (ARGV[3] of them), then per view: its version hash and its record
-- keys.
-- ARGV[1], ARGV[2] = new and previous LSN (16 hex digits, as in advance.lua); ARGV[3] = number
-- of checkpoint keys; ARGV[4] = number of views n; ARGV[5..4+n] = number of record keys per view;
-- then the Ops' arguments as in apply.lua, view after view.
-- Returns {{reply of apply.lua per view}, {indices of lost checkpoint keys as in advance.lua}}.
local ncp, nviews = tonumber(ARGV[3]), tonumber(ARGV[4])
local k, a = ncp + 1, 5 + nviews
local replies = {}
for v = 1, nviews do
  local n = tonumber(ARGV[4 + v])
  replies[v], a = apply(KEYS[k], k + 1, k + n, a)
  k = k + 1 + n
end
return {replies, advance(ncp, ARGV[1], ARGV[2])}
