//! The dispatcher's view of livekit-server's egress API (DESIGN.md 2.3), behind the small
//! [`EgressApi`] trait so that the loop can be tested and faults injected.
//!
//! Starts are sent by hand rather than through `livekit_api`'s `EgressClient`: its
//! `start_*_egress` methods rebuild the request from a few options (every encoding becomes
//! `advanced`, presets, webhooks and other fields are dropped), so the server would not see the
//! request that was queued. Here the stored request is encoded as it is and posted to
//! `/twirp/livekit.Egress/<Method>` with a token from `livekit_api::access_token` carrying
//! `video.roomRecord`. `ListEgress` passes through faithfully, so it uses `EgressClient`
//! (failover off, the same long timeout).

use std::future::Future;
use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_api::services::egress::{EgressClient, EgressListFilter, EgressListOptions};
use livekit_api::services::{ServerError, ServiceError};
use livekit_protocol as proto;
use prost::Message;
use reqwest::header;

use crate::config::ApiCredentials;
use crate::egress_request::StartRequest;

/// Which egress `ListEgress` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListFilter {
    /// Every egress (only sensible with `active`).
    All,
    /// The egress of one room.
    Room(String),
    /// One egress.
    Egress(String),
}

/// Why a call did not give an answer the dispatcher can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressApiError {
    /// livekit-server answered with a Twirp error.
    #[error("livekit-server answered {code}: {msg}")]
    Twirp {
        /// The Twirp code (`unavailable`, `not_found`, ...).
        code: String,
        /// Its message.
        msg: String,
    },
    /// No connection could be made: the request was certainly not received.
    #[error("livekit-server is unreachable: {0}")]
    Unreachable(String),
    /// No answer within the request timeout: the request may have been received.
    #[error("no answer from livekit-server within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was sent, or the answer was unreadable.
    #[error("the call to livekit-server failed: {0}")]
    Transport(String),
    /// livekit-server's authentication refused the token itself (HTTP 401 in plain text:
    /// expired, badly signed, unknown key): the request went no further.
    #[error("livekit-server refused the token (HTTP 401): {0}")]
    Unauthorized(String),
}

/// The calls the dispatcher makes.
pub trait EgressApi: Send + Sync + 'static {
    /// Starts one egress with exactly `request`, by the Twirp method of its kind, giving up
    /// after `limit` (at most the client's own timeout); livekit-server is told the same bound
    /// (`X-Twirp-Timeout-Ms`), so that it does not start anything after it.
    fn start(
        &self,
        request: &StartRequest,
        limit: Duration,
    ) -> impl Future<Output = Result<proto::EgressInfo, EgressApiError>> + Send;

    /// `StopEgress`.
    fn stop_egress(
        &self,
        egress_id: &str,
    ) -> impl Future<Output = Result<proto::EgressInfo, EgressApiError>> + Send;

    /// `ListEgress` with a filter, and only active egress when `active`.
    fn list_egress(
        &self,
        filter: &ListFilter,
        active: bool,
    ) -> impl Future<Output = Result<Vec<proto::EgressInfo>, EgressApiError>> + Send;
}

/// Default limit on one call: above livekit-server's 18-27 s no-capacity answer, so that a
/// start without capacity ends in `unavailable` rather than in a timeout of unknown outcome.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(40);

/// [`EgressApi`] over livekit-server's Twirp API.
#[derive(Debug)]
pub struct TwirpEgressApi {
    base_url: String,
    credentials: ApiCredentials,
    http: reqwest::Client,
    list: EgressClient,
    timeout: Duration,
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

impl TwirpEgressApi {
    /// A client of the livekit-server at `url` with these credentials; each call is limited to
    /// `timeout` (use [`DEFAULT_REQUEST_TIMEOUT`] or more against a real server).
    pub fn new(
        url: &str,
        credentials: ApiCredentials,
        timeout: Duration,
    ) -> Result<Self, EgressApiError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|error| EgressApiError::Transport(error.to_string()))?;
        let base_url = http_base(url);
        let list = EgressClient::with_api_key(&base_url, &credentials.key, &credentials.secret)
            .with_failover(false)
            .with_request_timeout(timeout);
        Ok(TwirpEgressApi {
            base_url,
            credentials,
            http,
            list,
            timeout,
        })
    }

    /// The per-call limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn token(&self) -> Result<String, EgressApiError> {
        AccessToken::with_api_key(&self.credentials.key, &self.credentials.secret)
            .with_grants(VideoGrants {
                room_record: true,
                ..VideoGrants::default()
            })
            .with_ttl(Duration::from_secs(600))
            .to_jwt()
            .map_err(|error| EgressApiError::Twirp {
                code: "unauthenticated".to_owned(),
                msg: format!("cannot sign a token: {error}"),
            })
    }

    /// One Twirp call in protobuf answered by an `EgressInfo`, bounded by `limit`.
    async fn call(
        &self,
        method: &str,
        body: Vec<u8>,
        limit: Duration,
    ) -> Result<proto::EgressInfo, EgressApiError> {
        let url = format!("{}/twirp/livekit.Egress/{method}", self.base_url);
        let response = self
            .http
            .post(url)
            .bearer_auth(self.token()?)
            .header(header::CONTENT_TYPE, "application/protobuf")
            .header("X-Twirp-Timeout-Ms", limit.as_millis().max(1).to_string())
            .body(body)
            .timeout(limit)
            .send()
            .await
            .map_err(|error| self.transport_error(error, limit))?;
        let status = response.status();
        let body =
            response
                .bytes()
                .await
                .map_err(|error| match self.transport_error(error, limit) {
                    // The request went through: a failed read is not "unreachable".
                    EgressApiError::Unreachable(text) => EgressApiError::Transport(text),
                    other => other,
                })?;
        if status != reqwest::StatusCode::OK {
            return Err(twirp_failure(status, &body));
        }
        proto::EgressInfo::decode(body.as_ref())
            .map_err(|error| EgressApiError::Transport(format!("unreadable EgressInfo: {error}")))
    }

    fn transport_error(&self, error: reqwest::Error, limit: Duration) -> EgressApiError {
        // A connection that was never made (refused, or its own timeout) sent nothing.
        if error.is_connect() {
            EgressApiError::Unreachable(error.to_string())
        } else if error.is_timeout() {
            EgressApiError::Timeout(limit)
        } else {
            EgressApiError::Transport(error.to_string())
        }
    }
}

/// A Twirp error body; livekit-server's plain-text 401; or the HTTP status when the body is
/// neither (a proxy's page).
fn twirp_failure(status: reqwest::StatusCode, body: &[u8]) -> EgressApiError {
    #[derive(serde::Deserialize)]
    struct Body {
        code: String,
        #[serde(default)]
        msg: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(Body { code, msg }) => EgressApiError::Twirp { code, msg },
        // livekit-server's auth middleware answers before Twirp, in plain text. A proxy in
        // front of it would not answer 401 for a request it passed on.
        Err(_) if status == reqwest::StatusCode::UNAUTHORIZED => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            EgressApiError::Unauthorized(text.trim().to_owned())
        }
        // Not livekit-server's answer: whether it got the request is unknown.
        Err(_) => EgressApiError::Transport(format!("HTTP {status} without a Twirp error body")),
    }
}

impl EgressApi for TwirpEgressApi {
    async fn start(
        &self,
        request: &StartRequest,
        limit: Duration,
    ) -> Result<proto::EgressInfo, EgressApiError> {
        let limit = limit.min(self.timeout);
        self.call(request.method(), request.encode_to_vec(), limit)
            .await
    }

    async fn stop_egress(&self, egress_id: &str) -> Result<proto::EgressInfo, EgressApiError> {
        let request = proto::StopEgressRequest {
            egress_id: egress_id.to_owned(),
        };
        self.call("StopEgress", request.encode_to_vec(), self.timeout)
            .await
    }

    async fn list_egress(
        &self,
        filter: &ListFilter,
        active: bool,
    ) -> Result<Vec<proto::EgressInfo>, EgressApiError> {
        let filter = match filter {
            ListFilter::All => EgressListFilter::All,
            ListFilter::Room(room) => EgressListFilter::Room(room.clone()),
            ListFilter::Egress(id) => EgressListFilter::Egress(id.clone()),
        };
        self.list
            .list_egress(EgressListOptions {
                filter,
                active,
                page_token: None,
            })
            .await
            .map_err(|error| match error {
                ServiceError::Twirp(ServerError::Twirp(code)) => EgressApiError::Twirp {
                    code: code.code,
                    msg: code.msg,
                },
                ServiceError::Twirp(ServerError::Request(error)) => {
                    self.transport_error(error, self.timeout)
                }
                other => EgressApiError::Transport(other.to_string()),
            })
    }
}

/// What a failed start means for the ticket (DESIGN.md 2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// No pod took it (capacity raced away): certainly not started; retry later.
    Unavailable,
    /// The request never reached livekit-server: certainly not started; retry later.
    Unreachable,
    /// The room does not exist (yet).
    NotFound,
    /// The credentials were refused: not the ticket's fault; retry later, loudly.
    Unauthenticated,
    /// livekit-server refused the request itself (invalid, no permission): it will never start.
    Rejected,
    /// The egress may or may not have started (also `already_exists`: a same-ID retry met
    /// the egress already running, so it did start, under an ID the answer does not give).
    Unknown,
}

impl EgressApiError {
    /// What this error means for the ticket being started.
    pub fn start_failure(&self) -> StartFailure {
        match self {
            EgressApiError::Twirp { code, .. } => match code.as_str() {
                "unavailable" | "resource_exhausted" => StartFailure::Unavailable,
                "not_found" => StartFailure::NotFound,
                "unauthenticated" => StartFailure::Unauthenticated,
                "invalid_argument"
                | "malformed"
                | "permission_denied"
                | "failed_precondition"
                | "out_of_range"
                | "bad_route"
                | "unimplemented" => StartFailure::Rejected,
                // internal, unknown, deadline_exceeded, canceled, aborted, dataloss: the
                // server may have got as far as starting it.
                _ => StartFailure::Unknown,
            },
            EgressApiError::Unreachable(_) => StartFailure::Unreachable,
            EgressApiError::Unauthorized(_) => StartFailure::Unauthenticated,
            EgressApiError::Timeout(_) | EgressApiError::Transport(_) => StartFailure::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twirp(code: &str) -> EgressApiError {
        EgressApiError::Twirp {
            code: code.to_owned(),
            msg: String::new(),
        }
    }

    #[test]
    fn only_certain_answers_count_as_not_started() {
        assert_eq!(
            twirp("unavailable").start_failure(),
            StartFailure::Unavailable
        );
        assert_eq!(twirp("not_found").start_failure(), StartFailure::NotFound);
        assert_eq!(
            twirp("permission_denied").start_failure(),
            StartFailure::Rejected
        );
        assert_eq!(
            twirp("invalid_argument").start_failure(),
            StartFailure::Rejected
        );
        assert_eq!(twirp("internal").start_failure(), StartFailure::Unknown);
        assert_eq!(
            twirp("already_exists").start_failure(),
            StartFailure::Unknown,
            "a same-ID retry met the egress running: it started"
        );
        assert_eq!(
            EgressApiError::Timeout(Duration::from_secs(1)).start_failure(),
            StartFailure::Unknown
        );
        assert_eq!(
            EgressApiError::Transport("reset".into()).start_failure(),
            StartFailure::Unknown
        );
        assert_eq!(
            EgressApiError::Unreachable("refused".into()).start_failure(),
            StartFailure::Unreachable
        );
    }

    #[test]
    fn a_body_that_is_not_twirp_is_of_unknown_outcome() {
        let error = twirp_failure(
            reqwest::StatusCode::BAD_GATEWAY,
            b"<html>bad gateway</html>",
        );
        assert_eq!(error.start_failure(), StartFailure::Unknown);
        let error = twirp_failure(
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            br#"{"code":"unavailable","msg":"no response from servers"}"#,
        );
        assert_eq!(error.start_failure(), StartFailure::Unavailable);
        let error = twirp_failure(
            reqwest::StatusCode::UNAUTHORIZED,
            b"invalid authorization token: token is expired",
        );
        assert_eq!(error.start_failure(), StartFailure::Unauthenticated);
        assert_eq!(http_base("wss://lk.example.com/"), "https://lk.example.com");
        assert_eq!(http_base("ws://127.0.0.1:7880"), "http://127.0.0.1:7880");
    }
}
