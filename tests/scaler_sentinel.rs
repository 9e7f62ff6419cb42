//! `serve` on Redis Sentinel, driven as KEDA drives it: while the sentinels replace a killed
//! primary, GetMetrics answers `Unavailable`, never a made-up number, and afterwards the same
//! number again, without a restart.

mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use egress_scaler::config::{Cli, Command};
use egress_scaler::redis_server::RedisSentinels;
use egress_scaler::scaler::proto::GetMetricsRequest;
use serde_json::json;
use support::{NoEnvironment, TestServer, enqueue, http_client, scaled_object};
use tonic::Code;

async fn desired(server: &TestServer) -> Result<i64, tonic::Status> {
    let mut client = server.grpc().await;
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&[])),
            metric_name: "egress-replicas-default".to_owned(),
        })
        .await?
        .into_inner();
    Ok(answer.metric_values[0].metric_value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_metrics_is_unavailable_during_a_failover_never_zero_then_the_same() {
    let mut set = tokio::task::block_in_place(RedisSentinels::start).expect("sentinels start");
    let cli = Cli::try_parse_from([
        "egress-scaler",
        "serve",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--redis-url",
        &set.url(),
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let server = TestServer::start(args.resolve(&NoEnvironment).unwrap()).await;
    let http = http_client();
    for room in ["a", "b", "c"] {
        let body = json!({"kind": "room_composite", "room_name": room});
        assert_eq!(enqueue(&http, &server, body).await.0, 202);
    }
    let before = desired(&server).await.unwrap();
    assert!(before > 0);

    let old = tokio::task::block_in_place(|| set.kill_primary()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut unavailable, mut answered_after) = (0, false);
    while !answered_after {
        assert!(Instant::now() < deadline, "GetMetrics never answered again");
        match desired(&server).await {
            // Before the switch is noticed, or after it: the confirmed queue, never less.
            Ok(value) => {
                assert_eq!(value, before, "GetMetrics read {value} during the failover");
                answered_after = unavailable > 0;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                unavailable += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = tokio::task::block_in_place(|| set.primary_port()).unwrap();
    assert_ne!(new, old, "answered again from the new primary");
    // The old primary comes back as a replica, so writes are confirmed again.
    tokio::task::block_in_place(|| set.server_mut(old).unwrap().start_again()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = json!({"kind": "room_composite", "room_name": "after"});
        match enqueue(&http, &server, body).await.0 {
            // 200: an earlier try answered 503 (unconfirmed) was kept, and found by its key.
            200 | 202 => break,
            503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            status => panic!("enqueue after the failover answered {status}"),
        }
    }
    let ready = http.get(server.http("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    assert!(desired(&server).await.unwrap() >= before);
    server.stop().await;
}
