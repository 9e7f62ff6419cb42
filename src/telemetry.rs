//! One Prometheus registry for the process, typed label sets, and log set-up.
//!
//! Queue labels are bounded: [`Metrics`] records only the queues the process serves, so no
//! request can add a series. Text logs escape every control character in every field and
//! message ([`EscapedFields`]), so no value (a room name, a key, a URL, an error) can start a
//! forged log line or send a terminal escape sequence.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::config::LogFormat;
use crate::model::{Decision, EgressKind};
use crate::queue::{EvictionPolicy, QueueName, QueueStats, ServedQueues};

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
    /// The key is held by a ticket with a different request (409).
    conflict,
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
    /// Of those, the pods pre-warm added ahead of the arrival pattern.
    pub prewarm_pods: Family<QueueLabels, Gauge>,
    /// Scale-up assist writes of the Deployment's replicas, by outcome.
    pub kube_scale_writes: Family<KubeScaleLabels, Counter>,
    /// KEDA gRPC calls by method and status code.
    pub grpc_requests: Family<RpcLabels, Counter>,
    /// KEDA gRPC call durations.
    pub grpc_duration_seconds: Family<RpcMethodLabels, Histogram>,
    /// Enqueue requests by outcome.
    pub enqueue_requests: Family<EnqueueLabels, Counter>,
    /// Failed tickets kept as dead letters.
    pub dead_letters: Family<QueueLabels, Gauge>,
    /// The only queues that get series.
    served: ServedQueues,
    /// 1 when Redis's `maxmemory-policy` is `noeviction`, 0 otherwise or unknown.
    pub redis_eviction_policy_ok: Gauge,
    /// 1 for the `maxmemory-policy` last read (the only series), by policy name.
    pub redis_eviction_policy: Family<PolicyLabels, Gauge>,
}

/// Labels of the scale-up assist's write counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KubeScaleLabels {
    /// `raised`, `conflict`, `forbidden` or `error`.
    pub outcome: &'static str,
}

/// Labels of the Redis eviction policy gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The policy as Redis names it (one of its eight), or `unknown`.
    pub policy: String,
}

impl Metrics {
    /// Registers the metrics in `registry`; queue series exist for `served` only.
    pub fn new(registry: &mut Registry, served: ServedQueues) -> Arc<Self> {
        let metrics = Metrics {
            served,
            queue_depth: Family::default(),
            queue_oldest_age_seconds: Family::default(),
            desired_replicas: Family::default(),
            prewarm_pods: Family::default(),
            kube_scale_writes: Family::default(),
            grpc_requests: Family::default(),
            grpc_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.5, 14))
            }),
            enqueue_requests: Family::default(),
            dead_letters: Family::default(),
            redis_eviction_policy_ok: Gauge::default(),
            redis_eviction_policy: Family::default(),
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
            "egress_scaler_prewarm_pods",
            "Pods of the last decision added ahead of the arrival pattern, by queue",
            metrics.prewarm_pods.clone(),
        );
        registry.register(
            "egress_scaler_kube_scale_writes",
            "Scale-up assist: writes of the egress Deployment's replicas by outcome",
            metrics.kube_scale_writes.clone(),
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
        registry.register(
            "egress_scaler_dead_letters",
            "Failed tickets kept as dead letters, by queue",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "egress_scaler_redis_eviction_policy_ok",
            "1 when Redis's maxmemory-policy is noeviction; 0 when it may evict tickets or is unknown",
            metrics.redis_eviction_policy_ok.clone(),
        );
        registry.register(
            "egress_scaler_redis_eviction_policy",
            "Redis's maxmemory-policy as last read (value 1, the policy in the label)",
            metrics.redis_eviction_policy.clone(),
        );
        Arc::new(metrics)
    }

    /// Whether `queue` may have series; others are left out (and logged at debug level).
    fn bounded(&self, queue: &QueueName) -> bool {
        let served = self.served.contains(queue);
        if !served {
            tracing::debug!(%queue, "No metric series for a queue this process does not serve.");
        }
        served
    }

    /// Records the Redis `maxmemory-policy` last read.
    pub fn record_eviction_policy(&self, policy: &EvictionPolicy) {
        self.redis_eviction_policy_ok
            .set(i64::from(policy.is_safe()));
        // One series: the policy may change, and the old label must not linger.
        self.redis_eviction_policy.clear();
        self.redis_eviction_policy
            .get_or_create(&PolicyLabels {
                policy: policy.name().to_owned(),
            })
            .set(1);
    }

    /// Records a decision for a served queue.
    pub fn record_decision(&self, queue: &QueueName, decision: &Decision) {
        if !self.bounded(queue) {
            return;
        }
        self.desired_replicas
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(i64::from(decision.desired));
        self.prewarm_pods
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(decision.prewarm_pods as i64);
    }

    /// Counts one write (or refused write) of the scale-up assist.
    pub fn record_kube_scale(&self, outcome: &'static str) {
        self.kube_scale_writes
            .get_or_create(&KubeScaleLabels { outcome })
            .inc();
    }

    /// Records queue depth and oldest age of a served queue.
    pub fn record_queue(&self, queue: &QueueName, stats: &QueueStats, now_ms: u64) {
        if !self.bounded(queue) {
            return;
        }
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
        self.dead_letters
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(i64::try_from(stats.dead_letters).unwrap_or(i64::MAX));
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

/// What one dispatch step ended with (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DispatchOutcome {
    /// The start call answered with an egress.
    started,
    /// An egress an earlier attempt started was found and recorded instead of starting one.
    adopted,
    /// No pod took it (capacity raced away); retried.
    unavailable,
    /// livekit-server could not be reached; retried.
    unreachable,
    /// The room does not exist yet; retried for a bounded time.
    not_found,
    /// The credentials were refused; retried.
    unauthenticated,
    /// The ticket failed and became a dead letter.
    failed,
    /// The start's outcome is unknown (timeout, transport error); reconciled before a retry.
    unknown,
    /// An attempt of unknown outcome was found to have started nothing and was put back.
    requeued,
    /// An active ticket's egress was found ended (webhook missed).
    ended,
    /// A ticket cancelled while it was being started was cancelled once settled.
    cancelled,
    /// Whether an attempt started could not be settled (livekit-server could not be asked):
    /// the ticket became a dead letter.
    unsettled,
}

/// Labels of the dispatch outcome counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DispatchLabels {
    /// The outcome.
    pub outcome: DispatchOutcome,
}

/// Labels of the leader gauge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LeaderLabels {
    /// Queue dispatched.
    pub queue: String,
    /// This process's holder id.
    pub holder: String,
}

/// A webhook event type (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WebhookEvent {
    room_started,
    room_finished,
    egress_started,
    egress_updated,
    egress_ended,
    other,
}

/// What a webhook did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WebhookOutcome {
    /// It changed a ticket (or enqueued one).
    applied,
    /// Verified, but nothing to change.
    ignored,
    /// Signature missing or invalid, or the body unreadable.
    rejected,
    /// Redis was unavailable; LiveKit may deliver it again.
    error,
    /// The same delivery (event id and body) was acted on before: answered 200, ignored.
    replayed,
}

/// Labels of the webhook counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WebhookLabels {
    /// Event type.
    pub event: WebhookEvent,
    /// Outcome.
    pub outcome: WebhookOutcome,
}

/// Gauge computed when encoded: seconds since this process acquired the lease, 0 when it
/// holds none.
#[derive(Debug, Clone, Default)]
pub struct LeaseAge(Arc<Mutex<Option<Instant>>>);

impl LeaseAge {
    /// Records the acquisition time, or `None` when the lease is gone.
    pub fn set(&self, acquired: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = acquired;
    }
}

impl TypedMetric for LeaseAge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for LeaseAge {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let acquired = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let age = acquired.map_or(0.0, |at| at.elapsed().as_secs_f64());
        encoder.encode_gauge(&age)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The dispatcher's and the webhook receiver's metrics.
#[derive(Debug)]
pub struct DispatchMetrics {
    /// Dispatch steps by outcome.
    pub outcomes: Family<DispatchLabels, Counter>,
    /// Enqueue-to-start wait of started tickets.
    pub enqueue_to_start_seconds: Histogram,
    /// 1 while this process leads the queue, else 0.
    pub leader: Family<LeaderLabels, Gauge>,
    /// Seconds since this process acquired the lease.
    pub lease_age_seconds: LeaseAge,
    /// Webhooks received by event and outcome.
    pub webhooks: Family<WebhookLabels, Counter>,
    /// Start calls in flight, by queue.
    pub in_flight: Family<QueueLabels, Gauge>,
}

impl DispatchMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let metrics = DispatchMetrics {
            outcomes: Family::default(),
            // 10 ms to about 11 hours.
            enqueue_to_start_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 23)),
            leader: Family::default(),
            lease_age_seconds: LeaseAge::default(),
            webhooks: Family::default(),
            in_flight: Family::default(),
        };
        registry.register(
            "egress_scaler_dispatch_outcomes",
            "Dispatch steps by outcome",
            metrics.outcomes.clone(),
        );
        registry.register(
            "egress_scaler_enqueue_to_start_seconds",
            "Wait from enqueue to a started (or adopted) egress",
            metrics.enqueue_to_start_seconds.clone(),
        );
        registry.register(
            "egress_scaler_dispatch_leader",
            "1 while this process holds the dispatcher lease of the queue, else 0",
            metrics.leader.clone(),
        );
        registry.register(
            "egress_scaler_dispatch_lease_age_seconds",
            "Seconds since this process acquired the dispatcher lease (0 when it holds none)",
            metrics.lease_age_seconds.clone(),
        );
        registry.register(
            "egress_scaler_webhooks",
            "LiveKit webhooks received by event and outcome",
            metrics.webhooks.clone(),
        );
        registry.register(
            "egress_scaler_dispatch_in_flight",
            "Start calls to livekit-server in flight",
            metrics.in_flight.clone(),
        );
        Arc::new(metrics)
    }

    /// Counts one dispatch outcome.
    pub fn outcome(&self, outcome: DispatchOutcome) {
        self.outcomes
            .get_or_create(&DispatchLabels { outcome })
            .inc();
    }

    /// Sets the number of start calls in flight of `queue`.
    pub fn set_in_flight(&self, queue: &QueueName, calls: usize) {
        self.in_flight
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .set(calls as i64);
    }

    /// Counts one webhook.
    pub fn webhook(&self, event: WebhookEvent, outcome: WebhookOutcome) {
        self.webhooks
            .get_or_create(&WebhookLabels { event, outcome })
            .inc();
    }

    /// Sets the leader gauge of this process.
    pub fn set_leader(&self, queue: &QueueName, holder: &str, leading: bool) {
        self.leader
            .get_or_create(&LeaderLabels {
                queue: queue.to_string(),
                holder: holder.to_owned(),
            })
            .set(i64::from(leading));
        self.lease_age_seconds.set(leading.then(Instant::now));
    }
}

/// Encodes the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// Installs the global tracing subscriber (RUST_LOG filters, else `default_level`, e.g. `info`).
/// Colours only on a terminal; text fields escaped by [`EscapedFields`].
pub fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(EscapedFields).try_init(),
        // JSON strings escape control characters already.
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The text log's field formatter: like the default one (the message, then `name=value`
/// pairs; strings quoted), but every control character of a value or of the message is
/// written as an escape (`\n`, `\r`, `\t`, `\u{1b}`), so that one event is one line.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: tracing_subscriber::fmt::format::Writer<'writer>,
    first: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &tracing::field::Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let value = escape_controls(value);
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{value}")
        } else {
            write!(self.writer, "{separator}{}={value}", field.name())
        };
    }
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            // Quoted, as the default formatter writes strings.
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// `text` with every control character (and the Unicode line separators) escaped.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    use crate::egress_request::is_line_breaking;
    if !text.chars().any(is_line_breaking) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_line_breaking(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("board"), "board");
        assert_eq!(escape_controls("équipe 7"), "équipe 7");
        assert_eq!(
            escape_controls("a\nINFO forged\r\u{1b}[31m\u{2028}\u{85}"),
            "a\\nINFO forged\\r\\u{1b}[31m\\u{2028}\\u{85}"
        );
    }

    #[test]
    fn one_event_is_one_line_whatever_its_fields_hold() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(EscapedFields)
            .finish();
        let room = "r\nERROR forged line";
        let error = std::io::Error::other("bad\r\nthing");
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", key = %"k\nx");
            let _entered = span.enter();
            tracing::info!(%room, ?room, plain = room, %error, "Room {room} finished.");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("room=r\\nERROR forged line"), "{text}");
        assert!(text.contains("plain=\"r\\nERROR forged line\""), "{text}");
        assert!(text.contains("error=bad\\r\\nthing"), "{text}");
        assert!(text.contains("key=k\\nx"), "{text}");
        assert!(
            text.contains("Room r\\nERROR forged line finished."),
            "{text}"
        );
    }
}
