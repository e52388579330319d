"""Every Lua script syncmap runs, in one place, each headed by its KEYS, ARGV and reply.

All write scripts share one argument prefix and the helpers below, and follow one order:
validate (fence, condition) -> mutate -> take the version -> PUBLISH last.  Redis does not roll a
script back when a later line fails, so nothing is published for a change that did not happen.
A script that refuses (stale fence) returns an error *before* its first write.

KEYS (every write script): [1] sequence hash ``m``, [2] data hash ``d``, [3] expiry zset ``x``.
ARGV prefix (every write script):
    [1] channel  [2] bucket number  [3] epoch candidate (used only if the bucket has none)
    [4] origin (node id)  [5] fence lock name or ''  [6] fence token or '0'

Stored value = struct ``>I8I8I8`` (version, deadline ms or 0, epoch) .. payload.  Change message:
see ``core/wire.py`` (the Lua ``publish`` below builds exactly those bytes).
Lua numbers are doubles: versions and epochs stay below 2**53 (epochs are 52-bit).
"""

from __future__ import annotations

_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The live stored value of a field, or false when absent or expired (expired = absent for every
-- script: the probe reaps it and publishes the expiry).
local function live(field)
  local v = redis.call('HGET', KEYS[2], field)
  if not v then return false end
  local dl = struct.unpack('>I8', v, 9)
  if dl ~= 0 and dl <= now_ms() then return false end
  return v
end

local function fence_refused()
  if ARGV[5] == '' then return false end
  local tok = tonumber(ARGV[6])
  local cur = tonumber(redis.call('HGET', KEYS[1], 'f:' .. ARGV[5]) or '0')
  if tok < cur then
    return redis.error_reply('STALEFENCE lock ' .. ARGV[5] .. ' token ' .. ARGV[6] ..
      ' is older than token ' .. cur .. ' already used')
  end
  return false
end

local function fence_record()
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'f:' .. ARGV[5], ARGV[6]) end
end

-- Take n consecutive versions; returns the first and the bucket's epoch.
local function next_seq(n)
  local ep = redis.call('HGET', KEYS[1], 'epoch')
  if not ep then
    ep = ARGV[3]
    redis.call('HSET', KEYS[1], 'epoch', ep)
  end
  return redis.call('HINCRBY', KEYS[1], 'seq', n) - n + 1, tonumber(ep)
end

local function publish(op, seq, ep, fields)
  local parts = {struct.pack('>c2BBHI8I8B', 'sm', 1, op, tonumber(ARGV[2]), seq, ep, #ARGV[4]),
                 ARGV[4], struct.pack('>I4', #fields)}
  for _, f in ipairs(fields) do
    parts[#parts + 1] = struct.pack('>I4', #f)
    parts[#parts + 1] = f
  end
  redis.call('PUBLISH', ARGV[1], table.concat(parts))
end

local function store(field, seq, ep, payload, ttl)
  local dl = 0
  if ttl > 0 then
    dl = now_ms() + ttl
    redis.call('ZADD', KEYS[3], dl, field)
  else
    redis.call('ZREM', KEYS[3], field)
  end
  redis.call('HSET', KEYS[2], field, struct.pack('>I8I8I8', seq, dl, ep) .. payload)
  return dl
end
"""

SET = (
    _PRELUDE
    + r"""
-- ARGV[7] field  [8] payload  [9] ttl ms (0 = none)  [10] mode  [11] expected
-- mode 'set': always; 'swap': always, and reply with the old value; 'nx': only if absent;
-- 'cas': only if the live payload equals ARGV[11]; 'ver': only if the live version equals
-- ARGV[11] (0 = absent).
-- Reply: {version, deadline, old, epoch}; version 0 = not applied: {0, 0, old} (old = the live
-- value, or false).
local refused = fence_refused()
if refused then return refused end
local field, mode = ARGV[7], ARGV[10]
local old = false
if mode ~= 'set' then old = live(field) end
if mode == 'nx' and old then return {0, 0, old} end
if mode == 'cas' and (not old or string.sub(old, 25) ~= ARGV[11]) then return {0, 0, old} end
if mode == 'ver' then
  local have = 0
  if old then have = struct.unpack('>I8', old) end
  if have ~= tonumber(ARGV[11]) then return {0, 0, old} end
end
fence_record()
local seq, ep = next_seq(1)
local dl = store(field, seq, ep, ARGV[8], tonumber(ARGV[9]))
publish(1, seq, ep, {field})
return {seq, dl, old, ep}
"""
)

DELETE = (
    _PRELUDE
    + r"""
-- ARGV[7] field  [8] mode  [9] expected
-- mode 'del': if present; 'cad': if the live payload equals ARGV[9]; 'ver': if the live version
-- equals ARGV[9].  An expired field not yet reaped is removed with an 'expire' message.
-- Reply: {version, old, epoch}; version 0 = nothing deleted: {0, old} (old = the live value,
-- or false).
local refused = fence_refused()
if refused then return refused end
local field, mode = ARGV[7], ARGV[8]
local old = live(field)
if not old then
  if redis.call('HDEL', KEYS[2], field) == 1 then
    -- An expired leftover the probe has not reaped yet: its expiry is a change like any other,
    -- with a version and a message (the probe will not see it any more).
    redis.call('ZREM', KEYS[3], field)
    local seq, ep = next_seq(1)
    publish(4, seq, ep, {field})
  end
  return {0, false}
end
if mode == 'cad' and string.sub(old, 25) ~= ARGV[9] then return {0, old} end
if mode == 'ver' and struct.unpack('>I8', old) ~= tonumber(ARGV[9]) then return {0, old} end
fence_record()
redis.call('HDEL', KEYS[2], field)
redis.call('ZREM', KEYS[3], field)
local seq, ep = next_seq(1)
publish(2, seq, ep, {field})
return {seq, old, ep}
"""
)

MSET = (
    _PRELUDE
    + r"""
-- ARGV[7] ttl ms (0 = none), then field, payload pairs.  One version per field, one message.
-- Reply: {first version, epoch} (fields got first, first+1, ...).
local refused = fence_refused()
if refused then return refused end
fence_record()
local n = (#ARGV - 7) / 2
local seq, ep = next_seq(n)
local ttl = tonumber(ARGV[7])
local fields = {}
for i = 1, n do
  local field = ARGV[6 + 2 * i]
  store(field, seq + i - 1, ep, ARGV[7 + 2 * i], ttl)
  fields[i] = field
end
publish(1, seq, ep, fields)
return {seq, ep}
"""
)

CLEAR = (
    _PRELUDE
    + r"""
-- Empty one bucket.  Reply: {version, epoch}, or {0, 0} when the bucket was already empty.
local refused = fence_refused()
if refused then return refused end
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, 0} end
fence_record()
redis.call('DEL', KEYS[2], KEYS[3])
local seq, ep = next_seq(1)
publish(3, seq, ep, {})
return {seq, ep}
"""
)

PROBE = (
    _PRELUDE
    + r"""
-- ARGV[7] most expiries to reap in this call.
-- Reaps due entries of the bucket (each an 'expire' change with its own version), then reports.
-- Reply: {epoch or false, seq, server time ms, live entries}.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
if #due > 0 then
  for _, field in ipairs(due) do redis.call('HDEL', KEYS[2], field) end
  redis.call('ZREM', KEYS[3], unpack(due))
  local seq, ep = next_seq(#due)
  publish(4, seq, ep, due)
end
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local n = redis.call('HLEN', KEYS[2]) - redis.call('ZCOUNT', KEYS[3], '-inf', now)
return {m[1], tonumber(m[2] or '0'), now, n}
"""
)

ALL = {"set": SET, "delete": DELETE, "mset": MSET, "clear": CLEAR, "probe": PROBE}
