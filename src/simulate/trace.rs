//! The traffic a simulation plays: recordings with an arrival time, a kind, a duration and a
//! room, read from a CSV file or drawn from a built-in synthetic trace with a seed.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::EgressKind;

use super::kube::Millis;

/// One recording request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// When the start is requested, from the start of the trace.
    pub at: Millis,
    /// Its kind.
    pub kind: EgressKind,
    /// How long it records once started.
    pub duration: Millis,
    /// The room (for tables and the order checks).
    pub room: String,
}

/// A whole trace: arrivals in time order and the window the cost is counted over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Its name in tables and file names.
    pub name: String,
    /// Arrivals sorted by time.
    pub arrivals: Vec<Arrival>,
    /// Pod-hours are counted up to here.
    pub horizon: Millis,
    /// The table reports from here on (waits of the arrivals from here, pod-hours from here
    /// to the horizon): the last week of `work-week`, whose first weeks are history to learn
    /// from; 0 for the others.
    pub report_from: Millis,
}

/// The wall-clock time (ms since the Unix epoch) of a trace's time 0: Monday 2024-01-01
/// 00:00 UTC, so that pre-warm sees the days of the week a trace means.
pub const TRACE_EPOCH_MS: u64 = 1_704_067_200_000;

/// The built-in synthetic traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltIn {
    /// A working day: meetings start mostly on the hour and half hour, 08:00-18:00.
    BusinessDay,
    /// 100 rooms within 10 s.
    Burst,
    /// Sparse rooms through the night.
    Night,
    /// Every kind of egress over a working day.
    Mixed,
    /// Three weeks of weekday meetings on the hour and half hour, with day-to-day noise in
    /// count and start time, and quiet weekends; the table reports the last week.
    WorkWeek,
    /// A week of Poisson arrivals: no pattern at all.
    Random,
}

impl BuiltIn {
    /// Every built-in trace.
    pub const ALL: [BuiltIn; 6] = [
        BuiltIn::BusinessDay,
        BuiltIn::Burst,
        BuiltIn::Night,
        BuiltIn::Mixed,
        BuiltIn::WorkWeek,
        BuiltIn::Random,
    ];

    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltIn::BusinessDay => "business-day",
            BuiltIn::Burst => "burst",
            BuiltIn::Night => "night",
            BuiltIn::Mixed => "mixed",
            BuiltIn::WorkWeek => "work-week",
            BuiltIn::Random => "random",
        }
    }

    /// Draws the trace from `seed`.
    pub fn generate(self, seed: u64) -> Trace {
        let mut rng = StdRng::seed_from_u64(seed ^ (self as u64).wrapping_mul(0x9e37_79b9));
        let (arrivals, horizon) = match self {
            BuiltIn::BusinessDay => business_day(&mut rng, |_| EgressKind::RoomComposite),
            BuiltIn::Mixed => business_day(&mut rng, mixed_kind),
            BuiltIn::Burst => burst(&mut rng),
            BuiltIn::Night => night(&mut rng),
            BuiltIn::WorkWeek => {
                let (arrivals, horizon) = work_week(&mut rng);
                let mut trace = Trace::new(self.as_str(), arrivals, horizon);
                trace.report_from = (WORK_WEEKS - 1) * WEEK;
                return trace;
            }
            BuiltIn::Random => random(&mut rng),
        };
        Trace::new(self.as_str(), arrivals, horizon)
    }
}

impl fmt::Display for BuiltIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuiltIn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuiltIn::ALL
            .into_iter()
            .find(|trace| trace.as_str() == s)
            .ok_or_else(|| format!("unknown trace {s:?}"))
    }
}

const SECOND: Millis = 1_000;
const MINUTE: Millis = 60 * SECOND;
const HOUR: Millis = 60 * MINUTE;
const DAY: Millis = 24 * HOUR;
const WEEK: Millis = 7 * DAY;
/// Weeks of `work-week`.
const WORK_WEEKS: u64 = 3;

impl Trace {
    /// A trace from arrivals in any order; `horizon` is raised to cover every recording.
    pub fn new(name: &str, mut arrivals: Vec<Arrival>, horizon: Millis) -> Trace {
        arrivals.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.room.cmp(&b.room)));
        let last_end = arrivals
            .iter()
            .map(|arrival| arrival.at + arrival.duration)
            .max()
            .unwrap_or(0);
        Trace {
            name: name.to_owned(),
            arrivals,
            horizon: horizon.max(last_end + HOUR),
            report_from: 0,
        }
    }

    /// Reads `arrival_seconds,kind,duration_seconds,room` lines; a header line and `#` comments
    /// are skipped. Errors name the line.
    pub fn from_csv(name: &str, text: &str) -> Result<Trace, TraceError> {
        let mut arrivals = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if index == 0 && fields.first().is_some_and(|f| f.parse::<f64>().is_err()) {
                continue; // header
            }
            let [at, kind, duration, room] = fields[..] else {
                return Err(TraceError::line(
                    number,
                    format!(
                        "expected 4 fields (arrival_seconds,kind,duration_seconds,room), found {}",
                        fields.len()
                    ),
                ));
            };
            let at = seconds(at).map_err(|e| TraceError::line(number, format!("arrival: {e}")))?;
            let kind: EgressKind = kind
                .parse()
                .map_err(|e| TraceError::line(number, format!("{e}")))?;
            let duration = seconds(duration)
                .map_err(|e| TraceError::line(number, format!("duration: {e}")))?;
            if duration == 0 {
                return Err(TraceError::line(number, "duration must be above 0".into()));
            }
            if room.is_empty() {
                return Err(TraceError::line(number, "room is empty".into()));
            }
            arrivals.push(Arrival {
                at,
                kind,
                duration,
                room: room.to_owned(),
            });
        }
        if arrivals.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(Trace::new(name, arrivals, 0))
    }

    /// The trace as CSV, readable by [`Trace::from_csv`].
    pub fn to_csv(&self) -> String {
        let mut out = String::from("arrival_seconds,kind,duration_seconds,room\n");
        for arrival in &self.arrivals {
            out.push_str(&format!(
                "{:.3},{},{:.3},{}\n",
                arrival.at as f64 / 1000.0,
                arrival.kind,
                arrival.duration as f64 / 1000.0,
                arrival.room
            ));
        }
        out
    }
}

/// A trace file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// One line is malformed.
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    /// No arrivals at all.
    #[error("the trace has no arrivals")]
    Empty,
}

impl TraceError {
    fn line(line: usize, reason: String) -> Self {
        TraceError::Line { line, reason }
    }
}

fn seconds(text: &str) -> Result<Millis, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=1e9).contains(&value) {
        return Err(format!("{text:?} is not a number of seconds from 0"));
    }
    Ok((value * 1000.0).round() as Millis)
}

/// Meetings of a working day: for each half-hour slot from 08:00 to 17:30 a number of rooms
/// (more in the late morning and early afternoon), 85 % starting within minutes of the slot
/// (late by an exponential delay, mean 90 s), the rest at any time; they last about 30 or
/// 60 minutes.
fn business_day(
    rng: &mut StdRng,
    kind_of: impl Fn(&mut StdRng) -> EgressKind,
) -> (Vec<Arrival>, Millis) {
    let mut arrivals = Vec::new();
    for slot in 0..20u64 {
        let start = 8 * HOUR + slot * 30 * MINUTE;
        let hour = 8 + slot / 2;
        let mean_rooms = match hour {
            9..=11 | 13..=15 => 4.0,
            _ => 2.0,
        };
        for _ in 0..poisson(rng, mean_rooms) {
            let at = if rng.random_bool(0.85) {
                start + exponential(rng, 90.0 * SECOND as f64).min(10.0 * MINUTE as f64) as Millis
            } else {
                start + rng.random_range(0..30 * MINUTE)
            };
            let planned = if rng.random_bool(0.5) { 30 } else { 60 };
            let duration = (planned as f64 * MINUTE as f64 * rng.random_range(0.7..1.15)) as Millis;
            let kind = kind_of(rng);
            arrivals.push(Arrival {
                at,
                kind,
                duration: scale_duration(kind, duration),
                room: format!("room-{:04}", arrivals.len() + 1),
            });
        }
    }
    (arrivals, 24 * HOUR)
}

/// 100 rooms within 10 s, one minute into the trace (a webinar series or an all-hands with
/// breakout rooms), recording 20 to 60 minutes.
fn burst(rng: &mut StdRng) -> (Vec<Arrival>, Millis) {
    let arrivals = (0..100)
        .map(|index| Arrival {
            at: MINUTE + rng.random_range(0..10 * SECOND),
            kind: EgressKind::RoomComposite,
            duration: rng.random_range(20 * MINUTE..60 * MINUTE),
            room: format!("room-{:04}", index + 1),
        })
        .collect();
    (arrivals, 2 * HOUR)
}

/// Sparse rooms from 22:00 to 06:00 (on average one every 40 minutes), recording 10 to 60
/// minutes.
fn night(rng: &mut StdRng) -> (Vec<Arrival>, Millis) {
    let mut arrivals = Vec::new();
    let mut at = 0.0;
    loop {
        at += exponential(rng, 40.0 * MINUTE as f64);
        if at >= (8 * HOUR) as f64 {
            break;
        }
        arrivals.push(Arrival {
            at: at as Millis,
            kind: EgressKind::RoomComposite,
            duration: rng.random_range(10 * MINUTE..60 * MINUTE),
            room: format!("room-{:04}", arrivals.len() + 1),
        });
    }
    (arrivals, 8 * HOUR)
}

/// Three weeks from Monday 00:00 (see [`TRACE_EPOCH_MS`]). Each weekday has the same
/// meetings: every half-hour slot from 08:00 to 17:30 has its usual number of rooms (drawn
/// once: 1 to 6, more in the late morning and early afternoon), and each day draws its own
/// count around it (Poisson) and its own start times: from 30 s early to a few minutes late
/// (30 s before the slot plus an exponential delay, mean 60 s, at most 8 minutes). They last
/// about 30 or 60 minutes. Weekends are quiet: a room now and then (one a day on average) at
/// any time between 10:00 and 20:00.
fn work_week(rng: &mut StdRng) -> (Vec<Arrival>, Millis) {
    let usual: Vec<f64> = (0..20u64)
        .map(|slot| {
            let hour = 8 + slot / 2;
            let busy = matches!(hour, 9..=11 | 13..=15);
            let low = if busy { 3 } else { 1 };
            rng.random_range(low..=low + 3) as f64
        })
        .collect();
    let mut arrivals = Vec::new();
    for day in 0..WORK_WEEKS * 7 {
        let midnight = day * DAY;
        let add = |rng: &mut StdRng, at: Millis, arrivals: &mut Vec<Arrival>| {
            let planned = if rng.random_bool(0.5) { 30 } else { 60 };
            let duration = (planned as f64 * MINUTE as f64 * rng.random_range(0.7..1.15)) as Millis;
            arrivals.push(Arrival {
                at,
                kind: EgressKind::RoomComposite,
                duration,
                room: format!("room-{:05}", arrivals.len() + 1),
            });
        };
        if day % 7 >= 5 {
            for _ in 0..poisson(rng, 1.0) {
                let at = midnight + 10 * HOUR + rng.random_range(0..10 * HOUR);
                add(rng, at, &mut arrivals);
            }
            continue;
        }
        for (slot, mean) in usual.iter().enumerate() {
            let start = midnight + 8 * HOUR + slot as u64 * 30 * MINUTE;
            for _ in 0..poisson(rng, *mean) {
                let late = exponential(rng, 60.0 * SECOND as f64).min(8.0 * MINUTE as f64);
                let at = start - 30 * SECOND + late as Millis;
                add(rng, at, &mut arrivals);
            }
        }
    }
    (arrivals, WORK_WEEKS * WEEK)
}

/// A week of room composites arriving as a Poisson process, 4 an hour day and night,
/// recording 10 to 60 minutes: nothing to learn.
fn random(rng: &mut StdRng) -> (Vec<Arrival>, Millis) {
    let mut arrivals = Vec::new();
    let mut at = 0.0;
    loop {
        at += exponential(rng, 15.0 * MINUTE as f64);
        if at >= WEEK as f64 {
            break;
        }
        arrivals.push(Arrival {
            at: at as Millis,
            kind: EgressKind::RoomComposite,
            duration: rng.random_range(10 * MINUTE..60 * MINUTE),
            room: format!("room-{:05}", arrivals.len() + 1),
        });
    }
    (arrivals, WEEK)
}

fn mixed_kind(rng: &mut StdRng) -> EgressKind {
    const WEIGHTS: [(EgressKind, u32); 7] = [
        (EgressKind::RoomComposite, 30),
        (EgressKind::AudioRoomComposite, 15),
        (EgressKind::Web, 10),
        (EgressKind::AudioWeb, 5),
        (EgressKind::Participant, 15),
        (EgressKind::TrackComposite, 10),
        (EgressKind::Track, 15),
    ];
    let mut pick = rng.random_range(0..100);
    for (kind, weight) in WEIGHTS {
        if pick < weight {
            return kind;
        }
        pick -= weight;
    }
    EgressKind::RoomComposite
}

/// Per-track recordings tend to be shorter than the meeting they belong to.
fn scale_duration(kind: EgressKind, duration: Millis) -> Millis {
    match kind {
        EgressKind::Track | EgressKind::TrackComposite | EgressKind::Participant => {
            duration * 2 / 3
        }
        _ => duration,
    }
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    -mean * u.ln()
}

fn poisson(rng: &mut StdRng, mean: f64) -> u64 {
    // Knuth's method: fine for the small means used here.
    let limit = (-mean).exp();
    let mut product: f64 = rng.random_range(0.0..1.0);
    let mut count = 0;
    while product > limit {
        count += 1;
        product *= rng.random_range(0.0..1.0);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_traces_are_reproducible_and_shaped_as_named() {
        for trace in BuiltIn::ALL {
            assert_eq!(trace.generate(7), trace.generate(7), "{trace}");
            assert!(!trace.generate(7).arrivals.is_empty(), "{trace}");
        }
        let burst = BuiltIn::Burst.generate(1);
        assert_eq!(burst.arrivals.len(), 100);
        let first = burst.arrivals.first().unwrap().at;
        let last = burst.arrivals.last().unwrap().at;
        assert!(last - first < 10 * SECOND);

        let day = BuiltIn::BusinessDay.generate(1);
        let near_slot = day
            .arrivals
            .iter()
            .filter(|a| a.at % (30 * MINUTE) < 10 * MINUTE)
            .count();
        assert!(
            near_slot * 10 >= day.arrivals.len() * 8,
            "mostly on the slot"
        );
        assert!(
            day.arrivals
                .iter()
                .all(|a| a.at >= 8 * HOUR && a.at < 18 * HOUR)
        );

        let week = BuiltIn::WorkWeek.generate(1);
        assert_eq!(week.report_from, 2 * WEEK);
        let weekend = week
            .arrivals
            .iter()
            .filter(|a| (a.at / DAY) % 7 >= 5)
            .count();
        assert!(weekend * 50 < week.arrivals.len(), "quiet weekends");
        let on_slot = week
            .arrivals
            .iter()
            .filter(|a| (a.at + 30 * SECOND) % (30 * MINUTE) < 5 * MINUTE)
            .count();
        assert!(
            on_slot * 10 >= week.arrivals.len() * 8,
            "mostly on the slot"
        );
        // The same slot differs from day to day.
        let count_at = |day: u64| {
            let slot = day * DAY + 10 * HOUR;
            week.arrivals
                .iter()
                .filter(|a| a.at + 30 * SECOND >= slot && a.at < slot + 10 * MINUTE)
                .count()
        };
        assert!(
            (0..5).any(|day| count_at(day) != count_at(day + 1)),
            "noise"
        );

        let random = BuiltIn::Random.generate(1);
        let per_hour = random.arrivals.len() as f64 / (7.0 * 24.0);
        assert!((3.0..5.0).contains(&per_hour), "{per_hour}");

        let mixed = BuiltIn::Mixed.generate(1);
        let kinds: std::collections::BTreeSet<_> = mixed.arrivals.iter().map(|a| a.kind).collect();
        assert_eq!(kinds.len(), 7, "every kind in mixed");
    }

    #[test]
    fn csv_round_trips_and_errors_name_the_line() {
        let trace = BuiltIn::Mixed.generate(3);
        let read = Trace::from_csv("mixed", &trace.to_csv()).unwrap();
        assert_eq!(read.arrivals, trace.arrivals);

        let text =
            "arrival_seconds,kind,duration_seconds,room\n0,room_composite,60,a\n5,video,60,b\n";
        let error = Trace::from_csv("t", text).unwrap_err().to_string();
        assert!(
            error.starts_with("line 3: unknown egress kind \"video\""),
            "{error}"
        );
        let error = Trace::from_csv("t", "1,track,-4,a")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("line 1: duration:"), "{error}");
        let error = Trace::from_csv("t", "1,track,4").unwrap_err().to_string();
        assert!(error.contains("expected 4 fields"), "{error}");
        assert_eq!(
            Trace::from_csv("t", "# nothing\n").unwrap_err(),
            TraceError::Empty
        );
    }
}
