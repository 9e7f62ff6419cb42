//! What `simulate` shows: the table per trace, the sweep table, and the files of `--out`
//! (summary CSV and JSON, the timeline CSV, an SVG picture of demand, pods and waiting
//! requests over time for each policy).

use std::fmt::Write as _;

use serde::Serialize;

use super::Outcome;

/// One row of the table: a policy (or a sweep setting) on one trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The trace.
    pub trace: String,
    /// The policy.
    pub policy: String,
    /// egress-scaler's warm pool (0 for the other policies).
    pub warm_pool: u32,
    /// Cold start of a pod, seconds.
    pub cold_start_seconds: f64,
    /// HPA scale-down stabilization window (and, for egress-scaler, KEDA's cooldown), seconds.
    pub scale_down_seconds: f64,
    /// Requests in the trace.
    pub requests: usize,
    /// Recordings started.
    pub starts: usize,
    /// Starts that failed.
    pub failed: usize,
    /// Wait from request to start, seconds: median.
    pub wait_p50_seconds: f64,
    /// 95th percentile.
    pub wait_p95_seconds: f64,
    /// 99th percentile.
    pub wait_p99_seconds: f64,
    /// Longest wait.
    pub wait_max_seconds: f64,
    /// Pod-hours paid for.
    pub pod_hours: f64,
    /// Pod-hours over the oracle's, when the oracle ran.
    pub vs_oracle: Option<f64>,
    /// Most pods at once.
    pub peak_pods: u32,
}

impl Row {
    /// The row of `outcome`.
    pub fn of(
        trace: &str,
        requests: usize,
        warm_pool: u32,
        cold_start_seconds: f64,
        outcome: &Outcome,
    ) -> Row {
        Row {
            trace: trace.to_owned(),
            policy: outcome.policy.to_string(),
            warm_pool,
            cold_start_seconds,
            scale_down_seconds: 0.0,
            requests,
            starts: outcome.starts.len(),
            failed: outcome.failed.len(),
            wait_p50_seconds: outcome.wait_percentile(50.0),
            wait_p95_seconds: outcome.wait_percentile(95.0),
            wait_p99_seconds: outcome.wait_percentile(99.0),
            wait_max_seconds: outcome.wait_percentile(100.0),
            pod_hours: outcome.pod_hours(),
            vs_oracle: None,
            peak_pods: outcome.peak_pods(),
        }
    }
}

/// Fills `vs_oracle` from the oracle's pod-hours.
pub fn compare_to_oracle(rows: &mut [Row], oracle_pod_hours: f64) {
    for row in rows {
        if oracle_pod_hours > 0.0 {
            row.vs_oracle = Some(row.pod_hours / oracle_pod_hours);
        }
    }
}

/// Column titles of the measures every table shows.
const MEASURES: &str = "starts  failed  wait p50  wait p95  wait p99  pod-hours  x oracle  peak";

/// The measures of one row, aligned under [`MEASURES`].
fn measures(row: &Row) -> String {
    format!(
        "{:>6}  {:>6}  {:>7.1}s  {:>7.1}s  {:>7.1}s  {:>9.2}  {:>8}  {:>4}",
        row.starts,
        row.failed,
        row.wait_p50_seconds,
        row.wait_p95_seconds,
        row.wait_p99_seconds,
        row.pod_hours,
        row.vs_oracle
            .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.3}")),
        row.peak_pods,
    )
}

/// No failed start and p99 wait under `goal` seconds.
fn meets(row: &Row, goal: f64) -> bool {
    row.failed == 0 && row.wait_p99_seconds < goal
}

/// The terminal table of one trace's policies.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let width = rows
        .iter()
        .map(|row| row.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(out, "{:<width$}  {MEASURES}", "policy");
    for row in rows {
        let _ = writeln!(out, "{:<width$}  {}", row.policy, measures(row));
    }
    out
}

/// The sweep table: one row per setting, marked when it meets the p99 goal.
pub fn sweep_table(rows: &[Row], p99_under: Option<f64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "warm pool  cold start  scale-down  {MEASURES}{}",
        if p99_under.is_some() { "  meets" } else { "" }
    );
    for row in rows {
        let verdict = match p99_under {
            Some(goal) if meets(row, goal) => "  yes",
            Some(_) => "  no",
            None => "",
        };
        let _ = writeln!(
            out,
            "{:>9}  {:>9.0}s  {:>9.0}s  {}{verdict}",
            row.warm_pool,
            row.cold_start_seconds,
            row.scale_down_seconds,
            measures(row),
        );
    }
    out
}

/// The answer to "which setting gives p99 wait under the goal": the cheapest row that
/// meets it, or `None`.
pub fn cheapest_meeting(rows: &[Row], p99_under: f64) -> Option<&Row> {
    rows.iter()
        .filter(|row| meets(row, p99_under))
        .min_by(|a, b| a.pod_hours.total_cmp(&b.pod_hours))
}

/// The rows as CSV.
pub fn rows_csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "trace,policy,warm_pool,cold_start_seconds,scale_down_seconds,requests,starts,failed,wait_p50_seconds,wait_p95_seconds,wait_p99_seconds,wait_max_seconds,pod_hours,vs_oracle,peak_pods\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.4},{},{}",
            row.trace,
            row.policy,
            row.warm_pool,
            row.cold_start_seconds,
            row.scale_down_seconds,
            row.requests,
            row.starts,
            row.failed,
            row.wait_p50_seconds,
            row.wait_p95_seconds,
            row.wait_p99_seconds,
            row.wait_max_seconds,
            row.pod_hours,
            row.vs_oracle
                .map_or_else(String::new, |r| format!("{r:.4}")),
            row.peak_pods
        );
    }
    out
}

/// Every policy's timeline as CSV: one line per policy and sample.
pub fn timeline_csv(outcomes: &[Outcome]) -> String {
    let mut out = String::from("policy,seconds,demand,pods,replicas,waiting\n");
    for outcome in outcomes {
        for sample in &outcome.timeline {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{}",
                outcome.policy,
                sample.at / 1000,
                sample.demand,
                sample.pods,
                sample.replicas,
                sample.waiting
            );
        }
    }
    out
}

/// Reads one series of the picture from a sample.
type SampleValue = fn(&super::engine::Sample) -> u32;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;

/// A picture of demand, pods and waiting requests over time, one panel per policy, on a
/// shared scale.
pub fn svg(title: &str, outcomes: &[Outcome]) -> String {
    let horizon = outcomes
        .iter()
        .flat_map(|outcome| outcome.timeline.last())
        .map(|sample| sample.at)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let peak = outcomes
        .iter()
        .flat_map(|outcome| &outcome.timeline)
        .map(|sample| sample.demand.max(sample.pods).max(sample.waiting))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let top = nice_ceiling(peak);
    let height = TOP + PANEL * outcomes.len() as f64 + 40.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let legend = [
        ("#1f77b4", "recordings wanted (running + waiting)"),
        ("#ff7f0e", "pods (starting, ready or draining)"),
        ("#d62728", "requests waiting to start"),
    ];
    for (index, (color, label)) in legend.iter().enumerate() {
        let x = LEFT + index as f64 * 280.0;
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="36" x2="{}" y2="36" stroke="{color}" stroke-width="2"/><text x="{}" y="40">{label}</text>"#,
            x + 18.0,
            x + 22.0
        );
    }
    let hours = horizon / 3_600_000.0;
    let tick_hours = [0.25, 0.5, 1.0, 2.0, 4.0]
        .into_iter()
        .find(|step| hours / step <= 12.0)
        .unwrap_or(4.0);
    for (index, outcome) in outcomes.iter().enumerate() {
        let y0 = TOP + PANEL * index as f64 + 10.0;
        let plot_height = PANEL - 40.0;
        let y_of = |value: f64| y0 + plot_height - value / top * plot_height;
        let x_of = |millis: f64| LEFT + millis / horizon * plot_width;
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
            y0 - 2.0,
            outcome.policy
        );
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{y0}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#999"/>"##
        );
        for step in 0..=4 {
            let value = top * f64::from(step) / 4.0;
            let y = y_of(value);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{value:.0}</text>"##,
                LEFT + plot_width,
                LEFT - 4.0,
                y + 4.0
            );
        }
        let mut tick = 0.0;
        while tick <= hours + 1e-9 {
            let x = x_of(tick * 3_600_000.0);
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                y0 + plot_height + 13.0,
                format_hours(tick)
            );
            tick += tick_hours;
        }
        let series: [(&str, SampleValue); 3] = [
            ("#1f77b4", |s| s.demand),
            ("#ff7f0e", |s| s.pods),
            ("#d62728", |s| s.waiting),
        ];
        for (color, value) in series {
            let mut points = String::new();
            let mut previous: Option<f64> = None;
            for sample in &outcome.timeline {
                let x = x_of(sample.at as f64);
                let y = y_of(f64::from(value(sample)));
                // Steps, not slopes: counts change at an instant.
                if let Some(previous) = previous {
                    let _ = write!(points, "{x:.1},{previous:.1} ");
                }
                let _ = write!(points, "{x:.1},{y:.1} ");
                previous = Some(y);
            }
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                points.trim_end()
            );
        }
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{:.1}" text-anchor="middle">time (hours from the start of the trace)</text>"#,
        LEFT + plot_width / 2.0,
        height - 8.0
    );
    out.push_str("</svg>\n");
    out
}

fn format_hours(hours: f64) -> String {
    let minutes = (hours * 60.0).round() as u64;
    format!("{}:{:02}", minutes / 60, minutes % 60)
}

fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|step| step * magnitude)
        .find(|candidate| *candidate >= value)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
