//! The durable FIFO queue of egress requests in Redis (DESIGN.md 5), with de-duplication.
//!
//! Every change is one Lua script (`src/queue/*.lua`) that checks the ticket's current state
//! first and changes nothing when the state is wrong, and every key of queue `q` starts with
//! `egress-scaler:{q}:` so that all of them live in one Redis Cluster slot.
//!
//! # Single Redis, Redis Cluster or Redis Sentinel
//!
//! A `redis+sentinel://` or `rediss+sentinel://` URL (the `sentinel` module has its form)
//! names sentinels instead: the store connects to the primary they name, asks them again in the
//! background when a call finds it gone, silent or demoted, and confirms each queue script with
//! `WAIT` on the replicas (see the README's "Redis Sentinel"). Otherwise:
//!
//! The URL names one node, and [`QueueStore::connect`] asks it `INFO cluster`. With
//! `cluster_enabled:1` the store uses the redis crate's async cluster client, seeded with
//! that node and every node its `CLUSTER SLOTS` names (so that a new connection finds the
//! cluster without the URL's node); otherwise it keeps one connection to that node, as
//! before. The server says what it is: no URL scheme or setting of our own, a one-node
//! cluster works, and a Redis that renames or denies INFO is taken for a single node.
//! Decided once, at connect time.
//!
//! In cluster mode every command goes to the node of its key's slot, and a script to the
//! node of its first key (`EVALSHA`; on `NOSCRIPT`, `SCRIPT LOAD` on every node, then
//! `EVALSHA` again); the keys a script builds share the queue's hash tag, hence its slot.
//! `egress-scaler:queues` is in another slot, but only single-key commands touch it. A
//! timed-out call replaces the cluster connection, in the background, so that one silent
//! node does not hold up the queues of the others. Classic `PUBLISH` reaches every node of
//! a cluster, so [`run_event_listener`] subscribes on one node, and on another when that
//! one goes away.
//!
//! # Redis keys
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `egress-scaler:queues` | SET | names of the queues ever enqueued to |
//! | `egress-scaler:{q}:pending` | ZSET | queued ticket ids scored by their enqueue sequence number: the FIFO. `ZCARD` is the depth (KEDA's own redis scaler can read it) |
//! | `egress-scaler:{q}:seq` | STRING | the enqueue sequence counter (`INCR`) |
//! | `egress-scaler:{q}:ticket:<id>` | HASH | one ticket (fields below); expires `finished_ttl` after it ends, fails or is cancelled |
//! | `egress-scaler:{q}:dedup` | HASH | dedup key -> id of the queued, dispatching or active ticket holding it |
//! | `egress-scaler:{q}:demand` | HASH | kind -> tickets not started yet (queued + dispatching); `GetMetrics` reads it with the recent starts ([`QueueStore::scaling_input`]) |
//! | `egress-scaler:{q}:queued` | HASH | kind -> queued tickets |
//! | `egress-scaler:{q}:dispatching` | ZSET | ids of tickets being started, scored by claim time |
//! | `egress-scaler:{q}:active` | ZSET | ids of recording tickets, scored by start time |
//! | `egress-scaler:{q}:dead` | ZSET | ids of failed tickets (dead letters), scored by failure time; the newest 10,000, none older than `finished_ttl` |
//! | `egress-scaler:{q}:egress` | HASH | LiveKit egress id -> id of its active ticket |
//! | `egress-scaler:{q}:recorded:<egress id>` | STRING | the ticket the egress was recorded for, kept `finished_ttl`: an egress is never adopted by a second ticket |
//! | `egress-scaler:{q}:egress_over:<egress id>` | HASH | `state`, `error` of an egress whose end was reported before its start was recorded; 15 minutes |
//! | `egress-scaler:{q}:arrivals:<kind>:<week>` | STRING | pre-warm's arrival counters (`crate::prewarm`): 10,080 saturating `u16` (`BITFIELD`), one per minute of week `<week>` since the epoch; 20,160 bytes; expires three weeks after the week began |
//! | `egress-scaler:{q}:arrivals:kinds` | SET | the kinds that have arrival counters |
//! | `egress-scaler:{q}:room:<room name>` | SET | ids of the queued tickets of one room |
//! | `egress-scaler:{q}:events` | pub/sub channel | the queue name is published on every change (classic `PUBLISH`: every node of a cluster hears it) |
//! | `egress-scaler:{q}:fence` | STRING | the dispatcher lease's fencing counter (`INCR` on each acquisition, see `dispatch::lease`) |
//! | `egress-scaler:{q}:webhook:<delivery>` | STRING | a webhook delivery acted on ([`DeliveryId`]), for 10 minutes |
//! | `egress-scaler:{q}:held:<digest>` | STRING | the ticket a Twirp front door caller was told to call again for (`queue::held`), for 2 minutes |
//!
//! Ticket hash fields: `state`, `kind`, `room`, `request` (optional, the LiveKit request
//! verbatim), `dedup`, `digest` (SHA-256 of kind, room and request: what "the same request"
//! means), `seq` (enqueue sequence number), `enqueued_at`; `attempt` and
//! `dispatching_at` while dispatching; `unsettled_at` once that attempt's outcome is unknown;
//! `cancel_requested` when a cancel was asked for while dispatching;
//! `egress_id` and `started_at` once active; `ended_at` once finished; `error` when failed.
//! Times are milliseconds since the Unix epoch, given by the caller. The counter hashes hold
//! non-zero kinds only: a missing kind counts zero.
//!
//! # Lost tickets
//!
//! Redis must not evict (`maxmemory-policy noeviction`; see [`watch_eviction_policy`]). A
//! ticket whose hash is gone all the same (evicted, deleted by hand) is removed by the reading
//! script that meets it (`queue/repair.lua`: `peek`/`peek_n`, `stats`, the scaling input at
//! the head of the FIFO), and the `queued` and `demand` counters are recounted from the
//! tickets that survive, since its kind went with the hash; so it never holds a strict queue,
//! the oldest wait or the demand.
//!
//! The dispatcher writes through [`QueueStore::fenced`]: each of its transitions carries the
//! fencing token of its lease, and the script refuses it ([`QueueError::Fenced`]) once a newer
//! dispatcher has taken the lease over.
//!
//! # Ticket states
//!
//! | operation | from | to |
//! |---|---|---|
//! | `enqueue` | (new) | queued, at the tail |
//! | `claim` | queued | dispatching, with an attempt id |
//! | `requeue` | dispatching, by the same attempt | queued, at its original place |
//! | `unsettle` | dispatching, by the same attempt | dispatching, its outcome unknown |
//! | `mark_started` | queued, dispatching | active (at once ended or failed when the egress's end was already reported; refused when the egress is recorded for another ticket) |
//! | `mark_failed` | queued, dispatching | failed (dead letter) |
//! | `finish` | active, dispatching | ended, failed (dead letter) or cancelled |
//! | `cancel` | queued | cancelled |
//! | `cancel` | dispatching | dispatching, `cancel_requested` (the dispatcher cancels it once settled) |
//!
//! A ticket holds its dedup key (the key of what it records, see
//! [`crate::egress_request::StartRequest::dedup_key`], unless the caller gives one) until it
//! ends, fails or is cancelled. Enqueueing the same request again meanwhile returns the
//! holder as a duplicate; a different request under the same key returns the holder as a
//! conflict (the HTTP API answers 409). Neither changes anything.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script, ScriptInvocation, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::egress_request::StartRequest;
use crate::model::{Demand, EgressKind};
use crate::prewarm::{ArrivalCounts, Cell};

mod held;
mod sentinel;
mod served;
pub use sentinel::{DEFAULT_SENTINEL_PORT, SentinelUrl, is_sentinel_url};
pub use served::{InvalidServedQueues, MAX_SERVED_QUEUES, ServedQueues, UnservedQueue};

/// A validated queue name: 1 to 64 of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct QueueName(String);

/// The queue name is empty, too long or has characters outside `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue name {0:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
pub struct InvalidQueueName(pub String);

impl FromStr for QueueName {
    type Err = InvalidQueueName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(QueueName(s.to_owned()))
        } else {
            Err(InvalidQueueName(s.to_owned()))
        }
    }
}

impl QueueName {
    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key prefix of this queue, hash tag included: `egress-scaler:{q}:`.
    pub fn key_prefix(&self) -> String {
        format!("egress-scaler:{{{}}}:", self.0)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The set of every queue name ever enqueued to; outside any queue's hash tag.
const QUEUES_KEY: &str = "egress-scaler:queues";
/// Matches the [`events_channel`] of every queue.
const EVENTS_PATTERN: &str = "egress-scaler:*:events";
/// How many dead letters a queue keeps at most (the newest).
const DEAD_LETTERS_KEPT: u64 = 10_000;

/// Identifies one request: `<queue>.<32 lowercase hex digits of a random UUID v4>`, so the
/// queue, and with it every key, is found from the id alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TicketId(String);

/// The text is not `<queue>.<32 lowercase hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ticket id {0:?}: expected <queue name>.<32 lowercase hex digits>")]
pub struct InvalidTicketId(pub String);

impl TicketId {
    /// A new random id in `queue`.
    pub fn generate(queue: &QueueName) -> Self {
        TicketId(format!("{}.{}", queue, uuid::Uuid::new_v4().simple()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The queue the ticket belongs to.
    pub fn queue(&self) -> QueueName {
        let (queue, _) = self.0.rsplit_once('.').expect("validated on creation");
        QueueName(queue.to_owned())
    }
}

impl FromStr for TicketId {
    type Err = InvalidTicketId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s.rsplit_once('.').is_some_and(|(queue, hex)| {
            queue.parse::<QueueName>().is_ok()
                && hex.len() == 32
                && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if valid {
            Ok(TicketId(s.to_owned()))
        } else {
            Err(InvalidTicketId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for TicketId {
    type Error = InvalidTicketId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TicketId> for String {
    fn from(id: TicketId) -> Self {
        id.0
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a ticket is in its life (see the state diagram above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketState {
    Queued,
    Dispatching,
    Active,
    Ended,
    Failed,
    Cancelled,
}

/// The text is not one of the ticket states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown ticket state {0:?} (expected one of queued, dispatching, active, ended, failed, cancelled)"
)]
pub struct UnknownTicketState(pub String);

impl TicketState {
    /// Every state, in life order.
    pub const ALL: [TicketState; 6] = [
        TicketState::Queued,
        TicketState::Dispatching,
        TicketState::Active,
        TicketState::Ended,
        TicketState::Failed,
        TicketState::Cancelled,
    ];

    /// The snake_case name used in JSON and Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::Queued => "queued",
            TicketState::Dispatching => "dispatching",
            TicketState::Active => "active",
            TicketState::Ended => "ended",
            TicketState::Failed => "failed",
            TicketState::Cancelled => "cancelled",
        }
    }

    /// Ended, failed or cancelled: the ticket no longer holds its dedup key and will expire.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TicketState::Ended | TicketState::Failed | TicketState::Cancelled
        )
    }
}

impl FromStr for TicketState {
    type Err = UnknownTicketState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TicketState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownTicketState(s.to_owned()))
    }
}

impl fmt::Display for TicketState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to enqueue, validated by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    /// What kind of egress it will start.
    pub kind: EgressKind,
    /// The LiveKit room to record.
    pub room_name: String,
    /// The LiveKit start request as JSON text, stored verbatim.
    pub request: Option<String>,
    /// De-duplication key; when absent, the key of what the request records
    /// ([`StartRequest::dedup_key`]), or `<kind>:<room_name>` for a request that does not
    /// parse.
    pub dedup_key: Option<String>,
}

impl NewRequest {
    /// The request to enqueue for a validated start request: stored in its normalised form,
    /// keyed by what it records unless `dedup_key` names another key.
    pub fn new(start: &StartRequest, room_name: &str, dedup_key: Option<String>) -> Self {
        NewRequest {
            kind: start.kind(),
            room_name: room_name.to_owned(),
            request: Some(start.to_json()),
            dedup_key: Some(dedup_key.unwrap_or_else(|| start.dedup_key())),
        }
    }

    /// The key the ticket will hold.
    fn key(&self) -> String {
        if let Some(key) = &self.dedup_key {
            return key.clone();
        }
        let value = self
            .request
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        match StartRequest::parse(self.kind, &self.room_name, value) {
            Ok(start) => start.dedup_key(),
            Err(_) => format!("{}:{}", self.kind, self.room_name),
        }
    }

    /// What "the same request" compares: kind, room and request body, hashed.
    fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [
            self.kind.as_str(),
            &self.room_name,
            self.request.as_deref().unwrap_or(""),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}

/// The answer to an enqueue: the new ticket, or the one already holding the dedup key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The ticket created or found.
    pub ticket: TicketId,
    /// Its state (`queued` unless a duplicate of a ticket further along).
    pub state: TicketState,
    /// 0-based rank in the pending FIFO; `None` when the ticket is not queued.
    pub position: Option<u64>,
    /// True when an existing ticket holding the key was returned and nothing changed.
    pub duplicate: bool,
    /// True when that ticket's request differs from this one (a different recording asked
    /// for under the same key); implies `duplicate`.
    pub conflict: bool,
}

/// Everything stored about one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ticket {
    /// The ticket id.
    pub id: TicketId,
    /// Where it is in its life.
    pub state: TicketState,
    /// Egress kind.
    pub kind: EgressKind,
    /// LiveKit room.
    pub room_name: String,
    /// The LiveKit start request as JSON text, verbatim.
    pub request: Option<String>,
    /// The dedup key it holds (or held).
    pub dedup_key: String,
    /// LiveKit egress id once started.
    pub egress_id: Option<String>,
    /// Enqueue time, ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// Start time, once active.
    pub started_at_ms: Option<u64>,
    /// End, failure or cancel time.
    pub ended_at_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The current dispatch attempt, while dispatching.
    pub attempt_id: Option<String>,
    /// When the current dispatch attempt claimed it.
    pub dispatching_at_ms: Option<u64>,
    /// When the current attempt was found to be of unknown outcome (being settled).
    pub unsettled_at_ms: Option<u64>,
    /// When a cancel was asked for while it was being started.
    pub cancel_requested_at_ms: Option<u64>,
}

/// A summary of one queue, read without scanning it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Tickets in state queued, by kind.
    pub queued: Demand,
    /// Tickets not started yet (queued + dispatching), by kind.
    pub demand: Demand,
    /// Size of the pending FIFO (`ZCARD pending`).
    pub depth: u64,
    /// Enqueue time of the head of the FIFO.
    pub oldest_enqueued_at_ms: Option<u64>,
    /// Tickets being started.
    pub dispatching: u64,
    /// Tickets recording.
    pub active: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
}

/// The replica model's input read from one queue (see [`QueueStore::scaling_input`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScalingInput {
    /// Tickets not started yet (queued + dispatching), by kind.
    pub demand: Demand,
    /// Kinds of the tickets started after the time asked, oldest start first.
    pub started_since: Vec<EgressKind>,
    /// The arrival counts of the buckets asked for (pre-warm).
    pub arrivals: ArrivalCounts,
}

/// Most starts [`QueueStore::scaling_input`] reads: far more than start within one fleet
/// refresh, so the bound only protects the KEDA call from a clock gone wrong.
pub const MAX_UNSEEN_STARTS: usize = 10_000;

/// Identifies one webhook delivery: the event `id` (when it is a plain `EV_...` word) and the
/// SHA-256 of the body, so that a replay is recognised and a new event never is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryId(String);

impl DeliveryId {
    /// The delivery of an event with `event_id` (may be empty) and raw `body`.
    pub fn new(event_id: &str, body: &[u8]) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(body);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        let plain = !event_id.is_empty()
            && event_id.len() <= 64
            && event_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        DeliveryId(if plain {
            format!("{event_id}:{hex}")
        } else {
            format!("-:{hex}")
        })
    }

    /// The text used in the Redis key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The `maxmemory-policy` of the Redis holding the queue. Anything but `noeviction` may evict a
/// ticket hash under memory pressure, and a recording with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum EvictionPolicy {
    /// `noeviction`: writes fail when memory is full; nothing is lost silently.
    NoEviction,
    /// A policy that evicts keys, named as Redis names it.
    Evicts(String),
    /// Redis answered neither `CONFIG GET` nor `INFO memory`; why.
    Unknown(String),
}

impl EvictionPolicy {
    /// The policy named by Redis.
    pub fn parse(name: &str) -> Self {
        match name.trim() {
            "noeviction" => EvictionPolicy::NoEviction,
            other => EvictionPolicy::Evicts(other.to_owned()),
        }
    }

    /// True only for `noeviction`.
    pub fn is_safe(&self) -> bool {
        matches!(self, EvictionPolicy::NoEviction)
    }

    /// The policy's name, or `unknown`.
    pub fn name(&self) -> &str {
        match self {
            EvictionPolicy::NoEviction => "noeviction",
            EvictionPolicy::Evicts(name) => name,
            EvictionPolicy::Unknown(_) => "unknown",
        }
    }

    /// The warning for operators, `None` for `noeviction`.
    pub fn warning(&self) -> Option<String> {
        match self {
            EvictionPolicy::NoEviction => None,
            EvictionPolicy::Evicts(name) => Some(format!(
                "Redis maxmemory-policy is {name}: under memory pressure Redis may evict a ticket and lose its recording; set maxmemory-policy noeviction"
            )),
            EvictionPolicy::Unknown(why) => Some(format!(
                "Redis maxmemory-policy is unknown ({why}): make sure it is noeviction, or an evicted ticket loses its recording"
            )),
        }
    }
}

/// How often [`watch_eviction_policy`] reads the policy again without a reconnection (an
/// operator may change it with `CONFIG SET`).
const EVICTION_POLICY_RECHECK: Duration = Duration::from_secs(300);

/// Reads the `maxmemory-policy` now, after every (re)subscription of the event listener (a
/// reconnection, maybe to another Redis) and every 5 minutes; logs a warning whenever it is
/// not `noeviction` and hands every reading to `report`. Returns when `shutdown` is cancelled.
pub async fn watch_eviction_policy(
    store: QueueStore,
    mut events: broadcast::Receiver<QueueEvent>,
    mut report: impl FnMut(&EvictionPolicy) + Send,
    shutdown: CancellationToken,
) {
    loop {
        let policy = tokio::select! {
            _ = shutdown.cancelled() => return,
            policy = store.read_eviction_policy() => policy,
        };
        match policy.warning() {
            Some(warning) => tracing::warn!(policy = policy.name(), "{warning}."),
            None => tracing::debug!("Redis maxmemory-policy is noeviction."),
        }
        report(&policy);
        let recheck = tokio::time::sleep(EVICTION_POLICY_RECHECK);
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut recheck => break,
                event = events.recv() => match event {
                    Ok(QueueEvent::Resync) => break,
                    Ok(QueueEvent::Changed(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        // No more reconnection notices: keep the periodic reading only.
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = &mut recheck => break,
                        }
                    }
                },
            }
        }
    }
}

/// Logs the tickets a reading script found lost and removed.
fn log_lost_tickets(queue: &QueueName, removed: &[String]) {
    if !removed.is_empty() {
        tracing::warn!(
            %queue,
            tickets = ?removed,
            "Ticket hashes were gone (evicted or deleted): removed from the queue, counters recounted; those requests are lost. Set Redis maxmemory-policy noeviction."
        );
    }
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The ticket was queued and is now cancelled.
    Cancelled,
    /// The ticket is being started: the intent is recorded, and the dispatcher cancels it
    /// once the attempt is settled (stopping the egress if it started).
    Requested,
    /// No such ticket (or it finished long enough ago to have expired).
    NotFound,
    /// The ticket is past queued; nothing changed.
    NotQueued(TicketState),
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis did not answer, or answered with an error.
    #[error("redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    /// Redis answered with data this code did not write.
    #[error("queue data is corrupt: {0}")]
    Corrupt(String),
    /// A dispatcher write carried a stale fencing token: a newer dispatcher holds the lease.
    #[error("a newer dispatcher holds the lease")]
    Fenced,
}

impl QueueError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            QueueError::Unavailable(_) => "unavailable",
            QueueError::Corrupt(_) => "corrupt",
            QueueError::Fenced => "fenced",
        }
    }
}

/// Connection and retention settings of a [`QueueStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Limit on establishing one connection.
    pub connect_timeout: Duration,
    /// Limit on one answer once connected.
    pub response_timeout: Duration,
    /// How long ended, failed and cancelled tickets stay readable.
    pub finished_ttl: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            finished_ttl: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// The pub/sub channel a queue's changes are announced on.
pub fn events_channel(queue: &QueueName) -> String {
    format!("{}events", queue.key_prefix())
}

/// The queue named by a channel of [`events_channel`].
fn queue_of_channel(channel: &str) -> Option<QueueName> {
    channel
        .strip_prefix("egress-scaler:{")?
        .strip_suffix("}:events")?
        .parse()
        .ok()
}

/// Keys of one queue.
struct Keys {
    prefix: String,
}

impl Keys {
    fn of(queue: &QueueName) -> Self {
        Keys {
            prefix: queue.key_prefix(),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn ticket(&self, ticket: &TicketId) -> String {
        format!("{}ticket:{ticket}", self.prefix)
    }

    fn room(&self, room_name: &str) -> String {
        format!("{}room:{room_name}", self.prefix)
    }

    fn delivery(&self, delivery: &DeliveryId) -> String {
        format!("{}webhook:{}", self.prefix, delivery.as_str())
    }
}

/// A transition script: the shared prelude followed by the script's own body.
macro_rules! transition_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("queue/prelude.lua"),
                include_str!($file)
            ))
        })
    };
}

static ENQUEUE: LazyLock<Script> = transition_script!("queue/enqueue.lua");
static CLAIM: LazyLock<Script> = transition_script!("queue/claim.lua");
static REQUEUE: LazyLock<Script> = transition_script!("queue/requeue.lua");
static START: LazyLock<Script> = transition_script!("queue/start.lua");
static FAIL: LazyLock<Script> = transition_script!("queue/fail.lua");
static END: LazyLock<Script> = transition_script!("queue/end.lua");
static CANCEL: LazyLock<Script> = transition_script!("queue/cancel.lua");
static UNSETTLE: LazyLock<Script> = transition_script!("queue/unsettle.lua");
static OVER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("queue/over.lua")));
/// A reading script that can meet a lost ticket: `queue/repair.lua` followed by the script.
macro_rules! reading_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("queue/repair.lua"),
                include_str!($file)
            ))
        })
    };
}

static STATS: LazyLock<Script> = reading_script!("queue/stats.lua");
static RANGE: LazyLock<Script> = reading_script!("queue/range.lua");
static SCALING: LazyLock<Script> = reading_script!("queue/scaling.lua");

/// An invocation of a transition script on `ticket` with the keys and arguments of
/// `queue/prelude.lua`; the caller appends the script's own arguments.
fn transition<'a>(script: &'a Script, ticket: &TicketId) -> ScriptInvocation<'a> {
    let queue = ticket.queue();
    let keys = Keys::of(&queue);
    let mut invocation = script.prepare_invoke();
    invocation
        .key(keys.ticket(ticket))
        .key(keys.key("pending"))
        .key(keys.key("dispatching"))
        .key(keys.key("active"))
        .key(keys.key("dead"))
        .key(keys.key("demand"))
        .key(keys.key("queued"))
        .key(keys.key("dedup"))
        .key(keys.key("egress"))
        .key(keys.key("seq"))
        .key(keys.key("fence"))
        .arg(&keys.prefix)
        .arg(ticket.as_str())
        .arg(events_channel(&queue))
        .arg(queue.as_str());
    invocation
}

/// What recording an egress for a ticket did ([`FencedStore::mark_started`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// The ticket is active with the egress.
    Started,
    /// The egress had already ended (its `egress_ended` came first): the ticket is ended.
    AlreadyEnded,
    /// The egress had already failed: the ticket is failed, a dead letter.
    AlreadyFailed,
    /// The ticket was not queued or dispatching: nothing changed.
    NotApplied,
    /// The egress is recorded for another ticket: nothing changed.
    OwnedByOther,
}

impl StartOutcome {
    /// True when the egress is now recorded for the ticket.
    pub fn recorded(self) -> bool {
        matches!(
            self,
            StartOutcome::Started | StartOutcome::AlreadyEnded | StartOutcome::AlreadyFailed
        )
    }
}

/// How a started (or being started) ticket finishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Its egress is over: the recording happened.
    Ended,
    /// Its egress failed or was aborted: a dead letter with LiveKit's error.
    Failed(String),
    /// Cancelled by its caller (its egress, if any, stopped).
    Cancelled,
}

impl Finish {
    fn state(&self) -> &'static str {
        match self {
            Finish::Ended => "ended",
            Finish::Failed(_) => "failed",
            Finish::Cancelled => "cancelled",
        }
    }

    fn error(&self) -> &str {
        match self {
            Finish::Failed(error) => error,
            _ => "",
        }
    }
}

/// How long the end of an egress no ticket recorded yet is remembered: longer than any start
/// answer or settling takes to record it.
const EGRESS_OVER_TTL: Duration = Duration::from_secs(15 * 60);

/// The dispatcher's transitions, fenced by the token of its lease (see [`QueueStore::fenced`]).
#[derive(Debug, Clone, Copy)]
pub struct FencedStore<'a> {
    store: &'a QueueStore,
    token: u64,
}

impl FencedStore<'_> {
    /// The fencing token passed with every write.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// queued -> dispatching for `attempt_id`; the ticket as claimed, `None` when it was not
    /// queued.
    pub async fn claim(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        now_ms: u64,
    ) -> Result<Option<Ticket>, QueueError> {
        self.store
            .claim_with(ticket, attempt_id, now_ms, Some(self.token))
            .await
    }

    /// Marks the attempt `attempt_id` of a dispatching ticket as of unknown outcome.
    pub async fn unsettle(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        let mut invocation = transition(&UNSETTLE, ticket);
        invocation.arg(attempt_id).arg(now_ms).arg(self.token);
        self.store.applied(&invocation).await
    }

    /// dispatching (by `attempt_id`) -> queued, at its original place.
    pub async fn requeue(&self, ticket: &TicketId, attempt_id: &str) -> Result<bool, QueueError> {
        self.store
            .requeue_with(ticket, attempt_id, Some(self.token))
            .await
    }

    /// queued | dispatching -> active, recording `egress_id`.
    pub async fn mark_started(
        &self,
        ticket: &TicketId,
        egress_id: &str,
        now_ms: u64,
    ) -> Result<StartOutcome, QueueError> {
        self.store
            .mark_started_with(ticket, egress_id, now_ms, Some(self.token))
            .await
    }

    /// queued | dispatching -> failed, a dead letter keeping `error`.
    pub async fn mark_failed(
        &self,
        ticket: &TicketId,
        error: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        self.store
            .mark_failed_with(ticket, error, now_ms, Some(self.token))
            .await
    }

    /// active | dispatching -> ended, failed or cancelled; a dispatching ticket records
    /// `egress_id` (the egress its attempt turned out to have started) when given.
    pub async fn finish(
        &self,
        ticket: &TicketId,
        how: &Finish,
        egress_id: Option<&str>,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        self.store
            .finish_with(ticket, how, egress_id, now_ms, Some(self.token))
            .await
    }
}

/// The queue in Redis. Cheap to clone: clones share one multiplexed connection (one per
/// node in cluster mode), which reconnects by itself after Redis comes back.
#[derive(Debug, Clone)]
pub struct QueueStore {
    client: redis::Client,
    backend: Backend,
    connection: Arc<Mutex<Connection>>,
    finished_ttl: Duration,
    /// Bound on every call, waiting for a (re)connection included.
    call_timeout: Duration,
    /// The `maxmemory-policy` last read, shared by every clone.
    eviction_policy: Arc<Mutex<Option<EvictionPolicy>>>,
}

/// How new connections are made: to the URL's node, to the cluster it belongs to, or to
/// the primary the sentinels name.
#[derive(Debug, Clone)]
enum Backend {
    Standalone(ConnectionManagerConfig),
    /// Shared: far bigger than the single-node settings, and cloned with every store.
    Cluster(Arc<ClusterBackend>),
    Sentinel(Arc<SentinelBackend>),
}

/// The sentinels, and what every connection to the primary they name is made with.
struct SentinelBackend {
    sentinels: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    config: ConnectionManagerConfig,
    /// Bound on asking the sentinels and checking the primary they name.
    find_timeout: Duration,
    /// Replicas that must acknowledge a write (`WAIT`); 0 for none.
    wait_replicas: u32,
    /// How long a write waits for them.
    wait_timeout: Duration,
}

impl fmt::Debug for SentinelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelBackend")
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .finish_non_exhaustive()
    }
}

/// The cluster client and the timeouts of every connection it makes.
#[derive(Debug, Clone)]
struct ClusterBackend {
    client: ClusterClient,
    config: ClusterConfig,
    /// Bound on connecting to the whole cluster.
    connect_timeout: Duration,
}

/// The connection in use, and how many times it was replaced before.
#[derive(Debug)]
struct Connection {
    link: Link,
    generation: u64,
    /// In cluster and Sentinel mode, while a replacement connects in the background:
    /// dropped with the last clone of the store, it stops the replacement.
    replacing: Option<DropGuard>,
    /// In Sentinel mode, the client of the primary `link` is connected to.
    primary: Option<redis::Client>,
}

/// A connection to one Redis node, or to a whole cluster (routed by key).
#[derive(Clone)]
enum Link {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Standalone(manager) => f.debug_tuple("Standalone").field(manager).finish(),
            Link::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Link::Standalone(manager) => manager.req_packed_command(cmd),
            Link::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Standalone(manager) => manager.req_packed_commands(pipeline, offset, count),
            Link::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Standalone(manager) => manager.get_db(),
            Link::Cluster(cluster) => cluster.get_db(),
        }
    }
}

impl QueueStore {
    /// Connects to `url`, a single Redis or any node of a Redis Cluster (see the module
    /// doc); fails when Redis does not answer now. Once built, the store reconnects by
    /// itself, and while Redis is away every call fails within about
    /// `connect_timeout + response_timeout` instead of waiting.
    pub async fn connect(url: &str, options: StoreOptions) -> Result<Self, QueueError> {
        // Few quick reconnection attempts: a caller waiting on a reconnection gets its
        // answer soon, and the next call starts a new attempt anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let call_timeout = options.connect_timeout + options.response_timeout;
        if is_sentinel_url(url) {
            return Self::connect_sentinel(url, options, config, call_timeout).await;
        }
        let client = redis::Client::open(url)?;
        let manager = match tokio::time::timeout(
            call_timeout,
            client.get_connection_manager_with_config(config.clone()),
        )
        .await
        {
            Ok(manager) => manager?,
            Err(_) => return Err(timed_out(call_timeout)),
        };
        let topology = match tokio::time::timeout(
            call_timeout,
            Topology::read(&mut manager.clone(), client.get_connection_info()),
        )
        .await
        {
            Ok(topology) => topology?,
            Err(_) => return Err(timed_out(call_timeout)),
        };
        let (backend, link) = match topology {
            Topology::Standalone => (Backend::Standalone(config), Link::Standalone(manager)),
            Topology::Cluster(nodes) => {
                Self::connect_cluster(&client, nodes, &options, call_timeout).await?
            }
        };
        Ok(QueueStore {
            client,
            backend,
            connection: Arc::new(Mutex::new(Connection {
                link,
                generation: 0,
                replacing: None,
                primary: None,
            })),
            finished_ttl: options.finished_ttl,
            call_timeout,
            eviction_policy: Arc::new(Mutex::new(None)),
        })
    }

    /// Asks the sentinels for the primary (the module doc of `sentinel` has the URL form)
    /// and connects to it. A call that finds the primary gone, silent or demoted (`READONLY`)
    /// fails, and makes the store ask the sentinels again in the background.
    async fn connect_sentinel(
        url: &str,
        options: StoreOptions,
        config: ConnectionManagerConfig,
        call_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let parsed = SentinelUrl::parse(url).map_err(|error| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Redis Sentinel URL",
                error,
            ))
        })?;
        let backend = Arc::new(SentinelBackend {
            sentinels: tokio::sync::Mutex::new(parsed.client()?),
            config,
            // A sentinel's answer, then a connection to the primary it names and its ROLE.
            find_timeout: call_timeout * 2,
            wait_replicas: parsed.wait_replicas,
            // Within the response timeout, so that a shortfall is told apart from silence.
            wait_timeout: options.response_timeout / 2,
        });
        let client = sentinel::find_primary(&backend.sentinels, backend.find_timeout).await?;
        let manager = match tokio::time::timeout(
            call_timeout,
            client.get_connection_manager_with_config(backend.config.clone()),
        )
        .await
        {
            Ok(manager) => manager?,
            Err(_) => return Err(timed_out(call_timeout)),
        };
        tracing::info!(
            primary = ?client.get_connection_info().addr(),
            wait_replicas = parsed.wait_replicas,
            "Redis primary found through Sentinel."
        );
        Ok(QueueStore {
            client: client.clone(),
            backend: Backend::Sentinel(backend),
            connection: Arc::new(Mutex::new(Connection {
                link: Link::Standalone(manager),
                generation: 0,
                replacing: None,
                primary: Some(client),
            })),
            finished_ttl: options.finished_ttl,
            call_timeout,
            eviction_policy: Arc::new(Mutex::new(None)),
        })
    }

    /// Where [`run_event_listener`] subscribes: the URL's node (and the other nodes of its
    /// cluster), or the primary the sentinels name at each subscription.
    pub fn event_source(&self) -> EventSource {
        match &self.backend {
            Backend::Sentinel(sentinel) => EventSource(Source::Sentinel(Arc::clone(sentinel))),
            Backend::Standalone(_) | Backend::Cluster(_) => {
                EventSource(Source::Node(Box::new(self.client.clone())))
            }
        }
    }

    /// The client of the node answering now: the URL's node, or in Sentinel mode the
    /// primary last found.
    fn current_client(&self) -> redis::Client {
        let current = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current
            .primary
            .clone()
            .unwrap_or_else(|| self.client.clone())
    }

    /// The cluster connection, seeded with the URL's node and every node it knows of, so
    /// that a replacement connection finds the cluster even when the URL's node is gone.
    async fn connect_cluster(
        client: &redis::Client,
        nodes: Vec<redis::ConnectionInfo>,
        options: &StoreOptions,
        call_timeout: Duration,
    ) -> Result<(Backend, Link), QueueError> {
        let seeds = std::iter::once(client.get_connection_info().clone()).chain(nodes);
        // As for a single node: few, quick retries (MOVED, TRYAGAIN, a reconnection), all
        // within the same bound as a call.
        let cluster = ClusterClientBuilder::new(seeds)
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(200)
            .overall_response_timeout(Some(call_timeout))
            .build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(options.connect_timeout)
            .set_response_timeout(options.response_timeout);
        // Seeds are connected to in parallel, then every node of the slot map, so two
        // rounds of connecting may pass before the first answer.
        let connect_timeout = call_timeout + options.connect_timeout;
        let connection = match tokio::time::timeout(
            connect_timeout,
            cluster.get_async_connection_with_config(config.clone()),
        )
        .await
        {
            Ok(connection) => connection?,
            Err(_) => return Err(timed_out(connect_timeout)),
        };
        tracing::info!("Redis is a cluster; routing every queue to the node of its slot.");
        Ok((
            Backend::Cluster(Arc::new(ClusterBackend {
                client: cluster,
                config,
                connect_timeout,
            })),
            Link::Cluster(connection),
        ))
    }

    /// The client of the URL's node, for connections of other kinds (pub/sub, leases). In
    /// cluster mode keyed commands sent through it are answered with `MOVED` unless the
    /// key's slot is on that node. In Sentinel mode, the primary found at connect time:
    /// use [`QueueStore::event_source`] for queue events.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.query(&redis::cmd("PING")).await.map(drop)
    }

    /// Enqueues `request` at the tail of `queue`, or returns the ticket holding its dedup key.
    pub async fn enqueue(
        &self,
        queue: &QueueName,
        request: NewRequest,
        now_ms: u64,
    ) -> Result<Enqueued, QueueError> {
        let ticket = TicketId::generate(queue);
        let dedup_key = request.key();
        let digest = request.digest();
        // A separate command: the set of queues is outside this queue's cluster slot.
        self.query(redis::cmd("SADD").arg(QUEUES_KEY).arg(queue.as_str()))
            .await?;
        let mut invocation = transition(&ENQUEUE, &ticket);
        invocation
            .arg(request.kind.as_str())
            .arg(&request.room_name)
            .arg(&dedup_key)
            .arg(now_ms);
        match &request.request {
            Some(text) => invocation.arg("1").arg(text),
            None => invocation.arg("0").arg(""),
        };
        let arrival = Cell::at(now_ms);
        invocation
            .arg(&digest)
            .arg(arrival.week)
            .arg(arrival.bucket)
            .arg(arrival.forget_at_ms());
        let (id, state, rank, found): (String, String, i64, i64) =
            decode(self.invoke(&invocation).await?, "enqueue reply")?;
        Ok(Enqueued {
            ticket: parse_ticket_id(id)?,
            state: parse_state(&state)?,
            position: u64::try_from(rank).ok(),
            duplicate: found != 0,
            conflict: found == 2,
        })
    }

    /// Tickets not started yet (queued + dispatching) by kind: one `HGETALL`.
    pub async fn demand(&self, queue: &QueueName) -> Result<Demand, QueueError> {
        let keys = Keys::of(queue);
        let counts = self
            .query(redis::cmd("HGETALL").arg(keys.key("demand")))
            .await?;
        parse_demand(decode(counts, "demand counters")?)
    }

    /// The replica model's input in one round trip: the demand, and the kinds of the tickets
    /// started after `started_after_ms` (oldest first, at most [`MAX_UNSEEN_STARTS`]), which
    /// a fleet snapshot taken before may not show. `None` reads no starts.
    pub async fn scaling_input(
        &self,
        queue: &QueueName,
        started_after_ms: Option<u64>,
    ) -> Result<ScalingInput, QueueError> {
        self.scaling_input_ahead(queue, started_after_ms, &[]).await
    }

    /// [`QueueStore::scaling_input`], and in the same round trip the arrival counts of the
    /// buckets pre-warm asks for (`cells` sorted, as [`crate::prewarm::cells_to_read`] gives
    /// them).
    pub async fn scaling_input_ahead(
        &self,
        queue: &QueueName,
        started_after_ms: Option<u64>,
        cells: &[Cell],
    ) -> Result<ScalingInput, QueueError> {
        let keys = Keys::of(queue);
        let mut invocation = SCALING.prepare_invoke();
        for key in [
            "demand",
            "active",
            "pending",
            "dispatching",
            "queued",
            "dedup",
            "egress",
        ] {
            invocation.key(keys.key(key));
        }
        invocation.arg(&keys.prefix);
        match started_after_ms {
            Some(after) => invocation.arg(after),
            None => invocation.arg(""),
        };
        invocation
            .arg(MAX_UNSEEN_STARTS)
            .arg(events_channel(queue))
            .arg(queue.as_str());
        for week in cells.chunk_by(|a, b| a.week == b.week) {
            invocation.arg(week[0].week).arg(week.len());
            for cell in week {
                invocation.arg(cell.bucket);
            }
        }
        type Reply = (
            HashMap<String, u64>,
            Vec<String>,
            Vec<String>,
            Vec<(String, Vec<u32>)>,
        );
        let (demand, kinds, removed, counted): Reply =
            decode(self.read(&invocation).await?, "scaling input")?;
        let mut arrivals = ArrivalCounts::default();
        for (kind, counts) in counted {
            let kind = kind
                .parse::<EgressKind>()
                .map_err(|error| QueueError::Corrupt(error.to_string()))?;
            for (cell, count) in cells.iter().zip(counts) {
                arrivals.set(kind, *cell, count);
            }
        }
        log_lost_tickets(queue, &removed);
        let started_since = kinds
            .iter()
            .map(|kind| {
                kind.parse::<EgressKind>()
                    .map_err(|error| QueueError::Corrupt(error.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(ScalingInput {
            demand: parse_demand(demand)?,
            started_since,
            arrivals,
        })
    }

    /// Whether a webhook delivery was already acted on (see [`QueueStore::remember_delivery`]).
    pub async fn delivery_seen(
        &self,
        queue: &QueueName,
        delivery: &DeliveryId,
    ) -> Result<bool, QueueError> {
        let key = Keys::of(queue).delivery(delivery);
        let exists = self.query(redis::cmd("EXISTS").arg(key)).await?;
        let exists: i64 = decode(exists, "delivery mark")?;
        Ok(exists == 1)
    }

    /// Remembers a webhook delivery as acted on for `ttl`; false when it already was.
    pub async fn remember_delivery(
        &self,
        queue: &QueueName,
        delivery: &DeliveryId,
        ttl: Duration,
    ) -> Result<bool, QueueError> {
        let key = Keys::of(queue).delivery(delivery);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let set = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await?;
        let set: Option<String> = decode(set, "delivery mark")?;
        Ok(set.is_some())
    }

    /// Asks the URL's node for its `maxmemory-policy`: `CONFIG GET`, else (a managed Redis
    /// may deny CONFIG) `INFO memory`; [`EvictionPolicy::Unknown`] when neither answers.
    pub async fn read_eviction_policy(&self) -> EvictionPolicy {
        let asked = tokio::time::timeout(self.call_timeout, async {
            let mut connection = self
                .current_client()
                .get_multiplexed_async_connection()
                .await?;
            let config: redis::RedisResult<Value> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(&mut connection)
                .await;
            if let Ok(value) = config
                && let Ok(pairs) = redis::from_redis_value::<HashMap<String, String>>(value)
                && let Some(policy) = pairs.get("maxmemory-policy")
            {
                return Ok(Some(policy.clone()));
            }
            let info: redis::RedisResult<String> = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut connection)
                .await;
            Ok::<_, redis::RedisError>(info.ok().and_then(|info| {
                info.lines()
                    .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
                    .map(str::to_owned)
            }))
        })
        .await;
        let policy = match asked {
            Ok(Ok(Some(policy))) => EvictionPolicy::parse(&policy),
            Ok(Ok(None)) => EvictionPolicy::Unknown(
                "Redis answered neither CONFIG GET nor INFO memory".to_owned(),
            ),
            Ok(Err(error)) => EvictionPolicy::Unknown(format!("Redis did not answer: {error}")),
            Err(_) => EvictionPolicy::Unknown(format!(
                "Redis did not answer within {:?}",
                self.call_timeout
            )),
        };
        *self
            .eviction_policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(policy.clone());
        policy
    }

    /// The `maxmemory-policy` last read by [`QueueStore::read_eviction_policy`], if any.
    pub fn eviction_policy(&self) -> Option<EvictionPolicy> {
        self.eviction_policy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counters, depth and the oldest wait of `queue`, in one script.
    pub async fn stats(&self, queue: &QueueName) -> Result<QueueStats, QueueError> {
        let keys = Keys::of(queue);
        let mut invocation = STATS.prepare_invoke();
        invocation
            .key(keys.key("queued"))
            .key(keys.key("demand"))
            .key(keys.key("pending"))
            .key(keys.key("dispatching"))
            .key(keys.key("active"))
            .key(keys.key("dead"))
            .key(keys.key("dedup"))
            .key(keys.key("egress"))
            .arg(&keys.prefix)
            .arg(events_channel(queue))
            .arg(queue.as_str());
        type Reply = (
            HashMap<String, u64>,
            HashMap<String, u64>,
            u64,
            i64,
            u64,
            u64,
            u64,
            Vec<String>,
        );
        let (queued, demand, depth, oldest, dispatching, active, dead_letters, removed): Reply =
            decode(self.read(&invocation).await?, "stats reply")?;
        log_lost_tickets(queue, &removed);
        Ok(QueueStats {
            queued: parse_demand(queued)?,
            demand: parse_demand(demand)?,
            depth,
            oldest_enqueued_at_ms: u64::try_from(oldest).ok(),
            dispatching,
            active,
            dead_letters,
        })
    }

    /// The ticket, or `None` when unknown or expired.
    pub async fn get(&self, ticket: &TicketId) -> Result<Option<Ticket>, QueueError> {
        let keys = Keys::of(&ticket.queue());
        let fields = self
            .query(redis::cmd("HGETALL").arg(keys.ticket(ticket)))
            .await?;
        let fields: HashMap<String, String> = decode(fields, "ticket hash")?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_ticket(ticket.clone(), fields).map(Some)
    }

    /// 0-based rank of a queued ticket in the FIFO; `None` when not queued.
    pub async fn position(&self, ticket: &TicketId) -> Result<Option<u64>, QueueError> {
        let keys = Keys::of(&ticket.queue());
        let rank = self
            .query(
                redis::cmd("ZRANK")
                    .arg(keys.key("pending"))
                    .arg(ticket.as_str()),
            )
            .await?;
        decode(rank, "rank")
    }

    /// The head of the FIFO.
    pub async fn peek(&self, queue: &QueueName) -> Result<Option<Ticket>, QueueError> {
        Ok(self.peek_n(queue, 1).await?.into_iter().next())
    }

    /// The first `n` queued tickets, in FIFO order.
    pub async fn peek_n(&self, queue: &QueueName, n: usize) -> Result<Vec<Ticket>, QueueError> {
        self.range(queue, "pending", n, "asc").await
    }

    /// queued -> dispatching for `attempt_id`; the ticket as claimed, or `None` when it
    /// was not queued.
    pub async fn claim(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        now_ms: u64,
    ) -> Result<Option<Ticket>, QueueError> {
        self.claim_with(ticket, attempt_id, now_ms, None).await
    }

    /// Marks the attempt `attempt_id` of a dispatching ticket as of unknown outcome: only such
    /// an attempt is matched by an `egress_started` webhook.
    pub async fn unsettle(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        let mut invocation = transition(&UNSETTLE, ticket);
        invocation.arg(attempt_id).arg(now_ms);
        self.applied(&invocation).await
    }

    /// dispatching (by `attempt_id`) -> queued, back at its original place in the FIFO.
    pub async fn requeue(&self, ticket: &TicketId, attempt_id: &str) -> Result<bool, QueueError> {
        self.requeue_with(ticket, attempt_id, None).await
    }

    /// queued | dispatching -> active, recording `egress_id`; true when the egress is now
    /// recorded for the ticket (see [`StartOutcome`]).
    pub async fn mark_started(
        &self,
        ticket: &TicketId,
        egress_id: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        let outcome = self
            .mark_started_with(ticket, egress_id, now_ms, None)
            .await?;
        Ok(outcome.recorded())
    }

    /// queued | dispatching -> failed: frees the dedup key, keeps a dead letter.
    pub async fn mark_failed(
        &self,
        ticket: &TicketId,
        error: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        self.mark_failed_with(ticket, error, now_ms, None).await
    }

    /// active | dispatching -> ended: frees the dedup key.
    pub async fn mark_ended(&self, ticket: &TicketId, now_ms: u64) -> Result<bool, QueueError> {
        self.finish_with(ticket, &Finish::Ended, None, now_ms, None)
            .await
    }

    /// active | dispatching -> ended, failed or cancelled: frees the dedup key.
    pub async fn finish(
        &self,
        ticket: &TicketId,
        how: &Finish,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        self.finish_with(ticket, how, None, now_ms, None).await
    }

    /// An egress of `queue` ended as `how` (its `egress_ended` webhook): the ticket recording
    /// it, or `None` after keeping the end for a start of it not recorded yet, which then
    /// finishes at once.
    pub async fn egress_over(
        &self,
        queue: &QueueName,
        egress_id: &str,
        how: &Finish,
    ) -> Result<Option<TicketId>, QueueError> {
        let keys = Keys::of(queue);
        let mut invocation = OVER.prepare_invoke();
        invocation
            .key(keys.key("egress"))
            .key(keys.key(&format!("recorded:{egress_id}")))
            .key(keys.key(&format!("egress_over:{egress_id}")))
            .arg(egress_id)
            .arg(how.state())
            .arg(how.error())
            .arg(EGRESS_OVER_TTL.as_millis() as u64);
        let owner: String = decode(self.invoke(&invocation).await?, "egress over reply")?;
        if owner.is_empty() {
            return Ok(None);
        }
        parse_ticket_id(owner).map(Some)
    }

    /// Whether an egress is recorded for a ticket of any of `queues` (active, or finished
    /// until the record expires): such an egress is never another ticket's.
    pub async fn egress_recorded_in<'q>(
        &self,
        queues: impl IntoIterator<Item = &'q QueueName>,
        egress_id: &str,
    ) -> Result<bool, QueueError> {
        for queue in queues {
            if self.ticket_for_egress(queue, egress_id).await?.is_some()
                || self.recorded_egress(queue, egress_id).await?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The ticket an egress was ever recorded for (active or finished, until it expires).
    pub async fn recorded_egress(
        &self,
        queue: &QueueName,
        egress_id: &str,
    ) -> Result<Option<TicketId>, QueueError> {
        let keys = Keys::of(queue);
        let id = self
            .query(redis::cmd("GET").arg(keys.key(&format!("recorded:{egress_id}"))))
            .await?;
        let id: Option<String> = decode(id, "recorded egress")?;
        id.map(parse_ticket_id).transpose()
    }

    /// The dispatcher's writes, each refused with [`QueueError::Fenced`] unless `token` is
    /// the current fencing token of the queue's dispatcher lease.
    pub fn fenced(&self, token: u64) -> FencedStore<'_> {
        FencedStore { store: self, token }
    }

    /// Runs a script of another module (the dispatcher lease) with the store's timeouts and
    /// reconnection.
    pub(crate) async fn run_script(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, QueueError> {
        self.invoke(invocation).await
    }

    async fn claim_with(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        now_ms: u64,
        fence: Option<u64>,
    ) -> Result<Option<Ticket>, QueueError> {
        let mut invocation = transition(&CLAIM, ticket);
        invocation.arg(attempt_id).arg(now_ms);
        if let Some(token) = fence {
            invocation.arg(token);
        }
        let fields: HashMap<String, String> =
            decode(self.invoke_fenced(&invocation).await?, "claim reply")?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_ticket(ticket.clone(), fields).map(Some)
    }

    async fn requeue_with(
        &self,
        ticket: &TicketId,
        attempt_id: &str,
        fence: Option<u64>,
    ) -> Result<bool, QueueError> {
        let mut invocation = transition(&REQUEUE, ticket);
        invocation.arg(attempt_id);
        if let Some(token) = fence {
            invocation.arg(token);
        }
        self.applied(&invocation).await
    }

    async fn mark_started_with(
        &self,
        ticket: &TicketId,
        egress_id: &str,
        now_ms: u64,
        fence: Option<u64>,
    ) -> Result<StartOutcome, QueueError> {
        let ttl_ms = self.finished_ttl_ms();
        let mut invocation = transition(&START, ticket);
        invocation
            .arg(egress_id)
            .arg(now_ms)
            .arg(fence.map(|token| token.to_string()).unwrap_or_default())
            .arg(ttl_ms)
            .arg(now_ms.saturating_sub(ttl_ms))
            .arg(DEAD_LETTERS_KEPT);
        let code: i64 = decode(self.invoke_fenced(&invocation).await?, "start reply")?;
        Ok(match code {
            1 => StartOutcome::Started,
            2 => StartOutcome::AlreadyEnded,
            3 => StartOutcome::AlreadyFailed,
            -1 => StartOutcome::OwnedByOther,
            _ => StartOutcome::NotApplied,
        })
    }

    async fn mark_failed_with(
        &self,
        ticket: &TicketId,
        error: &str,
        now_ms: u64,
        fence: Option<u64>,
    ) -> Result<bool, QueueError> {
        let ttl_ms = self.finished_ttl_ms();
        let mut invocation = transition(&FAIL, ticket);
        invocation
            .arg(error)
            .arg(now_ms)
            .arg(ttl_ms)
            .arg(now_ms.saturating_sub(ttl_ms))
            .arg(DEAD_LETTERS_KEPT);
        if let Some(token) = fence {
            invocation.arg(token);
        }
        self.applied(&invocation).await
    }

    async fn finish_with(
        &self,
        ticket: &TicketId,
        how: &Finish,
        egress_id: Option<&str>,
        now_ms: u64,
        fence: Option<u64>,
    ) -> Result<bool, QueueError> {
        let ttl_ms = self.finished_ttl_ms();
        let mut invocation = transition(&END, ticket);
        invocation
            .arg(now_ms)
            .arg(ttl_ms)
            .arg(fence.map(|token| token.to_string()).unwrap_or_default())
            .arg(how.state())
            .arg(how.error())
            .arg(now_ms.saturating_sub(ttl_ms))
            .arg(DEAD_LETTERS_KEPT)
            .arg(egress_id.unwrap_or_default());
        self.applied(&invocation).await
    }

    /// queued -> cancelled: frees the dedup key.
    pub async fn cancel(
        &self,
        ticket: &TicketId,
        now_ms: u64,
    ) -> Result<CancelOutcome, QueueError> {
        let mut invocation = transition(&CANCEL, ticket);
        invocation.arg(now_ms).arg(self.finished_ttl_ms());
        let found: String = decode(self.invoke(&invocation).await?, "cancel reply")?;
        Ok(match found.as_str() {
            "" => CancelOutcome::NotFound,
            "queued" => CancelOutcome::Cancelled,
            "dispatching" => CancelOutcome::Requested,
            state => CancelOutcome::NotQueued(parse_state(state)?),
        })
    }

    /// The active ticket of a LiveKit egress.
    pub async fn ticket_for_egress(
        &self,
        queue: &QueueName,
        egress_id: &str,
    ) -> Result<Option<TicketId>, QueueError> {
        let keys = Keys::of(queue);
        let id = self
            .query(redis::cmd("HGET").arg(keys.key("egress")).arg(egress_id))
            .await?;
        let id: Option<String> = decode(id, "egress index")?;
        id.map(parse_ticket_id).transpose()
    }

    /// Tickets being started, oldest claim first.
    pub async fn dispatching(&self, queue: &QueueName) -> Result<Vec<TicketId>, QueueError> {
        self.members(queue, "dispatching").await
    }

    /// Tickets recording, oldest start first.
    pub async fn active(&self, queue: &QueueName) -> Result<Vec<TicketId>, QueueError> {
        self.members(queue, "active").await
    }

    /// The newest `limit` failed tickets, newest first.
    pub async fn dead_letters(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> Result<Vec<Ticket>, QueueError> {
        self.range(queue, "dead", limit, "desc").await
    }

    /// The queued tickets of one room, in no particular order.
    pub async fn queued_in_room(
        &self,
        queue: &QueueName,
        room_name: &str,
    ) -> Result<Vec<TicketId>, QueueError> {
        let keys = Keys::of(queue);
        let ids = self
            .query(redis::cmd("SMEMBERS").arg(keys.room(room_name)))
            .await?;
        let ids: Vec<String> = decode(ids, "room index")?;
        ids.into_iter().map(parse_ticket_id).collect()
    }

    /// Every queue ever enqueued to, sorted by name.
    pub async fn queues(&self) -> Result<Vec<QueueName>, QueueError> {
        let names = self.query(redis::cmd("SMEMBERS").arg(QUEUES_KEY)).await?;
        let names: Vec<String> = decode(names, "queue set")?;
        let mut queues = names
            .into_iter()
            .map(|name| {
                name.parse::<QueueName>()
                    .map_err(|error| QueueError::Corrupt(error.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        queues.sort();
        Ok(queues)
    }

    fn finished_ttl_ms(&self) -> u64 {
        // PEXPIRE 0 would delete the ticket at once: keep it readable for at least 1 ms.
        u64::try_from(self.finished_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    async fn members(&self, queue: &QueueName, set: &str) -> Result<Vec<TicketId>, QueueError> {
        let keys = Keys::of(queue);
        let ids = self
            .query(redis::cmd("ZRANGE").arg(keys.key(set)).arg(0).arg(-1))
            .await?;
        let ids: Vec<String> = decode(ids, set)?;
        ids.into_iter().map(parse_ticket_id).collect()
    }

    async fn range(
        &self,
        queue: &QueueName,
        set: &str,
        count: usize,
        order: &str,
    ) -> Result<Vec<Ticket>, QueueError> {
        // ZRANGE 0 -1 would mean everything.
        if count == 0 {
            return Ok(Vec::new());
        }
        let keys = Keys::of(queue);
        let mut invocation = RANGE.prepare_invoke();
        invocation.key(keys.key(set));
        for key in [
            "pending",
            "dispatching",
            "active",
            "queued",
            "demand",
            "dedup",
            "egress",
        ] {
            invocation.key(keys.key(key));
        }
        invocation
            .arg(&keys.prefix)
            .arg(count)
            .arg(order)
            .arg(events_channel(queue))
            .arg(queue.as_str())
            .arg(if set == "pending" { "1" } else { "0" });
        type Reply = (Vec<(String, HashMap<String, String>)>, Vec<String>);
        let (entries, removed): Reply = decode(self.invoke(&invocation).await?, set)?;
        log_lost_tickets(queue, &removed);
        entries
            .into_iter()
            .map(|(id, fields)| parse_ticket(parse_ticket_id(id)?, fields))
            .collect()
    }

    async fn applied(&self, invocation: &ScriptInvocation<'_>) -> Result<bool, QueueError> {
        let applied: i64 = decode(self.invoke_fenced(invocation).await?, "transition reply")?;
        Ok(applied == 1)
    }

    /// Like `invoke`, telling a refused fencing token apart from Redis failures.
    async fn invoke_fenced(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, QueueError> {
        match self.invoke(invocation).await {
            Err(QueueError::Unavailable(error)) if error.code() == Some("FENCED") => {
                Err(QueueError::Fenced)
            }
            other => other,
        }
    }

    async fn query(&self, command: &redis::Cmd) -> Result<Value, QueueError> {
        self.call(|mut link| async move { command.query_async(&mut link).await })
            .await
    }

    /// Runs a script: `EVALSHA`, then `SCRIPT LOAD` and `EVALSHA` again when the node does
    /// not know it. A cluster connection routes `EVALSHA` by its first key, and every key
    /// of a queue shares the queue's slot.
    ///
    /// In Sentinel mode with `wait_replicas` N > 0, the script's writes are then confirmed
    /// with `WAIT N` on the same connection (it covers every earlier write of that
    /// connection): fewer acknowledgments in time fail the call as unavailable.
    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, QueueError> {
        let wait = match &self.backend {
            Backend::Sentinel(sentinel) if sentinel.wait_replicas > 0 => {
                Some((sentinel.wait_replicas, sentinel.wait_timeout))
            }
            _ => None,
        };
        let Some((replicas, timeout)) = wait else {
            return self.read(invocation).await;
        };
        self.call(|mut link| async move {
            let value = invocation.invoke_async(&mut link).await?;
            let acknowledged: i64 = redis::cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64)
                .query_async(&mut link)
                .await?;
            if acknowledged < i64::from(replicas) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                    "write not confirmed by the replicas",
                    format!(
                        "{acknowledged} of {replicas} replica(s) acknowledged it within {timeout:?}"
                    ),
                )));
            }
            Ok(value)
        })
        .await
    }

    /// Runs a script that writes nothing (or nothing a failover may not lose): no `WAIT`.
    async fn read(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, QueueError> {
        self.call(|mut link| async move { invocation.invoke_async(&mut link).await })
            .await
    }

    /// Runs one call on the current connection, bounded by `call_timeout`: while the
    /// connection waits for Redis to come back, a call would otherwise wait with it.
    async fn call<F, Fut>(&self, call: F) -> Result<Value, QueueError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = redis::RedisResult<Value>>,
    {
        let (link, generation) = self.current_connection();
        let result = match tokio::time::timeout(self.call_timeout, call(link)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out_redis(self.call_timeout)),
        };
        if let Err(error) = &result
            && (error.is_timeout()
                || (matches!(self.backend, Backend::Sentinel(_)) && primary_lost(error)))
        {
            self.replace_connection(generation);
        }
        Ok(result?)
    }

    fn current_connection(&self) -> (Link, u64) {
        let current = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (current.link.clone(), current.generation)
    }

    /// Swaps in a new connection after a timeout. The connection manager reconnects only
    /// after errors that close the socket, and a connection whose peer vanished without a
    /// word (a Redis pod gone with its IP) stays open, silent, for many minutes; a cluster
    /// connection would also keep sending a silent node's slots to it rather than read the
    /// slot map again. Replaced once per generation, however many calls timed out on it.
    fn replace_connection(&self, generation: u64) {
        let mut current = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.generation != generation || current.replacing.is_some() {
            return;
        }
        match &self.backend {
            Backend::Standalone(config) => {
                match ConnectionManager::new_lazy_with_config(self.client.clone(), config.clone()) {
                    Ok(manager) => {
                        current.link = Link::Standalone(manager);
                        current.generation = generation + 1;
                        tracing::warn!(
                            timeout = ?self.call_timeout,
                            "Redis did not answer in time; opening a new connection."
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Could not open a new Redis connection.");
                    }
                }
            }
            // Swapped in only once connected: a new cluster connection holds every call
            // until it has reached the seeds and every node of the slot map, and a silent
            // node makes that last seconds, for the queues of every other node too.
            Backend::Cluster(cluster) => {
                let stop = CancellationToken::new();
                current.replacing = Some(stop.clone().drop_guard());
                tokio::spawn(replace_cluster_connection(
                    Arc::downgrade(&self.connection),
                    Arc::clone(cluster),
                    generation,
                    stop,
                ));
                tracing::warn!(
                    timeout = ?self.call_timeout,
                    "Redis did not answer in time; opening a new cluster connection."
                );
            }
            // Swapped in only once the sentinels named a primary and it answered: calls
            // meanwhile fail fast on the old one (unavailable, never a stale zero).
            Backend::Sentinel(sentinel) => {
                let stop = CancellationToken::new();
                current.replacing = Some(stop.clone().drop_guard());
                tokio::spawn(replace_primary_connection(
                    Arc::downgrade(&self.connection),
                    Arc::clone(sentinel),
                    self.call_timeout,
                    generation,
                    stop,
                ));
                tracing::warn!("The Redis primary is gone or demoted; asking the sentinels.");
            }
        }
    }
}

/// Whether a failed call in Sentinel mode means the primary may have changed: the
/// connection failed, or the node no longer takes writes.
fn primary_lost(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// Asks the sentinels for the primary, connects to it and swaps the connection in for
/// `generation`; ends when connected, failed, timed out or stopped. A failure leaves the
/// old connection, and the next failed call asks again.
async fn replace_primary_connection(
    state: Weak<Mutex<Connection>>,
    sentinel: Arc<SentinelBackend>,
    call_timeout: Duration,
    generation: u64,
    stop: CancellationToken,
) {
    let connected = tokio::select! {
        _ = stop.cancelled() => return,
        connected = async {
            let client = sentinel::find_primary(&sentinel.sentinels, sentinel.find_timeout).await?;
            let manager = tokio::time::timeout(
                call_timeout,
                client.get_connection_manager_with_config(sentinel.config.clone()),
            )
            .await
            .map_err(|_| timed_out_redis(call_timeout))??;
            Ok::<_, redis::RedisError>((client, manager))
        } => connected,
    };
    let Some(state) = state.upgrade() else {
        return;
    };
    let mut current = state.lock().unwrap_or_else(PoisonError::into_inner);
    current.replacing = None;
    match connected {
        Ok((client, manager)) => {
            if current.generation == generation {
                tracing::info!(
                    primary = ?client.get_connection_info().addr(),
                    "Connected to the Redis primary the sentinels name."
                );
                current.link = Link::Standalone(manager);
                current.primary = Some(client);
                current.generation = generation + 1;
            }
        }
        Err(error) => {
            tracing::warn!(%error, "Could not connect to a Redis primary through Sentinel.");
        }
    }
}

/// Connects to the cluster again and swaps the new connection in for `generation`; ends
/// when connected, failed, timed out or stopped (with the last clone of the store).
async fn replace_cluster_connection(
    state: Weak<Mutex<Connection>>,
    cluster: Arc<ClusterBackend>,
    generation: u64,
    stop: CancellationToken,
) {
    let connected = tokio::select! {
        _ = stop.cancelled() => return,
        connected = tokio::time::timeout(
            cluster.connect_timeout,
            cluster.client.get_async_connection_with_config(cluster.config.clone()),
        ) => connected,
    };
    let Some(state) = state.upgrade() else {
        return;
    };
    let mut current = state.lock().unwrap_or_else(PoisonError::into_inner);
    current.replacing = None;
    match connected {
        Ok(Ok(connection)) => {
            if current.generation == generation {
                current.link = Link::Cluster(connection);
                current.generation = generation + 1;
                tracing::info!("Opened a new Redis Cluster connection.");
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "Could not open a new Redis Cluster connection.");
        }
        Err(_) => {
            tracing::warn!(
                timeout = ?cluster.connect_timeout,
                "Could not open a new Redis Cluster connection in time."
            );
        }
    }
}

/// What the URL's node is part of.
enum Topology {
    /// A single Redis (or one that would not say: see [`Topology::read`]).
    Standalone,
    /// A Redis Cluster, with the nodes it reports (primaries and replicas, the node asked
    /// included), each with the connection settings of the node asked.
    Cluster(Vec<redis::ConnectionInfo>),
}

impl Topology {
    /// Asks the node behind `connection`, reached with `asked`: `INFO cluster` says
    /// `cluster_enabled:1` on a cluster node, and `CLUSTER SLOTS` names the nodes.
    async fn read(
        connection: &mut impl redis::aio::ConnectionLike,
        asked: &redis::ConnectionInfo,
    ) -> redis::RedisResult<Topology> {
        let info: String = match redis::cmd("INFO")
            .arg("cluster")
            .query_async(connection)
            .await
        {
            Ok(info) => info,
            // A server that refuses INFO (renamed, or denied by an ACL) is taken for a
            // single Redis, which is how it was used before cluster support.
            Err(error)
                if matches!(
                    error.kind(),
                    redis::ErrorKind::Server(
                        redis::ServerErrorKind::ResponseError | redis::ServerErrorKind::NoPerm
                    ) | redis::ErrorKind::Extension
                ) =>
            {
                tracing::warn!(%error, "Redis refused INFO; taking it for a single node.");
                return Ok(Topology::Standalone);
            }
            Err(error) => return Err(error),
        };
        if !info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Ok(Topology::Standalone);
        }
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(connection)
            .await?;
        Ok(Topology::Cluster(cluster_nodes(&slots, asked)))
    }
}

/// The nodes named in a `CLUSTER SLOTS` reply, deduplicated, with the settings of `asked`
/// (credentials, TLS). An empty host means the node asked; `?` an unknown endpoint, skipped.
fn cluster_nodes(slots: &Value, asked: &redis::ConnectionInfo) -> Vec<redis::ConnectionInfo> {
    let asked_host = match asked.addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host,
        // Cluster nodes are only ever reported by IP or name and port, not as sockets.
        _ => return Vec::new(),
    };
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut nodes: Vec<redis::ConnectionInfo> = Vec::new();
    // Each range is [first slot, last slot, primary, replicas...], each node [host, port, ...].
    let endpoints = ranges
        .iter()
        .filter_map(|range| match range {
            Value::Array(items) => Some(items.iter().skip(2)),
            _ => None,
        })
        .flatten()
        .filter_map(|node| match node {
            Value::Array(fields) => Some((
                String::from_redis_value_ref(fields.first()?).ok()?,
                u16::from_redis_value_ref(fields.get(1)?).ok()?,
            )),
            _ => None,
        });
    for (host, port) in endpoints {
        let host = match host.as_str() {
            "" => asked_host.clone(),
            "?" => continue,
            _ => host,
        };
        let addr = match asked.addr() {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        if !nodes.iter().any(|node| *node.addr() == addr) {
            nodes.push(asked.clone().set_addr(addr));
        }
    }
    nodes
}

fn timed_out(after: Duration) -> QueueError {
    QueueError::Unavailable(timed_out_redis(after))
}

fn decode<T: FromRedisValue>(value: Value, what: &str) -> Result<T, QueueError> {
    redis::from_redis_value(value)
        .map_err(|error| QueueError::Corrupt(format!("unexpected {what}: {error}")))
}

fn parse_ticket_id(id: String) -> Result<TicketId, QueueError> {
    id.parse()
        .map_err(|error: InvalidTicketId| QueueError::Corrupt(error.to_string()))
}

fn parse_state(state: &str) -> Result<TicketState, QueueError> {
    state
        .parse()
        .map_err(|error: UnknownTicketState| QueueError::Corrupt(error.to_string()))
}

fn parse_demand(counts: HashMap<String, u64>) -> Result<Demand, QueueError> {
    counts
        .into_iter()
        .map(|(kind, count)| {
            kind.parse::<EgressKind>()
                .map(|kind| (kind, count))
                .map_err(|error| QueueError::Corrupt(error.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Demand::from_counts)
}

/// A ticket from the fields of its hash.
fn parse_ticket(id: TicketId, mut fields: HashMap<String, String>) -> Result<Ticket, QueueError> {
    let corrupt = |what: String| QueueError::Corrupt(format!("ticket {id}: {what}"));
    let mut required = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| corrupt(format!("field {name:?} is missing")))
    };
    let state = required("state")?;
    let kind = required("kind")?;
    let room_name = required("room")?;
    let dedup_key = required("dedup")?;
    let enqueued_at = required("enqueued_at")?;
    let number = |name: &str, text: String| {
        text.parse::<u64>()
            .map_err(|_| corrupt(format!("field {name:?} is not a number: {text:?}")))
    };
    let mut optional_number = |name: &str| {
        fields
            .remove(name)
            .map(|text| number(name, text))
            .transpose()
    };
    Ok(Ticket {
        state: state
            .parse()
            .map_err(|error: UnknownTicketState| corrupt(error.to_string()))?,
        kind: kind
            .parse()
            .map_err(|error: crate::model::UnknownKind| corrupt(error.to_string()))?,
        room_name,
        dedup_key,
        enqueued_at_ms: number("enqueued_at", enqueued_at)?,
        started_at_ms: optional_number("started_at")?,
        ended_at_ms: optional_number("ended_at")?,
        dispatching_at_ms: optional_number("dispatching_at")?,
        unsettled_at_ms: optional_number("unsettled_at")?,
        cancel_requested_at_ms: optional_number("cancel_requested")?,
        request: fields.remove("request"),
        egress_id: fields.remove("egress_id"),
        error: fields.remove("error"),
        attempt_id: fields.remove("attempt"),
        id,
    })
}

/// A notice from [`run_event_listener`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEvent {
    /// Something changed in this queue.
    Changed(QueueName),
    /// The subscription was (re)established: changes may have been missed, so re-read
    /// every queue.
    Resync,
}

/// First wait before subscribing again; it doubles on each failure.
const LISTENER_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait before subscribing again.
const LISTENER_BACKOFF_LAST: Duration = Duration::from_secs(2);
/// Limit on connecting and subscribing.
const LISTENER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A silent subscription is checked this often, so a dead connection is noticed.
const LISTENER_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Subscribes to the events of every queue and forwards each as [`QueueEvent::Changed`];
/// sends [`QueueEvent::Resync`] after every (re)subscription; resubscribes with backoff
/// (100 ms doubling to 2 s) when Redis goes away; returns when `shutdown` is cancelled.
///
/// `client` is [`QueueStore::client`]: the URL's node. On a Redis Cluster, where `PUBLISH`
/// reaches every node, one subscription on one node hears every queue; the listener learns
/// the other nodes from the node it subscribed on, and subscribes on one of them when the
/// URL's node does not answer. Given [`QueueStore::event_source`] of a store in Sentinel
/// mode, it subscribes on the primary the sentinels name at each subscription: after a
/// failover the old primary's connection fails (or its `PING` goes unanswered), and the
/// listener subscribes on the new one.
pub async fn run_event_listener(
    source: impl Into<EventSource>,
    events: broadcast::Sender<QueueEvent>,
    shutdown: CancellationToken,
) {
    let mut nodes = match source.into().0 {
        Source::Node(client) => EventNodes {
            seed: Some(*client),
            sentinel: None,
            known: KnownNodes::Unknown,
        },
        Source::Sentinel(sentinel) => EventNodes {
            seed: None,
            sentinel: Some(sentinel),
            known: KnownNodes::Standalone,
        },
    };
    let mut backoff = LISTENER_BACKOFF_FIRST;
    loop {
        let session = tokio::select! {
            _ = shutdown.cancelled() => return,
            session = listen(&mut nodes, &events) => session,
        };
        if session.subscribed {
            backoff = LISTENER_BACKOFF_FIRST;
        }
        tracing::warn!(
            error = %session.error,
            retry_in = ?backoff,
            "Queue event subscription lost."
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LISTENER_BACKOFF_LAST);
    }
}

/// Where [`run_event_listener`] subscribes: a node (`From<redis::Client>`, the URL's), or
/// the primary the sentinels name ([`QueueStore::event_source`]).
#[derive(Debug, Clone)]
pub struct EventSource(Source);

#[derive(Debug, Clone)]
enum Source {
    /// The URL's node, and the other nodes of its cluster (boxed: a client is large).
    Node(Box<redis::Client>),
    /// The sentinels of a store in Sentinel mode.
    Sentinel(Arc<SentinelBackend>),
}

impl From<redis::Client> for EventSource {
    fn from(client: redis::Client) -> Self {
        EventSource(Source::Node(Box::new(client)))
    }
}

/// Where the event listener may subscribe.
struct EventNodes {
    /// The URL's node, always tried first (behind a Service name it may be any node); none
    /// in Sentinel mode.
    seed: Option<redis::Client>,
    /// In Sentinel mode, asked for the primary before each subscription.
    sentinel: Option<Arc<SentinelBackend>>,
    known: KnownNodes,
}

/// What the event listener learned about the URL's Redis.
enum KnownNodes {
    /// Not asked yet, or it did not answer.
    Unknown,
    /// A single Redis: there is nowhere else to subscribe.
    Standalone,
    /// The nodes of the cluster other than the URL's, as of the last subscription.
    Cluster(Vec<redis::Client>),
}

impl EventNodes {
    /// Subscribes on the first node that accepts within [`LISTENER_CONNECT_TIMEOUT`]: the
    /// URL's node, then the other known nodes of the cluster in turn.
    async fn subscribe(&self) -> Result<(redis::Client, redis::aio::PubSub), redis::RedisError> {
        let others = match &self.known {
            KnownNodes::Cluster(others) => others.as_slice(),
            KnownNodes::Unknown | KnownNodes::Standalone => &[],
        };
        let primary = match &self.sentinel {
            Some(sentinel) => {
                Some(sentinel::find_primary(&sentinel.sentinels, sentinel.find_timeout).await?)
            }
            None => None,
        };
        let mut last_error = None;
        for node in self.seed.iter().chain(primary.as_ref()).chain(others) {
            let attempt = tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, async {
                let mut pubsub = node.get_async_pubsub().await?;
                pubsub.psubscribe(EVENTS_PATTERN).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match attempt {
                Ok(Ok(pubsub)) => return Ok((node.clone(), pubsub)),
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => last_error = Some(timed_out_redis(LISTENER_CONNECT_TIMEOUT)),
            }
        }
        Err(last_error.expect("the URL's node or the primary is always tried"))
    }

    /// Asks `node` which nodes its cluster has, on a separate connection (a subscribed one
    /// takes no other command). A single Redis is asked once; a cluster on every
    /// subscription, as its nodes come and go. Failures keep what was known.
    async fn learn(&mut self, node: &redis::Client) {
        if matches!(self.known, KnownNodes::Standalone) {
            return;
        }
        let topology = tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, async {
            let mut connection = node.get_multiplexed_async_connection().await?;
            Topology::read(&mut connection, node.get_connection_info()).await
        })
        .await;
        match topology {
            Ok(Ok(Topology::Standalone)) => self.known = KnownNodes::Standalone,
            Ok(Ok(Topology::Cluster(nodes))) => {
                let seed = self
                    .seed
                    .as_ref()
                    .map(|seed| seed.get_connection_info().addr());
                let others = nodes
                    .into_iter()
                    .filter(|info| Some(info.addr()) != seed)
                    .filter_map(|info| redis::Client::open(info).ok())
                    .collect();
                self.known = KnownNodes::Cluster(others);
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "Could not list the Redis nodes for queue events.");
            }
            Err(_) => {
                tracing::debug!("Listing the Redis nodes for queue events timed out.");
            }
        }
    }
}

/// How a subscription session ended.
struct Lost {
    /// Whether it got as far as subscribing.
    subscribed: bool,
    error: redis::RedisError,
}

/// One subscription session, until the connection is lost.
async fn listen(nodes: &mut EventNodes, events: &broadcast::Sender<QueueEvent>) -> Lost {
    let (node, pubsub) = match nodes.subscribe().await {
        Ok(subscribed) => subscribed,
        Err(error) => {
            return Lost {
                subscribed: false,
                error,
            };
        }
    };
    tracing::debug!(node = ?node.get_connection_info().addr(), "Subscribed to queue events.");
    // Nobody listening is not an error: the receivers come and go.
    let _ = events.send(QueueEvent::Resync);
    // Messages wait in the subscription meanwhile.
    nodes.learn(&node).await;
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(LISTENER_PING_INTERVAL);
    ping.reset();
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    if let Some(queue) = queue_of_channel(message.get_channel_name()) {
                        let _ = events.send(QueueEvent::Changed(queue));
                    }
                }
                None => {
                    return Lost {
                        subscribed: true,
                        error: redis::RedisError::from(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "the subscription connection closed",
                        )),
                    };
                }
            },
            _ = ping.tick() => {
                let answer =
                    tokio::time::timeout(LISTENER_CONNECT_TIMEOUT, sink.ping::<Value>()).await;
                let error = match answer {
                    Ok(Ok(_)) => continue,
                    Ok(Err(error)) => error,
                    Err(_) => timed_out_redis(LISTENER_CONNECT_TIMEOUT),
                };
                return Lost { subscribed: true, error };
            }
        }
    }
}

fn timed_out_redis(after: Duration) -> redis::RedisError {
    redis::RedisError::from(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer within {after:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str) -> QueueName {
        name.parse().unwrap()
    }

    #[test]
    fn ticket_ids_name_their_queue() {
        let id = TicketId::generate(&queue("eu-west_1"));
        let (name, hex) = id.as_str().split_once('.').unwrap();
        assert_eq!(name, "eu-west_1");
        assert_eq!(hex.len(), 32);
        assert_eq!(id.queue(), queue("eu-west_1"));
        assert_eq!(id.to_string().parse::<TicketId>(), Ok(id.clone()));
        assert_ne!(
            TicketId::generate(&queue("q")),
            TicketId::generate(&queue("q"))
        );
    }

    #[test]
    fn malformed_ticket_ids_are_refused() {
        let hex = "0123456789abcdef0123456789abcdef";
        assert!(format!("q.{hex}").parse::<TicketId>().is_ok());
        for bad in [
            String::new(),
            hex.to_owned(),
            format!(".{hex}"),
            format!("q.{}", hex.to_uppercase()),
            format!("q.{}", &hex[1..]),
            format!("q.{hex}0"),
            format!("q:x.{hex}"),
            format!("q.{}", "g".repeat(32)),
            format!("{}.{hex}", "q".repeat(65)),
        ] {
            assert!(bad.parse::<TicketId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ticket_ids_and_states_are_plain_strings_in_json() {
        let id: TicketId = "q.0123456789abcdef0123456789abcdef".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, r#""q.0123456789abcdef0123456789abcdef""#);
        assert_eq!(serde_json::from_str::<TicketId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<TicketId>(r#""nope""#).is_err());
        for state in TicketState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(state.as_str().parse::<TicketState>(), Ok(state));
        }
        assert!("Queued".parse::<TicketState>().is_err());
    }

    #[test]
    fn event_channels_round_trip_to_their_queue() {
        let name = queue("default");
        assert_eq!(events_channel(&name), "egress-scaler:{default}:events");
        assert_eq!(queue_of_channel(&events_channel(&name)), Some(name));
        assert_eq!(queue_of_channel("egress-scaler:{bad name}:events"), None);
        assert_eq!(queue_of_channel("something:else"), None);
    }

    #[test]
    fn cluster_nodes_come_from_cluster_slots_with_the_settings_of_the_node_asked() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"0123abcd".to_vec()),
            ])
        };
        let range = |first: i64, last: i64, nodes: Vec<Value>| {
            Value::Array([vec![Value::Int(first), Value::Int(last)], nodes].concat())
        };
        let slots = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 6379), node("10.0.0.4", 6379)],
            ),
            range(5461, 10922, vec![node("", 6380)]),
            range(10923, 16000, vec![node("?", 6381)]),
            range(16001, 16383, vec![node("10.0.0.1", 6379)]),
        ]);
        let asked = redis::Client::open("redis://:secret@seed.example:6380/")
            .unwrap()
            .get_connection_info()
            .clone();
        let nodes = cluster_nodes(&slots, &asked);
        let addresses: Vec<String> = nodes.iter().map(|info| info.addr().to_string()).collect();
        assert_eq!(
            addresses,
            ["10.0.0.1:6379", "10.0.0.4:6379", "seed.example:6380"]
        );
        assert!(
            nodes
                .iter()
                .all(|info| info.redis_settings().password() == Some("secret"))
        );
        assert!(cluster_nodes(&Value::Nil, &asked).is_empty());
    }

    #[test]
    fn deliveries_are_known_by_event_id_and_body() {
        let body = br#"{"event":"room_started","id":"EV_abc"}"#;
        let delivery = DeliveryId::new("EV_abc", body);
        assert!(delivery.as_str().starts_with("EV_abc:"));
        assert_eq!(delivery.as_str().len(), "EV_abc:".len() + 64);
        assert_eq!(delivery, DeliveryId::new("EV_abc", body));
        assert_ne!(delivery, DeliveryId::new("EV_abd", body));
        assert_ne!(delivery, DeliveryId::new("EV_abc", b"{}"));
        // No id, or one unfit for a key: the body's digest alone.
        assert!(DeliveryId::new("", body).as_str().starts_with("-:"));
        assert!(DeliveryId::new("a b:*", body).as_str().starts_with("-:"));
    }

    #[test]
    fn only_noeviction_is_safe() {
        assert_eq!(
            EvictionPolicy::parse("noeviction"),
            EvictionPolicy::NoEviction
        );
        assert!(EvictionPolicy::parse("noeviction").warning().is_none());
        let lru = EvictionPolicy::parse("allkeys-lru");
        assert!(!lru.is_safe());
        assert_eq!(lru.name(), "allkeys-lru");
        assert!(lru.warning().unwrap().contains("allkeys-lru"));
        let unknown = EvictionPolicy::Unknown("denied".to_owned());
        assert_eq!(unknown.name(), "unknown");
        assert!(!unknown.is_safe());
    }

    #[test]
    fn error_labels_are_bounded() {
        let unavailable = QueueError::from(timed_out_redis(Duration::from_secs(1)));
        assert_eq!(unavailable.metric_label(), "unavailable");
        assert!(
            unavailable
                .to_string()
                .starts_with("redis is unavailable: ")
        );
        assert_eq!(QueueError::Corrupt("x".into()).metric_label(), "corrupt");
    }

    #[test]
    fn tickets_missing_fields_are_corrupt() {
        let id = TicketId::generate(&queue("q"));
        let fields = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let complete = [
            ("state", "active"),
            ("kind", "track"),
            ("room", "r"),
            ("dedup", "track:r"),
            ("enqueued_at", "5"),
            ("started_at", "7"),
            ("egress_id", "EG"),
        ];
        let ticket = parse_ticket(id.clone(), fields(&complete)).unwrap();
        assert_eq!(ticket.state, TicketState::Active);
        assert_eq!(ticket.started_at_ms, Some(7));
        assert!(matches!(
            parse_ticket(id.clone(), fields(&complete[1..])),
            Err(QueueError::Corrupt(_))
        ));
        let mut bad_time = complete;
        bad_time[4] = ("enqueued_at", "soon");
        assert!(matches!(
            parse_ticket(id, fields(&bad_time)),
            Err(QueueError::Corrupt(_))
        ));
    }
}
