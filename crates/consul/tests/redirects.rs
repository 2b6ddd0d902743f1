//! Issue 23 finding 1: the client never follows a redirect. Consul answers `301` to a path
//! it cleaned (`..` segments), and a client that follows repeats the method, with the token,
//! on whatever endpoint the redirect names. A fake server stands in for Consul here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::any;
use consul_smi_consul::{Call, ConsulClient, ConsulConfig, ConsulError};

/// Answers every request under `/v1/config` with a 301 to `/v1/status/leader`, and counts
/// the requests that reach that target.
async fn redirecting_server() -> (String, Arc<AtomicU32>) {
    let followed = Arc::new(AtomicU32::new(0));
    let counter = followed.clone();
    let app = Router::new()
        .route(
            "/v1/config/{*rest}",
            any(|| async {
                let mut headers = HeaderMap::new();
                headers.insert(header::LOCATION, "/v1/status/leader".parse().unwrap());
                (
                    StatusCode::MOVED_PERMANENTLY,
                    headers,
                    "<a href=\"/v1/status/leader\">Moved Permanently</a> secret-from-elsewhere",
                )
                    .into_response()
            }),
        )
        .route(
            "/v1/status/leader",
            any(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    "\"127.0.0.1:8300 secret-from-elsewhere\""
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address.to_string(), followed)
}

#[tokio::test]
async fn a_301_is_an_error_that_is_not_followed_and_not_echoed() {
    let (address, followed) = redirecting_server().await;
    let mut config = ConsulConfig::for_address(address);
    config.token = Some("writer-token".into());
    let client = ConsulClient::new(&config).unwrap();
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let call = Call::new(method.clone(), "/v1/config/service-defaults/api", "probe");
        let error = client.send(call).await.expect_err("a 301 is an error");
        assert!(
            matches!(error, ConsulError::Refused { .. }),
            "{method}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("301"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "a redirect was followed"
    );
}
