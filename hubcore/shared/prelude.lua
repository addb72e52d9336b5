-- hubcore shared state: what every script of hubcore/shared starts with.
-- Times are Redis's own clock (TIME), in milliseconds, so that instances
-- whose clocks disagree still share one window; replies carry durations
-- ("ms left"), never instants.

-- Redis 5 and 6 need this before writes that follow TIME; 7 always
-- replicates effects, and the call is a no-op there.
if redis.replicate_commands then redis.replicate_commands() end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_minute = math.floor(now / 60000)

-- The 5-hour rolling spend of one scope: a hash of per-minute buckets
-- (field: the minute's number, value: micro-dollars), the running sum of
-- those kept ('sum') and the oldest minute that may still hold one ('lo').
-- Buckets of the 300 minutes up to now are kept; older ones are dropped
-- lazily here, each minute once, so the sum costs O(1) amortised to read.
local ROLLING_MINUTES = 300

-- Returns the sum, and whether the hash still exists.
local function rolling_spend(key)
  local kept = redis.call('HMGET', key, 'lo', 'sum')
  local lo = tonumber(kept[1])
  if not lo then return 0, false end
  local sum = tonumber(kept[2]) or 0
  local oldest = now_minute - ROLLING_MINUTES + 1
  if lo >= oldest then return sum, true end
  if oldest - lo >= ROLLING_MINUTES then
    -- Every bucket is in [lo, lo + 299] (lo moved up at each visit): all gone.
    redis.call('DEL', key)
    return 0, false
  end
  for minute = lo, oldest - 1 do
    local field = tostring(minute)
    local spent = tonumber(redis.call('HGET', key, field))
    if spent then
      sum = sum - spent
      redis.call('HDEL', key, field)
    end
  end
  redis.call('HSET', key, 'lo', oldest, 'sum', sum)
  return sum, true
end
