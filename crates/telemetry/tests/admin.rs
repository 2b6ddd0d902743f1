//! The admin server over real TCP: /healthz, /readyz transitions, /metrics exposition.

use std::time::Duration;

use consul_smi_telemetry::{Metrics, Readiness, serve_admin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Response {
    status: u16,
    content_type: Option<String>,
    body: String,
}

async fn get(address: std::net::SocketAddr, path: &str) -> Response {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Response {
        status,
        content_type,
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_admin(
        listener,
        metrics.clone(),
        readiness.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    assert_eq!(get(address, "/healthz").await.status, 200);
    assert_eq!(
        get(address, "/readyz").await.status,
        503,
        "starts not ready"
    );
    readiness.set_ready();
    assert_eq!(get(address, "/readyz").await.status, 200);
    // Another task holds readiness off, whatever the flag's owner says, and is named.
    readiness.block("watch stream stuck");
    let blocked = get(address, "/readyz").await;
    assert_eq!(blocked.status, 503);
    assert_eq!(blocked.body, "not ready: watch stream stuck\n");
    readiness.set_ready();
    assert_eq!(get(address, "/readyz").await.status, 503);
    readiness.unblock("watch stream stuck");
    assert_eq!(get(address, "/readyz").await.status, 200);
    readiness.set_not_ready();
    assert_eq!(get(address, "/readyz").await.status, 503);

    let before = get(address, "/metrics").await;
    assert!(
        before
            .body
            .contains("consul_smi_propagation_latency_seconds_count 0"),
        "{}",
        before.body
    );
    metrics.observe_propagation_latency(Duration::from_millis(120));
    let after = get(address, "/metrics").await;
    assert_eq!(after.status, 200);
    assert_eq!(
        after.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    for line in [
        "consul_smi_propagation_latency_seconds_count 1",
        "consul_smi_propagation_latency_seconds_bucket{le=\"0.16\"} 1",
        "consul_smi_propagation_latency_seconds_bucket{le=\"0.08\"} 0",
    ] {
        assert!(
            after.body.contains(line),
            "missing {line:?} in\n{}",
            after.body
        );
    }
    assert_eq!(get(address, "/nope").await.status, 404);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("admin server stops on shutdown")
        .unwrap()
        .unwrap();
}
