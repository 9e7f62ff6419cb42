//! One Prometheus registry for the process, typed label sets, and log set-up.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::config::LogFormat;
use crate::model::{Decision, EgressKind};
use crate::queue::{QueueName, QueueStats};

/// Labels of the per-queue gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueueLabels {
    /// Queue name (bounded by the operator's configuration).
    pub queue: String,
}

/// Labels of the per-queue, per-kind gauges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueueKindLabels {
    /// Queue name.
    pub queue: String,
    /// Egress kind.
    pub kind: &'static str,
}

/// The gRPC methods of the KEDA external scaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RpcMethod {
    IsActive,
    StreamIsActive,
    GetMetricSpec,
    GetMetrics,
    StreamMetricSpec,
}

/// Labels of the gRPC request counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RpcLabels {
    /// Method called.
    pub method: RpcMethod,
    /// gRPC status code name, a bounded set.
    pub code: &'static str,
}

/// Labels of the gRPC duration histogram.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RpcMethodLabels {
    /// Method called.
    pub method: RpcMethod,
}

/// What happened to an enqueue request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum EnqueueOutcome {
    accepted,
    duplicate,
    rejected,
    unavailable,
}

/// Labels of the enqueue counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EnqueueLabels {
    /// Outcome, a bounded set.
    pub outcome: EnqueueOutcome,
}

/// The process's own metrics (prefix `egress_scaler_`).
pub struct Metrics {
    /// Tickets waiting in the pending set, by kind.
    pub queue_depth: Family<QueueKindLabels, Gauge>,
    /// Age of the oldest queued ticket.
    pub queue_oldest_age_seconds: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    /// Last desired replica count answered or computed.
    pub desired_replicas: Family<QueueLabels, Gauge>,
    /// KEDA gRPC calls by method and status code.
    pub grpc_requests: Family<RpcLabels, Counter>,
    /// KEDA gRPC call durations.
    pub grpc_duration_seconds: Family<RpcMethodLabels, Histogram>,
    /// Enqueue requests by outcome.
    pub enqueue_requests: Family<EnqueueLabels, Counter>,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let metrics = Metrics {
            queue_depth: Family::default(),
            queue_oldest_age_seconds: Family::default(),
            desired_replicas: Family::default(),
            grpc_requests: Family::default(),
            grpc_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.5, 14))
            }),
            enqueue_requests: Family::default(),
        };
        registry.register(
            "egress_scaler_queue_depth",
            "Tickets queued and not yet claimed, by queue and kind",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "egress_scaler_queue_oldest_age_seconds",
            "Age of the oldest queued ticket",
            metrics.queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "egress_scaler_desired_replicas",
            "Desired egress replicas of the last decision, by queue",
            metrics.desired_replicas.clone(),
        );
        registry.register(
            "egress_scaler_grpc_requests",
            "KEDA external scaler calls by method and gRPC code",
            metrics.grpc_requests.clone(),
        );
        registry.register(
            "egress_scaler_grpc_request_duration_seconds",
            "KEDA external scaler call durations by method",
            metrics.grpc_duration_seconds.clone(),
        );
        registry.register(
            "egress_scaler_enqueue_requests",
            "Enqueue requests through the HTTP API by outcome",
            metrics.enqueue_requests.clone(),
        );
        Arc::new(metrics)
    }

    /// Records a decision for a queue.
    pub fn record_decision(&self, queue: &QueueName, decision: &Decision) {
        self.desired_replicas
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(i64::from(decision.desired));
    }

    /// Records queue depth and oldest age.
    pub fn record_queue(&self, queue: &QueueName, stats: &QueueStats, now_ms: u64) {
        for kind in EgressKind::ALL {
            self.queue_depth
                .get_or_create(&QueueKindLabels {
                    queue: queue.to_string(),
                    kind: kind.as_str(),
                })
                .set(stats.queued.count(kind) as i64);
        }
        let age = stats
            .oldest_enqueued_at_ms
            .map(|at| now_ms.saturating_sub(at) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.queue_oldest_age_seconds
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(age);
    }

    /// Starts timing one gRPC call; the call is recorded when the timer is dropped.
    pub fn rpc_timer(self: &Arc<Self>, method: RpcMethod) -> RpcTimer {
        RpcTimer {
            metrics: Arc::clone(self),
            method,
            started: Instant::now(),
            code: "cancelled",
        }
    }
}

/// Records one gRPC call's duration and code on drop (a dropped future counts as cancelled).
pub struct RpcTimer {
    metrics: Arc<Metrics>,
    method: RpcMethod,
    started: Instant,
    code: &'static str,
}

impl RpcTimer {
    /// Sets the outcome to record.
    pub fn finish<T>(mut self, result: &Result<T, tonic::Status>) {
        self.code = match result {
            Ok(_) => "ok",
            Err(status) => code_label(status.code()),
        };
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        self.metrics
            .grpc_requests
            .get_or_create(&RpcLabels {
                method: self.method,
                code: self.code,
            })
            .inc();
        self.metrics
            .grpc_duration_seconds
            .get_or_create(&RpcMethodLabels {
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Internal => "internal",
        Code::Unimplemented => "unimplemented",
        _ => "other",
    }
}

/// Encodes the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// Installs the global tracing subscriber (RUST_LOG filters, default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
