//! A stand-in for a Prometheus server's HTTP API (`/api/v1/query`, instant vectors) that has
//! "scraped" some stand-in egress pods.
//!
//! It evaluates no PromQL: it answers the two queries the fleet's Prometheus source sends
//! ([`SERIES_QUERY`] and [`TARGETS_QUERY`]) from the stand-in pods' current series, and any
//! other query with a `bad_data` error. Each target carries the labels Prometheus adds
//! (`instance`, `job`, `pod`), and can be switched to a failing scrape (its series go stale,
//! `up` is 0) or removed (the pod was deleted: no series, no `up`). A target whose stand-in pod
//! does not listen (down, exited, crashed) fails its scrape as well. Unlike a real Prometheus
//! it shows the pods as they are at the query, with no scrape interval to lag by (the tests in
//! `tests/fleet_prometheus.rs` run the real server, from `tests/support/prometheus.rs`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::egress_pod::EgressPodStandIn;
use crate::fleet::{SERIES_QUERY, TARGETS_QUERY};

/// How the stand-in Prometheus fails, when told to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrometheusFailure {
    /// HTTP 422 with a Prometheus error answer (`status: error`).
    ErrorAnswer,
    /// HTTP 503 with a plain-text body, like a proxy in front of a down server.
    Unavailable,
}

#[derive(Debug, Clone)]
struct Target {
    instance: String,
    pod_name: String,
    pod: EgressPodStandIn,
    scrape_failing: bool,
}

impl Target {
    /// Whether the last scrape of this target would have succeeded.
    fn up(&self) -> bool {
        !self.scrape_failing && self.pod.is_serving()
    }
}

#[derive(Debug, Default)]
struct Shared {
    targets: Mutex<Vec<Target>>,
    failure: Mutex<Option<PrometheusFailure>>,
    queries: Mutex<Vec<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// A stand-in Prometheus HTTP API; clones are handles to the same server, which stops when
/// the last one is dropped.
#[derive(Debug, Clone)]
pub struct PrometheusStandIn {
    inner: Arc<Inner>,
}

impl PrometheusStandIn {
    /// Starts on 127.0.0.1 with no targets.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .route("/api/v1/query", get(query_handler))
            .with_state(shared.clone());
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(signal.cancelled_owned())
                .await;
        });
        Ok(PrometheusStandIn {
            inner: Arc::new(Inner {
                addr,
                shared,
                stop,
                task,
            }),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Adds a scraped egress pod with `pod` label `pod_name`; its `instance` label is the
    /// stand-in's address, which is returned.
    pub fn add_target(&self, pod: &EgressPodStandIn, pod_name: &str) -> String {
        let instance = pod.addr().to_string();
        lock(&self.inner.shared.targets).push(Target {
            instance: instance.clone(),
            pod_name: pod_name.to_owned(),
            pod: pod.clone(),
            scrape_failing: false,
        });
        instance
    }

    /// A failing scrape of this target: its series vanish and `up` is 0.
    pub fn set_scrape_failing(&self, instance: &str, failing: bool) {
        for target in lock(&self.inner.shared.targets).iter_mut() {
            if target.instance == instance {
                target.scrape_failing = failing;
            }
        }
    }

    /// The target is gone from service discovery (the pod was deleted).
    pub fn remove_target(&self, instance: &str) {
        lock(&self.inner.shared.targets).retain(|target| target.instance != instance);
    }

    /// Makes every query fail this way (`None`: answer again).
    pub fn set_failure(&self, failure: Option<PrometheusFailure>) {
        *lock(&self.inner.shared.failure) = failure;
    }

    /// The queries received so far.
    pub fn queries(&self) -> Vec<String> {
        lock(&self.inner.shared.queries).clone()
    }
}

fn sample(labels: Map<String, Value>, value: f64, now: f64) -> Value {
    json!({ "metric": labels, "value": [now, format_value(value)] })
}

/// Prometheus writes values as strings, shortest form, with `NaN` and `±Inf`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

fn target_labels(target: &Target, name: &str) -> Map<String, Value> {
    let mut labels = Map::new();
    labels.insert("__name__".to_owned(), name.into());
    labels.insert("instance".to_owned(), target.instance.clone().into());
    labels.insert("job".to_owned(), "egress".into());
    labels.insert("namespace".to_owned(), "livekit".into());
    labels.insert("pod".to_owned(), target.pod_name.clone().into());
    labels
}

async fn query_handler(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let query = params.get("query").cloned().unwrap_or_default();
    lock(&shared.queries).push(query.clone());
    match *lock(&shared.failure) {
        Some(PrometheusFailure::ErrorAnswer) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({
                    "status": "error",
                    "errorType": "execution",
                    "error": "query processing would load too many samples into memory",
                })),
            )
                .into_response();
        }
        Some(PrometheusFailure::Unavailable) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
        }
        None => {}
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let targets = lock(&shared.targets).clone();
    let result: Vec<Value> = if query == SERIES_QUERY {
        targets
            .iter()
            .filter(|target| target.up())
            .flat_map(|target| {
                target.pod.samples().into_iter().map(move |s| {
                    let mut labels = target_labels(target, s.name);
                    for (key, value) in s.labels {
                        labels.insert(key.to_owned(), value.into());
                    }
                    sample(labels, s.value, now)
                })
            })
            .collect()
    } else if query == TARGETS_QUERY {
        targets
            .iter()
            .map(|target| {
                let up = if target.up() { 1.0 } else { 0.0 };
                sample(target_labels(target, "up"), up, now)
            })
            .collect()
    } else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "status": "error",
                "errorType": "bad_data",
                "error": "the stand-in only answers the fleet's own queries",
            })),
        )
            .into_response();
    };
    axum::Json(json!({
        "status": "success",
        "data": { "resultType": "vector", "result": result },
    }))
    .into_response()
}
