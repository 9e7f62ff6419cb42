//! The replica model of DESIGN.md section 4: queued demand + fleet snapshot + settings ->
//! desired egress replicas, with the reasons. Pure functions over plain structs, no I/O.
//!
//! CPU is counted in integer millicores so that "does this job fit" never depends on
//! floating-point rounding (3.2 cores - 0.5 is exactly 2.7 cores here).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One kind of egress job, as named in the cost table of DESIGN.md 2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressKind {
    RoomComposite,
    AudioRoomComposite,
    Web,
    AudioWeb,
    Participant,
    TrackComposite,
    Track,
}

impl EgressKind {
    /// Every kind, in the order of the cost table.
    pub const ALL: [EgressKind; 7] = [
        EgressKind::RoomComposite,
        EgressKind::AudioRoomComposite,
        EgressKind::Web,
        EgressKind::AudioWeb,
        EgressKind::Participant,
        EgressKind::TrackComposite,
        EgressKind::Track,
    ];

    /// The snake_case name used in flags, JSON, Redis and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressKind::RoomComposite => "room_composite",
            EgressKind::AudioRoomComposite => "audio_room_composite",
            EgressKind::Web => "web",
            EgressKind::AudioWeb => "audio_web",
            EgressKind::Participant => "participant",
            EgressKind::TrackComposite => "track_composite",
            EgressKind::Track => "track",
        }
    }

    /// Video composites are what `livekit_egress_can_accept_request` speaks about.
    pub fn is_video_composite(self) -> bool {
        matches!(self, EgressKind::RoomComposite | EgressKind::Web)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EgressKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name given is not one of the kinds of DESIGN.md 2.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown egress kind {0:?} (expected one of room_composite, audio_room_composite, web, audio_web, participant, track_composite, track)"
)]
pub struct UnknownKind(pub String);

impl FromStr for EgressKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EgressKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// CPU in thousandths of a core.
pub type Millicores = u64;

/// Converts cores as written by operators (`0.5`) to millicores; `None` for negative,
/// non-finite or absurd values.
pub fn cores_to_millicores(cores: f64) -> Option<Millicores> {
    if cores.is_finite() && (0.0..=1_000_000.0).contains(&cores) {
        Some((cores * 1000.0).round() as Millicores)
    } else {
        None
    }
}

/// Cost of each egress kind, in millicores (the egress `cpu_cost` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CostTable([Millicores; 7]);

impl Default for CostTable {
    /// LiveKit egress defaults.
    fn default() -> Self {
        CostTable([4000, 1000, 4000, 1000, 2000, 1000, 500])
    }
}

impl CostTable {
    /// Cost of one job of this kind.
    pub fn cost(&self, kind: EgressKind) -> Millicores {
        self.0[kind.index()]
    }

    /// Overrides the cost of one kind.
    pub fn set(&mut self, kind: EgressKind, cost: Millicores) {
        self.0[kind.index()] = cost;
    }

    /// Cost of one running job as reported by `livekit_egress_requests{type}`. The metric does
    /// not tell audio from video composites, so it is charged as video (the safe side); types
    /// this table does not know (newer `template`, `media`) are charged as a room composite.
    pub fn cost_of_reported_type(&self, reported: &str) -> Millicores {
        match reported {
            "participant" => self.cost(EgressKind::Participant),
            "track_composite" => self.cost(EgressKind::TrackComposite),
            "track" => self.cost(EgressKind::Track),
            "web" => self.cost(EgressKind::Web),
            _ => self.cost(EgressKind::RoomComposite),
        }
    }
}

/// Everything the model needs to know about one egress deployment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// CPU limit of one egress pod.
    pub pod_cpu: Millicores,
    /// The egress `max_cpu_utilization`, 0 < u <= 1.
    pub max_cpu_utilization: f64,
    /// Cost of each job kind.
    pub costs: CostTable,
    /// Idle pods to keep on top of what the demand needs.
    pub warm_pool: u32,
    /// Lower clamp of the answer.
    pub min_replicas: u32,
    /// Upper clamp of the answer.
    pub max_replicas: u32,
    /// Whether to scale ahead of the arrival pattern ([`crate::prewarm`]).
    pub prewarm: Prewarm,
    /// How far ahead pre-warm looks: cold start + HPA sync + margin, ms.
    pub prewarm_lead_ms: u64,
}

/// Whether the model scales ahead of the arrival pattern ([`crate::prewarm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prewarm {
    /// Learn the pattern and scale ahead of it.
    Auto,
    /// Scale on queued work and the fleet only.
    #[default]
    Off,
}

impl Prewarm {
    /// The name in flags, metadata and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Prewarm::Auto => "auto",
            Prewarm::Off => "off",
        }
    }
}

impl fmt::Display for Prewarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Prewarm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Prewarm::Auto),
            "off" => Ok(Prewarm::Off),
            other => Err(format!("{other:?} is neither auto nor off")),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pod_cpu: 4000,
            max_cpu_utilization: 0.8,
            costs: CostTable::default(),
            warm_pool: 0,
            min_replicas: 0,
            max_replicas: 100,
            prewarm: Prewarm::Off,
            prewarm_lead_ms: 60_000,
        }
    }
}

impl Settings {
    /// CPU a busy pod may fill: `C * u`.
    pub fn busy_capacity(&self) -> Millicores {
        (self.pod_cpu as f64 * self.max_cpu_utilization).floor() as Millicores
    }
}

/// Queued jobs not yet started, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand(BTreeMap<EgressKind, u64>);

impl Demand {
    /// Demand from `(kind, count)` pairs; repeated kinds add up.
    pub fn from_counts(counts: impl IntoIterator<Item = (EgressKind, u64)>) -> Self {
        let mut demand = Demand::default();
        for (kind, count) in counts {
            demand.add(kind, count);
        }
        demand
    }

    /// Adds `count` jobs of `kind`.
    pub fn add(&mut self, kind: EgressKind, count: u64) {
        if count > 0 {
            *self.0.entry(kind).or_default() += count;
        }
    }

    /// Queued jobs of one kind.
    pub fn count(&self, kind: EgressKind) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }

    /// All queued jobs.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Non-zero counts by kind.
    pub fn iter(&self) -> impl Iterator<Item = (EgressKind, u64)> + '_ {
        self.0.iter().map(|(kind, count)| (*kind, *count))
    }
}

/// What the fleet knows of one pod (DESIGN.md 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// Scraped recently and taking jobs.
    Ready,
    /// Discovered but never scraped: it will be an idle pod.
    Starting,
    /// Counted, but no free capacity: its metrics fail beyond the grace, it never answered
    /// within the start grace, or it says it cannot reach livekit-server (`is_disabled`).
    Unknown,
    /// Draining after SIGTERM: neither capacity nor part of the desired count.
    Terminating,
    /// Never given a job (a `cluster_id` is set): neither capacity nor part of the desired
    /// count.
    Disabled,
}

impl PodState {
    /// Every state, for metrics and tables.
    pub const ALL: [PodState; 5] = [
        PodState::Ready,
        PodState::Starting,
        PodState::Unknown,
        PodState::Terminating,
        PodState::Disabled,
    ];

    /// The snake_case name used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Ready => "ready",
            PodState::Starting => "starting",
            PodState::Unknown => "unknown",
            PodState::Terminating => "terminating",
            PodState::Disabled => "disabled",
        }
    }
}

/// One egress pod as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pod {
    /// Where it was found (metrics URL or address); only for reasons and tables.
    pub name: String,
    /// Its state.
    pub state: PodState,
    /// Active egress by the `type` label of `livekit_egress_requests`.
    pub active: BTreeMap<String, u64>,
    /// `livekit_egress_can_accept_request`, when the pod reports it.
    pub can_accept_video: Option<bool>,
    /// `livekit_node_cpu_load` (0..1), when the pod reports it: its measured CPU.
    pub cpu_load: Option<f64>,
}

impl Pod {
    /// A pod in `state` with no active egress.
    pub fn new(name: impl Into<String>, state: PodState) -> Self {
        Pod {
            name: name.into(),
            state,
            active: BTreeMap::new(),
            can_accept_video: None,
            cpu_load: None,
        }
    }

    /// Sets the measured CPU load, 0..1 (builder style, for tests and stand-ins).
    pub fn with_cpu_load(mut self, load: f64) -> Self {
        self.cpu_load = Some(load);
        self
    }

    /// Adds `count` active egress of a reported type (builder style, for tests and stand-ins).
    pub fn with_active(mut self, reported_type: &str, count: u64) -> Self {
        *self.active.entry(reported_type.to_owned()).or_default() += count;
        self
    }

    /// Active egress of every type.
    pub fn active_total(&self) -> u64 {
        self.active.values().sum()
    }

    /// CPU its running jobs cost.
    pub fn used_cpu(&self, costs: &CostTable) -> Millicores {
        self.active
            .iter()
            .map(|(reported, count)| costs.cost_of_reported_type(reported) * count)
            .sum()
    }

    /// CPU its running jobs use as far as the pod's admission can count it: their cost, or
    /// the measured CPU (`livekit_node_cpu_load x C`) when that is larger. egress admits on
    /// the larger of a job's reservation and its measured CPU, and the reservation lapses
    /// after 15 s (FIDELITY.md 4): a pod whose jobs measure above their cost takes less than
    /// the cost arithmetic says. One that measures below takes more than it says, which is
    /// left unused here (the safe side: at worst a pod too many). An idle pod's load is never
    /// counted, as egress admits on its whole CPU then.
    pub fn used_cpu_measured(&self, settings: &Settings) -> Millicores {
        let cost = self.used_cpu(&settings.costs);
        if self.active_total() == 0 {
            return cost;
        }
        match self.cpu_load.filter(|load| load.is_finite()) {
            Some(load) => {
                cost.max((load.clamp(0.0, 1.0) * settings.pod_cpu as f64).round() as Millicores)
            }
            None => cost,
        }
    }
}

/// The egress pods observed at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FleetSnapshot {
    /// Every pod known, in any state. No pods means zero capacity.
    pub pods: Vec<Pod>,
}

/// Why the answer was clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    /// Raised to `min_replicas`.
    Min,
    /// Lowered to `max_replicas`.
    Max,
}

/// The desired replica count and the arithmetic behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Replicas wanted, after the clamp.
    pub desired: u32,
    /// Replicas wanted before the clamp.
    pub unclamped: u64,
    /// Ready pods already running egress.
    pub busy_pods: u64,
    /// Idle or starting pods that the queued jobs were placed on.
    pub idle_pods_used: u64,
    /// Idle or starting pods left without a job (not part of the count).
    pub idle_pods_spare: u64,
    /// Pods to add for the queued jobs that fit nowhere else.
    pub new_pods: u64,
    /// Pods whose metrics fail: counted, no capacity.
    pub unknown_pods: u64,
    /// Terminating or disabled pods: ignored.
    pub draining_pods: u64,
    /// The warm pool added on top.
    pub warm_pool: u64,
    /// Queued jobs taken into account.
    pub queued: u64,
    /// Queued jobs placed on pods that exist now.
    pub placed_on_existing: u64,
    /// Queued jobs costing more than a whole pod: never runnable, not scaled for.
    pub unschedulable: BTreeMap<EgressKind, u64>,
    /// Set when the min/max clamp changed the answer.
    pub clamp: Option<Clamp>,
    /// Starts the fleet snapshot does not show yet, counted on the pods they went to.
    pub unseen_starts: u64,
    /// Of those, starts no pod of the snapshot admits: the snapshot already shows them (or
    /// a job that has ended since), so they are not counted twice.
    pub unseen_starts_unplaced: u64,
    /// Pods added ahead of the arrivals the pattern expects ([`crate::prewarm`]).
    pub prewarm_pods: u64,
    /// The patterns pre-warm acted on, as sentences.
    pub prewarm_patterns: Vec<String>,
}

impl Decision {
    /// `IsActive`: the deployment should have at least one pod.
    pub fn is_active(&self) -> bool {
        self.desired > 0
    }

    /// Human sentences explaining the count, for `status` and logs.
    pub fn reasons(&self, settings: &Settings) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.busy_pods > 0 {
            reasons.push(format!("{} busy pod(s) running egress", self.busy_pods));
        }
        let placed = self.unseen_starts - self.unseen_starts_unplaced;
        if placed > 0 {
            reasons.push(format!(
                "{placed} start(s) not yet in the fleet metrics counted on the pods they went to"
            ));
        }
        if self.queued > 0 {
            reasons.push(format!(
                "{} queued job(s): {} placed on existing pods ({} idle pod(s) taken), {} need {} new pod(s)",
                self.queued,
                self.placed_on_existing,
                self.idle_pods_used,
                self.queued
                    - self.placed_on_existing
                    - self.unschedulable.values().sum::<u64>(),
                self.new_pods
            ));
        }
        if self.unknown_pods > 0 {
            reasons.push(format!(
                "{} pod(s) with failing metrics kept as they are",
                self.unknown_pods
            ));
        }
        if self.warm_pool > 0 {
            reasons.push(format!("warm pool of {}", self.warm_pool));
        }
        if self.prewarm_pods > 0 {
            reasons.push(format!(
                "pre-warm: {} pod(s) for {}",
                self.prewarm_pods,
                self.prewarm_patterns.join("; ")
            ));
        }
        for (kind, count) in &self.unschedulable {
            reasons.push(format!(
                "{count} {kind} job(s) cost {} cores, more than a pod's {} cores: unschedulable, not scaled for",
                settings.costs.cost(*kind) as f64 / 1000.0,
                settings.pod_cpu as f64 / 1000.0
            ));
        }
        match self.clamp {
            Some(Clamp::Min) => reasons.push(format!(
                "raised from {} to min replicas {}",
                self.unclamped, settings.min_replicas
            )),
            Some(Clamp::Max) => reasons.push(format!(
                "lowered from {} to max replicas {}",
                self.unclamped, settings.max_replicas
            )),
            None => {}
        }
        if reasons.is_empty() {
            reasons.push("nothing queued, no busy pods, no warm pool".to_owned());
        }
        reasons
    }
}

/// A group of identical pods during placement: `count` pods with `free` millicores each.
#[derive(Debug, Clone, Copy)]
struct Slots {
    free: i64,
    count: u64,
    video_ok: bool,
    /// A pod that does not exist yet.
    new: bool,
}

/// Computes the desired replica count (DESIGN.md 4).
///
/// Jobs are placed largest cost first; each goes to the busy pod with the least free capacity
/// that fits, else to an idle or starting pod, else to a new pod. Identical jobs are placed a
/// kind at a time and identical pods are kept as groups, so the work is O(kinds x pods) and
/// does not grow with the queue depth.
pub fn decide(settings: &Settings, demand: &Demand, fleet: &FleetSnapshot) -> Decision {
    let capacity = settings.busy_capacity() as i64;
    let pod_cpu = settings.pod_cpu as i64;

    let mut busy: Vec<Slots> = Vec::new();
    let mut idle: Vec<Slots> = Vec::new();
    let mut unknown_pods = 0u64;
    let mut draining_pods = 0u64;
    for pod in &fleet.pods {
        let video_ok = pod.can_accept_video != Some(false);
        match pod.state {
            PodState::Terminating | PodState::Disabled => draining_pods += 1,
            PodState::Unknown => unknown_pods += 1,
            PodState::Ready if pod.active_total() > 0 => busy.push(Slots {
                free: capacity - pod.used_cpu_measured(settings) as i64,
                count: 1,
                video_ok,
                new: false,
            }),
            PodState::Ready | PodState::Starting => idle.push(Slots {
                free: capacity,
                count: 1,
                video_ok,
                new: false,
            }),
        }
    }
    let busy_pods = busy.len() as u64;

    let mut kinds: Vec<(EgressKind, u64)> = demand.iter().collect();
    // Largest cost first; ties in the fixed kind order so the answer is deterministic.
    kinds.sort_by_key(|(kind, _)| (std::cmp::Reverse(settings.costs.cost(*kind)), *kind));

    let mut unschedulable = BTreeMap::new();
    let mut placed_on_existing = 0u64;
    let mut idle_pods_used = 0u64;
    let mut new_pods = 0u64;
    for (kind, count) in kinds {
        let cost = settings.costs.cost(kind) as i64;
        if cost > pod_cpu {
            unschedulable.insert(kind, count);
            continue;
        }
        let video = kind.is_video_composite();
        let mut left = count;

        // Busy pods, least free capacity first (best fit).
        busy.sort_by_key(|slots| slots.free);
        let mut filled = Vec::new();
        for slots in busy.iter_mut() {
            if left == 0 {
                break;
            }
            if video && !slots.video_ok {
                continue;
            }
            let per_pod = if cost == 0 {
                u64::MAX
            } else {
                (slots.free / cost).max(0) as u64
            };
            let taken = fill(slots, per_pod, cost, &mut left, &mut filled);
            if !slots.new {
                placed_on_existing += taken;
            }
        }
        busy.append(&mut filled);

        // Idle or starting pods: the first job is admitted on the idle rule (cost <= C).
        let per_fresh_pod = if cost == 0 {
            u64::MAX
        } else {
            1 + ((capacity - cost).max(0) / cost) as u64
        };
        let mut still_idle = Vec::new();
        for mut slots in idle.drain(..) {
            if left == 0 || (video && !slots.video_ok) {
                still_idle.push(slots);
                continue;
            }
            let pods_before = slots.count;
            let mut now_busy = Vec::new();
            let taken = fill(&mut slots, per_fresh_pod, cost, &mut left, &mut now_busy);
            placed_on_existing += taken;
            idle_pods_used += pods_before - slots.count;
            busy.append(&mut now_busy);
            if slots.count > 0 {
                still_idle.push(slots);
            }
        }
        idle = still_idle;

        // New pods for the rest.
        if left > 0 {
            let pods = left.div_ceil(per_fresh_pod);
            new_pods += pods;
            let mut fresh = Slots {
                free: capacity,
                count: pods,
                video_ok: true,
                new: true,
            };
            fill(&mut fresh, per_fresh_pod, cost, &mut left, &mut busy);
        }
    }

    let idle_pods_spare: u64 = idle.iter().map(|slots| slots.count).sum();
    let warm_pool = u64::from(settings.warm_pool);
    let unclamped = busy_pods + idle_pods_used + new_pods + unknown_pods + warm_pool;
    let (desired, clamp) = clamp(settings, unclamped);
    Decision {
        desired,
        unclamped,
        busy_pods,
        idle_pods_used,
        idle_pods_spare,
        new_pods,
        unknown_pods,
        draining_pods,
        warm_pool,
        queued: demand.total(),
        placed_on_existing,
        unschedulable,
        clamp,
        unseen_starts: 0,
        unseen_starts_unplaced: 0,
        prewarm_pods: 0,
        prewarm_patterns: Vec::new(),
    }
}

/// The count within `[min, max]`, and which clamp changed it.
pub fn clamp(settings: &Settings, unclamped: u64) -> (u32, Option<Clamp>) {
    if unclamped < u64::from(settings.min_replicas) {
        (settings.min_replicas, Some(Clamp::Min))
    } else if unclamped > u64::from(settings.max_replicas) {
        (settings.max_replicas, Some(Clamp::Max))
    } else {
        (unclamped as u32, None)
    }
}

/// The fleet with the starts it does not show yet (DESIGN.md 4): each start, oldest first,
/// occupies its cost on the pod livekit-server would have given it ([`choose_pod`] over the
/// loads, earlier starts included), as that pod's metrics will show it at the next refresh.
/// Returns the fleet and how many starts no pod admits: those are not counted (the snapshot
/// then shows the job already, or is behind on one that ended), as the dispatcher does.
pub fn with_unseen_starts(
    settings: &Settings,
    fleet: &FleetSnapshot,
    starts: &[EgressKind],
) -> (FleetSnapshot, u64) {
    let mut fleet = fleet.clone();
    let mut loads: Vec<PodLoad> = fleet
        .pods
        .iter()
        .map(|pod| PodLoad::of(pod, &settings.costs))
        .collect();
    let mut unplaced = 0;
    for &kind in starts {
        match choose_pod(settings, &loads, kind) {
            Some(index) => {
                let pod = &mut fleet.pods[index];
                *pod.active
                    .entry(reported_type(kind).to_owned())
                    .or_default() += 1;
                loads[index] = PodLoad::of(pod, &settings.costs);
            }
            None => unplaced += 1,
        }
    }
    (fleet, unplaced)
}

/// [`decide`] over the fleet with the starts it does not show yet ([`with_unseen_starts`]),
/// so that desired does not dip between a start and the refresh that shows it.
pub fn decide_with_unseen_starts(
    settings: &Settings,
    demand: &Demand,
    fleet: &FleetSnapshot,
    starts: &[EgressKind],
) -> Decision {
    if starts.is_empty() {
        return decide(settings, demand, fleet);
    }
    let (fleet, unplaced) = with_unseen_starts(settings, fleet, starts);
    let mut decision = decide(settings, demand, &fleet);
    decision.unseen_starts = starts.len() as u64;
    decision.unseen_starts_unplaced = unplaced;
    decision
}

/// The type label `livekit_egress_requests` gives a job of `kind` on the pod.
pub fn reported_type(kind: EgressKind) -> &'static str {
    match kind {
        EgressKind::RoomComposite | EgressKind::AudioRoomComposite => "room_composite",
        EgressKind::Web | EgressKind::AudioWeb => "web",
        EgressKind::Participant => "participant",
        EgressKind::TrackComposite => "track_composite",
        EgressKind::Track => "track",
    }
}

/// What one pod can still take: its metrics plus the jobs started on it since they were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLoad {
    /// Only a ready pod takes jobs (a starting pod may not have joined livekit-server yet).
    pub ready: bool,
    /// Jobs running on it.
    pub jobs: u64,
    /// CPU those jobs cost.
    pub used: Millicores,
    /// False when the pod says it cannot take a video composite now.
    pub video_ok: bool,
}

impl PodLoad {
    /// The load of a pod as observed, by the cost arithmetic alone.
    pub fn of(pod: &Pod, costs: &CostTable) -> Self {
        PodLoad {
            ready: pod.state == PodState::Ready,
            jobs: pod.active_total(),
            used: pod.used_cpu(costs),
            video_ok: pod.can_accept_video != Some(false),
        }
    }

    /// The load of a pod as observed, its measured CPU counted as the pod's admission counts
    /// it ([`Pod::used_cpu_measured`]).
    pub fn observed(pod: &Pod, settings: &Settings) -> Self {
        PodLoad {
            used: pod.used_cpu_measured(settings),
            ..PodLoad::of(pod, &settings.costs)
        }
    }

    /// DESIGN.md 2.1 admission: an idle pod takes any job costing at most its CPU; a busy pod
    /// takes a job when `C * u - used >= cost`.
    pub fn admits(&self, settings: &Settings, kind: EgressKind) -> bool {
        if !self.ready || (kind.is_video_composite() && !self.video_ok) {
            return false;
        }
        let cost = settings.costs.cost(kind);
        if self.jobs == 0 {
            cost <= settings.pod_cpu
        } else {
            self.used.saturating_add(cost) <= settings.busy_capacity()
        }
    }

    /// Counts one more job of `kind` on the pod.
    pub fn add(&mut self, settings: &Settings, kind: EgressKind) {
        self.jobs += 1;
        self.used = self.used.saturating_add(settings.costs.cost(kind));
    }
}

/// The pod livekit-server gives a job of `kind`, as far as the arithmetic can tell: among the
/// pods that admit it, a busy one (affinity 1) before an idle one (0.5); among busy pods the
/// fullest, so that jobs are packed; among idle pods the first. `None` when no pod admits it.
pub fn choose_pod(settings: &Settings, pods: &[PodLoad], kind: EgressKind) -> Option<usize> {
    let admitting = pods
        .iter()
        .enumerate()
        .filter(|(_, pod)| pod.admits(settings, kind));
    let busy = admitting
        .clone()
        .filter(|(_, pod)| pod.jobs > 0)
        .max_by_key(|(index, pod)| (pod.used, std::cmp::Reverse(*index)));
    busy.or_else(|| admitting.clone().next())
        .map(|(index, _)| index)
}

/// Places up to `per_pod` jobs of `cost` on each pod of the group, taking them from `left`.
/// Pods that received jobs are split off into `filled` (as busy pods); the group keeps the
/// pods that received none. Returns the number of jobs placed.
fn fill(
    slots: &mut Slots,
    per_pod: u64,
    cost: i64,
    left: &mut u64,
    filled: &mut Vec<Slots>,
) -> u64 {
    if per_pod == 0 || slots.count == 0 || *left == 0 {
        return 0;
    }
    let full_pods = (*left / per_pod).min(slots.count);
    let mut taken = full_pods * per_pod;
    if full_pods > 0 {
        filled.push(Slots {
            free: slots.free - cost.saturating_mul(per_pod.min(i64::MAX as u64) as i64),
            count: full_pods,
            ..*slots
        });
        slots.count -= full_pods;
    }
    let rest = *left - taken;
    if rest > 0 && slots.count > 0 {
        filled.push(Slots {
            free: slots.free - cost * rest as i64,
            count: 1,
            ..*slots
        });
        slots.count -= 1;
        taken += rest;
    }
    *left -= taken;
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(counts: &[(EgressKind, u64)]) -> Demand {
        Demand::from_counts(counts.iter().copied())
    }

    fn desired(demand: &Demand, fleet: &FleetSnapshot) -> u32 {
        decide(&Settings::default(), demand, fleet).desired
    }

    use EgressKind::*;

    #[test]
    fn measured_cpu_above_the_cost_counts_as_the_pod_admission_counts_it() {
        let settings = Settings::default();
        // Four tracks cost 2 cores but measure 3.0: a track composite (1) no longer fits.
        let hot = Pod::new("hot", PodState::Ready)
            .with_active("track", 4)
            .with_cpu_load(0.75);
        assert_eq!(hot.used_cpu(&settings.costs), 2000);
        assert_eq!(hot.used_cpu_measured(&settings), 3000);
        let fleet = FleetSnapshot { pods: vec![hot] };
        let one = demand(&[(TrackComposite, 1)]);
        assert_eq!(decide(&settings, &one, &fleet).new_pods, 1);
        let load = PodLoad::observed(&fleet.pods[0], &settings);
        assert!(!load.admits(&settings, TrackComposite));
        assert!(PodLoad::of(&fleet.pods[0], &settings.costs).admits(&settings, TrackComposite));

        // Measured below the cost: the cost stands (the safe side).
        let cool = Pod::new("cool", PodState::Ready)
            .with_active("track", 4)
            .with_cpu_load(0.1);
        assert_eq!(cool.used_cpu_measured(&settings), 2000);
        let fleet = FleetSnapshot { pods: vec![cool] };
        assert_eq!(decide(&settings, &one, &fleet).new_pods, 0);

        // An idle pod's load is not counted: egress admits on its whole CPU then.
        let idle = Pod::new("idle", PodState::Ready).with_cpu_load(0.9);
        assert_eq!(idle.used_cpu_measured(&settings), 0);
    }

    #[test]
    fn admission_follows_design_2_1() {
        let settings = Settings::default();
        let idle = PodLoad {
            ready: true,
            jobs: 0,
            used: 0,
            video_ok: true,
        };
        assert!(idle.admits(&settings, RoomComposite));
        let mut one_composite = idle.clone();
        one_composite.add(&settings, RoomComposite);
        // 3.2 - 4 < 4, and 3.2 - 4 < 0.5: a 4-core pod runs exactly one video composite.
        assert!(!one_composite.admits(&settings, RoomComposite));
        assert!(!one_composite.admits(&settings, Track));
        let mut tracks = idle.clone();
        for _ in 0..6 {
            assert!(tracks.admits(&settings, Track));
            tracks.add(&settings, Track);
        }
        assert!(!tracks.admits(&settings, Track), "6 x 0.5 + 0.5 > 3.2");
        let big = Settings {
            costs: {
                let mut costs = CostTable::default();
                costs.set(RoomComposite, 5000);
                costs
            },
            ..Settings::default()
        };
        assert!(!idle.admits(&big, RoomComposite), "more than the whole pod");
        let no_video = PodLoad {
            video_ok: false,
            ..idle.clone()
        };
        assert!(!no_video.admits(&settings, Web));
        assert!(no_video.admits(&settings, AudioWeb));
        let starting = PodLoad {
            ready: false,
            ..idle
        };
        assert!(!starting.admits(&settings, Track));
    }

    #[test]
    fn the_fullest_busy_pod_is_chosen_before_an_idle_one() {
        let settings = Settings::default();
        let load = |jobs, used| PodLoad {
            ready: true,
            jobs,
            used,
            video_ok: true,
        };
        let pods = [load(0, 0), load(1, 500), load(2, 2000), load(1, 3000)];
        assert_eq!(choose_pod(&settings, &pods, Track), Some(2));
        assert_eq!(choose_pod(&settings, &pods, RoomComposite), Some(0));
        assert_eq!(choose_pod(&settings, &pods, Participant), Some(1));
        assert_eq!(choose_pod(&settings, &pods[3..], RoomComposite), None);
        assert_eq!(reported_type(AudioRoomComposite), "room_composite");
        assert_eq!(reported_type(AudioWeb), "web");
    }

    #[test]
    fn three_room_composites_and_no_pods_need_three() {
        assert_eq!(
            desired(&demand(&[(RoomComposite, 3)]), &FleetSnapshot::default()),
            3
        );
    }

    #[test]
    fn thirteen_tracks_fit_six_to_a_pod() {
        let decision = decide(
            &Settings::default(),
            &demand(&[(Track, 13)]),
            &FleetSnapshot::default(),
        );
        assert_eq!(decision.desired, 3);
        assert_eq!(decision.new_pods, 3);
        assert_eq!(
            desired(&demand(&[(Track, 12)]), &FleetSnapshot::default()),
            2
        );
        assert_eq!(
            desired(&demand(&[(Track, 6)]), &FleetSnapshot::default()),
            1
        );
        assert_eq!(
            desired(&demand(&[(Track, 7)]), &FleetSnapshot::default()),
            2
        );
    }

    #[test]
    fn a_room_composite_fills_its_pod_so_tracks_need_another() {
        assert_eq!(
            desired(
                &demand(&[(RoomComposite, 1), (Track, 2)]),
                &FleetSnapshot::default()
            ),
            2
        );
    }

    #[test]
    fn a_job_larger_than_a_pod_is_unschedulable() {
        let mut settings = Settings::default();
        settings.costs.set(Participant, 6000);
        let decision = decide(
            &settings,
            &demand(&[(Participant, 2), (Track, 1)]),
            &FleetSnapshot::default(),
        );
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.unschedulable.get(&Participant), Some(&2));
        assert!(
            decision
                .reasons(&settings)
                .iter()
                .any(|r| r.contains("unschedulable"))
        );
    }

    #[test]
    fn warm_pool_alone_keeps_one_pod() {
        let settings = Settings {
            warm_pool: 1,
            ..Settings::default()
        };
        let decision = decide(&settings, &Demand::default(), &FleetSnapshot::default());
        assert_eq!(decision.desired, 1);
        assert!(decision.is_active());
    }

    #[test]
    fn nothing_at_all_is_inactive() {
        let decision = decide(
            &Settings::default(),
            &Demand::default(),
            &FleetSnapshot::default(),
        );
        assert_eq!(decision.desired, 0);
        assert!(!decision.is_active());
    }

    #[test]
    fn idle_pods_take_queued_jobs_before_new_pods() {
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("a", PodState::Ready),
                Pod::new("b", PodState::Ready),
            ],
        };
        let decision = decide(&Settings::default(), &demand(&[(RoomComposite, 1)]), &fleet);
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.idle_pods_used, 1);
        assert_eq!(decision.idle_pods_spare, 1);
        assert_eq!(decision.new_pods, 0);
    }

    #[test]
    fn busy_pod_plus_idle_pod_take_one_more_composite() {
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("busy", PodState::Ready).with_active("room_composite", 1),
                Pod::new("idle", PodState::Ready),
            ],
        };
        assert_eq!(desired(&demand(&[(RoomComposite, 1)]), &fleet), 2);
    }

    #[test]
    fn busy_pod_with_room_takes_small_jobs_best_fit() {
        // Pod a has 2.7 cores free, pod b 1.2: a track goes to b (least free that fits).
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("a", PodState::Ready).with_active("track", 1),
                Pod::new("b", PodState::Ready).with_active("participant", 1),
            ],
        };
        let decision = decide(&Settings::default(), &demand(&[(Track, 2)]), &fleet);
        assert_eq!(decision.desired, 2);
        assert_eq!(decision.placed_on_existing, 2);
        // 1.2 free on b holds 2 tracks, 2.7 free on a holds 5: 7 tracks fit without a new pod.
        assert_eq!(desired(&demand(&[(Track, 7)]), &fleet), 2);
        assert_eq!(desired(&demand(&[(Track, 8)]), &fleet), 3);
    }

    #[test]
    fn starting_pods_count_as_capacity() {
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("new-1", PodState::Starting),
                Pod::new("new-2", PodState::Starting),
            ],
        };
        assert_eq!(desired(&demand(&[(RoomComposite, 3)]), &fleet), 3);
        assert_eq!(desired(&demand(&[(RoomComposite, 2)]), &fleet), 2);
    }

    #[test]
    fn terminating_and_disabled_pods_are_ignored() {
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("t", PodState::Terminating).with_active("room_composite", 1),
                Pod::new("d", PodState::Disabled),
            ],
        };
        let decision = decide(&Settings::default(), &demand(&[(RoomComposite, 1)]), &fleet);
        assert_eq!(decision.desired, 1);
        assert_eq!(decision.draining_pods, 2);
    }

    #[test]
    fn unknown_pods_are_kept_without_capacity() {
        let fleet = FleetSnapshot {
            pods: vec![Pod::new("lost", PodState::Unknown)],
        };
        assert_eq!(desired(&Demand::default(), &fleet), 1);
        assert_eq!(desired(&demand(&[(Track, 1)]), &fleet), 2);
    }

    #[test]
    fn pod_refusing_video_gets_no_composite() {
        let mut refusing = Pod::new("a", PodState::Ready).with_active("track", 1);
        refusing.can_accept_video = Some(false);
        let fleet = FleetSnapshot {
            pods: vec![refusing],
        };
        let mut settings = Settings::default();
        settings.costs.set(RoomComposite, 2000);
        // By arithmetic 2.7 cores are free, but the pod says no to video composites.
        assert_eq!(
            decide(&settings, &demand(&[(RoomComposite, 1)]), &fleet).desired,
            2
        );
        assert_eq!(
            decide(&settings, &demand(&[(Participant, 1)]), &fleet).desired,
            1
        );
    }

    #[test]
    fn clamps_are_reported() {
        let settings = Settings {
            min_replicas: 2,
            max_replicas: 4,
            ..Settings::default()
        };
        let low = decide(&settings, &Demand::default(), &FleetSnapshot::default());
        assert_eq!((low.desired, low.clamp), (2, Some(Clamp::Min)));
        let high = decide(
            &settings,
            &demand(&[(RoomComposite, 9)]),
            &FleetSnapshot::default(),
        );
        assert_eq!(
            (high.desired, high.unclamped, high.clamp),
            (4, 9, Some(Clamp::Max))
        );
    }

    #[test]
    fn a_hundred_thousand_jobs_are_placed_without_iterating_them() {
        let decision = decide(
            &Settings::default(),
            &demand(&[(Track, 100_000), (RoomComposite, 100_000), (Participant, 1)]),
            &FleetSnapshot::default(),
        );
        assert_eq!(decision.new_pods, 100_000 + 1 + 16_667);
    }

    #[test]
    fn unseen_starts_go_where_livekit_would_put_them_and_are_not_counted_twice() {
        let settings = Settings::default();
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("idle", PodState::Ready),
                Pod::new("tracks", PodState::Ready).with_active("track", 2),
                Pod::new("starting", PodState::Starting),
            ],
        };
        // Nothing queued: without the starts the idle pod is spare and desired is 1.
        assert_eq!(desired(&Demand::default(), &fleet), 1);
        // A track joins the busy pod (affinity 1), a composite takes the idle pod.
        let starts = [Track, RoomComposite];
        let (seen, unplaced) = with_unseen_starts(&settings, &fleet, &starts);
        assert_eq!(unplaced, 0);
        assert_eq!(seen.pods[0].active.get("room_composite"), Some(&1));
        assert_eq!(seen.pods[1].active.get("track"), Some(&3));
        let decision = decide_with_unseen_starts(&settings, &Demand::default(), &fleet, &starts);
        assert_eq!((decision.desired, decision.busy_pods), (2, 2));
        assert_eq!(decision.unseen_starts, 2);
        assert!(
            decision.reasons(&settings)[1].starts_with("2 start(s) not yet in the fleet metrics")
        );
        // A start no ready pod admits is the snapshot showing it already: not counted again.
        let full = FleetSnapshot {
            pods: vec![Pod::new("full", PodState::Ready).with_active("room_composite", 1)],
        };
        let decision =
            decide_with_unseen_starts(&settings, &Demand::default(), &full, &[RoomComposite]);
        assert_eq!((decision.desired, decision.unseen_starts_unplaced), (1, 1));
        // An audio composite (1 core) fits the busy pod, and shows there as the pod's metrics
        // will show it: as a room_composite.
        let (seen, _) = with_unseen_starts(&settings, &fleet, &[AudioRoomComposite]);
        assert_eq!(seen.pods[1].active.get("room_composite"), Some(&1));
        assert_eq!(seen.pods[0].active_total(), 0);
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for kind in EgressKind::ALL {
            assert_eq!(kind.as_str().parse::<EgressKind>(), Ok(kind));
        }
        assert!("video".parse::<EgressKind>().is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const TYPES: [&str; 6] = [
            "room_composite",
            "web",
            "participant",
            "track_composite",
            "track",
            "template",
        ];

        fn kind() -> impl Strategy<Value = EgressKind> {
            (0..EgressKind::ALL.len()).prop_map(|i| EgressKind::ALL[i])
        }

        fn demand() -> impl Strategy<Value = Demand> {
            prop::collection::vec((kind(), 0u64..40), 0..6).prop_map(Demand::from_counts)
        }

        fn pod() -> impl Strategy<Value = Pod> {
            let state = (0..PodState::ALL.len()).prop_map(|i| PodState::ALL[i]);
            (
                state,
                prop::collection::vec((0..TYPES.len(), 0u64..4), 0..3),
                prop::option::of(any::<bool>()),
            )
                .prop_map(|(state, active, can_accept_video)| {
                    let mut pod = Pod::new("pod", state);
                    for (t, count) in active {
                        pod = pod.with_active(TYPES[t], count);
                    }
                    pod.can_accept_video = can_accept_video;
                    pod
                })
        }

        fn fleet() -> impl Strategy<Value = FleetSnapshot> {
            prop::collection::vec(pod(), 0..8).prop_map(|pods| FleetSnapshot { pods })
        }

        fn settings() -> impl Strategy<Value = Settings> {
            // Costs in quarter cores, as operators write them; some may exceed the pod.
            let costs = prop::collection::vec(1u64..=24, 7);
            (2u64..=16, 50u32..=100, costs, 0u32..3, 0u32..4, 0u32..60).prop_map(
                |(cpu, percent, costs, warm_pool, min, extra)| {
                    let mut table = CostTable::default();
                    for (kind, quarters) in EgressKind::ALL.into_iter().zip(costs) {
                        table.set(kind, quarters * 250);
                    }
                    Settings {
                        pod_cpu: cpu * 1000,
                        max_cpu_utilization: f64::from(percent) / 100.0,
                        costs: table,
                        warm_pool,
                        min_replicas: min,
                        max_replicas: min + extra,
                        ..Settings::default()
                    }
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn more_demand_never_wants_fewer_pods(
                settings in settings(), fleet in fleet(), base in demand(), more in demand()
            ) {
                let mut grown = base.clone();
                for (kind, count) in more.iter() {
                    grown.add(kind, count);
                }
                let before = decide(&settings, &base, &fleet);
                let after = decide(&settings, &grown, &fleet);
                prop_assert!(after.unclamped >= before.unclamped, "{before:?} -> {after:?}");
                prop_assert!(after.desired >= before.desired);
            }

            #[test]
            fn busy_and_unknown_pods_are_always_counted(
                settings in settings(), fleet in fleet(), demand in demand()
            ) {
                let decision = decide(&settings, &demand, &fleet);
                let kept = fleet.pods.iter().filter(|pod| {
                    pod.state == PodState::Unknown || (pod.state == PodState::Ready && pod.active_total() > 0)
                }).count() as u64;
                prop_assert!(decision.unclamped >= kept);
                prop_assert!(u64::from(decision.desired) >= kept.min(u64::from(settings.max_replicas)));
            }

            #[test]
            fn the_answer_stays_within_min_and_max(
                settings in settings(), fleet in fleet(), demand in demand()
            ) {
                let decision = decide(&settings, &demand, &fleet);
                prop_assert!(decision.desired >= settings.min_replicas);
                prop_assert!(decision.desired <= settings.max_replicas);
            }

            #[test]
            fn every_schedulable_job_is_placed(
                settings in settings(), fleet in fleet(), demand in demand()
            ) {
                let decision = decide(&settings, &demand, &fleet);
                let unschedulable: u64 = decision.unschedulable.values().sum();
                let on_new_pods = demand.total() - unschedulable - decision.placed_on_existing;
                prop_assert!(on_new_pods == 0 || decision.new_pods > 0);
                prop_assert!(decision.new_pods <= on_new_pods);
            }
        }
    }
}
