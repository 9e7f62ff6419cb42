//! The fleet observer against stand-in egress pods and a stand-in Prometheus on loopback.
//!
//! Refreshes are driven with `refresh_once` (one test runs the background loop); grace
//! periods are a few hundred milliseconds so that the whole file stays fast.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_scaler::fleet::{
    Fleet, FleetError, FleetMetrics, FleetObserver, FleetOptions, FleetSource, FleetView, Resolver,
    SERIES_QUERY, TARGETS_QUERY,
};
use egress_scaler::model::{Demand, EgressKind, PodState, Settings, decide};
use egress_scaler::standin::egress_pod::EgressPodOptions;
use egress_scaler::standin::{BodyMode, EgressPodStandIn, PrometheusFailure, PrometheusStandIn};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use EgressKind::RoomComposite;

const GRACE: Duration = Duration::from_millis(300);
const START_GRACE: Duration = Duration::from_millis(400);

fn options() -> FleetOptions {
    FleetOptions {
        refresh_interval: Duration::from_millis(40),
        scrape_timeout: Duration::from_millis(400),
        max_body_bytes: 4 * 1024 * 1024,
        concurrency: 8,
        unknown_grace: GRACE,
        start_grace: START_GRACE,
        stale_after: Duration::from_secs(5),
    }
}

struct Observed {
    observer: FleetObserver,
    fleet: Fleet,
    registry: Registry,
}

fn observe(source: FleetSource) -> Observed {
    observe_with(source, options(), Settings::default())
}

fn observe_with(source: FleetSource, options: FleetOptions, settings: Settings) -> Observed {
    let mut registry = Registry::default();
    let metrics = FleetMetrics::new(&mut registry);
    let (observer, fleet) = FleetObserver::new(source, options, settings, metrics).unwrap();
    Observed {
        observer,
        fleet,
        registry,
    }
}

fn urls(pods: &[&EgressPodStandIn]) -> FleetSource {
    FleetSource::Static(pods.iter().map(|pod| pod.metrics_url()).collect())
}

/// Desired replicas with the default settings for `count` queued room composites.
fn desired(fleet: &Fleet, count: u64) -> u32 {
    desired_with(&Settings::default(), fleet, count)
}

fn desired_with(settings: &Settings, fleet: &Fleet, count: u64) -> u32 {
    let view = fleet.current().expect("a fresh fleet snapshot");
    let demand = Demand::from_counts([(RoomComposite, count)]);
    decide(settings, &demand, &view.snapshot()).desired
}

fn states(view: &FleetView) -> Vec<PodState> {
    view.pods.iter().map(|pod| pod.state).collect()
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn no_pods_and_three_queued_room_composites_need_three() {
    assert_eq!(desired(&Fleet::none(), 3), 3);

    let mut none = observe(FleetSource::None);
    none.observer.refresh_once().await;
    assert_eq!(desired(&none.fleet, 3), 3);

    let mut empty_static = observe(FleetSource::Static(Vec::new()));
    empty_static.observer.refresh_once().await;
    assert_eq!(desired(&empty_static.fleet, 3), 3);
}

#[tokio::test]
async fn two_idle_pods_and_one_queued_room_composite_need_one() {
    let a = EgressPodStandIn::start().await.unwrap();
    let b = EgressPodStandIn::start().await.unwrap();
    let mut observed = observe(urls(&[&a, &b]));
    observed.observer.refresh_once().await;
    assert_eq!(states(&observed.fleet.view()), [PodState::Ready; 2]);
    assert_eq!(desired(&observed.fleet, 1), 1);
    assert_eq!(desired(&observed.fleet, 0), 0);
}

#[tokio::test]
async fn a_busy_and_an_idle_pod_and_one_queued_room_composite_need_two() {
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_busy(&[("room_composite", 1)]);
    let idle = EgressPodStandIn::start().await.unwrap();
    let mut observed = observe(urls(&[&busy, &idle]));
    observed.observer.refresh_once().await;
    assert_eq!(desired(&observed.fleet, 1), 2);
    assert_eq!(desired(&observed.fleet, 0), 1);

    let view = observed.fleet.view();
    let busy_view = view
        .pods
        .iter()
        .find(|pod| pod.address == busy.metrics_url())
        .unwrap();
    assert_eq!(busy_view.node_id.as_deref(), Some(busy.node_id()));
    assert_eq!(busy_view.active.get("room_composite"), Some(&1));
    assert_eq!(busy_view.can_accept_video, Some(false));
    assert_eq!(busy_view.free_cpu_cores, 0.0);
    let idle_view = view
        .pods
        .iter()
        .find(|pod| pod.address == idle.metrics_url())
        .unwrap();
    assert!((idle_view.free_cpu_cores - 3.2).abs() < 1e-9);
    assert!(idle_view.last_scrape_age_seconds.unwrap() < 5.0);
}

#[tokio::test]
async fn terminating_and_clustered_pods_are_not_counted_one_without_livekit_server_is() {
    let draining = EgressPodStandIn::start().await.unwrap();
    draining.set_busy(&[("room_composite", 1)]);
    draining.set_terminating(true);
    // It says is_disabled 1 while it cannot reach livekit-server, and still records.
    let cut_off = EgressPodStandIn::start().await.unwrap();
    cut_off.set_busy(&[("track", 1)]);
    cut_off.set_livekit_reachable(false);
    let clustered = EgressPodStandIn::start().await.unwrap();
    clustered.set_cluster_id("eu-west");
    let mut observed = observe(urls(&[&draining, &cut_off, &clustered]));
    observed.observer.refresh_once().await;

    let view = observed.fleet.view();
    assert_eq!(view.count(PodState::Terminating), 1);
    assert_eq!(view.count(PodState::Disabled), 1);
    assert_eq!(view.count(PodState::Unknown), 1);
    assert_eq!(view.free_cpu_cores(), 0.0);
    let cut_off_view = view
        .pods
        .iter()
        .find(|pod| pod.address == cut_off.metrics_url())
        .unwrap();
    assert_eq!(cut_off_view.state, PodState::Unknown);
    assert!(
        cut_off_view
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot reach livekit-server"),
        "{cut_off_view:?}"
    );
    let clustered_view = view
        .pods
        .iter()
        .find(|pod| pod.address == clustered.metrics_url())
        .unwrap();
    assert!(
        clustered_view
            .last_error
            .as_deref()
            .unwrap()
            .contains("cluster_id")
    );
    // The cut-off pod is kept, with no capacity: a queued composite needs a new pod.
    assert_eq!(desired(&observed.fleet, 0), 1);
    assert_eq!(desired(&observed.fleet, 1), 2);

    // A draining pod that stops answering has finished: it does not come back as unknown.
    draining.go_down().await;
    observed.observer.refresh_once().await;
    tokio::time::sleep(GRACE + Duration::from_millis(50)).await;
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.view().count(PodState::Terminating), 1);
    assert_eq!(desired(&observed.fleet, 0), 1);

    // livekit-server answers again: a ready pod.
    cut_off.set_livekit_reachable(true);
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.view().count(PodState::Ready), 1);
    assert_eq!(desired(&observed.fleet, 0), 1);
}

#[tokio::test]
async fn a_busy_pod_whose_metrics_stop_answering_stays_counted() {
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_busy(&[("room_composite", 1)]);
    let mut observed = observe(urls(&[&busy]));
    observed.observer.refresh_once().await;
    assert_eq!(desired(&observed.fleet, 0), 1);

    busy.go_down().await;
    observed.observer.refresh_once().await;
    // Within the grace: its last good metrics stand.
    let view = observed.fleet.view();
    assert_eq!(states(&view), [PodState::Ready]);
    assert_eq!(view.pods[0].active.get("room_composite"), Some(&1));
    assert!(
        view.pods[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection")
    );
    assert_eq!(desired(&observed.fleet, 0), 1);
    assert_eq!(desired(&observed.fleet, 1), 2);

    tokio::time::sleep(GRACE + Duration::from_millis(50)).await;
    observed.observer.refresh_once().await;
    // Beyond it: unknown, still counted, no capacity.
    assert_eq!(states(&observed.fleet.view()), [PodState::Unknown]);
    assert_eq!(desired(&observed.fleet, 0), 1);
    assert_eq!(desired(&observed.fleet, 1), 2);
    assert!(
        metrics_text(&observed.registry)
            .contains("egress_scaler_fleet_scrape_errors_total{reason=\"connect\"} 2")
    );

    busy.come_back().await.unwrap();
    busy.set_idle();
    observed.observer.refresh_once().await;
    assert_eq!(states(&observed.fleet.view()), [PodState::Ready]);
    assert_eq!(desired(&observed.fleet, 0), 0);
}

#[tokio::test]
async fn slow_garbage_and_oversized_answers_fail_with_bounded_reasons() {
    let slow = EgressPodStandIn::start().await.unwrap();
    let garbage = EgressPodStandIn::start().await.unwrap();
    let oversized = EgressPodStandIn::start().await.unwrap();
    for pod in [&slow, &garbage, &oversized] {
        pod.set_busy(&[("room_composite", 1)]);
    }
    let never_good = EgressPodStandIn::start().await.unwrap();
    never_good.set_body(BodyMode::Garbage);
    let mut observed = observe(urls(&[&slow, &garbage, &oversized, &never_good]));
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.view().count(PodState::Ready), 3);

    slow.set_slow(Duration::from_secs(3));
    garbage.set_body(BodyMode::Garbage);
    oversized.set_body(BodyMode::Oversized(5 * 1024 * 1024));
    let started = Instant::now();
    observed.observer.refresh_once().await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "refresh took {took:?}");

    let view = observed.fleet.view();
    // The three busy pods keep their last good metrics within the grace; the pod that never
    // answered with metrics is past its start grace (the slow scrape took longer): unknown.
    assert_eq!(view.count(PodState::Ready), 3);
    assert_eq!(view.count(PodState::Unknown), 1);
    let error_of = |pod: &EgressPodStandIn| {
        view.pods
            .iter()
            .find(|view| view.address == pod.metrics_url())
            .and_then(|view| view.last_error.clone())
            .unwrap()
    };
    assert!(error_of(&slow).contains("timed out"));
    assert!(error_of(&garbage).contains("UTF-8"));
    assert!(error_of(&oversized).contains("larger than"));
    assert!(
        error_of(&never_good).starts_with("never answered a scrape in 0.4 s: "),
        "{}",
        error_of(&never_good)
    );
    assert_eq!(desired(&observed.fleet, 0), 4);

    let text = metrics_text(&observed.registry);
    for line in [
        "egress_scaler_fleet_scrape_errors_total{reason=\"timeout\"} 1",
        "egress_scaler_fleet_scrape_errors_total{reason=\"parse\"} 3",
        "egress_scaler_fleet_scrape_errors_total{reason=\"too_large\"} 1",
        "egress_scaler_fleet_scrape_errors_total{reason=\"status\"} 0",
        "egress_scaler_fleet_pods{state=\"ready\"} 3",
        "egress_scaler_fleet_pods{state=\"unknown\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn a_pod_seen_for_the_first_time_is_capacity_for_the_start_grace_only() {
    let new_pod = EgressPodStandIn::start().await.unwrap();
    new_pod.go_down().await;
    let mut observed = observe(urls(&[&new_pod]));
    observed.observer.refresh_once().await;
    assert_eq!(states(&observed.fleet.view()), [PodState::Starting]);
    // The pod started for the queued composite is counted: no second scale-up.
    assert_eq!(desired(&observed.fleet, 1), 1);
    assert_eq!(desired(&observed.fleet, 3), 3);

    // Past the failure grace but within the start grace it is still starting.
    tokio::time::sleep(GRACE + Duration::from_millis(20)).await;
    observed.observer.refresh_once().await;
    assert_eq!(states(&observed.fleet.view()), [PodState::Starting]);

    // A pod that never answers (CrashLoopBackOff, ImagePullBackOff) is unknown after the
    // start grace: counted, but the queued composite asks for a pod that may work.
    tokio::time::sleep(START_GRACE - GRACE).await;
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(states(&view), [PodState::Unknown]);
    assert_eq!(view.pods[0].free_cpu_cores, 0.0);
    let reason = view.pods[0].last_error.clone().unwrap();
    assert!(
        reason.starts_with("never answered a scrape in 0.4 s: connection failed:")
            && reason.contains("refused"),
        "{reason}"
    );
    assert_eq!(desired(&observed.fleet, 0), 1);
    assert_eq!(desired(&observed.fleet, 1), 2);

    new_pod.come_back().await.unwrap();
    observed.observer.refresh_once().await;
    assert_eq!(states(&observed.fleet.view()), [PodState::Ready]);
    assert_eq!(observed.fleet.view().pods[0].last_error, None);
    assert_eq!(desired(&observed.fleet, 1), 1);
}

#[tokio::test]
async fn a_pod_refusing_requests_gets_no_video_composite() {
    // The operator's egress config costs a composite 6 cores on 8-core pods; the scaler was
    // told the default 4. By the arithmetic a composite fits next to a track; the pod says no.
    let settings = Settings {
        pod_cpu: 8000,
        ..Settings::default()
    };
    let mut pod_settings = settings.clone();
    pod_settings.costs.set(RoomComposite, 6000);
    // egress answers can_accept_request for a video web job.
    pod_settings.costs.set(EgressKind::Web, 6000);
    let pod = EgressPodStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), pod_settings)
        .await
        .unwrap();
    pod.set_busy(&[("track", 1)]);
    let mut observed = observe_with(urls(&[&pod]), options(), settings.clone());
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.view().pods[0].can_accept_video, Some(false));
    assert_eq!(desired_with(&settings, &observed.fleet, 1), 2);

    let agreeing =
        EgressPodStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), settings.clone())
            .await
            .unwrap();
    agreeing.set_busy(&[("track", 1)]);
    let mut observed = observe_with(urls(&[&agreeing]), options(), settings.clone());
    observed.observer.refresh_once().await;
    assert_eq!(desired_with(&settings, &observed.fleet, 1), 1);
}

#[tokio::test]
async fn an_older_egress_lacking_series_falls_back_to_the_arithmetic() {
    let old = EgressPodStandIn::start().await.unwrap();
    old.omit_series(&[
        "livekit_egress_can_accept_request",
        "livekit_egress_is_terminating",
        "livekit_egress_is_disabled",
        "livekit_node_cpu_load",
    ]);
    old.set_busy(&[("track", 1)]);
    let mut observed = observe(urls(&[&old]));
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    let pod = &view.pods[0];
    assert_eq!(pod.state, PodState::Ready);
    assert_eq!(pod.can_accept_video, None);
    assert_eq!(pod.cpu_load, None);
    assert_eq!(
        pod.missing_series,
        [
            "livekit_egress_can_accept_request",
            "livekit_egress_is_terminating",
            "livekit_egress_is_disabled",
            "livekit_node_cpu_load"
        ]
    );
    // 3.2 - 0.5 = 2.7 cores free: no room for a 4-core composite, room for a participant.
    assert_eq!(desired(&observed.fleet, 1), 2);
    let participant = Demand::from_counts([(EgressKind::Participant, 1)]);
    assert_eq!(
        decide(&Settings::default(), &participant, &view.snapshot()).desired,
        1
    );
}

#[tokio::test]
async fn reads_never_scrape() {
    let pod = EgressPodStandIn::start().await.unwrap();
    let mut observed = observe(urls(&[&pod]));
    observed.observer.refresh_once().await;
    let scrapes = pod.scrapes();
    assert_eq!(scrapes, 1);
    for _ in 0..100 {
        let _ = observed.fleet.current().unwrap();
        let _ = observed.fleet.view();
    }
    assert_eq!(pod.scrapes(), scrapes);
}

#[tokio::test]
async fn the_snapshot_is_refused_before_the_first_refresh_and_when_stale() {
    let pod = EgressPodStandIn::start().await.unwrap();
    let options = FleetOptions {
        refresh_interval: Duration::from_millis(20),
        stale_after: Duration::from_millis(200),
        ..options()
    };
    let mut observed = observe_with(urls(&[&pod]), options, Settings::default());
    let error = observed.fleet.current().unwrap_err();
    assert!(matches!(error, FleetError::SourceFailing(_)));
    assert_eq!(error.metric_label(), "source_failing");

    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().is_ok());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let error = observed.fleet.current().unwrap_err();
    assert!(matches!(error, FleetError::Stale { .. }), "{error:?}");
    assert_eq!(error.metric_label(), "stale");
    // The view stays readable for status pages.
    assert_eq!(observed.fleet.view().pods.len(), 1);
    let text = metrics_text(&observed.registry);
    let age: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("egress_scaler_fleet_snapshot_age_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(age >= 0.29, "{age}");
}

#[tokio::test]
async fn the_background_loop_refreshes_and_stops_on_shutdown() {
    let pod = EgressPodStandIn::start().await.unwrap();
    let observed = observe(urls(&[&pod]));
    let fleet = observed.fleet.clone();
    let mut updates = fleet.subscribe();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(observed.observer.run(shutdown.clone()));

    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(2), updates.changed())
            .await
            .expect("a refresh within 2 s")
            .unwrap();
    }
    assert_eq!(states(&fleet.current().unwrap()), [PodState::Ready]);
    pod.set_busy(&[("web", 2)]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while fleet.view().pods[0].active.get("web") != Some(&2) {
        assert!(Instant::now() < deadline, "the busy pod was not observed");
        tokio::time::timeout(Duration::from_secs(1), updates.changed())
            .await
            .unwrap()
            .unwrap();
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the loop ends on shutdown")
        .unwrap();
    // The observer is gone: subscribers learn it.
    assert!(updates.changed().await.is_err());
}

/// A resolver whose answer the test sets.
#[derive(Default)]
struct StubResolver {
    answer: Mutex<StubAnswer>,
}

#[derive(Default, Clone)]
enum StubAnswer {
    #[default]
    NoRecords,
    Records(Vec<IpAddr>),
    /// The name does not exist, as `getaddrinfo` says it (glibc's EAI_NONAME text).
    NxDomain,
    Fail,
    Hang,
}

impl StubResolver {
    fn set(&self, answer: StubAnswer) {
        *self.answer.lock().unwrap() = answer;
    }
}

impl Resolver for StubResolver {
    fn resolve<'a>(&'a self, _host: &'a str, _port: u16) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move {
            match answer {
                StubAnswer::NoRecords => Ok(Vec::new()),
                StubAnswer::Records(ips) => Ok(ips),
                StubAnswer::NxDomain => Err(io::Error::other(
                    "failed to lookup address information: Name or service not known",
                )),
                StubAnswer::Fail => Err(io::Error::other("SERVFAIL from the stub resolver")),
                StubAnswer::Hang => futures::future::pending().await,
            }
        })
    }
}

/// Stand-in pods on 127.0.0.2, .3, ... sharing one port, as pods behind a headless Service.
async fn pods_on_one_port(count: u8) -> (Vec<EgressPodStandIn>, u16) {
    'attempt: for _ in 0..20 {
        let first =
            EgressPodStandIn::start_on(SocketAddr::from(([127, 0, 0, 2], 0)), Settings::default())
                .await
                .unwrap();
        let port = first.addr().port();
        let mut pods = vec![first];
        for i in 1..count {
            let addr = SocketAddr::from(([127, 0, 0, 2 + i], port));
            match EgressPodStandIn::start_on(addr, Settings::default()).await {
                Ok(pod) => pods.push(pod),
                Err(_) => continue 'attempt,
            }
        }
        return (pods, port);
    }
    panic!("no common free port on 127.0.0.2-{}", 1 + count);
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[tokio::test]
async fn dns_discovery_follows_the_records() {
    let (pods, port) = pods_on_one_port(2).await;
    pods[1].set_busy(&[("room_composite", 1)]);
    let resolver = Arc::new(StubResolver::default());
    let source = FleetSource::Dns {
        host: "egress-metrics.livekit.svc.cluster.local".to_owned(),
        port,
    };
    let mut observed = observe(source);
    observed.observer = observed.observer.with_resolver(resolver.clone());

    // No records: no pods, zero capacity, and a healthy answer.
    observed.observer.refresh_once().await;
    assert!(observed.fleet.view().pods.is_empty());
    assert_eq!(desired(&observed.fleet, 3), 3);

    resolver.set(StubAnswer::Records(vec![loopback(2), loopback(3)]));
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(states(&view), [PodState::Ready; 2]);
    assert_eq!(
        view.pods[0].address,
        format!("http://127.0.0.2:{port}/metrics")
    );
    assert_eq!(view.pods[1].node_id.as_deref(), Some(pods[1].node_id()));
    assert_eq!(desired(&observed.fleet, 1), 2);

    // A new record whose pod does not answer yet: starting, used as capacity.
    resolver.set(StubAnswer::Records(vec![
        loopback(2),
        loopback(3),
        loopback(4),
    ]));
    observed.observer.refresh_once().await;
    assert_eq!(
        states(&observed.fleet.view()),
        [PodState::Ready, PodState::Ready, PodState::Starting]
    );
    assert_eq!(desired(&observed.fleet, 2), 3);

    // A record that disappears: the pod was deleted.
    resolver.set(StubAnswer::Records(vec![loopback(3), loopback(4)]));
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(view.pods.len(), 2);
    assert_eq!(
        view.pods[0].address,
        format!("http://127.0.0.3:{port}/metrics")
    );

    // A resolver failure is an error, not "no pods"; the view keeps the pods it knew.
    resolver.set(StubAnswer::Fail);
    observed.observer.refresh_once().await;
    let error = observed.fleet.current().unwrap_err();
    assert!(matches!(&error, FleetError::SourceFailing(msg) if msg.contains("SERVFAIL")));
    assert_eq!(observed.fleet.view().pods.len(), 2);

    // So is a resolver that does not answer in time.
    resolver.set(StubAnswer::Hang);
    let started = Instant::now();
    observed.observer.refresh_once().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let error = observed.fleet.current().unwrap_err();
    assert!(matches!(&error, FleetError::SourceFailing(msg) if msg.contains("timed out")));
    assert!(
        metrics_text(&observed.registry)
            .contains("egress_scaler_fleet_scrape_errors_total{reason=\"dns\"} 2")
    );

    // Back to no records: zero pods again, healthy.
    resolver.set(StubAnswer::NoRecords);
    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().unwrap().pods.is_empty());
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_zero_pods_with_a_warning_said_once() {
    let (pods, port) = pods_on_one_port(1).await;
    let resolver = Arc::new(StubResolver::default());
    resolver.set(StubAnswer::NxDomain);
    let source = FleetSource::Dns {
        host: "egress-metrcs.livekit.svc.cluster.local".to_owned(),
        port,
    };
    let mut observed = observe(source);
    observed.observer = observed.observer.with_resolver(resolver.clone());
    let logs = LogCapture::install();

    // A mistyped name and a Service with no ready pods look the same: zero pods, a healthy
    // fleet (scaling from zero works), and a warning that says what to check.
    for _ in 0..3 {
        observed.observer.refresh_once().await;
    }
    let view = observed
        .fleet
        .current()
        .expect("NXDOMAIN is not a source failure");
    assert!(view.pods.is_empty());
    assert_eq!(desired(&observed.fleet, 2), 2);
    let warning = observed.fleet.warning().expect("a warning");
    assert!(
        warning.contains("egress-metrcs.livekit.svc.cluster.local does not resolve")
            && warning.contains("a mistyped name look the same to DNS")
            && warning.contains("check"),
        "{warning}"
    );
    assert_eq!(logs.count("Fleet source warning."), 1, "once per change");

    // The name resolves: the warning goes, once.
    resolver.set(StubAnswer::Records(vec![loopback(2)]));
    observed.observer.refresh_once().await;
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.warning(), None);
    assert_eq!(
        observed.fleet.view().pods[0].node_id.as_deref(),
        Some(pods[0].node_id())
    );
    assert_eq!(logs.count("Fleet source warning cleared."), 1);

    // Scaled to zero (NXDOMAIN again): zero pods, the warning again, logged a second time.
    resolver.set(StubAnswer::NxDomain);
    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().unwrap().pods.is_empty());
    assert!(observed.fleet.warning().is_some());
    assert_eq!(logs.count("Fleet source warning."), 2);

    // A resolver failure stays a failure, not a warning.
    resolver.set(StubAnswer::Fail);
    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().is_err());
}

/// Collects the log events of the current thread (the tests run on a current-thread runtime).
struct LogCapture {
    lines: Arc<Mutex<Vec<String>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl LogCapture {
    fn install() -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = CaptureWriter(lines.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Lines that contain `message`.
    fn count(&self, message: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(message))
            .count()
    }
}

#[derive(Clone)]
struct CaptureWriter(Arc<Mutex<Vec<String>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_pod_restarted_at_the_same_address_is_a_new_pod_without_the_old_jobs() {
    let pod = EgressPodStandIn::start().await.unwrap();
    pod.set_busy(&[("room_composite", 1)]);
    let mut observed = observe(urls(&[&pod]));
    observed.observer.refresh_once().await;
    let first = pod.node_id();
    assert_eq!(
        observed.fleet.view().pods[0].node_id.as_deref(),
        Some(first)
    );
    assert_eq!(desired(&observed.fleet, 1), 2);

    // The container crashes and comes back (kubelet restart): a new egress process.
    pod.restart().await.unwrap();
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(view.pods.len(), 1);
    assert_ne!(view.pods[0].node_id.as_deref(), Some(first));
    assert_eq!(view.pods[0].node_id.as_deref(), Some(pod.node_id()));
    assert_eq!(view.pods[0].state, PodState::Ready);
    assert!(view.pods[0].active.is_empty(), "the old recording is gone");
    assert_eq!(desired(&observed.fleet, 1), 1);
}

#[tokio::test]
async fn a_pod_after_sigterm_is_out_of_the_count_until_and_after_it_exits() {
    let pod = EgressPodStandIn::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EgressPodOptions {
            drain_poll: Duration::from_millis(20),
            ..EgressPodOptions::default()
        },
    )
    .await
    .unwrap();
    let spare = EgressPodStandIn::start().await.unwrap();
    pod.set_busy(&[("track", 1)]);
    let mut observed = observe(urls(&[&pod, &spare]));
    observed.observer.refresh_once().await;
    assert_eq!(desired(&observed.fleet, 0), 1);

    let draining = |fleet: &Fleet| {
        fleet
            .view()
            .pods
            .iter()
            .find(|view| view.address == pod.metrics_url())
            .cloned()
            .unwrap()
    };
    pod.sigterm();
    observed.observer.refresh_once().await;
    assert_eq!(draining(&observed.fleet).state, PodState::Terminating);
    assert_eq!(draining(&observed.fleet).active.get("track"), Some(&1));
    assert_eq!(desired(&observed.fleet, 0), 0);
    // A queued composite goes on the spare pod, not on the draining one.
    assert_eq!(desired(&observed.fleet, 1), 1);

    // Drained: it exits, and its failing scrapes keep it out of the count.
    pod.remove_job("track");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pod.has_exited() {
        assert!(Instant::now() < deadline, "the drained pod never exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    observed.observer.refresh_once().await;
    tokio::time::sleep(GRACE + Duration::from_millis(50)).await;
    observed.observer.refresh_once().await;
    assert_eq!(draining(&observed.fleet).state, PodState::Terminating);
    assert_eq!(desired(&observed.fleet, 0), 0);
}

#[tokio::test]
async fn measured_cpu_above_the_cost_leaves_less_room() {
    let pod = EgressPodStandIn::start().await.unwrap();
    pod.set_busy(&[("track", 4)]);
    let mut observed = observe(urls(&[&pod]));
    observed.observer.refresh_once().await;
    let track_composite = |fleet: &Fleet| {
        let view = fleet.current().unwrap();
        let demand = Demand::from_counts([(EgressKind::TrackComposite, 1)]);
        decide(&Settings::default(), &demand, &view.snapshot()).desired
    };
    // By cost: 3.2 - 2 >= 1, the track composite fits.
    assert_eq!(track_composite(&observed.fleet), 1);
    assert!((observed.fleet.view().pods[0].free_cpu_cores - 1.2).abs() < 1e-9);

    // The four tracks measure 3 cores: as egress admits on that, so does the model.
    pod.set_cpu_load(Some(0.75));
    observed.observer.refresh_once().await;
    assert_eq!(track_composite(&observed.fleet), 2);
    assert!((observed.fleet.view().pods[0].free_cpu_cores - 0.2).abs() < 1e-9);
    assert!(!pod.admits(EgressKind::TrackComposite));
}

#[tokio::test]
async fn dns_discovery_with_the_system_resolver_on_a_loopback_name() {
    let pod = EgressPodStandIn::start().await.unwrap();
    let source = FleetSource::Dns {
        host: "localhost".to_owned(),
        port: pod.addr().port(),
    };
    let mut observed = observe(source);
    observed.observer.refresh_once().await;
    let view = observed.fleet.current().unwrap();
    let ready: Vec<_> = view
        .pods
        .iter()
        .filter(|p| p.state == PodState::Ready)
        .collect();
    assert_eq!(ready.len(), 1, "{:?}", view.pods);
    assert_eq!(ready[0].node_id.as_deref(), Some(pod.node_id()));
}

#[tokio::test]
async fn prometheus_mode_reads_the_pods_from_the_api() {
    let idle = EgressPodStandIn::start().await.unwrap();
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_busy(&[("room_composite", 1)]);
    let draining = EgressPodStandIn::start().await.unwrap();
    draining.set_busy(&[("track", 2)]);
    draining.set_terminating(true);
    let prometheus = PrometheusStandIn::start().await.unwrap();
    prometheus.add_target(&idle, "egress-7d9f-a");
    prometheus.add_target(&busy, "egress-7d9f-b");
    prometheus.add_target(&draining, "egress-7d9f-c");

    let mut observed = observe(FleetSource::Prometheus {
        url: format!("{}/", prometheus.url()),
    });
    observed.observer.refresh_once().await;
    let view = observed.fleet.current().unwrap();
    let summary: Vec<(&str, PodState, Option<&str>)> = view
        .pods
        .iter()
        .map(|pod| (pod.address.as_str(), pod.state, pod.node_id.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("egress-7d9f-a", PodState::Ready, Some(idle.node_id())),
            ("egress-7d9f-b", PodState::Ready, Some(busy.node_id())),
            (
                "egress-7d9f-c",
                PodState::Terminating,
                Some(draining.node_id())
            ),
        ]
    );
    assert_eq!(view.pods[1].active.get("room_composite"), Some(&1));
    assert_eq!(desired(&observed.fleet, 1), 2);
    assert_eq!(desired(&observed.fleet, 3), 4);
    let queries = prometheus.queries();
    assert!(queries.iter().any(|q| q == SERIES_QUERY));
    assert!(queries.iter().any(|q| q == TARGETS_QUERY));
    // Prometheus mode never scrapes the pods itself.
    assert_eq!(idle.scrapes() + busy.scrapes() + draining.scrapes(), 0);
}

#[tokio::test]
async fn prometheus_mode_keeps_a_failing_target_and_drops_a_removed_one() {
    let busy = EgressPodStandIn::start().await.unwrap();
    busy.set_busy(&[("room_composite", 1)]);
    let idle = EgressPodStandIn::start().await.unwrap();
    let prometheus = PrometheusStandIn::start().await.unwrap();
    let busy_instance = prometheus.add_target(&busy, "egress-busy");
    let idle_instance = prometheus.add_target(&idle, "egress-idle");
    let mut observed = observe(FleetSource::Prometheus {
        url: prometheus.url(),
    });
    observed.observer.refresh_once().await;
    assert_eq!(observed.fleet.view().pods.len(), 2);

    // The busy pod's scrape fails (its series go stale, `up` is 0): it stays, then unknown.
    prometheus.set_scrape_failing(&busy_instance, true);
    observed.observer.refresh_once().await;
    assert_eq!(
        states(&observed.fleet.view()),
        [PodState::Ready, PodState::Ready]
    );
    assert_eq!(desired(&observed.fleet, 0), 1);
    tokio::time::sleep(GRACE + Duration::from_millis(50)).await;
    observed.observer.refresh_once().await;
    assert_eq!(
        states(&observed.fleet.view()),
        [PodState::Unknown, PodState::Ready]
    );
    assert_eq!(desired(&observed.fleet, 0), 1);

    // The idle pod is deleted (no series, no `up`): gone.
    prometheus.remove_target(&idle_instance);
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(view.pods.len(), 1);
    assert_eq!(view.pods[0].address, "egress-busy");

    // All targets gone: no pods, zero capacity, healthy.
    prometheus.remove_target(&busy_instance);
    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().unwrap().pods.is_empty());
    assert_eq!(desired(&observed.fleet, 3), 3);
}

#[tokio::test]
async fn prometheus_errors_make_the_source_failing() {
    let pod = EgressPodStandIn::start().await.unwrap();
    pod.set_busy(&[("room_composite", 1)]);
    let prometheus = PrometheusStandIn::start().await.unwrap();
    prometheus.add_target(&pod, "egress-a");
    let mut observed = observe(FleetSource::Prometheus {
        url: prometheus.url(),
    });
    observed.observer.refresh_once().await;
    assert!(observed.fleet.current().is_ok());

    prometheus.set_failure(Some(PrometheusFailure::ErrorAnswer));
    observed.observer.refresh_once().await;
    let error = observed.fleet.current().unwrap_err();
    assert!(matches!(&error, FleetError::SourceFailing(msg) if msg.contains("422")));
    // The pods known before are still listed for the status page.
    assert_eq!(observed.fleet.view().pods.len(), 1);

    prometheus.set_failure(Some(PrometheusFailure::Unavailable));
    observed.observer.refresh_once().await;
    assert!(matches!(
        observed.fleet.current(),
        Err(FleetError::SourceFailing(msg)) if msg.contains("503")
    ));

    prometheus.set_failure(None);
    observed.observer.refresh_once().await;
    assert_eq!(desired(&observed.fleet, 0), 1);

    // Unreachable.
    let url = prometheus.url();
    drop(prometheus);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut unreachable = observe(FleetSource::Prometheus { url });
    unreachable.observer.refresh_once().await;
    assert!(matches!(
        unreachable.fleet.current(),
        Err(FleetError::SourceFailing(_))
    ));
    assert!(
        metrics_text(&unreachable.registry)
            .contains("egress_scaler_fleet_scrape_errors_total{reason=\"prometheus\"} 1")
    );
}

#[tokio::test]
async fn the_operator_view_serialises() {
    let pod = EgressPodStandIn::start().await.unwrap();
    pod.set_busy(&[("track", 2)]);
    pod.set_cpu_load(Some(0.25));
    let mut observed = observe(urls(&[&pod]));
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    let json = serde_json::to_value(&view.pods[0]).unwrap();
    assert_eq!(json["address"], pod.metrics_url());
    assert_eq!(json["node_id"], pod.node_id());
    assert_eq!(json["state"], "ready");
    assert_eq!(json["active"]["track"], 2);
    assert_eq!(json["free_cpu_cores"], 2.2);
    assert_eq!(json["cpu_load"], 0.25);
    assert_eq!(json["can_accept_video"], false);
    assert!(json["last_scrape_age_seconds"].as_f64().unwrap() < 5.0);
    assert_eq!(json["missing_series"], serde_json::json!([]));
    assert_eq!(json["last_error"], serde_json::Value::Null);
    assert!(view.refresh_duration < Duration::from_secs(1));
    let text = metrics_text(&observed.registry);
    assert!(
        text.contains("egress_scaler_fleet_free_cpu_cores 2.2"),
        "{text}"
    );
    assert!(text.contains("# TYPE egress_scaler_fleet_scrape_duration_seconds histogram"));
}

#[test]
fn bad_options_are_refused() {
    let mut registry = Registry::default();
    let result = FleetObserver::new(
        FleetSource::None,
        FleetOptions {
            concurrency: 0,
            ..FleetOptions::default()
        },
        Settings::default(),
        FleetMetrics::new(&mut registry),
    );
    assert!(result.is_err());
    let result = FleetObserver::new(
        FleetSource::Static(vec!["not a url".to_owned()]),
        FleetOptions::default(),
        Settings::default(),
        FleetMetrics::new(&mut Registry::default()),
    );
    assert!(result.is_err());
}

#[tokio::test]
async fn a_body_announced_larger_than_the_limit_is_not_read() {
    // The stand-in's normal answer carries a Content-Length of about 2 KB.
    let pod = EgressPodStandIn::start().await.unwrap();
    let options = FleetOptions {
        max_body_bytes: 500,
        ..options()
    };
    let mut observed = observe_with(urls(&[&pod]), options, Settings::default());
    observed.observer.refresh_once().await;
    let view = observed.fleet.view();
    assert_eq!(view.pods[0].state, PodState::Starting);
    assert!(
        view.pods[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("larger than 500")
    );
    assert!(
        metrics_text(&observed.registry)
            .contains("egress_scaler_fleet_scrape_errors_total{reason=\"too_large\"} 1")
    );
}
