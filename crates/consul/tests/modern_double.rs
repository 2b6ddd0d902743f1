//! The modern (Consul 1.9+) code path: `service-intentions` config entries with CAS, against
//! a test double that follows the upstream API docs (see `double/mod.rs`). Not a live server.

mod double;

use consul_smi_consul::{
    ApiFlavor, Change, ConsulClient, ConsulConfig, Owner, Reconciler, SyncMode,
};
use consul_smi_core::{
    Action, Command, DesiredState, HeaderMatch, HeaderMatchKind, HttpPermission, Intention,
    IntentionKey, IntentionRule, Outcome, PathMatch, Permission, ServiceDefaults, ServiceName,
};
use double::ModernConsul;
use serde_json::json;

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

fn l7(source: &str, destination: &str, prefix: &str) -> Intention {
    Intention {
        key: key(source, destination),
        rule: IntentionRule::L7(vec![Permission {
            action: Action::Allow,
            http: HttpPermission {
                path: Some(PathMatch::Prefix(prefix.into())),
                methods: vec!["GET".into(), "POST".into()],
                headers: vec![HeaderMatch {
                    name: "x-team".into(),
                    kind: HeaderMatchKind::Exact("a".into()),
                    invert: false,
                }],
            },
        }]),
        description: "rg/api".into(),
    }
}

fn reconciler(double: &ModernConsul, owner: &str) -> Reconciler {
    let mut config = ConsulConfig::for_address(double.address.clone());
    config.retry_base = std::time::Duration::from_millis(5);
    config.token = Some("t0ken".into());
    Reconciler::new(
        ConsulClient::new(&config).unwrap(),
        Owner::new(owner).unwrap(),
        8,
    )
}

async fn http_service(r: &Reconciler, name: &str) {
    let reports = r
        .apply(&[Command::UpsertServiceDefaults(ServiceDefaults {
            service: ServiceName::new(name),
            protocol: "http".into(),
        })])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
}

#[tokio::test]
async fn detects_the_modern_api() {
    let double = ModernConsul::start().await;
    let r = reconciler(&double, "w1");
    assert_eq!(
        r.client().agent_version().await.unwrap().to_string(),
        "1.16.0"
    );
    assert_eq!(r.client().flavor().await.unwrap(), ApiFlavor::Modern);
}

#[tokio::test]
async fn l4_and_l7_sources_are_written_into_one_entry_per_destination() {
    let double = ModernConsul::start().await;
    let r = reconciler(&double, "w1");
    http_service(&r, "api").await;
    let reports = r
        .apply(&[
            Command::UpsertIntention(allow("web", "api")),
            Command::UpsertIntention(l7("cli", "api", "/v1")),
        ])
        .await;
    assert!(
        reports.iter().all(|x| x.change == Change::Created),
        "{reports:?}"
    );
    let entry = double.entry("service-intentions", "api").unwrap();
    assert_eq!(
        entry["Meta"],
        json!({"managed-by": "consul-smi", "consul-smi/owner": "w1"})
    );
    assert_eq!(entry["Sources"][0]["Name"], "web");
    assert_eq!(entry["Sources"][0]["Action"], "allow");
    assert_eq!(
        entry["Sources"][0]["Description"],
        "[consul-smi:w1] allow web"
    );
    assert_eq!(
        entry["Sources"][1]["Permissions"],
        json!([{"Action": "allow", "HTTP": {"PathPrefix": "/v1", "Methods": ["GET", "POST"], "Header": [{"Name": "x-team", "Exact": "a"}]}}])
    );
    assert!(entry["Sources"][1].get("Action").is_none());

    // Long descriptions are cut to Consul's 512 bytes, keeping the ownership tag.
    let mut long = allow("long", "api");
    long.description = "é".repeat(400);
    let reports = r.apply(&[Command::UpsertIntention(long.clone())]).await;
    assert_eq!(reports[0].change, Change::Created, "{reports:?}");
    let stored = double.entry("service-intentions", "api").unwrap()["Sources"][2]["Description"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        stored.len() <= 512 && stored.starts_with("[consul-smi:w1] é"),
        "{stored}"
    );
    assert_eq!(
        r.apply(&[Command::UpsertIntention(long)]).await[0].outcome,
        Outcome::Unchanged
    );
    r.apply(&[Command::DeleteIntention(key("long", "api"))])
        .await;

    // Idempotent: nothing is written the second time.
    let writes = double.writes();
    let reports = r
        .apply(&[
            Command::UpsertIntention(allow("web", "api")),
            Command::UpsertIntention(l7("cli", "api", "/v1")),
        ])
        .await;
    assert!(
        reports.iter().all(|x| x.outcome == Outcome::Unchanged),
        "{reports:?}"
    );
    assert_eq!(double.writes(), writes);

    // Update and delete; the entry goes away with its last source because we created it.
    let mut deny = allow("web", "api");
    deny.rule = IntentionRule::L4(Action::Deny);
    let reports = r
        .apply(&[
            Command::UpsertIntention(deny),
            Command::DeleteIntention(key("cli", "api")),
        ])
        .await;
    assert_eq!(
        (reports[0].change, reports[1].change),
        (Change::Updated, Change::Deleted),
        "{reports:?}"
    );
    assert_eq!(
        double.entry("service-intentions", "api").unwrap()["Sources"][0]["Action"],
        "deny"
    );
    let reports = r
        .apply(&[Command::DeleteIntention(key("web", "api"))])
        .await;
    assert_eq!(reports[0].change, Change::Deleted);
    assert!(double.entry("service-intentions", "api").is_none());
}

#[tokio::test]
async fn shared_entries_keep_foreign_sources_meta_and_unknown_fields() {
    let double = ModernConsul::start().await;
    double.put_raw(json!({
        "Kind": "service-intentions", "Name": "api",
        "Meta": {"external-source": "kubernetes"},
        "JWT": {"Providers": [{"Name": "okta"}]},
        "Sources": [{"Name": "ops", "Action": "deny", "Description": "operator"}]
    }));
    let r = reconciler(&double, "w1");
    let reports = r
        .apply(&[
            Command::UpsertIntention(allow("web", "api")),
            Command::UpsertIntention(allow("ops", "api")),
        ])
        .await;
    assert_eq!(reports[0].change, Change::Created, "{reports:?}");
    assert_eq!(reports[1].outcome, Outcome::Conflict, "{reports:?}");
    assert!(
        reports[1].message.contains("not managed by consul-smi"),
        "{}",
        reports[1].message
    );
    let entry = double.entry("service-intentions", "api").unwrap();
    assert_eq!(entry["Meta"], json!({"external-source": "kubernetes"}));
    assert_eq!(entry["JWT"], json!({"Providers": [{"Name": "okta"}]}));
    assert_eq!(entry["Sources"][0]["Action"], "deny");
    assert_eq!(entry["Sources"][0]["Description"], "operator");
    assert_eq!(entry["Sources"].as_array().unwrap().len(), 2);

    // Sync to nothing removes only our source; the operator's entry stays.
    let report = r
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert_eq!((report.deleted, report.conflicts), (1, 0), "{report:?}");
    let entry = double.entry("service-intentions", "api").unwrap();
    assert_eq!(entry["Sources"].as_array().unwrap().len(), 1);
    assert_eq!(entry["Sources"][0]["Name"], "ops");

    // If only our source is left in the operator's entry, removing it removes the entry:
    // Consul refuses an entry without sources.
    r.apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    let mut entry = double.entry("service-intentions", "api").unwrap();
    entry["Sources"]
        .as_array_mut()
        .unwrap()
        .retain(|s| s["Name"] != "ops");
    double.put_raw(entry);
    let reports = r
        .apply(&[Command::DeleteIntention(key("web", "api"))])
        .await;
    assert_eq!(reports[0].change, Change::Deleted, "{reports:?}");
    assert!(double.entry("service-intentions", "api").is_none());
}

#[tokio::test]
async fn cas_conflicts_are_retried_without_losing_the_concurrent_write() {
    let double = ModernConsul::start().await;
    let r = reconciler(&double, "w1");
    r.apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    // Someone adds a source between our read and our write.
    double.race_next_write(|entry| {
        entry["Sources"]
            .as_array_mut()
            .unwrap()
            .push(json!({"Name": "late", "Action": "allow", "Precedence": 9}));
    });
    let reports = r
        .apply(&[Command::UpsertIntention(allow("cli", "api"))])
        .await;
    assert_eq!(reports[0].change, Change::Created, "{reports:?}");
    let entry = double.entry("service-intentions", "api").unwrap();
    let names: Vec<&str> = entry["Sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "late", "cli"]);
}

#[tokio::test]
async fn invalid_sources_are_rejected_alone_and_transient_errors_retried() {
    let double = ModernConsul::start().await;
    let r = reconciler(&double, "w1");
    http_service(&r, "api").await;
    double.fail_next(3);
    let reports = r
        .apply(&[
            Command::UpsertIntention(l7("good", "api", "/ok")),
            Command::UpsertIntention(l7("bad", "api", "no-slash")),
            Command::UpsertIntention(l7("web", "tcp-svc", "/x")),
            Command::UpsertIntention(l7("web", "*", "/x")),
        ])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Applied, "{reports:?}");
    assert_eq!(reports[1].outcome, Outcome::Rejected, "{reports:?}");
    assert!(
        reports[1].message.contains("doesn't start with '/'"),
        "{}",
        reports[1].message
    );
    assert_eq!(reports[2].outcome, Outcome::Rejected);
    assert!(
        reports[2].message.contains("protocol \"tcp\""),
        "{}",
        reports[2].message
    );
    assert_eq!(reports[3].outcome, Outcome::Rejected);
    assert!(
        reports[3].message.contains("wildcarded destinations"),
        "{}",
        reports[3].message
    );
    let entry = double.entry("service-intentions", "api").unwrap();
    assert_eq!(entry["Sources"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn sync_and_ownership_between_writers() {
    let double = ModernConsul::start().await;
    let w1 = reconciler(&double, "w1");
    let w2 = reconciler(&double, "w2");
    let mut state = DesiredState::default();
    for x in [allow("a", "api"), allow("b", "api"), allow("c", "db")] {
        state.intentions.insert(x.key.clone(), x);
    }
    let report = w1.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.created, 3, "{report:?}");
    let report = w1.sync(&state, SyncMode::Exact).await.unwrap();
    assert_eq!(report.unchanged, 3, "{report:?}");

    // Another writer adds its own source to w1's entry, and cannot take w1's.
    let reports = w2
        .apply(&[
            Command::UpsertIntention(allow("z", "api")),
            Command::UpsertIntention(allow("a", "api")),
        ])
        .await;
    assert_eq!(reports[0].change, Change::Created);
    assert_eq!(reports[1].outcome, Outcome::Conflict);
    assert!(
        reports[1].message.contains("another consul-smi writer"),
        "{}",
        reports[1].message
    );

    // w1 drops everything: its sources go, w2's stays, so the entry stays.
    let report = w1
        .sync(&DesiredState::default(), SyncMode::Exact)
        .await
        .unwrap();
    assert_eq!(report.deleted, 3, "{report:?}");
    assert!(double.entry("service-intentions", "db").is_none());
    let api = double.entry("service-intentions", "api").unwrap();
    assert_eq!(api["Sources"].as_array().unwrap().len(), 1);
    assert_eq!(api["Sources"][0]["Name"], "z");
}

#[tokio::test]
async fn sources_migrated_from_our_legacy_intentions_are_ours() {
    let double = ModernConsul::start().await;
    // What Consul makes of a legacy intention we wrote, after an upgrade to 1.9+.
    double.put_raw(json!({
        "Kind": "service-intentions", "Name": "api",
        "Sources": [{"Name": "web", "Action": "allow", "Description": "allow web",
                     "LegacyID": "8b6b4b5e-0000-0000-0000-000000000000",
                     "LegacyMeta": {"managed-by": "consul-smi", "consul-smi/owner": "w1"},
                     "LegacyCreateTime": "2020-01-01T00:00:00Z", "LegacyUpdateTime": "2020-01-01T00:00:00Z"}]
    }));
    let r = reconciler(&double, "w1");
    let mut deny = allow("web", "api");
    deny.rule = IntentionRule::L4(Action::Deny);
    let reports = r.apply(&[Command::UpsertIntention(deny)]).await;
    assert_eq!(reports[0].change, Change::Updated, "{reports:?}");
    let source = &double.entry("service-intentions", "api").unwrap()["Sources"][0];
    assert_eq!(source["Action"], "deny");
    assert_eq!(source["Description"], "[consul-smi:w1] allow web");
    assert!(source.get("LegacyID").is_none());
}

#[tokio::test]
async fn forbidden_requests_are_rejected_with_a_token_hint() {
    let double = ModernConsul::start().await;
    double.require_token("another-token");
    let r = reconciler(&double, "w1");
    let reports = r
        .apply(&[Command::UpsertIntention(allow("web", "api"))])
        .await;
    assert_eq!(reports[0].outcome, Outcome::Rejected, "{reports:?}");
    assert!(reports[0].message.contains("403"), "{}", reports[0].message);
}
