//! Which pods a ReplicaSet deletes when it scales down (DESIGN.md 2.5), as Kubernetes'
//! `pkg/controller/controller_utils.go` ranks them (`ActivePodsWithRanks.Less`, with the
//! `LogarithmicScaleDown` gate, GA in 1.31): it does not know which egress pods record.
//!
//! Pure: the clock is passed in.

use std::cmp::Ordering;

use super::Millis;

/// A pod's phase as the ranking orders it (`podPhaseToOrdinal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PodPhase {
    /// Not all containers started yet (image pull, container start): deleted first.
    Pending,
    /// The node stopped reporting.
    Unknown,
    /// Running.
    Running,
}

/// A pod's UID as the tie-break compares it: real UIDs are random, so among pods of similar
/// age the choice is effectively random. [`Uid::generate`] draws them from a seed, so runs
/// stay reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uid(pub u64);

impl Uid {
    /// The `index`-th UID of the sequence drawn from `seed` (SplitMix64).
    pub fn generate(seed: u64, index: u64) -> Uid {
        let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Uid(z ^ (z >> 31))
    }
}

/// What the ranking reads of one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankedPod {
    /// Bound to a node (`spec.nodeName` set).
    pub scheduled: bool,
    /// `status.phase`.
    pub phase: PodPhase,
    /// When it became ready; `None` while not ready.
    pub ready_since: Option<Millis>,
    /// `controller.kubernetes.io/pod-deletion-cost` (0 when absent).
    pub deletion_cost: i32,
    /// Pods of the same Deployment on its node, itself included (0 when the model has no
    /// nodes: every pod alike).
    pub on_same_node: u32,
    /// Highest container restart count.
    pub restarts: u32,
    /// `metadata.creationTimestamp`.
    pub created: Millis,
    /// `metadata.uid`.
    pub uid: Uid,
}

impl RankedPod {
    /// A pod of a model without nodes, deletion costs or restarts: created at `created`,
    /// ready since `ready_since` (`None`: still in its cold start, `Pending`).
    pub fn new(created: Millis, ready_since: Option<Millis>, uid: Uid) -> Self {
        RankedPod {
            scheduled: true,
            phase: if ready_since.is_some() {
                PodPhase::Running
            } else {
                PodPhase::Pending
            },
            ready_since,
            deletion_cost: 0,
            on_same_node: 0,
            restarts: 0,
            created,
            uid,
        }
    }
}

/// Indices of the `count` pods the ReplicaSet deletes at `now`, first victim first
/// (`getPodsToDelete` sorts by `ActivePodsWithRanks.Less`, then takes the head).
pub fn deletion_order(pods: &[RankedPod], count: usize, now: Millis) -> Vec<usize> {
    // An insertion sort: `Less` with its logarithmic buckets is not guaranteed transitive, and
    // this stays deterministic whatever it compares.
    let mut order: Vec<usize> = Vec::with_capacity(pods.len());
    for index in 0..pods.len() {
        let at = order
            .iter()
            .position(|&other| less(&pods[index], &pods[other], now))
            .unwrap_or(order.len());
        order.insert(at, index);
    }
    order.truncate(count);
    order
}

/// `ActivePodsWithRanks.Less`: whether `a` is deleted before `b`.
pub fn less(a: &RankedPod, b: &RankedPod, now: Millis) -> bool {
    // 1. Unassigned before assigned.
    if a.scheduled != b.scheduled {
        return !a.scheduled;
    }
    // 2. Pending before Unknown before Running.
    if a.phase != b.phase {
        return a.phase < b.phase;
    }
    // 3. Not ready before ready.
    if a.ready_since.is_some() != b.ready_since.is_some() {
        return a.ready_since.is_none();
    }
    // 4. Lower deletion cost first.
    if a.deletion_cost != b.deletion_cost {
        return a.deletion_cost < b.deletion_cost;
    }
    // 5. Doubled up on a node before not.
    if a.on_same_node != b.on_same_node {
        return a.on_same_node > b.on_same_node;
    }
    // 6. Ready for less time first, in power-of-two buckets, the UID breaking ties.
    if let (Some(ready_a), Some(ready_b)) = (a.ready_since, b.ready_since)
        && ready_a != ready_b
    {
        return match log_rank_diff(ready_a, ready_b, now).cmp(&0) {
            Ordering::Equal => a.uid < b.uid,
            order => order == Ordering::Less,
        };
    }
    // 7. More restarts first.
    if a.restarts != b.restarts {
        return a.restarts > b.restarts;
    }
    // 8. Newer first, in power-of-two buckets, the UID breaking ties.
    if a.created != b.created {
        return match log_rank_diff(a.created, b.created, now).cmp(&0) {
            Ordering::Equal => a.uid < b.uid,
            order => order == Ordering::Less,
        };
    }
    false
}

/// `logarithmicRankDiff`: floor(log2) of each age in nanoseconds (-1 for no age), subtracted.
fn log_rank_diff(t1: Millis, t2: Millis, now: Millis) -> i64 {
    let rank = |t: Millis| {
        let age = now.saturating_sub(t).saturating_mul(1_000_000);
        if age > 0 {
            (age as f64).log2() as i64
        } else {
            -1
        }
    };
    rank(t1) - rank(t2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Millis = 1_000;

    fn ready(created: Millis, since: Millis, uid: u64) -> RankedPod {
        RankedPod::new(created, Some(since), Uid(uid))
    }

    #[test]
    fn not_ready_pods_go_before_ready_ones_and_pending_before_running() {
        // Steps 2 and 3 of `ActivePodsWithRanks.Less`.
        let now = 1_000 * SECOND;
        let pods = [
            ready(0, 30 * SECOND, 1),
            RankedPod::new(900 * SECOND, None, Uid(2)),
            RankedPod {
                phase: PodPhase::Running,
                ..RankedPod::new(10 * SECOND, None, Uid(3))
            },
        ];
        assert_eq!(deletion_order(&pods, 3, now), vec![1, 2, 0]);
        // Step 1: an unscheduled pod before all.
        let mut with_unscheduled = pods.to_vec();
        with_unscheduled.push(RankedPod {
            scheduled: false,
            ..RankedPod::new(0, None, Uid(9))
        });
        assert_eq!(deletion_order(&with_unscheduled, 1, now), vec![3]);
    }

    #[test]
    fn deletion_cost_and_co_location_come_before_age() {
        // Steps 4 and 5.
        let now = 1_000 * SECOND;
        let cheap = RankedPod {
            deletion_cost: -1,
            ..ready(0, 30 * SECOND, 5)
        };
        let doubled = RankedPod {
            on_same_node: 2,
            ..ready(0, 30 * SECOND, 6)
        };
        let young = ready(800 * SECOND, 830 * SECOND, 7);
        assert_eq!(
            deletion_order(&[young, doubled, cheap], 3, now),
            vec![2, 1, 0]
        );
    }

    #[test]
    fn ready_time_is_compared_in_power_of_two_buckets() {
        // Step 6 with `logarithmicRankDiff` on nanosecond ages: at 1,000 s, a pod ready for
        // 100 s (1e11 ns: floor(log2) = 36) and one ready for 120 s (1.2e11 ns: 36) share a
        // bucket, so the UID decides; one ready for 40 s (4e10 ns: 35) is younger and goes
        // first whatever its UID.
        let now = 1_000 * SECOND;
        let a = ready(0, 900 * SECOND, 50);
        let b = ready(0, 880 * SECOND, 10);
        let c = ready(0, 960 * SECOND, 99);
        assert_eq!(deletion_order(&[a, b, c], 3, now), vec![2, 1, 0]);
        // Exactly equal ready times fall through to the creation time (step 8): newer first
        // by bucket: created 100 s ago (36) before 300 s ago (38).
        let d = ready(700 * SECOND, 960 * SECOND, 1);
        let e = ready(900 * SECOND, 960 * SECOND, 2);
        assert_eq!(deletion_order(&[d, e], 1, now), vec![1]);
    }

    #[test]
    fn creation_time_buckets_and_the_uid_tie_break() {
        // Step 8 among pods still starting: created 10 s ago (1e10 ns: 33) and 12 s ago
        // (1.2e10 ns: 33) share a bucket: the lower UID goes first; 20 s ago (2e10 ns: 34) is
        // older and goes last.
        let now = 100 * SECOND;
        let pods = [
            RankedPod::new(80 * SECOND, None, Uid(1)),
            RankedPod::new(90 * SECOND, None, Uid(7)),
            RankedPod::new(88 * SECOND, None, Uid(3)),
        ];
        assert_eq!(deletion_order(&pods, 3, now), vec![2, 1, 0]);
        // Step 7: more restarts first, before creation.
        let restarted = RankedPod {
            restarts: 2,
            ..RankedPod::new(10 * SECOND, None, Uid(8))
        };
        assert_eq!(deletion_order(&[pods[1], restarted], 1, now), vec![1]);
    }

    #[test]
    fn uids_are_reproducible_and_spread() {
        assert_eq!(Uid::generate(1, 5), Uid::generate(1, 5));
        assert_ne!(Uid::generate(1, 5), Uid::generate(2, 5));
        let lower = (0..1000)
            .filter(|&i| Uid::generate(7, i) < Uid::generate(7, i + 1))
            .count();
        assert!((400..600).contains(&lower), "{lower}");
    }
}
