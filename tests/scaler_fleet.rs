//! The scaler with a live fleet: stand-in egress pods, a stand-in or a real Prometheus on
//! loopback, the real server, a real Redis.

mod support;

use std::time::{Duration, Instant};

use egress_scaler::scaler::proto::GetMetricsRequest;
use egress_scaler::standin::{EgressPodStandIn, PrometheusFailure, PrometheusStandIn};
use serde_json::{Value, json};
use support::prometheus::{PrometheusServer, Target};
use support::{NoEnvironment, TestServer, config, enqueue, http_client, redis, scaled_object};
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

/// Polls until the scaler answers `expected` (the fleet refreshes in the background).
async fn eventually_desired(server: &TestServer, expected: i64) {
    eventually_desired_within(server, expected, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn busy_and_idle_pods_shape_the_answer_and_show_in_status() {
    support::init();
    let redis = redis();
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_active("room_composite", 1);
    let idle = EgressPodStandIn::start().await.unwrap();
    let (busy_url, idle_url) = (busy.metrics_url(), idle.metrics_url());
    let flags = [
        "--egress-metrics",
        &busy_url,
        "--egress-metrics",
        &idle_url,
        "--fleet-refresh-seconds",
        "0.05",
    ];
    let server = TestServer::start(config(&redis, &flags, &NoEnvironment)).await;
    let http = http_client();

    // The busy pod is kept; the idle one is spare.
    eventually_desired(&server, 1).await;
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    // The queued composite goes on the idle pod: busy + idle used = 2.
    eventually_desired(&server, 2).await;
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "b"}),
    )
    .await;
    eventually_desired(&server, 3).await;

    // A terminating pod is not counted, and not capacity.
    busy.set_terminating(true);
    eventually_desired(&server, 2).await;

    let status: Value = http
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fleet = &status["fleet"];
    assert_eq!(fleet["healthy"], true, "{fleet}");
    assert_eq!(fleet["pods_by_state"]["ready"], 1);
    assert_eq!(fleet["pods_by_state"]["terminating"], 1);
    let pods = fleet["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    assert!(
        pods.iter()
            .any(|pod| pod["address"] == busy_url && pod["active"]["room_composite"] == 1)
    );
    assert!(
        pods.iter()
            .all(|pod| pod["node_id"].is_string() && pod["last_scrape_age_seconds"].is_number())
    );

    let metrics = http
        .get(server.http("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("egress_scaler_fleet_pods{state=\"terminating\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("egress_scaler_fleet_free_cpu_cores"),
        "{metrics}"
    );
    assert!(
        metrics.contains("egress_scaler_fleet_scrape_duration_seconds"),
        "{metrics}"
    );

    // The status command lists the pods.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .args([
            "status",
            "--server",
            &format!("http://{}", server.http_addr),
        ])
        .env_remove("LIVEKIT_API_KEY")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains(&busy_url) && table.contains("terminating"),
        "{table}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_failing_fleet_source_is_unavailable_not_zero() {
    support::init();
    let redis = redis();
    let prometheus = PrometheusStandIn::start().await.unwrap();
    let pod = EgressPodStandIn::start().await.unwrap();
    pod.set_active("track", 2);
    prometheus.add_target(&pod, "egress-0");
    let url = prometheus.url();
    let flags = ["--prometheus-url", &url, "--fleet-refresh-seconds", "0.05"];
    let server = TestServer::start(config(&redis, &flags, &NoEnvironment)).await;

    eventually_desired(&server, 1).await;
    prometheus.set_failure(Some(PrometheusFailure::Unavailable));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match desired(&server).await {
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "never turned unavailable"),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let status: Value = http_client()
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["fleet"]["healthy"], false);
    assert!(status["queues"][0]["desired_replicas"].is_null());

    prometheus.set_failure(None);
    eventually_desired(&server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn a_pod_that_never_answers_is_unknown_after_the_start_grace_and_asks_for_another() {
    support::init();
    let redis = redis();
    // A listed pod that never serves metrics (CrashLoopBackOff behind the headless Service).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/metrics");
    let flags = [
        "--egress-metrics",
        &url,
        "--fleet-refresh-seconds",
        "0.05",
        "--fleet-start-grace-seconds",
        "0.3",
    ];
    let server = TestServer::start(config(&redis, &flags, &NoEnvironment)).await;
    let http = http_client();
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "waits-for-a-real-pod"}),
    )
    .await;
    // The pod that never answered is counted, and the composite asks for a pod that works.
    eventually_desired(&server, 2).await;

    let status: Value = http
        .get(server.http("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fleet = &status["fleet"];
    assert_eq!(fleet["healthy"], true, "{fleet}");
    assert_eq!(fleet["pods_by_state"]["unknown"], 1, "{fleet}");
    assert_eq!(fleet["free_cpu_cores"], 0.0, "{fleet}");
    let reason = fleet["pods"][0]["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("never answered a scrape in 0.3 s: connection failed")
            && reason.contains("refused"),
        "{fleet}"
    );

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_egress-scaler"))
        .args([
            "status",
            "--server",
            &format!("http://{}", server.http_addr),
        ])
        .env_remove("LIVEKIT_API_KEY")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("unknown") && table.contains("why: never answered a scrape in 0.3 s"),
        "{table}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_scaler_reads_the_fleet_through_a_real_prometheus() {
    support::init();
    let redis = redis();
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_active("room_composite", 1);
    let idle = EgressPodStandIn::start().await.unwrap();
    let prometheus = PrometheusServer::start(&[
        Target::new("egress-0", busy.addr()),
        Target::new("egress-1", idle.addr()),
    ])
    .await;
    let url = prometheus.url();
    let flags = ["--prometheus-url", &url, "--fleet-refresh-seconds", "0.2"];
    let server = TestServer::start(config(&redis, &flags, &NoEnvironment)).await;
    let http = http_client();

    // Once Prometheus scraped both pods (each target within its first seconds), the busy pod
    // is kept and the idle one is spare.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: Value = http
            .get(server.http("/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pods = status["fleet"]["pods"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let busy_seen = pods.iter().any(|pod| {
            pod["address"] == "egress-0"
                && pod["state"] == "ready"
                && pod["active"]["room_composite"] == 1
        });
        let idle_seen = pods
            .iter()
            .any(|pod| pod["address"] == "egress-1" && pod["state"] == "ready");
        if busy_seen && idle_seen {
            break;
        }
        assert!(Instant::now() < deadline, "{status}\n{}", prometheus.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually_desired(&server, 1).await;
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "through-prometheus"}),
    )
    .await;
    // The queued composite goes on the idle pod: busy + idle used = 2.
    eventually_desired(&server, 2).await;
    // The idle pod gets busy too (Prometheus sees it a scrape later): the composite needs a
    // new pod.
    idle.set_active("track", 1);
    eventually_desired_within(&server, 3, Duration::from_secs(20)).await;
    server.stop().await;
}

/// Polls until the scaler answers `expected`, at most `limit`.
async fn eventually_desired_within(server: &TestServer, expected: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let answer = desired(server).await;
        if matches!(answer, Ok(value) if value == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {expected}, last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
