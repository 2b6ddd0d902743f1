//! consul-writer: the gRPC service that makes Consul match the translator's commands.
//!
//! - `Apply`: a batch of commands, one result per command (applied, unchanged, conflict,
//!   rejected, failed) with Consul's message.
//! - `Sync`: the full desired state; owned objects are created, updated and deleted to match.
//! - `grpc.health.v1.Health`: `consul_smi.v1.ConsulWriter` (and `""`) turn SERVING once the
//!   Consul API version is known.
//! - Drift repair: blocking queries on Consul restore owned objects changed or deleted out of
//!   band, from the last Sync state plus applied commands.
//!
//! The Consul work (API versions, ownership, retries) is in `consul-smi-consul`; this crate is
//! the service wiring. The least-privilege ACL policy is `acl-policy.hcl` next to this crate.

mod config;
mod error;
mod service;
mod writer;

use std::future::Future;
use std::time::Duration;

use consul_smi_grpc::v1::consul_writer_server::ConsulWriterServer;
use consul_smi_telemetry::Metrics;
use tokio::net::TcpListener;

pub use config::WriterConfig;
pub use error::WriterError;
pub use service::WriterService;
pub use writer::{Writer, WriterCounters};

/// The least-privilege Consul ACL policy for the writer (HCL).
pub const ACL_POLICY: &str = include_str!("../acl-policy.hcl");

/// Serves the writer on `listener` until `shutdown` completes.
pub async fn serve(
    config: WriterConfig,
    listener: TcpListener,
    metrics: Metrics,
    admin_readiness: consul_smi_telemetry::Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WriterError> {
    let drift_repair = config.drift_repair;
    // Before anything starts: a broken TLS configuration is a startup error.
    let incoming = config.tls.incoming(listener)?;
    let writer = Writer::new(config, metrics)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<ConsulWriterServer<WriterService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Ready once the Consul API version is known (so the first Apply is not a guess).
    let readiness = {
        let writer = writer.clone();
        let health = health.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                match writer.client().flavor().await {
                    Ok(flavor) => {
                        tracing::info!(
                            ?flavor,
                            consul = writer.client().base_url(),
                            "Consul reachable; serving"
                        );
                        admin_readiness.set_ready();
                        health
                            .set_serving::<ConsulWriterServer<WriterService>>()
                            .await;
                        health
                            .set_service_status("", tonic_health::ServingStatus::Serving)
                            .await;
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "Consul not reachable yet; not ready"),
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };
    let drift = drift_repair.then(|| tokio::spawn(writer.clone().run_drift_repair(stop_rx)));

    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(WriterService::new(writer).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    readiness.abort();
    if let Some(drift) = drift {
        let _ = drift.await;
    }
    result.map_err(WriterError::from)
}
