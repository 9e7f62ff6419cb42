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
