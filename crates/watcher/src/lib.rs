//! smi-watcher: watches SMI objects (Kubernetes, or a directory of manifests), converts every
//! version into the hub model, and streams a snapshot plus revisioned deltas to any number of
//! gRPC subscribers (`consul_smi.v1.SmiWatch`, `proto/consul_smi/v1/watch.proto`). It also
//! serves the CRDs' conversion webhook.
//!
//! # The stream, as a subscriber sees it
//! - A subscriber is held until the source has delivered its complete initial state (every
//!   served SMI kind listed, or the directory read): it never gets a partial snapshot.
//! - Empty `epoch` in the request: `SnapshotBegin{REASON_INITIAL}`, one `Applied` per object
//!   (plus an `Invalid` for objects whose current version is unusable), `SnapshotEnd`, all at
//!   the snapshot's revision; then deltas with consecutive, increasing revisions.
//! - `epoch` + `after_revision` of this run: exactly the deltas after that revision, no
//!   snapshot. Another epoch (the watcher restarted), a revision older than the bounded
//!   history, or a subscriber that fell that far behind while connected:
//!   `SnapshotBegin{REASON_RESUME_UNAVAILABLE}` and a fresh snapshot that replaces everything.
//! - `Invalid` means the object's current version cannot be decoded; its last valid version
//!   (if any) still stands and a snapshot carries it as `Applied` before the `Invalid`.
//!   `Deleted` removes both.
//! - Re-lists (API server restart, 410 Gone) only produce the changes that actually happened,
//!   deletions included; an unchanged object is never sent twice.
//!
//! Layout: [`store`] is the pure state (objects, revisions, bounded history); [`shared`] lets
//! sources write it and subscribers read it; [`kube_source`] and [`dir_source`] feed it;
//! [`grpc`] serves it; [`webhook`] is the conversion endpoint; [`metrics`] is what it records
//! on `/metrics`; [`serve`] wires them.

use std::future::Future;
use std::path::PathBuf;

use consul_smi_grpc::v1;
use consul_smi_grpc::v1::smi_watch_server::SmiWatchServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub mod config;
pub mod dir_source;
pub mod grpc;
pub mod kube_source;
pub mod metrics;
pub mod shared;
pub mod store;
pub mod webhook;

pub use config::{Source, WatcherConfig};
pub use grpc::{SubscriberLimits, WatchEventStream, WatchService, subscribe};
pub use metrics::WatcherMetrics;
pub use shared::SharedStore;

#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    #[error("Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("TLS material {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error(transparent)]
    GrpcTls(#[from] consul_smi_grpc::tls::TlsError),
    #[error("conversion webhook: --webhook-listen needs --webhook-cert and --webhook-key")]
    WebhookConfig,
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("SmiWatch.Watch: {0}")]
    Status(#[from] tonic::Status),
}

/// Aborts a background task when the owner goes away (early return included).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the watcher: its source, the conversion webhook (when configured), and the gRPC
/// server (SmiWatch + grpc.health.v1) on `listener`, until `shutdown` completes. Its metrics
/// ([`WatcherMetrics`]) are registered on `metrics`: pass a fresh `Metrics` per call.
///
/// Health turns SERVING once the source has delivered its complete initial state; until then
/// subscribers are held (never given a partial snapshot).
pub async fn serve(
    config: WatcherConfig,
    listener: TcpListener,
    metrics: consul_smi_telemetry::Metrics,
    readiness: consul_smi_telemetry::Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatcherError> {
    let epoch = new_epoch();
    let shared = SharedStore::with_metrics(
        epoch.clone(),
        config.history,
        WatcherMetrics::register(&metrics),
    );
    info!(%epoch, source = ?config.source, grpc = ?listener.local_addr().ok(), "smi-watcher starting");

    // The webhook starts first: with CRDs converting through it, the API server cannot serve
    // non-storage versions (the watcher's own reads included) until it answers.
    let (webhook_stop, webhook_stopped) = tokio::sync::watch::channel(false);
    let _webhook = match config.webhook_listen {
        Some(addr) => {
            let (Some(cert), Some(key)) = (&config.webhook_cert, &config.webhook_key) else {
                return Err(WatcherError::WebhookConfig);
            };
            let tls = webhook::tls_config(cert, key)?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| WatcherError::Bind { addr, source })?;
            let mut stopped = webhook_stopped.clone();
            Some(AbortOnDrop(tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = webhook::serve_conversion_webhook(listener, tls, stop).await {
                    warn!(error = %e, "conversion webhook stopped");
                }
            })))
        }
        None => None,
    };

    let _source = AbortOnDrop(match &config.source {
        Source::Kube => {
            let client = kube_client(&config).await?;
            let filter = kube_source::KubeFilter {
                namespace: config.namespace.clone(),
                label_selector: config.label_selector.clone(),
            };
            tokio::spawn(kube_source::run(client, shared.clone(), filter))
        }
        Source::Dir(dir) => tokio::spawn(dir_source::run(
            dir.clone(),
            shared.clone(),
            config.dir_options(),
        )),
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<SmiWatchServer<WatchService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _readiness = AbortOnDrop(tokio::spawn({
        let shared = shared.clone();
        async move {
            shared.wait_ready().await;
            // Then ready while the source keeps up: a directory that cannot be read (or a scan
            // that hangs) freezes the stream, revocations included, and must show.
            let mut health = shared.source_health();
            loop {
                let healthy = *health.borrow_and_update();
                let status = if healthy {
                    readiness.set_ready();
                    tonic_health::ServingStatus::Serving
                } else {
                    readiness.set_not_ready();
                    tonic_health::ServingStatus::NotServing
                };
                reporter
                    .set_service_status(
                        <SmiWatchServer<WatchService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                reporter.set_service_status("", status).await;
                if health.changed().await.is_err() {
                    return;
                }
            }
        }
    }));

    let service = WatchService::new(shared.clone(), config.subscriber_buffer);
    // mTLS or loopback-only plaintext; also sets TCP_NODELAY (deltas are small messages that
    // should leave at once, and tonic only sets it on listeners it binds itself).
    let incoming = config.tls.incoming(listener)?;
    let result = tonic::transport::Server::builder()
        // Detects subscribers that vanished without closing their connection.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health)
        .add_service(
            SmiWatchServer::new(service)
                .max_encoding_message_size(consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT)
                .max_decoding_message_size(consul_smi_grpc::smi::WATCH_REQUEST_LIMIT),
        )
        .serve_with_incoming_shutdown(incoming, async {
            shutdown.await;
            info!("shutting down: ending subscriptions");
            // Open streams would otherwise keep the graceful shutdown waiting forever.
            shared.close();
        })
        .await;
    let _ = webhook_stop.send(true);
    result?;
    Ok(())
}

async fn kube_client(config: &WatcherConfig) -> Result<kube::Client, WatcherError> {
    match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| WatcherError::KubeConfig(format!("{}: {e}", path.display())))?;
            let options = kube::config::KubeConfigOptions::default();
            let client_config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| WatcherError::KubeConfig(format!("{}: {e}", path.display())))?;
            Ok(kube::Client::try_from(client_config)?)
        }
        None => Ok(kube::Client::try_default().await?),
    }
}

/// Identifies this run: revisions restart at 0 with each process, so a subscriber's resume
/// point is only meaningful together with the epoch it came from.
fn new_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // RandomState is seeded from the OS per process: enough to tell runs apart without
    // pulling in a UUID/RNG crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    format!("{:x}-{:016x}", nanos / 1_000_000, hasher.finish())
}

/// Re-exported so subscribers need not depend on the generated module path.
pub use v1::WatchEvent;
