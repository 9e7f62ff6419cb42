//! A stand-in for livekit-server's egress API (DESIGN.md 2.3), for tests, benchmarks and the
//! `demo` command. Nothing is recorded: an "egress" is a record here plus one more job in the
//! metrics of an egress pod stand-in.
//!
//! What it follows:
//! - Twirp `POST /twirp/livekit.Egress/<Method>` in JSON or protobuf (answering in the same),
//!   errors as `{"code","msg","meta"}` with the Twirp HTTP status;
//! - `Authorization: Bearer <JWT>`, HS256, `iss` = the API key, `exp`, `video.roomRecord`;
//! - the room must exist (`not_found` otherwise), except for web egress;
//! - a start is given to a pod by the admission rule of DESIGN.md 2.1, busy pods first
//!   ([`crate::model::choose_pod`]); with no pod free it keeps trying for the configurable
//!   no-capacity delay (livekit-server's internal retry, 18-27 s for real) and then answers
//!   `unavailable` / "no response from servers";
//! - the egress ID is made by the server on each call: there is no idempotency key;
//! - a start goes on even when the caller has gone: with a claim or answer delay longer than
//!   the caller's timeout, the egress starts although the caller never hears of it (a late
//!   claim);
//! - `ListEgress` (`room_name`, `egress_id`, `active`) and `StopEgress`;
//! - signed webhooks (`room_started`, `room_finished`, `egress_started`, `egress_ended`) to a
//!   configured URL: `Authorization: <JWT>` without "Bearer" whose `sha256` claim is the
//!   base64 SHA-256 of the body, content type `application/webhook+json`; they can be turned
//!   off to play lost deliveries.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use livekit_api::access_token::{AccessToken, TokenVerifier};
use livekit_protocol as proto;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::egress_request::StartRequest;
use crate::model::{EgressKind, PodLoad, Settings, choose_pod, reported_type};
use crate::standin::EgressPodStandIn;

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct LiveKitStandInOptions {
    /// API key that tokens must be issued by (and webhooks are signed with).
    pub api_key: String,
    /// API secret.
    pub api_secret: String,
    /// Pod CPU and cost table used to place jobs on the pods.
    pub settings: Settings,
    /// How long a start waits for a free pod before `unavailable` (real: 18-27 s).
    pub no_capacity_delay: Duration,
    /// Each egress ends this long after it started; `None`: until stopped or ended by a call.
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
            no_capacity_delay: Duration::from_secs(20),
            egress_duration: None,
            webhook_url: None,
            any_room_exists: false,
        }
    }
}

/// One egress the stand-in started.
#[derive(Debug, Clone)]
pub struct StartedEgress {
    /// The ID it made.
    pub egress_id: String,
    /// The room (empty for web egress).
    pub room_name: String,
    /// Its kind.
    pub kind: EgressKind,
    /// The request exactly as received.
    pub request: StartRequest,
    /// The pod that took it (its `node_id`).
    pub node_id: String,
    /// When the start call arrived.
    pub requested_at: Instant,
    /// When the egress started.
    pub started_at: Instant,
}

/// A scripted answer for the next start call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwirpFailure {
    /// Twirp code, e.g. `invalid_argument`.
    pub code: &'static str,
    /// Message.
    pub msg: String,
}

#[derive(Debug)]
struct Egress {
    info: proto::EgressInfo,
    node_id: String,
    reported_type: &'static str,
}

#[derive(Debug, Default)]
struct ServerState {
    pods: Vec<EgressPodStandIn>,
    rooms: BTreeMap<String, proto::Room>,
    egress: BTreeMap<String, Egress>,
    started: Vec<StartedEgress>,
    scripted: VecDeque<TwirpFailure>,
    claim_delay: Duration,
    answer_delay: Duration,
    webhooks_on: bool,
    webhook_url: Option<String>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    options: LiveKitStandInOptions,
    verifier: TokenVerifier,
    state: Mutex<ServerState>,
    webhooks: mpsc::UnboundedSender<(String, proto::WebhookEvent)>,
    start_calls: AtomicU64,
    list_calls: AtomicU64,
    /// Ends the server, the webhook sender and every pending start or end timer.
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

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{:06}{}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
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
        let (webhooks, queue) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            addr,
            verifier: TokenVerifier::with_api_key(&options.api_key, &options.api_secret),
            state: Mutex::new(ServerState {
                pods,
                webhooks_on: true,
                webhook_url: options.webhook_url.clone(),
                ..ServerState::default()
            }),
            webhooks,
            start_calls: AtomicU64::new(0),
            list_calls: AtomicU64::new(0),
            stop: stop.clone(),
            options,
        });
        tokio::spawn(send_webhooks(inner.options.clone(), queue, stop.clone()));
        let app = axum::Router::new()
            .route("/twirp/livekit.Egress/{method}", axum::routing::post(twirp))
            .with_state(Arc::downgrade(&inner));
        tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
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
        self.inner.webhook("room_started", Some(room), None);
    }

    /// Closes a room: its egress end, then `room_finished` is sent.
    pub fn finish_room(&self, name: &str) {
        let room = self.state().rooms.remove(name);
        let ids: Vec<String> = self
            .state()
            .egress
            .values()
            .filter(|e| e.info.room_name == name && is_active(&e.info))
            .map(|e| e.info.egress_id.clone())
            .collect();
        for id in ids {
            self.inner
                .end_egress(&id, proto::EgressStatus::EgressComplete);
        }
        let room = room.unwrap_or_else(|| proto::Room {
            name: name.to_owned(),
            ..proto::Room::default()
        });
        self.inner.webhook("room_finished", Some(room), None);
    }

    /// Ends an active egress (as if its recording stopped) and sends `egress_ended`.
    pub fn end_egress(&self, egress_id: &str) -> bool {
        self.inner
            .end_egress(egress_id, proto::EgressStatus::EgressComplete)
    }

    /// Ends every active egress.
    pub fn end_all(&self) {
        let ids: Vec<String> = self
            .state()
            .egress
            .values()
            .filter(|e| is_active(&e.info))
            .map(|e| e.info.egress_id.clone())
            .collect();
        for id in ids {
            self.end_egress(&id);
        }
    }

    /// Every start call waits this long before it looks for a pod (0: at once).
    pub fn set_claim_delay(&self, delay: Duration) {
        self.state().claim_delay = delay;
    }

    /// Every start call waits this long after its outcome before answering (0: at once).
    pub fn set_answer_delay(&self, delay: Duration) {
        self.state().answer_delay = delay;
    }

    /// The next start call answers this Twirp error instead (calls queue up in order).
    pub fn fail_next_start(&self, code: &'static str, msg: &str) {
        self.state().scripted.push_back(TwirpFailure {
            code,
            msg: msg.to_owned(),
        });
    }

    /// Sends the webhooks from now on to `url` (`None`: nowhere).
    pub fn set_webhook_url(&self, url: Option<String>) {
        self.state().webhook_url = url;
    }

    /// Sends webhooks (true, the default) or drops them, like a lossy delivery.
    pub fn set_webhooks(&self, on: bool) {
        self.state().webhooks_on = on;
    }

    /// Every egress ever started, in start order.
    pub fn started(&self) -> Vec<StartedEgress> {
        self.state().started.clone()
    }

    /// How many egress were ever started.
    pub fn started_count(&self) -> usize {
        self.state().started.len()
    }

    /// The current record of one egress.
    pub fn egress(&self, egress_id: &str) -> Option<proto::EgressInfo> {
        self.state().egress.get(egress_id).map(|e| e.info.clone())
    }

    /// Egress not ended yet.
    pub fn active_egress(&self) -> Vec<proto::EgressInfo> {
        self.state()
            .egress
            .values()
            .filter(|e| is_active(&e.info))
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

fn is_active(info: &proto::EgressInfo) -> bool {
    info.status < proto::EgressStatus::EgressComplete as i32
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn webhook(
        &self,
        event: &str,
        room: Option<proto::Room>,
        egress_info: Option<proto::EgressInfo>,
    ) {
        let url = {
            let state = self.state();
            match (&state.webhook_url, state.webhooks_on) {
                (Some(url), true) => url.clone(),
                _ => return,
            }
        };
        let _ = self.webhooks.send((
            url,
            proto::WebhookEvent {
                event: event.to_owned(),
                room,
                egress_info,
                id: new_id("EV"),
                created_at: unix_nanos() / 1_000_000_000,
                ..proto::WebhookEvent::default()
            },
        ));
    }

    fn end_egress(&self, egress_id: &str, status: proto::EgressStatus) -> bool {
        let info = {
            let mut state = self.state();
            let ServerState { egress, pods, .. } = &mut *state;
            let Some(egress) = egress.get_mut(egress_id) else {
                return false;
            };
            if !is_active(&egress.info) {
                return false;
            }
            let now = unix_nanos();
            egress.info.status = status as i32;
            egress.info.ended_at = now;
            egress.info.updated_at = now;
            if let Some(pod) = pods.iter().find(|p| p.node_id() == egress.node_id) {
                pod.remove_job(egress.reported_type);
            }
            egress.info.clone()
        };
        self.webhook("egress_ended", None, Some(info));
        true
    }

    /// Looks for a pod once; on success the egress exists and its pod counts the job.
    fn try_start(
        self: &Arc<Self>,
        request: &StartRequest,
        requested_at: Instant,
    ) -> Option<proto::EgressInfo> {
        let kind = request.kind();
        let settings = &self.options.settings;
        let info = {
            let mut state = self.state();
            let loads: Vec<PodLoad> = state
                .pods
                .iter()
                .map(|pod| {
                    let active = pod.active();
                    PodLoad {
                        ready: pod.takes_jobs(),
                        jobs: active.values().sum(),
                        used: active
                            .iter()
                            .map(|(t, n)| settings.costs.cost_of_reported_type(t) * n)
                            .sum(),
                        video_ok: true,
                    }
                })
                .collect();
            let index = choose_pod(settings, &loads, kind)?;
            let pod = state.pods[index].clone();
            let reported = reported_type(kind);
            pod.add_job(reported);
            let now = unix_nanos();
            let room_name = request.room_name().unwrap_or_default().to_owned();
            let room_id = state
                .rooms
                .get(&room_name)
                .map(|room| room.sid.clone())
                .unwrap_or_default();
            let info = proto::EgressInfo {
                egress_id: new_id("EG"),
                room_id,
                room_name: room_name.clone(),
                status: proto::EgressStatus::EgressActive as i32,
                started_at: now,
                updated_at: now,
                request: Some(request.to_info_request()),
                ..proto::EgressInfo::default()
            };
            state.egress.insert(
                info.egress_id.clone(),
                Egress {
                    info: info.clone(),
                    node_id: pod.node_id().to_owned(),
                    reported_type: reported,
                },
            );
            state.started.push(StartedEgress {
                egress_id: info.egress_id.clone(),
                room_name,
                kind,
                request: request.clone(),
                node_id: pod.node_id().to_owned(),
                requested_at,
                started_at: Instant::now(),
            });
            info
        };
        self.webhook("egress_started", None, Some(info.clone()));
        if let Some(duration) = self.options.egress_duration {
            let weak = Arc::downgrade(self);
            let id = info.egress_id.clone();
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(duration) => {
                        if let Some(inner) = weak.upgrade() {
                            inner.end_egress(&id, proto::EgressStatus::EgressComplete);
                        }
                    }
                }
            });
        }
        Some(info)
    }

    /// The whole start: claim delay, then looking for a pod until the no-capacity delay.
    async fn start(
        self: Arc<Self>,
        request: StartRequest,
        requested_at: Instant,
    ) -> Result<Answer, Failure> {
        let claim_delay = self.state().claim_delay;
        if !claim_delay.is_zero() {
            tokio::time::sleep(claim_delay).await;
        }
        let deadline = Instant::now() + self.options.no_capacity_delay;
        loop {
            if let Some(info) = self.try_start(&request, requested_at) {
                return Ok(Answer::Info(Box::new(info)));
            }
            if Instant::now() >= deadline {
                return Err(twirp_error("unavailable", "no response from servers"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What one call answers.
enum Answer {
    Info(Box<proto::EgressInfo>),
    List(proto::ListEgressResponse),
}

/// A Twirp error answer.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    msg: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            twirp_status(self.code),
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "code": self.code, "msg": self.msg, "meta": {} }).to_string(),
        )
            .into_response()
    }
}

fn twirp_status(code: &str) -> StatusCode {
    match code {
        "invalid_argument" | "malformed" | "out_of_range" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" | "bad_route" => StatusCode::NOT_FOUND,
        "already_exists" | "aborted" => StatusCode::CONFLICT,
        "failed_precondition" => StatusCode::PRECONDITION_FAILED,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        "canceled" => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn twirp_error(code: &'static str, msg: &str) -> Failure {
    Failure {
        code,
        msg: msg.to_owned(),
    }
}

/// The body format of a call, also used for its answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Protobuf,
}

fn decode<T: Message + Default + serde::de::DeserializeOwned>(
    format: Format,
    body: &[u8],
) -> Result<T, Failure> {
    match format {
        Format::Protobuf => T::decode(body).map_err(|e| twirp_error("malformed", &e.to_string())),
        Format::Json => {
            serde_json::from_slice(body).map_err(|e| twirp_error("malformed", &e.to_string()))
        }
    }
}

fn encode<T: Message + serde::Serialize>(format: Format, message: &T) -> Response {
    match format {
        Format::Protobuf => (
            [(header::CONTENT_TYPE, "application/protobuf")],
            message.encode_to_vec(),
        )
            .into_response(),
        Format::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(message).expect("protobuf messages encode as JSON"),
        )
            .into_response(),
    }
}

fn check_auth(inner: &Inner, headers: &HeaderMap) -> Result<(), Failure> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| twirp_error("unauthenticated", "no authorization header"))?;
    let claims = inner
        .verifier
        .verify(token)
        .map_err(|_| twirp_error("unauthenticated", "invalid token"))?;
    if !claims.video.room_record {
        return Err(twirp_error(
            "permission_denied",
            "no permissions to access the room",
        ));
    }
    Ok(())
}

async fn twirp(
    State(inner): State<std::sync::Weak<Inner>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(inner) = inner.upgrade() else {
        return twirp_error("unavailable", "shutting down").into_response();
    };
    let format = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
    {
        Some("application/json") => Format::Json,
        Some("application/protobuf") => Format::Protobuf,
        _ => return twirp_error("malformed", "unexpected content type").into_response(),
    };
    if let Err(failure) = check_auth(&inner, &headers) {
        return failure.into_response();
    }
    match handle(&inner, &method, format, &body).await {
        Ok(Answer::Info(info)) => encode(format, info.as_ref()),
        Ok(Answer::List(list)) => encode(format, &list),
        Err(failure) => failure.into_response(),
    }
}

async fn handle(
    inner: &Arc<Inner>,
    method: &str,
    format: Format,
    body: &[u8],
) -> Result<Answer, Failure> {
    let request = match method {
        "StartRoomCompositeEgress" => {
            StartRequest::RoomComposite(decode::<proto::RoomCompositeEgressRequest>(format, body)?)
        }
        "StartWebEgress" => StartRequest::Web(decode::<proto::WebEgressRequest>(format, body)?),
        "StartParticipantEgress" => {
            StartRequest::Participant(decode::<proto::ParticipantEgressRequest>(format, body)?)
        }
        "StartTrackCompositeEgress" => StartRequest::TrackComposite(decode::<
            proto::TrackCompositeEgressRequest,
        >(format, body)?),
        "StartTrackEgress" => {
            StartRequest::Track(decode::<proto::TrackEgressRequest>(format, body)?)
        }
        "ListEgress" => {
            inner.list_calls.fetch_add(1, Ordering::Relaxed);
            let request: proto::ListEgressRequest = decode(format, body)?;
            let items = inner
                .state()
                .egress
                .values()
                .filter(|e| request.room_name.is_empty() || e.info.room_name == request.room_name)
                .filter(|e| request.egress_id.is_empty() || e.info.egress_id == request.egress_id)
                .filter(|e| !request.active || is_active(&e.info))
                .map(|e| e.info.clone())
                .collect();
            return Ok(Answer::List(proto::ListEgressResponse {
                items,
                next_page_token: None,
            }));
        }
        "StopEgress" => {
            let request: proto::StopEgressRequest = decode(format, body)?;
            if !inner.end_egress(&request.egress_id, proto::EgressStatus::EgressComplete) {
                return Err(twirp_error("not_found", "egress not found or not active"));
            }
            let info = inner.state().egress[&request.egress_id].info.clone();
            return Ok(Answer::Info(Box::new(info)));
        }
        _ => return Err(twirp_error("bad_route", "no such method")),
    };
    inner.start_calls.fetch_add(1, Ordering::Relaxed);
    let requested_at = Instant::now();
    let (scripted, answer_delay) = {
        let mut state = inner.state();
        (state.scripted.pop_front(), state.answer_delay)
    };
    if let Some(failure) = scripted {
        return Err(Failure {
            code: failure.code,
            msg: failure.msg,
        });
    }
    if let Some(room) = request.room_name()
        && !inner.options.any_room_exists
        && !inner.state().rooms.contains_key(room)
    {
        return Err(twirp_error("not_found", "requested room does not exist"));
    }
    // The start runs on its own: a caller that gives up does not stop it (a late claim).
    let (done, result) = oneshot::channel();
    let stop = inner.stop.clone();
    let work = inner.clone().start(request, requested_at);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            answer = work => { let _ = done.send(answer); }
        }
    });
    let answer = result
        .await
        .map_err(|_| twirp_error("unavailable", "shutting down"))?;
    if !answer_delay.is_zero() {
        tokio::time::sleep(answer_delay).await;
    }
    answer
}

/// Sends the webhooks in order, each signed, until `stop`.
async fn send_webhooks(
    options: LiveKitStandInOptions,
    mut queue: mpsc::UnboundedReceiver<(String, proto::WebhookEvent)>,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(_) => return,
    };
    loop {
        let (url, event) = tokio::select! {
            _ = stop.cancelled() => return,
            event = queue.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        let body = serde_json::to_string(&event).expect("protobuf messages encode as JSON");
        let Ok(token) = sign_webhook(&options.api_key, &options.api_secret, &body) else {
            continue;
        };
        let send = client
            .post(&url)
            .header(header::AUTHORIZATION, token)
            .header(header::CONTENT_TYPE, "application/webhook+json")
            .body(body)
            .send();
        tokio::select! {
            _ = stop.cancelled() => return,
            result = send => {
                if let Err(error) = result {
                    tracing::debug!(%error, "Stand-in webhook not delivered.");
                }
            }
        }
    }
}

/// The `Authorization` value of a webhook: a JWT whose `sha256` claim is the body's hash.
pub fn sign_webhook(api_key: &str, api_secret: &str, body: &str) -> Result<String, String> {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()));
    AccessToken::with_api_key(api_key, api_secret)
        .with_sha256(&hash)
        .with_ttl(Duration::from_secs(300))
        .to_jwt()
        .map_err(|e| e.to_string())
}
