//! `consul-smi`: one binary for the three services and the offline tools.

mod offline;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use consul_smi_telemetry::{Metrics, Readiness};
use tokio::net::TcpListener;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "consul-smi",
    version,
    about = "Service Mesh Interface for HashiCorp Consul"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Admin HTTP address serving /metrics, /healthz and /readyz; off when absent.
    #[arg(long, env = "CONSUL_SMI_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Commands {
    /// Run smi-watcher: watch SMI objects and stream them over gRPC.
    Watcher {
        #[command(flatten)]
        config: consul_smi_watcher::WatcherConfig,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run smi-translator: turn the watcher's stream into commands for the writer.
    Translator {
        #[command(flatten)]
        config: consul_smi_translator::TranslatorConfig,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run consul-writer: apply commands to Consul's HTTP API.
    Writer {
        #[command(flatten)]
        config: consul_smi_writer::WriterConfig,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check SMI manifests offline: decode every document and translate them; exit 1 on errors.
    Validate(offline::ValidateArgs),
    /// Show the exact Consul changes the manifests would make (against live Consul with --live).
    Plan(offline::PlanArgs),
    /// Ask a running smi-translator why objects are (not) in effect.
    Diagnostics(offline::DiagnosticsArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Commands::Watcher { config, admin } => {
            let _telemetry = consul_smi_telemetry::init("smi-watcher")?;
            let listener = bind(config.listen).await?;
            let metrics = Metrics::new();
            let readiness = serve_admin(admin, metrics.clone()).await?;
            consul_smi_watcher::serve(config, listener, metrics, readiness, shutdown_signal())
                .await?;
        }
        Commands::Translator { config, admin } => {
            let _telemetry = consul_smi_telemetry::init("smi-translator")?;
            let listener = bind(config.listen).await?;
            let metrics = Metrics::new();
            let readiness = serve_admin(admin, metrics.clone()).await?;
            consul_smi_translator::serve(config, listener, metrics, readiness, shutdown_signal())
                .await?;
        }
        Commands::Writer { config, admin } => {
            let _telemetry = consul_smi_telemetry::init("consul-writer")?;
            let listener = bind(config.listen).await?;
            let metrics = Metrics::new();
            let readiness = serve_admin(admin, metrics.clone()).await?;
            consul_smi_writer::serve(config, listener, metrics, readiness, shutdown_signal())
                .await?;
        }
        Commands::Validate(args) => {
            let clean = offline::validate(&args)?;
            if !clean {
                std::process::exit(1);
            }
        }
        Commands::Plan(args) => offline::plan(&args).await?,
        Commands::Diagnostics(args) => offline::diagnostics(&args).await?,
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Serves `/metrics`, `/healthz` and `/readyz`; the service sets the returned readiness
/// once it can do its job (watcher: first snapshot listed; translator: Consul synced to the
/// index; writer: Consul reachable).
async fn serve_admin(admin: AdminArgs, metrics: Metrics) -> Result<Readiness> {
    let readiness = Readiness::new();
    if let Some(addr) = admin.admin_listen {
        let listener = bind(addr).await?;
        tokio::spawn(consul_smi_telemetry::serve_admin(
            listener,
            metrics,
            readiness.clone(),
            shutdown_signal(),
        ));
    }
    Ok(readiness)
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    info!("shutdown signal received");
}
