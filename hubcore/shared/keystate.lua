-- keystate: what one instance learnt of a vendor key, for all. (Appended
-- to prelude.lua.)
--
-- KEYS[1]  the upstream's key-state hash
-- ARGV[1]  the field: 'c' .. label .. NUL .. model class (a rest after a
--          429; an empty class rests the whole key), 'o' .. label (its
--          circuit is open), 'd' .. label (the vendor refused it), or
--          'r' .. label: the key was revived (an operator enabled or reset
--          it): every field of that label goes, and 'n' .. label takes
--          Redis's time now (seconds.microseconds), the mark by which the other instances see that
--          they must revive it too
-- ARGV[2]  for 'c' and 'o': ms from now it lasts; for 'd': the secret's
--          fingerprint (a reload with another secret is not dead)
-- Rests and open circuits only lengthen: an older, shorter word that
-- arrives late changes nothing. Reply: fields written or deleted.

local field = ARGV[1]
local kind = string.sub(field, 1, 1)
if kind == 'd' then
  redis.call('HSET', KEYS[1], field, ARGV[2])
  return 1
end
if kind == 'r' then
  local label = string.sub(field, 2)
  local gone = redis.call('HDEL', KEYS[1], 'o' .. label, 'd' .. label)
  redis.call('HSET', KEYS[1], 'n' .. label, clock[1] .. '.' .. clock[2])
  local rest = 'c' .. label .. '\0'
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(name, 1, #rest) == rest then
      gone = gone + redis.call('HDEL', KEYS[1], name)
    end
  end
  return gone
end
local ends = now + tonumber(ARGV[2])
local known = tonumber(redis.call('HGET', KEYS[1], field))
if known and known >= ends then return 0 end
redis.call('HSET', KEYS[1], field, ends)
return 1
