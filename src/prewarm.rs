//! Pre-warm (DESIGN.md 4): the warm pool that knows the clock. Pure, no I/O.
//!
//! Every queue counts its arrivals per kind in one-minute buckets of the week (UTC), for this
//! week and the two before ([`ArrivalHistory`] in memory, `queue/enqueue.lua` in Redis: one
//! 20,160-byte string of 10,080 saturating `u16` counters per kind and week, so at most
//! 60,480 bytes per kind a queue has seen, about 61 KB for the usual one-kind queue).
//!
//! The rule ([`expect`]): for each minute that starts within the lead time (cold start + HPA
//! sync + margin), the days it is compared with are looked at:
//! - **daily**: the same minute on the last [`LOOKBACK_DAYS`] days of the same type (weekdays
//!   with weekdays, Saturdays and Sundays with each other) within the last two weeks; the
//!   pattern holds when arrivals came within [`PATTERN_WINDOW_MINUTES`] minutes of it on at
//!   least [`MIN_DAYS_SEEN`] of them (meetings start a minute early or a few minutes late);
//! - **weekly**, when the daily rule does not hold: the same minute of the week in each of the
//!   last two weeks, within the same window (a meeting held on Mondays only).
//!
//! When it holds, the minute and the [`AHEAD_MINUTES`] - 1 after it are expected to bring, per
//! kind, as many arrivals as they brought on the busiest of those days, so that the pods of a
//! cluster of starts are ready by its first arrival. Decay: a day older than those compared is not looked at, and a
//! week's counters are forgotten (their Redis key expires) once no lookback can reach it, two
//! weeks after it ended. A quiet day costs one lead time of the pods of each minute it was
//! wrong about: a minute counts only while its start is ahead (`now < start <= now + lead`);
//! once it has begun, what arrives is queued work.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{
    Decision, Demand, EgressKind, FleetSnapshot, Prewarm, Settings, clamp,
    decide_with_unseen_starts,
};

/// Length of one bucket: a minute.
pub const BUCKET_MS: u64 = 60_000;
/// One day.
pub const DAY_MS: u64 = 86_400_000;
/// One week.
pub const WEEK_MS: u64 = 7 * DAY_MS;
/// Buckets in a week: 10,080.
pub const BUCKETS_PER_WEEK: u64 = WEEK_MS / BUCKET_MS;
/// Weeks of counters kept: this one and the two before (a lookback reaches 14 days back).
pub const WEEKS_KEPT: u64 = 3;
/// Bytes of one kind's counters for one week in Redis (10,080 `u16`).
pub const BYTES_PER_KIND_WEEK: u64 = BUCKETS_PER_WEEK * 2;
/// Days of the same type the daily rule compares.
pub const LOOKBACK_DAYS: usize = 5;
/// Of those, on how many arrivals must have come for the daily rule to act.
pub const MIN_DAYS_SEEN: usize = 3;
/// Arrivals within this many minutes either side of the minutes ahead count as the pattern
/// seen that day: a five-minute window.
pub const PATTERN_WINDOW_MINUTES: u64 = 2;
/// The arrivals expected are those of the minute ahead and the next ones, this many minutes
/// in all: the pods of a cluster of starts are ready before its first arrival.
pub const AHEAD_MINUTES: u64 = 3;
/// How far back the daily rule looks for days of the same type.
pub const LOOKBACK_SPAN_DAYS: u64 = 14;
/// Longest lead time accepted: longer would pre-warm for patterns an hour away.
pub const MAX_LEAD_MS: u64 = 3_600_000;
/// The default lead time: 30 s cold start + 15 s HPA sync + 15 s margin.
pub const DEFAULT_LEAD_MS: u64 = 60_000;

/// One minute of one week (weeks counted from the Unix epoch, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cell {
    /// Week number since the epoch.
    pub week: u64,
    /// Minute within the week, 0..10080.
    pub bucket: u16,
}

impl Cell {
    /// The bucket holding time `at_ms`.
    pub fn at(at_ms: u64) -> Cell {
        Cell {
            week: at_ms / WEEK_MS,
            bucket: ((at_ms % WEEK_MS) / BUCKET_MS) as u16,
        }
    }

    /// When the bucket starts.
    pub fn start_ms(self) -> u64 {
        self.week * WEEK_MS + u64::from(self.bucket) * BUCKET_MS
    }

    /// When a week's counters may be forgotten: no lookback reaches them after this.
    pub fn forget_at_ms(self) -> u64 {
        (self.week + WEEKS_KEPT) * WEEK_MS
    }
}

/// Monday is 0, Sunday 6 (1970-01-01 was a Thursday).
fn weekday(at_ms: u64) -> u64 {
    (at_ms / DAY_MS + 3) % 7
}

fn is_weekend(at_ms: u64) -> bool {
    weekday(at_ms) >= 5
}

const WEEKDAY_NAMES: [&str; 7] = [
    "Mondays",
    "Tuesdays",
    "Wednesdays",
    "Thursdays",
    "Fridays",
    "Saturdays",
    "Sundays",
];

/// The buckets starting within the lead time: `now < start <= now + lead`.
fn targets(now_ms: u64, lead_ms: u64) -> Vec<u64> {
    let lead_ms = lead_ms.min(MAX_LEAD_MS);
    let mut start = (now_ms / BUCKET_MS + 1) * BUCKET_MS;
    let mut out = Vec::new();
    while start <= now_ms + lead_ms {
        out.push(start);
        start += BUCKET_MS;
    }
    out
}

/// The days the daily rule compares for a bucket starting at `start`: the same time on the
/// last [`LOOKBACK_DAYS`] days of its type within [`LOOKBACK_SPAN_DAYS`], newest first.
fn daily_days(start: u64) -> Vec<u64> {
    let weekend = is_weekend(start);
    (1..=LOOKBACK_SPAN_DAYS)
        .filter_map(|days| start.checked_sub(days * DAY_MS))
        .filter(|day| is_weekend(*day) == weekend)
        .take(LOOKBACK_DAYS)
        .collect()
}

/// The times the weekly rule compares: the same time one and two weeks before.
fn weekly_days(start: u64) -> Vec<u64> {
    (1..WEEKS_KEPT)
        .filter_map(|weeks| start.checked_sub(weeks * WEEK_MS))
        .collect()
}

/// The buckets whose counts [`expect`] needs at `now_ms`, in a fixed order (the order of
/// the counts a store returns). Empty when no bucket starts within the lead time.
pub fn cells_to_read(now_ms: u64, lead_ms: u64) -> Vec<Cell> {
    let Some((first, last)) = span(now_ms, lead_ms) else {
        return Vec::new();
    };
    let before = PATTERN_WINDOW_MINUTES * BUCKET_MS;
    let after = (last - first) + PATTERN_WINDOW_MINUTES.max(AHEAD_MINUTES - 1) * BUCKET_MS;
    let mut cells: Vec<Cell> = daily_days(first)
        .into_iter()
        .chain(weekly_days(first))
        .flat_map(|day| (day.saturating_sub(before)..=day + after).step_by(BUCKET_MS as usize))
        .map(Cell::at)
        .collect();
    cells.sort();
    cells.dedup();
    cells
}

/// The first and last minute starting within the lead time.
fn span(now_ms: u64, lead_ms: u64) -> Option<(u64, u64)> {
    let targets = targets(now_ms, lead_ms);
    Some((*targets.first()?, *targets.last()?))
}

/// Arrivals counted per kind and bucket, as read from a store (missing means zero).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArrivalCounts(BTreeMap<(EgressKind, Cell), u32>);

impl ArrivalCounts {
    /// Sets the count of one kind in one bucket.
    pub fn set(&mut self, kind: EgressKind, cell: Cell, count: u32) {
        if count > 0 {
            self.0.insert((kind, cell), count);
        }
    }

    /// The count of one kind in one bucket.
    pub fn get(&self, kind: EgressKind, cell: Cell) -> u32 {
        self.0.get(&(kind, cell)).copied().unwrap_or(0)
    }

    fn kinds(&self) -> impl Iterator<Item = EgressKind> + '_ {
        let mut kinds: Vec<EgressKind> = self.0.keys().map(|(kind, _)| *kind).collect();
        kinds.dedup();
        kinds.into_iter()
    }
}

/// Which comparison found the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The same time on recent days of the same type.
    Daily,
    /// The same time of the week in recent weeks.
    Weekly,
}

/// One pattern acted on: arrivals of one kind expected at one bucket's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pattern {
    /// The first minute it counts (ms since the epoch).
    pub at_ms: u64,
    /// The start of the last minute it counts.
    pub until_ms: u64,
    /// The kind expected.
    pub kind: EgressKind,
    /// Arrivals expected: the most seen on any day compared.
    pub arrivals: u64,
    /// Days (or weeks) on which arrivals came.
    pub seen: usize,
    /// Days (or weeks) compared.
    pub compared: usize,
    /// Which comparison.
    pub rule: Rule,
}

impl Pattern {
    /// "seen on 4 of the last 5 weekdays".
    pub fn seen_text(&self) -> String {
        let days = match self.rule {
            Rule::Daily if is_weekend(self.at_ms) => "weekend days".to_owned(),
            Rule::Daily => "weekdays".to_owned(),
            Rule::Weekly => WEEKDAY_NAMES[weekday(self.at_ms) as usize].to_owned(),
        };
        format!("seen on {} of the last {} {days}", self.seen, self.compared)
    }

    /// "between 10:00 and 10:02 UTC": the minutes it counts.
    pub fn time_text(&self) -> String {
        let clock = |at: u64| {
            let minutes = (at % DAY_MS) / 60_000;
            format!("{:02}:{:02}", minutes / 60, minutes % 60)
        };
        format!(
            "between {} and {} UTC",
            clock(self.at_ms),
            clock(self.until_ms)
        )
    }
}

/// What the pattern says is coming within the lead time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Expectation {
    /// Arrivals expected, by kind.
    pub arrivals: Demand,
    /// The patterns behind them.
    pub patterns: Vec<Pattern>,
}

/// The arrivals expected within `lead_ms` of `now_ms` (see the module docs for the rule).
pub fn expect(now_ms: u64, lead_ms: u64, counts: &ArrivalCounts) -> Expectation {
    let mut expectation = Expectation::default();
    let Some((first, last)) = span(now_ms, lead_ms) else {
        return expectation;
    };
    for kind in counts.kinds() {
        let found = judge(first, last, kind, Rule::Daily, &daily_days(first), counts)
            .or_else(|| judge(first, last, kind, Rule::Weekly, &weekly_days(first), counts));
        if let Some(pattern) = found {
            expectation.arrivals.add(kind, pattern.arrivals);
            expectation.patterns.push(pattern);
        }
    }
    expectation
}

/// Arrivals of `kind` counted in the minutes `from..=until` (ms), day-shifted.
fn sum(counts: &ArrivalCounts, kind: EgressKind, from: u64, until: u64) -> u32 {
    (from..=until)
        .step_by(BUCKET_MS as usize)
        .map(|minute| counts.get(kind, Cell::at(minute)))
        .sum()
}

fn judge(
    first: u64,
    last: u64,
    kind: EgressKind,
    rule: Rule,
    days: &[u64],
    counts: &ArrivalCounts,
) -> Option<Pattern> {
    let window = PATTERN_WINDOW_MINUTES * BUCKET_MS;
    let ahead = (AHEAD_MINUTES - 1) * BUCKET_MS;
    let mut seen = 0;
    let mut busiest = 0;
    for &day in days {
        let day_last = day + (last - first);
        if sum(counts, kind, day.saturating_sub(window), day_last + window) > 0 {
            seen += 1;
        }
        busiest = busiest.max(sum(counts, kind, day, day_last + ahead));
    }
    let needed = match rule {
        Rule::Daily => MIN_DAYS_SEEN,
        Rule::Weekly => days.len().max(2),
    };
    (seen >= needed && busiest > 0).then(|| Pattern {
        at_ms: first,
        until_ms: last + ahead,
        kind,
        arrivals: u64::from(busiest),
        seen,
        compared: days.len(),
        rule,
    })
}

/// [`decide_with_unseen_starts`], plus the pods the arrivals `expected` within the lead time
/// would need beyond what the queued work, the idle pods and the warm pool already cover.
/// Never below the answer without them; nothing added when `settings.prewarm` is off.
pub fn decide_ahead(
    settings: &Settings,
    demand: &Demand,
    fleet: &FleetSnapshot,
    starts: &[EgressKind],
    expected: &Expectation,
) -> Decision {
    let mut decision = decide_with_unseen_starts(settings, demand, fleet, starts);
    if settings.prewarm == Prewarm::Off || expected.arrivals.total() == 0 {
        return decision;
    }
    let mut ahead = demand.clone();
    for (kind, count) in expected.arrivals.iter() {
        ahead.add(kind, count);
    }
    let with_arrivals = decide_with_unseen_starts(settings, &ahead, fleet, starts);
    // Both counts hold the warm pool once; its idle pods take expected arrivals first.
    let pods = with_arrivals
        .unclamped
        .saturating_sub(decision.unclamped)
        .saturating_sub(u64::from(settings.warm_pool));
    if pods == 0 {
        return decision;
    }
    decision.prewarm_pods = pods;
    decision.prewarm_patterns = expected
        .patterns
        .iter()
        .map(|pattern| {
            format!(
                "{} {} arrival(s) expected {}, {}",
                pattern.arrivals,
                pattern.kind,
                pattern.time_text(),
                pattern.seen_text()
            )
        })
        .collect();
    decision.unclamped += pods;
    (decision.desired, decision.clamp) = clamp(settings, decision.unclamped);
    decision
}

/// The arrival counters of one queue kept in memory, as the Redis script keeps them: per
/// kind and bucket, saturating at `u16::MAX`, weeks older than [`WEEKS_KEPT`] forgotten.
/// The simulator learns with it; `serve` keeps the same counters in Redis.
#[derive(Debug, Clone, Default)]
pub struct ArrivalHistory {
    counts: BTreeMap<(EgressKind, Cell), u16>,
}

impl ArrivalHistory {
    /// Counts one arrival of `kind` at `at_ms`.
    pub fn record(&mut self, kind: EgressKind, at_ms: u64) {
        let cell = Cell::at(at_ms);
        let count = self.counts.entry((kind, cell)).or_default();
        *count = count.saturating_add(1);
        // What Redis does by key expiry.
        let oldest = cell.week.saturating_sub(WEEKS_KEPT - 1);
        self.counts.retain(|(_, kept), _| kept.week >= oldest);
    }

    /// The counts of the cells asked for, at `now_ms` (forgotten weeks read as zero).
    pub fn read(&self, now_ms: u64, cells: &[Cell]) -> ArrivalCounts {
        let oldest = Cell::at(now_ms).week.saturating_sub(WEEKS_KEPT - 1);
        let mut counts = ArrivalCounts::default();
        for ((kind, cell), count) in &self.counts {
            if cell.week >= oldest && cells.binary_search(cell).is_ok() {
                counts.set(*kind, *cell, u32::from(*count));
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EgressKind::RoomComposite;

    /// Monday 2024-01-01 00:00 UTC.
    const MONDAY: u64 = 1_704_067_200_000;
    const HOUR: u64 = 3_600_000;
    const MINUTE: u64 = 60_000;

    #[test]
    fn the_calendar_is_right() {
        assert_eq!(weekday(MONDAY), 0);
        assert_eq!(weekday(MONDAY + 5 * DAY_MS), 5);
        assert!(is_weekend(MONDAY + 6 * DAY_MS));
        assert!(!is_weekend(MONDAY + 7 * DAY_MS));
        // 2024-01-01 is in week 2817 since the epoch (a Thursday), 4 days + 0 h in: minute
        // 4 * 1440 = 5760.
        assert_eq!(
            Cell::at(MONDAY),
            Cell {
                week: 2817,
                bucket: 5760
            }
        );
        assert_eq!(
            Cell::at(MONDAY + 10 * HOUR + 4 * MINUTE + 59_999).bucket,
            5760 + 604
        );
        assert_eq!(Cell::at(MONDAY).start_ms(), MONDAY);
    }

    #[test]
    fn only_buckets_starting_within_the_lead_are_targets() {
        let ten = MONDAY + 10 * HOUR;
        assert_eq!(targets(ten - 60_000, 30_000), Vec::<u64>::new());
        assert_eq!(targets(ten - 30_000, 30_000), vec![ten]);
        assert_eq!(targets(ten - 60_000, 60_000), vec![ten]);
        assert_eq!(targets(ten - 1, 60_000), vec![ten]);
        // Once the minute has begun it is queued work, not a forecast: the next one is next.
        assert_eq!(targets(ten, 60_000), vec![ten + MINUTE]);
        assert_eq!(
            targets(ten - 1, 150_000),
            vec![ten, ten + MINUTE, ten + 2 * MINUTE]
        );
    }

    #[test]
    fn weekdays_compare_with_weekdays_and_skip_the_weekend() {
        // Tuesday of the second week: Mon, Fri, Thu, Wed, Tue before it.
        let tuesday = MONDAY + 8 * DAY_MS + 10 * HOUR;
        let days: Vec<u64> = daily_days(tuesday)
            .iter()
            .map(|d| (d - MONDAY) / DAY_MS)
            .collect();
        assert_eq!(days, vec![7, 4, 3, 2, 1]);
        // Sunday of the third week: Saturday, then the weekend days of the week before, then
        // the Sunday 14 days back: only 4 weekend days fall within two weeks.
        let sunday = MONDAY + 20 * DAY_MS;
        let days: Vec<u64> = daily_days(sunday)
            .iter()
            .map(|d| (d - MONDAY) / DAY_MS)
            .collect();
        assert_eq!(days, vec![19, 13, 12, 6]);
    }

    fn history(days: &[(u64, u16)], at: u64) -> ArrivalHistory {
        let mut history = ArrivalHistory::default();
        for (day, count) in days {
            for _ in 0..*count {
                history.record(RoomComposite, MONDAY + day * DAY_MS + at);
            }
        }
        history
    }

    #[test]
    fn four_of_five_weekdays_expect_the_busiest() {
        // 10:00-10:01 on Mon..Fri of week one: 3, 0, 5, 2, 4 arrivals.
        let history = history(&[(0, 3), (2, 5), (3, 2), (4, 4)], 10 * HOUR + 20_000);
        let now = MONDAY + 7 * DAY_MS + 10 * HOUR - 30_000;
        let cells = cells_to_read(now, 60_000);
        let expectation = expect(now, 60_000, &history.read(now, &cells));
        assert_eq!(expectation.arrivals.count(RoomComposite), 5);
        let pattern = &expectation.patterns[0];
        assert_eq!(pattern.seen_text(), "seen on 4 of the last 5 weekdays");
        assert_eq!(pattern.time_text(), "between 10:00 and 10:02 UTC");
        assert_eq!(pattern.rule, Rule::Daily);
    }

    #[test]
    fn arrivals_a_few_minutes_off_still_show_the_pattern() {
        // 10:00 on Monday and Wednesday; 09:58 on Thursday, 10:02 on Friday: seen on 4 days
        // within two minutes, and the busiest day from 10:00 to 10:02 brought 5.
        let mut history = history(&[(0, 3), (2, 5)], 10 * HOUR);
        for _ in 0..2 {
            history.record(RoomComposite, MONDAY + 3 * DAY_MS + 9 * HOUR + 58 * MINUTE);
            history.record(RoomComposite, MONDAY + 4 * DAY_MS + 10 * HOUR + 2 * MINUTE);
        }
        let now = MONDAY + 7 * DAY_MS + 10 * HOUR - 30_000;
        let expectation = expect(now, 60_000, &history.read(now, &cells_to_read(now, 60_000)));
        assert_eq!(expectation.arrivals.count(RoomComposite), 5);
        assert_eq!(
            expectation.patterns[0].seen_text(),
            "seen on 4 of the last 5 weekdays"
        );
        // At 10:03 the minutes ahead brought nothing on any day: nothing expected, though the
        // pattern is near.
        let now = MONDAY + 7 * DAY_MS + 10 * HOUR + 2 * MINUTE + 30_000;
        let expectation = expect(now, 60_000, &history.read(now, &cells_to_read(now, 60_000)));
        assert_eq!(expectation, Expectation::default());
    }

    #[test]
    fn two_days_are_not_a_pattern() {
        let history = history(&[(2, 5), (4, 4)], 10 * HOUR);
        let now = MONDAY + 7 * DAY_MS + 10 * HOUR - 30_000;
        let expectation = expect(now, 60_000, &history.read(now, &cells_to_read(now, 60_000)));
        assert_eq!(expectation, Expectation::default());
    }

    #[test]
    fn a_monday_meeting_two_weeks_running_is_a_weekly_pattern() {
        let history = history(&[(0, 6), (7, 4)], 9 * HOUR + 30 * MINUTE);
        let now = MONDAY + 14 * DAY_MS + 9 * HOUR + 29 * MINUTE;
        let expectation = expect(now, 60_000, &history.read(now, &cells_to_read(now, 60_000)));
        assert_eq!(expectation.arrivals.count(RoomComposite), 6);
        assert_eq!(
            expectation.patterns[0].seen_text(),
            "seen on 2 of the last 2 Mondays"
        );
        // One week alone is not.
        let history = history_one_week();
        let expectation = expect(now, 60_000, &history.read(now, &cells_to_read(now, 60_000)));
        assert_eq!(expectation, Expectation::default());
    }

    fn history_one_week() -> ArrivalHistory {
        history(&[(7, 4)], 9 * HOUR + 30 * MINUTE)
    }

    #[test]
    fn weeks_beyond_the_kept_ones_are_forgotten() {
        // Arrivals on every weekday of week one, then nothing for three weeks.
        let history = history(&[(0, 2), (1, 2), (2, 2), (3, 2), (4, 2)], 10 * HOUR);
        let now = MONDAY + 21 * DAY_MS + 10 * HOUR - 30_000;
        assert_eq!(
            history.read(now, &cells_to_read(now, 60_000)),
            ArrivalCounts::default()
        );
        // A new arrival drops the old weeks from memory too: weeks run Thursday to
        // Wednesday (the epoch's), so only week one's Thursday and Friday are in a week
        // still kept (two before now's), though no lookback of now reaches them.
        let mut history = history;
        history.record(RoomComposite, now);
        assert_eq!(history.counts.len(), 3);
    }

    #[test]
    fn counts_saturate() {
        let mut history = ArrivalHistory::default();
        for _ in 0..70_000 {
            history.record(RoomComposite, MONDAY);
        }
        let cells = [Cell::at(MONDAY)];
        assert_eq!(
            history.read(MONDAY, &cells).get(RoomComposite, cells[0]),
            65_535
        );
    }

    #[test]
    fn cells_are_few_and_sorted() {
        let now = MONDAY + 7 * DAY_MS + 10 * HOUR - 30_000;
        let cells = cells_to_read(now, 60_000);
        // 5 weekdays + 2 weeks back, of which last Monday is shared: 6 days, 5 minutes each.
        assert_eq!(cells.len(), 30);
        assert!(cells.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(cells_to_read(MONDAY + 10 * HOUR + MINUTE, 0).is_empty());
    }
    fn expected(kind: EgressKind, arrivals: u64) -> Expectation {
        Expectation {
            arrivals: Demand::from_counts([(kind, arrivals)]),
            patterns: vec![Pattern {
                at_ms: MONDAY + 7 * DAY_MS + 10 * HOUR,
                until_ms: MONDAY + 7 * DAY_MS + 10 * HOUR + 2 * MINUTE,
                kind,
                arrivals,
                seen: 4,
                compared: 5,
                rule: Rule::Daily,
            }],
        }
    }

    fn auto() -> Settings {
        Settings {
            prewarm: Prewarm::Auto,
            ..Settings::default()
        }
    }

    #[test]
    fn five_composites_expected_on_an_empty_fleet_want_five_pods() {
        let settings = auto();
        let decision = decide_ahead(
            &settings,
            &Demand::default(),
            &FleetSnapshot::default(),
            &[],
            &expected(RoomComposite, 5),
        );
        assert_eq!((decision.desired, decision.prewarm_pods), (5, 5));
        assert!(decision.reasons(&settings).contains(
            &"pre-warm: 5 pod(s) for 5 room_composite arrival(s) expected between 10:00 and 10:02 UTC, seen on 4 of the last 5 weekdays"
                .to_owned()
        ));
        // Off: nothing added.
        let off = decide_ahead(
            &Settings::default(),
            &Demand::default(),
            &FleetSnapshot::default(),
            &[],
            &expected(RoomComposite, 5),
        );
        assert_eq!((off.desired, off.prewarm_pods), (0, 0));
    }

    #[test]
    fn idle_pods_and_the_warm_pool_cover_expected_arrivals_first() {
        use crate::model::{Pod, PodState};
        // Two idle pods: the 5 composites need them and 3 new ones. Without the forecast
        // desired is 0 (idle pods are spare), so all 5 are pre-warm's, 2 of them existing.
        let fleet = FleetSnapshot {
            pods: vec![
                Pod::new("a", PodState::Ready),
                Pod::new("b", PodState::Ready),
            ],
        };
        let decision = decide_ahead(
            &auto(),
            &Demand::default(),
            &fleet,
            &[],
            &expected(RoomComposite, 5),
        );
        assert_eq!((decision.desired, decision.prewarm_pods), (5, 5));
        // A warm pool of 2 stands ready for 2 of them: 3 more, desired 5.
        let settings = Settings {
            warm_pool: 2,
            ..auto()
        };
        let decision = decide_ahead(
            &settings,
            &Demand::default(),
            &FleetSnapshot::default(),
            &[],
            &expected(RoomComposite, 5),
        );
        assert_eq!((decision.desired, decision.prewarm_pods), (5, 3));
    }

    #[test]
    fn queued_work_comes_first_and_is_never_lowered() {
        use crate::model::{Pod, PodState};
        // A busy pod with 2 tracks (1 of 3.2 cores) takes 4 more tracks; of 13 expected,
        // 9 need 2 new pods (6 a pod: the first on the idle rule, then 5 x 0.5 in 2.7).
        let fleet = FleetSnapshot {
            pods: vec![Pod::new("a", PodState::Ready).with_active("track", 2)],
        };
        let queued = Demand::from_counts([(EgressKind::RoomComposite, 1)]);
        let decision = decide_ahead(
            &auto(),
            &queued,
            &fleet,
            &[],
            &expected(EgressKind::Track, 13),
        );
        // Without the forecast: the busy pod + 1 new pod for the composite = 2.
        // With it: 2 + 2 = 4.
        assert_eq!((decision.desired, decision.prewarm_pods), (4, 2));
        assert_eq!(decision.new_pods, 1);
    }

    #[test]
    fn the_max_clamp_still_holds() {
        let settings = Settings {
            max_replicas: 3,
            ..auto()
        };
        let decision = decide_ahead(
            &settings,
            &Demand::default(),
            &FleetSnapshot::default(),
            &[],
            &expected(RoomComposite, 5),
        );
        assert_eq!(decision.desired, 3);
        assert_eq!(decision.clamp, Some(crate::model::Clamp::Max));
    }
}
