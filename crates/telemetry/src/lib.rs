//! Telemetry shared by the consul-smi services: one place owns the `tracing` subscriber
//! (logs + optional OTLP trace export), W3C trace-context propagation across the
//! per-message `TraceContext` on the wire, Prometheus metrics and the admin HTTP server.
//!
//! A service's `main`:
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let telemetry = consul_smi_telemetry::init("smi-watcher")?;
//! let metrics = consul_smi_telemetry::Metrics::new();
//! let readiness = consul_smi_telemetry::Readiness::new();
//! let admin = tokio::net::TcpListener::bind("0.0.0.0:9090").await?;
//! tokio::spawn(consul_smi_telemetry::serve_admin(
//!     admin, metrics.clone(), readiness.clone(), std::future::pending(),
//! ));
//! // ... start the service, then `readiness.set_ready()` ...
//! telemetry.shutdown().await?;
//! # Ok(()) }
//! ```

mod admin;
mod escape;
mod metrics;
mod propagation;
mod subscriber;
#[cfg(feature = "testing")]
pub mod testing;

pub use admin::{Readiness, admin_router, serve_admin};
pub use escape::escape_control;
pub use metrics::{ConsulOutcome, Metrics};
pub use propagation::{
    TraceContext, add_link, current_context, current_trace_id, inject_http_headers, set_parent,
    span_context,
};
pub use subscriber::{LogFormat, OtlpConfig, TelemetryConfig, TelemetryGuard, build, init};

/// Why telemetry could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?} (from RUST_LOG): {source}")]
    InvalidLogFilter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("invalid {variable}={value:?}: expected {expected}")]
    InvalidEnv {
        variable: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "the OTLP exporter for {endpoint} needs a Tokio runtime: call telemetry init inside the runtime (e.g. in #[tokio::main])"
    )]
    NoTokioRuntime { endpoint: String },
    #[error("building the OTLP trace exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error(
        "a global tracing subscriber is already installed: telemetry init runs once per process"
    )]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
    #[error("flushing or shutting down the trace exporter: {0}")]
    Export(#[from] opentelemetry_sdk::error::OTelSdkError),
}
