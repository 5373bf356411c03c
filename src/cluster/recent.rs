//! Which rooms this router sent someone to lately: the guard that keeps a room from being
//! split by a ticket still on its way.
//!
//! A user redirected to a room's node holds a ticket for that node until the ticket expires.
//! If the node meanwhile reports the room ended (its last participant left) and the pin were
//! released at once, the next join could place the room on another node while the ticket
//! holder arrives at the old one: a split, healed only by the next heartbeat's `evict`. So a
//! room that had a join routed within the ticket lifetime keeps its pin when its node reports
//! it ended; the router looks again at the node's next heartbeat and releases it once the
//! last ticket has expired.
//!
//! The record is a fixed table of join times indexed by the room's hash: one relaxed atomic
//! maximum per join, no lock, no allocation, bounded memory. A slot only moves forward, so
//! two rooms sharing it, or two joins whose clock reads reach it out of order, can only make
//! a pin live longer, never shorter.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::placement::Millis;

/// Slots in the table (a power of two). 16 384 slots x 8 bytes = 128 KiB.
const SLOTS: usize = 1 << 14;

/// The last time a join was routed to a room, per slot.
#[derive(Debug)]
pub struct RecentJoins {
    slots: Box<[AtomicU64]>,
}

impl Default for RecentJoins {
    fn default() -> Self {
        RecentJoins {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RecentJoins {
    #[inline]
    fn slot(&self, room_hash: u64) -> &AtomicU64 {
        // The room hash is XXH3: uniform in every bit.
        &self.slots[(room_hash as usize) & (SLOTS - 1)]
    }

    /// A join for the room was routed at `now`. A later time already there stays (a join
    /// that read the clock after this one, and got here first).
    #[inline]
    pub fn joined(&self, room_hash: u64, now: Millis) {
        self.slot(room_hash)
            .fetch_max(now.max(1), Ordering::Relaxed);
    }

    /// Brings join times later than `now` back to it: after a backward step of the wall
    /// clock, they would keep every room in their slot looking joined for as long as the
    /// step. (Called by the sweep; 16 384 relaxed atomics.)
    pub fn clamp(&self, now: Millis) {
        for slot in self.slots.iter() {
            slot.fetch_min(now.max(1), Ordering::Relaxed);
        }
    }

    /// Whether a join for the room (or for a room sharing its slot) was routed after `since`.
    pub fn joined_since(&self, room_hash: u64, since: Millis) -> bool {
        self.slot(room_hash).load(Ordering::Relaxed) > since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_is_remembered_until_the_window_passes() {
        let r = RecentJoins::default();
        assert!(!r.joined_since(42, 0), "never joined");
        r.joined(42, 1_000);
        assert!(r.joined_since(42, 999));
        assert!(!r.joined_since(42, 1_000), "only joins after `since` count");
        assert!(!r.joined_since(43, 0), "another slot");
        r.joined(42 + SLOTS as u64, 5_000);
        assert!(
            r.joined_since(42, 4_000),
            "a room sharing the slot keeps it recent"
        );
        r.joined(42, 4_000);
        assert!(
            r.joined_since(42, 4_500),
            "an earlier time arriving later does not move the slot back"
        );
    }

    #[test]
    fn a_backward_step_of_the_clock_brings_join_times_back_to_now() {
        let r = RecentJoins::default();
        r.joined(7, 3_600_000);
        r.clamp(1_000);
        assert!(r.joined_since(7, 999), "still a join, as of now");
        assert!(!r.joined_since(7, 1_000), "not one an hour ahead");
        assert!(!r.joined_since(8, 0), "an empty slot stays empty");
    }
}
