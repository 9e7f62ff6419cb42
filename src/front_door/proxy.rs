//! Calls the front door does not queue go to livekit-server unchanged: the same method, query,
//! headers (the caller's own token included) and body, streamed both ways, with
//! livekit-server's status and headers kept. Only hop-by-hop headers stay behind.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};

use super::twirp::{Code, TwirpError};

/// Headers that belong to one connection, not to the call (RFC 9110 7.6.1), and `Host`.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::HOST
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Where passed calls go.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http(s)://host[:port]` of livekit-server, without a trailing slash.
    pub base_url: String,
    /// The client (no overall timeout: a call lasts as long as livekit-server takes, up to
    /// `limit`).
    pub http: reqwest::Client,
    /// Limit on one passed call.
    pub limit: std::time::Duration,
}

impl Upstream {
    /// Passes `request` (a call of `livekit.Egress/<method>`) to livekit-server.
    pub async fn pass(&self, method: &str, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let mut url = format!("{}/twirp/livekit.Egress/{method}", self.base_url);
        if let Some(query) = parts.uri.query() {
            url.push('?');
            url.push_str(query);
        }
        let sent = self
            .http
            .request(parts.method, url)
            .headers(end_to_end(&parts.headers))
            .body(reqwest::Body::wrap_stream(body.into_data_stream()))
            .timeout(self.limit)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(method, %error, "A call passed to livekit-server failed.");
                let error = if error.is_connect() {
                    TwirpError::new(Code::Unavailable, "livekit-server is unreachable")
                } else if error.is_timeout() {
                    TwirpError::new(
                        Code::DeadlineExceeded,
                        format!("livekit-server did not answer within {:?}", self.limit),
                    )
                } else {
                    TwirpError::new(Code::Internal, "the call to livekit-server failed")
                };
                return error.into_response();
            }
        };
        let status = answer.status();
        let headers = end_to_end(answer.headers());
        let mut response = Body::from_stream(answer.bytes_stream()).into_response();
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }
}
