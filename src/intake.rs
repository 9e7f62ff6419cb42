//! The HTTP API of DESIGN.md 5: enqueue, ticket lookup, cancel, status, `/metrics`,
//! `/healthz`, `/readyz`, the LiveKit webhook route of [`crate::webhook`] and the Twirp front
//! door of [`crate::front_door`]. Bodies are validated here into queue types; errors are JSON with a
//! precise status and never carry internal error text.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use livekit_api::access_token::TokenVerifier;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::ApiCredentials;
use crate::dispatch::lease::{LeaderInfo, read_leader};
use crate::egress_request::{StartRequest, is_line_breaking};
use crate::fleet::{Fleet, FleetView};
use crate::front_door::{self, FrontDoor};
use crate::model::{Decision, EgressKind, PodState, Prewarm, Settings};
use crate::prewarm::{cells_to_read, decide_ahead, expect};
use crate::queue::{
    CancelOutcome, NewRequest, QueueError, QueueName, QueueStore, ServedQueues, Ticket, TicketId,
    TicketState,
};
use crate::telemetry::{DispatchMetrics, EnqueueLabels, EnqueueOutcome, Metrics};
use crate::webhook::{self, MAX_WEBHOOK_BYTES, Webhooks};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The queue.
    pub store: QueueStore,
    /// The fleet observer's view.
    pub fleet: Fleet,
    /// Process settings of the replica model.
    pub settings: Settings,
    /// The queues served; the first is used when a request names none.
    pub queues: ServedQueues,
    /// Token verification, when credentials are configured.
    pub verifier: Option<Arc<TokenVerifier>>,
    /// Own metrics.
    pub metrics: Arc<Metrics>,
    /// The dispatcher's and webhooks' metrics.
    pub dispatch_metrics: Arc<DispatchMetrics>,
    /// The registry served on `/metrics`.
    pub registry: Arc<Registry>,
    /// The webhook receiver, when credentials are configured.
    pub webhooks: Option<Arc<Webhooks>>,
    /// The Twirp front door.
    pub front_door: Arc<FrontDoor>,
}

impl AppState {
    /// Builds the verifier from the API credentials, if any.
    pub fn verifier_for(credentials: Option<&ApiCredentials>) -> Option<Arc<TokenVerifier>> {
        credentials.map(|c| Arc::new(TokenVerifier::with_api_key(&c.key, &c.secret)))
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/requests", axum::routing::post(enqueue))
        .route(
            "/v1/requests/{ticket}",
            get(get_ticket).delete(cancel_ticket),
        )
        .route("/v1/status", get(status))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let mut router = Router::new().merge(api);
    if state.webhooks.is_some() {
        router = router.route(
            "/webhook/livekit",
            axum::routing::post(webhook::receive).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES)),
        );
    }
    router
        .route(
            "/twirp/livekit.Egress/{method}",
            axum::routing::post(front_door::call),
        )
        .route("/settings/regions", get(front_door::regions))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A JSON error answer: `{"error": code, "message": text}`, and the ticket it is about when
/// there is one (`ticket`, `state`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    ticket: Option<(TicketId, TicketState)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            ticket: None,
        }
    }

    fn with_ticket(mut self, ticket: TicketId, state: TicketState) -> Self {
        self.ticket = Some((ticket, state));
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        tracing::warn!(%error, "Queue store call failed.");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the queue store is unavailable; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some((ticket, state)) = self.ticket {
            body["ticket"] = json!(ticket);
            body["state"] = json!(state);
        }
        (self.status, Json(body)).into_response()
    }
}

async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(verifier) = &state.verifier
        && let Err(error) = check_token(verifier, request.headers())
    {
        return error.into_response();
    }
    next.run(request).await
}

fn check_token(verifier: &TokenVerifier, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthenticated =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing Authorization: Bearer <LiveKit access token>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| unauthenticated("Authorization must be Bearer <LiveKit access token>"))?;
    let claims = verifier
        .verify(token.trim())
        .map_err(|_| unauthenticated("the access token is invalid or expired"))?;
    if !claims.video.room_record {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the access token lacks the video.roomRecord grant",
        ));
    }
    Ok(())
}

/// The wall clock in ms since the Unix epoch, the time base of stored tickets.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Body of `POST /v1/requests`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    kind: String,
    room_name: String,
    #[serde(default)]
    request: Option<Value>,
    #[serde(default)]
    dedup_key: Option<String>,
    #[serde(default)]
    queue: Option<String>,
}

/// The body validated into queue types.
struct ValidEnqueue {
    queue: QueueName,
    request: NewRequest,
}

/// Longest caller-given de-duplication key, in bytes.
pub const MAX_DEDUP_KEY_BYTES: usize = 512;

fn validate_enqueue(
    body: Result<Bytes, BytesRejection>,
    queues: &ServedQueues,
) -> Result<ValidEnqueue, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::bad_request("the body could not be read")
        }
    })?;
    let body: EnqueueBody = serde_json::from_slice(&bytes)
        .map_err(|error| ApiError::bad_request(format!("malformed JSON body: {error}")))?;
    let kind: EgressKind = body
        .kind
        .parse()
        .map_err(|error: crate::model::UnknownKind| ApiError::bad_request(error.to_string()))?;
    // Only served queues: a name nobody serves would be a queue nobody dispatches.
    let queue = queues
        .resolve(body.queue.as_deref())
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    if let Some(key) = &body.dedup_key {
        check_dedup_key(key)?;
    }
    // The room name is taken exactly as given (never trimmed) or refused.
    let start = StartRequest::parse(kind, &body.room_name, body.request)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    Ok(ValidEnqueue {
        queue,
        request: NewRequest::new(&start, &body.room_name, body.dedup_key),
    })
}

/// A caller's key is taken exactly: not empty, no whitespace at the ends, no control
/// character, at most [`MAX_DEDUP_KEY_BYTES`].
fn check_dedup_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "dedup_key must not be empty when given",
        ));
    }
    if key.len() > MAX_DEDUP_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "dedup_key is longer than {MAX_DEDUP_KEY_BYTES} bytes"
        )));
    }
    if key.starts_with(char::is_whitespace) || key.ends_with(char::is_whitespace) {
        return Err(ApiError::bad_request(format!(
            "dedup_key {key:?} starts or ends with whitespace"
        )));
    }
    if key.chars().any(is_line_breaking) {
        return Err(ApiError::bad_request(format!(
            "dedup_key {key:?} contains a control character"
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct EnqueueAnswer {
    ticket: TicketId,
    state: TicketState,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

async fn enqueue(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let count = |outcome| {
        state
            .metrics
            .enqueue_requests
            .get_or_create(&EnqueueLabels { outcome })
            .inc();
    };
    let valid = match validate_enqueue(body, &state.queues) {
        Ok(valid) => valid,
        Err(error) => {
            count(EnqueueOutcome::rejected);
            return error.into_response();
        }
    };
    match state
        .store
        .enqueue(&valid.queue, valid.request, now_ms())
        .await
    {
        Ok(enqueued) if enqueued.conflict => {
            count(EnqueueOutcome::conflict);
            ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!(
                    "ticket {} ({}) already holds this recording's de-duplication key with a \
                     different request; cancel it first to change the request, or give a \
                     different recording its own dedup_key",
                    enqueued.ticket, enqueued.state
                ),
            )
            .with_ticket(enqueued.ticket, enqueued.state)
            .into_response()
        }
        Ok(enqueued) => {
            let status = if enqueued.duplicate {
                count(EnqueueOutcome::duplicate);
                StatusCode::OK
            } else {
                count(EnqueueOutcome::accepted);
                tracing::info!(ticket = %enqueued.ticket, position = ?enqueued.position, "Request queued.");
                StatusCode::ACCEPTED
            };
            let answer = EnqueueAnswer {
                ticket: enqueued.ticket,
                state: enqueued.state,
                position: enqueued.position,
                duplicate: enqueued.duplicate,
            };
            (status, Json(answer)).into_response()
        }
        Err(error) => {
            count(EnqueueOutcome::unavailable);
            ApiError::from(error).into_response()
        }
    }
}

fn parse_ticket(raw: &str) -> Result<TicketId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such ticket"))
}

#[derive(Serialize)]
struct TicketAnswer {
    ticket: TicketId,
    state: TicketState,
    kind: EgressKind,
    room_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egress_id: Option<String>,
    enqueued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// A cancel was asked for while it was being started.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cancel_requested: bool,
}

impl TicketAnswer {
    fn new(ticket: Ticket, position: Option<u64>) -> Self {
        TicketAnswer {
            ticket: ticket.id,
            state: ticket.state,
            kind: ticket.kind,
            room_name: ticket.room_name,
            position,
            egress_id: ticket.egress_id,
            enqueued_at: rfc3339(ticket.enqueued_at_ms),
            started_at: ticket.started_at_ms.map(rfc3339),
            ended_at: ticket.ended_at_ms.map(rfc3339),
            error: ticket.error,
            cancel_requested: ticket.cancel_requested_at_ms.is_some()
                && !ticket.state.is_finished(),
        }
    }
}

async fn get_ticket(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<TicketAnswer>, ApiError> {
    let id = parse_ticket(&raw)?;
    let ticket = state
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such ticket"))?;
    let position = if ticket.state == TicketState::Queued {
        state.store.position(&id).await?
    } else {
        None
    };
    Ok(Json(TicketAnswer::new(ticket, position)))
}

async fn cancel_ticket(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_ticket(&raw)?;
    match state.store.cancel(&id, now_ms()).await? {
        CancelOutcome::Cancelled => {
            tracing::info!(ticket = %id, "Request cancelled.");
            Ok((
                StatusCode::OK,
                Json(json!({ "ticket": id, "state": TicketState::Cancelled })),
            ))
        }
        CancelOutcome::Requested => {
            tracing::info!(ticket = %id, "Cancel asked for while the request is being started.");
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "ticket": id,
                    "state": TicketState::Dispatching,
                    "cancel_requested": true,
                })),
            ))
        }
        CancelOutcome::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such ticket",
        )),
        CancelOutcome::NotQueued(current) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "failed_precondition",
            format!(
                "the ticket is {} and can no longer be cancelled",
                current.as_str()
            ),
        )),
    }
}

/// One queue in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Queue name.
    pub queue: String,
    /// Tickets waiting (the pending set).
    pub depth: u64,
    /// Waiting tickets by kind.
    pub queued_by_kind: BTreeMap<String, u64>,
    /// Tickets not yet started (queued or being dispatched) by kind: the demand.
    pub demand_by_kind: BTreeMap<String, u64>,
    /// Seconds the oldest queued ticket has waited.
    pub oldest_wait_seconds: Option<f64>,
    /// Tickets being started right now.
    pub dispatching: u64,
    /// Tickets recording.
    pub active: u64,
    /// Failed tickets kept for inspection.
    pub dead_letters: u64,
    /// The newest dead letters with their errors.
    #[serde(default)]
    pub recent_dead_letters: Vec<DeadLetter>,
    /// The dispatcher leading this queue, if any.
    #[serde(default)]
    pub leader: Option<LeaderStatus>,
    /// Desired replicas with the process settings, when the fleet is known.
    pub desired_replicas: Option<u32>,
    /// Why that many.
    pub reasons: Vec<String>,
    /// The decision in numbers.
    pub decision: Option<Value>,
}

/// A failed ticket in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Ticket id.
    pub ticket: String,
    /// Egress kind.
    pub kind: String,
    /// Room.
    pub room_name: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When it failed.
    pub failed_at: Option<String>,
}

/// The dispatcher lease of a queue in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// The holder's id.
    pub holder: String,
    /// Seconds since it acquired the lease.
    pub lease_age_seconds: Option<f64>,
    /// Seconds before the lease expires unless renewed.
    pub expires_in_seconds: f64,
    /// The current fencing token.
    pub fence: Option<u64>,
}

impl LeaderStatus {
    fn new(info: LeaderInfo, now_ms: u64) -> Self {
        LeaderStatus {
            holder: info.holder,
            lease_age_seconds: info
                .since_ms
                .map(|since| now_ms.saturating_sub(since) as f64 / 1000.0),
            expires_in_seconds: info.expires_in_ms as f64 / 1000.0,
            fence: info.fence,
        }
    }
}

/// Dead letters shown per queue in the status.
const RECENT_DEAD_LETTERS: usize = 5;

/// The fleet in `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetStatus {
    /// False when the source fails or the snapshot is stale.
    pub healthy: bool,
    /// Why it is not healthy.
    pub error: Option<String>,
    /// What an operator should look at although the fleet is trusted (a DNS name that does
    /// not resolve).
    #[serde(default)]
    pub warning: Option<String>,
    /// Age of the snapshot.
    pub snapshot_age_seconds: f64,
    /// Pods by state.
    pub pods_by_state: BTreeMap<String, u64>,
    /// Free CPU of the ready pods, cores.
    pub free_cpu_cores: f64,
    /// Every pod.
    pub pods: Vec<Value>,
}

/// Redis as `GET /v1/status` shows it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RedisStatus {
    /// Its `maxmemory-policy`, or `unknown`.
    pub eviction_policy: String,
    /// True only for `noeviction`: no ticket can be evicted.
    pub eviction_policy_ok: bool,
    /// What is wrong and what to do, when not `noeviction`.
    pub warning: Option<String>,
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// Every served queue, the default first.
    pub queues: Vec<QueueStatus>,
    /// Queues Redis knows that this process does not serve (another deployment's, or left
    /// from an earlier configuration), by name only.
    #[serde(default)]
    pub other_queues: Vec<String>,
    /// The egress fleet.
    pub fleet: FleetStatus,
    /// The Redis holding the queues (absent from servers before it was added).
    #[serde(default)]
    pub redis: RedisStatus,
}

fn to_names(demand: &crate::model::Demand) -> BTreeMap<String, u64> {
    demand
        .iter()
        .map(|(kind, count)| (kind.as_str().to_owned(), count))
        .collect()
}

fn fleet_status(fleet: &Fleet) -> (FleetStatus, Option<Arc<FleetView>>) {
    let (view, error) = match fleet.current() {
        Ok(view) => (view, None),
        Err(error) => (fleet.view(), Some(error.to_string())),
    };
    let pods_by_state = PodState::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), view.count(*state) as u64))
        .collect();
    let status = FleetStatus {
        healthy: error.is_none(),
        error: error.clone(),
        warning: fleet.warning(),
        snapshot_age_seconds: view.age().as_secs_f64(),
        pods_by_state,
        free_cpu_cores: view.free_cpu_cores(),
        pods: view
            .pods
            .iter()
            .map(|pod| serde_json::to_value(pod).unwrap_or(Value::Null))
            .collect(),
    };
    (status, error.is_none().then_some(view))
}

/// Builds the status of every served queue.
pub async fn build_status(state: &AppState) -> Result<StatusAnswer, QueueError> {
    let other_queues = state
        .store
        .queues()
        .await?
        .into_iter()
        .filter(|queue| !state.queues.contains(queue))
        .map(|queue| queue.to_string())
        .collect();
    let (fleet, view) = fleet_status(&state.fleet);
    let now = now_ms();
    let mut answer = Vec::with_capacity(state.queues.iter().len());
    for queue in &state.queues {
        let stats = state.store.stats(queue).await?;
        state.metrics.record_queue(queue, &stats, now);
        let recent_dead_letters = state
            .store
            .dead_letters(queue, RECENT_DEAD_LETTERS)
            .await?
            .into_iter()
            .map(|ticket| DeadLetter {
                ticket: ticket.id.to_string(),
                kind: ticket.kind.to_string(),
                room_name: ticket.room_name,
                error: ticket.error,
                failed_at: ticket.ended_at_ms.map(rfc3339),
            })
            .collect();
        let leader = read_leader(&state.store, queue)
            .await?
            .map(|info| LeaderStatus::new(info, now));
        // Pre-warm's part, as GetMetrics reads it (nothing is read outside its lead time).
        let lead = state.settings.prewarm_lead_ms;
        let cells = match state.settings.prewarm {
            Prewarm::Auto => cells_to_read(now, lead),
            Prewarm::Off => Vec::new(),
        };
        let arrivals = if cells.is_empty() {
            Default::default()
        } else {
            state
                .store
                .scaling_input_ahead(queue, None, &cells)
                .await?
                .arrivals
        };
        let expected = expect(now, lead, &arrivals);
        let decision: Option<Decision> = view.as_ref().map(|view| {
            decide_ahead(
                &state.settings,
                &stats.demand,
                &view.snapshot(),
                &[],
                &expected,
            )
        });
        let reasons = match &decision {
            Some(decision) => decision.reasons(&state.settings),
            None => vec![format!(
                "no decision: {}",
                fleet.error.clone().unwrap_or_default()
            )],
        };
        answer.push(QueueStatus {
            queue: queue.to_string(),
            depth: stats.depth,
            queued_by_kind: to_names(&stats.queued),
            demand_by_kind: to_names(&stats.demand),
            oldest_wait_seconds: stats
                .oldest_enqueued_at_ms
                .map(|at| now.saturating_sub(at) as f64 / 1000.0),
            dispatching: stats.dispatching,
            active: stats.active,
            dead_letters: stats.dead_letters,
            recent_dead_letters,
            leader,
            desired_replicas: decision.as_ref().map(|d| d.desired),
            reasons,
            decision: decision.as_ref().and_then(|d| serde_json::to_value(d).ok()),
        });
    }
    let policy = match state.store.eviction_policy() {
        Some(policy) => policy,
        None => state.store.read_eviction_policy().await,
    };
    Ok(StatusAnswer {
        queues: answer,
        other_queues,
        fleet,
        redis: RedisStatus {
            eviction_policy: policy.name().to_owned(),
            eviction_policy_ok: policy.is_safe(),
            warning: policy.warning(),
        },
    })
}

async fn record_queue_gauges(state: &AppState) -> Result<(), QueueError> {
    let now = now_ms();
    for queue in &state.queues {
        let stats = state.store.stats(queue).await?;
        state.metrics.record_queue(queue, &stats, now);
    }
    Ok(())
}

async fn status(State(state): State<AppState>) -> Result<Json<StatusAnswer>, ApiError> {
    Ok(Json(build_status(&state).await?))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Queue gauges are read when scraped, so they are as fresh as the scrape.
    if let Err(error) = record_queue_gauges(&state).await {
        tracing::debug!(%error, "Queue gauges not refreshed.");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::telemetry::encode(&state.registry),
    )
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "Not ready: Redis does not answer.");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "redis does not answer",
            )
            .into_response()
        }
    }
}
