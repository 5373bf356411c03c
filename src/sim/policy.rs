//! The placement policies the simulator compares, and how each one picks a node.
//!
//! Ours calls the real [`crate::placement::decide`]; the others are re-implemented here from
//! their documented behaviour and source, over the same router view (last report + pending
//! (+ reserved for ours)): plain least-loaded (the baseline of the school-day target),
//! Scalelite's own rule (least-loaded on a load that counts every meeting younger than 15
//! minutes as at least 15 users and adds 1 per meeting created since the last poll),
//! LiveKit's `twochoice`, HAProxy's `hash-type consistent`, and HAProxy's consistent hashing
//! with bounded loads (`hash-balance-factor`). The hashing policies keep no pins (HAProxy
//! routes every request by its key), so they can split a room; the others pin a room to its
//! node.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::placement::hash::pair_hash;
use crate::placement::{is_healthy, AdminState, ChoiceRule, Millis, NodeView, Params};

/// One placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Policy {
    /// `placement::decide` with this rule, with or without expected-size reservation.
    Ours {
        rule: ChoiceRule,
        reservation: bool,
        /// With reservation: `None`, each router counts only its own reservations (the
        /// product with one router, or with `placement.share_reservations = false`);
        /// `Some(ms)`, every router publishes its reservations and the others add them to û
        /// this many milliseconds later, releases propagating with the same delay (routers on
        /// Redis by default: about 5 ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shared_ms: Option<u64>,
    },
    /// The healthy node with the lowest utilization: last report plus each router's pending
    /// joins (`plain_least_loaded`). The baseline the school-day target is measured against
    /// ("least-loaded without hints").
    LeastLoaded,
    /// Scalelite's placement as its source has it: the healthy node with the lowest load,
    /// where a node's polled load counts every meeting younger than `LOAD_JOIN_BUFFER_TIME`
    /// (15 min) as at least `LOAD_MIN_USER_COUNT` (15) users, and each meeting created on it
    /// since adds 1 (`server.increment_load(1)` on `create`, not per join; one Redis sorted
    /// set, so every router sees every increment at once).
    Scalelite,
    /// The less loaded of two random nodes under the limit (LiveKit `twochoice`).
    TwoChoice,
    /// A consistent-hash ring, no pins (HAProxy `hash-type consistent`).
    ConsistentHash,
    /// The ring, skipping nodes above `factor` times the mean load (HAProxy
    /// `hash-balance-factor`, e.g. 1.25 for 125).
    BoundedLoadHash { factor: f64 },
}

/// How far behind a router sees the others' reservations with `placement.share_reservations`:
/// `service::SHARE_RESERVATIONS_EVERY`, the period of the task that publishes them.
pub const SHARED_DELAY_MS: u64 = 5;

impl Policy {
    /// The product's default with several routers (`ChoiceRule::default()`, least-loaded,
    /// with reservation, shared between routers on Redis: `placement.share_reservations`
    /// unset). With one router it is the same as [`Policy::OWN_RESERVATIONS`].
    pub const DEFAULT: Policy = Policy::default_shared(SHARED_DELAY_MS);

    /// The default with each router counting only its own reservations (routers on Redis with
    /// `placement.share_reservations = false`; the default up to the eleventh session).
    pub const OWN_RESERVATIONS: Policy = Policy::Ours {
        rule: ChoiceRule::LeastLoaded,
        reservation: true,
        shared_ms: None,
    };

    /// The default policy with reservations shared between routers after `delay_ms`.
    pub const fn default_shared(delay_ms: u64) -> Policy {
        Policy::Ours {
            rule: ChoiceRule::LeastLoaded,
            reservation: true,
            shared_ms: Some(delay_ms),
        }
    }

    /// Every policy of the standard comparison: the default, each of our rules with
    /// reservations shared between routers as the default shares them (after
    /// [`SHARED_DELAY_MS`]; for the default's rule that is the default itself, listed once),
    /// each with reservation counted by each router alone and without reservation, then the
    /// five others. So every rule is compared under the same sharing as the default.
    pub fn standard() -> Vec<Policy> {
        let mut v = vec![Policy::DEFAULT];
        for rule in ChoiceRule::ALL {
            let shared = Policy::Ours {
                rule,
                reservation: true,
                shared_ms: Some(SHARED_DELAY_MS),
            };
            for p in [
                shared,
                Policy::Ours {
                    rule,
                    reservation: true,
                    shared_ms: None,
                },
                Policy::Ours {
                    rule,
                    reservation: false,
                    shared_ms: None,
                },
            ] {
                if !v.contains(&p) {
                    v.push(p);
                }
            }
        }
        v.extend([
            Policy::LeastLoaded,
            Policy::Scalelite,
            Policy::TwoChoice,
            Policy::ConsistentHash,
            Policy::BoundedLoadHash { factor: 1.25 },
        ]);
        v
    }

    pub fn name(&self) -> String {
        match *self {
            Policy::Ours {
                rule,
                reservation,
                shared_ms,
            } => {
                let shared = match shared_ms {
                    Some(ms) if reservation => format!("+shared{ms}ms"),
                    _ => String::new(),
                };
                format!(
                    "ours:{}{}{shared}",
                    rule.name(),
                    if reservation { "+res" } else { "" }
                )
            }
            Policy::LeastLoaded => "plain_least_loaded".into(),
            Policy::Scalelite => "scalelite".into(),
            Policy::TwoChoice => "livekit_two_choice".into(),
            Policy::ConsistentHash => "haproxy_consistent".into(),
            Policy::BoundedLoadHash { factor } => format!("haproxy_bounded_{factor}"),
        }
    }

    /// Whether the policy stores a room -> node pin (and so never splits a room).
    pub fn pins(&self) -> bool {
        !matches!(
            self,
            Policy::ConsistentHash | Policy::BoundedLoadHash { .. }
        )
    }

    /// Whether new rooms reserve their expected size.
    pub fn reserves(&self) -> bool {
        matches!(
            self,
            Policy::Ours {
                reservation: true,
                ..
            }
        )
    }

    /// One of ours: its choice rule.
    pub fn rule(&self) -> Option<ChoiceRule> {
        match *self {
            Policy::Ours { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// With reservation shared between routers: the propagation delay in milliseconds.
    pub fn shared_delay_ms(&self) -> Option<u64> {
        match *self {
            Policy::Ours {
                reservation: true,
                shared_ms,
                ..
            } => shared_ms,
            _ => None,
        }
    }
}

/// What a router knows about one node, as [`NodeView`] for `placement::decide`.
#[derive(Debug, Clone, Copy)]
pub struct ViewNode {
    pub hash: u64,
    pub capacity: f64,
    /// (reported load + pending + reserved) / capacity.
    pub util: f64,
    /// reserved / capacity (this router's reservations and the others' it was told of).
    pub reserved: f64,
    /// Participants the router counts on the node, as a whole number: the last report plus
    /// the joins it sent since (HAProxy's `served`). Kept apart from `util` so that a bound
    /// on it is checked without a round trip through `util * capacity` (7 / 100 * 100 is
    /// 7.000000000000001).
    pub served: u64,
    pub last_heartbeat: Option<Millis>,
}

impl NodeView for ViewNode {
    fn node_hash(&self) -> u64 {
        self.hash
    }
    fn capacity(&self) -> f64 {
        self.capacity
    }
    fn utilization(&self) -> f64 {
        self.util
    }
    fn join_utilization(&self, new_room_limit: f64) -> f64 {
        (self.util - self.reserved).max(self.util.min(new_room_limit))
    }
    fn last_heartbeat(&self) -> Option<Millis> {
        self.last_heartbeat
    }
    fn state(&self) -> AdminState {
        AdminState::Active
    }
    fn region(&self) -> Option<&str> {
        None
    }
    fn has_tag(&self, _tag: &str) -> bool {
        false
    }
}

fn healthy(v: &ViewNode, now: Millis, p: &Params) -> bool {
    is_healthy(v, now, p.heartbeat_timeout_ms)
}

/// Plain least-loaded: the healthy node with the lowest utilization below `join_limit` (ties:
/// the lowest index, as a database `ORDER BY load` would give a stable order).
pub fn least_loaded(nodes: &[ViewNode], now: Millis, p: &Params) -> Option<usize> {
    lowest(nodes, now, p, |i| nodes[i].util)
}

/// Scalelite's `LOAD_MIN_USER_COUNT` (default 15): a young meeting counts as at least this
/// many users in its server's polled load.
pub const SCALELITE_MIN_USERS: u32 = 15;

/// Scalelite's `LOAD_JOIN_BUFFER_TIME` (default 15 minutes): how long a meeting is young.
pub const SCALELITE_JOIN_BUFFER_MS: Millis = 15 * 60 * 1_000;

/// What a Scalelite poll records for a meeting with `present` users created at `created_at`:
/// at least [`SCALELITE_MIN_USERS`] while it is younger than [`SCALELITE_JOIN_BUFFER_MS`]
/// (`created_time > LOAD_JOIN_BUFFER_TIME.ago`), else its users.
pub fn scalelite_meeting_load(present: u32, created_at: Millis, now: Millis) -> u32 {
    if created_at.saturating_add(SCALELITE_JOIN_BUFFER_MS) > now {
        present.max(SCALELITE_MIN_USERS)
    } else {
        present
    }
}

/// Scalelite (`Server.find_available`): the healthy node with the lowest Scalelite load
/// (`load[i]`: polled load with the young-meeting floor, plus 1 per meeting created since,
/// over capacity, Scalelite's `load_multiplier`), ties to the lowest index as Redis orders a
/// sorted set's equal scores. Scalelite itself never refuses; here, as for every policy, a
/// node the router sees at `join_limit` (by participants: `util`) takes no new room.
pub fn scalelite(nodes: &[ViewNode], load: &[f64], now: Millis, p: &Params) -> Option<usize> {
    lowest(nodes, now, p, |i| load[i])
}

/// The healthy node below `join_limit` with the lowest `key`, ties to the lowest index.
fn lowest(
    nodes: &[ViewNode],
    now: Millis,
    p: &Params,
    key: impl Fn(usize) -> f64,
) -> Option<usize> {
    (0..nodes.len())
        .filter(|&i| healthy(&nodes[i], now, p) && nodes[i].util < p.join_limit)
        .min_by(|&a, &b| key(a).total_cmp(&key(b)))
}

/// LiveKit `twochoice`: two random nodes among those below `new_room_limit` (else below
/// `join_limit`), the less loaded of the two.
pub fn two_choice(nodes: &[ViewNode], now: Millis, p: &Params, rng: &mut StdRng) -> Option<usize> {
    let pool = |limit: f64| -> Vec<usize> {
        (0..nodes.len())
            .filter(|&i| healthy(&nodes[i], now, p) && nodes[i].util < limit)
            .collect()
    };
    let mut c = pool(p.new_room_limit);
    if c.is_empty() {
        c = pool(p.join_limit);
    }
    match c.len() {
        0 => None,
        1 => Some(c[0]),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (c[a], c[b]);
            Some(if nodes[b].util < nodes[a].util { b } else { a })
        }
    }
}

/// HAProxy's `BE_WEIGHT_SCALE`: a server's effective weight (`cur_eweight`) under consistent
/// hashing is its configured `weight` times this.
pub const BE_WEIGHT_SCALE: u64 = 16;

/// HAProxy's largest server `weight`.
pub const MAX_WEIGHT: u64 = 256;

/// The `weight`s an operator would give HAProxy servers of these capacities: proportional to
/// capacity, the largest 256, none below 1 (HAProxy's range). Equal nodes get equal weights,
/// and for equal weights the bounded-load slots do not depend on their value.
pub fn haproxy_weights(capacities: &[f64]) -> Vec<u64> {
    let max = capacities.iter().copied().fold(0.0, f64::max);
    capacities
        .iter()
        .map(|&c| {
            if max > 0.0 {
                ((MAX_WEIGHT as f64 * c / max).round() as u64).clamp(1, MAX_WEIGHT)
            } else {
                1
            }
        })
        .collect()
}

/// HAProxy's `chash_server_is_eligible` (lb_chash.c): how many of the `served + 1`
/// outstanding requests (including the one being placed) times `balance_factor` percent,
/// rounded up, the server of effective weight `eweight` may hold, when the usable servers'
/// effective weights sum to `tot_weight` and those before it (in configuration order) to
/// `cumulative`: a whole number per weight unit, the remainder spread in proportion to
/// weight by cumulative position, and never 0. The server is eligible while its own served
/// count is below this.
pub fn haproxy_slots(
    served: u64,
    balance_factor: u64,
    tot_weight: u64,
    cumulative: u64,
    eweight: u64,
) -> u64 {
    let tot_weight = tot_weight.max(1);
    // HAProxy: ((served + 1) * factor + 99) / 100.
    let tot_slots = ((served + 1) * balance_factor).div_ceil(100);
    let per_weight = tot_slots / tot_weight;
    let remainder = tot_slots % tot_weight;
    let slots = eweight * per_weight + ((cumulative + eweight) * remainder) / tot_weight
        - (cumulative * remainder) / tot_weight;
    slots.max(1)
}

/// A consistent-hash ring over every node the run may ever have, as HAProxy's `lb_chash.c`
/// builds it: each node has one point per unit of its effective weight (`weight *
/// BE_WEIGHT_SCALE`, weights from [`haproxy_weights`], 4 096 points for a node of weight 256),
/// the same effective weights the bounded-load check uses.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, usize)>,
    /// `weight * BE_WEIGHT_SCALE` per node, from [`haproxy_weights`].
    eweights: Vec<u64>,
}

impl Ring {
    /// Node `i` gets `eweight_i` points.
    pub fn new(hashes: &[u64], capacities: &[f64]) -> Ring {
        let eweights: Vec<u64> = haproxy_weights(capacities)
            .into_iter()
            .map(|w| w * BE_WEIGHT_SCALE)
            .collect();
        let mut points = Vec::with_capacity(eweights.iter().sum::<u64>() as usize);
        for (i, (&h, &n)) in hashes.iter().zip(&eweights).enumerate() {
            points.extend((0..n).map(|k| (pair_hash(k, h), i)));
        }
        points.sort_unstable();
        Ring { points, eweights }
    }

    /// How many points node `i` has on the ring.
    pub fn points_of(&self, i: usize) -> usize {
        self.points.iter().filter(|&&(_, n)| n == i).count()
    }

    /// The `usable` nodes' points from `key` on, one entry per point, once round the ring,
    /// as HAProxy's `chash_get_server_hash` looks them up (an unusable server is not in its
    /// tree): it starts at the nearer of the point before `key` and the first point at or
    /// after it (the one before on a tie, `dp <= dn`), then goes clockwise.
    pub fn walk<'a>(
        &'a self,
        key: u64,
        usable: impl Fn(usize) -> bool + 'a,
    ) -> impl Iterator<Item = usize> + 'a {
        let n = self.points.len();
        let at = self.points.partition_point(|&(p, _)| p < key);
        let next = (0..n)
            .map(|k| (at + k) % n)
            .find(|&j| usable(self.points[j].1));
        let prev = (1..=n)
            .map(|k| (at + n - k) % n)
            .find(|&j| usable(self.points[j].1));
        let start = match (prev, next) {
            (Some(pj), Some(nj)) => {
                let dp = key.wrapping_sub(self.points[pj].0);
                let dn = self.points[nj].0.wrapping_sub(key);
                if dp <= dn {
                    pj
                } else {
                    nj
                }
            }
            _ => 0,
        };
        (0..n)
            .map(move |k| self.points[(start + k) % n].1)
            .filter(move |&i| usable(i))
    }
}

/// HAProxy `hash-type consistent`: the healthy node nearest the room's hash.
pub fn consistent(
    ring: &Ring,
    nodes: &[ViewNode],
    room: u64,
    now: Millis,
    p: &Params,
) -> Option<usize> {
    let first = ring.walk(room, |i| healthy(&nodes[i], now, p)).next();
    first
}

/// HAProxy consistent hashing with bounded loads (`hash-balance-factor`, `factor` = 1.25 for
/// 125): from the nearest point on, clockwise, the first healthy node that [`haproxy_slots`]
/// finds eligible, its usable servers being the healthy nodes (weights in node order, as in
/// HAProxy's configuration) and its served counts the nodes' whole `served`; if none, the
/// nearest healthy node.
pub fn bounded(
    ring: &Ring,
    nodes: &[ViewNode],
    room: u64,
    now: Millis,
    p: &Params,
    factor: f64,
) -> Option<usize> {
    let balance_factor = (factor * 100.0).round().max(0.0) as u64;
    let (mut served, mut tot_weight) = (0u64, 0u64);
    // Each healthy node's cumulative weight: the healthy nodes' before it.
    let mut cumulative = vec![None; nodes.len()];
    for (i, v) in nodes.iter().enumerate() {
        if healthy(v, now, p) {
            cumulative[i] = Some(tot_weight);
            served += v.served;
            tot_weight += ring.eweights[i];
        }
    }
    let found = ring.walk(room, |i| cumulative[i].is_some()).find(|&i| {
        cumulative[i].is_some_and(|cum| {
            let slots = haproxy_slots(served, balance_factor, tot_weight, cum, ring.eweights[i]);
            nodes[i].served < slots
        })
    });
    found.or_else(|| consistent(ring, nodes, room, now, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::hash::node_hash;
    use rand::SeedableRng;

    fn views(utils: &[f64]) -> Vec<ViewNode> {
        utils
            .iter()
            .enumerate()
            .map(|(i, &u)| ViewNode {
                hash: node_hash(format!("n{i}").as_bytes()),
                capacity: 100.0,
                util: u,
                reserved: 0.0,
                served: (u * 100.0).round() as u64,
                last_heartbeat: Some(0),
            })
            .collect()
    }

    #[test]
    fn the_default_shares_reservations_as_far_behind_as_the_router_publishes_them() {
        let every = crate::service::SHARE_RESERVATIONS_EVERY.as_millis() as u64;
        assert_eq!(Policy::DEFAULT.shared_delay_ms(), Some(every));
        assert_eq!(Policy::DEFAULT.name(), "ours:least_loaded+res+shared5ms");
        assert_eq!(Policy::OWN_RESERVATIONS.shared_delay_ms(), None);
        let standard = Policy::standard();
        assert_eq!(standard[0], Policy::DEFAULT);
        assert!(standard.contains(&Policy::OWN_RESERVATIONS));
    }

    #[test]
    fn the_standard_set_has_every_rule_with_shared_and_with_own_reservations_once() {
        let standard = Policy::standard();
        for rule in ChoiceRule::ALL {
            let shared = Policy::Ours {
                rule,
                reservation: true,
                shared_ms: Some(SHARED_DELAY_MS),
            };
            assert!(standard.contains(&shared), "{} missing", shared.name());
            assert_eq!(
                shared.name(),
                format!("ours:{}+res+shared{SHARED_DELAY_MS}ms", rule.name())
            );
            for reservation in [true, false] {
                let own = Policy::Ours {
                    rule,
                    reservation,
                    shared_ms: None,
                };
                assert!(standard.contains(&own), "{} missing", own.name());
            }
        }
        // No policy twice (the default is least_loaded's shared variant).
        let mut names: Vec<String> = standard.iter().map(Policy::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), standard.len());
        assert_eq!(standard.len(), 1 + 3 * 3 - 1 + 5);
    }

    #[test]
    fn least_loaded_takes_the_emptiest_healthy_node() {
        let mut v = views(&[0.5, 0.2, 0.1]);
        v[2].last_heartbeat = None;
        assert_eq!(least_loaded(&v, 1, &Params::default()), Some(1));
    }

    #[test]
    fn scalelite_ranks_by_its_own_load_among_the_nodes_that_can_take_a_room() {
        let mut v = views(&[0.3, 0.2, 0.1, 0.0]);
        v[3].last_heartbeat = None;
        v[2].util = 1.0;
        // By participants node 1 is the emptiest open node; by Scalelite's load node 0.
        let load = [0.15, 0.25, 0.0, 0.0];
        assert_eq!(scalelite(&v, &load, 1, &Params::default()), Some(0));
        assert_eq!(least_loaded(&v, 1, &Params::default()), Some(1));
        // Equal loads: the lowest index.
        assert_eq!(
            scalelite(&v, &[0.2, 0.2, 0.0, 0.0], 1, &Params::default()),
            Some(0)
        );
    }

    #[test]
    fn a_meeting_counts_at_least_15_users_for_its_first_15_minutes() {
        let created = 1_000;
        assert_eq!(scalelite_meeting_load(3, created, created), 15);
        assert_eq!(scalelite_meeting_load(20, created, created), 20);
        let last = created + SCALELITE_JOIN_BUFFER_MS - 1;
        assert_eq!(scalelite_meeting_load(3, created, last), 15);
        assert_eq!(scalelite_meeting_load(3, created, last + 1), 3);
        assert_eq!(scalelite_meeting_load(0, created, last + 1), 0);
    }

    #[test]
    fn two_choice_never_takes_the_most_loaded_of_three() {
        let v = views(&[0.5, 0.2, 0.6]);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_ne!(two_choice(&v, 1, &Params::default(), &mut rng), Some(2));
        }
    }

    #[test]
    fn bounded_hash_skips_a_node_above_its_bound() {
        let v = views(&[0.0, 0.0, 0.0]);
        let hashes: Vec<u64> = v.iter().map(|n| n.hash).collect();
        let ring = Ring::new(&hashes, &[100.0; 3]);
        let p = Params::default();
        let first = consistent(&ring, &v, 42, 1, &p).unwrap();
        let mut hot = v.clone();
        hot[first].util = 0.5;
        hot[first].served = 50;
        assert_eq!(bounded(&ring, &v, 42, 1, &p, 1.25), Some(first));
        assert_ne!(bounded(&ring, &hot, 42, 1, &p, 1.25), Some(first));
        assert_eq!(consistent(&ring, &hot, 42, 1, &p), Some(first));
    }

    #[test]
    fn the_ring_gives_each_node_its_haproxy_effective_weight_in_points() {
        // lb_chash.c: a server has `uweight * BE_WEIGHT_SCALE` points; 20 equal nodes have
        // weight 256 each, so 4 096 points, the effective weight the bounded check uses.
        let hashes: Vec<u64> = (0..20).map(|i| pair_hash(i, 99)).collect();
        let ring = Ring::new(&hashes, &[100.0; 20]);
        assert_eq!(ring.eweights[0], 256 * BE_WEIGHT_SCALE);
        assert_eq!(ring.points_of(0) as u64, ring.eweights[0]);
        assert_eq!(ring.points_of(0), 4_096);
        // Unequal capacities: weights 64 and 256, points 1 024 and 4 096.
        let ring = Ring::new(&hashes[..2], &[100.0, 400.0]);
        assert_eq!((ring.points_of(0), ring.points_of(1)), (1_024, 4_096));
    }

    #[test]
    fn the_ring_starts_at_the_nearer_point_as_haproxy_does() {
        // chash_get_server_hash: the point before the key when it is at least as near as
        // the one after (`dp <= dn`), not always the one after.
        let hashes: Vec<u64> = (0..3).map(|i| pair_hash(i, 99)).collect();
        let ring = Ring::new(&hashes, &[100.0; 3]);
        let j = (0..ring.points.len() - 1)
            .find(|&j| {
                ring.points[j].1 != ring.points[j + 1].1
                    && ring.points[j + 1].0 - ring.points[j].0 > 2
            })
            .unwrap();
        let (before, after) = (ring.points[j], ring.points[j + 1]);
        let all = |_| true;
        assert_eq!(ring.walk(before.0 + 1, all).next(), Some(before.1));
        assert_eq!(ring.walk(after.0 - 1, all).next(), Some(after.1));
        // Exactly halfway (or the nearest key to it) and on a point.
        let mid = before.0 + (after.0 - before.0) / 2;
        let expect = if mid - before.0 <= after.0 - mid {
            before.1
        } else {
            after.1
        };
        assert_eq!(ring.walk(mid, all).next(), Some(expect));
        assert_eq!(ring.walk(after.0, all).next(), Some(after.1));
        // An unusable node's points are not there: the nearest usable one is taken.
        let v = views(&[0.0, 0.0, 0.0]);
        let mut down = v.clone();
        down[before.1].last_heartbeat = None;
        let p = Params::default();
        assert_ne!(
            consistent(&ring, &down, before.0 + 1, 1, &p),
            Some(before.1)
        );
        assert_eq!(consistent(&ring, &v, before.0 + 1, 1, &p), Some(before.1));
    }

    /// A key whose ring walk starts at node `i`.
    fn key_starting_at(ring: &Ring, i: usize) -> u64 {
        (0..10_000)
            .map(|k| pair_hash(k, 7))
            .find(|&k| ring.walk(k, |_| true).next() == Some(i))
            .expect("a node with points on the ring starts some walk")
    }

    #[test]
    fn bounded_hash_takes_a_node_exactly_at_its_bound() {
        // 22 participants on two nodes of 100, 14 of them on node 1: with this join 23, and
        // node 1 may hold 15 (HAProxy: 29 slots, 14 for node 0 and 15 for node 1). Rebuilt
        // from its utilization, node 1's load was 14.000000000000002 and it was skipped.
        let mut v = views(&[0.08, 0.14]);
        v[1].util = 14.0 / 100.0;
        assert_ne!(v[1].util * v[1].capacity, 14.0);
        let hashes: Vec<u64> = v.iter().map(|n| n.hash).collect();
        let ring = Ring::new(&hashes, &[100.0; 2]);
        let key = key_starting_at(&ring, 1);
        assert_eq!(
            bounded(&ring, &v, key, 1, &Params::default(), 1.25),
            Some(1)
        );
        // One more participant (24 with this join: 30 slots, 15 for node 1) and it is past
        // its bound.
        v[1].served = 15;
        assert_eq!(
            bounded(&ring, &v, key, 1, &Params::default(), 1.25),
            Some(0)
        );
    }

    #[test]
    fn haproxy_slots_spread_the_remainder_by_cumulative_weight_and_never_give_zero() {
        // Weights 1 and 3 (effective 16 and 48), 9 served: (10 x 125 + 99) / 100 = 13 slots,
        // 13 x 16 / 64 = 3 for the first, the other 10.
        assert_eq!(haproxy_slots(9, 125, 64, 0, 16), 3);
        assert_eq!(haproxy_slots(9, 125, 64, 16, 48), 10);
        // Nothing served: 2 slots over three equal servers, the first would get 0, so 1.
        let three: Vec<u64> = (0..3)
            .map(|i| haproxy_slots(0, 125, 48, 16 * i, 16))
            .collect();
        assert_eq!(three, [1, 1, 1]);
        // More slots than weight: whole slots per weight unit, then the remainder.
        // 99 served: 125 slots over 48: 2 per unit (32 each), 29 left: 9, 10, 10.
        let many: Vec<u64> = (0..3)
            .map(|i| haproxy_slots(99, 125, 48, 16 * i, 16))
            .collect();
        assert_eq!(many, [41, 42, 42]);
    }

    #[test]
    fn haproxy_weights_follow_capacity_within_haproxys_range() {
        assert_eq!(haproxy_weights(&[100.0, 400.0, 250.0]), [64, 256, 160]);
        assert_eq!(haproxy_weights(&[250.0; 3]), [256; 3]);
        assert_eq!(haproxy_weights(&[1.0, 1000.0]), [1, 256]);
    }

    #[test]
    fn bounded_hash_gives_the_remainder_to_the_later_nodes_as_haproxy_does() {
        // One participant on each of three equal nodes: with this join 4, 5 slots. HAProxy
        // gives them 1, 2 and 2, so node 0 (already at 1) is not eligible; an even
        // ceil(5 / 3) = 2 each would have taken it.
        let v = views(&[0.01, 0.01, 0.01]);
        let hashes: Vec<u64> = v.iter().map(|n| n.hash).collect();
        let ring = Ring::new(&hashes, &[100.0; 3]);
        let key = key_starting_at(&ring, 0);
        let next = ring.walk(key, |_| true).find(|&i| i != 0);
        assert_eq!(bounded(&ring, &v, key, 1, &Params::default(), 1.25), next);
        assert_eq!(consistent(&ring, &v, key, 1, &Params::default()), Some(0));
    }
}
