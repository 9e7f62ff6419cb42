//! The Twirp front door driven by the official LiveKit server SDKs, as a backend drives
//! livekit-server: Python `livekit-api` and Node `livekit-server-sdk`, pinned and installed
//! into `target/` by `scripts/ensure-sdks` (run here when they are missing; a test fails, never
//! passes, without them). Against a real redis-server, the real server, the livekit-server
//! stand-in and egress pod stand-ins. Every wait is bounded.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use serde_json::{Value, json};
use support::{CredentialsEnvironment, TestServer, config, http_client, redis};

const KEY: &str = "standin-key";
const SECRET: &str = "standin-secret-standin-secret-01";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Installs the pinned SDKs once per test binary, or panics saying why.
fn ensure_sdks() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let output = std::process::Command::new("bash")
        .arg(root().join("scripts/ensure-sdks"))
        .output()
        .expect("bash runs scripts/ensure-sdks");
    assert!(
        output.status.success(),
        "the LiveKit SDKs could not be installed (scripts/ensure-sdks needs python3 with pip, \
         node with npm and access to PyPI and npm):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    *done = true;
}

/// Which SDK makes a call.
#[derive(Debug, Clone, Copy)]
enum Sdk {
    Python,
    Node,
}

/// One SDK call in a child process; its JSON line.
async fn sdk(sdk: Sdk, url: &str, secret: &str, action: &str, args: &[&str]) -> Value {
    ensure_sdks();
    let (program, script, path_var, path): (&str, PathBuf, &str, PathBuf) = match sdk {
        Sdk::Python => (
            "python3",
            root().join("tests/sdk/egress.py"),
            "PYTHONPATH",
            root().join("target/py-sdk"),
        ),
        Sdk::Node => (
            "node",
            root().join("tests/sdk/egress.cjs"),
            "NODE_PATH",
            root().join("target/node-sdk/node_modules"),
        ),
    };
    let child = tokio::process::Command::new(program)
        .arg(script)
        .args([url, KEY, secret, action])
        .args(args)
        .env(path_var, path)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("the SDK call ends within 30 s")
        .expect("the SDK runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{sdk:?} {action} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn token(secret: &str, room_record: bool) -> String {
    AccessToken::with_api_key(KEY, secret)
        .with_ttl(Duration::from_secs(300))
        .with_grants(VideoGrants {
            room_record,
            ..Default::default()
        })
        .to_jwt()
        .unwrap()
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

/// A livekit-server stand-in, its pods and egress-scaler in front of them.
struct World {
    _redis: RedisServer,
    livekit: LiveKitServerStandIn,
    server: TestServer,
    /// Pods the fleet lists that are down and unknown to livekit-server until [`World::pod_comes`].
    coming: Vec<EgressPodStandIn>,
}

impl World {
    /// `free` idle pods, `coming` pods still to come, egress-scaler with `flags`.
    async fn start(free: usize, coming: usize, flags: &[&str]) -> World {
        support::init();
        let redis = redis();
        let mut pods = Vec::new();
        for _ in 0..free {
            pods.push(EgressPodStandIn::start().await.unwrap());
        }
        let mut later = Vec::new();
        for _ in 0..coming {
            let pod = EgressPodStandIn::start().await.unwrap();
            pod.go_down().await;
            later.push(pod);
        }
        let livekit = LiveKitServerStandIn::start(
            LiveKitStandInOptions {
                api_key: KEY.to_owned(),
                api_secret: SECRET.to_owned(),
                timing: StartTiming::scaled(0.05),
                no_capacity_delay: Duration::from_secs(2),
                any_room_exists: true,
                ..LiveKitStandInOptions::default()
            },
            pods.clone(),
        )
        .await
        .unwrap();
        let livekit_url = livekit.url();
        let metrics: Vec<String> = pods
            .iter()
            .chain(&later)
            .map(|pod| pod.metrics_url())
            .collect();
        let metrics = metrics.join(",");
        let mut all = vec![
            "--livekit-url",
            &livekit_url,
            "--egress-metrics",
            &metrics,
            "--fleet-refresh-seconds",
            "0.1",
            "--fleet-start-grace-seconds",
            "600",
        ];
        all.extend_from_slice(flags);
        let mut config = config(&redis, &all, &CredentialsEnvironment(KEY, SECRET));
        config.livekit_call_timeout = Duration::from_secs(5);
        let server = TestServer::start(config).await;
        livekit.set_webhook_url(Some(server.http("/webhook/livekit")));
        World {
            _redis: redis,
            livekit,
            server,
            coming: later,
        }
    }

    fn url(&self) -> String {
        self.server.http("")
    }

    /// The next pod starts: it serves its metrics and livekit-server sends it jobs.
    async fn pod_comes(&mut self) {
        let pod = self.coming.remove(0);
        pod.come_back().await.unwrap();
        self.livekit.add_pod(pod);
    }

    fn started_in(&self, room: &str) -> Vec<String> {
        self.livekit
            .started()
            .into_iter()
            .filter(|egress| egress.room_name == room)
            .map(|egress| egress.egress_id)
            .collect()
    }

    async fn ticket(&self, id: &str) -> Value {
        http_client()
            .get(self.server.http(&format!("/v1/requests/{id}")))
            .bearer_auth(token(SECRET, true))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn depth(&self) -> u64 {
        let status: Value = http_client()
            .get(self.server.http("/v1/status"))
            .bearer_auth(token(SECRET, true))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status["queues"][0]["depth"].as_u64().unwrap()
    }

    async fn metrics(&self) -> String {
        http_client()
            .get(self.server.http("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A start as plain Twirp JSON, with the server's token.
    async fn plain_start(&self, method: &str, body: Value) -> (u16, Value) {
        let response = http_client()
            .post(self.server.http(&format!("/twirp/livekit.Egress/{method}")))
            .bearer_auth(token(SECRET, true))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }
}

fn error_code(answer: &Value) -> &str {
    answer["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_start_with_a_free_pod_answers_the_started_egress_and_other_calls_pass_through() {
    let world = World::start(1, 0, &[]).await;
    let url = world.url();
    world.livekit.create_room("standup");

    let started = sdk(Sdk::Python, &url, SECRET, "start_room", &["standup"]).await;
    assert!(started.get("error").is_none(), "{started}");
    let egress_id = started["egress_id"].as_str().unwrap().to_owned();
    assert_eq!(world.started_in("standup"), vec![egress_id.clone()]);
    assert_eq!(started["room_name"], "standup", "{started}");
    // livekit-server's own EgressInfo: the room's sid and the start time are known only to it.
    let info = world.livekit.egress(&egress_id).unwrap();
    assert_eq!(started["room_id"], info.room_id.as_str(), "{started}");
    assert_eq!(
        started["started_at"],
        info.started_at.to_string(),
        "{started}"
    );
    assert!(
        !started["room_id"].as_str().unwrap().is_empty(),
        "{started}"
    );
    assert!(
        ["EGRESS_STARTING", "EGRESS_ACTIVE"].contains(&started["status"].as_str().unwrap()),
        "{started}"
    );

    // ListEgress and StopEgress reach livekit-server with the caller's own token.
    let lists = world.livekit.list_calls();
    let listed = sdk(Sdk::Python, &url, SECRET, "list", &["standup"]).await;
    assert_eq!(
        listed["items"][0]["egress_id"],
        egress_id.as_str(),
        "{listed}"
    );
    assert!(world.livekit.list_calls() > lists);
    let stopped = sdk(Sdk::Python, &url, SECRET, "stop", &[&egress_id]).await;
    assert_eq!(stopped["egress_id"], egress_id.as_str(), "{stopped}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.active_egress().is_empty()
        })
        .await,
        "the stop did not reach livekit-server"
    );
    // A stop of an unknown egress keeps livekit-server's own error.
    let unknown = sdk(Sdk::Python, &url, SECRET, "stop", &["EG_unknown"]).await;
    assert_eq!(error_code(&unknown), "not_found", "{unknown}");
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_start_with_a_free_pod_answers_the_started_egress_and_other_calls_pass_through() {
    let world = World::start(1, 0, &[]).await;
    let url = world.url();

    let started = sdk(Sdk::Node, &url, SECRET, "start_room", &["retro"]).await;
    assert!(started.get("error").is_none(), "{started}");
    let egress_id = started["egress_id"].as_str().unwrap().to_owned();
    assert_eq!(world.started_in("retro"), vec![egress_id.clone()]);

    let listed = sdk(Sdk::Node, &url, SECRET, "list", &["retro"]).await;
    assert_eq!(
        listed["items"][0]["egress_id"],
        egress_id.as_str(),
        "{listed}"
    );
    let stopped = sdk(Sdk::Node, &url, SECRET, "stop", &[&egress_id]).await;
    assert_eq!(stopped["egress_id"], egress_id.as_str(), "{stopped}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.livekit.active_egress().is_empty()
        })
        .await
    );
    // A wrong secret: livekit-server's answer to the SDK, through the front door.
    let refused = sdk(
        Sdk::Node,
        &url,
        "wrong-secret-wrong-secret-wrong-0",
        "start_room",
        &["x"],
    )
    .await;
    assert_eq!(refused["error"]["status"], 401, "{refused}");
    assert_eq!(world.depth().await, 0);
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_a_pod_is_held_until_one_comes_and_the_same_call_answers() {
    let mut world = World::start(0, 1, &[]).await;
    let url = world.url();

    let call = {
        let url = url.clone();
        tokio::spawn(async move { sdk(Sdk::Python, &url, SECRET, "start_room", &["held"]).await })
    };
    // The call is held: queued, nothing started.
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.depth().await == 1
        })
        .await,
        "the start was not queued"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !call.is_finished(),
        "the call was answered before a pod came"
    );
    assert!(world.started_in("held").is_empty());

    world.pod_comes().await;
    let answer = call.await.unwrap();
    assert!(answer.get("error").is_none(), "{answer}");
    let seconds = answer["seconds"].as_f64().unwrap();
    assert!((1.5..8.0).contains(&seconds), "{answer}");
    assert_eq!(
        world.started_in("held"),
        vec![answer["egress_id"].as_str().unwrap().to_owned()]
    );
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_unavailable_waits_for_the_same_ticket_and_records_once() {
    let mut world = World::start(0, 1, &["--hold-seconds", "1"]).await;
    let url = world.url();

    let first = sdk(Sdk::Python, &url, SECRET, "start_room", &["board"]).await;
    assert_eq!(error_code(&first), "unavailable", "{first}");
    assert_eq!(first["error"]["status"], 503, "{first}");
    let message = first["error"]["message"].as_str().unwrap();
    let ticket = first["error"]["meta"]["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains(&format!("queued as ticket {ticket}, position 1"))
            && message.contains("call again to wait for it"),
        "{message}"
    );
    let seconds = first["seconds"].as_f64().unwrap();
    assert!((0.9..5.0).contains(&seconds), "{first}");

    // The same request again joins the same ticket: still one queued.
    let second = sdk(Sdk::Node, &url, SECRET, "start_room", &["board"]).await;
    assert_eq!(error_code(&second), "unavailable", "{second}");
    assert!(
        second["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&ticket),
        "{second}"
    );
    assert_eq!(world.depth().await, 1);

    world.pod_comes().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.ticket(&ticket).await["state"] == "active"
        })
        .await
    );
    let third = sdk(Sdk::Python, &url, SECRET, "start_room", &["board"]).await;
    assert!(third.get("error").is_none(), "{third}");
    let egress_id = third["egress_id"].as_str().unwrap();
    assert_eq!(world.ticket(&ticket).await["egress_id"], egress_id);
    assert_eq!(world.started_in("board"), vec![egress_id.to_owned()]);
    assert_eq!(world.livekit.started_count(), 1);
    let metrics = world.metrics().await;
    for series in [
        "egress_scaler_enqueue_requests_total{outcome=\"accepted\"} 1",
        "egress_scaler_enqueue_requests_total{outcome=\"duplicate\"} 2",
    ] {
        assert!(
            metrics.lines().any(|line| line == series),
            "no {series}:\n{metrics}"
        );
    }
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bad_requests_get_twirp_errors_and_queue_nothing() {
    let world = World::start(0, 1, &[]).await;
    let url = world.url();

    let refused = sdk(
        Sdk::Python,
        &url,
        "wrong-secret-wrong-secret-wrong-0",
        "start_room",
        &["a"],
    )
    .await;
    assert_eq!(error_code(&refused), "unauthenticated", "{refused}");
    assert_eq!(refused["error"]["status"], 401, "{refused}");

    let bad = sdk(Sdk::Python, &url, SECRET, "start_track", &["a", ""]).await;
    assert_eq!(error_code(&bad), "invalid_argument", "{bad}");
    assert_eq!(bad["error"]["status"], 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("track_id"),
        "{bad}"
    );
    assert_eq!(bad["error"]["meta"]["argument"], "track_id", "{bad}");

    // Without roomRecord: livekit-server's answer.
    let response = http_client()
        .post(
            world
                .server
                .http("/twirp/livekit.Egress/StartRoomCompositeEgress"),
        )
        .bearer_auth(token(SECRET, false))
        .json(&json!({"roomName": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"code": "unauthenticated", "msg": "permissions denied"})
    );

    // Unknown fields, an unknown queue, a body that does not decode.
    let (status, body) = world
        .plain_start(
            "StartRoomCompositeEgress",
            json!({"roomName": "a", "layot": "grid"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    assert!(body["msg"].as_str().unwrap().contains("layot"), "{body}");
    let response = http_client()
        .post(
            world
                .server
                .http("/twirp/livekit.Egress/StartRoomCompositeEgress"),
        )
        .bearer_auth(token(SECRET, true))
        .header("X-Egress-Scaler-Queue", "nobody-serves-this")
        .json(&json!({"roomName": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["meta"]["argument"], "x-egress-scaler-queue", "{body}");
    let response = http_client()
        .post(world.server.http("/twirp/livekit.Egress/StartTrackEgress"))
        .bearer_auth(token(SECRET, true))
        .header("content-type", "application/protobuf")
        .body(vec![0xff, 0xff, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "malformed", "{body}");
    assert_eq!(world.depth().await, 0);
    let metrics = world.metrics().await;
    let rejected = "egress_scaler_enqueue_requests_total{outcome=\"rejected\"} 4";
    assert!(metrics.lines().any(|line| line == rejected), "{metrics}");

    // A region list that keeps an SDK's retries here.
    let regions: Value = http_client()
        .get(world.server.http("/settings/regions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(regions, json!({"regions": []}));
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_ticket_is_answered_canceled_to_the_retry_and_a_refused_one_with_livekits_code()
{
    let world = World::start(0, 1, &["--hold-seconds", "0.5"]).await;

    let (status, body) = world
        .plain_start("StartRoomCompositeEgress", json!({"roomName": "cancelled"}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    let ticket = body["meta"]["ticket"].as_str().unwrap().to_owned();
    let cancel = http_client()
        .delete(world.server.http(&format!("/v1/requests/{ticket}")))
        .bearer_auth(token(SECRET, true))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    // The retry learns it was cancelled; the one after asks anew.
    let (status, body) = world
        .plain_start("StartRoomCompositeEgress", json!({"roomName": "cancelled"}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("canceled")),
        "{body}"
    );
    assert!(body["msg"].as_str().unwrap().contains(&ticket), "{body}");
    let (status, body) = world
        .plain_start("StartRoomCompositeEgress", json!({"roomName": "cancelled"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_ne!(body["meta"]["ticket"].as_str().unwrap(), ticket);
    world.server.stop().await;

    // A pod is free and livekit-server refuses the request: its code, to the held call.
    let world = World::start(1, 0, &[]).await;
    world.livekit.fail_next_start(
        "invalid_argument",
        "request has missing or invalid field: filepath",
    );
    let (status, body) = world
        .plain_start("StartRoomCompositeEgress", json!({"roomName": "refused"}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    assert!(body["msg"].as_str().unwrap().contains("filepath"), "{body}");
    assert!(world.started_in("refused").is_empty());
    world.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_leaves_its_ticket_queued() {
    let mut world = World::start(0, 1, &[]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gone = client
        .post(
            world
                .server
                .http("/twirp/livekit.Egress/StartRoomCompositeEgress"),
        )
        .bearer_auth(token(SECRET, true))
        .json(&json!({"roomName": "left"}))
        .send()
        .await;
    assert!(gone.unwrap_err().is_timeout());
    assert_eq!(world.depth().await, 1);
    world.pod_comes().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            world.started_in("left").len() == 1
        })
        .await,
        "the ticket of a caller that went away was not started"
    );
    world.server.stop().await;
}

#[test]
fn hold_seconds_defaults_to_8_and_refuses_what_is_not_a_duration() {
    use clap::Parser;
    use egress_scaler::config::{Cli, Command};
    let resolve = |flags: &[&str]| {
        let cli = Cli::try_parse_from(["egress-scaler", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        args.resolve(&support::NoEnvironment)
    };
    assert_eq!(resolve(&[]).unwrap().hold, Duration::from_secs(8));
    assert_eq!(
        resolve(&["--hold-seconds", "2.5"]).unwrap().hold,
        Duration::from_millis(2500)
    );
    for bad in [
        "--hold-seconds=0",
        "--hold-seconds=-1",
        "--hold-seconds=NaN",
        "--hold-seconds=inf",
    ] {
        let error = resolve(&[bad]).unwrap_err();
        assert_eq!(error.setting, "--hold-seconds", "{bad}");
    }
}
