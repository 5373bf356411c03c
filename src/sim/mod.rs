//! The placement simulator: replays a workload through a placement policy in virtual time.
//!
//! Pure and deterministic: a discrete-event loop over a seeded workload, no clock, no threads,
//! no I/O. It models what the real deployment sees: `routers` routers, each with its own
//! `pending` per node (reset by each heartbeat) and, for ours, its own book of reservations
//! (with `Policy::Ours { shared_ms: Some(d), .. }`, as the default has it, each router also
//! adds the reservations of the others as they stood `d` ms earlier: `SharedBook`);
//! nodes that report their true load every `heartbeat_ms`; a shared pin store (a pinned room
//! always joins its node; joins to a pinned node at or above `join_limit` are refused);
//! a node added at the workload's scale-out time and node 0 failing at its failure time
//! (its participants reconnect through the routers within 20 s, retrying every `retry_ms`
//! while a router still sends them to the dead node).
//!
//! Besides the realized load (participants present), each node carries an *offered* load:
//! the participants present plus those refused because their room is pinned to it, counted
//! there for the stay they would have had. The realized load of a pinned node cannot pass
//! `join_limit`, so the offered load is what shows how much a policy piled onto a node.
//!
//! [`simulate`] runs one workload through one policy; [`standard::run_all`] runs the standard
//! workloads through every policy; [`cli`] is the `simulate` command.

pub mod cli;
pub mod policy;
pub mod report;
pub mod standard;
pub mod trace;
pub mod workload;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::PlacementConfig;
use crate::placement::hash::{node_hash, pair_hash, room_hash};
use crate::placement::reservation::{expected_size, Reservation, SizeSource};
use crate::placement::{
    decide, is_healthy, pin_holds, ChoiceRule, Decision, Hints, Millis, Params,
};
pub use policy::Policy;
use policy::{Ring, ViewNode};
pub use report::{PolicyResult, Report, WorkloadResult};
pub use workload::{HintMode, StandardWorkload, Stream, Workload};

/// The cluster and the routers' knobs for one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Capacities of the initial nodes; a scale-out adds one of their mean capacity.
    pub capacities: Vec<f64>,
    pub routers: usize,
    /// Every node reports its true load this often (staggered across nodes).
    pub heartbeat_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub new_room_limit: f64,
    pub join_limit: f64,
    pub join_cost: f64,
    /// Expected size of a room without hint or history.
    pub new_room_reserve: u32,
    /// How long a reservation of that guess lasts.
    #[serde(default = "guess_ttl_ms")]
    pub new_room_reserve_ttl_ms: u64,
    /// How long a reservation of a hinted or learned size lasts at most.
    pub reservation_ttl_ms: u64,
    /// Larger size hints are clamped to this, as the router does (`placement.max_size_hint`).
    #[serde(default = "max_size_hint")]
    pub max_size_hint: u32,
    /// How often utilization is sampled for the figures.
    pub sample_ms: u64,
    /// Max/mean is averaged over the time the cluster is at least this busy.
    pub busy_threshold: f64,
    /// A participant sent to a dead node tries again after this long.
    pub retry_ms: u64,
    pub seed: u64,
}

/// The router's default `placement.max_size_hint`.
fn max_size_hint() -> u32 {
    PlacementConfig::default().max_size_hint
}

/// The router's default `placement.new_room_reserve_ttl`, in ms.
fn guess_ttl_ms() -> u64 {
    PlacementConfig::default().new_room_reserve_ttl.as_millis() as u64
}

impl SimConfig {
    /// The router's placement defaults, for `nodes` equal nodes; heartbeat timeout three
    /// intervals.
    pub fn new(nodes: usize, capacity: f64, routers: usize, heartbeat_ms: u64, seed: u64) -> Self {
        let d = Params::default();
        let p = PlacementConfig::default();
        SimConfig {
            capacities: vec![capacity; nodes],
            routers: routers.max(1),
            heartbeat_ms: heartbeat_ms.max(1),
            heartbeat_timeout_ms: 3 * heartbeat_ms.max(1),
            new_room_limit: d.new_room_limit,
            join_limit: d.join_limit,
            join_cost: 1.0,
            new_room_reserve: p.new_room_reserve,
            new_room_reserve_ttl_ms: p.new_room_reserve_ttl.as_millis() as u64,
            reservation_ttl_ms: p.reservation_ttl.as_millis() as u64,
            max_size_hint: p.max_size_hint,
            sample_ms: workload::SECOND,
            busy_threshold: 0.30,
            retry_ms: 2 * workload::SECOND,
            seed,
        }
    }

    fn params(&self, rule: ChoiceRule) -> Params {
        Params {
            new_room_limit: self.new_room_limit,
            join_limit: self.join_limit,
            heartbeat_timeout_ms: self.heartbeat_timeout_ms,
            region_affinity: false,
            rule,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Participant `p` of session `s` joins (`retry`: not a new request).
    Join {
        s: u32,
        p: u32,
        retry: bool,
    },
    Leave {
        s: u32,
        p: u32,
    },
    Heartbeat(u32),
    ScaleOut,
    Fail,
    /// After the failure is detected: which other rooms would now go elsewhere.
    ProbeAfterFailure,
}

/// Node `n`'s û as a router sees it: the last report plus that router's pending joins and
/// reservations there and the other routers' reservations it heard of (as the router's
/// `Live::utilization`).
fn seen_util(n: &Node, pending: f64, reserved: f64, others: f64) -> f64 {
    (f64::from(n.reported) + pending + reserved + others) / n.capacity
}

struct Node {
    hash: u64,
    capacity: f64,
    exists: bool,
    alive: bool,
    load: u32,
    /// Refused joins of rooms pinned here (`NodeFull`), until the leave they would have had.
    refused: u32,
    /// Participants at the last report.
    reported: u32,
    /// With Scalelite: the last report as Scalelite's poller records it (every meeting
    /// younger than 15 minutes counted as at least 15 users).
    scalelite_reported: u32,
    /// With Scalelite: meetings created here since the last report (+1 each, whichever
    /// router created them).
    created_since: u32,
    /// With Scalelite: the meetings created here that may still be young: (session, when).
    young: Vec<(usize, Millis)>,
    last_hb: Option<Millis>,
}

struct Booked {
    session: usize,
    node: usize,
    r: Reservation,
}

struct Router {
    pending: Vec<f64>,
    /// Joins sent to each node since its last report (`pending` counts them in `join_cost`).
    sent: Vec<u32>,
    reserved: Vec<f64>,
    book: Vec<Booked>,
    rng: StdRng,
}

/// Reservations shared between routers, as routers sharing a store could publish them: every
/// change of a router's reserved amount on a node (a new reservation, a join it sent that
/// consumed one, a release at a node's report: participants arrived, TTL passed, room ended)
/// becomes visible to the other routers `delay` ms after it happened. A router sees its own
/// reservations at once, as before.
struct SharedBook {
    delay: u64,
    /// Changes not yet visible: (when made, router, node, change), in time order.
    queue: VecDeque<(Millis, usize, usize, f64)>,
    /// Visible reserved amount per router and node (what the others see of each router).
    published: Vec<Vec<f64>>,
    /// Visible reserved amount per node, summed over routers.
    total: Vec<f64>,
}

impl SharedBook {
    fn new(delay: u64, routers: usize, nodes: usize) -> Self {
        SharedBook {
            delay,
            queue: VecDeque::new(),
            published: vec![vec![0.0; nodes]; routers],
            total: vec![0.0; nodes],
        }
    }

    fn publish(&mut self, t: Millis, r: usize, node: usize, change: f64) {
        if change != 0.0 {
            self.queue.push_back((t, r, node, change));
        }
    }

    /// Makes visible every change made at or before `t - delay`.
    fn advance(&mut self, t: Millis) {
        while let Some(&(at, r, node, change)) = self.queue.front() {
            if at.saturating_add(self.delay) > t {
                break;
            }
            self.queue.pop_front();
            self.published[r][node] += change;
            self.total[node] += change;
        }
    }

    /// What router `r` sees of the other routers' reservations on `node`.
    fn others(&self, r: usize, node: usize) -> f64 {
        self.total[node] - self.published[r][node]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Presence {
    Waiting,
    Joined(usize),
    /// Refused because the room's node was full: still offered to that node until its leave.
    Refused(usize),
    Gone,
}

#[derive(Default)]
struct Room {
    hash: u64,
    pin: Option<usize>,
    /// Participants per node (more than one entry with a count > 0 is a split).
    on: Vec<(usize, u32)>,
    present: u32,
    peak: u32,
    split: bool,
    first_node: Option<usize>,
    /// When the room was last placed (its meeting created on its node).
    placed_at: Millis,
    /// Had participants on the node that failed, and has not come back yet.
    on_failed: bool,
}

impl Room {
    fn add(&mut self, node: usize) {
        if self.on.iter().any(|&(n, c)| n != node && c > 0) {
            self.split = true;
        }
        match self.on.iter_mut().find(|(n, _)| *n == node) {
            Some((_, c)) => *c += 1,
            None => self.on.push((node, 1)),
        }
        self.present += 1;
        self.peak = self.peak.max(self.present);
    }

    fn remove(&mut self, node: usize) {
        if let Some((_, c)) = self.on.iter_mut().find(|(n, _)| *n == node) {
            *c -= 1;
        }
        self.on.retain(|&(_, c)| c > 0);
        self.present -= 1;
    }

    fn on_node(&self, node: usize) -> u32 {
        self.on
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |&(_, c)| c)
    }
}

#[derive(Default)]
struct Sampler {
    samples: u64,
    busy: u64,
    ratio_sum: f64,
    peak: f64,
    /// Highest offered utilization: (present + refused on the node) / capacity.
    offered_peak: f64,
    /// When the offered peak was first reached, and the cluster's mean utilization then.
    offered_peak_at: Millis,
    mean_at_offered_peak: f64,
    over: u64,
}

/// Runs `w` through `policy` on the cluster of `cfg`.
pub fn simulate(w: &Workload, policy: Policy, cfg: &SimConfig) -> PolicyResult {
    Sim::new(w, policy, cfg).run()
}

/// A room's session ended with `peak` participants at its busiest: the newest of the three
/// peaks remembered, as `RoomHistory::end_session` does.
fn remember(peaks: &mut [u32; 3], peak: u32) {
    *peaks = [peak, peaks[0], peaks[1]];
}

/// The history the routers start with: the workload's earlier sessions, oldest first.
fn learned_before(w: &Workload) -> HashMap<u64, [u32; 3]> {
    let mut history: HashMap<u64, [u32; 3]> = HashMap::new();
    for (room, peak) in &w.learned {
        remember(
            history.entry(room_hash(room.as_bytes())).or_default(),
            *peak,
        );
    }
    history
}

struct Sim<'a> {
    w: &'a Workload,
    policy: Policy,
    cfg: &'a SimConfig,
    params: Params,
    nodes: Vec<Node>,
    routers: Vec<Router>,
    /// With reservations shared between routers.
    shared: Option<SharedBook>,
    ring: Ring,
    rooms: Vec<Room>,
    presence: Vec<Vec<Presence>>,
    /// Learned room sizes as the router's `RoomHistory` keeps them: the peaks of a room's
    /// last three sessions, newest first; the expected size is the largest.
    history: HashMap<u64, [u32; 3]>,
    heap: BinaryHeap<Reverse<(Millis, u64, Ev)>>,
    seq: u64,
    view: Vec<ViewNode>,
    /// With Scalelite: each node's Scalelite load over capacity, as the routers see it.
    scalelite_view: Vec<f64>,
    rng: StdRng,
    next_sample: Millis,
    sampler: Sampler,
    joins: u64,
    refusals: u64,
    refusals_measured: u64,
    /// Measured refusals no node could take (`NoCapacity`): in no node's offered load.
    no_capacity_measured: u64,
    moved_on_scale_out: u64,
    moved_on_failure: u64,
    replaced_after_failure: u64,
}

const FAILED_NODE: usize = 0;

impl<'a> Sim<'a> {
    fn new(w: &'a Workload, policy: Policy, cfg: &'a SimConfig) -> Self {
        let n0 = cfg.capacities.len();
        let mean = cfg.capacities.iter().sum::<f64>() / n0.max(1) as f64;
        let mut nodes: Vec<Node> = cfg
            .capacities
            .iter()
            .chain(w.scale_out_at.map(|_| mean).as_ref())
            .enumerate()
            .map(|(i, &capacity)| Node {
                hash: node_hash(format!("node-{i}").as_bytes()),
                capacity,
                exists: i < n0,
                alive: i < n0,
                load: 0,
                refused: 0,
                reported: 0,
                scalelite_reported: 0,
                created_since: 0,
                young: Vec::new(),
                last_hb: (i < n0).then_some(0),
            })
            .collect();
        if nodes.is_empty() {
            nodes.push(Node {
                hash: node_hash(b"node-0"),
                capacity: 1.0,
                exists: false,
                alive: false,
                load: 0,
                refused: 0,
                reported: 0,
                scalelite_reported: 0,
                created_since: 0,
                young: Vec::new(),
                last_hb: None,
            });
        }
        let n = nodes.len();
        let hashes: Vec<u64> = nodes.iter().map(|x| x.hash).collect();
        let caps: Vec<f64> = nodes.iter().map(|x| x.capacity).collect();
        let routers = (0..cfg.routers)
            .map(|r| Router {
                pending: vec![0.0; n],
                sent: vec![0; n],
                reserved: vec![0.0; n],
                book: Vec::new(),
                rng: Stream::Router(r).rng(cfg.seed),
            })
            .collect();
        let rule = match policy {
            Policy::Ours { rule, .. } => rule,
            _ => ChoiceRule::TopTwo,
        };
        let mut sim = Sim {
            w,
            policy,
            cfg,
            params: cfg.params(rule),
            ring: Ring::new(&hashes, &caps),
            nodes,
            shared: policy
                .shared_delay_ms()
                .map(|d| SharedBook::new(d, cfg.routers, n)),
            routers,
            rooms: w
                .sessions
                .iter()
                .map(|s| Room {
                    hash: room_hash(s.room.as_bytes()),
                    ..Room::default()
                })
                .collect(),
            presence: w
                .sessions
                .iter()
                .map(|s| vec![Presence::Waiting; s.stays.len()])
                .collect(),
            history: learned_before(w),
            heap: BinaryHeap::new(),
            seq: 0,
            view: Vec::with_capacity(n),
            scalelite_view: Vec::with_capacity(n),
            rng: Stream::Reconnect.rng(cfg.seed),
            next_sample: 0,
            sampler: Sampler::default(),
            joins: 0,
            refusals: 0,
            refusals_measured: 0,
            no_capacity_measured: 0,
            moved_on_scale_out: 0,
            moved_on_failure: 0,
            replaced_after_failure: 0,
        };
        for (s, session) in w.sessions.iter().enumerate() {
            for (p, stay) in session.stays.iter().enumerate() {
                let (s, p) = (s as u32, p as u32);
                sim.push(stay.join, Ev::Join { s, p, retry: false });
                sim.push(stay.leave, Ev::Leave { s, p });
            }
        }
        for i in 0..n0 {
            let phase = (u128::from(cfg.heartbeat_ms) * i as u128 / n0 as u128) as u64;
            sim.push(phase.max(1), Ev::Heartbeat(i as u32));
        }
        if let Some(t) = w.scale_out_at {
            sim.push(t, Ev::ScaleOut);
        }
        if let Some(t) = w.fail_at {
            if n0 > 0 {
                sim.push(t, Ev::Fail);
            }
        }
        sim
    }

    fn push(&mut self, t: Millis, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn run(mut self) -> PolicyResult {
        while let Some(Reverse((t, _, ev))) = self.heap.pop() {
            if t >= self.w.end {
                break;
            }
            self.sample_until(t);
            match ev {
                Ev::Join { s, p, retry } => self.join(t, s as usize, p as usize, retry),
                Ev::Leave { s, p } => self.leave(s as usize, p as usize),
                Ev::Heartbeat(i) => self.heartbeat(t, i as usize),
                Ev::ScaleOut => self.scale_out(t),
                Ev::Fail => self.fail(t),
                Ev::ProbeAfterFailure => {
                    // At one instant, with the failed node seen dead and seen alive: what the
                    // failure alone moved. (Comparing with the routes at the failure would
                    // also count what the seconds between changed: a policy that routes by
                    // current counts, as bounded loads do, moves rooms all the time.)
                    let after = self.routes(t);
                    let last = self.nodes[FAILED_NODE].last_hb;
                    self.nodes[FAILED_NODE].last_hb = Some(t);
                    let before = self.routes(t);
                    self.nodes[FAILED_NODE].last_hb = last;
                    self.moved_on_failure = (0..self.rooms.len())
                        .filter(|&s| {
                            !self.rooms[s].on_failed
                                && before[s].is_some_and(|b| b != FAILED_NODE)
                                && after[s].is_some()
                                && after[s] != before[s]
                        })
                        .count() as u64;
                }
            }
        }
        self.sample_until(self.w.end);
        self.finish()
    }

    /// Takes the samples due up to (not including) `t`, while in the measured part.
    fn sample_until(&mut self, t: Millis) {
        let stop = t.min(self.w.measure_until);
        while self.next_sample < stop {
            // This sample is the state after every event at or before `at`.
            let at = self.next_sample;
            self.next_sample = self.next_sample.saturating_add(self.cfg.sample_ms.max(1));
            let (mut load, mut cap, mut max_u, mut over) = (0.0, 0.0, 0.0f64, false);
            let mut max_offered = 0.0f64;
            for n in self.nodes.iter().filter(|n| n.exists && n.alive) {
                let u = n.load as f64 / n.capacity;
                load += n.load as f64;
                cap += n.capacity;
                max_u = max_u.max(u);
                max_offered = max_offered.max((n.load + n.refused) as f64 / n.capacity);
                over |= u > 1.0;
            }
            let s = &mut self.sampler;
            s.samples += 1;
            s.peak = s.peak.max(max_u);
            if max_offered > s.offered_peak {
                s.offered_peak = max_offered;
                s.offered_peak_at = at;
                s.mean_at_offered_peak = if cap > 0.0 { load / cap } else { 0.0 };
            }
            s.over += over as u64;
            if cap > 0.0 && load / cap >= self.cfg.busy_threshold {
                s.busy += 1;
                s.ratio_sum += max_u / (load / cap);
            }
        }
    }

    fn router_of(&self, s: usize, p: usize) -> usize {
        (pair_hash(s as u64, p as u64) % self.routers.len() as u64) as usize
    }

    /// Router `r`'s view of the nodes at `t`.
    fn fill_view(&mut self, t: Millis, r: usize) {
        if let Some(sh) = &mut self.shared {
            sh.advance(t);
        }
        let router = &self.routers[r];
        let shared = self.shared.as_ref();
        self.view.clear();
        self.view
            .extend(self.nodes.iter().enumerate().map(|(i, n)| {
                let others = shared.map_or(0.0, |sh| sh.others(r, i));
                ViewNode {
                    hash: n.hash,
                    capacity: n.capacity,
                    util: seen_util(n, router.pending[i], router.reserved[i], others),
                    reserved: (router.reserved[i] + others).max(0.0) / n.capacity,
                    served: u64::from(n.reported) + u64::from(router.sent[i]),
                    last_heartbeat: if n.exists { n.last_hb } else { None },
                }
            }));
        if self.policy == Policy::Scalelite {
            self.scalelite_view.clear();
            self.scalelite_view.extend(
                self.nodes
                    .iter()
                    .map(|n| f64::from(n.scalelite_reported + n.created_since) / n.capacity),
            );
        }
    }

    /// Node `i`'s û as router `r` sees it (as [`Sim::fill_view`] sums it) without `units` of
    /// router `r`'s reservations there.
    fn util_without(&self, r: usize, i: usize, units: f64) -> f64 {
        let n = &self.nodes[i];
        let router = &self.routers[r];
        let others = self.shared.as_ref().map_or(0.0, |sh| sh.others(r, i));
        seen_util(n, router.pending[i], router.reserved[i] - units, others)
    }

    /// Router `r`'s reserved amount on `node` changed by `change` at `t`.
    fn publish(&mut self, t: Millis, r: usize, node: usize, change: f64) {
        if let Some(sh) = &mut self.shared {
            sh.publish(t, r, node, change);
        }
    }

    /// Where a join goes by the policy, as a placement `Decision`.
    fn route(&mut self, t: Millis, s: usize, r: usize) -> Decision {
        let room = self.rooms[s].hash;
        let pinned = self.rooms[s].pin;
        let p = &self.params;
        let view = &self.view;
        let full = |i: usize| view[i].util >= p.join_limit;
        match self.policy {
            Policy::Ours { .. } => {
                // As the router: the rules compare nodes with the room's reservation counted
                // (none for the variant without reservations). Not looked up for a room
                // whose pin holds: no node is chosen for it.
                let holds = pinned.is_some_and(|i| pin_holds(&view[i], t, p).is_some());
                let hints = Hints {
                    expected_load: if self.policy.reserves() && !holds {
                        f64::from(self.expected_size(s).0)
                    } else {
                        0.0
                    },
                    ..Hints::default()
                };
                match decide(view, pinned, room, &hints, t, p) {
                    // As the router: a join goes in at the join limit when its own room's
                    // outstanding reservation is what takes the node there (the join moves
                    // a unit from reserved to pending).
                    Decision::NodeFull(i)
                        if self.routers[r].book.iter().any(|b| {
                            let own = f64::from(b.r.outstanding());
                            b.session == s
                                && b.node == i
                                && own > 0.0
                                && self.util_without(r, i, own) < p.join_limit
                        }) =>
                    {
                        Decision::Pinned(i)
                    }
                    d => d,
                }
            }
            Policy::LeastLoaded | Policy::Scalelite | Policy::TwoChoice => {
                if let Some(i) = pinned.filter(|&i| is_healthy(&view[i], t, p.heartbeat_timeout_ms))
                {
                    return if full(i) {
                        Decision::NodeFull(i)
                    } else {
                        Decision::Pinned(i)
                    };
                }
                let pick = match self.policy {
                    Policy::LeastLoaded => policy::least_loaded(view, t, p),
                    Policy::Scalelite => policy::scalelite(view, &self.scalelite_view, t, p),
                    _ => policy::two_choice(view, t, p, &mut self.routers[r].rng),
                };
                match pick {
                    Some(node) => Decision::Place {
                        node,
                        overflow: false,
                    },
                    None => Decision::NoCapacity,
                }
            }
            Policy::ConsistentHash | Policy::BoundedLoadHash { .. } => {
                let pick = match self.policy {
                    Policy::BoundedLoadHash { factor } => {
                        policy::bounded(&self.ring, view, room, t, p, factor)
                    }
                    _ => policy::consistent(&self.ring, view, room, t, p),
                };
                match pick {
                    Some(i) if full(i) => Decision::NodeFull(i),
                    Some(i) => Decision::Pinned(i),
                    None => Decision::NoCapacity,
                }
            }
        }
    }

    fn join(&mut self, t: Millis, s: usize, p: usize, retry: bool) {
        if self.presence[s][p] != Presence::Waiting {
            return;
        }
        if !retry {
            self.joins += 1;
        }
        let r = self.router_of(s, p);
        self.fill_view(t, r);
        let node = match self.route(t, s, r) {
            Decision::Pinned(i) => i,
            Decision::Place { node, .. } => {
                if self.policy.pins() {
                    self.rooms[s].pin = Some(node);
                }
                self.rooms[s].placed_at = t;
                if self.policy == Policy::Scalelite {
                    let n = &mut self.nodes[node];
                    n.created_since += 1;
                    n.young.push((s, t));
                }
                if self.policy.reserves() {
                    self.reserve(t, s, r, node);
                }
                node
            }
            refused @ (Decision::NodeFull(_) | Decision::NoCapacity) => {
                let measured = t < self.w.measure_until;
                self.refusals += 1;
                self.refusals_measured += measured as u64;
                self.presence[s][p] = match refused {
                    Decision::NodeFull(i) => {
                        self.nodes[i].refused += 1;
                        Presence::Refused(i)
                    }
                    _ => {
                        self.no_capacity_measured += measured as u64;
                        Presence::Gone
                    }
                };
                return;
            }
        };
        if !self.nodes[node].alive {
            // The router does not know yet: the participant's client fails and tries again.
            self.push(
                t.saturating_add(self.cfg.retry_ms),
                Ev::Join {
                    s: s as u32,
                    p: p as u32,
                    retry: true,
                },
            );
            return;
        }
        self.nodes[node].load += 1;
        self.presence[s][p] = Presence::Joined(node);
        let router = &mut self.routers[r];
        router.pending[node] += self.cfg.join_cost;
        router.sent[node] += 1;
        if let Some(b) = router
            .book
            .iter_mut()
            .find(|b| b.session == s && b.node == node)
        {
            // As `ReservationBook::arrive_one`: one more arrival on top of what the
            // reservation knows (its own joins, or the node's count at the last report,
            // which includes other routers' joins), not this router's own total of joins.
            let consumed = b.r.observe(b.r.arrived.saturating_add(1)) as f64;
            router.reserved[node] -= consumed;
            self.publish(t, r, node, -consumed);
        }
        let room = &mut self.rooms[s];
        room.add(node);
        room.first_node.get_or_insert(node);
        if room.on_failed {
            room.on_failed = false;
            self.replaced_after_failure += 1;
        }
    }

    /// Where the next join of each live room would go now, as router 0 sees it (`None` for
    /// rooms nobody is in). Commits nothing.
    fn routes(&mut self, t: Millis) -> Vec<Option<usize>> {
        self.fill_view(t, 0);
        (0..self.rooms.len())
            .map(|s| {
                if self.rooms[s].present == 0 {
                    return None;
                }
                match self.route(t, s, 0) {
                    Decision::Pinned(i) | Decision::NodeFull(i) => Some(i),
                    Decision::Place { node, .. } => Some(node),
                    Decision::NoCapacity => None,
                }
            })
            .collect()
    }

    /// Live rooms routed somewhere before and elsewhere after.
    fn changed(before: &[Option<usize>], after: &[Option<usize>]) -> u64 {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b.is_some() && a.is_some() && b != a)
            .count() as u64
    }

    /// What session `s`'s room would reserve: its hint (capped at `max_size_hint`), else its
    /// learned history, else the default guess, as the router's `expected_size`.
    fn expected_size(&self, s: usize) -> (u32, SizeSource) {
        let history = self
            .history
            .get(&self.rooms[s].hash)
            .and_then(|peaks| peaks.iter().copied().max());
        let hint = self.w.sessions[s]
            .hint
            .map(|h| h.min(self.cfg.max_size_hint));
        expected_size(hint, history, self.cfg.new_room_reserve)
    }

    /// Books the room's expected size on `node` in router `r`.
    fn reserve(&mut self, t: Millis, s: usize, r: usize, node: usize) {
        let (expected, source) = self.expected_size(s);
        // At most the node's headroom below `new_room_limit` as router `r` sees it, as the
        // router's `on_placed` reserves.
        let free =
            (self.cfg.new_room_limit - self.util_without(r, node, 0.0)) * self.nodes[node].capacity;
        let size = if free >= 1.0 {
            expected.min(free.floor().min(f64::from(u32::MAX)) as u32)
        } else {
            0
        };
        let ttl = source.ttl_ms(
            self.cfg.reservation_ttl_ms,
            self.cfg.new_room_reserve_ttl_ms,
        );
        let router = &mut self.routers[r];
        // A re-placement replaces the room's old reservation: what it still held is released.
        let mut released = Vec::new();
        for b in router.book.iter().filter(|b| b.session == s) {
            router.reserved[b.node] -= b.r.outstanding() as f64;
            released.push((b.node, b.r.outstanding() as f64));
        }
        router.book.retain(|b| b.session != s);
        router.book.push(Booked {
            session: s,
            node,
            r: Reservation::new(size, t, ttl),
        });
        router.reserved[node] += size as f64;
        for (old, amount) in released {
            self.publish(t, r, old, -amount);
        }
        self.publish(t, r, node, size as f64);
    }

    fn leave(&mut self, s: usize, p: usize) {
        match self.presence[s][p] {
            Presence::Joined(node) => {
                self.nodes[node].load -= 1;
                let room = &mut self.rooms[s];
                room.remove(node);
                if room.present == 0 {
                    // The node reports the room empty: the pin is released and its peak learned.
                    room.pin = None;
                    remember(self.history.entry(room.hash).or_default(), room.peak);
                    room.peak = 0;
                }
            }
            // The stay the refused participant would have had ends: no longer offered.
            Presence::Refused(node) => self.nodes[node].refused -= 1,
            Presence::Waiting | Presence::Gone => {}
        }
        self.presence[s][p] = Presence::Gone;
    }

    fn heartbeat(&mut self, t: Millis, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        let rooms = &self.rooms;
        let n = &mut self.nodes[i];
        n.reported = n.load;
        n.last_hb = Some(t);
        if self.policy == Policy::Scalelite {
            // Scalelite's poll: each meeting's users, at least 15 while it is young. The
            // increments since the last poll are replaced by it.
            n.young.retain(|&(s, at)| {
                rooms[s].pin == Some(i)
                    && rooms[s].placed_at == at
                    && at.saturating_add(policy::SCALELITE_JOIN_BUFFER_MS) > t
            });
            let floor: u32 = n
                .young
                .iter()
                .map(|&(s, at)| {
                    let present = rooms[s].on_node(i);
                    policy::scalelite_meeting_load(present, at, t) - present
                })
                .sum();
            n.scalelite_reported = n.load + floor;
            n.created_since = 0;
        }
        for (r, router) in self.routers.iter_mut().enumerate() {
            router.pending[i] = 0.0;
            router.sent[i] = 0;
            let mut reserved = 0.0;
            router.book.retain_mut(|b| {
                if b.node != i {
                    return true;
                }
                b.r.observe(rooms[b.session].on_node(i));
                // A room that ended (its pin was released when it emptied) is no longer
                // reported: the router releases its reservation, as `Router::end_room` does.
                // So does a room that was placed again on another node since (by another
                // router, after it emptied): this node no longer holds it.
                let keep = !b.r.is_done(t) && rooms[b.session].pin == Some(i);
                if keep {
                    reserved += b.r.outstanding() as f64;
                }
                keep
            });
            if let Some(sh) = &mut self.shared {
                sh.publish(t, r, i, reserved - router.reserved[i]);
            }
            router.reserved[i] = reserved;
        }
        self.push(
            t.saturating_add(self.cfg.heartbeat_ms),
            Ev::Heartbeat(i as u32),
        );
    }

    fn scale_out(&mut self, t: Millis) {
        let before = self.routes(t);
        let i = self.cfg.capacities.len();
        let n = &mut self.nodes[i];
        n.exists = true;
        n.alive = true;
        n.last_hb = Some(t);
        self.push(
            t.saturating_add(self.cfg.heartbeat_ms),
            Ev::Heartbeat(i as u32),
        );
        self.moved_on_scale_out = Self::changed(&before, &self.routes(t));
    }

    fn fail(&mut self, t: Millis) {
        self.nodes[FAILED_NODE].alive = false;
        self.nodes[FAILED_NODE].load = 0;
        self.push(
            t.saturating_add(self.cfg.heartbeat_timeout_ms)
                .saturating_add(1),
            Ev::ProbeAfterFailure,
        );
        for room in &mut self.rooms {
            room.on_failed = room.on_node(FAILED_NODE) > 0;
        }
        for s in 0..self.presence.len() {
            for p in 0..self.presence[s].len() {
                if self.presence[s][p] == Presence::Joined(FAILED_NODE) {
                    self.rooms[s].remove(FAILED_NODE);
                    self.presence[s][p] = Presence::Waiting;
                    let back = t.saturating_add(
                        self.rng
                            .random_range(workload::SECOND..=20 * workload::SECOND),
                    );
                    let (s, p) = (s as u32, p as u32);
                    self.push(back, Ev::Join { s, p, retry: true });
                }
            }
        }
    }

    fn herd_peak(&self) -> Option<f64> {
        let mut worst: Option<f64> = None;
        for &(a, b) in &self.w.bursts {
            let mut count = vec![0u32; self.nodes.len()];
            let mut total = 0u32;
            for (s, session) in self.w.sessions.iter().enumerate() {
                let start = session.start();
                if start >= a && start < b {
                    if let Some(n) = self.rooms[s].first_node {
                        count[n] += 1;
                        total += 1;
                    }
                }
            }
            if total < 10 {
                continue;
            }
            // Fair shares among the nodes up at the burst's start.
            let n0 = self.cfg.capacities.len();
            let up = |i: usize| {
                (i < n0 || self.w.scale_out_at.is_some_and(|x| x <= a))
                    && !(i == FAILED_NODE && self.w.fail_at.is_some_and(|x| x <= a))
            };
            let cap: f64 = (0..self.nodes.len())
                .filter(|&i| up(i))
                .map(|i| self.nodes[i].capacity)
                .sum();
            let herd = (0..self.nodes.len())
                .filter(|&i| up(i))
                .map(|i| (count[i] as f64 / total as f64) / (self.nodes[i].capacity / cap))
                .fold(0.0, f64::max);
            worst = Some(worst.map_or(herd, |w: f64| w.max(herd)));
        }
        worst
    }

    fn finish(self) -> PolicyResult {
        let sm = &self.sampler;
        PolicyResult {
            policy: self.policy.name(),
            spec: self.policy,
            max_over_mean: (sm.busy > 0).then(|| sm.ratio_sum / sm.busy as f64),
            busy_share: sm.busy as f64 / sm.samples.max(1) as f64,
            peak_utilization: sm.peak,
            offered_peak: sm.offered_peak,
            offered_peak_at: sm.offered_peak_at,
            mean_at_offered_peak: sm.mean_at_offered_peak,
            over_capacity_share: sm.over as f64 / sm.samples.max(1) as f64,
            joins: self.joins,
            refusals: self.refusals_measured,
            refusals_no_capacity: self.no_capacity_measured,
            refusals_total: self.refusals,
            herd_peak: self.herd_peak(),
            moved_on_scale_out: self.moved_on_scale_out,
            moved_on_failure: self.moved_on_failure,
            replaced_after_failure: self.replaced_after_failure,
            split_rooms: self.rooms.iter().filter(|r| r.split).count() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trace::parse_trace;
    use super::*;

    /// Two nodes of capacity 2, one router, reports every 10 s, rooms reserving one seat.
    fn two_small_nodes() -> SimConfig {
        let mut cfg = SimConfig::new(2, 2.0, 1, 10_000, 1);
        cfg.new_room_reserve = 1;
        cfg
    }

    #[test]
    fn a_full_pinned_node_refuses_joins_that_still_count_in_its_offered_load() {
        // Five participants for one room: its node takes two (2/2 reaches join_limit), the
        // other three are refused and would have stayed until 60 s.
        let w = parse_trace(
            "0 room join\n1 room join\n2 room join\n3 room join\n4 room join\n\
             60 room leave\n60 room leave\n60 room leave\n60 room leave\n60 room leave\n",
            "t",
        )
        .unwrap();
        let cfg = two_small_nodes();
        for p in Policy::standard().into_iter().filter(Policy::pins) {
            let r = simulate(&w, p, &cfg);
            assert_eq!(r.refusals, 3, "{}", r.policy);
            assert_eq!(r.refusals_no_capacity, 0, "{}", r.policy);
            assert!(r.peak_utilization <= cfg.join_limit, "{r:?}");
            assert_eq!(r.offered_peak, 5.0 / 2.0, "{}", r.policy);
            assert!(r.offered_peak > r.peak_utilization, "{r:?}");
        }
    }

    #[test]
    fn without_refusals_offered_and_realized_peaks_are_equal() {
        let w = parse_trace(
            "0 a join\n1 a join\n2 b join\n3 c join\n30 a leave\n40 b leave\n50 a leave\n\
             60 c leave\n",
            "t",
        )
        .unwrap();
        let cfg = SimConfig::new(2, 100.0, 1, 2_000, 1);
        for p in Policy::standard() {
            let r = simulate(&w, p, &cfg);
            assert_eq!(r.refusals, 0, "{}", r.policy);
            assert!(r.peak_utilization > 0.0, "{r:?}");
            assert_eq!(r.offered_peak, r.peak_utilization, "{}", r.policy);
        }
    }

    #[test]
    fn a_recurring_room_reserves_the_largest_of_its_recent_sessions_as_the_router_does() {
        // "big" had 10 participants, then 2. Its third session starts on the empty node just
        // before room "x" (12 participants) is placed; the other node holds 4. Expecting 10
        // (the router's history: the largest recent peak), x goes to the other node; expecting
        // 2 (the last peak only), x would join big's node and overfill it when big fills up.
        let mut t = String::new();
        let mut add = |room: &str, n: u32, join: u32, leave: u32| {
            for k in 0..n {
                t += &format!("{}.{k:02} {room} join\n{leave} {room} leave\n", join);
            }
        };
        add("long", 4, 0, 1_000);
        add("big", 10, 10, 100);
        add("big", 2, 200, 300);
        add("big", 1, 400, 1_000);
        add("x", 12, 401, 1_000);
        add("big", 9, 430, 1_000);
        let w = parse_trace(&t, "t").unwrap();
        let mut cfg = SimConfig::new(2, 20.0, 1, 10_000, 1);
        cfg.new_room_reserve = 1;
        let r = simulate(&w, Policy::DEFAULT, &cfg);
        assert_eq!(r.refusals, 0, "{r:?}");
        assert_eq!(r.offered_peak, 16.0 / 20.0, "{r:?}");
    }

    #[test]
    fn a_guessed_size_stops_counting_after_new_room_reserve_ttl_and_a_hinted_one_does_not() {
        // "g" has one participant and reserves 10 on one node; "long" (3) goes to the other.
        // At 90 s "c" (12, hinted) is placed. Without a hint g's 10 was a guess, gone after
        // 60 s: g's node (1) is the emptier and c goes there (peak 13/20). With a hint of 10,
        // g's reservation holds for five minutes and c goes to long's node (15/20).
        let run = |g_hint: &str| {
            let mut t = format!("0 g join{g_hint}\n1000 g leave\n90 c join 12\n1000 c leave\n");
            for k in 1..4 {
                t += &format!("0.{k} long join\n1000 long leave\n");
            }
            for k in 1..12 {
                t += &format!("90.{k:02} c join\n1000 c leave\n");
            }
            let w = parse_trace(&t, "t").unwrap();
            let cfg = SimConfig::new(2, 20.0, 1, 2_000, 1);
            assert_eq!(cfg.new_room_reserve_ttl_ms, 60_000);
            simulate(&w, Policy::DEFAULT, &cfg)
        };
        let guessed = run("");
        assert_eq!(guessed.offered_peak, 13.0 / 20.0, "{guessed:?}");
        let hinted = run(" 10");
        assert_eq!(hinted.offered_peak, 15.0 / 20.0, "{hinted:?}");
    }

    #[test]
    fn a_room_that_ended_releases_its_reservation_at_its_nodes_next_report() {
        // "a" expects 15 but its one participant leaves after 5 s; "long" holds 4 on the
        // other node. At 30 s "c" (12) goes to a's node, now empty: a's reservation went with
        // the room, it does not wait out its five minutes.
        let mut t = String::from("0 long join 4\n0.5 a join 15\n5 a leave\n30 c join 12\n");
        for k in 1..4 {
            t += &format!("0.{k} long join\n");
        }
        for k in 1..12 {
            t += &format!("30.{k:02} c join\n");
        }
        let w = parse_trace(&t, "t").unwrap();
        let cfg = SimConfig::new(2, 20.0, 1, 10_000, 1);
        let r = simulate(&w, Policy::DEFAULT, &cfg);
        assert_eq!(r.offered_peak, 12.0 / 20.0, "{r:?}");
    }

    /// `n` rooms of `size` (exact hints) whose first participant joins at `start` + 50 ms
    /// apart, the others from `rest_at` on, 100 ms apart; everyone stays until `leave`.
    fn rooms(
        prefix: &str,
        n: usize,
        size: u32,
        start: Millis,
        rest_at: Millis,
        leave: Millis,
    ) -> Vec<workload::Session> {
        (0..n as u64)
            .map(|i| workload::Session {
                room: format!("{prefix}-{i}"),
                hint: Some(size),
                stays: (0..size as u64)
                    .map(|k| workload::Stay {
                        join: if k == 0 {
                            start + 50 * i
                        } else {
                            rest_at + 100 * k
                        },
                        leave,
                    })
                    .collect(),
            })
            .collect()
    }

    fn burst_workload(
        sessions: Vec<workload::Session>,
        burst: (Millis, Millis),
        scale_out_at: Option<Millis>,
    ) -> Workload {
        Workload {
            name: "burst".into(),
            sessions,
            bursts: vec![burst],
            measure_until: 170_000,
            scale_out_at,
            fail_at: None,
            end: 180_000,
            learned: vec![],
        }
    }

    fn burst_rooms_per_node(r: &PolicyResult, rooms: usize, nodes: usize) -> f64 {
        r.herd_peak.unwrap() * rooms as f64 / nodes as f64
    }

    #[test]
    fn shared_reservations_spread_a_burst_into_an_empty_cluster_exactly_evenly() {
        // 24 rooms of 5 start within 1.2 s on 8 empty nodes, no report in between; everyone
        // else arrives at 20 s. Seeing every router's reservations at once, the routers put
        // exactly 3 rooms on each node; each seeing only its own, they cannot do better.
        let w = burst_workload(rooms("r", 24, 5, 1_000, 20_000, 170_000), (0, 5_000), None);
        let cfg = SimConfig::new(8, 100.0, 4, 60_000, 1);
        let own = simulate(&w, Policy::OWN_RESERVATIONS, &cfg);
        let shared = simulate(&w, Policy::default_shared(0), &cfg);
        assert_eq!(burst_rooms_per_node(&shared, 24, 8), 3.0, "{shared:?}");
        assert_eq!(shared.peak_utilization, 0.15, "{shared:?}");
        assert!(
            own.herd_peak.unwrap() >= shared.herd_peak.unwrap(),
            "{own:?}"
        );
        assert!(own.peak_utilization >= shared.peak_utilization, "{own:?}");
    }

    #[test]
    fn per_router_reservations_herd_onto_a_new_node_and_shared_ones_do_not() {
        // 4 nodes hold 8 rooms of 15 (reported by 40 s); a fifth, empty node is added at
        // 40.5 s and 12 rooms of 10 (exact hints) start at 41.0-41.55 s, with no report in
        // between. Each router sees the new node as the emptiest until its own reservations
        // there reach the others' load (3 rooms each), so it gets about twice its share;
        // with the routers' reservations shared at once it gets its share.
        let mut sessions = rooms("bg", 8, 15, 1_000, 2_000, 170_000);
        sessions.extend(rooms("burst", 12, 10, 41_000, 60_000, 170_000));
        let w = burst_workload(sessions, (41_000, 42_000), Some(40_500));
        let cfg = SimConfig::new(4, 100.0, 4, 10_000, 1);
        let own = simulate(&w, Policy::OWN_RESERVATIONS, &cfg);
        let shared = simulate(&w, Policy::default_shared(0), &cfg);
        let (own_n, shared_n) = (
            burst_rooms_per_node(&own, 12, 5),
            burst_rooms_per_node(&shared, 12, 5),
        );
        // The fair share is 4.8 rooms (a mean of 0.48 once everyone is in).
        assert!(shared_n <= 5.0, "shared {shared_n}: {shared:?}");
        assert!(
            own_n >= 1.5 * shared_n,
            "own {own_n}, shared {shared_n}: {own:?}"
        );
        assert!(shared.offered_peak <= 0.5, "{shared:?}");
        assert!(own.offered_peak >= 0.8, "{own:?}");
        // Visible only after the burst is over, the others' reservations change nothing.
        let late = simulate(&w, Policy::default_shared(5_000), &cfg);
        assert_eq!(late.herd_peak, own.herd_peak);
    }

    #[test]
    fn a_refusal_no_node_could_take_is_counted_apart_and_offered_to_none() {
        // One node of capacity 2: room a fills it past new_room_limit, so room b has nowhere
        // to go.
        let w = parse_trace(
            "0 a join\n1 a join\n2 b join\n60 a leave\n60 a leave\n60 b leave\n",
            "t",
        )
        .unwrap();
        let mut cfg = SimConfig::new(1, 2.0, 1, 10_000, 1);
        cfg.new_room_reserve = 1;
        let r = simulate(&w, Policy::DEFAULT, &cfg);
        assert_eq!((r.refusals, r.refusals_no_capacity), (1, 1));
        assert_eq!(r.offered_peak, r.peak_utilization);
        assert_eq!(r.peak_utilization, 1.0);
    }

    /// Room "a" with a size hint of 10 and 16 participants joining from 1 s, one a
    /// millisecond, all staying to 50 s.
    fn one_room_of_ten(name: &str) -> Workload {
        let stays = (0..16)
            .map(|k| workload::Stay {
                join: 1_000 + k,
                leave: 50_000,
            })
            .collect();
        Workload {
            name: name.into(),
            sessions: vec![workload::Session {
                room: "a".into(),
                hint: Some(10),
                stays,
            }],
            bursts: vec![],
            measure_until: 60_000,
            scale_out_at: None,
            fail_at: None,
            end: 60_000,
            learned: vec![],
        }
    }

    #[test]
    fn a_room_placed_again_elsewhere_releases_its_old_reservation_at_the_old_nodes_report() {
        // Room "a" (hint 10): its first participant joins through router 0 and leaves, so the
        // room empties and its pin is released; the next joins through router 1, which sees
        // router 0's reservation (shared at once) and places the room on the other node.
        // At the first node's report router 0 releases its reservation there: the room is
        // no longer on that node, though it is pinned (elsewhere).
        let w = one_room_of_ten("replaced");
        let cfg = SimConfig::new(2, 100.0, 2, 10_000, 1);
        let mut sim = Sim::new(&w, Policy::default_shared(0), &cfg);
        let through = |r: usize| (0..16).find(|&p| sim.router_of(0, p) == r).unwrap();
        let (p0, p1) = (through(0), through(1));
        sim.join(1_000, 0, p0, false);
        let old = sim.rooms[0].pin.unwrap();
        assert_eq!(sim.routers[0].reserved[old], 9.0);
        sim.leave(0, p0);
        assert_eq!(sim.rooms[0].pin, None);
        sim.join(2_000, 0, p1, false);
        let new = sim.rooms[0].pin.unwrap();
        assert_ne!(new, old, "router 1 saw router 0's reservation");
        sim.heartbeat(10_000, old);
        assert_eq!(sim.routers[0].reserved[old], 0.0);
        assert!(sim.routers[0].book.is_empty());
        // The room's reservation on its node is untouched.
        assert_eq!(sim.routers[1].reserved[new], 9.0);
        // ... and the other routers hear of the release.
        let shared = sim.shared.as_mut().unwrap();
        shared.advance(10_000);
        assert_eq!(shared.total[old], 0.0);
    }

    #[test]
    fn a_join_after_a_report_consumes_one_unit_of_the_routers_reservation_as_the_router_does() {
        // Room "a" (hint 10), two routers: router 0 places it (reserved 9), router 1 sends
        // the second participant, the node reports 2 (reserved 8), router 0 sends the third.
        // The router (`ReservationBook::arrive_one`) counts one more arrival on top of the
        // report's 2: 7 left. Counting only router 0's own 2 joins consumed nothing: 8.
        let w = one_room_of_ten("arrivals");
        let cfg = SimConfig::new(2, 100.0, 2, 10_000, 1);
        let mut sim = Sim::new(&w, Policy::default_shared(0), &cfg);
        let of =
            |r: usize| -> Vec<usize> { (0..16).filter(|&p| sim.router_of(0, p) == r).collect() };
        let (r0, r1) = (of(0), of(1));
        let (p0, p1, p2) = (r0[0], r1[0], r0[1]);
        sim.join(1_000, 0, p0, false);
        let node = sim.rooms[0].pin.unwrap();
        assert_eq!(sim.routers[0].reserved[node], 9.0);
        sim.join(1_100, 0, p1, false);
        assert_eq!(sim.rooms[0].pin, Some(node));
        sim.heartbeat(10_000, node);
        assert_eq!(sim.routers[0].reserved[node], 8.0);
        sim.join(10_100, 0, p2, false);
        assert_eq!(sim.routers[0].reserved[node], 7.0);
    }

    /// Sessions of `n` participants each (stays long enough for any test here), no hints.
    fn rooms_of(names: &[&str], n: u64) -> Workload {
        Workload {
            name: "direct".into(),
            sessions: names
                .iter()
                .map(|room| workload::Session {
                    room: room.to_string(),
                    hint: None,
                    stays: (0..n)
                        .map(|k| workload::Stay {
                            join: k,
                            leave: 3 * workload::HOUR,
                        })
                        .collect(),
                })
                .collect(),
            bursts: vec![],
            measure_until: 3 * workload::HOUR,
            scale_out_at: None,
            fail_at: None,
            end: 3 * workload::HOUR,
            learned: vec![],
        }
    }

    /// Every node reports at `t`.
    fn report_all(sim: &mut Sim, t: Millis) {
        for i in 0..sim.nodes.len() {
            sim.heartbeat(t, i);
        }
    }

    #[test]
    fn scalelite_counts_a_young_meeting_as_15_users_until_it_is_15_minutes_old() {
        // "old" (10 participants) is 16 minutes old when "young" (3) starts on the other node;
        // a minute later room "n" comes. Scalelite's poll has young at 15 and old at 10, so n
        // joins old; plain least-loaded sees 3 against 10 and joins young.
        let w = rooms_of(&["old", "young", "n"], 10);
        let cfg = SimConfig::new(2, 100.0, 1, 2_000, 1);
        let (old, young, n) = (0, 1, 2);
        for (policy, n_with) in [(Policy::Scalelite, old), (Policy::LeastLoaded, young)] {
            let mut sim = Sim::new(&w, policy, &cfg);
            for p in 0..10 {
                sim.join(p as Millis, old, p, false);
            }
            let t = 16 * workload::MINUTE;
            report_all(&mut sim, t);
            for p in 0..3 {
                sim.join(t + p as Millis, young, p, false);
            }
            report_all(&mut sim, t + workload::MINUTE);
            sim.join(t + workload::MINUTE + 1, n, 0, false);
            let on = |s: usize| sim.rooms[s].pin.unwrap();
            assert_ne!(on(old), on(young), "{}", policy.name());
            assert_eq!(on(n), on(n_with), "{}", policy.name());
            if policy == Policy::Scalelite {
                let (y, o) = (on(young), on(old));
                assert_eq!(sim.nodes[y].scalelite_reported, 15);
                assert_eq!(sim.nodes[o].scalelite_reported, 10, "n came after the poll");
                // Fifteen minutes after young was created it counts its 3 participants.
                report_all(&mut sim, t + policy::SCALELITE_JOIN_BUFFER_MS - 1);
                assert_eq!(sim.nodes[y].scalelite_reported, 15);
                report_all(&mut sim, t + policy::SCALELITE_JOIN_BUFFER_MS);
                assert_eq!(sim.nodes[y].scalelite_reported, 3);
            }
        }
    }

    #[test]
    fn scalelite_adds_one_per_meeting_created_not_per_join_until_the_next_poll() {
        // Reports every minute, none between the rooms. Room a gets 5 participants, then b
        // and c start. Plain least-loaded counts a's 5 joins and sends c to b's node;
        // Scalelite counts a and b as 1 each and sends c to a's node (the lower index).
        let w = rooms_of(&["a", "b", "c"], 5);
        let cfg = SimConfig::new(2, 100.0, 1, 60_000, 1);
        for (policy, c_with) in [(Policy::Scalelite, 0), (Policy::LeastLoaded, 1)] {
            let mut sim = Sim::new(&w, policy, &cfg);
            for p in 0..5 {
                sim.join(1_000 + p as Millis, 0, p, false);
            }
            sim.join(2_000, 1, 0, false);
            sim.join(3_000, 2, 0, false);
            let on = |s: usize| sim.rooms[s].pin.unwrap();
            assert_ne!(on(0), on(1), "{}", policy.name());
            assert_eq!(on(2), on(c_with), "{}", policy.name());
            if policy == Policy::Scalelite {
                let a = on(0);
                assert_eq!(sim.nodes[a].created_since, 2);
                // The next poll replaces the increments: a and c are young (15 each).
                sim.heartbeat(4_000, a);
                let n = &sim.nodes[a];
                assert_eq!((n.created_since, n.scalelite_reported), (0, 30));
            }
        }
    }

    #[test]
    fn every_router_sees_scalelites_increments_at_once() {
        // a's first participant joins through router 0, b's through router 1, no report in
        // between: Scalelite's load lives in one Redis sorted set, so router 1 sees a's +1
        // and puts b on the other node; with per-router pending (plain least-loaded) router 1
        // sees both nodes empty and puts b with a (the lower index).
        let w = rooms_of(&["a", "b"], 16);
        let cfg = SimConfig::new(2, 100.0, 2, 60_000, 1);
        for (policy, together) in [(Policy::Scalelite, false), (Policy::LeastLoaded, true)] {
            let mut sim = Sim::new(&w, policy, &cfg);
            let via = |sim: &Sim, s: usize, r: usize| {
                (0..16).find(|&p| sim.router_of(s, p) == r).unwrap()
            };
            let (pa, pb) = (via(&sim, 0, 0), via(&sim, 1, 1));
            sim.join(1_000, 0, pa, false);
            sim.join(2_000, 1, pb, false);
            let same = sim.rooms[0].pin == sim.rooms[1].pin;
            assert_eq!(same, together, "{}", policy.name());
        }
    }
}
