"""The Lua scripts Redis runs (text only). Each is one atomic step on the server: nothing is
read in Python and written back, so concurrent processes cannot both take the last token.

Buckets follow proxy.admission.Limits exactly (start full, refill per_minute/60 a second, rpm
takes a token, tpm admits above zero and is overdrawn by usage), on the server's clock
(TIME), so hosts with skewed clocks agree. A key's keys share a `{name}` hash tag (one slot).

Every script first compares the key's epoch with the one the caller last saw: a Redis
restarted empty has none, and the caller must first write back what it has charged (SYNC).

Charges are idempotent. A process sends its running totals (tokens, micro-USD per period),
and Redis keeps, per process and key, the highest total it has applied (a `seen` key): only
the part above it is added. So a write whose reply was lost and is sent again, or one that
lands after a later one, adds nothing twice. A `seen` key lives SEEN_SECONDS after its last
write; one that has expired (a process idle that long) counts from what the process last had
confirmed, and one that Redis lost with everything else (another epoch) from zero.
"""

from __future__ import annotations

MISMATCH = -1  # the epoch is not the caller's: run SYNC, then try again
SEEN_SECONDS = 86_400  # far longer than any write-back; a process gone leaves nothing for long

_PREAMBLE = (
    f"local SEEN = {SEEN_SECONDS}"
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, per_minute)
  local b = redis.call('HMGET', key, 'level', 'at')
  local lvl, at = tonumber(b[1]), tonumber(b[2])
  if not lvl then return per_minute end
  return math.min(per_minute, lvl + math.max(0, now - at) * per_minute / 60)
end
local function store(key, per_minute, lvl)
  redis.call('HSET', key, 'level', string.format('%.6f', lvl), 'at', string.format('%.6f', now))
  -- kept until it would have refilled, then a missing bucket reads as full again
  local ms = math.ceil((per_minute - lvl) * 60000 / per_minute) + 1000
  redis.call('PEXPIRE', key, ms)
end
-- Raises this process's applied total at `key` to `total`; → by how much (0: seen already).
local function advance(key, total, fallback)
  local seen = tonumber(redis.call('GET', key) or fallback)
  if total <= seen then return 0 end
  redis.call('SET', key, string.format('%d', total), 'EX', SEEN)
  return total - seen
end
local function spend(key, micros, ttl)
  if micros > 0 then
    redis.call('INCRBY', key, micros)
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
"""
)

# KEYS: rpm, tpm, spend, epoch. ARGV: epoch seen, rpm, tpm, budget micro-USD (-1: none).
# → {verdict, milliseconds to wait, micro-USD spent}; verdicts as in proxy.fleet.store.
ADMIT = (
    _PREAMBLE
    + """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return {-1, 0, 0} end
local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
local budget = tonumber(ARGV[4])
if budget >= 0 and spent >= budget then return {3, 0, spent} end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local r = 0
if rpm > 0 then
  r = level(KEYS[1], rpm)
  if r < 1 then return {1, math.ceil((1 - r) * 60000 / rpm), spent} end
end
if tpm > 0 then
  local k = level(KEYS[2], tpm)
  if k <= 0 then return {2, math.ceil((1 - k) * 60000 / tpm), spent} end
end
if rpm > 0 then store(KEYS[1], rpm, r - 1) end
return {0, 0, spent}
"""
)

# KEYS: tpm, spend, epoch, tokens seen, spend seen. ARGV: epoch seen, tpm (-1: none), tokens
# total, tokens confirmed, micro-USD total (this period), micro-USD confirmed, retain seconds.
CHARGE = (
    _PREAMBLE
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local tpm = tonumber(ARGV[2])
local tokens = advance(KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]))
if tpm > 0 and tokens > 0 then store(KEYS[1], tpm, level(KEYS[1], tpm) - tokens) end
spend(KEYS[2], advance(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6])), tonumber(ARGV[7]))
return 0
"""
)

# KEYS: epoch, tpm, tokens seen, then per period: spend, spend seen. ARGV: epoch seen, a new
# epoch, tpm (-1: none), tokens total, tokens confirmed, then per period: micro-USD total,
# confirmed, retain seconds. Another epoch (or none, and then the new one is set) means Redis
# lost the state: this process's spend counts from zero, so all it charged is written again.
# → the epoch now in force.
SYNC = (
    _PREAMBLE
    + """
local epoch = redis.call('GET', KEYS[1])
local same = epoch == ARGV[1]
if not epoch then
  redis.call('SET', KEYS[1], ARGV[2])
  epoch = ARGV[2]
end
local tpm = tonumber(ARGV[3])
local tokens = advance(KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
if tpm > 0 and tokens > 0 then store(KEYS[2], tpm, level(KEYS[2], tpm) - tokens) end
for i = 4, #KEYS, 2 do
  local j = 6 + (i - 4) / 2 * 3
  local from = same and tonumber(ARGV[j + 1]) or 0
  spend(KEYS[i], advance(KEYS[i + 1], tonumber(ARGV[j]), from), tonumber(ARGV[j + 2]))
end
return epoch
"""
)

# Upstream health, shared (see proxy.fleet.health).
# KEYS: failures, cooldown. ARGV: failures that open it, cooldown ms, 1 if the attempt was a
# probe. → 1 when this opened the cooldown. While open, other processes' failures (those that
# have not learnt it yet) neither count nor extend it; a failed probe opens it again.
UPSTREAM_FAILED = """
local probe = ARGV[3] == '1'
if not probe and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 3600000)
if probe or n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', tonumber(ARGV[2]))
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: per upstream: failures, cooldown, rejects_stream_options. ARGV: per upstream, 1 if
# this process has just learnt that it rejects stream_options (sent once, so the mark
# expires after a day and the field is tried again). Marks those, then
# → per upstream {failures, cooldown ms left (<= 0: none), rejects stream_options}.
UPSTREAM_STATES = """
local out = {}
for i = 1, #KEYS, 3 do
  if ARGV[(i + 2) / 3] == '1' then redis.call('SET', KEYS[i + 2], '1', 'EX', 86400) end
  local failures = tonumber(redis.call('GET', KEYS[i]) or '0')
  local rejects = redis.call('EXISTS', KEYS[i + 2])
  table.insert(out, {failures, redis.call('PTTL', KEYS[i + 1]), rejects})
end
return out
"""
