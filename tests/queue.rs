//! The Redis queue against a real `redis-server`: one server per test, stopped at its end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use egress_scaler::model::{Demand, EgressKind};
use egress_scaler::queue::{
    CancelOutcome, NewRequest, QueueError, QueueEvent, QueueName, QueueStore, StoreOptions, Ticket,
    TicketId, TicketState, events_channel, run_event_listener,
};
use egress_scaler::redis_server::RedisServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A fixed "now" so that stored times are predictable.
const T0: u64 = 1_700_000_000_000;

struct Fixture {
    server: RedisServer,
    store: QueueStore,
    queue: QueueName,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(StoreOptions::default()).await
    }

    async fn start_with(options: StoreOptions) -> Self {
        let server = RedisServer::start().expect("redis-server starts");
        let store = QueueStore::connect(&server.url(), options)
            .await
            .expect("store connects");
        Fixture {
            server,
            store,
            queue: queue("recordings"),
        }
    }

    /// A plain connection, to look at keys the way an operator (or KEDA) would.
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn enqueue(&self, kind: EgressKind, room: &str) -> TicketId {
        let enqueued = self
            .store
            .enqueue(&self.queue, request(kind, room), T0)
            .await
            .unwrap();
        assert!(!enqueued.duplicate, "{room} was already queued");
        enqueued.ticket
    }

    async fn state(&self, ticket: &TicketId) -> TicketState {
        self.store.get(ticket).await.unwrap().unwrap().state
    }

    async fn pending(&self) -> Vec<TicketId> {
        let tickets = self.store.peek_n(&self.queue, 1000).await.unwrap();
        tickets.into_iter().map(|ticket| ticket.id).collect()
    }

    fn stop(mut self) {
        self.server.stop();
    }
}

fn queue(name: &str) -> QueueName {
    name.parse().unwrap()
}

fn request(kind: EgressKind, room: &str) -> NewRequest {
    NewRequest {
        kind,
        room_name: room.to_owned(),
        request: None,
        dedup_key: None,
    }
}

fn ticket_key(ticket: &TicketId) -> String {
    format!("{}ticket:{ticket}", ticket.queue().key_prefix())
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tickets_leave_in_fifo_order_with_their_positions() {
    let fx = Fixture::start().await;
    let mut tickets = Vec::new();
    for (index, room) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
        let enqueued = fx
            .store
            .enqueue(&fx.queue, request(EgressKind::RoomComposite, room), T0)
            .await
            .unwrap();
        assert_eq!(enqueued.state, TicketState::Queued);
        assert_eq!(enqueued.position, Some(index as u64));
        assert!(enqueued.ticket.as_str().starts_with("recordings."));
        tickets.push(enqueued.ticket);
    }

    assert_eq!(fx.pending().await, tickets);
    let head = fx.store.peek(&fx.queue).await.unwrap().unwrap();
    assert_eq!(head.id, tickets[0]);
    let first_two = fx.store.peek_n(&fx.queue, 2).await.unwrap();
    assert_eq!(first_two.len(), 2);
    assert_eq!(first_two[1].id, tickets[1]);
    assert!(fx.store.peek_n(&fx.queue, 0).await.unwrap().is_empty());
    for (index, ticket) in tickets.iter().enumerate() {
        assert_eq!(fx.store.position(ticket).await.unwrap(), Some(index as u64));
    }

    // The head leaves; everyone moves up one place.
    assert!(
        fx.store
            .mark_started(&tickets[0], "EG_a", T0 + 1)
            .await
            .unwrap()
    );
    assert_eq!(fx.store.position(&tickets[0]).await.unwrap(), None);
    assert_eq!(fx.store.position(&tickets[4]).await.unwrap(), Some(3));
    assert_eq!(fx.pending().await, tickets[1..]);

    // KEDA's own redis scaler reads the depth with ZCARD of the documented key.
    let mut raw = fx.raw().await;
    let depth: u64 = redis::cmd("ZCARD")
        .arg("egress-scaler:{recordings}:pending")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(depth, 4);
    fx.stop();
}

#[tokio::test]
async fn a_ticket_keeps_everything_it_was_given() {
    let fx = Fixture::start().await;
    let livekit_request =
        r#"{"room_name":"town-hall","layout":"speaker","file_outputs":[{"filepath":"x.mp4"}]}"#;
    let enqueued = fx
        .store
        .enqueue(
            &fx.queue,
            NewRequest {
                kind: EgressKind::Web,
                room_name: "town-hall".to_owned(),
                request: Some(livekit_request.to_owned()),
                dedup_key: Some("meeting-42".to_owned()),
            },
            T0 + 5,
        )
        .await
        .unwrap();
    let ticket = fx.store.get(&enqueued.ticket).await.unwrap().unwrap();
    assert_eq!(
        ticket,
        Ticket {
            id: enqueued.ticket.clone(),
            state: TicketState::Queued,
            kind: EgressKind::Web,
            room_name: "town-hall".to_owned(),
            request: Some(livekit_request.to_owned()),
            dedup_key: "meeting-42".to_owned(),
            egress_id: None,
            enqueued_at_ms: T0 + 5,
            started_at_ms: None,
            ended_at_ms: None,
            error: None,
            attempt_id: None,
            dispatching_at_ms: None,
            unsettled_at_ms: None,
            cancel_requested_at_ms: None,
        }
    );
    let json = serde_json::to_value(&ticket).unwrap();
    assert_eq!(json["id"], enqueued.ticket.as_str());
    assert_eq!(json["state"], "queued");
    assert_eq!(json["kind"], "web");

    let unknown: TicketId = format!("recordings.{}", "0".repeat(32)).parse().unwrap();
    assert_eq!(fx.store.get(&unknown).await.unwrap(), None);
    assert_eq!(fx.store.position(&unknown).await.unwrap(), None);
    fx.stop();
}

#[tokio::test]
async fn the_same_kind_and_room_is_queued_once() {
    let fx = Fixture::start().await;
    let first = fx.enqueue(EgressKind::RoomComposite, "lobby").await;
    fx.enqueue(EgressKind::RoomComposite, "other").await;

    let again = fx
        .store
        .enqueue(
            &fx.queue,
            request(EgressKind::RoomComposite, "lobby"),
            T0 + 9,
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.ticket, first);
    assert_eq!(again.state, TicketState::Queued);
    assert_eq!(again.position, Some(0));

    // Another kind for the same room is another recording.
    let audio = fx
        .store
        .enqueue(
            &fx.queue,
            request(EgressKind::AudioRoomComposite, "lobby"),
            T0,
        )
        .await
        .unwrap();
    assert!(!audio.duplicate);

    // A duplicate of a started ticket reports it, without a position.
    assert!(fx.store.mark_started(&first, "EG_1", T0 + 1).await.unwrap());
    let again = fx
        .store
        .enqueue(&fx.queue, request(EgressKind::RoomComposite, "lobby"), T0)
        .await
        .unwrap();
    assert_eq!(
        (again.ticket, again.state, again.position, again.duplicate),
        (first.clone(), TicketState::Active, None, true)
    );

    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.depth, 2);
    assert_eq!(stats.active, 1);
    // The duplicate enqueue kept the first ticket's enqueue time.
    let ticket = fx.store.get(&first).await.unwrap().unwrap();
    assert_eq!(ticket.enqueued_at_ms, T0);
    fx.stop();
}

#[tokio::test]
async fn an_explicit_dedup_key_replaces_kind_and_room() {
    let fx = Fixture::start().await;
    let with_key = |kind, room: &str, key: &str| NewRequest {
        dedup_key: Some(key.to_owned()),
        ..request(kind, room)
    };
    let first = fx
        .store
        .enqueue(
            &fx.queue,
            with_key(EgressKind::RoomComposite, "a", "k1"),
            T0,
        )
        .await
        .unwrap();
    // Same key, different room and kind: the holder, as a conflict; nothing changes.
    let same_key = fx
        .store
        .enqueue(&fx.queue, with_key(EgressKind::Track, "b", "k1"), T0)
        .await
        .unwrap();
    assert!(same_key.duplicate && same_key.conflict);
    assert_eq!(same_key.ticket, first.ticket);
    // Same key, same request: a plain duplicate.
    let again = fx
        .store
        .enqueue(
            &fx.queue,
            with_key(EgressKind::RoomComposite, "a", "k1"),
            T0,
        )
        .await
        .unwrap();
    assert!(again.duplicate && !again.conflict);
    assert_eq!(again.ticket, first.ticket);
    // Same room and kind, different keys: two requests.
    let other_key = fx
        .store
        .enqueue(
            &fx.queue,
            with_key(EgressKind::RoomComposite, "a", "k2"),
            T0,
        )
        .await
        .unwrap();
    assert!(!other_key.duplicate);
    let default_key = fx
        .store
        .enqueue(&fx.queue, request(EgressKind::RoomComposite, "a"), T0)
        .await
        .unwrap();
    assert!(!default_key.duplicate);
    assert_eq!(
        fx.store
            .get(&default_key.ticket)
            .await
            .unwrap()
            .unwrap()
            .dedup_key,
        "room_composite:a"
    );
    assert_eq!(fx.store.stats(&fx.queue).await.unwrap().depth, 3);
    fx.stop();
}

#[tokio::test]
async fn failing_ending_or_cancelling_frees_the_dedup_key() {
    let fx = Fixture::start().await;
    let kind = EgressKind::RoomComposite;

    let failed = fx.enqueue(kind, "failed-room").await;
    assert!(
        fx.store
            .mark_failed(&failed, "no capacity", T0 + 1)
            .await
            .unwrap()
    );

    let ended = fx.enqueue(kind, "ended-room").await;
    assert!(fx.store.mark_started(&ended, "EG_e", T0 + 1).await.unwrap());
    assert!(fx.store.mark_ended(&ended, T0 + 2).await.unwrap());

    let cancelled = fx.enqueue(kind, "cancelled-room").await;
    assert_eq!(
        fx.store.cancel(&cancelled, T0 + 1).await.unwrap(),
        CancelOutcome::Cancelled
    );

    for (old, room) in [
        (failed, "failed-room"),
        (ended, "ended-room"),
        (cancelled, "cancelled-room"),
    ] {
        let new = fx
            .store
            .enqueue(&fx.queue, request(kind, room), T0 + 3)
            .await
            .unwrap();
        assert!(!new.duplicate, "{room}");
        assert_ne!(new.ticket, old, "{room}");
        assert_eq!(new.state, TicketState::Queued);
        // The finished ticket stays readable.
        assert!(fx.state(&old).await.is_finished());
    }
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_enqueues_make_one_ticket() {
    let fx = Fixture::start().await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let store = fx.store.clone();
            let queue = fx.queue.clone();
            tokio::spawn(async move {
                store
                    .enqueue(&queue, request(EgressKind::RoomComposite, "all-hands"), T0)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let tickets: HashSet<_> = results.iter().map(|r| r.ticket.clone()).collect();
    assert_eq!(tickets.len(), 1);
    assert_eq!(results.iter().filter(|r| r.duplicate).count(), 99);
    assert!(results.iter().all(|r| r.position == Some(0)));
    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.depth, 1);
    assert_eq!(stats.demand.total(), 1);
    fx.stop();
}

#[tokio::test]
async fn a_requeued_ticket_gets_its_original_place_back() {
    let fx = Fixture::start().await;
    let kind = EgressKind::Participant;
    let a = fx.enqueue(kind, "a").await;
    let b = fx.enqueue(kind, "b").await;
    let c = fx.enqueue(kind, "c").await;

    let claimed = fx.store.claim(&b, "attempt-1", T0 + 10).await.unwrap();
    let claimed = claimed.expect("b was queued");
    assert_eq!(claimed.state, TicketState::Dispatching);
    assert_eq!(claimed.attempt_id.as_deref(), Some("attempt-1"));
    assert_eq!(claimed.dispatching_at_ms, Some(T0 + 10));
    assert_eq!(fx.pending().await, vec![a.clone(), c.clone()]);
    assert_eq!(fx.store.position(&c).await.unwrap(), Some(1));
    assert_eq!(
        fx.store.dispatching(&fx.queue).await.unwrap(),
        vec![b.clone()]
    );
    // Claimed twice: the second dispatcher gets nothing.
    assert_eq!(
        fx.store.claim(&b, "attempt-2", T0 + 11).await.unwrap(),
        None
    );

    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.queued.count(kind), 2);
    assert_eq!(
        stats.demand.count(kind),
        3,
        "dispatching is not started yet"
    );
    assert_eq!(stats.dispatching, 1);

    // Only the attempt that claimed it may put it back.
    assert!(!fx.store.requeue(&b, "attempt-2").await.unwrap());
    assert!(fx.store.requeue(&b, "attempt-1").await.unwrap());
    assert!(!fx.store.requeue(&b, "attempt-1").await.unwrap());
    assert_eq!(fx.pending().await, vec![a, b.clone(), c]);
    assert_eq!(fx.store.position(&b).await.unwrap(), Some(1));
    let ticket = fx.store.get(&b).await.unwrap().unwrap();
    assert_eq!(ticket.state, TicketState::Queued);
    assert_eq!(ticket.attempt_id, None);
    assert_eq!(ticket.dispatching_at_ms, None);
    assert!(fx.store.dispatching(&fx.queue).await.unwrap().is_empty());
    assert_eq!(
        fx.store.stats(&fx.queue).await.unwrap().queued.count(kind),
        3
    );
    fx.stop();
}

/// Which transitions each state accepts (DESIGN.md / queue.rs state diagram).
#[tokio::test]
async fn transitions_from_the_wrong_state_change_nothing() {
    let fx = Fixture::start().await;
    let kind = EgressKind::Web;
    let mut room = 0;
    // A fresh ticket driven into `state`, with attempt "a" when it went through dispatching.
    let mut ticket_in = async |state: TicketState| {
        room += 1;
        let ticket = fx.enqueue(kind, &format!("room-{room}")).await;
        let store = &fx.store;
        match state {
            TicketState::Queued => {}
            TicketState::Dispatching => {
                store.claim(&ticket, "a", T0).await.unwrap().unwrap();
            }
            // Egress ids are unique: one egress is recorded for one ticket only.
            TicketState::Active => assert!(
                store
                    .mark_started(&ticket, &format!("EG-{ticket}"), T0)
                    .await
                    .unwrap()
            ),
            TicketState::Ended => {
                assert!(
                    store
                        .mark_started(&ticket, &format!("EG-{ticket}"), T0)
                        .await
                        .unwrap()
                );
                assert!(store.mark_ended(&ticket, T0).await.unwrap());
            }
            TicketState::Failed => assert!(store.mark_failed(&ticket, "x", T0).await.unwrap()),
            TicketState::Cancelled => {
                assert_eq!(
                    store.cancel(&ticket, T0).await.unwrap(),
                    CancelOutcome::Cancelled
                )
            }
        }
        assert_eq!(fx.state(&ticket).await, state);
        ticket
    };

    use TicketState::*;
    let operations = ["claim", "requeue", "start", "fail", "end", "cancel"];
    let allowed: HashMap<&str, &[TicketState]> = HashMap::from([
        ("claim", &[Queued][..]),
        ("requeue", &[Dispatching][..]),
        ("start", &[Queued, Dispatching][..]),
        ("fail", &[Queued, Dispatching][..]),
        ("end", &[Active, Dispatching][..]),
        ("cancel", &[Queued][..]),
    ]);
    for state in TicketState::ALL {
        for operation in operations {
            let ticket = ticket_in(state).await;
            let before_ticket = fx.store.get(&ticket).await.unwrap();
            let before_stats = fx.store.stats(&fx.queue).await.unwrap();
            let store = &fx.store;
            let applied = match operation {
                "claim" => store.claim(&ticket, "b", T0 + 1).await.unwrap().is_some(),
                "requeue" => store.requeue(&ticket, "a").await.unwrap(),
                "start" => store
                    .mark_started(&ticket, &format!("EG2-{ticket}"), T0 + 1)
                    .await
                    .unwrap(),
                "fail" => store.mark_failed(&ticket, "y", T0 + 1).await.unwrap(),
                "end" => store.mark_ended(&ticket, T0 + 1).await.unwrap(),
                "cancel" => {
                    store.cancel(&ticket, T0 + 1).await.unwrap() == CancelOutcome::Cancelled
                }
                _ => unreachable!(),
            };
            let expected = allowed[operation].contains(&state);
            assert_eq!(applied, expected, "{operation} from {state}");
            // A cancel of a ticket being started keeps the intent and changes nothing else.
            let intent_kept = operation == "cancel" && state == Dispatching;
            if !applied && !intent_kept {
                assert_eq!(fx.store.get(&ticket).await.unwrap(), before_ticket);
                assert_eq!(fx.store.stats(&fx.queue).await.unwrap(), before_stats);
            }
        }
    }

    // Unknown tickets are refused too.
    let unknown = TicketId::generate(&fx.queue);
    assert_eq!(fx.store.claim(&unknown, "a", T0).await.unwrap(), None);
    assert!(!fx.store.requeue(&unknown, "a").await.unwrap());
    assert!(!fx.store.mark_started(&unknown, "EG", T0).await.unwrap());
    assert!(!fx.store.mark_failed(&unknown, "x", T0).await.unwrap());
    assert!(!fx.store.mark_ended(&unknown, T0).await.unwrap());
    assert_eq!(
        fx.store.cancel(&unknown, T0).await.unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(fx.store.get(&unknown).await.unwrap(), None);
    fx.stop();
}

/// The demand hash is all GetMetrics reads: after any sequence of operations it must equal
/// a recount of the tickets' states.
#[tokio::test]
async fn demand_counters_match_a_recount_after_random_operations() {
    let fx = Fixture::start().await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let kinds = [
        EgressKind::RoomComposite,
        EgressKind::AudioRoomComposite,
        EgressKind::Track,
    ];
    // What the test expects of each ticket: state, kind, room and the attempt that claimed it.
    type Expected = (TicketState, EgressKind, String, Option<String>);
    let mut model: HashMap<TicketId, Expected> = HashMap::new();
    let mut order: Vec<TicketId> = Vec::new();
    let mut reached = HashSet::new();
    let mut now = T0;

    for step in 0..600 {
        now += 1;
        let known = !order.is_empty();
        if !known || rng.random_bool(0.3) {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let room = format!("room-{}", rng.random_range(0..8));
            let enqueued = fx
                .store
                .enqueue(&fx.queue, request(kind, &room), now)
                .await
                .unwrap();
            // The ticket of the same kind and room that is not finished holds the key.
            let holder = model
                .iter()
                .find(|(_, (state, held_kind, held_room, _))| {
                    *held_kind == kind && *held_room == room && !state.is_finished()
                })
                .map(|(id, _)| id.clone());
            assert_eq!(enqueued.duplicate, holder.is_some(), "step {step}");
            match holder {
                Some(holder) => assert_eq!(enqueued.ticket, holder, "step {step}"),
                None => {
                    assert!(!model.contains_key(&enqueued.ticket));
                    model.insert(
                        enqueued.ticket.clone(),
                        (TicketState::Queued, kind, room, None),
                    );
                    order.push(enqueued.ticket);
                }
            }
        } else {
            let ticket = order[rng.random_range(0..order.len())].clone();
            let (state, _, _, attempt) = model[&ticket].clone();
            let operation = rng.random_range(0..6);
            let (applied, expected, next) = match operation {
                0 => {
                    let attempt = format!("attempt-{step}");
                    let applied = fx.store.claim(&ticket, &attempt, now).await.unwrap();
                    let expected = state == TicketState::Queued;
                    if let Some(claimed) = &applied {
                        assert_eq!(claimed.attempt_id.as_deref(), Some(attempt.as_str()));
                        model.get_mut(&ticket).unwrap().3 = Some(attempt);
                    }
                    (applied.is_some(), expected, TicketState::Dispatching)
                }
                1 => {
                    // Half the time with the wrong attempt.
                    let right = rng.random_bool(0.5);
                    let given = match (&attempt, right) {
                        (Some(attempt), true) => attempt.clone(),
                        _ => "someone-else".to_owned(),
                    };
                    let applied = fx.store.requeue(&ticket, &given).await.unwrap();
                    let expected =
                        state == TicketState::Dispatching && attempt.as_deref() == Some(&given);
                    (applied, expected, TicketState::Queued)
                }
                2 => {
                    let applied = fx
                        .store
                        .mark_started(&ticket, &format!("EG_{step}"), now)
                        .await
                        .unwrap();
                    let expected = matches!(state, TicketState::Queued | TicketState::Dispatching);
                    (applied, expected, TicketState::Active)
                }
                3 => {
                    let applied = fx.store.mark_failed(&ticket, "boom", now).await.unwrap();
                    let expected = matches!(state, TicketState::Queued | TicketState::Dispatching);
                    (applied, expected, TicketState::Failed)
                }
                4 => {
                    let applied = fx.store.mark_ended(&ticket, now).await.unwrap();
                    let expected = matches!(state, TicketState::Active | TicketState::Dispatching);
                    (applied, expected, TicketState::Ended)
                }
                _ => {
                    let outcome = fx.store.cancel(&ticket, now).await.unwrap();
                    let expected = state == TicketState::Queued;
                    if state == TicketState::Dispatching {
                        // The intent is kept for the dispatcher; the state does not change.
                        assert_eq!(outcome, CancelOutcome::Requested, "step {step}");
                    } else if !expected {
                        assert_eq!(outcome, CancelOutcome::NotQueued(state), "step {step}");
                    }
                    (
                        outcome == CancelOutcome::Cancelled,
                        expected,
                        TicketState::Cancelled,
                    )
                }
            };
            assert_eq!(
                applied, expected,
                "step {step}: operation {operation} from {state}"
            );
            if applied {
                reached.insert((state, next));
                let entry = model.get_mut(&ticket).unwrap();
                entry.0 = next;
                if next == TicketState::Queued {
                    entry.3 = None;
                }
            }
        }

        // The counters against the model, every step.
        let mut expected_demand = Demand::default();
        let mut expected_queued = Demand::default();
        for (state, kind, _, _) in model.values() {
            match state {
                TicketState::Queued => {
                    expected_demand.add(*kind, 1);
                    expected_queued.add(*kind, 1);
                }
                TicketState::Dispatching => expected_demand.add(*kind, 1),
                _ => {}
            }
        }
        assert_eq!(
            fx.store.demand(&fx.queue).await.unwrap(),
            expected_demand,
            "step {step}"
        );
        let stats = fx.store.stats(&fx.queue).await.unwrap();
        assert_eq!(stats.demand, expected_demand, "step {step}");
        assert_eq!(stats.queued, expected_queued, "step {step}");
        assert_eq!(stats.depth, expected_queued.total(), "step {step}");

        // And against a recount of what Redis itself holds, now and then.
        if step % 50 == 49 {
            let mut recount = Demand::default();
            let mut by_state: HashMap<TicketState, u64> = HashMap::new();
            for ticket in &order {
                let stored = fx.store.get(ticket).await.unwrap().unwrap();
                assert_eq!(stored.state, model[ticket].0, "step {step}");
                if matches!(stored.state, TicketState::Queued | TicketState::Dispatching) {
                    recount.add(stored.kind, 1);
                }
                *by_state.entry(stored.state).or_default() += 1;
            }
            assert_eq!(fx.store.demand(&fx.queue).await.unwrap(), recount);
            let count = |state| by_state.get(&state).copied().unwrap_or(0);
            assert_eq!(stats.dispatching, count(TicketState::Dispatching));
            assert_eq!(stats.active, count(TicketState::Active));
            assert_eq!(stats.dead_letters, count(TicketState::Failed));
        }
    }
    // The run went through every transition.
    use TicketState::*;
    let every_transition = HashSet::from([
        (Queued, Dispatching),
        (Dispatching, Queued),
        (Queued, Active),
        (Dispatching, Active),
        (Queued, Failed),
        (Dispatching, Failed),
        (Active, Ended),
        (Dispatching, Ended),
        (Queued, Cancelled),
    ]);
    assert_eq!(reached, every_transition);
    fx.stop();
}

#[tokio::test]
async fn stats_report_the_oldest_wait_and_every_count() {
    let fx = Fixture::start().await;
    let empty = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(empty, Default::default());
    assert_eq!(empty.oldest_enqueued_at_ms, None);

    let kind = EgressKind::Track;
    let mut tickets = Vec::new();
    for (offset, room) in [(0, "a"), (10, "b"), (20, "c"), (30, "d")] {
        let enqueued = fx
            .store
            .enqueue(&fx.queue, request(kind, room), T0 + offset)
            .await
            .unwrap();
        tickets.push(enqueued.ticket);
    }
    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.oldest_enqueued_at_ms, Some(T0));
    assert_eq!(stats.depth, 4);

    fx.store
        .claim(&tickets[0], "x", T0 + 40)
        .await
        .unwrap()
        .unwrap();
    assert!(
        fx.store
            .mark_started(&tickets[1], "EG_b", T0 + 41)
            .await
            .unwrap()
    );
    assert!(
        fx.store
            .mark_failed(&tickets[2], "boom", T0 + 42)
            .await
            .unwrap()
    );
    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.oldest_enqueued_at_ms, Some(T0 + 30));
    assert_eq!(stats.depth, 1);
    assert_eq!(stats.queued, Demand::from_counts([(kind, 1)]));
    assert_eq!(stats.demand, Demand::from_counts([(kind, 2)]));
    assert_eq!(stats.dispatching, 1);
    assert_eq!(stats.active, 1);
    assert_eq!(stats.dead_letters, 1);

    // Requeued, the first ticket is the oldest again.
    assert!(fx.store.requeue(&tickets[0], "x").await.unwrap());
    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.oldest_enqueued_at_ms, Some(T0));
    // Another queue is not affected.
    assert_eq!(
        fx.store.stats(&queue("elsewhere")).await.unwrap(),
        Default::default()
    );
    fx.stop();
}

#[tokio::test]
async fn cancel_tells_what_it_found() {
    let fx = Fixture::start().await;
    let kind = EgressKind::RoomComposite;
    let queued = fx.enqueue(kind, "a").await;
    let dispatching = fx.enqueue(kind, "b").await;
    let active = fx.enqueue(kind, "c").await;
    fx.store
        .claim(&dispatching, "x", T0)
        .await
        .unwrap()
        .unwrap();
    assert!(fx.store.mark_started(&active, "EG_c", T0).await.unwrap());

    assert_eq!(
        fx.store.cancel(&queued, T0 + 1).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        fx.store.cancel(&queued, T0 + 2).await.unwrap(),
        CancelOutcome::NotQueued(TicketState::Cancelled)
    );
    // Being started: the intent is recorded, for the dispatcher to act on once settled.
    assert_eq!(
        fx.store.cancel(&dispatching, T0).await.unwrap(),
        CancelOutcome::Requested
    );
    let being_started = fx.store.get(&dispatching).await.unwrap().unwrap();
    assert_eq!(being_started.state, TicketState::Dispatching);
    assert_eq!(being_started.cancel_requested_at_ms, Some(T0));
    assert_eq!(
        fx.store.cancel(&active, T0).await.unwrap(),
        CancelOutcome::NotQueued(TicketState::Active)
    );
    let other_queue = TicketId::generate(&queue("other"));
    assert_eq!(
        fx.store.cancel(&other_queue, T0).await.unwrap(),
        CancelOutcome::NotFound
    );

    let cancelled = fx.store.get(&queued).await.unwrap().unwrap();
    assert_eq!(cancelled.state, TicketState::Cancelled);
    assert_eq!(cancelled.ended_at_ms, Some(T0 + 1));
    assert_eq!(fx.store.position(&queued).await.unwrap(), None);
    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.depth, 0);
    assert_eq!(stats.demand.total(), 1, "the dispatching ticket");
    fx.stop();
}

#[tokio::test]
async fn failed_tickets_become_dead_letters_newest_first() {
    let fx = Fixture::start().await;
    let kind = EgressKind::Participant;
    let mut failed = Vec::new();
    for index in 0..3u64 {
        let ticket = fx.enqueue(kind, &format!("room-{index}")).await;
        if index == 1 {
            fx.store.claim(&ticket, "x", T0).await.unwrap().unwrap();
        }
        assert!(
            fx.store
                .mark_failed(&ticket, &format!("error {index}"), T0 + 100 + index)
                .await
                .unwrap()
        );
        failed.push(ticket);
    }
    let survivor = fx.enqueue(kind, "fine").await;

    let dead = fx.store.dead_letters(&fx.queue, 10).await.unwrap();
    let ids: Vec<_> = dead.iter().map(|ticket| ticket.id.clone()).collect();
    assert_eq!(
        ids,
        vec![failed[2].clone(), failed[1].clone(), failed[0].clone()]
    );
    assert_eq!(dead[0].error.as_deref(), Some("error 2"));
    assert_eq!(dead[0].ended_at_ms, Some(T0 + 102));
    assert!(
        dead.iter()
            .all(|ticket| ticket.state == TicketState::Failed)
    );
    assert_eq!(fx.store.dead_letters(&fx.queue, 2).await.unwrap().len(), 2);
    assert!(
        fx.store
            .dead_letters(&fx.queue, 0)
            .await
            .unwrap()
            .is_empty()
    );

    let stats = fx.store.stats(&fx.queue).await.unwrap();
    assert_eq!(stats.dead_letters, 3);
    assert_eq!(stats.demand, Demand::from_counts([(kind, 1)]));
    assert_eq!(fx.pending().await, vec![survivor]);
    fx.stop();
}

#[tokio::test]
async fn finished_tickets_expire_after_the_ttl() {
    let fx = Fixture::start().await;
    let kind = EgressKind::AudioWeb;
    let queued = fx.enqueue(kind, "q").await;
    let active = fx.enqueue(kind, "a").await;
    let failed = fx.enqueue(kind, "f").await;
    let ended = fx.enqueue(kind, "e").await;
    let cancelled = fx.enqueue(kind, "c").await;
    assert!(fx.store.mark_started(&active, "EG_a", T0).await.unwrap());
    assert!(fx.store.mark_failed(&failed, "boom", T0).await.unwrap());
    assert!(fx.store.mark_started(&ended, "EG_e", T0).await.unwrap());
    assert!(fx.store.mark_ended(&ended, T0).await.unwrap());
    assert_eq!(
        fx.store.cancel(&cancelled, T0).await.unwrap(),
        CancelOutcome::Cancelled
    );

    let mut raw = fx.raw().await;
    let week_ms = StoreOptions::default().finished_ttl.as_millis() as i64;
    for ticket in [&failed, &ended, &cancelled] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(ticket_key(ticket))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(ttl > week_ms - 60_000 && ttl <= week_ms, "{ticket}: {ttl}");
    }
    for ticket in [&queued, &active] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(ticket_key(ticket))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(ttl, -1, "{ticket} must not expire");
    }
    fx.stop();

    // With a short TTL the hash really goes away.
    let fx = Fixture::start_with(StoreOptions {
        finished_ttl: Duration::from_millis(150),
        ..StoreOptions::default()
    })
    .await;
    let ticket = fx.enqueue(kind, "short").await;
    assert_eq!(
        fx.store.cancel(&ticket, T0).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(fx.store.get(&ticket).await.unwrap().is_some());
    let store = fx.store.clone();
    let gone = eventually(Duration::from_secs(3), || {
        let store = store.clone();
        let ticket = ticket.clone();
        async move { store.get(&ticket).await.unwrap().is_none() }
    })
    .await;
    assert!(gone, "the cancelled ticket did not expire");
    fx.stop();
}

#[tokio::test]
async fn the_room_index_holds_the_queued_tickets_of_a_room() {
    let fx = Fixture::start().await;
    let composite = fx.enqueue(EgressKind::RoomComposite, "board").await;
    let audio = fx.enqueue(EgressKind::AudioRoomComposite, "board").await;
    let elsewhere = fx.enqueue(EgressKind::RoomComposite, "kitchen").await;
    let in_room = |room: &'static str| {
        let store = fx.store.clone();
        let queue = fx.queue.clone();
        async move {
            let mut ids = store.queued_in_room(&queue, room).await.unwrap();
            ids.sort();
            ids
        }
    };
    let mut both = vec![composite.clone(), audio.clone()];
    both.sort();
    assert_eq!(in_room("board").await, both);
    assert_eq!(in_room("kitchen").await, vec![elsewhere.clone()]);
    assert!(in_room("nowhere").await.is_empty());

    // Claimed tickets leave the index, and come back when requeued.
    fx.store.claim(&composite, "x", T0).await.unwrap().unwrap();
    assert_eq!(in_room("board").await, vec![audio.clone()]);
    assert!(fx.store.requeue(&composite, "x").await.unwrap());
    assert_eq!(in_room("board").await, both);

    assert_eq!(
        fx.store.cancel(&audio, T0).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(fx.store.mark_started(&composite, "EG", T0).await.unwrap());
    assert!(in_room("board").await.is_empty());
    assert!(fx.store.mark_failed(&elsewhere, "x", T0).await.unwrap());
    assert!(in_room("kitchen").await.is_empty());
    fx.stop();
}

#[tokio::test]
async fn egress_ids_lead_to_active_tickets() {
    let fx = Fixture::start().await;
    let kind = EgressKind::RoomComposite;
    let first = fx.enqueue(kind, "a").await;
    let second = fx.enqueue(kind, "b").await;
    fx.store.claim(&first, "x", T0).await.unwrap().unwrap();
    assert!(
        fx.store
            .mark_started(&first, "EG_first", T0 + 5)
            .await
            .unwrap()
    );
    assert!(
        fx.store
            .mark_started(&second, "EG_second", T0 + 6)
            .await
            .unwrap()
    );

    assert_eq!(
        fx.store
            .ticket_for_egress(&fx.queue, "EG_first")
            .await
            .unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        fx.store
            .ticket_for_egress(&fx.queue, "EG_unknown")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        fx.store.active(&fx.queue).await.unwrap(),
        vec![first.clone(), second.clone()]
    );
    assert!(fx.store.dispatching(&fx.queue).await.unwrap().is_empty());
    let started = fx.store.get(&first).await.unwrap().unwrap();
    assert_eq!(started.egress_id.as_deref(), Some("EG_first"));
    assert_eq!(started.started_at_ms, Some(T0 + 5));
    assert_eq!(started.state, TicketState::Active);

    assert!(fx.store.mark_ended(&first, T0 + 60).await.unwrap());
    assert_eq!(
        fx.store
            .ticket_for_egress(&fx.queue, "EG_first")
            .await
            .unwrap(),
        None
    );
    assert_eq!(fx.store.active(&fx.queue).await.unwrap(), vec![second]);
    let ended = fx.store.get(&first).await.unwrap().unwrap();
    assert_eq!(ended.state, TicketState::Ended);
    assert_eq!(ended.ended_at_ms, Some(T0 + 60));
    fx.stop();
}

#[tokio::test]
async fn every_queue_enqueued_to_is_listed() {
    let fx = Fixture::start().await;
    assert!(fx.store.queues().await.unwrap().is_empty());
    for name in ["zeta", "alpha", "zeta"] {
        fx.store
            .enqueue(&queue(name), request(EgressKind::Track, name), T0)
            .await
            .unwrap();
    }
    assert_eq!(
        fx.store.queues().await.unwrap(),
        vec![queue("alpha"), queue("zeta")]
    );
    // Queues are independent: the same room is queued once in each.
    assert_eq!(fx.store.demand(&queue("alpha")).await.unwrap().total(), 1);
    assert_eq!(fx.store.demand(&fx.queue).await.unwrap().total(), 0);
    fx.stop();
}

/// Waits for an event matching `wanted`, skipping others.
async fn wait_for(
    events: &mut broadcast::Receiver<QueueEvent>,
    limit: Duration,
    wanted: impl Fn(&QueueEvent) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return true,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_listener_reports_changes_and_resubscribes_after_a_restart() {
    let mut fx = Fixture::start().await;
    let (sender, mut events) = broadcast::channel(64);
    let shutdown = CancellationToken::new();
    let listener = tokio::spawn(run_event_listener(
        fx.store.client().clone(),
        sender,
        shutdown.clone(),
    ));
    assert!(
        wait_for(&mut events, Duration::from_secs(5), |event| *event
            == QueueEvent::Resync)
        .await,
        "no Resync after the first subscription"
    );

    let changed = QueueEvent::Changed(fx.queue.clone());
    let started = Instant::now();
    fx.enqueue(EgressKind::RoomComposite, "a").await;
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );
    let latency = started.elapsed();
    assert!(latency < Duration::from_millis(500), "{latency:?}");

    // Every transition announces itself, on the documented channel.
    let ticket = fx.enqueue(EgressKind::RoomComposite, "b").await;
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );
    fx.store.cancel(&ticket, T0).await.unwrap();
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );
    let mut raw = fx.raw().await;
    let _: u64 = redis::cmd("PUBLISH")
        .arg(events_channel(&queue("manual")))
        .arg("manual")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == QueueEvent::Changed(queue("manual")))
        .await
    );

    fx.server.stop();
    fx.server.start_again().unwrap();
    assert!(
        wait_for(&mut events, Duration::from_secs(10), |event| *event
            == QueueEvent::Resync)
        .await,
        "no Resync after Redis came back"
    );
    // The store's first call after the restart may see the dead connection.
    let store = fx.store.clone();
    let queue_name = fx.queue.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let store = store.clone();
            let queue_name = queue_name.clone();
            async move {
                store
                    .enqueue(&queue_name, request(EgressKind::Web, "c"), T0)
                    .await
                    .is_ok()
            }
        })
        .await
    );
    assert!(
        wait_for(&mut events, Duration::from_secs(2), |event| *event
            == changed)
        .await
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), listener)
        .await
        .expect("the listener stops on shutdown")
        .unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_fails_fast_while_redis_is_down_and_recovers_by_itself() {
    let mut fx = Fixture::start().await;
    fx.enqueue(EgressKind::RoomComposite, "before").await;
    fx.store.ping().await.unwrap();

    fx.server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let error = fx.store.demand(&fx.queue).await.unwrap_err();
        assert!(matches!(error, QueueError::Unavailable(_)), "{error:?}");
        assert_eq!(error.metric_label(), "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let error = fx
            .store
            .enqueue(&fx.queue, request(EgressKind::Web, "during"), T0)
            .await
            .unwrap_err();
        assert!(matches!(error, QueueError::Unavailable(_)), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    fx.server.start_again().unwrap();
    let store = fx.store.clone();
    let back = eventually(Duration::from_secs(10), || {
        let store = store.clone();
        async move { store.ping().await.is_ok() }
    })
    .await;
    assert!(back, "the store did not reconnect");
    // An in-memory server comes back empty; the store works as before.
    assert_eq!(fx.store.demand(&fx.queue).await.unwrap(), Demand::default());
    fx.enqueue(EgressKind::RoomComposite, "after").await;
    assert_eq!(fx.store.demand(&fx.queue).await.unwrap().total(), 1);
    fx.stop();
}

/// A TCP proxy in front of Redis that can black-hole the connections it carries: they stay
/// open but nothing goes through them any more, as when a Redis pod disappears with its IP.
/// Connections opened afterwards go through.
struct BlackHoleProxy {
    port: u16,
    epoch: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl BlackHoleProxy {
    async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn({
            let epoch = epoch.clone();
            async move {
                // Dropped with the accept task, which aborts every pump.
                let mut pumps = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        continue;
                    };
                    let born = epoch.load(Ordering::SeqCst);
                    let (client_read, client_write) = client.into_split();
                    let (upstream_read, upstream_write) = upstream.into_split();
                    pumps.spawn(pump(client_read, upstream_write, epoch.clone(), born));
                    pumps.spawn(pump(upstream_read, client_write, epoch.clone(), born));
                }
            }
        });
        BlackHoleProxy {
            port,
            epoch,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn black_hole_open_connections(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes until the connection closes; drops them once `epoch` has moved past `born`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    epoch: Arc<AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                if epoch.load(Ordering::SeqCst) == born
                    && to.write_all(&buffer[..read]).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_replaces_a_connection_that_stopped_answering() {
    let mut server = RedisServer::start().unwrap();
    let proxy = BlackHoleProxy::start(server.port()).await;
    let store = QueueStore::connect(&proxy.url(), StoreOptions::default())
        .await
        .unwrap();
    let queue = queue("recordings");
    store
        .enqueue(&queue, request(EgressKind::RoomComposite, "a"), T0)
        .await
        .unwrap();

    proxy.black_hole_open_connections();
    let started = Instant::now();
    let error = store.demand(&queue).await.unwrap_err();
    assert!(matches!(error, QueueError::Unavailable(_)), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Without being rebuilt, the store answers again through a new connection.
    let back = eventually(Duration::from_secs(5), || {
        let store = store.clone();
        let queue = queue.clone();
        async move { store.demand(&queue).await.is_ok() }
    })
    .await;
    assert!(back, "the store kept using the dead connection");
    assert_eq!(store.demand(&queue).await.unwrap().total(), 1);
    server.stop();
}

#[tokio::test]
async fn connecting_to_a_stopped_redis_fails_quickly() {
    let mut server = RedisServer::start().unwrap();
    let url = server.url();
    server.stop();
    let started = Instant::now();
    let error = QueueStore::connect(&url, StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, QueueError::Unavailable(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Removes a directory when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_server_keeps_the_queue_across_a_restart() {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "egress-scaler-test-{}",
        uuid::Uuid::new_v4().simple()
    )));
    let mut server = RedisServer::start_persistent(&dir.0).unwrap();
    assert_eq!(server.data_dir(), Some(dir.0.as_path()));
    let store = QueueStore::connect(&server.url(), StoreOptions::default())
        .await
        .unwrap();
    let queue = queue("durable");
    let first = store
        .enqueue(&queue, request(EgressKind::RoomComposite, "a"), T0)
        .await
        .unwrap()
        .ticket;
    let second = store
        .enqueue(&queue, request(EgressKind::Track, "b"), T0 + 1)
        .await
        .unwrap()
        .ticket;
    let port = server.port();

    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert!(server.is_running());
    let fresh = QueueStore::connect(&server.url(), StoreOptions::default())
        .await
        .unwrap();
    let pending: Vec<_> = fresh
        .peek_n(&queue, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|ticket| ticket.id)
        .collect();
    assert_eq!(pending, vec![first, second]);
    assert_eq!(fresh.demand(&queue).await.unwrap().total(), 2);
    server.stop();
    assert!(!server.is_running());
}

#[tokio::test]
async fn the_default_key_is_what_the_request_records_and_a_changed_request_conflicts() {
    let fx = Fixture::start().await;
    let track = |room: &str, track_id: &str| NewRequest {
        request: Some(format!(r#"{{"roomName":"{room}","trackId":"{track_id}"}}"#)),
        ..request(EgressKind::Track, room)
    };
    let one = fx
        .store
        .enqueue(&fx.queue, track("r", "TR_1"), T0)
        .await
        .unwrap();
    let two = fx
        .store
        .enqueue(&fx.queue, track("r", "TR_2"), T0)
        .await
        .unwrap();
    assert!(
        !one.duplicate && !two.duplicate,
        "two tracks of one room are two recordings"
    );
    let stored = fx.store.get(&one.ticket).await.unwrap().unwrap();
    assert_eq!(stored.dedup_key, "track:r:TR_1");
    let again = fx
        .store
        .enqueue(&fx.queue, track("r", "TR_1"), T0)
        .await
        .unwrap();
    assert_eq!(
        (again.ticket, again.duplicate, again.conflict),
        (one.ticket.clone(), true, false)
    );

    // A validated request: the normalised form is stored, keyed by what it records.
    let start = egress_scaler::egress_request::StartRequest::parse(
        EgressKind::Participant,
        "r",
        Some(serde_json::json!({"identity": "bob", "screen_share": false})),
    )
    .unwrap();
    let bob = fx
        .store
        .enqueue(&fx.queue, NewRequest::new(&start, "r", None), T0)
        .await
        .unwrap();
    let stored = fx.store.get(&bob.ticket).await.unwrap().unwrap();
    assert_eq!(stored.dedup_key, "participant:r:bob");
    assert_eq!(
        stored.request.as_deref(),
        Some(r#"{"roomName":"r","identity":"bob"}"#)
    );
    let screen = egress_scaler::egress_request::StartRequest::parse(
        EgressKind::Participant,
        "r",
        Some(serde_json::json!({"identity": "bob", "screenShare": true})),
    )
    .unwrap();
    let conflict = fx
        .store
        .enqueue(&fx.queue, NewRequest::new(&screen, "r", None), T0)
        .await
        .unwrap();
    assert_eq!(
        (conflict.ticket, conflict.duplicate, conflict.conflict),
        (bob.ticket.clone(), true, true)
    );
    assert_eq!(fx.store.stats(&fx.queue).await.unwrap().depth, 3);

    // A holder written before digests were stored counts as the same request.
    let mut raw = fx.raw().await;
    let _: () = redis::cmd("HDEL")
        .arg(ticket_key(&bob.ticket))
        .arg("digest")
        .query_async(&mut raw)
        .await
        .unwrap();
    let legacy = fx
        .store
        .enqueue(&fx.queue, NewRequest::new(&screen, "r", None), T0)
        .await
        .unwrap();
    assert_eq!((legacy.duplicate, legacy.conflict), (true, false));
    fx.stop();
}
