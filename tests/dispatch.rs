//! The dispatcher against a real Redis, stand-in egress pods observed by the real fleet
//! observer, and the livekit-server stand-in: order, capacity, outcomes, leases, Redis
//! restarts, and fault injection at every step.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_scaler::config::ApiCredentials;
use egress_scaler::dispatch::lease::{Lease, read_leader};
use egress_scaler::dispatch::livekit::{EgressApi, EgressApiError, ListFilter, TwirpEgressApi};
use egress_scaler::dispatch::{
    DispatchError, DispatchOptions, Dispatcher, FaultHook, FaultPoint, Order,
};
use egress_scaler::egress_request::StartRequest;
use egress_scaler::fleet::{Fleet, FleetMetrics, FleetObserver, FleetOptions, FleetSource};
use egress_scaler::model::{EgressKind, Settings};
use egress_scaler::queue::{
    NewRequest, QueueError, QueueEvent, QueueName, QueueStore, StoreOptions, TicketId, TicketState,
    run_event_listener,
};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use egress_scaler::telemetry::DispatchMetrics;
use livekit_protocol as proto;
use prometheus_client::registry::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The client timeout of the stand-in calls; the settle time is above it.
const CALL_TIMEOUT: Duration = Duration::from_millis(400);

fn fast_options() -> DispatchOptions {
    DispatchOptions {
        order: Order::Strict,
        lease: Duration::from_millis(300),
        lease_margin: Duration::from_millis(50),
        max_in_flight: 64,
        call_timeout: CALL_TIMEOUT,
        settle_after: CALL_TIMEOUT + Duration::from_millis(200),
        unreachable_limit: Duration::from_secs(2),
        not_found_retry: Duration::from_millis(300),
        backoff_first: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        reconcile_interval: Duration::from_secs(30),
        recheck_interval: Duration::from_millis(30),
        poll_interval: Duration::from_millis(100),
        reservation_lag: Duration::ZERO,
        backfill_window: 32,
        clock_skew: Duration::from_secs(2),
        drain_grace: Duration::from_millis(500),
    }
}

fn queue(name: &str) -> QueueName {
    name.parse().unwrap()
}

/// Redis, pods, their observer, the livekit-server stand-in and the queue event listener.
struct World {
    redis: RedisServer,
    store: QueueStore,
    livekit: LiveKitServerStandIn,
    pods: Vec<EgressPodStandIn>,
    /// Pods only the fleet sees, kept serving their metrics.
    _phantoms: Vec<EgressPodStandIn>,
    fleet: Fleet,
    events: broadcast::Sender<QueueEvent>,
    metrics: Arc<DispatchMetrics>,
    registry: Arc<Mutex<Registry>>,
    settings: Settings,
    stop: CancellationToken,
}

struct WorldSetup {
    redis: Option<RedisServer>,
    /// Pods both the fleet and livekit-server see.
    pods: usize,
    /// Pods only the fleet sees (its metrics say idle, livekit-server knows nothing of them).
    phantom_pods: usize,
    settings: Settings,
    livekit: LiveKitStandInOptions,
}

impl Default for WorldSetup {
    fn default() -> Self {
        WorldSetup {
            redis: None,
            pods: 1,
            phantom_pods: 0,
            settings: Settings::default(),
            livekit: LiveKitStandInOptions {
                no_capacity_delay: Duration::from_millis(50),
                any_room_exists: true,
                timing: StartTiming::scaled(0.02),
                ..LiveKitStandInOptions::default()
            },
        }
    }
}

impl World {
    async fn start(setup: WorldSetup) -> World {
        support::init();
        // `RUST_LOG=egress_scaler=info` shows what the dispatchers did.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let redis = setup.redis.unwrap_or_else(support::redis);
        let store = QueueStore::connect(&redis.url(), StoreOptions::default())
            .await
            .unwrap();
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut pods = Vec::new();
        for _ in 0..setup.pods {
            pods.push(
                EgressPodStandIn::start_on(local, setup.settings.clone())
                    .await
                    .unwrap(),
            );
        }
        let mut phantoms = Vec::new();
        for _ in 0..setup.phantom_pods {
            phantoms.push(
                EgressPodStandIn::start_on(local, setup.settings.clone())
                    .await
                    .unwrap(),
            );
        }
        let observed: Vec<&EgressPodStandIn> = pods.iter().chain(&phantoms).collect();
        let livekit = LiveKitServerStandIn::start(
            LiveKitStandInOptions {
                settings: setup.settings.clone(),
                ..setup.livekit
            },
            pods.clone(),
        )
        .await
        .unwrap();
        let mut registry = Registry::default();
        let (observer, fleet) = FleetObserver::new(
            FleetSource::Static(observed.iter().map(|pod| pod.metrics_url()).collect()),
            FleetOptions {
                refresh_interval: Duration::from_millis(50),
                scrape_timeout: Duration::from_millis(500),
                stale_after: Duration::from_secs(5),
                ..FleetOptions::default()
            },
            setup.settings.clone(),
            FleetMetrics::new(&mut registry),
        )
        .unwrap();
        let metrics = DispatchMetrics::new(&mut registry);
        let stop = CancellationToken::new();
        tokio::spawn(observer.run(stop.clone()));
        let (events, _) = broadcast::channel(1024);
        tokio::spawn(run_event_listener(
            store.client().clone(),
            events.clone(),
            stop.clone(),
        ));
        World {
            redis,
            store,
            livekit,
            pods,
            _phantoms: phantoms,
            fleet,
            events,
            metrics,
            registry: Arc::new(Mutex::new(registry)),
            settings: setup.settings,
            stop,
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
            CALL_TIMEOUT,
        )
        .unwrap()
    }

    fn dispatcher<A: EgressApi>(
        &self,
        queue: &QueueName,
        api: A,
        options: DispatchOptions,
        holder: &str,
    ) -> Dispatcher<A> {
        Dispatcher::new(
            queue.clone(),
            self.store.clone(),
            self.fleet.clone(),
            api,
            self.settings.clone(),
            options,
            holder.to_owned(),
            self.events.clone(),
            self.metrics.clone(),
        )
    }

    fn spawn(&self, queue: &QueueName, options: DispatchOptions, holder: &str) -> Running {
        Running::spawn(self.dispatcher(queue, self.api(), options, holder))
    }

    async fn enqueue(&self, queue: &QueueName, kind: EgressKind, room: &str) -> TicketId {
        let request = StartRequest::parse(kind, room, request_for(kind)).unwrap();
        let enqueued = self
            .store
            .enqueue(
                queue,
                NewRequest {
                    kind,
                    room_name: room.to_owned(),
                    request: Some(request.to_json()),
                    dedup_key: None,
                },
                now_ms(),
            )
            .await
            .unwrap();
        assert!(!enqueued.duplicate);
        enqueued.ticket
    }

    async fn state(&self, ticket: &TicketId) -> TicketState {
        self.store.get(ticket).await.unwrap().unwrap().state
    }

    fn started_rooms(&self) -> Vec<String> {
        self.livekit
            .started()
            .into_iter()
            .map(|egress| egress.room_name)
            .collect()
    }

    fn metrics_text(&self) -> String {
        egress_scaler::telemetry::encode(&self.registry.lock().unwrap())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn request_for(kind: EgressKind) -> Option<serde_json::Value> {
    match kind {
        EgressKind::Track => Some(serde_json::json!({"trackId": "TR_audio"})),
        EgressKind::Participant => Some(serde_json::json!({"identity": "speaker"})),
        EgressKind::TrackComposite => Some(serde_json::json!({"audioTrackId": "TR_audio"})),
        EgressKind::Web | EgressKind::AudioWeb => {
            Some(serde_json::json!({"url": "https://example.com/board"}))
        }
        _ => None,
    }
}

fn now_ms() -> u64 {
    egress_scaler::intake::now_ms()
}

/// A dispatcher task and its own shutdown token.
struct Running {
    handle: JoinHandle<Result<(), DispatchError>>,
    stop: CancellationToken,
}

impl Running {
    fn spawn<A: EgressApi>(dispatcher: Dispatcher<A>) -> Running {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(dispatcher.run(stop.clone()));
        Running { handle, stop }
    }

    /// Graceful shutdown: the lease is released.
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .expect("the dispatcher stops in time")
            .unwrap()
            .unwrap();
    }

    /// Like a killed process: nothing is released.
    async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn counter(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leader_is_fenced_out_of_every_transition() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("fenced");
    let ticket = world.enqueue(&q, EgressKind::RoomComposite, "r").await;
    let ttl = Duration::from_millis(200);
    let a = Lease::acquire(&world.store, &q, "a", ttl, now_ms())
        .await
        .unwrap()
        .expect("free lease");
    assert!(
        Lease::acquire(&world.store, &q, "b", ttl, now_ms())
            .await
            .unwrap()
            .is_none(),
        "one holder at a time"
    );
    assert_eq!(
        read_leader(&world.store, &q).await.unwrap().unwrap().holder,
        "a"
    );
    let claimed = world
        .store
        .fenced(a.token())
        .claim(&ticket, "attempt-a", now_ms())
        .await
        .unwrap()
        .expect("queued");
    assert_eq!(claimed.state, TicketState::Dispatching);

    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let b = Lease::acquire(&world.store, &q, "b", ttl, now_ms())
        .await
        .unwrap()
        .expect("expired lease is free");
    assert_eq!(b.token(), a.token() + 1);
    let stale = world.store.fenced(a.token());
    assert!(matches!(
        stale.mark_started(&ticket, "EG_stale", now_ms()).await,
        Err(QueueError::Fenced)
    ));
    assert!(matches!(
        stale.requeue(&ticket, "attempt-a").await,
        Err(QueueError::Fenced)
    ));
    assert!(matches!(
        stale.mark_failed(&ticket, "x", now_ms()).await,
        Err(QueueError::Fenced)
    ));
    assert_eq!(world.state(&ticket).await, TicketState::Dispatching);
    assert!(!a.renew().await.unwrap());
    assert!(!a.release().await.unwrap());
    // The new holder settles the old attempt.
    assert!(
        world
            .store
            .fenced(b.token())
            .requeue(&ticket, "attempt-a")
            .await
            .unwrap()
    );
    let claim = world
        .store
        .fenced(b.token())
        .claim(&ticket, "attempt-b", now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.attempt_id.as_deref(), Some("attempt-b"));
    assert!(b.release().await.unwrap());
    assert!(read_leader(&world.store, &q).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_to_ask_is_the_first_to_start_under_contention() {
    let world = World::start(WorldSetup {
        livekit: LiveKitStandInOptions {
            egress_duration: Some(Duration::from_millis(60)),
            no_capacity_delay: Duration::from_millis(50),
            any_room_exists: true,
            ..WorldSetup::default().livekit
        },
        ..WorldSetup::default()
    })
    .await;
    let q = queue("fifo");
    // Concurrent enqueues: their FIFO order is whatever Redis made of them.
    let enqueues = (0..10).map(|i| {
        let world = &world;
        let q = &q;
        async move {
            world
                .enqueue(q, EgressKind::RoomComposite, &format!("room-{i}"))
                .await
        }
    });
    futures::future::join_all(enqueues).await;
    let expected: Vec<String> = world
        .store
        .peek_n(&q, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|ticket| ticket.room_name)
        .collect();
    assert_eq!(expected.len(), 10);
    // Two replicas compete for the lease; one 4-core pod takes one composite at a time.
    let a = world.spawn(&q, fast_options(), "replica-a");
    let b = world.spawn(&q, fast_options(), "replica-b");
    assert!(
        eventually(Duration::from_secs(20), || async {
            world.livekit.started().len() == 10
        })
        .await,
        "started {:?}",
        world.started_rooms()
    );
    assert_eq!(world.started_rooms(), expected);
    assert_eq!(
        world.livekit.start_calls(),
        10,
        "no start is sent while the snapshot shows no free pod"
    );
    // The outcome is recorded once the answer is back, a moment after the 10th start.
    // A start slower than the call timeout (a loaded machine) is adopted rather than started.
    let recorded = || {
        let text = world.metrics_text();
        let outcome = |name: &str| {
            counter(
                &text,
                &format!("egress_scaler_dispatch_outcomes_total{{outcome=\"{name}\"}}"),
            )
        };
        (
            outcome("started") + outcome("adopted"),
            counter(&text, "egress_scaler_enqueue_to_start_seconds_count"),
        )
    };
    assert!(
        eventually(Duration::from_secs(5), || async { recorded() == (10, 10) }).await,
        "{:?}",
        recorded()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_holds_the_queue_and_backfill_lets_a_small_job_pass() {
    for order in [Order::Strict, Order::Backfill] {
        let world = World::start(WorldSetup::default()).await;
        // Someone else's track egress: 0.5 + 4 > 3.2, a composite fits nowhere.
        world.pods[0].set_busy(&[("track", 1)]);
        assert!(
            eventually(Duration::from_secs(5), || async {
                world.fleet.current().is_ok_and(|view| {
                    view.pods
                        .iter()
                        .any(|pod| pod.active.get("track") == Some(&1))
                })
            })
            .await,
            "the fleet shows the busy pod"
        );
        let q = queue("order");
        world.enqueue(&q, EgressKind::RoomComposite, "big").await;
        world.enqueue(&q, EgressKind::Track, "small").await;
        let running = world.spawn(
            &q,
            DispatchOptions {
                order,
                ..fast_options()
            },
            "d",
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        match order {
            Order::Strict => {
                assert_eq!(world.livekit.start_calls(), 0, "nothing passes the head");
                world.pods[0].set_idle();
                assert!(
                    eventually(Duration::from_secs(5), || async {
                        world.livekit.started().len() == 1
                    })
                    .await
                );
                assert_eq!(world.started_rooms(), ["big"]);
            }
            Order::Backfill => {
                assert!(
                    eventually(Duration::from_secs(5), || async {
                        world.livekit.started().len() == 1
                    })
                    .await
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert_eq!(world.started_rooms(), ["small"]);
                assert_eq!(world.livekit.start_calls(), 1);
            }
        }
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_claim_is_adopted_and_never_started_twice() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("late");
    // The egress starts at once but the answer comes after the caller's timeout.
    world.livekit.set_answer_delay(CALL_TIMEOUT * 2);
    let first = world
        .enqueue(&q, EgressKind::RoomComposite, "slow-answer")
        .await;
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&first).await == TicketState::Active
        })
        .await
    );
    // The egress starts only after the caller gave up.
    world.livekit.set_answer_delay(Duration::ZERO);
    world
        .livekit
        .set_claim_delay(CALL_TIMEOUT + Duration::from_millis(100));
    world.pods[0].set_idle();
    world.livekit.end_all();
    let second = world.enqueue(&q, EgressKind::Track, "slow-claim").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&second).await == TicketState::Active
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = world.livekit.started();
    assert_eq!(world.started_rooms(), ["slow-answer", "slow-claim"]);
    for (ticket, egress) in [(&first, &started[0]), (&second, &started[1])] {
        let ticket = world.store.get(ticket).await.unwrap().unwrap();
        assert_eq!(ticket.egress_id.as_deref(), Some(egress.egress_id.as_str()));
    }
    let text = world.metrics_text();
    assert_eq!(
        counter(
            &text,
            "egress_scaler_dispatch_outcomes_total{outcome=\"unknown\"}"
        ),
        2
    );
    assert_eq!(
        counter(
            &text,
            "egress_scaler_dispatch_outcomes_total{outcome=\"adopted\"}"
        ),
        2
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_keeps_the_head_waiting_and_retries_with_backoff() {
    // The fleet sees an idle pod that livekit-server does not have: capacity "raced away".
    let world = World::start(WorldSetup {
        pods: 0,
        phantom_pods: 1,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("raced");
    let head = world.enqueue(&q, EgressKind::RoomComposite, "head").await;
    let next = world.enqueue(&q, EgressKind::Track, "next").await;
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.start_calls() >= 3
        })
        .await,
        "calls {}, fleet {:?}",
        world.livekit.start_calls(),
        world.fleet.current().map(|v| v.pods.clone()),
    );
    assert!(world.livekit.started().is_empty());
    // Between attempts the head is back at its place (during one it is `dispatching`).
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.store.position(&head).await.unwrap() == Some(0)
                && world.store.position(&next).await.unwrap() == Some(1)
        })
        .await
    );
    let text = world.metrics_text();
    assert!(
        counter(
            &text,
            "egress_scaler_dispatch_outcomes_total{outcome=\"unavailable\"}"
        ) >= 3
    );
    // Capacity comes: the head first.
    for _ in 0..2 {
        world.livekit.add_pod(
            EgressPodStandIn::start_on(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                Settings::default(),
            )
            .await
            .unwrap(),
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.started().len() == 2
        })
        .await
    );
    assert_eq!(world.started_rooms(), ["head", "next"]);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_room_is_retried_for_a_while_then_fails_without_holding_others() {
    let world = World::start(WorldSetup {
        pods: 2,
        livekit: LiveKitStandInOptions {
            any_room_exists: false,
            no_capacity_delay: Duration::from_millis(50),
            ..WorldSetup::default().livekit
        },
        ..WorldSetup::default()
    })
    .await;
    world.livekit.create_room("exists");
    let q = queue("rooms");
    let ghost = world.enqueue(&q, EgressKind::RoomComposite, "ghost").await;
    let real = world.enqueue(&q, EgressKind::RoomComposite, "exists").await;
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ghost).await == TicketState::Failed
        })
        .await
    );
    assert_eq!(world.state(&real).await, TicketState::Active);
    assert!(world.livekit.start_calls() >= 3, "retried before failing");
    let dead = world.store.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ghost);
    let error = dead[0].error.clone().unwrap();
    assert!(
        error.contains("room") && error.contains("not_found"),
        "{error}"
    );
    // The de-duplication key is free again.
    let again = world.enqueue(&q, EgressKind::RoomComposite, "ghost").await;
    assert_ne!(again, ghost);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_fails_at_once_and_keeps_its_error() {
    let world = World::start(WorldSetup {
        pods: 2,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("refused");
    world
        .livekit
        .fail_next_start("invalid_argument", "unsupported output");
    world
        .livekit
        .fail_next_start("permission_denied", "no permissions to access the room");
    let a = world.enqueue(&q, EgressKind::RoomComposite, "a").await;
    let b = world.enqueue(&q, EgressKind::RoomComposite, "b").await;
    let c = world.enqueue(&q, EgressKind::RoomComposite, "c").await;
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&c).await == TicketState::Active
        })
        .await
    );
    assert_eq!(
        world.livekit.start_calls(),
        3,
        "no retry of a refused request"
    );
    for (ticket, code) in [(&a, "invalid_argument"), (&b, "permission_denied")] {
        let failed = world.store.get(ticket).await.unwrap().unwrap();
        assert_eq!(failed.state, TicketState::Failed);
        assert!(failed.error.unwrap().contains(code));
    }
    assert_eq!(world.store.stats(&q).await.unwrap().dead_letters, 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_the_lease_time() {
    let world = World::start(WorldSetup {
        pods: 2,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("failover");
    let options = fast_options();
    let lease = options.lease;
    let a = world.spawn(&q, options.clone(), "a");
    assert!(
        eventually(Duration::from_secs(5), || async {
            read_leader(&world.store, &q)
                .await
                .unwrap()
                .is_some_and(|leader| leader.holder == "a")
        })
        .await
    );
    let b = world.spawn(&q, options.clone(), "b");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_at = Instant::now();
    a.kill().await;
    let ticket = world
        .enqueue(&q, EgressKind::RoomComposite, "after-kill")
        .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await
    );
    let took = killed_at.elapsed();
    assert!(
        took < lease + Duration::from_millis(700),
        "took over after {took:?}"
    );
    let leader = read_leader(&world.store, &q).await.unwrap().unwrap();
    assert_eq!(leader.holder, "b");
    // A clean shutdown releases the lease: the next one leads at once.
    b.shutdown().await;
    assert!(read_leader(&world.store, &q).await.unwrap().is_none());
    let c = world.spawn(&q, options, "c");
    let handover = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async {
            read_leader(&world.store, &q)
                .await
                .unwrap()
                .is_some_and(|leader| leader.holder == "c")
        })
        .await
    );
    assert!(handover.elapsed() < lease, "{:?}", handover.elapsed());
    let text = world.metrics_text();
    assert!(
        text.contains("egress_scaler_dispatch_leader{queue=\"failover\",holder=\"c\"} 1"),
        "{text}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_tickets_whose_egress_ended_unseen_are_ended_by_the_reconcile() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("reconcile");
    let ticket = world.enqueue(&q, EgressKind::RoomComposite, "r").await;
    let running = world.spawn(
        &q,
        DispatchOptions {
            reconcile_interval: Duration::from_millis(200),
            ..fast_options()
        },
        "d",
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await
    );
    // No webhook is configured: only the reconcile can notice.
    world.livekit.end_all();
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Ended
        })
        .await
    );
    let again = world.enqueue(&q, EgressKind::RoomComposite, "r").await;
    assert_ne!(again, ticket, "the de-duplication key is free");
    running.shutdown().await;
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_the_queue_and_nothing_starts_twice() {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "egress-scaler-dispatch-{}",
        uuid::Uuid::new_v4().simple()
    )));
    let redis = RedisServer::start_persistent(&dir.0).unwrap();
    let mut world = World::start(WorldSetup {
        redis: Some(redis),
        ..WorldSetup::default()
    })
    .await;
    let q = queue("durable");
    let mut tickets = Vec::new();
    for i in 0..4 {
        tickets.push(
            world
                .enqueue(&q, EgressKind::RoomComposite, &format!("room-{i}"))
                .await,
        );
    }
    let running = world.spawn(
        &q,
        DispatchOptions {
            reconcile_interval: Duration::from_millis(200),
            ..fast_options()
        },
        "d",
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.started().len() == 1
        })
        .await
    );
    world.redis.restart().unwrap();
    // One pod, one composite at a time: each recording ends, the reconcile notices, the next
    // starts.
    for started in 2..=4 {
        world.livekit.end_all();
        assert!(
            eventually(Duration::from_secs(15), || async {
                world.livekit.started().len() == started
            })
            .await,
            "started {:?}",
            world.started_rooms()
        );
        if started == 2 {
            world.redis.restart().unwrap();
        }
    }
    assert_eq!(
        world.started_rooms(),
        ["room-0", "room-1", "room-2", "room-3"]
    );
    let started = world.livekit.started();
    assert!(
        eventually(Duration::from_secs(10), || async {
            world.state(&tickets[3]).await == TicketState::Active
        })
        .await
    );
    for (ticket, egress) in tickets.iter().zip(&started) {
        let ticket = world.store.get(ticket).await.unwrap().unwrap();
        assert!(
            matches!(ticket.state, TicketState::Active | TicketState::Ended),
            "{ticket:?}"
        );
        assert_eq!(ticket.egress_id.as_deref(), Some(egress.egress_id.as_str()));
    }
    running.shutdown().await;
}

/// Kills the dispatcher at the `nth` time it reaches `point`.
struct CrashPlan {
    point: FaultPoint,
    nth: u32,
    seen: AtomicU32,
    fired: AtomicBool,
}

impl FaultHook for CrashPlan {
    fn crash_at(&self, point: FaultPoint) -> bool {
        point == self.point
            && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.nth
            && !self.fired.swap(true, Ordering::SeqCst)
    }
}

/// The real client, with injected lost answers, early give-ups and unreachable servers.
struct FlakyApi {
    inner: TwirpEgressApi,
    rng: Mutex<StdRng>,
}

impl FlakyApi {
    fn roll(&self) -> f64 {
        self.rng.lock().unwrap().random()
    }
}

impl EgressApi for FlakyApi {
    async fn start(
        &self,
        request: &StartRequest,
        limit: Duration,
    ) -> Result<proto::EgressInfo, EgressApiError> {
        let roll = self.roll();
        if roll < 0.05 {
            return Err(EgressApiError::Unreachable("injected".to_owned()));
        }
        if roll < 0.15 {
            // The caller gives up at once: the egress may start anyway (a late claim).
            let early = Duration::from_millis(2);
            return match tokio::time::timeout(early, self.inner.start(request, limit)).await {
                Ok(result) => result,
                Err(_) => Err(EgressApiError::Timeout(early)),
            };
        }
        let result = self.inner.start(request, limit).await;
        if roll < 0.25 && result.is_ok() {
            return Err(EgressApiError::Transport(
                "answer lost (injected)".to_owned(),
            ));
        }
        result
    }

    async fn list_egress(
        &self,
        filter: &ListFilter,
        active: bool,
    ) -> Result<Vec<proto::EgressInfo>, EgressApiError> {
        if self.roll() < 0.05 {
            return Err(EgressApiError::Transport("injected".to_owned()));
        }
        self.inner.list_egress(filter, active).await
    }

    async fn stop_egress(&self, egress_id: &str) -> Result<proto::EgressInfo, EgressApiError> {
        self.inner.stop_egress(egress_id).await
    }
}

/// Total dispatcher kills to reach, and the time allowed for them.
const KILLS: u32 = 200;
const KILL_BUDGET: Duration = Duration::from_secs(45);
const WORKERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_any_step_no_request_is_lost_or_started_twice() {
    let settings = Settings {
        // Room for every job of the test: capacity is not what this test is about.
        pod_cpu: 4_000_000,
        ..Settings::default()
    };
    let world = Arc::new(
        World::start(WorldSetup {
            pods: 2,
            settings,
            ..WorldSetup::default()
        })
        .await,
    );
    // Every egress starts a little after its call arrives, so that a caller that gave up
    // early (or died) is followed by a late claim that a hasty retry would duplicate.
    world.livekit.set_claim_delay(Duration::from_millis(40));
    let kills = Arc::new(AtomicU32::new(0));
    let hits: Arc<Mutex<HashMap<FaultPoint, u32>>> = Arc::default();
    let deadline = Instant::now() + KILL_BUDGET;
    let workers = (0..WORKERS).map(|worker| {
        let (world, kills, hits) = (world.clone(), kills.clone(), hits.clone());
        tokio::spawn(async move { crash_trials(world, worker, kills, hits, deadline).await })
    });
    let mut trials = 0;
    let mut tickets = 0;
    for result in futures::future::join_all(workers).await {
        let (worker_trials, worker_tickets) = result.unwrap();
        trials += worker_trials;
        tickets += worker_tickets;
    }
    let kills = kills.load(Ordering::SeqCst);
    println!("{trials} trials, {tickets} tickets, {kills} kills, by point: {hits:?}");
    assert!(kills >= KILLS, "only {kills} kills in {KILL_BUDGET:?}");
    assert_eq!(
        world.livekit.started().len(),
        tickets,
        "one egress per ticket"
    );
}

/// Runs trials on one queue until enough kills happened in total; returns (trials, tickets).
async fn crash_trials(
    world: Arc<World>,
    worker: usize,
    kills: Arc<AtomicU32>,
    hits: Arc<Mutex<HashMap<FaultPoint, u32>>>,
    deadline: Instant,
) -> (usize, usize) {
    let q = queue(&format!("crash-{worker}"));
    let mut rng = StdRng::seed_from_u64(worker as u64 + 1);
    let kinds = [
        EgressKind::RoomComposite,
        EgressKind::AudioRoomComposite,
        EgressKind::Track,
        EgressKind::Participant,
    ];
    let mut trials = 0;
    let mut tickets_total = 0;
    let mut generation = 0u32;
    while Instant::now() < deadline && kills.load(Ordering::SeqCst) < KILLS {
        trials += 1;
        let mut tickets = Vec::new();
        for k in 0..3 {
            let room = format!("w{worker}-t{trials}-{k}");
            let kind = kinds[rng.random_range(0..kinds.len())];
            tickets.push((room.clone(), world.enqueue(&q, kind, &room).await));
        }
        tickets_total += tickets.len();
        for chain in 0.. {
            generation += 1;
            let plan = (chain < 4 && rng.random_bool(0.9)).then(|| {
                Arc::new(CrashPlan {
                    point: FaultPoint::ALL[rng.random_range(0..FaultPoint::ALL.len())],
                    nth: rng.random_range(1..=3),
                    seen: AtomicU32::new(0),
                    fired: AtomicBool::new(false),
                })
            });
            let api = FlakyApi {
                inner: world.api(),
                rng: Mutex::new(StdRng::seed_from_u64(rng.random())),
            };
            let mut dispatcher =
                world.dispatcher(&q, api, fast_options(), &format!("w{worker}-g{generation}"));
            if let Some(plan) = &plan {
                dispatcher = dispatcher.with_faults(plan.clone());
            }
            let running = Running::spawn(dispatcher);
            let trial_limit = Instant::now() + Duration::from_secs(20);
            loop {
                if running.handle.is_finished() {
                    break;
                }
                let mut done = true;
                for (_, ticket) in &tickets {
                    done &= world.state(ticket).await == TicketState::Active;
                }
                if done {
                    running.stop.cancel();
                    break;
                }
                assert!(Instant::now() < trial_limit, "trial stuck: {tickets:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            match running.handle.await.unwrap() {
                Err(DispatchError::Crashed(point)) => {
                    kills.fetch_add(1, Ordering::SeqCst);
                    *hits.lock().unwrap().entry(point).or_default() += 1;
                }
                Ok(()) => {}
            }
            let mut done = true;
            for (_, ticket) in &tickets {
                done &= world.state(ticket).await == TicketState::Active;
            }
            if done {
                break;
            }
        }
        // Exactly one egress per ticket, and the ticket records it.
        let started = world.livekit.started();
        for (room, ticket) in &tickets {
            let egress: Vec<_> = started.iter().filter(|e| &e.room_name == room).collect();
            assert_eq!(egress.len(), 1, "{room}: {egress:?}");
            let ticket = world.store.get(ticket).await.unwrap().unwrap();
            assert_eq!(
                ticket.egress_id.as_deref(),
                Some(egress[0].egress_id.as_str())
            );
            // Done with it: end the recording so that the active set stays small.
            world.livekit.end_egress(&egress[0].egress_id);
            assert!(world.store.mark_ended(&ticket.id, now_ms()).await.unwrap());
        }
    }
    (trials, tickets_total)
}

/// What the test's client makes of one start call, by room (or URL for web egress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Play {
    /// A proxy in front of livekit-server answers 502 with an HTML page; nothing reached it.
    ProxyPageNotSent,
    /// The egress starts; its answer is lost on the way back.
    StartedAnswerLost,
    /// The egress starts and ends at once (a short recording); its answer is lost.
    StartedEndedAnswerLost,
    /// The egress starts; livekit-server's same-ID retry met it running: `already_exists`.
    StartedAlreadyExists,
    /// No pod bid: `unavailable` after a while, nothing started.
    Unavailable,
}

/// What `ListEgress` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    Real,
    /// An older server's `not_found` for a room filter.
    NotFound,
    /// livekit-server cannot be reached.
    Unreachable,
}

/// The real client in front of the stand-in, with scripted answers for some calls.
struct ScriptedApi {
    inner: TwirpEgressApi,
    livekit: LiveKitServerStandIn,
    plays: Mutex<HashMap<String, std::collections::VecDeque<Play>>>,
    listing: Arc<Mutex<Listing>>,
    /// Start calls being answered now, and the most at once.
    calls: AtomicU32,
    most_calls: Arc<AtomicU32>,
}

impl ScriptedApi {
    fn new(world: &World) -> Self {
        ScriptedApi {
            inner: world.api(),
            livekit: world.livekit.clone(),
            plays: Mutex::default(),
            listing: Arc::new(Mutex::new(Listing::Real)),
            calls: AtomicU32::new(0),
            most_calls: Arc::default(),
        }
    }

    fn play(self, target: &str, play: Play) -> Self {
        self.plays
            .lock()
            .unwrap()
            .entry(target.to_owned())
            .or_default()
            .push_back(play);
        self
    }

    fn listing(self, listing: Listing) -> Self {
        *self.listing.lock().unwrap() = listing;
        self
    }
}

fn target(request: &StartRequest) -> String {
    match request {
        StartRequest::Web(web) => web.url.clone(),
        _ => request.room_name().unwrap_or_default().to_owned(),
    }
}

impl EgressApi for ScriptedApi {
    async fn start(
        &self,
        request: &StartRequest,
        limit: Duration,
    ) -> Result<proto::EgressInfo, EgressApiError> {
        let now = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_calls.fetch_max(now, Ordering::SeqCst);
        let play = self
            .plays
            .lock()
            .unwrap()
            .get_mut(&target(request))
            .and_then(|plays| plays.pop_front());
        let result = match play {
            Some(Play::ProxyPageNotSent) => Err(EgressApiError::Transport(
                "HTTP 502 Bad Gateway without a Twirp error body".to_owned(),
            )),
            Some(Play::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Err(EgressApiError::Twirp {
                    code: "unavailable".to_owned(),
                    msg: "twirp error unknown: no response from servers".to_owned(),
                })
            }
            None => self.inner.start(request, limit).await,
            Some(play) => match self.inner.start(request, limit).await {
                Ok(info) => Err(match play {
                    Play::StartedAlreadyExists => EgressApiError::Twirp {
                        code: "already_exists".to_owned(),
                        msg: "egress already exists".to_owned(),
                    },
                    Play::StartedEndedAnswerLost => {
                        self.livekit.end_egress(&info.egress_id);
                        // ENDING, then COMPLETE once uploaded: over before anyone looks.
                        let over = || {
                            self.livekit.egress(&info.egress_id).is_some_and(|egress| {
                                egress.status == proto::EgressStatus::EgressComplete as i32
                            })
                        };
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while !over() && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        EgressApiError::Transport("connection reset (injected)".to_owned())
                    }
                    _ => EgressApiError::Transport("connection reset (injected)".to_owned()),
                }),
                Err(error) => Err(error),
            },
        };
        self.calls.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn list_egress(
        &self,
        filter: &ListFilter,
        active: bool,
    ) -> Result<Vec<proto::EgressInfo>, EgressApiError> {
        let listing = *self.listing.lock().unwrap();
        match listing {
            Listing::Real => self.inner.list_egress(filter, active).await,
            Listing::NotFound => Err(EgressApiError::Twirp {
                code: "not_found".to_owned(),
                msg: "room not found".to_owned(),
            }),
            Listing::Unreachable => Err(EgressApiError::Unreachable("refused".to_owned())),
        }
    }

    async fn stop_egress(&self, egress_id: &str) -> Result<proto::EgressInfo, EgressApiError> {
        self.inner.stop_egress(egress_id).await
    }
}

fn outcome(world: &World, name: &str) -> u64 {
    counter(
        &world.metrics_text(),
        &format!("egress_scaler_dispatch_outcomes_total{{outcome=\"{name}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_starts_are_in_flight_and_a_lost_answer_holds_back_no_other() {
    let world = World::start(WorldSetup {
        pods: 6,
        ..WorldSetup::default()
    })
    .await;
    // Every start takes a while to answer, as livekit-server's bid window does.
    world.livekit.set_answer_delay(Duration::from_millis(150));
    let q = queue("pipeline");
    // Its settling cannot conclude yet: livekit-server cannot be listed for now.
    let api = ScriptedApi::new(&world)
        .play("lost", Play::StartedAnswerLost)
        .listing(Listing::Unreachable);
    let most_calls = api.most_calls.clone();
    let listing = api.listing.clone();
    let mut tickets = vec![world.enqueue(&q, EgressKind::RoomComposite, "lost").await];
    for i in 0..5 {
        tickets.push(
            world
                .enqueue(&q, EgressKind::RoomComposite, &format!("room-{i}"))
                .await,
        );
    }
    let options = DispatchOptions {
        unreachable_limit: Duration::from_secs(60),
        ..fast_options()
    };
    let running = Running::spawn(world.dispatcher(&q, api, options, "d"));
    // The five others start while the lost answer is still being settled.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let mut active = 0;
            for ticket in &tickets[1..] {
                active += usize::from(world.state(ticket).await == TicketState::Active);
            }
            active == 5
        })
        .await
    );
    assert_eq!(world.state(&tickets[0]).await, TicketState::Dispatching);
    assert!(
        most_calls.load(Ordering::SeqCst) >= 5,
        "starts in flight at once: {}",
        most_calls.load(Ordering::SeqCst)
    );
    // Then the lost answer's egress is found and adopted: one egress per room.
    *listing.lock().unwrap() = Listing::Real;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&tickets[0]).await == TicketState::Active
        })
        .await
    );
    assert_eq!(world.livekit.started().len(), 6);
    assert_eq!(outcome(&world, "adopted"), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_handed_out_in_order_of_asking() {
    let world = World::start(WorldSetup {
        pods: 3,
        livekit: LiveKitStandInOptions {
            egress_duration: Some(Duration::from_millis(300)),
            no_capacity_delay: Duration::from_millis(50),
            any_room_exists: true,
            ..WorldSetup::default().livekit
        },
        ..WorldSetup::default()
    })
    .await;
    world.livekit.set_answer_delay(Duration::from_millis(100));
    let q = queue("in-order");
    let mut expected = Vec::new();
    for i in 0..9 {
        let room = format!("room-{i}");
        world.enqueue(&q, EgressKind::RoomComposite, &room).await;
        expected.push(room);
    }
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(15), || async {
            world.livekit.started().len() == 9
        })
        .await,
        "{:?}",
        world.started_rooms()
    );
    // Three pods: three at a time, the first three to ask first, and so on.
    let started = world.started_rooms();
    for wave in started.chunks(3).zip(expected.chunks(3)) {
        let (mut got, mut want) = (wave.0.to_vec(), wave.1.to_vec());
        got.sort();
        want.sort();
        assert_eq!(got, want, "{started:?}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_started_nothing_is_never_followed_by_an_adoption() {
    let world = World::start(WorldSetup {
        pods: 2,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("not-ours");
    world
        .livekit
        .fail_next_start("unavailable", "no response from servers");
    let ticket = world.enqueue(&q, EgressKind::RoomComposite, "board").await;
    let running = world.spawn(
        &q,
        DispatchOptions {
            backoff_first: Duration::from_millis(600),
            backoff_max: Duration::from_millis(600),
            ..fast_options()
        },
        "d",
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.start_calls() == 1
        })
        .await
    );
    // Meanwhile someone else records the same room with another layout, and it completes.
    let theirs = StartRequest::parse(
        EgressKind::RoomComposite,
        "board",
        Some(serde_json::json!({"layout": "grid"})),
    )
    .unwrap();
    let theirs = world.api().start(&theirs, CALL_TIMEOUT).await.unwrap();
    world.livekit.end_egress(&theirs.egress_id);
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await
    );
    let recorded = world.store.get(&ticket).await.unwrap().unwrap();
    assert_ne!(
        recorded.egress_id.as_deref(),
        Some(theirs.egress_id.as_str())
    );
    assert_eq!(world.livekit.started().len(), 2, "ours was started");
    assert_eq!(outcome(&world, "adopted"), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_listing_answers_not_found_is_settled_after_its_window() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("settle-not-found");
    let api = ScriptedApi::new(&world)
        .play("proxied", Play::ProxyPageNotSent)
        .listing(Listing::NotFound);
    let ticket = world
        .enqueue(&q, EgressKind::RoomComposite, "proxied")
        .await;
    let running = Running::spawn(world.dispatcher(&q, api, fast_options(), "d"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await,
        "{:?}",
        world.store.get(&ticket).await
    );
    assert_eq!(world.livekit.started().len(), 1);
    assert_eq!(outcome(&world, "unknown"), 1);
    assert_eq!(outcome(&world, "requeued"), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_livekit_cannot_be_asked_about_becomes_a_dead_letter_without_holding_others() {
    let world = World::start(WorldSetup {
        pods: 2,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("settle-unreachable");
    let api = ScriptedApi::new(&world)
        .play("proxied", Play::ProxyPageNotSent)
        .listing(Listing::Unreachable);
    let stuck = world
        .enqueue(&q, EgressKind::RoomComposite, "proxied")
        .await;
    let behind = world.enqueue(&q, EgressKind::RoomComposite, "behind").await;
    let options = DispatchOptions {
        unreachable_limit: Duration::from_millis(800),
        ..fast_options()
    };
    let running = Running::spawn(world.dispatcher(&q, api, options, "d"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&behind).await == TicketState::Active
        })
        .await
    );
    assert_eq!(world.state(&stuck).await, TicketState::Dispatching);
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&stuck).await == TicketState::Failed
        })
        .await
    );
    let dead = world.store.dead_letters(&q, 5).await.unwrap();
    let error = dead[0].error.clone().unwrap();
    assert!(error.contains("could not be asked"), "{error}");
    assert_eq!(outcome(&world, "unsettled"), 1);
    // Its demand is gone, and the room can be asked for again.
    assert_eq!(world.store.demand(&q).await.unwrap().total(), 0);
    let again = world
        .enqueue(&q, EgressKind::RoomComposite, "proxied")
        .await;
    assert_ne!(again, stuck);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_web_egress_whose_answer_was_lost_is_not_started_again() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("short-web");
    let api =
        ScriptedApi::new(&world).play("https://example.com/board", Play::StartedEndedAnswerLost);
    let ticket = world.enqueue(&q, EgressKind::Web, "board").await;
    let running = Running::spawn(world.dispatcher(&q, api, fast_options(), "d"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Ended
        })
        .await,
        "{:?}",
        world.store.get(&ticket).await
    );
    tokio::time::sleep(fast_options().settle_after).await;
    assert_eq!(world.livekit.started().len(), 1, "started once");
    let ended = world.store.get(&ticket).await.unwrap().unwrap();
    assert_eq!(
        ended.egress_id.as_deref(),
        Some(world.livekit.started()[0].egress_id.as_str())
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn already_exists_means_it_started_and_is_adopted() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("exists");
    let api = ScriptedApi::new(&world).play("retried", Play::StartedAlreadyExists);
    let ticket = world
        .enqueue(&q, EgressKind::RoomComposite, "retried")
        .await;
    let running = Running::spawn(world.dispatcher(&q, api, fast_options(), "d"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await,
        "{:?}",
        world.store.get(&ticket).await
    );
    let active = world.store.get(&ticket).await.unwrap().unwrap();
    assert_eq!(
        active.egress_id.as_deref(),
        Some(world.livekit.started()[0].egress_id.as_str())
    );
    assert_eq!(world.livekit.started().len(), 1);
    assert_eq!(outcome(&world, "adopted"), 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_dispatching_is_kept_and_the_started_egress_stopped() {
    let world = World::start(WorldSetup {
        pods: 2,
        ..WorldSetup::default()
    })
    .await;
    let q = queue("cancel");
    world.livekit.set_answer_delay(Duration::from_millis(300));
    let started = world.enqueue(&q, EgressKind::RoomComposite, "a").await;
    let running = world.spawn(&q, fast_options(), "d");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&started).await == TicketState::Dispatching
        })
        .await
    );
    assert_eq!(
        world.store.cancel(&started, now_ms()).await.unwrap(),
        egress_scaler::queue::CancelOutcome::Requested
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&started).await == TicketState::Cancelled
        })
        .await
    );
    assert_eq!(world.livekit.started().len(), 1);
    // StopEgress answers ENDING; the egress is over once uploaded.
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.active_egress().is_empty()
        })
        .await,
        "stopped"
    );
    assert_eq!(outcome(&world, "cancelled"), 1);

    running.shutdown().await;

    // An attempt that started nothing is not retried once cancelled.
    let api = ScriptedApi::new(&world).play("b", Play::Unavailable);
    let running = Running::spawn(world.dispatcher(&q, api, fast_options(), "d"));
    let refused = world.enqueue(&q, EgressKind::RoomComposite, "b").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&refused).await == TicketState::Dispatching
        })
        .await
    );
    world.store.cancel(&refused, now_ms()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&refused).await == TicketState::Cancelled
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        world.livekit.start_calls(),
        1,
        "b never reached livekit-server"
    );
    assert_eq!(world.livekit.started().len(), 1);
    running.shutdown().await;
}

/// Freezes the thread of the first start call about to be sent, like a GC pause.
struct FreezeOnce {
    freeze: Duration,
    done: AtomicBool,
}

impl FaultHook for FreezeOnce {
    fn crash_at(&self, _: FaultPoint) -> bool {
        false
    }

    fn before_send(&self) {
        if !self.done.swap(true, Ordering::SeqCst) {
            std::thread::sleep(self.freeze);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_sends_nothing_when_it_wakes() {
    let world = World::start(WorldSetup::default()).await;
    let q = queue("frozen");
    let options = fast_options();
    let freeze = options.lease + options.settle_after + Duration::from_millis(600);
    let ticket = world.enqueue(&q, EgressKind::RoomComposite, "r").await;
    // The frozen leader runs alone on its thread: the freeze stops all of it, lease renewal
    // included, as a stalled process.
    let frozen = world
        .dispatcher(&q, world.api(), options.clone(), "frozen")
        .with_faults(Arc::new(FreezeOnce {
            freeze,
            done: AtomicBool::new(false),
        }));
    let frozen_stop = CancellationToken::new();
    let thread = {
        let stop = frozen_stop.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(frozen.run(stop))
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Dispatching
        })
        .await
    );
    let standby = world.spawn(&q, options, "standby");
    // The standby takes over, settles the attempt (nothing listed) and starts the ticket.
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.state(&ticket).await == TicketState::Active
        })
        .await
    );
    // The frozen leader wakes up with the start it was about to send.
    tokio::time::sleep(freeze + Duration::from_millis(500)).await;
    assert_eq!(world.livekit.started().len(), 1, "one recording");
    assert_eq!(world.livekit.start_calls(), 1);
    frozen_stop.cancel();
    let _ = thread.join();
    standby.shutdown().await;
}
