"""Every Lua script syncmap runs, in one place, each headed by its KEYS, ARGV and reply.

All write scripts share one argument prefix and the helpers below, and follow one order:
validate (fence, condition) -> mutate -> take the version -> publish last (see ``publish``).
Redis does not roll a script back when a later line fails, so nothing is published for a change
that did not happen.
A script that refuses (stale fence) returns an error *before* its first write.

KEYS (every write script): [1] data hash ``d``, [2] expiry zset ``x``, and [3] the fence counter
    of the lock when the write is fenced.
ARGV prefix (every write script):
    [1] channel  [2] bucket number  [3] epoch candidate (used only if the bucket has none)
    [4] origin (node id)  [5] fence lock name or ''  [6] fence token or '0'
    [7] the map's settings stamp ``<buckets>/<codec>``  [8] protections switched off ('' always,
    but in guard-off tests: see ``off`` below)  [9] the HMAC-SHA1 pads of the map's signing key
    (``K^ipad | K^opad``, 128 bytes; see ``sign``), or '' to publish unsigned messages
Script-specific arguments start at ARGV[10].

Digest chain: every message also extends its bucket's digest ``#h`` (``chain`` below), which the
probe returns, so a reader that applied a forged message in place of a lost one cannot confirm
the bucket against the store (docs/protocol.md §4.2).

Layout 2 (docs/protocol.md): a bucket's bookkeeping lives *in its data hash*, in reserved fields
that no key field can be (key fields start with ``s``, ``b`` or ``i``): ``#e`` epoch, ``#s`` the
last version taken, ``#c`` the settings stamp, ``#h`` the digest chain.  Bookkeeping so lives
and dies with the data: when Redis evicts (or someone deletes) a data hash, its epoch goes with
it, the next write starts a new random epoch and every server's probe sees the change and flushes
the bucket.

Stored value = struct ``>I8I8I8`` (version, deadline ms or 0, epoch) .. payload.  Change message:
see ``core/wire.py`` (the Lua ``publish`` below builds exactly those bytes, always stamped with
the write's server time: flags bit 1).
Lua numbers are doubles: versions and epochs stay below 2**53 (epochs are 52-bit).
"""

from __future__ import annotations

import hashlib

_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Protections switched off by a test (ARGV[8]; '' in production), one letter each:
--   f  a missing fence counter reads as 0 (layout 1)     v  'ver' compares versions only
--   m  epoch/seq in a separate hash <tag>:m (layout 1)    s  the settings stamp is not checked
local function off(c) return string.find(ARGV[8], c, 1, true) ~= nil end
-- Where the bucket's epoch and seq live ('m': the old separate hash, reached by name; tests only).
local BK = KEYS[1]
if off('m') then BK = string.sub(KEYS[1], 1, -2) .. 'm' end

-- The live stored value of a field, or false when absent or expired (expired = absent for every
-- script: the probe reaps it and publishes the expiry).
local function live(field)
  local v = redis.call('HGET', KEYS[1], field)
  if not v then return false end
  local dl = struct.unpack('>I8', v, 9)
  if dl ~= 0 and dl <= now_ms() then return false end
  return v
end

-- Fencing: KEYS[3], when given, is the lock's fence counter (the last token it issued).  A token
-- older than that counter belongs to a holder whose lease ran out: another acquisition happened
-- since.  Equal is the current holder (one hold may write many times).  The check reads the
-- counter itself, so a stale holder is refused even before the new holder has written anything.
-- A counter that does not exist (evicted, flushed, lost in a restart) cannot tell a stale token
-- from the current one: refused.  Acquiring again re-seeds it above every token issued.
local function fence_refused()
  if ARGV[5] == '' then return false end
  local cur = redis.call('GET', KEYS[3])
  if not cur then
    if not off('f') then
      return redis.error_reply('STALEFENCE lock ' .. ARGV[5] .. ': its fence state was lost ' ..
        '(evicted, flushed or lost in a restart), so token ' .. ARGV[6] .. ' cannot be checked')
    end
    cur = '0'
  end
  if tonumber(ARGV[6]) < tonumber(cur) then
    return redis.error_reply('STALEFENCE lock ' .. ARGV[5] .. ' token ' .. ARGV[6] ..
      ' is older than token ' .. cur .. ' issued since')
  end
  return false
end

-- The bucket's settings stamp (ARGV[7]) must be the writer's: a server opened with another bucket
-- count or codec (after the meta key was lost) would split the map or write values the others
-- misread.  Returns the refusal, or false; ``stamped`` says whether the bucket has a stamp.
local stamped = false
local function settings_refused()
  local have = redis.call('HGET', KEYS[1], '#c')
  stamped = have and true or false
  if have and have ~= ARGV[7] and not off('s') then
    return redis.error_reply('SETTINGS bucket ' .. ARGV[2] .. ' of this map was created with ' ..
      'settings ' .. have .. ' (buckets/codec), this server uses ' .. ARGV[7])
  end
  return false
end

-- Every refusal a write script can make, before its first write.
local function refused()
  return settings_refused() or fence_refused()
end

-- Take n consecutive versions; returns the first and the bucket's epoch.  A bucket without an
-- epoch (new, or its data hash evicted) starts a new random one, stamped with our settings.
local function next_seq(n)
  local ep = redis.call('HGET', BK, '#e')
  if not ep then
    ep = ARGV[3]
    redis.call('HSET', BK, '#e', ep)
    redis.call('HDEL', BK, '#h')  -- a new epoch starts a new chain
  end
  if not stamped then
    redis.call('HSET', KEYS[1], '#c', ARGV[7])
    stamped = true
  end
  return redis.call('HINCRBY', BK, '#s', n) - n + 1, tonumber(ep)
end

-- Whether ``old`` (a live stored value, or false) is the one a 'ver' condition names:
-- ``expected`` is "epoch:version", or "0:0" for absent.  Versions restart under a new epoch, so
-- a version alone may name another write (ABA); epoch and version together cannot.
local function is_version(old, expected)
  local e, v = string.match(expected, '^(%d+):(%d+)$')
  if not v then return false end
  if not old then return v == '0' end
  local have, _, ep = struct.unpack('>I8I8I8', old)
  return have == tonumber(v) and (ep == tonumber(e) or off('v'))
end

-- Where the change message goes, by ARGV[1] (the map's feed, see store/commands.py):
--   '<channel>'              PUBLISH on that channel (redis:// feed on this server; the default);
--   '!x:<maxlen>:<stream>'   XADD to that stream, trimmed to about maxlen (0 = never) (a
--                            redis+stream:// feed on this server);
--   '!s'                     SPUBLISH on the bucket's own channel <tag>:ch, in the bucket's slot
--                            (layout 2s: a Redis Cluster; the map's sharded feed);
--   '!S:<maxlen>'            as '!s', and XADD to the bucket's own log <tag>:log, trimmed to
--                            about maxlen (0 = never), in the same slot (layout 2s with a
--                            redis+stream:// feed: a cut subscriber replays the log);
--   ''                       keep it in `out`: the script replies {reply, out} and the client
--                            publishes `out` on the map's feed after the write (any other feed).
-- The first two happen in the same atomic step as the write; the third can be lost between the
-- write and the publish, which the sequence probe catches (docs/feeds.md).
local out = {}

-- The bucket's digest chain (``#h``): #h = first 16 hex digits of sha1hex(#h .. link), where link
-- = sha1hex(op:u8 | seq:u64 | count | fields) of this message; '' before a new epoch's first
-- message.  Readers keep the same chain from the messages they apply (core/wire.py).
local function chain(op, seq, tail)
  local link = redis.sha1hex(struct.pack('>BI8', op, seq) .. tail)
  local prev = redis.call('HGET', BK, '#h') or ''
  redis.call('HSET', BK, '#h', string.sub(redis.sha1hex(prev .. link), 1, 16))
end

-- HMAC-SHA1 of a message with the pads in ARGV[9]: sha1(K^opad | sha1(K^ipad | msg)), digests
-- as raw bytes; flags bit 0 of the header says it is there.
local function unhex(h)  -- 40 hex digits -> 20 bytes (five 32-bit words: exact in a double)
  local w = {}
  for i = 1, 33, 8 do w[#w + 1] = tonumber(string.sub(h, i, i + 7), 16) end
  return struct.pack('>I4I4I4I4I4', w[1], w[2], w[3], w[4], w[5])
end
local function sign(msg)
  local inner = unhex(redis.sha1hex(string.sub(ARGV[9], 1, 64) .. msg))
  return msg .. unhex(redis.sha1hex(string.sub(ARGV[9], 65, 128) .. inner))
end

local function publish(op, seq, ep, fields)
  local parts = {struct.pack('>I4', #fields)}
  for _, f in ipairs(fields) do
    parts[#parts + 1] = struct.pack('>I4', #f)
    parts[#parts + 1] = f
  end
  local tail = table.concat(parts)
  chain(op, seq, tail)
  -- flags bit 1: the write's server time (ms) follows the fields, so a receiver can tell how
  -- old the change is when it arrives (it is not part of the chain link).  Bit 0: signed.
  local flags = 2
  if ARGV[9] ~= '' then flags = 3 end
  local msg = struct.pack('>c2BBBHI8I8B', 'sm', 2, op, flags, tonumber(ARGV[2]), seq, ep,
                          #ARGV[4]) .. ARGV[4] .. tail .. struct.pack('>I8', now_ms())
  if flags == 3 then msg = sign(msg) end
  local target = ARGV[1]
  if target == '' then
    out[#out + 1] = msg
  elseif target == '!s' then
    redis.call('SPUBLISH', string.sub(KEYS[1], 1, -2) .. 'ch', msg)  -- <tag>:d -> <tag>:ch
  elseif string.sub(target, 1, 3) == '!S:' then
    local tag = string.sub(KEYS[1], 1, -2)  -- <tag>:d -> <tag>:
    redis.call('SPUBLISH', tag .. 'ch', msg)
    local maxlen = string.sub(target, 4)
    if maxlen == '0' then
      redis.call('XADD', tag .. 'log', '*', 'm', msg)
    else
      redis.call('XADD', tag .. 'log', 'MAXLEN', '~', maxlen, '*', 'm', msg)
    end
  elseif string.sub(target, 1, 1) == '!' then
    local maxlen, stream = string.match(target, '^!x:(%d+):(.+)$')
    if maxlen == '0' then
      redis.call('XADD', stream, '*', 'm', msg)
    else
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'm', msg)
    end
  else
    redis.call('PUBLISH', target, msg)
  end
end

local function store(field, seq, ep, payload, ttl)
  local dl = 0
  if ttl > 0 then
    dl = now_ms() + ttl
    redis.call('ZADD', KEYS[2], dl, field)
  else
    redis.call('ZREM', KEYS[2], field)
  end
  redis.call('HSET', KEYS[1], field, struct.pack('>I8I8I8', seq, dl, ep) .. payload)
  return dl
end
"""

# A map script's body runs as a function so that, in relay mode (ARGV[1] == ''), its reply can be
# wrapped with the change messages it made: {reply, {message, ...}}.  Refusals stay plain errors.
_EPILOGUE = r"""
local r = body()
if ARGV[1] == '' and not (type(r) == 'table' and r.err) then return {r, out} end
return r
"""


def _map_script(body: str) -> str:
    return _PRELUDE + "local function body()\n" + body + "\nend\n" + _EPILOGUE


SET = _map_script(
    r"""
-- ARGV[10] field  [11] payload  [12] ttl ms (0 = none)  [13] mode  [14] expected
-- mode 'set': always; 'swap': always, and reply with the old value; 'nx': only if absent;
-- 'cas': only if the live payload equals ARGV[14]; 'ver': only if the live value is the one
-- ARGV[14] = "epoch:version" names ("0:0" = absent).
-- Reply: {version, deadline, old, epoch}; version 0 = not applied: {0, 0, old} (old = the live
-- value, or false).
local refusal = refused()
if refusal then return refusal end
local field, mode = ARGV[10], ARGV[13]
local old = false
if mode ~= 'set' then old = live(field) end
if mode == 'nx' and old then return {0, 0, old} end
if mode == 'cas' and (not old or string.sub(old, 25) ~= ARGV[14]) then return {0, 0, old} end
if mode == 'ver' and not is_version(old, ARGV[14]) then return {0, 0, old} end
local seq, ep = next_seq(1)
local dl = store(field, seq, ep, ARGV[11], tonumber(ARGV[12]))
publish(1, seq, ep, {field})
return {seq, dl, old, ep}
"""
)

DELETE = _map_script(
    r"""
-- ARGV[10] field  [11] mode  [12] expected
-- mode 'del': if present; 'cad': if the live payload equals ARGV[12]; 'ver': if the live value
-- is the one ARGV[12] = "epoch:version" names.  An expired field not yet reaped is removed
-- with an 'expire' message.
-- Reply: {version, old, epoch}; version 0 = nothing deleted: {0, old} (old = the live value,
-- or false).
local refusal = refused()
if refusal then return refusal end
local field, mode = ARGV[10], ARGV[11]
local old = live(field)
if not old then
  if redis.call('HDEL', KEYS[1], field) == 1 then
    -- An expired leftover the probe has not reaped yet: its expiry is a change like any other,
    -- with a version and a message (the probe will not see it any more).
    redis.call('ZREM', KEYS[2], field)
    local seq, ep = next_seq(1)
    publish(4, seq, ep, {field})
  end
  return {0, false}
end
if mode == 'cad' and string.sub(old, 25) ~= ARGV[12] then return {0, old} end
if mode == 'ver' and not is_version(old, ARGV[12]) then return {0, old} end
redis.call('HDEL', KEYS[1], field)
redis.call('ZREM', KEYS[2], field)
local seq, ep = next_seq(1)
publish(2, seq, ep, {field})
return {seq, old, ep}
"""
)

MSET = _map_script(
    r"""
-- ARGV[10] ttl ms (0 = none), then field, payload pairs.  One version per field, one message.
-- Reply: {first version, epoch} (fields got first, first+1, ...).
local refusal = refused()
if refusal then return refusal end
local n = (#ARGV - 10) / 2
local seq, ep = next_seq(n)
local ttl = tonumber(ARGV[10])
local fields = {}
for i = 1, n do
  local field = ARGV[9 + 2 * i]
  store(field, seq + i - 1, ep, ARGV[10 + 2 * i], ttl)
  fields[i] = field
end
publish(1, seq, ep, fields)
return {seq, ep}
"""
)

# The reserved (bookkeeping) fields of a data hash; key fields start with s, b or i.
_RESERVED = r"""
local function reserved_count()
  local n = 0
  for _, v in ipairs(redis.call('HMGET', KEYS[1], '#e', '#s', '#c', '#h')) do
    if v then n = n + 1 end
  end
  return n
end
"""

CLEAR = _map_script(
    _RESERVED
    + r"""
-- Empty one bucket, keeping its bookkeeping (epoch, seq, stamp, chain: versions go on).
-- Reply: {version, epoch}, or {0, 0} when the bucket was already empty.
local refusal = refused()
if refusal then return refusal end
if redis.call('HLEN', KEYS[1]) <= reserved_count() then return {0, 0} end
local keep = redis.call('HMGET', KEYS[1], '#e', '#s', '#c', '#h')
redis.call('DEL', KEYS[1], KEYS[2])
local names = {'#e', '#s', '#c', '#h'}
for i = 1, 4 do
  if keep[i] then redis.call('HSET', KEYS[1], names[i], keep[i]) end
end
local seq, ep = next_seq(1)
publish(3, seq, ep, {})
return {seq, ep}
"""
)

PROBE = _map_script(
    _RESERVED
    + r"""
-- ARGV[10] most expiries to reap in this call.
-- Reaps due entries of the bucket (each an 'expire' change with its own version), then reports.
-- A bucket whose stamp is another map's settings (SETTINGS) or whose sequence is not a number
-- (DAMAGED) is refused before anything is written; a wrong-typed key fails (WRONGTYPE) likewise.
-- Reply: {epoch or false, seq, server time ms, live entries, digest chain ('' for none)}.
local refusal = settings_refused()
if refusal then return refusal end
local m = redis.call('HMGET', BK, '#e', '#s')
if (m[1] and not tonumber(m[1])) or (m[2] and not tonumber(m[2])) then
  return redis.error_reply('DAMAGED bucket ' .. ARGV[2] .. ' has a non-numeric epoch or sequence')
end
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[10]))
if #due > 0 then
  for _, field in ipairs(due) do redis.call('HDEL', KEYS[1], field) end
  redis.call('ZREM', KEYS[2], unpack(due))
  local seq, ep = next_seq(#due)
  publish(4, seq, ep, due)
  m = redis.call('HMGET', BK, '#e', '#s')
end
local n = redis.call('HLEN', KEYS[1]) - reserved_count()
return {m[1], tonumber(m[2] or '0'), now, n - redis.call('ZCOUNT', KEYS[2], '-inf', now),
        redis.call('HGET', BK, '#h') or ''}
"""
)

# ---- locks (docs/locks.md) ---------------------------------------------------------------------
# Every lock's keys share the hash tag {lock:<name>} (one cluster slot).  A hold is a hash
# {o = owner token, n = re-entry count, t = fencing token} with the lease as its TTL; the fence
# counter (no TTL) is the last token issued.  Lease and wait times are Redis server milliseconds.

_LOCK_PRELUDE = r"""
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The next fencing token.  A counter that does not exist (a new lock, or one lost to a restart
-- without persistence or to eviction) starts from the server clock in microseconds, which is above
-- every token issued before as long as no lock was taken more than once per microsecond on
-- average and the server clock did not go back.  Built as a string: Lua numbers print as %.14g.
local function seed_token(key)
  local cur = redis.call('GET', key)
  if not cur then
    local t = redis.call('TIME')
    cur = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('SET', key, cur)
  end
  return cur
end

local function next_token(key)
  seed_token(key)
  return redis.call('INCR', key)
end

-- Keep a zset's TTL at least ms, so an abandoned one disappears on its own.
local function keep_for(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end
"""

# Lock's queue (issue 16): waiters take turns in arrival order, and a release wakes only the
# next one.  Two zsets in the lock's slot: the queue (owner -> arrival, server µs) and the
# entries' leases (owner -> deadline, server ms).  A waiter keeps its place by trying again at
# least every third of its entry's lease; an entry whose lease ran out (a dead or paused waiter)
# is skipped when it reaches the head, so a dead waiter holds the queue up for one entry lease
# at most.  Release messages: 'r' = anyone may try (nobody queues: clients from before a
# queue wake on it), 'h' .. entry = only that waiter's turn (its process wakes only that
# waiter; a batch is one message per waiter, all from one script).
_QUEUE = r"""
-- The first live waiter of queue KEYS[q] (leases in KEYS[qd]), removing the dead ones ahead
-- of it (bounded per call: the next call goes on).  Returns head or false, and whether the
-- head changed (a dead one was skipped).
local function queue_head(q, qd, now)
  local skipped = false
  for _ = 1, 100 do
    local first = redis.call('ZRANGE', q, 0, 0)[1]
    if not first then return false, skipped end
    local dl = redis.call('ZSCORE', qd, first)
    if dl and tonumber(dl) > now then return first, skipped end
    redis.call('ZREM', q, first)
    redis.call('ZREM', qd, first)
    skipped = true
  end
  return redis.call('ZRANGE', q, 0, 0)[1] or false, skipped
end

-- Tell waiters the lock is free: the head's process wakes only the head; 'r' wakes everyone.
-- '!s:<channel>': a Redis Cluster's sharded channel in the lock's own slot (LockLayout.notify).
local function notify(channel, head)
  local msg = 'r'
  if head then msg = 'h' .. head end
  if string.sub(channel, 1, 3) == '!s:' then redis.call('SPUBLISH', string.sub(channel, 4), msg)
  else redis.call('PUBLISH', channel, msg) end
end
"""

LOCK_ACQUIRE = (
    _LOCK_PRELUDE
    + _QUEUE
    + r"""
-- KEYS[1] hold hash  [2] fence counter  [3] queue  [4] queue entry leases.
-- ARGV[1] owner  [2] lease ms  [3] queue entry lease ms: when refused, join the queue (or keep
-- this owner's place in it) for that long; '0' = try once, do not queue  [4] release channel
-- (told when this call skipped a dead head and the lock is free: the new head's turn).
-- Reply: {1, token, count} held (count > 1: re-entered by the same owner, same token);
--        {0, ms left on the holder's lease, holder, place, 0}, or, free but another waiter's
--        turn, {0, ms left on that waiter's entry, waiter, place, 1}; place: this owner's rank
--        in the queue (0 = head), -1 not queued.
local owner = redis.call('HGET', KEYS[1], 'o')
if owner == ARGV[1] then
  local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('HGET', KEYS[1], 't')), n}
end
local now = server_ms()
local head, skipped = queue_head(KEYS[3], KEYS[4], now)
if not owner and (not head or head == ARGV[1]) then
  if head then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[4], ARGV[1])
  end
  local tok = next_token(KEYS[2])
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'n', 1, 't', tok)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tok, 1}
end
local place = -1
local qms = tonumber(ARGV[3])
if qms > 0 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], 'NX', tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[1])
  redis.call('ZADD', KEYS[4], now + qms, ARGV[1])
  keep_for(KEYS[3], qms)
  keep_for(KEYS[4], qms)
  place = redis.call('ZRANK', KEYS[3], ARGV[1])
end
if owner then return {0, redis.call('PTTL', KEYS[1]), owner, place, 0} end
if skipped then notify(ARGV[4], head) end
return {0, tonumber(redis.call('ZSCORE', KEYS[4], head)) - now, head, place, 1}
"""
)

LOCK_RELEASE = (
    _LOCK_PRELUDE
    + _QUEUE
    + r"""
-- KEYS[1] hold hash  [2] queue  [3] queue entry leases.  ARGV[1] owner  [2] release channel
-- [3] '1' = every re-entry at once  [4] token of the hold to release, or '' for whichever
-- hold this owner has.  (Giving back a hold that was declared lost names its token: by then
-- the same owner may hold a newer one.)
-- Reply: {1, re-entries left} (0: released, the next waiter told); {0, false} no hold (the
-- lease ran out); {-1, holder} held by another owner (or by a newer hold of this one).
local owner = redis.call('HGET', KEYS[1], 'o')
if not owner then return {0, false} end
if owner ~= ARGV[1] then return {-1, owner} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 't') ~= ARGV[4] then return {-1, owner} end
local n = 0
if ARGV[3] ~= '1' then n = redis.call('HINCRBY', KEYS[1], 'n', -1) end
if n > 0 then return {1, n} end
redis.call('DEL', KEYS[1])
notify(ARGV[2], (queue_head(KEYS[2], KEYS[3], server_ms())))
return {1, 0}
"""
)

LOCK_LEAVE = (
    _LOCK_PRELUDE
    + _QUEUE
    + r"""
-- A waiter gives up (timed out, cancelled).  KEYS[1] hold hash  [2] queue  [3] queue entry
-- leases.  ARGV[1] owner  [2] release channel.  When it was the head and the lock is free (the
-- holder released and named it a moment ago), the next head is told: its turn now, not when
-- it next refreshes its place.  Reply: 1 left the queue, 0 was not in it.
local was_head = redis.call('ZRANK', KEYS[2], ARGV[1]) == 0
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if was_head and redis.call('EXISTS', KEYS[1]) == 0 then
  local head = queue_head(KEYS[2], KEYS[3], server_ms())
  if head then notify(ARGV[2], head) end
end
return 1
"""
)

LOCK_RENEW = r"""
-- KEYS[1] hold hash.  ARGV[1] owner  [2] lease ms.  Reply: 1 renewed, 0 not held by this owner.
if redis.call('HGET', KEYS[1], 'o') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# RWLock's and Semaphore's queues (issue 16, lock queue 2): the same scheme as Lock's, with
# batches.  RWLock's queue holds 'r:<owner>' and 'w:<owner>' entries (and a third zset of the
# writers' entries alone, to find the first writer in one call); the next batch is the head
# writer (once no reader holds), or every queued reader ahead of the first queued writer.  A
# Semaphore's queue holds permit ids; the first n live entries may take the n free permits.
_QUEUES = r"""
-- Join queue q (arrival µs, NX: a refresh keeps the place) with an entry lease of ms in qd.
local function join(q, qd, m, now, ms)
  local t = redis.call('TIME')
  redis.call('ZADD', q, 'NX', tonumber(t[1]) * 1000000 + tonumber(t[2]), m)
  redis.call('ZADD', qd, now + tonumber(ms), m)
  keep_for(q, ms)
  keep_for(qd, ms)
end

local function live(qd, m, now)
  local dl = redis.call('ZSCORE', qd, m)
  return dl and tonumber(dl) > now
end

-- Up to k live entries from the head of q, dropping the dead ones met on the way (bounded per
-- call: the next call goes on).  Returns them, and whether a dead one was dropped.
local function heads(q, qd, qw, now, k)
  local found, skipped, at = {}, false, 0
  for _ = 1, k + 100 do
    if #found >= k then break end
    local m = redis.call('ZRANGE', q, at, at)[1]
    if not m then break end
    if live(qd, m, now) then
      found[#found + 1] = m
      at = at + 1
    else
      redis.call('ZREM', q, m)
      redis.call('ZREM', qd, m)
      if qw then redis.call('ZREM', qw, m) end
      skipped = true
    end
  end
  return found, skipped
end

-- RWLock: the first live queued writer (dropping dead ones ahead of it), or false.
local function first_writer(q, qd, qw, now)
  for _ = 1, 100 do
    local w = redis.call('ZRANGE', qw, 0, 0)[1]
    if not w or live(qd, w, now) then return w or false end
    redis.call('ZREM', q, w)
    redis.call('ZREM', qd, w)
    redis.call('ZREM', qw, w)
  end
  return redis.call('ZRANGE', qw, 0, 0)[1] or false
end

-- RWLock, no writer holding: name the next batch.  The head writer once no reader holds
-- (readers = read holds left); with wake_readers, every queued reader ahead of the first
-- queued writer.  Returns how many were named.
local function rw_tell(q, qd, qw, now, readers, wake_readers, channel)
  local head = heads(q, qd, qw, now, 1)[1]
  if not head then return 0 end
  if string.sub(head, 1, 2) == 'w:' then
    if readers > 0 then return 0 end
    notify(channel, head)
    return 1
  end
  if not wake_readers then return 0 end
  local fw = first_writer(q, qd, qw, now)
  local upto = -1
  if fw then upto = redis.call('ZRANK', q, fw) - 1 end
  local n = 0
  for _, m in ipairs(redis.call('ZRANGE', q, 0, upto)) do
    if live(qd, m, now) then
      notify(channel, m)
      n = n + 1
    end
  end
  return n
end

-- 'r' for waiters that do not queue (clients from before the queue) when nobody queues.
local function tell_anyone(q, channel)
  if redis.call('EXISTS', q) == 0 then notify(channel, false) end
end
"""

_RW = _LOCK_PRELUDE + _QUEUE + _QUEUES

RW_READ = (
    _RW
    + r"""
-- KEYS[1] writer hold hash  [2] fence counter  [3] readers zset  [4] claims (writers from
-- before the queue)  [5] queue  [6] entry leases  [7] queued writers  (zset scores: lease,
-- claim and entry deadlines in server ms; arrivals in server µs).
-- ARGV[1] owner  [2] lease ms  [3] entry lease ms ('0': try once, do not queue)  [4] channel.
-- Reply: {1, fence counter} reading (a missing counter is seeded first, as next_token does, so
-- the reader's token is a real one); {0, ms to wait at most, who is in the way, place, turn,
-- lead}: turn 1 = a queued writer goes first; lead 1 = in the next batch (waits for the
-- holder's lease, not only for a message).
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local me = 'r:' .. ARGV[1]
local w = redis.call('HGET', KEYS[1], 'o')
local wait, who, turn, fw = 0, false, 0, false
-- An owner that already reads (or writes: a downgrade) is let in again; anyone else waits for
-- the writer, for a claim of a writer from before the queue, and for a writer queued ahead.
if w and w ~= ARGV[1] then
  wait, who = redis.call('PTTL', KEYS[1]), w
  fw = first_writer(KEYS[5], KEYS[6], KEYS[7], now)
elseif not w and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  local ww = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  fw = first_writer(KEYS[5], KEYS[6], KEYS[7], now)
  local mine = redis.call('ZRANK', KEYS[5], me)
  if fw and (not mine or mine > redis.call('ZRANK', KEYS[5], fw)) then
    wait, who, turn = tonumber(redis.call('ZSCORE', KEYS[6], fw)) - now, string.sub(fw, 3), 1
  elseif #ww > 0 then
    wait, who = tonumber(ww[2]) - now, ww[1]
  end
end
if not who then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
  keep_for(KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[5], me)
  redis.call('ZREM', KEYS[6], me)
  return {1, tonumber(seed_token(KEYS[2]))}
end
local place, lead = -1, 0
if tonumber(ARGV[3]) > 0 then
  join(KEYS[5], KEYS[6], me, now, ARGV[3])
  place = redis.call('ZRANK', KEYS[5], me)
  if turn == 0 and (not fw or place < redis.call('ZRANK', KEYS[5], fw)) then lead = 1 end
end
return {0, wait, who, place, turn, lead}
"""
)

RW_WRITE = (
    _RW
    + r"""
-- KEYS as rw_read.  ARGV[1] owner  [2] lease ms  [3] entry lease ms  [4] channel.
-- Reply: {1, token, count} writing; {0, ms to wait at most, who, place, turn, lead}.
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local w = redis.call('HGET', KEYS[1], 'o')
if w == ARGV[1] then
  local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('HGET', KEYS[1], 't')), n}
end
local me = 'w:' .. ARGV[1]
local wait, who, turn = 0, false, 0
-- The only reader may upgrade itself without waiting for its turn: the writers queued ahead
-- of it wait for its read hold to end anyway, so making it wait for them would deadlock.
local upgrade = redis.call('ZSCORE', KEYS[3], ARGV[1])
if w then
  wait, who = redis.call('PTTL', KEYS[1]), w
else
  local head, skipped = heads(KEYS[5], KEYS[6], KEYS[7], now, 1)
  head = head[1]
  local readers = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  local last, reader = 0, false
  for i = 1, #readers, 2 do
    if readers[i] ~= ARGV[1] then
      reader = readers[i]
      last = math.max(last, tonumber(readers[i + 1]))
    end
  end
  if not upgrade and head and head ~= me then
    wait, who, turn = tonumber(redis.call('ZSCORE', KEYS[6], head)) - now, string.sub(head, 3), 1
    -- A dead head was skipped while no writer holds: the new batch's turn (as lock_acquire).
    if skipped then rw_tell(KEYS[5], KEYS[6], KEYS[7], now, #readers / 2, true, ARGV[4]) end
  elseif reader then
    wait, who = last - now, reader
  end
end
if not who then
  redis.call('ZREM', KEYS[5], me)
  redis.call('ZREM', KEYS[6], me)
  redis.call('ZREM', KEYS[7], me)
  local tok = next_token(KEYS[2])
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'n', 1, 't', tok)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tok, 1}
end
local place, lead = -1, 0
if tonumber(ARGV[3]) > 0 then
  join(KEYS[5], KEYS[6], me, now, ARGV[3])
  redis.call('ZADD', KEYS[7], 'NX', redis.call('ZSCORE', KEYS[5], me), me)
  keep_for(KEYS[7], ARGV[3])
  place = redis.call('ZRANK', KEYS[5], me)
  if turn == 0 and (place == 0 or upgrade) then lead = 1 end
end
return {0, wait, who, place, turn, lead}
"""
)

RW_WRITE_RELEASE = (
    _RW
    + r"""
-- KEYS[1] hold hash  [2] readers  [3] queue  [4] entry leases  [5] queued writers.
-- ARGV as lock_release: owner, channel, '1' = every re-entry, token or ''.
-- Reply: as lock_release; a release names the next batch (or 'r' when nobody queues).
local owner = redis.call('HGET', KEYS[1], 'o')
if not owner then return {0, false} end
if owner ~= ARGV[1] then return {-1, owner} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 't') ~= ARGV[4] then return {-1, owner} end
local n = 0
if ARGV[3] ~= '1' then n = redis.call('HINCRBY', KEYS[1], 'n', -1) end
if n > 0 then return {1, n} end
redis.call('DEL', KEYS[1])
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
rw_tell(KEYS[3], KEYS[4], KEYS[5], now, redis.call('ZCARD', KEYS[2]), true, ARGV[2])
tell_anyone(KEYS[3], ARGV[2])
return {1, 0}
"""
)

RW_READ_RELEASE = (
    _RW
    + r"""
-- KEYS[1] readers  [2] writer hold  [3] queue  [4] entry leases  [5] queued writers.
-- ARGV[1] owner  [2] channel.  Reply: 1 released, 0 it had lapsed.  The last reader out names
-- the head writer; queued readers are not named here (no read hold ever keeps them out).
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local now = server_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('EXISTS', KEYS[2]) == 0 then
  local left = redis.call('ZCARD', KEYS[1])
  rw_tell(KEYS[3], KEYS[4], KEYS[5], now, left, false, ARGV[2])
  if left == 1 then  -- the only reader left may be waiting to upgrade
    local up = 'w:' .. redis.call('ZRANGE', KEYS[1], 0, 0)[1]
    if redis.call('ZSCORE', KEYS[3], up) then notify(ARGV[2], up) end
  end
end
tell_anyone(KEYS[3], ARGV[2])
return 1
"""
)

RW_LEAVE = (
    _RW
    + r"""
-- A waiter gives up.  KEYS as rw_read_release.  ARGV[1] entry ('r:' or 'w:' .. owner)
-- [2] channel.  When no writer holds, the batch this entry held up is named: a writer that
-- leaves lets the readers behind it in (or the next writer); a reader at the head lets the
-- head writer in once no reader holds.  Reply: 1 left the queue, 0 was not in it.
local was_head = redis.call('ZRANK', KEYS[3], ARGV[1]) == 0
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
local writer = string.sub(ARGV[1], 1, 2) == 'w:'
if (was_head or writer) and redis.call('EXISTS', KEYS[2]) == 0 then
  local now = server_ms()
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  rw_tell(KEYS[3], KEYS[4], KEYS[5], now, redis.call('ZCARD', KEYS[1]), writer, ARGV[2])
end
return 1
"""
)

ZSET_RENEW = (
    _LOCK_PRELUDE
    + r"""
-- KEYS[1] zset.  ARGV[1] member  [2] lease ms  [3] (optional) how much longer than the lease
-- the zset itself is kept, ms (a Semaphore's permits: PERMITS_OUTLIVE_MS).  Reply: 1 renewed,
-- 0 lapsed (reaped or gone).
local now = server_ms()
local dl = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not dl or tonumber(dl) <= now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
keep_for(KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3] or '0'))
return 1
"""
)

# How long a Semaphore's permits zset outlives the last lease in it: the longest entry lease of
# a queued waiter (flows.queue_lease, 5 s).  A permit whose lease ran out is noticed by the call
# that reaps it (ZREMRANGEBYSCORE), and only that call names the waiters whose turn it makes (no
# release is published for it).  Were the zset to expire with its last lease, a head that
# wakes just after it (all the permits lapsed together: a crashed holder of several) would
# find no key, reap nothing and name nobody: the waiters behind it would learn of their turn
# at their refresh only.  Kept this long, the lapse is still there to reap for every live
# waiter's next call (each calls again within its entry lease).
PERMITS_OUTLIVE_MS = 5000

_SEM = (
    _LOCK_PRELUDE
    + _QUEUE
    + _QUEUES
    + f"""
local PERMITS_OUTLIVE_MS = {PERMITS_OUTLIVE_MS}
"""
)

SEM_ACQUIRE = (
    _SEM
    + r"""
-- KEYS[1] permits zset (member permit id, score lease deadline)  [2] permit count  [3] queue
-- [4] entry leases.  ARGV[1] permit id  [2] lease ms  [3] permits  [4] entry lease ms ('0':
-- try once, do not queue)  [5] channel.
-- Reply: {1} granted; {0, ms to wait at most, who, place, turn, lead}: turn 0 = every permit is
-- held, 1 = the free permits are queued waiters' (who: the first); lead 1 = this waiter is the
-- first one not entitled: the next permit whose lease runs out is its (it waits for that, not
-- only for a message); error SEMLIMIT when this client's permit count differs from the one
-- recorded.
local have = redis.call('GET', KEYS[2])
if have and have ~= ARGV[3] then
  return redis.error_reply('SEMLIMIT the semaphore has ' .. have .. ' permits, not ' .. ARGV[3])
end
if not have then redis.call('SET', KEYS[2], ARGV[3]) end
local now = server_ms()
local reaped = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[3]) - redis.call('ZCARD', KEYS[1])
-- The first `free` live waiters may take the free permits (a newcomer only what they leave);
-- one more is read: the waiter that leads once those are in.
local first, skipped = heads(KEYS[3], KEYS[4], false, now, free + 1)
local mine = false
for i = 1, math.min(free, #first) do if first[i] == ARGV[1] then mine = true end end
if not mine and free > #first and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then mine = true end
-- Permits whose lease ran out (a holder died) were found here, or a dead waiter dropped: no
-- release will tell the waiters whose turn that makes, nor the new lead; this call does.
if reaped > 0 or skipped then
  for _, m in ipairs(first) do if m ~= ARGV[1] then notify(ARGV[5], m) end end
end
if mine then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  keep_for(KEYS[1], tonumber(ARGV[2]) + PERMITS_OUTLIVE_MS)  -- lapses stay visible: see above
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return {1}
end
local place = -1
if tonumber(ARGV[4]) > 0 then
  join(KEYS[3], KEYS[4], ARGV[1], now, ARGV[4])
  place = redis.call('ZRANK', KEYS[3], ARGV[1])
end
local lead = 0
if place == free then lead = 1 end
local wait, who, turn = false, '', 0
local held = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #held > 0 then wait = tonumber(held[2]) - now end
if free > 0 then
  who, turn = first[1], 1
  local entry = tonumber(redis.call('ZSCORE', KEYS[4], first[1])) - now
  if not wait or entry < wait then wait = entry end
end
return {0, wait, who, place, turn, lead}
"""
)

SEM_RELEASE = (
    _SEM
    + r"""
-- KEYS[1] permits  [2] permit count  [3] queue  [4] entry leases.  ARGV[1] permit id
-- [2] channel.  Reply: 1 released, 0 it had lapsed.  Either way the waiters whose turn the
-- free permits make are named: the first `free` live waiters, less those that were entitled
-- (and named) before this call; 'r' when nobody queues (clients from before the queue).
local gone = redis.call('ZREM', KEYS[1], ARGV[1])
local now = server_ms()
local freed = gone + redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(redis.call('GET', KEYS[2]) or '0') - redis.call('ZCARD', KEYS[1])
if free > 0 and freed > 0 then
  local first, skipped = heads(KEYS[3], KEYS[4], false, now, free)
  local from = 1
  if not skipped then from = free - freed + 1 end
  for i = math.max(from, 1), #first do notify(ARGV[2], first[i]) end
end
tell_anyone(KEYS[3], ARGV[2])
return gone
"""
)

SEM_LEAVE = (
    _SEM
    + r"""
-- A waiter gives up.  KEYS as sem_release.  ARGV[1] permit id  [2] channel.  When it was one
-- of the waiters entitled to a free permit, the next one is named in its place.  When this call
-- reaps permits whose lease ran out, it names the waiters whose turn that makes and the new
-- lead, as sem_acquire does: no release tells them, and the next call finds nothing to reap.
-- Reply: 1 left the queue, 0 was not in it.
local rank = redis.call('ZRANK', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
local now = server_ms()
local reaped = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(redis.call('GET', KEYS[2]) or '0') - redis.call('ZCARD', KEYS[1])
if reaped > 0 then
  for _, m in ipairs((heads(KEYS[3], KEYS[4], false, now, free + 1))) do notify(ARGV[2], m) end
elseif rank < free then
  local first, skipped = heads(KEYS[3], KEYS[4], false, now, free)
  if skipped then
    for _, m in ipairs(first) do notify(ARGV[2], m) end
  elseif #first >= free then
    notify(ARGV[2], first[free])  -- the waiter now entitled in its place
  end
end
return 1
"""
)

FENCE_NEXT = (
    _LOCK_PRELUDE
    + r"""
-- KEYS[1] fence counter.  Reply: the next token (a Redlock fenced on its authority).
return next_token(KEYS[1])
"""
)

REDLOCK_RELEASE = r"""
-- One Redlock node.  KEYS[1] lock key.  ARGV[1] owner.  Reply: 1 deleted, 0 not this owner's.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

REDLOCK_EXTEND = r"""
-- One Redlock node.  KEYS[1] lock key.  ARGV[1] owner  [2] lease ms.  Reply: 1 extended, 0 not.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

ALL = {
    "set": SET, "delete": DELETE, "mset": MSET, "clear": CLEAR, "probe": PROBE,
    "lock_acquire": LOCK_ACQUIRE, "lock_release": LOCK_RELEASE, "lock_renew": LOCK_RENEW,
    "lock_leave": LOCK_LEAVE,
    "rw_read": RW_READ, "rw_write": RW_WRITE, "rw_write_release": RW_WRITE_RELEASE,
    "rw_read_release": RW_READ_RELEASE, "rw_leave": RW_LEAVE, "zset_renew": ZSET_RENEW,
    "sem_acquire": SEM_ACQUIRE, "sem_release": SEM_RELEASE, "sem_leave": SEM_LEAVE,
    "fence_next": FENCE_NEXT,
    "redlock_release": REDLOCK_RELEASE, "redlock_extend": REDLOCK_EXTEND,
}  # fmt: skip

SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in ALL.items()}  # noqa: S324
"""Each script's SHA-1, the name Redis knows it by (EVALSHA)."""
