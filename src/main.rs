//! The `roomrouter` binary: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use roomrouter::config::{Config, LogFormat};
use roomrouter::demo::node::{DemoNode, DemoNodeConfig};

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
        /// Number of demo nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Compare placement policies on standard workloads or a trace, in simulation (no network).
    Simulate(roomrouter::sim::cli::SimulateArgs),
    /// Load-test a router (or a cluster it starts itself): latency, throughput, split rooms.
    Load(roomrouter::load::LoadArgs),
    /// Run one demo meeting node that heartbeats to a router.
    DemoNode {
        /// Router base URL.
        #[arg(long)]
        router: String,
        #[arg(long)]
        id: String,
        #[arg(long, default_value_t = 100.0)]
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
        /// Ticket secret shared with the router.
        #[arg(long, env = "ROOMROUTER_TICKET_SECRET", hide_env_values = true)]
        ticket_secret: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roomrouter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roomrouter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let log_format = if cli.log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    match cli.cmd {
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(&file)?;
            cfg.require_credentials()?;
            println!("{}: ok ({} static nodes)", file.display(), cfg.nodes.len());
            Ok(())
        }
        Cmd::Serve { config, listen } => {
            let mut cfg = match &config {
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
            }
            cfg.require_credentials()?;
            let fmt = if cli.log_json {
                LogFormat::Json
            } else {
                cfg.logging.format
            };
            roomrouter::telemetry::init(fmt, &cfg.logging.level);
            let listener = tokio::net::TcpListener::bind(cfg.server.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.server.listen))?;
            tracing::info!(addr = %listener.local_addr()?, "roomrouter listening");
            roomrouter::service::run_configured(
                cfg,
                listener,
                roomrouter::service::shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Cmd::Simulate(args) => roomrouter::sim::cli::run_cli(&args),
        Cmd::Load(args) => roomrouter::load::run_cli(&args).await,
        Cmd::Demo { listen, nodes } => {
            roomrouter::telemetry::init(log_format, "info");
            roomrouter::demo::run(listen, nodes.clamp(1, 64)).await
        }
        Cmd::DemoNode {
            router,
            id,
            capacity,
            listen,
            public_url,
            region,
            tags,
            node_token,
            ticket_secret,
        } => {
            roomrouter::telemetry::init(log_format, "info");
            let node = DemoNode::start(DemoNodeConfig {
                id,
                router,
                listen,
                public_url,
                capacity,
                region,
                tags,
                node_token,
                ticket_secret,
                heartbeat_interval: Duration::from_secs(2),
            })
            .await?;
            println!("demo node {} serving on {}", node.id, node.url);
            roomrouter::service::shutdown_signal().await;
            node.stop().await;
            Ok(())
        }
    }
}
