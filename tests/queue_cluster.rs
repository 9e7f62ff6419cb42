//! The Redis queue against a real Redis Cluster: three `redis-server` primaries per test,
//! with one queue whose slot is on each of them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use egress_scaler::model::EgressKind;
use egress_scaler::queue::{
    NewRequest, QueueEvent, QueueName, QueueStore, StoreOptions, TicketState, run_event_listener,
};
use egress_scaler::redis_server::RedisCluster;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A fixed "now" so that stored times are predictable.
const T0: u64 = 1_700_000_000_000;
/// The set of queue names, outside any queue's slot.
const QUEUES_KEY: &str = "egress-scaler:queues";

struct Fixture {
    cluster: RedisCluster,
    store: QueueStore,
    /// `queues[i]` has its slot on node `i`.
    queues: Vec<QueueName>,
}

impl Fixture {
    async fn start() -> Self {
        let cluster = RedisCluster::start(3).expect("the cluster starts");
        Self::connect(cluster, 0).await
    }

    /// A store connected through node `via`.
    async fn connect(cluster: RedisCluster, via: usize) -> Self {
        let queues = queue_per_node(&cluster).await;
        let store = QueueStore::connect(&cluster.urls()[via], StoreOptions::default())
            .await
            .expect("the store connects");
        Fixture {
            cluster,
            store,
            queues,
        }
    }
}

fn request(kind: EgressKind, room: &str) -> NewRequest {
    NewRequest {
        kind,
        room_name: room.to_owned(),
        request: None,
        dedup_key: None,
    }
}

async fn node_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The node serving `key`, from `CLUSTER KEYSLOT`.
async fn node_of_key(cluster: &RedisCluster, key: &str) -> usize {
    let mut connection = node_connection(&cluster.url()).await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap();
    cluster.node_of_slot(slot)
}

/// One queue name per node, the i-th with its slot on node i.
async fn queue_per_node(cluster: &RedisCluster) -> Vec<QueueName> {
    let mut found: Vec<Option<QueueName>> = vec![None; cluster.size()];
    for n in 0.. {
        let queue: QueueName = format!("rooms-{n}").parse().unwrap();
        let node = node_of_key(cluster, &format!("{}pending", queue.key_prefix())).await;
        found[node].get_or_insert(queue);
        if found.iter().all(Option::is_some) {
            break;
        }
        assert!(n < 1000, "no queue name found for some node");
    }
    found.into_iter().map(Option::unwrap).collect()
}

/// How many keys of `queue` each node holds.
async fn keys_per_node(cluster: &RedisCluster, queue: &QueueName) -> Vec<usize> {
    let mut counts = Vec::new();
    for url in cluster.urls() {
        let mut connection = node_connection(&url).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("egress-scaler:{{{queue}}}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        counts.push(keys.len());
    }
    counts
}

/// Waits up to `limit` for an event matching `wanted`.
async fn wait_for(
    events: &mut broadcast::Receiver<QueueEvent>,
    limit: Duration,
    wanted: impl Fn(&QueueEvent) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return true,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return false,
        }
    }
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_on_every_node_go_through_their_whole_life() {
    let fx = Fixture::start().await;
    for (node, queue) in fx.queues.iter().enumerate() {
        let first = fx
            .store
            .enqueue(queue, request(EgressKind::RoomComposite, "a"), T0)
            .await
            .unwrap();
        assert!(!first.duplicate);
        assert_eq!(first.position, Some(0));
        let again = fx
            .store
            .enqueue(queue, request(EgressKind::RoomComposite, "a"), T0 + 1)
            .await
            .unwrap();
        assert!(again.duplicate, "queue {queue}: the dedup key was not held");
        assert_eq!(again.ticket, first.ticket);
        let second = fx
            .store
            .enqueue(queue, request(EgressKind::Track, "b"), T0 + 2)
            .await
            .unwrap();
        assert_eq!(second.position, Some(1));

        let demand = fx.store.demand(queue).await.unwrap();
        assert_eq!(demand.count(EgressKind::RoomComposite), 1);
        assert_eq!(demand.count(EgressKind::Track), 1);
        let stats = fx.store.stats(queue).await.unwrap();
        assert_eq!(stats.depth, 2);
        assert_eq!(stats.oldest_enqueued_at_ms, Some(T0));
        let head = fx.store.peek(queue).await.unwrap().unwrap();
        assert_eq!(head.id, first.ticket);

        let ticket = first.ticket;
        let claimed = fx.store.claim(&ticket, "attempt-1", T0 + 10).await.unwrap();
        assert_eq!(claimed.unwrap().state, TicketState::Dispatching);
        assert!(
            fx.store
                .mark_started(&ticket, &format!("EG_{node}"), T0 + 20)
                .await
                .unwrap()
        );
        assert_eq!(
            fx.store
                .ticket_for_egress(queue, &format!("EG_{node}"))
                .await
                .unwrap(),
            Some(ticket.clone())
        );
        let stats = fx.store.stats(queue).await.unwrap();
        assert_eq!((stats.depth, stats.active, stats.demand.total()), (1, 1, 1));
        assert!(fx.store.mark_ended(&ticket, T0 + 30).await.unwrap());
        let ended = fx.store.get(&ticket).await.unwrap().unwrap();
        assert_eq!(ended.state, TicketState::Ended);
        assert_eq!(ended.started_at_ms, Some(T0 + 20));
        // The dedup key is free again.
        let fresh = fx
            .store
            .enqueue(queue, request(EgressKind::RoomComposite, "a"), T0 + 40)
            .await
            .unwrap();
        assert!(!fresh.duplicate);
        assert_ne!(fresh.ticket, ticket);

        // Every key of the queue, built in the scripts included, is on the queue's node.
        let mut expected = vec![0; fx.cluster.size()];
        expected[node] = keys_per_node(&fx.cluster, queue).await[node];
        assert!(expected[node] > 5, "{expected:?}");
        assert_eq!(keys_per_node(&fx.cluster, queue).await, expected);
    }
    let mut all = fx.queues.clone();
    all.sort();
    assert_eq!(fx.store.queues().await.unwrap(), all);
    fx.store.ping().await.unwrap();

    // Any node's URL reaches the same cluster.
    let other = QueueStore::connect(&fx.cluster.urls()[2], StoreOptions::default())
        .await
        .unwrap();
    for queue in &fx.queues {
        assert_eq!(other.stats(queue).await.unwrap().depth, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_enqueues_make_one_ticket_on_every_node() {
    let fx = Fixture::start().await;
    let tasks: Vec<_> = fx
        .queues
        .iter()
        .flat_map(|queue| std::iter::repeat_n(queue, 50))
        .map(|queue| {
            let store = fx.store.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                let enqueued = store
                    .enqueue(&queue, request(EgressKind::RoomComposite, "all-hands"), T0)
                    .await
                    .unwrap();
                (queue, enqueued)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    for queue in &fx.queues {
        let mine: Vec<_> = results
            .iter()
            .filter(|(q, _)| q == queue)
            .map(|(_, enqueued)| enqueued)
            .collect();
        assert_eq!(mine.len(), 50);
        let tickets: HashSet<_> = mine.iter().map(|e| e.ticket.clone()).collect();
        assert_eq!(tickets.len(), 1, "queue {queue}");
        assert_eq!(mine.iter().filter(|e| e.duplicate).count(), 49);
        assert!(mine.iter().all(|e| e.position == Some(0)));
        let stats = fx.store.stats(queue).await.unwrap();
        assert_eq!((stats.depth, stats.demand.total()), (1, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_listener_hears_queues_on_every_node() {
    let fx = Fixture::start().await;
    let (sender, mut events) = broadcast::channel(64);
    let shutdown = CancellationToken::new();
    let listener = tokio::spawn(run_event_listener(
        fx.store.client().clone(),
        sender,
        shutdown.clone(),
    ));
    assert!(
        wait_for(&mut events, Duration::from_secs(5), |event| *event
            == QueueEvent::Resync)
        .await
    );
    for queue in &fx.queues {
        fx.store
            .enqueue(queue, request(EgressKind::Web, "w"), T0)
            .await
            .unwrap();
        let changed = QueueEvent::Changed(queue.clone());
        assert!(
            wait_for(&mut events, Duration::from_secs(2), |event| *event
                == changed)
            .await,
            "no event for queue {queue}"
        );
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), listener)
        .await
        .expect("the listener stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_and_store_outlive_the_node_of_the_url() {
    let cluster = RedisCluster::start(3).expect("the cluster starts");
    // The URL's node is one that does not hold the set of queue names, which every
    // enqueue writes to.
    let names_node = node_of_key(&cluster, QUEUES_KEY).await;
    let victim = (0..cluster.size()).find(|&i| i != names_node).unwrap();
    let mut fx = Fixture::connect(cluster, victim).await;
    let survivor = (0..fx.cluster.size()).find(|&i| i != victim).unwrap();
    let (sender, mut events) = broadcast::channel(64);
    let shutdown = CancellationToken::new();
    let listener = tokio::spawn(run_event_listener(
        fx.store.client().clone(),
        sender,
        shutdown.clone(),
    ));
    assert!(
        wait_for(&mut events, Duration::from_secs(5), |event| *event
            == QueueEvent::Resync)
        .await
    );
    // Subscribed, and the other nodes learned.
    fx.store
        .enqueue(&fx.queues[survivor], request(EgressKind::Web, "w"), T0)
        .await
        .unwrap();
    let changed = QueueEvent::Changed(fx.queues[survivor].clone());
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );

    fx.cluster.node_mut(victim).stop();
    assert!(
        wait_for(&mut events, Duration::from_secs(5), |event| *event
            == QueueEvent::Resync)
        .await,
        "the listener did not subscribe on another node"
    );
    // Queues on the other nodes keep working, and their changes are heard.
    let store = fx.store.clone();
    let queue = fx.queues[survivor].clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let store = store.clone();
            let queue = queue.clone();
            async move {
                store
                    .enqueue(&queue, request(EgressKind::Web, "x"), T0 + 1)
                    .await
                    .is_ok()
            }
        })
        .await
    );
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );
    assert_eq!(store.demand(&queue).await.unwrap().total(), 2);

    // The victim's queue fails quickly while its node is away, and works once it is back.
    let lost = fx.queues[victim].clone();
    let started = Instant::now();
    assert!(fx.store.demand(&lost).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    fx.cluster.node_mut(victim).start_again().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let store = store.clone();
            let lost = lost.clone();
            async move {
                store
                    .enqueue(&lost, request(EgressKind::Web, "y"), T0 + 2)
                    .await
                    .is_ok()
            }
        })
        .await,
        "the store did not reconnect to the restarted node"
    );
    let changed = QueueEvent::Changed(lost.clone());
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );
    fx.store.ping().await.unwrap();

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), listener)
        .await
        .expect("the listener stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_delays_its_own_queues_only() {
    let mut fx = Fixture::start().await;
    for queue in &fx.queues {
        fx.store
            .enqueue(queue, request(EgressKind::Web, "w"), T0)
            .await
            .unwrap();
    }
    // A frozen process keeps its connections open and answers nothing, like a node whose
    // network vanished.
    let silent = 1;
    let pid = fx.cluster.node_mut(silent).pid().unwrap();
    signal(pid, "STOP");

    // Calls on the silent node's queue time out, and each timeout asks for a new
    // connection; meanwhile the other queues answer as usual.
    let watch = Duration::from_secs(4);
    let prober = {
        let store = fx.store.clone();
        let queue = fx.queues[silent].clone();
        tokio::spawn(async move {
            let begin = Instant::now();
            let mut slowest = Duration::ZERO;
            while begin.elapsed() < watch {
                let started = Instant::now();
                assert!(store.demand(&queue).await.is_err());
                slowest = slowest.max(started.elapsed());
            }
            slowest
        })
    };
    let begin = Instant::now();
    let mut slowest = Duration::ZERO;
    while begin.elapsed() < watch {
        for (node, queue) in fx.queues.iter().enumerate() {
            if node != silent {
                let started = Instant::now();
                assert_eq!(fx.store.demand(queue).await.unwrap().total(), 1);
                slowest = slowest.max(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let silent_slowest = prober.await.unwrap();
    assert!(
        silent_slowest < Duration::from_secs(3),
        "{silent_slowest:?}"
    );

    signal(pid, "CONT");
    let store = fx.store.clone();
    let queue = fx.queues[silent].clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let store = store.clone();
            let queue = queue.clone();
            async move { store.demand(&queue).await.is_ok_and(|d| d.total() == 1) }
        })
        .await,
        "the silent node's queue did not come back"
    );
}
