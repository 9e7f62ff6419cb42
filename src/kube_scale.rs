//! Scale-up assist (DESIGN.md 2.5, `--kube-scale NAMESPACE/DEPLOYMENT`): KEDA's push only does
//! 0 -> 1 and every later step waits for the next HPA sync (15 s). When the default queue's
//! desired count exceeds the egress Deployment's `spec.replicas`, this raises them at once
//! through the scale subresource.
//!
//! What it writes is exactly the count the HPA computes from the same GetMetrics answer
//! (`AverageValue`, target 1: `ceil(value / 1)`, already clamped to the ScaledObject's
//! `maxReplicas` by the model's own max). At its next sync the HPA starts from that count,
//! finds usage / (target x replicas) = 1, inside any tolerance, and leaves it: no rate limit
//! applies to a change it does not make. A higher count would be undone, so none is written.
//!
//! - It never lowers `spec.replicas`: scale-down stays with KEDA and the HPA.
//! - The write carries the `resourceVersion` read with the count (a merge patch of the scale
//!   subresource), so a concurrent writer (the HPA, KEDA, an operator) makes it fail with 409;
//!   it then reads again and writes only if the count is still lower ([`MAX_CONFLICT_RETRIES`]).
//! - 403 (the Role of `deploy/kube-scale/` missing) is logged as an error naming the Role and
//!   counted (`egress_scaler_kube_scale_writes_total{outcome="forbidden"}`); the assist then
//!   stays quiet for a back-off that doubles from 30 s to 10 min, and scaling goes on through
//!   KEDA and the HPA alone.
//!
//! The client is kube-rs with the in-cluster configuration (service account token and CA);
//! tests give it a plain URL instead ([`KubeApi::Url`]), the Kubernetes API stand-in's.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::apps::v1::Deployment;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Reads and writes after a 409 before the assist gives this desired count up.
pub const MAX_CONFLICT_RETRIES: u32 = 5;
/// First quiet period after a 403; it doubles up to [`MAX_FORBIDDEN_BACKOFF`].
pub const FORBIDDEN_BACKOFF: Duration = Duration::from_secs(30);
/// How long a replica count read stays trusted: one HPA sync, after which the HPA (or KEDA)
/// may have lowered it.
pub const KNOWN_FOR: Duration = Duration::from_secs(15);
/// Longest quiet period after repeated 403s.
pub const MAX_FORBIDDEN_BACKOFF: Duration = Duration::from_secs(600);

/// `NAMESPACE/DEPLOYMENT`: the egress Deployment the assist scales.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// `--kube-scale` is not `NAMESPACE/DEPLOYMENT` with Kubernetes names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not NAMESPACE/DEPLOYMENT (lowercase letters, digits, '-' and, in the name, '.')")]
pub struct InvalidDeploymentRef(pub String);

fn dns_name(text: &str, max: usize, dots: bool) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    !text.is_empty()
        && text.len() <= max
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes
            .iter()
            .all(|b| alnum(*b) || *b == b'-' || (dots && *b == b'.'))
}

impl FromStr for DeploymentRef {
    type Err = InvalidDeploymentRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name))
                if dns_name(namespace, 63, false) && dns_name(name, 253, true) =>
            {
                Ok(DeploymentRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(InvalidDeploymentRef(s.to_owned())),
        }
    }
}

impl fmt::Display for DeploymentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the Kubernetes API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeApi {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's
    /// token and CA.
    InCluster,
    /// A plain URL without credentials: the Kubernetes API stand-in of tests.
    Url(String),
}

/// The scale-up assist's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeScaleConfig {
    /// The Deployment scaled.
    pub deployment: DeploymentRef,
    /// How to reach the API server.
    pub api: KubeApi,
}

/// The assist cannot start or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeScaleError {
    /// No in-cluster configuration, or a bad URL.
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
    /// The API server answered with an error or could not be reached.
    #[error(transparent)]
    Api(#[from] ::kube::Error),
}

impl KubeScaleError {
    /// The HTTP status of an API error answer.
    fn status(&self) -> Option<u16> {
        match self {
            KubeScaleError::Api(::kube::Error::Api(response)) => Some(response.code),
            _ => None,
        }
    }
}

/// What one offer of a desired count did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raise {
    /// `spec.replicas` was raised from the first count to the second.
    Raised(u32, u32),
    /// It already was at least the count wanted.
    Enough(u32),
    /// Concurrent writers won every try.
    Conflicted,
    /// The API refused (403).
    Forbidden,
}

/// A client of one Deployment's scale subresource.
#[derive(Clone)]
pub struct DeploymentScale {
    api: Api<Deployment>,
    deployment: DeploymentRef,
}

impl DeploymentScale {
    /// A client as configured.
    pub async fn connect(config: &KubeScaleConfig) -> Result<Self, KubeScaleError> {
        let kube_config = match &config.api {
            KubeApi::InCluster => ::kube::Config::incluster()
                .map_err(|error| KubeScaleError::Config(error.to_string()))?,
            KubeApi::Url(url) => ::kube::Config::new(
                url.parse()
                    .map_err(|error| KubeScaleError::Config(format!("{url:?}: {error}")))?,
            ),
        };
        let client = ::kube::Client::try_from(kube_config)?;
        Ok(DeploymentScale {
            api: Api::namespaced(client, &config.deployment.namespace),
            deployment: config.deployment.clone(),
        })
    }

    /// The Deployment's `spec.replicas` and the `resourceVersion` it was read at.
    pub async fn replicas(&self) -> Result<(u32, Option<String>), KubeScaleError> {
        let scale = self.api.get_scale(&self.deployment.name).await?;
        let replicas = scale
            .spec
            .and_then(|spec| spec.replicas)
            .and_then(|replicas| u32::try_from(replicas).ok())
            .unwrap_or(0);
        Ok((replicas, scale.metadata.resource_version))
    }

    /// Raises `spec.replicas` to `desired` if it is lower, never lowering it; retries 409s.
    pub async fn raise_to(&self, desired: u32) -> Result<Raise, KubeScaleError> {
        for _ in 0..=MAX_CONFLICT_RETRIES {
            let (current, version) = match self.replicas().await {
                Err(error) if error.status() == Some(403) => return Ok(Raise::Forbidden),
                other => other?,
            };
            if current >= desired {
                return Ok(Raise::Enough(current));
            }
            let mut patch = serde_json::json!({ "spec": { "replicas": desired } });
            if let Some(version) = version {
                patch["metadata"] = serde_json::json!({ "resourceVersion": version });
            }
            match self
                .api
                .patch_scale(
                    &self.deployment.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return Ok(Raise::Raised(current, desired)),
                Err(error) => {
                    let error = KubeScaleError::from(error);
                    match error.status() {
                        Some(409) => continue,
                        Some(403) => return Ok(Raise::Forbidden),
                        _ => return Err(error),
                    }
                }
            }
        }
        Ok(Raise::Conflicted)
    }
}

/// Sends desired counts to the assist; cheap to clone and to call on every decision.
#[derive(Clone)]
pub struct ScaleUpAssist {
    desired: Arc<watch::Sender<u32>>,
}

impl ScaleUpAssist {
    /// An assist and the receiver its task ([`run_assist`]) reads.
    pub fn new() -> (Self, watch::Receiver<u32>) {
        let (sender, receiver) = watch::channel(0);
        (
            ScaleUpAssist {
                desired: Arc::new(sender),
            },
            receiver,
        )
    }

    /// Offers the desired count of a decision (the GetMetrics value); the task acts when it
    /// exceeds what it last saw of the Deployment.
    pub fn offer(&self, desired: u32) {
        self.desired.send_if_modified(|current| {
            let changed = *current != desired;
            *current = desired;
            changed
        });
    }
}

/// The assist's task: for each new desired count above the Deployment's replicas as last
/// read, raises them ([`DeploymentScale::raise_to`]); backs off after a 403; ends on
/// `shutdown`.
pub async fn run_assist(
    scale: DeploymentScale,
    mut desired: watch::Receiver<u32>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let deployment = scale.deployment.to_string();
    // The replicas last read, and when.
    let mut known: Option<(u32, tokio::time::Instant)> = None;
    let mut backoff = FORBIDDEN_BACKOFF;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = desired.changed() => if changed.is_err() { return },
        }
        let want = *desired.borrow_and_update();
        // A count at or below the replicas last seen needs no call: the assist only raises.
        let fresh = known.filter(|(_, at)| at.elapsed() < KNOWN_FOR);
        if want == 0 || fresh.is_some_and(|(replicas, _)| want <= replicas) {
            continue;
        }
        match scale.raise_to(want).await {
            Ok(Raise::Raised(from, to)) => {
                known = Some((to, tokio::time::Instant::now()));
                backoff = FORBIDDEN_BACKOFF;
                metrics.record_kube_scale("raised");
                tracing::info!(%deployment, from, to, "Raised the egress Deployment's replicas ahead of the HPA sync.");
            }
            Ok(Raise::Enough(current)) => {
                known = Some((current, tokio::time::Instant::now()));
                backoff = FORBIDDEN_BACKOFF;
            }
            Ok(Raise::Conflicted) => {
                metrics.record_kube_scale("conflict");
                tracing::warn!(%deployment, want, "Concurrent writers changed the Deployment's scale on every try; the HPA will scale it at its next sync.");
            }
            Ok(Raise::Forbidden) => {
                metrics.record_kube_scale("forbidden");
                tracing::error!(
                    %deployment,
                    backoff_seconds = backoff.as_secs(),
                    "The Kubernetes API refused the scale-up assist (403): apply the Role and RoleBinding of deploy/kube-scale/ (get and patch on deployments/scale for this Deployment). Scaling goes on through KEDA and the HPA alone."
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_FORBIDDEN_BACKOFF);
                // Whatever was offered meanwhile is read again at once.
                desired.mark_changed();
            }
            Err(error) => {
                metrics.record_kube_scale("error");
                tracing::warn!(%deployment, %error, "Cannot raise the egress Deployment's replicas; the HPA will at its next sync.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_refs_parse() {
        assert_eq!(
            "livekit/egress".parse::<DeploymentRef>().unwrap(),
            DeploymentRef {
                namespace: "livekit".to_owned(),
                name: "egress".to_owned()
            }
        );
        assert!("livekit/egress.v2".parse::<DeploymentRef>().is_ok());
        for bad in [
            "egress",
            "/egress",
            "livekit/",
            "Live/egress",
            "a.b/egress",
            "a/b/c",
        ] {
            assert!(bad.parse::<DeploymentRef>().is_err(), "{bad}");
        }
    }
}
