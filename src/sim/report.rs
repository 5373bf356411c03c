//! The figures of a run, per workload and policy, and how they print (text table, JSON).
//!
//! [`PolicyResult`] is what one run of one policy yields; a [`Report`] gathers them per
//! workload with the target checks, prints as a readable table (`Display`) and
//! serializes with serde. A run over several seeds reports their mean
//! ([`WorkloadResult::mean_of`]) and keeps each seed's own report beside it.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use super::policy::Policy;

/// The figures of one policy on one workload. Balance figures (max/mean, peaks, over-capacity
/// time, refusals, herding) cover the measured part, before any scale-out or failure; moves
/// and splits cover the whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    pub policy: String,
    pub spec: Policy,
    /// Time-averaged max/mean node utilization while the cluster is at least 30% busy;
    /// `None` (`null` in JSON, `-` in the table) when it never was.
    pub max_over_mean: Option<f64>,
    /// Share of the measured time the cluster was that busy.
    pub busy_share: f64,
    /// Highest utilization of any node (participants present: a pinned node refuses joins at
    /// `join_limit`, so this stays near it however much a policy piles onto the node).
    pub peak_utilization: f64,
    /// Highest offered utilization of any node: participants present plus those refused
    /// because their room is pinned there (`node_full`), for the stay they would have had.
    pub offered_peak: f64,
    /// When (ms into the run) the offered peak was first reached.
    pub offered_peak_at: u64,
    /// The cluster's mean (realized) utilization at that moment.
    pub mean_at_offered_peak: f64,
    /// Share of the measured time any node was over its capacity.
    pub over_capacity_share: f64,
    /// Participants who asked to join (over the whole run).
    pub joins: u64,
    /// Joins refused in the measured part (`node_full` or `no_capacity`).
    pub refusals: u64,
    /// Of those, the `no_capacity` ones: no node to attribute them to, so in no offered load.
    pub refusals_no_capacity: u64,
    /// Joins refused over the whole run.
    pub refusals_total: u64,
    /// Largest share of a burst's rooms one node got, relative to its fair (capacity) share.
    pub herd_peak: Option<f64>,
    /// Live rooms whose next join would go to another node right after the scale-out.
    pub moved_on_scale_out: u64,
    /// Live rooms not on the failed node whose next join would go to another node once the
    /// failure is detected.
    pub moved_on_failure: u64,
    /// Live rooms of the failed node that came back on another node.
    pub replaced_after_failure: u64,
    /// Rooms that had participants on two nodes at once.
    pub split_rooms: u64,
}

impl PolicyResult {
    /// One policy's results under several seeds (not empty), as [`WorkloadResult::mean_of`]
    /// describes: utilization figures averaged, counts summed.
    fn mean_of(all: &[&PolicyResult]) -> PolicyResult {
        let n = all.len() as f64;
        let mean = |f: fn(&PolicyResult) -> f64| all.iter().map(|r| f(r)).sum::<f64>() / n;
        let total = |f: fn(&PolicyResult) -> u64| all.iter().map(|r| f(r)).sum::<u64>();
        let herds: Vec<f64> = all.iter().filter_map(|r| r.herd_peak).collect();
        // A seed whose cluster was never 30% busy has no max/mean: the mean is over the seeds
        // that have one, as the herd figure's is over the seeds that had a burst.
        let ratios: Vec<f64> = all.iter().filter_map(|r| r.max_over_mean).collect();
        let first = all[0];
        PolicyResult {
            policy: first.policy.clone(),
            spec: first.spec,
            max_over_mean: (!ratios.is_empty())
                .then(|| ratios.iter().sum::<f64>() / ratios.len() as f64),
            busy_share: mean(|r| r.busy_share),
            peak_utilization: mean(|r| r.peak_utilization),
            offered_peak: mean(|r| r.offered_peak),
            offered_peak_at: first.offered_peak_at,
            mean_at_offered_peak: mean(|r| r.mean_at_offered_peak),
            over_capacity_share: mean(|r| r.over_capacity_share),
            joins: total(|r| r.joins),
            refusals: total(|r| r.refusals),
            refusals_no_capacity: total(|r| r.refusals_no_capacity),
            refusals_total: total(|r| r.refusals_total),
            herd_peak: (!herds.is_empty()).then(|| herds.iter().sum::<f64>() / herds.len() as f64),
            moved_on_scale_out: total(|r| r.moved_on_scale_out),
            moved_on_failure: total(|r| r.moved_on_failure),
            replaced_after_failure: total(|r| r.replaced_after_failure),
            split_rooms: total(|r| r.split_rooms),
        }
    }
}

/// All policies on one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub workload: String,
    /// The cluster's mean utilization at the workload's busiest moment (participants present
    /// then / total capacity): no policy's peak can be below it. See `Workload::peak_demand`.
    pub peak_mean: f64,
    /// When that moment is (ms into the run).
    pub peak_mean_at: u64,
    pub results: Vec<PolicyResult>,
}

impl WorkloadResult {
    /// The same workload and policies run under several seeds, as one result: utilization
    /// figures (max/mean, peaks, over-capacity share, herd, the lower bound) are the means over
    /// the seeds; counts (joins, refusals, moves, splits) are their totals, so a count is zero
    /// only if it is zero in every seed. The times of the lower bound and of each offered peak
    /// are the first seed's. A policy missing from any seed is left out.
    pub fn mean_of(runs: &[&WorkloadResult]) -> WorkloadResult {
        let Some(first) = runs.first() else {
            return WorkloadResult {
                workload: String::new(),
                peak_mean: f64::NAN,
                peak_mean_at: 0,
                results: vec![],
            };
        };
        let n = runs.len() as f64;
        let mean = |f: &dyn Fn(&WorkloadResult) -> f64| runs.iter().map(|w| f(w)).sum::<f64>() / n;
        let results = first
            .results
            .iter()
            .filter_map(|r0| {
                let all: Vec<&PolicyResult> =
                    runs.iter().map(|w| w.get(r0.spec)).collect::<Option<_>>()?;
                Some(PolicyResult::mean_of(&all))
            })
            .collect();
        WorkloadResult {
            workload: first.workload.clone(),
            peak_mean: mean(&|w| w.peak_mean),
            peak_mean_at: first.peak_mean_at,
            results,
        }
    }

    pub fn get(&self, p: Policy) -> Option<&PolicyResult> {
        self.results.iter().find(|r| r.spec == p)
    }

    /// The best (lowest) value of a figure, and who has it: over all policies, or with
    /// `whole_rooms` only over those that split no room (the product never splits one, so a
    /// policy that does is no candidate for the default).
    pub fn best(
        &self,
        f: impl Fn(&PolicyResult) -> f64,
        whole_rooms: bool,
    ) -> Option<(&PolicyResult, f64)> {
        self.results
            .iter()
            .filter(|r| !whole_rooms || r.split_rooms == 0)
            .map(|r| (r, f(r)))
            .filter(|(_, v)| v.is_finite())
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// One of the targets, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub met: bool,
    pub detail: String,
}

/// Everything a standard run produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What was run (nodes, routers, heartbeat, seed, ...), as text.
    pub setup: String,
    pub workloads: Vec<WorkloadResult>,
    pub targets: Vec<TargetCheck>,
    /// With several seeds: each seed's own report (`workloads` and `targets` above are then
    /// their mean and the targets checked on it). Empty for one seed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_seed: Vec<Report>,
}

/// `ms` into the run as `h:mm:ss`.
pub fn clock(ms: u64) -> String {
    let s = ms / 1_000;
    format!("{}:{:02}:{:02}", s / 3_600, s / 60 % 60, s % 60)
}

/// A figure a run may not have, to 3 decimals: `-` without one.
pub fn figure(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

impl fmt::Display for WorkloadResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {}", self.workload)?;
        writeln!(
            f,
            "lower bound: cluster mean {:.3} at its busiest moment ({}); no peak can be lower",
            self.peak_mean,
            clock(self.peak_mean_at)
        )?;
        writeln!(
            f,
            "{:<32} {:>8} {:>6} {:>7} {:>7} {:>8} {:>6} {:>6} {:>9} {:>9} {:>8} {:>6}",
            "policy",
            "max/mean",
            "peak",
            "offered",
            "over%",
            "refused",
            "no-cap",
            "herd",
            "mv:scale",
            "mv:fail",
            "replaced",
            "splits"
        )?;
        for r in &self.results {
            writeln!(
                f,
                "{:<32} {:>8} {:>6.3} {:>7.3} {:>7.2} {:>8} {:>6} {:>6} {:>9} {:>9} {:>8} {:>6}",
                r.policy,
                figure(r.max_over_mean),
                r.peak_utilization,
                r.offered_peak,
                100.0 * r.over_capacity_share,
                r.refusals,
                r.refusals_no_capacity,
                opt(r.herd_peak),
                r.moved_on_scale_out,
                r.moved_on_failure,
                r.replaced_after_failure,
                r.split_rooms
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.setup)?;
        writeln!(
            f,
            "max/mean: time-averaged while >=30% busy; peak: highest node utilization; \
             offered: the same counting joins refused by a full pinned node there for their \
             stay;\nover%: time any node > capacity; refused: joins refused, no-cap: of which \
             no node could take; herd: burst share of the most-hit node / fair share;\n\
             mv:scale / mv:fail: live rooms moved by the scale-out / the failure (others than \
             the failed node's); replaced: the failed node's rooms re-placed.\n"
        )?;
        for w in &self.workloads {
            writeln!(f, "{w}")?;
        }
        if !self.targets.is_empty() {
            writeln!(f, "== targets")?;
            for t in &self.targets {
                writeln!(
                    f,
                    "[{}] {}: {}",
                    if t.met { "met" } else { "MISSED" },
                    t.target,
                    t.detail
                )?;
            }
        }
        if !self.per_seed.is_empty() {
            writeln!(f, "\n== the same targets, checked on each seed alone")?;
            for r in &self.per_seed {
                let missed: Vec<&str> = r
                    .targets
                    .iter()
                    .filter(|t| !t.met)
                    .map(|t| t.target.as_str())
                    .collect();
                let met = r.targets.len() - missed.len();
                writeln!(f, "{}: {met} of {} met", r.setup, r.targets.len())?;
                for m in missed {
                    writeln!(f, "  missed: {m}")?;
                }
            }
        }
        Ok(())
    }
}

impl Report {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }

    /// Policies that beat the default on a figure somewhere by more than 2%, one line each.
    pub fn winners_over_default(&self) -> String {
        let mut out = String::new();
        for w in &self.workloads {
            let Some(d) = w.get(Policy::DEFAULT) else {
                continue;
            };
            for (name, f) in FIGURES {
                if let Some((best, v)) = w.best(f, false) {
                    if v < f(d) / 1.02 {
                        let _ = writeln!(
                            out,
                            "{}: {} best by {} ({:.3} vs default {:.3}){}",
                            w.workload,
                            name,
                            best.policy,
                            v,
                            f(d),
                            if best.split_rooms > 0 {
                                format!(", splitting {} rooms", best.split_rooms)
                            } else {
                                String::new()
                            }
                        );
                    }
                }
            }
        }
        out
    }
}

/// Reads one figure of a result.
pub type Figure = fn(&PolicyResult) -> f64;

/// The figures the default must lead (or be within 2% of the best) on.
pub const FIGURES: [(&str, Figure); 3] = [
    // (NaN without one: no policy is best on it, and no target on it is met)
    ("max/mean", |r| r.max_over_mean.unwrap_or(f64::NAN)),
    ("peak", |r| r.peak_utilization),
    ("offered peak", |r| r.offered_peak),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn result(
        spec: Policy,
        peak: f64,
        refusals: u64,
        herd: Option<f64>,
        splits: u64,
    ) -> PolicyResult {
        PolicyResult {
            policy: spec.name(),
            spec,
            max_over_mean: Some(1.0 + peak / 10.0),
            busy_share: 0.5,
            peak_utilization: peak,
            offered_peak: peak + 0.1,
            offered_peak_at: 7,
            mean_at_offered_peak: peak / 2.0,
            over_capacity_share: 0.0,
            joins: 100,
            refusals,
            refusals_no_capacity: 0,
            refusals_total: refusals,
            herd_peak: herd,
            moved_on_scale_out: 0,
            moved_on_failure: 1,
            replaced_after_failure: 2,
            split_rooms: splits,
        }
    }

    fn workload(peak_mean: f64, results: Vec<PolicyResult>) -> WorkloadResult {
        WorkloadResult {
            workload: "w/exact".into(),
            peak_mean,
            peak_mean_at: 5,
            results,
        }
    }

    #[test]
    fn the_mean_over_seeds_averages_utilization_and_adds_up_counts() {
        let a = workload(
            0.5,
            vec![
                result(Policy::DEFAULT, 0.8, 0, Some(1.2), 0),
                result(Policy::TwoChoice, 0.9, 3, None, 1),
            ],
        );
        let b = workload(
            0.7,
            vec![
                result(Policy::TwoChoice, 0.7, 0, Some(2.0), 0),
                result(Policy::DEFAULT, 1.0, 2, Some(1.4), 0),
            ],
        );
        let m = WorkloadResult::mean_of(&[&a, &b]);
        assert_eq!(m.workload, "w/exact");
        assert!((m.peak_mean - 0.6).abs() < 1e-12);
        let d = m.get(Policy::DEFAULT).unwrap();
        assert!((d.peak_utilization - 0.9).abs() < 1e-12);
        assert!((d.offered_peak - 1.0).abs() < 1e-12);
        assert!((d.max_over_mean.unwrap() - 1.09).abs() < 1e-12);
        assert!((d.herd_peak.unwrap() - 1.3).abs() < 1e-12);
        // A seed never busy enough for a max/mean does not make the mean NaN.
        let mut idle = result(Policy::DEFAULT, 1.0, 0, None, 0);
        idle.max_over_mean = None;
        let only = |r: &PolicyResult| workload(0.7, vec![r.clone()]);
        let m2 = WorkloadResult::mean_of(&[&only(&idle), &only(a.get(Policy::DEFAULT).unwrap())]);
        let d2 = m2.get(Policy::DEFAULT).unwrap();
        assert_eq!(
            d2.max_over_mean,
            a.get(Policy::DEFAULT).unwrap().max_over_mean
        );
        let m3 = WorkloadResult::mean_of(&[&only(&idle), &only(&idle)]);
        assert_eq!(m3.get(Policy::DEFAULT).unwrap().max_over_mean, None);
        assert_eq!((d.joins, d.refusals, d.moved_on_failure), (200, 2, 2));
        let t = m.get(Policy::TwoChoice).unwrap();
        // A split in any one seed stays visible, and a herd figure is averaged over the seeds
        // that had a burst.
        assert_eq!((t.split_rooms, t.refusals), (1, 3));
        assert_eq!(t.herd_peak, Some(2.0));
        assert_eq!(m.results[0].spec, Policy::DEFAULT, "the first seed's order");
    }

    #[test]
    fn a_policy_missing_from_one_seed_is_left_out_of_the_mean() {
        let a = workload(0.5, vec![result(Policy::DEFAULT, 0.8, 0, None, 0)]);
        let b = workload(
            0.5,
            vec![
                result(Policy::DEFAULT, 0.8, 0, None, 0),
                result(Policy::TwoChoice, 0.1, 0, None, 0),
            ],
        );
        let m = WorkloadResult::mean_of(&[&b, &a]);
        assert_eq!(m.results.len(), 1);
        assert!(WorkloadResult::mean_of(&[]).results.is_empty());
    }
}
