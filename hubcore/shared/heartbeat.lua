-- heartbeat: an instance says it is alive; every instance learns how many
-- are, and whether Redis still holds the state it had. (Appended to prelude.lua.)
--
-- KEYS[1]  this instance's own key (expires unless renewed: "alive")
-- KEYS[2]  the instances, a sorted set by the time of their latest beat
-- KEYS[3]  the epoch: a random id set once by the first instance to find
--          none; a Redis that lost its data (restarted without
--          persistence, flushed) has none, and a new one differs
-- ARGV[1]  this instance's id
-- ARGV[2]  instance TTL, ms
-- ARGV[3]  what this instance says of itself (host, pid, version)
-- ARGV[4]  an epoch to set if there is none
-- Reply: {live instances, epoch}. O(log n) in the instances, plus those dropped.

redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[4], 'NX')
return {redis.call('ZCARD', KEYS[2]), redis.call('GET', KEYS[3])}
