//! A stand-in for KEDA and the HPA it drives, calling the real gRPC service.
//!
//! The rules are [`crate::kube`]'s, the same `simulate` plays, with the shipped
//! `keda/scaledobject.yaml` (its fallback, tolerances, rate policies) on a faster clock: the
//! sync period, the scale-down window and the cooldown of [`AutoscalerTiming`].
//! - KEDA holds `StreamIsActive` open; each `true` runs KEDA's scale step at once: from 0 it
//!   scales to 1, at any count it starts the cooldown again.
//! - Every sync, KEDA asks `IsActive` and the HPA asks `GetMetrics`. A failed call counts
//!   towards the fallback: past `failureThreshold` failures in a row the trigger counts as
//!   active and the HPA reads max(current, 1) pods (`currentReplicasIfHigher`); before that,
//!   nothing changes.
//!
//! [`Autoscaler`] runs the rules against the gRPC service and publishes the replica count the
//! egress Deployment stand-in follows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

use super::Event;
use crate::kube::{
    Activity, ClusterTolerance, Hpa, Keda, KedaAction, KedaState, MetricReading, Millis,
    RatePolicy, ScaledObject,
};
use crate::scaler::proto::external_scaler_client::ExternalScalerClient;
use crate::scaler::proto::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};

/// KEDA's metrics server gives each scaler call this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// KEDA's first reconnect delay after an activation stream ends.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The shipped ScaledObject on the demo's clock: the sync period stands for 15 s (rate policy
/// periods and polling), and the scale-down window, cooldown and ceiling are the demo's.
pub fn demo_scaled_object(timing: &AutoscalerTiming) -> ScaledObject {
    let mut object = ScaledObject::shipped();
    let sync = millis(timing.sync);
    let rescale = |policy: &mut RatePolicy| {
        *policy = match *policy {
            RatePolicy::Pods { value, .. } => RatePolicy::Pods {
                value,
                period: sync,
            },
            RatePolicy::Percent { value, .. } => RatePolicy::Percent {
                value,
                period: sync,
            },
        }
    };
    if let Some(behavior) = object.behavior.as_mut() {
        behavior.scale_up.policies.iter_mut().for_each(rescale);
        behavior.scale_down.policies.iter_mut().for_each(rescale);
        behavior.scale_down.stabilization = millis(timing.scale_down_window);
    }
    object.keda.polling = sync;
    object.keda.cooldown = millis(timing.cooldown);
    object.keda.max_replicas = timing.max_replicas;
    object
}

fn millis(duration: Duration) -> Millis {
    duration.as_millis() as Millis
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
    target: f64,
    hpa: Hpa,
    keda: Keda,
    keda_state: KedaState,
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
        let scaled_object = demo_scaled_object(&timing);
        let _ = now; // KEDA's clock starts with the object; it holds no replicas yet
        Ok(Autoscaler {
            client,
            object,
            metric_name: spec.metric_name,
            target,
            hpa: Hpa::new(scaled_object.hpa_spec(ClusterTolerance::default())),
            keda: scaled_object.keda,
            keda_state: KedaState::default(),
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
                            let action = self.keda_state.push(&self.keda, millis(now), self.state.replicas, true);
                            self.keda_act(action, now, "StreamIsActive sent true (activation)", &state, &events);
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
        let before = self.state.replicas;
        let failure = metric.as_ref().err().or(active.as_ref().err()).cloned();
        let activity = match (&failure, active) {
            (Some(_), _) => Activity::Failed,
            (None, Ok(true)) => Activity::Active,
            (None, _) => Activity::Inactive,
        };
        if let Some(error) = &failure {
            if !self.failing {
                let text = format!("{error}; KEDA keeps {before} replica(s) until its fallback");
                let _ = events.send(Event::new(now, SOURCE, text));
            }
            self.failing = true;
        } else {
            self.failing = false;
        }
        if let Ok(metric) = metric {
            self.state.desired = Some(metric.max(0.0).ceil() as u32);
            state.send_replace(self.state);
        }
        let action = self
            .keda_state
            .check(&self.keda, millis(now), before, activity);
        let reason = match activity {
            Activity::Failed => format!(
                "{} failed reads in a row, past the fallback threshold: the trigger counts as active",
                self.keda_state.failures()
            ),
            Activity::Active => "IsActive is true".to_owned(),
            Activity::Inactive => format!(
                "IsActive has been false for the {} s cooldown",
                self.timing.cooldown.as_secs_f64()
            ),
        };
        if self.keda_act(action, now, &reason, state, events) {
            return;
        }
        if before == 0 {
            // The HPA does nothing while the target has no replicas.
            return;
        }
        let answer = metric.ok();
        let Some(value) = self
            .keda_state
            .metric(&self.keda, before, self.target, answer)
        else {
            return; // no reading: the HPA keeps its count
        };
        let reading = MetricReading::AverageValue {
            value,
            target: self.target,
        };
        let decision = self.hpa.sync(millis(now), before, reading);
        let reason = if answer.is_none() {
            format!("GetMetrics failing: KEDA's fallback answers {value}")
        } else if decision.replicas > decision.recommended && decision.replicas < before {
            format!(
                "GetMetrics answered {value}; the highest of the last {} s was {}",
                self.timing.scale_down_window.as_secs_f64(),
                decision.replicas
            )
        } else {
            format!("GetMetrics answered {value}")
        };
        self.apply(decision.replicas, now, &reason, state, events);
    }

    /// Carries out KEDA's action; whether it changed the count.
    fn keda_act(
        &mut self,
        action: KedaAction,
        now: Duration,
        reason: &str,
        state: &watch::Sender<ScaleState>,
        events: &mpsc::UnboundedSender<Event>,
    ) -> bool {
        let replicas = match action {
            KedaAction::Nothing => return false,
            KedaAction::Activate => self.keda.hpa_min_replicas(),
            KedaAction::Deactivate => self.keda.min_replicas,
        };
        let changed = replicas != self.state.replicas;
        self.apply(replicas, now, reason, state, events);
        changed
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
    use crate::kube::Select;

    #[test]
    fn the_demo_plays_the_shipped_scaled_object_on_its_clock() {
        let timing = AutoscalerTiming {
            sync: Duration::from_secs(1),
            scale_down_window: Duration::from_secs(5),
            cooldown: Duration::from_secs(5),
            max_replicas: 24,
        };
        let object = demo_scaled_object(&timing);
        let shipped = ScaledObject::shipped();
        assert_eq!(object.keda.fallback, shipped.keda.fallback);
        assert_eq!(
            (
                object.keda.polling,
                object.keda.cooldown,
                object.keda.max_replicas
            ),
            (1_000, 5_000, 24)
        );
        let behavior = object.behavior.clone().unwrap();
        let shipped_behavior = shipped.behavior.unwrap();
        assert_eq!(behavior.scale_up.tolerance, Some(0.0));
        assert_eq!(behavior.scale_down.stabilization, 5_000);
        assert_eq!(behavior.scale_up.select, Select::Max);
        assert_eq!(
            behavior.scale_up.policies,
            vec![RatePolicy::Pods {
                value: 100,
                period: 1_000
            }]
        );
        assert_eq!(
            behavior.scale_down.policies.len(),
            shipped_behavior.scale_down.policies.len()
        );
        // The 11th pod is added at once: the shipped tolerance of 0 on the way up.
        let mut hpa = Hpa::new(object.hpa_spec(ClusterTolerance::default()));
        let eleven = MetricReading::AverageValue {
            value: 11.0,
            target: 1.0,
        };
        assert_eq!(hpa.sync(0, 10, eleven).replicas, 11);
    }
}
