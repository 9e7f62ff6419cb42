//! Kubernetes and KEDA as the simulator plays them (DESIGN.md 2.4): the HPA formula with its
//! tolerance, the `behavior` stabilization windows and rate limits, KEDA's activation from zero
//! and its cooldown back to zero, and the order in which a ReplicaSet picks pods to delete.
//! Pure functions over plain structs; times are milliseconds of virtual time.

use std::collections::VecDeque;

/// Milliseconds of virtual time.
pub type Millis = u64;

/// One scaling policy of an HPA `behavior` (`type: Pods|Percent`, `value`, `periodSeconds`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RatePolicy {
    /// At most this many pods per period.
    Pods { value: u32, period: Millis },
    /// At most this percentage of the replicas at the start of the period.
    Percent { value: u32, period: Millis },
}

impl RatePolicy {
    fn period(self) -> Millis {
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
}

/// One direction of an HPA `behavior`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRules {
    /// `stabilizationWindowSeconds`, in milliseconds.
    pub stabilization: Millis,
    /// `tolerance` (Kubernetes 1.33+; 0.1 when not set).
    pub tolerance: f64,
    /// `selectPolicy`.
    pub select: Select,
    /// `policies`.
    pub policies: Vec<RatePolicy>,
}

/// An HPA `behavior`: how fast it may move each way.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    /// Rules for adding pods.
    pub scale_up: ScalingRules,
    /// Rules for removing pods.
    pub scale_down: ScalingRules,
}

impl Default for Behavior {
    /// Kubernetes' defaults: up by max(100 %, 4 pods) per 15 s at once; down by up to 100 %
    /// per 15 s after a 300 s stabilization window; tolerance 10 % both ways.
    fn default() -> Self {
        Behavior {
            scale_up: ScalingRules {
                stabilization: 0,
                tolerance: 0.1,
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
            },
            scale_down: ScalingRules {
                stabilization: 300_000,
                tolerance: 0.1,
                select: Select::Max,
                policies: vec![RatePolicy::Percent {
                    value: 100,
                    period: 15_000,
                }],
            },
        }
    }
}

/// The metric an HPA scales on, as read at one sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricReading {
    /// An external metric with `AverageValue` target `target`: the value is a total.
    AverageValue { value: f64, target: f64 },
    /// CPU utilization of the pods against `target` (0..1 of the request): `ready` holds each
    /// ready pod's utilization; `unready` pods have no usable sample yet.
    Utilization {
        ready_total: f64,
        ready: u32,
        unready: u32,
        target: f64,
    },
}

/// The replica count the HPA formula recommends before `behavior` is applied:
/// `ceil(current * metric / target)` unless the ratio is within the tolerance of its direction.
pub fn recommend(current: u32, reading: MetricReading, behavior: &Behavior) -> u32 {
    let tolerance = |ratio: f64| {
        if ratio > 1.0 {
            behavior.scale_up.tolerance
        } else {
            behavior.scale_down.tolerance
        }
    };
    match reading {
        MetricReading::AverageValue { value, target } => {
            if current == 0 {
                return current;
            }
            let ratio = value / (target * f64::from(current));
            if (ratio - 1.0).abs() <= tolerance(ratio) {
                current
            } else {
                ceil_replicas(value / target)
            }
        }
        MetricReading::Utilization {
            ready_total,
            ready,
            unready,
            target,
        } => {
            if ready == 0 {
                return current;
            }
            let ratio = ready_total / (target * f64::from(ready));
            if (ratio - 1.0).abs() <= tolerance(ratio) {
                return current;
            }
            if ratio > 1.0 && unready > 0 {
                // Pods still starting count as idle when scaling up, so that a scale-up
                // already under way is not repeated (the HPA's unready-pod rule).
                let all = ready + unready;
                let ratio = ready_total / (target * f64::from(all));
                if ratio <= 1.0 || (ratio - 1.0).abs() <= tolerance(ratio) {
                    return current;
                }
                return ceil_replicas(ratio * f64::from(all));
            }
            ceil_replicas(ratio * f64::from(ready))
        }
    }
}

fn ceil_replicas(value: f64) -> u32 {
    // A float sum of exact counts may land a hair above the integer.
    let rounded = (value - 1e-9).ceil();
    rounded.clamp(0.0, f64::from(u32::MAX)) as u32
}

/// An HPA's memory between syncs: past recommendations and past scale events.
#[derive(Debug, Clone, Default)]
pub struct Hpa {
    recommendations: VecDeque<(Millis, u32)>,
    events: VecDeque<(Millis, i64)>,
}

impl Hpa {
    /// One sync at `now`: applies the stabilization windows, the rate limits and the
    /// `[min, max]` clamp to `recommended`, records the result and returns the new count.
    pub fn sync(
        &mut self,
        now: Millis,
        current: u32,
        recommended: u32,
        behavior: &Behavior,
        min: u32,
        max: u32,
    ) -> u32 {
        let recommended = recommended.clamp(min, max);
        let keep = behavior
            .scale_up
            .stabilization
            .max(behavior.scale_down.stabilization);
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
        {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back((now, recommended));

        let mut up = recommended;
        let mut down = recommended;
        for &(at, value) in &self.recommendations {
            if now - at <= behavior.scale_up.stabilization {
                up = up.min(value);
            }
            if now - at <= behavior.scale_down.stabilization {
                down = down.max(value);
            }
        }
        let stabilized = current.max(up).min(down);

        let longest = behavior
            .scale_up
            .policies
            .iter()
            .chain(&behavior.scale_down.policies)
            .map(|policy| policy.period())
            .max()
            .unwrap_or(0);
        while self
            .events
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) >= longest)
        {
            self.events.pop_front();
        }
        let limited = if stabilized > current {
            stabilized.min(self.up_limit(now, current, &behavior.scale_up))
        } else if stabilized < current {
            stabilized.max(self.down_limit(now, current, &behavior.scale_down))
        } else {
            current
        };
        let next = limited.clamp(min, max);
        if next != current {
            self.events
                .push_back((now, i64::from(next) - i64::from(current)));
        }
        next
    }

    /// Replicas at the start of a policy period: the current count minus the changes made since.
    fn period_start(&self, now: Millis, current: u32, period: Millis, up: bool) -> u32 {
        let changed: i64 = self
            .events
            .iter()
            .filter(|(at, change)| now - at < period && ((*change > 0) == up))
            .map(|(_, change)| change)
            .sum();
        (i64::from(current) - changed).max(0) as u32
    }

    fn up_limit(&self, now: Millis, current: u32, rules: &ScalingRules) -> u32 {
        let limits = rules.policies.iter().map(|policy| {
            let start = self.period_start(now, current, policy.period(), true);
            match *policy {
                RatePolicy::Pods { value, .. } => start.saturating_add(value),
                RatePolicy::Percent { value, .. } => {
                    (f64::from(start) * (1.0 + f64::from(value) / 100.0)).ceil() as u32
                }
            }
        });
        match rules.select {
            Select::Max => limits.max(),
            Select::Min => limits.min(),
        }
        .unwrap_or(u32::MAX)
    }

    fn down_limit(&self, now: Millis, current: u32, rules: &ScalingRules) -> u32 {
        let limits = rules.policies.iter().map(|policy| {
            let start = self.period_start(now, current, policy.period(), false);
            match *policy {
                RatePolicy::Pods { value, .. } => start.saturating_sub(value),
                RatePolicy::Percent { value, .. } => {
                    (f64::from(start) * (1.0 - f64::from(value.min(100)) / 100.0)).floor() as u32
                }
            }
        });
        // The largest change is the lowest replica count.
        match rules.select {
            Select::Max => limits.min(),
            Select::Min => limits.max(),
        }
        .unwrap_or(0)
    }
}

/// KEDA's part of a ScaledObject with `minReplicaCount: 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Keda {
    /// `pollingInterval`: how often IsActive is asked (and, at zero, the scale-from-zero check).
    pub polling: Millis,
    /// `cooldownPeriod`: how long the trigger must be inactive before scaling to zero.
    pub cooldown: Millis,
    /// `external-push`: an inactive->active edge scales 0 -> 1 at once, not at the next poll.
    pub push: bool,
}

/// What KEDA does at one activity check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KedaAction {
    /// Leave the replica count to the HPA.
    Nothing,
    /// Scale from zero to one pod.
    Activate,
    /// Scale to zero.
    Deactivate,
}

/// KEDA's memory: when the trigger was last active.
#[derive(Debug, Clone, Default)]
pub struct KedaState {
    last_active: Option<Millis>,
}

impl KedaState {
    /// One activity check at `now` with `replicas` running and the trigger `active`.
    pub fn check(&mut self, keda: &Keda, now: Millis, replicas: u32, active: bool) -> KedaAction {
        if active {
            self.last_active = Some(now);
            return if replicas == 0 {
                KedaAction::Activate
            } else {
                KedaAction::Nothing
            };
        }
        let idle_since = self.last_active.unwrap_or(0);
        if replicas > 0 && now.saturating_sub(idle_since) >= keda.cooldown {
            KedaAction::Deactivate
        } else {
            KedaAction::Nothing
        }
    }
}

/// A pod as a ReplicaSet ranks it for deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAge {
    /// Not ready yet (still in its cold start).
    pub starting: bool,
    /// When it was created.
    pub created: Millis,
}

/// Indices of `count` pods to delete, in the ReplicaSet's order: pods not yet ready first, then
/// the most recently created (ReplicaSets do not know which egress pods are recording).
pub fn deletion_order(pods: &[PodAge], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by_key(|&index| {
        let pod = pods[index];
        (!pod.starting, std::cmp::Reverse(pod.created), index)
    });
    order.truncate(count);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn average(value: f64) -> MetricReading {
        MetricReading::AverageValue { value, target: 1.0 }
    }

    #[test]
    fn average_value_asks_for_the_ceiling_of_the_metric() {
        let behavior = Behavior::default();
        assert_eq!(recommend(1, average(3.0), &behavior), 3);
        assert_eq!(recommend(4, average(2.5), &behavior), 3);
        assert_eq!(recommend(4, average(0.0), &behavior), 0);
    }

    #[test]
    fn default_tolerance_holds_back_small_steps() {
        // 21 / (1 * 20) = 1.05: within 10 %, the HPA keeps 20 (DESIGN.md 2.4).
        let behavior = Behavior::default();
        assert_eq!(recommend(20, average(21.0), &behavior), 20);
        assert_eq!(recommend(20, average(23.0), &behavior), 23);
        // 19 / 20 = 0.95: within 10 % on the way down too.
        assert_eq!(recommend(20, average(19.0), &behavior), 20);
        // The comparison is in floating point, as the HPA's: |1 - 11/10| is a hair above 0.1.
        assert_eq!(recommend(10, average(11.0), &behavior), 11);
        let mut exact = Behavior::default();
        exact.scale_up.tolerance = 0.0;
        assert_eq!(recommend(20, average(21.0), &exact), 21);
        assert_eq!(recommend(20, average(19.0), &exact), 20);
    }

    #[test]
    fn utilization_scales_by_the_ratio_to_the_target() {
        let behavior = Behavior::default();
        // Two pods at 100 % against 60 %: ceil(2 * 1.0 / 0.6) = 4.
        let busy = MetricReading::Utilization {
            ready_total: 2.0,
            ready: 2,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(2, busy, &behavior), 4);
        // One pod at 63 %: 1.05 of target, within tolerance.
        let near = MetricReading::Utilization {
            ready_total: 0.63,
            ready: 1,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(1, near, &behavior), 1);
        // Three pods, one at 100 %: ceil(3 * (1/3) / 0.6) = 2.
        let light = MetricReading::Utilization {
            ready_total: 1.0,
            ready: 3,
            unready: 0,
            target: 0.6,
        };
        assert_eq!(recommend(3, light, &behavior), 2);
    }

    #[test]
    fn starting_pods_count_as_idle_on_the_way_up() {
        let behavior = Behavior::default();
        // 2 ready at 100 %, 2 starting: 2 / (0.6 * 4) = 0.83 < 1: no further scale-up.
        let reading = MetricReading::Utilization {
            ready_total: 2.0,
            ready: 2,
            unready: 2,
            target: 0.6,
        };
        assert_eq!(recommend(4, reading, &behavior), 4);
        // 3 ready at 100 %, 1 starting: 3 / (0.6 * 4) = 1.25: ceil(1.25 * 4) = 5.
        let reading = MetricReading::Utilization {
            ready_total: 3.0,
            ready: 3,
            unready: 1,
            target: 0.6,
        };
        assert_eq!(recommend(4, reading, &behavior), 5);
    }

    #[test]
    fn default_scale_up_limit_is_double_or_four_pods_per_period() {
        let behavior = Behavior::default();
        let mut hpa = Hpa::default();
        // From 1: max(1 * 2, 1 + 4) = 5.
        assert_eq!(hpa.sync(0, 1, 100, &behavior, 1, 100), 5);
        // 15 s later, from 5: max(10, 9) = 10.
        assert_eq!(hpa.sync(15_000, 5, 100, &behavior, 1, 100), 10);
        assert_eq!(hpa.sync(30_000, 10, 100, &behavior, 1, 100), 20);
        // Within the same period the start of the period counts: still 20 at most.
        assert_eq!(hpa.sync(35_000, 20, 100, &behavior, 1, 100), 20);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let behavior = Behavior::default();
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(0, 1, 5, &behavior, 1, 100), 5);
        // The demand drops at 15 s; the highest recommendation of the last 300 s is 5.
        assert_eq!(hpa.sync(15_000, 5, 1, &behavior, 1, 100), 5);
        assert_eq!(hpa.sync(300_000, 5, 1, &behavior, 1, 100), 5);
        // At 315 s the recommendation of 0 s has left the window.
        assert_eq!(hpa.sync(315_000, 5, 1, &behavior, 1, 100), 1);
    }

    #[test]
    fn pods_policy_limits_the_scale_down_rate() {
        let behavior = Behavior {
            scale_down: ScalingRules {
                stabilization: 0,
                tolerance: 0.1,
                select: Select::Min,
                policies: vec![RatePolicy::Pods {
                    value: 1,
                    period: 120_000,
                }],
            },
            ..Behavior::default()
        };
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(0, 5, 0, &behavior, 1, 100), 4);
        assert_eq!(hpa.sync(60_000, 4, 0, &behavior, 1, 100), 4);
        assert_eq!(hpa.sync(120_000, 4, 0, &behavior, 1, 100), 3);
    }

    #[test]
    fn keda_activates_at_once_and_deactivates_after_the_cooldown() {
        let keda = Keda {
            polling: 30_000,
            cooldown: 300_000,
            push: true,
        };
        let mut state = KedaState::default();
        assert_eq!(state.check(&keda, 0, 0, false), KedaAction::Nothing);
        assert_eq!(state.check(&keda, 1_000, 0, true), KedaAction::Activate);
        assert_eq!(state.check(&keda, 31_000, 1, true), KedaAction::Nothing);
        assert_eq!(state.check(&keda, 61_000, 1, false), KedaAction::Nothing);
        assert_eq!(state.check(&keda, 330_000, 1, false), KedaAction::Nothing);
        assert_eq!(
            state.check(&keda, 331_000, 1, false),
            KedaAction::Deactivate
        );
    }

    #[test]
    fn replicasets_delete_starting_pods_then_the_youngest() {
        let pods = [
            PodAge {
                starting: false,
                created: 0,
            },
            PodAge {
                starting: false,
                created: 50,
            },
            PodAge {
                starting: true,
                created: 10,
            },
            PodAge {
                starting: false,
                created: 20,
            },
        ];
        assert_eq!(deletion_order(&pods, 3), vec![2, 1, 3]);
    }
}
