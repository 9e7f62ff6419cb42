//! The fleet observer: a background loop that keeps a fresh snapshot of the egress pods
//! (DESIGN.md 3, 4), from which the scaler and the dispatcher read. Reading never scrapes.
//!
//! It is safe in both directions: no pods (or no records) means zero capacity, so scaling from
//! zero works; a failing scrape never shrinks the fleet: a pod keeps its last good metrics for
//! `unknown_grace`, then stays counted as `unknown`. When the source itself fails (DNS or
//! Prometheus errors) or the snapshot grows older than `stale_after`, [`Fleet::current`]
//! answers an error, so that the scaler answers `Unavailable` instead of guessing.
//!
//! How a pod's state follows the real egress pod (FIDELITY.md 4):
//! - discovered but never scraped: `starting` (an idle pod soon) for `start_grace`, then
//!   `unknown`: a pod in CrashLoopBackOff or ImagePullBackOff is listed by the headless Service
//!   but never answers, and must not hold queued work as if it were capacity;
//! - `is_terminating`: `terminating`, read first (a terminating pod also says `is_disabled 1`,
//!   and `available 1` while idle);
//! - a `cluster_id`: `disabled` (open-source livekit-server never sends it a job);
//! - `is_disabled` alone: the pod cannot reach livekit-server. It holds its recordings and
//!   either recovers or shuts itself down after 10 min, so it is `unknown` (counted, no
//!   capacity), never dropped from the count;
//! - a new `node_id` at a known address is a restarted pod: its earlier jobs are gone, and only
//!   its new metrics count.
//!
//! A DNS name that does not resolve (NXDOMAIN) is zero pods, as it is for a Service scaled to
//! zero, but it is also the look of a mistyped `--egress-dns`: [`Fleet::warning`] says so, and
//! the log says it once per change.
//!
//! Pod identity across refreshes is the metrics URL (static and DNS sources) or
//! `node_id@instance` (Prometheus).

pub mod parse;
pub mod source;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use reqwest::Url;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{FleetSnapshot, Millicores, Pod, PodState, Settings};
use parse::PodMetrics;
pub use source::{
    FleetConfigError, FleetSource, Resolver, SERIES_QUERY, ScrapeError, ScrapeErrorReason,
    SystemResolver, TARGETS_QUERY,
};
use source::{HttpReader, PrometheusFleet, PrometheusReader};

/// Timing and limits of the observer.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOptions {
    /// Time between two refreshes.
    pub refresh_interval: Duration,
    /// Limit of one scrape (connect, headers and body), of one DNS lookup and of one
    /// Prometheus query.
    pub scrape_timeout: Duration,
    /// Largest metrics body read; a larger one is a `too_large` error.
    pub max_body_bytes: usize,
    /// Scrapes in flight at once.
    pub concurrency: usize,
    /// How long a pod that was scraped before keeps its last good metrics while failing,
    /// before it turns `unknown`.
    pub unknown_grace: Duration,
    /// How long a discovered pod that never answered a scrape counts as `starting` (an idle
    /// pod soon) before it turns `unknown`.
    pub start_grace: Duration,
    /// Age beyond which [`Fleet::current`] refuses the snapshot.
    pub stale_after: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            refresh_interval: Duration::from_secs(2),
            scrape_timeout: Duration::from_secs(1),
            max_body_bytes: 4 * 1024 * 1024,
            concurrency: 32,
            unknown_grace: Duration::from_secs(10),
            // An egress pod serves metrics a second or two after its container starts
            // (FIDELITY.md 4); 30 s also covers pulling the image on most nodes, and by then
            // a crash-looping pod has crashed at least twice (back-offs of 10 s, 20 s).
            start_grace: Duration::from_secs(30),
            stale_after: Duration::from_secs(15),
        }
    }
}

impl FleetOptions {
    fn validate(&self) -> Result<(), FleetConfigError> {
        let invalid = |name, reason| Err(FleetConfigError::InvalidOption { name, reason });
        if self.refresh_interval.is_zero() {
            return invalid("refresh_interval", "must be above zero");
        }
        if self.scrape_timeout.is_zero() {
            return invalid("scrape_timeout", "must be above zero");
        }
        if self.max_body_bytes == 0 {
            return invalid("max_body_bytes", "must be above zero");
        }
        if self.concurrency == 0 {
            return invalid("concurrency", "must be at least 1");
        }
        if self.start_grace.is_zero() {
            return invalid("start_grace", "must be above zero");
        }
        if self.stale_after < self.refresh_interval {
            return invalid("stale_after", "must be at least the refresh interval");
        }
        Ok(())
    }
}

/// One pod in the operator view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodView {
    /// Metrics URL (static, DNS) or the `pod`/`instance` label (Prometheus).
    pub address: String,
    /// The egress `node_id`, once scraped.
    pub node_id: Option<String>,
    /// Its state (DESIGN.md 4).
    pub state: PodState,
    /// Active egress by reported type, from the last good scrape.
    pub active: BTreeMap<String, u64>,
    /// CPU it could still take by the cost arithmetic: `C*u - used` for a ready pod, `C*u`
    /// for a starting one, 0 otherwise.
    pub free_cpu_cores: f64,
    /// `livekit_node_cpu_load`, 0..1.
    pub cpu_load: Option<f64>,
    /// `livekit_egress_can_accept_request`, when reported.
    pub can_accept_video: Option<bool>,
    /// Seconds since the last good scrape; `None` when never scraped.
    pub last_scrape_age_seconds: Option<f64>,
    /// Series an older egress did not export; the cost arithmetic stands in for them.
    pub missing_series: Vec<String>,
    /// Why the last scrape failed, or why the pod is not capacity.
    pub last_error: Option<String>,
}

/// The fleet as observed by one refresh.
#[derive(Debug, Clone)]
pub struct FleetView {
    /// Every pod known, in any state, ordered by address.
    pub pods: Vec<PodView>,
    /// When the refresh finished.
    pub refreshed_at: Instant,
    /// How long the refresh took.
    pub refresh_duration: Duration,
    /// Set when the source itself failed (DNS, Prometheus) or was not read yet.
    pub source_error: Option<String>,
}

impl FleetView {
    /// A view with no pods.
    fn empty(source_error: Option<String>) -> Self {
        FleetView {
            pods: Vec::new(),
            refreshed_at: Instant::now(),
            refresh_duration: Duration::ZERO,
            source_error,
        }
    }

    /// The pods as the replica model sees them.
    pub fn snapshot(&self) -> FleetSnapshot {
        FleetSnapshot {
            pods: self
                .pods
                .iter()
                .map(|pod| Pod {
                    name: pod.address.clone(),
                    state: pod.state,
                    active: pod.active.clone(),
                    can_accept_video: pod.can_accept_video,
                    cpu_load: pod.cpu_load,
                })
                .collect(),
        }
    }

    /// Time since the refresh finished.
    pub fn age(&self) -> Duration {
        self.refreshed_at.elapsed()
    }

    /// Pods in one state.
    pub fn count(&self, state: PodState) -> usize {
        self.pods.iter().filter(|pod| pod.state == state).count()
    }

    /// Free CPU of the whole fleet, cores.
    pub fn free_cpu_cores(&self) -> f64 {
        // A fold from +0.0: `sum` of no pods is -0.0, which prints as "-0.0".
        self.pods
            .iter()
            .fold(0.0, |free, pod| free + pod.free_cpu_cores)
    }
}

/// The latest snapshot cannot be trusted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FleetError {
    /// The source (DNS, Prometheus) failed on the last refresh, or was not read yet.
    #[error("fleet source failing: {0}")]
    SourceFailing(String),
    /// No refresh for longer than `stale_after`.
    #[error("fleet snapshot is stale ({age:?} old)")]
    Stale {
        /// Age of the latest snapshot.
        age: Duration,
    },
}

impl FleetError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            FleetError::SourceFailing(_) => "source_failing",
            FleetError::Stale { .. } => "stale",
        }
    }
}

/// Read side of the observer: cheap to clone, never scrapes.
#[derive(Debug, Clone)]
pub struct Fleet {
    views: watch::Receiver<Arc<FleetView>>,
    /// `None` for a fleet without a source: it is never stale.
    stale_after: Option<Duration>,
    /// Keeps the channel open for [`Fleet::none`], so subscribers wait instead of ending.
    _sender: Option<Arc<watch::Sender<Arc<FleetView>>>>,
    /// What the source says that is not an error (see [`Fleet::warning`]).
    warning: SourceWarning,
}

/// A warning about the source, shared between the observer and its readers.
type SourceWarning = Arc<Mutex<Option<String>>>;

impl Fleet {
    /// No source configured: always fresh, zero pods (scale from zero).
    pub fn none() -> Fleet {
        let (sender, views) = watch::channel(Arc::new(FleetView::empty(None)));
        Fleet {
            views,
            stale_after: None,
            _sender: Some(Arc::new(sender)),
            warning: SourceWarning::default(),
        }
    }

    /// A warning about the source as of the last refresh that is not an error: the fleet is
    /// still trusted, but an operator should look (a DNS name that does not resolve).
    pub fn warning(&self) -> Option<String> {
        self.warning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The latest snapshot if it can be trusted: `SourceFailing` when the last refresh's
    /// source failed, `Stale` when older than `stale_after`.
    pub fn current(&self) -> Result<Arc<FleetView>, FleetError> {
        let view = self.view();
        if let Some(error) = &view.source_error {
            return Err(FleetError::SourceFailing(error.clone()));
        }
        if let Some(limit) = self.stale_after {
            let age = view.age();
            if age > limit {
                return Err(FleetError::Stale { age });
            }
        }
        Ok(view)
    }

    /// The latest snapshot, whatever its health (for status pages).
    pub fn view(&self) -> Arc<FleetView> {
        self.views.borrow().clone()
    }

    /// A receiver woken on each refresh; it ends when the observer stops.
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetView>> {
        self.views.clone()
    }
}

/// The fleet's own metrics.
#[derive(Debug, Clone)]
pub struct FleetMetrics {
    pods: Family<StateLabels, Gauge>,
    free_cpu_cores: Gauge<f64, AtomicU64>,
    scrape_duration: Histogram,
    scrape_errors: Family<ReasonLabels, Counter>,
    snapshot_age: SnapshotAge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: StateLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StateLabel(PodState);

impl EncodeLabelValue for StateLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: ScrapeErrorReason,
}

impl EncodeLabelValue for ScrapeErrorReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Gauge computed when encoded: seconds since the latest refresh, so that a stuck loop shows.
#[derive(Debug, Clone)]
struct SnapshotAge(Arc<Mutex<Instant>>);

impl SnapshotAge {
    fn set(&self, at: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

impl TypedMetric for SnapshotAge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for SnapshotAge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let at = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        encoder.encode_gauge(&at.elapsed().as_secs_f64())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

impl FleetMetrics {
    /// Registers the fleet metrics (full names, `egress_scaler_fleet_*`) in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = FleetMetrics {
            pods: Family::default(),
            free_cpu_cores: Gauge::default(),
            scrape_duration: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            scrape_errors: Family::default(),
            snapshot_age: SnapshotAge(Arc::new(Mutex::new(Instant::now()))),
        };
        registry.register(
            "egress_scaler_fleet_pods",
            "Egress pods by state",
            metrics.pods.clone(),
        );
        registry.register(
            "egress_scaler_fleet_free_cpu_cores",
            "Free CPU of the egress fleet by the cost arithmetic, cores",
            metrics.free_cpu_cores.clone(),
        );
        registry.register(
            "egress_scaler_fleet_scrape_duration_seconds",
            "Duration of one egress pod scrape or Prometheus read",
            metrics.scrape_duration.clone(),
        );
        registry.register(
            "egress_scaler_fleet_scrape_errors",
            "Failed fleet reads by reason",
            metrics.scrape_errors.clone(),
        );
        registry.register(
            "egress_scaler_fleet_snapshot_age_seconds",
            "Seconds since the latest fleet refresh",
            metrics.snapshot_age.clone(),
        );
        for state in PodState::ALL {
            let _ = metrics.pods.get_or_create(&StateLabels {
                state: StateLabel(state),
            });
        }
        for reason in ScrapeErrorReason::ALL {
            let _ = metrics
                .scrape_errors
                .get_or_create(&ReasonLabels { reason });
        }
        metrics
    }

    fn scrape_failed(&self, reason: ScrapeErrorReason) {
        self.scrape_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn record_view(&self, view: &FleetView) {
        for state in PodState::ALL {
            self.pods
                .get_or_create(&StateLabels {
                    state: StateLabel(state),
                })
                .set(view.count(state) as i64);
        }
        self.free_cpu_cores.set(view.free_cpu_cores());
        self.snapshot_age.set(view.refreshed_at);
    }
}

/// One pod followed across refreshes.
#[derive(Debug, Clone)]
struct Tracked {
    address: String,
    /// Where to scrape it (static, DNS); `None` in Prometheus mode.
    url: Option<Url>,
    /// The `instance` label (Prometheus), to look up `up`.
    instance: Option<String>,
    last_good: Option<(PodMetrics, Instant)>,
    /// When it was first listed, for the start grace.
    discovered_at: Instant,
    failing_since: Option<Instant>,
    last_error: Option<String>,
    /// State at the previous refresh, to log changes.
    last_state: Option<PodState>,
}

impl Tracked {
    fn new(address: String, url: Option<Url>, instance: Option<String>) -> Self {
        Tracked {
            address,
            url,
            instance,
            last_good: None,
            discovered_at: Instant::now(),
            failing_since: None,
            last_error: None,
            last_state: None,
        }
    }

    fn succeeded(&mut self, metrics: PodMetrics, at: Instant) {
        if let Some((before, _)) = &self.last_good
            && before.node_id != metrics.node_id
        {
            // egress takes a new node_id on every start: a new process at this address, and
            // the jobs of the old one are gone. Only the new metrics count from here.
            tracing::info!(
                pod = %self.address,
                before = before.node_id.as_deref().unwrap_or(""),
                after = metrics.node_id.as_deref().unwrap_or(""),
                "Egress pod restarted (new node_id); its earlier jobs are gone."
            );
        }
        self.last_good = Some((metrics, at));
        self.failing_since = None;
        self.last_error = None;
    }

    fn failed(&mut self, error: String, at: Instant) {
        self.failing_since.get_or_insert(at);
        self.last_error = Some(error);
    }

    /// Whether it was never scraped and the start grace is over.
    fn never_answered(&self, now: Instant, options: &FleetOptions) -> bool {
        self.last_good.is_none()
            && now.saturating_duration_since(self.discovered_at) > options.start_grace
    }

    fn state(&self, now: Instant, options: &FleetOptions) -> PodState {
        let Some((metrics, _)) = &self.last_good else {
            // Discovered, never scraped: it will be an idle pod, unless it never answers
            // (CrashLoopBackOff, ImagePullBackOff): then it is counted but holds no work.
            return if self.never_answered(now, options) {
                PodState::Unknown
            } else {
                PodState::Starting
            };
        };
        let reported = reported_state(metrics);
        match self.failing_since {
            // A draining pod that stops answering has most likely finished draining: it stays
            // out of the count rather than turning into a counted `unknown`.
            Some(since)
                if now.saturating_duration_since(since) > options.unknown_grace
                    && reported != PodState::Terminating =>
            {
                PodState::Unknown
            }
            _ => reported,
        }
    }

    /// Why the pod is in its state, when that is not plain health.
    fn reason(&self, now: Instant, options: &FleetOptions) -> Option<String> {
        if self.never_answered(now, options) {
            let error = self.last_error.as_deref().unwrap_or("no scrape finished");
            return Some(format!(
                "never answered a scrape in {}: {error}",
                seconds_text(options.start_grace)
            ));
        }
        if let Some(error) = &self.last_error {
            return Some(error.clone());
        }
        let (metrics, _) = self.last_good.as_ref()?;
        if let Some(cluster) = metrics.cluster_id.as_deref().filter(|c| !c.is_empty()) {
            return Some(format!(
                "cluster_id {cluster:?} is set: open-source livekit-server sends this pod no jobs"
            ));
        }
        if reported_state(metrics) == PodState::Unknown {
            return Some(
                "is_disabled 1 while not terminating: the pod cannot reach livekit-server (its \
                 updates time out); it takes no job and shuts itself down after 10 min of this"
                    .to_owned(),
            );
        }
        None
    }

    fn view(&self, now: Instant, options: &FleetOptions, settings: &Settings) -> PodView {
        let state = self.state(now, options);
        let metrics = self.last_good.as_ref().map(|(metrics, _)| metrics);
        let capacity = settings.busy_capacity();
        let free: Millicores = match state {
            PodState::Starting => capacity,
            PodState::Ready => {
                let pod = Pod {
                    name: String::new(),
                    state,
                    active: metrics.map(|m| m.active.clone()).unwrap_or_default(),
                    can_accept_video: None,
                    cpu_load: metrics.and_then(|m| m.cpu_load),
                };
                capacity.saturating_sub(pod.used_cpu_measured(settings))
            }
            PodState::Unknown | PodState::Terminating | PodState::Disabled => 0,
        };
        let last_error = self.reason(now, options);
        PodView {
            address: self.address.clone(),
            node_id: metrics.and_then(|m| m.node_id.clone()),
            state,
            active: metrics.map(|m| m.active.clone()).unwrap_or_default(),
            free_cpu_cores: free as f64 / 1000.0,
            cpu_load: metrics.and_then(|m| m.cpu_load),
            can_accept_video: metrics.and_then(|m| m.can_accept_request),
            last_scrape_age_seconds: self
                .last_good
                .as_ref()
                .map(|(_, at)| now.saturating_duration_since(*at).as_secs_f64()),
            missing_series: metrics
                .map(|m| m.missing_series.clone())
                .unwrap_or_default(),
            last_error,
        }
    }
}

/// The state a pod reports about itself.
fn reported_state(metrics: &PodMetrics) -> PodState {
    if metrics.is_terminating == Some(true) {
        // Read first: a terminating pod also says `is_disabled 1`.
        PodState::Terminating
    } else if metrics.cluster_id.as_deref().is_some_and(|c| !c.is_empty()) {
        // DESIGN.md 2.1: open-source livekit-server never sends a job to a pod with a
        // cluster_id, so it is no capacity and never will be.
        PodState::Disabled
    } else if metrics.is_disabled == Some(true) {
        // FIDELITY.md 4: outside a shutdown, egress is disabled only while its updates to
        // livekit-server time out. It still runs its recordings and recovers, or exits after
        // 10 min and restarts: counted, no capacity, like a pod whose metrics fail.
        PodState::Unknown
    } else {
        PodState::Ready
    }
}

/// `30 s`, `0.3 s`: a duration as operators write the flags.
fn seconds_text(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 {
        format!("{seconds:.0} s")
    } else {
        format!("{} s", (seconds * 1000.0).round() / 1000.0)
    }
}

/// How the observer reaches its source.
enum SourceReader {
    None,
    /// The fixed targets live in the pod map from the start.
    Static,
    Dns {
        host: String,
        port: u16,
        resolver: Arc<dyn Resolver>,
    },
    Prometheus(PrometheusReader),
}

/// Owns the refresh loop and the pods it follows.
pub struct FleetObserver {
    source: SourceReader,
    options: FleetOptions,
    settings: Settings,
    metrics: FleetMetrics,
    scraper: HttpReader,
    pods: BTreeMap<String, Tracked>,
    views: watch::Sender<Arc<FleetView>>,
    source_failing: bool,
    /// Shared with the [`Fleet`]s; set and cleared on change only.
    warning: SourceWarning,
}

impl FleetObserver {
    /// Builds the observer and its read side. Nothing is read before [`FleetObserver::run`]
    /// or [`FleetObserver::refresh_once`]; until then [`Fleet::current`] says `SourceFailing`
    /// (except with [`FleetSource::None`]).
    pub fn new(
        source: FleetSource,
        options: FleetOptions,
        settings: Settings,
        metrics: FleetMetrics,
    ) -> Result<(Self, Fleet), FleetConfigError> {
        source.validate()?;
        options.validate()?;
        let scraper = HttpReader::new(options.scrape_timeout, options.max_body_bytes, false)?;
        let mut pods = BTreeMap::new();
        let reader = match source {
            FleetSource::None => SourceReader::None,
            FleetSource::Static(urls) => {
                for url in urls {
                    let parsed = Url::parse(&url).map_err(|e| FleetConfigError::InvalidUrl {
                        flag: "--egress-metrics",
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
                    // Listed, so known from the start: `starting` until scraped.
                    pods.entry(url.clone())
                        .or_insert_with(|| Tracked::new(url, Some(parsed), None));
                }
                SourceReader::Static
            }
            FleetSource::Dns { host, port } => SourceReader::Dns {
                host,
                port,
                resolver: Arc::new(SystemResolver::new(options.scrape_timeout)),
            },
            FleetSource::Prometheus { url } => {
                let http = HttpReader::new(options.scrape_timeout, options.max_body_bytes, true)?;
                SourceReader::Prometheus(PrometheusReader::new(&url, http)?)
            }
        };
        let initial = match reader {
            SourceReader::None => FleetView::empty(None),
            _ => FleetView::empty(Some("the fleet has not been observed yet".to_owned())),
        };
        metrics.record_view(&initial);
        let (views, receiver) = watch::channel(Arc::new(initial));
        let warning = SourceWarning::default();
        let fleet = Fleet {
            views: receiver,
            stale_after: Some(options.stale_after),
            _sender: None,
            warning: warning.clone(),
        };
        let observer = FleetObserver {
            source: reader,
            options,
            settings,
            metrics,
            scraper,
            pods,
            views,
            source_failing: false,
            warning,
        };
        Ok((observer, fleet))
    }

    /// Replaces the DNS resolver (tests, or a resolver of the embedding program's own).
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        if let SourceReader::Dns { resolver: slot, .. } = &mut self.source {
            *slot = resolver;
        }
        self
    }

    /// Refreshes every `refresh_interval` until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.options.refresh_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.refresh_once() => {}
            }
        }
        tracing::debug!("Fleet observer stopped.");
    }

    /// Reads the source once, scrapes the pods and publishes the new view.
    pub async fn refresh_once(&mut self) {
        let started = Instant::now();
        let source_error = match &self.source {
            SourceReader::None | SourceReader::Static => None,
            SourceReader::Dns {
                host,
                port,
                resolver,
            } => {
                let (host, port, resolver) = (host.clone(), *port, resolver.clone());
                self.discover(&host, port, resolver.as_ref()).await
            }
            SourceReader::Prometheus(reader) => {
                let reader = reader.clone();
                self.read_prometheus(&reader).await
            }
        };
        self.scrape_all().await;

        let now = Instant::now();
        let mut pods = Vec::with_capacity(self.pods.len());
        for tracked in self.pods.values_mut() {
            let view = tracked.view(now, &self.options, &self.settings);
            if tracked.last_state != Some(view.state) {
                log_state_change(tracked.last_state, &view);
                tracked.last_state = Some(view.state);
            }
            pods.push(view);
        }
        pods.sort_by(|a, b| a.address.cmp(&b.address));
        match (&source_error, self.source_failing) {
            (Some(error), false) => {
                tracing::warn!(error = %error, "Fleet source failing; the scaler answers Unavailable.");
            }
            (None, true) => tracing::info!("Fleet source recovered."),
            _ => {}
        }
        self.source_failing = source_error.is_some();
        let view = FleetView {
            pods,
            refreshed_at: now,
            refresh_duration: now - started,
            source_error,
        };
        self.metrics.record_view(&view);
        self.views.send_replace(Arc::new(view));
    }

    /// Re-resolves the Service: new addresses are `starting` pods, vanished ones are gone.
    /// A name that does not resolve is zero pods, with a warning. On failure the known pods
    /// stay as they are and the error is returned.
    async fn discover(&mut self, host: &str, port: u16, resolver: &dyn Resolver) -> Option<String> {
        let lookup =
            tokio::time::timeout(self.options.scrape_timeout, resolver.resolve(host, port));
        let addresses = match lookup.await {
            Ok(Ok(addresses)) => {
                self.set_warning(None);
                addresses
            }
            Ok(Err(error)) if source::is_no_such_name(&error) => {
                self.set_warning(Some(format!(
                    "dns: {host} does not resolve (NXDOMAIN): a Service with no ready pods and \
                     a mistyped name look the same to DNS; check that --egress-dns names the \
                     headless Service of the egress pods (kubectl get service -A | grep \
                     egress) and that it lists them (kubectl get endpoints). Counted as zero \
                     pods, so scaling from zero still works"
                )));
                Vec::new()
            }
            Ok(Err(error)) => {
                self.metrics.scrape_failed(ScrapeErrorReason::Dns);
                return Some(format!("dns: resolving {host}: {error}"));
            }
            Err(_) => {
                self.metrics.scrape_failed(ScrapeErrorReason::Dns);
                return Some(format!(
                    "dns: resolving {host} timed out after {:?}",
                    self.options.scrape_timeout
                ));
            }
        };
        let mut current = BTreeMap::new();
        for ip in addresses {
            let socket = std::net::SocketAddr::new(ip, port);
            let address = format!("http://{socket}/metrics");
            if let Ok(url) = Url::parse(&address) {
                current.insert(address, url);
            }
        }
        self.pods.retain(|address, _| {
            let listed = current.contains_key(address);
            if !listed {
                tracing::info!(pod = %address, "Egress pod gone from the DNS records.");
            }
            listed
        });
        for (address, url) in current {
            self.pods
                .entry(address.clone())
                .or_insert_with(|| Tracked::new(address, Some(url), None));
        }
        None
    }

    /// Publishes a warning about the source, logging it when it changes.
    fn set_warning(&mut self, warning: Option<String>) {
        let mut slot = self.warning.lock().unwrap_or_else(|e| e.into_inner());
        if *slot == warning {
            return;
        }
        match &warning {
            Some(text) => tracing::warn!(warning = %text, "Fleet source warning."),
            None => tracing::info!("Fleet source warning cleared."),
        }
        *slot = warning;
    }

    /// Reads the pods from Prometheus. A pod whose series vanished is kept while its target
    /// is still scraped but failing (`up` 0), and dropped when the target is gone.
    async fn read_prometheus(&mut self, reader: &PrometheusReader) -> Option<String> {
        let started = Instant::now();
        let read = reader.read_fleet().await;
        self.metrics
            .scrape_duration
            .observe(started.elapsed().as_secs_f64());
        let fleet: PrometheusFleet = match read {
            Ok(fleet) => fleet,
            Err(error) => {
                self.metrics.scrape_failed(ScrapeErrorReason::Prometheus);
                return Some(error.to_string());
            }
        };
        let now = Instant::now();
        self.pods.retain(|key, tracked| {
            let kept = fleet.pods.contains_key(key)
                || tracked
                    .instance
                    .as_ref()
                    .and_then(|instance| fleet.targets_up.get(instance))
                    == Some(&false);
            if !kept {
                tracing::info!(pod = %tracked.address, "Egress pod gone from Prometheus targets.");
            }
            kept
        });
        for tracked in self.pods.values_mut() {
            tracked.failed("prometheus: target down (up == 0)".to_owned(), now);
        }
        for (key, pod) in fleet.pods {
            let tracked = self
                .pods
                .entry(key)
                .or_insert_with(|| Tracked::new(pod.address.clone(), None, pod.instance.clone()));
            match pod.metrics {
                Ok(metrics) => tracked.succeeded(metrics, now),
                Err(error) => {
                    self.metrics.scrape_failed(ScrapeErrorReason::Parse);
                    tracked.failed(format!("prometheus series: {error}"), now);
                }
            }
        }
        None
    }

    /// Scrapes every pod that has a URL, `concurrency` at a time.
    async fn scrape_all(&mut self) {
        let targets: Vec<(String, Url)> = self
            .pods
            .iter()
            .filter_map(|(key, tracked)| tracked.url.clone().map(|url| (key.clone(), url)))
            .collect();
        if targets.is_empty() {
            return;
        }
        let scraper = &self.scraper;
        let metrics = &self.metrics;
        let results: Vec<(String, Result<PodMetrics, ScrapeError>)> =
            futures::stream::iter(targets)
                .map(|(key, url)| async move {
                    let started = Instant::now();
                    let result = scraper.scrape(&url).await;
                    metrics
                        .scrape_duration
                        .observe(started.elapsed().as_secs_f64());
                    (key, result)
                })
                .buffer_unordered(self.options.concurrency)
                .collect()
                .await;
        let now = Instant::now();
        for (key, result) in results {
            let Some(tracked) = self.pods.get_mut(&key) else {
                continue;
            };
            match result {
                Ok(metrics) => tracked.succeeded(metrics, now),
                Err(error) => {
                    self.metrics.scrape_failed(error.reason());
                    tracing::debug!(pod = %tracked.address, error = %error, "Egress pod scrape failed.");
                    tracked.failed(error.to_string(), now);
                }
            }
        }
    }
}

fn log_state_change(before: Option<PodState>, pod: &PodView) {
    let before = before.map_or("new", PodState::as_str);
    let after = pod.state.as_str();
    match pod.state {
        PodState::Unknown => tracing::warn!(
            pod = %pod.address, before, after, reason = pod.last_error.as_deref().unwrap_or(""),
            "Egress pod counted as unknown: no capacity until it answers as ready."
        ),
        _ => tracing::info!(
            pod = %pod.address, node_id = pod.node_id.as_deref().unwrap_or(""), before, after,
            "Egress pod state changed."
        ),
    }
}
