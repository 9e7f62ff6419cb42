//! The `egress-scaler` binary as an operator runs it: config errors, and SIGTERM draining.

mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;

const BINARY: &str = env!("CARGO_BIN_EXE_egress-scaler");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_bad_setting_exits_with_one_line_naming_it_before_binding() {
    let port = free_port();
    for (args, setting) in [
        (vec!["--cost", "video=4"], "--cost"),
        (vec!["--max-cpu-utilization", "0"], "--max-cpu-utilization"),
        (
            vec!["--min-replicas", "3", "--max-replicas", "1"],
            "--max-replicas",
        ),
        (
            vec!["--livekit-url", "http://127.0.0.1:7880"],
            "LIVEKIT_API_KEY",
        ),
    ] {
        let output = Command::new(BINARY)
            .arg("serve")
            .args(["--http-listen", &format!("127.0.0.1:{port}")])
            .args(&args)
            .env_remove("LIVEKIT_API_KEY")
            .env_remove("LIVEKIT_API_SECRET")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
    }
    // Nothing was bound: the port is still free.
    TcpListener::bind(("127.0.0.1", port)).expect("port untouched");
}

#[tokio::test]
async fn sigterm_ends_streams_with_ok_and_exits_cleanly() {
    let redis = support::redis();
    let (grpc, http) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(BINARY)
        .args(["serve", "--redis-url", &redis.url()])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .env_remove("LIVEKIT_API_KEY")
        .env_remove("LIVEKIT_API_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match ExternalScalerClient::connect(format!("http://127.0.0.1:{grpc}")).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("server did not start: {error}"),
        }
    };
    let mut stream = client
        .stream_is_active(support::scaled_object(&[]))
        .await
        .unwrap()
        .into_inner();

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends on SIGTERM");
    assert!(matches!(end, Ok(None)), "ended with OK, got {end:?}");
    let status = tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .expect("exits within the grace")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The binary's own text log, as an operator's log collector reads it: no value received
/// from outside can forge a second log line or send a terminal escape.
#[tokio::test]
async fn no_input_forges_a_log_line_and_queues_come_from_the_environment() {
    use livekit_protocol as proto;
    const KEY: &str = "log-key";
    const SECRET: &str = "log-secret-log-secret-log-secret";
    let redis = support::redis();
    let (grpc, http) = (free_port(), free_port());
    let log_path = std::env::temp_dir().join(format!(
        "egress-scaler-log-{}.txt",
        uuid::Uuid::new_v4().simple()
    ));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(BINARY)
        .args(["serve", "--redis-url", &redis.url()])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--auto-record", "room_composite"])
        .env("EGRESS_SCALER_QUEUE", "rec,web")
        .env("LIVEKIT_API_KEY", KEY)
        .env("LIVEKIT_API_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = support::http_client();
    let base = format!("http://127.0.0.1:{http}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(format!("{base}/readyz")).send().await {
            Ok(answer) if answer.status().is_success() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("server did not start: {other:?}"),
        }
    }

    // A room name built to look like a second log line, with a terminal escape.
    let forged = "lobby\nERROR egress_scaler: forged line\r\u{1b}[2J";
    for event in ["room_started", "room_finished"] {
        let body = serde_json::to_string(&proto::WebhookEvent {
            event: event.to_owned(),
            room: Some(proto::Room {
                name: forged.to_owned(),
                ..Default::default()
            }),
            id: format!("EV_{event}"),
            ..Default::default()
        })
        .unwrap();
        let signature =
            egress_scaler::standin::livekit_server::sign_webhook(KEY, SECRET, &body).unwrap();
        let answer = client
            .post(format!("{base}/webhook/livekit"))
            .header("authorization", signature)
            .header("content-type", "application/webhook+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{event}");
    }

    // EGRESS_SCALER_QUEUE lists the served queues, comma separated, the first the default.
    let token = egress_scaler::cli::access_token(
        &egress_scaler::config::ApiCredentials {
            key: KEY.to_owned(),
            secret: SECRET.to_owned(),
        },
        "test",
    )
    .unwrap();
    let status: serde_json::Value = client
        .get(format!("{base}/v1/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queues: Vec<&str> = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|queue| queue["queue"].as_str().unwrap())
        .collect();
    assert_eq!(queues, ["rec", "web"], "{status}");
    assert_eq!(
        status["queues"][0]["depth"], 0,
        "the forged room was not queued"
    );

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .expect("exits within the grace")
        .unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).ok();
    assert!(
        !text.contains('\u{1b}'),
        "an escape reached the log:\n{text}"
    );
    assert!(
        !text.contains('\r'),
        "a carriage return reached the log:\n{text}"
    );
    let mentions: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("forged"))
        .collect();
    assert_eq!(mentions.len(), 1, "{text}");
    assert!(
        mentions[0].contains("Auto-record request invalid")
            && mentions[0].contains("lobby\\nERROR"),
        "{text}"
    );
    assert!(
        text.lines()
            .all(|line| !line.starts_with("ERROR egress_scaler: forged")),
        "{text}"
    );
    assert!(text.contains("queues=rec, web"), "{text}");
}
