//! The dispatcher (DESIGN.md 3): one leader per queue starts the head of the queue through
//! livekit-server when the fleet can take it, exactly once, in order.
//!
//! One step at a time, and at most one start in flight:
//! 1. Attempts of unknown outcome first (this leader's, or a previous leader's found as
//!    `dispatching`): `ListEgress` for the ticket's room; an egress the attempt may have started
//!    is adopted; when none shows and the attempt began longer ago than `settle_after` (above
//!    the call timeout, itself above livekit-server's no-capacity answer), nothing can start
//!    any more, and the ticket goes back to its place. Nothing else starts meanwhile.
//! 2. Now and then, the `active` tickets are checked against `ListEgress`, so that an egress
//!    whose `egress_ended` webhook was lost does not hold its ticket forever.
//! 3. The head of the queue, when the fleet snapshot (plus the starts it does not show yet)
//!    has a pod that admits it; in `backfill` order a later ticket that fits when the head
//!    fits nowhere. The ticket is marked `dispatching` (attempt id and time) before the call.
//!
//! Every write carries the lease's fencing token; see [`lease`]. A crash anywhere leaves at
//! worst a `dispatching` ticket, which the next leader settles as in 1.

pub mod capacity;
pub mod lease;
pub mod livekit;
pub mod matching;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use livekit_protocol as proto;
use rand::Rng;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::egress_request::StartRequest;
use crate::fleet::{Fleet, FleetView};
use crate::intake::now_ms;
use crate::model::Settings;
use crate::queue::{FencedStore, QueueError, QueueEvent, QueueName, QueueStore, Ticket, TicketId};
use crate::telemetry::{DispatchMetrics, DispatchOutcome};
use capacity::Reservations;
use lease::Lease;
use livekit::{EgressApi, EgressApiError, ListFilter, StartFailure};
use matching::{FoundStatus, candidates, found_status};

/// Which queued ticket may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Only the head: it waits until some pod can take it, and nothing behind it starts first.
    #[default]
    Strict,
    /// When the head fits on no pod, a later ticket that fits starts (big jobs may wait longer).
    Backfill,
}

/// Timing and limits of the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchOptions {
    /// Strict FIFO or backfill.
    pub order: Order,
    /// Lease time: a standby takes over within it when the leader dies.
    pub lease: Duration,
    /// How long after an attempt began an egress it started must be visible: above the call
    /// timeout, itself above livekit-server's no-capacity answer time.
    pub settle_after: Duration,
    /// How long a start answered `not_found` (room not created yet) is retried.
    pub not_found_retry: Duration,
    /// First retry delay after a failed start; it doubles per failure, with jitter.
    pub backoff_first: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often the active tickets are checked against `ListEgress`.
    pub reconcile_interval: Duration,
    /// How often an unsettled attempt is looked up again.
    pub recheck_interval: Duration,
    /// Longest sleep without any event.
    pub poll_interval: Duration,
    /// How far a refresh must begin after a start to show it (Prometheus lags a scrape).
    pub reservation_lag: Duration,
    /// Queued tickets looked at in backfill order.
    pub backfill_window: usize,
    /// Tolerated clock difference between this process and livekit-server.
    pub clock_skew: Duration,
    /// How long a start in flight at shutdown may still take before it is left unsettled.
    pub drain_grace: Duration,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            order: Order::Strict,
            lease: Duration::from_secs(10),
            settle_after: livekit::DEFAULT_REQUEST_TIMEOUT + Duration::from_secs(5),
            not_found_retry: Duration::from_secs(60),
            backoff_first: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(30),
            recheck_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(2),
            reservation_lag: Duration::ZERO,
            backfill_window: 32,
            clock_skew: Duration::from_secs(2),
            drain_grace: Duration::from_secs(5),
        }
    }
}

/// A step boundary where fault injection may stop the dispatcher as if it were killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Before a step reads anything.
    BeforeStep,
    /// Before the head is claimed.
    BeforeClaim,
    /// The ticket is `dispatching`; nothing called yet.
    AfterClaim,
    /// The start request is on its way: stopped before the answer arrives.
    DuringCall,
    /// The start answered; its outcome is not written yet.
    AfterCall,
    /// The ticket is `active`.
    AfterStarted,
    /// An egress of an earlier attempt was found; not adopted yet.
    BeforeAdopt,
    /// An unsettled attempt was found to have started nothing; not put back yet.
    BeforeRequeue,
    /// The ticket was put back in the queue.
    AfterRequeue,
}

impl FaultPoint {
    /// Every point, for tests that pick one.
    pub const ALL: [FaultPoint; 9] = [
        FaultPoint::BeforeStep,
        FaultPoint::BeforeClaim,
        FaultPoint::AfterClaim,
        FaultPoint::DuringCall,
        FaultPoint::AfterCall,
        FaultPoint::AfterStarted,
        FaultPoint::BeforeAdopt,
        FaultPoint::BeforeRequeue,
        FaultPoint::AfterRequeue,
    ];
}

/// Fault injection: asked at every [`FaultPoint`] whether the dispatcher dies there.
pub trait FaultHook: Send + Sync {
    /// True to stop the dispatcher at `point` at once, without releasing anything.
    fn crash_at(&self, point: FaultPoint) -> bool;
}

/// Why [`Dispatcher::run`] ended other than by shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// A [`FaultHook`] stopped it.
    #[error("the dispatcher was stopped by fault injection at {0:?}")]
    Crashed(FaultPoint),
}

/// Why a step ended early.
#[derive(Debug)]
enum StepError {
    Queue(QueueError),
    Crashed(FaultPoint),
}

impl From<QueueError> for StepError {
    fn from(error: QueueError) -> Self {
        StepError::Queue(error)
    }
}

/// Why a leadership term ended.
enum TermEnd {
    Shutdown,
    Lost(&'static str),
    Crashed(FaultPoint),
}

/// What to do after a step.
enum Next {
    /// Another step at once.
    Continue,
    /// Sleep until `until`, or until the queue or the fleet changes when `on_change`.
    Wait { until: Instant, on_change: bool },
}

/// Why a queued ticket does not start now.
#[derive(Debug, Clone, Copy)]
struct Parked {
    until: Instant,
    /// In strict order, a parked head that waits for capacity holds everything behind it; a
    /// head whose room does not exist yet does not.
    holds_order: bool,
}

/// The dispatcher of one queue.
pub struct Dispatcher<A> {
    queue: QueueName,
    store: QueueStore,
    fleet: Fleet,
    api: A,
    settings: Settings,
    options: DispatchOptions,
    holder: String,
    events: broadcast::Sender<QueueEvent>,
    metrics: Arc<DispatchMetrics>,
    faults: Option<Arc<dyn FaultHook>>,
}

impl<A: EgressApi> Dispatcher<A> {
    /// A dispatcher of `queue` identified as `holder` in the lease.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: QueueName,
        store: QueueStore,
        fleet: Fleet,
        api: A,
        settings: Settings,
        options: DispatchOptions,
        holder: String,
        events: broadcast::Sender<QueueEvent>,
        metrics: Arc<DispatchMetrics>,
    ) -> Self {
        Dispatcher {
            queue,
            store,
            fleet,
            api,
            settings,
            options,
            holder,
            events,
            metrics,
            faults: None,
        }
    }

    /// Adds fault injection (tests).
    pub fn with_faults(mut self, faults: Arc<dyn FaultHook>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The holder id used in the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Stands by for the lease, leads while it holds it, and stands by again when it loses it,
    /// until `shutdown`; then gives the lease up.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DispatchError> {
        let standby_poll = (self.options.lease / 4).max(Duration::from_millis(10));
        // A standby shows 0, so that every replica exports the series.
        self.metrics.set_leader(&self.queue, &self.holder, false);
        loop {
            let lease = loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let attempt_at = Instant::now();
                match Lease::acquire(
                    &self.store,
                    &self.queue,
                    &self.holder,
                    self.options.lease,
                    now_ms(),
                )
                .await
                {
                    Ok(Some(lease)) => break (lease, attempt_at),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(queue = %self.queue, %error, "Dispatcher lease not readable.");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(jitter(standby_poll)) => {}
                }
            };
            let (lease, acquired_at) = lease;
            tracing::info!(
                queue = %self.queue,
                holder = %self.holder,
                fence = lease.token(),
                "Dispatcher lease acquired; leading."
            );
            self.metrics.set_leader(&self.queue, &self.holder, true);
            let end = {
                let mut term = Term::new(&self, lease.token());
                tokio::select! {
                    lost = keep_lease(&lease, acquired_at) => TermEnd::Lost(lost),
                    end = term.lead(&shutdown) => end,
                }
            };
            self.metrics.set_leader(&self.queue, &self.holder, false);
            match end {
                TermEnd::Shutdown => {
                    match lease.release().await {
                        Ok(_) => tracing::info!(queue = %self.queue, "Dispatcher lease released."),
                        Err(error) => tracing::warn!(
                            queue = %self.queue, %error,
                            "Dispatcher lease not released; it expires by itself."
                        ),
                    }
                    return Ok(());
                }
                TermEnd::Lost(why) => {
                    tracing::warn!(queue = %self.queue, reason = why, "Dispatcher lease lost; standing by.");
                }
                TermEnd::Crashed(point) => return Err(DispatchError::Crashed(point)),
            }
        }
    }
}

/// Renews the lease every third of its time; returns when it is lost: refused (someone else
/// holds it) or not renewed within its time, counted from before the last successful call.
async fn keep_lease(lease: &Lease, acquired_at: Instant) -> &'static str {
    let ttl = lease.ttl();
    let mut deadline = acquired_at + ttl;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return "not renewed in time",
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let sent = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return "not renewed in time",
            renewed = lease.renew() => match renewed {
                Ok(true) => deadline = sent + ttl,
                Ok(false) => return "taken over",
                Err(error) => tracing::warn!(%error, "Dispatcher lease renewal failed."),
            }
        }
    }
}

/// `delay` shortened by up to a half, at random, so that retries do not move in step.
fn jitter(delay: Duration) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// One leadership term: the state that only makes sense while the lease is held.
struct Term<'a, A> {
    d: &'a Dispatcher<A>,
    fenced: FencedStore<'a>,
    reservations: Reservations,
    parked: HashMap<TicketId, Parked>,
    failures: HashMap<TicketId, u32>,
    not_found_since: HashMap<TicketId, Instant>,
    next_reconcile: Instant,
    events: broadcast::Receiver<QueueEvent>,
    views: watch::Receiver<Arc<FleetView>>,
}

impl<'a, A: EgressApi> Term<'a, A> {
    fn new(d: &'a Dispatcher<A>, token: u64) -> Self {
        Term {
            d,
            fenced: d.store.fenced(token),
            reservations: Reservations::new(d.options.reservation_lag),
            parked: HashMap::new(),
            failures: HashMap::new(),
            not_found_since: HashMap::new(),
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

    async fn lead(&mut self, shutdown: &CancellationToken) -> TermEnd {
        let mut redis_backoff = self.d.options.backoff_first;
        loop {
            if shutdown.is_cancelled() {
                return TermEnd::Shutdown;
            }
            let next = match self.step(shutdown).await {
                Ok(next) => {
                    redis_backoff = self.d.options.backoff_first;
                    next
                }
                Err(StepError::Crashed(point)) => return TermEnd::Crashed(point),
                Err(StepError::Queue(QueueError::Fenced)) => {
                    return TermEnd::Lost("fenced by a newer dispatcher");
                }
                Err(StepError::Queue(error)) => {
                    tracing::warn!(queue = %self.d.queue, %error, "Dispatch step failed; retrying.");
                    let until = Instant::now() + jitter(redis_backoff);
                    redis_backoff = (redis_backoff * 2).min(self.d.options.backoff_max);
                    Next::Wait {
                        until,
                        on_change: false,
                    }
                }
            };
            if let Next::Wait { until, on_change } = next {
                self.wait(until, on_change, shutdown).await;
            }
        }
    }

    /// Sleeps until `until` (at most the poll interval), shutdown, or a change of the queue or
    /// the fleet when `on_change`.
    async fn wait(&mut self, until: Instant, on_change: bool, shutdown: &CancellationToken) {
        let until = until.min(Instant::now() + self.d.options.poll_interval);
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
        if on_change {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = queue_changed => {}
                _ = fleet_changed => {}
            }
        } else {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn step(&mut self, shutdown: &CancellationToken) -> Result<Next, StepError> {
        self.fault(FaultPoint::BeforeStep)?;
        let now = Instant::now();
        // This step reads the queue and the fleet as they are now: only changes from here on
        // should wake the next wait (this dispatcher's own writes are announced too).
        while !matches!(
            self.events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
        ) {}
        self.views.borrow_and_update();

        // 1. Attempts of unknown outcome hold everything else.
        let dispatching = self.d.store.dispatching(&self.d.queue).await?;
        if !dispatching.is_empty() {
            let mut recheck: Option<Instant> = None;
            for id in &dispatching {
                if let Some(until) = self.settle(id).await? {
                    recheck = Some(recheck.map_or(until, |r| r.min(until)));
                }
            }
            return Ok(match recheck {
                Some(until) => Next::Wait {
                    until,
                    on_change: false,
                },
                None => Next::Continue,
            });
        }

        // 2. Now and then, active tickets against livekit-server.
        if now >= self.next_reconcile {
            self.reconcile_active().await?;
            self.forget_gone().await?;
            self.next_reconcile = Instant::now() + self.d.options.reconcile_interval;
        }

        // 3. The next ticket the fleet can take.
        let view = match self.d.fleet.current() {
            Ok(view) => view,
            Err(error) => {
                tracing::debug!(queue = %self.d.queue, %error, "No trusted fleet snapshot; not dispatching.");
                return Ok(Next::Wait {
                    until: self.next_reconcile,
                    on_change: true,
                });
            }
        };
        self.reservations.release_reflected(&view);
        self.parked.retain(|_, parked| parked.until > now);
        let window = match self.d.options.order {
            Order::Strict => 1 + self.parked.len(),
            Order::Backfill => self.d.options.backfill_window.max(1 + self.parked.len()),
        };
        let queued = self.d.store.peek_n(&self.d.queue, window).await?;
        let mut wake = self.next_reconcile;
        for ticket in queued {
            if let Some(parked) = self.parked.get(&ticket.id) {
                wake = wake.min(parked.until);
                if parked.holds_order && self.d.options.order == Order::Strict {
                    break;
                }
                continue;
            }
            let cost = self.d.settings.costs.cost(ticket.kind);
            if cost > self.d.settings.pod_cpu {
                self.fail_queued(
                    &ticket,
                    &format!(
                        "unschedulable: a {} job costs {} cores, more than a pod's {} cores",
                        ticket.kind,
                        cost as f64 / 1000.0,
                        self.d.settings.pod_cpu as f64 / 1000.0
                    ),
                )
                .await?;
                return Ok(Next::Continue);
            }
            if self.reservations.fits(&view, &self.d.settings, ticket.kind) {
                self.dispatch(ticket, shutdown).await?;
                return Ok(Next::Continue);
            }
            if self.d.options.order == Order::Strict {
                break;
            }
        }
        Ok(Next::Wait {
            until: wake,
            on_change: true,
        })
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

    /// Puts the ticket back for a retry after a backoff that grows with its failures.
    async fn retry_later(
        &mut self,
        id: &TicketId,
        attempt: &str,
        holds_order: bool,
    ) -> Result<(), StepError> {
        self.fenced.requeue(id, attempt).await?;
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

    /// Starts one queued ticket.
    async fn dispatch(
        &mut self,
        ticket: Ticket,
        shutdown: &CancellationToken,
    ) -> Result<(), StepError> {
        self.fault(FaultPoint::BeforeClaim)?;
        let attempt = uuid::Uuid::new_v4().simple().to_string();
        let Some(claimed) = self.fenced.claim(&ticket.id, &attempt, now_ms()).await? else {
            // Cancelled (or taken) since it was read.
            return Ok(());
        };
        self.fault(FaultPoint::AfterClaim)?;
        let ticket = claimed.ticket;
        let request = match stored_request(&ticket) {
            Ok(request) => request,
            Err(error) => return self.fail(&ticket.id, &error).await,
        };

        // Before any retry: did the earlier attempt start it after all?
        if let Some(since) = claimed.last_attempt_at_ms {
            match self.find_egress(&ticket, &request, since).await? {
                Found::Egress(info) => return self.adopt(&ticket, &info).await,
                Found::Nothing => {}
                Found::Unreachable => {
                    self.d.metrics.outcome(DispatchOutcome::unreachable);
                    return self.retry_later(&ticket.id, &attempt, true).await;
                }
            }
        }

        let result = self.call_start(&request, shutdown).await?;
        self.fault(FaultPoint::AfterCall)?;
        let error = match result {
            Some(Ok(info)) => return self.started(&ticket, &info, DispatchOutcome::started).await,
            Some(Err(error)) => error,
            None => {
                tracing::info!(queue = %self.d.queue, ticket = %ticket.id, "Shutting down with a start in flight; the next leader settles it.");
                return Ok(());
            }
        };
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
                    tracing::error!(queue = %self.d.queue, %error, "livekit-server refused the API credentials; check LIVEKIT_API_KEY and LIVEKIT_API_SECRET.");
                } else {
                    tracing::info!(queue = %self.d.queue, ticket = %ticket.id, %error, "Start not taken; the ticket stays at the head and is retried.");
                }
                self.d.metrics.outcome(outcome);
                self.retry_later(&ticket.id, &attempt, true).await
            }
            StartFailure::NotFound => {
                let since = *self
                    .not_found_since
                    .entry(ticket.id.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() >= self.d.options.not_found_retry {
                    self.fail(
                        &ticket.id,
                        &format!(
                            "the room did not exist for {:?}: {error}",
                            self.d.options.not_found_retry
                        ),
                    )
                    .await
                } else {
                    tracing::info!(queue = %self.d.queue, ticket = %ticket.id, room = %ticket.room_name, "Room not found yet; retrying.");
                    self.d.metrics.outcome(DispatchOutcome::not_found);
                    self.retry_later(&ticket.id, &attempt, false).await
                }
            }
            StartFailure::Rejected => {
                self.fail(
                    &ticket.id,
                    &format!("livekit-server refused the request: {error}"),
                )
                .await
            }
            StartFailure::Unknown => {
                tracing::warn!(queue = %self.d.queue, ticket = %ticket.id, %error, "Start outcome unknown; it is reconciled before any retry.");
                self.d.metrics.outcome(DispatchOutcome::unknown);
                // The ticket stays dispatching: the next step settles it.
                Ok(())
            }
        }
    }

    /// The start call; `None` when shutdown came and the drain grace ran out first.
    async fn call_start(
        &self,
        request: &StartRequest,
        shutdown: &CancellationToken,
    ) -> Result<Option<Result<proto::EgressInfo, EgressApiError>>, StepError> {
        if let Some(hook) = &self.d.faults
            && hook.crash_at(FaultPoint::DuringCall)
        {
            // Send it, and die before the answer (or before it is even sent: either happens).
            let _ = tokio::time::timeout(Duration::from_millis(3), self.d.api.start(request)).await;
            return Err(StepError::Crashed(FaultPoint::DuringCall));
        }
        let grace = self.d.options.drain_grace;
        let drained = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        Ok(tokio::select! {
            result = self.d.api.start(request) => Some(result),
            _ = drained => None,
        })
    }

    /// Records a started (or adopted, still running) egress for the ticket.
    async fn started(
        &mut self,
        ticket: &Ticket,
        info: &proto::EgressInfo,
        outcome: DispatchOutcome,
    ) -> Result<(), StepError> {
        let now = now_ms();
        let applied = self
            .fenced
            .mark_started(&ticket.id, &info.egress_id, now)
            .await?;
        self.fault(FaultPoint::AfterStarted)?;
        self.reservations
            .hold(ticket.kind, std::time::Instant::now());
        self.forget(&ticket.id);
        // Not applied: its `egress_started` webhook may have recorded it first.
        let recorded = applied
            || {
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
            };
        if recorded {
            let wait = now.saturating_sub(ticket.enqueued_at_ms) as f64 / 1000.0;
            self.d.metrics.enqueue_to_start_seconds.observe(wait);
            self.d.metrics.outcome(outcome);
            tracing::info!(
                queue = %self.d.queue, ticket = %ticket.id, egress_id = %info.egress_id,
                room = %ticket.room_name, kind = %ticket.kind, wait_seconds = wait,
                adopted = outcome == DispatchOutcome::adopted,
                "Egress started."
            );
        }
        Ok(())
    }

    /// Records what an earlier attempt turned out to have started.
    async fn adopt(&mut self, ticket: &Ticket, info: &proto::EgressInfo) -> Result<(), StepError> {
        self.fault(FaultPoint::BeforeAdopt)?;
        match found_status(info) {
            FoundStatus::Running => self.started(ticket, info, DispatchOutcome::adopted).await,
            FoundStatus::Over => {
                // It recorded and is over already: the request was served once.
                self.started(ticket, info, DispatchOutcome::adopted).await?;
                if self.fenced.mark_ended(&ticket.id, now_ms()).await? {
                    self.d.metrics.outcome(DispatchOutcome::ended);
                }
                Ok(())
            }
            FoundStatus::Failed => {
                self.fail(
                    &ticket.id,
                    &format!("egress {} failed: {}", info.egress_id, info.error),
                )
                .await
            }
        }
    }

    /// Looks for an egress an attempt on `ticket` begun at `since_ms` may have started.
    async fn find_egress(
        &self,
        ticket: &Ticket,
        request: &StartRequest,
        since_ms: u64,
    ) -> Result<Found, StepError> {
        // All of the room's egress, ended ones too: one that already ended was still this
        // request's recording. Web egress has no room: only the active ones, all rooms.
        let (filter, active) = match request.room_name() {
            Some(room) => (ListFilter::Room(room.to_owned()), false),
            None => (ListFilter::All, true),
        };
        let listed = match self.d.api.list_egress(&filter, active).await {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(queue = %self.d.queue, ticket = %ticket.id, %error, "ListEgress failed; the attempt stays unsettled.");
                return Ok(Found::Unreachable);
            }
        };
        for info in candidates(&listed, request, since_ms, self.d.options.clock_skew) {
            match self
                .d
                .store
                .ticket_for_egress(&self.d.queue, &info.egress_id)
                .await?
            {
                Some(owner) if owner != ticket.id => continue,
                _ => return Ok(Found::Egress(Box::new(info.clone()))),
            }
        }
        Ok(Found::Nothing)
    }

    /// Settles a `dispatching` ticket; `Some(time)` when it cannot be settled before then.
    async fn settle(&mut self, id: &TicketId) -> Result<Option<Instant>, StepError> {
        let Some(ticket) = self.d.store.get(id).await? else {
            return Ok(None);
        };
        let (Some(attempt), Some(began)) = (ticket.attempt_id.clone(), ticket.dispatching_at_ms)
        else {
            return Ok(None);
        };
        let request = match stored_request(&ticket) {
            Ok(request) => request,
            Err(error) => {
                self.fail(id, &error).await?;
                return Ok(None);
            }
        };
        let recheck = Instant::now() + self.d.options.recheck_interval;
        match self.find_egress(&ticket, &request, began).await? {
            Found::Egress(info) => {
                self.adopt(&ticket, &info).await?;
                Ok(None)
            }
            Found::Unreachable => Ok(Some(recheck)),
            Found::Nothing => {
                let settled_at =
                    began.saturating_add(self.d.options.settle_after.as_millis() as u64);
                let now = now_ms();
                if now < settled_at {
                    let left = Duration::from_millis(settled_at - now);
                    return Ok(Some(recheck.min(Instant::now() + left)));
                }
                self.fault(FaultPoint::BeforeRequeue)?;
                if self.fenced.requeue(id, &attempt).await? {
                    tracing::info!(queue = %self.d.queue, ticket = %id, "The attempt started nothing; the ticket is back at its place.");
                    self.d.metrics.outcome(DispatchOutcome::requeued);
                }
                self.fault(FaultPoint::AfterRequeue)?;
                Ok(None)
            }
        }
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
                .is_some_and(|ticket| ticket.state == crate::queue::TicketState::Queued);
            if !queued {
                self.forget(&id);
            }
        }
        Ok(())
    }

    /// Ends the active tickets whose egress is over (their `egress_ended` webhook was lost).
    async fn reconcile_active(&mut self) -> Result<(), StepError> {
        let ids = self.d.store.active(&self.d.queue).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut by_room: HashMap<String, Vec<Ticket>> = HashMap::new();
        for id in ids {
            if let Some(ticket) = self.d.store.get(&id).await?
                && ticket.egress_id.is_some()
            {
                by_room
                    .entry(ticket.room_name.clone())
                    .or_default()
                    .push(ticket);
            }
        }
        for (room, tickets) in by_room {
            let listed = match self
                .d
                .api
                .list_egress(&ListFilter::Room(room.clone()), false)
                .await
            {
                Ok(listed) => listed,
                Err(error) => {
                    tracing::warn!(queue = %self.d.queue, %room, %error, "ListEgress failed; active tickets not checked.");
                    return Ok(());
                }
            };
            for ticket in tickets {
                let egress_id = ticket.egress_id.clone().unwrap_or_default();
                let mut info = listed
                    .iter()
                    .find(|info| info.egress_id == egress_id)
                    .cloned();
                if info.is_none() {
                    // Web egress is not listed under the room: ask for it by id.
                    info = match self
                        .d
                        .api
                        .list_egress(&ListFilter::Egress(egress_id.clone()), false)
                        .await
                    {
                        Ok(found) => found.into_iter().next(),
                        Err(_) => continue,
                    };
                }
                let over = info
                    .as_ref()
                    .is_none_or(|info| found_status(info) != FoundStatus::Running);
                if over && self.fenced.mark_ended(&ticket.id, now_ms()).await? {
                    tracing::info!(queue = %self.d.queue, ticket = %ticket.id, %egress_id, "Egress found ended; ticket ended.");
                    self.d.metrics.outcome(DispatchOutcome::ended);
                }
            }
        }
        Ok(())
    }
}

/// What a look for an earlier attempt's egress found.
enum Found {
    Egress(Box<proto::EgressInfo>),
    Nothing,
    /// livekit-server could not be asked.
    Unreachable,
}

/// The stored start request of a ticket, as it will be sent.
fn stored_request(ticket: &Ticket) -> Result<StartRequest, String> {
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
