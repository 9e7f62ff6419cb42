//! KEDA's part of a ScaledObject (DESIGN.md 2.4, 2.5), as KEDA's
//! `pkg/scaling/executor/scale_scaledobjects.go` (`RequestScale`) and `pkg/fallback/fallback.go`
//! have it: activation from zero, the cooldown back to zero, and what the HPA reads through
//! KEDA's metrics server when the scaler fails.
//!
//! Pure: the clock is passed in.

use super::Millis;

/// What KEDA does when `GetMetrics` fails `failureThreshold` times in a row (`fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    /// `failureThreshold`: the fallback applies from the failure after this many.
    pub failure_threshold: u32,
    /// `replicas`.
    pub replicas: u32,
    /// `behavior`.
    pub behavior: FallbackBehavior,
}

/// `fallback.behavior` (KEDA 2.17+; `static` before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackBehavior {
    /// `fallback.replicas`.
    Static,
    /// The current count.
    CurrentReplicas,
    /// The current count when higher than `fallback.replicas`, else `fallback.replicas`.
    CurrentReplicasIfHigher,
    /// The current count when lower than `fallback.replicas`, else `fallback.replicas`.
    CurrentReplicasIfLower,
}

impl Fallback {
    /// The replica count the fallback metric stands for at `current` replicas (`doFallback`).
    pub fn replicas_at(&self, current: u32) -> u32 {
        match self.behavior {
            FallbackBehavior::Static => self.replicas,
            FallbackBehavior::CurrentReplicas => current,
            FallbackBehavior::CurrentReplicasIfHigher => current.max(self.replicas),
            FallbackBehavior::CurrentReplicasIfLower => current.min(self.replicas),
        }
    }
}

/// KEDA's settings of one ScaledObject.
#[derive(Debug, Clone, PartialEq)]
pub struct Keda {
    /// `pollingInterval`: how often the scale loop asks the trigger.
    pub polling: Millis,
    /// `cooldownPeriod`: how long the trigger must be inactive before scaling to zero.
    pub cooldown: Millis,
    /// `external-push`: the scaler's stream reports activity at once, not at the next poll.
    pub push: bool,
    /// `minReplicaCount`.
    pub min_replicas: u32,
    /// `maxReplicaCount`: the HPA's ceiling.
    pub max_replicas: u32,
    /// `fallback`, when set.
    pub fallback: Option<Fallback>,
}

impl Keda {
    /// The HPA's floor: KEDA creates it with max(`minReplicaCount`, 1).
    pub fn hpa_min_replicas(&self) -> u32 {
        self.min_replicas.max(1)
    }
}

/// What the scale loop or the push stream learned from the scaler at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// The trigger is active.
    Active,
    /// The trigger is inactive.
    Inactive,
    /// The scaler failed (`GetMetrics` or `IsActive` answered an error or timed out).
    Failed,
}

/// What KEDA does to the replica count at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KedaAction {
    /// Leave the replica count to the HPA.
    Nothing,
    /// Scale from zero to [`Keda::hpa_min_replicas`].
    Activate,
    /// Scale to `minReplicaCount`.
    Deactivate,
}

/// KEDA's memory of one ScaledObject: when the trigger was last active (`lastActiveTime`) and
/// the metric's consecutive failures (`status.health`).
#[derive(Debug, Clone, Default)]
pub struct KedaState {
    last_active: Option<Millis>,
    failures: u32,
}

impl KedaState {
    /// When the trigger was last seen active.
    pub fn last_active(&self) -> Option<Millis> {
        self.last_active
    }

    /// Consecutive failed reads of the scaler.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the fallback applies: more failures in a row than `failureThreshold`
    /// (`GetMetricsWithFallback`: `NumberOfFailures > FailureThreshold`).
    pub fn falling_back(&self, keda: &Keda) -> bool {
        keda.fallback
            .is_some_and(|fallback| self.failures > fallback.failure_threshold)
    }

    /// One check of the scale loop at `now` with `replicas` running (`RequestScale`).
    ///
    /// - Active: scale from zero; at any count the cooldown starts again.
    /// - Failed: with the fallback past its threshold the trigger counts as active; without,
    ///   the count is kept: neither activation nor scale to zero.
    /// - Inactive: scale to `minReplicaCount` once `lastActiveTime + cooldownPeriod` is
    ///   before `now` (strictly), or at once if it was never active.
    pub fn check(
        &mut self,
        keda: &Keda,
        now: Millis,
        replicas: u32,
        activity: Activity,
    ) -> KedaAction {
        match activity {
            Activity::Failed => {
                self.failures += 1;
                if self.falling_back(keda) {
                    self.active(now, replicas)
                } else {
                    KedaAction::Nothing
                }
            }
            Activity::Active => {
                self.failures = 0;
                self.active(now, replicas)
            }
            Activity::Inactive => {
                self.failures = 0;
                self.inactive(keda, now, replicas)
            }
        }
    }

    /// A message of the `StreamIsActive` stream (`external-push`): the scale loop runs
    /// `RequestScale` at once with it. A `true` starts the cooldown again at any count.
    pub fn push(&mut self, keda: &Keda, now: Millis, replicas: u32, active: bool) -> KedaAction {
        if active {
            self.active(now, replicas)
        } else {
            self.inactive(keda, now, replicas)
        }
    }

    /// The value the HPA reads through KEDA's metrics server at `current` replicas, for an
    /// `AverageValue` target `target`: the scaler's answer, or after more failures than the
    /// threshold the fallback's replicas times the target; `None` is an error the HPA meets
    /// by keeping its count (`GetMetricsWithFallback`).
    pub fn metric(
        &mut self,
        keda: &Keda,
        current: u32,
        target: f64,
        answer: Option<f64>,
    ) -> Option<f64> {
        if let Some(value) = answer {
            self.failures = 0;
            return Some(value);
        }
        self.failures += 1;
        match keda.fallback {
            Some(fallback) if self.falling_back(keda) => {
                Some(f64::from(fallback.replicas_at(current)) * target)
            }
            _ => None,
        }
    }

    fn active(&mut self, now: Millis, replicas: u32) -> KedaAction {
        self.last_active = Some(now);
        if replicas == 0 {
            KedaAction::Activate
        } else {
            KedaAction::Nothing
        }
    }

    fn inactive(&mut self, keda: &Keda, now: Millis, replicas: u32) -> KedaAction {
        if replicas <= keda.min_replicas {
            return KedaAction::Nothing;
        }
        let cooled = match self.last_active {
            None => true,
            Some(at) => at + keda.cooldown < now,
        };
        if cooled {
            KedaAction::Deactivate
        } else {
            KedaAction::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keda(fallback: Option<Fallback>) -> Keda {
        Keda {
            polling: 15_000,
            cooldown: 120_000,
            push: true,
            min_replicas: 0,
            max_replicas: 40,
            fallback,
        }
    }

    const SHIPPED_FALLBACK: Fallback = Fallback {
        failure_threshold: 3,
        replicas: 1,
        behavior: FallbackBehavior::CurrentReplicasIfHigher,
    };

    #[test]
    fn activates_from_zero_and_cools_down_strictly_after_the_period() {
        // `RequestScale`: active at 0 scales from zero; inactive scales to zero once
        // `lastActiveTime.Add(cooldownPeriod).Before(now)`.
        let keda = keda(None);
        let mut state = KedaState::default();
        assert_eq!(
            state.check(&keda, 0, 0, Activity::Inactive),
            KedaAction::Nothing
        );
        assert_eq!(
            state.check(&keda, 1_000, 0, Activity::Active),
            KedaAction::Activate
        );
        assert_eq!(
            state.check(&keda, 16_000, 1, Activity::Active),
            KedaAction::Nothing
        );
        assert_eq!(
            state.check(&keda, 31_000, 1, Activity::Inactive),
            KedaAction::Nothing
        );
        // 16 + 120 = 136 s: not before 136 s.
        assert_eq!(
            state.check(&keda, 136_000, 1, Activity::Inactive),
            KedaAction::Nothing
        );
        assert_eq!(
            state.check(&keda, 136_001, 1, Activity::Inactive),
            KedaAction::Deactivate
        );
    }

    #[test]
    fn never_active_scales_to_zero_at_once() {
        // `scaleToZeroOrIdle`: a nil `lastActiveTime` ignores the cooldown.
        let keda = keda(None);
        let mut state = KedaState::default();
        assert_eq!(
            state.check(&keda, 5_000, 3, Activity::Inactive),
            KedaAction::Deactivate
        );
    }

    #[test]
    fn a_push_true_refreshes_the_cooldown_at_any_count() {
        // The push stream runs `RequestScale(isActive=true)`, which sets `lastActiveTime`
        // whatever the count.
        let keda = keda(None);
        let mut state = KedaState::default();
        assert_eq!(state.push(&keda, 0, 0, true), KedaAction::Activate);
        assert_eq!(state.push(&keda, 100_000, 4, true), KedaAction::Nothing);
        assert_eq!(state.last_active(), Some(100_000));
        assert_eq!(
            state.check(&keda, 150_000, 4, Activity::Inactive),
            KedaAction::Nothing
        );
        assert_eq!(
            state.check(&keda, 225_000, 4, Activity::Inactive),
            KedaAction::Deactivate
        );
    }

    #[test]
    fn without_fallback_failures_keep_the_count_even_at_zero() {
        let keda = keda(None);
        let mut state = KedaState::default();
        state.check(&keda, 0, 1, Activity::Active);
        for n in 1..=10 {
            let at = 200_000 + n * 15_000;
            assert_eq!(
                state.check(&keda, at, 1, Activity::Failed),
                KedaAction::Nothing
            );
            assert_eq!(
                state.check(&keda, at, 0, Activity::Failed),
                KedaAction::Nothing
            );
        }
        // The HPA's read fails: it keeps its count.
        assert_eq!(state.metric(&keda, 3, 1.0, None), None);
    }

    #[test]
    fn the_fallback_applies_after_more_failures_than_the_threshold() {
        // `GetMetricsWithFallback`: `NumberOfFailures > FailureThreshold`, so with 3 the
        // fourth failure in a row falls back; `doFallback` with `currentReplicasIfHigher`
        // answers max(current, 1) x target.
        let keda = keda(Some(SHIPPED_FALLBACK));
        let mut state = KedaState::default();
        assert_eq!(state.metric(&keda, 6, 1.0, None), None);
        assert_eq!(state.metric(&keda, 6, 1.0, None), None);
        assert_eq!(state.metric(&keda, 6, 1.0, None), None);
        assert_eq!(state.metric(&keda, 6, 1.0, None), Some(6.0));
        assert_eq!(state.metric(&keda, 0, 1.0, None), Some(1.0));
        assert_eq!(state.metric(&keda, 2, 4.0, None), Some(8.0));
        // A success resets the count.
        assert_eq!(state.metric(&keda, 2, 1.0, Some(5.0)), Some(5.0));
        assert_eq!(state.metric(&keda, 2, 1.0, None), None);
    }

    #[test]
    fn past_the_threshold_the_trigger_counts_as_active() {
        let keda = keda(Some(SHIPPED_FALLBACK));
        let mut state = KedaState::default();
        for at in [0, 15_000, 30_000] {
            assert_eq!(
                state.check(&keda, at, 0, Activity::Failed),
                KedaAction::Nothing
            );
        }
        assert_eq!(
            state.check(&keda, 45_000, 0, Activity::Failed),
            KedaAction::Activate
        );
        // And, active, it never cools down while blind.
        assert_eq!(
            state.check(&keda, 600_000, 1, Activity::Failed),
            KedaAction::Nothing
        );
        assert_eq!(state.last_active(), Some(600_000));
    }

    #[test]
    fn fallback_behaviors() {
        let at = |behavior| Fallback {
            failure_threshold: 3,
            replicas: 4,
            behavior,
        };
        assert_eq!(at(FallbackBehavior::Static).replicas_at(9), 4);
        assert_eq!(at(FallbackBehavior::CurrentReplicas).replicas_at(9), 9);
        assert_eq!(
            at(FallbackBehavior::CurrentReplicasIfHigher).replicas_at(9),
            9
        );
        assert_eq!(
            at(FallbackBehavior::CurrentReplicasIfHigher).replicas_at(2),
            4
        );
        assert_eq!(
            at(FallbackBehavior::CurrentReplicasIfLower).replicas_at(9),
            4
        );
        assert_eq!(
            at(FallbackBehavior::CurrentReplicasIfLower).replicas_at(2),
            2
        );
    }

    #[test]
    fn min_replica_count_is_the_floor_of_scale_down() {
        let keda = Keda {
            min_replicas: 2,
            ..keda(None)
        };
        let mut state = KedaState::default();
        assert_eq!(
            state.check(&keda, 0, 2, Activity::Inactive),
            KedaAction::Nothing
        );
        assert_eq!(keda.hpa_min_replicas(), 2);
        assert_eq!(
            super::Keda {
                min_replicas: 0,
                ..keda
            }
            .hpa_min_replicas(),
            1
        );
    }
}
