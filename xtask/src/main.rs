//! Developer commands: `cargo xtask <command>`.

mod bench;
mod demo;
mod e2e_kind;
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
    /// End-to-end benchmark on real components: propagation p50/p99, tracing overhead, 10k convergence.
    Bench(bench::Args),
    /// Run the e2e suite in a kind cluster (needs Docker, kind, kubectl, helm).
    E2eKind(e2e_kind::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenCrds(args) => gen_crds::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::E2eKind(args) => e2e_kind::run(args),
    }
}
