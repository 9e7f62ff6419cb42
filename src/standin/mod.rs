//! Stand-ins for the systems around egress-scaler, for tests, benchmarks and the `demo`
//! command. They follow the facts of DESIGN.md 2 but are not the real thing: no recording
//! happens anywhere in here.
//!
//! - [`egress_pod`]: an egress pod's metrics endpoint, switchable between idle, busy,
//!   terminating, disabled, slow, garbage, oversized and down.
//! - [`prometheus_api`]: a Prometheus server's `/api/v1/query` over stand-in egress pods.
//! - [`kube_api`]: the Kubernetes API's scale subresource of Deployments (409s, 403s).
//! - [`livekit_server`]: livekit-server's egress Twirp API and webhooks over stand-in pods.

pub mod egress_pod;
pub mod kube_api;
pub mod livekit_server;
pub mod prometheus_api;

pub use egress_pod::{BodyMode, EgressPodStandIn, StandInSample};
pub use kube_api::{KubeApiStandIn, ScaleWrite};
pub use livekit_server::{
    LiveKitServerStandIn, LiveKitStandInOptions, ScriptedStart, StartTiming, StartedEgress,
};
pub use prometheus_api::{PrometheusFailure, PrometheusStandIn};
