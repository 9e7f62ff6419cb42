//! A stand-in for livekit-server's egress API (DESIGN.md 2.3, FIDELITY.md 1-3), for tests,
//! benchmarks and the `demo` command. Nothing is recorded: an "egress" is a record here plus
//! one more job in the metrics of an egress pod stand-in.
//!
//! - [`timing`]: [`StartTiming`], every delay of a start, an egress and a webhook, real or
//!   scaled down for tests.
//! - `start`: the psrpc selection of a pod and the retry ladder of one start call.
//! - `lifecycle`: an egress's statuses and the webhooks they send.
//! - `twirp`: the HTTP side: authentication, routing, decoding, errors.
//! - `webhooks`: signed delivery, one FIFO per resource, with retries.
//!
//! What it follows:
//! - **Start timing** (psrpc): every pod that takes jobs and admits the job (DESIGN.md 2.1)
//!   bids; a busy pod's bid wins at once, idle pods' bids are weighed `bid_window` after the
//!   first (ties go to the first pod in list order: bids here arrive in list order); with no
//!   bid the attempt ends after `attempt_timeout`. The winner re-checks admission (a bid
//!   reserves nothing, so two concurrent starts can pick the same idle pod and the second is
//!   refused `unavailable` "not enough CPU"), stores the egress (STARTING, `egress_started`)
//!   and answers `launch` later. Refused or unanswered attempts are retried **with the same
//!   egress ID** after 1-2 s, then 2-4 s (3 attempts), the cycle up to 3 times: 18-27 s and
//!   then 503 `unavailable` "twirp error unknown: no response from servers". A winner slower
//!   than its pod timeout (10/20/40 s) is retried with the same ID: the same pod answers
//!   `already_exists`, another pod starts a second copy under that ID.
//! - **The answer**: `EgressInfo` STARTING, `started_at` = `updated_at` = now (ns),
//!   `room_id`/`room_name` (empty for web), `source_type`, the request with credentials and
//!   stream keys redacted ([`crate::egress_redact::redact`]) and `*_results` pre-filled from
//!   its outputs (file names not templated).
//! - **Statuses**: STARTING -> ACTIVE (`active_after`) -> ENDING -> COMPLETE (`ending_for`,
//!   the pod's job ends then), FAILED with `error`, ABORTED when stopped while STARTING;
//!   `egress_updated` on ACTIVE and ENDING, `egress_ended` on the final status. An orphaned
//!   egress (its pod died) stays STARTING/ACTIVE for ever.
//! - **ListEgress**: a non-empty `egress_id` is exclusive, unknown or swept -> `not_found`; a
//!   room filter never answers `not_found`; `active` keeps STARTING/ACTIVE/ENDING; one page.
//! - **Errors**: a token that does not verify, an unknown key or a header without `Bearer `
//!   -> 401 plain text; no `roomRecord` (or no token) -> 401 `unauthenticated` "permissions
//!   denied"; wrong content type or unknown method -> 404 `bad_route` after authentication;
//!   bodies without `meta` when it is empty; psrpc messages prefixed `twirp error unknown: `;
//!   `deadline_exceeded` 408 when the caller's `X-Twirp-Timeout-Ms` passes.
//! - **Caller gone**: a caller that closes its connection stops the retry ladder at its next
//!   step, but an attempt under way still starts the egress (stored, webhooks, no answer).
//! - **Webhooks**: signed (`Authorization: <JWT>` without "Bearer", `sha256` claim),
//!   `application/webhook+json`, `id` `EV_` + 12 characters kept on retries, `createdAt` in
//!   seconds, egress events with `room {sid,name}`; one FIFO per egress ID or room name;
//!   5 tries on connection errors, 429 and 5xx waiting 1, 2, 4, 8 s; dropped after 30 s.
//! - The room must exist for all but web egress (`not_found`); the server makes the egress
//!   ID: there is no idempotency key.
//!
//! What it does not follow (yet): the pod's validation of the request (`invalid_argument`
//! only with capacity), the expansion of file name templates and `retry_count`, LIMIT_REACHED, coalesced
//! or duplicated `egress_updated`/`egress_ended`, admission by measured CPU and its 15 s
//! reservation (the stand-in charges the static cost table), pulse and memory limits,
//! UpdateLayout and UpdateStream, and the 24 h sweep, which tests run with
//! [`LiveKitServerStandIn::sweep_ended`].

mod lifecycle;
mod start;
pub mod timing;
mod twirp;
mod webhooks;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use livekit_protocol as proto;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::egress_request::StartRequest;
use crate::model::{EgressKind, Settings};
use crate::standin::EgressPodStandIn;

pub use timing::StartTiming;
pub use webhooks::sign_webhook;

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct LiveKitStandInOptions {
    /// API key that tokens must be issued by (and webhooks are signed with).
    pub api_key: String,
    /// API secret.
    pub api_secret: String,
    /// Pod CPU and cost table used to place jobs on the pods.
    pub settings: Settings,
    /// Delays of starts, statuses and webhooks ([`StartTiming::real`] by default).
    pub timing: StartTiming,
    /// Seed of the random retry waits.
    pub seed: u64,
    /// An upper bound on one start's retry ladder: past it, the next step answers instead of
    /// retrying. The real bound is the ladder itself (18-27 s); the default never cuts it.
    pub no_capacity_delay: Duration,
    /// Each egress is ended (ENDING, then COMPLETE) this long after it started; `None`: until
    /// stopped or ended by a call.
    pub egress_duration: Option<Duration>,
    /// Where webhooks go; `None`: none are sent.
    pub webhook_url: Option<String>,
    /// Every room name counts as an existing room (no `not_found`, no room webhooks).
    pub any_room_exists: bool,
}

impl Default for LiveKitStandInOptions {
    fn default() -> Self {
        LiveKitStandInOptions {
            api_key: "standin-key".to_owned(),
            api_secret: "standin-secret-standin-secret-01".to_owned(),
            settings: Settings::default(),
            timing: StartTiming::real(),
            seed: 1,
            no_capacity_delay: Duration::from_secs(60),
            egress_duration: None,
            webhook_url: None,
            any_room_exists: false,
        }
    }
}

/// One egress a pod started (an egress started twice under one ID, by a same-ID retry that
/// reached another pod, appears twice).
#[derive(Debug, Clone)]
pub struct StartedEgress {
    /// Its ID (made by the server when the start call arrived).
    pub egress_id: String,
    /// The room (empty for web egress).
    pub room_name: String,
    /// Its kind.
    pub kind: EgressKind,
    /// The request exactly as received (the stored one is redacted).
    pub request: StartRequest,
    /// The pod that took it (its `node_id`).
    pub node_id: String,
    /// When the start call arrived.
    pub requested_at: Instant,
    /// When the pod took it (stored, `egress_started` sent).
    pub started_at: Instant,
    /// The psrpc attempt that placed it, counting from 1 across cycles (0: [`LiveKitServerStandIn::start_by_other`]).
    pub attempt: u32,
    /// Started by another actor through [`LiveKitServerStandIn::start_by_other`].
    pub by_other: bool,
}

/// What the next start call does instead of an ordinary start (FIDELITY.md 1: the answers a
/// caller can meet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptedStart {
    /// A Twirp error (JSON body, the code's HTTP status) and nothing started.
    Twirp {
        /// Twirp code, e.g. `invalid_argument`.
        code: &'static str,
        /// Message, as given.
        msg: String,
    },
    /// A plain-text answer (as the authentication middleware gives) and nothing started.
    PlainText {
        /// HTTP status.
        status: u16,
        /// Body.
        body: String,
    },
    /// A proxy's HTML error page: the request never reached livekit-server.
    Html {
        /// HTTP status, e.g. 502.
        status: u16,
    },
    /// The egress starts, but the caller never gets the answer: it is held until the
    /// stand-in stops, past any caller's timeout.
    StartedButLost,
    /// The egress starts, then a proxy answers with an HTML error page.
    StartedThenHtml {
        /// HTTP status, e.g. 502.
        status: u16,
    },
    /// The winning pod answers after this instead of `launch`; past the pod timeout the
    /// server retries with the same ID (and meets `already_exists` on that pod while it runs).
    SlowPod(Duration),
}

#[derive(Debug)]
struct Egress {
    info: proto::EgressInfo,
    /// Pods running it (two after a same-ID retry that reached another pod).
    node_ids: Vec<String>,
    reported_type: &'static str,
    /// Its pod died: no status will ever change.
    orphaned: bool,
}

#[derive(Debug)]
struct ServerState {
    pods: Vec<EgressPodStandIn>,
    rooms: BTreeMap<String, proto::Room>,
    egress: BTreeMap<String, Egress>,
    started: Vec<StartedEgress>,
    scripted: VecDeque<ScriptedStart>,
    claim_delay: Duration,
    answer_delay: Duration,
    rng: StdRng,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    options: LiveKitStandInOptions,
    state: Mutex<ServerState>,
    webhooks: Arc<webhooks::Webhooks>,
    start_calls: AtomicU64,
    list_calls: AtomicU64,
    /// Ends the server, the webhook senders and every pending start or status timer.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The livekit-server stand-in; clones are handles to the same server, which stops when the
/// last one is dropped.
#[derive(Debug, Clone)]
pub struct LiveKitServerStandIn {
    inner: Arc<Inner>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// `PREFIX_` and 12 characters: a counter (so IDs sort by creation) and random ones.
fn new_id(prefix: &str) -> String {
    let count = NEXT_ID.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{count:06}{}", &random[..6])
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl LiveKitServerStandIn {
    /// Starts on 127.0.0.1 (a free port) with these pods.
    pub async fn start(
        options: LiveKitStandInOptions,
        pods: Vec<EgressPodStandIn>,
    ) -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options, pods).await
    }

    /// Starts listening on `addr` (port 0 picks one).
    pub async fn start_on(
        addr: SocketAddr,
        options: LiveKitStandInOptions,
        pods: Vec<EgressPodStandIn>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(ServerState {
                pods,
                rooms: BTreeMap::new(),
                egress: BTreeMap::new(),
                started: Vec::new(),
                scripted: VecDeque::new(),
                claim_delay: Duration::ZERO,
                answer_delay: Duration::ZERO,
                rng: StdRng::seed_from_u64(options.seed),
            }),
            webhooks: webhooks::Webhooks::new(
                &options.api_key,
                &options.api_secret,
                options.webhook_url.clone(),
                options.timing,
                stop.clone(),
            ),
            start_calls: AtomicU64::new(0),
            list_calls: AtomicU64::new(0),
            stop: stop.clone(),
            options,
        });
        twirp::serve(listener, Arc::downgrade(&inner), stop);
        Ok(LiveKitServerStandIn { inner })
    }

    fn state(&self) -> MutexGuard<'_, ServerState> {
        self.inner.state()
    }

    /// `http://ADDR`, the `--livekit-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The options it runs with.
    pub fn options(&self) -> &LiveKitStandInOptions {
        &self.inner.options
    }

    /// Adds an egress pod to the fleet.
    pub fn add_pod(&self, pod: EgressPodStandIn) {
        self.state().pods.push(pod);
    }

    /// Removes the pod with this `node_id` when it runs no egress (checked under the lock that
    /// places jobs, so none lands on it meanwhile); false when it is busy or unknown.
    pub fn remove_idle_pod(&self, node_id: &str) -> bool {
        let mut state = self.state();
        match state.pods.iter().position(|pod| pod.node_id() == node_id) {
            Some(index) if state.pods[index].active().is_empty() => {
                state.pods.remove(index);
                true
            }
            _ => false,
        }
    }

    /// The pods of the fleet.
    pub fn pods(&self) -> Vec<EgressPodStandIn> {
        self.state().pods.clone()
    }

    /// Creates a room and sends `room_started`.
    pub fn create_room(&self, name: &str) {
        let room = proto::Room {
            sid: new_id("RM"),
            name: name.to_owned(),
            creation_time: unix_nanos() / 1_000_000_000,
            ..proto::Room::default()
        };
        self.state().rooms.insert(name.to_owned(), room.clone());
        self.inner.room_webhook("room_started", room);
    }

    /// Closes a room: its egress go ENDING (then COMPLETE), and `room_finished` is sent.
    pub fn finish_room(&self, name: &str) {
        let ids: Vec<String> = self
            .state()
            .egress
            .values()
            .filter(|e| e.info.room_name == name && lifecycle::is_running(&e.info))
            .map(|e| e.info.egress_id.clone())
            .collect();
        for id in ids {
            self.inner.end(&id);
        }
        let room = self.state().rooms.remove(name);
        let room = room.unwrap_or_else(|| proto::Room {
            name: name.to_owned(),
            ..proto::Room::default()
        });
        self.inner.room_webhook("room_finished", room);
    }

    /// Ends a STARTING or ACTIVE egress as its recording stops: ENDING now (`egress_updated`),
    /// COMPLETE after `ending_for` (`egress_ended`, its pod's job ends). False when it is
    /// unknown, already ending or ended, or orphaned.
    pub fn end_egress(&self, egress_id: &str) -> bool {
        self.inner.end(egress_id)
    }

    /// Fails an egress that has not ended: FAILED with `error` at once, `egress_ended`.
    pub fn fail_egress(&self, egress_id: &str, error: &str) -> bool {
        self.inner
            .finish(egress_id, proto::EgressStatus::EgressFailed, error)
            .is_some()
    }

    /// Its pod died: the job leaves the pod, the egress stays STARTING or ACTIVE for ever and
    /// sends nothing more (livekit#1717).
    pub fn orphan_egress(&self, egress_id: &str) -> bool {
        self.inner.orphan(egress_id)
    }

    /// Ended egress leave the store, as livekit-server's sweep does 24 h after they end;
    /// returns how many went.
    pub fn sweep_ended(&self) -> usize {
        let mut state = self.state();
        let before = state.egress.len();
        state
            .egress
            .retain(|_, e| lifecycle::is_listed_active(&e.info));
        before - state.egress.len()
    }

    /// Ends every egress not ending or ended yet, as [`Self::end_egress`].
    pub fn end_all(&self) {
        let ids: Vec<String> = self
            .state()
            .egress
            .values()
            .filter(|e| lifecycle::is_running(&e.info))
            .map(|e| e.info.egress_id.clone())
            .collect();
        for id in ids {
            self.end_egress(&id);
        }
    }

    /// Another actor (the backend itself, another tool) starts an egress now: placed on a pod
    /// as a start would place it (a busy pod that admits it, else the first idle one), stored,
    /// `egress_started` sent. `None` when no pod admits it or its room does not exist.
    pub fn start_by_other(&self, request: StartRequest) -> Option<proto::EgressInfo> {
        self.inner.start_by_other(request)
    }

    /// The pods' bids arrive this long after a start call's first attempt began (0: at once);
    /// the call goes on even when its caller has gone meanwhile.
    pub fn set_claim_delay(&self, delay: Duration) {
        self.state().claim_delay = delay;
    }

    /// Every start call waits this long after its outcome before answering (0: at once).
    pub fn set_answer_delay(&self, delay: Duration) {
        self.state().answer_delay = delay;
    }

    /// The next start call answers this Twirp error and starts nothing (calls queue up in
    /// order with [`Self::script_start`]).
    pub fn fail_next_start(&self, code: &'static str, msg: &str) {
        self.script_start(ScriptedStart::Twirp {
            code,
            msg: msg.to_owned(),
        });
    }

    /// The next start call that passes authentication and decoding plays `outcome`
    /// (outcomes queue up in order).
    pub fn script_start(&self, outcome: ScriptedStart) {
        self.state().scripted.push_back(outcome);
    }

    /// Sends the webhooks from now on to `url` (`None`: nowhere).
    pub fn set_webhook_url(&self, url: Option<String>) {
        self.inner.webhooks.set_url(url);
    }

    /// Sends webhooks (true, the default) or drops them, like a lossy delivery.
    pub fn set_webhooks(&self, on: bool) {
        self.inner.webhooks.set_on(on);
    }

    /// Webhooks (delivered, given up) so far.
    pub fn webhook_counts(&self) -> (u64, u64) {
        self.inner.webhooks.counts()
    }

    /// Every egress ever started, in start order.
    pub fn started(&self) -> Vec<StartedEgress> {
        self.state().started.clone()
    }

    /// How many egress were ever started.
    pub fn started_count(&self) -> usize {
        self.state().started.len()
    }

    /// The current record of one egress (`None` once swept).
    pub fn egress(&self, egress_id: &str) -> Option<proto::EgressInfo> {
        self.state().egress.get(egress_id).map(|e| e.info.clone())
    }

    /// Egress STARTING, ACTIVE or ENDING (orphans included).
    pub fn active_egress(&self) -> Vec<proto::EgressInfo> {
        self.state()
            .egress
            .values()
            .filter(|e| lifecycle::is_listed_active(&e.info))
            .map(|e| e.info.clone())
            .collect()
    }

    /// Start calls received (whatever their outcome).
    pub fn start_calls(&self) -> u64 {
        self.inner.start_calls.load(Ordering::Relaxed)
    }

    /// `ListEgress` calls received.
    pub fn list_calls(&self) -> u64 {
        self.inner.list_calls.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A webhook event with a new ID, made now.
    fn event(
        &self,
        event: &str,
        room: Option<proto::Room>,
        egress_info: Option<proto::EgressInfo>,
    ) -> proto::WebhookEvent {
        proto::WebhookEvent {
            event: event.to_owned(),
            room,
            egress_info,
            id: new_id("EV"),
            created_at: unix_nanos() / 1_000_000_000,
            ..proto::WebhookEvent::default()
        }
    }

    fn room_webhook(&self, event: &str, room: proto::Room) {
        let name = room.name.clone();
        self.webhooks
            .send(&name, self.event(event, Some(room), None));
    }
}
