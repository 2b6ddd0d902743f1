//! Writer throughput against a REAL Consul dev agent, next to a raw sequential HTTP loop
//! against the same agent in the same run.
//!
//! `cargo bench -p consul-smi-consul --bench throughput` (N from `CONSUL_SMI_BENCH_N`,
//! default 10000). The agent is restarted (emptied) between runs so both start from zero.

use std::time::{Duration, Instant};

use consul_smi_consul::{
    ConsulClient, ConsulConfig, Owner, Reconciler, SyncMode, install_crypto_provider,
};
use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, Outcome, ServiceName,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};

fn intention(i: usize, destination: &str) -> Intention {
    Intention {
        key: IntentionKey {
            source: ServiceName::new(format!("src-{i}")),
            destination: ServiceName::new(destination),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: format!("bench {i}"),
    }
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CONSUL_SMI_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let concurrency: usize = std::env::var("CONSUL_SMI_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    install_crypto_provider();

    // Raw: one keep-alive connection, sequential POSTs, no reads, no ownership checks.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/connect/intentions", agent.url());
    let start = Instant::now();
    for i in 0..n {
        let body = format!(
            r#"{{"SourceName":"src-{i}","DestinationName":"raw","Action":"allow","Description":"bench {i}"}}"#
        );
        let response = http.post(&url).body(body).send().await.expect("raw POST");
        assert!(
            response.status().is_success(),
            "raw POST {i}: {}",
            response.status()
        );
        response.bytes().await.unwrap();
    }
    let raw = start.elapsed();

    // Writer: Apply of n upserts in batches of 1000 (lists once per batch, checks ownership,
    // writes concurrently).
    agent.restart().expect("Consul restarts");
    let mut config = ConsulConfig::for_address(agent.http_addr());
    config.max_concurrency = concurrency;
    let reconciler = Reconciler::new(
        ConsulClient::new(&config).unwrap(),
        Owner::new("bench").unwrap(),
        concurrency,
    );
    let commands: Vec<Command> = (0..n)
        .map(|i| Command::UpsertIntention(intention(i, "writer")))
        .collect();
    let start = Instant::now();
    for batch in commands.chunks(1000) {
        let reports = reconciler.apply(batch).await;
        assert!(
            reports.iter().all(|r| r.outcome == Outcome::Applied),
            "{:?}",
            reports.iter().find(|r| r.outcome != Outcome::Applied)
        );
    }
    let apply = start.elapsed();

    // Writer: one Sync of the whole state into an empty Consul.
    agent.restart().expect("Consul restarts");
    let mut state = DesiredState::default();
    for i in 0..n {
        let x = intention(i, "sync");
        state.intentions.insert(x.key.clone(), x);
    }
    let start = Instant::now();
    let report = reconciler.sync(&state, SyncMode::Exact).await.unwrap();
    let sync = start.elapsed();
    assert_eq!(report.created as usize, n, "{:?}", report.results.first());
    let start = Instant::now();
    let report = reconciler.sync(&state, SyncMode::Exact).await.unwrap();
    let resync = start.elapsed();
    assert_eq!(report.unchanged as usize, n);

    println!(
        "consul-smi writer throughput, {n} intention upserts, Consul 1.8.7 dev agent (in-memory raft), concurrency {concurrency}, rate limit {} req/s (default)",
        config.rate_limit
    );
    println!(
        "  raw sequential HTTP loop : {:>8.0} writes/s  ({:.2?})",
        rate(n, raw),
        raw
    );
    println!(
        "  writer Apply (batches 1k): {:>8.0} writes/s  ({:.2?})  {:.0}% of raw",
        rate(n, apply),
        apply,
        100.0 * raw.as_secs_f64() / apply.as_secs_f64()
    );
    println!(
        "  writer Sync (one state)  : {:>8.0} writes/s  ({:.2?})  {:.0}% of raw",
        rate(n, sync),
        sync,
        100.0 * raw.as_secs_f64() / sync.as_secs_f64()
    );
    println!(
        "  writer re-Sync, no change: {:.2?} for {n} objects",
        resync
    );
}
