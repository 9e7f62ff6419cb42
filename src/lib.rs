//! egress-scaler: a durable queue, a KEDA external scaler and a dispatcher for LiveKit egress.
//!
//! Modules, in the order data flows:
//! - [`model`]: the replica model, pure: demand + fleet snapshot + settings -> decision.
//! - [`queue`]: the Redis FIFO of egress requests with de-duplication.
//! - [`fleet`]: background observer of the egress pods' metrics: the fleet snapshot the model reads.
//! - [`standin`]: HTTP stand-ins for egress pods and Prometheus, for tests, benches and `demo`.
#![forbid(unsafe_code)]

pub mod fleet;
pub mod model;
pub mod queue;
pub mod standin;
