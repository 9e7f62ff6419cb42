//! Kubernetes and KEDA as this project plays them: one model of the controllers that scale the
//! egress Deployment, used by `simulate` (in virtual time) and by the demo's KEDA/HPA and
//! ReplicaSet stand-ins (in wall time). Each rule follows the real controller's function, named
//! where it is written (DESIGN.md 2.4, 2.5). Pure: no I/O, the clock is passed in.
//!
//! - [`scaled_object`]: a ScaledObject's YAML (the shipped `keda/scaledobject.yaml` built in)
//!   read into the settings below.
//! - [`keda`]: activation from zero, the cooldown, the push stream, and the fallback on errors.
//! - [`hpa`]: the HPA's formula and tolerance, `behavior` windows and rate limits, or the
//!   controller's defaults without one.
//! - [`replicaset`]: which pods a ReplicaSet deletes first.

pub mod hpa;
pub mod keda;
pub mod replicaset;
pub mod scaled_object;

pub use hpa::{
    Behavior, ClusterTolerance, Hpa, HpaSpec, HpaSync, MetricReading, RatePolicy, ScalingRules,
    Select, Tolerances,
};
pub use keda::{Activity, Fallback, FallbackBehavior, Keda, KedaAction, KedaState};
pub use replicaset::{PodPhase, RankedPod, Uid, deletion_order};
pub use scaled_object::{ScaledObject, ScaledObjectError};

/// Milliseconds on the caller's clock (virtual time in `simulate`, time since start in `demo`).
pub type Millis = u64;
