//! The dispatcher's failure paths through the real server: HTTP API, webhooks and dispatcher
//! against a real redis-server and the livekit-server stand-in with scaled-down timing
//! (issue 15). Every wait is bounded.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use egress_scaler::config::ServeConfig;
use egress_scaler::queue::{QueueStore, StoreOptions, TicketId, TicketState};
use egress_scaler::redis_server::RedisServer;
use egress_scaler::standin::livekit_server::ScriptedStart;
use egress_scaler::standin::{
    EgressPodStandIn, LiveKitServerStandIn, LiveKitStandInOptions, StartTiming,
};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol as proto;
use serde_json::{Value, json};
use support::{CredentialsEnvironment, TestServer, config, http_client, redis};

const KEY: &str = "standin-key";
const SECRET: &str = "standin-secret-standin-secret-01";
/// A secret livekit-server no longer accepts (it was rotated).
const OLD_SECRET: &str = "rotated-secret-rotated-secret-00";

fn token(secret: &str) -> String {
    AccessToken::with_api_key(KEY, secret)
        .with_ttl(Duration::from_secs(300))
        .with_grants(VideoGrants {
            room_record: true,
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

/// The stand-in with `pods` idle 4-core pods (one room composite each) and `timing`.
async fn livekit(pods: usize, timing: StartTiming) -> LiveKitServerStandIn {
    support::init();
    let mut fleet = Vec::new();
    for _ in 0..pods {
        fleet.push(EgressPodStandIn::start().await.unwrap());
    }
    LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: KEY.to_owned(),
            api_secret: SECRET.to_owned(),
            timing,
            no_capacity_delay: Duration::from_secs(2),
            any_room_exists: true,
            ..LiveKitStandInOptions::default()
        },
        fleet,
    )
    .await
    .unwrap()
}

/// `serve` against the stand-in and its pods, with `secret` as its API secret.
fn serve_config(
    redis: &RedisServer,
    livekit: &LiveKitServerStandIn,
    secret: &'static str,
    flags: &[&str],
) -> ServeConfig {
    let livekit_url = livekit.url();
    let metrics: Vec<String> = livekit.pods().iter().map(|p| p.metrics_url()).collect();
    let metrics = metrics.join(",");
    let mut all = vec![
        "--livekit-url",
        &livekit_url,
        "--egress-metrics",
        &metrics,
        "--fleet-refresh-seconds",
        "0.1",
    ];
    all.extend_from_slice(flags);
    let mut config = config(redis, &all, &CredentialsEnvironment(KEY, secret));
    config.livekit_call_timeout = Duration::from_secs(5);
    config
}

/// The server and the stand-in's webhooks pointed at it.
async fn serve(
    redis: &RedisServer,
    livekit: &LiveKitServerStandIn,
    secret: &'static str,
    flags: &[&str],
) -> TestServer {
    let server = TestServer::start(serve_config(redis, livekit, secret, flags)).await;
    livekit.set_webhook_url(Some(server.http("/webhook/livekit")));
    server
}

/// The client of the HTTP API with the server's credentials.
struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(server: &TestServer, secret: &str) -> Api {
        Api {
            client: http_client(),
            base: server.http(""),
            token: token(secret),
        }
    }

    async fn enqueue(&self, room: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/v1/requests", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"kind": "room_composite", "room_name": room}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Enqueues a new ticket (202) and returns its id.
    async fn enqueue_new(&self, room: &str) -> String {
        let (status, body) = self.enqueue(room).await;
        assert_eq!(status, 202, "{body}");
        assert!(body.get("duplicate").is_none(), "{body}");
        body["ticket"].as_str().unwrap().to_owned()
    }

    async fn ticket(&self, id: &str) -> Value {
        let response = self
            .client
            .get(format!("{}/v1/requests/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn state(&self, id: &str) -> String {
        self.ticket(id).await["state"].as_str().unwrap().to_owned()
    }

    async fn cancel(&self, id: &str) -> (u16, Value) {
        let response = self
            .client
            .delete(format!("{}/v1/requests/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of a sample line of `/metrics` (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let metrics = self.metrics().await;
        let prefix = format!("{series} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    /// Waits until the ticket is in `state`; panics with what it shows otherwise.
    async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Value {
        let reached = eventually(limit, || async { self.state(id).await == state }).await;
        let ticket = self.ticket(id).await;
        assert!(reached, "ticket never became {state}: {ticket}");
        ticket
    }
}

fn outcome(name: &str) -> String {
    format!("egress_scaler_dispatch_outcomes_total{{outcome=\"{name}\"}}")
}

fn status_of(livekit: &LiveKitServerStandIn, egress_id: &str) -> proto::EgressStatus {
    let info = livekit
        .egress(egress_id)
        .expect("the stand-in knows the egress");
    proto::EgressStatus::try_from(info.status).unwrap()
}

/// The egress the stand-in started for `room`.
fn started_in(livekit: &LiveKitServerStandIn, room: &str) -> Vec<String> {
    livekit
        .started()
        .into_iter()
        .filter(|egress| egress.room_name == room)
        .map(|egress| egress.egress_id)
        .collect()
}

/// `StopEgress` as a LiveKit SDK calls it, straight to the stand-in.
async fn stop_egress(livekit: &LiveKitServerStandIn, egress_id: &str) -> u16 {
    http_client()
        .post(format!("{}/twirp/livekit.Egress/StopEgress", livekit.url()))
        .bearer_auth(token(SECRET))
        .json(&json!({ "egressId": egress_id }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_that_fails_before_its_start_is_answered_fails_the_ticket() {
    let redis = redis();
    let livekit = livekit(1, StartTiming::scaled(0.05)).await;
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    // The answer of the start takes a while to come back.
    livekit.set_answer_delay(Duration::from_millis(1500));

    let ticket = api.enqueue_new("late-answer").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            started_in(&livekit, "late-answer").len() == 1
        })
        .await,
        "the stand-in never started the egress"
    );
    let egress_id = started_in(&livekit, "late-answer").remove(0);
    assert!(livekit.fail_egress(&egress_id, "pipeline crashed: out of memory"));
    // Its egress_ended reaches the server while the answer is on its way.
    assert!(
        eventually(Duration::from_secs(3), || async {
            api.metrics().await.lines().any(|line| {
                line.starts_with("egress_scaler_webhooks_total{event=\"egress_ended\"")
                    && line.ends_with(" 1")
            })
        })
        .await,
        "egress_ended not delivered:\n{}",
        api.metrics().await
    );
    assert_eq!(api.state(&ticket).await, "dispatching");

    // Once the answer arrives, the ticket fails at once; it is never shown active.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = api.ticket(&ticket).await;
    while Instant::now() < deadline {
        last = api.ticket(&ticket).await;
        let state = last["state"].as_str().unwrap().to_owned();
        seen.insert(state.clone());
        if state == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(last["state"], "failed", "{last}");
    assert!(!seen.contains("active"), "shown active: {seen:?}");
    assert_eq!(last["egress_id"], egress_id.as_str(), "{last}");
    let error = last["error"].as_str().unwrap();
    assert!(
        error.contains("EGRESS_FAILED") && error.contains("pipeline crashed: out of memory"),
        "{error}"
    );
    assert_eq!(started_in(&livekit, "late-answer").len(), 1);

    // The room can be asked for again: a new ticket, not the failed one.
    livekit.set_answer_delay(Duration::ZERO);
    let again = api.enqueue_new("late-answer").await;
    assert_ne!(again, ticket);
    let active = api
        .wait_state(&again, "active", Duration::from_secs(5))
        .await;
    assert_ne!(active["egress_id"], egress_id.as_str());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_that_end_failed_aborted_or_complete_finish_their_tickets() {
    let redis = redis();
    // Egress stay STARTING long enough for a stop to abort one.
    let mut timing = StartTiming::scaled(0.05);
    timing.active_after = Duration::from_secs(60);
    let livekit = livekit(3, timing).await;
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);

    let rooms = ["fails", "aborts", "completes"];
    let mut tickets = BTreeMap::new();
    for room in rooms {
        tickets.insert(room, api.enqueue_new(room).await);
    }
    let mut egress = BTreeMap::new();
    for room in rooms {
        let active = api
            .wait_state(&tickets[room], "active", Duration::from_secs(10))
            .await;
        let id = active["egress_id"].as_str().unwrap().to_owned();
        assert_eq!(started_in(&livekit, room), vec![id.clone()]);
        egress.insert(room, id);
    }

    assert!(livekit.fail_egress(&egress["fails"], "Start signal not received"));
    assert_eq!(stop_egress(&livekit, &egress["aborts"]).await, 200);
    assert!(livekit.end_egress(&egress["completes"]));

    let failed = api
        .wait_state(&tickets["fails"], "failed", Duration::from_secs(5))
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("EGRESS_FAILED") && error.contains("Start signal not received"),
        "{failed}"
    );
    let aborted = api
        .wait_state(&tickets["aborts"], "failed", Duration::from_secs(5))
        .await;
    let error = aborted["error"].as_str().unwrap();
    assert!(
        error.contains("EGRESS_ABORTED")
            && error.contains("Stop called before pipeline could start"),
        "{aborted}"
    );
    assert_eq!(
        status_of(&livekit, &egress["aborts"]),
        proto::EgressStatus::EgressAborted
    );
    let ended = api
        .wait_state(&tickets["completes"], "ended", Duration::from_secs(5))
        .await;
    assert!(ended.get("error").is_none(), "{ended}");
    assert_eq!(
        status_of(&livekit, &egress["completes"]),
        proto::EgressStatus::EgressComplete
    );

    // Every room can be asked for again, and is started again.
    for room in rooms {
        let again = api.enqueue_new(room).await;
        assert_ne!(again, tickets[room]);
        let active = api
            .wait_state(&again, "active", Duration::from_secs(10))
            .await;
        assert_ne!(active["egress_id"], egress[room].as_str());
        assert_eq!(started_in(&livekit, room).len(), 2);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_dispatching_ticket_stops_the_egress_it_started() {
    let redis = redis();
    let livekit = livekit(1, StartTiming::scaled(0.05)).await;
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    livekit.set_answer_delay(Duration::from_millis(1500));

    let ticket = api.enqueue_new("cancel-me").await;
    api.wait_state(&ticket, "dispatching", Duration::from_secs(5))
        .await;
    let (status, body) = api.cancel(&ticket).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["cancel_requested"], true, "{body}");
    assert_eq!(body["state"], "dispatching", "{body}");
    let shown = api.ticket(&ticket).await;
    assert_eq!(shown["state"], "dispatching", "{shown}");
    assert_eq!(shown["cancel_requested"], true, "{shown}");

    // The start is answered, the egress it started is stopped, the ticket cancelled.
    let cancelled = api
        .wait_state(&ticket, "cancelled", Duration::from_secs(10))
        .await;
    assert!(cancelled.get("cancel_requested").is_none(), "{cancelled}");
    let started = started_in(&livekit, "cancel-me");
    assert_eq!(started.len(), 1);
    let egress_id = &started[0];
    let mut statuses = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            let status = status_of(&livekit, egress_id);
            if statuses.last() != Some(&status) {
                statuses.push(status);
            }
            async move {
                matches!(
                    status,
                    proto::EgressStatus::EgressComplete | proto::EgressStatus::EgressAborted
                )
            }
        })
        .await,
        "the egress was not stopped: {statuses:?}"
    );
    use proto::EgressStatus::*;
    let aborted = statuses.last() == Some(&EgressAborted);
    assert!(
        aborted || statuses.ends_with(&[EgressEnding, EgressComplete]),
        "{statuses:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            livekit.pods()[0].active().is_empty()
        })
        .await,
        "the pod still runs the job"
    );
    assert_eq!(api.metric(&outcome("cancelled")).await, 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_put_the_ticket_back_until_they_are_right() {
    let redis = redis();
    let livekit = livekit(1, StartTiming::scaled(0.05)).await;
    // The secret was rotated in livekit-server but not here yet.
    let server = serve(&redis, &livekit, OLD_SECRET, &[]).await;
    let api = Api::new(&server, OLD_SECRET);
    let ticket = api.enqueue_new("rotated").await;

    // Refused at once each time: back in the queue between attempts, never settling.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dispatching_since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    let mut queued_after_refusal = false;
    while Instant::now() < deadline {
        let refused = api.metric(&outcome("unauthenticated")).await;
        let state = api.state(&ticket).await;
        match state.as_str() {
            "dispatching" => {
                let since = *dispatching_since.get_or_insert_with(Instant::now);
                longest = longest.max(since.elapsed());
            }
            "queued" => {
                dispatching_since = None;
                queued_after_refusal |= refused >= 1.0;
            }
            other => panic!("the ticket became {other}"),
        }
        if refused >= 3.0 && queued_after_refusal {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        queued_after_refusal,
        "never queued again after a refusal:\n{}",
        api.metrics().await
    );
    assert!(api.metric(&outcome("unauthenticated")).await >= 3.0);
    assert!(
        longest < Duration::from_secs(1),
        "dispatching for {longest:?}: held for a settling"
    );
    assert_eq!(api.metric(&outcome("unknown")).await, 0.0);
    assert_eq!(api.metric(&outcome("started")).await, 0.0);
    assert_eq!(livekit.started_count(), 0);
    assert_eq!(
        livekit.start_calls(),
        0,
        "refused before any start was handled"
    );
    server.stop().await;
    let store = QueueStore::connect(&redis.url(), StoreOptions::default())
        .await
        .unwrap();
    let id: TicketId = ticket.parse().unwrap();
    let stored = store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.state, TicketState::Queued);
    assert_eq!(stored.unsettled_at_ms, None);

    // The new secret is deployed: the same ticket starts, once.
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    let active = api
        .wait_state(&ticket, "active", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(livekit.started_count(), 1);
    assert_eq!(livekit.start_calls(), 1);
    assert_eq!(
        active["egress_id"].as_str().unwrap(),
        livekit.started()[0].egress_id
    );
    assert_eq!(api.metric(&outcome("started")).await, 1.0);
    assert_eq!(api.metric(&outcome("unauthenticated")).await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_401_is_retried_and_the_ticket_starts_once() {
    let redis = redis();
    let livekit = livekit(1, StartTiming::scaled(0.05)).await;
    for _ in 0..2 {
        livekit.script_start(ScriptedStart::PlainText {
            status: 401,
            body: "invalid authorization token: token is expired".to_owned(),
        });
    }
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    let ticket = api.enqueue_new("expired").await;
    let active = api
        .wait_state(&ticket, "active", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(livekit.start_calls(), 3);
    assert_eq!(livekit.started_count(), 1);
    assert_eq!(
        active["egress_id"].as_str().unwrap(),
        livekit.started()[0].egress_id
    );
    assert_eq!(api.metric(&outcome("unauthenticated")).await, 2.0);
    assert_eq!(api.metric(&outcome("unknown")).await, 0.0);
    assert_eq!(api.metric(&outcome("started")).await, 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_page_after_the_egress_started_adopts_that_egress() {
    let redis = redis();
    let livekit = livekit(2, StartTiming::scaled(0.05)).await;
    livekit.script_start(ScriptedStart::StartedThenHtml { status: 502 });
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    let ticket = api.enqueue_new("proxied").await;
    let active = api
        .wait_state(&ticket, "active", Duration::from_secs(10))
        .await;
    let started = started_in(&livekit, "proxied");
    assert_eq!(started.len(), 1);
    assert_eq!(active["egress_id"].as_str().unwrap(), started[0]);
    // Nothing else starts for it afterwards.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(livekit.start_calls(), 1);
    assert_eq!(livekit.started_count(), 1);
    assert_eq!(api.state(&ticket).await, "active");
    assert_eq!(api.metric(&outcome("unknown")).await, 1.0);
    assert_eq!(api.metric(&outcome("started")).await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_twenty_starts_in_parallel_one_egress_each() {
    const ROOMS: usize = 20;
    let redis = redis();
    let timing = StartTiming::scaled(0.2);
    let livekit = livekit(ROOMS, timing).await;
    let server = serve(&redis, &livekit, SECRET, &[]).await;
    let api = Api::new(&server, SECRET);
    // The fleet is seen before the burst comes.
    assert!(
        eventually(Duration::from_secs(5), || async {
            api.metrics()
                .await
                .contains("egress_scaler_fleet_pods{state=\"ready\"} 20")
        })
        .await,
        "{}",
        api.metrics().await
    );

    let began = Instant::now();
    let mut enqueues = tokio::task::JoinSet::new();
    for n in 0..ROOMS {
        let api = Api::new(&server, SECRET);
        enqueues.spawn(async move { api.enqueue_new(&format!("burst-{n:02}")).await });
    }
    let mut tickets = Vec::new();
    while let Some(ticket) = enqueues.join_next().await {
        tickets.push(ticket.unwrap());
    }
    let all_active = eventually(Duration::from_secs(10), || async {
        let mut all = true;
        for ticket in &tickets {
            all &= api.state(ticket).await == "active";
        }
        all
    })
    .await;
    let took = began.elapsed();
    assert!(all_active, "not all started: {:?}", livekit.started().len());

    // Exactly one egress per ticket, per room and per pod.
    let started = livekit.started();
    assert_eq!(started.len(), ROOMS);
    let rooms: BTreeSet<_> = started.iter().map(|e| e.room_name.clone()).collect();
    assert_eq!(rooms.len(), ROOMS);
    let nodes: BTreeSet<_> = started.iter().map(|e| e.node_id.clone()).collect();
    assert_eq!(nodes.len(), ROOMS);
    let mut recorded = BTreeSet::new();
    for ticket in &tickets {
        let shown = api.ticket(ticket).await;
        let egress_id = shown["egress_id"].as_str().unwrap().to_owned();
        assert!(started.iter().any(|e| e.egress_id == egress_id), "{shown}");
        recorded.insert(egress_id);
    }
    assert_eq!(recorded.len(), ROOMS);
    for pod in livekit.pods() {
        assert_eq!(pod.active().values().sum::<u64>(), 1, "{}", pod.node_id());
    }

    // Several starts were in flight at once: the calls' spans (arrival to answer) overlap,
    // and the burst took far less than twenty starts one after the other.
    let answered =
        |e: &egress_scaler::standin::livekit_server::StartedEgress| e.started_at + timing.launch;
    let most_overlapping = started
        .iter()
        .map(|a| {
            started
                .iter()
                .filter(|b| b.requested_at <= a.requested_at && answered(b) > a.requested_at)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most_overlapping >= 4,
        "at most {most_overlapping} starts at once"
    );
    let first = started.iter().map(|e| e.requested_at).min().unwrap();
    let span = started.iter().map(answered).max().unwrap() - first;
    let sequential = (timing.bid_window + timing.launch) * ROOMS as u32;
    assert!(
        span < sequential / 2 && took < sequential,
        "the starts took {span:?} ({took:?} through the API); one after the other: {sequential:?}"
    );
    assert_eq!(api.metric(&outcome("started")).await, ROOMS as f64);
    server.stop().await;
}
