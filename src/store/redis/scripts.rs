//! The Lua scripts: each store operation that reads then writes is one script,
//! so Redis runs it atomically, and each touches only `KEYS[1]` (Cluster-safe).

use std::sync::LazyLock;

use redis::Script;

/// What a key holds, for `begin` and `get`: `{value, pttl}`, with an empty
/// value (which decodes as corrupt) for a key of another Redis type.
macro_rules! answer_held {
    () => {
        r"
local value = ''
if kind == 'string' then value = redis.call('GET', KEYS[1]) end
return {value, redis.call('PTTL', KEYS[1])}
"
    };
}

/// Whether the key holds the marker whose first 20 bytes are `ARGV[1]`.
macro_rules! held {
    () => {
        r"
local function held()
  local value = redis.pcall('GET', KEYS[1])
  return type(value) == 'string' and string.sub(value, 1, 20) == ARGV[1]
end
"
    };
}

/// `ARGV[1]` marker, `ARGV[2]` lease TTL in ms. Answers 1 when it wrote the
/// marker, else `{value, pttl}`.
pub(super) static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
",
        answer_held!()
    ))
});

/// Answers 0 for a missing key, else `{value, pttl}`.
pub(super) static GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return 0 end
",
        answer_held!()
    ))
});

/// `ARGV[1]` lease prefix, `ARGV[2]` lease TTL in ms.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held!(),
        r"
if held() then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"
    ))
});

/// `ARGV[1]` lease prefix, `ARGV[2]` encoded record, `ARGV[3]` TTL in ms,
/// `ARGV[4]` the channel that announces the change to waiting instances.
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held!(),
        r"
if held() then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('PUBLISH', ARGV[4], KEYS[1])
  return 1
end
return 0
"
    ))
});

/// `ARGV[1]` lease prefix, `ARGV[2]` the channel that announces the change.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        held!(),
        r"
if held() then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], KEYS[1])
  return 1
end
return 0
"
    ))
});

/// `ARGV[1]` the marker's magic. Deletes the key unless it holds a marker
/// (in one step, so no marker written meanwhile is deleted): answers 1 when
/// it deleted a value, 2 for a marker left in place, 0 for a missing key.
pub(super) static REMOVE_UNLESS_IN_FLIGHT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return 0 end
if kind == 'string' and redis.call('GETRANGE', KEYS[1], 0, 2) == ARGV[1] then return 2 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});
