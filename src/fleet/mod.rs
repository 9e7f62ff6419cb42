//! Placeholder of the fleet observer until the fleet branch lands (same public API).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::model::{FleetSnapshot, PodState, Settings};

#[derive(Debug, Clone)]
pub enum FleetSource {
    None,
    Static(Vec<String>),
    Dns { host: String, port: u16 },
    Prometheus { url: String },
}

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub refresh_interval: Duration,
    pub scrape_timeout: Duration,
    pub max_body_bytes: usize,
    pub concurrency: usize,
    pub unknown_grace: Duration,
    pub stale_after: Duration,
}
impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            refresh_interval: Duration::from_secs(2),
            scrape_timeout: Duration::from_secs(1),
            max_body_bytes: 4 << 20,
            concurrency: 32,
            unknown_grace: Duration::from_secs(10),
            stale_after: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodView {
    pub address: String,
    pub node_id: Option<String>,
    pub state: PodState,
    pub active: BTreeMap<String, u64>,
    pub free_cpu_cores: f64,
    pub cpu_load: Option<f64>,
    pub can_accept_video: Option<bool>,
    pub last_scrape_age_seconds: Option<f64>,
    pub missing_series: Vec<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FleetView {
    pub pods: Vec<PodView>,
    pub refreshed_at: Instant,
    pub refresh_duration: Duration,
    pub source_error: Option<String>,
}
impl FleetView {
    pub fn snapshot(&self) -> FleetSnapshot {
        FleetSnapshot::default()
    }
    pub fn age(&self) -> Duration {
        Duration::ZERO
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet source failing: {0}")]
    SourceFailing(String),
    #[error("fleet snapshot stale: {age:?}")]
    Stale { age: Duration },
}

#[derive(Clone)]
pub struct Fleet {
    rx: watch::Receiver<Arc<FleetView>>,
}
impl Fleet {
    pub fn none() -> Fleet {
        let (tx, rx) = watch::channel(Arc::new(FleetView {
            pods: vec![],
            refreshed_at: Instant::now(),
            refresh_duration: Duration::ZERO,
            source_error: None,
        }));
        std::mem::forget(tx);
        Fleet { rx }
    }
    pub fn current(&self) -> Result<Arc<FleetView>, FleetError> {
        Ok(self.view())
    }
    pub fn view(&self) -> Arc<FleetView> {
        self.rx.borrow().clone()
    }
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetView>> {
        self.rx.clone()
    }
}

pub struct FleetMetrics;
impl FleetMetrics {
    pub fn new(_registry: &mut prometheus_client::registry::Registry) -> Self {
        FleetMetrics
    }
}

pub struct FleetObserver;
impl FleetObserver {
    pub fn new(
        _source: FleetSource,
        _options: FleetOptions,
        _settings: Settings,
        _metrics: FleetMetrics,
    ) -> Result<(Self, Fleet), FleetError> {
        Err(FleetError::SourceFailing("not built yet".into()))
    }
    pub async fn run(self, _shutdown: tokio_util::sync::CancellationToken) {}
}
