-- admit: check and take, in one atomic step, what a request needs of its
-- token, user and project (rpm, a concurrency slot, budgets), and read what
-- every instance knows of the upstream's keys and of the session's key.
-- (Appended to prelude.lua, which sets `now` and rolling_spend.)
--
-- KEYS[1]  the upstream's key-state hash
-- KEYS[2]  the session's key (read only when ARGV[3] ~= '0')
-- KEYS[3 .. 2 + r]  slot sets of releases carried (see ARGV[5])
-- then for each scope (token, user, project that has a counted limit):
--          its rpm window (zset), its slots (zset), one key per budget
-- ARGV[1]  this admission's member (unique: instance id and a counter)
-- ARGV[2]  slot lease, ms
-- ARGV[3]  session affinity TTL, ms; '0': no session
-- ARGV[4]  number of scopes
-- ARGV[5]  r: releases this call carries (slots of requests that ended on
--          this instance since its last call), applied first
-- ARGV[6 .. 5 + r]  the member released from each of those slot sets
-- then for each scope: rpm (0: none), concurrency (0: none), budget count,
--          and per budget its window ('5h', 'day', 'week', 'month', 'total') and limit
--
-- Checks run before anything is taken (a refused request takes nothing),
-- in the in-memory Limiter's order: budgets, rpm, concurrency, each over
-- the scopes in order.
-- Reply, admitted: {1, key_states, session_key or nil}; key_states is flat
--   field, value pairs: for 'c...' (a rest after a 429) and 'o...' (a
--   circuit open) the ms left, for 'd...' (a dead key) the secret's
--   fingerprint, for 'n...' the mark of the key's latest revival; expired
--   fields are deleted on the way.
-- Reply, refused: {0, scope (1-based), limit, value, extra}:
--   'budget_<window>': value micro-dollars spent, extra ms until a 5h
--     spend falls under the limit (-1 for other windows);
--   'rpm': value ms until the window has room, extra the admissions in it;
--   'concurrency': value the slots held, extra 0.

local member = ARGV[1]
local lease = tonumber(ARGV[2])
local session_ttl = ARGV[3]
local scopes = tonumber(ARGV[4])
local carried = tonumber(ARGV[5])

for j = 1, carried do
  redis.call('ZREM', KEYS[2 + j], ARGV[5 + j])
end

-- Parse the layout once: per scope {rpm, slots, rpm_key, slot_key, budgets}.
local parsed = {}
local k, a = 3 + carried, 6 + carried
for i = 1, scopes do
  local scope = {rpm = tonumber(ARGV[a]), slots = tonumber(ARGV[a + 1]),
                 rpm_key = KEYS[k], slot_key = KEYS[k + 1], budgets = {}}
  local count = tonumber(ARGV[a + 2])
  a = a + 3
  k = k + 2
  for j = 1, count do
    scope.budgets[j] = {window = ARGV[a], limit = tonumber(ARGV[a + 1]), key = KEYS[k]}
    a = a + 2
    k = k + 1
  end
  parsed[i] = scope
end

-- When enough of a 5h spend's oldest buckets age out to fall under `limit`.
local function rolling_frees(key, spent, limit)
  local excess = spent - limit + 1
  local buckets = {}
  local raw = redis.call('HGETALL', key)
  for j = 1, #raw, 2 do
    local minute = tonumber(raw[j])
    if minute then buckets[#buckets + 1] = {minute, tonumber(raw[j + 1])} end
  end
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  for _, bucket in ipairs(buckets) do
    excess = excess - bucket[2]
    if excess <= 0 then return (bucket[1] + ROLLING_MINUTES) * 60000 - now end
  end
  return -1
end

for i = 1, scopes do
  local budgets = parsed[i].budgets
  if #budgets > 0 then
    -- One MGET for the scope's counters; the 5h hash on its own.
    local counters = {}
    for _, budget in ipairs(budgets) do
      if budget.window ~= '5h' then counters[#counters + 1] = budget.key end
    end
    local values = #counters > 0 and redis.call('MGET', unpack(counters)) or {}
    local next_value = 1
    for _, budget in ipairs(budgets) do
      local spent
      if budget.window == '5h' then
        spent = rolling_spend(budget.key)
      else
        spent = tonumber(values[next_value]) or 0
        next_value = next_value + 1
      end
      if spent >= budget.limit then
        local frees = -1
        if budget.window == '5h' then frees = rolling_frees(budget.key, spent, budget.limit) end
        return {0, i, 'budget_' .. budget.window, spent, frees}
      end
    end
  end
end

for i = 1, scopes do
  local scope = parsed[i]
  if scope.rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', scope.rpm_key, '-inf', now - 60000)
    local held = redis.call('ZCARD', scope.rpm_key)
    if held >= scope.rpm then
      -- The admission whose ageing out leaves room (the oldest, unless the
      -- limit was lowered below what the window holds).
      local first = redis.call('ZRANGE', scope.rpm_key, held - scope.rpm, held - scope.rpm, 'WITHSCORES')
      return {0, i, 'rpm', tonumber(first[2]) + 60000 - now, held}
    end
  end
end

for i = 1, scopes do
  local scope = parsed[i]
  if scope.slots > 0 then
    -- A slot whose lease ran out belonged to an instance that died (or
    -- lost its release): it is free.
    redis.call('ZREMRANGEBYSCORE', scope.slot_key, '-inf', now)
    local held = redis.call('ZCARD', scope.slot_key)
    if held >= scope.slots then
      return {0, i, 'concurrency', held, 0}
    end
  end
end

for i = 1, scopes do
  local scope = parsed[i]
  if scope.rpm > 0 then
    redis.call('ZADD', scope.rpm_key, now, member)
    redis.call('PEXPIRE', scope.rpm_key, 60000)
  end
  if scope.slots > 0 then
    redis.call('ZADD', scope.slot_key, now + lease, member)
    -- No slot outlives now + lease without a renewal, which extends this too.
    redis.call('PEXPIRE', scope.slot_key, lease)
  end
end

local states = {}
local raw = redis.call('HGETALL', KEYS[1])
for j = 1, #raw, 2 do
  local field, value = raw[j], raw[j + 1]
  local kind = string.sub(field, 1, 1)
  if kind == 'd' or kind == 'n' then
    states[#states + 1] = field
    states[#states + 1] = value
  else
    local left = tonumber(value) - now
    if left > 0 then
      states[#states + 1] = field
      states[#states + 1] = left
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end

local session_key = false
if session_ttl ~= '0' then
  session_key = redis.call('GET', KEYS[2])
  if session_key then redis.call('PEXPIRE', KEYS[2], session_ttl) end
end

return {1, states, session_key}
