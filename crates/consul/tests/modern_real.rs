//! The reconciler against a REAL Consul 1.14.11 dev agent (`service-intentions` config
//! entries), where sources made through the legacy intentions API carry `LegacyID` and
//! `LegacyMeta`. Fails if Consul cannot be built or started.

use consul_smi_consul::{ConsulClient, ConsulConfig, Owner, Reconciler};
use consul_smi_core::{
    Action, Command, Intention, IntentionKey, IntentionRule, Outcome, ServiceName,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions, ConsulRelease};
use serde_json::{Value, json};

fn start() -> ConsulAgent {
    ConsulAgent::start(ConsulAgentOptions::default().on(ConsulRelease::Modern))
        .expect("Consul 1.14.11 must start")
}

fn reconciler(agent: &ConsulAgent, owner: &str) -> Reconciler {
    consul_smi_consul::install_crypto_provider();
    let mut config = ConsulConfig::for_address(agent.http_addr());
    config.retry_base = std::time::Duration::from_millis(20);
    Reconciler::new(
        ConsulClient::new(&config).expect("client"),
        Owner::new(owner).unwrap(),
        8,
    )
}

fn key(source: &str, destination: &str) -> IntentionKey {
    IntentionKey {
        source: ServiceName::new(source),
        destination: ServiceName::new(destination),
    }
}

fn allow(source: &str, destination: &str) -> Command {
    Command::UpsertIntention(Intention {
        key: key(source, destination),
        rule: IntentionRule::L4(Action::Allow),
        description: format!("tt/{source}"),
    })
}

/// `consul intention create` through the legacy endpoint, which 1.14 stores as a source with
/// `LegacyID` (and `LegacyMeta` when `meta` is given).
fn legacy_create(agent: &ConsulAgent, source: &str, destination: &str, action: &str, meta: Value) {
    let body = json!({"SourceName": source, "DestinationName": destination,
                      "Action": action, "Description": "operator", "Meta": meta});
    let reply = agent
        .http("POST", "/v1/connect/intentions", Some(&body.to_string()))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn entry(agent: &ConsulAgent, name: &str) -> Value {
    let reply = agent
        .http(
            "GET",
            &format!("/v1/config/service-intentions/{name}"),
            None,
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn source<'a>(entry: &'a Value, name: &str) -> Option<&'a Value> {
    entry["Sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Name"] == name)
}

#[tokio::test]
async fn an_operators_legacy_intention_in_the_entry_is_reported_not_converted() {
    let agent = start();
    legacy_create(&agent, "web", "db", "deny", json!({"team": "ops"}));
    let before = entry(&agent, "db");

    let r = reconciler(&agent, "w1");
    let reports = r.apply(&[allow("sentinel", "db")]).await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");
    assert!(
        reports[0].message.contains("legacy intentions API") && reports[0].message.contains("web"),
        "{reports:?}"
    );
    // The operator's intention keeps its legacy identity and metadata; nothing was written.
    let after = entry(&agent, "db");
    assert_eq!(after, before);
    assert_eq!(source(&after, "web").unwrap()["LegacyMeta"]["team"], "ops");
    assert!(source(&after, "sentinel").is_none());
}

#[tokio::test]
async fn sources_migrated_from_our_legacy_intentions_stay_ours_after_any_write() {
    let agent = start();
    let owner = Owner::new("w1").unwrap();
    let ours = serde_json::to_value(owner.meta()).unwrap();
    // What Consul's 1.8 -> 1.9+ migration leaves: our legacy intentions as sources whose
    // LegacyMeta holds our marks.
    legacy_create(&agent, "web", "api", "allow", ours.clone());
    legacy_create(&agent, "web2", "api", "allow", ours);

    let r = reconciler(&agent, "w1");
    let reports = r.apply(&[allow("web3", "api")]).await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
    let after = entry(&agent, "api");
    for name in ["web", "web2", "web3"] {
        let description = source(&after, name).unwrap()["Description"]
            .as_str()
            .unwrap();
        assert!(
            description.starts_with("[consul-smi:w1]"),
            "{name} keeps an ownership mark once LegacyMeta is gone: {after}"
        );
    }
    // Still ours: a later revocation removes it.
    let reports = r
        .apply(&[Command::DeleteIntention(key("web2", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
    assert!(source(&entry(&agent, "api"), "web2").is_none());
}
