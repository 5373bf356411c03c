//! The `roomrouter` binary: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use roomrouter::cluster::NodeId;
use roomrouter::config::{Config, LogFormat, RuntimeModel, ServerConfig};
use roomrouter::demo::node::{DemoNode, DemoNodeConfig};
use roomrouter::room::Normalization;

/// mimalloc instead of the system allocator: a proxied request allocates and frees dozens of
/// small buffers (headers, URIs, body frames), and glibc's malloc/free took about 12% of the
/// router's instructions in proxy mode (callgrind). The library stays allocator-agnostic.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "roomrouter",
    version,
    about = "A front door for clusters of video-meeting servers"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the router.
    Serve {
        /// Configuration file (TOML). Without it, every key has its default.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address; overrides server.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Check a configuration file and exit.
    CheckConfig { file: PathBuf },
    /// Run a router and demo nodes on loopback, with generated secrets.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Number of demo nodes (1-64).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=64))]
        nodes: u8,
    },
    /// Compare placement policies on standard workloads or a trace, in simulation (no network).
    Simulate(roomrouter::sim::cli::SimulateArgs),
    /// Load-test a router (or a cluster it starts itself): latency, throughput, split rooms.
    Load(roomrouter::load::LoadArgs),
    /// Run one demo meeting node that heartbeats to a router.
    DemoNode {
        /// Router base URL. Repeat it for several routers (sharing a Redis): heartbeats go
        /// to the next when one fails, so a router's crash is not taken for the node's.
        #[arg(long = "router", required = true)]
        routers: Vec<String>,
        /// Node id: 1-64 of A-Za-z0-9._- (what the router takes).
        #[arg(long, value_parser = node_id)]
        id: String,
        /// Capacity in participants: a number > 0 (what the router takes).
        #[arg(long, default_value_t = 100.0, value_parser = capacity, allow_negative_numbers = true)]
        capacity: f64,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// URL users reach this node at (default: http://<bound address>).
        #[arg(long)]
        public_url: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Node bearer token.
        #[arg(long, env = "ROOMROUTER_NODE_TOKEN", hide_env_values = true)]
        node_token: String,
        /// Ticket secret shared with the router (at least 32 characters, as its
        /// `tickets.secret`).
        #[arg(long, env = "ROOMROUTER_TICKET_SECRET", hide_env_values = true,
              value_parser = ticket_secret)]
        ticket_secret: String,
        /// Clock skew forgiven past a ticket's `exp`: the router's `tickets.leeway`.
        #[arg(long, default_value = "60s", value_parser = roomrouter::config::duration::parse_arg)]
        ticket_leeway: Duration,
        /// How the router normalizes room ids (its `rooms.normalization`: none, lowercase or
        /// nfkc_lowercase): a ticket admits to the room the path names normalized so.
        #[arg(long, default_value = "lowercase", value_parser = room_normalization)]
        room_normalization: Normalization,
    },
}

/// `demo-node --id`: an id the router takes. A node started with one it does not take would
/// be refused at every heartbeat, forever, and never receive a user.
fn node_id(s: &str) -> Result<String, String> {
    NodeId::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `demo-node --capacity`: > 0 and at most [`roomrouter::cluster::MAX_UNITS`], as the router
/// takes it (see `node_id`).
fn capacity(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c > 0.0 && c <= roomrouter::cluster::MAX_UNITS => Ok(c),
        _ => Err("the capacity must be a number > 0 and <= 1e12".into()),
    }
}

/// `demo-node --ticket-secret`: at least 32 characters, as the router's `tickets.secret`.
/// A shorter one can be no secret the router signs with, so every ticket would be refused
/// (`401`), quietly, at the node.
fn ticket_secret(s: &str) -> Result<String, String> {
    if s.len() < 32 {
        return Err("must be at least 32 characters, as the router's tickets.secret".into());
    }
    Ok(s.to_string())
}

/// `demo-node --room-normalization`, spelled as `rooms.normalization` is.
fn room_normalization(s: &str) -> Result<Normalization, String> {
    match s {
        "none" => Ok(Normalization::None),
        "lowercase" => Ok(Normalization::Lowercase),
        "nfkc_lowercase" => Ok(Normalization::NfkcLowercase),
        _ => Err("must be none, lowercase or nfkc_lowercase".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = match cli.cmd {
        // `serve` reads its configuration before the runtime exists: it sizes the runtime.
        Cmd::Serve { config, listen } => serve_config(config.as_deref(), listen).and_then(|cfg| {
            // The log guard outlives the runtime: the app's last owners (the learned-size
            // file's final write among them) go with the runtime, and may have to warn.
            let _log = init_logging(&cfg, cli.log_json);
            transparent_huge_pages(cfg.server.transparent_huge_pages);
            let rt = serve_runtime(&cfg.server)?;
            let served = rt.block_on(serve_with(cfg));
            // Not a plain drop, which would wait without limit for a name lookup a DNS
            // outage holds: the exit would overrun systemd's stop timeout.
            roomrouter::http::loops::end(rt);
            served
        }),
        cmd => runtime(None).and_then(|rt| rt.block_on(run(cmd, cli.log_json))),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roomrouter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A multi-threaded runtime with `workers` threads (default: one per core).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

/// The runtime `serve` starts on. With `server.runtime = "per_thread"` it is event loop 0
/// (a single thread, also running the background tasks) and `http::loops` starts the
/// others; with `"shared"` one multi-threaded runtime of `worker_threads` workers.
fn serve_runtime(cfg: &ServerConfig) -> anyhow::Result<tokio::runtime::Runtime> {
    match cfg.runtime {
        RuntimeModel::Shared => runtime(cfg.worker_threads),
        RuntimeModel::PerThread => roomrouter::http::loops::runtime()
            .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}")),
    }
}

/// The configuration `serve` runs with: the file (or the defaults and the environment),
/// `--listen` on top, validated, with credentials required.
fn serve_config(
    config: Option<&std::path::Path>,
    listen: Option<SocketAddr>,
) -> anyhow::Result<Config> {
    let mut cfg = match config {
        Some(f) => Config::load(f)?,
        None => {
            let mut c = Config::default();
            c.apply_env(|k| std::env::var(k).ok());
            c.validate()?;
            c
        }
    };
    if let Some(l) = listen {
        cfg.server.listen = l;
        // Checked again with it: it may be another listener's address.
        cfg.validate()?;
    }
    cfg.require_credentials()?;
    Ok(cfg)
}

/// Applies `server.transparent_huge_pages` to this process: `false` opts it out of
/// transparent huge pages (`prctl(PR_SET_THP_DISABLE)`, which covers every thread and what
/// was mapped already), `true` leaves the system's setting. A kernel that refuses leaves the
/// system's setting too, with a warning.
fn transparent_huge_pages(allowed: bool) {
    if allowed {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(
            error = %e,
            "could not opt out of transparent huge pages; the system's setting applies"
        );
    }
}

/// Logging as `[logging]` says, in JSON with `--log-json`.
fn init_logging(cfg: &Config, log_json: bool) -> roomrouter::telemetry::LogGuard {
    let fmt = if log_json {
        LogFormat::Json
    } else {
        cfg.logging.format
    };
    roomrouter::telemetry::init(fmt, &cfg.logging.level)
}

async fn serve_with(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "roomrouter listening");
    roomrouter::service::run_configured(cfg, listener, roomrouter::service::shutdown_signal())
        .await?;
    Ok(())
}

async fn run(cmd: Cmd, log_json: bool) -> anyhow::Result<()> {
    let log_format = if log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    match cmd {
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            cfg.require_credentials()?;
            // What `serve` would refuse at its start, found before it (`ExecStartPre`).
            if let Some(path) = &cfg.store.learned_file {
                roomrouter::store::learned_file::LearnedFile::check(path)?;
            }
            println!("{}: ok ({} static nodes)", file.display(), cfg.nodes.len());
            Ok(())
        }
        Cmd::Serve { config, listen } => {
            let cfg = serve_config(config.as_deref(), listen)?;
            let _log = init_logging(&cfg, log_json);
            serve_with(cfg).await
        }
        Cmd::Simulate(args) => roomrouter::sim::cli::run_cli(&args),
        Cmd::Load(args) => {
            // A huge-page fault in the load tool (or the ceiling server it runs) would count
            // as the target's latency: it opts out as the router does by default.
            transparent_huge_pages(false);
            roomrouter::load::run_cli(&args).await
        }
        Cmd::Demo { listen, nodes } => {
            let _log = roomrouter::telemetry::init(log_format, "info");
            // The demo's router runs on the defaults, this key's among them.
            transparent_huge_pages(Config::default().server.transparent_huge_pages);
            roomrouter::demo::run(listen, nodes as usize).await
        }
        Cmd::DemoNode {
            routers,
            id,
            capacity,
            listen,
            public_url,
            region,
            tags,
            node_token,
            ticket_secret,
            ticket_leeway,
            room_normalization,
        } => {
            let _log = roomrouter::telemetry::init(log_format, "info");
            // A benchmark's stand-in for a media server, in front of which the router and
            // HAProxy are compared: its huge-page faults would land in whichever front end's
            // tail made it allocate more (the router's tickets, which it verifies), so it
            // opts out as `demo` and the router do.
            transparent_huge_pages(false);
            let node = DemoNode::start_with_normalization(
                DemoNodeConfig {
                    id,
                    routers,
                    listen,
                    public_url,
                    capacity,
                    region,
                    tags,
                    node_token,
                    ticket_secret,
                    ticket_leeway,
                    heartbeat_interval: Duration::from_secs(2),
                },
                room_normalization,
            )
            .await?;
            println!("demo node {} serving on {}", node.id, node.url);
            roomrouter::service::shutdown_signal().await;
            // A graceful stop leaves the router at once: a node that just vanished would
            // look crashed, and be sent joins until the router's heartbeat timeout.
            node.stop().await;
            Ok(())
        }
    }
}
