//! The live book of expected-size reservations and the learned size of recurring rooms.
//!
//! A new room reserves its expected size on its node (counted in the node's `û` through
//! [`Live::add_reserved`]) until that many participants have arrived or the reservation
//! expires. Room sizes are learned from node reports: the peak of each session is remembered
//! so that the next session of a weekly class or standing meeting reserves what it needs.
//! What ended sessions taught ([`Learned`]) is handed to the store, which keeps it across
//! restarts when it is shared (Redis).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Live, NodeId};
use crate::placement::reservation::Reservation;
use crate::placement::Millis;
use crate::room::{RoomKey, RoomMap};

/// Most rooms whose history is kept; beyond it new rooms are not remembered until a sweep.
const MAX_HISTORY: usize = 1_000_000;

#[derive(Debug)]
struct Held {
    node: NodeId,
    /// The counters the reservation was added to, released on the same ones: a node removed
    /// and added again (a restart that said goodbye) has new counters, which must not lose
    /// what was only ever added to the old ones (they would go negative and hide later
    /// reservations from `û`).
    live: Arc<Live>,
    res: Reservation,
    /// When the room was placed: a report older than this cannot have seen it end.
    since: Millis,
    /// Its number in the order reservations were made ([`ReservationBook::mark`]).
    seq: u64,
}

/// Reservations by room.
#[derive(Debug, Default)]
pub struct ReservationBook {
    held: RoomMap<Held>,
    /// How many reservations were ever made: the next one's number.
    made: AtomicU64,
}

impl ReservationBook {
    /// Reserves `size` units for a room just placed on `node`. The caller releases any
    /// earlier reservation of the room first ([`ReservationBook::release`]); one that is
    /// still there (a racing placement of the same room) is released here.
    pub fn reserve(
        &self,
        room: &RoomKey,
        node: &NodeId,
        live: &Arc<Live>,
        size: u32,
        now: Millis,
        ttl_ms: u64,
    ) {
        let res = Reservation::new(size, now, ttl_ms);
        live.add_reserved(i64::from(res.outstanding()));
        if let Some(old) = self.held.insert(
            room.clone(),
            Held {
                node: node.clone(),
                live: live.clone(),
                res,
                since: now,
                seq: self.made.fetch_add(1, Ordering::Relaxed),
            },
        ) {
            old.live.add_reserved(-i64::from(old.res.outstanding()));
        }
    }

    /// Records that at least `arrived` participants are in the room on `node`; returns the
    /// units released. Reservations for another node are left alone.
    pub fn observe(&self, room: &RoomKey, node: &NodeId, arrived: u32, now: Millis) -> u32 {
        self.settle(room, node, now, |_| arrived)
    }

    /// One more participant was sent to the room's node. No map access when the node has
    /// nothing reserved; otherwise one read, plus one write when the room has a reservation.
    pub fn arrive_one(&self, room: &RoomKey, node: &NodeId, live: &Live, now: Millis) {
        // A node with nothing outstanding holds no reservation this join could consume:
        // skip the map (and its hashing) entirely, the common case for established rooms.
        if live.reserved_units() <= 0.0 || !self.held.contains_key(room) {
            return;
        }
        self.settle(room, node, now, |r| r.arrived.saturating_add(1));
    }

    /// Records arrivals on the room's reservation if it is on `node` (`arrived` maps the
    /// reservation to the new arrival count), releases what that and expiry free on the
    /// node, and drops the reservation once done. Returns the units released.
    ///
    /// All of it under the map's lock for the room, the removal included: a done
    /// reservation left in the map for a moment would be released a second time by a
    /// concurrent join, report or sweep, and the node's counters would stay that much off.
    fn settle(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
        arrived: impl FnOnce(&Reservation) -> u32,
    ) -> u32 {
        let mut released = 0;
        self.held.remove_if_mut(room, |_, h| {
            if &h.node != node {
                return false;
            }
            let n = arrived(&h.res);
            released = h.res.observe(n);
            let done = h.res.is_done(now);
            if done {
                released += h.res.outstanding();
            }
            if released > 0 {
                h.live.add_reserved(-i64::from(released));
            }
            done
        });
        released
    }

    /// A mark in the order reservations are made: every reservation made after this call
    /// is newer than it ([`ReservationBook::release_older`]).
    pub fn mark(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    /// Drops the room's reservation if it was made before `mark` (and, given a node, is on
    /// it). For a pin released by a store operation that began after the mark: a
    /// reservation made since belongs to the room's next placement, which a join may have
    /// made as soon as the pin was gone, and must stay. Returns the units released.
    pub fn release_older(&self, room: &RoomKey, node: Option<&NodeId>, mark: u64) -> u32 {
        match self.held.remove_if(room, |_, h| {
            h.seq < mark && node.is_none_or(|n| &h.node == n)
        }) {
            Some((_, h)) => {
                let units = h.res.outstanding();
                h.live.add_reserved(-i64::from(units));
                units
            }
            None => 0,
        }
    }

    /// Drops a room's reservation (room ended or moved).
    pub fn release(&self, room: &RoomKey) {
        if let Some((_, h)) = self.held.remove(room) {
            h.live.add_reserved(-i64::from(h.res.outstanding()));
        }
    }

    /// The room's session ended on `node`, as a report sent at `at` says: drops its
    /// reservation there, unless the room was placed again since (a new session). Returns
    /// the units released.
    pub fn ended(&self, room: &RoomKey, node: &NodeId, at: Millis) -> u32 {
        match self
            .held
            .remove_if(room, |_, h| &h.node == node && h.since <= at)
        {
            Some((_, h)) => {
                let units = h.res.outstanding();
                h.live.add_reserved(-i64::from(units));
                units
            }
            None => 0,
        }
    }

    /// Drops expired reservations; returns how many. A reservation made in the future (the
    /// wall clock stepped backwards since) is moved back to `now`, as if made now: a step
    /// gives it at most one more life, instead of keeping it for as long as the step was.
    pub fn sweep(&self, now: Millis) -> usize {
        let (mut expired, mut ahead) = (Vec::new(), Vec::new());
        for e in self.held.iter() {
            if e.res.is_done(now) {
                expired.push(e.key().clone());
            } else if e.since > now {
                ahead.push(e.key().clone());
            }
        }
        for room in ahead {
            if let Some(mut h) = self.held.get_mut(&room) {
                let by = h.since.saturating_sub(now);
                h.since -= by;
                h.res.expires_at = h.res.expires_at.saturating_sub(by);
            }
        }
        // Checked again under the lock: the room may have been placed again meanwhile.
        let mut n = 0;
        for room in expired {
            if let Some((_, h)) = self.held.remove_if(&room, |_, h| h.res.is_done(now)) {
                h.live.add_reserved(-i64::from(h.res.outstanding()));
                n += 1;
            }
        }
        n
    }

    /// Outstanding units reserved for a room on exactly these counters: not on those of a
    /// node since removed and added again under the same id, which its new counters never
    /// held.
    pub fn outstanding_on(&self, room: &RoomKey, live: &Arc<Live>) -> Option<u32> {
        self.held
            .get(room)
            .filter(|h| Arc::ptr_eq(&h.live, live))
            .map(|h| h.res.outstanding())
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Sizes {
    /// Peak of the session in progress.
    current: u32,
    /// Peaks of the last sessions, newest first.
    past: [u32; 3],
    last_seen: Millis,
}

/// What a room's ended sessions taught: the peaks of its last three, newest first, and when
/// it was last reported. The part of the history a shared store keeps across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    pub peaks: [u32; 3],
    pub last_seen: Millis,
}

impl Learned {
    /// `peak,peak,peak,last_seen`: how the stores write it down.
    pub fn encode(&self) -> String {
        let [a, b, c] = self.peaks;
        format!("{a},{b},{c},{}", self.last_seen)
    }

    /// Reads [`Learned::encode`]'s form; anything else is `None`.
    pub fn decode(v: &str) -> Option<Learned> {
        let mut it = v.split(',').map(|x| x.parse::<u64>().ok());
        let mut peak = || it.next().flatten().and_then(|p| u32::try_from(p).ok());
        let peaks = [peak()?, peak()?, peak()?];
        let last_seen = it.next().flatten()?;
        it.next().is_none().then_some(Learned { peaks, last_seen })
    }
}

/// Learned room sizes: the peak participants of a room's recent sessions.
#[derive(Debug, Default)]
pub struct RoomHistory {
    rooms: RoomMap<Sizes>,
    /// `rooms.len()`, kept as a counter: the map's own `len` visits every shard, and the
    /// bound is checked for every room a node reports that is new here.
    count: AtomicUsize,
}

impl RoomHistory {
    /// A node reported `participants` in the room.
    pub fn observe(&self, room: &RoomKey, participants: u32, now: Millis) {
        if participants == 0 {
            return;
        }
        if let Some(mut s) = self.rooms.get_mut(room) {
            s.current = s.current.max(participants);
            s.last_seen = now;
            return;
        }
        self.insert_bounded(
            room.clone(),
            Sizes {
                current: participants,
                past: [0; 3],
                last_seen: now,
            },
        );
    }

    /// The room's session ended: its peak joins the remembered ones. Returns what the room
    /// has taught so far when this changed it (to be kept by a shared store).
    pub fn end_session(&self, room: &RoomKey) -> Option<Learned> {
        let mut s = self.rooms.get_mut(room)?;
        if s.current == 0 {
            return None;
        }
        s.past = [s.current, s.past[0], s.past[1]];
        s.current = 0;
        Some(Learned {
            peaks: s.past,
            last_seen: s.last_seen,
        })
    }

    /// Takes what an earlier run (this router's or another's) learned about a room, unless
    /// this router has seen the room since.
    pub fn restore(&self, room: RoomKey, learned: Learned) {
        if learned.peaks.iter().all(|&p| p == 0) {
            return;
        }
        if let Some(mut s) = self.rooms.get_mut(&room) {
            if s.last_seen < learned.last_seen && s.current == 0 {
                s.past = learned.peaks;
                s.last_seen = learned.last_seen;
            }
            return;
        }
        self.insert_bounded(
            room,
            Sizes {
                current: 0,
                past: learned.peaks,
                last_seen: learned.last_seen,
            },
        );
    }

    /// Adds a room unless `MAX_HISTORY` rooms are known; one that raced in meanwhile wins.
    fn insert_bounded(&self, room: RoomKey, sizes: Sizes) {
        if self.count.load(Ordering::Relaxed) >= MAX_HISTORY {
            return;
        }
        if let dashmap::Entry::Vacant(e) = self.rooms.entry(room) {
            e.insert(sizes);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The expected size of the room's next session: the largest recent peak.
    pub fn expected(&self, room: &RoomKey) -> Option<u32> {
        self.rooms
            .get(room)
            .map(|s| s.past.iter().copied().chain([s.current]).max().unwrap_or(0))
            .filter(|&v| v > 0)
    }

    /// Forgets rooms not seen since `before`. A room last seen later than `now` was seen
    /// while the wall clock was ahead (it stepped back since, or another router's clock is
    /// ahead): taken as seen now, or it would outlive `history_ttl` by the step.
    pub fn sweep(&self, before: Millis, now: Millis) -> usize {
        let mut forgotten = 0;
        self.rooms.retain(|_, s| {
            s.last_seen = s.last_seen.min(now);
            let keep = s.last_seen >= before;
            forgotten += usize::from(!keep);
            keep
        });
        self.count.fetch_sub(forgotten, Ordering::Relaxed);
        forgotten
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Normalization;

    fn room(s: &str) -> RoomKey {
        RoomKey::parse(s, Normalization::None).unwrap()
    }

    #[test]
    fn a_done_reservation_is_released_once_however_many_settle_it_at_once() {
        // Joins on several event loops, a node report and the sweep can all find the same
        // expired reservation at once; the node's counters must lose it exactly once.
        let book = Arc::new(ReservationBook::default());
        let live = Arc::new(Live::default());
        let n = NodeId::parse("a").unwrap();
        book.reserve(&room("kept"), &n, &live, 1, 0, u64::MAX);
        for round in 0..300 {
            book.reserve(&room("r"), &n, &live, 5, 0, 1);
            let go = Arc::new(std::sync::Barrier::new(4));
            let settlers: Vec<_> = (0..4)
                .map(|i| {
                    let (book, live, n, go) = (book.clone(), live.clone(), n.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        match i {
                            0 => {
                                book.sweep(10);
                            }
                            1 => {
                                book.observe(&room("r"), &n, 0, 10);
                            }
                            _ => book.arrive_one(&room("r"), &n, &live, 10),
                        }
                    })
                })
                .collect();
            for s in settlers {
                s.join().unwrap();
            }
            assert_eq!(live.reserved_units(), 1.0, "round {round}");
            assert!(
                book.outstanding_on(&room("r"), &live).is_none(),
                "round {round}"
            );
        }
    }

    #[test]
    fn reservation_counts_until_participants_arrive() {
        let book = ReservationBook::default();
        let live = Arc::new(Live::default());
        let n = NodeId::parse("a").unwrap();
        book.reserve(&room("r"), &n, &live, 3, 0, 1_000);
        assert_eq!(live.reserved_units(), 3.0);
        book.arrive_one(&room("r"), &n, &live, 1);
        assert_eq!(live.reserved_units(), 2.0);
        book.observe(&room("r"), &n, 3, 2);
        assert_eq!(live.reserved_units(), 0.0);
        assert!(book.is_empty());
    }

    #[test]
    fn reserving_a_room_again_on_its_node_replaces_what_it_still_held() {
        let book = ReservationBook::default();
        let live = Arc::new(Live::default());
        let n = NodeId::parse("a").unwrap();
        book.reserve(&room("r"), &n, &live, 5, 0, 1_000);
        book.reserve(&room("r"), &n, &live, 3, 10, 1_000);
        assert_eq!(live.reserved_units(), 3.0);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn a_room_that_ended_on_its_node_frees_its_reservation_unless_placed_again_since() {
        let book = ReservationBook::default();
        let live = Arc::new(Live::default());
        let (a, b) = (NodeId::parse("a").unwrap(), NodeId::parse("b").unwrap());
        book.reserve(&room("r"), &a, &live, 30, 100, 60_000);
        book.observe(&room("r"), &a, 4, 200);
        // A report about another node, or one sent before the room was placed, ends nothing.
        assert_eq!(book.ended(&room("r"), &b, 300), 0);
        assert_eq!(book.ended(&room("r"), &a, 99), 0);
        assert_eq!(live.reserved_units(), 26.0);
        assert_eq!(book.ended(&room("r"), &a, 300), 26);
        assert_eq!((live.reserved_units(), book.len()), (0.0, 0));
        // Placed again after the report that ends its previous session: kept.
        book.reserve(&room("r"), &a, &live, 30, 400, 60_000);
        assert_eq!(book.ended(&room("r"), &a, 300), 0);
        assert_eq!(live.reserved_units(), 30.0);
    }

    #[test]
    fn a_reservation_made_before_the_clock_stepped_back_lives_at_most_its_life_after_the_step() {
        let book = ReservationBook::default();
        let live = Arc::new(Live::default());
        let n = NodeId::parse("a").unwrap();
        let hour = 3_600_000;
        book.reserve(&room("r"), &n, &live, 5, 10 * hour, 60_000);
        // The clock steps back an hour, 10 s after the room was placed.
        let now = 9 * hour + 10_000;
        assert_eq!(book.sweep(now), 0);
        assert_eq!(book.sweep(now + 59_999), 0);
        assert_eq!(book.sweep(now + 60_000), 1, "not an hour more");
        assert_eq!(live.reserved_units(), 0.0);
    }

    #[test]
    fn reservations_expire_in_the_sweep() {
        let book = ReservationBook::default();
        let live = Arc::new(Live::default());
        let n = NodeId::parse("a").unwrap();
        book.reserve(&room("r"), &n, &live, 5, 0, 1_000);
        assert_eq!(book.sweep(999), 0);
        assert_eq!(book.sweep(1_000), 1);
        assert_eq!(live.reserved_units(), 0.0);
    }

    #[test]
    fn a_reservation_is_released_from_the_counters_it_was_added_to() {
        // The node was removed and added again while the room's reservation held: the new
        // counters never had it, so releasing it must not take it off them (they would go
        // negative and hide the next room's reservation from `û`).
        let book = ReservationBook::default();
        let n = NodeId::parse("a").unwrap();
        let before = Arc::new(Live::default());
        book.reserve(&room("r"), &n, &before, 40, 0, 1_000);
        let again = Arc::new(Live::default());
        assert_eq!(book.sweep(1_000), 1);
        assert_eq!(
            (before.reserved_units(), again.reserved_units()),
            (0.0, 0.0)
        );
        book.reserve(&room("s"), &n, &again, 30, 1_000, 1_000);
        assert_eq!(again.reserved_units(), 30.0);
        // Arrivals reported through the new counters settle the old reservation where it is.
        book.reserve(&room("t"), &n, &before, 10, 1_000, 1_000);
        book.observe(&room("t"), &n, 10, 1_001);
        assert_eq!(
            (before.reserved_units(), again.reserved_units()),
            (0.0, 30.0)
        );
    }

    #[test]
    fn history_remembers_the_peak_of_recent_sessions() {
        let h = RoomHistory::default();
        let r = room("weekly-class");
        assert_eq!(h.expected(&r), None);
        h.observe(&r, 12, 1);
        h.observe(&r, 25, 2);
        h.observe(&r, 3, 3);
        assert_eq!(
            h.end_session(&r),
            Some(Learned {
                peaks: [25, 0, 0],
                last_seen: 3
            }),
            "what the store keeps"
        );
        assert_eq!(h.end_session(&r), None, "nothing new to keep");
        assert_eq!(h.expected(&r), Some(25));
        h.observe(&r, 4, 4);
        h.observe(&room("other"), 4, 6);
        assert_eq!(h.expected(&r), Some(25));
        assert_eq!(h.len(), 2);
        assert_eq!(h.sweep(5, 10), 1);
        assert_eq!(h.expected(&r), None);
        assert_eq!(h.len(), 1, "the count follows the map");
    }

    #[test]
    fn a_room_seen_while_the_clock_was_ahead_is_forgotten_history_ttl_after_now() {
        let h = RoomHistory::default();
        let r = room("weekly-class");
        // Seen at 1 000 000 by a clock that then stepped back to 2 000.
        h.observe(&r, 30, 1_000_000);
        h.end_session(&r);
        assert_eq!(h.sweep(1_000, 2_000), 0);
        assert_eq!(h.expected(&r), Some(30));
        // history_ttl (1 000) after the sweep that found it ahead, not after the step.
        assert_eq!(h.sweep(2_001, 3_001), 1);
        assert_eq!(h.expected(&r), None);
    }

    #[test]
    fn learned_sizes_round_trip_and_garbage_is_refused() {
        let l = Learned {
            peaks: [25, 0, 19],
            last_seen: 1_700_000_000_123,
        };
        assert_eq!(l.encode(), "25,0,19,1700000000123");
        assert_eq!(Learned::decode(&l.encode()), Some(l));
        for bad in [
            "",
            "1,2,3",
            "1,2,3,4,5",
            "a,2,3,4",
            "1,2,-3,4",
            "1,2,99999999999,4",
        ] {
            assert_eq!(Learned::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn restored_history_counts_unless_the_room_was_seen_since() {
        let h = RoomHistory::default();
        let learned = |peaks, last_seen| Learned { peaks, last_seen };
        h.restore(room("a"), learned([30, 20, 0], 100));
        assert_eq!(h.expected(&room("a")), Some(30));
        h.restore(room("zeros"), learned([0, 0, 0], 100));
        assert_eq!(h.expected(&room("zeros")), None);
        assert_eq!(h.len(), 1);
        // Seen here after the stored entry was written: this router's own knowledge stays.
        h.observe(&room("b"), 8, 200);
        h.end_session(&room("b"));
        h.restore(room("b"), learned([50, 0, 0], 150));
        assert_eq!(h.expected(&room("b")), Some(8));
        // A newer stored entry (another router saw a later session) replaces an older one.
        h.restore(room("b"), learned([12, 8, 0], 300));
        assert_eq!(h.expected(&room("b")), Some(12));
        // Not while a session is in progress here.
        h.observe(&room("b"), 5, 400);
        h.restore(room("b"), learned([60, 12, 8], 500));
        assert_eq!(h.expected(&room("b")), Some(12));
    }
}
