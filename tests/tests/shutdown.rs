//! Graceful shutdown: SIGTERM to `consul-smi writer` while a burst is being applied. The
//! writer stops accepting, finishes the in-flight Apply and exits 0 on its own; whatever the
//! translator could not deliver meanwhile is re-sent by Sync once a writer is back.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use consul_smi_e2e::env::{E2eEnv, eventually};
use consul_smi_e2e::services::Service;

const TARGETS: usize = 120;

fn burst(s: &str) -> String {
    (0..TARGETS)
        .map(|i| {
            format!(
                "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: term-{s}-{i}, namespace: default}}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: term-{s}-{i}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: api-{s}-{i}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: term-{s}-{i}}}
  sources:
  - {{kind: ServiceAccount, name: web-{s}-{i}, namespace: default}}
"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The burst's pairs currently granted by an owned allow intention.
async fn granted(env: &E2eEnv, s: &str) -> Result<BTreeSet<String>> {
    Ok(env
        .intentions()
        .await?
        .into_iter()
        .filter(|r| {
            r.owned && r.action == "allow" && r.destination.starts_with(&format!("api-{s}-"))
        })
        .map(|r| r.destination)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_writer_mid_burst_exits_cleanly_and_loses_nothing() -> Result<()> {
    let mut env = E2eEnv::start().await?;
    let s = format!("{:04x}", std::process::id() as u16);
    let yaml = burst(&s);
    // SIGTERM as soon as the first intentions of the burst are visible, as the kubelet would.
    // With the local harness the burst is usually almost fully applied by then (the test
    // prints how much); the clean exit and the final state are what it asserts.
    env.apply(&yaml).await?;
    let mut first_seen = 0;
    for _ in 0..200 {
        first_seen = granted(&env, &s).await?.len();
        if first_seen > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = env
        .terminate(Service::Writer, Duration::from_secs(20))
        .await?;
    assert!(
        status.success(),
        "consul-smi writer exited with {status} after SIGTERM (expected a clean exit)"
    );
    let at_stop = granted(&env, &s).await?.len();
    eprintln!(
        "granted when SIGTERM was sent: >= {first_seen}; after the writer exited: {at_stop} of {TARGETS}"
    );

    env.start_service(Service::Writer).await?;
    eventually(
        "every pair of the burst granted after the writer is back",
        Duration::from_secs(60),
        || async { Ok(granted(&env, &s).await?.len() == TARGETS) },
    )
    .await?;
    Ok(())
}

async fn readyz(admin: std::net::SocketAddr) -> Result<u16> {
    Ok(reqwest::get(format!("http://{admin}/readyz"))
        .await?
        .status()
        .as_u16())
}

/// `/readyz` tells Kubernetes whether a service does its job: the translator is ready only
/// while Consul follows its index (first Sync delivered, no failed delivery since), the
/// writer once it reached Consul.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translator_readiness_follows_delivery_to_the_writer() -> Result<()> {
    use consul_smi_e2e::env::LocalOptions;
    use consul_smi_e2e::services::free_addr;

    let (translator_admin, writer_admin) = (free_addr()?, free_addr()?);
    let mut env = E2eEnv::start_with(LocalOptions {
        translator_args: vec!["--admin-listen".into(), translator_admin.to_string()],
        writer_args: vec!["--admin-listen".into(), writer_admin.to_string()],
        ..LocalOptions::default()
    })
    .await?;
    let both_ready = || async {
        Ok(readyz(translator_admin).await? == 200 && readyz(writer_admin).await? == 200)
    };
    eventually(
        "translator and writer ready",
        Duration::from_secs(30),
        both_ready,
    )
    .await?;

    env.kill(Service::Writer).await?;
    let s = format!("{:04x}", std::process::id() as u16 ^ 0x3c3c);
    // The first route and target of a burst.
    let first: String = burst(&s)
        .split("---\n")
        .take(2)
        .collect::<Vec<_>>()
        .join("---\n");
    env.apply(&first).await?;
    eventually(
        "translator not ready while the writer is gone",
        Duration::from_secs(30),
        || async { Ok(readyz(translator_admin).await? == 503) },
    )
    .await?;

    env.start_service(Service::Writer).await?;
    let (source, destination) = (format!("web-{s}-0"), format!("api-{s}-0"));
    eventually(
        "translator ready again",
        Duration::from_secs(30),
        both_ready,
    )
    .await?;
    eventually(
        "the change made while the writer was gone reached Consul",
        Duration::from_secs(30),
        || env.allowed(&source, &destination),
    )
    .await
}
