//! The HTTP API and the `enqueue`/`status` commands, driven as a backend would, over a real Redis.

mod support;

use std::time::Duration;

use livekit_api::access_token::{AccessToken, VideoGrants};
use serde_json::{Value, json};
use support::{
    CredentialsEnvironment, NoEnvironment, TestServer, config, enqueue, http_client, redis,
};

async fn status_of(client: &reqwest::Client, url: String) -> u16 {
    client.get(url).send().await.unwrap().status().as_u16()
}

async fn depth(client: &reqwest::Client, server: &TestServer) -> u64 {
    let status: Value = client
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["depth"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn a_hundred_concurrent_identical_enqueues_make_one_ticket() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let client = http_client();
    let body = json!({"kind": "room_composite", "room_name": "all-hands"});
    let answers =
        futures::future::join_all((0..100).map(|_| enqueue(&client, &server, body.clone()))).await;
    let created: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 202)
        .collect();
    let duplicates: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert_eq!(duplicates.len(), 99);
    let ticket = created[0].1["ticket"].as_str().unwrap();
    for (_, answer) in duplicates {
        assert_eq!(answer["ticket"], ticket);
        assert_eq!(answer["duplicate"], true);
    }
    assert_eq!(depth(&client, &server).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn tickets_can_be_read_and_cancelled() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let client = http_client();
    let (status, first) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    assert_eq!(
        (status, first["state"].as_str(), first["position"].as_u64()),
        (202, Some("queued"), Some(0))
    );
    let (_, second) = enqueue(
        &client,
        &server,
        json!({"kind": "audio_room_composite", "room_name": "a"}),
    )
    .await;
    assert_eq!(
        second["position"], 1,
        "a different kind is a different recording"
    );

    let id = second["ticket"].as_str().unwrap();
    let ticket: Value = client
        .get(server.http(&format!("/v1/requests/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ticket["state"], "queued");
    assert_eq!(ticket["kind"], "audio_room_composite");
    assert_eq!(ticket["room_name"], "a");
    assert!(ticket["enqueued_at"].as_str().unwrap().ends_with('Z'));

    let first_id = first["ticket"].as_str().unwrap();
    let cancelled = client
        .delete(server.http(&format!("/v1/requests/{first_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status().as_u16(), 200);
    let again = client
        .delete(server.http(&format!("/v1/requests/{first_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"], "failed_precondition");
    let ticket: Value = client
        .get(server.http(&format!("/v1/requests/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ticket["position"], 0, "the second moved up");

    // After a cancel the same recording can be asked for again.
    let (status, third) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_ne!(third["ticket"], first["ticket"]);

    for missing in ["default.00000000000000000000000000000000", "nonsense"] {
        let answer = client
            .get(server.http(&format!("/v1/requests/{missing}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404, "{missing}");
        let answer = client
            .delete(server.http(&format!("/v1/requests/{missing}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 404, "{missing}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_precise_json_error_and_leaves_the_queue_alone() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let client = http_client();
    let cases = [
        (json!({"kind": "video", "room_name": "a"}).to_string(), 400, "unknown egress kind"),
        (json!({"kind": "room_composite", "room_name": "  "}).to_string(), 400, "room_name"),
        (json!({"kind": "room_composite"}).to_string(), 400, "room_name"),
        ("{not json".to_owned(), 400, "malformed JSON"),
        (json!({"kind": "room_composite", "room_name": "a", "extra": 1}).to_string(), 400, "extra"),
        (json!({"kind": "track", "room_name": "a"}).to_string(), 400, "track_id"),
        (json!({"kind": "room_composite", "room_name": "a", "request": {"roomName": "b"}}).to_string(), 400, "differs"),
        (json!({"kind": "room_composite", "room_name": "a", "queue": "x y"}).to_string(), 400, "queue"),
        (json!({"kind": "room_composite", "room_name": "a", "dedup_key": ""}).to_string(), 400, "dedup_key"),
        // Room names are taken exactly or refused: never trimmed, no control characters.
        (json!({"kind": "room_composite", "room_name": "board\u{2003}"}).to_string(), 400, "room_name"),
        (json!({"kind": "room_composite", "room_name": " board"}).to_string(), 400, "room_name"),
        (json!({"kind": "room_composite", "room_name": "a\nb"}).to_string(), 400, "room_name"),
        (json!({"kind": "room_composite", "room_name": "a\u{1b}[2Jb"}).to_string(), 400, "room_name"),
        (json!({"kind": "room_composite", "room_name": "x".repeat(257)}).to_string(), 400, "room_name"),
        // Unknown fields of the LiveKit request are refused by name, at any depth.
        (json!({"kind": "room_composite", "room_name": "a", "request": {"layot": "grid"}}).to_string(), 400, "request.layot"),
        (json!({"kind": "room_composite", "room_name": "a", "request": {"fileOutputs": [{"filepth": "a.mp4"}]}}).to_string(), 400, "request.fileOutputs[0].filepth"),
        // Values LiveKit would refuse once a pod took the job.
        (json!({"kind": "web", "room_name": "a", "request": {"url": ""}}).to_string(), 400, "request.url"),
        (json!({"kind": "web", "room_name": "a", "request": {"url": "file:///etc/passwd"}}).to_string(), 400, "request.url"),
        (json!({"kind": "participant", "room_name": "a", "request": {"identity": ""}}).to_string(), 400, "request.identity"),
        (json!({"kind": "track", "room_name": "a", "request": {"trackId": "TR_1", "websocketUrl": "tcp://x"}}).to_string(), 400, "request.websocket_url"),
        (json!({"kind": "room_composite", "room_name": "a", "request": {"streamOutputs": [{"urls": []}]}}).to_string(), 400, "stream output"),
        (json!({"kind": "room_composite", "room_name": "a", "dedup_key": "k\n"}).to_string(), 400, "dedup_key"),
        (json!({"kind": "room_composite", "room_name": "a", "dedup_key": " k"}).to_string(), 400, "dedup_key"),
        // A queue this process does not serve.
        (json!({"kind": "room_composite", "room_name": "a", "queue": "made-up"}).to_string(), 400, "\"made-up\" is not served here; the served queues are default"),
        (json!({"kind": "room_composite", "room_name": "a", "request": {"layout": "x".repeat(70 * 1024)}}).to_string(), 413, "larger than"),
    ];
    for (body, expected, needle) in cases {
        let answer = client
            .post(server.http("/v1/requests"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status().as_u16(),
            expected,
            "{}",
            &body[..body.len().min(80)]
        );
        let error: Value = answer.json().await.expect("errors are JSON");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{needle}: {error}"
        );
    }
    assert_eq!(depth(&client, &server).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn access_tokens_are_required_when_credentials_are_set() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &[],
        &CredentialsEnvironment("APIkey", "secret-secret-secret"),
    ))
    .await;
    let client = http_client();
    let body = json!({"kind": "room_composite", "room_name": "secure"});
    let token = |secret: &str, record: bool| {
        AccessToken::with_api_key("APIkey", secret)
            .with_ttl(Duration::from_secs(60))
            .with_grants(VideoGrants {
                room_record: record,
                ..Default::default()
            })
            .to_jwt()
            .unwrap()
    };
    let send = |auth: Option<String>| {
        let mut request = client.post(server.http("/v1/requests")).json(&body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    assert_eq!(send(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(
        send(Some(format!("Bearer {}", token("wrong", true))))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        send(Some(token("secret-secret-secret", true)))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401,
        "Bearer is required"
    );
    assert_eq!(
        send(Some(format!(
            "Bearer {}",
            token("secret-secret-secret", false)
        )))
        .await
        .unwrap()
        .status()
        .as_u16(),
        403
    );
    assert_eq!(
        send(Some(format!(
            "Bearer {}",
            token("secret-secret-secret", true)
        )))
        .await
        .unwrap()
        .status()
        .as_u16(),
        202
    );
    // Health and metrics stay open for probes and Prometheus.
    assert_eq!(status_of(&client, server.http("/healthz")).await, 200);
    assert_eq!(status_of(&client, server.http("/metrics")).await, 200);
    assert_eq!(status_of(&client, server.http("/v1/status")).await, 401);
    server.stop().await;
}

#[tokio::test]
async fn status_and_metrics_show_depth_wait_and_desired() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &["--warm-pool", "1"], &NoEnvironment)).await;
    let client = http_client();
    enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    enqueue(
        &client,
        &server,
        json!({"kind": "track", "room_name": "a", "request": {"trackId": "TR_1"}}),
    )
    .await;
    let status: Value = client
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queue = &status["queues"][0];
    assert_eq!(queue["queue"], "default");
    assert_eq!(queue["depth"], 2);
    assert_eq!(queue["queued_by_kind"]["room_composite"], 1);
    assert_eq!(
        queue["desired_replicas"], 3,
        "room composite + track + warm pool: {status}"
    );
    assert!(queue["oldest_wait_seconds"].as_f64().unwrap() >= 0.0);
    assert!(
        queue["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("warm pool"))
    );
    assert_eq!(status["fleet"]["healthy"], true);

    // The desired replicas gauge records what the scaler answered KEDA.
    let mut grpc = server.grpc().await;
    grpc.get_metrics(egress_scaler::scaler::proto::GetMetricsRequest {
        scaled_object_ref: Some(support::scaled_object(&[])),
        metric_name: "egress-replicas-default".to_owned(),
    })
    .await
    .unwrap();
    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "egress_scaler_queue_depth{queue=\"default\",kind=\"room_composite\"} 1",
        "egress_scaler_queue_oldest_age_seconds",
        "egress_scaler_desired_replicas{queue=\"default\"} 3",
        "egress_scaler_enqueue_requests_total{outcome=\"accepted\"} 2",
        "egress_scaler_grpc_requests_total{method=\"GetMetrics\",code=\"ok\"} 1",
        "egress_scaler_grpc_request_duration_seconds_count{method=\"GetMetrics\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    assert_eq!(status_of(&client, server.http("/readyz")).await, 200);
    server.stop().await;
}

#[tokio::test]
async fn enqueue_and_status_commands_talk_to_the_server() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let binary = env!("CARGO_BIN_EXE_egress-scaler");
    let base = format!("http://{}", server.http_addr);
    let run = |args: Vec<String>| {
        tokio::process::Command::new(binary)
            .args(args)
            .env_remove("LIVEKIT_API_KEY")
            .env_remove("LIVEKIT_API_SECRET")
            .output()
    };
    let out = run(vec![
        "enqueue".into(),
        "--server".into(),
        base.clone(),
        "--kind".into(),
        "room_composite".into(),
        "--room".into(),
        "town-hall".into(),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ticket default."), "{text}");
    assert!(text.contains("queued, position 0"), "{text}");
    let out = run(vec![
        "enqueue".into(),
        "--server".into(),
        base.clone(),
        "--kind".into(),
        "room_composite".into(),
        "--room".into(),
        "town-hall".into(),
    ])
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("duplicate"));
    let out = run(vec![
        "enqueue".into(),
        "--server".into(),
        base.clone(),
        "--kind".into(),
        "track".into(),
        "--room".into(),
        "x".into(),
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("track_id"));

    let out = run(vec!["status".into(), "--server".into(), base.clone()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("DESIRED"), "{table}");
    assert!(table.contains("room_composite=1"), "{table}");
    assert!(table.contains("desired 1 because"), "{table}");
    server.stop().await;
}

#[tokio::test]
async fn different_recordings_are_never_merged_and_a_changed_request_is_a_conflict() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let client = http_client();
    let ticket = |answer: &Value| answer["ticket"].as_str().unwrap().to_owned();

    // Pairs that record different things in one room: each gets its own ticket.
    let pairs = [
        (
            json!({"kind": "participant", "room_name": "r", "request": {"identity": "alice"}}),
            json!({"kind": "participant", "room_name": "r", "request": {"identity": "bob"}}),
        ),
        (
            json!({"kind": "track", "room_name": "r", "request": {"trackId": "TR_1"}}),
            json!({"kind": "track", "room_name": "r", "request": {"trackId": "TR_2"}}),
        ),
        (
            json!({"kind": "track_composite", "room_name": "r",
                   "request": {"audioTrackId": "TR_a", "videoTrackId": "TR_v1"}}),
            json!({"kind": "track_composite", "room_name": "r",
                   "request": {"audioTrackId": "TR_a", "videoTrackId": "TR_v2"}}),
        ),
        (
            json!({"kind": "web", "room_name": "r", "request": {"url": "https://board.test/1"}}),
            json!({"kind": "web", "room_name": "r", "request": {"url": "https://board.test/2"}}),
        ),
    ];
    let mut tickets = std::collections::BTreeSet::new();
    for (first, second) in &pairs {
        let (status_a, a) = enqueue(&client, &server, first.clone()).await;
        let (status_b, b) = enqueue(&client, &server, second.clone()).await;
        assert_eq!((status_a, status_b), (202, 202), "{first} / {second}: {b}");
        assert_ne!(ticket(&a), ticket(&b));
        tickets.extend([ticket(&a), ticket(&b)]);
        // The very same request again is the same recording: the holder, as a duplicate.
        let (status, again) = enqueue(&client, &server, first.clone()).await;
        assert_eq!((status, ticket(&again)), (200, ticket(&a)), "{first}");
        assert_eq!(again["duplicate"], true);
    }
    assert_eq!(tickets.len(), 8);
    assert_eq!(depth(&client, &server).await, 8);

    // The same recording asked for with another request body: 409 naming the holder.
    let (status, grid) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "r", "request": {"layout": "grid"}}),
    )
    .await;
    assert_eq!(status, 202);
    let speaker =
        json!({"kind": "room_composite", "room_name": "r", "request": {"layout": "speaker"}});
    let (status, conflict) = enqueue(&client, &server, speaker.clone()).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"], "already_exists");
    assert_eq!(conflict["ticket"], grid["ticket"]);
    assert_eq!(conflict["state"], "queued");
    assert!(
        conflict["message"]
            .as_str()
            .unwrap()
            .contains(grid["ticket"].as_str().unwrap()),
        "{conflict}"
    );
    // The default request and an explicit default are one request.
    let (status, _) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "plain"}),
    )
    .await;
    assert_eq!(status, 202);
    let (status, _) = enqueue(
        &client,
        &server,
        json!({"kind": "room_composite", "room_name": "plain", "request": {"roomName": "plain", "layout": ""}}),
    )
    .await;
    assert_eq!(status, 200);

    // A caller's key: the same key with another request is a conflict too.
    let keyed = |room: &str| json!({"kind": "room_composite", "room_name": room, "dedup_key": "meeting-42"});
    let (status, held) = enqueue(&client, &server, keyed("k1")).await;
    assert_eq!(status, 202);
    let (status, other) = enqueue(&client, &server, keyed("k2")).await;
    assert_eq!((status, &other["ticket"]), (409, &held["ticket"]));
    let (status, _) = enqueue(&client, &server, keyed("k1")).await;
    assert_eq!(status, 200);

    // Once the holder is cancelled, the other request is taken.
    let id = grid["ticket"].as_str().unwrap();
    let cancelled = client
        .delete(server.http(&format!("/v1/requests/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status().as_u16(), 200);
    let (status, _) = enqueue(&client, &server, speaker).await;
    assert_eq!(status, 202);

    let metrics = client
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("egress_scaler_enqueue_requests_total{outcome=\"conflict\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}
