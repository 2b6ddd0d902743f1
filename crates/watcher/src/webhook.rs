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
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use consul_smi_telemetry::escape_control;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::WatcherError;

/// What the webhook lets its callers hold. It answers without credentials (the API server
/// presents no client certificate), so every resource a connection can take is bounded: a
/// flood of it holds at most `max_connections` file descriptors, never the ones the gRPC and
/// admin listeners and the sources need.
#[derive(Clone, Debug)]
pub struct WebhookLimits {
    /// Open connections (TLS handshakes included); more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// From accepting the connection to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// To receive a request's headers; also how long an idle keep-alive connection stays.
    pub header_timeout: Duration,
    /// From the headers to the response: the body, the wait for a conversion slot, the
    /// conversion.
    pub request_timeout: Duration,
    /// Request body size.
    pub body_limit: usize,
    /// Conversions running at once, on the blocking pool; the rest wait (within their
    /// `request_timeout`). A conversion is CPU-bound (a 3 MiB review takes a while), and on
    /// the async workers it would stall every other task of the process, `/readyz` included.
    /// Small reviews (one object, what the API server sends for a watch event) have as many
    /// slots again of their own, so they never queue behind large ones.
    pub max_conversions: usize,
}

impl Default for WebhookLimits {
    fn default() -> Self {
        WebhookLimits {
            // The API server keeps a few connections per webhook; this is plenty of headroom.
            max_connections: 128,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            // The API server itself gives a conversion webhook 30 s at most.
            request_timeout: Duration::from_secs(30),
            // The API server's own request size limit: nothing legitimate is larger.
            body_limit: 3 * 1024 * 1024,
            max_conversions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// Distinct failure messages remembered for [`REPEAT_WARNING_AFTER`]: the message carries the
/// caller's `desiredAPIVersion`, so without a bound a caller sending a new value each time
/// would grow the map without end.
const MAX_REMEMBERED_FAILURES: usize = 256;
/// Reviews up to this size convert in their own lane (see [`WebhookLimits::max_conversions`]).
const SMALL_REVIEW: usize = 64 * 1024;
/// Longest failure message logged; the rest is cut.
const MAX_LOGGED_MESSAGE: usize = 512;

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

/// The webhook's routes with the default limits, without TLS (for tests and for embedding).
pub fn router() -> Router {
    router_with(&WebhookLimits::default())
}

struct WebhookState {
    failures: FailureLog,
    conversions: Semaphore,
    small_conversions: Semaphore,
}

fn router_with(limits: &WebhookLimits) -> Router {
    let state = Arc::new(WebhookState {
        failures: FailureLog::default(),
        conversions: Semaphore::new(limits.max_conversions.max(1)),
        small_conversions: Semaphore::new(limits.max_conversions.max(1)),
    });
    let request_timeout = limits.request_timeout;
    Router::new()
        .route("/convert", post(convert))
        .layer(DefaultBodyLimit::max(limits.body_limit))
        .with_state(state)
        // Outermost, so the body is read within the deadline too.
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| deadline(request_timeout, request, next),
        ))
}

async fn deadline(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long\n").into_response(),
    }
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
    /// True when `message` was not warned about within the last minute, and fewer than
    /// [`MAX_REMEMBERED_FAILURES`] other messages were.
    fn should_warn(&self, message: &str) -> bool {
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        last.retain(|_, at| now.duration_since(*at) < REPEAT_WARNING_AFTER);
        if last.contains_key(message) || last.len() >= MAX_REMEMBERED_FAILURES {
            return false;
        }
        last.insert(message.to_string(), now);
        true
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.last_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

async fn convert(State(state): State<Arc<WebhookState>>, body: Bytes) -> Response {
    let lane = match body.len() <= SMALL_REVIEW {
        true => &state.small_conversions,
        false => &state.conversions,
    };
    let Ok(_slot) = lane.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let converting = state.clone();
    let converted = tokio::task::spawn_blocking(move || convert_body(&converting, &body)).await;
    match converted {
        Ok(Ok(response)) => ([("content-type", "application/json")], response).into_response(),
        Ok(Err(rejection)) => (StatusCode::BAD_REQUEST, rejection).into_response(),
        Err(panicked) => {
            warn!(error = %panicked, "a conversion panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Parses, converts and serializes one review: all CPU-bound, so on the blocking pool.
fn convert_body(state: &WebhookState, body: &[u8]) -> Result<Vec<u8>, String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON ConversionReview: {e}"))?;
    let response = consul_smi_api::convert_review(&review);
    let desired = review
        .pointer("/request/desiredAPIVersion")
        .and_then(Value::as_str)
        .map(|d| escape_control(cut(d, MAX_LOGGED_MESSAGE)).into_owned());
    match response
        .pointer("/response/result/message")
        .and_then(Value::as_str)
    {
        Some(message) => {
            let message = escape_control(cut(message, MAX_LOGGED_MESSAGE));
            if state.failures.should_warn(&message) {
                warn!(
                    ?desired,
                    %message,
                    "conversion failed (identical failures are logged at debug for a minute)"
                )
            } else {
                debug!(?desired, %message, "conversion failed")
            }
        }
        None => debug!(?desired, "converted"),
    }
    serde_json::to_vec(&response).map_err(|e| format!("cannot serialize the response: {e}"))
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Serves `/convert` over HTTPS on `listener` with the default limits until `shutdown`.
pub async fn serve_conversion_webhook(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatcherError> {
    serve_conversion_webhook_with(listener, tls, WebhookLimits::default(), shutdown).await
}

/// Serves `/convert` over HTTPS on `listener` within `limits` until `shutdown` completes.
pub async fn serve_conversion_webhook_with(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    limits: WebhookLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatcherError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let app = router_with(&limits);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    info!(addr = ?listener.local_addr().ok(), ?limits, "conversion webhook listening");
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, new connections wait in the kernel's queue, holding none
        // of this process's file descriptors.
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return Ok(()),
            },
            _ = &mut shutdown => return Ok(()),
        };
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
        let limits = limits.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "webhook TLS handshake failed"),
                Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
            };
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // Bounds the headers one request may send (hyper's minimum is 8 KiB).
                .max_buf_size(64 * 1024)
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

    /// Issue 24, finding 12: the webhook logged the caller's `desiredAPIVersion` raw, so
    /// anyone who could reach it could forge log lines.
    #[test]
    fn caller_text_cannot_forge_log_lines() {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let state = WebhookState {
            failures: FailureLog::default(),
            conversions: Semaphore::new(1),
            small_conversions: Semaphore::new(1),
        };
        let forged = "v9\n2026-12-04T00:00:00Z  INFO consul_smi_writer: forged\u{1b}[2J";
        let review = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
            "request": {"uid": "u", "desiredAPIVersion": forged, "objects": [
                {"apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
                 "metadata": {"name": "t", "namespace": "default"}, "spec": {}}]}
        });
        let body = serde_json::to_vec(&review).unwrap();
        tracing::subscriber::with_default(subscriber, || convert_body(&state, &body)).unwrap();
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("conversion failed"), "{logged}");
        assert!(
            logged
                .lines()
                .all(|l| !l.contains("INFO consul_smi_writer") || l.contains("WARN")),
            "a forged line: {logged}"
        );
        assert!(!logged.contains('\u{1b}'), "{logged}");
    }

    /// Issue 24, finding 8: the failure log was keyed on the caller's `desiredAPIVersion`
    /// and grew without bound (1.8 GB in 50 s).
    #[test]
    fn the_failure_log_stays_bounded_whatever_callers_send() {
        let state = WebhookState {
            failures: FailureLog::default(),
            conversions: Semaphore::new(1),
            small_conversions: Semaphore::new(1),
        };
        for i in 0..10_000 {
            let review = serde_json::json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
                "request": {
                    "uid": "u", "desiredAPIVersion": format!("access.smi-spec.io/v{i}{}", "x".repeat(2000)),
                    "objects": [{"apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
                                 "metadata": {"name": "t", "namespace": "default"}, "spec": {}}]
                }
            });
            let body = serde_json::to_vec(&review).unwrap();
            let response: Value =
                serde_json::from_slice(&convert_body(&state, &body).unwrap()).unwrap();
            assert_eq!(response["response"]["result"]["status"], "Failure");
        }
        assert_eq!(state.failures.remembered(), MAX_REMEMBERED_FAILURES);
        let remembered = state.failures.last_warned.lock().unwrap();
        assert!(remembered.keys().all(|k| k.len() <= 4 * MAX_LOGGED_MESSAGE));
    }
}
