//! Races and key rules against a REAL Consul 1.8.7 dev agent: an operator change that lands
//! between the writer's list and its write, Consul's case-insensitive intention keys, and
//! values Consul normalises. Fails if Consul cannot start.
//!
//! The operator's change is made deterministic through the client's `RequestObserver`: it
//! runs right after the writer's list request has been answered, i.e. inside the window
//! between "listed" and "written".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consul_smi_consul::{ConsulClient, ConsulConfig, Owner, Reconciler, RequestObserver, SyncMode};
use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, Outcome,
    ServiceDefaults, ServiceName, ServiceSplitter, Split,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};
use reqwest::Method;
use serde_json::{Value, json};

type Action0 = Box<dyn FnOnce() + Send>;

/// Counts the writer's successful writes and runs one armed action after a given request.
#[derive(Default)]
struct Hook {
    armed: Mutex<Option<(Method, String, Action0)>>,
    writes: AtomicU64,
}

impl Hook {
    /// Runs `action` once, right after the next `method path` request (path without query).
    fn after(&self, method: Method, path: &str, action: impl FnOnce() + Send + 'static) {
        *self.armed.lock().unwrap() = Some((method, path.to_string(), Box::new(action)));
    }

    fn fired(&self) -> bool {
        self.armed.lock().unwrap().is_none()
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

impl RequestObserver for Hook {
    fn observe(&self, method: &Method, path: &str, status: Option<u16>, _elapsed: Duration) {
        if *method != Method::GET && status.is_some_and(|s| s < 300) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
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

fn reconciler(agent: &ConsulAgent, hook: &Arc<Hook>) -> Reconciler {
    let mut config = ConsulConfig::for_address(agent.http_addr());
    config.retry_base = Duration::from_millis(20);
    let observer: Arc<dyn RequestObserver> = hook.clone();
    let client = ConsulClient::with_observer(&config, Some(observer)).expect("client");
    Reconciler::new(client, Owner::new("w1").unwrap(), 8)
}

fn key(source: &str, destination: &str) -> IntentionKey {
    IntentionKey {
        source: ServiceName::new(source),
        destination: ServiceName::new(destination),
    }
}

fn allow(source: &str, destination: &str, description: &str) -> Intention {
    Intention {
        key: key(source, destination),
        rule: IntentionRule::L4(Action::Allow),
        description: description.into(),
    }
}

fn defaults(service: &str, protocol: &str) -> ServiceDefaults {
    ServiceDefaults {
        service: ServiceName::new(service),
        protocol: protocol.into(),
    }
}

fn get(agent: &ConsulAgent, path: &str) -> Option<Value> {
    let reply = agent.http("GET", path, None).unwrap();
    if reply.status == 404 {
        return None;
    }
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    Some(serde_json::from_str(&reply.body).unwrap())
}

fn intention_by_pair(agent: &ConsulAgent, source: &str, destination: &str) -> Option<Value> {
    let list = get(agent, "/v1/connect/intentions").unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["SourceName"] == source && x["DestinationName"] == destination)
        .cloned()
}

/// An operator's in-place edit by ID (`PUT /v1/connect/intentions/<id>` replaces Meta too).
fn operator_edits_to_deny(agent: &ConsulAgent, id: &str, source: &str, destination: &str) {
    let body = json!({
        "SourceName": source, "DestinationName": destination, "SourceType": "consul",
        "Action": "deny", "Description": "operator deny", "Meta": {"team": "ops"}
    });
    let reply = agent
        .http(
            "PUT",
            &format!("/v1/connect/intentions/{id}"),
            Some(&body.to_string()),
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn an_operator_takeover_of_an_owned_orphan_inside_the_sync_window_is_not_deleted() {
    let agent =
        Arc::new(ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start"));
    let hook = Arc::new(Hook::default());
    let r = reconciler(&agent, &hook);
    let reports = r
        .apply(&[Command::UpsertServiceDefaults(defaults("victim", "http"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");

    // The Sync lists service-defaults, finds `victim` owned and no longer wanted; the
    // operator's `consul config write` lands right after that list.
    let operator = agent.clone();
    hook.after(Method::GET, "/v1/config/service-defaults", move || {
        let body = json!({"Kind": "service-defaults", "Name": "victim", "Protocol": "grpc",
                          "Meta": {"team": "ops"}});
        let reply = operator
            .http("PUT", "/v1/config", Some(&body.to_string()))
            .unwrap();
        assert_eq!(reply.body.trim(), "true", "operator write");
    });
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert!(hook.fired(), "the operator's write ran inside the window");

    let victim = get(&agent, "/v1/config/service-defaults/victim")
        .expect("the operator's service-defaults must survive the Sync");
    assert_eq!(victim["Meta"]["team"], "ops");
    assert_eq!(victim["Protocol"], "grpc");
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(report.conflicts, 1, "{report:?}");
}

#[tokio::test]
async fn an_operator_edit_of_an_owned_intention_inside_the_sync_window_is_not_overwritten_or_deleted()
 {
    let agent =
        Arc::new(ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start"));
    let hook = Arc::new(Hook::default());
    let r = reconciler(&agent, &hook);
    let reports = r
        .apply(&[
            Command::UpsertIntention(allow("web", "api", "v1")),
            Command::UpsertIntention(allow("old", "api", "v1")),
        ])
        .await;
    assert!(
        reports.iter().all(|x| x.outcome == Outcome::Applied),
        "{reports:?}"
    );
    let web = intention_by_pair(&agent, "web", "api").unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let old = intention_by_pair(&agent, "old", "api").unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();

    // The new state updates web -> api (new description) and drops old -> api. Right after
    // the Sync's intentions list, the operator turns both into their own denies by ID.
    let mut state = DesiredState::default();
    let wanted = allow("web", "api", "v2");
    state.intentions.insert(wanted.key.clone(), wanted);
    let operator = agent.clone();
    hook.after(Method::GET, "/v1/connect/intentions", move || {
        operator_edits_to_deny(&operator, &web, "web", "api");
        operator_edits_to_deny(&operator, &old, "old", "api");
    });
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert!(hook.fired(), "the operator's edits ran inside the window");

    for source in ["web", "old"] {
        let x = intention_by_pair(&agent, source, "api")
            .unwrap_or_else(|| panic!("the operator's {source} -> api deny was deleted"));
        assert_eq!(x["Action"], "deny", "{source} -> api: {x}");
        assert_eq!(x["Meta"]["team"], "ops", "{source} -> api: {x}");
    }
    assert_eq!((report.updated, report.deleted), (0, 0), "{report:?}");
    assert_eq!(report.conflicts, 2, "{report:?}");
}

#[tokio::test]
async fn an_intention_differing_only_in_case_from_an_operators_is_a_conflict_on_1_8() {
    let agent =
        Arc::new(ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start"));
    let hook = Arc::new(Hook::default());
    let r = reconciler(&agent, &hook);
    let body = json!({"SourceName": "op-web", "DestinationName": "op-api",
                      "SourceType": "consul", "Action": "deny"});
    let reply = agent
        .http("POST", "/v1/connect/intentions", Some(&body.to_string()))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let before = intention_by_pair(&agent, "op-web", "op-api").unwrap();

    let reports = r
        .apply(&[Command::UpsertIntention(allow("OP-WEB", "OP-API", "x"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");

    let mut state = DesiredState::default();
    let wanted = allow("OP-WEB", "OP-API", "x");
    state.intentions.insert(wanted.key.clone(), wanted);
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!((report.conflicts, report.failed), (1, 0), "{report:?}");
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(intention_by_pair(&agent, "op-web", "op-api"), Some(before));
}

#[tokio::test]
async fn values_consul_normalises_do_not_start_a_rewrite_loop() {
    let agent =
        Arc::new(ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start"));
    let hook = Arc::new(Hook::default());
    let r = reconciler(&agent, &hook);
    let mut state = DesiredState::default();
    for (service, protocol) in [("api", "HTTP"), ("api-v1", "http"), ("api-v2", "Http")] {
        state
            .service_defaults
            .insert(ServiceName::new(service), defaults(service, protocol));
    }
    let split = |service: &str, weight: f32| Split {
        weight,
        service: service.into(),
        namespace: None,
    };
    state.splitters.insert(
        ServiceName::new("api"),
        ServiceSplitter {
            service: ServiceName::new("api"),
            splits: vec![split("api-v1", 50.004), split("api-v2", 49.996)],
        },
    );
    let first = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(
        (first.created, first.rejected, first.failed),
        (4, 0, 0),
        "{first:?}"
    );
    let splitter = get(&agent, "/v1/config/service-splitter/api").unwrap();
    assert_eq!(
        splitter["Splits"][0]["Weight"], 50,
        "Consul rounds weights to hundredths"
    );

    // Drift repair re-runs the same state; each pass used to rewrite both objects.
    let writes = hook.writes();
    for _ in 0..5 {
        r.sync(&state, SyncMode::Exact).await.unwrap();
    }
    let rewrites = hook.writes() - writes;
    assert!(
        rewrites <= 2,
        "{rewrites} rewrites in 5 passes of an unchanged state"
    );
}
