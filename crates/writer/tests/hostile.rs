//! consul-writer against hostile gRPC callers (issue 23): a REAL Consul 1.8.7 dev agent
//! (fails if Consul cannot start) and a real tonic server. Any holder of a certificate from
//! the consul-smi CA can call Apply and Sync, so the writer checks what it is sent.

use std::time::Duration;

use consul_smi_core::{
    Action, Command, DesiredState, Intention, IntentionKey, IntentionRule, ServiceDefaults,
    ServiceName,
};
use consul_smi_e2e::consul::{ConsulAgent, ConsulAgentOptions};
use consul_smi_grpc::v1;
use consul_smi_grpc::v1::consul_writer_client::ConsulWriterClient;
use consul_smi_grpc::writer::command_to_wire;
use consul_smi_writer::{WriterConfig, serve};
use serde_json::Value;
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct RunningWriter {
    client: ConsulWriterClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningWriter {
    /// Drift repair is off: each test drives the writer with explicit Apply and Sync calls.
    async fn start(agent: &ConsulAgent) -> RunningWriter {
        let mut config = WriterConfig::for_consul(agent.http_addr());
        config.consul.retry_base = Duration::from_millis(20);
        config.drift_repair = false;
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
            client: ConsulWriterClient::new(channel),
            stop: Some(stop),
            task,
        }
    }

    async fn apply(&mut self, commands: &[Command]) -> v1::ApplyResponse {
        let request = v1::ApplyRequest {
            commands: commands
                .iter()
                .enumerate()
                .map(|(i, c)| command_to_wire(format!("c{i}"), c))
                .collect(),
        };
        self.client.apply(request).await.unwrap().into_inner()
    }

    async fn sync(&mut self, state: &DesiredState) -> Result<v1::SyncResponse, tonic::Status> {
        let request = v1::SyncRequest {
            state: Some(state.into()),
            trace: None,
        };
        self.client.sync(request).await.map(|r| r.into_inner())
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn defaults(name: &str) -> Command {
    Command::UpsertServiceDefaults(ServiceDefaults {
        service: ServiceName::new(name),
        protocol: "http".into(),
    })
}

fn intentions(agent: &ConsulAgent) -> Vec<Value> {
    let reply = agent.http("GET", "/v1/connect/intentions", None).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn rejected(response: &v1::ApplyResponse) -> bool {
    response
        .results
        .iter()
        .all(|r| r.outcome == v1::Outcome::Rejected as i32)
}

/// Finding 1: an owned config entry named `../../connect/intentions/<id>` or `x/../api`,
/// dropped by the next Sync, must not become a DELETE of the operator's intention or entry
/// (Consul cleans the path and answers 301; a client that follows it deletes elsewhere).
#[tokio::test]
async fn names_that_climb_out_of_their_path_segment_never_reach_operator_objects() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let deny =
        r#"{"SourceName":"web","DestinationName":"db","Action":"deny","Description":"operator"}"#;
    let reply = agent
        .http("POST", "/v1/connect/intentions", Some(deny))
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let id = serde_json::from_str::<Value>(&reply.body).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let api = r#"{"Kind":"service-defaults","Name":"api","Protocol":"grpc"}"#;
    assert_eq!(
        agent.http("PUT", "/v1/config", Some(api)).unwrap().status,
        200
    );

    let mut writer = RunningWriter::start(&agent).await;
    let hostile = [
        defaults(&format!("../../connect/intentions/{id}")),
        defaults("x/../api"),
    ];
    let response = writer.apply(&hostile).await;
    // A Sync creates entries from a listing (no GET by name), so a hostile state would get
    // them into Consul; the empty Sync after it then deletes them by path.
    let mut state = DesiredState::default();
    for command in &hostile {
        if let Command::UpsertServiceDefaults(d) = command {
            state.service_defaults.insert(d.service.clone(), d.clone());
        }
    }
    let hostile_sync = writer.sync(&state).await;
    writer.sync(&DesiredState::default()).await.unwrap();

    let operator = intentions(&agent);
    assert!(
        operator.iter().any(|x| x["ID"] == id.as_str()),
        "operator's deny was deleted: {operator:?}"
    );
    let reply = agent
        .http("GET", "/v1/config/service-defaults/api", None)
        .unwrap();
    assert_eq!(reply.status, 200, "operator's service-defaults api deleted");
    let web_db = intentions(&agent);
    assert!(
        !web_db.iter().any(|x| x["Action"] == "allow"),
        "the writer wrote an allow: {web_db:?}"
    );
    assert!(rejected(&response), "{response:?}");
    let status = hostile_sync.expect_err("a state with path-climbing names is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    writer.shutdown().await;
}

/// Finding 1: `*` belongs only to the managed deny; an allow from or to every service, or
/// a name outside the Kubernetes rule, is refused before Consul sees it.
#[tokio::test]
async fn wildcard_allows_and_non_kubernetes_names_are_rejected_at_the_wire() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut writer = RunningWriter::start(&agent).await;
    let allow = |source: &str, destination: &str| {
        Command::UpsertIntention(Intention {
            key: IntentionKey {
                source: ServiceName::new(source),
                destination: ServiceName::new(destination),
            },
            rule: IntentionRule::L4(Action::Allow),
            description: "hostile".into(),
        })
    };
    let response = writer
        .apply(&[
            allow("*", "db"),
            allow("web", "*"),
            allow("Web", "db"),
            allow("web\nINFO forged", "db"),
        ])
        .await;
    assert!(rejected(&response), "{response:?}");
    assert!(
        response.results[3].message.contains("\\n"),
        "control characters are escaped in messages: {:?}",
        response.results[3].message
    );
    assert!(intentions(&agent).is_empty());

    let deny = Command::UpsertIntention(Intention {
        key: IntentionKey {
            source: ServiceName::new("*"),
            destination: ServiceName::new("*"),
        },
        rule: IntentionRule::L4(Action::Deny),
        description: "consul-smi: managed default deny".into(),
    });
    let response = writer.apply(&[deny]).await;
    assert_eq!(
        response.results[0].outcome,
        v1::Outcome::Applied as i32,
        "{response:?}"
    );
    writer.shutdown().await;
}

/// Finding 10: a Sync without a state is refused; it used to read as "nothing" and delete
/// everything the writer owns. An explicitly empty state still means nothing.
#[tokio::test]
async fn a_sync_without_a_state_is_refused_and_deletes_nothing() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let mut writer = RunningWriter::start(&agent).await;
    let allow = Command::UpsertIntention(Intention {
        key: IntentionKey {
            source: ServiceName::new("web"),
            destination: ServiceName::new("api"),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: "granted".into(),
    });
    let response = writer.apply(&[allow]).await;
    assert_eq!(response.results[0].outcome, v1::Outcome::Applied as i32);

    let status = writer
        .client
        .sync(v1::SyncRequest {
            state: None,
            trace: None,
        })
        .await
        .expect_err("a Sync without a state is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(intentions(&agent).len(), 1, "the owned intention survives");

    writer.sync(&DesiredState::default()).await.unwrap();
    assert!(
        intentions(&agent).is_empty(),
        "an empty state means nothing"
    );
    writer.shutdown().await;
}

/// Finding 8: a conflict names the pair and who holds it, never the ID of the operator's
/// intention (a handle a hostile caller could aim a path at).
#[tokio::test]
async fn conflicts_do_not_quote_foreign_intention_ids() {
    let agent = ConsulAgent::start(ConsulAgentOptions::default()).expect("Consul must start");
    let deny = r#"{"SourceName":"web","DestinationName":"db","Action":"deny"}"#;
    let reply = agent
        .http("POST", "/v1/connect/intentions", Some(deny))
        .unwrap();
    let id = serde_json::from_str::<Value>(&reply.body).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let mut writer = RunningWriter::start(&agent).await;
    let key = IntentionKey {
        source: ServiceName::new("web"),
        destination: ServiceName::new("db"),
    };
    let upsert = Command::UpsertIntention(Intention {
        key: key.clone(),
        rule: IntentionRule::L4(Action::Allow),
        description: "granted".into(),
    });
    for command in [upsert, Command::DeleteIntention(key)] {
        let response = writer.apply(&[command]).await;
        let result = &response.results[0];
        assert_eq!(result.outcome, v1::Outcome::Conflict as i32, "{result:?}");
        assert!(result.message.contains("web -> db"), "{result:?}");
        assert!(!result.message.contains(&id), "{result:?}");
    }
    writer.shutdown().await;
}

/// A writer (the library, no gRPC) whose Consul does not answer.
fn unreachable_writer() -> std::sync::Arc<consul_smi_writer::Writer> {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let mut config = WriterConfig::for_consul(address.to_string());
    config.consul.max_attempts = 1;
    config.drift_repair = false;
    consul_smi_writer::Writer::new(config, consul_smi_telemetry::Metrics::new()).unwrap()
}

fn one_intention() -> (Command, DesiredState) {
    let intention = Intention {
        key: IntentionKey {
            source: ServiceName::new("web"),
            destination: ServiceName::new("api"),
        },
        rule: IntentionRule::L4(Action::Allow),
        description: "granted".into(),
    };
    let mut state = DesiredState::default();
    state
        .intentions
        .insert(intention.key.clone(), intention.clone());
    (Command::UpsertIntention(intention), state)
}

/// Finding 1: a command that failed never enters the writer's memory (drift repair would
/// otherwise apply it later, outside any caller's view).
#[tokio::test]
async fn a_failed_command_is_not_remembered() {
    let writer = unreachable_writer();
    let (command, _) = one_intention();
    let reports = writer.apply(&[command]).await;
    assert_eq!(
        reports[0].outcome,
        consul_smi_core::Outcome::Failed,
        "{reports:?}"
    );
    assert!(writer.desired_state().is_empty());
}

/// Finding 7: a failed Sync leaves the memory as it was.
#[tokio::test]
async fn a_failed_sync_does_not_replace_the_memory() {
    let writer = unreachable_writer();
    let (_, state) = one_intention();
    writer.sync(state).await.expect_err("Consul is unreachable");
    assert!(writer.desired_state().is_empty());
}
