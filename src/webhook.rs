//! LiveKit webhooks at `POST /webhook/livekit` (DESIGN.md 2.3), verified with
//! `livekit_api`'s [`WebhookReceiver`]: `Authorization: <JWT>` signed with the API secret whose
//! `sha256` claim is the base64 SHA-256 of the body. A missing or bad signature is 401 and
//! changes nothing.
//!
//! - `egress_started`: confirms a ticket that already records the egress, or adopts it for a
//!   ticket whose attempt is of unknown outcome and provably started it (the same request,
//!   started after the attempt began, recorded for no other ticket);
//! - `egress_ended`: finishes the ticket recording it, which frees its de-duplication key:
//!   `ended` when it completed (or reached its limit), `failed` with LiveKit's error when it
//!   failed or was aborted; when its start is not recorded yet, the end is kept for it;
//! - `room_finished`: cancels the room's queued tickets;
//! - `room_started`: with auto-recording on, queues a start for the room.
//!
//! `room_started` queues into the default queue; the other events act on every served
//! queue, since a room's or an egress's tickets may be in any of them.
//!
//! Deliveries can be lost or repeated. Each delivery acted on is remembered in Redis for 10
//! minutes (its event `id` and the SHA-256 of its body, `SET NX PX`), longer than the 5 minutes
//! its token is valid: a replay is answered 200 and ignored (outcome `replayed`), so a
//! `room_started` replayed after its recording was cancelled queues nothing, and a
//! `room_finished` replayed after a new room of the same name started cancels nothing. The
//! mark is written after acting, so a delivery that failed (503) is acted on when LiveKit
//! retries it. Every handler is also idempotent, and the dispatcher's periodic reconcile
//! catches what a lost webhook missed.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use livekit_api::access_token::TokenVerifier;
use livekit_api::webhooks::{WebhookError, WebhookReceiver};
use livekit_protocol as proto;
use serde_json::Value;

use crate::config::ApiCredentials;
use crate::dispatch::matching::{candidates, egress_error};
use crate::dispatch::stored_request;
use crate::egress_request::StartRequest;
use crate::intake::{AppState, now_ms};
use crate::model::EgressKind;
use crate::queue::{
    CancelOutcome, DeliveryId, Finish, NewRequest, QueueError, QueueName, QueueStore, ServedQueues,
    TicketState,
};
use crate::telemetry::{WebhookEvent, WebhookOutcome};

/// How long a delivery acted on is remembered: longer than its token is valid (livekit-server
/// signs webhooks for 5 minutes), so a replay is either recognised or refused as expired.
pub const DELIVERY_MEMORY: Duration = Duration::from_secs(10 * 60);

/// Largest webhook body accepted (an `EgressInfo` with many segments is larger than an API
/// request).
pub const MAX_WEBHOOK_BYTES: usize = 1024 * 1024;

/// Recording every new room (`--auto-record`).
#[derive(Debug, Clone)]
pub struct AutoRecord {
    /// Kind of egress to start.
    pub kind: EgressKind,
    /// Only rooms whose whole name matches.
    pub rooms: Option<regex::Regex>,
    /// The kind's request without the room name (protobuf JSON).
    pub template: Option<Value>,
}

impl AutoRecord {
    /// Whether a room gets recorded.
    pub fn records(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|pattern| pattern.is_match(room))
    }

    /// The start request for a room.
    pub fn request(
        &self,
        room: &str,
    ) -> Result<StartRequest, crate::egress_request::InvalidRequest> {
        StartRequest::parse(self.kind, room, self.template.clone())
    }
}

/// What the webhook receiver needs.
#[derive(Debug, Clone)]
pub struct Webhooks {
    receiver: WebhookReceiver,
    queues: ServedQueues,
    auto_record: Option<AutoRecord>,
    clock_skew: Duration,
}

impl Webhooks {
    /// Webhooks verified with `credentials`, acting on the served `queues` (auto-recording
    /// into the default one).
    pub fn new(
        credentials: &ApiCredentials,
        queues: ServedQueues,
        auto_record: Option<AutoRecord>,
    ) -> Self {
        Webhooks {
            receiver: WebhookReceiver::new(TokenVerifier::with_api_key(
                &credentials.key,
                &credentials.secret,
            )),
            queues,
            auto_record,
            clock_skew: Duration::from_secs(2),
        }
    }
}

fn event_label(event: &str) -> WebhookEvent {
    match event {
        "room_started" => WebhookEvent::room_started,
        "room_finished" => WebhookEvent::room_finished,
        "egress_started" => WebhookEvent::egress_started,
        "egress_updated" => WebhookEvent::egress_updated,
        "egress_ended" => WebhookEvent::egress_ended,
        _ => WebhookEvent::other,
    }
}

fn reject(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": "unauthenticated", "message": message })),
    )
        .into_response()
}

/// `POST /webhook/livekit`.
pub async fn receive(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(webhooks) = state.webhooks.as_deref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let rejected = |status, message| {
        state
            .dispatch_metrics
            .webhook(WebhookEvent::other, WebhookOutcome::rejected);
        reject(status, message)
    };
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return rejected(StatusCode::UNAUTHORIZED, "missing Authorization");
    };
    let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
    let Ok(text) = std::str::from_utf8(&body) else {
        return rejected(StatusCode::BAD_REQUEST, "the body is not UTF-8");
    };
    let event = match webhooks.receiver.receive(text, token) {
        Ok(event) => event,
        Err(WebhookError::InvalidData(_)) => {
            return rejected(StatusCode::BAD_REQUEST, "the body is not a webhook event");
        }
        Err(error) => {
            tracing::warn!(%error, "Webhook refused: bad signature.");
            return rejected(StatusCode::UNAUTHORIZED, "invalid webhook signature");
        }
    };
    let label = event_label(&event.event);
    let failed = |error: QueueError| {
        tracing::warn!(%error, event = %event.event, "Webhook not applied: the queue store is unavailable.");
        state.dispatch_metrics.webhook(label, WebhookOutcome::error);
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    };
    // Acted on once: a delivery is remembered only after it was acted on, so that a failure
    // (503) leaves it to LiveKit's retry; a crash in between means it may act twice, which
    // every handler tolerates at once (a replay minutes later is what must not act).
    let delivery = DeliveryId::new(&event.id, &body);
    match state
        .store
        .delivery_seen(webhooks.queues.default_queue(), &delivery)
        .await
    {
        Ok(true) => {
            tracing::debug!(event = %event.event, id = %event.id, "Webhook delivery seen before; ignored.");
            state
                .dispatch_metrics
                .webhook(label, WebhookOutcome::replayed);
            return StatusCode::OK.into_response();
        }
        Ok(false) => {}
        Err(error) => return failed(error),
    }
    let applied = match handle(&state.store, webhooks, &event).await {
        Ok(applied) => applied,
        Err(error) => return failed(error),
    };
    if let Err(error) = state
        .store
        .remember_delivery(webhooks.queues.default_queue(), &delivery, DELIVERY_MEMORY)
        .await
    {
        // Acted on: answering 503 would make LiveKit deliver it again for nothing.
        tracing::warn!(%error, event = %event.event, id = %event.id, "Webhook applied but not remembered: a replay of it would act again.");
    }
    let outcome = if applied {
        WebhookOutcome::applied
    } else {
        WebhookOutcome::ignored
    };
    state.dispatch_metrics.webhook(label, outcome);
    StatusCode::OK.into_response()
}

/// Applies one verified event; true when it changed something.
pub async fn handle(
    store: &QueueStore,
    webhooks: &Webhooks,
    event: &proto::WebhookEvent,
) -> Result<bool, QueueError> {
    if event.event == "room_started" {
        return match (&event.room, &webhooks.auto_record) {
            (Some(room), Some(auto)) => {
                let queue = webhooks.queues.default_queue();
                room_started(store, queue, auto, &room.name).await
            }
            _ => Ok(false),
        };
    }
    let mut applied = false;
    for queue in &webhooks.queues {
        applied |= match event.event.as_str() {
            "egress_started" => match &event.egress_info {
                Some(info) => egress_started(store, webhooks, queue, info).await?,
                None => false,
            },
            "egress_ended" => match &event.egress_info {
                Some(info) => egress_ended(store, queue, info).await?,
                None => false,
            },
            "room_finished" => match &event.room {
                Some(room) => room_finished(store, queue, &room.name).await?,
                None => false,
            },
            _ => false,
        };
    }
    Ok(applied)
}

async fn egress_started(
    store: &QueueStore,
    webhooks: &Webhooks,
    queue: &QueueName,
    info: &proto::EgressInfo,
) -> Result<bool, QueueError> {
    // An egress recorded for a ticket of any served queue is never another's.
    if store
        .egress_recorded_in(&webhooks.queues, &info.egress_id)
        .await?
    {
        return Ok(false);
    }
    if info
        .request
        .as_ref()
        .and_then(StartRequest::from_info_request)
        .is_none()
    {
        return Ok(false);
    }
    // Only an attempt whose outcome is unknown may be matched: one in flight gets its answer,
    // and one that certainly started nothing is not this egress.
    for id in store.dispatching(queue).await? {
        let Some(ticket) = store.get(&id).await? else {
            continue;
        };
        let (TicketState::Dispatching, Some(_), Some(since)) = (
            ticket.state,
            ticket.unsettled_at_ms,
            ticket.dispatching_at_ms,
        ) else {
            continue;
        };
        let Ok(request) = stored_request(&ticket) else {
            continue;
        };
        let listed = std::slice::from_ref(info);
        if candidates(listed, &request, since, webhooks.clock_skew).is_empty() {
            continue;
        }
        if store.mark_started(&id, &info.egress_id, now_ms()).await? {
            tracing::info!(ticket = %id, egress_id = %info.egress_id, "Egress adopted from its egress_started webhook.");
            return Ok(true);
        }
    }
    Ok(false)
}

/// How an egress that ended finishes its ticket; `None` when its status is not final.
fn finish_of(info: &proto::EgressInfo) -> Option<Finish> {
    use proto::EgressStatus;
    match EgressStatus::try_from(info.status).ok()? {
        EgressStatus::EgressComplete | EgressStatus::EgressLimitReached => Some(Finish::Ended),
        EgressStatus::EgressFailed | EgressStatus::EgressAborted => {
            Some(Finish::Failed(egress_error(info)))
        }
        _ => None,
    }
}

async fn egress_ended(
    store: &QueueStore,
    queue: &QueueName,
    info: &proto::EgressInfo,
) -> Result<bool, QueueError> {
    // Room auto-egress failures come without an egress id: nothing of ours.
    let (false, Some(finish)) = (info.egress_id.is_empty(), finish_of(info)) else {
        return Ok(false);
    };
    // When no ticket records it yet (its start answer is still on its way), the end is kept
    // and the start, once recorded, finishes at once.
    let Some(ticket) = store.egress_over(queue, &info.egress_id, &finish).await? else {
        return Ok(false);
    };
    let finished = store.finish(&ticket, &finish, now_ms()).await?;
    if finished {
        tracing::info!(%ticket, egress_id = %info.egress_id, ?finish, "Egress ended; ticket finished.");
    }
    Ok(finished)
}

async fn room_finished(
    store: &QueueStore,
    queue: &QueueName,
    room: &str,
) -> Result<bool, QueueError> {
    let mut cancelled = false;
    for id in store.queued_in_room(queue, room).await? {
        if store.cancel(&id, now_ms()).await? == CancelOutcome::Cancelled {
            tracing::info!(ticket = %id, %room, "Room finished; queued request cancelled.");
            cancelled = true;
        }
    }
    Ok(cancelled)
}

async fn room_started(
    store: &QueueStore,
    queue: &QueueName,
    auto: &AutoRecord,
    room: &str,
) -> Result<bool, QueueError> {
    if room.is_empty() || !auto.records(room) {
        return Ok(false);
    }
    let request = match auto.request(room) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%room, %error, "Auto-record request invalid for this room; not queued.");
            return Ok(false);
        }
    };
    let enqueued = store
        .enqueue(queue, NewRequest::new(&request, room, None), now_ms())
        .await?;
    if enqueued.conflict {
        // Someone queued another request for the same recording first; theirs stands.
        tracing::info!(ticket = %enqueued.ticket, %room, kind = %auto.kind, "Room started; a different request for this recording is already queued.");
    } else if !enqueued.duplicate {
        tracing::info!(ticket = %enqueued.ticket, %room, kind = %auto.kind, "Room started; recording queued.");
    }
    Ok(!enqueued.duplicate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_record_filters_rooms_by_the_whole_name() {
        let auto = AutoRecord {
            kind: EgressKind::RoomComposite,
            rooms: Some(regex::Regex::new("^(?:team-.*)$").unwrap()),
            template: Some(serde_json::json!({"layout": "grid"})),
        };
        assert!(auto.records("team-a"));
        assert!(!auto.records("my-team-a"));
        let StartRequest::RoomComposite(request) = auto.request("team-a").unwrap() else {
            panic!("wrong kind");
        };
        assert_eq!(
            (request.room_name.as_str(), request.layout.as_str()),
            ("team-a", "grid")
        );
    }
}
