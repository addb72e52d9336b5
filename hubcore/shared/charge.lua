-- charge: add one request's cost to the spend of its token, user and
-- project, once per request id. (Appended to prelude.lua.)
--
-- KEYS[1]  the request's charge marker (a charge replayed after a failed
--          send finds it and adds nothing)
-- then for each scope: its 5h hash, its day, week and month counters (of the
--          periods holding the request's arrival) and its total counter
-- ARGV[1]  micro-dollars
-- ARGV[2]  the minute (unix minutes) the request arrived in
-- ARGV[3]  seconds the marker is kept
-- ARGV[4..6]  unix seconds when the day, week and month counters may go
--          (their period's end, and a margin)
-- Reply: 1 charged, 0 already charged.

if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
local cost = tonumber(ARGV[1])
local minute = tonumber(ARGV[2])
local oldest = now_minute - ROLLING_MINUTES + 1
for k = 2, #KEYS, 5 do
  local rolling = KEYS[k]
  if minute >= oldest then
    -- Drops what aged out first, so that 'sum' holds the kept buckets only.
    local _, exists = rolling_spend(rolling)
    if not exists then redis.call('HSET', rolling, 'lo', oldest) end
    redis.call('HINCRBY', rolling, tostring(minute), cost)
    redis.call('HINCRBY', rolling, 'sum', cost)
    -- Kept until its newest bucket ages out; counted from now, not from
    -- the bucket's minute, so that a late charge (a request that ran long)
    -- never shortens what a newer one set.
    redis.call('PEXPIRE', rolling, (now_minute + ROLLING_MINUTES + 1) * 60000 - now)
  end
  for w = 1, 3 do
    local key = KEYS[k + w]
    if redis.call('INCRBY', key, cost) == cost then
      redis.call('EXPIREAT', key, ARGV[3 + w])
    end
  end
  redis.call('INCRBY', KEYS[k + 4], cost)
end
return 1
