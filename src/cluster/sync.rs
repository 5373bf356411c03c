//! Shared node state: what one router tells the others about nodes, and how a router applies
//! what it hears to its own [`Cluster`].
//!
//! A [`NodeUpdate`] is produced by the router on every heartbeat and admin action and handed
//! to its store ([`crate::store::PinStore::share_node`]); a shared store (Redis) writes it
//! down and publishes it, and every other router applies it with [`apply`]. Applying is
//! idempotent and never moves a node's heartbeat time backwards, so duplicates, reorderings
//! and the periodic full re-sync are harmless.

use std::collections::HashSet;

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
        (self.capacity.is_finite() && self.capacity > 0.0).then(|| NodeInfo {
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
    },
    /// An admin registered or updated the node by hand.
    Put { id: String, info: WireInfo },
    /// An admin drained, disabled or enabled the node.
    Admin { id: String, state: AdminState },
    /// The node left (admin, node, or drained and empty).
    Removed { id: String },
}

impl NodeUpdate {
    /// The update a router shares after applying a heartbeat to `entry`.
    pub fn report(entry: &NodeEntry, now: Millis) -> NodeUpdate {
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
        }
    }

    pub fn id(&self) -> &str {
        match self {
            NodeUpdate::Report { id, .. }
            | NodeUpdate::Put { id, .. }
            | NodeUpdate::Admin { id, .. }
            | NodeUpdate::Removed { id } => id,
        }
    }
}

/// Applies shared updates to one router's node table. Remembers admin states of nodes this
/// router does not know yet, so a drain that arrives before the node's first report holds.
#[derive(Debug, Default)]
pub struct NodeSync {
    admin: DashMap<String, AdminState>,
}

impl NodeSync {
    pub fn new() -> NodeSync {
        NodeSync::default()
    }

    /// Applies one update. Returns false if it was malformed or stale and changed nothing.
    pub fn apply(&self, cluster: &Cluster, u: &NodeUpdate) -> bool {
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
                ..
            } => {
                let Some(info) = info.to_info() else {
                    return false;
                };
                if cluster
                    .snapshot()
                    .get(&id)
                    .and_then(|e| e.live.last_heartbeat())
                    .is_some_and(|t| t >= *at)
                {
                    return false; // this router already has a report as new
                }
                let capacity = info.capacity;
                let (outcome, entry) = cluster.upsert(&id, info, false);
                if outcome == Upsert::Added {
                    if let Some(s) = self.admin.get(id.as_str()) {
                        entry.live.set_admin_state(*s);
                    }
                }
                entry.live.record_report(capacity, *load, *cpu, *state, *at);
                if let Some(rooms) = rooms {
                    let set: HashSet<RoomKey> = rooms
                        .iter()
                        .filter_map(|r| RoomKey::parse(r, Normalization::None).ok())
                        .collect();
                    if let Ok(mut g) = entry.live.reported_rooms.lock() {
                        *g = set;
                    }
                }
                true
            }
            NodeUpdate::Put { info, .. } => match info.to_info() {
                Some(info) => {
                    let (outcome, entry) = cluster.upsert(&id, info, true);
                    if outcome == Upsert::Added {
                        if let Some(s) = self.admin.get(id.as_str()) {
                            entry.live.set_admin_state(*s);
                        }
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
            NodeUpdate::Removed { .. } => {
                self.admin.remove(id.as_str());
                cluster.remove(&id).is_some()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    #[test]
    fn reports_register_nodes_and_never_go_back_in_time() {
        let c = Cluster::new();
        let s = NodeSync::new();
        assert!(s.apply(&c, &report(1000, 10.0)));
        let id = NodeId::parse("n1").unwrap();
        let e = c.snapshot().get(&id).unwrap().clone();
        assert_eq!(e.live.last_heartbeat(), Some(1000));
        assert_eq!(e.live.reported_load(), 10.0);
        assert_eq!(e.live.reported_rooms.lock().unwrap().len(), 1);
        // An older (reordered) report changes nothing.
        assert!(!s.apply(&c, &report(900, 50.0)));
        assert_eq!(e.live.reported_load(), 10.0);
        assert!(s.apply(&c, &report(2000, 30.0)));
        assert_eq!(e.live.reported_load(), 30.0);
    }

    #[test]
    fn admin_state_before_first_report_holds_and_removal_forgets() {
        let c = Cluster::new();
        let s = NodeSync::new();
        s.apply(
            &c,
            &NodeUpdate::Admin {
                id: "n1".into(),
                state: AdminState::Disabled,
            },
        );
        s.apply(&c, &report(1000, 0.0));
        let id = NodeId::parse("n1").unwrap();
        assert_eq!(
            c.snapshot().get(&id).unwrap().live.effective_state(),
            AdminState::Disabled
        );
        assert!(s.apply(&c, &NodeUpdate::Removed { id: "n1".into() }));
        assert!(c.snapshot().get(&id).is_none());
        s.apply(&c, &report(3000, 0.0));
        assert_eq!(
            c.snapshot().get(&id).unwrap().live.effective_state(),
            AdminState::Active
        );
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
        assert!(!NodeSync::new().apply(&c, &bad));
        let zero = NodeUpdate::Put {
            id: "n".into(),
            info: info(0.0),
        };
        assert!(!NodeSync::new().apply(&c, &zero));
        assert!(c.is_empty());
    }
}
