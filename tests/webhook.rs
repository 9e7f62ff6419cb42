//! LiveKit webhooks through the real server: signatures, the egress and room events,
//! auto-recording, and the dispatcher's state in `/v1/status` and `/metrics`.

mod support;

use std::time::{Duration, Instant};

use egress_scaler::egress_request::StartRequest;
use egress_scaler::model::EgressKind;
use egress_scaler::queue::{QueueName, QueueStore, StoreOptions, TicketId, TicketState};
use egress_scaler::standin::livekit_server::sign_webhook;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use serde_json::{Value, json};
use support::{CredentialsEnvironment, TestServer, config, http_client, redis};

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

async fn enqueue(client: &reqwest::Client, server: &TestServer, body: Value) -> TicketId {
    let response = client
        .post(server.http("/v1/requests"))
        .bearer_auth(api_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    answer["ticket"].as_str().unwrap().parse().unwrap()
}

async fn post_webhook(
    client: &reqwest::Client,
    server: &TestServer,
    body: &str,
    authorization: Option<String>,
) -> u16 {
    let mut request = client
        .post(server.http("/webhook/livekit"))
        .header("content-type", "application/webhook+json")
        .body(body.to_owned());
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    request.send().await.unwrap().status().as_u16()
}

async fn send_event(
    client: &reqwest::Client,
    server: &TestServer,
    event: &proto::WebhookEvent,
) -> u16 {
    let body = serde_json::to_string(event).unwrap();
    let signature = sign_webhook(KEY, SECRET, &body).unwrap();
    post_webhook(client, server, &body, Some(signature)).await
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

fn egress_event(event: &str, egress_id: &str, room: &str) -> proto::WebhookEvent {
    let request = StartRequest::parse(EgressKind::RoomComposite, room, None).unwrap();
    let now = egress_scaler::intake::now_ms() as i64 * 1_000_000;
    proto::WebhookEvent {
        event: event.to_owned(),
        egress_info: Some(proto::EgressInfo {
            egress_id: egress_id.to_owned(),
            room_name: room.to_owned(),
            status: proto::EgressStatus::EgressActive as i32,
            started_at: now,
            updated_at: now,
            request: Some(request.to_info_request()),
            ..Default::default()
        }),
        id: format!("EV_{event}_{egress_id}"),
        ..Default::default()
    }
}

async fn store(redis: &egress_scaler::redis_server::RedisServer) -> QueueStore {
    QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .unwrap()
}

async fn state(store: &QueueStore, ticket: &TicketId) -> TicketState {
    store.get(ticket).await.unwrap().unwrap().state
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

#[tokio::test]
async fn unsigned_or_badly_signed_webhooks_change_nothing_and_room_finished_cancels() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &credentials())).await;
    let store = store(&redis).await;
    let client = http_client();
    let x1 = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "x"}),
    )
    .await;
    let x2 = enqueue(
        &client,
        &server,
        json!({"kind": "audio_room_composite", "room_name": "x"}),
    )
    .await;
    let y = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "y"}),
    )
    .await;

    let event = room_event("room_finished", "x");
    let body = serde_json::to_string(&event).unwrap();
    let other_body = serde_json::to_string(&room_event("room_finished", "y")).unwrap();
    let refused = [
        None,
        Some(sign_webhook(KEY, "another-secret-another-secret-00", &body).unwrap()),
        Some(sign_webhook(KEY, SECRET, &other_body).unwrap()),
        Some(api_token()),
        Some(format!("Bearer {}", api_token())),
        Some("garbage".to_owned()),
    ];
    for authorization in refused {
        assert_eq!(
            post_webhook(&client, &server, &body, authorization.clone()).await,
            401,
            "{authorization:?}"
        );
    }
    for ticket in [&x1, &x2, &y] {
        assert_eq!(state(&store, ticket).await, TicketState::Queued);
    }

    assert_eq!(send_event(&client, &server, &event).await, 200);
    assert_eq!(state(&store, &x1).await, TicketState::Cancelled);
    assert_eq!(state(&store, &x2).await, TicketState::Cancelled);
    assert_eq!(state(&store, &y).await, TicketState::Queued);
    // Delivered twice: nothing more to do.
    assert_eq!(send_event(&client, &server, &event).await, 200);

    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "egress_scaler_webhooks_total{event=\"room_finished\",outcome=\"applied\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("egress_scaler_webhooks_total{event=\"other\",outcome=\"rejected\"} 6"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn egress_webhooks_adopt_confirm_and_end_tickets() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &credentials())).await;
    let store = store(&redis).await;
    let client = http_client();
    let queue: QueueName = "default".parse().unwrap();
    let ticket = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "standup"}),
    )
    .await;
    // A dispatcher claimed it and lost the answer of its start call.
    store
        .claim(&ticket, "attempt-1", egress_scaler::intake::now_ms())
        .await
        .unwrap()
        .unwrap();
    // While its answer may still come, no webhook decides for it.
    let started = egress_event("egress_started", "EG_standup", "standup");
    assert_eq!(send_event(&client, &server, &started).await, 200);
    assert_eq!(state(&store, &ticket).await, TicketState::Dispatching);
    assert!(
        store
            .unsettle(&ticket, "attempt-1", egress_scaler::intake::now_ms())
            .await
            .unwrap()
    );

    // Another room's egress is not this ticket's.
    let unrelated = egress_event("egress_started", "EG_other", "elsewhere");
    assert_eq!(send_event(&client, &server, &unrelated).await, 200);
    assert_eq!(state(&store, &ticket).await, TicketState::Dispatching);

    let started = egress_event("egress_started", "EG_standup", "standup");
    assert_eq!(send_event(&client, &server, &started).await, 200);
    let active = store.get(&ticket).await.unwrap().unwrap();
    assert_eq!(active.state, TicketState::Active);
    assert_eq!(active.egress_id.as_deref(), Some("EG_standup"));
    assert_eq!(
        store.ticket_for_egress(&queue, "EG_standup").await.unwrap(),
        Some(ticket.clone())
    );
    // Confirmed on a second delivery, nothing changes.
    assert_eq!(send_event(&client, &server, &started).await, 200);

    let mut ended = egress_event("egress_ended", "EG_standup", "standup");
    if let Some(info) = ended.egress_info.as_mut() {
        info.status = proto::EgressStatus::EgressComplete as i32;
    }
    assert_eq!(send_event(&client, &server, &ended).await, 200);
    assert_eq!(state(&store, &ticket).await, TicketState::Ended);
    // The de-duplication key is free: the same room can be recorded again.
    let again = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "standup"}),
    )
    .await;
    assert_ne!(again, ticket);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_recorded_rooms_are_started_ended_and_shown_in_status() {
    support::init();
    let redis = redis();
    // Two 4-core pods: one room composite each.
    let pods = [
        EgressPodStandIn::start().await.unwrap(),
        EgressPodStandIn::start().await.unwrap(),
    ];
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: KEY.to_owned(),
            api_secret: SECRET.to_owned(),
            no_capacity_delay: Duration::from_millis(200),
            timing: StartTiming::scaled(0.05),
            ..LiveKitStandInOptions::default()
        },
        pods.to_vec(),
    )
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "egress-scaler-webhook-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("template.json");
    std::fs::write(
        &template,
        r#"{"layout": "speaker", "fileOutputs": [{"filepath": "recordings/{room_name}.mp4"}]}"#,
    )
    .unwrap();
    let livekit_url = livekit.url();
    let metrics_urls = format!("{},{}", pods[0].metrics_url(), pods[1].metrics_url());
    let server = TestServer::start(config(
        &redis,
        &[
            "--livekit-url",
            &livekit_url,
            "--egress-metrics",
            &metrics_urls,
            "--fleet-refresh-seconds",
            "0.1",
            "--auto-record",
            "room_composite",
            "--auto-record-rooms",
            "team-.*",
            "--auto-record-template",
            template.to_str().unwrap(),
        ],
        &credentials(),
    ))
    .await;
    livekit.set_webhook_url(Some(server.http("/webhook/livekit")));
    let store = store(&redis).await;
    let queue: QueueName = "default".parse().unwrap();
    let client = http_client();

    livekit.create_room("lobby");
    livekit.create_room("team-a");
    assert!(
        eventually(Duration::from_secs(10), || async {
            livekit.started().len() == 1
        })
        .await
    );
    let egress = &livekit.started()[0];
    assert_eq!(egress.room_name, "team-a");
    let StartRequest::RoomComposite(request) = &egress.request else {
        panic!("not a room composite: {:?}", egress.request);
    };
    assert_eq!(
        request.layout, "speaker",
        "the template reached livekit-server"
    );
    assert_eq!(
        request.file_outputs[0].filepath,
        "recordings/{room_name}.mp4"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            store
                .ticket_for_egress(&queue, &egress.egress_id)
                .await
                .unwrap()
                .is_some()
        })
        .await
    );
    let ticket = store
        .ticket_for_egress(&queue, &egress.egress_id)
        .await
        .unwrap()
        .unwrap();

    // A refused request becomes a dead letter shown by the status.
    livekit.fail_next_start("invalid_argument", "unsupported encoding");
    livekit.create_room("team-b");
    let status = || async {
        client
            .get(server.http("/v1/status"))
            .bearer_auth(api_token())
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            status().await["queues"][0]["dead_letters"] == 1
        })
        .await
    );
    let answer = status().await;
    let default = &answer["queues"][0];
    assert_eq!(default["queue"], "default");
    let dead = &default["recent_dead_letters"][0];
    assert_eq!(dead["room_name"], "team-b");
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .contains("invalid_argument: unsupported encoding"),
        "{dead}"
    );
    let leader = &default["leader"];
    assert!(
        leader["holder"]
            .as_str()
            .unwrap()
            .starts_with("egress-scaler-"),
        "{leader}"
    );
    assert!(leader["expires_in_seconds"].as_f64().unwrap() > 0.0);
    assert!(leader["fence"].as_u64().unwrap() >= 1);

    // The room closes: its egress ends and the webhook ends the ticket.
    livekit.finish_room("team-a");
    assert!(
        eventually(Duration::from_secs(5), || async {
            state(&store, &ticket).await == TicketState::Ended
        })
        .await
    );
    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "egress_scaler_dispatch_outcomes_total{outcome=\"started\"} 1",
        "egress_scaler_dispatch_outcomes_total{outcome=\"failed\"} 1",
        "egress_scaler_webhooks_total{event=\"room_started\",outcome=\"applied\"} 2",
        "egress_scaler_webhooks_total{event=\"room_started\",outcome=\"ignored\"} 1",
        "egress_scaler_webhooks_total{event=\"egress_ended\",outcome=\"applied\"} 1",
        "egress_scaler_dead_letters{queue=\"default\"} 1",
        "egress_scaler_enqueue_to_start_seconds_count 1",
        "egress_scaler_dispatch_lease_age_seconds",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }
    assert!(
        metrics.lines().any(|line| line.starts_with(
            "egress_scaler_dispatch_leader{queue=\"default\",holder=\"egress-scaler-"
        ) && line.ends_with(" 1")),
        "{metrics}"
    );
    server.stop().await;
    // The lease was released on shutdown.
    assert!(
        egress_scaler::dispatch::lease::read_leader(&store, &queue)
            .await
            .unwrap()
            .is_none()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Posts `body` with one `authorization` header, as a replaying sender would: the same bytes
/// and the same (still valid) signature.
async fn replay(
    client: &reqwest::Client,
    server: &TestServer,
    body: &str,
    authorization: &str,
) -> u16 {
    post_webhook(client, server, body, Some(authorization.to_owned())).await
}

fn webhook_counter(metrics: &str, event: &str, outcome: &str) -> u64 {
    let prefix =
        format!("egress_scaler_webhooks_total{{event=\"{event}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn replayed_deliveries_are_recognised_and_act_once() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--auto-record", "room_composite"],
        &credentials(),
    ))
    .await;
    let store = store(&redis).await;
    let client = http_client();
    let queue: QueueName = "default".parse().unwrap();

    // room_started queues the room; its recording is then cancelled by the backend.
    let started = room_event("room_started", "standup");
    let started_body = serde_json::to_string(&started).unwrap();
    let started_signature = sign_webhook(KEY, SECRET, &started_body).unwrap();
    assert_eq!(
        replay(&client, &server, &started_body, &started_signature).await,
        200
    );
    let queued = store.queued_in_room(&queue, "standup").await.unwrap();
    assert_eq!(queued.len(), 1);
    let cancelled = client
        .delete(server.http(&format!("/v1/requests/{}", queued[0])))
        .bearer_auth(api_token())
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    // The identical signed delivery again: answered 200, queues nothing.
    assert_eq!(
        replay(&client, &server, &started_body, &started_signature).await,
        200
    );
    assert!(
        store
            .queued_in_room(&queue, "standup")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.stats(&queue).await.unwrap().depth, 0);

    // room_finished of the first room; a new room of the same name starts (a new event).
    let finished = room_event("room_finished", "standup");
    let finished_body = serde_json::to_string(&finished).unwrap();
    let finished_signature = sign_webhook(KEY, SECRET, &finished_body).unwrap();
    assert_eq!(
        replay(&client, &server, &finished_body, &finished_signature).await,
        200
    );
    let mut second = room_event("room_started", "standup");
    second.id = "EV_second_room".to_owned();
    assert_eq!(send_event(&client, &server, &second).await, 200);
    let new_room = store.queued_in_room(&queue, "standup").await.unwrap();
    assert_eq!(new_room.len(), 1);
    // The first room's room_finished replayed does not cancel the new room's recording.
    assert_eq!(
        replay(&client, &server, &finished_body, &finished_signature).await,
        200
    );
    assert_eq!(state(&store, &new_room[0]).await, TicketState::Queued);

    // An event without an id is known by its body alone.
    let mut anonymous = room_event("room_finished", "other");
    anonymous.id = String::new();
    assert_eq!(send_event(&client, &server, &anonymous).await, 200);
    assert_eq!(send_event(&client, &server, &anonymous).await, 200);

    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(webhook_counter(&metrics, "room_started", "applied"), 2);
    assert_eq!(webhook_counter(&metrics, "room_started", "replayed"), 1);
    assert_eq!(webhook_counter(&metrics, "room_finished", "replayed"), 2);
    assert_eq!(
        webhook_counter(&metrics, "room_finished", "ignored"),
        2,
        "the first room_finished found nothing queued, nor the one without an id"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_delivery_that_failed_is_acted_on_when_retried() {
    let mut redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--auto-record", "room_composite"],
        &credentials(),
    ))
    .await;
    let client = http_client();
    let started = room_event("room_started", "retro");
    let body = serde_json::to_string(&started).unwrap();
    let signature = sign_webhook(KEY, SECRET, &body).unwrap();

    // Redis is away: 503, and nothing is remembered.
    redis.stop();
    assert_eq!(replay(&client, &server, &body, &signature).await, 503);
    redis.start_again().unwrap();
    // LiveKit's retry of the same delivery acts.
    let queue: QueueName = "default".parse().unwrap();
    let store = store(&redis).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            replay(&client, &server, &body, &signature).await == 200
        })
        .await
    );
    assert_eq!(
        store.queued_in_room(&queue, "retro").await.unwrap().len(),
        1
    );
    // And only once.
    assert_eq!(replay(&client, &server, &body, &signature).await, 200);
    assert_eq!(store.stats(&queue).await.unwrap().depth, 1);
    server.stop().await;
}
