//! One leadership term of the dispatcher: the pipeline of starts (see the map in the parent
//! module). The term's state only makes sense while the lease is held; the calls to
//! livekit-server run as tasks of the term's [`JoinSet`] and report back as [`Done`], so that
//! no answer, lookup or stop holds up the others, and all of them end with the term.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use livekit_protocol as proto;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::capacity::Reservations;
use super::livekit::{EgressApi, EgressApiError, ListFilter, StartFailure};
use super::matching::{FoundStatus, candidates, egress_error, found_status};
use super::{Dispatcher, FaultHook, FaultPoint, Order, TermEnd, jitter};
use crate::egress_request::StartRequest;
use crate::fleet::FleetView;
use crate::intake::now_ms;
use crate::queue::{
    FencedStore, Finish, QueueError, QueueEvent, StartOutcome, Ticket, TicketId, TicketState,
};
use crate::telemetry::DispatchOutcome;

/// Why a step ended early.
#[derive(Debug)]
pub(super) enum StepError {
    Queue(QueueError),
    Crashed(FaultPoint),
}

impl From<QueueError> for StepError {
    fn from(error: QueueError) -> Self {
        StepError::Queue(error)
    }
}

/// When to look again, and whether a change of the queue or the fleet should wake it sooner.
struct Wake {
    until: Instant,
    on_change: bool,
}

/// Why a queued ticket does not start now.
#[derive(Debug, Clone, Copy)]
struct Parked {
    until: Instant,
    /// In strict order, a parked head that waits for capacity holds everything behind it; a
    /// head whose room does not exist yet does not.
    holds_order: bool,
}

/// One attempt to start a ticket.
#[derive(Debug, Clone)]
struct Attempt {
    ticket: Ticket,
    id: String,
    /// When it claimed the ticket, ms since the epoch (the ticket's `dispatching_at`).
    began_ms: u64,
    request: StartRequest,
}

/// An attempt of unknown outcome being settled.
#[derive(Debug)]
struct Unsettled {
    attempt: Attempt,
    next_check: Instant,
    /// A `ListEgress` for it is in flight.
    looking: bool,
    /// Since when every `ListEgress` for it failed.
    failing_since: Option<Instant>,
}

impl Unsettled {
    /// An attempt to settle, first looked up at `next_check`.
    fn new(attempt: Attempt, next_check: Instant) -> Self {
        Unsettled {
            attempt,
            next_check,
            looking: false,
            failing_since: None,
        }
    }
}

/// What a start call task reports.
#[derive(Debug)]
enum Sent {
    Answered(Box<Result<proto::EgressInfo, EgressApiError>>),
    /// Not sent: the lease guard found too little time.
    Withheld(&'static str),
    Crashed(FaultPoint),
}

/// How an active ticket's egress was found by the reconcile.
#[derive(Debug)]
enum Found {
    Running,
    Over,
    Failed(String),
    /// Not listed at all (swept, or never known).
    Gone,
}

/// What a task of the term reports.
#[derive(Debug)]
enum Done {
    Call {
        attempt: Box<Attempt>,
        sent: Sent,
    },
    Lookup {
        ticket: TicketId,
        result: Result<Vec<proto::EgressInfo>, EgressApiError>,
    },
    Reconcile(Vec<(Ticket, Found)>),
    Stop {
        ticket: TicketId,
        egress_id: String,
        result: Result<(), EgressApiError>,
    },
}

/// The bound a start call must respect: sent while the lease is held with a margin, and over
/// before the next leader could conclude from the settle window that nothing started.
#[derive(Debug, Clone, Copy)]
struct SendGuard {
    claimed_at: Instant,
    settle_after: Duration,
    call_timeout: Duration,
    margin: Duration,
}

impl SendGuard {
    /// The call's time limit when it may be sent `now`, or why not.
    fn limit(&self, now: Instant, lease_held_until: Instant) -> Result<Duration, &'static str> {
        if lease_held_until < now + self.margin {
            return Err("the dispatcher lease has too little time left");
        }
        let window = (self.claimed_at + self.settle_after)
            .saturating_duration_since(now)
            .saturating_sub(self.margin);
        if window < self.call_timeout {
            return Err("the attempt's call no longer fits in its settle window");
        }
        Ok(self.call_timeout)
    }
}

/// One leadership term.
pub(super) struct Term<'a, A> {
    d: &'a Dispatcher<A>,
    fenced: FencedStore<'a>,
    lease_held_until: watch::Receiver<Instant>,
    reservations: Reservations,
    parked: HashMap<TicketId, Parked>,
    failures: HashMap<TicketId, u32>,
    not_found_since: HashMap<TicketId, Instant>,
    /// Tickets whose start call is in flight.
    in_flight: HashSet<TicketId>,
    /// The ticket of each start call task, to settle it should the task itself fail.
    call_tasks: HashMap<tokio::task::Id, TicketId>,
    unsettled: HashMap<TicketId, Unsettled>,
    /// Active tickets whose `StopEgress` is in flight.
    stopping: HashSet<TicketId>,
    reconciling: bool,
    tasks: JoinSet<Done>,
    next_reconcile: Instant,
    events: broadcast::Receiver<QueueEvent>,
    views: watch::Receiver<Arc<FleetView>>,
}

impl<'a, A: EgressApi> Term<'a, A> {
    pub(super) fn new(
        d: &'a Dispatcher<A>,
        token: u64,
        lease_held_until: watch::Receiver<Instant>,
    ) -> Self {
        Term {
            d,
            fenced: d.store.fenced(token),
            lease_held_until,
            reservations: Reservations::new(d.options.reservation_lag),
            parked: HashMap::new(),
            failures: HashMap::new(),
            not_found_since: HashMap::new(),
            in_flight: HashSet::new(),
            call_tasks: HashMap::new(),
            unsettled: HashMap::new(),
            stopping: HashSet::new(),
            reconciling: false,
            tasks: JoinSet::new(),
            next_reconcile: Instant::now(),
            events: d.events.subscribe(),
            views: d.fleet.subscribe(),
        }
    }

    fn fault(&self, point: FaultPoint) -> Result<(), StepError> {
        match &self.d.faults {
            Some(hook) if hook.crash_at(point) => Err(StepError::Crashed(point)),
            _ => Ok(()),
        }
    }

    pub(super) async fn lead(&mut self, shutdown: &CancellationToken) -> TermEnd {
        let mut redis_backoff = self.d.options.backoff_first;
        loop {
            if shutdown.is_cancelled() {
                return self.drain().await;
            }
            let result = match self.step().await {
                Ok(wake) => match self.wait(wake, shutdown).await {
                    Some(done) => self.handle(done).await,
                    None => Ok(()),
                },
                Err(error) => Err(error),
            };
            self.d
                .metrics
                .set_in_flight(&self.d.queue, self.in_flight.len());
            match result {
                Ok(()) => redis_backoff = self.d.options.backoff_first,
                Err(StepError::Crashed(point)) => return TermEnd::Crashed(point),
                Err(StepError::Queue(QueueError::Fenced)) => {
                    return TermEnd::Lost("fenced by a newer dispatcher");
                }
                Err(StepError::Queue(error)) => {
                    tracing::warn!(queue = %self.d.queue, %error, "Dispatch step failed; retrying.");
                    let until = Instant::now() + jitter(redis_backoff);
                    redis_backoff = (redis_backoff * 2).min(self.d.options.backoff_max);
                    // Answers keep arriving meanwhile; they are handled after the pause.
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                }
            }
        }
    }

    /// At shutdown: the starts in flight get the drain grace to answer; what is left stays
    /// `dispatching` for the next leader to settle.
    async fn drain(&mut self) -> TermEnd {
        let deadline = Instant::now() + self.d.options.drain_grace;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => {
                    if let Some(done) = self.joined(joined)
                        && let Err(error) = self.handle(done).await
                    {
                        tracing::warn!(queue = %self.d.queue, ?error, "An answer at shutdown was not recorded; the next leader settles it.");
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::info!(
                        queue = %self.d.queue,
                        in_flight = self.in_flight.len(),
                        "Shutting down with starts in flight; the next leader settles them."
                    );
                    break;
                }
            }
        }
        TermEnd::Shutdown
    }

    /// A finished task's report; a task that failed itself leaves its ticket to be settled.
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>,
    ) -> Option<Done> {
        match joined {
            Ok((id, done)) => {
                self.call_tasks.remove(&id);
                Some(done)
            }
            Err(error) => {
                tracing::error!(queue = %self.d.queue, %error, "A dispatcher task failed.");
                if let Some(ticket) = self.call_tasks.remove(&error.id()) {
                    self.in_flight.remove(&ticket);
                    // Its outcome is unknown: the next look at `dispatching` settles it.
                }
                self.reconciling = false;
                None
            }
        }
    }

    /// Sleeps until `wake`, a finished task (returned), shutdown, or a change of the queue or
    /// the fleet when `on_change`.
    async fn wait(&mut self, wake: Wake, shutdown: &CancellationToken) -> Option<Done> {
        let until = wake
            .until
            .min(Instant::now() + self.d.options.poll_interval);
        let queue = &self.d.queue;
        let events = &mut self.events;
        let views = &mut self.views;
        let queue_changed = async {
            loop {
                match events.recv().await {
                    Ok(QueueEvent::Changed(changed)) if &changed != queue => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        let fleet_changed = async {
            if views.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let joined = tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = tokio::time::sleep_until(until) => None,
            Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => Some(joined),
            _ = queue_changed, if wake.on_change => None,
            _ = fleet_changed, if wake.on_change => None,
        };
        joined.and_then(|joined| self.joined(joined))
    }

    /// Looks at everything once and starts what can start; never waits for livekit-server.
    async fn step(&mut self) -> Result<Wake, StepError> {
        self.fault(FaultPoint::BeforeStep)?;
        // This step reads the queue and the fleet as they are now: only changes from here on
        // should wake the next wait (this dispatcher's own writes are announced too).
        while !matches!(
            self.events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
        ) {}
        self.views.borrow_and_update();

        self.take_over_dispatching().await?;
        let now = Instant::now();
        let mut wake = now + self.d.options.poll_interval;
        // Each attempt of unknown outcome is looked up on its own.
        let due: Vec<TicketId> = self
            .unsettled
            .iter()
            .filter(|(_, entry)| !entry.looking)
            .filter_map(|(id, entry)| {
                wake = wake.min(entry.next_check);
                (entry.next_check <= now).then(|| id.clone())
            })
            .collect();
        for id in due {
            self.look_up(&id);
        }
        if now >= self.next_reconcile && !self.reconciling {
            self.reconcile().await?;
            self.next_reconcile = Instant::now() + self.d.options.reconcile_interval;
        }
        wake = wake.min(self.next_reconcile);
        let mut fill = self.fill().await?;
        fill.until = fill.until.min(wake);
        Ok(fill)
    }

    /// Tickets found `dispatching` that no call of this term is about: a previous leader's,
    /// or a call of this term that failed. Their outcome is unknown.
    async fn take_over_dispatching(&mut self) -> Result<(), StepError> {
        let ids = self.d.store.dispatching(&self.d.queue).await?;
        for id in ids {
            if self.in_flight.contains(&id) || self.unsettled.contains_key(&id) {
                continue;
            }
            let Some(ticket) = self.d.store.get(&id).await? else {
                continue;
            };
            let (TicketState::Dispatching, Some(attempt), Some(began_ms)) = (
                ticket.state,
                ticket.attempt_id.clone(),
                ticket.dispatching_at_ms,
            ) else {
                continue;
            };
            let request = match stored_request(&ticket) {
                Ok(request) => request,
                Err(error) => {
                    self.fail(&id, &error).await?;
                    continue;
                }
            };
            tracing::info!(queue = %self.d.queue, ticket = %id, "An attempt of unknown outcome is settled.");
            self.fenced.unsettle(&id, &attempt, now_ms()).await?;
            // Its pod, if it started, shows in the next refresh.
            self.reservations
                .hold(ticket.kind, std::time::Instant::now());
            self.unsettled.insert(
                id,
                Unsettled::new(
                    Attempt {
                        ticket,
                        id: attempt,
                        began_ms,
                        request,
                    },
                    Instant::now(),
                ),
            );
        }
        Ok(())
    }

    /// Starts the queued tickets the fleet can take, in order, up to the in-flight limit.
    async fn fill(&mut self) -> Result<Wake, StepError> {
        let now = Instant::now();
        let room = self
            .d
            .options
            .max_in_flight
            .saturating_sub(self.in_flight.len());
        if room == 0 {
            // Full: only an answer (a finished task) makes room.
            return Ok(Wake {
                until: self.next_reconcile,
                on_change: false,
            });
        }
        let mut wake = Wake {
            until: self.next_reconcile,
            on_change: true,
        };
        let view = match self.d.fleet.current() {
            Ok(view) => view,
            Err(error) => {
                tracing::debug!(queue = %self.d.queue, %error, "No trusted fleet snapshot; not dispatching.");
                return Ok(wake);
            }
        };
        self.reservations.release_reflected(&view);
        self.parked.retain(|_, parked| parked.until > now);
        let window = match self.d.options.order {
            Order::Strict => room + self.parked.len(),
            Order::Backfill => self.d.options.backfill_window.max(room + self.parked.len()),
        };
        let queued = self.d.store.peek_n(&self.d.queue, window).await?;
        let mut sent = 0;
        for ticket in queued {
            if let Some(parked) = self.parked.get(&ticket.id) {
                wake.until = wake.until.min(parked.until);
                if parked.holds_order && self.d.options.order == Order::Strict {
                    break;
                }
                continue;
            }
            let cost = self.d.settings.costs.cost(ticket.kind);
            if cost > self.d.settings.pod_cpu {
                let error = format!(
                    "unschedulable: a {} job costs {} cores, more than a pod's {} cores",
                    ticket.kind,
                    cost as f64 / 1000.0,
                    self.d.settings.pod_cpu as f64 / 1000.0
                );
                self.fail_queued(&ticket, &error).await?;
                continue;
            }
            if !self.reservations.fits(&view, &self.d.settings, ticket.kind) {
                if self.d.options.order == Order::Strict {
                    break;
                }
                continue;
            }
            self.send(ticket).await?;
            sent += 1;
            if sent == room {
                break;
            }
        }
        Ok(wake)
    }

    /// Claims `ticket` and sends its start call on a task of its own.
    async fn send(&mut self, ticket: Ticket) -> Result<(), StepError> {
        self.fault(FaultPoint::BeforeClaim)?;
        let attempt_id = uuid::Uuid::new_v4().simple().to_string();
        let claimed_at = Instant::now();
        let began_ms = now_ms();
        let Some(ticket) = self.fenced.claim(&ticket.id, &attempt_id, began_ms).await? else {
            // Cancelled (or taken) since it was read.
            return Ok(());
        };
        self.fault(FaultPoint::AfterClaim)?;
        let request = match stored_request(&ticket) {
            Ok(request) => request,
            Err(error) => return self.fail(&ticket.id, &error).await,
        };
        let id = ticket.id.clone();
        self.reservations.reserve(id.clone(), ticket.kind);
        self.in_flight.insert(id.clone());
        let attempt = Box::new(Attempt {
            ticket,
            id: attempt_id,
            began_ms,
            request,
        });
        let guard = SendGuard {
            claimed_at,
            settle_after: self.d.options.settle_after,
            call_timeout: self.d.options.call_timeout,
            margin: self.d.options.lease_margin,
        };
        let api = Arc::clone(&self.d.api);
        let faults = self.d.faults.clone();
        let lease = self.lease_held_until.clone();
        let task = self.tasks.spawn(async move {
            let sent = call(&*api, faults.as_deref(), &lease, guard, &attempt.request).await;
            Done::Call { attempt, sent }
        });
        self.call_tasks.insert(task.id(), id);
        Ok(())
    }

    async fn handle(&mut self, done: Done) -> Result<(), StepError> {
        match done {
            Done::Call { attempt, sent } => {
                let id = attempt.ticket.id.clone();
                self.in_flight.remove(&id);
                let result = self.answered(&attempt, sent).await;
                if matches!(result, Err(StepError::Queue(_))) && !self.unsettled.contains_key(&id) {
                    // The answer could not be recorded: settle the attempt like a lost answer.
                    self.unsettled
                        .insert(id, Unsettled::new(*attempt, Instant::now()));
                }
                result
            }
            Done::Lookup { ticket, result } => self.looked_up(&ticket, result).await,
            Done::Reconcile(found) => {
                self.reconciling = false;
                self.reconciled(found).await
            }
            Done::Stop {
                ticket,
                egress_id,
                result,
            } => self.stopped(&ticket, &egress_id, result).await,
        }
    }

    /// What the answer to a start call means for its ticket.
    async fn answered(&mut self, attempt: &Attempt, sent: Sent) -> Result<(), StepError> {
        let ticket = &attempt.ticket;
        let error = match sent {
            Sent::Crashed(point) => return Err(StepError::Crashed(point)),
            Sent::Withheld(why) => {
                tracing::warn!(queue = %self.d.queue, ticket = %ticket.id, reason = why, "Start not sent; the ticket goes back to its place.");
                return self.not_started(attempt, false).await;
            }
            Sent::Answered(answer) => match *answer {
                Ok(info) => {
                    self.fault(FaultPoint::AfterCall)?;
                    return self
                        .record_start(attempt, &info, DispatchOutcome::started)
                        .await;
                }
                Err(error) => error,
            },
        };
        self.fault(FaultPoint::AfterCall)?;
        let failure = error.start_failure();
        match failure {
            StartFailure::Unavailable
            | StartFailure::Unreachable
            | StartFailure::Unauthenticated => {
                let outcome = match failure {
                    StartFailure::Unavailable => DispatchOutcome::unavailable,
                    StartFailure::Unreachable => DispatchOutcome::unreachable,
                    _ => DispatchOutcome::unauthenticated,
                };
                if failure == StartFailure::Unauthenticated {
                    tracing::error!(queue = %self.d.queue, %error, "livekit-server refused the API credentials; check LIVEKIT_API_KEY and LIVEKIT_API_SECRET and the clocks.");
                } else {
                    tracing::info!(queue = %self.d.queue, ticket = %ticket.id, %error, "Start not taken; the ticket is retried at its place.");
                }
                self.d.metrics.outcome(outcome);
                self.not_started(attempt, true).await
            }
            StartFailure::NotFound => {
                let since = *self
                    .not_found_since
                    .entry(ticket.id.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() >= self.d.options.not_found_retry {
                    self.reservations.release(&ticket.id);
                    self.fail(
                        &ticket.id,
                        &format!(
                            "the room did not exist for {:?}: {error}",
                            self.d.options.not_found_retry
                        ),
                    )
                    .await
                } else {
                    tracing::info!(queue = %self.d.queue, ticket = %ticket.id, room = ?ticket.room_name, "Room not found yet; retrying.");
                    self.d.metrics.outcome(DispatchOutcome::not_found);
                    self.not_started(attempt, false).await
                }
            }
            StartFailure::Rejected => {
                self.reservations.release(&ticket.id);
                self.fail(
                    &ticket.id,
                    &format!("livekit-server refused the request: {error}"),
                )
                .await
            }
            StartFailure::Unknown => {
                tracing::warn!(queue = %self.d.queue, ticket = %ticket.id, %error, "Start outcome unknown; it is settled on its own.");
                self.d.metrics.outcome(DispatchOutcome::unknown);
                self.fenced
                    .unsettle(&ticket.id, &attempt.id, now_ms())
                    .await?;
                // Started or not, the next fleet refresh shows it: the reservation is held
                // until then, not for the whole settling.
                self.reservations
                    .started(&ticket.id, std::time::Instant::now());
                self.unsettled.insert(
                    ticket.id.clone(),
                    Unsettled::new(attempt.clone(), Instant::now()),
                );
                Ok(())
            }
        }
    }

    /// The attempt certainly started nothing: the ticket goes back to its place (after a
    /// backoff that grows with its failures), or is cancelled when that was asked for.
    async fn not_started(&mut self, attempt: &Attempt, holds_order: bool) -> Result<(), StepError> {
        let id = &attempt.ticket.id;
        self.reservations.release(id);
        if self.cancel_requested(id).await? {
            return self.cancelled(id, None).await;
        }
        self.fenced.requeue(id, &attempt.id).await?;
        let failures = self.failures.entry(id.clone()).or_default();
        *failures = failures.saturating_add(1);
        let exponent = (*failures - 1).min(16);
        let delay =
            (self.d.options.backoff_first * 2u32.pow(exponent)).min(self.d.options.backoff_max);
        self.parked.insert(
            id.clone(),
            Parked {
                until: Instant::now() + jitter(delay),
                holds_order,
            },
        );
        Ok(())
    }

    async fn cancel_requested(&self, id: &TicketId) -> Result<bool, StepError> {
        Ok(self
            .d
            .store
            .get(id)
            .await?
            .is_some_and(|ticket| ticket.cancel_requested_at_ms.is_some()))
    }

    async fn cancelled(&mut self, id: &TicketId, egress_id: Option<&str>) -> Result<(), StepError> {
        if self
            .fenced
            .finish(id, &Finish::Cancelled, egress_id, now_ms())
            .await?
        {
            tracing::info!(queue = %self.d.queue, ticket = %id, egress_id, "Cancelled as asked while it was being started.");
            self.d.metrics.outcome(DispatchOutcome::cancelled);
        }
        self.forget(id);
        Ok(())
    }

    /// Records the egress an attempt started (or was found to have started).
    async fn record_start(
        &mut self,
        attempt: &Attempt,
        info: &proto::EgressInfo,
        outcome: DispatchOutcome,
    ) -> Result<(), StepError> {
        let ticket = &attempt.ticket;
        let now = now_ms();
        let recorded = self
            .fenced
            .mark_started(&ticket.id, &info.egress_id, now)
            .await?;
        self.fault(FaultPoint::AfterStarted)?;
        self.forget(&ticket.id);
        let started = match recorded {
            StartOutcome::Started => true,
            StartOutcome::AlreadyEnded | StartOutcome::AlreadyFailed => {
                tracing::info!(queue = %self.d.queue, ticket = %ticket.id, egress_id = %info.egress_id, failed = recorded == StartOutcome::AlreadyFailed, "Egress started and was already over when its start was recorded.");
                self.reservations.release(&ticket.id);
                self.d.metrics.outcome(outcome);
                self.d.metrics.outcome(match recorded {
                    StartOutcome::AlreadyFailed => DispatchOutcome::failed,
                    _ => DispatchOutcome::ended,
                });
                return Ok(());
            }
            StartOutcome::NotApplied => {
                // Recorded first through its `egress_started` webhook, or moved by someone.
                let current = self.d.store.get(&ticket.id).await?;
                let same = current.as_ref().and_then(|t| t.egress_id.as_deref())
                    == Some(info.egress_id.as_str());
                if !same {
                    tracing::error!(
                        queue = %self.d.queue, ticket = %ticket.id, egress_id = %info.egress_id,
                        state = ?current.map(|t| t.state),
                        "Egress started but the ticket records something else; check for a second recording."
                    );
                }
                same
            }
            StartOutcome::OwnedByOther => {
                tracing::error!(queue = %self.d.queue, ticket = %ticket.id, egress_id = %info.egress_id, "The egress is recorded for another ticket; this attempt is settled on its own.");
                self.unsettled.insert(
                    ticket.id.clone(),
                    Unsettled::new(
                        attempt.clone(),
                        Instant::now() + self.d.options.recheck_interval,
                    ),
                );
                return Ok(());
            }
        };
        self.reservations
            .started(&ticket.id, std::time::Instant::now());
        if started {
            let wait = now.saturating_sub(ticket.enqueued_at_ms) as f64 / 1000.0;
            self.d.metrics.enqueue_to_start_seconds.observe(wait);
            self.d.metrics.outcome(outcome);
            tracing::info!(
                queue = %self.d.queue, ticket = %ticket.id, egress_id = %info.egress_id,
                room = ?ticket.room_name, kind = %ticket.kind, wait_seconds = wait,
                adopted = outcome == DispatchOutcome::adopted,
                "Egress started."
            );
            if self.cancel_requested(&ticket.id).await? {
                self.stop(&ticket.id, &info.egress_id);
            }
        }
        Ok(())
    }

    /// Asks livekit-server whether the attempt of `id` started an egress.
    fn look_up(&mut self, id: &TicketId) {
        let Some(entry) = self.unsettled.get_mut(id) else {
            return;
        };
        entry.looking = true;
        // Every egress of the room, ended ones too: one that already ended was still this
        // attempt's recording. Web egress has no room: every egress, ended ones too.
        let filter = match entry.attempt.request.room_name() {
            Some(room) => ListFilter::Room(room.to_owned()),
            None => ListFilter::All,
        };
        let api = Arc::clone(&self.d.api);
        let ticket = id.clone();
        self.tasks.spawn(async move {
            let result = api.list_egress(&filter, false).await;
            Done::Lookup { ticket, result }
        });
    }

    /// Settles an attempt of unknown outcome with what `ListEgress` answered.
    async fn looked_up(
        &mut self,
        id: &TicketId,
        result: Result<Vec<proto::EgressInfo>, EgressApiError>,
    ) -> Result<(), StepError> {
        let now = Instant::now();
        let options = &self.d.options;
        let Some(entry) = self.unsettled.get_mut(id) else {
            return Ok(());
        };
        entry.looking = false;
        let settled_at_ms = entry
            .attempt
            .began_ms
            .saturating_add(options.settle_after.as_millis() as u64);
        let listed = match result {
            Ok(listed) => listed,
            // A room filter never answers this; an older server may: nothing is listed.
            Err(EgressApiError::Twirp { code, .. }) if code == "not_found" => Vec::new(),
            Err(error) => {
                let since = *entry.failing_since.get_or_insert(now);
                entry.next_check = now + options.recheck_interval;
                if since.elapsed() < options.unreachable_limit || now_ms() < settled_at_ms {
                    tracing::warn!(queue = %self.d.queue, ticket = %id, %error, "ListEgress failed; the attempt stays unsettled.");
                    return Ok(());
                }
                let attempt = self.unsettled.remove(id).expect("looked up above").attempt;
                self.reservations.release(id);
                self.d.metrics.outcome(DispatchOutcome::unsettled);
                let reason = format!(
                    "whether attempt {} started could not be settled: livekit-server could not be asked for {:?}: {error}",
                    attempt.id, options.unreachable_limit
                );
                return self.fail(id, &reason).await;
            }
        };
        entry.failing_since = None;
        let attempt = entry.attempt.clone();
        let found: Vec<proto::EgressInfo> = candidates(
            &listed,
            &attempt.request,
            attempt.began_ms,
            options.clock_skew,
        )
        .into_iter()
        .cloned()
        .collect();
        for info in found {
            if self
                .d
                .store
                .egress_recorded_in(&self.d.served, &info.egress_id)
                .await?
            {
                continue;
            }
            self.unsettled.remove(id);
            return self.adopt(&attempt, &info).await;
        }
        let now_ms = now_ms();
        if now_ms < settled_at_ms {
            let left = Duration::from_millis(settled_at_ms - now_ms);
            if let Some(entry) = self.unsettled.get_mut(id) {
                entry.next_check = now + options.recheck_interval.min(left);
            }
            return Ok(());
        }
        // Nothing listed, and nothing can start any more.
        self.unsettled.remove(id);
        self.reservations.release(id);
        self.fault(FaultPoint::BeforeRequeue)?;
        if self.cancel_requested(id).await? {
            return self.cancelled(id, None).await;
        }
        if self.fenced.requeue(id, &attempt.id).await? {
            tracing::info!(queue = %self.d.queue, ticket = %id, "The attempt started nothing; the ticket is back at its place.");
            self.d.metrics.outcome(DispatchOutcome::requeued);
        }
        self.fault(FaultPoint::AfterRequeue)?;
        Ok(())
    }

    /// Records what an attempt of unknown outcome turned out to have started.
    async fn adopt(
        &mut self,
        attempt: &Attempt,
        info: &proto::EgressInfo,
    ) -> Result<(), StepError> {
        self.fault(FaultPoint::BeforeAdopt)?;
        let id = &attempt.ticket.id;
        match found_status(info) {
            FoundStatus::Running => {
                self.record_start(attempt, info, DispatchOutcome::adopted)
                    .await
            }
            FoundStatus::Over => {
                // It recorded and is over already: the request was served once.
                self.reservations.release(id);
                if self.cancel_requested(id).await? {
                    return self.cancelled(id, Some(&info.egress_id)).await;
                }
                if self
                    .fenced
                    .finish(id, &Finish::Ended, Some(&info.egress_id), now_ms())
                    .await?
                {
                    tracing::info!(queue = %self.d.queue, ticket = %id, egress_id = %info.egress_id, "An attempt of unknown outcome had recorded, and is over.");
                    self.d.metrics.outcome(DispatchOutcome::adopted);
                    self.d.metrics.outcome(DispatchOutcome::ended);
                }
                self.forget(id);
                Ok(())
            }
            FoundStatus::Failed => {
                self.reservations.release(id);
                let error = egress_error(info);
                if self
                    .fenced
                    .finish(
                        id,
                        &Finish::Failed(error.clone()),
                        Some(&info.egress_id),
                        now_ms(),
                    )
                    .await?
                {
                    tracing::warn!(queue = %self.d.queue, ticket = %id, egress_id = %info.egress_id, error, "The egress of an attempt failed; kept as a dead letter.");
                    self.d.metrics.outcome(DispatchOutcome::failed);
                }
                self.forget(id);
                Ok(())
            }
        }
    }

    /// Stops the egress of an active ticket whose cancel was asked for.
    fn stop(&mut self, id: &TicketId, egress_id: &str) {
        if !self.stopping.insert(id.clone()) {
            return;
        }
        let api = Arc::clone(&self.d.api);
        let ticket = id.clone();
        let egress_id = egress_id.to_owned();
        self.tasks.spawn(async move {
            let result = api.stop_egress(&egress_id).await.map(drop);
            Done::Stop {
                ticket,
                egress_id,
                result,
            }
        });
    }

    async fn stopped(
        &mut self,
        id: &TicketId,
        egress_id: &str,
        result: Result<(), EgressApiError>,
    ) -> Result<(), StepError> {
        self.stopping.remove(id);
        match result {
            // Stopping, or over already.
            Ok(_) => {}
            Err(EgressApiError::Twirp { code, .. })
                if code == "failed_precondition" || code == "not_found" => {}
            Err(error) => {
                tracing::warn!(queue = %self.d.queue, ticket = %id, egress_id, %error, "StopEgress failed; retried at the next check of the active tickets.");
                return Ok(());
            }
        }
        self.cancelled(id, None).await
    }

    /// Reads the active tickets and checks them against livekit-server on a task.
    async fn reconcile(&mut self) -> Result<(), StepError> {
        self.forget_gone().await?;
        let ids = self.d.store.active(&self.d.queue).await?;
        let mut tickets = Vec::new();
        for id in ids {
            if let Some(ticket) = self.d.store.get(&id).await?
                && ticket.egress_id.is_some()
            {
                tickets.push(ticket);
            }
        }
        if tickets.is_empty() {
            return Ok(());
        }
        self.reconciling = true;
        let api = Arc::clone(&self.d.api);
        let queue = self.d.queue.clone();
        self.tasks
            .spawn(async move { Done::Reconcile(check_active(&*api, &queue, tickets).await) });
        Ok(())
    }

    async fn reconciled(&mut self, found: Vec<(Ticket, Found)>) -> Result<(), StepError> {
        for (ticket, found) in found {
            let egress_id = ticket.egress_id.clone().unwrap_or_default();
            let finish = match found {
                Found::Running => {
                    if ticket.cancel_requested_at_ms.is_some() {
                        self.stop(&ticket.id, &egress_id);
                    }
                    continue;
                }
                Found::Over | Found::Gone => Finish::Ended,
                Found::Failed(error) => Finish::Failed(error),
            };
            if self
                .fenced
                .finish(&ticket.id, &finish, None, now_ms())
                .await?
            {
                tracing::info!(queue = %self.d.queue, ticket = %ticket.id, %egress_id, ?finish, "Egress found over; ticket finished.");
                self.d.metrics.outcome(match finish {
                    Finish::Failed(_) => DispatchOutcome::failed,
                    _ => DispatchOutcome::ended,
                });
            }
        }
        Ok(())
    }

    /// Claims `ticket` and fails it at once (a ticket that can never start).
    async fn fail_queued(&mut self, ticket: &Ticket, error: &str) -> Result<(), StepError> {
        let attempt = uuid::Uuid::new_v4().simple().to_string();
        if self
            .fenced
            .claim(&ticket.id, &attempt, now_ms())
            .await?
            .is_some()
        {
            self.fail(&ticket.id, error).await?;
        }
        Ok(())
    }

    async fn fail(&mut self, id: &TicketId, error: &str) -> Result<(), StepError> {
        if self.fenced.mark_failed(id, error, now_ms()).await? {
            tracing::warn!(queue = %self.d.queue, ticket = %id, error, "Request failed; kept as a dead letter.");
            self.d.metrics.outcome(DispatchOutcome::failed);
        }
        self.forget(id);
        Ok(())
    }

    fn forget(&mut self, id: &TicketId) {
        self.parked.remove(id);
        self.failures.remove(id);
        self.not_found_since.remove(id);
    }

    /// Drops the retry state of tickets no longer queued (cancelled while waiting).
    async fn forget_gone(&mut self) -> Result<(), StepError> {
        let tracked: Vec<TicketId> = self
            .failures
            .keys()
            .chain(self.not_found_since.keys())
            .cloned()
            .collect();
        for id in tracked {
            let queued = self
                .d
                .store
                .get(&id)
                .await?
                .is_some_and(|ticket| ticket.state == TicketState::Queued);
            if !queued {
                self.forget(&id);
            }
        }
        Ok(())
    }
}

/// The start call of one attempt, behind the lease guard.
async fn call<A: EgressApi>(
    api: &A,
    faults: Option<&dyn FaultHook>,
    lease_held_until: &watch::Receiver<Instant>,
    guard: SendGuard,
    request: &StartRequest,
) -> Sent {
    if let Some(hook) = faults {
        hook.before_send();
        if hook.crash_at(FaultPoint::DuringCall) {
            // Send it, and die before the answer (or before it is even sent: either happens).
            let _ = tokio::time::timeout(
                Duration::from_millis(3),
                api.start(request, guard.call_timeout),
            )
            .await;
            return Sent::Crashed(FaultPoint::DuringCall);
        }
    }
    let held_until = *lease_held_until.borrow();
    match guard.limit(Instant::now(), held_until) {
        Ok(limit) => Sent::Answered(Box::new(api.start(request, limit).await)),
        Err(why) => Sent::Withheld(why),
    }
}

/// How each active ticket's egress stands: by room (one `ListEgress` per room), else by id.
async fn check_active<A: EgressApi>(
    api: &A,
    queue: &crate::queue::QueueName,
    tickets: Vec<Ticket>,
) -> Vec<(Ticket, Found)> {
    let mut by_room: HashMap<String, Vec<Ticket>> = HashMap::new();
    for ticket in tickets {
        by_room
            .entry(ticket.room_name.clone())
            .or_default()
            .push(ticket);
    }
    let mut found = Vec::new();
    for (room, tickets) in by_room {
        let listed = match api
            .list_egress(&ListFilter::Room(room.clone()), false)
            .await
        {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(%queue, room = ?room, %error, "ListEgress failed; active tickets not checked.");
                continue;
            }
        };
        for ticket in tickets {
            let egress_id = ticket.egress_id.clone().unwrap_or_default();
            let mut info = listed
                .iter()
                .find(|info| info.egress_id == egress_id)
                .cloned();
            if info.is_none() {
                // Web egress is not listed under the room: ask for it by id (exclusive).
                info = match api
                    .list_egress(&ListFilter::Egress(egress_id.clone()), false)
                    .await
                {
                    Ok(listed) => listed.into_iter().next(),
                    Err(EgressApiError::Twirp { code, .. }) if code == "not_found" => None,
                    Err(error) => {
                        tracing::warn!(%queue, %egress_id, %error, "ListEgress failed; the active ticket is not checked.");
                        continue;
                    }
                };
            }
            let state = match info {
                None => Found::Gone,
                Some(info) => match found_status(&info) {
                    FoundStatus::Running => Found::Running,
                    FoundStatus::Over => Found::Over,
                    FoundStatus::Failed => Found::Failed(egress_error(&info)),
                },
            };
            found.push((ticket, state));
        }
    }
    found
}

/// The stored start request of a ticket, as it will be sent.
pub(crate) fn stored_request(ticket: &Ticket) -> Result<StartRequest, String> {
    let value = match &ticket.request {
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|error| format!("the stored request is not JSON: {error}"))?,
        ),
        None => None,
    };
    StartRequest::parse(ticket.kind, &ticket.room_name, value)
        .map_err(|error| format!("the stored request is invalid: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_sends_only_what_fits_in_the_lease_and_the_settle_window() {
        let claimed_at = Instant::now();
        let guard = SendGuard {
            claimed_at,
            settle_after: Duration::from_secs(45),
            call_timeout: Duration::from_secs(40),
            margin: Duration::from_secs(2),
        };
        let lease = claimed_at + Duration::from_secs(10);
        assert_eq!(guard.limit(claimed_at, lease), Ok(Duration::from_secs(40)));
        // Frozen for 4 s after the claim: 45 - 4 - 2 < 40.
        assert!(
            guard
                .limit(claimed_at + Duration::from_secs(4), lease)
                .is_err()
        );
        // The lease ends within the margin.
        assert!(
            guard
                .limit(claimed_at, claimed_at + Duration::from_secs(1))
                .is_err()
        );
    }
}
