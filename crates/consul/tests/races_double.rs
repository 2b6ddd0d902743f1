//! Races and no-progress detection on the modern (1.9+) path, against the test double (see
//! `double/mod.rs`; not a live server). Consul 1.9 and 1.10 ignore `DELETE ?cas=`, so a
//! delete there is only as safe as the read right before it.

mod double;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use consul_smi_consul::{ConsulClient, ConsulConfig, Owner, Reconciler, RequestObserver, SyncMode};
use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, Outcome,
    ServiceDefaults, ServiceName,
};
use double::ModernConsul;
use reqwest::Method;
use serde_json::{Value, json};

type Action0 = Box<dyn FnOnce() + Send>;

/// Runs one armed action right after a given request has been answered.
#[derive(Default)]
struct Hook {
    armed: Mutex<Option<(Method, String, Action0)>>,
}

impl Hook {
    fn after(&self, method: Method, path: &str, action: impl FnOnce() + Send + 'static) {
        *self.armed.lock().unwrap() = Some((method, path.to_string(), Box::new(action)));
    }

    fn fired(&self) -> bool {
        self.armed.lock().unwrap().is_none()
    }
}

impl RequestObserver for Hook {
    fn observe(&self, method: &Method, path: &str, _status: Option<u16>, _elapsed: Duration) {
        let mut armed = self.armed.lock().unwrap();
        if armed
            .as_ref()
            .is_some_and(|(m, p, _)| m == method && p == path)
        {
            let (_, _, action) = armed.take().unwrap();
            drop(armed);
            action();
        }
    }
}

fn reconciler(double: &ModernConsul, hook: &Arc<Hook>) -> Reconciler {
    let mut config = ConsulConfig::for_address(double.address.clone());
    config.retry_base = Duration::from_millis(5);
    let observer: Arc<dyn RequestObserver> = hook.clone();
    Reconciler::new(
        ConsulClient::with_observer(&config, Some(observer)).unwrap(),
        Owner::new("w1").unwrap(),
        8,
    )
}

fn allow(source: &str, destination: &str) -> Intention {
    Intention {
        key: IntentionKey {
            source: ServiceName::new(source),
            destination: ServiceName::new(destination),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: format!("allow {source}"),
    }
}

fn defaults(service: &str, protocol: &str) -> ServiceDefaults {
    ServiceDefaults {
        service: ServiceName::new(service),
        protocol: protocol.into(),
    }
}

fn source_names(entry: &Value) -> Vec<String> {
    entry["Sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn on_1_10_a_source_an_operator_adds_inside_the_sync_window_survives_the_last_owned_source_going()
 {
    let double = ModernConsul::start().await;
    // 1.10 ignores `DELETE ?cas=`: removing our last source deletes the whole entry.
    double.set_version("1.10.12");
    let hook = Arc::new(Hook::default());
    let r = reconciler(&double, &hook);
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");

    let operator = double.clone();
    hook.after(Method::GET, "/v1/config/service-intentions", move || {
        let mut entry = operator.entry("service-intentions", "api").unwrap();
        entry["Sources"]
            .as_array_mut()
            .unwrap()
            .push(json!({"Name": "ops", "Action": "deny", "Description": "operator deny"}));
        operator.put_raw(entry);
    });
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert!(hook.fired());
    let entry = double
        .entry("service-intentions", "api")
        .expect("the entry holding the operator's source must survive");
    assert_eq!(source_names(&entry), ["ops"], "{report:?}");
    assert_eq!(report.deleted, 1, "{report:?}");
}

#[tokio::test]
async fn on_1_10_an_operator_takeover_of_an_owned_orphan_inside_the_sync_window_is_not_deleted() {
    let double = ModernConsul::start().await;
    double.set_version("1.10.12");
    let hook = Arc::new(Hook::default());
    let r = reconciler(&double, &hook);
    let reports = r
        .apply(&[Command::UpsertServiceDefaults(defaults("victim", "http"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");

    let operator = double.clone();
    hook.after(Method::GET, "/v1/config/service-defaults", move || {
        operator.put_raw(json!({"Kind": "service-defaults", "Name": "victim",
                                "Protocol": "grpc", "Meta": {"team": "ops"}}));
    });
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert!(hook.fired());
    let victim = double
        .entry("service-defaults", "victim")
        .expect("the operator's entry must survive");
    assert_eq!(victim["Meta"]["team"], "ops");
    assert_eq!((report.deleted, report.conflicts), (0, 1), "{report:?}");
}

#[tokio::test]
async fn a_normalisation_the_writer_does_not_know_is_rewritten_a_bounded_number_of_times() {
    let double = ModernConsul::start().await;
    // Whatever the writer sends, Consul stores something else (e.g. a future normalisation).
    double.mangle_writes(|entry| {
        if entry["Kind"] == "service-defaults" {
            entry["Protocol"] = json!(format!(
                "{}-normalised",
                entry["Protocol"].as_str().unwrap()
            ));
        }
    });
    let r = reconciler(&double, &Arc::new(Hook::default()));
    let mut state = DesiredState::default();
    state
        .service_defaults
        .insert(ServiceName::new("api"), defaults("api", "http"));
    let first = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(first.created, 1, "{first:?}");

    let mut last = first;
    for _ in 0..6 {
        last = r.sync(&state, SyncMode::Exact).await.unwrap();
    }
    assert!(
        double.writes() <= 3,
        "{} writes for one unchanged object",
        double.writes()
    );
    // The stall is reported, not silent.
    assert_eq!(last.rejected, 1, "{last:?}");
    assert!(
        last.results[0].message.contains("no progress"),
        "{:?}",
        last.results
    );

    // A new desired value is progress again: it is written.
    let writes = double.writes();
    state
        .service_defaults
        .insert(ServiceName::new("api"), defaults("api", "grpc"));
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.updated, 1, "{report:?}");
    assert_eq!(double.writes(), writes + 1);
}

#[tokio::test]
async fn case_variants_of_a_config_entry_name_are_one_entry() {
    let double = ModernConsul::start().await;
    let r = reconciler(&double, &Arc::new(Hook::default()));
    double.put_raw(
        json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http",
                          "Meta": {"team": "ops"}}),
    );
    let reports = r
        .apply(&[Command::UpsertServiceDefaults(defaults("API", "http"))])
        .await;
    // Either judgement keeps the operator's entry: the same entry to Consul (a conflict), or,
    // as now, a name the path builder refuses before any request (not a Kubernetes name).
    assert!(
        matches!(reports[0].outcome, Outcome::Conflict | Outcome::Rejected),
        "{reports:?}"
    );
    let mut state = DesiredState::default();
    state
        .service_defaults
        .insert(ServiceName::new("API"), defaults("API", "http"));
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(
        (report.conflicts + report.rejected, report.failed),
        (1, 0),
        "{report:?}"
    );
    assert_eq!(
        double.entry("service-defaults", "api").unwrap()["Meta"]["team"],
        "ops"
    );
}

#[tokio::test]
async fn an_owned_source_consul_keeps_holding_differently_is_rewritten_a_bounded_number_of_times() {
    let double = ModernConsul::start().await;
    double.mangle_writes(|entry| {
        if entry["Kind"] == "service-intentions" {
            for source in entry["Sources"].as_array_mut().unwrap() {
                let description =
                    format!("{} (normalised)", source["Description"].as_str().unwrap());
                source["Description"] = json!(description);
            }
        }
    });
    let r = reconciler(&double, &Arc::new(Hook::default()));
    let mut state = DesiredState::default();
    let wanted = allow("web", "api");
    state.intentions.insert(wanted.key.clone(), wanted);
    let mut last = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(last.created, 1, "{last:?}");
    for _ in 0..6 {
        last = r.sync(&state, SyncMode::Exact).await.unwrap();
    }
    assert!(
        double.writes() <= 3,
        "{} writes for one unchanged source",
        double.writes()
    );
    assert_eq!(last.rejected, 1, "{last:?}");
    assert!(
        last.results[0].message.contains("Description"),
        "{:?}",
        last.results
    );
    assert_eq!(r.stalled_objects(), 1);
}
