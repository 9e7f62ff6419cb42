//! `simulate`: scaling policies side by side on the same traffic, in virtual time.
//!
//! A discrete-event simulation of egress pods (DESIGN.md 2.1 admission and packing, a cold
//! start, a graceful drain), livekit-server's start calls (their launch and bid window, and
//! the retry ladder without capacity, timed like the stand-in's, DESIGN.md 2.3), and KEDA with
//! the HPA (DESIGN.md 2.4, 2.5) as [`crate::kube`] plays them. The `egress-scaler` policy asks [`crate::model::decide`], the
//! same function `serve` answers KEDA with, and its dispatcher places jobs with the same
//! [`crate::model::choose_pod`] rule.
//!
//! - [`trace`]: the arrivals, from a CSV file or a built-in synthetic trace.
//! - [`crate::kube`]: KEDA, the HPA and the ReplicaSet, the model the demo plays too.
//! - [`engine`]: the event loop of one policy on one trace.
//! - [`report`]: the table, CSV/JSON files and the SVG picture.

pub mod engine;
/// The Kubernetes model, under its earlier path.
pub use crate::kube;
pub mod report;
pub mod trace;

use std::fmt;
use std::str::FromStr;

use crate::model::Settings;
use crate::standin::StartTiming;

use crate::kube::{ClusterTolerance, Millis, ScaledObject};

pub use engine::{Outcome, run};
pub use trace::{BuiltIn, Trace};

/// A scaling policy: one row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    /// This project: the replica model, push activation, the queue and its dispatcher.
    EgressScaler,
    /// egress-scaler with pre-warm: it learns the arrival pattern as the trace plays (only
    /// from arrivals before the simulated now) and scales ahead of it.
    EgressScalerPrewarm,
    /// egress-scaler with the scale-up assist: it raises the Deployment's replicas at once.
    EgressScalerAssist,
    /// egress-scaler with both.
    EgressScalerPrewarmAssist,
    /// The LiveKit Helm chart's default: HPA on 60 % CPU, at least one pod, no queue.
    HpaCpu,
    /// KEDA's Prometheus scaler keeping `sum(livekit_egress_available)` at a target, no queue.
    KedaPrometheusAvailable,
    /// KEDA's Redis list scaler on the queue length, target 1 per pod, with the dispatcher.
    KedaRedisList,
    /// Knows every arrival in advance: each pod warm exactly when needed.
    Oracle,
}

impl Policy {
    /// Every policy, in table order.
    pub const ALL: [Policy; 8] = [
        Policy::EgressScaler,
        Policy::EgressScalerPrewarm,
        Policy::EgressScalerAssist,
        Policy::EgressScalerPrewarmAssist,
        Policy::HpaCpu,
        Policy::KedaPrometheusAvailable,
        Policy::KedaRedisList,
        Policy::Oracle,
    ];

    /// Its name on the command line and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::EgressScaler => "egress-scaler",
            Policy::EgressScalerPrewarm => "egress-scaler+prewarm",
            Policy::EgressScalerAssist => "egress-scaler+assist",
            Policy::EgressScalerPrewarmAssist => "egress-scaler+prewarm+assist",
            Policy::HpaCpu => "hpa-cpu",
            Policy::KedaPrometheusAvailable => "keda-prometheus-available",
            Policy::KedaRedisList => "keda-redis-list",
            Policy::Oracle => "oracle",
        }
    }

    /// Requests go through the queue and the dispatcher (else straight to livekit-server).
    pub fn queued(self) -> bool {
        self.is_egress_scaler() || self == Policy::KedaRedisList
    }

    /// One of the egress-scaler rows: the replica model behind KEDA and the HPA.
    pub fn is_egress_scaler(self) -> bool {
        matches!(
            self,
            Policy::EgressScaler
                | Policy::EgressScalerPrewarm
                | Policy::EgressScalerAssist
                | Policy::EgressScalerPrewarmAssist
        )
    }

    /// Scales ahead of the arrival pattern ([`crate::prewarm`]).
    pub fn prewarm(self) -> bool {
        matches!(
            self,
            Policy::EgressScalerPrewarm | Policy::EgressScalerPrewarmAssist
        )
    }

    /// Raises the Deployment's replicas at once ([`crate::kube_scale`]).
    pub fn assist(self) -> bool {
        matches!(
            self,
            Policy::EgressScalerAssist | Policy::EgressScalerPrewarmAssist
        )
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|policy| policy.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown policy {s:?} (expected one of egress-scaler, egress-scaler+prewarm, egress-scaler+assist, egress-scaler+prewarm+assist, hpa-cpu, keda-prometheus-available, keda-redis-list, oracle)"
                )
            })
    }
}

/// KEDA and HPA settings of one ScaledObject (the model's [`ScaledObject`]).
pub type ScaledObjectSettings = ScaledObject;

/// Everything a simulation run is set up with.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Pod CPU, `max_cpu_utilization`, cost table, warm pool and clamps (egress-scaler's model).
    pub settings: Settings,
    /// From pod creation to taking jobs.
    pub cold_start: Millis,
    /// The HPA controller's sync period (cluster-wide, 15 s by default).
    pub hpa_sync: Millis,
    /// How often egress-scaler's fleet snapshot is refreshed (`--fleet-refresh-seconds`).
    pub fleet_refresh: Millis,
    /// Prometheus scrape interval and metrics-server resolution for the anchor policies.
    pub metrics_interval: Millis,
    /// livekit-server's retry ladder is cut at the first step past this (the ladder itself
    /// answers 503 at 22.5 s with `start_timing`).
    pub no_capacity_wait: Millis,
    /// How long a start call takes: [`StartTiming::real`], as the livekit-server stand-in.
    pub start_timing: StartTiming,
    /// hpa-cpu's target utilization.
    pub cpu_target: f64,
    /// keda-prometheus-available's target of idle pods.
    pub available_target: u32,
    /// The ScaledObject of the egress-scaler policy: the shipped `keda/scaledobject.yaml`.
    pub egress_scaler: ScaledObject,
    /// The ScaledObject of the anchor KEDA policies: KEDA's defaults (poll 30 s, cooldown
    /// 300 s, no push, no fallback) and no `behavior`, as their documented examples run.
    pub anchor: ScaledObject,
    /// The HPA ceiling of every policy (the oracle has none): the shipped `maxReplicaCount`.
    pub ceiling: u32,
    /// How the cluster treats tolerances (`--hpa-tolerance`, `--no-per-hpa-tolerance`).
    pub tolerance: ClusterTolerance,
    /// Spans of virtual time in which the scaler's reads fail (Redis or the fleet
    /// unavailable): KEDA's fallback, or its keeping the count, plays out.
    pub scaler_outages: Vec<(Millis, Millis)>,
    /// Seed of the pods' UIDs, the ReplicaSet's tie-break.
    pub pod_uid_seed: u64,
    /// Resolution of the timeline.
    pub sample_every: Millis,
}

impl Default for SimOptions {
    fn default() -> Self {
        let shipped = ScaledObject::shipped();
        SimOptions {
            settings: Settings {
                // serve's --max-replicas in the shipped Deployment equals maxReplicaCount.
                max_replicas: shipped.keda.max_replicas,
                ..Settings::default()
            },
            cold_start: 30_000,
            hpa_sync: 15_000,
            fleet_refresh: 2_000,
            metrics_interval: 15_000,
            no_capacity_wait: 20_000,
            start_timing: StartTiming::real(),
            cpu_target: 0.6,
            available_target: 1,
            egress_scaler: shipped.clone(),
            anchor: ScaledObject::keda_defaults(),
            ceiling: shipped.keda.max_replicas,
            tolerance: ClusterTolerance::default(),
            scaler_outages: Vec::new(),
            pod_uid_seed: 1,
            sample_every: 10_000,
        }
    }
}

/// Where a trace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceSource {
    /// A built-in synthetic trace.
    BuiltIn(BuiltIn),
    /// A CSV file (`arrival_seconds,kind,duration_seconds,room`).
    File(std::path::PathBuf),
}

impl TraceSource {
    /// Reads or generates the trace.
    pub fn load(&self, seed: u64) -> anyhow::Result<Trace> {
        match self {
            TraceSource::BuiltIn(built_in) => Ok(built_in.generate(seed)),
            TraceSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
                let name = path
                    .file_stem()
                    .and_then(|stem| stem.to_str())
                    .unwrap_or("trace");
                Trace::from_csv(name, &text)
                    .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))
            }
        }
    }
}

/// The settings a sweep tries: every combination of warm pool and cold start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sweep {
    /// Warm pools to try (the `--warm-pool` value when empty).
    pub warm_pools: Vec<u32>,
    /// Cold starts to try (the `--cold-start` value when empty).
    pub cold_starts: Vec<Millis>,
    /// How long an unneeded pod is kept: the HPA's scale-down stabilization window and KEDA's
    /// cooldown together (the shipped ScaledObject's when empty).
    pub scale_downs: Vec<Millis>,
}

/// A whole `simulate` command, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateConfig {
    /// The traces, each with its own table.
    pub traces: Vec<TraceSource>,
    /// The policies, in table order.
    pub policies: Vec<Policy>,
    /// The seed of the built-in traces.
    pub seed: u64,
    /// Everything else.
    pub options: SimOptions,
    /// Where the CSV, JSON and SVG files go.
    pub out_dir: Option<std::path::PathBuf>,
    /// Settings to sweep for the egress-scaler policy.
    pub sweep: Option<Sweep>,
    /// The p99 wait goal the sweep answers for, seconds.
    pub p99_under: Option<f64>,
}

/// The results of one trace.
#[derive(Debug, Clone)]
pub struct TraceResult {
    /// The trace.
    pub trace: Trace,
    /// One row per policy.
    pub rows: Vec<report::Row>,
    /// One outcome per policy, same order.
    pub outcomes: Vec<Outcome>,
    /// The sweep's rows, when sweeping.
    pub sweep: Vec<report::Row>,
    /// The ceiling the trace needs: egress-scaler without one, when it is among the policies.
    pub ceiling_needed: Option<CeilingNeeded>,
}

/// What egress-scaler does on a trace without a ceiling: the answer to "what ceiling does this
/// traffic need".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CeilingNeeded {
    /// The ceiling of the run (`--max-replicas`, the ScaledObject's `maxReplicaCount`).
    pub ceiling: u32,
    /// Most pods egress-scaler ran at once without a ceiling: the least ceiling that holds no
    /// request back.
    pub pods: u32,
    /// p99 wait without a ceiling, seconds.
    pub wait_p99_seconds: f64,
}

impl fmt::Display for CeilingNeeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pods <= self.ceiling {
            "enough"
        } else {
            "too low: requests wait for recordings to end"
        };
        write!(
            f,
            "ceiling: egress-scaler without one runs up to {} pods at once (p99 wait {:.1} s); the ceiling here, {}, is {verdict}",
            self.pods, self.wait_p99_seconds, self.ceiling
        )
    }
}

/// Runs egress-scaler on `trace` with the ceiling lifted.
pub fn ceiling_needed(trace: &Trace, options: &SimOptions) -> CeilingNeeded {
    let mut uncapped = options.clone();
    uncapped.ceiling = UNCAPPED;
    uncapped.settings.max_replicas = UNCAPPED;
    uncapped.egress_scaler.keda.max_replicas = UNCAPPED;
    let outcome = run(trace, Policy::EgressScaler, &uncapped);
    CeilingNeeded {
        ceiling: options.ceiling,
        pods: outcome.peak_pods(),
        wait_p99_seconds: outcome.wait_percentile(99.0),
    }
}

/// A ceiling no trace reaches.
const UNCAPPED: u32 = 100_000;

/// Runs every policy (and the sweep) on `trace`, policies side by side on the two cores.
pub fn run_trace(trace: Trace, config: &SimulateConfig) -> TraceResult {
    let options = sample_resolution(&config.options, &trace);
    let cold_seconds = options.cold_start as f64 / 1000.0;
    let scale_down_seconds = options.egress_scaler.scale_down_window() as f64 / 1000.0;
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = config
            .policies
            .iter()
            .map(|&policy| {
                let (trace, options) = (&trace, &options);
                scope.spawn(move || run(trace, policy, options))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a simulation thread panicked"))
            .collect()
    });
    let requests = trace.arrivals.len();
    let mut rows: Vec<report::Row> = outcomes
        .iter()
        .map(|outcome| {
            let warm = if outcome.policy.is_egress_scaler() {
                options.settings.warm_pool
            } else {
                0
            };
            let mut row = report::Row::of(&trace.name, requests, warm, cold_seconds, outcome);
            row.scale_down_seconds = match outcome.policy {
                policy if policy.is_egress_scaler() => scale_down_seconds,
                Policy::HpaCpu => crate::kube::hpa::DEFAULT_DOWNSCALE_WINDOW as f64 / 1000.0,
                _ => options.anchor.scale_down_window() as f64 / 1000.0,
            };
            row
        })
        .collect();
    let oracle_hours = outcomes
        .iter()
        .find(|outcome| outcome.policy == Policy::Oracle)
        .map(Outcome::pod_hours)
        .unwrap_or_else(|| run(&trace, Policy::Oracle, &options).pod_hours());
    report::compare_to_oracle(&mut rows, oracle_hours);
    let ceiling_needed = config
        .policies
        .contains(&Policy::EgressScaler)
        .then(|| ceiling_needed(&trace, &options));

    let mut sweep_rows = Vec::new();
    if let Some(sweep) = &config.sweep {
        let warm_pools = if sweep.warm_pools.is_empty() {
            vec![options.settings.warm_pool]
        } else {
            sweep.warm_pools.clone()
        };
        let cold_starts = if sweep.cold_starts.is_empty() {
            vec![options.cold_start]
        } else {
            sweep.cold_starts.clone()
        };
        let scale_downs = if sweep.scale_downs.is_empty() {
            vec![options.egress_scaler.scale_down_window()]
        } else {
            sweep.scale_downs.clone()
        };
        let mut settings: Vec<(u32, Millis, Millis)> = Vec::new();
        for &scale_down in &scale_downs {
            for &cold in &cold_starts {
                for &warm in &warm_pools {
                    settings.push((warm, cold, scale_down));
                }
            }
        }
        sweep_rows = std::thread::scope(|scope| {
            let handles: Vec<_> = settings
                .iter()
                .map(|&(warm, cold, scale_down)| {
                    let mut options = options.clone();
                    options.settings.warm_pool = warm;
                    options.cold_start = cold;
                    if let Some(behavior) = options.egress_scaler.behavior.as_mut() {
                        behavior.scale_down.stabilization = scale_down;
                    }
                    options.egress_scaler.keda.cooldown = scale_down;
                    let trace = &trace;
                    scope.spawn(move || {
                        let outcome = run(trace, Policy::EgressScaler, &options);
                        let mut row = report::Row::of(
                            &trace.name,
                            requests,
                            warm,
                            cold as f64 / 1000.0,
                            &outcome,
                        );
                        row.scale_down_seconds = scale_down as f64 / 1000.0;
                        row
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("a simulation thread panicked"))
                .collect()
        });
        report::compare_to_oracle(&mut sweep_rows, oracle_hours);
    }
    TraceResult {
        trace,
        rows,
        outcomes,
        sweep: sweep_rows,
        ceiling_needed,
    }
}

/// How the table's cluster treats a ScaledObject's `tolerance`.
fn tolerance_note(tolerance: ClusterTolerance) -> String {
    if tolerance.per_hpa {
        format!("{} unless the ScaledObject sets one", tolerance.default)
    } else {
        format!("{} (the ScaledObject's ignored)", tolerance.default)
    }
}

/// What the table counts: "cost counted over 24.0 h", or for a trace with history to learn
/// from, "waits and cost counted over the last 168.0 h".
fn reported_span(trace: &Trace) -> String {
    let hours = |millis: Millis| millis as f64 / 3_600_000.0;
    if trace.report_from == 0 {
        format!("cost counted over {:.1} h", hours(trace.horizon))
    } else {
        format!(
            "waits and cost counted over the last {:.1} h (from hour {:.1}; starts and failures over all)",
            hours(trace.horizon - trace.report_from),
            hours(trace.report_from)
        )
    }
}

/// About 1,500 samples over the trace, at least one every 5 s.
fn sample_resolution(options: &SimOptions, trace: &Trace) -> SimOptions {
    let mut options = options.clone();
    options.sample_every = (trace.horizon / 1_500).max(5_000);
    options
}

/// Runs the whole command: prints the tables to `out` and writes the files of `--out`.
pub fn simulate(config: &SimulateConfig, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let traces = config
        .traces
        .iter()
        .map(|source| source.load(config.seed))
        .collect::<anyhow::Result<Vec<Trace>>>()?;
    if let Some(dir) = &config.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut all_rows = Vec::new();
    for trace in traces {
        let result = run_trace(trace, config);
        let trace = &result.trace;
        writeln!(
            out,
            "trace {}: {} requests, {}; cold start {} s, warm pool {}, HPA sync {} s, ceiling {}, tolerance {}",
            trace.name,
            trace.arrivals.len(),
            reported_span(trace),
            config.options.cold_start as f64 / 1000.0,
            config.options.settings.warm_pool,
            config.options.hpa_sync as f64 / 1000.0,
            config.options.ceiling,
            tolerance_note(config.options.tolerance),
        )?;
        writeln!(out, "{}", report::table(&result.rows))?;
        if let Some(needed) = &result.ceiling_needed {
            writeln!(out, "{needed}\n")?;
        }
        if config.sweep.is_some() {
            writeln!(out, "sweep of egress-scaler on {}:", trace.name)?;
            writeln!(
                out,
                "{}",
                report::sweep_table(&result.sweep, config.p99_under)
            )?;
            if let Some(goal) = config.p99_under {
                match report::cheapest_meeting(&result.sweep, goal) {
                    Some(row) => writeln!(
                        out,
                        "cheapest setting with p99 wait under {goal} s and no failed start: warm pool {}, cold start {} s ({:.2} pod-hours, p99 {:.1} s)\n",
                        row.warm_pool, row.cold_start_seconds, row.pod_hours, row.wait_p99_seconds
                    )?,
                    None => writeln!(
                        out,
                        "no setting of the sweep gives p99 wait under {goal} s on {}\n",
                        trace.name
                    )?,
                }
            }
        }
        if let Some(dir) = &config.out_dir {
            write_files(dir, &result, config)?;
        }
        all_rows.extend(result.rows);
        all_rows.extend(result.sweep);
    }
    if let Some(dir) = &config.out_dir {
        let path = dir.join("summary.csv");
        std::fs::write(&path, report::rows_csv(&all_rows))
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "wrote {}", dir.display())?;
    }
    Ok(())
}

fn write_files(
    dir: &std::path::Path,
    result: &TraceResult,
    config: &SimulateConfig,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = &result.trace.name;
    let write = |file: String, contents: String| {
        let path = dir.join(file);
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    };
    let mut rows = result.rows.clone();
    rows.extend(result.sweep.iter().cloned());
    write(format!("{name}.csv"), report::rows_csv(&rows))?;
    write(
        format!("{name}-timeline.csv"),
        report::timeline_csv(&result.outcomes),
    )?;
    let json = serde_json::json!({
        "trace": name,
        "requests": result.trace.arrivals.len(),
        "horizon_seconds": result.trace.horizon / 1000,
        "seed": config.seed,
        "cold_start_seconds": config.options.cold_start as f64 / 1000.0,
        "hpa_sync_seconds": config.options.hpa_sync as f64 / 1000.0,
        "settings": config.options.settings,
        "ceiling": config.options.ceiling,
        "hpa_tolerance": config.options.tolerance.default,
        "per_hpa_tolerance": config.options.tolerance.per_hpa,
        "ceiling_needed": result.ceiling_needed.map(|needed| serde_json::json!({
            "pods": needed.pods,
            "wait_p99_seconds": needed.wait_p99_seconds,
        })),
        "policies": result.rows,
        "sweep": result.sweep,
    });
    write(
        format!("{name}.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let title = format!(
        "{name}: {} requests, cold start {} s",
        result.trace.arrivals.len(),
        config.options.cold_start as f64 / 1000.0
    );
    write(format!("{name}.svg"), report::svg(&title, &result.outcomes))?;
    write(format!("{name}-trace.csv"), result.trace.to_csv())?;
    Ok(())
}
