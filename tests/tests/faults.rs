//! Fault matrix (issue 8). Each case runs a burst of SMI changes while one kind of fault
//! happens, then checks that
//! - Consul ends with exactly the owned intentions the remaining SMI objects grant;
//! - the intentions an operator wrote (including one that conflicts with an SMI grant) are
//!   byte-for-byte unchanged;
//! - at no sampled moment (every 50 ms, read straight from Consul) did an owned intention
//!   allow a pair no SMI object granted, or allow again a pair whose access had been seen
//!   revoked after its TrafficTarget was deleted.
//!
//! Faults: each service SIGKILLed at random points during 1,000 changes; Consul unreachable
//! (network partition) and then answering slowly, also slower than the writer's timeout;
//! Consul crashed and back empty; the API server restarted with deletions made while it was
//! down; the translator's gRPC connections cut in the middle of a message.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use consul_smi_e2e::env::{E2eEnv, LocalOptions, eventually};
use consul_smi_e2e::kube::KubeApiServer;
use consul_smi_e2e::oracle::{self, GrantSampler, Pair};
use consul_smi_e2e::services::Service;

/// This file is also the body of `faults_modern.rs`; the test binary's crate name picks the
/// Consul the local harness runs (1.8.7 here, 1.14.11 there).
fn local_options() -> LocalOptions {
    LocalOptions::for_test_target(env!("CARGO_CRATE_NAME")).expect("CONSUL_SMI_CONSUL is valid")
}

async fn start_env() -> Result<E2eEnv> {
    E2eEnv::start_with(local_options()).await
}

/// The SMI objects of one case: TrafficTarget `fault-{salt}-{i}` grants
/// `web-{salt}-{i} → api-{salt}-{i}` through TCPRoute `fault-{salt}-{i}`.
struct Burst {
    salt: String,
}

impl Burst {
    fn new(seed: u32) -> Burst {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        Burst {
            salt: format!("{:04x}", (nanos ^ std::process::id() ^ seed) as u16),
        }
    }

    fn infix(&self) -> String {
        format!("-{}-", self.salt)
    }

    fn name(&self, i: usize) -> String {
        format!("fault-{}-{i}", self.salt)
    }

    fn pair(&self, i: usize) -> Pair {
        (
            format!("web-{}-{i}", self.salt),
            format!("api-{}-{i}", self.salt),
        )
    }

    fn pairs(&self, indexes: impl IntoIterator<Item = usize>) -> BTreeSet<Pair> {
        indexes.into_iter().map(|i| self.pair(i)).collect()
    }

    fn target(&self, i: usize) -> String {
        let (name, (source, destination)) = (self.name(i), self.pair(i));
        format!(
            "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: {name}, namespace: default}}
spec:
  destination: {{kind: ServiceAccount, name: {destination}, namespace: default}}
  rules:
  - {{kind: TCPRoute, name: {name}}}
  sources:
  - {{kind: ServiceAccount, name: {source}, namespace: default}}
"
        )
    }

    fn route_and_target(&self, i: usize) -> String {
        format!(
            "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: {}, namespace: default}}
spec:
  matches:
    ports: []
---
{}",
            self.name(i),
            self.target(i)
        )
    }

    async fn create(&self, env: &E2eEnv, indexes: impl IntoIterator<Item = usize>) -> Result<()> {
        let manifests: Vec<String> = indexes
            .into_iter()
            .map(|i| self.route_and_target(i))
            .collect();
        if manifests.is_empty() {
            return Ok(());
        }
        env.apply(&manifests.join("---\n")).await
    }

    /// Deletes the TrafficTargets and tells the sampler their grants are gone.
    async fn delete(
        &self,
        env: &E2eEnv,
        sampler: &GrantSampler,
        indexes: impl IntoIterator<Item = usize>,
    ) -> Result<()> {
        for i in indexes {
            env.delete(&self.target(i)).await?;
            sampler.deleted(self.pair(i));
        }
        Ok(())
    }

    /// An operator's intentions among this burst's services: a deny on the pair that
    /// TrafficTarget `conflict` also grants (consul-smi must report it, never overwrite it) and
    /// an unrelated allow.
    async fn operator_intentions(&self, env: &E2eEnv, conflict: usize) -> Result<()> {
        let (source, destination) = self.pair(conflict);
        env.create_foreign_intention(&source, &destination, "deny")
            .await?;
        env.create_foreign_intention(
            &format!("ops-{}", self.salt),
            &format!("db-{}", self.salt),
            "allow",
        )
        .await
    }
}

fn consul_url(env: &E2eEnv) -> Result<String> {
    Ok(env
        .consul_agent()
        .context("the fault matrix needs the local harness (unset CONSUL_SMI_E2E_KUBECONFIG)")?
        .url())
}

async fn converged(
    env: &E2eEnv,
    burst: &Burst,
    expected: &BTreeSet<Pair>,
    timeout: Duration,
) -> Result<()> {
    let (http, consul) = (reqwest::Client::new(), consul_url(env)?);
    eventually(
        "owned allow intentions == the pairs the remaining TrafficTargets grant",
        timeout,
        || async { Ok(oracle::owned_allows(&http, &consul, &burst.infix()).await? == *expected) },
    )
    .await
}

/// The operator's intentions, compared before and after the faults.
struct ForeignIntentions(std::collections::BTreeMap<String, serde_json::Value>);

impl ForeignIntentions {
    async fn read(env: &E2eEnv) -> Result<ForeignIntentions> {
        let foreign =
            oracle::foreign_intentions(&reqwest::Client::new(), &consul_url(env)?).await?;
        anyhow::ensure!(
            foreign.len() >= 3,
            "operator intentions missing: {foreign:?}"
        );
        Ok(ForeignIntentions(foreign))
    }

    async fn assert_unchanged(&self, env: &E2eEnv) -> Result<()> {
        let now = ForeignIntentions::read(env).await?;
        anyhow::ensure!(
            now.0 == self.0,
            "intentions consul-smi does not own changed:\nbefore {:#?}\nafter {:#?}",
            self.0,
            now.0
        );
        Ok(())
    }
}

/// 700 creations and 300 deletions, in chunks of 50.
const KILL_CREATED: usize = 700;
const KILL_DELETED: usize = 300;
const KILL_CHUNK: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_1000_changes_with_each_service_sigkilled_converges_and_never_over_grants()
-> Result<()> {
    let mut env = start_env().await?;
    let burst = Burst::new(0);
    let conflict = 1;
    burst.operator_intentions(&env, conflict).await?;
    let foreign = ForeignIntentions::read(&env).await?;
    let mut grantable = burst.pairs(0..KILL_CREATED);
    grantable.remove(&burst.pair(conflict));
    let sampler = GrantSampler::start(consul_url(&env)?, burst.infix(), grantable.clone());

    // FAULT_SEED=<n> replays a run's kill points (printed below).
    let seed = match std::env::var("FAULT_SEED") {
        Ok(seed) => seed.parse().context("FAULT_SEED must be a number")?,
        Err(_) => u16::from_str_radix(&burst.salt, 16)? as usize,
    };
    let chunks = (KILL_CREATED + KILL_DELETED) / KILL_CHUNK;
    let kill_at = [
        (seed % chunks, Service::Watcher),
        ((seed / 7) % chunks, Service::Translator),
        ((seed / 49) % chunks, Service::Writer),
        ((seed / 343) % chunks, Service::Writer),
    ];
    eprintln!("FAULT_SEED={seed}: kill points (chunk of {KILL_CHUNK} changes): {kill_at:?}");
    // From the 100th creation on, every other one is followed by the deletion of the object
    // created 100 earlier: the even indexes below 600 go.
    let changes: Vec<(bool, usize)> = (0..KILL_CREATED)
        .flat_map(|i| {
            let delete = (i >= 100 && i % 2 == 0).then(|| (false, i - 100));
            std::iter::once((true, i)).chain(delete)
        })
        .collect();
    assert_eq!(changes.len(), KILL_CREATED + KILL_DELETED);
    for (chunk, batch) in changes.chunks(KILL_CHUNK).enumerate() {
        burst
            .create(&env, batch.iter().filter(|c| c.0).map(|c| c.1))
            .await?;
        burst
            .delete(&env, &sampler, batch.iter().filter(|c| !c.0).map(|c| c.1))
            .await?;
        for (at, service) in kill_at {
            if at == chunk {
                env.kill(service).await?;
                env.start_service(service).await?;
            }
        }
    }

    let deleted: BTreeSet<usize> = changes.iter().filter(|c| !c.0).map(|c| c.1).collect();
    assert_eq!(deleted.len(), KILL_DELETED);
    let mut expected = burst.pairs((0..KILL_CREATED).filter(|i| !deleted.contains(i)));
    expected.remove(&burst.pair(conflict));
    converged(&env, &burst, &expected, Duration::from_secs(90)).await?;
    // Sample the converged state too, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.finish(10).await?;
    foreign.assert_unchanged(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_partitioned_then_slow_then_slower_than_the_timeout_converges_and_never_over_grants()
-> Result<()> {
    let writer_admin = consul_smi_e2e::services::free_addr()?;
    let env = E2eEnv::start_with(LocalOptions {
        consul_proxy: true,
        writer_args: vec![
            "--consul-request-timeout".into(),
            "1s".into(),
            "--admin-listen".into(),
            writer_admin.to_string(),
        ],
        ..local_options()
    })
    .await?;
    let burst = Burst::new(1);
    let proxy = env.consul_proxy().context("consul proxy")?;
    let conflict = 13;
    burst.operator_intentions(&env, conflict).await?;
    let foreign = ForeignIntentions::read(&env).await?;

    burst.create(&env, 0..20).await?;
    let mut first = burst.pairs(0..20);
    first.remove(&burst.pair(conflict));
    converged(&env, &burst, &first, Duration::from_secs(30)).await?;
    let mut grantable = burst.pairs(0..60);
    grantable.remove(&burst.pair(conflict));
    let sampler = GrantSampler::start(consul_url(&env)?, burst.infix(), grantable);

    // Unreachable: every connection to Consul dropped, for 3 s of changes.
    proxy.set_partitioned(true);
    burst.create(&env, 20..30).await?;
    burst.delete(&env, &sampler, 0..5).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_partitioned(false);

    // Slow: every answer 300 ms late.
    proxy.set_answer_delay(Duration::from_millis(300));
    burst.create(&env, 30..45).await?;
    burst.delete(&env, &sampler, 5..8).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Slower than the writer's 1 s timeout: Consul performs each write, the writer never
    // hears back and retries (a create it already made answers "duplicate intention").
    let timeouts_before = transport_errors(writer_admin).await?;
    proxy.set_answer_delay(Duration::from_millis(1500));
    burst.create(&env, 45..60).await?;
    burst.delete(&env, &sampler, 8..10).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_answer_delay(Duration::ZERO);
    let timeouts = transport_errors(writer_admin).await? - timeouts_before;
    eprintln!("{timeouts} Consul requests of the writer timed out in the slow phase");
    assert!(
        timeouts > 0,
        "the writer never timed out waiting for Consul: the phase did not test what it claims"
    );

    let mut expected = burst.pairs(10..60);
    expected.remove(&burst.pair(conflict));
    converged(&env, &burst, &expected, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.finish(20).await?;
    foreign.assert_unchanged(&env).await?;
    assert!(
        proxy.connections() > 1,
        "the writer never reconnected through the proxy ({} connections)",
        proxy.connections()
    );
    Ok(())
}

/// Consul requests that got no HTTP answer (connect failures and timeouts), from the
/// writer's `/metrics`.
async fn transport_errors(admin: std::net::SocketAddr) -> Result<u64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| {
            line.starts_with("consul_smi_consul_requests_total{")
                && line.contains("outcome=\"transport_error\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// A dev agent comes back empty: the writer must write everything again (its owned state
/// and the operator's `* → *` deny are gone; the harness restores the deny).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_crashed_and_back_empty_converges_and_never_over_grants() -> Result<()> {
    let mut env = start_env().await?;
    let burst = Burst::new(2);
    burst.create(&env, 0..20).await?;
    converged(&env, &burst, &burst.pairs(0..20), Duration::from_secs(30)).await?;
    let sampler = GrantSampler::start(consul_url(&env)?, burst.infix(), burst.pairs(0..40));

    env.stop_consul()?;
    burst.create(&env, 20..40).await?;
    burst.delete(&env, &sampler, 0..10).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.start_consul().await?;

    converged(&env, &burst, &burst.pairs(10..40), Duration::from_secs(60)).await?;
    // Reads fail while Consul is down and recovery is quick: sample the converged state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampler.finish(3).await?;
    Ok(())
}

/// The API server goes away mid-burst; while it is down, TrafficTargets disappear behind its
/// back (deleted in etcd, as another API server replica would): the watcher must find the
/// deletions when it lists again, and revoke them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_restarted_with_deletions_while_down_converges_and_never_over_grants()
-> Result<()> {
    let mut env = start_env().await?;
    let burst = Burst::new(3);
    let conflict = 42;
    burst.operator_intentions(&env, conflict).await?;
    let foreign = ForeignIntentions::read(&env).await?;
    let mut grantable = burst.pairs(0..100);
    grantable.remove(&burst.pair(conflict));
    let sampler = GrantSampler::start(consul_url(&env)?, burst.infix(), grantable);

    burst.create(&env, 0..60).await?;
    let mut expected = burst.pairs(0..60);
    expected.remove(&burst.pair(conflict));
    // The first grants must have reached Consul so their revocation is observable.
    converged(&env, &burst, &expected, Duration::from_secs(30)).await?;
    burst.create(&env, 60..70).await?;

    let apiserver = env.apiserver().context("local API server")?;
    apiserver.stop_apiserver();
    for i in 0..10 {
        let key = KubeApiServer::etcd_key(
            "access.smi-spec.io",
            "traffictargets",
            "default",
            &burst.name(i),
        );
        anyhow::ensure!(apiserver.etcd_delete(&key)? == 1, "no etcd key {key}");
        sampler.deleted(burst.pair(i));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    apiserver.start_apiserver().await?;

    burst.create(&env, 70..100).await?;
    burst.delete(&env, &sampler, 10..20).await?;

    let mut expected = burst.pairs(20..100);
    expected.remove(&burst.pair(conflict));
    converged(&env, &burst, &expected, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.finish(10).await?;
    foreign.assert_unchanged(&env).await
}

/// The translator's stream from the watcher and its link to the writer are cut in the
/// middle of an HTTP/2 frame, three times each, during a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_links_cut_mid_message_converge_and_never_over_grant() -> Result<()> {
    let env = E2eEnv::start_with(LocalOptions {
        link_proxies: true,
        ..local_options()
    })
    .await?;
    let burst = Burst::new(4);
    let conflict = 7;
    burst.operator_intentions(&env, conflict).await?;
    let foreign = ForeignIntentions::read(&env).await?;
    let mut grantable = burst.pairs(0..200);
    grantable.remove(&burst.pair(conflict));
    let sampler = GrantSampler::start(consul_url(&env)?, burst.infix(), grantable);
    let watch_stream = env.link_proxy(Service::Watcher).context("watcher proxy")?;
    let writer_link = env.link_proxy(Service::Writer).context("writer proxy")?;

    for chunk in 0..20 {
        let created = chunk * 10..chunk * 10 + 10;
        match chunk {
            3 | 9 | 15 => watch_stream.cut_mid_message(),
            6 | 12 | 18 => writer_link.cut_mid_message(),
            _ => {}
        }
        burst.create(&env, created).await?;
        if chunk >= 2 {
            // Deletes objects of two chunks ago, every fourth.
            let old = (chunk - 2) * 10;
            burst
                .delete(
                    &env,
                    &sampler,
                    (old..old + 10).filter(|i| i.is_multiple_of(4)),
                )
                .await?;
        }
    }
    let deleted = |i: &usize| *i < 180 && i.is_multiple_of(4);
    let mut expected = burst.pairs((0..200).filter(|i| !deleted(i)));
    expected.remove(&burst.pair(conflict));
    converged(&env, &burst, &expected, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampler.finish(10).await?;
    foreign.assert_unchanged(&env).await?;
    eprintln!(
        "cut mid-message: watch stream {} of {} connections, writer link {} of {}",
        watch_stream.cut_connections(),
        watch_stream.connections(),
        writer_link.cut_connections(),
        writer_link.connections()
    );
    assert!(
        watch_stream.cut_connections() >= 1 && writer_link.cut_connections() >= 1,
        "no connection was cut in the middle of a message"
    );
    assert!(
        watch_stream.connections() > 1 && writer_link.connections() > 1,
        "the translator did not reconnect after a cut"
    );
    Ok(())
}
