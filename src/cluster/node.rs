//! One node: its identity, its static description, and the live counters heartbeats and
//! joins update without locks.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::metrics::LatencyCounts;
use crate::placement::hash::node_hash;
use crate::placement::{AdminState, Millis, NodeView};
use crate::room::RoomKey;

/// Longest node id.
pub const MAX_NODE_ID: usize = 64;

/// A validated node id (1-64 of `A-Za-z0-9._-`, not `.` or `..`) with its stable hash. The
/// id is a path segment of the API (`/v1/nodes/{id}/heartbeat`): `.` and `..` would be
/// resolved away by every HTTP client before the router saw them.
#[derive(Clone)]
pub struct NodeId {
    name: Arc<str>,
    hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id must be 1-{MAX_NODE_ID} characters of A-Za-z0-9._-, and not . or ..")]
pub struct NodeIdError;

impl NodeId {
    pub fn parse(s: &str) -> Result<NodeId, NodeIdError> {
        let ok = !s.is_empty()
            && s != "."
            && s != ".."
            && s.len() <= MAX_NODE_ID
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !ok {
            return Err(NodeIdError);
        }
        Ok(NodeId {
            hash: node_hash(s.as_bytes()),
            name: Arc::from(s),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// XXH3-64 of the id, as placement ranks with.
    pub fn stable_hash(&self) -> u64 {
        self.hash
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
    }
}
impl Eq for NodeId {}
impl Hash for NodeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash)
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.name)
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}
impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

/// What a node is: changes rarely (registration, a heartbeat with new values).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    /// Public base URL users are redirected to.
    pub url: String,
    /// Where the router proxies to (defaults to `url`).
    pub upstream: String,
    /// Capacity in load units (> 0).
    pub capacity: f64,
    pub region: Option<String>,
    /// Sorted, deduplicated.
    pub tags: Vec<String>,
}

/// Fixed-point scale for load units kept in atomics.
const MILLI: f64 = 1000.0;

fn state_from(v: u8) -> AdminState {
    match v {
        1 => AdminState::Draining,
        2 => AdminState::Disabled,
        _ => AdminState::Active,
    }
}
fn state_to(s: AdminState) -> u8 {
    match s {
        AdminState::Active => 0,
        AdminState::Draining => 1,
        AdminState::Disabled => 2,
    }
}

/// The counters of a node that change all the time. Survives info changes (the registry
/// carries the same `Arc<Live>` into the new snapshot entry).
///
/// Laid out for the new-room pass, which reads every node's `Live` through a pointer: what
/// the pass reads (utilization, heartbeat, pending, reserved, states) comes first, in field
/// order (`repr(C)`), and the struct starts a cache line, so those reads touch one line per
/// node instead of the two or three the compiler's own order spread them over.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct Live {
    /// The last report in load units, `max(load, cpu x capacity)`, f64 bits: û adds what
    /// came since in the same units and divides once, as the simulator does, so that equal
    /// sums are equal û and ties go to the rendezvous rank, not to rounding.
    reported_units: AtomicU64,
    /// Last heartbeat, ms since epoch; 0 = never.
    last_heartbeat: AtomicU64,
    /// Load units (x1000) sent since the last heartbeat.
    pending_milli: AtomicU64,
    /// Reserved load units (x1000) that count in û: `reserved_milli + others_reserved_milli`,
    /// kept as one counter so that the new-room pass reads one value per node.
    counted_reserved_milli: AtomicI64,
    admin_state: AtomicU8,
    self_state: AtomicU8,
    /// Load units (x1000) this router reserved for new rooms' expected sizes.
    reserved_milli: AtomicI64,
    /// Load units (x1000) the other routers reserved here, as they last said
    /// (`placement.share_reservations`); 0 without sharing.
    others_reserved_milli: AtomicI64,
    /// Reported load units and cpu, f64 bits, for display.
    reported_load: AtomicU64,
    reported_cpu: AtomicU64,
    /// Rooms the node listed in its last heartbeat; only heartbeats touch it.
    pub(crate) reported_rooms: Mutex<HashSet<RoomKey>>,
    /// Held while a report is written: a relayed one checks that it is the newest and is
    /// written in one step ([`Live::record_report_if_newer`]), so that a newer report
    /// recorded between the check and the write is not overwritten by an older one.
    reporting: Mutex<()>,
    /// `reserved_milli` as last told to the other routers.
    shared_reserved_milli: AtomicI64,
    /// The heartbeat time a health check forgot ([`Live::forget_heartbeat`]): a report no
    /// newer, relayed again by another router or the store's re-sync, must not bring the
    /// node back.
    forgotten: AtomicU64,
    /// When the node first reported itself draining with nothing left on it, in the current
    /// run of such reports (0: it did not): see [`Live::drained_empty_since`].
    drained_empty: AtomicU64,
    /// When this router last had word of the node itself, ms since epoch (0 = never): its
    /// newest report (its own heartbeat or one another router relayed) or this router's
    /// admin registering it. Unlike `last_heartbeat`, never moved by a hold (a store outage, a pause
    /// of the router): a removal decided before it is stale ([`Live::last_word`]).
    last_word: AtomicU64,
    /// The node's reported units (f64 bits) when the shared store's current outage began,
    /// plus one (0: none taken; see [`Live::outage_utilization`]).
    outage_units: AtomicU64,
    /// Proxy mode: how long the node took to answer
    /// (`roomrouter_proxy_upstream_response_seconds`). Last, so the new-room pass's cache
    /// line stays as it was.
    pub upstream_response: LatencyCounts,
}

impl Live {
    pub fn admin_state(&self) -> AdminState {
        state_from(self.admin_state.load(Ordering::Relaxed))
    }
    pub fn set_admin_state(&self, s: AdminState) {
        self.admin_state.store(state_to(s), Ordering::Relaxed)
    }
    pub fn self_state(&self) -> AdminState {
        state_from(self.self_state.load(Ordering::Relaxed))
    }
    /// The stricter of the admin's and the node's own state.
    pub fn effective_state(&self) -> AdminState {
        self.admin_state().stricter(self.self_state())
    }
    pub fn last_heartbeat(&self) -> Option<Millis> {
        match self.last_heartbeat.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }
    fn reported_units(&self) -> f64 {
        f64::from_bits(self.reported_units.load(Ordering::Relaxed))
    }
    pub fn reported_load(&self) -> f64 {
        f64::from_bits(self.reported_load.load(Ordering::Relaxed))
    }
    pub fn reported_cpu(&self) -> Option<f64> {
        let v = f64::from_bits(self.reported_cpu.load(Ordering::Relaxed));
        (v >= 0.0).then_some(v)
    }
    pub fn pending_units(&self) -> f64 {
        self.pending_milli.load(Ordering::Relaxed) as f64 / MILLI
    }
    pub fn reserved_units(&self) -> f64 {
        self.reserved_milli.load(Ordering::Relaxed).max(0) as f64 / MILLI
    }
    /// What the other routers reserved here (shared reservations).
    pub fn others_reserved_units(&self) -> f64 {
        self.others_reserved_milli.load(Ordering::Relaxed).max(0) as f64 / MILLI
    }
    pub(crate) fn set_others_reserved_milli(&self, milli: i64) {
        let before = self.others_reserved_milli.swap(milli, Ordering::Relaxed);
        self.counted_reserved_milli
            .fetch_add(milli - before, Ordering::Relaxed);
    }

    /// This router's reservation here (x1000) if it changed since the last call that took
    /// it (or, with `again`, if it is not zero): what to tell the other routers next. One
    /// caller (the sharing task); a node with nothing new costs two loads and no write.
    pub(crate) fn reserved_to_share(&self, again: bool) -> Option<i64> {
        let now = self.reserved_milli.load(Ordering::Relaxed).max(0);
        if now == self.shared_reserved_milli.load(Ordering::Relaxed) && !(again && now != 0) {
            return None;
        }
        self.shared_reserved_milli.store(now, Ordering::Relaxed);
        Some(now)
    }

    /// Records a heartbeat's load report; `pending` starts again from zero.
    pub fn record_report(
        &self,
        capacity: f64,
        load: f64,
        cpu: Option<f64>,
        own_state: AdminState,
        now: Millis,
    ) {
        let _writing = self.reporting.lock().unwrap_or_else(|p| p.into_inner());
        self.write_report(capacity, load, cpu, own_state, now);
    }

    /// Records a report another router relayed, made at `at`, unless this router holds one
    /// as new (or forgot one as new: [`Live::newest_report`]); false if it was older news.
    /// The check and the write are one step against every other report's write: checked
    /// apart, a report this router recorded in between (its own heartbeat, or another
    /// relay) was overwritten by the older one, its heartbeat time moved back and its load
    /// and state (a `draining` just reported) undone until the next report.
    pub fn record_report_if_newer(
        &self,
        capacity: f64,
        load: f64,
        cpu: Option<f64>,
        own_state: AdminState,
        at: Millis,
    ) -> bool {
        let _writing = self.reporting.lock().unwrap_or_else(|p| p.into_inner());
        if self.newest_report() >= at {
            return false;
        }
        self.write_report(capacity, load, cpu, own_state, at);
        true
    }

    fn write_report(
        &self,
        capacity: f64,
        load: f64,
        cpu: Option<f64>,
        own_state: AdminState,
        now: Millis,
    ) {
        let units = load.max(cpu.unwrap_or(0.0) * capacity);
        self.reported_units
            .store(units.to_bits(), Ordering::Relaxed);
        self.reported_load.store(load.to_bits(), Ordering::Relaxed);
        self.reported_cpu
            .store(cpu.unwrap_or(-1.0).to_bits(), Ordering::Relaxed);
        self.self_state
            .store(state_to(own_state), Ordering::Relaxed);
        self.pending_milli.store(0, Ordering::Relaxed);
        // The word first: a check that sees this report's heartbeat time sees its word too
        // ([`Live::forget_heartbeat_if_not_after`]).
        self.last_word.fetch_max(now, Ordering::AcqRel);
        self.last_heartbeat.store(now.max(1), Ordering::Release);
    }

    /// This router's admin registered (or updated) the node by hand at `at`: word of the
    /// node, as a report is ([`Live::last_word`]). (Another router's registration, relayed,
    /// carries no time, and the re-sync reads it again at every interval: it does not count.)
    pub fn note_registered(&self, at: Millis) {
        self.last_word.fetch_max(at, Ordering::AcqRel);
    }

    /// A report of the node made at `at` is being recorded: its word counts from here, before
    /// the report reaches the entry, so that a sweep forgetting silent nodes meanwhile
    /// (`placement.forget_node_after`, which checks the word under the table's lock) keeps
    /// the node rather than drop it under the report.
    pub fn hear(&self, at: Millis) {
        self.last_word.fetch_max(at, Ordering::AcqRel);
    }

    /// The newest report of the node this router has had (its own heartbeat or a relayed
    /// one, kept or forgotten since) or this router's admin registering it, whichever is later;
    /// 0 if none. Times a hold gave the heartbeat ([`Live::hold_heartbeat`]) do not count:
    /// they are no word from the node. A removal decided before it is older news.
    pub fn last_word(&self) -> Millis {
        self.last_word.load(Ordering::Acquire)
    }

    /// Keeps the node counted as heard from at `at` without a report (load, pending and
    /// states unchanged). Used while the shared store is down, so a router does not declare
    /// dead the nodes it only heard of through the store, and over a pause of the router.
    /// A heartbeat forgotten meanwhile (0: a probe or the proxy found the node dead between
    /// the caller's read and this hold) stays forgotten, in the same atomic step: raised,
    /// it would bring back a node just found dead, and hold it healthy for the outage.
    pub fn hold_heartbeat(&self, at: Millis) {
        let at = at.max(1);
        let _ = self
            .last_heartbeat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t != 0 && t < at).then_some(at)
            });
    }

    /// Brings a heartbeat time later than `now` back to `now`: after the wall clock steps
    /// backwards, the times taken before the step lie in the future and would keep the node
    /// healthy until the clock caught up with them, whether it still reports or not. The
    /// sweep calls it, so a step costs at most a sweep interval on top of the timeout.
    /// The forgotten heartbeat and the last word of the node come back too: left in the
    /// future, they would have every relayed report refused as old news
    /// ([`Live::newest_report`]), and every removal ignored as older than the node's last
    /// word, until the clock caught up with them.
    pub fn clamp_heartbeat(&self, now: Millis) {
        // Read first: at every sweep, with no step to undo, a write would take the node's
        // line (which the new-room pass reads) from every core for nothing.
        let clamp = |a: &AtomicU64, to: Millis| {
            if a.load(Ordering::Acquire) > to {
                a.fetch_min(to, Ordering::AcqRel);
            }
        };
        clamp(&self.last_heartbeat, now.max(1));
        clamp(&self.forgotten, now);
        clamp(&self.last_word, now);
    }

    /// Marks the node as not heard from (used by tests and by passive and active health
    /// checks) until its next report: one made after the one forgotten.
    pub fn forget_heartbeat(&self) {
        let t = self.last_heartbeat.swap(0, Ordering::AcqRel);
        self.forgotten.fetch_max(t, Ordering::AcqRel);
    }

    /// [`Live::forget_heartbeat`] for a check that began at `start`: forgets the last report
    /// only if the node has given no word since ([`Live::last_word`] no later than `start`).
    /// A report made while the check ran (a rebooting node back within a probe's timeout)
    /// outdates the check's verdict, so it stays, where forgetting it would keep the node
    /// unhealthy until the report after. `false` when such a report kept the node. A hold
    /// ([`Live::hold_heartbeat`], every 250 ms during a store outage) is no word from the
    /// node: compared with the heartbeat time it moves, it kept every check that took longer
    /// than that (a lost machine's probe timing out) from ever marking the node.
    pub fn forget_heartbeat_if_not_after(&self, start: Millis) -> bool {
        // Read inside the update: a report that lands meanwhile changes the heartbeat time
        // (the update then runs again) after its word (`record_report`), so it is seen.
        let update = self
            .last_heartbeat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |_| {
                (self.last_word() <= start).then_some(0)
            });
        match update {
            Ok(t) => {
                // The node's own time, not a hold's: a relayed report the node made after
                // its last word but before the hold's time is news, and must not be refused
                // as older than what was forgotten.
                let word = self.last_word();
                self.forgotten
                    .fetch_max(if word > 0 { t.min(word) } else { t }, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether a health check of this router (passive, in proxy mode, or a probe) marked the
    /// node unhealthy and no report came since: this router's own evidence that it fails,
    /// not merely a report it has not heard.
    pub fn marked_by_check(&self) -> bool {
        self.last_heartbeat.load(Ordering::Acquire) == 0
            && self.forgotten.load(Ordering::Acquire) != 0
    }

    /// The newest report time this router has had of the node, kept or forgotten: a
    /// relayed report no newer is old news.
    pub fn newest_report(&self) -> Millis {
        self.last_heartbeat
            .load(Ordering::Acquire)
            .max(self.forgotten.load(Ordering::Acquire))
    }

    /// Adds load units sent to the node since its last heartbeat.
    #[inline]
    pub fn add_pending(&self, units: f64) {
        self.pending_milli
            .fetch_add((units * MILLI) as u64, Ordering::Relaxed);
    }

    /// Adds (or with a negative value, releases) reserved load units.
    pub fn add_reserved(&self, units: i64) {
        self.reserved_milli
            .fetch_add(units * 1000, Ordering::Relaxed);
        self.counted_reserved_milli
            .fetch_add(units * 1000, Ordering::Relaxed);
    }

    /// û for a node of this capacity, leaving out `units` of the reservations: what a
    /// room's own join is measured against, its own outstanding reservation having been
    /// held for it. Summed in whole thousandths, as [`Live::utilization`], so that with
    /// `units = 0` the two agree to the bit.
    pub fn utilization_without(&self, capacity: f64, units: u32) -> f64 {
        let reserved = self.counted_reserved_milli.load(Ordering::Relaxed).max(0)
            - i64::from(units) * MILLI as i64;
        let extra = self.pending_milli.load(Ordering::Relaxed) as f64 + reserved.max(0) as f64;
        (self.reported_units() + extra / MILLI) / capacity
    }

    /// The node reported itself draining with no room (and no ticket for it may arrive) at
    /// `now`: when the run of such reports began (`now` for the first; a time ahead of
    /// `now`, from before a backward step of the wall clock, restarts it).
    pub fn drained_empty_since(&self, now: Millis) -> Millis {
        let since = self.drained_empty.load(Ordering::Relaxed);
        if since == 0 || since > now {
            self.drained_empty.store(now, Ordering::Relaxed);
            now
        } else {
            since
        }
    }

    /// The node reported something else: a room, a ticket on its way, or no drain.
    pub fn not_drained_empty(&self) {
        self.drained_empty.store(0, Ordering::Relaxed);
    }

    /// Whole load units a node of this capacity has left below û = `limit`, joins since
    /// the last report and reservations counted; 0 at or above it (or if û is not a number).
    pub fn headroom_units(&self, capacity: f64, limit: f64) -> u32 {
        let free = (limit - self.utilization(capacity)) * capacity;
        if free >= 1.0 {
            free.floor().min(f64::from(u32::MAX)) as u32
        } else {
            0
        }
    }

    /// û for a node of this capacity as a pinned room's join is judged: reservations (this
    /// router's and, shared, the others') counted only up to `new_room_limit`
    /// ([`NodeView::join_utilization`]). Each counter read once, as [`Live::utilization`]
    /// reads them.
    #[inline]
    pub fn join_utilization(&self, capacity: f64, new_room_limit: f64) -> f64 {
        let reserved = self.counted_reserved_milli.load(Ordering::Relaxed).max(0) as f64;
        let real =
            self.reported_units() + self.pending_milli.load(Ordering::Relaxed) as f64 / MILLI;
        let u = (real + reserved / MILLI) / capacity;
        (real / capacity).max(u.min(new_room_limit))
    }

    /// û for a node of this capacity.
    #[inline]
    pub fn utilization(&self, capacity: f64) -> f64 {
        let extra = self.pending_milli.load(Ordering::Relaxed) as f64
            + self.counted_reserved_milli.load(Ordering::Relaxed).max(0) as f64;
        (self.reported_units() + extra / MILLI) / capacity
    }

    /// The node's own last report as a share of `capacity`, without this router's `pending`
    /// and reservations: what routers that heard the same report agree on.
    pub fn reported_utilization(&self, capacity: f64) -> f64 {
        self.reported_units() / capacity
    }

    /// Notes the node's report as it stands when the shared store's outage begins: the last
    /// state every router shared. During the outage each node's reports reach only the
    /// routers it heartbeats, so routers deciding alone judge it by this one.
    pub fn note_outage_start(&self) {
        self.outage_units.store(
            self.reported_units().to_bits().wrapping_add(1),
            Ordering::Release,
        );
    }

    /// [`Live::reported_utilization`] as of the outage's start ([`Live::note_outage_start`]),
    /// or of the last report for a node first heard since.
    pub fn outage_utilization(&self, capacity: f64) -> f64 {
        match self.outage_units.load(Ordering::Acquire) {
            0 => self.reported_utilization(capacity),
            bits => f64::from_bits(bits.wrapping_sub(1)) / capacity,
        }
    }
}

/// A node as the current snapshot holds it. Cheap to clone (one reference count).
#[derive(Debug, Clone)]
pub struct NodeEntry(Arc<NodeData>);

/// What a [`NodeEntry`] points at.
#[derive(Debug)]
pub struct NodeData {
    pub id: NodeId,
    pub info: NodeInfo,
    pub live: Arc<Live>,
    /// Declared in the config file or registered by an admin (kept when it stops beating).
    pub is_static: bool,
}

impl NodeEntry {
    pub fn new(id: NodeId, info: NodeInfo, live: Arc<Live>, is_static: bool) -> NodeEntry {
        NodeEntry(Arc::new(NodeData {
            id,
            info,
            live,
            is_static,
        }))
    }
}

impl std::ops::Deref for NodeEntry {
    type Target = NodeData;
    #[inline]
    fn deref(&self) -> &NodeData {
        &self.0
    }
}

impl NodeView for NodeEntry {
    #[inline]
    fn node_hash(&self) -> u64 {
        self.id.stable_hash()
    }
    #[inline]
    fn capacity(&self) -> f64 {
        self.info.capacity
    }
    #[inline]
    fn utilization(&self) -> f64 {
        self.live.utilization(self.info.capacity)
    }
    fn shared_utilization(&self) -> f64 {
        self.live.outage_utilization(self.info.capacity)
    }
    #[inline]
    fn join_utilization(&self, new_room_limit: f64) -> f64 {
        self.live
            .join_utilization(self.info.capacity, new_room_limit)
    }
    #[inline]
    fn last_heartbeat(&self) -> Option<Millis> {
        self.live.last_heartbeat()
    }
    #[inline]
    fn state(&self) -> AdminState {
        self.live.effective_state()
    }
    fn region(&self) -> Option<&str> {
        self.info.region.as_deref()
    }
    fn has_tag(&self, tag: &str) -> bool {
        self.info
            .tags
            .binary_search_by(|t| t.as_str().cmp(tag))
            .is_ok()
    }
}

/// A node as a new room's placement pass reads it: what every node is asked (hash, capacity,
/// live counters) packed in one contiguous array, so that a pass over ten thousand nodes
/// streams through memory instead of chasing each node's description. Region and tags,
/// asked only when a request hints them, stay behind the entry.
#[derive(Debug, Clone)]
pub struct Candidate {
    hash: u64,
    capacity: f64,
    live: Arc<Live>,
    entry: NodeEntry,
}

impl Candidate {
    pub fn new(entry: &NodeEntry) -> Candidate {
        Candidate {
            hash: entry.id.stable_hash(),
            capacity: entry.info.capacity,
            live: entry.live.clone(),
            entry: entry.clone(),
        }
    }
}

impl NodeView for Candidate {
    #[inline]
    fn node_hash(&self) -> u64 {
        self.hash
    }
    #[inline]
    fn capacity(&self) -> f64 {
        self.capacity
    }
    #[inline]
    fn utilization(&self) -> f64 {
        self.live.utilization(self.capacity)
    }
    fn shared_utilization(&self) -> f64 {
        self.live.outage_utilization(self.capacity)
    }
    #[inline]
    fn join_utilization(&self, new_room_limit: f64) -> f64 {
        self.live.join_utilization(self.capacity, new_room_limit)
    }
    #[inline]
    fn last_heartbeat(&self) -> Option<Millis> {
        self.live.last_heartbeat()
    }
    #[inline]
    fn state(&self) -> AdminState {
        self.live.effective_state()
    }
    fn region(&self) -> Option<&str> {
        self.entry.region()
    }
    fn has_tag(&self, tag: &str) -> bool {
        self.entry.has_tag(tag)
    }
    #[inline]
    fn warm(&self) {
        // A load whose value nobody waits for: the line is on its way by the time the pass
        // reaches this node.
        std::hint::black_box(self.live.reported_units.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_restricted() {
        assert!(NodeId::parse("media-01.eu_west").is_ok());
        assert!(NodeId::parse("").is_err());
        assert!(NodeId::parse("a b").is_err());
        assert!(NodeId::parse("a/b").is_err());
        // Path segments every HTTP client resolves away: /v1/nodes/../heartbeat.
        assert!(NodeId::parse(".").is_err());
        assert!(NodeId::parse("..").is_err());
        assert!(NodeId::parse("...").is_ok());
        assert!(NodeId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn a_hold_is_no_word_from_the_node_and_does_not_keep_a_failing_check_from_marking_it() {
        let l = Live::default();
        l.record_report(100.0, 0.0, None, AdminState::Active, 1_000);
        // A check begins at 1 500; the store's outage hold moves the heartbeat past it.
        l.hold_heartbeat(2_000);
        assert!(l.forget_heartbeat_if_not_after(1_500));
        assert!(l.marked_by_check());
        assert_eq!(l.last_heartbeat(), None);
        // A report while a later check ran outdates that check.
        l.record_report(100.0, 0.0, None, AdminState::Active, 3_000);
        assert!(!l.forget_heartbeat_if_not_after(2_500));
        assert_eq!(l.last_heartbeat(), Some(3_000));
        // One at or before the check's start does not.
        assert!(l.forget_heartbeat_if_not_after(3_000));
        // What is remembered as forgotten is the node's own last report, not the hold's
        // time: a relayed report it made in between is newer news.
        l.record_report(100.0, 0.0, None, AdminState::Active, 4_000);
        l.hold_heartbeat(5_000);
        assert!(l.forget_heartbeat_if_not_after(4_500));
        assert_eq!(l.newest_report(), 4_000);
    }

    /// A hold keeps a heard node heard; it never brings back one whose heartbeat was
    /// forgotten (a check found it dead between the holder's read and its hold), nor one
    /// never heard of, nor moves a heartbeat back.
    #[test]
    fn a_hold_never_revives_a_node_a_check_found_dead() {
        let l = Live::default();
        l.hold_heartbeat(1_000);
        assert_eq!(l.last_heartbeat(), None, "never heard of");
        l.record_report(100.0, 0.0, None, AdminState::Active, 1_000);
        l.hold_heartbeat(2_000);
        assert_eq!(l.last_heartbeat(), Some(2_000));
        l.hold_heartbeat(1_500);
        assert_eq!(l.last_heartbeat(), Some(2_000), "no step back");
        // The holder read 2 000 (heard), then a probe found the node dead, then it holds.
        l.forget_heartbeat();
        l.hold_heartbeat(2_250);
        assert_eq!(l.last_heartbeat(), None, "the hold revived a dead node");
    }

    /// A relayed report is written only if it is the newest the router has: one that lost
    /// the race to a newer report leaves that report, its time, load and state, as they are.
    #[test]
    fn a_relayed_report_older_than_the_one_held_is_not_written() {
        let l = Live::default();
        l.record_report(100.0, 10.0, None, AdminState::Active, 5_000);
        assert!(!l.record_report_if_newer(100.0, 90.0, None, AdminState::Draining, 4_000));
        assert_eq!(l.last_heartbeat(), Some(5_000));
        assert_eq!(l.self_state(), AdminState::Active);
        assert!(l.record_report_if_newer(100.0, 30.0, None, AdminState::Draining, 6_000));
        assert_eq!(l.last_heartbeat(), Some(6_000));
        assert_eq!(l.self_state(), AdminState::Draining);
    }

    #[test]
    fn routers_deciding_alone_judge_a_node_by_its_report_at_the_outage_start() {
        let l = Live::default();
        l.record_report(100.0, 40.0, None, AdminState::Active, 1);
        assert_eq!(
            l.outage_utilization(100.0),
            0.4,
            "none taken: the last report"
        );
        l.note_outage_start();
        l.record_report(100.0, 90.0, None, AdminState::Active, 2);
        l.add_pending(5.0);
        assert_eq!(
            l.outage_utilization(100.0),
            0.4,
            "only this router heard the 90"
        );
        assert_eq!(l.reported_utilization(100.0), 0.9);
        // An empty node at the start is 0, not "none taken".
        let e = Live::default();
        e.note_outage_start();
        e.record_report(100.0, 90.0, None, AdminState::Active, 2);
        assert_eq!(e.outage_utilization(100.0), 0.0);
    }

    #[test]
    fn utilization_adds_pending_and_reserved_to_the_report() {
        let l = Live::default();
        l.record_report(100.0, 20.0, None, AdminState::Active, 5);
        assert_eq!(l.utilization(100.0), 0.2);
        l.add_pending(1.0);
        l.add_reserved(9);
        assert!((l.utilization(100.0) - 0.3).abs() < 1e-9);
        l.record_report(100.0, 10.0, Some(0.5), AdminState::Active, 6);
        assert!(
            (l.utilization(100.0) - 0.59).abs() < 1e-9,
            "cpu wins, pending reset"
        );
    }

    #[test]
    fn equal_sums_are_equal_utilization_whatever_their_mix() {
        // 6 reported + 1 pending is 7 units, as 7 reported is: one û, so the rule's tie
        // goes to the rendezvous rank (as in the simulator), not to rounding. Two divisions
        // summed gave 0.06999999999999999 against 0.07.
        let mixed = Live::default();
        mixed.record_report(100.0, 6.0, None, AdminState::Active, 5);
        mixed.add_pending(1.0);
        let plain = Live::default();
        plain.record_report(100.0, 7.0, None, AdminState::Active, 5);
        assert_eq!(mixed.utilization(100.0), plain.utilization(100.0));
        let reserved = Live::default();
        reserved.record_report(250.0, 3.0, None, AdminState::Active, 5);
        reserved.add_reserved(10);
        let full = Live::default();
        full.record_report(250.0, 13.0, None, AdminState::Active, 5);
        assert_eq!(reserved.utilization(250.0), full.utilization(250.0));
        assert_eq!(
            reserved.utilization_without(250.0, 0),
            full.utilization(250.0)
        );
    }

    #[test]
    fn utilization_without_a_rooms_own_reservation_is_exact() {
        let l = Live::default();
        l.record_report(10.0, 10.0, None, AdminState::Active, 5);
        l.add_reserved(9);
        assert_eq!(l.utilization_without(10.0, 0), l.utilization(10.0));
        // 1.0 + 0.9 - 0.9 would be 0.9999999999999999, under a join limit of 1.0.
        assert_eq!(l.utilization_without(10.0, 9), 1.0);
        assert_eq!(
            l.utilization_without(10.0, 20),
            1.0,
            "never below the report"
        );
    }

    #[test]
    fn other_routers_reservations_count_and_own_changes_are_shared_once() {
        let l = Live::default();
        l.record_report(100.0, 20.0, None, AdminState::Active, 5);
        l.set_others_reserved_milli(30_000);
        assert!((l.utilization(100.0) - 0.5).abs() < 1e-9);
        assert_eq!(l.others_reserved_units(), 30.0);
        // Nothing reserved yet: nothing to tell, unless asked again (and then only non-zero).
        assert_eq!(l.reserved_to_share(false), None);
        assert_eq!(l.reserved_to_share(true), None);
        l.add_reserved(12);
        assert_eq!(l.reserved_to_share(false), Some(12_000));
        assert_eq!(l.reserved_to_share(false), None, "told once");
        assert_eq!(
            l.reserved_to_share(true),
            Some(12_000),
            "the periodic refresh"
        );
        l.add_reserved(-12);
        assert_eq!(
            l.reserved_to_share(false),
            Some(0),
            "the release is told too"
        );
        assert_eq!(l.reserved_to_share(true), None);
        assert!((l.utilization(100.0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_check_forgets_only_a_heartbeat_no_newer_than_its_start() {
        let l = Live::default();
        l.record_report(1.0, 0.0, None, AdminState::Active, 100);
        // A report made after the check began outdates it: kept, nothing forgotten.
        assert!(!l.forget_heartbeat_if_not_after(99));
        assert_eq!(l.last_heartbeat(), Some(100));
        assert_eq!(l.newest_report(), 100);
        // One made at or before its start is forgotten, as `forget_heartbeat` forgets it.
        assert!(l.forget_heartbeat_if_not_after(100));
        assert_eq!(l.last_heartbeat(), None);
        assert_eq!(
            l.newest_report(),
            100,
            "an older relayed report stays refused"
        );
        assert!(
            l.forget_heartbeat_if_not_after(200),
            "nothing left to forget"
        );
        assert_eq!(l.newest_report(), 100);
    }

    #[test]
    fn own_state_never_lifts_the_admins() {
        let l = Live::default();
        l.set_admin_state(AdminState::Disabled);
        l.record_report(1.0, 0.0, None, AdminState::Active, 1);
        assert_eq!(l.effective_state(), AdminState::Disabled);
        l.set_admin_state(AdminState::Active);
        l.record_report(1.0, 0.0, None, AdminState::Draining, 2);
        assert_eq!(l.effective_state(), AdminState::Draining);
    }
}
