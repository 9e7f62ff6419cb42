//! Command line, environment and TOML configuration, parsed once into typed settings.
//!
//! Precedence for `serve`: flag, then its environment variable, then the `--config` file,
//! then the default of DESIGN.md 5. Every error names the setting it is about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::dispatch::livekit::DEFAULT_REQUEST_TIMEOUT;
use crate::dispatch::{DispatchOptions, Order};
use crate::egress_request::StartRequest;
use crate::fleet::{FleetConfigError, FleetOptions, FleetSource};
use crate::kube_scale::{DeploymentRef, KubeApi, KubeScaleConfig};
use crate::model::{EgressKind, Prewarm, Settings, cores_to_millicores};
use crate::queue::{QueueName, ServedQueues};
use crate::tls::TlsSettings;
use crate::webhook::AutoRecord;

/// `egress-scaler`: a durable queue, a KEDA external scaler and a dispatcher for LiveKit egress.
#[derive(Debug, Parser)]
#[command(name = "egress-scaler", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "EGRESS_SCALER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the KEDA external scaler, the HTTP API and (with LiveKit credentials) the dispatcher.
    Serve(Box<ServeArgs>),
    /// Queue one egress request through a running server's HTTP API.
    Enqueue(EnqueueArgs),
    /// Show queues, fleet and desired replicas from a running server.
    Status(StatusArgs),
    /// Compare scaling policies on the same traffic in virtual time (capacity planning).
    Simulate(SimulateArgs),
    /// Play a burst of room recordings on this machine: a real redis-server and the serve
    /// components against stand-ins of livekit-server, egress pods and KEDA.
    Demo(DemoArgs),
}

/// Flags of `serve` (each also an `EGRESS_SCALER_<FLAG>` environment variable).
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML file with the same settings (flag names with `_` for `-`).
    #[arg(long, env = "EGRESS_SCALER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Redis, Redis Cluster or Sentinel URL: redis://, rediss://, redis+sentinel:// or
    /// rediss+sentinel:// (also env REDIS_URL).
    #[arg(long, env = "EGRESS_SCALER_REDIS_URL")]
    pub redis_url: Option<String>,
    /// KEDA gRPC listen address [default: 0.0.0.0:9090].
    #[arg(long, env = "EGRESS_SCALER_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP API, webhook, /metrics, /healthz, /readyz listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "EGRESS_SCALER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Static egress pod metrics URL (repeatable).
    #[arg(
        long = "egress-metrics",
        value_name = "URL",
        env = "EGRESS_SCALER_EGRESS_METRICS",
        value_delimiter = ','
    )]
    pub egress_metrics: Vec<String>,
    /// Discover egress pods from the A/AAAA records of a headless Service.
    #[arg(long, value_name = "HOST:PORT", env = "EGRESS_SCALER_EGRESS_DNS")]
    pub egress_dns: Option<String>,
    /// Read the egress fleet from a Prometheus server's HTTP API instead of scraping.
    #[arg(long, value_name = "URL", env = "EGRESS_SCALER_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// CPU limit of one egress pod, in cores [default: 4].
    #[arg(long, env = "EGRESS_SCALER_POD_CPU")]
    pub pod_cpu: Option<f64>,
    /// The egress max_cpu_utilization [default: 0.8].
    #[arg(long, env = "EGRESS_SCALER_MAX_CPU_UTILIZATION")]
    pub max_cpu_utilization: Option<f64>,
    /// Cost table override, KIND=CORES (repeatable).
    #[arg(
        long = "cost",
        value_name = "KIND=CORES",
        env = "EGRESS_SCALER_COST",
        value_delimiter = ','
    )]
    pub cost: Vec<String>,
    /// Idle pods to keep ready [default: 0].
    #[arg(long, env = "EGRESS_SCALER_WARM_POOL")]
    pub warm_pool: Option<u32>,
    /// Lower clamp of desired replicas [default: 0].
    #[arg(long, env = "EGRESS_SCALER_MIN_REPLICAS")]
    pub min_replicas: Option<u32>,
    /// Upper clamp of desired replicas [default: 100].
    #[arg(long, env = "EGRESS_SCALER_MAX_REPLICAS")]
    pub max_replicas: Option<u32>,
    /// A queue this process serves (repeatable); the first is the default [default: default].
    #[arg(long, env = "EGRESS_SCALER_QUEUE", value_delimiter = ',')]
    pub queue: Vec<String>,
    /// livekit-server URL for the dispatcher (dispatcher off without it).
    #[arg(long, env = "LIVEKIT_URL")]
    pub livekit_url: Option<String>,
    /// Seconds between two refreshes of the fleet snapshot [default: 2].
    #[arg(long, env = "EGRESS_SCALER_FLEET_REFRESH_SECONDS")]
    pub fleet_refresh_seconds: Option<f64>,
    /// Timeout of one egress metrics scrape, seconds [default: 1].
    #[arg(long, env = "EGRESS_SCALER_SCRAPE_TIMEOUT_SECONDS")]
    pub scrape_timeout_seconds: Option<f64>,
    /// Age after which the fleet snapshot is too old to scale on, seconds [default: 15].
    #[arg(long, env = "EGRESS_SCALER_FLEET_STALE_SECONDS")]
    pub fleet_stale_seconds: Option<f64>,
    /// How long a discovered egress pod may go without answering a scrape before it counts
    /// as unknown (counted, no capacity), seconds [default: 30].
    #[arg(long, env = "EGRESS_SCALER_FLEET_START_GRACE_SECONDS")]
    pub fleet_start_grace_seconds: Option<f64>,
    /// PEM certificate chain: the gRPC listener serves TLS (re-read when the file changes).
    #[arg(long, value_name = "FILE", env = "EGRESS_SCALER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "EGRESS_SCALER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: gRPC clients must present a certificate it signed (mutual TLS).
    #[arg(long, value_name = "FILE", env = "EGRESS_SCALER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Dispatch order: strict FIFO, or backfill smaller jobs past a head that fits nowhere
    /// [default: strict].
    #[arg(long, value_enum, env = "EGRESS_SCALER_ORDER")]
    pub order: Option<Order>,
    /// Dispatcher lease time: a standby takes over within it when the leader dies, seconds
    /// [default: 10].
    #[arg(long, env = "EGRESS_SCALER_LEASE_SECONDS")]
    pub lease_seconds: Option<f64>,
    /// How long a start answered `not_found` (room not created yet) is retried before the
    /// ticket fails, seconds [default: 60].
    #[arg(long, env = "EGRESS_SCALER_NOT_FOUND_RETRY_SECONDS")]
    pub not_found_retry_seconds: Option<f64>,
    /// Start calls to livekit-server in flight at once, per queue [default: 64].
    #[arg(long, env = "EGRESS_SCALER_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u32>,
    /// How long the Twirp front door holds a start call before answering `unavailable`
    /// (the LiveKit SDKs give up after 10 s by default), seconds [default: 8].
    #[arg(long, env = "EGRESS_SCALER_HOLD_SECONDS")]
    pub hold_seconds: Option<f64>,
    /// Scale ahead of the arrival pattern learnt per time-of-week bucket: auto or off
    /// [default: auto].
    #[arg(long, value_name = "auto|off", env = "EGRESS_SCALER_PREWARM")]
    pub prewarm: Option<Prewarm>,
    /// How far ahead pre-warm looks: cold start + HPA sync + margin, seconds [default: 60].
    #[arg(long, env = "EGRESS_SCALER_PREWARM_LEAD_SECONDS")]
    pub prewarm_lead_seconds: Option<f64>,
    /// Scale-up assist: raise this Deployment's replicas through the scale subresource as
    /// soon as the default queue's desired count exceeds them (never lowers them).
    #[arg(
        long,
        value_name = "NAMESPACE/DEPLOYMENT",
        env = "EGRESS_SCALER_KUBE_SCALE"
    )]
    pub kube_scale: Option<String>,
    /// Queue an egress of this kind for every room_started webhook.
    #[arg(long, value_name = "KIND", env = "EGRESS_SCALER_AUTO_RECORD")]
    pub auto_record: Option<EgressKind>,
    /// With --auto-record: only rooms whose whole name matches this regular expression.
    #[arg(long, value_name = "REGEX", env = "EGRESS_SCALER_AUTO_RECORD_ROOMS")]
    pub auto_record_rooms: Option<String>,
    /// With --auto-record: the kind's request as protobuf JSON, without the room name
    /// (outputs, layout, ...).
    #[arg(long, value_name = "FILE", env = "EGRESS_SCALER_AUTO_RECORD_TEMPLATE")]
    pub auto_record_template: Option<PathBuf>,
}

/// Flags of `enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Base URL of a running `egress-scaler serve` HTTP API.
    #[arg(
        long,
        env = "EGRESS_SCALER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Egress kind: room_composite, audio_room_composite, web, audio_web, participant, track_composite, track.
    #[arg(long)]
    pub kind: EgressKind,
    /// Room to record.
    #[arg(long = "room")]
    pub room_name: String,
    /// File with the LiveKit start request as protobuf JSON (`-` for standard input).
    #[arg(long)]
    pub request: Option<PathBuf>,
    /// De-duplication key [default: kind and room name].
    #[arg(long)]
    pub dedup_key: Option<String>,
    /// Queue [default: the server's default queue].
    #[arg(long)]
    pub queue: Option<String>,
}

/// Flags of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Base URL of a running `egress-scaler serve` HTTP API.
    #[arg(
        long,
        env = "EGRESS_SCALER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `simulate`.
#[derive(Debug, Default, Args)]
pub struct SimulateArgs {
    /// A built-in trace (business-day, burst, night, mixed, work-week, random) or a CSV file
    /// `arrival_seconds,kind,duration_seconds,room` (repeatable) [default: every built-in].
    #[arg(long, value_name = "NAME|FILE")]
    pub trace: Vec<String>,
    /// Policies to compare (repeatable): egress-scaler, egress-scaler+prewarm,
    /// egress-scaler+assist, egress-scaler+prewarm+assist, hpa-cpu, keda-prometheus-available,
    /// keda-redis-list, oracle [default: all].
    #[arg(long, value_name = "POLICY", value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Seed of the built-in traces.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds from pod creation until it takes jobs.
    #[arg(long, default_value_t = 30.0)]
    pub cold_start: f64,
    /// egress-scaler's warm pool.
    #[arg(long, default_value_t = 0)]
    pub warm_pool: u32,
    /// CPU limit of one egress pod, in cores [default: 4].
    #[arg(long)]
    pub pod_cpu: Option<f64>,
    /// The egress max_cpu_utilization [default: 0.8].
    #[arg(long)]
    pub max_cpu_utilization: Option<f64>,
    /// Cost table override, KIND=CORES (repeatable).
    #[arg(long = "cost", value_name = "KIND=CORES", value_delimiter = ',')]
    pub cost: Vec<String>,
    /// The HPA ceiling of every policy, and egress-scaler's `--max-replicas` [default: the
    /// ScaledObject's maxReplicaCount, 40 as shipped].
    #[arg(long)]
    pub max_replicas: Option<u32>,
    /// The egress-scaler policy's ScaledObject [default: the shipped keda/scaledobject.yaml].
    #[arg(long, value_name = "FILE")]
    pub scaled_object: Option<PathBuf>,
    /// The cluster's HPA tolerance (`--horizontal-pod-autoscaler-tolerance`).
    #[arg(long, default_value_t = 0.1)]
    pub hpa_tolerance: f64,
    /// The cluster ignores a ScaledObject's `behavior.*.tolerance` (Kubernetes before 1.35
    /// without the HPAConfigurableTolerance gate, or KEDA before 2.18): --hpa-tolerance applies.
    #[arg(long)]
    pub no_per_hpa_tolerance: bool,
    /// Seconds `FROM-UNTIL` in which the scaler's reads fail (Redis or the fleet unavailable),
    /// to play KEDA's fallback (repeatable).
    #[arg(long, value_name = "FROM-UNTIL")]
    pub scaler_outage: Vec<String>,
    /// The HPA controller's sync period, seconds (a cluster-wide setting).
    #[arg(long, default_value_t = 15.0)]
    pub hpa_sync: f64,
    /// livekit-server's wait for a pod before it answers 503, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub no_capacity_wait: f64,
    /// hpa-cpu's target CPU utilization, 0..1.
    #[arg(long, default_value_t = 0.6)]
    pub cpu_target: f64,
    /// keda-prometheus-available's target of idle pods.
    #[arg(long, default_value_t = 1)]
    pub available_target: u32,
    /// Write CSV, JSON and SVG files here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Try egress-scaler with each setting: `warm-pool=0..3`, `cold-start=15,30,60`,
    /// `scale-down=60,300` (seconds an unneeded pod is kept) (repeatable; every combination).
    #[arg(long, value_name = "SETTING=VALUES")]
    pub sweep: Vec<String>,
    /// With --sweep: name the cheapest setting whose p99 wait is under this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub p99_under: Option<f64>,
}

impl SimulateArgs {
    /// Validates the flags into a [`SimulateConfig`](crate::simulate::SimulateConfig).
    pub fn resolve(self) -> Result<crate::simulate::SimulateConfig, ConfigError> {
        use crate::simulate::{BuiltIn, Policy, SimOptions, Sweep, TraceSource};

        let traces = if self.trace.is_empty() {
            BuiltIn::ALL.into_iter().map(TraceSource::BuiltIn).collect()
        } else {
            self.trace
                .iter()
                .map(|name| match name.parse::<BuiltIn>() {
                    Ok(built_in) => Ok(TraceSource::BuiltIn(built_in)),
                    Err(_) if Path::new(name).is_file() => Ok(TraceSource::File(name.into())),
                    Err(_) => Err(invalid(
                        "--trace",
                        format!(
                            "{name:?} is neither a built-in trace (business-day, burst, night, mixed, work-week, random) nor a file"
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?
        };
        let mut policies = if self.policy.is_empty() {
            Policy::ALL.to_vec()
        } else {
            self.policy
                .iter()
                .map(|name| name.parse::<Policy>().map_err(|e| invalid("--policy", e)))
                .collect::<Result<Vec<_>, _>>()?
        };
        policies.sort();
        policies.dedup();

        let mut options = SimOptions::default();
        apply_pod_flags(
            &mut options.settings,
            self.pod_cpu,
            self.max_cpu_utilization,
            BTreeMap::new(),
            &self.cost,
        )?;
        options.settings.warm_pool = self.warm_pool;
        if let Some(path) = &self.scaled_object {
            let text = std::fs::read_to_string(path).map_err(|error| {
                invalid(
                    "--scaled-object",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            options.egress_scaler =
                crate::kube::ScaledObject::from_yaml(&text).map_err(|error| {
                    invalid("--scaled-object", format!("{}: {error}", path.display()))
                })?;
        }
        let ceiling = self
            .max_replicas
            .unwrap_or(options.egress_scaler.keda.max_replicas);
        if ceiling == 0 {
            return Err(invalid("--max-replicas", "must be at least 1"));
        }
        options.ceiling = ceiling;
        options.settings.max_replicas = ceiling;
        if !(0.0..1.0).contains(&self.hpa_tolerance) {
            return Err(invalid(
                "--hpa-tolerance",
                format!("{} is not in [0, 1)", self.hpa_tolerance),
            ));
        }
        options.tolerance = crate::kube::ClusterTolerance {
            default: self.hpa_tolerance,
            per_hpa: !self.no_per_hpa_tolerance,
        };
        for span in &self.scaler_outage {
            let parsed = span.split_once('-').and_then(|(from, until)| {
                Some((
                    from.trim().parse::<f64>().ok()?,
                    until.trim().parse::<f64>().ok()?,
                ))
            });
            let Some((from, until)) = parsed.filter(|(from, until)| from < until) else {
                return Err(invalid(
                    "--scaler-outage",
                    format!("{span:?} is not FROM-UNTIL seconds with FROM < UNTIL"),
                ));
            };
            options.scaler_outages.push((
                sim_millis("--scaler-outage", from, true)?,
                sim_millis("--scaler-outage", until, true)?,
            ));
        }
        options.pod_uid_seed = self.seed;
        options.cold_start = sim_millis("--cold-start", self.cold_start, true)?;
        options.hpa_sync = sim_millis("--hpa-sync", self.hpa_sync, false)?;
        options.no_capacity_wait = sim_millis("--no-capacity-wait", self.no_capacity_wait, true)?;
        if !(self.cpu_target > 0.0 && self.cpu_target <= 1.0) {
            return Err(invalid(
                "--cpu-target",
                format!("{} must be greater than 0 and at most 1", self.cpu_target),
            ));
        }
        options.cpu_target = self.cpu_target;
        options.available_target = self.available_target;

        let sweep = if self.sweep.is_empty() {
            None
        } else {
            let mut sweep = Sweep::default();
            for spec in &self.sweep {
                let (name, values) = spec
                    .split_once('=')
                    .ok_or_else(|| invalid("--sweep", format!("{spec:?} is not SETTING=VALUES")))?;
                let numbers = sweep_values(values)
                    .map_err(|reason| invalid("--sweep", format!("{spec:?}: {reason}")))?;
                match name.trim() {
                    "warm-pool" => {
                        sweep.warm_pools = numbers
                            .iter()
                            .map(|n| {
                                if n.fract() == 0.0 && (0.0..=1000.0).contains(n) {
                                    Ok(*n as u32)
                                } else {
                                    Err(invalid(
                                        "--sweep",
                                        format!("{spec:?}: a warm pool is a whole number of pods"),
                                    ))
                                }
                            })
                            .collect::<Result<_, _>>()?
                    }
                    "cold-start" => {
                        sweep.cold_starts = numbers
                            .iter()
                            .map(|n| sim_millis("--sweep", *n, true))
                            .collect::<Result<_, _>>()?
                    }
                    "scale-down" => {
                        sweep.scale_downs = numbers
                            .iter()
                            .map(|n| sim_millis("--sweep", *n, true))
                            .collect::<Result<_, _>>()?
                    }
                    other => {
                        return Err(invalid(
                            "--sweep",
                            format!(
                                "unknown setting {other:?} (expected warm-pool, cold-start or scale-down)"
                            ),
                        ));
                    }
                }
            }
            Some(sweep)
        };
        if let Some(goal) = self.p99_under {
            if sweep.is_none() {
                return Err(invalid("--p99-under", "needs --sweep"));
            }
            if !(goal.is_finite() && goal > 0.0) {
                return Err(invalid(
                    "--p99-under",
                    format!("{goal} is not a positive number of seconds"),
                ));
            }
        }
        Ok(crate::simulate::SimulateConfig {
            traces,
            policies,
            seed: self.seed,
            options,
            out_dir: self.out,
            sweep,
            p99_under: self.p99_under,
        })
    }
}

/// Flags of `demo`; every one has a default, so `egress-scaler demo` alone plays the show.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Rooms that ask for a recording, 1 to 100.
    #[arg(long, default_value_t = 24)]
    pub rooms: u32,
    /// Seconds a new egress pod takes to become ready, 0 to 10.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub cold_start: f64,
    /// Seed of the random plan (arrival times, duplicate requests, recording lengths)
    /// [default: a new one, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// One line per second, no redrawing (automatic when standard output is not a terminal).
    #[arg(long)]
    pub plain: bool,
}

/// What `demo` plays, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    /// Rooms that ask for a recording.
    pub rooms: u32,
    /// How long a new egress pod takes to become ready.
    pub cold_start: Duration,
    /// Seed of the random plan.
    pub seed: u64,
    /// No redrawing in place.
    pub plain: bool,
}

/// Most rooms `demo` plays: one egress pod each must fit on a small machine and in 60 s.
pub const DEMO_MAX_ROOMS: u32 = 100;
/// Longest egress pod cold start `demo` accepts, in seconds, so that it ends within 60 s.
pub const DEMO_MAX_COLD_START_SECONDS: f64 = 10.0;

impl DemoArgs {
    /// Checks the flags; `seed` picks a fresh seed when none was given.
    pub fn resolve(self, seed: impl FnOnce() -> u64) -> Result<DemoConfig, ConfigError> {
        if !(1..=DEMO_MAX_ROOMS).contains(&self.rooms) {
            return Err(invalid(
                "--rooms",
                format!("{} is not between 1 and {DEMO_MAX_ROOMS}", self.rooms),
            ));
        }
        if !(self.cold_start.is_finite()
            && (0.0..=DEMO_MAX_COLD_START_SECONDS).contains(&self.cold_start))
        {
            return Err(invalid(
                "--cold-start",
                format!(
                    "{} is not a number of seconds between 0 and {DEMO_MAX_COLD_START_SECONDS}",
                    self.cold_start
                ),
            ));
        }
        Ok(DemoConfig {
            rooms: self.rooms,
            cold_start: Duration::from_secs_f64(self.cold_start),
            seed: self.seed.unwrap_or_else(seed),
            plain: self.plain,
        })
    }
}

/// Seconds of virtual time as milliseconds; zero allowed where `zero_ok`.
fn sim_millis(setting: &'static str, seconds: f64, zero_ok: bool) -> Result<u64, ConfigError> {
    if seconds.is_finite() && seconds <= 86_400.0 && (seconds > 0.0 || (zero_ok && seconds == 0.0))
    {
        Ok((seconds * 1000.0).round() as u64)
    } else {
        Err(invalid(
            setting,
            format!("{seconds} is not a number of seconds from 0 to 86400"),
        ))
    }
}

/// `A..B` (whole numbers, both ends included) or `A,B,C`.
fn sweep_values(text: &str) -> Result<Vec<f64>, String> {
    if let Some((from, to)) = text.split_once("..") {
        let from: u32 = from
            .trim()
            .parse()
            .map_err(|_| format!("{from:?} is not a whole number"))?;
        let to: u32 = to
            .trim()
            .trim_start_matches('=')
            .parse()
            .map_err(|_| format!("{to:?} is not a whole number"))?;
        if from > to || to - from > 100 {
            return Err(format!("{from}..{to} is not a range of at most 100 steps"));
        }
        return Ok((from..=to).map(f64::from).collect());
    }
    text.split(',')
        .map(|value| {
            value
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{value:?} is not a number"))
        })
        .collect()
}

/// The `--config` file: the `serve` settings with `_` in place of `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    redis_url: Option<String>,
    grpc_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    egress_metrics: Option<Vec<String>>,
    egress_dns: Option<String>,
    prometheus_url: Option<String>,
    pod_cpu: Option<f64>,
    max_cpu_utilization: Option<f64>,
    cost: Option<BTreeMap<String, f64>>,
    warm_pool: Option<u32>,
    min_replicas: Option<u32>,
    max_replicas: Option<u32>,
    queue: Option<QueueList>,
    livekit_url: Option<String>,
    fleet_refresh_seconds: Option<f64>,
    scrape_timeout_seconds: Option<f64>,
    fleet_stale_seconds: Option<f64>,
    fleet_start_grace_seconds: Option<f64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    order: Option<Order>,
    lease_seconds: Option<f64>,
    not_found_retry_seconds: Option<f64>,
    max_in_flight: Option<u32>,
    hold_seconds: Option<f64>,
    auto_record: Option<String>,
    auto_record_rooms: Option<String>,
    auto_record_template: Option<PathBuf>,
    prewarm: Option<String>,
    prewarm_lead_seconds: Option<f64>,
    kube_scale: Option<String>,
}

/// `queue` in the `--config` file: one name, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum QueueList {
    One(String),
    Many(Vec<String>),
}

/// LiveKit API key and secret (from the environment only, never flags).
#[derive(Clone)]
pub struct ApiCredentials {
    /// `LIVEKIT_API_KEY`.
    pub key: String,
    /// `LIVEKIT_API_SECRET`.
    pub secret: String,
}

impl std::fmt::Debug for ApiCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCredentials")
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Redis URL.
    pub redis_url: String,
    /// KEDA gRPC address.
    pub grpc_listen: SocketAddr,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// Where the fleet is observed.
    pub fleet_source: FleetSource,
    /// How the fleet is observed.
    pub fleet_options: FleetOptions,
    /// Replica model settings (process defaults; trigger metadata may override some).
    pub settings: Settings,
    /// The queues served; the first is used when a request or trigger names none.
    pub queues: ServedQueues,
    /// livekit-server URL, when the dispatcher should run.
    pub livekit_url: Option<String>,
    /// API credentials: HTTP API auth, webhook verification and the dispatcher's Twirp calls.
    pub credentials: Option<ApiCredentials>,
    /// TLS of the gRPC listener; plaintext when `None`.
    pub grpc_tls: Option<TlsSettings>,
    /// Dispatch order.
    pub order: Order,
    /// Dispatcher lease time.
    pub lease: Duration,
    /// How long a start answered `not_found` is retried.
    pub not_found_retry: Duration,
    /// Start calls in flight at once, per queue.
    pub max_in_flight: usize,
    /// How long the Twirp front door holds a start call.
    pub hold: Duration,
    /// Limit on one call to livekit-server (no flag: above its 18-27 s no-capacity answer;
    /// tests shorten it).
    pub livekit_call_timeout: Duration,
    /// Recording of every new room, from `room_started` webhooks.
    pub auto_record: Option<AutoRecord>,
    /// This process's name in the dispatcher lease (`HOSTNAME`, the pod name in Kubernetes).
    pub holder_name: String,
    /// How far a Prometheus fleet source lags behind the pods (a scrape interval): the
    /// dispatcher counts its own starts that long.
    pub prometheus_lag: Duration,
    /// The scale-up assist's Deployment, when on.
    pub kube_scale: Option<KubeScaleConfig>,
}

/// The most start calls in flight per queue that `--max-in-flight` accepts.
pub const MAX_IN_FLIGHT: u32 = 1024;

/// Default hold of a Twirp start call: 2 s short of the 10 s the Node, Python, Go and Rust
/// SDKs wait by default, so that the answer (`unavailable` at worst) reaches them first.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(8);

/// How far a Prometheus server's view of the egress pods lags: one scrape interval, at most.
pub const DEFAULT_PROMETHEUS_LAG: Duration = Duration::from_secs(30);

/// A setting has a value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The flag or key, as the operator wrote it.
    pub setting: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Reads the environment the way `serve` does, so tests can inject one.
pub trait Environment {
    /// The variable's value, when set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|value| !value.is_empty())
    }
}

impl ServeArgs {
    /// Merges flags, environment and the config file into a validated [`ServeConfig`].
    pub fn resolve(self, env: &dyn Environment) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };

        let redis_url = self
            .redis_url
            .or_else(|| env.var("REDIS_URL"))
            .or(file.redis_url)
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        if crate::queue::is_sentinel_url(&redis_url) {
            // The error names what is wrong, never the URL: it may hold passwords.
            crate::queue::SentinelUrl::parse(&redis_url)
                .map_err(|error| invalid("--redis-url", format!("the Sentinel URL {error}")))?;
        } else if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
            return Err(invalid(
                "--redis-url",
                format!(
                    "{redis_url:?} must start with redis://, rediss://, redis+sentinel:// or \
                     rediss+sentinel://"
                ),
            ));
        }

        let grpc_listen = self
            .grpc_listen
            .or(file.grpc_listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9090)));
        let http_listen = self
            .http_listen
            .or(file.http_listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));

        let egress_metrics = if self.egress_metrics.is_empty() {
            file.egress_metrics.unwrap_or_default()
        } else {
            self.egress_metrics
        };
        let fleet_source = fleet_source(
            egress_metrics,
            self.egress_dns.or(file.egress_dns),
            self.prometheus_url.or(file.prometheus_url),
        )?;

        let mut fleet_options = FleetOptions::default();
        if let Some(seconds) = self.fleet_refresh_seconds.or(file.fleet_refresh_seconds) {
            fleet_options.refresh_interval = positive_seconds("--fleet-refresh-seconds", seconds)?;
        }
        if let Some(seconds) = self.scrape_timeout_seconds.or(file.scrape_timeout_seconds) {
            fleet_options.scrape_timeout = positive_seconds("--scrape-timeout-seconds", seconds)?;
        }
        if let Some(seconds) = self.fleet_stale_seconds.or(file.fleet_stale_seconds) {
            fleet_options.stale_after = positive_seconds("--fleet-stale-seconds", seconds)?;
        }
        if let Some(seconds) = self
            .fleet_start_grace_seconds
            .or(file.fleet_start_grace_seconds)
        {
            fleet_options.start_grace = positive_seconds("--fleet-start-grace-seconds", seconds)?;
        }
        if fleet_options.stale_after < fleet_options.refresh_interval {
            return Err(invalid(
                "--fleet-stale-seconds",
                "must be at least --fleet-refresh-seconds",
            ));
        }

        let mut settings = Settings::default();
        apply_pod_flags(
            &mut settings,
            self.pod_cpu.or(file.pod_cpu),
            self.max_cpu_utilization.or(file.max_cpu_utilization),
            file.cost.unwrap_or_default(),
            &self.cost,
        )?;
        settings.warm_pool = self.warm_pool.or(file.warm_pool).unwrap_or(0);
        settings.min_replicas = self.min_replicas.or(file.min_replicas).unwrap_or(0);
        settings.max_replicas = self.max_replicas.or(file.max_replicas).unwrap_or(100);
        settings.prewarm = match (self.prewarm, file.prewarm) {
            (Some(prewarm), _) => prewarm,
            (None, Some(text)) => text
                .trim()
                .parse()
                .map_err(|reason| invalid("--prewarm", reason))?,
            (None, None) => Prewarm::Auto,
        };
        if let Some(seconds) = self.prewarm_lead_seconds.or(file.prewarm_lead_seconds) {
            let lead = positive_seconds("--prewarm-lead-seconds", seconds)?;
            if lead.as_millis() > u128::from(crate::prewarm::MAX_LEAD_MS) {
                return Err(invalid("--prewarm-lead-seconds", "must be at most 3600"));
            }
            settings.prewarm_lead_ms = lead.as_millis() as u64;
        }
        let kube_scale = self
            .kube_scale
            .or(file.kube_scale)
            .map(|text| {
                text.trim()
                    .parse::<DeploymentRef>()
                    .map(|deployment| KubeScaleConfig {
                        deployment,
                        api: KubeApi::InCluster,
                    })
                    .map_err(|error| invalid("--kube-scale", error.to_string()))
            })
            .transpose()?;
        if settings.min_replicas > settings.max_replicas {
            return Err(invalid(
                "--max-replicas",
                format!(
                    "{} is below --min-replicas {}",
                    settings.max_replicas, settings.min_replicas
                ),
            ));
        }

        let queue_names = if !self.queue.is_empty() {
            self.queue
        } else {
            match file.queue {
                Some(QueueList::One(name)) => vec![name],
                Some(QueueList::Many(names)) => names,
                None => vec!["default".to_owned()],
            }
        };
        let queues = queue_names
            .iter()
            .map(|name| name.trim().parse::<QueueName>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid("--queue", error.to_string()))?;
        let queues =
            ServedQueues::new(queues).map_err(|error| invalid("--queue", error.to_string()))?;

        let livekit_url = self.livekit_url.or(file.livekit_url);
        if let Some(url) = &livekit_url {
            let scheme_ok = ["http://", "https://", "ws://", "wss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            if !scheme_ok {
                return Err(invalid(
                    "--livekit-url",
                    format!("{url:?} must start with http://, https://, ws:// or wss://"),
                ));
            }
        }
        let credentials = match (env.var("LIVEKIT_API_KEY"), env.var("LIVEKIT_API_SECRET")) {
            (Some(key), Some(secret)) => Some(ApiCredentials { key, secret }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "LIVEKIT_API_SECRET",
                    "is empty while LIVEKIT_API_KEY is set",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "LIVEKIT_API_KEY",
                    "is empty while LIVEKIT_API_SECRET is set",
                ));
            }
        };

        let grpc_tls = grpc_tls(
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_client_ca.or(file.tls_client_ca),
        )?;
        if livekit_url.is_some() {
            if credentials.is_none() {
                return Err(invalid(
                    "LIVEKIT_API_KEY",
                    "must be set, with LIVEKIT_API_SECRET, for the dispatcher of --livekit-url",
                ));
            }
            if matches!(fleet_source, FleetSource::None) {
                return Err(invalid(
                    "--livekit-url",
                    "the dispatcher needs a fleet source (--egress-metrics, --egress-dns or \
                     --prometheus-url): without one the fleet shows no capacity and nothing \
                     would ever start",
                ));
            }
        }
        let order = self.order.or(file.order).unwrap_or_default();
        let lease = match self.lease_seconds.or(file.lease_seconds) {
            Some(seconds) => positive_seconds("--lease-seconds", seconds)?,
            None => Duration::from_secs(10),
        };
        let not_found_retry = match self
            .not_found_retry_seconds
            .or(file.not_found_retry_seconds)
        {
            Some(seconds) => positive_seconds("--not-found-retry-seconds", seconds)?,
            None => Duration::from_secs(60),
        };
        let max_in_flight = match self.max_in_flight.or(file.max_in_flight) {
            Some(calls @ 1..=MAX_IN_FLIGHT) => calls as usize,
            Some(calls) => {
                return Err(invalid(
                    "--max-in-flight",
                    format!("{calls} is not between 1 and {MAX_IN_FLIGHT}"),
                ));
            }
            None => DispatchOptions::default().max_in_flight,
        };
        let hold = match self.hold_seconds.or(file.hold_seconds) {
            Some(seconds) => positive_seconds("--hold-seconds", seconds)?,
            None => DEFAULT_HOLD,
        };
        let auto_record_kind = match self.auto_record {
            Some(kind) => Some(kind),
            None => file
                .auto_record
                .map(|kind| {
                    kind.parse::<EgressKind>()
                        .map_err(|error| invalid("--auto-record", error.to_string()))
                })
                .transpose()?,
        };
        let auto_record = auto_record_settings(
            auto_record_kind,
            self.auto_record_rooms.or(file.auto_record_rooms),
            self.auto_record_template.or(file.auto_record_template),
            credentials.is_some(),
        )?;
        let holder_name = env
            .var("HOSTNAME")
            .unwrap_or_else(|| "egress-scaler".to_owned());

        Ok(ServeConfig {
            redis_url,
            grpc_listen,
            http_listen,
            fleet_source,
            fleet_options,
            settings,
            queues,
            livekit_url,
            credentials,
            grpc_tls,
            order,
            lease,
            not_found_retry,
            max_in_flight,
            hold,
            livekit_call_timeout: DEFAULT_REQUEST_TIMEOUT,
            auto_record,
            holder_name,
            prometheus_lag: DEFAULT_PROMETHEUS_LAG,
            kube_scale,
        })
    }
}

/// The gRPC TLS files, checked now so that a bad one stops `serve` before it binds.
fn grpc_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let settings = match (cert, key, client_ca) {
        (None, None, None) => return Ok(None),
        (Some(cert), Some(key), client_ca) => TlsSettings {
            cert,
            key,
            client_ca,
            reload_interval: crate::tls::DEFAULT_RELOAD_INTERVAL,
        },
        (None, Some(_), _) => return Err(invalid("--tls-key", "needs --tls-cert")),
        (Some(_), None, _) => return Err(invalid("--tls-cert", "needs --tls-key")),
        (None, None, Some(_)) => {
            return Err(invalid(
                "--tls-client-ca",
                "needs --tls-cert and --tls-key (client certificates are checked over TLS)",
            ));
        }
    };
    settings
        .load()
        .map_err(|error| invalid(error.file.flag(), error.to_string()))?;
    Ok(Some(settings))
}

/// Validates the auto-record settings: the template must make a valid request of the kind
/// for any room, so that a bad file stops `serve` rather than every room's recording.
fn auto_record_settings(
    kind: Option<EgressKind>,
    rooms: Option<String>,
    template: Option<PathBuf>,
    have_credentials: bool,
) -> Result<Option<AutoRecord>, ConfigError> {
    let Some(kind) = kind else {
        if rooms.is_some() {
            return Err(invalid(
                "--auto-record-rooms",
                "is set without --auto-record",
            ));
        }
        if template.is_some() {
            return Err(invalid(
                "--auto-record-template",
                "is set without --auto-record",
            ));
        }
        return Ok(None);
    };
    if !have_credentials {
        return Err(invalid(
            "--auto-record",
            "needs LIVEKIT_API_KEY and LIVEKIT_API_SECRET to verify the room_started webhooks",
        ));
    }
    let rooms = rooms
        .map(|pattern| {
            regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|error| invalid("--auto-record-rooms", error.to_string()))
        })
        .transpose()?;
    let (setting, template) = match template {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|error| {
                invalid(
                    "--auto-record-template",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|error| {
                invalid(
                    "--auto-record-template",
                    format!("{} is not JSON: {error}", path.display()),
                )
            })?;
            let names_room = ["roomName", "room_name"].iter().any(|key| {
                value
                    .get(key)
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| !v.is_empty())
            });
            if names_room {
                return Err(invalid(
                    "--auto-record-template",
                    "must not set the room name: it is each started room's",
                ));
            }
            ("--auto-record-template", Some(value))
        }
        None => ("--auto-record", None),
    };
    StartRequest::parse(kind, "auto-record-check", template.clone())
        .map_err(|error| invalid(setting, error.to_string()))?;
    Ok(Some(AutoRecord {
        kind,
        rooms,
        template,
    }))
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        invalid(
            "--config",
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    toml::from_str(&text).map_err(|error| {
        invalid(
            "--config",
            format!("{}: {}", path.display(), error.message()),
        )
    })
}

/// Pod CPU, `max_cpu_utilization` and cost overrides (file first, then `KIND=CORES` flags),
/// shared by `serve` and `simulate`.
fn apply_pod_flags(
    settings: &mut Settings,
    pod_cpu: Option<f64>,
    max_cpu_utilization: Option<f64>,
    file_costs: BTreeMap<String, f64>,
    cost_flags: &[String],
) -> Result<(), ConfigError> {
    if let Some(cores) = pod_cpu {
        settings.pod_cpu = cores_to_millicores(cores)
            .filter(|m| *m > 0)
            .ok_or_else(|| {
                invalid(
                    "--pod-cpu",
                    format!("{cores} is not a positive number of cores"),
                )
            })?;
    }
    if let Some(u) = max_cpu_utilization {
        if !(u > 0.0 && u <= 1.0) {
            return Err(invalid(
                "--max-cpu-utilization",
                format!("{u} must be greater than 0 and at most 1"),
            ));
        }
        settings.max_cpu_utilization = u;
    }
    for (kind, cores) in file_costs {
        set_cost(settings, &kind, cores)?;
    }
    for pair in cost_flags {
        let (kind, cores) = pair
            .split_once('=')
            .ok_or_else(|| invalid("--cost", format!("{pair:?} is not KIND=CORES")))?;
        let cores: f64 = cores
            .trim()
            .parse()
            .map_err(|_| invalid("--cost", format!("{pair:?}: {cores:?} is not a number")))?;
        set_cost(settings, kind.trim(), cores)?;
    }
    Ok(())
}

fn set_cost(settings: &mut Settings, kind: &str, cores: f64) -> Result<(), ConfigError> {
    let kind: EgressKind = kind
        .parse()
        .map_err(|error: crate::model::UnknownKind| invalid("--cost", error.to_string()))?;
    let millicores = cores_to_millicores(cores).ok_or_else(|| {
        invalid(
            "--cost",
            format!("{kind}={cores}: the cost must be a number of cores >= 0"),
        )
    })?;
    settings.costs.set(kind, millicores);
    Ok(())
}

fn positive_seconds(setting: &'static str, seconds: f64) -> Result<Duration, ConfigError> {
    if seconds.is_finite() && seconds > 0.0 && seconds < 86_400.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(invalid(
            setting,
            format!("{seconds} is not a positive number of seconds"),
        ))
    }
}

fn fleet_source(
    egress_metrics: Vec<String>,
    egress_dns: Option<String>,
    prometheus_url: Option<String>,
) -> Result<FleetSource, ConfigError> {
    FleetSource::from_flags(
        &egress_metrics,
        egress_dns.as_deref(),
        prometheus_url.as_deref(),
    )
    .map_err(|error| {
        let setting = match &error {
            FleetConfigError::InvalidUrl { flag, .. } => flag,
            FleetConfigError::InvalidDns(_) => "--egress-dns",
            FleetConfigError::ConflictingSources | FleetConfigError::InvalidOption { .. } => {
                "--egress-metrics"
            }
        };
        invalid(setting, error.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnvironment(HashMap<&'static str, &'static str>);

    impl Environment for FakeEnvironment {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|value| value.to_string())
        }
    }

    fn resolve(
        args: &[&str],
        env: &[(&'static str, &'static str)],
    ) -> Result<ServeConfig, ConfigError> {
        let cli = Cli::try_parse_from(
            ["egress-scaler", "serve"]
                .iter()
                .chain(args.iter())
                .copied(),
        )
        .expect("flags parse");
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        serve.resolve(&FakeEnvironment(env.iter().copied().collect()))
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = resolve(&[], &[]).unwrap();
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(config.grpc_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(config.http_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(
            config.settings,
            Settings {
                prewarm: Prewarm::Auto,
                ..Settings::default()
            }
        );
        assert!(config.kube_scale.is_none());
        assert_eq!(config.queues.to_string(), "default");
        assert!(matches!(config.fleet_source, FleetSource::None));
        assert!(config.credentials.is_none());
        assert!(config.grpc_tls.is_none());
    }

    #[test]
    fn tls_flags_come_in_pairs_and_their_files_must_load() {
        let cases: [(&[&str], &str); 4] = [
            (&["--tls-key", "/k.pem"], "--tls-key"),
            (&["--tls-cert", "/c.pem"], "--tls-cert"),
            (&["--tls-client-ca", "/ca.pem"], "--tls-client-ca"),
            (
                &[
                    "--tls-cert",
                    "/nonexistent/c.pem",
                    "--tls-key",
                    "/nonexistent/k.pem",
                ],
                "--tls-cert",
            ),
        ];
        for (args, setting) in cases {
            let error = resolve(args, &[]).unwrap_err();
            assert_eq!(error.setting, setting, "{args:?}: {error}");
        }
    }

    #[test]
    fn cost_overrides_and_clamps_apply() {
        let config = resolve(
            &[
                "--cost",
                "track=0.25",
                "--cost",
                "web=2",
                "--warm-pool",
                "2",
                "--pod-cpu",
                "8",
            ],
            &[("REDIS_URL", "redis://10.0.0.1:6380")],
        )
        .unwrap();
        assert_eq!(config.settings.costs.cost(EgressKind::Track), 250);
        assert_eq!(config.settings.costs.cost(EgressKind::Web), 2000);
        assert_eq!(config.settings.warm_pool, 2);
        assert_eq!(config.settings.pod_cpu, 8000);
        assert_eq!(config.redis_url, "redis://10.0.0.1:6380");
    }

    #[test]
    fn the_start_grace_is_a_positive_number_of_seconds() {
        assert_eq!(
            resolve(&[], &[]).unwrap().fleet_options.start_grace,
            Duration::from_secs(30)
        );
        let config = resolve(&["--fleet-start-grace-seconds", "90"], &[]).unwrap();
        assert_eq!(config.fleet_options.start_grace, Duration::from_secs(90));
        let error = resolve(&["--fleet-start-grace-seconds", "0"], &[]).unwrap_err();
        assert_eq!(error.setting, "--fleet-start-grace-seconds");
    }

    #[test]
    fn a_sentinel_url_is_taken_and_a_bad_one_is_named_without_its_password() {
        let url = "rediss+sentinel://:pw@s1:26379,s2:26379/mymaster/0?wait_replicas=1";
        let config = resolve(&["--redis-url", url], &[]).unwrap();
        assert_eq!(config.redis_url, url);
        let error = resolve(&["--redis-url", "redis+sentinel://:pw@s1:26379"], &[]).unwrap_err();
        assert!(error.to_string().contains("names no master"), "{error}");
        assert!(!error.to_string().contains("pw"), "{error}");
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases: [(&[&str], &str); 10] = [
            (&["--cost", "video=4"], "--cost"),
            (&["--cost", "track"], "--cost"),
            (&["--max-cpu-utilization", "1.5"], "--max-cpu-utilization"),
            (
                &["--min-replicas", "5", "--max-replicas", "2"],
                "--max-replicas",
            ),
            (&["--queue", "a b"], "--queue"),
            (&["--queue", "a", "--queue", "a"], "--queue"),
            (&["--queue", "a,"], "--queue"),
            (&["--redis-url", "http://x"], "--redis-url"),
            (
                &["--redis-url", "redis+sentinel://:pw@s1:26379"],
                "--redis-url",
            ),
            (&["--egress-dns", "egress"], "--egress-dns"),
        ];
        for (args, setting) in cases {
            let error = resolve(args, &[]).unwrap_err();
            assert_eq!(error.setting, setting, "{args:?}: {error}");
        }
    }

    #[test]
    fn queue_is_repeatable_or_comma_separated_and_the_first_is_the_default() {
        let config = resolve(&["--queue", "rec", "--queue", "web"], &[]).unwrap();
        assert_eq!(config.queues.default_queue().as_str(), "rec");
        assert_eq!(config.queues.to_string(), "rec, web");
        let config = resolve(&["--queue", "web,rec"], &[]).unwrap();
        assert_eq!(config.queues.to_string(), "web, rec");
    }

    #[test]
    fn one_fleet_source_at_a_time() {
        let error = resolve(
            &[
                "--egress-metrics",
                "http://a/metrics",
                "--prometheus-url",
                "http://p:9090",
            ],
            &[],
        )
        .unwrap_err();
        assert!(error.to_string().contains("choose one fleet source"));
        let config = resolve(&["--egress-dns", "egress.ns.svc:9100"], &[]).unwrap();
        assert!(
            matches!(config.fleet_source, FleetSource::Dns { ref host, port: 9100 } if host == "egress.ns.svc")
        );
    }

    #[test]
    fn half_the_credentials_is_an_error() {
        let error = resolve(&[], &[("LIVEKIT_API_KEY", "key")]).unwrap_err();
        assert_eq!(error.setting, "LIVEKIT_API_SECRET");
        let config = resolve(
            &[],
            &[("LIVEKIT_API_KEY", "key"), ("LIVEKIT_API_SECRET", "s")],
        )
        .unwrap();
        assert!(!format!("{:?}", config.credentials).contains("\"s\""));
    }

    #[test]
    fn the_dispatcher_needs_credentials_and_a_fleet_source() {
        let creds = [("LIVEKIT_API_KEY", "key"), ("LIVEKIT_API_SECRET", "s")];
        let error = resolve(&["--livekit-url", "http://lk:7880"], &[]).unwrap_err();
        assert_eq!(error.setting, "LIVEKIT_API_KEY");
        let error = resolve(&["--livekit-url", "http://lk:7880"], &creds).unwrap_err();
        assert_eq!(error.setting, "--livekit-url");
        assert!(error.reason.contains("fleet source"), "{error}");
        let config = resolve(
            &[
                "--livekit-url",
                "ws://lk:7880",
                "--egress-dns",
                "egress.ns:9090",
                "--order",
                "backfill",
                "--lease-seconds",
                "5",
            ],
            &creds,
        )
        .unwrap();
        assert_eq!(config.order, Order::Backfill);
        assert_eq!(config.lease, Duration::from_secs(5));
        assert_eq!(config.not_found_retry, Duration::from_secs(60));
        let error = resolve(&["--lease-seconds", "0"], &[]).unwrap_err();
        assert_eq!(error.setting, "--lease-seconds");
    }

    #[test]
    fn auto_record_is_validated_at_startup() {
        let creds = [("LIVEKIT_API_KEY", "key"), ("LIVEKIT_API_SECRET", "s")];
        let error = resolve(&["--auto-record", "room_composite"], &[]).unwrap_err();
        assert_eq!(error.setting, "--auto-record");
        let error = resolve(&["--auto-record-rooms", "x"], &creds).unwrap_err();
        assert_eq!(error.setting, "--auto-record-rooms");
        let error = resolve(&["--auto-record", "track"], &creds).unwrap_err();
        assert_eq!(
            error.setting, "--auto-record",
            "a track egress needs a track id"
        );
        let error = resolve(
            &[
                "--auto-record",
                "room_composite",
                "--auto-record-rooms",
                "(",
            ],
            &creds,
        )
        .unwrap_err();
        assert_eq!(error.setting, "--auto-record-rooms");

        let dir = std::env::temp_dir().join(format!("egress-scaler-auto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("template.json");
        let path_str = path.to_str().unwrap();
        std::fs::write(
            &path,
            r#"{"layout": "grid", "fileOutputs": [{"filepath": "{room_name}.mp4"}]}"#,
        )
        .unwrap();
        let config = resolve(
            &[
                "--auto-record",
                "room_composite",
                "--auto-record-rooms",
                "team-.*",
                "--auto-record-template",
                path_str,
            ],
            &creds,
        )
        .unwrap();
        let auto = config.auto_record.unwrap();
        assert!(auto.records("team-a") && !auto.records("a-team-a"));
        std::fs::write(&path, r#"{"roomName": "fixed"}"#).unwrap();
        let error = resolve(
            &[
                "--auto-record",
                "room_composite",
                "--auto-record-template",
                path_str,
            ],
            &creds,
        )
        .unwrap_err();
        assert_eq!(error.setting, "--auto-record-template");
        std::fs::write(&path, r#"{"layout": 5}"#).unwrap();
        let error = resolve(
            &[
                "--auto-record",
                "room_composite",
                "--auto-record-template",
                path_str,
            ],
            &creds,
        )
        .unwrap_err();
        assert_eq!(error.setting, "--auto-record-template");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn demo(args: &[&str]) -> Result<DemoConfig, ConfigError> {
        let cli = Cli::try_parse_from(["egress-scaler", "demo"].iter().chain(args.iter()))
            .expect("flags parse");
        let Command::Demo(demo) = cli.command else {
            panic!("not demo")
        };
        demo.resolve(|| 42)
    }

    #[test]
    fn demo_flags_have_defaults_and_bounds() {
        assert_eq!(
            demo(&[]).unwrap(),
            DemoConfig {
                rooms: 24,
                cold_start: Duration::from_secs(3),
                seed: 42,
                plain: false,
            }
        );
        let config = demo(&[
            "--rooms",
            "100",
            "--cold-start",
            "0",
            "--seed",
            "7",
            "--plain",
        ])
        .unwrap();
        assert_eq!(
            (config.rooms, config.cold_start, config.seed, config.plain),
            (100, Duration::ZERO, 7, true)
        );
        assert_eq!(
            demo(&["--cold-start", "10"]).unwrap().cold_start.as_secs(),
            10
        );
        for (args, setting) in [
            (["--rooms", "0"], "--rooms"),
            (["--rooms", "101"], "--rooms"),
            (["--cold-start", "10.5"], "--cold-start"),
            (["--cold-start", "inf"], "--cold-start"),
        ] {
            assert_eq!(demo(&args).unwrap_err().setting, setting, "{args:?}");
        }
    }

    #[test]
    fn prewarm_and_kube_scale_flags_and_file_keys() {
        let config = resolve(
            &[
                "--prewarm",
                "off",
                "--prewarm-lead-seconds",
                "90",
                "--kube-scale",
                "livekit/egress",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.settings.prewarm, Prewarm::Off);
        assert_eq!(config.settings.prewarm_lead_ms, 90_000);
        let kube_scale = config.kube_scale.unwrap();
        assert_eq!(kube_scale.deployment.to_string(), "livekit/egress");
        assert_eq!(kube_scale.api, KubeApi::InCluster);
        for (args, setting) in [
            (
                &["--prewarm-lead-seconds", "3601"][..],
                "--prewarm-lead-seconds",
            ),
            (
                &["--prewarm-lead-seconds", "0"][..],
                "--prewarm-lead-seconds",
            ),
            (&["--kube-scale", "egress"][..], "--kube-scale"),
        ] {
            assert_eq!(resolve(args, &[]).unwrap_err().setting, setting, "{args:?}");
        }
        let dir =
            std::env::temp_dir().join(format!("egress-scaler-prewarm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "prewarm = \"off\"\nkube_scale = \"ns/egress\"\n").unwrap();
        let path_str = path.to_str().unwrap();
        let config = resolve(&["--config", path_str], &[]).unwrap();
        assert_eq!(config.settings.prewarm, Prewarm::Off);
        assert_eq!(config.kube_scale.unwrap().deployment.namespace, "ns");
        // The flag wins over the file.
        let config = resolve(&["--config", path_str, "--prewarm", "auto"], &[]).unwrap();
        assert_eq!(config.settings.prewarm, Prewarm::Auto);
        std::fs::write(&path, "prewarm = \"sometimes\"\n").unwrap();
        let error = resolve(&["--config", path_str], &[]).unwrap_err();
        assert_eq!(error.setting, "--prewarm");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_settings_are_below_flags() {
        let dir = std::env::temp_dir().join(format!("egress-scaler-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            "warm_pool = 3\nmax_replicas = 7\nqueue = \"rec\"\n[cost]\ntrack = 1.0\n",
        )
        .unwrap();
        let path_str = path.to_str().unwrap();
        let config = resolve(&["--config", path_str, "--max-replicas", "9"], &[]).unwrap();
        assert_eq!(config.settings.warm_pool, 3);
        assert_eq!(config.settings.max_replicas, 9);
        assert_eq!(config.queues.to_string(), "rec");
        assert_eq!(config.settings.costs.cost(EgressKind::Track), 1000);
        std::fs::write(&path, "queue = [\"rec\", \"web\"]\n").unwrap();
        let config = resolve(&["--config", path_str], &[]).unwrap();
        assert_eq!(config.queues.to_string(), "rec, web");
        std::fs::write(&path, "warm_pol = 3\n").unwrap();
        let error = resolve(&["--config", path_str], &[]).unwrap_err();
        assert_eq!(error.setting, "--config");
        assert!(error.reason.contains("warm_pol"), "{}", error.reason);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
