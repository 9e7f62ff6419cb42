//! The capacity gate: does the fleet snapshot show a pod that takes a job of this kind, once
//! the starts in flight and the jobs this dispatcher started since the snapshot are counted in?
//!
//! A start in flight (or being settled) holds a reservation of its kind until its outcome is
//! known: several starts are in flight at once, and each must find its own free capacity.
//! A start is visible in an egress pod's metrics as soon as the pod accepted it, so a refresh
//! that began after the start returned reflects it; until such a refresh the started job keeps
//! its reservation. A reservation is added to the pod livekit-server would have chosen, so that
//! one free slot is not handed out twice. With a Prometheus source the metrics lag by up to a
//! scrape interval, which `lag` accounts for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::fleet::FleetView;
use crate::model::{EgressKind, PodLoad, Settings, choose_pod};
use crate::queue::TicketId;

/// One start not yet reflected in the pods' metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    kind: EgressKind,
    made_at: Instant,
}

/// The starts of this dispatcher that the fleet snapshot does not show yet.
#[derive(Debug, Clone, Default)]
pub struct Reservations {
    held: Vec<Reservation>,
    /// Starts whose outcome is not known yet (in flight or being settled), by ticket.
    pending: HashMap<TicketId, EgressKind>,
    lag: Duration,
}

impl Reservations {
    /// No reservations; a start counts as reflected by a refresh that began `lag` after it.
    pub fn new(lag: Duration) -> Self {
        Reservations {
            held: Vec::new(),
            pending: HashMap::new(),
            lag,
        }
    }

    /// Holds capacity for a job of `kind` started at `at`.
    pub fn hold(&mut self, kind: EgressKind, at: Instant) {
        self.held.push(Reservation { kind, made_at: at });
    }

    /// Holds capacity for the start of `ticket` until its outcome is known.
    pub fn reserve(&mut self, ticket: TicketId, kind: EgressKind) {
        self.pending.insert(ticket, kind);
    }

    /// The start of `ticket` began a job at `at`: held until a refresh shows it.
    pub fn started(&mut self, ticket: &TicketId, at: Instant) {
        if let Some(kind) = self.pending.remove(ticket) {
            self.hold(kind, at);
        }
    }

    /// The start of `ticket` began no job (or one already over): its capacity is free again.
    pub fn release(&mut self, ticket: &TicketId) {
        self.pending.remove(ticket);
    }

    /// Reservations held, started jobs and starts of unknown outcome.
    pub fn len(&self) -> usize {
        self.held.len() + self.pending.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.pending.is_empty()
    }

    /// Drops the reservations that `view` reflects.
    pub fn release_reflected(&mut self, view: &FleetView) {
        let observed_from = view
            .refreshed_at
            .checked_sub(view.refresh_duration)
            .unwrap_or(view.refreshed_at);
        let lag = self.lag;
        self.held
            .retain(|reservation| reservation.made_at + lag >= observed_from);
    }

    /// The pods of `view` with the reservations placed where livekit-server would put them.
    pub fn loads(&self, view: &FleetView, settings: &Settings) -> Vec<PodLoad> {
        let snapshot = view.snapshot();
        let mut loads: Vec<PodLoad> = snapshot
            .pods
            .iter()
            .map(|pod| PodLoad::observed(pod, settings))
            .collect();
        let kinds = self
            .held
            .iter()
            .map(|reservation| reservation.kind)
            .chain(self.pending.values().copied());
        for kind in kinds {
            // A start the arithmetic has no room for means the snapshot is behind in the
            // other direction (a job ended), or that it already shows the job: nothing to
            // hold then.
            if let Some(index) = choose_pod(settings, &loads, kind) {
                loads[index].add(settings, kind);
            }
        }
        loads
    }

    /// Whether a job of `kind` fits on some pod now.
    pub fn fits(&self, view: &FleetView, settings: &Settings, kind: EgressKind) -> bool {
        choose_pod(settings, &self.loads(view, settings), kind).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::PodView;
    use crate::model::PodState;
    use std::collections::BTreeMap;

    fn pod(state: PodState, active: &[(&str, u64)]) -> PodView {
        PodView {
            address: format!("pod-{}", active.len()),
            node_id: None,
            state,
            active: active
                .iter()
                .map(|(kind, count)| (kind.to_string(), *count))
                .collect::<BTreeMap<_, _>>(),
            free_cpu_cores: 0.0,
            cpu_load: None,
            can_accept_video: None,
            last_scrape_age_seconds: None,
            missing_series: Vec::new(),
            last_error: None,
        }
    }

    fn view(pods: Vec<PodView>, refreshed_at: Instant) -> FleetView {
        FleetView {
            pods,
            refreshed_at,
            refresh_duration: Duration::from_millis(5),
            source_error: None,
        }
    }

    #[test]
    fn one_free_slot_is_handed_out_once_until_a_refresh_shows_it() {
        let settings = Settings::default();
        let start = Instant::now();
        let before = view(vec![pod(PodState::Ready, &[])], start);
        let mut reservations = Reservations::new(Duration::ZERO);
        assert!(reservations.fits(&before, &settings, EgressKind::RoomComposite));
        reservations.hold(EgressKind::RoomComposite, start + Duration::from_millis(1));
        assert!(!reservations.fits(&before, &settings, EgressKind::RoomComposite));
        assert!(!reservations.fits(&before, &settings, EgressKind::Track));
        // A refresh that began before the start does not release it.
        reservations.release_reflected(&view(
            vec![pod(PodState::Ready, &[])],
            start + Duration::from_millis(4),
        ));
        assert_eq!(reservations.len(), 1);
        // One that began after it does, and shows the job.
        let after = view(
            vec![pod(PodState::Ready, &[("room_composite", 1)])],
            start + Duration::from_millis(20),
        );
        reservations.release_reflected(&after);
        assert!(reservations.is_empty());
        assert!(!reservations.fits(&after, &settings, EgressKind::RoomComposite));
    }

    #[test]
    fn starting_terminating_and_unknown_pods_take_nothing() {
        let settings = Settings::default();
        let reservations = Reservations::new(Duration::ZERO);
        for state in [
            PodState::Starting,
            PodState::Terminating,
            PodState::Disabled,
            PodState::Unknown,
        ] {
            let fleet = view(vec![pod(state, &[])], Instant::now());
            assert!(
                !reservations.fits(&fleet, &settings, EgressKind::Track),
                "{state:?}"
            );
        }
        assert!(!reservations.fits(&view(vec![], Instant::now()), &settings, EgressKind::Track));
    }

    #[test]
    fn starts_in_flight_hold_capacity_until_their_outcome_is_known() {
        let settings = Settings::default();
        let start = Instant::now();
        let two_idle = view(
            vec![pod(PodState::Ready, &[]), pod(PodState::Ready, &[])],
            start,
        );
        let mut reservations = Reservations::new(Duration::ZERO);
        let (a, b): (TicketId, TicketId) = (
            "q.0123456789abcdef0123456789abcdef".parse().unwrap(),
            "q.fedcba9876543210fedcba9876543210".parse().unwrap(),
        );
        reservations.reserve(a.clone(), EgressKind::RoomComposite);
        assert!(reservations.fits(&two_idle, &settings, EgressKind::RoomComposite));
        reservations.reserve(b.clone(), EgressKind::RoomComposite);
        assert!(!reservations.fits(&two_idle, &settings, EgressKind::RoomComposite));
        // A start that began nothing frees its pod; one that started keeps it until a
        // refresh that began after it.
        reservations.release(&a);
        assert!(reservations.fits(&two_idle, &settings, EgressKind::RoomComposite));
        reservations.started(&b, start + Duration::from_millis(1));
        assert_eq!(reservations.len(), 1);
        reservations.release_reflected(&two_idle);
        assert_eq!(reservations.len(), 1, "a refresh from before the start");
    }

    #[test]
    fn a_lagging_source_holds_reservations_longer() {
        let start = Instant::now();
        let mut reservations = Reservations::new(Duration::from_secs(30));
        reservations.hold(EgressKind::Track, start);
        reservations.release_reflected(&view(vec![], start + Duration::from_secs(10)));
        assert_eq!(reservations.len(), 1);
        reservations.release_reflected(&view(vec![], start + Duration::from_secs(31)));
        assert!(reservations.is_empty());
    }
}
