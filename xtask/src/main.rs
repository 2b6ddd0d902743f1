//! Developer commands: `cargo xtask <command>`.

mod demo;
mod gen_crds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "consul-smi developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate CRDs (schemas/crds, deploy/base/crds.yaml) and JSON Schemas (schemas/jsonschema).
    GenCrds(gen_crds::Args),
    /// Run the product end to end: real Consul + the three services on deploy/examples/.
    Demo(demo::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenCrds(args) => gen_crds::run(args),
        Command::Demo(args) => demo::run(args),
    }
}
