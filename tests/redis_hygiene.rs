//! Redis hygiene through the real server and a real Redis: a ticket whose hash is gone
//! (evicted, or deleted by hand) never holds the queue, and a Redis that may evict is
//! reported loudly in `status` and `/metrics`.

mod support;

use std::time::{Duration, Instant};

use egress_scaler::egress_request::StartRequest;
use egress_scaler::intake::{StatusAnswer, now_ms};
use egress_scaler::model::EgressKind;
use egress_scaler::queue::{NewRequest, QueueName, QueueStore, StoreOptions, TicketId};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::scaler::proto::GetMetricsRequest;
use egress_scaler::standin::{EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions};
use livekit_api::access_token::{AccessToken, VideoGrants};
use support::{CredentialsEnvironment, NoEnvironment, TestServer, config, http_client, redis};

const KEY: &str = "standin-key";
const SECRET: &str = "standin-secret-standin-secret-01";

fn api_token() -> String {
    AccessToken::with_api_key(KEY, SECRET)
        .with_ttl(Duration::from_secs(300))
        .with_grants(VideoGrants {
            room_record: true,
            ..Default::default()
        })
        .to_jwt()
        .unwrap()
}

async fn desired(server: &TestServer) -> Result<i64, tonic::Status> {
    let mut client = server.grpc().await;
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(support::scaled_object(&[])),
            metric_name: "egress-replicas-default".to_owned(),
        })
        .await?
        .into_inner();
    Ok(answer.metric_values[0].metric_value)
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enqueue(store: &QueueStore, kind: EgressKind, room: &str) -> TicketId {
    let body = (kind == EgressKind::Track).then(|| serde_json::json!({"trackId": "TR_audio"}));
    let request = StartRequest::parse(kind, room, body).unwrap();
    let queue: QueueName = "default".parse().unwrap();
    store
        .enqueue(
            &queue,
            NewRequest {
                kind,
                room_name: room.to_owned(),
                request: Some(request.to_json()),
                dedup_key: None,
            },
            now_ms(),
        )
        .await
        .unwrap()
        .ticket
}

async fn delete_hash(redis: &RedisServer, ticket: &TicketId) {
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(format!("egress-scaler:{{default}}:ticket:{ticket}"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
}

async fn status(server: &TestServer, token: Option<String>) -> StatusAnswer {
    let mut request = http_client().get(server.http("/v1/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().json().await.unwrap()
}

async fn metrics(server: &TestServer) -> String {
    http_client()
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ticket_hash_no_longer_holds_the_strict_queue_or_its_counters() {
    support::init();
    let redis = redis();
    let pod = EgressPodStandIn::start().await.unwrap();
    // Someone else's track egress: 0.5 + 4 > 3.2 cores, no composite fits until it ends.
    pod.set_busy(&[("track", 1)]);
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: KEY.to_owned(),
            api_secret: SECRET.to_owned(),
            no_capacity_delay: Duration::from_millis(50),
            any_room_exists: true,
            ..LiveKitStandInOptions::default()
        },
        vec![pod.clone()],
    )
    .await
    .unwrap();
    let (livekit_url, metrics_url) = (livekit.url(), pod.metrics_url());
    let server = TestServer::start(config(
        &redis,
        &[
            "--livekit-url",
            &livekit_url,
            "--egress-metrics",
            &metrics_url,
            "--fleet-refresh-seconds",
            "0.05",
        ],
        &CredentialsEnvironment(KEY, SECRET),
    ))
    .await;
    let store = QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(desired(&server).await, Ok(1))
        })
        .await,
        "the fleet shows the busy pod"
    );
    let lost = enqueue(&store, EgressKind::RoomComposite, "lost").await;
    let next = enqueue(&store, EgressKind::RoomComposite, "next").await;
    let track = enqueue(&store, EgressKind::Track, "tracks").await;
    // Strict order: the head composite fits nowhere, so nothing starts, not even the track.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(livekit.start_calls(), 0, "strict order holds at the head");

    // The head's hash goes (an eviction, or an operator's DEL).
    delete_hash(&redis, &lost).await;

    let answer = status(&server, Some(api_token())).await;
    let default = &answer.queues[0];
    assert_eq!(default.depth, 2, "{default:?}");
    assert_eq!(
        default.queued_by_kind,
        [("room_composite".to_owned(), 1), ("track".to_owned(), 1)].into(),
    );
    assert_eq!(default.demand_by_kind, default.queued_by_kind);
    assert!(
        default.oldest_wait_seconds.is_some(),
        "the oldest wait is the next ticket's"
    );
    let queue: QueueName = "default".parse().unwrap();
    assert_eq!(store.peek(&queue).await.unwrap().unwrap().id, next);
    // The busy pod takes the track; the composite needs a new pod: 2, not 3.
    assert_eq!(desired(&server).await.unwrap(), 2);

    // The pod frees up: the queue moves on, to the next ticket (then the composite fills the
    // pod, and the track waits for room).
    pod.set_idle();
    assert!(
        eventually(Duration::from_secs(10), || async {
            livekit.started().len() == 1
        })
        .await,
        "nothing started"
    );
    assert_eq!(livekit.started()[0].room_name, "next");
    assert!(
        eventually(Duration::from_secs(5), || async {
            store
                .get(&next)
                .await
                .unwrap()
                .unwrap()
                .started_at_ms
                .is_some()
        })
        .await
    );
    let stats = store.stats(&queue).await.unwrap();
    assert_eq!(stats.depth, 1);
    assert_eq!(stats.demand.count(EgressKind::Track), 1);
    assert_eq!(stats.demand.total(), 1);
    assert_eq!(store.peek(&queue).await.unwrap().unwrap().id, track);
    assert!(store.get(&lost).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn a_redis_that_may_evict_is_reported_in_status_and_metrics() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let answer = status(&server, None).await;
    assert_eq!(answer.redis.eviction_policy, "noeviction");
    assert!(answer.redis.eviction_policy_ok);
    assert_eq!(answer.redis.warning, None);
    assert!(!egress_scaler::cli::render_status(&answer).contains("WARNING"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            metrics(&server)
                .await
                .contains("egress_scaler_redis_eviction_policy_ok 1")
        })
        .await
    );
    server.stop().await;

    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut admin)
        .await
        .unwrap();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let answer = status(&server, None).await;
    assert_eq!(answer.redis.eviction_policy, "allkeys-lru");
    assert!(!answer.redis.eviction_policy_ok);
    let warning = answer.redis.warning.clone().unwrap();
    assert!(warning.contains("allkeys-lru") && warning.contains("noeviction"));
    assert!(
        egress_scaler::cli::render_status(&answer).starts_with("WARNING: Redis maxmemory-policy")
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            let text = metrics(&server).await;
            text.contains("egress_scaler_redis_eviction_policy_ok 0")
                && text.contains("egress_scaler_redis_eviction_policy{policy=\"allkeys-lru\"} 1")
        })
        .await
    );
    server.stop().await;

    // A managed Redis that denies CONFIG: INFO memory tells.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("no-config")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-config")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut serve = config(&redis, &[], &NoEnvironment);
    serve.redis_url = format!("redis://no-config:secret@127.0.0.1:{}", redis.port());
    let server = TestServer::start(serve).await;
    let answer = status(&server, None).await;
    assert_eq!(answer.redis.eviction_policy, "allkeys-lru");
    server.stop().await;

    // Neither CONFIG nor INFO: unknown, and said so.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("no-info")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-config")
        .arg("-info")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut serve = config(&redis, &[], &NoEnvironment);
    serve.redis_url = format!("redis://no-info:secret@127.0.0.1:{}", redis.port());
    let server = TestServer::start(serve).await;
    let answer = status(&server, None).await;
    assert_eq!(answer.redis.eviction_policy, "unknown");
    assert!(!answer.redis.eviction_policy_ok);
    assert!(answer.redis.warning.unwrap().contains("unknown"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            let text = metrics(&server).await;
            text.contains("egress_scaler_redis_eviction_policy_ok 0")
                && text.contains("egress_scaler_redis_eviction_policy{policy=\"unknown\"} 1")
        })
        .await
    );
    server.stop().await;
}
