//! Sync of many unchanged config entries against a REAL Consul dev agent: what a Sync (or a
//! drift-repair pass) costs under the writer's lock when nothing changed. Prints figures,
//! asserts nothing about time.
//!
//! `cargo bench -p consul-smi-consul --bench sync_entries` (N from
//! `CONSUL_SMI_BENCH_ENTRIES`, default 8000: N service-defaults plus N service-splitters).

use std::time::{Duration, Instant};

use consul_smi_consul::{ConsulClient, ConsulConfig, Owner, Reconciler, SyncMode};
use consul_smi_core::{DesiredState, ServiceDefaults, ServiceName, ServiceSplitter, Split};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CONSUL_SMI_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8000);
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut config = ConsulConfig::for_address(agent.http_addr());
    config.rate_limit = 0.0;
    let reconciler = Reconciler::new(
        ConsulClient::new(&config).unwrap(),
        Owner::new("bench").unwrap(),
        16,
    );
    let mut state = DesiredState::default();
    for i in 0..n {
        let service = ServiceName::new(format!("svc-{i}"));
        state.service_defaults.insert(
            service.clone(),
            ServiceDefaults {
                service: service.clone(),
                protocol: "http".into(),
            },
        );
        state.splitters.insert(
            service.clone(),
            ServiceSplitter {
                service: service.clone(),
                splits: vec![Split {
                    weight: 100.0,
                    service: service.name.clone(),
                    namespace: None,
                }],
            },
        );
    }
    let start = Instant::now();
    let report = reconciler.sync(&state, SyncMode::Exact).await.unwrap();
    let create = start.elapsed();
    assert_eq!(
        report.created as usize,
        2 * n,
        "{:?}",
        report.results.first()
    );

    let mut resyncs: Vec<Duration> = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let report = reconciler.sync(&state, SyncMode::Exact).await.unwrap();
        resyncs.push(start.elapsed());
        assert_eq!(
            report.unchanged as usize,
            2 * n,
            "{:?}",
            report.results.first()
        );
    }
    resyncs.sort();
    println!(
        "consul-smi Sync of {n} service-defaults + {n} service-splitters, Consul 1.8.7 dev agent"
    );
    println!("  first Sync (creates all)  : {create:.2?}");
    println!(
        "  re-Sync, nothing changed  : min {:.2?}, median {:.2?} (3 runs)",
        resyncs[0], resyncs[1]
    );
}
