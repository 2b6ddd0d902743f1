//! The CRD conversion webhook (`POST /convert`, ConversionReview v1) over HTTPS.
//!
//! The API server calls it whenever an object is read or written in a version other than the
//! one it is stored in; every conversion goes through the hub model
//! (`consul_smi_api::convert_review`). TLS is terminated here with rustls (ring, the provider
//! kube and tonic already use) because the API server only calls webhooks over HTTPS.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

/// Loads the PEM certificate chain and private key into a rustls server configuration.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, WatcherError> {
    let tls_error = |path: &Path, e: &dyn std::fmt::Display| WatcherError::Tls {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_error(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(cert, &e))?;
    if chain.is_empty() {
        return Err(tls_error(cert, &"no certificate in file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(cert, &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| tls_error(cert, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The webhook's routes, without TLS (for tests and for embedding).
pub fn router() -> Router {
    Router::new()
        .route("/convert", post(convert))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

async fn convert(axum::Json(review): axum::Json<Value>) -> axum::Json<Value> {
    let response = consul_smi_api::convert_review(&review);
    let failure = response
        .pointer("/response/result/message")
        .and_then(Value::as_str);
    match failure {
        Some(message) => {
            warn!(desired = ?review.pointer("/request/desiredAPIVersion"), message, "conversion failed")
        }
        None => debug!(desired = ?review.pointer("/request/desiredAPIVersion"), "converted"),
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
