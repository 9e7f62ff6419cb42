//! The dispatcher lease of one queue: at most one dispatcher leads a queue at a time.
//!
//! Keys (all under the queue's hash tag):
//! - `egress-scaler:{q}:leader`: STRING, the holder's id, with a `PX` expiry of the lease time;
//! - `egress-scaler:{q}:leader_since`: STRING, when the holder acquired it (ms), same expiry;
//! - `egress-scaler:{q}:fence`: STRING, the fencing counter, `INCR`ed on every acquisition.
//!
//! The counter's value at acquisition is the holder's fencing token. Every dispatcher write to
//! the queue carries it and the transition scripts refuse a token that is no longer current
//! (see `QueueStore::fenced`), so a dispatcher that stalled past its lease (a long pause, a
//! partition) cannot change a ticket after a newer dispatcher took over. The holder also stops
//! by itself when it could not renew within the lease time, measured from before its last
//! successful call, which is never later than Redis's own expiry.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use crate::queue::{QueueError, QueueName, QueueStore};

/// KEYS: 1 leader, 2 fence, 3 leader_since. ARGV: 1 holder, 2 lease (ms), 3 now (ms).
/// Returns {1, token} when acquired, {0, holder} when someone holds it.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder then
  return {0, holder}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
",
    )
});

/// KEYS as ACQUIRE. ARGV: 1 holder, 2 lease (ms), 3 token. Returns 1 when still held.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
",
    )
});

/// KEYS as ACQUIRE. ARGV: 1 holder, 2 token. Returns 1 when it was held and is now free.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[3])
return 1
",
    )
});

/// KEYS as ACQUIRE. Returns {holder or false, since or false, remaining ms, fence or false}.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[3]), redis.call('PTTL', KEYS[1]),
  redis.call('GET', KEYS[2])}
",
    )
});

/// Who leads a queue, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The holder's id.
    pub holder: String,
    /// When it acquired the lease (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Time left before the lease expires unless renewed (ms).
    pub expires_in_ms: u64,
    /// The current fencing token.
    pub fence: Option<u64>,
}

/// A held lease.
#[derive(Debug, Clone)]
pub struct Lease {
    store: QueueStore,
    queue: QueueName,
    holder: String,
    token: u64,
    ttl: Duration,
}

fn keys(queue: &QueueName) -> [String; 3] {
    let prefix = queue.key_prefix();
    [
        format!("{prefix}leader"),
        format!("{prefix}fence"),
        format!("{prefix}leader_since"),
    ]
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(format!("unexpected {what}: {error}"))
}

impl Lease {
    /// Takes the lease of `queue` for `holder` if nobody holds it; `None` when someone does.
    pub async fn acquire(
        store: &QueueStore,
        queue: &QueueName,
        holder: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<Option<Lease>, QueueError> {
        let [leader, fence, since] = keys(queue);
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation
            .key(leader)
            .key(fence)
            .key(since)
            .arg(holder)
            .arg(millis(ttl))
            .arg(now_ms);
        let reply = store.run_script(&invocation).await?;
        let (acquired, value): (i64, Value) =
            redis::from_redis_value(reply).map_err(|e| corrupt("lease reply", e))?;
        if acquired != 1 {
            return Ok(None);
        }
        let token: u64 = redis::from_redis_value(value).map_err(|e| corrupt("fence", e))?;
        Ok(Some(Lease {
            store: store.clone(),
            queue: queue.clone(),
            holder: holder.to_owned(),
            token,
            ttl,
        }))
    }

    /// The fencing token of this lease.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The lease time.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Extends the lease by its full time; false when it is no longer held.
    pub async fn renew(&self) -> Result<bool, QueueError> {
        let [leader, fence, since] = keys(&self.queue);
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(leader)
            .key(fence)
            .key(since)
            .arg(&self.holder)
            .arg(millis(self.ttl))
            .arg(self.token);
        let reply = self.store.run_script(&invocation).await?;
        let held: i64 = redis::from_redis_value(reply).map_err(|e| corrupt("renew reply", e))?;
        Ok(held == 1)
    }

    /// Gives the lease up so that a standby takes over at once; false when it was not held.
    pub async fn release(&self) -> Result<bool, QueueError> {
        let [leader, fence, since] = keys(&self.queue);
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(leader)
            .key(fence)
            .key(since)
            .arg(&self.holder)
            .arg(self.token);
        let reply = self.store.run_script(&invocation).await?;
        let released: i64 =
            redis::from_redis_value(reply).map_err(|e| corrupt("release reply", e))?;
        Ok(released == 1)
    }
}

/// The current leader of `queue`, if any.
pub async fn read_leader(
    store: &QueueStore,
    queue: &QueueName,
) -> Result<Option<LeaderInfo>, QueueError> {
    let [leader, fence, since] = keys(queue);
    let mut invocation = READ.prepare_invoke();
    invocation.key(leader).key(fence).key(since);
    let reply = store.run_script(&invocation).await?;
    let (holder, since, ttl, fence): (Option<String>, Option<u64>, i64, Option<u64>) =
        redis::from_redis_value(reply).map_err(|e| corrupt("leader", e))?;
    Ok(holder.map(|holder| LeaderInfo {
        holder,
        since_ms: since,
        expires_in_ms: u64::try_from(ttl).unwrap_or(0),
        fence,
    }))
}
