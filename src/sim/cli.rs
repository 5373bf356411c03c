//! The `simulate` command: [`SimulateArgs`] (clap) and [`run_cli`], which runs the standard
//! workloads or a trace and prints the table (and writes JSON if asked). The binary only has
//! to flatten `SimulateArgs` into a subcommand and call `run_cli`.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::Context;

use super::report::Report;
use super::standard::{run_all, run_workload, Options};
use super::trace::{read_trace, MAX_SPAN};
use super::workload::{HintMode, StandardWorkload, SECOND};
use super::Policy;

/// Compare placement policies in simulation.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Standard workloads to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<StandardWorkload>,
    /// Size-hint modes to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub hints: Vec<HintMode>,
    /// Replay this trace (`time room join|leave [size]` per line) instead of the standard
    /// workloads.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["workload", "hints", "quick"])]
    pub trace: Option<PathBuf>,
    /// Nodes at the start (all of equal capacity; 1 to 10 000).
    #[arg(long, default_value_t = 20,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_NODES as u64))]
    pub nodes: usize,
    /// Capacity of each node, in load units.
    #[arg(long, default_value_t = 250.0)]
    pub capacity: f64,
    /// Nodes of unequal capacity instead of --nodes x --capacity: comma-separated, each
    /// `C` (one node of capacity C) or `NxC` (N of them), e.g. `10x100,5x400`. The standard
    /// workloads are sized for the same total capacity.
    #[arg(long, value_name = "LIST", value_parser = parse_capacities, conflicts_with_all = ["nodes", "capacity"])]
    pub capacities: Option<Capacities>,
    /// Router instances, each with its own pending counts (1 to 1 000).
    #[arg(long, default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000))]
    pub routers: usize,
    /// Heartbeat (load report) interval in milliseconds (1 to an hour); the timeout is three
    /// intervals.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub heartbeat_ms: u64,
    /// Seed of the workloads and of the policies' randomness (the first one, with --seeds).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run this many seeds (--seed and the ones after it, in parallel) and report their
    /// mean: utilization figures averaged, counts summed, the targets checked on the mean,
    /// each seed's own target check listed after it. One seed's figures move by a few
    /// hundredths from the next seed's; the mean is what to compare policies on.
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1000),
          conflicts_with = "trace")]
    pub seeds: u64,
    /// Shorter standard runs (45 min steady, two lessons).
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also run the default policy with the other routers' reservations (and their
    /// releases) seen after this many milliseconds instead of the router's 5 ms
    /// (`placement.share_reservations`, on by default with Redis); comma-separated, one extra
    /// policy per delay (e.g. `0,50,500`).
    #[arg(long, value_name = "MS", value_delimiter = ',')]
    pub shared_reservations: Vec<u64>,
    /// How long a new room's default-guess reservation (no hint, no history) lasts, in
    /// seconds (default: the router's `placement.new_room_reserve_ttl`, 60 s).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub new_room_reserve_ttl: Option<f64>,
    /// With --trace: add a node this many seconds after the trace's first event.
    #[arg(long, value_name = "SECS", requires = "trace", value_parser = parse_trace_secs)]
    pub scale_out_at: Option<f64>,
    /// With --trace: node 0 fails this many seconds after the trace's first event.
    #[arg(long, value_name = "SECS", requires = "trace", value_parser = parse_trace_secs)]
    pub fail_at: Option<f64>,
}

impl SimulateArgs {
    /// The options of a standard run.
    pub fn options(&self) -> Options {
        let d = Options::default();
        let o = Options {
            nodes: self.nodes,
            capacity: self.capacity,
            routers: self.routers,
            heartbeat_ms: self.heartbeat_ms,
            seed: self.seed,
            seeds: self.seeds,
            workloads: if self.workload.is_empty() {
                d.workloads
            } else {
                self.workload.clone()
            },
            hints: if self.hints.is_empty() {
                d.hints
            } else {
                self.hints.clone()
            },
            policies: {
                let mut v = d.policies;
                for &ms in &self.shared_reservations {
                    let p = Policy::default_shared(ms);
                    if !v.contains(&p) {
                        v.push(p);
                    }
                }
                v
            },
            quick: self.quick,
            new_room_reserve_ttl_ms: self.new_room_reserve_ttl.map(|s| (s * 1000.0) as u64),
            capacities: None,
        };
        match &self.capacities {
            Some(Capacities(caps)) => o.with_capacities(caps.clone()),
            None => o,
        }
    }
}

/// `--capacities`, parsed: one capacity per node.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacities(pub Vec<f64>);

/// The most nodes `--capacities` may describe.
const MAX_NODES: usize = 10_000;

/// `--capacities`: `C` or `NxC` items, comma-separated; every capacity a finite number above
/// 0, at least one node and at most [`MAX_NODES`].
fn parse_capacities(s: &str) -> Result<Capacities, String> {
    let mut caps = Vec::new();
    for item in s.split(',').map(str::trim) {
        let (n, c) = match item.split_once('x') {
            Some((n, c)) => (
                n.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{item:?}: the count in NxC must be a whole number"))?,
                c,
            ),
            None => (1, item),
        };
        let c = c
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite() && *c > 0.0)
            .ok_or_else(|| format!("{item:?}: a capacity must be a number above 0"))?;
        if n == 0 || caps.len() + n > MAX_NODES {
            return Err(format!("{item:?}: between 1 and {MAX_NODES} nodes in all"));
        }
        caps.extend(std::iter::repeat_n(c, n));
    }
    Ok(Capacities(caps))
}

/// A duration in seconds: a finite number above 0, at most a day.
fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most 86400"
        )),
    }
}

/// A time into a trace in seconds: a finite number from 0 to the longest span a trace may
/// have (`trace::MAX_SPAN`).
fn parse_trace_secs(s: &str) -> Result<f64, String> {
    let max = MAX_SPAN as f64 / SECOND as f64;
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=max).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to {max}")),
    }
}

/// Runs what the arguments ask for and returns the report.
pub fn run(args: &SimulateArgs) -> anyhow::Result<Report> {
    let o = args.options();
    anyhow::ensure!(o.nodes > 0, "--nodes must be at least 1");
    // (an infinite capacity would make the workloads' arrival rates infinite)
    anyhow::ensure!(
        o.capacity.is_finite() && o.capacity > 0.0 && o.capacity <= 1e9,
        "--capacity must be a number above 0, at most 1e9"
    );
    let Some(path) = &args.trace else {
        return Ok(run_all(&o));
    };
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut w = read_trace(BufReader::new(file), &path.display().to_string())
        .with_context(|| format!("reading {}", path.display()))?;
    let ms = |s: f64| (s * SECOND as f64) as u64;
    // The trace ends when its last rooms do (a second after its last event): a scale-out or
    // failure then or later would find nothing to move and report 0 moves.
    let end = w.measure_until;
    for (flag, at) in [
        ("--scale-out-at", args.scale_out_at),
        ("--fail-at", args.fail_at),
    ] {
        if let Some(s) = at.filter(|&s| ms(s) >= end) {
            anyhow::bail!(
                "{flag} {s} s is past the workload's end: {path} ends {} s after its first \
                 event (every room gone), so nothing would be there to move",
                end as f64 / SECOND as f64,
                path = path.display()
            );
        }
    }
    w.scale_out_at = args.scale_out_at.map(ms);
    w.fail_at = args.fail_at.map(ms);
    if let Some(first) = w.scale_out_at.into_iter().chain(w.fail_at).min() {
        w.measure_until = w.measure_until.min(first);
    }
    // A trace is one history, run once (under the first seed's config), not a mean of seeds.
    let o = Options { seeds: 1, ..o };
    Ok(Report {
        setup: format!("trace {}; {}", path.display(), o.describe()),
        workloads: vec![run_workload(&w, &o.policies, &o.config())],
        targets: vec![],
        per_seed: vec![],
    })
}

/// The `simulate` command: prints the table, writes JSON if `--json` was given.
pub fn run_cli(args: &SimulateArgs) -> anyhow::Result<()> {
    let report = run(args)?;
    print!("{report}");
    let winners = report.winners_over_default();
    if !winners.is_empty() {
        println!("\n== policies beating the default by more than 2%\n{winners}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    #[test]
    fn flags_map_onto_options() {
        let cli = Cli::parse_from([
            "x",
            "--workload",
            "school-day,small-rooms",
            "--hints",
            "exact",
            "--nodes",
            "8",
            "--routers",
            "2",
            "--heartbeat-ms",
            "5000",
            "--seed",
            "9",
            "--seeds",
            "3",
            "--quick",
            "--shared-reservations",
            "0,5,500",
        ]);
        let o = cli.args.options();
        assert_eq!(
            o.workloads,
            vec![StandardWorkload::SchoolDay, StandardWorkload::SmallRooms]
        );
        assert_eq!(o.hints, vec![HintMode::Exact]);
        assert_eq!(
            (o.nodes, o.routers, o.heartbeat_ms, o.seed, o.seeds),
            (8, 2, 5000, 9, 3)
        );
        assert!(o.describe().contains("seeds 9-11"), "{}", o.describe());
        assert_eq!(Cli::parse_from(["x"]).args.options().seeds, 8);
        assert!(o.quick);
        // 5 ms is the default's own delay: run once.
        let n = Policy::standard().len();
        assert_eq!(
            o.policies[n..],
            [Policy::default_shared(0), Policy::default_shared(500)]
        );
        assert_eq!(o.policies[n].name(), "ours:least_loaded+res+shared0ms");
    }

    #[test]
    fn trace_excludes_standard_workloads_and_churn_needs_a_trace() {
        assert!(
            Cli::try_parse_from(["x", "--trace", "t.txt", "--workload", "school-day"]).is_err()
        );
        assert!(Cli::try_parse_from(["x", "--fail-at", "10"]).is_err());
        assert!(Cli::try_parse_from(["x", "--trace", "t.txt", "--fail-at", "10"]).is_ok());
        for bad in ["-1", "inf", "NaN", "1e300", "2678401"] {
            let args = ["x", "--trace", "t.txt", "--scale-out-at", bad];
            assert!(Cli::try_parse_from(args).is_err(), "{bad}");
        }
        // A trace replays one history: several seeds of it are not a thing.
        assert!(Cli::try_parse_from(["x", "--trace", "t.txt", "--seeds", "2"]).is_err());
    }

    #[test]
    fn a_trace_run_says_it_ran_one_seed() {
        let path =
            std::env::temp_dir().join(format!("roomrouter-trace-{}.log", std::process::id()));
        std::fs::write(&path, "1700000000 a join\n1700000060 a leave\n").unwrap();
        let cli = Cli::parse_from(["x", "--trace", path.to_str().unwrap(), "--nodes", "2"]);
        let report = run(&cli.args);
        let _ = std::fs::remove_file(&path);
        let report = report.unwrap();
        assert!(report.setup.contains(", seed 1"), "{}", report.setup);
        assert!(
            !report.setup.contains("means over the seeds"),
            "{}",
            report.setup
        );
        assert_eq!(report.workloads[0].results.len(), Policy::standard().len());
    }

    #[test]
    fn a_scale_out_or_failure_at_or_past_the_traces_end_is_an_error() {
        let path =
            std::env::temp_dir().join(format!("roomrouter-trace-end-{}.log", std::process::id()));
        // Ends at 61 s: the last event plus a second.
        std::fs::write(&path, "0 a join\n0 b join\n60 a leave\n").unwrap();
        let p = path.to_str().unwrap();
        let run_with = |flag: &str, at: &str| {
            let cli = Cli::parse_from(["x", "--trace", p, "--nodes", "2", flag, at]);
            run(&cli.args)
        };
        let mut errs = Vec::new();
        for flag in ["--scale-out-at", "--fail-at"] {
            for at in ["61", "100"] {
                errs.push((flag, at, run_with(flag, at).map(|_| ())));
            }
            assert!(run_with(flag, "30").is_ok(), "{flag} 30");
        }
        let _ = std::fs::remove_file(&path);
        for (flag, at, r) in errs {
            let err = r.expect_err(&format!("{flag} {at}")).to_string();
            assert!(
                err.contains(flag) && err.contains("past the workload's end"),
                "{flag} {at}: {err}"
            );
        }
    }

    #[test]
    fn the_guess_ttl_is_in_seconds_and_positive() {
        let o = Cli::parse_from(["x", "--new-room-reserve-ttl", "20"])
            .args
            .options();
        assert_eq!(o.config().new_room_reserve_ttl_ms, 20_000);
        assert!(o.describe().contains("default-guess reservations for 20 s"));
        let d = Cli::parse_from(["x"]).args.options();
        assert_eq!(d.config().new_room_reserve_ttl_ms, 60_000);
        for bad in ["0", "-1", "inf", "NaN", "1e9", "soon"] {
            assert!(
                Cli::try_parse_from(["x", "--new-room-reserve-ttl", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn seeds_are_at_least_one_and_bounded() {
        for bad in ["0", "1001", "-1", "many"] {
            assert!(Cli::try_parse_from(["x", "--seeds", bad]).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["x", "--seeds", "1"]).is_ok());
    }

    #[test]
    fn capacities_are_counts_times_capacities_and_replace_nodes_and_capacity() {
        let o = Cli::parse_from(["x", "--capacities", "10x100, 5x400,250"])
            .args
            .options();
        let caps = o.capacities.clone().unwrap();
        assert_eq!(caps.len(), 16);
        assert_eq!((caps[0], caps[10], caps[15]), (100.0, 400.0, 250.0));
        assert_eq!((o.nodes, o.capacity), (16, 3250.0 / 16.0));
        assert_eq!(o.config().capacities, caps);
        assert!(o
            .describe()
            .starts_with("16 nodes of 10x100+5x400+1x250 units"));
        for bad in [
            "", "0x100", "3x0", "3x-1", "x100", "ax100", "100,,5", "10001x1", "inf",
        ] {
            assert!(
                Cli::try_parse_from(["x", "--capacities", bad]).is_err(),
                "{bad}"
            );
        }
        for with in ["--nodes", "--capacity"] {
            let both = Cli::try_parse_from(["x", "--capacities", "100", with, "5"]);
            assert!(both.is_err(), "{with}");
        }
    }
}
