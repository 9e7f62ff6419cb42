//! The Prometheus fleet source against a real Prometheus server (scraping stand-in egress pods
//! every second), with the queries of the README: ready and busy pods, a terminating pod, a
//! restarted pod (new `node_id` at the same address) and a deleted one. Every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use egress_scaler::fleet::{
    Fleet, FleetMetrics, FleetObserver, FleetOptions, FleetSource, PodView,
};
use egress_scaler::model::{Demand, EgressKind, PodState, Settings, decide};
use egress_scaler::standin::EgressPodStandIn;
use egress_scaler::standin::egress_pod::EgressPodOptions;
use prometheus_client::registry::Registry;
use support::prometheus::{PrometheusServer, Target};

/// Longest wait for Prometheus to show a change: a few scrape intervals of 1 s.
const CHANGE_SEEN_WITHIN: Duration = Duration::from_secs(20);

fn observe(url: String) -> (FleetObserver, Fleet) {
    let options = FleetOptions {
        refresh_interval: Duration::from_millis(200),
        scrape_timeout: Duration::from_secs(2),
        unknown_grace: Duration::from_secs(10),
        stale_after: Duration::from_secs(10),
        ..FleetOptions::default()
    };
    let mut registry = Registry::default();
    let metrics = FleetMetrics::new(&mut registry);
    FleetObserver::new(
        FleetSource::Prometheus { url },
        options,
        Settings::default(),
        metrics,
    )
    .expect("observer builds")
}

fn desired(fleet: &Fleet, room_composites: u64) -> u32 {
    let view = fleet.current().expect("a trusted snapshot");
    let demand = Demand::from_counts([(EgressKind::RoomComposite, room_composites)]);
    decide(&Settings::default(), &demand, &view.snapshot()).desired
}

fn pod<'a>(pods: &'a [PodView], name: &str) -> Option<&'a PodView> {
    pods.iter().find(|pod| pod.address == name)
}

/// Refreshes until `done` holds for the view, at most `CHANGE_SEEN_WITHIN`.
async fn refresh_until(
    observer: &mut FleetObserver,
    fleet: &Fleet,
    prometheus: &PrometheusServer,
    what: &str,
    done: impl Fn(&[PodView]) -> bool,
) {
    let deadline = Instant::now() + CHANGE_SEEN_WITHIN;
    loop {
        observer.refresh_once().await;
        let view = fleet.view();
        if view.source_error.is_none() && done(&view.pods) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {CHANGE_SEEN_WITHIN:?}; last view {:#?}\nprometheus log:\n{}",
            view,
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn start_pod(drain_poll: Duration) -> EgressPodStandIn {
    EgressPodStandIn::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EgressPodOptions {
            drain_poll,
            ..EgressPodOptions::default()
        },
    )
    .await
    .expect("stand-in pod starts")
}

#[tokio::test]
async fn a_real_prometheus_shows_ready_busy_terminating_restarted_and_deleted_pods() {
    let idle = start_pod(Duration::from_secs(1)).await;
    let busy = start_pod(Duration::from_secs(1)).await;
    busy.set_busy(&[("room_composite", 1)]);
    let draining = start_pod(Duration::from_secs(1)).await;
    draining.set_busy(&[("track", 1)]);
    let restarted = start_pod(Duration::from_secs(1)).await;
    restarted.set_busy(&[("track", 2)]);
    let deleted = start_pod(Duration::from_secs(1)).await;
    let mut targets = vec![
        Target::new("egress-a", idle.addr()),
        Target::new("egress-b", busy.addr()),
        Target::new("egress-c", draining.addr()),
        Target::new("egress-d", restarted.addr()),
        Target::new("egress-e", deleted.addr()),
    ];
    let prometheus = PrometheusServer::start(&targets).await;
    let (mut observer, fleet) = observe(prometheus.url());

    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "five ready pods",
        |pods| pods.len() == 5 && pods.iter().all(|pod| pod.state == PodState::Ready),
    )
    .await;
    let view = fleet.view();
    let b = pod(&view.pods, "egress-b").unwrap();
    assert_eq!(b.node_id.as_deref(), Some(busy.node_id()));
    assert_eq!(b.active.get("room_composite"), Some(&1));
    assert_eq!(b.free_cpu_cores, 0.0);
    let a = pod(&view.pods, "egress-a").unwrap();
    assert!(a.active.is_empty() && (a.free_cpu_cores - 3.2).abs() < 1e-9);
    assert_eq!(
        pod(&view.pods, "egress-d").unwrap().active.get("track"),
        Some(&2)
    );
    // Busy: b, c, d. One queued composite goes on an idle pod (a or e).
    assert_eq!(desired(&fleet, 0), 3);
    assert_eq!(desired(&fleet, 1), 4);
    assert_eq!(desired(&fleet, 3), 6);

    // SIGTERM to a busy pod: it stops bidding, its metrics keep answering.
    draining.sigterm();
    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "a terminating pod",
        |pods| pod(pods, "egress-c").is_some_and(|c| c.state == PodState::Terminating),
    )
    .await;
    assert_eq!(desired(&fleet, 0), 2, "a terminating pod is not counted");
    // Its recording ends; at its next drain poll it exits. Prometheus's scrape fails (up 0),
    // and the pod stays out of the count.
    draining.remove_job("track");
    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "the drained pod's scrape failing",
        |pods| {
            pod(pods, "egress-c").is_some_and(|c| {
                c.state == PodState::Terminating
                    && c.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("up == 0"))
            })
        },
    )
    .await;
    assert!(draining.has_exited());
    assert_eq!(desired(&fleet, 0), 2);

    // An idle terminating pod (SIGTERM's flags, held without the exit) says available 1 and
    // is_disabled 1: terminating is read first, so it is neither idle capacity nor counted.
    idle.set_terminating(true);
    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "an idle terminating pod",
        |pods| {
            pod(pods, "egress-a")
                .is_some_and(|a| a.state == PodState::Terminating && a.active.is_empty())
        },
    )
    .await;
    let flags = prometheus
        .query("livekit_egress_available{pod=\"egress-a\"} + livekit_egress_is_disabled{pod=\"egress-a\"} + livekit_egress_is_terminating{pod=\"egress-a\"}")
        .await;
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!(flags[0]["value"][1], "3", "{flags:?}");
    assert_eq!(desired(&fleet, 0), 2);
    // A queued composite goes on the idle egress-e: no new pod.
    assert_eq!(desired(&fleet, 1), 3);

    // A restart at the same address: a new node_id, and the old jobs are gone.
    let before = restarted.node_id();
    restarted.restart().await.unwrap();
    let after = restarted.node_id();
    assert_ne!(before, after);
    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "the restarted pod",
        |pods| {
            let d: Vec<&PodView> = pods.iter().filter(|p| p.address == "egress-d").collect();
            d.len() == 1 && d[0].node_id.as_deref() == Some(after) && d[0].state == PodState::Ready
        },
    )
    .await;
    let view = fleet.view();
    assert!(pod(&view.pods, "egress-d").unwrap().active.is_empty());
    assert_eq!(desired(&fleet, 0), 1, "only the composite pod is busy now");

    // A deleted pod: its target goes from the service discovery, and the pod from the fleet.
    targets.retain(|target| target.pod != "egress-e");
    prometheus.set_targets(&targets).await;
    refresh_until(
        &mut observer,
        &fleet,
        &prometheus,
        "the deleted pod gone",
        |pods| pod(pods, "egress-e").is_none() && pods.len() == 4,
    )
    .await;
    // A queued composite goes on the idle egress-d: no new pod (egress-a is terminating).
    assert_eq!(desired(&fleet, 1), 2);
    assert_eq!(desired(&fleet, 3), 4);
}
