//! smi-translator: subscribes to smi-watcher's stream, keeps the translation index, and
//! sends the resulting commands to consul-writer in batches. A full `Sync` on start, after
//! every fresh snapshot, after any failed write, and periodically makes restarts of any of
//! the three services converge with nothing lost and nothing duplicated.

mod diagnostics;
mod events;
mod pipeline;
mod writer_link;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use consul_smi_grpc::tls::ClientEndpoint;
use consul_smi_translate::{ConsulApi, Index, NamespaceMode, TranslateOptions};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::info;

pub use diagnostics::DiagnosticsService;

#[derive(Debug, thiserror::Error)]
pub enum TranslatorError {
    #[error("the {task} stopped: {detail}")]
    TaskEnded { task: &'static str, detail: String },
    #[error("Kubernetes client for Events: {0}")]
    Kube(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] consul_smi_grpc::tls::TlsError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsulApiArg {
    /// Find out: the translator asks consul-writer, `plan --live` asks Consul; legacy until
    /// known, and where nothing can be asked (`validate`, `plan --from`).
    Auto,
    /// Consul < 1.9: L4 intentions only.
    Legacy,
    /// Consul 1.9+: config-entry intentions with L7 permissions.
    Modern,
}

#[derive(Clone, Debug, clap::Args)]
pub struct TranslatorConfig {
    /// gRPC listen address (TranslatorDiagnostics and grpc.health.v1).
    #[arg(
        long = "listen",
        env = "CONSUL_SMI_TRANSLATOR_LISTEN",
        default_value = "0.0.0.0:7402"
    )]
    pub listen: std::net::SocketAddr,
    /// smi-watcher gRPC endpoint.
    #[arg(
        long,
        env = "CONSUL_SMI_WATCHER_ADDR",
        default_value = "http://127.0.0.1:7401"
    )]
    pub watcher: String,
    /// consul-writer gRPC endpoint.
    #[arg(
        long,
        env = "CONSUL_SMI_WRITER_ADDR",
        default_value = "http://127.0.0.1:7403"
    )]
    pub writer: String,
    /// How SMI becomes Consul state (shared with `consul-smi validate` and `plan`).
    #[command(flatten)]
    pub translate: TranslateArgs,
    /// Seconds between full Syncs to the writer.
    #[arg(long, env = "CONSUL_SMI_RESYNC_SECONDS", default_value_t = 60)]
    pub resync_seconds: u64,
    /// Longest a change waits to be batched with others, in milliseconds.
    #[arg(long, env = "CONSUL_SMI_BATCH_MILLIS", default_value_t = 20)]
    pub batch_millis: u64,
    /// Publish Kubernetes Events on SMI objects with diagnostics (needs `create` on events).
    #[arg(long, env = "CONSUL_SMI_KUBE_EVENTS", default_value_t = false)]
    pub kube_events: bool,
    /// Kubeconfig for Kubernetes Events; default: $KUBECONFIG, ~/.kube/config, or in-cluster.
    #[arg(long, env = "CONSUL_SMI_TRANSLATOR_KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Name this subscriber reports to the watcher.
    #[arg(long, env = "CONSUL_SMI_SUBSCRIBER", default_value = "smi-translator")]
    pub subscriber: String,
    /// mTLS for the gRPC server and for the connections to the watcher and the writer.
    #[command(flatten)]
    pub tls: consul_smi_grpc::tls::TlsArgs,
}

/// The translation options, as flags (with env fallbacks).
#[derive(Clone, Debug, clap::Args)]
pub struct TranslateArgs {
    /// Which Consul intention API the writer targets; decides whether L7 rules can be expressed.
    #[arg(
        long,
        env = "CONSUL_SMI_CONSUL_API",
        value_enum,
        default_value = "auto"
    )]
    pub consul_api: ConsulApiArg,
    /// On legacy Consul, turn L7-only grants into plain L4 allows (widens access; off by default).
    #[arg(long, env = "CONSUL_SMI_WIDEN_L7_ON_LEGACY", default_value_t = false)]
    pub widen_l7_on_legacy: bool,
    /// Map Kubernetes namespaces to Consul Enterprise namespaces (mirroring).
    #[arg(
        long,
        env = "CONSUL_SMI_ENTERPRISE_NAMESPACES",
        default_value_t = false
    )]
    pub enterprise_namespaces: bool,
    /// Prefix for mirrored Consul namespaces (Enterprise mode only).
    #[arg(long, env = "CONSUL_SMI_NAMESPACE_PREFIX")]
    pub namespace_prefix: Option<String>,
    /// Manage a `* -> *` deny intention (default deny), off by default.
    #[arg(long, env = "CONSUL_SMI_DEFAULT_DENY", default_value_t = false)]
    pub default_deny: bool,
}

impl TranslateArgs {
    /// The options to translate with; `auto` starts with the legacy API, whose output is valid
    /// on every Consul and withholds what it cannot express.
    pub fn options(&self) -> TranslateOptions {
        TranslateOptions {
            target: match self.consul_api {
                ConsulApiArg::Auto | ConsulApiArg::Legacy => ConsulApi::Legacy,
                ConsulApiArg::Modern => ConsulApi::Modern,
            },
            widen_l7_on_legacy: self.widen_l7_on_legacy,
            namespaces: if self.enterprise_namespaces {
                NamespaceMode::Enterprise {
                    mirroring_prefix: self.namespace_prefix.clone(),
                }
            } else {
                NamespaceMode::Oss
            },
            default_deny: self.default_deny,
        }
    }
}

/// The translator's state shared between the stream consumer, the writer link and the
/// diagnostics API. Only the stream consumer mutates the index.
pub type SharedIndex = Arc<RwLock<Index>>;

/// Runs the translator until `shutdown` resolves: the diagnostics/health gRPC server on
/// `listener`, the watcher subscription and the writer link.
pub async fn serve(
    config: TranslatorConfig,
    listener: TcpListener,
    metrics: consul_smi_telemetry::Metrics,
    readiness: consul_smi_telemetry::Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TranslatorError> {
    // One connector for both: the clones share one view of the files.
    let client_tls = config.tls.connector()?;
    let watcher = endpoint(&config.watcher, client_tls.as_ref())?;
    let writer = endpoint(&config.writer, client_tls.as_ref())?;
    let listen_addr = listener.local_addr().ok();
    let incoming = config.tls.incoming(listener)?;
    let index: SharedIndex = Arc::new(RwLock::new(Index::new(config.translate.options())));
    let invalid = diagnostics::InvalidObjects::default();

    // Bounded: a slow writer slows the stream consumer, which slows the watcher's stream.
    let (to_writer, from_pipeline) = mpsc::channel(64);
    // With `--consul-api auto` the link asks each writer it connects to which API its Consul
    // speaks; the stream consumer, the only one changing the index, re-translates.
    let (reported_api, consul_api_updates) = match config.translate.consul_api {
        ConsulApiArg::Auto => {
            let (sender, receiver) = tokio::sync::watch::channel(None);
            (Some(sender), Some(receiver))
        }
        _ => (None, None),
    };
    let link = writer_link::WriterLink::new(
        writer,
        index.clone(),
        Duration::from_secs(config.resync_seconds.max(1)),
        readiness.clone(),
        reported_api,
    );
    let link_task = tokio::spawn(link.run(from_pipeline));
    let events = match config.kube_events {
        true => {
            let client = kube_client(config.kubeconfig.as_deref()).await?;
            let (sender, receiver) = tokio::sync::watch::channel(Vec::new());
            tokio::spawn(events::run(client, receiver));
            Some(sender)
        }
        false => None,
    };
    let pipeline = pipeline::Pipeline {
        watcher,
        index: index.clone(),
        invalid: invalid.clone(),
        to_writer,
        subscriber: config.subscriber.clone(),
        batch_window: Duration::from_millis(config.batch_millis),
        events,
        stall: pipeline::Stall::register(&metrics),
        metrics,
        position: None,
        consul_api_updates,
        readiness,
    };
    let pipeline_task = tokio::spawn(pipeline.run());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<consul_smi_grpc::v1::translator_diagnostics_server::TranslatorDiagnosticsServer<DiagnosticsService>>()
        .await;
    let diagnostics = DiagnosticsService::new(index, invalid);
    info!(addr = ?listen_addr, watcher = %config.watcher, writer = %config.writer, "smi-translator serving");
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(diagnostics.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown);
    let (mut pipeline_task, mut link_task) = (pipeline_task, link_task);
    // Either task ending (a panic included) means Consul no longer follows SMI: exit, so the
    // process is restarted, instead of serving health as if all were well.
    let result = tokio::select! {
        result = server => result.map_err(TranslatorError::from),
        ended = &mut pipeline_task => Err(TranslatorError::TaskEnded { task: "watch stream consumer", detail: format!("{ended:?}") }),
        ended = &mut link_task => Err(TranslatorError::TaskEnded { task: "writer link", detail: format!("{ended:?}") }),
    };
    pipeline_task.abort();
    link_task.abort();
    result
}

async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<kube::Client, TranslatorError> {
    let error = |e: &dyn std::fmt::Display| TranslatorError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| error(&e))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| error(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| error(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| error(&e))
}

/// With TLS configured, `http://` addresses are dialled with TLS (the defaults and existing
/// manifests say `http://`); the server certificate must name the address's host. Every
/// (re)connection reads the current client certificate and CA, so cert-manager rotations need
/// no restart.
fn endpoint(
    addr: &str,
    tls: Option<&consul_smi_grpc::tls::TlsConnector>,
) -> Result<ClientEndpoint, TranslatorError> {
    Ok(
        ClientEndpoint::new(addr, tls.cloned())?.configure(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
        }),
    )
}

/// The wire form of a trace context as the telemetry crate takes it (the grpc crate stays
/// free of OpenTelemetry, so the conversion lives with its users).
pub(crate) fn trace_from_wire(
    trace: &consul_smi_grpc::v1::TraceContext,
) -> consul_smi_telemetry::TraceContext {
    consul_smi_telemetry::TraceContext {
        traceparent: trace.traceparent.clone(),
        tracestate: trace.tracestate.clone(),
    }
}

/// Jittered exponential backoff for reconnects: 100 ms doubling to 5 s, ±25 %.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jitter = rand::random_range(0.75..1.25);
    Duration::from_millis((base as f64 * jitter) as u64)
}
