//! The placement rules of `placement.md`, as pure functions.
//!
//! Nothing here does I/O, reads a clock or takes a lock: the caller hands in a view of the
//! nodes (anything implementing [`NodeView`]), the room's pin if it has one, hints, and the
//! current time. [`decide`] is the hot path: for a pinned room it looks at one node; for a new
//! room it makes one pass over the nodes, keeping the best two candidates, and allocates
//! nothing. [`explain`] is the slow, allocating twin used by the admin API.

pub mod hash;
pub mod reservation;
pub mod rule;

use rendezvous_hash::{Capacity, IdNode, Node, WeightedNode};
use serde::{Deserialize, Serialize};

use hash::{NodeHash, RoomHash, StableNodeHasher};
pub use rule::ChoiceRule;
use rule::{Bar, Ranked, Tracker};

/// Milliseconds since the Unix epoch. Time is always passed in, never read here.
pub type Millis = u64;

/// A node's admin state. Ordered from least to most strict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes new rooms and joins.
    Active,
    /// Keeps its rooms and their joins; takes no new rooms.
    Draining,
    /// Takes nothing; its rooms are re-placed on their next join.
    Disabled,
}

impl AdminState {
    /// The stricter of two states: a node's own report never lifts an admin's decision.
    pub fn stricter(self, other: AdminState) -> AdminState {
        self.max(other)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }
}

/// What placement needs to know about one node.
pub trait NodeView {
    /// Stable hash of the node id ([`hash::node_hash`]).
    fn node_hash(&self) -> u64;
    /// Capacity in load units, > 0.
    fn capacity(&self) -> f64;
    /// Estimated utilization û: last report plus what was sent and reserved since.
    fn utilization(&self) -> f64;
    /// The node's report as every router shared it last, without what this router sent
    /// and reserved since: for a router's node table, the report as it stood when the shared
    /// store's outage began (`Live::outage_utilization`), since during the outage each
    /// node's reports reach only the routers it heartbeats. What [`choose_alone`] judges
    /// nodes by. A view that keeps no such counters has û.
    #[inline]
    fn shared_utilization(&self) -> f64 {
        self.utilization()
    }
    /// û as a pinned room's join is judged ([`pin_holds`]): reservations (expected sizes of
    /// new rooms not yet arrived) counted only up to `new_room_limit`,
    /// `max(û - reserved, min(û, new_room_limit))`. A view without reservations has û.
    #[inline]
    fn join_utilization(&self, _new_room_limit: f64) -> f64 {
        self.utilization()
    }
    /// Time of the last heartbeat, if any.
    fn last_heartbeat(&self) -> Option<Millis>;
    /// Effective admin state (the stricter of the admin's and the node's own).
    fn state(&self) -> AdminState;
    fn region(&self) -> Option<&str>;
    fn has_tag(&self, tag: &str) -> bool;
    /// A hint that the pass will read this node soon (a view whose counters live behind a
    /// pointer starts loading them); no effect on any result.
    #[inline]
    fn warm(&self) {}
}

/// How many nodes ahead the pass warms (see [`NodeView::warm`]), in clusters of more than
/// `WARM_FROM` nodes (smaller ones stay in cache, and the hint would only cost).
const WARM_AHEAD: usize = 8;
const WARM_FROM: usize = 256;

/// Tunables of the rules; see `placement.md` for their meaning and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub new_room_limit: f64,
    pub join_limit: f64,
    pub heartbeat_timeout_ms: u64,
    pub region_affinity: bool,
    pub rule: ChoiceRule,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            new_room_limit: 0.80,
            join_limit: 1.00,
            heartbeat_timeout_ms: 6_000,
            region_affinity: true,
            rule: ChoiceRule::LeastLoaded,
        }
    }
}

/// Request hints for a new room.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints<'a> {
    pub region: Option<&'a str>,
    pub tags: &'a [String],
    /// Load units the room is expected to bring (the size it will reserve; 0 if unknown).
    /// The rules compare candidates by their utilization with it added, so on nodes of
    /// unequal capacity a big room goes where it takes the smallest share; on equal nodes
    /// this adds the same to every candidate and changes nothing.
    pub expected_load: f64,
}

impl Hints<'_> {
    /// Node `n`'s utilization `u` once the room's expected load is placed on it: what the
    /// rules compare.
    #[inline]
    fn with_room<N: NodeView + ?Sized>(&self, n: &N, u: f64) -> f64 {
        u + self.expected_load / n.capacity()
    }
}

/// The outcome of [`decide`]. Indexes point into the node slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The room's pin holds: join this node.
    Pinned(usize),
    /// The room is pinned to a node at or above `join_limit`: refuse, never send elsewhere.
    NodeFull(usize),
    /// The room needs a (new) node: this one.
    Place { node: usize, overflow: bool },
    /// No node can take the room.
    NoCapacity,
}

/// Whether a node counts as alive at `now`.
#[inline]
pub fn is_healthy<N: NodeView + ?Sized>(node: &N, now: Millis, timeout_ms: u64) -> bool {
    match node.last_heartbeat() {
        Some(t) => now < t.saturating_add(timeout_ms),
        None => false,
    }
}

/// Decides where a join for a room goes.
///
/// `pinned` is the index of the room's pinned node if the pin names a known node; a pin to an
/// unknown node is passed as `None` and the room is re-placed.
pub fn decide<N: NodeView>(
    nodes: &[N],
    pinned: Option<usize>,
    room: u64,
    hints: &Hints<'_>,
    now: Millis,
    p: &Params,
) -> Decision {
    pinned_holds(nodes, pinned, now, p).unwrap_or_else(|| choose(nodes, room, hints, now, p))
}

/// [`decide`] for a router deciding alone (the shared store down): a pin that holds as
/// there, a room without one by [`choose_alone`].
pub fn decide_alone<N: NodeView>(
    nodes: &[N],
    pinned: Option<usize>,
    room: u64,
    hints: &Hints<'_>,
    now: Millis,
    p: &Params,
) -> Decision {
    pinned_holds(nodes, pinned, now, p).unwrap_or_else(|| choose_alone(nodes, room, hints, now, p))
}

/// The decision for the room's pinned node `pinned`, if the pin holds ([`pin_holds`]).
fn pinned_holds<N: NodeView>(
    nodes: &[N],
    pinned: Option<usize>,
    now: Millis,
    p: &Params,
) -> Option<Decision> {
    let i = pinned?;
    Some(match pin_holds(nodes.get(i)?, now, p)? {
        PinHold::Join => Decision::Pinned(i),
        PinHold::Full => Decision::NodeFull(i),
    })
}

/// What a room's pin to a live node means for a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinHold {
    /// The join goes to the pinned node.
    Join,
    /// The pinned node is at or above `join_limit`: refuse, never send elsewhere.
    Full,
}

/// The pinned-room half of [`decide`], for one node: `None` if the pin no longer holds
/// (the node is unhealthy or disabled) and the room must be re-placed. Draining nodes and
/// nodes above `new_room_limit` keep their rooms.
///
/// Reservations count against a pinned room's join only up to `new_room_limit`, however
/// many there are: a forecast turns new rooms away from the node, never the meetings
/// already on it. Anyone may send a size hint (`?size=`), and hints placed at once, on
/// one router or several sharing their reservations, each reserving the headroom it saw,
/// would otherwise add up past `join_limit` and refuse those meetings' joins.
#[inline]
pub fn pin_holds<N: NodeView + ?Sized>(n: &N, now: Millis, p: &Params) -> Option<PinHold> {
    if !is_healthy(n, now, p.heartbeat_timeout_ms) || n.state() == AdminState::Disabled {
        return None;
    }
    Some(if n.join_utilization(p.new_room_limit) >= p.join_limit {
        PinHold::Full
    } else {
        PinHold::Join
    })
}

/// The rendezvous score of a node for a room with weight `w`, by the `rendezvous_hash` crate's
/// logarithmic method (higher is better): the reference [`raw_score`] is tested against.
pub fn crate_score(room: u64, node_hash: u64, w: f64) -> rendezvous_hash::types::SignPositiveF64 {
    let cap = Capacity::new(w.max(f64::MIN_POSITIVE)).unwrap_or_else(|| {
        // w is finite and positive here; MIN_POSITIVE is normal, so this is unreachable.
        Capacity::new(f64::MIN_POSITIVE).expect("MIN_POSITIVE is a normal float")
    });
    WeightedNode::new(IdNode::new(NodeHash(node_hash)), cap)
        .hash_code(&StableNodeHasher, &RoomHash(room))
}

/// The crate's weighted score as a plain float, `ln(h / u64::MAX) / w`: the same operations
/// in the same order as [`crate_score`], so the same bits (tested), with the logarithm taken
/// once. The crate keeps its value private, which would otherwise cost a second logarithm
/// per ranked node for the pruning bound.
#[inline]
pub fn raw_score(room: u64, node_hash: u64, w: f64) -> f64 {
    let h = hash::pair_hash(room, node_hash) as f64 / u64::MAX as f64;
    h.ln() / w.max(f64::MIN_POSITIVE)
}

/// A ranked candidate: its weighted rendezvous score and what the rules compare (its
/// utilization with the room's expected load added).
#[inline]
fn ranked(index: usize, room: u64, node_hash: u64, w: f64, util: f64) -> Ranked {
    Ranked {
        index,
        raw: raw_score(room, node_hash, w),
        tiebreak: node_hash,
        util,
    }
}

/// True if a node (weight `w`) provably cannot matter to the rule. For a score bar it uses
/// `ln(x) <= x - 1` on the pair hash, so the logarithm is only taken for nodes that might
/// rank where the rule looks (for the top two: about 2/n of n nodes); the least-loaded rule
/// skips more loaded nodes without hashing at all. Exact: never prunes a winner.
#[inline]
fn cannot_matter(bar: Bar, room: u64, node_hash: u64, w: f64) -> bool {
    match bar {
        Bar::Take => false,
        Bar::Skip => true,
        Bar::Score(bar) => {
            let x = hash::pair_hash(room, node_hash) as f64 / u64::MAX as f64;
            // The weight as `raw_score` divides by it: with a smaller one (a subnormal
            // weight, from a node's tiny capacity) the bound fell below the score it bounds.
            (x - 1.0) / w.max(f64::MIN_POSITIVE) < bar
        }
    }
}

/// The same ranking as a plain number, `-w / ln(h)` with `h` in (0,1), for humans.
pub fn numeric_score(room: u64, node_hash: u64, w: f64) -> f64 {
    let h = hash::pair_hash(room, node_hash) as f64 / u64::MAX as f64;
    -w / h.ln()
}

#[inline]
fn base_eligible<N: NodeView>(n: &N, hints: &Hints<'_>, now: Millis, p: &Params) -> bool {
    n.state() == AdminState::Active
        && is_healthy(n, now, p.heartbeat_timeout_ms)
        && hints.tags.iter().all(|t| n.has_tag(t))
}

/// Picks a node for a room without a usable pin. One pass; a second pass only on overflow.
pub fn choose<N: NodeView>(
    nodes: &[N],
    room: u64,
    hints: &Hints<'_>,
    now: Millis,
    p: &Params,
) -> Decision {
    let prefer_region = if p.region_affinity {
        hints.region
    } else {
        None
    };
    let mut all = Tracker::default();
    let mut local = Tracker::default();
    let mut overflow_exists = false;
    let warm = nodes.len() > WARM_FROM;
    for (i, n) in nodes.iter().enumerate() {
        if warm {
            if let Some(ahead) = nodes.get(i + WARM_AHEAD) {
                ahead.warm();
            }
        }
        if !base_eligible(n, hints, now, p) {
            continue;
        }
        let u = n.utilization();
        if u < p.new_room_limit {
            let w = n.capacity() * (p.new_room_limit - u);
            let after = hints.with_room(n, u);
            let in_region = prefer_region.is_some() && n.region() == prefer_region;
            if cannot_matter(all.bar(p.rule, after), room, n.node_hash(), w)
                && (!in_region || cannot_matter(local.bar(p.rule, after), room, n.node_hash(), w))
            {
                continue;
            }
            let c = ranked(i, room, n.node_hash(), w, after);
            all.offer(c);
            if in_region {
                local.offer(c);
            }
        } else if u < p.join_limit {
            overflow_exists = true;
        }
    }
    let pick = if !local.is_empty() {
        local.pick(p.rule)
    } else {
        all.pick(p.rule)
    };
    if let Some(c) = pick {
        return Decision::Place {
            node: c.index,
            overflow: false,
        };
    }
    if !overflow_exists {
        return Decision::NoCapacity;
    }
    let mut over = Tracker::default();
    for (i, n) in nodes.iter().enumerate() {
        if !base_eligible(n, hints, now, p) {
            continue;
        }
        let u = n.utilization();
        if u < p.join_limit {
            let w = n.capacity() * (p.join_limit - u);
            let after = hints.with_room(n, u);
            if cannot_matter(over.bar(p.rule, after), room, n.node_hash(), w) {
                continue;
            }
            over.offer(ranked(i, room, n.node_hash(), w, after));
        }
    }
    match over.pick(p.rule) {
        Some(c) => Decision::Place {
            node: c.index,
            overflow: true,
        },
        None => Decision::NoCapacity,
    }
}

/// Picks a node for a room without a usable pin while the shared store cannot be reached
/// and every router decides alone ([`crate::store::PinStore::deciding_alone`]): by
/// weighted rendezvous hashing on capacity alone, the best-ranked eligible node whose
/// shared report ([`NodeView::shared_utilization`]: as it stood when the outage began)
/// is below `new_room_limit` (in the room's region first, with `region_affinity`), else,
/// as overflow, below `join_limit`. What the rules weigh besides (this router's `pending`
/// and reservations, and the reports only it hears during the outage) differs from one
/// router to the next, and so did their choices: two routers sent the first users of one
/// new room to two nodes, and the write-back after the outage could only evict one half.
/// Capacity, the hashes and the shared reports are the same on every router, so they
/// choose alike. The price: balance for the outage's length, and a node that fills during
/// it keeps its tier until Redis returns (its meetings' joins are refused at `join_limit`
/// as ever).
pub fn choose_alone<N: NodeView>(
    nodes: &[N],
    room: u64,
    hints: &Hints<'_>,
    now: Millis,
    p: &Params,
) -> Decision {
    let prefer_region = if p.region_affinity {
        hints.region
    } else {
        None
    };
    // (score, tiebreak, index) of the best node: [tier][anywhere, in the region], the
    // tiers below `new_room_limit` and below `join_limit`.
    let mut best: [[Option<(f64, u64, usize)>; 2]; 2] = [[None; 2]; 2];
    for (i, n) in nodes.iter().enumerate() {
        if !base_eligible(n, hints, now, p) {
            continue;
        }
        let u = n.shared_utilization();
        let tier = if u < p.new_room_limit {
            0
        } else if u < p.join_limit {
            1
        } else {
            continue;
        };
        let c = (
            raw_score(room, n.node_hash(), n.capacity()),
            n.node_hash(),
            i,
        );
        let in_region = prefer_region.is_some() && n.region() == prefer_region;
        for (slot, take) in best[tier].iter_mut().zip([true, in_region]) {
            let better = slot.is_none_or(|(s, h, _)| c.0 > s || (c.0 == s && c.1 > h));
            if take && better {
                *slot = Some(c);
            }
        }
    }
    let [below, over] = best;
    if let Some((_, _, node)) = below[1].or(below[0]) {
        return Decision::Place {
            node,
            overflow: false,
        };
    }
    match over[1].or(over[0]) {
        Some((_, _, node)) => Decision::Place {
            node,
            overflow: true,
        },
        None => Decision::NoCapacity,
    }
}

/// Why a node was or was not chosen, for `GET /v1/placement/{room}/explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The room's pinned node, and it takes the join.
    Pinned,
    /// Pinned here but at or above `join_limit`: the join is refused.
    PinnedFull,
    /// Chosen for the room.
    Chosen,
    /// One of the two best-ranked candidates, not chosen.
    RunnerUp,
    /// Eligible, ranked lower than the top two.
    Outranked,
    /// Eligible but outside the hinted region, and that region had candidates.
    OtherRegion,
    /// No heartbeat within `heartbeat_timeout`.
    Unhealthy,
    Draining,
    Disabled,
    /// Lacks a required tag.
    MissingTag,
    /// At or above `new_room_limit` (a new room may still overflow here).
    AboveNewRoomLimit,
    /// At or above `join_limit`.
    AboveJoinLimit,
}

/// One row of an explanation.
#[derive(Debug, Clone, Serialize)]
pub struct NodeExplain {
    pub index: usize,
    pub healthy: bool,
    pub state: AdminState,
    pub utilization: f64,
    /// `utilization` with the room's expected load added: what the rules compared.
    pub utilization_with_room: f64,
    pub weight: f64,
    pub score: Option<f64>,
    pub verdict: Verdict,
}

/// Explains [`decide`] node by node. Allocates; not for the hot path.
pub fn explain<N: NodeView>(
    nodes: &[N],
    pinned: Option<usize>,
    room: u64,
    hints: &Hints<'_>,
    now: Millis,
    p: &Params,
) -> (Decision, Vec<NodeExplain>) {
    let decision = decide(nodes, pinned, room, hints, now, p);
    let overflow = matches!(decision, Decision::Place { overflow: true, .. });
    let limit = if overflow {
        p.join_limit
    } else {
        p.new_room_limit
    };
    let prefer_region = if p.region_affinity {
        hints.region
    } else {
        None
    };
    let local_has_candidates = prefer_region.is_some()
        && nodes.iter().any(|n| {
            base_eligible(n, hints, now, p)
                && n.utilization() < p.new_room_limit
                && n.region() == prefer_region
        });
    // Recompute the top two of the pool the decision came from.
    let mut pool = Tracker::default();
    for (i, n) in nodes.iter().enumerate() {
        let u = n.utilization();
        if base_eligible(n, hints, now, p)
            && u < limit
            && (!local_has_candidates || overflow || n.region() == prefer_region)
        {
            pool.offer(ranked(
                i,
                room,
                n.node_hash(),
                n.capacity() * (limit - u),
                hints.with_room(n, u),
            ));
        }
    }
    let (best, second) = pool.top_two();
    let top: Vec<usize> = best.iter().chain(second.iter()).map(|r| r.index).collect();
    let rows = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let u = n.utilization();
            let healthy = is_healthy(n, now, p.heartbeat_timeout_ms);
            let w = (n.capacity() * (limit - u)).max(0.0);
            let verdict = match decision {
                Decision::Pinned(j) if j == i => Verdict::Pinned,
                Decision::NodeFull(j) if j == i => Verdict::PinnedFull,
                Decision::Place { node, .. } if node == i => Verdict::Chosen,
                _ if !healthy => Verdict::Unhealthy,
                _ if n.state() == AdminState::Disabled => Verdict::Disabled,
                _ if n.state() == AdminState::Draining => Verdict::Draining,
                _ if !hints.tags.iter().all(|t| n.has_tag(t)) => Verdict::MissingTag,
                _ if u >= p.join_limit => Verdict::AboveJoinLimit,
                _ if u >= p.new_room_limit && !overflow => Verdict::AboveNewRoomLimit,
                _ if local_has_candidates && !overflow && n.region() != prefer_region => {
                    Verdict::OtherRegion
                }
                _ if top.contains(&i) => Verdict::RunnerUp,
                _ => Verdict::Outranked,
            };
            NodeExplain {
                index: i,
                healthy,
                state: n.state(),
                utilization: u,
                utilization_with_room: hints.with_room(n, u),
                weight: w,
                score: (w > 0.0).then(|| numeric_score(room, n.node_hash(), w)),
                verdict,
            }
        })
        .collect();
    (decision, rows)
}

#[cfg(test)]
mod tests;
