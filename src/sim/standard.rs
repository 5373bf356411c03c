//! The standard comparison: every standard workload, in every hint mode, through every
//! policy, with the issue's targets checked. [`run_all`] is what the `simulate` command and
//! anyone who wants to rerun the figures call.

use serde::{Deserialize, Serialize};

use super::report::{Report, TargetCheck, WorkloadResult, FIGURES};
use super::workload::{generate, HintMode, StandardWorkload, Workload, WorkloadParams, MINUTE};
use super::{simulate, Policy, SimConfig};

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub nodes: usize,
    /// Capacity of each node, in load units (participants).
    pub capacity: f64,
    pub routers: usize,
    pub heartbeat_ms: u64,
    pub seed: u64,
    pub workloads: Vec<StandardWorkload>,
    pub hints: Vec<HintMode>,
    pub policies: Vec<Policy>,
    /// Shorter runs (45 min steady, two lessons) for smoke tests.
    pub quick: bool,
}

impl Default for Options {
    /// The issue's setup: 20 equal nodes, 4 routers, reports every 2 s.
    fn default() -> Self {
        Options {
            nodes: 20,
            capacity: 250.0,
            routers: 4,
            heartbeat_ms: 2_000,
            seed: 1,
            workloads: StandardWorkload::ALL.to_vec(),
            hints: HintMode::ALL.to_vec(),
            policies: Policy::standard(),
            quick: false,
        }
    }
}

impl Options {
    pub fn config(&self) -> SimConfig {
        SimConfig::new(
            self.nodes,
            self.capacity,
            self.routers,
            self.heartbeat_ms,
            self.seed,
        )
    }

    pub fn workload_params(&self) -> WorkloadParams {
        let mut p = WorkloadParams::standard(self.nodes, self.capacity, self.seed);
        if self.quick {
            p.steady_measure = 45 * MINUTE;
            p.lessons = 2;
        }
        p
    }

    /// One line saying what was run.
    pub fn describe(&self) -> String {
        format!(
            "{} nodes x {} units, {} routers, reports every {} ms, seed {}{}",
            self.nodes,
            self.capacity,
            self.routers,
            self.heartbeat_ms,
            self.seed,
            if self.quick { " (quick)" } else { "" }
        )
    }
}

/// Runs one workload through each policy.
pub fn run_workload(w: &Workload, policies: &[Policy], cfg: &SimConfig) -> WorkloadResult {
    WorkloadResult {
        workload: w.name.clone(),
        results: policies.iter().map(|&p| simulate(w, p, cfg)).collect(),
    }
}

/// Runs the selected standard workloads and checks the targets.
pub fn run_all(o: &Options) -> Report {
    let cfg = o.config();
    let wp = o.workload_params();
    let mut runs = Vec::new();
    for &kind in &o.workloads {
        for &hints in &o.hints {
            let w = generate(kind, hints, &wp);
            runs.push((kind, hints, run_workload(&w, &o.policies, &cfg)));
        }
    }
    Report {
        setup: o.describe(),
        targets: check_targets(o, &runs),
        workloads: runs.into_iter().map(|(_, _, r)| r).collect(),
    }
}

/// The issue's targets for the default policy, over whatever was run.
pub fn check_targets(
    o: &Options,
    runs: &[(StandardWorkload, HintMode, WorkloadResult)],
) -> Vec<TargetCheck> {
    let d = Policy::DEFAULT;
    let mut out = Vec::new();
    for (_, _, w) in runs {
        let Some(def) = w.get(d) else { continue };
        for (name, f) in FIGURES {
            if let Some((best, v)) = w.best(f, true) {
                let mut detail = format!("default {:.3}, best {:.3} ({})", f(def), v, best.policy);
                if let Some((any, va)) = w.best(f, false).filter(|(r, _)| r.split_rooms > 0) {
                    detail += &format!(
                        "; {} has {:.3} but splits {} rooms",
                        any.policy, va, any.split_rooms
                    );
                }
                out.push(TargetCheck {
                    target: format!(
                        "{}: default best or within 2% on {name} (among policies that split no room)",
                        w.workload
                    ),
                    met: f(def) <= v * 1.02,
                    detail,
                });
            }
        }
    }
    let issue_setup = o.nodes == 20 && o.routers == 4 && o.heartbeat_ms == 2_000;
    for (kind, _, w) in runs {
        if *kind != StandardWorkload::SmallRooms {
            continue;
        }
        if let Some(def) = w.get(d) {
            out.push(TargetCheck {
                target: format!("{}: default max/mean <= 1.10", w.workload),
                met: def.max_over_mean <= 1.10,
                detail: format!(
                    "{:.3}{}",
                    def.max_over_mean,
                    if issue_setup {
                        ""
                    } else {
                        " (not the issue's 20 nodes / 4 routers / 2 s)"
                    }
                ),
            });
        }
    }
    let school = |h: HintMode| {
        runs.iter()
            .find(|(k, hm, _)| *k == StandardWorkload::SchoolDay && *hm == h)
            .map(|(_, _, w)| w)
    };
    // The realized peak of a pinned node stops at `join_limit` (beyond it joins are refused),
    // so the target compares offered peaks: what each policy piled onto its busiest node.
    let baseline = school(HintMode::Absent).and_then(|w| w.get(Policy::LeastLoaded));
    if let Some(base) = baseline {
        for h in HintMode::ALL {
            let what = match h {
                HintMode::Absent => "learned history",
                HintMode::Noisy => "noisy hints",
                HintMode::Exact => "exact hints",
            };
            if let Some(def) = school(h).and_then(|w| w.get(d)) {
                let pct = |a: f64, b: f64| 100.0 * (a / b - 1.0);
                out.push(TargetCheck {
                    target: format!(
                        "school_day: default offered peak with {what} >= 25% below \
                         least-loaded without"
                    ),
                    met: def.offered_peak <= 0.75 * base.offered_peak,
                    detail: format!(
                        "offered {:.3} vs {:.3} ({:+.1}%); realized {:.3} vs {:.3} ({:+.1}%)",
                        def.offered_peak,
                        base.offered_peak,
                        pct(def.offered_peak, base.offered_peak),
                        def.peak_utilization,
                        base.peak_utilization,
                        pct(def.peak_utilization, base.peak_utilization)
                    ),
                });
            }
        }
    }
    out
}
