//! egress-scaler: a durable queue, a KEDA external scaler and a dispatcher for LiveKit egress.
//!
//! Modules, in the order data flows:
//! - [`model`]: the replica model, pure: demand + fleet snapshot + settings -> decision.
//! - [`queue`]: the Redis FIFO of egress requests with de-duplication.
#![forbid(unsafe_code)]

pub mod model;
pub mod queue;
