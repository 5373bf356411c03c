//! The standard comparison: every standard workload, in every hint mode, through every
//! policy, with the issue's targets checked. [`run_all`] is what the `simulate` command and
//! anyone who wants to rerun the figures call.
//!
//! One seed is one draw of the workloads (who joins when, how large rooms grow) and of the
//! policies' own randomness. Figures move by a few hundredths from one seed to the next, which
//! is as much as the 2% the default is held to, and the best of a dozen policies on one draw is
//! partly luck. With `seeds > 1` every seed is run (in parallel) and the figures and targets
//! are their means, each seed's own report kept beside them.

use serde::{Deserialize, Serialize};

use super::report::{figure, Report, TargetCheck, WorkloadResult, FIGURES};
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
    /// The first seed.
    pub seed: u64,
    /// How many seeds, `seed` and the ones after it (at least 1).
    #[serde(default = "one")]
    pub seeds: u64,
    pub workloads: Vec<StandardWorkload>,
    pub hints: Vec<HintMode>,
    pub policies: Vec<Policy>,
    /// Shorter runs (45 min steady, two lessons) for smoke tests.
    pub quick: bool,
    /// How long the default guess's reservation lasts, in ms (`None`: the router's default,
    /// `placement.new_room_reserve_ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_room_reserve_ttl_ms: Option<u64>,
    /// Nodes of unequal capacity, one entry per node (`--capacities`), instead of `nodes`
    /// nodes of `capacity` each. The workloads are sized for the same total (`nodes` set to
    /// their count, `capacity` to their mean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacities: Option<Vec<f64>>,
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
            seeds: 1,
            workloads: StandardWorkload::ALL.to_vec(),
            hints: HintMode::ALL.to_vec(),
            policies: Policy::standard(),
            quick: false,
            new_room_reserve_ttl_ms: None,
            capacities: None,
        }
    }
}

/// Capacities as runs, `10x100+5x400`, for the report's header.
fn runs(caps: &[f64]) -> String {
    let mut out: Vec<(usize, f64)> = Vec::new();
    for &c in caps {
        match out.last_mut() {
            Some((n, last)) if *last == c => *n += 1,
            _ => out.push((1, c)),
        }
    }
    out.iter()
        .map(|(n, c)| format!("{n}x{c}"))
        .collect::<Vec<_>>()
        .join("+")
}

impl Options {
    pub fn config(&self) -> SimConfig {
        let mut c = SimConfig::new(
            self.nodes,
            self.capacity,
            self.routers,
            self.heartbeat_ms,
            self.seed,
        );
        if let Some(ms) = self.new_room_reserve_ttl_ms {
            c.new_room_reserve_ttl_ms = ms;
        }
        if let Some(caps) = &self.capacities {
            c.capacities = caps.clone();
        }
        c
    }

    /// Sets unequal node capacities; `nodes` and `capacity` become their count and mean.
    pub fn with_capacities(mut self, caps: Vec<f64>) -> Options {
        self.nodes = caps.len();
        self.capacity = caps.iter().sum::<f64>() / caps.len().max(1) as f64;
        self.capacities = Some(caps);
        self
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
        let seeds = if self.seeds > 1 {
            format!(
                "seeds {}-{} (utilization figures: means over the seeds; counts: totals)",
                self.seed,
                self.last_seed()
            )
        } else {
            format!("seed {}", self.seed)
        };
        let guess = match self.new_room_reserve_ttl_ms {
            Some(ms) => format!(", default-guess reservations for {} s", ms as f64 / 1000.0),
            None => String::new(),
        };
        let cluster = match &self.capacities {
            Some(caps) => format!("{} nodes of {} units", caps.len(), runs(caps)),
            None => format!("{} nodes x {} units", self.nodes, self.capacity),
        };
        format!(
            "{cluster}, {} routers, reports every {} ms{guess}{}, {seeds}",
            self.routers,
            self.heartbeat_ms,
            if self.quick { " (quick)" } else { "" }
        )
    }

    fn last_seed(&self) -> u64 {
        self.seed.saturating_add(self.seeds.max(1) - 1)
    }

    /// The options of each seed's own run.
    fn each_seed(&self) -> Vec<Options> {
        (self.seed..=self.last_seed())
            .map(|seed| Options {
                seed,
                seeds: 1,
                ..self.clone()
            })
            .collect()
    }
}

fn one() -> u64 {
    1
}

/// Every (workload, hint mode) of a run, in order, with its results.
type Runs = Vec<(StandardWorkload, HintMode, WorkloadResult)>;

/// Runs one workload through each policy.
pub fn run_workload(w: &Workload, policies: &[Policy], cfg: &SimConfig) -> WorkloadResult {
    let (present, at) = w.peak_demand(cfg.sample_ms);
    let capacity: f64 = cfg.capacities.iter().sum();
    WorkloadResult {
        workload: w.name.clone(),
        peak_mean: if capacity > 0.0 {
            present as f64 / capacity
        } else {
            f64::NAN
        },
        peak_mean_at: at,
        results: policies.iter().map(|&p| simulate(w, p, cfg)).collect(),
    }
}

/// Runs the selected standard workloads under each seed and checks the targets (on the mean
/// over the seeds when there are several).
pub fn run_all(o: &Options) -> Report {
    let seeds = o.each_seed();
    let mut per_seed = in_parallel(&seeds, run_seed);
    if per_seed.len() == 1 {
        return report(o, per_seed.remove(0), vec![]);
    }
    let mean: Runs = (0..per_seed[0].len())
        .map(|i| {
            let (kind, hints, _) = per_seed[0][i];
            let same: Vec<&WorkloadResult> = per_seed.iter().map(|runs| &runs[i].2).collect();
            (kind, hints, WorkloadResult::mean_of(&same))
        })
        .collect();
    let each = seeds
        .iter()
        .zip(per_seed)
        .map(|(so, runs)| report(so, runs, vec![]))
        .collect();
    report(o, mean, each)
}

/// One seed: every selected workload in every hint mode through every policy.
fn run_seed(o: &Options) -> Runs {
    let cfg = o.config();
    let wp = o.workload_params();
    let mut runs = Vec::new();
    for &kind in &o.workloads {
        for &hints in &o.hints {
            let w = generate(kind, hints, &wp);
            runs.push((kind, hints, run_workload(&w, &o.policies, &cfg)));
        }
    }
    runs
}

fn report(o: &Options, runs: Runs, per_seed: Vec<Report>) -> Report {
    Report {
        setup: o.describe(),
        targets: check_targets(o, &runs),
        workloads: runs.into_iter().map(|(_, _, r)| r).collect(),
        per_seed,
    }
}

/// `f` over `items` on up to one thread per core, results in the items' order. The
/// simulations share nothing, so this changes how long a run takes, never its figures.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..items.len())
                        .step_by(threads)
                        .map(|i| (i, f(&items[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut done: Vec<(usize, R)> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect();
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, r)| r).collect()
    })
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
                let shown = |v: f64| figure(v.is_finite().then_some(v));
                let mut detail =
                    format!("default {}, best {v:.3} ({})", shown(f(def)), best.policy);
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
    let issue_setup =
        o.nodes == 20 && o.capacities.is_none() && o.routers == 4 && o.heartbeat_ms == 2_000;
    for (kind, _, w) in runs {
        if *kind != StandardWorkload::SmallRooms {
            continue;
        }
        if let Some(def) = w.get(d) {
            out.push(TargetCheck {
                target: format!("{}: default max/mean <= 1.10", w.workload),
                met: def.max_over_mean.is_some_and(|v| v <= 1.10),
                detail: format!(
                    "{}{}",
                    figure(def.max_over_mean),
                    if issue_setup {
                        ""
                    } else {
                        " (not the issue's 20 nodes / 4 routers / 2 s)"
                    }
                ),
            });
        }
    }
    for kind in StandardWorkload::SCHOOL_DAYS {
        out.extend(school_day_targets(kind, runs));
    }
    out
}

/// The school-day target on one school day: with learned history, noisy and exact hints, the
/// default's peak at least 25% below least-loaded's without hints on the same day. Each check
/// reports both peaks, and its verdict is on the **offered** peak, which it says: the realized
/// peak of a pinned node stops at `join_limit` (beyond it joins are refused), so least-loaded's
/// realized peak (about 1.0) hides the joins it refused on its busiest node, and comparing
/// realized peaks would credit the baseline for them. Whether the realized peaks alone would
/// meet the target is stated beside the verdict. The default's variants, each router with its
/// own reservations (`placement.share_reservations = false`) and reservations shared after
/// other delays (`--shared-reservations`), are checked the same way when they were run.
fn school_day_targets(
    kind: StandardWorkload,
    runs: &[(StandardWorkload, HintMode, WorkloadResult)],
) -> Vec<TargetCheck> {
    let day = |h: HintMode| {
        runs.iter()
            .find(|(k, hm, _)| *k == kind && *hm == h)
            .map(|(_, _, w)| w)
    };
    let Some(base) = day(HintMode::Absent).and_then(|w| w.get(Policy::LeastLoaded)) else {
        return vec![];
    };
    let pct = |a: f64, b: f64| 100.0 * (a / b - 1.0);
    let target = 0.75 * base.offered_peak;
    let realized_target = 0.75 * base.peak_utilization;
    // The default, then its variants (each router counting its own reservations; shared
    // after other delays), in the order they were run.
    let mut candidates = vec![Policy::DEFAULT];
    if let Some(w) = day(HintMode::Absent) {
        // (only the default's rule: the other rules' shared variants are in the standard
        // set to be compared with the default, not variants of it)
        candidates.extend(w.results.iter().map(|r| r.spec).filter(|&p| {
            p != Policy::DEFAULT
                && (p == Policy::OWN_RESERVATIONS
                    || (p.shared_delay_ms().is_some() && p.rule() == Policy::DEFAULT.rule()))
        }));
    }
    let mut out = Vec::new();
    for policy in candidates {
        let with = match policy.shared_delay_ms() {
            _ if policy == Policy::DEFAULT => String::new(),
            None => " (each router its own reservations)".to_string(),
            Some(ms) => format!(" (reservations shared after {ms} ms)"),
        };
        for h in HintMode::ALL {
            let what = match h {
                HintMode::Absent => "learned history",
                HintMode::Noisy => "noisy hints",
                HintMode::Exact => "exact hints",
            };
            let Some(w) = day(h) else { continue };
            let Some(def) = w.get(policy) else {
                continue;
            };
            let realized_met = def.peak_utilization <= realized_target;
            out.push(TargetCheck {
                target: format!(
                    "{}: default{with} peak with {what} >= 25% below least-loaded without \
                     (verdict on offered peak)",
                    kind.name()
                ),
                met: def.offered_peak <= target,
                detail: format!(
                    "offered peak {:.3} vs {:.3} ({:+.1}%, the verdict's figure); realized peak \
                     {:.3} vs {:.3} ({:+.1}%: {} on realized peaks); {}",
                    def.offered_peak,
                    base.offered_peak,
                    pct(def.offered_peak, base.offered_peak),
                    def.peak_utilization,
                    base.peak_utilization,
                    pct(def.peak_utilization, base.peak_utilization),
                    if realized_met { "met" } else { "missed" },
                    reachability(target, w.peak_mean)
                ),
            });
        }
    }
    out
}

/// Whether a peak target can be met at all: no peak is below the cluster mean at the
/// workload's busiest moment.
pub fn reachability(target: f64, peak_mean: f64) -> String {
    if peak_mean > target {
        format!(
            "target {target:.3} is below the lower bound {peak_mean:.3} (cluster mean at the \
             busiest moment): unreachable by any policy"
        )
    } else {
        format!("target {target:.3}, lower bound {peak_mean:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick_school_days() -> Options {
        Options {
            nodes: 6,
            capacity: 60.0,
            routers: 2,
            workloads: StandardWorkload::SCHOOL_DAYS.to_vec(),
            policies: vec![Policy::DEFAULT, Policy::LeastLoaded],
            quick: true,
            ..Options::default()
        }
    }

    fn school_lines(targets: &[TargetCheck], kind: StandardWorkload) -> Vec<&TargetCheck> {
        let prefix = format!("{}: default peak", kind.name());
        targets
            .iter()
            .filter(|t| t.target.starts_with(&prefix))
            .collect()
    }

    #[test]
    fn the_school_day_target_is_checked_on_both_school_days_with_its_lower_bound() {
        let report = run_all(&quick_school_days());
        for kind in StandardWorkload::SCHOOL_DAYS {
            let lines = school_lines(&report.targets, kind);
            assert_eq!(lines.len(), 3, "{}: {:?}", kind.name(), report.targets);
            assert!(lines.iter().all(|t| t.detail.contains("lower bound")));
        }
    }

    #[test]
    fn the_school_day_target_is_met_exactly_when_the_default_is_25_percent_below() {
        let o = quick_school_days();
        let mut r = run_seed(&o);
        let base = r[0].2.get(Policy::LeastLoaded).unwrap().offered_peak;
        for (i, factor) in [(0, 0.74), (1, 0.76), (2, 0.75)] {
            let def = r[i]
                .2
                .results
                .iter_mut()
                .find(|x| x.spec == Policy::DEFAULT);
            def.unwrap().offered_peak = factor * base;
        }
        let targets = check_targets(&o, &r);
        let met: Vec<bool> = school_lines(&targets, StandardWorkload::SchoolDay)
            .iter()
            .map(|t| t.met)
            .collect();
        assert_eq!(met, [true, false, true]);
    }

    #[test]
    fn the_school_day_target_reports_both_peaks_and_names_the_verdicts_figure() {
        let o = quick_school_days();
        let mut r = run_seed(&o);
        let base = r[0].2.get(Policy::LeastLoaded).unwrap().clone();
        // Offered 30% below least-loaded's offered peak, realized only 10% below its
        // realized one: met on the verdict's figure, and the check says realized would miss.
        let def = r[2]
            .2
            .results
            .iter_mut()
            .find(|x| x.spec == Policy::DEFAULT);
        let def = def.unwrap();
        def.offered_peak = 0.7 * base.offered_peak;
        def.peak_utilization = 0.9 * base.peak_utilization;
        let def = def.clone();
        let targets = check_targets(&o, &r);
        let exact = school_lines(&targets, StandardWorkload::SchoolDay)[2];
        assert!(exact.met, "{exact:?}");
        assert!(
            exact.target.contains("(verdict on offered peak)"),
            "{exact:?}"
        );
        let offered = format!(
            "offered peak {:.3} vs {:.3}",
            def.offered_peak, base.offered_peak
        );
        let realized = format!(
            "realized peak {:.3} vs {:.3} (-10.0%: missed on realized peaks)",
            def.peak_utilization, base.peak_utilization
        );
        assert!(exact.detail.contains(&offered), "{exact:?}");
        assert!(exact.detail.contains("the verdict's figure"), "{exact:?}");
        assert!(exact.detail.contains(&realized), "{exact:?}");
    }

    #[test]
    fn several_seeds_report_their_mean_and_keep_each_seeds_own_figures() {
        let o = Options {
            workloads: vec![StandardWorkload::SchoolDay],
            hints: vec![HintMode::Exact],
            seed: 3,
            seeds: 3,
            ..quick_school_days()
        };
        let all = run_all(&o);
        assert_eq!(all.per_seed.len(), 3);
        assert!(all.setup.contains("seeds 3-5"), "{}", all.setup);
        // Running seeds side by side changes nothing of each seed's own run.
        for (i, seed) in (3..=5).enumerate() {
            let alone = run_all(&Options {
                seed,
                seeds: 1,
                ..o.clone()
            });
            assert!(alone.per_seed.is_empty());
            assert_eq!(all.per_seed[i], alone);
        }
        let peaks = |p: Policy| -> Vec<f64> {
            all.per_seed
                .iter()
                .map(|r| r.workloads[0].get(p).unwrap().peak_utilization)
                .collect()
        };
        let mean = all.workloads[0].get(Policy::DEFAULT).unwrap();
        let each = peaks(Policy::DEFAULT);
        assert!((mean.peak_utilization - each.iter().sum::<f64>() / 3.0).abs() < 1e-12);
        // The seeds differ (else averaging them would prove nothing) ...
        let spread: Vec<f64> = all
            .per_seed
            .iter()
            .map(|r| {
                let d = r.workloads[0].get(Policy::DEFAULT).unwrap();
                d.max_over_mean.unwrap_or(0.0) + d.peak_utilization
            })
            .collect();
        assert!(spread.iter().any(|&p| p != spread[0]), "{spread:?}");
        // ... and the targets are checked on the mean.
        let shown = format!("default {:.3}", mean.max_over_mean.unwrap());
        assert!(
            all.targets.iter().any(|t| t.detail.starts_with(&shown)),
            "{shown}: {:?}",
            all.targets
        );
        let table = all.to_string();
        assert!(table.contains("checked on each seed alone"), "{table}");
        assert_eq!(table.matches("seed 4:").count(), 1, "{table}");
    }

    #[test]
    fn the_school_day_target_is_also_checked_on_the_defaults_variants_when_run() {
        let o = Options {
            workloads: vec![StandardWorkload::SchoolDay],
            policies: vec![
                Policy::DEFAULT,
                Policy::LeastLoaded,
                Policy::OWN_RESERVATIONS,
                Policy::default_shared(50),
            ],
            ..quick_school_days()
        };
        let report = run_all(&o);
        let lines = school_lines(&report.targets, StandardWorkload::SchoolDay);
        assert_eq!(lines.len(), 3, "the default's: {:?}", report.targets);
        for variant in [
            "(each router its own reservations) peak",
            "(reservations shared after 50 ms) peak",
        ] {
            let n = report
                .targets
                .iter()
                .filter(|t| t.target.contains(variant))
                .count();
            assert_eq!(n, 3, "{variant}: {:?}", report.targets);
        }
    }

    #[test]
    fn other_rules_shared_variants_are_compared_with_the_default_not_checked_as_it() {
        let top_two = Policy::Ours {
            rule: crate::placement::ChoiceRule::TopTwo,
            reservation: true,
            shared_ms: Some(crate::sim::policy::SHARED_DELAY_MS),
        };
        let o = Options {
            workloads: vec![StandardWorkload::SchoolDay],
            policies: vec![Policy::DEFAULT, Policy::LeastLoaded, top_two],
            ..quick_school_days()
        };
        let mut r = run_seed(&o);
        // Not a variant of the default: no school-day line of its own.
        let targets = check_targets(&o, &r);
        assert!(
            !targets.iter().any(|t| t.target.contains("shared after")),
            "{targets:?}"
        );
        assert_eq!(school_lines(&targets, StandardWorkload::SchoolDay).len(), 3);
        // But the default is held to within 2% of it.
        let def = r[0].2.get(Policy::DEFAULT).unwrap().max_over_mean.unwrap();
        let t = r[0].2.results.iter_mut().find(|x| x.spec == top_two);
        t.unwrap().max_over_mean = Some(def / 1.1);
        let targets = check_targets(&o, &r);
        let line = targets
            .iter()
            .find(|t| t.target.contains("within 2% on max/mean"))
            .unwrap();
        assert!(
            !line.met && line.detail.contains(&top_two.name()),
            "{line:?}"
        );
    }

    #[test]
    fn a_target_below_the_lower_bound_is_called_unreachable() {
        assert!(reachability(0.753, 0.768).contains("unreachable"));
        assert!(!reachability(0.753, 0.601).contains("unreachable"));
    }
}
