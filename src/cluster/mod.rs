//! The node table: who the nodes are, their admin states and live load.
//!
//! Readers (every placement decision) take an immutable [`Snapshot`] through `arc-swap`: no
//! lock, no allocation. Heartbeats update a node's live counters in place (atomics); only a
//! change of membership or of a node's description (url, capacity, region, tags) builds and
//! publishes a new snapshot, under a writers-only mutex.

mod node;
pub mod recent;
pub mod reservations;
pub mod sync;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

pub use node::{Candidate, Live, NodeData, NodeEntry, NodeId, NodeIdError, NodeInfo, MAX_NODE_ID};

use crate::placement::AdminState;

/// Node ids hash to their (already uniform) XXH3 value; the index uses it as is.
#[derive(Default)]
struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdIndex = HashMap<NodeId, usize, BuildHasherDefault<IdentityHasher>>;

/// An immutable view of the node table.
#[derive(Debug, Default)]
pub struct Snapshot {
    nodes: Vec<NodeEntry>,
    /// The same nodes, in the same order, as placement reads them.
    candidates: Vec<Candidate>,
    index: IdIndex,
}

impl Snapshot {
    fn new(mut nodes: Vec<NodeEntry>) -> Snapshot {
        nodes.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let candidates = nodes.iter().map(Candidate::new).collect();
        Snapshot {
            nodes,
            candidates,
            index,
        }
    }

    /// All nodes, sorted by id.
    pub fn nodes(&self) -> &[NodeEntry] {
        &self.nodes
    }

    /// All nodes as [`Candidate`]s, in the order of [`Snapshot::nodes`]: what placement
    /// decides over (its indexes point into both slices).
    #[inline]
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// Position of a node in [`Snapshot::nodes`].
    #[inline]
    pub fn position(&self, id: &NodeId) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn get(&self, id: &NodeId) -> Option<&NodeEntry> {
        self.position(id).map(|i| &self.nodes[i])
    }
}

impl std::fmt::Debug for IdentityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHasher")
    }
}

/// Checks a node URL: absolute http(s) with a host, kept as given, so it must already be
/// in the form a `Location` header and a request line carry. (`Url::parse` would accept,
/// and quietly clean up, a trailing newline, a space, an international host name: the
/// string stored would then fail every redirect and every proxied request to the node.)
pub fn check_url(s: &str) -> Result<(), String> {
    if s.parse::<http::Uri>().is_err() {
        return Err(
            "must be a plain URL: no spaces or control characters, non-ASCII \
                    percent-encoded, an international host name in its xn-- form"
                .into(),
        );
    }
    let u = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err("must be an http:// or https:// URL".into());
    }
    if u.host_str().is_none_or(|h| h.is_empty()) {
        return Err("must name a host".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("must not carry a query or fragment".into());
    }
    Ok(())
}

/// Most tags a node (or a join's hints) may carry.
pub const MAX_TAGS: usize = 32;
/// Largest capacity or load a node may report, in load units (a trillion participants):
/// far past any media server, and small enough that sums over a cluster and the weights
/// the placement takes from them stay finite and exact enough to compare.
pub const MAX_UNITS: f64 = 1e12;
/// Longest region, tag or other label, in bytes.
pub const MAX_LABEL: usize = 64;

/// Checks a label (a region, a tag): 1-[`MAX_LABEL`] bytes, no control characters. The
/// error names `key`.
pub fn check_label(key: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_LABEL || v.chars().any(char::is_control) {
        return Err(format!("{key} must be 1-{MAX_LABEL} printable characters"));
    }
    Ok(())
}

/// Checks a node's region and tags as a heartbeat, a `PUT` and `[[nodes]]` all must have
/// them: one rule, so that what the config accepts a heartbeat that keeps it never refuses.
pub fn check_region_and_tags(region: Option<&str>, tags: &[String]) -> Result<(), String> {
    if let Some(r) = region {
        check_label("region", r)?;
    }
    if tags.len() > MAX_TAGS {
        return Err(format!("at most {MAX_TAGS} tags"));
    }
    for t in tags {
        check_label("tag", t)?;
    }
    Ok(())
}

/// The registry: a published snapshot plus the writers' mutex.
#[derive(Debug, Default)]
pub struct Cluster {
    snapshot: ArcSwap<Snapshot>,
    /// Taken by every writer.
    writers: Mutex<Writers>,
}

/// What only writers touch, under [`Cluster`]'s mutex.
#[derive(Debug, Default)]
struct Writers {
    /// The admin states (drain, disable) of nodes removed while under one: a node that
    /// comes back under its id gets its admin's state back, so neither leaving (on its own,
    /// or removed once drained) nor returning lifts it; only an admin's `enable` does.
    removed: HashMap<NodeId, AdminState>,
    /// How many admin-state changes were made ([`Cluster::admin_mark`]), and the number of
    /// each node's latest: a state read from a shared store before a change is older than
    /// it ([`Cluster::set_admin_state_unless_changed`]).
    admin_changes: u64,
    admin_changed: HashMap<NodeId, u64>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Added,
    Updated,
    Unchanged,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::default()
    }

    /// The current snapshot; cheap, lock-free.
    #[inline]
    pub fn snapshot(&self) -> Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// An owned handle on the current snapshot, for work that spans awaits.
    pub fn snapshot_arc(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Adds a node or updates its description, keeping its live counters and admin state.
    pub fn upsert(&self, id: &NodeId, info: NodeInfo, is_static: bool) -> (Upsert, NodeEntry) {
        if let Some(e) = self.snapshot().get(id) {
            if e.info == info && (e.is_static || !is_static) {
                return (Upsert::Unchanged, e.clone());
            }
        }
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.snapshot.load_full();
        let mut nodes = cur.nodes.clone();
        let (outcome, entry) = match cur.position(id) {
            Some(i) => {
                let old = &nodes[i];
                if old.info == info && (old.is_static || !is_static) {
                    return (Upsert::Unchanged, old.clone());
                }
                let e = NodeEntry::new(
                    old.id.clone(),
                    info,
                    old.live.clone(),
                    old.is_static || is_static,
                );
                nodes[i] = e.clone();
                (Upsert::Updated, e)
            }
            None => {
                let live = Live::default();
                if let Some(s) = w.removed.remove(id) {
                    live.set_admin_state(s);
                }
                let e = NodeEntry::new(id.clone(), info, Arc::new(live), is_static);
                nodes.push(e.clone());
                (Upsert::Added, e)
            }
        };
        self.snapshot.store(Arc::new(Snapshot::new(nodes)));
        (outcome, entry)
    }

    /// Removes a node. Its rooms are re-placed on their next join.
    pub fn remove(&self, id: &NodeId) -> Option<NodeEntry> {
        self.remove_if(id, |_| true)
    }

    /// [`Cluster::remove`], if `still` holds of the node under the writers' lock (a check
    /// made on a snapshot may be out of date by then).
    pub fn remove_if(
        &self,
        id: &NodeId,
        still: impl FnOnce(&NodeEntry) -> bool,
    ) -> Option<NodeEntry> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.snapshot.load_full();
        let i = cur.position(id)?;
        if !still(&cur.nodes[i]) {
            return None;
        }
        let mut nodes = cur.nodes.clone();
        let gone = nodes.remove(i);
        let state = gone.live.admin_state();
        if state != AdminState::Active {
            w.removed.insert(gone.id.clone(), state);
        }
        self.snapshot.store(Arc::new(Snapshot::new(nodes)));
        Some(gone)
    }

    /// Sets a node's admin state; false if the node is unknown. For a node removed under
    /// an admin state (another router's admin acting on it), the state it comes back with.
    pub fn set_admin_state(&self, id: &NodeId, state: AdminState) -> bool {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        self.set_admin_state_locked(&mut w, id, state)
    }

    /// [`Cluster::set_admin_state`], then `then` (when the node is known) before the change
    /// is visible to [`Cluster::admin_mark`]: a mark that counts this change is taken after
    /// `then` returned. A router shares its admin's change with the other routers here, so
    /// that a shared store's re-sync that read the store before the change was written
    /// either finds it in flight or has a mark older than it; sharing after this returned
    /// left a moment in which neither held, and a re-sync undid the drain for up to
    /// `store.resync_interval`. `then` must not call back into this cluster's writers.
    ///
    /// Unlike [`Cluster::set_admin_state`] (news from another router), a node this router
    /// neither lists nor keeps a state for is left alone: this is this router's admin
    /// acting, who is told the node is not found. A node that left under a drain or disable
    /// (forgotten for its silence, say) has that state kept for its return, and this admin
    /// may change it (`enable` clears it); false for the node then too, as it is not listed.
    /// Returns whether the node is listed, `None` if it is unknown.
    pub fn set_admin_state_then(
        &self,
        id: &NodeId,
        state: AdminState,
        then: impl FnOnce(),
    ) -> Option<bool> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if self.snapshot().get(id).is_none() && !w.removed.contains_key(id) {
            return None;
        }
        let listed = self.set_admin_state_locked(&mut w, id, state);
        then();
        Some(listed)
    }

    /// A mark in the order of admin-state changes: every change made after this call is
    /// newer than it ([`Cluster::set_admin_state_unless_changed`]).
    pub fn admin_mark(&self) -> u64 {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admin_changes
    }

    /// Sets a node's admin state as read before `mark` (a shared store's re-sync), unless
    /// it was changed since (by this router's admin or by news from another router): that
    /// change is at least as new as the read, which must not undo it. True if set.
    pub fn set_admin_state_unless_changed(
        &self,
        id: &NodeId,
        state: AdminState,
        mark: u64,
    ) -> bool {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if w.admin_changed.get(id).is_some_and(|&n| n > mark) {
            return false;
        }
        self.set_admin_state_locked(&mut w, id, state);
        true
    }

    fn set_admin_state_locked(&self, w: &mut Writers, id: &NodeId, state: AdminState) -> bool {
        w.admin_changes += 1;
        let n = w.admin_changes;
        // At most one entry per node this router ever heard an admin state of: the admin
        // hash holds one per node as well.
        w.admin_changed.insert(id.clone(), n);
        match self.snapshot().get(id) {
            Some(e) => {
                e.live.set_admin_state(state);
                true
            }
            None => {
                // Kept for a node never listed here too: news of another router's admin (or
                // the re-sync) can come before the node's first report reaches this router,
                // whose own heartbeat then added it as active, open to new rooms, until the
                // next re-sync.
                if state == AdminState::Active {
                    w.removed.remove(id);
                } else {
                    w.removed.insert(id.clone(), state);
                }
                false
            }
        }
    }

    /// The admin state a removed (or never seen) node comes back with: `Active` unless it
    /// was removed under an admin's drain or disable.
    pub fn removed_state(&self, id: &NodeId) -> AdminState {
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.removed.get(id).copied().unwrap_or(AdminState::Active)
    }

    pub fn len(&self) -> usize {
        self.snapshot().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cap: f64) -> NodeInfo {
        NodeInfo {
            url: "http://127.0.0.1:9000".into(),
            upstream: "http://127.0.0.1:9000".into(),
            capacity: cap,
            region: None,
            tags: vec![],
        }
    }

    #[test]
    fn upsert_keeps_live_counters_and_admin_state() {
        let c = Cluster::new();
        let id = NodeId::parse("a").unwrap();
        let (o, e) = c.upsert(&id, info(10.0), false);
        assert_eq!(o, Upsert::Added);
        e.live.add_pending(3.0);
        c.set_admin_state(&id, AdminState::Draining);
        assert_eq!(c.upsert(&id, info(10.0), false).0, Upsert::Unchanged);
        let (o, e2) = c.upsert(&id, info(20.0), false);
        assert_eq!(o, Upsert::Updated);
        assert_eq!(e2.live.pending_units(), 3.0);
        assert_eq!(e2.live.admin_state(), AdminState::Draining);
        assert_eq!(c.snapshot().get(&id).unwrap().info.capacity, 20.0);
    }

    #[test]
    fn an_admin_state_outlives_the_nodes_removal() {
        let c = Cluster::new();
        let (a, b) = (NodeId::parse("a").unwrap(), NodeId::parse("b").unwrap());
        c.upsert(&a, info(10.0), false);
        c.upsert(&b, info(10.0), false);
        c.set_admin_state(&a, AdminState::Disabled);
        assert!(c.remove(&a).is_some() && c.remove(&b).is_some());
        let (_, back) = c.upsert(&a, info(10.0), false);
        assert_eq!(back.live.admin_state(), AdminState::Disabled);
        let (_, other) = c.upsert(&b, info(10.0), false);
        assert_eq!(other.live.admin_state(), AdminState::Active);
        // Enabled (by another router's admin) while away: back as active.
        c.remove(&a);
        assert!(!c.set_admin_state(&a, AdminState::Active));
        let (_, back) = c.upsert(&a, info(10.0), false);
        assert_eq!(back.live.admin_state(), AdminState::Active);
    }

    #[test]
    fn an_admin_state_heard_before_the_nodes_first_report_holds_when_it_comes() {
        // Another router's admin disabled a node this router has never listed; then the
        // node's first report reaches this router.
        let c = Cluster::new();
        let x = NodeId::parse("x").unwrap();
        assert!(!c.set_admin_state(&x, AdminState::Disabled));
        let (o, e) = c.upsert(&x, info(10.0), false);
        assert_eq!(o, Upsert::Added);
        assert_eq!(e.live.admin_state(), AdminState::Disabled);
        // As for the re-sync's read of the admin states.
        let y = NodeId::parse("y").unwrap();
        assert!(c.set_admin_state_unless_changed(&y, AdminState::Draining, c.admin_mark()));
        assert_eq!(
            c.upsert(&y, info(10.0), false).1.live.admin_state(),
            AdminState::Draining
        );
    }

    #[test]
    fn a_mark_that_counts_an_admin_change_is_taken_after_the_change_was_shared() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let c = Arc::new(Cluster::new());
        let a = NodeId::parse("a").unwrap();
        c.upsert(&a, info(10.0), false);
        let before = c.admin_mark();
        let numbered = Arc::new(std::sync::Barrier::new(2));
        let shared = Arc::new(AtomicBool::new(false));
        // A re-sync takes its mark while the admin's change is being shared.
        let resync = {
            let (c, numbered, shared) = (c.clone(), numbered.clone(), shared.clone());
            std::thread::spawn(move || {
                numbered.wait();
                let mark = c.admin_mark();
                (mark, shared.load(Ordering::SeqCst))
            })
        };
        let listed = c.set_admin_state_then(&a, AdminState::Draining, || {
            numbered.wait();
            // However slow the sharing, the re-sync's mark waits for it.
            std::thread::sleep(std::time::Duration::from_millis(50));
            shared.store(true, Ordering::SeqCst);
        });
        assert_eq!(listed, Some(true));
        let (mark, was_shared) = resync.join().unwrap();
        assert!(mark > before, "the mark counts the change");
        assert!(was_shared, "a mark counting the change saw it shared");
        // So a read from before the change, applied under that mark, finds it in flight
        // (the store's check); one under an older mark is refused here.
        assert!(!c.set_admin_state_unless_changed(&a, AdminState::Active, before));
        assert_eq!(
            c.snapshot().get(&a).unwrap().live.admin_state(),
            AdminState::Draining
        );
        // An unknown node is not shared.
        let mut called = false;
        let z = NodeId::parse("z").unwrap();
        let listed = c.set_admin_state_then(&z, AdminState::Draining, || called = true);
        assert_eq!(listed, None);
        assert!(!called);
    }

    #[test]
    fn snapshots_are_sorted_and_indexed() {
        let c = Cluster::new();
        for n in ["c", "a", "b"] {
            c.upsert(&NodeId::parse(n).unwrap(), info(1.0), false);
        }
        let s = c.snapshot();
        let ids: Vec<&str> = s.nodes().iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(s.position(&NodeId::parse("b").unwrap()), Some(1));
        assert!(c.remove(&NodeId::parse("b").unwrap()).is_some());
        assert_eq!(c.snapshot().position(&NodeId::parse("c").unwrap()), Some(1));
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://media-1.example.org").is_ok());
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url("http://x/?a=b").is_err());
        // What `Url::parse` would clean up is refused: the string is used as given.
        for unusable in [
            "http://media-1:8080\n",
            " http://media-1:8080",
            "http://media-1/me dia",
            "http://mé.example.org",
            "http://media-1:8080/\tx",
        ] {
            assert!(check_url(unusable).is_err(), "{unusable:?}");
        }
        assert!(check_url("http://xn--m-bga.example.org/me%20dia").is_ok());
    }
}
