//! A stand-in for KEDA and the HPA it drives, calling the real gRPC service.
//!
//! What it follows (DESIGN.md 2.4 and the shipped `keda/scaledobject.yaml`):
//! - KEDA holds `StreamIsActive` open; a `true` while at 0 replicas scales to 1 at once.
//! - Every sync, KEDA asks `IsActive` and the HPA asks `GetMetrics`. The HPA (`AverageValue`
//!   target from `GetMetricSpec`) wants `ceil(value / target)` pods; it ignores a change
//!   within its tolerance (0 on the way up, as the ScaledObject sets, 10% on the way down, the
//!   Kubernetes default), and scales down only to the highest recommendation of its
//!   stabilization window. Its floor is 1 pod: only KEDA scales to 0, once `IsActive` has been
//!   false for the cooldown period. No rate policies: the shipped ones are there for hour-long
//!   drains, which the demo does not play.
//! - A failed call changes nothing: KEDA and the HPA keep the current replica count.
//!
//! [`Hpa`] and [`Keda`] are the rules, without I/O; [`Autoscaler`] runs them against the
//! gRPC service and publishes the replica count the egress Deployment stand-in follows.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

use super::Event;
use crate::scaler::proto::external_scaler_client::ExternalScalerClient;
use crate::scaler::proto::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};

/// KEDA's metrics server gives each scaler call this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// KEDA's first reconnect delay after an activation stream ends.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The HPA's settings for one `AverageValue` external metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaPolicy {
    /// The metric's `AverageValue` target per pod.
    pub target: f64,
    /// Relative change ignored on the way up.
    pub scale_up_tolerance: f64,
    /// Relative change ignored on the way down.
    pub scale_down_tolerance: f64,
    /// Scale down only to the highest recommendation of this window.
    pub scale_down_window: Duration,
    /// The HPA's floor (KEDA makes it at least 1).
    pub min_replicas: u32,
    /// The ceiling (`maxReplicaCount`).
    pub max_replicas: u32,
}

impl HpaPolicy {
    /// The recommendation of one metric reading, before stabilization.
    fn recommend(&self, current: u32, metric: f64) -> u32 {
        let wanted = (metric / self.target).ceil().max(0.0) as u32;
        if current == 0 {
            return wanted;
        }
        let ratio = metric / (self.target * f64::from(current));
        let within =
            (1.0 - self.scale_down_tolerance) <= ratio && ratio <= (1.0 + self.scale_up_tolerance);
        if within { current } else { wanted }
    }
}

/// What one HPA sync decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HpaDecision {
    /// The replica count to set.
    pub replicas: u32,
    /// What this reading alone recommended (before the window and the clamp).
    pub recommended: u32,
}

/// The HPA's rule with its memory of recent recommendations.
#[derive(Debug, Clone)]
pub struct Hpa {
    policy: HpaPolicy,
    /// Unstabilized recommendations still inside the scale-down window: (when, replicas).
    recent: VecDeque<(Duration, u32)>,
}

impl Hpa {
    /// An HPA with no history.
    pub fn new(policy: HpaPolicy) -> Self {
        Hpa {
            policy,
            recent: VecDeque::new(),
        }
    }

    /// One sync at `now` (time since any fixed start) with `current` replicas and a reading.
    pub fn sync(&mut self, now: Duration, current: u32, metric: f64) -> HpaDecision {
        let recommended = self.policy.recommend(current, metric);
        let window = self.policy.scale_down_window;
        self.recent.retain(|(at, _)| *at + window > now);
        let highest = self
            .recent
            .iter()
            .map(|(_, replicas)| *replicas)
            .fold(recommended, u32::max);
        // The scale-up window is 0: a higher recommendation applies at once; a lower one only
        // down to the highest of the window.
        let replicas = current.max(recommended).min(highest);
        self.recent.push_back((now, recommended));
        HpaDecision {
            replicas: replicas.clamp(self.policy.min_replicas, self.policy.max_replicas),
            recommended,
        }
    }
}

/// KEDA's own part: activation from 0 and the cooldown back to 0.
#[derive(Debug, Clone)]
pub struct Keda {
    cooldown: Duration,
    last_active: Duration,
}

impl Keda {
    /// Counts as active at `now` (KEDA starts its cooldown clock when the object appears).
    pub fn new(now: Duration, cooldown: Duration) -> Self {
        Keda {
            cooldown,
            last_active: now,
        }
    }

    /// The replica count after learning at `now` whether the queue is active.
    pub fn observe(&mut self, now: Duration, active: bool, replicas: u32) -> u32 {
        if active {
            self.last_active = now;
            replicas.max(1)
        } else if replicas > 0 && now >= self.last_active + self.cooldown {
            0
        } else {
            replicas
        }
    }
}

/// What the autoscaler shows: the replica count it set and the last metric it read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScaleState {
    /// The egress Deployment's replica count.
    pub replicas: u32,
    /// The last `GetMetrics` value (desired pods), `None` before the first answer.
    pub desired: Option<u32>,
}

/// Timing of the KEDA and HPA stand-in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoscalerTiming {
    /// KEDA polling interval and HPA sync period (one tick does both).
    pub sync: Duration,
    /// HPA scale-down stabilization window.
    pub scale_down_window: Duration,
    /// KEDA `cooldownPeriod`.
    pub cooldown: Duration,
    /// The HPA's ceiling, KEDA's `maxReplicaCount`.
    pub max_replicas: u32,
}

/// The KEDA and HPA stand-in, connected to the real gRPC service.
pub struct Autoscaler {
    client: ExternalScalerClient<Channel>,
    object: ScaledObjectRef,
    metric_name: String,
    hpa: Hpa,
    keda: Keda,
    timing: AutoscalerTiming,
    state: ScaleState,
    failing: bool,
}

const SOURCE: &str = "KEDA/HPA stand-in";

impl Autoscaler {
    /// Connects to the scaler at `grpc_addr` and reads the metric spec, as KEDA does when a
    /// ScaledObject with an `external-push` trigger for `queue` appears.
    pub async fn connect(
        grpc_addr: SocketAddr,
        queue: &str,
        timing: AutoscalerTiming,
        now: Duration,
    ) -> anyhow::Result<Self> {
        let mut client = ExternalScalerClient::connect(format!("http://{grpc_addr}")).await?;
        let object = ScaledObjectRef {
            name: "egress".to_owned(),
            namespace: "livekit".to_owned(),
            scaler_metadata: HashMap::from([
                ("scalerAddress".to_owned(), grpc_addr.to_string()),
                ("queue".to_owned(), queue.to_owned()),
            ]),
        };
        let spec = client
            .get_metric_spec(object.clone())
            .await?
            .into_inner()
            .metric_specs
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("GetMetricSpec answered no metric"))?;
        let target = if spec.target_size_float > 0.0 {
            spec.target_size_float
        } else {
            spec.target_size as f64
        };
        anyhow::ensure!(target > 0.0, "GetMetricSpec answered a target of {target}");
        let policy = HpaPolicy {
            target,
            scale_up_tolerance: 0.0,
            scale_down_tolerance: 0.1,
            scale_down_window: timing.scale_down_window,
            min_replicas: 1,
            max_replicas: timing.max_replicas,
        };
        Ok(Autoscaler {
            client,
            object,
            metric_name: spec.metric_name,
            hpa: Hpa::new(policy),
            keda: Keda::new(now, timing.cooldown),
            timing,
            state: ScaleState::default(),
            failing: false,
        })
    }

    /// Scales until `shutdown`, publishing each change to `state` and explaining it in `events`.
    pub async fn run(
        mut self,
        clock: Instant,
        state: watch::Sender<ScaleState>,
        events: mpsc::UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) {
        let mut stream: Option<Streaming<IsActiveResponse>> = None;
        let mut reconnect_at = Duration::ZERO;
        let mut sync = tokio::time::interval(self.timing.sync);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_message = async {
                match stream.as_mut() {
                    Some(stream) => stream.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                message = next_message => match message {
                    Ok(Some(answer)) => {
                        if answer.result {
                            let now = clock.elapsed();
                            let replicas = self.keda.observe(now, true, self.state.replicas);
                            self.apply(replicas, now, "StreamIsActive sent true (activation)", &state, &events);
                        }
                    }
                    Ok(None) | Err(_) => {
                        stream = None;
                        reconnect_at = clock.elapsed() + RECONNECT_DELAY;
                    }
                },
                _ = sync.tick() => {
                    if stream.is_none() && clock.elapsed() >= reconnect_at {
                        match self.client.stream_is_active(self.object.clone()).await {
                            Ok(opened) => stream = Some(opened.into_inner()),
                            Err(_) => reconnect_at = clock.elapsed() + RECONNECT_DELAY,
                        }
                    }
                    self.sync(clock, &state, &events).await;
                }
            }
        }
    }

    /// One KEDA poll and HPA sync: `GetMetrics` and `IsActive`, then the rules.
    async fn sync(
        &mut self,
        clock: Instant,
        state: &watch::Sender<ScaleState>,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let request = GetMetricsRequest {
            scaled_object_ref: Some(self.object.clone()),
            metric_name: self.metric_name.clone(),
        };
        let mut client = self.client.clone();
        let metric = tokio::time::timeout(CALL_TIMEOUT, client.get_metrics(request)).await;
        let metric = match metric {
            Ok(Ok(answer)) => answer
                .into_inner()
                .metric_values
                .into_iter()
                .next()
                .map(|value| value.metric_value_float)
                .ok_or_else(|| "GetMetrics answered no value".to_owned()),
            Ok(Err(status)) => Err(format!("GetMetrics answered {}", status.code())),
            Err(_) => Err("GetMetrics timed out".to_owned()),
        };
        let active = tokio::time::timeout(CALL_TIMEOUT, client.is_active(self.object.clone()))
            .await
            .map_err(|_| "IsActive timed out".to_owned())
            .and_then(|answer| {
                answer
                    .map(|a| a.into_inner().result)
                    .map_err(|status| format!("IsActive answered {}", status.code()))
            });
        let now = clock.elapsed();
        let (metric, active) = match (metric, active) {
            (Ok(metric), Ok(active)) => (metric, active),
            (Err(error), _) | (_, Err(error)) => {
                if !self.failing {
                    let text = format!(
                        "{error}; keeping {} replica(s), as KEDA does",
                        self.state.replicas
                    );
                    let _ = events.send(Event::new(now, SOURCE, text));
                }
                self.failing = true;
                return;
            }
        };
        self.failing = false;
        self.state.desired = Some(metric.max(0.0).ceil() as u32);
        state.send_replace(self.state);
        let before = self.state.replicas;
        let after_keda = self.keda.observe(now, active, before);
        if after_keda != before {
            let reason = if active {
                "IsActive is true".to_owned()
            } else {
                format!(
                    "IsActive has been false for the {} s cooldown",
                    self.timing.cooldown.as_secs_f64()
                )
            };
            self.apply(after_keda, now, &reason, state, events);
            return;
        }
        if before == 0 {
            // The HPA does nothing while the target has no replicas.
            return;
        }
        let decision = self.hpa.sync(now, before, metric);
        let reason = if decision.replicas > decision.recommended && decision.replicas < before {
            format!(
                "GetMetrics answered {metric}; the highest of the last {} s was {}",
                self.timing.scale_down_window.as_secs_f64(),
                decision.replicas
            )
        } else {
            format!("GetMetrics answered {metric}")
        };
        self.apply(decision.replicas, now, &reason, state, events);
    }

    fn apply(
        &mut self,
        replicas: u32,
        now: Duration,
        reason: &str,
        state: &watch::Sender<ScaleState>,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let before = self.state.replicas;
        if replicas == before {
            return;
        }
        self.state.replicas = replicas;
        state.send_replace(self.state);
        let text = format!("{reason}: {before} -> {replicas} replica(s)");
        let _ = events.send(Event::new(now, SOURCE, text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HpaPolicy {
        HpaPolicy {
            target: 1.0,
            scale_up_tolerance: 0.0,
            scale_down_tolerance: 0.1,
            scale_down_window: Duration::from_secs(5),
            min_replicas: 1,
            max_replicas: 40,
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn scales_up_at_once_to_the_metric_even_by_one_pod() {
        let mut hpa = Hpa::new(policy());
        assert_eq!(hpa.sync(secs(0.0), 1, 8.0).replicas, 8);
        // 11 wanted at 10: a 10% gap, which the default tolerance would ignore.
        assert_eq!(hpa.sync(secs(1.0), 10, 11.0).replicas, 11);
        // A fraction of a pod is a pod.
        assert_eq!(hpa.sync(secs(2.0), 11, 11.5).replicas, 12);
    }

    #[test]
    fn scales_down_only_to_the_highest_recommendation_of_the_window() {
        let mut hpa = Hpa::new(policy());
        // t=0: 10 wanted.
        assert_eq!(hpa.sync(secs(0.0), 10, 10.0).replicas, 10);
        // t=1..3: 6, 4, 7 wanted; 10 is still in the window (0 + 5 > 3).
        assert_eq!(hpa.sync(secs(1.0), 10, 6.0).replicas, 10);
        assert_eq!(hpa.sync(secs(2.0), 10, 4.0).replicas, 10);
        assert_eq!(hpa.sync(secs(3.0), 10, 7.0).replicas, 10);
        // t=5: the t=0 sample left (0 + 5 > 5 is false); highest of 6, 4, 7 and 3 is 7.
        let decision = hpa.sync(secs(5.0), 10, 3.0);
        assert_eq!(
            decision,
            HpaDecision {
                replicas: 7,
                recommended: 3
            }
        );
        // t=8.5: t=1..3 left the window; the highest of t=5 (3) and now (2) is 3.
        assert_eq!(hpa.sync(secs(8.5), 7, 2.0).replicas, 3);
    }

    #[test]
    fn ignores_a_small_drop_and_never_goes_below_one() {
        let mut hpa = Hpa::new(policy());
        // 9.5 / 10 = 0.95, within the 10% scale-down tolerance: stays 10 (and records 10).
        assert_eq!(
            hpa.sync(secs(0.0), 10, 9.5),
            HpaDecision {
                replicas: 10,
                recommended: 10
            }
        );
        // 9.2 / 10 is still within; 8.9 / 10 is not, but the window holds 10.
        assert_eq!(hpa.sync(secs(1.0), 10, 9.2).replicas, 10);
        assert_eq!(hpa.sync(secs(2.0), 10, 8.9).replicas, 10);
        // Much later, 0 wanted: the HPA's floor is 1.
        assert_eq!(hpa.sync(secs(20.0), 10, 0.0).replicas, 1);
    }

    #[test]
    fn a_larger_target_divides_the_metric() {
        let mut hpa = Hpa::new(HpaPolicy {
            target: 4.0,
            ..policy()
        });
        assert_eq!(hpa.sync(secs(0.0), 1, 9.0).replicas, 3);
    }

    #[test]
    fn the_ceiling_applies() {
        let mut hpa = Hpa::new(HpaPolicy {
            max_replicas: 5,
            ..policy()
        });
        assert_eq!(hpa.sync(secs(0.0), 1, 9.0).replicas, 5);
    }

    #[test]
    fn keda_activates_from_zero_and_scales_to_zero_after_the_cooldown() {
        let mut keda = Keda::new(secs(0.0), secs(5.0));
        // Inactive at 0 replicas: nothing to do.
        assert_eq!(keda.observe(secs(1.0), false, 0), 0);
        // Active: 0 -> 1; active with replicas: unchanged (the HPA's job).
        assert_eq!(keda.observe(secs(2.0), true, 0), 1);
        assert_eq!(keda.observe(secs(3.0), true, 6), 6);
        // Inactive since 3 s: the pods stay until 3 + 5 = 8 s.
        assert_eq!(keda.observe(secs(4.0), false, 6), 6);
        assert_eq!(keda.observe(secs(7.9), false, 6), 6);
        assert_eq!(keda.observe(secs(8.0), false, 6), 0);
        // Active again restarts the clock.
        assert_eq!(keda.observe(secs(9.0), true, 0), 1);
        assert_eq!(keda.observe(secs(13.0), false, 1), 1);
        assert_eq!(keda.observe(secs(14.0), false, 1), 0);
    }

    #[test]
    fn keda_counts_its_start_as_activity() {
        let mut keda = Keda::new(secs(10.0), secs(5.0));
        assert_eq!(keda.observe(secs(12.0), false, 2), 2);
        assert_eq!(keda.observe(secs(15.0), false, 2), 0);
    }
}
