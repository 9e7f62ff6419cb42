//! A stand-in for one LiveKit egress pod (FIDELITY.md 4): its metrics endpoint, its admission
//! and its life.
//!
//! It serves, on any path, the metric text a Go Prometheus exporter writes for an egress pod:
//! HELP/TYPE lines, some Go runtime metrics, and the `livekit_*` series with `node_id` and
//! `cluster_id` labels. As in egress:
//! - `livekit_egress_available` is 1 exactly when no job runs, disabled or terminating alike;
//! - `livekit_egress_can_accept_request` is the admission of a synthetic video web job;
//! - `livekit_egress_is_disabled` is 1 while terminating and while livekit-server cannot be
//!   reached; after `unreachable_shutdown` of the latter the pod shuts itself down;
//! - `livekit_egress_requests{type}` has no series until the type's first job, then keeps it;
//! - admission counts each job at its reserved cost for `reservation_hold`, and at its measured
//!   CPU (`livekit_node_cpu_load x C`) when larger or once the reservation lapsed
//!   ([`EgressPodStandIn::admits`]);
//! - SIGTERM stops the bidding at once while the metrics keep answering, and the process exits
//!   once a drain poll finds no job left;
//! - every (re)start takes a new `node_id`, and a crash loses the jobs.
//!
//! A clonable handle also switches the endpoint between slow, garbage, oversized and down, and
//! can omit series like an older egress. Timings are [`EgressPodOptions`], the real ones by
//! default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::parse::{
    AVAILABLE, CAN_ACCEPT_REQUEST, CPU_LOAD, IS_DISABLED, IS_TERMINATING, REQUESTS,
};
use crate::model::{EgressKind, Millicores, Settings};

/// What the stand-in answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyMode {
    /// The egress metric text.
    Metrics,
    /// A 200 answer that is not metrics (binary bytes and HTML).
    Garbage,
    /// Valid metrics padded with comments to this many bytes, streamed without a length.
    Oversized(usize),
}

/// One series as the stand-in exports it (also what the Prometheus stand-in serves).
#[derive(Debug, Clone, PartialEq)]
pub struct StandInSample {
    /// Metric name.
    pub name: &'static str,
    /// Labels, sorted by name as a Go exporter writes them.
    pub labels: Vec<(&'static str, String)>,
    /// Value.
    pub value: f64,
}

/// The egress configuration and the timings of a stand-in pod (FIDELITY.md 4); the defaults
/// are the real egress's, tests shorten them.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressPodOptions {
    /// Its CPU (`C`), `max_cpu_utilization` and cost table.
    pub settings: Settings,
    /// How long a job's admission counts its reserved cost (egress `cpuHoldDuration`: 15 s);
    /// after it only the job's measured CPU counts.
    pub reservation_hold: Duration,
    /// How often a pod draining after SIGTERM checks whether its last job ended (1 s).
    pub drain_poll: Duration,
    /// How long a pod that cannot reach livekit-server keeps running before it shuts itself
    /// down (10 min).
    pub unreachable_shutdown: Duration,
}

impl Default for EgressPodOptions {
    fn default() -> Self {
        EgressPodOptions {
            settings: Settings::default(),
            reservation_hold: Duration::from_secs(15),
            drain_poll: Duration::from_secs(1),
            unreachable_shutdown: Duration::from_secs(600),
        }
    }
}

/// One running egress job.
#[derive(Debug, Clone)]
struct Job {
    /// Its `type` label in `livekit_egress_requests`.
    reported_type: String,
    /// The cost its admission reserved.
    cost: Millicores,
    /// When the pod accepted it; the reservation lapses `reservation_hold` later.
    started: Instant,
}

#[derive(Debug, Clone)]
struct Behaviour {
    /// This process's `node_id`: a new one on every start, as `NE_...` in egress.
    node_id: &'static str,
    jobs: Vec<Job>,
    /// Types that ran a job since the process started: their series stay, with 0, like a Go
    /// gauge vector; the others have no series at all.
    used_types: BTreeSet<String>,
    /// SIGTERM received (or a shutdown of its own): no new job, drain, exit.
    terminating: bool,
    /// Whether the pod exits once drained (SIGTERM), or only shows the flag (`set_terminating`).
    exits_when_drained: bool,
    /// Since when IOInfo updates to livekit-server fail.
    unreachable_since: Option<Instant>,
    /// The process ended (drained, or crashed); its endpoint is down.
    exited: bool,
    cpu_load: Option<f64>,
    cluster_id: String,
    delay: Duration,
    body: BodyMode,
    omitted: BTreeSet<String>,
}

impl Behaviour {
    fn new(node_id: &'static str) -> Self {
        Behaviour {
            node_id,
            jobs: Vec::new(),
            used_types: BTreeSet::new(),
            terminating: false,
            exits_when_drained: false,
            unreachable_since: None,
            exited: false,
            cpu_load: None,
            cluster_id: String::new(),
            delay: Duration::ZERO,
            body: BodyMode::Metrics,
            omitted: BTreeSet::new(),
        }
    }

    fn disabled(&self) -> bool {
        self.terminating || self.unreachable_since.is_some()
    }

    fn add(&mut self, reported_type: &str, cost: Millicores, at: Instant) {
        self.used_types.insert(reported_type.to_owned());
        self.jobs.push(Job {
            reported_type: reported_type.to_owned(),
            cost,
            started: at,
        });
    }

    fn count(&self, reported_type: &str) -> u64 {
        self.jobs
            .iter()
            .filter(|job| job.reported_type == reported_type)
            .count() as u64
    }

    /// Measured CPU of all jobs, millicores: `livekit_node_cpu_load x C` when the load is set,
    /// else the jobs' costs.
    fn measured_total(&self, settings: &Settings) -> Millicores {
        match self.cpu_load {
            Some(load) => (load.clamp(0.0, 1.0) * settings.pod_cpu as f64).round() as Millicores,
            None => self.jobs.iter().map(|job| job.cost).sum(),
        }
    }

    /// CPU the admission counts as used: each job at the larger of its reservation (while it
    /// holds) and its share of the measured CPU (shared in proportion to the costs).
    fn admission_used(&self, options: &EgressPodOptions, now: Instant) -> Millicores {
        let reserved: Millicores = self.jobs.iter().map(|job| job.cost).sum();
        let measured = self.measured_total(&options.settings);
        self.jobs
            .iter()
            .map(|job| {
                let share = if reserved == 0 {
                    measured / self.jobs.len() as Millicores
                } else {
                    (measured as u128 * job.cost as u128 / reserved as u128) as Millicores
                };
                if now.saturating_duration_since(job.started) < options.reservation_hold {
                    share.max(job.cost)
                } else {
                    share
                }
            })
            .sum()
    }

    /// The egress admission (FIDELITY.md 4): an idle pod takes any job costing at most its
    /// CPU; a busy one when `C * u - used >= cost`.
    fn fits(&self, options: &EgressPodOptions, cost: Millicores, now: Instant) -> bool {
        let settings = &options.settings;
        if self.jobs.is_empty() {
            cost <= settings.pod_cpu
        } else {
            self.admission_used(options, now).saturating_add(cost) <= settings.busy_capacity()
        }
    }
}

#[derive(Debug)]
struct Shared {
    options: EgressPodOptions,
    behaviour: Mutex<Behaviour>,
    scrapes: AtomicU64,
}

impl Shared {
    fn behaviour(&self) -> std::sync::MutexGuard<'_, Behaviour> {
        self.behaviour.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Server {
    stop: CancellationToken,
    task: JoinHandle<()>,
    listener_closed: oneshot::Receiver<()>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::sync::Mutex<Option<Server>>,
    /// Whether the endpoint listens now.
    serving: AtomicBool,
    /// Servers taken down while answering a slow request; aborted when the stand-in goes.
    retired: Mutex<Vec<JoinHandle<()>>>,
    /// The task that drains after SIGTERM and shuts the pod down when livekit-server stays
    /// unreachable.
    lifecycle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(server) = self.server.get_mut().take() {
            server.stop.cancel();
            server.task.abort();
        }
        for task in self
            .retired
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        if let Some(task) = self
            .lifecycle
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// A stand-in egress pod: its metrics endpoint, its admission and its life (start, SIGTERM and
/// drain, losing livekit-server, crash and restart). Clones are handles to the same pod. The
/// server stops when the last handle is dropped.
///
/// Like the real egress (FIDELITY.md 4): `livekit_egress_available` is 1 exactly when no job
/// runs (also when disabled or terminating); `livekit_egress_is_disabled` is 1 while
/// terminating or while livekit-server cannot be reached; `livekit_egress_requests{type}` has
/// no series until the type's first job; every (re)start takes a new `node_id`.
#[derive(Debug, Clone)]
pub struct EgressPodStandIn {
    inner: Arc<Inner>,
}

static NEXT_NODE: AtomicU64 = AtomicU64::new(1);

/// A fresh `node_id`. It is kept for the life of the process (a few bytes per start of a
/// stand-in), so that [`EgressPodStandIn::node_id`] hands out a plain `&str` that stays
/// valid across restarts, as callers that match jobs to pods expect.
fn new_node_id(port: u16) -> &'static str {
    let id = format!(
        "NE_standin{:04}_{}",
        NEXT_NODE.fetch_add(1, Ordering::Relaxed),
        port
    );
    Box::leak(id.into_boxed_str())
}

impl EgressPodStandIn {
    /// An idle stand-in with the default settings (4 cores, LiveKit costs) on 127.0.0.1.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Settings::default()).await
    }

    /// An idle stand-in listening on `addr` (port 0 picks one); `settings` give its CPU and
    /// cost table; the timings are the real egress's.
    pub async fn start_on(addr: SocketAddr, settings: Settings) -> io::Result<Self> {
        Self::start_with(
            addr,
            EgressPodOptions {
                settings,
                ..EgressPodOptions::default()
            },
        )
        .await
    }

    /// An idle stand-in listening on `addr` with these options.
    pub async fn start_with(addr: SocketAddr, options: EgressPodOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let poll = options.drain_poll.max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            options,
            behaviour: Mutex::new(Behaviour::new(new_node_id(addr.port()))),
            scrapes: AtomicU64::new(0),
        });
        let server = serve(listener, shared.clone());
        let inner = Arc::new(Inner {
            addr,
            shared,
            server: tokio::sync::Mutex::new(Some(server)),
            serving: AtomicBool::new(true),
            retired: Mutex::new(Vec::new()),
            lifecycle: Mutex::new(None),
        });
        let task = tokio::spawn(lifecycle(Arc::downgrade(&inner), poll));
        *inner.lifecycle.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(EgressPodStandIn { inner })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://ADDR/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.inner.addr)
    }

    /// Its current `node_id` label (a new one after each restart).
    pub fn node_id(&self) -> &str {
        self.inner.shared.behaviour().node_id
    }

    /// Requests answered so far (any mode).
    pub fn scrapes(&self) -> u64 {
        self.inner.shared.scrapes.load(Ordering::Relaxed)
    }

    /// Whether its metrics endpoint listens now.
    pub fn is_serving(&self) -> bool {
        self.inner.serving.load(Ordering::SeqCst)
    }

    /// Whether the process ended: drained after SIGTERM, shut itself down, or crashed.
    pub fn has_exited(&self) -> bool {
        self.inner.shared.behaviour().exited
    }

    fn update<T>(&self, change: impl FnOnce(&mut Behaviour) -> T) -> T {
        change(&mut self.inner.shared.behaviour())
    }

    fn options(&self) -> &EgressPodOptions {
        &self.inner.shared.options
    }

    /// No active egress (the types once used stay exported with 0).
    pub fn set_idle(&self) {
        self.update(|b| b.jobs.clear());
    }

    /// Sets the active egress count of one reported type (`room_composite`, `track`, ...),
    /// each charged its cost and counted as just started.
    pub fn set_active(&self, reported_type: &str, count: u64) {
        let cost = self
            .options()
            .settings
            .costs
            .cost_of_reported_type(reported_type);
        let now = Instant::now();
        self.update(|b| {
            b.jobs.retain(|job| job.reported_type != reported_type);
            for _ in 0..count {
                b.add(reported_type, cost, now);
            }
            b.used_types.insert(reported_type.to_owned());
        });
    }

    /// Replaces all active counts: busy with exactly these jobs.
    pub fn set_busy(&self, jobs: &[(&str, u64)]) {
        let costs = self.options().settings.costs;
        let now = Instant::now();
        self.update(|b| {
            b.jobs.clear();
            for (reported_type, count) in jobs {
                for _ in 0..*count {
                    b.add(
                        reported_type,
                        costs.cost_of_reported_type(reported_type),
                        now,
                    );
                }
                b.used_types.insert((*reported_type).to_owned());
            }
        });
    }

    /// One more active egress of a reported type (a job the livekit-server stand-in started),
    /// charged the cost of that type.
    pub fn add_job(&self, reported_type: &str) {
        let cost = self
            .options()
            .settings
            .costs
            .cost_of_reported_type(reported_type);
        self.update(|b| b.add(reported_type, cost, Instant::now()));
    }

    /// Starts a job of `kind` as the pod's `StartEgress` does, if [`Self::admits`] it: true
    /// when it runs now. Its reservation is the kind's own cost (an audio composite reserves
    /// 1 core, though it reports as `room_composite`).
    pub fn start_job(&self, kind: EgressKind) -> bool {
        let options = self.inner.shared.options.clone();
        let cost = options.settings.costs.cost(kind);
        let now = Instant::now();
        self.update(|b| {
            if !takes_jobs(b) || !b.fits(&options, cost, now) {
                return false;
            }
            b.add(crate::model::reported_type(kind), cost, now);
            true
        })
    }

    /// One active egress of a reported type less (its job ended); false when there was none.
    pub fn remove_job(&self, reported_type: &str) -> bool {
        self.update(|b| {
            match b
                .jobs
                .iter()
                .position(|job| job.reported_type == reported_type)
            {
                Some(index) => {
                    b.jobs.remove(index);
                    true
                }
                None => false,
            }
        })
    }

    /// Active egress by reported type, zero counts left out.
    pub fn active(&self) -> BTreeMap<String, u64> {
        let b = self.inner.shared.behaviour();
        let mut active = BTreeMap::new();
        for job in &b.jobs {
            *active.entry(job.reported_type.clone()).or_default() += 1;
        }
        active
    }

    /// Whether livekit-server would ask it to bid at all: running, not draining, reaching
    /// livekit-server, no `cluster_id`.
    pub fn takes_jobs(&self) -> bool {
        takes_jobs(&self.inner.shared.behaviour())
    }

    /// The real admission for a job of `kind` now (egress `StartEgressAffinity` and
    /// `AcceptRequest`): false when it takes no jobs (see [`Self::takes_jobs`]); an idle pod
    /// admits any job costing at most its CPU; a busy pod admits when `C * u` minus what its
    /// jobs use is at least the job's cost, where each job uses its reserved cost for the
    /// first `reservation_hold` and, at any time, its share of the measured CPU
    /// (`livekit_node_cpu_load x C`) when that is larger. So a pod whose jobs measure below
    /// their cost takes more once the reservations lapse.
    pub fn admits(&self, kind: EgressKind) -> bool {
        let options = &self.inner.shared.options;
        let b = self.inner.shared.behaviour();
        takes_jobs(&b) && b.fits(options, options.settings.costs.cost(kind), Instant::now())
    }

    /// The CPU and cost table it was started with.
    pub fn settings(&self) -> &Settings {
        &self.options().settings
    }

    /// SIGTERM (or SIGQUIT): it stops bidding at once (`is_terminating` and `is_disabled` 1)
    /// while its metrics keep answering, checks every `drain_poll` whether its last job ended,
    /// and then exits: the endpoint stops answering.
    pub fn sigterm(&self) {
        self.update(|b| {
            b.terminating = true;
            b.exits_when_drained = true;
        });
    }

    /// Sets or clears only the terminating flag (and with it `is_disabled`), without the exit
    /// that follows a drain: for callers that end the pod themselves, like the demo's
    /// Deployment. Use [`Self::sigterm`] for the whole of a SIGTERM.
    pub fn set_terminating(&self, terminating: bool) {
        self.update(|b| {
            b.terminating = terminating;
            if !terminating {
                b.exits_when_drained = false;
            }
        });
    }

    /// Whether livekit-server answers its IOInfo updates. While it does not, the pod says
    /// `is_disabled 1` and takes no job; after `unreachable_shutdown` of that it shuts itself
    /// down (as on SIGTERM: drain, then exit).
    pub fn set_livekit_reachable(&self, reachable: bool) {
        self.update(|b| {
            if reachable {
                b.unreachable_since = None;
            } else {
                b.unreachable_since.get_or_insert_with(Instant::now);
            }
        });
    }

    /// Reports this `livekit_node_cpu_load` (0..1) instead of the one derived from the jobs'
    /// costs; admission counts it as the jobs' measured CPU.
    pub fn set_cpu_load(&self, load: Option<f64>) {
        self.update(|b| b.cpu_load = load);
    }

    /// Sets the `cluster_id` label (empty by default).
    pub fn set_cluster_id(&self, cluster_id: &str) {
        self.update(|b| b.cluster_id = cluster_id.to_owned());
    }

    /// Waits this long before each answer (zero: answer at once).
    pub fn set_slow(&self, delay: Duration) {
        self.update(|b| b.delay = delay);
    }

    /// Chooses what the body is.
    pub fn set_body(&self, body: BodyMode) {
        self.update(|b| b.body = body);
    }

    /// Leaves these series out, like an older egress release (e.g.
    /// `livekit_egress_can_accept_request`); an empty list exports everything again.
    pub fn omit_series(&self, names: &[&str]) {
        self.update(|b| b.omitted = names.iter().map(|n| (*n).to_owned()).collect());
    }

    /// Stops listening, the process still alive (a network partition): new connections are
    /// refused and idle kept-alive ones are closed.
    pub async fn go_down(&self) {
        let Some(server) = self.inner.server.lock().await.take() else {
            return;
        };
        self.inner.serving.store(false, Ordering::SeqCst);
        server.stop.cancel();
        // Resolves (with an error) once the listener has been dropped.
        let _ = server.listener_closed.await;
        self.inner
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server.task);
    }

    /// Listens again on the same address after [`EgressPodStandIn::go_down`], as the same
    /// process; a pod whose process ended comes back restarted (see [`Self::restart`]).
    pub async fn come_back(&self) -> io::Result<()> {
        if self.has_exited() {
            return self.restart().await;
        }
        self.listen().await
    }

    async fn listen(&self) -> io::Result<()> {
        let mut server = self.inner.server.lock().await;
        if server.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.inner.addr).await?;
        *server = Some(serve(listener, self.inner.shared.clone()));
        self.inner.serving.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The process dies at once (SIGKILL, OOM, a crash): the endpoint stops answering and its
    /// jobs are gone.
    pub async fn crash(&self) {
        self.update(|b| {
            b.exited = true;
            b.jobs.clear();
        });
        self.go_down().await;
    }

    /// The container restarts at the same address (kubelet after a crash or an exit): a new
    /// process with a new `node_id`, no jobs, no `requests` series, not terminating, reaching
    /// livekit-server. The endpoint settings (delay, body, omitted series, `cluster_id`) stay.
    pub async fn restart(&self) -> io::Result<()> {
        self.crash().await;
        let port = self.inner.addr.port();
        self.update(|b| {
            let mut fresh = Behaviour::new(new_node_id(port));
            fresh.cluster_id = std::mem::take(&mut b.cluster_id);
            fresh.delay = b.delay;
            fresh.body = b.body.clone();
            fresh.omitted = std::mem::take(&mut b.omitted);
            *b = fresh;
        });
        self.listen().await
    }

    /// The series it exports now, omitted ones left out.
    pub fn samples(&self) -> Vec<StandInSample> {
        samples(&self.inner.shared.options, &self.inner.shared.behaviour())
    }

    /// The metric text it serves now in [`BodyMode::Metrics`].
    pub fn metrics_text(&self) -> String {
        render(&self.samples())
    }
}

fn takes_jobs(b: &Behaviour) -> bool {
    !b.exited && !b.disabled() && b.cluster_id.is_empty()
}

/// The pod's own timed changes: the shutdown after `unreachable_shutdown` without
/// livekit-server, and the exit once a SIGTERM's drain finds no job left.
async fn lifecycle(pod: Weak<Inner>, poll: Duration) {
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = pod.upgrade() else {
            return;
        };
        let pod = EgressPodStandIn { inner };
        let limit = pod.options().unreachable_shutdown;
        let exit = pod.update(|b| {
            if b.exited {
                return false;
            }
            if b.unreachable_since
                .is_some_and(|since| since.elapsed() >= limit)
            {
                b.terminating = true;
                b.exits_when_drained = true;
            }
            if b.terminating && b.exits_when_drained && b.jobs.is_empty() {
                b.exited = true;
                true
            } else {
                false
            }
        });
        if exit {
            pod.go_down().await;
        }
    }
}

/// Computes the series from the pod's state (FIDELITY.md 4).
fn samples(options: &EgressPodOptions, b: &Behaviour) -> Vec<StandInSample> {
    let settings = &options.settings;
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    // egress asks its admission about a synthetic video web job.
    let fits = b.fits(
        options,
        settings.costs.cost(EgressKind::Web),
        Instant::now(),
    );
    let available = b.jobs.is_empty();
    let can_accept = !b.disabled() && fits;
    let load = b.cpu_load.unwrap_or_else(|| {
        (b.measured_total(settings) as f64 / settings.pod_cpu.max(1) as f64).min(1.0)
    });

    let base = || {
        vec![
            ("cluster_id", b.cluster_id.clone()),
            ("node_id", b.node_id.to_owned()),
        ]
    };
    let mut out = vec![
        StandInSample {
            name: AVAILABLE,
            labels: base(),
            value: flag(available),
        },
        StandInSample {
            name: CAN_ACCEPT_REQUEST,
            labels: base(),
            value: flag(can_accept),
        },
        StandInSample {
            name: IS_DISABLED,
            labels: base(),
            value: flag(b.disabled()),
        },
        StandInSample {
            name: IS_TERMINATING,
            labels: base(),
            value: flag(b.terminating),
        },
    ];
    for kind in &b.used_types {
        let mut labels = base();
        labels.push(("type", kind.clone()));
        out.push(StandInSample {
            name: REQUESTS,
            labels,
            value: b.count(kind) as f64,
        });
    }
    let mut labels = base();
    labels.push(("node_type", "EGRESS".to_owned()));
    out.push(StandInSample {
        name: CPU_LOAD,
        labels,
        value: load,
    });
    out.retain(|sample| !b.omitted.contains(sample.name));
    out
}

/// Writes the samples as a Go exporter does: runtime metrics first, families sorted by name,
/// `# HELP` (empty, as egress registers its gauges without help) and `# TYPE` before each.
fn render(samples: &[StandInSample]) -> String {
    let mut text = String::with_capacity(2048);
    text.push_str(concat!(
        "# HELP go_gc_duration_seconds A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.\n",
        "# TYPE go_gc_duration_seconds summary\n",
        "go_gc_duration_seconds{quantile=\"0\"} 2.4e-05\n",
        "go_gc_duration_seconds{quantile=\"0.5\"} 6.1e-05\n",
        "go_gc_duration_seconds{quantile=\"1\"} 0.000412\n",
        "go_gc_duration_seconds_sum 0.0093\n",
        "go_gc_duration_seconds_count 118\n",
        "# HELP go_goroutines Number of goroutines that currently exist.\n",
        "# TYPE go_goroutines gauge\n",
        "go_goroutines 94\n",
    ));
    let mut family = "";
    for sample in samples {
        if sample.name != family {
            family = sample.name;
            let _ = write!(text, "# HELP {family} \n# TYPE {family} gauge\n");
        }
        text.push_str(sample.name);
        text.push('{');
        for (i, (key, value)) in sample.labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{key}=\"");
            for c in value.chars() {
                match c {
                    '\\' => text.push_str("\\\\"),
                    '"' => text.push_str("\\\""),
                    '\n' => text.push_str("\\n"),
                    c => text.push(c),
                }
            }
            text.push('"');
        }
        let _ = writeln!(text, "}} {}", sample.value);
    }
    text.push_str(concat!(
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n",
        "# TYPE process_cpu_seconds_total counter\n",
        "process_cpu_seconds_total 12.84\n",
        "# HELP promhttp_metric_handler_requests_total Total number of scrapes by HTTP status code.\n",
        "# TYPE promhttp_metric_handler_requests_total counter\n",
        "promhttp_metric_handler_requests_total{code=\"200\"} 311\n",
        "promhttp_metric_handler_requests_total{code=\"500\"} 0\n",
    ));
    text
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    shared.scrapes.fetch_add(1, Ordering::Relaxed);
    let (delay, mode, text) = {
        let b = shared.behaviour();
        let text = match b.body {
            BodyMode::Garbage => String::new(),
            _ => render(&samples(&shared.options, &b)),
        };
        (b.delay, b.body.clone(), text)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
    match mode {
        BodyMode::Metrics => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        BodyMode::Garbage => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT_FORMAT)],
            Bytes::from_static(
                b"\x00\xff\xfe<html><body>stand-in garbage, not metrics</body></html>\n",
            ),
        )
            .into_response(),
        BodyMode::Oversized(size) => {
            let chunk = Bytes::from(
                "# padding of an oversized stand-in answer .................................\n"
                    .repeat(840),
            );
            let mut parts = vec![Bytes::from(text)];
            let mut sent = parts[0].len();
            while sent < size {
                let part = chunk.slice(..chunk.len().min(size - sent));
                sent += part.len();
                parts.push(part);
            }
            let stream = futures::stream::iter(parts.into_iter().map(Ok::<_, io::Error>));
            (
                [(header::CONTENT_TYPE, TEXT_FORMAT)],
                Body::from_stream(stream),
            )
                .into_response()
        }
    }
}

/// A listener that tells, by dropping its sender, when axum has let go of the socket.
struct ClosingListener {
    listener: TcpListener,
    _closed: oneshot::Sender<()>,
}

impl axum::serve::Listener for ClosingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        axum::serve::Listener::accept(&mut self.listener).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

fn serve(listener: TcpListener, shared: Arc<Shared>) -> Server {
    let stop = CancellationToken::new();
    let (closed_tx, listener_closed) = oneshot::channel();
    let app = axum::Router::new()
        .fallback(metrics_handler)
        .with_state(shared);
    let listener = ClosingListener {
        listener,
        _closed: closed_tx,
    };
    let signal = stop.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(signal.cancelled_owned())
            .await;
    });
    Server {
        stop,
        task,
        listener_closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::parse::parse_pod_metrics;

    fn fast() -> EgressPodOptions {
        EgressPodOptions {
            reservation_hold: Duration::from_millis(150),
            drain_poll: Duration::from_millis(20),
            unreachable_shutdown: Duration::from_millis(200),
            ..EgressPodOptions::default()
        }
    }

    async fn start_fast() -> EgressPodStandIn {
        EgressPodStandIn::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), fast())
            .await
            .unwrap()
    }

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    async fn scrape(pod: &EgressPodStandIn) -> String {
        client()
            .get(pod.metrics_url())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits up to two seconds for `done`.
    async fn within_two_seconds(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done()
    }

    #[tokio::test]
    async fn text_follows_fidelity_4() {
        let pod = EgressPodStandIn::start().await.unwrap();
        let idle = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(idle.available, Some(true));
        assert_eq!(idle.can_accept_request, Some(true));
        assert_eq!(idle.node_id.as_deref(), Some(pod.node_id()));
        assert!(
            !pod.metrics_text().contains(REQUESTS),
            "no requests series before the first job"
        );

        pod.set_busy(&[("room_composite", 1)]);
        let busy = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(busy.available, Some(false));
        // 4 * 0.8 - 4 < 4: a second composite does not fit.
        assert_eq!(busy.can_accept_request, Some(false));

        pod.set_busy(&[("track", 1)]);
        let track = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(track.available, Some(false));
        assert_eq!(track.can_accept_request, Some(false));
        assert_eq!(track.active.get("track"), Some(&1));
        assert!(!track.active.contains_key("room_composite"));
        // Both types ran once: both series stay, the composite's at 0.
        assert!(
            pod.metrics_text().contains("type=\"room_composite\"} 0"),
            "{}",
            pod.metrics_text()
        );

        pod.set_idle();
        pod.set_terminating(true);
        let draining = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(draining.is_terminating, Some(true));
        assert_eq!(
            draining.is_disabled,
            Some(true),
            "terminating is disabled too"
        );
        assert_eq!(
            draining.available,
            Some(true),
            "an idle flag, whatever the state"
        );
        assert_eq!(draining.can_accept_request, Some(false));
    }

    #[tokio::test]
    async fn bigger_pod_accepts_a_composite_next_to_a_track() {
        let settings = Settings {
            pod_cpu: 8000,
            ..Settings::default()
        };
        let pod = EgressPodStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), settings)
            .await
            .unwrap();
        pod.set_busy(&[("track", 1)]);
        let metrics = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        // 8 * 0.8 - 0.5 = 5.9 >= 4.
        assert_eq!(metrics.can_accept_request, Some(true));
        assert!(pod.admits(EgressKind::RoomComposite));
    }

    #[tokio::test]
    async fn admission_counts_the_reservation_then_the_measured_cpu() {
        let pod = start_fast().await;
        assert!(pod.admits(EgressKind::RoomComposite), "idle: cost <= C");
        assert!(pod.start_job(EgressKind::RoomComposite));
        // The composite measures 2.5 cores.
        pod.set_cpu_load(Some(2.5 / 4.0));
        // Within the hold the reservation (4) counts: 3.2 - 4 < 0.5.
        assert!(!pod.admits(EgressKind::Track));
        assert!(!pod.start_job(EgressKind::Track));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Then the measured 2.5: 3.2 - 2.5 >= 0.5, and a second track no more.
        assert!(pod.admits(EgressKind::Track));
        assert!(pod.start_job(EgressKind::Track));
        assert!(!pod.admits(EgressKind::Track), "3.2 - 2.5 - 0.5 < 0.5");
        assert!(!pod.admits(EgressKind::RoomComposite));
        assert_eq!(
            pod.active(),
            BTreeMap::from([("room_composite".to_owned(), 1), ("track".to_owned(), 1)])
        );

        // A job measuring above its cost takes more than it reserved.
        let hot = start_fast().await;
        assert!(hot.start_job(EgressKind::Participant));
        hot.set_cpu_load(Some(3.0 / 4.0));
        assert!(!hot.admits(EgressKind::Track), "3.2 - 3.0 < 0.5");

        // An audio composite reserves its own cost though it reports as a room composite.
        let audio = start_fast().await;
        assert!(audio.start_job(EgressKind::AudioRoomComposite));
        assert!(audio.admits(EgressKind::Participant), "3.2 - 1 >= 2");
    }

    #[tokio::test]
    async fn sigterm_stops_bidding_keeps_answering_and_exits_once_drained() {
        let pod = start_fast().await;
        pod.add_job("room_composite");
        pod.sigterm();
        assert!(!pod.takes_jobs());
        assert!(!pod.admits(EgressKind::Track));
        let metrics = parse_pod_metrics(scrape(&pod).await.as_bytes()).unwrap();
        assert_eq!(metrics.is_terminating, Some(true));
        assert_eq!(metrics.is_disabled, Some(true));
        assert_eq!(metrics.available, Some(false));
        // Busy: it keeps running past several drain polls.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pod.is_serving() && !pod.has_exited());

        assert!(pod.remove_job("room_composite"));
        assert!(within_two_seconds(|| pod.has_exited() && !pod.is_serving()).await);
        assert!(client().get(pod.metrics_url()).send().await.is_err());
    }

    #[tokio::test]
    async fn a_pod_without_livekit_server_is_disabled_then_shuts_itself_down() {
        let pod = start_fast().await;
        pod.add_job("track");
        pod.set_livekit_reachable(false);
        let metrics = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(metrics.is_disabled, Some(true));
        assert_eq!(metrics.is_terminating, Some(false));
        assert_eq!(metrics.can_accept_request, Some(false));
        assert!(!pod.takes_jobs());
        // Back in time: enabled again.
        pod.set_livekit_reachable(true);
        assert!(pod.takes_jobs());

        pod.set_livekit_reachable(false);
        assert!(
            within_two_seconds(|| {
                let metrics = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
                metrics.is_terminating == Some(true)
            })
            .await,
            "the shutdown after unreachable_shutdown"
        );
        assert!(!pod.has_exited(), "it drains its recording first");
        pod.remove_job("track");
        assert!(within_two_seconds(|| pod.has_exited()).await);
    }

    #[tokio::test]
    async fn a_restart_is_a_new_node_without_the_old_jobs() {
        let pod = start_fast().await;
        let first = pod.node_id();
        pod.add_job("web");
        pod.set_cluster_id("");
        pod.restart().await.unwrap();
        assert_ne!(pod.node_id(), first);
        assert!(pod.active().is_empty());
        assert!(pod.is_serving() && !pod.has_exited() && pod.takes_jobs());
        assert!(
            !pod.metrics_text().contains(REQUESTS),
            "a new process: no series yet"
        );
        assert!(scrape(&pod).await.contains(pod.node_id()));

        // A crash loses the jobs; coming back after it is a restart too.
        pod.add_job("track");
        let before = pod.node_id();
        pod.crash().await;
        assert!(!pod.is_serving() && pod.active().is_empty());
        pod.come_back().await.unwrap();
        assert_ne!(pod.node_id(), before);

        // Going down and back without an exit is the same process.
        let same = pod.node_id();
        pod.go_down().await;
        pod.come_back().await.unwrap();
        assert_eq!(pod.node_id(), same);
    }
}
