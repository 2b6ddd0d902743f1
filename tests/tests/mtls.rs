//! The three services as processes talking gRPC over mutual TLS (`CONSUL_SMI_TLS_*`), with a
//! private CA made by the `openssl` CLI: the pipeline still converges, and a plaintext or
//! certificate-less client cannot reach the writer.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use consul_smi_e2e::env::{E2eEnv, LocalOptions, eventually};
use consul_smi_grpc::v1;

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// ca.pem, and tls.pem/tls-key.pem for 127.0.0.1 (server and client use) signed by it.
fn make_pki(dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
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
        "/CN=e2e-ca",
        "-keyout",
        &p("ca-key.pem"),
        "-out",
        &p("ca.pem"),
    ])?;
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=consul-smi",
        "-keyout",
        &p("tls-key.pem"),
        "-out",
        &p("tls.csr"),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("tls.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca-key.pem"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("leaf.ext"),
        "-out",
        &p("tls.pem"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_converges_over_mutual_tls_and_refuses_plaintext() -> Result<()> {
    let pki = tempfile::tempdir()?;
    make_pki(pki.path())?;
    let path = |name: &str| pki.path().join(name).display().to_string();
    let env = E2eEnv::start_with(LocalOptions {
        env: vec![
            ("CONSUL_SMI_TLS_CERT".into(), path("tls.pem")),
            ("CONSUL_SMI_TLS_KEY".into(), path("tls-key.pem")),
            ("CONSUL_SMI_TLS_CA".into(), path("ca.pem")),
        ],
        ..LocalOptions::default()
    })
    .await?;
    let pipeline = env
        .pipeline()
        .context("this test starts its own services (unset CONSUL_SMI_E2E_KUBECONFIG)")?;

    let s = format!("{:04x}", std::process::id() as u16);
    let (api, web) = (format!("api-{s}"), format!("web-{s}"));
    env.apply(&format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: mtls-{s}, namespace: default}}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: mtls-{s}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {api}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: mtls-{s}}}
  sources:
  - {{kind: ServiceAccount, name: {web}, namespace: default}}
"
    ))
    .await?;
    eventually(
        "web -> api allowed through watcher -> translator -> writer over mTLS",
        Duration::from_secs(30),
        || async { env.allowed(&web, &api).await },
    )
    .await?;

    // TranslatorDiagnostics.List is harmless and answers OK when served: the positive
    // control (CA + client certificate) must succeed, plaintext and certificate-less must not.
    let translator_addr = pipeline.translator_addr;
    let list = |tls: Option<tonic::transport::ClientTlsConfig>| async move {
        let endpoint = match tls {
            Some(tls) => {
                tonic::transport::Endpoint::from_shared(format!("https://{translator_addr}"))?
                    .tls_config(tls)?
            }
            None => tonic::transport::Endpoint::from_shared(format!("http://{translator_addr}"))?,
        };
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        v1::translator_diagnostics_client::TranslatorDiagnosticsClient::new(channel)
            .list(v1::ListDiagnosticsRequest::default())
            .await?;
        anyhow::Ok(())
    };
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(path("ca.pem"))?);
    let trusting = tonic::transport::ClientTlsConfig::new().ca_certificate(ca);
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(path("tls.pem"))?,
        std::fs::read(path("tls-key.pem"))?,
    );
    list(Some(trusting.clone().identity(identity)))
        .await
        .context("List with a client certificate from the CA")?;
    assert!(
        list(None).await.is_err(),
        "a plaintext List was served by the mTLS translator"
    );
    assert!(
        list(Some(trusting)).await.is_err(),
        "a List without a client certificate was served"
    );

    // The operator's CLI reaches the mTLS translator with the same three flags.
    let binary = consul_smi_e2e::services::consul_smi_binary()?;
    let object = format!("TrafficTarget/default/mtls-{s}");
    let diagnostics = |tls: bool| {
        let mut command = std::process::Command::new(&binary);
        command.args([
            "diagnostics",
            "--translator",
            &format!("http://{translator_addr}"),
        ]);
        if tls {
            command.args([
                "--tls-cert",
                &path("tls.pem"),
                "--tls-key",
                &path("tls-key.pem"),
                "--tls-ca",
                &path("ca.pem"),
            ]);
        }
        command.arg(&object).output()
    };
    let output = diagnostics(true)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(&object),
        "consul-smi diagnostics over mTLS: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !diagnostics(false)?.status.success(),
        "consul-smi diagnostics without certificates reached the mTLS translator"
    );
    Ok(())
}
