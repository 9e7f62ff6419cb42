//! The KEDA external scaler, driven as KEDA drives it, over a real Redis.

mod support;

use std::time::{Duration, Instant};

use egress_scaler::scaler::proto::GetMetricsRequest;
use serde_json::json;
use support::{NoEnvironment, TestServer, config, enqueue, http_client, redis, scaled_object};
use tonic::Code;

async fn desired(server: &TestServer, metadata: &[(&str, &str)]) -> Result<i64, tonic::Status> {
    let mut client = server.grpc().await;
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(metadata)),
            metric_name: "egress-replicas-default".to_owned(),
        })
        .await?
        .into_inner();
    let value = &answer.metric_values[0];
    assert_eq!(
        value.metric_value as f64, value.metric_value_float,
        "int and float agree"
    );
    Ok(value.metric_value)
}

async fn is_active(server: &TestServer, metadata: &[(&str, &str)]) -> Result<bool, tonic::Status> {
    let mut client = server.grpc().await;
    Ok(client
        .is_active(scaled_object(metadata))
        .await?
        .into_inner()
        .result)
}

#[tokio::test]
async fn metric_spec_names_the_queue_with_target_one() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--queue", "default", "--queue", "rec"],
        &NoEnvironment,
    ))
    .await;
    let mut client = server.grpc().await;
    let spec = client
        .get_metric_spec(scaled_object(&[
            ("scalerAddress", "egress-scaler:9090"),
            ("queue", "rec"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, "egress-replicas-rec");
    assert_eq!(spec.metric_specs[0].target_size, 1);
    assert_eq!(spec.metric_specs[0].target_size_float, 1.0);
    server.stop().await;
}

#[tokio::test]
async fn desired_replicas_follow_the_queue_from_zero() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--queue", "default,tracks,empty"],
        &NoEnvironment,
    ))
    .await;
    let http = http_client();
    assert_eq!(desired(&server, &[]).await.unwrap(), 0);
    assert!(!is_active(&server, &[]).await.unwrap());

    for room in ["a", "b", "c"] {
        let (status, _) = enqueue(
            &http,
            &server,
            json!({"kind": "room_composite", "room_name": room}),
        )
        .await;
        assert_eq!(status, 202);
    }
    assert_eq!(desired(&server, &[]).await.unwrap(), 3);
    assert!(is_active(&server, &[]).await.unwrap());

    for i in 0..13 {
        let body = json!({"kind": "track", "room_name": "r", "queue": "tracks", "request": {"track_id": format!("TR_{i}")}});
        assert_eq!(enqueue(&http, &server, body).await.0, 202);
    }
    assert_eq!(desired(&server, &[("queue", "tracks")]).await.unwrap(), 3);
    // The trigger's overrides apply to its own answer only.
    assert_eq!(
        desired(&server, &[("queue", "tracks"), ("maxReplicas", "2")])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        desired(&server, &[("queue", "empty"), ("warmPool", "1")])
            .await
            .unwrap(),
        1
    );
    assert!(
        is_active(&server, &[("queue", "empty"), ("warmPool", "1")])
            .await
            .unwrap()
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_metadata_is_invalid_argument_naming_the_key() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    for (key, value) in [
        ("warmPool", "x"),
        ("minReplicas", "-2"),
        ("maxReplicas", "1.5"),
        ("queue", "a/b"),
        ("queue", "not-served"),
    ] {
        let error = desired(&server, &[(key, value)]).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{key}");
        assert!(error.message().contains(key), "{key}: {}", error.message());
        let error = is_active(&server, &[(key, value)]).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }
    server.stop().await;
}

#[tokio::test]
async fn push_stream_turns_active_right_after_an_enqueue() {
    let redis = redis();
    let server = TestServer::start(config(
        &redis,
        &["--queue", "default", "--queue", "push"],
        &NoEnvironment,
    ))
    .await;
    let http = http_client();
    let mut client = server.grpc().await;
    let mut stream = client
        .stream_is_active(scaled_object(&[("queue", "push")]))
        .await
        .unwrap()
        .into_inner();
    // Nothing is queued: the stream stays silent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );

    let started = Instant::now();
    let (status, _) = enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "x", "queue": "push"}),
    )
    .await;
    assert_eq!(status, 202);
    let message = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("activation arrives")
        .unwrap()
        .expect("stream open");
    assert!(message.result);
    // Pub/sub wakes the stream; the 1 s safety recheck would be far slower.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );

    // Only the edge is sent: another enqueue while active sends nothing.
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "y", "queue": "push"}),
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );

    // Shutdown ends the stream with status OK (KEDA then resets its backoff).
    server.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends on shutdown");
    assert!(matches!(end, Ok(None)), "{end:?}");
    server.stop().await;
}

#[tokio::test]
async fn stream_metric_spec_sends_the_spec_then_ends_ok_on_shutdown() {
    let redis = redis();
    let server = TestServer::start(config(&redis, &["--queue", "q0,q1"], &NoEnvironment)).await;
    let mut client = server.grpc().await;
    let mut stream = client
        .stream_metric_spec(scaled_object(&[("queue", "q1")]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.metric_specs[0].metric_name, "egress-replicas-q1");
    server.shutdown.cancel();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    server.stop().await;
}

#[tokio::test]
async fn redis_outage_is_unavailable_never_zero_and_recovers() {
    let mut redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let http = http_client();
    enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "a"}),
    )
    .await;
    assert_eq!(desired(&server, &[]).await.unwrap(), 1);

    redis.stop();
    let started = Instant::now();
    let error = desired(&server, &[]).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    // KEDA's metrics server gives a call 3 s.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        is_active(&server, &[]).await.unwrap_err().code(),
        Code::Unavailable
    );
    let ready = http.get(server.http("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    redis.start_again().expect("redis restarts");
    // The queue was not persisted in this test: after the restart it is empty, and the
    // service answers again without a restart of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match desired(&server, &[]).await {
            Ok(value) => {
                assert_eq!(value, 0);
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("did not recover: {status:?}"),
        }
    }
    let (status, _) = enqueue(
        &http,
        &server,
        json!({"kind": "track", "room_name": "b", "request": {"trackId": "TR_b"}}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(desired(&server, &[]).await.unwrap(), 1);
    server.stop().await;
}

#[tokio::test]
async fn push_stream_survives_a_redis_restart() {
    let mut redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let http = http_client();
    let mut client = server.grpc().await;
    let mut stream = client
        .stream_is_active(scaled_object(&[]))
        .await
        .unwrap()
        .into_inner();
    redis.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.start_again().expect("redis restarts");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = enqueue(
            &http,
            &server,
            json!({"kind": "room_composite", "room_name": "after"}),
        )
        .await;
        if status == 202 || status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "enqueue never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .expect("activation after the restart")
        .unwrap()
        .expect("stream still open");
    assert!(message.result);
    server.stop().await;
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let redis = redis();
    let server = TestServer::start(config(&redis, &[], &NoEnvironment)).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let answer = health
        .check(HealthCheckRequest {
            service: "externalscaler.ExternalScaler".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status, 1, "SERVING");
    server.stop().await;
}

/// Claims and starts the head ticket as a dispatcher on another replica would.
async fn start_head(store: &egress_scaler::queue::QueueStore, egress_id: &str) {
    let queue: egress_scaler::queue::QueueName = "default".parse().unwrap();
    let head = store.peek(&queue).await.unwrap().expect("a queued ticket");
    let now = egress_scaler::intake::now_ms();
    store
        .claim(&head.id, "attempt", now)
        .await
        .unwrap()
        .unwrap();
    assert!(store.mark_started(&head.id, egress_id, now).await.unwrap());
}

/// Waits until `pod` has been scraped `more` more times than `since`.
async fn scraped(pod: &egress_scaler::standin::EgressPodStandIn, since: u64, more: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod.scrapes() < since + more {
        assert!(Instant::now() < deadline, "the pod was not scraped again");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_start_keeps_its_pod_busy_until_a_refresh_shows_it() {
    use egress_scaler::standin::EgressPodStandIn;
    support::init();
    let redis = redis();
    let pod = EgressPodStandIn::start().await.unwrap();
    let url = pod.metrics_url();
    // Refreshes far apart compared with the calls below: a start falls between two of them.
    let flags = [
        "--egress-metrics",
        &url,
        "--fleet-refresh-seconds",
        "1",
        "--fleet-stale-seconds",
        "60",
    ];
    let server = TestServer::start(config(&redis, &flags, &NoEnvironment)).await;
    let store = egress_scaler::queue::QueueStore::connect(&redis.url(), Default::default())
        .await
        .unwrap();
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while desired(&server, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "no fleet snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(desired(&server, &[]).await.unwrap(), 0, "an idle pod only");
    let (status, _) = enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "standup"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        desired(&server, &[]).await.unwrap(),
        1,
        "the idle pod taken"
    );

    // Right after a scrape, so that the next refresh is most of a second away: the pod takes
    // the job (its metrics will say so at the next scrape) and the ticket becomes active.
    let before = pod.scrapes();
    scraped(&pod, before, 1).await;
    pod.set_busy(&[("room_composite", 1)]);
    start_head(&store, "EG_standup").await;
    let after_start = pod.scrapes();
    assert_eq!(
        desired(&server, &[]).await.unwrap(),
        1,
        "the start is counted on its pod before any refresh shows it"
    );
    // Across the refresh that shows the job, and after it, the answer stays 1.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod.scrapes() < after_start + 2 {
        assert_eq!(desired(&server, &[]).await.unwrap(), 1);
        assert!(Instant::now() < deadline, "no refresh came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(desired(&server, &[]).await.unwrap(), 1);
    assert!(is_active(&server, &[]).await.unwrap());
    server.stop().await;
}

#[tokio::test]
async fn a_start_prometheus_does_not_show_yet_counts_for_the_lag() {
    use egress_scaler::standin::{EgressPodStandIn, PrometheusStandIn};
    support::init();
    let redis = redis();
    let pod = EgressPodStandIn::start().await.unwrap();
    let prometheus = PrometheusStandIn::start().await.unwrap();
    prometheus.add_target(&pod, "egress-0");
    let url = prometheus.url();
    let flags = [
        "--prometheus-url",
        &url,
        "--fleet-refresh-seconds",
        "0.05",
        "--fleet-stale-seconds",
        "60",
    ];
    let mut serve = config(&redis, &flags, &NoEnvironment);
    serve.prometheus_lag = Duration::from_secs(30);
    let server = TestServer::start(serve).await;
    let store = egress_scaler::queue::QueueStore::connect(&redis.url(), Default::default())
        .await
        .unwrap();
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while desired(&server, &[]).await.is_err() {
        assert!(Instant::now() < deadline, "no fleet snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = enqueue(
        &http,
        &server,
        json!({"kind": "room_composite", "room_name": "standup"}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(desired(&server, &[]).await.unwrap(), 1);
    // Started; Prometheus has not scraped the pod since, so the series still say idle.
    start_head(&store, "EG_standup").await;
    let queries = prometheus.queries().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while prometheus.queries().len() < queries + 6 {
        assert!(Instant::now() < deadline, "the fleet was not refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        desired(&server, &[]).await.unwrap(),
        1,
        "refreshes within the Prometheus lag still count the start"
    );
    server.stop().await;
}
