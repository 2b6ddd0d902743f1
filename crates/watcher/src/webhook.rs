//! The CRD conversion webhook (`POST /convert`, ConversionReview v1) over HTTPS.
//!
//! The API server calls it whenever an object is read or written in a version other than the
//! one it is stored in; every conversion goes through the hub model
//! (`consul_smi_api::convert_review`). TLS is terminated here with rustls (ring, the provider
//! kube and tonic already use) because the API server only calls webhooks over HTTPS.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::WatcherError;

/// The API server sends one ConversionReview per object or per list page; 3 MiB is the API
/// server's own request size limit, so nothing legitimate is larger.
const BODY_LIMIT: usize = 3 * 1024 * 1024;
/// A client that opens a connection and never finishes the handshake must not hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A rustls server configuration serving the PEM certificate chain and key at these paths.
/// The files are re-read when they change (cert-manager renews the Secret, the kubelet swaps
/// the mounted files): without that, the webhook would keep presenting an expired
/// certificate and every read of a non-storage version would fail.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, WatcherError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The same reloading resolver the services' gRPC servers use.
    let resolver = consul_smi_grpc::tls::ReloadingCertificate::load(cert, key, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WatcherError::Tls {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The webhook's routes, without TLS (for tests and for embedding).
pub fn router() -> Router {
    Router::new()
        .route("/convert", post(convert))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(Arc::new(FailureLog::default()))
}

/// The API server keeps a watch cache per served version and retries a failed conversion
/// about ten times a second, forever: one object that cannot be expressed in an old version
/// would otherwise print dozens of identical warnings per second.
#[derive(Default)]
struct FailureLog {
    last_warned: Mutex<HashMap<String, Instant>>,
}

const REPEAT_WARNING_AFTER: Duration = Duration::from_secs(60);

impl FailureLog {
    /// True when `message` was not warned about within the last minute.
    fn should_warn(&self, message: &str) -> bool {
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        last.retain(|_, at| now.duration_since(*at) < REPEAT_WARNING_AFTER);
        if last.contains_key(message) {
            return false;
        }
        last.insert(message.to_string(), now);
        true
    }
}

async fn convert(
    State(failures): State<Arc<FailureLog>>,
    axum::Json(review): axum::Json<Value>,
) -> axum::Json<Value> {
    let response = consul_smi_api::convert_review(&review);
    let desired = review.pointer("/request/desiredAPIVersion");
    match response
        .pointer("/response/result/message")
        .and_then(Value::as_str)
    {
        Some(message) if failures.should_warn(message) => warn!(
            ?desired,
            message, "conversion failed (identical failures are logged at debug for a minute)"
        ),
        Some(message) => debug!(?desired, message, "conversion failed"),
        None => debug!(?desired, "converted"),
    }
    axum::Json(response)
}

/// Serves `/convert` over HTTPS on `listener` until `shutdown` completes.
pub async fn serve_conversion_webhook(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatcherError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = router();
    info!(addr = ?listener.local_addr().ok(), "conversion webhook listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    warn!(error = %e, "accepting a webhook connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "webhook TLS handshake failed"),
                Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
            };
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_failures_warn_once_per_minute() {
        let log = FailureLog::default();
        assert!(log.should_warn("converting to v1alpha3: x"));
        assert!(!log.should_warn("converting to v1alpha3: x"));
        assert!(log.should_warn("converting to v1alpha2: x"));
    }
}
