//! The KEDA external scaler (DESIGN.md 2.4): gRPC in, replica model out.
//!
//! `scalerMetadata` is validated once into a [`Target`], whose queue must be one this process
//! serves (`InvalidArgument` otherwise, so no caller can scale on, or add metric series for, a
//! queue nobody dispatches); every answer reads the latest fleet snapshot (no scrape) and, in
//! one Redis round trip, the queue's demand counters and the kinds of the tickets started since
//! that snapshot's observation began (minus the Prometheus lag with that source), and runs
//! [`crate::model::decide_with_unseen_starts`]: a start the snapshot does not show yet keeps
//! its pod busy, whichever replica dispatched it, so desired does not dip until the next
//! refresh. With pre-warm on, the same round trip reads the arrival counters of the buckets
//! starting within the lead time ([`crate::prewarm`]). When either input is missing the answer is `Unavailable`, so KEDA keeps the
//! current replica count instead of scaling on a made-up zero.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::fleet::Fleet;
use crate::intake::now_ms;
use crate::kube_scale::ScaleUpAssist;
use crate::model::{Decision, PodState, Prewarm, Settings};
use crate::prewarm::{cells_to_read, decide_ahead, expect};
use crate::queue::{QueueEvent, QueueName, QueueStore, ServedQueues};
use crate::telemetry::{Metrics, RpcMethod};

/// Generated KEDA external scaler types.
pub mod proto {
    tonic::include_proto!("externalscaler");
}

use proto::external_scaler_server::ExternalScaler;
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// How often an open `StreamIsActive` re-evaluates without any event (fleet or lost messages).
const STREAM_RECHECK: Duration = Duration::from_secs(1);

/// What one ScaledObject asks for: its queue and its overrides of the process settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The queue whose demand is scaled on.
    pub queue: QueueName,
    /// Settings with the trigger's overrides applied.
    pub settings: Settings,
}

impl Target {
    /// The metric name KEDA will ask for.
    pub fn metric_name(&self) -> String {
        format!("egress-replicas-{}", self.queue)
    }
}

/// A trigger metadata value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scaler metadata {key}: {reason}")]
pub struct MetadataError {
    /// The metadata key.
    pub key: &'static str,
    /// Why.
    pub reason: String,
}

/// The trigger metadata keys egress-scaler reads (DESIGN.md 5); KEDA's own keys such as
/// `scalerAddress` arrive too and are ignored.
pub const METADATA_KEYS: [&str; 5] = ["queue", "warmPool", "minReplicas", "maxReplicas", "prewarm"];

/// Parses `scalerMetadata` for a process serving `served`: as [`parse_metadata`], and the
/// queue must be served.
pub fn parse_target(
    metadata: &HashMap<String, String>,
    served: &ServedQueues,
    defaults: &Settings,
) -> Result<Target, MetadataError> {
    let target = parse_metadata(metadata, served.default_queue(), defaults)?;
    if !served.contains(&target.queue) {
        return Err(MetadataError {
            key: "queue",
            reason: format!(
                "queue {:?} is not served here; the served queues are {served}",
                target.queue.as_str()
            ),
        });
    }
    Ok(target)
}

/// Parses `scalerMetadata`; unknown keys (KEDA adds its own) are ignored. Whether the queue
/// is served is [`parse_target`]'s check.
pub fn parse_metadata(
    metadata: &HashMap<String, String>,
    default_queue: &QueueName,
    defaults: &Settings,
) -> Result<Target, MetadataError> {
    let queue = match metadata.get("queue").map(|value| value.trim()) {
        Some(value) if !value.is_empty() => {
            value
                .parse()
                .map_err(|error: crate::queue::InvalidQueueName| MetadataError {
                    key: "queue",
                    reason: error.to_string(),
                })?
        }
        _ => default_queue.clone(),
    };
    let mut settings = defaults.clone();
    let count = |key: &'static str, default: u32| -> Result<u32, MetadataError> {
        match metadata.get(key).map(|value| value.trim()) {
            None | Some("") => Ok(default),
            Some(value) => value.parse().map_err(|_| MetadataError {
                key,
                reason: format!("{value:?} is not a non-negative integer"),
            }),
        }
    };
    settings.warm_pool = count("warmPool", defaults.warm_pool)?;
    settings.min_replicas = count("minReplicas", defaults.min_replicas)?;
    settings.max_replicas = count("maxReplicas", defaults.max_replicas)?;
    match metadata.get("prewarm").map(|value| value.trim()) {
        None | Some("") => {}
        Some(value) => {
            settings.prewarm = value.parse().map_err(|reason| MetadataError {
                key: "prewarm",
                reason,
            })?;
        }
    }
    if settings.min_replicas > settings.max_replicas {
        return Err(MetadataError {
            key: "maxReplicas",
            reason: format!(
                "{} is below minReplicas {}",
                settings.max_replicas, settings.min_replicas
            ),
        });
    }
    Ok(Target { queue, settings })
}

/// The replica decision for targets, from the queue and the fleet.
#[derive(Clone)]
pub struct Evaluator {
    store: QueueStore,
    fleet: Fleet,
    metrics: Arc<Metrics>,
    /// How long after a start the fleet source may still not show it (the Prometheus scrape
    /// interval; zero when the pods are scraped directly).
    observation_lag: Duration,
    /// The scale-up assist and the queue whose decisions it is offered.
    assist: Option<(QueueName, ScaleUpAssist)>,
}

/// The time (ms since the epoch) after which a start may be missing from a fleet snapshot:
/// when its observation began (`refresh_duration` before it finished, `age` ago), minus the
/// source's `lag`.
pub fn unseen_after_ms(
    now_ms: u64,
    age: Duration,
    refresh_duration: Duration,
    lag: Duration,
) -> u64 {
    let before = (age + refresh_duration + lag).as_millis();
    now_ms.saturating_sub(u64::try_from(before).unwrap_or(u64::MAX))
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// Redis could not be read.
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    /// The fleet snapshot is missing or too old.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

impl Evaluator {
    /// An evaluator over this queue store and fleet.
    pub fn new(store: QueueStore, fleet: Fleet, metrics: Arc<Metrics>) -> Self {
        Evaluator {
            store,
            fleet,
            metrics,
            observation_lag: Duration::ZERO,
            assist: None,
        }
    }

    /// The same, offering every decision of `queue` to the scale-up assist.
    pub fn with_assist(mut self, queue: QueueName, assist: ScaleUpAssist) -> Self {
        self.assist = Some((queue, assist));
        self
    }

    /// The same, for a fleet source that shows a start up to `lag` late (Prometheus).
    pub fn with_observation_lag(mut self, lag: Duration) -> Self {
        self.observation_lag = lag;
        self
    }

    /// Reads the fleet, then demand and recent starts, and decides.
    pub async fn evaluate(&self, target: &Target) -> Result<Decision, EvaluateError> {
        let fleet = self.fleet.current()?;
        let snapshot = fleet.snapshot();
        // Only a ready pod takes a start: without one there is nowhere to count it.
        let unseen_after = snapshot
            .pods
            .iter()
            .any(|pod| pod.state == PodState::Ready)
            .then(|| {
                unseen_after_ms(
                    now_ms(),
                    fleet.age(),
                    fleet.refresh_duration,
                    self.observation_lag,
                )
            });
        let now = now_ms();
        let lead = target.settings.prewarm_lead_ms;
        // Outside the lead time of a bucket start there is nothing to read: no extra work.
        let cells = match target.settings.prewarm {
            Prewarm::Auto => cells_to_read(now, lead),
            Prewarm::Off => Vec::new(),
        };
        let input = self
            .store
            .scaling_input_ahead(&target.queue, unseen_after, &cells)
            .await?;
        let decision = decide_ahead(
            &target.settings,
            &input.demand,
            &snapshot,
            &input.started_since,
            &expect(now, lead, &input.arrivals),
        );
        self.metrics.record_decision(&target.queue, &decision);
        if let Some((queue, assist)) = &self.assist
            && *queue == target.queue
        {
            assist.offer(decision.desired);
        }
        Ok(decision)
    }
}

fn unavailable(error: EvaluateError) -> Status {
    tracing::warn!(%error, "Cannot decide the replica count.");
    // The detail stays in the log; KEDA only needs to know that it must not act.
    match error {
        EvaluateError::Queue(_) => Status::unavailable("queue store unavailable"),
        EvaluateError::Fleet(_) => Status::unavailable("egress fleet snapshot unavailable"),
    }
}

/// The gRPC service.
pub struct ScalerService {
    evaluator: Evaluator,
    queues: ServedQueues,
    defaults: Settings,
    events: broadcast::Sender<QueueEvent>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl ScalerService {
    /// A service for the `queues` served, answering with `defaults` unless the trigger
    /// overrides them; streams end (status OK) when `shutdown` is cancelled.
    pub fn new(
        evaluator: Evaluator,
        queues: ServedQueues,
        defaults: Settings,
        events: broadcast::Sender<QueueEvent>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        ScalerService {
            evaluator,
            queues,
            defaults,
            events,
            metrics,
            shutdown,
        }
    }

    fn target(&self, scaled_object: Option<&ScaledObjectRef>) -> Result<Target, Status> {
        let empty = HashMap::new();
        let metadata = scaled_object.map(|r| &r.scaler_metadata).unwrap_or(&empty);
        parse_target(metadata, &self.queues, &self.defaults)
            .map_err(|error| Status::invalid_argument(error.to_string()))
    }

    fn metric_spec(target: &Target) -> GetMetricSpecResponse {
        GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: target.metric_name(),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let timer = self.metrics.rpc_timer(RpcMethod::IsActive);
        let result = async {
            let target = self.target(Some(request.get_ref()))?;
            let decision = self
                .evaluator
                .evaluate(&target)
                .await
                .map_err(unavailable)?;
            Ok(Response::new(IsActiveResponse {
                result: decision.is_active(),
            }))
        }
        .await;
        timer.finish(&result);
        result
    }

    type StreamIsActiveStream = ResponseStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let timer = self.metrics.rpc_timer(RpcMethod::StreamIsActive);
        let result = self.target(Some(request.get_ref()));
        timer.finish(&result);
        let target = result?;
        tracing::info!(queue = %target.queue, "KEDA opened an activation stream.");
        let stream = activation_stream(
            self.evaluator.clone(),
            target,
            self.events.subscribe(),
            self.shutdown.clone(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let timer = self.metrics.rpc_timer(RpcMethod::GetMetricSpec);
        let result = self
            .target(Some(request.get_ref()))
            .map(|target| Response::new(Self::metric_spec(&target)));
        timer.finish(&result);
        result
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let timer = self.metrics.rpc_timer(RpcMethod::GetMetrics);
        let result = async {
            let target = self.target(request.get_ref().scaled_object_ref.as_ref())?;
            let decision = self
                .evaluator
                .evaluate(&target)
                .await
                .map_err(unavailable)?;
            Ok(Response::new(GetMetricsResponse {
                metric_values: vec![MetricValue {
                    metric_name: target.metric_name(),
                    metric_value: i64::from(decision.desired),
                    metric_value_float: f64::from(decision.desired),
                }],
            }))
        }
        .await;
        timer.finish(&result);
        result
    }

    type StreamMetricSpecStream = ResponseStream<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        let timer = self.metrics.rpc_timer(RpcMethod::StreamMetricSpec);
        let result = self.target(Some(request.get_ref()));
        timer.finish(&result);
        let spec = Self::metric_spec(&result?);
        // The spec depends only on the trigger metadata, which cannot change while the stream
        // is open: send it once, then hold the stream until shutdown ends it with OK.
        let shutdown = self.shutdown.clone();
        let stream = futures::stream::once(async move { Ok(spec) }).chain(
            futures::stream::once(async move {
                shutdown.cancelled().await;
                None
            })
            .filter_map(|item: Option<Result<GetMetricSpecResponse, Status>>| async move { item }),
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

use futures::StreamExt;

/// State of one open `StreamIsActive`.
struct Activation {
    evaluator: Evaluator,
    target: Target,
    events: broadcast::Receiver<QueueEvent>,
    fleet_changes: tokio::sync::watch::Receiver<Arc<crate::fleet::FleetView>>,
    shutdown: CancellationToken,
    was_active: bool,
    first: bool,
}

/// Sends `true` on each inactive -> active edge; wakes on queue events for the target's queue,
/// on fleet refreshes and once a second; ends (status OK) on shutdown.
fn activation_stream(
    evaluator: Evaluator,
    target: Target,
    events: broadcast::Receiver<QueueEvent>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<IsActiveResponse, Status>> + Send {
    let fleet_changes = evaluator.fleet.subscribe();
    let state = Activation {
        evaluator,
        target,
        events,
        fleet_changes,
        shutdown,
        was_active: false,
        first: true,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if !state.first && !state.wait_for_change().await {
                return None;
            }
            state.first = false;
            match state.evaluator.evaluate(&state.target).await {
                Ok(decision) => {
                    let active = decision.is_active();
                    let edge = active && !state.was_active;
                    state.was_active = active;
                    if edge {
                        tracing::info!(queue = %state.target.queue, desired = decision.desired, "Queue became active.");
                        return Some((Ok(IsActiveResponse { result: true }), state));
                    }
                }
                Err(error) => {
                    // Keep the stream: KEDA's reconnect backoff would only delay the next edge.
                    tracing::debug!(%error, queue = %state.target.queue, "Activation check failed.");
                }
            }
        }
    })
}

impl Activation {
    /// Waits for something that may change the answer; false on shutdown.
    async fn wait_for_change(&mut self) -> bool {
        let recheck = tokio::time::sleep(STREAM_RECHECK);
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                event = self.events.recv() => match event {
                    Ok(QueueEvent::Changed(queue)) if queue != self.target.queue => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                },
                changed = self.fleet_changes.changed() => {
                    if changed.is_err() {
                        // The observer is gone (only at shutdown); fall back to the timer.
                        recheck.as_mut().await;
                    }
                    return true;
                }
                _ = &mut recheck => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Target, MetadataError> {
        parse_metadata(
            &metadata(pairs),
            &"default".parse().unwrap(),
            &Settings::default(),
        )
    }

    #[test]
    fn starts_count_as_unseen_from_when_the_observation_began_minus_the_lag() {
        let now = 1_000_000;
        let age = Duration::from_millis(300);
        let refresh = Duration::from_millis(200);
        assert_eq!(unseen_after_ms(now, age, refresh, Duration::ZERO), 999_500);
        assert_eq!(
            unseen_after_ms(now, age, refresh, Duration::from_secs(30)),
            969_500
        );
        assert_eq!(
            unseen_after_ms(10, age, refresh, Duration::from_secs(30)),
            0
        );
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_ignored() {
        let target = parse(&[
            ("scalerAddress", "egress-scaler:9090"),
            ("somethingElse", "x"),
        ])
        .unwrap();
        assert_eq!(target.queue.as_str(), "default");
        assert_eq!(target.settings, Settings::default());
        assert_eq!(target.metric_name(), "egress-replicas-default");
    }

    #[test]
    fn overrides_apply() {
        let target = parse(&[
            ("queue", "rec"),
            ("warmPool", "2"),
            ("minReplicas", "1"),
            ("maxReplicas", "5"),
        ])
        .unwrap();
        assert_eq!(target.queue.as_str(), "rec");
        assert_eq!(
            (
                target.settings.warm_pool,
                target.settings.min_replicas,
                target.settings.max_replicas
            ),
            (2, 1, 5)
        );
    }

    #[test]
    fn malformed_values_name_the_key() {
        assert_eq!(parse(&[("warmPool", "-1")]).unwrap_err().key, "warmPool");
        assert_eq!(
            parse(&[("minReplicas", "one")]).unwrap_err().key,
            "minReplicas"
        );
        assert_eq!(
            parse(&[("maxReplicas", "2.5")]).unwrap_err().key,
            "maxReplicas"
        );
        assert_eq!(
            parse(&[("minReplicas", "3"), ("maxReplicas", "2")])
                .unwrap_err()
                .key,
            "maxReplicas"
        );
        assert_eq!(parse(&[("queue", "no spaces")]).unwrap_err().key, "queue");
        assert_eq!(parse(&[("prewarm", "on")]).unwrap_err().key, "prewarm");
    }

    #[test]
    fn prewarm_is_switched_per_trigger() {
        use crate::model::Prewarm;
        assert_eq!(
            parse(&[("prewarm", "auto")]).unwrap().settings.prewarm,
            Prewarm::Auto
        );
        assert_eq!(
            parse(&[("prewarm", " off ")]).unwrap().settings.prewarm,
            Prewarm::Off
        );
        assert_eq!(parse(&[]).unwrap().settings.prewarm, Prewarm::Off);
    }

    #[test]
    fn a_queue_not_served_is_refused_naming_it_and_the_served_ones() {
        let served =
            ServedQueues::new(vec!["rec".parse().unwrap(), "web".parse().unwrap()]).unwrap();
        let target = |pairs| parse_target(&metadata(pairs), &served, &Settings::default());
        assert_eq!(target(&[]).unwrap().queue.as_str(), "rec");
        assert_eq!(target(&[("queue", "web")]).unwrap().queue.as_str(), "web");
        let error = target(&[("queue", "made-up")]).unwrap_err();
        assert_eq!(error.key, "queue");
        assert!(error.reason.contains("\"made-up\""), "{error}");
        assert!(error.reason.contains("rec, web"), "{error}");
    }
}
