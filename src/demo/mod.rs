//! `demo`: a burst of room recordings played end to end on this machine, in about a
//! minute.
//!
//! Real: a `redis-server` child process and the `serve` components (HTTP API, webhook
//! receiver, KEDA gRPC scaler, fleet observer, dispatcher), configured through the same
//! validation as `serve`. Stand-ins: livekit-server and the Prometheus server
//! ([`crate::standin`]), the egress pods ([`deployment`]: metrics only, nothing is recorded)
//! and KEDA with its HPA ([`autoscaler`]), which call the real gRPC service and scale the
//! pods. Time runs fast: see [`Timing`].
//!
//! The rooms ask through the real HTTP API at the times of a seeded [`plan::Plan`], some of
//! them twice; every third room asks instead as a backend's LiveKit SDK would, through the
//! Twirp front door (`StartRoomCompositeEgress`, held until started, called again after
//! `unavailable`). The demo fails (non-zero exit, one line saying why) when a room was not
//! recorded or recorded twice, a repeated request was not answered as a duplicate, a recording
//! did not end before the deadline, or the fleet did not scale back to zero.

pub mod autoscaler;
pub mod deployment;
pub mod plan;
pub mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{ApiCredentials, DEMO_MAX_ROOMS, DemoConfig, Environment, ServeArgs};
use crate::model::Settings;
use crate::queue::{TicketId, TicketState};
use crate::redis_server::RedisServer;
use crate::standin::{LiveKitServerStandIn, LiveKitStandInOptions, PrometheusStandIn, StartTiming};
use autoscaler::{Autoscaler, AutoscalerTiming, ScaleState};
use deployment::{EgressDeployment, PodCounts};
use plan::Plan;
use view::{Sample, Screen, Summary};

/// Something a stand-in did, shown between the table rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Time since the demo began.
    pub at: Duration,
    /// Which stand-in.
    pub source: &'static str,
    /// What happened, as a sentence.
    pub text: String,
}

impl Event {
    /// An event of `source` at `at`.
    pub fn new(at: Duration, source: &'static str, text: impl Into<String>) -> Self {
        Event {
            at,
            source,
            text: text.into(),
        }
    }
}

/// The demo's compressed clock: the real values are in the comments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The rooms ask within this long.
    pub burst: Duration,
    /// Shortest and longest recording (real: minutes to hours).
    pub recording: (Duration, Duration),
    /// KEDA polling and HPA sync (real: 15 s each).
    pub sync: Duration,
    /// HPA scale-down stabilization window (shipped: 600 s).
    pub scale_down_window: Duration,
    /// KEDA cooldown before the last pod goes (shipped: 600 s).
    pub cooldown: Duration,
    /// livekit-server's retry ladder is cut after this (real: the whole ladder, 18-27 s).
    pub no_capacity_delay: Duration,
    /// serve's `--fleet-refresh-seconds` (default: 2 s).
    pub fleet_refresh: Duration,
    /// Every recording must have ended, and the fleet be back to zero, by then.
    pub deadline: Duration,
}

/// The timing every demo runs with.
pub const TIMING: Timing = Timing {
    burst: Duration::from_secs(2),
    recording: (Duration::from_secs(4), Duration::from_secs(8)),
    sync: Duration::from_secs(1),
    scale_down_window: Duration::from_secs(5),
    cooldown: Duration::from_secs(5),
    no_capacity_delay: Duration::from_secs(2),
    fleet_refresh: Duration::from_millis(500),
    // Starts take their real time (1.5 s on a new, idle pod); the dispatcher has many in
    // flight at once, so a run takes about 20-25 s.
    deadline: Duration::from_secs(50),
};

/// The queue the demo uses (serve's default).
const QUEUE: &str = "default";
/// How often the table is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(250);
/// How often the tickets' states are read.
const POLL_TICKETS_EVERY: Duration = Duration::from_millis(500);
/// The main loop's tick: recordings end on it.
const TICK: Duration = Duration::from_millis(100);

/// Runs the demo; Ctrl-C or SIGTERM stops it early, cleaning up all the same.
pub async fn run(config: DemoConfig) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(crate::server::cancel_on_signal(shutdown.clone()));
    let result = play(&config, &shutdown).await;
    shutdown.cancel();
    let _ = signals.await;
    result
}

/// Only the demo's own API credentials: nothing from the shell's environment leaks in.
struct DemoEnvironment<'a>(&'a ApiCredentials);

impl Environment for DemoEnvironment<'_> {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "LIVEKIT_API_KEY" => Some(self.0.key.clone()),
            "LIVEKIT_API_SECRET" => Some(self.0.secret.clone()),
            _ => None,
        }
    }
}

/// The real HTTP API, as the rooms' backend and the view use it.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    /// For the front door: the LiveKit SDKs' own 10 s timeout.
    sdk_http: reqwest::Client,
    base: String,
    token: String,
}

/// Every this many rooms (the second, the fifth, ...) asks through the Twirp front door,
/// unless it asks twice.
const FRONT_DOOR_EVERY: usize = 3;
/// Calls of one front-door room before the demo gives up on it (each held up to 8 s).
const FRONT_DOOR_CALLS: usize = 5;

/// How one `StartRoomCompositeEgress` through the front door was answered.
enum FrontDoorAnswer {
    /// The egress started: livekit-server's egress id, and the ticket.
    Started { ticket: TicketId, egress_id: String },
    /// Still queued after the hold: call again.
    Unavailable { ticket: String, msg: String },
}

#[derive(Deserialize)]
struct EnqueueAnswer {
    ticket: TicketId,
    #[serde(default)]
    duplicate: bool,
}

#[derive(Deserialize)]
struct TicketAnswer {
    state: TicketState,
}

#[derive(Deserialize)]
struct StatusAnswer {
    queues: Vec<QueueDepth>,
}

#[derive(Deserialize)]
struct QueueDepth {
    queue: String,
    depth: u64,
}

impl Api {
    async fn enqueue(&self, room: &str) -> anyhow::Result<EnqueueAnswer> {
        let body = serde_json::json!({ "kind": "room_composite", "room_name": room });
        let response = self
            .http
            .post(format!("{}/v1/requests", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }

    /// `StartRoomCompositeEgress` as a backend's SDK sends it, to egress-scaler's URL.
    async fn start_through_front_door(&self, room: &str) -> anyhow::Result<FrontDoorAnswer> {
        #[derive(Deserialize)]
        struct Info {
            #[serde(rename = "egressId")]
            egress_id: String,
        }
        #[derive(Deserialize)]
        struct Failure {
            code: String,
            msg: String,
            #[serde(default)]
            meta: HashMap<String, String>,
        }
        let response = self
            .sdk_http
            .post(format!(
                "{}/twirp/livekit.Egress/StartRoomCompositeEgress",
                self.base
            ))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "roomName": room }))
            .send()
            .await?;
        if response.status().is_success() {
            let ticket = response
                .headers()
                .get(crate::front_door::TICKET_HEADER)
                .and_then(|value| value.to_str().ok())
                .context("the answer names no ticket")?
                .parse::<TicketId>()
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let info: Info = response.json().await?;
            return Ok(FrontDoorAnswer::Started {
                ticket,
                egress_id: info.egress_id,
            });
        }
        let failure: Failure = response.json().await?;
        anyhow::ensure!(
            failure.code == "unavailable",
            "twirp {}: {}",
            failure.code,
            failure.msg
        );
        Ok(FrontDoorAnswer::Unavailable {
            ticket: failure.meta.get("ticket").cloned().unwrap_or_default(),
            msg: failure.msg,
        })
    }

    async fn ticket_state(&self, ticket: &TicketId) -> anyhow::Result<TicketState> {
        let answer: TicketAnswer = self
            .http
            .get(format!("{}/v1/requests/{ticket}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(answer.state)
    }

    async fn queue_depth(&self) -> anyhow::Result<u64> {
        let answer: StatusAnswer = self
            .http
            .get(format!("{}/v1/status", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(answer
            .queues
            .iter()
            .find(|q| q.queue == QUEUE)
            .map_or(0, |q| q.depth))
    }
}

/// One answer of the burst.
struct Asked {
    request: usize,
    sent_at: Instant,
    answer: Result<EnqueueAnswer, String>,
}

/// The rooms that ask through the Twirp front door: every [`FRONT_DOOR_EVERY`]th room that
/// asks only once (a repeat through the HTTP API must find the ticket already known).
fn front_door_rooms(plan: &Plan) -> Vec<bool> {
    let mut through = vec![false; plan.rooms.len()];
    for (index, flag) in through.iter_mut().enumerate() {
        *flag = index % FRONT_DOOR_EVERY == 1;
    }
    for request in &plan.requests {
        if request.repeat {
            through[request.room] = false;
        }
    }
    through
}

/// One room asking as a backend's SDK does: the held call, called again after `unavailable`.
async fn ask_through_front_door(
    api: Api,
    room: String,
    clock: Instant,
    events: mpsc::UnboundedSender<Event>,
) -> Result<EnqueueAnswer, String> {
    for call in 1..=FRONT_DOOR_CALLS {
        let sent = Instant::now();
        match api.start_through_front_door(&room).await {
            Ok(FrontDoorAnswer::Started { ticket, egress_id }) => {
                let _ = events.send(Event::new(
                    clock.elapsed(),
                    "backend (Twirp front door)",
                    format!(
                        "StartRoomCompositeEgress {room}: held {:.1} s, answered egress {egress_id}",
                        sent.elapsed().as_secs_f64()
                    ),
                ));
                return Ok(EnqueueAnswer {
                    ticket,
                    duplicate: false,
                });
            }
            Ok(FrontDoorAnswer::Unavailable { ticket, msg }) => {
                let _ = events.send(Event::new(
                    clock.elapsed(),
                    "backend (Twirp front door)",
                    format!(
                        "StartRoomCompositeEgress {room}: unavailable after {:.1} s (ticket {ticket}); calling again",
                        sent.elapsed().as_secs_f64()
                    ),
                ));
                if call == FRONT_DOOR_CALLS {
                    return Err(format!("still unavailable after {call} calls: {msg}"));
                }
            }
            Err(error) => return Err(format!("{error:#}")),
        }
    }
    Err("no call was made".to_owned())
}

/// Sends the plan's requests at their times; the front-door rooms' calls run alongside.
async fn send_burst(
    api: Api,
    plan: Arc<Plan>,
    clock: Instant,
    answers: mpsc::UnboundedSender<Asked>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
) {
    let through_front_door = front_door_rooms(&plan);
    let mut held = tokio::task::JoinSet::new();
    for (index, request) in plan.requests.iter().enumerate() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until((clock + request.at).into()) => {}
        }
        let sent_at = Instant::now();
        let room = plan.rooms[request.room].name.clone();
        if through_front_door[request.room] {
            let (api, answers, events) = (api.clone(), answers.clone(), events.clone());
            held.spawn(async move {
                let answer = ask_through_front_door(api, room, clock, events).await;
                let _ = answers.send(Asked {
                    request: index,
                    sent_at,
                    answer,
                });
            });
            continue;
        }
        let answer = api
            .enqueue(&room)
            .await
            .map_err(|error| format!("{error:#}"));
        let _ = answers.send(Asked {
            request: index,
            sent_at,
            answer,
        });
    }
    tokio::select! {
        _ = shutdown.cancelled() => held.abort_all(),
        _ = async { while held.join_next().await.is_some() {} } => {}
    }
}

/// What the demo knows of one room.
#[derive(Default)]
struct Room {
    ticket: Option<TicketId>,
    asked_at: Option<Instant>,
    state: Option<TicketState>,
    enqueue_failed: bool,
}

impl Room {
    /// Nothing more will happen to it.
    fn settled(&self) -> bool {
        self.enqueue_failed
            || matches!(
                self.state,
                Some(TicketState::Ended | TicketState::Failed | TicketState::Cancelled)
            )
    }
}

/// Ends each stand-in egress when its room's recording length has passed.
struct Recordings {
    lengths: HashMap<String, Duration>,
    seen: usize,
    due: Vec<(Instant, String)>,
}

impl Recordings {
    fn end_due(&mut self, livekit: &LiveKitServerStandIn) {
        let started = livekit.started();
        for egress in started.iter().skip(self.seen) {
            let length = self
                .lengths
                .get(&egress.room_name)
                .copied()
                .unwrap_or(TIMING.recording.0);
            self.due
                .push((egress.started_at + length, egress.egress_id.clone()));
        }
        self.seen = started.len();
        let now = Instant::now();
        self.due.retain(|(at, egress_id)| {
            if *at <= now {
                livekit.end_egress(egress_id);
                false
            } else {
                true
            }
        });
    }
}

/// Wait from each room's first request to its first egress start.
fn waits(rooms: &HashMap<String, Room>, livekit: &LiveKitServerStandIn) -> Vec<Duration> {
    let mut first_start: HashMap<String, Instant> = HashMap::new();
    for egress in livekit.started() {
        first_start
            .entry(egress.room_name)
            .or_insert(egress.started_at);
    }
    rooms
        .iter()
        .filter_map(|(name, room)| {
            let asked_at = room.asked_at?;
            Some(first_start.get(name)?.saturating_duration_since(asked_at))
        })
        .collect()
}

/// What the burst got as answers and where each room's ticket is.
struct Tally {
    plan: Arc<Plan>,
    rooms: HashMap<String, Room>,
    answered: usize,
    repeats_answered_duplicate: usize,
}

impl Tally {
    fn new(plan: Arc<Plan>) -> Self {
        let rooms = plan
            .rooms
            .iter()
            .map(|room| (room.name.clone(), Room::default()))
            .collect();
        Tally {
            plan,
            rooms,
            answered: 0,
            repeats_answered_duplicate: 0,
        }
    }

    /// Takes in one answer of the burst; returns a line to show when it went wrong.
    fn answer(&mut self, asked: Asked) -> Option<String> {
        self.answered += 1;
        let request = &self.plan.requests[asked.request];
        let name = &self.plan.rooms[request.room].name;
        let room = self.rooms.get_mut(name)?;
        match (request.repeat, asked.answer) {
            (false, Ok(answer)) => {
                room.ticket = Some(answer.ticket);
                room.asked_at = Some(asked.sent_at);
                None
            }
            (false, Err(error)) => {
                room.enqueue_failed = true;
                Some(format!("Enqueueing {name} failed: {error}"))
            }
            (true, Ok(answer))
                if answer.duplicate && room.ticket.as_ref() == Some(&answer.ticket) =>
            {
                self.repeats_answered_duplicate += 1;
                None
            }
            (true, Ok(_)) => Some(format!(
                "The repeated request of {name} was not answered as a duplicate."
            )),
            (true, Err(error)) => Some(format!("The repeated request of {name} failed: {error}")),
        }
    }

    /// Reads the state of every ticket not settled yet.
    async fn poll_tickets(&mut self, api: &Api) {
        let open: Vec<(String, TicketId)> = self
            .rooms
            .iter()
            .filter(|(_, room)| !room.settled())
            .filter_map(|(name, room)| Some((name.clone(), room.ticket.clone()?)))
            .collect();
        let states =
            futures::future::join_all(open.iter().map(|(_, ticket)| api.ticket_state(ticket)))
                .await;
        for ((name, _), state) in open.into_iter().zip(states) {
            if let (Ok(state), Some(room)) = (state, self.rooms.get_mut(&name)) {
                room.state = Some(state);
            }
        }
    }

    /// Every request was answered and every ticket settled.
    fn settled(&self) -> bool {
        self.answered == self.plan.requests.len() && self.rooms.values().all(Room::settled)
    }

    /// The verdict's inputs, from the tickets and the egress the livekit-server stand-in saw.
    fn summary(
        &self,
        livekit: &LiveKitServerStandIn,
        pods: PodCounts,
        interrupted: bool,
    ) -> Summary {
        let mut egress_per_room: HashMap<String, usize> = HashMap::new();
        for egress in livekit.started() {
            *egress_per_room.entry(egress.room_name).or_default() += 1;
        }
        let mut names: Vec<&String> = self.rooms.keys().collect();
        names.sort();
        let rooms_where = |keep: &dyn Fn(&String) -> bool| -> Vec<String> {
            names
                .iter()
                .filter(|name| keep(name))
                .map(|name| (*name).clone())
                .collect()
        };
        Summary {
            rooms: self.plan.rooms.len(),
            repeats: self.plan.repeats(),
            repeats_answered_duplicate: self.repeats_answered_duplicate,
            started: livekit.started_count(),
            lost: rooms_where(&|name| !egress_per_room.contains_key(name)),
            duplicated: rooms_where(&|name| egress_per_room.get(name).is_some_and(|n| *n > 1)),
            not_ended: rooms_where(&|name| self.rooms[name].state != Some(TicketState::Ended)),
            waits: waits(&self.rooms, livekit),
            peak_pods: pods.peak,
            pod_seconds: pods.pod_seconds,
            pods_left: pods.total(),
            wall: Duration::ZERO,
            deadline: TIMING.deadline,
            interrupted,
        }
    }
}

/// Everything the demo starts before the burst: the real parts and the stand-ins they talk to.
struct Stage {
    redis: RedisServer,
    prometheus: PrometheusStandIn,
    livekit: LiveKitServerStandIn,
    running: crate::server::Running,
    api: Api,
    settings: Settings,
}

/// Starts redis-server, the Prometheus and livekit-server stand-ins and the serve components.
async fn set_up(shutdown: &CancellationToken) -> anyhow::Result<Stage> {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .context("the redis-server start was cancelled")?
        .context("the demo needs a local redis-server")?;
    let credentials = ApiCredentials {
        key: "demo-key".to_owned(),
        secret: uuid::Uuid::new_v4().simple().to_string(),
    };
    let settings = Settings::default();
    let prometheus = PrometheusStandIn::start()
        .await
        .context("cannot start the Prometheus stand-in")?;
    let livekit = LiveKitServerStandIn::start(
        LiveKitStandInOptions {
            api_key: credentials.key.clone(),
            api_secret: credentials.secret.clone(),
            settings: settings.clone(),
            no_capacity_delay: TIMING.no_capacity_delay,
            egress_duration: None,
            webhook_url: None,
            any_room_exists: true,
            // Starts, statuses and webhooks take their real time.
            timing: StartTiming::real(),
            ..LiveKitStandInOptions::default()
        },
        Vec::new(),
    )
    .await
    .context("cannot start the livekit-server stand-in")?;

    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let serve_args = ServeArgs {
        redis_url: Some(redis.url()),
        grpc_listen: Some(loopback),
        http_listen: Some(loopback),
        prometheus_url: Some(prometheus.url()),
        livekit_url: Some(livekit.url()),
        fleet_refresh_seconds: Some(TIMING.fleet_refresh.as_secs_f64()),
        max_replicas: Some(DEMO_MAX_ROOMS),
        ..ServeArgs::default()
    };
    let mut serve_config = serve_args
        .resolve(&DemoEnvironment(&credentials))
        .context("the demo's serve settings are invalid")?;
    // The Prometheus stand-in reads the pods when asked: it has no scrape interval to lag by.
    serve_config.prometheus_lag = Duration::ZERO;
    let running = crate::server::start(serve_config, shutdown.clone())
        .await
        .context("cannot start the serve components")?;
    livekit.set_webhook_url(Some(format!(
        "http://{}/webhook/livekit",
        running.http_addr
    )));
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?,
        sdk_http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client")?,
        base: format!("http://{}", running.http_addr),
        token: crate::cli::access_token(&credentials, "egress-scaler-demo")
            .context("cannot sign the demo's access token")?,
    };
    Ok(Stage {
        redis,
        prometheus,
        livekit,
        running,
        api,
        settings,
    })
}

async fn play(config: &DemoConfig, shutdown: &CancellationToken) -> anyhow::Result<ExitCode> {
    let clock = Instant::now();
    let Stage {
        mut redis,
        prometheus,
        livekit,
        running,
        api,
        settings,
    } = set_up(shutdown).await?;
    let redis_pid = redis.pid().unwrap_or_default();
    let plan = Arc::new(Plan::draw(
        config.rooms,
        config.seed,
        TIMING.burst,
        TIMING.recording,
    ));
    let mut screen =
        Screen::new(config.plain || !std::io::IsTerminal::is_terminal(&std::io::stdout()));
    for line in header(config, &plan, redis_pid, redis.port(), &running, &livekit) {
        screen.line(&line);
    }

    let autoscaler = Autoscaler::connect(
        running.grpc_addr,
        QUEUE,
        AutoscalerTiming {
            sync: TIMING.sync,
            scale_down_window: TIMING.scale_down_window,
            cooldown: TIMING.cooldown,
            max_replicas: DEMO_MAX_ROOMS,
        },
        clock.elapsed(),
    )
    .await
    .context("the KEDA stand-in cannot reach the gRPC scaler")?;
    let deployment = EgressDeployment::new(
        livekit.clone(),
        prometheus.clone(),
        settings,
        config.cold_start,
    );
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let (scale_tx, scale) = watch::channel(ScaleState::default());
    let (counts_tx, counts) = watch::channel(PodCounts::default());
    let (asked_tx, mut asked_rx) = mpsc::unbounded_channel();
    let backend_events = events.clone();
    let autoscaler_task =
        tokio::spawn(autoscaler.run(clock, scale_tx, events.clone(), shutdown.clone()));
    let deployment_task =
        tokio::spawn(deployment.run(clock, scale.clone(), counts_tx, events, shutdown.clone()));
    let burst_task = tokio::spawn(send_burst(
        api.clone(),
        Arc::clone(&plan),
        clock,
        asked_tx,
        backend_events,
        shutdown.clone(),
    ));

    screen.line("");
    screen.line(
        "  columns: queued = queue depth (GET /v1/status), desired = the last GetMetrics answer,",
    );
    screen
        .line("           replicas = set by the KEDA/HPA stand-in, wait = enqueue to egress start");
    screen.line(&view::heading());
    let mut tally = Tally::new(Arc::clone(&plan));
    let mut recordings = Recordings {
        lengths: plan
            .rooms
            .iter()
            .map(|room| (room.name.clone(), room.recording))
            .collect(),
        seen: 0,
        due: Vec::new(),
    };
    let mut next_draw = Duration::ZERO;
    let mut next_poll = Duration::ZERO;
    let mut stopped_early = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(asked) = asked_rx.recv() => {
                if let Some(problem) = tally.answer(asked) {
                    screen.line(&problem);
                }
            }
            Some(event) = event_rx.recv() => screen.line(&view::event_line(&event)),
            _ = tick.tick() => {
                let now = clock.elapsed();
                recordings.end_due(&livekit);
                if now >= next_poll {
                    next_poll = now + POLL_TICKETS_EVERY;
                    tally.poll_tickets(&api).await;
                }
                if now >= next_draw {
                    next_draw = now + DRAW_EVERY;
                    screen.sample(&take_sample(now, &api, &scale, &counts, &livekit, &tally).await);
                }
                let back_to_zero = counts.borrow().total() == 0 && scale.borrow().replicas == 0;
                if (tally.settled() && back_to_zero) || now >= TIMING.deadline {
                    break;
                }
                // They end on their own only by failing (or on a shutdown not seen yet).
                let stopped = deployment_task.is_finished() || autoscaler_task.is_finished();
                if stopped && !shutdown.is_cancelled() {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    let interrupted = shutdown.is_cancelled();
    let now = clock.elapsed();
    screen.finish_table(&take_sample(now, &api, &scale, &counts, &livekit, &tally).await);
    let mut summary = tally.summary(&livekit, *counts.borrow(), interrupted);

    // Cleanup: the stand-ins' loops, the serve components, the stand-in servers, redis-server.
    shutdown.cancel();
    let _ = autoscaler_task.await;
    let deployment_result = deployment_task.await;
    let _ = burst_task.await;
    if let Err(error) = running.wait().await {
        screen.line(&format!(
            "The serve components stopped with an error: {error:#}"
        ));
    }
    drop(livekit);
    drop(prometheus);
    redis.stop();
    screen.line(&format!(
        "Stopped redis-server pid {redis_pid}, the serve components and every stand-in."
    ));
    screen.line("");

    summary.wall = clock.elapsed();
    for line in summary.lines() {
        screen.line(&line);
    }
    match deployment_result {
        Ok(Err(error)) => {
            return Err(anyhow::Error::new(error).context("the egress pods stand-in failed"));
        }
        Err(error) => anyhow::bail!("the egress pods stand-in panicked: {error}"),
        Ok(Ok(())) => {}
    }
    anyhow::ensure!(!stopped_early, "the KEDA/HPA stand-in stopped on its own");
    Ok(match summary.failure() {
        None => ExitCode::SUCCESS,
        Some(_) if interrupted => ExitCode::from(130),
        Some(_) => ExitCode::FAILURE,
    })
}

async fn take_sample(
    now: Duration,
    api: &Api,
    scale: &watch::Receiver<ScaleState>,
    counts: &watch::Receiver<PodCounts>,
    livekit: &LiveKitServerStandIn,
    tally: &Tally,
) -> Sample {
    let scale = *scale.borrow();
    let pods = *counts.borrow();
    let started = livekit.started_count();
    let mut waits = waits(&tally.rooms, livekit);
    waits.sort();
    Sample {
        elapsed: now,
        queued: api.queue_depth().await.ok(),
        desired: scale.desired,
        replicas: scale.replicas,
        ready: pods.ready,
        starting: pods.starting,
        draining: pods.draining,
        started,
        ended: started.saturating_sub(livekit.active_egress().len()),
        wait_p50: view::percentile(&waits, 0.5),
        wait_max: waits.last().copied(),
    }
}

/// What runs, what is real and what is a stand-in, and how fast time goes.
fn header(
    config: &DemoConfig,
    plan: &Plan,
    redis_pid: u32,
    redis_port: u16,
    running: &crate::server::Running,
    livekit: &LiveKitServerStandIn,
) -> Vec<String> {
    let secs = |d: Duration| d.as_secs_f64();
    vec![
        format!(
            "egress-scaler demo: {} rooms ask for a recording within {} s, {} of them twice (seed {}).",
            plan.rooms.len(),
            secs(TIMING.burst),
            plan.repeats(),
            config.seed
        ),
        format!(
            "  real      redis-server pid {redis_pid} on 127.0.0.1:{redis_port}, started for the demo"
        ),
        format!(
            "  real      egress-scaler serve: HTTP API and webhook receiver on http://{}, KEDA gRPC scaler on {},",
            running.http_addr, running.grpc_addr
        ),
        "            fleet observer and dispatcher".to_owned(),
        format!(
            "  real      backend calls: {} rooms ask through POST /v1/requests; {} ask as a LiveKit SDK would, through the",
            plan.rooms.len() - front_door_rooms(plan).iter().filter(|through| **through).count(),
            front_door_rooms(plan).iter().filter(|through| **through).count()
        ),
        "            Twirp front door (StartRoomCompositeEgress, held until started, called again after unavailable)".to_owned(),
        format!(
            "  stand-in  livekit-server on {}: Twirp egress API and signed webhooks",
            livekit.url()
        ),
        "  stand-in  egress pods: metrics endpoints only, nothing is recorded; 4 cores, one room composite each".to_owned(),
        "  stand-in  Prometheus: how the fleet observer finds the egress pods".to_owned(),
        "  stand-in  KEDA and its HPA: they call the real gRPC scaler and set the egress pod count".to_owned(),
        format!(
            "  time runs fast: pod cold start {} s, KEDA/HPA sync every {} s, scale-down window {} s, KEDA cooldown {} s,",
            secs(config.cold_start),
            secs(TIMING.sync),
            secs(TIMING.scale_down_window),
            secs(TIMING.cooldown)
        ),
        format!(
            "  recordings last {}-{} s; everything must be done within {} s.",
            secs(TIMING.recording.0),
            secs(TIMING.recording.1),
            secs(TIMING.deadline)
        ),
    ]
}
