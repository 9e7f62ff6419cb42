//! What the demo shows: a header naming what is real and what is a stand-in, a table with one
//! row a second (on a terminal the newest row is redrawn in place), the scaling events between
//! the rows, and the summary with its verdict.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use super::Event;

/// One moment of the demo, as a table row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Time since the demo began.
    pub elapsed: Duration,
    /// Tickets waiting in the queue (from `GET /v1/status`); `None` when it did not answer.
    pub queued: Option<u64>,
    /// The last `GetMetrics` answer.
    pub desired: Option<u32>,
    /// The replica count KEDA and the HPA set.
    pub replicas: u32,
    /// Ready egress pods.
    pub ready: usize,
    /// Egress pods in their cold start.
    pub starting: usize,
    /// Egress pods draining after SIGTERM.
    pub draining: usize,
    /// Egress started on the livekit-server stand-in.
    pub started: usize,
    /// Of which ended.
    pub ended: usize,
    /// Median wait from enqueue to egress start so far.
    pub wait_p50: Option<Duration>,
    /// Longest such wait so far.
    pub wait_max: Option<Duration>,
}

/// The column titles of [`row`].
pub fn heading() -> String {
    format!(
        "{:>6} {:>6} {:>7} {:>8} {:>5} {:>8} {:>8} {:>7} {:>5} {:>8} {:>6}",
        "time",
        "queued",
        "desired",
        "replicas",
        "ready",
        "starting",
        "draining",
        "started",
        "ended",
        "wait p50",
        "max"
    )
}

/// One table row.
pub fn row(sample: &Sample) -> String {
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    format!(
        "{:>6} {:>6} {:>7} {:>8} {:>5} {:>8} {:>8} {:>7} {:>5} {:>8} {:>6}",
        seconds(sample.elapsed),
        or_dash(sample.queued.map(|q| q.to_string())),
        or_dash(sample.desired.map(|d| d.to_string())),
        sample.replicas,
        sample.ready,
        sample.starting,
        sample.draining,
        sample.started,
        sample.ended,
        or_dash(sample.wait_p50.map(seconds)),
        or_dash(sample.wait_max.map(seconds)),
    )
}

/// `12.3s`.
pub fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// An event line, indented under the time column.
pub fn event_line(event: &Event) -> String {
    format!(
        "{:>6}   {}: {}",
        seconds(event.at),
        event.source,
        event.text
    )
}

/// Writes the view to standard output: plainly (a row a second) or redrawing the newest row.
pub struct Screen {
    plain: bool,
    live_row: bool,
    rows_written: u64,
}

impl Screen {
    /// A screen; `plain` writes no escape sequences.
    pub fn new(plain: bool) -> Self {
        Screen {
            plain,
            live_row: false,
            rows_written: 0,
        }
    }

    fn write(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.live_row {
            // Carriage return and erase line: the live row gives way.
            let _ = out.write_all(b"\r\x1b[2K");
            self.live_row = false;
        }
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }

    /// A line that stays.
    pub fn line(&mut self, text: &str) {
        self.write(&format!("{text}\n"));
    }

    /// Shows a moment: a row stays once per whole second; in between, on a terminal, the
    /// newest row is redrawn in place.
    pub fn sample(&mut self, sample: &Sample) {
        let second = sample.elapsed.as_secs();
        if second >= self.rows_written {
            self.rows_written = second + 1;
            self.line(&row(sample));
        } else if !self.plain {
            self.write(&row(sample));
            self.live_row = true;
        }
    }

    /// Ends the table (the live row, if any, is replaced by the next line).
    pub fn finish_table(&mut self, last: &Sample) {
        self.write(&format!("{}\n", row(last)));
    }
}

/// What the demo found at the end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Rooms that asked for a recording.
    pub rooms: usize,
    /// Repeated requests sent.
    pub repeats: usize,
    /// Repeated requests answered as duplicates of the room's ticket.
    pub repeats_answered_duplicate: usize,
    /// Egress started on the livekit-server stand-in.
    pub started: usize,
    /// Rooms with no egress at all.
    pub lost: Vec<String>,
    /// Rooms with more than one egress.
    pub duplicated: Vec<String>,
    /// Rooms whose ticket did not reach `ended` before the deadline.
    pub not_ended: Vec<String>,
    /// Wait from enqueue to egress start, per recorded room.
    pub waits: Vec<Duration>,
    /// Most egress pods at once.
    pub peak_pods: usize,
    /// Egress pod lifetime summed, seconds.
    pub pod_seconds: f64,
    /// Egress pods left when the demo stopped.
    pub pods_left: usize,
    /// Time the demo took, cleanup included.
    pub wall: Duration,
    /// The deadline the recordings had to end by.
    pub deadline: Duration,
    /// Stopped by Ctrl-C or SIGTERM.
    pub interrupted: bool,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// The first few names of a list, and how many more there are.
pub fn short_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(text, " and {} more", names.len() - SHOWN);
    }
    text
}

impl Summary {
    /// Why the demo failed, in one line; `None` when it succeeded.
    pub fn failure(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if self.interrupted {
            reasons.push("interrupted before the end".to_owned());
        }
        if !self.lost.is_empty() {
            reasons.push(format!(
                "{} room(s) never recorded ({})",
                self.lost.len(),
                short_list(&self.lost)
            ));
        }
        if !self.duplicated.is_empty() {
            reasons.push(format!(
                "{} room(s) recorded more than once ({})",
                self.duplicated.len(),
                short_list(&self.duplicated)
            ));
        }
        let repeats_accepted = self.repeats - self.repeats_answered_duplicate;
        if repeats_accepted > 0 {
            reasons.push(format!(
                "{repeats_accepted} repeated request(s) not answered as duplicates"
            ));
        }
        if !self.not_ended.is_empty() {
            let when = if self.interrupted {
                String::new()
            } else {
                format!(" within {}", seconds(self.deadline))
            };
            reasons.push(format!(
                "{} recording(s) not ended{when} ({})",
                self.not_ended.len(),
                short_list(&self.not_ended)
            ));
        }
        if self.pods_left > 0 && !self.interrupted {
            reasons.push(format!(
                "{} egress pod(s) still running at the deadline: the fleet did not scale back to zero",
                self.pods_left
            ));
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The summary block, ending with the verdict.
    pub fn lines(&self) -> Vec<String> {
        let mut waits = self.waits.clone();
        waits.sort();
        let wait = |p: f64| percentile(&waits, p).map_or_else(|| "-".to_owned(), seconds);
        let mut lines = vec![
            "Summary".to_owned(),
            format!("  rooms:            {}", self.rooms),
            format!(
                "  duplicates:       {} of {} repeated requests answered duplicate",
                self.repeats_answered_duplicate, self.repeats
            ),
            format!("  recordings:       {} started", self.started),
            format!("  lost:             {}", self.lost.len()),
            format!("  duplicated:       {}", self.duplicated.len()),
            format!(
                "  ended in time:    {} of {}",
                self.rooms - self.not_ended.len().min(self.rooms),
                self.rooms
            ),
            format!(
                "  wait to start:    p50 {}, p95 {}, max {} (enqueue to egress start)",
                wait(0.5),
                wait(0.95),
                wait(1.0)
            ),
            format!(
                "  egress pods:      peak {}, {:.0} pod-seconds, {} left at the end",
                self.peak_pods, self.pod_seconds, self.pods_left
            ),
            format!("  wall time:        {}", seconds(self.wall)),
        ];
        lines.push(match self.failure() {
            None => "Result: every room was recorded exactly once.".to_owned(),
            Some(reason) => format!("Result: FAILED: {reason}."),
        });
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let waits: Vec<Duration> = (1..=20).map(|s| ms(s * 100)).collect();
        assert_eq!(percentile(&waits, 0.5), Some(ms(1000)));
        assert_eq!(percentile(&waits, 0.95), Some(ms(1900)));
        assert_eq!(percentile(&waits, 1.0), Some(ms(2000)));
        assert_eq!(percentile(&[ms(7)], 0.5), Some(ms(7)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    fn good() -> Summary {
        Summary {
            rooms: 3,
            repeats: 1,
            repeats_answered_duplicate: 1,
            started: 3,
            waits: vec![ms(3000), ms(1000), ms(2000)],
            peak_pods: 3,
            pod_seconds: 30.4,
            wall: ms(21_340),
            deadline: ms(50_000),
            ..Summary::default()
        }
    }

    #[test]
    fn a_clean_run_succeeds_and_says_so() {
        let summary = good();
        assert_eq!(summary.failure(), None);
        let text = summary.lines().join("\n");
        assert!(text.contains("lost:             0"), "{text}");
        assert!(text.contains("duplicated:       0"), "{text}");
        assert!(text.contains("p50 2.0s, p95 3.0s, max 3.0s"), "{text}");
        assert!(text.contains("wall time:        21.3s"), "{text}");
        assert!(
            text.ends_with("every room was recorded exactly once."),
            "{text}"
        );
    }

    #[test]
    fn every_kind_of_failure_is_named() {
        let summary = Summary {
            lost: vec!["room-02".to_owned()],
            duplicated: vec!["room-01".to_owned()],
            repeats_answered_duplicate: 0,
            not_ended: vec!["room-02".to_owned(), "room-03".to_owned()],
            pods_left: 2,
            ..good()
        };
        let failure = summary.failure().unwrap();
        for part in [
            "1 room(s) never recorded (room-02)",
            "1 room(s) recorded more than once (room-01)",
            "1 repeated request(s) not answered as duplicates",
            "2 recording(s) not ended within 50.0s (room-02, room-03)",
            "2 egress pod(s) still running",
        ] {
            assert!(failure.contains(part), "{failure}");
        }
        assert!(!failure.contains('\n'));
        let interrupted = Summary {
            interrupted: true,
            ..summary.clone()
        };
        let failure = interrupted.failure().unwrap();
        assert!(
            failure.starts_with("interrupted before the end; "),
            "{failure}"
        );
        assert!(
            failure.contains("2 recording(s) not ended (room-02"),
            "{failure}"
        );
        assert!(!failure.contains("still running"), "{failure}");
        let text = summary.lines().join("\n");
        assert!(text.contains("lost:             1"), "{text}");
        assert!(text.contains("Result: FAILED: "), "{text}");
    }

    #[test]
    fn long_room_lists_are_shortened() {
        let rooms: Vec<String> = (1..=8).map(|i| format!("room-0{i}")).collect();
        assert_eq!(
            short_list(&rooms),
            "room-01, room-02, room-03, room-04, room-05 and 3 more"
        );
    }

    #[test]
    fn rows_line_up_with_the_heading() {
        let sample = Sample {
            elapsed: ms(12_345),
            queued: Some(5),
            desired: Some(12),
            replicas: 12,
            ready: 8,
            starting: 4,
            started: 15,
            ended: 3,
            wait_p50: Some(ms(3200)),
            wait_max: Some(ms(5100)),
            ..Sample::default()
        };
        let row = row(&sample);
        assert_eq!(row.len(), heading().len());
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "12.3s", "5", "12", "12", "8", "4", "0", "15", "3", "3.2s", "5.1s"
            ]
        );
        let empty = super::row(&Sample::default());
        assert_eq!(empty.split_whitespace().nth(1), Some("-"));
    }
}
