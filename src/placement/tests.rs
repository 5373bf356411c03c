//! The rules of placement.md, one test (or property) per rule, on the pure engine.

use super::*;
use crate::placement::hash::node_hash;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct N {
    id: String,
    hash: u64,
    cap: f64,
    util: f64,
    /// What this router sent and reserved since the node's report (in `util` already):
    /// `shared_utilization` is `util - local`.
    local: f64,
    hb: Option<Millis>,
    state: AdminState,
    region: Option<String>,
    tags: Vec<String>,
}

fn n(id: &str, cap: f64, util: f64) -> N {
    N {
        id: id.to_string(),
        hash: node_hash(id.as_bytes()),
        cap,
        util,
        local: 0.0,
        hb: Some(NOW - 1_000),
        state: AdminState::Active,
        region: None,
        tags: vec![],
    }
}

impl NodeView for N {
    fn node_hash(&self) -> u64 {
        self.hash
    }
    fn capacity(&self) -> f64 {
        self.cap
    }
    fn utilization(&self) -> f64 {
        self.util
    }
    fn shared_utilization(&self) -> f64 {
        self.util - self.local
    }
    fn last_heartbeat(&self) -> Option<Millis> {
        self.hb
    }
    fn state(&self) -> AdminState {
        self.state
    }
    fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }
    fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

const NOW: Millis = 1_700_000_000_000;

fn room(i: usize) -> u64 {
    hash::room_hash(format!("room-{i}").as_bytes())
}

fn placed(nodes: &[N], r: u64, p: &Params) -> Option<String> {
    match decide(nodes, None, r, &Hints::default(), NOW, p) {
        Decision::Place { node, .. } => Some(nodes[node].id.clone()),
        _ => None,
    }
}

fn cluster(caps: &[f64]) -> Vec<N> {
    caps.iter()
        .enumerate()
        .map(|(i, c)| n(&format!("node-{i}"), *c, 0.0))
        .collect()
}

#[test]
fn pinned_room_joins_its_node_even_when_draining_or_above_new_room_limit() {
    let mut nodes = cluster(&[10.0, 10.0]);
    nodes[0].state = AdminState::Draining;
    nodes[0].util = 0.95;
    let d = decide(
        &nodes,
        Some(0),
        room(1),
        &Hints::default(),
        NOW,
        &Params::default(),
    );
    assert_eq!(d, Decision::Pinned(0));
}

#[test]
fn pinned_node_at_join_limit_refuses_instead_of_moving_the_room() {
    let mut nodes = cluster(&[10.0, 10.0]);
    nodes[0].util = 1.0;
    let d = decide(
        &nodes,
        Some(0),
        room(1),
        &Hints::default(),
        NOW,
        &Params::default(),
    );
    assert_eq!(d, Decision::NodeFull(0));
}

#[test]
fn unhealthy_or_disabled_pin_is_re_placed_elsewhere() {
    let p = Params::default();
    let mut nodes = cluster(&[10.0, 10.0]);
    nodes[0].hb = Some(NOW - p.heartbeat_timeout_ms);
    assert_eq!(
        decide(&nodes, Some(0), room(1), &Hints::default(), NOW, &p),
        Decision::Place {
            node: 1,
            overflow: false
        }
    );
    let mut nodes = cluster(&[10.0, 10.0]);
    nodes[0].state = AdminState::Disabled;
    assert_eq!(
        decide(&nodes, Some(0), room(1), &Hints::default(), NOW, &p),
        Decision::Place {
            node: 1,
            overflow: false
        }
    );
}

#[test]
fn a_node_without_any_heartbeat_is_not_healthy() {
    let mut nodes = cluster(&[10.0]);
    nodes[0].hb = None;
    assert_eq!(
        decide(
            &nodes,
            None,
            room(1),
            &Hints::default(),
            NOW,
            &Params::default()
        ),
        Decision::NoCapacity
    );
}

#[test]
fn new_rooms_avoid_draining_disabled_and_untagged_nodes() {
    let mut nodes = cluster(&[10.0, 10.0, 10.0, 10.0]);
    nodes[0].state = AdminState::Draining;
    nodes[1].state = AdminState::Disabled;
    nodes[2].tags = vec!["recording".into()];
    let tags = vec!["recording".to_string()];
    let hints = Hints {
        tags: &tags,
        ..Hints::default()
    };
    for i in 0..200 {
        assert_eq!(
            decide(&nodes, None, room(i), &hints, NOW, &Params::default()),
            Decision::Place {
                node: 2,
                overflow: false
            }
        );
    }
}

#[test]
fn region_hint_prefers_the_region_and_falls_back_to_all() {
    let mut nodes = cluster(&[10.0, 10.0, 10.0]);
    nodes[0].region = Some("eu".into());
    nodes[1].region = Some("us".into());
    nodes[2].region = Some("us".into());
    let hints = Hints {
        region: Some("eu"),
        ..Hints::default()
    };
    for i in 0..100 {
        assert_eq!(
            decide(&nodes, None, room(i), &hints, NOW, &Params::default()),
            Decision::Place {
                node: 0,
                overflow: false
            }
        );
    }
    nodes[0].util = 0.9; // eu is above new_room_limit: fall back to all regions
    for i in 0..100 {
        let d = decide(&nodes, None, room(i), &hints, NOW, &Params::default());
        assert!(
            matches!(
                d,
                Decision::Place {
                    node: 1 | 2,
                    overflow: false
                }
            ),
            "{d:?}"
        );
    }
    let no_affinity = Params {
        region_affinity: false,
        ..Params::default()
    };
    nodes[0].util = 0.0;
    let spread: std::collections::HashSet<usize> = (0..100)
        .filter_map(
            |i| match decide(&nodes, None, room(i), &hints, NOW, &no_affinity) {
                Decision::Place { node, .. } => Some(node),
                _ => None,
            },
        )
        .collect();
    assert_eq!(spread.len(), 3, "without affinity the hint is ignored");
}

#[test]
fn overflow_to_join_limit_then_no_capacity() {
    let mut nodes = cluster(&[10.0, 10.0]);
    nodes[0].util = 0.85;
    nodes[1].util = 0.99;
    assert_eq!(
        decide(
            &nodes,
            None,
            room(1),
            &Hints::default(),
            NOW,
            &Params::default()
        ),
        Decision::Place {
            node: 0,
            overflow: true
        },
        "both nodes are above new_room_limit; the less loaded of the top two takes the overflow"
    );
    nodes[0].util = 1.0;
    nodes[1].util = 1.2;
    assert_eq!(
        decide(
            &nodes,
            None,
            room(1),
            &Hints::default(),
            NOW,
            &Params::default()
        ),
        Decision::NoCapacity
    );
}

#[test]
fn top_two_takes_the_less_loaded_of_the_two_best_ranked() {
    let p = Params {
        rule: ChoiceRule::TopTwo,
        ..Params::default()
    };
    let mut checked_runner_up = 0;
    for i in 0..300 {
        let r = room(i);
        let nodes: Vec<N> = (0..8)
            .map(|j| {
                n(
                    &format!("node-{j}"),
                    10.0,
                    ((i * 7 + j * 13) % 70) as f64 / 100.0,
                )
            })
            .collect();
        let ranked = |x: &N| crate_score(r, x.hash, x.cap * (p.new_room_limit - x.util));
        let mut order: Vec<&N> = nodes.iter().collect();
        order.sort_by(|a, b| ranked(b).partial_cmp(&ranked(a)).unwrap());
        let (first, second) = (order[0], order[1]);
        let expected = if second.util < first.util {
            second
        } else {
            first
        };
        if expected.id == second.id {
            checked_runner_up += 1;
        }
        assert_eq!(placed(&nodes, r, &p), Some(expected.id.clone()));
        let plain = Params {
            rule: ChoiceRule::Rendezvous,
            ..p.clone()
        };
        assert_eq!(placed(&nodes, r, &plain), Some(first.id.clone()));
    }
    assert!(
        checked_runner_up > 50,
        "the runner-up case was exercised {checked_runner_up} times"
    );
}

#[test]
fn numeric_score_ranks_like_the_crate() {
    let nodes = cluster(&[1.0, 3.0, 7.0, 20.0, 50.0]);
    for i in 0..500 {
        let r = room(i);
        let by_crate = nodes
            .iter()
            .max_by(|a, b| {
                crate_score(r, a.hash, a.cap)
                    .partial_cmp(&crate_score(r, b.hash, b.cap))
                    .unwrap()
            })
            .unwrap();
        let by_number = nodes
            .iter()
            .max_by(|a, b| {
                numeric_score(r, a.hash, a.cap)
                    .partial_cmp(&numeric_score(r, b.hash, b.cap))
                    .unwrap()
            })
            .unwrap();
        assert_eq!(by_crate.id, by_number.id);
    }
}

proptest! {
    /// The hot path's float is the crate's score, bit for bit (the crate's value is private;
    /// its `Debug` prints the shortest representation that round-trips, so equal text is
    /// equal bits).
    #[test]
    fn raw_score_is_the_crates_score_bit_for_bit(
        r in any::<u64>(),
        n in any::<u64>(),
        w in prop_oneof![1e-9f64..1e-3, 1e-3f64..1.0, 1.0f64..1e6],
    ) {
        prop_assert_eq!(
            format!("{:?}", crate_score(r, n, w)),
            format!("SignPositiveF64({:?})", raw_score(r, n, w))
        );
    }
}

#[test]
fn explain_agrees_with_decide() {
    let mut nodes = cluster(&[10.0, 20.0, 30.0, 40.0]);
    nodes[0].state = AdminState::Draining;
    nodes[1].util = 0.9;
    let p = Params::default();
    for i in 0..100 {
        let hints = Hints {
            expected_load: (i % 3) as f64 * 4.0,
            ..Hints::default()
        };
        let (d, rows) = explain(&nodes, None, room(i), &hints, NOW, &p);
        assert_eq!(d, decide(&nodes, None, room(i), &hints, NOW, &p));
        for (row, x) in rows.iter().zip(&nodes) {
            assert_eq!(
                row.utilization_with_room,
                x.util + hints.expected_load / x.cap
            );
        }
        let Decision::Place { node, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(rows[node].verdict, Verdict::Chosen);
        assert_eq!(rows[0].verdict, Verdict::Draining);
        assert_eq!(rows[1].verdict, Verdict::AboveNewRoomLimit);
        assert_eq!(
            rows.iter().filter(|r| r.verdict == Verdict::Chosen).count(),
            1
        );
    }
}

/// Each node got its capacity's share of the rooms, within a point.
fn assert_shares_follow_capacity(counts: &[usize], caps: &[f64]) {
    let rooms: usize = counts.iter().sum();
    let total: f64 = caps.iter().sum();
    for (i, c) in caps.iter().enumerate() {
        let expected = c / total;
        let got = counts[i] as f64 / rooms as f64;
        assert!(
            (got - expected).abs() < 0.01,
            "node {i}: share {got:.3}, expected {expected:.3}"
        );
    }
}

/// Invariant 5: with no load, new rooms spread in proportion to capacity.
#[test]
fn weights_hold() {
    let caps = [10.0, 20.0, 30.0, 40.0];
    let nodes = cluster(&caps);
    let p = Params::default();
    let rooms = 40_000;
    let mut counts = [0usize; 4];
    for i in 0..rooms {
        let Decision::Place { node, .. } =
            decide(&nodes, None, room(i), &Hints::default(), NOW, &p)
        else {
            panic!()
        };
        counts[node] += 1;
    }
    assert_shares_follow_capacity(&counts, &caps);
}

/// Invariant 5 with sizes: a room with an expected size goes first where it takes the
/// smallest share (the biggest node), but as each placement's reservation raises its node's
/// û, a burst of such rooms still spreads in proportion to capacity.
#[test]
fn weights_hold_for_a_burst_of_sized_rooms() {
    let caps = [50.0, 100.0, 200.0, 400.0];
    let mut nodes = cluster(&caps);
    let p = Params::default();
    let hints = Hints {
        expected_load: 0.3,
        ..Hints::default()
    };
    let rooms = 1_000;
    let mut counts = [0usize; 4];
    for i in 0..rooms {
        let Decision::Place { node, overflow } = decide(&nodes, None, room(i), &hints, NOW, &p)
        else {
            panic!()
        };
        assert!(!overflow);
        if i == 0 {
            assert_eq!(node, 3, "the first room goes to the biggest node");
        }
        counts[node] += 1;
        nodes[node].util += hints.expected_load / caps[node];
    }
    assert_shares_follow_capacity(&counts, &caps);
}

fn arb_nodes() -> impl Strategy<Value = Vec<N>> {
    prop::collection::vec((1.0f64..100.0, 0.0f64..1.2, 0u8..10, any::<bool>()), 1..12).prop_map(
        |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (cap, util, st, has_hb))| {
                    let mut x = n(&format!("n{i}"), cap, util);
                    x.state = match st {
                        0 => AdminState::Draining,
                        1 => AdminState::Disabled,
                        _ => AdminState::Active,
                    };
                    if !has_hb && i % 3 == 0 {
                        x.hb = Some(NOW - 60_000);
                    }
                    x
                })
                .collect()
        },
    )
}

proptest! {
    /// Invariant 6: the same room, nodes and loads give the same node, whatever the order the
    /// router happens to hold its nodes in.
    #[test]
    fn deterministic_across_node_order(nodes in arb_nodes(), r in any::<u64>(), rot in 0usize..12) {
        let p = Params::default();
        let a = match decide(&nodes, None, r, &Hints::default(), NOW, &p) {
            Decision::Place { node, .. } => Some(nodes[node].id.clone()),
            _ => None,
        };
        let mut rotated = nodes.clone();
        let k = rot % rotated.len();
        rotated.rotate_left(k);
        rotated.reverse();
        let b = match decide(&rotated, None, r, &Hints::default(), NOW, &p) {
            Decision::Place { node, .. } => Some(rotated[node].id.clone()),
            _ => None,
        };
        prop_assert_eq!(a, b);
    }

    /// Invariant 4: no new room goes to a node at or above new_room_limit while an eligible
    /// node below it exists, and nothing goes to a node at or above join_limit.
    #[test]
    fn headroom_is_respected(nodes in arb_nodes(), r in any::<u64>()) {
        let p = Params::default();
        let eligible = |x: &N| x.state == AdminState::Active && is_healthy(x, NOW, p.heartbeat_timeout_ms);
        let below_new = nodes.iter().any(|x| eligible(x) && x.util < p.new_room_limit);
        let below_join = nodes.iter().any(|x| eligible(x) && x.util < p.join_limit);
        for rule in ChoiceRule::ALL {
            let p = Params { rule, ..p.clone() };
            match decide(&nodes, None, r, &Hints::default(), NOW, &p) {
                Decision::Place { node, overflow } => {
                    let x = &nodes[node];
                    prop_assert!(eligible(x));
                    prop_assert!(x.util < p.join_limit);
                    if below_new {
                        prop_assert!(!overflow);
                        prop_assert!(x.util < p.new_room_limit);
                    }
                }
                Decision::NoCapacity => prop_assert!(!below_join),
                d => prop_assert!(false, "unexpected {:?}", d),
            }
        }
    }

    /// Invariant 2 (at the hashing level): with equal load, adding a node moves a room only
    /// onto the new node, never between old nodes.
    #[test]
    fn scale_out_moves_only_to_the_new_node(caps in prop::collection::vec(1.0f64..50.0, 1..10), extra in 1.0f64..50.0) {
        let nodes = cluster(&caps);
        let mut grown = nodes.clone();
        grown.push(n("newcomer", extra, 0.0));
        let p = Params::default();
        for i in 0..200 {
            let before = placed(&nodes, room(i), &p).unwrap();
            let after = placed(&grown, room(i), &p).unwrap();
            prop_assert!(after == before || after == "newcomer", "{} moved {} -> {}", i, before, after);
        }
    }

    /// Invariant 3 (at the hashing level): when a node fails, only its rooms move.
    #[test]
    fn failure_moves_only_what_failed(caps in prop::collection::vec(1.0f64..50.0, 2..10), dead in 0usize..10) {
        let nodes = cluster(&caps);
        let dead = dead % nodes.len();
        let mut failed = nodes.clone();
        failed[dead].hb = Some(NOW - 60_000);
        let p = Params::default();
        for i in 0..200 {
            let before = placed(&nodes, room(i), &p).unwrap();
            let after = placed(&failed, room(i), &p).unwrap();
            if before != nodes[dead].id {
                prop_assert_eq!(before, after);
            } else {
                prop_assert_ne!(after, nodes[dead].id.clone());
            }
        }
    }
}

/// The rule written the slow, obvious way: rank every candidate with the crate's score,
/// compare loads with the room's `expected` load added.
fn reference_choice(nodes: &[N], r: u64, p: &Params, expected: f64) -> Option<String> {
    let after = |x: &N| x.util + expected / x.cap;
    let eligible =
        |x: &&N| x.state == AdminState::Active && is_healthy(*x, NOW, p.heartbeat_timeout_ms);
    for limit in [p.new_room_limit, p.join_limit] {
        let mut c: Vec<&N> = nodes
            .iter()
            .filter(eligible)
            .filter(|x| x.util < limit)
            .collect();
        if c.is_empty() {
            continue;
        }
        c.sort_by(|a, b| {
            let sa = crate_score(r, a.hash, a.cap * (limit - a.util));
            let sb = crate_score(r, b.hash, b.cap * (limit - b.util));
            sb.partial_cmp(&sa).unwrap().then(b.hash.cmp(&a.hash))
        });
        let pick = match p.rule {
            ChoiceRule::Rendezvous => c[0],
            ChoiceRule::TopTwo => {
                if c.len() > 1 && after(c[1]) < after(c[0]) {
                    c[1]
                } else {
                    c[0]
                }
            }
            ChoiceRule::LeastLoaded => {
                let min = c.iter().map(|x| after(x)).fold(f64::INFINITY, f64::min);
                c.into_iter().find(|x| after(x) == min).unwrap()
            }
        };
        return Some(pick.id.clone());
    }
    None
}

proptest! {
    /// The one-pass choice (with its logarithm-skipping bound) picks exactly what ranking
    /// every candidate would.
    #[test]
    fn one_pass_choice_equals_full_ranking(nodes in arb_nodes(), r in any::<u64>(), e in prop::sample::select(vec![0.0, 1.0, 12.0, 40.0])) {
        for rule in ChoiceRule::ALL {
            let p = Params { rule, ..Params::default() };
            prop_assert_eq!(placed_with(&nodes, r, &p, e), reference_choice(&nodes, r, &p, e), "rule {:?}", rule);
        }
    }

    /// On nodes of equal capacity the room's expected load adds the same to every candidate:
    /// no decision changes (the simulator's standard clusters are such).
    #[test]
    fn on_equal_nodes_the_expected_load_changes_nothing(utils in prop::collection::vec(0.0f64..1.2, 1..12), r in any::<u64>(), e in 0.0f64..80.0) {
        let nodes: Vec<N> = utils.iter().enumerate().map(|(i, u)| n(&format!("n{i}"), 100.0, *u)).collect();
        for rule in ChoiceRule::ALL {
            let p = Params { rule, ..Params::default() };
            prop_assert_eq!(placed_with(&nodes, r, &p, e), placed(&nodes, r, &p), "rule {:?}", rule);
        }
    }
}

/// Where a new room of `expected` load units goes.
fn placed_with(nodes: &[N], r: u64, p: &Params, expected: f64) -> Option<String> {
    let hints = Hints {
        expected_load: expected,
        ..Hints::default()
    };
    match decide(nodes, None, r, &hints, NOW, p) {
        Decision::Place { node, .. } => Some(nodes[node].id.clone()),
        _ => None,
    }
}

/// On nodes of unequal capacity, "least loaded" means once the room is there: a room
/// expected to fill 80% of a small node goes to the big one, which it fills to 20%, even
/// though both are empty now and the small one sometimes ranks first.
#[test]
fn a_big_room_goes_where_it_takes_the_smallest_share() {
    let nodes = vec![n("small", 50.0, 0.0), n("big", 200.0, 0.0)];
    let p = Params::default();
    let small_first = (0..200)
        .filter(|&i| placed(&nodes, room(i), &p).as_deref() == Some("small"))
        .count();
    assert!(
        small_first > 10,
        "with no size known, the small node takes its share"
    );
    for i in 0..200 {
        assert_eq!(
            placed_with(&nodes, room(i), &p, 40.0).as_deref(),
            Some("big")
        );
    }
    // The small node busy at 10%, the big at 45%: a room of 40 still fits better on the big
    // one (65% against 90%), a room of 2 on the small one (14% against 46%).
    let nodes = vec![n("small", 50.0, 0.10), n("big", 200.0, 0.45)];
    for i in 0..50 {
        assert_eq!(
            placed_with(&nodes, room(i), &p, 40.0).as_deref(),
            Some("big")
        );
        assert_eq!(
            placed_with(&nodes, room(i), &p, 2.0).as_deref(),
            Some("small")
        );
    }
}

#[test]
fn one_pass_choice_equals_full_ranking_on_large_clusters() {
    for rule in ChoiceRule::ALL {
        let p = Params {
            rule,
            ..Params::default()
        };
        let nodes: Vec<N> = (0..500)
            .map(|i| {
                n(
                    &format!("big-{i}"),
                    50.0 + (i % 9) as f64 * 25.0,
                    (i % 17) as f64 / 20.0,
                )
            })
            .collect();
        for i in 0..300 {
            for e in [0.0, 30.0] {
                assert_eq!(
                    placed_with(&nodes, room(i), &p, e),
                    reference_choice(&nodes, room(i), &p, e),
                    "rule {rule:?} room {i} expected load {e}"
                );
            }
        }
    }
}

#[test]
fn the_pruning_bound_never_falls_below_the_score_it_bounds_even_for_a_subnormal_weight() {
    // `raw_score` divides by the weight raised to the smallest normal float; a bound that
    // divided by the subnormal weight itself could drop below that score and prune a node
    // that would have ranked (a capacity of 1e-310 is finite and > 0: a heartbeat may say it).
    let w = 1e-310;
    for room in 0..200u64 {
        let node = node_hash(b"tiny");
        let score = raw_score(room, node, w);
        assert!(
            !cannot_matter(Bar::Score(score), room, node, w),
            "room {room}: pruned a node scoring {score}, exactly at the bar"
        );
    }
}

/// Deciding alone (the shared store down): two routers whose views of the nodes' load
/// differ (each its own `pending` and reservations, each the reports only it hears) choose
/// the same node for every new room, the best-ranked by capacity alone, as long as both
/// take the node for eligible. The rules that weigh load choose differently.
#[test]
fn routers_deciding_alone_agree_whatever_load_each_sees() {
    let p = Params::default();
    let caps = [100.0, 200.0, 300.0];
    let here = cluster(&caps);
    let mut there = cluster(&caps);
    for (i, n) in there.iter_mut().enumerate() {
        n.util = [0.5, 0.1, 0.7][i];
    }
    let mut disagreed_by_load = 0;
    let mut counts = [0usize; 3];
    for i in 0..3_000 {
        let a = choose_alone(&here, room(i), &Hints::default(), NOW, &p);
        let b = choose_alone(&there, room(i), &Hints::default(), NOW, &p);
        assert_eq!(a, b, "room {i}");
        let Decision::Place { node, .. } = a else {
            panic!("room {i}: {a:?}")
        };
        counts[node] += 1;
        if placed(&here, room(i), &p) != placed(&there, room(i), &p) {
            disagreed_by_load += 1;
        }
    }
    assert!(
        disagreed_by_load > 300,
        "the load-weighing rule disagreed only {disagreed_by_load} times: nothing shown"
    );
    // Spread by capacity, as plain weighted rendezvous hashing.
    let share = |n: usize| counts[n] as f64 / 3_000.0;
    assert!(
        (share(2) - 0.5).abs() < 0.04 && (share(0) - 1.0 / 6.0).abs() < 0.04,
        "{counts:?}"
    );
}

#[test]
fn deciding_alone_still_filters_and_prefers_the_region() {
    let p = Params::default();
    let mut nodes = cluster(&[100.0, 100.0, 100.0, 100.0]);
    nodes[0].state = AdminState::Draining;
    nodes[1].hb = None;
    nodes[2].util = 1.0; // at join_limit
    nodes[3].region = Some("eu".into());
    for i in 0..200 {
        assert_eq!(
            choose_alone(&nodes, room(i), &Hints::default(), NOW, &p),
            Decision::Place {
                node: 3,
                overflow: false
            }
        );
    }
    let eu = Hints {
        region: Some("eu"),
        ..Hints::default()
    };
    nodes[2].util = 0.0;
    nodes[3].util = 0.5;
    for i in 0..200 {
        let Decision::Place { node, .. } = choose_alone(&nodes, room(i), &eu, NOW, &p) else {
            panic!()
        };
        assert_eq!(node, 3, "the region's node, below new_room_limit, first");
    }
    // Past new_room_limit the region's node takes new rooms only when no node is below it,
    // as overflow, as the rules do: the meetings already there keep their headroom.
    nodes[3].util = 0.9;
    for i in 0..200 {
        assert_eq!(
            choose_alone(&nodes, room(i), &eu, NOW, &p),
            Decision::Place {
                node: 2,
                overflow: false
            }
        );
    }
    nodes[2].util = 0.95;
    let mut on = [0usize; 4];
    for i in 0..400 {
        let Decision::Place { node, overflow } =
            choose_alone(&nodes, room(i), &Hints::default(), NOW, &p)
        else {
            panic!()
        };
        assert!(overflow);
        on[node] += 1;
    }
    assert!(
        on[2] > 100 && on[3] > 100,
        "overflow spread by capacity: {on:?}"
    );
    nodes[3].util = 1.0;
    nodes[2].util = 1.0;
    assert_eq!(
        choose_alone(&nodes, room(1), &eu, NOW, &p),
        Decision::NoCapacity
    );
}

/// What one router sent and reserved since a node's report (its own `pending`) is not known
/// to the others: routers deciding alone judge the node by its report, and agree even where
/// those counters push it across a limit on one of them (a review's finding: at 0.99
/// reported, two joins sent here made 1.01, and every room ranked first there went apart).
#[test]
fn routers_deciding_alone_judge_a_node_by_its_report_not_their_own_counters() {
    let p = Params::default();
    let mut here = cluster(&[100.0, 100.0]);
    here[0].util = 0.79;
    let mut there = here.clone();
    there[0].util = 1.01;
    there[0].local = 0.22;
    for i in 0..500 {
        assert_eq!(
            choose_alone(&here, room(i), &Hints::default(), NOW, &p),
            choose_alone(&there, room(i), &Hints::default(), NOW, &p),
            "room {i}"
        );
    }
}
