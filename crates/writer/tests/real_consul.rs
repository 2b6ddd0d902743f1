//! The writer service end to end: a real tonic server and client, a REAL Consul 1.8.7 dev
//! agent (fails if Consul cannot start), drift repair, and a Consul restart mid-batch.

use std::time::{Duration, Instant};

use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, ServiceName,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};
use consul_smi_grpc::v1;
use consul_smi_grpc::v1::consul_writer_client::ConsulWriterClient;
use consul_smi_grpc::writer::command_to_wire;
use consul_smi_writer::{WriterConfig, serve};
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(20);

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

struct RunningWriter {
    client: ConsulWriterClient<Channel>,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningWriter {
    async fn start(agent: &ConsulAgent, token: Option<&str>) -> RunningWriter {
        let mut config = WriterConfig::for_consul(agent.http_addr());
        config.consul.token = token.map(str::to_string);
        config.consul.retry_base = Duration::from_millis(20);
        config.drift_debounce = Duration::from_millis(100);
        config.drift_wait = Duration::from_secs(10);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(
                config,
                listener,
                consul_smi_telemetry::Metrics::new(),
                consul_smi_telemetry::Readiness::new(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("writer serves");
        });
        let channel = Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to writer");
        RunningWriter {
            client: ConsulWriterClient::new(channel.clone()),
            channel,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn intentions(agent: &ConsulAgent) -> Vec<Value> {
    let reply = agent.http("GET", "/v1/connect/intentions", None).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn find<'a>(list: &'a [Value], source: &str, destination: &str) -> Option<&'a Value> {
    list.iter()
        .find(|x| x["SourceName"] == source && x["DestinationName"] == destination)
}

/// Polls until `check` holds; panics with `what` after [`DEADLINE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sync_request(state: &DesiredState) -> v1::SyncRequest {
    v1::SyncRequest {
        state: Some(state.into()),
        trace: None,
    }
}

#[tokio::test]
async fn grpc_apply_sync_and_health() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut writer = RunningWriter::start(&agent, None).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(writer.channel.clone());
    let request = tonic_health::pb::HealthCheckRequest {
        service: "consul_smi.v1.ConsulWriter".into(),
    };
    let start = Instant::now();
    loop {
        let status = health
            .check(request.clone())
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "writer never became SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let commands = vec![
        command_to_wire("c1", &Command::UpsertIntention(allow("web", "api"))),
        command_to_wire("c2", &Command::UpsertIntention(allow("web*", "api"))),
        v1::Command {
            id: "c3".into(),
            trace: None,
            command: None,
            ..Default::default()
        },
        command_to_wire("c4", &Command::DeleteIntention(key("nobody", "api"))),
    ];
    let response = writer
        .client
        .apply(v1::ApplyRequest {
            commands: commands.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<(String, i32)> = response
        .results
        .iter()
        .map(|r| (r.id.clone(), r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("c1".to_string(), v1::Outcome::Applied as i32),
            ("c2".to_string(), v1::Outcome::Rejected as i32),
            ("c3".to_string(), v1::Outcome::Rejected as i32),
            ("c4".to_string(), v1::Outcome::Unchanged as i32),
        ]
    );
    // The writer's own name check refuses it before Consul would (issue 23).
    assert!(
        response.results[1]
            .message
            .contains("refused by consul-writer"),
        "{:?}",
        response.results[1]
    );
    assert!(
        response.results[2].message.contains("command"),
        "{:?}",
        response.results[2]
    );
    assert_eq!(
        find(&intentions(&agent), "web", "api").unwrap()["Meta"]["managed-by"],
        "consul-smi"
    );

    let response = writer
        .client
        .apply(v1::ApplyRequest {
            commands: commands[..1].to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].outcome, v1::Outcome::Unchanged as i32);

    // Sync to a different state: web->api goes, two new ones come.
    let mut state = DesiredState::default();
    for x in [allow("a", "api"), allow("b", "api")] {
        state.intentions.insert(x.key.clone(), x);
    }
    let response = writer
        .client
        .sync(sync_request(&state))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            response.created,
            response.deleted,
            response.updated,
            response.conflicts
        ),
        (2, 1, 0, 0),
        "{response:?}"
    );
    assert!(
        response
            .results
            .iter()
            .any(|r| r.id == "sync:intention web -> api"),
        "{response:?}"
    );
    let list = intentions(&agent);
    assert_eq!(list.len(), 2);
    let response = writer
        .client
        .sync(sync_request(&state))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.created, response.unchanged),
        (0, 2),
        "{response:?}"
    );

    // A malformed state is refused as a whole.
    let mut bad = v1::DesiredState::from(&state);
    bad.intentions[0].key = None;
    let status = writer
        .client
        .sync(v1::SyncRequest {
            state: Some(bad),
            trace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    writer.shutdown().await;
}

#[tokio::test]
async fn drift_repair_restores_deleted_and_modified_intentions_and_leaves_foreign_ones() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let operator_deny =
        r#"{"SourceName":"evil","DestinationName":"api","Action":"deny","Description":"operator"}"#;
    assert_eq!(
        agent
            .http("POST", "/v1/connect/intentions", Some(operator_deny))
            .unwrap()
            .status,
        200
    );
    let mut writer = RunningWriter::start(&agent, None).await;

    let mut state = DesiredState::default();
    for x in [
        allow("web", "api"),
        allow("cli", "api"),
        allow("evil", "api"),
    ] {
        state.intentions.insert(x.key.clone(), x);
    }
    let response = writer
        .client
        .sync(sync_request(&state))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.created, response.conflicts),
        (2, 1),
        "{response:?}"
    );

    // Out-of-band delete.
    let web = find(&intentions(&agent), "web", "api").unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        agent
            .http("DELETE", &format!("/v1/connect/intentions/{web}"), None)
            .unwrap()
            .status,
        200
    );
    eventually("web -> api is restored", || {
        find(&intentions(&agent), "web", "api").is_some()
    })
    .await;

    // Out-of-band modification (an operator flips our allow to deny and strips our Meta).
    let cli = find(&intentions(&agent), "cli", "api").unwrap().clone();
    let flipped = r#"{"SourceName":"cli","DestinationName":"api","Action":"deny","Meta":{"managed-by":"consul-smi","consul-smi/owner":"consul-smi"}}"#;
    let reply = agent
        .http(
            "PUT",
            &format!("/v1/connect/intentions/{}", cli["ID"].as_str().unwrap()),
            Some(flipped),
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    eventually("cli -> api is allow again", || {
        find(&intentions(&agent), "cli", "api")
            .is_some_and(|x| x["Action"] == "allow" && x["Description"] == "allow cli")
    })
    .await;

    // Applied commands are remembered too: a new upsert is restored after deletion.
    let response = writer
        .client
        .apply(v1::ApplyRequest {
            commands: vec![command_to_wire(
                "x",
                &Command::UpsertIntention(allow("new", "api")),
            )],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].outcome, v1::Outcome::Applied as i32);
    let new = find(&intentions(&agent), "new", "api").unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        agent
            .http("DELETE", &format!("/v1/connect/intentions/{new}"), None)
            .unwrap()
            .status,
        200
    );
    eventually("new -> api is restored", || {
        find(&intentions(&agent), "new", "api").is_some()
    })
    .await;

    // The operator's deny was never touched.
    let evil = find(&intentions(&agent), "evil", "api").unwrap().clone();
    assert_eq!(evil["Action"], "deny");
    assert_eq!(evil["Description"], "operator");
    assert!(
        evil["Meta"].as_object().is_none_or(|m| m.is_empty()),
        "{evil}"
    );
    writer.shutdown().await;
}

#[tokio::test]
async fn consul_restart_mid_batch_loses_nothing() {
    let mut agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut writer = RunningWriter::start(&agent, None).await;
    let mut state = DesiredState::default();
    for i in 0..1000 {
        let x = allow(&format!("s{i}"), "api");
        state.intentions.insert(x.key.clone(), x);
    }
    let mut client = writer.client.clone();
    let request = sync_request(&state);
    let sync = tokio::spawn(async move { client.sync(request).await });
    // Restart once part of the batch is in (dev agents come back empty: the worst case).
    eventually("the batch has started", || intentions(&agent).len() >= 50).await;
    agent.restart().expect("Consul restarts");
    let outcome = sync.await.unwrap();
    eprintln!(
        "sync across the restart: {:?}",
        outcome
            .as_ref()
            .map(|r| (r.get_ref().created, r.get_ref().results.len()))
    );
    eventually("all 1000 intentions are back", || {
        intentions(&agent).len() == 1000
    })
    .await;
    let list = intentions(&agent);
    assert!(
        list.iter()
            .all(|x| x["Meta"]["consul-smi/owner"] == "consul-smi")
    );
    let _ = &mut writer;
    writer.shutdown().await;
}

#[tokio::test]
async fn acl_agent_with_least_privilege_token_through_grpc() {
    let agent = ConsulAgent::start(ConsulAgentOptions::with_acl()).expect("Consul must start");
    let token = agent
        .create_token("consul-smi-writer", consul_smi_writer::ACL_POLICY)
        .unwrap();
    let mut writer = RunningWriter::start(&agent, Some(&token)).await;
    let mut state = DesiredState::default();
    state
        .intentions
        .insert(key("web", "api"), allow("web", "api"));
    let response = writer
        .client
        .sync(sync_request(&state))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.created, 1, "{response:?}");
    writer.shutdown().await;

    let mut anonymous = RunningWriter::start(&agent, None).await;
    let commands = vec![command_to_wire(
        "c1",
        &Command::UpsertIntention(allow("web", "db")),
    )];
    let response = anonymous
        .client
        .apply(v1::ApplyRequest { commands })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].outcome, v1::Outcome::Rejected as i32);
    assert!(
        response.results[0].message.contains("CONSUL_HTTP_TOKEN"),
        "{:?}",
        response.results[0]
    );
    anonymous.shutdown().await;
}

#[tokio::test]
async fn drift_watch_is_quiet_while_nothing_changes() {
    use std::sync::atomic::Ordering::Relaxed;
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut config = WriterConfig::for_consul(agent.http_addr());
    config.drift_debounce = Duration::from_millis(50);
    let writer =
        consul_smi_writer::Writer::new(config, consul_smi_telemetry::Metrics::new()).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let drift = tokio::spawn(writer.clone().run_drift_repair(stopped));
    let mut state = DesiredState::default();
    for x in [allow("web", "api"), allow("cli", "api")] {
        state.intentions.insert(x.key.clone(), x);
    }
    writer.sync(state).await.unwrap();

    // Our own writes may cause a pass or two; then the blocking queries must just wait.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let passes = writer.counters().drift_passes.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        writer.counters().drift_passes.load(Relaxed),
        passes,
        "drift passes while idle"
    );
    assert_eq!(writer.counters().drift_repairs.load(Relaxed), 0);

    let web = find(&intentions(&agent), "web", "api").unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        agent
            .http("DELETE", &format!("/v1/connect/intentions/{web}"), None)
            .unwrap()
            .status,
        200
    );
    eventually("web -> api is restored", || {
        find(&intentions(&agent), "web", "api").is_some()
    })
    .await;
    assert_eq!(writer.counters().drift_repairs.load(Relaxed), 1);
    stop.send(true).unwrap();
    drift.await.unwrap();
}
