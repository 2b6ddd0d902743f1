//! Real mTLS connections through `TlsArgs::incoming` and `TlsArgs::client_config`, with
//! certificates made by the `openssl` CLI (as the e2e harness does for the API server).

use std::path::{Path, PathBuf};
use std::process::Command;

use consul_smi_grpc::tls::TlsArgs;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
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

    // The client side as the services build it, from the same three flags.
    let client_args = TlsArgs {
        cert: Some(client.0.clone()),
        key: Some(client.1.clone()),
        ca: Some(pki.ca_a.0.clone()),
        allow_plaintext: false,
    };
    let tls = client_args
        .client_config()
        .unwrap()
        .expect("TLS configured");
    check(port, Some(tls)).await.expect("mTLS health check");
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
