//! The service core: registry + store + placement => where a room's joins go.
//!
//! [`Router`] owns the node table, the pin store, the reservation book and the learned room
//! sizes, and applies the pure rules of `placement` to them. It reads the clock (through a
//! [`Clock`] it is given) and talks to the store; it never sees HTTP. Handlers call
//! [`Router::place`] for joins and lookups and [`Router::heartbeat`] for node reports.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{self, BoxFuture, Either};
use serde::Serialize;

use crate::cluster::recent::RecentJoins;
use crate::cluster::reservations::{ReservationBook, RoomHistory};
use crate::cluster::sync::{NodeUpdate, WireInfo};
use crate::cluster::{Cluster, NodeEntry, NodeId, NodeInfo, Snapshot, Upsert};
use crate::config::{Config, PlacementConfig, StaticNode};
use crate::metrics::{Decided, Metrics};
use crate::placement::reservation::{expected_size, SizeSource};
use crate::placement::{
    decide, decide_alone, explain, is_healthy, pin_holds, AdminState, Decision, Hints, Millis,
    NodeExplain, NodeView, Params, PinHold,
};
use crate::room::{Normalization, RoomKey};
use crate::store::{Pin, PinOutcome, PinStore, StoreError, StoreHealth, Unconfirmed};

/// Where time comes from. Tests use a manual clock to move time without sleeping.
#[derive(Debug)]
pub enum Clock {
    System,
    Manual(AtomicU64),
}

impl Clock {
    pub fn now(&self) -> Millis {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }
    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, ms: u64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(ms, Ordering::Relaxed);
        }
    }
    /// Moves a manual clock backward, as NTP steps a wall clock that ran ahead; no effect on
    /// the system clock.
    pub fn step_back(&self, ms: u64) {
        if let Clock::Manual(t) = self {
            t.fetch_sub(ms, Ordering::Relaxed);
        }
    }
}

/// A node's room list with one entry per room key, the participants of entries that
/// normalize to the same key added up ("Room" and "room" under lowercase normalization are
/// one room to the router; a report listing a room twice, once live and once ended, must
/// not have the second entry release the pin the first confirmed).
fn one_entry_per_room(mut rooms: Vec<(RoomKey, u32)>) -> Vec<(RoomKey, u32)> {
    rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rooms.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 = kept.1.saturating_add(later.1);
        }
        same
    });
    rooms
}

/// What the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A user joins: counts toward the node's `pending` and the room's reservation.
    Join,
    /// Another request of a session a join already admitted (proxy mode: the client's
    /// connection carried one for this room): goes to the room's node without counting, at
    /// `join_limit` too, since refusing it would break a meeting already under way. A room
    /// that has to be placed (its pin is gone) is joined afresh, and counts.
    InSession,
    /// A placement lookup: places the room if `create` and it has no usable pin.
    Lookup { create: bool },
}

impl Intent {
    /// Whether a placement made for this intent counts a join.
    fn joins_when_placing(self) -> bool {
        matches!(self, Intent::Join | Intent::InSession)
    }
}

/// The answer: the room's node.
#[derive(Debug, Clone)]
pub struct Placement {
    pub node: NodeEntry,
    /// True when this call placed the room (new, or re-placed off a failed node).
    pub created: bool,
    /// True when every candidate was above `new_room_limit` and the room overflowed.
    pub overflow: bool,
    /// True when the room was pinned to another node before (gone, unhealthy or disabled).
    pub replaced: bool,
}

/// What the general path tells `on_placed` about a placement it won.
#[derive(Clone, Copy)]
struct Placed<'a> {
    /// The node the room was pinned to before (a re-placement), if any.
    previous: Option<&'a NodeId>,
    /// Placed above `new_room_limit` because every candidate was.
    overflow: bool,
    /// The size it reserves, and where that came from.
    expected: u32,
    source: SizeSource,
}

/// The future [`Router::place`] returns: ready at once for a pinned room, boxed otherwise.
pub type Placing<'a> = Either<
    future::Ready<Result<Placement, JoinError>>,
    BoxFuture<'a, Result<Placement, JoinError>>,
>;

/// Why a join or lookup has no node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("node {node} of room is full")]
    NodeFull { node: NodeId },
    #[error("no node has capacity for a new room")]
    NoCapacity,
    #[error("room has no placement")]
    NotFound,
    /// The router started moments ago and places no new room until the nodes have
    /// reported theirs (`placement.startup_hold`).
    #[error("the router is starting: new rooms are placed once the nodes have reported theirs, in {}s", .left_ms.div_ceil(1000))]
    Starting { left_ms: u64 },
    /// The room's node is alive as the shared store tells it, but this router does not know
    /// it yet (its node table is still loading): the join cannot be sent there yet, and must
    /// not be sent elsewhere.
    #[error("node {node} of the room is not known to this router yet; retry in a moment")]
    NodeSyncing { node: NodeId },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A node's heartbeat, already validated by the HTTP layer.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub info: NodeInfo,
    pub load: f64,
    pub cpu: Option<f64>,
    pub state: AdminState,
    /// `None`: the node does not report rooms.
    pub rooms: Option<Vec<(RoomKey, u32)>>,
}

/// What a node is told after a heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatReply {
    pub state: AdminState,
    pub evict: Vec<RoomKey>,
    pub heartbeat_interval_ms: u64,
}

/// A node as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: NodeId,
    #[serde(flatten)]
    pub info: NodeInfo,
    pub state: AdminState,
    pub admin_state: AdminState,
    pub reported_state: AdminState,
    pub healthy: bool,
    pub load: f64,
    pub cpu: Option<f64>,
    pub utilization: f64,
    pub pending: f64,
    pub reserved: f64,
    /// What the other routers reserved here (`placement.share_reservations`; else 0).
    pub reserved_by_others: f64,
    pub rooms: usize,
    pub last_heartbeat_ms_ago: Option<u64>,
    #[serde(rename = "static")]
    pub is_static: bool,
}

/// One node in an explanation.
#[derive(Debug, Clone, Serialize)]
pub struct ExplainRow {
    pub node: NodeId,
    #[serde(flatten)]
    pub row: NodeExplain,
}

/// An explanation of a room's placement.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub room: RoomKey,
    pub pinned: Option<NodeId>,
    pub decision: String,
    pub node: Option<NodeId>,
    pub rule: &'static str,
    /// What a new session of the room would reserve (the `size` hint asked about, else its
    /// learned history, else `new_room_reserve`), and where that comes from.
    pub expected_size: u32,
    pub size_source: SizeSource,
    /// How long that reservation would last at most: `reservation_ttl` for a hint or
    /// history, `new_room_reserve_ttl` for the default guess.
    pub reserved_for_ms: u64,
    pub nodes: Vec<ExplainRow>,
}

/// The router core. Generic over the store so the hot path is statically dispatched.
pub struct Router<S> {
    params: Params,
    placement: PlacementConfig,
    norm: Normalization,
    cluster: Arc<Cluster>,
    store: S,
    book: ReservationBook,
    history: RoomHistory,
    /// Rooms with a join routed lately (their tickets may still be on the way).
    recent: RecentJoins,
    /// How long after issue a ticket may still be accepted (its lifetime plus the
    /// verification leeway, [`crate::auth::ticket::accepted_for`]): a room keeps its pin this
    /// long after its last join.
    ticket_window_ms: u64,
    /// This router among the others sharing a store: names its shared reservations.
    instance: String,
    /// Until when (clock ms) no new room is placed: with a store of its own the router
    /// knows no pin at start, and waits for the nodes to report the rooms they host
    /// (`placement.startup_hold`). 0: no hold. A gap the router bridges during the hold
    /// moves it on by the gap ([`Router::bridge_gap`]).
    hold_until: AtomicU64,
    /// When the hold began (see `holding` for a clock stepped back before it).
    started: Millis,
    /// The last time (clock ms) the router was seen awake (by the watch, [`Router::watch`],
    /// or by a join or heartbeat that judged node health); 0: not watched (the gap check
    /// is off).
    awake: AtomicU64,
    /// Held while a gap is bridged: a join or heartbeat that finds the gap waits for the
    /// nodes' times to be moved on before it judges any node. Holds the latest gaps, which
    /// the idle sweep gives back to the pins.
    bridging: std::sync::Mutex<Gaps>,
    /// The last sweep that found the router deciding alone (the shared store out of reach;
    /// 0: none): the nodes it hears only through the store are silent until then, not gone
    /// ([`Router::forget_silent_nodes`]).
    alone_seen: AtomicU64,
    clock: Clock,
    pub metrics: Metrics,
}

impl<S: PinStore> Router<S> {
    pub fn new(cfg: &Config, store: S, clock: Clock) -> Router<S> {
        let started = clock.now();
        let hold = if store.shared() {
            0
        } else {
            cfg.startup_hold().as_millis() as u64
        };
        let r = Router {
            params: cfg.placement.params(),
            placement: cfg.placement.clone(),
            norm: cfg.rooms.normalization,
            cluster: Arc::new(Cluster::new()),
            store,
            book: ReservationBook::default(),
            history: RoomHistory::default(),
            recent: RecentJoins::default(),
            ticket_window_ms: crate::auth::ticket::accepted_for(cfg.tickets.ttl, cfg.tickets.leeway)
                .as_millis() as u64,
            instance: format!("{:016x}", rand::random::<u64>()),
            hold_until: AtomicU64::new(if hold > 0 { started + hold } else { 0 }),
            started,
            awake: AtomicU64::new(0),
            bridging: std::sync::Mutex::new(Gaps::default()),
            alone_seen: AtomicU64::new(0),
            clock,
            metrics: Metrics::new(),
        };
        for n in &cfg.nodes {
            r.add_static(n);
        }
        // Shared node state (several routers): the store applies other routers' updates.
        r.store.attach(&r.cluster);
        r
    }

    fn add_static(&self, n: &StaticNode) {
        if let Ok(id) = NodeId::parse(&n.id) {
            self.cluster.upsert(&id, static_info(n), true);
        }
    }

    pub fn normalization(&self) -> Normalization {
        self.norm
    }
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
    pub fn store(&self) -> &S {
        &self.store
    }
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
    pub fn placement_config(&self) -> &PlacementConfig {
        &self.placement
    }
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Whether `node` has been heard from within `heartbeat_timeout` at `now`.
    pub fn is_healthy(&self, node: &NodeEntry, now: Millis) -> bool {
        is_healthy(node, now, self.params.heartbeat_timeout_ms)
    }

    /// Decides the room's node for a join or lookup, pinning it if it needs a (new) node.
    ///
    /// A room whose pin holds is decided before this returns, under the store's read of the
    /// pin (no copy of it, no waiting): the future is then ready at once. Anything else (a new
    /// room, a pin to a failed node, a pin due for confirmation) runs the general path, boxed
    /// so that the hot path does not carry its state.
    pub fn place<'a>(
        &'a self,
        room: &'a RoomKey,
        hints: &'a Hints<'a>,
        size: Option<u32>,
        intent: Intent,
    ) -> Placing<'a> {
        let now = self.clock.now();
        let fast = self
            .store
            .peek(room, |pin| self.join_pinned(room, pin?, intent, now));
        if let Some(Some(r)) = fast {
            self.count_decision(&r, intent);
            return Either::Left(future::ready(r));
        }
        let started = Instant::now();
        Either::Right(Box::pin(async move {
            let r = self.place_inner(room, hints, size, intent, now).await;
            self.count_decision(&r, intent);
            self.metrics.slow_decisions.observe(started.elapsed());
            r
        }))
    }

    #[inline]
    fn count_decision(&self, r: &Result<Placement, JoinError>, intent: Intent) {
        self.metrics.decision(match r {
            // Not a join: counted apart, so that refusals are a share of joins.
            Ok(p) if !p.created && intent == Intent::InSession => Decided::InSession,
            Ok(p) if !p.created => Decided::Pinned,
            // One outcome per decision: a re-placement is `replaced`, overflowed or not.
            Ok(p) if p.replaced => Decided::Replaced,
            Ok(p) if p.overflow => Decided::PlacedOverflow,
            Ok(_) => Decided::Placed,
            Err(JoinError::NodeFull { .. }) => Decided::NodeFull,
            Err(JoinError::NoCapacity) => Decided::NoCapacity,
            Err(JoinError::NotFound) => Decided::NotFound,
            Err(JoinError::Starting { .. } | JoinError::NodeSyncing { .. }) => Decided::Starting,
            Err(JoinError::Store(_)) => Decided::StoreUnavailable,
        });
    }

    /// A join or lookup for a room whose pin holds, decided from the pin alone: one snapshot
    /// read, one node's counters. `None` sends the caller down the general path: the pin's
    /// node is unknown, unhealthy or disabled (re-place), or the pin is due for confirmation.
    #[inline]
    fn join_pinned(
        &self,
        room: &RoomKey,
        pin: &Pin,
        intent: Intent,
        now: Millis,
    ) -> Option<Result<Placement, JoinError>> {
        self.pinned_decision(pin, now, |node, hold| {
            if hold == PinHold::Full && !self.goes_in_when_full(room, node, intent) {
                return Err(JoinError::NodeFull {
                    node: node.id.clone(),
                });
            }
            if intent == Intent::Join {
                self.count_join(room, node, now);
            }
            Ok(Placement {
                node: node.clone(),
                created: false,
                overflow: false,
                replaced: false,
            })
        })
    }

    /// Whether a request for `room` still goes to its node although the node is at or above
    /// `join_limit`: an in-session request of a user already admitted, or a join of a room
    /// whose own outstanding reservation there is what takes the node to the limit. That
    /// capacity was held for this participant (the join moves a unit from reserved to
    /// pending, û does not grow), so refusing it would let a room's expected size lock out
    /// the very participants it was expected for. A node full without the room's own
    /// reservation refuses as ever. A lookup of a pinned room is answered with its node,
    /// full or not: it is not a join (it counts nothing), and "repeat calls return the same
    /// node" is what signalling servers and bots rely on. Looked at only when the node is
    /// full.
    fn goes_in_when_full(&self, room: &RoomKey, node: &NodeEntry, intent: Intent) -> bool {
        match intent {
            Intent::InSession | Intent::Lookup { .. } => true,
            Intent::Join => self
                .book
                .outstanding_on(room, &node.live)
                .is_some_and(|units| {
                    units > 0
                        && node.live.utilization_without(node.capacity(), units)
                            < self.params.join_limit
                }),
        }
    }

    /// The decision for a pinned room, without bookkeeping: whether `pin` still holds at
    /// `now` and whether its node takes the join, handed to `f` with the node. `None`: the
    /// pin's node is unknown, unhealthy or disabled, or the pin is due for confirmation (the
    /// general path handles those). This is what [`Router::place`] runs for a pinned room
    /// before counting the join; the benchmarks measure it on its own.
    #[inline]
    pub fn pinned_decision<R>(
        &self,
        pin: &Pin,
        now: Millis,
        f: impl FnOnce(&NodeEntry, PinHold) -> R,
    ) -> Option<R> {
        if now.saturating_sub(pin.confirmed_at) > self.confirm_every_ms() {
            return None;
        }
        let snap = self.cluster.snapshot();
        let node = snap.get(&pin.node)?;
        let hold = pin_holds(node, now, &self.params)?;
        Some(f(node, hold))
    }

    /// Settles this router's reservations with the participants other routers' heartbeats
    /// reported (a shared store), as its own heartbeats settle them: without it, a room
    /// whose node reports to another router, and whose users join through others, would
    /// stay reserved here until `reservation_ttl` although it has filled, or ended. Before
    /// every placement that is not a pinned join (where reservations count) and at every
    /// sweep; nothing to do costs one atomic read.
    fn settle_observed(&self, now: Millis) {
        for seen in self.store.take_observed() {
            for (room, participants) in &seen.rooms {
                self.book.observe(room, &seen.node, *participants, now);
            }
            for room in &seen.ended {
                self.book.ended(room, &seen.node, seen.at);
            }
        }
    }

    /// When a join of the general path is recorded (`cluster::recent`): the clock read
    /// again, not the decision's `now`, which the store's round trips may have left behind.
    /// The ticket the user gets is issued after this, and a node's report that the room
    /// ended must see the join for as long as that ticket may arrive.
    fn join_time(&self, decided: Millis) -> Millis {
        self.clock.now().max(decided)
    }

    /// The decision for `room` over `snap`: by the configured rule, or, while the shared
    /// store is out of reach, by the rule every router applies alike (`decide_alone`).
    fn decide(
        &self,
        snap: &Snapshot,
        pinned: Option<usize>,
        room: &RoomKey,
        hints: &Hints<'_>,
        now: Millis,
    ) -> Decision {
        let decide = match self.store.deciding_alone() {
            true => decide_alone,
            false => decide,
        };
        decide(
            snap.candidates(),
            pinned,
            room.stable_hash(),
            hints,
            now,
            &self.params,
        )
    }

    /// A join sent to `node`: counts toward its `pending` and the room's reservation.
    #[inline]
    fn count_join(&self, room: &RoomKey, node: &NodeEntry, now: Millis) {
        self.recent.joined(room.stable_hash(), now);
        node.live.add_pending(self.placement.join_cost);
        self.book.arrive_one(room, &node.id, &node.live, now);
    }

    async fn place_inner(
        &self,
        room: &RoomKey,
        hints: &Hints<'_>,
        size: Option<u32>,
        intent: Intent,
        now: Millis,
    ) -> Result<Placement, JoinError> {
        self.bridge_gap(now);
        self.settle_observed(now);
        let mut pin = self.store.get(room).await?;
        // What the room would reserve if placed now: the rules compare nodes with it counted.
        let (expected, source) = self.expected_size(room, size);
        let hints = &Hints {
            expected_load: f64::from(expected),
            ..*hints
        };
        // Each retry follows a lost compare-and-set: another router changed the pin meanwhile.
        for _ in 0..8 {
            let (decision, entry) = {
                let snap = self.cluster.snapshot();
                let pinned = pin.as_ref().and_then(|p| snap.position(&p.node));
                let d = self.decide(&snap, pinned, room, hints, now);
                let entry = match d {
                    Decision::Pinned(i)
                    | Decision::NodeFull(i)
                    | Decision::Place { node: i, .. } => Some(snap.nodes()[i].clone()),
                    Decision::NoCapacity => None,
                };
                (d, entry)
            };
            let decision = match (decision, &entry) {
                (Decision::NodeFull(i), Some(node))
                    if self.goes_in_when_full(room, node, intent) =>
                {
                    Decision::Pinned(i)
                }
                (d, _) => d,
            };
            match (decision, entry) {
                (Decision::Pinned(_), Some(node)) => {
                    if intent == Intent::Join {
                        // Recorded before the pin is checked again below, so that a node's
                        // report that the room ended either sees this join (and keeps the
                        // pin) or released the pin first (and the check fails).
                        self.recent.joined(room.stable_hash(), self.join_time(now));
                    }
                    if let Some(p) = &pin {
                        // A stale confirmation is refreshed before the user is sent: if the
                        // pin moved or went meanwhile (another router re-placed the room, or
                        // it ended), the store refuses, and the join follows the pin as it
                        // is now rather than the one read before. The memory store's
                        // confirmation is one map write, so it checks on every pass here.
                        let due = now.saturating_sub(p.confirmed_at) > self.confirm_every_ms();
                        if (due || !self.store.shared())
                            && !self.store.confirm(room, &node.id, now).await?
                        {
                            pin = self.store.get(room).await?;
                            continue;
                        }
                    }
                    if intent == Intent::Join {
                        self.count_join(room, &node, self.join_time(now));
                    }
                    return Ok(Placement {
                        node,
                        created: false,
                        overflow: false,
                        replaced: false,
                    });
                }
                (Decision::NodeFull(_), Some(node)) => {
                    return Err(JoinError::NodeFull {
                        node: node.id.clone(),
                    })
                }
                (Decision::Place { overflow, .. }, Some(node)) => {
                    let previous = pin.as_ref().map(|p| p.node.clone());
                    if let Some(prev) = &previous {
                        if let Some(held) = self.still_heard_elsewhere(prev).await? {
                            // As on the pinned path: the join recorded first, then the pin
                            // confirmed as the store holds it now (another router may have
                            // moved the room since it was read), then the join limit, of
                            // which the node's last report here is the best knowledge.
                            if intent == Intent::Join {
                                self.recent.joined(room.stable_hash(), self.join_time(now));
                            }
                            if !self.store.confirm(room, &held.id, now).await? {
                                pin = self.store.get(room).await?;
                                continue;
                            }
                            if held.join_utilization(self.params.new_room_limit)
                                >= self.params.join_limit
                                && !self.goes_in_when_full(room, &held, intent)
                            {
                                return Err(JoinError::NodeFull {
                                    node: held.id.clone(),
                                });
                            }
                            if intent == Intent::Join {
                                self.count_join(room, &held, self.join_time(now));
                            }
                            return Ok(Placement {
                                node: held,
                                created: false,
                                overflow: false,
                                replaced: false,
                            });
                        }
                    }
                    if intent == (Intent::Lookup { create: false }) {
                        return Err(JoinError::NotFound);
                    }
                    if previous.is_none() {
                        if let Some(left_ms) = self.holding(now) {
                            return Err(JoinError::Starting { left_ms });
                        }
                    }
                    if intent.joins_when_placing() {
                        // Before the pin exists, as on the pinned path: a node's report
                        // that the room ended, heard between the pin and the join's count,
                        // must see the join and keep the pin it is sent to.
                        self.recent.joined(room.stable_hash(), self.join_time(now));
                    }
                    match self
                        .store
                        .pin_if(room, &node.id, previous.as_ref(), now)
                        .await?
                    {
                        PinOutcome::Won(_) => {
                            let placed = Placed {
                                previous: previous.as_ref(),
                                overflow,
                                expected,
                                source,
                            };
                            self.on_placed(room, &node, placed, intent, now);
                            return Ok(Placement {
                                node,
                                created: true,
                                overflow,
                                replaced: previous.is_some(),
                            });
                        }
                        PinOutcome::Lost(current) => pin = current,
                    }
                }
                _ => {
                    if intent == (Intent::Lookup { create: false }) && pin.is_none() {
                        return Err(JoinError::NotFound);
                    }
                    return Err(JoinError::NoCapacity);
                }
            }
        }
        Err(JoinError::Store(StoreError(
            "pin kept changing under contention".into(),
        )))
    }

    /// Before a room is moved off `prev`, the node its pin names, which this router takes
    /// for gone (no report within `heartbeat_timeout`, or not known here at all): with a
    /// shared store, whether another router still hears it. This router's view may be the
    /// one behind (its subscription silent, its node table still loading), and moving the
    /// room would split a live meeting. `Ok(Some(node))`: it is heard, the join goes there;
    /// an error when it is heard but not known here yet (no URL to send the user to: a
    /// moment later it is). `Ok(None)`: move the room (an admin disabled the node, this
    /// router's health check failed it, no router hears it, or the store gave no answer).
    /// Never on a pinned join's path.
    async fn still_heard_elsewhere(&self, prev: &NodeId) -> Result<Option<NodeEntry>, JoinError> {
        if !self.store.shared() {
            return Ok(None);
        }
        let known = {
            let snap = self.cluster.snapshot();
            snap.position(prev).map(|i| snap.nodes()[i].clone())
        };
        // An admin's disable, or this router's own health check failing the node (a wedged
        // process whose heartbeats still go out), is evidence, not a view behind: the room
        // moves.
        if known
            .as_ref()
            .is_some_and(|n| n.state() == AdminState::Disabled || n.live.marked_by_check())
        {
            return Ok(None);
        }
        if self.store.node_alive_elsewhere(prev).await != Some(true) {
            return Ok(None);
        }
        self.metrics.moves_held.inc();
        match known {
            Some(n) => Ok(Some(n)),
            None => Err(JoinError::NodeSyncing { node: prev.clone() }),
        }
    }

    /// How long a pin outlives its last confirmation. Joins confirm a pin only when its
    /// confirmation is older than `confirm_every_ms`, so a pin joined `room_idle_ttl` ago
    /// may carry a confirmation that much older still.
    fn idle_ms(&self) -> u64 {
        self.placement.room_idle_ttl.as_millis() as u64 + self.confirm_every_ms()
    }

    /// Pins are confirmed at most this often by joins (a store write per join would be waste).
    fn confirm_every_ms(&self) -> u64 {
        (self.placement.room_idle_ttl.as_millis() as u64 / 8).max(1)
    }

    fn on_placed(
        &self,
        room: &RoomKey,
        node: &NodeEntry,
        placed: Placed<'_>,
        intent: Intent,
        now: Millis,
    ) {
        // The room may still hold a reservation from an earlier placement: re-placed, or
        // ended where this router did not see it end (its pin released by another router)
        // and created again before that reservation lapsed. Release it first: overwritten in
        // the book, it would stay counted on its node for good.
        self.book.release(room);
        let (expected, source) = (placed.expected, placed.source);
        // A forecast reserves at most what the node has left below `new_room_limit`: enough
        // to turn the next new rooms away from it, never so much that the meetings already
        // there are refused joins (`join_limit`) for a crowd that is only expected. The
        // placement itself weighed the whole expected size. A hint is anyone's to send
        // (`?size=` with `auth.users = "none"`): one of 10 000 on a node of 500 filled it
        // for `reservation_ttl`, and a few such requests every node.
        let reserved = expected.min(
            node.live
                .headroom_units(node.capacity(), self.params.new_room_limit),
        );
        self.book.reserve(
            room,
            &node.id,
            &node.live,
            reserved,
            now,
            self.placement.reservation_ttl_ms(source),
        );
        if intent.joins_when_placing() {
            self.count_join(room, node, self.join_time(now));
        }
        // The placement log an operator reads when a room "moved": one line per placement
        // (never per join), queued to the log's writer thread.
        let (size_source, overflow) = (source.as_str(), placed.overflow);
        match placed.previous {
            None => tracing::info!(
                room = %room, node = %node.id, expected_size = expected, reserved, size_source,
                overflow, "room placed"
            ),
            Some(previous) => tracing::info!(
                room = %room, node = %node.id, %previous, expected_size = expected, reserved,
                size_source, overflow, "room re-placed: its node was gone, unhealthy or disabled"
            ),
        }
    }

    /// What a new session of `room` reserves: the hint, else the room's learned history,
    /// else `new_room_reserve`. Hints and history are both capped at `max_size_hint`: the
    /// history comes from node reports (and a shared store) that nothing else bounds.
    fn expected_size(&self, room: &RoomKey, size: Option<u32>) -> (u32, SizeSource) {
        let cap = self.placement.max_size_hint;
        expected_size(
            size.map(|s| s.min(cap)),
            self.history.expected(room).map(|s| s.min(cap)),
            self.placement.new_room_reserve,
        )
    }

    /// Applies a node's heartbeat: registers or updates it, records its load, reconciles the
    /// rooms it reports with the pins, and answers its state and the rooms it must end.
    /// Timed (`roomrouter_heartbeat_seconds`): with many rooms per node and a remote store,
    /// this is where a slow store shows first.
    pub async fn heartbeat(
        &self,
        id: &NodeId,
        hb: Heartbeat,
    ) -> Result<HeartbeatReply, StoreError> {
        let started = Instant::now();
        let reply = self.apply_heartbeat(id, hb).await;
        self.metrics.heartbeat_time.observe(started.elapsed());
        reply
    }

    async fn apply_heartbeat(
        &self,
        id: &NodeId,
        hb: Heartbeat,
    ) -> Result<HeartbeatReply, StoreError> {
        let now = self.clock.now();
        self.bridge_gap(now);
        if self.stays_removed(id, &hb, now).await? {
            self.metrics.heartbeats.inc();
            return Ok(HeartbeatReply {
                state: self
                    .cluster
                    .removed_state(id)
                    .stricter(AdminState::Draining),
                evict: Vec::new(),
                heartbeat_interval_ms: self.placement.heartbeat_interval.as_millis() as u64,
            });
        }
        // Word of the node before the table is touched: a sweep forgetting it meanwhile
        // either sees the word and keeps it, or took it out before the upsert adds it back.
        if let Some(e) = self.cluster.snapshot().get(id) {
            e.live.hear(now);
        }
        let (outcome, entry) = self.cluster.upsert(id, hb.info, false);
        if outcome == Upsert::Added {
            tracing::info!(node = %id, "node joined");
        }
        entry
            .live
            .record_report(entry.info.capacity, hb.load, hb.cpu, hb.state, now);
        self.metrics.heartbeats.inc();
        let mut evict = Vec::new();
        let mut reported_any = true;
        // For the other routers' reservations (a shared store only).
        let mut counts = None;
        if let Some(rooms) = hb.rooms.map(one_entry_per_room) {
            if self.store.shared() {
                counts = Some(
                    rooms
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(r, n)| (r.as_str().to_string(), *n))
                        .collect(),
                );
            }
            let mut listed = HashSet::with_capacity(rooms.len());
            // Ended rooms whose pins are kept for outstanding tickets: looked at again at the
            // next heartbeat, as if listed now.
            let mut kept = Vec::new();
            // Rooms reported ended, not to be ended again below as unlisted: a second
            // release could take the pin of a join that placed the room again meanwhile.
            let mut ended = HashSet::new();
            for (room, participants) in rooms {
                if participants == 0 {
                    match self.end_room(&room, &entry, "ended").await {
                        Ok(true) => {}
                        Ok(false) => kept.push(room.clone()),
                        Err(e) => return Err(keep_listed(&entry, listed, e)),
                    }
                    ended.insert(room);
                    continue;
                }
                self.history.observe(&room, participants, now);
                self.book.observe(&room, id, participants, now);
                match self.reconcile(&room, &entry, now).await {
                    Ok(true) => {
                        listed.insert(room);
                    }
                    Ok(false) => evict.push(room),
                    Err(e) => return Err(keep_listed(&entry, listed, e)),
                }
            }
            // Taken, and put back if this heartbeat fails or is dropped half-way: the next
            // one must still find what the node listed before, or it could not tell which
            // rooms ended meanwhile.
            let before = PutBack::take(&entry.live.reported_rooms);
            for gone in before
                .rooms()
                .filter(|r| !listed.contains(*r) && !ended.contains(*r))
            {
                match self.end_room(gone, &entry, "unlisted").await {
                    Ok(true) => {}
                    Ok(false) => kept.push(gone.clone()),
                    // Those listed before go back as the guard drops.
                    Err(e) => return Err(keep_listed(&entry, listed, e)),
                }
            }
            before.done();
            listed.extend(kept);
            // Pins kept for tickets still count: a drained node is removed only once no
            // ticket for it can still arrive.
            reported_any = !listed.is_empty();
            *entry
                .live
                .reported_rooms
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = listed;
        }
        let state = entry.live.effective_state();
        let drained_empty = hb.state == AdminState::Draining
            && !reported_any
            && self.placement.auto_remove_drained
            && !entry.is_static
            && !self.tickets_may_arrive(id, now).await?;
        // Removed at the second such report in a row, a heartbeat interval after the
        // first, not at the first: a join that chose the node before this report made it
        // draining may still be pinning a new room there, which `tickets_may_arrive` sees
        // only once it is pinned (removed now, the room's next join would be placed
        // elsewhere while its first user lands here: a split). By the next report it is
        // pinned, and the other routers have heard that the node drains.
        let remove = if drained_empty {
            let since = entry.live.drained_empty_since(now);
            now.saturating_sub(since) >= self.placement.heartbeat_interval.as_millis() as u64
        } else {
            entry.live.not_drained_empty();
            false
        };
        if remove {
            self.cluster.remove(id);
            self.store.share_node(NodeUpdate::Removed {
                id: id.to_string(),
                at: now,
                silent_since: None,
            });
            tracing::info!(node = %id, "drained node reported no rooms; removed");
        } else if self.store.shared() {
            // Built only for a store that tells other routers: it copies every room's name.
            self.store
                .share_node(NodeUpdate::report(&entry, now, counts));
        }
        evict.sort();
        Ok(HeartbeatReply {
            state,
            evict,
            heartbeat_interval_ms: self.placement.heartbeat_interval.as_millis() as u64,
        })
    }

    /// Whether a heartbeat from a node this router does not know (removed once it drained
    /// itself, or never seen) leaves it out: it drains itself and has no room, and no ticket
    /// for it can arrive, so it would be removed again at once. Without this, a drained node
    /// that keeps reporting would be added and removed at every heartbeat, each time telling
    /// the log and the other routers.
    async fn stays_removed(
        &self,
        id: &NodeId,
        hb: &Heartbeat,
        now: Millis,
    ) -> Result<bool, StoreError> {
        Ok(hb.state == AdminState::Draining
            && hb.rooms.as_ref().is_some_and(|r| r.is_empty())
            && self.placement.auto_remove_drained
            && self.cluster.snapshot().get(id).is_none()
            && !self.tickets_may_arrive(id, now).await?)
    }

    /// A node reports a live room. Returns false if the room belongs elsewhere (evict it).
    async fn reconcile(
        &self,
        room: &RoomKey,
        entry: &NodeEntry,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut current = self.store.get(room).await?;
        if current.as_ref().is_some_and(|p| p.node == entry.id) {
            if self.store.confirm(room, &entry.id, now).await? {
                return Ok(true);
            }
            // The store no longer names this node (the read was stale): decide on what it
            // holds now.
            current = self.store.get(room).await?;
        }
        // Each retry follows a lost compare-and-set: the pin changed meanwhile (another
        // router adopted the room, an admin deleted it, the sweep released it), and what it
        // is now decides, as on the first pass.
        for _ in 0..8 {
            let expected = match &current {
                Some(p) if p.node == entry.id => return Ok(true),
                Some(p) => {
                    if self.node_usable(&p.node, now) && self.store.deciding_alone() {
                        // The pin read is this router's own cache, perhaps its own decision
                        // taken alone, and the other half may be another router's: which one
                        // the store keeps is decided when the decisions are written back, and
                        // the loser's node is told then. Evicted now, a room whose two
                        // halves' routers each evicted the other's was emptied everywhere.
                        tracing::debug!(room = %room, node = %entry.id, pinned = %p.node, "room reported while pinned elsewhere, the store out of reach: left to the write-back");
                        return Ok(true);
                    }
                    if self.node_usable(&p.node, now) {
                        self.metrics.splits_detected.inc();
                        tracing::warn!(room = %room, node = %entry.id, pinned = %p.node, "split room detected; evicting");
                        return Ok(false);
                    }
                    Some(p.node.clone())
                }
                None => None,
            };
            // Unpinned (e.g. the router restarted) or pinned to a node that is gone: adopt it.
            let mark = self.book.mark();
            match self
                .store
                .pin_if(room, &entry.id, expected.as_ref(), now)
                .await?
            {
                PinOutcome::Won(_) => {
                    // The room's reservation on the node it left goes with it: kept, that
                    // node would count a meeting it no longer hosts until `reservation_ttl`
                    // (a node back from a blip avoided for new rooms, a small cluster
                    // pushed into overflow), on every router sharing reservations too.
                    if let Some(prev) = &expected {
                        self.book.release_older(room, Some(prev), mark);
                    }
                    return Ok(true);
                }
                PinOutcome::Lost(now_pinned) => current = now_pinned,
            }
        }
        Err(StoreError(format!(
            "pin of room {room} kept changing under contention"
        )))
    }

    fn node_usable(&self, id: &NodeId, now: Millis) -> bool {
        self.cluster
            .snapshot()
            .get(id)
            .is_some_and(|e| self.is_healthy(e, now) && e.state() != AdminState::Disabled)
    }

    /// A node says a room ended on it (reported empty, or no longer listed): releases the
    /// room's pin if it still points there. Returns false when the pin is kept because a
    /// ticket for the room may still be on its way: this router routed a join to the room
    /// within the ticket lifetime (see `cluster::recent`), or, with a store other routers
    /// share, the pin was confirmed too recently to rule out one of theirs
    /// ([`Router::shared_ticket_hold_ms`]).
    async fn end_room(
        &self,
        room: &RoomKey,
        entry: &NodeEntry,
        why: &'static str,
    ) -> Result<bool, StoreError> {
        self.end_session(room);
        let (now, mark) = (self.clock.now(), self.book.mark());
        let (hash, since) = (room.stable_hash(), self.tickets_issued_since(now));
        let own_ticket = || self.recent.joined_since(hash, since);
        let outcome = if !self.store.shared() {
            // Asked where no pinned join can slip in between the question and the delete.
            self.store
                .release_unless(room, &entry.id, own_ticket)
                .await?
        } else if own_ticket() && self.pinned_on(room, &entry.id).await? {
            // (Only for a pin on this node: a room evicted from it, pinned elsewhere, is
            // not kept on its list for joins that go to the other node.)
            Unconfirmed::Confirmed
        } else {
            // Other routers' joins show only as confirmations; this router's confirm before
            // they count (`place_inner`), so a join between the two looks sees no pin.
            let before = now.saturating_sub(self.shared_ticket_hold_ms());
            self.store
                .release_if_unconfirmed(room, &entry.id, before)
                .await?
        };
        match outcome {
            Unconfirmed::Confirmed => {
                // Someone may still be on the way with a ticket for this node: keep the pin
                // so that the next join comes here too. The caller asks again at the next
                // heartbeat.
                tracing::debug!(room = %room, node = %entry.id, why, "room ended with tickets outstanding; pin kept");
                return Ok(false);
            }
            Unconfirmed::Released => self.metrics.released(why),
            Unconfirmed::NotThere => {}
        }
        // One atomic step: a reservation the room's next session made once the pin was gone
        // stays.
        self.book.release_older(room, Some(&entry.id), mark);
        Ok(true)
    }

    /// Whether the room's pin points at `node`: from the store's cache when it keeps one.
    async fn pinned_on(&self, room: &RoomKey, node: &NodeId) -> Result<bool, StoreError> {
        let on = |p: Option<&Pin>| p.is_some_and(|p| p.node == *node);
        if let Some(cached) = self.store.peek(room, on) {
            return Ok(cached);
        }
        Ok(on(self.store.get(room).await?.as_ref()))
    }

    /// The oldest join time (router clock) whose ticket a node may still accept at `now`:
    /// a ticket's window back, and further back by the time given back for the router's
    /// own gaps. Across a forward step of the router's clock, a join routed seconds before
    /// it would otherwise look the step older to this router, while the node, whose clock
    /// did not jump, still accepts its ticket: the room's pin released at its end, the next
    /// join could go elsewhere while the ticket holder lands on the old node (a split).
    fn tickets_issued_since(&self, now: Millis) -> Millis {
        let given_back = self
            .bridging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .given_back(now, self.idle_ms());
        now.saturating_sub(self.ticket_window_ms + given_back)
    }

    /// Whether a user may still arrive at `node` with a ticket: some pin on it had a join
    /// within a ticket's lifetime (this router's own, or, by the pin's confirmation as the
    /// store holds it, another router's). Rooms the node never listed count too: a room placed there since its last
    /// report, whose first user is on the way, would otherwise be placed afresh elsewhere
    /// once the node is gone, while that user lands on the node (a split). Visits every pin:
    /// only asked of a drained node that reported no rooms.
    async fn tickets_may_arrive(&self, node: &NodeId, now: Millis) -> Result<bool, StoreError> {
        let own_since = self.tickets_issued_since(now);
        // As in `end_room`: other routers' joins show only as confirmations.
        let shared = self.store.shared();
        let confirmed_since = match shared {
            true => now.saturating_sub(self.shared_ticket_hold_ms()),
            false => Millis::MAX,
        };
        let mut ask = Vec::new();
        let held = self.store.any_pin(|room, pin| {
            if pin.node != *node {
                return false;
            }
            let recent = pin.confirmed_at >= confirmed_since
                || self.recent.joined_since(room.stable_hash(), own_since);
            if !recent && shared {
                ask.push(room.clone());
            }
            recent
        });
        if held {
            return Ok(true);
        }
        // Other routers confirm in the store without telling this router's cache: the
        // store's own copy decides (a few rooms at most: the node reported none).
        for room in ask {
            let stored = self.store.get_stored(&room).await?;
            if stored.is_some_and(|p| p.node == *node && p.confirmed_at >= confirmed_since) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How long after its last confirmation a pin may still have a ticket another router
    /// issued on its way. Their joins are not in this router's `recent` table, but a join
    /// confirms the pin whenever the confirmation it sees is older than
    /// [`Router::confirm_every_ms`] (and the store's is never older than the one a router
    /// sees), so every join routed within the last ticket lifetime left a confirmation at
    /// most that much older; node reports confirm it too while the room is live. Plus a
    /// heartbeat interval for the routers' clocks to disagree by.
    fn shared_ticket_hold_ms(&self) -> u64 {
        self.ticket_window_ms
            + self.confirm_every_ms()
            + self.placement.heartbeat_interval.as_millis() as u64
    }

    /// `placement.share_reservations`: tells the other routers (through the store) this
    /// router's reservation on every node where it changed since the last call, or with
    /// `again` on every node where it is not zero (the periodic repeat that keeps it alive in
    /// their tables). Returns how many nodes it told about.
    pub fn share_reservations(&self, again: bool) -> usize {
        let now = self.clock.now();
        let mut told = 0;
        for e in self.cluster.snapshot().nodes() {
            if let Some(milli) = e.live.reserved_to_share(again) {
                self.store.share_node(NodeUpdate::Reserved {
                    id: e.id.to_string(),
                    router: self.instance.clone(),
                    reserved_milli: milli,
                    at: now,
                });
                told += 1;
            }
        }
        told
    }

    /// Releases idle pins, expired reservations and stale history. Returns pins released.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        // The sweep may be the first to run after a pause: the gap is the router's, and
        // the pins are given it back before they are judged idle.
        self.bridge_gap(now);
        let idle_ms = self.idle_ms();
        let given_back = self
            .bridging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .given_back(now, idle_ms);
        let cutoff = now.saturating_sub(idle_ms + given_back);
        let mark = self.book.mark();
        let released = self.store.sweep_idle(cutoff, now).await?;
        for (room, node) in &released {
            self.end_session(room);
            // Not a reservation a join made once the pin was gone (the room placed again).
            self.book.release_older(room, Some(node), mark);
            self.metrics.released("idle");
        }
        self.settle_observed(now);
        // Times later than now come from before a backward step of the wall clock. Now as
        // of here: the store's sweep may have taken a while, and a join or report recorded
        // meanwhile is no time from before a step.
        let now = self.clock.now().max(now);
        for e in self.cluster.snapshot().nodes() {
            e.live.clamp_heartbeat(now);
        }
        self.recent.clamp(now);
        self.forget_silent_nodes(now).await;
        self.book.sweep(now);
        // What the other routers learned since the last sweep (a shared store).
        for (room, learned) in self.store.take_learned() {
            self.history.restore(room, learned);
        }
        let forget_before = self.history_cutoff(now);
        self.history.sweep(forget_before, now);
        self.store.forget_learned(forget_before, now);
        Ok(released.len())
    }

    /// Takes out of the node table each node that registered itself by heartbeat, has not
    /// reported for `placement.forget_node_after` and is not healthy, telling the other
    /// routers as a `DELETE` would, but with its last word of the node (a router, or the
    /// stored record, with newer word keeps the node). Time spent deciding alone (the store
    /// out of reach: the nodes heard only through it are silent then, not gone) and pauses of
    /// the router itself ([`Router::bridge_gap`]) are not the nodes' silence. Nor is a node
    /// the shared store says another router still hears, or cannot say: this router's view
    /// may be the one behind. Returns how many.
    async fn forget_silent_nodes(&self, now: Millis) -> usize {
        let after = self.placement.forget_node_after.as_millis() as u64;
        if after == 0 {
            return 0;
        }
        if self.store.deciding_alone() {
            self.alone_seen.fetch_max(now, Ordering::AcqRel);
            return 0;
        }
        let alone_seen = self.alone_seen.load(Ordering::Acquire);
        let gaps = self
            .bridging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recent();
        let silent = |e: &NodeEntry| {
            let word = e.live.last_word();
            let since = word.max(alone_seen);
            let awake = now
                .saturating_sub(since)
                .saturating_sub(Gaps::given_back_since(&gaps, since));
            !e.is_static && word > 0 && awake >= after && !self.is_healthy(e, now)
        };
        let mut forgotten = 0;
        for e in self.cluster.snapshot_arc().nodes() {
            if !silent(e) {
                continue;
            }
            let heard = self.store.node_alive_elsewhere(&e.id).await;
            if heard == Some(true) || (heard.is_none() && self.store.shared()) {
                continue;
            }
            // The word as the removal judged it, under the table's lock (a report recorded
            // after it is news the removal did not have).
            let judged = std::cell::Cell::new(0);
            let still = |e: &NodeEntry| {
                judged.set(e.live.last_word());
                silent(e)
            };
            if self.cluster.remove_if(&e.id, still).is_some() {
                let word = judged.get();
                self.store.share_node(NodeUpdate::Removed {
                    id: e.id.to_string(),
                    at: now,
                    silent_since: Some(word),
                });
                tracing::info!(
                    node = %e.id,
                    silent_s = now.saturating_sub(word) / 1000,
                    "node silent for placement.forget_node_after; forgotten"
                );
                forgotten += 1;
            }
        }
        forgotten
    }

    /// Learned sizes last seen before this are forgotten (`history_ttl`).
    fn history_cutoff(&self, now: Millis) -> Millis {
        now.saturating_sub(self.placement.history_ttl.as_millis() as u64)
    }

    /// A room's session ended: its peak joins its history, which the store keeps.
    fn end_session(&self, room: &RoomKey) {
        if let Some(learned) = self.history.end_session(room) {
            self.store.save_learned(room, learned);
        }
    }

    /// Takes the room sizes the store kept from earlier runs (a shared store; the memory
    /// store has none), leaving out those older than `history_ttl`. Returns how many.
    pub async fn restore_history(&self) -> Result<usize, StoreError> {
        let before = self.history_cutoff(self.clock.now());
        let mut n = 0;
        for (room, learned) in self.store.load_learned().await? {
            if learned.last_seen >= before {
                self.history.restore(room, learned);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Admin or node: the node leaves now. Its rooms are re-placed on their next join.
    pub fn remove_node(&self, id: &NodeId) -> bool {
        let gone = self.cluster.remove(id).is_some();
        if gone {
            self.store.share_node(NodeUpdate::Removed {
                id: id.to_string(),
                at: self.clock.now(),
                silent_since: None,
            });
            tracing::info!(node = %id, "node removed");
        }
        gone
    }

    /// Admin: register or update a node by hand.
    pub fn put_node(&self, id: &NodeId, info: NodeInfo) -> Upsert {
        let wire = WireInfo::from(&info);
        let (outcome, entry) = self.cluster.upsert(id, info, true);
        // A removal another router decided before now is older news here (`NodeSync::apply`).
        entry.live.note_registered(self.clock.now());
        self.store.share_node(NodeUpdate::Put {
            id: id.to_string(),
            info: wire,
        });
        outcome
    }

    /// Admin: drains, disables or enables a node; for a node that left under a drain or
    /// disable, sets the state it comes back with. False if the node is unknown.
    pub fn set_admin_state(&self, id: &NodeId, state: AdminState) -> bool {
        // Shared while the change's number is held (`Cluster::set_admin_state_then`): a
        // shared store's re-sync must not undo a change it read too early to see.
        let listed = self.cluster.set_admin_state_then(id, state, || {
            self.store.share_node(NodeUpdate::Admin {
                id: id.to_string(),
                state,
            })
        });
        match listed {
            Some(true) => tracing::info!(node = %id, state = state.as_str(), "admin state set"),
            Some(false) => {
                tracing::info!(node = %id, state = state.as_str(), "admin state set for the node's return")
            }
            None => {}
        }
        listed.is_some()
    }

    pub fn node_status(&self, e: &NodeEntry, now: Millis) -> NodeStatus {
        let live = &e.live;
        NodeStatus {
            id: e.id.clone(),
            info: e.info.clone(),
            state: live.effective_state(),
            admin_state: live.admin_state(),
            reported_state: live.self_state(),
            healthy: self.is_healthy(e, now),
            load: live.reported_load(),
            cpu: live.reported_cpu(),
            utilization: e.utilization(),
            pending: live.pending_units(),
            reserved: live.reserved_units(),
            reserved_by_others: live.others_reserved_units(),
            rooms: live.reported_rooms.lock().map(|r| r.len()).unwrap_or(0),
            last_heartbeat_ms_ago: live.last_heartbeat().map(|t| now.saturating_sub(t)),
            is_static: e.is_static,
        }
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        let now = self.clock.now();
        let snap = self.cluster.snapshot();
        snap.nodes()
            .iter()
            .map(|e| self.node_status(e, now))
            .collect()
    }

    pub fn node(&self, id: &NodeId) -> Option<NodeStatus> {
        let now = self.clock.now();
        self.cluster
            .snapshot()
            .get(id)
            .map(|e| self.node_status(e, now))
    }

    /// A room's pin with no side effects.
    pub async fn room(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        self.store.get(room).await
    }

    /// Admin: forget a room's pin; its next join places it afresh.
    pub async fn delete_room(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        let mark = self.book.mark();
        let removed = self.store.remove(room).await?;
        if removed.is_some() {
            // Not a reservation a join made once the pin was gone (the room placed again).
            self.book.release_older(room, None, mark);
            self.metrics.released("admin");
        }
        Ok(removed)
    }

    /// Explains where the room would go, node by node, and what it would reserve there. No
    /// side effects.
    pub async fn explain(
        &self,
        room: &RoomKey,
        hints: &Hints<'_>,
        size: Option<u32>,
    ) -> Result<Explanation, StoreError> {
        let (expected_size, size_source) = self.expected_size(room, size);
        let now = self.clock.now();
        let pin = self.store.get(room).await?;
        let snap: Arc<Snapshot> = self.cluster.snapshot_arc();
        let pinned = pin.as_ref().and_then(|p| snap.position(&p.node));
        let hints = &Hints {
            expected_load: f64::from(expected_size),
            ..*hints
        };
        let (mut d, rows) = explain(
            snap.candidates(),
            pinned,
            room.stable_hash(),
            hints,
            now,
            &self.params,
        );
        // While the store is out of reach, joins are decided by the shared rule: the answer
        // says what a join would get; the nodes' rows stay the configured rule's view.
        let alone = self.store.deciding_alone();
        if alone {
            d = self.decide(&snap, pinned, room, hints, now);
        }
        let (decision, node) = match d {
            Decision::Pinned(i) => ("pinned", Some(i)),
            Decision::NodeFull(i) => ("node_full", Some(i)),
            Decision::Place {
                node,
                overflow: false,
            } => ("place", Some(node)),
            Decision::Place {
                node,
                overflow: true,
            } => ("place_overflow", Some(node)),
            Decision::NoCapacity => ("no_capacity", None),
        };
        Ok(Explanation {
            room: room.clone(),
            pinned: pin.map(|p| p.node),
            decision: decision.to_string(),
            node: node.map(|i| snap.nodes()[i].id.clone()),
            rule: if alone {
                "alone"
            } else {
                self.params.rule.name()
            },
            expected_size,
            size_source,
            reserved_for_ms: self.placement.reservation_ttl_ms(size_source),
            nodes: rows
                .into_iter()
                .map(|row| ExplainRow {
                    node: snap.nodes()[row.index].id.clone(),
                    row,
                })
                .collect(),
        })
    }

    /// Fills the state gauges and renders the metrics.
    pub async fn render_metrics(&self) -> String {
        let pins = self.store.count().await.ok();
        let now = self.clock.now();
        let snap = self.cluster.snapshot_arc();
        self.metrics.render_with(|m| {
            let healthy = snap
                .nodes()
                .iter()
                .filter(|e| self.is_healthy(e, now))
                .count();
            m.nodes_total.set(snap.nodes().len() as i64);
            m.nodes_healthy.set(healthy as i64);
            // Afresh: a removed node's series goes with it.
            m.node_utilization.clear();
            let mut upstream = Vec::with_capacity(snap.nodes().len());
            for e in snap.nodes() {
                let labels = crate::metrics::NodeLabels {
                    node: e.id.to_string(),
                };
                let reading = e.live.upstream_response.read();
                m.node_utilization
                    .get_or_create(&labels)
                    .set(e.utilization());
                if reading.count() > 0 {
                    upstream.push((labels, reading));
                }
            }
            m.upstream_response.set(upstream);
            if let Some(n) = pins {
                m.pins.set(n as i64);
            }
            m.learned_rooms.set(self.history.len() as i64);
            m.store_degraded
                .set(i64::from(self.store.health() != StoreHealth::Ok));
        })
    }

    /// How far behind the last time the router was seen awake a clock read may be before it
    /// counts as a backward step of the clock rather than a read racing another thread's.
    const STEP_SLACK_MS: u64 = 1_000;

    /// How often the service calls [`Router::watch`].
    pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

    /// Called every [`Router::WATCH_EVERY`] by the service: notes that the router is
    /// awake, so that a gap in these calls shows a pause of the router (a stopped process,
    /// a paused VM) or a forward step of the wall clock (`Router::bridge_gap`).
    pub fn watch(&self, now: Millis) {
        self.step_back_to(now);
        self.bridge_gap(now);
        self.awake.fetch_max(now, Ordering::AcqRel);
    }

    /// After a backward step of the wall clock (NTP correcting a clock that ran ahead),
    /// brings the times gap detection measures from back to `now`: left ahead, `awake`
    /// would show no gap at all for as long as the step (a pause of the router in that
    /// while would find every node dead, and move rooms off nodes that serve them), and
    /// the last gap's end would keep giving its time back to idle pins. A read a little
    /// behind another thread's (`Router::STEP_SLACK_MS`) is no step.
    fn step_back_to(&self, now: Millis) {
        let awake = self.awake.load(Ordering::Acquire);
        if awake <= now.saturating_add(Self::STEP_SLACK_MS) {
            return;
        }
        let mut gaps = self.bridging.lock().unwrap_or_else(|p| p.into_inner());
        // A racing `fetch_max` from before the step is as old as the one replaced here.
        let _ = self
            .awake
            .compare_exchange(awake, now, Ordering::AcqRel, Ordering::Acquire);
        gaps.ended = gaps.ended.min(now);
        tracing::warn!(
            step_ms = awake - now,
            "the wall clock stepped back; pause detection measures from now"
        );
    }

    /// A gap since the router was last seen awake longer than half the heartbeat timeout
    /// is the router's own: its nodes went unheard only because it was not listening (or
    /// its clock jumped), and judged on the wall clock they would all look dead at once,
    /// their rooms moved off nodes that serve them (and then evicted from them). The gap is
    /// bridged: every node healthy when it began has its heartbeat time moved on by it, so
    /// that it is judged on the time the router was there to hear it. Called by the watch,
    /// and first thing by every path that judges health before moving anything (the
    /// general join path, heartbeats), which may run before the watch after a pause.
    fn bridge_gap(&self, now: Millis) {
        let timeout = self.params.heartbeat_timeout_ms;
        let longest = (timeout / 2).max(1_000);
        let last = self.awake.load(Ordering::Acquire);
        if last == 0 {
            return;
        }
        if now.saturating_sub(last) <= longest {
            // Awake: this call counts too, so that a watch delayed on a busy runtime is
            // no gap while joins and heartbeats are being served.
            self.awake.fetch_max(now, Ordering::AcqRel);
            return;
        }
        // One caller bridges a gap; the others wait for it, then find the gap closed.
        let mut gaps = self.bridging.lock().unwrap_or_else(|p| p.into_inner());
        let last = self.awake.load(Ordering::Acquire);
        let gap = now.saturating_sub(last);
        if gap <= longest {
            return;
        }
        let mut held = 0usize;
        for e in self.cluster.snapshot().nodes() {
            // A report heard after the gap began (relayed by another router) is no later
            // than `last` for this purpose: the node is then heard from now, not after.
            if let Some(t) = e.live.last_heartbeat().filter(|t| t + timeout > last) {
                e.live.hold_heartbeat(t.min(last) + gap);
                held += 1;
            }
        }
        // The hold is time for the nodes to report in, which the gap was not.
        let until = self.hold_until.load(Ordering::Acquire);
        if last < until {
            self.hold_until.store(until + gap, Ordering::Release);
        }
        gaps.add(gap, now, self.idle_ms());
        self.awake.fetch_max(now, Ordering::AcqRel);
        tracing::warn!(
            gap_ms = gap,
            nodes = held,
            "the router was not running for a while (paused, or its clock stepped forward); nodes healthy before are given that time back"
        );
    }

    /// While the startup hold lasts, how much of it is left (ms). A wall clock stepped back
    /// meanwhile (NTP at boot) lengthens the hold by the step rather than ending it, unless
    /// the step is longer than the hold itself: no router waits an hour for a clock.
    fn holding(&self, now: Millis) -> Option<u64> {
        let until = self.hold_until.load(Ordering::Acquire);
        let hold = until.saturating_sub(self.started);
        (now < until && now.saturating_add(hold) >= self.started).then(|| until - now)
    }

    /// Readiness: the startup hold is over, the store answers and at least one node is
    /// healthy. Reasons when not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let now = self.clock.now();
        let mut reasons = Vec::new();
        if let Some(left) = self.holding(now) {
            reasons.push(format!(
                "starting: new rooms wait {}s more for the nodes to report theirs (placement.startup_hold)",
                left.div_ceil(1000)
            ));
        }
        if let StoreHealth::Degraded(why) = self.store.health() {
            reasons.push(format!("store degraded: {why}"));
        }
        let snap = self.cluster.snapshot();
        if !snap.nodes().iter().any(|e| self.is_healthy(e, now)) {
            reasons.push("no healthy node".to_string());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

fn static_info(n: &StaticNode) -> NodeInfo {
    let mut tags = n.tags.clone();
    tags.sort();
    tags.dedup();
    NodeInfo {
        url: n.url.trim_end_matches('/').to_string(),
        upstream: n
            .upstream
            .clone()
            .unwrap_or_else(|| n.url.clone())
            .trim_end_matches('/')
            .to_string(),
        capacity: n.capacity,
        region: n.region.clone(),
        tags,
    }
}

/// A heartbeat failed half-way: the rooms it listed so far join the node's reported rooms,
/// so that one first listed here and gone by the next heartbeat is found ended then, not
/// left to the idle sweep. Returns `e`.
fn keep_listed(entry: &NodeEntry, listed: HashSet<RoomKey>, e: StoreError) -> StoreError {
    entry
        .live
        .reported_rooms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(listed);
    e
}

/// The router's latest gaps (pauses, forward steps of the clock; [`Router::bridge_gap`]),
/// for the idle sweep: a pin idle since before a gap is given the gap back, as the nodes
/// are. Gaps within one idle TTL of each other add up; the sum is given to every pin
/// while the last gap is less than a TTL old (more than some pins are owed, never less).
/// For forgetting silent nodes (over a day, say), the latest gaps themselves.
#[derive(Debug, Default)]
struct Gaps {
    /// When the last gap ended (clock ms).
    ended: Millis,
    /// The gaps' length, summed (ms).
    total: u64,
    /// The latest gaps, as (when it ended, how long), oldest first; at most
    /// [`Gaps::KEPT`], the oldest two merged into one (later, and as long as both) past it.
    recent: std::collections::VecDeque<(Millis, u64)>,
}

impl Gaps {
    const KEPT: usize = 32;

    fn add(&mut self, gap: u64, now: Millis, idle_ms: u64) {
        if now.saturating_sub(self.ended) >= idle_ms {
            self.total = 0;
        }
        self.total += gap;
        self.ended = now;
        self.recent.push_back((now, gap));
        if self.recent.len() > Self::KEPT {
            // Merged, they are given back as long as the later was: more than some nodes
            // are owed, never less.
            let (_, first) = self.recent.pop_front().unwrap_or_default();
            if let Some(second) = self.recent.front_mut() {
                second.1 += first;
            }
        }
    }

    /// The latest gaps, for [`Gaps::given_back_since`] without the lock.
    fn recent(&self) -> Vec<(Millis, u64)> {
        self.recent.iter().copied().collect()
    }

    /// How much of the time since `word` the router was not running, of `recent`: what a
    /// node silent since `word` is given back (`placement.forget_node_after`).
    fn given_back_since(recent: &[(Millis, u64)], word: Millis) -> u64 {
        recent
            .iter()
            .map(|&(ended, gap)| ended.saturating_sub(ended.saturating_sub(gap).max(word)))
            .sum()
    }

    /// What a sweep at `now` gives back to pins idle since before the gaps. Once the last
    /// gap is an idle TTL old, every pin from before it is idle on any count.
    fn given_back(&self, now: Millis, idle_ms: u64) -> u64 {
        if now.saturating_sub(self.ended) < idle_ms {
            self.total
        } else {
            0
        }
    }
}

/// A node's reported rooms taken out for a heartbeat to compare with; put back (merged with
/// whatever another heartbeat stored meanwhile) unless [`PutBack::done`] says the heartbeat
/// got through, so that an error or a dropped request loses nothing.
struct PutBack<'a> {
    slot: &'a std::sync::Mutex<HashSet<RoomKey>>,
    rooms: Option<HashSet<RoomKey>>,
}

impl<'a> PutBack<'a> {
    fn take(slot: &'a std::sync::Mutex<HashSet<RoomKey>>) -> Self {
        let rooms = std::mem::take(&mut *slot.lock().unwrap_or_else(|p| p.into_inner()));
        PutBack {
            slot,
            rooms: Some(rooms),
        }
    }

    fn rooms(&self) -> impl Iterator<Item = &RoomKey> {
        self.rooms.iter().flatten()
    }

    /// The heartbeat stores its own list: nothing to put back.
    fn done(mut self) {
        self.rooms = None;
    }
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if let Some(rooms) = self.rooms.take() {
            self.slot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(rooms);
        }
    }
}

#[cfg(test)]
mod tests;
