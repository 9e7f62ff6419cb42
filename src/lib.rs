//! egress-scaler: a durable queue, a KEDA external scaler and a dispatcher for LiveKit egress.
//!
//! Modules, in the order data flows:
//! - [`config`]: flags, environment and TOML file, parsed once into typed settings.
//! - [`intake`]: the HTTP API (enqueue, lookup, cancel, status, metrics, health).
//! - [`front_door`]: the Twirp egress API of livekit-server, its starts queued and held.
//! - [`webhook`]: LiveKit webhooks: confirm, end and cancel tickets, auto-record new rooms.
//! - [`egress_request`]: the LiveKit start request of a ticket, validated per kind.
//! - [`egress_redact`]: that request as livekit-server lists it, secrets and stream keys hidden.
//! - [`queue`]: the Redis FIFO of egress requests with de-duplication and demand counters.
//! - [`fleet`]: background observer of the egress pods' metrics: the snapshot the model reads.
//! - [`model`]: the replica model, pure: demand + fleet snapshot + settings -> decision.
//! - [`prewarm`]: the arrival pattern per minute of the week, pure: pods ahead of it.
//! - [`dispatch`]: one leader per queue starts the head through livekit-server, exactly once.
//! - [`scaler`]: the KEDA external scaler gRPC service over the model.
//! - [`kube_scale`]: the scale-up assist, raising the egress Deployment's replicas at once.
//! - [`tls`]: TLS and mutual TLS of the gRPC listener, certificates reloaded on change.
//! - [`telemetry`]: the metrics registry and logging.
//! - [`server`]: `serve`, wiring the above with one shutdown token.
//! - [`kube`]: KEDA, the HPA and the ReplicaSet as the real controllers decide, pure: the one
//!   model of Kubernetes under `simulate` and the demo.
//! - [`simulate`]: scaling policies side by side on a trace, in virtual time, over [`model`].
//! - [`cli`]: the subcommands, `enqueue` and `status` as clients of the HTTP API.
//! - [`demo`]: `demo`, a burst of recordings played on this machine against stand-ins.
//! - [`redis_server`]: a real `redis-server` child process for tests, benchmarks and the demo.
//! - [`standin`]: HTTP stand-ins for egress pods and Prometheus, for tests, benches and `demo`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod egress_redact;
pub mod egress_request;
pub mod fleet;
pub mod front_door;
pub mod intake;
pub mod kube;
pub mod kube_scale;
pub mod model;
pub mod prewarm;
pub mod queue;
pub mod redis_server;
pub mod scaler;
pub mod server;
pub mod simulate;
pub mod standin;
pub mod telemetry;
pub mod tls;
pub mod webhook;
