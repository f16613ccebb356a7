"""The server-side steps of the shared state, as Lua run by Redis: each is atomic (Redis runs one
script at a time) and one round trip.

Money is kept in whole nanodollars (integers: sums never drift), times come from the Redis
server's clock (``TIME``: one clock for every replica), and what a replica holds (reservations,
calls in flight) is kept under its name in a hash, so that the holdings of a replica that died
are dropped once its lease (a score in ``replicas``) has run out. Keys are all under one prefix;
the scripts touch keys they build from it (a single Redis server, not a cluster).
"""

from __future__ import annotations

# Shared by the scripts: the time, the replicas' leases, sums of what live replicas hold, and a
# minute of counts in one-second slots (``slot`` -> count; a slot counts until it is 61 s old, so
# no 60 s span ever holds more than the limit; a request may be refused up to a second early).
# A minute's hash also keeps its total (``t``) and its oldest slot (``o``), so that a request reads
# two fields; the slots are read only when the oldest has left (once a second at most) and on a
# refusal (to say when to retry).
_COMMON = """
local P = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local replicas = P .. 'replicas'
local function int(x) return string.format('%.0f', x) end
local live, live_count = nil, 0
local function alive(replica)
  if live == nil then  -- the live replicas, read once per script
    live = {}
    for _, r in ipairs(redis.call('ZRANGE', replicas, now_ms + 1, '+inf', 'BYSCORE')) do
      live[r] = true
      live_count = live_count + 1
    end
  end
  return live[replica] == true
end
local function live_sum(hash)
  local sum, all = 0, redis.call('HGETALL', hash)
  for i = 1, #all, 2 do
    if alive(all[i]) then
      sum = sum + tonumber(all[i + 1])
    else
      redis.call('HDEL', hash, all[i])
    end
  end
  return sum
end
local function release(hash, field, amount)
  if amount <= 0 then return end
  local left = tonumber(redis.call('HGET', hash, field) or '0') - amount
  if left > 0 then
    redis.call('HSET', hash, field, int(left))
  else
    redis.call('HDEL', hash, field)
  end
end
local function slots_of(hash, slot)
  local slots, all = {}, redis.call('HGETALL', hash)
  for i = 1, #all, 2 do
    local f = all[i]
    if f ~= 't' and f ~= 'o' then
      local s = tonumber(f)
      if s < slot - 60 then
        redis.call('HDEL', hash, f)
      else
        slots[#slots + 1] = {s, tonumber(all[i + 1])}
      end
    end
  end
  table.sort(slots, function(a, b) return a[1] < b[1] end)
  return slots
end
local function window(hash, slot)
  local got = redis.call('HMGET', hash, 't', 'o')
  local total, oldest = tonumber(got[1] or '0'), tonumber(got[2] or '-1')
  if oldest >= 0 and oldest < slot - 60 then
    local slots = slots_of(hash, slot)
    total = 0
    for _, e in ipairs(slots) do total = total + e[2] end
    if #slots == 0 then
      redis.call('DEL', hash)
      oldest = -1
    else
      oldest = slots[1][1]
      redis.call('HSET', hash, 't', int(total), 'o', oldest)
    end
  end
  return total, oldest
end
local function count(hash, slot, n, oldest)
  if redis.call('HINCRBY', hash, slot, int(n)) == n then redis.call('PEXPIRE', hash, 62000) end
  redis.call('HINCRBY', hash, 't', int(n))
  if oldest == nil or oldest < 0 then redis.call('HSETNX', hash, 'o', slot) end
end
local function free_in(hash, slot, over)
  for _, e in ipairs(slots_of(hash, slot)) do
    over = over - e[2]
    if over <= 0 then return (e[1] + 61) * 1000 - now_ms end
  end
  return 60000
end
local function reset_in(oldest)
  if oldest < 0 then return 0 end
  return (oldest + 61) * 1000 - now_ms
end
"""

# A request's admission, in one step. ARGV: prefix, replica, month, key name ('' for none), then
# six integers in one argument, space-separated: rpm, tpm, max_concurrent (0: none), worst case
# in nanodollars (0: nothing to reserve), the monthly limit (-1: not checked for this call), the
# key's monthly budget (-1: none).
# Returns one string of twelve space-separated integers (one reply to read, not twelve): rate,
# budget, requests left, requests reset ms, tokens left, tokens reset ms, month's spend, retry
# ms, calls in flight, what live replicas hold reserved, live replicas, tight: 1 when another
# call like this one would not fit now.
# rate: 0 admitted, 1 rpm, 2 tpm, 3 max_concurrent, -1 not asked. budget: 0 reserved, 1 the
# monthly limit, 2 the key's budget, -1 not asked (the budget is asked only when the rate admits).
ADMIT = (
    _COMMON
    + """
local me, month, name = ARGV[2], ARGV[3], ARGV[4]
local n = {}
for v in string.gmatch(ARGV[5], '%S+') do n[#n + 1] = tonumber(v) end
local rpm, tpm, conc, worst, limit, klimit = n[1], n[2], n[3], n[4], n[5], n[6]
local rate, retry, rleft, rreset, tleft, treset, running = -1, 0, -1, 0, -1, 0, 0
if name ~= '' and (rpm > 0 or tpm > 0 or conc > 0) then
  rate = 0
  local slot = math.floor(now_ms / 1000)
  local rkey, tkey, ckey = P .. 'rpm:' .. name, P .. 'tpm:' .. name, P .. 'conc:' .. name
  local rtotal, roldest, ttotal, toldest = 0, -1, 0, -1
  if rpm > 0 then rtotal, roldest = window(rkey, slot) end
  if tpm > 0 then ttotal, toldest = window(tkey, slot) end
  if conc > 0 then
    running = live_sum(ckey)
    if running >= conc then rate, retry = 3, 1000 end
  end
  if rate == 0 and rpm > 0 and rtotal >= rpm then
    rate, retry = 1, free_in(rkey, slot, rtotal - rpm + 1)
  end
  if rate == 0 and tpm > 0 and ttotal >= tpm then
    rate, retry = 2, free_in(tkey, slot, ttotal - tpm + 1)
  end
  if rate == 0 then
    if conc > 0 then redis.call('HINCRBY', ckey, me, 1); running = running + 1 end
    if rpm > 0 then
      count(rkey, slot, 1, roldest)
      rtotal = rtotal + 1
      if roldest < 0 then roldest = slot end
    end
  end
  if rpm > 0 then rleft, rreset = math.max(0, rpm - rtotal), reset_in(roldest) end
  if tpm > 0 then tleft, treset = math.max(0, tpm - ttotal), reset_in(toldest) end
end
local budget, spend, held, tight = -1, P .. 'spend:' .. month, 0, 0
local spent = tonumber(redis.call('HGET', spend, 'total') or '0')
if worst > 0 and rate <= 0 then
  budget = 0
  local reserved = P .. 'reserved:' .. month
  held = live_sum(reserved)
  if limit >= 0 and spent + held + worst > limit then budget = 1 end
  local kres, kused = P .. 'keyres:' .. month .. ':' .. name, 0
  if budget == 0 and klimit >= 0 then
    kused = tonumber(redis.call('HGET', P .. 'keyusage:' .. month, 'c\\t' .. name) or '0')
    kused = kused + live_sum(kres)
    if kused + worst > klimit then budget = 2 end
  end
  if budget == 0 then
    redis.call('HINCRBY', reserved, me, int(worst))
    held = held + worst
    if klimit >= 0 then redis.call('HINCRBY', kres, me, int(worst)) end
    -- another call like it would not fit now: its reservation should be freed at once
    if (limit >= 0 and spent + held + worst > limit) or
       (klimit >= 0 and kused + 2 * worst > klimit) then tight = 1 end
  end
end
alive('')
-- whole nanodollars, below 2^53: exact in '%.0f'
return string.format('%d %d %d %d %d %d %.0f %d %d %.0f %d %d', rate, budget, rleft, rreset,
  tleft, treset, spent, retry, running, held, live_count, tight)
"""
)

# Settled spend and freed reservations of one replica, in one step, once per batch id (a batch
# sent again after a lost answer is not counted twice). ARGV: prefix, the batch as JSON:
# {id, me, spend: [[month, backend, model, nanodollars, requests, prompt, completion]],
#  release: [[month, nanodollars]]}. Returns the month-to-date total of the last month named.
SETTLE = (
    _COMMON
    + """
local d = cjson.decode(ARGV[2])
local done = redis.call('SET', P .. 'batch:' .. d.id, 1, 'NX', 'PX', 86400000)
local total = 0
for _, s in ipairs(d.spend) do
  local h, f = P .. 'spend:' .. s[1], '\\t' .. s[2] .. '\\t' .. s[3]
  if done then
    redis.call('HINCRBY', h, 'c' .. f, int(s[4]))
    redis.call('HINCRBY', h, 'r' .. f, int(s[5]))
    redis.call('HINCRBY', h, 'p' .. f, int(s[6]))
    redis.call('HINCRBY', h, 'o' .. f, int(s[7]))
    redis.call('HINCRBY', h, 'total', int(s[4]))
  end
  total = tonumber(redis.call('HGET', h, 'total') or '0')
end
if done then
  for _, r in ipairs(d.release) do release(P .. 'reserved:' .. r[1], d.me, r[2]) end
end
return int(total)
"""
)

# What keys used, in one step, once per batch id. ARGV: prefix, the batch as JSON: {id, me,
# month, keys: [[name, requests, prompt, completion, nanodollars, reserve month, freed
# nanodollars, finished calls, tokens for the minute]]}.
KEY_USAGE = (
    _COMMON
    + """
local d = cjson.decode(ARGV[2])
if not redis.call('SET', P .. 'batch:' .. d.id, 1, 'NX', 'PX', 86400000) then return 0 end
local usage = P .. 'keyusage:' .. d.month
local slot = math.floor(now_ms / 1000)
for _, k in ipairs(d.keys) do
  local name = k[1]
  if k[2] ~= 0 then redis.call('HINCRBY', usage, 'r\\t' .. name, int(k[2])) end
  if k[3] ~= 0 then redis.call('HINCRBY', usage, 'p\\t' .. name, int(k[3])) end
  if k[4] ~= 0 then redis.call('HINCRBY', usage, 'o\\t' .. name, int(k[4])) end
  if k[5] ~= 0 then redis.call('HINCRBY', usage, 'c\\t' .. name, int(k[5])) end
  release(P .. 'keyres:' .. k[6] .. ':' .. name, d.me, k[7])
  release(P .. 'conc:' .. name, d.me, k[8])
  if k[9] > 0 then
    count(P .. 'tpm:' .. name, slot, k[9])
  end
end
return 1
"""
)

# A call of a key with max_concurrent ended: its slot is given back at once. ARGV: prefix, me, name.
FINISHED = (
    _COMMON
    + """
release(P .. 'conc:' .. ARGV[3], ARGV[2], 1)
return 1
"""
)

# A replica's lease: renewed every few seconds; what it holds counts while the lease runs. When
# the lease had run out (Redis was out of reach for longer, or restarted), or when asked (the
# replica is back from a spell without Redis, in which its calls ended unseen), what the replica
# holds is set to what it says. ARGV: prefix, me, lease ms, holdings as JSON: {reserved: [[month,
# nanodollars]], keyres: [[month, name, nanodollars]], conc: [[name, calls]]}, '1' to set them.
# Returns {live replicas, 1 if the lease was still running}.
LEASE = (
    _COMMON
    + """
local me, ttl = ARGV[2], tonumber(ARGV[3])
local lease = redis.call('ZSCORE', replicas, me)
local running = lease and tonumber(lease) > now_ms
redis.call('ZADD', replicas, now_ms + ttl, me)
redis.call('ZREMRANGEBYSCORE', replicas, '-inf', now_ms)
local function set(hash, value)
  if value > 0 then redis.call('HSET', hash, me, int(value)) else redis.call('HDEL', hash, me) end
end
if not running or ARGV[5] == '1' then
  local held = cjson.decode(ARGV[4])
  for _, r in ipairs(held.reserved) do set(P .. 'reserved:' .. r[1], r[2]) end
  for _, r in ipairs(held.keyres) do set(P .. 'keyres:' .. r[1] .. ':' .. r[2], r[3]) end
  for _, r in ipairs(held.conc) do set(P .. 'conc:' .. r[1], r[2]) end
end
return {redis.call('ZCARD', replicas), running and 1 or 0}
"""
)

SCRIPTS = (ADMIT, SETTLE, KEY_USAGE, FINISHED, LEASE)
