//! Held start calls waiting for their tickets. One task per process follows the queue's
//! pub/sub events: on a change of a queue (coalesced: one round of reads however many events
//! came meanwhile), and once a second in case an event was lost, it reads the state of every
//! waited ticket of that queue and wakes the calls whose ticket is no longer waiting to start.
//! So a thousand held calls cost one read each per round, not one per event each.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::queue::{QueueEvent, QueueName, QueueStore, TicketId, TicketState};

/// Rounds without any event, in case one was lost.
const FALLBACK_ROUND: Duration = Duration::from_secs(1);
/// Ticket reads in flight at once in a round.
const READS_IN_FLIGHT: usize = 64;

/// The tickets held calls wait for, each with a channel that is bumped when it settles.
#[derive(Debug, Default)]
pub struct Waiters {
    tickets: Mutex<HashMap<TicketId, watch::Sender<()>>>,
}

impl Waiters {
    /// A receiver that changes once `ticket` is no longer queued or dispatching (or may not
    /// be: the caller reads the ticket again).
    pub fn watch(&self, ticket: &TicketId) -> watch::Receiver<()> {
        let mut tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        tickets
            .entry(ticket.clone())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// The waited tickets of the given queues (all when `None`), forgetting those nobody
    /// waits for any more.
    fn waited(&self, queues: Option<&HashSet<QueueName>>) -> Vec<TicketId> {
        let mut tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        tickets.retain(|_, sender| sender.receiver_count() > 0);
        tickets
            .keys()
            .filter(|id| queues.is_none_or(|queues| queues.contains(&id.queue())))
            .cloned()
            .collect()
    }

    fn wake(&self, ticket: &TicketId) {
        let tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = tickets.get(ticket) {
            sender.send_replace(());
        }
    }

    /// Follows `events` until `shutdown`, waking the calls whose ticket settled.
    pub async fn run(
        &self,
        store: QueueStore,
        mut events: broadcast::Receiver<QueueEvent>,
        shutdown: CancellationToken,
    ) {
        let mut fallback = tokio::time::interval(FALLBACK_ROUND);
        fallback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events_open = true;
        loop {
            // `None`: every queue.
            let mut dirty: Option<HashSet<QueueName>> = Some(HashSet::new());
            let mut note = |event: Result<QueueEvent, broadcast::error::RecvError>| match event {
                Ok(QueueEvent::Changed(queue)) => {
                    if let Some(queues) = dirty.as_mut() {
                        queues.insert(queue);
                    }
                    true
                }
                Ok(QueueEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    dirty = None;
                    true
                }
                // No events any more: rounds on the fallback clock only.
                Err(broadcast::error::RecvError::Closed) => {
                    dirty = None;
                    false
                }
            };
            events_open = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.recv(), if events_open => note(event),
                _ = fallback.tick() => note(Ok(QueueEvent::Resync)) && events_open,
            };
            // Coalesce whatever else has arrived.
            if events_open {
                loop {
                    match events.try_recv() {
                        Ok(event) => {
                            note(Ok(event));
                        }
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            note(Err(broadcast::error::RecvError::Lagged(n)));
                        }
                        Err(_) => break,
                    }
                }
            }
            let waited = self.waited(dirty.as_ref());
            if waited.is_empty() {
                continue;
            }
            let store = &store;
            let mut reads = futures::stream::iter(waited)
                .map(|id| async move {
                    let state = store.get(&id).await.map(|t| t.map(|t| t.state));
                    (id, state)
                })
                .buffer_unordered(READS_IN_FLIGHT);
            while let Some((id, state)) = reads.next().await {
                // A read that failed wakes the call too: it reads again and reports.
                if !matches!(
                    state,
                    Ok(Some(TicketState::Queued | TicketState::Dispatching))
                ) {
                    self.wake(&id);
                }
            }
        }
    }
}
