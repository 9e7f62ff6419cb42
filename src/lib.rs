//! egress-scaler: a durable queue, a KEDA external scaler and a dispatcher for LiveKit egress.
//!
//! Modules, in the order data flows:
//! - [`model`]: the replica model, pure: demand + fleet snapshot + settings -> decision.
//! - [`queue`]: the Redis FIFO of egress requests with de-duplication, its counters and
//!   change events.
//! - [`redis_server`]: a real `redis-server` child process for tests, benchmarks and `demo`.
#![forbid(unsafe_code)]

pub mod model;
pub mod queue;
pub mod redis_server;
