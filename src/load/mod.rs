//! The load harness: `roomrouter load`.
//!
//! An open-loop load generator for any router URL (or several, round-robin), or for a
//! cluster it starts itself in this process (router + N demo nodes on loopback). The
//! workload ([`workload`]) draws room popularity from Zipf(s), room sizes and stays from
//! configurable distributions, and can add bursts of new rooms. The engine ([`engine`])
//! sends joins at their planned times, follows redirects to the demo nodes (a real join) and
//! makes participants leave, optionally adds or kills a node mid-run, and measures decision
//! latency (HdrHistogram), throughput, errors by code, split rooms ([`split`]), rooms moved
//! and node utilization over time. [`report`] prints the table and writes the JSON.
//! [`ceiling`] is the bare-307 server benchmarks compare the router against.
//!
//! `--constant-rate R` switches to [`rate`]: a lean wrk2-style latency measurement (one
//! hyper HTTP/1.1 connection per task, decisions only, latency from each request's planned
//! time) for rates the user-modelling engine cannot reach.

pub mod ceiling;
pub mod engine;
pub mod kthreads;
pub mod pace;
pub mod rate;
pub mod report;
pub mod split;
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::FrontDoorMode;

pub use engine::{run, ClusterSpec, LoadConfig};
pub use pace::Pacing;
pub use rate::RateConfig;
pub use report::{LoadReport, RateReport};
pub use split::SplitDetector;
pub use workload::{Burst, Dist, WorkloadSpec};

fn parse_dist(s: &str) -> Result<Dist, String> {
    Dist::parse(s)
}

fn parse_burst(s: &str) -> Result<Burst, String> {
    Burst::parse(s)
}

fn parse_mode(s: &str) -> Result<FrontDoorMode, String> {
    match s {
        "redirect" => Ok(FrontDoorMode::Redirect),
        "proxy" => Ok(FrontDoorMode::Proxy),
        _ => Err(format!("{s:?}: expected redirect or proxy")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?}: not a number of seconds"))?;
    if v.is_finite() && (0.0..=86_400.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("{s:?}: seconds must be in 0..=86400"))
    }
}

/// `roomrouter load`: drive a router (or a self-started cluster) with joins.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Router base URL (repeatable: round-robin over several routers). Without it, the
    /// harness starts a router and --nodes demo nodes on loopback itself. `--url` is the
    /// same flag (the constant-rate mode's target).
    #[arg(long = "router", visible_alias = "url")]
    pub routers: Vec<String>,
    /// Self-started cluster: number of demo nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Self-started cluster: capacity of each node (default: twice the steady participants
    /// rate x mean stay, spread over the nodes).
    #[arg(long)]
    pub node_capacity: Option<f64>,
    /// Self-started cluster: heartbeat interval in ms (the timeout is 3 intervals).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=10_000))]
    pub heartbeat_ms: u64,
    /// Self-started cluster: the router's front-door mode, `redirect` (the harness follows
    /// the 307 to the node) or `proxy` (the router carries each join to the node and passes
    /// its answer on; participants leave at the nodes, whose URLs the harness asks the
    /// router's admin API for).
    #[arg(long, default_value = "redirect", value_parser = parse_mode, conflicts_with = "routers")]
    pub mode: FrontDoorMode,
    /// Self-started cluster: the router probes its nodes this often (ms; two failed probes
    /// mark one unhealthy: `health.probe_interval`); without it, only heartbeats tell.
    #[arg(long, value_parser = clap::value_parser!(u64).range(100..=60_000), conflicts_with = "routers")]
    pub probe_ms: Option<u64>,
    /// Self-started cluster: the router's `placement.new_room_reserve`, what a room with
    /// neither hint nor history reserves. Default: the workload's mean room size (rounded),
    /// as an operator who knows their meetings would set it; the router's own default is 10.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000), conflicts_with = "routers")]
    pub new_room_reserve: Option<u32>,
    /// Target joins per second (open loop; bursts come on top).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Constant-rate latency mode (wrk2-style): this many requests/s in total against
    /// --url, spread evenly over --connections persistent HTTP/1.1 connections, latency from
    /// each request's planned time; redirects are never followed. Uses --duration,
    /// --connections, --timeout, --rooms, --room-prefix, --zipf (0 = uniform), --path,
    /// --seed, --max-requests, --json, --quiet.
    #[arg(
        long,
        value_name = "REQ_PER_S",
        conflicts_with_all = [
            "rate", "bursts", "size_hints", "node_capacity", "add_node_at", "kill_node_at",
            "ceiling_server", "mode", "probe_ms", "size", "stay", "spread", "no_follow",
            "admin_token", "nodes", "heartbeat_ms",
        ]
    )]
    pub constant_rate: Option<f64>,
    /// Constant-rate mode: what paces the sends. `tokio` (1 ms timer: sends up to 1 ms
    /// early, in 1 ms batches), `wheel` (Linux: a 100 µs timer wheel, for sub-millisecond
    /// latency figures; costs the load tool 10 000 timer wake-ups a second) or `spin` (a
    /// 10 µs wheel and a runtime that never sleeps: the load tool's own wake-ups leave the
    /// figures; costs it a whole core, so give it one of its own).
    #[arg(long, value_enum, default_value_t = Pacing::Tokio, requires = "constant_rate")]
    pub pacing: Pacing,
    /// Constant-rate mode: room names are this prefix and a number in 1..=--rooms (`r`
    /// gives the names the compare script's wrk requests use).
    #[arg(long, default_value = "room-", requires = "constant_rate")]
    pub room_prefix: String,
    /// Run time in seconds (constant-rate mode: the measured part, after --warmup).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub duration: Duration,
    /// Constant-rate mode: first send at the same rate for this many seconds and measure
    /// nothing of it (wrk2's calibration period): fresh connections and the load tool's own
    /// start are not the server's steady state.
    #[arg(long, default_value = "0", value_parser = parse_secs, requires = "constant_rate")]
    pub warmup: Duration,
    /// At most this many joins: the schedule is cut there, whatever the rate and duration.
    /// Constant-rate mode cuts nothing: a run that plans more requests than this (floor(rate
    /// x (warmup + duration)), the warm-up's included) is refused.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_requests: usize,
    /// Most decisions in flight (connections to the routers), shared among the routers (at
    /// least one each): one that stops answering holds only its share.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    pub timeout: Duration,
    /// Number of distinct room names (popularity is Zipf over them).
    #[arg(long, default_value_t = 1000)]
    pub rooms: u32,
    /// Zipf exponent of room popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Participants per session: fixed:V, uniform:LO:HI, exp:MEAN or zipf:MAX:S (MAX at most
    /// 100000).
    #[arg(long, default_value = "uniform:2:8", value_parser = parse_dist)]
    pub size: Dist,
    /// Seconds a participant stays (same forms as --size).
    #[arg(long, default_value = "exp:5", value_parser = parse_dist)]
    pub stay: Dist,
    /// Participants of a session arrive within this many seconds of its first join.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    pub spread: Duration,
    /// SECS:ROOMS, e.g. 5:1000 = 1000 new rooms within one second from 5 s (repeatable).
    #[arg(long = "burst", value_parser = parse_burst)]
    pub bursts: Vec<Burst>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Join path with one {room} placeholder (e.g. "/status?room={room}").
    #[arg(long, default_value = "/rooms/{room}")]
    pub path: String,
    /// Send the session's true size as ?size= with each join.
    #[arg(long)]
    pub size_hints: bool,
    /// Do not follow redirects to the nodes (decisions only; nobody joins or leaves). A
    /// proxy-mode router still carries each join to its node, but nobody leaves.
    #[arg(long)]
    pub no_follow: bool,
    /// Admin token, to sample an external router's node utilization from /v1/nodes; in
    /// proxy mode participants then also leave at the node URLs listed there rather than
    /// through the router. Without the flag, `ROOMROUTER_ADMIN_TOKEN` (read here, not by
    /// clap: set for a router in the same shell, it must not stop a constant-rate run,
    /// which has no use for it and refuses only the flag).
    #[arg(long)]
    pub admin_token: Option<String>,
    /// Self-started cluster: add a node at this many seconds into the run.
    #[arg(long, value_parser = parse_secs)]
    pub add_node_at: Option<Duration>,
    /// Self-started cluster: kill the first node at this many seconds into the run.
    #[arg(long, value_parser = parse_secs)]
    pub kill_node_at: Option<Duration>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Instead of a load test, serve a bare fixed 307 on this address until Ctrl-C (the
    /// benchmarks' ceiling).
    #[arg(long, value_name = "ADDR")]
    pub ceiling_server: Option<SocketAddr>,
}

impl LoadArgs {
    /// The constant-rate mode's configuration, checked (`None` without `--constant-rate`).
    pub fn rate_config(&self) -> anyhow::Result<Option<RateConfig>> {
        let Some(rate) = self.constant_rate else {
            return Ok(None);
        };
        let cfg = RateConfig {
            targets: self.routers.clone(),
            rate,
            duration: self.duration,
            warmup: self.warmup,
            connections: self.connections,
            timeout: self.timeout,
            rooms: self.rooms,
            room_prefix: self.room_prefix.clone(),
            zipf_s: self.zipf,
            path: self.path.clone(),
            max_requests: self.max_requests as u64,
            seed: self.seed,
            progress: !self.quiet,
            pacing: self.pacing,
        };
        cfg.check()?;
        Ok(Some(cfg))
    }

    /// The engine's configuration, checked.
    pub fn config(&self) -> anyhow::Result<LoadConfig> {
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1_000_000.0,
            "--rate must be in (0, 1000000]"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be > 0");
        anyhow::ensure!(
            (1..=10_000).contains(&self.connections),
            "--connections must be in 1..=10000"
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.max_requests),
            "--max-requests must be in 1..=10000000"
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.rooms),
            "--rooms must be in 1..=10000000"
        );
        anyhow::ensure!(
            self.zipf.is_finite() && self.zipf > 0.0,
            "--zipf must be > 0"
        );
        anyhow::ensure!(!self.timeout.is_zero(), "--timeout must be > 0");
        // An event the run never reaches would report no moves, which reads as a pass.
        for (flag, at) in [
            ("--add-node-at", self.add_node_at),
            ("--kill-node-at", self.kill_node_at),
        ] {
            if let Some(at) = at {
                anyhow::ensure!(
                    at < self.duration,
                    "{flag} must be before the end of the run (--duration)"
                );
            }
        }
        if let Some(c) = self.node_capacity {
            anyhow::ensure!(
                c > 0.0 && c <= crate::cluster::MAX_UNITS,
                "--node-capacity must be > 0 and <= 1e12"
            );
        }
        for r in &self.routers {
            url::Url::parse(r).with_context(|| format!("--router {r:?}"))?;
        }
        Ok(LoadConfig {
            routers: self.routers.clone(),
            cluster: ClusterSpec {
                nodes: self.nodes as usize,
                capacity: self.node_capacity,
                heartbeat: Duration::from_millis(self.heartbeat_ms),
                mode: self.mode,
                probe: self.probe_ms.map(Duration::from_millis),
                new_room_reserve: self.new_room_reserve,
            },
            workload: WorkloadSpec {
                rate: self.rate,
                duration: self.duration,
                max_joins: self.max_requests,
                rooms: self.rooms,
                zipf_s: self.zipf,
                size: self.size,
                stay: self.stay,
                spread: self.spread,
                bursts: self.bursts.clone(),
                seed: self.seed,
            },
            connections: self.connections,
            timeout: self.timeout,
            follow: !self.no_follow,
            size_hints: self.size_hints,
            path: self.path.clone(),
            admin_token: self.admin_token.clone().or_else(|| {
                std::env::var("ROOMROUTER_ADMIN_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
            }),
            add_node_at: self.add_node_at,
            kill_node_at: self.kill_node_at,
            sample_every: Duration::from_secs(1),
            progress: !self.quiet,
        })
    }
}

/// Writes `report` as pretty JSON to `path`, if one was given, and says where.
fn write_json(
    path: Option<&std::path::Path>,
    report: &impl serde::Serialize,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("  json       {}", path.display());
    }
    Ok(())
}

/// Runs `roomrouter load`: the ceiling server, a constant-rate measurement, or one load test
/// (table to stdout, JSON to `--json`). A load test fails when any room was split, so
/// scripts notice.
pub async fn run_cli(args: &LoadArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.ceiling_server {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!(
            "bare 307 ceiling server on http://{}",
            listener.local_addr()?
        );
        ceiling::serve_bare_307(listener, crate::service::shutdown_signal()).await;
        return Ok(());
    }
    if let Some(cfg) = args.rate_config()? {
        let report = rate::run(cfg).await?;
        print!("{}", report.table());
        return write_json(args.json.as_deref(), &report);
    }
    let report = run(args.config()?).await?;
    print!("{}", report.table());
    write_json(args.json.as_deref(), &report)?;
    anyhow::ensure!(
        report.split_rooms == 0,
        "{} split room(s): the router sent one room's participants to two nodes",
        report.split_rooms
    );
    Ok(())
}
