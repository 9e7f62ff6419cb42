//! The livekit-server stand-in over HTTP, against the facts of FIDELITY.md 1-3: psrpc start
//! timing, collisions on one idle pod and the retry ladder, the STARTING answer with its
//! redacted request, statuses and webhooks, ListEgress, the error shapes and every scripted
//! outcome. Driven with the dispatcher's own client, `TwirpEgressApi`, or plain reqwest.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use egress_scaler::config::ApiCredentials;
use egress_scaler::dispatch::livekit::{EgressApi, EgressApiError, ListFilter, TwirpEgressApi};
use egress_scaler::egress_redact::redact;
use egress_scaler::egress_request::StartRequest;
use egress_scaler::model::{EgressKind, Settings};
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, ScriptedStart, StartTiming,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use proto::EgressStatus as Status;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Fast enough for tests, slow enough to measure: launch 20 ms, bid window 10 ms.
const FAST: f64 = 0.02;
/// No bound of the call's own: the client's timeout applies.
const NO_LIMIT: Duration = Duration::from_secs(3600);

async fn pods(count: usize) -> Vec<EgressPodStandIn> {
    let mut pods = Vec::new();
    for _ in 0..count {
        pods.push(
            EgressPodStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Settings::default())
                .await
                .unwrap(),
        );
    }
    pods
}

async fn livekit(timing: StartTiming, pods: &[EgressPodStandIn]) -> LiveKitServerStandIn {
    support::init();
    LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            timing,
            any_room_exists: true,
            ..LiveKitStandInOptions::default()
        },
        pods.to_vec(),
    )
    .await
    .unwrap()
}

fn api(livekit: &LiveKitServerStandIn, timeout: Duration) -> TwirpEgressApi {
    let options = livekit.options();
    TwirpEgressApi::new(
        &livekit.url(),
        ApiCredentials {
            key: options.api_key.clone(),
            secret: options.api_secret.clone(),
        },
        timeout,
    )
    .unwrap()
}

fn request(kind: EgressKind, room: &str) -> StartRequest {
    let body = match kind {
        EgressKind::Track => Some(json!({"trackId": "TR_1"})),
        EgressKind::Web | EgressKind::AudioWeb => Some(json!({"url": "https://example.com"})),
        EgressKind::Participant => Some(json!({"identity": "bob"})),
        EgressKind::TrackComposite => Some(json!({"audioTrackId": "TR_a"})),
        _ => None,
    };
    StartRequest::parse(kind, room, body).unwrap()
}

fn token(livekit: &LiveKitServerStandIn, room_record: bool) -> String {
    let options = livekit.options();
    AccessToken::with_api_key(&options.api_key, &options.api_secret)
        .with_grants(VideoGrants {
            room_record,
            ..VideoGrants::default()
        })
        .with_ttl(Duration::from_secs(600))
        .to_jwt()
        .unwrap()
}

/// An HS256 JWT with these claims, signed by hand (HMAC-SHA256 over sha2), so that tests can
/// make tokens the SDK refuses to make, such as expired ones.
fn signed_jwt(secret: &str, claims: Value) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = engine.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let mut key = secret.as_bytes().to_vec();
    if key.len() > 64 {
        key = Sha256::digest(&key).to_vec();
    }
    key.resize(64, 0);
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(input.as_bytes())
        .finalize();
    let mac = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    format!("{input}.{}", engine.encode(mac))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
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
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A raw JSON call: (status, content type, body).
async fn call(
    livekit: &LiveKitServerStandIn,
    method: &str,
    authorization: Option<String>,
    content_type: &str,
    body: String,
) -> (u16, String, String) {
    let client = support::http_client();
    let mut builder = client
        .post(format!("{}/twirp/livekit.Egress/{method}", livekit.url()))
        .header("content-type", content_type)
        .body(body);
    if let Some(authorization) = authorization {
        builder = builder.header("authorization", authorization);
    }
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, content_type, response.text().await.unwrap())
}

async fn list(livekit: &LiveKitServerStandIn, body: Value) -> (u16, Value) {
    let (status, _, text) = call(
        livekit,
        "ListEgress",
        Some(format!("Bearer {}", token(livekit, true))),
        "application/json",
        body.to_string(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn stop(livekit: &LiveKitServerStandIn, egress_id: &str) -> (u16, Value) {
    let (status, _, text) = call(
        livekit,
        "StopEgress",
        Some(format!("Bearer {}", token(livekit, true))),
        "application/json",
        json!({ "egressId": egress_id }).to_string(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn twirp_code(error: &EgressApiError) -> (&str, &str) {
    match error {
        EgressApiError::Twirp { code, msg } => (code, msg),
        other => panic!("not a Twirp error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pod_answers_after_launch_and_bid_window_a_busy_pod_after_launch() {
    // 0.3: launch 300 ms, bid window 150 ms.
    let timing = StartTiming::scaled(0.3);
    let pods = pods(1).await;
    let livekit = livekit(timing, &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    // A first call that fails at once opens the connection, so that it is not measured.
    livekit.fail_next_start("unavailable", "warm-up");
    assert!(
        api.start(&request(EgressKind::Track, "r"), NO_LIMIT)
            .await
            .is_err()
    );
    let started = Instant::now();
    let first = api
        .start(&request(EgressKind::Track, "r"), NO_LIMIT)
        .await
        .unwrap();
    let idle = started.elapsed();
    let started = Instant::now();
    let second = api
        .start(&request(EgressKind::Track, "r"), NO_LIMIT)
        .await
        .unwrap();
    let busy = started.elapsed();
    // Less than the bid window, so that the two cases cannot be mistaken for each other.
    let slack = timing.bid_window - Duration::from_millis(5);
    let idle_answer = timing.launch + timing.bid_window;
    assert!(
        idle >= idle_answer && idle < idle_answer + slack,
        "idle pod: {idle:?}"
    );
    assert!(
        busy >= timing.launch && busy < timing.launch + slack,
        "busy pod: {busy:?}"
    );
    assert_ne!(first.egress_id, second.egress_id, "a new ID per call");
    assert_eq!(pods[0].active().get("track"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_starting_with_credentials_and_stream_keys_redacted() {
    let pods = pods(1).await;
    support::init();
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            timing: StartTiming::scaled(FAST),
            ..LiveKitStandInOptions::default()
        },
        pods.clone(),
    )
    .await
    .unwrap();
    livekit.create_room("standup");
    let sent = StartRequest::parse(
        EgressKind::Participant,
        "standup",
        Some(json!({
            "identity": "bob",
            "fileOutputs": [{"filepath": "bob.mp4", "s3": {"accessKey": "AKIA", "secret": "s3cr3t", "bucket": "b"}}],
            "streamOutputs": [{"urls": ["rtmps://live.example.com/app/sk_live_123456"]}]
        })),
    )
    .unwrap();
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let info = api(&livekit, Duration::from_secs(10))
        .start(&sent, NO_LIMIT)
        .await
        .unwrap();
    assert_eq!(info.status, Status::EgressStarting as i32);
    assert_eq!(info.started_at, info.updated_at);
    assert!(info.started_at >= before, "now, in ns");
    assert_eq!(info.room_name, "standup");
    assert!(info.room_id.starts_with("RM_"), "{}", info.room_id);
    assert_eq!(info.source_type, proto::EgressSourceType::Sdk as i32);
    assert_eq!(info.file_results.len(), 1);
    assert_eq!(info.file_results[0].filename, "bob.mp4");
    assert_eq!(
        info.stream_results
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>(),
        ["rtmps://live.example.com/app/{sk_...456}"]
    );
    let listed = StartRequest::from_info_request(info.request.as_ref().unwrap()).unwrap();
    assert_eq!(listed, redact(&sent));
    assert_ne!(listed, sent);
    let text = listed.to_json();
    assert!(
        !text.contains("s3cr3t") && !text.contains("sk_live_123456"),
        "{text}"
    );
    // What the pod started with is what was sent; what is listed is redacted.
    assert_eq!(livekit.started()[0].request, sent);
    assert_eq!(
        livekit.egress(&info.egress_id).unwrap().request,
        info.request
    );

    // Web: no room; a video room composite is a WEB source, an audio-only one without a
    // layout an SDK source.
    let web = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::Web, "ignored"), NO_LIMIT)
        .await;
    assert!(
        web.is_err(),
        "the pod is busy with a participant egress: no room for 4 cores"
    );
    livekit.end_all();
    assert!(
        eventually(Duration::from_secs(5), || async {
            pods[0].active().is_empty()
        })
        .await
    );
    let web = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::Web, "ignored"), NO_LIMIT)
        .await
        .unwrap();
    assert_eq!((web.room_name.as_str(), web.room_id.as_str()), ("", ""));
    assert_eq!(web.source_type, proto::EgressSourceType::Web as i32);
    livekit.end_all();
    assert!(
        eventually(Duration::from_secs(5), || async {
            pods[0].active().is_empty()
        })
        .await
    );
    let audio = api(&livekit, Duration::from_secs(10))
        .start(
            &request(EgressKind::AudioRoomComposite, "standup"),
            NO_LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(audio.source_type, proto::EgressSourceType::Sdk as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_starts_on_one_idle_pod_collide_and_the_second_is_retried_with_the_same_id() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(2).await;
    let livekit = livekit(timing, &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    let a = request(EgressKind::RoomComposite, "a");
    let b = request(EgressKind::RoomComposite, "b");
    let started = Instant::now();
    let (first, second) = tokio::join!(api.start(&a, NO_LIMIT), api.start(&b, NO_LIMIT));
    let (first, second) = (first.unwrap(), second.unwrap());
    let elapsed = started.elapsed();
    let egress = livekit.started();
    assert_eq!(egress.len(), 2);
    assert_ne!(
        egress[0].node_id, egress[1].node_id,
        "on different pods in the end"
    );
    assert_eq!(
        egress.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 2],
        "both bid for the first pod; the second was refused and retried"
    );
    // The retried one kept the ID made when its call arrived.
    let retried = &egress[1];
    assert!([&first.egress_id, &second.egress_id].contains(&&retried.egress_id));
    assert!(
        elapsed >= timing.bid_window * 2 + timing.retry_first.0 + timing.launch,
        "a retry waits 1-2 s (scaled): {elapsed:?}"
    );
    assert_eq!(livekit.start_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_idle_pod_the_second_of_two_starts_gets_503_after_the_ladder() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(1).await;
    let livekit = livekit(timing, &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    let a = request(EgressKind::RoomComposite, "a");
    let b = request(EgressKind::RoomComposite, "b");
    let started = Instant::now();
    let (first, second) = tokio::join!(api.start(&a, NO_LIMIT), api.start(&b, NO_LIMIT));
    let elapsed = started.elapsed();
    let (ok, failed) = match (first, second) {
        (Ok(info), Err(error)) | (Err(error), Ok(info)) => (info, error),
        other => panic!("one start, one 503: {other:?}"),
    };
    assert_eq!(livekit.started()[0].egress_id, ok.egress_id);
    assert_eq!(
        twirp_code(&failed),
        (
            "unavailable",
            "twirp error unknown: no response from servers"
        )
    );
    let (low, high) = timing.no_bid_answer();
    // The first attempt was the collision (bid window, not an attempt timeout).
    assert!(
        elapsed >= low - timing.attempt_timeout && elapsed < high + Duration::from_millis(300),
        "{elapsed:?} not in the ladder's {low:?}..{high:?}"
    );
    assert_eq!(livekit.started_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_bid_the_answer_is_503_after_18_to_27_scaled_seconds() {
    let timing = StartTiming::scaled(FAST);
    let livekit = livekit(timing, &[]).await;
    let started = Instant::now();
    let (status, content_type, body) = call(
        &livekit,
        "StartRoomCompositeEgress",
        Some(format!("Bearer {}", token(&livekit, true))),
        "application/json",
        json!({"roomName": "r"}).to_string(),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(status, 503);
    assert_eq!(content_type, "application/json");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"code": "unavailable", "msg": "twirp error unknown: no response from servers"}),
        "no meta key"
    );
    let (low, high) = timing.no_bid_answer();
    assert!(
        elapsed >= low && elapsed < high + Duration::from_millis(300),
        "{elapsed:?} not in {low:?}..{high:?}"
    );
    assert_eq!(livekit.start_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_stops_the_ladder() {
    let timing = StartTiming::scaled(FAST);
    let livekit = livekit(timing, &[]).await;
    // The caller goes during the second attempt's wait; capacity comes after it went.
    let error = api(&livekit, Duration::from_millis(50))
        .start(&request(EgressKind::Track, "r"), NO_LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(error, EgressApiError::Timeout(_)), "{error:?}");
    livekit.add_pod(pods(1).await.remove(0));
    tokio::time::sleep(timing.no_bid_answer().1).await;
    assert_eq!(
        livekit.started_count(),
        0,
        "no attempt after the caller left"
    );
    // A caller that stays is served by a later attempt once capacity is there.
    let livekit = self::livekit(timing, &[]).await;
    let api = api(&livekit, Duration::from_secs(10));
    let call =
        tokio::spawn(async move { api.start(&request(EgressKind::Track, "r"), NO_LIMIT).await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.start_calls() == 1
        })
        .await
    );
    // Past the first attempt (no bid) before the pod joins.
    tokio::time::sleep(timing.attempt_timeout * 2).await;
    livekit.add_pod(pods(1).await.remove(0));
    let info = call.await.unwrap().unwrap();
    assert!(livekit.started()[0].attempt > 1);
    assert_eq!(livekit.started()[0].egress_id, info.egress_id);
}

/// Webhooks received: (event JSON, authorization present); answers the scripted statuses
/// first, then 200.
#[derive(Clone, Default)]
struct Receiver {
    events: Arc<Mutex<Vec<Value>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
}

impl Receiver {
    async fn start(statuses: Vec<u16>) -> (Receiver, String) {
        let receiver = Receiver {
            events: Arc::default(),
            statuses: Arc::new(Mutex::new(statuses)),
        };
        async fn hook(
            State(receiver): State<Receiver>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let authorized = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| !v.starts_with("Bearer ") && v.split('.').count() == 3);
            let typed = headers.get("content-type").and_then(|v| v.to_str().ok())
                == Some("application/webhook+json");
            let mut event: Value = serde_json::from_slice(&body).unwrap();
            event["_signed"] = json!(authorized && typed);
            receiver.events.lock().unwrap().push(event);
            let mut statuses = receiver.statuses.lock().unwrap();
            if statuses.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::from_u16(statuses.remove(0)).unwrap()
            }
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (receiver, url)
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// (event, status) of one egress, in arrival order.
    fn of_egress(&self, egress_id: &str) -> Vec<(String, String)> {
        self.events()
            .iter()
            .filter(|e| e["egressInfo"]["egressId"] == egress_id)
            .map(|e| {
                (
                    e["event"].as_str().unwrap().to_owned(),
                    e["egressInfo"]["status"]
                        .as_str()
                        .unwrap_or("EGRESS_STARTING")
                        .to_owned(),
                )
            })
            .collect()
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_flow_from_starting_to_complete_with_their_webhooks() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(1).await;
    let (receiver, url) = Receiver::start(Vec::new()).await;
    support::init();
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            timing,
            webhook_url: Some(url),
            ..LiveKitStandInOptions::default()
        },
        pods.clone(),
    )
    .await
    .unwrap();
    livekit.create_room("standup");
    let info = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::RoomComposite, "standup"), NO_LIMIT)
        .await
        .unwrap();
    let id = info.egress_id.clone();
    // Stored before the answer.
    assert!(livekit.egress(&id).is_some());
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.egress(&id).unwrap().status == Status::EgressActive as i32
        })
        .await
    );
    assert!(livekit.end_egress(&id));
    assert_eq!(
        livekit.egress(&id).unwrap().status,
        Status::EgressEnding as i32
    );
    assert_eq!(
        pods[0].active().get("room_composite"),
        Some(&1),
        "uploading"
    );
    assert!(!livekit.end_egress(&id), "already ending");
    assert!(
        eventually(Duration::from_secs(5), || async {
            receiver.of_egress(&id).len() == 4
        })
        .await,
        "{:?}",
        receiver.events()
    );
    assert_eq!(
        receiver.of_egress(&id),
        pairs(&[
            ("egress_started", "EGRESS_STARTING"),
            ("egress_updated", "EGRESS_ACTIVE"),
            ("egress_updated", "EGRESS_ENDING"),
            ("egress_ended", "EGRESS_COMPLETE"),
        ])
    );
    assert!(pods[0].active().is_empty(), "the job ended with COMPLETE");
    let events = receiver.events();
    let room_started = events
        .iter()
        .find(|e| e["event"] == "room_started")
        .unwrap();
    let room_sid = room_started["room"]["sid"].as_str().unwrap().to_owned();
    for event in &events {
        let event_id = event["id"].as_str().unwrap();
        assert!(
            event_id.starts_with("EV_") && event_id.len() == 15,
            "{event_id}"
        );
        let created: u64 = event["createdAt"].as_str().unwrap().parse().unwrap();
        assert!(
            created.abs_diff(unix_now()) < 60,
            "createdAt in seconds: {created}"
        );
        assert_eq!(event["_signed"], true);
        if event["egressInfo"].is_object() {
            assert_eq!(event["room"]["name"], "standup");
            assert_eq!(event["room"]["sid"], room_sid.as_str());
        }
    }
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "a new id per event");

    // Failures and stops.
    let second = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::RoomComposite, "standup"), NO_LIMIT)
        .await
        .unwrap();
    assert!(livekit.fail_egress(&second.egress_id, "pipeline crashed"));
    let failed = livekit.egress(&second.egress_id).unwrap();
    assert_eq!(
        (failed.status, failed.error.as_str()),
        (Status::EgressFailed as i32, "pipeline crashed")
    );
    assert!(!livekit.fail_egress(&second.egress_id, "again"));
    let (status, body) = stop(&livekit, &second.egress_id).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (412, Some("failed_precondition"))
    );
    let (status, body) = stop(&livekit, "EG_unknown").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    assert!(
        eventually(Duration::from_secs(5), || async {
            receiver.of_egress(&second.egress_id).last()
                == Some(&("egress_ended".to_owned(), "EGRESS_FAILED".to_owned()))
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_aborts_a_starting_egress_and_ends_an_active_one() {
    let timing = StartTiming {
        active_after: Duration::from_secs(3600),
        ..StartTiming::scaled(FAST)
    };
    let pods = pods(2).await;
    let livekit = livekit(timing, &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    let starting = api
        .start(&request(EgressKind::RoomComposite, "a"), NO_LIMIT)
        .await
        .unwrap();
    let (status, body) = stop(&livekit, &starting.egress_id).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "EGRESS_ABORTED");
    assert!(
        pods.iter().all(|pod| pod.active().is_empty()),
        "aborted: the job is gone"
    );

    let timing = StartTiming::scaled(FAST);
    let livekit = self::livekit(timing, &pods).await;
    let info = self::api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::RoomComposite, "b"), NO_LIMIT)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.egress(&info.egress_id).unwrap().status == Status::EgressActive as i32
        })
        .await
    );
    let (status, body) = stop(&livekit, &info.egress_id).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("EGRESS_ENDING"))
    );
    let (status, body) = stop(&livekit, &info.egress_id).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (412, Some("failed_precondition"))
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.egress(&info.egress_id).unwrap().status == Status::EgressComplete as i32
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_retried_with_the_same_id_and_dropped_after_five_tries() {
    let timing = StartTiming::scaled(FAST);
    // Two 503s, then 200: three deliveries of one event, one id.
    let (receiver, url) = Receiver::start(vec![503, 503]).await;
    let livekit = livekit(timing, &[]).await;
    livekit.set_webhook_url(Some(url));
    livekit.create_room("retried");
    livekit.finish_room("retried");
    assert!(
        eventually(Duration::from_secs(5), || async {
            receiver.events().len() == 4
        })
        .await,
        "{:?}",
        receiver.events()
    );
    let events = receiver.events();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "room_started",
            "room_started",
            "room_started",
            "room_finished"
        ],
        "one room's events stay in order behind the retries"
    );
    assert!(events[..3].iter().all(|e| e["id"] == events[0]["id"]));
    // Counted once the sender has read the receiver's answer, a moment after it was received.
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.webhook_counts() == (2, 0)
        })
        .await,
        "{:?}",
        livekit.webhook_counts()
    );

    // A receiver that always fails: 5 tries, then the event is given up.
    let (receiver, url) = Receiver::start(vec![500; 10]).await;
    livekit.set_webhook_url(Some(url));
    livekit.create_room("failing");
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.webhook_counts() == (2, 1)
        })
        .await,
        "{:?}",
        livekit.webhook_counts()
    );
    assert_eq!(receiver.events().len(), 5);
    // A 4xx is final: no retry.
    let (receiver, url) = Receiver::start(vec![400]).await;
    livekit.set_webhook_url(Some(url));
    livekit.create_room("refused");
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.webhook_counts() == (3, 1)
        })
        .await
    );
    tokio::time::sleep(timing.webhook_retry * 4).await;
    assert_eq!(receiver.events().len(), 1);
    // Turned off: nothing is sent.
    livekit.set_webhooks(false);
    livekit.create_room("silent");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(receiver.events().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_by_id_is_exclusive_and_not_found_once_swept_a_room_never_is() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(2).await;
    let livekit = livekit(timing, &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    let a = api
        .start(&request(EgressKind::RoomComposite, "a"), NO_LIMIT)
        .await
        .unwrap();
    let b = api
        .start(&request(EgressKind::RoomComposite, "b"), NO_LIMIT)
        .await
        .unwrap();
    livekit.end_egress(&a.egress_id);
    assert!(
        eventually(Duration::from_secs(5), || async {
            livekit.egress(&a.egress_id).unwrap().status == Status::EgressComplete as i32
        })
        .await
    );
    // By ID: room and active are ignored.
    let (status, body) = list(
        &livekit,
        json!({"egressId": a.egress_id, "roomName": "b", "active": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert_eq!(body["items"][0]["egressId"], a.egress_id.as_str());
    let by_client = api
        .list_egress(&ListFilter::Egress(b.egress_id.clone()), false)
        .await
        .unwrap();
    assert_eq!(by_client[0].egress_id, b.egress_id);
    // Active keeps STARTING/ACTIVE/ENDING.
    let active = api.list_egress(&ListFilter::All, true).await.unwrap();
    assert_eq!(
        active
            .iter()
            .map(|e| e.egress_id.as_str())
            .collect::<Vec<_>>(),
        [b.egress_id.as_str()]
    );
    assert_eq!(
        api.list_egress(&ListFilter::All, false)
            .await
            .unwrap()
            .len(),
        2
    );
    // The sweep: ended egress leave, unknown IDs are not_found, rooms never are.
    assert_eq!(livekit.sweep_ended(), 1);
    let error = api
        .list_egress(&ListFilter::Egress(a.egress_id.clone()), false)
        .await
        .unwrap_err();
    assert_eq!(
        twirp_code(&error),
        ("not_found", "twirp error unknown: egress does not exist")
    );
    let (status, body) = list(&livekit, json!({"egressId": "EG_never"})).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    assert!(
        api.list_egress(&ListFilter::Room("a".to_owned()), false)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        api.list_egress(&ListFilter::Room("nowhere".to_owned()), false)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(livekit.list_calls(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_routing_errors_have_livekits_shapes() {
    let livekit = livekit(StartTiming::scaled(FAST), &pods(1).await).await;
    let options = livekit.options().clone();
    let json_body = json!({"roomName": "r"}).to_string();
    let start = "StartRoomCompositeEgress";
    let bearer = |token: String| Some(format!("Bearer {token}"));
    let now = unix_now();
    let claims = |iss: &str, exp: u64| json!({"iss": iss, "exp": exp, "nbf": now - 10, "video": {"roomRecord": true}});
    let plain = [
        (
            Some(format!("Token {}", token(&livekit, true))),
            "invalid authorization header. Must start with Bearer ",
        ),
        (
            bearer("not-a-jwt".to_owned()),
            "invalid authorization token",
        ),
        (
            bearer(signed_jwt(
                &options.api_secret,
                claims("someone-else", now + 600),
            )),
            "invalid API key",
        ),
        (
            bearer(signed_jwt(
                "another-secret-another-secret-00",
                claims(&options.api_key, now + 600),
            )),
            "invalid authorization token: ",
        ),
        (
            bearer(signed_jwt(
                &options.api_secret,
                claims(&options.api_key, now - 3600),
            )),
            "invalid authorization token: ",
        ),
    ];
    for (authorization, text) in plain {
        // Authentication comes first: even a bad content type gets the plain-text 401.
        for content_type in ["application/json", "text/plain"] {
            let (status, kind, body) = call(
                &livekit,
                start,
                authorization.clone(),
                content_type,
                json_body.clone(),
            )
            .await;
            assert_eq!(status, 401, "{authorization:?}");
            assert!(kind.starts_with("text/plain"), "{kind}");
            assert!(body.starts_with(text), "{body:?} for {authorization:?}");
        }
    }
    // The hand-made signature is right: the same claims with the right key pass.
    let (status, _, _) = call(
        &livekit,
        start,
        bearer(signed_jwt(
            &options.api_secret,
            claims(&options.api_key, now + 600),
        )),
        "application/json",
        json_body.clone(),
    )
    .await;
    assert_eq!(status, 200);
    livekit.end_all();

    // No header, or no roomRecord: Twirp unauthenticated, after decoding.
    for authorization in [None, bearer(token(&livekit, false))] {
        let (status, kind, body) = call(
            &livekit,
            start,
            authorization,
            "application/json",
            json_body.clone(),
        )
        .await;
        assert_eq!((status, kind.as_str()), (401, "application/json"));
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"code": "unauthenticated", "msg": "permissions denied"})
        );
    }
    let good = bearer(token(&livekit, true));
    let twirp = |body: &str| serde_json::from_str::<Value>(body).unwrap();
    let (status, _, body) = call(
        &livekit,
        start,
        good.clone(),
        "text/plain",
        json_body.clone(),
    )
    .await;
    assert_eq!(
        (status, twirp(&body)["code"].as_str()),
        (404, Some("bad_route"))
    );
    assert_eq!(
        twirp(&body)["meta"]["twirp_invalid_route"],
        "POST /twirp/livekit.Egress/StartRoomCompositeEgress"
    );
    let (status, _, body) = call(
        &livekit,
        "StartSomething",
        good.clone(),
        "application/json",
        json_body.clone(),
    )
    .await;
    assert_eq!(
        (status, twirp(&body)["code"].as_str()),
        (404, Some("bad_route"))
    );
    let (status, _, body) = call(
        &livekit,
        start,
        good.clone(),
        "application/json",
        "{".to_owned(),
    )
    .await;
    assert_eq!(
        (status, twirp(&body)["code"].as_str()),
        (400, Some("malformed"))
    );
    assert_eq!(livekit.start_calls(), 1, "none of these reached a start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_answered_in_the_format_they_came_in() {
    use prost::Message;
    let livekit = livekit(StartTiming::scaled(FAST), &pods(1).await).await;
    let (status, kind, body) = call(
        &livekit,
        "StartRoomCompositeEgress",
        Some(format!("Bearer {}", token(&livekit, true))),
        "application/json",
        json!({"roomName": "json-room", "layout": "grid"}).to_string(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (200, "application/json"));
    let info: Value = serde_json::from_str(&body).unwrap();
    assert!(info["egressId"].as_str().unwrap().starts_with("EG_"));
    assert_eq!(info["roomName"], "json-room");
    assert_eq!(info["roomComposite"]["layout"], "grid");
    // Defaults are left out of protobuf JSON: STARTING, and WEB as the source type.
    assert!(
        info.get("status").is_none() && info.get("sourceType").is_none(),
        "{info}"
    );
    let answer = support::http_client()
        .post(format!("{}/twirp/livekit.Egress/ListEgress", livekit.url()))
        .bearer_auth(token(&livekit, true))
        .header("content-type", "application/protobuf")
        .body(
            proto::ListEgressRequest {
                room_name: "json-room".to_owned(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"].to_str().unwrap(),
        "application/protobuf"
    );
    let list = proto::ListEgressResponse::decode(answer.bytes().await.unwrap()).unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].egress_id, info["egressId"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_room_and_a_passed_caller_deadline_answer_as_livekit_does() {
    let pods = pods(1).await;
    support::init();
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            timing: StartTiming::scaled(FAST),
            ..LiveKitStandInOptions::default()
        },
        Vec::new(),
    )
    .await
    .unwrap();
    let error = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::RoomComposite, "ghost"), NO_LIMIT)
        .await
        .unwrap_err();
    assert_eq!(
        twirp_code(&error),
        (
            "not_found",
            "twirp error unknown: requested room does not exist"
        )
    );
    livekit.create_room("late");
    let client = support::http_client();
    let started = Instant::now();
    let response = client
        .post(format!(
            "{}/twirp/livekit.Egress/StartRoomCompositeEgress",
            livekit.url()
        ))
        .bearer_auth(token(&livekit, true))
        .header("content-type", "application/json")
        .header("x-twirp-timeout-ms", "100")
        .body(json!({"roomName": "late"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 408);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "deadline_exceeded");
    assert!(
        started.elapsed() < StartTiming::scaled(FAST).no_bid_answer().0,
        "answered at the caller's deadline, not at the end of the ladder"
    );
    // The ladder stopped with the deadline: a pod arriving later gets nothing.
    livekit.add_pod(pods[0].clone());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(livekit.started_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_answers_that_start_nothing() {
    let pods = pods(1).await;
    let livekit = livekit(StartTiming::scaled(FAST), &pods).await;
    let api = api(&livekit, Duration::from_secs(10));
    let track = request(EgressKind::Track, "r");
    livekit.fail_next_start("invalid_argument", "unsupported output");
    livekit.script_start(ScriptedStart::PlainText {
        status: 401,
        body: "invalid authorization token".to_owned(),
    });
    livekit.script_start(ScriptedStart::Html { status: 502 });
    let error = api.start(&track, NO_LIMIT).await.unwrap_err();
    assert_eq!(
        twirp_code(&error),
        ("invalid_argument", "unsupported output")
    );
    let error = api.start(&track, NO_LIMIT).await.unwrap_err();
    // livekit-server's plain-text 401: certainly not started.
    assert!(
        matches!(&error, EgressApiError::Unauthorized(text) if text.contains("invalid authorization token")),
        "{error:?}"
    );
    let (status, kind, body) = call(
        &livekit,
        "StartTrackEgress",
        Some(format!("Bearer {}", token(&livekit, true))),
        "application/json",
        json!({"roomName": "r", "trackId": "TR_1"}).to_string(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (502, "text/html"));
    assert!(body.contains("502 Bad Gateway"), "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(livekit.started_count(), 0);
    assert_eq!(livekit.start_calls(), 3);
    // The queue is used up: the next start is an ordinary one.
    api.start(&track, NO_LIMIT).await.unwrap();
    assert_eq!(livekit.started_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_answers_that_hide_a_started_egress() {
    let pods = pods(1).await;
    let livekit = livekit(StartTiming::scaled(FAST), &pods).await;
    let track = request(EgressKind::Track, "r");
    livekit.script_start(ScriptedStart::StartedButLost);
    let error = api(&livekit, Duration::from_millis(300))
        .start(&track, NO_LIMIT)
        .await
        .unwrap_err();
    assert!(matches!(error, EgressApiError::Timeout(_)), "{error:?}");
    assert_eq!(livekit.started_count(), 1, "started all the same");
    livekit.script_start(ScriptedStart::StartedThenHtml { status: 502 });
    let error = api(&livekit, Duration::from_secs(10))
        .start(&track, NO_LIMIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, EgressApiError::Transport(text) if text.contains("502")),
        "{error:?}"
    );
    assert_eq!(livekit.started_count(), 2);
    let listed = api(&livekit, Duration::from_secs(10))
        .list_egress(&ListFilter::Room("r".to_owned()), true)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "both are running and listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pod_is_retried_with_the_same_id_and_meets_already_exists() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(1).await;
    let livekit = livekit(timing, &pods).await;
    // A track: the pod, now busy with it, still bids for the retry and finds the ID running.
    livekit.script_start(ScriptedStart::SlowPod(timing.pod_timeout * 3));
    let started = Instant::now();
    let error = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::Track, "r"), NO_LIMIT)
        .await
        .unwrap_err();
    assert_eq!(
        twirp_code(&error),
        (
            "already_exists",
            "twirp error unknown: egress already exists"
        )
    );
    assert!(started.elapsed() >= timing.pod_timeout + timing.retry_first.0);
    let egress = livekit.started();
    assert_eq!(egress.len(), 1);
    assert_eq!(
        livekit.egress(&egress[0].egress_id).unwrap().status,
        Status::EgressActive as i32,
        "it runs under that ID"
    );

    // A composite with a second idle pod: the retry starts a second copy under the same ID.
    let pods = self::pods(2).await;
    let livekit = self::livekit(timing, &pods).await;
    livekit.script_start(ScriptedStart::SlowPod(timing.pod_timeout * 3));
    let info = api(&livekit, Duration::from_secs(10))
        .start(&request(EgressKind::RoomComposite, "r"), NO_LIMIT)
        .await
        .unwrap();
    let egress = livekit.started();
    assert_eq!(egress.len(), 2);
    assert_eq!(egress[0].egress_id, egress[1].egress_id);
    assert_eq!(info.egress_id, egress[0].egress_id);
    assert_ne!(egress[0].node_id, egress[1].node_id);
    assert!(
        pods.iter()
            .all(|pod| pod.active().get("room_composite") == Some(&1))
    );
    livekit.end_egress(&info.egress_id);
    assert!(
        eventually(Duration::from_secs(5), || async {
            pods.iter().all(|pod| pod.active().is_empty())
        })
        .await,
        "ending the ID ends both copies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_actor_starts_egress_and_an_orphan_stays_active_for_ever() {
    let timing = StartTiming::scaled(FAST);
    let pods = pods(1).await;
    let (receiver, url) = Receiver::start(Vec::new()).await;
    let livekit = livekit(timing, &pods).await;
    livekit.set_webhook_url(Some(url));
    let info = livekit
        .start_by_other(request(EgressKind::RoomComposite, "theirs"))
        .unwrap();
    assert_eq!(info.status, Status::EgressStarting as i32);
    assert!(livekit.started()[0].by_other);
    assert_eq!(livekit.start_calls(), 0);
    assert_eq!(pods[0].active().get("room_composite"), Some(&1));
    assert!(
        livekit
            .start_by_other(request(EgressKind::RoomComposite, "more"))
            .is_none(),
        "no pod admits a second composite"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            receiver.of_egress(&info.egress_id).len() == 2
        })
        .await
    );
    // Its pod dies: the job goes, the record stays ACTIVE and nothing more is sent.
    assert!(livekit.orphan_egress(&info.egress_id));
    assert!(pods[0].active().is_empty());
    assert!(!livekit.end_egress(&info.egress_id));
    let (status, body) = stop(&livekit, &info.egress_id).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    tokio::time::sleep(timing.ending_for * 3).await;
    assert_eq!(
        livekit.egress(&info.egress_id).unwrap().status,
        Status::EgressActive as i32
    );
    assert_eq!(livekit.sweep_ended(), 0, "an orphan is never swept");
    assert_eq!(receiver.of_egress(&info.egress_id).len(), 2);
}
