//! `--consul-api auto` (the default): smi-translator asks consul-writer which intentions API
//! its Consul speaks and translates for it. Consul 1.9+ cannot run here, so the modern case
//! runs the three services as processes against the config-entry API double of
//! `crates/consul/tests/double` (it follows the upstream docs); the legacy case is the e2e
//! suite itself, which runs with the default against the real Consul 1.8.7.

#[path = "../../crates/consul/tests/double/mod.rs"]
mod double;

use std::time::Duration;

use anyhow::{Context, Result};
use consul_smi_e2e::env::eventually;
use consul_smi_e2e::services::{Pipeline, PipelineOptions, Source};
use double::ModernConsul;

const L7_TARGET: &str = "\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: metrics-routes, namespace: default}
spec:
  matches:
  - {name: metrics, pathRegex: /metrics, methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: prometheus-scrapes-api, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: default}
  rules:
  - {kind: HTTPRouteGroup, name: metrics-routes, matches: [metrics]}
  sources:
  - {kind: ServiceAccount, name: prometheus, namespace: default}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: any-port, namespace: default}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-calls-api, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: default}
  rules:
  - {kind: TCPRoute, name: any-port}
  sources:
  - {kind: ServiceAccount, name: web, namespace: default}
";

/// The `api` service-intentions entry's source `name`, once written.
fn source(double: &ModernConsul, name: &str) -> Option<serde_json::Value> {
    double
        .entry("service-intentions", "api")?
        .get("Sources")?
        .as_array()?
        .iter()
        .find(|s| s["Name"] == name)
        .cloned()
}

async fn pipeline_against(double: &ModernConsul, translator_args: &[&str]) -> Result<Pipeline> {
    let dir = tempfile::tempdir()?.keep();
    std::fs::write(dir.join("smi.yaml"), L7_TARGET)?;
    let mut options = PipelineOptions::new(Source::Dir(dir), double.address.clone());
    options.translator_args = translator_args.iter().map(|a| a.to_string()).collect();
    Pipeline::start(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_l7_permissions_reach_a_consul_that_speaks_the_modern_api() -> Result<()> {
    let double = ModernConsul::start().await;
    let _pipeline = pipeline_against(&double, &[]).await?;
    eventually(
        "prometheus → api written with its HTTP permission",
        Duration::from_secs(30),
        || async {
            Ok(source(&double, "prometheus")
                .is_some_and(|s| s["Permissions"][0]["HTTP"]["PathRegex"] == "^/metrics"))
        },
    )
    .await?;
    let web = source(&double, "web").context("web → api")?;
    assert_eq!(web["Action"], "allow", "{web}");
    // Written once, already with the permission: no Sync translated for the legacy API (which
    // withholds the L7 grant) reached this Consul before the translator switched.
    let entry = double
        .entry("service-intentions", "api")
        .context("api entry")?;
    assert_eq!(entry["CreateIndex"], entry["ModifyIndex"], "{entry}");
    Ok(())
}

/// The same objects with the API pinned to legacy: the L7-only grant is withheld (so the
/// default above is what made the difference), the L4 one still written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_to_legacy_the_l7_grant_is_withheld_on_the_same_consul() -> Result<()> {
    let double = ModernConsul::start().await;
    let _pipeline = pipeline_against(&double, &["--consul-api", "legacy"]).await?;
    eventually("web → api written", Duration::from_secs(30), || async {
        Ok(source(&double, "web").is_some())
    })
    .await?;
    // Everything of one snapshot goes out in one Sync: web's presence means prometheus's
    // absence is the translation's, not a delay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        source(&double, "prometheus").is_none(),
        "an L7-only grant must not reach Consul as an L4 allow: {:?}",
        double.entry("service-intentions", "api")
    );
    Ok(())
}
