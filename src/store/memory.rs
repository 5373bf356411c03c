//! The embedded pin store: a concurrent hash map in this process.
//!
//! Every operation is one `DashMap` access (one shard lock held for a few instructions), so a
//! pinned room's lookup is one concurrent-map lookup. The futures it returns are always ready.
//! Pins live and die with the process; learned room sizes can outlive it in a file
//! (`store.learned_file`, [`super::learned_file`]).

use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;

use super::learned_file::LearnedFile;
use super::{Page, Pin, PinOutcome, PinStore, StoreError, StoreHealth, Unconfirmed};
use crate::cluster::reservations::Learned;
use crate::cluster::NodeId;
use crate::placement::Millis;
use crate::room::{Normalization, RoomKey, RoomMap};

/// Pins in a `DashMap`; learned sizes in a file if one is configured.
#[derive(Debug, Default)]
pub struct MemoryStore {
    pins: RoomMap<Pin>,
    learned: Option<Arc<LearnedFile>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A memory store that keeps learned room sizes in `path` across restarts, reading the
    /// names there under `rooms` (the router's `rooms.normalization`).
    pub fn with_learned_file(path: &Path, rooms: Normalization) -> anyhow::Result<MemoryStore> {
        Ok(MemoryStore {
            pins: RoomMap::default(),
            learned: Some(LearnedFile::open_as(path, rooms)?),
        })
    }

    fn pin_if_now(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> PinOutcome {
        let pin = Pin {
            node: node.clone(),
            created_at: now,
            confirmed_at: now,
        };
        match self.pins.entry(room.clone()) {
            Entry::Occupied(mut e) => {
                if expected == Some(&e.get().node) {
                    e.insert(pin.clone());
                    PinOutcome::Won(pin)
                } else {
                    PinOutcome::Lost(Some(e.get().clone()))
                }
            }
            Entry::Vacant(e) => {
                if expected.is_none() {
                    e.insert(pin.clone());
                    PinOutcome::Won(pin)
                } else {
                    PinOutcome::Lost(None)
                }
            }
        }
    }

    fn list_now(&self, cursor: Option<&str>, limit: usize) -> Page {
        // Keep the `limit` smallest keys above the cursor: O(n log limit), no full sort.
        let mut heap: BinaryHeap<(RoomKey, Pin)> = BinaryHeap::with_capacity(limit + 1);
        if limit == 0 {
            return Page::default();
        }
        let mut more = false;
        for e in self.pins.iter() {
            if cursor.is_some_and(|c| e.key().as_str() <= c) {
                continue;
            }
            if heap.len() == limit {
                if e.key() < &heap.peek().expect("non-empty").0 {
                    heap.pop();
                    heap.push((e.key().clone(), e.value().clone()));
                }
                more = true;
            } else {
                heap.push((e.key().clone(), e.value().clone()));
            }
        }
        let rooms = heap.into_sorted_vec();
        let next_cursor = if more {
            rooms.last().map(|(k, _)| k.as_str().to_string())
        } else {
            None
        };
        Page { rooms, next_cursor }
    }
}

impl PartialOrd for Pin {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pin {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.node.as_str(), self.created_at, self.confirmed_at).cmp(&(
            other.node.as_str(),
            other.created_at,
            other.confirmed_at,
        ))
    }
}

impl PinStore for MemoryStore {
    async fn get(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        Ok(self.peek(room, |pin| pin.cloned()).flatten())
    }

    #[inline]
    fn peek<R>(&self, room: &RoomKey, f: impl FnOnce(Option<&Pin>) -> R) -> Option<R> {
        Some(f(self.pins.get(room).as_deref()))
    }

    async fn pin_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> Result<PinOutcome, StoreError> {
        Ok(self.pin_if_now(room, node, expected, now))
    }

    async fn confirm(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        Ok(match self.pins.get_mut(room) {
            Some(mut p) if &p.node == node => {
                p.confirmed_at = p.confirmed_at.max(now);
                true
            }
            _ => false,
        })
    }

    async fn release_if(&self, room: &RoomKey, node: &NodeId) -> Result<bool, StoreError> {
        Ok(self.pins.remove_if(room, |_, p| &p.node == node).is_some())
    }

    async fn release_unless(
        &self,
        room: &RoomKey,
        node: &NodeId,
        keep: impl FnOnce() -> bool + Send,
    ) -> Result<Unconfirmed, StoreError> {
        // `keep` is asked under the entry's write lock: a pinned join records itself while it
        // holds the read lock (`Router::place`'s `peek`), so it is either seen or sees no pin.
        Ok(match self.pins.entry(room.clone()) {
            Entry::Occupied(e) if &e.get().node != node => Unconfirmed::NotThere,
            Entry::Occupied(_) if keep() => Unconfirmed::Confirmed,
            Entry::Occupied(e) => {
                e.remove();
                Unconfirmed::Released
            }
            Entry::Vacant(_) => Unconfirmed::NotThere,
        })
    }

    async fn release_if_unconfirmed(
        &self,
        room: &RoomKey,
        node: &NodeId,
        before: Millis,
    ) -> Result<Unconfirmed, StoreError> {
        // One entry lock: no confirmation can land between the check and the delete.
        Ok(match self.pins.entry(room.clone()) {
            Entry::Occupied(e) if &e.get().node != node => Unconfirmed::NotThere,
            Entry::Occupied(e) if e.get().confirmed_at >= before => Unconfirmed::Confirmed,
            Entry::Occupied(e) => {
                e.remove();
                Unconfirmed::Released
            }
            Entry::Vacant(_) => Unconfirmed::NotThere,
        })
    }

    async fn remove(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        Ok(self.pins.remove(room).map(|(_, p)| p))
    }

    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        Ok(self.list_now(cursor, limit))
    }

    async fn sweep_idle(
        &self,
        before: Millis,
        now: Millis,
    ) -> Result<Vec<(RoomKey, NodeId)>, StoreError> {
        let mut idle = Vec::new();
        let mut ahead = Vec::new();
        for e in self.pins.iter() {
            if e.confirmed_at < before {
                idle.push((e.key().clone(), e.node.clone()));
            } else if e.confirmed_at > now {
                ahead.push(e.key().clone());
            }
        }
        for room in ahead {
            if let Some(mut p) = self.pins.get_mut(&room) {
                p.confirmed_at = p.confirmed_at.min(now);
            }
        }
        let mut released = Vec::with_capacity(idle.len());
        for (room, node) in idle {
            // Re-check under the shard lock: a join may have confirmed it meanwhile, or
            // re-pinned it elsewhere (with a confirmation time below `before` after the
            // wall clock stepped back): that pin is not the idle one listed.
            if self
                .pins
                .remove_if(&room, |_, p| p.confirmed_at < before && p.node == node)
                .is_some()
            {
                released.push((room, node));
            }
        }
        Ok(released)
    }

    async fn count(&self) -> Result<usize, StoreError> {
        Ok(self.pins.len())
    }

    fn any_pin(&self, mut f: impl FnMut(&RoomKey, &Pin) -> bool) -> bool {
        self.pins.iter().any(|e| f(e.key(), e.value()))
    }

    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }

    fn save_learned(&self, room: &RoomKey, learned: Learned) {
        if let Some(f) = &self.learned {
            f.save(room, learned);
        }
    }

    fn forget_learned(&self, before: Millis, now: Millis) {
        if let Some(f) = &self.learned {
            f.forget(before, now);
        }
    }

    fn flush_learned(&self) {
        if let Some(f) = &self.learned {
            f.flush_or_warn();
        }
    }

    async fn load_learned(&self) -> Result<Vec<(RoomKey, Learned)>, StoreError> {
        Ok(self.learned.as_ref().map(|f| f.all()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Normalization;

    fn room(s: &str) -> RoomKey {
        RoomKey::parse(s, Normalization::None).unwrap()
    }
    fn node(s: &str) -> NodeId {
        NodeId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn pin_if_is_compare_and_set() {
        let s = MemoryStore::new();
        let (a, b, c) = (node("a"), node("b"), node("c"));
        assert!(matches!(
            s.pin_if(&room("r"), &a, None, 1).await.unwrap(),
            PinOutcome::Won(_)
        ));
        // A second router that also saw no pin loses and learns the winner.
        match s.pin_if(&room("r"), &b, None, 2).await.unwrap() {
            PinOutcome::Lost(Some(p)) => assert_eq!(p.node, a),
            o => panic!("{o:?}"),
        }
        // Re-pinning needs the right expected node.
        assert!(matches!(
            s.pin_if(&room("r"), &c, Some(&b), 3).await.unwrap(),
            PinOutcome::Lost(Some(_))
        ));
        assert!(matches!(
            s.pin_if(&room("r"), &c, Some(&a), 3).await.unwrap(),
            PinOutcome::Won(_)
        ));
        assert_eq!(s.get(&room("r")).await.unwrap().unwrap().node, c);
    }

    #[tokio::test]
    async fn release_is_compare_and_delete() {
        let s = MemoryStore::new();
        s.pin_if(&room("r"), &node("a"), None, 1).await.unwrap();
        assert!(!s.release_if(&room("r"), &node("b")).await.unwrap());
        assert!(s.get(&room("r")).await.unwrap().is_some());
        assert!(s.release_if(&room("r"), &node("a")).await.unwrap());
        assert!(s.get(&room("r")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn release_unless_asks_only_about_its_own_pin() {
        let s = MemoryStore::new();
        s.pin_if(&room("r"), &node("a"), None, 1).await.unwrap();
        let asked = &std::sync::atomic::AtomicBool::new(false);
        let ask = |answer| {
            move || {
                asked.store(true, std::sync::atomic::Ordering::Relaxed);
                answer
            }
        };
        let other = s.release_unless(&room("r"), &node("b"), ask(false)).await;
        assert_eq!(other.unwrap(), Unconfirmed::NotThere);
        assert!(
            !asked.load(std::sync::atomic::Ordering::Relaxed),
            "not its pin: not asked"
        );
        let kept = s.release_unless(&room("r"), &node("a"), ask(true)).await;
        assert_eq!(kept.unwrap(), Unconfirmed::Confirmed);
        assert!(s.get(&room("r")).await.unwrap().is_some());
        let gone = s.release_unless(&room("r"), &node("a"), ask(false)).await;
        assert_eq!(gone.unwrap(), Unconfirmed::Released);
        assert!(s.get(&room("r")).await.unwrap().is_none());
        let none = s.release_unless(&room("r"), &node("a"), ask(false)).await;
        assert_eq!(none.unwrap(), Unconfirmed::NotThere);
    }

    #[tokio::test]
    async fn confirm_only_touches_its_own_pin_and_sweep_releases_idle_ones() {
        let s = MemoryStore::new();
        s.pin_if(&room("old"), &node("a"), None, 1).await.unwrap();
        s.pin_if(&room("busy"), &node("a"), None, 1).await.unwrap();
        assert!(!s.confirm(&room("busy"), &node("b"), 50).await.unwrap());
        assert!(s.confirm(&room("busy"), &node("a"), 50).await.unwrap());
        let released = s.sweep_idle(10, 60).await.unwrap();
        assert_eq!(released, vec![(room("old"), node("a"))]);
        assert!(s.get(&room("busy")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn release_if_unconfirmed_releases_only_its_nodes_stale_pin() {
        use crate::store::Unconfirmed::*;
        let s = MemoryStore::new();
        s.pin_if(&room("r"), &node("a"), None, 100).await.unwrap();
        let go = |n: &'static str, before| {
            let s = &s;
            async move {
                s.release_if_unconfirmed(&room("r"), &node(n), before)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(go("b", 1_000).await, NotThere, "another node's pin");
        assert_eq!(
            go("a", 100).await,
            Confirmed,
            "confirmed at `before` itself"
        );
        assert_eq!(go("a", 101).await, Released);
        assert_eq!(go("a", 101).await, NotThere);
        assert!(s.get(&room("r")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn listing_pages_through_every_room_once_in_order() {
        let s = MemoryStore::new();
        for i in 0..25 {
            s.pin_if(&room(&format!("room-{i:02}")), &node("a"), None, 1)
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = s.list(cursor.as_deref(), 10).await.unwrap();
            seen.extend(page.rooms.iter().map(|(k, _)| k.as_str().to_string()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("room-{i:02}")).collect();
        assert_eq!(seen, expected);
    }
}
