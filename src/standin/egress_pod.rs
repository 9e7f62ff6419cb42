//! A stand-in for one LiveKit egress pod's metrics endpoint (DESIGN.md 2.1, 2.2).
//!
//! It serves, on any path, the metric text a Go Prometheus exporter writes for an egress pod:
//! HELP/TYPE lines, some Go runtime metrics, and the `livekit_*` series with `node_id` and
//! `cluster_id` labels. `livekit_egress_available` is 1 only with zero active egress and
//! `livekit_egress_can_accept_request` follows the admission rule of DESIGN.md 2.1 for one
//! video room composite. A clonable handle switches it between idle, busy, terminating,
//! disabled, slow, garbage, oversized and down, and can omit series like an older egress.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use crate::model::{EgressKind, Settings};

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

#[derive(Debug, Clone)]
struct Behaviour {
    /// Active egress by reported type; types once used stay with 0, like a Go gauge vector.
    active: BTreeMap<String, u64>,
    terminating: bool,
    disabled: bool,
    cpu_load: Option<f64>,
    cluster_id: String,
    delay: Duration,
    body: BodyMode,
    omitted: BTreeSet<String>,
}

#[derive(Debug)]
struct Shared {
    node_id: String,
    settings: Settings,
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
    /// Servers taken down while answering a slow request; aborted when the stand-in goes.
    retired: Mutex<Vec<JoinHandle<()>>>,
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
    }
}

/// A stand-in egress pod metrics endpoint; clones are handles to the same pod. The server
/// stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct EgressPodStandIn {
    inner: Arc<Inner>,
}

static NEXT_NODE: AtomicU64 = AtomicU64::new(1);

impl EgressPodStandIn {
    /// An idle stand-in with the default settings (4 cores, LiveKit costs) on 127.0.0.1.
    pub async fn start() -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Settings::default()).await
    }

    /// An idle stand-in listening on `addr` (port 0 picks one); `settings` give its CPU and
    /// cost table for `livekit_egress_can_accept_request`.
    pub async fn start_on(addr: SocketAddr, settings: Settings) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let node_id = format!(
            "EG_standin{:04}_{}",
            NEXT_NODE.fetch_add(1, Ordering::Relaxed),
            addr.port()
        );
        let shared = Arc::new(Shared {
            node_id,
            settings,
            behaviour: Mutex::new(Behaviour {
                active: BTreeMap::new(),
                terminating: false,
                disabled: false,
                cpu_load: None,
                cluster_id: String::new(),
                delay: Duration::ZERO,
                body: BodyMode::Metrics,
                omitted: BTreeSet::new(),
            }),
            scrapes: AtomicU64::new(0),
        });
        let server = serve(listener, shared.clone());
        Ok(EgressPodStandIn {
            inner: Arc::new(Inner {
                addr,
                shared,
                server: tokio::sync::Mutex::new(Some(server)),
                retired: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://ADDR/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.inner.addr)
    }

    /// Its `node_id` label.
    pub fn node_id(&self) -> &str {
        &self.inner.shared.node_id
    }

    /// Requests answered so far (any mode).
    pub fn scrapes(&self) -> u64 {
        self.inner.shared.scrapes.load(Ordering::Relaxed)
    }

    fn update(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.inner.shared.behaviour());
    }

    /// No active egress (the types once used stay exported with 0).
    pub fn set_idle(&self) {
        self.update(|b| b.active.values_mut().for_each(|count| *count = 0));
    }

    /// Sets the active egress count of one reported type (`room_composite`, `track`, ...).
    pub fn set_active(&self, reported_type: &str, count: u64) {
        self.update(|b| {
            b.active.insert(reported_type.to_owned(), count);
        });
    }

    /// Replaces all active counts: busy with exactly these jobs.
    pub fn set_busy(&self, jobs: &[(&str, u64)]) {
        self.update(|b| {
            b.active.values_mut().for_each(|count| *count = 0);
            for (reported_type, count) in jobs {
                *b.active.entry((*reported_type).to_owned()).or_default() += count;
            }
        });
    }

    /// One more active egress of a reported type (a job the livekit-server stand-in started).
    pub fn add_job(&self, reported_type: &str) {
        self.update(|b| *b.active.entry(reported_type.to_owned()).or_default() += 1);
    }

    /// One active egress of a reported type less (its job ended); false when there was none.
    pub fn remove_job(&self, reported_type: &str) -> bool {
        let mut removed = false;
        self.update(|b| {
            if let Some(count) = b.active.get_mut(reported_type)
                && *count > 0
            {
                *count -= 1;
                removed = true;
            }
        });
        removed
    }

    /// Active egress by reported type, zero counts left out.
    pub fn active(&self) -> BTreeMap<String, u64> {
        let behaviour = self.inner.shared.behaviour();
        behaviour
            .active
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(kind, count)| (kind.clone(), *count))
            .collect()
    }

    /// Whether it would take a job at all: not draining, not disabled, no `cluster_id`.
    pub fn takes_jobs(&self) -> bool {
        let behaviour = self.inner.shared.behaviour();
        !behaviour.terminating && !behaviour.disabled && behaviour.cluster_id.is_empty()
    }

    /// The CPU and cost table it was started with.
    pub fn settings(&self) -> &Settings {
        &self.inner.shared.settings
    }

    /// Draining after SIGTERM.
    pub fn set_terminating(&self, terminating: bool) {
        self.update(|b| b.terminating = terminating);
    }

    /// Disabled by its config.
    pub fn set_disabled(&self, disabled: bool) {
        self.update(|b| b.disabled = disabled);
    }

    /// Reports this `livekit_node_cpu_load` instead of the one derived from the jobs.
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

    /// Stops listening: new connections are refused and idle kept-alive ones are closed.
    pub async fn go_down(&self) {
        let Some(server) = self.inner.server.lock().await.take() else {
            return;
        };
        server.stop.cancel();
        // Resolves (with an error) once the listener has been dropped.
        let _ = server.listener_closed.await;
        self.inner
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server.task);
    }

    /// Listens again on the same address after [`EgressPodStandIn::go_down`].
    pub async fn come_back(&self) -> io::Result<()> {
        let mut server = self.inner.server.lock().await;
        if server.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.inner.addr).await?;
        *server = Some(serve(listener, self.inner.shared.clone()));
        Ok(())
    }

    /// The series it exports now, omitted ones left out.
    pub fn samples(&self) -> Vec<StandInSample> {
        samples(&self.inner.shared, &self.inner.shared.behaviour())
    }

    /// The metric text it serves now in [`BodyMode::Metrics`].
    pub fn metrics_text(&self) -> String {
        render(&self.samples())
    }
}

/// Computes the series from the pod's state (DESIGN.md 2.1 and 2.2).
fn samples(shared: &Shared, b: &Behaviour) -> Vec<StandInSample> {
    let settings = &shared.settings;
    let total: u64 = b.active.values().sum();
    let used: u64 = b
        .active
        .iter()
        .map(|(kind, count)| settings.costs.cost_of_reported_type(kind) * count)
        .sum();
    let cost = settings.costs.cost(EgressKind::RoomComposite);
    let fits = if total == 0 {
        cost <= settings.pod_cpu
    } else {
        settings.busy_capacity() as i64 - used as i64 >= cost as i64
    };
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let available = !b.disabled && total == 0;
    let can_accept = !b.disabled && !b.terminating && fits;
    let load = b
        .cpu_load
        .unwrap_or_else(|| (0.02 + used as f64 / settings.pod_cpu.max(1) as f64).min(1.0));

    let base = || {
        vec![
            ("cluster_id", b.cluster_id.clone()),
            ("node_id", shared.node_id.clone()),
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
            value: flag(b.disabled),
        },
        StandInSample {
            name: IS_TERMINATING,
            labels: base(),
            value: flag(b.terminating),
        },
    ];
    for (kind, count) in &b.active {
        let mut labels = base();
        labels.push(("type", kind.clone()));
        out.push(StandInSample {
            name: REQUESTS,
            labels,
            value: *count as f64,
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
            _ => render(&samples(&shared, &b)),
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

    #[tokio::test]
    async fn text_follows_design_2_2() {
        let pod = EgressPodStandIn::start().await.unwrap();
        let idle = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(idle.available, Some(true));
        assert_eq!(idle.can_accept_request, Some(true));
        assert_eq!(idle.node_id.as_deref(), Some(pod.node_id()));

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

        pod.set_idle();
        pod.set_terminating(true);
        let draining = parse_pod_metrics(pod.metrics_text().as_bytes()).unwrap();
        assert_eq!(draining.is_terminating, Some(true));
        assert_eq!(draining.available, Some(true));
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
    }
}
