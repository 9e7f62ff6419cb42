//! Served queues (`--queue`, repeatable) through the real server and a real Redis: only they
//! take requests, answer KEDA, get metric series and show in the status; each is dispatched;
//! webhooks reach every one of them.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use egress_scaler::model::EgressKind;
use egress_scaler::queue::{
    NewRequest, QueueName, QueueStore, StoreOptions, TicketId, TicketState,
};
use egress_scaler::scaler::proto::GetMetricsRequest;
use egress_scaler::standin::livekit_server::sign_webhook;
use egress_scaler::standin::{EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use serde_json::{Value, json};
use support::{CredentialsEnvironment, TestServer, config, http_client, redis, scaled_object};
use tonic::Code;

const KEY: &str = "standin-key";
const SECRET: &str = "standin-secret-standin-secret-01";

fn credentials() -> CredentialsEnvironment {
    CredentialsEnvironment(KEY, SECRET)
}

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

async fn enqueue(client: &reqwest::Client, server: &TestServer, body: Value) -> (u16, Value) {
    let response = client
        .post(server.http("/v1/requests"))
        .bearer_auth(api_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn get_json(client: &reqwest::Client, server: &TestServer, path: &str) -> Value {
    client
        .get(server.http(path))
        .bearer_auth(api_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn send_event(client: &reqwest::Client, server: &TestServer, event: &proto::WebhookEvent) {
    let body = serde_json::to_string(event).unwrap();
    let signature = sign_webhook(KEY, SECRET, &body).unwrap();
    let status = client
        .post(server.http("/webhook/livekit"))
        .header("content-type", "application/webhook+json")
        .header("authorization", signature)
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

fn room_event(event: &str, room: &str) -> proto::WebhookEvent {
    proto::WebhookEvent {
        event: event.to_owned(),
        room: Some(proto::Room {
            name: room.to_owned(),
            ..Default::default()
        }),
        id: format!("EV_{event}_{room}"),
        ..Default::default()
    }
}

fn ticket(answer: &Value) -> TicketId {
    answer["ticket"].as_str().unwrap().parse().unwrap()
}

async fn store(redis: &egress_scaler::redis_server::RedisServer) -> QueueStore {
    QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .unwrap()
}

/// The distinct values of the `queue` label in a metrics text.
fn queue_labels(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|line| line.split_once("queue=\"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_served_queues_take_requests_answer_keda_and_get_series() {
    let redis = redis();
    let store = store(&redis).await;
    // A queue left in Redis from an earlier configuration.
    let old: QueueName = "old".parse().unwrap();
    store
        .enqueue(
            &old,
            NewRequest {
                kind: EgressKind::RoomComposite,
                room_name: "left".to_owned(),
                request: None,
                dedup_key: None,
            },
            egress_scaler::intake::now_ms(),
        )
        .await
        .unwrap();
    let server = TestServer::start(config(
        &redis,
        &[
            "--queue",
            "rec",
            "--queue",
            "web",
            "--auto-record",
            "room_composite",
        ],
        &credentials(),
    ))
    .await;
    let client = http_client();

    // No queue named: the default, the first served one. A served one: that queue.
    let (status, default) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "gone"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(ticket(&default).queue().as_str(), "rec");
    let (status, web) = enqueue(
        &client,
        &server,
        json!({"kind": "web", "room_name": "gone", "queue": "web",
               "request": {"url": "https://board.test/gone"}}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(ticket(&web).queue().as_str(), "web");

    // Made-up queue names are refused, naming the queue and the served ones, and create
    // nothing: no queue in Redis, no metric series.
    let refused = futures::future::join_all((0..200).map(|i| {
        enqueue(
            &client,
            &server,
            json!({"kind": "room_composite", "room_name": format!("r{i}"), "queue": format!("made-up-{i}")}),
        )
    }))
    .await;
    for (status, answer) in &refused {
        assert_eq!(*status, 400, "{answer}");
        assert_eq!(answer["error"], "invalid_argument");
    }
    let message = refused[7].1["message"].as_str().unwrap();
    assert!(
        message.contains("\"made-up-7\"") && message.contains("rec, web"),
        "{message}"
    );
    let known: BTreeSet<String> = store
        .queues()
        .await
        .unwrap()
        .into_iter()
        .map(|queue| queue.to_string())
        .collect();
    assert_eq!(
        known,
        ["old", "rec", "web"].map(str::to_owned).into(),
        "refused enqueues made queues"
    );

    // KEDA: a trigger naming a queue not served is InvalidArgument, naming it.
    let mut grpc = server.grpc().await;
    for i in 0..50 {
        let metadata = [("queue", format!("keda-{i}"))];
        let metadata: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let error = grpc
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(scaled_object(&metadata)),
                metric_name: format!("egress-replicas-keda-{i}"),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(
            error.message().contains(&format!("\"keda-{i}\"")),
            "{}",
            error.message()
        );
        let error = grpc.is_active(scaled_object(&metadata)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }
    for queue in ["rec", "web"] {
        let answer = grpc
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(scaled_object(&[("queue", queue)])),
                metric_name: format!("egress-replicas-{queue}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.metric_values[0].metric_value, 1, "{queue}");
    }
    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        queue_labels(&metrics),
        ["rec", "web"].map(str::to_owned).into(),
        "{metrics}"
    );
    assert!(metrics.contains("egress_scaler_desired_replicas{queue=\"web\"} 1"));
    assert!(metrics.contains("egress_scaler_queue_depth{queue=\"rec\",kind=\"room_composite\"} 1"));

    // The status: every served queue, the default first; the others by name only.
    let status = get_json(&client, &server, "/v1/status").await;
    let names: Vec<&str> = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|queue| queue["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rec", "web"], "{status}");
    assert_eq!(status["other_queues"], json!(["old"]));
    assert_eq!(status["queues"][1]["queued_by_kind"]["web"], 1);

    // Webhooks: room_started records into the default queue; room_finished cancels the
    // room's queued tickets in every served queue.
    send_event(&client, &server, &room_event("room_started", "fresh")).await;
    let status = get_json(&client, &server, "/v1/status").await;
    assert_eq!(status["queues"][0]["depth"], 2, "{status}");
    assert_eq!(status["queues"][1]["depth"], 1, "{status}");
    send_event(&client, &server, &room_event("room_finished", "gone")).await;
    for id in [ticket(&default), ticket(&web)] {
        let ticket = store.get(&id).await.unwrap().unwrap();
        assert_eq!(ticket.state, TicketState::Cancelled, "{id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_commands_show_and_use_the_served_queues() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--queue", "rec", "--queue", "web"],
        &support::NoEnvironment,
    ))
    .await;
    let binary = env!("CARGO_BIN_EXE_egress-scaler");
    let base = format!("http://{}", server.http_addr);
    let run = |args: &[&str]| {
        tokio::process::Command::new(binary)
            .args(args)
            .env_remove("LIVEKIT_API_KEY")
            .env_remove("LIVEKIT_API_SECRET")
            .output()
    };
    let out = run(&[
        "enqueue",
        "--server",
        &base,
        "--kind",
        "room_composite",
        "--room",
        "a",
        "--queue",
        "web",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ticket web."));
    let out = run(&[
        "enqueue",
        "--server",
        &base,
        "--kind",
        "room_composite",
        "--room",
        "a",
        "--queue",
        "nope",
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"nope\" is not served here; the served queues are rec, web"),
        "{stderr}"
    );
    let out = run(&["status", "--server", &base]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("\nrec: desired 0 because"), "{table}");
    assert!(table.contains("\nweb: desired 1 because"), "{table}");
    server.stop().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_queue_is_dispatched_and_ended_by_its_webhooks() {
    support::init();
    let redis = redis();
    let pods = [
        EgressPodStandIn::start().await.unwrap(),
        EgressPodStandIn::start().await.unwrap(),
    ];
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: KEY.to_owned(),
            api_secret: SECRET.to_owned(),
            no_capacity_delay: Duration::from_millis(200),
            ..LiveKitStandInOptions::default()
        },
        pods.to_vec(),
    )
    .await
    .unwrap();
    let livekit_url = livekit.url();
    let metrics_urls = format!("{},{}", pods[0].metrics_url(), pods[1].metrics_url());
    let server = TestServer::start(config(
        &redis,
        &[
            "--queue",
            "rec,tracks",
            "--livekit-url",
            &livekit_url,
            "--egress-metrics",
            &metrics_urls,
            "--fleet-refresh-seconds",
            "0.1",
        ],
        &credentials(),
    ))
    .await;
    livekit.set_webhook_url(Some(server.http("/webhook/livekit")));
    let store = store(&redis).await;
    let client = http_client();
    livekit.create_room("a");
    livekit.create_room("b");

    let (_, composite) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    let (_, track) = enqueue(
        &client,
        &server,
        json!({"kind": "track", "room_name": "b", "queue": "tracks",
               "request": {"trackId": "TR_1"}}),
    )
    .await;
    let (composite, track) = (ticket(&composite), ticket(&track));
    assert_eq!(
        (composite.queue().as_str(), track.queue().as_str()),
        ("rec", "tracks")
    );
    let active = |id: TicketId| {
        let store = store.clone();
        async move { store.get(&id).await.unwrap().unwrap().state == TicketState::Active }
    };
    assert!(
        eventually(Duration::from_secs(10), || active(composite.clone())).await,
        "the default queue was not dispatched"
    );
    assert!(
        eventually(Duration::from_secs(10), || active(track.clone())).await,
        "the second queue was not dispatched"
    );
    let status = get_json(&client, &server, "/v1/status").await;
    for queue in status["queues"].as_array().unwrap() {
        assert!(
            queue["leader"]["holder"].is_string(),
            "no dispatcher leads {}",
            queue["queue"]
        );
    }

    // egress_ended webhooks end the tickets of both queues.
    livekit.end_all();
    let ended = |id: TicketId| {
        let store = store.clone();
        async move { store.get(&id).await.unwrap().unwrap().state == TicketState::Ended }
    };
    assert!(eventually(Duration::from_secs(10), || ended(composite.clone())).await);
    assert!(eventually(Duration::from_secs(10), || ended(track.clone())).await);
    server.stop().await;
}
