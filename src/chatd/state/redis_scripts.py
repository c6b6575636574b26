"""The Lua scripts RedisState runs (docs/shared-state.md). Each is one atomic step, so
replicas never race on a read-modify-write; time comes from Redis (TIME), so every
replica measures the same window.

A sliding window is a sorted set (score: time in µs, member "<seq>:<amount>") with its
running total in a companion hash, so a hit costs O(expired entries), not O(window).
"""

from __future__ import annotations

from chatd.state.redis_pipe import Script, bulks

PREFIX = "chatd:"


def window_keys(key: str) -> tuple[str, str]:
    """A sliding window's sorted set and its companion hash."""
    return PREFIX + "w:" + key, PREFIX + "w:" + key + ":m"


# window(zkey, hkey, amount, limit, window_us, now) -> allowed, used, reset_us
WINDOW = """
local function window(zkey, hkey, amount, limit, window_us, now)
  local used = tonumber(redis.call('HGET', hkey, 'used') or '0')
  local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', now - window_us)
  if #old > 0 then
    for _, member in ipairs(old) do
      used = used - tonumber(string.match(member, ':(.*)$'))
    end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - window_us)
    if used < 0 then used = 0 end
  end
  local allowed
  if limit <= 0 then allowed = true
  elseif amount > 0 then allowed = used + amount <= limit
  else allowed = used < limit end
  if allowed and amount > 0 then
    local seq = redis.call('HINCRBY', hkey, 'seq', 1)
    redis.call('ZADD', zkey, now, seq .. ':' .. string.format('%.17g', amount))
    used = used + amount
  end
  local reset = 0
  local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  if #first > 0 then
    reset = tonumber(first[2]) + window_us - now
    redis.call('HSET', hkey, 'used', string.format('%.17g', used))
    local ttl = math.ceil(window_us / 1000) + 1000
    redis.call('PEXPIRE', zkey, ttl)
    redis.call('PEXPIRE', hkey, ttl)
  else
    redis.call('DEL', zkey, hkey)
    used = 0
  end
  return allowed, used, reset
end

local function add(key, amount, ttl_ms)
  local value = redis.call('INCRBYFLOAT', key, amount)
  if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ttl_ms) end
  return value
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS: zset, hash; ARGV: amount, limit, window_us -> {allowed, used, reset_us}
WINDOW_HIT = Script(
    WINDOW
    + """
local allowed, used, reset = window(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                    tonumber(ARGV[3]), now)
return {allowed and 1 or 0, string.format('%.17g', used), string.format('%.17g', reset)}
"""
)

# KEYS: counter; ARGV: amount, ttl_ms -> the new value. The first add fixes the expiry.
ADD = Script(WINDOW + "\nreturn add(KEYS[1], ARGV[1], ARGV[2])\n")

# KEYS: counter; ARGV: value, ttl_ms. Up to `value` if below it, atomically (replicas
# bringing a restarted Redis up to the ledger's spend at once never add it twice).
RAISE_TO = Script(
    WINDOW
    + """
local missing = tonumber(ARGV[1]) - tonumber(redis.call('GET', KEYS[1]) or '0')
if missing > 0 then add(KEYS[1], string.format('%.17g', missing), ARGV[2]) end
return 1
"""
)

# Admission: every limit of a caller, checked and counted in one step.
# KEYS: rpm zset, rpm hash, tpm zset, tpm hash, spend counter[, cache blob, cache lock]
# ARGV: rpm, tpm, budget (0: none), window_us, count (1: count a request if all allow)
# [, lock ttl_ms]
# -> "spent tpm_allowed tpm_used tpm_reset_us rpm_allowed rpm_used rpm_reset_us": one
# string, not an array, so the client reads one reply instead of eight. With the cache's
# two keys, a request admitted also asks the cache (GET_OR_CLAIM's question, in the same
# round trip: docs/shared-state.md): " =<blob>", " +" (claimed) or " -" (held) follows.
ADMIT = Script(
    WINDOW
    + """
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window_us, count = tonumber(ARGV[4]), ARGV[5] == '1'
local spent = 0
if budget > 0 then spent = tonumber(redis.call('GET', KEYS[5]) or '0') end
if budget > 0 and spent >= budget then count = false end
local ta, tu, tr = true, 0, 0
if tpm > 0 then
  ta, tu, tr = window(KEYS[3], KEYS[4], 0, tpm, window_us, now)
  if not ta then count = false end
end
local ra, ru, rr = true, 0, 0
if rpm > 0 then ra, ru, rr = window(KEYS[1], KEYS[2], count and 1 or 0, rpm, window_us, now) end
local f = '%.17g'
local admitted = table.concat({string.format(f, spent), ta and 1 or 0, string.format(f, tu),
                               string.format(f, tr), ra and 1 or 0, string.format(f, ru),
                               string.format(f, rr)}, ' ')
if #KEYS < 7 or not (count and ra) then return admitted end
local value = redis.call('GET', KEYS[6])
if value then return admitted .. ' =' .. value end
if redis.call('SET', KEYS[7], '1', 'PX', ARGV[6], 'NX') then return admitted .. ' +' end
return admitted .. ' -'
"""
)

# The writes behind requests, all of a batch in one step.
# ARGV[1..5]: how many windows, adds, flags, blobs, releases; then, in that order,
# windows: KEYS zset, hash / ARGV amount, window_us; adds: KEYS counter / ARGV amount,
# ttl_ms; flags: KEYS flag / ARGV ttl_ms; blobs: KEYS blob / ARGV value, ttl_ms;
# releases: KEYS lock.
FLUSH = Script(
    WINDOW
    + """
local k, a = 1, 6
for _ = 1, tonumber(ARGV[1]) do
  window(KEYS[k], KEYS[k + 1], tonumber(ARGV[a]), 0, tonumber(ARGV[a + 1]), now)
  k, a = k + 2, a + 2
end
for _ = 1, tonumber(ARGV[2]) do
  add(KEYS[k], ARGV[a], ARGV[a + 1])
  k, a = k + 1, a + 2
end
for _ = 1, tonumber(ARGV[3]) do
  redis.call('SET', KEYS[k], '1', 'PX', ARGV[a])
  k, a = k + 1, a + 1
end
for _ = 1, tonumber(ARGV[4]) do
  redis.call('SET', KEYS[k], ARGV[a], 'PX', ARGV[a + 1])
  k, a = k + 1, a + 2
end
for _ = 1, tonumber(ARGV[5]) do
  redis.call('DEL', KEYS[k])
  k = k + 1
end
return 1
"""
)

# KEYS: blob, lock; ARGV: lock ttl_ms -> "=" .. blob (stored), "+" (claimed), "-" (held)
GET_OR_CLAIM = Script(
    """
local value = redis.call('GET', KEYS[1])
if value then return '=' .. value end
if redis.call('SET', KEYS[2], '1', 'PX', ARGV[1], 'NX') then return '+' end
return '-'
"""
)

# KEYS: flags -> each one's milliseconds left (<= 0: down). The cooldown mirror's read.
PTTLS = Script(
    """
local left = {}
for i, key in ipairs(KEYS) do left[i] = redis.call('PTTL', key) end
return left
"""
)


class Admissions:
    """ADMIT's EVALSHA in RESP, the keys' part made once per caller and period."""

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str, str, bool], bytes] = {}

    def command(
        self,
        rpm: tuple[str, float] | None,
        tpm: tuple[str, float] | None,
        budget: tuple[str, float] | None,
        window_us: int,
        count: bool,
        claim: tuple[str, str] | None = None,
        lock_ms: int = 0,
    ) -> bytes:
        """`claim`: the cache's blob and lock keys (prefixed), asked in the same script."""
        names = (rpm[0] if rpm else "", tpm[0] if tpm else "", budget[0] if budget else "")
        head = self._heads.get((*names, claim is not None))
        if head is None:
            if len(self._heads) > 10_000:  # periods roll over: forget the old ones
                self._heads.clear()
            keys = [*window_keys(names[0]), *window_keys(names[1]), PREFIX + "n:" + names[2]]
            if claim is None:
                head = b"*13\r\n" + bulks([b"EVALSHA", ADMIT.sha, 5, *keys])
            else:  # the cache's two keys follow, then the six arguments
                head = b"*16\r\n" + bulks([b"EVALSHA", ADMIT.sha, 7, *keys])
            self._heads[(*names, claim is not None)] = head
        args = [
            rpm[1] if rpm else 0,
            tpm[1] if tpm else 0,
            repr(float(budget[1])) if budget else 0,
            window_us,
            1 if count else 0,
        ]
        if claim is None:
            return head + bulks(args)
        return head + bulks([*claim, *args, lock_ms])
