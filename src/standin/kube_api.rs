//! A stand-in for the Kubernetes API server's scale subresource of Deployments:
//! `GET`, `PATCH` (merge patch) and `PUT` of
//! `/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale`.
//!
//! As the real one: every change bumps the Deployment's `resourceVersion`; a write carrying
//! another `resourceVersion` is refused with 409 `Conflict` (a `Status` body); an unknown
//! Deployment is 404 `NotFound`; answers are `autoscaling/v1` `Scale` objects. It can be told
//! to refuse everything with 403 `Forbidden` (RBAC missing), to lose the next writes to a
//! concurrent writer (each bumps the version first, as an HPA sync in between would), and to
//! answer after a delay. Unlike the real one it checks no credentials and knows nothing but
//! the replica count: no Pods are created.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
struct Deployment {
    replicas: u32,
    version: u64,
}

/// One write the stand-in accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleWrite {
    /// `PATCH` or `PUT`.
    pub method: &'static str,
    /// The Deployment, `namespace/name`.
    pub deployment: String,
    /// The replicas asked for.
    pub replicas: Option<u32>,
    /// The HTTP status answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Shared {
    deployments: Mutex<HashMap<String, Deployment>>,
    forbidden: Mutex<bool>,
    conflicts_pending: Mutex<u32>,
    delay: Mutex<Duration>,
    writes: Mutex<Vec<ScaleWrite>>,
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

/// A stand-in Kubernetes API (Deployment scale only); clones are handles to the same server,
/// which stops when the last one is dropped.
#[derive(Debug, Clone)]
pub struct KubeApiStandIn {
    inner: Arc<Inner>,
}

impl KubeApiStandIn {
    /// Starts on 127.0.0.1 with no Deployments.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let app = axum::Router::new()
            .route(
                "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
                get(get_scale).patch(patch_scale).put(put_scale),
            )
            .with_state(shared.clone());
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(signal.cancelled_owned())
                .await;
        });
        Ok(KubeApiStandIn {
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

    /// Creates (or sets) Deployment `namespace/name` with `replicas`, as another writer
    /// would: its version changes.
    pub fn set_replicas(&self, deployment: &str, replicas: u32) {
        let mut deployments = lock(&self.inner.shared.deployments);
        let entry = deployments
            .entry(deployment.to_owned())
            .or_insert(Deployment {
                replicas,
                version: 1,
            });
        entry.replicas = replicas;
        entry.version += 1;
    }

    /// The replicas of Deployment `namespace/name`, if it exists.
    pub fn replicas(&self, deployment: &str) -> Option<u32> {
        lock(&self.inner.shared.deployments)
            .get(deployment)
            .map(|d| d.replicas)
    }

    /// Refuses every request with 403 (the Role is missing) until told otherwise.
    pub fn set_forbidden(&self, forbidden: bool) {
        *lock(&self.inner.shared.forbidden) = forbidden;
    }

    /// The next `count` writes lose to a concurrent writer: the version moves before each.
    pub fn lose_next_writes(&self, count: u32) {
        *lock(&self.inner.shared.conflicts_pending) = count;
    }

    /// Answers every request after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.inner.shared.delay) = delay;
    }

    /// The writes received, in order.
    pub fn writes(&self) -> Vec<ScaleWrite> {
        lock(&self.inner.shared.writes).clone()
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn scale_body(namespace: &str, name: &str, deployment: Deployment) -> Response {
    axum::Json(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": deployment.version.to_string(),
        },
        "spec": { "replicas": deployment.replicas },
        "status": { "replicas": deployment.replicas, "selector": format!("app={name}") },
    }))
    .into_response()
}

/// The common gate of every request: delay, then 403 when forbidden.
async fn gate(shared: &Shared, verb: &str, namespace: &str, name: &str) -> Option<Response> {
    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    lock(&shared.forbidden).then(|| {
        status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "deployments.apps \"{name}\" is forbidden: User \"system:serviceaccount:{namespace}:egress-scaler\" cannot {verb} resource \"deployments/scale\" in API group \"apps\" in the namespace \"{namespace}\""
            ),
        )
    })
}

async fn get_scale(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = gate(&shared, "get", &namespace, &name).await {
        return refused;
    }
    match lock(&shared.deployments).get(&format!("{namespace}/{name}")) {
        Some(deployment) => scale_body(&namespace, &name, *deployment),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("deployments.apps \"{name}\" not found"),
    )
}

async fn patch_scale(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    write(&shared, "PATCH", namespace, name, body).await
}

async fn put_scale(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    write(&shared, "PUT", namespace, name, body).await
}

async fn write(
    shared: &Shared,
    method: &'static str,
    namespace: String,
    name: String,
    body: Bytes,
) -> Response {
    let key = format!("{namespace}/{name}");
    let verb = if method == "PUT" { "update" } else { "patch" };
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let replicas = body
        .as_ref()
        .and_then(|body| body["spec"]["replicas"].as_u64())
        .and_then(|replicas| u32::try_from(replicas).ok());
    let answer = match gate(shared, verb, &namespace, &name).await {
        Some(refused) => refused,
        None => apply(shared, method, &key, &namespace, &name, body, replicas),
    };
    lock(&shared.writes).push(ScaleWrite {
        method,
        deployment: key,
        replicas,
        status: answer.status().as_u16(),
    });
    answer
}

fn apply(
    shared: &Shared,
    method: &str,
    key: &str,
    namespace: &str,
    name: &str,
    body: Option<Value>,
    replicas: Option<u32>,
) -> Response {
    let Some(body) = body else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".to_owned(),
        );
    };
    let mut deployments = lock(&shared.deployments);
    let Some(deployment) = deployments.get_mut(key) else {
        return not_found(name);
    };
    {
        let mut pending = lock(&shared.conflicts_pending);
        if *pending > 0 {
            *pending -= 1;
            // Another writer got there first.
            deployment.version += 1;
        }
    }
    let version = body["metadata"]["resourceVersion"].as_str();
    // PUT replaces the object: it must name the version it read. A merge patch may omit it.
    let conflict = match version {
        Some(version) => version != deployment.version.to_string(),
        None => method == "PUT",
    };
    if conflict {
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on deployments.apps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    let Some(replicas) = replicas else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "spec.replicas is required".to_owned(),
        );
    };
    deployment.replicas = replicas;
    deployment.version += 1;
    scale_body(namespace, name, *deployment)
}
