//! Drift repair on the modern (1.9+) path, against the config-entry API double of
//! `consul-smi-consul` (it follows the upstream docs; no live Consul 1.9+ runs here).

#[path = "../../consul/tests/double/mod.rs"]
mod double;

use std::time::{Duration, Instant};

use consul_smi_core::{Action, DesiredState, Intention, IntentionKey, IntentionRule, ServiceName};
use consul_smi_writer::{Writer, WriterConfig};
use double::ModernConsul;
use serde_json::Value;

fn allow(source: &str, destination: &str) -> Intention {
    Intention {
        key: IntentionKey {
            source: ServiceName::new(source),
            destination: ServiceName::new(destination),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: String::new(),
    }
}

fn source_names(entry: Option<Value>) -> Vec<String> {
    entry
        .and_then(|e| e["Sources"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|s| s["Name"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn drift_repair_restores_sources_and_entries_on_the_modern_api() {
    let double = ModernConsul::start().await;
    let mut config = WriterConfig::for_consul(double.address.clone());
    config.drift_debounce = Duration::from_millis(50);
    config.drift_wait = Duration::from_secs(5);
    let writer = Writer::new(config, consul_smi_telemetry::Metrics::new()).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drift = tokio::spawn(writer.clone().run_drift_repair(stopped));

    let mut state = DesiredState::default();
    for x in [allow("a", "api"), allow("b", "api"), allow("c", "db")] {
        state.intentions.insert(x.key.clone(), x);
    }
    let report = writer.sync(state).await.unwrap();
    assert_eq!(report.created, 3, "{report:?}");

    // Out of band: our source `a` is removed from the shared entry, and `db`'s entry deleted.
    let mut api = double.entry("service-intentions", "api").unwrap();
    api["Sources"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["Name"] != "a");
    double.put_raw(api);
    eventually("a -> api is back", || {
        source_names(double.entry("service-intentions", "api")).contains(&"a".to_string())
    })
    .await;
    // One change at a time: two within the debounce window are repaired together, once.
    double.remove("service-intentions", "db");
    eventually("c -> db is back", || {
        source_names(double.entry("service-intentions", "db")) == ["c"]
    })
    .await;
    assert!(
        writer
            .counters()
            .drift_repairs
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    // Idle: the blocking queries wait instead of spinning.
    let passes = || {
        writer
            .counters()
            .drift_passes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = passes();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(passes(), before, "drift passes while idle");

    stop.send(true).unwrap();
    drift.await.unwrap();
}

#[tokio::test]
async fn drift_repair_stops_rewriting_what_consul_keeps_holding_differently() {
    let double = ModernConsul::start().await;
    // A normalisation the writer does not know: each write is stored differently, and each
    // of the writer's own writes wakes its blocking queries for another pass.
    double.mangle_writes(|entry| {
        if entry["Kind"] == "service-defaults" {
            entry["Protocol"] = serde_json::json!("http-normalised");
        }
    });
    let mut config = WriterConfig::for_consul(double.address.clone());
    config.drift_debounce = Duration::from_millis(50);
    config.drift_wait = Duration::from_secs(5);
    let metrics = consul_smi_telemetry::Metrics::new();
    let writer = Writer::new(config, metrics.clone()).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drift = tokio::spawn(writer.clone().run_drift_repair(stopped));

    let mut state = DesiredState::default();
    let api = ServiceName::new("api");
    state.service_defaults.insert(
        api.clone(),
        consul_smi_core::ServiceDefaults {
            service: api,
            protocol: "http".into(),
        },
    );
    writer.sync(state).await.unwrap();
    eventually("the stalled object is reported", || {
        metrics
            .encode()
            .contains("consul_smi_writer_stalled_objects 1")
    })
    .await;
    let writes = double.writes();
    assert!(writes <= 2, "{writes} writes of one object");
    // Settled: no pass rewrites it any more (each rewrite would wake the watch again).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(double.writes(), writes);

    stop.send(true).unwrap();
    drift.await.unwrap();
}
