//! Fault matrix (issue 8): a burst of changes while each service is SIGKILLed at a random
//! point. Afterwards Consul holds exactly the intentions the SMI objects grant, and at no
//! sampled moment during recovery (every 50 ms) did an owned intention allow a pair that the
//! SMI objects never granted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use consul_smi_e2e::env::{E2eEnv, eventually};
use consul_smi_e2e::services::Service;

/// 150 creations + 50 deletions = 200 changes.
const CREATED: usize = 150;
const DELETED: usize = 50;
const CHUNK: usize = 10;

fn target(s: &str, i: usize) -> String {
    format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: fault-{s}-{i}, namespace: default}}
spec:
  matches:
    ports: []
---
{}",
        target_only(s, i)
    )
}

fn target_only(s: &str, i: usize) -> String {
    format!(
        "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: fault-{s}-{i}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: api-{s}-{i}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: fault-{s}-{i}}}
  sources:
  - {{kind: ServiceAccount, name: web-{s}-{i}, namespace: default}}
"
    )
}

fn pair(s: &str, i: usize) -> (String, String) {
    (format!("web-{s}-{i}"), format!("api-{s}-{i}"))
}

/// Owned allow intentions of this test (by the `-{s}-` infix), read straight from Consul's
/// HTTP API so sampling runs concurrently with the harness killing services.
async fn owned_allows(
    http: &reqwest::Client,
    consul: &str,
    s: &str,
) -> Result<BTreeSet<(String, String)>> {
    let list: Vec<serde_json::Value> = http
        .get(format!("{consul}/v1/connect/intentions"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let infix = format!("-{s}-");
    Ok(list
        .iter()
        .filter(|i| i["Action"] == "allow")
        .filter(|i| {
            i["Meta"]
                .as_object()
                .is_some_and(|m| m.keys().any(|k| k.contains("consul-smi")))
        })
        .map(|i| {
            (
                i["SourceName"].as_str().unwrap_or_default().to_string(),
                i["DestinationName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .filter(|(_, d)| d.contains(&infix))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_with_each_service_sigkilled_converges_and_never_over_grants() -> Result<()> {
    let mut env = E2eEnv::start().await?;
    let consul = env
        .consul_agent()
        .context("the fault matrix needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)")?
        .url();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos() as usize;
    let s = format!("{:04x}", (nanos ^ std::process::id() as usize) as u16);

    // Every pair any SMI object of this test ever grants.
    let ever_granted: BTreeSet<_> = (0..CREATED).map(|i| pair(&s, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (stop, consul, s, ever_granted) = (
            stop.clone(),
            consul.clone(),
            s.clone(),
            ever_granted.clone(),
        );
        async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("reqwest client");
            let (mut samples, mut violations) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // Consul itself is not faulted here; a failed read is simply not a sample.
                if let Ok(allows) = owned_allows(&http, &consul, &s).await {
                    samples += 1;
                    violations.extend(allows.difference(&ever_granted).cloned());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, violations)
        }
    });

    // One kill point per service, at random chunks of the 200 changes.
    let chunks = (CREATED + DELETED) / CHUNK;
    let kill_at = [
        (nanos % chunks, Service::Watcher),
        ((nanos / 7) % chunks, Service::Translator),
        ((nanos / 49) % chunks, Service::Writer),
    ];
    eprintln!("kill points (chunk of {CHUNK} changes): {kill_at:?}");
    let changes: Vec<(bool, usize)> = (0..CREATED)
        .map(|i| (true, i))
        .chain((0..DELETED).map(|i| (false, i * 3)))
        .collect();
    for (chunk, batch) in changes.chunks(CHUNK).enumerate() {
        let creates: Vec<String> = batch
            .iter()
            .filter(|c| c.0)
            .map(|c| target(&s, c.1))
            .collect();
        if !creates.is_empty() {
            env.apply(&creates.join("---\n")).await?;
        }
        for (_, i) in batch.iter().filter(|c| !c.0) {
            env.delete(&target_only(&s, *i)).await?;
        }
        for (at, service) in kill_at {
            if at == chunk {
                env.kill(service).await?;
                env.start_service(service).await?;
            }
        }
    }

    let expected: BTreeSet<_> = (0..CREATED)
        .filter(|i| !(i % 3 == 0 && i / 3 < DELETED))
        .map(|i| pair(&s, i))
        .collect();
    let http = reqwest::Client::new();
    eventually(
        "owned allow intentions == the pairs the remaining TrafficTargets grant",
        Duration::from_secs(60),
        || async { Ok(owned_allows(&http, &consul, &s).await? == expected) },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let (samples, violations) = sampler.await?;
    eprintln!("{samples} samples of Consul's intentions during the burst and recovery");
    assert!(samples > 10, "the sampler barely ran ({samples} samples)");
    assert!(
        violations.is_empty(),
        "owned intentions granted pairs no SMI object granted: {violations:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_unreachable_for_a_while_then_back_converges_and_never_over_grants() -> Result<()> {
    let mut env = E2eEnv::start().await?;
    let consul = env
        .consul_agent()
        .context("the fault matrix needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)")?
        .url();
    let s = format!("{:04x}", std::process::id() as u16 ^ 0x5a5a);
    let http = reqwest::Client::new();
    let created = |range: std::ops::Range<usize>| -> String {
        range
            .map(|i| target(&s, i))
            .collect::<Vec<_>>()
            .join("---\n")
    };

    env.apply(&created(0..20)).await?;
    let first: BTreeSet<_> = (0..20).map(|i| pair(&s, i)).collect();
    eventually(
        "the first 20 pairs granted",
        Duration::from_secs(30),
        || async { Ok(owned_allows(&http, &consul, &s).await? == first) },
    )
    .await?;

    let ever_granted: BTreeSet<_> = (0..40).map(|i| pair(&s, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (stop, consul, s, ever_granted) = (
            stop.clone(),
            consul.clone(),
            s.clone(),
            ever_granted.clone(),
        );
        async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("reqwest client");
            let (mut samples, mut violations) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // While Consul is down a read fails: not a sample.
                if let Ok(allows) = owned_allows(&http, &consul, &s).await {
                    samples += 1;
                    violations.extend(allows.difference(&ever_granted).cloned());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, violations)
        }
    });

    // Consul goes away; SMI changes keep coming (20 creations, 10 deletions).
    env.stop_consul()?;
    env.apply(&created(20..40)).await?;
    for i in 0..10 {
        env.delete(&target_only(&s, i)).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.start_consul().await?;

    let expected: BTreeSet<_> = (10..40).map(|i| pair(&s, i)).collect();
    eventually(
        "owned allow intentions == the pairs the remaining TrafficTargets grant",
        Duration::from_secs(60),
        || async { Ok(owned_allows(&http, &consul, &s).await? == expected) },
    )
    .await?;
    // Recovery takes well under a second after the outage and reads fail during it: keep
    // sampling the converged state for a while so the sampler has observed something.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (samples, violations) = sampler.await?;
    eprintln!("{samples} samples of Consul's intentions around the outage");
    assert!(samples >= 3, "the sampler barely ran ({samples} samples)");
    assert!(
        violations.is_empty(),
        "owned intentions granted pairs no SMI object granted: {violations:?}"
    );
    Ok(())
}
