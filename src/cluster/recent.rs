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
//! The record is a fixed table of join times, in buckets of one cache line indexed by the
//! room's hash: each holds seven entries (a 16-bit tag of the hash and a time) and a floor.
//! A join moves its room's entry forward, or takes the bucket's oldest entry, whose time
//! first goes into the bucket's floor; a room without an entry counts as joined at the
//! floor. So a room pushed out of a full bucket, or two rooms whose tags collide, can only
//! make a pin live longer, never shorter; and rooms merely sharing a bucket no longer keep
//! each other's pins (a table of bare times per slot, as before, was 63% full at 135 joins
//! a second with the 121 s default window: most ended rooms kept their pins, and a drained
//! node its rooms, until the idle sweep). No lock, no allocation, bounded memory: 4 096
//! buckets x 64 bytes = 256 KiB, 28 672 rooms joined within a window before a floor rises.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::placement::Millis;

/// Buckets in the table (a power of two).
const BUCKETS: usize = 1 << 12;
/// Entries per bucket: with the floor, one 64-byte cache line.
const WAYS: usize = 7;
/// An entry: the tag in the top 16 bits, the time (ms since the epoch) in the low 48.
const TIME_BITS: u32 = 48;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// Attempts at taking an entry against other joins of the bucket before a join settles for
/// raising the floor (still correct: the room then counts as joined by the floor).
const TRIES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Bucket {
    ways: [AtomicU64; WAYS],
    /// The latest time of an entry pushed out: every room of the bucket without an entry of
    /// its own counts as joined then.
    floor: AtomicU64,
}

fn tag(room_hash: u64) -> u64 {
    // Never 0, which marks an empty entry.
    (room_hash >> TIME_BITS).max(1)
}

fn time(entry: u64) -> Millis {
    entry & TIME_MASK
}

/// The last times joins were routed to rooms; see the module documentation.
#[derive(Debug)]
pub struct RecentJoins {
    buckets: Box<[Bucket]>,
}

impl Default for RecentJoins {
    fn default() -> Self {
        RecentJoins {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }
}

impl RecentJoins {
    #[inline]
    fn bucket(&self, room_hash: u64) -> &Bucket {
        // The room hash is XXH3: uniform in every bit; the tag takes the top ones.
        &self.buckets[(room_hash as usize) & (BUCKETS - 1)]
    }

    /// A join for the room was routed at `now`. A later time already there stays (a join
    /// that read the clock after this one, and got here first).
    #[inline]
    pub fn joined(&self, room_hash: u64, now: Millis) {
        let b = self.bucket(room_hash);
        let tag = tag(room_hash);
        let now = now.clamp(1, TIME_MASK);
        let entry = (tag << TIME_BITS) | now;
        'retry: for _ in 0..TRIES {
            let mut oldest = (0, u64::MAX);
            for (i, w) in b.ways.iter().enumerate() {
                let e = w.load(Ordering::Acquire);
                if e >> TIME_BITS == tag {
                    if time(e) >= now
                        || w.compare_exchange(e, entry, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                    {
                        return;
                    }
                    continue 'retry;
                }
                if time(e) < time(oldest.1) || oldest.1 == u64::MAX {
                    oldest = (i, e);
                }
            }
            let (i, e) = oldest;
            // The floor first: a reader that finds the entry gone finds its time there.
            if e != 0 {
                b.floor.fetch_max(time(e), Ordering::AcqRel);
            }
            if b.ways[i]
                .compare_exchange(e, entry, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
        b.floor.fetch_max(now, Ordering::AcqRel);
    }

    /// Brings join times later than `now` back to it: after a backward step of the wall
    /// clock, they would keep every room in their bucket looking joined for as long as the
    /// step. (Called by the sweep; every entry of the table.)
    pub fn clamp(&self, now: Millis) {
        let now = now.clamp(1, TIME_MASK);
        for b in self.buckets.iter() {
            for w in &b.ways {
                let _ = w.fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                    (time(e) > now).then_some((e & !TIME_MASK) | now)
                });
            }
            // Read first: a write to every bucket at every sweep, with no step to undo,
            // would take each cache line from the cores that join.
            if b.floor.load(Ordering::Relaxed) > now {
                b.floor.fetch_min(now, Ordering::AcqRel);
            }
        }
    }

    /// Whether a join for the room was routed after `since` (or, conservatively, for a room
    /// whose tag it shares, or for one pushed out of its bucket).
    pub fn joined_since(&self, room_hash: u64, since: Millis) -> bool {
        let b = self.bucket(room_hash);
        let tag = tag(room_hash);
        b.ways.iter().any(|w| {
            let e = w.load(Ordering::Acquire);
            e >> TIME_BITS == tag && time(e) > since
        }) || b.floor.load(Ordering::Acquire) > since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A room hash in bucket `bucket` with tag `tag`.
    fn room(bucket: u64, tag: u64) -> u64 {
        (tag << TIME_BITS) | bucket
    }

    #[test]
    fn a_join_is_remembered_until_the_window_passes() {
        let r = RecentJoins::default();
        let a = room(42, 7);
        assert!(!r.joined_since(a, 0), "never joined");
        r.joined(a, 1_000);
        assert!(r.joined_since(a, 999));
        assert!(!r.joined_since(a, 1_000), "only joins after `since` count");
        assert!(!r.joined_since(room(43, 7), 0), "another bucket");
        r.joined(a, 900);
        assert!(
            r.joined_since(a, 950),
            "an earlier time arriving later does not move the entry back"
        );
        r.joined(a, 5_000);
        assert!(r.joined_since(a, 4_999));
    }

    #[test]
    fn rooms_sharing_a_bucket_do_not_keep_each_other_recent() {
        let r = RecentJoins::default();
        r.joined(room(42, 7), 5_000);
        assert!(
            !r.joined_since(room(42, 8), 0),
            "a room of the same bucket, never joined"
        );
        r.joined(room(42, 8), 1_000);
        assert!(!r.joined_since(room(42, 8), 1_000));
        assert!(r.joined_since(room(42, 7), 4_999));
    }

    #[test]
    fn a_room_pushed_out_of_a_full_bucket_still_counts_as_joined() {
        let r = RecentJoins::default();
        // Eight rooms in one bucket of seven entries: the oldest goes to the floor.
        for t in 1..=8 {
            r.joined(room(5, t), 1_000 * t);
        }
        assert!(r.joined_since(room(5, 1), 999), "pushed out, yet joined");
        assert!(
            r.joined_since(room(5, 99), 999),
            "so is any room of the bucket (kept longer, never shorter)"
        );
        assert!(
            !r.joined_since(room(5, 99), 1_000),
            "but not after the floor"
        );
        for t in 2..=8 {
            assert!(r.joined_since(room(5, t), 1_000 * t - 1), "room {t}");
        }
        assert!(
            !r.joined_since(room(6, 1), 0),
            "other buckets are untouched"
        );
    }

    #[test]
    fn a_backward_step_of_the_clock_brings_join_times_back_to_now() {
        let r = RecentJoins::default();
        r.joined(room(7, 3), 3_600_000);
        for t in 10..18 {
            r.joined(room(9, t), 3_600_000 + t);
        }
        r.clamp(1_000);
        assert!(r.joined_since(room(7, 3), 999), "still a join, as of now");
        assert!(!r.joined_since(room(7, 3), 1_000), "not one an hour ahead");
        assert!(!r.joined_since(room(9, 99), 1_000), "nor the floor");
        assert!(
            !r.joined_since(room(8, 3), 0),
            "an empty bucket stays empty"
        );
    }

    #[test]
    fn no_join_is_forgotten_however_the_threads_race() {
        // Eight threads join rooms of four buckets (far more rooms than entries); each
        // checks at once that its own join is seen.
        let r = std::sync::Arc::new(RecentJoins::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let h = room(i % 4, 1 + (i * 8 + t) % 97);
                        let at = 1_000 + i;
                        r.joined(h, at);
                        assert!(r.joined_since(h, at - 1), "thread {t}, join {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
