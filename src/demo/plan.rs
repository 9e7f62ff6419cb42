//! The random part of a demo, drawn once from the seed: when each room asks for its
//! recording, which rooms ask twice, and how long each recording lasts.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One room of the burst.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRoom {
    /// Its name, e.g. `room-07`.
    pub name: String,
    /// How long its recording lasts once started.
    pub recording: Duration,
}

/// One enqueue call of the burst.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    /// When it is sent, from the start of the burst.
    pub at: Duration,
    /// Index of its room in [`Plan::rooms`].
    pub room: usize,
    /// A second request for a room that already asked: it must be answered as a duplicate.
    pub repeat: bool,
}

/// The whole burst.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The rooms, in the order of their first request.
    pub rooms: Vec<PlannedRoom>,
    /// Every enqueue call, in sending order.
    pub requests: Vec<PlannedRequest>,
}

/// Shortest and longest gap between a room's first request and its repeat.
const REPEAT_AFTER: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(1));

impl Plan {
    /// Draws `rooms` rooms that ask within `burst`, one in four of them twice, with recordings
    /// lasting between `recording.0` and `recording.1`.
    pub fn draw(rooms: u32, seed: u64, burst: Duration, recording: (Duration, Duration)) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rooms as usize;
        let width = count.to_string().len().max(2);
        let mut arrivals: Vec<Duration> = (0..count)
            .map(|_| burst.mul_f64(rng.random_range(0.0..=1.0)))
            .collect();
        arrivals.sort();
        let rooms: Vec<PlannedRoom> = (0..count)
            .map(|index| PlannedRoom {
                name: format!("room-{:0width$}", index + 1),
                recording: between(&mut rng, recording),
            })
            .collect();
        let mut requests: Vec<PlannedRequest> = arrivals
            .iter()
            .enumerate()
            .map(|(room, at)| PlannedRequest {
                at: *at,
                room,
                repeat: false,
            })
            .collect();
        for room in rand::seq::index::sample(&mut rng, count, count / 4) {
            requests.push(PlannedRequest {
                at: arrivals[room] + between(&mut rng, REPEAT_AFTER),
                room,
                repeat: true,
            });
        }
        // Stable: a repeat drawn with no gap still goes after its room's first request.
        requests.sort_by_key(|request| request.at);
        Plan { rooms, requests }
    }

    /// How many requests are repeats.
    pub fn repeats(&self) -> usize {
        self.requests.iter().filter(|r| r.repeat).count()
    }
}

fn between(rng: &mut StdRng, (low, high): (Duration, Duration)) -> Duration {
    low + (high - low).mul_f64(rng.random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BURST: Duration = Duration::from_secs(2);
    const RECORDING: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(8));

    #[test]
    fn the_same_seed_draws_the_same_plan() {
        assert_eq!(
            Plan::draw(24, 7, BURST, RECORDING),
            Plan::draw(24, 7, BURST, RECORDING)
        );
        assert_ne!(
            Plan::draw(24, 7, BURST, RECORDING),
            Plan::draw(24, 8, BURST, RECORDING)
        );
    }

    #[test]
    fn every_room_asks_once_within_the_burst_and_one_in_four_asks_again_later() {
        let plan = Plan::draw(24, 3, BURST, RECORDING);
        assert_eq!(plan.rooms.len(), 24);
        assert_eq!(plan.rooms[0].name, "room-01");
        assert_eq!(plan.rooms[23].name, "room-24");
        assert_eq!(plan.repeats(), 6);
        for (room, _) in plan.rooms.iter().enumerate() {
            let first: Vec<_> = plan
                .requests
                .iter()
                .enumerate()
                .filter(|(_, r)| r.room == room && !r.repeat)
                .collect();
            assert_eq!(first.len(), 1, "room {room}");
            let (first_index, first) = first[0];
            assert!(first.at <= BURST);
            for (index, repeat) in plan
                .requests
                .iter()
                .enumerate()
                .filter(|(_, r)| r.room == room && r.repeat)
            {
                assert!(index > first_index);
                assert!(repeat.at >= first.at + REPEAT_AFTER.0);
                assert!(repeat.at <= first.at + REPEAT_AFTER.1);
            }
        }
        assert!(plan.requests.windows(2).all(|w| w[0].at <= w[1].at));
        // First requests come in room order: room-01 asks first.
        let firsts: Vec<usize> = plan
            .requests
            .iter()
            .filter(|r| !r.repeat)
            .map(|r| r.room)
            .collect();
        assert_eq!(firsts, (0..24).collect::<Vec<_>>());
        assert!(
            plan.rooms
                .iter()
                .all(|r| r.recording >= RECORDING.0 && r.recording <= RECORDING.1)
        );
    }

    #[test]
    fn a_single_room_asks_once() {
        let plan = Plan::draw(1, 1, BURST, RECORDING);
        assert_eq!(plan.requests.len(), 1);
        assert_eq!(plan.repeats(), 0);
    }
}
