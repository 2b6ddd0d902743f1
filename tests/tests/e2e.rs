//! The end-to-end suite. Harness-agnostic: every case talks to [`E2eEnv`], which is either
//! the local harness (real etcd + API server, real Consul, the three services as processes;
//! what CI runs) or an external kind cluster (`cargo xtask e2e-kind`).
//!
//! Service names are unique per case so cases can share one external cluster.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use consul_smi_e2e::env::{Component, E2eEnv, IntentionRow, LocalOptions, eventually};
use consul_smi_e2e::services::Service;
use consul_smi_grpc::v1;

/// This file is also the body of `e2e_modern.rs`; the test binary's crate name picks the
/// Consul the local harness runs (1.8.7 here, 1.14.11 there).
fn local_options() -> LocalOptions {
    LocalOptions::for_test_target(env!("CARGO_CRATE_NAME")).expect("CONSUL_SMI_CONSUL is valid")
}

async fn start_env() -> Result<E2eEnv> {
    E2eEnv::start_with(local_options()).await
}

const CONVERGE: Duration = Duration::from_secs(30);

fn suffix() -> String {
    format!("{:04x}", rand_u16())
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    (nanos ^ (std::process::id() << 8)) as u16
}

fn tcp_target(name: &str, destination: &str, sources: &[&str]) -> String {
    let sources: String = sources
        .iter()
        .map(|s| format!("  - {{kind: ServiceAccount, name: {s}, namespace: default}}\n"))
        .collect();
    format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: {name}-tcp, namespace: default}}
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {name}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {destination}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: {name}-tcp}}
  sources:
{sources}"
    )
}

async fn has_owned_allow(env: &E2eEnv, source: &str, destination: &str) -> Result<bool> {
    let rows = env.intentions().await?;
    Ok(rows.iter().any(|r| {
        r.source == source && r.destination == destination && r.action == "allow" && r.owned
    }))
}

async fn wait_allowed(env: &E2eEnv, source: &str, destination: &str) -> Result<()> {
    eventually(
        &format!("{source} -> {destination} allowed by an owned intention"),
        CONVERGE,
        || async {
            Ok(has_owned_allow(env, source, destination).await?
                && env.allowed(source, destination).await?)
        },
    )
    .await
}

async fn wait_gone(env: &E2eEnv, source: &str, destination: &str) -> Result<()> {
    eventually(
        &format!("{source} -> {destination} no longer allowed"),
        CONVERGE,
        || async {
            let rows = env.intentions().await?;
            Ok(!rows
                .iter()
                .any(|r| r.source == source && r.destination == destination)
                && !env.allowed(source, destination).await?)
        },
    )
    .await
}

/// Diagnostics of one object from smi-translator's operator API.
async fn diagnostics_of(
    env: &E2eEnv,
    kind: v1::SmiKind,
    name: &str,
) -> Result<Vec<v1::Diagnostic>> {
    let pipeline = env
        .pipeline()
        .context("diagnostics need the translator's address (local harness)")?;
    let mut client = v1::translator_diagnostics_client::TranslatorDiagnosticsClient::connect(
        format!("http://{}", pipeline.translator_addr),
    )
    .await?;
    let response = client
        .list(v1::ListDiagnosticsRequest {
            object: Some(v1::ObjectRef {
                kind: kind as i32,
                namespace: "default".into(),
                name: name.into(),
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response
        .objects
        .into_iter()
        .flat_map(|o| o.diagnostics)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcement_example_creates_then_deletes_the_intention() -> Result<()> {
    let env = start_env().await?;
    let example = include_str!("../../deploy/examples/01-dashboard-counting.yaml");
    assert!(
        !env.allowed("dashboard", "counting").await?,
        "denied before the TrafficTarget exists"
    );
    env.apply(example).await?;
    wait_allowed(&env, "dashboard", "counting").await?;
    env.delete(example).await?;
    wait_gone(&env, "dashboard", "counting").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1alpha3_target_with_tcproute_grants_each_source() -> Result<()> {
    let env = start_env().await?;
    let s = suffix();
    let (api, web, batch) = (format!("api-{s}"), format!("web-{s}"), format!("batch-{s}"));
    env.apply(&tcp_target(&format!("tt-{s}"), &api, &[&web, &batch]))
        .await?;
    wait_allowed(&env, &web, &api).await?;
    wait_allowed(&env, &batch, &api).await?;
    assert!(
        !env.allowed(&api, &web).await?,
        "intentions are directional"
    );
    Ok(())
}

/// Legacy Consul (the local harness' 1.8.7): withheld with a diagnostic. Modern Consul (kind's
/// 1.16 with `--consul-api modern`): an L7 intention with the route's permission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_group_is_l7_on_modern_and_withheld_on_legacy_consul() -> Result<()> {
    let env = start_env().await?;
    let legacy = env.consul_version().await?.starts_with("1.8");
    let s = suffix();
    let (api, prom, sentinel) = (
        format!("api-{s}"),
        format!("prom-{s}"),
        format!("sentinel-{s}"),
    );
    env.apply(&format!(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: routes-{s}, namespace: default}}
spec:
  matches:
  - {{name: metrics, pathRegex: /metrics, methods: [GET]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: l7-{s}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {api}, namespace: default}}
  rules:
  - {{kind: HTTPRouteGroup, name: routes-{s}, matches: [metrics]}}
  sources:
  - {{kind: ServiceAccount, name: {prom}, namespace: default}}
"
    ))
    .await?;
    // A later object converging proves the L7 one was processed, not merely slow.
    env.apply(&tcp_target(&format!("sentinel-tt-{s}"), &api, &[&sentinel]))
        .await?;
    wait_allowed(&env, &sentinel, &api).await?;
    if !legacy {
        let entry = env
            .config_entry("service-intentions", &api)
            .await?
            .context("service-intentions entry")?;
        let source = entry["Sources"]
            .as_array()
            .and_then(|sources| sources.iter().find(|s| s["Name"] == prom.as_str()))
            .with_context(|| format!("{prom} in {entry}"))?;
        assert_eq!(
            source["Permissions"][0]["HTTP"]["PathRegex"], "^/metrics",
            "{source}"
        );
        // The grant itself denies every other request, so it holds under a default-allow
        // Consul too (Consul drops permissions that repeat the default action).
        let last = source["Permissions"]
            .as_array()
            .and_then(|p| p.last())
            .with_context(|| format!("permissions of {source}"))?;
        assert_eq!(last["Action"], "deny", "{source}");
        assert_eq!(last["HTTP"]["PathPrefix"], "/", "{source}");
        return Ok(());
    }
    let rows = env.intentions().await?;
    assert!(
        !rows.iter().any(|r| r.source == prom),
        "an L7-only grant must not widen to an L4 allow on legacy Consul: {rows:?}"
    );
    if env.is_local() {
        let diagnostics =
            diagnostics_of(&env, v1::SmiKind::TrafficTarget, &format!("l7-{s}")).await?;
        assert!(
            diagnostics
                .iter()
                .any(|d| d.severity == v1::Severity::Error as i32 && d.field.contains("rules")),
            "expected a withheld-L7 diagnostic naming the rule, got {diagnostics:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_created_after_the_target_takes_effect_without_restart() -> Result<()> {
    let env = start_env().await?;
    let s = suffix();
    let (api, web, sentinel) = (
        format!("api-{s}"),
        format!("web-{s}"),
        format!("sentinel-{s}"),
    );
    let manifests = tcp_target(&format!("late-{s}"), &api, &[&web]);
    let (route, target) = manifests.split_once("---").context("two documents")?;
    env.apply(target).await?;
    env.apply(&tcp_target(&format!("sentinel-tt-{s}"), &api, &[&sentinel]))
        .await?;
    wait_allowed(&env, &sentinel, &api).await?;
    assert!(
        !has_owned_allow(&env, &web, &api).await?,
        "a rule naming a missing route grants nothing"
    );
    if env.is_local() {
        let diagnostics =
            diagnostics_of(&env, v1::SmiKind::TrafficTarget, &format!("late-{s}")).await?;
        assert!(
            !diagnostics.is_empty(),
            "the missing route must be reported"
        );
    }
    env.apply(route).await?;
    wait_allowed(&env, &web, &api).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_one_of_two_targets_for_a_pair_keeps_access() -> Result<()> {
    let env = start_env().await?;
    let s = suffix();
    let (api, web) = (format!("api-{s}"), format!("web-{s}"));
    let first = tcp_target(&format!("first-{s}"), &api, &[&web]);
    let second = tcp_target(&format!("second-{s}"), &api, &[&web]);
    env.apply(&first).await?;
    env.apply(&second).await?;
    wait_allowed(&env, &web, &api).await?;
    let (_, first_target) = first.split_once("---").context("two documents")?;
    env.delete(first_target).await?;
    // Give the deletion time to propagate, then prove access is still there.
    let sentinel = format!("sentinel-{s}");
    env.apply(&tcp_target(&format!("sentinel-tt-{s}"), &api, &[&sentinel]))
        .await?;
    wait_allowed(&env, &sentinel, &api).await?;
    assert!(
        has_owned_allow(&env, &web, &api).await?,
        "the second TrafficTarget still grants web -> api"
    );
    assert!(env.allowed(&web, &api).await?);
    let (_, second_target) = second.split_once("---").context("two documents")?;
    env.delete(second_target).await?;
    wait_gone(&env, &web, &api).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_becomes_a_service_splitter() -> Result<()> {
    let env = start_env().await?;
    let s = suffix();
    let api = format!("api-{s}");
    let split = format!(
        "apiVersion: split.smi-spec.io/v1alpha1
kind: TrafficSplit
metadata: {{name: canary-{s}, namespace: default}}
spec:
  service: {api}
  backends:
  - {{service: {api}-v1, weight: 900m}}
  - {{service: {api}-v2, weight: 100m}}
"
    );
    env.apply(&split).await?;
    eventually("service-splitter with 90/10", CONVERGE, || async {
        let Some(entry) = env.config_entry("service-splitter", &api).await? else {
            return Ok(false);
        };
        let weights: Vec<(String, f64)> = entry["Splits"]
            .as_array()
            .map(|splits| {
                splits
                    .iter()
                    .map(|s| {
                        (
                            s["Service"].as_str().unwrap_or_default().to_string(),
                            s["Weight"].as_f64().unwrap_or(-1.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(weights == vec![(format!("{api}-v1"), 90.0), (format!("{api}-v2"), 10.0)])
    })
    .await?;
    env.delete(&split).await?;
    eventually("service-splitter removed", CONVERGE, || async {
        Ok(env.config_entry("service-splitter", &api).await?.is_none())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_deny_intention_is_left_untouched() -> Result<()> {
    let env = start_env().await?;
    let s = suffix();
    let (db, web, sentinel) = (
        format!("db-{s}"),
        format!("web-{s}"),
        format!("sentinel-{s}"),
    );
    env.create_foreign_intention(&web, &db, "deny").await?;
    let target = tcp_target(&format!("wants-db-{s}"), &db, &[&web]);
    env.apply(&target).await?;
    env.apply(&tcp_target(&format!("sentinel-tt-{s}"), &db, &[&sentinel]))
        .await?;
    wait_allowed(&env, &sentinel, &db).await?;
    let foreign = |rows: &BTreeSet<IntentionRow>| {
        rows.iter()
            .filter(|r| r.source == web && r.destination == db)
            .cloned()
            .collect::<Vec<_>>()
    };
    let rows = foreign(&env.intentions().await?);
    assert_eq!(rows.len(), 1, "exactly the operator's intention: {rows:?}");
    assert_eq!(rows[0].action, "deny");
    assert!(
        !rows[0].owned,
        "consul-smi must not take over the operator's intention"
    );
    assert!(!env.allowed(&web, &db).await?);
    env.delete(&target).await?;
    wait_gone(&env, &sentinel, &db).await.ok();
    let rows = foreign(&env.intentions().await?);
    assert_eq!(
        rows.len(),
        1,
        "deleting the TrafficTarget must not delete the operator's intention"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_killed_mid_stream_converges_to_the_desired_state() -> Result<()> {
    let mut env = start_env().await?;
    anyhow::ensure!(
        env.is_local(),
        "this case kills processes: local harness only"
    );
    let s = suffix();
    let api = format!("api-{s}");
    for (round, service) in [Service::Watcher, Service::Translator, Service::Writer]
        .into_iter()
        .enumerate()
    {
        let before = format!("before-{round}-{s}");
        let during = format!("during-{round}-{s}");
        let removed = format!("removed-{round}-{s}");
        env.apply(&tcp_target(&before, &api, &[&before])).await?;
        env.apply(&tcp_target(&removed, &api, &[&removed])).await?;
        wait_allowed(&env, &removed, &api).await?;
        env.kill(service).await?;
        // Changes while the service is down: one grant added, one removed.
        env.apply(&tcp_target(&during, &api, &[&during])).await?;
        let removed_manifest = tcp_target(&removed, &api, &[&removed]);
        env.delete(
            removed_manifest
                .split_once("---")
                .context("two documents")?
                .1,
        )
        .await?;
        env.start_service(service).await?;
        wait_allowed(&env, &during, &api)
            .await
            .with_context(|| format!("after restarting {service:?}"))?;
        wait_allowed(&env, &before, &api).await?;
        wait_gone(&env, &removed, &api)
            .await
            .with_context(|| format!("after restarting {service:?}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_restart_is_repaired() -> Result<()> {
    let mut env = start_env().await?;
    let s = suffix();
    let (api, web) = (format!("api-{s}"), format!("web-{s}"));
    env.apply(&tcp_target(&format!("tt-{s}"), &api, &[&web]))
        .await?;
    wait_allowed(&env, &web, &api).await?;
    // A dev agent restarts empty: everything consul-smi wrote is gone and must come back.
    env.restart(Component::Consul).await?;
    wait_allowed(&env, &web, &api).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_loses_nothing() -> Result<()> {
    let mut env = start_env().await?;
    let s = suffix();
    let (api, web, late) = (format!("api-{s}"), format!("web-{s}"), format!("late-{s}"));
    let first = tcp_target(&format!("tt-{s}"), &api, &[&web]);
    env.apply(&first).await?;
    wait_allowed(&env, &web, &api).await?;
    env.restart(Component::ApiServer).await?;
    env.apply(&tcp_target(&format!("late-tt-{s}"), &api, &[&late]))
        .await?;
    wait_allowed(&env, &late, &api).await?;
    assert!(
        has_owned_allow(&env, &web, &api).await?,
        "objects from before the restart are still in effect"
    );
    env.delete(first.split_once("---").context("two documents")?.1)
        .await?;
    wait_gone(&env, &web, &api).await?;
    Ok(())
}

/// Diagnostics become Kubernetes Events where the cluster serves them (kind); where it does
/// not (the local API server serves only CRDs), the translator keeps working without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_become_kubernetes_events_where_served() -> Result<()> {
    let env = E2eEnv::start_with(LocalOptions {
        kube_events: true,
        ..local_options()
    })
    .await?;
    let s = suffix();
    let (api, web, sentinel) = (
        format!("api-{s}"),
        format!("web-{s}"),
        format!("sentinel-{s}"),
    );
    let manifests = tcp_target(&format!("no-route-{s}"), &api, &[&web]);
    let (_, target) = manifests.split_once("---").context("two documents")?;
    env.apply(target).await?;
    env.apply(&tcp_target(&format!("sentinel-tt-{s}"), &api, &[&sentinel]))
        .await?;
    wait_allowed(&env, &sentinel, &api).await?;
    let events_api = env
        .kube
        .request_text(http_get("/apis/events.k8s.io/v1")?)
        .await;
    if env.is_local() {
        assert!(
            events_api.is_err(),
            "the local API server is expected not to serve Events"
        );
        return Ok(());
    }
    use k8s_openapi::api::events::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(env.kube.clone(), "default");
    let name = format!("no-route-{s}");
    eventually(
        "an Event on the TrafficTarget naming the missing route",
        CONVERGE,
        || async {
            let list = events.list(&Default::default()).await?;
            Ok(list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                    && e.reason.as_deref() == Some("RouteNotFound")
            }))
        },
    )
    .await
}

fn http_get(path: &str) -> Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

/// `consul-smi plan --live` against the Consul the pipeline wrote: owned intentions are not
/// planned again, and a key held by an operator's intention is shown as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_live_shows_only_real_changes_and_conflicts() -> Result<()> {
    let env = start_env().await?;
    let Some(agent) = env.consul_agent() else {
        return Ok(()); // kind: Consul's address is not reachable as CONSUL_HTTP_ADDR here
    };
    let s = suffix();
    let (api, web, ops) = (format!("api-{s}"), format!("web-{s}"), format!("ops-{s}"));
    let applied = tcp_target(&format!("tt-{s}"), &api, &[&web]);
    env.apply(&applied).await?;
    wait_allowed(&env, &web, &api).await?;
    env.create_foreign_intention(&ops, &api, "deny").await?;

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("current.yaml"), &applied)?;
    std::fs::write(
        dir.path().join("more.yaml"),
        tcp_target(&format!("more-{s}"), &api, &[&ops]),
    )?;
    let output = std::process::Command::new(consul_smi_e2e::services::consul_smi_binary()?)
        .args(["plan", "--live"])
        .arg(dir.path())
        .env("CONSUL_HTTP_ADDR", agent.http_addr())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !stdout.contains(&format!("intention {web} -> {api}")),
        "already in Consul, not planned again:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("! conflict: intention {ops} -> {api}")),
        "{stdout}"
    );
    Ok(())
}
