//! The dispatcher against a livekit-server stand-in that answers at once (its timing scaled to
//! zero: no launch, no bid window), with free capacity:
//! the latency from an enqueue to the start call it leads to (p50, p99), and starts per
//! second, draining a backlog and with enqueues arriving at full speed meanwhile.
//!
//! `cargo bench --bench dispatch` (needs `redis-server`; env `DISPATCH_BENCH_SAMPLES`,
//! default 500, and `DISPATCH_BENCH_BACKLOG`, default 1000). The fleet refreshes every 2 s,
//! the `serve` default. Goal: p99 under 20 ms beyond the fleet refresh interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_scaler::config::ApiCredentials;
use egress_scaler::dispatch::livekit::{DEFAULT_REQUEST_TIMEOUT, TwirpEgressApi};
use egress_scaler::dispatch::{DispatchOptions, Dispatcher};
use egress_scaler::fleet::{Fleet, FleetMetrics, FleetObserver, FleetOptions, FleetSource};
use egress_scaler::model::{EgressKind, Settings};
use egress_scaler::queue::{
    NewRequest, QueueEvent, QueueName, QueueStore, StoreOptions, run_event_listener,
};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use egress_scaler::telemetry::DispatchMetrics;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let samples = env_number("DISPATCH_BENCH_SAMPLES", 500).clamp(10, 100_000);
    let backlog = env_number("DISPATCH_BENCH_BACKLOG", 1000).clamp(10, 100_000);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(samples, backlog));
}

struct Bench {
    store: QueueStore,
    fleet: Fleet,
    livekit: LiveKitServerStandIn,
    events: broadcast::Sender<QueueEvent>,
    metrics: Arc<DispatchMetrics>,
    settings: Settings,
    queue: QueueName,
}

impl Bench {
    fn spawn_dispatcher(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let options = self.livekit.options();
        let api = TwirpEgressApi::new(
            &self.livekit.url(),
            ApiCredentials {
                key: options.api_key.clone(),
                secret: options.api_secret.clone(),
            },
            DEFAULT_REQUEST_TIMEOUT,
        )
        .expect("client");
        let dispatcher = Dispatcher::new(
            self.queue.clone(),
            self.store.clone(),
            self.fleet.clone(),
            api,
            self.settings.clone(),
            DispatchOptions::default(),
            "bench".to_owned(),
            self.events.clone(),
            self.metrics.clone(),
        );
        let stop = CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            dispatcher
                .run(token)
                .await
                .expect("no fault injection here");
        });
        (stop, handle)
    }

    async fn enqueue(&self, room: &str) {
        self.store
            .enqueue(
                &self.queue,
                NewRequest {
                    kind: EgressKind::Track,
                    room_name: room.to_owned(),
                    request: Some(format!(r#"{{"roomName":"{room}","trackId":"TR_a"}}"#)),
                    dedup_key: None,
                },
                egress_scaler::intake::now_ms(),
            )
            .await
            .expect("enqueue");
    }

    async fn wait_started(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.livekit.started_count() < count {
            assert!(Instant::now() < deadline, "the dispatcher stalled");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

async fn run(samples: usize, backlog: usize) {
    let redis = RedisServer::start().expect("redis-server starts");
    let store = QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .expect("store");
    // Free capacity throughout: two very large pods.
    let settings = Settings {
        pod_cpu: 100_000_000,
        ..Settings::default()
    };
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let pods = vec![
        EgressPodStandIn::start_on(local, settings.clone())
            .await
            .unwrap(),
        EgressPodStandIn::start_on(local, settings.clone())
            .await
            .unwrap(),
    ];
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            settings: settings.clone(),
            any_room_exists: true,
            timing: StartTiming::scaled(0.0),
            ..LiveKitStandInOptions::default()
        },
        pods.clone(),
    )
    .await
    .unwrap();
    let mut registry = Registry::default();
    let fleet_options = FleetOptions::default();
    let refresh = fleet_options.refresh_interval;
    let (observer, fleet) = FleetObserver::new(
        FleetSource::Static(pods.iter().map(|pod| pod.metrics_url()).collect()),
        fleet_options,
        settings.clone(),
        FleetMetrics::new(&mut registry),
    )
    .unwrap();
    let metrics = DispatchMetrics::new(&mut registry);
    let stop = CancellationToken::new();
    tokio::spawn(observer.run(stop.clone()));
    let (events, _) = broadcast::channel(4096);
    tokio::spawn(run_event_listener(
        store.client().clone(),
        events.clone(),
        stop.clone(),
    ));
    while fleet.current().is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bench = Bench {
        store,
        fleet,
        livekit,
        events,
        metrics,
        settings,
        queue: "bench".parse().unwrap(),
    };

    // 1. One request at a time: enqueue -> start call.
    let (dispatcher, handle) = bench.spawn_dispatcher();
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let room = format!("latency-{i}");
        // From the moment the enqueue call is made: the start may come before its reply.
        let enqueued = Instant::now();
        bench.enqueue(&room).await;
        bench.wait_started(i + 1).await;
        let started = bench.livekit.started();
        let call = started
            .iter()
            .find(|egress| egress.room_name == room)
            .expect("started");
        latencies.push(call.requested_at.saturating_duration_since(enqueued));
        // Let the dispatcher go idle, as between real requests.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies.sort();

    // 2. A backlog queued while no dispatcher ran, then drained.
    dispatcher.cancel();
    handle.await.unwrap();
    for i in 0..backlog {
        bench.enqueue(&format!("backlog-{i}")).await;
    }
    let before = bench.livekit.started().len();
    let drain_started = Instant::now();
    let (dispatcher, handle) = bench.spawn_dispatcher();
    bench.wait_started(before + backlog).await;
    let drain = drain_started.elapsed();

    // 3. Enqueues at full speed while dispatching.
    let before = bench.livekit.started().len();
    let both_started = Instant::now();
    for i in 0..backlog {
        bench.enqueue(&format!("stream-{i}")).await;
    }
    let enqueue_time = both_started.elapsed();
    bench.wait_started(before + backlog).await;
    let both = both_started.elapsed();
    dispatcher.cancel();
    handle.await.unwrap();
    stop.cancel();

    let starts = bench.livekit.started();
    assert_eq!(
        bench.livekit.start_calls() as usize,
        starts.len(),
        "no failed start"
    );
    println!();
    println!(
        "dispatch: stand-in answers at once, free capacity, fleet refresh {refresh:?}, {samples} samples, backlog {backlog}"
    );
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| enqueue call -> start call received, p50 | {} |",
        ms(percentile(&latencies, 0.50))
    );
    println!(
        "| enqueue call -> start call received, p99 | {} |",
        ms(percentile(&latencies, 0.99))
    );
    println!(
        "| enqueue call -> start call received, max | {} |",
        ms(*latencies.last().unwrap())
    );
    println!(
        "| backlog of {backlog} drained | {:.0} starts/s ({:.2} s) |",
        backlog as f64 / drain.as_secs_f64(),
        drain.as_secs_f64()
    );
    println!(
        "| {backlog} enqueued at full speed ({:.0}/s) while dispatching | {:.0} starts/s ({:.2} s) |",
        backlog as f64 / enqueue_time.as_secs_f64(),
        backlog as f64 / both.as_secs_f64(),
        both.as_secs_f64()
    );
    let p99 = percentile(&latencies, 0.99);
    println!(
        "goal: p99 under 20 ms beyond the fleet refresh interval: {}",
        if p99 < Duration::from_millis(20) {
            "met (no refresh wait at all)"
        } else if p99 < refresh + Duration::from_millis(20) {
            "met"
        } else {
            "NOT met"
        }
    );
}
