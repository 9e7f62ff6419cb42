//! Webhook delivery as livekit-server does it (FIDELITY.md 3): one FIFO per resource (an
//! egress ID, a room name), so the events of one egress arrive in order while nothing orders
//! an egress against its room; up to `webhook_tries` tries on connection errors, 429 and 5xx
//! (not 501), waiting `webhook_retry`, then twice as long each time; an event queued longer
//! than `webhook_max_age` is dropped, and a queue holds at most 200 events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use axum::http::header;
use base64::Engine;
use livekit_api::access_token::AccessToken;
use livekit_protocol as proto;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::StartTiming;

/// Events one resource's queue holds at most; more are dropped.
const QUEUE_LIMIT: usize = 200;

#[derive(Debug)]
struct Queued {
    url: String,
    event: proto::WebhookEvent,
    queued_at: Instant,
}

#[derive(Debug, Default)]
struct Queues {
    /// A resource has an entry exactly while a worker delivers its queue.
    pending: HashMap<String, VecDeque<Queued>>,
    url: Option<String>,
    on: bool,
    delivered: u64,
    dropped: u64,
}

/// The webhook sender of one stand-in.
#[derive(Debug)]
pub(super) struct Webhooks {
    queues: Mutex<Queues>,
    /// Made at the first delivery: a stand-in that sends nothing needs no TLS set-up.
    client: OnceLock<Option<reqwest::Client>>,
    api_key: String,
    api_secret: String,
    timing: StartTiming,
    stop: CancellationToken,
}

impl Webhooks {
    pub(super) fn new(
        api_key: &str,
        api_secret: &str,
        url: Option<String>,
        timing: StartTiming,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Webhooks {
            queues: Mutex::new(Queues {
                url,
                on: true,
                ..Queues::default()
            }),
            client: OnceLock::new(),
            api_key: api_key.to_owned(),
            api_secret: api_secret.to_owned(),
            timing,
            stop,
        })
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_url(&self, url: Option<String>) {
        self.queues().url = url;
    }

    pub(super) fn set_on(&self, on: bool) {
        self.queues().on = on;
    }

    /// (delivered, dropped) so far: answered by the receiver, or given up.
    pub(super) fn counts(&self) -> (u64, u64) {
        let queues = self.queues();
        (queues.delivered, queues.dropped)
    }

    /// Queues `event` behind the earlier events of `resource`; nothing when webhooks are off.
    pub(super) fn send(self: &Arc<Self>, resource: &str, event: proto::WebhookEvent) {
        let mut queues = self.queues();
        let url = match (&queues.url, queues.on) {
            (Some(url), true) => url.clone(),
            _ => return,
        };
        let fresh = !queues.pending.contains_key(resource);
        let queue = queues.pending.entry(resource.to_owned()).or_default();
        if queue.len() >= QUEUE_LIMIT {
            queues.dropped += 1;
            return;
        }
        queue.push_back(Queued {
            url,
            event,
            queued_at: Instant::now(),
        });
        if fresh {
            let worker = self.clone().deliver_queue(resource.to_owned());
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = worker => {}
                }
            });
        }
    }

    /// Sends the queue of one resource in order until it is empty.
    async fn deliver_queue(self: Arc<Self>, resource: String) {
        loop {
            let next = {
                let mut queues = self.queues();
                match queues
                    .pending
                    .get_mut(&resource)
                    .and_then(VecDeque::pop_front)
                {
                    Some(next) => next,
                    None => {
                        queues.pending.remove(&resource);
                        return;
                    }
                }
            };
            let delivered = next.queued_at.elapsed() <= self.timing.webhook_max_age
                && self.deliver(&next).await;
            let mut queues = self.queues();
            if delivered {
                queues.delivered += 1;
            } else {
                queues.dropped += 1;
            }
        }
    }

    /// One event, with its retries; true when the receiver answered with a final status.
    async fn deliver(&self, queued: &Queued) -> bool {
        let client = self.client.get_or_init(|| {
            // reqwest is built without a default TLS provider; the process may not have
            // chosen one (a test), so the ring provider is installed unless one is.
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .ok()
        });
        let Some(client) = client else {
            return false;
        };
        let body = serde_json::to_string(&queued.event).expect("protobuf messages encode as JSON");
        let mut wait = self.timing.webhook_retry;
        for attempt in 0..self.timing.webhook_tries.max(1) {
            if attempt > 0 {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
            // A new token per try, as the real sender signs each request.
            let Ok(token) = sign_webhook(&self.api_key, &self.api_secret, &body) else {
                return false;
            };
            let result = client
                .post(&queued.url)
                .header(header::AUTHORIZATION, token)
                .header(header::CONTENT_TYPE, "application/webhook+json")
                .header(header::USER_AGENT, "LiveKit")
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(response) => {
                    let status = response.status();
                    let again = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || (status.is_server_error()
                            && status != reqwest::StatusCode::NOT_IMPLEMENTED);
                    if !again {
                        return true;
                    }
                    tracing::debug!(%status, id = %queued.event.id, "Stand-in webhook refused; retrying.");
                }
                Err(error) => {
                    tracing::debug!(%error, id = %queued.event.id, "Stand-in webhook not delivered; retrying.");
                }
            }
        }
        false
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
