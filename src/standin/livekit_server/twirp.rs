//! The HTTP side of the stand-in, in livekit-server's order (FIDELITY.md 1): the
//! authentication middleware (plain-text 401), Twirp routing (`bad_route` 404), decoding
//! (`malformed` 400), the `roomRecord` check (`unauthenticated` 401), then the method.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use livekit_api::access_token::{Claims, TokenVerifier};
use livekit_protocol as proto;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::lifecycle::is_listed_active;
use super::start::StartCall;
use super::{Inner, ScriptedStart, new_id};
use crate::egress_request::StartRequest;

/// The methods of `livekit.Egress`; any other is a `bad_route`.
const METHODS: [&str; 10] = [
    "StartRoomCompositeEgress",
    "StartWebEgress",
    "StartParticipantEgress",
    "StartTrackCompositeEgress",
    "StartTrackEgress",
    "StartEgress",
    "UpdateLayout",
    "UpdateStream",
    "ListEgress",
    "StopEgress",
];

/// A Twirp error answer.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    code: &'static str,
    msg: String,
    /// Only `bad_route` carries one (`twirp_invalid_route`).
    route: Option<String>,
}

impl Failure {
    pub(super) fn new(code: &'static str, msg: &str) -> Self {
        Failure {
            code,
            msg: msg.to_owned(),
            route: None,
        }
    }

    /// An error that came through psrpc: its message is prefixed (livekit v1.8.4+).
    pub(super) fn psrpc(code: &'static str, msg: &str) -> Self {
        Self::new(code, &format!("twirp error unknown: {msg}"))
    }

    fn bad_route(msg: String, method: &str) -> Self {
        Failure {
            code: "bad_route",
            msg,
            route: Some(format!("POST /twirp/livekit.Egress/{method}")),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "code": self.code, "msg": self.msg });
        if let Some(route) = self.route {
            body["meta"] = serde_json::json!({ "twirp_invalid_route": route });
        }
        (
            twirp_status(self.code),
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// Twirp's HTTP status of an error code.
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
        "deadline_exceeded" | "canceled" => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn status_of(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn plain_text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A load balancer's error page, as nginx writes it.
fn html_page(status: u16) -> Response {
    let status = status_of(status);
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html")],
        format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        ),
    )
        .into_response()
}

/// Serves the Twirp routes until `stop`.
pub(super) fn serve(listener: TcpListener, inner: Weak<Inner>, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/twirp/livekit.Egress/{method}", axum::routing::post(twirp))
        .with_state(inner);
    tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
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
        Format::Protobuf => T::decode(body)
            .map_err(|_| Failure::new("malformed", "the protobuf request could not be decoded")),
        Format::Json => serde_json::from_slice(body)
            .map_err(|_| Failure::new("malformed", "the json request could not be decoded")),
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

/// livekit-server's `APIKeyAuthMiddleware`: no header passes on without grants (the method
/// then refuses it); a header that is not `Bearer <token>`, a token that does not parse, an
/// unknown key or a token that does not verify is refused in plain text.
fn authenticate(inner: &Inner, headers: &HeaderMap) -> Result<Option<Claims>, String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| "invalid authorization header. Must start with Bearer ".to_owned())?;
    if token.is_empty() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Issuer {
        #[serde(default)]
        iss: String,
    }
    let issuer = token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()
        })
        .and_then(|payload| serde_json::from_slice::<Issuer>(&payload).ok())
        .ok_or_else(|| "invalid authorization token".to_owned())?;
    if issuer.iss != inner.options.api_key {
        return Err("invalid API key".to_owned());
    }
    TokenVerifier::with_api_key(&inner.options.api_key, &inner.options.api_secret)
        .verify(token)
        .map(Some)
        .map_err(|error| format!("invalid authorization token: {error}"))
}

async fn twirp(
    State(inner): State<Weak<Inner>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(inner) = inner.upgrade() else {
        return Failure::new("unavailable", "shutting down").into_response();
    };
    let claims = match authenticate(&inner, &headers) {
        Ok(claims) => claims,
        Err(text) => return plain_text(StatusCode::UNAUTHORIZED, text),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match content_type.split(';').next().unwrap_or("").trim() {
        "application/json" => Format::Json,
        "application/protobuf" => Format::Protobuf,
        _ => {
            return Failure::bad_route(
                format!("unexpected Content-Type: {content_type:?}"),
                &method,
            )
            .into_response();
        }
    };
    if !METHODS.contains(&method.as_str()) {
        return Failure::bad_route(
            format!("no handler for path \"/twirp/livekit.Egress/{method}\""),
            &method,
        )
        .into_response();
    }
    let allowed = claims.is_some_and(|claims| claims.video.room_record);
    match handle(&inner, &method, format, &body, allowed, &headers).await {
        Ok(Reply::Now(response)) => response,
        Ok(Reply::Hold(stop)) => {
            // Held past any caller's timeout, until the stand-in stops (which this handler
            // must not prevent by holding the server).
            drop(inner);
            stop.cancelled().await;
            Failure::new("unavailable", "shutting down").into_response()
        }
        Err(failure) => failure.into_response(),
    }
}

/// What a call answers: now, or never while the stand-in runs.
enum Reply {
    Now(Response),
    Hold(CancellationToken),
}

async fn handle(
    inner: &Arc<Inner>,
    method: &str,
    format: Format,
    body: &[u8],
    allowed: bool,
    headers: &HeaderMap,
) -> Result<Reply, Failure> {
    let denied = || Failure::new("unauthenticated", "permissions denied");
    let request = match method {
        "StartRoomCompositeEgress" => StartRequest::RoomComposite(decode(format, body)?),
        "StartWebEgress" => StartRequest::Web(decode(format, body)?),
        "StartParticipantEgress" => StartRequest::Participant(decode(format, body)?),
        "StartTrackCompositeEgress" => StartRequest::TrackComposite(decode(format, body)?),
        "StartTrackEgress" => StartRequest::Track(decode(format, body)?),
        "ListEgress" => {
            let request: proto::ListEgressRequest = decode(format, body)?;
            if !allowed {
                return Err(denied());
            }
            inner
                .list_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Reply::Now(encode(format, &list_egress(inner, &request)?)));
        }
        "StopEgress" => {
            let request: proto::StopEgressRequest = decode(format, body)?;
            if !allowed {
                return Err(denied());
            }
            return Ok(Reply::Now(encode(
                format,
                &inner.stop_egress(&request.egress_id)?,
            )));
        }
        _ => {
            if !allowed {
                return Err(denied());
            }
            return Err(Failure::new(
                "unimplemented",
                "the livekit-server stand-in does not serve this method",
            ));
        }
    };
    if !allowed {
        return Err(denied());
    }
    start_call(inner, request, format, headers).await
}

fn list_egress(
    inner: &Inner,
    request: &proto::ListEgressRequest,
) -> Result<proto::ListEgressResponse, Failure> {
    let state = inner.state();
    let items = if !request.egress_id.is_empty() {
        // Exclusive: room and active are ignored.
        let egress = state
            .egress
            .get(&request.egress_id)
            .ok_or_else(|| Failure::psrpc("not_found", "egress does not exist"))?;
        vec![egress.info.clone()]
    } else {
        state
            .egress
            .values()
            .filter(|e| request.room_name.is_empty() || e.info.room_name == request.room_name)
            .filter(|e| !request.active || is_listed_active(&e.info))
            .map(|e| e.info.clone())
            .collect()
    };
    Ok(proto::ListEgressResponse {
        items,
        next_page_token: None,
    })
}

/// What is done with the outcome of a start.
enum Delivery {
    Answer,
    Lost,
    Html(u16),
}

/// A caller's `X-Twirp-Timeout-Ms`: the server bounds its work to it.
fn caller_deadline(headers: &HeaderMap) -> Option<Instant> {
    let millis: u64 = headers
        .get("x-twirp-timeout-ms")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Instant::now().checked_add(Duration::from_millis(millis))
}

async fn start_call(
    inner: &Arc<Inner>,
    request: StartRequest,
    format: Format,
    headers: &HeaderMap,
) -> Result<Reply, Failure> {
    inner
        .start_calls
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let requested_at = Instant::now();
    let (scripted, answer_delay) = {
        let mut state = inner.state();
        (state.scripted.pop_front(), state.answer_delay)
    };
    let mut slow = None;
    let mut delivery = Delivery::Answer;
    match scripted {
        Some(ScriptedStart::Twirp { code, msg }) => return Err(Failure::new(code, &msg)),
        Some(ScriptedStart::PlainText { status, body }) => {
            return Ok(Reply::Now(plain_text(status_of(status), body)));
        }
        Some(ScriptedStart::Html { status }) => return Ok(Reply::Now(html_page(status))),
        Some(ScriptedStart::StartedButLost) => delivery = Delivery::Lost,
        Some(ScriptedStart::StartedThenHtml { status }) => delivery = Delivery::Html(status),
        Some(ScriptedStart::SlowPod(delay)) => slow = Some(delay),
        None => {}
    }
    if let Some(room) = request.room_name()
        && !inner.options.any_room_exists
        && !inner.state().rooms.contains_key(room)
    {
        return Err(Failure::psrpc("not_found", "requested room does not exist"));
    }
    let deadline = caller_deadline(headers);
    // Cancelled when this call ends or its caller goes (the future is dropped): the ladder
    // stops at its next step, the attempt under way still completes.
    let caller_gone = CancellationToken::new();
    let _gone = caller_gone.clone().drop_guard();
    let call = StartCall {
        request,
        egress_id: new_id("EG"),
        requested_at,
        slow,
    };
    let (done, result) = oneshot::channel();
    let stop = inner.stop.clone();
    let work = inner.clone().run_start(call, caller_gone);
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            answer = work => { let _ = done.send(answer); }
        }
    });
    let outcome = match deadline {
        Some(deadline) => tokio::select! {
            outcome = result => outcome,
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err(Failure::psrpc("deadline_exceeded", "request timed out"));
            }
        },
        None => result.await,
    }
    .map_err(|_| Failure::new("unavailable", "shutting down"))?;
    match delivery {
        Delivery::Lost => Ok(Reply::Hold(inner.stop.clone())),
        Delivery::Html(status) => Ok(Reply::Now(html_page(status))),
        Delivery::Answer => {
            if !answer_delay.is_zero() {
                tokio::time::sleep(answer_delay).await;
            }
            outcome.map(|info| Reply::Now(encode(format, &info)))
        }
    }
}
