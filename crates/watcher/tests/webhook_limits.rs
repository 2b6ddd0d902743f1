//! The conversion webhook under a flood of stalled connections (issue 24, finding 8): it is
//! reachable without credentials, so connections are capped, every stage of a connection has
//! a deadline, and a legitimate review is still answered.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use consul_smi_watcher::webhook::{self, WebhookLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for 127.0.0.1 (made by the `openssl` CLI, as the e2e harness
/// does): `(cert, key)` paths in `dir`.
fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=webhook"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

fn connector(cert: &Path) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).unwrap();
    for der in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(der.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls(connector: &TlsConnector, addr: std::net::SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    connector.connect(name, tcp).await.unwrap()
}

const REVIEW: &str = r#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{"uid":"u1","desiredAPIVersion":"specs.smi-spec.io/v1alpha4","objects":[{"apiVersion":"specs.smi-spec.io/v1alpha4","kind":"TCPRoute","metadata":{"name":"db","namespace":"default"},"spec":{"matches":{"ports":[5432]}}}]}}"#;

fn post(body_length: usize) -> String {
    format!(
        "POST /convert HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n\
         Content-Length: {body_length}\r\nConnection: close\r\n\r\n"
    )
}

/// Reads until the server closes the connection (EOF or an error), or `deadline` passes.
async fn closed_by_server<S: AsyncReadExt + Unpin>(stream: &mut S, deadline: Duration) -> bool {
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(deadline, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_capped_and_closed_and_a_review_is_still_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = WebhookLimits {
        max_connections: 8,
        handshake_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..WebhookLimits::default()
    };
    let tls_config = webhook::tls_config(&cert, &key).unwrap();
    tokio::spawn(webhook::serve_conversion_webhook_with(
        listener,
        tls_config,
        limits,
        std::future::pending(),
    ));
    let connector = connector(&cert);

    // 24 clients at once that complete the TLS handshake, then stall in three ways.
    let start = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for i in 0..24 {
        let connector = connector.clone();
        clients.push(tokio::spawn(async move {
            let mut stream = tls(&connector, addr).await;
            let handshake_done = tokio::time::Instant::now();
            match i % 3 {
                // Idle: never sends a request.
                0 => {}
                // Half the headers.
                1 => stream
                    .write_all(b"POST /convert HTTP/1.1\r\nHost: w")
                    .await
                    .unwrap(),
                // Headers announcing 3 MB, then a trickle of the body.
                _ => {
                    stream.write_all(post(3_000_000).as_bytes()).await.unwrap();
                    stream.write_all(&[b' '; 1024]).await.unwrap();
                }
            }
            let closed = closed_by_server(&mut stream, Duration::from_secs(60)).await;
            (handshake_done, closed)
        }));
    }
    // And 16 that never start TLS.
    let mut raw = Vec::new();
    for _ in 0..16 {
        raw.push(TcpStream::connect(addr).await.unwrap());
    }

    // A legitimate review is answered meanwhile (once slots free up).
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut stream = tls(&connector, addr).await;
        stream
            .write_all(post(REVIEW.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(REVIEW.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    })
    .await
    .expect("the review is answered despite the flood");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(answered.contains("\"Success\""), "{answered}");

    let mut early = 0;
    for client in clients {
        let (handshake_done, closed) = client.await.unwrap();
        assert!(closed, "every stalled connection is closed by the server");
        // The server closes nothing sooner than a timeout (1 s) after accepting it, so no
        // slot frees before then: only the first 8 can have finished their handshake.
        if handshake_done < start + Duration::from_secs(1) {
            early += 1;
        }
    }
    assert!(
        early <= 8,
        "{early} connections were accepted at once, the cap is 8"
    );
    for mut stream in raw {
        assert!(
            closed_by_server(&mut stream, Duration::from_secs(60)).await,
            "a connection that never starts TLS is closed"
        );
    }
}

/// A ConversionReview of about `bytes` of TrafficTargets to convert to v1alpha2.
fn heavy_review(bytes: usize) -> String {
    let object = r#"{"apiVersion":"access.smi-spec.io/v1alpha3","kind":"TrafficTarget","metadata":{"name":"t","namespace":"default"},"spec":{"destination":{"kind":"ServiceAccount","name":"api","namespace":"default"},"rules":[{"kind":"TCPRoute","name":"r"}],"sources":[{"kind":"ServiceAccount","name":"web","namespace":"default"}]}}"#;
    let objects = vec![object; bytes / object.len()].join(",");
    format!(
        r#"{{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{{"uid":"h","desiredAPIVersion":"access.smi-spec.io/v1alpha2","objects":[{objects}]}}}}"#
    )
}

/// Issue 24, finding 9 (figures, not assertions): a small review's latency while 16 reviews
/// of 3 MB convert. Run with `cargo test -p consul-smi-watcher --test webhook_limits -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; CPU-heavy"]
async fn small_reviews_stay_fast_while_large_ones_convert() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls_config = webhook::tls_config(&cert, &key).unwrap();
    tokio::spawn(webhook::serve_conversion_webhook(
        listener,
        tls_config,
        std::future::pending(),
    ));
    let connector = connector(&cert);
    let heavy = Arc::new(heavy_review(3_000_000));
    let started = tokio::time::Instant::now();
    let mut large = Vec::new();
    for _ in 0..16 {
        let (connector, heavy) = (connector.clone(), heavy.clone());
        large.push(tokio::spawn(async move {
            let mut stream = tls(&connector, addr).await;
            stream
                .write_all(post(heavy.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(heavy.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            assert!(response.starts_with(b"HTTP/1.1 200"));
        }));
    }
    let mut small = Vec::new();
    for _ in 0..20 {
        let at = tokio::time::Instant::now();
        let mut stream = tls(&connector, addr).await;
        stream
            .write_all(post(REVIEW.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(REVIEW.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.contains("\"Success\""), "{response}");
        small.push(at.elapsed());
    }
    for task in large {
        task.await.unwrap();
    }
    small.sort();
    println!(
        "16 x 3 MB reviews converted in {:?}; 20 small reviews meanwhile: median {:?}, max {:?}",
        started.elapsed(),
        small[small.len() / 2],
        small[small.len() - 1]
    );
}
