//! How long livekit-server and the egress pods take (FIDELITY.md 1-3), in one struct: the real
//! figures, or all of them scaled down so that tests run fast with the same proportions.

use std::time::Duration;

use rand::Rng;

/// The timings of a start (psrpc selection and retries), of an egress's statuses and of
/// webhook delivery.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartTiming {
    /// The winning pod answers this long after it won: the handler launch and one IOInfo round
    /// trip (an estimate: the real figure depends on the machine).
    pub launch: Duration,
    /// Idle pods' bids (affinity 0.5) are weighed this long after the first one
    /// (psrpc `ShortCircuitTimeout`); a busy pod's bid (affinity 1) wins at once.
    pub bid_window: Duration,
    /// An attempt without any bid ends after this (`AffinityTimeout`).
    pub attempt_timeout: Duration,
    /// The wait before the second attempt of a cycle, drawn uniformly from this range.
    pub retry_first: (Duration, Duration),
    /// The wait before the third attempt of a cycle, drawn uniformly from this range.
    pub retry_second: (Duration, Duration),
    /// Attempts in one cycle, all with the same egress ID.
    pub attempts: u32,
    /// Cycles of attempts (the server-wide psrpc retry), with no wait between them.
    pub cycles: u32,
    /// How long the winning pod may take to answer in the first attempt of a cycle; doubled
    /// for each later attempt (10, 20, 40 s). A slower pod causes a retry with the same ID.
    pub pod_timeout: Duration,
    /// STARTING becomes ACTIVE this long after the egress was stored (a room composite waits
    /// for Chrome's start signal).
    pub active_after: Duration,
    /// An egress stays ENDING this long (the upload) before COMPLETE; its pod's job ends then.
    pub ending_for: Duration,
    /// The first wait before a webhook is sent again; doubled after each failed try.
    pub webhook_retry: Duration,
    /// Tries of one webhook (the first included).
    pub webhook_tries: u32,
    /// A webhook still queued this long after it was made is dropped.
    pub webhook_max_age: Duration,
}

impl StartTiming {
    /// The figures of livekit-server v1.13, egress v1.14, psrpc and webhook delivery.
    pub const fn real() -> Self {
        StartTiming {
            launch: Duration::from_millis(1_000),
            bid_window: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(1),
            retry_first: (Duration::from_secs(1), Duration::from_secs(2)),
            retry_second: (Duration::from_secs(2), Duration::from_secs(4)),
            attempts: 3,
            cycles: 3,
            pod_timeout: Duration::from_secs(10),
            active_after: Duration::from_secs(2),
            ending_for: Duration::from_secs(2),
            webhook_retry: Duration::from_secs(1),
            webhook_tries: 5,
            webhook_max_age: Duration::from_secs(30),
        }
    }

    /// The real figures with every duration multiplied by `factor` (e.g. 0.02 for tests);
    /// counts stay. A factor that is not finite or is negative is taken as 1.
    pub fn scaled(factor: f64) -> Self {
        let factor = if factor.is_finite() && factor >= 0.0 {
            factor
        } else {
            1.0
        };
        let scale = |d: Duration| d.mul_f64(factor);
        let real = Self::real();
        StartTiming {
            launch: scale(real.launch),
            bid_window: scale(real.bid_window),
            attempt_timeout: scale(real.attempt_timeout),
            retry_first: (scale(real.retry_first.0), scale(real.retry_first.1)),
            retry_second: (scale(real.retry_second.0), scale(real.retry_second.1)),
            attempts: real.attempts,
            cycles: real.cycles,
            pod_timeout: scale(real.pod_timeout),
            active_after: scale(real.active_after),
            ending_for: scale(real.ending_for),
            webhook_retry: scale(real.webhook_retry),
            webhook_tries: real.webhook_tries,
            webhook_max_age: scale(real.webhook_max_age),
        }
    }

    /// The wait before attempt `attempt` (0-based) of a cycle: none before the first, then
    /// `retry_first`, then `retry_second` (and `retry_second` for any further attempt).
    pub fn retry_wait(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let (low, high) = match attempt {
            0 => return Duration::ZERO,
            1 => self.retry_first,
            _ => self.retry_second,
        };
        if high <= low {
            return low;
        }
        low + (high - low).mul_f64(rng.random::<f64>())
    }

    /// How long the winner of attempt `attempt` (0-based) may take to answer.
    pub fn pod_timeout(&self, attempt: u32) -> Duration {
        self.pod_timeout
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
    }

    /// The shortest and longest time a start with no bid at all takes to answer 503.
    pub fn no_bid_answer(&self) -> (Duration, Duration) {
        let waits = |pick: fn((Duration, Duration)) -> Duration| {
            (1..self.attempts)
                .map(|attempt| {
                    pick(if attempt == 1 {
                        self.retry_first
                    } else {
                        self.retry_second
                    })
                })
                .sum::<Duration>()
        };
        let attempts = self.attempt_timeout * self.attempts;
        (
            (attempts + waits(|range| range.0)) * self.cycles,
            (attempts + waits(|range| range.1)) * self.cycles,
        )
    }
}

impl Default for StartTiming {
    fn default() -> Self {
        Self::real()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_no_bid_answer_takes_18_to_27_seconds_and_scales() {
        let real = StartTiming::real();
        assert_eq!(
            real.no_bid_answer(),
            (Duration::from_secs(18), Duration::from_secs(27))
        );
        let fast = StartTiming::scaled(0.02);
        let (low, high) = fast.no_bid_answer();
        assert!(
            low.abs_diff(Duration::from_millis(360)) < Duration::from_millis(1),
            "{low:?}"
        );
        assert!(
            high.abs_diff(Duration::from_millis(540)) < Duration::from_millis(1),
            "{high:?}"
        );
        assert_eq!(fast.attempts, 3);
        assert_eq!(StartTiming::scaled(f64::NAN), real);
    }

    #[test]
    fn retry_waits_stay_in_their_ranges_and_pod_timeouts_double() {
        let timing = StartTiming::real();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        assert_eq!(timing.retry_wait(0, &mut rng), Duration::ZERO);
        for _ in 0..100 {
            let first = timing.retry_wait(1, &mut rng);
            assert!((Duration::from_secs(1)..=Duration::from_secs(2)).contains(&first));
            let second = timing.retry_wait(2, &mut rng);
            assert!((Duration::from_secs(2)..=Duration::from_secs(4)).contains(&second));
        }
        assert_eq!(
            [0, 1, 2].map(|attempt| timing.pod_timeout(attempt).as_secs()),
            [10, 20, 40]
        );
    }
}
