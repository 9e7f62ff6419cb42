//! One start call as livekit-server runs it (FIDELITY.md 1, `protocol: rpc/egress_client.go`,
//! `psrpc: pkg/client/rpc.go`): attempts of psrpc selection with the same egress ID, retried
//! on `unavailable` and `deadline_exceeded` along the ladder of [`StartTiming`].
//!
//! One attempt: every pod that takes jobs and admits the job bids at once (busy: affinity 1,
//! idle: 0.5). A busy bid wins at once; otherwise an idle bid wins `bid_window` later (which
//! of equal bids arrives first is random, as on a real network);
//! with no bid the attempt ends after `attempt_timeout`. The winner re-checks (disabled:
//! "server is shutting down"; this ID already running there: `already_exists`; admission:
//! "not enough CPU"), stores the egress and answers after `launch`, or is given up after its
//! pod timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::lifecycle::{is_listed_active, starting_info};
use super::twirp::Failure;
use super::{Egress, Inner, StartTiming, StartedEgress, new_id};
use crate::egress_request::StartRequest;
use crate::model::{EgressKind, PodLoad, Settings, reported_type};
use crate::standin::EgressPodStandIn;

/// A start call on its way through the ladder.
#[derive(Debug, Clone)]
pub(super) struct StartCall {
    pub(super) request: StartRequest,
    /// Made when the call arrived; every attempt uses it.
    pub(super) egress_id: String,
    pub(super) requested_at: Instant,
    /// The first winner answers after this instead of `launch` (a scripted slow pod).
    pub(super) slow: Option<Duration>,
}

/// Why an attempt gave no egress.
enum Refusal {
    /// `unavailable` or `deadline_exceeded`: the ladder tries again.
    Retry(Failure),
    /// Anything else ends the call with this answer.
    Final(Failure),
}

/// One pod's bid.
struct Bid {
    node_id: String,
    busy: bool,
}

/// The load of a stand-in pod as its admission check sees it.
fn load(pod: &EgressPodStandIn, settings: &Settings) -> PodLoad {
    let active = pod.active();
    PodLoad {
        ready: pod.takes_jobs(),
        jobs: active.values().sum(),
        used: active
            .iter()
            .map(|(reported, count)| settings.costs.cost_of_reported_type(reported) * count)
            .sum(),
        video_ok: true,
    }
}

fn no_response() -> Failure {
    Failure::psrpc("unavailable", "no response from servers")
}

impl Inner {
    fn timing(&self) -> StartTiming {
        self.options.timing
    }

    /// The whole ladder; stops early (answering the last refusal) when the caller has gone or
    /// `no_capacity_delay` has passed, but never in the middle of an attempt.
    pub(super) async fn run_start(
        self: Arc<Self>,
        call: StartCall,
        caller_gone: CancellationToken,
    ) -> Result<proto::EgressInfo, Failure> {
        let timing = self.timing();
        let cap = call
            .requested_at
            .checked_add(self.options.no_capacity_delay);
        let mut slow = call.slow;
        let mut last = no_response();
        let mut number = 0;
        for _cycle in 0..timing.cycles.max(1) {
            for attempt in 0..timing.attempts.max(1) {
                if number > 0 {
                    let wait = timing.retry_wait(attempt, &mut self.state().rng);
                    tokio::time::sleep(wait).await;
                    if caller_gone.is_cancelled() || cap.is_some_and(|cap| Instant::now() >= cap) {
                        return Err(last);
                    }
                }
                number += 1;
                match self.attempt(&call, attempt, number, &mut slow).await {
                    Ok(info) => return Ok(info),
                    Err(Refusal::Retry(failure)) => last = failure,
                    Err(Refusal::Final(failure)) => return Err(failure),
                }
            }
        }
        Err(last)
    }

    async fn attempt(
        self: &Arc<Self>,
        call: &StartCall,
        attempt: u32,
        number: u32,
        slow: &mut Option<Duration>,
    ) -> Result<proto::EgressInfo, Refusal> {
        let timing = self.timing();
        if number == 1 {
            let claim_delay = self.state().claim_delay;
            if !claim_delay.is_zero() {
                tokio::time::sleep(claim_delay).await;
            }
        }
        let bids = self.bids(call.request.kind());
        // Which of equal bids arrives first is down to the network: a random one, so that
        // concurrent starts spread over the pods and collide only as often as chance has it.
        let busy: Vec<&Bid> = bids.iter().filter(|bid| bid.busy).collect();
        let winner = if !busy.is_empty() {
            self.pick(&busy)
        } else if !bids.is_empty() {
            tokio::time::sleep(timing.bid_window).await;
            self.pick(&bids.iter().collect::<Vec<_>>())
        } else {
            tokio::time::sleep(timing.attempt_timeout).await;
            return Err(Refusal::Retry(no_response()));
        };
        let info = self.admit(&winner, call, number, false)?;
        let answer_after = slow.take().unwrap_or(timing.launch);
        let limit = timing.pod_timeout(attempt);
        if answer_after > limit {
            tokio::time::sleep(limit).await;
            return Err(Refusal::Retry(Failure::psrpc(
                "deadline_exceeded",
                "request timed out",
            )));
        }
        tokio::time::sleep(answer_after).await;
        Ok(info)
    }

    /// One of `bids`, at random (the stand-in's seeded generator).
    fn pick(&self, bids: &[&Bid]) -> String {
        let index = self.state().rng.random_range(0..bids.len());
        bids[index].node_id.clone()
    }

    /// The pods that bid for a job of `kind` now, in list order.
    fn bids(&self, kind: EgressKind) -> Vec<Bid> {
        let settings = &self.options.settings;
        self.state()
            .pods
            .iter()
            .filter_map(|pod| {
                let load = load(pod, settings);
                load.admits(settings, kind).then(|| Bid {
                    node_id: pod.node_id().to_owned(),
                    busy: load.jobs > 0,
                })
            })
            .collect()
    }

    /// The winner's `StartEgress`: its refusals, else the job on the pod and the egress
    /// stored (`egress_started` sent) under the call's ID.
    fn admit(
        self: &Arc<Self>,
        node_id: &str,
        call: &StartCall,
        attempt: u32,
        by_other: bool,
    ) -> Result<proto::EgressInfo, Refusal> {
        let settings = &self.options.settings;
        let kind = call.request.kind();
        let (info, fresh) = {
            let mut state = self.state();
            let Some(pod) = state
                .pods
                .iter()
                .find(|pod| pod.node_id() == node_id)
                .cloned()
            else {
                // The pod left between its bid and the selection: nobody answers.
                return Err(Refusal::Retry(no_response()));
            };
            if !pod.takes_jobs() {
                return Err(Refusal::Retry(Failure::psrpc(
                    "unavailable",
                    "server is shutting down",
                )));
            }
            if let Some(existing) = state.egress.get(&call.egress_id)
                && (existing.node_ids.iter().any(|id| id == node_id)
                    || !is_listed_active(&existing.info))
            {
                return Err(Refusal::Final(Failure::psrpc(
                    "already_exists",
                    "egress already exists",
                )));
            }
            if !load(&pod, settings).admits(settings, kind) {
                return Err(Refusal::Retry(Failure::psrpc(
                    "unavailable",
                    "not enough CPU",
                )));
            }
            let reported = reported_type(kind);
            pod.add_job(reported);
            let room = call
                .request
                .room_name()
                .and_then(|name| state.rooms.get(name));
            let info = starting_info(&call.request, &call.egress_id, room);
            state.started.push(StartedEgress {
                egress_id: call.egress_id.clone(),
                room_name: info.room_name.clone(),
                kind,
                request: call.request.clone(),
                node_id: node_id.to_owned(),
                requested_at: call.requested_at,
                started_at: Instant::now(),
                attempt,
                by_other,
            });
            match state.egress.get_mut(&call.egress_id) {
                // A second copy under the same ID: livekit-server's store already has it.
                Some(existing) => {
                    existing.node_ids.push(node_id.to_owned());
                    (info, false)
                }
                None => {
                    state.egress.insert(
                        call.egress_id.clone(),
                        Egress {
                            info: info.clone(),
                            node_ids: vec![node_id.to_owned()],
                            reported_type: reported,
                            orphaned: false,
                        },
                    );
                    (info, true)
                }
            }
        };
        if fresh {
            self.stored(&info);
        }
        Ok(info)
    }

    /// Another actor's start, placed at once as a start would place it.
    pub(super) fn start_by_other(
        self: &Arc<Self>,
        request: StartRequest,
    ) -> Option<proto::EgressInfo> {
        if let Some(room) = request.room_name()
            && !self.options.any_room_exists
            && !self.state().rooms.contains_key(room)
        {
            return None;
        }
        let bids = self.bids(request.kind());
        let winner = bids
            .iter()
            .find(|bid| bid.busy)
            .or_else(|| bids.first())?
            .node_id
            .clone();
        let call = StartCall {
            request,
            egress_id: new_id("EG"),
            requested_at: Instant::now(),
            slow: None,
        };
        self.admit(&winner, &call, 0, true).ok()
    }
}
