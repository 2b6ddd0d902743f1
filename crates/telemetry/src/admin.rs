//! The admin HTTP port every service exposes: `/metrics`, `/healthz`, `/readyz`.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Metrics;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the service can do its job yet (e.g. the watcher finished its first snapshot,
/// the writer reached Consul). Clones share one state. Starts not ready.
///
/// One task owns the flag (`set_ready`/`set_not_ready`); other tasks that can stop the
/// service from doing its job hold it off with `block`, each under its own reason, without
/// racing the owner's updates.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<ReadinessState>);

#[derive(Debug, Default)]
struct ReadinessState {
    ready: AtomicBool,
    blocked: Mutex<BTreeSet<&'static str>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::Release);
    }

    /// E.g. while a lost upstream stream reconnects, so Kubernetes stops routing to us.
    pub fn set_not_ready(&self) {
        self.0.ready.store(false, Ordering::Release);
    }

    /// Not ready because of `reason` until [`Readiness::unblock`] with the same reason,
    /// whatever the flag says (e.g. the translator's watch stream cannot make progress while
    /// its writer link, which owns the flag, still delivers).
    pub fn block(&self, reason: &'static str) {
        self.blocked().insert(reason);
    }

    pub fn unblock(&self, reason: &'static str) {
        self.blocked().remove(reason);
    }

    /// The reasons the service is currently held not ready by [`Readiness::block`].
    pub fn blocked_by(&self) -> Vec<&'static str> {
        self.blocked().iter().copied().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire) && self.blocked().is_empty()
    }

    fn blocked(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        // A set of static strings cannot be left half-updated.
        self.0
            .blocked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The admin routes, for callers that want to mount them on their own server.
pub fn admin_router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz_handler))
        .with_state(AdminState { metrics, readiness })
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, admin_router(metrics, readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
}

async fn readyz_handler(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let blocked = state.readiness.blocked_by();
        let body = match blocked.is_empty() {
            true => "not ready\n".to_string(),
            false => format!("not ready: {}\n", blocked.join(", ")),
        };
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
