//! The scale-up assist against the Kubernetes API stand-in: raises at once, never lowers,
//! retries conflicts, backs off on 403; and through `serve`, from a GetMetrics answer.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use egress_scaler::kube_scale::{
    DeploymentRef, DeploymentScale, KubeApi, KubeScaleConfig, MAX_CONFLICT_RETRIES, Raise,
    ScaleUpAssist, run_assist,
};
use egress_scaler::queue::ServedQueues;
use egress_scaler::scaler::proto::GetMetricsRequest;
use egress_scaler::standin::KubeApiStandIn;
use egress_scaler::telemetry::Metrics;
use prometheus_client::registry::Registry;
use serde_json::json;
use support::{NoEnvironment, TestServer, config, enqueue, http_client, redis, scaled_object};
use tokio_util::sync::CancellationToken;

const EGRESS: &str = "livekit/egress";

fn assist_config(api: &KubeApiStandIn) -> KubeScaleConfig {
    KubeScaleConfig {
        deployment: EGRESS.parse::<DeploymentRef>().unwrap(),
        api: KubeApi::Url(api.url()),
    }
}

async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

#[tokio::test]
async fn raises_at_once_and_never_lowers() {
    support::init();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 1);
    let scale = DeploymentScale::connect(&assist_config(&api))
        .await
        .unwrap();
    assert_eq!(scale.raise_to(5).await.unwrap(), Raise::Raised(1, 5));
    assert_eq!(api.replicas(EGRESS), Some(5));
    // Lower or equal: read, nothing written.
    assert_eq!(scale.raise_to(3).await.unwrap(), Raise::Enough(5));
    assert_eq!(scale.raise_to(5).await.unwrap(), Raise::Enough(5));
    assert_eq!(api.replicas(EGRESS), Some(5));
    let writes = api.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(
        (writes[0].method, writes[0].replicas, writes[0].status),
        ("PATCH", Some(5), 200)
    );
}

#[tokio::test]
async fn a_conflict_is_read_again_and_retried() {
    support::init();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 2);
    let scale = DeploymentScale::connect(&assist_config(&api))
        .await
        .unwrap();
    api.lose_next_writes(2);
    assert_eq!(scale.raise_to(6).await.unwrap(), Raise::Raised(2, 6));
    let statuses: Vec<u16> = api.writes().iter().map(|w| w.status).collect();
    assert_eq!(statuses, vec![409, 409, 200]);
    assert_eq!(api.replicas(EGRESS), Some(6));

    // Losing every try gives up without writing a stale count.
    api.lose_next_writes(MAX_CONFLICT_RETRIES + 1);
    assert_eq!(scale.raise_to(9).await.unwrap(), Raise::Conflicted);
    assert_eq!(api.replicas(EGRESS), Some(6));
}

#[tokio::test]
async fn a_writer_that_raised_it_meanwhile_is_not_overwritten() {
    support::init();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 2);
    let scale = DeploymentScale::connect(&assist_config(&api))
        .await
        .unwrap();
    // The HPA wrote 8 after the assist read 2: the stale write is refused (409), the read
    // again sees 8 and nothing is lowered.
    let (_, version) = scale.replicas().await.unwrap();
    api.set_replicas(EGRESS, 8);
    assert!(version.is_some());
    assert_eq!(scale.raise_to(4).await.unwrap(), Raise::Enough(8));
    assert_eq!(api.replicas(EGRESS), Some(8));
}

#[tokio::test]
async fn forbidden_is_counted_and_backed_off() {
    support::init();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 1);
    api.set_forbidden(true);
    let scale = DeploymentScale::connect(&assist_config(&api))
        .await
        .unwrap();
    assert_eq!(scale.raise_to(3).await.unwrap(), Raise::Forbidden);

    let mut registry = Registry::default();
    let metrics = Metrics::new(
        &mut registry,
        ServedQueues::new(vec!["default".parse().unwrap()]).unwrap(),
    );
    let (assist, desired) = ScaleUpAssist::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_assist(
        scale,
        desired,
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    assist.offer(3);
    let mut text = String::new();
    assert!(
        until(Duration::from_secs(5), || {
            text.clear();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text.contains("egress_scaler_kube_scale_writes_total{outcome=\"forbidden\"} 1")
        })
        .await,
        "{text}"
    );
    // Backing off: with the Role fixed, a new offer is not acted on within the back-off.
    api.set_forbidden(false);
    assist.offer(4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.replicas(EGRESS), Some(1));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the assist ends on shutdown")
        .unwrap();
}

#[tokio::test]
async fn the_assist_task_raises_on_an_offer_and_skips_lower_ones() {
    support::init();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 1);
    let scale = DeploymentScale::connect(&assist_config(&api))
        .await
        .unwrap();
    let mut registry = Registry::default();
    let metrics = Metrics::new(
        &mut registry,
        ServedQueues::new(vec!["default".parse().unwrap()]).unwrap(),
    );
    let (assist, desired) = ScaleUpAssist::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_assist(scale, desired, metrics, shutdown.clone()));
    assist.offer(4);
    assert!(until(Duration::from_secs(5), || api.replicas(EGRESS) == Some(4)).await);
    // Lower counts need no call at all within a sync period of the last read.
    assist.offer(2);
    assist.offer(3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.writes().len(), 1);
    assert_eq!(api.replicas(EGRESS), Some(4));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn serve_raises_the_deployment_to_the_get_metrics_answer() {
    let redis = redis();
    let api = KubeApiStandIn::start().await.unwrap();
    api.set_replicas(EGRESS, 1);
    let mut serve = config(&redis, &["--prewarm", "off"], &NoEnvironment);
    serve.kube_scale = Some(assist_config(&api));
    let server = TestServer::start(serve).await;
    let http = http_client();
    for room in ["a", "b", "c", "d", "e"] {
        let body = json!({"kind": "room_composite", "room_name": room});
        assert_eq!(enqueue(&http, &server, body).await.0, 202);
    }
    let mut client = server.grpc().await;
    let answer = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&[])),
            metric_name: "egress-replicas-default".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.metric_values[0].metric_value, 5);
    // The count written is the HPA's own from that answer: ceil(5 / 1) = 5.
    assert!(until(Duration::from_secs(5), || api.replicas(EGRESS) == Some(5)).await);
    assert!(api.writes().iter().all(|write| write.replicas == Some(5)));
    server.stop().await;
}

/// The HPA KEDA makes from the shipped ScaledObject, and one without `behavior` on a cluster
/// whose tolerance (10 %) applies: each syncs after the assist wrote the count the same
/// GetMetrics answer asks for, and leaves it.
#[tokio::test]
async fn the_hpa_leaves_the_count_the_assist_wrote() {
    use egress_scaler::kube::hpa::{DEFAULT_DOWNSCALE_WINDOW, DEFAULT_TOLERANCE};
    use egress_scaler::kube::{ClusterTolerance, Hpa, HpaSpec, MetricReading, ScaledObject};

    support::init();
    let shipped = ScaledObject::shipped().hpa_spec(ClusterTolerance::default());
    let bare = HpaSpec {
        min_replicas: 1,
        max_replicas: 40,
        behavior: None,
        tolerance: ClusterTolerance {
            default: DEFAULT_TOLERANCE,
            per_hpa: false,
        },
        downscale_window: DEFAULT_DOWNSCALE_WINDOW,
    };
    for spec in [shipped, bare] {
        // (replicas before, the GetMetrics answer): a 1 -> 10 step the HPA would take in
        // steps, and 10 -> 11, which a 10 % tolerance never takes.
        for (before, answer) in [(1u32, 10u32), (10, 11)] {
            let api = KubeApiStandIn::start().await.unwrap();
            api.set_replicas(EGRESS, before);
            let scale = DeploymentScale::connect(&assist_config(&api))
                .await
                .unwrap();
            assert_eq!(
                scale.raise_to(answer).await.unwrap(),
                Raise::Raised(before, answer)
            );
            let mut hpa = Hpa::new(spec.clone());
            // The next syncs read spec.replicas as written and the same answer.
            for sync in 1..=20u64 {
                let current = api.replicas(EGRESS).unwrap();
                let reading = MetricReading::AverageValue {
                    value: f64::from(answer),
                    target: 1.0,
                };
                let decided = hpa.sync(sync * 15_000, current, reading);
                assert_eq!(
                    decided.replicas, answer,
                    "sync {sync} of {spec:?} moved {answer}"
                );
            }
        }
    }
    // Without the assist, the bare HPA leaves 10 at 10 when 11 are asked for.
    let mut hpa = Hpa::new(HpaSpec {
        behavior: None,
        ..ScaledObject::shipped().hpa_spec(ClusterTolerance {
            default: DEFAULT_TOLERANCE,
            per_hpa: false,
        })
    });
    let reading = MetricReading::AverageValue {
        value: 11.0,
        target: 1.0,
    };
    assert_eq!(hpa.sync(15_000, 10, reading).replicas, 10);
}
