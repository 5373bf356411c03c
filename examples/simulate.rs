//! Runs the placement simulator until the `roomrouter` binary grows a `simulate` subcommand:
//! `cargo run --release --example simulate -- --help`.

use clap::Parser;
use roomrouter::sim::cli::{run_cli, SimulateArgs};

#[derive(Parser)]
#[command(about = "Compare placement policies in simulation")]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn main() -> anyhow::Result<()> {
    run_cli(&Cli::parse().args)
}
