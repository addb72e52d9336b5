-- renew: extend the leases of the slots an instance holds for requests
-- still running, so that a long stream keeps its slot while a dead
-- instance's slots run out. (Appended to prelude.lua.)
--
-- KEYS     slot sets
-- ARGV[1]  lease, ms
-- ARGV[2]  'XX': renew only slots still there (a slot whose lease ran out
--          is not taken again: its request runs on, uncounted); 'ANY':
--          take them again too (after Redis was away or lost its data)
-- ARGV[2 + i]  the member this instance holds in KEYS[i]
-- Reply: slots renewed or taken again.

local lease = tonumber(ARGV[1])
local only_held = ARGV[2] == 'XX'
local renewed = 0
for i = 1, #KEYS do
  if only_held then
    renewed = renewed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[i + 2])
  else
    redis.call('ZADD', KEYS[i], now + lease, ARGV[i + 2])
    renewed = renewed + 1
  end
  redis.call('PEXPIRE', KEYS[i], lease)
end
return renewed
