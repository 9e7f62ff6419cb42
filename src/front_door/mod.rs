//! The Twirp front door (DESIGN.md 5): `POST /twirp/livekit.Egress/<Method>` on the HTTP
//! listener, so that a backend's LiveKit server SDK, pointed at egress-scaler instead of
//! livekit-server, queues its starts without a change of code.
//!
//! - [`twirp`]: codes, error bodies, encodings, and start bodies decoded and validated as
//!   `POST /v1/requests` validates its `request`;
//! - [`waiters`]: held calls, woken by one task that follows the queue's events;
//! - [`proxy`]: every other method, passed to livekit-server unchanged.
//!
//! A start call, in order:
//! 1. the caller's token is checked as livekit-server checks it: a token that does not verify
//!    is `unauthenticated` (401), one without `video.roomRecord` is `unauthenticated`
//!    "permissions denied" (401), as livekit-server answers it; with no credentials
//!    configured the front door is open, like the rest of the HTTP API;
//! 2. the body is decoded (`malformed` when it does not decode, `invalid_argument` naming the
//!    field when LiveKit would refuse it) and queued on the default served queue, or on the
//!    served queue named by the `X-Egress-Scaler-Queue` header;
//! 3. the call is held until the ticket is no longer waiting to start, at most
//!    `--hold-seconds`: a started ticket is answered with livekit-server's `EgressInfo`
//!    (read back with `ListEgress` by its egress id), a failed one with the Twirp code LiveKit
//!    gave, a cancelled one with `canceled`;
//! 4. a ticket still waiting is answered `unavailable` naming it and its position; the same
//!    request called again finds the same ticket through its de-duplication key and waits
//!    again. Since a failed or cancelled ticket frees its key, the ticket a caller was told
//!    to call again for is remembered for [`HELD_MEMORY`] (`queue::held`), and the retry is
//!    answered its outcome instead of queueing a second recording.
//!
//! A caller that goes away while held leaves its ticket queued: it was asked for.
//! `StartEgress` (the unified request, which the stored request cannot express) and every
//! other method are passed to livekit-server. `GET /settings/regions` answers an empty list:
//! an SDK that asks it before retrying a 5xx keeps retrying egress-scaler.

pub mod proxy;
pub mod twirp;
pub mod waiters;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use livekit_api::access_token::TokenVerifier;
use livekit_protocol as proto;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::ApiCredentials;
use crate::dispatch::livekit::{EgressApi, EgressApiError, ListFilter, TwirpEgressApi};
use crate::dispatch::stored_request;
use crate::egress_redact::redact;
use crate::intake::{AppState, MAX_BODY_BYTES, now_ms};
use crate::queue::{NewRequest, QueueError, QueueName, QueueStore, Ticket, TicketId, TicketState};
use crate::telemetry::{EnqueueLabels, EnqueueOutcome};

use self::proxy::Upstream;
use self::twirp::{Code, Encoding, StartMethod, TwirpError, code_of_failure, decode_start};
use self::waiters::Waiters;

/// The header naming the served queue a start call is queued on (default: the first
/// `--queue`).
pub const QUEUE_HEADER: &str = "x-egress-scaler-queue";

/// The header of a start's answer naming its ticket (for `GET /v1/requests/{ticket}`); SDKs
/// ignore it.
pub const TICKET_HEADER: &str = "x-egress-scaler-ticket";

/// How long the ticket a caller was told to call again for is remembered.
pub const HELD_MEMORY: Duration = Duration::from_secs(120);

/// Limit on reading the started egress back from livekit-server.
const INFO_LIMIT: Duration = Duration::from_secs(3);

impl From<QueueError> for TwirpError {
    fn from(error: QueueError) -> Self {
        tracing::warn!(%error, "Queue store call failed.");
        TwirpError::new(
            Code::Unavailable,
            "the queue store is unavailable; retry later",
        )
    }
}

/// How a held call ended.
enum Held {
    /// The ticket is no longer waiting to start.
    Settled(Ticket),
    /// The hold ran out first.
    Waiting(Ticket),
}

fn waiting(state: TicketState) -> bool {
    matches!(state, TicketState::Queued | TicketState::Dispatching)
}

/// The front door's own state, shared by its handlers.
pub struct FrontDoor {
    hold: Duration,
    shutdown: CancellationToken,
    waiters: Arc<Waiters>,
    upstream: Option<Upstream>,
    livekit: Option<TwirpEgressApi>,
}

impl FrontDoor {
    /// A front door holding starts for `hold` (held calls are answered `unavailable` at once
    /// when `shutdown` is cancelled, so that draining does not wait for them); with
    /// `livekit_url` it passes other calls there (each limited to `call_limit`), and with the
    /// credentials too it reads started egress back from it.
    pub fn new(
        hold: Duration,
        shutdown: CancellationToken,
        livekit_url: Option<&str>,
        credentials: Option<&ApiCredentials>,
        call_limit: Duration,
    ) -> Result<Self, EgressApiError> {
        let upstream = match livekit_url {
            Some(url) => Some(Upstream {
                base_url: http_base(url),
                http: reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .connect_timeout(call_limit.min(Duration::from_secs(5)))
                    .build()
                    .map_err(|error| EgressApiError::Transport(error.to_string()))?,
                limit: call_limit,
            }),
            None => None,
        };
        let livekit = match (livekit_url, credentials) {
            (Some(url), Some(credentials)) => {
                Some(TwirpEgressApi::new(url, credentials.clone(), INFO_LIMIT)?)
            }
            _ => None,
        };
        Ok(FrontDoor {
            hold,
            shutdown,
            waiters: Arc::new(Waiters::default()),
            upstream,
            livekit,
        })
    }

    /// The held calls, for the task that wakes them ([`Waiters::run`]).
    pub fn waiters(&self) -> Arc<Waiters> {
        Arc::clone(&self.waiters)
    }

    async fn start(
        &self,
        state: &AppState,
        method: StartMethod,
        request: Request,
    ) -> Result<Response, TwirpError> {
        // Counted with the HTTP API's enqueues (`egress_scaler_enqueue_requests`).
        let count = |outcome| {
            state
                .metrics
                .enqueue_requests
                .get_or_create(&EnqueueLabels { outcome })
                .inc();
        };
        if let Some(verifier) = &state.verifier {
            check_token(verifier, request.headers())?;
        }
        let encoding = Encoding::of(request.headers())?;
        let queue = queue_of(request.headers(), state).inspect_err(|_| {
            count(EnqueueOutcome::rejected);
        })?;
        // The body and the decoded call are dropped before the call is held.
        let (new, key) = {
            let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
                .await
                .map_err(|_| {
                    TwirpError::new(
                        Code::Malformed,
                        format!(
                            "the body could not be read, or is larger than {MAX_BODY_BYTES} bytes"
                        ),
                    )
                })?;
            let call = decode_start(method, encoding, &body).inspect_err(|_| {
                count(EnqueueOutcome::rejected);
            })?;
            let new = NewRequest::new(&call.request, &call.room_name, None);
            let key = new.dedup_key.clone().unwrap_or_default();
            (new, key)
        };
        let store = &state.store;

        // Every Redis call is boxed: only the one in progress takes memory, not the held state.
        let remembered = Box::pin(store.held_ticket(&queue, &key)).await?;
        if let Some(id) = &remembered
            && let Some(ticket) = Box::pin(store.get(id)).await?
            && ticket.state.is_finished()
        {
            Box::pin(store.forget_held(&queue, &key)).await?;
            return Box::pin(self.outcome(ticket, encoding)).await;
        }
        let enqueued = Box::pin(store.enqueue(&queue, new, now_ms()))
            .await
            .inspect_err(|_| count(EnqueueOutcome::unavailable))?;
        count(match (enqueued.conflict, enqueued.duplicate) {
            (true, _) => EnqueueOutcome::conflict,
            (false, true) => EnqueueOutcome::duplicate,
            (false, false) => EnqueueOutcome::accepted,
        });
        if enqueued.conflict {
            return Err(TwirpError::new(
                Code::AlreadyExists,
                format!(
                    "ticket {} ({}) already holds this recording with a different request; \
                     cancel it first to change the request",
                    enqueued.ticket, enqueued.state
                ),
            )
            .with_meta("ticket", enqueued.ticket.as_str()));
        }
        if !enqueued.duplicate {
            tracing::info!(ticket = %enqueued.ticket, position = ?enqueued.position, "Request queued through the Twirp front door.");
        }
        match Box::pin(self.hold(store, &enqueued.ticket)).await? {
            Held::Settled(ticket) => {
                if remembered.is_some() {
                    Box::pin(store.forget_held(&queue, &key)).await?;
                }
                // Boxed: a held call's future stays small while it waits (1,000 held calls).
                Box::pin(self.outcome(ticket, encoding)).await
            }
            Held::Waiting(ticket) => {
                Box::pin(store.remember_held(&queue, &key, &ticket.id, HELD_MEMORY)).await?;
                Err(Box::pin(self.still_waiting(store, &queue, &ticket)).await?)
            }
        }
    }

    /// Waits until the ticket is no longer waiting to start, or the hold runs out.
    async fn hold(&self, store: &QueueStore, id: &TicketId) -> Result<Held, TwirpError> {
        let deadline = tokio::time::Instant::now() + self.hold;
        let mut settled = self.waiters.watch(id);
        loop {
            let ticket = Box::pin(read(store, id)).await?;
            if !waiting(ticket.state) {
                return Ok(Held::Settled(ticket));
            }
            tokio::select! {
                changed = settled.changed() => {
                    if changed.is_err() {
                        // Never while this receiver lives; a pause keeps a bug from spinning.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                // Out of time, or draining: one last look, since it may have started.
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shutdown.cancelled() => break,
            }
        }
        let ticket = Box::pin(read(store, id)).await?;
        Ok(if waiting(ticket.state) {
            Held::Waiting(ticket)
        } else {
            Held::Settled(ticket)
        })
    }

    async fn still_waiting(
        &self,
        store: &QueueStore,
        queue: &QueueName,
        ticket: &Ticket,
    ) -> Result<TwirpError, TwirpError> {
        let hold = self.hold.as_secs_f64();
        let error = match ticket.state {
            TicketState::Queued => {
                let position = store.position(&ticket.id).await?;
                let shown = position.map_or_else(|| "unknown".to_owned(), |p| (p + 1).to_string());
                TwirpError::new(
                    Code::Unavailable,
                    format!(
                        "no egress capacity within {hold}s: queued as ticket {}, position {shown} \
                         in queue {queue}; call again to wait for it",
                        ticket.id
                    ),
                )
                .with_meta("position", shown)
            }
            _ => TwirpError::new(
                Code::Unavailable,
                format!(
                    "not started within {hold}s: ticket {} is being started; call again to wait \
                     for it",
                    ticket.id
                ),
            ),
        };
        Ok(error
            .with_meta("ticket", ticket.id.as_str())
            .with_meta("state", ticket.state.as_str()))
    }

    /// The answer for a ticket that is no longer waiting to start.
    async fn outcome(&self, ticket: Ticket, encoding: Encoding) -> Result<Response, TwirpError> {
        match (ticket.state, &ticket.egress_id) {
            (TicketState::Active | TicketState::Ended, Some(egress_id)) => {
                let info = self.egress_info(&ticket, egress_id).await;
                let mut answer = encoding.answer(&info);
                if let Ok(value) = header::HeaderValue::from_str(ticket.id.as_str()) {
                    answer.headers_mut().insert(TICKET_HEADER, value);
                }
                Ok(answer)
            }
            (TicketState::Failed, _) => {
                let error = ticket
                    .error
                    .unwrap_or_else(|| "the request failed".to_owned());
                Err(TwirpError::new(code_of_failure(&error), error)
                    .with_meta("ticket", ticket.id.as_str()))
            }
            (TicketState::Cancelled, _) => Err(TwirpError::new(
                Code::Canceled,
                format!("ticket {} was cancelled before it started", ticket.id),
            )
            .with_meta("ticket", ticket.id.as_str())),
            (state, _) => Err(TwirpError::new(
                Code::Internal,
                format!("ticket {} is {state} without an egress", ticket.id),
            )),
        }
    }

    /// livekit-server's `EgressInfo` of a started ticket; when it cannot be read back, the
    /// same shape from what the ticket records (the id is what a caller needs).
    async fn egress_info(&self, ticket: &Ticket, egress_id: &str) -> proto::EgressInfo {
        if let Some(livekit) = &self.livekit {
            let filter = ListFilter::Egress(egress_id.to_owned());
            match tokio::time::timeout(INFO_LIMIT, livekit.list_egress(&filter, false)).await {
                Ok(Ok(list)) => {
                    if let Some(info) = list.into_iter().find(|info| info.egress_id == egress_id) {
                        return info;
                    }
                    tracing::warn!(ticket = %ticket.id, egress_id, "The started egress is not listed; answering what the ticket records.");
                }
                Ok(Err(error)) => {
                    tracing::warn!(ticket = %ticket.id, egress_id, %error, "Cannot read the started egress back; answering what the ticket records.");
                }
                Err(_) => {
                    tracing::warn!(ticket = %ticket.id, egress_id, "Reading the started egress back timed out; answering what the ticket records.");
                }
            }
        }
        let request = stored_request(ticket).ok();
        let status = match ticket.state {
            TicketState::Ended => proto::EgressStatus::EgressComplete,
            _ => proto::EgressStatus::EgressStarting,
        };
        let started_ns = ticket.started_at_ms.map_or(0, |ms| ms as i64 * 1_000_000);
        proto::EgressInfo {
            egress_id: egress_id.to_owned(),
            room_name: request
                .as_ref()
                .and_then(|request| request.room_name().map(str::to_owned))
                .unwrap_or_default(),
            status: status as i32,
            started_at: started_ns,
            updated_at: started_ns,
            request: request.map(|request| redact(&request).to_info_request()),
            ..Default::default()
        }
    }
}

async fn read(store: &QueueStore, id: &TicketId) -> Result<Ticket, TwirpError> {
    store.get(id).await?.ok_or_else(|| {
        TwirpError::new(
            Code::Internal,
            format!("ticket {id} is gone from the queue store"),
        )
    })
}

/// The Twirp API wants http(s); LiveKit URLs are often ws(s).
fn http_base(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else {
        url.to_owned()
    }
}

fn queue_of(headers: &HeaderMap, state: &AppState) -> Result<QueueName, TwirpError> {
    let name = match headers.get(QUEUE_HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            TwirpError::invalid_argument(QUEUE_HEADER, "X-Egress-Scaler-Queue is not text")
        })?),
    };
    state.queues.resolve(name).map_err(|error| {
        TwirpError::invalid_argument(QUEUE_HEADER, format!("X-Egress-Scaler-Queue: {error}"))
    })
}

/// The token check of livekit-server's egress service, answered in Twirp JSON.
fn check_token(verifier: &TokenVerifier, headers: &HeaderMap) -> Result<(), TwirpError> {
    let unauthenticated = |msg: &str| TwirpError::new(Code::Unauthenticated, msg);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| unauthenticated("permissions denied"))?;
    let claims = verifier
        .verify(token.trim())
        .map_err(|_| unauthenticated("invalid authorization token"))?;
    if !claims.video.room_record {
        return Err(unauthenticated("permissions denied"));
    }
    Ok(())
}

/// `POST /twirp/livekit.Egress/{method}`.
pub async fn call(
    State(state): State<AppState>,
    Path(method): Path<String>,
    request: Request,
) -> Response {
    let door = Arc::clone(&state.front_door);
    match StartMethod::of(&method) {
        Some(start) => match door.start(&state, start, request).await {
            Ok(answer) => answer,
            Err(error) => error.into_response(),
        },
        None => match &door.upstream {
            Some(upstream) => upstream.pass(&method, request).await,
            None => TwirpError::new(
                Code::Unavailable,
                format!("{method} goes to livekit-server, and no --livekit-url is configured"),
            )
            .into_response(),
        },
    }
}

/// `GET /settings/regions`: no other region, so an SDK retrying a 5xx retries here.
pub async fn regions() -> Json<serde_json::Value> {
    Json(json!({ "regions": [] }))
}
