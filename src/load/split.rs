//! The split-room detector: "never split a room", checked from the outside.
//!
//! The harness tells it every decision the router made (room -> node), every participant a
//! node accepted and every participant that left. A room is **split** when the router sends a
//! participant to node B (or node B accepts one) while the room still has participants on
//! another node A that is alive. That is also the only way a room can "move" while it is in
//! use, so moves after a node is added are splits too: each time a room's participant is sent
//! to another live node than its previous one while the room still has participants on a
//! live node other than that one, the room **moved** once more (a room that moves back and
//! forth counts every time; [`SplitDetector::moves_between`]). Rooms of a node the harness
//! killed lose their participants with it (also those whose join is reported only after the
//! kill); when such a room comes back on another node it counts as **failed over**, not split
//! or moved. A room that emptied may legitimately come back elsewhere.
//!
//! A participant whose leave failed (the node answered an error, or no answer came) may or
//! may not still be there: the node may have taken the leave and the answer got lost. It
//! no longer counts as live, so that the room coming back on another node once it emptied
//! is no split; if the room is sent to another node while such a participant may still be
//! on the old one, the room is a **possible split**, counted apart (a check against the
//! nodes' own lists, as `benches/compare/chaos.sh` does, tells which it was).
//!
//! Without following redirects (nobody really joins the nodes), every decision counts as a
//! participant that never leaves, so any two nodes for one room during the run are a split.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

/// One split room, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitRoom {
    pub room: String,
    /// Every node the room was sent to during the run.
    pub nodes: Vec<String>,
    /// Run time of the first split.
    pub at_ms: u64,
}

#[derive(Debug, Default)]
struct RoomState {
    /// Live participants per node (only nodes with > 0).
    live: BTreeMap<String, u32>,
    /// Every node a decision or a join named.
    seen: BTreeSet<String>,
    /// The live node the room's latest participant was sent to.
    last: Option<String>,
    split_at: Option<Duration>,
    /// Participants per node whose leave failed: perhaps still there (only nodes with > 0).
    unsure: BTreeMap<String, u32>,
    possible_split: bool,
    /// The room had participants on a node that was killed.
    orphaned: bool,
    failed_over: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct SplitDetector {
    rooms: HashMap<String, RoomState>,
    dead: HashSet<String>,
    split_count: u64,
    possible_splits: u64,
    failed_over: u64,
    orphaned: u64,
    /// Run time of every move, in the order seen (at most one per decision or join).
    moves: Vec<Duration>,
}

impl SplitDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Another node holds live participants of this room (a killed node does not count).
    fn check(&mut self, room: &str, node: &str, at: Duration) {
        let dead = &self.dead;
        let st = self.rooms.entry(room.to_string()).or_default();
        st.seen.insert(node.to_string());
        if dead.contains(node) {
            // A ticket for a node that is gone: nobody can join there, so nothing splits.
            return;
        }
        let elsewhere = st
            .live
            .iter()
            .any(|(n, c)| *c > 0 && n != node && !dead.contains(n));
        if !elsewhere && st.split_at.is_none() && !st.possible_split {
            let maybe = st
                .unsure
                .iter()
                .any(|(n, c)| *c > 0 && n != node && !dead.contains(n));
            if maybe {
                st.possible_split = true;
                self.possible_splits += 1;
            }
        }
        if elsewhere {
            if st.split_at.is_none() {
                st.split_at = Some(at);
                self.split_count += 1;
            }
            if st.last.as_deref() != Some(node) {
                self.moves.push(at);
            }
        }
        if st.last.as_deref() != Some(node) {
            st.last = Some(node.to_string());
        }
        if st.orphaned && !st.failed_over && !dead.contains(node) {
            st.failed_over = true;
            self.failed_over += 1;
        }
    }

    /// The router sent a participant of `room` to `node`. With `counts_as_participant`
    /// (harness not following redirects) the decision itself is the participant.
    pub fn decided(&mut self, room: &str, node: &str, at: Duration, counts_as_participant: bool) {
        self.check(room, node, at);
        if counts_as_participant {
            self.arrive(room, node);
        }
    }

    /// `node` accepted a participant of `room`.
    pub fn joined(&mut self, room: &str, node: &str, at: Duration) {
        self.check(room, node, at);
        self.arrive(room, node);
    }

    /// A participant of `room` (already [`check`](Self::check)ed) is on `node`. On a node
    /// already killed (its join was answered just before the kill, and reported after it)
    /// the participant went down with the node: the room counts as one of the killed node's.
    fn arrive(&mut self, room: &str, node: &str) {
        let st = self.rooms.get_mut(room).expect("check inserted it");
        if self.dead.contains(node) {
            if !st.orphaned {
                st.orphaned = true;
                self.orphaned += 1;
            }
            return;
        }
        *st.live.entry(node.to_string()).or_default() += 1;
    }

    /// A participant of `room` left `node`.
    pub fn left(&mut self, room: &str, node: &str) {
        if let Some(st) = self.rooms.get_mut(room) {
            if let Some(c) = st.live.get_mut(node) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    st.live.remove(node);
                }
            }
        }
    }

    /// A participant of `room` on `node` tried to leave and the node did not say it had
    /// (an error status, or no answer): see the module documentation.
    pub fn leave_failed(&mut self, room: &str, node: &str) {
        if let Some(st) = self.rooms.get_mut(room) {
            if let Some(c) = st.live.get_mut(node) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    st.live.remove(node);
                }
                *st.unsure.entry(node.to_string()).or_default() += 1;
            }
        }
    }

    /// `node` was killed: its participants are gone with it.
    pub fn killed(&mut self, node: &str) {
        self.dead.insert(node.to_string());
        for st in self.rooms.values_mut() {
            st.unsure.remove(node);
            if st.live.remove(node).is_some() && !st.orphaned {
                st.orphaned = true;
                self.orphaned += 1;
            }
        }
    }

    /// Number of rooms that were split.
    pub fn split_count(&self) -> u64 {
        self.split_count
    }

    /// Rooms sent to another node while a participant whose leave failed may still have
    /// been on the old one (and no participant known to be there).
    pub fn possible_split_count(&self) -> u64 {
        self.possible_splits
    }

    /// Rooms that had participants on a killed node.
    pub fn orphaned_count(&self) -> u64 {
        self.orphaned
    }

    /// Rooms of a killed node that were later sent to another node.
    pub fn failed_over_count(&self) -> u64 {
        self.failed_over
    }

    /// Rooms the detector has seen.
    pub fn rooms_seen(&self) -> usize {
        self.rooms.len()
    }

    /// Moves (see the module documentation) at run times in `from..to`: every move, so a
    /// room that moves twice counts twice.
    pub fn moves_between(&self, from: Duration, to: Duration) -> u64 {
        self.moves
            .iter()
            .filter(|t| (from..to).contains(*t))
            .count() as u64
    }

    /// The split rooms, first split first, at most `limit`.
    pub fn split_rooms(&self, limit: usize) -> Vec<SplitRoom> {
        let mut v: Vec<SplitRoom> = self
            .rooms
            .iter()
            .filter_map(|(room, s)| {
                s.split_at.map(|t| SplitRoom {
                    room: room.clone(),
                    nodes: s.seen.iter().cloned().collect(),
                    at_ms: t.as_millis() as u64,
                })
            })
            .collect();
        v.sort_by(|a, b| a.at_ms.cmp(&b.at_ms).then(a.room.cmp(&b.room)));
        v.truncate(limit);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(5);

    #[test]
    fn a_deliberately_split_room_is_caught() {
        let mut d = SplitDetector::new();
        d.decided("standup", "a", T, true);
        d.decided("standup", "a", T, true);
        assert_eq!(d.split_count(), 0);
        d.decided("standup", "b", T * 2, true);
        assert_eq!(d.split_count(), 1);
        // Counted once per room, however often it happens again.
        d.decided("standup", "c", T * 3, true);
        assert_eq!(d.split_count(), 1);
        let s = d.split_rooms(10);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].room, "standup");
        assert_eq!(s[0].nodes, vec!["a", "b", "c"]);
        assert_eq!(s[0].at_ms, 10);
    }

    #[test]
    fn a_room_whose_leave_failed_is_a_possible_split_not_a_split() {
        let mut d = SplitDetector::new();
        d.joined("r", "a", T);
        // The node may have taken the leave and lost the answer: the room emptied there,
        // as far as anyone can tell, and its coming back on b is no split.
        d.leave_failed("r", "a");
        d.joined("r", "b", T * 2);
        assert_eq!(d.split_count(), 0);
        assert_eq!(d.possible_split_count(), 1);
        // Counted once per room.
        d.joined("r", "b", T * 3);
        assert_eq!((d.split_count(), d.possible_split_count()), (0, 1));
        // b holds known participants: another node now is a split, as always.
        d.joined("r", "c", T * 4);
        assert_eq!((d.split_count(), d.possible_split_count()), (1, 1));

        // A participant known to be there still makes the split, whatever failed beside it.
        let mut d = SplitDetector::new();
        d.joined("q", "a", T);
        d.joined("q", "a", T);
        d.leave_failed("q", "a");
        d.joined("q", "b", T * 2);
        assert_eq!((d.split_count(), d.possible_split_count()), (1, 0));

        // Back on the same node, or the node killed since: nothing possible either.
        let mut d = SplitDetector::new();
        d.joined("s", "a", T);
        d.leave_failed("s", "a");
        d.joined("s", "a", T * 2);
        d.killed("a");
        d.joined("s", "b", T * 3);
        assert_eq!((d.split_count(), d.possible_split_count()), (0, 0));
    }

    #[test]
    fn every_move_is_counted_in_the_window_it_happened_in() {
        let mut d = SplitDetector::new();
        d.joined("r", "a", T);
        // Moves to b (a still holds a participant): one move at 2T, whatever b's joins after.
        d.decided("r", "b", T * 2, false);
        d.joined("r", "b", T * 2);
        d.joined("r", "b", T * 3);
        assert_eq!(d.moves_between(Duration::ZERO, T * 10), 1);
        // Back to a, then to c: two more moves of the same room, one split room in all.
        d.joined("r", "a", T * 4);
        d.joined("r", "c", T * 6);
        assert_eq!(d.split_count(), 1);
        assert_eq!(d.moves_between(Duration::ZERO, T * 10), 3);
        // Each move belongs to the window it happened in, and to no other.
        assert_eq!(d.moves_between(T, T * 3), 1);
        assert_eq!(d.moves_between(T * 3, T * 5), 1);
        assert_eq!(d.moves_between(T * 5, T * 10), 1);
        assert_eq!(d.moves_between(T * 7, T * 10), 0);
        // A room that emptied and comes back elsewhere did not move.
        d.joined("q", "a", T);
        d.left("q", "a");
        d.joined("q", "b", T * 8);
        assert_eq!(d.moves_between(Duration::ZERO, T * 10), 3);
    }

    #[test]
    fn a_join_reported_after_its_node_was_killed_went_down_with_it() {
        let mut d = SplitDetector::new();
        d.joined("r1", "b", T);
        d.killed("a");
        // Answered by a just before the kill, reported after it.
        d.joined("r2", "a", T * 2);
        assert_eq!(d.orphaned_count(), 1);
        d.joined("r2", "b", T * 3);
        assert_eq!(d.failed_over_count(), 1);
        assert_eq!(d.split_count(), 0);
        assert_eq!(d.moves_between(Duration::ZERO, T * 10), 0);
        // In a decisions-only run the decision is the participant: the same holds.
        d.decided("r3", "a", T * 4, true);
        assert_eq!(d.orphaned_count(), 2);
    }

    #[test]
    fn one_node_per_room_is_not_a_split() {
        let mut d = SplitDetector::new();
        for i in 0..100 {
            let node = ["a", "b", "c"][i % 3];
            d.decided(&format!("room-{i}"), node, T, true);
            d.decided(&format!("room-{i}"), node, T, true);
        }
        assert_eq!(d.split_count(), 0);
        assert_eq!(d.rooms_seen(), 100);
    }

    #[test]
    fn followed_joins_split_when_both_nodes_hold_participants() {
        let mut d = SplitDetector::new();
        d.decided("r", "a", T, false);
        d.joined("r", "a", T);
        // A ticket for b while a still hosts the room: split at decision time.
        d.decided("r", "b", T, false);
        assert_eq!(d.split_count(), 1);

        // A join that lands on b while a is occupied is caught even if the decision was seen
        // before a's participant arrived.
        let mut d = SplitDetector::new();
        d.decided("r", "a", T, false);
        d.decided("r", "b", T, false);
        assert_eq!(d.split_count(), 0, "nobody is in the room yet");
        d.joined("r", "a", T);
        d.joined("r", "b", T);
        assert_eq!(d.split_count(), 1);
    }

    #[test]
    fn an_emptied_room_may_come_back_elsewhere() {
        let mut d = SplitDetector::new();
        d.joined("r", "a", T);
        d.joined("r", "a", T);
        d.left("r", "a");
        d.left("r", "a");
        d.decided("r", "b", T, false);
        d.joined("r", "b", T);
        assert_eq!(d.split_count(), 0);
    }

    #[test]
    fn rooms_of_a_killed_node_fail_over_without_splitting() {
        let mut d = SplitDetector::new();
        d.joined("r1", "a", T);
        d.joined("r2", "b", T);
        d.killed("a");
        assert_eq!(d.orphaned_count(), 1);
        d.decided("r1", "a", T, false); // the router has not noticed yet
        assert_eq!(d.failed_over_count(), 0);
        d.joined("r1", "b", T);
        assert_eq!(d.failed_over_count(), 1);
        d.decided("r1", "a", T, false); // a late answer naming the dead node splits nothing
        assert_eq!(d.split_count(), 0);
        assert_eq!(d.failed_over_count(), 1);
        // A room of a live node that moves is still a split.
        d.decided("r2", "c", T, false);
        assert_eq!(d.split_count(), 1);
    }
}
