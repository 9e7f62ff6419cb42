//! A burst through the queue against the same burst sent straight to livekit-server, both
//! against the livekit-server stand-in with its real start timing (a 1 s handler launch, and
//! 0.5 s more on an idle pod for the bid window; concurrent starts that pick the same idle pod
//! are refused by it and retried 1-2 s later, as livekit-server does).
//!
//! Side by side in each round, on fresh pods:
//! - `direct`: the room composites sent as parallel start calls straight to the stand-in,
//!   timed from the first call to the last answer;
//! - `queue`: the same requests enqueued and started by the dispatcher (default settings:
//!   64 starts in flight, the fleet read every 2 s), timed from the first enqueue to the last
//!   ticket recorded active;
//! - `queue, one answer lost`: the same with the answer of one start lost (the egress starts,
//!   the answer never comes): the time until the 99 others are active.
//!
//! Then the start rate with a 1 s answer time (busy pods with room to spare: a busy pod's bid
//! wins at once, so each start takes the launch time only): parallel calls against the queue.
//!
//! `cargo bench --bench dispatch_burst` (needs `redis-server`; env `BURST_ROOMS`, default 100,
//! `BURST_ROUNDS`, default 3; `BURST_RATE_STARTS`, default 256). Medians of the rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_scaler::config::ApiCredentials;
use egress_scaler::dispatch::livekit::{DEFAULT_REQUEST_TIMEOUT, EgressApi, TwirpEgressApi};
use egress_scaler::dispatch::{DispatchOptions, Dispatcher};
use egress_scaler::egress_request::StartRequest;
use egress_scaler::fleet::{FleetMetrics, FleetObserver, FleetOptions, FleetSource};
use egress_scaler::model::{EgressKind, Settings};
use egress_scaler::queue::{
    NewRequest, QueueName, QueueStore, StoreOptions, TicketId, TicketState, run_event_listener,
};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, ScriptedStart, StartTiming,
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

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rooms = env_number("BURST_ROOMS", 100).clamp(2, 1000);
    let rounds = env_number("BURST_ROUNDS", 3).clamp(1, 20);
    let rate_starts = env_number("BURST_RATE_STARTS", 256).clamp(16, 10_000);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(rooms, rounds, rate_starts));
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A stand-in livekit-server with `pods` pods of `settings`, real start timing.
struct Cluster {
    livekit: LiveKitServerStandIn,
    pods: Vec<EgressPodStandIn>,
    settings: Settings,
}

impl Cluster {
    async fn start(pods: usize, settings: Settings, seed: u64) -> Cluster {
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut started = Vec::with_capacity(pods);
        for _ in 0..pods {
            started.push(
                EgressPodStandIn::start_on(local, settings.clone())
                    .await
                    .expect("pod stand-in"),
            );
        }
        let livekit = LiveKitServerStandIn::start(
            LiveKitStandInOptions {
                settings: settings.clone(),
                any_room_exists: true,
                timing: StartTiming::real(),
                seed,
                ..LiveKitStandInOptions::default()
            },
            started.clone(),
        )
        .await
        .expect("livekit-server stand-in");
        Cluster {
            livekit,
            pods: started,
            settings,
        }
    }

    fn api(&self) -> TwirpEgressApi {
        let options = self.livekit.options();
        TwirpEgressApi::new(
            &self.livekit.url(),
            ApiCredentials {
                key: options.api_key.clone(),
                secret: options.api_secret.clone(),
            },
            DEFAULT_REQUEST_TIMEOUT,
        )
        .expect("client")
    }
}

fn request(kind: EgressKind, room: &str) -> StartRequest {
    let body = match kind {
        EgressKind::Track => Some(serde_json::json!({ "trackId": "TR_audio" })),
        _ => None,
    };
    StartRequest::parse(kind, room, body).expect("valid request")
}

/// Every request as a parallel call straight to livekit-server: time to the last answer.
async fn direct(cluster: &Cluster, requests: &[StartRequest]) -> Duration {
    let api = Arc::new(cluster.api());
    let began = Instant::now();
    let calls = requests.iter().cloned().map(|request| {
        let api = api.clone();
        tokio::spawn(async move { api.start(&request, DEFAULT_REQUEST_TIMEOUT).await })
    });
    let answers = futures::future::join_all(calls).await;
    let took = began.elapsed();
    let failed = answers
        .iter()
        .filter(|answer| !matches!(answer, Ok(Ok(_))))
        .count();
    assert_eq!(failed, 0, "every direct start succeeds");
    took
}

/// The requests through the queue and the dispatcher: time from the first enqueue until
/// `wanted` of them are active.
async fn queued(
    redis: &RedisServer,
    cluster: &Cluster,
    queue: &str,
    requests: &[StartRequest],
    wanted: usize,
) -> Duration {
    let store = QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .expect("store");
    let queue: QueueName = queue.parse().expect("queue name");
    let mut registry = Registry::default();
    let (observer, fleet) = FleetObserver::new(
        FleetSource::Static(cluster.pods.iter().map(|pod| pod.metrics_url()).collect()),
        FleetOptions::default(),
        cluster.settings.clone(),
        FleetMetrics::new(&mut registry),
    )
    .expect("fleet observer");
    let stop = CancellationToken::new();
    let observing = tokio::spawn(observer.run(stop.clone()));
    let (events, _) = broadcast::channel(4096);
    let listening = tokio::spawn(run_event_listener(
        store.client().clone(),
        events.clone(),
        stop.clone(),
    ));
    // The fleet is known before the burst, as in a running deployment.
    while fleet
        .current()
        .map_or(true, |view| view.pods.len() < cluster.pods.len())
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dispatcher = Dispatcher::new(
        queue.clone(),
        store.clone(),
        fleet,
        cluster.api(),
        cluster.settings.clone(),
        DispatchOptions::default(),
        "bench".to_owned(),
        events,
        DispatchMetrics::new(&mut registry),
    );
    let dispatching = tokio::spawn(dispatcher.run(stop.clone()));
    // Leading before the burst.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let began = Instant::now();
    let mut tickets: Vec<TicketId> = Vec::with_capacity(requests.len());
    for request in requests {
        let enqueued = store
            .enqueue(
                &queue,
                NewRequest {
                    kind: request.kind(),
                    room_name: request.room_name().unwrap_or_default().to_owned(),
                    request: Some(request.to_json()),
                    dedup_key: None,
                },
                egress_scaler::intake::now_ms(),
            )
            .await
            .expect("enqueue");
        tickets.push(enqueued.ticket);
    }
    let deadline = began + Duration::from_secs(120);
    let took = loop {
        let mut active = 0;
        for ticket in &tickets {
            let state = store.get(ticket).await.expect("ticket").map(|t| t.state);
            active += usize::from(state == Some(TicketState::Active));
        }
        if active >= wanted {
            break began.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "only {active} of {wanted} started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.cancel();
    let _ = dispatching.await;
    let _ = observing.await;
    let _ = listening.await;
    took
}

async fn run(rooms: usize, rounds: usize, rate_starts: usize) {
    let redis = RedisServer::start().expect("redis-server starts");
    let composites: Vec<StartRequest> = (0..rooms)
        .map(|i| request(EgressKind::RoomComposite, &format!("room-{i}")))
        .collect();
    let (mut direct_times, mut queue_times, mut lost_times) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let seed = round as u64 + 1;
        let cluster = Cluster::start(rooms, Settings::default(), seed).await;
        direct_times.push(direct(&cluster, &composites).await);
        let cluster = Cluster::start(rooms, Settings::default(), seed).await;
        queue_times.push(
            queued(
                &redis,
                &cluster,
                &format!("burst-{round}"),
                &composites,
                rooms,
            )
            .await,
        );
        let cluster = Cluster::start(rooms, Settings::default(), seed).await;
        cluster.livekit.script_start(ScriptedStart::StartedButLost);
        lost_times.push(
            queued(
                &redis,
                &cluster,
                &format!("lost-{round}"),
                &composites,
                rooms - 1,
            )
            .await,
        );
    }
    let direct_median = median(direct_times.clone());
    let queue = median(queue_times.clone());
    let lost = median(lost_times.clone());
    println!(
        "dispatch burst: {rooms} room composites onto {rooms} idle 4-core pods, stand-in with real start timing (launch 1 s, bid window 0.5 s), {rounds} rounds, medians"
    );
    println!("| path | last start | x direct | rounds |");
    println!("|---|---|---|---|");
    let row = |name: &str, median: Duration, all: &[Duration]| {
        let all: Vec<String> = all.iter().map(|d| secs(*d)).collect();
        println!(
            "| {name} | {} | {:.2} | {} |",
            secs(median),
            median.as_secs_f64() / direct_median.as_secs_f64(),
            all.join(", ")
        );
    };
    row("direct: parallel start calls", direct_median, &direct_times);
    row("queue: enqueue to last active", queue, &queue_times);
    row(
        &format!("queue, one answer lost: the other {}", rooms - 1),
        lost,
        &lost_times,
    );

    // Start rate with a 1 s answer time: busy pods with room for every job.
    let roomy = Settings {
        pod_cpu: 1_000_000,
        ..Settings::default()
    };
    let tracks: Vec<StartRequest> = (0..rate_starts)
        .map(|i| request(EgressKind::Track, &format!("rate-{i}")))
        .collect();
    let cluster = Cluster::start(4, roomy.clone(), 7).await;
    // One job per pod first: busy pods win bids at once, so each start takes the launch (1 s).
    let warm: Vec<StartRequest> = (0..4)
        .map(|i| request(EgressKind::Track, &format!("warm-{i}")))
        .collect();
    for request in &warm {
        cluster
            .api()
            .start(request, DEFAULT_REQUEST_TIMEOUT)
            .await
            .expect("warm-up start");
    }
    let direct_rate = direct(&cluster, &tracks).await;
    let cluster = Cluster::start(4, roomy, 7).await;
    for request in &warm {
        cluster
            .api()
            .start(request, DEFAULT_REQUEST_TIMEOUT)
            .await
            .expect("warm-up start");
    }
    let queue_rate = queued(&redis, &cluster, "rate", &tracks, rate_starts).await;
    println!();
    println!(
        "start rate, {rate_starts} track egress onto 4 busy pods with room to spare, 1 s answer time (default --max-in-flight 64)"
    );
    println!("| path | time | starts/s |");
    println!("|---|---|---|");
    for (name, took) in [
        ("direct: parallel start calls", direct_rate),
        ("queue", queue_rate),
    ] {
        println!(
            "| {name} | {} | {:.1} |",
            secs(took),
            rate_starts as f64 / took.as_secs_f64()
        );
    }
}
