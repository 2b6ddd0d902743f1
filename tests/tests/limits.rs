//! Limits at the edges (issue 24), with the three services as processes on a manifest
//! directory and the config-entry API double of `crates/consul/tests/double` as Consul.

#[path = "../../crates/consul/tests/double/mod.rs"]
mod double;

use std::time::Duration;

use anyhow::{Context, Result};
use consul_smi_e2e::env::eventually;
use consul_smi_e2e::services::{Pipeline, PipelineOptions, Source, free_addr};
use consul_smi_grpc::v1;
use double::ModernConsul;

const CONVERGE: Duration = Duration::from_secs(60);

fn tcp_target(source: &str) -> String {
    format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: {source}-tcp, namespace: default}}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {source}-to-api, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: api, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: {source}-tcp}}
  sources:
  - {{kind: ServiceAccount, name: {source}, namespace: default}}
"
    )
}

/// Whether the `api` service-intentions entry allows `name`.
fn allows(double: &ModernConsul, name: &str) -> bool {
    double
        .entry("service-intentions", "api")
        .and_then(|entry| entry.get("Sources")?.as_array().cloned())
        .is_some_and(|sources| sources.iter().any(|s| s["Name"] == name))
}

/// Waits until the watcher has published an event about the object named `name` (read with
/// no message limit, so this works whatever the services' limits are).
async fn watcher_published(pipeline: &Pipeline, name: &str) -> Result<()> {
    let mut client =
        v1::smi_watch_client::SmiWatchClient::connect(format!("http://{}", pipeline.watcher_addr))
            .await?
            .max_decoding_message_size(usize::MAX);
    let mut stream = client
        .watch(v1::WatchRequest::default())
        .await?
        .into_inner();
    let names = |event: &v1::watch_event::Event| -> Option<String> {
        use v1::watch_event::Event;
        match event {
            Event::Applied(a) => consul_smi_grpc::smi::wire_object_identity(a.object.as_ref()?)
                .map(|(object, _)| object.name),
            Event::Invalid(i) => i.object.as_ref().map(|o| o.name.clone()),
            _ => None,
        }
    };
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while let Some(event) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .context("the watcher never published the object")??
    {
        if event.event.as_ref().and_then(names).as_deref() == Some(name) {
            return Ok(());
        }
    }
    anyhow::bail!("the watcher closed its stream")
}

/// Issue 24, finding 7: one object with a 20 MB label used to stop the translator's stream
/// for good (every resume replayed it), so a later revocation never reached Consul while
/// `/readyz` stayed 200. Now the object is invalid at decode, named in diagnostics, and
/// everything after it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_object_is_reported_and_later_revocations_still_reach_consul() -> Result<()> {
    consul_smi_consul::install_crypto_provider();
    let double = ModernConsul::start().await;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("web.yaml"), tcp_target("web"))?;
    std::fs::write(dir.path().join("batch.yaml"), tcp_target("batch"))?;
    let admin = free_addr()?;
    let mut options = PipelineOptions::new(
        Source::Dir(dir.path().to_path_buf()),
        double.address.clone(),
    );
    options.translator_args = vec!["--admin-listen".into(), admin.to_string()];
    let pipeline = Pipeline::start(options).await?;
    eventually("web and batch allowed", CONVERGE, || async {
        Ok(allows(&double, "web") && allows(&double, "batch"))
    })
    .await?;

    let huge = format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata:
  name: huge
  namespace: default
  labels:
    big: {}
spec:
  matches:
    ports: []
",
        // Over the 1.5 MiB object limit, under the directory source's 4 MiB file limit (a
        // larger file is refused by path before decoding; the Kubernetes source has etcd's).
        "x".repeat(3 << 20)
    );
    std::fs::write(dir.path().join("huge.yaml"), huge)?;
    watcher_published(&pipeline, "huge").await?;
    // The revocation comes after the oversized object in the stream.
    std::fs::remove_file(dir.path().join("batch.yaml"))?;
    eventually("batch revoked", CONVERGE, || async {
        Ok(!allows(&double, "batch"))
    })
    .await?;
    assert!(allows(&double, "web"), "only the revoked grant went");

    let mut client = v1::translator_diagnostics_client::TranslatorDiagnosticsClient::connect(
        format!("http://{}", pipeline.translator_addr),
    )
    .await?;
    let listed = client
        .list(v1::ListDiagnosticsRequest {
            object: Some(v1::ObjectRef {
                kind: v1::SmiKind::TcpRoute as i32,
                namespace: "default".into(),
                name: "huge".into(),
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let messages: Vec<String> = listed
        .objects
        .iter()
        .flat_map(|o| &o.diagnostics)
        .map(|d| d.message.clone())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("metadata.labels.big") && m.contains("limit")),
        "the oversized object and its field are in the diagnostics: {messages:?}"
    );
    let readyz = reqwest::get(format!("http://{admin}/readyz")).await?;
    assert_eq!(
        readyz.status(),
        200,
        "the stream moves, so the translator is ready"
    );
    Ok(())
}
