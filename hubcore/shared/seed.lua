-- seed: raise spend counters to what an instance knows, after Redis lost
-- them (restarted without persistence, flushed). Each counter becomes the
-- larger of what it holds and what it is given, so every instance may seed
-- and none counts twice. (Appended to prelude.lua.)
--
-- KEYS     counters (day, week, month, total) and 5h hashes, any order
-- ARGV     per key: its kind ('n' counter, 'r' 5h hash), the micro-dollars,
--          and for a counter the unix seconds it may go (0: never)
-- A 5h spend is seeded whole into the current minute: it then ages out
-- later than it would have, never sooner.
-- Reply: the number of keys raised.

local raised = 0
for i = 1, #KEYS do
  local kind, amount, expires = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  if kind == 'n' then
    local held = tonumber(redis.call('GET', KEYS[i])) or 0
    if amount > held then
      redis.call('SET', KEYS[i], amount)
      if expires > 0 then redis.call('EXPIREAT', KEYS[i], expires) end
      raised = raised + 1
    end
  else
    local held, exists = rolling_spend(KEYS[i])
    if amount > held then
      if not exists then
        redis.call('HSET', KEYS[i], 'lo', now_minute - ROLLING_MINUTES + 1)
      end
      redis.call('HINCRBY', KEYS[i], tostring(now_minute), amount - held)
      redis.call('HSET', KEYS[i], 'sum', amount)
      redis.call('PEXPIRE', KEYS[i], (ROLLING_MINUTES + 1) * 60000)
      raised = raised + 1
    end
  end
end
return raised
