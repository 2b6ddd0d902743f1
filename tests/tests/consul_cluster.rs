//! consul-smi's Consul client against clusters as users run them: three servers (Raft on disk)
//! and a client agent, ACLs on with `default_policy = "deny"`, on both intention APIs (real
//! 1.8.7 and real 1.14.11). The client talks to the client agent, so every write is forwarded
//! and every refusal comes back in its forwarded shape (`rpc error making call: ...`).

use std::time::Duration;

use anyhow::Result;
use consul_smi_consul::{
    Call, ConsulClient, ConsulConfig, ConsulError, Owner, Reconciler, SyncMode,
};
use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, Outcome, ServiceName,
};
use consul_smi_e2e::cluster::ConsulCluster;
use consul_smi_e2e::consul::ConsulRelease;
use serde_json::json;

/// The least-privilege policy the README documents for consul-writer.
const WRITER_POLICY: &str = r#"service_prefix "" {
  policy     = "write"
  intentions = "write"
}"#;

fn client(cluster: &ConsulCluster, token: &str) -> ConsulClient {
    consul_smi_consul::install_crypto_provider();
    let mut config = ConsulConfig::for_address(cluster.client_http_addr());
    config.token = Some(token.to_string());
    config.retry_base = Duration::from_millis(5);
    ConsulClient::new(&config).expect("client config")
}

/// What a validation refusal through a client agent must be: final, not retried as if the
/// cluster had trouble.
fn assert_final_validation(result: Result<consul_smi_consul::RawResponse, ConsulError>) {
    match result {
        Err(ConsulError::Validation { message, .. }) => {
            assert!(
                !message.contains("rpc error"),
                "the forwarding prefix is not part of Consul's reason: {message:?}"
            );
        }
        other => panic!("expected a final validation error, got {other:?}"),
    }
}

async fn forwarded_validation_errors_are_final(release: ConsulRelease) -> Result<()> {
    let cluster = ConsulCluster::start(release, true)?;
    let token = cluster.create_token("consul-smi-writer", WRITER_POLICY)?;
    let consul = client(&cluster, &token);

    let invalid = match release {
        ConsulRelease::Legacy => Call::new(
            reqwest::Method::POST,
            "/v1/connect/intentions",
            "create intention",
        )
        .json(&json!({"SourceName": "web", "DestinationName": "api", "Action": "bogus"}))?,
        ConsulRelease::Modern => Call::new(reqwest::Method::PUT, "/v1/config", "write entry")
            .json(&json!({"Kind": "service-intentions", "Name": "api",
                          "Sources": [{"Name": "web", "Action": "bogus"}]}))?,
    };
    assert_final_validation(consul.send(invalid).await);

    // A refusal that names a service whose name holds a transient-looking word ("videofeed"
    // holds "eof") is still a refusal.
    if release == ConsulRelease::Legacy {
        let create = || {
            Call::new(
                reqwest::Method::POST,
                "/v1/connect/intentions",
                "create intention",
            )
            .json(&json!({"SourceName": "videofeed", "DestinationName": "api", "Action": "allow"}))
        };
        consul.send(create()?).await?;
        assert_final_validation(consul.send(create()?).await);
    }

    // The API-flavour probe works with the least-privilege token through the client agent.
    let flavor = consul.flavor().await?;
    assert_eq!(
        flavor,
        match release {
            ConsulRelease::Legacy => consul_smi_consul::ApiFlavor::Legacy,
            ConsulRelease::Modern => consul_smi_consul::ApiFlavor::Modern,
        }
    );
    Ok(())
}

#[tokio::test]
async fn forwarded_validation_errors_are_final_on_1_8() -> Result<()> {
    forwarded_validation_errors_are_final(ConsulRelease::Legacy).await
}

#[tokio::test]
async fn forwarded_validation_errors_are_final_on_1_14() -> Result<()> {
    forwarded_validation_errors_are_final(ConsulRelease::Modern).await
}

/// Every intention as a legacy-shaped row (1.9+: read from the entries, see the oracle).
fn rows(cluster: &ConsulCluster) -> Result<Vec<serde_json::Value>> {
    let (path, modern) = match cluster.release() {
        ConsulRelease::Legacy => ("/v1/connect/intentions", false),
        ConsulRelease::Modern => ("/v1/config/service-intentions", true),
    };
    let reply = cluster.http("GET", path, None)?;
    anyhow::ensure!(reply.status == 200, "{path}: {}", reply.body);
    let listed: Option<Vec<serde_json::Value>> = serde_json::from_str(&reply.body)?;
    let listed = listed.unwrap_or_default();
    Ok(if modern {
        consul_smi_e2e::oracle::intention_rows(&listed)
    } else {
        listed
    })
}

fn allow(source: &str, destination: &str) -> Intention {
    Intention {
        key: IntentionKey {
            source: ServiceName::new(source),
            destination: ServiceName::new(destination),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: format!("tt/{source}"),
    }
}

/// The leader SIGKILLed while a burst of writes goes through a client agent: once a new
/// leader is elected, a Sync converges to exactly the desired state, and the operator's deny
/// on a pair the state also grants is neither changed nor replaced.
async fn leader_killed_mid_burst_converges(release: ConsulRelease) -> Result<()> {
    let mut cluster = ConsulCluster::start(release, true)?;
    let token = cluster.create_token("consul-smi-writer", WRITER_POLICY)?;
    let operator = match release {
        ConsulRelease::Legacy => (
            "POST",
            "/v1/connect/intentions",
            r#"{"SourceName":"web-0","DestinationName":"guarded","Action":"deny","Description":"operator"}"#,
        ),
        ConsulRelease::Modern => (
            "PUT",
            "/v1/config",
            r#"{"Kind":"service-intentions","Name":"guarded","Sources":[{"Name":"web-0","Action":"deny","Description":"operator"}]}"#,
        ),
    };
    let reply = cluster.http(operator.0, operator.1, Some(operator.2))?;
    anyhow::ensure!(reply.status == 200, "operator write: {}", reply.body);
    let operator_row = |rows: &[serde_json::Value]| {
        rows.iter()
            .find(|r| r["SourceName"] == "web-0" && r["DestinationName"] == "guarded")
            .cloned()
    };
    let operator_before = operator_row(&rows(&cluster)?).expect("operator's deny");

    let mut config = ConsulConfig::for_address(cluster.client_http_addr());
    config.token = Some(token);
    config.retry_base = Duration::from_millis(20);
    let reconciler = Reconciler::new(ConsulClient::new(&config)?, Owner::new("w1").unwrap(), 8);
    let mut state = DesiredState::default();
    for i in 0..200 {
        let intention = allow(&format!("web-{i}"), &format!("api-{}", i % 5));
        state.intentions.insert(intention.key.clone(), intention);
    }
    let guarded = allow("web-0", "guarded");
    state.intentions.insert(guarded.key.clone(), guarded);
    let commands: Vec<Command> = state
        .intentions
        .values()
        .cloned()
        .map(Command::UpsertIntention)
        .collect();

    let leader = cluster.leader()?;
    let burst = reconciler.apply(&commands);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        cluster.kill_server(leader);
    };
    let (reports, ()) = tokio::join!(burst, kill);
    let failed = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .count();
    eprintln!(
        "{release:?}: {failed} of {} commands failed while the leader was down",
        reports.len()
    );

    // What a writer does after failures: Sync until Consul follows (the election takes a
    // moment; bounded so a broken cluster fails the test).
    let mut last = None;
    for _ in 0..60 {
        match reconciler.sync(&state, SyncMode::Exact).await {
            Ok(report) if report.failed == 0 => {
                last = Some(report);
                break;
            }
            Ok(report) => last = Some(report),
            Err(error) => eprintln!("sync failed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = last.expect("at least one Sync answered");
    assert_eq!(report.failed, 0, "converged: {report:?}");
    assert_eq!(report.conflicts, 1, "the operator's pair: {report:?}");

    let after = rows(&cluster)?;
    for intention in state.intentions.values() {
        let (source, destination) = (&intention.key.source.name, &intention.key.destination.name);
        let row = after
            .iter()
            .find(|r| r["SourceName"] == **source && r["DestinationName"] == **destination)
            .unwrap_or_else(|| panic!("{source} -> {destination} missing"));
        if destination != "guarded" {
            assert_eq!(row["Action"], "allow");
            assert!(consul_smi_e2e::oracle::is_owned(row), "{row}");
        }
    }
    let operator_after = operator_row(&after).expect("operator's deny kept");
    assert_eq!(
        operator_after, operator_before,
        "the operator's deny is untouched"
    );
    assert_eq!(
        after.len(),
        state.intentions.len(),
        "nothing else: {after:?}"
    );
    Ok(())
}

#[tokio::test]
async fn leader_killed_mid_burst_converges_on_1_8() -> Result<()> {
    leader_killed_mid_burst_converges(ConsulRelease::Legacy).await
}

#[tokio::test]
async fn leader_killed_mid_burst_converges_on_1_14() -> Result<()> {
    leader_killed_mid_burst_converges(ConsulRelease::Modern).await
}
