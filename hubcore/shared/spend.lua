-- spend: what Redis holds of the spend counters an instance asks for, and
-- a mark on the charges channel in the same step. (Appended to
-- prelude.lua.) An instance whose subscription to the charges channel
-- was down reads the spend with this, once subscribed again: the charges
-- announced before the mark are in what it read, those after it are not
-- (see SharedState._catch_up).
--
-- KEYS     counters (day, week, month, total) and 5h hashes, any order
-- ARGV[1]  the charges channel
-- ARGV[2]  the mark (a message no charge looks like)
-- ARGV[3..]  per key its kind: 'n' counter, 'r' 5h hash
-- Reply: per key, the micro-dollars it holds (0 for none).

local spent = {}
for i = 1, #KEYS do
  if ARGV[i + 2] == 'n' then
    spent[i] = tonumber(redis.call('GET', KEYS[i])) or 0
  else
    spent[i] = (rolling_spend(KEYS[i]))
  end
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return spent
