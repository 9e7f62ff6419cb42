//! Pre-warm over a real Redis: the arrival counters written with each enqueue, read in the
//! scaling round trip, their memory; and through `serve`, a GetMetrics answer ahead of a
//! pattern with the reason.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use egress_scaler::model::EgressKind;
use egress_scaler::prewarm::{
    BUCKET_MS, BYTES_PER_KIND_WEEK, Cell, DAY_MS, WEEK_MS, WEEKS_KEPT, cells_to_read, expect,
};
use egress_scaler::queue::{NewRequest, QueueName, QueueStore, StoreOptions};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::scaler::proto::GetMetricsRequest;
use support::{NoEnvironment, TestServer, config, http_client, redis, scaled_object};

const HOUR: u64 = 3_600_000;

/// The first Monday 00:00 UTC of the oldest week whose counters are still kept now (Redis
/// drops a key whose expiry has passed, so the counters must be recent).
fn recent_monday() -> u64 {
    let oldest_week = Cell::at(now_ms()).week - (WEEKS_KEPT - 1);
    // Weeks start on Thursdays (the epoch's): Monday is 4 days in.
    oldest_week * WEEK_MS + 4 * DAY_MS
}

fn request(kind: EgressKind, room: &str) -> NewRequest {
    NewRequest {
        kind,
        room_name: room.to_owned(),
        request: None,
        dedup_key: None,
    }
}

async fn store(server: &RedisServer) -> QueueStore {
    QueueStore::connect(&server.url(), StoreOptions::default())
        .await
        .unwrap()
}

async fn arrive(store: &QueueStore, queue: &QueueName, kind: EgressKind, at: u64, count: u64) {
    for i in 0..count {
        let room = format!("{at}-{i}");
        let enqueued = store
            .enqueue(queue, request(kind, &room), at)
            .await
            .unwrap();
        assert!(!enqueued.duplicate);
    }
}

#[tokio::test]
async fn enqueues_are_counted_per_bucket_and_read_back_for_the_lead_time() {
    let server = RedisServer::start().unwrap();
    let store = store(&server).await;
    let queue: QueueName = "rec".parse().unwrap();
    let monday = recent_monday();
    // 10:00:20 on Mon, Wed, Thu, Fri of the first week: 3, 5, 2, 4 room composites.
    for (day, count) in [(0, 3), (2, 5), (3, 2), (4, 4)] {
        arrive(
            &store,
            &queue,
            EgressKind::RoomComposite,
            monday + day * DAY_MS + 10 * HOUR + 20_000,
            count,
        )
        .await;
    }
    // A duplicate is the same recording, not an arrival.
    let again = store
        .enqueue(
            &queue,
            request(
                EgressKind::RoomComposite,
                &format!("{}-0", monday + 10 * HOUR + 20_000),
            ),
            monday + 10 * HOUR + 20_000,
        )
        .await
        .unwrap();
    assert!(again.duplicate);

    let now = monday + 7 * DAY_MS + 10 * HOUR - 30_000;
    let cells = cells_to_read(now, 60_000);
    let input = store
        .scaling_input_ahead(&queue, None, &cells)
        .await
        .unwrap();
    let first = Cell::at(monday + 10 * HOUR);
    assert_eq!(input.arrivals.get(EgressKind::RoomComposite, first), 3);
    let expectation = expect(now, 60_000, &input.arrivals);
    assert_eq!(expectation.arrivals.count(EgressKind::RoomComposite), 5);
    assert_eq!(
        expectation.patterns[0].seen_text(),
        "seen on 4 of the last 5 weekdays"
    );
    // The demand counters are read as before.
    assert_eq!(input.demand.count(EgressKind::RoomComposite), 14);
    // Without cells nothing is read.
    let plain = store.scaling_input(&queue, None).await.unwrap();
    assert_eq!(plain.arrivals, Default::default());
}

#[tokio::test]
async fn a_kinds_counters_take_20160_bytes_a_week_and_expire() {
    let server = RedisServer::start().unwrap();
    let store = store(&server).await;
    let queue: QueueName = "rec".parse().unwrap();
    // The last bucket of the week is the string's end, whatever came before: the worst case.
    let last_bucket = (Cell::at(now_ms()).week + 1) * WEEK_MS - BUCKET_MS;
    arrive(&store, &queue, EgressKind::Track, last_bucket, 1).await;
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!(
        "egress-scaler:{{rec}}:arrivals:track:{}",
        Cell::at(last_bucket).week
    );
    let length: u64 = redis::cmd("STRLEN")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(length, BYTES_PER_KIND_WEEK);
    let memory: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    println!(
        "arrival counters of one kind and week: {memory} bytes in Redis; {} kept at most per kind",
        memory * WEEKS_KEPT
    );
    assert!(memory < 24_600, "{memory}");
    // Forgotten when no lookback reaches the week any more: three weeks after it began.
    let expire_at: i64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        expire_at as u64,
        Cell::at(last_bucket).forget_at_ms(),
        "expires with its week"
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn get_metrics_scales_ahead_of_a_pattern_and_says_why() {
    let redis = redis();
    // The default lead time (60 s): the next minute always starts within it.
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let store = store(&redis).await;
    let queue: QueueName = "default".parse().unwrap();
    let now = now_ms();
    let next_start = (now / BUCKET_MS + 1) * BUCKET_MS;
    // Two composites in the minute after that one on each of the last 14 days: whatever
    // today is, every day compared (of its type, within two weeks) saw them, and they are
    // among the minutes ahead now and during the next minute (the test may run into it).
    for day in 1..=14 {
        arrive(
            &store,
            &queue,
            EgressKind::RoomComposite,
            next_start + BUCKET_MS - day * DAY_MS + 20_000,
            2,
        )
        .await;
    }
    // What was queued then is gone by now (started and ended long ago).
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("egress-scaler:{default}:demand")
        .query_async(&mut raw)
        .await
        .unwrap();

    let mut client = server.grpc().await;
    let desired = |metadata: &'static [(&'static str, &'static str)]| {
        let request = GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(metadata)),
            metric_name: "egress-replicas-default".to_owned(),
        };
        let mut client = client.clone();
        async move {
            client
                .get_metrics(request)
                .await
                .unwrap()
                .into_inner()
                .metric_values[0]
                .metric_value
        }
    };
    // Two pods for the two composites expected, nothing queued.
    assert_eq!(desired(&[]).await, 2);

    let status: serde_json::Value = http_client()
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = status.to_string();
    assert!(
        text.contains("pre-warm: 2 pod(s) for 2 room_composite arrival(s) expected between"),
        "{text}"
    );
    let metrics = http_client()
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("egress_scaler_prewarm_pods{queue=\"default\"} 2"),
        "{metrics}"
    );
    // None when the trigger turns it off.
    assert_eq!(desired(&[("prewarm", "off")]).await, 0);
    let _ = &mut client;
    server.stop().await;
}
