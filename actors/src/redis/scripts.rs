//! The Lua scripts that make each step on Redis atomic, and how their replies read.
//!
//! Every script touches the keys of one user only (one hash slot), except `HEARTBEAT`, which
//! touches the node table only.

use redis::Script;
use std::sync::LazyLock;

/// Appends one event: checks its run is still running and still this node's (a lost node's
/// runs are taken over and ended by another node, and a late event of theirs must not follow
/// that end), skips a retry of an event already appended (each event of a run has an index;
/// one that skips ahead of the next index is refused, for the writer to send its batch again
/// in order), numbers it from the meta
/// hash, adds it to the stream as `<seq>-0`, trims the stream's oldest entries to the count
/// and byte bounds (`--replay-capacity`, `--replay-user-max-bytes`: one user cannot fill
/// Redis; the newest entry always stays), refreshes the TTLs, updates
/// the run record and publishes it with its node, epoch and seq (the appending node has the
/// frame from the reply, and skips its own copy). About eight commands per event. The meta
/// hash is only bumped once the entry is in, so no seq is ever given out without its event (a
/// false gap). A stream that is ahead of the meta hash (a failover kept one and not the other)
/// starts a new epoch.
///
/// KEYS: meta, log, running, run. ARGV: 1 epoch if none, 2 run id, 3 kind, 4 emitted (us),
/// 5 tail, 6 maxlen, 7 log ttl (ms), 8 meta ttl (ms), 9 index, 10 tool call id, 11 tool,
/// 12 end status, 13 channel, 14 this node, 15 run record ttl (ms), 16 user, 17 max bytes,
/// 18 this process.
/// Replies `{"ok", epoch, seq}`, `{"dup"}`, `{"early"}` or `{"ended"}`.
pub static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local meta, log, running, run = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local index = tonumber(ARGV[9])
local r = redis.call('HMGET', run, 'status', 'node', 'n')
local status, n = r[1], tonumber(r[3] or '0')
if not status then
  -- Its record went with Redis's data: the run goes on, in the new history. (A record of an
  -- ended run expires only long after its end: see TAKE and the run ttl.)
  redis.call('HSET', run, 'status', 'running', 'node', ARGV[14], 'n', 0, 'user', ARGV[16],
    'proc', ARGV[18])
  redis.call('SADD', running, ARGV[2])
  redis.call('PEXPIRE', running, ARGV[15])
  status, n = 'running', 0
elseif r[2] ~= ARGV[14] then
  return {'ended'}
end
if status ~= 'running' then return {'ended'} end
if index <= n then return {'dup'} end
if index > n + 1 then return {'early'} end
local m = redis.call('HMGET', meta, 'epoch', 'top', 'bytes')
local epoch = m[1] or ARGV[1]
local seq = tonumber(m[2] or '0') + 1
if seq == 1 then redis.call('DEL', log) end
local added = redis.pcall('XADD', log, seq .. '-0',
  'r', ARGV[2], 'k', ARGV[3], 't', ARGV[4], 'b', ARGV[5])
if type(added) == 'table' and added.err then
  -- Anything but "the stream is ahead of the meta hash" (OOM, say) changes nothing here.
  if not string.find(added.err, 'equal or smaller', 1, true) then
    return redis.error_reply(added.err)
  end
  -- The stream is ahead of the meta hash: this history cannot be trusted; a new one.
  redis.call('DEL', log)
  epoch = ARGV[1]
  seq = 1
  redis.call('XADD', log, '1-0', 'r', ARGV[2], 'k', ARGV[3], 't', ARGV[4], 'b', ARGV[5])
end
-- The stream's bytes live in the meta hash, counted as a node's window counts the same
-- frame (its text, `{"type":"K","seq":N,` and the tail's body, plus 96), so that what the
-- stream keeps fits a window; a new (or expired) stream holds only this entry.
local function frame_cost(tail, kind, n)
  return string.len(tail) + string.len(kind) + string.len(tostring(n)) + 17 + 96
end
local cost = frame_cost(ARGV[5], ARGV[3], seq)
local len = redis.call('XLEN', log)
local bytes = cost
if len > 1 then bytes = tonumber(m[3] or '0') + cost end
local maxlen, maxbytes = tonumber(ARGV[6]), tonumber(ARGV[17])
while len > 1 and (len > maxlen or bytes > maxbytes) do
  local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  if not oldest then break end
  local f, body, k = oldest[2], '', ''
  for i = 1, #f, 2 do
    if f[i] == 'b' then body = f[i + 1] elseif f[i] == 'k' then k = f[i + 1] end
  end
  local c = frame_cost(body, k, string.match(oldest[1], '^%d+'))
  redis.call('XDEL', log, oldest[1])
  bytes = bytes - c
  len = len - 1
end
redis.call('HSET', meta, 'epoch', epoch, 'top', seq, 'bytes', bytes)
-- The TTLs run from the user's latest event; refreshed at most about once a second.
if len == 1 or redis.call('PTTL', log) < tonumber(ARGV[7]) - 1000 then
  redis.call('PEXPIRE', log, ARGV[7])
  redis.call('PEXPIRE', meta, ARGV[8])
end
local kind = ARGV[3]
if n == 0 then
  redis.call('HSET', run, 'n', index, 'last', seq, 'first', seq)
else
  redis.call('HSET', run, 'n', index, 'last', seq)
end
if kind == 'tool_executing' then
  redis.call('HSET', run, 'open:' .. ARGV[10], ARGV[11])
  redis.call('HINCRBY', run, 'calls', 1)
elseif kind == 'tool_completed' then
  redis.call('HDEL', run, 'open:' .. ARGV[10])
elseif kind == 'agent_completed' then
  redis.call('HSET', run, 'status', ARGV[12], 'ended', ARGV[4])
  redis.call('SREM', running, ARGV[2])
  if redis.call('PTTL', run) < tonumber(ARGV[15]) then redis.call('PEXPIRE', run, ARGV[15]) end
end
redis.call('PUBLISH', ARGV[13], ARGV[14] .. '\n' ..
  epoch .. '\n' .. seq .. '\n' .. ARGV[2] .. '\n' .. kind .. '\n' .. ARGV[4] .. '\n' .. ARGV[5])
return {'ok', epoch, seq}
"#,
    )
});

/// Starts a run if the user's limits allow: `--max-runs-per-user` over every node (the
/// running set) and `--runs-per-minute` (a token bucket on Redis's clock), then writes its
/// record.
///
/// KEYS: running, starts, run. ARGV: 1 max runs, 2 runs per minute, 3 run id, 4 node,
/// 5 agent, 6 thread id (empty: none), 7 user, 8 record ttl (ms), 9 this process.
/// Replies `{"ok"}`, `{"too_many"}` or `{"rate", retry_after_ms}`.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {'too_many'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[2], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * cap / 60000)
if tokens < 1 then return {'rate', math.ceil((1 - tokens) * 60000 / cap)} end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'at', now)
redis.call('PEXPIRE', KEYS[2], 120000)
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('HSET', KEYS[3], 'user', ARGV[7], 'node', ARGV[4], 'agent', ARGV[5],
  'thread', ARGV[6], 'status', 'running', 'started', now, 'n', 0, 'proc', ARGV[9])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
return {'ok'}
"#,
    )
});

/// A lost node's run, taken over by the node that ends it: only if it is still running on
/// the lost node, atomically with reading what ending it takes (the index of its last event
/// and its open calls), so the lost node, should it still be writing, is refused from now
/// on. The record then lives as long as the user's epoch: a node cut off for long that comes
/// back still finds its run ended.
///
/// KEYS: run. ARGV: 1 lost node, 2 this node, 3 ttl (ms), 4 this process, 5 least age (ms):
/// a run of this very process started more recently is left alone (it may be starting).
/// Replies the record's fields and values, or nothing.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local r = redis.call('HMGET', KEYS[1], 'status', 'node', 'started', 'proc')
if r[1] ~= 'running' or r[2] ~= ARGV[1] then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if r[4] == ARGV[4] and now - (tonumber(r[3]) or 0) < tonumber(ARGV[5]) then return {} end
redis.call('HSET', KEYS[1], 'node', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"#,
    )
});

/// Starts a new history for a user whose Redis gave out a seq twice under one epoch (it lost
/// its newest events and kept the epoch: a restart from an old snapshot, a failover to a
/// lagging replica): only if the epoch is still `old`. Every node sees the new epoch and every
/// client resuming gets `resume_gap`.
///
/// KEYS: meta, log. ARGV: 1 old epoch, 2 new epoch. Replies the epoch now.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'top', 0, 'bytes', 0)
end
return redis.call('HGET', KEYS[1], 'epoch')
"#,
    )
});

/// A user's epoch (made if there is none: a new or lost history) and newest seq.
///
/// KEYS: meta. ARGV: 1 epoch if none, 2 meta ttl (ms). Replies `{epoch, top}`.
pub static OPEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'top', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local m = redis.call('HMGET', KEYS[1], 'epoch', 'top')
return {m[1], tonumber(m[2] or '0')}
"#,
    )
});

/// The user's epoch, newest seq and up to `count` stream entries of `from..=to` (the
/// oldest of them, or with `newest` set the newest), read at one instant. Paged, so that no
/// read holds Redis up for long.
///
/// KEYS: meta, log. ARGV: 1 from, 2 to, 3 count, 4 newest (1/0).
/// Replies `{epoch or false, top, entries}`, entries in `seq` order.
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local m = redis.call('HMGET', KEYS[1], 'epoch', 'top')
local entries
if ARGV[4] == '1' then
  local newest = redis.call('XREVRANGE', KEYS[2], ARGV[2] .. '-0', ARGV[1] .. '-0', 'COUNT', ARGV[3])
  entries = {}
  for i = #newest, 1, -1 do entries[#entries + 1] = newest[i] end
else
  entries = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', ARGV[2] .. '-0', 'COUNT', ARGV[3])
end
return {m[1], tonumber(m[2] or '0'), entries}
"#,
    )
});

/// Records this node's heartbeat (Redis's clock) and lists nodes silent for longer than
/// the node timeout.
///
/// KEYS: nodes. ARGV: 1 node, 2 timeout (ms). Replies the lapsed nodes.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
"#,
    )
});

/// All scripts, to load after Redis lost them (a restart).
pub fn all() -> [&'static Script; 7] {
    [&APPEND, &CLAIM, &OPEN, &READ, &HEARTBEAT, &TAKE, &RENEW]
}
