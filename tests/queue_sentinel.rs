//! The queue on Redis Sentinel: a real primary, its replica and three `redis-sentinel`
//! processes per test (`redis_server::RedisSentinels`). The primary is killed while tickets
//! are enqueued and started; what was confirmed before the failover is still there after it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_scaler::dispatch::lease::{Lease, read_leader};
use egress_scaler::model::EgressKind;
use egress_scaler::queue::{
    NewRequest, QueueError, QueueEvent, QueueName, QueueStore, StartOutcome, StoreOptions,
    TicketId, TicketState, run_event_listener,
};
use egress_scaler::redis_server::{RedisSentinels, SentinelPasswords};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// A fixed "now" so that stored times are predictable.
const T0: u64 = 1_700_000_000_000;
/// Requests the enqueuer sends, each retried with its dedup key until confirmed.
const REQUESTS: usize = 240;
/// Bound on the whole run, failover included.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Bound on the sentinels electing a new primary.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

fn options() -> StoreOptions {
    StoreOptions {
        connect_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_millis(500),
        ..StoreOptions::default()
    }
}

fn request(room: &str) -> NewRequest {
    NewRequest {
        kind: EgressKind::AudioRoomComposite,
        room_name: room.to_owned(),
        request: None,
        dedup_key: Some(format!("room:{room}")),
    }
}

fn queue() -> QueueName {
    "recordings".parse().unwrap()
}

/// What the three workers saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Room -> the ticket an enqueue of it was answered with (202).
    acknowledged: HashMap<String, TicketId>,
    /// Tickets whose claim was confirmed: the dispatcher would call StartEgress for each.
    claimed: Vec<TicketId>,
    /// Tickets recorded as started.
    started: HashSet<TicketId>,
    /// Calls that failed (unavailable) during the run.
    failures: usize,
    /// Scaling reads answered while the queue held unstarted tickets, with their demand.
    demand_reads: Vec<u64>,
    /// Scaling reads that failed.
    demand_failures: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_keeps_every_confirmed_enqueue_and_claim_and_the_lease() {
    let mut set = tokio::task::block_in_place(RedisSentinels::start).expect("sentinels start");
    let store = QueueStore::connect(&set.url(), options())
        .await
        .expect("store connects through the sentinels");
    let queue = queue();
    let lease = Lease::acquire(&store, &queue, "dispatcher-a", Duration::from_secs(60), T0)
        .await
        .unwrap()
        .expect("nobody holds the lease yet");
    let token = lease.token();

    let (events, mut heard) = broadcast::channel(4096);
    let stop = CancellationToken::new();
    let listener = tokio::spawn(run_event_listener(
        store.event_source(),
        events,
        stop.clone(),
    ));

    let seen = Arc::new(Mutex::new(Seen::default()));
    let deadline = Instant::now() + RUN_LIMIT;
    let enqueuer = {
        let (store, queue, seen) = (store.clone(), queue.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            for index in 0..REQUESTS {
                let room = format!("room-{index}");
                loop {
                    assert!(Instant::now() < deadline, "{room} never confirmed");
                    match store.enqueue(&queue, request(&room), T0).await {
                        Ok(enqueued) => {
                            seen.lock()
                                .unwrap()
                                .acknowledged
                                .insert(room, enqueued.ticket);
                            break;
                        }
                        Err(QueueError::Unavailable(_)) => {
                            seen.lock().unwrap().failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(other) => panic!("enqueue of {room}: {other}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let starter = {
        let (store, queue, seen) = (store.clone(), queue.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            let fenced = store.fenced(token);
            let mut attempt = 0u64;
            while Instant::now() < deadline {
                let (acknowledged, claimed) = {
                    let seen = seen.lock().unwrap();
                    (seen.acknowledged.len(), seen.claimed.len())
                };
                if acknowledged == REQUESTS && claimed >= REQUESTS / 2 {
                    return;
                }
                // Half the queue stays queued, so the demand is never truly zero.
                if claimed * 2 + 2 > acknowledged {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let next = match store.peek(&queue).await {
                    Ok(Some(ticket)) => ticket.id,
                    Ok(None) => continue,
                    Err(_) => {
                        seen.lock().unwrap().failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                attempt += 1;
                let attempt_id = format!("attempt-{attempt}");
                match fenced.claim(&next, &attempt_id, T0).await {
                    Ok(Some(_)) => {}
                    Ok(None) => continue,
                    Err(error) => {
                        // Not confirmed: the dispatcher would not start it, and reads the
                        // ticket again (it may be claimed on the new primary or not).
                        assert!(matches!(error, QueueError::Unavailable(_)), "{error}");
                        seen.lock().unwrap().failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
                seen.lock().unwrap().claimed.push(next.clone());
                // StartEgress would run here; then the start is recorded, retried until
                // confirmed (the same egress id: a retry records the same start).
                let egress = format!("EG_{attempt}");
                let mut retried = false;
                loop {
                    assert!(Instant::now() < deadline, "{next} start never recorded");
                    match fenced.mark_started(&next, &egress, T0).await {
                        Ok(StartOutcome::NotApplied) if retried => {
                            // The unconfirmed try was kept: recorded with this same egress.
                            let stored = store.get(&next).await.unwrap().unwrap();
                            assert_eq!(stored.state, TicketState::Active, "{next}");
                            assert_eq!(stored.egress_id.as_deref(), Some(egress.as_str()));
                            seen.lock().unwrap().started.insert(next.clone());
                            break;
                        }
                        Ok(outcome) => {
                            assert!(outcome.recorded(), "{next}: {outcome:?}");
                            seen.lock().unwrap().started.insert(next.clone());
                            break;
                        }
                        Err(error) => {
                            assert!(matches!(error, QueueError::Unavailable(_)), "{error}");
                            retried = true;
                            seen.lock().unwrap().failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    };
    let watched = CancellationToken::new();
    let watcher = {
        let (store, queue, seen) = (store.clone(), queue.clone(), Arc::clone(&seen));
        let stop = watched.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() && Instant::now() < deadline {
                let (acknowledged, claimed) = {
                    let seen = seen.lock().unwrap();
                    (seen.acknowledged.len(), seen.claimed.len())
                };
                let answer = store.scaling_input(&queue, None).await;
                {
                    let mut seen = seen.lock().unwrap();
                    match answer {
                        // Unstarted tickets were confirmed before this read began.
                        Ok(input) if acknowledged > claimed => {
                            seen.demand_reads.push(input.demand.total())
                        }
                        Ok(_) => {}
                        Err(QueueError::Unavailable(_)) => seen.demand_failures += 1,
                        Err(other) => panic!("scaling input: {other}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Mid-run: kill the primary once a quarter of the requests are confirmed.
    while seen.lock().unwrap().acknowledged.len() < REQUESTS / 4 {
        assert!(Instant::now() < deadline, "no progress before the failover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = {
        let seen = seen.lock().unwrap();
        (seen.acknowledged.clone(), seen.started.clone())
    };
    let old = tokio::task::block_in_place(|| set.kill_primary()).unwrap();
    let new = tokio::task::block_in_place(|| set.wait_for_failover(old, FAILOVER_LIMIT))
        .expect("the sentinels promote the replica");
    assert_ne!(old, new);
    // The old primary comes back, as Kubernetes would restart it, empty: the sentinels
    // make it a replica of the new one, so that writes are confirmed again.
    tokio::task::block_in_place(|| set.server_mut(old).unwrap().start_again()).unwrap();

    for task in [enqueuer, starter] {
        tokio::time::timeout(RUN_LIMIT, task)
            .await
            .expect("bounded")
            .unwrap();
    }
    watched.cancel();
    watcher.await.unwrap();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.acknowledged.len(), REQUESTS);
    assert!(seen.failures > 0, "the failover was never noticed");
    // Every enqueue confirmed before the failover is there after it, as confirmed.
    for (room, ticket) in &before.0 {
        let stored = store.get(ticket).await.unwrap();
        let stored = stored.unwrap_or_else(|| panic!("{room}: {ticket} lost in the failover"));
        assert_eq!(&stored.room_name, room);
    }
    // A retried enqueue found its ticket (dedup) or made one: one ticket per room either way.
    for (room, ticket) in &seen.acknowledged {
        let stored = store.get(ticket).await.unwrap();
        assert!(stored.is_some(), "{room}: {ticket} is gone");
    }
    // Nothing started twice: no ticket was claimed (confirmed) twice, and every start
    // recorded before the failover is still recorded.
    let distinct: HashSet<&TicketId> = seen.claimed.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.claimed.len(),
        "a ticket was claimed twice"
    );
    for ticket in &before.1 {
        let stored = store.get(ticket).await.unwrap().unwrap();
        assert_eq!(stored.state, TicketState::Active, "{ticket}");
    }
    for ticket in &seen.started {
        let stored = store.get(ticket).await.unwrap().unwrap();
        assert_eq!(stored.state, TicketState::Active, "{ticket}");
    }
    // GetMetrics' input never read zero with unstarted tickets confirmed: during the switch
    // it failed (unavailable) instead.
    assert!(!seen.demand_reads.is_empty());
    assert!(seen.demand_failures > 0, "no read fell in the switch");
    assert!(
        seen.demand_reads.iter().all(|total| *total > 0),
        "a zero demand was read: {:?}",
        seen.demand_reads
    );
    // The lease moved with the primary: still held, same token, renewable, not takeable.
    let leader = read_leader(&store, &queue)
        .await
        .unwrap()
        .expect("a leader");
    assert_eq!(leader.holder, "dispatcher-a");
    assert_eq!(leader.fence, Some(token));
    assert!(lease.renew().await.unwrap());
    let other = Lease::acquire(&store, &queue, "dispatcher-b", Duration::from_secs(60), T0)
        .await
        .unwrap();
    assert!(
        other.is_none(),
        "a second dispatcher took the lease after the failover"
    );

    // The event listener followed: a change on the new primary is heard.
    while heard.try_recv().is_ok() {}
    let heard_after = async {
        for index in 0.. {
            // A new room each time: a duplicate changes nothing and announces nothing.
            let room = format!("after-{index}");
            store.enqueue(&queue, request(&room), T0).await.unwrap();
            match tokio::time::timeout(Duration::from_millis(500), heard.recv()).await {
                Ok(Ok(QueueEvent::Changed(changed))) if changed == queue => return,
                _ => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), heard_after)
        .await
        .expect("queue events are heard from the new primary");
    stop.cancel();
    listener.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_replica_confirms_fails_and_reads_still_answer() {
    let mut set = tokio::task::block_in_place(RedisSentinels::start).expect("sentinels start");
    let store = QueueStore::connect(&set.url(), options()).await.unwrap();
    let queue = queue();
    store.enqueue(&queue, request("kept"), T0).await.unwrap();
    let primary = tokio::task::block_in_place(|| set.primary_port()).unwrap();
    let replica = set
        .server_ports()
        .into_iter()
        .find(|port| *port != primary)
        .unwrap();
    set.server_mut(replica).unwrap().stop();
    let error = store
        .enqueue(&queue, request("unconfirmed"), T0)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("not confirmed by the replicas"),
        "{error}"
    );
    // Reads ask for no replica: GetMetrics' input still answers, with both tickets (the
    // primary kept the unconfirmed one; its retry would find it by its dedup key).
    let input = store.scaling_input(&queue, None).await.unwrap();
    assert_eq!(input.demand.total(), 2);
    let retried = store.enqueue(&queue, request("unconfirmed"), T0).await;
    assert!(retried.is_err(), "still unconfirmed without a replica");

    // wait_replicas=0 confirms on the primary's word alone.
    let url = format!("{}?wait_replicas=0", set.url());
    let unsafe_store = QueueStore::connect(&url, options()).await.unwrap();
    let enqueued = unsafe_store
        .enqueue(&queue, request("unconfirmed"), T0)
        .await
        .unwrap();
    assert!(enqueued.duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_naming_no_known_master_fails_to_connect() {
    let set = tokio::task::block_in_place(RedisSentinels::start).expect("sentinels start");
    let url = set.url().replace("/egress-scaler", "/no-such-master");
    let error = QueueStore::connect(&url, options()).await.unwrap_err();
    assert!(matches!(error, QueueError::Unavailable(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_on_redis_and_on_the_sentinels_are_given_through_the_url() {
    let passwords = SentinelPasswords {
        redis: Some("redis-pw".to_owned()),
        sentinel: Some("sentinel-pw".to_owned()),
    };
    let mut set = tokio::task::block_in_place(|| RedisSentinels::start_with_passwords(passwords))
        .expect("sentinels start");
    let url = set.url();
    assert!(url.contains(":redis-pw@") && url.ends_with("?sentinel_password=sentinel-pw"));
    let store = QueueStore::connect(&url, options()).await.unwrap();
    let queue = queue();
    let kept = store.enqueue(&queue, request("kept"), T0).await.unwrap();

    // Each password is needed where it goes.
    for wrong in [
        url.replace(":redis-pw@", ":wrong@"),
        url.replace("sentinel-pw", "wrong"),
        url.replace(":redis-pw@", ""),
    ] {
        let error = QueueStore::connect(&wrong, options()).await.unwrap_err();
        assert!(matches!(error, QueueError::Unavailable(_)), "{error}");
    }

    // A failover with passwords: the sentinels authenticate to the replica they promote, and
    // the store to the new primary.
    let old = tokio::task::block_in_place(|| set.kill_primary()).unwrap();
    tokio::task::block_in_place(|| set.wait_for_failover(old, FAILOVER_LIMIT)).unwrap();
    let deadline = Instant::now() + FAILOVER_LIMIT;
    loop {
        match store.get(&kept.ticket).await {
            Ok(found) => {
                assert!(found.is_some(), "the confirmed enqueue survived");
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => panic!("no answer from the new primary: {error}"),
        }
    }
}
