//! The dispatcher (DESIGN.md 3, 5): one leader per queue starts queued tickets through
//! livekit-server when the fleet can take them: in order, exactly once, several at a time.
//!
//! A pipeline, not a loop ([`pipeline`]):
//! 1. **Fill.** Queued tickets are taken in FIFO order against the capacity the fleet snapshot
//!    shows minus what starts in flight, attempts being settled and starts the snapshot does
//!    not show yet have reserved ([`capacity`]); up to `max_in_flight` start calls are in
//!    flight at once. Capacity is handed out in order of asking (`strict`: nothing passes a
//!    head that fits nowhere; `backfill`: a later ticket that fits may); answers come back in
//!    any order. A ticket is marked `dispatching` (attempt id and time) before its call.
//! 2. **Answers**, each on its own: an egress is recorded (`active`); an answer that certainly
//!    started nothing (`unavailable`, a refused connection, a 401, `not_found`) puts the
//!    ticket back at its place with a backoff, and is never followed by an adoption; a refusal
//!    of the request fails it; anything else is of unknown outcome.
//! 3. **Settling**, per ticket, while the others proceed (its reservation is held until a
//!    fleet refresh after the lost answer shows whether its pod took the job): `ListEgress`
//!    is asked for an egress that provably is this attempt ([`matching`]: the same request,
//!    started after the attempt began, recorded for no ticket of any served queue); when none
//!    shows by `settle_after` after the attempt began, nothing can start any more, and the
//!    ticket goes back to its place. When livekit-server cannot be asked at all for
//!    `unreachable_limit`, the ticket becomes a dead letter with the reason.
//! 4. **Cancel means cancel**: a ticket cancelled while dispatching is cancelled once settled,
//!    its egress stopped through `StopEgress` if it started.
//! 5. Now and then the `active` tickets are checked against `ListEgress`, so that an egress
//!    whose `egress_ended` webhook was lost does not hold its ticket for ever.
//!
//! Every write carries the lease's fencing token ([`lease`]). **Lease guard**: no start call
//! is sent unless the lease is still held with a margin and the attempt's whole call fits in
//! its settle window (the next leader concludes "nothing started" only after that window), and
//! livekit-server is told the call's deadline (`X-Twirp-Timeout-Ms`); a leader that stalled
//! past either sends nothing. A crash anywhere leaves at worst `dispatching` tickets, which
//! the next leader settles as in 3.

pub mod capacity;
pub mod lease;
pub mod livekit;
pub mod matching;
mod pipeline;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::intake::now_ms;
use crate::model::Settings;
use crate::queue::{QueueEvent, QueueName, QueueStore};
use crate::telemetry::DispatchMetrics;
use lease::Lease;
use livekit::EgressApi;
use pipeline::Term;
pub(crate) use pipeline::stored_request;

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
    /// Lease time that must be left when a start call is sent.
    pub lease_margin: Duration,
    /// Start calls in flight at once.
    pub max_in_flight: usize,
    /// Limit on one start call: above livekit-server's no-capacity answer time.
    pub call_timeout: Duration,
    /// How long after an attempt began an egress it started must be listed: above the call
    /// timeout (a call is only sent while it fits in this window).
    pub settle_after: Duration,
    /// How long livekit-server may be impossible to ask whether an attempt started before its
    /// ticket becomes a dead letter (counted once the settle window has passed too).
    pub unreachable_limit: Duration,
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
            lease_margin: Duration::from_secs(2),
            max_in_flight: 64,
            call_timeout: livekit::DEFAULT_REQUEST_TIMEOUT,
            settle_after: livekit::DEFAULT_REQUEST_TIMEOUT + Duration::from_secs(5),
            unreachable_limit: Duration::from_secs(5 * 60),
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
    /// The start request is on its way (one of several in flight): stopped before the answer
    /// arrives.
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

    /// Called right before a start call is sent (after its ticket was claimed): a hook that
    /// blocks the thread here plays a process that froze (a GC pause, a node stall).
    fn before_send(&self) {}
}

/// Why [`Dispatcher::run`] ended other than by shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// A [`FaultHook`] stopped it.
    #[error("the dispatcher was stopped by fault injection at {0:?}")]
    Crashed(FaultPoint),
}

/// Why a leadership term ended.
enum TermEnd {
    Shutdown,
    Lost(&'static str),
    Crashed(FaultPoint),
}

/// The dispatcher of one queue.
pub struct Dispatcher<A> {
    queue: QueueName,
    /// Every queue this process serves: an egress recorded for a ticket of any of them is
    /// never adopted by another.
    served: Vec<QueueName>,
    store: QueueStore,
    fleet: Fleet,
    api: Arc<A>,
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
            served: vec![queue.clone()],
            queue,
            store,
            fleet,
            api: Arc::new(api),
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

    /// Every queue the process serves (this one is added when missing).
    pub fn with_served_queues(mut self, queues: &[QueueName]) -> Self {
        for queue in queues {
            if !self.served.contains(queue) {
                self.served.push(queue.clone());
            }
        }
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
            let (deadline_tx, deadline) = watch::channel(acquired_at + lease.ttl());
            let end = {
                let mut term = Term::new(&self, lease.token(), deadline);
                tokio::select! {
                    lost = keep_lease(&lease, acquired_at, &deadline_tx) => TermEnd::Lost(lost),
                    end = term.lead(&shutdown) => end,
                }
            };
            self.metrics.set_in_flight(&self.queue, 0);
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

/// Renews the lease every third of its time, publishing until when it is surely held; returns
/// when it is lost: refused (someone else holds it) or not renewed within its time, counted
/// from before the last successful call.
async fn keep_lease(
    lease: &Lease,
    acquired_at: Instant,
    held_until: &watch::Sender<Instant>,
) -> &'static str {
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
                Ok(true) => {
                    deadline = sent + ttl;
                    held_until.send_replace(deadline);
                }
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
