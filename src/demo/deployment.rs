//! A stand-in for the egress Deployment and its ReplicaSet: it follows the replica count the
//! KEDA/HPA stand-in sets.
//!
//! A new pod is `starting` for the cold start, then an [`EgressPodStandIn`] joins the
//! livekit-server stand-in (which gives it jobs) and the Prometheus stand-in (through which
//! the real fleet observer finds it). Scaling down picks victims the way a ReplicaSet does
//! ([`crate::kube::deletion_order`], the rule `simulate` plays); a starting victim is deleted at once, a ready one gets SIGTERM: it takes no
//! new job, finishes its recordings, and is deleted once it has none left (DESIGN.md 2.1).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Event;
use super::view::short_list;
use crate::kube::{Millis, RankedPod, Uid, deletion_order};
use crate::model::Settings;
use crate::standin::{EgressPodStandIn, LiveKitServerStandIn, PrometheusStandIn};

/// How often the ReplicaSet stand-in reconciles.
const RECONCILE_EVERY: Duration = Duration::from_millis(100);

const SOURCE: &str = "egress pods stand-in";

#[derive(Debug)]
enum Phase {
    Starting,
    Ready {
        pod: EgressPodStandIn,
        instance: String,
        ready_at: Duration,
    },
    Draining {
        pod: EgressPodStandIn,
        instance: String,
        since: Duration,
    },
}

#[derive(Debug)]
struct Slot {
    name: String,
    created_at: Duration,
    uid: Uid,
    phase: Phase,
}

/// Seed of the pods' UIDs: the ReplicaSet's tie-break among pods of similar age.
const UID_SEED: u64 = 0x5EED;

impl Slot {
    /// What the ReplicaSet's ranking reads of this pod.
    fn ranked(&self) -> RankedPod {
        let ready = match self.phase {
            Phase::Ready { ready_at, .. } => Some(millis(ready_at)),
            _ => None,
        };
        RankedPod::new(millis(self.created_at), ready, self.uid)
    }
}

fn millis(duration: Duration) -> Millis {
    duration.as_millis() as Millis
}

/// Pods by phase, and the cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PodCounts {
    /// Ready pods (busy or idle).
    pub ready: usize,
    /// Pods in their cold start.
    pub starting: usize,
    /// Pods that got SIGTERM and still record.
    pub draining: usize,
    /// Most pods that existed at once.
    pub peak: usize,
    /// Pod lifetime summed over all pods, in seconds: what the fleet cost.
    pub pod_seconds: f64,
}

impl PodCounts {
    /// Pods that exist, in any phase.
    pub fn total(&self) -> usize {
        self.ready + self.starting + self.draining
    }
}

/// The egress Deployment stand-in.
pub struct EgressDeployment {
    livekit: LiveKitServerStandIn,
    prometheus: PrometheusStandIn,
    settings: Settings,
    cold_start: Duration,
    slots: Vec<Slot>,
    created: u32,
    peak: usize,
    pod_seconds: f64,
    last_step: Option<Duration>,
}

impl EgressDeployment {
    /// No pods yet; new ones take `cold_start` and have the CPU and costs of `settings`.
    pub fn new(
        livekit: LiveKitServerStandIn,
        prometheus: PrometheusStandIn,
        settings: Settings,
        cold_start: Duration,
    ) -> Self {
        EgressDeployment {
            livekit,
            prometheus,
            settings,
            cold_start,
            slots: Vec::new(),
            created: 0,
            peak: 0,
            pod_seconds: 0.0,
            last_step: None,
        }
    }

    /// Pods by phase.
    pub fn counts(&self) -> PodCounts {
        let mut counts = PodCounts {
            peak: self.peak,
            pod_seconds: self.pod_seconds,
            ..PodCounts::default()
        };
        for slot in &self.slots {
            match slot.phase {
                Phase::Starting => counts.starting += 1,
                Phase::Ready { .. } => counts.ready += 1,
                Phase::Draining { .. } => counts.draining += 1,
            }
        }
        counts
    }

    /// Reconciles at `now` towards `replicas`; returns what happened worth telling.
    pub async fn step(&mut self, now: Duration, replicas: u32) -> io::Result<Vec<String>> {
        let mut notes = Vec::new();
        if let Some(last) = self.last_step {
            self.pod_seconds += self.slots.len() as f64 * now.saturating_sub(last).as_secs_f64();
        }
        self.last_step = Some(now);

        let mut became_ready = 0;
        for slot in &mut self.slots {
            if matches!(slot.phase, Phase::Starting) && slot.created_at + self.cold_start <= now {
                let pod = EgressPodStandIn::start_on(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    self.settings.clone(),
                )
                .await?;
                let instance = self.prometheus.add_target(&pod, &slot.name);
                self.livekit.add_pod(pod.clone());
                slot.phase = Phase::Ready {
                    pod,
                    instance,
                    ready_at: now,
                };
                became_ready += 1;
            }
        }
        if became_ready > 0 {
            notes.push(format!(
                "{became_ready} pod(s) ready after the {:.1} s cold start",
                self.cold_start.as_secs_f64()
            ));
        }

        let serving: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !matches!(self.slots[i].phase, Phase::Draining { .. }))
            .collect();
        let wanted = replicas as usize;
        if serving.len() < wanted {
            for _ in serving.len()..wanted {
                self.created += 1;
                self.slots.push(Slot {
                    name: format!("egress-{:02}", self.created),
                    created_at: now,
                    uid: Uid::generate(UID_SEED, u64::from(self.created)),
                    phase: Phase::Starting,
                });
            }
        } else if serving.len() > wanted {
            let ranked: Vec<RankedPod> = serving.iter().map(|&i| self.slots[i].ranked()).collect();
            let mut deleted = Vec::new();
            let mut signalled = Vec::new();
            let mut busy = 0;
            for victim in deletion_order(&ranked, serving.len() - wanted, millis(now)) {
                let index = serving[victim];
                let slot = &mut self.slots[index];
                let phase = std::mem::replace(&mut slot.phase, Phase::Starting);
                slot.phase = match phase {
                    Phase::Ready { pod, instance, .. } => {
                        pod.set_terminating(true);
                        if !pod.active().is_empty() {
                            busy += 1;
                        }
                        signalled.push(slot.name.clone());
                        Phase::Draining {
                            pod,
                            instance,
                            since: now,
                        }
                    }
                    Phase::Starting => {
                        // Never ran: deleted at once.
                        deleted.push(index);
                        Phase::Starting
                    }
                    // Not among the serving pods the victims are picked from.
                    draining @ Phase::Draining { .. } => draining,
                };
            }
            // From the back, so that the indexes still to remove stay valid.
            deleted.sort_unstable_by(|a, b| b.cmp(a));
            for &index in &deleted {
                self.slots.remove(index);
            }
            if !deleted.is_empty() {
                notes.push(format!("{} starting pod(s) deleted", deleted.len()));
            }
            if !signalled.is_empty() {
                let what = if busy == 0 {
                    "idle, so deleted at once".to_owned()
                } else {
                    format!("{busy} still recording: no new job, deleted when it ends")
                };
                notes.push(format!("SIGTERM to {} ({what})", short_list(&signalled)));
            }
        }

        let livekit = &self.livekit;
        let prometheus = &self.prometheus;
        let mut drained = 0;
        self.slots.retain(|slot| match &slot.phase {
            Phase::Draining {
                pod,
                instance,
                since,
            } if livekit.remove_idle_pod(pod.node_id()) => {
                prometheus.remove_target(instance);
                // Pods idle when signalled were announced with the SIGTERM.
                if *since < now {
                    drained += 1;
                }
                false
            }
            _ => true,
        });
        if drained > 0 {
            notes.push(format!(
                "{drained} pod(s) finished their recording and were deleted"
            ));
        }
        self.peak = self.peak.max(self.slots.len());
        Ok(notes)
    }

    /// Follows the replica count in `scale` until `shutdown`, publishing `counts`.
    pub async fn run(
        mut self,
        clock: Instant,
        scale: watch::Receiver<super::autoscaler::ScaleState>,
        counts: watch::Sender<PodCounts>,
        events: mpsc::UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let replicas = scale.borrow().replicas;
            let now = clock.elapsed();
            for note in self.step(now, replicas).await? {
                let _ = events.send(Event::new(now, SOURCE, note));
            }
            counts.send_replace(self.counts());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standin::LiveKitStandInOptions;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test]
    async fn pods_start_after_the_cold_start_and_drain_before_they_go() {
        let prometheus = PrometheusStandIn::start().await.unwrap();
        let livekit = LiveKitServerStandIn::start(LiveKitStandInOptions::default(), Vec::new())
            .await
            .unwrap();
        let mut deployment = EgressDeployment::new(
            livekit.clone(),
            prometheus.clone(),
            Settings::default(),
            secs(3),
        );
        deployment.step(secs(0), 1).await.unwrap();
        deployment.step(secs(1), 2).await.unwrap();
        assert_eq!((deployment.counts().starting, livekit.pods().len()), (2, 0));
        deployment.step(secs(3), 2).await.unwrap();
        assert_eq!((deployment.counts().ready, livekit.pods().len()), (1, 1));
        deployment.step(secs(4), 2).await.unwrap();
        assert_eq!((deployment.counts().ready, livekit.pods().len()), (2, 2));

        // The newest pod is busy; scaling to 1 signals it, and it stays until its job ends.
        let newest = livekit.pods()[1].clone();
        newest.add_job("room_composite");
        let notes = deployment.step(secs(4), 1).await.unwrap();
        assert_eq!(
            notes,
            ["SIGTERM to egress-02 (1 still recording: no new job, deleted when it ends)"]
        );
        assert_eq!(
            (deployment.counts().ready, deployment.counts().draining),
            (1, 1)
        );
        assert!(!newest.takes_jobs());
        deployment.step(secs(5), 1).await.unwrap();
        assert_eq!(livekit.pods().len(), 2);
        newest.remove_job("room_composite");
        let notes = deployment.step(secs(6), 1).await.unwrap();
        assert_eq!(
            notes,
            ["1 pod(s) finished their recording and were deleted"]
        );
        assert_eq!(deployment.counts().total(), 1);
        assert_eq!(livekit.pods().len(), 1);

        // To 0 while a new pod starts: the starting one is deleted at once, the idle one
        // drains at once.
        deployment.step(secs(7), 2).await.unwrap();
        assert_eq!(deployment.counts().starting, 1);
        deployment.step(secs(8), 0).await.unwrap();
        let counts = deployment.counts();
        assert_eq!((counts.total(), counts.peak), (0, 2));
        assert!(livekit.pods().is_empty());
        // 1 pod 0-1 s, 2 pods 1-4 s, 1 ready + 1 draining 4-6 s, 1 pod 6-7 s, 2 pods 7-8 s.
        assert!((counts.pod_seconds - (1.0 + 6.0 + 4.0 + 1.0 + 2.0)).abs() < 1e-9);
        deployment.step(secs(9), 0).await.unwrap();
        assert_eq!(deployment.counts().pod_seconds, counts.pod_seconds);
    }
}
