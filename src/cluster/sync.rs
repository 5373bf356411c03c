//! Shared node state: what one router tells the others about nodes, and how a router applies
//! what it hears to its own [`Cluster`].
//!
//! A [`NodeUpdate`] is produced by the router on every heartbeat and admin action and handed
//! to its store ([`crate::store::PinStore::share_node`]); a shared store (Redis) writes it
//! down and publishes it, and every other router applies it with [`NodeSync::apply`]. Applying is
//! idempotent and never moves a node's heartbeat time backwards, so duplicates, reorderings
//! and the periodic full re-sync are harmless. A removal carries the time it was decided,
//! and one older than the newest word this router has of the node (a report made since, an
//! admin's registration) is old news and leaves the node in: a removal kept through a Redis
//! outage and written back after the node came back must not drop it everywhere.
//!
//! With `placement.share_reservations`, routers also tell each other how much each has
//! reserved on each node for new rooms ([`NodeUpdate::Reserved`], the sender's whole amount,
//! not a change, so a lost message is made good by the next). [`NodeSync`] keeps them by node
//! and router and counts their sum in the node's utilization; a router that stops saying
//! anything (stopped, cut off, or unheard because Redis itself is unreachable) is forgotten
//! after a full re-sync interval ([`NodeSync::expire_reserved`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::{Cluster, NodeEntry, NodeId, NodeInfo, Upsert};
use crate::placement::{AdminState, Millis};
use crate::room::{Normalization, RoomKey};

/// A node description as it travels between routers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireInfo {
    pub url: String,
    pub upstream: String,
    pub capacity: f64,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl From<&NodeInfo> for WireInfo {
    fn from(i: &NodeInfo) -> Self {
        WireInfo {
            url: i.url.clone(),
            upstream: i.upstream.clone(),
            capacity: i.capacity,
            region: i.region.clone(),
            tags: i.tags.clone(),
        }
    }
}

impl WireInfo {
    fn to_info(&self) -> Option<NodeInfo> {
        // As the HTTP surface takes them (a router that predates the bound may relay more).
        (self.capacity > 0.0 && self.capacity <= super::MAX_UNITS).then(|| NodeInfo {
            url: self.url.clone(),
            upstream: self.upstream.clone(),
            capacity: self.capacity,
            region: self.region.clone(),
            tags: self.tags.clone(),
        })
    }
}

/// One change to a node, as shared between routers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeUpdate {
    /// A heartbeat reached some router.
    Report {
        id: String,
        info: WireInfo,
        load: f64,
        cpu: Option<f64>,
        /// The node's own state (`active`/`draining`).
        state: AdminState,
        /// When the receiving router recorded it (ms since epoch).
        at: Millis,
        /// The rooms it listed, if it reports rooms.
        rooms: Option<Vec<String>>,
        /// The rooms the heartbeat reported live, with their participants: the other
        /// routers settle their own reservations with them, as the receiving router settles
        /// its own. (Absent from routers that predate it.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Vec<(String, u32)>>,
    },
    /// An admin registered or updated the node by hand.
    Put { id: String, info: WireInfo },
    /// An admin drained, disabled or enabled the node.
    Admin { id: String, state: AdminState },
    /// The node left (admin, node, or drained and empty).
    Removed {
        id: String,
        /// When the removing router decided it (its clock, ms since epoch). A removal written
        /// late (kept through a Redis outage, then written back) is older than a report the
        /// node made since, when it came back: [`NodeSync::apply`] leaves such a node in.
        /// (0 from routers that predate it: applied as before, whatever the node said since.)
        #[serde(default)]
        at: Millis,
        /// A node forgotten for its silence (`placement.forget_node_after`): the newest word
        /// of it the removing router had. A router (or the stored record) with newer word of
        /// the node keeps it: the remover's view was the one behind. (Absent from admin and
        /// node removals, and from routers that predate it.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        silent_since: Option<Millis>,
    },
    /// Router `router` now holds `reserved_milli` load units (x1000) reserved on the node
    /// for new rooms' expected sizes (its whole amount there; 0 releases it). `at` orders one
    /// router's messages (its clock, ms since epoch).
    Reserved {
        id: String,
        router: String,
        reserved_milli: i64,
        at: Millis,
    },
}

impl NodeUpdate {
    /// The update a router shares after applying a heartbeat to `entry`, with the live
    /// rooms' participants as the heartbeat reported them (`counts`).
    pub fn report(
        entry: &NodeEntry,
        now: Millis,
        counts: Option<Vec<(String, u32)>>,
    ) -> NodeUpdate {
        let live = &entry.live;
        // An empty list is sent too: the other routers must forget rooms that ended.
        let rooms = live
            .reported_rooms
            .lock()
            .ok()
            .map(|r| r.iter().map(|k| k.as_str().to_string()).collect());
        NodeUpdate::Report {
            id: entry.id.to_string(),
            info: WireInfo::from(&entry.info),
            load: live.reported_load(),
            cpu: live.reported_cpu(),
            state: live.self_state(),
            at: live.last_heartbeat().unwrap_or(now),
            rooms,
            counts,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            NodeUpdate::Report { id, .. }
            | NodeUpdate::Put { id, .. }
            | NodeUpdate::Admin { id, .. }
            | NodeUpdate::Removed { id, .. }
            | NodeUpdate::Reserved { id, .. } => id,
        }
    }
}

/// Most routers whose reservations one node keeps (a bound on what messages can make it hold).
const MAX_ROUTERS_PER_NODE: usize = 1024;

/// Largest reservation one router can declare on one node (x1000 load units).
const MAX_RESERVED_MILLI: i64 = 1_000_000_000_000;

/// Applies shared updates to one router's node table. Remembers admin states of nodes this
/// router does not know yet, so a drain that arrives before the node's first report holds,
/// and the other routers' reservations by node.
#[derive(Debug, Default)]
pub struct NodeSync {
    admin: DashMap<String, AdminState>,
    /// Each removed node's removal, by this router's clock (at most [`MAX_REMOVED`], for
    /// [`REMOVED_KEEP_MS`]): a report stamped no later than its `before` is from before the
    /// removal, whether it arrives late (its router published it after the removal went
    /// out) or is re-read from Redis (its write landed after the removal's), and must not
    /// bring the node back.
    removed: DashMap<String, Removal>,
    reserved: Mutex<Reserved>,
    /// Participants other routers' heartbeats reported, until the router takes them
    /// ([`NodeSync::take_observed`]); `any_observed` spares the lock when there are none.
    observed: Mutex<Vec<Observed>>,
    any_observed: AtomicBool,
    /// How far ahead of this router's clock a report's time may be (another router's clock
    /// a little ahead); one further ahead is refused, see [`NodeSync::apply`].
    max_ahead_ms: Millis,
    /// Whether a report from too far ahead was logged yet (once per router is enough).
    warned_ahead: AtomicBool,
}

/// A removal [`NodeSync`] remembers.
#[derive(Debug, Clone, Copy)]
struct Removal {
    /// Reports made no later are from before it (its time; for a node forgotten for its
    /// silence, the remover's last word of it).
    before: Millis,
    /// When this router learned of it, by its clock: how old the memory is.
    noted: Millis,
}

/// Most removals remembered ([`NodeSync`]'s `removed`); past it, a late report of a node
/// removed since may bring it back until its heartbeat timeout passes.
const MAX_REMOVED: usize = 100_000;

/// How long a removal is remembered ([`NodeSync::clamp_removed`]): far longer than any
/// message is late, and than a report kept through a usual outage. Without a bound every
/// crashed node forgotten (`placement.forget_node_after`) under an id of its own would stay
/// remembered until the table was full, and removals after that would not be.
const REMOVED_KEEP_MS: Millis = 3_600_000;

/// A heartbeat another router received: the node's live rooms and their participants, and
/// the rooms that ended on it since its previous report, for this router to settle its
/// reservations with.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub node: NodeId,
    /// When the node sent it, by the clock of the router it reached.
    pub at: Millis,
    pub rooms: Vec<(RoomKey, u32)>,
    /// Rooms the node listed before and no longer does: their sessions ended there (a room
    /// kept for tickets on the way stays listed).
    pub ended: Vec<RoomKey>,
}

/// Most heartbeats kept for the router to take (it takes them before every placement that
/// is not a pinned join, and at every sweep); beyond it new ones are dropped and the
/// reservations they would have settled lapse with `reservation_ttl`.
const MAX_OBSERVED: usize = 4096;

/// Other routers' reservations: by node, by router, the amount (x1000), the sender's time and
/// the expiry generation it was last heard in.
#[derive(Debug, Default)]
struct Reserved {
    by_node: HashMap<String, HashMap<String, Said>>,
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Said {
    milli: i64,
    at: Millis,
    generation: u64,
}

impl Reserved {
    fn sum(&self, node: &str) -> i64 {
        self.by_node
            .get(node)
            .map_or(0, |by| by.values().map(|s| s.milli).sum())
    }
}

impl NodeSync {
    /// `max_ahead_ms`: the heartbeat timeout, the most two routers' clocks may disagree by
    /// before one of them sees the other's nodes as dead anyway.
    pub fn new(max_ahead_ms: Millis) -> NodeSync {
        NodeSync {
            max_ahead_ms,
            ..NodeSync::default()
        }
    }

    /// An update this router made and shares (its own come back from Redis unapplied):
    /// what it changes here is remembered as another router's would be, so that a later
    /// update from elsewhere is judged against it. An admin state this router set is the
    /// one a node re-added later takes, not an older one another router set; a node this
    /// router removed is not brought back by a report from before.
    pub fn own(&self, u: &NodeUpdate, now: Millis) {
        match u {
            NodeUpdate::Admin { id, state } => {
                self.admin.insert(id.clone(), *state);
            }
            NodeUpdate::Removed {
                id, silent_since, ..
            } => self.note_removed(id, silent_since.map_or(now, |s| s.min(now)), now),
            _ => {}
        }
    }

    /// Remembers `id`'s removal at `now`, refusing reports made no later than `before`.
    fn note_removed(&self, id: &str, before: Millis, now: Millis) {
        if self.removed.len() < MAX_REMOVED || self.removed.contains_key(id) {
            self.removed
                .insert(id.to_string(), Removal { before, noted: now });
        }
    }

    /// Brings removal times later than `now` back to `now`: after the wall clock steps
    /// backwards, a removal stamped before the step would have every report of the node
    /// refused as sent before it until the clock caught up with it. Called with the sweep's
    /// clamp of heartbeat times ([`super::Live::clamp_heartbeat`]; a shared store's
    /// `sweep_idle`).
    pub fn clamp_removed(&self, now: Millis) {
        // Read first: without a step (the common case) nothing is written.
        let ahead: Vec<String> = self
            .removed
            .iter()
            .filter(|r| r.before > now || r.noted > now)
            .map(|r| r.key().clone())
            .collect();
        for id in ahead {
            if let Some(mut r) = self.removed.get_mut(&id) {
                r.before = r.before.min(now);
                r.noted = r.noted.min(now);
            }
        }
        // And removals this router learned of `REMOVED_KEEP_MS` ago are forgotten.
        let old = |r: &Removal| now.saturating_sub(r.noted) >= REMOVED_KEEP_MS;
        let expired: Vec<String> = self
            .removed
            .iter()
            .filter(|r| old(r.value()))
            .map(|r| r.key().clone())
            .collect();
        for id in expired {
            self.removed.remove_if(&id, |_, r| old(r));
        }
    }

    /// The room's session on `node` is over for this router, as of `at`, though no node said
    /// so: its pin there from a store outage lost to another router's at the write-back (the
    /// same node or another). The router drops its reservation of the room there, as for a
    /// session a report said ended ([`Observed::ended`]); kept, it counted the room a second
    /// time on top of the winner's for `reservation_ttl`.
    pub fn note_ended(&self, node: NodeId, room: RoomKey, at: Millis) {
        if let Ok(mut o) = self.observed.lock() {
            if o.len() < MAX_OBSERVED {
                o.push(Observed {
                    node,
                    at,
                    rooms: Vec::new(),
                    ended: vec![room],
                });
                self.any_observed.store(true, Ordering::Release);
            }
        }
    }

    /// The participants other routers' heartbeats reported since the last call.
    pub fn take_observed(&self) -> Vec<Observed> {
        // A read first: the common case (nothing heard) writes no shared cache line.
        if !self.any_observed.load(Ordering::Acquire)
            || !self.any_observed.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        self.observed
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
    }

    /// The other routers' reservations on `node` (x1000 load units), as last heard.
    pub fn others_reserved_milli(&self, node: &str) -> i64 {
        self.reserved.lock().map_or(0, |r| r.sum(node))
    }

    /// Forgets the reservations of routers not heard from since the previous call (one full
    /// re-sync interval: routers repeat theirs more often than that) and recounts the nodes
    /// that lost any. Returns how many (node, router) entries were dropped.
    pub fn expire_reserved(&self, cluster: &Cluster) -> usize {
        let Ok(mut r) = self.reserved.lock() else {
            return 0;
        };
        let keep_from = r.generation;
        r.generation += 1;
        let mut dropped = 0;
        let mut touched = Vec::new();
        for (node, by) in r.by_node.iter_mut() {
            let before = by.len();
            by.retain(|_, s| s.generation >= keep_from);
            if by.len() != before {
                dropped += before - by.len();
                touched.push(node.clone());
            }
        }
        r.by_node.retain(|_, by| !by.is_empty());
        let snap = cluster.snapshot();
        for node in touched {
            if let Some(e) = NodeId::parse(&node)
                .ok()
                .and_then(|id| snap.get(&id).cloned())
            {
                e.live.set_others_reserved_milli(r.sum(&node));
            }
        }
        dropped
    }

    fn apply_reserved(
        &self,
        cluster: &Cluster,
        id: &NodeId,
        router: &str,
        milli: i64,
        at: Millis,
    ) -> bool {
        if router.is_empty() || router.len() > 64 || !(0..=MAX_RESERVED_MILLI).contains(&milli) {
            return false;
        }
        let Ok(mut r) = self.reserved.lock() else {
            return false;
        };
        let generation = r.generation;
        let by = r.by_node.entry(id.to_string()).or_default();
        match by.get(router) {
            Some(s) if s.at > at => return false, // a newer amount is already here
            None if by.len() >= MAX_ROUTERS_PER_NODE => return false,
            _ => {}
        }
        if milli == 0 {
            by.remove(router);
        } else {
            by.insert(
                router.to_string(),
                Said {
                    milli,
                    at,
                    generation,
                },
            );
        }
        let sum = r.sum(id.as_str());
        if sum == 0 {
            r.by_node.remove(id.as_str());
        }
        if let Some(e) = cluster.snapshot().get(id) {
            e.live.set_others_reserved_milli(sum);
        }
        true
    }

    /// A node just added to this router's table starts with what the others reserved on it.
    fn added(&self, id: &NodeId, entry: &NodeEntry) {
        if let Some(s) = self.admin.get(id.as_str()) {
            entry.live.set_admin_state(*s);
        }
        // Set under the lock, as `apply_reserved` does: read, unlocked, then set, a release
        // applied in between (its 0 written) was overwritten by the older sum, and nothing
        // recounts a node no router reserves on any more.
        if let Ok(r) = self.reserved.lock() {
            entry.live.set_others_reserved_milli(r.sum(id.as_str()));
        }
    }

    /// An admin state a shared store's re-sync read after `mark` ([`Cluster::admin_mark`]),
    /// taken unless the node's admin state changed here since: by this router's admin (a
    /// drain the read came too early to see) or by news from another router, either at
    /// least as new as the read. Without this, a re-sync whose read crossed a drain undid
    /// it here until the next re-sync (`store.resync_interval`). True if taken.
    pub fn apply_resynced_admin(
        &self,
        cluster: &Cluster,
        id: &str,
        state: AdminState,
        mark: u64,
    ) -> bool {
        let Ok(nid) = NodeId::parse(id) else {
            return false;
        };
        if !cluster.set_admin_state_unless_changed(&nid, state, mark) {
            return false;
        }
        self.admin.insert(id.to_string(), state);
        true
    }

    /// Applies one update, `now` by this router's clock. Returns false if it was malformed
    /// or stale and changed nothing.
    ///
    /// A report's time is taken as at most `now`: a node is never counted as heard from
    /// later than this router's present. A report more than `max_ahead_ms` ahead is refused:
    /// it was stamped before a router's wall clock stepped backwards, and taking it (even
    /// brought back to `now`) at every re-sync would keep a dead node healthy until the clock
    /// caught up with it.
    pub fn apply(&self, cluster: &Cluster, u: &NodeUpdate, now: Millis) -> bool {
        let Ok(id) = NodeId::parse(u.id()) else {
            return false;
        };
        match u {
            NodeUpdate::Report {
                info,
                load,
                cpu,
                state,
                at,
                rooms,
                counts,
                ..
            } => {
                let Some(info) = info.to_info() else {
                    return false;
                };
                if *at > now.saturating_add(self.max_ahead_ms) {
                    if !self.warned_ahead.swap(true, Ordering::Relaxed) {
                        tracing::warn!(node = %id, ahead_ms = *at - now, "a node report is stamped ahead of this router's clock; refused (a wall clock stepped backwards, or the routers' clocks disagree)");
                    }
                    return false;
                }
                let at = (*at).min(now);
                if self
                    .removed
                    .get(id.as_str())
                    .is_some_and(|r| at <= r.before)
                {
                    return false; // sent before the node was removed
                }
                if cluster
                    .snapshot()
                    .get(&id)
                    .is_some_and(|e| e.live.newest_report() >= at)
                {
                    // This router already has a report as new, or forgot one as new when
                    // a health check found the node down.
                    return false;
                }
                if !(0.0..=super::MAX_UNITS).contains(load) {
                    return false;
                }
                self.removed.remove(id.as_str());
                // As a heartbeat does (`Live::hear`): a forget under way keeps the node.
                if let Some(e) = cluster.snapshot().get(&id) {
                    e.live.hear(at);
                }
                let capacity = info.capacity;
                let (outcome, entry) = cluster.upsert(&id, info, false);
                if outcome == Upsert::Added {
                    self.added(&id, &entry);
                }
                // Checked again as it is written: a report recorded since the check above
                // (this router's own heartbeat, another relay) is newer news.
                if !entry
                    .live
                    .record_report_if_newer(capacity, *load, *cpu, *state, at)
                {
                    return false;
                }
                let mut ended = Vec::new();
                if let Some(rooms) = rooms {
                    let set: HashSet<RoomKey> = rooms
                        .iter()
                        .filter_map(|r| RoomKey::parse(r, Normalization::None).ok())
                        .collect();
                    if let Ok(mut g) = entry.live.reported_rooms.lock() {
                        ended = g.iter().filter(|r| !set.contains(*r)).cloned().collect();
                        *g = set;
                    }
                }
                let rooms: Vec<(RoomKey, u32)> = counts
                    .iter()
                    .flatten()
                    .filter_map(|(r, n)| Some((RoomKey::parse(r, Normalization::None).ok()?, *n)))
                    .collect();
                if !rooms.is_empty() || !ended.is_empty() {
                    if let Ok(mut o) = self.observed.lock() {
                        if o.len() < MAX_OBSERVED {
                            o.push(Observed {
                                node: id.clone(),
                                at,
                                rooms,
                                ended,
                            });
                            self.any_observed.store(true, Ordering::Release);
                        }
                    }
                }
                true
            }
            NodeUpdate::Put { info, .. } => match info.to_info() {
                Some(info) => {
                    let (outcome, entry) = cluster.upsert(&id, info, true);
                    // Not word of the node by a time (`Live::last_word`): a put carries none,
                    // and the re-sync reads the stored one again at every interval.
                    if outcome == Upsert::Added {
                        self.added(&id, &entry);
                    }
                    true
                }
                None => false,
            },
            NodeUpdate::Admin { state, .. } => {
                self.admin.insert(id.to_string(), *state);
                cluster.set_admin_state(&id, *state);
                true
            }
            NodeUpdate::Removed {
                at, silent_since, ..
            } => {
                // Decided before the newest word this router has of the node (a report made
                // after it, or a registration): the node came back meanwhile, and the
                // removal is old news (written back after a Redis outage, say). Taking it
                // would drop a node that hosts rooms, and their next joins would place them
                // again elsewhere. Held heartbeat times do not count (`Live::last_word`).
                // A node forgotten for its silence is kept by word newer than the remover had.
                let newer = [(*at > 0).then_some(*at), *silent_since]
                    .into_iter()
                    .flatten()
                    .min();
                // A forget leaves a node this router has from its config file (another
                // router's may lack the entry, as a change rolls out).
                let heard_since = |e: &super::NodeEntry| {
                    newer.is_some_and(|t| e.live.last_word() > t)
                        || (silent_since.is_some() && e.is_static)
                };
                // Checked under the table's lock: a report may land as this applies.
                let gone = cluster.remove_if(&id, |e| !heard_since(e)).is_some();
                if !gone && cluster.snapshot().get(&id).is_some() {
                    return false;
                }
                // The node's admin state stays (`self.admin`, and the cluster keeps it too):
                // a node that comes back is still drained or disabled until an admin enables it.
                if let Ok(mut r) = self.reserved.lock() {
                    r.by_node.remove(id.as_str());
                }
                // Reports up to then are from before it; of a node forgotten for its silence,
                // those made after the remover last heard it are not.
                self.note_removed(id.as_str(), silent_since.map_or(now, |s| s.min(now)), now);
                gone
            }
            NodeUpdate::Reserved {
                router,
                reserved_milli,
                at,
                ..
            } => self.apply_reserved(cluster, &id, router, *reserved_milli, *at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This router's clock in the tests: after every report's time.
    const NOW: Millis = 10_000;
    /// The heartbeat timeout (how far ahead another router's report may be).
    const MAX_AHEAD: Millis = 6_000;

    fn info(cap: f64) -> WireInfo {
        WireInfo {
            url: "http://127.0.0.1:9001".into(),
            upstream: "http://127.0.0.1:9001".into(),
            capacity: cap,
            region: None,
            tags: vec![],
        }
    }

    fn report(at: Millis, load: f64) -> NodeUpdate {
        NodeUpdate::Report {
            id: "n1".into(),
            info: info(100.0),
            load,
            cpu: None,
            state: AdminState::Active,
            at,
            rooms: Some(vec!["r1".into()]),
            counts: Some(vec![("r1".into(), 4)]),
        }
    }

    /// n1's removal, decided at `at`.
    fn removed(at: Millis) -> NodeUpdate {
        NodeUpdate::Removed {
            id: "n1".into(),
            at,
            silent_since: None,
        }
    }

    #[test]
    fn the_participants_another_router_heard_are_kept_once_for_this_routers_reservations() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        assert!(s.take_observed().is_empty());
        assert!(s.apply(&c, &report(1000, 4.0), NOW));
        let seen = s.take_observed();
        assert_eq!(
            seen,
            vec![Observed {
                node: NodeId::parse("n1").unwrap(),
                at: 1000,
                rooms: vec![(RoomKey::parse("r1", Normalization::None).unwrap(), 4)],
                ended: vec![],
            }]
        );
        assert!(s.take_observed().is_empty(), "taken once");
        // The next report no longer lists r1: its session ended on n1.
        let gone = NodeUpdate::Report {
            id: "n1".into(),
            info: info(100.0),
            load: 0.0,
            cpu: None,
            state: AdminState::Active,
            at: 3000,
            rooms: Some(vec![]),
            counts: Some(vec![]),
        };
        assert!(s.apply(&c, &gone, NOW));
        assert_eq!(
            s.take_observed(),
            vec![Observed {
                node: NodeId::parse("n1").unwrap(),
                at: 3000,
                rooms: vec![],
                ended: vec![RoomKey::parse("r1", Normalization::None).unwrap()],
            }]
        );
        // A report no newer than the one this router has settles nothing.
        assert!(!s.apply(&c, &report(1000, 4.0), NOW));
        assert!(s.take_observed().is_empty());
    }

    #[test]
    fn reports_register_nodes_and_never_go_back_in_time() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        assert!(s.apply(&c, &report(1000, 10.0), NOW));
        let id = NodeId::parse("n1").unwrap();
        let e = c.snapshot().get(&id).unwrap().clone();
        assert_eq!(e.live.last_heartbeat(), Some(1000));
        assert_eq!(e.live.reported_load(), 10.0);
        assert_eq!(e.live.reported_rooms.lock().unwrap().len(), 1);
        // An older (reordered) report changes nothing.
        assert!(!s.apply(&c, &report(900, 50.0), NOW));
        assert_eq!(e.live.reported_load(), 10.0);
        assert!(s.apply(&c, &report(2000, 30.0), NOW));
        assert_eq!(e.live.reported_load(), 30.0);
    }

    #[test]
    fn a_report_from_ahead_of_this_routers_clock_counts_as_now_or_not_at_all() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        // Another router's clock a little ahead: heard from now, not later.
        assert!(s.apply(&c, &report(NOW + 2_000, 1.0), NOW));
        let e = c.snapshot().get(&id).unwrap().clone();
        assert_eq!(e.live.last_heartbeat(), Some(NOW));
        // A report stamped an hour ahead (before a wall clock stepped back an hour) is
        // refused: taken as `now` at every re-sync, it would keep a dead node healthy.
        assert!(!s.apply(&c, &report(NOW + 3_600_000, 2.0), NOW + 1_000));
        assert_eq!(e.live.last_heartbeat(), Some(NOW));
        assert_eq!(e.live.reported_load(), 1.0);
    }

    #[test]
    fn admin_state_before_first_report_holds_and_outlives_removal() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        s.apply(
            &c,
            &NodeUpdate::Admin {
                id: "n1".into(),
                state: AdminState::Disabled,
            },
            NOW,
        );
        s.apply(&c, &report(1000, 0.0), NOW);
        let id = NodeId::parse("n1").unwrap();
        assert_eq!(
            c.snapshot().get(&id).unwrap().live.effective_state(),
            AdminState::Disabled
        );
        assert!(s.apply(&c, &removed(2_000), 2_000));
        assert!(c.snapshot().get(&id).is_none());
        // Back after its removal: still disabled, until an admin enables it.
        s.apply(&c, &report(3000, 0.0), NOW);
        assert_eq!(
            c.snapshot().get(&id).unwrap().live.effective_state(),
            AdminState::Disabled
        );
        s.apply(
            &c,
            &NodeUpdate::Admin {
                id: "n1".into(),
                state: AdminState::Active,
            },
            NOW,
        );
        assert_eq!(
            c.snapshot().get(&id).unwrap().live.effective_state(),
            AdminState::Active
        );
    }

    fn reserved(router: &str, milli: i64, at: Millis) -> NodeUpdate {
        NodeUpdate::Reserved {
            id: "n1".into(),
            router: router.into(),
            reserved_milli: milli,
            at,
        }
    }

    #[test]
    fn other_routers_reservations_add_up_and_the_newest_of_each_counts() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        // Heard before the node is known: kept, and counted once it arrives.
        assert!(s.apply(&c, &reserved("ra", 4_000, 10), NOW));
        s.apply(&c, &report(1000, 0.0), NOW);
        let id = NodeId::parse("n1").unwrap();
        let live = c.snapshot().get(&id).unwrap().live.clone();
        assert_eq!(live.others_reserved_units(), 4.0);
        assert!(s.apply(&c, &reserved("rb", 6_000, 5), NOW));
        assert_eq!(live.others_reserved_units(), 10.0);
        // A router's amount replaces its previous one; an older message changes nothing.
        assert!(s.apply(&c, &reserved("ra", 1_000, 11), NOW));
        assert!(!s.apply(&c, &reserved("ra", 9_000, 9), NOW));
        assert_eq!(live.others_reserved_units(), 7.0);
        assert!(s.apply(&c, &reserved("rb", 0, 6), NOW));
        assert_eq!(live.others_reserved_units(), 1.0);
        // Nonsense is refused.
        for bad in [
            reserved("ra", -1, 20),
            reserved("ra", i64::MAX, 20),
            reserved("", 1, 20),
            reserved(&"r".repeat(65), 1, 20),
        ] {
            assert!(!s.apply(&c, &bad, NOW), "{bad:?}");
        }
        assert_eq!(live.others_reserved_units(), 1.0);
        // A removed node's reservations are forgotten with it.
        assert!(s.apply(&c, &removed(NOW), NOW));
        assert_eq!(s.others_reserved_milli("n1"), 0);
    }

    #[test]
    fn a_router_not_heard_from_over_a_whole_interval_is_forgotten() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        s.apply(&c, &report(1000, 0.0), NOW);
        let id = NodeId::parse("n1").unwrap();
        let live = c.snapshot().get(&id).unwrap().live.clone();
        s.apply(&c, &reserved("quiet", 2_000, 1), NOW);
        s.apply(&c, &reserved("talks", 3_000, 1), NOW);
        assert_eq!(s.expire_reserved(&c), 0, "both heard in this interval");
        s.apply(&c, &reserved("talks", 3_000, 2), NOW);
        assert_eq!(
            s.expire_reserved(&c),
            1,
            "quiet said nothing for a whole interval"
        );
        assert_eq!(live.others_reserved_units(), 3.0);
        s.apply(&c, &reserved("talks", 3_000, 3), NOW);
        assert_eq!(s.expire_reserved(&c), 0);
        assert_eq!(s.expire_reserved(&c), 1);
        assert_eq!(live.others_reserved_units(), 0.0);
    }

    #[test]
    fn updates_round_trip_through_json_and_bad_ones_are_refused() {
        let u = report(5, 1.0);
        let back: NodeUpdate = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
        assert_eq!(u, back);
        let c = Cluster::new();
        let bad = NodeUpdate::Put {
            id: "bad id".into(),
            info: info(1.0),
        };
        assert!(!NodeSync::new(MAX_AHEAD).apply(&c, &bad, NOW));
        let zero = NodeUpdate::Put {
            id: "n".into(),
            info: info(0.0),
        };
        assert!(!NodeSync::new(MAX_AHEAD).apply(&c, &zero, NOW));
        assert!(c.is_empty());
    }

    #[test]
    fn a_report_a_health_check_forgot_does_not_bring_the_node_back() {
        // A probe (or proxy mode's passive check) found the node down and forgot its last
        // heartbeat; the store's re-sync then reads that same report again.
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(8_000, 0.0), 8_500));
        let e = c.snapshot().get(&id).unwrap().clone();
        e.live.forget_heartbeat();
        assert!(!s.apply(&c, &report(8_000, 0.0), 9_000));
        assert_eq!(e.live.last_heartbeat(), None, "still down");
        // A report made after the forgotten one is news: the node is back.
        assert!(s.apply(&c, &report(9_500, 0.0), 9_600));
        assert_eq!(e.live.last_heartbeat(), Some(9_500));
    }

    #[test]
    fn a_report_from_before_a_removal_does_not_bring_the_node_back() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(8_000, 0.0), 8_500));
        let gone = removed(9_000);
        assert!(s.apply(&c, &gone, 9_000));
        // Another router's report, sent before the removal, arrives (or is re-read) after it.
        assert!(!s.apply(&c, &report(8_900, 0.0), NOW));
        assert!(c.snapshot().get(&id).is_none(), "no ghost");
        // The node really comes back: a report sent after the removal.
        assert!(s.apply(&c, &report(9_500, 0.0), NOW));
        assert!(c.snapshot().get(&id).is_some());
        // This router's own removal counts too.
        c.remove(&id);
        s.own(&gone, 9_800);
        assert!(!s.apply(&c, &report(9_700, 0.0), NOW));
        assert!(c.snapshot().get(&id).is_none());
    }

    #[test]
    fn a_node_re_added_takes_the_admin_state_this_router_set_last() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(1_000, 0.0), NOW));
        // Another router enables n1; then this router's admin disables it.
        let active = NodeUpdate::Admin {
            id: "n1".into(),
            state: AdminState::Active,
        };
        assert!(s.apply(&c, &active, NOW));
        let disabled = NodeUpdate::Admin {
            id: "n1".into(),
            state: AdminState::Disabled,
        };
        c.set_admin_state(&id, AdminState::Disabled);
        s.own(&disabled, NOW);
        // n1 leaves and comes back.
        assert!(s.apply(&c, &removed(2_000), 2_000));
        assert!(s.apply(&c, &report(3_000, 0.0), NOW));
        let e = c.snapshot().get(&id).cloned().unwrap();
        assert_eq!(e.live.admin_state(), AdminState::Disabled);
    }

    #[test]
    fn a_resync_read_from_before_a_drain_does_not_undo_it() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(1_000, 0.0), NOW));
        let state = || c.snapshot().get(&id).unwrap().live.admin_state();
        // The re-sync starts reading the admin hash (n1: active) ...
        let mark = c.admin_mark();
        // ... this router's admin drains n1 meanwhile ...
        c.set_admin_state(&id, AdminState::Draining);
        s.own(
            &NodeUpdate::Admin {
                id: "n1".into(),
                state: AdminState::Draining,
            },
            NOW,
        );
        // ... and the read comes back with what it saw before.
        assert!(!s.apply_resynced_admin(&c, "n1", AdminState::Active, mark));
        assert_eq!(state(), AdminState::Draining);
        // News from another router after the read started is newer than the read too.
        let mark = c.admin_mark();
        assert!(s.apply(
            &c,
            &NodeUpdate::Admin {
                id: "n1".into(),
                state: AdminState::Disabled,
            },
            NOW,
        ));
        assert!(!s.apply_resynced_admin(&c, "n1", AdminState::Draining, mark));
        assert_eq!(state(), AdminState::Disabled);
        // A read that began after every change here is taken: it repairs a lost message.
        let mark = c.admin_mark();
        assert!(s.apply_resynced_admin(&c, "n1", AdminState::Active, mark));
        assert_eq!(state(), AdminState::Active);
        // Also for a node this router does not know yet: remembered for when it reports.
        let mark = c.admin_mark();
        assert!(s.apply_resynced_admin(&c, "n2", AdminState::Disabled, mark));
        let mut n2_report = report(1_000, 0.0);
        if let NodeUpdate::Report { id, .. } = &mut n2_report {
            *id = "n2".into();
        }
        assert!(s.apply(&c, &n2_report, NOW));
        let n2 = NodeId::parse("n2").unwrap();
        assert_eq!(
            c.snapshot().get(&n2).unwrap().live.admin_state(),
            AdminState::Disabled
        );
    }

    #[test]
    fn a_removal_older_than_the_nodes_newest_report_leaves_it_in() {
        // Router A removed n1 at 9 000 during a Redis outage and kept the removal; n1 came
        // back and reported at 9 500; A writes the removal back once Redis returns.
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(9_500, 0.0), 9_600));
        assert!(!s.apply(&c, &removed(9_000), NOW), "old news");
        let e = c.snapshot().get(&id).cloned().expect("n1 stays");
        assert_eq!(e.live.last_heartbeat(), Some(9_500));
        // Its reports are still taken: no removal time was noted.
        assert!(s.apply(&c, &report(9_700, 0.0), NOW));
        // A heartbeat time held through an outage is no word from the node: a removal
        // decided after its last report takes it out.
        e.live.hold_heartbeat(9_950);
        assert!(s.apply(&c, &removed(9_900), NOW));
        assert!(c.snapshot().get(&id).is_none());
    }

    #[test]
    fn a_removal_older_than_this_routers_registration_leaves_the_node_in() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        // Another router's registration carries no time, and the re-sync applies the stored
        // one again at every interval: it is not word of the node after a removal.
        let put = NodeUpdate::Put {
            id: "n1".into(),
            info: info(100.0),
        };
        assert!(s.apply(&c, &put, 9_000));
        assert!(s.apply(&c, &removed(8_000), NOW));
        assert!(c.snapshot().get(&id).is_none());
        // This router's admin registers it at 9 000 (`Router::put_node`): a removal
        // another router decided before is old news, one decided after is not.
        let (_, e) = c.upsert(&id, info(100.0).to_info().unwrap(), true);
        e.live.note_registered(9_000);
        assert!(!s.apply(&c, &removed(8_500), NOW));
        assert!(c.snapshot().get(&id).is_some());
        assert!(s.apply(&c, &removed(9_500), NOW));
        assert!(c.snapshot().get(&id).is_none());
    }

    #[test]
    fn a_removal_from_a_router_that_predates_its_time_is_applied_as_before() {
        let old: NodeUpdate = serde_json::from_str(r#"{"kind":"removed","id":"n1"}"#).unwrap();
        assert_eq!(old, removed(0));
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        assert!(s.apply(&c, &report(9_500, 0.0), 9_600));
        assert!(s.apply(&c, &old, NOW));
        assert!(c.is_empty());
        // And a router that predates it reads ours (an unknown field is ignored).
        let ours = serde_json::to_value(removed(9_000)).unwrap();
        assert_eq!(
            ours,
            serde_json::json!({"kind": "removed", "id": "n1", "at": 9_000})
        );
    }

    /// n1 forgotten for its silence at `NOW`, its remover's last word of it at `since`.
    fn forgotten(since: Millis) -> NodeUpdate {
        NodeUpdate::Removed {
            id: "n1".into(),
            at: NOW,
            silent_since: Some(since),
        }
    }

    #[test]
    fn a_node_forgotten_for_its_silence_stays_where_it_was_heard_since() {
        // The remover last heard n1 at 5 000; this router heard it at 8 000 (through a third
        // router): the remover's view is the one behind, and the node hosts rooms.
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(8_000, 0.0), 8_100));
        assert!(!s.apply(&c, &forgotten(5_000), NOW));
        assert!(c.snapshot().get(&id).is_some());
        // Where the remover's word is the newest there is, the node goes...
        assert!(s.apply(&c, &forgotten(8_000), NOW));
        assert!(c.snapshot().get(&id).is_none());
        // ... and a report made after that word brings it back, though relayed after the
        // removal (an admin's removal at `NOW` would refuse it as sent before).
        assert!(s.apply(&c, &report(9_000, 0.0), NOW + 100));
        assert!(c.snapshot().get(&id).is_some());
        assert!(s.apply(&c, &removed(NOW), NOW));
        assert!(!s.apply(&c, &report(9_500, 0.0), NOW + 200));
        // And routers that predate the field read a forget as a removal at its time.
        let wire = serde_json::to_value(forgotten(8_000)).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({"kind": "removed", "id": "n1", "at": NOW, "silent_since": 8_000})
        );
    }

    #[test]
    fn a_removal_is_remembered_for_an_hour() {
        // A crashed node forgotten under an id of its own never reports again: its removal
        // must not be kept for good (100 000 of them fill the table).
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        assert!(s.apply(&c, &report(NOW - 2, 0.0), NOW));
        assert!(s.apply(&c, &removed(NOW), NOW));
        s.clamp_removed(NOW + REMOVED_KEEP_MS - 1);
        assert!(!s.apply(&c, &report(NOW - 1, 0.0), NOW + REMOVED_KEEP_MS - 1));
        s.clamp_removed(NOW + REMOVED_KEEP_MS);
        assert!(s.removed.is_empty());
        // A report that late (kept through an hour's outage) is taken again.
        assert!(s.apply(&c, &report(NOW - 1, 0.0), NOW + REMOVED_KEEP_MS));
        // A node forgotten for its silence is remembered an hour from when this router
        // learned of it, not from the remover's last word of it (a day before).
        let later = NOW + 2 * REMOVED_KEEP_MS;
        assert!(s.apply(&c, &report(later - 3, 0.0), later));
        let forget = NodeUpdate::Removed {
            id: "n1".into(),
            at: later,
            silent_since: Some(later - 2),
        };
        assert!(s.apply(&c, &forget, later));
        s.clamp_removed(later + 1);
        assert!(
            !s.apply(&c, &report(later - 2, 0.0), later + 1),
            "from before"
        );
        assert!(
            s.apply(&c, &report(later - 1, 0.0), later + 1),
            "after its last word"
        );
    }

    #[test]
    fn a_forget_leaves_a_static_node_and_bounds_hold_for_relayed_nodes() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        c.upsert(&id, info(100.0).to_info().unwrap(), true);
        // Another router, without the config file's entry yet, forgets it.
        assert!(!s.apply(&c, &forgotten(NOW), NOW));
        assert!(c.snapshot().get(&id).is_some());
        // As the HTTP surface refuses them: capacity and load past 1e12 units.
        let c = Cluster::new();
        let mut huge = report(NOW - 1, 0.0);
        if let NodeUpdate::Report { info, .. } = &mut huge {
            info.capacity = 1e300;
        }
        assert!(!s.apply(&c, &huge, NOW));
        assert!(!s.apply(&c, &report(NOW - 1, 1e300), NOW));
        assert!(c.is_empty());
        assert!(s.apply(&c, &report(NOW - 1, 1e12), NOW));
    }

    /// An hour: how far the wall clock steps back in the tests below.
    const HOUR: Millis = 3_600_000;

    #[test]
    fn a_heartbeat_forgotten_before_a_backward_clock_step_does_not_refuse_later_reports() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(8_000, 0.0), 8_500));
        let e = c.snapshot().get(&id).cloned().unwrap();
        // This router's own heartbeat from n1, an hour ahead; a health check then finds it
        // down; the wall clock steps back an hour and the sweep clamps.
        e.live
            .record_report(100.0, 0.0, None, AdminState::Active, HOUR + 8_600);
        e.live.forget_heartbeat();
        e.live.clamp_heartbeat(9_000);
        assert!(
            s.apply(&c, &report(9_500, 0.0), 9_600),
            "a report made after the clamp is news"
        );
        assert_eq!(e.live.last_heartbeat(), Some(9_500));
        // Nor does the hour-ahead report outweigh a removal decided after the clamp.
        assert!(s.apply(&c, &removed(9_550), 9_700));
        assert!(c.snapshot().get(&id).is_none());
    }

    #[test]
    fn a_removal_before_a_backward_clock_step_does_not_refuse_later_reports() {
        let c = Cluster::new();
        let s = NodeSync::new(MAX_AHEAD);
        let id = NodeId::parse("n1").unwrap();
        assert!(s.apply(&c, &report(8_000, 0.0), 8_500));
        assert!(s.apply(&c, &removed(HOUR + 9_000), HOUR + 9_000));
        assert!(c.snapshot().get(&id).is_none());
        // The wall clock steps back an hour; the sweep clamps.
        s.clamp_removed(9_000);
        assert!(s.apply(&c, &report(9_500, 0.0), 9_600));
        assert!(c.snapshot().get(&id).is_some(), "n1 is back");
        // A report from before the (clamped) removal is still refused.
        assert!(s.apply(&c, &removed(9_700), 9_700));
        s.clamp_removed(9_800);
        assert!(!s.apply(&c, &report(9_650, 0.0), 9_900));
        assert!(c.snapshot().get(&id).is_none());
    }
}
