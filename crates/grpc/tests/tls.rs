//! Real mTLS connections through `TlsArgs::incoming` and `ClientEndpoint` (the reloading
//! client connector), with certificates made by the `openssl` CLI (as the e2e harness does
//! for the API server); rotations replace the files as the kubelet does, with no restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use consul_smi_grpc::tls::{ClientEndpoint, TlsArgs};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A self-signed CA `<name>.pem`/`<name>-key.pem` in `dir`.
fn ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&cert),
    ]);
    (cert, key)
}

/// A leaf certificate for `localhost` signed by `ca`, usable as server and client certificate.
fn leaf(dir: &Path, name: &str, ca: &(PathBuf, PathBuf)) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        path_str(&csr),
        "-CA",
        path_str(&ca.0),
        "-CAkey",
        path_str(&ca.1),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        path_str(&ext),
        "-out",
        path_str(&cert),
    ]);
    (cert, key)
}

struct Pki {
    dir: tempfile::TempDir,
    ca_a: (PathBuf, PathBuf),
    ca_b: (PathBuf, PathBuf),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_a = ca(dir.path(), "ca-a");
        let ca_b = ca(dir.path(), "ca-b");
        Pki { dir, ca_a, ca_b }
    }

    fn leaf(&self, name: &str, from_b: bool) -> (PathBuf, PathBuf) {
        leaf(
            self.dir.path(),
            name,
            if from_b { &self.ca_b } else { &self.ca_a },
        )
    }
}

/// A grpc.health.v1 server on a loopback port using `args`; returns its port.
async fn serve(args: &TlsArgs) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = args.incoming(listener).expect("server TLS config");
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    port
}

/// A health server on `port` that stops (closing its connections) when the sender is dropped
/// or sent to; binding is retried while the previous server on the port releases it.
async fn serve_on(
    args: &TlsArgs,
    port: u16,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => break listener,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("rebinding port {port}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind port {port} again: {e}"),
        }
    };
    let incoming = args.incoming(listener).expect("server TLS config");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("health server");
    });
    (stop, server)
}

/// A health check through a fresh channel of `endpoint` (so a fresh TLS handshake).
async fn check_endpoint(endpoint: &ClientEndpoint) -> Result<(), String> {
    let channel = endpoint
        .clone()
        .configure(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2))
        })
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    check_channel(channel).await
}

async fn check_channel(channel: Channel) -> Result<(), String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("check: {e}"))
}

/// A client endpoint as the translator builds one, from the three flags.
fn client_endpoint(address: &str, cert: &(PathBuf, PathBuf), ca: &Path) -> ClientEndpoint {
    let args = TlsArgs {
        cert: Some(cert.0.clone()),
        key: Some(cert.1.clone()),
        ca: Some(ca.to_path_buf()),
        allow_plaintext: false,
    };
    let connector = args.connector().unwrap().expect("TLS configured");
    ClientEndpoint::new(address, Some(connector)).unwrap()
}

/// Replaces `path` as the kubelet does (a new file swapped in), with a later mtime so that no
/// filesystem timestamp granularity can hide the change.
fn replace(path: &Path, contents: &[u8]) {
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    let previous = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let later = previous
        .map(|t| t + Duration::from_secs(1))
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .max(SystemTime::now());
    std::fs::File::options()
        .write(true)
        .open(&new)
        .unwrap()
        .set_modified(later)
        .unwrap();
    std::fs::rename(&new, path).unwrap();
}

fn replace_with(path: &Path, sources: &[&Path]) {
    let contents: Vec<u8> = sources
        .iter()
        .flat_map(|s| std::fs::read(s).unwrap())
        .collect();
    replace(path, &contents);
}

async fn check(port: u16, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?,
        None => Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap(),
    };
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("check: {e}"))
}

fn client_tls(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> ClientTlsConfig {
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        )),
        None => tls,
    }
}

fn server_args(pki: &Pki, server: &(PathBuf, PathBuf)) -> TlsArgs {
    TlsArgs {
        cert: Some(server.0.clone()),
        key: Some(server.1.clone()),
        ca: Some(pki.ca_a.0.clone()),
        allow_plaintext: false,
    }
}

#[tokio::test]
async fn mutual_tls_accepts_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = pki.leaf("server", false);
    let client = pki.leaf("client", false);
    let port = serve(&server_args(&pki, &server)).await;

    // `http://` is dialled with TLS; the server name may be a DNS name or an IP address.
    for address in [
        format!("http://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        check_endpoint(&client_endpoint(&address, &client, &pki.ca_a.0))
            .await
            .unwrap_or_else(|e| panic!("mTLS health check via {address}: {e}"));
    }
    // The server's name is verified: the leaf names localhost and 127.0.0.1 only.
    assert!(
        check_endpoint(&client_endpoint(
            &format!("https://127.0.0.2:{port}"),
            &client,
            &pki.ca_a.0
        ))
        .await
        .is_err(),
        "a server certificate not naming the address was accepted"
    );
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused() {
    let pki = Pki::new();
    let server = pki.leaf("server", false);
    let foreign = pki.leaf("foreign-client", true);
    let port = serve(&server_args(&pki, &server)).await;

    let no_cert = check(port, Some(client_tls(&pki.ca_a.0, None))).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served"
    );
    let other_ca = check(port, Some(client_tls(&pki.ca_a.0, Some(&foreign)))).await;
    assert!(
        other_ca.is_err(),
        "a client certificate from another CA was accepted"
    );
    let plaintext = check(port, None).await;
    assert!(
        plaintext.is_err(),
        "a plaintext client was served by a TLS server"
    );
}

#[tokio::test]
async fn a_rotated_server_certificate_is_presented_without_a_restart() {
    let pki = Pki::new();
    let server = pki.leaf("server", false);
    let client = pki.leaf("client", false);
    let port = serve(&server_args(&pki, &server)).await;
    let trusts_b = || client_tls(&pki.ca_b.0, Some(&client));
    assert!(
        check(port, Some(trusts_b())).await.is_err(),
        "server cert is from CA A"
    );

    // Rotation: the same paths now hold a certificate from CA B (cert-manager swapping the
    // mounted Secret); a client trusting only CA B now verifies the server.
    let rotated = pki.leaf("rotated", true);
    std::fs::copy(&rotated.1, &server.1).unwrap();
    std::fs::copy(&rotated.0, &server.0).unwrap();
    check(port, Some(trusts_b()))
        .await
        .expect("the new certificate is presented");
    assert!(
        check(port, Some(client_tls(&pki.ca_a.0, Some(&client))))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn plaintext_from_loopback_is_served_without_tls() {
    let port = serve(&TlsArgs::default()).await;
    check(port, None).await.expect("loopback plaintext");
}

/// cert-manager moving every service from CA A to CA B: first the CA bundles hold both and the
/// client certificate is reissued by B, then the server certificate is reissued by B and A is
/// retired. Neither side restarts; every check is a new connection.
#[tokio::test]
async fn rotating_to_a_new_ca_needs_no_restart() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let (ca_a, ca_b) = (pki.ca_a.0.as_path(), pki.ca_b.0.as_path());
    let server = pki.leaf("server", false);
    let server_ca = dir.join("server-ca.pem");
    replace_with(&server_ca, &[ca_a]);
    let port = serve(&TlsArgs {
        cert: Some(server.0.clone()),
        key: Some(server.1.clone()),
        ca: Some(server_ca.clone()),
        allow_plaintext: false,
    })
    .await;
    let address = format!("http://localhost:{port}");

    // The rotating client, and one whose certificate stays the first one from A (it trusts
    // both CAs, so only the server can refuse it).
    let client = pki.leaf("client", false);
    let client_ca = dir.join("client-ca.pem");
    replace_with(&client_ca, &[ca_a]);
    let rotating = client_endpoint(&address, &client, &client_ca);
    let stale_files = pki.leaf("stale-client", false);
    let stale_ca = dir.join("stale-ca.pem");
    replace_with(&stale_ca, &[ca_a, ca_b]);
    let stale = client_endpoint(&address, &stale_files, &stale_ca);
    check_endpoint(&rotating)
        .await
        .expect("before the rotation");
    check_endpoint(&stale)
        .await
        .expect("stale client before the rotation");

    // Transition: both CAs trusted everywhere, the client certificate reissued by B.
    replace_with(&server_ca, &[ca_a, ca_b]);
    replace_with(&client_ca, &[ca_a, ca_b]);
    let client_b = pki.leaf("client-b", true);
    replace(&client.1, &std::fs::read(&client_b.1).unwrap());
    replace(&client.0, &std::fs::read(&client_b.0).unwrap());
    check_endpoint(&rotating)
        .await
        .expect("the client certificate from B is accepted during the transition");
    check_endpoint(&stale)
        .await
        .expect("a certificate from A is still accepted during the transition");

    // A retired: the server certificate reissued by B, both CA files hold B only.
    let server_b = pki.leaf("server-b", true);
    replace(&server.1, &std::fs::read(&server_b.1).unwrap());
    replace(&server.0, &std::fs::read(&server_b.0).unwrap());
    replace_with(&server_ca, &[ca_b]);
    replace_with(&client_ca, &[ca_b]);
    // Succeeds only if the client presents its certificate from B (the server trusts only B)
    // and verifies the server against B (the server's certificate is from B).
    check_endpoint(&rotating)
        .await
        .expect("the rotated client reaches the rotated server");
    assert!(
        check_endpoint(&stale).await.is_err(),
        "a client certificate from the retired CA was accepted"
    );
}

/// A channel made before a rotation (as the translator keeps one per connection attempt, and
/// tonic reconnects it in place) presents the new client certificate when it reconnects.
#[tokio::test]
async fn a_reconnecting_channel_presents_the_rotated_client_certificate() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let server = pki.leaf("server", false);
    let server_ca = dir.join("server-ca.pem");
    replace_with(&server_ca, &[&pki.ca_a.0]);
    let server_args = TlsArgs {
        cert: Some(server.0.clone()),
        key: Some(server.1.clone()),
        ca: Some(server_ca.clone()),
        allow_plaintext: false,
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (stop, stopped) = serve_on(&server_args, port).await;
    let address = format!("http://localhost:{port}");

    let client = pki.leaf("client", false);
    let endpoint = client_endpoint(&address, &client, &pki.ca_a.0).configure(|e| {
        e.connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
    });
    let channel = endpoint.connect().await.expect("first connection");
    check_channel(channel.clone())
        .await
        .expect("before the rotation");
    let stale_files = pki.leaf("stale-client", false);

    // The client certificate is reissued by B and the server trusts only B from now on; the
    // established connection was authenticated before and stays.
    let client_b = pki.leaf("client-b", true);
    replace(&client.1, &std::fs::read(&client_b.1).unwrap());
    replace(&client.0, &std::fs::read(&client_b.0).unwrap());
    replace_with(&server_ca, &[&pki.ca_b.0]);
    check_channel(channel.clone())
        .await
        .expect("the established connection is not cut by a rotation");

    // The server goes away and comes back: the same channel reconnects.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("server stops")
        .unwrap();
    let (_stop, _server) = serve_on(&server_args, port).await;
    let stale = client_endpoint(&address, &stale_files, &pki.ca_a.0);
    assert!(
        check_endpoint(&stale).await.is_err(),
        "the restarted server accepted a certificate from A"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match check_channel(channel.clone()).await {
            Ok(()) => break,
            // The first call may still see the closed connection.
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("reconnecting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the channel did not reconnect with the certificate from B: {e}"),
        }
    }
}

/// A CA file caught mid-write (or emptied) must not lock every client out.
#[tokio::test]
async fn an_unreadable_ca_file_keeps_the_previous_ca() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let server = pki.leaf("server", false);
    let server_ca = dir.join("server-ca.pem");
    replace_with(&server_ca, &[&pki.ca_a.0]);
    let port = serve(&TlsArgs {
        cert: Some(server.0.clone()),
        key: Some(server.1.clone()),
        ca: Some(server_ca.clone()),
        allow_plaintext: false,
    })
    .await;
    let client = client_endpoint(
        &format!("http://localhost:{port}"),
        &pki.leaf("client", false),
        &pki.ca_a.0,
    );
    check_endpoint(&client).await.expect("before");

    let ca_pem = std::fs::read(&pki.ca_a.0).unwrap();
    replace(&server_ca, &ca_pem[..ca_pem.len() / 2]);
    check_endpoint(&client)
        .await
        .expect("a truncated CA file keeps the previous CA");
    replace(&server_ca, b"");
    check_endpoint(&client)
        .await
        .expect("an empty CA file keeps the previous CA");
    replace_with(&server_ca, &[&pki.ca_b.0]);
    assert!(
        check_endpoint(&client).await.is_err(),
        "the complete new CA file was not taken"
    );
}
