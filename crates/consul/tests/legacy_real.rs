//! The reconciler against a REAL Consul 1.8.7 dev agent (legacy ID-based intentions API and
//! 1.8's service-defaults / service-splitter config entries). Fails if Consul cannot start.

use consul_smi_consul::{
    ApiFlavor, Change, ConsulClient, ConsulConfig, Owner, Reconciler, SyncMode,
};
use consul_smi_core::{
    Action, Command, DesiredState, HttpPermission, Intention, IntentionKey, IntentionRule, Outcome,
    PathMatch, Permission, ServiceDefaults, ServiceName, ServiceSplitter, Split,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};
use serde_json::Value;

fn key(source: &str, destination: &str) -> IntentionKey {
    IntentionKey {
        source: ServiceName::new(source),
        destination: ServiceName::new(destination),
    }
}

fn allow(source: &str, destination: &str) -> Intention {
    Intention {
        key: key(source, destination),
        rule: IntentionRule::L4(Action::Allow),
        description: format!("allow {source}"),
    }
}

fn reconciler(agent: &ConsulAgent, token: Option<&str>, owner: &str) -> Reconciler {
    let mut config = ConsulConfig::for_address(agent.http_addr());
    config.token = token.map(str::to_string);
    config.retry_base = std::time::Duration::from_millis(20);
    let client = ConsulClient::new(&config).expect("client");
    Reconciler::new(client, Owner::new(owner).unwrap(), 8)
}

/// All intentions as Consul lists them (management token).
fn intentions(agent: &ConsulAgent) -> Vec<Value> {
    let reply = agent.http("GET", "/v1/connect/intentions", None).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn find<'a>(list: &'a [Value], source: &str, destination: &str) -> Option<&'a Value> {
    list.iter()
        .find(|x| x["SourceName"] == source && x["DestinationName"] == destination)
}

#[tokio::test]
async fn detects_consul_18_as_legacy() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    assert_eq!(
        r.client().agent_version().await.unwrap().to_string(),
        "1.8.7"
    );
    assert_eq!(r.client().flavor().await.unwrap(), ApiFlavor::Legacy);
}

#[tokio::test]
async fn create_update_delete_and_idempotency() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");

    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    assert_eq!(
        (reports[0].outcome, reports[0].change),
        (Outcome::Applied, Change::Created),
        "{reports:?}"
    );
    let list = intentions(&agent);
    let created = find(&list, "web", "api").expect("intention exists");
    assert_eq!(created["Action"], "allow");
    assert_eq!(created["Description"], "allow web");
    assert_eq!(created["Meta"]["managed-by"], "consul-smi");
    assert_eq!(created["Meta"]["consul-smi/owner"], "w1");

    // Re-applying is a no-op.
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Unchanged, "{reports:?}");
    assert_eq!(intentions(&agent)[0]["ModifyIndex"], created["ModifyIndex"]);

    // Update in place keeps the ID.
    let mut deny = allow("web", "api");
    deny.rule = IntentionRule::L4(Action::Deny);
    let reports = r.apply(&[Command::UpsertIntention(deny)]).await;
    assert_eq!(
        (reports[0].outcome, reports[0].change),
        (Outcome::Applied, Change::Updated),
        "{reports:?}"
    );
    let list = intentions(&agent);
    assert_eq!(find(&list, "web", "api").unwrap()["Action"], "deny");
    assert_eq!(find(&list, "web", "api").unwrap()["ID"], created["ID"]);
    assert_eq!(
        find(&list, "web", "api").unwrap()["Meta"]["consul-smi/owner"],
        "w1"
    );

    let reports = r
        .apply(&[Command::DeleteIntention(key("web", "api"))])
        .await;
    assert_eq!(
        (reports[0].outcome, reports[0].change),
        (Outcome::Applied, Change::Deleted),
        "{reports:?}"
    );
    assert!(intentions(&agent).is_empty());
    let reports = r
        .apply(&[Command::DeleteIntention(key("web", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Unchanged, "{reports:?}");
}

#[tokio::test]
async fn batch_with_several_commands_on_one_pair_runs_them_in_order() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    let mut commands: Vec<Command> = (0..40)
        .map(|i| Command::UpsertIntention(allow(&format!("s{i}"), "api")))
        .collect();
    commands.push(Command::DeleteIntention(key("s3", "api")));
    commands.push(Command::UpsertIntention(allow("s3", "api")));
    commands.push(Command::DeleteIntention(key("s4", "api")));
    let reports = r.apply(&commands).await;
    assert!(
        reports[..40].iter().all(|x| x.outcome == Outcome::Applied),
        "{reports:?}"
    );
    assert_eq!(reports[40].change, Change::Deleted);
    assert_eq!(reports[41].change, Change::Created);
    assert_eq!(reports[42].change, Change::Deleted);
    let list = intentions(&agent);
    assert_eq!(list.len(), 39);
    assert!(find(&list, "s3", "api").is_some());
    assert!(find(&list, "s4", "api").is_none());
}

#[tokio::test]
async fn foreign_intention_is_a_conflict_and_left_untouched() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let operator_deny = r#"{"SourceName":"web","DestinationName":"db","Action":"deny","Description":"operator says no"}"#;
    let reply = agent
        .http("POST", "/v1/connect/intentions", Some(operator_deny))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let before = intentions(&agent);

    let r = reconciler(&agent, None, "w1");
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");
    assert!(
        reports[0].message.contains("not managed by consul-smi"),
        "{}",
        reports[0].message
    );
    let reports = r.apply(&[Command::DeleteIntention(key("web", "db"))]).await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");

    // Sync neither overwrites nor deletes it.
    let mut state = DesiredState::default();
    state
        .intentions
        .insert(key("web", "db"), allow("web", "db"));
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.conflicts, 1, "{report:?}");
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(intentions(&agent), before);

    // Another writer's intention is not ours either.
    let other = reconciler(&agent, None, "w2");
    other
        .apply(&[Command::UpsertIntention(allow("web", "cache"))])
        .await;
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "cache"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");
    assert!(
        reports[0].message.contains("another consul-smi writer"),
        "{}",
        reports[0].message
    );
}

#[tokio::test]
async fn l7_intentions_are_rejected_on_a_legacy_server_without_sending_permissions() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    let l7 = Intention {
        key: key("web", "api"),
        rule: IntentionRule::L7(vec![Permission {
            action: Action::Allow,
            http: HttpPermission {
                path: Some(PathMatch::Prefix("/v1".into())),
                methods: vec!["GET".into()],
                headers: vec![],
            },
        }]),
        description: String::new(),
    };
    let reports = r.apply(&[Command::UpsertIntention(l7)]).await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(reports[0].message.contains("1.9"), "{}", reports[0].message);
    assert!(intentions(&agent).is_empty());
}

#[tokio::test]
async fn consul_validation_errors_are_rejected_not_retried() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    // Consul 1.8 refuses partial wildcards with a 500 text body.
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web*", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(
        reports[0].message.contains("wildcard"),
        "{}",
        reports[0].message
    );
}

#[tokio::test]
async fn sync_reconciles_exactly_the_owned_objects() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    let mut state = DesiredState::default();
    for i in 0..30 {
        let x = allow(&format!("s{i}"), "api");
        state.intentions.insert(x.key.clone(), x);
    }
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!((report.created, report.unchanged), (30, 0), "{report:?}");
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (0, 0, 0, 30),
        "{report:?}"
    );

    // Drop ten, change one: Sync deletes and updates only those.
    for i in 0..10 {
        state.intentions.remove(&key(&format!("s{i}"), "api"));
    }
    state.intentions.get_mut(&key("s20", "api")).unwrap().rule = IntentionRule::L4(Action::Deny);
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(
        (
            report.created,
            report.updated,
            report.deleted,
            report.unchanged
        ),
        (0, 1, 10, 19),
        "{report:?}"
    );
    assert_eq!(intentions(&agent).len(), 20);

    // RestoreOnly never deletes.
    let report = r
        .sync(&DesiredState::default(), SyncMode::RestoreOnly)
        .await
        .unwrap();
    assert_eq!(report.deleted, 0);
    assert_eq!(intentions(&agent).len(), 20);
}

#[tokio::test]
async fn splitters_and_service_defaults_on_consul_18() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    let http = |name: &str| ServiceDefaults {
        service: ServiceName::new(name),
        protocol: "http".into(),
    };
    let splitter = ServiceSplitter {
        service: ServiceName::new("web"),
        splits: vec![
            Split {
                weight: 90.0,
                service: "web-v1".into(),
                namespace: None,
            },
            Split {
                weight: 10.0,
                service: "web-v2".into(),
                namespace: None,
            },
        ],
    };
    // The splitter comes first in the batch; the writer still writes service-defaults first
    // because 1.8 refuses a splitter for a tcp service.
    let commands = vec![
        Command::UpsertSplitter(splitter.clone()),
        Command::UpsertServiceDefaults(http("web")),
        Command::UpsertServiceDefaults(http("web-v1")),
        Command::UpsertServiceDefaults(http("web-v2")),
    ];
    let reports = r.apply(&commands).await;
    assert!(
        reports.iter().all(|x| x.outcome == Outcome::Applied),
        "{reports:?}"
    );
    let reply = agent
        .http("GET", "/v1/config/service-splitter/web", None)
        .unwrap();
    let entry: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(entry["Splits"][0]["Weight"], 90.0);
    assert_eq!(entry["Meta"]["consul-smi/owner"], "w1");
    assert!(
        r.apply(&commands)
            .await
            .iter()
            .all(|x| x.outcome == Outcome::Unchanged)
    );

    let mut state = DesiredState::default();
    let mut changed = splitter.clone();
    changed.splits[0].weight = 50.0;
    changed.splits[1].weight = 50.0;
    state.splitters.insert(changed.service.clone(), changed);
    for name in ["web", "web-v1", "web-v2"] {
        state
            .service_defaults
            .insert(ServiceName::new(name), http(name));
    }
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!((report.updated, report.unchanged), (1, 3), "{report:?}");

    // Sync to empty deletes the splitter before the defaults (1.8 would refuse otherwise).
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert_eq!(
        (report.deleted, report.failed, report.rejected),
        (4, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        agent
            .http("GET", "/v1/config/service-defaults", None)
            .unwrap()
            .body
            .trim(),
        "[]"
    );

    // A foreign service-defaults entry is a conflict, even when it holds what we want.
    let reply = agent
        .http(
            "PUT",
            "/v1/config",
            Some(r#"{"Kind":"service-defaults","Name":"ops","Protocol":"http"}"#),
        )
        .unwrap();
    assert_eq!(reply.status, 200);
    let reports = r
        .apply(&[
            Command::UpsertServiceDefaults(http("ops")),
            Command::DeleteServiceDefaults(ServiceName::new("ops")),
        ])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Conflict, "{reports:?}");
    assert!(
        reports[0].message.contains("matches"),
        "{}",
        reports[0].message
    );
    assert_eq!(reports[1].outcome, Outcome::Conflict, "{reports:?}");
}

#[tokio::test]
async fn acl_least_privilege_token_works_and_403s_are_clear() {
    let agent = ConsulAgent::start(ConsulAgentOptions::with_acl()).expect("Consul must start");
    let policy = include_str!("../../writer/acl-policy.hcl");
    let token = agent.create_token("consul-smi-writer", policy).unwrap();

    let r = reconciler(&agent, Some(&token), "w1");
    // The least-privilege token has no agent:read; the version probe falls back.
    assert!(
        r.client()
            .agent_version()
            .await
            .unwrap_err()
            .is_permission_denied()
    );
    assert_eq!(r.client().flavor().await.unwrap(), ApiFlavor::Legacy);
    let mut state = DesiredState::default();
    state
        .intentions
        .insert(key("web", "api"), allow("web", "api"));
    state.service_defaults.insert(
        ServiceName::new("api"),
        ServiceDefaults {
            service: ServiceName::new("api"),
            protocol: "http".into(),
        },
    );
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.created, 2, "{report:?}");
    let report = r.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.unchanged, 2, "{report:?}");

    // No token at all.
    let anonymous = reconciler(&agent, None, "w1");
    let reports = anonymous
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(
        reports[0].message.contains("403") && reports[0].message.contains("CONSUL_HTTP_TOKEN"),
        "{}",
        reports[0].message
    );

    // Unknown token.
    let bogus = reconciler(&agent, Some("00000000-0000-0000-0000-000000000000"), "w1");
    let reports = bogus
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(
        reports[0].message.contains("unknown to Consul"),
        "{}",
        reports[0].message
    );

    // A token that may read but not write intentions.
    let read_only = agent
        .create_token(
            "read-only",
            r#"service_prefix "" { policy = "read" intentions = "read" }"#,
        )
        .unwrap();
    let weak = reconciler(&agent, Some(&read_only), "w1");
    let reports = weak
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(
        reports[0].message.contains("lacks the ACL rights"),
        "{}",
        reports[0].message
    );
    state
        .intentions
        .insert(key("web", "db"), allow("web", "db"));
    let report = weak.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!((report.rejected, report.unchanged), (1, 2), "{report:?}");
    assert!(report.results[0].message.contains("403"), "{report:?}");
}

#[tokio::test]
async fn https_with_a_ca_and_a_client_certificate() {
    let agent = ConsulAgent::start(ConsulAgentOptions::with_tls()).expect("Consul must start");
    let tls = agent.tls().unwrap();
    let mut config = ConsulConfig::for_address(agent.https_url().unwrap());
    config.ca_cert = Some(tls.ca_cert.clone());
    config.client_cert = Some(tls.client_cert.clone());
    config.client_key = Some(tls.client_key.clone());
    let r = Reconciler::new(
        ConsulClient::new(&config).unwrap(),
        Owner::new("w1").unwrap(),
        4,
    );
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
    assert!(find(&intentions(&agent), "web", "api").is_some());

    // `host:port` plus CONSUL_HTTP_SSL=true means https too.
    let mut config = config.clone();
    config.address = agent
        .https_url()
        .unwrap()
        .trim_start_matches("https://")
        .to_string();
    config.ssl = true;
    let r = Reconciler::new(
        ConsulClient::new(&config).unwrap(),
        Owner::new("w1").unwrap(),
        4,
    );
    assert_eq!(
        r.apply(&[Command::UpsertIntention(allow("web", "api"))])
            .await[0]
            .outcome,
        Outcome::Unchanged
    );

    // Without the client certificate the server refuses the handshake: a transport failure.
    let mut no_identity = config.clone();
    no_identity.client_cert = None;
    no_identity.client_key = None;
    no_identity.max_attempts = 2;
    let r = Reconciler::new(
        ConsulClient::new(&no_identity).unwrap(),
        Owner::new("w1").unwrap(),
        4,
    );
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Failed, "{reports:?}");

    // Without the CA the server certificate is not trusted.
    let mut no_ca = config.clone();
    no_ca.ca_cert = None;
    no_ca.max_attempts = 1;
    let r = Reconciler::new(
        ConsulClient::new(&no_ca).unwrap(),
        Owner::new("w1").unwrap(),
        4,
    );
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "db"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Failed, "{reports:?}");
    assert!(
        reports[0].message.to_lowercase().contains("certificate"),
        "{}",
        reports[0].message
    );

    // Bad files fail at construction, naming the variable.
    let mut missing = config.clone();
    missing.ca_cert = Some("/nonexistent/ca.pem".into());
    let err = ConsulClient::new(&missing).unwrap_err().to_string();
    assert!(err.contains("CONSUL_CACERT"), "{err}");
}

#[tokio::test]
async fn long_descriptions_are_cut_to_consuls_limit_and_stay_idempotent() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let r = reconciler(&agent, None, "w1");
    let mut long = allow("web", "api");
    long.description = "granted by ".to_string() + &"é".repeat(300);
    let reports = r.apply(&[Command::UpsertIntention(long.clone())]).await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
    let list = intentions(&agent);
    let stored = find(&list, "web", "api").unwrap()["Description"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        stored.len() <= 512 && stored.starts_with("granted by é"),
        "{stored}"
    );
    let reports = r.apply(&[Command::UpsertIntention(long)]).await;
    assert_eq!(reports[0].outcome, Outcome::Unchanged, "{reports:?}");
}
