//! The HorizontalPodAutoscaler controller's rule for one HPA (DESIGN.md 2.4, 2.5), as
//! Kubernetes' `pkg/controller/podautoscaler` has it:
//!
//! 1. The metric gives a raw recommendation (`replica_calculator.go`): `ceil(usage / target)`
//!    for an `AverageValue` external metric, the utilization ratio times the ready pods for
//!    CPU, unless the ratio is within the tolerances (`Tolerances.isWithin`, inclusive).
//! 2. With a `behavior` (`normalizeDesiredReplicasWithBehaviors`): the stabilization windows
//!    (`stabilizeRecommendationWithBehaviors`), then the rate policies
//!    (`calculateScaleUpLimitWithScalingRules`, `calculateScaleDownLimitWithBehaviors`).
//!    Without one (`normalizeDesiredReplicas`): the controller's 5 min scale-down window and
//!    at most max(2 x current, 4) per sync (`calculateScaleUpLimit`).
//! 3. The `[minReplicas, maxReplicas]` clamp.
//!
//! Pure: the clock is passed in.

use std::collections::VecDeque;

use super::Millis;

/// The controller's `--horizontal-pod-autoscaler-sync-period` default.
pub const DEFAULT_SYNC: Millis = 15_000;
/// The controller's `--horizontal-pod-autoscaler-downscale-stabilization` default: the
/// scale-down window without a `behavior`, and of a `behavior.scaleDown` that omits one.
pub const DEFAULT_DOWNSCALE_WINDOW: Millis = 300_000;
/// The controller's `--horizontal-pod-autoscaler-tolerance` default.
pub const DEFAULT_TOLERANCE: f64 = 0.1;

/// One scaling policy of an HPA `behavior` (`type: Pods|Percent`, `value`, `periodSeconds`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RatePolicy {
    /// At most this many pods per period.
    Pods { value: u32, period: Millis },
    /// At most this percentage of the replicas at the start of the period.
    Percent { value: u32, period: Millis },
}

impl RatePolicy {
    /// `periodSeconds`, in milliseconds.
    pub fn period(self) -> Millis {
        match self {
            RatePolicy::Pods { period, .. } | RatePolicy::Percent { period, .. } => period,
        }
    }
}

/// Which policy wins when several apply (`selectPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// One direction of an HPA `behavior`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRules {
    /// `stabilizationWindowSeconds`, in milliseconds.
    pub stabilization: Millis,
    /// `tolerance`, when set; honoured only where the cluster does ([`ClusterTolerance`]).
    pub tolerance: Option<f64>,
    /// `selectPolicy`.
    pub select: Select,
    /// `policies`.
    pub policies: Vec<RatePolicy>,
}

impl ScalingRules {
    /// `scaleUp` of a `behavior` that omits it (`GenerateHPAScaleUpRules`): no window, the
    /// larger of +100 % and +4 pods per 15 s.
    pub fn default_scale_up() -> Self {
        ScalingRules {
            stabilization: 0,
            tolerance: None,
            select: Select::Max,
            policies: vec![
                RatePolicy::Percent {
                    value: 100,
                    period: 15_000,
                },
                RatePolicy::Pods {
                    value: 4,
                    period: 15_000,
                },
            ],
        }
    }

    /// `scaleDown` of a `behavior` that omits it (`GenerateHPAScaleDownRules`): the
    /// controller's 300 s window, then up to 100 % per 15 s.
    pub fn default_scale_down() -> Self {
        ScalingRules {
            stabilization: DEFAULT_DOWNSCALE_WINDOW,
            tolerance: None,
            select: Select::Max,
            policies: vec![RatePolicy::Percent {
                value: 100,
                period: 15_000,
            }],
        }
    }

    fn longest_period(&self) -> Millis {
        self.policies
            .iter()
            .map(|policy| policy.period())
            .max()
            .unwrap_or(0)
    }
}

/// An HPA `behavior`: how fast it may move each way.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    /// Rules for adding pods.
    pub scale_up: ScalingRules,
    /// Rules for removing pods.
    pub scale_down: ScalingRules,
}

/// How the cluster treats the tolerance (a property of the cluster, not of the HPA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterTolerance {
    /// `--horizontal-pod-autoscaler-tolerance` (0.1 unless the cluster changed it).
    pub default: f64,
    /// Whether a per-HPA `behavior.*.tolerance` is honoured: Kubernetes with the
    /// `HPAConfigurableTolerance` gate (on from 1.35) and a KEDA whose CRD has the field
    /// (2.18+). Elsewhere the field is dropped and `default` applies both ways.
    pub per_hpa: bool,
}

impl Default for ClusterTolerance {
    fn default() -> Self {
        ClusterTolerance {
            default: DEFAULT_TOLERANCE,
            per_hpa: true,
        }
    }
}

/// The tolerances of one HPA on one cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Relative change ignored on the way up.
    pub up: f64,
    /// Relative change ignored on the way down.
    pub down: f64,
}

impl Tolerances {
    /// What `behavior` asks for, where `cluster` honours it; the cluster's default elsewhere.
    pub fn of(behavior: Option<&Behavior>, cluster: ClusterTolerance) -> Self {
        let pick = |rules: Option<&ScalingRules>| {
            rules
                .and_then(|rules| rules.tolerance)
                .filter(|_| cluster.per_hpa)
                .unwrap_or(cluster.default)
        };
        Tolerances {
            up: pick(behavior.map(|b| &b.scale_up)),
            down: pick(behavior.map(|b| &b.scale_down)),
        }
    }

    /// `Tolerances.isWithin` of `replica_calculator.go`: `1 - down <= ratio <= 1 + up`,
    /// bounds included (at exactly +10 % the HPA holds).
    pub fn is_within(self, ratio: f64) -> bool {
        (1.0 - self.down) <= ratio && ratio <= (1.0 + self.up)
    }
}

/// The metric an HPA scales on, as read at one sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricReading {
    /// An external metric with an `AverageValue` target: the value is a total.
    AverageValue { value: f64, target: f64 },
    /// CPU utilization of the pods against `target` (0..1 of the request): `ready_total` sums
    /// the ready pods' utilization; `unready` pods have no usable sample yet.
    Utilization {
        ready_total: f64,
        ready: u32,
        unready: u32,
        target: f64,
    },
}

/// The raw recommendation of one reading at `current` replicas, before stabilization and
/// rate limits.
pub fn recommend(current: u32, reading: MetricReading, tolerances: Tolerances) -> u32 {
    match reading {
        MetricReading::AverageValue { value, target } => {
            // `GetExternalPerPodMetricReplicas`: KEDA hands the value over as a milli-quantity
            // and the ratio is taken against the spec's replicas.
            if current == 0 {
                return current;
            }
            let usage = milli(value);
            let target = milli(target).max(1);
            let ratio = usage as f64 / (target as f64 * f64::from(current));
            if tolerances.is_within(ratio) {
                current
            } else {
                ceil_replicas(usage as f64 / target as f64)
            }
        }
        MetricReading::Utilization {
            ready_total,
            ready,
            unready,
            target,
        } => {
            // `GetResourceReplicas`: without a ready sample there is no reading.
            if ready == 0 {
                return current;
            }
            let ratio = ready_total / (target * f64::from(ready));
            let up_with_unready = unready > 0 && ratio > 1.0;
            if !up_with_unready {
                if tolerances.is_within(ratio) {
                    return current;
                }
                return ceil_replicas(ratio * f64::from(ready));
            }
            // Pods still starting count as idle when scaling up, so that a scale-up already
            // under way is not repeated.
            let all = ready + unready;
            let new_ratio = ready_total / (target * f64::from(all));
            if tolerances.is_within(new_ratio) || new_ratio < 1.0 {
                return current;
            }
            let replicas = ceil_replicas(new_ratio * f64::from(all));
            if replicas < current {
                current
            } else {
                replicas
            }
        }
    }
}

/// A quantity in thousandths, as `resource.Quantity.MilliValue` gives it.
fn milli(value: f64) -> i64 {
    (value.max(0.0) * 1000.0).round() as i64
}

fn ceil_replicas(value: f64) -> u32 {
    value.ceil().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// The spec of one HPA: the parts of `HorizontalPodAutoscaler` the rule reads.
#[derive(Debug, Clone, PartialEq)]
pub struct HpaSpec {
    /// `minReplicas` (KEDA sets max(`minReplicaCount`, 1)).
    pub min_replicas: u32,
    /// `maxReplicas` (KEDA's `maxReplicaCount`).
    pub max_replicas: u32,
    /// `behavior`; `None` is the controller's own defaults, not [`Behavior`]'s.
    pub behavior: Option<Behavior>,
    /// The cluster's tolerance.
    pub tolerance: ClusterTolerance,
    /// The controller's scale-down window for an HPA without `behavior`.
    pub downscale_window: Millis,
}

/// What one sync decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HpaSync {
    /// The replica count the HPA sets (equal to the current count: no change).
    pub replicas: u32,
    /// What the reading alone recommended, before stabilization, rate limits and clamps.
    pub recommended: u32,
}

/// One HPA with its memory between syncs: recent recommendations and scale events.
#[derive(Debug, Clone)]
pub struct Hpa {
    spec: HpaSpec,
    recommendations: VecDeque<(Millis, u32)>,
    scale_ups: VecDeque<(Millis, u32)>,
    scale_downs: VecDeque<(Millis, u32)>,
}

impl Hpa {
    /// An HPA with no history (a new HPA object, or the controller restarted).
    pub fn new(spec: HpaSpec) -> Self {
        Hpa {
            spec,
            recommendations: VecDeque::new(),
            scale_ups: VecDeque::new(),
            scale_downs: VecDeque::new(),
        }
    }

    /// Its spec.
    pub fn spec(&self) -> &HpaSpec {
        &self.spec
    }

    /// The tolerances it applies on its cluster.
    pub fn tolerances(&self) -> Tolerances {
        Tolerances::of(self.spec.behavior.as_ref(), self.spec.tolerance)
    }

    /// One sync at `now` with `current` replicas (`spec.replicas` of the target) and the
    /// metric's reading (`reconcileAutoscaler`).
    pub fn sync(&mut self, now: Millis, current: u32, reading: MetricReading) -> HpaSync {
        let (min, max) = (self.spec.min_replicas, self.spec.max_replicas.max(1));
        if current == 0 && min != 0 {
            // Scaling is disabled while the target is at zero: KEDA owns 0 <-> 1.
            return HpaSync {
                replicas: 0,
                recommended: 0,
            };
        }
        if current > max {
            return HpaSync {
                replicas: max,
                recommended: max,
            };
        }
        if current < min {
            return HpaSync {
                replicas: min,
                recommended: min,
            };
        }
        let recommended = recommend(current, reading, self.tolerances());
        let replicas = self.normalize(now, current, recommended);
        HpaSync {
            replicas,
            recommended,
        }
    }

    /// Stabilization, rate limits and clamps applied to a raw recommendation `desired` at
    /// `now`; records the recommendation and the scale event.
    pub fn normalize(&mut self, now: Millis, current: u32, desired: u32) -> u32 {
        let next = match self.spec.behavior.clone() {
            Some(behavior) => {
                let stabilized = self.stabilize_with_behavior(now, current, desired, &behavior);
                self.limit_rate(now, current, stabilized, &behavior)
            }
            None => {
                let stabilized = self.stabilize(now, desired);
                self.limit_without_behavior(current, stabilized)
            }
        };
        if next != current && self.spec.behavior.is_some() {
            // `storeScaleEvent`: only an HPA with a behavior keeps them.
            let events = if next > current {
                &mut self.scale_ups
            } else {
                &mut self.scale_downs
            };
            events.push_back((now, next.abs_diff(current)));
        }
        next
    }

    /// `stabilizeRecommendation` (no behavior): the highest recommendation of the controller's
    /// window and the current one. Its test is `timestamp.Before(cutoff)` for an old sample:
    /// a sample exactly one window old still counts.
    fn stabilize(&mut self, now: Millis, desired: u32) -> u32 {
        let window = self.spec.downscale_window;
        self.recommendations
            .retain(|&(at, _)| now.saturating_sub(at) <= window);
        let highest = self
            .recommendations
            .iter()
            .map(|&(_, value)| value)
            .fold(desired, u32::max);
        self.recommendations.push_back((now, desired));
        highest
    }

    /// `convertDesiredReplicasWithRules`: up to max(2 x current, 4) (`calculateScaleUpLimit`)
    /// and `[min, max]`.
    fn limit_without_behavior(&self, current: u32, desired: u32) -> u32 {
        let up_limit = (2.0 * f64::from(current)).max(4.0) as u32;
        let highest = self.spec.max_replicas.min(up_limit);
        if desired < self.spec.min_replicas {
            self.spec.min_replicas
        } else if desired > highest {
            highest
        } else {
            desired
        }
    }

    /// `stabilizeRecommendationWithBehaviors`: the lowest recommendation of the scale-up window
    /// and the highest of the scale-down window, the current raw one included in both; a
    /// sample counts while `timestamp.After(now - window)`: windows exclude their start.
    /// The current count is brought within the two.
    fn stabilize_with_behavior(
        &mut self,
        now: Millis,
        current: u32,
        desired: u32,
        behavior: &Behavior,
    ) -> u32 {
        let up_window = behavior.scale_up.stabilization;
        let down_window = behavior.scale_down.stabilization;
        let mut up = desired;
        let mut down = desired;
        for &(at, value) in &self.recommendations {
            let age = now - at;
            if age < up_window {
                up = up.min(value);
            }
            if age < down_window {
                down = down.max(value);
            }
        }
        let keep = up_window.max(down_window);
        self.recommendations
            .retain(|&(at, _)| now.saturating_sub(at) <= keep);
        self.recommendations.push_back((now, desired));
        current.max(up).min(down)
    }

    /// `convertDesiredReplicasWithBehaviorRate`: the rate limit of the direction, never past
    /// the current count, and `[min, max]`.
    fn limit_rate(&mut self, now: Millis, current: u32, desired: u32, behavior: &Behavior) -> u32 {
        let longest = behavior
            .scale_up
            .longest_period()
            .max(behavior.scale_down.longest_period());
        for events in [&mut self.scale_ups, &mut self.scale_downs] {
            events.retain(|&(at, _)| now.saturating_sub(at) < longest);
        }
        let (min, max) = (self.spec.min_replicas, self.spec.max_replicas);
        if desired > current {
            let limit = self
                .scale_up_limit(now, current, &behavior.scale_up)
                .max(current);
            desired.min(max.min(limit))
        } else if desired < current {
            let limit = self
                .scale_down_limit(now, current, &behavior.scale_down)
                .min(current);
            desired.max(min.max(limit))
        } else {
            desired
        }
    }

    /// The replicas at the start of a policy's period: the current count minus what was added
    /// plus what was removed in it (an event counts while `timestamp.After(now - period)`).
    fn period_start(&self, now: Millis, current: u32, period: Millis) -> i64 {
        let within = |events: &VecDeque<(Millis, u32)>| -> i64 {
            events
                .iter()
                .filter(|&&(at, _)| now - at < period)
                .map(|&(_, change)| i64::from(change))
                .sum()
        };
        i64::from(current) - within(&self.scale_ups) + within(&self.scale_downs)
    }

    /// `calculateScaleUpLimitWithScalingRules`: Percent rounds up.
    fn scale_up_limit(&self, now: Millis, current: u32, rules: &ScalingRules) -> u32 {
        if rules.select == Select::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|&policy| {
            let start = self.period_start(now, current, policy.period());
            match policy {
                RatePolicy::Pods { value, .. } => start + i64::from(value),
                RatePolicy::Percent { value, .. } => {
                    (start as f64 * (1.0 + f64::from(value) / 100.0)).ceil() as i64
                }
            }
        });
        let limit = match rules.select {
            Select::Min => proposals.min(),
            _ => proposals.max(),
        };
        limit
            .unwrap_or(i64::from(current))
            .clamp(0, i64::from(u32::MAX)) as u32
    }

    /// `calculateScaleDownLimitWithBehaviors`: Percent truncates.
    fn scale_down_limit(&self, now: Millis, current: u32, rules: &ScalingRules) -> u32 {
        if rules.select == Select::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|&policy| {
            let start = self.period_start(now, current, policy.period());
            match policy {
                RatePolicy::Pods { value, .. } => start - i64::from(value),
                RatePolicy::Percent { value, .. } => {
                    (start as f64 * (1.0 - f64::from(value) / 100.0)).trunc() as i64
                }
            }
        });
        // The largest change is the lowest count.
        let limit = match rules.select {
            Select::Min => proposals.max(),
            _ => proposals.min(),
        };
        limit
            .unwrap_or(i64::from(current))
            .clamp(0, i64::from(u32::MAX)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn average(value: f64) -> MetricReading {
        MetricReading::AverageValue { value, target: 1.0 }
    }

    const TEN_PERCENT: Tolerances = Tolerances { up: 0.1, down: 0.1 };

    fn spec(behavior: Option<Behavior>) -> HpaSpec {
        HpaSpec {
            min_replicas: 1,
            max_replicas: 100,
            behavior,
            tolerance: ClusterTolerance::default(),
            downscale_window: DEFAULT_DOWNSCALE_WINDOW,
        }
    }

    fn rules(stabilization: Millis, select: Select, policies: Vec<RatePolicy>) -> ScalingRules {
        ScalingRules {
            stabilization,
            tolerance: None,
            select,
            policies,
        }
    }

    #[test]
    fn average_value_asks_for_the_ceiling_of_the_metric() {
        // `GetExternalPerPodMetricReplicas`: ceil(usage / target) outside the tolerance.
        assert_eq!(recommend(1, average(3.0), TEN_PERCENT), 3);
        assert_eq!(recommend(4, average(2.5), TEN_PERCENT), 3);
        assert_eq!(recommend(4, average(0.0), TEN_PERCENT), 0);
        let per_four = MetricReading::AverageValue {
            value: 9.0,
            target: 4.0,
        };
        assert_eq!(recommend(1, per_four, TEN_PERCENT), 3);
    }

    #[test]
    fn the_tolerance_test_includes_its_bounds() {
        // `Tolerances.isWithin`: 1 - 0.1 <= ratio <= 1 + 0.1. 11000 / (1000 * 10) = 1.1, and
        // 1.0 + 0.1 is the same double: at 10 replicas the 11th is not added.
        assert_eq!(recommend(10, average(11.0), TEN_PERCENT), 10);
        assert_eq!(recommend(10, average(12.0), TEN_PERCENT), 12);
        // 9 / 10 = 0.9: the lower bound holds too; 8 / 10 does not.
        assert_eq!(recommend(10, average(9.0), TEN_PERCENT), 10);
        assert_eq!(recommend(10, average(8.0), TEN_PERCENT), 8);
        // 21 / 20 = 1.05.
        assert_eq!(recommend(20, average(21.0), TEN_PERCENT), 20);
        let exact_up = Tolerances { up: 0.0, down: 0.1 };
        assert_eq!(recommend(10, average(11.0), exact_up), 11);
        assert_eq!(recommend(20, average(19.0), exact_up), 20);
    }

    #[test]
    fn a_per_hpa_tolerance_needs_a_cluster_that_honours_it() {
        let behavior = Behavior {
            scale_up: ScalingRules {
                tolerance: Some(0.0),
                ..ScalingRules::default_scale_up()
            },
            scale_down: ScalingRules::default_scale_down(),
        };
        let honoured = Tolerances::of(Some(&behavior), ClusterTolerance::default());
        assert_eq!(honoured, Tolerances { up: 0.0, down: 0.1 });
        // Kubernetes < 1.35 without the gate, or KEDA < 2.18: the field is dropped.
        let ignored = ClusterTolerance {
            default: 0.1,
            per_hpa: false,
        };
        assert_eq!(Tolerances::of(Some(&behavior), ignored), TEN_PERCENT);
        // The cluster-wide flag applies to an HPA without behavior.
        let wide = ClusterTolerance {
            default: 0.05,
            per_hpa: true,
        };
        assert_eq!(
            Tolerances::of(None, wide),
            Tolerances {
                up: 0.05,
                down: 0.05
            }
        );
    }

    #[test]
    fn utilization_scales_by_the_ratio_to_the_target() {
        // `GetResourceReplicas`: two pods at 100 % against 60 %: ceil(2 * 1.0 / 0.6) = 4.
        let busy = MetricReading::Utilization {
            ready_total: 2.0,
            ready: 2,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(2, busy, TEN_PERCENT), 4);
        // One pod at 66 %: 1.1 of the target, on the bound: held.
        let near = MetricReading::Utilization {
            ready_total: 0.66,
            ready: 1,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(1, near, TEN_PERCENT), 1);
        // Three pods, one at 100 %: ceil(3 * (1/3) / 0.6) = 2.
        let light = MetricReading::Utilization {
            ready_total: 1.0,
            ready: 3,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(3, light, TEN_PERCENT), 2);
    }

    #[test]
    fn starting_pods_count_as_idle_on_the_way_up() {
        // `GetResourceReplicas` with unready pods: 2 ready at 100 %, 2 starting:
        // 2 / (0.6 * 4) = 0.83 < 1 once they count as 0: no further scale-up.
        let reading = MetricReading::Utilization {
            ready_total: 2.0,
            ready: 2,
            unready: 2,
            target: 0.6,
        };
        assert_eq!(recommend(4, reading, TEN_PERCENT), 4);
        // 3 ready at 100 %, 1 starting: 3 / (0.6 * 4) = 1.25: ceil(1.25 * 4) = 5.
        let reading = MetricReading::Utilization {
            ready_total: 3.0,
            ready: 3,
            unready: 1,
            target: 0.6,
        };
        assert_eq!(recommend(4, reading, TEN_PERCENT), 5);
    }

    #[test]
    fn without_behavior_scale_up_is_double_or_four_pods_per_sync() {
        // `calculateScaleUpLimit`: max(2 x current, 4), from the current count at every sync.
        let mut hpa = Hpa::new(spec(None));
        let wanted = average(100.0);
        let mut replicas = 1;
        let mut steps = Vec::new();
        for sync in 0..6 {
            replicas = hpa.sync(sync * 15_000, replicas, wanted).replicas;
            steps.push(replicas);
        }
        assert_eq!(steps, [4, 8, 16, 32, 64, 100]);
        // From 2: 4, not 2 + 4.
        let mut hpa = Hpa::new(spec(None));
        assert_eq!(hpa.sync(0, 2, wanted).replicas, 4);
    }

    #[test]
    fn without_behavior_scale_down_waits_300_s_counting_the_sample_at_the_cutoff() {
        // `stabilizeRecommendation`: a sample is dropped only when `Before(now - 300 s)`.
        let mut hpa = Hpa::new(spec(None));
        assert_eq!(hpa.sync(0, 5, average(5.0)).replicas, 5);
        assert_eq!(hpa.sync(15_000, 5, average(1.0)).replicas, 5);
        // At 300 s the sample of 0 s is exactly one window old: it still counts.
        assert_eq!(hpa.sync(300_000, 5, average(1.0)).replicas, 5);
        // At 315 s it has left; all at once, no rate limit without a behavior.
        assert_eq!(hpa.sync(315_000, 5, average(1.0)).replicas, 1);
    }

    #[test]
    fn default_rules_of_a_behavior_are_double_or_plus_four_per_period() {
        // A `behavior` that omits `scaleUp` gets `GenerateHPAScaleUpRules`: max(+100 %, +4)
        // from the replicas at the period's start.
        let behavior = Behavior {
            scale_up: ScalingRules::default_scale_up(),
            scale_down: ScalingRules::default_scale_down(),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 1, 100), 5);
        assert_eq!(hpa.normalize(15_000, 5, 100), 10);
        assert_eq!(hpa.normalize(30_000, 10, 100), 20);
        // 5 s later the 15 s period started at 10: at most max(20, 14) = 20.
        assert_eq!(hpa.normalize(35_000, 20, 100), 20);
    }

    #[test]
    fn stabilization_windows_exclude_their_start() {
        // `stabilizeRecommendationWithBehaviors`: a sample counts while
        // `timestamp.After(now - window)`.
        let behavior = Behavior {
            scale_up: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 900,
                    period: 15_000,
                }],
            ),
            scale_down: rules(
                120_000,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 100,
                    period: 15_000,
                }],
            ),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 1, 5), 5);
        assert_eq!(hpa.normalize(15_000, 5, 2), 5);
        assert_eq!(hpa.normalize(105_000, 5, 2), 5);
        // At 120 s the sample of 0 s is exactly 120 s old: out. The highest left is 2.
        assert_eq!(hpa.normalize(120_000, 5, 2), 2);
    }

    #[test]
    fn the_scale_up_window_takes_the_lowest_recent_recommendation() {
        let behavior = Behavior {
            scale_up: rules(
                30_000,
                Select::Max,
                vec![RatePolicy::Pods {
                    value: 100,
                    period: 15_000,
                }],
            ),
            scale_down: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 100,
                    period: 15_000,
                }],
            ),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        // Alone in the window, the current raw recommendation counts.
        assert_eq!(hpa.normalize(0, 2, 2), 2);
        // 8 wanted, but 2 was wanted 15 s ago: min(2, 8) = 2, and the count stays.
        assert_eq!(hpa.normalize(15_000, 2, 8), 2);
        // At 30 s the sample of 0 s is out; 8 (15 s) and 9 (now): 8.
        assert_eq!(hpa.normalize(30_000, 2, 9), 8);
    }

    #[test]
    fn the_period_start_counts_changes_both_ways() {
        // `calculateScaleUpLimitWithScalingRules`: start = current - added + removed.
        let behavior = Behavior {
            scale_up: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 100,
                    period: 60_000,
                }],
            ),
            scale_down: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 100,
                    period: 60_000,
                }],
            ),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        // 10 -> 2 at 0 s (8 removed).
        assert_eq!(hpa.normalize(0, 10, 2), 2);
        // At 15 s, 30 wanted: the period started at 2 - 0 + 8 = 10: up to 20, not 4.
        assert_eq!(hpa.normalize(15_000, 2, 30), 20);
        // At 30 s: start = 20 - 18 + 8 = 10 again: 20 at most, already there.
        assert_eq!(hpa.normalize(30_000, 20, 30), 20);
        // At 60 s the event of 0 s is exactly one period old: out (`After(cutoff)`); the
        // start is 20 - 18 = 2 ... the limit 4 is below the current count: never past it.
        assert_eq!(hpa.normalize(60_000, 20, 30), 20);
        // At 75 s nothing is left in the period: 20 -> 40 allowed, 30 wanted.
        assert_eq!(hpa.normalize(75_000, 20, 30), 30);
    }

    #[test]
    fn scale_down_percent_truncates_and_pods_policies_select() {
        // `calculateScaleDownLimitWithBehaviors`: 7 * (1 - 0.5) = 3.5 -> 3.
        let behavior = Behavior {
            scale_up: ScalingRules::default_scale_up(),
            scale_down: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 50,
                    period: 15_000,
                }],
            ),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 7, 1), 3);
        // `selectPolicy: Min` on the way down keeps the highest count.
        let behavior = Behavior {
            scale_up: ScalingRules::default_scale_up(),
            scale_down: rules(
                0,
                Select::Min,
                vec![
                    RatePolicy::Pods {
                        value: 1,
                        period: 120_000,
                    },
                    RatePolicy::Percent {
                        value: 50,
                        period: 15_000,
                    },
                ],
            ),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 5, 0), 4);
        // 60 s later the Pods period started at 5: 4 at most, already there.
        assert_eq!(hpa.normalize(60_000, 4, 0), 4);
        // At 120 s the first removal is out of the Pods period: one more.
        assert_eq!(hpa.normalize(120_000, 4, 0), 3);
        // Scale-up percent rounds up: from 3 by 10 %: ceil(3.3) = 4.
        let behavior = Behavior {
            scale_up: rules(
                0,
                Select::Max,
                vec![RatePolicy::Percent {
                    value: 10,
                    period: 15_000,
                }],
            ),
            scale_down: ScalingRules::default_scale_down(),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 3, 10), 4);
    }

    #[test]
    fn disabled_direction_and_the_clamps() {
        let behavior = Behavior {
            scale_up: rules(0, Select::Disabled, vec![]),
            scale_down: ScalingRules::default_scale_down(),
        };
        let mut hpa = Hpa::new(spec(Some(behavior)));
        assert_eq!(hpa.normalize(0, 3, 10), 3);
        // `maxReplicas` caps the rate limit; at 0 replicas the HPA does nothing; above the
        // ceiling it goes to the ceiling at once.
        let mut hpa = Hpa::new(HpaSpec {
            max_replicas: 40,
            ..spec(None)
        });
        assert_eq!(hpa.sync(0, 32, average(100.0)).replicas, 40);
        assert_eq!(hpa.sync(15_000, 0, average(100.0)).replicas, 0);
        assert_eq!(hpa.sync(30_000, 45, average(100.0)).replicas, 40);
    }
}
